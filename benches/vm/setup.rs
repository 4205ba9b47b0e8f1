//! What every section needs: the kernel, the agent's initrd, guest helper programs, peer
//! tools, the QEMU backend, and small process utilities.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tvix_build_vm::vm::initrd::Initrd;
use tvix_build_vm::vm::qemu::{QemuBackend, QemuConfig};
use tvix_build_vm::vm::{accel, artifacts, Accel, AccelChoice};

/// Guest RAM of the trivial-build VMs and of the floor (the floor in docs/architecture.md uses 256 MiB).
pub const TRIVIAL_MEMORY_MIB: u32 = 256;

/// The bench's fixed environment.
pub struct Env {
    pub kernel: PathBuf,
    pub agent: PathBuf,
    pub busybox: PathBuf,
    /// The `tvix-build-vm` binary built alongside this bench (fs-daemon, the CLI).
    pub cli: PathBuf,
    pub qemu: Arc<QemuBackend>,
    pub qemu_program: PathBuf,
    pub accel: Accel,
    pub vcpus: u32,
    /// Compiled guest programs and initrds are cached here.
    pub cache: PathBuf,
    /// Scratch space for this run (removed at the end). Under /tmp: socket paths must stay
    /// short.
    pub work: tempfile::TempDir,
    pub virtiofsd: Option<PathBuf>,
    pub bwrap: Option<PathBuf>,
}

impl Env {
    pub fn new() -> anyhow::Result<Env> {
        let kernel = artifacts::locate_kernel(None).context(
            "the guest kernel (set TVIX_BUILD_VM_KERNEL; scripts/bench.sh does it for you)",
        )?;
        let agent = artifacts::locate_agent(None)
            .context("the guest agent (set TVIX_BUILD_VM_AGENT, see scripts/build-agent.sh)")?;
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench");
        std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
        let busybox = std::env::var_os("BUSYBOX")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
        artifacts::check_static_executable(&busybox)
            .context("a static busybox (Debian: busybox-static, or set BUSYBOX)")?;
        let qemu = QemuBackend::new(&QemuConfig::default())
            .context("QEMU and vhost-device-vsock (scripts/install-deps.sh)")?;
        let qemu_program = qemu.program().to_owned();
        let accel = accel::resolve(AccelChoice::Auto).context("choosing the accelerator")?;
        let work = tempfile::Builder::new()
            .prefix("tbvb-")
            .tempdir_in("/tmp")
            .context("creating the scratch directory")?;
        let virtiofsd = std::env::var_os("VIRTIOFSD")
            .map(PathBuf::from)
            .filter(|p| p.is_file());
        let bwrap = find_on_path("bwrap");
        Ok(Env {
            kernel,
            agent,
            busybox,
            cli: PathBuf::from(env!("CARGO_BIN_EXE_tvix-build-vm")),
            qemu: Arc::new(qemu),
            qemu_program,
            accel,
            vcpus: 1,
            cache,
            work,
            virtiofsd,
            bwrap,
        })
    }

    /// A new empty directory under the scratch space.
    pub fn scratch(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.path().join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// A static guest program compiled from `benches/vm/guest/<name>.c` (cached by source).
    pub fn guest_program(&self, name: &str) -> anyhow::Result<PathBuf> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/vm/guest")
            .join(format!("{name}.c"));
        let text =
            std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
        let out = self
            .cache
            .join(format!("{name}-{}", &blake3::hash(&text).to_hex()[..16]));
        if out.is_file() {
            return Ok(out);
        }
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let status = Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&tmp)
            .arg(&source)
            .status()
            .context("running cc (the guest programs need a C compiler and static libc)")?;
        if !status.success() {
            bail!("cc -static {} failed: {status}", source.display());
        }
        std::fs::rename(&tmp, &out).with_context(|| format!("placing {}", out.display()))?;
        Ok(out)
    }

    /// An initrd whose `/init` is the static program `init`.
    pub fn program_initrd(&self, init: &Path) -> anyhow::Result<PathBuf> {
        let mut initrd = Initrd::base();
        initrd
            .add_file_from("/init", init, 0o755)
            .context("adding /init")?;
        initrd
            .write_cached(&self.cache)
            .context("writing the initrd")
    }

    /// An initrd with busybox, `script` as `/init` and `extra` programs in `/bin`.
    pub fn busybox_initrd(&self, script: &str, extra: &[(&str, &Path)]) -> anyhow::Result<PathBuf> {
        let mut initrd = Initrd::base();
        let init = format!(
            "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n{script}\n"
        );
        initrd
            .add_bytes("/init", init.into_bytes(), 0o755)
            .and_then(|i| i.add_file_from("/bin/busybox", &self.busybox, 0o755))
            .context("building the busybox initrd")?;
        for (name, path) in extra {
            initrd
                .add_file_from(&format!("/bin/{name}"), path, 0o755)
                .with_context(|| format!("adding {name}"))?;
        }
        initrd
            .write_cached(&self.cache)
            .context("writing the initrd")
    }

    pub fn qemu_version(&self) -> String {
        Command::new(&self.qemu_program)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_default()
    }
}

pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// Seconds as f64.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Whether a unix socket at `path` is ready for a vhost-user front end: it exists, and it is
/// not merely bound (a connection between bind() and listen() would be refused). Listening
/// sockets carry `__SO_ACCEPTCON` (0x10000) in /proc/net/unix; a socket bound elsewhere and
/// renamed into place after listen() (as our fs-daemon does) is not listed under `path`,
/// and its existence is enough.
pub fn is_listening(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    let (Ok(table), Some(path)) = (std::fs::read_to_string("/proc/net/unix"), path.to_str()) else {
        return true;
    };
    let mut listed = table.lines().skip(1).filter_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() == 8 && f[7] == path).then(|| u32::from_str_radix(f[3], 16).unwrap_or(0))
    });
    match listed.next() {
        Some(flags) => flags & 0x10000 != 0,
        None => true,
    }
}

/// Waits up to `limit` for `path` to listen.
pub async fn wait_listening(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !is_listening(path) {
        if start.elapsed() > limit {
            bail!("{} did not listen within {limit:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// `@@key rest` lines of a console log.
pub fn console_results(console: &str) -> Vec<(String, Vec<String>)> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("@@"))
        .map(|l| {
            let mut words = l.split_whitespace().map(str::to_owned);
            let key = words.next().unwrap_or_default();
            (key, words.collect())
        })
        .collect()
}
