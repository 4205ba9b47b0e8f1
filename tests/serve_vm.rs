//! `tvix-build-vm serve` as a real process on a unix socket (or TCP for TLS), with real VMs
//! under TCG: builds through both wire layouts and the streaming RPC, every refusal code,
//! admission, cancellation, shutdown and restart, and mutual TLS.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use bytes::Bytes;
use std::time::{Duration, Instant};
use support::cli::Env;
use support::serve::*;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tvix_build_vm::castore::blob::{read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;
use tvix_build_vm::proto::build_vm::build_vm_service_client::BuildVmServiceClient;
use tvix_build_vm::proto::{build as pb, build_2024 as pb2024, build_vm as pbvm, castore as cpb};

#[tokio::test(flavor = "multi_thread")]
async fn a_seed_build_with_uploaded_inputs_reads_back_through_the_castore() {
    let env = Env::new();
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let server = Serve::start(&env, &["--metrics-listen", &metrics]);
    let channel = server.channel();
    assert_eq!(
        health(channel.clone(), "tvix.build.v1.BuildService").await,
        1,
        "SERVING"
    );
    assert_eq!(
        health(channel.clone(), "tvix.build.vm.v1.BuildVmService").await,
        1
    );

    let busybox = upload_busybox(channel.clone()).await;
    let req = seed_request(
        busybox,
        "echo building; echo hello > /nix/store/out",
        &["out"],
    );
    let build = BuildServiceClient::new(channel.clone())
        .do_build(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(build.build_request.as_ref(), Some(&req));
    assert_eq!(build.outputs.len(), 1);
    let out = file_node(&build.outputs[0]);
    assert_eq!(out.name, "out");
    let blobs = GrpcBlobService::new(channel.clone());
    let digest = B3Digest::try_from(&out.digest[..]).unwrap();
    assert_eq!(
        read_to_vec(&blobs, &digest).await.unwrap().unwrap(),
        b"hello\n"
    );

    let exit = build.exit_status.unwrap();
    assert_eq!(exit.kind, Some(pb::build::exit_status::Kind::Code(0)));
    let t = build.timings.unwrap();
    assert!(
        t.boot_us > 0 && t.exec_us > 0 && t.total_us >= t.boot_us + t.exec_us,
        "{t:?}"
    );
    let log = build.log.unwrap();
    let log_digest = B3Digest::try_from(&log.digest[..]).unwrap();
    assert_eq!(
        read_to_vec(&blobs, &log_digest).await.unwrap().unwrap(),
        b"building\n"
    );

    // The streaming RPC: live log, then the same kind of Build.
    let req = seed_request(
        upload_busybox(channel.clone()).await,
        "echo one; echo two >&2; echo x > /nix/store/out",
        &["out"],
    );
    let mut stream = BuildVmServiceClient::new(channel.clone())
        .build(req)
        .await
        .unwrap()
        .into_inner();
    let (mut started, mut log, mut last) = (false, Vec::new(), None);
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            pbvm::build_event::Event::Started(s) => started = !s.build_id.is_empty(),
            pbvm::build_event::Event::Log(l) => log.extend_from_slice(&l.data),
            pbvm::build_event::Event::Build(b) => last = Some(b),
        }
    }
    assert!(started);
    let log = String::from_utf8(log).unwrap();
    assert!(log.contains("one\n") && log.contains("two\n"), "{log:?}");
    assert_eq!(file_node(&last.unwrap().outputs[0]).name, "out");

    let text = reqwest_free_get(&metrics).await;
    assert!(
        text.contains("tvix_build_vm_builds_total{result=\"success\"} 2\n"),
        "{text}"
    );
    drop(server);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_have_their_codes_and_name_the_field() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    let channel = server.channel();
    let busybox = upload_busybox(channel.clone()).await;
    let mut client = BuildServiceClient::new(channel.clone());
    let ok = seed_request(busybox, "true", &["out"]);

    let mut cases: Vec<(pb::BuildRequest, Code, &str)> = Vec::new();
    let mut r = ok.clone();
    r.command_args.clear();
    cases.push((r, Code::InvalidArgument, "command_args"));
    let mut r = ok.clone();
    r.outputs = vec!["b".into(), "a".into()];
    cases.push((r, Code::InvalidArgument, "outputs[1]"));
    let mut r = ok.clone();
    r.outputs = vec!["a/b".into()];
    cases.push((r, Code::InvalidArgument, "outputs[0]"));
    let mut r = ok.clone();
    r.environment_vars = vec![env_var("B", "1"), env_var("A", "2")];
    cases.push((r, Code::InvalidArgument, "environment_vars[1]"));
    let mut r = ok.clone();
    r.environment_vars = vec![env_var("A=B", "1")];
    cases.push((r, Code::InvalidArgument, "environment_vars[0]"));
    let mut r = ok.clone();
    r.inputs.push(r.inputs[0].clone());
    cases.push((r, Code::InvalidArgument, "inputs[1]"));
    let mut r = ok.clone();
    r.inputs[0] = cpb::Node { node: None };
    cases.push((r, Code::InvalidArgument, "inputs[0]"));
    let mut r = ok.clone();
    r.command_args[0] = "a\0b".into();
    cases.push((r, Code::InvalidArgument, "command_args[0]"));
    let mut r = ok.clone();
    r.constraints.as_mut().unwrap().available_ro_paths = vec!["relative".into()];
    cases.push((
        r,
        Code::InvalidArgument,
        "constraints.available_ro_paths[0]",
    ));
    let mut r = ok.clone();
    r.outputs = vec!["busybox".into()];
    cases.push((r, Code::InvalidArgument, "outputs[0]"));
    // A request that names no system is invalid, not unsatisfiable.
    let mut r = ok.clone();
    r.constraints.as_mut().unwrap().system.clear();
    cases.push((r, Code::InvalidArgument, "constraints.system"));
    let mut r = ok.clone();
    r.constraints = None;
    cases.push((r, Code::InvalidArgument, "constraints.system"));
    // Valid, but not for this host.
    let mut r = ok.clone();
    r.constraints.as_mut().unwrap().system = "aarch64-linux".into();
    cases.push((r, Code::FailedPrecondition, "constraints.system"));
    let mut r = ok.clone();
    r.constraints.as_mut().unwrap().available_ro_paths = vec!["/dev/kvm".into()];
    cases.push((r, Code::FailedPrecondition, "/dev/kvm"));
    let mut r = ok.clone();
    r.constraints.as_mut().unwrap().available_ro_paths = vec!["/srv/not-allowed".into()];
    cases.push((
        r,
        Code::FailedPrecondition,
        "\"/srv/not-allowed\" is not allowed",
    ));
    let mut r = ok.clone();
    r.constraints.as_mut().unwrap().min_memory = 1 << 50;
    cases.push((r, Code::FailedPrecondition, "constraints.min_memory"));
    let mut r = ok.clone();
    if let Some(cpb::node::Node::File(f)) = &mut r.inputs[0].node {
        f.digest = Bytes::copy_from_slice(B3Digest::of(b"absent").as_bytes());
    }
    cases.push((r, Code::FailedPrecondition, "busybox"));

    // An input that declares another size than its blob's is refused before a VM boots,
    // naming the input and both sizes (the embedded store knows the real one).
    let real = file_node(&ok.inputs[0]).size;
    for declared in [10, 1_000_000_000] {
        let mut r = ok.clone();
        if let Some(cpb::node::Node::File(f)) = &mut r.inputs[0].node {
            f.size = declared;
        }
        let status = client.do_build(r).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{}",
            status.message()
        );
        let want = format!("input busybox declares {declared} bytes, but its blob");
        assert!(
            status.message().contains(&want) && status.message().contains(&format!("has {real}")),
            "{}",
            status.message()
        );
    }

    for (req, code, needle) in cases {
        let status = client.do_build(req).await.unwrap_err();
        assert_eq!(status.code(), code, "{needle}: {}", status.message());
        assert!(
            status.message().contains(needle),
            "{needle}: {}",
            status.message()
        );
    }
    // A failed build: ABORTED with the exit code and the log's end.
    let failing = seed_request(
        upload_busybox(channel.clone()).await,
        "echo last words >&2; exit 42",
        &["out"],
    );
    assert_aborted_with_last_words(&client.do_build(failing).await.unwrap_err());
    drop(server);
    env.assert_clean();
}

