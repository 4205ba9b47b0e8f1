//! `serve --pool-size`: VMs booted before their requests, each used for exactly one build,
//! replaced after, never used after they died, and gone with the service.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::time::{Duration, Instant};
use support::cli::Env;
use support::serve::*;
use tvix_build_vm::castore::blob::{read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::build as pb;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;

/// `serve` with `args` and a metrics endpoint, once that answers; the endpoint's address.
fn serve_with_metrics(env: &Env, args: &[&str]) -> (Serve, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut all = args.to_vec();
    all.extend(["--metrics-listen", metrics.as_str()]);
    let server = Serve::start(env, &all);
    server.wait_for(|| std::net::TcpStream::connect(&metrics).is_ok(), "metrics");
    (server, metrics)
}

/// A value of the metrics endpoint (without labels).
async fn metric(addr: &str, name: &str) -> u64 {
    let text = reqwest_free_get(addr).await;
    let prefix = format!("\n{name} ");
    let at = text
        .find(&prefix)
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"));
    let rest = &text[at + prefix.len()..];
    rest[..rest.find('\n').unwrap()].parse().unwrap()
}

/// Waits until `name` reaches `want`.
async fn await_metric(server: &Serve, addr: &str, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = metric(addr, name).await;
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {got}, wanted {want}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `script` (which writes $out) and returns the Build and the output's content.
async fn build_reading_output(
    server: &Serve,
    busybox: &tvix_build_vm::proto::castore::Node,
    script: &str,
    min_memory: u64,
) -> (pb::Build, String) {
    let mut req = seed_request(busybox.clone(), script, &["out"]);
    req.environment_vars.push(env_var("out", "/nix/store/out"));
    req.constraints.as_mut().unwrap().min_memory = min_memory;
    let build = BuildServiceClient::new(server.channel())
        .do_build(req)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", server.log()))
        .into_inner();
    let digest = B3Digest::try_from(file_node(&build.outputs[0]).digest.as_ref()).unwrap();
    let blobs = GrpcBlobService::new(server.channel());
    let content = read_to_vec(&blobs, &digest).await.unwrap().unwrap();
    (build, String::from_utf8(content).unwrap())
}

fn boot_us(build: &pb::Build) -> u64 {
    build.timings.as_ref().unwrap().boot_us
}

const BOOT_ID: &str = "/nix/store/busybox cat /proc/sys/kernel/random/boot_id > $out";

#[tokio::test(flavor = "multi_thread")]
async fn each_pooled_vm_serves_one_build_and_is_replaced() {
    let env = Env::new();
    let (server, metrics) = serve_with_metrics(&env, &["--pool-size", "1", "--max-vms", "2"]);
    let busybox = upload_busybox(server.channel()).await;

    await_metric(&server, &metrics, "tvix_build_vm_pool_idle_vms", 1).await;
    let (first, first_boot_id) = build_reading_output(&server, &busybox, BOOT_ID, 0).await;
    assert_eq!(boot_us(&first), 0, "served by the pre-booted VM");
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_hits_total").await, 1);

    // The pool boots a replacement; the next build gets a different machine.
    await_metric(&server, &metrics, "tvix_build_vm_pool_idle_vms", 1).await;
    let (second, second_boot_id) = build_reading_output(&server, &busybox, BOOT_ID, 0).await;
    assert_eq!(boot_us(&second), 0, "served by the replacement");
    assert_eq!(first_boot_id.len(), 37, "{first_boot_id:?}");
    assert_ne!(first_boot_id, second_boot_id, "a VM was used twice");
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_hits_total").await, 2);

    // Another shape boots its own VM and leaves the pool alone.
    await_metric(&server, &metrics, "tvix_build_vm_pool_idle_vms", 1).await;
    let (bigger, bigger_boot_id) = build_reading_output(&server, &busybox, BOOT_ID, 1 << 30).await;
    assert!(boot_us(&bigger) > 0, "a 1 GiB request booted its own VM");
    assert_ne!(bigger_boot_id, second_boot_id);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_idle_vms").await, 1);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_hits_total").await, 2);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_misses_total").await, 0);

    // The build sees the request's inputs, not an empty share, and its own clock.
    let (_, listing) = build_reading_output(
        &server,
        &busybox,
        "/nix/store/busybox ls /nix/store > $out; /nix/store/busybox date +%Y >> $out",
        0,
    )
    .await;
    let year = chrono_year();
    assert_eq!(listing, format!("busybox\nout\n{year}\n"));

    drop(server);
    env.assert_clean();
}

