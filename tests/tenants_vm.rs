//! Tenants on a real `serve` with real VMs: bearer tokens from a tokens file, fair admission
//! between tenants (one tenant's flood does not starve another's single build, and its
//! excess is refused naming its limit), UNAUTHENTICATED for unknown or missing proof, a
//! tokens file reread on SIGHUP without dropping a running build, and build outputs charged
//! to the tenant's upload quota.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::time::{Duration, Instant};
use support::cli::Env;
use support::serve::*;
use support::tokens::{with_token, write_tokens};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;
use tvix_build_vm::proto::build_vm::build_vm_service_client::BuildVmServiceClient;
use tvix_build_vm::proto::castore::blob_service_client::BlobServiceClient;
use tvix_build_vm::proto::{build as pb, build_vm as pbvm, castore as cpb};

/// Sends `req` as `token` on the streaming RPC; when it gets its VM, the time (since `t0`).
/// Returns the start time and whether the build succeeded.
async fn timed_build(
    channel: Channel,
    req: pb::BuildRequest,
    token: &str,
    t0: Instant,
) -> (Option<Duration>, Result<pb::Build, tonic::Status>) {
    let mut stream = match BuildVmServiceClient::new(channel)
        .build(with_token(req, token))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return (None, Err(e)),
    };
    let mut started = None;
    loop {
        match stream.message().await {
            Ok(Some(e)) => match e.event.unwrap() {
                pbvm::build_event::Event::Started(_) => started = Some(t0.elapsed()),
                pbvm::build_event::Event::Log(_) => {}
                pbvm::build_event::Event::Build(b) => return (started, Ok(b)),
            },
            Ok(None) => panic!("the stream ended without a build"),
            Err(e) => return (started, Err(e)),
        }
    }
}

