//! Signed provenance of a build: what ran, with which inputs, kernel and isolation, and what
//! came out, as an in-toto Statement with a SLSA Provenance v1 predicate in a DSSE envelope
//! signed with the host's Ed25519 key (see docs/provenance.md).
//!
//! - [`nar`]: the NAR serialisation of castore nodes and host paths, hashed as it streams.
//! - [`statement`]: the in-toto Statement v1 / SLSA Provenance v1 types and how a build's
//!   facts fill them.
//! - [`dsse`]: the DSSE envelope, signing and verifying (Ed25519 over the PAE).
//! - [`keys`]: loading the host's key pair, and `keygen`.
//! - [`attest`]: a finished build's facts gathered, signed and stored.
//! - [`check`]: a signed statement against a Build's outputs or trees on disk.

pub mod attest;
pub mod check;
pub mod dsse;
pub mod keys;
pub mod nar;
pub mod statement;

use crate::castore::B3Digest;

/// Where a build's signed envelope was stored: a castore blob holding its JSON form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvelopeRef {
    pub digest: B3Digest,
    pub size: u64,
    /// The signing key's id, as in the envelope.
    pub key_id: String,
}
