//! Section `tenants`: what identity and fair admission cost a build. The same trivial
//! build, bare and as `serve` runs it for a tenant (the bearer token looked up in a tokens
//! file of 1,000 entries, then a VM slot from the fair scheduler with 100 tenants
//! configured), interleaved in one run.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::service::{failed, NullSink, Service};
use crate::stats::ratios;
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::Instant;
use tvix_build_vm::runner::new_build_id;
use tvix_build_vm::server::admission::{Admission, Shares, TenantLimits};
use tvix_build_vm::server::peer::Peer;
use tvix_build_vm::server::tenant::Authenticator;

const TOKENS: usize = 1000;

struct Tenancy {
    auth: Authenticator,
    admission: Admission,
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
                format!("tenant-{} {hash}\n", i % 100)
            })
            .collect();
        std::fs::write(&path, text).context("writing the tokens file")?;
        let auth = Authenticator::new(Some(path), true)?;
        let limits = TenantLimits {
            max_vms: 1,
            max_queue: 4,
            weight: 1,
            upload_bytes_per_hour: None,
        };
        let tenants: BTreeMap<_, _> = (0..100).map(|i| (format!("tenant-{i}"), limits)).collect();
        let admission = Admission::with_shares(
            2,
            16,
            Shares {
                default: limits,
                tenants,
            },
        );
        Ok(Self {
            auth,
            admission,
            _dir: dir,
        })
    }
}

async fn once(svc: &Service, tenancy: Option<&Tenancy>) -> anyhow::Result<f64> {
    let p = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    let id = new_build_id();
    let start = Instant::now();
    let slot = match tenancy {
        Some(t) => {
            let peer = Peer {
                transport: "tcp:127.0.0.1:1".into(),
                ..Default::default()
            };
            // The last line of the file: every entry is compared anyway.
            let tenant = t
                .auth
                .identify(Some(b"Bearer token-999"), &peer)
                .context("the bench token")?;
            Some(t.admission.admit(&tenant).await?)
        }
        None => None,
    };
    svc.runner
        .build(&id, &p.req, &p.decision, &mut NullSink)
        .await
        .map_err(|e| failed("trivial build", &e))?;
    drop(slot);
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
    Ok(vec![Row::new(
        "tenant_vs_none",
        "18. trivial build for a tenant (bearer token among 1,000, fair admission, 100 tenants) vs bare",
        "s",
    )
    .ours(&tenant)
    .peer("bare", &bare)
    .ratio(&ratios(&tenant, &bare))
    .target(Target::RatioAtMost(1.01))
    .note("the same runner and request, interleaved; identity and admission as serve does them")])
}
