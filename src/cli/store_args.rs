//! `--store`, `--blob-service-addr`, `--directory-service-addr`: which castore to use.
//! Flatten [`StoreArgs`] into any command that needs the store.

use crate::assembly::Castore;
use crate::castore::addr::{blob_service_from_addr, directory_service_from_addr, AddrError};
use crate::castore::blob::LocalBlobService;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::{BlobService, DirectoryService};
use std::path::PathBuf;
use std::sync::Arc;

/// Name of the blob directory inside a store directory.
pub const BLOBS_DIR: &str = "blobs";
/// Name of the directory database inside a store directory.
pub const DIRECTORIES_DB: &str = "directories.redb";

/// An opened castore: its blob and directory services.
pub type Services = (Arc<dyn BlobService>, Arc<dyn DirectoryService>);

/// Which castore to use.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Directory of the embedded store (blobs/ and directories.redb). Default:
    /// $XDG_DATA_HOME/tvix-build-vm, else ~/.local/share/tvix-build-vm; /var/lib/tvix-build-vm
    /// as root.
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Blob service address instead of the embedded store's blobs, as tvix or snix spell it:
    /// memory: or memory://, /abs/dir (local blob files), grpc+unix:/abs.sock or
    /// grpc+unix:///abs.sock, grpc+http://host:port (add ?package=snix for a snix-store),
    /// objectstore+s3://bucket/prefix?... or objectstore+file:/abs/dir (snix's bucket
    /// layout, shareable with a snix-store).
    #[arg(long, global = true, value_name = "ADDR")]
    pub blob_service_addr: Option<String>,
    /// Directory service address instead of the embedded store's directories.redb, as tvix
    /// or snix spell it: memory: or memory://, redb:/abs/file.redb or redb:///abs/file.redb,
    /// grpc+unix:/abs.sock or grpc+unix:///abs.sock, grpc+http://host:port (add
    /// ?package=snix for a snix-store), objectstore+s3://bucket/prefix?... or
    /// objectstore+file:/abs/dir (snix's bucket layout).
    #[arg(long, global = true, value_name = "ADDR")]
    pub directory_service_addr: Option<String>,
    /// With an object-store blob address (objectstore+s3://..., objectstore+file:...): keep
    /// the chunks read from the bucket in this local directory, least recently used out
    /// first (with --cache-size).
    #[arg(long, global = true, value_name = "DIR", requires = "cache_size")]
    pub cache_dir: Option<PathBuf>,
    /// The most the chunk cache of --cache-dir may hold, e.g. 20G.
    #[arg(long, global = true, value_name = "SIZE", requires = "cache_dir")]
    pub cache_size: Option<String>,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreArgsError {
    #[error("no default store directory: neither XDG_DATA_HOME nor HOME is set to an absolute path; pass --store DIR")]
    NoDefaultDir,
    #[error("creating store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the blob service")]
    Blobs(#[source] AddrError),
    #[error("--cache-dir and --cache-size apply to an object-store blob address (objectstore+s3://..., objectstore+file:/abs/dir or objectstore+memory:///), not {0:?}")]
    CacheWithoutBucket(String),
    #[error("--cache-dir {0}: must be an absolute path")]
    CacheDirRelative(PathBuf),
    #[error("opening the directory service")]
    Directories(#[source] AddrError),
    #[error("making the store directory absolute")]
    NoAbsolute(#[source] std::io::Error),
    #[error("opening the embedded store")]
    Embedded(#[source] crate::castore::Error),
}

/// The embedded store's services as themselves (for its garbage collection).
#[derive(Clone)]
pub struct Embedded {
    pub blobs: LocalBlobService,
    pub dirs: RedbDirectoryService,
}

fn absolute_env(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// The default embedded store directory for this user.
pub fn default_store_dir() -> Result<PathBuf, StoreArgsError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/tvix-build-vm"));
    }
    if let Some(d) = absolute_env("XDG_DATA_HOME") {
        return Ok(d.join("tvix-build-vm"));
    }
    absolute_env("HOME")
        .map(|h| h.join(".local/share/tvix-build-vm"))
        .ok_or(StoreArgsError::NoDefaultDir)
}

impl StoreArgs {
    /// The embedded store directory (`--store`, or the default).
    pub fn store_dir(&self) -> Result<PathBuf, StoreArgsError> {
        match &self.store {
            Some(d) => Ok(d.clone()),
            None => default_store_dir(),
        }
    }

    /// The blob and directory service addresses in effect.
    pub fn addrs(&self) -> Result<(String, String), StoreArgsError> {
        let needs_dir = self.blob_service_addr.is_none() || self.directory_service_addr.is_none();
        let dir = if needs_dir {
            let d = self.store_dir()?;
            let d = std::path::absolute(&d).map_err(|source| StoreArgsError::CreateDir {
                path: d.clone(),
                source,
            })?;
            std::fs::create_dir_all(&d).map_err(|source| StoreArgsError::CreateDir {
                path: d.clone(),
                source,
            })?;
            Some(d)
        } else {
            None
        };
        let blob = match (&self.blob_service_addr, &dir) {
            (Some(a), _) => a.clone(),
            (None, Some(d)) => d.join(BLOBS_DIR).display().to_string(),
            (None, None) => return Err(StoreArgsError::NoDefaultDir),
        };
        let blob = self.with_cache(blob)?;
        let directory = match (&self.directory_service_addr, &dir) {
            (Some(a), _) => a.clone(),
            (None, Some(d)) => format!("redb://{}", d.join(DIRECTORIES_DB).display()),
            (None, None) => return Err(StoreArgsError::NoDefaultDir),
        };
        Ok((blob, directory))
    }

    /// `blob` with the chunk cache of `--cache-dir`/`--cache-size` in its options (the
    /// object store's address carries them, see `castore::objectstore`).
    fn with_cache(&self, blob: String) -> Result<String, StoreArgsError> {
        let (Some(dir), Some(size)) = (&self.cache_dir, &self.cache_size) else {
            return Ok(blob);
        };
        if !blob.starts_with(crate::castore::objectstore::SCHEME_PREFIX) {
            return Err(StoreArgsError::CacheWithoutBucket(blob));
        }
        if !dir.is_absolute() {
            return Err(StoreArgsError::CacheDirRelative(dir.clone()));
        }
        let sep = if blob.contains('?') { '&' } else { '?' };
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("cache_dir", &dir.to_string_lossy())
            .append_pair("cache_size", size);
        Ok(format!("{blob}{sep}{}", query.finish()))
    }

    /// Opens both services. Call inside a tokio runtime (gRPC clients connect lazily).
    pub fn open(&self) -> Result<Services, StoreArgsError> {
        let c = self.castore()?;
        Ok((c.blobs, c.dirs))
    }

    /// Whether both services are the embedded store's (no address given for either).
    pub fn is_embedded(&self) -> bool {
        self.blob_service_addr.is_none() && self.directory_service_addr.is_none()
    }

    /// Like [`StoreArgs::castore`], and for the embedded store its services as themselves too.
    pub fn castore_embedded(&self) -> Result<(Castore, Option<Embedded>), StoreArgsError> {
        if !self.is_embedded() || self.cache_dir.is_some() {
            return Ok((self.castore()?, None));
        }
        let (blob_addr, dir_addr) = self.addrs()?;
        let dir = std::path::absolute(self.store_dir()?).map_err(StoreArgsError::NoAbsolute)?;
        let blobs =
            LocalBlobService::open(&dir.join(BLOBS_DIR)).map_err(StoreArgsError::Embedded)?;
        let dirs = RedbDirectoryService::open(&dir.join(DIRECTORIES_DB))
            .map_err(StoreArgsError::Embedded)?;
        let castore = Castore {
            blobs: Arc::new(blobs.clone()),
            dirs: Arc::new(dirs.clone()),
            blob_addr,
            dir_addr,
        };
        Ok((castore, Some(Embedded { blobs, dirs })))
    }

    /// Opens both services, keeping their addresses (a runner's helper processes open the
    /// ones they can share). Call inside a tokio runtime.
    pub fn castore(&self) -> Result<Castore, StoreArgsError> {
        let (blob_addr, dir_addr) = self.addrs()?;
        Ok(Castore {
            blobs: blob_service_from_addr(&blob_addr).map_err(StoreArgsError::Blobs)?,
            dirs: directory_service_from_addr(&dir_addr).map_err(StoreArgsError::Directories)?,
            blob_addr,
            dir_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_cache_goes_into_an_object_store_address_only() {
        let args = |blob: &str, dir: &str| StoreArgs {
            blob_service_addr: Some(blob.into()),
            directory_service_addr: Some("memory:".into()),
            cache_dir: Some(PathBuf::from(dir)),
            cache_size: Some("1G".into()),
            ..Default::default()
        };
        let (blob, _) = args("objectstore+s3://b/p?region=garage", "/var/cache/c d")
            .addrs()
            .unwrap();
        assert_eq!(
            blob,
            "objectstore+s3://b/p?region=garage&cache_dir=%2Fvar%2Fcache%2Fc+d&cache_size=1G"
        );
        let (blob, _) = args("objectstore+memory:///", "/c").addrs().unwrap();
        assert_eq!(blob, "objectstore+memory:///?cache_dir=%2Fc&cache_size=1G");
        assert!(matches!(
            args("grpc+unix:///s.sock", "/c").addrs(),
            Err(StoreArgsError::CacheWithoutBucket(_))
        ));
        assert!(matches!(
            args("/blobs", "/c").addrs(),
            Err(StoreArgsError::CacheWithoutBucket(_))
        ));
        // snix's layout in a local directory is a bucket like any other.
        let (blob, _) = args("objectstore+file:///b", "/c").addrs().unwrap();
        assert_eq!(blob, "objectstore+file:///b?cache_dir=%2Fc&cache_size=1G");
        assert!(matches!(
            args("objectstore+memory:///", "rel").addrs(),
            Err(StoreArgsError::CacheDirRelative(_))
        ));
    }

    #[test]
    fn store_dir_holds_blobs_and_redb_side_by_side() {
        let tmp = tempfile::tempdir().unwrap();
        let args = StoreArgs {
            store: Some(tmp.path().join("s")),
            ..Default::default()
        };
        let (b, d) = args.addrs().unwrap();
        // Our own blob files, spelt as a plain path: `objectstore+file:` is snix's layout.
        assert_eq!(b, format!("{}/s/blobs", tmp.path().display()));
        assert_eq!(
            d,
            format!("redb://{}/s/directories.redb", tmp.path().display())
        );
        assert!(tmp.path().join("s").is_dir());
    }

    #[test]
    fn addresses_override_each_service() {
        let args = StoreArgs {
            store: None,
            blob_service_addr: Some("memory://".into()),
            directory_service_addr: Some("grpc+unix:///x.sock".into()),
            ..Default::default()
        };
        assert_eq!(
            args.addrs().unwrap(),
            ("memory://".to_string(), "grpc+unix:///x.sock".to_string())
        );
    }
}
