//! `objectstore+file:` is snix's bucket layout in a local directory: blobs and directories
//! written through it lie on disk where a snix-store looks for them (blob index objects,
//! zstd chunks, directory closures), both spellings name the same directory, and the
//! whole-bucket check of tests/support/bucket.rs accepts what was written and refuses each
//! kind of partial or broken object (proved on corrupted copies).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use support::noise;

use prost::Message;
use std::path::{Path, PathBuf};
use support::bucket::{check_whole, Summary};
use tvix_build_vm::castore::addr::{blob_service_from_addr, directory_service_from_addr};
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec};
use tvix_build_vm::castore::objectstore::Bucket;
use tvix_build_vm::castore::{B3Digest, Node};
use tvix_build_vm::proto::tvix::castore::v1 as pb;

/// Where snix keeps an object of `kind` for `digest` under `root`.
fn object_path(root: &Path, kind: &str, digest: &B3Digest) -> PathBuf {
    let hex = digest.to_hex();
    root.join(kind).join("b3").join(&hex[..4]).join(&hex)
}

fn unzstd(path: &Path) -> Vec<u8> {
    zstd::decode_all(&std::fs::read(path).unwrap()[..]).unwrap()
}

/// A tree imported through `objectstore+file://<dir>/bucket` (tvix's spelling): a
/// one-chunk file, a file of several chunks, a subdirectory, a symlink. Returns the
/// temporary directory, the bucket's directory and the root directory's digest.
async fn import_tree() -> (tempfile::TempDir, PathBuf, B3Digest) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bucket");
    let t = dir.path().join("tree");
    std::fs::create_dir_all(t.join("sub")).unwrap();
    std::fs::write(t.join("small"), b"hello snix").unwrap();
    std::fs::write(t.join("sub/large"), noise(2 << 20, 1)).unwrap();
    std::os::unix::fs::symlink("../small", t.join("sub/link")).unwrap();
    let addr = format!("objectstore+file://{}", root.display());
    let node = tvix_build_vm::castore::import::import_path(
        blob_service_from_addr(&addr).unwrap(),
        directory_service_from_addr(&addr).unwrap(),
        &t,
    )
    .await
    .unwrap();
    let Node::Directory { digest, .. } = node else {
        panic!("imported a directory, got {node:?}");
    };
    (dir, root, digest)
}

#[tokio::test]
async fn objectstore_file_writes_snix_bucket_layout_on_disk() {
    let (dir, root, top) = import_tree().await;

    // The one-chunk blob: its chunk under its own digest, an index listing nothing.
    let small = B3Digest::of(b"hello snix");
    assert_eq!(unzstd(&object_path(&root, "chunks", &small)), b"hello snix");
    let index = pb::StatBlobResponse::decode(
        &std::fs::read(object_path(&root, "blobs", &small)).unwrap()[..],
    )
    .unwrap();
    assert!(index.chunks.is_empty(), "{index:?}");

    // The large blob: an index whose chunk files concatenate to the content.
    let large = noise(2 << 20, 1);
    let index = pb::StatBlobResponse::decode(
        &std::fs::read(object_path(&root, "blobs", &B3Digest::of(&large))).unwrap()[..],
    )
    .unwrap();
    assert!(index.chunks.len() > 1, "{} chunks", index.chunks.len());
    let mut joined = Vec::new();
    for c in &index.chunks {
        let d = B3Digest::try_from(&c.digest[..]).unwrap();
        let chunk = unzstd(&object_path(&root, "chunks", &d));
        assert_eq!(chunk.len() as u64, c.size);
        joined.extend(chunk);
    }
    assert_eq!(joined, large);

    // The root's closure: one zstd object of u32-framed Directories, root first.
    let plain = unzstd(&object_path(&root, "dirs", &top));
    let len = u32::from_be_bytes(plain[..4].try_into().unwrap()) as usize;
    let first = pb::Directory::decode(&plain[4..4 + len]).unwrap();
    let first = tvix_build_vm::castore::Directory::try_from(first).unwrap();
    assert_eq!(first.digest(), top);
    assert!(plain.len() > 4 + len, "the subdirectory follows the root");

    // snix's one-slash spelling opens the same directory and reads it all back.
    let snix_addr = format!("objectstore+file:{}", root.display());
    let blobs = blob_service_from_addr(&snix_addr).unwrap();
    assert_eq!(
        read_to_vec(blobs.as_ref(), &B3Digest::of(&large))
            .await
            .unwrap()
            .unwrap(),
        large
    );
    let out = dir.path().join("out");
    tvix_build_vm::castore::export::export_node(
        blobs.as_ref(),
        directory_service_from_addr(&snix_addr).unwrap().as_ref(),
        &Node::Directory {
            digest: top,
            size: 0,
        },
        &out,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(out.join("sub/large")).unwrap(), large);

    // Nothing of our own blob-file layout was made there.
    let mut top_level: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top_level.sort();
    assert_eq!(top_level, ["blobs", "chunks", "dirs"]);
}