/// Starts a long build through the streaming RPC and waits until it has its VM.
async fn start_long_build(channel: Channel) -> tonic::Streaming<pbvm::BuildEvent> {
    let req = seed_request(
        upload_busybox(channel.clone()).await,
        "echo up; sleep 60",
        &[],
    );
    let mut stream = BuildVmServiceClient::new(channel)
        .build(req)
        .await
        .unwrap()
        .into_inner();
    // Wait for the log: the VM is up and the command runs.
    loop {
        match stream.message().await.unwrap().unwrap().event.unwrap() {
            pbvm::build_event::Event::Log(_) => return stream,
            pbvm::build_event::Event::Started(_) => {}
            pbvm::build_event::Event::Build(b) => panic!("finished early: {b:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_refuses_and_a_cancelled_client_kills_its_vm() {
    let env = Env::new();
    let server = Serve::start(&env, &["--max-vms", "1", "--max-queue", "0"]);
    let channel = server.channel();
    let running = start_long_build(channel.clone()).await;
    assert_eq!(runtime_entries(&env), 1, "one build's runtime directory");

    let req = seed_request(upload_busybox(channel.clone()).await, "true", &[]);
    let status = BuildServiceClient::new(channel.clone())
        .do_build(req)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("queue is full"),
        "{}",
        status.message()
    );

    // The client goes away: the VM must go within seconds.
    drop(running);
    let deadline = Instant::now() + Duration::from_secs(5);
    while runtime_entries(&env) > 0 {
        assert!(
            Instant::now() < deadline,
            "the cancelled build's VM is still there:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A cancelled unary call likewise.
    let req = seed_request(upload_busybox(channel.clone()).await, "sleep 60", &[]);
    let call = tokio::spawn({
        let channel = channel.clone();
        async move { BuildServiceClient::new(channel).do_build(req).await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while runtime_entries(&env) == 0 {
        assert!(Instant::now() < deadline, "the unary build did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    call.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    while runtime_entries(&env) > 0 {
        assert!(
            Instant::now() < deadline,
            "the aborted unary build's VM is still there:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_cancels_after_the_grace_period_and_a_killed_server_is_swept_on_restart() {
    let env = Env::new();
    let mut server = Serve::start(&env, &["--grace-period", "1s"]);
    let mut running = start_long_build(server.channel()).await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = loop {
        match running.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        server.wait(Duration::from_secs(20)).success(),
        "{}",
        server.log()
    );
    env.assert_clean();

    // SIGKILL leaves the VM behind; the next start sweeps it.
    let mut server = Serve::start(&env, &[]);
    let running = start_long_build(server.channel()).await;
    server.signal(nix::sys::signal::Signal::SIGKILL);
    server.wait(Duration::from_secs(5));
    drop(running);
    let restarted = Serve::start(&env, &[]);
    env.assert_clean_except_service();
    drop(restarted);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_2024_layout_is_served_end_to_end() {
    let env = Env::new();
    let server = Serve::start(&env, &["--protocol", "tvix-2024"]);
    let channel = server.channel();
    let busybox = upload_busybox(channel.clone()).await;
    let x = "mjs27ix6ig2bkbi3s3sm470vrv4lf7ic";
    let out = format!("/nix/store/{x}-hello");
    let env_vars = [("HOME", "/homeless-shelter"), ("out", out.as_str())];
    let req = pb2024::BuildRequest {
        inputs: vec![busybox],
        command_args: vec![
            SH.into(),
            "sh".into(),
            "-c".into(),
            "echo hi $out > $out".into(),
        ],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec![format!("nix/store/{x}-hello")],
        environment_vars: env_vars
            .iter()
            .map(|(k, v)| pb2024::build_request::EnvVar {
                key: (*k).into(),
                value: Bytes::from(v.to_string()),
            })
            .collect(),
        constraints: Some(pb2024::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
        additional_files: vec![],
        refscan_needles: vec![x.into(), "7777777777777777777777777777777z".into()],
    };
    let mut client = pb2024::build_service_client::BuildServiceClient::new(channel.clone());
    let build = client.do_build(req.clone()).await.unwrap().into_inner();
    assert_eq!(build.outputs.len(), 1);
    let node = file_node(&build.outputs[0]);
    assert!(node.name.is_empty(), "anonymous: {:?}", node.name);
    let blobs = GrpcBlobService::new(channel.clone());
    let content = read_to_vec(&blobs, &B3Digest::try_from(&node.digest[..]).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(content, format!("hi {out}\n").as_bytes());
    assert_eq!(build.outputs_needles.len(), 1);
    assert_eq!(build.outputs_needles[0].needles, [0]);

    // provide_bin_sh and network_access are refused unless the operator offers them.
    let mut r = req.clone();
    r.constraints.as_mut().unwrap().provide_bin_sh = true;
    let s = client.do_build(r).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("provide_bin_sh"), "{}", s.message());
    let mut r = req.clone();
    r.constraints.as_mut().unwrap().network_access = true;
    let s = client.do_build(r).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("network_access"), "{}", s.message());
    let mut r = req.clone();
    r.constraints.as_mut().unwrap().system.clear();
    let s = client.do_build(r).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("constraints.system"),
        "{}",
        s.message()
    );
    let mut r = req;
    r.working_dir = "/build".into();
    let s = client.do_build(r).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("working_dir"), "{}", s.message());
    drop(server);
    env.assert_clean();
}

/// `BuildPaths`: the request that names its own paths (2024 shape, with additional files)
/// on the streaming RPC: live log, outputs in request order; a dropped stream kills the VM.
#[tokio::test(flavor = "multi_thread")]
async fn build_paths_streams_the_log_answers_in_request_order_and_a_dropped_stream_kills_the_vm() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    let channel = server.channel();
    let request = |busybox: cpb::Node, script: &str, outputs: &[&str]| pbvm::PathsBuildRequest {
        inputs: vec![busybox],
        command_args: vec![SH.into(), "sh".into(), "-c".into(), script.into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: outputs.iter().map(|o| format!("nix/store/{o}")).collect(),
        environment_vars: vec![pbvm::paths_build_request::EnvVar {
            key: "greeting".into(),
            value: Bytes::from_static(b"hello"),
        }],
        constraints: Some(pbvm::paths_build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
        additional_files: vec![pbvm::paths_build_request::AdditionalFile {
            path: "build/attrs".into(),
            contents: Bytes::from_static(b"from a file"),
        }],
        refscan_needles: vec!["zz-b".into(), "hello".into()],
    };
    let mut client = BuildVmServiceClient::new(channel.clone());
    let req = request(
        upload_busybox(channel.clone()).await,
        "echo one; echo two >&2; cat /build/attrs > /nix/store/zz-b; \
         echo $greeting > /nix/store/aa-a",
        &["aa-a", "zz-b"],
    );
    let stream = client.build_paths(req).await.unwrap().into_inner();
    let (started, log, build) = read_paths_stream(stream).await;
    assert!(started);
    assert!(log.contains("one\n") && log.contains("two\n"), "{log:?}");
    let blobs = GrpcBlobService::new(channel.clone());
    let mut contents = Vec::new();
    for n in &build.outputs {
        let node = file_node(n);
        assert!(node.name.is_empty(), "anonymous: {:?}", node.name);
        let digest = B3Digest::try_from(&node.digest[..]).unwrap();
        contents.push(read_to_vec(&blobs, &digest).await.unwrap().unwrap());
    }
    assert_eq!(contents, [&b"hello\n"[..], b"from a file"]);
    let needles: Vec<_> = build
        .outputs_needles
        .iter()
        .map(|n| n.needles.clone())
        .collect();
    assert_eq!(needles, [vec![1], vec![]]);
    let exit = build.exit_status.unwrap();
    assert_eq!(exit.kind, Some(pb::build::exit_status::Kind::Code(0)));
    assert!(build.log.unwrap().size > 0 && build.timings.unwrap().exec_us > 0);

    // A bad request names the field before anything runs.
    let mut bad = request(upload_busybox(channel.clone()).await, "true", &["x"]);
    bad.working_dir = "/build".into();
    let s = client.build_paths(bad).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("working_dir"), "{}", s.message());

    // The client goes away mid-build: the VM must go within seconds.
    let req = request(
        upload_busybox(channel.clone()).await,
        "echo up; sleep 60",
        &[],
    );
    let running = client.build_paths(req).await.unwrap().into_inner();
    assert_dropped_paths_stream_kills_its_vm(&env, &server, running).await;
    drop(server);
    env.assert_clean();
}

/// Exactly what a real tvix client of 2024 sends for
/// `derivation { builder = "/bin/sh"; args = ["-c" "echo hi > $out"]; ... }`: no inputs at
/// all, `/bin/sh` asked for with provide_bin_sh, and the 12 Nix defaults plus the
/// derivation's variables.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_tvix_2024_request_gets_bin_sh_from_the_operator() {
    let env = Env::new();
    let server = Serve::start(
        &env,
        &["--protocol", "tvix-2024", "--bin-sh", "/bin/busybox"],
    );
    let channel = server.channel();
    let x = "mjs27ix6ig2bkbi3s3sm470vrv4lf7ic";
    let out = format!("/nix/store/{x}-hello");
    let mut vars = vec![
        ("HOME", "/homeless-shelter"),
        ("NIX_BUILD_CORES", "0"),
        ("NIX_BUILD_TOP", "/"),
        ("NIX_LOG_FD", "2"),
        ("NIX_STORE", "/nix/store"),
        ("PATH", "/path-not-set"),
        ("PWD", "/build"),
        ("TEMP", "/build"),
        ("TEMPDIR", "/build"),
        ("TERM", "xterm-256color"),
        ("TMP", "/build"),
        ("TMPDIR", "/build"),
        ("builder", "/bin/sh"),
        ("name", "hello"),
        ("out", out.as_str()),
        ("system", "x86_64-linux"),
    ];
    vars.sort();
    let req = pb2024::BuildRequest {
        inputs: vec![],
        command_args: vec!["/bin/sh".into(), "-c".into(), "echo hi > $out".into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec![format!("nix/store/{x}-hello")],
        environment_vars: vars
            .iter()
            .map(|(k, v)| pb2024::build_request::EnvVar {
                key: (*k).into(),
                value: Bytes::from(v.to_string()),
            })
            .collect(),
        constraints: Some(pb2024::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            provide_bin_sh: true,
            ..Default::default()
        }),
        additional_files: vec![],
        refscan_needles: vec![x.into()],
    };
    let mut client = pb2024::build_service_client::BuildServiceClient::new(channel.clone());
    let build = client.do_build(req).await.unwrap().into_inner();
    assert_eq!(build.outputs.len(), 1);
    let node = file_node(&build.outputs[0]);
    assert!(node.name.is_empty(), "anonymous: {:?}", node.name);
    let blobs = GrpcBlobService::new(channel.clone());
    let content = read_to_vec(&blobs, &B3Digest::try_from(&node.digest[..]).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(content, b"hi\n");
    assert_eq!(build.outputs_needles.len(), 1);
    assert!(build.outputs_needles[0].needles.is_empty());
    drop(server);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let issue = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = issue("localhost");
    let (client_cert, client_key) = issue("alice");
    let write = |n: &str, s: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, s).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (sc, sk, cac) = (
        write("server.pem", &server_cert),
        write("server.key", &server_key),
        write("ca.pem", &ca.pem()),
    );

    // The castore alone (no kernel/agent) is enough to test the transport.
    let port = free_port();
    let store = tempfile::tempdir().unwrap();
    let mut server = Serve::castore(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--tls-cert",
            &sc,
            "--tls-key",
            &sk,
            "--tls-client-ca",
            &cac,
        ],
        Listen::Tcp(port),
    );
    let endpoint = |identity: Option<Identity>| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pem()))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
    };
    let anonymous = match endpoint(None).connect().await {
        Err(e) => Err(e.to_string()),
        Ok(ch) => {
            use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
            HealthClient::new(ch)
                .check(HealthCheckRequest::default())
                .await
                .map(|_| ())
                .map_err(|s| s.to_string())
        }
    };
    assert!(
        anonymous.is_err(),
        "a client without a certificate got through"
    );

    let ch = endpoint(Some(Identity::from_pem(client_cert, client_key)))
        .connect()
        .await
        .unwrap();
    assert_eq!(health(ch, "tvix.castore.v1.BlobService").await, 1);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.wait(Duration::from_secs(20));
    assert!(status.success(), "{status}:\n{}", server.log());
}
