//! The in-toto Statement (v1) with a SLSA Provenance (v1) predicate, as serde types.
//!
//! Field names and meanings are the specifications' (in-toto attestation framework v1,
//! SLSA provenance v1); what this service puts into each is in docs/provenance.md. Digests
//! of subjects: `narSha256` (the NAR serialisation's sha256, Nix's narHash, lowercase hex)
//! and `castoreBlake3` (the castore digest of a file's blob or a directory; symlinks have
//! none, their NAR hash covers the target).

use super::nar::NarHash;
use crate::castore::directory::Node;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of SLSA Provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// `buildType` of a build run by this service; the URI names the document that describes
/// its parameters.
pub const BUILD_TYPE: &str = concat!(
    env!("CARGO_PKG_REPOSITORY"),
    "/blob/main/docs/provenance.md#build-type-v1"
);
/// The digest names this service uses.
pub const NAR_SHA256: &str = "narSha256";
pub const CASTORE_BLAKE3: &str = "castoreBlake3";
pub const SHA256: &str = "sha256";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<ResourceDescriptor>,
    pub predicate_type: String,
    pub predicate: Provenance,
}

/// in-toto's ResourceDescriptor (the fields this service uses).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    pub builder: Builder,
    pub metadata: BuildMetadata,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub byproducts: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Builder {
    pub id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMetadata {
    pub invocation_id: String,
    pub started_on: String,
    pub finished_on: String,
}

/// One output of the build as a subject.
#[derive(Debug, Clone)]
pub struct Subject {
    /// The output path as the request named it (relative, e.g. `nix/store/...-out`).
    pub path: String,
    pub node: Node,
    pub nar: NarHash,
}

/// One thing the build used: an input (castore digest) or a piece of the VM (sha256 of the
/// file).
#[derive(Debug, Clone)]
pub struct Dependency {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

impl Dependency {
    /// An input by its castore node (a symlink input has no digest, only its target).
    pub fn input(name: String, node: &Node) -> Self {
        let mut digest = BTreeMap::new();
        if let Some(d) = node.digest() {
            digest.insert(CASTORE_BLAKE3.to_owned(), d.to_hex());
        }
        Self { name, digest }
    }

    /// A host file by its sha256.
    pub fn file(name: &str, sha256: &[u8; 32]) -> Self {
        Self {
            name: name.to_owned(),
            digest: BTreeMap::from([(SHA256.to_owned(), hex(sha256))]),
        }
    }
}

/// How the VM that ran the build was set up: what the host chose and observed, never what
/// the guest said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmDetails {
    /// `qemu` or `cloud-hypervisor`.
    pub vmm: String,
    /// The VMM's own version line, or empty when it could not be asked.
    pub vmm_version: String,
    /// `kvm` or `tcg`: what the VM actually ran on.
    pub accelerator: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// The build's limits: memory cgroup, process count, wall clock, silence, output size.
    pub limits: BTreeMap<String, u64>,
    pub network: bool,
}

/// Everything the statement says about one successful build.
#[derive(Debug, Clone)]
pub struct BuildFacts {
    /// The host's configured builder id (a URI).
    pub builder_id: String,
    pub build_id: String,
    /// The request as the client sent it, in its dialect's proto3 JSON.
    pub request: serde_json::Value,
    /// sha256 of the request's protobuf encoding as received.
    pub request_sha256: [u8; 32],
    /// The request's wire dialect, e.g. `tvix.build.v1 (seed)`.
    pub dialect: String,
    pub inputs: Vec<Dependency>,
    /// Kernel, initrd and agent.
    pub vm_artifacts: Vec<Dependency>,
    pub outputs: Vec<Subject>,
    pub started: SystemTime,
    pub finished: SystemTime,
    pub vm: VmDetails,
}

/// The `type` annotation of a subject.
pub fn kind(node: &Node) -> &'static str {
    match node {
        Node::Directory { .. } => "directory",
        Node::File { .. } => "file",
        Node::Symlink { .. } => "symlink",
    }
}

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

