//! Signing a finished build: its facts gathered from the request as the client sent it,
//! the host's configuration and the outcome; the outputs' NAR hashes streamed from the
//! castore; the statement signed and stored in the castore as a blob.

use super::dsse::Envelope;
use super::keys::key_id;
use super::nar::{hash_node, NarError};
use super::statement::{BuildFacts, Dependency, Statement, Subject, VmDetails};
use super::EnvelopeRef;
use crate::castore::Error as CastoreError;
use crate::request::BuildRequest;
use crate::runner::policy::Decision;
use crate::runner::{BuildOutcome, Runner};
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("hashing {what} {path}")]
    Artifact {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the NAR hash of output {output}")]
    Nar {
        output: String,
        #[source]
        source: NarError,
    },
    #[error("storing the signed provenance in the castore")]
    Store(#[source] CastoreError),
    #[error("storing the signed provenance in the castore")]
    StoreIo(#[source] std::io::Error),
}

/// The request as the client sent it: its dialect, its proto3 JSON and the sha256 of its
/// protobuf encoding.
#[derive(Clone, Debug)]
pub struct Origin {
    pub dialect: &'static str,
    pub request: serde_json::Value,
    pub sha256: [u8; 32],
}

impl Origin {
    /// `wire` is the decoded request message; its encoding is prost's canonical one (fields
    /// in number order), which is also what a client library sends.
    pub fn of<M: prost::Message + serde::Serialize>(dialect: &'static str, wire: &M) -> Self {
        Self {
            dialect,
            // Generated messages always serialise (map keys are strings).
            request: serde_json::to_value(wire).unwrap_or(serde_json::Value::Null),
            sha256: Sha256::digest(wire.encode_to_vec()).into(),
        }
    }
}

/// What the host runs every build with, read once.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// `qemu` or `cloud-hypervisor`.
    pub vmm: &'static str,
    /// The VMM's own version line.
    pub vmm_version: String,
    /// The kernel, initrd and agent, by sha256.
    pub artifacts: Vec<Dependency>,
}

impl HostFacts {
    pub fn read(
        vmm: &'static str,
        vmm_version: String,
        kernel: &Path,
        initrd: &Path,
        agent: &Path,
    ) -> Result<Self, AttestError> {
        let artifacts = [("kernel", kernel), ("initrd", initrd), ("agent", agent)]
            .into_iter()
            .map(|(what, path)| {
                sha256_file(path)
                    .map(|d| Dependency::file(what, &d))
                    .map_err(|source| AttestError::Artifact {
                        what,
                        path: path.to_owned(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vmm,
            vmm_version,
            artifacts,
        })
    }
}

fn sha256_file(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

/// One finished build as the attestor needs it.
pub struct Record<'a> {
    pub id: &'a str,
    pub origin: &'a Origin,
    pub request: &'a BuildRequest,
    pub decision: &'a Decision,
    pub outcome: &'a BuildOutcome,
    pub started: SystemTime,
    pub finished: SystemTime,
}

/// A signed statement and where it was stored.
pub struct Attested {
    /// The envelope's JSON form, as stored.
    pub json: Vec<u8>,
    pub stored: EnvelopeRef,
}

/// Signs the builds of one host. The key stays in this process: nothing of it reaches a
/// VM, a runtime directory or a log.
pub struct Attestor {
    key: SigningKey,
    key_id: String,
    builder_id: String,
    host: HostFacts,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("key_id", &self.key_id)
            .field("builder_id", &self.builder_id)
            .finish_non_exhaustive()
    }
}

impl Attestor {
    pub fn new(key: SigningKey, builder_id: String, host: HostFacts) -> Self {
        let key_id = key_id(&key.verifying_key());
        Self {
            key,
            key_id,
            builder_id,
            host,
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The statement of a successful build, signed and stored in the runner's castore.
    pub async fn attest(&self, runner: &Runner, r: Record<'_>) -> Result<Attested, AttestError> {
        let (blobs, dirs) = (runner.blobs(), runner.dirs());
        let mut outputs = Vec::with_capacity(r.outcome.outputs.len());
        for o in &r.outcome.outputs {
            // Streamed from the castore: an output is never held in memory whole.
            let nar = hash_node(&**blobs, &**dirs, &o.node)
                .await
                .map_err(|source| AttestError::Nar {
                    output: o.path.to_string(),
                    source,
                })?;
            outputs.push(Subject {
                path: o.path.to_string(),
                node: o.node.clone(),
                nar,
            });
        }
        let config = runner.config();
        let shape = r.decision.shape();
        let limits = &config.session_limits;
        let mut limit_figures = BTreeMap::from([
            (
                "memoryBytes".to_owned(),
                crate::runner::job::build_memory_bytes(shape),
            ),
            ("processes".to_owned(), crate::runner::job::MAX_PROCESSES),
            ("logBytes".to_owned(), limits.max_log_bytes),
            (
                "outputBytes".to_owned(),
                config.harvest_limits.max_total_bytes,
            ),
        ]);
        if let Some(wall) = limits.wall {
            limit_figures.insert("wallSeconds".to_owned(), wall.as_secs());
        }
        if let Some(silence) = limits.silence {
            limit_figures.insert("silenceSeconds".to_owned(), silence.as_secs());
        }
        let facts = BuildFacts {
            builder_id: self.builder_id.clone(),
            build_id: r.id.to_owned(),
            request: r.origin.request.clone(),
            request_sha256: r.origin.sha256,
            dialect: r.origin.dialect.to_owned(),
            inputs: r
                .request
                .inputs
                .iter()
                .map(|(name, node)| Dependency::input(name.to_string(), node))
                .collect(),
            vm_artifacts: self.host.artifacts.clone(),
            outputs,
            started: r.started,
            finished: r.finished,
            vm: VmDetails {
                vmm: self.host.vmm.to_owned(),
                vmm_version: self.host.vmm_version.clone(),
                accelerator: config.accel.qemu_name().to_owned(),
                vcpus: config.vcpus,
                memory_bytes: u64::from(shape.memory_mib) << 20,
                limits: limit_figures,
                network: shape.network,
            },
        };
        let envelope = Envelope::sign(&Statement::new(&facts).to_payload(), &self.key);
        let json = envelope.to_json();
        let mut writer = blobs.open_write().await.map_err(AttestError::Store)?;
        writer
            .write_all(&json)
            .await
            .map_err(AttestError::StoreIo)?;
        let digest = writer.close().await.map_err(AttestError::Store)?;
        Ok(Attested {
            stored: EnvelopeRef {
                digest,
                size: json.len() as u64,
                key_id: self.key_id.clone(),
            },
            json,
        })
    }
}
