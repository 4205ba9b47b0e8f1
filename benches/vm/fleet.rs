//! Section 19 (issue 16): builds through the fleet's front against builds on one host.
//!
//! The fleet is `scripts/fleet.sh` (3 Garage nodes, 2 `serve` hosts with the S3 castore and
//! a chunk cache each, HAProxy in front), a fresh one per repetition so that its caches
//! start empty; one host is a `serve` with the embedded store. Both get the same inputs
//! uploaded through their castore services and the same builds: the trivial build, and a
//! build whose guest reads a 256 MiB input to its end (timing the read itself from
//! `/proc/uptime`). A fleet build is cold when a host's cache grew during it by half its
//! largest input or more (the host fetched it from the bucket), warm otherwise; that is
//! measured, not assumed, since HAProxy picks the host.

use crate::boot::TRIVIAL_SCRIPT;
use crate::report::{Row, Target};
use crate::served::serve;
use crate::service::NIX_ENV;
use crate::setup::{secs, Env, TRIVIAL_MEMORY_MIB};
use crate::stats::ratios;
use anyhow::{bail, Context};
use bytes::Bytes;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::{build as pb, castore as cpb};

/// Builds of each kind per fleet: the first on each host is normally cold, the rest warm.
const BUILDS_PER_FLEET: usize = 4;

/// A running `scripts/fleet.sh`; stopped (SIGTERM, which stops all it started) on drop.
struct Fleet {
    child: std::process::Child,
    dir: PathBuf,
    front: Channel,
}

