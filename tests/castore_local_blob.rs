//! Crash safety of the on-disk blob store: a name under the store only ever holds complete
//! contents with that digest, whatever happens to a writer.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tvix_build_vm::castore::blob::{read_to_vec, LocalBlobService};
use tvix_build_vm::castore::{B3Digest, BlobService};

/// Every file under the store outside `tmp/`, which must be named by its own digest.
fn check_blobs_match_names(root: &Path) -> usize {
    let mut n = 0;
    for shard in std::fs::read_dir(root).unwrap() {
        let shard = shard.unwrap();
        if shard.file_name() == "tmp" {
            continue;
        }
        for blob in std::fs::read_dir(shard.path()).unwrap() {
            let blob = blob.unwrap();
            let name = blob.file_name().into_string().unwrap();
            let data = std::fs::read(blob.path()).unwrap();
            assert_eq!(
                B3Digest::of(&data).to_hex(),
                name,
                "{}",
                blob.path().display()
            );
            assert!(name.starts_with(shard.file_name().to_str().unwrap()));
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn dropped_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(dir.path()).unwrap();
    let data = vec![7u8; 100_000];
    let mut w = store.open_write().await.unwrap();
    w.write_all(&data).await.unwrap();
    w.flush().await.unwrap();
    drop(w);
    let digest = B3Digest::of(&data);
    assert!(!store.has(&digest).await.unwrap());
    assert!(store.open_read(&digest).await.unwrap().is_none());
    assert!(!store.blob_path(&digest).exists());
    assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    assert_eq!(check_blobs_match_names(dir.path()), 0);
}

#[tokio::test]
async fn leftover_temp_file_of_a_crash_is_not_a_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(dir.path()).unwrap();
    let data = b"half written".to_vec();
    let mut w = store.open_write().await.unwrap();
    w.write_all(&data).await.unwrap();
    w.flush().await.unwrap();
    // As if the process died here: the writer's clean-up never runs.
    std::mem::forget(w);
    assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 1);
    assert!(!store.has(&B3Digest::of(&data)).await.unwrap());
    // A temp file named like a digest still does not count.
    let fake = B3Digest::of(b"fake");
    std::fs::write(store.tmp_dir().join(fake.to_hex()), b"fake").unwrap();
    assert!(!store.has(&fake).await.unwrap());
    assert_eq!(check_blobs_match_names(dir.path()), 0);
}

#[tokio::test]
async fn closed_blob_is_complete_and_temp_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalBlobService::open(dir.path()).unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    let mut w = store.open_write().await.unwrap();
    w.write_all(&data).await.unwrap();
    let digest = w.close().await.unwrap();
    assert_eq!(digest, B3Digest::of(&data));
    assert_eq!(std::fs::read(store.blob_path(&digest)).unwrap(), data);
    assert_eq!(read_to_vec(&store, &digest).await.unwrap().unwrap(), data);
    assert_eq!(std::fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    assert_eq!(check_blobs_match_names(dir.path()), 1);
}

/// Kills a real import mid-way, several times at different moments; whatever made it into
/// the store must be complete.
#[test]
fn killed_import_leaves_only_complete_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..20u32 {
        let data: Vec<u8> = (0..(300_000 + i * 7919)).map(|j| (j ^ i) as u8).collect();
        std::fs::write(src.join(format!("f{i}")), data).unwrap();
    }
    let store = dir.path().join("store");
    for delay_ms in [5u64, 20, 60, 150] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"))
            .args(["store", "--store"])
            .arg(&store)
            .arg("import")
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // it may have finished already
        child.wait().unwrap();
        let blobs = store.join("blobs");
        if blobs.exists() {
            check_blobs_match_names(&blobs);
        }
    }
}
