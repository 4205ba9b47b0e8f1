//! What the adversarial VM tests measure and check around one run of the real
//! `tvix-build-vm build` binary:
//!
//! - [`Cost`]: wall time; the CLI process's peak RSS (`VmHWM`, sampled from /proc every
//!   20 ms, and monotonic, so the last sample is the peak up to 20 ms before exit) and its
//!   largest number of open fds; the largest sum of RSS over the build's other host
//!   processes (QEMU and helpers: every process whose command line names the runtime dir);
//!   `wait4`'s `ru_maxrss` (the largest single process of the tree the CLI reaped).
//! - [`HostDirs`]: the CLI runs with its cwd, `TMPDIR`, `HOME` and `XDG_*` inside one fresh
//!   directory; afterwards nothing may exist there but the initrd cache. With
//!   [`super::cli::Env::assert_clean`] (runtime dir empty, no process left) this is "no file
//!   written outside the runtime dir and the store".
//! - [`Castore`]: a snapshot of the embedded store: blob digests, directory digests, files
//!   in `blobs/tmp`. [`Castore::verify`] re-hashes every blob and directory. A failed build
//!   must leave the directories exactly as before, `blobs/tmp` empty, and no blob beyond the
//!   ones the test names (the files a hostile guest completed before it broke the protocol:
//!   content-addressed and unreferenced, as the harvest's docs allow).

use super::cli::{Env, Run};
use super::{command_line, die_with_parent, hostile_agent, processes_naming};
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much of the CLI's stderr is kept from the start and from the end (a hostile build may
/// write gigabytes of log through it).
const KEEP_STDERR: usize = 256 * 1024;

/// A copy of the hostile agent that carries `scenario` as a trailer: for the scenarios that
/// act before the Job (which names every other scenario) arrives.
pub fn hostile_agent_with_trailer(dir: &Path, scenario: &str) -> PathBuf {
    let mut bytes = std::fs::read(hostile_agent()).expect("reading the hostile agent");
    bytes.extend_from_slice(format!("\nTVIX-HOSTILE-SCENARIO:{scenario}").as_bytes());
    let path = dir.join(format!("hostile-agent-{scenario}"));
    std::fs::write(&path, bytes).expect("writing the agent copy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// What one CLI run cost the host.
#[derive(Debug, Clone, Default)]
pub struct Cost {
    pub wall: Duration,
    /// Peak RSS of the `build` process itself, KiB.
    pub cli_peak_rss_kib: u64,
    /// Most fds the `build` process had open at once.
    pub cli_max_fds: u64,
    /// Largest sum of RSS over the VM's host processes (QEMU, helpers), KiB.
    pub vm_procs_peak_rss_kib: u64,
    /// `ru_maxrss` from `wait4`: the largest single process of the CLI's tree, KiB.
    pub tree_maxrss_kib: u64,
    /// Most host processes of the VM (those naming the runtime dir) seen at once.
    pub vm_procs_max: u64,
}

impl Cost {
    /// One line for the report.
    pub fn summary(&self) -> String {
        format!(
            "wall {:.1}s, CLI peak RSS {} MiB, CLI max fds {}, VM processes {} with peak RSS {} MiB, tree ru_maxrss {} MiB",
            self.wall.as_secs_f64(),
            self.cli_peak_rss_kib / 1024,
            self.cli_max_fds,
            self.vm_procs_max,
            self.vm_procs_peak_rss_kib / 1024,
            self.tree_maxrss_kib / 1024
        )
    }

    /// Asserts the run stayed within `wall` and `cli_rss_mib`, and the CLI's fds within
    /// `MAX_CLI_FDS`.
    pub fn assert_within(&self, wall: Duration, cli_rss_mib: u64) {
        eprintln!("cost: {}", self.summary());
        assert!(
            self.wall <= wall,
            "took {:?}, over {wall:?}: {}",
            self.wall,
            self.summary()
        );
        assert!(
            self.cli_peak_rss_kib > 0,
            "no RSS sample of the CLI was taken"
        );
        assert!(
            self.cli_peak_rss_kib <= cli_rss_mib * 1024,
            "CLI peak RSS over {cli_rss_mib} MiB: {}",
            self.summary()
        );
        assert!(
            self.cli_max_fds <= MAX_CLI_FDS,
            "CLI held more than {MAX_CLI_FDS} fds: {}",
            self.summary()
        );
        // The VM's host processes: the fs-daemon, vhost-device-vsock and QEMU; nothing a
        // guest does may add to them.
        assert!(
            self.vm_procs_max <= 3,
            "more host processes than the VM's three: {}",
            self.summary()
        );
    }

    /// Asserts that the VM's host processes together stayed under `mib` of RSS.
    pub fn assert_vm_rss_within(&self, mib: u64) {
        assert!(
            self.vm_procs_peak_rss_kib <= mib * 1024,
            "VM host processes over {mib} MiB: {}",
            self.summary()
        );
    }
}

/// Appends one line (scenario, exit code, cost) to the file `TVIX_BUILD_VM_HOSTILE_REPORT`
/// names, if any: the raw material of docs/hostile.md.
pub fn record(scenario: &str, run: &Run, cost: &Cost) {
    let Some(path) = std::env::var_os("TVIX_BUILD_VM_HOSTILE_REPORT") else {
        return;
    };
    use std::io::Write;
    let line = format!("{scenario}\texit {:?}\t{}\n", run.code, cost.summary());
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// A build CLI process keeps a few dozen fds (tokio, the store, sockets, pipes of its
/// children); a guest must not be able to push that up.
pub const MAX_CLI_FDS: u64 = 64;

/// The fresh directory the CLI runs in (cwd, TMPDIR, HOME, XDG dirs).
pub struct HostDirs {
    pub root: tempfile::TempDir,
}

impl Default for HostDirs {
    fn default() -> Self {
        Self::new()
    }
}

impl HostDirs {
    pub fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("tbv-host-")
            .tempdir()
            .expect("host dir");
        for d in ["cwd", "tmp", "home", "cache", "data", "config"] {
            std::fs::create_dir(root.path().join(d)).expect("mkdir");
        }
        Self { root }
    }

    /// Points `cmd` at the fresh directories.
    pub fn apply(&self, cmd: &mut Command) {
        let p = |d: &str| self.root.path().join(d);
        cmd.current_dir(p("cwd"))
            .env("TMPDIR", p("tmp"))
            .env("HOME", p("home"))
            .env("XDG_CACHE_HOME", p("cache"))
            .env("XDG_DATA_HOME", p("data"))
            .env("XDG_CONFIG_HOME", p("config"))
            .env_remove("TVIX_BUILD_VM_CACHE_DIR");
    }

    /// Asserts that nothing but the initrd cache was written.
    pub fn assert_untouched(&self) {
        let mut found = Vec::new();
        walk(self.root.path(), &mut |p| {
            let rel = p.strip_prefix(self.root.path()).unwrap_or(p);
            if !rel.starts_with("cache/tvix-build-vm") {
                found.push(rel.display().to_string());
            }
        });
        found.retain(|f| !["cwd", "tmp", "home", "cache", "data", "config"].contains(&f.as_str()));
        assert!(
            found.is_empty(),
            "files written outside the store: {found:?}"
        );
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        f(&p);
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&p, f);
        }
    }
}

