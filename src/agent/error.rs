//! What can go wrong talking to the guest agent, sorted by whose fault it is.
//!
//! - [`BuildFailure`]: the build ran and failed (exit code, signal, OOM kill).
//! - [`Timeout`]: a deadline fired; says which and after how long.
//! - [`LimitExceeded`]: the guest sent more than a configured bound allows.
//! - [`AgentFailure`]: the agent reported that it could not do its part.
//! - [`ProtocolError`]: the guest broke the protocol.
//! - [`InfraError`]: the host side failed (socket I/O, castore).
//!
//! [`Error::class`] folds these into the three classes a client cares about.

use super::connection::ConnectionError;
use crate::castore;
use std::fmt;
use std::time::Duration;
use tvix_build_vm_agent::frame::FrameError;

/// Everything a [`super::Session`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a `#[source]`: the message already names the failure, and an error chain would
    /// name it twice.
    #[error("the build failed: {0}")]
    Build(BuildFailure),
    #[error(transparent)]
    Timeout(#[from] Timeout),
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    #[error(transparent)]
    Agent(#[from] AgentFailure),
    #[error("the guest broke the agent protocol")]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Infra(#[from] InfraError),
}

impl From<BuildFailure> for Error {
    fn from(failure: BuildFailure) -> Self {
        Error::Build(failure)
    }
}

/// Whose fault an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The build itself failed: it exited unsuccessfully, was killed, ran out of memory, or
    /// ran longer or stayed silent longer than allowed.
    BuildFailed,
    /// The guest did something the protocol or a limit forbids (a hostile or broken guest).
    GuestMisbehaved,
    /// The host side failed, or the guest never got far enough to be judged.
    Infrastructure,
}

impl Error {
    /// Folds the error into a class. Wall-clock and silence timeouts count as the build's
    /// failure (the command ran too long); a missing Hello or a harvest that takes too long
    /// count as infrastructure (boot and transfer speed are the host's business). An
    /// [`AgentFailure`] counts as infrastructure too, though its text comes from the guest.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Build(_) => ErrorClass::BuildFailed,
            Error::Timeout(t) => match t.which {
                DeadlineKind::Wall | DeadlineKind::Silence => ErrorClass::BuildFailed,
                DeadlineKind::Hello | DeadlineKind::Harvest => ErrorClass::Infrastructure,
            },
            Error::Limit(_) | Error::Protocol(_) => ErrorClass::GuestMisbehaved,
            Error::Agent(_) | Error::Infra(_) => ErrorClass::Infrastructure,
        }
    }
}

/// What the session was doing, for errors that can happen at any point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Hello,
    Job,
    Run,
    Harvest,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Hello => "waiting for the agent's Hello",
            Phase::Job => "sending the job",
            Phase::Run => "while the command ran",
            Phase::Harvest => "receiving the outputs",
        })
    }
}

/// How the command ended, as validated from the guest's `Exited`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited with this code (0..=255).
    Code(u8),
    /// Killed by this signal (1..=64).
    Signal(u8),
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exited with code {c}"),
            ExitKind::Signal(s) => write!(f, "was killed by signal {s}"),
        }
    }
}

/// The build command did not succeed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildFailure {
    #[error("the command exited with code {0}")]
    ExitCode(u8),
    #[error("the command was killed by signal {0}")]
    Signal(u8),
    #[error("the build ran out of memory: the kernel's OOM killer acted in the build's cgroup, and the command {0}")]
    OutOfMemory(ExitKind),
}

/// Which deadline fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadlineKind {
    /// The agent did not say Hello in time after the VM started.
    Hello,
    /// The command produced no log output for too long.
    Silence,
    /// The command ran longer than its wall-clock limit.
    Wall,
    /// The outputs did not arrive in time.
    Harvest,
}

/// A deadline fired.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}", match .which {
    DeadlineKind::Hello => format!("the guest agent did not say Hello within {:?}", .after),
    DeadlineKind::Silence => format!("the build produced no log output for {:?} (silence limit)", .after),
    DeadlineKind::Wall => format!("the build exceeded its wall-clock limit of {:?}", .after),
    DeadlineKind::Harvest => format!("the outputs did not arrive within {:?}", .after),
})]
pub struct Timeout {
    pub which: DeadlineKind,
    /// The configured limit that ran out.
    pub after: Duration,
}

