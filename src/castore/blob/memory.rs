//! Blobs in memory.

use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::{B3Digest, Error};
use bytes::Bytes;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

type Map = Arc<RwLock<HashMap<B3Digest, Bytes>>>;

/// Keeps blobs in a hash map; cheap to clone (clones share the map).
#[derive(Clone, Default)]
pub struct MemoryBlobService {
    map: Map,
}

impl MemoryBlobService {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl BlobService for MemoryBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        // Poisoning cannot leave a HashMap half-updated, so the data is still usable.
        Ok(self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(digest))
    }

    async fn cheap_size(&self, digest: &B3Digest) -> Result<Option<u64>, Error> {
        Ok(self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .map(|b| b.len() as u64))
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        let found = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned();
        Ok(found.map(|b| Box::new(io::Cursor::new(b)) as Box<dyn BlobReader>))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        Ok(Box::new(MemoryBlobWriter {
            map: self.map.clone(),
            buf: Some(Vec::new()),
        }))
    }
}

struct MemoryBlobWriter {
    map: Map,
    /// `None` once closed.
    buf: Option<Vec<u8>>,
}

fn closed() -> io::Error {
    io::Error::other("blob writer already closed")
}

impl AsyncWrite for MemoryBlobWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(buf) = self.get_mut().buf.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl BlobWriter for MemoryBlobWriter {
    async fn close(&mut self) -> Result<B3Digest, Error> {
        let buf = self
            .buf
            .take()
            .ok_or_else(|| Error::io("closing blob", closed()))?;
        let digest = B3Digest::of(&buf);
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest, Bytes::from(buf));
        Ok(digest)
    }
}
