//! Directories in an object store: each closure one zstd-compressed object of u32
//! length-delimited protobuf Directories, root first (see the module above).
//!
//! The shared layout only serves directories through a closure object keyed by its root.
//! This service's contract also serves any stored directory on its own, so a closure
//! upload writes one closure object per directory in it, leaves first and the root last:
//! once the root's object is visible, so is every object below it.

use super::{decompress_bounded, get_bounded, store_error, Bucket};
use crate::castore::directory::Directory;
use crate::castore::directory_service::closure::{check_stored_refs, GetValidator, PutValidator};
use crate::castore::directory_service::{put_single, DirectoryPutter, DirectoryService};
use crate::castore::{B3Digest, Error};
use crate::proto::tvix::castore::v1 as pb;
use futures::stream::BoxStream;
use object_store::{ObjectStoreExt, PutPayload};
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};

/// The largest decompressed closure object accepted.
pub const MAX_CLOSURE_OBJECT: usize = 1 << 30;
/// The largest single directory message accepted in a closure object.
pub const MAX_DIRECTORY_MESSAGE: usize = 1 << 20;

/// Directories in a bucket; cheap to clone.
#[derive(Clone)]
pub struct ObjectStoreDirectoryService {
    bucket: Bucket,
}

impl ObjectStoreDirectoryService {
    pub fn new(bucket: Bucket) -> Self {
        Self { bucket }
    }
}

/// Reads and checks the closure object of `root`: `None` if absent; otherwise every
/// directory in it, root first, each referenced by one before it, none missing.
async fn read_closure(bucket: &Bucket, root: &B3Digest) -> Result<Option<Vec<Directory>>, Error> {
    let key = bucket.dirs_key(root);
    // Compressed, the object is smaller than its contents may be.
    let Some(raw) = get_bounded(
        bucket,
        &key,
        MAX_CLOSURE_OBJECT as u64,
        "directory closure",
        *root,
    )
    .await?
    else {
        return Ok(None);
    };
    let data = decompress_bounded(&raw, MAX_CLOSURE_OBJECT, "directory closure", *root)?;
    let corrupt = |reason: String| Error::Corrupt {
        what: "directory closure",
        digest: *root,
        reason,
    };
    let mut validator = GetValidator::new(*root);
    let mut out = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(corrupt("a truncated frame length".into()));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_DIRECTORY_MESSAGE || len > tail.len() {
            return Err(corrupt(format!("a frame of {len} bytes")));
        }
        let (msg, tail) = tail.split_at(len);
        rest = tail;
        let proto = pb::Directory::decode(msg).map_err(|e| corrupt(format!("protobuf: {e}")))?;
        let dir = Directory::try_from(proto).map_err(|e| corrupt(format!("a directory: {e}")))?;
        validator
            .accept(&dir)
            .map_err(|e| corrupt(crate::castore::error::error_chain(&e)))?;
        out.push(dir);
    }
    validator
        .finish()
        .map_err(|e| corrupt(crate::castore::error::error_chain(&e)))?;
    Ok(Some(out))
}

/// Encodes a closure (root first) as one compressed object.
fn encode_closure(dirs: &[&Directory]) -> Result<Vec<u8>, Error> {
    let mut framed = Vec::new();
    for d in dirs {
        let msg = d.encode();
        let len = u32::try_from(msg.len())
            .ok()
            .filter(|l| *l as usize <= MAX_DIRECTORY_MESSAGE)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "directory {} encodes to {} bytes, more than {MAX_DIRECTORY_MESSAGE}",
                    d.digest(),
                    msg.len()
                ))
            })?;
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&msg);
    }
    zstd::bulk::compress(&framed, zstd::DEFAULT_COMPRESSION_LEVEL)
        .map_err(|e| Error::io("compressing a directory closure", e))
}

/// The closure of `root` within `all`, breadth first, each directory once.
fn closure_of<'a>(
    root: &B3Digest,
    all: &'a HashMap<B3Digest, Directory>,
) -> Result<Vec<&'a Directory>, Error> {
    let mut out = Vec::new();
    let mut queue = VecDeque::from([*root]);
    let mut seen = HashSet::from([*root]);
    while let Some(d) = queue.pop_front() {
        let dir = all.get(&d).ok_or(Error::DirectoryNotFound(d))?;
        for (_, child, _) in dir.directories() {
            if seen.insert(*child) {
                queue.push_back(*child);
            }
        }
        out.push(dir);
    }
    Ok(out)
}

#[async_trait::async_trait]
impl DirectoryService for ObjectStoreDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        Ok(read_closure(&self.bucket, digest)
            .await?
            .and_then(|c| c.into_iter().next()))
    }

    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        put_single(self, directory).await
    }

    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>> {
        let bucket = self.bucket.clone();
        let root = *root;
        Box::pin(async_stream::try_stream! {
            let dirs = read_closure(&bucket, &root)
                .await?
                .ok_or(Error::DirectoryNotFound(root))?;
            for d in dirs {
                yield d;
            }
        })
    }

    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
        Box::new(ObjectStorePutter {
            bucket: self.bucket.clone(),
            validator: Some(PutValidator::new()),
            stored: HashMap::new(),
        })
    }
}

struct ObjectStorePutter {
    bucket: Bucket,
    /// `None` once closed.
    validator: Option<PutValidator>,
    /// Closures of already stored directories the upload refers to.
    stored: HashMap<B3Digest, Directory>,
}

#[async_trait::async_trait]
impl DirectoryPutter for ObjectStorePutter {
    async fn put(&mut self, directory: Directory) -> Result<(), Error> {
        let v = self
            .validator
            .as_mut()
            .ok_or_else(|| Error::InvalidRequest("put after close".into()))?;
        let refs = v.add(directory)?;
        for r in &refs {
            if !self.stored.contains_key(&r.child) {
                for d in read_closure(&self.bucket, &r.child)
                    .await?
                    .unwrap_or_default()
                {
                    self.stored.insert(d.digest(), d);
                }
            }
        }
        let stored = &self.stored;
        check_stored_refs(refs, |d| {
            let found = stored.get(&d).cloned();
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
        let order: Vec<B3Digest> = dirs.iter().map(|(d, _)| *d).collect();
        let mut all = std::mem::take(&mut self.stored);
        all.extend(dirs);
        // Upload order is leaves to root, so each object is written after those below it.
        for digest in order {
            let key = self.bucket.dirs_key(&digest);
            match self.bucket.store.head(&key).await {
                Ok(_) => continue,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(format!("looking up {key}"), e)),
            }
            let object = encode_closure(&closure_of(&digest, &all)?)?;
            self.bucket
                .store
                .put(&key, PutPayload::from(object))
                .await
                .map_err(|e| store_error(format!("writing {key}"), e))?;
        }
        Ok(root)
    }
}
