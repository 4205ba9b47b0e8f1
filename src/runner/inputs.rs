//! Checking that every input of a request is in the castore before a VM is started for it,
//! and writing the inputs as the root directory the virtio-fs daemon serves.

use super::error::RunError;
use crate::castore::directory::{Directory, Node, PathComponent};
use crate::castore::{BlobService, DirectoryService, Error as CastoreError};
use futures::TryStreamExt;
use std::collections::BTreeMap;

/// Fails with [`RunError::MissingInput`] naming the first input (or directory inside one)
/// that the castore lacks. Directory inputs are checked to their leaves, so a build never
/// starts only to find a hole in its inputs through an I/O error in the guest.
pub async fn resolve(
    inputs: &BTreeMap<PathComponent, Node>,
    blobs: &dyn BlobService,
    dirs: &dyn DirectoryService,
) -> Result<(), RunError> {
    for (name, node) in inputs {
        let name_str = || name.to_string();
        match node {
            Node::Directory { digest, .. } => {
                // One walk: every backend reports a missing root as DirectoryNotFound(root).
                dirs.get_recursive(digest)
                    .try_for_each(|_| async { Ok(()) })
                    .await
                    .map_err(|source| missing_or(name_str(), *digest, source))?;
            }
            Node::File { digest, .. } => {
                let present = blobs
                    .has(digest)
                    .await
                    .map_err(|source| RunError::ResolveInput {
                        name: name_str(),
                        source,
                    })?;
                if !present {
                    return Err(RunError::MissingInput {
                        name: name_str(),
                        digest: *digest,
                    });
                }
            }
            Node::Symlink { .. } => {}
        }
    }
    Ok(())
}

fn missing_or(name: String, digest: crate::castore::B3Digest, source: CastoreError) -> RunError {
    match source {
        CastoreError::DirectoryNotFound(missing)
        | CastoreError::InvalidClosure(crate::castore::error::ClosureError::Missing(missing)) => {
            let name = if missing == digest {
                name
            } else {
                format!("{name} (directory {missing} inside it)")
            };
            RunError::MissingInput { name, digest }
        }
        source => RunError::ResolveInput { name, source },
    }
}

/// The inputs as one Directory: the root of the virtio-fs share.
pub fn root_directory(inputs: &BTreeMap<PathComponent, Node>) -> Result<Directory, RunError> {
    let mut root = Directory::new();
    for (name, node) in inputs {
        root.try_insert(name.clone(), node.clone())
            .map_err(|e| RunError::Setup {
                what: format!("input {name} does not fit the root directory"),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            })?;
    }
    Ok(root)
}
