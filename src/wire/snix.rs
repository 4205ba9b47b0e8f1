//! `snix.build.v1.BuildService/DoBuild`: the request is the 2024 tvix layout (same fields
//! and numbers, mapped by the same [`full_request!`], so every rule and limit of that path
//! holds here), with snix castore `Entry`s for inputs; the answer is snix's
//! `BuildResponse`: one anonymous entry per requested output, in request order, each with
//! the indices of the `refscan_needles` it holds, and this project's extensions (exit
//! status, timings, log, usage, provenance, tenant) in fields 1004-1009, which snix's
//! clients skip. A snix caller that wants the live log uses `BuildPaths`.

use super::{anonymous_outputs, extensions_in, full_request, Finished};
use crate::proto::{castore as cpb, snix_build as pb, snix_castore as spb};
use crate::request::{BuildRequest, ValidationError};

/// How provenance names this dialect.
pub const DIALECT: &str = "snix.build.v1";

/// Validates a `snix.build.v1` request.
pub fn decode(wire: pb::BuildRequest) -> Result<BuildRequest, ValidationError> {
    full_request!(wire; inputs: node_of_entry).validate()
}

/// The `BuildResponse` for a finished `snix.build.v1` request.
pub fn encode(f: &Finished) -> pb::BuildResponse {
    let (exit_status, timings, log, usage, provenance, tenant) =
        extensions_in!(f, crate::proto::build::build);
    pb::BuildResponse {
        outputs: anonymous_outputs(f)
            .map(|(node, needles)| pb::build_response::Output {
                output: Some(entry_of_node(node)),
                needles,
            })
            .collect(),
        exit_status,
        timings,
        log,
        usage,
        provenance,
        tenant,
    }
}

/// Moves a castore node between the packages' Rust types (`Node`/`Entry`, the same message
/// under two names; the server checks that the two encode alike): `$v.$field`'s kind moves
/// from the oneof `$from` to the oneof `$to`, each kind's fields into the struct named.
macro_rules! moved {
    ($v:expr, $field:ident: $from:path => $to_msg:ident { $to_field:ident: $to:path },
     $dir:path, $file:path, $link:path) => {{
        use $from as F;
        use $to as T;
        $to_msg {
            $to_field: $v.$field.map(|k| match k {
                F::Directory(d) => T::Directory({
                    use $dir as D;
                    D {
                        name: d.name,
                        digest: d.digest,
                        size: d.size,
                    }
                }),
                F::File(f) => T::File({
                    use $file as Fi;
                    Fi {
                        name: f.name,
                        digest: f.digest,
                        size: f.size,
                        executable: f.executable,
                    }
                }),
                F::Symlink(s) => T::Symlink({
                    use $link as L;
                    L {
                        name: s.name,
                        target: s.target,
                    }
                }),
            }),
        }
    }};
}

/// snix's `Entry` as tvix's `Node`. An entry without a kind stays one, and validation
/// refuses it as it refuses an empty tvix node.
fn node_of_entry(e: spb::Entry) -> cpb::Node {
    use cpb::Node;
    moved!(e, entry: spb::entry::Entry => Node { node: cpb::node::Node },
        cpb::DirectoryNode, cpb::FileNode, cpb::SymlinkNode)
}

