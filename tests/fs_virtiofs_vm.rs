//! A real VM mounts the castore-backed virtio-fs share served by `tvix-build-vm fs-daemon`.
//!
//! The test fills a local castore (blob directory + redb), writes the root Directory file,
//! starts the daemon process, boots the guest kernel through the library's QEMU backend (TCG,
//! microvm, the share as a `vhost-user-fs-device`) with a busybox initramfs whose `/init`
//! mounts the share and prints what it sees on the serial console, and compares that with
//! what it stored. It fails loudly when the kernel, QEMU or busybox is missing: it never
//! passes without having booted.

// Test scaffolding outside `#[test]` functions: a failed step must fail the test.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::serve::{Listen, Serve};
use support::vm::{busybox_initrd, qemu, TestVm};
use support::{die_with_parent, error_chain, processes_naming};
use tvix_build_vm::castore::blob::{put_bytes, LocalBlobService};
use tvix_build_vm::castore::directory_service::RedbDirectoryService;
use tvix_build_vm::castore::{
    B3Digest, BlobService, Directory, DirectoryService, Node, PathComponent, SymlinkTarget,
};
use tvix_build_vm::vm::process::ProcessGroup;
use tvix_build_vm::vm::{FsShare, LaunchSpec, VmmBackend};

const TAG: &str = "inputs";
const BOOT_DEADLINE: Duration = Duration::from_secs(180);

