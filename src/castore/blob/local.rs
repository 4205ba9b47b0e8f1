//! Blobs as files in a directory: `<root>/<first two hex digits>/<64 hex digits>`.
//!
//! A write goes to a fresh file in `<root>/tmp/` (same filesystem, so the final rename is
//! atomic), hashed as it is written. The file is fsynced before it is renamed to its digest's
//! name, so a blob name only ever refers to complete contents with that digest; a dropped
//! writer deletes its temp file, and a crash leaves at most stray files in `tmp/`, which are
//! never taken for blobs.
//!
//! Two ways in, with the same guarantees once each has returned:
//! - [`BlobWriter::close`] fsyncs the file, renames it and fsyncs its shard directory: the
//!   blob is durable when `close` returns (two fsyncs per blob; the gRPC `Put` path).
//! - [`BlobService::put_file`] only writes and hashes the file and queues it; the blob is
//!   neither durable nor visible until [`BlobService::sync`], which fsyncs every queued file
//!   at once, renames them, and fsyncs each touched shard directory once (see [`pending`]).
//!   A tree of many small files so costs a few rounds of concurrent fsyncs, not two serial
//!   fsyncs per file.

mod pending;
#[cfg(test)]
mod tests;

use self::pending::Pending;
use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::{B3Digest, Error};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tempfile::TempPath;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// How much of a file [`BlobService::put_file`] reads, hashes and writes at once.
const COPY_CHUNK: usize = 4 << 20;
/// Chunks at least this large are hashed on all cores (BLAKE3's advice for `update_rayon`).
const RAYON_MIN: usize = 128 << 10;

/// The embedded default blob store.
#[derive(Clone, Debug)]
pub struct LocalBlobService {
    root: PathBuf,
    pending: Arc<Pending>,
    /// `has` refreshes the mtime of a blob older than this (see [`Self::refresh_on_has`]).
    refresh_after: Option<std::time::Duration>,
}

/// When this process first opened a local blob store: a file in `tmp/` older than that was
/// not left by a writer of this process (see [`LocalBlobService::first_opened`]).
static FIRST_OPENED: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

impl LocalBlobService {
    /// When this process first opened a local blob store. Files in `tmp/` last written
    /// before it cannot belong to a live writer of this process (a writer that is quiet for
    /// a while, like a build log during a long build, must not lose its file to the GC).
    pub fn first_opened() -> std::time::SystemTime {
        *FIRST_OPENED.get_or_init(std::time::SystemTime::now)
    }

    /// Uses (and creates if needed) the directory `root`.
    pub fn open(root: &Path) -> Result<Self, Error> {
        Self::first_opened();
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(format!("creating blob store {}", tmp.display()), e))?;
        Ok(Self {
            root: root.to_owned(),
            pending: Arc::default(),
            refresh_after: None,
        })
    }

    /// `has` refreshes the mtime of a present blob older than `after` (serve passes half the
    /// GC's grace period): a client that checks a blob and then puts a directory naming it
    /// within `after` finds it kept (see `castore::gc`).
    pub fn refresh_on_has(mut self, after: std::time::Duration) -> Self {
        self.refresh_after = Some(after);
        self
    }

    /// Where the blob with this digest lives (whether or not it is present).
    pub fn blob_path(&self, digest: &B3Digest) -> PathBuf {
        self.shard_dir(shard_of(digest)).join(digest.to_hex())
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory that holds blobs being written.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn shard_dir(&self, shard: u8) -> PathBuf {
        self.root.join(format!("{shard:02x}"))
    }

    /// Creates the shard directory if needed, durably (there are at most 256).
    fn ensure_shard(&self, shard: u8) -> io::Result<()> {
        let dir = self.shard_dir(shard);
        if !dir.exists() {
            std::fs::create_dir_all(&dir)?;
            sync_dir(&self.root)?;
        }
        Ok(())
    }

    /// Copies, hashes and stores `src` (see [`BlobService::put_file`]); blocking.
    fn put_file_blocking(&self, mut src: std::fs::File) -> Result<(B3Digest, u64), Error> {
        let tmp_dir = self.tmp_dir();
        let (mut tmp, temp_path) = tempfile::NamedTempFile::new_in(&tmp_dir)
            .map_err(|e| Error::io(format!("creating a file in {}", tmp_dir.display()), e))?
            .into_parts();
        let ctx = || format!("copying a file into {}", temp_path.display());
        // A buffer fitting a small file, so a tree of small files allocates little.
        let hint = src.metadata().map_or(0, |m| m.len());
        let cap = usize::try_from(hint.saturating_add(1))
            .unwrap_or(COPY_CHUNK)
            .clamp(8 << 10, COPY_CHUNK);
        let mut buf = vec![0u8; cap];
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        loop {
            let n = read_full(&mut src, &mut buf).map_err(|e| Error::io(ctx(), e))?;
            if n == 0 {
                break;
            }
            // The bytes hashed are the bytes written: both come from this one buffer, so
            // the digest is that of the stored contents even if `src` changes meanwhile.
            let chunk = &buf[..n];
            if n >= RAYON_MIN {
                hasher.update_rayon(chunk);
            } else {
                hasher.update(chunk);
            }
            tmp.write_all(chunk).map_err(|e| Error::io(ctx(), e))?;
            size += n as u64;
        }
        let digest = B3Digest::from(hasher.finalize());
        crate::castore::gc::touch([&digest]);
        if refresh_mtime(&self.blob_path(&digest)) {
            // Present already (maybe renamed by a sync still running: the next sync covers
            // its shard). The copy is dropped before its data ever needs to reach the disk.
            // Its time is refreshed: this upload starts its grace period again.
            self.pending.mark_shard(shard_of(&digest));
        } else {
            // The next sync fsyncs it, then gives it its name.
            self.pending.queue(temp_path, digest)?;
        }
        Ok((digest, size))
    }

    /// How many blobs [`BlobService::put_file`] stored that wait for [`BlobService::sync`]
    /// to become durable and visible.
    pub fn unsynced(&self) -> usize {
        self.pending.queued()
    }
}

