//! The life of one build VM, from the request's constraints to the harvested outputs.

use super::error::{RunError, SessionFailure};
use super::inputs;
use super::job::{job_for, INPUTS_TAG};
use super::runtime_dir::RuntimeDir;
use super::Runner;
use crate::agent::{self, accept_hello, AgentHello, ExitStatus, LogSink};
use crate::castore::directory::Node;
use crate::request::{BuildRequest, RelativePath};
use crate::vm::process::{ProcessGroup, Stdout};
use crate::vm::vsock::HostListener;
use crate::vm::{cmdline, FsShare, HybridVsock, LaunchConfig, LaunchSpec, RunningVm, VmStatus};
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};
use tvix_build_vm_agent::DEFAULT_AGENT_PORT;

/// The guest's vsock context id; every VM has its own vsock device, so one value serves all.
const GUEST_CID: u32 = 3;
/// How much of the serial console goes into an error message.
const SERIAL_TAIL_BYTES: u64 = 4096;

/// How long each phase took, as the host saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    /// From starting the VMM to the agent's Hello.
    pub boot: Duration,
    /// From handing over the job to the command's exit.
    pub exec: Duration,
    /// From the command's exit to the last output stored.
    pub harvest: Duration,
    /// The whole build, from the constraint check to the VM's end.
    pub total: Duration,
}

/// A successful build.
#[derive(Debug)]
pub struct BuildOutcome {
    /// Each requested output path with its node, in request order.
    pub outputs: Vec<(RelativePath, Node)>,
    pub exit: ExitStatus,
    pub hello: AgentHello,
    pub timings: Timings,
    /// The end of the build log.
    pub log_tail: String,
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Setup { what, source }
}

