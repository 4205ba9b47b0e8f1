//! The build's filesystem: a fresh root on the scratch filesystem that the build is chrooted
//! into, so it never sees the agent's initramfs.
//!
//! ```text
//! /scratch                 tmpfs (limits.tmpfs_bytes, else half of RAM) or the ext4 scratch disk
//! /scratch/overlay/{upper,work}   writable layer of inputs_dir
//! /scratch/root            the build's /
//!   <inputs_dir>           overlay(lower = virtio-fs inputs, upper) if inputs_dir is a scratch
//!                          path, else the virtio-fs share itself, read-only
//!   <scratch paths>        empty directories owned by uid:gid
//!   <extra mounts>         read-only virtio-fs shares
//!   /dev                   tmpfs: null zero full random urandom tty [kvm], pts (own devpts
//!                          instance), ptmx -> pts/ptmx, shm (tmpfs 1777), fd, stdin/out/err
//!   /proc                  procfs, hidepid=2 (the build sees only its own processes)
//!   /etc                   passwd, group, hosts [, resolv.conf with network]
//!   /bin/sh                if bin_sh is set
//! ```
//!
//! Everything is built before the command starts, so the only symlinks that could mislead the
//! path walks here come from the inputs; those walks refuse symlinks altogether.
//!
//! The parts that do not depend on the Job (the scratch tmpfs, the inputs share and its
//! overlay, /dev, /proc) are made before the Hello at staging places by [`crate::stage`] and
//! moved into place here, at the moment this module would otherwise have mounted them, so the
//! result is the same as building everything after the Job.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::MsFlags;
use nix::sys::stat::{fchmodat, mkdirat, mknodat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Uid};

use crate::job::{GuestPath, JobSpec};
use crate::paths::{
    INPUTS_LOWER, OVERLAY_UPPER, OVERLAY_WORK, ROOT, SCRATCH, STAGE_DEV, STAGE_OVERLAY, STAGE_PROC,
};
use crate::staged::Staged;
use crate::sys::{self, SysError};
use crate::{trace, users};

/// The scratch filesystem's flags; a tmpfs also gets `mode=0755` and the Job's size.
const SCRATCH_FLAGS: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
/// The flags of a read-only virtio-fs share.
pub const SHARE_FLAGS: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV);

/// Character devices of the sandbox's /dev: name, major, minor.
const DEVICES: [(&str, u64, u64); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("{what} {path}")]
    At {
        what: &'static str,
        path: String,
        #[source]
        source: Errno,
    },
    #[error("write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bin_sh {0} exists neither in the sandbox nor in the agent's root")]
    NoBinSh(String),
}

fn at(what: &'static str, path: impl Into<String>) -> impl FnOnce(Errno) -> SandboxError {
    let path = path.into();
    move |source| SandboxError::At { what, path, source }
}

/// The prepared root of the build.
pub struct Sandbox {
    /// The root as a path in the agent's view, for chroot.
    pub root: PathBuf,
    /// The root, opened for resolving paths inside it.
    pub root_fd: OwnedFd,
}

/// Mode, owner and group of directories this module creates.
#[derive(Debug, Clone, Copy)]
struct DirAttrs {
    mode: u32,
    uid: u32,
    gid: u32,
}

const ROOT_DIR: DirAttrs = DirAttrs {
    mode: 0o755,
    uid: 0,
    gid: 0,
};

