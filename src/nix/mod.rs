//! Nix's `external-builders` dialect: Nix hands each derivation build to a program as a
//! `build.json` (see docs/nix.md); this room turns that file into our one validated
//! [`BuildRequest`](crate::request::BuildRequest), keeps the store-path -> castore-node
//! input cache, and writes the harvested outputs back into Nix's store.
//!
//! - [`build_json`]: parsing and checking build.json (version 1).
//! - [`request`]: build.json + imported inputs -> [`RawRequest`](crate::request::RawRequest).
//! - [`cache`]: the persisted input cache (a valid store path is read once).
//! - [`digest_only`]: a blob service that only hashes, to ask a server before uploading.
//! - [`local_serve`]: the shared local `serve` started on first use.
//! - [`place`]: outputs from the castore into `realStoreDir`, whole or not at all.

pub mod build_json;
pub mod cache;
pub mod digest_only;
pub mod local_serve;
pub mod place;
pub mod request;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

/// Why a Nix build could not be taken on or finished. The message reaches the user through
/// Nix, which shows the program's stderr.
#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("build.json: {0}")]
    Json(#[source] serde_json::Error),
    #[error("build.json {field}: {reason}")]
    Field { field: String, reason: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tmp dir's files ({bytes} bytes and more) exceed the {limit} bytes a build may carry into {build_dir}")]
    TmpDirTooLarge {
        bytes: u64,
        limit: u64,
        build_dir: String,
    },
    #[error(
        "{path}: is not a regular file; only files can be carried from the tmp dir into the build"
    )]
    TmpDirEntry { path: PathBuf },
    #[error("the request built from build.json is invalid")]
    Request(#[source] crate::request::ValidationError),
    #[error("importing input {path}")]
    Import {
        path: PathBuf,
        #[source]
        source: Box<crate::castore::import::ImportError>,
    },
    #[error("input cache {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the castore")]
    Store(#[source] crate::castore::Error),
    #[error("writing output {name} to {path}")]
    Export {
        name: String,
        path: PathBuf,
        #[source]
        source: Box<crate::castore::export::ExportError>,
    },
    #[error("the build produced no node for output {0}")]
    MissingOutput(String),
}
