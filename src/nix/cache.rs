//! The input cache: store path -> castore root node, persisted as one small file per store
//! path in the cache directory, so a valid store path is read from the Nix store once and
//! later builds reuse its node without reading it again.
//!
//! A valid store path never changes while it stays valid, but it can be garbage-collected
//! and built again with other bytes under the same name. So each entry also records the
//! identity of the path on the host (device, inode, ctime); a path whose identity changed
//! (rebuilt, repaired, hard-linked by `nix-store --optimise`) is imported again. Looking an
//! entry up costs one `lstat` and one small read, never a read of the store path.
//!
//! Entries are written to a temporary file and renamed into place, so concurrent builders
//! (Nix runs `max-jobs` of them) share the cache without a lock: the worst case is two of
//! them importing the same path at once and writing the same entry.
//!
//! The entry is only a claim that the castore holds the node: [`import_inputs`] checks that
//! the root is still there (one `has`/`get` per input) before reusing it.

use super::build_json::NixBuild;
use super::digest_only::DigestOnly;
use super::NixError;
use crate::castore::directory_service::MemoryDirectoryService;
use crate::castore::import::import_path;
use crate::castore::{BlobService, DirectoryService, Node, PathComponent};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The first line of every entry; bumped if the layout changes.
const MAGIC: &str = "tvix-build-vm nix input v1";
/// How many input paths are imported at once (each imports several files at once itself).
const CONCURRENT_INPUTS: usize = 4;
/// Entries are tiny (a node); anything larger is not ours.
const MAX_ENTRY_BYTES: u64 = 64 * 1024;

/// The identity of a store path on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }

    fn header(&self) -> String {
        format!(
            "{MAGIC} {} {} {} {}\n",
            self.dev, self.ino, self.ctime, self.ctime_nsec
        )
    }
}

/// What importing a build's inputs did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Inputs whose cached node was reused.
    pub reused: usize,
    /// Inputs read from the Nix store and imported (uploaded).
    pub imported: usize,
    /// Inputs read and hashed, and found whole in the castore: nothing uploaded (only with
    /// [`InputCache::asking_first`]).
    pub present: usize,
    /// Bytes of regular files of the inputs that were read from the Nix store (an input
    /// hashed first and then uploaded is read twice but counted once).
    pub bytes_read: u64,
}

/// What happened to one input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Reused,
    Present,
    Imported,
}

/// The persisted map; see the module documentation.
#[derive(Clone, Debug)]
pub struct InputCache {
    dir: PathBuf,
    ask_first: bool,
}

impl InputCache {
    /// Opens (creating it if needed) the cache in `dir`. The cache belongs to one castore:
    /// keep it next to that store's data.
    pub fn open(dir: &Path) -> Result<Self, NixError> {
        std::fs::create_dir_all(dir).map_err(|source| NixError::Cache {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            ask_first: false,
        })
    }

    /// On a cache miss, first hash the store path locally ([`DigestOnly`]) and ask the
    /// castore for its root; upload only if it is missing. For a remote castore, where the
    /// cache may not know what the server already holds (another state dir, another
    /// machine) and sending costs more than reading twice.
    pub fn asking_first(mut self) -> Self {
        self.ask_first = true;
        self
    }

    fn entry_path(&self, base: &PathComponent) -> PathBuf {
        self.dir.join(std::ffi::OsStr::from_bytes(base.as_ref()))
    }

    /// The cached node of the store path at `real`, if its entry exists and the path is
    /// still the one that was imported.
    pub fn lookup(&self, real: &Path, base: &PathComponent) -> Result<Option<Node>, NixError> {
        let meta = std::fs::symlink_metadata(real).map_err(|source| NixError::Io {
            path: real.to_owned(),
            source,
        })?;
        let entry = self.entry_path(base);
        let bytes = match std::fs::File::open(&entry) {
            Ok(f) => {
                use std::io::Read;
                let mut buf = Vec::new();
                f.take(MAX_ENTRY_BYTES)
                    .read_to_end(&mut buf)
                    .map_err(|source| NixError::Cache {
                        path: entry.clone(),
                        source,
                    })?;
                buf
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(NixError::Cache {
                    path: entry,
                    source,
                })
            }
        };
        let header = Identity::of(&meta).header();
        let Some(body) = bytes.strip_prefix(header.as_bytes()) else {
            return Ok(None);
        };
        // An entry that does not decode is treated as absent and rewritten by the import.
        let Ok(proto) = crate::proto::castore::Node::decode(body) else {
            return Ok(None);
        };
        match Node::from_proto(proto) {
            Ok((name, node)) if name == *base => Ok(Some(node)),
            _ => Ok(None),
        }
    }

