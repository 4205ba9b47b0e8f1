//! `tvix-build-vm build` failures that happen before any VM starts.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tvix-build-vm");

/// Stand-ins for the kernel and agent: they pass the checks made before anything starts
/// (an ELF file, a readable file), and no VM is booted by these tests.
const FAKE_ARTEFACTS: [&str; 4] = ["--kernel", "/bin/true", "--agent", "/bin/true"];

fn build(args: &[&str]) -> (Option<i32>, String) {
    let store = tempfile::tempdir().expect("store dir");
    build_in(store.path(), &FAKE_ARTEFACTS, args)
}

/// `build` with the store `store` and the artefact flags `artefacts`.
fn build_in(store: &Path, artefacts: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let runtime = tempfile::Builder::new()
        .prefix("tbv-cli-")
        .tempdir_in("/tmp")
        .expect("runtime dir");
    let out = Command::new(BIN)
        .arg("build")
        .arg("--store")
        .arg(store)
        .arg("--runtime-dir")
        .arg(runtime.path())
        .env_remove("TVIX_BUILD_VM_KERNEL")
        .env_remove("TVIX_BUILD_VM_AGENT")
        .args(artefacts)
        .args(args)
        .output()
        .expect("running tvix-build-vm build");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `build --request FILE` with `json` as the file's text.
fn build_request(json: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("request dir");
    let file = dir.path().join("request.json");
    std::fs::write(&file, json).expect("writing the request");
    build(&["--request", file.to_str().expect("utf-8 path")])
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.expect("dir entry").path())
        .map(|p| if p.is_dir() { files_under(&p) } else { 1 })
        .sum()
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
    let out = Command::new(BIN)
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

#[test]
fn a_request_file_that_is_not_a_request_is_invalid_and_says_why() {
    let cases = [
        ("{\"commandArgs\": [", "EOF"),
        ("{\"commandArgs\": \"/bin/true\"}", "invalid type"),
        ("{\"commandArgs\": [\"/bin/true\"], \"bogus\": 1}", "bogus"),
        (
            "{\"commandArgs\": [\"/bin/true\"], \"constraints\": {\"system\": \"x86_64-linux\", \"minMemory\": 18446744073709551616}}",
            "minMemory",
        ),
    ];
    for (json, why) in cases {
        let (code, stderr) = build_request(json);
        assert_eq!(code, Some(2), "{json}: {stderr}");
        assert!(
            stderr.contains("invalid request") && stderr.contains("request.json"),
            "{json}: {stderr}"
        );
        assert!(stderr.contains(why), "{json}: wanted {why:?} in {stderr}");
    }
}

#[test]
fn a_request_without_a_system_is_invalid_naming_the_field() {
    for json in [
        "{\"commandArgs\": [\"/bin/true\"], \"constraints\": {\"system\": \"\"}}",
        "{\"commandArgs\": [\"/bin/true\"]}",
    ] {
        let (code, stderr) = build_request(json);
        assert_eq!(code, Some(2), "{json}: {stderr}");
        assert!(
            stderr.contains("invalid request: constraints.system: empty"),
            "{json}: {stderr}"
        );
    }
    // Without a request file the system defaults to this host's.
    let (code, stderr) = build(&["--system", "", "--", "/bin/true"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("constraints.system"), "{stderr}");
}

#[test]
fn an_unusable_kernel_or_agent_is_named_before_any_input_is_imported() {
    let input = tempfile::tempdir().expect("input dir");
    std::fs::write(input.path().join("file"), "some input").expect("writing the input");
    let input = input.path().to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 4] = [
        (&["--agent", "/bin/true"], "--kernel"),
        (&["--kernel", "/bin/true"], "--agent"),
        (
            &["--kernel", "/nonexistent/vmlinux", "--agent", "/bin/true"],
            "/nonexistent/vmlinux",
        ),
        (
            &["--kernel", "/bin/true", "--agent", "/nonexistent/agent"],
            "/nonexistent/agent",
        ),
    ];
    for (artefacts, named) in cases {
        let store = tempfile::tempdir().expect("store dir");
        let (code, stderr) = build_in(
            store.path(),
            artefacts,
            &["--input", input, "--", "/bin/true"],
        );
        assert_eq!(code, Some(4), "{artefacts:?}: {stderr}");
        assert!(stderr.contains(named), "{artefacts:?}: {stderr}");
        assert_eq!(
            files_under(&store.path().join("blobs")),
            0,
            "{artefacts:?}: an input was imported before the VM configuration was checked"
        );
    }
}

#[test]
fn an_input_declaring_another_size_than_its_blob_is_refused_before_a_vm_boots() {
    let store = tempfile::tempdir().expect("store dir");
    let src = tempfile::tempdir().expect("input dir");
    let data = vec![7u8; 100_000];
    let file = src.path().join("input-file");
    std::fs::write(&file, &data).expect("writing the input");
    let out = Command::new(BIN)
        .args(["store", "import", "--store"])
        .arg(store.path())
        .arg(&file)
        .output()
        .expect("running store import");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node: serde_json::Value = serde_json::from_slice(&out.stdout).expect("import prints JSON");
    let digest = node["file"]["digest"]
        .as_str()
        .expect("a file node's digest")
        .to_owned();

    for declared in [10u64, 1_000_000_000] {
        let request = serde_json::json!({
            "inputs": [{"file": {"name": "aW5wdXQtZmlsZQ==", "digest": digest, "size": declared.to_string()}}],
            "commandArgs": ["/nix/store/input-file"],
            "constraints": {"system": "x86_64-linux"},
        });
        let dir = tempfile::tempdir().expect("request dir");
        let path = dir.path().join("request.json");
        std::fs::write(&path, request.to_string()).expect("writing the request");
        let (code, stderr) = build_in(
            store.path(),
            &FAKE_ARTEFACTS,
            &["--request", path.to_str().expect("utf-8 path")],
        );
        assert_eq!(code, Some(3), "{declared}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "input input-file declares {declared} bytes, but its blob"
            )) && stderr.contains("has 100000"),
            "{declared}: {stderr}"
        );
        // Refused before a VM: no serial console in the failure.
        assert!(!stderr.contains("serial console"), "{stderr}");
    }
}
