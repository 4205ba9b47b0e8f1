//! A bounded cache of chunks on local disk, so a host fetches a chunk from the bucket once.
//!
//! One file per chunk, named by its hex digest, holding the chunk's plain bytes. The total
//! of the files never exceeds the size given: room is made (least recently used first)
//! before a chunk is written. The order survives a restart through the files' modification
//! times, which a read refreshes. Every read is checked against the digest; a file that
//! does not match (a bad disk, a hand edit) is deleted and reported as a miss, so the
//! caller fetches the chunk again.

use super::blob::verify_chunk;
use crate::castore::{B3Digest, Error};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Prefix of files being written; left-overs of a crash are removed at open.
const TMP_PREFIX: &str = ".tmp-";

#[derive(Default)]
struct State {
    /// digest -> (size, last use).
    entries: HashMap<B3Digest, (u64, u64)>,
    /// last use -> digest, oldest first.
    by_use: BTreeMap<u64, B3Digest>,
    total: u64,
    clock: u64,
}

impl State {
    fn touch(&mut self, d: &B3Digest) {
        self.clock += 1;
        let now = self.clock;
        if let Some((_, used)) = self.entries.get_mut(d) {
            self.by_use.remove(used);
            *used = now;
            self.by_use.insert(now, *d);
        }
    }

    fn insert(&mut self, d: B3Digest, size: u64) {
        self.clock += 1;
        self.entries.insert(d, (size, self.clock));
        self.by_use.insert(self.clock, d);
        self.total += size;
    }

    fn remove(&mut self, d: &B3Digest) -> Option<u64> {
        let (size, used) = self.entries.remove(d)?;
        self.by_use.remove(&used);
        self.total -= size;
        Some(size)
    }
}

/// Chunks on local disk, at most `max_bytes` of them.
pub struct ChunkCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

/// Reads a cached chunk through one open file and checks it; `None` if it cannot be read
/// or does not match. Refreshes the file's modification time (the order kept for the next
/// start; failing that only costs order).
fn read_checked(path: &Path, digest: &B3Digest, size: Option<u64>) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    // A file of another length than the index says is corrupt, and not worth reading;
    // nor is one larger than any chunk (the read below is bounded by it either way).
    let limit = size.unwrap_or(super::blob::MAX_READ_CHUNK as u64);
    if len > limit || size.is_some_and(|s| s != len) {
        return None;
    }
    let mut data = Vec::with_capacity(len as usize);
    (&mut file).take(limit).read_to_end(&mut data).ok()?;
    verify_chunk(digest, size, &data).ok()?;
    // futimens on the descriptor already open: the owner may set times on a read-only fd.
    let _ = file.set_modified(SystemTime::now());
    Some(data)
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

impl ChunkCache {
    /// Opens (or creates) the cache in `dir`, takes in the chunks a previous run left
    /// (oldest use first), and evicts down to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let mut found = Vec::new();
        let listing =
            std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
        for entry in listing {
            let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name();
            let digest = name.to_str().and_then(|n| n.parse::<B3Digest>().ok());
            let meta = entry.metadata().ok().filter(|m| m.is_file());
            match (digest, meta) {
                (Some(d), Some(m)) => {
                    let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((used, d, m.len()));
                }
                // Half-written files of a crash and anything else that is not a chunk.
                (_, Some(_)) => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
        found.sort();
        let cache = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(State::default()),
        };
        {
            let mut st = cache.lock();
            for (_, d, size) in found {
                st.insert(d, size);
            }
            cache.evict_until(&mut st, 0);
        }
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is only changed together with files; a panic mid-way at worst leaves
        // an entry whose file is gone, which a read treats as a miss.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, d: &B3Digest) -> PathBuf {
        self.dir.join(d.to_hex())
    }

    /// Removes least recently used chunks until `incoming` more bytes fit.
    fn evict_until(&self, st: &mut State, incoming: u64) {
        while st.total + incoming > self.max_bytes {
            let Some((_, d)) = st.by_use.iter().next().map(|(k, v)| (*k, *v)) else {
                break;
            };
            st.remove(&d);
            let _ = std::fs::remove_file(self.path(&d));
        }
    }

    /// The bytes in use.
    pub fn used_bytes(&self) -> u64 {
        self.lock().total
    }

