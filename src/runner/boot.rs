//! Booting a build VM up to its agent's Hello, before (pooled) or after (cold) its request
//! is known.
//!
//! The VM's virtio-fs daemon reads its root (the build's inputs) from its stdin. A cold
//! build hands it over as the daemon starts; a pre-booted VM gets it when it is assigned a
//! request ([`BootedVm::assign_inputs`]). Until then its guest can mount the share (the
//! agent does, before its Hello) but sees no entry, and the agent waits for its job.
//! Otherwise cold and pooled VMs are booted the same way.

use super::error::{RunError, SessionFailure};
use super::job::{ro_share_tag, INPUTS_TAG};
use super::policy::BootShape;
use super::runtime_dir::RuntimeDir;
use super::RunnerConfig;
use crate::agent::{self, accept_hello, AgentHello, Greeted};
use crate::castore::directory::Directory;
use crate::fs::spec::{DEFAULT_MAX_INODES, DEFAULT_THREADS};
use crate::fs::{DaemonSpec, RootSource, ShareSource};
use crate::vm::process::{ProcessGroup, Stdout};
use crate::vm::vsock::{HostListener, VsockError};
use crate::vm::{
    cmdline, FsShare, HybridVsock, LaunchConfig, LaunchSpec, RunningVm, VmExit, VmStatus,
    VmmBackend,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::process::ChildStdin;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use tvix_build_vm_agent::DEFAULT_AGENT_PORT;

/// The guest's vsock context id; every VM has its own vsock device, so one value serves all.
const GUEST_CID: u32 = 3;
/// Host descriptors the guest may hold in one read-only host directory share (looked-up
/// entries and open files together): enough for a tree of thousands of files.
const RO_SHARE_MAX_FDS: u64 = 8192;
/// The inputs' fs-daemon's log in a VM's runtime directory (the process group names each
/// member's log after it).
const FS_DAEMON_LOG: &str = "fs-daemon.log";
/// The inputs' daemon counts what it served here, in the runtime directory.
pub(super) const FS_STATS_FILE: &str = "fs.stats";
/// How much of the serial console goes into an error message.
pub(super) const SERIAL_TAIL_BYTES: u64 = 4096;

/// Boots VMs for a runner; cheap to clone into the pool's filler task.
#[derive(Clone)]
pub(super) struct Booter {
    pub config: Arc<RunnerConfig>,
    pub vmm: Arc<dyn VmmBackend>,
}

/// A VM whose agent said Hello and waits for its one job, its share not yet given its root.
/// Dropping it kills the VM and its helpers and removes its runtime directory.
pub struct BootedVm {
    // Fields drop in this order: the conversation and the pipe first, then the processes,
    // then their directory.
    greeted: Greeted<UnixStream>,
    /// The fs-daemon's stdin, until it has been given the share's root.
    root_pipe: Option<ChildStdin>,
    vm: RunningVm,
    rt: RuntimeDir,
    boot: Duration,
    shape: BootShape,
    background: Option<Background>,
}

/// The priorities of a VM booted in the background: it must not slow the builds that run
/// meanwhile, and must run as fast as they do once it has a build of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Background {
    /// While booting and idle.
    pub nice: i32,
    /// Once assigned: the service's own.
    pub foreground: i32,
}

impl std::fmt::Debug for BootedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootedVm")
            .field("runtime_dir", &self.rt.path())
            .field("pids", &self.vm.pids())
            .field("shape", &self.shape)
            .finish()
    }
}

