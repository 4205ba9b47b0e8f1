//! Against the real snix (outside CI): `snix-store` and `snix-build` binaries built by hand
//! from snix's source (docs/clients.md says how and at which commit), in the directory named
//! by `SNIX_PEER_BIN`. Run with
//! `SNIX_PEER_BIN=<dir> cargo nextest run --test snix_peer_vm --run-ignored ignored-only`.
//!
//! - `snix-store import-path` uploads a tree into our `serve`; we read it back through
//!   tvix.castore.v1.
//! - our `serve` with a `snix-store daemon` as its castore builds, snix's own gRPC build
//!   client (`snix-build daemon --build-service-addr grpc+unix:...`, which parses and
//!   validates our `BuildResponse` into its `BuildResult`) in front of it: the request goes
//!   snix client -> snix-build -> our serve, the output lands in the snix-store.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::cli::Env;
use support::serve::Serve;
use support::snix;
use tvix_build_vm::castore::channel::channel_from_addr;
use tvix_build_vm::castore::directory_service::GrpcDirectoryService;
use tvix_build_vm::castore::export::export_node;
use tvix_build_vm::castore::Node;
use tvix_build_vm::proto::snix_build as sb;

fn peer(name: &str) -> PathBuf {
    let dir = std::env::var_os("SNIX_PEER_BIN")
        .expect("SNIX_PEER_BIN: the directory with snix-store and snix-build");
    let p = Path::new(&dir).join(name);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// A peer daemon, killed on drop; its stderr in `log`.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(mut c: Command, sock: &Path, log: PathBuf) -> Self {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        let child = c.spawn().unwrap();
        let d = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "{}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs snix-store and snix-build built by hand (SNIX_PEER_BIN), see docs/clients.md"]
async fn snix_store_imports_a_tree_into_serve() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a"), b"hello\n").unwrap();
    std::fs::write(tree.join("sub/big"), vec![7u8; 3_000_000]).unwrap();
    std::os::unix::fs::symlink("a", tree.join("link")).unwrap();
    // snix's spelling of our socket.
    let ours = format!("grpc+unix:{}", server.sock.display());
    let out = Command::new(peer("snix-store"))
        .arg("import-path")
        .args([
            "--blob-service-addr",
            &ours,
            "--directory-service-addr",
            &ours,
        ])
        .arg("--path-info-service-addr")
        .arg(format!(
            "redb:{}",
            tmp.path().join("pathinfo.redb").display()
        ))
        .arg(&tree)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store_path = String::from_utf8(out.stdout).unwrap();
    assert!(store_path.trim().ends_with("-tree"), "{store_path}");
    // snix prints no castore digest: the root is in its path-info database, a PathInfo
    // protobuf whose entry follows the store path's name (field 2, 32 bytes).
    let db = std::fs::read(tmp.path().join("pathinfo.redb")).unwrap();
    let name = store_path
        .trim()
        .trim_start_matches("/nix/store/")
        .as_bytes();
    let at = db
        .windows(name.len())
        .position(|w| w == name)
        .expect("the store path in snix's path-info database")
        + name.len();
    assert_eq!(&db[at..at + 2], [0x12, 0x20], "a digest follows the name");
    let digest = tvix_build_vm::castore::B3Digest::try_from(&db[at + 2..at + 34]).unwrap();
    let tvix = channel_from_addr(&server.grpc_addr()).unwrap();
    let blobs = tvix_build_vm::castore::blob::GrpcBlobService::new(tvix.clone());
    let dirs = GrpcDirectoryService::new(tvix);
    let root = Node::Directory { digest, size: 0 };
    let back = tmp.path().join("back");
    export_node(&blobs, &dirs, &root, &back).await.unwrap();
    assert_eq!(std::fs::read(back.join("a")).unwrap(), b"hello\n");
    assert_eq!(
        std::fs::read(back.join("sub/big")).unwrap(),
        vec![7u8; 3_000_000]
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("a")
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs snix-store and snix-build built by hand (SNIX_PEER_BIN), see docs/clients.md"]
async fn snix_build_client_builds_through_serve_on_a_snix_store() {
    let env = Env::new();
    let tmp = tempfile::Builder::new()
        .prefix("tbv-snix-")
        .tempdir_in("/tmp")
        .unwrap();
    let store_sock = tmp.path().join("store.sock");
    let mut c = Command::new(peer("snix-store"));
    c.arg("daemon")
        .arg("-l")
        .arg(&store_sock)
        .args(["--blob-service-addr", "memory:"])
        .args(["--directory-service-addr", "redb+memory:"])
        .args(["--path-info-service-addr", "redb+memory:"]);
    let store = Daemon::start(c, &store_sock, tmp.path().join("store.log"));
    let snix_castore = format!("grpc+unix:{}?package=snix", store_sock.display());
    let server = Serve::start(
        &env,
        &[
            "--blob-service-addr",
            &snix_castore,
            "--directory-service-addr",
            &snix_castore,
        ],
    );
    let build_sock = tmp.path().join("build.sock");
    let castore_for_snix = format!("grpc+unix:{}", store_sock.display());
    let mut c = Command::new(peer("snix-build"));
    c.arg("daemon")
        .arg("-l")
        .arg(&build_sock)
        .args(["--blob-service-addr", &castore_for_snix])
        .args(["--directory-service-addr", &castore_for_snix])
        .arg("--build-service-addr")
        .arg(format!("grpc+unix:{}", server.sock.display()));
    let builder = Daemon::start(c, &build_sock, tmp.path().join("build.log"));

    // The input goes into the snix-store, as a snix client's would.
    let store_channel =
        tonic::transport::Endpoint::from_shared(format!("unix://{}", store_sock.display()))
            .unwrap()
            .connect_lazy();
    let busybox = snix::upload_busybox(store_channel.clone()).await;
    let req = snix::two_outputs(busybox);
    let build_channel =
        tonic::transport::Endpoint::from_shared(format!("unix://{}", build_sock.display()))
            .unwrap()
            .connect_lazy();
    let response = sb::build_service_client::BuildServiceClient::new(build_channel)
        .do_build(req)
        .await
        .unwrap_or_else(|s| {
            panic!(
                "{s:?}\n--- snix-build ---\n{}\n--- serve ---\n{}",
                builder.log(),
                server.log()
            )
        })
        .into_inner();
    snix::assert_two_outputs(store_channel, &response).await;
    drop(builder);
    drop(server);
    drop(store);
}
