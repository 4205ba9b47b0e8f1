//! A directory as the filesystem serves it: entries sorted by raw name bytes (the order of
//! `readdir` and of its offsets), each name a C string ready for the FUSE reply.

use super::error::FsError;
use crate::castore::directory::{Directory, Node};
use crate::castore::B3Digest;
use bytes::Bytes;
use std::ffi::{CStr, CString};

/// A node as the filesystem needs it (castore nodes, minus anything it does not serve).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsNode {
    Directory {
        digest: B3Digest,
    },
    File {
        digest: B3Digest,
        size: u64,
        executable: bool,
    },
    Symlink {
        target: Bytes,
    },
}

impl FsNode {
    /// The filesystem's view of a validated castore node.
    pub fn from_castore(node: &Node) -> Self {
        match node {
            Node::Directory { digest, .. } => FsNode::Directory { digest: *digest },
            Node::File {
                digest,
                size,
                executable,
            } => FsNode::File {
                digest: *digest,
                size: *size,
                executable: *executable,
            },
            Node::Symlink { target } => FsNode::Symlink {
                target: Bytes::copy_from_slice(target.as_bytes()),
            },
        }
    }

    /// The `d_type` of a directory entry for this node.
    pub fn dirent_type(&self) -> u32 {
        u32::from(match self {
            FsNode::Directory { .. } => libc::DT_DIR,
            FsNode::File { .. } => libc::DT_REG,
            FsNode::Symlink { .. } => libc::DT_LNK,
        })
    }
}

/// One named entry of a [`Listing`].
#[derive(Debug)]
pub struct ListingEntry {
    pub name: CString,
    pub node: FsNode,
}

/// The entries of one directory in name order.
#[derive(Debug, Default)]
pub struct Listing {
    entries: Vec<ListingEntry>,
}

impl Listing {
    /// Builds a listing from named nodes in any order. `digest` names the directory in the
    /// error if a name holds a NUL byte (validated castore directories never do). Of entries
    /// with equal names only the first is kept (validated directories have none).
    pub fn from_entries<I>(digest: &B3Digest, entries: I) -> Result<Self, FsError>
    where
        I: IntoIterator<Item = (Vec<u8>, FsNode)>,
    {
        let mut entries = entries
            .into_iter()
            .map(|(name, node)| {
                CString::new(name)
                    .map(|name| ListingEntry { name, node })
                    .map_err(|e| FsError::NameWithNul {
                        digest: *digest,
                        name: e.into_vec(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        entries.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        entries.dedup_by(|later, earlier| later.name == earlier.name);
        Ok(Self { entries })
    }

    /// The entries of a validated castore directory; `digest` names it in errors.
    pub fn from_directory(digest: &B3Digest, dir: &Directory) -> Result<Self, FsError> {
        Self::from_entries(
            digest,
            dir.nodes()
                .map(|(name, node)| (name.as_bytes().to_vec(), FsNode::from_castore(node))),
        )
    }

    /// The entry named `name` and its index.
    pub fn find(&self, name: &CStr) -> Option<(usize, &ListingEntry)> {
        let name = name.to_bytes();
        self.entries
            .binary_search_by(|e| e.name.as_bytes().cmp(name))
            .ok()
            .map(|i| (i, &self.entries[i]))
    }

    /// Entries from index `start` on (empty past the end).
    pub fn from_index(&self, start: usize) -> &[ListingEntry] {
        self.entries.get(start..).unwrap_or(&[])
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(n: u8) -> FsNode {
        FsNode::File {
            digest: B3Digest::of(&[n]),
            size: 1,
            executable: false,
        }
    }

    #[test]
    fn sorts_by_raw_bytes_and_finds_by_name() {
        let d = B3Digest::of(b"dir");
        let l = Listing::from_entries(
            &d,
            vec![
                (b"b".to_vec(), file(1)),
                (vec![0xff], file(2)),
                (b"B".to_vec(), file(3)),
                (b"a".to_vec(), file(4)),
            ],
        )
        .unwrap();
        let names: Vec<&[u8]> = l.from_index(0).iter().map(|e| e.name.as_bytes()).collect();
        assert_eq!(names, vec![&b"B"[..], b"a", b"b", &[0xff]]);
        let (i, e) = l.find(c"b").unwrap();
        assert_eq!((i, &e.node), (2, &file(1)));
        assert!(l.find(c"c").is_none());
        assert!(l.from_index(4).is_empty());
        assert!(l.from_index(99).is_empty());
    }

    #[test]
    fn converts_a_castore_directory() {
        use crate::castore::directory::{PathComponent, SymlinkTarget};
        let mut dir = Directory::new();
        let f = B3Digest::of(b"f");
        let d = B3Digest::of(b"d");
        let add = |dir: &mut Directory, name: &str, node| {
            dir.try_insert(PathComponent::try_from(name).unwrap(), node)
                .unwrap()
        };
        add(&mut dir, "z", Node::Directory { digest: d, size: 3 });
        add(
            &mut dir,
            "exe",
            Node::File {
                digest: f,
                size: 9,
                executable: true,
            },
        );
        add(
            &mut dir,
            "ln",
            Node::Symlink {
                target: SymlinkTarget::try_from("../x").unwrap(),
            },
        );
        let l = Listing::from_directory(&dir.digest(), &dir).unwrap();
        assert_eq!(l.len(), 3);
        let e: Vec<(&[u8], &FsNode)> = l
            .from_index(0)
            .iter()
            .map(|e| (e.name.as_bytes(), &e.node))
            .collect();
        assert_eq!(
            e,
            vec![
                (
                    &b"exe"[..],
                    &FsNode::File {
                        digest: f,
                        size: 9,
                        executable: true
                    }
                ),
                (
                    b"ln",
                    &FsNode::Symlink {
                        target: Bytes::from_static(b"../x")
                    }
                ),
                (b"z", &FsNode::Directory { digest: d }),
            ]
        );
    }

    #[test]
    fn nul_in_a_name_is_an_error_naming_the_directory() {
        let d = B3Digest::of(b"dir");
        let err = Listing::from_entries(&d, vec![(b"a\0b".to_vec(), file(1))]).unwrap_err();
        assert!(matches!(err, FsError::NameWithNul { digest, .. } if digest == d));
    }
}