impl Booter {
    /// Starts the helpers and the VM in a runtime directory called `name`, and waits for the
    /// agent's Hello. `inputs`: the share's root, if already known (else
    /// [`BootedVm::assign_inputs`] gives it later). With `background`, the VM's processes
    /// run at that nice value until it is assigned a build, when they get the service's own
    /// (see [`Background`]).
    pub async fn boot(
        &self,
        name: &str,
        shape: BootShape,
        inputs: Option<&Directory>,
        background: Option<Background>,
    ) -> Result<BootedVm, RunError> {
        let config = &self.config;
        let rt = RuntimeDir::create(&config.runtime_root, name)?;
        let mut group = ProcessGroup::new(rt.path());
        if let Some(bg) = background {
            group.start_niced(bg.nice);
        }
        let fs_socket = rt.join("fs.sock");
        let fsd = &config.fs_daemon;
        let mut cmd = tokio::process::Command::new(&fsd.program);
        cmd.args(
            DaemonSpec {
                socket: fs_socket.clone(),
                source: ShareSource::Castore {
                    root: RootSource::Stdin,
                    blob_service_addr: fsd.blob_service_addr.clone(),
                    directory_service_addr: fsd.directory_service_addr.clone(),
                },
                tag: Some(INPUTS_TAG.into()),
                max_handles: fsd.max_handles,
                max_inodes: DEFAULT_MAX_INODES,
                threads: DEFAULT_THREADS,
                stats: Some(rt.join(FS_STATS_FILE)),
            }
            .to_args(),
        );
        let (fs_id, mut root_pipe) = group
            .spawn_with_stdin("fs-daemon", cmd, Stdout::Log)
            .map_err(|e| RunError::FsDaemon {
                reason: e.to_string(),
                log_tail: String::new(),
            })?;
        let root_pipe = match inputs {
            Some(root) => {
                let log = group.log_path(fs_id);
                hand_root(&mut root_pipe, root, config.deadlines.helper_start, &log).await?;
                None
            }
            None => Some(root_pipe),
        };
        // The read-only host directories' daemons start while the inputs' one gets ready.
        let mut shares = vec![FsShare {
            tag: INPUTS_TAG.into(),
            socket: fs_socket,
        }];
        let mut waiting = vec![fs_id];
        for (i, path) in shape.ro_paths.iter().enumerate() {
            let tag = ro_share_tag(i);
            let socket = rt.join(&format!("{tag}.sock"));
            let mut cmd = tokio::process::Command::new(&fsd.program);
            cmd.args(
                DaemonSpec {
                    socket: socket.clone(),
                    source: ShareSource::HostDir(path.into()),
                    tag: Some(tag.clone()),
                    max_handles: RO_SHARE_MAX_FDS,
                    max_inodes: DEFAULT_MAX_INODES,
                    threads: DEFAULT_THREADS,
                    stats: None,
                }
                .to_args(),
            );
            let id = group
                .spawn(&format!("fs-{tag}"), cmd, Stdout::Log)
                .map_err(|e| RunError::FsDaemon {
                    reason: format!("for {path}: {e}"),
                    log_tail: String::new(),
                })?;
            waiting.push(id);
            shares.push(FsShare { tag, socket });
        }
        for (share, id) in shares.iter().zip(waiting) {
            wait_for_socket(&share.socket, &mut group, id, config.deadlines.helper_start).await?;
        }

        let vsock_uds = rt.join("vsock.sock");
        let listener = HostListener::bind(&vsock_uds, DEFAULT_AGENT_PORT).map_err(|source| {
            RunError::Vsock {
                what: "binding the agent's vsock listener",
                source,
            }
        })?;
        let spec = LaunchSpec::new(LaunchConfig {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: vec![cmdline::agent_port(DEFAULT_AGENT_PORT)],
            memory_mib: shape.memory_mib,
            vcpus: config.vcpus,
            shares,
            vsock: Some(HybridVsock {
                guest_cid: GUEST_CID,
                uds_path: vsock_uds,
            }),
            scratch_disk: None,
            serial_log: rt.join("serial.log"),
            nested_virt: shape.nested_virtualization,
            network: shape.network,
            runtime_dir: rt.path().to_owned(),
            accel: config.accel,
        })?;

        let boot_started = Instant::now();
        let mut vm = self.vmm.launch(&spec, group).await?;
        debug!(pids = ?vm.pids(), "VM started");
        let boot_deadline = boot_started + config.deadlines.boot;

        let stream = tokio::select! {
            accepted = listener.accept(boot_deadline) => match accepted {
                Ok(stream) => stream,
                Err(source) => {
                    let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
                    vm.kill().await;
                    return Err(match source {
                        VsockError::AcceptTimeout { .. } => {
                            RunError::BootTimeout { after: config.deadlines.boot, serial_tail }
                        }
                        source => RunError::Vsock { what: "accepting the agent's connection", source },
                    });
                }
            },
            exit = vm.wait() => return Err(vm_died(&vm, exit, "booting")),
        };
        // The agent's one connection is made: stop listening, so that nothing else in the
        // guest (the build itself) can open another to the host.
        drop(listener);
        let remaining = boot_deadline.saturating_duration_since(Instant::now());
        let greeted = tokio::select! {
            r = accept_hello(stream, config.session_limits.clone(), remaining) => {
                r.map_err(|e| session_error(&vm, e, String::new()))?
            }
            exit = vm.wait() => return Err(vm_died(&vm, exit, "waiting for the agent's Hello")),
        };
        let boot = boot_started.elapsed();
        info!(
            boot_ms = boot.as_millis() as u64,
            agent = %greeted.hello().agent_version,
            "guest agent connected"
        );
        Ok(BootedVm {
            greeted,
            root_pipe,
            vm,
            rt,
            boot,
            shape,
            background,
        })
    }
}

impl BootedVm {
    /// From starting the VMM to the agent's Hello.
    pub fn boot_time(&self) -> Duration {
        self.boot
    }

