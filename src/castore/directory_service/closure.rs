//! The rules of a directory closure: uploads go leaves to root and may only reference
//! directories sent before (or already stored); recursive fetches go root to leaves and may
//! only contain directories referenced by one received before, each once.

use crate::castore::directory::{check_child_size, Directory};
use crate::castore::error::ClosureError;
use crate::castore::{B3Digest, Error};
use std::collections::{HashMap, HashSet};
use std::future::Future;

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
        let mut external = Vec::new();
        for (name, child, recorded) in dir.directories() {
            match self.received.get(child) {
                Some(c) => check_child_size(name, recorded, c, *child)
                    .map_err(|source| Error::InvalidDirectory { digest, source })?,
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
            Some(c) => {
                check_child_size(&r.name, r.recorded_size, &c, r.child).map_err(|source| {
                    Error::InvalidDirectory {
                        digest: r.parent,
                        source,
                    }
                })?
            }
        }
    }
    Ok(())
}

/// Checks the directories of a recursive fetch as they arrive (root first).
pub struct GetValidator {
    /// Directories referenced but not yet received, with the smallest size recorded for
    /// each and the entry name that recorded it.
    expected: HashMap<B3Digest, Option<(crate::castore::directory::PathComponent, u64)>>,
    received: HashSet<B3Digest>,
}

impl GetValidator {
    pub fn new(root: B3Digest) -> Self {
        Self {
            expected: HashMap::from([(root, None)]),
            received: HashSet::new(),
        }
    }

    /// Accepts the next directory, or says why it must be refused.
    pub fn accept(&mut self, dir: &Directory) -> Result<B3Digest, Error> {
        let digest = dir.digest();
        let Some(recorded) = self.expected.remove(&digest) else {
            return Err(if self.received.contains(&digest) {
                ClosureError::Repeated(digest)
            } else {
                ClosureError::Unexpected(digest)
            }
            .into());
        };
        if let Some((name, size)) = recorded {
            check_child_size(&name, size, dir, digest)
                .map_err(|source| Error::InvalidDirectory { digest, source })?;
        }
        self.received.insert(digest);
        for (name, child, size) in dir.directories() {
            if self.received.contains(child) {
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
