//! Import host paths into the castore and export them back.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

use proptest::prelude::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tvix_build_vm::castore::blob::{read_to_vec, MemoryBlobService};
use tvix_build_vm::castore::directory_service::MemoryDirectoryService;
use tvix_build_vm::castore::export::{export_node, ExportError};
use tvix_build_vm::castore::import::{import_path, ImportError, PREHASH_MIN};
use tvix_build_vm::castore::{B3Digest, BlobService, DirectoryService, Node};

fn stores() -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>) {
    (
        Arc::new(MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
    )
}

/// A tree to create on disk.
#[derive(Debug, Clone)]
enum Tree {
    File(Vec<u8>, bool),
    Symlink(String),
    Dir(Vec<(String, Tree)>),
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (
            proptest::collection::vec(any::<u8>(), 0..2000),
            any::<bool>()
        )
            .prop_map(|(d, x)| Tree::File(d, x)),
        "[a-z/.]{1,20}".prop_map(Tree::Symlink),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        proptest::collection::btree_map("[a-zA-Z0-9_.-]{1,8}", inner, 0..6)
            .prop_filter("no dot names", |m| {
                !m.contains_key(".") && !m.contains_key("..")
            })
            .prop_map(|m| Tree::Dir(m.into_iter().collect()))
    })
}

