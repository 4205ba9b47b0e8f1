//! A pool of pre-booted, single-use VMs.
//!
//! A VM is booted before any request exists: its agent says Hello and waits for a job, its
//! virtio-fs daemon waits for its root. A request of the pool's shape takes one, hands it
//! its inputs and its job, and the VM is thrown away after that one build like any other;
//! the pool boots a replacement in the background. So the request skips the boot (most of
//! a build's time under TCG) without ever sharing a VM between two builds.
//!
//! The filler boots one VM at a time (a boot is CPU-bound and competes with running builds),
//! backs off after failures so a broken setup does not spin, and drops idle VMs that ended
//! on their own.

use super::boot::{Background, BootedVm, Booter};
use super::policy::BootShape;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};

/// The nice value of pre-boots: under contention they get about a tenth of a core's time
/// against a build's VM (CFS weights 110 vs 1024), so they neither slow running builds much
/// nor starve past the boot deadline on a busy host.
const BACKGROUND_NICE: i32 = 10;

/// The longest pause between failed boots.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// VMs booted and waiting now.
    pub idle: usize,
    /// Requests served by a pre-booted VM.
    pub hits: u64,
    /// Requests of the pool's shape that found none waiting.
    pub misses: u64,
    /// Boots that failed.
    pub boot_failures: u64,
    /// Idle VMs found ended (dropped unused).
    pub lost: u64,
}

struct Shared {
    shape: BootShape,
    size: usize,
    state: Mutex<State>,
    /// Wakes the filler when a VM was taken.
    taken: Notify,
}

#[derive(Default)]
struct State {
    idle: VecDeque<BootedVm>,
    stats: PoolStats,
    next: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Each critical section leaves the queue and counters consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pool; dropping it stops the filler and kills every idle VM.
pub struct Pool {
    shared: Arc<Shared>,
    filler: JoinHandle<()>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.filler.abort();
        // The filler's in-flight boot (if any) is dropped with its task; idle VMs go here.
        self.shared.lock().idle.clear();
    }
}

impl Pool {
    /// Starts filling a pool of `size` VMs of `shape`. Must be called within a tokio
    /// runtime, on which the filler runs for the pool's life.
    pub(super) fn start(booter: Booter, shape: BootShape, size: usize) -> Self {
        let shared = Arc::new(Shared {
            shape,
            size,
            state: Mutex::new(State::default()),
            taken: Notify::new(),
        });
        let background = background();
        let span = info_span!("vm_pool", size, shape = ?shared.shape);
        let filler = tokio::spawn(fill(booter, shared.clone(), background).instrument(span));
        Self { shared, filler }
    }

    /// The shape of the pool's VMs.
    pub fn shape(&self) -> &BootShape {
        &self.shared.shape
    }

    /// A booted VM for a request needing `shape`, if one of that shape is waiting. Only an
    /// equal shape will do: a VM has exactly the memory, devices and shares it booted with
    /// (a request for a read-only host path cannot take a VM booted without its share).
    pub fn take(&self, shape: &BootShape) -> Option<BootedVm> {
        if *shape != self.shared.shape {
            return None;
        }
        let mut state = self.shared.lock();
        let found = loop {
            let Some(mut vm) = state.idle.pop_front() else {
                break None;
            };
            if vm.has_ended() {
                state.stats.lost += 1;
                warn!(vm = %vm.name(), "a pre-booted VM ended while idle; dropped");
                continue;
            }
            break Some(vm);
        };
        match found {
            Some(_) => state.stats.hits += 1,
            None => state.stats.misses += 1,
        }
        state.stats.idle = state.idle.len();
        drop(state);
        self.shared.taken.notify_one();
        found
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        PoolStats {
            idle: state.idle.len(),
            ..state.stats
        }
    }

