//! The build's cgroup: limits, killing the whole process tree, and telling an OOM kill apart.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const BUILD_CGROUP: &str = "/sys/fs/cgroup/build";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("write {value:?} to {}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

/// The build's cgroup, `/sys/fs/cgroup/build`.
pub struct BuildCgroup {
    dir: PathBuf,
    procs: OwnedFd,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

/// The build's cgroup with its controllers but no limits yet: everything about it that does
/// not depend on the Job, made before the Hello.
pub struct PreparedCgroup {
    dir: PathBuf,
}

impl PreparedCgroup {
    /// Enables the memory and pids controllers below the root and creates the cgroup.
    pub fn new() -> Result<Self, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        // One at a time, so an error names the controller that is missing.
        write(&root.join("cgroup.subtree_control"), "+memory")?;
        write(&root.join("cgroup.subtree_control"), "+pids")?;
        let dir = PathBuf::from(BUILD_CGROUP);
        std::fs::create_dir(&dir).map_err(|source| CgroupError::Create {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    /// Sets the Job's limits (0 = none) and opens `cgroup.procs` for the child to join.
    pub fn limit(self, memory_bytes: u64, max_processes: u64) -> Result<BuildCgroup, CgroupError> {
        let dir = self.dir;
        if memory_bytes > 0 {
            write(&dir.join("memory.max"), &memory_bytes.to_string())?;
            // Without swap memory.max is the whole bound; with swap it would leak past it.
            let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        }
        if max_processes > 0 {
            write(&dir.join("pids.max"), &max_processes.to_string())?;
        }
        let procs_path = dir.join("cgroup.procs");
        let procs = nix::fcntl::open(
            &procs_path,
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| CgroupError::Open {
            path: procs_path,
            source,
        })?;
        Ok(BuildCgroup { dir, procs })
    }
}

impl BuildCgroup {
    /// Creates the cgroup with the memory and pids controllers and the given limits
    /// (0 = none).
    pub fn create(memory_bytes: u64, max_processes: u64) -> Result<Self, CgroupError> {
        PreparedCgroup::new()?.limit(memory_bytes, max_processes)
    }

    /// `cgroup.procs`, open for writing: a forked child writes "0" to it to move itself in
    /// before it execs, so that nothing it starts can run outside the cgroup.
    pub fn procs_fd(&self) -> BorrowedFd<'_> {
        self.procs.as_fd()
    }

    /// SIGKILLs every process in the cgroup.
    pub fn kill(&self) -> Result<(), CgroupError> {
        write(&self.dir.join("cgroup.kill"), "1")
    }

    /// Whether the OOM killer killed anything in the cgroup.
    pub fn oom_killed(&self) -> Result<bool, CgroupError> {
        let path = self.dir.join("memory.events");
        let text =
            std::fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
        Ok(oom_kills(&text) > 0)
    }
}

/// What the build's cgroup used; each figure is absent if its file could not be read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub cpu_user_us: Option<u64>,
    pub cpu_system_us: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub pids_peak: Option<u64>,
}

impl BuildCgroup {
    /// Reads `cpu.stat`, `memory.peak` and `pids.peak`. A file the kernel lacks leaves its
    /// figure absent: accounting never fails a build.
    pub fn usage(&self) -> Usage {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).ok();
        let cpu = read("cpu.stat").unwrap_or_default();
        Usage {
            cpu_user_us: keyed(&cpu, "user_usec"),
            cpu_system_us: keyed(&cpu, "system_usec"),
            memory_peak_bytes: read("memory.peak").and_then(|t| t.trim().parse().ok()),
            pids_peak: read("pids.peak").and_then(|t| t.trim().parse().ok()),
        }
    }
}

/// The value of `key` in a flat keyed cgroup file (`key value` per line).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// The `oom_kill` counter of a `memory.events` file (0 if absent).
fn oom_kills(memory_events: &str) -> u64 {
    keyed(memory_events, "oom_kill").unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_oom_kill_counter() {
        let text = "low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(oom_kills(text), 2);
        assert_eq!(oom_kills("low 0\noom 1\noom_kill 0\n"), 0);
        assert_eq!(oom_kills(""), 0);
    }

    #[test]
    fn reads_cpu_stat_keys() {
        let text = "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 0\n";
        assert_eq!(keyed(text, "user_usec"), Some(2000));
        assert_eq!(keyed(text, "system_usec"), Some(500));
        assert_eq!(keyed(text, "usage"), None);
        assert_eq!(keyed("user_usec lots\n", "user_usec"), None);
    }
}
