//! Hostile builds with the real guest agent, in real QEMU microVMs under TCG: a fork bomb,
//! memory exhaustion, a full disk, a log flood, signals ignored, the network, the inputs
//! and the clock. Each must end as documented at a bounded cost to the host and leave
//! nothing behind. See docs/hostile.md for the table of results.
//!
//! `TVIX_BUILD_VM_HOSTILE_LONG=1` turns on the long versions (gigabytes of log).

mod support;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};
use support::cli::{Env, Run};
use support::hostile::{measured, Castore, Cost, HostDirs};
use support::{static_tool, BUSYBOX};

const SH: &str = "/nix/store/busybox";
const BUILD_FAILED: i32 = 1;
const GUEST_MISBEHAVED: i32 = 5;

/// The `build` process's peak RSS for any of these builds; a trivial build peaks at about
/// 16 MiB, and the build log streams through it without being kept.
const CLI_RSS_MIB: u64 = 64;
/// The VM's host processes together: 512 MiB of guest RAM (all of it touched, at worst)
/// plus QEMU, the fs-daemon and vhost-device-vsock.
const VM_RSS_MIB: u64 = 512 + 256;

fn long_runs() -> bool {
    std::env::var_os("TVIX_BUILD_VM_HOSTILE_LONG").is_some_and(|v| v == "1")
}

struct Outcome {
    run: Run,
    cost: Cost,
    before: Castore,
    after: Castore,
}

/// Runs `sh -c script` with busybox (and `inputs`) as inputs and checks what every build
/// must leave: no process, no runtime dir, no file outside the store, an intact castore.
fn build(name: &str, flags: &[&str], inputs: &[&Path], script: &str) -> Outcome {
    let env = Env::new();
    let host = HostDirs::new();
    // The inputs are in the store before the build (the CLI imports them again, finding
    // them there), so that `before` is what a failed build must leave.
    env.store_import(Path::new(BUSYBOX));
    for input in inputs {
        env.store_import(input);
    }
    let before = Castore::verify(env.store.path());
    let mut cmd = env.command();
    host.apply(&mut cmd);
    cmd.arg("build")
        .arg("-q")
        .arg("--store")
        .arg(env.store.path())
        .args(["--input", BUSYBOX]);
    for input in inputs {
        cmd.arg("--input").arg(input);
    }
    cmd.args(flags).args(["--", SH, "sh", "-c", script]);
    let (run, cost) = measured(&env, cmd);
    eprintln!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    support::hostile::record(name, &run, &cost);
    env.assert_clean();
    host.assert_untouched();
    let after = Castore::verify(env.store.path());
    Outcome {
        run,
        cost,
        before,
        after,
    }
}

#[test]
fn a_fork_bomb_hits_the_process_limit_and_is_killed_with_the_build() {
    let bomb = static_tool("support/forkbomb.c", "forkbomb");
    let o = build(
        "fork bomb",
        &["--timeout", "90s"],
        &[&bomb],
        "/nix/store/forkbomb; echo bomb-exit=$?",
    );
    o.run.build_json();
    // fork fails with EAGAIN: the build user's RLIMIT_NPROC (about 1,950 at 512 MiB) or
    // the cgroup's pids.max (4096), whichever is lower; never ENOMEM or a hang.
    let line = o
        .run
        .stderr
        .lines()
        .find(|l| l.starts_with("forkbomb: fork failed with"))
        .unwrap_or_else(|| panic!("no report from the bomb:\n{}", o.run.stderr));
    assert!(line.ends_with("Resource temporarily unavailable"), "{line}");
    let running: u64 = line
        .split_whitespace()
        .nth(4)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!((100..=4096).contains(&running), "{line}");
    assert!(o.run.stderr.contains("bomb-exit=0"), "{}", o.run.stderr);
    // The rest of the bomb (thousands of processes) is killed with the build's cgroup.
    o.cost.assert_within(Duration::from_secs(80), CLI_RSS_MIB);
    o.cost.assert_vm_rss_within(VM_RSS_MIB);
}

