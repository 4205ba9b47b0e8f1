//! Admission control: at most `max_running` VMs at once and at most `max_queued` requests
//! waiting for one, shared fairly between tenants.
//!
//! Each tenant has its own limits ([`TenantLimits`]): VMs it may run at once, requests it
//! may have waiting, and a weight. When a VM slot frees, it goes to the waiting tenant with
//! the fewest running builds per unit of weight (ties: the oldest waiter), so one tenant's
//! burst does not starve another's single build. A tenant at its own `max_vms` waits even
//! when slots are free; a tenant (or the host) whose queue is full is refused at once (the
//! client's `RESOURCE_EXHAUSTED`, naming the limit) instead of piling up into a launch
//! storm. Admission is per build, so a pre-booted pool VM counts against whoever takes it.
//!
//! The invariant that keeps this simple: after every change of state the free slots are
//! handed out ([`State::dispatch`]), so no waiter that could run is ever left waiting, and a
//! newcomer that may run can take a free slot without jumping anyone.

use super::tenant::Tenant;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// A request refused because a queue is full.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueFull {
    #[error(
        "the build queue is full ({running} building, {queued} waiting, at most {max_queued} may wait)"
    )]
    Host {
        running: usize,
        queued: usize,
        max_queued: usize,
    },
    #[error(
        "tenant {tenant} has {queued} builds waiting, at most {max_queued} may wait ({limit}); {running} of its builds are running"
    )]
    Tenant {
        tenant: String,
        /// The configuration key of the limit.
        limit: String,
        running: usize,
        queued: usize,
        max_queued: usize,
    },
}

/// What one tenant may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantLimits {
    /// VMs running at once.
    pub max_vms: usize,
    /// Requests waiting for a VM.
    pub max_queue: usize,
    /// Its share of the VMs relative to other tenants' weights (at least 1).
    pub weight: u32,
    /// Bytes it may add to the store per hour ([`super::quota`]); `None`: no limit.
    pub upload_bytes_per_hour: Option<u64>,
    /// Pins it may hold on the embedded store ([`super::pins`]).
    pub max_pins: usize,
}

/// Pins a tenant may hold when nothing is configured.
pub const DEFAULT_MAX_PINS: usize = 10_000;

/// Limits per tenant: the configured ones by name, `default` for everyone else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shares {
    pub default: TenantLimits,
    pub tenants: BTreeMap<String, TenantLimits>,
}

impl Shares {
    /// No tenant configured: everyone may use the whole host, with equal weight.
    pub fn open(max_running: usize, max_queued: usize) -> Self {
        Self {
            default: TenantLimits {
                max_vms: max_running,
                max_queue: max_queued,
                weight: 1,
                upload_bytes_per_hour: None,
                max_pins: DEFAULT_MAX_PINS,
            },
            tenants: BTreeMap::new(),
        }
    }

    pub fn limits(&self, tenant: &Tenant) -> TenantLimits {
        self.tenants
            .get(tenant.as_str())
            .copied()
            .unwrap_or(self.default)
    }

    /// The configuration key of `tenant`'s `field` (for error messages).
    pub fn key(&self, tenant: &Tenant, field: &str) -> String {
        match self.tenants.contains_key(tenant.as_str()) {
            true => format!("tenants.{tenant}.{field}"),
            false => format!("tenant-defaults.{field}"),
        }
    }

