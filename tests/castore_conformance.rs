//! One conformance suite, run against every backend of each castore trait, the gRPC clients
//! included (they talk to a real server on a unix socket, backed by the memory services).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

use bytes::Bytes;
use futures::TryStreamExt;
use std::any::Any;
use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec, LocalBlobService, MemoryBlobService};
use tvix_build_vm::castore::directory_service::{MemoryDirectoryService, RedbDirectoryService};
use tvix_build_vm::castore::{
    addr, B3Digest, BlobService, Directory, DirectoryService, Error, Node, PathComponent,
    SymlinkTarget,
};
use tvix_build_vm::server::{self, ListenAddr, Listener};

type Guard = Box<dyn Any + Send>;

/// Serves memory backends on a unix socket; returns the socket address and a guard.
async fn memory_server() -> (String, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("castore.sock");
    let router = server::router(
        Arc::new(MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
    )
    .await
    .unwrap();
    let listener = Listener::bind(&ListenAddr::Unix(sock.clone()))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::serve(router, listener, async move {
        let _ = rx.await;
    }));
    (
        format!("grpc+unix://{}", sock.display()),
        Box::new((dir, tx)),
    )
}

async fn memory_blobs() -> (Arc<dyn BlobService>, Guard) {
    (Arc::new(MemoryBlobService::new()), Box::new(()))
}

async fn local_blobs() -> (Arc<dyn BlobService>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let svc = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    (Arc::new(svc), Box::new(dir))
}

async fn grpc_blobs() -> (Arc<dyn BlobService>, Guard) {
    let (a, g) = memory_server().await;
    (addr::blob_service_from_addr(&a).unwrap(), g)
}

/// The object-store backends on an in-memory bucket (the same code that talks to S3).
async fn bucket_blobs() -> (Arc<dyn BlobService>, Guard) {
    (
        addr::blob_service_from_addr("objectstore+memory:///").unwrap(),
        Box::new(()),
    )
}

async fn bucket_dirs() -> (Arc<dyn DirectoryService>, Guard) {
    (
        addr::directory_service_from_addr("objectstore+memory:///").unwrap(),
        Box::new(()),
    )
}

/// snix's bucket layout in a local directory (object_store's LocalFileSystem).
async fn file_bucket_blobs() -> (Arc<dyn BlobService>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("objectstore+file://{}/bucket", dir.path().display());
    (addr::blob_service_from_addr(&addr).unwrap(), Box::new(dir))
}

async fn file_bucket_dirs() -> (Arc<dyn DirectoryService>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("objectstore+file:{}/bucket", dir.path().display());
    (
        addr::directory_service_from_addr(&addr).unwrap(),
        Box::new(dir),
    )
}

async fn memory_dirs() -> (Arc<dyn DirectoryService>, Guard) {
    (Arc::new(MemoryDirectoryService::new()), Box::new(()))
}

async fn redb_dirs() -> (Arc<dyn DirectoryService>, Guard) {
    let dir = tempfile::tempdir().unwrap();
    let svc = RedbDirectoryService::open(&dir.path().join("directories.redb")).unwrap();
    (Arc::new(svc), Box::new(dir))
}

async fn grpc_dirs() -> (Arc<dyn DirectoryService>, Guard) {
    let (a, g) = memory_server().await;
    (addr::directory_service_from_addr(&a).unwrap(), g)
}

mod blob_tests {
    use super::*;

    pub async fn empty_blob(svc: Arc<dyn BlobService>) {
        let w = svc.open_write().await.unwrap();
        let mut w = w;
        let d = w.close().await.unwrap();
        assert_eq!(d, B3Digest::of(b""));
        assert!(svc.has(&d).await.unwrap());
        assert_eq!(read_to_vec(svc.as_ref(), &d).await.unwrap().unwrap(), b"");
    }

    pub async fn put_and_read_back(svc: Arc<dyn BlobService>) {
        let data = b"hello castore".repeat(1000);
        let d = put_bytes(svc.as_ref(), &data).await.unwrap();
        assert_eq!(d, B3Digest::of(&data));
        assert!(svc.has(&d).await.unwrap());
        assert_eq!(read_to_vec(svc.as_ref(), &d).await.unwrap().unwrap(), data);
        // Storing the same bytes again is fine and gives the same digest.
        assert_eq!(put_bytes(svc.as_ref(), &data).await.unwrap(), d);
    }

    pub async fn large_blob_in_many_writes(svc: Arc<dyn BlobService>) {
        let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let mut w = svc.open_write().await.unwrap();
        for piece in data.chunks(100_003) {
            w.write_all(piece).await.unwrap();
        }
        let d = w.close().await.unwrap();
        assert_eq!(d, B3Digest::of(&data));
        assert_eq!(read_to_vec(svc.as_ref(), &d).await.unwrap().unwrap(), data);
    }

