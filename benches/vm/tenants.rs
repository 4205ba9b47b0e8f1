//! Section `tenants`: what identity, fair admission and the upload quota cost a build.
//! The same trivial build, bare and as `serve` runs it for a tenant, interleaved in one run:
//! the configuration read as `serve` reads it (a tokens file of 1,000 entries,
//! `require-auth`, 100 tenants with their limits and upload quotas), the bearer token
//! checked by the interceptor every RPC passes, a VM slot from the fair scheduler, and the
//! build's outputs charged to the tenant's quota afterwards.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::service::{failed, NullSink, Service};
use crate::stats::{median_ci95, ratios};
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;
use tonic::service::Interceptor;
use tvix_build_vm::metrics::Metrics;
use tvix_build_vm::runner::new_build_id;
use tvix_build_vm::server::admission::Admission;
use tvix_build_vm::server::config::ServeOptions;
use tvix_build_vm::server::peer::Peer;
use tvix_build_vm::server::quota::UploadQuota;
use tvix_build_vm::server::tenant::{AuthLayer, Authenticator, RpcPath};

const TOKENS: usize = 1000;
const TENANTS: usize = 100;

struct Tenancy {
    auth: AuthLayer,
    admission: Admission,
    quota: UploadQuota,
    _dir: tempfile::TempDir,
}

impl Tenancy {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("a directory for the tokens file")?;
        let path = dir.path().join("tokens");
        let text: String = (0..TOKENS)
            .map(|i| {
                let hash: String = Sha256::digest(format!("token-{i}").as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("tenant-{} {hash}\n", i % TENANTS)
            })
            .collect();
        std::fs::write(&path, text).context("writing the tokens file")?;
        let mut toml = format!(
            "tokens = {:?}\nrequire-auth = true\nlisten = \"127.0.0.1:0\"\nmax-vms = 2\n\
             max-queue = 16\n[tenant-defaults]\nmax-vms = 1\nmax-queue = 4\n\
             upload-bytes-per-hour = \"10G\"\n",
            path.display().to_string()
        );
        for i in 0..TENANTS {
            let _ = write!(toml, "[tenants.tenant-{i}]\nweight = {}\n", 1 + i % 3);
        }
        let options: ServeOptions = toml::from_str(&toml).context("the bench's serve config")?;
        let config = options.resolve(2)?;
        let auth = Authenticator::new(config.tokens.clone(), config.require_auth)?;
        let admission =
            Admission::with_shares(config.max_vms, config.max_queue, config.shares.clone());
        let quota = UploadQuota::new(config.shares, Arc::new(Metrics::default()));
        Ok(Self {
            auth: AuthLayer(Arc::new(auth)),
            admission,
            quota,
            _dir: dir,
        })
    }

    /// What the router's interceptor does on a DoBuild call with the last token of the file
    /// (every entry is compared anyway).
    fn identify(&self) -> anyhow::Result<Peer> {
        let mut req = tonic::Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer token-999".parse()?);
        req.extensions_mut()
            .insert(RpcPath("/tvix.build.v1.BuildService/DoBuild".into()));
        let req = self
            .auth
            .clone()
            .call(req)
            .map_err(|s| anyhow::anyhow!("the bench token was refused: {s:?}"))?;
        Ok(Peer::of(&req))
    }
}

async fn once(svc: &Service, tenancy: Option<&Tenancy>) -> anyhow::Result<f64> {
    let p = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    let id = new_build_id();
    let start = Instant::now();
    let admitted = match tenancy {
        Some(t) => {
            let tenant = t.identify()?.tenant;
            let slot = t.admission.admit(&tenant).await?;
            Some((tenant, slot))
        }
        None => None,
    };
    let outcome = svc
        .runner
        .build(&id, &p.req, &p.decision, &mut NullSink)
        .await
        .map_err(|e| failed("trivial build", &e))?;
    if let (Some(t), Some((tenant, slot))) = (tenancy, admitted) {
        drop(slot);
        t.quota
            .charge_outputs(&tenant, outcome.accounting.output_bytes);
    }
    Ok(start.elapsed().as_secs_f64())
}

pub async fn run(svc: &Service, reps: usize) -> anyhow::Result<Vec<Row>> {
    let tenancy = Tenancy::new()?;
    once(svc, Some(&tenancy)).await?;
    let (mut bare, mut tenant) = (vec![], vec![]);
    for i in 0..reps {
        eprintln!("  [tenants] repetition {}/{reps}", i + 1);
        // Alternating which goes first, so that neither always follows the other.
        if i % 2 == 0 {
            bare.push(once(svc, None).await?);
            tenant.push(once(svc, Some(&tenancy)).await?);
        } else {
            tenant.push(once(svc, Some(&tenancy)).await?);
            bare.push(once(svc, None).await?);
        }
    }
    let r = ratios(&tenant, &bare);
    let ci = match median_ci95(&r) {
        Some((lo, hi)) => format!(
            "95% CI of the median ratio {lo:.3}-{hi:.3} over {} pairs",
            r.len()
        ),
        None => format!(
            "{} pairs: too few for a 95% CI of the median (6 or more)",
            r.len()
        ),
    };
    Ok(vec![Row::new(
        "tenant_vs_none",
        "18. trivial build for a tenant (serve's config: bearer token among 1,000, require-auth, fair admission and quotas of 100 tenants) vs bare",
        "s",
    )
    .ours(&tenant)
    .peer("bare", &bare)
    .ratio(&r)
    .target(Target::RatioAtMost(1.01))
    .note(format!(
        "the same runner and request, interleaved; identity (the interceptor), admission and the quota charge as serve does them; {ci}"
    ))])
}
