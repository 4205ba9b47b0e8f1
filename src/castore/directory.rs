//! Directory and Node domain types that can only hold valid values.
//!
//! A [`Directory`] maps validated names ([`PathComponent`]) to [`Node`]s, so sorting and
//! uniqueness hold by construction; conversion from the wire type checks every rule of
//! `tvix.castore.v1` and names the offending entry.

use super::digest::DigestError;
use super::B3Digest;
use crate::proto::castore as pb;
use bytes::Bytes;
use prost::Message;
use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

/// Longest allowed name of a directory entry, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest allowed symlink target, in bytes.
pub const MAX_SYMLINK_TARGET_LEN: usize = 4095;

/// Why a name is not a valid path component.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is `.` or `..`")]
    Dot,
    #[error("name has {0} bytes, at most 255 are allowed")]
    TooLong(usize),
    #[error("name contains a NUL byte")]
    ContainsNul,
    #[error("name contains `/`")]
    ContainsSlash,
}

/// Why a symlink target is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum SymlinkTargetError {
    #[error("symlink target is empty")]
    Empty,
    #[error("symlink target has {0} bytes, at most 4095 are allowed")]
    TooLong(usize),
    #[error("symlink target contains a NUL byte")]
    ContainsNul,
}

/// Bytes shown with non-printable characters escaped, for error messages about names.
#[derive(Clone, PartialEq, Eq)]
pub struct Escaped(pub Bytes);

impl fmt::Display for Escaped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

impl fmt::Debug for Escaped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A violated rule of `tvix.castore.v1`, naming the entry it concerns.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ValidationError {
    #[error("entry {name}: invalid name")]
    InvalidName {
        name: Escaped,
        #[source]
        source: NameError,
    },
    #[error("entry {name}: invalid digest")]
    InvalidDigest {
        name: Escaped,
        #[source]
        source: DigestError,
    },
    #[error("entry {name}: invalid symlink")]
    InvalidSymlinkTarget {
        name: Escaped,
        #[source]
        source: SymlinkTargetError,
    },
    #[error("entry {name} appears more than once")]
    DuplicateName { name: Escaped },
    #[error("entry {name} is not sorted: it comes after {previous} in the same list")]
    WrongSorting { name: Escaped, previous: Escaped },
    #[error("entry {name}: the directory size overflows 64 bits")]
    SizeOverflow { name: Escaped },
    #[error("entry {name}: directory size {size} is smaller than {expected}, the size of directory {digest}")]
    UndersizedDirectory {
        name: Escaped,
        digest: B3Digest,
        size: u64,
        expected: u64,
    },
    #[error("node {name} has no type (the `node` oneof is unset)")]
    NoNodeType { name: Escaped },
}

/// The rules one kind of validated bytes must satisfy (see [`ValidBytes`]).
pub trait BytesRule {
    type Error;
    fn check(b: &[u8]) -> Result<(), Self::Error>;
}

/// Bytes that satisfied the rule `R` when they were made, so holding one proves it: the
/// constructors are the only way in and all of them check.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValidBytes<R>(Bytes, std::marker::PhantomData<R>);

/// The rule of a path component: not empty, not `.` or `..`, at most 255 bytes, no NUL, no `/`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct NameRule;

impl BytesRule for NameRule {
    type Error = NameError;
    fn check(b: &[u8]) -> Result<(), NameError> {
        if b.is_empty() {
            Err(NameError::Empty)
        } else if b == b"." || b == b".." {
            Err(NameError::Dot)
        } else if b.len() > MAX_NAME_LEN {
            Err(NameError::TooLong(b.len()))
        } else if b.contains(&0) {
            Err(NameError::ContainsNul)
        } else if b.contains(&b'/') {
            Err(NameError::ContainsSlash)
        } else {
            Ok(())
        }
    }
}

/// The rule of a symlink target: not empty, at most 4095 bytes, no NUL.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TargetRule;

impl BytesRule for TargetRule {
    type Error = SymlinkTargetError;
    fn check(b: &[u8]) -> Result<(), SymlinkTargetError> {
        if b.is_empty() {
            Err(SymlinkTargetError::Empty)
        } else if b.len() > MAX_SYMLINK_TARGET_LEN {
            Err(SymlinkTargetError::TooLong(b.len()))
        } else if b.contains(&0) {
            Err(SymlinkTargetError::ContainsNul)
        } else {
            Ok(())
        }
    }
}

