//! The guest's initramfs: a deterministic cpio "newc" archive written in Rust.
//!
//! The archive holds the guest agent as `/init` plus what PID 1 needs before it can mount
//! anything: the mount points `/dev`, `/proc`, `/sys`, `/tmp`, and `/dev/console` (char 5:1),
//! because the kernel opens the console for PID 1 before devtmpfs exists and an initramfs
//! never gets devtmpfs mounted for it. It is left uncompressed: unpacking costs less than
//! decompressing under TCG.
//!
//! Determinism: entries sorted by path, inode numbers 1.., zero mtimes, uid/gid 0. So the same
//! inputs give the same bytes, and [`Initrd::write_cached`] keys the file by the BLAKE3 of those
//! bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The newc format's size fields are 32 bits.
const MAX_FILE_BYTES: u64 = u32::MAX as u64;

/// Errors building or writing an initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// A path inside the archive is not absolute and normal (`/a/b`, no `.`/`..`, no NUL).
    #[error("initramfs path {path:?}: must be absolute, without '.', '..', '//' or NUL")]
    BadPath {
        /// The rejected path.
        path: String,
    },
    /// Something already sits at this path with another type (e.g. a file where a directory
    /// is needed).
    #[error("initramfs path {path:?}: already holds a different entry")]
    Conflict {
        /// The path.
        path: String,
    },
    /// A source file could not be read.
    #[error("reading {path}")]
    ReadSource {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is too large for the newc format.
    #[error("initramfs file {path:?}: {size} bytes is more than newc's 4 GiB")]
    TooLarge {
        /// The archive path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Writing the cached archive failed.
    #[error("writing the initramfs into {dir}")]
    Write {
        /// The cache directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// An initramfs being assembled. Parent directories are added implicitly (mode 0755).
#[derive(Debug, Clone, Default)]
pub struct Initrd {
    // Keyed by the path without its leading '/': that is how newc names entries, and the
    // sort order puts every directory before its contents.
    entries: BTreeMap<String, Entry>,
}

impl Initrd {
    /// An archive with only what any PID 1 needs: `/dev/console` and the usual mount points.
    pub fn base() -> Self {
        let mut initrd = Initrd::default();
        for dir in ["/dev", "/proc", "/sys", "/tmp"] {
            // Fixed, valid paths on an empty archive: cannot fail.
            let _ = initrd.add_dir(dir, 0o755);
        }
        let _ = initrd.add_char_dev("/dev/console", 0o600, 5, 1);
        // /tmp is world-writable and sticky, as everywhere.
        let _ = initrd.insert("/tmp", Entry::Dir { mode: 0o1777 }, true);
        initrd
    }

    /// The base archive plus `agent` as `/init` (mode 0755).
    pub fn with_agent(agent: &Path) -> Result<Self, InitrdError> {
        let mut initrd = Self::base();
        initrd.add_file_from("/init", agent, 0o755)?;
        Ok(initrd)
    }

    /// Adds a directory.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<&mut Self, InitrdError> {
        self.insert(
            path,
            Entry::Dir {
                mode: mode & 0o7777,
            },
            false,
        )?;
        Ok(self)
    }

    /// Adds a regular file with the given content, replacing an earlier file at `path`.
    pub fn add_bytes(
        &mut self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: u32,
    ) -> Result<&mut Self, InitrdError> {
        let data = data.into();
        let size = data.len() as u64;
        if size > MAX_FILE_BYTES {
            return Err(InitrdError::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        let entry = Entry::File {
            mode: mode & 0o7777,
            data,
        };
        self.insert(path, entry, true)?;
        Ok(self)
    }

    /// Adds a regular file with the content of the host file `source`.
    pub fn add_file_from(
        &mut self,
        path: &str,
        source: &Path,
        mode: u32,
    ) -> Result<&mut Self, InitrdError> {
        let data = std::fs::read(source).map_err(|e| InitrdError::ReadSource {
            path: source.to_owned(),
            source: e,
        })?;
        self.add_bytes(path, data, mode)
    }

    /// Adds a character device node.
    pub fn add_char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitrdError> {
        let entry = Entry::CharDev {
            mode: mode & 0o7777,
            major,
            minor,
        };
        self.insert(path, entry, true)?;
        Ok(self)
    }

    fn insert(&mut self, path: &str, entry: Entry, replace: bool) -> Result<(), InitrdError> {
        let key = normalize(path)?;
        // Parents first, so the kernel finds each directory before what it holds.
        let mut parent = String::new();
        let components: Vec<&str> = key.split('/').collect();
        for component in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries
                        .insert(parent.clone(), Entry::Dir { mode: 0o755 });
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => {
                    return Err(InitrdError::Conflict {
                        path: format!("/{parent}"),
                    })
                }
            }
        }
        match (self.entries.get(&key), &entry) {
            (None, _) => {}
            (Some(Entry::Dir { .. }), Entry::Dir { .. }) => {
                if !replace {
                    return Ok(());
                }
            }
            (Some(Entry::Dir { .. }), _) | (Some(_), Entry::Dir { .. }) => {
                return Err(InitrdError::Conflict {
                    path: path.to_owned(),
                })
            }
            (Some(_), _) => {}
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    /// Writes the archive.
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut ino = 0u32;
        for (name, entry) in &self.entries {
            ino += 1;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { mode } => (libc::S_IFDIR | mode, 2, &[], (0, 0)),
                Entry::File { mode, data } => (libc::S_IFREG | mode, 1, data, (0, 0)),
                Entry::CharDev { mode, major, minor } => {
                    (libc::S_IFCHR | mode, 1, &[], (*major, *minor))
                }
            };
            write_entry(out, name, ino, mode, nlink, rdev, data)?;
        }
        write_entry(out, "TRAILER!!!", 0, 0, 1, (0, 0), &[])
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }

    /// Writes the archive to `<cache_dir>/initrd/<blake3 of its bytes>.cpio` unless that file
    /// exists, and returns its path. The file appears complete or not at all (temporary file
    /// and rename), so concurrent callers are safe.
    pub fn write_cached(&self, cache_dir: &Path) -> Result<PathBuf, InitrdError> {
        let bytes = self.to_bytes();
        let dir = cache_dir.join("initrd");
        let path = dir.join(format!("{}.cpio", blake3::hash(&bytes).to_hex()));
        if path.is_file() {
            return Ok(path);
        }
        let write_err = |source| InitrdError::Write {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(write_err)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".initrd-")
            .tempfile_in(&dir)
            .map_err(write_err)?;
        tmp.write_all(&bytes).map_err(write_err)?;
        tmp.as_file().sync_all().map_err(write_err)?;
        tmp.persist(&path).map_err(|e| write_err(e.error))?;
        Ok(path)
    }
}

/// The initramfs for `agent`, cached under `cache_dir` (see [`Initrd::write_cached`]).
pub fn initrd_for(agent: &Path, cache_dir: &Path) -> Result<PathBuf, InitrdError> {
    Initrd::with_agent(agent)?.write_cached(cache_dir)
}

fn normalize(path: &str) -> Result<String, InitrdError> {
    let bad = || InitrdError::BadPath {
        path: path.to_owned(),
    };
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    if rest.is_empty()
        || rest.contains('\0')
        || rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(rest.to_owned())
}

fn write_entry(
    out: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    (rdev_major, rdev_minor): (u32, u32),
    data: &[u8],
) -> std::io::Result<()> {
    let namesize = name.len() + 1;
    // Sizes were bounded when the entry was added.
    let filesize = data.len() as u32;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{filesize:08x}\
         {devmajor:08x}{devminor:08x}{rdev_major:08x}{rdev_minor:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        devmajor = 0,
        devminor = 0,
        namesize = namesize as u32,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 3][..pad4(header.len() + namesize)])?;
    out.write_all(data)?;
    out.write_all(&[0; 3][..pad4(data.len())])
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Parsed {
        name: String,
        ino: u32,
        mode: u32,
        nlink: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// An independent newc reader, strict about magic, padding and the trailer.
    fn parse(mut bytes: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(offset % 4, 0);
            assert_eq!(&bytes[..6], b"070701", "magic at {offset}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (ino, mode, uid, gid, nlink, mtime, filesize) = (
                field(0),
                field(1),
                field(2),
                field(3),
                field(4),
                field(5),
                field(6),
            );
            let rdev = (field(9), field(10));
            let namesize = field(11) as usize;
            assert_eq!((uid, gid, field(7), field(8), field(12)), (0, 0, 0, 0, 0));
            let name_end = 110 + namesize;
            assert_eq!(bytes[name_end - 1], 0, "NUL-terminated name");
            let name = std::str::from_utf8(&bytes[110..name_end - 1]).expect("utf8");
            let data_start = name_end + pad4(name_end);
            let data_end = data_start + filesize as usize;
            let data = bytes[data_start..data_end].to_vec();
            let next = data_end + pad4(data_end);
            if name == "TRAILER!!!" {
                assert_eq!(next, bytes.len(), "nothing after the trailer");
                return out;
            }
            out.push(Parsed {
                name: name.to_owned(),
                ino,
                mode,
                nlink,
                mtime,
                rdev,
                data,
            });
            bytes = &bytes[next..];
            offset += next;
        }
    }

    #[test]
    fn agent_archive_has_init_console_and_mount_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"\x7fELF pretend").expect("write");
        let entries = parse(&Initrd::with_agent(&agent).expect("build").to_bytes());
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "proc", "sys", "tmp"]);
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).expect(n);
        let init = by_name("init");
        assert_eq!(init.mode, libc::S_IFREG | 0o755);
        assert_eq!(init.data, b"\x7fELF pretend");
        let console = by_name("dev/console");
        assert_eq!(console.mode, libc::S_IFCHR | 0o600);
        assert_eq!(console.rdev, (5, 1));
        assert_eq!(by_name("tmp").mode, libc::S_IFDIR | 0o1777);
        assert_eq!(by_name("dev").mode, libc::S_IFDIR | 0o755);
        assert_eq!(by_name("dev").nlink, 2);
        let inos: Vec<_> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos, [1, 2, 3, 4, 5, 6]);
        assert!(entries.iter().all(|e| e.mtime == 0));
    }

    #[test]
    fn extra_files_get_their_parents_first() {
        let mut initrd = Initrd::base();
        initrd
            .add_bytes("/bin/busybox", b"bb".to_vec(), 0o755)
            .expect("add")
            .add_bytes("/bin-x", b"odd".to_vec(), 0o644)
            .expect("add")
            .add_bytes("/etc/deep/er/file", b"1".to_vec(), 0o600)
            .expect("add");
        let entries = parse(&initrd.to_bytes());
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        for (i, name) in names.iter().enumerate() {
            if let Some((parent, _)) = name.rsplit_once('/') {
                let at = names.iter().position(|n| *n == parent).expect(parent);
                assert!(at < i, "{parent} before {name}");
            }
        }
        assert!(names.contains(&"etc/deep/er"));
    }

    #[test]
    fn same_input_same_bytes_and_same_cache_file() {
        let build = || {
            let mut initrd = Initrd::base();
            initrd
                .add_bytes("/init", b"#!/bin/sh\n".to_vec(), 0o755)
                .expect("add");
            initrd
        };
        assert_eq!(build().to_bytes(), build().to_bytes());
        let cache = tempfile::tempdir().expect("tempdir");
        let first = build().write_cached(cache.path()).expect("write");
        let second = build().write_cached(cache.path()).expect("write");
        assert_eq!(first, second);
        assert_eq!(std::fs::read(&first).expect("read"), build().to_bytes());
        let mut other = build();
        other
            .add_bytes("/init", b"#!/bin/sh -e\n".to_vec(), 0o755)
            .expect("add");
        assert_ne!(other.write_cached(cache.path()).expect("write"), first);
        // Nothing but the two archives: no temporary files left behind.
        assert_eq!(
            std::fs::read_dir(cache.path().join("initrd"))
                .expect("ls")
                .count(),
            2
        );
    }

    #[test]
    fn bad_paths_and_conflicts_are_refused() {
        let mut initrd = Initrd::base();
        for bad in ["init", "/", "/a//b", "/a/./b", "/../etc", "/a\0b", "/a/"] {
            assert!(
                matches!(
                    initrd.add_bytes(bad, b"x".to_vec(), 0o644),
                    Err(InitrdError::BadPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            initrd.add_bytes("/dev", b"x".to_vec(), 0o644),
            Err(InitrdError::Conflict { .. })
        ));
        assert!(matches!(
            initrd.add_bytes("/dev/console/x", b"x".to_vec(), 0o644),
            Err(InitrdError::Conflict { .. })
        ));
    }

    #[test]
    fn missing_agent_names_the_path() {
        let err = Initrd::with_agent(Path::new("/nonexistent/agent")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/agent"), "{err}");
    }
}
