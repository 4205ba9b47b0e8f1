//! Backends from addresses, as tvix users and snix users write them (both work).
//!
//! | backend | tvix spelling | snix spelling |
//! | --- | --- | --- |
//! | memory (blobs, directories) | `memory://` | `memory:` (`redb+memory:` for directories) |
//! | local blob files | `objectstore+file:///abs/dir`, `/abs/dir` | `objectstore+file:/abs/dir` |
//! | redb directories | `redb:///abs/file.redb` | `redb:/abs/file.redb` |
//! | gRPC over a unix socket | `grpc+unix:///abs/path.sock` | `grpc+unix:/abs/path.sock` |
//! | gRPC over TCP | `grpc+http://host:port` | the same |
//! | object store (blobs, directories), snix's bucket layout | `objectstore+s3://bucket/prefix?endpoint=..&region=..` | the same |
//! | in-memory object store (tests) | `objectstore+memory:///` | the same |
//!
//! A gRPC address takes `?package=snix` for a peer that speaks `snix.castore.v1` (a
//! snix-store); without it the client speaks `tvix.castore.v1` (see [`super::channel`]).
//! Our local blob files are this project's layout, not snix's object-store bucket layout.
//! Any `object_store` URL but `file:` after `objectstore+` is a bucket in snix's layout
//! (see [`super::objectstore`]).

use super::blob::{GrpcBlobService, LocalBlobService, MemoryBlobService};
use super::channel::{channel_from_addr, ChannelError};
use super::directory_service::{
    GrpcDirectoryService, MemoryDirectoryService, RedbDirectoryService,
};
use super::{BlobService, DirectoryService, Error};
use std::path::Path;
use std::sync::Arc;

/// Why an address could not be turned into a service.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("{addr:?}: unsupported {kind} service address (expected {expected})")]
    Unsupported {
        addr: String,
        kind: &'static str,
        expected: &'static str,
    },
    #[error("{addr:?}: the path must be absolute, with no host (scheme:/abs/path or scheme:///abs/path)")]
    NotAbsolute { addr: String },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    ObjectStore(#[from] super::objectstore::AddrError),
    #[error("{addr:?}: opening the store")]
    Open {
        addr: String,
        #[source]
        source: Error,
    },
}

/// The accepted blob addresses, for `--help` and error messages.
pub const BLOB_ADDRESSES: &str = "memory: (or memory://), objectstore+file:/abs/dir (or \
     objectstore+file:///abs/dir, or /abs/dir), grpc+unix:/abs.sock (or grpc+unix:///abs.sock) \
     or grpc+http://host:port, objectstore+s3://bucket/prefix?endpoint=..&region=.. or \
     objectstore+memory:///; a gRPC address takes ?package=snix for a snix-store";
/// The accepted directory addresses, for `--help` and error messages.
pub const DIRECTORY_ADDRESSES: &str = "memory: (or memory://, redb+memory:), \
     redb:/abs/file.redb (or redb:///abs/file.redb), grpc+unix:/abs.sock (or \
     grpc+unix:///abs.sock), grpc+http://host:port, objectstore+s3://bucket/prefix?... or \
     objectstore+memory:///; a gRPC address takes ?package=snix for a snix-store";

/// `objectstore+<url>` in snix's bucket layout; `objectstore+file:` (either spelling) stays
/// the local file store it has always meant here.
fn is_bucket(addr: &str) -> bool {
    addr.starts_with(super::objectstore::SCHEME_PREFIX) && !addr.starts_with("objectstore+file:")
}

/// The in-memory backend's spellings.
fn is_memory(addr: &str) -> bool {
    matches!(addr, "memory:" | "memory://")
}

/// The absolute path of `scheme:/abs` (snix) or `scheme:///abs` (tvix); `None` if `addr`
/// has another scheme. A host (`scheme://host/abs`) or a relative path is refused.
fn scheme_path<'a>(addr: &'a str, scheme: &str) -> Option<Result<&'a Path, AddrError>> {
    let rest = addr.strip_prefix(scheme)?.strip_prefix(':')?;
    let path = rest.strip_prefix("//").unwrap_or(rest);
    Some(if path.starts_with('/') && !path.starts_with("//") {
        Ok(Path::new(path))
    } else {
        Err(AddrError::NotAbsolute {
            addr: addr.to_owned(),
        })
    })
}

