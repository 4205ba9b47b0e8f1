//! Whether a bucket in snix's layout (src/castore/objectstore) is whole: what a reader can
//! see must be complete, whatever a writer killed mid-way left behind.
//!
//! What "partial" means in that layout, and so what [`check_whole`] refuses:
//! - any object that is not whole in itself: a chunk that does not decompress or does not
//!   hash to its key, a blob index or a directory closure that does not decode;
//! - a blob index (`blobs/`) that names a chunk which is missing or of another size, or
//!   whose chunks together do not hash to the blob's digest (a one-chunk blob's index lists
//!   nothing, and its one chunk is stored under the blob's own digest);
//! - a directory closure (`dirs/`) whose first directory is not its key, that refers to a
//!   directory not in the object, or to a file whose blob is not visible (no index and no
//!   one-chunk blob) or has another size;
//! - any object outside `blobs/`, `chunks/` and `dirs/`, or under a malformed key.
//!
//! Chunks no index names are allowed: a writer uploads chunks first and the index last, so a
//! writer killed in between leaves them, unseen by readers (snix's layout has no garbage
//! collection of them either). Likewise a closure object of a subdirectory without one of
//! its root. The check reads the objects itself (zstd, protobuf, BLAKE3) rather than
//! through the project's readers, so a reader bug cannot hide a writer's.

use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use prost::Message;
use std::collections::{HashMap, HashSet};
use tvix_build_vm::castore::objectstore::Bucket;
use tvix_build_vm::castore::{B3Digest, Directory, Node};
use tvix_build_vm::proto::tvix::castore::v1 as pb;

/// What a whole bucket holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub chunks: usize,
    /// Chunks no blob index names (left by a writer stopped before its index).
    pub unindexed_chunks: usize,
    pub blobs: usize,
    pub closures: usize,
}

/// The digest a key's last two segments name (`<4 hex>/<64 hex>`), if well formed.
fn key_digest(shard: &str, hex: &str) -> Option<B3Digest> {
    if hex.len() != 64 || !hex.starts_with(shard) || shard.len() != 4 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..32)
        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let d = B3Digest::try_from(&bytes?[..]).ok()?;
    (d.to_hex() == hex).then_some(d)
}

