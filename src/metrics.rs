//! Service metrics in the Prometheus text format: builds by result, queue depth, VMs
//! running, and histograms of the phases of a build.

use crate::runner::pool::PoolStats;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket upper bounds in seconds: from a fast boot under KVM to a long build.
const BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
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

#[derive(Debug, Default)]
struct Histogram {
    /// Cumulative counts per bucket, then +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.counts[i] += 1;
            }
        }
        self.counts[BUCKETS.len()] += 1;
        self.sum += secs;
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    results: [AtomicU64; BuildResult::ALL.len()],
    histograms: Mutex<[Histogram; Phase::ALL.len()]>,
}

impl Metrics {
    pub fn count(&self, result: BuildResult) {
        if let Some(i) = BuildResult::ALL.iter().position(|r| *r == result) {
            self.results[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn observe(&self, phase: Phase, d: Duration) {
        if let Some(i) = Phase::ALL.iter().position(|p| *p == phase) {
            let mut h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
            h[i].observe(d.as_secs_f64());
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
        let _ = writeln!(
            out,
            "# HELP tvix_build_vm_phase_seconds Duration of each phase of a build."
        );
        let _ = writeln!(out, "# TYPE tvix_build_vm_phase_seconds histogram");
        let h = self.histograms.lock().unwrap_or_else(|e| e.into_inner());
        for (i, p) in Phase::ALL.iter().enumerate() {
            let hist = &h[i];
            for (b, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tvix_build_vm_phase_seconds_bucket{{phase=\"{}\",le=\"{bound}\"}} {}",
                    p.label(),
                    hist.counts[b]
                );
            }
            let total = hist.counts[BUCKETS.len()];
            let _ = writeln!(
                out,
                "tvix_build_vm_phase_seconds_bucket{{phase=\"{}\",le=\"+Inf\"}} {total}",
                p.label()
            );
            let _ = writeln!(
                out,
                "tvix_build_vm_phase_seconds_sum{{phase=\"{}\"}} {}",
                p.label(),
                hist.sum
            );
            let _ = writeln!(
                out,
                "tvix_build_vm_phase_seconds_count{{phase=\"{}\"}} {total}",
                p.label()
            );
        }
        out
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
        assert!(text.contains("tvix_build_vm_queue_depth 4\n"));
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
