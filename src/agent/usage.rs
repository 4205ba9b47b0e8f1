//! The guest's resource figures from its `Exited`, bounded by what its VM could have done.
//!
//! A guest can lie about its own figures and about nothing else: each one is checked
//! against a bound the host knows (the time since the job was handed over times the most
//! vCPUs a VM can have, the build's memory and process limits) and a figure beyond its
//! bound is cut to it and named in [`GuestUsage::clamped`]. A missing figure stays absent.
//! Nothing here fails a build.

use crate::vm::{MAX_MEMORY_MIB, MAX_VCPUS};
use std::time::Duration;
use tvix_build_vm_agent::proto::{Limits, Usage};

/// The most processes a Linux system can have (`PID_MAX_LIMIT` on 64-bit).
const PID_MAX_LIMIT: u64 = 4 * 1024 * 1024;

/// What the guest says its build used: its own word, bounded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestUsage {
    /// CPU time in user mode of every process of the build (`cpu.stat` `user_usec`).
    pub cpu_user: Option<Duration>,
    /// CPU time in the kernel on the build's behalf (`cpu.stat` `system_usec`).
    pub cpu_system: Option<Duration>,
    /// The most memory the build held at once (`memory.peak`).
    pub memory_peak_bytes: Option<u64>,
    /// The most processes the build had at once (`pids.peak`).
    pub pids_peak: Option<u64>,
    /// The figures the guest reported beyond their bound, which were cut to it.
    pub clamped: Vec<&'static str>,
}

/// The bounds of one build's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageBounds {
    pub cpu: Duration,
    pub memory_bytes: u64,
    pub processes: u64,
}

impl UsageBounds {
    /// For a command that ran `wall` (as the host measured it) under the Job's `limits`.
    pub fn new(wall: Duration, limits: Option<&Limits>) -> Self {
        let memory_cap = u64::from(MAX_MEMORY_MIB) << 20;
        let (memory, processes) = match limits {
            Some(l) => (l.memory_bytes, l.max_processes),
            None => (0, 0),
        };
        Self {
            cpu: wall.saturating_mul(MAX_VCPUS),
            memory_bytes: if memory == 0 {
                memory_cap
            } else {
                memory.min(memory_cap)
            },
            processes: if processes == 0 {
                PID_MAX_LIMIT
            } else {
                processes.min(PID_MAX_LIMIT)
            },
        }
    }
}

impl GuestUsage {
    /// The wire figures (absent if the agent sent none), each cut to its bound.
    pub fn bounded(usage: Option<Usage>, bounds: UsageBounds) -> Self {
        let Some(u) = usage else {
            return Self::default();
        };
        let mut clamped = Vec::new();
        let mut cut = |name: &'static str, value: Option<u64>, bound: u64| {
            value.map(|v| {
                if v > bound {
                    clamped.push(name);
                    bound
                } else {
                    v
                }
            })
        };
        let cpu_bound = u64::try_from(bounds.cpu.as_micros()).unwrap_or(u64::MAX);
        let cpu_user = cut("cpu_user", u.cpu_user_us, cpu_bound);
        // User and system time share the bound: their sum is the build's CPU time.
        let system_bound = cpu_bound.saturating_sub(cpu_user.unwrap_or(0));
        let cpu_system = cut("cpu_system", u.cpu_system_us, system_bound);
        let memory_peak_bytes = cut("memory_peak", u.memory_peak_bytes, bounds.memory_bytes);
        let pids_peak = cut("pids_peak", u.pids_peak, bounds.processes);
        Self {
            cpu_user: cpu_user.map(Duration::from_micros),
            cpu_system: cpu_system.map(Duration::from_micros),
            memory_peak_bytes,
            pids_peak,
            clamped,
        }
    }

    /// User plus system time, when both were reported.
    pub fn cpu(&self) -> Option<Duration> {
        Some(self.cpu_user?.saturating_add(self.cpu_system?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> UsageBounds {
        UsageBounds::new(
            Duration::from_secs(2),
            Some(&Limits {
                memory_bytes: 512 << 20,
                max_processes: 4096,
                tmpfs_bytes: 0,
            }),
        )
    }

    #[test]
    fn plausible_figures_pass_unchanged() {
        let u = GuestUsage::bounded(
            Some(Usage {
                cpu_user_us: Some(1_500_000),
                cpu_system_us: Some(200_000),
                memory_peak_bytes: Some(300 << 20),
                pids_peak: Some(3),
            }),
            bounds(),
        );
        assert_eq!(u.cpu(), Some(Duration::from_millis(1700)));
        assert_eq!(u.memory_peak_bytes, Some(300 << 20));
        assert_eq!(u.pids_peak, Some(3));
        assert!(u.clamped.is_empty());
    }

    #[test]
    fn absurd_figures_are_cut_and_named_missing_ones_stay_absent() {
        let b = bounds();
        let u = GuestUsage::bounded(
            Some(Usage {
                cpu_user_us: Some(u64::MAX),
                // A negative number as a guest would encode it.
                cpu_system_us: Some(-5i64 as u64),
                memory_peak_bytes: Some(u64::MAX),
                pids_peak: None,
            }),
            b,
        );
        assert_eq!(u.cpu_user, Some(b.cpu));
        assert_eq!(u.cpu_system, Some(Duration::ZERO));
        assert_eq!(u.cpu(), Some(b.cpu));
        assert_eq!(u.memory_peak_bytes, Some(512 << 20));
        assert_eq!(u.pids_peak, None);
        assert_eq!(u.clamped, ["cpu_user", "cpu_system", "memory_peak"]);

        assert_eq!(GuestUsage::bounded(None, b), GuestUsage::default());
        // No limits in the Job: the bounds of any VM.
        let open = UsageBounds::new(Duration::MAX, None);
        assert_eq!(open.memory_bytes, u64::from(MAX_MEMORY_MIB) << 20);
        assert_eq!(open.processes, PID_MAX_LIMIT);
        assert_eq!(open.cpu, Duration::MAX);
    }
}
