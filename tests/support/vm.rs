//! Booting test VMs through the library's backends (`src/vm`).
//!
//! - [`busybox_initrd`]: an initramfs with a shell script as `/init` and a static busybox.
//! - [`vm_slot`]: a machine-wide limit of [`MAX_VMS`] test VMs at once (file locks, so it holds
//!   across test processes, nextest included, and across checkouts).
//! - [`vsock_client`]: a static guest program that talks to the host over vsock.
//! - [`qemu`]: the QEMU backend; [`TestVm`]: a runtime directory and a ready [`LaunchConfig`]
//!   for one VM.

use super::{busybox, cache_dir, error_chain, kernel, static_tool};
use std::path::{Path, PathBuf};
use tvix_build_vm::vm::initrd::Initrd;
use tvix_build_vm::vm::qemu::{QemuBackend, QemuConfig};
use tvix_build_vm::vm::{Accel, LaunchConfig};

/// How many test VMs may run at once on this machine.
pub const MAX_VMS: usize = 2;

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
/// MESSAGE and a newline, and prints `vsock-client: reply: <reply>`.
pub fn vsock_client() -> PathBuf {
    static_tool("support/vsock_client.c", "vsock-client")
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
