//! The guest (kernel, initrd, agent) in real QEMU microVMs under TCG, driven through the
//! `build` command: it boots and says hello, runs the command exactly as asked, and every
//! deadline fires.

mod support;

use support::cli::Env;
use support::BUSYBOX;

const SH: &str = "/nix/store/busybox";

fn sh(env: &Env, extra: &[&str], script: &str) -> support::cli::Run {
    let mut args = vec!["-q", "--input", BUSYBOX];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", SH, "sh", "-c", script]);
    env.build(&args)
}

#[test]
fn boots_says_hello_and_runs_a_trivial_command() {
    let env = Env::new();
    let run = env.build(&["--input", BUSYBOX, "--", SH, "true"]);
    let build = run.build_json();
    assert!(
        run.stderr.contains("guest agent connected"),
        "{}",
        run.stderr
    );
    assert_eq!(build["outputs"], serde_json::Value::Null);
    assert_eq!(build["buildRequest"]["commandArgs"][0], SH);
    env.assert_clean();
}

#[test]
fn stdout_stderr_and_exit_code_come_back() {
    let env = Env::new();
    let run = sh(&env, &[], "echo to-stdout; echo to-stderr >&2; exit 7");
    run.assert_failed(1, "exited with code 7");
    assert!(run.stderr.contains("to-stdout\n"), "{}", run.stderr);
    assert!(run.stderr.contains("to-stderr\n"), "{}", run.stderr);
    env.assert_clean();
}

#[test]
fn a_signal_is_reported_as_such() {
    let env = Env::new();
    sh(&env, &[], "kill -9 $$").assert_failed(1, "killed by signal 9");
    env.assert_clean();
}

#[test]
fn the_environment_is_exactly_the_requested_one() {
    let env = Env::new();
    let run = env.build(&[
        "-q",
        "--input",
        BUSYBOX,
        "--env",
        "FOO=bar baz",
        "--",
        SH,
        "env",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let mut got: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| {
            l.split_once('=')
                .is_some_and(|(k, _)| !k.is_empty() && !k.contains(' '))
        })
        .collect();
    got.sort();
    let mut want = vec![
        "FOO=bar baz",
        "HOME=/homeless-shelter",
        "NIX_BUILD_CORES=0",
        "NIX_BUILD_TOP=/build",
        "NIX_LOG_FD=2",
        "NIX_STORE=/nix/store",
        "PATH=/path-not-set",
        "PWD=/build",
        "TEMP=/build",
        "TEMPDIR=/build",
        "TERM=xterm-256color",
        "TMP=/build",
        "TMPDIR=/build",
    ];
    want.sort();
    assert_eq!(got, want, "stderr:\n{}", run.stderr);
    env.assert_clean();
}

#[test]
fn the_build_runs_as_uid_1000_gid_100_in_build() {
    let env = Env::new();
    let run = sh(
        &env,
        &[],
        "echo \"ids=$(/nix/store/busybox id -u):$(/nix/store/busybox id -g) cwd=$(/nix/store/busybox pwd)\"",
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("ids=1000:100 cwd=/build\n"),
        "{}",
        run.stderr
    );
    env.assert_clean();
}

#[test]
fn the_build_cannot_change_its_inputs() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("src-input");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("file"), b"original\n").unwrap();
    let script = "B=/nix/store/busybox; \
        if echo x > /nix/store/src-input/file; then echo WROTE-FILE; fi; \
        if echo x > /nix/store/src-input/new; then echo CREATED; fi; \
        if $B rm -f /nix/store/src-input/file 2>/dev/null && ! test -e /nix/store/src-input/file; then echo REMOVED; fi; \
        if $B rm -rf /nix/store/src-input 2>/dev/null && ! test -e /nix/store/src-input; then echo REMOVED-DIR; fi; \
        echo \"content=$($B cat /nix/store/src-input/file)\"";
    let run = sh(&env, &["--input", input.to_str().unwrap()], script);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for bad in ["WROTE-FILE", "CREATED", "REMOVED"] {
        assert!(
            !run.stderr.contains(bad),
            "the build could {bad}:\n{}",
            run.stderr
        );
    }
    assert!(run.stderr.contains("content=original\n"), "{}", run.stderr);
    env.assert_clean();
}

#[test]
fn a_command_that_runs_forever_is_stopped_by_the_wall_clock_limit() {
    let env = Env::new();
    let started = std::time::Instant::now();
    sh(
        &env,
        &["--timeout", "3s"],
        "echo started; /nix/store/busybox sleep 600",
    )
    .assert_failed(1, "exceeded its wall-clock limit of 3s");
    assert!(started.elapsed().as_secs() < 60);
    env.assert_clean();
}

#[test]
fn a_guest_that_never_says_hello_is_stopped_by_the_boot_deadline() {
    let env = Env::new();
    // busybox as /init boots fine but never dials the host.
    let run = env.build(&[
        "--agent",
        BUSYBOX,
        "--boot-timeout",
        "4s",
        "--input",
        BUSYBOX,
        "--",
        SH,
        "true",
    ]);
    run.assert_failed(4, "did not connect within 4s");
    let tail = run
        .stderr
        .split("--- serial console (tail) ---")
        .nth(1)
        .expect("the error carries the serial console's tail");
    assert!(
        !tail.trim().is_empty(),
        "empty serial tail:\n{}",
        run.stderr
    );
    env.assert_clean();
}

#[test]
fn twenty_boots_in_a_row_without_a_hang() {
    let env = Env::new();
    for i in 0..20 {
        let run = env.build(&[
            "-q",
            "--boot-timeout",
            "20s",
            "--input",
            BUSYBOX,
            "--",
            SH,
            "true",
        ]);
        assert_eq!(run.code, Some(0), "boot {i} failed:\n{}", run.stderr);
    }
    env.assert_clean();
}