/// Which configured bound was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    AgentVersionBytes,
    LogBytes,
    OutputBytes,
    Entries,
    Depth,
    NameBytes,
    MetadataBytes,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::AgentVersionBytes => "agent version length in bytes",
            Limit::LogBytes => "build log size in bytes",
            Limit::OutputBytes => "total output size in bytes",
            Limit::Entries => "number of output entries",
            Limit::Depth => "output directory depth",
            Limit::NameBytes => "entry name length in bytes",
            Limit::MetadataBytes => "total size of entry names and symlink targets in bytes",
        })
    }
}

/// The guest sent more than a configured bound allows.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{limit} reached {value}, over the limit of {max}{}", .at.as_ref().map(|l| format!(" ({l})")).unwrap_or_default())]
pub struct LimitExceeded {
    pub limit: Limit,
    /// The value that was refused (at least this much).
    pub value: u64,
    pub max: u64,
    /// Where in the outputs, for harvest limits.
    pub at: Option<Box<Location>>,
}

/// The guest agent reported its own failure. Both fields are guest text, cut to the
/// configured lengths.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the guest agent failed at {phase:?}: {message:?}")]
pub struct AgentFailure {
    pub phase: String,
    pub message: String,
}

impl AgentFailure {
    /// The agent's own failure report, its texts cut to the configured lengths.
    pub(crate) fn from_report(
        report: tvix_build_vm_agent::proto::AgentFailure,
        limits: &super::limits::SessionLimits,
    ) -> Self {
        AgentFailure {
            phase: cut(&report.phase, limits.max_failure_phase_bytes).to_owned(),
            message: cut(&report.message, limits.max_failure_message_bytes).to_owned(),
        }
    }
}

/// A place inside the outputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index into `Job.outputs`.
    pub index: u32,
    /// The output's path in the guest, as the host sent it in the job.
    pub output: String,
    /// The path inside the output, components joined by `/`, non-UTF-8 bytes replaced;
    /// empty for the output's root.
    pub path: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "output {} {:?}", self.index, self.output)?;
        if !self.path.is_empty() {
            write!(f, " at {:?}", self.path)?;
        }
        Ok(())
    }
}

/// The guest broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid frame {phase}")]
    Frame {
        phase: Phase,
        #[source]
        source: FrameError,
    },
    #[error("a frame without a message {phase}")]
    Empty { phase: Phase },
    #[error("the guest closed the connection{} {phase}", if *.mid_frame { " inside a frame" } else { "" })]
    Closed { phase: Phase, mid_frame: bool },
    #[error("expected {expected} {phase}, got {got}")]
    Unexpected {
        phase: Phase,
        expected: &'static str,
        got: &'static str,
    },
    #[error("the agent speaks protocol version {got}, the host only version {want}")]
    Version { got: u32, want: u32 },
    #[error("Exited carries neither an exit code nor a signal")]
    ExitStatusMissing,
    #[error("exit code {0} is outside 0..=255")]
    ExitCodeOutOfRange(i32),
    #[error("signal {0} is outside 1..=64")]
    SignalOutOfRange(i32),
    #[error("Log names stream {0}, which is neither stdout nor stderr")]
    LogStream(i32),
    #[error("expected OutputStart for output {expected}, got one for output {got}")]
    OutputOrder { expected: u32, got: u32 },
    #[error("{at}")]
    Tree {
        at: Box<Location>,
        #[source]
        violation: TreeViolation,
    },
}