/// Builds the whole sandbox for `job`, moving into place what `staged` prepared before the
/// Job where it is what the Job asks for.
pub fn build(job: &JobSpec, staged: &mut Staged) -> Result<Sandbox, SandboxError> {
    mount_scratch(job, staged)?;
    trace::mark("scratch mounted");
    sys::mkdir_all(Path::new(ROOT), 0o755)?;
    let root_fd = open_dir(Path::new(ROOT))?;
    let root = root_fd.as_fd();
    let user = DirAttrs {
        mode: 0o755,
        uid: job.uid,
        gid: job.gid,
    };

    mount_inputs(root, job, staged)?;
    trace::mark("inputs mounted");
    for dir in &job.scratch_dirs {
        ensure_dir(root, dir.rel(), ROOT_DIR)?;
        set_attrs(root, dir.rel(), user)?;
    }
    for (tag, path) in &job.extra_mounts {
        ensure_dir(root, path.rel(), ROOT_DIR)?;
        sys::mount(Some(tag), &in_root(path), "virtiofs", SHARE_FLAGS, None)?;
    }
    ensure_dir(root, "dev", ROOT_DIR)?;
    let dev = PathBuf::from(format!("{ROOT}/dev"));
    if std::mem::take(&mut staged.dev) {
        sys::move_mount(Path::new(STAGE_DEV), &dev)?;
    } else {
        make_dev(&dev)?;
    }
    trace::mark("dev");
    ensure_dir(root, "proc", ROOT_DIR)?;
    let proc = PathBuf::from(format!("{ROOT}/proc"));
    if std::mem::take(&mut staged.proc) {
        sys::move_mount(Path::new(STAGE_PROC), &proc)?;
    } else {
        mount_proc(&proc)?;
    }
    trace::mark("proc");
    write_etc(root, job)?;
    if let Some(sh) = &job.bin_sh {
        provide_bin_sh(root, sh)?;
    }
    for (path, contents) in &job.additional_files {
        write_file(root, path, contents, user)?;
    }
    ensure_dir(root, job.working_dir.rel(), user)?;
    trace::mark("etc, files, working dir");
    Ok(Sandbox {
        root: PathBuf::from(ROOT),
        root_fd,
    })
}

/// The build's /proc: its own instance, showing only the build's processes.
pub fn mount_proc(target: &Path) -> Result<(), SysError> {
    sys::mount(
        None,
        target,
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=2"),
    )
}

/// The agent's view of a guest path inside the sandbox.
fn in_root(path: &GuestPath) -> PathBuf {
    PathBuf::from(format!("{ROOT}/{}", path.rel()))
}

fn mount_scratch(job: &JobSpec, staged: &mut Staged) -> Result<(), SandboxError> {
    let target = Path::new(SCRATCH);
    if staged.scratch && job.scratch_device.is_none() {
        staged.scratch = false;
        if job.tmpfs_bytes > 0 {
            // The staged tmpfs is nearly empty, so any size the Job asks for fits.
            resize_scratch_tmpfs(target, job.tmpfs_bytes)?;
        }
        return Ok(());
    }
    staged.discard_scratch()?;
    sys::mkdir_all(target, 0o755)?;
    match &job.scratch_device {
        Some(dev) => sys::mount(Some(dev.as_str()), target, "ext4", SCRATCH_FLAGS, None)?,
        None => sys::mount(
            None,
            target,
            "tmpfs",
            SCRATCH_FLAGS,
            Some(&scratch_tmpfs_options(job.tmpfs_bytes)),
        )?,
    }
    Ok(())
}

/// The scratch tmpfs's options: `size` only when the Job sets one (else half of RAM).
fn scratch_tmpfs_options(size: u64) -> String {
    let mut opts = String::from("mode=0755");
    if size > 0 {
        opts.push_str(&format!(",size={size}"));
    }
    opts
}

/// Sets the size of the scratch tmpfs at `target`, keeping its flags and mode.
fn resize_scratch_tmpfs(target: &Path, bytes: u64) -> Result<(), SysError> {
    sys::mount(
        None,
        target,
        "tmpfs",
        SCRATCH_FLAGS | MsFlags::MS_REMOUNT,
        Some(&format!("size={bytes}")),
    )
}

/// The scratch tmpfs as the stage mounts it, before the Job's size is known.
pub fn mount_scratch_tmpfs() -> Result<(), SysError> {
    let target = Path::new(SCRATCH);
    sys::mkdir_all(target, 0o755)?;
    sys::mount(
        None,
        target,
        "tmpfs",
        SCRATCH_FLAGS,
        Some(&scratch_tmpfs_options(0)),
    )
}

