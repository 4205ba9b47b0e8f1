//! Admission control: at most `max_running` VMs at once and at most `max_queued` requests
//! waiting for one; beyond that a request is refused at once (the client's
//! `RESOURCE_EXHAUSTED`) instead of piling up into a launch storm.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the build queue is full ({running} building, {queued} waiting, at most {max_queued} may wait)"
)]
pub struct QueueFull {
    pub running: usize,
    pub queued: usize,
    pub max_queued: usize,
}

#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    max_running: usize,
    max_queued: usize,
    queued: Arc<AtomicUsize>,
}

/// Held while a build runs; frees its slot when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// Counts a waiting request; decrements on drop, so a cancelled waiter leaves the queue.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// `max_running` is at least 1.
    pub fn new(max_running: usize, max_queued: usize) -> Self {
        let max_running = max_running.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max_running)),
            max_running,
            max_queued,
            queued: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A default for this host: one VM per core, and per 1 GiB of memory, whichever is fewer.
    pub fn default_max_running(cores: usize, memory_bytes: u64, vm_memory_bytes: u64) -> usize {
        let by_memory = memory_bytes / vm_memory_bytes.saturating_add(1 << 30).max(1);
        cores
            .min(usize::try_from(by_memory).unwrap_or(usize::MAX))
            .max(1)
    }

    pub fn running(&self) -> usize {
        self.max_running - self.slots.available_permits()
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Waits for a slot, or fails at once when the queue is full.
    pub async fn admit(&self) -> Result<Slot, QueueFull> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        let prev = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < self.max_queued).then_some(q + 1)
            })
            .map_err(|queued| QueueFull {
                running: self.running(),
                queued,
                max_queued: self.max_queued,
            })?;
        let _waiting = Waiting(Arc::clone(&self.queued));
        debug_assert!(prev < self.max_queued);
        let permit = Arc::clone(&self.slots)
            .acquire_owned()
            .await
            .map_err(|_| QueueFull {
                running: self.running(),
                queued: prev,
                max_queued: self.max_queued,
            })?;
        Ok(Slot { _permit: permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn admits_up_to_limit_queues_then_refuses() {
        let a = Arc::new(Admission::new(2, 1));
        let s1 = a.admit().await.unwrap();
        let _s2 = a.admit().await.unwrap();
        assert_eq!(a.running(), 2);

        let a2 = Arc::clone(&a);
        let waiter = tokio::spawn(async move { a2.admit().await });
        while a.queued() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(
            a.admit().await.unwrap_err(),
            QueueFull {
                running: 2,
                queued: 1,
                max_queued: 1
            }
        );
        drop(s1);
        let _s3 = waiter.await.unwrap().unwrap();
        assert_eq!(a.queued(), 0);
        assert_eq!(a.running(), 2);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let a = Arc::new(Admission::new(1, 1));
        let _s = a.admit().await.unwrap();
        let a2 = Arc::clone(&a);
        let waiter = tokio::spawn(async move { a2.admit().await });
        while a.queued() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.queued(), 0);
    }

    #[test]
    fn default_is_bounded_by_cores_and_memory() {
        const G: u64 = 1 << 30;
        assert_eq!(Admission::default_max_running(2, 24 * G, 512 << 20), 2);
        assert_eq!(Admission::default_max_running(64, 4 * G, 512 << 20), 2);
        assert_eq!(Admission::default_max_running(8, 0, 512 << 20), 1);
    }
}
