//! The rules of a directory closure: uploads go leaves to root and may only reference
//! directories sent before (or already stored; but see [`SameStream`] for the wire);
//! recursive fetches go root to leaves and may only contain directories referenced by one
//! received before, each once.

use crate::castore::directory::{check_child_size, Directory};
use crate::castore::error::ClosureError;
use crate::castore::{B3Digest, Error};
use std::collections::{HashMap, HashSet};
use std::future::Future;

/// Most directories one closure upload may hold; bounds the memory a client can make a
/// server buffer before `close`.
pub const MAX_CLOSURE_DIRECTORIES: usize = 1 << 20;

/// A reference from a directory in an upload to one that is not part of the upload, so it
/// must already be stored.
#[derive(Debug, Clone)]
pub struct ExternalRef {
    pub parent: B3Digest,
    pub name: crate::castore::directory::PathComponent,
    pub child: B3Digest,
    pub recorded_size: u64,
}

/// Checks a closure upload as it arrives.
#[derive(Default)]
pub struct PutValidator {
    received: HashMap<B3Digest, Directory>,
    order: Vec<B3Digest>,
    referenced: HashSet<B3Digest>,
}

impl PutValidator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts the next directory; repeats are ignored. Returns the references the caller
    /// must check against its store (see [`check_stored_refs`]).
    pub fn add(&mut self, dir: Directory) -> Result<Vec<ExternalRef>, Error> {
        let digest = dir.digest();
        if self.received.contains_key(&digest) {
            return Ok(Vec::new());
        }
        if self.received.len() >= MAX_CLOSURE_DIRECTORIES {
            return Err(ClosureError::TooLarge(MAX_CLOSURE_DIRECTORIES).into());
        }
        let mut external = Vec::new();
        for (name, child, recorded) in dir.directories() {
            match self.received.get(child) {
                Some(c) => check_child_size(name, recorded, c, *child)
                    .map_err(|source| Error::invalid_directory(digest, source))?,
                None => external.push(ExternalRef {
                    parent: digest,
                    name: name.clone(),
                    child: *child,
                    recorded_size: recorded,
                }),
            }
            self.referenced.insert(*child);
        }
        self.order.push(digest);
        self.received.insert(digest, dir);
        Ok(external)
    }

    /// Checks there is exactly one root; returns it and the directories in upload order.
    pub fn finish(mut self) -> Result<(B3Digest, Vec<(B3Digest, Directory)>), ClosureError> {
        if self.order.is_empty() {
            return Err(ClosureError::Empty);
        }
        let roots: Vec<B3Digest> = self
            .order
            .iter()
            .filter(|d| !self.referenced.contains(d))
            .copied()
            .collect();
        let [root] = roots[..] else {
            return Err(ClosureError::RootCount(roots.len()));
        };
        let dirs = self
            .order
            .iter()
            .filter_map(|d| self.received.remove(d).map(|dir| (*d, dir)))
            .collect();
        Ok((root, dirs))
    }
}

/// Checks references out of an upload against a store: each target must be present and
/// not smaller than recorded.
pub async fn check_stored_refs<F, Fut>(refs: Vec<ExternalRef>, mut get: F) -> Result<(), Error>
where
    F: FnMut(B3Digest) -> Fut,
    Fut: Future<Output = Result<Option<Directory>, Error>>,
{
    for r in refs {
        match get(r.child).await? {
            None => {
                return Err(ClosureError::DanglingReference {
                    parent: r.parent,
                    name: r.name.to_string(),
                    child: r.child,
                }
                .into())
            }
            Some(c) => check_child_size(&r.name, r.recorded_size, &c, r.child)
                .map_err(|source| Error::invalid_directory(r.parent, source))?,
        }
    }
    Ok(())
}

