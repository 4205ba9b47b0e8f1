//! Blobs as files in a directory: `<root>/<first two hex digits>/<64 hex digits>`.
//!
//! A write goes to a fresh file in `<root>/tmp/` (same filesystem, so the final rename is
//! atomic), hashed as it is written. `close` fsyncs the file, renames it to its digest's
//! name and fsyncs the directory that now holds it. So a blob name only ever refers to
//! complete, durable contents with that digest; a dropped writer deletes its temp file, and a
//! crash leaves at most a stray file in `tmp/`, which is never taken for a blob.

use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::{B3Digest, Error};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tempfile::TempPath;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// The embedded default blob store.
#[derive(Clone, Debug)]
pub struct LocalBlobService {
    root: PathBuf,
}

impl LocalBlobService {
    /// Uses (and creates if needed) the directory `root`.
    pub fn open(root: &Path) -> Result<Self, Error> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::io(format!("creating blob store {}", tmp.display()), e))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Where the blob with this digest lives (whether or not it is present).
    pub fn blob_path(&self, digest: &B3Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// The directory that holds blobs being written.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

#[async_trait::async_trait]
impl BlobService for LocalBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(format!("checking blob {}", path.display()), e)),
        }
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
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
        .map_err(|e| Error::io("blob store task failed", io::Error::other(e)))??;
        Ok(Box::new(LocalBlobWriter {
            store: self.clone(),
            file: Some(tokio::fs::File::from_std(file)),
            temp_path: Some(temp_path),
            hasher: blake3::Hasher::new(),
        }))
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
        let ctx = || format!("storing blob {digest} from {}", temp_path.display());
        file.flush().await.map_err(|e| Error::io(ctx(), e))?;
        file.sync_all().await.map_err(|e| Error::io(ctx(), e))?;
        drop(file);

        let final_path = self.store.blob_path(&digest);
        let root = self.store.root.clone();
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let ctx = || format!("storing blob {digest} at {}", final_path.display());
            let Some(shard) = final_path.parent() else {
                return Err(Error::io(
                    ctx(),
                    io::Error::other("blob path has no parent"),
                ));
            };
            if !shard.exists() {
                std::fs::create_dir_all(shard).map_err(|e| Error::io(ctx(), e))?;
                sync_dir(&root).map_err(|e| Error::io(ctx(), e))?;
            }
            // Renaming over an existing blob is harmless: same digest, same bytes.
            temp_path
                .persist(&final_path)
                .map_err(|e| Error::io(ctx(), e.error))?;
            sync_dir(shard).map_err(|e| Error::io(ctx(), e))?;
            Ok(())
        })
        .await
        .map_err(|e| Error::io("blob store task failed", io::Error::other(e)))??;
        Ok(digest)
    }
}
