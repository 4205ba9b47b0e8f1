//! Service metrics in the Prometheus text format: builds by result, queue depth, VMs
//! running, histograms of the phases of a build and of what successful builds cost (CPU
//! time, peak memory, bytes read and written), and bytes charged to tenants' upload quotas.

use crate::runner::pool::PoolStats;
use crate::runner::Accounting;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The per-tenant gauges: VMs running and requests waiting by tenant label (configured
/// tenants by name, the rest as `other`).
pub fn render_tenant_gauges(out: &mut String, by_label: &BTreeMap<String, (usize, usize)>) {
    if by_label.is_empty() {
        return;
    }
    for (name, help, pick) in [
        (
            "tenant_vms_running",
            "VMs running now, by tenant.",
            (|v: &(usize, usize)| v.0) as fn(&(usize, usize)) -> usize,
        ),
        (
            "tenant_queue_depth",
            "Requests waiting for a VM, by tenant.",
            |v| v.1,
        ),
    ] {
        let _ = writeln!(out, "# HELP tvix_build_vm_{name} {help}");
        let _ = writeln!(out, "# TYPE tvix_build_vm_{name} gauge");
        for (tenant, v) in by_label {
            let _ = writeln!(
                out,
                "tvix_build_vm_{name}{{tenant=\"{tenant}\"}} {}",
                pick(v)
            );
        }
    }
}

/// Bucket upper bounds in seconds: from a fast boot under KVM to a long build.
const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];
/// Bucket upper bounds in bytes: 1 KiB to 64 GiB in steps of 8.
const BYTE_BUCKETS: &[f64] = &[
    1024.0,
    8192.0,
    65536.0,
    524288.0,
    4194304.0,
    33554432.0,
    268435456.0,
    2147483648.0,
    17179869184.0,
    68719476736.0,
];

/// How a build ended, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BuildResult {
    Success,
    /// The command failed (exit code, signal, OOM) or an output was missing.
    Failed,
    /// A deadline fired.
    Timeout,
    /// The request was invalid or unsatisfiable, or the queue was full.
    Refused,
    /// The guest broke the protocol or a limit.
    GuestError,
    /// Our own infrastructure failed.
    InternalError,
    Cancelled,
}

impl BuildResult {
    const ALL: [BuildResult; 7] = [
        Self::Success,
        Self::Failed,
        Self::Timeout,
        Self::Refused,
        Self::GuestError,
        Self::InternalError,
        Self::Cancelled,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::GuestError => "guest_error",
            Self::InternalError => "internal_error",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Where bytes charged to a tenant's upload quota came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadSource {
    /// Blobs and directories uploaded through the castore services.
    Castore,
    /// The outputs of the tenant's builds.
    BuildOutput,
}

impl UploadSource {
    const ALL: [UploadSource; 2] = [Self::Castore, Self::BuildOutput];

    fn label(self) -> &'static str {
        match self {
            Self::Castore => "castore",
            Self::BuildOutput => "build_output",
        }
    }
}

/// By tenant label: bytes charged by [`UploadSource`], and uploads refused over quota.
#[derive(Debug, Default, Clone, Copy)]
struct TenantUploads {
    bytes: [u64; UploadSource::ALL.len()],
    refused: u64,
}

/// The phases of a build whose durations are recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Queue,
    Boot,
    Exec,
    Harvest,
}

impl Phase {
    const ALL: [Phase; 4] = [Self::Queue, Self::Boot, Self::Exec, Self::Harvest];

    fn label(self) -> &'static str {
        match self {
            Self::Queue => "queue",
            Self::Boot => "boot",
            Self::Exec => "exec",
            Self::Harvest => "harvest",
        }
    }
}

#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Cumulative counts per bucket, then +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                self.counts[i] += 1;
            }
        }
        self.counts[self.bounds.len()] += 1;
        self.sum += value;
    }
}

