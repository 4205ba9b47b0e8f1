//! Section 4: output harvest throughput vs raw vsock throughput of the same guest shape.
//! Ours: a build writes one large output; the runner's harvest phase (command exit to the
//! last byte stored and hashed in the castore) is timed. Peer: a static guest program
//! (`guest/vsock_stream.c`) streams the same number of bytes from memory over vsock to a
//! host listener that only counts them (first byte to EOF). Interleaved, one of each per
//! repetition.

use crate::report::{Row, Target};
use crate::service::{failed, Service};
use crate::setup::{secs, Env};
use crate::stats::ratios;
use anyhow::{bail, Context};
use std::time::{Duration, Instant};
use tvix_build_vm::vm::process::ProcessGroup;
use tvix_build_vm::vm::vsock::HostListener;
use tvix_build_vm::vm::{HybridVsock, LaunchConfig, LaunchSpec, VmmBackend};

/// Guest RAM for both sides: the output lives in the guest's tmpfs until it is sent.
const MEMORY_MIB: u32 = 1024;
const STREAM_PORT: u32 = 1025;

async fn harvest_once(svc: &Service, mib: usize) -> anyhow::Result<f64> {
    let script =
        format!("/nix/store/busybox dd if=/dev/zero of=$out bs=1M count={mib} 2>/dev/null");
    let req = svc.request(&script, "big", MEMORY_MIB as u64)?;
    let outcome = svc
        .build(&req)
        .await
        .map_err(|e| failed("harvest build", &e))?;
    Ok(mib as f64 / secs(outcome.timings.harvest))
}

async fn raw_once(env: &Env, initrd: &std::path::Path, mib: usize) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new()
        .prefix("vs-")
        .tempdir_in(env.work.path())
        .context("vsock runtime dir")?;
    let uds = dir.path().join("vsock.sock");
    let listener = HostListener::bind(&uds, STREAM_PORT)?;
    let spec = LaunchSpec::new(LaunchConfig {
        kernel: env.kernel.clone(),
        initrd: initrd.to_owned(),
        cmdline: vec![],
        memory_mib: MEMORY_MIB,
        vcpus: env.vcpus,
        shares: vec![],
        vsock: Some(HybridVsock {
            guest_cid: 3,
            uds_path: uds,
        }),
        scratch_disk: None,
        serial_log: dir.path().join("serial.log"),
        nested_virt: false,
        network: false,
        runtime_dir: dir.path().to_owned(),
        accel: env.accel,
    })?;
    let mut vm = env
        .qemu
        .launch(&spec, ProcessGroup::new(dir.path()))
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let stream = tokio::select! {
        s = listener.accept(deadline) => s?,
        exit = vm.wait() => bail!("stream VM ended before connecting: {:?}; {}", exit?.status, vm.serial_tail(2048)),
    };
    // Counted on a plain blocking thread with a read timeout; until the byte count, not
    // EOF: vhost-device-vsock does not turn the guest's half-close into EOF.
    let want = mib << 20;
    let std_stream = stream.into_std().context("vsock stream")?;
    let counted = tokio::task::spawn_blocking(
        move || -> std::io::Result<(usize, Duration, std::os::unix::net::UnixStream)> {
            use std::io::Read;
            let mut s = std_stream;
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0usize;
            let mut first: Option<Instant> = None;
            while total < want {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += n;
            }
            Ok((total, first.map(|t| t.elapsed()).unwrap_or_default(), s))
        },
    )
    .await
    .context("the counting thread")?;
    let (total, elapsed, stream) = counted.context("reading the vsock stream")?;
    eprintln!("  [harvest] raw vsock: {total} bytes in {elapsed:?}");
    drop(stream);
    let exit = tokio::time::timeout(Duration::from_secs(60), vm.wait())
        .await
        .context("the stream VM did not power off within 60 s")??;
    if total != mib << 20 || !exit.is_clean() {
        bail!(
            "vsock stream: {total} bytes, VM {:?}; {}",
            exit.status,
            vm.serial_tail(2048)
        );
    }
    Ok(mib as f64 / secs(elapsed))
}

pub async fn run(env: &Env, svc: &Service, mib: usize, reps: usize) -> anyhow::Result<Vec<Row>> {
    let client = env.guest_program("vsock_stream")?;
    let script = format!("vsock-stream {STREAM_PORT} {mib}\npoweroff -f");
    let initrd = env.busybox_initrd(&script, &[("vsock-stream", &client)])?;
    let (mut ours, mut raw) = (vec![], vec![]);
    for i in 0..reps {
        eprintln!("  [harvest] repetition {}/{reps}", i + 1);
        ours.push(harvest_once(svc, mib).await?);
        eprintln!("  [harvest] harvest: {:.1} MiB/s", ours[ours.len() - 1]);
        raw.push(raw_once(env, &initrd, mib).await?);
    }
    Ok(vec![Row::new("harvest_vs_vsock", &format!("4. output harvest of a {mib} MiB file"), "MiB/s")
        .ours(&ours)
        .peer("raw vsock", &raw)
        .ratio(&ratios(&ours, &raw))
        .target(Target::RatioAtLeast(0.5))
        .note("ours = runner's harvest phase (command exit to output hashed and stored); raw = guest C program writing from memory in 256 KiB writes, host counting bytes")])
}
