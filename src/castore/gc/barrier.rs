//! The GC barrier: digests the store's users touch while a GC runs.
//!
//! Every blob `has`/`open_read`/upload and every directory put registers the digests it is
//! about to rely on here *before* it checks whether they are present. While no GC runs,
//! registering costs one uncontended lock and nothing is kept. While one runs, the sweep
//! takes what was registered and marks it (with its closure) before each batch, and deletes
//! a batch while holding the same lock: so a digest registered before a batch is never in
//! it, and an operation registering during a batch waits for that batch (one shard of
//! blobs, or the one directory transaction), then finds the object present or absent, never
//! half-deleted.
//!
//! There is one barrier per process: a process with several embedded stores (tests) keeps a
//! little more during a GC, never less.

use crate::castore::B3Digest;
use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard};

/// `None` while no GC runs; else what was touched since the sweep last looked.
pub struct Barrier {
    touched: Mutex<Option<HashSet<B3Digest>>>,
}

static BARRIER: Barrier = Barrier {
    touched: Mutex::new(None),
};

/// The process's barrier.
pub fn barrier() -> &'static Barrier {
    &BARRIER
}

/// Registers `digests` with the process's barrier (see the module doc).
pub fn touch<'a>(digests: impl IntoIterator<Item = &'a B3Digest>) {
    let mut guard = BARRIER.lock();
    if let Some(set) = guard.as_mut() {
        set.extend(digests);
    }
}

impl Barrier {
    fn lock(&self) -> MutexGuard<'_, Option<HashSet<B3Digest>>> {
        // A panic while holding the lock left at worst a set that is too large: keep going.
        self.touched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts recording; fails if a GC already runs in this process.
    pub(super) fn start(&self) -> Result<Active<'_>, AlreadyRunning> {
        let mut guard = self.lock();
        if guard.is_some() {
            return Err(AlreadyRunning);
        }
        *guard = Some(HashSet::new());
        Ok(Active { barrier: self })
    }
}

/// Another GC runs in this process.
#[derive(Debug, thiserror::Error)]
#[error("a garbage collection is already running in this process")]
pub struct AlreadyRunning;

/// A running GC's hold on the barrier; recording stops when it is dropped.
pub(super) struct Active<'a> {
    barrier: &'a Barrier,
}

impl Active<'_> {
    /// Locks the barrier: nothing new can be touched until the guard is dropped.
    pub(super) fn hold(&self) -> Held<'_> {
        Held {
            guard: self.barrier.lock(),
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        *self.barrier.lock() = None;
    }
}

/// The barrier, locked.
pub(super) struct Held<'a> {
    guard: MutexGuard<'a, Option<HashSet<B3Digest>>>,
}

impl Held<'_> {
    /// What was touched since the last call.
    pub(super) fn take(&mut self) -> HashSet<B3Digest> {
        self.guard.as_mut().map(std::mem::take).unwrap_or_default()
    }
}
