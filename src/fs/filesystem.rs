//! The castore-backed filesystem: virtiofsd's `FileSystem` trait over the inode table, the
//! handle table and a [`ContentSource`].
//!
//! The share's root is a synthetic directory holding exactly the build's input nodes.
//! Directories are fetched when first looked up or listed, blobs when opened. Everything is
//! read-only: every operation that would change something answers `EROFS`.

use super::attr::{attr_of, CACHE_TIMEOUT};
use super::blob::{OpenFile, MAX_READ};
use super::error::FsError;
use super::handles::HandleTable;
use super::inode::{Inode, InodeKind, InodeTable};
use super::listing::Listing;
use super::log_limit::LogLimiter;
use super::root::{RootAssigner, RootGate};
use super::source::ContentSource;
use super::stats::ReadStats;
use std::ffi::CStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use virtiofsd::filesystem::{
    Context, DirEntry, DirectoryIterator, Entry, Extensions, FileSystem, FsOptions, GetxattrReply,
    ListxattrReply, OpenOptions, SerializableFileSystem, SetattrValid, SetxattrFlags,
    ZeroCopyReader, ZeroCopyWriter,
};
use virtiofsd::fuse;

/// Limits of one filesystem instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsLimits {
    /// Open file handles at once; more opens fail with `ENFILE`.
    pub max_handles: usize,
    /// Inodes the table may hold; when full of inodes the guest still references, lookups
    /// fail with `ENOMEM`.
    pub max_inodes: usize,
}

impl Default for FsLimits {
    fn default() -> Self {
        Self {
            max_handles: 1024,
            max_inodes: 1 << 18,
        }
    }
}

/// How long a request that needs the root's entries waits for them to be assigned. The host
/// assigns them before the guest gets its job, so only a guest looking early (or a host that
/// never assigns) waits at all.
const ROOT_WAIT: Duration = Duration::from_secs(30);

/// The smallest FUSE dirent (header plus a one-byte name, 8-aligned): bounds how many
/// entries one `readdir` reply can hold.
const MIN_DIRENT_SIZE: usize = 32;

/// A read-only filesystem over castore content.
pub struct CastoreFs {
    source: Arc<dyn ContentSource>,
    inodes: InodeTable,
    root_gate: Arc<RootGate>,
    handles: HandleTable<OpenFile>,
    log: LogLimiter,
    stats: Arc<ReadStats>,
}

impl CastoreFs {
    /// A filesystem whose root directory holds the entries of `root`.
    pub fn new(root: Listing, source: Arc<dyn ContentSource>, limits: FsLimits) -> Self {
        let gate = RootGate::default();
        Self::with_root(Some(root), Arc::new(gate), source, limits)
    }

    /// A filesystem whose root entries are assigned later through the returned
    /// [`RootAssigner`]; until then, requests that need them wait (see [`super::root`]).
    pub fn with_pending_root(
        source: Arc<dyn ContentSource>,
        limits: FsLimits,
    ) -> (Self, RootAssigner) {
        let gate = Arc::new(RootGate::default());
        let fs = Self::with_root(None, gate.clone(), source, limits);
        let assigner = RootAssigner::new(fs.inodes.root().clone(), gate);
        (fs, assigner)
    }

    fn with_root(
        root: Option<Listing>,
        root_gate: Arc<RootGate>,
        source: Arc<dyn ContentSource>,
        limits: FsLimits,
    ) -> Self {
        Self {
            source,
            inodes: InodeTable::new(root, limits.max_inodes),
            root_gate,
            handles: HandleTable::new(limits.max_handles),
            log: LogLimiter::new(20, Duration::from_secs(10)),
            stats: Arc::default(),
        }
    }

