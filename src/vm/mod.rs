//! VMM backends and what every VM needs: kernel command line, initrd, host-side vsock.
//!
//! A caller describes a VM once as a [`LaunchConfig`], validates it into a [`LaunchSpec`],
//! and hands it to a [`VmmBackend`] (QEMU today, cloud-hypervisor later), which returns a
//! [`RunningVm`]: all of the VM's host processes in one process group, to be waited for with
//! a deadline and killed as a whole. Nothing here knows about builds.

pub mod accel;
pub mod artifacts;
pub mod cloud_hypervisor;
pub mod cmdline;
pub mod cpuinfo;
pub mod initrd;
pub mod logsink;
pub mod process;
pub mod program;
pub mod qemu;
pub mod vsock;

pub use accel::{Accel, AccelChoice};
pub use cmdline::KernelParam;

use process::{MemberId, ProcessGroup};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// Bounds on what a VM may be given.
pub const MIN_MEMORY_MIB: u32 = 64;
/// See [`MIN_MEMORY_MIB`].
pub const MAX_MEMORY_MIB: u32 = 256 << 10;
/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 64;
/// virtio-fs tags are at most 36 bytes (the device's config field).
pub const MAX_TAG_BYTES: usize = 36;
/// The longest `_<port>` suffix hybrid vsock appends to the socket path.
const PORT_SUFFIX_MAX: usize = "_4294967295".len();

/// How many bytes of a log end up in an error message.
pub const LOG_TAIL_BYTES: u64 = 4096;

/// One virtio-fs share: the guest mounts `tag`; a vhost-user-fs daemon serves `socket`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsShare {
    /// The mount tag (1 to 36 of `[A-Za-z0-9_.-]`).
    pub tag: String,
    /// The vhost-user socket, listening before launch.
    pub socket: PathBuf,
}

/// Hybrid vsock: the guest has `guest_cid`; its connections to host port P arrive on the
/// unix listener `<uds_path>_P` (see [`vsock::HostListener`]), and the host reaches guest
/// ports through `uds_path` itself (`CONNECT <port>\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HybridVsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The base unix socket path; it must not exist at launch (the VMM side creates it).
    pub uds_path: PathBuf,
}

/// Everything a backend needs to start one VM, before validation.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The guest kernel: a PVH ELF `vmlinux`.
    pub kernel: PathBuf,
    /// The initramfs (see [`initrd`]).
    pub initrd: PathBuf,
    /// Kernel parameters beyond the backend's base ones (see [`cmdline`]).
    pub cmdline: Vec<KernelParam>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// virtio-fs shares.
    pub shares: Vec<FsShare>,
    /// Hybrid vsock, if the guest talks to the host.
    pub vsock: Option<HybridVsock>,
    /// A raw image the guest sees as a virtio block device (the build's scratch space).
    pub scratch_disk: Option<PathBuf>,
    /// Where the guest's serial console is written (bounded; see [`logsink`]).
    pub serial_log: PathBuf,
    /// Expose hardware virtualization to the guest (a guest `/dev/kvm`).
    pub nested_virt: bool,
    /// Give the guest a (user-mode, NATed) network device.
    pub network: bool,
    /// The VM's private directory: sockets, logs, the pids file. It must exist.
    pub runtime_dir: PathBuf,
    /// The accelerator, already resolved (see [`accel::resolve`]).
    pub accel: Accel,
}

