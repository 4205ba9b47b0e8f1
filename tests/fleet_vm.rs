//! The local fleet of scripts/fleet.sh, for real: 3 Garage nodes, 2 `serve` hosts on the
//! shared bucket, HAProxy in front, real VMs. Builds sent to the front all succeed and
//! spread over both hosts; their outputs are readable through the front (tvix's and snix's
//! castore packages) and through each host. With one Garage node of three stopped, builds
//! through the front read an input uploaded before the stop and write their outputs;
//! restarted, the node serves every output written before and during its absence. A host
//! SIGKILLed mid-build (and mid-upload of a blob) fails only its own running builds
//! (UNAVAILABLE), the next builds succeed on the other host, the bucket holds nothing
//! partial (tests/support/bucket.rs: the killed upload's chunks may be there, no index
//! naming a missing chunk, no closure naming a missing blob), and restarted the host gets
//! builds again; each host's chunk cache, smaller than the inputs, stays under its size
//! on disk; SIGTERM to the script leaves no process behind.
//!
//! Cost: about 26 trivial builds and 4 sleeping ones, 90 to 130 s on 2 cores under TCG.
//! `TVIX_FLEET_LONG=1` sends 100 builds instead of 20.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::bucket::check_whole;
use support::serve::{file_node, seed_request, upload_busybox};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::objectstore::Bucket;
use tvix_build_vm::castore::{B3Digest, BlobService};
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;
use tvix_build_vm::proto::castore as cpb;

struct Fleet {
    script: std::process::Child,
    dir: tempfile::TempDir,
    /// Each host's metrics URL, as printed.
    metrics: Vec<String>,
    /// The front's castore/build address, as printed.
    front: String,
}

