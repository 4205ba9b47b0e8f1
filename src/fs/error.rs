//! Errors of the virtio-fs daemon's filesystem, and how each maps to the errno the guest sees.

use crate::castore::{self, B3Digest};
use std::io;

/// Why a filesystem operation failed. Every variant knows its errno ([`FsError::errno`]);
/// the host-side detail (digest, offset, cause) only goes to the daemon's log.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("directory {digest} is not in the directory service")]
    DirectoryMissing { digest: B3Digest },
    #[error("directory service returned a directory with digest {got} for {digest}")]
    DirectoryDigestMismatch { digest: B3Digest, got: B3Digest },
    #[error("blob {digest} is not in the blob service")]
    BlobMissing { digest: B3Digest },
    #[error("castore request for {what} {digest} failed")]
    Castore {
        what: &'static str,
        digest: B3Digest,
        // Boxed: the castore's error is large (it can hold a gRPC status) and this enum travels
        // on every request's hot path.
        #[source]
        source: Box<castore::Error>,
    },
    #[error("reading blob {digest} at offset {offset} failed")]
    BlobRead {
        digest: B3Digest,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("blob {digest} ends at byte {end}, but its file node says {size} bytes")]
    BlobTruncated {
        digest: B3Digest,
        end: u64,
        size: u64,
    },
    #[error("blob {digest} holds more than the {size} bytes its file node says")]
    BlobLonger { digest: B3Digest, size: u64 },
    #[error("directory {digest}: entry name {name:?} contains a NUL byte")]
    NameWithNul { digest: B3Digest, name: Vec<u8> },
    #[error("staging buffer for a streamed read failed")]
    Staging(#[source] io::Error),
    #[error("copying {len} bytes to the guest failed")]
    GuestCopy {
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("inode table is full ({cap} entries, all still referenced by the guest kernel)")]
    InodeTableFull { cap: usize },
    #[error("open file limit reached ({max} handles)")]
    TooManyHandles { max: usize },
    #[error("inode {0} is unknown (never handed out or already evicted)")]
    StaleInode(u64),
    #[error("file handle {0} is unknown")]
    BadHandle(u64),
    #[error("not a directory")]
    NotADirectory,
    #[error("is a directory")]
    IsADirectory,
    #[error("not a symlink")]
    NotASymlink,
    #[error("not a regular file")]
    NotAFile,
    #[error("the share is read-only")]
    ReadOnly,
    #[error("permission denied")]
    PermissionDenied,
    #[error("no such extended attribute")]
    NoXattr,
    #[error("the share's root entries were not assigned in time")]
    RootUnassigned,
}

impl FsError {
    /// The errno the guest receives.
    pub fn errno(&self) -> i32 {
        use FsError::*;
        match self {
            DirectoryMissing { .. }
            | DirectoryDigestMismatch { .. }
            | BlobMissing { .. }
            | Castore { .. }
            | BlobRead { .. }
            | BlobTruncated { .. }
            | BlobLonger { .. }
            | NameWithNul { .. }
            | Staging(_)
            | GuestCopy { .. }
            | RootUnassigned => libc::EIO,
            InodeTableFull { .. } => libc::ENOMEM,
            TooManyHandles { .. } => libc::ENFILE,
            StaleInode(_) => libc::ESTALE,
            BadHandle(_) => libc::EBADF,
            NotADirectory => libc::ENOTDIR,
            IsADirectory => libc::EISDIR,
            NotASymlink | NotAFile => libc::EINVAL,
            ReadOnly => libc::EROFS,
            PermissionDenied => libc::EACCES,
            NoXattr => libc::ENODATA,
        }
    }

    /// Whether the host operator should hear about it: a failure of the castore or of the
    /// daemon itself, as opposed to an ordinary answer to a guest request.
    pub fn is_host_side(&self) -> bool {
        matches!(self.errno(), libc::EIO | libc::ENOMEM | libc::ENFILE)
    }
}

impl From<FsError> for io::Error {
    fn from(e: FsError) -> io::Error {
        io::Error::from_raw_os_error(e.errno())
    }
}
