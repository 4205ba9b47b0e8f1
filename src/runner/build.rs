//! The life of one build VM, from the request's constraints to the harvested outputs.

use super::accounting::Accounting;
use super::boot::{session_error, vm_died, FS_STATS_FILE};
use super::error::RunError;
use super::inputs;
use super::job::job_for;
use super::policy::Decision;
use super::Runner;
use crate::agent::{self, AgentHello, ExitStatus, LogSink};
use crate::castore::directory::Node;
use crate::fs::stats::read_stats_file;
use crate::refscan::Scanner;
use crate::request::{BuildRequest, RelativePath};
use crate::vm::{RunningVm, VmStatus};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, instrument};

/// How long each phase took, as the host saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    /// From starting the VMM to the agent's Hello; zero for a pre-booted VM, whose boot
    /// was paid before the request came.
    pub boot: Duration,
    /// From handing over the job to the command's exit.
    pub exec: Duration,
    /// From the command's exit to the last output stored.
    pub harvest: Duration,
    /// The whole build, from checking the inputs to the VM's end.
    pub total: Duration,
}

/// One output of a successful build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The path the request named.
    pub path: RelativePath,
    /// Its root node, stored in the castore.
    pub node: Node,
    /// The indices (ascending) of the request's `refscan_needles` its file contents and
    /// symlink targets hold.
    pub needles: Vec<u64>,
    /// The sum of its files' sizes, as received.
    pub bytes: u64,
}

/// A successful build.
#[derive(Debug)]
pub struct BuildOutcome {
    /// Each requested output, in request order.
    pub outputs: Vec<Output>,
    pub exit: ExitStatus,
    pub hello: AgentHello,
    pub timings: Timings,
    /// What the build cost.
    pub accounting: Accounting,
    /// The end of the build log.
    pub log_tail: String,
}

impl Runner {
    /// Runs `req` in a fresh VM of the shape the host policy decided for it (pre-booted if
    /// the runner has a pool with one of that shape); the live log goes to `sink`. Dropping the returned future kills the VM and
    /// its helpers and removes the runtime directory.
    // The caller reports a failure (the CLI prints it, the server answers and logs it).
    #[instrument(skip_all, fields(build_id = %id))]
    pub async fn build(
        &self,
        id: &str,
        req: &BuildRequest,
        decision: &Decision,
        sink: &mut dyn LogSink,
    ) -> Result<BuildOutcome, RunError> {
        let started = Instant::now();
        // No GC of the embedded store removes an input while this build may read it.
        let _inputs_in_use = crate::castore::gc::in_use::hold(
            req.inputs.values().filter_map(|n| n.digest().copied()),
        );
        let config = self.config();
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
        let root = inputs::root_directory(&req.inputs)?;
        let needles = Scanner::new(&req.refscan_needles)?;

        let pooled = self
            .pool
            .as_ref()
            .and_then(|pool| pool.take(decision.shape()));
        let limit = config.deadlines.helper_start;
        let (booted, boot) = match pooled {
            Some(mut vm) => {
                info!(vm = %vm.name(), "assigned a pre-booted VM");
                vm.assign_inputs(&root, limit).await?;
                (vm, Duration::ZERO)
            }
            None => {
                let vm = self
                    .booter
                    .boot(id, decision.shape().clone(), Some(&root), None)
                    .await?;
                let boot = vm.boot_time();
                (vm, boot)
            }
        };
        let hello = booted.hello().clone();
        let (rt, mut vm, greeted) = booted.into_parts();

        let exec_started = Instant::now();
        let mut running = greeted
            .send_job(job_for(req, decision))
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

        // The command is done: everything it read has been served.
        let input_reads = read_stats_file(&rt.join(FS_STATS_FILE));

        let harvest_started = Instant::now();
        let harvested = tokio::select! {
            r = running.harvest(&exit, &*self.blobs, &*self.dirs, &config.harvest_limits, &needles) => r,
            exit = vm.wait() => return Err(vm_died(&vm, exit, "the outputs were sent")),
        };
        let harvested = match harvested {
            Ok(h) => h,
            Err(e) => return Err(explain(&mut vm, e, log_tail, "the outputs were sent").await),
        };
        let harvest = harvest_started.elapsed();

        // Everything the VM had to give is stored, and it is never used again: end it now
        // rather than wait for the guest's power-off, which the client would wait for.
        let host_cpu = vm.host_cpu_time();
        vm.kill().await;

        let mut outputs = Vec::with_capacity(req.outputs.len());
        for (path, harvested) in req.outputs.iter().zip(harvested) {
            match harvested {
                Some(h) => outputs.push(Output {
                    path: path.clone(),
                    node: h.node,
                    needles: h.needles,
                    bytes: h.bytes,
                }),
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
        let accounting = Accounting {
            guest: exit.usage.clone(),
            host_cpu,
            input_reads,
            output_bytes: outputs
                .iter()
                .fold(0u64, |sum, o| sum.saturating_add(o.bytes)),
        };
        info!(
            total_ms = timings.total.as_millis() as u64,
            host_cpu_ms = accounting.host_cpu.as_millis() as u64,
            guest_cpu_ms = accounting.guest.cpu().map(|c| c.as_millis() as u64),
            guest_memory_peak = accounting.guest.memory_peak_bytes,
            output_bytes = accounting.output_bytes,
            input_bytes_read = accounting.input_reads.map(|r| r.bytes),
            "build succeeded"
        );
        Ok(BuildOutcome {
            outputs,
            exit,
            hello,
            timings,
            accounting,
            log_tail,
        })
    }
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
