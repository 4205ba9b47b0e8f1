//! The build log of a served build: forwarded live to a client that streams it, and kept
//! whole as a castore blob so that the log of a failed or timed-out build is not lost.

use crate::agent::{LogChunk, LogRef, LogSink};
use crate::castore::{BlobService, BlobWriter};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::warn;

/// A [`LogSink`] that writes the log into a blob (at most `max_bytes` of it) and forwards
/// each chunk to `live`, if given. A failing blob store does not fail the build: the log
/// is then only forwarded, and [`LogTee::finish`] returns `None`.
pub struct LogTee<T> {
    writer: Option<Box<dyn BlobWriter>>,
    written: u64,
    max_bytes: u64,
    truncated: bool,
    live: Option<mpsc::Sender<T>>,
}

impl<T: From<LogChunk> + Send> LogTee<T> {
    pub async fn new(
        blobs: &dyn BlobService,
        max_bytes: u64,
        live: Option<mpsc::Sender<T>>,
    ) -> Self {
        let writer = match blobs.open_write().await {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot store the build log; it is only forwarded");
                None
            }
        };
        Self {
            writer,
            written: 0,
            max_bytes,
            truncated: false,
            live,
        }
    }

    /// Closes the blob; its reference, unless storing failed.
    pub async fn finish(mut self) -> Option<LogRef> {
        let mut writer = self.writer.take()?;
        match writer.close().await {
            Ok(digest) => Some(LogRef {
                digest,
                size: self.written,
                truncated: self.truncated,
            }),
            Err(e) => {
                warn!(error = %e, "storing the build log");
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl<T: From<LogChunk> + Send> LogSink for LogTee<T> {
    async fn send(&mut self, chunk: LogChunk) {
        if let Some(writer) = self.writer.as_mut() {
            let room = self.max_bytes.saturating_sub(self.written);
            let take = usize::try_from(room)
                .unwrap_or(usize::MAX)
                .min(chunk.data.len());
            if take < chunk.data.len() {
                self.truncated = true;
            }
            if take > 0 {
                match writer.write_all(&chunk.data[..take]).await {
                    Ok(()) => self.written += take as u64,
                    Err(e) => {
                        warn!(error = %e, "writing the build log blob; it is only forwarded now");
                        self.writer = None;
                    }
                }
            }
        }
        if let Some(live) = self.live.as_mut() {
            // A client that stopped listening is no reason to stop the build.
            if live.send(T::from(chunk)).await.is_err() {
                self.live = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::LogStream;
    use crate::castore::blob::memory::MemoryBlobService;
    use bytes::Bytes;

    fn chunk(data: &'static [u8]) -> LogChunk {
        LogChunk {
            stream: LogStream::Stdout,
            data: Bytes::from_static(data),
        }
    }

    #[tokio::test]
    async fn keeps_the_whole_log_up_to_the_bound_and_forwards_all() {
        let blobs = MemoryBlobService::default();
        let (tx, mut rx) = mpsc::channel(8);
        let mut tee: LogTee<LogChunk> = LogTee::new(&blobs, 8, Some(tx)).await;
        tee.send(chunk(b"hello ")).await;
        tee.send(chunk(b"world")).await;
        let log = tee.finish().await.unwrap();
        assert_eq!(log.size, 8);
        assert!(log.truncated);
        assert_eq!(log.digest, crate::castore::B3Digest::of(b"hello wo"));
        let stored = crate::castore::blob::read_to_vec(&blobs, &log.digest)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored, b"hello wo");
        assert_eq!(rx.recv().await.unwrap().data, "hello ");
        assert_eq!(rx.recv().await.unwrap().data, "world");
    }

    #[tokio::test]
    async fn a_gone_listener_does_not_stop_the_log() {
        let blobs = MemoryBlobService::default();
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut tee: LogTee<LogChunk> = LogTee::new(&blobs, 1 << 20, Some(tx)).await;
        tee.send(chunk(b"a")).await;
        tee.send(chunk(b"b")).await;
        let log = tee.finish().await.unwrap();
        assert_eq!((log.size, log.truncated), (2, false));
    }
}
