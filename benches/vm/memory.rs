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
//!
//! Row 5e adds the marginal cost of one more VM on a host already running one: the QEMU
//! binary, its libraries, the kernel and the initrd are file pages that every VM maps once
//! from the page cache. Proportional set size (PSS) splits each shared page among the
//! processes mapping it, so Σ PSS over the build processes counts every distinct page once;
//! without Pss_Shmem it leaves out guest RAM. Its peak during 1 build and during 3 builds at
//! once, (peak₃ − peak₁) / 2, is what each VM past the first adds. It is a peak of a sum,
//! so if the 3 VMs peak at different moments it reads low; 5b (anonymous memory of one VM,
//! which no other VM shares) bounds it from the other side.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::service::{failed, Service};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SAMPLE_EVERY: Duration = Duration::from_millis(5);

/// smaps_rollup walks page tables under the mmap lock: sampled less often than status.
const PSS_SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// How many builds run at once for the marginal-cost row.
const MARGINAL_VMS: usize = 3;

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

/// PSS without guest RAM (Pss_Anon + Pss_File) of `pid` in KiB; `None` if the process is
/// gone or the kernel predates these fields (Linux 5.14).
fn pss_without_shmem_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == name).then(|| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())?
        })
    };
    Some(field("Pss_Anon")? + field("Pss_File")?)
}

/// The peak over time of Σ PSS-without-guest-RAM of this process's descendants.
struct PssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl PssSampler {
    fn start() -> PssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let me = std::process::id();
        let handle = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                let mut sum = 0;
                for pid in descendants(me) {
                    // A process that just exited has no rollup; one whose kernel lacks the
                    // fields is caught below (a sum that never rises).
                    sum += pss_without_shmem_kib(pid).unwrap_or(0);
                }
                peak = peak.max(sum);
                std::thread::sleep(PSS_SAMPLE_EVERY);
            }
            if peak == 0 {
                anyhow::bail!(
                    "no Pss_Anon/Pss_File in /proc/<pid>/smaps_rollup (needs Linux 5.14)"
                );
            }
            Ok(peak)
        });
        PssSampler { stop, handle }
    }

    fn finish(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("PSS sampler panicked"))?
    }
}

/// Peak Σ PSS-without-guest-RAM (KiB) while `n` trivial builds run at once.
async fn pss_peak(svc: &Service, n: usize) -> anyhow::Result<u64> {
    let req = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    let sampler = PssSampler::start();
    let results = futures::future::join_all((0..n).map(|_| svc.build(&req))).await;
    let peak = sampler.finish();
    for r in results {
        r.map_err(|e| failed("marginal-memory build", &e))?;
    }
    peak
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

fn median(v: &[f64]) -> f64 {
    crate::stats::Summary::of(v).map_or(f64::NAN, |s| s.median)
}

pub async fn run(svc: &Service, reps: usize) -> anyhow::Result<Vec<Row>> {
    let (mut total, mut private_anon, mut service, mut guest) = (vec![], vec![], vec![], vec![]);
    let mib = |kib: u64| kib as f64 / 1024.0;
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
        outcome.map_err(|e| failed("memory build", &e))?;
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
    let (mut marginal, mut one, mut several) = (vec![], vec![], vec![]);
    for i in 0..reps {
        eprintln!(
            "  [memory] marginal cost, 1 then {MARGINAL_VMS} VMs at once, {}/{reps}",
            i + 1
        );
        let single = pss_peak(svc, 1).await?;
        let multi = pss_peak(svc, MARGINAL_VMS).await?;
        one.push(mib(single));
        several.push(mib(multi));
        marginal.push((mib(multi) - mib(single)) / (MARGINAL_VMS - 1) as f64);
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
        Row::new(
            "memory_marginal_per_vm",
            "5e. marginal host memory per additional VM (shared binaries counted once; not the target's measure)",
            "MiB",
        )
        .ours(&marginal)
        .note(format!(
            "(peak Σ(Pss_Anon + Pss_File) of the build processes with {MARGINAL_VMS} builds at once − the same with 1) / {}, {PSS_SAMPLE_EVERY:?} sampling; 1 VM: {:.1} MiB, {MARGINAL_VMS} VMs: {:.1} MiB (medians)",
            MARGINAL_VMS - 1,
            median(&one),
            median(&several)
        )),
    ])
}