/// One path component (the name of a directory entry).
pub type PathComponent = ValidBytes<NameRule>;
/// The target of a symlink.
pub type SymlinkTarget = ValidBytes<TargetRule>;

impl<R: BytesRule> ValidBytes<R> {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl<R: BytesRule> TryFrom<Bytes> for ValidBytes<R> {
    type Error = R::Error;
    fn try_from(b: Bytes) -> Result<Self, R::Error> {
        R::check(&b)?;
        Ok(Self(b, std::marker::PhantomData))
    }
}

impl<R: BytesRule> TryFrom<&[u8]> for ValidBytes<R> {
    type Error = R::Error;
    fn try_from(b: &[u8]) -> Result<Self, R::Error> {
        R::check(b)?;
        Ok(Self(Bytes::copy_from_slice(b), std::marker::PhantomData))
    }
}

impl<R: BytesRule> TryFrom<&str> for ValidBytes<R> {
    type Error = R::Error;
    fn try_from(s: &str) -> Result<Self, R::Error> {
        Self::try_from(s.as_bytes())
    }
}

impl<R: BytesRule> TryFrom<Vec<u8>> for ValidBytes<R> {
    type Error = R::Error;
    fn try_from(b: Vec<u8>) -> Result<Self, R::Error> {
        R::check(&b)?;
        Ok(Self(Bytes::from(b), std::marker::PhantomData))
    }
}

impl<R> From<ValidBytes<R>> for Bytes {
    fn from(p: ValidBytes<R>) -> Bytes {
        p.0
    }
}

impl<R> AsRef<[u8]> for ValidBytes<R> {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

// Ord of `Bytes` is the byte-wise order of the slice, so borrowing as `[u8]` keeps a map's
// order consistent.
impl<R: Ord> Borrow<[u8]> for ValidBytes<R> {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl<R> fmt::Display for ValidBytes<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

impl<R> fmt::Debug for ValidBytes<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// A node without its name (the name lives in the parent directory or the request).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Node {
    /// `size` is the value recorded in the parent (see [`Directory::size`]); it may be larger
    /// than the spec value when it came from newer tvix versions.
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

impl Node {
    /// Validates a wire node that carries a name (an entry, or a named root node).
    pub fn from_proto(node: pb::Node) -> Result<(PathComponent, Node), ValidationError> {
        use pb::node::Node as N;
        match node.node {
            None => Err(ValidationError::NoNodeType {
                name: Escaped(Bytes::new()),
            }),
            Some(N::Directory(d)) => from_directory_node(d),
            Some(N::File(f)) => from_file_node(f),
            Some(N::Symlink(s)) => from_symlink_node(s),
        }
    }

    /// Validates a wire node whose name may be empty (an anonymous node); a non-empty name
    /// must be valid.
    pub fn from_proto_anonymous(
        node: pb::Node,
    ) -> Result<(Option<PathComponent>, Node), ValidationError> {
        use pb::node::Node as N;
        let placeholder = Bytes::from_static(b"_");
        let (raw_name, named) = match node.node {
            None => {
                return Err(ValidationError::NoNodeType {
                    name: Escaped(Bytes::new()),
                })
            }
            Some(N::Directory(mut d)) => {
                let n = std::mem::replace(&mut d.name, placeholder);
                (n, from_directory_node(d))
            }
            Some(N::File(mut f)) => {
                let n = std::mem::replace(&mut f.name, placeholder);
                (n, from_file_node(f))
            }
            Some(N::Symlink(mut l)) => {
                let n = std::mem::replace(&mut l.name, placeholder);
                (n, from_symlink_node(l))
            }
        };
        let (_, node) = named.map_err(|e| rename_error(e, &raw_name))?;
        if raw_name.is_empty() {
            return Ok((None, node));
        }
        Ok((Some(name_of(raw_name)?), node))
    }