/// A copy of the bucket directory at `root`, in `into`, and the bucket there.
fn copy_bucket(root: &Path, into: &Path) -> Bucket {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(root)
        .arg(into)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", root.display(), into.display());
    Bucket::from_addr(&format!("objectstore+file://{}", into.display())).unwrap()
}

/// The problems the check finds in `bucket`; fails if it finds none.
async fn problems(bucket: &Bucket, case: &str) -> String {
    match check_whole(bucket).await {
        Ok(s) => panic!("{case}: the broken bucket passed the check: {s:?}"),
        Err(p) => p.join("\n"),
    }
}

#[tokio::test]
async fn whole_bucket_check_refuses_every_kind_of_partial_object() {
    let (dir, root, top) = import_tree().await;
    let large = B3Digest::of(&noise(2 << 20, 1));
    let small = B3Digest::of(b"hello snix");

    let whole = Bucket::from_addr(&format!("objectstore+file://{}", root.display())).unwrap();
    let summary = check_whole(&whole).await.unwrap();
    // Two closures (the root's and the subdirectory's), two blobs, no stray chunk.
    assert_eq!(summary.closures, 2, "{summary:?}");
    assert_eq!(summary.blobs, 2, "{summary:?}");
    assert_eq!(summary.unindexed_chunks, 0, "{summary:?}");
    assert!(summary.chunks > 2, "{summary:?}");

    // A writer killed after its chunks and before its index: allowed, and counted.
    let blobs = blob_service_from_addr(&format!("objectstore+file://{}", root.display())).unwrap();
    let orphan = noise(1 << 20, 9);
    let d = put_bytes(blobs.as_ref(), &orphan).await.unwrap();
    std::fs::remove_file(object_path(&root, "blobs", &d)).unwrap();
    let after: Summary = check_whole(&whole).await.unwrap();
    assert!(after.unindexed_chunks > 1, "{after:?}");
    assert_eq!(after.blobs, 2, "{after:?}");

    let mut n = 0;
    let mut case = |f: &dyn Fn(&Path)| {
        n += 1;
        let copy = dir.path().join(format!("copy{n}"));
        let bucket = copy_bucket(&root, &copy);
        f(&copy);
        bucket
    };

    // A chunk an index lists, missing.
    let listed_chunk = {
        let index = pb::StatBlobResponse::decode(
            &std::fs::read(object_path(&root, "blobs", &large)).unwrap()[..],
        )
        .unwrap();
        B3Digest::try_from(&index.chunks[1].digest[..]).unwrap()
    };
    let b = case(&|c| std::fs::remove_file(object_path(c, "chunks", &listed_chunk)).unwrap());
    let p = problems(&b, "missing chunk").await;
    assert!(
        p.contains(&format!("chunk {listed_chunk} is missing")),
        "{p}"
    );

    // A chunk cut short (half written): does not decompress.
    let b = case(&|c| {
        let f = object_path(c, "chunks", &listed_chunk);
        let raw = std::fs::read(&f).unwrap();
        std::fs::write(&f, &raw[..raw.len() / 2]).unwrap();
    });
    let p = problems(&b, "truncated chunk").await;
    assert!(
        p.contains(&listed_chunk.to_hex()) && p.contains("zstd"),
        "{p}"
    );

    // A chunk whose content is not its digest's (validly compressed).
    let b = case(&|c| {
        let f = object_path(c, "chunks", &listed_chunk);
        let mut plain = unzstd(&f);
        plain[7] ^= 1;
        std::fs::write(&f, zstd::encode_all(&plain[..], 3).unwrap()).unwrap();
    });
    let p = problems(&b, "flipped chunk").await;
    assert!(p.contains("does not hash to its key"), "{p}");

    // A directory closure cut short.
    let b = case(&|c| {
        let f = object_path(c, "dirs", &top);
        let plain = unzstd(&f);
        let cut = zstd::encode_all(&plain[..plain.len() - 3], 3).unwrap();
        std::fs::write(&f, cut).unwrap();
    });
    let p = problems(&b, "truncated closure").await;
    assert!(p.contains(&top.to_hex()) && p.contains("frame"), "{p}");

    // A closure that names a file whose blob is gone (index and its one chunk).
    let b = case(&|c| {
        std::fs::remove_file(object_path(c, "blobs", &small)).unwrap();
        std::fs::remove_file(object_path(c, "chunks", &small)).unwrap();
    });
    let p = problems(&b, "closure naming a missing blob").await;
    assert!(p.contains(&format!("blob {small}")), "{p}");

    // A closure object missing its subdirectory: only the root's frame kept.
    let b = case(&|c| {
        let f = object_path(c, "dirs", &top);
        let plain = unzstd(&f);
        let len = u32::from_be_bytes(plain[..4].try_into().unwrap()) as usize;
        std::fs::write(&f, zstd::encode_all(&plain[..4 + len], 3).unwrap()).unwrap();
    });
    let p = problems(&b, "closure without its subdirectory").await;
    assert!(p.contains("is not in the closure"), "{p}");

    // A stray object in the layout's space.
    let b = case(&|c| std::fs::write(c.join("blobs/b3/partial.tmp"), b"x").unwrap());
    let p = problems(&b, "stray object").await;
    assert!(p.contains("not an object of the layout"), "{p}");
}
