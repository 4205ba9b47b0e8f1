//! Directories in a redb file: key = digest, value = canonical encoding.
//!
//! redb transactions are blocking, so every access runs on tokio's blocking pool. A closure
//! upload is buffered and written in one transaction at `close`, so nothing of a refused or
//! abandoned upload is ever stored.
//!
//! Two more tables serve garbage collection (`castore::gc`), in the same file so one lock
//! covers everything: when each directory was last put (its grace period), and the pins.

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
/// When each directory was last put, in milliseconds since the epoch. A directory without an
/// entry (stored before this table existed) counts as put long ago.
pub(crate) const PUT_TIMES: TableDefinition<&[u8; 32], u64> =
    TableDefinition::new("directory_put_times");
/// Pins: key = the pinned node's proto encoding; value = (seconds since the epoch, who).
pub(crate) const PINS: TableDefinition<&[u8], (u64, &str)> = TableDefinition::new("pins");
/// Build records: key = build id; value = (finished, seconds since the epoch; the root
/// digests, 32 bytes each).
pub(crate) const BUILDS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("builds");

/// The directories table (for the GC's walk).
pub(crate) const DIRECTORIES: TableDefinition<&[u8; 32], &[u8]> = TABLE;

/// Milliseconds since the epoch, now.
pub(crate) fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Seconds since the epoch, now.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
        txn.open_table(PUT_TIMES).map_err(|e| Error::db(ctx(), e))?;
        txn.open_table(PINS).map_err(|e| Error::db(ctx(), e))?;
        txn.open_table(BUILDS).map_err(|e| Error::db(ctx(), e))?;
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(Self {
            db: Arc::new(db),
            path: Arc::new(path.to_owned()),
        })
    }

    /// The database (for the GC, which walks and deletes in its own transactions).
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn blocking<T: Send + 'static>(
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
        crate::castore::gc::touch([&digest]);
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
        // Register with the GC barrier before checking that the children are present.
        let mut touched = vec![directory.digest()];
        touched.extend(directory.nodes().filter_map(|(_, n)| n.digest().copied()));
        crate::castore::gc::touch(&touched);
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
                    let mut times = txn.open_table(PUT_TIMES).map_err(|e| Error::db(ctx(), e))?;
                    let now = now_millis();
                    for (digest, dir) in dirs {
                        table
                            .insert(digest.as_bytes(), dir.encode().as_slice())
                            .map_err(|e| Error::db(ctx(), e))?;
                        // A re-put refreshes the time too: the uploader relies on it again.
                        times
                            .insert(digest.as_bytes(), now)
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