/// The Put contract of the castore gRPC protocol (tvix's and snix's `rpc_directory.proto`):
/// a Directory may only refer to Directories sent before it *in the same stream*, so a
/// stream always carries a whole closure. Stored backends also accept references to
/// directories they already hold ([`PutValidator`]); the wire does not, so the server checks
/// every Put stream with this, and the gRPC client checks what it sends.
#[derive(Default)]
pub struct SameStream {
    sent: HashSet<B3Digest>,
}

impl SameStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts the next directory of the stream (`digest` is its digest), or names the
    /// first child that was not sent before it. The set stays as large as the upload,
    /// which the store bounds ([`MAX_CLOSURE_DIRECTORIES`]).
    pub fn check(&mut self, digest: B3Digest, dir: &Directory) -> Result<(), ClosureError> {
        if let Some((name, child, _)) = dir
            .directories()
            .find(|(_, child, _)| !self.sent.contains(*child))
        {
            return Err(ClosureError::NotInStream {
                parent: digest,
                name: name.to_string(),
                child: *child,
            });
        }
        self.sent.insert(digest);
        Ok(())
    }
}

/// Checks the directories of a recursive fetch as they arrive (root first).
pub struct GetValidator {
    /// Directories referenced but not yet received, with the smallest size recorded for
    /// each and the entry name that recorded it.
    expected: HashMap<B3Digest, Option<(crate::castore::directory::PathComponent, u64)>>,
    /// Received directories and their spec sizes, to check later references to them.
    received: HashMap<B3Digest, u64>,
}

impl GetValidator {
    pub fn new(root: B3Digest) -> Self {
        Self {
            expected: HashMap::from([(root, None)]),
            received: HashMap::new(),
        }
    }

    /// Accepts the next directory, or says why it must be refused.
    pub fn accept(&mut self, dir: &Directory) -> Result<B3Digest, Error> {
        let digest = dir.digest();
        let Some(recorded) = self.expected.remove(&digest) else {
            return Err(if self.received.contains_key(&digest) {
                ClosureError::Repeated(digest)
            } else {
                ClosureError::Unexpected(digest)
            }
            .into());
        };
        if let Some((name, size)) = recorded {
            check_child_size(&name, size, dir, digest)
                .map_err(|source| Error::invalid_directory(digest, source))?;
        }
        self.received.insert(digest, dir.size());
        for (name, child, size) in dir.directories() {
            if let Some(&actual) = self.received.get(child) {
                if size < actual {
                    return Err(Error::invalid_directory(
                        digest,
                        crate::castore::directory::ValidationError::UndersizedDirectory {
                            name: crate::castore::directory::Escaped(name.clone().into_bytes()),
                            digest: *child,
                            size,
                            expected: actual,
                        },
                    ));
                }
                continue;
            }
            let slot = self.expected.entry(*child).or_insert(None);
            match slot {
                Some((_, s)) if *s <= size => {}
                _ => *slot = Some((name.clone(), size)),
            }
        }
        Ok(digest)
    }

