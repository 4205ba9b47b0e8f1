//! Validation of [`LaunchConfig`].

use super::*;

fn valid(dir: &Path) -> LaunchConfig {
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&kernel, b"k").expect("write");
    std::fs::write(&initrd, b"i").expect("write");
    LaunchConfig {
        kernel,
        initrd,
        cmdline: vec![],
        memory_mib: 256,
        vcpus: 1,
        shares: vec![FsShare {
            tag: "inputs".into(),
            socket: dir.join("fs.sock"),
        }],
        vsock: Some(HybridVsock {
            guest_cid: 3,
            uds_path: dir.join("vsock.sock"),
        }),
        scratch_disk: None,
        serial_log: dir.join("serial.log"),
        nested_virt: false,
        network: false,
        runtime_dir: dir.to_owned(),
        accel: Accel::Tcg,
    }
}

fn rejects(config: LaunchConfig, field: &str) {
    let err = LaunchSpec::new(config).expect_err("must be rejected");
    assert!(err.to_string().contains(field), "{field}: {err}");
}

#[test]
fn a_valid_config_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    LaunchSpec::new(valid(dir.path())).expect("valid");
}

#[test]
fn each_field_is_checked_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    rejects(
        LaunchConfig {
            kernel: d.join("nope"),
            ..valid(d)
        },
        "kernel",
    );
    rejects(
        LaunchConfig {
            initrd: "relative.cpio".into(),
            ..valid(d)
        },
        "initrd",
    );
    rejects(
        LaunchConfig {
            memory_mib: 16,
            ..valid(d)
        },
        "memory_mib",
    );
    rejects(
        LaunchConfig {
            vcpus: 0,
            ..valid(d)
        },
        "vcpus",
    );
    rejects(
        LaunchConfig {
            vcpus: MAX_VCPUS + 1,
            ..valid(d)
        },
        "vcpus",
    );
    rejects(
        LaunchConfig {
            scratch_disk: Some(d.join("nope")),
            ..valid(d)
        },
        "scratch_disk",
    );
    rejects(
        LaunchConfig {
            runtime_dir: d.join("nope"),
            ..valid(d)
        },
        "runtime_dir",
    );
    rejects(
        LaunchConfig {
            serial_log: d.join("nope/serial.log"),
            ..valid(d)
        },
        "serial_log",
    );
    let mut c = valid(d);
    c.vsock = Some(HybridVsock {
        guest_cid: 2,
        uds_path: d.join("v.sock"),
    });
    rejects(c, "vsock.guest_cid");
    let mut c = valid(d);
    c.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: PathBuf::from(format!("/tmp/{}", "x".repeat(95))),
    });
    rejects(c, "vsock.uds_path");
    let mut c = valid(d);
    std::fs::write(d.join("stale.sock"), b"").expect("write");
    c.vsock = Some(HybridVsock {
        guest_cid: 3,
        uds_path: d.join("stale.sock"),
    });
    rejects(c, "already exists");
}

#[test]
fn tags_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for tag in ["", "a,b", "a b", &"t".repeat(MAX_TAG_BYTES + 1)] {
        let mut c = valid(d);
        c.shares[0].tag = tag.to_owned();
        rejects(c, "shares[0]");
    }
    let mut c = valid(d);
    c.shares.push(c.shares[0].clone());
    rejects(c, "shares[1]");
}
