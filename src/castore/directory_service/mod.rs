//! Directories: addressed by the BLAKE3 digest of their canonical encoding.

use super::directory::Directory;
use super::{B3Digest, Error};
use futures::stream::BoxStream;

/// Stores and serves directories. Implementations: redb (the embedded default), memory,
/// gRPC client.
#[async_trait::async_trait]
pub trait DirectoryService: Send + Sync + 'static {
    /// One directory, or `None` if absent.
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error>;
    /// Stores one directory whose children are already present; returns its digest.
    async fn put(&self, directory: Directory) -> Result<B3Digest, Error>;
    /// The closure of `root`: root first, breadth first, each directory once. A missing
    /// directory anywhere is an error, as is a missing root.
    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>>;
    /// Starts a closure upload (leaves to root).
    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter>;
}

/// A closure upload: each directory may only reference directories put before it (or
/// already stored); `close` checks there is exactly one root and returns its digest. Nothing
/// is visible unless `close` succeeds.
#[async_trait::async_trait]
pub trait DirectoryPutter: Send {
    async fn put(&mut self, directory: Directory) -> Result<(), Error>;
    async fn close(&mut self) -> Result<B3Digest, Error>;
}