/// The cost histograms of successful builds, by series.
#[derive(Debug)]
struct Usage {
    /// CPU seconds: the guest's word on its build, the host's VM processes.
    cpu: [Histogram; 2],
    memory_peak: Histogram,
    /// Bytes: read from the inputs, written to the outputs.
    bytes: [Histogram; 2],
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            cpu: [Histogram::new(BUCKETS), Histogram::new(BUCKETS)],
            memory_peak: Histogram::new(BYTE_BUCKETS),
            bytes: [Histogram::new(BYTE_BUCKETS), Histogram::new(BYTE_BUCKETS)],
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    results: [AtomicU64; BuildResult::ALL.len()],
    /// By tenant label: the configured tenants and `other`, so bounded by the config.
    tenant_results: Mutex<BTreeMap<String, [u64; BuildResult::ALL.len()]>>,
    /// By tenant label, like `tenant_results`.
    tenant_uploads: Mutex<BTreeMap<String, TenantUploads>>,
    histograms: Mutex<[Histogram; Phase::ALL.len()]>,
    usage: Mutex<Usage>,
    gc: Mutex<GcTotals>,
}

/// The embedded store's garbage collections so far.
#[derive(Debug, Default, Clone, Copy)]
struct GcTotals {
    runs: u64,
    failed: u64,
    bytes_freed: u64,
    blobs_removed: u64,
    directories_removed: u64,
    seconds: f64,
    last_seconds: f64,
}

