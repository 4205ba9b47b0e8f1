//! What snix callers send: `snix.build.v1` requests built with the types generated from
//! protos/snix, and the streaming `BuildPaths` called with a snix `BuildRequest` as its
//! request message (a snix client's own bytes, not our `PathsBuildRequest`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use super::serve::SH;
use bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;
use tvix_build_vm::proto::{
    build_vm as pbvm, castore as cpb, snix_build as sb, snix_castore as sc,
};

/// A tvix castore node as the snix `Entry` a snix client holds (wire-identical).
pub fn entry(node: &cpb::Node) -> sc::Entry {
    sc::Entry::decode(node.encode_to_vec().as_slice()).unwrap()
}

/// A snix `Entry` as the tvix node our castore clients read.
pub fn node(entry: &sc::Entry) -> cpb::Node {
    cpb::Node::decode(entry.encode_to_vec().as_slice()).unwrap()
}

pub fn var(k: &str, v: &str) -> sb::build_request::EnvVar {
    sb::build_request::EnvVar {
        key: k.into(),
        value: Bytes::from(v.to_owned()),
    }
}

/// A snix request as snix's Nix glue lays it out: inputs in `nix/store`, the build in
/// `build`, both scratch; `outputs` are store path basenames (sorted by the caller).
pub fn request(busybox: &cpb::Node, script: &str, outputs: &[&str]) -> sb::BuildRequest {
    sb::BuildRequest {
        inputs: vec![entry(busybox)],
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
