//! A 3-node Garage cluster on localhost for the fleet tests: replication factor 3, sqlite
//! metadata, random free ports, its own temporary directories. The bucket and key are made
//! with Garage's own CLI. Dropping the cluster stops every node it started.
//!
//! The binary comes from `TVIX_GARAGE_BIN` or else from `scripts/garage.sh` (which builds
//! and caches it the first time; that takes about 20 minutes on 2 cores).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "castore";
pub const REGION: &str = "garage";
const KEY_NAME: &str = "castore-key";
/// How long a node may take to answer its CLI after start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The Garage binary, built if needed.
pub fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TVIX_GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("running scripts/garage.sh");
    assert!(out.status.success(), "scripts/garage.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    pub config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    pub admin_port: u16,
    child: Option<Child>,
}

pub struct GarageCluster {
    bin: PathBuf,
    pub nodes: Vec<Node>,
    pub key_id: String,
    pub secret_key: String,
    dir: tempfile::TempDir,
}

impl GarageCluster {
    /// Starts three nodes, joins them, applies a layout with replication factor 3 and
    /// creates the bucket and a key allowed to read and write it.
    pub fn start() -> Self {
        let bin = garage_bin();
        let dir = tempfile::tempdir().unwrap();
        let secret = random_hex();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let root = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(root.join("meta")).unwrap();
            std::fs::create_dir_all(root.join("data")).unwrap();
            let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{meta}\"\n\
                     data_dir = \"{data}\"\n\
                     db_engine = \"sqlite\"\n\
                     replication_factor = 3\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_secret = \"{secret}\"\n\
                     [s3_api]\n\
                     s3_region = \"{REGION}\"\n\
                     api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\
                     [admin]\n\
                     api_bind_addr = \"127.0.0.1:{admin_port}\"\n",
                    meta = root.join("meta").display(),
                    data = root.join("data").display(),
                ),
            )
            .unwrap();
            nodes.push(Node {
                config,
                s3_port,
                rpc_port,
                admin_port,
                child: None,
            });
        }
        let mut cluster = Self {
            bin,
            nodes,
            key_id: String::new(),
            secret_key: String::new(),
            dir,
        };
        for i in 0..3 {
            cluster.start_node(i);
        }
        let ids: Vec<String> = (0..3)
            .map(|i| {
                cluster
                    .cli_retry(i, &["node", "id", "-q"])
                    .trim()
                    .to_string()
            })
            .collect();
        for id in &ids[1..] {
            cluster.cli_retry(0, &["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap();
            cluster.cli_retry(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        cluster.cli_retry(0, &["layout", "apply", "--version", "1"]);
        cluster.cli_retry(0, &["bucket", "create", BUCKET]);
        let key = cluster.cli_retry(0, &["key", "create", KEY_NAME]);
        cluster.key_id = field(&key, "key id");
        cluster.secret_key = field(&key, "secret key");
        cluster.cli_retry(
            0,
            &[
                "bucket", "allow", "--read", "--write", BUCKET, "--key", KEY_NAME,
            ],
        );
        cluster
    }

    fn start_node(&mut self, i: usize) {
        let log = std::fs::File::create(self.dir.path().join(format!("node{i}.log"))).unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].config)
            .arg("server")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting garage");
        self.nodes[i].child = Some(child);
    }

    /// Runs a CLI command against node `i` until it succeeds (a node answers its CLI a
    /// little after start, and a new layout takes a moment to spread); returns stdout.
    pub fn cli_retry(&self, i: usize, args: &[&str]) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[i].config)
                .args(args)
                .output()
                .expect("running the garage CLI");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "garage {args:?} on node {i} kept failing: {}\nnode logs in {}",
                String::from_utf8_lossy(&out.stderr),
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The castore address of the bucket through node `i`'s S3 endpoint.
    pub fn addr_via(&self, i: usize, prefix: &str) -> String {
        format!(
            "objectstore+s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{}&region={REGION}\
             &access_key_id={}&secret_access_key={}&allow_http=true",
            self.nodes[i].s3_port, self.key_id, self.secret_key
        )
    }

    /// Stops node `i` (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            stop(&mut child);
        }
    }

    pub fn restart_node(&mut self, i: usize) {
        self.stop_node(i);
        self.start_node(i);
        self.cli_retry(i, &["node", "id", "-q"]);
    }
}

fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                stop(&mut child);
            }
        }
    }
}

/// 32 random bytes in hex (Garage's rpc_secret).
fn random_hex() -> String {
    use std::io::Read;
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value after `<name>:` on a line of CLI output (case-insensitive name).
fn field(out: &str, name: &str) -> String {
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim().to_ascii_lowercase() == name).then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {name:?} in garage output:\n{out}"))
}
