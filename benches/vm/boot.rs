//! Sections 1 and 2: the bare boot-to-poweroff floor, our trivial build (through the
//! Runner, as `serve` runs it, and through the CLI), and the same command under bubblewrap.
//! The variants run interleaved, one of each per repetition.

use crate::report::{Row, Target};
use crate::service::{failed, NullSink, Service};
use crate::setup::{secs, Env, TRIVIAL_MEMORY_MIB};
use crate::stats::ratios;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tvix_build_vm::castore::import::import_path;
use tvix_build_vm::runner::{new_build_id, Runner};
use tvix_build_vm::vm::cpuinfo::CpuInfo;
use tvix_build_vm::vm::process::ProcessGroup;
use tvix_build_vm::vm::{cmdline, LaunchConfig, LaunchSpec, VmmBackend};

/// The trivial build: one small output written by busybox's shell.
pub const TRIVIAL_SCRIPT: &str = "echo hi > $out";

/// Per-phase figures of our trivial build, from the runner and the agent's Hello.
#[derive(Default)]
pub struct Phases {
    pub boot: Vec<f64>,
    pub exec: Vec<f64>,
    pub harvest: Vec<f64>,
    /// The build's total minus boot, exec and harvest: inputs, helpers, job hand-over,
    /// ending the VM.
    pub rest: Vec<f64>,
    /// Guest uptime when the agent started / had mounted / had connected (seconds).
    pub agent_start: Vec<f64>,
    pub mounts_done: Vec<f64>,
    pub connected: Vec<f64>,
}

/// A VM with no devices booting `initrd` (the power-off init), launched exactly as our
/// builds are (same backend, machine options, kernel command line, memory, vCPUs).
pub async fn floor_once(env: &Env, initrd: &Path, memory_mib: u32) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new()
        .prefix("fl-")
        .tempdir_in(env.work.path())
        .context("floor runtime dir")?;
    let spec = LaunchSpec::new(LaunchConfig {
        kernel: env.kernel.clone(),
        initrd: initrd.to_owned(),
        cmdline: vec![],
        memory_mib,
        vcpus: env.vcpus,
        shares: vec![],
        vsock: None,
        scratch_disk: None,
        serial_log: dir.path().join("serial.log"),
        nested_virt: false,
        network: false,
        runtime_dir: dir.path().to_owned(),
        accel: env.accel,
    })?;
    let start = Instant::now();
    let mut vm = env
        .qemu
        .launch(&spec, ProcessGroup::new(dir.path()))
        .await?;
    let exit = vm.wait().await?;
    let elapsed = start.elapsed();
    if !exit.is_clean() {
        bail!("floor VM ended {:?}: {}", exit.status, vm.serial_tail(2048));
    }
    Ok(secs(elapsed))
}

/// The floor as docs/architecture.md defines it: plain `qemu-system-x86_64 -accel tcg -M microvm -m 256`
/// with no sandbox, memfd or devices.
async fn bare_floor_once(env: &Env, initrd: &Path) -> anyhow::Result<f64> {
    let cpu = CpuInfo::read().context("reading /proc/cpuinfo")?;
    let append = cmdline::render(&cmdline::base(env.accel, &cpu), &[])?;
    let start = Instant::now();
    let status = tokio::process::Command::new(&env.qemu_program)
        .args(["-accel", env.accel.qemu_name(), "-M", "microvm", "-m"])
        .arg(format!("{TRIVIAL_MEMORY_MIB}"))
        .args(["-smp", &env.vcpus.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "null", "-kernel"])
        .arg(&env.kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .context("running qemu")?;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("bare qemu exited {status}");
    }
    Ok(secs(elapsed))
}

/// How long a pre-boot may take on a loaded machine before the bench gives up.
const POOL_FILL_LIMIT: Duration = Duration::from_secs(120);

async fn runner_once(svc: &Service, phases: &mut Phases) -> anyhow::Result<f64> {
    trivial_once(svc, &svc.runner, phases).await
}

