//! A blob service that keeps nothing: it only computes the digests of what is written to
//! it. Importing a store path through it (with an in-memory directory service) gives the
//! path's root node without uploading a byte, so that a remote server can be asked whether
//! it already holds the whole tree before anything is sent.

use crate::castore::import::hash_file;
use crate::castore::{B3Digest, BlobReader, BlobService, BlobWriter, Error};
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Clone, Copy, Debug, Default)]
pub struct DigestOnly;

/// Hashes what is written; `close` returns the digest.
#[derive(Default)]
struct HashWriter(blake3::Hasher);

impl tokio::io::AsyncWrite for HashWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.update(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl BlobWriter for HashWriter {
    async fn close(&mut self) -> Result<B3Digest, Error> {
        Ok(B3Digest::from(self.0.finalize()))
    }
}

#[async_trait::async_trait]
impl BlobService for DigestOnly {
    /// Nothing is ever held: the importer hashes (and "stores") every file.
    async fn has(&self, _digest: &B3Digest) -> Result<bool, Error> {
        Ok(false)
    }

    async fn open_read(&self, _digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        Ok(None)
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        Ok(Box::new(HashWriter::default()))
    }

    /// Hashed on a blocking thread, each byte read once (as the importer hashes big
    /// files before it uploads them).
    async fn put_file(&self, mut src: std::fs::File) -> Result<(B3Digest, u64), Error> {
        tokio::task::spawn_blocking(move || hash_file(&mut src))
            .await
            .map_err(|e| Error::io("hashing an input file", std::io::Error::other(e)))?
            .map_err(|e| Error::io("hashing an input file", e))
    }
}
