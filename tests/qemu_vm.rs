//! Real VMs under QEMU (TCG): boot, deadline kill, vsock, repeated boots.
//! Each test holds a VM slot (at most two VMs at once on the machine).

mod support;

use std::time::Duration;
use support::vm::{vm_slot, TestVm};
use support::{error_chain, process_exists};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;
use tvix_build_vm::vm::process::ProcessGroup;
use tvix_build_vm::vm::vsock::HostListener;
use tvix_build_vm::vm::{HybridVsock, LaunchSpec, VmStatus, VmmBackend};

/// Generous for a ~1 s boot on a loaded 2-core machine; a hang ends here, not in CI's timeout.
const BOOT_DEADLINE: Duration = Duration::from_secs(30);

const POWEROFF: &str = "/bin/busybox poweroff -f";

async fn boot_to_poweroff(script: &str) -> (tvix_build_vm::vm::VmExit, String) {
    let _slot = vm_slot();
    let vm = TestVm::new(support::vm::busybox_initrd(script));
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = support::vm::qemu()
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let exit = running
        .wait_until(Instant::now() + BOOT_DEADLINE)
        .await
        .expect("wait");
    let serial = running.serial_tail(64 << 10);
    (exit, serial)
}

/// Mounts devtmpfs and reports which devices the guest has.
const PROBE_DEVICES: &str = "/bin/busybox mount -t devtmpfs dev /dev
if [ -c /dev/kvm ]; then echo KVM=yes; else echo KVM=no; fi
if [ -b /dev/vda ]; then echo VDA=yes; else echo VDA=no; fi";

#[tokio::test]
async fn busybox_guest_prints_and_powers_off() {
    let (exit, serial) = boot_to_poweroff(&format!(
        "/bin/busybox echo MARKER-$((6*7))\n{PROBE_DEVICES}\n{POWEROFF}"
    ))
    .await;
    assert!(exit.is_clean(), "{exit:?}\nserial:\n{serial}");
    assert!(
        serial.contains("MARKER-42"),
        "marker missing; serial:\n{serial}"
    );
    // Nothing beyond what was asked for: no nested KVM, no disk.
    assert!(
        serial.contains("KVM=no") && serial.contains("VDA=no"),
        "serial:\n{serial}"
    );
    eprintln!("boot to poweroff: {:?}", exit.elapsed);
}

#[tokio::test]
async fn optional_devices_when_asked() {
    let _slot = vm_slot();
    let mut vm = TestVm::new(support::vm::busybox_initrd(&format!(
        "{PROBE_DEVICES}\n/bin/busybox mount -t sysfs sys /sys\n/bin/busybox cat /sys/block/vda/size\n{POWEROFF}"
    )));
    let disk = vm.path().join("scratch.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("creating the scratch image");
    vm.config.scratch_disk = Some(disk);
    vm.config.nested_virt = true;
    // The guest kernel has no virtio-net driver yet; this checks that QEMU accepts the device
    // under its sandbox.
    vm.config.network = true;
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = support::vm::qemu()
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let exit = running
        .wait_until(Instant::now() + BOOT_DEADLINE)
        .await
        .expect("wait");
    let serial = running.serial_tail(64 << 10);
    assert!(exit.is_clean(), "{exit:?}\nserial:\n{serial}");
    assert!(
        serial.contains("KVM=yes"),
        "no /dev/kvm in the guest; serial:\n{serial}"
    );
    assert!(
        serial.contains("VDA=yes"),
        "no scratch disk; serial:\n{serial}"
    );
    // 8 MiB in 512-byte sectors.
    assert!(
        serial.contains("16384"),
        "wrong disk size; serial:\n{serial}"
    );
}

#[tokio::test]
async fn a_guest_that_never_powers_off_is_killed_at_the_deadline() {
    let _slot = vm_slot();
    let mut vm = TestVm::new(support::vm::busybox_initrd(
        "/bin/busybox echo STARTED\nwhile :; do /bin/busybox sleep 1000; done",
    ));
    vm.config.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: vm.path().join("vsock.sock"),
    });
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = support::vm::qemu()
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = running.pids();
    assert_eq!(pids.len(), 2, "vhost-device-vsock and qemu");
    // Kill a guest that is really running, not one still booting.
    let booted = Instant::now() + BOOT_DEADLINE;
    while !running.serial_tail(4096).contains("STARTED") {
        assert!(
            Instant::now() < booted,
            "guest never started:\n{}",
            running.serial_tail(4096)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for pid in &pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss: Vec<_> = status
            .lines()
            .filter(|l| l.starts_with("Rss") || l.starts_with("VmHWM"))
            .collect();
        eprintln!("pid {pid}: {}", rss.join(", "));
    }
    let qemu_status = std::fs::read_to_string(format!("/proc/{}/status", running.vmm_pid()))
        .expect("qemu status");
    assert!(
        qemu_status
            .lines()
            .any(|l| l.split_whitespace().eq(["Seccomp:", "2"])),
        "QEMU runs without its seccomp filter:\n{qemu_status}"
    );
    let recorded = std::fs::read_to_string(vm.path().join("pids")).expect("pids file");
    for pid in &pids {
        assert!(
            recorded.contains(&format!("{pid} ")),
            "{pid} not in pids file:\n{recorded}"
        );
    }
    let exit = running
        .wait_until(Instant::now() + Duration::from_millis(300))
        .await
        .expect("wait");
    assert_eq!(exit.status, VmStatus::DeadlineExceeded);
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} survived the kill");
    }
    let dir = vm.dir.path().to_owned();
    drop(running);
    vm.dir.close().expect("removing the runtime dir");
    assert!(!dir.exists());
}

