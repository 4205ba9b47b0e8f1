//! The cost of a GC of the embedded store: 100,000 small blobs in 10,000 directories, half
//! of them rooted by pins; the GC's wall time, and the longest upload latency while it runs
//! against the same without it. Long (it writes 100,000 files): ignored by default; run with
//! `cargo nextest run --run-ignored only -E 'binary(castore_gc_cost)' --no-capture`.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

use bytes::Bytes;
use std::time::{Duration, Instant};
use tvix_build_vm::castore::blob::{put_bytes, LocalBlobService};
use tvix_build_vm::castore::directory_service::RedbDirectoryService;
use tvix_build_vm::castore::gc::{self, records};
use tvix_build_vm::castore::{BlobService, Directory, DirectoryService, Node, PathComponent};

const BLOBS: usize = 100_000;
const PER_DIR: usize = 10;

/// Uploads small blobs one after another for `d`; returns the longest latency and how many.
async fn upload_for(blobs: &LocalBlobService, d: Duration, tag: &str) -> (Duration, usize) {
    let end = Instant::now() + d;
    let (mut worst, mut n) = (Duration::ZERO, 0);
    while Instant::now() < end {
        let t = Instant::now();
        put_bytes(blobs, format!("{tag} {n}").as_bytes())
            .await
            .unwrap();
        worst = worst.max(t.elapsed());
        n += 1;
    }
    (worst, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: writes 100,000 blobs (about a minute or two here)"]
async fn gc_of_100k_blobs_is_under_a_minute_and_does_not_stall_uploads() {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = LocalBlobService::open(&tmp.path().join("blobs")).unwrap();
    let dirs = RedbDirectoryService::open(&tmp.path().join("directories.redb")).unwrap();
    let src = tmp.path().join("src");
    let fill = Instant::now();
    let mut putter = dirs.put_multiple_start();
    let mut roots = Vec::new();
    let mut dir = Directory::new();
    for i in 0..BLOBS {
        let contents = format!("blob {i}");
        std::fs::write(&src, &contents).unwrap();
        let (digest, size) = blobs
            .put_file(std::fs::File::open(&src).unwrap())
            .await
            .unwrap();
        dir.try_insert(
            PathComponent::try_from(format!("f{i}").as_str()).unwrap(),
            Node::File {
                digest,
                size,
                executable: false,
            },
        )
        .unwrap();
        if dir.len() == PER_DIR {
            let full = std::mem::take(&mut dir);
            if roots.len() % 2 == 0 {
                let node = full.as_node().to_proto(Bytes::from_static(b"root"));
                records::pin(&dirs, &node, "cost test").await.unwrap();
            }
            roots.push(full.digest());
            putter.put(full).await.unwrap();
            // One closure per upload would be many small transactions; put singly instead.
            putter.close().await.unwrap();
            putter = dirs.put_multiple_start();
        }
    }
    blobs.sync().await.unwrap();
    eprintln!(
        "filled {BLOBS} blobs in {} directories in {:.1}s",
        roots.len(),
        fill.elapsed().as_secs_f64()
    );
    let options = gc::Options {
        // Not zero: an upload in flight when the GC starts is kept by its grace period.
        grace: Duration::from_secs(1),
        keep_for: Duration::from_secs(3600),
        dry_run: false,
    };

    let (idle_worst, idle_n) = upload_for(&blobs, Duration::from_secs(5), "idle").await;
    // Everything uploaded so far is past the grace period.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let gc_started = Instant::now();
    let (report, (busy_worst, busy_n)) = tokio::join!(
        gc::collect(&blobs, &dirs, options, vec![]),
        upload_for(&blobs, Duration::from_secs(5), "busy")
    );
    let report = report.unwrap();
    eprintln!(
        "gc: {:.2}s; {report:?}\nupload latency: worst {idle_worst:?} of {idle_n} without GC, \
         worst {busy_worst:?} of {busy_n} during it (started with it, {:.1}s)",
        report.seconds,
        gc_started.elapsed().as_secs_f64()
    );
    assert_eq!(report.directories_removed, (roots.len() / 2) as u64);
    assert_eq!(report.blobs_removed, (BLOBS / 2) as u64 + idle_n as u64);
    assert!(report.seconds < 60.0, "{report:?}");
}
