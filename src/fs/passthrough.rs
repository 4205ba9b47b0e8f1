//! Sharing one host directory read-only (an operator's `--allow-ro-path`): virtiofsd's
//! passthrough filesystem behind its read-only wrapper.
//!
//! What keeps a hostile guest inside the directory and away from writes:
//! - the read-only wrapper answers every modifying request (write, create, mkdir, mknod,
//!   symlink, link, unlink, rename, setattr, setxattr, removexattr, fallocate,
//!   copy_file_range) with `EROFS`, and opens only `O_RDONLY` (no `O_TRUNC`, no `O_CREAT`);
//! - every lookup is `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS, O_NOFOLLOW)` relative
//!   to its parent, so neither `..` nor a symlink leaves the directory; the guest only ever
//!   reads a symlink's target text (its own kernel then resolves it inside the guest). The
//!   daemon refuses to start where the kernel lacks `openat2` rather than fall back to plain
//!   `openat`;
//! - no xattrs, no file handles (`open_by_handle_at`), no writeback cache, no direct I/O,
//!   no shared mmap;
//! - as root, the daemon also chroots into the directory (virtiofsd's chroot sandbox) and
//!   drops its supplementary groups, before [`super::sandbox::restrict`] drops every
//!   capability (so the chroot cannot be left); otherwise it relies on the lookups above.
//!
//! The guest reads what the daemon's user may read below the directory, nothing else.
//! Only directories are shared: the guest mounts a share on a directory, so a file or
//! device path is refused (the operator gets that at start-up, see
//! [`check_shareable`]).

use super::sandbox::{self, SandboxError};
use nix::sys::resource::{getrlimit, Resource};
use std::path::{Path, PathBuf};
use virtiofsd::passthrough::read_only::PassthroughFsRo;
use virtiofsd::passthrough::{self as pt, CachePolicy, InodeFileHandlesMode, NegotiationMode};
use virtiofsd::sandbox::{Sandbox, SandboxMode};

