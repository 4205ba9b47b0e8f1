//! Faults on the host in the middle of real builds (QEMU under TCG): the VMM, the vsock
//! device and the `build` process itself are SIGKILLed, and the castore's server dies or
//! stalls. Each build must fail with a message naming what happened, promptly, and leave no
//! process or runtime directory behind (at the latest after the next start-up's sweep), with
//! the castore intact. (A killed virtio-fs daemon: tests/runner_vm.rs.)

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::cli::{Env, Run};
use support::hostile::{measured, wait_for_process, Castore, Cost};
use support::serve::{Listen, Serve};
use support::{processes_naming, BUSYBOX};

const SH: &str = "/nix/store/busybox";
const INFRASTRUCTURE: i32 = 4;
/// Time for the VM to boot and the command to start before a fault is injected.
const SETTLE: Duration = Duration::from_secs(4);

fn signal(pid: i32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

fn build_command(env: &Env, flags: &[&str], script: &str) -> Command {
    let mut cmd = env.build_command(env.store.path(), &["-q"]);
    cmd.args(flags)
        .args(["--input", BUSYBOX, "--", SH, "sh", "-c", script]);
    cmd
}

/// Runs a long build and SIGKILLs the build process whose command line names `victim`
/// once the command runs.
fn kill_mid_build(victim: &str) -> (Run, Cost, Env) {
    let env = Env::new();
    env.store_import(Path::new(BUSYBOX));
    let cmd = build_command(
        &env,
        &["--timeout", "120s"],
        "echo started; /nix/store/busybox sleep 600",
    );
    let (run, cost) = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            let pid = wait_for_process(&env, victim, Duration::from_secs(30));
            std::thread::sleep(SETTLE);
            signal(pid, "-KILL");
        });
        let out = measured(&env, cmd);
        killer.join().expect("killer");
        out
    });
    eprintln!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    support::hostile::record(&format!("SIGKILL {victim}"), &run, &cost);
    env.assert_clean();
    Castore::verify(env.store.path());
    (run, cost, env)
}

#[test]
fn a_killed_vmm_ends_the_build_and_is_named() {
    let (run, cost, _env) = kill_mid_build("qemu-system");
    run.assert_failed(INFRASTRUCTURE, "the VMM was killed by signal 9");
    // Boot, SETTLE, and the clean-up: nowhere near the 120 s limit.
    cost.assert_within(Duration::from_secs(40), 64);
}

#[test]
fn a_killed_vsock_device_ends_the_build_and_is_named() {
    let (run, cost, _env) = kill_mid_build("vhost-device-vsock");
    run.assert_failed(INFRASTRUCTURE, "the vhost-vsock died during the build");
    cost.assert_within(Duration::from_secs(40), 64);
}

#[test]
fn a_killed_build_process_leaves_nothing_after_the_next_start_up() {
    let env = Env::new();
    env.store_import(Path::new(BUSYBOX));
    let store = env.store.path().to_string_lossy().into_owned();
    let cmd = build_command(
        &env,
        &["--timeout", "120s"],
        "echo started; /nix/store/busybox sleep 600",
    );
    let (run, vm_pids) = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            wait_for_process(&env, "qemu-system", Duration::from_secs(30));
            std::thread::sleep(SETTLE);
            let vm_pids = processes_naming(&env.runtime.path().to_string_lossy());
            let cli = processes_naming(&store)
                .into_iter()
                .find(|&pid| {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    cmdline.split('\0').nth(1) == Some("build")
                })
                .expect("the build process");
            signal(cli, "-KILL");
            vm_pids
        });
        let (run, _cost) = measured(&env, cmd);
        (run, killer.join().expect("killer"))
    });
    assert_eq!(run.code, None, "the build was not killed: {}", run.stderr);
    assert_eq!(
        vm_pids.len(),
        3,
        "qemu, vhost-device-vsock, fs-daemon: {vm_pids:?}"
    );
    // Each child has PR_SET_PDEATHSIG(SIGKILL): they die with the build process.
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm_pids
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            Instant::now() < deadline,
            "VM processes outlived the build process: {vm_pids:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What a dead process cannot clean: its build's and its service's runtime dirs.
    let stale: Vec<_> = std::fs::read_dir(env.runtime.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(stale.len(), 2, "{stale:?}");

    // The next build's start-up sweeps them, and then runs normally.
    let next = env.build(&["--input", BUSYBOX, "--", SH, "true"]);
    assert_eq!(next.code, Some(0), "{}", next.stderr);
    assert!(
        next.stderr
            .contains("swept runtime directories left by a previous run"),
        "{}",
        next.stderr
    );
    env.assert_clean();
    Castore::verify(env.store.path());
}

