//! How a build can end other than with a Build, sorted by whose fault it is, so that the
//! CLI's exit code, the gRPC status and the metrics all tell the same story.

use super::constraints::Unsatisfiable;
use super::runtime_dir::RuntimeDirError;
use crate::agent;
use crate::castore::{self, B3Digest};
use crate::vm::{LaunchError, SpecError, VmStatus};
use std::time::Duration;

/// Whose fault a [`RunError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request cannot run here (constraints, missing inputs).
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
    #[error(transparent)]
    Unsatisfiable(#[from] Unsatisfiable),
    #[error("input {name} ({digest}) is not in the castore")]
    MissingInput { name: String, digest: B3Digest },
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
    #[error("the virtio-fs daemon failed to start: {reason}\n--- its log ---\n{log_tail}")]
    FsDaemon { reason: String, log_tail: String },
    #[error("invalid VM configuration")]
    Spec(#[from] SpecError),
    #[error("starting the VM")]
    Launch(#[from] LaunchError),
    #[error("the VM ended before the build did ({status:?}) while {during}\n--- serial console ---\n{serial_tail}")]
    VmDied {
        status: VmStatus,
        during: &'static str,
        serial_tail: String,
    },
    #[error(
        "the {helper} died during the build ({status})\n--- serial console ---\n{serial_tail}"
    )]
    HelperDied {
        helper: &'static str,
        status: String,
        serial_tail: String,
    },
    #[error("the guest did not connect within {after:?} of starting\n--- serial console ---\n{serial_tail}")]
    BootTimeout {
        after: Duration,
        serial_tail: String,
    },
    #[error("{source}\n--- build log (last {} bytes) ---\n{log_tail}", log_tail.len())]
    Session {
        #[source]
        source: Box<agent::Error>,
        log_tail: String,
        serial_tail: String,
    },
    #[error("output {output} was not produced\n--- build log (last {} bytes) ---\n{log_tail}", log_tail.len())]
    OutputMissing { output: String, log_tail: String },
    #[error("storing the build's result")]
    Store(#[source] castore::Error),
}

impl RunError {
    pub fn fault(&self) -> Fault {
        match self {
            RunError::Unsatisfiable(_) | RunError::MissingInput { .. } => Fault::Precondition,
            RunError::OutputMissing { .. } => Fault::Build,
            RunError::Session { source, .. } => match source.class() {
                agent::ErrorClass::BuildFailed => Fault::Build,
                agent::ErrorClass::GuestMisbehaved => Fault::Guest,
                agent::ErrorClass::Infrastructure => Fault::Infrastructure,
            },
            RunError::ResolveInput { .. }
            | RunError::RuntimeDir(_)
            | RunError::Setup { .. }
            | RunError::FsDaemon { .. }
            | RunError::Spec(_)
            | RunError::Launch(_)
            | RunError::VmDied { .. }
            | RunError::HelperDied { .. }
            | RunError::BootTimeout { .. }
            | RunError::Store(_) => Fault::Infrastructure,
        }
    }

    /// Whether a deadline (boot, wall, silence, harvest) ended the build.
    pub fn is_timeout(&self) -> bool {
        match self {
            RunError::BootTimeout { .. } => true,
            RunError::Session { source, .. } => matches!(**source, agent::Error::Timeout(_)),
            _ => false,
        }
    }
}
