//! The cloud-hypervisor backend, driven through its REST API.
//!
//! Launch sequence: start `cloud-hypervisor --api-socket path=<runtime>/ch-api.sock
//! --event-monitor path=<runtime>/ch-events.json --seccomp true` (no VM yet), poll
//! `vmm.ping` until it answers, `PUT vm.create` with a [`config::VmConfig`] built from the
//! same [`LaunchSpec`] the QEMU backend gets, then `PUT vm.boot`. Every way out is in
//! [`lifecycle`].
//!
//! Choices, and why:
//! - `--api-socket path=` after removing a leftover socket, not `fd=`: passing a listening
//!   fd needs an `unsafe` `pre_exec` to clear its close-on-exec flag, and buys nothing here:
//!   the runtime directory is private to this VM, so nobody else can race for the path.
//! - The serial port in `Tty` mode, i.e. on cloud-hypervisor's stdout, which the process
//!   group pumps into the serial log with a cap, exactly as for QEMU. `File` mode would let
//!   a hostile guest grow a host file without bound. cloud-hypervisor only reads input from
//!   its stdin if that is a terminal; here it is `/dev/null`.
//! - No `--log-file`: cloud-hypervisor then logs to stderr, which the process group pumps
//!   into the bounded `cloud-hypervisor.log` that [`RunningVm::vmm_log_tail`] reads.
//! - The kernel command line is the QEMU backend's base for KVM (`console=ttyS0 panic=-1
//!   quiet`) plus the caller's parameters; `tsc_early_khz` is TCG-only and never applies.
//!   `panic=-1` turns a panic into a reboot, which ends the VM here as it does under QEMU's
//!   `-no-reboot`.

pub mod api;
pub mod config;
pub mod error;
pub mod events;
pub mod lifecycle;

pub use error::ChError;

