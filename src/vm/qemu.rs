//! The QEMU backend: a `microvm` machine with the PVH kernel loaded directly, shared memfd
//! memory (vhost-user needs it), one `vhost-user-fs-device` per share, a
//! `vhost-user-vsock-device` served by `vhost-device-vsock`, the serial console on QEMU's
//! stdout (pumped into the bounded serial log), and QEMU's own seccomp sandbox.
//!
//! Options measured under QEMU 7.2 TCG on this project's machines: `x-option-roms=off` skips
//! loading option ROMs nobody uses with a PVH kernel (boots 0.75-0.8 s instead of 0.75-1.0 s);
//! `rtc=off` made boots 3.6 s (the kernel then waits for a clock), and `acpi=off` left the
//! guest unable to power off, so both stay on.
//!
//! Under TCG the translation buffer is capped at [`DEFAULT_TCG_TB_MIB`] instead of QEMU 7.2's
//! 1 GiB. QEMU fills that buffer with translated guest code and never gives pages back
//! before it exits, so it is most of QEMU's anonymous memory: 30 MiB for a trivial build
//! (boot, agent, busybox), 140-170 MiB for one `cc1 -O2` compile, 270 MiB for cc1 + cc1plus +
//! as, and up to the whole buffer for a long build or for a hostile guest that keeps
//! generating code. 256 MiB bounds that per VM at a quarter of QEMU's default; none of
//! those workloads filled it, so none ran slower. Smaller buffers are flushed and retranslated
//! when full: the trivial build stays as fast down to 16 MiB (-16 MiB of RSS), but one
//! `cc1 -O2` compile took 1.1x the CPU at 128 MiB, 1.4x at 64, 1.8x at 32 and 3.3x the wall
//! time at 16 (measured on this project's 2-core machine, QEMU 7.2, several builds per
//! option, interleaved). Operators can pick their own point with `--tcg-tb-size`.
//! `MALLOC_ARENA_MAX=1` in QEMU's environment changed nothing measurable (45.4 vs 45.6 MiB
//! anonymous), so QEMU keeps glibc's default arenas.

use super::accel::Accel;
use super::cmdline;
use super::cpuinfo::CpuInfo;
use super::process::{ProcessGroup, Stdout};
use super::program;
use super::vsock::VhostDeviceVsock;
use super::{logsink, LaunchError, LaunchSpec, RunningVm, VmmBackend, LOG_TAIL_BYTES};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// The QEMU program looked up on `PATH` unless named.
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// Name of the vhost-user socket between QEMU and `vhost-device-vsock`, in the runtime dir.
pub const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";

/// How long `vhost-device-vsock` may take to create its socket.
const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The serial log's cap: a guest cannot fill the host's disk through its console.
pub const SERIAL_LOG_CAP: u64 = logsink::DEFAULT_CAP_BYTES;

/// The TCG translation buffer (`-accel tcg,tb-size=`) when none is configured, in MiB. See
/// the module documentation for the measurements behind it.
pub const DEFAULT_TCG_TB_MIB: u32 = 256;

/// The largest translation buffer accepted, in MiB: QEMU's own default is 1 GiB, and more
/// than this is a typo, not a tuning.
pub const MAX_TCG_TB_MIB: u32 = 4096;

/// Errors setting up the QEMU backend.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU was not found.
    #[error("{QEMU_PROGRAM} not found {where_}: install it (Debian: `apt-get install qemu-system-x86`) or name it explicitly")]
    QemuMissing {
        /// Where it was looked for.
        where_: String,
    },
    /// `vhost-device-vsock` was not found.
    #[error("vsock helper")]
    Vsock(#[source] super::vsock::VsockError),
    /// The host CPU description could not be read.
    #[error("host CPU")]
    CpuInfo(#[source] super::cpuinfo::CpuInfoError),
    /// The TCG translation buffer size is not a whole number of MiB within range.
    #[error("TCG translation buffer of {bytes} bytes: must be a whole number of MiB from 1 MiB to {MAX_TCG_TB_MIB} MiB")]
    TcgTbSize {
        /// The size asked for, in bytes.
        bytes: u64,
    },
}

/// Where the backend's programs are; `None` means "search".
#[derive(Debug, Clone, Default)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub qemu: Option<PathBuf>,
    /// `vhost-device-vsock`.
    pub vhost_device_vsock: Option<PathBuf>,
    /// The TCG translation buffer in bytes (a whole number of MiB); `None` means
    /// [`DEFAULT_TCG_TB_MIB`]. Unused under KVM, which translates nothing.
    pub tcg_tb_bytes: Option<u64>,
}

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    qemu: PathBuf,
    vsock_helper: VhostDeviceVsock,
    cpu: CpuInfo,
    tcg_tb_mib: u32,
}