    /// Counts the files opened and bytes served into `stats` (see [`super::stats`]).
    pub fn with_stats(mut self, stats: Arc<ReadStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Number of open file handles (for tests and diagnostics).
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    /// The inode table (for tests and diagnostics).
    pub fn inodes(&self) -> &InodeTable {
        &self.inodes
    }

    /// Turns an error into the guest's errno, logging (rate-limited) what the host operator
    /// should see.
    fn fail(&self, op: &'static str, err: FsError) -> io::Error {
        if err.is_host_side() {
            if let Some(suppressed) = self.log.admit() {
                tracing::warn!(
                    op,
                    suppressed,
                    error = %ErrorChain(&err),
                    "virtio-fs request failed"
                );
            }
        }
        err.into()
    }

    fn listing_of(&self, inode: &Inode) -> Result<Arc<Listing>, FsError> {
        let InodeKind::Directory { digest } = &inode.kind else {
            return Err(FsError::NotADirectory);
        };
        if let Some(listing) = inode.cached_listing() {
            return Ok(listing.clone());
        }
        // Only the root has no digest; without a cached listing it is not assigned yet.
        let Some(digest) = digest else {
            return match self.root_gate.wait(ROOT_WAIT) {
                true => inode
                    .cached_listing()
                    .cloned()
                    .ok_or(FsError::RootUnassigned),
                false => Err(FsError::RootUnassigned),
            };
        };
        let listing = Arc::new(self.source.listing(digest)?);
        Ok(inode.cache_listing(listing).clone())
    }

    fn do_lookup(&self, parent: u64, name: &CStr) -> Result<Entry, FsError> {
        let dir = self.inodes.get(parent)?;
        let listing = self.listing_of(&dir)?;
        let Some((_, entry)) = listing.find(name) else {
            // A negative entry the guest may cache as long as a positive one: the share
            // never gains entries.
            return Ok(Entry {
                inode: 0,
                generation: 0,
                attr: fuse::Attr::default(),
                attr_timeout: CACHE_TIMEOUT,
                entry_timeout: CACHE_TIMEOUT,
            });
        };
        let inode = self.inodes.lookup(parent, &entry.name, &entry.node)?;
        Ok(entry_for(&inode))
    }

    fn do_open(&self, ino: u64, flags: u32) -> Result<u64, FsError> {
        let flags = flags as i32;
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        let inode = self.inodes.get(ino)?;
        let (digest, size) = match &inode.kind {
            InodeKind::File { digest, size, .. } => (*digest, *size),
            InodeKind::Directory { .. } => return Err(FsError::IsADirectory),
            InodeKind::Symlink { .. } => return Err(FsError::NotAFile),
        };
        self.handles.check_room()?;
        let body = self.source.open_blob(&digest)?;
        let file = OpenFile::new(digest, size, body, self.source.runtime().clone())?;
        self.handles.insert(file)
    }

    fn do_readdir(&self, ino: u64, size: u32, offset: u64) -> Result<ListingIter, FsError> {
        let dir = self.inodes.get(ino)?;
        let listing = self.listing_of(&dir)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let room = (size as usize / MIN_DIRENT_SIZE).saturating_add(1);
        let window = listing.from_index(start);
        let window = &window[..window.len().min(room)];
        let inos = if window.is_empty() {
            Vec::new()
        } else {
            self.inodes
                .numbers(ino, window.iter().map(|e| (e.name.as_c_str(), &e.node)))?
        };
        Ok(ListingIter {
            listing,
            start,
            inos,
            pos: 0,
        })
    }

    fn do_access(&self, ino: u64, mask: u32) -> Result<(), FsError> {
        let inode = self.inodes.get(ino)?;
        let mask = mask as i32;
        if mask & libc::W_OK != 0 {
            return Err(FsError::ReadOnly);
        }
        // Owner, group and others have the same bits, so the caller's ids do not matter.
        let executable = match &inode.kind {
            InodeKind::File { executable, .. } => *executable,
            InodeKind::Directory { .. } | InodeKind::Symlink { .. } => true,
        };
        if mask & libc::X_OK != 0 && !executable {
            return Err(FsError::PermissionDenied);
        }
        Ok(())
    }
}

fn entry_for(inode: &Inode) -> Entry {
    Entry {
        inode: inode.ino,
        generation: 0,
        attr: attr_of(inode),
        attr_timeout: CACHE_TIMEOUT,
        entry_timeout: CACHE_TIMEOUT,
    }
}

fn erofs() -> io::Error {
    FsError::ReadOnly.into()
}

/// Displays an error with all its causes, `a: b: c`.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// A window of a directory's entries for one `readdir` reply.
pub struct ListingIter {
    listing: Arc<Listing>,
    start: usize,
    inos: Vec<u64>,
    pos: usize,
}

impl DirectoryIterator for ListingIter {
    fn next(&mut self) -> Option<DirEntry<'_>> {
        let ino = *self.inos.get(self.pos)?;
        let entry = self.listing.from_index(self.start).get(self.pos)?;
        self.pos += 1;
        Some(DirEntry {
            ino,
            // The offset of the entry after this one: index + 1 (0 means "from the start").
            offset: (self.start + self.pos) as u64,
            type_: entry.node.dirent_type(),
            name: &entry.name,
        })
    }
}