/// File descriptors kept for the daemon itself (stdio, socket, epoll, eventfds, the proc
/// descriptors, threads' own).
const FD_RESERVE: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("{path:?} is not a clean absolute UTF-8 path below /")]
    NotAbsolute { path: PathBuf },
    #[error("cannot inspect {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {what}, not a directory; only directories can be shared (allow the directory that holds it, or a directory of its own)")]
    NotADirectory { path: PathBuf, what: &'static str },
    #[error(
        "{path} is below {under}, where the guest's own filesystems would hide or clash with it"
    )]
    Reserved { path: PathBuf, under: &'static str },
    #[error(
        "this kernel has no openat2(2), which confines the guest's lookups to the shared directory"
    )]
    NoOpenat2,
    #[error("cannot read the file descriptor limit")]
    Rlimit(#[source] nix::Error),
    #[error("cannot drop the supplementary groups")]
    Groups(#[source] nix::Error),
    #[error("cannot chroot into {path}")]
    Chroot {
        path: PathBuf,
        #[source]
        source: virtiofsd::sandbox::Error,
    },
    #[error("restricting the daemon's privileges failed")]
    Restrict(#[source] SandboxError),
    #[error("cannot set up the passthrough filesystem for {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Guest paths the agent mounts its own filesystems on: a share there would be hidden.
const RESERVED: [&str; 2] = ["/dev", "/proc"];

/// Whether `path` can be shared read-only at the same path in the guest: a clean absolute
/// path, not `/`, not below the guest's `/dev` or `/proc`, and a directory (not a symlink
/// to one: the guest sees the share at exactly this path, and the daemon opens it without
/// following a last symlink).
pub fn check_shareable(path: &Path) -> Result<(), PassthroughError> {
    // The same rules as the agent's for a guest path.
    let clean = path.to_str().is_some_and(|p| {
        p.len() > 1
            && p.starts_with('/')
            && p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    });
    if !clean {
        return Err(PassthroughError::NotAbsolute {
            path: path.to_owned(),
        });
    }
    if let Some(under) = RESERVED.into_iter().find(|r| path.starts_with(r)) {
        return Err(PassthroughError::Reserved {
            path: path.to_owned(),
            under,
        });
    }
    let meta = std::fs::symlink_metadata(path).map_err(|source| PassthroughError::Stat {
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Ok(());
    }
    let what = if ft.is_symlink() {
        "a symlink"
    } else if ft.is_file() {
        "a file"
    } else {
        "a device, socket or fifo"
    };
    Err(PassthroughError::NotADirectory {
        path: path.to_owned(),
        what,
    })
}

/// Confines this process (see the module doc) and opens `dir` for serving read-only, with
/// at most `max_fds` host descriptors held for the guest (lookups and open files together;
/// beyond, requests fail with `EMFILE`), fewer if the process's hard limit is lower.
/// Must run while the process is single-threaded.
pub fn confine_and_open(dir: &Path, max_fds: u64) -> Result<PassthroughFsRo, PassthroughError> {
    check_shareable(dir)?;
    if !virtiofsd::oslib::OsFacts::new().has_openat2 {
        return Err(PassthroughError::NoOpenat2);
    }
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(PassthroughError::Rlimit)?;
    let fds = (max_fds + FD_RESERVE).min(hard);
    let guest_fds = fds.saturating_sub(FD_RESERVE).max(1);
    if guest_fds < max_fds {
        tracing::warn!(
            wanted = max_fds,
            allowed = guest_fds,
            "the file descriptor hard limit leaves the guest fewer descriptors"
        );
    }
    let display = dir.display().to_string();
    let (root_dir, proc_self_fd) = if nix::unistd::geteuid().is_root() {
        // A root daemon could otherwise switch to groups it belongs to.
        nix::unistd::setgroups(&[]).map_err(PassthroughError::Groups)?;
        let mut chroot = Sandbox::new(display, SandboxMode::Chroot, Vec::new(), Vec::new());
        chroot
            .enter_chroot()
            .map_err(|source| PassthroughError::Chroot {
                path: dir.to_owned(),
                source,
            })?;
        ("/".to_owned(), chroot.get_proc_self_fd())
    } else {
        (display, None)
    };
    sandbox::restrict(fds).map_err(PassthroughError::Restrict)?;

    PassthroughFsRo::new(config(root_dir, proc_self_fd, guest_fds)).map_err(|source| {
        PassthroughError::Create {
            path: dir.to_owned(),
            source,
        }
    })
}

/// The passthrough configuration: everything a guest could use beyond reading plain files
/// and directories is off.
fn config(root_dir: String, proc_self_fd: Option<std::fs::File>, guest_fds: u64) -> pt::Config {
    pt::Config {
        root_dir,
        proc_sfd_rawfd: proc_self_fd,
        cache_policy: CachePolicy::Auto,
        writeback: false,
        xattr: false,
        xattrmap: None,
        announce_submounts: false,
        inode_file_handles: InodeFileHandlesMode::Never,
        readdirplus: true,
        allow_direct_io: false,
        killpriv_v2: false,
        posix_acl: NegotiationMode::Never,
        security_label: NegotiationMode::Never,
        allow_mmap: false,
        guest_fd_limit: guest_fds,
        ..pt::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use virtiofsd::filesystem::{
        Context, Extensions, FileSystem, FsOptions, SetattrValid, SetxattrFlags,
    };
    use virtiofsd::fuse;
    use virtiofsd::soft_idmap::{GuestGid, GuestUid};

    #[test]
    fn only_clean_directories_outside_dev_and_proc_are_shareable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        check_shareable(&dir).unwrap();

        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = check_shareable(&file).unwrap_err();
        assert!(matches!(
            e,
            PassthroughError::NotADirectory { what: "a file", .. }
        ));
        assert!(e.to_string().contains(&file.display().to_string()));

        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(matches!(
            check_shareable(&link),
            Err(PassthroughError::NotADirectory {
                what: "a symlink",
                ..
            })
        ));
        assert!(matches!(
            check_shareable(Path::new("/dev/null")),
            Err(PassthroughError::Reserved { under: "/dev", .. })
        ));
        assert!(matches!(
            check_shareable(Path::new("/proc/self")),
            Err(PassthroughError::Reserved { under: "/proc", .. })
        ));
        for bad in ["/", "relative", "/a/../b", "/a/./b", "/a//b", "/a/", ""] {
            assert!(
                matches!(
                    check_shareable(Path::new(bad)),
                    Err(PassthroughError::NotAbsolute { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check_shareable(&tmp.path().join("missing")),
            Err(PassthroughError::Stat { .. })
        ));
    }

    fn ctx() -> Context {
        Context {
            uid: GuestUid::from(0),
            gid: GuestGid::from(0),
            pid: 1,
        }
    }

    fn erofs(r: std::io::Result<impl Sized>) -> bool {
        matches!(r, Err(e) if e.raw_os_error() == Some(libc::EROFS))
    }

    /// What a hostile guest kernel could send (no VM: the FUSE requests go straight to the
    /// filesystem, as root in the guest's eyes): nothing is written, nothing outside the
    /// directory is found.
    #[test]
    fn a_hostile_client_can_neither_write_nor_leave_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("file"), b"host").unwrap();
        std::fs::write(tmp.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), shared.join("abs")).unwrap();
        std::os::unix::fs::symlink("../outside", shared.join("rel")).unwrap();
        let fs = PassthroughFsRo::new(config(shared.display().to_string(), None, 64)).unwrap();
        fs.init(FsOptions::empty()).unwrap();
        let root = fuse::ROOT_ID;
        let name = |s: &str| CString::new(s).unwrap();

        let file = fs.lookup(ctx(), root, &name("file")).unwrap();
        assert!(erofs(fs.open(
            ctx(),
            file.inode,
            false,
            libc::O_WRONLY as u32
        )));
        assert!(erofs(fs.open(
            ctx(),
            file.inode,
            false,
            libc::O_RDWR as u32
        )));
        assert!(fs
            .open(
                ctx(),
                file.inode,
                false,
                (libc::O_RDONLY | libc::O_TRUNC) as u32
            )
            .is_err());
        let ext = || Extensions::default();
        assert!(erofs(fs.create(
            ctx(),
            root,
            &name("new"),
            0o644,
            false,
            (libc::O_CREAT | libc::O_WRONLY) as u32,
            0,
            ext()
        )));
        assert!(erofs(fs.mkdir(ctx(), root, &name("d"), 0o755, 0, ext())));
        assert!(erofs(fs.mknod(
            ctx(),
            root,
            &name("n"),
            libc::S_IFIFO | 0o644,
            0,
            0,
            ext()
        )));
        assert!(erofs(fs.symlink(
            ctx(),
            &name("/"),
            root,
            &name("l"),
            ext()
        )));
        assert!(erofs(fs.link(ctx(), file.inode, root, &name("h"))));
        assert!(erofs(fs.unlink(ctx(), root, &name("file"))));
        assert!(erofs(fs.rename(
            ctx(),
            root,
            &name("file"),
            root,
            &name("f2"),
            0
        )));
        let attr = fuse::SetattrIn {
            mode: 0o777,
            ..Default::default()
        };
        assert!(erofs(fs.setattr(
            ctx(),
            file.inode,
            attr,
            None,
            SetattrValid::MODE
        )));
        assert!(fs
            .setxattr(
                ctx(),
                file.inode,
                &name("user.x"),
                b"1",
                0,
                SetxattrFlags::empty()
            )
            .is_err());

        // Escapes: `..` and names with slashes stay at the root; symlinks are not followed.
        for escape in ["..", "../outside", "rel/", "abs/", "../../../../etc/passwd"] {
            if let Ok(e) = fs.lookup(ctx(), root, &name(escape)) {
                assert_ne!(
                    e.attr.size, 6,
                    "{escape:?} found the file outside the directory"
                );
            }
        }
        let abs = fs.lookup(ctx(), root, &name("abs")).unwrap();
        assert_eq!(abs.attr.mode & libc::S_IFMT, libc::S_IFLNK);
        assert!(fs
            .open(ctx(), abs.inode, false, libc::O_RDONLY as u32)
            .is_err());
        assert_eq!(
            fs.readlink(ctx(), abs.inode).unwrap(),
            tmp.path().join("outside").as_os_str().as_encoded_bytes()
        );

        assert_eq!(std::fs::read(shared.join("file")).unwrap(), b"host");
        let mut names: Vec<_> = std::fs::read_dir(&shared)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["abs", "file", "rel"]);
    }
}
