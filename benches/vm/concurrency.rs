//! Section 6: builds per minute of short (trivial) builds with 1, 2 and 4 at once. Each
//! round runs one batch per level (1, 2, 4, then the next round), so the levels see the
//! same background load; a batch's rate is its builds over its wall time.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::service::{failed, Service};
use crate::setup::secs;
use crate::stats::ratios;
use std::time::Instant;

const LEVELS: [usize; 3] = [1, 2, 4];

async fn batch(svc: &Service, n: usize) -> anyhow::Result<f64> {
    let req = svc.request(TRIVIAL_SCRIPT, "hello", 0)?;
    let start = Instant::now();
    let results = futures::future::join_all((0..n).map(|_| svc.build(&req))).await;
    let elapsed = start.elapsed();
    for r in results {
        r.map_err(|e| failed("concurrent build", &e))?;
    }
    Ok(n as f64 * 60.0 / secs(elapsed))
}

pub async fn run(svc: &Service, rounds: usize) -> anyhow::Result<Vec<Row>> {
    let mut per_level: Vec<Vec<f64>> = vec![vec![]; LEVELS.len()];
    for r in 0..rounds {
        eprintln!("  [concurrency] round {}/{rounds}", r + 1);
        for (i, n) in LEVELS.iter().enumerate() {
            per_level[i].push(batch(svc, *n).await?);
        }
    }
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(vec![
        Row::new(
            "bpm_1",
            "6a. short builds per minute, 1 at once",
            "builds/min",
        )
        .ours(&per_level[0]),
        Row::new(
            "bpm_2_vs_1",
            "6b. short builds per minute, 2 at once vs 1",
            "builds/min",
        )
        .ours(&per_level[1])
        .peer("1 at once", &per_level[0])
        .ratio(&ratios(&per_level[1], &per_level[0]))
        .target(Target::RatioAtLeast(1.8))
        .note(format!(
            "{nproc} host cores; each TCG guest vCPU is one busy host thread"
        )),
        Row::new(
            "bpm_4_vs_1",
            "6c. short builds per minute, 4 at once vs 1",
            "builds/min",
        )
        .ours(&per_level[2])
        .peer("1 at once", &per_level[0])
        .ratio(&ratios(&per_level[2], &per_level[0])),
    ])
}
