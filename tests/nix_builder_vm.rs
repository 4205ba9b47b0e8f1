//! `tvix-build-vm nix-builder` as a real Nix's `external-builders` program: `nix build` in
//! the test chroot (Debian sid's Nix 2.34) runs each derivation in one of our microVMs,
//! through a `serve` on the host (`--builder-addr`); and the default mode, where the program
//! starts a local server itself, driven with a build.json as Nix writes it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::cli::Env;
use support::nix_chroot::NixChroot;
use support::serve::Serve;

/// The test derivations: busybox (copied into the store by `builtins.path`) is the only
/// input; `salt` makes every store path new for each test run (the chroot's store is shared
/// and persists).
const DERIVATIONS: &str = r#"
{ salt }:
let
  bb = builtins.path { path = /tvb/bb; name = "bb"; };
  b = "${bb}/bin/busybox";
  drv = name: script: extra: derivation ({
    inherit name salt;
    system = "x86_64-linux";
    builder = b;
    args = [ "sh" "-c" script ];
  } // extra);
in rec {
  whereami = drv "whereami" ''
    echo building in $PWD as $(${b} id -u):$(${b} id -g)
    ${b} uname -r > $out
    ${b} grep -m1 'model name' /proc/cpuinfo >> $out
  '' {};
  again = drv "again" "echo second > $out" {};
  two = drv "two" "echo main > $out; ${b} mkdir -p $dev/include; echo header > $dev/include/h" {
    outputs = [ "out" "dev" ];
  };
  base = drv "base" "${b} mkdir $out; echo from-base > $out/file" {};
  user = drv "user" "${b} cat ${base}/file > $out; echo ${base} >> $out" {};
  passfile = drv "passfile" "${b} cat $bigPath > $out" {
    passAsFile = [ "big" ];
    big = "payload-${salt}";
  };
  structured = drv "structured"
    "${b} cp $NIX_ATTRS_JSON_FILE $(${b} sed -n 's/.*\"out\":\"\\([^\"]*\\)\".*/\\1/p' $NIX_ATTRS_JSON_FILE)" {
    __structuredAttrs = true;
    items = [ "a" "b" ];
  };
  failing = drv "failing" "echo about-to-fail-${salt}; exit 3" {};
  deterministic = drv "deterministic" ''
    ${b} mkdir -p $out/d
    echo data > $out/d/f
    ${b} chmod 755 $out/d/f
    ${b} ln -s d/f $out/link
  '' {};
  slow = drv "slow" "echo sleeping; ${b} sleep 120" {};
  kvm = drv "kvm" "${b} ls -l /dev/kvm > $out" { requiredSystemFeatures = [ "kvm" ]; };
  outside = drv "outside" "echo hi > $out" { builder = "/bin/busybox"; };
}
"#;

/// One test's host server and Nix.
struct T {
    env: Env,
    serve: Serve,
    nix: NixChroot,
    /// [`DERIVATIONS`] inside the chroot.
    file: String,
}

impl T {
    fn build(&self, attr: &str, extra: &[&str]) -> support::nix_chroot::NixRun {
        self.nix.build(&self.serve, &self.file, attr, extra)
    }

    /// Builds `attr`, which must fail with nothing placed; Nix's stderr.
    fn build_failing(&self, attr: &str, extra: &[&str]) -> String {
        let run = self.build(attr, extra);
        assert!(!run.0.status.success(), "{attr} built");
        assert!(
            self.nix.records().is_empty(),
            "{attr}: something was placed"
        );
        run.stderr()
    }
}

/// Runs `test` against a fresh host server and Nix; afterwards no VM or runtime directory
/// of a build may be left.
fn with_nix(test: impl FnOnce(&T)) {
    let env = Env::new();
    let serve = Serve::start(&env, &[]);
    let nix = NixChroot::new();
    let file = nix.write("drvs.nix", DERIVATIONS);
    let t = T {
        env,
        serve,
        nix,
        file,
    };
    test(&t);
    drop(t.serve);
    t.env.assert_clean();
}

/// The kernel release of the guest kernel image (its "Linux version X" banner).
fn guest_kernel_release() -> String {
    let image = std::fs::read(support::kernel()).unwrap();
    let needle = b"Linux version ";
    let at = image
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the kernel image holds its version banner");
    let rest = &image[at + needle.len()..];
    let end = rest.iter().position(|b| *b == b' ').unwrap();
    String::from_utf8(rest[..end].to_vec()).unwrap()
}

fn host_cpu_model() -> String {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    text.lines()
        .find(|l| l.starts_with("model name"))
        .unwrap()
        .to_owned()
}

/// The build really ran in our VM: our guest kernel, QEMU's CPU; Nix registered the output
/// as from its own builder, showed our log live, and the output verifies.
#[test]
fn nix_build_runs_in_our_microvm_and_registers_the_output() {
    with_nix(|t| {
        let nix = &t.nix;
        let run = t.build("whereami", &[]);
        let paths = run.paths();
        assert_eq!(paths.len(), 1, "{paths:?}");
        let out = std::fs::read_to_string(nix.host_path(&paths[0])).unwrap();
        let mut lines = out.lines();
        let kernel = lines.next().unwrap();
        assert_eq!(kernel, guest_kernel_release(), "{out}");
        let host_kernel = nix::sys::utsname::uname().unwrap();
        assert_ne!(kernel, host_kernel.release().to_str().unwrap());
        let cpu = lines.next().unwrap();
        assert_ne!(cpu, host_cpu_model(), "the guest saw the host's CPU");
        assert!(cpu.contains("QEMU"), "{cpu}");
        // The log came through Nix (-L prefixes it with the derivation's name); the build ran
        // in /build as uid 1000, gid 100, as in Nix's sandbox.
        assert!(
            run.stderr()
                .contains("whereami> building in /build as 1000:100\n"),
            "{}",
            run.stderr()
        );
        nix.assert_verified(&paths[0]);
        // Nix canonicalised what we placed: read-only, owned by root (the build user here).
        let meta = std::fs::metadata(nix.host_path(&paths[0])).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    });
}

#[test]
fn multiple_outputs_are_each_placed_and_registered() {
    with_nix(|t| {
        let nix = &t.nix;
        let paths = t.build("two.all", &[]).paths();
        assert_eq!(paths.len(), 2, "{paths:?}");
        let dev = paths.iter().find(|p| p.ends_with("-two-dev")).unwrap();
        let out = paths.iter().find(|p| p.ends_with("-two")).unwrap();
        assert_eq!(
            std::fs::read_to_string(nix.host_path(out)).unwrap(),
            "main\n"
        );
        assert_eq!(
            std::fs::read_to_string(nix.host_path(dev).join("include/h")).unwrap(),
            "header\n"
        );
        for p in &paths {
            nix.assert_verified(p);
        }
    });
}

/// A derivation using another's output: both built through us; the second finds the
/// first's output (read from the Nix store and hashed) already on the server.
#[test]
fn a_dependency_built_through_us_is_an_input_of_the_next_build() {
    with_nix(|t| {
        let nix = &t.nix;
        let paths = t.build("user", &[]).paths();
        let text = std::fs::read_to_string(nix.host_path(&paths[0])).unwrap();
        let (first, base) = text.split_once('\n').unwrap();
        assert_eq!(first, "from-base", "{text}");
        assert!(base.trim_end().ends_with("-base"), "{text}");
        let records = nix.records();
        assert_eq!(
            records.len(),
            2,
            "base and user went through us: {records:?}"
        );
        assert!(records[1]["outputs"]["out"]
            .as_str()
            .unwrap()
            .ends_with("-user"));
        // user's inputs: busybox (imported for base, reused) and base's output, new to
        // the input cache but already on the server, which harvested it: hashed, not sent.
        assert_eq!(records[1]["inputs_reused"], 1, "{records:?}");
        assert_eq!(records[1]["inputs_present"], 1, "{records:?}");
        assert_eq!(records[1]["inputs_imported"], 0, "{records:?}");
        nix.assert_verified(&paths[0]);
        let info = nix.path_info(&paths[0]);
        let refs = info["references"].as_array().unwrap();
        assert!(
            refs.iter().any(|r| r.as_str() == Some(base.trim_end())),
            "Nix found the reference to base in our output: {info}"
        );
    });
}

#[test]
fn pass_as_file_and_structured_attrs_reach_the_build() {
    with_nix(|t| {
        let nix = &t.nix;
        let paths = t.build("passfile", &[]).paths();
        assert_eq!(
            std::fs::read_to_string(nix.host_path(&paths[0])).unwrap(),
            format!("payload-{}", nix.salt)
        );
        let paths = t.build("structured", &[]).paths();
        let attrs: serde_json::Value =
            serde_json::from_slice(&std::fs::read(nix.host_path(&paths[0])).unwrap()).unwrap();
        assert_eq!(attrs["items"], serde_json::json!(["a", "b"]), "{attrs}");
        assert_eq!(attrs["salt"], nix.salt.as_str());
        assert_eq!(attrs["outputs"]["out"], paths[0].as_str());
        nix.assert_verified(&paths[0]);
    });
}

#[test]
fn a_failing_builder_fails_the_nix_build_with_our_log() {
    with_nix(|t| {
        let err = t.build_failing("failing", &[]);
        assert!(
            err.contains(&format!("about-to-fail-{}", t.nix.salt)),
            "the build's log is shown:\n{err}"
        );
        assert!(err.contains("builder failed with exit code"), "{err}");
        assert!(err.contains("exited with code 3"), "{err}");
    });
}

/// A build.json we refuse (here: a builder outside the store, which a VM cannot have):
/// Nix shows our message and fails the build.
#[test]
fn a_refused_build_is_reported_by_nix_with_our_message() {
    with_nix(|t| {
        let err = t.build_failing("outside", &[]);
        assert!(
            err.contains("tvix-build-vm: build.json builder: \"/bin/busybox\" is not inside"),
            "{err}"
        );
    });
}

/// `requiredSystemFeatures = ["kvm"]` asks for /dev/kvm, which this server (no
/// --allow-kvm) does not grant: refused before a VM starts, with the reason in Nix's error.
#[test]
fn a_kvm_feature_is_refused_by_a_server_that_does_not_allow_it() {
    with_nix(|t| {
        let err = t.build_failing("kvm", &[]);
        assert!(err.contains("/dev/kvm"), "{err}");
        assert!(err.contains("builder failed with exit code 3"), "{err}");
    });
}

/// The second build with the same inputs reads nothing of them again.
#[test]
fn a_second_build_with_the_same_inputs_imports_nothing() {
    with_nix(|t| {
        let nix = &t.nix;
        t.build("whereami", &[]).paths();
        t.build("again", &[]).paths();
        let records = nix.records();
        assert_eq!(records.len(), 2, "{records:?}");
        assert_eq!(records[0]["inputs_imported"], 1, "{records:?}");
        assert!(
            records[0]["input_bytes_read"].as_u64().unwrap() > 1_000_000,
            "busybox was read once: {records:?}"
        );
        assert_eq!(records[1]["inputs_imported"], 0, "{records:?}");
        assert_eq!(records[1]["inputs_reused"], 1, "{records:?}");
        assert_eq!(records[1]["input_bytes_read"], 0, "{records:?}");

        // Another client of the same server (its input cache gone, as on another machine
        // or in another state dir): busybox is hashed, found on the server, not sent.
        std::fs::remove_dir_all(nix.dir.path().join("state/remote-inputs")).unwrap();
        t.build("passfile", &[]).paths();
        let records = nix.records();
        assert_eq!(records[2]["inputs_imported"], 0, "{records:?}");
        assert_eq!(records[2]["inputs_present"], 1, "{records:?}");
    });
}

/// Nix's own builder and ours give the same NAR for a deterministic derivation: built
/// natively first, then `--rebuild` through us, which Nix itself compares with what it has.
#[test]
fn the_same_derivation_built_by_nix_and_by_us_has_the_same_nar_hash() {
    with_nix(|t| {
        let nix = &t.nix;
        let native = nix.build_natively(&t.file, "deterministic").paths();
        let before = nix.path_info(&native[0]);
        assert!(nix.records().is_empty(), "Nix built it itself");
        let ours = t.build("deterministic", &["--rebuild"]);
        assert_eq!(ours.paths(), native, "{}", ours.stderr());
        assert_eq!(nix.records().len(), 1, "the rebuild went through us");
        let after = nix.path_info(&native[0]);
        assert_eq!(before["narHash"], after["narHash"]);
        assert_eq!(before["narSize"], after["narSize"]);
        nix.assert_verified(&native[0]);
    });
}

/// Nix's `timeout` SIGKILLs the program's process group: the stream to the server drops
/// and the server kills the VM.
#[test]
fn nix_timeout_ends_the_vm() {
    with_nix(|t| {
        let started = Instant::now();
        let err = t.build_failing("slow", &["--option", "timeout", "5"]);
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = support::leftovers(t.env.runtime.path());
            let builds: Vec<_> = left.iter().filter(|l| !l.contains("/svc-")).collect();
            if builds.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the VM outlived Nix's timeout: {builds:?}\n{}",
                t.serve.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    });
}

/// A build.json as Nix writes it, for a host directory standing in for the real store.
fn build_json(real_store: &Path, tmp: &Path, out: &str, script: &str) -> serde_json::Value {
    let bb = "/nix/store/9ayqmbj1zgsyllkbsbml5y79hwmmykby-bb";
    let out_path = format!("/nix/store/{out}");
    serde_json::json!({
        "version": 1,
        "builder": format!("{bb}/bin/busybox"),
        "args": ["sh", "-c", script],
        "env": {
            "HOME": "/homeless-shelter", "NIX_BUILD_TOP": "/build", "NIX_STORE": "/nix/store",
            "PATH": "/path-not-set", "PWD": "/build", "TMPDIR": "/build", "out": out_path,
        },
        "topTmpDir": tmp.parent().unwrap(),
        "tmpDir": tmp,
        "tmpDirInSandbox": "/build",
        "storeDir": "/nix/store",
        "realStoreDir": real_store,
        "system": "x86_64-linux",
        "inputPaths": [bb],
        "outputs": { "out": out_path },
    })
}

/// Without --builder-addr: concurrent first builds (Nix's max-jobs) start one local server
/// in the state dir and share it; the handshake comes before the build's log; outputs
/// land in the real store dir.
#[test]
fn default_mode_starts_one_local_server_for_concurrent_builds() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(store.join("9ayqmbj1zgsyllkbsbml5y79hwmmykby-bb/bin")).unwrap();
    std::fs::copy(
        support::BUSYBOX,
        store.join("9ayqmbj1zgsyllkbsbml5y79hwmmykby-bb/bin/busybox"),
    )
    .unwrap();
    let state = dir.path().join("state");
    let outs = [
        "sajb5gajx7nzpfl7k62jyl4ma6xl2ypa-one",
        "1vnx5sy5yvavlzh28z4s8p0kndrq8p49-two",
        "wp9hs73asc2d1lnp2gbnfj75gxrvpzpv-three",
    ];
    // A descriptor Nix would leave open (no close-on-exec): the builders must close it
    // before they start the server, or the server would hold it for its whole life.
    let (leak_r, leak_w) = nix::unistd::pipe().unwrap();
    let children: Vec<_> = outs
        .iter()
        .map(|out| {
            let top = dir.path().join(format!("top-{out}"));
            let tmp = top.join("build");
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::write(tmp.join("note"), out.as_bytes()).unwrap();
            let json = build_json(&store, &tmp, out, "echo log-line; cat /build/note > $out");
            let path = top.join("build.json");
            std::fs::write(&path, json.to_string()).unwrap();
            env.command()
                .arg("nix-builder")
                .arg("--state-dir")
                .arg(&state)
                .arg(&path)
                .current_dir(&tmp)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    drop(leak_w);
    let results: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    // The server is still running: the pipe reads EOF only if it closed its copy.
    nix::fcntl::fcntl(
        &leak_r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let held = nix::unistd::read(&leak_r, &mut [0u8; 1]);
    // The server outlives the builders (its own session): stop it before asserting.
    let local = tvix_build_vm::nix::local_serve::LocalServe::new(&state);
    let server = {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let s = std::os::unix::net::UnixStream::connect(local.socket()).unwrap();
        nix::unistd::Pid::from_raw(getsockopt(&s, PeerCredentials).unwrap().pid())
    };
    let _ = nix::sys::signal::kill(server, nix::sys::signal::Signal::SIGTERM);
    for (out, r) in outs.iter().zip(&results) {
        let stdout = String::from_utf8_lossy(&r.stdout);
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(
            r.status.success(),
            "{out}: {stderr}\n{}",
            std::fs::read_to_string(local.log_path()).unwrap_or_default()
        );
        assert!(
            stderr.starts_with('\x02') || stderr.contains("\x02\n"),
            "{stderr:?}"
        );
        assert!(stdout.contains("log-line\n"), "{stdout:?} {stderr:?}");
        assert_eq!(std::fs::read_to_string(store.join(out)).unwrap(), *out);
    }
    let log = std::fs::read_to_string(local.log_path()).unwrap();
    assert_eq!(log.matches("serving listen=").count(), 1, "{log}");
    assert_eq!(
        held,
        Ok(0),
        "the local server holds a descriptor its starter inherited"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::process_exists(server.as_raw() as u32) {
        assert!(Instant::now() < deadline, "the local server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}
