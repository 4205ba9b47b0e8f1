//! Blobs: file contents addressed by their BLAKE3 digest.
//!
//! - [`local`]: content-addressed files in a directory (the embedded default).
//! - [`memory`]: in a hash map (tests, scratch).
//! - [`grpc`]: a client of a remote `tvix.castore.v1.BlobService`.
//! - [`floor`]: any of them, refusing new blobs below a free-space floor.

pub mod floor;
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
    /// The blob's size, where the backend knows it without reading the blob or asking a
    /// server (a local file's length, a blob in memory); `None` when it does not, or the
    /// blob is absent. For refusing a node that declares another size early, never the only
    /// check. The default knows nothing cheaply.
    async fn cheap_size(&self, _digest: &B3Digest) -> Result<Option<u64>, Error> {
        Ok(None)
    }
    /// A reader over the blob, or `None` if absent.
    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error>;
    /// A writer for a new blob. Nothing becomes visible before [`BlobWriter::close`]
    /// returns, and then only under the digest of exactly the bytes written.
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error>;

    /// Stores the bytes of `src` from its current position to its end, each read exactly
    /// once; returns the digest and size of what was stored (if `src` changes meanwhile, of
    /// the bytes read, never of a mix the store did not see).
    ///
    /// Unlike [`BlobWriter::close`], this need not make the blob durable, nor even visible:
    /// it is both once a later [`BlobService::sync`] returns. Whenever it is visible under its
    /// digest, it is complete and correct. The default streams `src` into
    /// [`BlobService::open_write`], so it is durable at once.
    async fn put_file(&self, src: std::fs::File) -> Result<(B3Digest, u64), Error> {
        copy_to_writer(self.open_write().await?, src).await
    }

    /// The durability barrier: when it returns `Ok`, every blob that [`BlobService::put_file`]
    /// stored, or that [`BlobService::has`] reported present, before it was called is
    /// durable. Call it before storing anything (a directory) that refers to such blobs.
    ///
    /// The default does nothing, which is right for every backend whose `put_file` and
    /// `has` only ever deal in durable blobs: memory (nothing is durable, nothing to wait
    /// for) and the gRPC client (the server's `Put` is durable before it answers).
    async fn sync(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// How much of a file [`copy_to_writer`] reads at once.
const FILE_READ_CHUNK: usize = 1 << 20;

/// Streams `src` into `writer` in large reads and closes it.
async fn copy_to_writer(
    mut writer: Box<dyn BlobWriter>,
    src: std::fs::File,
) -> Result<(B3Digest, u64), Error> {
    let src = tokio::fs::File::from_std(src);
    let mut src = tokio::io::BufReader::with_capacity(FILE_READ_CHUNK, src);
    let size = tokio::io::copy_buf(&mut src, &mut writer)
        .await
        .map_err(|e| Error::io("copying a file into a blob", e))?;
    writer
        .flush()
        .await
        .map_err(|e| Error::io("copying a file into a blob", e))?;
    Ok((writer.close().await?, size))
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
