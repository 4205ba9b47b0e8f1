//! How a build can end other than with a Build, sorted by whose fault it is, so that the
//! CLI's exit code, the gRPC status and the metrics all tell the same story.

use super::runtime_dir::RuntimeDirError;
use crate::agent;
use crate::castore::{self, B3Digest};
use crate::refscan::RefscanError;
use crate::vm::vsock::VsockError;
use crate::vm::{LaunchError, SpecError, VmStatus};
use std::time::Duration;

/// Whose fault a [`RunError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request cannot run here (missing inputs; its constraints are the host
    /// policy's, decided before a build starts).
    Precondition,
    /// The build ran and failed: exit code, signal, OOM, missing output, wall or silence
    /// deadline.
    Build,
    /// The guest broke the protocol or a limit.
    Guest,
    /// Our side failed: VMM, helpers, castore, boot.
    Infrastructure,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the castore did not answer within {after:?} while {what}: it stalls")]
    CastoreStalled { what: &'static str, after: Duration },
    #[error("input {name} ({digest}) is not in the castore")]
    MissingInput { name: String, digest: B3Digest },
    #[error("input {name} declares {declared} bytes, but its blob {digest} has {real}")]
    InputSize {
        name: String,
        digest: B3Digest,
        declared: u64,
        real: u64,
    },
    #[error("resolving input {name}")]
    ResolveInput {
        name: String,
        #[source]
        source: castore::Error,
    },
    #[error("runtime directory")]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("{what}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The host end of the agent's vsock connection failed (binding it, or accepting on it
    /// other than by the boot deadline passing, which is [`RunError::BootTimeout`]).
    #[error("{what}")]
    Vsock {
        what: &'static str,
        #[source]
        source: VsockError,
    },
    #[error("the virtio-fs daemon failed to start: {reason}")]
    FsDaemon { reason: String, log_tail: String },
    #[error("invalid VM configuration")]
    Spec(#[from] SpecError),
    #[error("starting the VM")]
    Launch(#[from] LaunchError),
    #[error("the VM ended before the build did while {during}: {status}")]
    VmDied {
        status: VmStatus,
        during: &'static str,
        serial_tail: String,
    },
    #[error("the {helper} died during the build ({status})")]
    HelperDied {
        helper: String,
        status: String,
        serial_tail: String,
    },
    #[error("the guest did not connect within {after:?} of starting")]
    BootTimeout {
        after: Duration,
        serial_tail: String,
    },
    #[error(transparent)]
    Session(Box<SessionFailure>),
    #[error("output {output} was not produced")]
    OutputMissing { output: String, log_tail: String },
    #[error("storing the build's result")]
    Store(#[source] castore::Error),
    #[error(transparent)]
    Refscan(#[from] RefscanError),
}

impl RunError {
    pub fn fault(&self) -> Fault {
        match self {
            RunError::MissingInput { .. } | RunError::InputSize { .. } => Fault::Precondition,
            RunError::OutputMissing { .. } => Fault::Build,
            RunError::Session(f) => match f.error.class() {
                agent::ErrorClass::BuildFailed => Fault::Build,
                agent::ErrorClass::GuestMisbehaved => Fault::Guest,
                agent::ErrorClass::Infrastructure => Fault::Infrastructure,
            },
            RunError::ResolveInput { .. }
            | RunError::CastoreStalled { .. }
            | RunError::RuntimeDir(_)
            | RunError::Setup { .. }
            | RunError::Vsock { .. }
            | RunError::FsDaemon { .. }
            | RunError::Spec(_)
            | RunError::Launch(_)
            | RunError::VmDied { .. }
            | RunError::HelperDied { .. }
            | RunError::BootTimeout { .. }
            | RunError::Store(_)
            | RunError::Refscan(_) => Fault::Infrastructure,
        }
    }

    /// Whether a deadline (boot, wall, silence, harvest) ended the build.
    pub fn is_timeout(&self) -> bool {
        match self {
            RunError::BootTimeout { .. } => true,
            RunError::Session(f) => matches!(f.error, agent::Error::Timeout(_)),
            _ => false,
        }
    }
}

impl RunError {
    /// The end of the build log, where the build got far enough to have one.
    pub fn log_tail(&self) -> Option<&str> {
        match self {
            RunError::Session(f) => Some(&f.log_tail),
            RunError::OutputMissing { log_tail, .. } | RunError::FsDaemon { log_tail, .. } => {
                Some(log_tail)
            }
            _ => None,
        }
    }

    /// What the inputs' fs-daemon logged as warnings or errors while the build ran: a
    /// build that failed reading an input (EIO in the guest) learns the cause here.
    pub fn fs_daemon_problems(&self) -> Option<&str> {
        match self {
            RunError::Session(f) if !f.fs_daemon_problems.is_empty() => Some(&f.fs_daemon_problems),
            _ => None,
        }
    }

    /// The end of the VM's serial console, where it tells something about the failure.
    pub fn serial_tail(&self) -> Option<&str> {
        match self {
            RunError::Session(f) if f.error.class() != agent::ErrorClass::BuildFailed => {
                Some(&f.serial_tail)
            }
            RunError::VmDied { serial_tail, .. }
            | RunError::HelperDied { serial_tail, .. }
            | RunError::BootTimeout { serial_tail, .. } => Some(serial_tail),
            _ => None,
        }
    }
}

/// A failure of the conversation with the guest agent (including the build's own failure),
/// with what the host saw of the build and the VM. Displays as, and has the sources of, the
/// agent error it carries, so an error chain names each cause once.
#[derive(Debug)]
pub struct SessionFailure {
    pub error: agent::Error,
    pub log_tail: String,
    pub serial_tail: String,
    /// What the inputs' fs-daemon logged as warnings or errors (see
    /// [`RunError::fs_daemon_problems`]); usually empty.
    pub fs_daemon_problems: String,
}

impl std::fmt::Display for SessionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SessionFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::vsock::HostListener;
    use std::error::Error as _;

    /// A vsock listener that cannot be bound: the second one on the same path.
    fn bind_error() -> VsockError {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vsock.sock");
        let _first = HostListener::bind(&socket, 1024).expect("the first bind");
        HostListener::bind(&socket, 1024).expect_err("the path is taken")
    }

    #[tokio::test]
    async fn a_vsock_failure_stays_typed_and_is_ours() {
        let error = RunError::Vsock {
            what: "binding the agent's vsock listener",
            source: bind_error(),
        };
        assert_eq!(error.fault(), Fault::Infrastructure);
        assert!(!error.is_timeout());
        let source = error.source().expect("a source");
        let vsock = source
            .downcast_ref::<VsockError>()
            .expect("the source is the VsockError itself");
        assert!(matches!(vsock, VsockError::Bind { .. }), "{vsock}");
        // The chain names what we did, the socket and the system's reason, in that order.
        assert_eq!(error.to_string(), "binding the agent's vsock listener");
        assert!(source.to_string().starts_with("listening on "), "{source}");
        assert!(source.to_string().ends_with("vsock.sock_1024"), "{source}");
        let io = source.source().expect("the io error under it");
        assert!(io.downcast_ref::<std::io::Error>().is_some(), "{io}");
    }
}
