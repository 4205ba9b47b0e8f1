//! File attributes as Nix expects them of store contents, and the cache lifetimes that fit
//! content that never changes.

use super::inode::{Inode, InodeKind};
use std::time::Duration;
use virtiofsd::fuse::Attr;

/// How long the guest may cache entries and attributes: the share never changes while it is
/// mounted, so effectively forever (the kernel caps it to what it can represent).
pub const CACHE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Timestamps of every entry (seconds since the epoch), as in the Nix store.
pub const MTIME: u64 = 1;

/// The preferred I/O size reported in `st_blksize`.
pub const BLKSIZE: u32 = 4096;

/// The attributes of `inode`: files 0444 (0555 if executable), directories 0555, symlinks
/// 0777, owned by uid and gid 0, every timestamp [`MTIME`], one link (directories two).
pub fn attr_of(inode: &Inode) -> Attr {
    let (mode, size, nlink) = match &inode.kind {
        InodeKind::Directory { .. } => (libc::S_IFDIR | 0o555, 0, 2),
        InodeKind::File {
            size, executable, ..
        } => {
            let perm = if *executable { 0o555 } else { 0o444 };
            (libc::S_IFREG | perm, *size, 1)
        }
        InodeKind::Symlink { target } => (libc::S_IFLNK | 0o777, target.len() as u64, 1),
    };
    Attr {
        ino: inode.ino,
        size,
        blocks: size.div_ceil(512),
        atime: MTIME,
        mtime: MTIME,
        ctime: MTIME,
        atimensec: 0,
        mtimensec: 0,
        ctimensec: 0,
        mode,
        nlink,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
        ..Default::default()
    }
}
