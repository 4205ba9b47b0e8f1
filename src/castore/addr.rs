//! Backends from tvix-style addresses.
//!
//! Blobs: `memory://`, `objectstore+file:///abs/dir` or a plain absolute path (the local
//! file store), `grpc+unix:///abs/path.sock`, `grpc+http://host:port`.
//! Directories: `memory://`, `redb:///abs/file.redb`, `grpc+unix://...`, `grpc+http://...`.

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
    #[error("{addr:?}: the path must be absolute")]
    NotAbsolute { addr: String },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("{addr:?}: opening the store")]
    Open {
        addr: String,
        #[source]
        source: Error,
    },
}

const BLOB_SCHEMES: &str =
    "memory://, objectstore+file:///abs/dir, /abs/dir, grpc+unix:///abs.sock or grpc+http://host:port";
const DIRECTORY_SCHEMES: &str =
    "memory://, redb:///abs/file.redb, grpc+unix:///abs.sock or grpc+http://host:port";

fn absolute<'a>(addr: &str, path: &'a str) -> Result<&'a Path, AddrError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(AddrError::NotAbsolute {
            addr: addr.to_owned(),
        })
    }
}

/// A blob service for `addr`. gRPC clients connect lazily, so this must be called inside a
/// tokio runtime and a dead server shows up on first use.
pub fn blob_service_from_addr(addr: &str) -> Result<Arc<dyn BlobService>, AddrError> {
    if addr == "memory://" {
        return Ok(Arc::new(MemoryBlobService::new()));
    }
    if addr.starts_with("grpc+") {
        return Ok(Arc::new(GrpcBlobService::new(channel_from_addr(addr)?)));
    }
    let path = if let Some(p) = addr.strip_prefix("objectstore+file://") {
        absolute(addr, p)?
    } else if addr.starts_with('/') {
        Path::new(addr)
    } else {
        return Err(AddrError::Unsupported {
            addr: addr.to_owned(),
            kind: "blob",
            expected: BLOB_SCHEMES,
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
    if addr == "memory://" {
        return Ok(Arc::new(MemoryDirectoryService::new()));
    }
    if addr.starts_with("grpc+") {
        return Ok(Arc::new(GrpcDirectoryService::new(channel_from_addr(
            addr,
        )?)));
    }
    if let Some(p) = addr.strip_prefix("redb://") {
        let path = absolute(addr, p)?;
        let svc = RedbDirectoryService::open(path).map_err(|source| AddrError::Open {
            addr: addr.to_owned(),
            source,
        })?;
        return Ok(Arc::new(svc));
    }
    Err(AddrError::Unsupported {
        addr: addr.to_owned(),
        kind: "directory",
        expected: DIRECTORY_SCHEMES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn known_addresses_open() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for a in [
            "memory://".to_string(),
            format!("objectstore+file://{d}/blobs"),
            format!("{d}/blobs2"),
            "grpc+unix:///run/x.sock".into(),
            "grpc+http://127.0.0.1:8000".into(),
        ] {
            assert!(blob_service_from_addr(&a).is_ok(), "{a}");
        }
        for a in [
            "memory://".to_string(),
            format!("redb://{d}/directories.redb"),
            "grpc+unix:///run/x.sock".into(),
            "grpc+http://[::1]:8000".into(),
        ] {
            assert!(directory_service_from_addr(&a).is_ok(), "{a}");
        }
    }

    #[tokio::test]
    async fn bad_addresses_are_named_in_the_error() {
        for a in [
            "relative/dir",
            "http://x:1",
            "objectstore+file://rel",
            "grpc+unix://rel.sock",
            "grpc+http://host",
        ] {
            let msg = match blob_service_from_addr(a) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{a} accepted"),
            };
            assert!(msg.contains(a), "{msg}");
        }
        for a in [
            "redb://rel.redb",
            "objectstore+file:///x",
            "/abs/dir",
            "memory:",
        ] {
            let msg = match directory_service_from_addr(a) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{a} accepted"),
            };
            assert!(msg.contains(a), "{msg}");
        }
    }
}