    /// Checks nothing referenced is missing.
    pub fn finish(self) -> Result<(), Error> {
        match self.expected.keys().next() {
            Some(d) => Err(ClosureError::Missing(*d).into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::directory::{Node, PathComponent};

    fn leaf(n: &str) -> Directory {
        let mut d = Directory::new();
        d.try_insert(
            PathComponent::try_from(n).unwrap(),
            Node::File {
                digest: B3Digest::of(n.as_bytes()),
                size: 1,
                executable: false,
            },
        )
        .unwrap();
        d
    }

    fn parent(children: &[(&str, &Directory, u64)]) -> Directory {
        let mut d = Directory::new();
        for (n, c, size) in children {
            d.try_insert(
                PathComponent::try_from(*n).unwrap(),
                Node::Directory {
                    digest: c.digest(),
                    size: *size,
                },
            )
            .unwrap();
        }
        d
    }

    fn closure_err(e: Error) -> ClosureError {
        match e {
            Error::InvalidClosure(c) => c,
            other => panic!("expected a closure error, got {other:?}"),
        }
    }

    #[test]
    fn put_reports_external_refs_and_one_root() {
        let a = leaf("a");
        let b = leaf("b");
        let root = parent(&[("a", &a, 1), ("b", &b, 1)]);
        let mut v = PutValidator::new();
        assert!(v.add(a.clone()).unwrap().is_empty());
        let ext = v.add(root.clone()).unwrap();
        assert_eq!(ext.len(), 1);
        assert_eq!(ext[0].child, b.digest());
        let (r, dirs) = v.finish().unwrap();
        assert_eq!(r, root.digest());
        assert_eq!(dirs.len(), 2);
    }

    #[test]
    fn put_rejects_empty_two_roots_and_undersized() {
        assert_eq!(
            PutValidator::new().finish().unwrap_err(),
            ClosureError::Empty
        );
        let mut v = PutValidator::new();
        v.add(leaf("a")).unwrap();
        v.add(leaf("b")).unwrap();
        assert_eq!(v.finish().unwrap_err(), ClosureError::RootCount(2));
        let a = leaf("a");
        let mut v = PutValidator::new();
        v.add(a.clone()).unwrap();
        assert!(matches!(
            v.add(parent(&[("a", &a, 0)])),
            Err(Error::InvalidDirectory { .. })
        ));
    }

    #[test]
    fn same_stream_names_a_child_not_sent_before() {
        let a = leaf("a");
        let b = leaf("b");
        let root = parent(&[("a", &a, 1), ("b", &b, 1)]);
        let mut s = SameStream::new();
        s.check(a.digest(), &a).unwrap();
        assert_eq!(
            s.check(root.digest(), &root).unwrap_err(),
            ClosureError::NotInStream {
                parent: root.digest(),
                name: "b".into(),
                child: b.digest(),
            }
        );
        // A repeat is fine; once `b` came, the root may follow.
        s.check(a.digest(), &a).unwrap();
        s.check(b.digest(), &b).unwrap();
        s.check(root.digest(), &root).unwrap();
        // A new stream knows nothing of the last one.
        let mut s = SameStream::new();
        assert!(matches!(
            s.check(root.digest(), &root),
            Err(ClosureError::NotInStream { .. })
        ));
    }

    #[test]
    fn get_rejects_repeated_unexpected_missing_and_undersized() {
        let c = leaf("c");
        let a = parent(&[("c", &c, 1)]);
        let root = parent(&[("a", &a, 2), ("c", &c, 1)]);

        let mut v = GetValidator::new(root.digest());
        assert_eq!(
            closure_err(v.accept(&a).unwrap_err()),
            ClosureError::Unexpected(a.digest())
        );

        let mut v = GetValidator::new(root.digest());
        v.accept(&root).unwrap();
        v.accept(&a).unwrap();
        v.accept(&c).unwrap();
        assert_eq!(
            closure_err(v.accept(&c).unwrap_err()),
            ClosureError::Repeated(c.digest())
        );
        v.finish().unwrap();

        let mut v = GetValidator::new(root.digest());
        v.accept(&root).unwrap();
        v.accept(&a).unwrap();
        assert_eq!(
            closure_err(v.finish().unwrap_err()),
            ClosureError::Missing(c.digest())
        );

        // An undersized reference to a directory not yet received...
        let bad_root = parent(&[("a", &a, 2), ("c", &c, 1), ("d", &c, 0)]);
        let mut v = GetValidator::new(bad_root.digest());
        v.accept(&bad_root).unwrap();
        v.accept(&a).unwrap();
        assert!(matches!(v.accept(&c), Err(Error::InvalidDirectory { .. })));
        // ... and to one received before.
        let x = parent(&[("c", &c, 0)]);
        let root2 = parent(&[("a", &c, 1), ("b", &x, 2)]);
        let mut v = GetValidator::new(root2.digest());
        v.accept(&root2).unwrap();
        v.accept(&c).unwrap();
        assert!(matches!(v.accept(&x), Err(Error::InvalidDirectory { .. })));
    }
}