/// The host's current year (UTC), which the guest must have been given with its job.
fn chrono_year() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Days to civil year (Howard Hinnant's algorithm, year part only).
    let z = secs / 86400 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    era * 400 + yoe + u64::from(month <= 2)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_for_a_read_only_host_path_boots_its_own_vm_with_the_share() {
    let env = Env::new();
    let host = tempfile::Builder::new()
        .prefix("tbv-ro-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(host.path().join("data"), "from the host\n").unwrap();
    let dir = host.path().to_str().unwrap();
    let (server, metrics) = serve_with_metrics(&env, &["--pool-size", "1", "--allow-ro-path", dir]);
    let busybox = upload_busybox(server.channel()).await;
    await_metric(&server, &metrics, "tvix_build_vm_pool_idle_vms", 1).await;

    let script = format!("/nix/store/busybox cat {dir}/data > $out");
    let mut req = seed_request(busybox.clone(), &script, &["out"]);
    req.environment_vars.push(env_var("out", "/nix/store/out"));
    req.constraints.as_mut().unwrap().available_ro_paths = vec![dir.to_owned()];
    let build = BuildServiceClient::new(server.channel())
        .do_build(req)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", server.log()))
        .into_inner();
    assert!(
        boot_us(&build) > 0,
        "a pooled VM (without the share) served it"
    );
    let digest = B3Digest::try_from(file_node(&build.outputs[0]).digest.as_ref()).unwrap();
    let blobs = GrpcBlobService::new(server.channel());
    let content = read_to_vec(&blobs, &digest).await.unwrap().unwrap();
    assert_eq!(content, b"from the host\n");
    // The pool was not asked: neither a hit nor a miss, and its VM still waits.
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_hits_total").await, 0);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_misses_total").await, 0);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_idle_vms").await, 1);

    drop(server);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_vm_that_died_idle_is_dropped_not_used() {
    let env = Env::new();
    let (server, metrics) = serve_with_metrics(&env, &["--pool-size", "1"]);
    let busybox = upload_busybox(server.channel()).await;
    await_metric(&server, &metrics, "tvix_build_vm_pool_idle_vms", 1).await;

    // Kill the idle VM's QEMU.
    let pool_dir = std::fs::read_dir(env.runtime.path())
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("pool-"))
        .expect("the pooled VM's runtime directory")
        .path();
    let needle = pool_dir.to_string_lossy().into_owned();
    let qemu = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|p| {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("qemu-system") && cmdline.contains(&needle)
        })
        .expect("the pooled VM's QEMU");
    let pid: i32 = qemu.file_name().to_string_lossy().parse().unwrap();
    // Pre-boots run in the background (the tests run as root, who may renice them back).
    let stat = std::fs::read_to_string(qemu.path().join("stat")).unwrap();
    let nice: i32 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(nice, 10, "an idle pre-booted VM runs at nice 10");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Let its group notice.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (build, out) =
        build_reading_output(&server, &busybox, "/nix/store/busybox echo fine > $out", 0).await;
    assert_eq!(out, "fine\n");
    assert!(
        boot_us(&build) > 0,
        "the dead VM was not used; a fresh one was booted"
    );
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_lost_total").await, 1);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_hits_total").await, 0);
    assert_eq!(metric(&metrics, "tvix_build_vm_pool_misses_total").await, 1);
    // And the pool recovers.
    await_metric(&server, &metrics, "tvix_build_vm_pool_idle_vms", 1).await;

    drop(server);
    env.assert_clean();
}
