//! The one support tree of the integration tests. Include with `mod support;`.
//!
//! - This module: the guest kernel and agents (located by the library's own
//!   [`tvix_build_vm::vm::artifacts`] rules), busybox, static guest tools built from C, the
//!   processes of a test (parent-death signal, which processes name a directory) and the
//!   clean-up check every VM test ends with.
//! - [`vm`]: booting VMs through the library's backends: VM slots, busybox initramfs files,
//!   a ready [`vm::TestVm`].
//! - [`cli`]: the real `tvix-build-vm` binary against a fresh store and runtime directory
//!   ([`cli::Env`]), one `build` run ([`cli::Run`]).
//! - [`serve`]: a real `serve` process ([`serve::Serve`]) and the requests tests send it.
//! - [`snix`]: what snix callers send (`snix.build.v1` requests, `BuildPaths` with one).
//! - [`hostile`]: what the adversarial tests measure around one `build` (cost, files written
//!   outside the store, the castore before and after).
//! - [`provenance`]: an independent DSSE verifier (Python's `cryptography`) and NAR hashes
//!   by `nix-store --dump`.
//! - [`tls`]: a throwaway CA for mutual-TLS tests ([`tls::TestCa`]).
//! - [`tokens`]: bearer tokens: a tokens file, requests that carry one.
//! - [`nix_chroot`]: a real Nix in the chroot `scripts/nix-chroot.sh` builds, with our
//!   binary as its `external-builders` program.
//! - [`garage`]: a 3-node Garage cluster (S3-compatible object store) for the fleet tests.
//! - [`bucket`]: whether a bucket in snix's layout is whole (nothing a killed writer left
//!   half there is visible).
//! - `ch_fake/`: the fake cloud-hypervisor, included by path by the one test that uses it.
//!
//! Every helper panics with a message naming the missing prerequisite and how to get it: a
//! test that cannot run must fail, never pass without having tested anything.
#![allow(
    dead_code,
    reason = "each test crate uses a different subset of the helpers"
)]

pub mod bucket;
pub mod cli;
pub mod garage;
pub mod hostile;
pub mod nix_chroot;
pub mod provenance;
pub mod serve;
pub mod snix;
pub mod tls;
pub mod tokens;
pub mod vm;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tvix_build_vm::vm::artifacts;

/// The static busybox every guest test uses (Debian's busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// How the tests get their guest kernel and agent when they are not set.
const HOW_TO_GET_ARTIFACTS: &str = "run the tests through scripts/test.sh, or \
    `eval \"$(scripts/install-deps.sh --print-env)\"` first";

/// Where test helpers cache what they build (initramfs files, static guest tools).
pub fn cache_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tvix-build-vm-tests");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The guest kernel's vmlinux, found as the service finds it
/// ([`artifacts::locate_kernel`]: `TVIX_BUILD_VM_KERNEL`, else the newest cached build).
pub fn kernel() -> PathBuf {
    artifacts::locate_kernel(None).unwrap_or_else(|e| {
        panic!(
            "VM tests need the guest kernel: {}; {HOW_TO_GET_ARTIFACTS}",
            error_chain(&e)
        )
    })
}

/// The guest agent, found as the service finds it ([`artifacts::locate_agent`]).
pub fn agent() -> PathBuf {
    artifacts::locate_agent(None).unwrap_or_else(|e| {
        panic!(
            "VM tests need the guest agent: {}; {HOW_TO_GET_ARTIFACTS}",
            error_chain(&e)
        )
    })
}

/// The hostile test agent (`TVIX_BUILD_VM_HOSTILE_AGENT`, from
/// scripts/build-hostile-agent.sh), checked like the real agent.
pub fn hostile_agent() -> PathBuf {
    const VAR: &str = "TVIX_BUILD_VM_HOSTILE_AGENT";
    let Some(path) = std::env::var_os(VAR).filter(|v| !v.is_empty()) else {
        panic!(
            "{VAR} is unset: the adversarial tests need the hostile agent; {HOW_TO_GET_ARTIFACTS}"
        );
    };
    artifacts::locate_agent(Some(Path::new(&path)))
        .unwrap_or_else(|e| panic!("{VAR}: {}; {HOW_TO_GET_ARTIFACTS}", error_chain(&e)))
}

/// A static busybox (`$BUSYBOX`, else [`BUSYBOX`]).
pub fn busybox() -> PathBuf {
    let path = std::env::var_os("BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BUSYBOX));
    artifacts::check_static_executable(&path).unwrap_or_else(|e| {
        panic!("VM tests need a static busybox (Debian: apt-get install busybox-static, or set BUSYBOX): {e}")
    });
    path
}

/// A static guest program built from `tests/<source>` (a C file) with `cc -static`, cached by
/// its source's hash. The file is named `name`, so that it appears under that name in the
/// guest (`/nix/store/<name>` when given as an input).
pub fn static_tool(source: &str, name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(source);
    let text =
        std::fs::read(&source).unwrap_or_else(|e| panic!("reading {}: {e}", source.display()));
    let dir = cache_dir()
        .join("tools")
        .join(&blake3::hash(&text).to_hex()[..16]);
    let out = dir.join(name);
    if out.is_file() {
        return out;
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&tmp)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("running cc for {}: {e}", source.display()));
    assert!(
        status.success(),
        "cc -static {} failed ({status}): needs a C compiler and static libc (Debian: libc6-dev)",
        source.display()
    );
    std::fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("placing {}: {e}", out.display()));
    out
}

/// An error and all its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The process started from `cmd` gets `signal` when the test process dies (a harness
/// timeout, a panic that aborts): nothing a test starts may outlive it. The library's own
/// helpers (QEMU, fs-daemons) die with the service the same way.
pub fn die_with_parent(cmd: &mut Command, signal: nix::sys::signal::Signal) {
    let signal = signal as libc::c_ulong;
    // SAFETY: the closure runs between fork and exec and only makes the prctl syscall, which
    // is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether a process still exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A process's command line, arguments separated by spaces (empty if it is gone).
pub fn command_line(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

/// Pids of the processes whose command line contains `needle`.
pub fn processes_naming(needle: &str) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| command_line(*pid).contains(needle))
        .collect()
}

/// What a run left behind in or around `runtime_dir`: its entries, and every process whose
/// command line names it (a VM's QEMU and helpers all do).
pub fn leftovers(runtime_dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(runtime_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("runtime dir entry {}", e.path().display()))
        .collect();
    for pid in processes_naming(&runtime_dir.to_string_lossy()) {
        found.push(format!("process {pid}: {}", command_line(pid)));
    }
    found
}

/// Asserts that nothing but what `allowed` accepts is left in or around `runtime_dir` (see
/// [`leftovers`]), giving killed processes up to 5 s to be reaped by their parents.
pub fn assert_clean_except(runtime_dir: &Path, allowed: impl Fn(&str) -> bool) {
    let others = || -> Vec<String> {
        leftovers(runtime_dir)
            .into_iter()
            .filter(|l| !allowed(l))
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

/// Asserts that `runtime_dir` is empty and no process names it (see
/// [`assert_clean_except`]).
pub fn assert_clean(runtime_dir: &Path) {
    assert_clean_except(runtime_dir, |_| false);
}

/// Non-repeating bytes from a seed, so FastCDC cuts a large blob into several chunks.
pub fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}