impl Fleet {
    fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tbv-fleet-vm-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut c = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fleet.sh"));
        c.env("FLEET_DIR", dir.path())
            .env("FLEET_BIN", env!("CARGO_BIN_EXE_tvix-build-vm"))
            .env("FLEET_MAX_VMS", "2")
            // Host 2's is smaller than busybox alone: it must evict to stay under it. Host
            // 1's holds every input, for the second-build count.
            .env("FLEET_CACHE_1", "64M")
            .env("FLEET_CACHE_2", SMALL_CACHE.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        support::die_with_parent(&mut c, nix::sys::signal::Signal::SIGTERM);
        let mut script = c.spawn().expect("running scripts/fleet.sh");
        let mut lines = BufReader::new(script.stdout.take().unwrap()).lines();
        let (mut metrics, mut front) = (Vec::new(), None);
        while front.is_none() {
            let line = lines
                .next()
                .expect("scripts/fleet.sh ended before printing `front`")
                .unwrap();
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["host", n, url] => {
                    assert_eq!(n, (metrics.len() + 1).to_string(), "{line}");
                    metrics.push(url.to_owned());
                }
                ["front", addr] => front = Some(addr.to_owned()),
                _ => panic!("unexpected line from scripts/fleet.sh: {line:?}"),
            }
        }
        assert_eq!(metrics.len(), 2);
        Self {
            script,
            dir,
            metrics,
            front: front.unwrap(),
        }
    }

    fn channel(addr: &str) -> Channel {
        let http = addr.strip_prefix("grpc+").unwrap();
        Endpoint::from_shared(http.to_owned())
            .unwrap()
            .connect_lazy()
    }

    /// Host `n`'s (1-based) own gRPC address, from its log.
    fn host_addr(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join(format!("host{n}/log"))).unwrap();
        let listen = log
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .expect("no listen= in the host's log");
        format!("grpc+http://{listen}")
    }

    /// Host `n`'s command line, to start it again as fleet.sh did.
    fn host_argv(&self, n: usize) -> Vec<String> {
        std::fs::read(format!("/proc/{}/cmdline", self.host_pid(n)))
            .unwrap()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8(a.to_vec()).unwrap())
            .collect()
    }

    /// The bucket the hosts share, through Garage node `i`'s S3 endpoint (host 1's
    /// `--directory-service-addr`, which names node 0, pointed at node `i`).
    fn bucket_addr_via(&self, i: usize) -> String {
        let argv = self.host_argv(1);
        let at = argv
            .iter()
            .position(|a| a == "--directory-service-addr")
            .expect("no --directory-service-addr on host 1");
        let addr = &argv[at + 1];
        let (head, tail) = addr
            .split_once("endpoint=http://127.0.0.1:")
            .expect("no endpoint in the bucket address");
        let rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
        format!(
            "{head}endpoint=http://127.0.0.1:{}{rest}",
            self.garage_s3_port(i)
        )
    }

    fn garage_config(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("garage{i}/garage.toml"))
    }

    /// Garage node `i`'s S3 port, from the config fleet.sh wrote.
    fn garage_s3_port(&self, i: usize) -> u16 {
        let toml = std::fs::read_to_string(self.garage_config(i)).unwrap();
        let s3 = toml.split("[s3_api]").nth(1).expect("no [s3_api] section");
        s3.lines()
            .find_map(|l| l.strip_prefix("api_bind_addr = \"127.0.0.1:"))
            .and_then(|p| p.trim_end_matches('"').parse().ok())
            .expect("no S3 api_bind_addr")
    }

    /// Garage node `i`'s count of S3 GetObject calls (its admin API's /metrics, open
    /// without a token in fleet.sh's config).
    async fn garage_gets(&self, i: usize) -> u64 {
        let toml = std::fs::read_to_string(self.garage_config(i)).unwrap();
        let admin = toml.split("[admin]").nth(1).expect("no [admin] section");
        let hostport = admin
            .lines()
            .find_map(|l| l.strip_prefix("api_bind_addr = \""))
            .expect("no admin api_bind_addr")
            .trim_end_matches('"');
        // HTTP/1.0: Garage closes the connection after the answer (read to its end).
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(hostport).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).await.unwrap();
        text.lines()
            .find_map(|l| {
                l.strip_prefix("api_s3_request_counter{api_endpoint=\"GetObject\"} ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Garage node `i`'s pid: the process whose command line names its config.
    fn garage_pid(&self, i: usize) -> i32 {
        let config = self.garage_config(i).to_string_lossy().into_owned();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.contains(&config.as_bytes()) && args.contains(&&b"server"[..]) {
                found.push(pid);
            }
        }
        assert_eq!(found.len(), 1, "garage node {i}: {found:?}");
        found[0]
    }

    fn host_pid(&self, n: usize) -> i32 {
        std::fs::read_to_string(self.dir.path().join(format!("host{n}/pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// A counter or gauge of host `n` (1-based); 0 when absent.
    async fn metric(&self, n: usize, name: &str) -> u64 {
        let hostport = self.metrics[n - 1]
            .strip_prefix("http://")
            .unwrap()
            .trim_end_matches("/metrics");
        let text = support::serve::reqwest_free_get(hostport).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }
}

/// One build through `front` running `script` with busybox and `extra` inputs, its output
/// named `out`.
fn build_with(
    front: &Channel,
    busybox: &cpb::Node,
    extra: &[cpb::Node],
    script: String,
) -> impl std::future::Future<
    Output = Result<tonic::Response<tvix_build_vm::proto::build::Build>, tonic::Status>,
> + Send
       + 'static {
    let mut req = seed_request(busybox.clone(), &script, &["out"]);
    req.inputs.extend_from_slice(extra);
    let mut client = BuildServiceClient::new(front.clone());
    async move { client.do_build(req).await }
}

/// One build through `front` running `script` with busybox, its output named `out`.
fn build(
    front: &Channel,
    busybox: &cpb::Node,
    script: String,
) -> impl std::future::Future<
    Output = Result<tonic::Response<tvix_build_vm::proto::build::Build>, tonic::Status>,
> + Send
       + 'static {
    build_with(front, busybox, &[], script)
}

/// A plain file input named `name` (at /nix/store/`name` in the guest).
fn file_input(name: &str, digest: &B3Digest, size: usize) -> cpb::Node {
    cpb::Node {
        node: Some(cpb::node::Node::File(cpb::FileNode {
            name: name.to_owned().into(),
            digest: bytes::Bytes::copy_from_slice(digest.as_bytes()),
            size: size as u64,
            executable: false,
        })),
    }
}

/// Sends SIGTERM to a process this test did not start and waits (20 s at most) until it is
/// gone or a zombie its parent has not reaped yet.
fn stop_process(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            // The state follows the parenthesised command name.
            Ok(stat)
                if stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, r)| r.starts_with('Z')) =>
            {
                return
            }
            Ok(_) => {}
        }
        assert!(Instant::now() < deadline, "process {pid} ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The number of chunk objects in the bucket.
async fn count_chunks(bucket: &Bucket) -> usize {
    use futures::TryStreamExt;
    let prefix = bucket.base.clone().join("chunks");
    let all: Vec<_> = bucket
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .unwrap();
    all.len()
}

/// Host 2's chunk cache size, in bytes.
const SMALL_CACHE: u64 = 1 << 20;

const SUCCESS: &str = "tvix_build_vm_builds_total{result=\"success\"}";

async fn read_blob(addr: &str, digest: &B3Digest) -> Vec<u8> {
    let blobs = GrpcBlobService::new(Fleet::channel(addr));
    read_to_vec(&blobs, digest).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_spreads_builds_survives_a_garage_node_down_and_a_host_killed_mid_build() {
    let mut fleet = Fleet::start();
    let front = Fleet::channel(&fleet.front);
    let busybox = upload_busybox(front.clone()).await;
    let n: usize = if std::env::var_os("TVIX_FLEET_LONG").is_some() {
        100
    } else {
        20
    };

    // n builds at once through the front, each writing its own output.
    let builds =
        (0..n).map(|i| build(&front, &busybox, format!("echo fleet {i} > /nix/store/out")));
    let results = futures::future::join_all(builds).await;
    let mut outputs = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let build = r
            .unwrap_or_else(|e| panic!("build {i}: {e:?}"))
            .into_inner();
        let out = file_node(&build.outputs[0]);
        outputs.push((i, B3Digest::try_from(&out.digest[..]).unwrap()));
    }
    let (s1, s2) = (
        fleet.metric(1, SUCCESS).await,
        fleet.metric(2, SUCCESS).await,
    );
    assert_eq!(s1 + s2, n as u64, "host 1: {s1}, host 2: {s2}");
    assert!(s1 > 0 && s2 > 0, "not spread: host 1 {s1}, host 2 {s2}");

    // Every output through the front and through each host (one shared bucket), in
    // tvix's and in snix's castore package.
    let addrs = [fleet.front.clone(), fleet.host_addr(1), fleet.host_addr(2)];
    for (i, d) in &outputs {
        let snix = tvix_build_vm::castore::addr::blob_service_from_addr(&format!(
            "{}?package=snix",
            fleet.front
        ))
        .unwrap();
        assert_eq!(
            read_to_vec(snix.as_ref(), d).await.unwrap().unwrap(),
            format!("fleet {i}\n").into_bytes(),
            "snix.castore.v1 through the front"
        );
    }
    for (i, d) in &outputs {
        for a in &addrs {
            assert_eq!(
                read_blob(a, d).await,
                format!("fleet {i}\n").into_bytes(),
                "{a}"
            );
        }
    }

    // One Garage node of three stopped (node 2: no host talks to it, so what is tested is
    // the bucket with a replica missing, not a host losing its endpoint). The input was
    // uploaded before the stop and no host has read it yet, so no chunk cache holds it.
    let data = support::noise(600 << 10, 7);
    let data_digest = put_bytes(&GrpcBlobService::new(front.clone()), &data)
        .await
        .unwrap();
    let data_node = file_input("data", &data_digest, data.len());
    stop_process(fleet.garage_pid(2));
    let down = (0..2).map(|i| {
        build_with(
            &front,
            &busybox,
            std::slice::from_ref(&data_node),
            format!("{{ cat /nix/store/data; echo down {i}; }} > /nix/store/out"),
        )
    });
    let mut written_while_down = Vec::new();
    for (i, r) in futures::future::join_all(down)
        .await
        .into_iter()
        .enumerate()
    {
        let done = r
            .unwrap_or_else(|e| panic!("build {i} with a Garage node down: {e:?}"))
            .into_inner();
        let d = B3Digest::try_from(&file_node(&done.outputs[0]).digest[..]).unwrap();
        let mut want = data.clone();
        want.extend_from_slice(format!("down {i}\n").as_bytes());
        assert_eq!(read_blob(&fleet.front, &d).await, want, "output {i}");
        written_while_down.push((d, want));
    }
    // Restarted, the node serves everything: what was written before the stop and while
    // it was down, read through its own S3 endpoint (no cache).
    let mut c = Command::new(support::garage::garage_bin());
    c.arg("-c")
        .arg(fleet.garage_config(2))
        .arg("server")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(fleet.dir.path().join("garage2/log.restart")).unwrap());
    support::die_with_parent(&mut c, nix::sys::signal::Signal::SIGTERM);
    let mut garage2 = c.spawn().unwrap();
    let via2 =
        tvix_build_vm::castore::addr::blob_service_from_addr(&fleet.bucket_addr_via(2)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until the node answers at all (it rejoins the cluster a few seconds after start).
    while !matches!(via2.has(&data_digest).await, Ok(true)) {
        assert!(
            Instant::now() < deadline,
            "the restarted Garage node never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut everything: Vec<(B3Digest, Vec<u8>)> = outputs
        .iter()
        .map(|(i, d)| (*d, format!("fleet {i}\n").into_bytes()))
        .collect();
    everything.push((data_digest, data.clone()));
    everything.extend(written_while_down);
    for (d, want) in &everything {
        let got = read_to_vec(via2.as_ref(), d).await.unwrap();
        assert_eq!(got.as_ref(), Some(want), "{d} through the restarted node");
    }

    // The cache through builds: the same build twice on host 1 (its own address), with an
    // input it has never read. Host 1 alone talks to Garage node 0, so node 0's count of
    // S3 GetObject calls is host 1's: the second build fetches no chunk, only what the
    // first fetched as well (index objects).
    let fresh = support::noise(2 << 20, 11);
    let fresh_digest = put_bytes(
        &GrpcBlobService::new(Fleet::channel(&fleet.host_addr(2))),
        &fresh,
    )
    .await
    .unwrap();
    let fresh_node = file_input("fresh", &fresh_digest, fresh.len());
    let host1 = Fleet::channel(&fleet.host_addr(1));
    let mut gets = vec![fleet.garage_gets(0).await];
    for round in 0..2 {
        let done = build_with(
            &host1,
            &busybox,
            std::slice::from_ref(&fresh_node),
            "wc -c < /nix/store/fresh > /nix/store/out".to_owned(),
        )
        .await
        .unwrap_or_else(|e| panic!("build {round} on host 1: {e:?}"))
        .into_inner();
        let d = B3Digest::try_from(&file_node(&done.outputs[0]).digest[..]).unwrap();
        assert_eq!(
            read_blob(&fleet.front, &d).await,
            format!("{}\n", fresh.len()).into_bytes()
        );
        gets.push(fleet.garage_gets(0).await);
    }
    let (first, second) = (gets[1] - gets[0], gets[2] - gets[1]);
    // 2 MiB in chunks of at most 512 KiB: at least 4 chunks the first build fetched.
    assert!(
        first >= second + 4,
        "GetObject calls: first build {first}, second {second}: the second fetched chunks"
    );

    // Four sleeping builds: two per host (max-vms 2, least connections). Host 1 dies, in
    // the middle of those builds and of a blob upload to it that has reached the bucket
    // in part (some of its chunks).
    let sleepers: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(build(
                &front,
                &busybox,
                format!("sleep 20; echo late {i} > /nix/store/out"),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while fleet.metric(1, "tvix_build_vm_vms_running").await == 0
        || fleet.metric(2, "tvix_build_vm_vms_running").await == 0
    {
        assert!(
            Instant::now() < deadline,
            "the sleepers never ran on both hosts"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let on_host1 = fleet.metric(1, "tvix_build_vm_vms_running").await;
    let argv = fleet.host_argv(1);
    let bucket = Bucket::from_addr(&fleet.bucket_addr_via(0)).unwrap();
    let chunks_before = count_chunks(&bucket).await;
    let cut = support::noise(8 << 20, 8);
    let cut_digest = B3Digest::of(&cut);
    let mut upload = GrpcBlobService::new(Fleet::channel(&fleet.host_addr(1)))
        .open_write()
        .await
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        upload.write_all(&cut[..6 << 20]).await.unwrap();
        upload.flush().await.unwrap();
    }
    while count_chunks(&bucket).await == chunks_before {
        assert!(
            Instant::now() < deadline,
            "the upload through host 1 put no chunk in the bucket"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fleet.host_pid(1)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (mut failed, mut succeeded) = (0, 0);
    for s in sleepers {
        match s.await.unwrap() {
            Ok(_) => succeeded += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, on_host1, "only host 1's running builds fail");
    assert_eq!(succeeded, 4 - on_host1);
    assert!(
        upload.close().await.is_err(),
        "an upload to a killed host was acknowledged"
    );

    // The next builds go to host 2 and succeed.
    let before = fleet.metric(2, SUCCESS).await;
    for i in 0..2 {
        let done = build(&front, &busybox, format!("echo after {i} > /nix/store/out"))
            .await
            .unwrap_or_else(|e| panic!("build after the kill: {e:?}"))
            .into_inner();
        let d = B3Digest::try_from(&file_node(&done.outputs[0]).digest[..]).unwrap();
        assert_eq!(
            read_blob(&fleet.front, &d).await,
            format!("after {i}\n").into_bytes()
        );
    }
    assert_eq!(fleet.metric(2, SUCCESS).await, before + 2);

    // Nothing partial in the bucket: the cut upload's chunks may be there, never an index
    // (or anything) naming what is missing; and the cut blob is not visible.
    let summary = check_whole(&bucket)
        .await
        .unwrap_or_else(|p| panic!("the bucket after the kill:\n{}", p.join("\n")));
    assert!(
        summary.unindexed_chunks > 0,
        "the cut upload left no chunk behind, so the check saw no partial write: {summary:?}"
    );
    assert!(!GrpcBlobService::new(front.clone())
        .has(&cut_digest)
        .await
        .unwrap());

    // Host 1 restarted: once its /readyz answers, the front sends it builds again.
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(fleet.dir.path().join("host1/log.restart")).unwrap());
    support::die_with_parent(&mut c, nix::sys::signal::Signal::SIGTERM);
    let mut restarted = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics1 = fleet.metrics[0]
        .strip_prefix("http://")
        .unwrap()
        .trim_end_matches("/metrics")
        .to_owned();
    while tokio::net::TcpStream::connect(&metrics1).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the restarted host never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut i = 0;
    while fleet.metric(1, SUCCESS).await == 0 {
        assert!(Instant::now() < deadline, "the restarted host got no build");
        // Two at once: with host 2 busy on one, least connections picks host 1 once up.
        let reqs: Vec<_> = (0..2)
            .map(|_| {
                i += 1;
                build(&front, &busybox, format!("echo again {i} > /nix/store/out"))
            })
            .collect();
        for r in futures::future::join_all(reqs).await {
            r.unwrap_or_else(|e| panic!("build with host 1 restarting: {e:?}"));
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(restarted.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(restarted.wait().unwrap().success());

    // Every build on host 2 read busybox (2 MB) through its 1 MiB chunk cache: full, it
    // evicted and stays under its size on disk, yet holds chunks.
    let on_disk: u64 = std::fs::read_dir(fleet.dir.path().join("host2/cache"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= SMALL_CACHE,
        "host 2's cache: {on_disk} bytes on disk, more than {SMALL_CACHE}"
    );
    assert!(on_disk > 0, "host 2's cache kept nothing");

    // The Garage node this test restarted is its own to stop.
    stop_process(garage2.id() as i32);
    garage2.wait().unwrap();

    // SIGTERM stops everything the script started.
    let pids = support_pids(fleet.dir.path());
    // What fleet.sh started and still runs: Garage nodes 0 and 1 and host 2 (this test
    // stopped Garage node 2 and host 1 and their restarted copies itself), found by name.
    for (what, pid) in [
        ("garage node 0", fleet.garage_pid(0)),
        ("garage node 1", fleet.garage_pid(1)),
        ("host 2", fleet.host_pid(2)),
    ] {
        assert!(pids.contains(&pid), "{what} ({pid}) not among {pids:?}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fleet.script.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = fleet.script.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for pid in pids {
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "process {pid} outlived scripts/fleet.sh"
        );
    }
}

/// The pids of the processes under the fleet's directory (the hosts' pid files, and every
/// process whose command line names the directory: Garage nodes, HAProxy, QEMU).
fn support_pids(dir: &std::path::Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            pids.push(pid);
        }
    }
    assert!(pids.len() >= 3, "found only {pids:?} naming {needle}");
    pids
}
