//! The table of open file handles, with a hard cap so a guest cannot make the daemon hold
//! an unbounded number of readers (and, for local blobs, file descriptors).

use super::error::FsError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Open handles by number. Numbers start at 1 and are never reused.
#[derive(Debug)]
pub struct HandleTable<T> {
    inner: Mutex<Inner<T>>,
    max: usize,
}

#[derive(Debug)]
struct Inner<T> {
    open: HashMap<u64, Arc<T>>,
    next: u64,
}

impl<T> HandleTable<T> {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                open: HashMap::new(),
                next: 1,
            }),
            max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // Inserts and removals cannot leave the map half-changed, so a poisoned lock still
        // guards a usable table.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails fast when the table is full, before the caller does the work of opening.
    pub fn check_room(&self) -> Result<(), FsError> {
        if self.lock().open.len() >= self.max {
            return Err(FsError::TooManyHandles { max: self.max });
        }
        Ok(())
    }

    /// Stores `value` under a new handle number.
    pub fn insert(&self, value: T) -> Result<u64, FsError> {
        let mut inner = self.lock();
        if inner.open.len() >= self.max {
            return Err(FsError::TooManyHandles { max: self.max });
        }
        let h = inner.next;
        inner.next += 1;
        inner.open.insert(h, Arc::new(value));
        Ok(h)
    }

    pub fn get(&self, handle: u64) -> Result<Arc<T>, FsError> {
        self.lock()
            .open
            .get(&handle)
            .cloned()
            .ok_or(FsError::BadHandle(handle))
    }

    pub fn remove(&self, handle: u64) -> Result<Arc<T>, FsError> {
        self.lock()
            .open
            .remove(&handle)
            .ok_or(FsError::BadHandle(handle))
    }

    pub fn clear(&self) {
        self.lock().open.clear();
    }

    pub fn len(&self) -> usize {
        self.lock().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_open_handles_and_frees_on_remove() {
        let t = HandleTable::new(2);
        let a = t.insert("a").unwrap();
        let b = t.insert("b").unwrap();
        assert_ne!(a, b);
        assert!(matches!(
            t.check_room(),
            Err(FsError::TooManyHandles { max: 2 })
        ));
        let err = t.insert("c").unwrap_err();
        assert_eq!(err.errno(), libc::ENFILE);
        assert_eq!(*t.get(b).unwrap(), "b");
        t.remove(a).unwrap();
        t.check_room().unwrap();
        let c = t.insert("c").unwrap();
        assert!(c > b, "numbers are never reused");
        assert!(matches!(t.get(a), Err(FsError::BadHandle(h)) if h == a));
        assert!(t.remove(a).is_err());
        assert_eq!(t.len(), 2);
        t.clear();
        assert!(t.is_empty());
    }
}
