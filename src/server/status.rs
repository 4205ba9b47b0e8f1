//! How a served build that did not produce a Build reaches the client: one place that maps
//! every way a build can end to a gRPC status code and message.
//!
//! | code                  | when                                                         |
//! |-----------------------|--------------------------------------------------------------|
//! | `INVALID_ARGUMENT`    | the request breaks the wire contract; the message names the field |
//! | `FAILED_PRECONDITION` | it cannot run on this host: an unsatisfiable constraint (system, memory, a read-only path, /dev/kvm, network, /bin/sh) or an input missing from the castore |
//! | `UNAUTHENTICATED`     | (any RPC) a bearer token not in the tokens file, a malformed `authorization`, or no proof at all under `--require-auth` |
//! | `RESOURCE_EXHAUSTED`  | the build queue (the host's or the tenant's) is full; retry later or elsewhere; (castore uploads) the tenant's upload quota would be crossed, the message names the limit and when it resets |
//! | `ABORTED`             | the build ran and failed: exit code, signal, OOM kill, a missing output, or the guest broke a limit or the protocol; retrying will not help |
//! | `DEADLINE_EXCEEDED`   | the build's wall-clock or silence limit fired; the message says which and carries the partial log |
//! | `UNAVAILABLE`         | our side could not run it right now (the VM did not start or boot, a helper died, the service is shutting down); retrying may help |
//! | `INTERNAL`            | our side failed otherwise (castore, runtime directory, a bug) |
//!
//! Every failure after admission names the build id, and, when the build log was stored,
//! its blob (`b3:...`), also in the `x-tvix-build-vm-build-id` and
//! `x-tvix-build-vm-log-digest` metadata. Build failures carry the end of the log.

use super::admission::QueueFull;
use super::quota::OverQuota;
use super::tenant::AuthError;
use crate::agent::LogRef;
use crate::castore::blob::floor::BelowFloor;
use crate::metrics::BuildResult;
use crate::provenance::attest::AttestError;
use crate::request::ValidationError;
use crate::runner::{Fault, RunError, Unsatisfiable};
use std::fmt::Write;
use tonic::Code;

/// At most this much of an error's text goes into a status message (a header): the full
/// log is in the castore.
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// Metadata key of the build id.
pub const BUILD_ID_KEY: &str = "x-tvix-build-vm-build-id";
/// Metadata key of the log blob's digest.
pub const LOG_DIGEST_KEY: &str = "x-tvix-build-vm-log-digest";

/// Why a request did not produce a Build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Unsatisfiable(#[from] Unsatisfiable),
    #[error(transparent)]
    QueueFull(#[from] QueueFull),
    #[error(transparent)]
    NoSpace(#[from] BelowFloor),
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error("build {id}: {error}")]
    Run {
        id: String,
        #[source]
        error: RunError,
        log: Option<LogRef>,
    },
    #[error("build {id}: the service stopped before the build finished")]
    Cancelled { id: String },
    #[error("build {id}: the build task failed: {reason}")]
    Task { id: String, reason: String },
    #[error("build {id}: signing its provenance: {error}")]
    Attest {
        id: String,
        #[source]
        error: AttestError,
        log: Option<LogRef>,
    },
}

impl BuildError {
    /// The status code; see the module documentation.
    pub fn code(&self) -> Code {
        match self {
            BuildError::Invalid(_) => Code::InvalidArgument,
            BuildError::Unsatisfiable(_) => Code::FailedPrecondition,
            BuildError::QueueFull(_) | BuildError::NoSpace(_) => Code::ResourceExhausted,
            BuildError::ShuttingDown | BuildError::Cancelled { .. } => Code::Unavailable,
            BuildError::Task { .. } | BuildError::Attest { .. } => Code::Internal,
            BuildError::Run { error, .. } => run_error_code(error),
        }
    }

