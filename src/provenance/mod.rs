//! Signed provenance of a build: what ran, with which inputs, kernel and isolation, and what
//! came out, as an in-toto Statement with a SLSA Provenance v1 predicate in a DSSE envelope
//! signed with the host's Ed25519 key (see docs/provenance.md).
//!
//! - [`nar`]: the NAR serialisation of castore nodes and host paths, hashed as it streams.

pub mod nar;
