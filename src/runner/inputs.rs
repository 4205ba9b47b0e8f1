//! Checking that every input of a request is in the castore before a VM is started for it,
//! and writing the inputs as the root directory the virtio-fs daemon serves.

use super::error::RunError;
use crate::castore::directory::{Directory, Node, PathComponent};
use crate::castore::{BlobService, DirectoryService, Error as CastoreError};
use futures::TryStreamExt;
use std::collections::BTreeMap;

/// Fails with [`RunError::MissingInput`] naming the first input (or directory inside one)
/// that the castore lacks, or [`RunError::InputSize`] for a file input whose blob the
/// castore knows (cheaply) to have another size. Directory inputs are checked to their leaves, so a build never
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
            Node::File { digest, size, .. } => {
                let resolve_error = |source| RunError::ResolveInput {
                    name: name_str(),
                    source,
                };
                // Where the store knows the size cheaply (the embedded store), a node that
                // declares another is refused here; the guest would only see EIO, or a
                // file cut short without an error.
                if let Some(real) = blobs.cheap_size(digest).await.map_err(resolve_error)? {
                    if real != *size {
                        return Err(RunError::InputSize {
                            name: name_str(),
                            digest: *digest,
                            declared: *size,
                            real,
                        });
                    }
                    continue;
                }
                let present = blobs.has(digest).await.map_err(resolve_error)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::blob::{put_bytes, LocalBlobService, MemoryBlobService};
    use crate::castore::directory_service::MemoryDirectoryService;

    fn file(digest: crate::castore::B3Digest, size: u64) -> BTreeMap<PathComponent, Node> {
        let name = PathComponent::try_from("input-file").unwrap();
        let node = Node::File {
            digest,
            size,
            executable: false,
        };
        BTreeMap::from([(name, node)])
    }

    #[tokio::test]
    async fn a_file_input_of_another_size_than_its_blob_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalBlobService::open(dir.path()).unwrap();
        let memory = MemoryBlobService::default();
        let dirs = MemoryDirectoryService::default();
        let blobs: [&dyn BlobService; 2] = [&local, &memory];
        for blobs in blobs {
            let digest = put_bytes(blobs, &[1u8; 1000]).await.unwrap();
            resolve(&file(digest, 1000), blobs, &dirs).await.unwrap();
            for declared in [10, 1_000_000_000] {
                let e = resolve(&file(digest, declared), blobs, &dirs)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(e, RunError::InputSize { declared: d, real: 1000, .. } if d == declared),
                    "{e:?}"
                );
                assert_eq!(e.fault(), crate::runner::Fault::Precondition);
                let text = e.to_string();
                assert!(
                    text.contains("input-file") && text.contains(&declared.to_string()),
                    "{text}"
                );
            }
            let absent = crate::castore::B3Digest::of(b"absent");
            assert!(matches!(
                resolve(&file(absent, 6), blobs, &dirs).await,
                Err(RunError::MissingInput { .. })
            ));
        }
    }
}