    pub async fn absent(svc: Arc<dyn BlobService>) {
        let d = B3Digest::of(b"never stored");
        assert!(!svc.has(&d).await.unwrap());
        assert!(svc.open_read(&d).await.unwrap().is_none());
    }

    pub async fn seeking(svc: Arc<dyn BlobService>) {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let d = put_bytes(svc.as_ref(), &data).await.unwrap();
        let mut r = svc.open_read(&d).await.unwrap().unwrap();
        let mut buf = [0u8; 10];

        assert_eq!(r.seek(SeekFrom::Start(200_000)).await.unwrap(), 200_000);
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[..], data[200_000..200_010]);

        // Backwards.
        assert_eq!(r.seek(SeekFrom::Current(-110)).await.unwrap(), 199_900);
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[..], data[199_900..199_910]);

        assert_eq!(r.seek(SeekFrom::Start(5)).await.unwrap(), 5);
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[..], data[5..15]);

        assert_eq!(r.seek(SeekFrom::End(-10)).await.unwrap(), 299_990);
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[..], data[299_990..]);

        // Past the end: reads give nothing; seeking back works.
        assert_eq!(r.seek(SeekFrom::Start(400_000)).await.unwrap(), 400_000);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
        assert_eq!(r.seek(SeekFrom::Start(0)).await.unwrap(), 0);
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[..], data[..10]);
        assert!(r.seek(SeekFrom::Current(-100)).await.is_err());
    }

    pub async fn dropped_writer_stores_nothing(svc: Arc<dyn BlobService>) {
        let data = b"abandoned upload".repeat(5000);
        let mut w = svc.open_write().await.unwrap();
        w.write_all(&data).await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        // The gRPC client cancels in the background; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!svc.has(&B3Digest::of(&data)).await.unwrap());
    }

    pub async fn close_twice_fails(svc: Arc<dyn BlobService>) {
        let mut w = svc.open_write().await.unwrap();
        w.write_all(b"x").await.unwrap();
        w.close().await.unwrap();
        assert!(w.close().await.is_err());
        assert!(w.write_all(b"y").await.is_err());
    }
}

