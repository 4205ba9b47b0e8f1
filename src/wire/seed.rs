//! The seed layout of `tvix.build.v1` (this project's primary contract, `serve`'s default,
//! and the format of `build --request`): outputs are basenames in `/nix/store`, the build
//! runs in `/build`, both are scratch space; the answer names each output node by its
//! basename, sorted by name, with the extension fields (exit status, timings, log).

use super::{constraints, env_vars, extensions_in, Finished};
use crate::castore::directory::{proto_node_name, PathComponent};
use crate::proto::{build as pb, castore as castore_pb};
use crate::request::{BuildRequest, RawRequest, ValidationError};
use bytes::Bytes;

/// `inputs_dir` of the seed layout (and of every Nix build).
pub const NIX_STORE_DIR: &str = "nix/store";
/// `working_dir` of the seed layout.
pub const BUILD_DIR: &str = "build";

/// How provenance names this dialect.
pub const DIALECT: &str = "tvix.build.v1 (seed layout)";

/// Validates a seed-layout request.
pub fn decode(wire: pb::BuildRequest) -> Result<BuildRequest, ValidationError> {
    let mut outputs = Vec::with_capacity(wire.outputs.len());
    for (i, o) in wire.outputs.iter().enumerate() {
        PathComponent::try_from(o.as_bytes()).map_err(|e| ValidationError {
            field: format!("outputs[{i}]"),
            reason: format!("{o:?}: {e}"),
        })?;
        outputs.push(format!("{NIX_STORE_DIR}/{o}"));
    }
    RawRequest {
        inputs: wire.inputs,
        command_args: wire.command_args,
        working_dir: BUILD_DIR.into(),
        scratch_paths: vec![BUILD_DIR.into(), NIX_STORE_DIR.into()],
        inputs_dir: NIX_STORE_DIR.into(),
        outputs,
        environment_vars: env_vars!(wire.environment_vars),
        constraints: constraints!(wire.constraints),
        additional_files: Vec::new(),
        refscan_needles: Vec::new(),
    }
    .validate()
}

/// The Build for a finished seed-layout request.
pub fn encode(request: pb::BuildRequest, f: &Finished) -> pb::Build {
    let mut outputs: Vec<castore_pb::Node> = f
        .outcome
        .outputs
        .iter()
        .map(|o| {
            o.node
                .to_proto(Bytes::copy_from_slice(o.path.file_name().as_bytes()))
        })
        .collect();
    outputs.sort_by(|a, b| proto_node_name(a).cmp(proto_node_name(b)));
    let (exit_status, timings, log, usage, provenance, tenant) =
        extensions_in!(f, crate::proto::build::build);
    pb::Build {
        build_request: Some(request),
        outputs,
        exit_status,
        timings,
        log,
        usage,
        provenance,
        tenant,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::directory::Node;
    use crate::castore::B3Digest;
    use crate::proto::build::build::exit_status::Kind;

    #[test]
    fn outputs_are_named_by_basename_and_sorted_with_the_extensions() {
        let f = crate::wire::tests::finished();
        let build = encode(pb::BuildRequest::default(), &f);
        let names: Vec<_> = build.outputs.iter().map(proto_node_name).collect();
        assert_eq!(names, [&b"a-out"[..], b"b-out", b"c-out"]);
        let (name, node) = Node::from_proto(build.outputs[1].clone()).unwrap();
        assert_eq!(name.as_bytes(), b"b-out");
        assert_eq!(node, f.outcome.outputs[0].node);
        assert_eq!(build.exit_status.unwrap().kind, Some(Kind::Code(0)));
        let t = build.timings.unwrap();
        assert_eq!((t.queued_us, t.boot_us, t.total_us), (1000, 2000, 11_000));
        let log = build.log.unwrap();
        assert_eq!((log.size, log.truncated), (3, true));
        let usage = build.usage.unwrap();
        assert_eq!(usage.guest_cpu_user_us, Some(5000));
        assert_eq!(usage.guest_cpu_system_us, None, "not measured is not zero");
        assert_eq!(usage.guest_memory_peak_bytes, Some(1 << 20));
        assert_eq!(usage.guest_clamped, ["pids.peak"]);
        assert_eq!((usage.host_cpu_us, usage.output_bytes), (7000, 2));
        assert_eq!(usage.input_bytes_read, None);
        let p = build.provenance.unwrap();
        assert_eq!(&p.envelope_digest[..], B3Digest::of(b"envelope").as_bytes());
        assert_eq!((p.envelope_size, p.key_id.as_str()), (8, "k1"));
        assert_eq!(build.tenant, "alice");
        assert!(build.build_request.is_some());
    }
}