    /// How the metrics count it.
    pub fn result(&self) -> BuildResult {
        match self {
            BuildError::Invalid(_)
            | BuildError::Unsatisfiable(_)
            | BuildError::QueueFull(_)
            | BuildError::NoSpace(_)
            | BuildError::ShuttingDown => BuildResult::Refused,
            BuildError::Cancelled { .. } => BuildResult::Cancelled,
            BuildError::Task { .. } | BuildError::Attest { .. } => BuildResult::InternalError,
            BuildError::Run { error, .. } => match error.fault() {
                Fault::Precondition => BuildResult::Refused,
                Fault::Build if error.is_timeout() => BuildResult::Timeout,
                Fault::Build => BuildResult::Failed,
                Fault::Guest => BuildResult::GuestError,
                Fault::Infrastructure => BuildResult::InternalError,
            },
        }
    }

    fn build_id(&self) -> Option<&str> {
        match self {
            BuildError::Run { id, .. }
            | BuildError::Attest { id, .. }
            | BuildError::Cancelled { id }
            | BuildError::Task { id, .. } => Some(id),
            _ => None,
        }
    }

    fn log(&self) -> Option<&LogRef> {
        match self {
            BuildError::Run { log, .. } | BuildError::Attest { log, .. } => log.as_ref(),
            _ => None,
        }
    }
}

fn run_error_code(error: &RunError) -> Code {
    match error.fault() {
        Fault::Precondition => Code::FailedPrecondition,
        Fault::Build if error.is_timeout() => Code::DeadlineExceeded,
        Fault::Build | Fault::Guest => Code::Aborted,
        Fault::Infrastructure => match error {
            RunError::Launch(_)
            | RunError::BootTimeout { .. }
            | RunError::VmDied { .. }
            | RunError::HelperDied { .. }
            | RunError::FsDaemon { .. }
            // A castore that stalls is a passing condition of the host: worth a retry.
            | RunError::CastoreStalled { .. } => Code::Unavailable,
            _ => Code::Internal,
        },
    }
}

/// The error and its causes, each once (some messages already include their source).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            let _ = write!(text, ": {part}");
        }
        source = s.source();
    }
    text
}

/// Cuts `text` to at most `max` bytes, keeping its start and its end (the log tail is at the
/// end), on character boundaries.
fn bounded(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let half = max / 2;
    let mut head_end = half;
    while !text.is_char_boundary(head_end) {
        head_end -= 1;
    }
    let mut tail_start = text.len() - half;
    while !text.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!(
        "{}\n[... {} bytes cut ...]\n{}",
        &text[..head_end],
        tail_start - head_end,
        &text[tail_start..]
    )
}

impl From<AuthError> for tonic::Status {
    fn from(e: AuthError) -> Self {
        tonic::Status::unauthenticated(e.to_string())
    }
}

impl From<OverQuota> for tonic::Status {
    fn from(e: OverQuota) -> Self {
        tonic::Status::resource_exhausted(e.to_string())
    }
}

