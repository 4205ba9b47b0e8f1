//! Checking a signed statement against what a tenant holds: the `Build` the service
//! answered (its outputs' castore nodes) or output trees on disk (their NAR hashes).
//!
//! Every difference is reported, each naming the subject or output and both values; the
//! caller decides what is fatal (`verify` fails on any).

use super::dsse::{DsseError, Envelope};
use super::nar::{self, NarError, NarWriter};
use super::statement::{Statement, CASTORE_BLAKE3, NAR_SHA256, PREDICATE_TYPE, STATEMENT_TYPE};
use crate::castore::directory::Node;
use ed25519_dalek::VerifyingKey;
use std::fmt;
use std::path::PathBuf;

/// Why a statement could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Signature(#[from] DsseError),
    #[error("the signed payload is not an in-toto statement")]
    NotStatement(#[source] serde_json::Error),
    #[error("the statement's {field} is {got:?}, not {want:?}")]
    WrongType {
        field: &'static str,
        got: String,
        want: &'static str,
    },
}

/// The statement of an envelope whose signature verifies with `key`.
pub fn open(envelope: &Envelope, key: &VerifyingKey) -> Result<Statement, OpenError> {
    let payload = envelope.verify(key)?;
    parse_statement(&payload)
}

/// The statement in a payload, checked to be an in-toto v1 statement with a SLSA v1
/// provenance predicate.
pub fn parse_statement(payload: &[u8]) -> Result<Statement, OpenError> {
    let s: Statement = serde_json::from_slice(payload).map_err(OpenError::NotStatement)?;
    if s.type_ != STATEMENT_TYPE {
        return Err(OpenError::WrongType {
            field: "_type",
            got: s.type_,
            want: STATEMENT_TYPE,
        });
    }
    if s.predicate_type != PREDICATE_TYPE {
        return Err(OpenError::WrongType {
            field: "predicateType",
            got: s.predicate_type,
            want: PREDICATE_TYPE,
        });
    }
    Ok(s)
}

/// One difference between the statement and what it was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// An output of the build that no subject names.
    Unattested { output: String },
    /// A subject that names no output of the build.
    NotAnOutput { subject: String },
    /// A subject whose digest differs from the output's.
    Digest {
        subject: String,
        algorithm: &'static str,
        statement: String,
        actual: String,
    },
    /// A subject that says it is another kind of node (file, directory, symlink).
    Kind {
        subject: String,
        statement: String,
        actual: &'static str,
    },
    /// A subject that lacks the digest needed to compare it.
    NoDigest {
        subject: String,
        algorithm: &'static str,
    },
    /// A path on disk whose NAR hash is no subject's.
    PathUnattested { path: PathBuf, nar_sha256: String },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Unattested { output } => {
                write!(f, "output {output}: no subject of the statement names it")
            }
            Mismatch::NotAnOutput { subject } => {
                write!(f, "subject {subject}: not an output of the build")
            }
            Mismatch::Digest {
                subject,
                algorithm,
                statement,
                actual,
            } => write!(
                f,
                "subject {subject}: {algorithm} differs: the statement says {statement}, the output has {actual}"
            ),
            Mismatch::Kind {
                subject,
                statement,
                actual,
            } => write!(
                f,
                "subject {subject}: the statement says it is a {statement}, the output is a {actual}"
            ),
            Mismatch::NoDigest { subject, algorithm } => {
                write!(f, "subject {subject}: has no {algorithm} digest to compare")
            }
            Mismatch::PathUnattested { path, nar_sha256 } => write!(
                f,
                "path {}: its NAR sha256 {nar_sha256} is no subject's",
                path.display()
            ),
        }
    }
}

/// Whether subject `name` (a request path, e.g. `nix/store/x-out`) names output `output`
/// (a request path, or a basename as the seed layout names outputs).
fn names(subject: &str, output: &str) -> bool {
    let subject = subject.trim_start_matches('/');
    let output = output.trim_start_matches('/');
    subject == output || subject.rsplit('/').next() == Some(output) && !output.contains('/')
}

