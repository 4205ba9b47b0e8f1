//! The real binary: `store gc`, `store pin`, `store unpin`, `store pins` on an embedded store
//! on disk, checked against a walk of the store written here (`store ls` of each root and the
//! blob files on disk), not against the GC's own mark.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use std::time::Duration;
use support::cli::{bin, blob_files, closure_blobs, kept_and_gone, ok_stdout, store_run as run};
use support::serve::{Listen, Serve};

/// `tvix-build-vm <args>` fails saying GC is for the embedded store, naming `memory:`.
fn refused_naming_memory(args: &[&str]) {
    let o = bin().args(args).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("embedded store only") && err.contains("memory:"),
        "{err}"
    );
}

#[test]
fn gc_keeps_exactly_the_pinned_closure_and_dry_run_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let (kept, gone) = kept_and_gone(&store, tmp.path());
    ok_stdout(run(&store, &["pin", &kept]));
    let pins = ok_stdout(run(&store, &["pins"]));
    assert_eq!(pins.lines().count(), 1, "{pins}");
    let uid = nix::unistd::getuid();
    assert!(pins.contains(&format!("\"who\":\"uid-{uid}\"")), "{pins}");
    std::thread::sleep(Duration::from_millis(50));

    // Within the grace period nothing goes.
    let out = ok_stdout(run(&store, &["gc"]));
    assert!(out.contains("0 removed"), "{out}");

    let before = blob_files(&store);
    assert_eq!(before.len(), 5);
    let dry = ok_stdout(run(&store, &["gc", "--dry-run", "--grace", "0"]));
    assert!(dry.contains("would remove"), "{dry}");
    assert_eq!(blob_files(&store), before);
    // Both trees are still whole.
    assert_eq!(closure_blobs(&store, &gone).len(), 3);

    let out = ok_stdout(run(&store, &["gc", "--grace", "0"]));
    assert!(out.contains("blobs: 3 kept, 2 removed"), "{out}");
    assert!(out.contains("directories: 2 kept, 2 removed"), "{out}");
    assert_eq!(blob_files(&store), closure_blobs(&store, &kept));
    let ls = run(&store, &["ls", &gone]);
    assert!(!ls.status.success(), "the unpinned tree is gone");

    // Unpinned, the rest goes too.
    ok_stdout(run(&store, &["unpin", &kept]));
    let again = run(&store, &["unpin", &kept]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not pinned"));
    ok_stdout(run(&store, &["gc", "--grace", "0"]));
    assert!(blob_files(&store).is_empty());
}

#[test]
fn gc_is_refused_on_other_stores_and_while_serve_holds_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    refused_naming_memory(&["store", "--blob-service-addr", "memory:", "gc"]);

    let store = tmp.path().join("store");
    let mut server = Serve::castore(&["--store", store.to_str().unwrap()], Listen::Unix);
    let o = run(&store, &["gc"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    let o = run(
        &store,
        &["pin", r#"{"symlink":{"name":"bA==","target":"dA=="}}"#],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.wait(Duration::from_secs(20));
}

#[test]
fn serve_collects_periodically_and_refuses_it_for_other_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let mut server = Serve::castore(
        &[
            "--store",
            store.to_str().unwrap(),
            "--gc-interval",
            "1s",
            "--gc-grace",
            "3s",
        ],
        Listen::Unix,
    );
    let addr = format!("grpc+unix://{}", server.sock.display());
    let src = tmp.path().join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a"), b"uploaded through serve").unwrap();
    std::fs::write(src.join("sub/b"), b"and this").unwrap();
    let o = bin()
        .args(["store", "--blob-service-addr", &addr])
        .args(["--directory-service-addr", &addr, "import"])
        .arg(&src)
        .output()
        .unwrap();
    ok_stdout(o);
    // Within the grace period the uploads stay (the GC runs every second meanwhile)...
    assert_eq!(blob_files(&store).len(), 2);
    // ...and then, unrooted, go.
    server.wait_for(|| blob_files(&store).is_empty(), "an empty blob store");
    server.wait_for(
        || server.log().contains("garbage collection done"),
        "the GC's log line",
    );
    server.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.wait(Duration::from_secs(20)).success());

    refused_naming_memory(&[
        "serve",
        "--blob-service-addr",
        "memory:",
        "--directory-service-addr",
        "memory:",
        "--gc-interval",
        "1h",
        "--listen",
        "127.0.0.1:0",
    ]);
}
