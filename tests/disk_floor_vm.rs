//! A host at its free-space floor: `serve` on a store in a small tmpfs refuses new uploads and
//! builds with RESOURCE_EXHAUSTED once the filesystem is below `--min-free-space`, stores
//! nothing of a refused upload, says it is not ready on `/readyz`, and takes work again when space comes back; the store stays
//! consistent throughout.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::path::Path;
use std::process::Command;
use support::cli::Env;
use support::hostile::Castore;
use support::serve::*;
use tonic::Code;
use tvix_build_vm::castore::blob::{put_bytes, GrpcBlobService};
use tvix_build_vm::castore::{B3Digest, BlobService};
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, size: &str) -> Self {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs at {} (the test needs root, as the VM tests do)",
            dir.display()
        );
        Self(dir)
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn below_the_floor_new_work_is_refused_and_taken_again_when_space_returns() {
    let env = Env::new();
    let dir = tempfile::Builder::new()
        .prefix("tbv-floor-")
        .tempdir_in("/tmp")
        .unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let fs = Tmpfs::mount(&store, "64M");
    let mut cmd = env.command();
    cmd.arg("serve").arg("--store").arg(&store);
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Serve::spawn(
        cmd,
        &["--min-free-space", "40M", "--metrics-listen", &metrics],
        Listen::Unix,
    );
    let channel = server.channel();
    let blobs = GrpcBlobService::new(channel.clone());

    // Above the floor: uploads and a build go through.
    let busybox = upload_busybox(channel.clone()).await;
    put_bytes(&blobs, &vec![1u8; 16 << 20]).await.unwrap();
    let req = seed_request(busybox.clone(), "echo hi > $out", &["out"]);
    let mut req = req;
    req.environment_vars.push(env_var("out", "/nix/store/out"));
    req.environment_vars.sort_by(|a, b| a.key.cmp(&b.key));
    BuildServiceClient::new(channel.clone())
        .do_build(req.clone())
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", server.log()));

    // This one is accepted (the floor holds when it starts) and takes the store below it.
    put_bytes(&blobs, &vec![2u8; 12 << 20]).await.unwrap();

    // Below: a new upload and a new build are refused, naming the floor.
    let small = b"after the floor".to_vec();
    let e = put_bytes(&blobs, &small).await.unwrap_err();
    let status = match e {
        tvix_build_vm::castore::Error::Remote { source, .. } => *source,
        other => panic!("expected the server's refusal, got {other:?}"),
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--min-free-space"), "{status:?}");
    assert!(!blobs.has(&B3Digest::of(&small)).await.unwrap());
    let (status_line, body) = http_probe(&metrics, "/readyz").await;
    assert!(status_line.contains("503"), "{status_line} {body}");
    assert!(body.contains("--min-free-space"), "{body}");
    let refused = BuildServiceClient::new(channel.clone())
        .do_build(req.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--min-free-space"),
        "{refused:?}"
    );

    // Space comes back: work is taken again.
    fs.resize("128M");
    let (status_line, body) = http_probe(&metrics, "/readyz").await;
    assert!(status_line.contains("200"), "{status_line} {body}");
    put_bytes(&blobs, &small).await.unwrap();
    BuildServiceClient::new(channel.clone())
        .do_build(req)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", server.log()));

    drop(server);
    // Nothing half-written: every blob matches its digest, no temporary file is left.
    let snapshot = Castore::verify(&store);
    assert!(snapshot.tmp.is_empty(), "left in tmp: {:?}", snapshot.tmp);
    assert!(snapshot.blobs.contains(&B3Digest::of(&small).to_hex()));
    env.assert_clean();
}
