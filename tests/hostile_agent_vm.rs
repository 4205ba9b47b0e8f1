//! A hostile guest agent (guest/src/bin/tvix-build-vm-hostile-agent.rs) in real QEMU
//! microVMs under TCG, driven through the `build` command: every protocol violation ends in
//! a clear error with the documented exit code, at a bounded cost to the host, with nothing
//! written outside the store, nothing partial visible in the castore, and no process or
//! runtime directory left behind. See docs/hostile.md for the table of results.
//!
//! The hostile agent comes from `TVIX_BUILD_VM_HOSTILE_AGENT` (scripts/install-deps.sh
//! --print-env). `TVIX_BUILD_VM_HOSTILE_LONG=1` turns on the long versions (a million
//! entries).

mod support;

use std::path::Path;
use std::time::Duration;
use support::cli::{Env, Run};
use support::hostile::{hostile_agent_with_trailer, measured, Castore, Cost, HostDirs};
use support::hostile_agent;

/// Exit codes of `tvix-build-vm build` (src/cli/build.rs).
const BUILD_FAILED: i32 = 1;
const INFRASTRUCTURE: i32 = 4;
const GUEST_MISBEHAVED: i32 = 5;

/// A protocol violation must end within this (boot, the violation, up to 2 s for the VM to
/// show whether it died, the kill), with room for a loaded two-core machine.
const VIOLATION_WALL: Duration = Duration::from_secs(40);
/// The `build` process's peak RSS for a violation; a trivial build peaks at about 16 MiB.
const VIOLATION_RSS_MIB: u64 = 64;

fn long_runs() -> bool {
    std::env::var_os("TVIX_BUILD_VM_HOSTILE_LONG").is_some_and(|v| v == "1")
}

/// One hostile run and everything measured around it.
struct Outcome {
    run: Run,
    cost: Cost,
    before: Castore,
    after: Castore,
    env: Env,
}

/// Runs `build --agent <agent> --output out <flags> -- <argv>` and checks what every
/// scenario must leave: no process, no runtime dir, no file outside the store, a castore
/// whose every blob and directory matches its digest.
fn hostile_with(agent: &Path, flags: &[&str], argv: &[&str]) -> Outcome {
    let env = Env::new();
    let host = HostDirs::new();
    let before = Castore::verify(env.store.path());
    let mut cmd = env.command();
    host.apply(&mut cmd);
    cmd.arg("build")
        .arg("-q")
        .arg("--store")
        .arg(env.store.path())
        .arg("--agent")
        .arg(agent)
        .args(["--output", "out"])
        .args(flags)
        .arg("--")
        .args(argv);
    let (run, cost) = measured(&env, cmd);
    eprintln!("exit {:?}; stderr:\n{}", run.code, run.stderr);
    let name = agent.file_name().unwrap_or_default().to_string_lossy();
    support::hostile::record(&format!("{name} {}", argv.join(" ")), &run, &cost);
    env.assert_clean();
    host.assert_untouched();
    let after = Castore::verify(env.store.path());
    Outcome {
        run,
        cost,
        before,
        after,
        env,
    }
}

fn hostile(flags: &[&str], argv: &[&str]) -> Outcome {
    hostile_with(&hostile_agent(), flags, argv)
}

/// The common ending of a refused guest: the exit code, the message, the cost, and nothing
/// new in the castore but `legit_blobs`.
fn assert_refused(o: &Outcome, code: i32, needle: &str, legit_blobs: &[&[u8]]) {
    assert_refused_within(
        o,
        code,
        needle,
        legit_blobs,
        VIOLATION_WALL,
        VIOLATION_RSS_MIB,
    );
}

fn assert_refused_within(
    o: &Outcome,
    code: i32,
    needle: &str,
    legit_blobs: &[&[u8]],
    wall: Duration,
    rss_mib: u64,
) {
    o.run.assert_failed(code, needle);
    assert!(
        o.run.stdout.is_empty(),
        "a Build was printed: {}",
        o.run.stdout
    );
    o.cost.assert_within(wall, rss_mib);
    o.after.assert_nothing_partial(&o.before, legit_blobs);
}

/// The harvest holds an output's directories until OutputsDone (so that a failure leaves
/// none visible): about 250 bytes of host memory per entry, measured. At the default
/// limit of a million entries that is what one hostile guest can make the host hold.
fn entries_bounds(entries: u64) -> (Duration, u64) {
    if entries > 100_000 {
        (
            Duration::from_secs(300),
            VIOLATION_RSS_MIB + entries * 300 / (1 << 20),
        )
    } else {
        (VIOLATION_WALL, VIOLATION_RSS_MIB)
    }
}

