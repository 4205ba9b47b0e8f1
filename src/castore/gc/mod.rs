//! Garbage collection of the embedded store (`blobs/` and `directories.redb`).
//!
//! **Roots**, each kept with its whole closure (directories, and the blobs their file nodes
//! name): pins ([`records::pin`]); build records younger than `keep_for`
//! ([`records::record_build`]); what work in this process holds ([`in_use::hold`]: the
//! inputs of builds serve accepted, queued or running; a node whose closure a pin is
//! checking, [`presence`]) and extra roots the caller passes; directories put within `grace`
//! (their put time in redb); blobs whose file was written or re-uploaded within `grace`
//! (their mtime).
//!
//! **Mark and sweep**, safe against uploads and builds in the same process:
//! 1. T0 = now; the process's [`barrier`] starts recording every digest an upload, `has`,
//!    `open_read` or directory put touches (before that operation checks presence).
//! 2. Mark: every root's closure, walking `directories.redb` in one read transaction, each
//!    directory once.
//! 3. Directories: in one write transaction, while holding the barrier, mark what was
//!    touched since step 1, then delete every directory neither marked nor put within the
//!    grace period, and every build record older than `keep_for`.
//! 4. Blobs, shard by shard: list the shard's blobs neither marked nor written within the
//!    grace period; then, in batches of [`BLOB_BATCH`], while holding the barrier, mark what
//!    was touched since and delete the batch's blobs still unmarked.
//! 5. Files in `blobs/tmp/` older than the grace period and last written before this
//!    process opened the store (left by crashes; a live writer's file may be quiet for long).
//!
//! Why nothing in use goes: an operation touches a digest before it looks for it; if that
//! happens before a batch, the batch's marking sees it; if during, the operation waits for
//! the batch and then finds the object present (kept) or absent (and says so, or uploads it
//! again). An upload or build so waits at most one batch (a few blobs, or the one directory
//! transaction), never the whole GC. A blob listed as old and re-uploaded before its batch
//! was touched by that upload, so it is marked and stays. Directories go before blobs and a kept directory's
//! closure is marked, so no kept directory ever names a removed child. Anything uploaded
//! after T0 is within the grace period by its time; so is one in flight at T0 (touched before
//! the barrier recorded, renamed after), as long as its last write is younger than the
//! grace period: a grace of zero is for a store nobody writes to. Another process cannot interleave:
//! `directories.redb` is locked by whoever has the store open.
//!
//! **A blob checked, then named**: a client that learns a blob is present (`Stat`/`has`)
//! and later puts a directory naming it would, if a GC removed the old blob in between, get
//! a directory pointing at a missing blob. In serve, `has` refreshes the mtime of a blob
//! older than half the grace period (`LocalBlobService::refresh_on_has`; touched first, so
//! a GC running meanwhile keeps it, and if it went before, `has` says absent and the client
//! uploads it again). So a directory put within half the grace period after the check finds
//! its blobs. A client slower than that can still lose one: refusing directories that name
//! absent blobs would close it fully, but the castore contract (and its tests) lets a
//! directory be put before or without its blobs.

pub mod barrier;
pub mod in_use;
pub mod presence;
pub mod records;
#[cfg(test)]
mod tests;

pub use self::barrier::touch;

use self::barrier::AlreadyRunning;
use self::records::{corrupt, pin_digest, record_digests};
use crate::castore::blob::LocalBlobService;
use crate::castore::directory_service::redb::{
    RedbDirectoryService, BUILDS, DIRECTORIES, PINS, PUT_TIMES,
};
use crate::castore::{B3Digest, Error};
use crate::proto::castore as pb;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How a GC runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Anything uploaded within this long is kept.
    pub grace: Duration,
    /// Build records younger than this keep their roots.
    pub keep_for: Duration,
    /// Count what would go, change nothing.
    pub dry_run: bool,
}

/// What a GC did (or, dry, would have done).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    pub directories_kept: u64,
    pub directories_removed: u64,
    pub blobs_kept: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub tmp_files_removed: u64,
    pub build_records_removed: u64,
    pub dry_run: bool,
    pub seconds: f64,
}

