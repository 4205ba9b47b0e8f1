//! One BuildRequest -> one microVM -> Build, end to end through the `build` command, with a
//! real embedded castore on disk and real VMs under TCG.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use support::cli::Env;
use support::BUSYBOX;

const SH: &str = "/nix/store/busybox";

#[test]
fn an_output_tree_has_the_digest_of_the_same_tree_imported_on_the_host() {
    let env = Env::new();
    let script = "B=/nix/store/busybox; o=/nix/store/tree-out; \
        $B mkdir -p $o/a/b/c $o/empty-dir && \
        echo hello > $o/a/b/c/file && \
        printf '#!/bin/sh\\necho run\\n' > $o/a/run.sh && $B chmod 755 $o/a/run.sh && \
        : > $o/empty-file && \
        $B ln -s a/b/c/file $o/link";
    let run = env.build(&[
        "-q", "--input", BUSYBOX, "--output", "tree-out", "--", SH, "sh", "-c", script,
    ]);
    let build = run.build_json();
    let out = &build["outputs"][0]["directory"];
    assert_eq!(
        out["name"], "dHJlZS1vdXQ=",
        "named by basename (base64 of tree-out)"
    );

    let host = tempfile::tempdir().unwrap();
    let o = host.path().join("tree-out");
    std::fs::create_dir_all(o.join("a/b/c")).unwrap();
    std::fs::create_dir(o.join("empty-dir")).unwrap();
    std::fs::write(o.join("a/b/c/file"), b"hello\n").unwrap();
    std::fs::write(o.join("a/run.sh"), b"#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(o.join("a/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(o.join("empty-file"), b"").unwrap();
    std::os::unix::fs::symlink("a/b/c/file", o.join("link")).unwrap();
    let imported = env.store_import(&o);
    assert_eq!(
        out["digest"], imported["directory"]["digest"],
        "guest tree != host tree"
    );
    assert_eq!(out["size"], imported["directory"]["size"]);
    env.assert_clean();
}

#[test]
fn a_64_mib_input_reads_back_with_the_right_hash() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big-input");
    let mut data = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&big, &data).unwrap();
    let host = Command::new("sha256sum").arg(&big).output().unwrap();
    let want = String::from_utf8_lossy(&host.stdout)[..64].to_owned();

    let run = env.build(&[
        "-q",
        "--input",
        BUSYBOX,
        "--input",
        big.to_str().unwrap(),
        "--",
        SH,
        "sha256sum",
        "/nix/store/big-input",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("{want}  /nix/store/big-input")),
        "{}",
        run.stderr
    );
    env.assert_clean();
}

#[test]
fn a_failing_command_fails_the_build_with_its_exit_code_and_log() {
    let env = Env::new();
    let run = env.build(&[
        "-q",
        "--input",
        BUSYBOX,
        "--output",
        "out",
        "--",
        SH,
        "sh",
        "-c",
        "echo oops >&2; exit 42",
    ]);
    run.assert_failed(1, "exited with code 42");
    assert!(
        run.stderr.contains("--- build log"),
        "log tail attached:\n{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    env.assert_clean();
}

#[test]
fn a_missing_output_fails_the_build_and_names_it() {
    let env = Env::new();
    let run = env.build(&[
        "-q",
        "--input",
        BUSYBOX,
        "--output",
        "made",
        "--output",
        "never-made",
        "--",
        SH,
        "sh",
        "-c",
        "echo x > /nix/store/made",
    ]);
    run.assert_failed(1, "output nix/store/never-made was not produced");
    env.assert_clean();
}

#[test]
fn the_wall_clock_limit_fires() {
    let env = Env::new();
    env.build(&[
        "-q",
        "--timeout",
        "2s",
        "--input",
        BUSYBOX,
        "--",
        SH,
        "sh",
        "-c",
        "while :; do echo tick; /nix/store/busybox sleep 0.2; done",
    ])
    .assert_failed(1, "wall-clock limit of 2s");
    env.assert_clean();
}

#[test]
fn the_silence_limit_fires() {
    let env = Env::new();
    env.build(&[
        "-q",
        "--silence-timeout",
        "2s",
        "--input",
        BUSYBOX,
        "--",
        SH,
        "sh",
        "-c",
        "echo once; /nix/store/busybox sleep 600",
    ])
    .assert_failed(1, "no log output for 2s (silence limit)");
    env.assert_clean();
}

#[test]
fn a_missing_input_is_refused_before_any_vm_starts() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let req = dir.path().join("req.json");
    // A directory input whose digest is in no store.
    std::fs::write(
        &req,
        r#"{"commandArgs":["/nix/store/x/bin/sh"],"inputs":[{"directory":{"name":"eA==","digest":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","size":"1"}}],"constraints":{"system":"x86_64-linux"}}"#,
    )
    .unwrap();
    env.build(&["--request", req.to_str().unwrap()])
        .assert_failed(
            3,
            "input x (b3:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=) is not in the castore",
        );
    env.assert_clean();
}

