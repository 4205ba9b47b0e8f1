//! The castore-backed virtio-fs daemon that serves a build's inputs read-only.
//!
//! - [`filesystem`]: [`CastoreFs`], virtiofsd's `FileSystem` over castore content.
//! - [`inode`], [`handles`]: the bounded inode and open-file tables.
//! - [`listing`], [`attr`], [`blob`]: directory listings, attributes, reading blobs.
//! - [`source`]: the [`ContentSource`] interface to the castore.
//! - [`root`]: the root's entries, possibly assigned after boot (pooled VMs).
//! - [`daemon`]: serving one VM over a vhost-user socket.
//! - [`passthrough`]: the other kind of share, one host directory read-only.
//! - [`spec`]: one daemon's configuration, as the runner passes it and the daemon parses it.
//! - [`stats`]: what a build read from its inputs, for the runner.

pub mod attr;
pub mod blob;
pub mod daemon;
pub mod error;
pub mod filesystem;
pub mod handles;
pub mod inode;
pub mod listing;
mod log_limit;
pub mod passthrough;
pub mod root;
pub mod sandbox;
pub mod source;
pub mod spec;
mod staging;
pub mod stats;

pub use error::FsError;
pub use filesystem::{CastoreFs, FsLimits};
pub use listing::{FsNode, Listing};
pub use root::RootAssigner;
pub use source::{CastoreSource, ContentSource};
pub use spec::{DaemonSpec, RootSource, ShareSource};
