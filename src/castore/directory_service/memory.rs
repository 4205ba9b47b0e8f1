//! Directories in memory.

use super::closure::{check_stored_refs, PutValidator};
use super::{bfs_stream, put_single, DirectoryPutter, DirectoryService};
use crate::castore::directory::Directory;
use crate::castore::{B3Digest, Error};
use futures::stream::BoxStream;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

type Map = Arc<RwLock<HashMap<B3Digest, Directory>>>;

/// Keeps directories in a hash map; cheap to clone (clones share the map).
#[derive(Clone, Default)]
pub struct MemoryDirectoryService {
    map: Map,
}

impl MemoryDirectoryService {
    pub fn new() -> Self {
        Self::default()
    }
}

fn lookup(map: &Map, digest: &B3Digest) -> Option<Directory> {
    // A poisoned lock only means another thread panicked mid-insert; HashMap inserts are
    // not observable half-done, so the data is still consistent.
    let guard = map.read().unwrap_or_else(|p| p.into_inner());
    guard.get(digest).cloned()
}

#[async_trait::async_trait]
impl DirectoryService for MemoryDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        Ok(lookup(&self.map, digest))
    }

    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        put_single(self, directory).await
    }

    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>> {
        let map = self.map.clone();
        bfs_stream(*root, move |d| {
            let found = lookup(&map, &d);
            async move { Ok(found) }
        })
    }

    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
        Box::new(MemoryPutter {
            map: self.map.clone(),
            validator: Some(PutValidator::new()),
        })
    }
}

struct MemoryPutter {
    map: Map,
    /// `None` once closed.
    validator: Option<PutValidator>,
}

#[async_trait::async_trait]
impl DirectoryPutter for MemoryPutter {
    async fn put(&mut self, directory: Directory) -> Result<(), Error> {
        let v = self
            .validator
            .as_mut()
            .ok_or_else(|| Error::InvalidRequest("put after close".into()))?;
        let refs = v.add(directory)?;
        let map = &self.map;
        check_stored_refs(refs, |d| {
            let found = lookup(map, &d);
            async move { Ok(found) }
        })
        .await
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        let v = self
            .validator
            .take()
            .ok_or_else(|| Error::InvalidRequest("closed twice".into()))?;
        let (root, dirs) = v.finish()?;
        let mut guard = self.map.write().unwrap_or_else(|p| p.into_inner());
        guard.extend(dirs);
        Ok(root)
    }
}