/// A trivial build on a pre-booted VM: the pool is full when the clock starts, and its
/// replacement boot is waited for after the clock stops, so that it does not run during
/// the next measurement.
async fn pooled_once(svc: &Service, pooled: &Runner, phases: &mut Phases) -> anyhow::Result<f64> {
    let pool = pooled.pool().context("the pooled runner has no pool")?;
    if !pool.wait_idle(1, POOL_FILL_LIMIT).await {
        bail!(
            "no VM was pre-booted within {POOL_FILL_LIMIT:?}: {:?}",
            pool.stats()
        );
    }
    let hits = pool.stats().hits;
    let elapsed = trivial_once(svc, pooled, phases).await?;
    if pool.stats().hits != hits + 1 {
        bail!(
            "the pooled build did not use a pre-booted VM: {:?}",
            pool.stats()
        );
    }
    if !pool.wait_idle(1, POOL_FILL_LIMIT).await {
        bail!(
            "the pool was not refilled within {POOL_FILL_LIMIT:?}: {:?}",
            pool.stats()
        );
    }
    Ok(elapsed)
}

async fn trivial_once(svc: &Service, runner: &Runner, phases: &mut Phases) -> anyhow::Result<f64> {
    let req = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    let start = Instant::now();
    let outcome = runner
        .build(&new_build_id(), &req.req, &req.decision, &mut NullSink)
        .await
        .map_err(|e| failed("trivial build", &e))?;
    let elapsed = start.elapsed();
    if outcome.outputs.len() != 1 {
        bail!("trivial build gave {} outputs", outcome.outputs.len());
    }
    let t = &outcome.timings;
    if !t.boot.is_zero() {
        phases.boot.push(secs(t.boot));
    }
    phases.exec.push(secs(t.exec));
    phases.harvest.push(secs(t.harvest));
    phases
        .rest
        .push(secs(t.total.saturating_sub(t.boot + t.exec + t.harvest)));
    if let Some(h) = &outcome.hello.timings {
        phases.agent_start.push(h.agent_start_us as f64 / 1e6);
        phases.mounts_done.push(h.mounts_done_us as f64 / 1e6);
        phases.connected.push(h.connected_us as f64 / 1e6);
    }
    Ok(secs(elapsed))
}