/// The overlay of `inputs_dir` at `target`: the inputs share below, the upper layer and work
/// directory on the scratch filesystem.
pub fn mount_overlay(target: &Path) -> Result<(), SysError> {
    let opts = format!("lowerdir={INPUTS_LOWER},upperdir={OVERLAY_UPPER},workdir={OVERLAY_WORK}");
    sys::mount(None, target, "overlay", SCRATCH_FLAGS, Some(&opts))
}

/// inputs_dir: an overlay when writable (Nix's store is 1775 root:nixbld there), else the
/// share itself, read-only. Without a share there is nothing below, so no overlay is needed.
fn mount_inputs(root: BorrowedFd, job: &JobSpec, staged: &mut Staged) -> Result<(), SandboxError> {
    let dir = &job.inputs_dir;
    let target = in_root(dir);
    let store = DirAttrs {
        mode: 0o1775,
        uid: 0,
        gid: job.gid,
    };
    // What the stage mounted and this Job does not use goes first, before anything else is
    // mounted where it was.
    if job.inputs_tag.as_deref() != Some(tvix_build_vm_agent::INPUTS_TAG) {
        staged.discard_inputs()?;
    } else if !job.inputs_writable {
        staged.discard_overlay()?;
    }
    ensure_dir(root, dir.rel(), ROOT_DIR)?;
    match (&job.inputs_tag, job.inputs_writable) {
        (None, false) => {}
        (None, true) => set_attrs(root, dir.rel(), store)?,
        (Some(tag), false) => {
            if std::mem::take(&mut staged.inputs) {
                sys::move_mount(Path::new(INPUTS_LOWER), &target)?;
            } else {
                sys::mount(Some(tag), &target, "virtiofs", SHARE_FLAGS, None)?;
            }
        }
        (Some(_), true) if staged.overlay => {
            staged.overlay = false;
            staged.inputs = false;
            // Through the overlay, so that its root inode takes the new owner and mode too.
            let overlay = open_dir(Path::new(STAGE_OVERLAY))?;
            set_attrs(overlay.as_fd(), ".", store)?;
            drop(overlay);
            sys::move_mount(Path::new(STAGE_OVERLAY), &target)?;
        }
        (Some(tag), true) => {
            let lower = Path::new(INPUTS_LOWER);
            // A staged share stays where it is, as the lower layer.
            if !std::mem::take(&mut staged.inputs) {
                sys::mkdir_all(lower, 0o755)?;
                sys::mount(Some(tag), lower, "virtiofs", SHARE_FLAGS, None)?;
            }
            sys::mkdir_all(Path::new(OVERLAY_UPPER), 0o755)?;
            sys::mkdir_all(Path::new(OVERLAY_WORK), 0o755)?;
            let upper = open_dir(Path::new(OVERLAY_UPPER))?;
            set_attrs(upper.as_fd(), ".", store)?;
            mount_overlay(&target)?;
        }
    }
    Ok(())
}

