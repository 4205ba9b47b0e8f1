//! Signed provenance of a build: what ran, with which inputs, kernel and isolation, and what
//! came out, as an in-toto Statement with a SLSA Provenance v1 predicate in a DSSE envelope
//! signed with the host's Ed25519 key (see docs/provenance.md).
//!
//! - [`nar`]: the NAR serialisation of castore nodes and host paths, hashed as it streams.
//! - [`statement`]: the in-toto Statement v1 / SLSA Provenance v1 types and how a build's
//!   facts fill them.
//! - [`dsse`]: the DSSE envelope, signing and verifying (Ed25519 over the PAE).
//! - [`keys`]: loading the host's key pair, and `keygen`.
//! - [`check`]: a signed statement against a Build's outputs or trees on disk.

pub mod check;
pub mod dsse;
pub mod keys;
pub mod nar;
pub mod statement;