/// Kills the child on drop (test failure or panic included).
struct Reaper(Option<Child>, &'static str);

impl Reaper {
    /// Starts `cmd`, which dies with the test, and waits for it to create `socket`.
    fn start(mut cmd: Command, what: &'static str, socket: &Path) -> Reaper {
        cmd.stdin(Stdio::null());
        die_with_parent(&mut cmd, nix::sys::signal::Signal::SIGKILL);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {what}: {e}"));
        let mut reaper = Reaper(Some(child), what);
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = reaper.0.as_mut().unwrap().try_wait().unwrap() {
                panic!("the {what} exited before listening: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the {what} did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        reaper
    }

    fn wait_timeout(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.0.as_mut()?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if c.try_wait().ok().flatten().is_none() {
                eprintln!("killing the {}", self.1);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn sha256_hex(data: &[u8], tmp: &Path) -> String {
    let path = tmp.join("sha-input");
    std::fs::write(&path, data).unwrap();
    let out = Command::new("sha256sum").arg(&path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s).unwrap()
}

struct Fixture {
    blob_addr: String,
    dir_addr: String,
    root_file: PathBuf,
    big_sha256: String,
    many: usize,
}

/// Stores the inputs:
/// `data/{big, small, link -> small, bin/hello (executable), many/f0000..}`, `top.txt`,
/// `toplink -> data/small`.
/// With `mirror`, the same tree is also written there as plain files (for comparing with
/// virtiofsd's passthrough).
fn populate(dir: &Path, big_len: usize, many: usize, mirror: Option<&Path>) -> Fixture {
    if let Some(m) = mirror {
        write_mirror(m, big_len, many);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blob_dir = dir.join("blobs");
    let redb = dir.join("directories.redb");
    let blobs = Arc::new(LocalBlobService::open(&blob_dir).unwrap());
    let big = pseudo_random(big_len, 0x9e3779b97f4a7c15);
    let big_sha256 = sha256_hex(&big, dir);
    rt.block_on(async {
        let dirs = RedbDirectoryService::open(&redb).unwrap();
        let put = |data: Vec<u8>| {
            let blobs = blobs.clone();
            async move {
                let d = put_bytes(blobs.as_ref() as &dyn BlobService, &data)
                    .await
                    .unwrap();
                (d, data.len() as u64)
            }
        };
        let file = |(digest, size): (B3Digest, u64), executable| Node::File {
            digest,
            size,
            executable,
        };

        let mut many_dir = Directory::new();
        for i in 0..many {
            let content = format!("file number {i}\n").into_bytes();
            many_dir
                .try_insert(name(&format!("f{i:04}")), file(put(content).await, false))
                .unwrap();
        }
        let mut bin = Directory::new();
        bin.try_insert(
            name("hello"),
            file(
                put(b"#!/bin/sh\necho hi-from-virtiofs\n".to_vec()).await,
                true,
            ),
        )
        .unwrap();
        let mut data = Directory::new();
        data.try_insert(name("big"), file(put(big).await, false))
            .unwrap();
        data.try_insert(
            name("small"),
            file(put(b"hello virtiofs\n".to_vec()).await, false),
        )
        .unwrap();
        data.try_insert(
            name("link"),
            Node::Symlink {
                target: SymlinkTarget::try_from("small").unwrap(),
            },
        )
        .unwrap();
        data.try_insert(name("bin"), bin.as_node()).unwrap();
        data.try_insert(name("many"), many_dir.as_node()).unwrap();
        for d in [&many_dir, &bin, &data] {
            dirs.put(d.clone()).await.unwrap();
        }

        let mut root = Directory::new();
        root.try_insert(name("data"), data.as_node()).unwrap();
        root.try_insert(
            name("top.txt"),
            file(put(b"top level\n".to_vec()).await, false),
        )
        .unwrap();
        root.try_insert(
            name("toplink"),
            Node::Symlink {
                target: SymlinkTarget::try_from("data/small").unwrap(),
            },
        )
        .unwrap();
        std::fs::write(dir.join("root.dir"), root.encode()).unwrap();
    });
    Fixture {
        blob_addr: blob_dir.display().to_string(),
        dir_addr: format!("redb://{}", redb.display()),
        root_file: dir.join("root.dir"),
        big_sha256,
        many,
    }
}

fn write_mirror(m: &Path, big_len: usize, many: usize) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    std::fs::create_dir_all(m.join("data/bin")).unwrap();
    std::fs::create_dir_all(m.join("data/many")).unwrap();
    for i in 0..many {
        std::fs::write(
            m.join(format!("data/many/f{i:04}")),
            format!("file number {i}\n"),
        )
        .unwrap();
    }
    let hello = m.join("data/bin/hello");
    std::fs::write(&hello, "#!/bin/sh\necho hi-from-virtiofs\n").unwrap();
    std::fs::set_permissions(&hello, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::write(
        m.join("data/big"),
        pseudo_random(big_len, 0x9e3779b97f4a7c15),
    )
    .unwrap();
    std::fs::write(m.join("data/small"), "hello virtiofs\n").unwrap();
    symlink("small", m.join("data/link")).unwrap();
    std::fs::write(m.join("top.txt"), "top level\n").unwrap();
    symlink("data/small", m.join("toplink")).unwrap();
}

fn start_daemon(fx: &Fixture, socket: &Path) -> Reaper {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"));
    cmd.args(["fs-daemon", "--socket"])
        .arg(socket)
        .arg("--root-directory")
        .arg(&fx.root_file)
        .args(["--blob-service-addr", &fx.blob_addr])
        .args(["--directory-service-addr", &fx.dir_addr])
        .args(["--tag", TAG, "--max-handles", "64"]);
    Reaper::start(cmd, "fs-daemon", socket)
}

/// A VM booting `initrd` with `mem_mib` of RAM, sharing the vhost-user-fs socket its
/// [`fs_socket`] names (which the daemon must be listening on before [`boot`]).
fn test_vm(initrd: PathBuf, mem_mib: u32) -> TestVm {
    let mut vm = TestVm::new(initrd);
    vm.config.memory_mib = mem_mib;
    vm.config.shares = vec![FsShare {
        tag: TAG.into(),
        socket: fs_socket(&vm),
    }];
    vm
}

/// The virtio-fs socket of `vm`, in its runtime directory (short enough for a unix socket).
fn fs_socket(vm: &TestVm) -> PathBuf {
    vm.path().join("fs.sock")
}

/// Boots the guest through the library's QEMU backend and returns its console output, once
/// QEMU and every process of the VM are gone.
fn boot(vm: &TestVm) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let spec = LaunchSpec::new(vm.config.clone())
            .unwrap_or_else(|e| panic!("launch spec: {}", error_chain(&e)));
        let mut running = qemu()
            .launch(&spec, ProcessGroup::new(vm.path()))
            .await
            .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
        let exit = running
            .wait_until(tokio::time::Instant::now() + BOOT_DEADLINE)
            .await
            .expect("waiting for the VM");
        let console = running.serial_tail(1 << 20);
        assert!(
            exit.is_clean(),
            "the VM did not power off cleanly: {exit:?}\nconsole:\n{console}"
        );
        console
    })
}

/// `@@key value` lines of the console.
fn results(console: &str) -> HashMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("@@"))
        .map(|l| match l.split_once(' ') {
            Some((k, v)) => (k.to_owned(), v.trim().to_owned()),
            None => (l.to_owned(), String::new()),
        })
        .collect()
}

/// Run by `#!/bin/busybox sh` ([`busybox_initrd`]).
const GUEST_INIT: &str = r#"/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /mnt
mount -t proc proc /proc
mount -t devtmpfs dev /dev
if mount -t virtiofs inputs /mnt; then echo "@@mount ok"; else echo "@@mount failed"; fi
echo "@@ls-root $(ls /mnt | tr '\n' ' ')"
echo "@@ls-data $(ls /mnt/data | tr '\n' ' ')"
echo "@@small $(cat /mnt/data/small)"
echo "@@top $(cat /mnt/top.txt)"
echo "@@sha-big $(sha256sum /mnt/data/big | cut -d' ' -f1)"
echo "@@size-big $(stat -c %s /mnt/data/big)"
echo "@@tail-big $(tail -c 16 /mnt/data/big | od -An -tx1 | tr -d ' \n')"
echo "@@readlink $(readlink /mnt/data/link)"
echo "@@via-link $(cat /mnt/toplink)"
echo "@@stat-small $(stat -c '%a %s %u %g %Y %h %F' /mnt/data/small)"
echo "@@stat-hello $(stat -c '%a %F' /mnt/data/bin/hello)"
echo "@@stat-dir $(stat -c '%a %h %F' /mnt/data)"
echo "@@stat-link $(stat -c '%a %F' /mnt/data/link)"
echo "@@exec $(/mnt/data/bin/hello)"
echo "@@many $(ls /mnt/data/many | wc -l)"
echo "@@many-last $(cat /mnt/data/many/$(ls /mnt/data/many | tail -n 1))"
echo "@@w-create $(sh -c 'echo x > /mnt/new' 2>&1)"
echo "@@w-append $(sh -c 'echo x >> /mnt/data/small' 2>&1)"
echo "@@w-mkdir $(mkdir /mnt/d 2>&1)"
echo "@@w-rm $(rm -f /mnt/top.txt 2>&1)"
echo "@@w-chmod $(chmod 777 /mnt/top.txt 2>&1)"
echo "@@w-ln $(ln -s x /mnt/l 2>&1)"
echo "@@after-writes $(ls /mnt | tr '\n' ' ')|$(cat /mnt/data/small)"
echo "@@done"
poweroff -f
"#;

#[test]
fn guest_mounts_the_share_and_reads_it_read_only() {
    check_guest_view(false);
}

/// As the runner does it: directories from the castore's gRPC server (which holds the redb
/// open), blobs straight from the local store's files.
#[test]
fn guest_view_with_directories_over_grpc() {
    check_guest_view(true);
}

fn check_guest_view(directories_over_grpc: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut fx = populate(dir.path(), 8 << 20, 300, None);
    // `serve` over the fixture's stores.
    let _server = directories_over_grpc.then(|| {
        let server = Serve::castore(
            &[
                "--blob-service-addr",
                &fx.blob_addr,
                "--directory-service-addr",
                &fx.dir_addr,
            ],
            Listen::Unix,
        );
        fx.dir_addr = server.grpc_addr();
        server
    });
    let vm = test_vm(busybox_initrd(GUEST_INIT), 256);
    let mut daemon = start_daemon(&fx, &fs_socket(&vm));

    let console = boot(&vm);
    let r = results(&console);
    let get = |k: &str| {
        r.get(k)
            .unwrap_or_else(|| panic!("no @@{k} on the console:\n{console}"))
            .as_str()
    };
    assert_eq!(get("mount"), "ok", "{console}");
    assert_eq!(get("ls-root"), "data top.txt toplink");
    assert_eq!(get("ls-data"), "big bin link many small");
    assert_eq!(get("small"), "hello virtiofs");
    assert_eq!(get("top"), "top level");
    assert_eq!(get("sha-big"), fx.big_sha256);
    assert_eq!(get("size-big"), (8 << 20).to_string());
    let big = pseudo_random(8 << 20, 0x9e3779b97f4a7c15);
    let tail: String = big[big.len() - 16..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(get("tail-big"), tail);
    assert_eq!(get("readlink"), "small");
    assert_eq!(get("via-link"), "hello virtiofs");
    assert_eq!(get("stat-small"), "444 15 0 0 1 1 regular file");
    assert_eq!(get("stat-hello"), "555 regular file");
    assert_eq!(get("stat-dir"), "555 2 directory");
    assert_eq!(get("stat-link"), "777 symbolic link");
    assert_eq!(get("exec"), "hi-from-virtiofs");
    assert_eq!(get("many"), fx.many.to_string());
    assert_eq!(get("many-last"), format!("file number {}", fx.many - 1));
    for k in ["w-create", "w-append", "w-mkdir", "w-rm", "w-chmod", "w-ln"] {
        assert!(
            get(k).contains("Read-only file system"),
            "{k} did not fail with EROFS: {:?}",
            get(k)
        );
    }
    assert_eq!(get("after-writes"), "data top.txt toplink |hello virtiofs");
    assert!(r.contains_key("done"));

    // The VM is gone: the daemon notices the disconnect and exits cleanly.
    let status = daemon
        .wait_timeout(Duration::from_secs(20))
        .expect("fs-daemon did not exit after the VM disconnected");
    assert!(status.success(), "fs-daemon exited with {status}");
    // Nothing of the VM is left: no process names its runtime directory.
    let left = processes_naming(&vm.path().to_string_lossy());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Guest side of the benchmark: timings from /proc/uptime (10 ms resolution).
const BENCH_INIT: &str = r#"/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /mnt
mount -t proc proc /proc
mount -t devtmpfs dev /dev
mount -t virtiofs inputs /mnt || echo "@@mount failed"
now() { cut -d' ' -f1 /proc/uptime; }
t0=$(now); cat /mnt/data/big > /dev/null; t1=$(now)
echo "@@read-cold $t0 $t1"
t0=$(now); cat /mnt/data/big > /dev/null; t1=$(now)
echo "@@read-warm $t0 $t1"
cd /mnt/data/many
t0=$(now); stat -c %s * > /dev/null; t1=$(now)
echo "@@stat-cold $t0 $t1"
t0=$(now); stat -c %s * > /dev/null; t1=$(now)
echo "@@stat-warm $t0 $t1"
echo "@@count $(ls | wc -l)"
cd /
echo "@@sha-big $(sha256sum /mnt/data/big | cut -d' ' -f1)"
poweroff -f
"#;

fn seconds(r: &HashMap<String, String>, key: &str, console: &str) -> f64 {
    let v = r
        .get(key)
        .unwrap_or_else(|| panic!("no @@{key} on the console:\n{console}"));
    let t: Vec<f64> = v.split(' ').map(|x| x.parse().unwrap()).collect();
    t[1] - t[0]
}

/// Sequential read of a 256 MiB input and stat of 10,000 inputs in the guest, through our
/// daemon and, if `$VIRTIOFSD` names a virtiofsd binary, through its passthrough of the
/// same tree. Prints the figures; asserts the content read is right.
#[test]
#[ignore = "benchmark: 256 MiB and 10,000 files under TCG take minutes; run with --ignored"]
fn bench_sequential_read_and_stat() {
    const BIG: usize = 256 << 20;
    const MANY: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    let fx = populate(dir.path(), BIG, MANY, Some(&mirror));
    let initrd = busybox_initrd(BENCH_INIT);

    let mut runs = vec![("castore", None)];
    if let Some(v) = std::env::var_os("VIRTIOFSD") {
        runs.push(("passthrough", Some(PathBuf::from(v))));
    } else {
        eprintln!("VIRTIOFSD not set: measuring only the castore daemon");
    }
    for (label, virtiofsd) in runs {
        let vm = test_vm(initrd.clone(), 1024);
        let socket = fs_socket(&vm);
        let _daemon = match &virtiofsd {
            None => start_daemon(&fx, &socket),
            Some(bin) => {
                let mut cmd = Command::new(bin);
                cmd.arg("--shared-dir")
                    .arg(&mirror)
                    .arg("--socket-path")
                    .arg(&socket)
                    .args(["--tag", TAG, "--sandbox", "none"]);
                Reaper::start(cmd, "virtiofsd", &socket)
            }
        };
        let console = boot(&vm);
        let r = results(&console);
        assert_eq!(r.get("sha-big"), Some(&fx.big_sha256), "{console}");
        assert_eq!(r.get("count"), Some(&MANY.to_string()), "{console}");
        let mib = (BIG >> 20) as f64;
        let cold = seconds(&r, "read-cold", &console);
        let warm = seconds(&r, "read-warm", &console);
        let stat_cold = seconds(&r, "stat-cold", &console);
        let stat_warm = seconds(&r, "stat-warm", &console);
        eprintln!(
            "BENCH {label}: read 256 MiB cold {cold:.2}s ({:.0} MiB/s), warm {warm:.2}s ({:.0} MiB/s); stat 10000 cold {stat_cold:.2}s, warm {stat_warm:.2}s",
            mib / cold.max(0.01),
            mib / warm.max(0.01)
        );
    }
}