/// Waits until `cond` holds for the server's log.
async fn until_log(server: &Serve, what: &str, cond: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond(&server.log()) {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_tenant_does_not_starve_another_and_its_excess_is_refused() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[("alice", "tok-alice"), ("bob", "tok-bob")]);
    let config = dir.path().join("serve.toml");
    // One VM for the host: every build of the flood but the first waits, so the order in
    // which the queue hands out the slot is what is measured.
    std::fs::write(
        &config,
        "max-vms = 1\nmax-queue = 10\n[tenants.alice]\nmax-vms = 1\nmax-queue = 2\n[tenants.bob]\nweight = 1\n",
    )
    .unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Serve::start(
        &env,
        &[
            "--config",
            config.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--metrics-listen",
            &metrics,
        ],
    );
    let channel = server.channel();
    // The upload proves nothing but the unix uid: tenant uid-<n>, allowed.
    let busybox = upload_busybox(channel.clone()).await;
    let req = |script: &str| seed_request(busybox.clone(), script, &["out"]);
    let t0 = Instant::now();

    // alice floods with 4x her VM limit: one runs, two wait (her max-queue), one is refused.
    let first = tokio::spawn(timed_build(
        channel.clone(),
        req("sleep 5; echo a0 > /nix/store/out"),
        "tok-alice",
        t0,
    ));
    until_log(&server, "alice's first build starting", |l| {
        count(l, "build started") == 1
    })
    .await;
    let mut flood = Vec::new();
    for i in 1..=2 {
        flood.push(tokio::spawn(timed_build(
            channel.clone(),
            req(&format!("echo a{i} > /nix/store/out")),
            "tok-alice",
            t0,
        )));
    }
    // Both queued before the one too many is sent.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = reqwest_free_get(&metrics).await;
        if m.contains("tvix_build_vm_queue_depth 2\n")
            && m.contains("tvix_build_vm_tenant_queue_depth{tenant=\"alice\"} 2\n")
            && m.contains("tvix_build_vm_tenant_vms_running{tenant=\"alice\"} 1\n")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the flood did not queue:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = BuildServiceClient::new(channel.clone())
        .do_build(with_token(req("echo a3 > /nix/store/out"), "tok-alice"))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::ResourceExhausted,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("tenants.alice.max-queue")
            && refused.message().contains("alice"),
        "the refusal names the limit and the tenant: {}",
        refused.message()
    );

    // bob sends one build, behind alice's two in the queue.
    let bob = tokio::spawn(timed_build(
        channel.clone(),
        req("echo b > /nix/store/out"),
        "tok-bob",
        t0,
    ));
    // The measurement only means something if bob queued behind alice's two while her
    // first build still held the one VM.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = reqwest_free_get(&metrics).await;
        if m.contains("tvix_build_vm_tenant_queue_depth{tenant=\"bob\"} 1\n") {
            assert!(
                m.contains("tvix_build_vm_tenant_queue_depth{tenant=\"alice\"} 2\n")
                    && m.contains("tvix_build_vm_tenant_vms_running{tenant=\"alice\"} 1\n"),
                "alice's first build ended before bob queued (too slow a host?):\n{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "bob's build did not queue:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (_, first) = first.await.unwrap();
    first.unwrap();
    let (bob_started, bob_build) = bob.await.unwrap();
    assert_eq!(
        bob_build.unwrap().tenant,
        "bob",
        "the Build names its tenant"
    );
    let bob_started = bob_started.unwrap();
    for (i, a) in flood.into_iter().enumerate() {
        let (started, build) = a.await.unwrap();
        let build = build.unwrap_or_else(|e| panic!("alice's build {}: {e}", i + 1));
        assert_eq!(build.tenant, "alice");
        let started = started.unwrap();
        assert!(
            bob_started < started,
            "bob's build started at {bob_started:?}, after alice's queued build {} ({started:?})",
            i + 1
        );
    }

    let m = reqwest_free_get(&metrics).await;
    for line in [
        "tvix_build_vm_tenant_builds_total{tenant=\"alice\",result=\"success\"} 3\n",
        "tvix_build_vm_tenant_builds_total{tenant=\"alice\",result=\"refused\"} 1\n",
        "tvix_build_vm_tenant_builds_total{tenant=\"bob\",result=\"success\"} 1\n",
    ] {
        assert!(m.contains(line), "{line}in:\n{m}");
    }
    let log = server.log();
    assert!(
        log.contains("tenant=bob"),
        "the build span names the tenant:\n{log}"
    );
    drop(server);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_tokens_are_unauthenticated_and_sighup_rereads_the_file_without_dropping_a_build() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[("alice", "tok-alice")]);
    let server = Serve::start(
        &env,
        &["--tokens", tokens.to_str().unwrap(), "--require-auth"],
    );
    let channel = server.channel();
    let busybox = upload_busybox(channel.clone()).await;
    let req = |script: &str| seed_request(busybox.clone(), script, &["out"]);

    let unknown = BuildServiceClient::new(channel.clone())
        .do_build(with_token(req("true"), "tok-mallory"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");

    // alice's build runs across the reload that revokes her token.
    let t0 = Instant::now();
    let running = tokio::spawn(timed_build(
        channel.clone(),
        req("sleep 4; echo done > /nix/store/out"),
        "tok-alice",
        t0,
    ));
    until_log(&server, "alice's build starting", |l| {
        count(l, "build started") == 1
    })
    .await;
    write_tokens(&tokens, &[("carol", "tok-carol")]);
    server.signal(nix::sys::signal::Signal::SIGHUP);
    until_log(&server, "the reload", |l| {
        l.contains("reloaded the tokens file")
    })
    .await;
    let revoked = BuildServiceClient::new(channel.clone())
        .do_build(with_token(req("true"), "tok-alice"))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated, "{revoked:?}");

    // A file that does not parse keeps the tokens in force.
    std::fs::write(&tokens, "carol not-a-hash\n").unwrap();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    until_log(&server, "the failed reload", |l| {
        l.contains("tokens file was not reloaded") && l.contains("line 1")
    })
    .await;
    let carol = BuildServiceClient::new(channel.clone())
        .do_build(with_token(req("echo c > /nix/store/out"), "tok-carol"))
        .await
        .unwrap();
    assert_eq!(carol.into_inner().outputs.len(), 1);

    let (started, build) = running.await.unwrap();
    assert!(started.is_some());
    let build = build.expect("the running build survives the reload");
    assert_eq!(build.outputs.len(), 1);
    drop(server);
    env.assert_clean();
}

/// On TCP a caller without a token proves nothing: refused under --require-auth, on the
/// castore as on builds; health stays open for load balancers.
#[tokio::test(flavor = "multi_thread")]
async fn require_auth_refuses_callers_without_proof_on_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[("alice", "tok-alice")]);
    let store = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Serve::castore(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--require-auth",
        ],
        Listen::Tcp(port),
    );
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        health(channel.clone(), "tvix.castore.v1.BlobService").await,
        1
    );
    let stat = |token: Option<&str>| {
        let mut blobs = BlobServiceClient::new(channel.clone());
        let msg = cpb::StatBlobRequest {
            digest: vec![0u8; 32].into(),
            ..Default::default()
        };
        let r = match token {
            Some(t) => with_token(msg, t),
            None => tonic::Request::new(msg),
        };
        async move { blobs.stat(r).await.map(|_| ()) }
    };
    let none = stat(None).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    assert!(
        none.message().contains("requires authentication"),
        "{none:?}"
    );
    let unknown = stat(Some("tok-mallory")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated, "{unknown:?}");
    // A known token gets through to the service (the blob is just not there).
    let known = stat(Some("tok-alice")).await.unwrap_err();
    assert_eq!(known.code(), Code::NotFound, "{known:?}");
}