/// What is wrong with an output tree the guest sent.
#[derive(Debug, thiserror::Error)]
pub enum TreeViolation {
    #[error("the root entry of an output has the name {0:?}; it must be empty")]
    NamedRoot(String),
    #[error("entry name {name:?} is invalid")]
    InvalidName {
        name: String,
        #[source]
        source: castore::directory::NameError,
    },
    #[error("entry {name:?} comes after {previous:?}; names must be strictly increasing")]
    NotSorted { name: String, previous: String },
    #[error("entry {0:?} appears twice")]
    Duplicate(String),
    #[error("symlink target {target:?} is invalid")]
    InvalidSymlinkTarget {
        target: String,
        #[source]
        source: castore::directory::SymlinkTargetError,
    },
    #[error("entry {name:?} does not fit into its directory")]
    Insert {
        name: String,
        #[source]
        source: castore::directory::ValidationError,
    },
    #[error("entry kind {0} is not file, directory or symlink")]
    UnknownKind(i32),
    #[error("a {kind} entry must not set {field}")]
    StrayField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("file announced {announced} bytes, but more arrived")]
    FileTooLong { announced: u64 },
    #[error("file announced {announced} bytes, but {got} came after {received}")]
    FileTooShort {
        announced: u64,
        received: u64,
        got: &'static str,
    },
    #[error("a FileChunk without data")]
    EmptyChunk,
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// The host side failed.
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    #[error("I/O on the agent connection {phase}")]
    Io {
        phase: Phase,
        #[source]
        source: std::io::Error,
    },
    #[error("the job cannot be sent")]
    EncodeJob(#[source] FrameError),
    #[error("castore: {what}{}", .at.as_ref().map(|l| format!(" ({l})")).unwrap_or_default())]
    Castore {
        what: &'static str,
        at: Option<Box<Location>>,
        #[source]
        source: Box<castore::Error>,
    },
    #[error(
        "castore: the directory upload of {at} reports root {root}, the host computed {expected}"
    )]
    PutterRoot {
        at: Box<Location>,
        expected: castore::B3Digest,
        root: castore::B3Digest,
    },
    /// The harvest deadline fired while the host waited on the castore, not on the guest.
    #[error("castore: {what} did not finish before the harvest deadline of {after:?}: the castore stalls")]
    CastoreStalled { what: &'static str, after: Duration },
    #[error("castore: writing a blob ({at})")]
    BlobWrite {
        at: Box<Location>,
        #[source]
        source: std::io::Error,
    },
}

/// Maps a connection error to the session taxonomy. `deadline` is the timeout to report if
/// the connection gave up on a deadline.
pub(crate) fn from_connection(phase: Phase, err: ConnectionError, deadline: Timeout) -> Error {
    match err {
        ConnectionError::Frame(source) => ProtocolError::Frame { phase, source }.into(),
        ConnectionError::Empty => ProtocolError::Empty { phase }.into(),
        ConnectionError::Closed { mid_frame } => ProtocolError::Closed { phase, mid_frame }.into(),
        ConnectionError::Io(source) => InfraError::Io { phase, source }.into(),
        ConnectionError::Encode(source) => InfraError::EncodeJob(source).into(),
        ConnectionError::Deadline => deadline.into(),
    }
}

/// Guest bytes as text for an error message: invalid UTF-8 replaced, cut to `max` bytes
/// (on a character boundary) so a hostile name cannot bloat every log line.
pub(crate) fn show_bytes(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(bytes);
    cut(&s, max).to_owned()
}

/// `s` cut to at most `max` bytes on a character boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_respects_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
        assert_eq!(show_bytes(b"a\xffb", 100), "a\u{fffd}b");
    }

    #[test]
    fn classes_follow_whose_fault_it_is() {
        let t = |which| {
            Error::from(Timeout {
                which,
                after: Duration::from_secs(1),
            })
            .class()
        };
        assert_eq!(t(DeadlineKind::Wall), ErrorClass::BuildFailed);
        assert_eq!(t(DeadlineKind::Silence), ErrorClass::BuildFailed);
        assert_eq!(t(DeadlineKind::Hello), ErrorClass::Infrastructure);
        assert_eq!(
            Error::from(ProtocolError::ExitStatusMissing).class(),
            ErrorClass::GuestMisbehaved
        );
        assert_eq!(
            Error::from(BuildFailure::ExitCode(1)).class(),
            ErrorClass::BuildFailed
        );
    }

    #[test]
    fn a_build_failure_is_named_once_in_the_error_chain() {
        let e = Error::from(BuildFailure::ExitCode(3));
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(
            format!("{:#}", anyhow::Error::from(e)),
            "the build failed: the command exited with code 3"
        );
    }

    #[test]
    fn messages_name_the_deadline_and_the_limit() {
        let silence = Timeout {
            which: DeadlineKind::Silence,
            after: Duration::from_secs(30),
        };
        assert!(silence.to_string().contains("no log output for 30s"));
        let limit = LimitExceeded {
            limit: Limit::Depth,
            value: 5,
            max: 4,
            at: Some(Box::new(Location {
                index: 1,
                output: "/nix/store/x".into(),
                path: "a/b".into(),
            })),
        };
        assert_eq!(
            limit.to_string(),
            "output directory depth reached 5, over the limit of 4 (output 1 \"/nix/store/x\" at \"a/b\")"
        );
    }
}
