//! Whether a node's whole closure is in the embedded store: what a pin must check before it
//! promises to keep anything.
//!
//! Call it while an [`super::in_use::hold`] of the node's digest lives: then a GC running
//! now marks whatever the walk finds, so "present" stays true until the pin is committed.

use crate::castore::blob::LocalBlobService;
use crate::castore::directory_service::closure::MAX_CLOSURE_DIRECTORIES;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::{B3Digest, BlobService, DirectoryService, Error, Node};
use std::collections::HashSet;

/// What the walk found missing, or why it stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incomplete {
    #[error("directory {0} is not in the store")]
    Directory(B3Digest),
    #[error("blob {0} is not in the store")]
    Blob(B3Digest),
    #[error("the closure has more than {0} directories")]
    TooLarge(usize),
}

/// `Ok(Ok(()))` if every directory and blob `node` reaches is stored; `Ok(Err(_))` naming
/// the first that is not. Walks at most [`MAX_CLOSURE_DIRECTORIES`] directories, each once.
pub async fn check(
    blobs: &LocalBlobService,
    dirs: &RedbDirectoryService,
    node: &Node,
) -> Result<Result<(), Incomplete>, Error> {
    let mut stack = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut seen_blobs = HashSet::new();
    let mut visit = |node: &Node, stack: &mut Vec<B3Digest>| match node {
        Node::Directory { digest, .. } if seen_dirs.insert(*digest) => {
            stack.push(*digest);
            None
        }
        Node::File { digest, .. } if seen_blobs.insert(*digest) => Some(*digest),
        _ => None,
    };
    let mut blobs_to_check: Vec<B3Digest> = visit(node, &mut stack).into_iter().collect();
    let mut walked = 0usize;
    while let Some(digest) = stack.pop() {
        walked += 1;
        if walked > MAX_CLOSURE_DIRECTORIES {
            return Ok(Err(Incomplete::TooLarge(MAX_CLOSURE_DIRECTORIES)));
        }
        let Some(dir) = dirs.get(&digest).await? else {
            return Ok(Err(Incomplete::Directory(digest)));
        };
        for (_, child) in dir.nodes() {
            blobs_to_check.extend(visit(child, &mut stack));
        }
    }
    for digest in blobs_to_check {
        if !blobs.has(&digest).await? {
            return Ok(Err(Incomplete::Blob(digest)));
        }
    }
    Ok(Ok(()))
}