/// Under mutual TLS the certificate's common name is the tenant: a usable name gets
/// through, one that is not a tenant name is UNAUTHENTICATED (never merged into another).
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_names_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::tls::TestCa::new();
    let mut flags = ca.server_flags(dir.path());
    let store = tempfile::tempdir().unwrap();
    flags.extend([
        "--store".to_owned(),
        store.path().to_str().unwrap().to_owned(),
        "--require-auth".to_owned(),
    ]);
    let port = free_port();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Serve::castore(&flags, Listen::Tcp(port));
    let stat = |common_name: &str| {
        let tls = ca.client(common_name);
        async move {
            let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            BlobServiceClient::new(channel)
                .stat(cpb::StatBlobRequest {
                    digest: vec![0u8; 32].into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .unwrap_err()
        }
    };
    let alice = stat("alice").await;
    assert_eq!(alice.code(), Code::NotFound, "{alice:?}");
    let bad = stat("alice smith").await;
    assert_eq!(bad.code(), Code::Unauthenticated, "{bad:?}");
    assert!(bad.message().contains("common name"), "{bad:?}");
    assert!(
        server.log().contains("refused an unauthenticated call"),
        "{}",
        server.log()
    );
}

/// A tenant's build outputs are charged to its upload quota after the build: the build is
/// never refused for it (it already ran), but it takes the tenant over its limit and its
/// next castore upload is refused naming the limit, while another tenant uploads fine.
#[tokio::test(flavor = "multi_thread")]
async fn build_outputs_count_against_the_upload_quota() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[("alice", "tok-alice"), ("bob", "tok-bob")]);
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, "[tenants.alice]\nupload-bytes-per-hour = \"1M\"\n").unwrap();
    let server = Serve::start(
        &env,
        &[
            "--tokens",
            tokens.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let channel = server.channel();
    // Uploaded as the unix uid's tenant, under the defaults: no limit.
    let busybox = upload_busybox(channel.clone()).await;
    const OUT: u64 = 3 << 20;
    let req = seed_request(
        busybox,
        &format!("head -c {OUT} /dev/zero > /nix/store/out"),
        &["out"],
    );
    let build = BuildServiceClient::new(channel.clone())
        .do_build(with_token(req, "tok-alice"))
        .await
        .expect("an output over the quota is charged, not refused")
        .into_inner();
    assert_eq!(build.outputs.len(), 1);

    let put = |token: &'static str| {
        let chunk = cpb::BlobChunk {
            data: bytes::Bytes::from_static(b"one more byte"),
        };
        let mut blobs = BlobServiceClient::new(channel.clone());
        async move {
            blobs
                .put(with_token(futures::stream::iter(vec![chunk]), token))
                .await
        }
    };
    let e = put("tok-alice").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message()
            .contains("tenants.alice.upload-bytes-per-hour = 1048576"),
        "{e:?}"
    );
    let charged: u64 = e
        .message()
        .split("): ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no charged bytes in {e:?}"));
    assert!(charged >= OUT, "{charged} < {OUT}: {e:?}");
    put("tok-bob").await.expect("bob has no quota");
    drop(server);
    env.assert_clean();
}
