//! The 2024 tvix layout (`serve --protocol tvix-2024`): its request onto the shared model,
//! and the answer a 2024 tvix client accepts: one anonymous node (empty name) per requested
//! output, in request order, and for each the indices of the `refscan_needles` it holds.

use super::build_host::Finished;
use super::refscan::{RefscanError, Scanner};
use crate::castore::{BlobService, DirectoryService};
use crate::proto::build_2024 as pb;
use crate::request::{BuildRequest, Constraints, Layout, RawRequest, ValidationError};
use bytes::Bytes;

/// Validates a 2024-layout request.
pub fn to_request(wire: pb::BuildRequest) -> Result<BuildRequest, ValidationError> {
    let c = wire.constraints.unwrap_or_default();
    RawRequest {
        inputs: wire.inputs,
        command_args: wire.command_args,
        working_dir: wire.working_dir,
        scratch_paths: wire.scratch_paths,
        inputs_dir: wire.inputs_dir,
        outputs: wire.outputs,
        environment_vars: wire
            .environment_vars
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect(),
        constraints: Constraints {
            system: c.system,
            min_memory: c.min_memory,
            available_ro_paths: c.available_ro_paths,
            network_access: c.network_access,
            provide_bin_sh: c.provide_bin_sh,
        },
        additional_files: wire
            .additional_files
            .into_iter()
            .map(|f| (f.path, f.contents))
            .collect(),
        refscan_needles: wire.refscan_needles,
    }
    .validate(Layout::Tvix2024)
}

/// The Build for a finished 2024-layout request; scans the outputs (read back from the
/// castore) for the request's needles.
pub async fn reply(
    request: pb::BuildRequest,
    finished: &Finished,
    blobs: &dyn BlobService,
    dirs: &dyn DirectoryService,
) -> Result<pb::Build, RefscanError> {
    let scanner = Scanner::new(&request.refscan_needles)?;
    let mut outputs = Vec::with_capacity(finished.outcome.outputs.len());
    let mut outputs_needles = Vec::with_capacity(finished.outcome.outputs.len());
    for (_, node) in &finished.outcome.outputs {
        outputs.push(node.to_proto(Bytes::new()));
        outputs_needles.push(pb::build::OutputNeedles {
            needles: scanner.scan(node, blobs, dirs).await?,
        });
    }
    let (exit_status, timings, log) = super::reply::extensions_2024(finished);
    Ok(pb::Build {
        build_request: Some(request),
        outputs,
        outputs_needles,
        exit_status,
        timings,
        log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the tvix evaluator of 2024-10 sent for a trivial derivation (see the facts).
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
    fn a_real_tvix_request_maps_onto_the_model() {
        let req = to_request(tvix_hello()).unwrap();
        assert_eq!(req.layout, Layout::Tvix2024);
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
        assert_eq!(to_request(w).unwrap_err().field, "working_dir");

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
        assert_eq!(to_request(w).unwrap_err().field, "additional_files[1]");

        let mut w = tvix_hello();
        w.outputs = vec!["elsewhere/out".into()];
        assert_eq!(to_request(w).unwrap_err().field, "outputs[0]");

        let mut w = tvix_hello();
        w.refscan_needles.push(String::new());
        assert_eq!(to_request(w).unwrap_err().field, "refscan_needles[1]");
    }
}
