//! Errors of the cloud-hypervisor backend.

use super::api::ApiError;
use super::config::ConfigError;
use crate::vm::accel::Accel;
use crate::vm::cmdline::CmdlineError;
use crate::vm::process::ProcessError;
use std::path::PathBuf;
use std::time::Duration;

/// Errors setting up or launching a cloud-hypervisor VM.
#[derive(Debug, thiserror::Error)]
pub enum ChError {
    /// The program was not found.
    #[error(
        "cloud-hypervisor not found {where_}: install a release binary from \
         https://github.com/cloud-hypervisor/cloud-hypervisor/releases or name it explicitly"
    )]
    Missing {
        /// Where it was looked for.
        where_: String,
    },
    /// The host CPU description could not be read.
    #[error("host CPU")]
    CpuInfo(#[source] crate::vm::cpuinfo::CpuInfoError),
    /// cloud-hypervisor only runs on KVM.
    #[error("cloud-hypervisor needs KVM, but the VM was to use {accel}")]
    NeedsKvm {
        /// The accelerator asked for.
        accel: Accel,
    },
    /// cloud-hypervisor has no user-mode network; a tap device needs privileges this service
    /// does not take.
    #[error("cloud-hypervisor offers no user-mode network device; builds with network access need the QEMU backend")]
    NoUserNetworking,
    /// A path cannot be passed on cloud-hypervisor's command line (its option parser splits
    /// on commas).
    #[error("{path}: cloud-hypervisor options cannot carry a path containing ',' or '\"'")]
    UnsupportedPath {
        /// The path.
        path: PathBuf,
    },
    /// The kernel command line could not be composed.
    #[error("kernel command line")]
    Cmdline(#[source] CmdlineError),
    /// The VM description would be refused at boot.
    #[error("VM configuration")]
    Config(#[source] ConfigError),
    /// A leftover file in the runtime directory could not be removed.
    #[error("removing the leftover {path}")]
    Stale {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("starting cloud-hypervisor")]
    Spawn(#[source] ProcessError),
    /// A pidfd for the VMM could not be opened.
    #[error("opening a pidfd for cloud-hypervisor (pid {pid})")]
    Pidfd {
        /// The pid.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API did not answer `vmm.ping` in time.
    #[error(
        "cloud-hypervisor's API was not ready within {waited:?}; its log ends with:\n{log_tail}"
    )]
    NotReady {
        /// How long it was given.
        waited: Duration,
        /// The end of its log.
        log_tail: String,
    },
    /// The process exited before its API answered.
    #[error("cloud-hypervisor exited during start-up ({status}); its log ends with:\n{log_tail}")]
    ExitedEarly {
        /// Its exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// An API call of the launch sequence failed.
    #[error("{step} failed; cloud-hypervisor's log ends with:\n{log_tail}")]
    Api {
        /// `vm.create` or `vm.boot`.
        step: &'static str,
        /// The end of its log.
        log_tail: String,
        /// The API's answer.
        #[source]
        source: ApiError,
    },
}
