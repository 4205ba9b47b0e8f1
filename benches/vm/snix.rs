//! Section 8: what a snix caller pays for its layout. The same trivial build sent to a real
//! `tvix-build-vm serve` (its own process, on a unix socket) as `snix.build.v1` DoBuild and
//! as the seed-layout `tvix.build.v1` DoBuild, interleaved; timed from the call to the
//! reply. Both end in the same validated request and the same VM, so the ratio is the cost
//! of the snix edge (decoding, entry conversion, the reply) over the seed one.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::served::serve;
use crate::service::NIX_ENV;
use crate::setup::{secs, Env};
use crate::stats::ratios;
use anyhow::{bail, Context};
use bytes::Bytes;
use std::time::Instant;
use tonic::transport::Channel;
use tvix_build_vm::castore::blob::{put_bytes, GrpcBlobService};
use tvix_build_vm::proto::{build as seed, snix_build as snix, snix_castore};

/// The environment both layouts send: Nix's defaults plus `out`, sorted.
fn env_vars() -> Vec<(&'static str, &'static str)> {
    let mut v = NIX_ENV.to_vec();
    v.push(("out", "/nix/store/hello"));
    v.sort();
    v
}

/// The trivial build in both layouts, with busybox (uploaded through the server) as input.
async fn requests(
    channel: Channel,
    env: &Env,
) -> anyhow::Result<(seed::BuildRequest, snix::BuildRequest)> {
    let data = std::fs::read(&env.busybox).context("reading busybox")?;
    let digest = put_bytes(&GrpcBlobService::new(channel), &data)
        .await
        .context("uploading busybox")?;
    let digest = Bytes::copy_from_slice(digest.as_bytes());
    let size = data.len() as u64;
    let argv: Vec<String> = ["/nix/store/busybox", "sh", "-c", TRIVIAL_SCRIPT]
        .map(str::to_owned)
        .into();
    let seed_req = seed::BuildRequest {
        inputs: vec![tvix_build_vm::proto::castore::Node {
            node: Some(tvix_build_vm::proto::castore::node::Node::File(
                tvix_build_vm::proto::castore::FileNode {
                    name: "busybox".into(),
                    digest: digest.clone(),
                    size,
                    executable: true,
                },
            )),
        }],
        command_args: argv.clone(),
        outputs: vec!["hello".into()],
        environment_vars: env_vars()
            .into_iter()
            .map(|(k, v)| seed::build_request::EnvVar {
                key: k.into(),
                value: Bytes::from(v),
            })
            .collect(),
        constraints: Some(seed::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
    };
    let snix_req = snix::BuildRequest {
        inputs: vec![snix_castore::Entry {
            entry: Some(snix_castore::entry::Entry::File(snix_castore::FileEntry {
                name: "busybox".into(),
                digest,
                size,
                executable: true,
            })),
        }],
        command_args: argv,
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec!["nix/store/hello".into()],
        environment_vars: env_vars()
            .into_iter()
            .map(|(k, v)| snix::build_request::EnvVar {
                key: k.into(),
                value: Bytes::from(v),
            })
            .collect(),
        constraints: Some(snix::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
        additional_files: vec![],
        refscan_needles: vec![],
    };
    Ok((seed_req, snix_req))
}

pub async fn run(env: &Env, reps: usize) -> anyhow::Result<Vec<Row>> {
    let served = serve(env, "snix").await?;
    let (seed_req, snix_req) = requests(served.channel.clone(), env).await?;
    let mut seed_client =
        seed::build_service_client::BuildServiceClient::new(served.channel.clone());
    let mut snix_client =
        snix::build_service_client::BuildServiceClient::new(served.channel.clone());
    let mut seed_once = async || -> anyhow::Result<f64> {
        let start = Instant::now();
        let b = seed_client.do_build(seed_req.clone()).await?.into_inner();
        let t = secs(start.elapsed());
        if b.outputs.len() != 1 {
            bail!("the seed build answered {} outputs", b.outputs.len());
        }
        Ok(t)
    };
    let (mut seed_times, mut snix_times) = (Vec::new(), Vec::new());
    // One of each first: the server's first build pays for warming caches.
    seed_once().await.context("seed-layout DoBuild")?;
    for i in 0..=reps {
        let start = Instant::now();
        let r = snix_client
            .do_build(snix_req.clone())
            .await
            .context("snix DoBuild")?;
        let t = secs(start.elapsed());
        if r.into_inner().outputs.len() != 1 {
            bail!("the snix build did not answer one output");
        }
        // Repetition 0 is the snix side's warm-up.
        if i > 0 {
            eprintln!("  [snix] repetition {i}/{reps}");
            snix_times.push(t);
            seed_times.push(seed_once().await.context("seed-layout DoBuild")?);
        }
    }
    Ok(vec![Row::new(
        "snix_vs_seed",
        "8. trivial build through `serve`: snix.build.v1 DoBuild vs seed-layout DoBuild",
        "s",
    )
    .ours(&snix_times)
    .peer("seed layout", &seed_times)
    .ratio(&ratios(&snix_times, &seed_times))
    .target(Target::RatioAtMost(1.02))
    .note(
        "one `serve` process on a unix socket, call to reply, alternating snix and seed",
    )])
}
