//! Where the filesystem gets directories and blobs: the castore, behind a small synchronous
//! interface that the FUSE worker threads call.

use super::blob::BlobBody;
use super::error::FsError;
use super::listing::Listing;
use crate::castore::{B3Digest, BlobService, DirectoryService};
use std::path::PathBuf;
use std::sync::Arc;
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

/// Maps a blob digest to the local file holding exactly that blob.
pub type LocalBlobPath = Box<dyn Fn(&B3Digest) -> PathBuf + Send + Sync>;

/// A [`ContentSource`] over castore services.
pub struct CastoreSource {
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    rt: Handle,
    local: Option<LocalBlobPath>,
}

impl CastoreSource {
    /// `rt` runs the services' futures; it must not be the thread calling the source.
    pub fn new(
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
        rt: Handle,
    ) -> Self {
        Self {
            blobs,
            directories,
            rt,
            local: None,
        }
    }

    /// Reads blobs from local files instead of through the blob service: `path` names the
    /// file of a digest in a local blob store (the store is trusted to hold only complete
    /// blobs under their digests). Such reads go straight from the file into guest memory.
    pub fn with_local_files(mut self, path: LocalBlobPath) -> Self {
        self.local = Some(path);
        self
    }

    fn open_local(&self, digest: &B3Digest, path: PathBuf) -> Result<BlobBody, FsError> {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
            .open(&path)
            .or_else(|e| {
                // O_NOATIME is refused (EPERM) for files the daemon does not own.
                if e.raw_os_error() == Some(libc::EPERM) {
                    std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                } else {
                    Err(e)
                }
            }) {
            Ok(file) => Ok(BlobBody::File(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(FsError::BlobMissing { digest: *digest })
            }
            Err(source) => Err(FsError::BlobRead {
                digest: *digest,
                offset: 0,
                source,
            }),
        }
    }
}

impl ContentSource for CastoreSource {
    fn listing(&self, digest: &B3Digest) -> Result<Listing, FsError> {
        let dir = self
            .rt
            .block_on(self.directories.get(digest))
            .map_err(|source| FsError::Castore {
                what: "directory",
                digest: *digest,
                source: Box::new(source),
            })?
            .ok_or(FsError::DirectoryMissing { digest: *digest })?;
        // The directory service is outside this process (possibly remote): do not serve a
        // directory under a digest it does not have.
        let got = dir.digest();
        if got != *digest {
            return Err(FsError::DirectoryDigestMismatch {
                digest: *digest,
                got,
            });
        }
        Listing::from_directory(digest, &dir)
    }

    fn open_blob(&self, digest: &B3Digest) -> Result<BlobBody, FsError> {
        if let Some(path) = &self.local {
            return self.open_local(digest, path(digest));
        }
        let reader = self
            .rt
            .block_on(self.blobs.open_read(digest))
            .map_err(|source| FsError::Castore {
                what: "blob",
                digest: *digest,
                source: Box::new(source),
            })?
            .ok_or(FsError::BlobMissing { digest: *digest })?;
        Ok(BlobBody::Stream(reader))
    }

