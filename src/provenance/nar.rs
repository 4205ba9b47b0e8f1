//! The NAR serialisation of a castore node, hashed as it streams (what Nix records as a
//! path's `narHash` and `narSize`).
//!
//! The format, from its specification: every string is framed as its length (u64,
//! little-endian), its bytes, then zero bytes up to a multiple of 8. An archive is the
//! string `nix-archive-1` followed by one node:
//!
//! ```text
//! node      := "(" "type" ( "regular" ["executable" ""] "contents" <string>
//!                         | "symlink" "target" <string>
//!                         | "directory" entry* ) ")"
//! entry     := "entry" "(" "name" <string> "node" node ")"
//! ```
//!
//! Directory entries come in increasing byte order of their names (castore directories
//! keep them in that order too). File contents stream from the blob service in chunks: an
//! output is never held in memory whole. Each blob is checked against its node's size and
//! digest while it is hashed, because the size is written into the archive before the
//! contents.

use crate::castore::directory::{Directory, Node};
use crate::castore::export::directory_closure;
use crate::castore::{B3Digest, BlobService, DirectoryService, Error as CastoreError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// How much of a blob or file is read at once.
const CHUNK: usize = 256 * 1024;

/// The sha256 and length of a NAR serialisation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NarHash {
    pub sha256: [u8; 32],
    pub size: u64,
}

impl NarHash {
    /// The digest in lowercase hex (in-toto's form; Nix prints it as `sha256:` + nix32).
    pub fn sha256_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.sha256)
    }
}

/// Why a NAR could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
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
    Store(#[source] CastoreError),
    #[error("reading blob {digest}")]
    BlobRead {
        digest: B3Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what} has no NAR form (only regular files, directories and symlinks)")]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("{path}: changed while it was read ({expected} bytes expected, {got} read)")]
    Changed {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
}

/// Where the archive's bytes go: a hash (what the service needs) or a buffer (tests).
pub trait NarSink {
    fn put(&mut self, bytes: &[u8]);
}

impl NarSink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// sha256 and length of everything put into it.
#[derive(Default)]
pub struct HashSink {
    sha: Sha256,
    size: u64,
}

impl NarSink for HashSink {
    fn put(&mut self, bytes: &[u8]) {
        self.sha.update(bytes);
        self.size = self.size.saturating_add(bytes.len() as u64);
    }
}

impl HashSink {
    pub fn finish(self) -> NarHash {
        NarHash {
            sha256: self.sha.finalize().into(),
            size: self.size,
        }
    }
}

/// Writes the archive's tokens in order. The caller drives the structure (the walkers
/// below); the writer frames strings and pads file contents.
pub struct NarWriter<S> {
    sink: S,
}

fn padding(len: u64) -> usize {
    // `len % 8` is below 8, so the cast is exact.
    ((8 - len % 8) % 8) as usize
}

impl<S: NarSink> NarWriter<S> {
    /// Starts an archive (writes the magic).
    pub fn new(sink: S) -> Self {
        let mut w = Self { sink };
        w.str(b"nix-archive-1");
        w
    }

    fn str(&mut self, s: &[u8]) {
        self.sink.put(&(s.len() as u64).to_le_bytes());
        self.sink.put(s);
        self.sink.put(&[0u8; 8][..padding(s.len() as u64)]);
    }

    pub fn symlink(&mut self, target: &[u8]) {
        for t in [b"(".as_slice(), b"type", b"symlink", b"target"] {
            self.str(t);
        }
        self.str(target);
        self.str(b")");
    }

    /// Starts a regular file of `size` bytes; its contents follow in [`Self::file_data`],
    /// then [`Self::file_end`] with the same size.
    pub fn file_start(&mut self, executable: bool, size: u64) {
        for t in [b"(".as_slice(), b"type", b"regular"] {
            self.str(t);
        }
        if executable {
            self.str(b"executable");
            self.str(b"");
        }
        self.str(b"contents");
        self.sink.put(&size.to_le_bytes());
    }

    pub fn file_data(&mut self, chunk: &[u8]) {
        self.sink.put(chunk);
    }

    pub fn file_end(&mut self, size: u64) {
        self.sink.put(&[0u8; 8][..padding(size)]);
        self.str(b")");
    }

    pub fn directory_start(&mut self) {
        for t in [b"(".as_slice(), b"type", b"directory"] {
            self.str(t);
        }
    }

    /// Starts an entry of the current directory; its node follows, then
    /// [`Self::entry_end`].
    pub fn entry_start(&mut self, name: &[u8]) {
        for t in [b"entry".as_slice(), b"(", b"name"] {
            self.str(t);
        }
        self.str(name);
        self.str(b"node");
    }

    pub fn entry_end(&mut self) {
        self.str(b")");
    }

    pub fn directory_end(&mut self) {
        self.str(b")");
    }

    pub fn into_sink(self) -> S {
        self.sink
    }
}

/// The NAR hash of a castore node, its blobs streamed from `blobs`.
pub async fn hash_node(
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    node: &Node,
) -> Result<NarHash, NarError> {
    let mut w = NarWriter::new(HashSink::default());
    write_node(blobs, directories, node, &mut w).await?;
    Ok(w.into_sink().finish())
}

/// Writes the archive of a castore node into `w` (after the magic, which
/// [`NarWriter::new`] wrote).
pub async fn write_node<S: NarSink + Send>(
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    node: &Node,
    w: &mut NarWriter<S>,
) -> Result<(), NarError> {
    // The directories (names and digests only) are fetched in one stream; only blob
    // contents can be large, and those are streamed.
    let closure = match node {
        Node::Directory { digest, .. } => fetch_closure(directories, digest).await?,
        _ => HashMap::new(),
    };
    write_castore(blobs, &closure, node, w).await
}

async fn fetch_closure(
    directories: &dyn DirectoryService,
    root: &B3Digest,
) -> Result<HashMap<B3Digest, Directory>, NarError> {
    directory_closure(directories, root)
        .await
        .map_err(|e| match e {
            CastoreError::DirectoryNotFound(d) => NarError::DirectoryNotFound(d),
            e => NarError::Store(e),
        })
}

async fn write_castore<S: NarSink + Send>(
    blobs: &dyn BlobService,
    closure: &HashMap<B3Digest, Directory>,
    node: &Node,
    w: &mut NarWriter<S>,
) -> Result<(), NarError> {
    match node {
        Node::Symlink { target } => w.symlink(target.as_bytes()),
        Node::File {
            digest,
            size,
            executable,
        } => write_blob(blobs, digest, *size, *executable, w).await?,
        Node::Directory { digest, .. } => {
            let dir = closure
                .get(digest)
                .ok_or(NarError::DirectoryNotFound(*digest))?;
            w.directory_start();
            for (name, child) in dir.nodes() {
                w.entry_start(name.as_bytes());
                Box::pin(write_castore(blobs, closure, child, w)).await?;
                w.entry_end();
            }
            w.directory_end();
        }
    }
    Ok(())
}

async fn write_blob<S: NarSink + Send>(
    blobs: &dyn BlobService,
    digest: &B3Digest,
    size: u64,
    executable: bool,
    w: &mut NarWriter<S>,
) -> Result<(), NarError> {
    let mut reader = blobs
        .open_read(digest)
        .await
        .map_err(NarError::Store)?
        .ok_or(NarError::BlobNotFound(*digest))?;
    w.file_start(executable, size);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got: u64 = 0;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|source| NarError::BlobRead {
                digest: *digest,
                source,
            })?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        got = got.saturating_add(n as u64);
        if got > size {
            // Stop before the archive holds more bytes than its length field said.
            break;
        }
        hasher.update(chunk);
        w.file_data(chunk);
    }
    let got_digest = B3Digest::from(hasher.finalize());
    if got != size || got_digest != *digest {
        return Err(NarError::BlobMismatch {
            digest: *digest,
            size,
            got_digest,
            got_size: got,
        });
    }
    w.file_end(size);
    Ok(())
}

