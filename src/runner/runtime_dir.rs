//! The runtime directory of one build: its sockets, serial log, scratch image and the pids of
//! its processes, removed on every way out.
//!
//! Ownership is a `flock` on `owner.lock` inside the directory, held for the build's whole
//! life. The kernel drops it when the owner dies, however it dies, so a later start-up can
//! tell a stale directory (lock free) from one a live process is using (lock held) without
//! guessing from names or ages, and only then kill what that directory's `pids` file
//! recorded.

use crate::vm::process::{kill_recorded, PIDS_FILE};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

const LOCK_FILE: &str = "owner.lock";
/// The lock file's name until it is locked (see [`RuntimeDir::create`]).
const PENDING_LOCK_FILE: &str = "owner.lock.new";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    #[error("creating runtime directory {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// A build's runtime directory; removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl RuntimeDir {
    /// Creates `root/name` (mode 0700, `root` too if missing) and takes its ownership lock.
    pub fn create(root: &Path, name: &str) -> Result<Self, RuntimeDirError> {
        let create_err = |path: &Path, source| RuntimeDirError::Create {
            path: path.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| create_err(root, e))?;
        let path = root.join(name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| create_err(&path, e))?;
        // The lock file is locked before it appears under its name: another process's sweep
        // removes a directory whose lock file it can lock, so a lock file that existed
        // unlocked for a moment would lose this directory to it.
        let lock_path = path.join(LOCK_FILE);
        let pending = path.join(PENDING_LOCK_FILE);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&pending)
            .map_err(|e| create_err(&pending, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, source)| {
            RuntimeDirError::Lock {
                path: pending.clone(),
                source,
            }
        })?;
        fs::rename(&pending, &lock_path).map_err(|e| create_err(&lock_path, e))?;
        Ok(Self { path, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.path.display(), error = %e, "could not remove runtime directory");
            }
        }
    }
}

/// What a sweep found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub removed_dirs: usize,
    pub killed_pids: usize,
    pub busy_dirs: usize,
    /// Directories without our lock file, left alone.
    pub foreign_dirs: usize,
}

/// Removes the runtime directories under `root` whose owner is gone, after killing every
/// process they recorded that is still the same process. Directories a live process owns
/// are left alone, so this is safe to run while other builds are running; directories that
/// are not runtime directories (no lock file) are never touched.
pub fn sweep(root: &Path) -> io::Result<SweepReport> {
    let mut report = SweepReport::default();
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let dir = entry?.path();
        if !dir.is_dir() {
            continue;
        }
        let lock = match File::open(dir.join(LOCK_FILE)) {
            Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => lock,
                Err(_) => {
                    report.busy_dirs += 1;
                    continue;
                }
            },
            // Not a runtime directory of ours (the root may be shared with anything, e.g.
            // `--runtime-dir /tmp`): never touch it. A build that crashed between its mkdir
            // and its lock file leaves an empty directory behind, which is harmless.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.foreign_dirs += 1;
                continue;
            }
            Err(e) => return Err(e),
        };
        report.killed_pids += kill_recorded(&dir.join(PIDS_FILE)).unwrap_or(0);
        fs::remove_dir_all(&dir)?;
        drop(lock);
        report.removed_dirs += 1;
    }
    if report.removed_dirs > 0 {
        info!(
            root = %root.display(),
            removed = report.removed_dirs,
            killed = report.killed_pids,
            "swept runtime directories left by a previous run"
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn dropped_dir_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::create(root.path(), "b1").unwrap();
        let p = dir.path().to_owned();
        fs::write(dir.join("serial.log"), b"x").unwrap();
        assert!(p.is_dir());
        drop(dir);
        assert!(!p.exists());
    }

    #[test]
    fn second_create_of_same_name_fails() {
        let root = tempfile::tempdir().unwrap();
        let _a = RuntimeDir::create(root.path(), "b1").unwrap();
        assert!(matches!(
            RuntimeDir::create(root.path(), "b1"),
            Err(RuntimeDirError::Create { .. })
        ));
    }

    #[test]
    fn sweep_skips_live_owner_and_kills_orphans_of_dead_owner() {
        let root = tempfile::tempdir().unwrap();
        let live = RuntimeDir::create(root.path(), "live").unwrap();

        // A stale directory: its owner is gone (lock file present, unlocked) and it recorded
        // a process that is still running.
        let stale = root.path().join("stale");
        fs::create_dir(&stale).unwrap();
        fs::write(stale.join(LOCK_FILE), b"").unwrap();
        let mut orphan = Command::new("sleep").arg("60").spawn().unwrap();
        let stat = fs::read_to_string(format!("/proc/{}/stat", orphan.id())).unwrap();
        let start: u64 = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();
        fs::write(
            stale.join(PIDS_FILE),
            format!("{pid} {pid} {start} qemu\n", pid = orphan.id()),
        )
        .unwrap();

        // Something else that happens to live under the same root.
        let foreign = root.path().join("someone-elses");
        fs::create_dir(&foreign).unwrap();
        fs::write(foreign.join("data"), b"keep me").unwrap();

        let report = sweep(root.path()).unwrap();
        assert_eq!(
            report,
            SweepReport {
                removed_dirs: 1,
                killed_pids: 1,
                busy_dirs: 1,
                foreign_dirs: 1,
            }
        );
        assert!(!stale.exists());
        assert_eq!(fs::read(foreign.join("data")).unwrap(), b"keep me");
        assert!(live.path().is_dir());
        let status = orphan.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}