fn hex(b: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(b)
}

/// The NAR sha256 of a symlink node (computable without a store).
fn symlink_nar(target: &[u8]) -> String {
    let mut w = NarWriter::new(nar::HashSink::default());
    w.symlink(target);
    w.into_sink().finish().sha256_hex()
}

/// Compares the subjects with a build's outputs: `(name, node)`, named as the Build names
/// them. Files and directories compare by castore digest, symlinks by the NAR hash of
/// their target.
pub fn against_outputs(statement: &Statement, outputs: &[(String, Node)]) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let mut used = vec![false; statement.subject.len()];
    for (name, node) in outputs {
        let found = statement
            .subject
            .iter()
            .enumerate()
            .find(|(i, s)| !used[*i] && s.name.as_deref().is_some_and(|s| names(s, name)));
        let Some((i, subject)) = found else {
            out.push(Mismatch::Unattested {
                output: name.clone(),
            });
            continue;
        };
        used[i] = true;
        let subject_name = subject.name.clone().unwrap_or_default();
        let kind = super::statement::kind(node);
        let said_kind = subject
            .annotations
            .as_ref()
            .and_then(|a| a.get("type"))
            .and_then(|t| t.as_str());
        if let Some(said) = said_kind.filter(|k| *k != kind) {
            out.push(Mismatch::Kind {
                subject: subject_name,
                statement: said.to_owned(),
                actual: kind,
            });
            continue;
        }
        let (algorithm, actual) = match node {
            Node::Symlink { target } => (NAR_SHA256, symlink_nar(target.as_bytes())),
            Node::File { digest, .. } | Node::Directory { digest, .. } => {
                (CASTORE_BLAKE3, hex(digest.as_bytes()))
            }
        };
        match subject.digest.get(algorithm) {
            None => out.push(Mismatch::NoDigest {
                subject: subject_name,
                algorithm,
            }),
            Some(said) if !said.eq_ignore_ascii_case(&actual) => out.push(Mismatch::Digest {
                subject: subject_name,
                algorithm,
                statement: said.clone(),
                actual,
            }),
            Some(_) => {}
        }
    }
    for (s, used) in statement.subject.iter().zip(used) {
        if !used {
            out.push(Mismatch::NotAnOutput {
                subject: s.name.clone().unwrap_or_default(),
            });
        }
    }
    out
}

/// Compares output trees on disk with the subjects by NAR hash. A path whose file name is
/// a subject's basename is compared with that subject; any other path must have the NAR
/// hash of some subject.
pub fn against_paths(statement: &Statement, paths: &[PathBuf]) -> Result<Vec<Mismatch>, NarError> {
    let mut out = Vec::new();
    for path in paths {
        let actual = nar::hash_path(path)?.sha256_hex();
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let by_name = file_name.as_deref().and_then(|n| {
            statement
                .subject
                .iter()
                .find(|s| s.name.as_deref().is_some_and(|s| names(s, n)))
        });
        match by_name {
            Some(subject) => {
                let subject_name = subject.name.clone().unwrap_or_default();
                match subject.digest.get(NAR_SHA256) {
                    None => out.push(Mismatch::NoDigest {
                        subject: subject_name,
                        algorithm: NAR_SHA256,
                    }),
                    Some(said) if !said.eq_ignore_ascii_case(&actual) => {
                        out.push(Mismatch::Digest {
                            subject: subject_name,
                            algorithm: NAR_SHA256,
                            statement: said.clone(),
                            actual: format!("{actual} (at {})", path.display()),
                        })
                    }
                    Some(_) => {}
                }
            }
            None => {
                let any = statement.subject.iter().any(|s| {
                    s.digest
                        .get(NAR_SHA256)
                        .is_some_and(|d| d.eq_ignore_ascii_case(&actual))
                });
                if !any {
                    out.push(Mismatch::PathUnattested {
                        path: path.clone(),
                        nar_sha256: actual,
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