    /// The tenant's name as a metric label: configured tenants by name, all others as
    /// `other`, so the number of series is bounded by the configuration.
    pub fn label<'a>(&'a self, tenant: &'a Tenant) -> &'a str {
        match self.tenants.contains_key(tenant.as_str()) {
            true => tenant.as_str(),
            false => "other",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    running: usize,
    queued: usize,
    /// When it was last given a slot ([`State::grants`] then); 0: not while it was known.
    last_grant: u64,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    tenant: Tenant,
    weight: u32,
    max_vms: usize,
    grant: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    queued: usize,
    next_seq: u64,
    /// Slots given so far: the clock of [`Counts::last_grant`].
    grants: u64,
    /// Only tenants with something running or waiting: bounded by the slots and the queue.
    tenants: HashMap<Tenant, Counts>,
    /// In arrival order.
    waiters: Vec<Waiter>,
}

impl State {
    fn counts(&self, tenant: &Tenant) -> Counts {
        self.tenants.get(tenant).copied().unwrap_or_default()
    }

    fn update(&mut self, tenant: &Tenant, f: impl FnOnce(&mut Counts)) {
        let c = self.tenants.entry(tenant.clone()).or_default();
        f(c);
        if c.running == 0 && c.queued == 0 {
            self.tenants.remove(tenant);
        }
    }

    /// Counts a slot given to `tenant` (`from_queue`: it was waiting).
    fn grant(&mut self, tenant: &Tenant, from_queue: bool) {
        self.grants += 1;
        let now = self.grants;
        self.running += 1;
        if from_queue {
            self.queued -= 1;
        }
        self.update(tenant, |c| {
            c.running += 1;
            c.last_grant = now;
            if from_queue {
                c.queued -= 1;
            }
        });
    }

    /// Hands free slots to waiters: the one with the fewest running builds per weight
    /// among those under their own `max_vms`; on a tie the tenant served least recently,
    /// then the oldest waiter.
    fn dispatch(&mut self, max_running: usize) {
        while self.running < max_running {
            // (index, running, weight, last_grant) of the best so far.
            let mut best: Option<(usize, u64, u32, u64)> = None;
            for (i, w) in self.waiters.iter().enumerate() {
                let c = self.counts(&w.tenant);
                if c.running >= w.max_vms {
                    continue;
                }
                let running = c.running as u64;
                let better = match best {
                    None => true,
                    Some((_, b_running, b_weight, b_last)) => {
                        // running/weight against b_running/b_weight, without division.
                        let mine = u128::from(running) * u128::from(b_weight);
                        let theirs = u128::from(b_running) * u128::from(w.weight);
                        mine < theirs || (mine == theirs && c.last_grant < b_last)
                    }
                };
                if better {
                    best = Some((i, running, w.weight, c.last_grant));
                }
            }
            let Some((i, ..)) = best else { break };
            let w = self.waiters.remove(i);
            self.grant(&w.tenant, true);
            // A receiver already gone belongs to a cancelled admit(); its guard sees the
            // waiter gone and gives the slot back.
            let _ = w.grant.send(());
        }
    }

    fn release(&mut self, tenant: &Tenant, max_running: usize) {
        self.running -= 1;
        self.update(tenant, |c| c.running -= 1);
        self.dispatch(max_running);
    }
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    max_running: usize,
    max_queued: usize,
    shares: Shares,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<Inner>,
}

/// Held while a build runs; frees its slot (and hands it on) when dropped.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<Inner>,
    tenant: Tenant,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.inner
            .lock()
            .release(&self.tenant, self.inner.max_running);
    }
}

/// A waiting request: when its admit() is dropped (the client went away) it leaves the
/// queue, or gives back the slot it was granted in the meantime.
struct WaitGuard {
    inner: Arc<Inner>,
    seq: u64,
    tenant: Tenant,
    claimed: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.claimed {
            return;
        }
        let mut s = self.inner.lock();
        match s.waiters.iter().position(|w| w.seq == self.seq) {
            Some(i) => {
                s.waiters.remove(i);
                s.queued -= 1;
                s.update(&self.tenant, |c| c.queued -= 1);
                // A waiter blocked behind this one's tenant changes nothing for others,
                // but the queue is smaller now.
            }
            None => s.release(&self.tenant, self.inner.max_running),
        }
    }
}

impl Admission {
    /// `max_running` is at least 1; every tenant has the same limits (the whole host).
    pub fn new(max_running: usize, max_queued: usize) -> Self {
        Self::with_shares(
            max_running,
            max_queued,
            Shares::open(max_running, max_queued),
        )
    }

