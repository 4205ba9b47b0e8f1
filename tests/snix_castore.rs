//! snix.castore.v1 beside tvix.castore.v1 on a real `serve`: what one package stores the
//! other reads back, the Put contract on both, health and reflection for every service; and
//! our gRPC clients against a server that speaks only snix's package (as a snix-store does).
//! The snix side uses the clients generated from protos/snix.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use bytes::Bytes;
use prost::Message;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use support::cli::Env;
use support::serve::Serve;
use tonic::Code;
use tvix_build_vm::castore::blob::{read_to_vec, GrpcBlobService, MemoryBlobService};
use tvix_build_vm::castore::channel::channel_from_addr;
use tvix_build_vm::castore::directory_service::{GrpcDirectoryService, MemoryDirectoryService};
use tvix_build_vm::castore::export::export_node;
use tvix_build_vm::castore::import::import_path;
use tvix_build_vm::castore::package::{
    PackageChannel, SnixAlias, SnixBlobService, SnixDirectoryService,
};
use tvix_build_vm::castore::{B3Digest, BlobService, DirectoryService, Node};
use tvix_build_vm::proto::{castore as tpb, snix_castore as spb};
use tvix_build_vm::server::{BlobServer, DirectoryServer};

/// A host tree with what a castore must carry: nesting, an executable, an empty file, a
/// file larger than one Read chunk, a symlink, and two identical subdirectories.
fn host_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/deep")).unwrap();
    std::fs::create_dir_all(root.join("b/deep")).unwrap();
    for d in ["a/deep", "b/deep"] {
        std::fs::write(root.join(d).join("same"), b"shared subtree").unwrap();
    }
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("a/big"), big).unwrap();
    std::os::unix::fs::symlink("../run.sh", root.join("a/link")).unwrap();
}

/// Compares two host trees: kinds, contents, executable bits, symlink targets.
fn assert_same_tree(want: &Path, got: &Path) {
    let meta = std::fs::symlink_metadata(want).unwrap();
    let got_meta = std::fs::symlink_metadata(got).unwrap();
    let ft = meta.file_type();
    if ft.is_symlink() {
        assert!(got_meta.file_type().is_symlink(), "{}", got.display());
        assert_eq!(
            std::fs::read_link(want).unwrap(),
            std::fs::read_link(got).unwrap()
        );
    } else if ft.is_file() {
        assert!(got_meta.is_file(), "{}", got.display());
        assert_eq!(std::fs::read(want).unwrap(), std::fs::read(got).unwrap());
        let exec = |m: &std::fs::Metadata| m.permissions().mode() & 0o100 != 0;
        assert_eq!(exec(&meta), exec(&got_meta), "{}", got.display());
    } else {
        assert!(got_meta.is_dir(), "{}", got.display());
        let names = |p: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let entries = names(want);
        assert_eq!(entries, names(got), "{}", got.display());
        for n in entries {
            assert_same_tree(&want.join(&n), &got.join(&n));
        }
    }
}

/// Our gRPC castore clients on `serve`'s socket, speaking `package`.
fn clients(server: &Serve, package: &str) -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>) {
    let addr = format!("grpc+unix:{}?package={package}", server.sock.display());
    let channel = channel_from_addr(&addr).unwrap();
    (
        Arc::new(GrpcBlobService::new(channel.clone())),
        Arc::new(GrpcDirectoryService::new(channel)),
    )
}

