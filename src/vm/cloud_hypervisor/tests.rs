use super::*;
use crate::vm::{FsShare, HybridVsock, LaunchConfig};

fn spec(dir: &Path, accel: Accel, network: bool) -> LaunchSpec {
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.cpio");
    let disk = dir.join("scratch.img");
    for f in [&kernel, &initrd, &disk] {
        std::fs::write(f, b"x").expect("write");
    }
    LaunchSpec::new(LaunchConfig {
        kernel,
        initrd,
        cmdline: vec![cmdline::agent_port(1024)],
        memory_mib: 384,
        vcpus: 2,
        shares: vec![
            FsShare {
                tag: "inputs".into(),
                socket: dir.join("fs.sock"),
            },
            FsShare {
                tag: "more".into(),
                socket: dir.join("fs2.sock"),
            },
        ],
        vsock: Some(HybridVsock {
            guest_cid: 7,
            uds_path: dir.join("vsock.sock"),
        }),
        scratch_disk: Some(disk),
        serial_log: dir.join("serial.log"),
        nested_virt: true,
        network,
        runtime_dir: dir.to_owned(),
        accel,
    })
    .expect("valid spec")
}

fn backend() -> CloudHypervisorBackend {
    CloudHypervisorBackend {
        program: PathBuf::from("/nonexistent/cloud-hypervisor"),
        cpu: CpuInfo {
            hardware_virt: true,
            khz: Some(2_000_000),
        },
        timeouts: Timeouts::default(),
    }
}

#[test]
fn the_vm_config_follows_the_spec() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = spec(dir.path(), Accel::Kvm, false);
    let cmdline = backend().kernel_cmdline(&spec).expect("cmdline");
    // QEMU's base parameters for KVM; nothing TCG-only (tsc_early_khz).
    assert_eq!(cmdline, "console=ttyS0 panic=-1 quiet tvix.agent_port=1024");
    let config = vm_config(&spec, cmdline.clone());
    config.validate().expect("valid");
    let d = dir.path().display();
    let json = serde_json::to_value(&config).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "payload": {"kernel": format!("{d}/vmlinux"), "initramfs": format!("{d}/initrd.cpio"), "cmdline": cmdline},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "nested": true},
            "memory": {"size": 384u64 << 20, "shared": true},
            "fs": [
                {"tag": "inputs", "socket": format!("{d}/fs.sock"), "num_queues": 1, "queue_size": 1024, "id": "fs0"},
                {"tag": "more", "socket": format!("{d}/fs2.sock"), "num_queues": 1, "queue_size": 1024, "id": "fs1"},
            ],
            "vsock": {"cid": 7, "socket": format!("{d}/vsock.sock"), "id": "vsock0"},
            "disks": [{"path": format!("{d}/scratch.img"), "readonly": false, "image_type": "Raw", "id": "scratch"}],
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
        })
    );
}

#[tokio::test]
async fn refuses_what_cloud_hypervisor_cannot_do_before_starting_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = backend()
        .launch_vm(&spec(dir.path(), Accel::Tcg, false))
        .await
        .expect_err("no TCG");
    assert!(
        matches!(err, ChError::NeedsKvm { accel: Accel::Tcg }),
        "{err}"
    );
    let err = backend()
        .launch_vm(&spec(dir.path(), Accel::Kvm, true))
        .await
        .expect_err("no network");
    assert!(matches!(err, ChError::NoUserNetworking), "{err}");
    assert!(
        !dir.path().join(crate::vm::process::PIDS_FILE).exists(),
        "nothing was spawned"
    );
}

#[tokio::test]
async fn a_missing_program_is_a_launch_error_with_its_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = backend()
        .launch(
            &spec(dir.path(), Accel::Kvm, false),
            ProcessGroup::new(dir.path()),
        )
        .await
        .expect_err("no program");
    let text = {
        let mut out = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    };
    assert!(matches!(err, LaunchError::Process(_)), "{text}");
    assert!(text.contains("/nonexistent/cloud-hypervisor"), "{text}");
}

#[test]
fn api_refusals_stay_typed_through_launch_error() {
    let err = into_launch_error(ChError::Api {
        step: "vm.boot",
        log_tail: "tail".into(),
        source: api::ApiError::Status {
            endpoint: "vm.boot",
            status: 400,
            chain: vec!["Error from API".into(), "shared memory".into()],
        },
    });
    assert!(matches!(err, LaunchError::CloudHypervisor(_)), "{err:?}");
    // Wrapped once more, as the runner does: the chain still leads to the typed errors.
    let outer: Box<dyn std::error::Error> = Box::new(err);
    let mut text = outer.to_string();
    let mut ch = None;
    let mut api_error = None;
    let mut source = outer.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        ch = ch.or(s.downcast_ref::<ChError>());
        api_error = api_error.or(s.downcast_ref::<api::ApiError>());
        source = s.source();
    }
    assert!(
        matches!(
            ch,
            Some(ChError::Api {
                step: "vm.boot",
                ..
            })
        ),
        "{text}"
    );
    assert!(
        matches!(api_error, Some(api::ApiError::Status { status: 400, .. })),
        "{text}"
    );
    assert!(text.contains("cloud-hypervisor: vm.boot failed"), "{text}");
    assert!(
        text.contains("answered 400: Error from API: shared memory"),
        "{text}"
    );
}

#[test]
fn errors_with_a_neutral_counterpart_become_it() {
    let err = into_launch_error(ChError::NotReady {
        waited: READY_TIMEOUT,
        log_tail: "tail".into(),
    });
    assert!(
        matches!(&err, LaunchError::NotReady { what, .. } if what == PROGRAM),
        "{err:?}"
    );
    let err = into_launch_error(ChError::NeedsKvm { accel: Accel::Tcg });
    assert!(
        matches!(&err, LaunchError::CloudHypervisor(e) if matches!(*e, ChError::NeedsKvm { .. })),
        "{err:?}"
    );
}

#[test]
fn runtime_paths_with_commas_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = dir.path().join("a,b");
    std::fs::create_dir(&odd).expect("mkdir");
    let mut group = ProcessGroup::new(&odd);
    let err = backend()
        .start(&mut group, &odd, Stdout::Log)
        .expect_err("comma");
    assert!(matches!(err, ChError::UnsupportedPath { .. }), "{err}");
}
