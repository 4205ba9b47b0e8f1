//! One conversation with a guest agent, its stages in the types:
//! [`accept_hello`] -> [`Greeted`] -> [`Greeted::send_job`] -> [`Running`] ->
//! [`Running::run`] (logs until the command exits) -> [`Running::harvest`] (the outputs).

use super::connection::{kind_of, Connection};
use super::error::{
    from_connection, AgentFailure, DeadlineKind, Error, ExitKind, Limit, LimitExceeded, Phase,
    ProtocolError, Timeout,
};
use super::harvest::{self, HarvestedOutput};
use super::limits::{HarvestLimits, SessionLimits};
use super::log::{LogChunk, LogSink, LogStream, LogTail};
use super::usage::{GuestUsage, UsageBounds};
use crate::castore::{BlobService, DirectoryService};
use crate::refscan::Scanner;
use bytes::Bytes;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tvix_build_vm_agent::proto::{
    exited, guest_message::Msg, host_message, BootTimings, Exited, HostMessage, Job, Limits, Log,
    Stream,
};
use tvix_build_vm_agent::PROTOCOL_VERSION;

/// What the agent said about itself, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentHello {
    /// Guest text, at most `max_agent_version_bytes` long.
    pub agent_version: String,
    /// Boot timings as the guest reported them (informational, never trusted for decisions).
    pub timings: Option<BootTimings>,
}

/// Waits for the agent's Hello on a fresh connection and checks it: exactly
/// [`PROTOCOL_VERSION`], a bounded `agent_version`. Anything else first is an error.
pub async fn accept_hello<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    limits: SessionLimits,
    deadline: Duration,
) -> Result<Greeted<S>, Error> {
    let mut conn = Connection::new(stream, limits.max_frame_bytes);
    let timeout = Timeout {
        which: DeadlineKind::Hello,
        after: deadline,
    };
    let msg = conn
        .recv_until(after(Instant::now(), deadline))
        .await
        .map_err(|e| from_connection(Phase::Hello, e, timeout))?;
    let hello = match msg {
        Msg::Hello(hello) => hello,
        Msg::Failure(f) => return Err(AgentFailure::from_report(f, &limits).into()),
        other => {
            return Err(ProtocolError::Unexpected {
                phase: Phase::Hello,
                expected: "Hello",
                got: kind_of(&other),
            }
            .into())
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            got: hello.protocol_version,
            want: PROTOCOL_VERSION,
        }
        .into());
    }
    if hello.agent_version.len() > limits.max_agent_version_bytes {
        return Err(LimitExceeded {
            limit: Limit::AgentVersionBytes,
            value: hello.agent_version.len() as u64,
            max: limits.max_agent_version_bytes as u64,
            at: None,
        }
        .into());
    }
    Ok(Greeted {
        conn,
        limits,
        hello: AgentHello {
            agent_version: hello.agent_version,
            timings: hello.timings,
        },
    })
}

/// The agent has said Hello and waits for its job.
pub struct Greeted<S> {
    conn: Connection<S>,
    limits: SessionLimits,
    hello: AgentHello,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Greeted<S> {
    /// What the agent said about itself.
    pub fn hello(&self) -> &AgentHello {
        &self.hello
    }

    /// Hands the job over. The wall-clock limit starts now, and already covers the send
    /// (a guest that does not read cannot stall the host).
    pub async fn send_job(mut self, job: Job) -> Result<Running<S>, Error> {
        let started = Instant::now();
        let outputs = job.outputs.clone();
        let job_limits = job.limits;
        let msg = HostMessage {
            msg: Some(host_message::Msg::Job(job)),
        };
        let wall = self.limits.wall;
        let send = self.conn.send(&msg);
        let sent = match wall {
            Some(wall) => tokio::time::timeout_at(after(started, wall), send)
                .await
                .map_err(|_elapsed| {
                    Error::from(Timeout {
                        which: DeadlineKind::Wall,
                        after: wall,
                    })
                })?,
            None => send.await,
        };
        sent.map_err(|e| {
            from_connection(
                Phase::Job,
                e,
                Timeout {
                    which: DeadlineKind::Wall,
                    after: wall.unwrap_or_default(),
                },
            )
        })?;
        Ok(Running {
            conn: self.conn,
            tail: LogTail::new(self.limits.log_tail_bytes),
            limits: self.limits,
            job_limits,
            outputs,
            started,
        })
    }
}

/// The command runs in the guest.
pub struct Running<S> {
    conn: Connection<S>,
    limits: SessionLimits,
    /// The Job's limits, which bound the guest's figures.
    job_limits: Option<Limits>,
    outputs: Vec<String>,
    started: Instant,
    tail: LogTail,
}

/// How the command ended, validated. Only [`Running::run`] makes one (outside this crate
/// it cannot be built), and [`Running::harvest`] asks for it, so outputs are read only
/// after the exit.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExitStatus {
    pub kind: ExitKind,
    /// Whether the kernel's OOM killer acted in the build's cgroup.
    pub oom_killed: bool,
    /// The command's run time as the guest measured it (informational).
    pub duration: Duration,
    /// What the guest says the build used, bounded (see [`super::usage`]).
    pub usage: GuestUsage,
}

