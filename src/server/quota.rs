//! Per-tenant upload quotas: how many bytes a tenant may add to the store per hour
//! (`upload-bytes-per-hour` in `[tenants.<name>]` and `[tenant-defaults]`).
//!
//! Bytes are charged as they arrive, before they are written: blob chunks and directory
//! messages through the castore services (tvix and snix packages alike), so the chunk that
//! would cross the limit is refused and its call fails with nothing of it stored. A call that
//! fails (over quota, a broken stream, a bad directory) gives back what it was charged:
//! nothing of it was stored. A tenant's build outputs are charged after the fact, when the
//! build has finished, and never refused: they may take the tenant over its limit, and then
//! its next upload is refused until the window resets.
//!
//! Each tenant has a fixed window of one hour that starts with its first charge after the
//! previous window ended. The state lives in memory only: a restart gives every tenant a
//! fresh window.

use super::admission::Shares;
use super::tenant_name::Tenant;
use crate::metrics::{Metrics, UploadSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The length of a quota window.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Windows kept before the ended ones are swept out (a tenant per token line, certificate
/// or uid: bounded by what the operator admits, swept anyway).
const SWEEP_ABOVE: usize = 4096;

/// An upload refused because it would take its tenant over its quota.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "tenant {tenant} is over its upload quota ({key} = {limit} bytes): {used} bytes charged \
     in this window, {wanted} more refused; the window resets in {}s",
    resets_in.as_secs()
)]
pub struct OverQuota {
    pub tenant: String,
    /// The configuration key of the limit.
    pub key: String,
    pub limit: u64,
    pub used: u64,
    pub wanted: u64,
    pub resets_in: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    used: u64,
    /// Tells this window from the tenant's earlier ones, so a refund never reaches into a
    /// window its bytes were not charged in.
    id: u64,
}

#[derive(Debug, Default)]
struct State {
    windows: HashMap<Tenant, Window>,
    next_id: u64,
}

impl State {
    /// The tenant's current window at `now` (a new one if the last has ended).
    fn window(&mut self, tenant: &Tenant, now: Instant) -> &mut Window {
        if self.windows.len() > SWEEP_ABOVE {
            self.windows
                .retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
        }
        let id = self.next_id;
        let w = self.windows.entry(tenant.clone()).or_insert(Window {
            start: now,
            used: 0,
            id,
        });
        if now.saturating_duration_since(w.start) >= WINDOW {
            *w = Window {
                start: now,
                used: 0,
                id,
            };
        }
        if w.id == id {
            self.next_id += 1;
        }
        w
    }
}

