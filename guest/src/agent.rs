//! The agent's life, from the first mount to power-off. Every path ends in `power_off`.
//!
//! `AgentFailure.phase` names what failed: `init` (PID-1 mounts, hostname, loopback, signalfd;
//! reported right after Hello), `cmdline`, `read job`, `job` (invalid Job), `clock`,
//! `sandbox`, `network`, `cgroup`, `exec`, `logs`, `exited`, `outputs`, `panic`. Failures
//! before there is a connection (`connect`, `hello`) only reach the serial console.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use tvix_build_vm_agent::proto::{
    exited, guest_message::Msg, host_message, BootTimings, Exited, Hello, OutputsDone, Usage,
};
use tvix_build_vm_agent::{frame, proto::GuestMessage, PROTOCOL_VERSION};
use vsock::VsockStream;

use crate::cgroup::{BuildCgroup, PreparedCgroup};
use crate::cmdline::BootConfig;
use crate::conn::{failure_msg, Conn, Sink};
use crate::error::{Failure, InPhase};
use crate::exec::{self, Reaper};
use crate::job::JobSpec;
use crate::stage;
use crate::staged::Staged;
use crate::{logs, net, outputs, sandbox, sys, trace};

/// How long the agent waits, after its last message, for the host to close the connection.
/// Powering off at once could drop data still queued in the guest's vsock transport, and so
/// could any wait shorter than the host's own: a host that is slow to store the last output
/// (a remote or busy castore) would find the VM gone and the end of the outputs lost. The
/// host bounds this wait itself (harvest and shutdown deadlines, then it kills the VM), so
/// the agent's bound only guards against a host that forgot the VM.
const CLOSE_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The host connection's descriptor, for the panic hook; -1 before it exists.
static CONN_FD: AtomicI32 = AtomicI32::new(-1);

fn console(failure: &Failure) {
    eprintln!("tvix-build-vm-agent: {failure}");
}

/// On a panic: tell the console and, best effort, the host; then power off. A panic cannot
/// happen in the middle of writing a frame, so the stream is at a frame boundary here.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let failure = Failure {
            phase: "panic",
            message: info.to_string(),
        };
        console(&failure);
        let fd = CONN_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            if let Ok(bytes) = frame::encode(&GuestMessage {
                msg: Some(failure_msg(&failure)),
            }) {
                // SAFETY: `fd` is the host connection, which stays open until power-off.
                let _ =
                    nix::unistd::write(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, &bytes);
            }
        }
        sys::power_off()
    }));
}

/// Runs the agent: PID-1 setup, the conversation with the host, power-off.
pub fn run(agent_start_us: u64) -> ! {
    let early = sys::early_mounts()
        .phase("init")
        .and_then(|()| sys::set_hostname("localhost").phase("init"))
        .and_then(|()| net::loopback_up().phase("init"));
    let early_done_us = sys::boottime_us();
    // SIGCHLD is blocked before anything could fork.
    let reaper = Reaper::new().phase("init");
    let (port, cmdline_failure) = match BootConfig::from_proc().phase("cmdline") {
        Ok(c) => {
            if c.trace {
                trace::enable();
                trace::mark_at("agent start", agent_start_us);
                trace::mark_at("early mounts", early_done_us);
            }
            (c.agent_port, None)
        }
        Err(f) => (tvix_build_vm_agent::DEFAULT_AGENT_PORT, Some(f)),
    };
    // What does not depend on the Job, best effort (see `stage`), and only on a working
    // base. A part that failed here is made again after the Job, which reports its error.
    let (staged, cgroup) = if early.is_ok() {
        let staged = stage::stage();
        let cgroup = PreparedCgroup::new();
        trace::mark("cgroup prepared");
        (staged, cgroup.ok())
    } else {
        (Staged::default(), None)
    };
    let mounts_done_us = sys::boottime_us();
    let stream = match crate::vsock::dial(port).phase("connect") {
        Ok(s) => s,
        Err(f) => {
            console(&f);
            sys::power_off()
        }
    };
    trace::mark("connected");
    CONN_FD.store(stream.as_raw_fd(), Ordering::SeqCst);
    let mut conn = Conn::new(stream);
    let hello = Msg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        timings: Some(BootTimings {
            agent_start_us,
            mounts_done_us,
            connected_us: sys::boottime_us(),
        }),
    });
    if let Err(f) = conn.send(hello).and_then(|()| conn.flush()).phase("hello") {
        console(&f);
        sys::power_off()
    }
    trace::mark("hello sent");
    let result = early
        .and(cmdline_failure.map_or(Ok(()), Err))
        .and(reaper)
        .and_then(|reaper| session(&mut conn, reaper, staged, cgroup));
    if let Err(f) = result {
        console(&f);
        conn.send_failure(&f);
    }
    finish(conn)
}

