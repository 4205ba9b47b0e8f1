//! Streaming the build's stdout and stderr to the host while it runs, and noticing its exit.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::WaitStatus;
use tvix_build_vm_agent::proto::{guest_message::Msg, Log, Stream};

use crate::cgroup::{BuildCgroup, CgroupError};
use crate::conn::{Conn, ConnError, Sink};
use crate::exec::{Child, Reaper};

/// The most read from a pipe at once, and so the largest Log message.
const LOG_READ_BYTES: usize = 64 * 1024;
/// How long to wait for the pipes to close once the cgroup has been killed. Only a process
/// stuck in the kernel could hold them open longer.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("poll the build's pipes")]
    Poll(#[source] Errno),
    #[error("read the build's {stream}")]
    Read {
        stream: &'static str,
        #[source]
        source: Errno,
    },
    #[error("kill the build's remaining processes")]
    Kill(#[source] CgroupError),
    #[error("send a log message")]
    Send(#[source] ConnError),
}

/// How the command ended.
pub struct Finished {
    pub status: WaitStatus,
    pub duration: Duration,
}

struct Pipe {
    fd: OwnedFd,
    stream: Stream,
    name: &'static str,
}

/// Forwards the child's output as Log messages until it has exited; then kills what is left
/// of its process tree and forwards the rest of the output.
pub fn stream_until_exit<S: Read + Write>(
    child: Child,
    reaper: &mut Reaper,
    cgroup: &BuildCgroup,
    conn: &mut Conn<S>,
) -> Result<Finished, LogsError> {
    reaper.watch(child.pid);
    let mut pipes = vec![
        Pipe {
            fd: child.stdout,
            stream: Stream::Stdout,
            name: "stdout",
        },
        Pipe {
            fd: child.stderr,
            stream: Stream::Stderr,
            name: "stderr",
        },
    ];
    let mut buf = vec![0u8; LOG_READ_BYTES];
    let mut exited = None;
    let mut deadline: Option<Instant> = None;
    loop {
        if exited.is_some() && pipes.is_empty() {
            break;
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now()).as_millis();
                PollTimeout::try_from(left.min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::ZERO)
            }
        };
        let mut fds = Vec::with_capacity(3);
        fds.push(PollFd::new(reaper.fd(), PollFlags::POLLIN));
        for p in &pipes {
            fds.push(PollFd::new(p.fd.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(0) => break, // drain deadline
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(LogsError::Poll(e)),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);

        let mut closed = Vec::new();
        for (i, p) in pipes.iter().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            match nix::unistd::read(&p.fd, &mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    conn.send(Msg::Log(Log {
                        stream: p.stream as i32,
                        data: buf[..n].to_vec(),
                    }))
                    .and_then(|()| conn.flush())
                    .map_err(LogsError::Send)?;
                }
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(source) => {
                    return Err(LogsError::Read {
                        stream: p.name,
                        source,
                    })
                }
            }
        }
        for i in closed.into_iter().rev() {
            pipes.remove(i);
        }

        if ready[0] {
            reaper.reap();
            if exited.is_none() {
                if let Some((status, at)) = reaper.status() {
                    exited = Some(Finished {
                        status,
                        duration: at.saturating_duration_since(child.started),
                    });
                    cgroup.kill().map_err(LogsError::Kill)?;
                    deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                }
            }
        }
    }
    // A loop exit without a status is impossible: the deadline exists only after the exit.
    exited.ok_or(LogsError::Poll(Errno::ECHILD))
}
