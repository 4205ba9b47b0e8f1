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
    // Each signed build, whole and without its signing step: the pair differs by exactly
    // what signing adds, free of the VM-to-VM spread of boot times. Unsigned builds
    // interleaved with them show that the rest of the path is the same.
    let (mut signed, mut without, mut signing_times, mut plain) = (vec![], vec![], vec![], vec![]);
    for i in 0..reps {
        eprintln!("  [provenance] repetition {}/{reps}", i + 1);
        let mut signed_build = async || -> anyhow::Result<()> {
            let (total, signing) = once(svc, Some(&attestor)).await?;
            signed.push(total);
            without.push(total - signing);
            signing_times.push(signing);
            Ok(())
        };
        // Alternating which goes first, so that neither always follows the other.
        if i % 2 == 0 {
            plain.push(once(svc, None).await?.0);
            signed_build().await?;
        } else {
            signed_build().await?;
            plain.push(once(svc, None).await?.0);
        }
    }
    let median = |v: &[f64]| crate::stats::Summary::of(v).map_or(f64::NAN, |s| s.median);
    Ok(vec![Row::new(
        "signed_vs_unsigned",
        "17. trivial build signed (NAR hash, statement, Ed25519, stored) vs the same build unsigned",
        "s",
    )
    .ours(&signed)
    .peer("unsigned", &without)
    .ratio(&ratios(&signed, &without))
    .target(Target::RatioAtMost(1.02))
    .note(format!(
        "signing as serve --signing-key does it, timed inside each signed build (median \
         {:.1} ms); separate unsigned builds interleaved with them: median {:.3} s",
        median(&signing_times) * 1e3,
        median(&plain)
    ))])
}