/// Everything from reading the Job to OutputsDone.
///
/// `staged` and `cgroup` are what was prepared before the Hello; a part missing there is
/// made here the ordinary way, so that its failure is reported as without preparation.
fn session(
    conn: &mut Conn<VsockStream>,
    mut reaper: Reaper,
    mut staged: Staged,
    cgroup: Option<PreparedCgroup>,
) -> Result<(), Failure> {
    let job = match conn.recv().phase("read job")?.msg {
        Some(host_message::Msg::Job(job)) => job,
        None => {
            return Err(Failure {
                phase: "read job",
                message: "the host's message holds no Job".to_owned(),
            })
        }
    };
    trace::mark("job received");
    let job = JobSpec::try_from(job).phase("job")?;
    trace::mark("job parsed");
    if job.clock_unix_ns > 0 {
        sys::set_clock(job.clock_unix_ns).phase("clock")?;
    }
    trace::mark("clock set");
    let sandbox = sandbox::build(&job, &mut staged).phase("sandbox")?;
    if job.network {
        net::eth0_up().phase("network")?;
    }
    let cgroup = match cgroup {
        Some(prepared) => prepared.limit(job.memory_bytes, job.max_processes),
        None => BuildCgroup::create(job.memory_bytes, job.max_processes),
    }
    .phase("cgroup")?;
    trace::mark("cgroup created");

    let bad_path = |what: &str| Failure {
        phase: "job",
        message: format!("{what} contains a NUL byte"),
    };
    let cmd = exec::Command {
        argv: &job.argv,
        env: &job.env,
        root: sandbox::c_path(&sandbox.root).ok_or_else(|| bad_path("the sandbox root"))?,
        working_dir: sandbox::c_path(job.working_dir.as_str().as_ref())
            .ok_or_else(|| bad_path("working_dir"))?,
        uid: job.uid,
        gid: job.gid,
        cgroup_procs: cgroup.procs_fd(),
    };
    let child = exec::spawn(&cmd).phase("exec")?;
    trace::mark("exec done");
    let finished = logs::stream_until_exit(child, &mut reaper, &cgroup, conn).phase("logs")?;
    trace::mark("command exited, output drained");
    let oom_killed = cgroup.oom_killed().phase("cgroup")?;
    let usage = cgroup.usage();
    trace::mark("oom checked");
    trace::flush();
    let status = match finished.status {
        nix::sys::wait::WaitStatus::Signaled(_, sig, _) => exited::Status::Signal(sig as i32),
        nix::sys::wait::WaitStatus::Exited(_, code) => exited::Status::Code(code),
        other => {
            return Err(Failure {
                phase: "logs",
                message: format!("unexpected wait status {other:?}"),
            })
        }
    };
    conn.send(Msg::Exited(Exited {
        status: Some(status),
        oom_killed,
        duration_us: finished.duration.as_micros().min(u64::MAX as u128) as u64,
        usage: Some(Usage {
            cpu_user_us: usage.cpu_user_us,
            cpu_system_us: usage.cpu_system_us,
            memory_peak_bytes: usage.memory_peak_bytes,
            pids_peak: usage.pids_peak,
        }),
    }))
    .and_then(|()| conn.flush())
    .phase("exited")?;

    // The walk holds one descriptor per directory level.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    for (index, path) in job.outputs.iter().enumerate() {
        let index = u32::try_from(index).map_err(|_| Failure {
            phase: "outputs",
            message: "more than 2^32 outputs".to_owned(),
        })?;
        outputs::send_output(sandbox.root_fd.as_fd(), index, path, conn).phase("outputs")?;
    }
    trace::mark("outputs sent");
    conn.send(Msg::OutputsDone(OutputsDone {}))
        .and_then(|()| conn.flush())
        .phase("outputs")
}

/// Flushes, signals the end of our side, waits (bounded) for the host to close, powers off.
fn finish(mut conn: Conn<VsockStream>) -> ! {
    let _ = conn.flush();
    trace::flush();
    let stream = conn.get_ref();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(CLOSE_WAIT));
    let mut buf = [0u8; 4096];
    let mut reader = stream;
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    sys::power_off()
}