/// Every tenant's upload quota, shared by the castore services and the build host.
#[derive(Debug)]
pub struct UploadQuota {
    shares: Shares,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

impl UploadQuota {
    pub fn new(shares: Shares, metrics: Arc<Metrics>) -> Self {
        Self {
            shares,
            metrics,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts charging one call's upload to `tenant`.
    pub fn upload(self: &Arc<Self>, tenant: Tenant) -> Upload {
        Upload {
            quota: Arc::clone(self),
            tenant,
            charged: None,
            done: false,
        }
    }

    /// Charges `bytes` at `now`, or refuses them (charging nothing) if they would take the
    /// tenant over its limit. Returns the window charged.
    fn charge_at(&self, tenant: &Tenant, bytes: u64, now: Instant) -> Result<u64, OverQuota> {
        let limit = self.shares.limits(tenant).upload_bytes_per_hour;
        let mut state = self.lock();
        let w = state.window(tenant, now);
        match limit {
            Some(limit) if w.used.saturating_add(bytes) > limit => {
                let over = OverQuota {
                    tenant: tenant.to_string(),
                    key: self.shares.key(tenant, "upload-bytes-per-hour"),
                    limit,
                    used: w.used,
                    wanted: bytes,
                    resets_in: WINDOW.saturating_sub(now.saturating_duration_since(w.start)),
                };
                drop(state);
                self.metrics.count_upload_refused(self.shares.label(tenant));
                Err(over)
            }
            _ => {
                w.used = w.used.saturating_add(bytes);
                Ok(w.id)
            }
        }
    }

    /// Gives back `bytes` charged in window `id`, if that window is still the tenant's.
    fn refund(&self, tenant: &Tenant, bytes: u64, id: u64) {
        if let Some(w) = self.lock().windows.get_mut(tenant) {
            if w.id == id {
                w.used = w.used.saturating_sub(bytes);
            }
        }
    }

    /// Charges what a tenant's build wrote to the store, after the fact: never refused, it
    /// may take the tenant over its limit (its next upload is then refused).
    pub fn charge_outputs(&self, tenant: &Tenant, bytes: u64) {
        self.charge_outputs_at(tenant, bytes, Instant::now());
    }

    fn charge_outputs_at(&self, tenant: &Tenant, bytes: u64, now: Instant) {
        {
            let mut state = self.lock();
            let w = state.window(tenant, now);
            w.used = w.used.saturating_add(bytes);
        }
        self.metrics.count_upload_bytes(
            self.shares.label(tenant),
            UploadSource::BuildOutput,
            bytes,
        );
    }

    /// Bytes charged to `tenant` in its current window at `now`.
    #[cfg(test)]
    fn used_at(&self, tenant: &Tenant, now: Instant) -> u64 {
        self.lock().window(tenant, now).used
    }
}

/// One call's upload: charged as it arrives, given back unless [`Upload::commit`]ted.
#[derive(Debug)]
pub struct Upload {
    quota: Arc<UploadQuota>,
    tenant: Tenant,
    /// (window, bytes charged in it) of this call.
    charged: Option<(u64, u64)>,
    done: bool,
}

impl Upload {
    /// Charges `bytes` now, or refuses them.
    pub fn charge(&mut self, bytes: u64) -> Result<(), OverQuota> {
        self.charge_at(bytes, Instant::now())
    }

    fn charge_at(&mut self, bytes: u64, now: Instant) -> Result<(), OverQuota> {
        let id = self.quota.charge_at(&self.tenant, bytes, now)?;
        self.charged = match self.charged {
            Some((w, n)) if w == id => Some((w, n.saturating_add(bytes))),
            // A new window: what the old one was charged is gone with it.
            _ => Some((id, bytes)),
        };
        Ok(())
    }

    /// The call stored what it uploaded: its charge stays, and it is counted.
    pub fn commit(mut self, bytes: u64) {
        self.done = true;
        self.quota.metrics.count_upload_bytes(
            self.quota.shares.label(&self.tenant),
            UploadSource::Castore,
            bytes,
        );
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let (false, Some((id, bytes))) = (self.done, self.charged) {
            self.quota.refund(&self.tenant, bytes, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::admission::TenantLimits;

    fn t(name: &str) -> Tenant {
        Tenant::new(name).unwrap()
    }

    /// One call of `name` that uploads and stores `bytes` at `at`.
    fn stored(q: &Arc<UploadQuota>, name: &str, bytes: u64, at: Instant) {
        let mut up = q.upload(t(name));
        up.charge_at(bytes, at).unwrap();
        up.commit(bytes);
    }

    /// "small" may upload 100 bytes an hour, everyone else 1000.
    fn quota() -> Arc<UploadQuota> {
        let mut shares = Shares::open(2, 10);
        shares.default.upload_bytes_per_hour = Some(1000);
        shares.tenants.insert(
            "small".into(),
            TenantLimits {
                upload_bytes_per_hour: Some(100),
                ..shares.default
            },
        );
        shares.tenants.insert(
            "free".into(),
            TenantLimits {
                upload_bytes_per_hour: None,
                ..shares.default
            },
        );
        Arc::new(UploadQuota::new(shares, Arc::new(Metrics::default())))
    }

    #[test]
    fn the_charge_that_would_cross_is_refused_naming_the_limit() {
        let q = quota();
        let t0 = Instant::now();
        let mut up = q.upload(t("small"));
        up.charge_at(60, t0).unwrap();
        up.charge_at(40, t0).unwrap();
        let over = up.charge_at(1, t0 + Duration::from_secs(600)).unwrap_err();
        assert_eq!(
            over,
            OverQuota {
                tenant: "small".into(),
                key: "tenants.small.upload-bytes-per-hour".into(),
                limit: 100,
                used: 100,
                wanted: 1,
                resets_in: Duration::from_secs(3000),
            }
        );
        let text = over.to_string();
        for needle in ["tenant small", "upload-bytes-per-hour = 100", "3000s"] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        up.commit(100);
        assert_eq!(
            q.used_at(&t("small"), t0),
            100,
            "a refused charge adds nothing"
        );
        // Unlisted tenants fall under the defaults, each with its own window.
        let mut other = q.upload(t("anonymous"));
        other.charge_at(1000, t0).unwrap();
        let over = other.charge_at(1, t0).unwrap_err();
        assert_eq!(over.key, "tenant-defaults.upload-bytes-per-hour");
        // A tenant without a limit is never refused.
        q.upload(t("free")).charge_at(u64::MAX / 2, t0).unwrap();
    }

    #[test]
    fn a_call_that_fails_gives_its_charge_back() {
        let q = quota();
        let t0 = Instant::now();
        let mut failed = q.upload(t("small"));
        failed.charge_at(70, t0).unwrap();
        assert!(failed.charge_at(70, t0).is_err());
        drop(failed);
        assert_eq!(q.used_at(&t("small"), t0), 0);
        stored(&q, "small", 70, t0);
        assert_eq!(q.used_at(&t("small"), t0), 70);
    }

    #[test]
    fn the_window_resets_after_an_hour() {
        let q = quota();
        let t0 = Instant::now();
        stored(&q, "small", 100, t0);
        let just_before = t0 + WINDOW - Duration::from_millis(1);
        let over = q.upload(t("small")).charge_at(1, just_before).unwrap_err();
        assert_eq!(over.resets_in, Duration::from_millis(1));
        stored(&q, "small", 100, t0 + WINDOW);
        assert_eq!(q.used_at(&t("small"), t0 + WINDOW), 100);
    }

    #[test]
    fn a_refund_never_reaches_into_a_later_window() {
        let q = quota();
        let t0 = Instant::now();
        let mut old = q.upload(t("small"));
        old.charge_at(90, t0).unwrap();
        stored(&q, "small", 50, t0 + WINDOW);
        drop(old);
        assert_eq!(q.used_at(&t("small"), t0 + WINDOW), 50);

        // One call across the reset: only what it was charged in the new window goes back.
        let t1 = t0 + WINDOW * 2;
        let mut across = q.upload(t("small"));
        across.charge_at(90, t1).unwrap();
        stored(&q, "small", 10, t1 + WINDOW);
        across.charge_at(30, t1 + WINDOW).unwrap();
        drop(across);
        assert_eq!(q.used_at(&t("small"), t1 + WINDOW), 10);
    }

    #[test]
    fn ended_windows_are_swept_when_many() {
        let q = quota();
        let t0 = Instant::now();
        for i in 0..=SWEEP_ABOVE {
            stored(&q, &format!("t{i}"), 1, t0);
        }
        stored(&q, "late", 1, t0 + WINDOW / 2);
        assert_eq!(
            q.lock().windows.len(),
            SWEEP_ABOVE + 2,
            "none has ended yet"
        );
        stored(&q, "later", 1, t0 + WINDOW);
        let left: Vec<String> = q.lock().windows.keys().map(|t| t.to_string()).collect();
        left.iter()
            .for_each(|t| assert!(t.starts_with("late"), "{t}"));
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn outputs_are_charged_after_the_fact_and_block_the_next_upload() {
        let q = quota();
        let t0 = Instant::now();
        q.charge_outputs_at(&t("small"), 500, t0);
        assert_eq!(q.used_at(&t("small"), t0), 500, "never refused");
        let over = q.upload(t("small")).charge_at(1, t0).unwrap_err();
        assert_eq!(over.used, 500);
    }

    #[test]
    fn uploads_and_refusals_are_counted_by_bounded_label() {
        let q = quota();
        let t0 = Instant::now();
        stored(&q, "stranger", 10, t0);
        q.charge_outputs_at(&t("small"), 7, t0);
        assert!(q.upload(t("small")).charge_at(100, t0).is_err());
        let text = q.metrics.render(0, 0, None);
        for line in [
            "tvix_build_vm_tenant_upload_bytes_total{tenant=\"other\",source=\"castore\"} 10\n",
            "tvix_build_vm_tenant_upload_bytes_total{tenant=\"small\",source=\"build_output\"} 7\n",
            "tvix_build_vm_tenant_uploads_refused_total{tenant=\"small\"} 1\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
