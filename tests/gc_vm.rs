//! Garbage collection inside a real `serve` with real VMs and the embedded store on disk: a
//! build that starts before GCs run and reads an input older than the grace period succeeds;
//! afterwards its record keeps exactly its inputs, output and log, while an unrooted upload
//! goes. What is kept is checked against the blob files on disk, not the GC's own mark.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use bytes::Bytes;
use std::collections::BTreeSet;
use std::time::Duration;
use support::cli::{blob_files, Env};
use support::serve::*;
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;
use tvix_build_vm::proto::castore as cpb;

fn hex(digest: &[u8]) -> String {
    B3Digest::try_from(digest).unwrap().to_hex()
}

/// A file input named `name` holding the blob `digest` of `size` bytes.
fn file_input(name: &str, digest: &B3Digest, size: u64) -> cpb::Node {
    cpb::Node {
        node: Some(cpb::node::Node::File(cpb::FileNode {
            name: Bytes::copy_from_slice(name.as_bytes()),
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size,
            executable: false,
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_keeps_its_old_input_through_gcs_and_its_record_keeps_exactly_its_closure() {
    let env = Env::new();
    let server = Serve::start(
        &env,
        &[
            "--gc-interval",
            "1s",
            "--gc-grace",
            "2s",
            "--keep-for",
            "1h",
        ],
    );
    let channel = server.channel();
    let blobs = GrpcBlobService::new(channel.clone());
    let busybox = upload_busybox(channel.clone()).await;
    let old = put_bytes(&blobs, b"an input older than the grace period\n")
        .await
        .unwrap();
    let junk = put_bytes(&blobs, b"uploaded, never used").await.unwrap();

    let mut req = seed_request(
        busybox.clone(),
        "echo building; /nix/store/busybox sleep 6; \
         /nix/store/busybox cat /nix/store/old > /nix/store/out; echo more >> /nix/store/out",
        &["out"],
    );
    req.inputs.push(file_input("old", &old, 37));
    // Several GCs run while the build sleeps; its input's grace period ends meanwhile.
    let build = BuildServiceClient::new(channel.clone())
        .do_build(req)
        .await
        .unwrap()
        .into_inner();
    let out = file_node(&build.outputs[0]);
    let out_digest = B3Digest::try_from(&out.digest[..]).unwrap();
    assert_eq!(
        read_to_vec(&blobs, &out_digest).await.unwrap().unwrap(),
        b"an input older than the grace period\nmore\n"
    );
    let log = build.log.unwrap();

    // The unrooted upload goes once its grace period is over...
    let store = env.store.path();
    server.wait_for(
        || !blob_files(store).contains(&junk.to_hex()),
        "the unrooted upload's removal",
    );
    // ...and after further GCs, exactly the build's closure stays.
    std::thread::sleep(Duration::from_secs(3));
    let want: BTreeSet<String> = [
        hex(&file_node(&busybox).digest),
        old.to_hex(),
        out_digest.to_hex(),
        hex(&log.digest),
    ]
    .into_iter()
    .collect();
    assert_eq!(blob_files(store), want, "{}", server.log());
    assert!(server.log().contains("garbage collection done"));
    drop(server);
    env.assert_clean();
}

/// With one VM, a build queued behind a long one for longer than the grace period (several
/// GCs meanwhile) still finds its input: the hold is taken at admission, not at the start.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_build_keeps_its_input_while_it_waits() {
    let env = Env::new();
    let server = Serve::start(
        &env,
        &["--max-vms", "1", "--gc-interval", "1s", "--gc-grace", "1s"],
    );
    let channel = server.channel();
    let blobs = GrpcBlobService::new(channel.clone());
    let busybox = upload_busybox(channel.clone()).await;
    let long = seed_request(
        busybox.clone(),
        "/nix/store/busybox sleep 6; echo long > /nix/store/out",
        &["out"],
    );
    let mut first = BuildServiceClient::new(channel.clone());
    let first = tokio::spawn(async move { first.do_build(long).await });
    server.wait_for(|| server.log().contains("build started"), "the first build");

    let text = b"the input of a queued build\n";
    let input = put_bytes(&blobs, text).await.unwrap();
    let mut queued = seed_request(
        busybox,
        "/nix/store/busybox cat /nix/store/q > /nix/store/out",
        &["out"],
    );
    queued
        .inputs
        .push(file_input("q", &input, text.len() as u64));
    let second = BuildServiceClient::new(channel.clone())
        .do_build(queued)
        .await
        .unwrap()
        .into_inner();
    first.await.unwrap().unwrap();
    let out = file_node(&second.outputs[0]);
    let out_digest = B3Digest::try_from(&out.digest[..]).unwrap();
    assert_eq!(
        read_to_vec(&blobs, &out_digest).await.unwrap().unwrap(),
        text,
        "{}",
        server.log()
    );
    assert!(server.log().contains("garbage collection done"));
    drop(server);
    env.assert_clean();
}
