//! `tvix.build.vm.v1.BuildVmService/BuildPaths`: the request that names its own paths
//! (wire-identical to the 2024 tvix layout and snix, mapped by the same [`full_request!`]),
//! answered with one anonymous node per requested output, in request order, with its
//! refscan needles and the extension fields.

use super::{anonymous_outputs, extensions_in, full_request, Finished};
use crate::proto::build_vm as pb;
use crate::request::{BuildRequest, ValidationError};

/// How provenance names this dialect.
pub const DIALECT: &str = "tvix.build.vm.v1 BuildPaths";

/// Validates a `BuildPaths` request.
pub fn decode(wire: pb::PathsBuildRequest) -> Result<BuildRequest, ValidationError> {
    full_request!(wire).validate()
}

/// The result of a finished `BuildPaths` request.
pub fn encode(f: &Finished) -> pb::PathsBuild {
    let (outputs, outputs_needles) = anonymous_outputs(f)
        .map(|(node, needles)| (node, pb::paths_build::OutputNeedles { needles }))
        .unzip();
    let (exit_status, timings, log, usage, provenance, tenant) =
        extensions_in!(f, crate::proto::build::build);
    pb::PathsBuild {
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
    use crate::proto::build_2024 as pb2024;
    use prost::Message;

    #[test]
    fn the_request_is_wire_identical_to_the_2024_layout() {
        let tvix = crate::wire::tests::full_2024_request();
        let bytes = tvix.encode_to_vec();
        let ours = pb::PathsBuildRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(ours.encode_to_vec(), bytes);
        let a = decode(ours).unwrap();
        let b = crate::wire::tvix2024::decode(tvix).unwrap();
        assert_eq!(a, b);
        assert!(a.constraints.network_access && a.constraints.provide_bin_sh);
        assert_eq!(a.additional_files.len(), 1);
    }

    #[test]
    fn the_answer_is_the_2024_layouts() {
        let f = crate::wire::tests::finished();
        let ours = encode(&f);
        let tvix = crate::wire::tvix2024::encode(pb2024::BuildRequest::default(), &f);
        assert_eq!(ours.outputs, tvix.outputs);
        let needles = |n: &[pb::paths_build::OutputNeedles]| {
            n.iter().map(|n| n.needles.clone()).collect::<Vec<_>>()
        };
        let tvix_needles: Vec<_> = tvix
            .outputs_needles
            .iter()
            .map(|n| n.needles.clone())
            .collect();
        assert_eq!(needles(&ours.outputs_needles), tvix_needles);
        assert_eq!(
            needles(&ours.outputs_needles),
            [vec![1], vec![], vec![0, 1]]
        );
        assert_eq!(ours.timings.unwrap().total_us, 11_000);
        assert_eq!(ours.log.unwrap().size, 3);
        assert_eq!(
            (ours.tenant.as_str(), tvix.tenant.as_str()),
            ("alice", "alice")
        );
        assert!(ours.exit_status.is_some());
    }
}
