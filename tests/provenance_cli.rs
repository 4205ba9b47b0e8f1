//! `keygen` and `verify` through the real binary, without a VM: a statement over real
//! castore nodes signed with a key `keygen` wrote, checked by `verify` and by an independent
//! verifier, and each kind of tampering caught with its own message and exit code.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use support::provenance::{independent_verify, nix_store_dump_sha256, python_loads_private_key};
use tvix_build_vm::castore::blob::MemoryBlobService;
use tvix_build_vm::castore::directory_service::MemoryDirectoryService;
use tvix_build_vm::castore::import::import_path;
use tvix_build_vm::castore::{BlobService, DirectoryService};
use tvix_build_vm::provenance::dsse::Envelope;
use tvix_build_vm::provenance::keys::{load_signing_key, public_path};
use tvix_build_vm::provenance::nar::hash_node;
use tvix_build_vm::provenance::statement::{BuildFacts, Statement, Subject, VmDetails};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tvix-build-vm"))
}

fn keygen(out: &Path) -> Output {
    bin().arg("keygen").arg("--out").arg(out).output().unwrap()
}

struct Signed {
    tmp: tempfile::TempDir,
    key: PathBuf,
    outputs: Vec<PathBuf>,
    statement: Statement,
    envelope: PathBuf,
    build: PathBuf,
}

impl Signed {
    fn verify(&self, extra: &[&std::ffi::OsStr]) -> (u8, String) {
        let out = bin()
            .arg("verify")
            .arg("--public-key")
            .arg(public_path(&self.key))
            .args(extra)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap() as u8, text)
    }

    fn envelope_args(&self, envelope: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "--envelope".into(),
            envelope.into(),
            "--build".into(),
            self.build.clone().into(),
        ]
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Three outputs on disk, imported into a castore; a statement naming them, signed with a
/// key `keygen` wrote; the Build JSON naming them as the seed layout does.
async fn signed() -> Signed {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("host.key");
    let out = keygen(&key);
    assert!(out.status.success(), "{out:?}");

    let outs = tmp.path().join("outs");
    std::fs::create_dir(&outs).unwrap();
    let dir = outs.join("aaa-tree");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("share/empty")).unwrap();
    std::fs::write(dir.join("bin/tool"), b"#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(dir.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("../bin/tool", dir.join("share/link")).unwrap();
    let file = outs.join("bbb-file");
    std::fs::write(&file, vec![7u8; 100_003]).unwrap();
    let link = outs.join("ccc-link");
    std::os::unix::fs::symlink("aaa-tree/bin/tool", &link).unwrap();

    let blobs: Arc<dyn BlobService> = Arc::new(MemoryBlobService::new());
    let dirs: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::new());
    let mut subjects = Vec::new();
    let mut build_outputs = Vec::new();
    for p in [&dir, &file, &link] {
        let node = import_path(blobs.clone(), dirs.clone(), p).await.unwrap();
        let nar = hash_node(&*blobs, &*dirs, &node).await.unwrap();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        build_outputs.push(
            serde_json::to_value(node.to_proto(bytes::Bytes::from(name.clone().into_bytes())))
                .unwrap(),
        );
        subjects.push(Subject {
            path: format!("nix/store/{name}"),
            node,
            nar,
        });
    }
    let statement = Statement::new(&BuildFacts {
        builder_id: "https://builder.example/test".into(),
        build_id: "b-test".into(),
        request: serde_json::json!({}),
        request_sha256: [0; 32],
        dialect: "seed".into(),
        inputs: vec![],
        vm_artifacts: vec![],
        outputs: subjects,
        started: UNIX_EPOCH,
        finished: UNIX_EPOCH + Duration::from_secs(1),
        vm: VmDetails {
            vmm: "qemu".into(),
            vmm_version: String::new(),
            accelerator: "tcg".into(),
            vcpus: 1,
            memory_bytes: 1 << 30,
            limits: BTreeMap::new(),
            network: false,
        },
    });
    let signing = load_signing_key(&key).unwrap();
    let envelope = tmp.path().join("envelope.json");
    std::fs::write(
        &envelope,
        Envelope::sign(&statement.to_payload(), &signing).to_json(),
    )
    .unwrap();
    let build = tmp.path().join("build.json");
    std::fs::write(
        &build,
        serde_json::to_vec(&serde_json::json!({ "outputs": build_outputs })).unwrap(),
    )
    .unwrap();
    Signed {
        tmp,
        key,
        outputs: vec![dir, file, link],
        statement,
        envelope,
        build,
    }
}

