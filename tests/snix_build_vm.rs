//! snix callers building on a real `serve` with real VMs: `snix.build.v1.BuildService/
//! DoBuild` with two outputs and refscan needles, a failed build's status, and the streaming
//! `BuildPaths` called with a snix `BuildRequest` (live log, the result, and a dropped
//! stream that kills its VM). Inputs go up and outputs come back through snix.castore.v1;
//! the snix side uses the clients generated from protos/snix.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use support::cli::Env;
use support::serve::{
    assert_aborted_with_last_words, assert_dropped_paths_stream_kills_its_vm, read_paths_stream,
    Serve,
};
use support::snix;
use tonic::Code;
use tvix_build_vm::proto::build::build::exit_status::Kind;
use tvix_build_vm::proto::snix_build as sb;

#[tokio::test(flavor = "multi_thread")]
async fn do_build_answers_both_outputs_in_request_order_with_their_needles() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    let channel = server.channel();
    let mut client = sb::build_service_client::BuildServiceClient::new(channel.clone());
    let req = snix::two_outputs(snix::upload_busybox(channel.clone()).await);
    let response = client.do_build(req).await.unwrap().into_inner();
    snix::assert_two_outputs(channel.clone(), &response).await;

    // A failed build: ABORTED with the exit code, the log's end and its blob, as on the
    // tvix path.
    let failing = snix::request(
        snix::upload_busybox(channel.clone()).await,
        "echo last words >&2; exit 42",
        &["out"],
    );
    assert_aborted_with_last_words(&client.do_build(failing).await.unwrap_err());
    drop(server);
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn build_paths_with_a_snix_request_streams_the_log_and_a_dropped_stream_kills_the_vm() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    let channel = server.channel();
    let req = snix::two_outputs(snix::upload_busybox(channel.clone()).await);
    let stream = snix::build_paths(channel.clone(), req).await.unwrap();
    let (started, log, build) = read_paths_stream(stream).await;
    assert!(started);
    assert!(log.contains("building\n"), "{log:?}");
    let needles: Vec<_> = build
        .outputs_needles
        .iter()
        .map(|n| n.needles.clone())
        .collect();
    assert_eq!(needles, [vec![1], vec![]]);
    assert_eq!(build.outputs.len(), 2);
    assert_eq!(
        build.exit_status.unwrap().kind,
        Some(Kind::Code(0)),
        "exit status"
    );

    // A bad snix request is refused before anything runs, naming the variable.
    let mut bad = snix::request(snix::upload_busybox(channel.clone()).await, "true", &["x"]);
    bad.environment_vars = vec![snix::var("TOKEN", "a\0b")];
    let s = snix::build_paths(channel.clone(), bad).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("\"TOKEN\""), "{}", s.message());

    // The client goes away mid-build: the VM must go within seconds.
    let req = snix::request(
        snix::upload_busybox(channel.clone()).await,
        "echo up; sleep 60",
        &[],
    );
    let running = snix::build_paths(channel.clone(), req).await.unwrap();
    assert_dropped_paths_stream_kills_its_vm(&env, &server, running).await;
    drop(server);
    env.assert_clean();
}