/// The build's /dev at `dev_path`: its own small tmpfs (so device nodes work while the
/// scratch filesystem stays nodev) with the nodes, links, a devpts instance and shm.
pub fn make_dev(dev_path: &Path) -> Result<(), SandboxError> {
    sys::mount(
        None,
        dev_path,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    let dev = open_dir(dev_path)?;
    let mut devices: Vec<(&str, u64, u64)> = DEVICES.to_vec();
    // The guest has /dev/kvm only when the host gave it a CPU with virtualization, which it
    // does only for requests that asked for /dev/kvm.
    if let Ok(st) = nix::sys::stat::stat("/dev/kvm") {
        let rdev = st.st_rdev;
        devices.push((
            "kvm",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev),
        ));
    }
    for (name, major, minor) in devices {
        mknodat(
            dev.as_fd(),
            name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        )
        .map_err(at("mknod", format!("/dev/{name}")))?;
    }
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        nix::unistd::symlinkat(target, dev.as_fd(), name)
            .map_err(at("symlink", format!("/dev/{name}")))?;
    }
    ensure_dir(dev.as_fd(), "pts", ROOT_DIR)?;
    sys::mount(
        None,
        &dev_path.join("pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    ensure_dir(dev.as_fd(), "shm", ROOT_DIR)?;
    sys::mount(
        None,
        &dev_path.join("shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    Ok(())
}

fn write_etc(root: BorrowedFd, job: &JobSpec) -> Result<(), SandboxError> {
    let root_file = DirAttrs {
        mode: 0o644,
        uid: 0,
        gid: 0,
    };
    let mut files = vec![
        (
            "/etc/passwd",
            users::passwd(job.uid, job.gid, job.working_dir.as_str()),
        ),
        ("/etc/group", users::group(job.gid)),
        ("/etc/hosts", users::HOSTS.to_owned()),
    ];
    if job.network {
        files.push(("/etc/resolv.conf", crate::net::RESOLV_CONF.to_owned()));
    }
    for (path, text) in files {
        let path = GuestPath::parse("etc", path).map_err(|_| SandboxError::At {
            what: "path",
            path: path.to_owned(),
            source: Errno::EINVAL,
        })?;
        write_file(root, &path, text.as_bytes(), root_file)?;
    }
    Ok(())
}

/// `/bin/sh`: a symlink to `sh` if the build can see it (e.g. an input), else a read-only
/// bind mount of that path from the agent's own root (e.g. a shell in the initramfs).
fn provide_bin_sh(root: BorrowedFd, sh: &GuestPath) -> Result<(), SandboxError> {
    ensure_dir(root, "bin", ROOT_DIR)?;
    let bin = open_beneath(root, "bin")?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    if openat2(root, sh.rel(), how).is_ok() {
        return nix::unistd::symlinkat(sh.as_str(), bin.as_fd(), "sh")
            .map_err(at("symlink", "/bin/sh"));
    }
    let source = Path::new(sh.as_str());
    if !source.exists() {
        return Err(SandboxError::NoBinSh(sh.as_str().to_owned()));
    }
    drop(
        openat(
            bin.as_fd(),
            "sh",
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o755),
        )
        .map_err(at("create", "/bin/sh"))?,
    );
    sys::bind_ro(source, Path::new(&format!("{ROOT}/bin/sh")))?;
    Ok(())
}

/// Writes `contents` to `path` in the sandbox, creating missing parents; the file and the
/// parents it creates belong to `attrs`' owner, the file gets mode 0644.
fn write_file(
    root: BorrowedFd,
    path: &GuestPath,
    contents: &[u8],
    attrs: DirAttrs,
) -> Result<(), SandboxError> {
    let (parent, name) = match path.rel().rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, path.rel()),
    };
    let parent_fd = match parent {
        Some(p) => ensure_dir(
            root,
            p,
            DirAttrs {
                mode: 0o755,
                ..attrs
            },
        )?,
        None => open_beneath(root, ".")?,
    };
    let fd = openat(
        parent_fd.as_fd(),
        name,
        OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(at("create", path.as_str()))?;
    nix::unistd::fchown(
        &fd,
        Some(Uid::from_raw(attrs.uid)),
        Some(Gid::from_raw(attrs.gid)),
    )
    .map_err(at("chown", path.as_str()))?;
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(0o644))
        .map_err(at("chmod", path.as_str()))?;
    std::fs::File::from(fd)
        .write_all(contents)
        .map_err(|source| SandboxError::Write {
            path: path.as_str().to_owned(),
            source,
        })
}

/// Opens `path` in the agent's root as a directory handle.
fn open_dir(path: &Path) -> Result<OwnedFd, SandboxError> {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(at("open", path.display().to_string()))
}

/// Opens `rel` below `dir`, refusing symlinks and anything outside `dir`.
fn open_beneath(dir: BorrowedFd, rel: &str) -> Result<OwnedFd, SandboxError> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(dir, rel, how).map_err(at("open", format!("/{rel}")))
}

