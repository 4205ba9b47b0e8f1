//! The PID-1 syscalls: the early mounts, console descriptors, hostname, clock, power-off.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::time::{clock_gettime, clock_settime, ClockId};

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("mount {fstype} on {}", target.display())]
    Mount {
        fstype: String,
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("move the mount at {} to {}", from.display(), to.display())]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("detach the mount at {}", target.display())]
    Detach {
        target: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("create directory {}", path.display())]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open /dev/console for the standard descriptors")]
    Console(#[source] std::io::Error),
    #[error("set the hostname")]
    Hostname(#[source] Errno),
    #[error("set the clock to {ns} ns since the epoch")]
    Clock {
        ns: i64,
        #[source]
        source: Errno,
    },
}

/// CLOCK_BOOTTIME in microseconds: time since the kernel started, suspend included.
pub fn boottime_us() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => {
            let us = ts.tv_sec() as i128 * 1_000_000 + ts.tv_nsec() as i128 / 1000;
            u64::try_from(us).unwrap_or(0)
        }
        Err(_) => 0,
    }
}

/// Mounts `fstype` (with `source`, or the fstype's name as source) on `target`.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SysError> {
    nix::mount::mount(
        Some(source.unwrap_or(fstype)),
        target,
        Some(fstype),
        flags,
        data,
    )
    .map_err(|source| SysError::Mount {
        fstype: fstype.to_owned(),
        target: target.to_owned(),
        source,
    })
}

/// Bind-mounts `source` on `target`, then makes that mount read-only (a bind mount ignores
/// MS_RDONLY on the first call).
pub fn bind_ro(source: &Path, target: &Path) -> Result<(), SysError> {
    let err = |source| SysError::Mount {
        fstype: "bind".to_owned(),
        target: target.to_owned(),
        source,
    };
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err)?;
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .map_err(err)
}

/// Moves the mount at `source` (with everything mounted below it) to `target`.
pub fn move_mount(source: &Path, target: &Path) -> Result<(), SysError> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(|errno| SysError::Move {
        from: source.to_owned(),
        to: target.to_owned(),
        source: errno,
    })
}

/// Detaches the mount at `target` and everything below it (lazily: open files keep them).
pub fn detach(target: &Path) -> Result<(), SysError> {
    nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
        SysError::Detach {
            target: target.to_owned(),
            source,
        }
    })
}

/// Creates `path` and its missing parents with `mode`.
pub fn mkdir_all(path: &Path, mode: u32) -> Result<(), SysError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(|source| SysError::Mkdir {
            path: path.to_owned(),
            source,
        })
}

fn mount_at(
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SysError> {
    let target = Path::new(target);
    mkdir_all(target, 0o755)?;
    mount(None, target, fstype, flags, data)
}

/// The agent's own filesystems: an initramfs has none of them mounted. /dev comes first so
/// that the console can back the standard descriptors before anything else opens a file.
pub fn early_mounts() -> Result<(), SysError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mount_at("/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755")) {
        // Already there if the kernel mounted it (DEVTMPFS_MOUNT without an initramfs).
        Err(SysError::Mount {
            source: Errno::EBUSY,
            ..
        }) => {}
        other => other?,
    }
    ensure_std_fds()?;
    mount_at("/proc", "proc", nosuid_nodev_noexec, None)?;
    mount_at("/sys", "sysfs", nosuid_nodev_noexec, None)?;
    mount_at(
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_at(
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    // favordynmods: moving a process into a cgroup or enabling a controller then needs no
    // RCU grace period, which under TCG costs milliseconds each time; forks and exits pay
    // slightly instead. A kernel without the option (before 6.1) mounts it without.
    match mount_at(
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid_nodev_noexec,
        Some("favordynmods"),
    ) {
        Err(SysError::Mount {
            source: Errno::EINVAL,
            ..
        }) => mount_at("/sys/fs/cgroup", "cgroup2", nosuid_nodev_noexec, None)?,
        other => other?,
    }
    Ok(())
}

/// The kernel gives init /dev/console as fds 0-2 only if the initramfs has that node. Without
/// them the first files we open would become "stdout", so fill any gap with the console.
fn ensure_std_fds() -> Result<(), SysError> {
    for fd in 0..3 {
        if nix::fcntl::fcntl(
            // SAFETY: only probes whether `fd` is open; the borrow does not outlive the call.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .is_ok()
        {
            continue;
        }
        let console = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/console")
            .map_err(SysError::Console)?;
        // Opening takes the lowest free descriptor, which is `fd` itself.
        if console.as_raw_fd() == fd {
            std::mem::forget(console);
        } else {
            return Err(SysError::Console(std::io::Error::other(format!(
                "console opened as fd {} instead of {fd}",
                console.as_raw_fd()
            ))));
        }
    }
    Ok(())
}

/// Sets the hostname the build sees.
pub fn set_hostname(name: &str) -> Result<(), SysError> {
    nix::unistd::sethostname(name).map_err(SysError::Hostname)
}

/// Sets CLOCK_REALTIME to `ns` nanoseconds since the epoch.
pub fn set_clock(ns: i64) -> Result<(), SysError> {
    let ts =
        nix::sys::time::TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
    clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|source| SysError::Clock { ns, source })
}

/// Flushes every filesystem, then powers the VM off. Only PID 1 gets here (see main); if the
/// kernel refuses, exiting makes PID 1 die, which with `panic=-1` also ends the VM.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("tvix-build-vm-agent: power off failed: {err:?}");
    std::process::exit(1)
}
