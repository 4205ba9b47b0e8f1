//! A real `serve` process on a unix socket, and the requests the tests send it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::cli::{bin, Env};
use super::{die_with_parent, BUSYBOX};
use bytes::Bytes;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tvix_build_vm::castore::blob::{put_bytes, GrpcBlobService};
use tvix_build_vm::castore::package::PackageChannel;
use tvix_build_vm::proto::{build as pb, build_vm as pbvm, castore as cpb};

pub const SH: &str = "/nix/store/busybox";

/// Where a [`Serve`] listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// `unix:<its directory>/s.sock` ([`Serve::sock`]).
    Unix,
    /// `127.0.0.1:<port>`.
    Tcp(u16),
}

/// A running `serve`; SIGTERM and wait on drop.
pub struct Serve {
    pub child: Child,
    /// The unix socket it listens on ([`Listen::Unix`]).
    pub sock: PathBuf,
    /// Its directory: the socket and `serve.log` (its stderr).
    pub dir: tempfile::TempDir,
}

impl Serve {
    /// `serve --store <env's store> --listen unix:<sock> <args>`, with `env`'s guest kernel,
    /// agent and runtime directory.
    pub fn start(env: &Env, args: &[&str]) -> Self {
        let mut c = env.command();
        c.arg("serve").arg("--store").arg(env.store.path());
        Self::spawn(c, args, Listen::Unix)
    }

    /// `serve <args>` without a guest kernel or agent: a castore-only server.
    pub fn castore(args: &[&str], listen: Listen) -> Self {
        let mut c = bin();
        c.arg("serve");
        Self::spawn(c, args, listen)
    }

