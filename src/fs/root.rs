//! The share's root entries, which may be assigned after the VM has booted.
//!
//! A pooled VM boots, and its guest may mount the share, before anyone knows which build it
//! will serve. Until the root is assigned, the mount itself works (FUSE init, the root's
//! attributes, statfs: none depends on the entries); anything that needs the root's entries
//! (lookup, readdir) waits for the assignment, for a bounded time. The host assigns the root
//! before it hands the guest its job, so in practice nothing waits.

use super::inode::Inode;
use super::listing::Listing;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Opened once, when the root's entries are known.
#[derive(Debug, Default)]
pub struct RootGate {
    assigned: Mutex<bool>,
    opened: Condvar,
}

impl RootGate {
    /// Waits until the gate opens or `limit` passes; true if it is open.
    pub fn wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        // The flag is a plain bool, valid whatever a panicking holder did.
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        while !*assigned {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            assigned = match self.opened.wait_timeout(assigned, left) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    fn open(&self) {
        *self.assigned.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.opened.notify_all();
    }
}

/// The one right to assign the root of a filesystem created without one.
#[derive(Debug)]
pub struct RootAssigner {
    root: Arc<Inode>,
    gate: Arc<RootGate>,
}

impl RootAssigner {
    pub(super) fn new(root: Arc<Inode>, gate: Arc<RootGate>) -> Self {
        Self { root, gate }
    }

    /// Gives the root its entries and wakes every request waiting for them. Consumes the
    /// assigner: a root is assigned at most once.
    pub fn assign(self, entries: Listing) {
        self.root.cache_listing(Arc::new(entries));
        self.gate.open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_times_out_closed_and_returns_at_once_when_open() {
        let gate = Arc::new(RootGate::default());
        let started = Instant::now();
        assert!(!gate.wait(Duration::from_millis(30)));
        assert!(started.elapsed() >= Duration::from_millis(30));

        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.wait(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(20));
        gate.open();
        assert!(waiter.join().unwrap());
        assert!(gate.wait(Duration::ZERO));
    }
}
