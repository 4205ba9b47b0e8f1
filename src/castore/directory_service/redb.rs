//! Directories in a redb file: key = digest, value = canonical encoding.
//!
//! redb transactions are blocking, so every access runs on tokio's blocking pool. A closure
//! upload is buffered and written in one transaction at `close`, so nothing of a refused or
//! abandoned upload is ever stored.

use super::closure::{check_stored_refs, PutValidator};
use super::{bfs_stream, put_single, DirectoryPutter, DirectoryService};
use crate::castore::directory::Directory;
use crate::castore::{B3Digest, Error};
use crate::proto::castore as pb;
use futures::stream::BoxStream;
use prost::Message;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TABLE: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("directories");

/// The embedded default directory store.
#[derive(Clone)]
pub struct RedbDirectoryService {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl RedbDirectoryService {
    /// Opens the database at `path`, creating it (not its parent directory) if absent.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let ctx = || format!("opening {}", path.display());
        let db = Database::create(path).map_err(|e| Error::db(ctx(), e))?;
        // Create the table up front so readers never meet a missing table.
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        txn.open_table(TABLE).map_err(|e| Error::db(ctx(), e))?;
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(Self {
            db: Arc::new(db),
            path: Arc::new(path.to_owned()),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &Path) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path))
            .await
            .map_err(|e| Error::io("directory database task failed", std::io::Error::other(e)))?
    }
}

fn read(db: &Database, path: &Path, digest: &B3Digest) -> Result<Option<Directory>, Error> {
    let ctx = || format!("reading directory {digest} from {}", path.display());
    let txn = db.begin_read().map_err(|e| Error::db(ctx(), e))?;
    let table = txn.open_table(TABLE).map_err(|e| Error::db(ctx(), e))?;
    let Some(value) = table
        .get(digest.as_bytes())
        .map_err(|e| Error::db(ctx(), e))?
    else {
        return Ok(None);
    };
    // Re-check what comes off disk: a corrupt entry must not pass for a valid directory.
    let raw = value.value();
    let pb = pb::Directory::decode(raw).map_err(|e| {
        Error::io(
            ctx(),
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    let dir =
        Directory::try_from(pb).map_err(|source| Error::invalid_directory(*digest, source))?;
    if dir.digest() != *digest {
        return Err(Error::io(
            ctx(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("stored entry has digest {}", dir.digest()),
            ),
        ));
    }
    Ok(Some(dir))
}

#[async_trait::async_trait]
impl DirectoryService for RedbDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        let digest = *digest;
        self.blocking(move |db, path| read(db, path, &digest)).await
    }

    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        put_single(self, directory).await
    }

    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>> {
        let svc = self.clone();
        bfs_stream(*root, move |d| {
            let svc = svc.clone();
            async move { svc.get(&d).await }
        })
    }

    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
        Box::new(RedbPutter {
            svc: self.clone(),
            validator: Some(PutValidator::new()),
        })
    }
}

struct RedbPutter {
    svc: RedbDirectoryService,
    /// `None` once closed.
    validator: Option<PutValidator>,
}

#[async_trait::async_trait]
impl DirectoryPutter for RedbPutter {
    async fn put(&mut self, directory: Directory) -> Result<(), Error> {
        let v = self
            .validator
            .as_mut()
            .ok_or_else(|| Error::InvalidRequest("put after close".into()))?;
        let refs = v.add(directory)?;
        let svc = &self.svc;
        check_stored_refs(refs, |d| async move { svc.get(&d).await }).await
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        let v = self
            .validator
            .take()
            .ok_or_else(|| Error::InvalidRequest("closed twice".into()))?;
        let (root, dirs) = v.finish()?;
        self.svc
            .blocking(move |db, path| {
                let ctx = || format!("writing directories to {}", path.display());
                let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
                {
                    let mut table = txn.open_table(TABLE).map_err(|e| Error::db(ctx(), e))?;
                    for (digest, dir) in dirs {
                        table
                            .insert(digest.as_bytes(), dir.encode().as_slice())
                            .map_err(|e| Error::db(ctx(), e))?;
                    }
                }
                txn.commit().map_err(|e| Error::db(ctx(), e))?;
                Ok(())
            })
            .await?;
        Ok(root)
    }
}