use self::api::{ApiClient, Timeouts, VmmPing};
use self::config::{
    ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, FsConfig, ImageType, MemoryConfig,
    PayloadConfig, VmConfig, VsockConfig,
};
use self::events::EventLog;
use self::lifecycle::{Control, VmmProcess};
use super::accel::Accel;
use super::cmdline;
use super::cpuinfo::CpuInfo;
use super::process::{MemberId, ProcessGroup, Stdout};
use super::{
    logsink, GracefulStop, LaunchError, LaunchSpec, RunningVm, VmError, VmExit, VmmBackend,
    LOG_TAIL_BYTES,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The program looked up on `PATH` unless named.
pub const PROGRAM: &str = "cloud-hypervisor";
/// The API socket, in the runtime directory.
pub const API_SOCKET: &str = "ch-api.sock";
/// The event monitor file, in the runtime directory.
pub const EVENTS_FILE: &str = "ch-events.json";
/// The process group member name (its stderr log is `<name>.log`).
pub const MEMBER_NAME: &str = "cloud-hypervisor";
/// How long cloud-hypervisor may take to answer its first `vmm.ping`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// The serial log's cap.
pub const SERIAL_LOG_CAP: u64 = logsink::DEFAULT_CAP_BYTES;
/// The first release with `cpus.nested` (earlier ones always expose VMX/SVM).
pub const NESTED_FIELD_SINCE: u32 = 50;

/// Where the backend's program is; `None` means "search `PATH`".
#[derive(Debug, Clone, Default)]
pub struct CloudHypervisorConfig {
    /// `cloud-hypervisor`.
    pub binary: Option<PathBuf>,
}

/// The cloud-hypervisor backend.
#[derive(Debug, Clone)]
pub struct CloudHypervisorBackend {
    program: PathBuf,
    cpu: CpuInfo,
    timeouts: Timeouts,
}

impl CloudHypervisorBackend {
    /// Finds the program and reads the host CPU description once.
    pub fn new(config: &CloudHypervisorConfig) -> Result<Self, ChError> {
        let program = super::program::locate(config.binary.as_deref(), PROGRAM, &[])
            .map_err(|where_| ChError::Missing { where_ })?;
        let cpu = CpuInfo::read().map_err(ChError::CpuInfo)?;
        Ok(CloudHypervisorBackend {
            program,
            cpu,
            timeouts: Timeouts::default(),
        })
    }

    /// The program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The kernel command line for `spec`.
    pub fn kernel_cmdline(&self, spec: &LaunchSpec) -> Result<String, ChError> {
        cmdline::render(
            &cmdline::base(Accel::Kvm, &self.cpu),
            &spec.config().cmdline,
        )
        .map_err(ChError::Cmdline)
    }

    /// Starts cloud-hypervisor without a VM, only to ask its version (for logs).
    pub async fn version(&self, runtime_dir: &Path) -> Result<VmmPing, ChError> {
        let mut group = ProcessGroup::new(runtime_dir);
        let (id, api) = self.start(&mut group, runtime_dir, Stdout::Log)?;
        let vmm = open_pidfd(&mut group, id).await?;
        let ping = ready(&mut group, id, &api).await;
        Control::new(api, vmm).shutdown_vmm().await;
        group.kill_and_reap().await;
        ping
    }

    /// Starts the VM in a process group of its own. On error every process it started is
    /// gone.
    pub async fn launch_vm(&self, spec: &LaunchSpec) -> Result<ChVm, ChError> {
        self.launch_vm_in(spec, ProcessGroup::new(&spec.config().runtime_dir))
            .await
    }

    /// Starts the VM with its processes in `group`, which may already hold the VM's other
    /// helpers (the virtio-fs daemons). On error every process of the group is gone.
    pub async fn launch_vm_in(
        &self,
        spec: &LaunchSpec,
        mut group: ProcessGroup,
    ) -> Result<ChVm, ChError> {
        let started = Instant::now();
        let c = spec.config();
        if c.accel != Accel::Kvm {
            return Err(ChError::NeedsKvm { accel: c.accel });
        }
        if c.network {
            return Err(ChError::NoUserNetworking);
        }
        let vm_config = vm_config(spec, self.kernel_cmdline(spec)?);
        vm_config.validate().map_err(ChError::Config)?;

        let serial = Stdout::File {
            path: c.serial_log.clone(),
            cap: SERIAL_LOG_CAP,
        };
        let (id, api) = self.start(&mut group, &c.runtime_dir, serial)?;
        let vmm = open_pidfd(&mut group, id).await?;
        let version = ready(&mut group, id, &api).await?;
        tracing::debug!(version = %version.version, pid = vmm.pid(), "cloud-hypervisor ready");
        if !c.nested_virt && version.major().is_some_and(|v| v < NESTED_FIELD_SINCE) {
            tracing::warn!(
                version = %version.version,
                "cloud-hypervisor before v{NESTED_FIELD_SINCE} cannot hide VMX/SVM: the guest may see hardware virtualization"
            );
        }
        for (step, call) in [
            ("vm.create", api.create(&vm_config).await),
            ("vm.boot", api.boot().await),
        ] {
            if let Err(source) = call {
                group.kill_and_reap().await;
                return Err(ChError::Api {
                    step,
                    log_tail: logsink::tail(&group.log_path(id), LOG_TAIL_BYTES),
                    source,
                });
            }
        }
        let control = Control::new(api, vmm);
        let events = EventLog::new(&c.runtime_dir.join(EVENTS_FILE));
        let supervisor = tokio::spawn(lifecycle::supervise(control.clone(), events));
        tracing::debug!(pids = ?group.pids(), "cloud-hypervisor VM booted");
        Ok(ChVm {
            running: RunningVm::new(group, id, c.serial_log.clone(), started)
                .with_graceful_stop(control.clone()),
            control,
            version,
            supervisor: Supervisor(Some(supervisor)),
        })
    }

    /// Spawns cloud-hypervisor (no VM yet) into `group`; its stdout (the serial port in
    /// `Tty` mode) goes to `stdout`.
    fn start(
        &self,
        group: &mut ProcessGroup,
        runtime_dir: &Path,
        stdout: Stdout,
    ) -> Result<(MemberId, ApiClient), ChError> {
        let socket = runtime_dir.join(API_SOCKET);
        let events = runtime_dir.join(EVENTS_FILE);
        for path in [&socket, &events] {
            if path.to_str().is_none_or(|p| p.contains([',', '"'])) {
                return Err(ChError::UnsupportedPath { path: path.clone() });
            }
            // A leftover socket makes cloud-hypervisor before v53 fail to start, and old
            // events would be read as this VM's.
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ChError::Stale {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg("--api-socket")
            .arg(format!("path={}", socket.display()))
            .arg("--event-monitor")
            .arg(format!("path={}", events.display()))
            .arg("--seccomp")
            .arg("true");
        let id = group
            .spawn(MEMBER_NAME, command, stdout)
            .map_err(ChError::Spawn)?;
        Ok((id, ApiClient::new(&socket, self.timeouts)))
    }
}

async fn open_pidfd(group: &mut ProcessGroup, id: MemberId) -> Result<VmmProcess, ChError> {
    let pid = group.pid(id);
    match VmmProcess::open(pid) {
        Ok(vmm) => Ok(vmm),
        Err(source) => {
            group.kill_and_reap().await;
            Err(ChError::Pidfd { pid, source })
        }
    }
}

/// Polls `vmm.ping` until it answers, the process exits or [`READY_TIMEOUT`] passes; on
/// failure the group is killed.
async fn ready(
    group: &mut ProcessGroup,
    id: MemberId,
    api: &ApiClient,
) -> Result<VmmPing, ChError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        let attempt =
            Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now()));
        let last = match api.ping_within(attempt).await {
            Ok(ping) => return Ok(ping),
            Err(e) => e,
        };
        let exited = group.try_wait(id).ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            group.kill_and_reap().await;
            let log_tail = logsink::tail(&group.log_path(id), LOG_TAIL_BYTES);
            return Err(match exited {
                Some(status) => ChError::ExitedEarly {
                    status: status.to_string(),
                    log_tail,
                },
                None => {
                    tracing::debug!(error = %last, "last vmm.ping attempt");
                    ChError::NotReady {
                        waited: READY_TIMEOUT,
                        log_tail,
                    }
                }
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The `vm.create` body for `spec`, with the kernel command line `cmdline`.
pub fn vm_config(spec: &LaunchSpec, cmdline: String) -> VmConfig {
    let c = spec.config();
    VmConfig {
        payload: PayloadConfig {
            kernel: c.kernel.clone(),
            initramfs: c.initrd.clone(),
            cmdline,
        },
        cpus: CpusConfig {
            boot_vcpus: c.vcpus,
            max_vcpus: c.vcpus,
            nested: c.nested_virt,
        },
        memory: MemoryConfig {
            size: u64::from(c.memory_mib) << 20,
            shared: true,
        },
        fs: c
            .shares
            .iter()
            .enumerate()
            .map(|(i, share)| FsConfig {
                tag: share.tag.clone(),
                socket: share.socket.clone(),
                num_queues: 1,
                queue_size: 1024,
                id: format!("fs{i}"),
            })
            .collect(),
        vsock: c.vsock.as_ref().map(|v| VsockConfig {
            cid: v.guest_cid,
            socket: v.uds_path.clone(),
            id: "vsock0".to_owned(),
        }),
        disks: c
            .scratch_disk
            .iter()
            .map(|path| DiskConfig {
                path: path.clone(),
                readonly: false,
                image_type: ImageType::Raw,
                id: "scratch".to_owned(),
            })
            .collect(),
        serial: ConsoleConfig::mode(ConsoleMode::Tty),
        console: ConsoleConfig::mode(ConsoleMode::Off),
    }
}

/// A booted cloud-hypervisor VM: its [`RunningVm`] (whose deadline and kill go through the
/// API first, see [`lifecycle`]), the API and the reboot watch.
#[derive(Debug)]
pub struct ChVm {
    running: RunningVm,
    control: Control,
    version: VmmPing,
    supervisor: Supervisor,
}

/// The reboot watch ([`lifecycle::supervise`]); aborted when dropped unless detached.
#[derive(Debug)]
struct Supervisor(Option<tokio::task::JoinHandle<()>>);

impl Supervisor {
    fn detach(&mut self) {
        // Dropping a JoinHandle detaches the task; it ends by itself when the VMM exits.
        self.0.take();
    }

    fn abort(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.abort();
    }
}

impl ChVm {
    /// The processes, serial log and logs.
    pub fn running(&self) -> &RunningVm {
        &self.running
    }

    /// The VMM's answer to `vmm.ping`.
    pub fn version(&self) -> &VmmPing {
        &self.version
    }

    /// The API and the VMM process.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Waits for the VMM to exit (a guest power-off, or the end after a reboot).
    pub async fn wait(&mut self) -> Result<VmExit, VmError> {
        let exit = self.running.wait().await;
        self.supervisor.abort();
        exit
    }

    /// Like [`ChVm::wait`], but stops the VM at `deadline`.
    pub async fn wait_until(&mut self, deadline: Instant) -> Result<VmExit, VmError> {
        let exit = self.running.wait_until(deadline).await;
        self.supervisor.abort();
        exit
    }

    /// Stops the VM through the API (killing it if it lingers) and reaps every process.
    pub async fn kill(&mut self) -> VmExit {
        let exit = self.running.kill().await;
        self.supervisor.abort();
        exit
    }

    /// The plain [`RunningVm`]; its deadline and kill still go through the API, and the
    /// reboot watch keeps running until the VMM exits.
    pub fn into_running_vm(mut self) -> RunningVm {
        self.supervisor.detach();
        self.running
    }
}

#[async_trait::async_trait]
impl GracefulStop for Control {
    async fn stop_gracefully(&self) {
        let stopped = self.stop().await;
        tracing::debug!(pid = self.vmm().pid(), ?stopped, "cloud-hypervisor stopped");
    }
}

#[async_trait::async_trait]
impl VmmBackend for CloudHypervisorBackend {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    async fn launch(
        &self,
        spec: &LaunchSpec,
        group: ProcessGroup,
    ) -> Result<RunningVm, LaunchError> {
        match self.launch_vm_in(spec, group).await {
            Ok(vm) => Ok(vm.into_running_vm()),
            Err(e) => Err(into_launch_error(e)),
        }
    }
}

/// Maps onto the backend-neutral [`LaunchError`] where it has a counterpart; the rest
/// travels as itself, typed, for callers to match or downcast.
fn into_launch_error(e: ChError) -> LaunchError {
    match e {
        ChError::Spawn(e) => LaunchError::Process(e),
        ChError::Cmdline(e) => LaunchError::Cmdline(e),
        ChError::NotReady { waited, log_tail } => LaunchError::NotReady {
            what: PROGRAM.to_owned(),
            waited,
            log_tail,
        },
        ChError::ExitedEarly { status, log_tail } => LaunchError::ExitedEarly {
            what: PROGRAM.to_owned(),
            status,
            log_tail,
        },
        other => LaunchError::CloudHypervisor(other),
    }
}

#[cfg(test)]
mod tests;
