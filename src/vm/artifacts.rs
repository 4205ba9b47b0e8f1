//! Locating the guest kernel and the guest agent.
//!
//! Nothing is built at run time: building a kernel takes minutes and belongs to
//! `kernel-config/build.sh` (or Nix). The service takes explicit paths (command line flags,
//! or the environment variables below) and otherwise falls back to the places the project's
//! build scripts put things, failing with an error that says how to produce the missing piece.
//!
//! Kernel: `$TVIX_BUILD_VM_KERNEL`, else the newest complete `<cache>/kernel/<key>/vmlinux`
//! that `kernel-config/build.sh` produced, where `<cache>` is
//! `${TVIX_BUILD_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-build-vm}`.
//!
//! Agent: `$TVIX_BUILD_VM_AGENT`, else `tvix-build-vm-agent` next to the running executable,
//! else `<dir>/x86_64-unknown-linux-gnu/release/tvix-build-vm-agent` for the executable's
//! directory and its two parents (cargo's layout when the agent is built with `--target`).
//! The agent must be a static x86-64 ELF executable: it runs as `/init` in an initramfs that
//! has no dynamic loader.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Names the guest kernel (a PVH `vmlinux`).
pub const KERNEL_ENV: &str = "TVIX_BUILD_VM_KERNEL";
/// Names the guest agent binary.
pub const AGENT_ENV: &str = "TVIX_BUILD_VM_AGENT";
/// Overrides the cache directory.
pub const CACHE_ENV: &str = "TVIX_BUILD_VM_CACHE";
/// The agent's file name.
pub const AGENT_NAME: &str = "tvix-build-vm-agent";

const BUILD_KERNEL: &str = "run kernel-config/build.sh (it prints the directory holding \
    vmlinux), then pass --kernel or set TVIX_BUILD_VM_KERNEL";
const BUILD_AGENT: &str = "build it with `RUSTFLAGS='-C target-feature=+crt-static' cargo build \
    --release -p tvix-build-vm-agent --target x86_64-unknown-linux-gnu`, then pass --agent or set \
    TVIX_BUILD_VM_AGENT";