/// A field of a [`LaunchConfig`] that is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A path must be absolute (and valid UTF-8, for the VMM's command line).
    #[error("{field}: {path} must be an absolute UTF-8 path")]
    BadPath {
        /// The field.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A file that must exist does not.
    #[error("{field}: {path} is not a file")]
    NotAFile {
        /// The field.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A directory that must exist does not.
    #[error("{field}: {path} is not a directory")]
    NotADirectory {
        /// The field.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A path that the VMM side creates already exists.
    #[error("{field}: {path} already exists")]
    Exists {
        /// The field.
        field: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A number out of range.
    #[error("{field}: {value} is outside {min}..={max}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: u64,
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
    /// A virtio-fs tag is malformed or used twice.
    #[error("shares[{index}]: tag {tag:?} must be 1-{MAX_TAG_BYTES} of [A-Za-z0-9_.-] and unique")]
    BadTag {
        /// The share's index.
        index: usize,
        /// The tag.
        tag: String,
    },
    /// A socket path is too long.
    #[error("{field}")]
    SocketPath {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: vsock::VsockError,
    },
}

/// A validated [`LaunchConfig`]: every backend may rely on what [`LaunchSpec::new`] checked.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    config: LaunchConfig,
}

impl LaunchSpec {
    /// Validates `config`: files exist, paths are absolute UTF-8 and socket paths fit,
    /// numbers are in range, tags are well-formed and unique, the vsock CID is usable.
    pub fn new(config: LaunchConfig) -> Result<Self, SpecError> {
        let c = &config;
        file("kernel", &c.kernel)?;
        file("initrd", &c.initrd)?;
        range("memory_mib", c.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)?;
        range("vcpus", c.vcpus, 1, MAX_VCPUS)?;
        for (index, share) in c.shares.iter().enumerate() {
            let tag_ok = !share.tag.is_empty()
                && share.tag.len() <= MAX_TAG_BYTES
                && share
                    .tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
                && c.shares[..index].iter().all(|s| s.tag != share.tag);
            if !tag_ok {
                return Err(SpecError::BadTag {
                    index,
                    tag: share.tag.clone(),
                });
            }
            absolute("shares.socket", &share.socket)?;
            socket_fits("shares.socket", &share.socket, 0)?;
        }
        if let Some(v) = &c.vsock {
            range("vsock.guest_cid", v.guest_cid, 3, u32::MAX - 1)?;
            absolute("vsock.uds_path", &v.uds_path)?;
            socket_fits("vsock.uds_path", &v.uds_path, PORT_SUFFIX_MAX)?;
            if v.uds_path.symlink_metadata().is_ok() {
                return Err(SpecError::Exists {
                    field: "vsock.uds_path",
                    path: v.uds_path.clone(),
                });
            }
        }
        if let Some(disk) = &c.scratch_disk {
            file("scratch_disk", disk)?;
        }
        absolute("serial_log", &c.serial_log)?;
        absolute("runtime_dir", &c.runtime_dir)?;
        if !c.runtime_dir.is_dir() {
            return Err(SpecError::NotADirectory {
                field: "runtime_dir",
                path: c.runtime_dir.clone(),
            });
        }
        if let Some(parent) = c.serial_log.parent().filter(|p| !p.is_dir()) {
            return Err(SpecError::NotADirectory {
                field: "serial_log",
                path: parent.to_owned(),
            });
        }
        Ok(LaunchSpec { config })
    }

    /// The validated configuration.
    pub fn config(&self) -> &LaunchConfig {
        &self.config
    }
}

fn absolute(field: &'static str, path: &Path) -> Result<(), SpecError> {
    if path.is_absolute() && path.to_str().is_some() {
        Ok(())
    } else {
        Err(SpecError::BadPath {
            field,
            path: path.to_owned(),
        })
    }
}

fn file(field: &'static str, path: &Path) -> Result<(), SpecError> {
    absolute(field, path)?;
    if path.is_file() {
        Ok(())
    } else {
        Err(SpecError::NotAFile {
            field,
            path: path.to_owned(),
        })
    }
}

fn range(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), SpecError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(SpecError::OutOfRange {
            field,
            value: value.into(),
            min: min.into(),
            max: max.into(),
        })
    }
}

fn socket_fits(field: &'static str, path: &Path, suffix: usize) -> Result<(), SpecError> {
    let mut probe = path.as_os_str().to_owned();
    probe.push("_".repeat(suffix));
    vsock::check_socket_path(Path::new(&probe))
        .map_err(|source| SpecError::SocketPath { field, source })
}