impl Fleet {
    async fn start(env: &Env, dir: PathBuf) -> anyhow::Result<Fleet> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fleet.sh");
        let err = std::fs::File::create(dir.with_extension("err")).context("fleet.sh's log")?;
        let mut child = std::process::Command::new(&script)
            .env("FLEET_BIN", &env.cli)
            .env("FLEET_DIR", &dir)
            // Room for every input of a repetition on each host: nothing evicted.
            .env("FLEET_CACHE", "2G")
            .arg("--kernel")
            .arg(&env.kernel)
            .arg("--agent")
            .arg(&env.agent)
            .args(["--vm-memory", &format!("{TRIVIAL_MEMORY_MIB}M")])
            .args(["--boot-timeout", "120s"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", script.display()))?;
        let stdout = child.stdout.take().context("fleet.sh's stdout")?;
        let mut fleet = Fleet {
            child,
            dir,
            front: Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        };
        // The last line fleet.sh prints once everything is up: `front grpc+http://HOST:PORT`.
        let wait = tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.strip_prefix("front grpc+").map(str::to_owned))
        });
        let front = tokio::time::timeout(Duration::from_secs(300), wait)
            .await
            .context("fleet.sh did not come up within 300 s")??
            .with_context(|| {
                format!(
                    "fleet.sh ended without a front; see {}",
                    fleet.dir.with_extension("err").display()
                )
            })?;
        fleet.front = Endpoint::from_shared(front)?.connect_lazy();
        Ok(fleet)
    }

    /// Bytes in both hosts' chunk caches.
    fn cached_bytes(&self) -> u64 {
        (1..=2)
            .filter_map(|h| std::fs::read_dir(self.dir.join(format!("host{h}/cache"))).ok())
            .flatten()
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The inputs both sides get.
struct Inputs {
    busybox: Vec<u8>,
    big: Vec<u8>,
}

fn file_node(name: &str, data: &[u8], digest: B3Digest, executable: bool) -> cpb::Node {
    cpb::Node {
        node: Some(cpb::node::Node::File(cpb::FileNode {
            name: Bytes::copy_from_slice(name.as_bytes()),
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size: data.len() as u64,
            executable,
        })),
    }
}

/// The trivial build and the big-input build, as requests to whatever castore `channel`
/// reaches (the inputs are uploaded there first).
async fn requests(
    channel: Channel,
    inputs: &Inputs,
) -> anyhow::Result<(pb::BuildRequest, pb::BuildRequest)> {
    let blobs = GrpcBlobService::new(channel);
    let bb = put_bytes(&blobs, &inputs.busybox)
        .await
        .context("uploading busybox")?;
    let big = put_bytes(&blobs, &inputs.big)
        .await
        .context("uploading the big input")?;
    let busybox = file_node("busybox", &inputs.busybox, bb, true);
    let input = file_node("input", &inputs.big, big, false);
    let request = |inputs: Vec<cpb::Node>, script: &str| {
        let mut vars: Vec<_> = NIX_ENV
            .iter()
            .map(|(k, v)| (*k, (*v).to_owned()))
            .chain([("out", "/nix/store/out".to_owned())])
            .collect();
        vars.sort();
        pb::BuildRequest {
            inputs,
            command_args: ["/nix/store/busybox", "sh", "-c", script]
                .map(str::to_owned)
                .into(),
            outputs: vec!["out".into()],
            environment_vars: vars
                .into_iter()
                .map(|(k, v)| pb::build_request::EnvVar {
                    key: k.into(),
                    value: Bytes::from(v),
                })
                .collect(),
            constraints: Some(pb::build_request::BuildConstraints {
                system: "x86_64-linux".into(),
                ..Default::default()
            }),
        }
    };
    // The guest reads the whole input through a pipe (so that nothing can answer from
    // the file's size alone) and writes the byte count and the uptime before and after
    // (read by the shell itself: no program to start around the timed part).
    let read = "b=/nix/store/busybox; read t0 x < /proc/uptime; \
                n=$($b cat /nix/store/input | $b wc -c); \
                read t1 x < /proc/uptime; echo \"$n $t0 $t1\" > $out";
    Ok((
        request(vec![busybox.clone()], TRIVIAL_SCRIPT),
        request(vec![busybox, input], read),
    ))
}

/// One build's time, and for the big build the guest's read time (checked: all bytes).
async fn build(
    channel: &Channel,
    req: &pb::BuildRequest,
    big_len: Option<usize>,
) -> anyhow::Result<(f64, Option<f64>)> {
    let mut client = pb::build_service_client::BuildServiceClient::new(channel.clone());
    let start = Instant::now();
    let b = client.do_build(req.clone()).await?.into_inner();
    let t = secs(start.elapsed());
    let [out] = &b.outputs[..] else {
        bail!("the build answered {} outputs", b.outputs.len());
    };
    let Some(len) = big_len else {
        return Ok((t, None));
    };
    let Some(cpb::node::Node::File(f)) = &out.node else {
        bail!("the big build's output is not a file");
    };
    let digest = B3Digest::try_from(&f.digest).context("the output's digest")?;
    let text = read_to_vec(&GrpcBlobService::new(channel.clone()), &digest)
        .await
        .context("reading the big build's output")?
        .context("the big build's output is not in the castore")?;
    let text = String::from_utf8_lossy(&text);
    let [n, t0, t1] = text.split_whitespace().collect::<Vec<_>>()[..] else {
        bail!("the big build wrote {text:?}");
    };
    if n.parse::<usize>().ok() != Some(len) {
        bail!("the guest read {n} bytes of the {len}-byte input");
    }
    let read = t1.parse::<f64>()? - t0.parse::<f64>()?;
    Ok((t, Some(read)))
}

#[derive(Default)]
struct Samples {
    cold: Vec<f64>,
    warm: Vec<f64>,
    single: Vec<f64>,
    cold_read: Vec<f64>,
    warm_read: Vec<f64>,
    single_read: Vec<f64>,
}

pub async fn run(env: &Env, reps: usize, big_mib: usize) -> anyhow::Result<Vec<Row>> {
    let inputs = Inputs {
        busybox: std::fs::read(&env.busybox).context("reading busybox")?,
        big: {
            let mut big = vec![0u8; big_mib << 20];
            blake3::Hasher::new().finalize_xof().fill(&mut big);
            big
        },
    };
    let one = serve(env, "fleet-single").await?;
    let (one_trivial, one_big) = requests(one.channel.clone(), &inputs).await?;
    // The single host's first build pays for its own warm-up (page cache, helpers).
    build(&one.channel, &one_trivial, None).await?;
    build(&one.channel, &one_big, Some(inputs.big.len())).await?;

    let (mut trivial, mut big) = (Samples::default(), Samples::default());
    for rep in 1..=reps {
        eprintln!("  [fleet] repetition {rep}/{reps}: starting a fleet");
        let fleet = Fleet::start(env, env.scratch("fleet")?.join("dir")).await?;
        let (f_trivial, f_big) = requests(fleet.front.clone(), &inputs).await?;
        // Cold: the cache grew by at least half the build's largest input (a few chunks
        // may be fetched again by a warm build: those a reader dropped while in flight).
        for (req, one_req, len, cold_growth, s) in [
            (
                &f_trivial,
                &one_trivial,
                None,
                inputs.busybox.len() / 2,
                &mut trivial,
            ),
            (
                &f_big,
                &one_big,
                Some(inputs.big.len()),
                inputs.big.len() / 2,
                &mut big,
            ),
        ] {
            for _ in 0..BUILDS_PER_FLEET {
                let before = fleet.cached_bytes();
                let (t, read) = build(&fleet.front, req, len).await.context("fleet build")?;
                let grew = fleet.cached_bytes().saturating_sub(before);
                let cold = grew >= cold_growth as u64;
                let (times, reads) = if cold {
                    (&mut s.cold, &mut s.cold_read)
                } else {
                    (&mut s.warm, &mut s.warm_read)
                };
                times.push(t);
                reads.extend(read);
                // Interleaved, so that the pairs of the ratios see the same load.
                let (t, read) = build(&one.channel, one_req, len)
                    .await
                    .context("single-host build")?;
                s.single.push(t);
                s.single_read.extend(read);
            }
        }
    }
    let note = |s: &Samples| {
        format!(
            "{} cold and {} warm fleet builds of {} ({} fresh fleets; cold: a host's cache grew by half the largest input or more)",
            s.cold.len(),
            s.warm.len(),
            BUILDS_PER_FLEET * reps,
            reps
        )
    };
    let what_big = format!("build reading a {big_mib} MiB input");
    // Ours against a peer, paired, as a ratio of times.
    let vs = |key: &str, what: String, ours: &[f64], peer: &[f64], target, note: String| {
        Row::new(key, &what, "s")
            .ours(ours)
            .peer("one host", peer)
            .ratio(&ratios(ours, peer))
            .target(target)
            .note(note)
    };
    let warm = "front + S3 castore, warm cache vs one host, embedded store";
    let cold = "front + S3 castore, cold cache vs one host";
    Ok(vec![
        vs(
            "fleet_trivial_warm",
            format!("19a. trivial build: {warm}"),
            &trivial.warm,
            &trivial.single,
            Target::RatioAtMost(1.1),
            note(&trivial),
        ),
        vs(
            "fleet_trivial_cold",
            format!("19b. trivial build: {cold}"),
            &trivial.cold,
            &trivial.single,
            Target::None,
            note(&trivial),
        ),
        vs(
            "fleet_big_warm",
            format!("19c. {what_big}: {warm}"),
            &big.warm,
            &big.single,
            Target::RatioAtMost(1.1),
            note(&big),
        ),
        vs(
            "fleet_big_cold",
            format!("19d. {what_big}: {cold}"),
            &big.cold,
            &big.single,
            Target::None,
            note(&big),
        ),
        Row::new(
            "fleet_read_cold_vs_warm",
            &format!(
                "19e. the guest's read of the {big_mib} MiB input: cold cache throughput / warm"
            ),
            "s",
        )
        .ours(&big.cold_read)
        .peer("warm cache", &big.warm_read)
        // Throughput, cold over warm: the warm time over the cold one.
        .ratio(&ratios(&big.warm_read, &big.cold_read))
        .target(Target::RatioAtLeast(0.5))
        .note(format!(
            "guest /proc/uptime around `cat | wc -c`; one host's read: {}",
            crate::stats::Summary::of(&big.single_read).map_or("-".into(), |s| s.show(2))
        )),
        vs(
            "fleet_read_warm_vs_one_host",
            format!("19f. the guest's read of the {big_mib} MiB input: warm cache vs one host"),
            &big.warm_read,
            &big.single_read,
            Target::RatioAtMost(1.1),
            "guest /proc/uptime around `cat | wc -c`".into(),
        ),
    ])
}