/// Creates `rel` and its missing parents below `dir` with `attrs`, refusing symlinks on the
/// way; existing directories are left as they are.
fn ensure_dir(dir: BorrowedFd, rel: &str, attrs: DirAttrs) -> Result<OwnedFd, SandboxError> {
    let mut cur = open_beneath(dir, ".")?;
    let mut done = String::new();
    for comp in rel.split('/') {
        done.push('/');
        done.push_str(comp);
        match mkdirat(
            cur.as_fd(),
            comp,
            Mode::from_bits_truncate(attrs.mode & 0o777),
        ) {
            Ok(()) => set_attrs(cur.as_fd(), comp, attrs)?,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(at("mkdir", done.clone())(e)),
        }
        cur = open_beneath(cur.as_fd(), comp)?;
    }
    Ok(cur)
}

/// Sets owner and mode of `rel` below `dir` (mode after owner: chown clears set-id bits).
fn set_attrs(dir: BorrowedFd, rel: &str, attrs: DirAttrs) -> Result<(), SandboxError> {
    fchownat(
        dir,
        rel,
        Some(Uid::from_raw(attrs.uid)),
        Some(Gid::from_raw(attrs.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(at("chown", format!("/{rel}")))?;
    fchmodat(
        dir,
        rel,
        Mode::from_bits_truncate(attrs.mode),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(at("chmod", format!("/{rel}")))
}

/// A C string for a path in the agent's root (for chroot in the forked child).
pub fn c_path(path: &Path) -> Option<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn me() -> DirAttrs {
        DirAttrs {
            mode: 0o755,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    #[test]
    fn write_file_creates_parents_with_owner_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let root = open_dir(tmp.path()).unwrap();
        let path = GuestPath::parse("t", "/build/sub/.attrs.json").unwrap();
        write_file(root.as_fd(), &path, b"{}", me()).unwrap();
        let file = tmp.path().join("build/sub/.attrs.json");
        assert_eq!(std::fs::read(&file).unwrap(), b"{}");
        let meta = std::fs::metadata(&file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o644);
        assert_eq!(meta.uid(), me().uid);
        let dir = std::fs::metadata(tmp.path().join("build/sub")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o755);
        // Writing again replaces the contents.
        write_file(root.as_fd(), &path, b"x", me()).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn a_staged_scratch_tmpfs_takes_the_jobs_size_and_keeps_its_flags() {
        // A test that cannot run must fail, not pass having tested nothing.
        assert!(
            nix::unistd::geteuid().is_root(),
            "mounting needs root: run the tests as root (CI does)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        sys::mount(
            None,
            dir,
            "tmpfs",
            SCRATCH_FLAGS,
            Some(&scratch_tmpfs_options(0)),
        )
        .unwrap();
        let resized = resize_scratch_tmpfs(dir, 8 << 20);
        let st = nix::sys::statvfs::statvfs(dir);
        let mode = std::fs::metadata(dir).map(|m| m.permissions().mode() & 0o7777);
        nix::mount::umount(dir).unwrap();
        resized.unwrap();
        let st = st.unwrap();
        assert_eq!(st.blocks() * st.fragment_size(), 8 << 20);
        let flags = st.flags();
        assert!(flags.contains(nix::sys::statvfs::FsFlags::ST_NOSUID));
        assert!(flags.contains(nix::sys::statvfs::FsFlags::ST_NODEV));
        assert!(!flags.contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
        assert_eq!(mode.unwrap(), 0o755);
    }

    #[test]
    fn ensure_dir_refuses_symlinks_on_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("link")).unwrap();
        let root = open_dir(tmp.path()).unwrap();
        let err = ensure_dir(root.as_fd(), "link/sub", me()).err().unwrap();
        assert!(
            matches!(&err, SandboxError::At { what: "open", path, .. } if path == "/link"),
            "{err:?}"
        );
        assert!(!outside.path().join("sub").exists());
        let file = GuestPath::parse("t", "/link/f").unwrap();
        assert!(write_file(root.as_fd(), &file, b"x", me()).is_err());
        assert!(!outside.path().join("f").exists());
    }
}
