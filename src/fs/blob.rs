//! Open files: a blob's bytes, read at any offset into guest memory.
//!
//! A blob in a local file is read with `preadv` straight into guest memory, like virtiofsd's
//! passthrough. Any other blob reader (memory, gRPC) is driven from the worker thread through
//! the tokio runtime and keeps its position, so sequential reads do not seek.

use super::error::FsError;
use super::staging::with_stage;
use crate::castore::{B3Digest, BlobReader};
use std::fs::File;
use std::io::{self, SeekFrom};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::runtime::Handle;
use virtiofsd::filesystem::ZeroCopyWriter;

/// The most one read moves (the virtiofsd server's own buffer limit).
pub const MAX_READ: usize = 1 << 20;

/// Where an open file's bytes come from.
pub enum BlobBody {
    /// A local file holding exactly the blob's bytes.
    File(File),
    /// Any other reader.
    Stream(Box<dyn BlobReader>),
}

enum Body {
    File(File),
    Stream {
        rt: Handle,
        state: Mutex<StreamState>,
    },
}

struct StreamState {
    reader: Box<dyn BlobReader>,
    /// `None` after an error: the position is unknown, so the next read seeks.
    pos: Option<u64>,
}

/// One open regular file.
pub struct OpenFile {
    digest: B3Digest,
    size: u64,
    body: Body,
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFile")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl OpenFile {
    /// Wraps an opened blob whose file node says `size` bytes. A local file of another length
    /// is refused here rather than read as zeros or garbage later.
    pub fn new(digest: B3Digest, size: u64, body: BlobBody, rt: Handle) -> Result<Self, FsError> {
        let body = match body {
            BlobBody::File(file) => {
                let len = file
                    .metadata()
                    .map_err(|source| FsError::BlobRead {
                        digest,
                        offset: 0,
                        source,
                    })?
                    .len();
                if len < size {
                    return Err(FsError::BlobTruncated {
                        digest,
                        end: len,
                        size,
                    });
                }
                if len > size {
                    return Err(FsError::BlobLonger { digest, size });
                }
                Body::File(file)
            }
            BlobBody::Stream(reader) => Body::Stream {
                rt,
                state: Mutex::new(StreamState {
                    reader,
                    pos: Some(0),
                }),
            },
        };
        Ok(Self { digest, size, body })
    }

    /// Moves up to `count` bytes from `offset` into `w`; 0 at or past the end.
    pub fn read_to<W: ZeroCopyWriter>(
        &self,
        mut w: W,
        offset: u64,
        count: u32,
    ) -> Result<usize, FsError> {
        let left = self.size.saturating_sub(offset);
        // Bounded by MAX_READ, so it fits in usize.
        let want = (count as u64).min(left).min(MAX_READ as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        match &self.body {
            Body::File(file) => w
                .read_from_file_at(file, want, offset, None)
                .map_err(|source| FsError::BlobRead {
                    digest: self.digest,
                    offset,
                    source,
                }),
            Body::Stream { rt, state } => {
                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                with_stage(|stage| {
                    stage.buf.resize(want, 0);
                    self.fill(rt, &mut state, &mut stage.buf[..want], offset)?;
                    let memfd = stage.publish(want).map_err(FsError::Staging)?;
                    let n = w
                        .read_from_file_at(memfd, want, 0, None)
                        .map_err(|source| FsError::GuestCopy { len: want, source })?;
                    // If the guest's buffer held less than it asked for, the reader is still
                    // at `offset + want` (as recorded), and a retry at `offset + n` seeks.
                    Ok(n)
                })
                .map_err(FsError::Staging)?
            }
        }
    }

    /// Fills `buf` with the blob's bytes from `offset`, seeking only if the reader is
    /// elsewhere.
    fn fill(
        &self,
        rt: &Handle,
        state: &mut StreamState,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), FsError> {
        let at = state.pos.take();
        let reader = &mut state.reader;
        let result: Result<usize, io::Error> = rt.block_on(async {
            if at != Some(offset) {
                reader.seek(SeekFrom::Start(offset)).await?;
            }
            let mut filled = 0;
            while filled < buf.len() {
                let n = reader.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            Ok(filled)
        });
        let end = offset.saturating_add(buf.len() as u64);
        match result {
            Ok(filled) if filled == buf.len() && end == self.size => {
                // The last bytes the node declares: the blob must end here too, or the guest
                // would see a prefix of another file as this one, without an error.
                let mut probe = [0u8; 1];
                match rt.block_on(reader.read(&mut probe)) {
                    Ok(0) => {
                        state.pos = Some(end);
                        Ok(())
                    }
                    Ok(_) => Err(FsError::BlobLonger {
                        digest: self.digest,
                        size: self.size,
                    }),
                    Err(source) => Err(FsError::BlobRead {
                        digest: self.digest,
                        offset: end,
                        source,
                    }),
                }
            }
            Ok(filled) if filled == buf.len() => {
                state.pos = Some(end);
                Ok(())
            }
            Ok(filled) => Err(FsError::BlobTruncated {
                digest: self.digest,
                end: offset + filled as u64,
                size: self.size,
            }),
            Err(source) => Err(FsError::BlobRead {
                digest: self.digest,
                offset,
                source,
            }),
        }
    }
}
