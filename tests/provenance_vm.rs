//! Provenance and accounting of real builds in real VMs: `serve --signing-key` signs a
//! build whose envelope verifies with `verify` and with an independent verifier, whose
//! subjects' NAR hashes are those of the exported outputs as `nix-store --dump` writes them,
//! and whose statement names the inputs, kernel, initrd, agent and the VM as they were; the
//! measured figures of builds that burn CPU, fill memory, write and read known amounts.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use sha2::Digest;
use std::path::Path;
use std::process::Command;
use support::cli::Env;
use support::provenance::{independent_verify, nix_store_dump_sha256};
use support::serve::*;
use tvix_build_vm::castore::blob::{read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::build::build_service_client::BuildServiceClient;
use tvix_build_vm::provenance::keys::public_path;

const PROVENANCE_METADATA: &str = "tvix-build-vm-provenance";

fn sha256_hex(path: &Path) -> String {
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn keygen(env: &Env, out: &Path) {
    let status = env
        .command()
        .arg("keygen")
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A proto3 JSON uint64 (a string) or a number, as u64.
fn u64_of(v: &serde_json::Value) -> u64 {
    match v {
        serde_json::Value::String(s) => s.parse().unwrap(),
        v => v.as_u64().unwrap_or_else(|| panic!("{v} is not a uint64")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_signed_by_serve_verifies_and_attests_what_ran() {
    let env = Env::new();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("host.key");
    keygen(&env, &key);
    let key_arg = key.to_str().unwrap();
    let server = Serve::start(
        &env,
        &[
            "--signing-key",
            key_arg,
            "--builder-id",
            "https://builds.example.org/host-7",
        ],
    );
    let channel = server.channel();
    let busybox = upload_busybox(channel.clone()).await;
    // A directory with a file, an executable and a symlink, and a plain file.
    let script = "mkdir -p $tree/sub && echo hello > $tree/sub/a && echo '#!x' > $tree/run \
                  && chmod +x $tree/run && ln -s sub/a $tree/link && echo file > $file";
    let mut req = seed_request(busybox.clone(), script, &["file-out", "tree-out"]);
    req.environment_vars
        .push(env_var("file", "/nix/store/file-out"));
    req.environment_vars
        .push(env_var("tree", "/nix/store/tree-out"));
    req.environment_vars.sort_by(|a, b| a.key.cmp(&b.key));
    let response = BuildServiceClient::new(channel.clone())
        .do_build(req)
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", server.log()));
    let header = response
        .metadata()
        .get(PROVENANCE_METADATA)
        .expect("the provenance digest in the response metadata")
        .to_str()
        .unwrap()
        .to_owned();
    let build = response.into_inner();
    let reference = build.provenance.clone().expect("a provenance extension");
    let digest = B3Digest::try_from(&reference.envelope_digest[..]).unwrap();
    assert_eq!(header, digest.to_hex());

    // The envelope, from the castore it was stored in.
    let blobs = GrpcBlobService::new(channel.clone());
    let envelope_bytes = read_to_vec(&blobs, &digest).await.unwrap().unwrap();
    assert_eq!(envelope_bytes.len() as u64, reference.envelope_size);
    let work = tempfile::tempdir().unwrap();
    let envelope = work.path().join("envelope.json");
    std::fs::write(&envelope, &envelope_bytes).unwrap();
    let build_json = work.path().join("build.json");
    std::fs::write(&build_json, serde_json::to_vec(&build).unwrap()).unwrap();

    // `verify` against the Build, and an independent verifier.
    let out = env
        .command()
        .arg("verify")
        .arg("--public-key")
        .arg(public_path(&key))
        .arg("--envelope")
        .arg(&envelope)
        .arg("--build")
        .arg(&build_json)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let subjects = independent_verify(&public_path(&key), &envelope).unwrap();
    assert_eq!(subjects.len(), 2, "{subjects:?}");

    // What the statement says.
    let env_json: serde_json::Value = serde_json::from_slice(&envelope_bytes).unwrap();
    use data_encoding::BASE64;
    let payload = BASE64
        .decode(env_json["payload"].as_str().unwrap().as_bytes())
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let predicate = &st["predicate"];
    let run = &predicate["runDetails"];
    assert_eq!(run["builder"]["id"], "https://builds.example.org/host-7");
    let vm = &run["byproducts"][0]["annotations"];
    assert_eq!(vm["vmm"], "qemu");
    assert!(vm["vmmVersion"].as_str().unwrap().contains("QEMU"), "{vm}");
    assert_eq!(vm["accelerator"], "tcg", "this host has no KVM");
    assert!(vm["memoryBytes"].as_u64().unwrap() >= 256 << 20, "{vm}");
    assert!(vm["limits"]["memoryBytes"].as_u64().unwrap() > 0, "{vm}");
    let deps = predicate["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    let dep = |name: &str| {
        deps.iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not among {deps:?}"))
            .clone()
    };
    let busybox_digest = B3Digest::of(&std::fs::read(support::BUSYBOX).unwrap());
    assert_eq!(
        dep("busybox")["digest"]["castoreBlake3"],
        busybox_digest.to_hex()
    );
    assert_eq!(
        dep("kernel")["digest"]["sha256"],
        sha256_hex(&support::kernel())
    );
    assert_eq!(
        dep("agent")["digest"]["sha256"],
        sha256_hex(&support::agent())
    );
    assert!(dep("initrd")["digest"]["sha256"].is_string());
    let params = &predicate["buildDefinition"]["externalParameters"];
    assert_eq!(params["dialect"], "tvix.build.v1 (seed layout)");
    assert_eq!(
        params["request"]["outputs"],
        serde_json::json!(["file-out", "tree-out"])
    );
    // The Build echoes the request as it was received.
    let sent = build.build_request.clone().unwrap();
    assert_eq!(
        params["requestDigest"]["sha256"],
        data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(prost::Message::encode_to_vec(&sent)))
    );
    assert!(
        server
            .log()
            .contains(run["metadata"]["invocationId"].as_str().unwrap()),
        "the invocation id is the build id in the server's log"
    );

    // Each subject's NAR hash is that of the exported output as Nix serialises it.
    drop(server);
    for node in &build.outputs {
        let node_json = serde_json::to_string(node).unwrap();
        let name = match &node.node {
            Some(tvix_build_vm::proto::castore::node::Node::File(f)) => f.name.clone(),
            Some(tvix_build_vm::proto::castore::node::Node::Directory(d)) => d.name.clone(),
            other => panic!("unexpected output {other:?}"),
        };
        let name = String::from_utf8(name.to_vec()).unwrap();
        let dest = work.path().join(&name);
        let status = env
            .command()
            .args(["store", "export", "--store"])
            .arg(env.store.path())
            .arg(&node_json)
            .arg(&dest)
            .status()
            .unwrap();
        assert!(status.success(), "store export {node_json}");
        let subject = subjects
            .get(&format!("nix/store/{name}"))
            .unwrap_or_else(|| panic!("no subject for {name}: {subjects:?}"));
        assert_eq!(subject, &nix_store_dump_sha256(&dest), "{name}");
    }
}

/// `build` with busybox as its only input (and `extra` inputs), one output `out`.
fn build(env: &Env, extra: &[&str], memory: &str, script: &str) -> serde_json::Value {
    let mut args = vec![
        "--input",
        support::BUSYBOX,
        "--memory",
        memory,
        "--output",
        "out",
    ];
    for e in extra {
        args.extend(["--input", e]);
    }
    args.extend(["--", "/nix/store/busybox", "sh", "-c", script]);
    env.build(&args).build_json()
}

#[test]
fn two_seconds_of_cpu_are_reported_as_about_two() {
    let env = Env::new();
    let b = build(
        &env,
        &[],
        "512M",
        "/nix/store/busybox timeout 2 /nix/store/busybox sh -c 'while :; do :; done'; \
         echo done > /nix/store/out",
    );
    let u = &b["usage"];
    let cpu = (u64_of(&u["guestCpuUserUs"]) + u64_of(&u["guestCpuSystemUs"])) as f64 / 1e6;
    assert!((1.5..=3.0).contains(&cpu), "guest CPU {cpu} s: {u}");
    // The host paid at least as much: the guest's CPU is emulated by the VMM's threads.
    let host = u64_of(&u["hostCpuUs"]) as f64 / 1e6;
    assert!(host >= 1.5, "host CPU {host} s: {u}");
    assert!(
        u["guestClamped"].as_array().is_none_or(Vec::is_empty),
        "{u}"
    );
}

#[test]
fn memory_output_and_input_figures_are_at_least_what_the_build_did() {
    let env = Env::new();
    let inputs = tempfile::tempdir().unwrap();
    let ten = inputs.path().join("ten-mib");
    std::fs::write(&ten, vec![7u8; 10 << 20]).unwrap();
    let bb = "/nix/store/busybox";
    let script = format!(
        "{bb} cat /nix/store/ten-mib > /dev/null && \
         {bb} dd if=/dev/zero of=/build/fill bs=1M count=200 2>/dev/null && {bb} rm /build/fill && \
         {bb} dd if=/dev/zero of=/nix/store/out bs=1M count=64 2>/dev/null"
    );
    let b = build(&env, &[ten.to_str().unwrap()], "768M", &script);
    let u = &b["usage"];
    assert!(
        u64_of(&u["guestMemoryPeakBytes"]) >= 200 << 20,
        "200 MiB in the build's tmpfs: {u}"
    );
    assert!(u64_of(&u["outputBytes"]) >= 64 << 20, "{u}");
    assert!(u64_of(&u["inputBytesRead"]) >= 10 << 20, "{u}");
    assert!(
        u64_of(&u["inputFilesOpened"]) >= 2,
        "busybox and the input: {u}"
    );
    assert!(u64_of(&u["guestPidsPeak"]) >= 2, "{u}");
}

#[test]
fn a_key_that_cannot_be_used_is_named_before_anything_runs() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not a key").unwrap();
    let run = env.build(&[
        "--signing-key",
        bad.to_str().unwrap(),
        "--output",
        "out",
        "--",
        "/bin/true",
    ]);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("--signing-key"), "{}", run.stderr);
    assert!(
        std::fs::read_dir(env.store.path())
            .unwrap()
            .next()
            .is_none(),
        "nothing was opened or imported"
    );
    env.assert_clean();
}

#[test]
fn build_writes_the_envelope_it_signed() {
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    keygen(&env, &key);
    let envelope = dir.path().join("envelope.json");
    let run = env.build(&[
        "--signing-key",
        key.to_str().unwrap(),
        "--provenance-out",
        envelope.to_str().unwrap(),
        "--input",
        support::BUSYBOX,
        "--output",
        "out",
        "--",
        "/nix/store/busybox",
        "sh",
        "-c",
        "echo hi > /nix/store/out",
    ]);
    let b = run.build_json();
    let written = std::fs::read(&envelope).unwrap();
    let digest = b["provenance"]["envelopeDigest"].as_str().unwrap();
    let digest = data_encoding::BASE64.decode(digest.as_bytes()).unwrap();
    assert_eq!(digest, B3Digest::of(&written).as_bytes());
    let subjects = independent_verify(&public_path(&key), &envelope).unwrap();
    let out = dir.path().join("out");
    std::fs::write(&out, "hi\n").unwrap();
    assert_eq!(subjects["nix/store/out"], nix_store_dump_sha256(&out));
    // The key itself went nowhere near the build: not in the store, not in the log.
    let pem = std::fs::read_to_string(&key).unwrap();
    let secret_line = pem.lines().nth(1).unwrap();
    assert!(!run.stderr.contains(secret_line));
    let grep = Command::new("grep")
        .args(["-rqF", secret_line])
        .arg(env.store.path())
        .status()
        .unwrap();
    assert_eq!(grep.code(), Some(1), "the private key is in the store");
}