    /// `max_running` is at least 1; weights of 0 count as 1.
    pub fn with_shares(max_running: usize, max_queued: usize, shares: Shares) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                max_running: max_running.max(1),
                max_queued,
                shares,
            }),
        }
    }

    /// A default for this host: one VM per core, and per 1 GiB of memory, whichever is fewer.
    pub fn default_max_running(cores: usize, memory_bytes: u64, vm_memory_bytes: u64) -> usize {
        let by_memory = memory_bytes / vm_memory_bytes.saturating_add(1 << 30).max(1);
        cores
            .min(usize::try_from(by_memory).unwrap_or(usize::MAX))
            .max(1)
    }

    pub fn shares(&self) -> &Shares {
        &self.inner.shares
    }

    pub fn running(&self) -> usize {
        self.inner.lock().running
    }

    pub fn queued(&self) -> usize {
        self.inner.lock().queued
    }

    /// (running, queued) by metric label ([`Shares::label`]): every configured tenant,
    /// idle ones at 0, and `other` when an unlisted tenant is busy.
    pub fn by_label(&self) -> BTreeMap<String, (usize, usize)> {
        let shares = &self.inner.shares;
        let mut out: BTreeMap<String, (usize, usize)> =
            shares.tenants.keys().map(|t| (t.clone(), (0, 0))).collect();
        for (tenant, c) in &self.inner.lock().tenants {
            let e = out.entry(shares.label(tenant).to_owned()).or_default();
            e.0 += c.running;
            e.1 += c.queued;
        }
        out
    }

    /// Waits for a slot for `tenant`, or fails at once when its queue or the host's is
    /// full. Dropping the future leaves the queue.
    pub async fn admit(&self, tenant: &Tenant) -> Result<Slot, QueueFull> {
        let inner = &self.inner;
        let limits = inner.shares.limits(tenant);
        let (seq, granted) = {
            let mut s = inner.lock();
            let mine = s.counts(tenant);
            // No waiter that could run is ever left waiting (see the module docs), so
            // taking a free slot now jumps nobody.
            if s.running < inner.max_running && mine.running < limits.max_vms {
                s.grant(tenant, false);
                return Ok(Slot {
                    inner: Arc::clone(inner),
                    tenant: tenant.clone(),
                });
            }
            if s.queued >= inner.max_queued {
                return Err(QueueFull::Host {
                    running: s.running,
                    queued: s.queued,
                    max_queued: inner.max_queued,
                });
            }
            if mine.queued >= limits.max_queue {
                return Err(QueueFull::Tenant {
                    tenant: tenant.to_string(),
                    limit: inner.shares.key(tenant, "max-queue"),
                    running: mine.running,
                    queued: mine.queued,
                    max_queued: limits.max_queue,
                });
            }
            let seq = s.next_seq;
            s.next_seq += 1;
            let (grant, granted) = oneshot::channel();
            s.waiters.push(Waiter {
                seq,
                tenant: tenant.clone(),
                weight: limits.weight.max(1),
                max_vms: limits.max_vms,
                grant,
            });
            s.queued += 1;
            s.update(tenant, |c| c.queued += 1);
            (seq, granted)
        };
        let mut guard = WaitGuard {
            inner: Arc::clone(inner),
            seq,
            tenant: tenant.clone(),
            claimed: false,
        };
        match granted.await {
            Ok(()) => {
                guard.claimed = true;
                Ok(Slot {
                    inner: Arc::clone(inner),
                    tenant: tenant.clone(),
                })
            }
            // Only dispatch() drops a sender, after sending: not reached; the guard
            // cleans up whatever happened.
            Err(_) => Err(QueueFull::Host {
                running: self.running(),
                queued: self.queued(),
                max_queued: inner.max_queued,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn t(name: &str) -> Tenant {
        Tenant::new(name).unwrap()
    }

    async fn until(mut f: impl FnMut() -> bool) {
        while !f() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn admits_up_to_limit_queues_then_refuses() {
        let a = Admission::new(2, 1);
        let anon = Tenant::anonymous();
        let s1 = a.admit(&anon).await.unwrap();
        let _s2 = a.admit(&anon).await.unwrap();
        assert_eq!(a.running(), 2);

        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit(&Tenant::anonymous()).await });
        until(|| a.queued() == 1).await;
        assert_eq!(
            a.admit(&anon).await.unwrap_err(),
            QueueFull::Host {
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
        let a = Admission::new(1, 1);
        let s = a.admit(&t("a")).await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit(&t("b")).await });
        until(|| a.queued() == 1).await;
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(a.queued(), 0);
        drop(s);
        assert_eq!(a.running(), 0);
        assert!(a.inner.lock().tenants.is_empty(), "no tenant is remembered");
    }

    /// Starts `n` waiters for `tenant`, each reporting its tenant on `tx` once admitted and
    /// holding its slot until `release` fires.
    fn wait_many(
        a: &Admission,
        tenant: &str,
        n: usize,
        tx: &tokio::sync::mpsc::UnboundedSender<(String, Slot)>,
    ) -> Vec<tokio::task::JoinHandle<Result<(), QueueFull>>> {
        (0..n)
            .map(|_| {
                let (a, tx, tenant) = (a.clone(), tx.clone(), t(tenant));
                tokio::spawn(async move {
                    let slot = a.admit(&tenant).await?;
                    let _ = tx.send((tenant.to_string(), slot));
                    Ok(())
                })
            })
            .collect()
    }

    #[tokio::test]
    async fn one_build_of_b_goes_before_a_burst_of_a() {
        let a = Admission::new(1, 100);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let first = a.admit(&t("a")).await.unwrap();
        let _burst = wait_many(&a, "a", 8, &tx);
        until(|| a.queued() == 8).await;
        let _one = wait_many(&a, "b", 1, &tx);
        until(|| a.queued() == 9).await;
        // a has one running, b none: b gets the next slot though a's burst came first.
        drop(first);
        let (who, slot) = rx.recv().await.unwrap();
        assert_eq!(who, "b");
        drop(slot);
        let (who, _slot) = rx.recv().await.unwrap();
        assert_eq!(who, "a");
    }

    #[tokio::test]
    async fn weights_split_the_slots() {
        let mut shares = Shares::open(4, 100);
        shares.tenants.insert(
            "heavy".into(),
            TenantLimits {
                max_vms: 4,
                max_queue: 100,
                weight: 3,
                upload_bytes_per_hour: None,
                max_pins: DEFAULT_MAX_PINS,
            },
        );
        let a = Admission::with_shares(4, 100, shares);
        let x = t("x");
        let mut blocker = Vec::new();
        for _ in 0..4 {
            blocker.push(a.admit(&x).await.unwrap());
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _h = wait_many(&a, "heavy", 4, &tx);
        let _l = wait_many(&a, "light", 4, &tx);
        until(|| a.queued() == 8).await;
        drop(blocker);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rx.recv().await.unwrap());
        }
        let heavy = got.iter().filter(|(w, _)| w == "heavy").count();
        assert_eq!(heavy, 3, "weight 3 against 1 gets 3 of 4 slots");
    }

    #[tokio::test]
    async fn a_tenant_at_its_limits_waits_or_is_refused_while_others_go_on() {
        let mut shares = Shares::open(3, 10);
        shares.tenants.insert(
            "a".into(),
            TenantLimits {
                max_vms: 1,
                max_queue: 1,
                weight: 1,
                upload_bytes_per_hour: None,
                max_pins: DEFAULT_MAX_PINS,
            },
        );
        let adm = Admission::with_shares(3, 10, shares);
        let _a1 = adm.admit(&t("a")).await.unwrap();
        // a waits at its own max_vms though two slots are free...
        let adm2 = adm.clone();
        let a2 = tokio::spawn(async move { adm2.admit(&t("a")).await.map(|_| ()) });
        until(|| adm.queued() == 1).await;
        assert_eq!(adm.running(), 1);
        // ...and beyond its own queue it is refused, naming the limit...
        let e = adm.admit(&t("a")).await.unwrap_err();
        assert_eq!(
            e,
            QueueFull::Tenant {
                tenant: "a".into(),
                limit: "tenants.a.max-queue".into(),
                running: 1,
                queued: 1,
                max_queued: 1
            }
        );
        assert!(e.to_string().contains("tenants.a.max-queue"), "{e}");
        // ...while b still gets through at once.
        let _b = adm.admit(&t("b")).await.unwrap();
        assert_eq!(adm.running(), 2);
        assert!(!a2.is_finished());
        // An unlisted tenant's limit is named by its defaults' key.
        let mut shares = Shares::open(1, 10);
        shares.default.max_queue = 0;
        let lone = Admission::with_shares(1, 10, shares);
        let _c = lone.admit(&t("c")).await.unwrap();
        let e = lone.admit(&t("c")).await.unwrap_err().to_string();
        assert!(
            e.contains("tenant-defaults.max-queue") && e.contains("tenant c"),
            "{e}"
        );
        assert_eq!(
            adm.by_label(),
            BTreeMap::from([("a".to_owned(), (1, 1)), ("other".to_owned(), (1, 0))])
        );
    }

    #[test]
    fn default_is_bounded_by_cores_and_memory() {
        const G: u64 = 1 << 30;
        assert_eq!(Admission::default_max_running(2, 24 * G, 512 << 20), 2);
        assert_eq!(Admission::default_max_running(64, 4 * G, 512 << 20), 2);
        assert_eq!(Admission::default_max_running(8, 0, 512 << 20), 1);
    }
}