    fn runtime(&self) -> &Handle {
        &self.rt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::castore::directory::{Directory, Node, PathComponent};
    use crate::castore::{BlobReader, BlobWriter, DirectoryPutter, Error};
    use crate::fs::{CastoreFs, FsLimits};
    use futures::stream::BoxStream;
    use std::collections::HashMap;
    use virtiofsd::filesystem::{Context, FileSystem, ZeroCopyWriter};
    use virtiofsd::soft_idmap::{GuestGid, GuestUid};

    #[derive(Default)]
    struct MapBlobs(HashMap<B3Digest, Vec<u8>>);

    #[async_trait::async_trait]
    impl BlobService for MapBlobs {
        async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
            Ok(self.0.contains_key(digest))
        }
        async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
            Ok(self
                .0
                .get(digest)
                .map(|b| Box::new(std::io::Cursor::new(b.clone())) as Box<dyn BlobReader>))
        }
        async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
            unimplemented!("the filesystem never writes")
        }
    }

    #[derive(Default)]
    struct MapDirs(HashMap<B3Digest, Directory>);

    #[async_trait::async_trait]
    impl DirectoryService for MapDirs {
        async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
            Ok(self.0.get(digest).cloned())
        }
        async fn put(&self, _directory: Directory) -> Result<B3Digest, Error> {
            unimplemented!("the filesystem never writes")
        }
        fn get_recursive(&self, _root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>> {
            unimplemented!("the filesystem fetches lazily")
        }
        fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
            unimplemented!("the filesystem never writes")
        }
    }

    struct VecWriter(Vec<u8>);
    impl ZeroCopyWriter for VecWriter {
        fn read_from_file_at(
            &mut self,
            f: &std::fs::File,
            count: usize,
            off: u64,
            _flags: Option<virtiofsd::oslib::ReadvFlags>,
        ) -> std::io::Result<usize> {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0; count];
            let n = f.read_at(&mut buf, off)?;
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn name(s: &str) -> PathComponent {
        PathComponent::try_from(s).unwrap()
    }

    #[test]
    fn serves_castore_directories_and_blobs() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let content = b"hello from the castore".to_vec();
        let blob = B3Digest::of(&content);
        let mut inner = Directory::new();
        inner
            .try_insert(
                name("greeting"),
                Node::File {
                    digest: blob,
                    size: content.len() as u64,
                    executable: false,
                },
            )
            .unwrap();
        let mut blobs = MapBlobs::default();
        blobs.0.insert(blob, content.clone());
        let mut dirs = MapDirs::default();
        // Stored under a wrong digest too, as a lying service would.
        let liar = B3Digest::of(b"not that directory");
        dirs.0.insert(liar, inner.clone());
        dirs.0.insert(inner.digest(), inner.clone());

        let mut root = Directory::new();
        root.try_insert(name("good"), inner.as_node()).unwrap();
        root.try_insert(
            name("bad"),
            Node::Directory {
                digest: liar,
                size: 1,
            },
        )
        .unwrap();
        root.try_insert(
            name("missing"),
            Node::Directory {
                digest: B3Digest::of(b"absent"),
                size: 1,
            },
        )
        .unwrap();

        let source = CastoreSource::new(Arc::new(blobs), Arc::new(dirs), rt.handle().clone());
        let root = Listing::from_directory(&root.digest(), &root).unwrap();
        let fs = CastoreFs::new(root, Arc::new(source), FsLimits::default());
        let ctx = Context {
            uid: GuestUid::from(0),
            gid: GuestGid::from(0),
            pid: 1,
        };
        let good = fs.lookup(ctx, 1, c"good").unwrap();
        let f = fs.lookup(ctx, good.inode, c"greeting").unwrap();
        assert_eq!(f.attr.size, content.len() as u64);
        let h = fs.open(ctx, f.inode, false, 0).unwrap().0.unwrap();
        let mut w = VecWriter(Vec::new());
        let n = fs.read(ctx, f.inode, h, &mut w, 5, 6, None, 0).unwrap();
        assert_eq!((n, w.0.as_slice()), (5, &b"from "[..]));

        // The same through local files, as the embedded blob store provides them.
        let store = tempfile::tempdir().unwrap();
        std::fs::write(store.path().join(blob.to_hex()), &content).unwrap();
        let dir = store.path().to_owned();
        let local = CastoreSource::new(
            Arc::new(MapBlobs::default()),
            Arc::new(MapDirs::default()),
            rt.handle().clone(),
        )
        .with_local_files(Box::new(move |d: &B3Digest| dir.join(d.to_hex())));
        match local.open_blob(&blob).unwrap() {
            crate::fs::blob::BlobBody::File(f) => {
                assert_eq!(f.metadata().unwrap().len(), content.len() as u64)
            }
            crate::fs::blob::BlobBody::Stream(_) => panic!("expected a local file"),
        }
        assert!(matches!(
            local.open_blob(&B3Digest::of(b"absent")),
            Err(FsError::BlobMissing { .. })
        ));

        for bad in [c"bad", c"missing"] {
            let d = fs.lookup(ctx, 1, bad).unwrap();
            let err = fs.lookup(ctx, d.inode, c"greeting").err().unwrap();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{bad:?}");
        }
    }
}
