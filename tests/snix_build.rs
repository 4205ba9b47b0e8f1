//! snix.build.v1 on a real `serve`, without booting a VM: it is served beside either tvix
//! layout (reflection and health), and every refusal of the 2024 path is the snix path's,
//! with the same code and the same field. The snix side uses the clients generated from
//! protos/snix; the builds themselves are in snix_build_vm.rs.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use bytes::Bytes;
use prost::Message;
use support::cli::Env;
use support::serve::{Serve, SERVED_BY_DEFAULT};
use support::snix;
use tonic::Code;
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::{build_2024 as pb2024, snix_build as sb};

#[tokio::test(flavor = "multi_thread")]
async fn snix_build_is_listed_and_serving_beside_either_tvix_layout() {
    let env = Env::new();
    let server = Serve::start(&env, &[]);
    support::serve::assert_listed_and_serving(server.channel(), SERVED_BY_DEFAULT).await;
    drop(server); // it holds the store
                  // The 2024 layout replaces the seed layout's build protos (and so the streaming
                  // service, which uses them); snix build stays.
    let server = Serve::start(&env, &["--protocol", "tvix-2024"]);
    let listed = support::serve::list_services(server.channel()).await;
    assert!(!listed
        .iter()
        .any(|s| s == "tvix.build.vm.v1.BuildVmService"));
    let want: Vec<&str> = SERVED_BY_DEFAULT
        .iter()
        .copied()
        .filter(|s| *s != "tvix.build.vm.v1.BuildVmService")
        .collect();
    support::serve::assert_listed_and_serving(server.channel(), &want).await;
}