#[tokio::test]
async fn guest_talks_to_the_host_over_vsock() {
    const PORT: u32 = 1024;
    let _slot = vm_slot();
    let client = support::vm::vsock_client();
    let initrd = support::vm::busybox_initrd_with(
        &format!("/bin/vsock-client {PORT} ping-from-guest\n{POWEROFF}"),
        &[("/bin/vsock-client", &client, 0o755)],
    );
    let mut vm = TestVm::new(initrd);
    let uds = vm.path().join("vsock.sock");
    vm.config.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    let listener = HostListener::bind(&uds, PORT).expect("bind before launch");
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = support::vm::qemu()
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let deadline = Instant::now() + BOOT_DEADLINE;
    let stream = tokio::select! {
        s = listener.accept(deadline) => s.unwrap_or_else(|e| panic!("accept: {}\nserial:\n{}", error_chain(&e), running.serial_tail(4096))),
        exit = running.wait() => panic!("VM ended before connecting: {exit:?}\nserial:\n{}", running.serial_tail(4096)),
    };
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout_at(deadline, stream.read_line(&mut line))
        .await
        .expect("guest sends in time")
        .expect("read");
    assert_eq!(line, "ping-from-guest\n");
    stream
        .get_mut()
        .write_all(b"pong-from-host")
        .await
        .expect("write");
    stream.get_mut().shutdown().await.expect("shutdown");
    let exit = running.wait_until(deadline).await.expect("wait");
    let serial = running.serial_tail(4096);
    assert!(exit.is_clean(), "{exit:?}\n{serial}");
    assert!(
        serial.contains("vsock-client: reply: pong-from-host"),
        "serial:\n{serial}"
    );
}

#[tokio::test]
async fn a_vmm_that_cannot_start_reports_why() {
    let _slot = vm_slot();
    let mut vm = TestVm::new(support::vm::busybox_initrd(POWEROFF));
    // Nobody serves this virtio-fs socket: QEMU must fail and say so.
    vm.config.shares = vec![tvix_build_vm::vm::FsShare {
        tag: "inputs".into(),
        socket: vm.path().join("missing-fs.sock"),
    }];
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let mut running = support::vm::qemu()
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
        .expect("spawned");
    let exit = running
        .wait_until(Instant::now() + BOOT_DEADLINE)
        .await
        .expect("wait");
    assert!(
        matches!(exit.status, VmStatus::Exited(code) if code != 0),
        "{exit:?}"
    );
    let tail = exit.vmm_log_tail.expect("a failed VMM comes with its log");
    assert!(tail.contains("missing-fs.sock"), "{tail}");
}

#[tokio::test]
async fn twenty_boots_in_a_row_never_hang() {
    let mut times = Vec::new();
    for i in 0..20 {
        let (exit, serial) =
            boot_to_poweroff(&format!("/bin/busybox echo BOOT-{i}-OK\n{POWEROFF}")).await;
        assert!(exit.is_clean(), "boot {i}: {exit:?}\nserial:\n{serial}");
        assert!(
            serial.contains(&format!("BOOT-{i}-OK")),
            "boot {i}: serial:\n{serial}"
        );
        times.push(exit.elapsed);
    }
    times.sort();
    eprintln!(
        "20 boots: min {:?}, median {:?}, max {:?}",
        times[0], times[10], times[19]
    );
}

#[tokio::test]
async fn dropping_a_running_vm_kills_it() {
    let _slot = vm_slot();
    let mut vm = TestVm::new(support::vm::busybox_initrd(
        "while :; do /bin/busybox sleep 1000; done",
    ));
    vm.config.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: vm.path().join("vsock.sock"),
    });
    let spec = LaunchSpec::new(vm.config.clone()).expect("valid spec");
    let running = support::vm::qemu()
        .launch(&spec, ProcessGroup::new(&spec.config().runtime_dir))
        .await
        .unwrap_or_else(|e| panic!("launch: {}", error_chain(&e)));
    let pids = running.pids();
    drop(running);
    // SIGKILL is sent at once; tokio reaps the children in the background.
    let gone_by = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&pid| process_exists(pid)) {
        assert!(
            Instant::now() < gone_by,
            "{pids:?} outlived their RunningVm"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
