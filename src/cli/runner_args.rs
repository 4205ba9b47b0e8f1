//! Options that shape the VMs and bound the builds, shared by `build` and `serve`, turned
//! into the [`RunnerSettings`] a runner is assembled from (see [`crate::assembly`]).

use crate::agent::{HarvestLimits, SessionLimits};
use crate::assembly::{default_runtime_root, AssemblyError, RunnerSettings, VmmSettings};
use crate::runner::policy::HostPolicy;
use crate::runner::Deadlines;
use crate::units::{parse_duration, parse_size};
use crate::vm::cloud_hypervisor::CloudHypervisorConfig;
use crate::vm::qemu::QemuConfig;
use crate::vm::AccelChoice;
use anyhow::Context;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

fn mib(bytes: u64, flag: &str) -> anyhow::Result<u32> {
    u32::try_from(bytes.div_ceil(MIB)).with_context(|| format!("{flag} is too large"))
}

impl RunnerArgs {
    /// Whether the VM artefacts are given, so that builds can run.
    pub fn can_build(&self) -> bool {
        self.kernel.is_some() && self.agent.is_some()
    }

    /// The settings these flags give, with the shell offered as /bin/sh (if any), network
    /// access granted on request or not, and `pool_size` VMs booted ahead of requests;
    /// checked (see [`RunnerSettings::check`]) before anything is imported, accepted or
    /// started.
    pub fn settings(
        &self,
        bin_sh: Option<&Path>,
        allow_network: bool,
        pool_size: usize,
    ) -> anyhow::Result<RunnerSettings> {
        let kernel = self
            .kernel
            .clone()
            .context("--kernel (or TVIX_BUILD_VM_KERNEL) is required to build")?;
        let agent = self
            .agent
            .clone()
            .context("--agent (or TVIX_BUILD_VM_AGENT) is required to build")?;
        let settings = RunnerSettings {
            vmm: match self.vmm {
                Vmm::Qemu => VmmSettings::Qemu(QemuConfig {
                    qemu: self.qemu.clone(),
                    vhost_device_vsock: self.vhost_device_vsock.clone(),
                    tcg_tb_bytes: self.tcg_tb_size,
                }),
                Vmm::CloudHypervisor => VmmSettings::CloudHypervisor(CloudHypervisorConfig {
                    binary: self.cloud_hypervisor_bin.clone(),
                }),
            },
            kernel,
            agent,
            bin_sh: bin_sh.map(Path::to_owned),
            accel: self.accel,
            vcpus: self.vcpus,
            policy: HostPolicy {
                systems: self.host_systems.clone(),
                default_memory_mib: mib(self.vm_memory, "--vm-memory")?,
                max_memory_mib: mib(self.max_vm_memory, "--max-vm-memory")?,
                nested_virtualization: self.allow_kvm,
                allowed_ro_paths: self.allowed_ro_paths.clone(),
                network: allow_network,
                bin_sh: bin_sh.is_some(),
            },
            runtime_root: self
                .runtime_dir
                .clone()
                .unwrap_or_else(default_runtime_root),
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
            fs_daemon_program: std::env::current_exe().context("finding this executable")?,
            pool_size,
        };
        // The errors in the flags' words, where a flag names the value.
        settings.check().map_err(|e| match e {
            AssemblyError::RoPath { path, source } => {
                anyhow::Error::from(source).context(format!("--allow-ro-path {path}"))
            }
            AssemblyError::BinSh { path } => {
                anyhow::anyhow!("--bin-sh {} is not a file", path.display())
            }
            e => e.into(),
        })?;
        Ok(settings)
    }
}