    /// The wire node with the given name (empty for an anonymous node).
    pub fn to_proto(&self, name: Bytes) -> pb::Node {
        use pb::node::Node as N;
        let node = match self {
            Node::Directory { digest, size } => N::Directory(pb::DirectoryNode {
                name,
                digest: (*digest).into(),
                size: *size,
            }),
            Node::File {
                digest,
                size,
                executable,
            } => N::File(pb::FileNode {
                name,
                digest: (*digest).into(),
                size: *size,
                executable: *executable,
            }),
            Node::Symlink { target } => N::Symlink(pb::SymlinkNode {
                name,
                target: target.0.clone(),
            }),
        };
        pb::Node { node: Some(node) }
    }

    /// The digest of a directory or file node; `None` for a symlink.
    pub fn digest(&self) -> Option<&B3Digest> {
        match self {
            Node::Directory { digest, .. } | Node::File { digest, .. } => Some(digest),
            Node::Symlink { .. } => None,
        }
    }
}

/// Puts the real name back into an error raised while the name was a placeholder.
fn rename_error(e: ValidationError, name: &Bytes) -> ValidationError {
    let n = Escaped(name.clone());
    match e {
        ValidationError::InvalidDigest { source, .. } => {
            ValidationError::InvalidDigest { name: n, source }
        }
        ValidationError::InvalidSymlinkTarget { source, .. } => {
            ValidationError::InvalidSymlinkTarget { name: n, source }
        }
        other => other,
    }
}

fn name_of(raw: Bytes) -> Result<PathComponent, ValidationError> {
    PathComponent::try_from(raw.clone()).map_err(|source| ValidationError::InvalidName {
        name: Escaped(raw),
        source,
    })
}

fn digest_of(name: &PathComponent, raw: &Bytes) -> Result<B3Digest, ValidationError> {
    B3Digest::try_from(raw).map_err(|source| ValidationError::InvalidDigest {
        name: Escaped(name.0.clone()),
        source,
    })
}

fn from_directory_node(d: pb::DirectoryNode) -> Result<(PathComponent, Node), ValidationError> {
    let name = name_of(d.name)?;
    let digest = digest_of(&name, &d.digest)?;
    Ok((
        name,
        Node::Directory {
            digest,
            size: d.size,
        },
    ))
}

fn from_file_node(f: pb::FileNode) -> Result<(PathComponent, Node), ValidationError> {
    let name = name_of(f.name)?;
    let digest = digest_of(&name, &f.digest)?;
    Ok((
        name,
        Node::File {
            digest,
            size: f.size,
            executable: f.executable,
        },
    ))
}

fn from_symlink_node(s: pb::SymlinkNode) -> Result<(PathComponent, Node), ValidationError> {
    let name = name_of(s.name)?;
    let target = SymlinkTarget::try_from(s.target).map_err(|source| {
        ValidationError::InvalidSymlinkTarget {
            name: Escaped(name.0.clone()),
            source,
        }
    })?;
    Ok((name, Node::Symlink { target }))
}

/// A valid directory: unique, valid names; its size (see [`Directory::size`]) fits in 64 bits.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Directory {
    nodes: BTreeMap<PathComponent, Node>,
    /// Number of entries plus the recorded sizes of the child directories; kept up to date
    /// by `try_insert`, which refuses an entry that would overflow it.
    size: u64,
}

impl Directory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry; fails if the name is taken or the size would overflow.
    pub fn try_insert(&mut self, name: PathComponent, node: Node) -> Result<(), ValidationError> {
        let child = match &node {
            Node::Directory { size, .. } => *size,
            _ => 0,
        };
        let size = self
            .size
            .checked_add(1)
            .and_then(|s| s.checked_add(child))
            .ok_or_else(|| ValidationError::SizeOverflow {
                name: Escaped(name.0.clone()),
            })?;
        match self.nodes.entry(name) {
            std::collections::btree_map::Entry::Occupied(e) => {
                Err(ValidationError::DuplicateName {
                    name: Escaped(e.key().0.clone()),
                })
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(node);
                self.size = size;
                Ok(())
            }
        }
    }

    /// The entries, sorted by name.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = (&PathComponent, &Node)> + '_ {
        self.nodes.iter()
    }

