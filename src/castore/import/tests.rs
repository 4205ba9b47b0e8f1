#![allow(
    clippy::unwrap_used,
    reason = "tests: any failure should fail the test"
)]

use super::*;
use crate::castore::blob::{read_to_vec, BlobReader, BlobWriter, LocalBlobService};
use crate::castore::directory_service::MemoryDirectoryService;
use std::sync::Mutex;

/// What the importer's store saw, in order.
#[derive(Debug, PartialEq)]
enum Event {
    /// A sync, with how many blobs were waiting and whether the root directory was stored.
    Sync { unsynced: usize, root_stored: bool },
}

/// A local store that records each sync and what the directory store held at that moment.
struct Watched {
    inner: LocalBlobService,
    dirs: Arc<MemoryDirectoryService>,
    root: B3Digest,
    events: Mutex<Vec<Event>>,
}

#[async_trait::async_trait]
impl BlobService for Watched {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        self.inner.has(digest).await
    }
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        self.inner.open_read(digest).await
    }
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        self.inner.open_write().await
    }
    async fn put_file(&self, src: std::fs::File) -> Result<(B3Digest, u64), Error> {
        self.inner.put_file(src).await
    }
    async fn sync(&self) -> Result<(), Error> {
        let event = Event::Sync {
            unsynced: self.inner.unsynced(),
            root_stored: self.dirs.get(&self.root).await?.is_some(),
        };
        self.events.lock().unwrap().push(event);
        self.inner.sync().await
    }
}

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    for i in 0..20 {
        std::fs::write(root.join(format!("a/f{i}")), format!("file {i}")).unwrap();
    }
    std::fs::write(root.join("a/b/same"), b"file 3").unwrap();
    std::fs::write(root.join("top"), b"top").unwrap();
}

#[tokio::test]
async fn directories_are_stored_only_after_the_blobs_are_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    // The root's digest, learnt from a throwaway import.
    let scratch = import_path(
        Arc::new(crate::castore::blob::MemoryBlobService::new()),
        Arc::new(MemoryDirectoryService::new()),
        &src,
    )
    .await
    .unwrap();
    let root = *scratch.digest().unwrap();

    let dirs = Arc::new(MemoryDirectoryService::new());
    let blobs = Arc::new(Watched {
        inner: LocalBlobService::open(&tmp.path().join("blobs")).unwrap(),
        dirs: dirs.clone(),
        root,
        events: Mutex::new(Vec::new()),
    });
    let node = import_path(blobs.clone(), dirs.clone(), &src)
        .await
        .unwrap();
    assert_eq!(node, scratch);
    // One barrier, with every file's blob waiting (the duplicate too: it had no name yet when
    // it was copied, and gets the same one) and no directory stored yet.
    assert_eq!(
        *blobs.events.lock().unwrap(),
        vec![Event::Sync {
            unsynced: 22,
            root_stored: false
        }]
    );
    assert!(dirs.get(&root).await.unwrap().is_some());
    assert_eq!(blobs.inner.unsynced(), 0);
    for i in 0..20 {
        let d = B3Digest::of(format!("file {i}").as_bytes());
        assert!(blobs.inner.blob_path(&d).is_file());
    }
}

#[tokio::test]
async fn a_single_file_is_durable_before_its_node_is_returned() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("f");
    std::fs::write(&f, b"alone").unwrap();
    let blobs = LocalBlobService::open(&tmp.path().join("blobs")).unwrap();
    let node = import_path(
        Arc::new(blobs.clone()),
        Arc::new(MemoryDirectoryService::new()),
        &f,
    )
    .await
    .unwrap();
    let Node::File { digest, .. } = node else {
        panic!("{node:?}");
    };
    assert_eq!(blobs.unsynced(), 0);
    assert!(blobs.blob_path(&digest).is_file());
}

/// The digest `b3sum` (an independent program) prints for `path`.
fn b3sum(path: &Path) -> B3Digest {
    let out = std::process::Command::new("b3sum")
        .arg("--no-names")
        .arg(path)
        .output()
        .expect("b3sum (scripts/install-deps.sh installs it)");
    assert!(out.status.success(), "{out:?}");
    let hex = String::from_utf8(out.stdout).unwrap();
    let bytes: [u8; 32] = data_encoding::HEXLOWER
        .decode(hex.trim().as_bytes())
        .unwrap()
        .try_into()
        .unwrap();
    B3Digest::from(bytes)
}

#[tokio::test]
async fn a_large_file_imports_to_its_b3sum_and_reads_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("big");
    // Above the prehash threshold and over several copy chunks, not a multiple of either.
    let len = (PREHASH_MIN as usize) * 3 + 4321;
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9) as u8)
        .collect();
    std::fs::write(&f, &data).unwrap();
    let want = b3sum(&f);

    let blobs = LocalBlobService::open(&tmp.path().join("blobs")).unwrap();
    let node = import_path(
        Arc::new(blobs.clone()),
        Arc::new(MemoryDirectoryService::new()),
        &f,
    )
    .await
    .unwrap();
    assert_eq!(
        node,
        Node::File {
            digest: want,
            size: len as u64,
            executable: false
        }
    );
    assert_eq!(read_to_vec(&blobs, &want).await.unwrap().unwrap(), data);
}

#[test]
fn hash_file_agrees_with_one_shot_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("f");
    let data: Vec<u8> = (0..HASH_CHUNK * 2 + 7).map(|i| (i % 253) as u8).collect();
    std::fs::write(&p, &data).unwrap();
    let mut f = std::fs::File::open(&p).unwrap();
    assert_eq!(
        hash_file(&mut f).unwrap(),
        (B3Digest::of(&data), data.len() as u64)
    );
}