    /// Records `node` as the import of the store path at `real`, whose metadata was taken
    /// before the import started (a path that changed meanwhile then simply misses later).
    fn record(
        &self,
        base: &PathComponent,
        before: &std::fs::Metadata,
        node: &Node,
    ) -> Result<(), NixError> {
        let mut bytes = Identity::of(before).header().into_bytes();
        node.to_proto(base.clone().into())
            .encode(&mut bytes)
            .map_err(|e| NixError::Cache {
                path: self.entry_path(base),
                source: std::io::Error::other(e),
            })?;
        let entry = self.entry_path(base);
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(entry.file_name().unwrap_or_default());
        tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4()));
        let tmp = self.dir.join(tmp_name);
        let err = |source| NixError::Cache {
            path: entry.clone(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(err)?;
        std::fs::rename(&tmp, &entry).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }
}

/// Whether the castore still holds the root of `node` (its closure was stored before the
/// root, so the root stands for it).
async fn store_has(
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    node: &Node,
) -> Result<bool, NixError> {
    match node {
        Node::Symlink { .. } => Ok(true),
        Node::File { digest, .. } => blobs.has(digest).await.map_err(NixError::Store),
        Node::Directory { digest, .. } => Ok(directories
            .get(digest)
            .await
            .map_err(NixError::Store)?
            .is_some()),
    }
}

/// Bytes in regular files under `path` (what an import reads).
fn file_bytes(path: &Path) -> std::io::Result<u64> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.is_dir() {
        return Ok(0);
    }
    let mut total = 0u64;
    for entry in std::fs::read_dir(path)? {
        total = total.saturating_add(file_bytes(&entry?.path())?);
    }
    Ok(total)
}

/// One node per input path of `build`, from the cache where it holds, imported from
/// `realStoreDir` (and recorded) where not.
pub async fn import_inputs(
    cache: &InputCache,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    build: &NixBuild,
) -> Result<(Vec<(PathComponent, Node)>, ImportStats), NixError> {
    let results: Vec<(PathComponent, Node, Fate, u64)> =
        futures::stream::iter(build.inputs.iter().cloned())
            .map(|base| {
                let blobs = blobs.clone();
                let directories = directories.clone();
                let real = build.real_output_path(&base);
                async move {
                    if let Some(node) = cache.lookup(&real, &base)? {
                        if store_has(blobs.as_ref(), directories.as_ref(), &node).await? {
                            return Ok((base, node, Fate::Reused, 0));
                        }
                    }
                    let before =
                        std::fs::symlink_metadata(&real).map_err(|source| NixError::Io {
                            path: real.clone(),
                            source,
                        })?;
                    let import_err = |source| NixError::Import {
                        path: real.clone(),
                        source: Box::new(source),
                    };
                    let mut fate = Fate::Imported;
                    let mut node = None;
                    if cache.ask_first {
                        let probe = import_path(
                            Arc::new(DigestOnly),
                            Arc::new(MemoryDirectoryService::new()),
                            &real,
                        )
                        .await
                        .map_err(import_err)?;
                        if store_has(blobs.as_ref(), directories.as_ref(), &probe).await? {
                            fate = Fate::Present;
                            node = Some(probe);
                        }
                    }
                    let node = match node {
                        Some(n) => n,
                        None => import_path(blobs, directories, &real)
                            .await
                            .map_err(import_err)?,
                    };
                    let walk = real.clone();
                    let bytes = tokio::task::spawn_blocking(move || file_bytes(&walk))
                        .await
                        .map_err(|e| NixError::Io {
                            path: real.clone(),
                            source: std::io::Error::other(e),
                        })?
                        .map_err(|source| NixError::Io {
                            path: real.clone(),
                            source,
                        })?;
                    cache.record(&base, &before, &node)?;
                    Ok::<_, NixError>((base, node, fate, bytes))
                }
            })
            .buffer_unordered(CONCURRENT_INPUTS)
            .try_collect()
            .await?;
    let mut stats = ImportStats::default();
    let mut nodes = Vec::with_capacity(results.len());
    for (base, node, fate, bytes) in results {
        match fate {
            Fate::Reused => stats.reused += 1,
            Fate::Present => stats.present += 1,
            Fate::Imported => stats.imported += 1,
        }
        stats.bytes_read = stats.bytes_read.saturating_add(bytes);
        nodes.push((base, node));
    }
    nodes.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((nodes, stats))
}
