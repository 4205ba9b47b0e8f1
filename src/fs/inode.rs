//! The inode table: numbers handed to the guest kernel, their lookup counts, and what each
//! one stands for.
//!
//! Numbers are never reused. Regular files and symlinks are keyed by content (digest, size
//! and executable bit, or target), so identical content anywhere in the inputs shares one
//! inode and one guest page cache. Directories are keyed by (parent inode, name): the guest
//! kernel allows a directory inode only one dentry, so identical directories in two places
//! must be two inodes.
//!
//! The table is capped. When full, entries the guest kernel has forgotten (lookup count 0)
//! are evicted; an evicted entry gets a fresh number if it is looked up again, so numbers are
//! stable for the daemon's lifetime unless the cap is reached. A guest can neither grow the
//! table past the cap nor overflow a count.

use super::error::FsError;
use super::listing::{FsNode, Listing};
use crate::castore::B3Digest;
use bytes::Bytes;
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// The root directory's inode number (FUSE's `FUSE_ROOT_ID`).
pub const ROOT_INO: u64 = virtiofsd::fuse::ROOT_ID;

/// What an inode stands for.
#[derive(Debug)]
pub enum InodeKind {
    /// `digest` is `None` only for the synthetic root.
    Directory {
        digest: Option<B3Digest>,
    },
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Bytes,
    },
}

/// One inode: its number, kind, and for directories the listing once fetched.
#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub kind: InodeKind,
    listing: OnceLock<Arc<Listing>>,
}

impl Inode {
    /// The directory listing if it has been fetched (always for the root).
    pub fn cached_listing(&self) -> Option<&Arc<Listing>> {
        self.listing.get()
    }

