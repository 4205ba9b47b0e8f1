//! The content-addressed store (castore), wire-compatible with `tvix.castore.v1` and
//! `snix.castore.v1` (see [`package`]).
//!
//! - [`digest`]: BLAKE3 digests and how they are printed and parsed.
//! - [`directory`]: Directory and Node domain types that can only hold valid values.
//! - [`blob`]: the [`BlobService`] trait and its backends (local files, memory, gRPC).
//! - [`directory_service`]: the [`DirectoryService`] trait and its backends (redb, memory, gRPC).
//! - [`objectstore`]: blobs and directories in an object store (S3, Garage), in snix's
//!   bucket layout.
//! - [`addr`]: backends from addresses as tvix and snix users write them (`memory://` or
//!   `memory:`, `grpc+unix:///abs` or `grpc+unix:/abs`, ...).
//! - [`import`] / [`export`]: host paths to castore nodes and back.

pub mod addr;
pub mod blob;
pub mod channel;
pub mod digest;
pub mod directory;
pub mod directory_service;
pub mod error;
pub mod export;
pub mod gc;
pub mod import;
pub mod objectstore;
pub mod package;

pub use blob::{BlobReader, BlobService, BlobWriter};
pub use digest::B3Digest;
pub use directory::{Directory, Node, PathComponent, SymlinkTarget, ValidationError};
pub use directory_service::{DirectoryPutter, DirectoryService};
pub use error::Error;