/// Errors locating an artifact.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// No kernel anywhere.
    #[error(
        "no guest kernel: {TVIX_BUILD_VM_KERNEL_UNSET} and none under {searched}; {BUILD_KERNEL}"
    )]
    NoKernel {
        /// The cache directory searched.
        searched: String,
    },
    /// No agent anywhere.
    #[error("no guest agent: {AGENT_ENV} is unset and none at {searched}; {BUILD_AGENT}")]
    NoAgent {
        /// The places searched.
        searched: String,
    },
    /// The named file cannot be read.
    #[error("{what} {path}")]
    Unreadable {
        /// Which artifact.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not an ELF file.
    #[error("guest kernel {path}: not an ELF vmlinux (a bzImage? QEMU's microvm here needs the PVH vmlinux); {BUILD_KERNEL}")]
    KernelNotElf {
        /// The path.
        path: PathBuf,
    },
    /// The agent is not a static x86-64 executable.
    #[error("guest agent {path}: {problem}; {BUILD_AGENT}")]
    AgentNotStatic {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
}

const TVIX_BUILD_VM_KERNEL_UNSET: &str = "TVIX_BUILD_VM_KERNEL is unset";

/// The cache directory (see the module docs), if any of its sources is set.
pub fn cache_dir() -> Option<PathBuf> {
    let from = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from(CACHE_ENV)
        .or_else(|| from("XDG_CACHE_HOME").map(|d| d.join("tvix-build-vm")))
        .or_else(|| from("HOME").map(|d| d.join(".cache/tvix-build-vm")))
}

/// The guest kernel: `explicit`, else `$TVIX_BUILD_VM_KERNEL`, else the newest cached build.
pub fn locate_kernel(explicit: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let env = std::env::var_os(KERNEL_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let path = match explicit.map(Path::to_owned).or(env) {
        Some(path) => path,
        None => {
            let cache = cache_dir().unwrap_or_default();
            newest_cached_kernel(&cache).ok_or_else(|| ArtifactError::NoKernel {
                searched: cache.join("kernel").display().to_string(),
            })?
        }
    };
    check_kernel(&path)?;
    Ok(path)
}

/// The newest `<cache>/kernel/<key>/vmlinux` whose directory is complete (build.sh renames
/// a finished directory into place; its temporary directories start with a dot).
pub fn newest_cached_kernel(cache: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(cache.join("kernel")).ok()?;
    entries
        .filter_map(Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .filter(|dir| dir.join("bzImage").is_file())
        .filter_map(|dir| {
            let vmlinux = dir.join("vmlinux");
            let mtime = vmlinux.metadata().ok()?.modified().ok()?;
            Some((mtime, vmlinux))
        })
        .max()
        .map(|(_, path)| path)
}

/// The guest agent: `explicit`, else `$TVIX_BUILD_VM_AGENT`, else next to the executable.
pub fn locate_agent(explicit: Option<&Path>) -> Result<PathBuf, ArtifactError> {
    let env = std::env::var_os(AGENT_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let path = match explicit.map(Path::to_owned).or(env) {
        Some(path) => path,
        None => {
            let exe_dir = std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(Path::to_owned))
                .unwrap_or_default();
            let candidates = agent_candidates(&exe_dir);
            candidates
                .iter()
                .find(|p| p.is_file())
                .cloned()
                .ok_or_else(|| ArtifactError::NoAgent {
                    searched: candidates
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?
        }
    };
    check_static_executable(&path)?;
    Ok(path)
}

/// Where to look for the agent relative to the running executable's directory.
pub fn agent_candidates(exe_dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![exe_dir.join(AGENT_NAME)];
    for dir in exe_dir.ancestors().take(3) {
        out.push(
            dir.join("x86_64-unknown-linux-gnu/release")
                .join(AGENT_NAME),
        );
    }
    out
}

fn read_head(what: &'static str, path: &Path, len: usize) -> Result<Vec<u8>, ArtifactError> {
    let unreadable = |source| ArtifactError::Unreadable {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut head = Vec::with_capacity(len);
    file.take(len as u64)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    Ok(head)
}

/// Checks that `path` starts like an ELF file.
pub fn check_kernel(path: &Path) -> Result<(), ArtifactError> {
    let head = read_head("guest kernel", path, 4)?;
    if head == b"\x7fELF" {
        Ok(())
    } else {
        Err(ArtifactError::KernelNotElf {
            path: path.to_owned(),
        })
    }
}

/// Checks that `path` is a 64-bit little-endian x86-64 ELF executable without a program
/// interpreter (`PT_INTERP`), i.e. one that runs with no dynamic loader present.
pub fn check_static_executable(path: &Path) -> Result<(), ArtifactError> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    // Program headers of real executables sit right after the 64-byte ELF header; 64 KiB is
    // far more than any needs.
    let head = read_head("guest agent", path, 64 << 10)?;
    let bad = |problem| ArtifactError::AgentNotStatic {
        path: path.to_owned(),
        problem,
    };
    let u16_at = |at: usize| {
        head.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        head.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if head.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    if !matches!(u16_at(16), Some(2 | 3)) {
        return Err(bad("not an ELF executable"));
    }
    if u16_at(18) != Some(EM_X86_64) {
        return Err(bad("not built for x86-64"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err(bad("truncated ELF header"));
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)
            .ok()
            .and_then(|off| off.checked_add(i * usize::from(phentsize)));
        match at.and_then(u32_at) {
            Some(PT_INTERP) => {
                return Err(bad("dynamically linked (it has a program interpreter)"))
            }
            Some(_) => {}
            None => return Err(bad("program headers out of reach")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_static_passes_and_a_dynamic_binary_fails() {
        // Debian's busybox-static is a static x86-64 executable; /bin/sh (dash) is dynamic.
        check_static_executable(Path::new("/bin/busybox")).expect("static busybox");
        let err = check_static_executable(Path::new("/bin/sh")).expect_err("dynamic");
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        assert!(
            err.to_string().contains("crt-static"),
            "says how to fix: {err}"
        );
    }

    #[test]
    fn non_elf_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("init");
        std::fs::write(&script, b"#!/bin/sh\n").expect("write");
        assert!(matches!(
            check_static_executable(&script),
            Err(ArtifactError::AgentNotStatic { .. })
        ));
        let bzimage = dir.path().join("bzImage");
        std::fs::write(&bzimage, b"MZ\0\0").expect("write");
        let err = check_kernel(&bzimage).expect_err("bzImage");
        assert!(err.to_string().contains("PVH vmlinux"), "{err}");
    }

    #[test]
    fn newest_complete_cached_kernel_wins() {
        let cache = tempfile::tempdir().expect("tempdir");
        let kernel = cache.path().join("kernel");
        assert_eq!(newest_cached_kernel(cache.path()), None);
        let make = |name: &str, complete: bool, age_secs: u64| {
            let dir = kernel.join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let vmlinux = dir.join("vmlinux");
            std::fs::write(&vmlinux, b"\x7fELF").expect("write");
            if complete {
                std::fs::write(dir.join("bzImage"), b"MZ").expect("write");
            }
            let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
            std::fs::File::options()
                .write(true)
                .open(&vmlinux)
                .and_then(|f| f.set_modified(when))
                .expect("mtime");
            vmlinux
        };
        make("old", true, 100);
        let newest = make("new", true, 10);
        make("incomplete", false, 1);
        make(".build-x", true, 0);
        assert_eq!(newest_cached_kernel(cache.path()), Some(newest));
    }

    #[test]
    fn agent_candidates_cover_cargo_target_layouts() {
        let c = agent_candidates(Path::new("/t/debug/deps"));
        assert!(c.contains(&PathBuf::from("/t/debug/deps/tvix-build-vm-agent")));
        assert!(c.contains(&PathBuf::from(
            "/t/x86_64-unknown-linux-gnu/release/tvix-build-vm-agent"
        )));
    }

    #[test]
    fn explicit_paths_are_checked() {
        let err = locate_agent(Some(Path::new("/nonexistent/agent"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/agent"), "{err}");
        let err = locate_kernel(Some(Path::new("/nonexistent/vmlinux"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