/// Errors starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A process could not be started.
    #[error("starting the VM's processes")]
    Process(#[source] process::ProcessError),
    /// The vsock helper could not be found.
    #[error("vsock")]
    Vsock(#[source] vsock::VsockError),
    /// The kernel command line could not be composed.
    #[error("kernel command line")]
    Cmdline(#[source] cmdline::CmdlineError),
    /// A helper did not get ready in time.
    #[error("{what} was not ready within {waited:?}; its log ends with:\n{log_tail}")]
    NotReady {
        /// The helper.
        what: String,
        /// How long it was given.
        waited: Duration,
        /// The end of its log.
        log_tail: String,
    },
    /// A helper exited while starting.
    #[error("{what} exited during start-up ({status}); its log ends with:\n{log_tail}")]
    ExitedEarly {
        /// The helper.
        what: String,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// cloud-hypervisor refused the VM or could not be set up (its API's answer, the
    /// configuration, the host); boxed, being much larger than the other variants.
    #[error("cloud-hypervisor")]
    CloudHypervisor(#[source] cloud_hypervisor::ChError),
}

/// How long [`RunningVm`] gives a backend's [`GracefulStop`] before it kills the VM.
pub const GRACEFUL_STOP_LIMIT: Duration = Duration::from_secs(3);

/// A backend's way to end a VM that is still running through the VMM itself, so that it
/// tears the VM down (cloud-hypervisor's API); [`RunningVm`] calls it, bounded by
/// [`GRACEFUL_STOP_LIMIT`], before the SIGKILL that ends the VM's processes either way.
/// A backend without one (QEMU) is killed at once.
#[async_trait::async_trait]
pub trait GracefulStop: Send + Sync + std::fmt::Debug {
    /// Asks the VMM to end and returns once it did or gave up. Called again after a
    /// cancelled call or once the VMM has exited, it must do no harm.
    async fn stop_gracefully(&self);
}

/// A VMM: turns a [`LaunchSpec`] into a [`RunningVm`]. Implementations differ in how they
/// start the VM, not in what the caller gets back.
#[async_trait::async_trait]
pub trait VmmBackend: Send + Sync + std::fmt::Debug {
    /// A short name for logs ("qemu").
    fn name(&self) -> &'static str;

    /// Starts the VM with its processes in `group`, which may already hold the VM's other
    /// helpers (the virtio-fs daemons), so that one kill ends them all. On error, every
    /// process of the group is already gone.
    async fn launch(
        &self,
        spec: &LaunchSpec,
        group: ProcessGroup,
    ) -> Result<RunningVm, LaunchError>;
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStatus {
    /// The VMM exited with this code (0 after a guest power-off, reboot or panic: the guest's
    /// own report says whether its work succeeded).
    Exited(i32),
    /// The VMM was killed by this signal (not by us).
    Signaled(i32),
    /// A helper of the VM (virtio-fs daemon, vsock device) failed; the VM was killed.
    HelperFailed {
        /// The helper's name, e.g. `fs-daemon`.
        helper: String,
        /// How it ended.
        status: String,
    },
    /// The deadline passed; the VM was killed.
    DeadlineExceeded,
    /// The caller killed the VM.
    Killed,
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmStatus::Exited(code) => write!(f, "the VMM exited with code {code}"),
            VmStatus::Signaled(signal) => write!(f, "the VMM was killed by signal {signal}"),
            VmStatus::HelperFailed { helper, status } => {
                write!(f, "the VM's {helper} failed ({status})")
            }
            VmStatus::DeadlineExceeded => f.write_str("the VM was killed at its deadline"),
            VmStatus::Killed => f.write_str("the VM was killed"),
        }
    }
}

/// The end of a VM.
#[derive(Debug, Clone)]
pub struct VmExit {
    /// How it ended.
    pub status: VmStatus,
    /// From launch to the end.
    pub elapsed: Duration,
    /// The end of the VMM's own log (its stderr), when it did not exit with 0: why it failed.
    pub vmm_log_tail: Option<String>,
}

impl VmExit {
    /// The VMM exited with status 0.
    pub fn is_clean(&self) -> bool {
        self.status == VmStatus::Exited(0)
    }
}

/// Errors waiting for a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Waiting for the VMM process failed.
    #[error("waiting for the VMM (pid {pid})")]
    Wait {
        /// The VMM's pid.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A started VM: its process group (VMM and helpers), which member is the VMM, and its serial
/// log. Dropping it kills every process of the VM.
#[derive(Debug)]
pub struct RunningVm {
    group: ProcessGroup,
    vmm: MemberId,
    serial_log: PathBuf,
    started: Instant,
    exit: Option<VmExit>,
    /// How the VM ended, recorded before the (awaited) clean-up starts, so that a `wait`
    /// cancelled in the middle of it reports the first cause when called again, not the
    /// SIGKILL the clean-up itself sent.
    ending: Option<VmStatus>,
    /// Tried before the SIGKILL when the VM is ended while its VMM still runs.
    graceful: Option<Box<dyn GracefulStop>>,
}

impl RunningVm {
    /// For backends: wraps a group whose member `vmm` is the VMM process.
    pub fn new(group: ProcessGroup, vmm: MemberId, serial_log: PathBuf, started: Instant) -> Self {
        RunningVm {
            group,
            vmm,
            serial_log,
            started,
            exit: None,
            ending: None,
            graceful: None,
        }
    }

    /// For backends: a deadline, kill or failed helper first tries `stop` (see
    /// [`GracefulStop`]).
    pub fn with_graceful_stop(mut self, stop: impl GracefulStop + 'static) -> Self {
        self.graceful = Some(Box::new(stop));
        self
    }

    /// The pids of all the VM's host processes (VMM and helpers).
    pub fn pids(&self) -> Vec<u32> {
        self.group.pids()
    }

    /// The process group all of them are in.
    pub fn pgid(&self) -> Option<i32> {
        self.group.pgid()
    }

    /// The VMM's pid.
    pub fn vmm_pid(&self) -> u32 {
        self.group.pid(self.vmm)
    }

    /// Waits for the VMM to exit, or for a helper (virtio-fs daemon, vsock device) to fail,
    /// which ends the VM too; then kills and reaps the rest. A helper that exits cleanly
    /// (its VMM disconnected) is not a failure. Cancel-safe; once it returned, later calls
    /// return the same result.
    pub async fn wait(&mut self) -> Result<VmExit, VmError> {
        use std::os::unix::process::ExitStatusExt;
        loop {
            if let Some(exit) = &self.exit {
                return Ok(exit.clone());
            }
            if let Some(status) = self.ending.clone() {
                return Ok(self.finish(status).await);
            }
            let (id, status) = self
                .group
                .wait_any()
                .await
                .map_err(|source| VmError::Wait {
                    pid: self.group.pid(self.vmm),
                    source,
                })?;
            if id == self.vmm {
                let status = match (status.code(), status.signal()) {
                    (Some(code), _) => VmStatus::Exited(code),
                    (None, Some(signal)) => VmStatus::Signaled(signal),
                    (None, None) => VmStatus::Signaled(0),
                };
                return Ok(self.finish(status).await);
            }
            if !status.success() {
                let status = VmStatus::HelperFailed {
                    helper: self.group.name(id).to_owned(),
                    status: status.to_string(),
                };
                return Ok(self.finish(status).await);
            }
        }
    }

    /// Sets the nice value of all the VM's host processes (see [`ProcessGroup::renice`]).
    pub fn renice(&mut self, nice: i32) -> std::io::Result<()> {
        self.group.renice(nice)
    }

    /// Whether the VM has ended (or is being cleaned up after it did), without waiting: one
    /// look at its processes.
    pub fn has_ended(&mut self) -> bool {
        use futures::FutureExt;
        // A VM found ended starts its clean-up in this poll and records how it ended in
        // `ending`, so the answer holds even if the reaping is not finished yet.
        let _ = self.wait().now_or_never();
        self.exit.is_some() || self.ending.is_some()
    }

    /// Like [`RunningVm::wait`], but ends the VM at `deadline` as [`RunningVm::kill`] does.
    pub async fn wait_until(&mut self, deadline: Instant) -> Result<VmExit, VmError> {
        match tokio::time::timeout_at(deadline, self.wait()).await {
            Ok(result) => result,
            Err(_) => Ok(self.finish(VmStatus::DeadlineExceeded).await),
        }
    }

    /// Ends the VM (through its backend's [`GracefulStop`] first, if it has one), kills every
    /// process of the VM and reaps them. Idempotent.
    pub async fn kill(&mut self) -> VmExit {
        self.finish(VmStatus::Killed).await
    }

    async fn finish(&mut self, status: VmStatus) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let status = self.ending.get_or_insert(status).clone();
        let vmm_running = !matches!(status, VmStatus::Exited(_) | VmStatus::Signaled(_));
        if let Some(stop) = self.graceful.as_ref().filter(|_| vmm_running) {
            if tokio::time::timeout(GRACEFUL_STOP_LIMIT, stop.stop_gracefully())
                .await
                .is_err()
            {
                tracing::warn!(
                    pid = self.vmm_pid(),
                    "the VMM's graceful stop took more than {GRACEFUL_STOP_LIMIT:?}: killing the VM"
                );
            }
        }
        self.group.kill_and_reap().await;
        let vmm_log_tail =
            (status != VmStatus::Exited(0)).then(|| self.vmm_log_tail(LOG_TAIL_BYTES));
        let exit = VmExit {
            status,
            elapsed: self.started.elapsed(),
            vmm_log_tail,
        };
        self.exit = Some(exit.clone());
        exit
    }

    /// CPU time the VM's processes (the VMM and its helpers) have used on the host so far,
    /// boot included; read before they are killed.
    pub fn host_cpu_time(&self) -> Duration {
        self.group.cpu_time()
    }

    /// The serial log file.
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// The last `max_bytes` of the serial console, for error messages.
    pub fn serial_tail(&self, max_bytes: u64) -> String {
        logsink::tail(&self.serial_log, max_bytes)
    }

    /// The last `max_bytes` of the VMM's own log (its stderr).
    pub fn vmm_log_tail(&self, max_bytes: u64) -> String {
        logsink::tail(&self.group.log_path(self.vmm), max_bytes)
    }
}

#[cfg(test)]
mod tests;
