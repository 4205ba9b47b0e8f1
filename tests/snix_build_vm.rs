//! snix callers building on a real `serve` with real VMs: `snix.build.v1.BuildService/
//! DoBuild` with two outputs and refscan needles, a failed build's status, and the streaming
//! `BuildPaths` called with a snix `BuildRequest` (live log, the result, and a dropped
//! stream that kills its VM), and a signing `serve` attesting a snix request in its own
//! dialect. Inputs go up and outputs come back through snix.castore.v1;
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

/// A signing `serve` signs a snix build too: the digest in the metadata names an envelope
/// whose statement records the request in its own dialect, as the snix client sent it.
#[tokio::test(flavor = "multi_thread")]
async fn a_signing_serve_attests_a_snix_request_in_its_dialect() {
    use prost::Message;
    use sha2::Digest;
    let env = Env::new();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("host.key");
    let status = env
        .command()
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success());
    let server = Serve::start(&env, &["--signing-key", key.to_str().unwrap()]);
    let channel = server.channel();
    let req = snix::two_outputs(snix::upload_busybox(channel.clone()).await);
    let sent_sha256 = data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(req.encode_to_vec()));
    let response = sb::build_service_client::BuildServiceClient::new(channel.clone())
        .do_build(req)
        .await
        .unwrap();
    let digest = response
        .metadata()
        .get("tvix-build-vm-provenance")
        .expect("the provenance digest in the response metadata")
        .to_str()
        .unwrap()
        .to_owned();
    snix::assert_two_outputs(channel.clone(), response.get_ref()).await;
    let digest = data_encoding::HEXLOWER.decode(digest.as_bytes()).unwrap();
    let digest = tvix_build_vm::castore::B3Digest::try_from(&digest[..]).unwrap();
    let envelope = tvix_build_vm::castore::blob::read_to_vec(&snix::blobs(channel), &digest)
        .await
        .unwrap()
        .expect("the envelope in the castore");
    let envelope: serde_json::Value = serde_json::from_slice(&envelope).unwrap();
    let payload = data_encoding::BASE64
        .decode(envelope["payload"].as_str().unwrap().as_bytes())
        .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let external = &statement["predicate"]["buildDefinition"]["externalParameters"];
    assert_eq!(external["dialect"], "snix.build.v1", "{external}");
    assert_eq!(
        external["requestDigest"]["sha256"], sent_sha256,
        "{external}"
    );
    assert_eq!(
        external["request"]["refscanNeedles"][1],
        snix::B,
        "{external}"
    );
    drop(server);
    env.assert_clean();
}
