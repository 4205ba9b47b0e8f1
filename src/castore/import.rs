//! Host paths into the castore: a file, an executable file, a symlink or a directory tree
//! becomes a root [`Node`], with its blobs and directory closure uploaded.
//!
//! Files are streamed (never held whole in memory) with [`BlobService::put_file`], several at
//! once, and [`BlobService::sync`] makes them durable before any directory that refers to
//! them is stored (and before the root node is returned). A file
//! of [`PREHASH_MIN`] bytes or more is first hashed (on all cores), and not uploaded again if
//! the store already has it. Sockets, FIFOs and device
//! nodes are refused, as are names the castore cannot hold; errors name the path.

use super::directory::{
    Directory, NameError, Node, PathComponent, SymlinkTarget, SymlinkTargetError, ValidationError,
};
use super::{B3Digest, BlobService, DirectoryService, Error};
use futures::{StreamExt, TryStreamExt};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(test)]
mod tests;

/// Files at least this large are hashed before upload (on all cores), to skip the upload
/// of a blob the store already has.
pub const PREHASH_MIN: u64 = 4 << 20;
/// How many files are uploaded at once.
pub const CONCURRENT_UPLOADS: usize = 8;

/// Why a path could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: is a {kind}; only files, directories and symlinks can be imported")]
    UnsupportedType { path: PathBuf, kind: &'static str },
    #[error("{path}: the name cannot be stored")]
    InvalidName {
        path: PathBuf,
        #[source]
        source: NameError,
    },
    #[error("{path}: the symlink target cannot be stored")]
    InvalidSymlinkTarget {
        path: PathBuf,
        #[source]
        source: SymlinkTargetError,
    },
    #[error("{path}: invalid directory")]
    Directory {
        path: PathBuf,
        #[source]
        source: ValidationError,
    },
    #[error("{path}: the file changed while it was imported")]
    Changed { path: PathBuf },
    #[error("{path}: storing")]
    Store {
        path: PathBuf,
        #[source]
        source: Error,
    },
    #[error("import task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The tree as walked, before upload.
enum Walked {
    File {
        index: usize,
        executable: bool,
    },
    Symlink(SymlinkTarget),
    Directory {
        path: PathBuf,
        entries: Vec<(PathComponent, Walked)>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Walks `path` without following symlinks; collects the files to upload in `files`.
fn walk(path: &Path, files: &mut Vec<PathBuf>) -> Result<Walked, ImportError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
    let t = meta.file_type();
    if t.is_symlink() {
        let target = std::fs::read_link(path).map_err(io_err(path))?;
        let target = SymlinkTarget::try_from(target.as_os_str().as_bytes()).map_err(|source| {
            ImportError::InvalidSymlinkTarget {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(Walked::Symlink(target))
    } else if t.is_file() {
        files.push(path.to_owned());
        Ok(Walked::File {
            index: files.len() - 1,
            executable: meta.permissions().mode() & 0o100 != 0,
        })
    } else if t.is_dir() {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(path).map_err(io_err(path))? {
            let e = e.map_err(io_err(path))?;
            let child = e.path();
            let name = PathComponent::try_from(e.file_name().as_bytes()).map_err(|source| {
                ImportError::InvalidName {
                    path: child.clone(),
                    source,
                }
            })?;
            entries.push((name, walk(&child, files)?));
        }
        Ok(Walked::Directory {
            path: path.to_owned(),
            entries,
        })
    } else {
        Err(ImportError::UnsupportedType {
            path: path.to_owned(),
            kind: file_kind(&t),
        })
    }
}

/// How much of a file [`hash_file`] reads at once.
const HASH_CHUNK: usize = 4 << 20;

/// Hashes `file` to its end with plain reads (a memory map would crash the process with
/// SIGBUS if the file shrank meanwhile); returns the digest and the size of what was read.
pub(crate) fn hash_file(file: &mut std::fs::File) -> std::io::Result<(B3Digest, u64)> {
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update_rayon(&buf[..n]);
        size += n as u64;
    }
    Ok((B3Digest::from(hasher.finalize()), size))
}

/// Opens `path`; for a file of [`PREHASH_MIN`] bytes or more, also hashes it and rewinds.
/// Returns the file, its size and the digest if hashed (digest and size of the same read).
fn open_and_prehash(path: &Path) -> std::io::Result<(std::fs::File, u64, Option<B3Digest>)> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size < PREHASH_MIN {
        return Ok((file, size, None));
    }
    let (digest, hashed) = hash_file(&mut file)?;
    file.seek(SeekFrom::Start(0))?;
    Ok((file, hashed, Some(digest)))
}

/// Uploads one file; returns its digest and size.
async fn upload_file(blobs: &dyn BlobService, path: &Path) -> Result<(B3Digest, u64), ImportError> {
    let store_err = |source| ImportError::Store {
        path: path.to_owned(),
        source,
    };
    let p = path.to_owned();
    let (file, size, known) = tokio::task::spawn_blocking(move || open_and_prehash(&p))
        .await
        .map_err(ImportError::Task)?
        .map_err(io_err(path))?;
    if let Some(digest) = known {
        if blobs.has(&digest).await.map_err(store_err)? {
            return Ok((digest, size));
        }
    }
    let (digest, copied) = blobs.put_file(file).await.map_err(store_err)?;
    if known.is_some_and(|k| k != digest) || copied != size {
        return Err(ImportError::Changed {
            path: path.to_owned(),
        });
    }
    Ok((digest, copied))
}

/// Turns the walked tree into nodes, putting directories leaves first.
fn build(
    walked: Walked,
    files: &[(B3Digest, u64)],
    out: &mut Vec<(PathBuf, Directory)>,
) -> Result<Node, ImportError> {
    match walked {
        Walked::File { index, executable } => {
            let (digest, size) = files[index];
            Ok(Node::File {
                digest,
                size,
                executable,
            })
        }
        Walked::Symlink(target) => Ok(Node::Symlink { target }),
        Walked::Directory { path, entries } => {
            let mut dir = Directory::new();
            for (name, child) in entries {
                let node = build(child, files, out)?;
                dir.try_insert(name, node)
                    .map_err(|source| ImportError::Directory {
                        path: path.clone(),
                        source,
                    })?;
            }
            let node = dir.as_node();
            out.push((path, dir));
            Ok(node)
        }
    }
}

/// Imports `path` (not following a symlink at `path` itself); returns its root node. The
/// caller names it (usually by the path's basename).
pub async fn import_path(
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    path: &Path,
) -> Result<Node, ImportError> {
    let p = path.to_owned();
    let (walked, file_paths) = tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        walk(&p, &mut files).map(|w| (w, files))
    })
    .await
    .map_err(ImportError::Task)??;

    let mut uploaded: Vec<(usize, (B3Digest, u64))> =
        futures::stream::iter(file_paths.iter().enumerate())
            .map(|(i, p)| {
                let blobs = blobs.clone();
                async move { upload_file(blobs.as_ref(), p).await.map(|r| (i, r)) }
            })
            .buffer_unordered(CONCURRENT_UPLOADS)
            .try_collect()
            .await?;
    uploaded.sort_by_key(|(i, _)| *i);
    let files: Vec<(B3Digest, u64)> = uploaded.into_iter().map(|(_, r)| r).collect();

    // The barrier: no node (returned, or in a directory stored below) may refer to a blob a
    // crash could still take away.
    blobs.sync().await.map_err(|source| ImportError::Store {
        path: path.to_owned(),
        source,
    })?;

    let mut dirs = Vec::new();
    let root = build(walked, &files, &mut dirs)?;
    if dirs.is_empty() {
        return Ok(root);
    }
    let mut putter = directories.put_multiple_start();
    for (p, d) in dirs {
        putter
            .put(d)
            .await
            .map_err(|source| ImportError::Store { path: p, source })?;
    }
    let stored = putter.close().await.map_err(|source| ImportError::Store {
        path: path.to_owned(),
        source,
    })?;
    if Some(&stored) != root.digest() {
        return Err(ImportError::Store {
            path: path.to_owned(),
            source: Error::Protocol(format!(
                "the directory store answered root {stored}, expected {:?}",
                root.digest()
            )),
        });
    }
    Ok(root)
}
