use super::records::{
    pin, pin_owned, pins, record_build, unpin, unpin_owned, PinOutcome, UnpinOutcome,
};
use super::*;
use crate::castore::blob::put_bytes;
use crate::castore::{BlobService, Directory, DirectoryService, Node, PathComponent};
use bytes::Bytes;

// The barrier is one per process: GC tests must not run at once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Store {
    _tmp: tempfile::TempDir,
    blobs: LocalBlobService,
    dirs: RedbDirectoryService,
}

fn store() -> Store {
    let tmp = tempfile::tempdir().unwrap();
    let blobs = LocalBlobService::open(&tmp.path().join("blobs")).unwrap();
    let dirs = RedbDirectoryService::open(&tmp.path().join("directories.redb")).unwrap();
    Store {
        _tmp: tmp,
        blobs,
        dirs,
    }
}

/// A directory holding one file with `contents` and, optionally, a child directory.
async fn tree(s: &Store, contents: &[u8], child: Option<&Directory>) -> (Directory, B3Digest) {
    let blob = put_bytes(&s.blobs, contents).await.unwrap();
    let mut d = Directory::new();
    d.try_insert(
        PathComponent::try_from("f").unwrap(),
        Node::File {
            digest: blob,
            size: contents.len() as u64,
            executable: false,
        },
    )
    .unwrap();
    if let Some(c) = child {
        d.try_insert(PathComponent::try_from("c").unwrap(), c.as_node())
            .unwrap();
    }
    s.dirs.put(d.clone()).await.unwrap();
    (d, blob)
}

fn options(dry_run: bool) -> Options {
    Options {
        grace: Duration::ZERO,
        keep_for: Duration::from_secs(3600),
        dry_run,
    }
}

/// What the store holds, listed from its files and tables (not through the GC's mark).
async fn listing(s: &Store) -> (Vec<B3Digest>, Vec<B3Digest>) {
    let mut blobs: Vec<B3Digest> = Vec::new();
    for shard in std::fs::read_dir(s.blobs.root()).unwrap() {
        let shard = shard.unwrap();
        if shard.file_name() == "tmp" {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).unwrap() {
            blobs.push(f.unwrap().file_name().to_str().unwrap().parse().unwrap());
        }
    }
    let txn = s.dirs.database().begin_read().unwrap();
    let t = txn.open_table(DIRECTORIES).unwrap();
    let mut dirs: Vec<B3Digest> = t
        .iter()
        .unwrap()
        .map(|e| B3Digest::from(*e.unwrap().0.value()))
        .collect();
    blobs.sort_by_key(|d| *d.as_bytes());
    dirs.sort_by_key(|d| *d.as_bytes());
    (blobs, dirs)
}

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

async fn settle() {
    // Past the millisecond put times and the file mtimes of what was just written.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

#[tokio::test]
async fn a_pin_keeps_its_closure_and_the_rest_goes() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let (leaf, leaf_blob) = tree(&s, b"leaf", None).await;
    let (top, top_blob) = tree(&s, b"top", Some(&leaf)).await;
    let (junk, junk_blob) = tree(&s, b"junk", None).await;
    let stray = put_bytes(&s.blobs, b"stray").await.unwrap();
    let node = top.as_node().to_proto(Bytes::from_static(b"top"));
    assert!(pin(&s.dirs, &node, "alice").await.unwrap());
    settle().await;

    let r = collect(&s.blobs, &s.dirs, options(false), vec![])
        .await
        .unwrap();
    assert_eq!((r.directories_kept, r.directories_removed), (2, 1));
    assert_eq!((r.blobs_kept, r.blobs_removed), (2, 2));
    assert_eq!(r.bytes_freed, (b"junk".len() + b"stray".len()) as u64);
    let (blobs, dirs) = listing(&s).await;
    let mut want_blobs = vec![leaf_blob, top_blob];
    want_blobs.sort_by_key(|d| *d.as_bytes());
    let mut want_dirs = vec![leaf.digest(), top.digest()];
    want_dirs.sort_by_key(|d| *d.as_bytes());
    assert_eq!((blobs, dirs), (want_blobs, want_dirs));
    assert!(s.dirs.get(&junk.digest()).await.unwrap().is_none());
    assert!(!s.blobs.has(&junk_blob).await.unwrap());
    assert!(!s.blobs.has(&stray).await.unwrap());

    // Unpinned, everything goes.
    assert!(unpin(&s.dirs, &node).await.unwrap());
    assert!(pins(&s.dirs).await.unwrap().is_empty());
    let r = collect(&s.blobs, &s.dirs, options(false), vec![])
        .await
        .unwrap();
    assert_eq!((r.directories_removed, r.blobs_removed), (2, 2));
    assert_eq!(listing(&s).await, (vec![], vec![]));
}

