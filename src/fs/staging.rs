//! A per-thread staging file for reads that do not come from a local file.
//!
//! The virtiofsd crate moves data into guest memory only from a `File`
//! (`ZeroCopyWriter::read_from_file_at`), so bytes from a streamed blob reader are put in a
//! small memfd first. One memfd and one buffer per worker thread: the number of such fds is
//! bounded by the thread count, not by anything the guest does.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// A worker thread's staging buffer and memfd.
pub struct Stage {
    /// Scratch memory for the reader to fill.
    pub buf: Vec<u8>,
    memfd: File,
}

impl Stage {
    fn new() -> io::Result<Self> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(c"tvix-build-vm-fs-stage", MFdFlags::MFD_CLOEXEC)
            .map_err(io::Error::from)?;
        Ok(Self {
            buf: Vec::new(),
            memfd: File::from(fd),
        })
    }

    /// Copies `buf[..len]` into the memfd at offset 0 and returns the memfd to read from.
    pub fn publish(&self, len: usize) -> io::Result<&File> {
        let data = self.buf.get(..len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "length beyond the buffer")
        })?;
        self.memfd.write_all_at(data, 0)?;
        Ok(&self.memfd)
    }
}

thread_local! {
    static STAGE: RefCell<Option<Stage>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's stage, creating it on first use.
pub fn with_stage<R>(f: impl FnOnce(&mut Stage) -> R) -> io::Result<R> {
    STAGE.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| io::Error::other("staging buffer used re-entrantly"))?;
        if slot.is_none() {
            *slot = Some(Stage::new()?);
        }
        match slot.as_mut() {
            Some(stage) => Ok(f(stage)),
            None => Err(io::Error::other("staging buffer missing")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_the_filled_prefix() {
        let out = with_stage(|s| {
            s.buf.clear();
            s.buf.extend_from_slice(b"hello world");
            let f = s.publish(5).unwrap();
            let mut got = [0u8; 5];
            f.read_exact_at(&mut got, 0).unwrap();
            got
        })
        .unwrap();
        assert_eq!(&out, b"hello");
        let err = with_stage(|s| s.publish(s.buf.len() + 1).map(|_| ())).unwrap();
        assert!(err.is_err());
    }
}
