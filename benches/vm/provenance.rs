//! Section `provenance`: what signing costs a build. The same trivial build, unsigned and
//! signed (the outputs' NAR hashes streamed from the castore, the statement signed with
//! Ed25519 and stored as a blob), interleaved in one run.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::service::{failed, NullSink, Service};
use crate::stats::ratios;
use anyhow::Context;
use std::time::{Instant, SystemTime};
use tvix_build_vm::provenance::attest::{Attestor, Origin, Record};
use tvix_build_vm::runner::new_build_id;
use tvix_build_vm::wire::seed;

/// One build's time, and how much of it was signing.
async fn once(svc: &Service, attestor: Option<&Attestor>) -> anyhow::Result<(f64, f64)> {
    let p = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    let id = new_build_id();
    let start = Instant::now();
    let started = SystemTime::now();
    let outcome = svc
        .runner
        .build(&id, &p.req, &p.decision, &mut NullSink)
        .await
        .map_err(|e| failed("trivial build", &e))?;
    let signing = Instant::now();
    if let Some(attestor) = attestor {
        // The service keeps the request as sent only when it signs: part of the cost.
        let origin = Origin::of(seed::DIALECT, &p.wire);
        let record = Record {
            id: &id,
            origin: &origin,
            request: &p.req,
            decision: &p.decision,
            outcome: &outcome,
            started,
            finished: SystemTime::now(),
        };
        attestor
            .attest(&svc.runner, record)
            .await
            .context("signing the trivial build")?;
    }
    Ok((
        start.elapsed().as_secs_f64(),
        signing.elapsed().as_secs_f64(),
    ))
}

pub async fn run(svc: &Service, reps: usize) -> anyhow::Result<Vec<Row>> {
    let mut seed_bytes = [0u8; 32];
    getrandom::getrandom(&mut seed_bytes).context("a key for the bench")?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed_bytes);
    let attestor = Attestor::new(key, "tvix-build-vm://bench".into(), svc.host_facts()?);
    once(svc, Some(&attestor)).await?;
    let (mut plain, mut signed, mut signing) = (vec![], vec![], vec![]);
    let mut signed_once = |(total, sign): (f64, f64)| {
        signed.push(total);
        signing.push(sign);
    };
    for i in 0..reps {
        eprintln!("  [provenance] repetition {}/{reps}", i + 1);
        // Alternating which goes first, so that neither always follows the other.
        if i % 2 == 0 {
            plain.push(once(svc, None).await?.0);
            signed_once(once(svc, Some(&attestor)).await?);
        } else {
            signed_once(once(svc, Some(&attestor)).await?);
            plain.push(once(svc, None).await?.0);
        }
    }
    let sign_ms = crate::stats::Summary::of(&signing).map_or(f64::NAN, |s| s.median * 1e3);
    Ok(vec![Row::new(
        "signed_vs_unsigned",
        "17. trivial build signed (NAR hash, statement, Ed25519, stored) vs unsigned",
        "s",
    )
    .ours(&signed)
    .peer("unsigned", &plain)
    .ratio(&ratios(&signed, &plain))
    .target(Target::RatioAtMost(1.02))
    .note(format!(
        "the same runner and request, interleaved; signing as serve --signing-key does it \
         took {sign_ms:.1} ms (median) of the signed build"
    ))])
}