/// Why a GC failed (it stops at the first error; what it deleted before was garbage).
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    AlreadyRunning(#[from] AlreadyRunning),
    #[error("garbage collection")]
    Store(#[from] Error),
    #[error("garbage collection task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Collects the embedded store's garbage; `extra_roots` are kept with their closures.
pub async fn collect(
    blobs: &LocalBlobService,
    dirs: &RedbDirectoryService,
    options: Options,
    extra_roots: Vec<B3Digest>,
) -> Result<Report, GcError> {
    let blobs = blobs.clone();
    let dirs = dirs.clone();
    tokio::task::spawn_blocking(move || collect_blocking(&blobs, &dirs, &options, extra_roots))
        .await
        .map_err(GcError::Task)?
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn collect_blocking(
    blobs: &LocalBlobService,
    dirs: &RedbDirectoryService,
    options: &Options,
    extra_roots: Vec<B3Digest>,
) -> Result<Report, GcError> {
    let started = Instant::now();
    let t0 = SystemTime::now();
    let cutoff = t0.checked_sub(options.grace).unwrap_or(UNIX_EPOCH);
    let records_cutoff = secs(t0).saturating_sub(options.keep_for.as_secs());
    let active = barrier::barrier().start()?;
    let mut report = Report {
        dry_run: options.dry_run,
        ..Report::default()
    };
    let db = dirs.database();
    let path = dirs.path();
    let ctx = |what: &str| format!("{what} in {}", path.display());

    // Mark.
    let mut marked = HashSet::new();
    {
        let txn = db
            .begin_read()
            .map_err(|e| Error::db(ctx("reading roots"), e))?;
        let table = |e| Error::db(ctx("reading roots"), e);
        let mut roots = extra_roots;
        roots.extend(in_use::current());
        let pins = txn.open_table(PINS).map_err(table)?;
        for entry in pins.iter().map_err(|e| Error::db(ctx("reading pins"), e))? {
            let (k, _) = entry.map_err(|e| Error::db(ctx("reading pins"), e))?;
            roots.extend(pin_digest(k.value()).map_err(|e| corrupt(ctx("a pin"), e))?);
        }
        let builds = txn.open_table(BUILDS).map_err(table)?;
        for entry in builds
            .iter()
            .map_err(|e| Error::db(ctx("reading builds"), e))?
        {
            let (_, v) = entry.map_err(|e| Error::db(ctx("reading builds"), e))?;
            let (finished, raw) = v.value();
            if finished >= records_cutoff {
                roots.extend(record_digests(raw));
            }
        }
        let times = txn.open_table(PUT_TIMES).map_err(table)?;
        let fresh = millis(cutoff);
        for entry in times
            .iter()
            .map_err(|e| Error::db(ctx("reading put times"), e))?
        {
            let (k, v) = entry.map_err(|e| Error::db(ctx("reading put times"), e))?;
            if v.value() >= fresh {
                roots.push(B3Digest::from(*k.value()));
            }
        }
        let directories = txn.open_table(DIRECTORIES).map_err(table)?;
        mark(&directories, roots, &mut marked, path)?;
    }

    // Directories, in one write transaction under the barrier.
    {
        let mut held = active.hold();
        let ctx = || ctx("deleting directories");
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        {
            let mut directories = txn
                .open_table(DIRECTORIES)
                .map_err(|e| Error::db(ctx(), e))?;
            let mut times = txn.open_table(PUT_TIMES).map_err(|e| Error::db(ctx(), e))?;
            mark(&directories, held.take(), &mut marked, path)?;
            let fresh = millis(cutoff);
            let mut doomed = Vec::new();
            for entry in directories.iter().map_err(|e| Error::db(ctx(), e))? {
                let (k, _) = entry.map_err(|e| Error::db(ctx(), e))?;
                let digest = B3Digest::from(*k.value());
                let put = times
                    .get(digest.as_bytes())
                    .map_err(|e| Error::db(ctx(), e))?
                    .map_or(0, |v| v.value());
                if marked.contains(&digest) || put >= fresh {
                    report.directories_kept += 1;
                } else {
                    doomed.push(digest);
                }
            }
            report.directories_removed = doomed.len() as u64;
            for digest in &doomed {
                directories
                    .remove(digest.as_bytes())
                    .map_err(|e| Error::db(ctx(), e))?;
                times
                    .remove(digest.as_bytes())
                    .map_err(|e| Error::db(ctx(), e))?;
            }
            let mut builds = txn.open_table(BUILDS).map_err(|e| Error::db(ctx(), e))?;
            let mut old = Vec::new();
            for entry in builds.iter().map_err(|e| Error::db(ctx(), e))? {
                let (k, v) = entry.map_err(|e| Error::db(ctx(), e))?;
                if v.value().0 < records_cutoff {
                    old.push(k.value().to_owned());
                }
            }
            report.build_records_removed = old.len() as u64;
            for id in &old {
                builds
                    .remove(id.as_str())
                    .map_err(|e| Error::db(ctx(), e))?;
            }
        }
        if options.dry_run {
            txn.abort().map_err(|e| Error::db(ctx(), e))?;
        } else {
            txn.commit().map_err(|e| Error::db(ctx(), e))?;
        }
    }

    // Blobs, shard by shard: listed without the barrier, deleted in small batches under it.
    for shard in 0..=255u8 {
        let dir = blobs.root().join(format!("{shard:02x}"));
        if !dir.is_dir() {
            continue;
        }
        let candidates = list_shard(&dir, &marked, cutoff, &mut report)?;
        for batch in candidates.chunks(BLOB_BATCH) {
            let mut held = active.hold();
            let touched = held.take();
            if !touched.is_empty() {
                let ctx = || ctx("marking touched digests");
                let txn = db.begin_read().map_err(|e| Error::db(ctx(), e))?;
                let directories = txn
                    .open_table(DIRECTORIES)
                    .map_err(|e| Error::db(ctx(), e))?;
                mark(&directories, touched, &mut marked, path)?;
            }
            delete_blobs(batch, &marked, options.dry_run, &mut report)?;
        }
    }
    drop(active);

    // A writer's file in tmp/ may be quiet for longer than the grace period (the log of a
    // long build): only files from before this process opened the store are strays.
    let tmp_cutoff = cutoff.min(LocalBlobService::first_opened());
    report.tmp_files_removed = sweep_tmp(&blobs.tmp_dir(), tmp_cutoff, options.dry_run)?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Marks `roots` and their closures (a digest may name a directory or a blob: both are
/// marked, and a directory is walked once).
fn mark(
    directories: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    roots: impl IntoIterator<Item = B3Digest>,
    marked: &mut HashSet<B3Digest>,
    path: &Path,
) -> Result<(), Error> {
    let mut stack: Vec<B3Digest> = roots.into_iter().collect();
    while let Some(digest) = stack.pop() {
        if !marked.insert(digest) {
            continue;
        }
        let ctx = || format!("reading directory {digest} in {}", path.display());
        let Some(raw) = directories
            .get(digest.as_bytes())
            .map_err(|e| Error::db(ctx(), e))?
        else {
            continue;
        };
        let dir = pb::Directory::decode(raw.value()).map_err(|e| corrupt(ctx(), e))?;
        let children = dir
            .directories
            .iter()
            .map(|d| &d.digest)
            .chain(dir.files.iter().map(|f| &f.digest));
        for child in children {
            // A stored directory was validated on the way in; a bad digest now is damage.
            let child = B3Digest::try_from(child).map_err(|e| corrupt(ctx(), e))?;
            if !marked.contains(&child) {
                stack.push(child);
            }
        }
    }
    Ok(())
}

/// The blobs of one shard that are unmarked and written before `cutoff` (the rest are
/// counted as kept).
fn list_shard(
    dir: &Path,
    marked: &HashSet<B3Digest>,
    cutoff: SystemTime,
    report: &mut Report,
) -> Result<Vec<Candidate>, Error> {
    let ctx = || format!("sweeping {}", dir.display());
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(ctx(), e))? {
        let entry = entry.map_err(|e| Error::io(ctx(), e))?;
        // Only names that are digests are blobs; anything else is not ours to judge.
        let Some(digest) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<B3Digest>().ok().filter(|d| d.to_hex() == n))
        else {
            continue;
        };
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(ctx(), e)),
        };
        let fresh = meta.modified().map_or(true, |m| m >= cutoff);
        if marked.contains(&digest) || fresh || !meta.is_file() {
            report.blobs_kept += 1;
        } else {
            out.push(Candidate {
                digest,
                path: entry.path(),
                len: meta.len(),
            });
        }
    }
    Ok(out)
}

/// A blob the sweep may delete.
struct Candidate {
    digest: B3Digest,
    path: std::path::PathBuf,
    len: u64,
}

/// How many blobs are deleted per hold of the barrier: an upload waits for at most this many
/// unlinks.
const BLOB_BATCH: usize = 32;

/// Deletes the candidates not marked since they were listed (call holding the barrier).
fn delete_blobs(
    batch: &[Candidate],
    marked: &HashSet<B3Digest>,
    dry_run: bool,
    report: &mut Report,
) -> Result<(), Error> {
    for c in batch {
        if marked.contains(&c.digest) {
            report.blobs_kept += 1;
            continue;
        }
        if !dry_run {
            match std::fs::remove_file(&c.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(format!("removing {}", c.path.display()), e)),
            }
        }
        report.blobs_removed += 1;
        report.bytes_freed += c.len;
    }
    Ok(())
}

/// Deletes files in `tmp/` older than `cutoff` (left by crashed writers); returns how many.
fn sweep_tmp(tmp: &Path, cutoff: SystemTime, dry_run: bool) -> Result<u64, Error> {
    let ctx = || format!("sweeping {}", tmp.display());
    let entries = match std::fs::read_dir(tmp) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(ctx(), e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(ctx(), e))?;
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta.modified().is_ok_and(|m| m < cutoff);
        if meta.is_file() && old {
            if !dry_run {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::io(ctx(), e)),
                }
            }
            removed += 1;
        }
    }
    Ok(removed)
}
