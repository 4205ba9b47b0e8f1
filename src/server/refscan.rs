//! Reference scanning for the 2024 layout's `outputs_needles`: which of the request's
//! `refscan_needles` occur in an output's file contents and symlink targets (not in names),
//! read back from the castore after the build, on the host.

use crate::castore::{self, B3Digest, BlobService, DirectoryService, Node};
use aho_corasick::AhoCorasick;
use futures::TryStreamExt;
use std::collections::HashSet;
use tokio::io::AsyncReadExt;

const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RefscanError {
    #[error("building the needle matcher")]
    Matcher(#[source] aho_corasick::BuildError),
    #[error("blob {0} of an output is not in the castore")]
    MissingBlob(B3Digest),
    #[error("reading blob {digest}")]
    Read {
        digest: B3Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("reading an output from the castore")]
    Castore(#[source] castore::Error),
}

/// Finds needles in outputs; one per request.
pub struct Scanner {
    matcher: AhoCorasick,
    /// Bytes kept from one read to the next, so a needle split across reads is found.
    overlap: usize,
    count: usize,
}

impl Scanner {
    pub fn new(needles: &[String]) -> Result<Self, RefscanError> {
        let matcher = AhoCorasick::new(needles).map_err(RefscanError::Matcher)?;
        let overlap = needles
            .iter()
            .map(|n| n.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Ok(Self {
            matcher,
            overlap,
            count: needles.len(),
        })
    }

    fn mark(&self, haystack: &[u8], found: &mut [bool]) {
        for m in self.matcher.find_overlapping_iter(haystack) {
            found[m.pattern().as_usize()] = true;
        }
    }

    /// The indices (ascending) of the needles found in the tree of `node`.
    pub async fn scan(
        &self,
        node: &Node,
        blobs: &dyn BlobService,
        dirs: &dyn DirectoryService,
    ) -> Result<Vec<u64>, RefscanError> {
        let mut found = vec![false; self.count];
        if self.count > 0 {
            let mut seen_blobs = HashSet::new();
            match node {
                Node::Symlink { target } => self.mark(target.as_bytes(), &mut found),
                Node::File { digest, .. } => self.scan_blob(digest, blobs, &mut found).await?,
                Node::Directory { digest, .. } => {
                    let mut closure = dirs.get_recursive(digest);
                    while let Some(dir) = closure.try_next().await.map_err(RefscanError::Castore)? {
                        for (_, child) in dir.nodes() {
                            match child {
                                Node::Symlink { target } => {
                                    self.mark(target.as_bytes(), &mut found)
                                }
                                Node::File { digest, .. } => {
                                    if seen_blobs.insert(*digest) {
                                        self.scan_blob(digest, blobs, &mut found).await?;
                                    }
                                }
                                Node::Directory { .. } => {}
                            }
                        }
                    }
                }
            }
        }
        Ok(found
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i as u64)
            .collect())
    }

    async fn scan_blob(
        &self,
        digest: &B3Digest,
        blobs: &dyn BlobService,
        found: &mut [bool],
    ) -> Result<(), RefscanError> {
        let mut reader = blobs
            .open_read(digest)
            .await
            .map_err(RefscanError::Castore)?
            .ok_or(RefscanError::MissingBlob(*digest))?;
        let mut buf = Vec::with_capacity(self.overlap + READ_CHUNK);
        loop {
            let keep = buf.len().min(self.overlap);
            buf.drain(..buf.len() - keep);
            let before = buf.len();
            buf.resize(before + READ_CHUNK, 0);
            let n = reader
                .read(&mut buf[before..])
                .await
                .map_err(|source| RefscanError::Read {
                    digest: *digest,
                    source,
                })?;
            buf.truncate(before + n);
            if n == 0 {
                return Ok(());
            }
            self.mark(&buf, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::blob::{put_bytes, MemoryBlobService};
    use crate::castore::directory_service::memory::MemoryDirectoryService;
    use crate::castore::{Directory, PathComponent, SymlinkTarget};

    fn needles() -> Vec<String> {
        ["aaaa", "bbbb", "cccc", "dddd"].map(String::from).to_vec()
    }

    #[tokio::test]
    async fn finds_needles_in_contents_and_targets_not_names() {
        let blobs = MemoryBlobService::default();
        let dirs = MemoryDirectoryService::default();
        // "bbbb" straddles two reads.
        let mut big = vec![b'x'; READ_CHUNK - 2];
        big.extend_from_slice(b"bbbb");
        let big_digest = put_bytes(&blobs, &big).await.unwrap();
        let small = put_bytes(&blobs, b"..aaaa..").await.unwrap();
        let mut dir = Directory::new();
        dir.try_insert(
            PathComponent::try_from("big").unwrap(),
            Node::File {
                digest: big_digest,
                size: big.len() as u64,
                executable: false,
            },
        )
        .unwrap();
        dir.try_insert(
            PathComponent::try_from("dddd-named").unwrap(),
            Node::Symlink {
                target: SymlinkTarget::try_from("/nix/store/cccc-x").unwrap(),
            },
        )
        .unwrap();
        dir.try_insert(
            PathComponent::try_from("small").unwrap(),
            Node::File {
                digest: small,
                size: 8,
                executable: false,
            },
        )
        .unwrap();
        let root = dirs.put(dir.clone()).await.unwrap();
        let scanner = Scanner::new(&needles()).unwrap();
        let node = Node::Directory {
            digest: root,
            size: dir.size(),
        };
        assert_eq!(scanner.scan(&node, &blobs, &dirs).await.unwrap(), [0, 1, 2]);

        let file = Node::File {
            digest: small,
            size: 8,
            executable: false,
        };
        assert_eq!(scanner.scan(&file, &blobs, &dirs).await.unwrap(), [0]);
        let link = Node::Symlink {
            target: SymlinkTarget::try_from("dddd").unwrap(),
        };
        assert_eq!(scanner.scan(&link, &blobs, &dirs).await.unwrap(), [3]);
    }

    #[tokio::test]
    async fn no_needles_no_reads_and_a_missing_blob_is_an_error() {
        let blobs = MemoryBlobService::default();
        let dirs = MemoryDirectoryService::default();
        let absent = Node::File {
            digest: B3Digest::of(b"absent"),
            size: 6,
            executable: false,
        };
        assert!(Scanner::new(&[])
            .unwrap()
            .scan(&absent, &blobs, &dirs)
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(
            Scanner::new(&needles())
                .unwrap()
                .scan(&absent, &blobs, &dirs)
                .await,
            Err(RefscanError::MissingBlob(_))
        ));
    }
}