/// The NAR hash of a file, directory or symlink on this host (not following a symlink at
/// `path` itself). A file is executable when its owner may execute it, as in Nix.
pub fn hash_path(path: &Path) -> Result<NarHash, NarError> {
    let mut w = NarWriter::new(HashSink::default());
    write_path(path, &mut w)?;
    Ok(w.into_sink().finish())
}

/// Writes the archive of a host path into `w` (after the magic).
pub fn write_path<S: NarSink>(path: &Path, w: &mut NarWriter<S>) -> Result<(), NarError> {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let io = |source| NarError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(io)?;
        w.symlink(target.as_os_str().as_bytes());
    } else if ft.is_file() {
        let mut file = std::fs::File::open(path).map_err(io)?;
        let size = meta.len();
        w.file_start(meta.permissions().mode() & 0o100 != 0, size);
        let mut buf = vec![0u8; CHUNK];
        let mut got: u64 = 0;
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            got = got.saturating_add(n as u64);
            if got > size {
                break;
            }
            w.file_data(&buf[..n]);
        }
        if got != size {
            return Err(NarError::Changed {
                path: path.to_owned(),
                expected: size,
                got,
            });
        }
        w.file_end(size);
    } else if ft.is_dir() {
        let mut names = std::fs::read_dir(path)
            .map_err(io)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(io)?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        w.directory_start();
        for name in names {
            w.entry_start(name.as_bytes());
            write_path(&path.join(&name), w)?;
            w.entry_end();
        }
        w.directory_end();
    } else {
        return Err(NarError::Unsupported {
            path: path.to_owned(),
            what: "a device, socket or fifo",
        });
    }
    Ok(())
}

#[cfg(test)]
#[path = "nar_tests.rs"]
mod tests;