impl Statement {
    pub fn new(facts: &BuildFacts) -> Self {
        let subject = facts
            .outputs
            .iter()
            .map(|o| {
                let mut digest = BTreeMap::from([(NAR_SHA256.to_owned(), o.nar.sha256_hex())]);
                if let Some(d) = o.node.digest() {
                    digest.insert(CASTORE_BLAKE3.to_owned(), d.to_hex());
                }
                let kind = kind(&o.node);
                ResourceDescriptor {
                    name: Some(o.path.clone()),
                    digest,
                    annotations: Some(serde_json::json!({
                        "narSize": o.nar.size,
                        "type": kind,
                    })),
                    ..Default::default()
                }
            })
            .collect();
        let descriptor = |d: &Dependency| ResourceDescriptor {
            name: Some(d.name.clone()),
            digest: d.digest.clone(),
            ..Default::default()
        };
        let resolved_dependencies = facts
            .inputs
            .iter()
            .chain(&facts.vm_artifacts)
            .map(descriptor)
            .collect();
        let vm = serde_json::to_value(&facts.vm).unwrap_or(serde_json::Value::Null);
        Statement {
            type_: STATEMENT_TYPE.to_owned(),
            subject,
            predicate_type: PREDICATE_TYPE.to_owned(),
            predicate: Provenance {
                build_definition: BuildDefinition {
                    build_type: BUILD_TYPE.to_owned(),
                    external_parameters: serde_json::json!({
                        "dialect": facts.dialect,
                        "request": facts.request,
                        "requestDigest": { SHA256: hex(&facts.request_sha256) },
                    }),
                    internal_parameters: None,
                    resolved_dependencies,
                },
                run_details: RunDetails {
                    builder: Builder {
                        id: facts.builder_id.clone(),
                        version: BTreeMap::from([(
                            "tvix-build-vm".to_owned(),
                            env!("CARGO_PKG_VERSION").to_owned(),
                        )]),
                    },
                    metadata: BuildMetadata {
                        invocation_id: facts.build_id.clone(),
                        started_on: rfc3339(facts.started),
                        finished_on: rfc3339(facts.finished),
                    },
                    byproducts: vec![ResourceDescriptor {
                        name: Some("vm".to_owned()),
                        annotations: Some(vm),
                        ..Default::default()
                    }],
                },
            },
        }
    }

    /// The statement as the envelope's payload.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// UTC, microseconds, `Z` (RFC 3339, as SLSA's timestamps are).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// (year, month, day) of a day count since 1970-01-01 in the proleptic Gregorian calendar
/// (the well-known era arithmetic: 400-year eras of 146097 days, years from March).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    // d is in 1..=31 and m in 1..=12 by construction.
    (y, m as u32, d as u32)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::castore::B3Digest;
    use std::time::Duration;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_709_210_096_123_456);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.123456Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(rfc3339(t), "2099-12-31T23:59:59.000000Z");
    }

    pub(crate) fn facts() -> BuildFacts {
        let file = Node::File {
            digest: B3Digest::of(b"out"),
            size: 3,
            executable: false,
        };
        BuildFacts {
            builder_id: "https://builder.example/host-1".into(),
            build_id: "b-1".into(),
            request: serde_json::json!({"commandArgs": ["/bin/true"]}),
            request_sha256: [7; 32],
            dialect: "seed".into(),
            inputs: vec![Dependency::input("in".into(), &file)],
            vm_artifacts: vec![Dependency::file("kernel", &[1; 32])],
            outputs: vec![Subject {
                path: "nix/store/x-out".into(),
                node: file,
                nar: NarHash {
                    sha256: [9; 32],
                    size: 128,
                },
            }],
            started: UNIX_EPOCH,
            finished: UNIX_EPOCH + Duration::from_secs(1),
            vm: VmDetails {
                vmm: "qemu".into(),
                vmm_version: "QEMU emulator version 7.2.0".into(),
                accelerator: "tcg".into(),
                vcpus: 1,
                memory_bytes: 512 << 20,
                limits: BTreeMap::from([("memoryBytes".into(), 256 << 20)]),
                network: false,
            },
        }
    }

    #[test]
    fn a_statement_has_the_specified_shape() {
        let s = Statement::new(&facts());
        let v: serde_json::Value = serde_json::from_slice(&s.to_payload()).unwrap();
        assert_eq!(v["_type"], STATEMENT_TYPE);
        assert_eq!(v["predicateType"], PREDICATE_TYPE);
        assert_eq!(v["subject"][0]["name"], "nix/store/x-out");
        assert_eq!(v["subject"][0]["digest"][NAR_SHA256], "09".repeat(32));
        assert_eq!(
            v["subject"][0]["digest"][CASTORE_BLAKE3],
            B3Digest::of(b"out").to_hex()
        );
        let def = &v["predicate"]["buildDefinition"];
        assert_eq!(def["buildType"], BUILD_TYPE);
        assert_eq!(
            def["externalParameters"]["requestDigest"]["sha256"],
            "07".repeat(32)
        );
        assert_eq!(def["resolvedDependencies"][1]["name"], "kernel");
        let run = &v["predicate"]["runDetails"];
        assert_eq!(run["metadata"]["invocationId"], "b-1");
        assert_eq!(run["metadata"]["finishedOn"], "1970-01-01T00:00:01.000000Z");
        assert_eq!(run["byproducts"][0]["annotations"]["accelerator"], "tcg");
        // And it reads back.
        let back: Statement = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
