//! The composition root: validated settings and an opened castore -> a ready [`Runner`],
//! with what must live as long as it (the castore served to the helper processes on a
//! private socket, in this process's own runtime directory). Used by `build`, `serve`, the
//! benches and the tests, so that each assembles a runner the same way.
//!
//! [`RunnerSettings::check`] looks at everything that can be checked without starting
//! anything (the kernel, the agent, the shell, the read-only paths), so that a command can
//! refuse a bad configuration before it imports or accepts anything; [`assemble`] then
//! starts what a runner needs.

use crate::agent::{HarvestLimits, SessionLimits};
use crate::castore::{BlobService, DirectoryService};
use crate::fs::passthrough::{check_shareable, PassthroughError};
use crate::provenance::attest::{AttestError, HostFacts};
use crate::runner::job::BIN_SH_INITRD_PATH;
use crate::runner::policy::HostPolicy;
use crate::runner::runtime_dir::{self, RuntimeDir, RuntimeDirError};
use crate::runner::{Deadlines, FsDaemonConfig, Runner, RunnerConfig};
use crate::server::{self, ServerError};
use crate::vm::accel::{self, AccelChoice, AccelError};
use crate::vm::artifacts::{self, ArtifactError};
use crate::vm::cloud_hypervisor::{ChError, CloudHypervisorBackend, CloudHypervisorConfig};
use crate::vm::initrd::{Initrd, InitrdError};
use crate::vm::qemu::{QemuBackend, QemuConfig, QemuError};
use crate::vm::VmmBackend;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::info;

/// How many descriptors the inputs' fs-daemon may hold open for its guest.
const FS_DAEMON_MAX_HANDLES: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    #[error(transparent)]
    Kernel(ArtifactError),
    #[error("guest agent {}: not a readable file", path.display())]
    Agent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the shell for /bin/sh {} is not a file", path.display())]
    BinSh { path: PathBuf },
    #[error("allowed read-only path {path}")]
    RoPath {
        path: String,
        #[source]
        source: PassthroughError,
    },
    #[error("sweeping the runtime directory {}", root.display())]
    Sweep {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("choosing the accelerator")]
    Accel(#[source] AccelError),
    #[error("setting up the QEMU backend")]
    Qemu(#[source] QemuError),
    #[error("setting up the cloud-hypervisor backend")]
    CloudHypervisor(#[source] ChError),
    #[error("runtime directory")]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("no cache directory for the initrd (set XDG_CACHE_HOME or HOME)")]
    NoCacheDir,
    #[error("packing the initrd ({what})")]
    Initrd {
        what: String,
        #[source]
        source: InitrdError,
    },
    #[error("serving the castore to the helper processes")]
    CastoreSocket(#[source] ServerError),
}

/// Which VMM runs the build VMs, and where its programs are.
#[derive(Clone, Debug)]
pub enum VmmSettings {
    /// QEMU's microvm machine (TCG or KVM).
    Qemu(QemuConfig),
    /// cloud-hypervisor through its REST API (hosts with hardware KVM).
    CloudHypervisor(CloudHypervisorConfig),
}

/// Everything a runner is assembled from.
#[derive(Clone, Debug)]
pub struct RunnerSettings {
    pub vmm: VmmSettings,
    /// The guest kernel, a PVH vmlinux.
    pub kernel: PathBuf,
    /// The static guest agent, packed into a cached initrd as /init.
    pub agent: PathBuf,
    /// A static shell offered as /bin/sh to requests that ask for one.
    pub bin_sh: Option<PathBuf>,
    pub accel: AccelChoice,
    pub vcpus: u32,
    /// What requests may have on this host. Its `bin_sh` is set from [`Self::bin_sh`]:
    /// the shell is offered exactly when it is in the initrd.
    pub policy: HostPolicy,
    /// Where per-build runtime directories live.
    pub runtime_root: PathBuf,
    pub deadlines: Deadlines,
    pub session_limits: SessionLimits,
    pub harvest_limits: HarvestLimits,
    /// The binary with the hidden `fs-daemon` subcommand (normally this one).
    pub fs_daemon_program: PathBuf,
    /// VMs booted ahead of requests (0: none).
    pub pool_size: usize,
}

/// The default runtime root for this user: `$XDG_RUNTIME_DIR/tvix-build-vm`, else
/// `/run/tvix-build-vm` as root, else a directory of this user's under the temp dir.
pub fn default_runtime_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tvix-build-vm");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/tvix-build-vm");
    }
    std::env::temp_dir().join(format!("tvix-build-vm-{}", nix::unistd::geteuid()))
}