/// Sets a present blob's mtime to now (the GC's grace period counts from it); false if the
/// blob is absent. A blob that cannot be touched (read-only store) still counts as present.
fn refresh_mtime(path: &Path) -> bool {
    match std::fs::File::options().write(true).open(path) {
        Ok(f) => {
            // Best effort: a failure only shortens this blob's grace period.
            let _ = f.set_modified(std::time::SystemTime::now());
            true
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(_) => path.is_file(),
    }
}

fn shard_of(digest: &B3Digest) -> u8 {
    digest.as_bytes()[0]
}

/// Reads until `buf` is full or `src` ends; returns how many bytes were read.
fn read_full(src: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn task_failed(e: tokio::task::JoinError) -> Error {
    Error::io("blob store task failed", io::Error::other(e))
}

#[async_trait::async_trait]
impl BlobService for LocalBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        crate::castore::gc::touch([digest]);
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => {
                // The caller may refer to it next, so the next sync must cover its name
                // (another writer's rename may not be durable yet).
                self.pending.mark_shard(shard_of(digest));
                let old = |after| {
                    m.modified()
                        .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > after))
                };
                if self.refresh_after.is_some_and(old) {
                    // Touched above, so a GC running now keeps it; absent now means it went
                    // before that, and the caller must upload it again.
                    let present = tokio::task::spawn_blocking(move || refresh_mtime(&path))
                        .await
                        .map_err(task_failed)?;
                    return Ok(present);
                }
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("checking blob {}", path.display()), e)),
        }
    }

    async fn cheap_size(&self, digest: &B3Digest) -> Result<Option<u64>, Error> {
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("checking blob {}", path.display()), e)),
        }
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        crate::castore::gc::touch([digest]);
        let path = self.blob_path(digest);
        match tokio::fs::File::open(&path).await {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("opening blob {}", path.display()), e)),
        }
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        let tmp_dir = self.tmp_dir();
        let (file, temp_path) = tokio::task::spawn_blocking(move || {
            tempfile::NamedTempFile::new_in(&tmp_dir)
                .map(|t| t.into_parts())
                .map_err(|e| Error::io(format!("creating a file in {}", tmp_dir.display()), e))
        })
        .await
        .map_err(task_failed)??;
        Ok(Box::new(LocalBlobWriter {
            store: self.clone(),
            file: Some(tokio::fs::File::from_std(file)),
            temp_path: Some(temp_path),
            hasher: blake3::Hasher::new(),
        }))
    }

    async fn put_file(&self, src: std::fs::File) -> Result<(B3Digest, u64), Error> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.put_file_blocking(src))
            .await
            .map_err(task_failed)?
    }

    async fn sync(&self) -> Result<(), Error> {
        self.pending.sync(self).await
    }
}

struct LocalBlobWriter {
    store: LocalBlobService,
    /// `None` once closed.
    file: Option<tokio::fs::File>,
    /// Deletes the temp file when dropped, unless it was renamed into place.
    temp_path: Option<TempPath>,
    hasher: blake3::Hasher,
}

fn closed() -> io::Error {
    io::Error::other("blob writer already closed")
}

impl AsyncWrite for LocalBlobWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(file) = this.file.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        let n = ready!(Pin::new(file).poll_write(cx, buf))?;
        // Hash exactly what the file accepted, so digest and contents cannot disagree.
        this.hasher.update(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().file.as_mut() {
            Some(f) => Pin::new(f).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

/// fsyncs a directory, so a rename into it survives a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait::async_trait]
impl BlobWriter for LocalBlobWriter {
    async fn close(&mut self) -> Result<B3Digest, Error> {
        let (Some(mut file), Some(temp_path)) = (self.file.take(), self.temp_path.take()) else {
            return Err(Error::io("closing blob", closed()));
        };
        let digest = B3Digest::from(self.hasher.finalize());
        crate::castore::gc::touch([&digest]);
        let ctx = || format!("storing blob {digest} from {}", temp_path.display());
        file.flush().await.map_err(|e| Error::io(ctx(), e))?;
        file.sync_all().await.map_err(|e| Error::io(ctx(), e))?;
        drop(file);

        let store = self.store.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let final_path = store.blob_path(&digest);
            let ctx = || format!("storing blob {digest} at {}", final_path.display());
            let shard = shard_of(&digest);
            store.ensure_shard(shard).map_err(|e| Error::io(ctx(), e))?;
            // Renaming over an existing blob is harmless: same digest, same bytes.
            temp_path
                .persist(&final_path)
                .map_err(|e| Error::io(ctx(), e.error))?;
            sync_dir(&store.shard_dir(shard)).map_err(|e| Error::io(ctx(), e))?;
            Ok(())
        })
        .await
        .map_err(task_failed)??;
        Ok(digest)
    }
}