/// One refusal: what to change, the code, and what the message must name.
type Case = (fn(&mut sb::BuildRequest), Code, &'static str);

fn cases() -> Vec<Case> {
    let c = |f: fn(&mut sb::BuildRequest), code, needle| -> Case { (f, code, needle) };
    let mut v: Vec<Case> = vec![
        c(
            |r| r.command_args.clear(),
            Code::InvalidArgument,
            "command_args",
        ),
        c(
            |r| r.command_args[0] = "a\0b".into(),
            Code::InvalidArgument,
            "command_args[0]",
        ),
        c(
            |r| r.working_dir = "/build".into(),
            Code::InvalidArgument,
            "working_dir",
        ),
        c(
            |r| r.inputs_dir = "../store".into(),
            Code::InvalidArgument,
            "inputs_dir",
        ),
        c(
            |r| r.scratch_paths = vec!["nix/store".into(), "build".into()],
            Code::InvalidArgument,
            "scratch_paths",
        ),
        c(
            |r| r.outputs = vec!["nix/store/b".into(), "nix/store/a".into()],
            Code::InvalidArgument,
            "outputs[1]",
        ),
        c(
            |r| r.outputs = vec!["elsewhere/out".into()],
            Code::InvalidArgument,
            "outputs[0]",
        ),
        c(
            |r| r.outputs = vec!["nix/store/busybox".into()],
            Code::InvalidArgument,
            "outputs[0]",
        ),
        c(
            |r| r.environment_vars = vec![snix::var("B", "1"), snix::var("A", "2")],
            Code::InvalidArgument,
            "environment_vars[1]",
        ),
        c(
            |r| r.environment_vars = vec![snix::var("A=B", "1")],
            Code::InvalidArgument,
            "environment_vars[0]",
        ),
        // NUL in a name or a value (snix refuses both since 2025-11): the variable is named.
        c(
            |r| r.environment_vars = vec![snix::var("A\0B", "1")],
            Code::InvalidArgument,
            "\"A\\0B\"",
        ),
        c(
            |r| r.environment_vars = vec![snix::var("A", "1"), snix::var("TOKEN", "x\0y")],
            Code::InvalidArgument,
            "environment_vars[1]: value of \"TOKEN\": contains a NUL byte",
        ),
        c(
            |r| r.inputs.push(r.inputs[0].clone()),
            Code::InvalidArgument,
            "inputs[1]",
        ),
        c(
            |r| r.inputs[0].entry = None,
            Code::InvalidArgument,
            "inputs[0]",
        ),
        c(
            |r| {
                r.additional_files = vec![
                    sb::build_request::AdditionalFile {
                        path: "build/b".into(),
                        contents: Bytes::new(),
                    },
                    sb::build_request::AdditionalFile {
                        path: "build/a".into(),
                        contents: Bytes::new(),
                    },
                ]
            },
            Code::InvalidArgument,
            "additional_files[1]",
        ),
        // The 16 MiB bound on additional files, under the 64 MiB message limit.
        c(
            |r| {
                r.additional_files = vec![sb::build_request::AdditionalFile {
                    path: "build/big".into(),
                    contents: Bytes::from(vec![b'x'; 17 << 20]),
                }]
            },
            Code::InvalidArgument,
            "additional_files[0]",
        ),
        c(
            |r| r.refscan_needles = vec![String::new()],
            Code::InvalidArgument,
            "refscan_needles[0]",
        ),
        c(
            |r| r.refscan_needles = vec!["x".repeat(1025)],
            Code::InvalidArgument,
            "refscan_needles[0]",
        ),
        c(
            |r| constraints(r).available_ro_paths = vec!["relative".into()],
            Code::InvalidArgument,
            "constraints.available_ro_paths[0]",
        ),
        // A request that names no system is invalid, not unsatisfiable.
        c(
            |r| constraints(r).system.clear(),
            Code::InvalidArgument,
            "constraints.system",
        ),
        c(
            |r| r.constraints = None,
            Code::InvalidArgument,
            "constraints.system",
        ),
        // Valid, but not for this host.
        c(
            |r| constraints(r).system = "aarch64-linux".into(),
            Code::FailedPrecondition,
            "constraints.system",
        ),
        c(
            |r| constraints(r).available_ro_paths = vec!["/dev/kvm".into()],
            Code::FailedPrecondition,
            "/dev/kvm",
        ),
        c(
            |r| constraints(r).available_ro_paths = vec!["/srv/not-allowed".into()],
            Code::FailedPrecondition,
            "\"/srv/not-allowed\" is not allowed",
        ),
        c(
            |r| constraints(r).min_memory = 1 << 50,
            Code::FailedPrecondition,
            "constraints.min_memory",
        ),
        // The operator offers neither (no --bin-sh, no network).
        c(
            |r| constraints(r).provide_bin_sh = true,
            Code::FailedPrecondition,
            "provide_bin_sh",
        ),
        c(
            |r| constraints(r).network_access = true,
            Code::FailedPrecondition,
            "network_access",
        ),
        c(
            |r| {
                set_file(r, |f| {
                    f.digest = B3Digest::of(b"absent").as_bytes().to_vec().into()
                })
            },
            Code::FailedPrecondition,
            "busybox",
        ),
    ];
    // An input that declares another size than its blob's, both ways.
    v.push((
        (|r| set_file(r, |f| f.size = 10)),
        Code::FailedPrecondition,
        "input busybox declares 10 bytes, but its blob",
    ));
    v.push((
        (|r| set_file(r, |f| f.size = 1_000_000_000)),
        Code::FailedPrecondition,
        "input busybox declares 1000000000 bytes, but its blob",
    ));
    v
}

fn constraints(r: &mut sb::BuildRequest) -> &mut sb::build_request::BuildConstraints {
    r.constraints.as_mut().unwrap()
}

fn set_file(
    r: &mut sb::BuildRequest,
    f: impl FnOnce(&mut tvix_build_vm::proto::snix_castore::FileEntry),
) {
    match &mut r.inputs[0].entry {
        Some(tvix_build_vm::proto::snix_castore::entry::Entry::File(e)) => f(e),
        other => panic!("busybox is a file entry, got {other:?}"),
    }
}

/// The build id (after admission) differs per request; the rest of a message must not.
fn without_build_id(s: &tonic::Status) -> String {
    match s.metadata().get("x-tvix-build-vm-build-id") {
        Some(id) => s.message().replace(id.to_str().unwrap(), "<id>"),
        None => s.message().to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_of_the_2024_path_is_the_snix_paths() {
    let env = Env::new();
    // Both families on one listener: the same request bytes to each.
    let server = Serve::start(&env, &["--protocol", "tvix-2024"]);
    let channel = server.channel();
    let ok = snix::request(
        snix::upload_busybox(channel.clone()).await,
        "true",
        &["out"],
    );
    let mut snix_client = sb::build_service_client::BuildServiceClient::new(channel.clone());
    let mut tvix_client = pb2024::build_service_client::BuildServiceClient::new(channel.clone());
    let all = cases();
    assert_eq!(all.len(), 30);
    for (change, code, needle) in all {
        let mut r = ok.clone();
        change(&mut r);
        let tvix = pb2024::BuildRequest::decode(r.encode_to_vec().as_slice()).unwrap();
        let s = snix_client.do_build(r).await.unwrap_err();
        let t = tvix_client.do_build(tvix).await.unwrap_err();
        assert_eq!(s.code(), code, "{needle}: {}", s.message());
        assert!(s.message().contains(needle), "{needle}: {}", s.message());
        assert_eq!(t.code(), code, "2024, {needle}: {}", t.message());
        assert_eq!(without_build_id(&s), without_build_id(&t), "{needle}");
    }
    drop(server);
    env.assert_clean();
}
