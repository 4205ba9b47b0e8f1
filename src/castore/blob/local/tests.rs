#![allow(
    clippy::unwrap_used,
    reason = "tests: any failure should fail the test"
)]

use super::*;
use crate::castore::blob::read_to_vec;

fn source(dir: &Path, name: &str, data: &[u8]) -> std::fs::File {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::File::open(p).unwrap()
}

fn tmp_count(store: &LocalBlobService) -> usize {
    std::fs::read_dir(store.tmp_dir()).unwrap().count()
}

/// Not large enough to be interesting, but several copy chunks and hashed with rayon.
fn big() -> Vec<u8> {
    (0..COPY_CHUNK * 2 + 12_345)
        .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
        .collect()
}

#[tokio::test]
async fn put_file_is_invisible_until_sync_then_complete() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let data = big();
    let (digest, size) = store
        .put_file(source(dir.path(), "src", &data))
        .await
        .unwrap();
    assert_eq!(digest, B3Digest::of(&data));
    assert_eq!(size, data.len() as u64);
    // Queued: complete in tmp/, but no name yet.
    assert!(!store.blob_path(&digest).exists());
    assert!(!store.has(&digest).await.unwrap());
    assert_eq!(store.unsynced(), 1);
    assert_eq!(tmp_count(&store), 1);

    store.sync().await.unwrap();
    assert_eq!(store.unsynced(), 0);
    assert_eq!(tmp_count(&store), 0);
    assert!(store.has(&digest).await.unwrap());
    assert_eq!(read_to_vec(&store, &digest).await.unwrap().unwrap(), data);
    // Nothing left to do.
    store.sync().await.unwrap();
}

#[tokio::test]
async fn put_file_reads_from_the_current_position() {
    use std::io::{Seek, SeekFrom};
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let mut f = source(dir.path(), "src", b"skip this|keep this");
    f.seek(SeekFrom::Start(10)).unwrap();
    let (digest, size) = store.put_file(f).await.unwrap();
    assert_eq!((digest, size), (B3Digest::of(b"keep this"), 9));
    store.sync().await.unwrap();
    assert_eq!(
        read_to_vec(&store, &digest).await.unwrap().unwrap(),
        b"keep this"
    );
}

#[tokio::test]
async fn a_present_blob_is_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let digest = crate::castore::blob::put_bytes(&store, b"already here")
        .await
        .unwrap();
    let (again, _) = store
        .put_file(source(dir.path(), "src", b"already here"))
        .await
        .unwrap();
    assert_eq!(again, digest);
    assert_eq!(store.unsynced(), 0);
    assert_eq!(tmp_count(&store), 0);
    store.sync().await.unwrap();
}

#[tokio::test]
async fn many_files_from_concurrent_callers_are_all_there_after_each_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let store = store.clone();
        let src = dir.path().to_owned();
        tasks.push(tokio::spawn(async move {
            let mut digests = Vec::new();
            for i in 0..50u32 {
                let data = format!("task {t} file {i}").into_bytes();
                let f = source(&src, &format!("{t}-{i}"), &data);
                digests.push((store.put_file(f).await.unwrap().0, data));
            }
            store.sync().await.unwrap();
            // Whatever the other callers' syncs took, ours returned only once ours are in.
            for (d, data) in digests {
                assert_eq!(read_to_vec(&store, &d).await.unwrap().unwrap(), data);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.unsynced(), 0);
    assert_eq!(tmp_count(&store), 0);
}

#[tokio::test]
async fn a_failed_sync_exposes_nothing_and_breaks_the_store_handle() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let (digest, _) = store
        .put_file(source(dir.path(), "src", b"will be lost"))
        .await
        .unwrap();
    // Lose the queued contents, as if they could not be written.
    for e in std::fs::read_dir(store.tmp_dir()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let err = store.sync().await.unwrap_err();
    assert!(err.to_string().contains("syncing blob contents"), "{err}");
    assert!(!store.has(&digest).await.unwrap());

    // Every later put_file and sync of this handle (and its clones) fails, naming why.
    let clone = store.clone();
    let later = clone.sync().await.unwrap_err();
    let chain = format!("{:?}", later);
    assert!(chain.contains("syncing blob contents"), "{chain}");
    assert!(clone
        .put_file(source(dir.path(), "src2", b"more"))
        .await
        .is_err());
    // A fresh handle on the same directory works.
    let reopened = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let (d2, _) = reopened
        .put_file(source(dir.path(), "src3", b"fresh"))
        .await
        .unwrap();
    reopened.sync().await.unwrap();
    assert!(reopened.has(&d2).await.unwrap());
}

#[tokio::test]
async fn dropping_the_store_deletes_unsynced_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let tmp = store.tmp_dir();
    store
        .put_file(source(dir.path(), "src", b"never synced"))
        .await
        .unwrap();
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 1);
    drop(store);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}

#[tokio::test]
async fn has_marks_the_shard_for_the_next_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
    let digest = crate::castore::blob::put_bytes(&store, b"x").await.unwrap();
    assert!(store.pending.marked().is_empty());
    assert!(store.has(&digest).await.unwrap());
    assert!(store.pending.marked().contains(&shard_of(&digest)));
    store.sync().await.unwrap();
    assert!(store.pending.marked().is_empty());
}

#[test]
fn in_parallel_covers_every_item_and_reports_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..100 {
        let p = dir.path().join(format!("f{i}"));
        std::fs::write(&p, b"x").unwrap();
        paths.push(p);
    }
    let seen = std::sync::Mutex::new(Vec::new());
    pending::in_parallel(paths.clone(), |p| {
        pending::fsync_file(&p)?;
        seen.lock().unwrap().push(p);
        Ok::<(), io::Error>(())
    })
    .unwrap();
    let mut seen = seen.into_inner().unwrap();
    seen.sort();
    let mut want = paths.clone();
    want.sort();
    assert_eq!(seen, want);

    let missing = dir.path().join("missing");
    let mut with_missing = paths;
    with_missing.insert(50, missing.clone());
    let err = pending::in_parallel(with_missing, |p| {
        pending::fsync_file(&p).map_err(|e| (p, e))
    })
    .unwrap_err();
    assert_eq!(err.0, missing);
    assert_eq!(err.1.kind(), io::ErrorKind::NotFound);
}