impl QemuBackend {
    /// Finds the programs and reads the host CPU description once.
    pub fn new(config: &QemuConfig) -> Result<Self, QemuError> {
        let tcg_tb_mib = tcg_tb_mib(config.tcg_tb_bytes)?;
        let qemu = program::locate(config.qemu.as_deref(), QEMU_PROGRAM, &[])
            .map_err(|where_| QemuError::QemuMissing { where_ })?;
        let vsock_helper = VhostDeviceVsock::locate(config.vhost_device_vsock.as_deref())
            .map_err(QemuError::Vsock)?;
        let cpu = CpuInfo::read().map_err(QemuError::CpuInfo)?;
        Ok(QemuBackend {
            qemu,
            vsock_helper,
            cpu,
            tcg_tb_mib,
        })
    }

    /// The QEMU program.
    pub fn program(&self) -> &Path {
        &self.qemu
    }
}

#[async_trait::async_trait]
impl VmmBackend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(
        &self,
        spec: &LaunchSpec,
        mut group: ProcessGroup,
    ) -> Result<RunningVm, LaunchError> {
        let started = Instant::now();
        let config = spec.config();
        let base = cmdline::base(config.accel, &self.cpu);
        let append = cmdline::render(&base, &config.cmdline).map_err(LaunchError::Cmdline)?;

        let vhost_vsock = match &config.vsock {
            Some(vsock) => {
                let socket = config.runtime_dir.join(VHOST_VSOCK_SOCKET);
                let command = self
                    .vsock_helper
                    .command(vsock.guest_cid, &socket, &vsock.uds_path);
                let id = group
                    .spawn("vhost-vsock", command, Stdout::Log)
                    .map_err(LaunchError::Process)?;
                wait_for_socket(&mut group, id, "vhost-device-vsock", &socket).await?;
                Some(socket)
            }
            None => None,
        };

        let args = qemu_args(spec, &append, vhost_vsock.as_deref(), self.tcg_tb_mib);
        let mut command = tokio::process::Command::new(&self.qemu);
        command.args(&args);
        let serial = Stdout::File {
            path: config.serial_log.clone(),
            cap: SERIAL_LOG_CAP,
        };
        let vmm = match group.spawn("qemu", command, serial) {
            Ok(id) => id,
            Err(e) => {
                group.kill_and_reap().await;
                return Err(LaunchError::Process(e));
            }
        };
        tracing::debug!(pids = ?group.pids(), "qemu started");
        Ok(RunningVm::new(
            group,
            vmm,
            config.serial_log.clone(),
            started,
        ))
    }
}

/// Checks a configured translation buffer size and converts it to MiB (QEMU's unit).
fn tcg_tb_mib(bytes: Option<u64>) -> Result<u32, QemuError> {
    const MIB: u64 = 1 << 20;
    let Some(bytes) = bytes else {
        return Ok(DEFAULT_TCG_TB_MIB);
    };
    let mib = bytes / MIB;
    match u32::try_from(mib) {
        Ok(mib) if bytes % MIB == 0 && (1..=MAX_TCG_TB_MIB).contains(&mib) => Ok(mib),
        _ => Err(QemuError::TcgTbSize { bytes }),
    }
}

/// QEMU's `-accel` value: under TCG with the translation buffer size.
fn accel_option(accel: Accel, tcg_tb_mib: u32) -> String {
    match accel {
        Accel::Tcg => format!("{},tb-size={tcg_tb_mib}", accel.qemu_name()),
        Accel::Kvm => accel.qemu_name().to_owned(),
    }
}

