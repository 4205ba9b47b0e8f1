//! Section 3: in the guest, a sequential read of a large input file and a `stat` of many
//! input files, through our castore virtio-fs daemon and through virtiofsd's passthrough of
//! the same tree on disk. Both shares are mounted in the same VM and measured alternately
//! (A, B then B, A), after dropping the guest's caches each time, so load on the host hits
//! both alike. The guest times itself (CLOCK_MONOTONIC, `guest/fsbench.c`).

use crate::report::{Row, Target};
use crate::service::Service;
use crate::setup::{console_results, wait_listening, Env};
use crate::stats::ratios;
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tvix_build_vm::castore::import::import_path;
use tvix_build_vm::castore::{Directory, PathComponent};
use tvix_build_vm::fs::spec::{DEFAULT_MAX_INODES, DEFAULT_THREADS};
use tvix_build_vm::fs::{DaemonSpec, RootSource, ShareSource};
use tvix_build_vm::vm::process::{ProcessGroup, Stdout};
use tvix_build_vm::vm::{FsShare, LaunchConfig, LaunchSpec, VmmBackend};

pub struct FsSizes {
    pub big_mib: usize,
    pub many: usize,
    pub rounds: usize,
}

/// Writes `<root>/tree/data/{big, many/fNNNNN}`.
fn write_tree(root: &Path, sizes: &FsSizes) -> anyhow::Result<()> {
    let many = root.join("tree/data/many");
    std::fs::create_dir_all(&many).with_context(|| format!("creating {}", many.display()))?;
    let mut big = Vec::with_capacity(sizes.big_mib << 20);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    while big.len() < sizes.big_mib << 20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        big.extend_from_slice(&seed.to_le_bytes());
    }
    std::fs::write(root.join("tree/data/big"), &big).context("writing the big file")?;
    for i in 0..sizes.many {
        std::fs::write(many.join(format!("f{i:05}")), format!("file number {i}\n"))
            .context("writing a small file")?;
    }
    Ok(())
}