#[tokio::test]
async fn dry_run_changes_nothing_and_counts_the_same() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let (leaf, _) = tree(&s, b"leaf", None).await;
    tree(&s, b"top", Some(&leaf)).await;
    record_build(&s.dirs, "old", &[leaf.digest()])
        .await
        .unwrap();
    settle().await;
    let before = listing(&s).await;
    let dry = collect(&s.blobs, &s.dirs, options(true), vec![])
        .await
        .unwrap();
    assert_eq!(listing(&s).await, before);
    assert!(dry.dry_run);
    assert_eq!((dry.directories_removed, dry.blobs_removed), (1, 1));
    let wet = collect(&s.blobs, &s.dirs, options(false), vec![])
        .await
        .unwrap();
    assert_eq!(
        (wet.directories_removed, wet.blobs_removed, wet.bytes_freed),
        (dry.directories_removed, dry.blobs_removed, dry.bytes_freed)
    );
}

#[tokio::test]
async fn grace_keeps_fresh_uploads_and_re_uploads_refresh_it() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let (old, old_blob) = tree(&s, b"old", None).await;
    let grace = Options {
        grace: Duration::from_secs(600),
        ..options(false)
    };
    // Everything is younger than the grace period: nothing goes.
    let r = collect(&s.blobs, &s.dirs, grace.clone(), vec![])
        .await
        .unwrap();
    assert_eq!((r.directories_removed, r.blobs_removed), (0, 0));

    // Aged by hand past the grace period, then uploaded again through put_file.
    let path = s.blobs.blob_path(&old_blob);
    let past = SystemTime::now() - Duration::from_secs(3600);
    set_mtime(&path, past);
    std::fs::write(s._tmp.path().join("src"), b"old").unwrap();
    let src = std::fs::File::open(s._tmp.path().join("src")).unwrap();
    let (d, _) = s.blobs.put_file(src).await.unwrap();
    s.blobs.sync().await.unwrap();
    assert_eq!(d, old_blob);
    assert!(std::fs::metadata(&path).unwrap().modified().unwrap() > past);
    let r = collect(&s.blobs, &s.dirs, grace, vec![]).await.unwrap();
    assert_eq!(r.blobs_removed, 0);
    assert!(s.dirs.get(&old.digest()).await.unwrap().is_some());
}

#[tokio::test]
async fn build_records_keep_their_roots_until_keep_for() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let (input, input_blob) = tree(&s, b"input", None).await;
    let log = put_bytes(&s.blobs, b"log").await.unwrap();
    record_build(&s.dirs, "b1", &[input.digest(), log])
        .await
        .unwrap();
    settle().await;
    let r = collect(&s.blobs, &s.dirs, options(false), vec![])
        .await
        .unwrap();
    assert_eq!((r.directories_removed, r.blobs_removed), (0, 0));
    assert_eq!(r.build_records_removed, 0);
    assert!(s.blobs.has(&input_blob).await.unwrap());

    let expired = Options {
        keep_for: Duration::ZERO,
        ..options(false)
    };
    // keep_for counts in seconds: let the record be a second old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = collect(&s.blobs, &s.dirs, expired, vec![]).await.unwrap();
    assert_eq!(r.build_records_removed, 1);
    assert_eq!((r.directories_removed, r.blobs_removed), (1, 2));
}