impl From<BuildError> for tonic::Status {
    fn from(e: BuildError) -> Self {
        let mut message = chain(&e);
        if let BuildError::Run { error, .. } = &e {
            if let Some(tail) = error.log_tail().filter(|t| !t.is_empty()) {
                let _ = write!(
                    message,
                    "\n--- build log (last {} bytes) ---\n{tail}",
                    tail.len()
                );
            }
            if let Some(problems) = error.fs_daemon_problems() {
                let _ = write!(message, "\n--- the inputs' fs-daemon ---\n{problems}");
            }
            if let Some(tail) = error.serial_tail().filter(|t| !t.is_empty()) {
                let _ = write!(message, "\n--- serial console ---\n{tail}");
            }
        }
        if let Some(log) = e.log() {
            let _ = write!(
                message,
                "\n(full build log: blob {}, {} bytes{})",
                log.digest,
                log.size,
                if log.truncated { ", truncated" } else { "" }
            );
        }
        let mut status = tonic::Status::new(e.code(), bounded(message, MAX_MESSAGE_BYTES));
        if let Some(id) = e.build_id() {
            if let Ok(v) = id.parse() {
                status.metadata_mut().insert(BUILD_ID_KEY, v);
            }
        }
        if let Some(log) = e.log() {
            if let Ok(v) = log.digest.to_string().parse() {
                status.metadata_mut().insert(LOG_DIGEST_KEY, v);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent;
    use crate::agent::error::{BuildFailure, DeadlineKind, Timeout};
    use crate::castore::B3Digest;
    use crate::runner::SessionFailure;
    use std::time::Duration;

    fn run(error: RunError) -> BuildError {
        BuildError::Run {
            id: "b1".into(),
            error,
            log: Some(LogRef {
                digest: B3Digest::of(b"log"),
                size: 3,
                truncated: false,
            }),
        }
    }

    fn session(error: agent::Error) -> RunError {
        RunError::Session(Box::new(SessionFailure {
            error,
            log_tail: "last words\n".into(),
            serial_tail: String::new(),
            fs_daemon_problems: String::new(),
        }))
    }

    #[test]
    fn codes() {
        let invalid = BuildError::Invalid(ValidationError {
            field: "outputs[1]".into(),
            reason: "not sorted".into(),
        });
        let s = tonic::Status::from(invalid);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("outputs[1]"));

        let unsat = BuildError::Unsatisfiable(Unsatisfiable::System {
            system: "aarch64-linux".into(),
            offered: vec!["x86_64-linux".into()],
        });
        assert_eq!(unsat.code(), Code::FailedPrecondition);
        assert_eq!(unsat.result(), BuildResult::Refused);

        let failed = run(session(agent::Error::Build(BuildFailure::ExitCode(42))));
        assert_eq!(failed.code(), Code::Aborted);
        assert_eq!(failed.result(), BuildResult::Failed);
        let s = tonic::Status::from(failed);
        assert!(s.message().contains("build b1"), "{}", s.message());
        assert!(
            s.message().contains("exited with code 42"),
            "{}",
            s.message()
        );
        assert!(s.message().contains("last words"), "{}", s.message());
        assert!(s.message().contains(&B3Digest::of(b"log").to_string()));
        assert_eq!(s.metadata().get(BUILD_ID_KEY).unwrap(), "b1");
        assert!(s.metadata().get(LOG_DIGEST_KEY).is_some());

        let wall = run(session(agent::Error::Timeout(Timeout {
            which: DeadlineKind::Wall,
            after: Duration::from_secs(5),
        })));
        assert_eq!(wall.code(), Code::DeadlineExceeded);
        assert_eq!(wall.result(), BuildResult::Timeout);
        assert!(tonic::Status::from(wall)
            .message()
            .contains("wall-clock limit"));

        let boot = run(RunError::BootTimeout {
            after: Duration::from_secs(30),
            serial_tail: String::new(),
        });
        assert_eq!(boot.code(), Code::Unavailable);
        assert_eq!(boot.result(), BuildResult::InternalError);

        let stalled = run(RunError::CastoreStalled {
            what: "resolving the inputs",
            after: Duration::from_secs(60),
        });
        assert_eq!(stalled.code(), Code::Unavailable);

        // Our end of the agent's connection failing is our fault and not worth a retry.
        let vsock = run(RunError::Vsock {
            what: "accepting the agent's connection",
            source: crate::vm::vsock::VsockError::ForeignPeer {
                path: "/run/b1/vsock.sock_1024".into(),
                uid: 1000,
                expected: 0,
            },
        });
        assert_eq!(vsock.code(), Code::Internal);
        assert_eq!(vsock.result(), BuildResult::InternalError);
        let message = tonic::Status::from(vsock).message().to_owned();
        assert!(
            message.contains("accepting the agent's connection: connection on /run/b1/vsock.sock_1024 from uid 1000"),
            "{message}"
        );

        assert_eq!(
            BuildError::QueueFull(QueueFull::Host {
                running: 1,
                queued: 0,
                max_queued: 0
            })
            .code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            BuildError::Unsatisfiable(Unsatisfiable::Network).code(),
            Code::FailedPrecondition
        );
        assert_eq!(BuildError::ShuttingDown.code(), Code::Unavailable);
        assert_eq!(
            tonic::Status::from(AuthError::UnknownToken).code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn long_messages_keep_both_ends() {
        let text = format!("start{}end", "é".repeat(10_000));
        let cut = bounded(text, 100);
        assert!(cut.len() < 200);
        assert!(cut.starts_with("start") && cut.ends_with("end"));
    }
}
