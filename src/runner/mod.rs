//! One BuildRequest -> one microVM -> one Build.
//!
//! [`Runner::build`] takes a validated request through steps 2 and 4-11 of docs/architecture.md:
//! constraints, inputs, runtime directory, the virtio-fs daemon, the VM, the conversation
//! with the agent, the harvest, and clean-up on every way out (the runtime directory and the
//! process group are guards, so an error, a deadline or a dropped future all end the same
//! way: every process of the build killed, its directory removed).

pub mod accounting;
mod boot;
mod build;
mod error;
pub mod inputs;
pub mod job;
pub mod policy;
pub mod pool;
pub mod runtime_dir;

pub use accounting::Accounting;
pub use boot::BootedVm;
pub use build::{BuildOutcome, Output, Timings};
pub use error::{Fault, RunError, SessionFailure};
pub use policy::{BootShape, Decision, HostPolicy, Unsatisfiable};

use crate::agent::{HarvestLimits, SessionLimits};
use crate::castore::{BlobService, DirectoryService};
use crate::vm::{Accel, VmmBackend};
use boot::Booter;
use pool::Pool;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The deadlines of the phases around the command (the command's own wall-clock and
/// silence limits are in [`SessionLimits`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// From starting the VMM to the agent's Hello.
    pub boot: Duration,
    /// For the virtio-fs daemon to listen.
    pub helper_start: Duration,
    /// For the castore to confirm the inputs before the VM starts: a stalled castore must
    /// not hold a build (and its admission slot) forever.
    pub castore: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            boot: Duration::from_secs(30),
            helper_start: Duration::from_secs(10),
            castore: Duration::from_secs(60),
        }
    }
}

/// How the virtio-fs daemon (a separate process) reaches the castore.
#[derive(Clone, Debug)]
pub struct FsDaemonConfig {
    /// The binary with the hidden `fs-daemon` subcommand (normally this one).
    pub program: PathBuf,
    /// Blob service address for the daemon, e.g. the local blob directory, so that reads go
    /// straight to the files.
    pub blob_service_addr: String,
    /// Directory service address for the daemon; an embedded redb cannot be opened by two
    /// processes, so this is normally a gRPC socket the service serves itself.
    pub directory_service_addr: String,
    pub max_handles: u64,
}

/// Everything the runner needs, validated by whoever builds it (the CLI).
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// The guest kernel (PVH vmlinux).
    pub kernel: PathBuf,
    /// The initramfs with the agent as /init.
    pub initrd: PathBuf,
    pub accel: Accel,
    pub vcpus: u32,
    /// Where per-build runtime directories are created.
    pub runtime_root: PathBuf,
    pub policy: HostPolicy,
    pub deadlines: Deadlines,
    pub session_limits: SessionLimits,
    pub harvest_limits: HarvestLimits,
    pub fs_daemon: FsDaemonConfig,
}

/// Runs builds; cheap to share between concurrent requests.
pub struct Runner {
    booter: Booter,
    blobs: Arc<dyn BlobService>,
    dirs: Arc<dyn DirectoryService>,
    pool: Option<Pool>,
}

impl Runner {
    pub fn new(
        config: RunnerConfig,
        vmm: Arc<dyn VmmBackend>,
        blobs: Arc<dyn BlobService>,
        dirs: Arc<dyn DirectoryService>,
    ) -> Self {
        Self {
            booter: Booter {
                config: Arc::new(config),
                vmm,
            },
            blobs,
            dirs,
            pool: None,
        }
    }

    /// Keeps `size` VMs of the default shape (the offer's default memory, no nested
    /// virtualization, no network, no read-only host paths) booted ahead of requests; see [`pool`]. Requests of
    /// another shape, or finding none waiting, boot their own. Must be called within a tokio
    /// runtime, which runs the pool's filler.
    pub fn with_pool(mut self, size: usize) -> Self {
        self.pool = (size > 0).then(|| {
            let shape = self.config().policy.default_shape();
            Pool::start(self.booter.clone(), shape, size)
        });
        self
    }

    /// The pool of pre-booted VMs, if there is one.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.booter.config
    }

    /// What requests may have on this host; decide each request with it once, and hand the
    /// decision to [`Runner::build`].
    pub fn policy(&self) -> &HostPolicy {
        &self.booter.config.policy
    }

    pub fn blobs(&self) -> &Arc<dyn BlobService> {
        &self.blobs
    }

    pub fn dirs(&self) -> &Arc<dyn DirectoryService> {
        &self.dirs
    }
}

/// A short, unique build id: also the name of the build's runtime directory, so it is kept
/// short enough for unix socket paths inside it.
pub fn new_build_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..16].to_owned()
}