#[test]
fn an_invalid_request_names_the_field() {
    let env = Env::new();
    env.build(&["--input", BUSYBOX, "--output", "a/b", "--", SH, "true"])
        .assert_failed(2, "outputs[0]");
    env.assert_clean();
}

#[test]
fn three_builds_at_once_all_succeed() {
    let envs: Vec<Env> = (0..3).map(|_| Env::new()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = envs
            .iter()
            .enumerate()
            .map(|(i, env)| {
                s.spawn(move || {
                    let out = format!("out-{i}");
                    let script = format!("echo {i} > /nix/store/{out}");
                    let run = env.build(&[
                        "-q", "--input", BUSYBOX, "--output", &out, "--", SH, "sh", "-c", &script,
                    ]);
                    run.build_json()
                })
            })
            .collect();
        for h in handles {
            let build = h.join().unwrap();
            assert!(build["outputs"][0]["file"]["digest"].is_string(), "{build}");
        }
    });
    for env in &envs {
        env.assert_clean();
    }
}

#[test]
fn a_killed_virtio_fs_daemon_ends_the_build_and_is_named() {
    let env = Env::new();
    let mut cmd = env.command();
    cmd.args(["build", "-q", "--timeout", "120s", "--store"])
        .arg(env.store.path())
        .args([
            "--input",
            BUSYBOX,
            "--",
            SH,
            "sh",
            "-c",
            "echo started; /nix/store/busybox sleep 600",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let started = std::time::Instant::now();
    let needle = env.runtime.path().to_string_lossy().into_owned();
    let daemon = loop {
        assert!(started.elapsed().as_secs() < 30, "no fs-daemon appeared");
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|p| {
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains("fs-daemon") && cmdline.contains(&needle))
                .then(|| p.file_name().to_string_lossy().into_owned())
        });
        if let Some(pid) = found {
            break pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Let the guest boot and the command start before pulling the daemon away.
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(Command::new("kill")
        .args(["-9", &daemon])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("the fs-daemon died during the build"),
        "{stderr}"
    );
    assert!(
        started.elapsed().as_secs() < 60,
        "the build did not end promptly"
    );
    env.assert_clean();
}

/// With a remote castore, whose blob sizes the host cannot check without reading them, an
/// input that declares more or fewer bytes than its blob has boots, the guest reads EIO and
/// the build fails; the failure says why, in the inputs' fs-daemon's own words.
#[test]
fn a_remote_input_of_another_size_than_declared_fails_with_the_fs_daemons_error() {
    let env = Env::new();
    let dir = tempfile::Builder::new()
        .prefix("tbv-cs-")
        .tempdir_in("/tmp")
        .unwrap();
    let sock = dir.path().join("castore.sock");
    // A castore-only server: no kernel, no agent.
    let mut server = env
        .command()
        .env_remove("TVIX_BUILD_VM_KERNEL")
        .env_remove("TVIX_BUILD_VM_AGENT")
        .args(["serve", "--store"])
        .arg(dir.path().join("store"))
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the castore server did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let addr = format!("grpc+unix://{}", sock.display());
    let remote = [
        "--blob-service-addr",
        &addr,
        "--directory-service-addr",
        &addr,
    ];
    let import = |path: &str| -> serde_json::Value {
        let out = env
            .command()
            .arg("store")
            .args(remote)
            .args(["import", path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let data = dir.path().join("data");
    std::fs::write(&data, vec![7u8; 100_000]).unwrap();
    let busybox = import(BUSYBOX);
    let data = import(data.to_str().unwrap());

    for (declared, says) in [
        (
            "1000000000",
            "ends at byte 100000, but its file node says 1000000000 bytes",
        ),
        ("10", "holds more than the 10 bytes its file node says"),
    ] {
        let mut node = data["file"].clone();
        node["size"] = declared.into();
        let request = serde_json::json!({
            "inputs": [busybox, {"file": node}],
            "commandArgs": [SH, "cat", "/nix/store/data"],
            "constraints": {"system": "x86_64-linux"},
        });
        let file = dir.path().join("request.json");
        std::fs::write(&file, request.to_string()).unwrap();
        let mut args = remote.to_vec();
        args.extend(["-q", "--request", file.to_str().unwrap()]);
        let run = env.build(&args);
        run.assert_failed(1, "--- the inputs' fs-daemon ---");
        assert!(run.stderr.contains(says), "{declared}: {}", run.stderr);
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    server.wait().unwrap();
    env.assert_clean();
}
