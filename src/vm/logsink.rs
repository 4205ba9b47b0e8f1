//! Bounded log files for child processes and the guest's serial console.
//!
//! A child's output (and the serial console, which the guest controls) is pumped through a
//! pipe into a file that never grows past a cap: a hostile guest or a chatty helper cannot
//! fill the host's disk or the service's own log. Past the cap the pump keeps reading (so the
//! writer never blocks) and remembers only the last [`TAIL_KEEP`] bytes, which it appends at
//! the end with a note of how much was dropped: the end of a log is what explains a failure.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Default cap for one log file.
pub const DEFAULT_CAP_BYTES: u64 = 4 << 20;

/// How much of the end of an over-long stream is kept.
pub const TAIL_KEEP: usize = 16 << 10;

/// Copies `reader` into `file` until EOF, bounded as described in the module docs.
/// Returns how many bytes were dropped.
pub async fn pump(
    mut reader: impl AsyncRead + Unpin,
    file: std::fs::File,
    cap: u64,
) -> std::io::Result<u64> {
    let mut file = tokio::fs::File::from_std(file);
    let mut buf = vec![0u8; 16 << 10];
    let mut written = 0u64;
    let mut dropped = 0u64;
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let room = usize::try_from(cap.saturating_sub(written)).unwrap_or(usize::MAX);
        let (head, rest) = chunk.split_at(room.min(n));
        if !head.is_empty() {
            file.write_all(head).await?;
            written += head.len() as u64;
        }
        if !rest.is_empty() {
            dropped += rest.len() as u64;
            tail.extend_from_slice(rest);
            if tail.len() > 2 * TAIL_KEEP {
                tail.drain(..tail.len() - TAIL_KEEP);
            }
        }
    }
    if dropped > 0 {
        let keep = tail.len().min(TAIL_KEEP);
        let tail = &tail[tail.len() - keep..];
        let note = format!(
            "\n[tvix-build-vm: log capped at {cap} bytes; {} bytes dropped; the last {keep} follow]\n",
            dropped - keep as u64
        );
        file.write_all(note.as_bytes()).await?;
        file.write_all(tail).await?;
    }
    file.flush().await?;
    Ok(dropped)
}

/// The last `max_bytes` of the file at `path` as text (invalid UTF-8 replaced), for error
/// messages. A missing or unreadable file gives a note saying so instead of an error: this
/// only ever decorates another error.
pub fn tail(path: &Path, max_bytes: u64) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
        let mut bytes = Vec::new();
        file.take(max_bytes).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read() {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<{} unreadable: {e}>", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn short_streams_are_copied_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let file = std::fs::File::create(&path).expect("create");
        let dropped = pump(&b"hello\nworld\n"[..], file, 100).await.expect("pump");
        assert_eq!(dropped, 0);
        assert_eq!(std::fs::read(&path).expect("read"), b"hello\nworld\n");
        assert_eq!(tail(&path, 6), "world\n");
        assert_eq!(tail(&path, 1000), "hello\nworld\n");
    }

    #[tokio::test]
    async fn long_streams_keep_head_and_tail_within_bounds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let file = std::fs::File::create(&path).expect("create");
        let mut input = vec![b'a'; 1000];
        input.extend(std::iter::repeat_n(b'b', 100_000));
        input.extend_from_slice(b"THE END");
        let dropped = pump(&input[..], file, 1000).await.expect("pump");
        assert_eq!(dropped, 100_007);
        let out = std::fs::read(&path).expect("read");
        assert!(out.len() < 1000 + TAIL_KEEP + 200, "{} bytes", out.len());
        assert!(out.starts_with(&[b'a'; 1000]));
        assert!(out.ends_with(b"bbbTHE END"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("log capped at 1000 bytes"), "{text}");
    }

    #[test]
    fn tail_of_a_missing_file_says_so() {
        assert!(tail(Path::new("/nonexistent/log"), 10).contains("unreadable"));
    }

    #[test]
    fn tail_is_lossy_not_failing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        std::fs::write(&path, b"ok \xff\xfe end").expect("write");
        assert_eq!(tail(&path, 100), "ok \u{fffd}\u{fffd} end");
    }
}
