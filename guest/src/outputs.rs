//! Sending the outputs to the host after the command has exited (see the conversation in
//! agent.proto): for each output, OutputStart, then unless missing a pre-order tree whose
//! directory children come sorted by name bytes.
//!
//! Paths are resolved inside the sandbox root (RESOLVE_IN_ROOT), and below an output root
//! nothing is followed: the build may have left symlinks anywhere, pointing anywhere.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use tvix_build_vm_agent::frame::FILE_CHUNK_BYTES;
use tvix_build_vm_agent::proto::{guest_message::Msg, DirectoryEnd, Entry, EntryKind, OutputStart};

use crate::conn::{ConnError, Sink};
use crate::job::GuestPath;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path} is a {kind}, which an output cannot contain")]
    Special { path: String, kind: &'static str },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: Errno,
    },
    #[error("{path} changed size while being read ({size} bytes expected, {got} read)")]
    Changed { path: String, size: u64, got: u64 },
    #[error("send")]
    Send(#[from] ConnError),
}

fn io(what: &'static str, path: &str) -> impl FnOnce(Errno) -> OutputError {
    let path = path.to_owned();
    move |source| OutputError::Io { what, path, source }
}

/// Sends output `index` found at `path` below `root`.
pub fn send_output(
    root: BorrowedFd,
    index: u32,
    path: &GuestPath,
    sink: &mut impl Sink,
) -> Result<(), OutputError> {
    let (parent, name) = match path.rel().rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => (".", path.rel()),
    };
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let parent_fd = match openat2(root, parent, how) {
        Ok(fd) => Some(fd),
        Err(Errno::ENOENT | Errno::ENOTDIR) => None,
        Err(e) => return Err(io("open", path.as_str())(e)),
    };
    let st = match &parent_fd {
        None => None,
        Some(fd) => match fstatat(fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Some(st),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(io("stat", path.as_str())(e)),
        },
    };
    let present = matches!(
        st.map(kind),
        Some(SFlag::S_IFREG | SFlag::S_IFDIR | SFlag::S_IFLNK)
    );
    sink.send(Msg::OutputStart(OutputStart {
        index,
        missing: !present,
    }))?;
    match (parent_fd, st) {
        (Some(parent_fd), Some(st)) if present => {
            send_tree(parent_fd.as_fd(), name, st, path.as_str(), sink)
        }
        _ => Ok(()),
    }
}

fn kind(st: FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// A directory being sent: its handle, its path (for errors) and the children still to go.
struct Frame {
    fd: OwnedFd,
    path: String,
    children: std::vec::IntoIter<Vec<u8>>,
}

/// Sends the tree rooted at `name` in `parent` (stat'ed as `st`), with an empty root name.
fn send_tree(
    parent: BorrowedFd,
    name: &str,
    st: FileStat,
    path: &str,
    sink: &mut impl Sink,
) -> Result<(), OutputError> {
    let mut stack = Vec::new();
    if let Some(frame) = send_node(
        parent,
        name.as_bytes(),
        Vec::new(),
        st,
        path.to_owned(),
        sink,
    )? {
        stack.push(frame);
    }
    while let Some(top) = stack.last_mut() {
        let Some(child) = top.children.next() else {
            stack.pop();
            sink.send(Msg::DirectoryEnd(DirectoryEnd {}))?;
            continue;
        };
        let child_path = format!("{}/{}", top.path, String::from_utf8_lossy(&child));
        let name = std::ffi::OsStr::from_bytes(&child);
        let st = fstatat(&top.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io("stat", &child_path))?;
        let frame = send_node(top.fd.as_fd(), &child, child.clone(), st, child_path, sink)?;
        if let Some(frame) = frame {
            stack.push(frame);
        }
    }
    Ok(())
}

/// Sends one node; for a directory, returns the frame of its children.
fn send_node(
    parent: BorrowedFd,
    on_disk: &[u8],
    entry_name: Vec<u8>,
    st: FileStat,
    path: String,
    sink: &mut impl Sink,
) -> Result<Option<Frame>, OutputError> {
    let name = std::ffi::OsStr::from_bytes(on_disk);
    match kind(st) {
        SFlag::S_IFREG => {
            let fd = openat(
                parent,
                name,
                OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC
                    | OFlag::O_NOCTTY
                    | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
            .map_err(io("open", &path))?;
            let st = fstat(&fd).map_err(io("stat", &path))?;
            if kind(st) != SFlag::S_IFREG {
                return Err(OutputError::Changed {
                    path,
                    size: 0,
                    got: 0,
                });
            }
            let size = st.st_size as u64;
            sink.send(Msg::Entry(Entry {
                name: entry_name,
                kind: EntryKind::File as i32,
                executable: st.st_mode & libc::S_IXUSR != 0,
                size,
                target: Vec::new(),
            }))?;
            send_contents(std::fs::File::from(fd), size, &path, sink)?;
            Ok(None)
        }
        SFlag::S_IFLNK => {
            let target = nix::fcntl::readlinkat(parent, name).map_err(io("readlink", &path))?;
            sink.send(Msg::Entry(Entry {
                name: entry_name,
                kind: EntryKind::Symlink as i32,
                executable: false,
                size: 0,
                target: target.as_bytes().to_vec(),
            }))?;
            Ok(None)
        }
        SFlag::S_IFDIR => {
            let fd = openat(
                parent,
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(io("open", &path))?;
            let children = list(&fd, &path)?;
            sink.send(Msg::Entry(Entry {
                name: entry_name,
                kind: EntryKind::Directory as i32,
                executable: false,
                size: 0,
                target: Vec::new(),
            }))?;
            Ok(Some(Frame {
                fd,
                path,
                children: children.into_iter(),
            }))
        }
        other => Err(OutputError::Special {
            path,
            kind: match other {
                SFlag::S_IFSOCK => "socket",
                SFlag::S_IFIFO => "FIFO",
                SFlag::S_IFCHR => "character device",
                SFlag::S_IFBLK => "block device",
                _ => "file of unknown type",
            },
        }),
    }
}

/// The names in a directory, sorted by bytes.
fn list(fd: &OwnedFd, path: &str) -> Result<Vec<Vec<u8>>, OutputError> {
    let dup = fd.try_clone().map_err(|e| OutputError::Io {
        what: "dup",
        path: path.to_owned(),
        source: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
    })?;
    let mut dir = nix::dir::Dir::from_fd(dup).map_err(io("open directory", path))?;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry.map_err(io("read directory", path))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Sends exactly `size` bytes of `file` in chunks; a file that ends early is an error, bytes
/// beyond `size` are not sent.
fn send_contents(
    mut file: std::fs::File,
    size: u64,
    path: &str,
    sink: &mut impl Sink,
) -> Result<(), OutputError> {
    let mut buf = vec![0u8; FILE_CHUNK_BYTES.min(size as usize)];
    let mut sent = 0u64;
    while sent < size {
        let want = (size - sent).min(buf.len() as u64) as usize;
        let mut filled = 0;
        while filled < want {
            match file.read(&mut buf[filled..want]) {
                Ok(0) => {
                    return Err(OutputError::Changed {
                        path: path.to_owned(),
                        size,
                        got: sent + filled as u64,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(OutputError::Io {
                        what: "read",
                        path: path.to_owned(),
                        source: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
                    })
                }
            }
        }
        sink.send_chunk(&buf[..want])?;
        sent += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
