//! Build log plumbing: where the live log goes ([`LogSink`]), the bounded tail the host
//! keeps for error messages ([`LogTail`]), and where a whole log was stored ([`LogRef`]).

use crate::castore::B3Digest;
use bytes::Bytes;
use std::collections::VecDeque;

/// Which stream of the command a piece of log came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One piece of the build log, as the guest sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: LogStream,
    pub data: Bytes,
}

/// Where a build's full log was stored: a castore blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRef {
    pub digest: B3Digest,
    pub size: u64,
    /// The log went beyond the bound; the blob holds its first `size` bytes.
    pub truncated: bool,
}

/// Receives the live build log.
///
/// The session waits for the sink, and its deadlines keep running meanwhile: a sink that
/// blocks longer than the wall-clock limit ends the build.
#[async_trait::async_trait]
pub trait LogSink: Send {
    async fn send(&mut self, chunk: LogChunk);
}

/// A channel as the sink. A receiver that has gone away (the client stopped listening) is
/// not a reason to stop the build, so chunks are then dropped; the tail is still kept.
#[async_trait::async_trait]
impl LogSink for tokio::sync::mpsc::Sender<LogChunk> {
    async fn send(&mut self, chunk: LogChunk) {
        // Err only means the receiver is gone, which is handled above by design.
        let _receiver_gone = tokio::sync::mpsc::Sender::send(self, chunk).await;
    }
}

/// Drops the live log (the tail is still kept by the session).
#[derive(Clone, Copy, Debug, Default)]
pub struct DiscardLog;

#[async_trait::async_trait]
impl LogSink for DiscardLog {
    async fn send(&mut self, _chunk: LogChunk) {}
}

/// The last `capacity` bytes of the build log (both streams, interleaved as received) and
/// how much there was in all.
#[derive(Clone, Debug)]
pub struct LogTail {
    buf: VecDeque<u8>,
    capacity: usize,
    total: u64,
}

impl LogTail {
    /// An empty tail keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            buf: VecDeque::with_capacity(capacity),
            capacity,
            total: 0,
        }
    }

    /// Appends `data`, forgetting the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        self.total = self.total.saturating_add(data.len() as u64);
        let keep = &data[data.len().saturating_sub(self.capacity)..];
        let overflow = (self.buf.len() + keep.len()).saturating_sub(self.capacity);
        self.buf.drain(..overflow);
        self.buf.extend(keep);
    }

    /// Bytes received in all, including those no longer kept.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Whether earlier bytes were forgotten.
    pub fn is_truncated(&self) -> bool {
        self.total > self.buf.len() as u64
    }

    /// The kept bytes, oldest first.
    pub fn to_vec(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }

    /// The kept bytes as text (invalid UTF-8 replaced), for error messages.
    pub fn to_string_lossy(&self) -> String {
        String::from_utf8_lossy(&self.to_vec()).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_last_capacity_bytes() {
        let mut tail = LogTail::new(8);
        tail.push(b"hello ");
        assert_eq!(tail.to_vec(), b"hello ");
        assert!(!tail.is_truncated());
        tail.push(b"world");
        assert_eq!(tail.to_vec(), b"lo world");
        assert!(tail.is_truncated());
        tail.push(b"0123456789abc");
        assert_eq!(tail.to_vec(), b"56789abc");
        assert_eq!(tail.total_bytes(), 24);
        assert!(tail.buf.capacity() < 64, "the ring must not grow");
    }

    #[test]
    fn zero_capacity_keeps_nothing_but_counts() {
        let mut tail = LogTail::new(0);
        tail.push(b"abc");
        assert!(tail.to_vec().is_empty());
        assert_eq!(tail.total_bytes(), 3);
    }

    #[tokio::test]
    async fn channel_sink_forwards_and_survives_a_gone_receiver() {
        let (mut tx, mut rx) = tokio::sync::mpsc::channel(4);
        let chunk = LogChunk {
            stream: LogStream::Stderr,
            data: Bytes::from_static(b"x"),
        };
        LogSink::send(&mut tx, chunk.clone()).await;
        assert_eq!(rx.recv().await, Some(chunk.clone()));
        drop(rx);
        LogSink::send(&mut tx, chunk).await;
    }
}
