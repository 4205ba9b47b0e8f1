//! The real binary: `store import`, `ls`, `cat`, `export`, and `serve` with a remote store.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use support::cli::{bin, ok_stdout, store_run as run};
use support::serve::{Listen, Serve};

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("sub/empty")).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(root.join("sub/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        root.join("sub/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../hello.txt", root.join("sub/link")).unwrap();
}

#[test]
fn import_ls_cat_export_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    let src = tmp.path().join("tree");
    make_tree(&src);
    let file = src.join("hello.txt");

    let out = ok_stdout(run(
        &store,
        &["import", src.to_str().unwrap(), file.to_str().unwrap()],
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let dir_json: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let file_json: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    // Named by basename, base64 in proto3 JSON; sizes as strings.
    assert_eq!(dir_json["directory"]["name"], "dHJlZQ==");
    assert_eq!(dir_json["directory"]["size"], "5");
    assert_eq!(file_json["file"]["name"], "aGVsbG8udHh0");
    assert_eq!(file_json["file"]["size"], "6");
    assert!(store.join("blobs").is_dir() && store.join("directories.redb").is_file());

    let ls = ok_stdout(run(&store, &["ls", lines[0]]));
    let ls_lines: Vec<&str> = ls.lines().collect();
    assert_eq!(ls_lines.len(), 6, "{ls}");
    assert!(
        ls_lines[0].starts_with("d 5 b3:") && ls_lines[0].ends_with(" tree"),
        "{ls}"
    );
    assert!(ls_lines[1].starts_with("f 6 b3:") && ls_lines[1].ends_with(" tree/hello.txt"));
    assert!(
        ls_lines.contains(&"l tree/sub/link -> ../hello.txt"),
        "{ls}"
    );
    assert!(ls_lines
        .iter()
        .any(|l| l.starts_with("x 18 ") && l.ends_with(" tree/sub/run.sh")));
    assert!(ls_lines
        .iter()
        .any(|l| l.starts_with("d 0 ") && l.ends_with(" tree/sub/empty")));

    // cat, by b3: digest and by hex.
    let b64 = file_json["file"]["digest"].as_str().unwrap();
    let cat = ok_stdout(run(&store, &["cat", &format!("b3:{b64}")]));
    assert_eq!(cat, "hello\n");
    let hex = tvix_build_vm::castore::B3Digest::of(b"hello\n").to_hex();
    assert_eq!(ok_stdout(run(&store, &["cat", &hex])), "hello\n");

    let dest = tmp.path().join("exported");
    ok_stdout(run(&store, &["export", lines[0], dest.to_str().unwrap()]));
    assert_eq!(std::fs::read(dest.join("hello.txt")).unwrap(), b"hello\n");
    assert_eq!(
        std::fs::read_link(dest.join("sub/link")).unwrap(),
        Path::new("../hello.txt")
    );
    let mode = std::fs::metadata(dest.join("sub/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert!(mode & 0o100 != 0);
    assert!(dest.join("sub/empty").is_dir());

    // Re-importing the export gives the same node (apart from the name).
    let again = ok_stdout(run(&store, &["import", dest.to_str().unwrap()]));
    let again: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(
        again["directory"]["digest"],
        dir_json["directory"]["digest"]
    );

    // Exporting over an existing path fails, naming it.
    let o = run(&store, &["export", lines[0], dest.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already exists") && err.contains("exported"),
        "{err}"
    );
}

#[test]
fn errors_are_reported_with_their_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");

    let o = run(&store, &["cat", &"00".repeat(32)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));

    let o = run(&store, &["cat", "nonsense"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("parsing the digest") && err.contains("nonsense"),
        "{err}"
    );

    let o = run(&store, &["import", "/dev/null"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/dev/null") && err.contains("character device"),
        "{err}"
    );

    let o = run(&store, &["ls", r#"{"file":{"name":"","digest":"AAAA"}}"#]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid node"));

    let o = bin()
        .args([
            "store",
            "--blob-service-addr",
            "ftp://x",
            "cat",
            &"00".repeat(32),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ftp://x"));
}

#[test]
fn help_everywhere() {
    for args in [
        vec!["--help"],
        vec!["store", "--help"],
        vec!["store", "import", "--help"],
        vec!["store", "ls", "--help"],
        vec!["store", "cat", "--help"],
        vec!["store", "export", "--help"],
        vec!["serve", "--help"],
    ] {
        let o = bin().args(&args).output().unwrap();
        assert!(o.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

/// `serve` on a unix socket with its own embedded store; the CLI talks to it over gRPC.
#[test]
fn serve_and_use_as_remote_store() {
    let tmp = tempfile::tempdir().unwrap();
    let server_store = tmp.path().join("server-store");
    let mut server = Serve::castore(&["--store", server_store.to_str().unwrap()], Listen::Unix);
    let sock = server.sock.clone();
    let addr = format!("grpc+unix://{}", sock.display());
    let remote = |args: &[&str]| {
        bin()
            .args([
                "store",
                "--blob-service-addr",
                &addr,
                "--directory-service-addr",
                &addr,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let src = tmp.path().join("tree");
    make_tree(&src);
    let json = ok_stdout(remote(&["import", src.to_str().unwrap()]));
    let dest = tmp.path().join("out");
    ok_stdout(remote(&["export", json.trim(), dest.to_str().unwrap()]));
    assert_eq!(
        std::fs::read(dest.join("sub/run.sh")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );

    // SIGTERM stops it cleanly and removes the socket.
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.wait(Duration::from_secs(20));
    assert!(status.success(), "{status:?}:\n{}", server.log());
    assert!(!sock.exists());
}
