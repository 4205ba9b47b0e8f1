//! The host processes of one VM (the VMM and its helpers), kept in one process group.
//!
//! - The first child creates the group, later ones join it, so one `killpg` ends them all.
//! - Each child gets `PR_SET_PDEATHSIG(SIGKILL)`: if the service dies, so do its VMs.
//! - Each child's stdout and stderr go through a bounded pump into `<runtime dir>/<name>.log`
//!   (see [`super::logsink`]), never into the service's own stderr.
//! - `<runtime dir>/pids` records pid, group and start time of every child, so that a later
//!   start-up can kill orphans by recorded identity ([`kill_recorded`]), never by name.
//! - Dropping a [`ProcessGroup`] kills the group.
//! - A group may start in the background (a nice value for every member, e.g. a pre-booted
//!   VM's boot) and be brought to the foreground later ([`ProcessGroup::renice`]).
//!
//! Pid reuse: `killpg` is only sent while at least one member has not been reaped, because a
//! process group id cannot be reused while any member, even a zombie, still exists.

use super::logsink;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Name of the file recording a group's processes inside its runtime directory.
pub const PIDS_FILE: &str = "pids";

/// How long reaping a killed group may take before giving up on it.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the log pumps may take to drain once their writers are gone.
const PUMP_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors spawning or recording processes.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A process name must be usable as a file name: `[a-z0-9-]`, 1 to 32 bytes, unique.
    #[error("process name {name:?}: must be 1-32 of [a-z0-9-] and unique in its group")]
    BadName {
        /// The rejected name.
        name: String,
    },
    /// A log file could not be created.
    #[error("creating log file {path}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program could not be started.
    #[error("starting {name} ({program})")]
    Spawn {
        /// The member name.
        name: String,
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pids file could not be written.
    #[error("recording pids in {path}")]
    Record {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Identifies a member of a [`ProcessGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberId(usize);

/// Where a member's stdout goes.
#[derive(Debug, Clone)]
pub enum Stdout {
    /// Into `<runtime dir>/<name>.log` along with stderr.
    Log,
    /// Into its own bounded file (the serial console when the VMM writes it to stdout).
    File {
        /// The file, created or truncated.
        path: PathBuf,
        /// Its cap.
        cap: u64,
    },
}

struct Member {
    name: String,
    pid: u32,
    start_time: Option<u64>,
    child: tokio::process::Child,
    status: Option<ExitStatus>,
    pumps: Vec<JoinHandle<std::io::Result<u64>>>,
}

/// The processes of one VM. See the module docs.
pub struct ProcessGroup {
    runtime_dir: PathBuf,
    pgid: Option<i32>,
    members: Vec<Member>,
    /// The nice value members start with; `None`: the service's own.
    nice: Option<i32>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("runtime_dir", &self.runtime_dir)
            .field("pgid", &self.pgid)
            .field("pids", &self.pids())
            .finish()
    }
}

impl ProcessGroup {
    /// An empty group whose logs and pids file live in `runtime_dir` (which must exist).
    pub fn new(runtime_dir: &Path) -> Self {
        ProcessGroup {
            runtime_dir: runtime_dir.to_owned(),
            pgid: None,
            members: Vec::new(),
            nice: None,
        }
    }

    /// Members spawned from now on start with this nice value (all their threads inherit
    /// it).
    pub fn start_niced(&mut self, nice: i32) {
        self.nice = Some(nice.clamp(-20, 19));
    }

    /// Sets the nice value of every thread of every member (Linux keeps it per thread;
    /// `PRIO_PGRP` reaches them all). Lowering it needs `CAP_SYS_NICE` or `RLIMIT_NICE`,
    /// see [`may_lower_nice`].
    pub fn renice(&mut self, nice: i32) -> std::io::Result<()> {
        let Some(pgid) = self.pgid else {
            return Ok(());
        };
        self.nice = None;
        let pgid = libc::id_t::try_from(pgid).map_err(|_| std::io::Error::other("bad pgid"))?;
        // SAFETY: setpriority takes plain integers and touches no memory.
        let rc = unsafe { libc::setpriority(libc::PRIO_PGRP, pgid, nice.clamp(-20, 19)) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The group id, once a member exists.
    pub fn pgid(&self) -> Option<i32> {
        self.pgid
    }

    /// Starts `command` as a member called `name`. Its stdin is `/dev/null`.
    ///
    /// Must be called from a thread that lives as long as the process should (a tokio worker
    /// thread, not `spawn_blocking`): the parent-death signal fires when the spawning
    /// *thread* exits.
    pub fn spawn(
        &mut self,
        name: &str,
        command: tokio::process::Command,
        stdout: Stdout,
    ) -> Result<MemberId, ProcessError> {
        self.spawn_inner(name, command, stdout, false)
            .map(|(id, _)| id)
    }

    /// Like [`ProcessGroup::spawn`], but the member's stdin is a pipe whose write end is
    /// returned (to hand it something after it started).
    pub fn spawn_with_stdin(
        &mut self,
        name: &str,
        command: tokio::process::Command,
        stdout: Stdout,
    ) -> Result<(MemberId, tokio::process::ChildStdin), ProcessError> {
        let (id, stdin) = self.spawn_inner(name, command, stdout, true)?;
        match stdin {
            Some(stdin) => Ok((id, stdin)),
            // tokio hands out the pipe it was asked to create.
            None => Err(ProcessError::Spawn {
                name: name.to_owned(),
                program: name.to_owned(),
                source: std::io::Error::other("no stdin pipe"),
            }),
        }
    }

    fn spawn_inner(
        &mut self,
        name: &str,
        mut command: tokio::process::Command,
        stdout: Stdout,
        piped_stdin: bool,
    ) -> Result<(MemberId, Option<tokio::process::ChildStdin>), ProcessError> {
        let name_ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && self.members.iter().all(|m| m.name != name);
        if !name_ok {
            return Err(ProcessError::BadName {
                name: name.to_owned(),
            });
        }
        let log_path = self.log_path_for(name);
        let create = |path: &Path| {
            std::fs::File::create(path).map_err(|source| ProcessError::Log {
                path: path.to_owned(),
                source,
            })
        };
        let log = create(&log_path)?;
        let stderr_log = log.try_clone().map_err(|source| ProcessError::Log {
            path: log_path.clone(),
            source,
        })?;
        let (stdout_file, stdout_cap) = match &stdout {
            Stdout::Log => (log, logsink::DEFAULT_CAP_BYTES),
            Stdout::File { path, cap } => (create(path)?, *cap),
        };

        command
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false)
            .process_group(self.pgid.unwrap_or(0));
        let parent = std::process::id();
        let nice = self.nice;
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: it calls prctl, getppid and setpriority (plain
        // syscalls) and builds an io::Error from a raw errno (no allocation). It touches no
        // locks or heap.
        unsafe {
            command.pre_exec(move || {
                if let Some(nice) = nice {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl; then no signal would come.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_owned(),
            program,
            source,
        })?;
        // A child that was spawned has a pid until it is reaped, and nothing reaped it yet.
        let pid = child.id().unwrap_or(0);
        if self.pgid.is_none() {
            self.pgid = i32::try_from(pid).ok();
        }
        let stdin = child.stdin.take();
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(logsink::pump(out, stdout_file, stdout_cap)));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(logsink::pump(
                err,
                stderr_log,
                logsink::DEFAULT_CAP_BYTES,
            )));
        }
        self.members.push(Member {
            name: name.to_owned(),
            pid,
            start_time: start_time(pid),
            child,
            status: None,
            pumps,
        });
        self.record()?;
        Ok((MemberId(self.members.len() - 1), stdin))
    }

    /// The log file of the member called `name`.
    pub fn log_path_for(&self, name: &str) -> PathBuf {
        self.runtime_dir.join(format!("{name}.log"))
    }

    /// The log file of a member.
    pub fn log_path(&self, id: MemberId) -> PathBuf {
        self.log_path_for(&self.members[id.0].name)
    }

    /// The pid of a member.
    pub fn pid(&self, id: MemberId) -> u32 {
        self.members[id.0].pid
    }

    /// The pids of all members, in spawn order.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.pid).collect()
    }

    /// CPU time (user and system, with that of their reaped children) of the members not
    /// yet reaped: what the VM has cost the host so far. A member whose pid now names
    /// another process (reaped meanwhile) is left out.
    pub fn cpu_time(&self) -> Duration {
        let tick = clock_tick();
        self.members
            .iter()
            .filter(|m| m.status.is_none())
            .filter_map(|m| {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", m.pid)).ok()?;
                let (start, ticks) = cpu_ticks(&stat)?;
                (m.start_time == Some(start)).then_some(ticks)
            })
            .fold(Duration::ZERO, |sum, ticks| {
                sum.saturating_add(tick.saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX)))
            })
    }

    /// The member's exit status if it has exited (reaps it).
    pub fn try_wait(&mut self, id: MemberId) -> std::io::Result<Option<ExitStatus>> {
        let member = &mut self.members[id.0];
        if member.status.is_none() {
            member.status = member.child.try_wait()?;
        }
        Ok(member.status)
    }

    /// Waits for a member to exit (reaps it). Cancel-safe.
    pub async fn wait(&mut self, id: MemberId) -> std::io::Result<ExitStatus> {
        let member = &mut self.members[id.0];
        if let Some(status) = member.status {
            return Ok(status);
        }
        let status = member.child.wait().await?;
        member.status = Some(status);
        Ok(status)
    }

    /// Waits until any member not yet reaped exits, and reaps it. Cancel-safe. Errors if
    /// every member has been reaped already.
    pub async fn wait_any(&mut self) -> std::io::Result<(MemberId, ExitStatus)> {
        let waits: Vec<_> = self
            .members
            .iter_mut()
            .enumerate()
            .filter(|(_, m)| m.status.is_none())
            .map(|(i, m)| Box::pin(async move { (i, m.child.wait().await) }))
            .collect();
        if waits.is_empty() {
            return Err(std::io::Error::other(
                "every process of the group has exited",
            ));
        }
        let ((i, status), _, rest) = futures::future::select_all(waits).await;
        drop(rest);
        let status = status?;
        self.members[i].status = Some(status);
        Ok((MemberId(i), status))
    }

    /// The name a member was spawned with.
    pub fn name(&self, id: MemberId) -> &str {
        &self.members[id.0].name
    }

    /// Sends SIGKILL to the whole group, unless every member has been reaped already (then
    /// the group id may belong to someone else).
    pub fn kill(&mut self) {
        let Some(pgid) = self.pgid else { return };
        if self.members.iter().all(|m| m.status.is_some()) {
            return;
        }
        // ESRCH (all gone, zombies aside) is fine; nothing else can happen for our own group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Kills the group, reaps every member and lets the log pumps finish (each bounded in
    /// time), so that afterwards no process of the group remains and the logs are complete.
    pub async fn kill_and_reap(&mut self) {
        self.kill();
        for member in &mut self.members {
            if member.status.is_some() {
                continue;
            }
            match tokio::time::timeout(REAP_TIMEOUT, member.child.wait()).await {
                Ok(Ok(status)) => member.status = Some(status),
                Ok(Err(e)) => {
                    tracing::warn!(name = %member.name, pid = member.pid, error = %e, "reaping")
                }
                Err(_) => {
                    tracing::warn!(name = %member.name, pid = member.pid, "not reaped after SIGKILL")
                }
            }
        }
        self.drain_logs().await;
    }

    /// Waits (bounded) for the log pumps of exited members to write everything.
    pub async fn drain_logs(&mut self) {
        for member in &mut self.members {
            if member.status.is_none() {
                continue;
            }
            for pump in std::mem::take(&mut member.pumps) {
                match tokio::time::timeout(PUMP_TIMEOUT, pump).await {
                    Ok(Ok(Ok(_dropped))) => {}
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(name = %member.name, error = %e, "writing log")
                    }
                    Ok(Err(e)) => tracing::warn!(name = %member.name, error = %e, "log pump"),
                    Err(_) => tracing::warn!(name = %member.name, "log pump did not finish"),
                }
            }
        }
    }

    fn record(&self) -> Result<(), ProcessError> {
        let path = self.runtime_dir.join(PIDS_FILE);
        let mut text = String::new();
        for m in &self.members {
            let start = m
                .start_time
                .map_or_else(|| "-".to_owned(), |t| t.to_string());
            let pgid = self.pgid.unwrap_or(0);
            text.push_str(&format!("{} {pgid} {start} {}\n", m.pid, m.name));
        }
        let err = |source| ProcessError::Record {
            path: path.clone(),
            source,
        };
        let tmp = self.runtime_dir.join(format!(".{PIDS_FILE}.tmp"));
        std::fs::write(&tmp, text).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // The owner forgot (or panicked): no process may outlive its VM's handle. tokio reaps
        // the dropped children in the background.
        self.kill();
    }
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22): together
/// with the pid it identifies one process even after pid reuse.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything, so count from
    // the last ')': field 3 is the first after it.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// From a `/proc/<pid>/stat` line: the start time (field 22) and utime + stime + cutime +
/// cstime (fields 14-17), in clock ticks.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let ticks = [14, 15, 16, 17]
        .into_iter()
        .try_fold(0u64, |sum, n| Some(sum.saturating_add(field(n)?)))?;
    Some((field(22)?, ticks))
}

/// The length of one clock tick (`sysconf(_SC_CLK_TCK)`, 100 Hz where it cannot be asked).
fn clock_tick() -> Duration {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|hz| u64::try_from(hz).ok())
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    Duration::from_nanos(1_000_000_000 / hz)
}

/// Whether this process may lower a nice value to `nice` (raise a priority): with
/// `CAP_SYS_NICE`, or within `RLIMIT_NICE` (whose limit `r` allows down to `20 - r`).
pub fn may_lower_nice(nice: i32) -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct it is given.
    let by_rlimit = unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut limit) } == 0
        && 20 - i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX) <= i64::from(nice);
    by_rlimit || has_cap_sys_nice()
}

fn has_cap_sys_nice() -> bool {
    const CAP_SYS_NICE: u32 = 23;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_NICE) != 0)
}

/// Kills every process recorded in the pids file at `path` that still is the same process
/// (same pid and start time): the orphans of a service that died without cleaning up.
/// Returns how many were killed.
pub fn kill_recorded(path: &Path) -> std::io::Result<usize> {
    let text = std::fs::read_to_string(path)?;
    let mut killed = 0;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(pid), Some(_pgid), Some(start)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
            continue;
        };
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if raw <= 1 || start_time(pid) != Some(start) {
            continue;
        }
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(raw),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            killed += 1;
        }
    }
    Ok(killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    fn alive(pid: u32) -> bool {
        // A zombie still has /proc/<pid>; "gone" means reaped or never ours.
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn cpu_ticks_count_from_the_last_parenthesis() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime ... starttime (22)
        let stat = "42 (a) (b c) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 20 1 20 0 1 0 12345 0 0\n";
        assert_eq!(cpu_ticks(stat), Some((12345, 31)));
        assert_eq!(cpu_ticks("42 (a) S 1"), None);
    }

    #[tokio::test]
    async fn cpu_time_counts_a_member_that_burns_cpu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = ProcessGroup::new(dir.path());
        // Busy for about 0.3 s of CPU, then idle.
        group
            .spawn(
                "burn",
                sh("i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; exec sleep 60"),
                Stdout::Log,
            )
            .expect("burn");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = Duration::ZERO;
        while std::time::Instant::now() < deadline {
            last = group.cpu_time();
            if last >= Duration::from_millis(50) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            last >= Duration::from_millis(50),
            "only {last:?} of CPU counted"
        );
        group.kill_and_reap().await;
        // Reaped members are no longer counted (their pids may name other processes).
        assert_eq!(group.cpu_time(), Duration::ZERO);
    }

    #[tokio::test]
    async fn members_share_one_group_and_die_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = ProcessGroup::new(dir.path());
        let a = group
            .spawn(
                "a",
                sh("echo out-a; echo err-a >&2; exec sleep 60"),
                Stdout::Log,
            )
            .expect("a");
        let b = group
            .spawn("b", sh("exec sleep 60"), Stdout::Log)
            .expect("b");
        let pgid = group.pgid().expect("pgid");
        assert_eq!(pgid as u32, group.pid(a));
        let b_pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(group.pid(b) as i32)))
            .expect("getpgid");
        assert_eq!(b_pgid.as_raw(), pgid);
        let recorded = std::fs::read_to_string(dir.path().join(PIDS_FILE)).expect("pids");
        assert_eq!(recorded.lines().count(), 2);
        assert!(
            recorded.starts_with(&format!("{} {pgid} ", group.pid(a))),
            "{recorded}"
        );
        // Give the shell a moment to write before it becomes sleep.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pids = group.pids();
        group.kill_and_reap().await;
        for pid in pids {
            assert!(!alive(pid), "{pid} survived");
        }
        let log = std::fs::read_to_string(group.log_path(a)).expect("log");
        assert!(log.contains("out-a") && log.contains("err-a"), "{log}");
    }

    /// The nice value of every thread of `pid` (field 19 of each task's stat).
    fn thread_nices(pid: u32) -> Vec<i32> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("task dir")
            .flatten()
            .map(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).expect("stat");
                let after = &stat[stat.rfind(')').expect("comm") + 1..];
                after
                    .split_whitespace()
                    .nth(16)
                    .expect("nice")
                    .parse()
                    .expect("nice")
            })
            .collect()
    }

    #[tokio::test]
    async fn a_group_started_niced_is_reniced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = ProcessGroup::new(dir.path());
        group.start_niced(10);
        group
            .spawn("a", sh("exec sleep 60"), Stdout::Log)
            .expect("a");
        group
            .spawn("b", sh("exec sleep 60"), Stdout::Log)
            .expect("b");
        for pid in group.pids() {
            assert_eq!(thread_nices(pid), [10], "member {pid} did not start niced");
        }
        let own = 0;
        // A test that cannot check this must fail, not pass having checked less.
        assert!(
            may_lower_nice(own),
            "renicing back to {own} needs CAP_SYS_NICE or RLIMIT_NICE: run the tests as root (CI does)"
        );
        group.renice(own).expect("renice");
        for pid in group.pids() {
            assert_eq!(thread_nices(pid), [own], "member {pid} kept its nice value");
        }
        // Renicing to a higher value is always allowed.
        group.renice(15).expect("renice up");
        for pid in group.pids() {
            assert_eq!(thread_nices(pid), [15]);
        }
        group.kill_and_reap().await;
    }

    #[tokio::test]
    async fn drop_kills_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = ProcessGroup::new(dir.path());
        group
            .spawn("x", sh("exec sleep 60"), Stdout::Log)
            .expect("x");
        let pid = group.pids()[0];
        drop(group);
        // Killed at once; reaped by tokio in the background, so poll briefly.
        for _ in 0..100 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{pid} still exists after the group was dropped");
    }

    #[tokio::test]
    async fn wait_reports_exit_and_stdout_can_go_elsewhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let serial = dir.path().join("serial.log");
        let mut group = ProcessGroup::new(dir.path());
        let id = group
            .spawn(
                "vmm",
                sh("echo console; echo diag >&2; exit 3"),
                Stdout::File {
                    path: serial.clone(),
                    cap: 1 << 20,
                },
            )
            .expect("spawn");
        let status = group.wait(id).await.expect("wait");
        assert_eq!(status.code(), Some(3));
        group.drain_logs().await;
        assert_eq!(
            std::fs::read_to_string(&serial).expect("serial"),
            "console\n"
        );
        assert_eq!(
            std::fs::read_to_string(group.log_path(id)).expect("log"),
            "diag\n"
        );
    }

    #[tokio::test]
    async fn names_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut group = ProcessGroup::new(dir.path());
        for bad in ["", "../x", "A", "a b", &"x".repeat(33)] {
            assert!(matches!(
                group.spawn(bad, sh("true"), Stdout::Log),
                Err(ProcessError::BadName { .. })
            ));
        }
        group.spawn("ok", sh("true"), Stdout::Log).expect("ok");
        assert!(matches!(
            group.spawn("ok", sh("true"), Stdout::Log),
            Err(ProcessError::BadName { .. })
        ));
        group.kill_and_reap().await;
    }

    #[tokio::test]
    async fn recorded_orphans_are_killed_only_if_still_the_same_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = tokio::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let pid = child.id().expect("pid");
        let start = start_time(pid).expect("start time");
        let pids = dir.path().join(PIDS_FILE);
        // A record with a wrong start time is another process that reused the pid: spared.
        std::fs::write(&pids, format!("{pid} {pid} {} x\n", start + 1)).expect("write");
        assert_eq!(kill_recorded(&pids).expect("sweep"), 0);
        assert!(child.try_wait().expect("try_wait").is_none());
        std::fs::write(&pids, format!("garbage\n{pid} {pid} {start} x\n")).expect("write");
        assert_eq!(kill_recorded(&pids).expect("sweep"), 1);
        let status = child.wait().await.expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }
}