fn guest_script(rounds: usize) -> String {
    format!(
        r#"mount -t proc proc /proc
mount -t devtmpfs dev /dev
mkdir -p /a /b
mount -t virtiofs castore /a || echo "@@error mount castore"
mount -t virtiofs passthru /b || echo "@@error mount passthru"
r=0
while [ $r -lt {rounds} ]; do
  if [ $((r % 2)) = 0 ]; then order="castore:/a passthru:/b"; else order="passthru:/b castore:/a"; fi
  for x in $order; do
    tag=${{x%%:*}}; dir=${{x#*:}}
    echo 3 > /proc/sys/vm/drop_caches
    fsbench read $tag $r $dir/tree/data/big
    echo 3 > /proc/sys/vm/drop_caches
    fsbench stat $tag $r $dir/tree/data/many
  done
  r=$((r + 1))
done
echo "@@done"
poweroff -f"#
    )
}

/// Per operation and tag: round -> (nanoseconds, bytes or entries).
type Samples = BTreeMap<(String, String), BTreeMap<usize, (f64, f64)>>;

pub async fn run(env: &Env, svc: &Service, sizes: &FsSizes) -> anyhow::Result<Vec<Row>> {
    let Some(virtiofsd) = &env.virtiofsd else {
        return Ok(vec![Row::new("fs", "3. virtio-fs vs virtiofsd", "").note(
            "VIRTIOFSD not set: skipped (scripts/bench.sh installs it)",
        )]);
    };
    let mirror = env.scratch("fs-mirror")?;
    eprintln!(
        "  [fs] writing {} MiB + {} files",
        sizes.big_mib, sizes.many
    );
    write_tree(&mirror, sizes)?;
    let node = import_path(svc.blobs.clone(), svc.dirs.clone(), &mirror.join("tree"))
        .await
        .context("importing the fs tree into the castore")?;
    let mut root = Directory::new();
    root.try_insert(PathComponent::try_from("tree").context("name")?, node)
        .context("root directory")?;
    let rt = env.scratch("fs-rt")?;
    let root_file = rt.join("inputs.dir");
    std::fs::write(&root_file, root.encode()).context("writing the root directory")?;

    let fsbench = env.guest_program("fsbench")?;
    let initrd = env.busybox_initrd(&guest_script(sizes.rounds), &[("fsbench", &fsbench)])?;

    let mut group = ProcessGroup::new(&rt);
    let ours_sock = rt.join("castore.sock");
    let daemon = &svc.runner.config().fs_daemon;
    let mut cmd = tokio::process::Command::new(&daemon.program);
    cmd.args(
        DaemonSpec {
            socket: ours_sock.clone(),
            source: ShareSource::Castore {
                root: RootSource::File(root_file.clone()),
                blob_service_addr: daemon.blob_service_addr.clone(),
                directory_service_addr: daemon.directory_service_addr.clone(),
            },
            tag: Some("castore".into()),
            max_handles: daemon.max_handles,
            max_inodes: DEFAULT_MAX_INODES,
            threads: DEFAULT_THREADS,
            stats: None,
        }
        .to_args(),
    );
    let ours_id = group.spawn("fs-daemon", cmd, Stdout::Log)?;
    let peer_sock = rt.join("passthru.sock");
    let mut cmd = tokio::process::Command::new(virtiofsd);
    cmd.arg("--shared-dir")
        .arg(&mirror)
        .arg("--socket-path")
        .arg(&peer_sock)
        .args([
            "--tag",
            "passthru",
            "--sandbox",
            "none",
            "--readonly",
            "--log-level",
            "error",
        ]);
    let peer_id = group.spawn("virtiofsd", cmd, Stdout::Log)?;
    for (sock, id) in [(&ours_sock, ours_id), (&peer_sock, peer_id)] {
        if let Err(e) = wait_listening(sock, Duration::from_secs(20)).await {
            let log = tvix_build_vm::vm::logsink::tail(&group.log_path(id), 4096);
            bail!("{e:#}; {}: {log}", group.name(id));
        }
    }

    let spec = LaunchSpec::new(LaunchConfig {
        kernel: env.kernel.clone(),
        initrd,
        cmdline: vec![],
        memory_mib: 512,
        vcpus: env.vcpus,
        shares: vec![
            FsShare {
                tag: "castore".into(),
                socket: ours_sock,
            },
            FsShare {
                tag: "passthru".into(),
                socket: peer_sock,
            },
        ],
        vsock: None,
        scratch_disk: None,
        serial_log: rt.join("serial.log"),
        nested_virt: false,
        network: false,
        runtime_dir: rt.clone(),
        accel: env.accel,
    })?;
    eprintln!("  [fs] guest measuring {} rounds", sizes.rounds);
    let mut vm = env.qemu.launch(&spec, group).await?;
    let exit = tokio::time::timeout(Duration::from_secs(1800), vm.wait())
        .await
        .context("the fs benchmark VM ran for 30 minutes")??;
    let console = std::fs::read_to_string(rt.join("serial.log")).unwrap_or_default();
    if !exit.is_clean() || !console.contains("@@done") || console.contains("@@error") {
        bail!(
            "fs benchmark VM failed ({:?}); console:\n{console}",
            exit.status
        );
    }

    let mut samples = Samples::new();
    for (key, words) in console_results(&console) {
        if key != "read" && key != "stat" {
            continue;
        }
        let [tag, round, ns, count] = words.as_slice() else {
            bail!("malformed @@{key} line: {words:?}");
        };
        samples
            .entry((key.clone(), tag.clone()))
            .or_default()
            .insert(round.parse()?, (ns.parse::<f64>()?, count.parse::<f64>()?));
    }
    let series = |op: &str, tag: &str| -> Vec<(f64, f64)> {
        samples
            .get(&(op.to_owned(), tag.to_owned()))
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    };
    let mut rows = Vec::new();
    for (op, what, unit, expect, scale) in [
        (
            "read",
            format!("3a. guest sequential read of {} MiB", sizes.big_mib),
            "MiB/s",
            (sizes.big_mib << 20) as f64,
            (1u64 << 20) as f64,
        ),
        (
            "stat",
            format!("3b. guest stat of {} files", sizes.many),
            "files/s",
            sizes.many as f64,
            1.0,
        ),
    ] {
        let (ours, peer) = (series(op, "castore"), series(op, "passthru"));
        if ours.is_empty()
            || ours.len() != peer.len()
            || ours.iter().chain(&peer).any(|(_, c)| *c != expect)
        {
            bail!("fs benchmark: incomplete or wrong {op} results; console:\n{console}");
        }
        let rate = |v: &[(f64, f64)]| -> Vec<f64> {
            v.iter().map(|(ns, c)| c / scale / (ns / 1e9)).collect()
        };
        let (ours, peer) = (rate(&ours), rate(&peer));
        rows.push(
            Row::new(&format!("fs_{op}"), &what, unit)
                .ours(&ours)
                .peer("virtiofsd passthrough", &peer)
                .ratio(&ratios(&ours, &peer))
                .target(Target::RatioAtLeast(0.8))
                .note(format!("{} rounds, both shares in one VM, alternating, guest caches dropped before each; ratio = our speed / virtiofsd's", sizes.rounds)),
        );
    }
    Ok(rows)
}