/// Runs `cmd` (the `build` CLI of `env`), measuring it (see the module docs).
pub fn measured(env: &Env, mut cmd: Command) -> (Run, Cost) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    // If the test dies (a harness timeout), the CLI dies with it, and its VMs with it.
    die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGKILL);
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawning tvix-build-vm");
    let pid = child.id() as i32;
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || head_and_tail(&mut stderr));

    let stop = Arc::new(AtomicBool::new(false));
    let needle = env.runtime.path().to_string_lossy().into_owned();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut cost = Cost::default();
            while !stop.load(Ordering::SeqCst) {
                if let Some(hwm) = status_kib(pid, "VmHWM:") {
                    cost.cli_peak_rss_kib = cost.cli_peak_rss_kib.max(hwm);
                }
                if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    cost.cli_max_fds = cost.cli_max_fds.max(fds.count() as u64);
                }
                let procs = processes_naming(&needle);
                cost.vm_procs_max = cost.vm_procs_max.max(procs.len() as u64);
                let vm: u64 = procs
                    .into_iter()
                    .filter_map(|p| status_kib(p, "VmRSS:"))
                    .sum();
                cost.vm_procs_peak_rss_kib = cost.vm_procs_peak_rss_kib.max(vm);
                std::thread::sleep(Duration::from_millis(20));
            }
            cost
        })
    };

    // Wait for the exit without reaping, so the sampler never reads a recycled pid.
    // SAFETY: a zeroed siginfo_t is a valid out-parameter; `pid` is our unreaped child.
    let rc = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
    let wall = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut cost = sampler.join().expect("sampler");
    cost.wall = wall;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter; `pid` is our exited, unreaped child.
    let (reaped, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let r = libc::wait4(pid, &mut status, 0, &mut usage);
        (r, usage)
    };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    cost.tree_maxrss_kib = usage.ru_maxrss as u64;
    // Reaped above; std's handle must not wait again.
    std::mem::forget(child);
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    let stdout = out_reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    (
        Run {
            code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
        },
        cost,
    )
}