/// What one garbage collection removed (for [`Metrics::observe_gc`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct GcRun {
    pub bytes_freed: u64,
    pub blobs_removed: u64,
    pub directories_removed: u64,
    pub seconds: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            results: Default::default(),
            tenant_results: Mutex::default(),
            tenant_uploads: Mutex::default(),
            histograms: Mutex::new(Phase::ALL.map(|_| Histogram::new(BUCKETS))),
            usage: Mutex::default(),
            gc: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Counts one garbage collection: `None` if it failed.
    pub fn observe_gc(&self, run: Option<GcRun>) {
        let mut g = self.gc.lock().unwrap_or_else(|e| e.into_inner());
        g.runs += 1;
        match run {
            Some(r) => {
                g.bytes_freed += r.bytes_freed;
                g.blobs_removed += r.blobs_removed;
                g.directories_removed += r.directories_removed;
                g.seconds += r.seconds;
                g.last_seconds = r.seconds;
            }
            None => g.failed += 1,
        }
    }

    fn render_gc(&self, out: &mut String) {
        let g = *self.gc.lock().unwrap_or_else(|e| e.into_inner());
        if g.runs == 0 {
            return;
        }
        for (name, kind, help, value) in [
            (
                "gc_runs_total",
                "counter",
                "Garbage collections of the embedded store.",
                g.runs as f64,
            ),
            (
                "gc_failures_total",
                "counter",
                "Garbage collections that failed.",
                g.failed as f64,
            ),
            (
                "gc_bytes_freed_total",
                "counter",
                "Bytes of blobs the GC removed.",
                g.bytes_freed as f64,
            ),
            (
                "gc_blobs_removed_total",
                "counter",
                "Blobs the GC removed.",
                g.blobs_removed as f64,
            ),
            (
                "gc_directories_removed_total",
                "counter",
                "Directories the GC removed.",
                g.directories_removed as f64,
            ),
            (
                "gc_seconds_total",
                "counter",
                "Time spent in garbage collections.",
                g.seconds,
            ),
            (
                "gc_last_seconds",
                "gauge",
                "Duration of the last successful garbage collection.",
                g.last_seconds,
            ),
        ] {
            let _ = writeln!(out, "# HELP tvix_build_vm_{name} {help}");
            let _ = writeln!(out, "# TYPE tvix_build_vm_{name} {kind}");
            let _ = writeln!(out, "tvix_build_vm_{name} {value}");
        }
    }

    pub fn count(&self, result: BuildResult) {
        if let Some(i) = BuildResult::ALL.iter().position(|r| *r == result) {
            self.results[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a build of a tenant, in the totals and by `tenant`, a bounded label (see
    /// [`crate::server::admission::Shares::label`]).
    pub fn count_tenant(&self, tenant: &str, result: BuildResult) {
        self.count(result);
        if let Some(i) = BuildResult::ALL.iter().position(|r| *r == result) {
            let mut t = self
                .tenant_results
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match t.get_mut(tenant) {
                Some(counts) => counts[i] += 1,
                None => {
                    let mut counts = [0; BuildResult::ALL.len()];
                    counts[i] = 1;
                    t.insert(tenant.to_owned(), counts);
                }
            }
        }
    }

    /// Counts bytes stored for a tenant (a bounded label, as in [`Self::count_tenant`]).
    pub fn count_upload_bytes(&self, tenant: &str, source: UploadSource, bytes: u64) {
        let i = UploadSource::ALL.iter().position(|s| *s == source);
        self.tenant_upload(tenant, |u| {
            if let Some(i) = i {
                u.bytes[i] = u.bytes[i].saturating_add(bytes);
            }
        });
    }

    /// Counts an upload refused over its tenant's quota.
    pub fn count_upload_refused(&self, tenant: &str) {
        self.tenant_upload(tenant, |u| u.refused += 1);
    }

    fn tenant_upload(&self, tenant: &str, f: impl FnOnce(&mut TenantUploads)) {
        let mut t = self
            .tenant_uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match t.get_mut(tenant) {
            Some(u) => f(u),
            None => {
                let mut u = TenantUploads::default();
                f(&mut u);
                t.insert(tenant.to_owned(), u);
            }
        }
    }

    pub fn observe(&self, phase: Phase, d: Duration) {
        if let Some(i) = Phase::ALL.iter().position(|p| *p == phase) {
            let mut h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
            h[i].observe(d.as_secs_f64());
        }
    }

    /// Records what a successful build cost; figures that were not measured are left out.
    pub fn observe_usage(&self, a: &Accounting) {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cpu) = a.guest.cpu() {
            u.cpu[0].observe(cpu.as_secs_f64());
        }
        u.cpu[1].observe(a.host_cpu.as_secs_f64());
        if let Some(peak) = a.guest.memory_peak_bytes {
            u.memory_peak.observe(peak as f64);
        }
        if let Some(reads) = a.input_reads {
            u.bytes[0].observe(reads.bytes as f64);
        }
        u.bytes[1].observe(a.output_bytes as f64);
    }

    fn render_tenant_uploads(&self, out: &mut String) {
        let t = self
            .tenant_uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if t.is_empty() {
            return;
        }
        counter_family(
            out,
            "tenant_upload_bytes_total",
            "Bytes charged to tenants' upload quotas (configured tenants by name, all others as \"other\"), by source.",
        );
        for (tenant, u) in t.iter() {
            for (s, n) in UploadSource::ALL.iter().zip(u.bytes) {
                let _ = writeln!(
                    out,
                    "tvix_build_vm_tenant_upload_bytes_total{{tenant=\"{tenant}\",source=\"{}\"}} {n}",
                    s.label()
                );
            }
        }
        counter_family(
            out,
            "tenant_uploads_refused_total",
            "Castore uploads refused over the tenant's upload quota.",
        );
        for (tenant, u) in t.iter() {
            let _ = writeln!(
                out,
                "tvix_build_vm_tenant_uploads_refused_total{{tenant=\"{tenant}\"}} {}",
                u.refused
            );
        }
    }

    /// The text exposition, with the gauges read at the time of the scrape (`pool`: the
    /// pre-booted VMs' counters, if there is a pool).
    pub fn render(&self, queued: usize, running: usize, pool: Option<PoolStats>) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP tvix_build_vm_builds_total Builds by result.");
        let _ = writeln!(out, "# TYPE tvix_build_vm_builds_total counter");
        for (i, r) in BuildResult::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "tvix_build_vm_builds_total{{result=\"{}\"}} {}",
                r.label(),
                self.results[i].load(Ordering::Relaxed)
            );
        }
        let t = self
            .tenant_results
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !t.is_empty() {
            let _ = writeln!(
                out,
                "# HELP tvix_build_vm_tenant_builds_total Builds by tenant (configured tenants by name, all others as \"other\") and result."
            );
            let _ = writeln!(out, "# TYPE tvix_build_vm_tenant_builds_total counter");
            for (tenant, counts) in t.iter() {
                for (r, n) in BuildResult::ALL.iter().zip(counts) {
                    let _ = writeln!(
                        out,
                        "tvix_build_vm_tenant_builds_total{{tenant=\"{tenant}\",result=\"{}\"}} {n}",
                        r.label()
                    );
                }
            }
        }
        drop(t);
        self.render_tenant_uploads(&mut out);
        let _ = writeln!(
            out,
            "# HELP tvix_build_vm_queue_depth Requests waiting for a VM."
        );
        let _ = writeln!(out, "# TYPE tvix_build_vm_queue_depth gauge");
        let _ = writeln!(out, "tvix_build_vm_queue_depth {queued}");
        let _ = writeln!(out, "# HELP tvix_build_vm_vms_running VMs running now.");
        let _ = writeln!(out, "# TYPE tvix_build_vm_vms_running gauge");
        let _ = writeln!(out, "tvix_build_vm_vms_running {running}");
        if let Some(pool) = pool {
            render_pool(&mut out, &pool);
        }
        let h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        let phases: Vec<_> = Phase::ALL
            .iter()
            .zip(h.iter())
            .map(|(p, h)| (format!("phase=\"{}\"", p.label()), h))
            .collect();
        render_histograms(
            &mut out,
            "phase_seconds",
            "Duration of each phase of a build.",
            &phases,
        );
        drop(h);
        let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        render_histograms(
            &mut out,
            "build_cpu_seconds",
            "CPU time of successful builds: the build's processes in the guest (the guest's word) and the VM's processes on the host.",
            &[
                ("side=\"guest\"".to_owned(), &u.cpu[0]),
                ("side=\"host\"".to_owned(), &u.cpu[1]),
            ],
        );
        render_histograms(
            &mut out,
            "build_memory_peak_bytes",
            "Peak memory of successful builds in the guest (the guest's word).",
            &[(String::new(), &u.memory_peak)],
        );
        render_histograms(
            &mut out,
            "build_bytes",
            "Bytes successful builds read from their inputs and wrote to their outputs.",
            &[
                ("kind=\"input_read\"".to_owned(), &u.bytes[0]),
                ("kind=\"output\"".to_owned(), &u.bytes[1]),
            ],
        );
        drop(u);
        self.render_gc(&mut out);
        out
    }
}