/// A blob service for `addr`. gRPC clients connect lazily, so this must be called inside a
/// tokio runtime and a dead server shows up on first use.
pub fn blob_service_from_addr(addr: &str) -> Result<Arc<dyn BlobService>, AddrError> {
    if is_memory(addr) {
        return Ok(Arc::new(MemoryBlobService::new()));
    }
    if addr.starts_with("grpc+") {
        return Ok(Arc::new(GrpcBlobService::new(channel_from_addr(addr)?)));
    }
    if is_bucket(addr) {
        return Ok(Arc::new(
            super::objectstore::Bucket::blob_service_from_addr(addr)?,
        ));
    }
    let path = if let Some(p) = scheme_path(addr, "objectstore+file") {
        p?
    } else if addr.starts_with('/') {
        Path::new(addr)
    } else {
        return Err(AddrError::Unsupported {
            addr: addr.to_owned(),
            kind: "blob",
            expected: BLOB_ADDRESSES,
        });
    };
    let svc = LocalBlobService::open(path).map_err(|source| AddrError::Open {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(Arc::new(svc))
}

/// A directory service for `addr` (see [`blob_service_from_addr`] about gRPC).
pub fn directory_service_from_addr(addr: &str) -> Result<Arc<dyn DirectoryService>, AddrError> {
    if is_memory(addr) || addr == "redb+memory:" {
        return Ok(Arc::new(MemoryDirectoryService::new()));
    }
    if addr.starts_with("grpc+") {
        return Ok(Arc::new(GrpcDirectoryService::new(channel_from_addr(
            addr,
        )?)));
    }
    if is_bucket(addr) {
        let bucket = super::objectstore::Bucket::from_addr(addr)?;
        return Ok(Arc::new(
            super::objectstore::ObjectStoreDirectoryService::new(bucket),
        ));
    }
    if let Some(path) = scheme_path(addr, "redb") {
        let svc = RedbDirectoryService::open(path?).map_err(|source| AddrError::Open {
            addr: addr.to_owned(),
            source,
        })?;
        return Ok(Arc::new(svc));
    }
    Err(AddrError::Unsupported {
        addr: addr.to_owned(),
        kind: "directory",
        expected: DIRECTORY_ADDRESSES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_spellings_open() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for a in [
            "memory://".to_string(),
            "memory:".into(),
            format!("objectstore+file://{d}/blobs"),
            format!("objectstore+file:{d}/blobs-snix"),
            format!("{d}/blobs2"),
            "grpc+unix:///run/x.sock".into(),
            "grpc+unix:/run/x.sock".into(),
            "grpc+unix:/run/x.sock?package=snix".into(),
            "grpc+http://127.0.0.1:8000".into(),
            "grpc+http://127.0.0.1:8000?package=snix".into(),
        ] {
            if let Err(e) = blob_service_from_addr(&a) {
                panic!("{a}: {e}");
            }
        }
        for a in [
            "memory://".to_string(),
            "memory:".into(),
            "redb+memory:".into(),
            format!("redb://{d}/directories.redb"),
            format!("redb:{d}/directories-snix.redb"),
            "grpc+unix:///run/x.sock".into(),
            "grpc+unix:/run/x.sock?package=snix".into(),
            "grpc+http://[::1]:8000".into(),
        ] {
            if let Err(e) = directory_service_from_addr(&a) {
                panic!("{a}: {e}");
            }
        }
        // Both spellings of a path name the same store.
        assert!(dir.path().join("blobs-snix").is_dir());
        assert!(dir.path().join("directories-snix.redb").is_file());
    }

    #[tokio::test]
    async fn bad_addresses_are_named_in_the_error() {
        for (a, want) in [
            ("relative/dir", "unsupported blob service address"),
            ("http://x:1", "unsupported blob service address"),
            ("memory:/", "unsupported blob service address"),
            ("memory://foo", "unsupported blob service address"),
            ("objectstore+file://rel", "must be absolute"),
            ("objectstore+file:rel", "must be absolute"),
            ("objectstore+file://host/abs", "must be absolute"),
            ("grpc+unix://rel.sock", "absolute socket path"),
            ("grpc+unix:rel.sock", "absolute socket path"),
            ("grpc+http://host", "host and port"),
            ("grpc+unix:/x.sock?package=nix", "unknown castore package"),
        ] {
            let msg = match blob_service_from_addr(a) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{a} accepted"),
            };
            assert!(msg.contains(a) && msg.contains(want), "{a}: {msg}");
        }
        for (a, want) in [
            ("redb://rel.redb", "must be absolute"),
            ("redb:rel.redb", "must be absolute"),
            ("redb://host/abs.redb", "must be absolute"),
            ("redb:", "must be absolute"),
            (
                "objectstore+file:///x",
                "unsupported directory service address",
            ),
            ("/abs/dir", "unsupported directory service address"),
            ("memory", "unsupported directory service address"),
            ("redb+memory:/x", "unsupported directory service address"),
        ] {
            let msg = match directory_service_from_addr(a) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{a} accepted"),
            };
            assert!(msg.contains(a) && msg.contains(want), "{a}: {msg}");
        }
    }
}