#[test]
fn a_build_that_allocates_until_oom_is_reported_as_oom() {
    let o = build(
        "allocate until OOM",
        &[],
        &[],
        "x=0123456789abcdef; while :; do x=$x$x; done",
    );
    o.run
        .assert_failed(BUILD_FAILED, "the build ran out of memory");
    o.cost.assert_within(Duration::from_secs(60), CLI_RSS_MIB);
    o.cost.assert_vm_rss_within(VM_RSS_MIB);
    o.after.assert_nothing_partial(&o.before, &[]);
}

#[test]
fn a_build_that_fills_its_disk_gets_enospc_and_the_host_is_untouched() {
    let o = build(
        "fill the disk",
        &[],
        &[],
        "B=/nix/store/busybox; $B dd if=/dev/zero of=/build/fill bs=1M; echo dd-exit=$?; \
         $B df -k /build | $B tail -1",
    );
    o.run.build_json();
    assert!(
        o.run.stderr.contains("No space left on device"),
        "{}",
        o.run.stderr
    );
    assert!(o.run.stderr.contains("dd-exit=1"), "{}", o.run.stderr);
    // Scratch space is guest RAM (tmpfs): it can only cost what the VM's memory costs.
    o.cost.assert_within(Duration::from_secs(60), CLI_RSS_MIB);
    o.cost.assert_vm_rss_within(VM_RSS_MIB);
}

#[test]
fn a_log_flood_is_stopped_at_max_log_bytes_with_the_cli_memory_flat() {
    let (limit, wall) = if long_runs() {
        ("2G", Duration::from_secs(1800))
    } else {
        ("16M", Duration::from_secs(60))
    };
    let o = build(
        "log flood",
        &["--max-log-bytes", limit],
        &[],
        "/nix/store/busybox yes 0123456789abcdefghijklmnopqrstuvwxyz",
    );
    o.run
        .assert_failed(GUEST_MISBEHAVED, "build log size in bytes reached");
    let bytes = support::hostile::parse_size(limit);
    assert!(
        o.run.stderr.contains(&format!("over the limit of {bytes}")),
        "{}",
        o.run.stderr
    );
    o.cost.assert_within(wall, CLI_RSS_MIB);
    o.cost.assert_vm_rss_within(VM_RSS_MIB);
}

#[test]
fn a_command_that_ignores_sigterm_is_ended_by_the_wall_clock_limit() {
    let o = build(
        "ignore SIGTERM",
        &["--timeout", "4s"],
        &[],
        "trap '' TERM INT HUP; echo ignoring; while :; do /nix/store/busybox sleep 1; done",
    );
    o.run
        .assert_failed(BUILD_FAILED, "exceeded its wall-clock limit of 4s");
    o.cost.assert_within(Duration::from_secs(40), CLI_RSS_MIB);
}

#[test]
fn a_daemon_left_behind_that_ignores_signals_does_not_hold_the_build() {
    // The command exits at once, leaving a process that ignores TERM/HUP, started its own
    // session and holds the log pipes open: the agent kills the build's whole cgroup.
    let o = build(
        "daemon left behind",
        &["--timeout", "120s"],
        &[],
        "B=/nix/store/busybox; $B setsid $B sh -c \"trap '' TERM HUP; $B sleep 600\" & \
         echo left-a-daemon; exit 0",
    );
    o.run.build_json();
    assert!(o.run.stderr.contains("left-a-daemon"), "{}", o.run.stderr);
    o.cost.assert_within(Duration::from_secs(40), CLI_RSS_MIB);
}

