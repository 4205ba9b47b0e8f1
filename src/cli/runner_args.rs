//! Options that shape the VMs and bound the builds, shared by `build` and `serve`, and the
//! assembly of a [`Runner`] from them.

use super::request_args::parse_size;
use super::store_args::StoreArgs;
use crate::agent::{HarvestLimits, SessionLimits};
use crate::castore::{BlobService, DirectoryService};
use crate::runner::constraints::HostOffer;
use crate::runner::job::BIN_SH_INITRD_PATH;
use crate::runner::runtime_dir::{self, RuntimeDir};
use crate::runner::{Deadlines, FsDaemonConfig, Runner, RunnerConfig};
use crate::server;
use crate::vm::cloud_hypervisor::{CloudHypervisorBackend, CloudHypervisorConfig};
use crate::vm::initrd::Initrd;
use crate::vm::qemu::{QemuBackend, QemuConfig};
use crate::vm::{accel, AccelChoice, VmmBackend};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

const MIB: u64 = 1 << 20;

/// Which VMM runs the build VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Vmm {
    /// QEMU's microvm machine (TCG or KVM).
    Qemu,
    /// cloud-hypervisor through its REST API (hosts with hardware KVM).
    CloudHypervisor,
}

#[derive(Debug, Args)]
pub struct RunnerArgs {
    /// The VMM that runs the build VMs.
    #[arg(long, value_enum, default_value_t = Vmm::Qemu)]
    pub vmm: Vmm,
    /// The cloud-hypervisor binary (default: from PATH).
    #[arg(long, value_name = "PATH")]
    pub cloud_hypervisor_bin: Option<PathBuf>,
    /// The guest kernel, a PVH vmlinux (kernel-config/build.sh prints where it built one).
    /// Required to build (`serve` without it serves the castore only).
    #[arg(long, env = "TVIX_BUILD_VM_KERNEL", value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The static guest agent (scripts/build-agent.sh prints where it built it); packed
    /// into a cached initrd as /init.
    /// Required to build, like --kernel.
    #[arg(long, env = "TVIX_BUILD_VM_AGENT", value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Hardware acceleration: auto uses KVM only when the CPU has vmx/svm and /dev/kvm opens.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory when a request asks for less (e.g. 512M).
    #[arg(long, value_parser = parse_size, default_value = "512M")]
    pub vm_memory: u64,
    /// The most guest memory a request may ask for.
    #[arg(long, value_parser = parse_size, default_value = "8G")]
    pub max_vm_memory: u64,
    /// Systems this host builds (repeatable).
    #[arg(long = "host-system", default_value = "x86_64-linux")]
    pub host_systems: Vec<String>,
    /// Let requests ask for /dev/kvm (nested virtualization).
    #[arg(long)]
    pub allow_kvm: bool,
    /// A host directory requests may ask for in constraints.available_ro_paths (repeatable;
    /// deny by default). A build that asks gets it read-only at the same path. Must be a
    /// directory (not a file or symlink), outside /dev and /proc.
    #[arg(long = "allow-ro-path", value_name = "PATH")]
    pub allowed_ro_paths: Vec<String>,
    /// Where per-build runtime directories live (default: $XDG_RUNTIME_DIR/tvix-build-vm, or
    /// /run/tvix-build-vm as root).
    #[arg(long, env = "TVIX_BUILD_VM_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// From starting the VM to the guest agent's hello.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub boot_timeout: Duration,
    /// The build command's wall-clock limit.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub timeout: Duration,
    /// The longest the command may stay silent (no stdout/stderr); off unless given.
    #[arg(long, value_parser = parse_duration)]
    pub silence_timeout: Option<Duration>,
    /// The longest the castore may take to confirm a build's inputs before its VM starts.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub castore_timeout: Duration,
    /// The longest the output transfer may take.
    #[arg(long, value_parser = parse_duration, default_value = "30m")]
    pub harvest_timeout: Duration,
    /// Total build log a build may write before it is stopped.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    pub max_log_bytes: u64,
    /// Total bytes of all outputs of one build.
    #[arg(long, value_parser = parse_size, default_value = "64G")]
    pub max_output_bytes: u64,
    /// Files, directories and symlinks in all outputs of one build.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_output_entries: u64,
    /// Directory depth of an output.
    #[arg(long, default_value_t = 256)]
    pub max_output_depth: usize,
    /// The qemu-system-x86_64 binary (default: from PATH).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// The vhost-device-vsock binary (default: from PATH).
    #[arg(long, value_name = "PATH")]
    pub vhost_device_vsock: Option<PathBuf>,
    /// QEMU's TCG translation buffer per VM, e.g. 64M (default 256M): less host memory per
    /// VM, but code-heavy builds slow down once their translated code no longer fits.
    #[arg(long, value_parser = parse_size)]
    pub tcg_tb_size: Option<u64>,
}

/// Parses durations like 30s, 5m, 2h, 250ms, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 30s, 5m or 2h");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "ms" => return Ok(Duration::from_millis(n)),
        _ => None,
    };
    secs.map(Duration::from_secs).ok_or_else(bad)
}

fn mib(bytes: u64, flag: &str) -> anyhow::Result<u32> {
    u32::try_from(bytes.div_ceil(MIB)).with_context(|| format!("{flag} is too large"))
}

/// The default runtime root for this user.
fn default_runtime_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tvix-build-vm");
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/tvix-build-vm");
    }
    std::env::temp_dir().join(format!("tvix-build-vm-{}", nix::unistd::geteuid()))
}

/// A runner, plus what must live as long as it: the process's own runtime directory, which
/// holds the socket that serves the castore to the virtio-fs daemons.
pub struct RunnerHandle {
    pub runner: Arc<Runner>,
    _service_dir: RuntimeDir,
}

