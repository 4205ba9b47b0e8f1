//! Section 5: host memory of one build beyond guest RAM.
//!
//! While a trivial build runs, a thread samples `/proc/<pid>/status` of every descendant of
//! this process (QEMU, fs-daemon, vhost-device-vsock) every few milliseconds and keeps, per
//! process, its VmHWM (peak RSS, which the kernel tracks exactly) and the largest RssShmem
//! seen. Guest RAM is a shared memfd: the pages the guest touched show up as RssShmem in
//! QEMU and again in each vhost-user daemon that mapped them, so they are subtracted from
//! each process. The service's own growth is this process's peak RSS during the build (the
//! peak is reset through /proc/self/clear_refs first) minus its RSS before.
//!
//! overhead = Σ (VmHWM − max RssShmem) over the build's processes + service growth.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::service::{chain, Service};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SAMPLE_EVERY: Duration = Duration::from_millis(5);

#[derive(Clone, Debug, Default)]
struct Peak {
    name: String,
    hwm_kib: u64,
    shmem_kib: u64,
    anon_kib: u64,
}

fn status_fields(pid: u32) -> Option<(String, u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let (mut name, mut hwm, mut rss, mut shmem, mut anon) = (String::new(), 0, 0, 0, 0);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let kib = || {
            v.trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        };
        match k {
            "Name" => name = v.trim().to_owned(),
            "VmHWM" => hwm = kib(),
            "VmRSS" => rss = kib(),
            "RssShmem" => shmem = kib(),
            "RssAnon" => anon = kib(),
            _ => {}
        }
    }
    Some((name, hwm, rss, shmem, anon))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn descendants(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some(pp) = parent_of(pid) {
                    parent.insert(pid, pp);
                }
            }
        }
    }
    parent
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<BTreeMap<u32, Peak>>,
}

impl Sampler {
    fn start() -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let me = std::process::id();
        let handle = std::thread::spawn(move || {
            let mut peaks: BTreeMap<u32, Peak> = BTreeMap::new();
            while !flag.load(Ordering::Relaxed) {
                for pid in descendants(me) {
                    if let Some((name, hwm, _rss, shmem, anon)) = status_fields(pid) {
                        let p = peaks.entry(pid).or_default();
                        p.name = name;
                        p.hwm_kib = p.hwm_kib.max(hwm);
                        p.shmem_kib = p.shmem_kib.max(shmem);
                        p.anon_kib = p.anon_kib.max(anon);
                    }
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
            peaks
        });
        Sampler { stop, handle }
    }

    fn finish(self) -> BTreeMap<u32, Peak> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

pub async fn run(svc: &Service, reps: usize) -> anyhow::Result<Vec<Row>> {
    let (mut total, mut private_anon, mut service, mut guest) = (vec![], vec![], vec![], vec![]);
    let mut breakdown = String::new();
    let req = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    for i in 0..reps {
        eprintln!("  [memory] repetition {}/{reps}", i + 1);
        let before = status_fields(std::process::id()).map_or(0, |s| s.2);
        // Resets this process's VmHWM to its current RSS (Linux >= 4.0).
        std::fs::write("/proc/self/clear_refs", "5")?;
        let sampler = Sampler::start();
        let outcome = svc.build(&req).await;
        let peaks = sampler.finish();
        outcome.map_err(|e| anyhow::anyhow!("memory build: {}", chain(&e)))?;
        let growth = status_fields(std::process::id()).map_or(0, |s| s.1.saturating_sub(before));
        let procs: Vec<&Peak> = peaks.values().filter(|p| p.hwm_kib > 0).collect();
        if procs.len() < 3 {
            anyhow::bail!(
                "memory: saw only {:?}; expected QEMU, fs-daemon and vhost-device-vsock",
                procs
            );
        }
        let beyond: u64 = procs
            .iter()
            .map(|p| p.hwm_kib.saturating_sub(p.shmem_kib))
            .sum();
        let anon: u64 = procs.iter().map(|p| p.anon_kib).sum();
        let qemu_shmem = procs
            .iter()
            .filter(|p| p.name.starts_with("qemu"))
            .map(|p| p.shmem_kib)
            .max()
            .unwrap_or(0);
        let mib = |kib: u64| kib as f64 / 1024.0;
        total.push(mib(beyond + growth));
        private_anon.push(mib(anon + growth));
        service.push(mib(growth));
        guest.push(mib(qemu_shmem));
        if i == 0 {
            breakdown = procs
                .iter()
                .map(|p| {
                    format!(
                        "{} HWM {:.1} (shmem {:.1}, anon {:.1})",
                        p.name,
                        mib(p.hwm_kib),
                        mib(p.shmem_kib),
                        mib(p.anon_kib)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            breakdown.push_str(&format!("; service growth {:.1} MiB", mib(growth)));
        }
    }
    Ok(vec![
        Row::new("memory_per_vm", "5. host memory per VM beyond guest RAM", "MiB")
            .ours(&total)
            .target(Target::OursAtMost(40.0))
            .note(format!("Σ(VmHWM − RssShmem) of QEMU, fs-daemon, vhost-device-vsock + service peak growth, {SAMPLE_EVERY:?} sampling; first run: {breakdown}")),
        Row::new("memory_private_anon", "5b. same, anonymous memory only (no shared binaries/libraries)", "MiB")
            .ours(&private_anon),
        Row::new("memory_guest_touched", "5c. guest RAM touched (QEMU RssShmem), for scale", "MiB").ours(&guest),
        Row::new("memory_service", "5d. service (runner process) peak growth during one build", "MiB").ours(&service),
    ])
}