/// Checks every object under the bucket's base (see the module documentation); the
/// problems found, each naming its key, or what the bucket holds.
pub async fn check_whole(bucket: &Bucket) -> Result<Summary, Vec<String>> {
    let metas: Vec<object_store::ObjectMeta> = bucket
        .store
        .list(Some(&bucket.base))
        .try_collect()
        .await
        .map_err(|e| vec![format!("listing the bucket: {e}")])?;
    let mut problems = Vec::new();
    let (mut chunk_keys, mut blob_keys, mut dir_keys) = (Vec::new(), Vec::new(), Vec::new());
    for m in metas {
        let key = m.location.to_string();
        let rel: Vec<String> = m
            .location
            .prefix_match(&bucket.base)
            .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect())
            .unwrap_or_default();
        let rel: Vec<&str> = rel.iter().map(String::as_str).collect();
        let parsed = match rel[..] {
            [kind, "b3", shard, hex] => key_digest(shard, hex).map(|d| (kind, d)),
            _ => None,
        };
        match parsed {
            Some(("chunks", d)) => chunk_keys.push((m.location, d)),
            Some(("blobs", d)) => blob_keys.push((m.location, d)),
            Some(("dirs", d)) => dir_keys.push((m.location, d)),
            _ => problems.push(format!("{key}: not an object of the layout")),
        }
    }

    // Chunks: each whole, hashing to its key. Their plain sizes, for the checks below.
    let mut chunk_sizes: HashMap<B3Digest, u64> = HashMap::new();
    let mut chunk_data: HashMap<B3Digest, Vec<u8>> = HashMap::new();
    for (key, d) in &chunk_keys {
        match get(bucket, key)
            .await
            .and_then(|raw| zstd::decode_all(&raw[..]).map_err(|e| format!("{key}: zstd: {e}")))
        {
            Ok(plain) if B3Digest::of(&plain) == *d => {
                chunk_sizes.insert(*d, plain.len() as u64);
                chunk_data.insert(*d, plain);
            }
            Ok(_) => problems.push(format!("{key}: the chunk does not hash to its key")),
            Err(e) => problems.push(e),
        }
    }

    // Blob indexes: every chunk there, the whole hashing to the blob's digest.
    let mut blob_sizes: HashMap<B3Digest, u64> = HashMap::new();
    let mut named = HashSet::new();
    for (key, d) in &blob_keys {
        let index = match get(bucket, key).await.and_then(|raw| {
            pb::StatBlobResponse::decode(raw).map_err(|e| format!("{key}: protobuf: {e}"))
        }) {
            Ok(i) => i,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if index.chunks.is_empty() {
            named.insert(*d);
            match chunk_sizes.get(d) {
                Some(s) => {
                    blob_sizes.insert(*d, *s);
                }
                None => problems.push(format!("{key}: a one-chunk blob without its chunk")),
            }
            continue;
        }
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut whole = true;
        for c in &index.chunks {
            let Ok(cd) = B3Digest::try_from(&c.digest[..]) else {
                problems.push(format!("{key}: a chunk digest of {} bytes", c.digest.len()));
                whole = false;
                break;
            };
            named.insert(cd);
            match chunk_data.get(&cd) {
                Some(data) if data.len() as u64 == c.size => {
                    hasher.update(data);
                    size += c.size;
                }
                Some(data) => {
                    problems.push(format!(
                        "{key}: chunk {cd} listed as {} bytes, stored as {}",
                        c.size,
                        data.len()
                    ));
                    whole = false;
                }
                None => {
                    problems.push(format!("{key}: chunk {cd} is missing"));
                    whole = false;
                }
            }
        }
        if whole && B3Digest::from(hasher.finalize()) != *d {
            problems.push(format!(
                "{key}: its chunks do not hash to the blob's digest"
            ));
        } else if whole {
            blob_sizes.insert(*d, size);
        }
    }
    // A one-chunk blob is readable through its chunk alone (the index is written after it).
    let visible_size = |d: &B3Digest| blob_sizes.get(d).or_else(|| chunk_sizes.get(d)).copied();

    // Directory closures: complete, root first, every file's blob there at its size.
    for (key, root) in &dir_keys {
        let plain = match get(bucket, key)
            .await
            .and_then(|raw| zstd::decode_all(&raw[..]).map_err(|e| format!("{key}: zstd: {e}")))
        {
            Ok(p) => p,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        match decode_closure(&plain) {
            Err(e) => problems.push(format!("{key}: {e}")),
            Ok(dirs) => {
                let held: HashSet<B3Digest> = dirs.iter().map(Directory::digest).collect();
                if dirs.first().map(Directory::digest) != Some(*root) {
                    problems.push(format!("{key}: the first directory is not {root}"));
                }
                for dir in &dirs {
                    for (name, node) in dir.nodes() {
                        match node {
                            Node::Directory { digest, .. } if !held.contains(digest) => problems
                                .push(format!(
                                    "{key}: directory {digest} ({name:?}) is not in the closure"
                                )),
                            Node::File { digest, size, .. }
                                if visible_size(digest) != Some(*size) =>
                            {
                                problems.push(format!(
                                    "{key}: file {name:?}: blob {digest} of {size} bytes is not \
                                     there whole (stored: {:?})",
                                    visible_size(digest)
                                ))
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Summary {
        chunks: chunk_keys.len(),
        unindexed_chunks: chunk_keys
            .iter()
            .filter(|(_, d)| !named.contains(d))
            .count(),
        blobs: blob_keys.len(),
        closures: dir_keys.len(),
    })
}

async fn get(bucket: &Bucket, key: &object_store::path::Path) -> Result<bytes::Bytes, String> {
    let got = bucket
        .store
        .get(key)
        .await
        .map_err(|e| format!("{key}: {e}"))?;
    got.bytes().await.map_err(|e| format!("{key}: {e}"))
}

/// u32 big-endian length-delimited protobuf Directories.
fn decode_closure(mut rest: &[u8]) -> Result<Vec<Directory>, String> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("a truncated frame length")?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!("a frame of {len} bytes, {} left", tail.len()));
        }
        let (msg, tail) = tail.split_at(len);
        rest = tail;
        let proto = pb::Directory::decode(msg).map_err(|e| format!("protobuf: {e}"))?;
        out.push(Directory::try_from(proto).map_err(|e| format!("a directory: {e}"))?);
    }
    Ok(out)
}