#[tokio::test]
async fn extra_roots_are_kept_and_old_tmp_files_go() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let (running, blob) = tree(&s, b"in use", None).await;
    let stray_tmp = s.blobs.tmp_dir().join("crashed");
    std::fs::write(&stray_tmp, b"half").unwrap();
    // Left by a process before this one (a live writer of this one is never swept).
    let before = LocalBlobService::first_opened() - Duration::from_secs(1);
    set_mtime(&stray_tmp, before);
    let live = s.blobs.tmp_dir().join("live writer");
    std::fs::write(&live, b"quiet for a while").unwrap();
    settle().await;
    let r = collect(&s.blobs, &s.dirs, options(false), vec![running.digest()])
        .await
        .unwrap();
    assert_eq!((r.directories_removed, r.blobs_removed), (0, 0));
    assert!(s.blobs.has(&blob).await.unwrap());
    assert_eq!(r.tmp_files_removed, 1);
    assert!(!stray_tmp.exists());
    assert!(live.exists());
}

#[tokio::test]
async fn inputs_in_use_are_kept_until_released() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let (input, blob) = tree(&s, b"input of a running build", None).await;
    let guard = in_use::hold([input.digest()]);
    settle().await;
    let r = collect(&s.blobs, &s.dirs, options(false), vec![])
        .await
        .unwrap();
    assert_eq!((r.directories_removed, r.blobs_removed), (0, 0));
    drop(guard);
    let r = collect(&s.blobs, &s.dirs, options(false), vec![])
        .await
        .unwrap();
    assert_eq!((r.directories_removed, r.blobs_removed), (1, 1));
    assert!(!s.blobs.has(&blob).await.unwrap());
}