/// The HELP and TYPE lines of counter `tvix_build_vm_<name>`.
fn counter_family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP tvix_build_vm_{name} {help}");
    let _ = writeln!(out, "# TYPE tvix_build_vm_{name} counter");
}

/// One histogram family, each series with its labels (`key="value"`, or empty).
fn render_histograms(out: &mut String, name: &str, help: &str, series: &[(String, &Histogram)]) {
    let _ = writeln!(out, "# HELP tvix_build_vm_{name} {help}");
    let _ = writeln!(out, "# TYPE tvix_build_vm_{name} histogram");
    for (labels, h) in series {
        let sep = if labels.is_empty() { "" } else { "," };
        let total = h.counts[h.bounds.len()];
        for (b, bound) in h.bounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "tvix_build_vm_{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                h.counts[b]
            );
        }
        let _ = writeln!(
            out,
            "tvix_build_vm_{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}"
        );
        let braces = |l: &str| match l.is_empty() {
            true => String::new(),
            false => format!("{{{l}}}"),
        };
        let _ = writeln!(out, "tvix_build_vm_{name}_sum{} {}", braces(labels), h.sum);
        let _ = writeln!(out, "tvix_build_vm_{name}_count{} {total}", braces(labels));
    }
}

fn render_pool(out: &mut String, pool: &PoolStats) {
    let gauges = [(
        "pool_idle_vms",
        "Pre-booted VMs waiting for a request.",
        pool.idle as u64,
    )];
    let counters = [
        (
            "pool_hits_total",
            "Builds served by a pre-booted VM.",
            pool.hits,
        ),
        (
            "pool_misses_total",
            "Builds of the pool's shape that found no pre-booted VM waiting.",
            pool.misses,
        ),
        (
            "pool_boot_failures_total",
            "Pre-boots that failed.",
            pool.boot_failures,
        ),
        (
            "pool_lost_total",
            "Pre-booted VMs that ended while idle.",
            pool.lost,
        ),
    ];
    for (kind, list) in [("gauge", &gauges[..]), ("counter", &counters[..])] {
        for (name, help, value) in list {
            let _ = writeln!(out, "# HELP tvix_build_vm_{name} {help}");
            let _ = writeln!(out, "# TYPE tvix_build_vm_{name} {kind}");
            let _ = writeln!(out, "tvix_build_vm_{name} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_gauges_and_cumulative_buckets() {
        let m = Metrics::default();
        m.count(BuildResult::Success);
        m.count(BuildResult::Success);
        m.count(BuildResult::Timeout);
        m.observe(Phase::Boot, Duration::from_millis(800));
        m.observe(Phase::Boot, Duration::from_secs(3));
        let text = m.render(4, 2, None);
        assert!(text.contains("tvix_build_vm_builds_total{result=\"success\"} 2\n"));
        assert!(text.contains("tvix_build_vm_builds_total{result=\"timeout\"} 1\n"));
        assert!(text.contains("tvix_build_vm_builds_total{result=\"failed\"} 0\n"));
        assert!(
            !text.contains("tenant_builds_total"),
            "no tenant, no series"
        );
        m.count_tenant("alice", BuildResult::Success);
        m.count_tenant("other", BuildResult::Refused);
        let text = m.render(4, 2, None);
        assert!(text.contains("tvix_build_vm_builds_total{result=\"success\"} 3\n"));
        assert!(
            text.contains(
                "tvix_build_vm_tenant_builds_total{tenant=\"alice\",result=\"success\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "tvix_build_vm_tenant_builds_total{tenant=\"other\",result=\"refused\"} 1\n"
        ));
        assert!(text.contains("tvix_build_vm_queue_depth 4\n"));
        let mut gauges = String::new();
        render_tenant_gauges(
            &mut gauges,
            &BTreeMap::from([("ci".to_owned(), (2, 5)), ("other".to_owned(), (0, 1))]),
        );
        assert!(gauges.contains("tvix_build_vm_tenant_vms_running{tenant=\"ci\"} 2\n"));
        assert!(gauges.contains("tvix_build_vm_tenant_queue_depth{tenant=\"other\"} 1\n"));
        assert!(text.contains("tvix_build_vm_vms_running 2\n"));
        assert!(text.contains("tvix_build_vm_phase_seconds_bucket{phase=\"boot\",le=\"0.5\"} 0\n"));
        assert!(text.contains("tvix_build_vm_phase_seconds_bucket{phase=\"boot\",le=\"1\"} 1\n"));
        assert!(text.contains("tvix_build_vm_phase_seconds_bucket{phase=\"boot\",le=\"5\"} 2\n"));
        assert!(text.contains("tvix_build_vm_phase_seconds_bucket{phase=\"boot\",le=\"+Inf\"} 2\n"));
        assert!(text.contains("tvix_build_vm_phase_seconds_count{phase=\"boot\"} 2\n"));
        assert!(text.contains("tvix_build_vm_phase_seconds_count{phase=\"exec\"} 0\n"));
        assert!(!text.contains("pool"), "no pool, no pool metrics");
    }

    #[test]
    fn renders_what_builds_cost() {
        let m = Metrics::default();
        let mut a = Accounting {
            host_cpu: Duration::from_millis(1500),
            output_bytes: 5000,
            ..Default::default()
        };
        a.guest.cpu_user = Some(Duration::from_millis(700));
        a.guest.cpu_system = Some(Duration::from_millis(100));
        a.guest.memory_peak_bytes = Some(300 << 20);
        m.observe_usage(&a);
        let text = m.render(0, 0, None);
        for line in [
            "tvix_build_vm_build_cpu_seconds_bucket{side=\"guest\",le=\"0.5\"} 0\n",
            "tvix_build_vm_build_cpu_seconds_bucket{side=\"guest\",le=\"1\"} 1\n",
            "tvix_build_vm_build_cpu_seconds_bucket{side=\"host\",le=\"1\"} 0\n",
            "tvix_build_vm_build_cpu_seconds_sum{side=\"host\"} 1.5\n",
            "tvix_build_vm_build_memory_peak_bytes_bucket{le=\"268435456\"} 0\n",
            "tvix_build_vm_build_memory_peak_bytes_bucket{le=\"2147483648\"} 1\n",
            "tvix_build_vm_build_memory_peak_bytes_count 1\n",
            "tvix_build_vm_build_bytes_bucket{kind=\"output\",le=\"8192\"} 1\n",
            // The inputs' reads were not counted: nothing observed.
            "tvix_build_vm_build_bytes_count{kind=\"input_read\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing in:\n{text}");
        }
    }

    #[test]
    fn renders_the_pool_when_there_is_one() {
        let stats = PoolStats {
            idle: 2,
            hits: 7,
            misses: 1,
            boot_failures: 3,
            lost: 4,
        };
        let text = Metrics::default().render(0, 0, Some(stats));
        for line in [
            "# TYPE tvix_build_vm_pool_idle_vms gauge\ntvix_build_vm_pool_idle_vms 2\n",
            "# TYPE tvix_build_vm_pool_hits_total counter\ntvix_build_vm_pool_hits_total 7\n",
            "tvix_build_vm_pool_misses_total 1\n",
            "tvix_build_vm_pool_boot_failures_total 3\n",
            "tvix_build_vm_pool_lost_total 4\n",
        ] {
            assert!(text.contains(line), "{line:?} missing in:\n{text}");
        }
    }
}