    /// The entries of type directory, sorted by name, with their digest and recorded size.
    pub fn directories(&self) -> impl Iterator<Item = (&PathComponent, &B3Digest, u64)> + '_ {
        self.nodes.iter().filter_map(|(n, node)| match node {
            Node::Directory { digest, size } => Some((n, digest, *size)),
            _ => None,
        })
    }

    /// The entry named `name`, if any.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The value a `DirectoryNode.size` pointing here should carry: the number of entries
    /// plus the sizes recorded for the child directories (the spec's definition).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The canonical wire form (each list sorted by name, proto3 defaults left out).
    pub fn to_proto(&self) -> pb::Directory {
        let mut out = pb::Directory::default();
        for (name, node) in &self.nodes {
            let name = name.0.clone();
            match node {
                Node::Directory { digest, size } => out.directories.push(pb::DirectoryNode {
                    name,
                    digest: (*digest).into(),
                    size: *size,
                }),
                Node::File {
                    digest,
                    size,
                    executable,
                } => out.files.push(pb::FileNode {
                    name,
                    digest: (*digest).into(),
                    size: *size,
                    executable: *executable,
                }),
                Node::Symlink { target } => out.symlinks.push(pb::SymlinkNode {
                    name,
                    target: target.0.clone(),
                }),
            }
        }
        out
    }

    /// The canonical protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// BLAKE3 of the canonical encoding.
    pub fn digest(&self) -> B3Digest {
        B3Digest::of(&self.encode())
    }

    /// A node pointing at this directory, with the spec size.
    pub fn as_node(&self) -> Node {
        Node::Directory {
            digest: self.digest(),
            size: self.size,
        }
    }
}

/// Checks one list is strictly increasing by raw name bytes.
fn check_sorted<'a>(names: impl Iterator<Item = &'a Bytes>) -> Result<(), ValidationError> {
    let mut previous: Option<&Bytes> = None;
    for name in names {
        if let Some(p) = previous {
            if name == p {
                return Err(ValidationError::DuplicateName {
                    name: Escaped(name.clone()),
                });
            }
            if name < p {
                return Err(ValidationError::WrongSorting {
                    name: Escaped(name.clone()),
                    previous: Escaped(p.clone()),
                });
            }
        }
        previous = Some(name);
    }
    Ok(())
}

impl TryFrom<pb::Directory> for Directory {
    type Error = ValidationError;

    fn try_from(d: pb::Directory) -> Result<Self, ValidationError> {
        // Names first, so a bad name is reported as such and not as a sorting problem.
        let all_names = d
            .directories
            .iter()
            .map(|n| &n.name)
            .chain(d.files.iter().map(|n| &n.name))
            .chain(d.symlinks.iter().map(|n| &n.name));
        for name in all_names {
            name_of(name.clone())?;
        }
        check_sorted(d.directories.iter().map(|n| &n.name))?;
        check_sorted(d.files.iter().map(|n| &n.name))?;
        check_sorted(d.symlinks.iter().map(|n| &n.name))?;

        let mut out = Directory::new();
        for n in d.directories {
            let (name, node) = from_directory_node(n)?;
            out.try_insert(name, node)?;
        }
        for n in d.files {
            let (name, node) = from_file_node(n)?;
            out.try_insert(name, node)?;
        }
        for n in d.symlinks {
            let (name, node) = from_symlink_node(n)?;
            out.try_insert(name, node)?;
        }
        Ok(out)
    }
}

impl From<Directory> for pb::Directory {
    fn from(d: Directory) -> pb::Directory {
        d.to_proto()
    }
}

impl From<&Directory> for pb::Directory {
    fn from(d: &Directory) -> pb::Directory {
        d.to_proto()
    }
}

/// Checks that a recorded `DirectoryNode.size` is not smaller than the spec value of the
/// directory it points to (larger values are accepted, as newer tvix versions send them).
pub fn check_child_size(
    name: &PathComponent,
    recorded: u64,
    child: &Directory,
    child_digest: B3Digest,
) -> Result<(), ValidationError> {
    if recorded < child.size() {
        return Err(ValidationError::UndersizedDirectory {
            name: Escaped(name.0.clone()),
            digest: child_digest,
            size: recorded,
            expected: child.size(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// The name of a wire node, whatever its kind (empty when the oneof is unset), for sorting
/// nodes the way the protocols list them.
pub fn proto_node_name(node: &pb::Node) -> &[u8] {
    match &node.node {
        Some(pb::node::Node::Directory(d)) => &d.name,
        Some(pb::node::Node::File(f)) => &f.name,
        Some(pb::node::Node::Symlink(s)) => &s.name,
        None => &[],
    }
}
