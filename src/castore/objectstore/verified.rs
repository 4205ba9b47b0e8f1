//! Chunk lists known to be right: blob indexes this process has read and proven.
//!
//! An index object is not self-checking: it could list valid chunks of another blob, so a
//! reader hashes a whole sequential read and compares it to the blob's digest. Once that
//! matched, the list is known to assemble the blob (each chunk is still checked against
//! its own digest on every read), so this process keeps it in memory: a later read whose
//! index (still fetched from the bucket) lists exactly these chunks skips the second,
//! whole-blob hash. Memory is the one place here that nobody else writes to; nothing on
//! disk or in the bucket is trusted this way.

use crate::castore::B3Digest;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// A blob's chunks: (digest, size) in order; empty when the blob is one chunk.
pub type ChunkList = Arc<[(B3Digest, u64)]>;

/// At most this many blobs are remembered.
const MAX_BLOBS: usize = 16 * 1024;
/// At most this many chunk entries in all (40 bytes each: about 10 MiB, the lists of
/// some 64 GiB of blobs).
const MAX_CHUNKS: usize = 256 * 1024;

#[derive(Default)]
struct State {
    lists: HashMap<B3Digest, ChunkList>,
    /// Insertion order, oldest first: the first out when full.
    order: VecDeque<B3Digest>,
    chunks: usize,
}

/// Proven chunk lists, bounded ([`MAX_BLOBS`], [`MAX_CHUNKS`]), oldest out first.
#[derive(Default)]
pub struct VerifiedLists {
    state: Mutex<State>,
    max_blobs: usize,
    max_chunks: usize,
}

impl VerifiedLists {
    pub fn new() -> Self {
        Self::with_limits(MAX_BLOBS, MAX_CHUNKS)
    }

    fn with_limits(max_blobs: usize, max_chunks: usize) -> Self {
        Self {
            state: Mutex::default(),
            max_blobs,
            max_chunks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change leaves the state whole; a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The proven list of `blob`, if any.
    pub fn get(&self, blob: &B3Digest) -> Option<ChunkList> {
        self.lock().lists.get(blob).cloned()
    }

    /// Remembers that `list` assembles `blob`. Call only after the bytes proved it. A list
    /// longer than the whole budget is not kept.
    pub fn insert(&self, blob: B3Digest, list: ChunkList) {
        if list.len() > self.max_chunks {
            return;
        }
        let mut st = self.lock();
        if st.lists.contains_key(&blob) {
            return;
        }
        while st.lists.len() >= self.max_blobs || st.chunks + list.len() > self.max_chunks {
            let Some(old) = st.order.pop_front() else {
                break;
            };
            if let Some(l) = st.lists.remove(&old) {
                st.chunks -= l.len();
            }
        }
        st.chunks += list.len();
        st.order.push_back(blob);
        st.lists.insert(blob, list);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn d(i: u8) -> B3Digest {
        B3Digest::of(&[i])
    }

    fn list(n: usize) -> ChunkList {
        (0..n).map(|i| (d(i as u8), 1)).collect()
    }

    #[test]
    fn the_blob_count_bound_pushes_out_the_oldest() {
        let v = VerifiedLists::with_limits(2, 100);
        v.insert(d(1), list(2));
        v.insert(d(2), list(2));
        assert_eq!(v.get(&d(1)).unwrap().len(), 2);
        v.insert(d(3), list(1));
        assert!(v.get(&d(1)).is_none());
        assert!(v.get(&d(2)).is_some() && v.get(&d(3)).is_some());
    }

    #[test]
    fn the_chunk_bound_pushes_out_as_many_as_needed() {
        let v = VerifiedLists::with_limits(100, 5);
        v.insert(d(1), list(2));
        v.insert(d(2), list(1));
        v.insert(d(3), list(2));
        // 5 + 3 > 5: d(1) (2 chunks) and d(2) (1) go, d(3) stays.
        v.insert(d(4), list(3));
        assert!(v.get(&d(1)).is_none() && v.get(&d(2)).is_none());
        assert!(v.get(&d(3)).is_some() && v.get(&d(4)).is_some());
        assert_eq!(v.lock().chunks, 5);
        // Longer than the whole budget: not kept, nothing pushed out for it.
        v.insert(d(5), list(6));
        assert!(v.get(&d(5)).is_none());
        assert!(v.get(&d(3)).is_some() && v.get(&d(4)).is_some());
    }
}
