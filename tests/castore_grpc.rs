//! gRPC round trips over a real unix socket, with the raw generated clients, checking the
//! status code of every error tvix relies on.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use bytes::Bytes;
use pb::blob_service_client::BlobServiceClient;
use pb::directory_service_client::DirectoryServiceClient;
use prost::Message;
use std::sync::Arc;
use tonic::Code;
use tvix_build_vm::castore::blob::MemoryBlobService;
use tvix_build_vm::castore::channel::channel_from_addr;
use tvix_build_vm::castore::directory_service::MemoryDirectoryService;
use tvix_build_vm::castore::package::PackageChannel;
use tvix_build_vm::castore::{B3Digest, Directory, Node, PathComponent};
use tvix_build_vm::proto::castore as pb;
use tvix_build_vm::server::{self, ListenAddr, Listener};

struct Fixture {
    channel: PackageChannel,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
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
    let channel = channel_from_addr(&format!("grpc+unix://{}", sock.display())).unwrap();
    Fixture {
        channel,
        _dir: dir,
        _stop: tx,
    }
}

fn stat(digest: Bytes) -> pb::StatBlobRequest {
    pb::StatBlobRequest {
        digest,
        ..Default::default()
    }
}

#[tokio::test]
async fn blob_status_codes() {
    let f = fixture().await;
    let mut c = BlobServiceClient::new(f.channel.clone());
    let absent: Bytes = B3Digest::of(b"absent").into();

    let e = c
        .stat(stat(Bytes::from_static(b"short")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.stat(stat(absent.clone())).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .read(pb::ReadBlobRequest {
            digest: Bytes::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .read(pb::ReadBlobRequest { digest: absent })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn blob_put_stat_read_round_trip() {
    let f = fixture().await;
    let mut c = BlobServiceClient::new(f.channel.clone());

    // An empty stream stores the empty blob.
    let r = c.put(futures::stream::empty()).await.unwrap().into_inner();
    assert_eq!(r.digest, Bytes::from(B3Digest::of(b"")));

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let chunks: Vec<pb::BlobChunk> = data
        .chunks(700_000)
        .map(|c| pb::BlobChunk {
            data: Bytes::copy_from_slice(c),
        })
        .collect();
    let r = c
        .put(futures::stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    let digest = B3Digest::of(&data);
    assert_eq!(r.digest, Bytes::from(digest));

    let s = c.stat(stat(digest.into())).await.unwrap().into_inner();
    assert!(s.chunks.is_empty() && s.bao.is_empty());

    let mut stream = c
        .read(pb::ReadBlobRequest {
            digest: digest.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut messages = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(chunk.data.len() <= server::blob::READ_CHUNK);
        got.extend_from_slice(&chunk.data);
        messages += 1;
    }
    assert!(messages > 1);
    assert_eq!(got, data);
}

fn get(digest: Option<Bytes>, recursive: bool) -> pb::GetDirectoryRequest {
    pb::GetDirectoryRequest {
        by_what: digest.map(pb::get_directory_request::ByWhat::Digest),
        recursive,
    }
}

fn file(name: &str) -> pb::FileNode {
    pb::FileNode {
        name: Bytes::copy_from_slice(name.as_bytes()),
        digest: B3Digest::of(name.as_bytes()).into(),
        size: name.len() as u64,
        executable: false,
    }
}

fn dir_node(name: &str, d: &pb::Directory, size: u64) -> pb::DirectoryNode {
    pb::DirectoryNode {
        name: Bytes::copy_from_slice(name.as_bytes()),
        digest: B3Digest::of(&d.encode_to_vec()).into(),
        size,
    }
}

async fn put_dirs(
    c: &mut DirectoryServiceClient<PackageChannel>,
    dirs: Vec<pb::Directory>,
) -> Result<pb::PutDirectoryResponse, tonic::Status> {
    c.put(futures::stream::iter(dirs))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn directory_status_codes() {
    let f = fixture().await;
    let mut c = DirectoryServiceClient::new(f.channel.clone());
    let absent: Bytes = B3Digest::of(b"absent").into();

    for recursive in [false, true] {
        let e = c.get(get(None, recursive)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .get(get(Some(Bytes::from_static(b"x")), recursive))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .get(get(Some(absent.clone()), recursive))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }

    let e = put_dirs(&mut c, vec![]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // An invalid name, named in the message.
    let bad = pb::Directory {
        files: vec![file("bad/name")],
        ..Default::default()
    };
    let e = put_dirs(&mut c, vec![bad]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("bad/name"), "{}", e.message());

    // Wrong sorting, named in the message.
    let unsorted = pb::Directory {
        files: vec![file("zz"), file("aa")],
        ..Default::default()
    };
    let e = put_dirs(&mut c, vec![unsorted]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("aa"), "{}", e.message());

    // A dangling reference.
    let child = pb::Directory {
        files: vec![file("c")],
        ..Default::default()
    };
    let parent = pb::Directory {
        directories: vec![dir_node("child", &child, 1)],
        ..Default::default()
    };
    let e = put_dirs(&mut c, vec![parent.clone()]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Two roots.
    let other = pb::Directory {
        files: vec![file("o")],
        ..Default::default()
    };
    let e = put_dirs(&mut c, vec![child.clone(), other])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // An undersized DirectoryNode.size.
    let under = pb::Directory {
        directories: vec![dir_node("child", &child, 0)],
        ..Default::default()
    };
    let e = put_dirs(&mut c, vec![child.clone(), under])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Nothing of the refused uploads is visible.
    let e = c
        .get(get(
            Some(B3Digest::of(&child.encode_to_vec()).into()),
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn directory_put_and_recursive_get() {
    let f = fixture().await;
    let mut c = DirectoryServiceClient::new(f.channel.clone());
    let leaf = pb::Directory {
        files: vec![file("f")],
        ..Default::default()
    };
    let mid = pb::Directory {
        directories: vec![dir_node("leaf", &leaf, 1)],
        ..Default::default()
    };
    // tvix 2024-08+ sends larger sizes: accepted.
    let root = pb::Directory {
        directories: vec![dir_node("a", &mid, 2), dir_node("b", &leaf, 7)],
        ..Default::default()
    };
    let r = put_dirs(
        &mut c,
        vec![leaf.clone(), mid.clone(), leaf.clone(), root.clone()],
    )
    .await
    .unwrap();
    let root_digest = B3Digest::of(&root.encode_to_vec());
    assert_eq!(r.root_digest, Bytes::from(root_digest));

    let mut s = c
        .get(get(Some(root_digest.into()), true))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(d) = s.message().await.unwrap() {
        got.push(d);
    }
    assert_eq!(got, vec![root.clone(), mid, leaf]);

    let mut s = c
        .get(get(Some(root_digest.into()), false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap(), Some(root));
    assert_eq!(s.message().await.unwrap(), None);
}

#[tokio::test]
async fn health_and_reflection() {
    let f = fixture().await;
    // Castore only: the build services are neither served nor listed.
    support::serve::assert_listed_and_serving(
        f.channel.clone(),
        &[
            "tvix.castore.v1.BlobService",
            "tvix.castore.v1.DirectoryService",
            "snix.castore.v1.BlobService",
            "snix.castore.v1.DirectoryService",
            "tvixbuildvm.store.v1.PinService",
        ],
    )
    .await;
    // Listed always; without an embedded store (this one is in memory) it says why not.
    use tvix_build_vm::proto::pins as pins_pb;
    let mut pins = pins_pb::pin_service_client::PinServiceClient::new(f.channel.clone());
    let e = pins.list(pins_pb::ListPinsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("embedded store"), "{e:?}");
}

#[tokio::test]
async fn tcp_listener_and_typed_clients() {
    let router = server::router(
        Arc::new(MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
    )
    .await
    .unwrap();
    let listener = Listener::bind(&"127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server::serve(router, listener, async move {
        let _ = rx.await;
    }));
    let addr = format!("grpc+http://127.0.0.1:{port}");
    let blobs = tvix_build_vm::castore::addr::blob_service_from_addr(&addr).unwrap();
    let dirs = tvix_build_vm::castore::addr::directory_service_from_addr(&addr).unwrap();
    let d = tvix_build_vm::castore::blob::put_bytes(blobs.as_ref(), b"over tcp")
        .await
        .unwrap();
    assert!(blobs.has(&d).await.unwrap());
    let mut dir = Directory::new();
    dir.try_insert(
        PathComponent::try_from("f").unwrap(),
        Node::File {
            digest: d,
            size: 8,
            executable: true,
        },
    )
    .unwrap();
    assert_eq!(dirs.put(dir.clone()).await.unwrap(), dir.digest());
    tx.send(()).unwrap();
    served.await.unwrap().unwrap();
}

#[test]
fn listen_addresses_parse() {
    assert_eq!(
        "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
        ListenAddr::Unix("/run/x.sock".into())
    );
    assert!(matches!(
        "[::]:8000".parse::<ListenAddr>().unwrap(),
        ListenAddr::Tcp(_)
    ));
    for bad in ["unix:rel.sock", "localhost", "host:port", ""] {
        let e = bad.parse::<ListenAddr>().unwrap_err().to_string();
        assert!(e.contains(&format!("{bad:?}")), "{e}");
    }
}

/// A directory server that answers every Get with a fixed list, to feed the client
/// streams a correct server never sends.
struct Scripted(Vec<pb::Directory>);

#[tonic::async_trait]
impl pb::directory_service_server::DirectoryService for Scripted {
    type GetStream = futures::stream::BoxStream<'static, Result<pb::Directory, tonic::Status>>;
    async fn get(
        &self,
        _: tonic::Request<pb::GetDirectoryRequest>,
    ) -> Result<tonic::Response<Self::GetStream>, tonic::Status> {
        use futures::StreamExt;
        Ok(tonic::Response::new(
            futures::stream::iter(self.0.clone().into_iter().map(Ok)).boxed(),
        ))
    }
    async fn put(
        &self,
        _: tonic::Request<tonic::Streaming<pb::Directory>>,
    ) -> Result<tonic::Response<pb::PutDirectoryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("scripted"))
    }
}

async fn scripted_client(
    dirs: Vec<pb::Directory>,
) -> (
    Arc<dyn tvix_build_vm::castore::DirectoryService>,
    tempfile::TempDir,
) {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("scripted.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::directory_service_server::DirectoryServiceServer::new(
                Scripted(dirs),
            ))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let svc = tvix_build_vm::castore::addr::directory_service_from_addr(&format!(
        "grpc+unix://{}",
        sock.display()
    ))
    .unwrap();
    (svc, tmp)
}

#[tokio::test]
async fn grpc_client_rejects_bad_closures() {
    use futures::TryStreamExt;
    use tvix_build_vm::castore::error::ClosureError;
    use tvix_build_vm::castore::Error;
    let leaf = pb::Directory {
        files: vec![file("f")],
        ..Default::default()
    };
    let other = pb::Directory {
        files: vec![file("g")],
        ..Default::default()
    };
    let root = pb::Directory {
        directories: vec![dir_node("a", &leaf, 1)],
        ..Default::default()
    };
    let root_digest = B3Digest::of(&root.encode_to_vec());
    let leaf_digest = B3Digest::of(&leaf.encode_to_vec());
    let other_digest = B3Digest::of(&other.encode_to_vec());

    let cases: Vec<(Vec<pb::Directory>, ClosureError)> = vec![
        (
            vec![root.clone(), leaf.clone(), leaf.clone()],
            ClosureError::Repeated(leaf_digest),
        ),
        (
            vec![root.clone(), other.clone()],
            ClosureError::Unexpected(other_digest),
        ),
        (vec![root.clone()], ClosureError::Missing(leaf_digest)),
        (vec![leaf.clone()], ClosureError::Unexpected(leaf_digest)),
    ];
    for (script, want) in cases {
        let (svc, _tmp) = scripted_client(script).await;
        let r: Result<Vec<_>, Error> = svc.get_recursive(&root_digest).try_collect().await;
        match r {
            Err(Error::InvalidClosure(got)) => assert_eq!(got, want),
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }

    // An invalid directory is refused, naming the entry.
    let bad = pb::Directory {
        files: vec![file("x"), file("a")],
        ..Default::default()
    };
    let (svc, _tmp) = scripted_client(vec![bad.clone()]).await;
    let bad_digest = B3Digest::of(&bad.encode_to_vec());
    let e = svc.get(&bad_digest).await.unwrap_err();
    assert!(matches!(e, Error::InvalidDirectory { .. }), "{e:?}");

    // A plain get answered with a different directory is refused.
    let (svc, _tmp) = scripted_client(vec![other]).await;
    let e = svc.get(&leaf_digest).await.unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
}