impl ExitStatus {
    /// Success is exit code 0, whatever else happened on the way (an OOM kill of some
    /// helper process the build survived does not fail it).
    pub fn check(&self) -> Result<(), super::error::BuildFailure> {
        use super::error::BuildFailure;
        match self.kind {
            ExitKind::Code(0) => Ok(()),
            kind if self.oom_killed => Err(BuildFailure::OutOfMemory(kind)),
            ExitKind::Code(c) => Err(BuildFailure::ExitCode(c)),
            ExitKind::Signal(s) => Err(BuildFailure::Signal(s)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Running<S> {
    /// Forwards the build log to `sink` until the command exits, and returns how it exited
    /// (a failed command is `Ok` here; see [`ExitStatus::check`]).
    ///
    /// Ends with an error when the guest stays silent longer than `limits.silence`, the
    /// build outlives `limits.wall` (counted from the job's hand-over), the log outgrows
    /// `limits.max_log_bytes`, the agent reports a failure, or the guest breaks protocol.
    /// The log tail stays available through [`Running::log_tail`] in every case.
    pub async fn run(&mut self, sink: &mut dyn LogSink) -> Result<ExitStatus, Error> {
        let wall = self
            .limits
            .wall
            .map(|limit| (after(self.started, limit), DeadlineKind::Wall, limit));
        loop {
            let silence = self
                .limits
                .silence
                .map(|limit| (after(Instant::now(), limit), DeadlineKind::Silence, limit));
            // The earlier deadline wins; on a tie the wall clock, the harder limit.
            let deadline = match (wall, silence) {
                (Some(w), Some(s)) => Some(if s.0 < w.0 { s } else { w }),
                (w, s) => w.or(s),
            };
            let step = self.step(sink);
            let outcome = match deadline {
                Some((at, which, after)) => tokio::time::timeout_at(at, step)
                    .await
                    .map_err(|_elapsed| Error::from(Timeout { which, after }))?,
                None => step.await,
            };
            if let Some(status) = outcome? {
                return Ok(status);
            }
        }
    }

    /// One message while the command runs: a Log (forwarded, `None`) or the exit.
    async fn step(&mut self, sink: &mut dyn LogSink) -> Result<Option<ExitStatus>, Error> {
        let msg = self.conn.recv().await.map_err(|e| {
            // recv itself has no deadline; `run` turns an elapsed deadline into its error.
            from_connection(
                Phase::Run,
                e,
                Timeout {
                    which: DeadlineKind::Wall,
                    after: Duration::ZERO,
                },
            )
        })?;
        match msg {
            Msg::Log(log) => {
                let chunk = self.log(log)?;
                sink.send(chunk).await;
                Ok(None)
            }
            Msg::Exited(exited) => {
                let bounds = UsageBounds::new(self.started.elapsed(), self.job_limits.as_ref());
                Ok(Some(exit_status(exited, bounds)?))
            }
            Msg::Failure(f) => Err(AgentFailure::from_report(f, &self.limits).into()),
            other => Err(ProtocolError::Unexpected {
                phase: Phase::Run,
                expected: "Log or Exited",
                got: kind_of(&other),
            }
            .into()),
        }
    }

    fn log(&mut self, log: Log) -> Result<LogChunk, Error> {
        let stream = match Stream::try_from(log.stream) {
            Ok(Stream::Stdout) => LogStream::Stdout,
            Ok(Stream::Stderr) => LogStream::Stderr,
            Ok(Stream::Unspecified) | Err(_) => {
                return Err(ProtocolError::LogStream(log.stream).into())
            }
        };
        self.tail.push(&log.data);
        let total = self.tail.total_bytes();
        if total > self.limits.max_log_bytes {
            return Err(LimitExceeded {
                limit: Limit::LogBytes,
                value: total,
                max: self.limits.max_log_bytes,
                at: None,
            }
            .into());
        }
        Ok(LogChunk {
            stream,
            data: Bytes::from(log.data),
        })
    }

    /// The end of the build log so far, and how much there was.
    pub fn log_tail(&self) -> &LogTail {
        &self.tail
    }

    /// The job's output paths, in the order the guest sends them.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Receives every output and stores it in the castore, scanning it for `needles` (see
    /// [`super::harvest`] for what is checked). One entry per `Job.outputs`, in order: the
    /// output's root node and the needles it holds, or `None` if the guest reported it
    /// missing. Nothing of a failed harvest becomes visible in `dirs`.
    pub async fn harvest(
        mut self,
        _exited: &ExitStatus,
        blobs: &dyn BlobService,
        dirs: &dyn DirectoryService,
        limits: &HarvestLimits,
        needles: &Scanner,
    ) -> Result<Vec<Option<HarvestedOutput>>, Error> {
        harvest::harvest(
            &mut self.conn,
            &self.outputs,
            &self.limits,
            blobs,
            dirs,
            limits,
            needles,
        )
        .await
    }
}

/// `start + limit`, or a time a century away if that does not fit: an operator may write
/// "no limit" as a huge duration, and adding it must not panic.
fn after(start: Instant, limit: Duration) -> Instant {
    start
        .checked_add(limit)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

fn exit_status(exited: Exited, bounds: UsageBounds) -> Result<ExitStatus, ProtocolError> {
    let kind = match exited.status {
        None => return Err(ProtocolError::ExitStatusMissing),
        Some(exited::Status::Code(c)) => {
            ExitKind::Code(u8::try_from(c).map_err(|_| ProtocolError::ExitCodeOutOfRange(c))?)
        }
        Some(exited::Status::Signal(s)) => ExitKind::Signal(
            u8::try_from(s)
                .ok()
                .filter(|s| (1..=64).contains(s))
                .ok_or(ProtocolError::SignalOutOfRange(s))?,
        ),
    };
    Ok(ExitStatus {
        kind,
        oom_killed: exited.oom_killed,
        duration: Duration::from_micros(exited.duration_us),
        usage: GuestUsage::bounded(exited.usage, bounds),
    })
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
