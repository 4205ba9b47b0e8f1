//! Where the filesystem gets directories and blobs: the castore, behind a small synchronous
//! interface that the FUSE worker threads call.

use super::blob::BlobBody;
use super::error::FsError;
use super::listing::Listing;
use crate::castore::B3Digest;
use tokio::runtime::Handle;

/// Directory listings and blob readers by digest. Called from the virtio-fs worker threads
/// (never from inside the tokio runtime), so implementations may block on it.
pub trait ContentSource: Send + Sync + 'static {
    /// The listing of the directory with this digest.
    fn listing(&self, digest: &B3Digest) -> Result<Listing, FsError>;
    /// A reader over the blob with this digest.
    fn open_blob(&self, digest: &B3Digest) -> Result<BlobBody, FsError>;
    /// The runtime that streamed blob readers run on.
    fn runtime(&self) -> &Handle;
}
