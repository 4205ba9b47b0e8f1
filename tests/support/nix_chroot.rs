//! A real Nix (Debian sid's, 2.34+) in the chroot `scripts/nix-chroot.sh` builds, run with
//! our binary as its `external-builders` program.
//!
//! Each Nix command runs in a mount namespace of its own (`unshare -m`): proc, dev (with
//! dev/pts, without which Nix cannot open its pty), sys, this test's directory at `/tvb`
//! and our binary at `/tvb/tvix-build-vm` are mounted there and vanish with it, so
//! concurrent tests never unmount each other's mounts and nothing is left mounted in the
//! cached chroot. The chroot's store and Nix database are shared by every test run: each
//! test salts its derivations so that its store paths are new.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::serve::Serve;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where the test's directory appears inside the chroot.
pub const MOUNT: &str = "/tvb";

/// The chroot: `TVIX_BUILD_VM_NIX_CHROOT`, else what `scripts/nix-chroot.sh` prints (it
/// builds it on the first run, ~40 s, and caches it outside the checkout).
pub fn chroot() -> PathBuf {
    if let Some(dir) = std::env::var_os("TVIX_BUILD_VM_NIX_CHROOT") {
        return PathBuf::from(dir);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nix-chroot.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", script.display());
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// One test's Nix: the chroot, the test's directory (busybox as a store-path source, the
/// Nix expressions, the builder's state dir) and the options that make Nix use us.
pub struct NixChroot {
    pub root: PathBuf,
    pub dir: tempfile::TempDir,
    /// A random salt for this test's derivations.
    pub salt: String,
}

impl NixChroot {
    pub fn new() -> Self {
        let root = chroot();
        assert!(
            root.join("usr/bin/nix").exists(),
            "{}: no Nix in the chroot (scripts/nix-chroot.sh builds it)",
            root.display()
        );
        std::fs::create_dir_all(root.join(MOUNT.trim_start_matches('/'))).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("tbv-nix-")
            .tempdir_in("/tmp")
            .unwrap();
        // busybox, as a directory Nix copies into its store (`builtins.path`): the only
        // input the test derivations need.
        std::fs::create_dir_all(dir.path().join("bb/bin")).unwrap();
        std::fs::copy(root.join("bin/busybox"), dir.path().join("bb/bin/busybox")).unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::create_dir_all(dir.path().join("serve")).unwrap();
        std::fs::write(dir.path().join("tvix-build-vm"), b"").unwrap();
        let salt = uuid::Uuid::new_v4().simple().to_string();
        Self { root, dir, salt }
    }

    /// Writes a Nix file into the test's directory; its path inside the chroot.
    pub fn write(&self, name: &str, text: &str) -> String {
        std::fs::write(self.dir.path().join(name), text).unwrap();
        format!("{MOUNT}/{name}")
    }

    /// The `external-builders` value that runs our binary, sending builds to `serve`.
    pub fn external_builders(&self) -> String {
        serde_json::json!([{
            "systems": ["x86_64-linux"],
            "program": format!("{MOUNT}/tvix-build-vm"),
            "args": [
                "nix-builder",
                "--builder-addr", format!("grpc+unix://{MOUNT}/serve/s.sock"),
                "--state-dir", format!("{MOUNT}/state"),
            ],
        }])
        .to_string()
    }

    /// Runs `args` (a command inside the chroot) with `serve`'s directory at
    /// `/tvb/serve` (its socket is `/tvb/serve/s.sock`).
    pub fn run(&self, serve: Option<&Serve>, args: &[&str]) -> Output {
        let root = self.root.display().to_string();
        let mut script = format!(
            "set -e; R={root}; \
             mount -t proc proc $R/proc; mount --rbind /dev $R/dev; mount -t sysfs sys $R/sys; \
             mount --bind {dir} $R{MOUNT}; mount --bind {bin} $R{MOUNT}/tvix-build-vm; ",
            dir = self.dir.path().display(),
            bin = env!("CARGO_BIN_EXE_tvix-build-vm"),
        );
        if let Some(s) = serve {
            script.push_str(&format!(
                "mount --bind {} $R{MOUNT}/serve; ",
                s.dir.path().display()
            ));
        }
        script.push_str("exec chroot $R \"$@\"");
        let out = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ])
            .args(args)
            .env_remove("TVIX_BUILD_VM_KERNEL")
            .env_remove("TVIX_BUILD_VM_AGENT")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        out
    }

    /// `nix build -L --no-link --print-out-paths -f FILE ATTR --argstr salt …` through us:
    /// the result and the printed store paths.
    pub fn build(&self, serve: &Serve, file: &str, attr: &str, extra: &[&str]) -> NixRun {
        let eb = self.external_builders();
        let mut args = vec![
            "nix",
            "build",
            "-L",
            "--no-link",
            "--print-out-paths",
            "--option",
            "external-builders",
            &eb,
            "-f",
            file,
            "--argstr",
            "salt",
            &self.salt,
        ];
        args.extend_from_slice(extra);
        args.push(attr);
        NixRun(self.run(Some(serve), &args))
    }

    /// The same build with Nix's own builder (no external builder configured).
    pub fn build_natively(&self, file: &str, attr: &str) -> NixRun {
        let args = [
            "nix",
            "build",
            "-L",
            "--no-link",
            "--print-out-paths",
            "-f",
            file,
            "--argstr",
            "salt",
            &self.salt,
            attr,
        ];
        NixRun(self.run(None, &args))
    }

    /// A store path's host location.
    pub fn host_path(&self, store_path: &str) -> PathBuf {
        self.root.join(store_path.trim_start_matches('/'))
    }

    /// `nix path-info --json` of a store path: (narHash, deriver).
    pub fn path_info(&self, store_path: &str) -> serde_json::Value {
        let out = self.run(
            None,
            &[
                "nix",
                "path-info",
                "--json",
                "--json-format",
                "1",
                store_path,
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[store_path].clone()
    }

    /// Asserts that Nix registered `store_path` and that its contents still have the NAR
    /// hash Nix recorded (`nix-store --verify-path`).
    pub fn assert_verified(&self, store_path: &str) {
        let out = self.run(None, &["nix-store", "--verify-path", store_path]);
        assert!(
            out.status.success(),
            "verify-path {store_path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = self.path_info(store_path);
        assert!(
            info["narHash"].as_str().unwrap().starts_with("sha256-"),
            "{info}"
        );
        assert!(
            info["deriver"].as_str().unwrap().ends_with(".drv"),
            "{info}"
        );
    }

    /// The builder's per-build records (state dir's builds.jsonl), oldest first.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("state/builds.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Default for NixChroot {
    fn default() -> Self {
        Self::new()
    }
}

/// One `nix build`'s output.
pub struct NixRun(pub Output);

impl NixRun {
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// The printed store paths; panics with Nix's stderr if the build failed.
    pub fn paths(&self) -> Vec<String> {
        assert!(
            self.0.status.success(),
            "nix build failed:\n{}",
            self.stderr()
        );
        String::from_utf8(self.0.stdout.clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