#[test]
fn keygen_writes_standard_keys_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("k");
    let out = keygen(&key);
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        python_loads_private_key(&key),
        "OpenSSL cannot read the private key"
    );
    let before = std::fs::read(&key).unwrap();
    let again = keygen(&key);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[tokio::test]
async fn a_signed_statement_verifies_here_and_independently() {
    let s = signed().await;
    let mut args = s.envelope_args(&s.envelope);
    for p in &s.outputs {
        args.push("--path".into());
        args.push(p.into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let (code, text) = s.verify(&args);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok   build: 3 output(s) match"), "{text}");

    let subjects = independent_verify(&public_path(&s.key), &s.envelope).unwrap();
    for p in &s.outputs {
        let name = format!("nix/store/{}", p.file_name().unwrap().to_str().unwrap());
        assert_eq!(subjects[&name], nix_store_dump_sha256(p), "{name}");
    }
}

#[tokio::test]
async fn each_tampering_is_caught_with_its_own_message() {
    let s = signed().await;
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&s.envelope).unwrap()).unwrap();
    let os = |v: &[std::ffi::OsString]| -> Vec<std::ffi::OsString> { v.to_vec() };
    let run = |envelope: &Path| {
        let args = os(&s.envelope_args(envelope));
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        s.verify(&args)
    };
    use data_encoding::BASE64;

    // A byte of the payload.
    // Flips one bit of the base64 field at `pointer` (decoded byte `at`), and checks that
    // both verifiers refuse the result.
    let refused = |name: &str, pointer: &str, at: usize| {
        let mut v = original.clone();
        let field = v.pointer_mut(pointer).unwrap();
        let mut raw = BASE64.decode(field.as_str().unwrap().as_bytes()).unwrap();
        raw[at] ^= 0x01;
        *field = BASE64.encode(&raw).into();
        let p = s.write(name, &serde_json::to_vec(&v).unwrap());
        let (code, text) = run(&p);
        assert_eq!(code, 1, "{name}: {text}");
        assert!(
            text.contains("FAIL signature: the signature does not verify"),
            "{name}: {text}"
        );
        assert!(
            independent_verify(&public_path(&s.key), &p).is_err(),
            "{name}"
        );
    };
    refused("payload.json", "/payload", 100);
    refused("sig.json", "/signatures/0/sig", 5);

    // Another key (the envelope names the real one).
    let other = s.tmp.path().join("other.key");
    assert!(keygen(&other).status.success());
    let out = bin()
        .arg("verify")
        .arg("--public-key")
        .arg(public_path(&other))
        .arg("--envelope")
        .arg(&s.envelope)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL signature: signed by key"), "{text}");
    assert!(text.contains("not by the given public key"), "{text}");

    // A subject swapped, and signed again by the host's key: the signature holds, the
    // subjects do not match the build.
    let mut st = s.statement.clone();
    st.subject.swap(0, 1);
    let n0 = st.subject[0].name.clone();
    st.subject[0].name = st.subject[1].name.clone();
    st.subject[1].name = n0;
    let signing = load_signing_key(&s.key).unwrap();
    let p = s.write(
        "swapped.json",
        &Envelope::sign(&st.to_payload(), &signing).to_json(),
    );
    let (code, text) = run(&p);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("ok   signature"), "{text}");
    assert!(
        text.contains("FAIL subject nix/store/aaa-tree: the statement says it is a file, the output is a directory"),
        "{text}"
    );
    assert!(
        text.contains("FAIL subject nix/store/bbb-file: the statement says it is a directory, the output is a file"),
        "{text}"
    );

    // A tree on disk that changed after the build.
    std::fs::write(s.outputs[0].join("bin/tool"), b"#!/bin/sh\nexit 1\n").unwrap();
    let out = bin()
        .arg("verify")
        .arg("--public-key")
        .arg(public_path(&s.key))
        .arg("--envelope")
        .arg(&s.envelope)
        .arg("--path")
        .arg(&s.outputs[0])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("FAIL subject nix/store/aaa-tree: narSha256 differs"),
        "{text}"
    );

    // Not an envelope at all: the check cannot be made.
    let p = s.write("junk.json", b"{\"payload\": 1}");
    let (code, text) = run(&p);
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("not DSSE JSON"), "{text}");
}