    /// Stores a fetched listing; if another thread stored one first, that one is kept.
    pub fn cache_listing(&self, listing: Arc<Listing>) -> &Arc<Listing> {
        self.listing.get_or_init(|| listing)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum InodeKey {
    Directory {
        parent: u64,
        name: Box<[u8]>,
    },
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
    Symlink(Bytes),
}

impl InodeKey {
    fn new(parent: u64, name: &CStr, node: &FsNode) -> Self {
        match node {
            FsNode::Directory { .. } => InodeKey::Directory {
                parent,
                name: name.to_bytes().into(),
            },
            FsNode::File {
                digest,
                size,
                executable,
            } => InodeKey::File {
                digest: *digest,
                size: *size,
                executable: *executable,
            },
            FsNode::Symlink { target } => InodeKey::Symlink(target.clone()),
        }
    }
}

#[derive(Debug)]
struct Slot {
    inode: Arc<Inode>,
    key: Option<InodeKey>,
    lookups: u64,
}

#[derive(Debug)]
struct Inner {
    by_ino: HashMap<u64, Slot>,
    by_key: HashMap<InodeKey, u64>,
    next_ino: u64,
    /// How many slots have a lookup count of 0 (the root excluded): evictable ones.
    forgotten: usize,
}

/// The inode table (see the module documentation).
#[derive(Debug)]
pub struct InodeTable {
    inner: Mutex<Inner>,
    cap: usize,
    /// Also in `inner` (never evicted); kept here to be reachable without the lock.
    root: Arc<Inode>,
}

impl InodeTable {
    /// A table holding only the root, whose entries are `root` (`None`: assigned later
    /// through [`InodeTable::root`]'s listing). `cap` counts the root and is raised to 2 if
    /// smaller.
    pub fn new(root: Option<Listing>, cap: usize) -> Self {
        let listing = OnceLock::new();
        if let Some(root) = root {
            let _ = listing.set(Arc::new(root));
        }
        let root = Arc::new(Inode {
            ino: ROOT_INO,
            kind: InodeKind::Directory { digest: None },
            listing,
        });
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT_INO,
            Slot {
                inode: root.clone(),
                key: None,
                lookups: 0,
            },
        );
        Self {
            inner: Mutex::new(Inner {
                by_ino,
                by_key: HashMap::new(),
                next_ino: ROOT_INO + 1,
                forgotten: 0,
            }),
            cap: cap.max(2),
            root,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation below leaves the maps consistent before it can panic (allocation
        // failure aborts), so a poisoned lock still guards a usable table.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The inode numbered `ino`.
    pub fn get(&self, ino: u64) -> Result<Arc<Inode>, FsError> {
        self.lock()
            .by_ino
            .get(&ino)
            .map(|s| s.inode.clone())
            .ok_or(FsError::StaleInode(ino))
    }

    /// The inode for the entry `name` -> `node` of directory `parent`, its lookup count
    /// raised by one (a FUSE `lookup` reply).
    pub fn lookup(&self, parent: u64, name: &CStr, node: &FsNode) -> Result<Arc<Inode>, FsError> {
        let mut inner = self.lock();
        let ino = self.intern(&mut inner, parent, name, node)?;
        let slot = inner.by_ino.get_mut(&ino).ok_or(FsError::StaleInode(ino))?;
        let was_forgotten = slot.lookups == 0;
        slot.lookups = slot.lookups.saturating_add(1);
        let inode = slot.inode.clone();
        if was_forgotten {
            inner.forgotten = inner.forgotten.saturating_sub(1);
        }
        Ok(inode)
    }

    /// Inode numbers for directory entries (a FUSE `readdir` reply, which does not count as a
    /// lookup). Stops early, returning fewer numbers, when the table is full; fails only if
    /// not even the first could be numbered.
    pub fn numbers<'a, I>(&self, parent: u64, entries: I) -> Result<Vec<u64>, FsError>
    where
        I: IntoIterator<Item = (&'a CStr, &'a FsNode)>,
    {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for (name, node) in entries {
            match self.intern(&mut inner, parent, name, node) {
                Ok(ino) => out.push(ino),
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Lowers the lookup count of `ino` by `count` (a FUSE `forget`). Unknown numbers and the
    /// root are ignored.
    pub fn forget(&self, ino: u64, count: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut inner = self.lock();
        let Some(slot) = inner.by_ino.get_mut(&ino) else {
            return;
        };
        if slot.lookups == 0 {
            return;
        }
        slot.lookups = slot.lookups.saturating_sub(count);
        if slot.lookups == 0 {
            inner.forgotten += 1;
        }
    }

    /// The root inode.
    pub fn root(&self) -> &Arc<Inode> {
        &self.root
    }

    /// How many inodes the table holds, the root included.
    pub fn len(&self) -> usize {
        self.lock().by_ino.len()
    }

    /// Never true: the root is always present.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The lookup count of `ino` (for tests and diagnostics).
    pub fn lookups(&self, ino: u64) -> Option<u64> {
        self.lock().by_ino.get(&ino).map(|s| s.lookups)
    }

    fn intern(
        &self,
        inner: &mut Inner,
        parent: u64,
        name: &CStr,
        node: &FsNode,
    ) -> Result<u64, FsError> {
        let key = InodeKey::new(parent, name, node);
        if let Some(&ino) = inner.by_key.get(&key) {
            return Ok(ino);
        }
        if inner.by_ino.len() >= self.cap {
            Self::evict_forgotten(inner);
            if inner.by_ino.len() >= self.cap {
                return Err(FsError::InodeTableFull { cap: self.cap });
            }
        }
        // u64 inode numbers cannot run out: at a billion new inodes a second that would
        // take centuries.
        let ino = inner.next_ino;
        inner.next_ino += 1;
        let kind = match node {
            FsNode::Directory { digest } => InodeKind::Directory {
                digest: Some(*digest),
            },
            FsNode::File {
                digest,
                size,
                executable,
            } => InodeKind::File {
                digest: *digest,
                size: *size,
                executable: *executable,
            },
            FsNode::Symlink { target } => InodeKind::Symlink {
                target: target.clone(),
            },
        };
        let inode = Arc::new(Inode {
            ino,
            kind,
            listing: OnceLock::new(),
        });
        inner.by_key.insert(key.clone(), ino);
        inner.by_ino.insert(
            ino,
            Slot {
                inode,
                key: Some(key),
                lookups: 0,
            },
        );
        inner.forgotten += 1;
        Ok(ino)
    }

    /// Drops every entry with a lookup count of 0 (never the root). Cheap when there is
    /// nothing to drop; otherwise one pass that frees all of them at once, so the cost is
    /// spread over the inserts that filled the table.
    fn evict_forgotten(inner: &mut Inner) {
        if inner.forgotten == 0 {
            return;
        }
        let Inner { by_ino, by_key, .. } = inner;
        by_ino.retain(|&ino, slot| {
            let keep = ino == ROOT_INO || slot.lookups > 0;
            if !keep {
                if let Some(key) = &slot.key {
                    by_key.remove(key);
                }
            }
            keep
        });
        inner.forgotten = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn file(n: u8, executable: bool) -> FsNode {
        FsNode::File {
            digest: B3Digest::of(&[n]),
            size: 1,
            executable,
        }
    }

    fn dir(n: u8) -> FsNode {
        FsNode::Directory {
            digest: B3Digest::of(&[n]),
        }
    }

    fn table(cap: usize) -> InodeTable {
        InodeTable::new(Some(Listing::default()), cap)
    }

    #[test]
    fn same_entry_same_number_and_counts_add_up() {
        let t = table(100);
        let a = t.lookup(ROOT_INO, c"a", &file(1, false)).unwrap();
        let b = t.lookup(ROOT_INO, c"a", &file(1, false)).unwrap();
        assert_eq!(a.ino, b.ino);
        assert_ne!(a.ino, ROOT_INO);
        assert_eq!(t.lookups(a.ino), Some(2));
        t.forget(a.ino, 1);
        assert_eq!(t.lookups(a.ino), Some(1));
        // More than it has: saturates at 0, never wraps.
        t.forget(a.ino, u64::MAX);
        assert_eq!(t.lookups(a.ino), Some(0));
    }

    #[test]
    fn identical_files_share_an_inode_directories_do_not() {
        let t = table(100);
        let f1 = t.lookup(ROOT_INO, c"x", &file(1, false)).unwrap();
        let f2 = t.lookup(5, c"y", &file(1, false)).unwrap();
        assert_eq!(f1.ino, f2.ino);
        let exe = t.lookup(ROOT_INO, c"z", &file(1, true)).unwrap();
        assert_ne!(
            exe.ino, f1.ino,
            "the executable bit is part of the identity"
        );
        let d1 = t.lookup(ROOT_INO, c"d1", &dir(7)).unwrap();
        let d2 = t.lookup(ROOT_INO, c"d2", &dir(7)).unwrap();
        assert_ne!(d1.ino, d2.ino);
    }

    #[test]
    fn readdir_numbers_match_lookups_and_do_not_count() {
        let t = table(100);
        let nodes = [(c"a", file(1, false)), (c"b", dir(2))];
        let inos = t
            .numbers(ROOT_INO, nodes.iter().map(|(n, node)| (*n, node)))
            .unwrap();
        assert_eq!(inos.len(), 2);
        for ino in &inos {
            assert_eq!(t.lookups(*ino), Some(0));
        }
        assert_eq!(t.lookup(ROOT_INO, c"b", &dir(2)).unwrap().ino, inos[1]);
    }

    #[test]
    fn a_hostile_guest_cannot_grow_the_table_past_its_cap() {
        let cap = 64;
        let t = table(cap);
        // Look up many distinct entries and forget each: the table recycles.
        for i in 0..10_000u32 {
            let name = CString::new(format!("f{i}")).unwrap();
            let inode = t.lookup(ROOT_INO, &name, &dir((i % 251) as u8)).unwrap();
            t.forget(inode.ino, 1);
            assert!(t.len() <= cap);
        }
        // Forgotten entries of the root keep working (with new numbers if evicted).
        let again = t.lookup(ROOT_INO, c"f1", &dir(1)).unwrap();
        assert!(t.get(again.ino).is_ok());
    }

    #[test]
    fn a_full_table_of_referenced_inodes_refuses_new_ones() {
        let t = table(4);
        let mut held = Vec::new();
        for i in 0..3u8 {
            held.push(t.lookup(ROOT_INO, c"n", &file(i, false)).unwrap().ino);
        }
        let err = t.lookup(ROOT_INO, c"n", &file(9, false)).unwrap_err();
        assert!(matches!(err, FsError::InodeTableFull { cap: 4 }));
        assert_eq!(err.errno(), libc::ENOMEM);
        // Known entries still resolve.
        assert_eq!(
            t.lookup(ROOT_INO, c"n", &file(0, false)).unwrap().ino,
            held[0]
        );
        // Once the kernel forgets one, there is room again, and the forgotten one is gone.
        t.forget(held[1], 1);
        let new = t.lookup(ROOT_INO, c"n", &file(9, false)).unwrap();
        assert!(t.get(held[1]).is_err());
        assert!(new.ino > held[2], "numbers are never reused");
        // readdir numbering on a full table: an error only if nothing fits.
        let more = [file(10, false), file(11, false)];
        let err = t
            .numbers(ROOT_INO, more.iter().map(|n| (c"m", n)))
            .unwrap_err();
        assert!(matches!(err, FsError::InodeTableFull { .. }));
    }

    #[test]
    fn root_is_never_forgotten_or_evicted() {
        let t = table(2);
        t.forget(ROOT_INO, 10);
        let a = t.lookup(ROOT_INO, c"a", &file(1, false)).unwrap();
        t.forget(a.ino, 1);
        let b = t.lookup(ROOT_INO, c"b", &file(2, false)).unwrap();
        assert!(t.get(ROOT_INO).is_ok());
        assert!(t.get(b.ino).is_ok());
        assert_eq!(t.len(), 2);
        assert!(t.get(ROOT_INO).unwrap().cached_listing().is_some());
    }

    #[test]
    fn unknown_numbers_are_stale() {
        let t = table(10);
        assert!(matches!(t.get(12345), Err(FsError::StaleInode(12345))));
        t.forget(12345, 1); // ignored, no panic
    }
}