impl Runner {
    /// Runs `req` in a fresh VM; the live log goes to `sink`. Dropping the returned future
    /// kills the VM and its helpers and removes the runtime directory.
    // The caller reports a failure (the CLI prints it, the server answers and logs it).
    #[instrument(skip_all, fields(build_id = %id))]
    pub async fn build(
        &self,
        id: &str,
        req: &BuildRequest,
        sink: &mut dyn LogSink,
    ) -> Result<BuildOutcome, RunError> {
        let started = Instant::now();
        let config = &self.config;
        let shape = config.offer.shape_for(req)?;
        let after = config.deadlines.castore;
        tokio::time::timeout(
            after,
            inputs::resolve(&req.inputs, &*self.blobs, &*self.dirs),
        )
        .await
        .map_err(|_elapsed| RunError::CastoreStalled {
            what: "checking the inputs",
            after,
        })??;

        let rt = RuntimeDir::create(&config.runtime_root, id)?;
        let root_file = rt.join("inputs.dir");
        tokio::fs::write(&root_file, inputs::root_directory(&req.inputs)?.encode())
            .await
            .map_err(setup(format!("writing {}", root_file.display())))?;

        let mut group = ProcessGroup::new(rt.path());
        let fs_socket = rt.join("fs.sock");
        let fsd = &config.fs_daemon;
        let mut cmd = tokio::process::Command::new(&fsd.program);
        cmd.arg("fs-daemon")
            .arg("--socket")
            .arg(&fs_socket)
            .arg("--root-directory")
            .arg(&root_file)
            .arg("--blob-service-addr")
            .arg(&fsd.blob_service_addr)
            .arg("--directory-service-addr")
            .arg(&fsd.directory_service_addr)
            .arg("--tag")
            .arg(INPUTS_TAG)
            .arg("--max-handles")
            .arg(fsd.max_handles.to_string());
        let fs_id = group
            .spawn("fs-daemon", cmd, Stdout::Log)
            .map_err(|e| RunError::FsDaemon {
                reason: e.to_string(),
                log_tail: String::new(),
            })?;
        wait_for_socket(&fs_socket, &mut group, fs_id, config.deadlines.helper_start).await?;

        let vsock_uds = rt.join("vsock.sock");
        let listener = HostListener::bind(&vsock_uds, DEFAULT_AGENT_PORT)
            .map_err(|e| setup("binding the agent's vsock listener")(std::io::Error::other(e)))?;
        let spec = LaunchSpec::new(LaunchConfig {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: vec![cmdline::agent_port(DEFAULT_AGENT_PORT)],
            memory_mib: shape.memory_mib,
            vcpus: config.vcpus,
            shares: vec![FsShare {
                tag: INPUTS_TAG.into(),
                socket: fs_socket,
            }],
            vsock: Some(HybridVsock {
                guest_cid: GUEST_CID,
                uds_path: vsock_uds,
            }),
            scratch_disk: None,
            serial_log: rt.join("serial.log"),
            nested_virt: shape.nested_virtualization,
            // Admission refused network access unless the operator allows it.
            network: req.constraints.network_access,
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
                Err(e) => {
                    let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
                    vm.kill().await;
                    if Instant::now() >= boot_deadline {
                        return Err(RunError::BootTimeout { after: config.deadlines.boot, serial_tail });
                    }
                    return Err(setup("accepting the agent's connection")(std::io::Error::other(e)));
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
        let hello = greeted.hello().clone();
        info!(boot_ms = boot.as_millis() as u64, agent = %hello.agent_version, "guest agent connected");

        let exec_started = Instant::now();
        let mut running = greeted
            .send_job(job_for(req, shape.memory_mib))
            .await
            .map_err(|e| session_error(&vm, e, String::new()))?;
        let exit = tokio::select! {
            r = running.run(sink) => r,
            exit = vm.wait() => return Err(vm_died(&vm, exit, "the command ran")),
        };
        let exec = exec_started.elapsed();
        let log_tail = running.log_tail().to_string_lossy();
        let exit = match exit {
            Ok(exit) => exit,
            Err(e) => return Err(explain(&mut vm, e, log_tail, "the command ran").await),
        };
        info!(status = ?exit.kind, oom = exit.oom_killed, exec_ms = exec.as_millis() as u64, "command exited");
        if let Err(failure) = exit.check() {
            // A failed build's outputs are not worth storing: end the VM now.
            vm.kill().await;
            return Err(session_error(&vm, agent::Error::Build(failure), log_tail));
        }

        let harvest_started = Instant::now();
        let harvested = tokio::select! {
            r = running.harvest(&exit, &*self.blobs, &*self.dirs, &config.harvest_limits) => r,
            exit = vm.wait() => return Err(vm_died(&vm, exit, "the outputs were sent")),
        };
        let harvested = match harvested {
            Ok(h) => h,
            Err(e) => return Err(explain(&mut vm, e, log_tail, "the outputs were sent").await),
        };
        let harvest = harvest_started.elapsed();

        // The connection is closed (harvest consumed it), which tells the agent to power off.
        let shutdown_deadline = Instant::now() + config.deadlines.shutdown;
        match vm.wait_until(shutdown_deadline).await {
            Ok(end) if end.is_clean() => {}
            Ok(end) => warn!(?end, "VM did not power off cleanly after the build"),
            Err(e) => warn!(error = %e, "waiting for the VM to power off"),
        }
        vm.kill().await;

        let mut outputs = Vec::with_capacity(req.outputs.len());
        for (path, node) in req.outputs.iter().zip(harvested) {
            match node {
                Some(node) => outputs.push((path.clone(), node)),
                None => {
                    return Err(RunError::OutputMissing {
                        output: path.to_string(),
                        log_tail,
                    })
                }
            }
        }
        let timings = Timings {
            boot,
            exec,
            harvest,
            total: started.elapsed(),
        };
        info!(
            total_ms = timings.total.as_millis() as u64,
            "build succeeded"
        );
        Ok(BuildOutcome {
            outputs,
            exit,
            hello,
            timings,
            log_tail,
        })
    }
}

fn vm_died(
    vm: &RunningVm,
    exit: Result<crate::vm::VmExit, crate::vm::VmError>,
    during: &'static str,
) -> RunError {
    let serial_tail = vm.serial_tail(SERIAL_TAIL_BYTES);
    match exit {
        Ok(crate::vm::VmExit {
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

fn session_error(vm: &RunningVm, error: agent::Error, log_tail: String) -> RunError {
    RunError::Session(Box::new(SessionFailure {
        error,
        log_tail,
        serial_tail: vm.serial_tail(SERIAL_TAIL_BYTES),
    }))
}

/// How long a VM that lost its conversation gets to show whether it ended badly.
const VM_END_GRACE: Duration = Duration::from_secs(2);

/// A broken conversation may be the symptom, not the cause: a helper or the VMM that died
/// takes the guest's connection with it. If the VM ends badly right after, that is the
/// error to report; a VM that powered off cleanly leaves the guest's own protocol breach.
async fn explain(
    vm: &mut RunningVm,
    error: agent::Error,
    log_tail: String,
    during: &'static str,
) -> RunError {
    // Only a lost connection can be the VM's or a helper's death showing through; any
    // other protocol breach is the guest's own, and needs no wait.
    let connection_lost = matches!(
        error,
        agent::Error::Protocol(agent::error::ProtocolError::Closed { .. })
            | agent::Error::Infra(agent::error::InfraError::Io { .. })
    );
    if connection_lost {
        if let Ok(end) = tokio::time::timeout(VM_END_GRACE, vm.wait()).await {
            let clean = matches!(&end, Ok(e) if e.status == VmStatus::Exited(0));
            if !clean {
                return vm_died(vm, end, during);
            }
        }
    }
    session_error(vm, error, log_tail)
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
