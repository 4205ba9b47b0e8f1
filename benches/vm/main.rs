//! The VM benchmark harness (docs/benchmarks.md): our builds against their floors and peers, side by
//! side in one run, variants interleaved, each as a ratio with medians and spreads.
//!
//! Run it through `scripts/bench.sh [--quick]` (which installs the peers and builds what is
//! needed), or `cargo bench --bench vm -- [--quick] [--json PATH] [--only a,b] [--reps N]`
//! with TVIX_BUILD_VM_KERNEL, TVIX_BUILD_VM_AGENT and VIRTIOFSD set. Sections: `boot`
//! (1, 2), `fs` (3), `harvest` (4), `memory` (5), `concurrency` (6), `snix` (8),
//! `provenance` (17), `tenants` (18); `micro` (7) only reads criterion's results of `cargo
//! bench --bench castore`; `fleet` (19) runs only when `--only` names it (it needs Garage
//! and HAProxy, and starts `scripts/fleet.sh`).
//!
//! A `harness = false` bench rather than a CLI subcommand: it needs peers (virtiofsd,
//! bubblewrap, guest C programs) that have no place in the shipped binary, it still gets
//! the release `tvix-build-vm` binary from cargo (`CARGO_BIN_EXE_*`) for the fs-daemon and
//! the CLI row, and it drives the library (Runner, QemuBackend) exactly as `serve` does.

mod boot;
mod concurrency;
mod fleet;
mod fs;
mod harvest;
mod memory;
mod micro;
mod provenance;
mod report;
mod served;
mod service;
mod setup;
mod snix;
mod stats;
mod tenants;

use anyhow::{bail, Context};
use report::{loadavg, Machine, Report, Row};
use std::path::PathBuf;
use std::process::ExitCode;

/// Repetitions and sizes of one run.
struct Plan {
    quick: bool,
    boot_reps: usize,
    fs: fs::FsSizes,
    harvest_mib: usize,
    harvest_reps: usize,
    memory_reps: usize,
    concurrency_rounds: usize,
    fleet_reps: usize,
    only: Option<Vec<String>>,
    json: PathBuf,
}

impl Plan {
    fn parse(args: &[String]) -> anyhow::Result<Plan> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut plan = if quick {
            Plan {
                quick,
                boot_reps: 3,
                fs: fs::FsSizes {
                    big_mib: 64,
                    many: 2000,
                    rounds: 2,
                },
                harvest_mib: 64,
                harvest_reps: 1,
                memory_reps: 1,
                concurrency_rounds: 1,
                fleet_reps: 1,
                only: None,
                json: PathBuf::new(),
            }
        } else {
            Plan {
                quick,
                boot_reps: 10,
                fs: fs::FsSizes {
                    big_mib: 256,
                    many: 10_000,
                    rounds: 4,
                },
                harvest_mib: 256,
                harvest_reps: 3,
                memory_reps: 3,
                concurrency_rounds: 3,
                fleet_reps: 3,
                only: None,
                json: PathBuf::new(),
            }
        };
        plan.json = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .map_or_else(|| PathBuf::from("target"), |t| t.to_owned())
            .join("bench/latest.json");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))
            };
            match a.as_str() {
                "--quick" | "--bench" => {}
                "--json" => plan.json = PathBuf::from(value("--json")?),
                "--only" => {
                    plan.only = Some(value("--only")?.split(',').map(str::to_owned).collect())
                }
                "--reps" => {
                    let n: usize = value("--reps")?.parse().context("--reps")?;
                    plan.boot_reps = n;
                    plan.fs.rounds = n;
                    plan.harvest_reps = n;
                    plan.memory_reps = n;
                    plan.concurrency_rounds = n;
                    plan.fleet_reps = n;
                }
                other => bail!(
                    "unknown argument {other:?}; use --quick, --json PATH, --only boot,fs,harvest,memory,concurrency,provenance,snix,tenants,micro,fleet, --reps N"
                ),
            }
        }
        Ok(plan)
    }

    /// Whether `--only` names `section`: for sections that need more than the others
    /// (the fleet needs Garage and HAProxy) and so run only when asked for.
    fn asks_for(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_some_and(|o| o.iter().any(|s| s == section))
    }

    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }
}