/// A castore-only `serve` on a unix socket with its own store (returned, to be dropped after
/// the server), the castore of the builds in these tests.
fn castore_server(env: &Env) -> (Serve, tempfile::TempDir) {
    let store = tempfile::tempdir().expect("castore store");
    let mut cmd = env.command();
    cmd.env_remove("TVIX_BUILD_VM_KERNEL")
        .env_remove("TVIX_BUILD_VM_AGENT")
        .arg("serve")
        .arg("--store")
        .arg(store.path());
    (Serve::spawn(cmd, &[], Listen::Unix), store)
}

/// A build whose castore is `server`; `fault` is sent to the server once the command runs,
/// and the command writes its output only after that.
fn castore_fault(fault: &str, flags: &[&str]) -> (Run, Cost, Env) {
    let env = Env::new();
    let (server, _store) = castore_server(&env);
    let addr = server.grpc_addr();
    let mut all_flags = vec![
        "--blob-service-addr",
        &addr,
        "--directory-service-addr",
        &addr,
        "--output",
        "out",
        "--timeout",
        "120s",
    ];
    all_flags.extend_from_slice(flags);
    let cmd = build_command(
        &env,
        &all_flags,
        "echo started; /nix/store/busybox sleep 8; echo data > /nix/store/out",
    );
    let (run, cost) = std::thread::scope(|s| {
        let injector = s.spawn(|| {
            wait_for_process(&env, "qemu-system", Duration::from_secs(30));
            std::thread::sleep(SETTLE);
            signal(server.pid(), fault);
        });
        let out = measured(&env, cmd);
        injector.join().expect("injector");
        out
    });
    eprintln!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    support::hostile::record(&format!("castore server {fault}"), &run, &cost);
    drop(server);
    env.assert_clean();
    (run, cost, env)
}

#[test]
fn a_castore_that_dies_mid_build_fails_the_build_with_that_reason() {
    let (run, cost, _env) = castore_fault("-KILL", &[]);
    run.assert_failed(INFRASTRUCTURE, "castore");
    cost.assert_within(Duration::from_secs(60), 64);
}

#[test]
fn a_castore_that_stalls_mid_build_is_named_at_the_harvest_deadline() {
    let (run, cost, _env) = castore_fault("-STOP", &["--harvest-timeout", "10s"]);
    run.assert_failed(
        INFRASTRUCTURE,
        "did not finish before the harvest deadline of 10s: the castore stalls",
    );
    cost.assert_within(Duration::from_secs(60), 64);
}

#[test]
fn a_castore_that_stalls_before_the_build_is_named_and_no_vm_starts() {
    let env = Env::new();
    let (server, _store) = castore_server(&env);
    let addr = server.grpc_addr();
    // busybox in the server's castore, named in a request file.
    let out = env
        .command()
        .args(["store", "import", "--blob-service-addr", &addr])
        .args(["--directory-service-addr", &addr, BUSYBOX])
        .output()
        .expect("store import");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node: serde_json::Value = serde_json::from_slice(&out.stdout).expect("node JSON");
    let dir = tempfile::tempdir().expect("request dir");
    let req = dir.path().join("req.json");
    let json = serde_json::json!({
        "commandArgs": [SH, "true"],
        "inputs": [node],
        "constraints": {"system": "x86_64-linux"},
    });
    std::fs::write(&req, json.to_string()).expect("request file");

    signal(server.pid(), "-STOP");
    let mut cmd = env.command();
    cmd.arg("build")
        .arg("-q")
        .args([
            "--blob-service-addr",
            &addr,
            "--directory-service-addr",
            &addr,
        ])
        .args(["--castore-timeout", "3s", "--request"])
        .arg(&req);
    let (run, cost) = measured(&env, cmd);
    eprintln!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    support::hostile::record("castore server -STOP before the build", &run, &cost);
    run.assert_failed(
        INFRASTRUCTURE,
        "the castore did not answer within 3s while checking the inputs: it stalls",
    );
    assert_eq!(cost.vm_procs_max, 0, "a VM started: {}", cost.summary());
    cost.assert_within(Duration::from_secs(30), 64);
    drop(server);
    env.assert_clean();
}
