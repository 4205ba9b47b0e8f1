//! What a build read from its inputs, counted by the daemon that served them, for the
//! runner to read while the daemon still runs (it is killed, never asked, at the end).
//!
//! The counters live in a 16-byte file in the VM's runtime directory (which the guest never
//! sees): bytes served by `read` then files opened, each a little-endian u64. Every update
//! rewrites both at offset 0 under a lock, after loading the latest values, so the file
//! only ever grows; a reader needs no cooperation from the daemon. Bytes served are what
//! left the host: a file the guest reads twice from its page cache counts once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The size of the stats file.
pub const STATS_FILE_BYTES: usize = 16;

/// The counters of one daemon.
#[derive(Debug, Default)]
pub struct ReadStats {
    bytes: AtomicU64,
    files: AtomicU64,
    file: Option<Mutex<File>>,
}

/// What a stats file said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InputReads {
    pub bytes: u64,
    pub files: u64,
}

impl ReadStats {
    /// Counters that are also written to `path` (created, or emptied).
    pub fn to_file(path: &Path) -> std::io::Result<Self> {
        let file = File::create(path)?;
        file.write_all_at(&[0u8; STATS_FILE_BYTES], 0)?;
        Ok(Self {
            file: Some(Mutex::new(file)),
            ..Self::default()
        })
    }

    pub fn read(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.publish();
    }

    pub fn opened(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
        self.publish();
    }

    pub fn snapshot(&self) -> InputReads {
        InputReads {
            bytes: self.bytes.load(Ordering::Relaxed),
            files: self.files.load(Ordering::Relaxed),
        }
    }

    fn publish(&self) {
        let Some(file) = &self.file else { return };
        let file = file.lock().unwrap_or_else(|p| p.into_inner());
        // Loaded under the lock: a later write never carries older values.
        let now = self.snapshot();
        let mut buf = [0u8; STATS_FILE_BYTES];
        buf[..8].copy_from_slice(&now.bytes.to_le_bytes());
        buf[8..].copy_from_slice(&now.files.to_le_bytes());
        // Accounting must never fail a read; a failed write leaves older (smaller) figures.
        let _ = file.write_all_at(&buf, 0);
    }
}

/// Reads a stats file; `None` if it is missing or not exactly [`STATS_FILE_BYTES`] long.
pub fn read_stats_file(path: &Path) -> Option<InputReads> {
    let file = File::open(path).ok()?;
    let mut buf = [0u8; STATS_FILE_BYTES + 1];
    let n = file.read_at(&mut buf, 0).ok()?;
    if n != STATS_FILE_BYTES {
        return None;
    }
    let word = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(w)
    };
    Some(InputReads {
        bytes: word(0),
        files: word(8),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_file_follows_the_counters_and_is_read_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fs.stats");
        let stats = ReadStats::to_file(&path).unwrap();
        assert_eq!(read_stats_file(&path), Some(InputReads::default()));
        stats.opened();
        stats.read(4096);
        stats.read(10);
        let want = InputReads {
            bytes: 4106,
            files: 1,
        };
        assert_eq!(stats.snapshot(), want);
        assert_eq!(read_stats_file(&path), Some(want));

        std::fs::write(&path, [1u8; 17]).unwrap();
        assert_eq!(read_stats_file(&path), None);
        std::fs::write(&path, [1u8; 15]).unwrap();
        assert_eq!(read_stats_file(&path), None);
        assert_eq!(read_stats_file(&tmp.path().join("absent")), None);
    }

    #[test]
    fn counters_without_a_file_still_count() {
        let stats = ReadStats::default();
        stats.read(3);
        assert_eq!(stats.snapshot().bytes, 3);
    }
}
