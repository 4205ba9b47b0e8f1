//! Load with real VMs under TCG: `serve` offered twice its admission limit, wave after wave,
//! with bad requests mixed in; and concurrent `build` processes sharing one runtime
//! directory (their start-up sweeps must not touch each other's builds). Nothing may hang,
//! every good build either succeeds with the right output or is refused with
//! RESOURCE_EXHAUSTED, and the server's memory and fds return to their baseline.
//!
//! `TVIX_BUILD_VM_HOSTILE_LONG=1` repeats the waves for four minutes instead of three waves.

mod support;

use std::time::{Duration, Instant};
use support::cli::{Env, Run};
use support::serve::{env_var, upload_busybox, Serve, SH};
use support::BUSYBOX;
use tonic::transport::Channel;
use tonic::Code;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;
use tvix_build_vm::proto::{build as pb, castore as cpb};

/// `--max-vms 1 --max-queue 1`: two requests admitted at once.
const ADMITTED: usize = 2;
/// No single request may take longer than this, however loaded the machine.
const REQUEST_LIMIT: Duration = Duration::from_secs(120);

fn long_runs() -> bool {
    std::env::var_os("TVIX_BUILD_VM_HOSTILE_LONG").is_some_and(|v| v == "1")
}

/// A build that writes `<tag>\n` to /nix/store/<tag>.
fn good_request(busybox: &cpb::Node, tag: &str) -> pb::BuildRequest {
    pb::BuildRequest {
        command_args: vec![
            SH.into(),
            "sh".into(),
            "-c".into(),
            format!("echo {tag} > /nix/store/{tag}"),
        ],
        outputs: vec![tag.into()],
        environment_vars: vec![env_var("HOME", "/homeless-shelter")],
        inputs: vec![busybox.clone()],
        constraints: Some(pb::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
    }
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Built,
    Refused,
}

async fn good(channel: Channel, busybox: cpb::Node, tag: String) -> Outcome {
    let mut client = BuildServiceClient::new(channel);
    let call = client.do_build(good_request(&busybox, &tag));
    let reply = tokio::time::timeout(REQUEST_LIMIT, call)
        .await
        .unwrap_or_else(|_| panic!("request {tag} hung for {REQUEST_LIMIT:?}"));
    match reply {
        Ok(build) => {
            let build = build.into_inner();
            let Some(cpb::node::Node::File(f)) =
                build.outputs.first().and_then(|n| n.node.as_ref())
            else {
                panic!("{tag}: no file output: {build:?}")
            };
            let want = blake3::hash(format!("{tag}\n").as_bytes());
            assert_eq!(&f.digest[..], want.as_bytes(), "{tag}: wrong output");
            Outcome::Built
        }
        Err(status) if status.code() == Code::ResourceExhausted => Outcome::Refused,
        Err(status) => panic!("{tag}: {:?}: {}", status.code(), status.message()),
    }
}

/// Bad requests: refused at once with INVALID_ARGUMENT, before they take an admission slot.
async fn bad(channel: Channel, busybox: cpb::Node, i: usize) {
    let mut req = good_request(&busybox, &format!("bad-{i}"));
    match i % 3 {
        0 => req.outputs = vec!["b".into(), "a".into()],
        1 => req.command_args.clear(),
        _ => req.outputs = vec!["../escape".into()],
    }
    let mut client = BuildServiceClient::new(channel);
    let call = client.do_build(req);
    let started = Instant::now();
    let status = tokio::time::timeout(REQUEST_LIMIT, call)
        .await
        .expect("a bad request hung")
        .expect_err("a bad request was built");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a bad request waited {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn twice_the_admission_limit_in_waves_is_built_or_refused_and_serve_returns_to_baseline() {
    let env = Env::new();
    let server = Serve::start(&env, &["--max-vms", "1", "--max-queue", "1"]);
    let channel = server.channel();
    let busybox = upload_busybox(channel.clone()).await;

    // Warm up (first build: initrd, thread pools, castore caches), then take the baseline.
    assert!(matches!(
        good(channel.clone(), busybox.clone(), "warm".into()).await,
        Outcome::Built
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, fds0) = server.usage();

    // Under nextest's five-minute limit per test.
    let until = Instant::now() + Duration::from_secs(240);
    let waves = if long_runs() { usize::MAX } else { 3 };
    let (mut built, mut refused) = (0, 0);
    for wave in 0..waves {
        if long_runs() && Instant::now() >= until {
            break;
        }
        let mut calls = Vec::new();
        for i in 0..2 * ADMITTED {
            calls.push(tokio::spawn(good(
                channel.clone(),
                busybox.clone(),
                format!("w{wave}-r{i}"),
            )));
        }
        let bads: Vec<_> = (0..3)
            .map(|i| tokio::spawn(bad(channel.clone(), busybox.clone(), i)))
            .collect();
        let mut wave_built = 0;
        for call in calls {
            match call.await.expect("request task") {
                Outcome::Built => wave_built += 1,
                Outcome::Refused => refused += 1,
            }
        }
        for b in bads {
            b.await.expect("bad request task");
        }
        // What was admitted got built: the bad requests took no slot.
        assert!(
            wave_built >= ADMITTED,
            "wave {wave}: only {wave_built} built:\n{}",
            server.log()
        );
        built += wave_built;
    }
    eprintln!("load: {built} built, {refused} refused");

    // Back to baseline once idle: no runtime dir but the service's, memory and fds flat.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, fds1) = server.usage();
    eprintln!("serve: RSS {rss0} -> {rss1} KiB, fds {fds0} -> {fds1}");
    assert!(fds1 <= fds0 + 2, "fds {fds0} -> {fds1}:\n{}", server.log());
    assert!(
        rss1 <= rss0 + 16 * 1024,
        "RSS {rss0} -> {rss1} KiB:\n{}",
        server.log()
    );
    let entries: Vec<_> = std::fs::read_dir(env.runtime.path())
        .expect("runtime dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("svc-"))
        .collect();
    assert!(entries.is_empty(), "runtime dirs left: {entries:?}");
    if let Some(path) = std::env::var_os("TVIX_BUILD_VM_HOSTILE_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                f,
                "serve load\t{built} built, {refused} refused\tserve RSS {} -> {} MiB, fds {fds0} -> {fds1}",
                rss0 / 1024,
                rss1 / 1024
            );
        }
    }
    drop(server);
    env.assert_clean();
}

/// `build -q --store <store> <args>` with `env`'s runtime dir. Each concurrent `build` needs
/// its own embedded store: the directory database (redb) admits one process at a time.
fn build_with_store(env: &Env, store: &std::path::Path, args: &[&str]) -> Run {
    let mut c = env.build_command(store, &["-q"]);
    c.args(args);
    Run::of(c.output().expect("running tvix-build-vm build"))
}

#[test]
fn concurrent_build_processes_share_a_runtime_dir_without_disturbing_each_other() {
    // Four good builds, one hostile guest and one invalid request at once, twice: each
    // process sweeps the shared runtime dir at start-up while the others' builds run.
    let env = Env::new();
    let hostile = support::hostile_agent();
    let stores: Vec<tempfile::TempDir> = (0..6)
        .map(|_| tempfile::tempdir().expect("store"))
        .collect();
    for wave in 0..2 {
        std::thread::scope(|s| {
            let goods: Vec<_> = (0..4)
                .map(|i| {
                    let (env, store) = (&env, stores[i].path());
                    s.spawn(move || {
                        let out = format!("w{wave}-{i}");
                        let script = format!("echo {out} > /nix/store/{out}");
                        build_with_store(
                            env,
                            store,
                            &[
                                "--input", BUSYBOX, "--output", &out, "--", SH, "sh", "-c", &script,
                            ],
                        )
                    })
                })
                .collect();
            let evil = s.spawn(|| {
                build_with_store(
                    &env,
                    stores[4].path(),
                    &[
                        "--agent",
                        hostile.to_str().expect("utf-8 path"),
                        "--output",
                        "out",
                        "--",
                        "garbage",
                    ],
                )
            });
            let invalid = s.spawn(|| {
                build_with_store(&env, stores[5].path(), &["--output", "../x", "--", SH])
            });
            for (i, g) in goods.into_iter().enumerate() {
                let run = g.join().expect("build thread");
                let build = run.build_json();
                let want = blake3::hash(format!("w{wave}-{i}\n").as_bytes());
                let digest = build["outputs"][0]["file"]["digest"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{build}"));
                assert_eq!(
                    data_encoding::BASE64
                        .decode(digest.as_bytes())
                        .expect("base64"),
                    want.as_bytes(),
                    "{build}"
                );
            }
            evil.join()
                .expect("hostile thread")
                .assert_failed(5, "frame does not decode as a protobuf message");
            invalid
                .join()
                .expect("invalid thread")
                .assert_failed(2, "outputs[0]");
        });
    }
    env.assert_clean();
}
