//! Running the real `tvix-build-vm` binary against a fresh embedded store and runtime
//! directory, and checking that nothing is left behind.
//!
//! The guest kernel and agent are located as the service locates them (see [`super::kernel`]);
//! `scripts/test.sh` sets them. Without them these tests fail, loudly, with instructions.

use super::{agent, assert_clean, assert_clean_except, kernel, BUSYBOX};
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// `tvix-build-vm` with no guest kernel or agent of its own: for what needs neither (a
/// castore-only `serve`, `store`).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"));
    c.env_remove("TVIX_BUILD_VM_KERNEL")
        .env_remove("TVIX_BUILD_VM_AGENT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

/// Writes `files` (`(path, contents)`, paths under `dir`, `sub/` allowed) and imports `dir`
/// into `store`; the root node's JSON.
pub fn import_tree(store: &Path, dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir.join("sub")).expect("creating the tree");
    for (name, contents) in files {
        std::fs::write(dir.join(name), contents).expect("writing the tree");
    }
    let dir = dir.to_str().expect("a UTF-8 path");
    ok_stdout(store_run(store, &["import", dir]))
        .trim()
        .to_owned()
}

/// Two trees imported into `store` (written under `tmp`), three blobs each, one shared:
/// the one a test keeps, and the one it expects to go.
pub fn kept_and_gone(store: &Path, tmp: &Path) -> (String, String) {
    let kept = import_tree(
        store,
        &tmp.join("kept"),
        &[("a", "kept a"), ("sub/b", "kept b"), ("shared", "both")],
    );
    let gone = import_tree(
        store,
        &tmp.join("gone"),
        &[("a", "gone a"), ("sub/b", "gone b"), ("shared", "both")],
    );
    (kept, gone)
}

/// The blob digests (hex) a node's closure names, by `store ls` (digests printed as b3:).
pub fn closure_blobs(store: &Path, node_json: &str) -> std::collections::BTreeSet<String> {
    ok_stdout(store_run(store, &["ls", node_json]))
        .lines()
        .filter(|l| l.starts_with("f ") || l.starts_with("x "))
        .map(|l| {
            let digest: tvix_build_vm::castore::B3Digest = l
                .split(' ')
                .nth(2)
                .and_then(|d| d.parse().ok())
                .expect("a digest in store ls's third column");
            digest.to_hex()
        })
        .collect()
}

/// `tvix-build-vm store --store <store> <args>`, run to completion.
pub fn store_run(store: &Path, args: &[&str]) -> Output {
    bin()
        .args(["store", "--store"])
        .arg(store)
        .args(args)
        .output()
        .expect("running tvix-build-vm store")
}

/// The stdout of a command that must have succeeded (its stderr in the panic otherwise).
pub fn ok_stdout(o: Output) -> String {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("stdout is UTF-8")
}

/// The blob files of an embedded store on disk (their names: 64 hex digits), read straight
/// from `<store>/blobs/`, independently of the store's code.
pub fn blob_files(store: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for shard in std::fs::read_dir(store.join("blobs")).expect("blobs/") {
        let shard = shard.expect("a shard");
        if shard.file_name() == "tmp" {
            continue;
        }
        for f in std::fs::read_dir(shard.path()).expect("a shard directory") {
            let name = f.expect("a blob").file_name();
            out.insert(name.into_string().expect("a hex name"));
        }
    }
    out
}

/// One test's store and runtime directory.
pub struct Env {
    pub store: tempfile::TempDir,
    pub runtime: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Self {
        assert!(
            Path::new(BUSYBOX).is_file(),
            "{BUSYBOX} is missing: apt-get install busybox-static"
        );
        // Socket paths must stay short (108 bytes), so the runtime root lives in /tmp.
        let runtime = tempfile::Builder::new()
            .prefix("tbv-rt-")
            .tempdir_in("/tmp")
            .expect("runtime dir");
        Self {
            store: tempfile::tempdir().expect("store dir"),
            runtime,
        }
    }

    /// `tvix-build-vm` with the guest kernel and agent and this test's runtime directory.
    pub fn command(&self) -> Command {
        let mut c = bin();
        c.env("TVIX_BUILD_VM_KERNEL", kernel())
            .env("TVIX_BUILD_VM_AGENT", agent())
            .env("TVIX_BUILD_VM_RUNTIME_DIR", self.runtime.path());
        c
    }

    /// `tvix-build-vm build --store <store> <args>`.
    pub fn build_command(&self, store: &Path, args: &[&str]) -> Command {
        let mut c = self.command();
        c.arg("build").arg("--store").arg(store).args(args);
        c
    }

    /// `tvix-build-vm build --store <this test's store> <args>`, with logs at the level `-v`
    /// gives.
    pub fn build(&self, args: &[&str]) -> Run {
        let out = self
            .build_command(self.store.path(), args)
            .output()
            .expect("running tvix-build-vm build");
        Run::of(out)
    }

    pub fn store_import(&self, path: &Path) -> serde_json::Value {
        let out = self
            .command()
            .args(["store", "import", "--store"])
            .arg(self.store.path())
            .arg(path)
            .output()
            .expect("running store import");
        assert!(
            out.status.success(),
            "store import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("store import prints JSON")
    }

    /// Asserts that no build left a runtime directory or a process behind.
    pub fn assert_clean(&self) {
        assert_clean(self.runtime.path());
    }

    /// Like [`Env::assert_clean`], but a running service's own runtime directory
    /// (`svc-<pid>`, which holds its castore socket) is allowed.
    pub fn assert_clean_except_service(&self) {
        assert_clean_except(self.runtime.path(), |l| {
            l.contains("/svc-") || l.contains("tvix-build-vm serve")
        });
    }
}

/// The result of one CLI run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The result of a finished `tvix-build-vm` process.
    pub fn of(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The printed Build, asserting success.
    pub fn build_json(&self) -> serde_json::Value {
        assert_eq!(self.code, Some(0), "build failed:\n{}", self.stderr);
        serde_json::from_str(self.stdout.trim()).expect("stdout is a Build in JSON")
    }

    pub fn assert_failed(&self, code: i32, needle: &str) {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}; stderr:\n{}",
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "expected {needle:?} in stderr:\n{}",
            self.stderr
        );
    }
}
