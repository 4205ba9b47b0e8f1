//! The local fleet of scripts/fleet.sh, for real: 3 Garage nodes, 2 `serve` hosts on the
//! shared bucket, HAProxy in front, real VMs. Builds sent to the front all succeed and
//! spread over both hosts; their outputs are readable through the front (tvix's and snix's
//! castore packages) and through each host; a host SIGKILLed mid-build fails only its own running builds (UNAVAILABLE) and the
//! next builds succeed on the other host, and restarted it gets builds again; SIGTERM to the script leaves no process behind.
//!
//! Cost: 20 trivial builds and 4 sleeping ones, about a minute or two on 2 cores under TCG.
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
use support::serve::{file_node, seed_request, upload_busybox};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tvix_build_vm::castore::blob::{read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;

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

/// One build through `front` running `script` with busybox, its output named `out`.
fn build(
    front: &Channel,
    busybox: &tvix_build_vm::proto::castore::Node,
    script: String,
) -> impl std::future::Future<
    Output = Result<tonic::Response<tvix_build_vm::proto::build::Build>, tonic::Status>,
> + Send
       + 'static {
    let req = seed_request(busybox.clone(), &script, &["out"]);
    let mut client = BuildServiceClient::new(front.clone());
    async move { client.do_build(req).await }
}

const SUCCESS: &str = "tvix_build_vm_builds_total{result=\"success\"}";

async fn read_blob(addr: &str, digest: &B3Digest) -> Vec<u8> {
    let blobs = GrpcBlobService::new(Fleet::channel(addr));
    read_to_vec(&blobs, digest).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_spreads_builds_and_survives_a_host_killed_mid_build() {
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

    // Four sleeping builds: two per host (max-vms 2, least connections). Host 1 dies.
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
    // Its command line, to start it again afterwards as fleet.sh did.
    let argv: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", fleet.host_pid(1)))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect();
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

    // SIGTERM stops everything the script started.
    let pids = support_pids(fleet.dir.path());
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
    assert!(pids.len() >= 4, "found only {pids:?} naming {needle}");
    pids
}