async fn run(plan: Plan, command: String) -> anyhow::Result<Report> {
    let env = setup::Env::new()?;
    let mut machine = Machine::probe(env.qemu_version(), format!("{:?}", env.accel));
    let load: f64 = machine
        .loadavg_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load > 1.5 {
        eprintln!("bench: WARNING: load average {load} > 1.5; figures will be noisy");
    }
    let svc = service::Service::start(&env, setup::TRIVIAL_MEMORY_MIB).await?;
    let mut rows: Vec<Row> = Vec::new();
    let mut phases = None;
    let mut pooled_phases = None;
    if plan.wants("boot") {
        eprintln!(
            "bench: 1-2 boot floor, trivial build, CLI, bubblewrap ({} reps)",
            plan.boot_reps
        );
        let (r, p, pp) = boot::run(&env, &svc, plan.boot_reps).await?;
        rows.extend(r);
        phases = Some(p);
        pooled_phases = Some(pp);
    }
    if plan.wants("fs") {
        eprintln!("bench: 3 virtio-fs vs virtiofsd");
        rows.extend(fs::run(&env, &svc, &plan.fs).await?);
    }
    if plan.wants("harvest") {
        eprintln!("bench: 4 harvest vs raw vsock");
        rows.extend(harvest::run(&env, &svc, plan.harvest_mib, plan.harvest_reps).await?);
    }
    if plan.wants("memory") {
        eprintln!("bench: 5 host memory per VM");
        rows.extend(memory::run(&svc, plan.memory_reps).await?);
    }
    if plan.wants("concurrency") {
        eprintln!("bench: 6 builds per minute at 1, 2, 4 at once");
        rows.extend(concurrency::run(&svc, plan.concurrency_rounds).await?);
    }
    if plan.wants("snix") {
        eprintln!("bench: 8 snix layout vs seed layout through serve");
        rows.extend(snix::run(&env, plan.boot_reps).await?);
    }
    if plan.wants("provenance") {
        eprintln!("bench: 17 signed vs unsigned build");
        rows.extend(provenance::run(&svc, plan.boot_reps).await?);
    }
    if plan.wants("tenants") {
        eprintln!("bench: 18 build for a tenant vs bare");
        rows.extend(tenants::run(&svc, plan.boot_reps).await?);
    }
    if plan.asks_for("fleet") {
        eprintln!("bench: 19 builds through the fleet's front vs one host");
        rows.extend(fleet::run(&env, plan.fleet_reps, plan.fs.big_mib).await?);
    }
    if plan.wants("micro") {
        rows.extend(micro::rows());
    }
    if let Some(p) = phases {
        rows.push(
            Row::new(
                "phase_boot",
                "where time goes: VMM start to agent Hello",
                "s",
            )
            .ours(&p.boot)
            .note(
                "guest uptime at agent start / mounts done / connected (medians): ".to_owned()
                    + &[&p.agent_start, &p.mounts_done, &p.connected]
                        .iter()
                        .map(|v| {
                            stats::Summary::of(v)
                                .map_or("-".into(), |s| format!("{:.3} s", s.median))
                        })
                        .collect::<Vec<_>>()
                        .join(" / "),
            ),
        );
        rows.push(
            Row::new(
                "phase_exec",
                "where time goes: job sent to command exit",
                "s",
            )
            .ours(&p.exec),
        );
        rows.push(
            Row::new(
                "phase_harvest",
                "where time goes: harvest of the trivial output",
                "s",
            )
            .ours(&p.harvest),
        );
        rows.push(
            Row::new(
                "phase_rest",
                "where time goes: the rest (inputs, helpers, job hand-over, ending the VM)",
                "s",
            )
            .ours(&p.rest),
        );
    }
    if let Some(p) = pooled_phases {
        for (id, what, v) in [
            ("pooled_exec", "job sent to command exit", &p.exec),
            (
                "pooled_harvest",
                "harvest of the trivial output",
                &p.harvest,
            ),
            (
                "pooled_rest",
                "the rest (inputs, root to the fs-daemon, job hand-over, ending the VM)",
                &p.rest,
            ),
        ] {
            rows.push(Row::new(id, &format!("pre-booted, where time goes: {what}"), "s").ours(v));
        }
    }
    machine.loadavg_after = loadavg();
    let date_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Report {
        date_unix,
        command,
        quick: plan.quick,
        machine,
        rows,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan = match Plan::parse(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    let json = plan.json.clone();
    let command = std::env::var("TVIX_BENCH_COMMAND")
        .unwrap_or_else(|_| format!("cargo bench --bench vm -- {}", args.join(" ")));
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: starting tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(plan, command)) {
        Ok(report) => {
            let m = &report.machine;
            println!(
                "\nmachine: {} cores, {}, {}, Linux {}, {}, accel {}; load {} -> {}\n",
                m.nproc,
                m.cpu_model,
                m.mem_total,
                m.kernel,
                m.qemu,
                m.accel,
                m.loadavg_before,
                m.loadavg_after
            );
            println!("{}", report.table());
            if let Err(e) = report.write_json(&json) {
                eprintln!("bench: {e:#}");
                return ExitCode::FAILURE;
            }
            println!("JSON: {}", json.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