fn root_digest(node: &Node) -> B3Digest {
    match node {
        Node::Directory { digest, .. } => *digest,
        other => panic!("expected a directory, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tvix_upload_reads_back_through_snix() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    host_tree(&src);

    let (blobs, dirs) = clients(&server, "tvix");
    let root = import_path(blobs, dirs, &src).await.unwrap();
    let digest = root_digest(&root);

    // The generated snix client gets the closure: root first, each directory's digest the
    // BLAKE3 of its snix encoding, the shared subtree once.
    let mut c = spb::directory_service_client::DirectoryServiceClient::new(server.channel());
    let mut stream = c
        .get(spb::GetDirectoryRequest {
            by_what: Some(spb::get_directory_request::ByWhat::Digest(digest.into())),
            recursive: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(d) = stream.message().await.unwrap() {
        got.push(d);
    }
    assert_eq!(got.len(), 4, "root, a, b and one shared deep: {got:?}");
    assert_eq!(B3Digest::of(&got[0].encode_to_vec()), digest);
    let root_dir = &got[0];
    let names: Vec<&[u8]> = root_dir.directories.iter().map(|e| &e.name[..]).collect();
    assert_eq!(names, [&b"a"[..], b"b"]);
    let run = root_dir
        .files
        .iter()
        .find(|f| &f.name[..] == b"run.sh")
        .unwrap();
    assert!(run.executable);

    // ... and a blob through the snix BlobService.
    let mut b = spb::blob_service_client::BlobServiceClient::new(server.channel());
    let mut read = b
        .read(spb::ReadBlobRequest {
            digest: run.digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        data.extend_from_slice(&chunk.data);
    }
    assert_eq!(data, std::fs::read(src.join("run.sh")).unwrap());

    // The whole tree through our clients speaking snix.castore.v1.
    let (blobs, dirs) = clients(&server, "snix");
    let out = tmp.path().join("out");
    export_node(blobs.as_ref(), dirs.as_ref(), &root, &out)
        .await
        .unwrap();
    assert_same_tree(&src, &out);
}

#[tokio::test(flavor = "multi_thread")]
async fn snix_upload_reads_back_through_tvix() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);

    // Blobs through the generated snix client, one in several chunks.
    let mut b = spb::blob_service_client::BlobServiceClient::new(server.channel());
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 239) as u8).collect();
    let put = |data: Vec<u8>| {
        let chunks: Vec<spb::BlobChunk> = data
            .chunks(200_000)
            .map(|c| spb::BlobChunk {
                data: Bytes::copy_from_slice(c),
            })
            .collect();
        let mut b = b.clone();
        async move {
            let r = b.put(futures::stream::iter(chunks)).await.unwrap();
            let digest = B3Digest::of(&data);
            assert_eq!(r.into_inner().digest, Bytes::from(digest));
            digest
        }
    };
    let big_digest = put(big.clone()).await;
    let small_digest = put(b"small".to_vec()).await;
    b.stat(spb::StatBlobRequest {
        digest: big_digest.into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // A closure through the generated snix client, leaves first.
    let file = |name: &str, digest: B3Digest, size: u64, executable: bool| spb::FileEntry {
        name: Bytes::copy_from_slice(name.as_bytes()),
        digest: digest.into(),
        size,
        executable,
    };
    let sub = spb::Directory {
        files: vec![file("small", small_digest, 5, false)],
        ..Default::default()
    };
    let root = spb::Directory {
        directories: vec![spb::DirectoryEntry {
            name: "sub".into(),
            digest: B3Digest::of(&sub.encode_to_vec()).into(),
            size: 1,
        }],
        files: vec![file("big", big_digest, big.len() as u64, true)],
        symlinks: vec![spb::SymlinkEntry {
            name: "to-small".into(),
            target: "sub/small".into(),
        }],
    };
    let root_digest = B3Digest::of(&root.encode_to_vec());
    let mut d = spb::directory_service_client::DirectoryServiceClient::new(server.channel());
    let r = d
        .put(futures::stream::iter([sub.clone(), root.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.root_digest, Bytes::from(root_digest));

    // The generated tvix client reads the very same bytes back.
    let mut t = tpb::directory_service_client::DirectoryServiceClient::new(server.channel());
    let mut stream = t
        .get(tpb::GetDirectoryRequest {
            by_what: Some(tpb::get_directory_request::ByWhat::Digest(
                root_digest.into(),
            )),
            recursive: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(dir) = stream.message().await.unwrap() {
        got.push(dir.encode_to_vec());
    }
    assert_eq!(got, [root.encode_to_vec(), sub.encode_to_vec()]);

    // And our clients speaking tvix.castore.v1 export it.
    let (blobs, dirs) = clients(&server, "tvix");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let node = Node::Directory {
        digest: root_digest,
        size: 3,
    };
    export_node(blobs.as_ref(), dirs.as_ref(), &node, &out)
        .await
        .unwrap();
    assert_eq!(std::fs::read(out.join("big")).unwrap(), big);
    assert_ne!(
        std::fs::metadata(out.join("big"))
            .unwrap()
            .permissions()
            .mode()
            & 0o100,
        0
    );
    assert_eq!(std::fs::read(out.join("sub/small")).unwrap(), b"small");
    assert_eq!(
        std::fs::read_link(out.join("to-small")).unwrap(),
        Path::new("sub/small")
    );
    assert_eq!(
        read_to_vec(blobs.as_ref(), &small_digest).await.unwrap(),
        Some(b"small".to_vec())
    );
}

/// The Put contract, with one package's generated directory client: a directory may only
/// refer to directories sent before it in the same stream.
macro_rules! put_contract {
    ($channel:expr, $pb:ident, $dir_entry:ident, $file_entry:ident) => {{
        let mut c = $pb::directory_service_client::DirectoryServiceClient::new($channel);
        let child = $pb::Directory {
            files: vec![$pb::$file_entry {
                name: "f".into(),
                digest: B3Digest::of(b"f").into(),
                size: 1,
                executable: false,
            }],
            ..Default::default()
        };
        let child_digest = B3Digest::of(&child.encode_to_vec());
        let root = $pb::Directory {
            directories: vec![$pb::$dir_entry {
                name: "child".into(),
                digest: child_digest.into(),
                size: 1,
            }],
            ..Default::default()
        };
        let root_digest = B3Digest::of(&root.encode_to_vec());
        let get_root = $pb::GetDirectoryRequest {
            by_what: Some($pb::get_directory_request::ByWhat::Digest(
                root_digest.into(),
            )),
            recursive: false,
        };

        // The child alone is a closure of its own: stored.
        let r = c.put(futures::stream::iter([child.clone()])).await.unwrap();
        assert_eq!(r.into_inner().root_digest, Bytes::from(child_digest));
        // A root whose child came in that earlier stream is refused, naming the child.
        let e = c
            .put(futures::stream::iter([root.clone()]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(&child_digest.to_string())
                && e.message().contains("not sent before it"),
            "{}",
            e.message()
        );
        let e = c.get(get_root.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        // Both in one stream: stored.
        let r = c
            .put(futures::stream::iter([child.clone(), root.clone()]))
            .await
            .unwrap();
        assert_eq!(r.into_inner().root_digest, Bytes::from(root_digest));
        c.get(get_root).await.unwrap();
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn put_contract_on_both_packages() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    put_contract!(server.channel(), tpb, DirectoryNode, FileNode);
    // A fresh server, so that nothing the tvix half stored helps.
    let server = Serve::start(
        &env,
        &[
            "--blob-service-addr",
            "memory:",
            "--directory-service-addr",
            "memory:",
        ],
    );
    put_contract!(server.channel(), spb, DirectoryEntry, FileEntry);
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_what_health_reports_serving() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    support::serve::assert_listed_and_serving(server.channel(), support::serve::SERVED_BY_DEFAULT)
        .await;
}

/// Our clients against a server that answers only snix.castore.v1, as a snix-store does.
#[tokio::test(flavor = "multi_thread")]
async fn our_clients_against_a_snix_only_server() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("snix-only.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let blob_server = tpb::blob_service_server::BlobServiceServer::new(BlobServer::new(Arc::new(
        MemoryBlobService::new(),
    )));
    let dir_server = tpb::directory_service_server::DirectoryServiceServer::new(
        DirectoryServer::new(Arc::new(MemoryDirectoryService::new())),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SnixAlias::<_, SnixBlobService>::new(blob_server))
            .add_service(SnixAlias::<_, SnixDirectoryService>::new(dir_server))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    // Speaking tvix's package, the error says how to pick snix's.
    let tvix: PackageChannel = channel_from_addr(&format!("grpc+unix:{}", sock.display())).unwrap();
    let e = GrpcBlobService::new(tvix)
        .has(&B3Digest::of(b"x"))
        .await
        .unwrap_err();
    let msg = tvix_build_vm::castore::error::error_chain(&e);
    assert!(msg.contains("?package=snix"), "{msg}");

    // With ?package=snix, both services work.
    let snix = channel_from_addr(&format!("grpc+unix:{}?package=snix", sock.display())).unwrap();
    let blobs = GrpcBlobService::new(snix.clone());
    let digest = tvix_build_vm::castore::blob::put_bytes(&blobs, b"through snix")
        .await
        .unwrap();
    assert_eq!(
        read_to_vec(&blobs, &digest).await.unwrap(),
        Some(b"through snix".to_vec())
    );
    let dirs = GrpcDirectoryService::new(snix);
    let src = tmp.path().join("src");
    host_tree(&src);
    let root = import_path(Arc::new(blobs.clone()), Arc::new(dirs.clone()), &src)
        .await
        .unwrap();
    let out = tmp.path().join("out");
    export_node(&blobs, &dirs, &root, &out).await.unwrap();
    assert_same_tree(&src, &out);
}