    /// The chunk if cached and intact. A cached file that does not hash to `digest` (or
    /// has not `size` bytes) is removed and reported as absent.
    ///
    /// The lock is held only to look the entry up and to record the outcome, not while
    /// the file is read and hashed: the chunks a reader fetches ahead are read and checked
    /// in parallel. Meanwhile an eviction may unlink the file (the open file still reads
    /// whole, or the open fails: a miss), and a put of the same digest cannot happen
    /// (the entry exists), so what is read is this digest's file or nothing.
    pub fn get(&self, digest: &B3Digest, size: Option<u64>) -> Option<Bytes> {
        if !self.lock().entries.contains_key(digest) {
            return None;
        }
        let path = self.path(digest);
        let read = read_checked(&path, digest, size);
        let mut st = self.lock();
        match read {
            Some(data) => {
                st.touch(digest);
                Some(Bytes::from(data))
            }
            None => {
                // Gone already if evicted meanwhile; then there is nothing to remove.
                if st.remove(digest).is_some() {
                    let _ = std::fs::remove_file(&path);
                }
                None
            }
        }
    }

    /// Keeps a chunk whose bytes the caller has checked. Chunks larger than the whole
    /// cache are not kept.
    pub fn put(&self, digest: &B3Digest, data: &[u8]) -> Result<(), Error> {
        let size = data.len() as u64;
        if size > self.max_bytes {
            return Ok(());
        }
        let mut st = self.lock();
        if st.entries.contains_key(digest) {
            st.touch(digest);
            return Ok(());
        }
        self.evict_until(&mut st, size);
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}", digest.to_hex()));
        let path = self.path(digest);
        std::fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", tmp.display())))?;
        st.insert(*digest, size);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chunk(i: u8, len: usize) -> (B3Digest, Vec<u8>) {
        let data = vec![i; len];
        (B3Digest::of(&data), data)
    }

    fn files_total(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn least_recently_used_goes_first_and_the_size_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 3000).unwrap();
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        let (c, dc) = chunk(3, 1000);
        let (d, dd) = chunk(4, 1000);
        cache.put(&a, &da).unwrap();
        cache.put(&b, &db).unwrap();
        cache.put(&c, &dc).unwrap();
        // a is used, so b is now the oldest.
        assert_eq!(cache.get(&a, Some(1000)).unwrap(), da);
        cache.put(&d, &dd).unwrap();
        assert!(cache.get(&b, None).is_none());
        assert!(cache.get(&a, None).is_some());
        assert!(cache.get(&c, None).is_some());
        assert!(cache.get(&d, None).is_some());
        assert_eq!(cache.used_bytes(), 3000);
        assert!(files_total(dir.path()) <= 3000);
        // Bigger than the whole cache: not kept, nothing evicted for it.
        let (big, dbig) = chunk(5, 4000);
        cache.put(&big, &dbig).unwrap();
        assert!(cache.get(&big, None).is_none());
        assert_eq!(cache.used_bytes(), 3000);
    }

    #[test]
    fn survives_a_restart_and_shrinks_to_a_smaller_size() {
        let dir = tempfile::tempdir().unwrap();
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        {
            let cache = ChunkCache::open(dir.path(), 4000).unwrap();
            cache.put(&a, &da).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            cache.put(&b, &db).unwrap();
        }
        std::fs::write(dir.path().join(".tmp-leftover"), b"x").unwrap();
        let cache = ChunkCache::open(dir.path(), 4000).unwrap();
        assert_eq!(cache.get(&a, None).unwrap(), da);
        assert_eq!(cache.used_bytes(), 2000);
        assert!(!dir.path().join(".tmp-leftover").exists());
        drop(cache);
        std::thread::sleep(std::time::Duration::from_millis(20));
        // a was read last, so b goes when the cache shrinks.
        let cache = ChunkCache::open(dir.path(), 1000).unwrap();
        assert!(cache.get(&b, None).is_none());
        assert!(cache.get(&a, None).is_some());
        assert!(files_total(dir.path()) <= 1000);
    }

    #[test]
    fn a_corrupt_file_is_a_miss_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 4000).unwrap();
        let (a, mut da) = chunk(1, 1000);
        cache.put(&a, &da).unwrap();
        da[10] ^= 1;
        std::fs::write(dir.path().join(a.to_hex()), &da).unwrap();
        assert!(cache.get(&a, None).is_none());
        assert!(!dir.path().join(a.to_hex()).exists());
        assert_eq!(cache.used_bytes(), 0);
    }
}
