//! Helpers for integration tests that boot real VMs. Include with `mod support;`.
//!
//! - [`kernel`]: the guest kernel (`TVIX_BUILD_VM_KERNEL`, else `kernel-config/build.sh`,
//!   which is cached and prints its directory).
//! - [`busybox_initrd`]: an initramfs with a shell script as `/init` and a static busybox.
//! - [`vm_slot`]: a machine-wide limit of [`MAX_VMS`] test VMs at once (file locks, so it holds
//!   across test processes, nextest included, and across checkouts).
//! - [`vsock_client`]: a static guest program that talks to the host over vsock.
//! - [`TestVm`]: a runtime directory and a ready [`LaunchConfig`] for one VM.
//!
//! Every helper panics with a message naming the missing prerequisite and how to get it: a
//! VM test that cannot run must fail, never pass without having tested anything.
#![allow(
    dead_code,
    reason = "each test crate uses a different subset of the helpers"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use tvix_build_vm::vm::initrd::Initrd;
use tvix_build_vm::vm::qemu::{QemuBackend, QemuConfig};
use tvix_build_vm::vm::{Accel, LaunchConfig};

/// How many test VMs may run at once on this machine.
pub const MAX_VMS: usize = 2;

/// Where test helpers cache what they build (initramfs files, the vsock client).
pub fn cache_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tvix-build-vm-tests");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The guest kernel's vmlinux.
pub fn kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("TVIX_BUILD_VM_KERNEL").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "TVIX_BUILD_VM_KERNEL={} is not a file",
            path.display()
        );
        return path;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-config/build.sh");
    let out = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): the guest kernel is needed for VM tests; set TVIX_BUILD_VM_KERNEL or fix the build",
        script.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    let vmlinux = Path::new(dir).join("vmlinux");
    assert!(
        vmlinux.is_file(),
        "{} printed {dir:?}, which has no vmlinux",
        script.display()
    );
    vmlinux
}

/// A static busybox (`$BUSYBOX`, else Debian's busybox-static at /bin/busybox).
pub fn busybox() -> PathBuf {
    let path = std::env::var_os("BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    tvix_build_vm::vm::artifacts::check_static_executable(&path).unwrap_or_else(|e| {
        panic!("VM tests need a static busybox (Debian: apt-get install busybox-static, or set BUSYBOX): {e}")
    });
    path
}

/// An initramfs whose `/init` is `script` run by busybox's shell, with busybox at
/// `/bin/busybox` plus `extra` files (archive path, host file, mode). Cached by content.
/// The script should end with `busybox poweroff -f`.
pub fn busybox_initrd_with(script: &str, extra: &[(&str, &Path, u32)]) -> PathBuf {
    let mut initrd = Initrd::base();
    let init = format!("#!/bin/busybox sh\n{script}\n");
    initrd
        .add_bytes("/init", init.into_bytes(), 0o755)
        .and_then(|i| i.add_file_from("/bin/busybox", &busybox(), 0o755))
        .expect("building the busybox initramfs");
    for (path, source, mode) in extra {
        initrd
            .add_file_from(path, source, *mode)
            .unwrap_or_else(|e| panic!("adding {path} to the initramfs: {e}"));
    }
    initrd
        .write_cached(&cache_dir())
        .unwrap_or_else(|e| panic!("writing the initramfs: {e}"))
}

/// [`busybox_initrd_with`] without extra files.
pub fn busybox_initrd(script: &str) -> PathBuf {
    busybox_initrd_with(script, &[])
}

/// A static guest program: `vsock-client PORT MESSAGE` connects to the host on PORT, sends
/// MESSAGE and a newline, and prints `vsock-client: reply: <reply>`. Built with the C compiler
/// rustc already needs (`cc -static`), cached by source.
pub fn vsock_client() -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/vsock_client.c");
    let text =
        std::fs::read(&source).unwrap_or_else(|e| panic!("reading {}: {e}", source.display()));
    let out = cache_dir().join(format!(
        "vsock-client-{}",
        &blake3::hash(&text).to_hex()[..16]
    ));
    if out.is_file() {
        return out;
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let status = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&tmp)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("running cc for the guest vsock client: {e}"));
    assert!(
        status.success(),
        "cc -static failed ({status}): the vsock test needs a C compiler and static libc (Debian: libc6-dev)"
    );
    std::fs::rename(&tmp, &out).expect("placing the vsock client");
    out
}

/// A held test-VM slot; dropping it frees the slot.
pub struct VmSlot {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Takes one of [`MAX_VMS`] machine-wide slots, waiting if all are taken. Hold it for as long
/// as the test's VM runs.
pub fn vm_slot() -> VmSlot {
    use nix::fcntl::{Flock, FlockArg};
    let dir = std::env::temp_dir().join("tvix-build-vm-test-vm-slots");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let open = |i: usize| {
        let path = dir.join(format!("slot-{i}.lock"));
        std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
    };
    // Poll rather than block on one slot: a blocked waiter would ignore the other slot
    // becoming free.
    loop {
        for i in 0..MAX_VMS {
            match Flock::lock(open(i), FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return VmSlot { _lock: lock },
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
                Err((_, e)) => panic!("locking VM slot {i}: {e}"),
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// The QEMU backend with programs found on PATH (and ~/.cargo/bin for vhost-device-vsock).
pub fn qemu() -> QemuBackend {
    QemuBackend::new(&QemuConfig::default()).unwrap_or_else(|e| {
        panic!(
            "VM tests need QEMU and vhost-device-vsock: {}",
            error_chain(&e)
        )
    })
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

/// One test VM's runtime directory (removed on drop) and a config ready to adjust.
pub struct TestVm {
    /// The runtime directory.
    pub dir: tempfile::TempDir,
    /// Launch settings: TCG, 256 MiB, 1 vCPU, no devices; serial log in the runtime dir.
    pub config: LaunchConfig,
}

impl TestVm {
    /// A VM booting `initrd` with the test kernel.
    pub fn new(initrd: PathBuf) -> Self {
        // Short paths: unix socket paths inside must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("tbvm-")
            .tempdir_in("/tmp")
            .expect("creating a runtime dir");
        let config = LaunchConfig {
            kernel: kernel(),
            initrd,
            cmdline: vec![],
            memory_mib: 256,
            vcpus: 1,
            shares: vec![],
            vsock: None,
            scratch_disk: None,
            serial_log: dir.path().join("serial.log"),
            nested_virt: false,
            network: false,
            runtime_dir: dir.path().to_owned(),
            accel: Accel::Tcg,
        };
        TestVm { dir, config }
    }

    /// The runtime directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Whether a process still exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
