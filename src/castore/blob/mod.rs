//! Blobs: file contents addressed by their BLAKE3 digest.

use super::{B3Digest, Error};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite};

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