/// Reads `r` to its end, keeping its first and last [`KEEP_STDERR`] bytes.
fn head_and_tail(r: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut tail = std::collections::VecDeque::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n as u64;
        let mut data = &buf[..n];
        if head.len() < KEEP_STDERR {
            let take = data.len().min(KEEP_STDERR - head.len());
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        tail.extend(data.iter().copied());
        while tail.len() > KEEP_STDERR {
            tail.pop_front();
        }
    }
    let skipped = total - head.len() as u64 - tail.len() as u64;
    let mut s = String::from_utf8_lossy(&head).into_owned();
    if skipped > 0 {
        s.push_str(&format!("\n[... {skipped} bytes of stderr skipped ...]\n"));
    }
    let tail: Vec<u8> = tail.into_iter().collect();
    s.push_str(&String::from_utf8_lossy(&tail));
    s
}

fn status_kib(pid: i32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The pid of the build process (of `env`'s runtime dir) whose command line also names
/// `what`, waiting up to `within` for it to appear.
pub fn wait_for_process(env: &Env, what: &str, within: Duration) -> i32 {
    let needle = env.runtime.path().to_string_lossy().into_owned();
    let started = Instant::now();
    loop {
        for pid in processes_naming(&needle) {
            if command_line(pid).contains(what) {
                return pid;
            }
        }
        assert!(
            started.elapsed() < within,
            "no process naming {what:?} and {needle} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A snapshot of an embedded store (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Castore {
    /// Blob digests, lowercase hex.
    pub blobs: BTreeSet<String>,
    /// Directory digests, lowercase hex.
    pub directories: BTreeSet<String>,
    /// Names in `blobs/tmp`.
    pub tmp: BTreeSet<String>,
}

const DIRECTORIES: redb::TableDefinition<&[u8; 32], &[u8]> =
    redb::TableDefinition::new("directories");

impl Castore {
    /// Reads the store at `store` (which no process may have open) and re-hashes every blob
    /// and directory, panicking on any that does not match its digest.
    pub fn verify(store: &Path) -> Self {
        let mut snap = Castore::default();
        let blobs = store.join("blobs");
        if let Ok(shards) = std::fs::read_dir(&blobs) {
            for shard in shards.flatten() {
                let name = shard.file_name().to_string_lossy().into_owned();
                if name == "tmp" {
                    for t in std::fs::read_dir(shard.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        snap.tmp
                            .insert(t.file_name().to_string_lossy().into_owned());
                    }
                    continue;
                }
                for blob in std::fs::read_dir(shard.path()).expect("shard").flatten() {
                    let hex = blob.file_name().to_string_lossy().into_owned();
                    let data = std::fs::read(blob.path()).expect("blob");
                    let got = blake3::hash(&data).to_hex().to_string();
                    assert_eq!(got, hex, "blob {} does not match its digest", hex);
                    assert!(hex.starts_with(&name), "blob {hex} in shard {name}");
                    snap.blobs.insert(hex);
                }
            }
        }
        let db_path = store.join("directories.redb");
        if db_path.exists() {
            use redb::{ReadableDatabase, ReadableTable};
            let db = redb::Database::open(&db_path).expect("opening directories.redb");
            let txn = db.begin_read().expect("read txn");
            if let Ok(table) = txn.open_table(DIRECTORIES) {
                for row in table.iter().expect("iterating directories") {
                    let (k, v) = row.expect("row");
                    let key = k.value();
                    let got = blake3::hash(v.value());
                    assert_eq!(
                        got.as_bytes(),
                        key,
                        "directory entry does not match its digest"
                    );
                    snap.directories.insert(got.to_hex().to_string());
                }
            }
        }
        snap
    }

    /// Asserts that `self` (after a failed build) holds exactly what `before` held plus the
    /// blobs of `legit_blobs`, and no file in `blobs/tmp`.
    pub fn assert_nothing_partial(&self, before: &Castore, legit_blobs: &[&[u8]]) {
        assert_eq!(
            self.directories, before.directories,
            "directories changed by a failed build"
        );
        assert!(self.tmp.is_empty(), "blobs/tmp not empty: {:?}", self.tmp);
        let mut want = before.blobs.clone();
        for b in legit_blobs {
            want.insert(blake3::hash(b).to_hex().to_string());
        }
        assert_eq!(self.blobs, want, "unexpected blobs after a failed build");
    }
}

/// `16M`, `2G` and the like as bytes (powers of 1024), as the CLI parses sizes.
pub fn parse_size(s: &str) -> u64 {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'M') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("a size") * mult
}
