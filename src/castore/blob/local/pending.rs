//! Blobs that [`BlobService::put_file`](super::BlobService::put_file) stored but did not make
//! durable yet, and the barrier ([`Pending::sync`]) that does.
//!
//! `put_file` leaves each blob as a complete but unsynced temp file and queues it here; it is
//! not visible under its digest yet. `sync` then makes every queued blob durable in three
//! rounds, each run on many threads at once (concurrent fsyncs share the filesystem's journal
//! commits, where one after the other each pays its own): fsync every temp file, rename each
//! to its digest's name, fsync every touched shard directory and the root. So a name only
//! ever appears for contents already on disk, and `sync` returns only once the names are
//! durable too.
//!
//! A failed fsync may have dropped the data it could not write (the kernel marks it clean),
//! so a retry could report a success that is not one. Hence a sync that fails for any reason
//! discards what it took (never made visible) and breaks the queue: every later `put_file`
//! and `sync` of this store handle fails, naming the first failure. Reopen the store.

use super::LocalBlobService;
use crate::castore::{B3Digest, Error};
use std::collections::BTreeSet;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tempfile::TempPath;

/// How many fsyncs a sync keeps in flight.
const SYNC_THREADS: usize = 32;

/// A blob's complete contents in a temp file, waiting for a sync to become visible.
#[derive(Debug)]
struct Queued {
    temp: TempPath,
    digest: B3Digest,
}

#[derive(Debug, Default)]
struct State {
    files: Vec<Queued>,
    /// Shards (first digest byte) whose entries may not be durable: a blob `has` reported,
    /// or that `put_file` found present, may have been renamed by a sync still running.
    shards: BTreeSet<u8>,
    /// Why an earlier sync failed; once set, the queue refuses all further work.
    broken: Option<String>,
}

/// The queue of one store (shared by its clones).
#[derive(Debug, Default)]
pub(super) struct Pending {
    state: Mutex<State>,
    /// Held for the whole of a sync, its blocking part included (even if the caller stops
    /// waiting): a sync that finds the queue emptied by another waits here until the other
    /// has made those blobs durable, or broke the queue.
    syncing: Arc<tokio::sync::Mutex<()>>,
}

fn broken_error(why: &str) -> Error {
    Error::io(
        "the blob store's durability barrier failed earlier; reopen the store",
        io::Error::other(why.to_owned()),
    )
}

impl Pending {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update below is a single push/insert/take, so a poisoned state is whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a complete (unsynced) temp file holding the blob `digest`.
    pub(super) fn queue(&self, temp: TempPath, digest: B3Digest) -> Result<(), Error> {
        let mut state = self.state();
        if let Some(why) = &state.broken {
            return Err(broken_error(why));
        }
        state.files.push(Queued { temp, digest });
        Ok(())
    }

    /// Notes that the next sync must fsync this shard directory.
    pub(super) fn mark_shard(&self, shard: u8) {
        self.state().shards.insert(shard);
    }

    /// How many blobs wait for a sync.
    pub(super) fn queued(&self) -> usize {
        self.state().files.len()
    }

    /// Makes every blob queued, and every shard marked, before this call durable.
    pub(super) async fn sync(&self, store: &LocalBlobService) -> Result<(), Error> {
        let guard = self.syncing.clone().lock_owned().await;
        let taken = {
            let mut state = self.state();
            if let Some(why) = &state.broken {
                return Err(broken_error(why));
            }
            if state.files.is_empty() && state.shards.is_empty() {
                return Ok(());
            }
            Taken {
                files: std::mem::take(&mut state.files),
                shards: std::mem::take(&mut state.shards),
            }
        };
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| taken.make_durable(&store)))
                .unwrap_or_else(|_| {
                    Err(Error::io(
                        "syncing the blob store",
                        io::Error::other("the sync panicked"),
                    ))
                });
            if let Err(e) = &result {
                store.pending.break_with(e);
            }
            // Only now may a waiting sync look at the queue (and find it broken, if so).
            drop(guard);
            result
        })
        .await
        .map_err(|e| {
            let err = Error::io("blob store sync task failed", io::Error::other(e));
            self.break_with(&err);
            err
        })?
    }

    fn break_with(&self, err: &Error) {
        let mut why = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            why.push_str(": ");
            why.push_str(&s.to_string());
            source = s.source();
        }
        self.state().broken.get_or_insert(why);
    }
}

/// What one sync took from the queue.
struct Taken {
    files: Vec<Queued>,
    shards: BTreeSet<u8>,
}

impl Taken {
    fn make_durable(self, store: &LocalBlobService) -> Result<(), Error> {
        let temps: Vec<&Path> = self.files.iter().map(|q| q.temp.as_ref()).collect();
        fsync_each(&temps, fsync_file).map_err(|(path, e)| {
            Error::io(format!("syncing blob contents in {}", path.display()), e)
        })?;
        let mut shards = self.shards;
        for q in self.files {
            let shard = super::shard_of(&q.digest);
            let final_path = store.blob_path(&q.digest);
            let ctx = || format!("storing blob {} at {}", q.digest, final_path.display());
            store.ensure_shard(shard).map_err(|e| Error::io(ctx(), e))?;
            // Renaming over an existing blob is harmless: same digest, same bytes.
            q.temp
                .persist(&final_path)
                .map_err(|e| Error::io(ctx(), e.error))?;
            shards.insert(shard);
        }
        let mut dirs: Vec<PathBuf> = shards.iter().map(|s| store.shard_dir(*s)).collect();
        // A shard a concurrent writer created may not have its own name durable yet.
        dirs.push(store.root.clone());
        let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
        fsync_each(&dirs, super::sync_dir)
            .map_err(|(path, e)| Error::io(format!("syncing blob directory {}", path.display()), e))
    }
}

fn fsync_file(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Runs `fsync` on every path, [`SYNC_THREADS`] at a time; the first failure names its path.
fn fsync_each(
    paths: &[&Path],
    fsync: fn(&Path) -> io::Result<()>,
) -> Result<(), (PathBuf, io::Error)> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<(PathBuf, io::Error)>> = Mutex::new(None);
    let worker = || {
        while let Some(path) = paths.get(next.fetch_add(1, Ordering::Relaxed)) {
            if let Err(e) = fsync(path) {
                failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| (path.to_path_buf(), e));
                // The others stop at their next path.
                next.store(paths.len(), Ordering::Relaxed);
            }
        }
    };
    std::thread::scope(|s| {
        // This thread works too, so a failure to start helpers only makes the sync slower.
        for _ in 1..paths.len().min(SYNC_THREADS) {
            if std::thread::Builder::new().spawn_scoped(s, worker).is_err() {
                break;
            }
        }
        worker();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(f) => Err(f),
        None => Ok(()),
    }
}
