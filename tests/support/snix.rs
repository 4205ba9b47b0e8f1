//! What snix callers send: `snix.build.v1` requests built with the types generated from
//! protos/snix, and the streaming `BuildPaths` called with a snix `BuildRequest` as its
//! request message (a snix client's own bytes, not our `PathsBuildRequest`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::serve::SH;
use super::BUSYBOX;
use bytes::Bytes;
use tonic::transport::Channel;
use tvix_build_vm::castore::blob::{put_bytes, read_to_vec, GrpcBlobService};
use tvix_build_vm::castore::package::{Package, PackageChannel};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::{build_vm as pbvm, snix_build as sb, snix_castore as sc};

pub fn var(k: &str, v: &str) -> sb::build_request::EnvVar {
    sb::build_request::EnvVar {
        key: k.into(),
        value: Bytes::from(v.to_owned()),
    }
}

/// A snix request as snix's Nix glue lays it out: inputs in `nix/store`, the build in
/// `build`, both scratch; `outputs` are store path basenames (sorted by the caller).
pub fn request(busybox: sc::Entry, script: &str, outputs: &[&str]) -> sb::BuildRequest {
    sb::BuildRequest {
        inputs: vec![busybox],
        command_args: vec![SH.into(), "sh".into(), "-c".into(), script.into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: outputs.iter().map(|o| format!("nix/store/{o}")).collect(),
        environment_vars: vec![var("HOME", "/homeless-shelter"), var("PATH", "/nix/store")],
        constraints: Some(sb::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            ..Default::default()
        }),
        additional_files: vec![],
        refscan_needles: vec![],
    }
}

/// `tvix.build.vm.v1.BuildVmService/BuildPaths` with a snix `BuildRequest` as the request
/// message: the live events of the build, or the refusal.
pub async fn build_paths(
    channel: Channel,
    req: sb::BuildRequest,
) -> Result<tonic::Streaming<pbvm::PathsBuildEvent>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<sb::BuildRequest, pbvm::PathsBuildEvent>::default();
    let path = http::uri::PathAndQuery::from_static("/tvix.build.vm.v1.BuildVmService/BuildPaths");
    grpc.server_streaming(tonic::Request::new(req), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// Our castore clients speaking snix's package to `channel`.
pub fn blobs(channel: Channel) -> GrpcBlobService {
    GrpcBlobService::new(PackageChannel::new(channel, Package::Snix))
}

/// Uploads /bin/busybox through snix.castore.v1; the input entry named `busybox`.
pub async fn upload_busybox(channel: Channel) -> sc::Entry {
    let data = std::fs::read(BUSYBOX).unwrap();
    let digest = put_bytes(&blobs(channel), &data).await.unwrap();
    sc::Entry {
        entry: Some(sc::entry::Entry::File(sc::FileEntry {
            name: "busybox".into(),
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            size: data.len() as u64,
            executable: true,
        })),
    }
}

/// The contents of an output file entry, read through snix.castore.v1.
pub async fn read_file(channel: Channel, entry: &sc::Entry) -> Vec<u8> {
    let Some(sc::entry::Entry::File(f)) = &entry.entry else {
        panic!("expected a file entry, got {entry:?}");
    };
    assert!(f.name.is_empty(), "anonymous: {:?}", f.name);
    let digest = B3Digest::try_from(&f.digest[..]).unwrap();
    read_to_vec(&blobs(channel), &digest)
        .await
        .unwrap()
        .unwrap()
}

/// Store path hash parts of the two outputs of [`two_outputs`] (nixbase32, 32 characters).
pub const A: &str = "0c2kb8vmb6y0fp3g4n5wvzx3cbcr6j5x";
pub const B: &str = "zkyx1fr2wh5pjfg7qp6l0r4d8c3a9m2v";

/// Two outputs in request order, with the hash parts of both as refscan needles: `<A>-a`
/// holds a reference to `<B>-b` (needle 1), `<B>-b` holds none. The log says `building`.
pub fn two_outputs(busybox: sc::Entry) -> sb::BuildRequest {
    let mut r = request(
        busybox,
        &format!(
            "echo building; echo /nix/store/{B}-b > /nix/store/{A}-a; \
             echo no references here > /nix/store/{B}-b"
        ),
        &[&format!("{A}-a"), &format!("{B}-b")],
    );
    r.refscan_needles = vec![A.into(), B.into()];
    r
}

/// The answer to [`two_outputs`]: both outputs in request order, anonymous, with the right
/// contents (read through snix.castore.v1 from `castore`) and needles `[1]` and `[]`.
pub async fn assert_two_outputs(castore: Channel, response: &sb::BuildResponse) {
    assert_eq!(response.outputs.len(), 2, "{response:?}");
    let mut contents = Vec::new();
    for o in &response.outputs {
        contents.push(read_file(castore.clone(), o.output.as_ref().unwrap()).await);
    }
    assert_eq!(
        contents,
        [
            format!("/nix/store/{B}-b\n").into_bytes(),
            b"no references here\n".to_vec()
        ]
    );
    let needles: Vec<_> = response.outputs.iter().map(|o| o.needles.clone()).collect();
    assert_eq!(needles, [vec![1], vec![]]);
}
