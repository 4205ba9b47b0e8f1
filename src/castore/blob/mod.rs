//! Blobs: file contents addressed by their BLAKE3 digest.
//!
//! - [`local`]: content-addressed files in a directory (the embedded default).
//! - [`memory`]: in a hash map (tests, scratch).
//! - [`grpc`]: a client of a remote `tvix.castore.v1.BlobService`.

pub mod grpc;
pub mod local;
pub mod memory;

use super::{B3Digest, Error};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, AsyncWriteExt};

pub use self::grpc::GrpcBlobService;
pub use self::local::LocalBlobService;
pub use self::memory::MemoryBlobService;

/// A reader over one blob that can seek (the virtio-fs daemon reads at offsets).
pub trait BlobReader: AsyncRead + AsyncSeek + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncSeek + Send + Unpin + 'static> BlobReader for T {}

/// Stores and serves blobs. Implementations: local files (the embedded default), memory,
/// gRPC client.
#[async_trait::async_trait]
pub trait BlobService: Send + Sync + 'static {
    /// Whether the blob is present.
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error>;
    /// A reader over the blob, or `None` if absent.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error>;
    /// A writer for a new blob. Nothing becomes visible before [`BlobWriter::close`]
    /// returns, and then only under the digest of exactly the bytes written.
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error>;
}

/// Receives one blob's bytes; dropping it without `close` stores nothing.
#[async_trait::async_trait]
pub trait BlobWriter: AsyncWrite + Send + Unpin {
    /// Makes the blob durable and visible; returns its digest.
    async fn close(&mut self) -> Result<B3Digest, Error>;
}

/// Stores `data` as one blob; returns its digest.
pub async fn put_bytes(svc: &dyn BlobService, data: &[u8]) -> Result<B3Digest, Error> {
    let mut w = svc.open_write().await?;
    w.write_all(data)
        .await
        .map_err(|e| Error::io("writing blob", e))?;
    w.close().await
}

/// Reads a whole blob into memory (for tests and small blobs only), or `None` if absent.
pub async fn read_to_vec(
    svc: &dyn BlobService,
    digest: &B3Digest,
) -> Result<Option<Vec<u8>>, Error> {
    use tokio::io::AsyncReadExt;
    let Some(mut r) = svc.open_read(digest).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    r.read_to_end(&mut out)
        .await
        .map_err(|e| Error::io(format!("reading blob {digest}"), e))?;
    Ok(Some(out))
}
