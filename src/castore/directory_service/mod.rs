//! Directories: addressed by the BLAKE3 digest of their canonical encoding.
//!
//! - [`memory`]: in a hash map (tests, scratch).
//! - [`redb`]: in a redb file (the embedded default, `directories.redb`).
//! - [`grpc`]: a client of a remote `tvix.castore.v1` or `snix.castore.v1` DirectoryService.
//! - [`closure`]: the upload and fetch rules every backend applies.

pub mod closure;
pub mod grpc;
pub mod memory;
pub mod redb;

use super::directory::Directory;
use super::{B3Digest, Error};
use futures::stream::BoxStream;
use std::collections::{HashSet, VecDeque};
use std::future::Future;

pub use self::grpc::GrpcDirectoryService;
pub use self::memory::MemoryDirectoryService;
pub use self::redb::RedbDirectoryService;

/// Stores and serves directories. Implementations: redb (the embedded default), memory,
/// gRPC client.
#[async_trait::async_trait]
pub trait DirectoryService: Send + Sync + 'static {
    /// One directory, or `None` if absent.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error>;
    /// Stores one directory whose children are already present; returns its digest. The
    /// gRPC client only takes a directory without subdirectories (the protocol's Put
    /// contract: an upload carries the whole closure).
    async fn put(&self, directory: Directory) -> Result<B3Digest, Error>;
    /// The closure of `root`: root first, breadth first, each directory once. A missing
    /// directory anywhere is an error, as is a missing root.
    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>>;
    /// Starts a closure upload (leaves to root).
    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter>;
}

/// A closure upload: each directory may only reference directories put before it (or
/// already stored, except through the gRPC client: see [`closure::SameStream`]); `close`
/// checks there is exactly one root and returns its digest. Nothing is visible unless
/// `close` succeeds.
#[async_trait::async_trait]
pub trait DirectoryPutter: Send {
    async fn put(&mut self, directory: Directory) -> Result<(), Error>;
    async fn close(&mut self) -> Result<B3Digest, Error>;
}

/// Walks the closure of `root` breadth first with `get`, each directory once.
pub(crate) fn bfs_stream<G, Fut>(
    root: B3Digest,
    get: G,
) -> BoxStream<'static, Result<Directory, Error>>
where
    G: Fn(B3Digest) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Option<Directory>, Error>> + Send + 'static,
{
    Box::pin(async_stream::try_stream! {
        let mut queue = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        while let Some(digest) = queue.pop_front() {
            let dir = get(digest).await?.ok_or(Error::DirectoryNotFound(digest))?;
            for (_, child, _) in dir.directories() {
                if seen.insert(*child) {
                    queue.push_back(*child);
                }
            }
            yield dir;
        }
    })
}

/// Stores one directory through a closure upload of just itself, so the same checks apply.
pub(crate) async fn put_single(
    svc: &dyn DirectoryService,
    directory: Directory,
) -> Result<B3Digest, Error> {
    let mut putter = svc.put_multiple_start();
    putter.put(directory).await?;
    putter.close().await
}
