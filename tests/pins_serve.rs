//! Pins through a running serve (`tvixbuildvm.store.v1.PinService`, real gRPC, real store on
//! disk): what a pin keeps through serve's periodic GC, which tenant may do what, and what is
//! refused. No VM needed.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use std::time::Duration;
use support::cli::{
    bin, blob_files, closure_blobs, import_tree, kept_and_gone, ok_stdout, store_run,
};
use support::serve::{free_port, Listen, Serve};
use support::tokens::{with_token, write_tokens};
use tonic::Code;
use tvix_build_vm::proto::castore as cpb;
use tvix_build_vm::proto::pins as pb;

fn pins_cli(args: &[&str]) -> std::process::Output {
    bin()
        .args(["store", "--store", "/nonexistent"])
        .args(args)
        .output()
        .unwrap()
}

/// A file node naming a blob nobody stored.
const MISSING: &str = r#"{"file":{"name":"bQ==","digest":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=","size":"3"}}"#;

/// A castore-only serve on `store` collecting every second with a grace of one second.
fn serve_collecting(store: &std::path::Path) -> Serve {
    let store = store.to_str().unwrap();
    let args = ["--store", store, "--gc-interval", "1s", "--gc-grace", "1s"];
    Serve::castore(&args, Listen::Unix)
}

#[test]
fn a_pin_through_serve_keeps_its_closure_through_serves_gc() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (kept, gone) = kept_and_gone(&store, tmp.path());
    let kept_blobs = closure_blobs(&store, &kept);
    assert_eq!(kept_blobs.len(), 3);
    assert_eq!(blob_files(&store).len(), 5);

    let mut server = serve_collecting(&store);
    let addr = format!("grpc+unix:{}", server.sock.display());
    // Without --addr the store is locked, and the error says what to do instead.
    let o = store_run(&store, &["pin", &kept]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--addr"),
        "{o:?}"
    );

    ok_stdout(pins_cli(&["pin", "--addr", &addr, &kept]));
    let listed = ok_stdout(pins_cli(&["pins", "--addr", &addr]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let uid = nix::unistd::getuid();
    assert!(
        listed.contains(&format!("\"who\":\"uid-{uid}\"")),
        "{listed}"
    );

    let o = pins_cli(&["pin", "--addr", &addr, MISSING]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("NotFound") && err.contains("not in the store"),
        "{err}"
    );

    // The unpinned tree goes, the pinned closure stays.
    server.wait_for(|| blob_files(&store) == kept_blobs, "only the pinned blobs");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(20)).success());
    assert_eq!(
        closure_blobs(&store, &kept),
        kept_blobs,
        "the pinned tree is whole"
    );
    assert!(!store_run(&store, &["ls", &gone]).status.success());

    // Unpinned through serve, the rest goes too.
    let mut server = serve_collecting(&store);
    let addr = format!("grpc+unix:{}", server.sock.display());
    ok_stdout(pins_cli(&["unpin", "--addr", &addr, &kept]));
    assert_eq!(ok_stdout(pins_cli(&["pins", "--addr", &addr])), "");
    server.wait_for(|| blob_files(&store).is_empty(), "an empty blob store");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(20)).success());
}

#[tokio::test]
async fn tenants_own_their_pins_and_the_unauthenticated_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let tree = import_tree(&store, &tmp.path().join("t"), &[("a", "x"), ("sub/b", "y")]);
    let node: cpb::Node = serde_json::from_str(&tree).unwrap();
    let tokens = tmp.path().join("tokens");
    write_tokens(&tokens, &[("alice", "tok-a"), ("bob", "tok-b")]);
    let config = tmp.path().join("serve.toml");
    std::fs::write(&config, "[tenant-defaults]\nmax-pins = 1\n").unwrap();
    let port = free_port();
    let _server = Serve::castore(
        &[
            "--store",
            store.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--tokens",
            tokens.to_str().unwrap(),
            "--require-auth",
        ],
        Listen::Tcp(port),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = pb::pin_service_client::PinServiceClient::new(channel);
    let pin = |n: &cpb::Node| pb::PinRequest {
        node: Some(n.clone()),
    };
    let unpin = |n: &cpb::Node| pb::UnpinRequest {
        node: Some(n.clone()),
    };

    let e = c.pin(pin(&node)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c.list(pb::ListPinsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    let r = c.pin(with_token(pin(&node), "tok-a")).await.unwrap();
    assert!(r.into_inner().created);
    let r = c.pin(with_token(pin(&node), "tok-a")).await.unwrap();
    assert!(!r.into_inner().created, "a re-pin refreshes");

    let e = c
        .unpin(with_token(unpin(&node), "tok-b"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("alice"), "{e:?}");
    let e = c.pin(with_token(pin(&node), "tok-b")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    let bobs = c
        .list(with_token(pb::ListPinsRequest {}, "tok-b"))
        .await
        .unwrap();
    assert!(bobs.into_inner().pins.is_empty());
    let alices = c
        .list(with_token(pb::ListPinsRequest {}, "tok-a"))
        .await
        .unwrap();
    let alices = alices.into_inner().pins;
    assert_eq!(alices.len(), 1);
    assert_eq!(alices[0].tenant, "alice");
    assert_eq!(alices[0].node.as_ref(), Some(&node));

    // alice is at her max-pins (1).
    let link: cpb::Node =
        serde_json::from_str(r#"{"symlink":{"name":"bA==","target":"dA=="}}"#).unwrap();
    let e = c.pin(with_token(pin(&link), "tok-a")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("tenant-defaults.max-pins"), "{e:?}");

    let missing: cpb::Node = serde_json::from_str(MISSING).unwrap();
    let e = c.pin(with_token(pin(&missing), "tok-b")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("blob b3:"), "{e:?}");
    let e = c
        .pin(with_token(pb::PinRequest { node: None }, "tok-b"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    c.unpin(with_token(unpin(&node), "tok-a")).await.unwrap();
    let e = c
        .unpin(with_token(unpin(&node), "tok-a"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}
