//! Backends from addresses, as tvix users and snix users write them (both work).
//!
//! | backend | tvix spelling | snix spelling |
//! | --- | --- | --- |
//! | memory (blobs, directories) | `memory://` | `memory:` (`redb+memory:` for directories) |
//! | local blob files (this project's layout) | `/abs/dir` | the same |
//! | redb directories | `redb:///abs/file.redb` | `redb:/abs/file.redb` |
//! | gRPC over a unix socket | `grpc+unix:///abs/path.sock` | `grpc+unix:/abs/path.sock` |
//! | gRPC over TCP | `grpc+http://host:port` | the same |
//! | object store (blobs, directories), snix's bucket layout | `objectstore+s3://bucket/prefix?endpoint=..&region=..` | the same |
//! | snix's bucket layout in a local directory | `objectstore+file:///abs/dir` | `objectstore+file:/abs/dir` |
//! | in-memory object store (tests) | `objectstore+memory:///` | the same |
//!
//! A gRPC address takes `?package=snix` for a peer that speaks `snix.castore.v1` (a
//! snix-store); without it the client speaks `tvix.castore.v1` (see [`super::channel`]).
//! Every `object_store` URL after `objectstore+` is a bucket in snix's layout (see
//! [`super::objectstore`]); `objectstore+file:` is that layout in a local directory, as snix
//! means it, so a snix-store can share the directory. Our own local blob files (one file per
//! blob, read straight into guests) are spelt as a plain absolute path.

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
pub const BLOB_ADDRESSES: &str = "memory: (or memory://), /abs/dir (local blob files), \
     grpc+unix:/abs.sock (or grpc+unix:///abs.sock) or grpc+http://host:port, \
     objectstore+s3://bucket/prefix?endpoint=..&region=.., objectstore+file:/abs/dir (or \
     objectstore+file:///abs/dir) or objectstore+memory:///; a gRPC address takes \
     ?package=snix for a snix-store";
/// The accepted directory addresses, for `--help` and error messages.
pub const DIRECTORY_ADDRESSES: &str = "memory: (or memory://, redb+memory:), \
     redb:/abs/file.redb (or redb:///abs/file.redb), grpc+unix:/abs.sock (or \
     grpc+unix:///abs.sock), grpc+http://host:port, objectstore+s3://bucket/prefix?..., \
     objectstore+file:/abs/dir or objectstore+memory:///; a gRPC address takes \
     ?package=snix for a snix-store";

/// Whether `addr` is `objectstore+<url>`: a bucket in snix's layout. `objectstore+file:`
/// must name an absolute directory with no host, checked here on the text: the URL parser
/// reads `file:rel` as `/rel`, and object_store ignores a host.
fn is_bucket(addr: &str) -> Result<bool, AddrError> {
    if !addr.starts_with(super::objectstore::SCHEME_PREFIX) {
        return Ok(false);
    }
    let head = addr.split_once('?').map_or(addr, |(h, _)| h);
    if let Some(Err(e)) = scheme_path(head, "objectstore+file") {
        return Err(e);
    }
    Ok(true)
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
    if is_bucket(addr)? {
        return Ok(Arc::new(
            super::objectstore::Bucket::blob_service_from_addr(addr)?,
        ));
    }
    if !addr.starts_with('/') {
        return Err(AddrError::Unsupported {
            addr: addr.to_owned(),
            kind: "blob",
            expected: BLOB_ADDRESSES,
        });
    }
    let svc = LocalBlobService::open(Path::new(addr)).map_err(|source| AddrError::Open {
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
    if is_bucket(addr)? {
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
            format!("objectstore+file://{d}/bucket"),
            format!("objectstore+file:{d}/bucket-snix"),
            format!("{d}/blobs"),
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
            format!("objectstore+file://{d}/bucket"),
            format!("objectstore+file:{d}/bucket-snix"),
            "grpc+unix:///run/x.sock".into(),
            "grpc+unix:/run/x.sock?package=snix".into(),
            "grpc+http://[::1]:8000".into(),
        ] {
            if let Err(e) = directory_service_from_addr(&a) {
                panic!("{a}: {e}");
            }
        }
        // Both spellings of a path name the same store.
        assert!(dir.path().join("blobs").is_dir());
        assert!(dir.path().join("directories-snix.redb").is_file());
    }

    #[tokio::test]
    async fn objectstore_file_is_snix_bucket_layout_and_a_plain_path_our_blob_files() {
        use crate::castore::blob::{put_bytes, read_to_vec};
        use crate::castore::B3Digest;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let data = b"one directory, two programs";
        let digest = B3Digest::of(data);
        let hex = digest.to_hex();

        // snix's layout: an index object and a zstd chunk under blobs/ and chunks/, read
        // back through the other spelling of the same directory.
        let tvix = blob_service_from_addr(&format!("objectstore+file://{d}/bucket")).unwrap();
        assert_eq!(put_bytes(tvix.as_ref(), data).await.unwrap(), digest);
        let bucket = dir.path().join("bucket");
        assert!(bucket
            .join(format!("blobs/b3/{}/{hex}", &hex[..4]))
            .is_file());
        let chunk = std::fs::read(bucket.join(format!("chunks/b3/{}/{hex}", &hex[..4]))).unwrap();
        assert_eq!(zstd::decode_all(&chunk[..]).unwrap(), data);
        let snix = blob_service_from_addr(&format!("objectstore+file:{d}/bucket")).unwrap();
        assert_eq!(
            read_to_vec(snix.as_ref(), &digest).await.unwrap().unwrap(),
            data
        );

        // A plain path: our own blob files, the blob as one plain file.
        let plain = blob_service_from_addr(&format!("{d}/blobs")).unwrap();
        put_bytes(plain.as_ref(), data).await.unwrap();
        let local = LocalBlobService::open(&dir.path().join("blobs")).unwrap();
        assert_eq!(std::fs::read(local.blob_path(&digest)).unwrap(), data);
        assert!(!dir.path().join("blobs/blobs").exists());
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
            ("objectstore+file:rel", "must be absolute"),
            ("objectstore+file://host/abs", "must be absolute"),
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
        // object_store's local store takes no options: one given is a mistake.
        match directory_service_from_addr("objectstore+file:///x?region=garage") {
            Err(e) => assert!(e.to_string().contains("unknown option \"region\""), "{e}"),
            Ok(_) => panic!("an option to objectstore+file: was accepted"),
        }
    }
}