macro_rules! blob_suite {
    ($($backend:ident => $make:path),* $(,)?) => {$(
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn empty_blob() { let (s, _g) = $make().await; blob_tests::empty_blob(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn put_and_read_back() { let (s, _g) = $make().await; blob_tests::put_and_read_back(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_blob_in_many_writes() { let (s, _g) = $make().await; blob_tests::large_blob_in_many_writes(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn absent() { let (s, _g) = $make().await; blob_tests::absent(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn seeking() { let (s, _g) = $make().await; blob_tests::seeking(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropped_writer_stores_nothing() { let (s, _g) = $make().await; blob_tests::dropped_writer_stores_nothing(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn close_twice_fails() { let (s, _g) = $make().await; blob_tests::close_twice_fails(s).await }
        }
    )*};
}

blob_suite!(blob_memory => memory_blobs, blob_local => local_blobs, blob_grpc => grpc_blobs, blob_bucket => bucket_blobs, blob_file_bucket => file_bucket_blobs);

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

fn file_node(content: &[u8]) -> Node {
    Node::File {
        digest: B3Digest::of(content),
        size: content.len() as u64,
        executable: false,
    }
}

/// A directory with one file entry named `n`.
fn leaf(n: &str) -> Directory {
    let mut d = Directory::new();
    d.try_insert(name(n), file_node(n.as_bytes())).unwrap();
    d
}

fn with_children(children: &[(&str, &Directory)]) -> Directory {
    let mut d = Directory::new();
    for (n, c) in children {
        d.try_insert(name(n), c.as_node()).unwrap();
    }
    d
}

/// Whether the error is a refusal of the input (locally, or INVALID_ARGUMENT from a server).
fn is_refusal(e: &Error) -> bool {
    match e {
        Error::InvalidClosure(_) | Error::InvalidDirectory { .. } => true,
        Error::Remote { source, .. } => source.code() == tonic::Code::InvalidArgument,
        _ => false,
    }
}

mod dir_tests {
    use super::*;

    pub async fn absent(svc: Arc<dyn DirectoryService>) {
        let d = B3Digest::of(b"nope");
        assert!(svc.get(&d).await.unwrap().is_none());
        let r: Result<Vec<Directory>, Error> = svc.get_recursive(&d).try_collect().await;
        assert!(
            matches!(r, Err(Error::DirectoryNotFound(x)) if x == d),
            "{r:?}"
        );
    }

    pub async fn put_and_get(svc: Arc<dyn DirectoryService>) {
        let mut d = leaf("a");
        d.try_insert(
            name("l"),
            Node::Symlink {
                target: SymlinkTarget::try_from("/x").unwrap(),
            },
        )
        .unwrap();
        let digest = svc.put(d.clone()).await.unwrap();
        assert_eq!(digest, d.digest());
        assert_eq!(svc.get(&digest).await.unwrap(), Some(d.clone()));
        // The empty directory too.
        let e = Directory::new();
        assert_eq!(svc.put(e.clone()).await.unwrap(), e.digest());
        assert_eq!(svc.get(&e.digest()).await.unwrap(), Some(e));
    }

    pub async fn put_with_missing_child_is_refused(svc: Arc<dyn DirectoryService>) {
        let child = leaf("c");
        let parent = with_children(&[("c", &child)]);
        let e = svc.put(parent.clone()).await.unwrap_err();
        assert!(is_refusal(&e), "{e:?}");
        assert!(svc.get(&parent.digest()).await.unwrap().is_none());
        // Whether a stored child may be referenced by a later upload differs: see
        // `stored_child_*` below.
    }

    pub async fn closure_put_and_breadth_first_get(svc: Arc<dyn DirectoryService>) {
        // root -> a, b; a -> c; b -> c (shared); c -> d
        let d = leaf("d");
        let c = with_children(&[("d", &d)]);
        let a = with_children(&[("c", &c)]);
        let mut b = with_children(&[("c", &c)]);
        b.try_insert(name("f"), file_node(b"f")).unwrap();
        let root = with_children(&[("a", &a), ("b", &b)]);
        let mut p = svc.put_multiple_start();
        for dir in [&d, &c, &a, &c, &b, &root] {
            p.put((*dir).clone()).await.unwrap(); // the second `c` is a repeat: ignored
        }
        assert_eq!(p.close().await.unwrap(), root.digest());
        let got: Vec<Directory> = svc
            .get_recursive(&root.digest())
            .try_collect()
            .await
            .unwrap();
        let digests: Vec<B3Digest> = got.iter().map(|x| x.digest()).collect();
        assert_eq!(
            digests,
            vec![
                root.digest(),
                a.digest(),
                b.digest(),
                c.digest(),
                d.digest()
            ]
        );
        assert_eq!(root.size(), 2 + (1 + (1 + 1)) + (2 + (1 + 1)));
    }

    pub async fn two_roots_are_refused_and_nothing_is_stored(svc: Arc<dyn DirectoryService>) {
        let x = leaf("x");
        let y = leaf("y");
        let mut p = svc.put_multiple_start();
        p.put(x.clone()).await.unwrap();
        let e = match p.put(y.clone()).await {
            Ok(()) => p.close().await.unwrap_err(),
            Err(e) => e,
        };
        assert!(is_refusal(&e), "{e:?}");
        assert!(svc.get(&x.digest()).await.unwrap().is_none());
        assert!(svc.get(&y.digest()).await.unwrap().is_none());
    }

    pub async fn empty_closure_is_refused(svc: Arc<dyn DirectoryService>) {
        let mut p = svc.put_multiple_start();
        let e = p.close().await.unwrap_err();
        assert!(is_refusal(&e), "{e:?}");
    }

    pub async fn dangling_reference_is_refused(svc: Arc<dyn DirectoryService>) {
        let missing = leaf("m");
        let other = leaf("o");
        let root = with_children(&[("m", &missing)]);
        let mut p = svc.put_multiple_start();
        p.put(other.clone()).await.unwrap();
        let e = match p.put(root).await {
            Ok(()) => p.close().await.unwrap_err(),
            Err(e) => e,
        };
        assert!(is_refusal(&e), "{e:?}");
        assert!(svc.get(&other.digest()).await.unwrap().is_none());
    }

    pub async fn sizes_undersized_refused_oversized_accepted(svc: Arc<dyn DirectoryService>) {
        let child = leaf("c"); // size 1
        let mut under = Directory::new();
        under
            .try_insert(
                name("c"),
                Node::Directory {
                    digest: child.digest(),
                    size: 0,
                },
            )
            .unwrap();
        let mut p = svc.put_multiple_start();
        p.put(child.clone()).await.unwrap();
        let e = match p.put(under).await {
            Ok(()) => p.close().await.unwrap_err(),
            Err(e) => e,
        };
        assert!(is_refusal(&e), "{e:?}");

        let mut over = Directory::new();
        over.try_insert(
            name("c"),
            Node::Directory {
                digest: child.digest(),
                size: 2,
            },
        )
        .unwrap();
        let mut p = svc.put_multiple_start();
        p.put(child.clone()).await.unwrap();
        p.put(over.clone()).await.unwrap();
        assert_eq!(p.close().await.unwrap(), over.digest());
        let got: Vec<Directory> = svc
            .get_recursive(&over.digest())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(got, vec![over, child]);
    }

    pub async fn dropped_putter_stores_nothing(svc: Arc<dyn DirectoryService>) {
        let x = leaf("dropped");
        let mut p = svc.put_multiple_start();
        p.put(x.clone()).await.unwrap();
        drop(p);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(svc.get(&x.digest()).await.unwrap().is_none());
    }

    pub async fn names_with_any_bytes(svc: Arc<dyn DirectoryService>) {
        let mut d = Directory::new();
        let n = PathComponent::try_from(Bytes::from_static(b"\xff\x01 weird\n")).unwrap();
        d.try_insert(n, file_node(b"")).unwrap();
        let digest = svc.put(d.clone()).await.unwrap();
        assert_eq!(svc.get(&digest).await.unwrap(), Some(d));
    }
}

macro_rules! dir_suite {
    ($($backend:ident => $make:path),* $(,)?) => {$(
        mod $backend {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn absent() { let (s, _g) = $make().await; dir_tests::absent(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn put_and_get() { let (s, _g) = $make().await; dir_tests::put_and_get(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn put_with_missing_child_is_refused() { let (s, _g) = $make().await; dir_tests::put_with_missing_child_is_refused(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn closure_put_and_breadth_first_get() { let (s, _g) = $make().await; dir_tests::closure_put_and_breadth_first_get(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_roots_are_refused_and_nothing_is_stored() { let (s, _g) = $make().await; dir_tests::two_roots_are_refused_and_nothing_is_stored(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn empty_closure_is_refused() { let (s, _g) = $make().await; dir_tests::empty_closure_is_refused(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dangling_reference_is_refused() { let (s, _g) = $make().await; dir_tests::dangling_reference_is_refused(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sizes_undersized_refused_oversized_accepted() { let (s, _g) = $make().await; dir_tests::sizes_undersized_refused_oversized_accepted(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropped_putter_stores_nothing() { let (s, _g) = $make().await; dir_tests::dropped_putter_stores_nothing(s).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn names_with_any_bytes() { let (s, _g) = $make().await; dir_tests::names_with_any_bytes(s).await }
        }
    )*};
}

dir_suite!(dir_memory => memory_dirs, dir_redb => redb_dirs, dir_grpc => grpc_dirs, dir_bucket => bucket_dirs, dir_file_bucket => file_bucket_dirs);

/// A stored backend takes a parent whose child it already holds.
#[tokio::test]
async fn stored_child_may_be_referenced_by_a_later_upload() {
    for (svc, _g) in [memory_dirs().await, redb_dirs().await] {
        let child = leaf("c");
        let parent = with_children(&[("c", &child)]);
        svc.put(child).await.unwrap();
        assert_eq!(svc.put(parent.clone()).await.unwrap(), parent.digest());
    }
}

/// Over gRPC, the protocol's Put contract holds: an upload may only refer to directories
/// sent before in it. The client refuses such an upload before sending it, naming the child.
#[tokio::test]
async fn stored_child_is_not_enough_over_grpc() {
    use tvix_build_vm::castore::error::ClosureError;
    let (svc, _g) = grpc_dirs().await;
    let child = leaf("c");
    let parent = with_children(&[("c", &child)]);
    svc.put(child.clone()).await.unwrap();
    match svc.put(parent.clone()).await {
        Err(Error::InvalidClosure(ClosureError::NotInStream {
            parent: p,
            name,
            child: c,
        })) => {
            assert_eq!(
                (p, name.as_str(), c),
                (parent.digest(), "c", child.digest())
            );
        }
        other => panic!("expected the Put contract's refusal, got {other:?}"),
    }
    assert!(svc.get(&parent.digest()).await.unwrap().is_none());
    // A putter that refused stays refused: a later close cannot store what came before.
    let mut p = svc.put_multiple_start();
    let other = leaf("o");
    p.put(other.clone()).await.unwrap();
    assert!(p.put(parent.clone()).await.is_err());
    assert!(matches!(
        p.close().await,
        Err(Error::InvalidClosure(ClosureError::NotInStream { .. }))
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(svc.get(&other.digest()).await.unwrap().is_none());
    // The whole closure in one upload works.
    let mut p = svc.put_multiple_start();
    p.put(child).await.unwrap();
    p.put(parent.clone()).await.unwrap();
    assert_eq!(p.close().await.unwrap(), parent.digest());
}