fn create(path: &Path, t: &Tree) {
    match t {
        Tree::File(data, exec) => {
            std::fs::write(path, data).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        Tree::Symlink(target) => std::os::unix::fs::symlink(target, path).unwrap(),
        Tree::Dir(entries) => {
            std::fs::create_dir(path).unwrap();
            for (n, c) in entries {
                create(&path.join(n), c);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn import_export_import_gives_the_same_digest(t in tree()) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (blobs, dirs) = stores();
            let tmp = tempfile::tempdir().unwrap();
            let src = tmp.path().join("src");
            create(&src, &t);
            let node = import_path(blobs.clone(), dirs.clone(), &src).await.unwrap();
            let dest = tmp.path().join("dest");
            export_node(blobs.as_ref(), dirs.as_ref(), &node, &dest).await.unwrap();
            let again = import_path(blobs.clone(), dirs.clone(), &dest).await.unwrap();
            prop_assert_eq!(again, node);
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn single_file_executable_symlink_and_empty_dir() {
    let (blobs, dirs) = stores();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("f");
    std::fs::write(&f, b"contents").unwrap();
    let node = import_path(blobs.clone(), dirs.clone(), &f).await.unwrap();
    assert_eq!(
        node,
        Node::File {
            digest: B3Digest::of(b"contents"),
            size: 8,
            executable: false
        }
    );
    assert_eq!(
        read_to_vec(blobs.as_ref(), &B3Digest::of(b"contents"))
            .await
            .unwrap()
            .unwrap(),
        b"contents"
    );

    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o700)).unwrap();
    let node = import_path(blobs.clone(), dirs.clone(), &f).await.unwrap();
    assert!(matches!(
        node,
        Node::File {
            executable: true,
            ..
        }
    ));

    let l = tmp.path().join("l");
    std::os::unix::fs::symlink("/some/where", &l).unwrap();
    let node = import_path(blobs.clone(), dirs.clone(), &l).await.unwrap();
    assert!(matches!(&node, Node::Symlink { target } if target.as_bytes() == b"/some/where"));

    let e = tmp.path().join("e");
    std::fs::create_dir(&e).unwrap();
    let node = import_path(blobs.clone(), dirs.clone(), &e).await.unwrap();
    let empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";
    assert!(matches!(&node, Node::Directory { digest, size: 0 } if digest.to_hex() == empty));
    assert!(dirs.get(node.digest().unwrap()).await.unwrap().is_some());
}

#[tokio::test]
async fn big_file_is_prehashed_and_deduplicated() {
    let (blobs, dirs) = stores();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("big");
    let data: Vec<u8> = (0..PREHASH_MIN + 12345).map(|i| (i % 239) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    let node = import_path(blobs.clone(), dirs.clone(), &f).await.unwrap();
    let want = Node::File {
        digest: B3Digest::of(&data),
        size: data.len() as u64,
        executable: false,
    };
    assert_eq!(node, want);
    // Already present: the second import does not need to upload, and agrees.
    assert_eq!(
        import_path(blobs.clone(), dirs.clone(), &f).await.unwrap(),
        want
    );
    assert_eq!(
        read_to_vec(blobs.as_ref(), &B3Digest::of(&data))
            .await
            .unwrap()
            .unwrap(),
        data
    );
}

fn unsupported(r: Result<Node, ImportError>) -> (PathBuf, &'static str) {
    match r {
        Err(ImportError::UnsupportedType { path, kind }) => (path, kind),
        other => panic!("expected UnsupportedType, got {other:?}"),
    }
}

#[tokio::test]
async fn special_files_are_refused_naming_the_path() {
    let (blobs, dirs) = stores();
    let tmp = tempfile::tempdir().unwrap();

    let d = tmp.path().join("withsocket");
    std::fs::create_dir(&d).unwrap();
    let sock = d.join("s.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (path, kind) = unsupported(import_path(blobs.clone(), dirs.clone(), &d).await);
    assert_eq!((path.as_path(), kind), (sock.as_path(), "socket"));

    let fifo = tmp.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let (path, kind) = unsupported(import_path(blobs.clone(), dirs.clone(), &fifo).await);
    assert_eq!((path.as_path(), kind), (fifo.as_path(), "FIFO"));

    let r = import_path(blobs.clone(), dirs.clone(), Path::new("/dev/null")).await;
    let msg = r.as_ref().map(|_| ()).unwrap_err().to_string();
    assert!(
        msg.contains("/dev/null") && msg.contains("character device"),
        "{msg}"
    );
    let (_, kind) = unsupported(r);
    assert_eq!(kind, "character device");

    let missing = tmp.path().join("missing");
    let e = import_path(blobs, dirs, &missing).await.unwrap_err();
    assert!(
        matches!(&e, ImportError::Io { path, .. } if path == &missing),
        "{e:?}"
    );
}

#[tokio::test]
async fn export_refuses_existing_dest_and_cleans_up_on_failure() {
    let (blobs, dirs) = stores();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    create(
        &src,
        &Tree::Dir(vec![("a".into(), Tree::File(b"a".to_vec(), false))]),
    );
    let node = import_path(blobs.clone(), dirs.clone(), &src)
        .await
        .unwrap();

    let e = export_node(blobs.as_ref(), dirs.as_ref(), &node, &src)
        .await
        .unwrap_err();
    assert!(matches!(&e, ExportError::Exists(p) if p == &src), "{e:?}");

    // A missing blob fails the export; nothing is left behind.
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("dest");
    let (empty_blobs, _) = stores();
    let e = export_node(empty_blobs.as_ref(), dirs.as_ref(), &node, &dest)
        .await
        .unwrap_err();
    assert!(matches!(e, ExportError::BlobNotFound(_)), "{e:?}");
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);

    // A missing directory too.
    let (_, empty_dirs) = stores();
    let e = export_node(blobs.as_ref(), empty_dirs.as_ref(), &node, &dest)
        .await
        .unwrap_err();
    assert!(matches!(e, ExportError::DirectoryNotFound(_)), "{e:?}");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);

    export_node(blobs.as_ref(), dirs.as_ref(), &node, &dest)
        .await
        .unwrap();
    assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"a");
}

#[tokio::test]
async fn export_detects_a_lying_blob_store() {
    let (blobs, dirs) = stores();
    let tmp = tempfile::tempdir().unwrap();
    let real = tvix_build_vm::castore::blob::put_bytes(blobs.as_ref(), b"real")
        .await
        .unwrap();
    // A node claiming 3 bytes for a 4-byte blob.
    let node = Node::File {
        digest: real,
        size: 3,
        executable: false,
    };
    let dest = tmp.path().join("f");
    let e = export_node(blobs.as_ref(), dirs.as_ref(), &node, &dest)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ExportError::BlobMismatch { got_size: 4, .. }),
        "{e:?}"
    );
    assert!(!dest.exists());
}
