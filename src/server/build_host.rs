//! The one implementation behind every build RPC (seed `DoBuild`, 2024 `DoBuild`, the
//! streaming `Build`): refuse what cannot run here (the runner's host policy, decided once),
//! wait for a VM slot, run the build with
//! its log kept in the castore, and count the result.
//!
//! Each build runs in a task of its own, owned by a [`BuildHandle`]: dropping the handle
//! (tonic drops a handler's future when its client cancels or disconnects) aborts the
//! task, which drops the runner's future, which kills the VM and its helpers. At shutdown
//! the host first refuses new builds ([`BuildHost::drain`]) and, once the grace period is
//! over, cancels the running ones ([`BuildHost::cancel_all`]).

use super::admission::Admission;
use super::log_store::LogTee;
use super::peer::Peer;
use super::quota::UploadQuota;
use super::status::BuildError;
use super::tenant::Tenant;
use crate::agent::{LogChunk, LogRef};
use crate::castore::blob::floor::DiskFloor;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::{B3Digest, Node};
use crate::metrics::{BuildResult, Metrics, Phase};
use crate::provenance::attest::{Attestor, Origin, Record};
use crate::request::BuildRequest;
use crate::runner::{new_build_id, Runner};
use crate::wire::Finished;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

/// Something a streaming client hears while its build runs.
#[derive(Debug)]
pub enum Event {
    /// The build got its VM slot.
    Started {
        id: String,
        queued: Duration,
    },
    Log(LogChunk),
}

impl From<LogChunk> for Event {
    fn from(c: LogChunk) -> Self {
        Event::Log(c)
    }
}

pub struct BuildHost {
    runner: Arc<Runner>,
    admission: Admission,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    cancel: CancellationToken,
    /// Signs every successful build, when the host has a key.
    attestor: Option<Attestor>,
    /// The free space the store keeps: below it, new builds are refused.
    disk_floor: Option<Arc<DiskFloor>>,
    /// Charged with each successful build's output bytes, after the fact.
    quota: Option<Arc<UploadQuota>>,
    /// The embedded store, where finished builds are recorded as GC roots.
    records: Option<RedbDirectoryService>,
}

impl BuildHost {
    pub fn new(runner: Arc<Runner>, admission: Admission, metrics: Arc<Metrics>) -> Self {
        Self {
            runner,
            admission,
            metrics,
            draining: CancellationToken::new(),
            cancel: CancellationToken::new(),
            attestor: None,
            disk_floor: None,
            quota: None,
            records: None,
        }
    }

    /// Records every finished build (inputs, outputs, log) in the embedded store, so its
    /// GC keeps them for `keep-for` (see `castore::gc`).
    pub fn with_build_records(mut self, dirs: Option<RedbDirectoryService>) -> Self {
        self.records = dirs;
        self
    }

    /// Records a finished build's roots; a failure to record is logged, not the build's.
    async fn record(&self, id: &str, req: &BuildRequest, outputs: &[Node], log: Option<&LogRef>) {
        let Some(dirs) = &self.records else { return };
        let roots: Vec<B3Digest> = req
            .inputs
            .values()
            .chain(outputs)
            .filter_map(|n| n.digest().copied())
            .chain(log.map(|l| l.digest))
            .collect();
        if let Err(e) = crate::castore::gc::records::record_build(dirs, id, &roots).await {
            warn!(error = %crate::castore::error::error_chain(&e), "recording the build for the GC failed");
        }
    }

    /// Charges the outputs of a tenant's builds to its upload quota.
    pub fn with_quota(mut self, quota: Option<Arc<UploadQuota>>) -> Self {
        self.quota = quota;
        self
    }

    /// Refuses new builds while the store's filesystem is below `floor`.
    pub fn with_disk_floor(mut self, floor: Option<Arc<DiskFloor>>) -> Self {
        self.disk_floor = floor;
        self
    }