    /// Waits until `n` VMs are idle (at most the pool's size), or `limit` passes; true if
    /// they are. For start-up and tests.
    pub async fn wait_idle(&self, n: usize, limit: Duration) -> bool {
        let n = n.min(self.shared.size);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.shared.lock().idle.len() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Pre-boots run in the background if their VMs can be brought back to the service's own
/// priority when assigned; otherwise at that priority from the start.
fn background() -> Option<Background> {
    let Some(own) = own_nice() else {
        warn!("cannot read this process's nice value; pre-boots run at normal priority");
        return None;
    };
    if own >= BACKGROUND_NICE {
        return None;
    }
    if !crate::vm::process::may_lower_nice(own) {
        info!(
            "pre-boots run at normal priority: without CAP_SYS_NICE or RLIMIT_NICE an assigned VM \
             could not get its priority back"
        );
        return None;
    }
    Some(Background {
        nice: BACKGROUND_NICE,
        foreground: own,
    })
}

/// This process's nice value (field 19 of /proc/self/stat).
fn own_nice() -> Option<i32> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it start at field 3.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19 - 3)?.parse().ok()
}

/// Keeps `shared.size` VMs idle, booting one at a time.
async fn fill(booter: Booter, shared: Arc<Shared>, background: Option<Background>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (missing, name) = {
            let mut state = shared.lock();
            // Idle VMs that ended on their own are not worth keeping.
            let before = state.idle.len();
            state.idle.retain_mut(|vm| !vm.has_ended());
            let lost = (before - state.idle.len()) as u64;
            if lost > 0 {
                warn!(lost, "pre-booted VMs ended while idle; dropped");
            }
            state.stats.lost += lost;
            state.next += 1;
            let name = format!("pool-{}-{}", std::process::id(), state.next);
            (shared.size.saturating_sub(state.idle.len()), name)
        };
        if missing == 0 {
            shared.taken.notified().await;
            continue;
        }
        match booter
            .boot(&name, shared.shape.clone(), None, background)
            .await
        {
            Ok(vm) => {
                info!(vm = %name, boot_ms = vm.boot_time().as_millis() as u64, "pre-booted a VM");
                let mut state = shared.lock();
                state.idle.push_back(vm);
                state.stats.idle = state.idle.len();
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                shared.lock().stats.boot_failures += 1;
                warn!(
                    error = %crate::castore::error::error_chain(&e),
                    retry_in_ms = backoff.as_millis() as u64,
                    "pre-booting a VM failed"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of `shape` whose filler never boots anything.
    fn pool_without_filler(shape: BootShape) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                shape,
                size: 1,
                state: Mutex::new(State::default()),
                taken: Notify::new(),
            }),
            filler: tokio::spawn(std::future::pending()),
        }
    }

    #[tokio::test]
    async fn a_request_for_a_read_only_host_path_never_takes_a_pre_booted_vm() {
        let plain = BootShape {
            memory_mib: 512,
            nested_virtualization: false,
            network: false,
            ro_paths: Vec::new(),
        };
        let pool = pool_without_filler(plain.clone());
        let with_ro = BootShape {
            ro_paths: vec!["/srv/data".into()],
            ..plain.clone()
        };
        assert!(pool.take(&with_ro).is_none());
        // Refused for its shape, before looking for an idle VM (that would count a miss).
        assert_eq!(pool.stats().misses, 0);
        assert!(pool.take(&plain).is_none());
        assert_eq!(pool.stats().misses, 1);
    }

    #[test]
    fn reads_its_own_nice_value() {
        let before = own_nice().unwrap();
        assert!((-20..=19).contains(&before));
        // Raising one's own nice value is always allowed; do it on a thread of our own
        // (Linux keeps nice per thread, and /proc/self/stat reports the main thread's).
        let from_thread = std::thread::spawn(|| {
            // SAFETY: setpriority takes plain integers and touches no memory.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) }, 0);
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 1..];
            after
                .split_whitespace()
                .nth(16)
                .unwrap()
                .parse::<i32>()
                .unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(from_thread, 19);
        assert_eq!(own_nice().unwrap(), before);
    }
}
