//! `tvix-build-vm build` failures that happen before any VM starts.

use std::process::Command;

fn build(args: &[&str]) -> (Option<i32>, String) {
    let store = tempfile::tempdir().expect("store dir");
    let runtime = tempfile::Builder::new()
        .prefix("tbv-cli-")
        .tempdir_in("/tmp")
        .expect("runtime dir");
    let out = Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"))
        .arg("build")
        .arg("--store")
        .arg(store.path())
        .arg("--runtime-dir")
        .arg(runtime.path())
        .args(["--kernel", "/bin/true", "--agent", "/bin/true"])
        .args(args)
        .output()
        .expect("running tvix-build-vm build");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_cloud_hypervisor_is_an_infrastructure_error_naming_it() {
    let (code, stderr) = build(&[
        "--vmm",
        "cloud-hypervisor",
        "--cloud-hypervisor-bin",
        "/nonexistent/cloud-hypervisor",
        "--",
        "/bin/true",
    ]);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(stderr.contains("/nonexistent/cloud-hypervisor"), "{stderr}");
}

#[test]
fn help_names_the_vmm_choice() {
    let out = Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"))
        .args(["build", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--vmm <VMM>") && help.contains("cloud-hypervisor"),
        "{help}"
    );
    assert!(help.contains("--cloud-hypervisor-bin"), "{help}");
}