    /// Whether a new build would be taken now: not draining, and the store above its
    /// floor.
    pub fn ready(&self) -> Result<(), String> {
        if self.is_draining() {
            return Err("draining".into());
        }
        match &self.disk_floor {
            Some(floor) => floor.check().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// The request as the client sent it, kept for its provenance when this host signs.
    pub fn origin<M: prost::Message + serde::Serialize>(
        &self,
        dialect: &'static str,
        wire: &M,
    ) -> Option<Origin> {
        self.attestor.as_ref().map(|_| Origin::of(dialect, wire))
    }

    /// Signs every successful build with `attestor`'s key.
    pub fn with_attestor(mut self, attestor: Option<Attestor>) -> Self {
        self.attestor = attestor;
        self
    }

    pub fn runner(&self) -> &Arc<Runner> {
        &self.runner
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Builds running now.
    pub fn running(&self) -> usize {
        self.admission.running()
    }

    /// Requests waiting for a VM slot.
    pub fn queued(&self) -> usize {
        self.admission.queued()
    }

    /// The Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        let pool = self.runner.pool().map(|p| p.stats());
        let mut text = self.metrics.render(self.queued(), self.running(), pool);
        crate::metrics::render_tenant_gauges(&mut text, &self.admission.by_label());
        text
    }

    /// Refuses new builds from now on, and sends the queued ones away (`UNAVAILABLE`, so
    /// clients retry elsewhere); running ones go on.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Whether [`Self::drain`] was called: the host takes no new builds (`/readyz` says so).
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Ends every queued and running build now (their VMs are killed).
    pub fn cancel_all(&self) {
        self.drain();
        self.cancel.cancel();
    }

    /// Counts a request refused before it became a build (e.g. an invalid one).
    pub fn refused(&self, error: &BuildError) {
        self.metrics.count(error.result());
    }

    /// The tenant as a metric label (bounded: configured tenants, else `other`).
    fn label(&self, tenant: &Tenant) -> String {
        self.admission.shares().label(tenant).to_owned()
    }

    /// Starts `req` in a task of its own; `live` hears the start and the log as they come.
    pub fn start(
        self: &Arc<Self>,
        req: BuildRequest,
        origin: Option<Origin>,
        peer: &Peer,
        live: Option<mpsc::Sender<Event>>,
    ) -> BuildHandle {
        let id = new_build_id();
        let tenant = peer.tenant.clone();
        let span = info_span!("build", build_id = %id, tenant = %tenant, peer = %peer);
        let host = Arc::clone(self);
        let task_id = id.clone();
        let label = self.label(&tenant);
        let task_label = label.clone();
        let task = tokio::spawn(
            async move {
                let result = host.run(task_id, req, origin, &tenant, live).await;
                match &result {
                    Ok(f) => {
                        host.metrics.count_tenant(&task_label, BuildResult::Success);
                        info!(total_ms = f.total.as_millis() as u64, "build succeeded");
                    }
                    Err(e) => {
                        host.metrics.count_tenant(&task_label, e.result());
                        info!(code = ?e.code(), error = %e, "build did not succeed");
                    }
                }
                result
            }
            .instrument(span),
        );
        BuildHandle {
            id,
            task,
            metrics: Arc::clone(&self.metrics),
            tenant_label: label,
            done: false,
        }
    }

    async fn run(
        &self,
        id: String,
        req: BuildRequest,
        origin: Option<Origin>,
        tenant: &Tenant,
        live: Option<mpsc::Sender<Event>>,
    ) -> Result<Finished, BuildError> {
        let accepted = Instant::now();
        let accepted_at = SystemTime::now();
        // Held from here, not only while the runner builds: a build queued for longer than
        // the GC's grace period must not lose an input it was accepted with.
        let _inputs_in_use = crate::castore::gc::in_use::hold(
            req.inputs.values().filter_map(|n| n.digest().copied()),
        );
        if self.draining.is_cancelled() {
            return Err(BuildError::ShuttingDown);
        }
        if let Some(floor) = &self.disk_floor {
            floor.check()?;
        }
        // Decided once, at once: what can never run here is refused before it waits in
        // the queue.
        let decision = self.runner.policy().decide(&req)?;

        let slot = tokio::select! {
            slot = self.admission.admit(tenant) => slot?,
            _ = self.draining.cancelled() => return Err(BuildError::ShuttingDown),
        };
        let queued = accepted.elapsed();
        self.metrics.observe(Phase::Queue, queued);
        info!(queued_ms = queued.as_millis() as u64, "build started");
        if let Some(live) = &live {
            let _listener_gone = live
                .send(Event::Started {
                    id: id.clone(),
                    queued,
                })
                .await;
        }

        let max_log = self.runner.config().session_limits.max_log_bytes;
        let mut tee = LogTee::new(&**self.runner.blobs(), max_log, live).await;
        let result = tokio::select! {
            r = self.runner.build(&id, &req, &decision, &mut tee) => Some(r),
            _ = self.cancel.cancelled() => None,
        };
        let log = tee.finish().await;
        drop(slot);
        let outputs: Vec<Node> = match &result {
            Some(Ok(outcome)) => outcome.outputs.iter().map(|o| o.node.clone()).collect(),
            _ => Vec::new(),
        };
        self.record(&id, &req, &outputs, log.as_ref()).await;
        match result {
            None => {
                warn!("build cancelled by the shutdown");
                Err(BuildError::Cancelled { id })
            }
            Some(Ok(outcome)) => {
                self.metrics.observe(Phase::Boot, outcome.timings.boot);
                self.metrics.observe(Phase::Exec, outcome.timings.exec);
                self.metrics
                    .observe(Phase::Harvest, outcome.timings.harvest);
                self.metrics.observe_usage(&outcome.accounting);
                if let Some(quota) = &self.quota {
                    quota.charge_outputs(tenant, outcome.accounting.output_bytes);
                }
                let provenance = match (&self.attestor, &origin) {
                    (Some(attestor), Some(origin)) => {
                        let record = Record {
                            id: &id,
                            origin,
                            request: &req,
                            decision: &decision,
                            outcome: &outcome,
                            started: accepted_at,
                            finished: SystemTime::now(),
                        };
                        match attestor.attest(&self.runner, record).await {
                            Ok(a) => Some(a.stored),
                            Err(error) => return Err(BuildError::Attest { id, error, log }),
                        }
                    }
                    _ => None,
                };
                Ok(Finished {
                    id,
                    outcome,
                    queued,
                    total: accepted.elapsed(),
                    log,
                    provenance,
                    tenant: tenant.to_string(),
                })
            }
            Some(Err(error)) => Err(BuildError::Run { id, error, log }),
        }
    }
}

/// A running build. Dropping it before [`BuildHandle::finish`] returns ends the build and
/// kills its VM.
pub struct BuildHandle {
    id: String,
    task: JoinHandle<Result<Finished, BuildError>>,
    metrics: Arc<Metrics>,
    tenant_label: String,
    done: bool,
}

impl BuildHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the build's end.
    pub async fn finish(mut self) -> Result<Finished, BuildError> {
        let joined = (&mut self.task).await;
        self.done = true;
        joined.map_err(|e| BuildError::Task {
            id: self.id.clone(),
            reason: e.to_string(),
        })?
    }
}

impl Drop for BuildHandle {
    fn drop(&mut self) {
        if !self.done && !self.task.is_finished() {
            info!(build_id = %self.id, "the client went away: cancelling the build");
            self.metrics
                .count_tenant(&self.tenant_label, BuildResult::Cancelled);
        }
        self.task.abort();
    }
}