impl RunnerArgs {
    /// Whether the VM artefacts are given, so that builds can run.
    pub fn can_build(&self) -> bool {
        self.kernel.is_some() && self.agent.is_some()
    }

    /// Sweeps runtime directories left by dead processes, serves the castore to the helper
    /// processes on a private socket, and assembles the runner, with `pool_size` VMs booted
    /// ahead of requests (0: none). Call inside a tokio runtime.
    pub async fn runner(
        &self,
        store: &StoreArgs,
        blobs: Arc<dyn BlobService>,
        dirs: Arc<dyn DirectoryService>,
        bin_sh: Option<&std::path::Path>,
        pool_size: usize,
    ) -> anyhow::Result<RunnerHandle> {
        let kernel = self
            .kernel
            .clone()
            .context("--kernel (or TVIX_BUILD_VM_KERNEL) is required to build")?;
        let agent = self
            .agent
            .as_deref()
            .context("--agent (or TVIX_BUILD_VM_AGENT) is required to build")?;
        let runtime_root = self
            .runtime_dir
            .clone()
            .unwrap_or_else(default_runtime_root);
        for path in &self.allowed_ro_paths {
            crate::fs::passthrough::check_shareable(std::path::Path::new(path))
                .with_context(|| format!("--allow-ro-path {path}"))?;
        }
        runtime_dir::sweep(&runtime_root)
            .with_context(|| format!("sweeping {}", runtime_root.display()))?;

        let accel = accel::resolve(self.accel).context("choosing the accelerator")?;
        let vmm: Arc<dyn VmmBackend> = match self.vmm {
            Vmm::Qemu => Arc::new(
                QemuBackend::new(&QemuConfig {
                    qemu: self.qemu.clone(),
                    vhost_device_vsock: self.vhost_device_vsock.clone(),
                    tcg_tb_bytes: self.tcg_tb_size,
                })
                .context("setting up the QEMU backend")?,
            ),
            Vmm::CloudHypervisor => {
                let ch = CloudHypervisorBackend::new(&CloudHypervisorConfig {
                    binary: self.cloud_hypervisor_bin.clone(),
                })
                .context("setting up the cloud-hypervisor backend")?;
                let probe =
                    RuntimeDir::create(&runtime_root, &format!("probe-{}", std::process::id()))?;
                let ping = ch
                    .version(probe.path())
                    .await
                    .context("asking cloud-hypervisor for its version")?;
                info!(version = %ping.version, "using cloud-hypervisor");
                Arc::new(ch)
            }
        };
        let cache = crate::vm::artifacts::cache_dir().context("finding the cache directory")?;
        let mut image = Initrd::with_agent(agent)
            .with_context(|| format!("reading the agent {}", agent.display()))?;
        if let Some(sh) = bin_sh {
            // The agent exposes it as /bin/sh to requests that ask for one.
            image
                .add_file_from(BIN_SH_INITRD_PATH, sh, 0o755)
                .with_context(|| format!("adding --bin-sh {} to the initrd", sh.display()))?;
        }
        let initrd = image
            .write_cached(&cache)
            .with_context(|| format!("writing the initrd to {}", cache.display()))?;

        // The daemons are separate processes; they reach the castore through this process,
        // except local blobs, which they read straight from the files.
        let service_dir = RuntimeDir::create(&runtime_root, &format!("svc-{}", std::process::id()))
            .context("creating the service's runtime directory")?;
        let socket = service_dir.join("castore.sock");
        let router = server::router(blobs.clone(), dirs.clone()).await?;
        let listener = server::Listener::bind(&server::ListenAddr::Unix(socket.clone())).await?;
        tokio::spawn(server::serve(router, listener, std::future::pending()));
        let internal = format!("grpc+unix://{}", socket.display());
        let (blob_addr, dir_addr) = store.addrs()?;
        let helper_blob_addr = if blob_addr.starts_with("objectstore+file://")
            || blob_addr.starts_with('/')
            || blob_addr.starts_with("grpc+")
        {
            blob_addr
        } else {
            internal.clone()
        };
        let helper_dir_addr = if dir_addr.starts_with("grpc+") {
            dir_addr
        } else {
            internal
        };

        let config = RunnerConfig {
            kernel,
            initrd,
            accel,
            vcpus: self.vcpus,
            runtime_root,
            offer: HostOffer {
                systems: self.host_systems.clone(),
                default_memory_mib: mib(self.vm_memory, "--vm-memory")?,
                max_memory_mib: mib(self.max_vm_memory, "--max-vm-memory")?,
                nested_virtualization: self.allow_kvm,
                allowed_ro_paths: self.allowed_ro_paths.clone(),
            },
            deadlines: Deadlines {
                boot: self.boot_timeout,
                castore: self.castore_timeout,
                ..Deadlines::default()
            },
            session_limits: SessionLimits {
                max_log_bytes: self.max_log_bytes,
                silence: self.silence_timeout,
                wall: Some(self.timeout),
                ..SessionLimits::default()
            },
            harvest_limits: HarvestLimits {
                max_total_bytes: self.max_output_bytes,
                max_entries: self.max_output_entries,
                max_depth: self.max_output_depth,
                deadline: self.harvest_timeout,
                ..HarvestLimits::default()
            },
            fs_daemon: FsDaemonConfig {
                program: std::env::current_exe().context("finding this executable")?,
                blob_service_addr: helper_blob_addr,
                directory_service_addr: helper_dir_addr,
                max_handles: 1024,
            },
        };
        info!(vmm = vmm.name(), accel = ?config.accel, kernel = %config.kernel.display(), "runner ready");
        Ok(RunnerHandle {
            runner: Arc::new(Runner::new(config, vmm, blobs, dirs).with_pool(pool_size)),
            _service_dir: service_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "s", "5d", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