#[test]
fn a_frame_over_the_size_limit_is_refused_before_its_body_is_read() {
    let o = hostile(&[], &["frame-too-large"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "frame of 1048577 bytes exceeds the limit of 1048576 bytes",
        &[],
    );
}

#[test]
fn a_length_prefix_that_lies_and_a_closed_stream_is_a_broken_frame() {
    let o = hostile(&[], &["lying-length-close"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "the guest closed the connection inside a frame while the command ran",
        &[],
    );
}

#[test]
fn a_length_prefix_that_lies_and_stalls_is_ended_by_the_wall_clock_limit() {
    let o = hostile(&["--timeout", "4s"], &["lying-length-stall"]);
    assert_refused(&o, BUILD_FAILED, "exceeded its wall-clock limit of 4s", &[]);
}

#[test]
fn garbage_bytes_are_not_a_message() {
    let o = hostile(&[], &["garbage"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "frame does not decode as a protobuf message",
        &[],
    );
}

#[test]
fn an_output_entry_named_dotdot_is_refused() {
    let o = hostile(&[], &["name-dotdot"]);
    assert_refused(&o, GUEST_MISBEHAVED, r#"entry name ".." is invalid"#, &[]);
}

#[test]
fn an_output_entry_named_dot_is_refused() {
    let o = hostile(&[], &["name-dot"]);
    assert_refused(&o, GUEST_MISBEHAVED, r#"entry name "." is invalid"#, &[]);
}

#[test]
fn an_output_entry_name_with_a_slash_is_refused() {
    let o = hostile(&[], &["name-slash"]);
    assert_refused(&o, GUEST_MISBEHAVED, r#"entry name "a/b" is invalid"#, &[]);
}

#[test]
fn an_empty_output_entry_name_is_refused() {
    let o = hostile(&[], &["name-empty"]);
    assert_refused(&o, GUEST_MISBEHAVED, r#"entry name "" is invalid"#, &[]);
}

#[test]
fn an_output_entry_name_with_nul_is_refused() {
    let o = hostile(&[], &["name-nul"]);
    assert_refused(&o, GUEST_MISBEHAVED, r#"entry name "a\0b" is invalid"#, &[]);
}

#[test]
fn a_duplicated_output_entry_is_refused() {
    let o = hostile(&[], &["name-duplicate"]);
    assert_refused(&o, GUEST_MISBEHAVED, r#"entry "a" appears twice"#, &[]);
}

#[test]
fn unsorted_output_entries_are_refused() {
    let o = hostile(&[], &["name-unsorted"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        r#"entry "a" comes after "b"; names must be strictly increasing"#,
        &[],
    );
}

#[test]
fn symlinks_to_host_secrets_are_stored_as_text_and_never_followed() {
    let o = hostile(&[], &["symlink-escape"]);
    let build = o.run.build_json();
    o.cost.assert_within(VIOLATION_WALL, VIOLATION_RSS_MIB);
    // The same tree made on the host and imported: the guest's output is two symlinks whose
    // targets are just bytes, nothing read from where they point.
    let host = tempfile::tempdir().unwrap();
    let out = host.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink("../../../../etc/shadow", out.join("escape")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", out.join("shadow")).unwrap();
    let reference = Env::new();
    let imported = reference.store_import(&out);
    assert_eq!(
        build["outputs"][0]["directory"]["digest"], imported["directory"]["digest"],
        "{build}"
    );
    assert!(
        o.after.blobs.is_empty(),
        "blobs stored: {:?}",
        o.after.blobs
    );
    assert_eq!(o.after.directories.len(), 1, "{:?}", o.after);
}

#[test]
fn a_tree_ten_thousand_levels_deep_stops_at_the_depth_limit() {
    let o = hostile(&[], &["deep-tree", "10000"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "output directory depth reached 257, over the limit of 256",
        &[],
    );
}

#[test]
fn one_entry_over_the_entry_limit_is_refused() {
    let limit: u64 = if long_runs() { 1_000_000 } else { 2000 };
    // The output's root directory counts too: root + `limit` files is one over.
    let o = hostile(
        &["--max-output-entries", &limit.to_string()],
        &["many-files", &limit.to_string()],
    );
    let (wall, rss) = entries_bounds(limit);
    assert_refused_within(
        &o,
        GUEST_MISBEHAVED,
        &format!(
            "number of output entries reached {}, over the limit of {limit}",
            limit + 1
        ),
        // The empty files before the limit are complete, content-addressed: one blob.
        &[b""],
        wall,
        rss,
    );
}

#[test]
fn a_million_and_one_symlinks_are_refused_at_the_default_entry_limit() {
    let limit: u64 = if long_runs() { 1_000_000 } else { 20_000 };
    let flags: &[&str] = if long_runs() {
        &[]
    } else {
        &["--max-output-entries", "20000"]
    };
    let o = hostile(flags, &["many-symlinks", &limit.to_string()]);
    let (wall, rss) = entries_bounds(limit);
    assert_refused_within(
        &o,
        GUEST_MISBEHAVED,
        &format!(
            "number of output entries reached {}, over the limit of {limit}",
            limit + 1
        ),
        &[],
        wall,
        rss,
    );
}

#[test]
fn a_file_announced_over_the_output_limit_is_refused_before_its_bytes() {
    let o = hostile(&["--max-output-bytes", "1M"], &["big-file", "2097152"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "total output size in bytes reached 2097152, over the limit of 1048576",
        &[],
    );
}

#[test]
fn a_file_announced_at_u64_max_bytes_is_refused() {
    let o = hostile(&[], &["big-file", &u64::MAX.to_string()]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        &format!("total output size in bytes reached {}", u64::MAX),
        &[],
    );
}

#[test]
fn files_that_add_up_to_more_than_the_output_limit_are_refused() {
    let o = hostile(
        &["--max-output-bytes", "1M"],
        &["many-big-files", "3", "524288"],
    );
    let half = vec![0u8; 512 << 10];
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "total output size in bytes reached 1572864, over the limit of 1048576",
        &[&half],
    );
}

#[test]
fn a_file_longer_than_announced_is_refused() {
    let o = hostile(&[], &["size-lie-long"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "file announced 10 bytes, but more arrived",
        &[],
    );
}

#[test]
fn a_file_shorter_than_announced_is_refused() {
    let o = hostile(&[], &["size-lie-short"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "file announced 20 bytes, but OutputsDone came after 10",
        &[],
    );
}

#[test]
fn a_stream_that_stops_mid_file_is_refused() {
    let o = hostile(&[], &["stop-mid-file"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "file announced 1048576 bytes, but the end of the stream came after 307200",
        &[],
    );
}

#[test]
fn an_agent_that_never_says_hello_is_stopped_by_the_boot_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let agent = hostile_agent_with_trailer(dir.path(), "no-hello");
    let o = hostile_with(&agent, &["--boot-timeout", "5s"], &["true"]);
    assert_refused(
        &o,
        INFRASTRUCTURE,
        "the guest agent did not say Hello within",
        &[],
    );
}

#[test]
fn a_second_hello_is_a_protocol_error() {
    let o = hostile(&[], &["hello-twice"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "expected Log or Exited while the command ran, got Hello",
        &[],
    );
}

#[test]
fn another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = hostile_agent_with_trailer(dir.path(), "wrong-version");
    let o = hostile_with(&agent, &[], &["true"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "the agent speaks protocol version 2, the host only version 1",
        &[],
    );
}

#[test]
fn success_without_the_requested_outputs_is_refused() {
    let o = hostile(&[], &["success-no-outputs"]);
    assert_refused(
        &o,
        GUEST_MISBEHAVED,
        "expected OutputStart receiving the outputs, got OutputsDone",
        &[],
    );
}

#[test]
fn a_guest_that_never_powers_off_does_not_hold_the_build() {
    let o = hostile(&[], &["no-power-off"]);
    let build = o.run.build_json();
    assert_eq!(
        build["outputs"][0]["symlink"]["target"], "dGFyZ2V0",
        "base64 of \"target\": {build}"
    );
    // The host ends the VM as soon as the outputs are stored, whether or not the guest
    // powers off: boot and the conversation only (a 10 s wait for power-off used to follow).
    o.cost
        .assert_within(Duration::from_secs(45), VIOLATION_RSS_MIB);
    assert!(o.cost.wall < Duration::from_secs(8), "{:?}", o.cost);
    let _ = &o.env;
}

#[test]
fn absurd_usage_figures_are_cut_to_their_bounds_and_named() {
    let o = hostile(&["--memory", "512M"], &["absurd-usage"]);
    let build = o.run.build_json();
    let u = &build["usage"];
    let figure_of =
        |v: &serde_json::Value, k: &str| -> u64 { v[k].as_str().unwrap().parse().unwrap() };
    let figure = |k: &str| figure_of(u, k);
    assert_eq!(
        u["guestClamped"],
        serde_json::json!(["cpu_user", "cpu_system", "memory_peak", "pids_peak"]),
        "{u}"
    );
    // Cut to what the host allowed: the build's memory limit, its process limit, and CPU
    // time no more than the command's wall time on the most vCPUs a VM may have.
    assert!(figure("guestMemoryPeakBytes") <= 512 << 20, "{u}");
    assert!(figure("guestPidsPeak") <= 4096, "{u}");
    let exec_us = figure_of(&build["timings"], "execUs");
    let cpu = figure("guestCpuUserUs") + figure("guestCpuSystemUs");
    assert!(
        cpu <= exec_us * u64::from(tvix_build_vm::vm::MAX_VCPUS),
        "{u}"
    );
    // The host's own figures are the host's.
    assert!(figure("hostCpuUs") > 0, "{u}");
}
