#![allow(clippy::unwrap_used)]

use super::*;
use crate::castore::blob::MemoryBlobService;
use crate::castore::directory_service::MemoryDirectoryService;
use crate::castore::import::import_path;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

/// A tree with every kind of entry and file sizes around the 8-byte padding.
fn sample_tree(root: &Path) {
    std::fs::create_dir(root).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("one"), b"1").unwrap();
    std::fs::write(root.join("eight"), b"12345678").unwrap();
    std::fs::write(root.join("nine"), b"123456789").unwrap();
    let big: Vec<u8> = (0..(3 * CHUNK as u32 + 5))
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(root.join("big"), &big).unwrap();
    std::fs::write(root.join("run"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("one", root.join("link")).unwrap();
    std::os::unix::fs::symlink("../dangling/target", root.join("dangling")).unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::write(root.join("a/b/c/deep"), b"deep").unwrap();
    std::fs::write(root.join("a/B"), b"upper case sorts first").unwrap();
    std::fs::write(root.join("a/b.txt"), b"after b? no: '.' < 'b'? ").unwrap();
}

/// `nix-store --dump PATH`, which this host must have (scripts/install-deps.sh installs it).
fn nix_dump(path: &Path) -> Vec<u8> {
    let out = std::process::Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store is missing: run scripts/install-deps.sh (Debian's nix-bin)");
    assert!(
        out.status.success(),
        "nix-store --dump {}: {out:?}",
        path.display()
    );
    out.stdout
}

fn archive_of_path(path: &Path) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new());
    write_path(path, &mut w).unwrap();
    w.into_sink()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[test]
fn a_symlink_is_framed_as_the_format_says() {
    let mut w = NarWriter::new(Vec::new());
    w.symlink(b"abc");
    let mut want = Vec::new();
    for s in [
        b"nix-archive-1".as_slice(),
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"abc",
        b")",
    ] {
        want.extend_from_slice(&(s.len() as u64).to_le_bytes());
        want.extend_from_slice(s);
        want.resize(want.len().div_ceil(8) * 8, 0);
    }
    assert_eq!(w.into_sink(), want);
}

#[test]
fn host_trees_match_nix_store_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    sample_tree(&root);
    for path in [
        root.clone(),
        root.join("run"),
        root.join("nine"),
        root.join("empty-file"),
        root.join("link"),
        root.join("empty-dir"),
    ] {
        let want = nix_dump(&path);
        let got = archive_of_path(&path);
        assert!(
            got == want,
            "{}: archive differs from nix-store --dump",
            path.display()
        );
        let h = hash_path(&path).unwrap();
        assert_eq!(h.sha256, sha256(&want), "{}", path.display());
        assert_eq!(h.size, want.len() as u64);
    }
}

#[tokio::test]
async fn castore_nodes_hash_as_nix_store_dump_of_their_source() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("tree");
    sample_tree(&root);
    let blobs: Arc<dyn BlobService> = Arc::new(MemoryBlobService::new());
    let dirs: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::new());
    for path in [
        root.clone(),
        root.join("run"),
        root.join("link"),
        root.join("big"),
    ] {
        let node = import_path(blobs.clone(), dirs.clone(), &path)
            .await
            .unwrap();
        let want = nix_dump(&path);
        let mut w = NarWriter::new(Vec::new());
        write_node(&*blobs, &*dirs, &node, &mut w).await.unwrap();
        assert!(w.into_sink() == want, "{}: archive differs", path.display());
        let h = hash_node(&*blobs, &*dirs, &node).await.unwrap();
        assert_eq!(h.sha256, sha256(&want), "{}", path.display());
        assert_eq!(h.size, want.len() as u64);
    }
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_node_is_refused() {
    let blobs = MemoryBlobService::new();
    let dirs = MemoryDirectoryService::new();
    let digest = crate::castore::blob::put_bytes(&blobs, b"12345")
        .await
        .unwrap();
    let short = Node::File {
        digest,
        size: 4,
        executable: false,
    };
    let err = hash_node(&blobs, &dirs, &short).await.unwrap_err();
    assert!(
        matches!(
            err,
            NarError::BlobMismatch {
                size: 4,
                got_size: 5,
                ..
            }
        ),
        "{err:?}"
    );
    let other = Node::File {
        digest: B3Digest::of(b"absent"),
        size: 6,
        executable: false,
    };
    let err = hash_node(&blobs, &dirs, &other).await.unwrap_err();
    assert!(matches!(err, NarError::BlobNotFound(_)), "{err:?}");
}

#[test]
fn a_fifo_has_no_nar_form() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = hash_path(&fifo).unwrap_err();
    assert!(matches!(err, NarError::Unsupported { .. }), "{err:?}");
}