    pub fn shape(&self) -> &BootShape {
        &self.shape
    }

    pub fn hello(&self) -> &AgentHello {
        self.greeted.hello()
    }

    /// The runtime directory's name.
    pub fn name(&self) -> String {
        self.rt
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether the VM (or one of its helpers) has ended since it booted.
    pub fn has_ended(&mut self) -> bool {
        self.vm.has_ended()
    }

    /// Gives the share its root: the build's inputs. Must come before the job, whose command
    /// will look at them.
    pub async fn assign_inputs(
        &mut self,
        root: &Directory,
        limit: Duration,
    ) -> Result<(), RunError> {
        if let Some(bg) = self.background.take() {
            // Not fatal: the build then runs at background priority, slower under load.
            if let Err(e) = self.vm.renice(bg.foreground) {
                warn!(error = %e, nice = bg.foreground, "cannot bring a pre-booted VM to the foreground");
            }
        }
        let Some(mut pipe) = self.root_pipe.take() else {
            return Err(RunError::FsDaemon {
                reason: "its inputs were already assigned".into(),
                log_tail: String::new(),
            });
        };
        hand_root(&mut pipe, root, limit, &self.rt.join(FS_DAEMON_LOG)).await
    }

    /// Splits the VM into its parts for the rest of the build, in the order to bind them:
    /// bindings drop in reverse, so the conversation ends first, then the processes, then
    /// their directory goes.
    pub(super) fn into_parts(self) -> (RuntimeDir, RunningVm, Greeted<UnixStream>) {
        (self.rt, self.vm, self.greeted)
    }
}

/// Writes the share's root into the fs-daemon's stdin and closes it (the end of the pipe is
/// the end of the message).
async fn hand_root(
    pipe: &mut ChildStdin,
    root: &Directory,
    limit: Duration,
    log: &Path,
) -> Result<(), RunError> {
    let bytes = root.encode();
    let write = async {
        pipe.write_all(&bytes).await?;
        pipe.shutdown().await
    };
    let failed = match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("it did not take the inputs: {e}"),
        Err(_elapsed) => format!("it did not take the inputs within {limit:?}"),
    };
    Err(RunError::FsDaemon {
        reason: failed,
        log_tail: crate::vm::logsink::tail(log, 4096),
    })
}

pub(super) fn vm_died(
    vm: &RunningVm,
    exit: Result<VmExit, crate::vm::VmError>,
    during: &'static str,
) -> RunError {
    let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
    match exit {
        Ok(VmExit {
            status: VmStatus::HelperFailed { helper, status },
            ..
        }) => RunError::HelperDied {
            helper,
            status,
            serial_tail,
        },
        Ok(end) => RunError::VmDied {
            status: end.status,
            during,
            serial_tail,
        },
        Err(e) => RunError::HelperDied {
            helper: "VMM".into(),
            status: e.to_string(),
            serial_tail,
        },
    }
}

pub(super) fn session_error(vm: &RunningVm, error: agent::Error, log_tail: String) -> RunError {
    RunError::Session(Box::new(SessionFailure {
        error,
        log_tail,
        serial_tail: vm.serial_tail(SERIAL_TAIL_BYTES),
        fs_daemon_problems: fs_daemon_problems(vm),
    }))
}

/// The warnings and errors the inputs' fs-daemon logged (its log sits next to the serial
/// log, in the VM's runtime directory): a guest that read an input wrong sees only EIO, and
/// this says why (a blob shorter than its node says, a castore that failed). Empty when it
/// logged none.
fn fs_daemon_problems(vm: &RunningVm) -> String {
    let Some(dir) = vm.serial_log().parent() else {
        return String::new();
    };
    let log = crate::vm::logsink::tail(&dir.join(FS_DAEMON_LOG), SERIAL_TAIL_BYTES);
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the daemon listens on `socket`, or fails with its log if it exits first or
/// takes longer than `limit`.
async fn wait_for_socket(
    socket: &Path,
    group: &mut ProcessGroup,
    id: crate::vm::process::MemberId,
    limit: Duration,
) -> Result<(), RunError> {
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(1);
    loop {
        if tokio::fs::symlink_metadata(socket).await.is_ok() {
            return Ok(());
        }
        let log_path = group.log_path(id);
        let log_tail = || crate::vm::logsink::tail(&log_path, 4096);
        if let Ok(Some(status)) = group.try_wait(id) {
            return Err(RunError::FsDaemon {
                reason: format!("it exited ({status}) before listening"),
                log_tail: log_tail(),
            });
        }
        if Instant::now() >= deadline {
            return Err(RunError::FsDaemon {
                reason: format!("it did not listen on {} within {limit:?}", socket.display()),
                log_tail: log_tail(),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}