    /// `cmd` (a `tvix-build-vm serve` command) with `args` and the `--listen` of `listen`;
    /// returns once it accepts connections. It dies with the test (SIGTERM).
    pub fn spawn(mut c: Command, args: &[&str], listen: Listen) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tbv-serve-")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("s.sock");
        let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
        let address = match listen {
            Listen::Unix => format!("unix:{}", sock.display()),
            Listen::Tcp(port) => format!("127.0.0.1:{port}"),
        };
        c.arg("--listen")
            .arg(address)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut c, nix::sys::signal::Signal::SIGTERM);
        let child = c.spawn().unwrap();
        let s = Self { child, sock, dir };
        match listen {
            Listen::Unix => s.wait_for(|| s.sock.exists(), "the socket"),
            Listen::Tcp(port) => s.wait_for(
                || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                "the TCP listener",
            ),
        }
        s
    }

    /// The castore address of a unix-socket server, for `--blob-service-addr` and
    /// `--directory-service-addr`.
    pub fn grpc_addr(&self) -> String {
        format!("grpc+unix://{}", self.sock.display())
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn wait_for(&self, cond: impl Fn() -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "{what} did not appear:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("unix://{}", self.sock.display()))
            .unwrap()
            .connect_lazy()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Serve {
    /// (VmRSS KiB, open fds) of the server process.
    pub fn usage(&self) -> (u64, u64) {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        (rss, fds)
    }
}

impl Drop for Serve {
    /// SIGCONT and SIGTERM, up to 20 s to exit, then SIGKILL: a drop must not panic (a test that
    /// already failed would abort instead of reporting).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // A test may have stopped it (SIGSTOP); a stopped process does not act on SIGTERM.
            self.signal(nix::sys::signal::Signal::SIGCONT);
            self.signal(nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn env_var(k: &str, v: &str) -> pb::build_request::EnvVar {
    pb::build_request::EnvVar {
        key: k.into(),
        value: Bytes::from(v.to_owned()),
    }
}

/// Uploads /bin/busybox through the castore service; the input node named `busybox`.
pub async fn upload_busybox(channel: Channel) -> cpb::Node {
    let data = std::fs::read(BUSYBOX).unwrap();
    let blobs = GrpcBlobService::new(channel);
    let digest = put_bytes(&blobs, &data).await.unwrap();
    cpb::Node {
        node: Some(cpb::node::Node::File(cpb::FileNode {
            name: "busybox".into(),
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size: data.len() as u64,
            executable: true,
        })),
    }
}

pub fn seed_request(busybox: cpb::Node, script: &str, outputs: &[&str]) -> pb::BuildRequest {
    pb::BuildRequest {
        command_args: vec![SH.into(), "sh".into(), "-c".into(), script.into()],
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        environment_vars: vec![
            env_var("HOME", "/homeless-shelter"),
            env_var("PATH", "/nix/store"),
        ],
        inputs: vec![busybox],
        constraints: Some(pb::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
    }
}

pub fn file_node(n: &cpb::Node) -> &cpb::FileNode {
    match &n.node {
        Some(cpb::node::Node::File(f)) => f,
        other => panic!("expected a file node, got {other:?}"),
    }
}

pub async fn health(channel: Channel, service: &str) -> i32 {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// What a default `serve` (with its build host) lists and reports serving: both castore
/// families, tvix build in the seed layout and its streaming service, snix build.
pub const SERVED_BY_DEFAULT: &[&str] = &[
    "tvix.castore.v1.BlobService",
    "tvix.castore.v1.DirectoryService",
    "snix.castore.v1.BlobService",
    "snix.castore.v1.DirectoryService",
    "tvix.build.v1.BuildService",
    "tvix.build.vm.v1.BuildVmService",
    "snix.build.v1.BuildService",
];

/// The services gRPC reflection lists.
pub async fn list_services(channel: impl Into<PackageChannel>) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel.into())
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection reply {resp:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// Checks that reflection lists every service in `want` and that health reports every
/// listed service (but its own two) serving: nothing listed that is not served.
pub async fn assert_listed_and_serving(channel: impl Into<PackageChannel>, want: &[&str]) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let channel = channel.into();
    let names = list_services(channel.clone()).await;
    for w in want {
        assert!(names.iter().any(|n| n == w), "{w} is not listed: {names:?}");
    }
    let mut h = HealthClient::new(channel);
    for name in names.iter().filter(|n| !n.starts_with("grpc.")) {
        let status = h
            .check(HealthCheckRequest {
                service: name.clone(),
            })
            .await
            .map(|r| r.into_inner().status);
        assert_eq!(
            status.ok(),
            Some(ServingStatus::Serving as i32),
            "{name} is listed but not reported serving"
        );
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET of `path` on the metrics listener: (status line, body).
pub async fn http_probe(addr: &str, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.lines().next().unwrap_or_default().to_owned();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

/// A plain HTTP GET /metrics.
pub async fn reqwest_free_get(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub fn runtime_entries(env: &Env) -> usize {
    std::fs::read_dir(env.runtime.path())
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with("svc-"))
        .count()
}

/// The client of a running `BuildPaths` build goes away once the build has logged: its VM
/// (its runtime directory) must go within seconds, not when the build would have ended.
pub async fn assert_dropped_paths_stream_kills_its_vm(
    env: &Env,
    server: &Serve,
    mut running: tonic::Streaming<pbvm::PathsBuildEvent>,
) {
    loop {
        match running.message().await.unwrap().unwrap().event.unwrap() {
            pbvm::paths_build_event::Event::Log(_) => break,
            pbvm::paths_build_event::Event::Started(_) => {}
            pbvm::paths_build_event::Event::Build(b) => panic!("finished early: {b:?}"),
        }
    }
    assert_eq!(runtime_entries(env), 1, "the build's runtime directory");
    drop(running);
    let deadline = Instant::now() + Duration::from_secs(5);
    while runtime_entries(env) > 0 {
        assert!(
            Instant::now() < deadline,
            "the dropped build's VM is still there:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a `BuildPaths` stream to its end: whether it started with a build id, the live
/// log (stdout and stderr as they came), and the result, which must come last.
pub async fn read_paths_stream(
    mut stream: tonic::Streaming<pbvm::PathsBuildEvent>,
) -> (bool, String, pbvm::PathsBuild) {
    let (mut started, mut log, mut last) = (false, Vec::new(), None);
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            pbvm::paths_build_event::Event::Started(s) => started = !s.build_id.is_empty(),
            pbvm::paths_build_event::Event::Log(l) => {
                assert!(last.is_none(), "log after the result");
                log.extend_from_slice(&l.data)
            }
            pbvm::paths_build_event::Event::Build(b) => last = Some(b),
        }
    }
    (started, String::from_utf8(log).unwrap(), last.unwrap())
}

/// The status of a build of `echo last words >&2; exit 42`: ABORTED with the exit code, the
/// end of the log, and the stored log's digest in the metadata.
pub fn assert_aborted_with_last_words(status: &tonic::Status) {
    assert_eq!(status.code(), tonic::Code::Aborted, "{}", status.message());
    for want in ["exited with code 42", "last words"] {
        assert!(
            status.message().contains(want),
            "{want}: {}",
            status.message()
        );
    }
    assert!(status
        .metadata()
        .get("x-tvix-build-vm-log-digest")
        .is_some());
}