impl FileSystem for CastoreFs {
    type Inode = u64;
    type Handle = u64;
    type DirIter = ListingIter;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let want = FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::MAX_PAGES
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::ASYNC_READ;
        Ok(want & capable)
    }

    fn destroy(&self) {
        self.handles.clear();
    }

    fn lookup(&self, _ctx: Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.do_lookup(parent, name)
            .map_err(|e| self.fail("lookup", e))
    }

    fn forget(&self, _ctx: Context, inode: u64, count: u64) {
        self.inodes.forget(inode, count);
    }

    fn getattr(
        &self,
        _ctx: Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(fuse::Attr, Duration)> {
        let inode = self
            .inodes
            .get(inode)
            .map_err(|e| self.fail("getattr", e))?;
        Ok((attr_of(&inode), CACHE_TIMEOUT))
    }

    fn setattr(
        &self,
        _ctx: Context,
        _inode: u64,
        _attr: fuse::SetattrIn,
        _handle: Option<u64>,
        _valid: SetattrValid,
    ) -> io::Result<(fuse::Attr, Duration)> {
        Err(erofs())
    }

    fn readlink(&self, _ctx: Context, inode: u64) -> io::Result<Vec<u8>> {
        let inode = self
            .inodes
            .get(inode)
            .map_err(|e| self.fail("readlink", e))?;
        match &inode.kind {
            InodeKind::Symlink { target } => Ok(target.to_vec()),
            _ => Err(FsError::NotASymlink.into()),
        }
    }

    fn symlink(
        &self,
        _ctx: Context,
        _linkname: &CStr,
        _parent: u64,
        _name: &CStr,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn mknod(
        &self,
        _ctx: Context,
        _inode: u64,
        _name: &CStr,
        _mode: u32,
        _rdev: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn mkdir(
        &self,
        _ctx: Context,
        _parent: u64,
        _name: &CStr,
        _mode: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn unlink(&self, _ctx: Context, _parent: u64, _name: &CStr) -> io::Result<()> {
        Err(erofs())
    }

    fn rmdir(&self, _ctx: Context, _parent: u64, _name: &CStr) -> io::Result<()> {
        Err(erofs())
    }

    fn rename(
        &self,
        _ctx: Context,
        _olddir: u64,
        _oldname: &CStr,
        _newdir: u64,
        _newname: &CStr,
        _flags: u32,
    ) -> io::Result<()> {
        Err(erofs())
    }

    fn link(
        &self,
        _ctx: Context,
        _inode: u64,
        _newparent: u64,
        _newname: &CStr,
    ) -> io::Result<Entry> {
        Err(erofs())
    }

    fn open(
        &self,
        _ctx: Context,
        inode: u64,
        _kill_priv: bool,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let handle = self
            .do_open(inode, flags)
            .map_err(|e| self.fail("open", e))?;
        self.stats.opened();
        // The content never changes: keep the guest's page cache across opens.
        Ok((Some(handle), OpenOptions::KEEP_CACHE))
    }

    fn create(
        &self,
        _ctx: Context,
        _parent: u64,
        _name: &CStr,
        _mode: u32,
        _kill_priv: bool,
        _flags: u32,
        _umask: u32,
        _extensions: Extensions,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        Err(erofs())
    }

    fn read<W: ZeroCopyWriter>(
        &self,
        _ctx: Context,
        _inode: u64,
        handle: u64,
        w: W,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let file = self.handles.get(handle).map_err(|e| self.fail("read", e))?;
        let size = size.min(MAX_READ as u32);
        let n = file
            .read_to(w, offset, size)
            .map_err(|e| self.fail("read", e))?;
        self.stats.read(n);
        Ok(n)
    }

    fn write<R: ZeroCopyReader>(
        &self,
        _ctx: Context,
        _inode: u64,
        _handle: u64,
        _r: R,
        _size: u32,
        _offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _kill_priv: bool,
        _flags: u32,
    ) -> io::Result<usize> {
        Err(erofs())
    }

    fn fallocate(
        &self,
        _ctx: Context,
        _inode: u64,
        _handle: u64,
        _mode: u32,
        _offset: u64,
        _length: u64,
    ) -> io::Result<()> {
        Err(erofs())
    }

    fn release(
        &self,
        _ctx: Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.handles
            .remove(handle)
            .map(drop)
            .map_err(io::Error::from)
    }

    fn statfs(&self, _ctx: Context, _inode: u64) -> io::Result<libc::statvfs64> {
        // SAFETY: statvfs64 is a plain C struct of integers (and private padding), for which
        // all-zero bytes are a valid value.
        let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = super::attr::BLKSIZE.into();
        st.f_frsize = super::attr::BLKSIZE.into();
        st.f_namemax = 255;
        st.f_flag = libc::ST_RDONLY;
        Ok(st)
    }

    fn setxattr(
        &self,
        _ctx: Context,
        _inode: u64,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
        _extra_flags: SetxattrFlags,
    ) -> io::Result<()> {
        Err(erofs())
    }

    fn getxattr(
        &self,
        _ctx: Context,
        inode: u64,
        _name: &CStr,
        _size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inodes.get(inode).map_err(io::Error::from)?;
        Err(FsError::NoXattr.into())
    }

    fn listxattr(&self, _ctx: Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inodes.get(inode).map_err(io::Error::from)?;
        Ok(if size == 0 {
            ListxattrReply::Count(0)
        } else {
            ListxattrReply::Names(Vec::new())
        })
    }

    fn removexattr(&self, _ctx: Context, _inode: u64, _name: &CStr) -> io::Result<()> {
        Err(erofs())
    }

    fn opendir(
        &self,
        _ctx: Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let inode = self.inodes.get(inode).map_err(io::Error::from)?;
        if !matches!(inode.kind, InodeKind::Directory { .. }) {
            return Err(FsError::NotADirectory.into());
        }
        // Let the guest cache listings, and keep them across opens.
        Ok((None, OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE))
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: u64,
        _handle: u64,
        size: u32,
        offset: u64,
    ) -> io::Result<ListingIter> {
        self.do_readdir(inode, size, offset)
            .map_err(|e| self.fail("readdir", e))
    }

    fn releasedir(&self, _ctx: Context, _inode: u64, _flags: u32, _handle: u64) -> io::Result<()> {
        Ok(())
    }

    fn access(&self, _ctx: Context, inode: u64, mask: u32) -> io::Result<()> {
        self.do_access(inode, mask).map_err(io::Error::from)
    }

    fn copyfilerange(
        &self,
        _ctx: Context,
        _inode_in: u64,
        _handle_in: u64,
        _offset_in: u64,
        _inode_out: u64,
        _handle_out: u64,
        _offset_out: u64,
        _len: u64,
        _flags: u64,
    ) -> io::Result<usize> {
        Err(erofs())
    }

    fn tmpfile(&self) -> io::Result<(Entry, Option<u64>, OpenOptions)> {
        Err(erofs())
    }
}

/// Live migration is not offered: a build VM is single-use.
impl SerializableFileSystem for CastoreFs {}

#[cfg(test)]
mod tests;