/// `tvix-build-vm build` as a user runs it: process start, store open, input import, the
/// build, the Build printed.
async fn cli_once(env: &Env, store: &Path, runtime: &Path) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = tokio::process::Command::new(&env.cli)
        .arg("build")
        .arg("--store")
        .arg(store)
        .arg("--runtime-dir")
        .arg(runtime)
        .arg("--kernel")
        .arg(&env.kernel)
        .arg("--agent")
        .arg(&env.agent)
        .args(["--vm-memory", &format!("{TRIVIAL_MEMORY_MIB}M")])
        .args(["--boot-timeout", "120s", "--input"])
        .arg(&env.busybox)
        .args(["--output", "hello", "--env", "out=/nix/store/hello", "--"])
        .args(["/nix/store/busybox", "sh", "-c", TRIVIAL_SCRIPT])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running tvix-build-vm build")?;
    let elapsed = start.elapsed();
    if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("hello") {
        bail!(
            "tvix-build-vm build failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(secs(elapsed))
}

/// The same command in a bubblewrap sandbox over busybox on disk; the output is ingested
/// into the same castore, so both sides go from request to stored output.
async fn bwrap_once(env: &Env, bwrap: &Path, svc: &Service, n: usize) -> anyhow::Result<f64> {
    let store = env.scratch(&format!("bwrap-{n}"))?;
    let start = Instant::now();
    let out = tokio::process::Command::new(bwrap)
        .args([
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ])
        .args([
            "--setenv",
            "HOME",
            "/homeless-shelter",
            "--setenv",
            "NIX_STORE",
            "/nix/store",
        ])
        .args([
            "--setenv",
            "PATH",
            "/path-not-set",
            "--setenv",
            "TMPDIR",
            "/build",
        ])
        .args(["--setenv", "out", "/nix/store/hello"])
        .args([
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/build", "--chdir", "/build",
        ])
        .arg("--bind")
        .arg(&store)
        .arg("/nix/store")
        .arg("--ro-bind")
        .arg(&env.busybox)
        .args(["/nix/store/busybox", "--uid", "1000", "--gid", "100"])
        .args(["/nix/store/busybox", "sh", "-c", TRIVIAL_SCRIPT])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running bwrap")?;
    if !out.status.success() {
        bail!(
            "bwrap failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    import_path(svc.blobs.clone(), svc.dirs.clone(), &store.join("hello"))
        .await
        .context("ingesting the bwrap output")?;
    let elapsed = start.elapsed();
    Ok(secs(elapsed))
}

/// Runs sections 1 and 2 for `reps` interleaved repetitions.
pub async fn run(
    env: &Env,
    svc: &Service,
    reps: usize,
) -> anyhow::Result<(Vec<Row>, Phases, Phases)> {
    let poweroff = env.guest_program("poweroff")?;
    let floor_initrd = env.program_initrd(&poweroff)?;
    let cli_store = env.scratch("cli-store")?;
    let cli_runtime: PathBuf = env.scratch("cli-rt")?;
    let (mut floor, mut bare, mut ours, mut cli, mut bw) = (vec![], vec![], vec![], vec![], vec![]);
    let mut pooled_times = vec![];
    let mut phases = Phases::default();
    let mut pooled_phases = Phases::default();
    let pooled = svc.pooled_runner(1);
    // One warm-up of each path (page cache, initrd cache, the CLI's store) is not measured.
    floor_once(env, &floor_initrd, TRIVIAL_MEMORY_MIB).await?;
    runner_once(svc, &mut Phases::default()).await?;
    cli_once(env, &cli_store, &cli_runtime).await?;
    pooled_once(svc, &pooled, &mut Phases::default()).await?;
    for i in 0..reps {
        eprintln!("  [boot] repetition {}/{reps}", i + 1);
        floor.push(floor_once(env, &floor_initrd, TRIVIAL_MEMORY_MIB).await?);
        ours.push(runner_once(svc, &mut phases).await?);
        pooled_times.push(pooled_once(svc, &pooled, &mut pooled_phases).await?);
        cli.push(cli_once(env, &cli_store, &cli_runtime).await?);
        bare.push(bare_floor_once(env, &floor_initrd).await?);
        if let Some(b) = &env.bwrap {
            bw.push(bwrap_once(env, b, svc, i).await?);
        }
    }
    let mut rows = vec![
        Row::new("trivial_vs_floor", "1. trivial build via Runner (request to Build) vs floor", "s")
            .ours(&ours)
            .peer("floor", &floor)
            .ratio(&ratios(&ours, &floor))
            .target(Target::RatioAtMost(1.3))
            .note("floor = same QEMU backend, kernel, cmdline, 256 MiB, 1 vCPU, no devices, a static init that powers off at once"),
        Row::new("pooled_vs_floor", "1a. trivial build on a pre-booted VM (request to Build) vs floor", "s")
            .ours(&pooled_times)
            .peer("floor", &floor)
            .ratio(&ratios(&pooled_times, &floor))
            .target(Target::RatioAtMost(0.25))
            .note("a runner with a pool of 1: the VM booted before the request; timed from the call to the Build, the replacement's boot waited for afterwards"),
        Row::new("cli_vs_floor", "1b. trivial build via `tvix-build-vm build` vs floor", "s")
            .ours(&cli)
            .peer("floor", &floor)
            .ratio(&ratios(&cli, &floor))
            .note("includes process start, store open, busybox import, castore server start"),
        Row::new("bare_floor", "1c. the bare `qemu -M microvm -m 256` floor vs our floor", "s")
            .ours(&bare)
            .peer("floor", &floor)
            .ratio(&ratios(&bare, &floor)),
    ];
    if env.bwrap.is_some() {
        rows.push(
            Row::new(
                "trivial_vs_bwrap",
                "2. trivial build via Runner vs bubblewrap sandbox",
                "s",
            )
            .ours(&ours)
            .peer("bwrap", &bw)
            .ratio(&ratios(&ours, &bw))
            .note("the cost of VM isolation over a namespace sandbox (no target)"),
        );
    } else {
        rows.push(
            Row::new("trivial_vs_bwrap", "2. bubblewrap peer", "s")
                .note("bwrap not found: skipped"),
        );
    }
    Ok((rows, phases, pooled_phases))
}