#[test]
fn the_network_is_unreachable_and_the_host_vsock_offers_nothing_more() {
    let client = static_tool("support/vsock_client.c", "vsock-client");
    let o = build(
        "network and vsock",
        &["--timeout", "120s"],
        &[&client],
        "B=/nix/store/busybox; \
         $B nc -w 3 10.0.2.2 80 </dev/null; echo nc-exit=$?; \
         $B cat /proc/net/dev; \
         for p in 1024 1025; do $B timeout 3 /nix/store/vsock-client $p hello; echo vsock-$p-exit=$?; done",
    );
    o.run.build_json();
    let log = &o.run.stderr;
    assert!(log.contains("nc-exit=1"), "{log}");
    assert!(log.contains("Network is unreachable"), "{log}");
    assert!(!log.contains("eth0"), "a network device exists:\n{log}");
    // Nothing on the host listens for the build: the agent's port took one connection (the
    // agent's own) and no other port exists.
    for port in [1024, 1025] {
        assert!(
            log.contains(&format!("vsock-{port}-exit=1")),
            "port {port} accepted the build's connection:\n{log}"
        );
    }
    o.cost.assert_within(Duration::from_secs(60), CLI_RSS_MIB);
}

#[test]
fn the_build_cannot_change_its_read_only_inputs_by_any_route() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("src-input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("file"), b"original\n").unwrap();
    let script = "B=/nix/store/busybox; I=/nix/store/src-input; \
        try() { if \"$@\" 2>/dev/null; then echo \"BREACH: $*\"; else echo \"refused: $1\"; fi; }; \
        try $B sh -c \"echo x > $I/file\"; \
        try $B sh -c \"echo x >> $I/file\"; \
        try $B truncate -s 0 $I/file; \
        try $B chmod 777 $I/file; \
        try $B touch $I/new; \
        try $B mv $I/file $I/moved; \
        try $B ln $I/file /build/hardlink; \
        try $B rm -f $I/file; \
        try $B mount -o remount,rw /nix/store; \
        try $B umount /nix/store; \
        try $B sh -c \"echo x > /proc/sys/kernel/hostname\"; \
        echo \"content=$($B cat $I/file)\"";
    let o = build("write the inputs", &[], &[&input], script);
    o.run.build_json();
    let log = &o.run.stderr;
    assert!(!log.contains("BREACH"), "{log}");
    assert_eq!(log.matches("refused: ").count(), 11, "{log}");
    assert!(log.contains("content=original\n"), "{log}");
    assert_eq!(std::fs::read(input.join("file")).unwrap(), b"original\n");
    // The castore's copy of the input is intact too (Castore::verify re-hashed every blob).
    assert!(o
        .after
        .blobs
        .contains(&blake3::hash(b"original\n").to_hex().to_string()));
    o.cost.assert_within(Duration::from_secs(60), CLI_RSS_MIB);
}

#[test]
fn a_build_that_changes_the_clock_cannot_affect_the_host() {
    let wall_before = SystemTime::now();
    let mono_before = Instant::now();
    let o = build(
        "change the clock",
        &[],
        &[],
        "B=/nix/store/busybox; $B date -s '2001-01-01 00:00:00'; \
         $B hwclock -w; echo hwclock-exit=$?; echo guest-now=$($B date +%s)",
    );
    let wall_elapsed = SystemTime::now()
        .duration_since(wall_before)
        .expect("the host clock went backwards during the build");
    let mono_elapsed = mono_before.elapsed();
    o.run.build_json();
    let log = &o.run.stderr;
    // (busybox's date exits 0 even when it cannot set the clock; guest-now below checks.)
    assert!(
        log.contains("can't set date: Operation not permitted"),
        "{log}"
    );
    assert!(!log.contains("hwclock-exit=0"), "{log}");
    // The host's clock kept pace with its monotonic clock.
    let drift = wall_elapsed.abs_diff(mono_elapsed);
    assert!(
        drift < Duration::from_secs(2),
        "host clock moved by {drift:?}"
    );
    // And the guest had the host's time, set at hand-over.
    let guest_now: u64 = log
        .lines()
        .find_map(|l| l.strip_prefix("guest-now="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    let host_now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host_now.abs_diff(guest_now) < 120,
        "guest {guest_now}, host {host_now}"
    );
    o.cost.assert_within(Duration::from_secs(60), CLI_RSS_MIB);
}