impl RunnerSettings {
    /// Checks what needs nothing started: the kernel is an ELF file, the agent and the
    /// shell are files, each allowed read-only path may be shared.
    pub fn check(&self) -> Result<(), AssemblyError> {
        artifacts::check_kernel(&self.kernel).map_err(AssemblyError::Kernel)?;
        std::fs::File::open(&self.agent)
            .and_then(|f| f.metadata())
            .and_then(|m| match m.is_file() {
                true => Ok(()),
                false => Err(std::io::Error::other("not a regular file")),
            })
            .map_err(|source| AssemblyError::Agent {
                path: self.agent.clone(),
                source,
            })?;
        if let Some(sh) = &self.bin_sh {
            if !sh.is_file() {
                return Err(AssemblyError::BinSh { path: sh.clone() });
            }
        }
        for path in &self.policy.allowed_ro_paths {
            check_shareable(Path::new(path)).map_err(|source| AssemblyError::RoPath {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// An opened castore and the addresses it was opened from: the helper processes open
/// their own clients where an address can be shared between processes.
#[derive(Clone)]
pub struct Castore {
    pub blobs: Arc<dyn BlobService>,
    pub dirs: Arc<dyn DirectoryService>,
    pub blob_addr: String,
    pub dir_addr: String,
}

/// Whether another process may open this blob service address itself: the local blob
/// directory (read straight from the files) and gRPC can be; memory cannot, nor a bucket
/// (`objectstore+...`, a local `file:` one too), whose chunk cache is this process's.
fn blob_addr_is_shareable(addr: &str) -> bool {
    addr.starts_with('/') || addr.starts_with("grpc+")
}

/// Whether another process may open this directory service address itself: gRPC can be;
/// memory cannot, and an embedded redb is locked by the process that opened it.
fn dir_addr_is_shareable(addr: &str) -> bool {
    addr.starts_with("grpc+")
}

/// A ready runner, and what must live as long as it.
pub struct Assembled {
    pub runner: Arc<Runner>,
    vmm: Arc<dyn VmmBackend>,
    /// The VMM's own version line (empty if it could not be asked).
    vmm_version: String,
    agent: PathBuf,
    castore: (Arc<dyn BlobService>, Arc<dyn DirectoryService>),
    /// Holds the socket that serves the castore to the helper processes; removed on drop.
    _service_dir: RuntimeDir,
    castore_server: tokio::task::JoinHandle<()>,
}

impl Drop for Assembled {
    fn drop(&mut self) {
        self.castore_server.abort();
    }
}

impl Assembled {
    /// What provenance says about every VM of this runner: the VMM and its version, the
    /// kernel, initrd and agent by sha256.
    pub fn host_facts(&self) -> Result<HostFacts, AttestError> {
        let config = self.runner.config();
        HostFacts::read(
            self.vmm.name(),
            self.vmm_version.clone(),
            &config.kernel,
            &config.initrd,
            &self.agent,
        )
    }

    /// Another runner of the same configuration over the same castore and VMM (e.g. one
    /// with a pool of another size).
    pub fn another_runner(&self, pool_size: usize) -> Runner {
        Runner::new(
            self.runner.config().clone(),
            Arc::clone(&self.vmm),
            Arc::clone(&self.castore.0),
            Arc::clone(&self.castore.1),
        )
        .with_pool(pool_size)
    }
}

/// Sweeps runtime directories left by dead processes, sets up the VMM, packs the initrd,
/// serves the castore to the helper processes on a private socket, and assembles the
/// runner (with its pool, if any). Checks the settings first. Call inside a tokio runtime.
pub async fn assemble(
    settings: RunnerSettings,
    castore: Castore,
) -> Result<Assembled, AssemblyError> {
    settings.check()?;
    let root = &settings.runtime_root;
    runtime_dir::sweep(root).map_err(|source| AssemblyError::Sweep {
        root: root.clone(),
        source,
    })?;

    let accel = accel::resolve(settings.accel).map_err(AssemblyError::Accel)?;
    let (vmm, vmm_version): (Arc<dyn VmmBackend>, String) = match &settings.vmm {
        VmmSettings::Qemu(config) => {
            let qemu = QemuBackend::new(config).map_err(AssemblyError::Qemu)?;
            let version = first_line_of(qemu.program(), "--version").await;
            (Arc::new(qemu), version)
        }
        VmmSettings::CloudHypervisor(config) => {
            let ch = CloudHypervisorBackend::new(config).map_err(AssemblyError::CloudHypervisor)?;
            let probe = RuntimeDir::create(root, &format!("probe-{}", std::process::id()))?;
            let ping = ch
                .version(probe.path())
                .await
                .map_err(AssemblyError::CloudHypervisor)?;
            info!(version = %ping.version, "using cloud-hypervisor");
            (Arc::new(ch), ping.version)
        }
    };

    let cache = artifacts::cache_dir().ok_or(AssemblyError::NoCacheDir)?;
    let initrd_error = |what: String| move |source| AssemblyError::Initrd { what, source };
    let mut image = Initrd::with_agent(&settings.agent).map_err(initrd_error(format!(
        "reading the agent {}",
        settings.agent.display()
    )))?;
    if let Some(sh) = &settings.bin_sh {
        // The agent exposes it as /bin/sh to requests that ask for one.
        image
            .add_file_from(BIN_SH_INITRD_PATH, sh, 0o755)
            .map_err(initrd_error(format!("adding the shell {}", sh.display())))?;
    }
    let initrd = image
        .write_cached(&cache)
        .map_err(initrd_error(format!("writing it to {}", cache.display())))?;

    // The daemons are separate processes; they reach the castore through this process,
    // except where they can open it themselves (see the shareable checks).
    let service_dir = RuntimeDir::create(root, &format!("svc-{}", std::process::id()))?;
    let socket = service_dir.join("castore.sock");
    let router = server::router(castore.blobs.clone(), castore.dirs.clone())
        .await
        .map_err(AssemblyError::CastoreSocket)?;
    let listener = server::Listener::bind(&server::ListenAddr::Unix(socket.clone()))
        .await
        .map_err(AssemblyError::CastoreSocket)?;
    let castore_server = tokio::spawn(async move {
        if let Err(e) = server::serve(router, listener, std::future::pending()).await {
            tracing::error!(error = %e, "the private castore socket stopped serving");
        }
    });
    let internal = format!("grpc+unix://{}", socket.display());
    let pick = |addr: &str, shareable: bool| match shareable {
        true => addr.to_owned(),
        false => internal.clone(),
    };

    let config = RunnerConfig {
        kernel: settings.kernel,
        initrd,
        accel,
        vcpus: settings.vcpus,
        runtime_root: settings.runtime_root,
        policy: HostPolicy {
            bin_sh: settings.bin_sh.is_some(),
            ..settings.policy
        },
        deadlines: settings.deadlines,
        session_limits: settings.session_limits,
        harvest_limits: settings.harvest_limits,
        fs_daemon: FsDaemonConfig {
            program: settings.fs_daemon_program,
            blob_service_addr: pick(
                &castore.blob_addr,
                blob_addr_is_shareable(&castore.blob_addr),
            ),
            directory_service_addr: pick(
                &castore.dir_addr,
                dir_addr_is_shareable(&castore.dir_addr),
            ),
            max_handles: FS_DAEMON_MAX_HANDLES,
        },
    };
    info!(vmm = vmm.name(), accel = ?config.accel, kernel = %config.kernel.display(), "runner ready");
    let runner = Runner::new(
        config,
        Arc::clone(&vmm),
        castore.blobs.clone(),
        castore.dirs.clone(),
    )
    .with_pool(settings.pool_size);
    Ok(Assembled {
        runner: Arc::new(runner),
        vmm,
        vmm_version,
        agent: settings.agent,
        castore: (castore.blobs, castore.dirs),
        _service_dir: service_dir,
        castore_server,
    })
}

/// The first line `program arg` prints, e.g. a version; empty if it cannot be run.
async fn first_line_of(program: &Path, arg: &str) -> String {
    match tokio::process::Command::new(program)
        .arg(arg)
        .output()
        .await
    {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        Err(e) => {
            tracing::warn!(program = %program.display(), error = %e, "cannot ask the VMM its version");
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_open_only_what_two_processes_can_share() {
        assert!(!blob_addr_is_shareable(
            "objectstore+file:///var/lib/s/bucket"
        ));
        assert!(blob_addr_is_shareable("/var/lib/s/blobs"));
        assert!(blob_addr_is_shareable("grpc+unix:///run/c.sock"));
        assert!(!blob_addr_is_shareable("memory://"));
        assert!(dir_addr_is_shareable("grpc+http://127.0.0.1:8000"));
        assert!(!dir_addr_is_shareable("redb:///var/lib/s/directories.redb"));
        assert!(!dir_addr_is_shareable("memory://"));
    }
}