/// Waits until `socket` exists, failing early if the helper exits; on failure the whole
/// group is killed.
async fn wait_for_socket(
    group: &mut ProcessGroup,
    id: super::process::MemberId,
    what: &str,
    socket: &Path,
) -> Result<(), LaunchError> {
    let deadline = Instant::now() + HELPER_READY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        if is_listening(socket) {
            return Ok(());
        }
        let exited = group.try_wait(id).ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            group.kill_and_reap().await;
            let log_tail = logsink::tail(&group.log_path(id), LOG_TAIL_BYTES);
            return Err(match exited {
                Some(status) => LaunchError::ExitedEarly {
                    what: what.to_owned(),
                    status: status.to_string(),
                    log_tail,
                },
                None => LaunchError::NotReady {
                    what: what.to_owned(),
                    waited: HELPER_READY_TIMEOUT,
                    log_tail,
                },
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Whether a unix socket is bound at `path` AND listening. The file appears at bind(), a
/// moment before listen(); QEMU connecting in between would be refused and fail at once,
/// and probing with a connection would use up the helper's only vhost-user accept. So this
/// reads the kernel's socket table: a listening socket has `__SO_ACCEPTCON` (0x10000) in
/// its flags column.
fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        // No procfs: fall back to the file's existence.
        return path.exists();
    };
    let Some(path) = path.to_str() else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        fields.len() == 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// QEMU's option syntax doubles a comma inside a value.
fn escape(value: &Path) -> String {
    // LaunchSpec guarantees UTF-8 paths.
    value.to_string_lossy().replace(',', ",,")
}

/// QEMU's command line for `spec`, with the kernel command line `append`, if vsock is on the
/// vhost-user socket of its helper, and under TCG a translation buffer of `tcg_tb_mib` MiB.
pub fn qemu_args(
    spec: &LaunchSpec,
    append: &str,
    vhost_vsock: Option<&Path>,
    tcg_tb_mib: u32,
) -> Vec<String> {
    let c = spec.config();
    let mem = c.memory_mib;
    let cpu = match (c.accel, c.nested_virt) {
        // qemu64 includes svm: it must be taken away, not merely not added.
        (Accel::Tcg, false) => "qemu64,-svm",
        (Accel::Tcg, true) => "qemu64,+svm",
        (Accel::Kvm, false) => "host,-vmx,-svm",
        (Accel::Kvm, true) => "host",
    };
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-accel".into(),
        accel_option(c.accel, tcg_tb_mib),
        "-M".into(),
        "microvm,x-option-roms=off,memory-backend=mem".into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        c.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-kernel".into(),
        escape(&c.kernel),
        "-initrd".into(),
        escape(&c.initrd),
        "-append".into(),
        append.into(),
        // The console goes to QEMU's stdout, which the host pumps into the bounded serial
        // log; stdin is /dev/null and signal=off keeps a stray ^C byte from meaning SIGINT.
        "-chardev".into(),
        "stdio,id=serial0,signal=off".into(),
        "-serial".into(),
        "chardev:serial0".into(),
    ];
    for (i, share) in c.shares.iter().enumerate() {
        args.extend([
            "-chardev".into(),
            format!("socket,id=fs{i},path={}", escape(&share.socket)),
            "-device".into(),
            format!(
                "vhost-user-fs-device,chardev=fs{i},tag={},queue-size=1024",
                share.tag
            ),
        ]);
    }
    if let Some(socket) = vhost_vsock {
        args.extend([
            "-chardev".into(),
            format!("socket,id=vsock0,path={}", escape(socket)),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock0".into(),
        ]);
    }
    if let Some(disk) = &c.scratch_disk {
        args.extend([
            "-drive".into(),
            // The image is single-use and discarded: flushes buy nothing.
            format!(
                "file={},if=none,id=scratch,format=raw,cache=unsafe,discard=unmap",
                escape(disk)
            ),
            "-device".into(),
            "virtio-blk-device,drive=scratch".into(),
        ]);
    }
    if c.network {
        args.extend([
            "-netdev".into(),
            "user,id=net0".into(),
            "-device".into(),
            "virtio-net-device,netdev=net0".into(),
        ]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{FsShare, HybridVsock, LaunchConfig};

    fn spec(dir: &Path, accel: Accel, nested: bool) -> LaunchSpec {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initrd,odd.cpio");
        let disk = dir.join("scratch.img");
        for f in [&kernel, &initrd, &disk] {
            std::fs::write(f, b"x").expect("write");
        }
        LaunchSpec::new(LaunchConfig {
            kernel,
            initrd,
            cmdline: vec![],
            memory_mib: 512,
            vcpus: 2,
            shares: vec![FsShare {
                tag: "inputs".into(),
                socket: dir.join("fs.sock"),
            }],
            vsock: Some(HybridVsock {
                guest_cid: 3,
                uds_path: dir.join("vsock.sock"),
            }),
            scratch_disk: Some(disk),
            serial_log: dir.join("serial.log"),
            nested_virt: nested,
            network: false,
            runtime_dir: dir.to_owned(),
            accel,
        })
        .expect("valid spec")
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec(dir.path(), Accel::Tcg, false);
        let vsu = dir.path().join("vhost-vsock.sock");
        let args = qemu_args(&spec, "console=ttyS0", Some(&vsu), 48);
        assert_eq!(after(&args, "-accel"), ["tcg,tb-size=48"]);
        assert_eq!(after(&args, "-cpu"), ["qemu64,-svm"]);
        assert_eq!(after(&args, "-m"), ["512M"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        assert_eq!(after(&args, "-append"), ["console=ttyS0"]);
        assert!(args.contains(&"-no-reboot".to_owned()));
        assert!(after(&args, "-object")[0].contains("size=512M,share=on"));
        // A comma inside a path is doubled, or QEMU would read the rest as options.
        assert_eq!(
            after(&args, "-initrd")[0],
            format!("{}/initrd,,odd.cpio", dir.path().display())
        );
        let devices = after(&args, "-device");
        assert!(devices
            .iter()
            .any(|d| d.starts_with("vhost-user-fs-device,chardev=fs0,tag=inputs")));
        assert!(devices.contains(&"vhost-user-vsock-device,chardev=vsock0"));
        assert!(devices.contains(&"virtio-blk-device,drive=scratch"));
        assert!(
            !devices.iter().any(|d| d.contains("net")),
            "no network unless asked"
        );
    }

    #[test]
    fn kvm_gets_no_translation_buffer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = qemu_args(&spec(dir.path(), Accel::Kvm, false), "", None, 64);
        assert_eq!(after(&args, "-accel"), ["kvm"]);
    }

    #[test]
    fn translation_buffer_size_is_checked() {
        const MIB: u64 = 1 << 20;
        assert_eq!(tcg_tb_mib(None).expect("default"), DEFAULT_TCG_TB_MIB);
        assert_eq!(tcg_tb_mib(Some(32 * MIB)).expect("32M"), 32);
        assert_eq!(
            tcg_tb_mib(Some(u64::from(MAX_TCG_TB_MIB) * MIB)).expect("max"),
            MAX_TCG_TB_MIB
        );
        for bad in [
            0,
            MIB - 1,
            MIB + 1,
            u64::from(MAX_TCG_TB_MIB + 1) * MIB,
            u64::MAX,
        ] {
            let err = tcg_tb_mib(Some(bad)).expect_err("out of range");
            assert!(
                matches!(err, QemuError::TcgTbSize { bytes } if bytes == bad),
                "{err}"
            );
        }
    }

    #[test]
    fn listening_is_told_apart_from_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        assert!(!is_listening(&path));
        let bound = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        assert!(
            path.exists() && !is_listening(&path),
            "a bound datagram socket is not listening"
        );
        drop(bound);
        std::fs::remove_file(&path).expect("rm");
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("listen");
        assert!(is_listening(&path));
    }

    #[test]
    fn nested_virtualization_cpu_models() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cpu = |accel, nested| {
            let args = qemu_args(&spec(dir.path(), accel, nested), "", None, 64);
            after(&args, "-cpu")[0].to_owned()
        };
        assert_eq!(cpu(Accel::Tcg, true), "qemu64,+svm");
        assert_eq!(cpu(Accel::Kvm, true), "host");
        assert_eq!(cpu(Accel::Kvm, false), "host,-vmx,-svm");
    }
}