#[tokio::test]
async fn the_barrier_records_only_while_a_gc_runs() {
    let _serial = SERIAL.lock().await;
    let a = B3Digest::of(b"a");
    let b = B3Digest::of(b"b");
    touch([&a]);
    let active = barrier::barrier().start().unwrap();
    assert!(
        barrier::barrier().start().is_err(),
        "a second GC must be refused"
    );
    touch([&b]);
    assert_eq!(active.hold().take(), HashSet::from([b]));
    assert!(active.hold().take().is_empty());
    drop(active);
    touch([&a]);
    let active = barrier::barrier().start().unwrap();
    assert!(active.hold().take().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_during_a_gc_succeed_and_stay_complete() {
    let _serial = SERIAL.lock().await;
    let s = store();
    // Old blobs (aged past the grace period), uploaded again while the GC runs: each upload
    // that succeeded must leave its blob present, whichever shard the sweep is in.
    let past = SystemTime::now() - Duration::from_secs(3600);
    let mut old = Vec::new();
    for i in 0..1024u32 {
        let d = put_bytes(&s.blobs, &i.to_le_bytes()).await.unwrap();
        set_mtime(&s.blobs.blob_path(&d), past);
        old.push(d);
    }
    let uploader = tokio::spawn({
        let blobs = s.blobs.clone();
        async move {
            let mut stored = Vec::new();
            for i in 0..1024u32 {
                stored.push(put_bytes(&blobs, &i.to_le_bytes()).await.unwrap());
                let fresh = format!("new {i}");
                stored.push(put_bytes(&blobs, fresh.as_bytes()).await.unwrap());
            }
            stored
        }
    });
    // An upload that finished its last write just before the GC started, and renames its
    // file just after, is kept by the grace period (its file's mtime): the barrier records
    // only from the start. So a grace of a second, not zero, as with any live store.
    let grace = Options {
        grace: Duration::from_secs(1),
        ..options(false)
    };
    collect(&s.blobs, &s.dirs, grace, vec![]).await.unwrap();
    let stored = uploader.await.unwrap();
    for d in &stored {
        let bytes = crate::castore::blob::read_to_vec(&s.blobs, d)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{d} was uploaded during the GC and is gone"));
        assert_eq!(B3Digest::of(&bytes), *d);
    }
}

#[tokio::test]
async fn owned_pins_keep_owners_apart_and_count_per_owner() {
    let s = store();
    let (a, _) = tree(&s, b"a", None).await;
    let (b, _) = tree(&s, b"b", None).await;
    let a = a.as_node().to_proto(Bytes::from_static(b"a"));
    let b = b.as_node().to_proto(Bytes::from_static(b"b"));
    assert_eq!(
        pin_owned(&s.dirs, &a, "alice", 1).await.unwrap(),
        PinOutcome::Created
    );
    assert_eq!(
        pin_owned(&s.dirs, &a, "alice", 1).await.unwrap(),
        PinOutcome::Refreshed
    );
    assert_eq!(
        pin_owned(&s.dirs, &b, "alice", 1).await.unwrap(),
        PinOutcome::LimitReached(1)
    );
    assert_eq!(
        pin_owned(&s.dirs, &a, "bob", 1).await.unwrap(),
        PinOutcome::HeldBy("alice".into())
    );
    assert_eq!(
        pin_owned(&s.dirs, &b, "bob", 1).await.unwrap(),
        PinOutcome::Created
    );
    assert_eq!(
        unpin_owned(&s.dirs, &a, "bob").await.unwrap(),
        UnpinOutcome::HeldBy("alice".into())
    );
    assert_eq!(
        unpin_owned(&s.dirs, &a, "alice").await.unwrap(),
        UnpinOutcome::Removed
    );
    assert_eq!(
        unpin_owned(&s.dirs, &a, "alice").await.unwrap(),
        UnpinOutcome::NotPinned
    );
    let left = pins(&s.dirs).await.unwrap();
    assert_eq!((left.len(), left[0].who.as_str()), (1, "bob"));
}

#[tokio::test]
async fn presence_names_the_first_missing_directory_or_blob() {
    use super::presence::{check, Incomplete};
    let s = store();
    let (leaf, leaf_blob) = tree(&s, b"leaf", None).await;
    let (top, _) = tree(&s, b"top", Some(&leaf)).await;
    assert_eq!(
        check(&s.blobs, &s.dirs, &top.as_node()).await.unwrap(),
        Ok(())
    );
    std::fs::remove_file(s.blobs.blob_path(&leaf_blob)).unwrap();
    assert_eq!(
        check(&s.blobs, &s.dirs, &top.as_node()).await.unwrap(),
        Err(Incomplete::Blob(leaf_blob))
    );
    let absent = Node::Directory {
        digest: B3Digest::from([7; 32]),
        size: 1,
    };
    assert_eq!(
        check(&s.blobs, &s.dirs, &absent).await.unwrap(),
        Err(Incomplete::Directory(B3Digest::from([7; 32])))
    );
}

#[tokio::test]
async fn has_refreshes_an_old_blob_so_a_directory_naming_it_after_a_gc_is_whole() {
    let _serial = SERIAL.lock().await;
    let s = store();
    let grace = Duration::from_secs(60);
    let refreshing = s.blobs.clone().refresh_on_has(grace / 2);
    let checked = put_bytes(&s.blobs, b"checked").await.unwrap();
    let unchecked = put_bytes(&s.blobs, b"not checked").await.unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    set_mtime(&s.blobs.blob_path(&checked), long_ago);
    set_mtime(&s.blobs.blob_path(&unchecked), long_ago);
    // What serve's Stat calls: the old blob's grace period starts again.
    assert!(refreshing.has(&checked).await.unwrap());
    let options = Options {
        grace,
        ..options(false)
    };
    let r = collect(&s.blobs, &s.dirs, options, vec![]).await.unwrap();
    assert_eq!((r.blobs_kept, r.blobs_removed), (1, 1));
    assert!(s.blobs.has(&checked).await.unwrap());
    assert!(
        !refreshing.has(&unchecked).await.unwrap(),
        "gone, so absent"
    );
}
