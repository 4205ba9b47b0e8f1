//! Running the real `tvix-build-vm` binary against a fresh embedded store and runtime
//! directory, and checking that nothing is left behind.
//!
//! The guest kernel and agent come from `TVIX_BUILD_VM_KERNEL` and `TVIX_BUILD_VM_AGENT`,
//! which `scripts/test.sh` sets; without them these tests fail, loudly, with instructions.

#![allow(dead_code)]

pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const BUSYBOX: &str = "/bin/busybox";

pub fn artefact(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
        other => panic!(
            "{var} is {other:?}, not a file: run the tests through scripts/test.sh, or \
             `eval \"$(scripts/install-deps.sh --print-env)\"` first"
        ),
    }
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

    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"));
        c.env("TVIX_BUILD_VM_KERNEL", artefact("TVIX_BUILD_VM_KERNEL"))
            .env("TVIX_BUILD_VM_AGENT", artefact("TVIX_BUILD_VM_AGENT"))
            .env("TVIX_BUILD_VM_RUNTIME_DIR", self.runtime.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        c
    }

    /// `tvix-build-vm build --store <store> <args>`, with logs at the level `-v` gives.
    pub fn build(&self, args: &[&str]) -> Run {
        let mut c = self.command();
        c.arg("build")
            .arg("--store")
            .arg(self.store.path())
            .args(args);
        Run::of(c.output().expect("running tvix-build-vm build"))
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
        // Give killed processes a moment to be reaped by their parent.
        for _ in 0..50 {
            if self.leftovers().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("left behind: {:?}", self.leftovers());
    }

    /// Like [`Env::assert_clean`], but a running service's own runtime directory
    /// (`svc-<pid>`, which holds its castore socket) is allowed.
    pub fn assert_clean_except_service(&self) {
        let others = || -> Vec<String> {
            self.leftovers()
                .into_iter()
                .filter(|l| !l.contains("/svc-") && !l.contains("tvix-build-vm serve"))
                .collect()
        };
        for _ in 0..50 {
            if others().is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("left behind: {:?}", others());
    }

    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.runtime.path()) {
            for e in entries.flatten() {
                found.push(format!("runtime dir entry {}", e.path().display()));
            }
        }
        let needle = self.runtime.path().to_string_lossy().into_owned();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                    continue;
                };
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&needle) {
                    found.push(format!(
                        "process {}: {cmdline}",
                        p.file_name().to_string_lossy()
                    ));
                }
            }
        }
        found
    }
}

/// The result of one CLI run.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn of(out: Output) -> Self {
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
