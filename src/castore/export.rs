//! Castore nodes onto the host: a root node becomes a file, symlink or directory tree at a
//! destination that must not exist yet.
//!
//! Everything is written into a temporary sibling of the destination and renamed into place
//! at the end (refusing to replace anything that appeared meanwhile), so the destination is
//! either absent or complete. Blob contents are checked against their digest and size.

use super::directory::{Directory, Node};
use super::{B3Digest, BlobService, DirectoryService, Error};
use futures::TryStreamExt;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a node could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}: already exists")]
    Exists(PathBuf),
    #[error("{0}: has no parent directory or file name")]
    BadDestination(PathBuf),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {0} not found")]
    BlobNotFound(B3Digest),
    #[error("directory {0} not found")]
    DirectoryNotFound(B3Digest),
    #[error("blob {digest} does not match its node: got {got_size} bytes with digest {got_digest}, expected {size} bytes")]
    BlobMismatch {
        digest: B3Digest,
        size: u64,
        got_digest: B3Digest,
        got_size: u64,
    },
    #[error("reading from the store")]
    Store(#[source] Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `node` to `dest`, which must not exist.
pub async fn export_node(
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    node: &Node,
    dest: &Path,
) -> Result<(), ExportError> {
    if tokio::fs::symlink_metadata(dest).await.is_ok() {
        return Err(ExportError::Exists(dest.to_owned()));
    }
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(ExportError::BadDestination(dest.to_owned()));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", uuid::Uuid::new_v4()));
    let tmp = parent.join(tmp_name);

    let result = async {
        let closure = match node {
            Node::Directory { digest, .. } => fetch_closure(directories, digest).await?,
            _ => HashMap::new(),
        };
        write_node(blobs, &closure, node, &tmp).await?;
        rename_noreplace(&tmp, dest)
    }
    .await;
    if result.is_err() {
        // Best effort: the error that matters is the one being returned.
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

fn rename_noreplace(from: &Path, to: &Path) -> Result<(), ExportError> {
    use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
    renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE).map_err(|e| {
        if e == nix::errno::Errno::EEXIST {
            ExportError::Exists(to.to_owned())
        } else {
            ExportError::Io {
                path: to.to_owned(),
                source: e.into(),
            }
        }
    })
}

async fn fetch_closure(
    directories: &dyn DirectoryService,
    root: &B3Digest,
) -> Result<HashMap<B3Digest, Directory>, ExportError> {
    directory_closure(directories, root)
        .await
        .map_err(|e| match e {
            Error::DirectoryNotFound(d) => ExportError::DirectoryNotFound(d),
            e => ExportError::Store(e),
        })
}

/// Every directory of the tree below `root` (itself included), by digest, in one stream.
pub(crate) async fn directory_closure(
    directories: &dyn DirectoryService,
    root: &B3Digest,
) -> Result<HashMap<B3Digest, Directory>, Error> {
    let mut out = HashMap::new();
    let mut stream = directories.get_recursive(root);
    while let Some(d) = stream.try_next().await? {
        out.insert(d.digest(), d);
    }
    Ok(out)
}

async fn write_node(
    blobs: &dyn BlobService,
    closure: &HashMap<B3Digest, Directory>,
    node: &Node,
    path: &Path,
) -> Result<(), ExportError> {
    match node {
        Node::Symlink { target } => {
            let target = std::ffi::OsStr::from_bytes_compat(target.as_bytes());
            tokio::fs::symlink(target, path).await.map_err(io_err(path))
        }
        Node::File {
            digest,
            size,
            executable,
        } => write_file(blobs, digest, *size, *executable, path).await,
        Node::Directory { digest, .. } => {
            let dir = closure
                .get(digest)
                .ok_or(ExportError::DirectoryNotFound(*digest))?;
            tokio::fs::create_dir(path).await.map_err(io_err(path))?;
            for (name, child) in dir.nodes() {
                let child_path = path.join(std::ffi::OsStr::from_bytes_compat(name.as_bytes()));
                Box::pin(write_node(blobs, closure, child, &child_path)).await?;
            }
            Ok(())
        }
    }
}

/// `OsStr::from_bytes` under a name that does not clash with other traits in scope.
trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &Self;
}

impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &Self {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

async fn write_file(
    blobs: &dyn BlobService,
    digest: &B3Digest,
    size: u64,
    executable: bool,
    path: &Path,
) -> Result<(), ExportError> {
    let mut reader = blobs
        .open_read(digest)
        .await
        .map_err(ExportError::Store)?
        .ok_or(ExportError::BlobNotFound(*digest))?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut written: u64 = 0;
    loop {
        let n = reader.read(&mut buf).await.map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await.map_err(io_err(path))?;
        written = written.saturating_add(n as u64);
    }
    file.flush().await.map_err(io_err(path))?;
    let got = B3Digest::from(hasher.finalize());
    if got != *digest || written != size {
        return Err(ExportError::BlobMismatch {
            digest: *digest,
            size,
            got_digest: got,
            got_size: written,
        });
    }
    let mode = if executable { 0o755 } else { 0o644 };
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(io_err(path))
}
