//! `tvix.build.v1` as tvix clients of 2024 send it (`serve --protocol tvix-2024`): the
//! request names its own paths, and the answer is one anonymous node (empty name) per
//! requested output, in request order, with the indices of the `refscan_needles` each holds,
//! plus the extension fields.

use super::{anonymous_outputs, extensions_in, full_request, Finished};
use crate::proto::build_2024 as pb;
use crate::request::{BuildRequest, ValidationError};

/// How provenance names this dialect.
pub const DIALECT: &str = "tvix.build.v1 (2024 layout)";

/// Validates a 2024-layout request.
pub fn decode(wire: pb::BuildRequest) -> Result<BuildRequest, ValidationError> {
    full_request!(wire).validate()
}

/// The Build for a finished 2024-layout request.
pub fn encode(request: pb::BuildRequest, f: &Finished) -> pb::Build {
    let (outputs, outputs_needles) = anonymous_outputs(f)
        .map(|(node, needles)| (node, pb::build::OutputNeedles { needles }))
        .unzip();
    let (exit_status, timings, log, usage, provenance, tenant) =
        extensions_in!(f, crate::proto::build_2024::build);
    pb::Build {
        build_request: Some(request),
        outputs,
        outputs_needles,
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
    use bytes::Bytes;

    /// What the tvix evaluator of 2024-10 sent for a trivial derivation.
    fn tvix_hello() -> pb::BuildRequest {
        let env = [
            ("HOME", "/homeless-shelter"),
            ("NIX_BUILD_CORES", "0"),
            ("NIX_BUILD_TOP", "/"),
            ("NIX_LOG_FD", "2"),
            ("NIX_STORE", "/nix/store"),
            ("PATH", "/path-not-set"),
            ("PWD", "/build"),
            ("TEMP", "/build"),
            ("TEMPDIR", "/build"),
            ("TERM", "xterm-256color"),
            ("TMP", "/build"),
            ("TMPDIR", "/build"),
            ("builder", "/bin/sh"),
            ("name", "hello"),
            ("out", "/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),
            ("system", "x86_64-linux"),
        ];
        pb::BuildRequest {
            command_args: vec!["/bin/sh".into(), "-c".into(), "echo hi > $out".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into(), "nix/store".into()],
            inputs_dir: "nix/store".into(),
            outputs: vec!["nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello".into()],
            environment_vars: env
                .iter()
                .map(|(k, v)| pb::build_request::EnvVar {
                    key: (*k).into(),
                    value: Bytes::from(v.to_string()),
                })
                .collect(),
            constraints: Some(pb::build_request::BuildConstraints {
                system: "x86_64-linux".into(),
                provide_bin_sh: true,
                ..Default::default()
            }),
            refscan_needles: vec!["mjs27ix6ig2bkbi3s3sm470vrv4lf7ic".into()],
            ..Default::default()
        }
    }

    #[test]
    fn outputs_are_anonymous_in_request_order_with_their_needles() {
        let f = crate::wire::tests::finished();
        let build = encode(pb::BuildRequest::default(), &f);
        let nodes: Vec<_> = build
            .outputs
            .iter()
            .map(|n| crate::castore::directory::Node::from_proto_anonymous(n.clone()).unwrap())
            .collect();
        for ((name, node), want) in nodes.iter().zip(&f.outcome.outputs) {
            assert!(name.is_none());
            assert_eq!(*node, want.node);
        }
        assert_eq!(nodes.len(), 3);
        let needles: Vec<_> = build
            .outputs_needles
            .iter()
            .map(|n| n.needles.clone())
            .collect();
        assert_eq!(needles, [vec![1], vec![], vec![0, 1]]);
        assert_eq!(build.timings.unwrap().total_us, 11_000);
        assert!(build.log.is_some() && build.exit_status.is_some());
        assert_eq!(build.tenant, "alice");
    }

    #[test]
    fn a_real_tvix_request_maps_onto_the_model() {
        let req = decode(tvix_hello()).unwrap();
        assert_eq!(req.working_dir.as_str(), "build");
        assert_eq!(req.inputs_dir.as_str(), "nix/store");
        assert_eq!(
            req.outputs[0].as_str(),
            "nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"
        );
        assert!(req.constraints.provide_bin_sh);
        assert!(!req.constraints.network_access);
        assert_eq!(req.environment_vars.len(), 16);
        assert_eq!(req.refscan_needles, ["mjs27ix6ig2bkbi3s3sm470vrv4lf7ic"]);
    }

    #[test]
    fn layout_2024_rules_name_the_field() {
        let mut w = tvix_hello();
        w.working_dir = "/build".into();
        assert_eq!(decode(w).unwrap_err().field, "working_dir");

        let mut w = tvix_hello();
        w.additional_files = vec![
            pb::build_request::AdditionalFile {
                path: "build/b".into(),
                contents: Bytes::new(),
            },
            pb::build_request::AdditionalFile {
                path: "build/a".into(),
                contents: Bytes::new(),
            },
        ];
        assert_eq!(decode(w).unwrap_err().field, "additional_files[1]");

        let mut w = tvix_hello();
        w.outputs = vec!["elsewhere/out".into()];
        assert_eq!(decode(w).unwrap_err().field, "outputs[0]");

        let mut w = tvix_hello();
        w.refscan_needles.push(String::new());
        assert_eq!(decode(w).unwrap_err().field, "refscan_needles[1]");
    }
}
