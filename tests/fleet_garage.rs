//! The object-store castore against a real 3-node Garage cluster (replication factor 3):
//! a tree imported and read back, reads going on with one node of three stopped, a flipped
//! byte in a chunk object refused with the digest named, and a host's chunk cache sparing
//! the bucket on a second read, and a full cache evicting to stay under its size.
//!
//! Garage is built by scripts/garage.sh on first use (about 20 minutes); set
//! `TVIX_GARAGE_BIN` to use a binary at hand.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use support::noise;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use support::garage::GarageCluster;
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec};
use tvix_build_vm::castore::objectstore::counting::CountingStore;
use tvix_build_vm::castore::objectstore::{
    Bucket, ChunkCache, ObjectStoreBlobService, ObjectStoreDirectoryService,
};
use tvix_build_vm::castore::{B3Digest, BlobService, DirectoryService};

fn services(addr: &str) -> (Arc<dyn BlobService>, Arc<dyn DirectoryService>) {
    (
        tvix_build_vm::castore::addr::blob_service_from_addr(addr).unwrap(),
        tvix_build_vm::castore::addr::directory_service_from_addr(addr).unwrap(),
    )
}

fn write_tree(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::write(root.join("small"), b"hello fleet").unwrap();
    std::fs::write(root.join("sub/large"), noise(3 << 20, 1)).unwrap();
    std::fs::write(root.join("sub/deeper/other"), noise(100_000, 2)).unwrap();
    std::os::unix::fs::symlink("../small", root.join("sub/link")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_castore_survives_a_node_down_refuses_corruption_and_caches() {
    let mut cluster = tokio::task::spawn_blocking(GarageCluster::start)
        .await
        .unwrap();

    // A tree imported through node 0's S3 endpoint and read back through node 1's.
    let src = tempfile::tempdir().unwrap();
    write_tree(&src.path().join("tree"));
    let (blobs, dirs) = services(&cluster.addr_via(0, "fleet"));
    let node = tvix_build_vm::castore::import::import_path(
        blobs.clone(),
        dirs.clone(),
        &src.path().join("tree"),
    )
    .await
    .unwrap();
    let (blobs1, dirs1) = services(&cluster.addr_via(1, "fleet"));
    let out = tempfile::tempdir().unwrap();
    tvix_build_vm::castore::export::export_node(
        blobs1.as_ref(),
        dirs1.as_ref(),
        &node,
        &out.path().join("tree"),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(out.path().join("tree/sub/large")).unwrap(),
        noise(3 << 20, 1)
    );
    assert_eq!(
        std::fs::read_link(out.path().join("tree/sub/link")).unwrap(),
        std::path::Path::new("../small")
    );

    // One node of three stopped: reads and writes through another go on.
    cluster.stop_node(2);
    let (blobs0, _) = services(&cluster.addr_via(0, "fleet"));
    let big = noise(3 << 20, 1);
    let d = B3Digest::of(&big);
    assert_eq!(
        read_to_vec(blobs0.as_ref(), &d).await.unwrap().unwrap(),
        big
    );
    let fresh = noise(1 << 20, 3);
    let fd = put_bytes(blobs0.as_ref(), &fresh).await.unwrap();
    assert_eq!(
        read_to_vec(blobs1.as_ref(), &fd).await.unwrap().unwrap(),
        fresh
    );

    // A flipped byte in a chunk object, written through the S3 API, is refused by digest.
    let bucket = Bucket::from_addr(&cluster.addr_via(0, "fleet")).unwrap();
    // Smaller than the least chunk, so the blob is one chunk under its own digest.
    let victim_data = noise(100_000, 4);
    let victim = put_bytes(blobs0.as_ref(), &victim_data).await.unwrap();
    use object_store::ObjectStoreExt;
    let key = bucket.chunk_key(&victim);
    let raw = bucket.store.get(&key).await.unwrap().bytes().await.unwrap();
    let mut plain = zstd::decode_all(&raw[..]).unwrap();
    assert_eq!(plain, victim_data);
    plain[100] ^= 1;
    bucket
        .store
        .put(&key, zstd::encode_all(&plain[..], 3).unwrap().into())
        .await
        .unwrap();
    let err = read_to_vec(blobs0.as_ref(), &victim).await.unwrap_err();
    let msg = tvix_build_vm::castore::error::error_chain(&err);
    // Named as digests are printed everywhere (b3:<base64>).
    assert!(
        msg.contains(&victim.to_string()) && msg.contains("corrupt"),
        "{msg}"
    );

    // The cache: a second read on the same host fetches no chunk from the bucket.
    let counting = Arc::new(CountingStore::new(bucket.store.clone()));
    let counts = counting.counts.clone();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(ChunkCache::open(cache_dir.path(), 64 << 20).unwrap());
    let cached = ObjectStoreBlobService::with_cache(
        Bucket::new(counting, bucket.base.clone()),
        cache.clone(),
    );
    assert_eq!(read_to_vec(&cached, &d).await.unwrap().unwrap(), big);
    let first = counts.gets.load(Ordering::Relaxed);
    assert!(
        first > 2,
        "the first read fetched chunks ({first} requests)"
    );
    assert_eq!(read_to_vec(&cached, &d).await.unwrap().unwrap(), big);
    // The index object only.
    assert_eq!(counts.gets.load(Ordering::Relaxed), first + 1);
    // Directories through the bucket, node 2 still down: the closure is there whole.
    let root = match &node {
        tvix_build_vm::castore::Node::Directory { digest, .. } => *digest,
        other => panic!("imported a directory, got {other:?}"),
    };
    let dirs_direct = ObjectStoreDirectoryService::new(bucket);
    use futures::TryStreamExt;
    let closure: Vec<_> = dirs_direct
        .get_recursive(&root)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(closure.len(), 3);

    // A full cache evicts: a cache smaller than the blob stays under its size, on disk too,
    // and still hands back the right bytes.
    let small_dir = tempfile::tempdir().unwrap();
    let limit: u64 = 1 << 20;
    let small = Arc::new(ChunkCache::open(small_dir.path(), limit).unwrap());
    let through_small = ObjectStoreBlobService::with_cache(
        Bucket::from_addr(&cluster.addr_via(1, "fleet")).unwrap(),
        small.clone(),
    );
    for _ in 0..2 {
        assert_eq!(read_to_vec(&through_small, &d).await.unwrap().unwrap(), big);
        assert!(small.used_bytes() <= limit, "{}", small.used_bytes());
        let on_disk: u64 = std::fs::read_dir(small_dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= limit, "{on_disk} bytes on disk");
        assert!(on_disk > 0, "the cache kept nothing");
    }

    cluster.restart_node(2);
}
