//! A blob service that refuses new blobs while its filesystem is below a free-space floor,
//! so that uploads and harvested outputs can never fill the disk a host runs on.
//!
//! The floor is checked when a blob is opened for writing and again after every
//! [`CHECK_EVERY`] bytes written to it; a blob refused part-way is dropped, so nothing of
//! it is stored (the writer's contract).

use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::{B3Digest, Error};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// How many bytes a writer takes between two looks at the free space.
pub const CHECK_EVERY: u64 = 64 << 20;

/// The free space a filesystem must keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFloor {
    /// A path on the filesystem (the store's directory).
    pub path: PathBuf,
    pub min_free_bytes: u64,
}

/// Why new data was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{path}: {free} bytes free, below the floor of {floor} bytes (--min-free-space); \
     new uploads and builds are refused until space is freed"
)]
pub struct BelowFloor {
    pub path: PathBuf,
    pub free: u64,
    pub floor: u64,
}

impl DiskFloor {
    /// Bytes an unprivileged writer may still use on the floor's filesystem.
    pub fn free_bytes(&self) -> io::Result<u64> {
        free_bytes(&self.path)
    }

    /// `Err` when the filesystem is below the floor, or its free space cannot be read (a
    /// floor that cannot be checked does not hold).
    pub fn check(&self) -> Result<(), BelowFloor> {
        let free = self.free_bytes().unwrap_or(0);
        match free < self.min_free_bytes {
            true => Err(BelowFloor {
                path: self.path.clone(),
                free,
                floor: self.min_free_bytes,
            }),
            false => Ok(()),
        }
    }
}

fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    // The blocks available to unprivileged users: what is left before root's reserve.
    Ok(st.blocks_available().saturating_mul(st.fragment_size()))
}

/// Blobs of `inner`, new ones only while `floor` holds.
pub struct FlooredBlobService {
    inner: Arc<dyn BlobService>,
    floor: Arc<DiskFloor>,
}

impl FlooredBlobService {
    pub fn new(inner: Arc<dyn BlobService>, floor: Arc<DiskFloor>) -> Self {
        Self { inner, floor }
    }
}

fn refused(b: BelowFloor) -> Error {
    Error::NoSpace(Box::new(b))
}

#[async_trait::async_trait]
impl BlobService for FlooredBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        self.inner.has(digest).await
    }

    async fn cheap_size(&self, digest: &B3Digest) -> Result<Option<u64>, Error> {
        self.inner.cheap_size(digest).await
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        self.inner.open_read(digest).await
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        self.floor.check().map_err(refused)?;
        Ok(Box::new(FlooredWriter {
            inner: self.inner.open_write().await?,
            floor: Arc::clone(&self.floor),
            since_check: 0,
            below: None,
        }))
    }

    async fn put_file(&self, src: std::fs::File) -> Result<(B3Digest, u64), Error> {
        // The inner service's own path (e.g. a local file moved into place) would bypass the
        // writer's checks: check the file's size against the floor up front.
        let len = src.metadata().map(|m| m.len()).unwrap_or(0);
        let free = self.floor.free_bytes().unwrap_or(0);
        if free.saturating_sub(len) < self.floor.min_free_bytes {
            return Err(refused(BelowFloor {
                path: self.floor.path.clone(),
                free,
                floor: self.floor.min_free_bytes,
            }));
        }
        self.inner.put_file(src).await
    }

    async fn sync(&self) -> Result<(), Error> {
        self.inner.sync().await
    }
}

struct FlooredWriter {
    inner: Box<dyn BlobWriter>,
    floor: Arc<DiskFloor>,
    since_check: u64,
    /// Set once the floor was crossed: every later write and the close fail.
    below: Option<BelowFloor>,
}

impl AsyncWrite for FlooredWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.below.is_none() && self.since_check >= CHECK_EVERY {
            self.since_check = 0;
            self.below = self.floor.check().err();
        }
        if let Some(b) = &self.below {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::StorageFull,
                b.to_string(),
            )));
        }
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.since_check = self.since_check.saturating_add(*n as u64);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait::async_trait]
impl BlobWriter for FlooredWriter {
    async fn close(&mut self) -> Result<B3Digest, Error> {
        if let Some(b) = self.below.take() {
            return Err(refused(b));
        }
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::blob::{put_bytes, MemoryBlobService};

    fn floored(min_free_bytes: u64) -> (FlooredBlobService, Arc<MemoryBlobService>) {
        let inner = Arc::new(MemoryBlobService::default());
        let floor = Arc::new(DiskFloor {
            path: std::env::temp_dir(),
            min_free_bytes,
        });
        (FlooredBlobService::new(inner.clone(), floor), inner)
    }

    #[tokio::test]
    async fn below_the_floor_nothing_is_stored_and_the_error_says_why() {
        let (svc, _inner) = floored(u64::MAX);
        let e = put_bytes(&svc, b"hello").await.unwrap_err();
        assert!(matches!(e, Error::NoSpace(_)), "{e:?}");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--min-free-space"), "{status:?}");
        assert!(!svc.has(&B3Digest::of(b"hello")).await.unwrap());
    }

    #[tokio::test]
    async fn above_the_floor_blobs_are_stored() {
        let (svc, inner) = floored(1);
        let d = put_bytes(&svc, b"hello").await.unwrap();
        assert!(inner.has(&d).await.unwrap());
    }

    #[tokio::test]
    async fn a_writer_that_crosses_the_floor_stores_nothing() {
        use tokio::io::AsyncWriteExt;
        let inner = MemoryBlobService::default();
        // A writer due for its next look at the free space, on a filesystem that has
        // filled up meanwhile (here: a floor no filesystem meets).
        let mut w = FlooredWriter {
            inner: inner.open_write().await.unwrap(),
            floor: Arc::new(DiskFloor {
                path: std::env::temp_dir(),
                min_free_bytes: u64::MAX,
            }),
            since_check: CHECK_EVERY,
            below: None,
        };
        let e = w.write_all(&[2u8; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert!(matches!(w.close().await, Err(Error::NoSpace(_))));
        assert!(!inner.has(&B3Digest::of(&[2u8; 16])).await.unwrap());
        // Through the gRPC edge, the write's error is RESOURCE_EXHAUSTED, not INTERNAL.
        let status = tonic::Status::from(Error::io("writing blob", e));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    }

    #[tokio::test]
    async fn a_file_that_would_cross_the_floor_is_refused_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, vec![7u8; 16 << 20]).unwrap();
        let free = free_bytes(tmp.path()).unwrap();
        // Room for the floor, but not for the floor and the file.
        let inner = Arc::new(MemoryBlobService::default());
        let floor = Arc::new(DiskFloor {
            path: tmp.path().to_owned(),
            min_free_bytes: free.saturating_sub(4096),
        });
        let svc = FlooredBlobService::new(inner.clone(), floor);
        let e = svc.put_file(std::fs::File::open(&file).unwrap()).await;
        assert!(matches!(e, Err(Error::NoSpace(_))), "{e:?}");
        assert!(!inner
            .has(&B3Digest::of(&vec![7u8; 16 << 20]))
            .await
            .unwrap());
    }
}