/// tvix's `Node` as snix's `Entry` (the inverse of [`node_of_entry`]).
fn entry_of_node(n: cpb::Node) -> spb::Entry {
    use spb::Entry;
    moved!(n, node: cpb::node::Node => Entry { entry: spb::entry::Entry },
        spb::DirectoryEntry, spb::FileEntry, spb::SymlinkEntry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::build_2024 as pb2024;
    use bytes::Bytes;
    use prost::Message;

    fn entries() -> Vec<spb::Entry> {
        use spb::entry::Entry as E;
        vec![
            spb::Entry {
                entry: Some(E::Directory(spb::DirectoryEntry {
                    name: "d".into(),
                    digest: Bytes::from(vec![1; 32]),
                    size: 3,
                })),
            },
            spb::Entry {
                entry: Some(E::File(spb::FileEntry {
                    name: "f".into(),
                    digest: Bytes::from(vec![2; 32]),
                    size: 4,
                    executable: true,
                })),
            },
            spb::Entry {
                entry: Some(E::Symlink(spb::SymlinkEntry {
                    name: "s".into(),
                    target: "f".into(),
                })),
            },
            spb::Entry { entry: None },
        ]
    }

    /// The field-by-field moves agree with the wire: each side decodes the other's bytes
    /// into what the move makes, both ways.
    #[test]
    fn entries_and_nodes_convert_as_their_bytes_do() {
        for e in entries() {
            let node = node_of_entry(e.clone());
            assert_eq!(cpb::Node::decode(&e.encode_to_vec()[..]).unwrap(), node);
            assert_eq!(node.encode_to_vec(), e.encode_to_vec());
            assert_eq!(entry_of_node(node), e);
        }
    }

    /// A snix request, sent as bytes, is the 2024 request: the same model after validation.
    #[test]
    fn the_request_is_the_2024_layouts() {
        let full = crate::wire::tests::full_2024_request().encode_to_vec();
        let mut snix = pb::BuildRequest::decode(full.as_slice()).unwrap();
        snix.inputs = vec![entries().swap_remove(1)];
        let bytes = snix.encode_to_vec();
        let tvix = pb2024::BuildRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(tvix.encode_to_vec(), bytes);
        let a = decode(snix).unwrap();
        assert_eq!(a, crate::wire::tvix2024::decode(tvix).unwrap());
        assert!(a.constraints.network_access && a.constraints.provide_bin_sh);
        assert_eq!((a.inputs.len(), a.additional_files.len()), (1, 1));
    }

    /// snix refuses NUL in env names and values (since 2025-11); so do we, naming the
    /// variable.
    #[test]
    fn nul_in_an_env_name_or_value_is_refused_naming_the_variable() {
        let base = pb::BuildRequest {
            command_args: vec!["/bin/sh".into()],
            working_dir: "build".into(),
            scratch_paths: vec!["build".into()],
            inputs_dir: "nix/store".into(),
            constraints: Some(pb::build_request::BuildConstraints {
                system: "x86_64-linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let var = |k: &str, v: &[u8]| pb::build_request::EnvVar {
            key: k.into(),
            value: Bytes::copy_from_slice(v),
        };
        let mut r = base.clone();
        r.environment_vars = vec![var("A", b"1"), var("B\0C", b"2")];
        let e = decode(r).unwrap_err();
        assert_eq!(e.field, "environment_vars[1]");
        assert!(e.reason.contains("\"B\\0C\""), "{e}");
        let mut r = base;
        r.environment_vars = vec![var("A", b"1"), var("SECRET", b"x\0y")];
        let e = decode(r).unwrap_err();
        assert_eq!(e.field, "environment_vars[1]");
        assert!(
            e.reason.contains("SECRET") && e.reason.contains("NUL"),
            "{e}"
        );
    }

    #[test]
    fn outputs_are_anonymous_entries_in_request_order_with_their_needles() {
        let f = crate::wire::tests::finished();
        let response = encode(&f);
        let tvix = crate::wire::tvix2024::encode(pb2024::BuildRequest::default(), &f);
        assert_eq!(response.outputs.len(), 3);
        for ((o, node), needles) in response
            .outputs
            .iter()
            .zip(&tvix.outputs)
            .zip(&tvix.outputs_needles)
        {
            let entry = o.output.clone().unwrap();
            assert_eq!(entry.encode_to_vec(), node.encode_to_vec());
            assert_eq!(o.needles, needles.needles);
        }
        let needles: Vec<_> = response.outputs.iter().map(|o| o.needles.clone()).collect();
        assert_eq!(needles, [vec![1], vec![], vec![0, 1]]);
        let (name, node) = crate::castore::directory::Node::from_proto_anonymous(node_of_entry(
            response.outputs[0].output.clone().unwrap(),
        ))
        .unwrap();
        assert!(name.is_none());
        assert_eq!(node, f.outcome.outputs[0].node);
    }

    #[test]
    fn the_extensions_are_the_tvix_layouts_own() {
        let f = crate::wire::tests::finished();
        let response = encode(&f);
        let tvix = crate::wire::seed::encode(Default::default(), &f);
        assert_eq!(response.exit_status, tvix.exit_status);
        assert_eq!(response.timings, tvix.timings);
        assert_eq!(response.log, tvix.log);
        assert!(response.usage.is_some());
        assert_eq!(response.usage, tvix.usage);
        assert!(response.provenance.is_some());
        assert_eq!(response.provenance, tvix.provenance);
        assert_eq!(
            (response.tenant.as_str(), tvix.tenant.as_str()),
            ("alice", "alice")
        );
        // A client built from snix's own proto sees only its outputs.
        let bytes = response.encode_to_vec();
        let upstream = UpstreamResponse::decode(&bytes[..]).unwrap();
        assert_eq!(upstream.outputs.len(), 3);
    }

    /// snix's `BuildResponse` without our extensions, as snix's own clients decode it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct UpstreamResponse {
        #[prost(message, repeated, tag = "1")]
        outputs: Vec<pb::build_response::Output>,
    }
}
