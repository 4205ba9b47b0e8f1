//! The castore on an object store (S3-compatible buckets such as Garage, or memory for
//! tests), in the bucket layout snix-store uses, so one bucket can be shared with it:
//!
//! - a blob's index object at `<base>/blobs/b3/<hex of the digest's first 2 bytes>/<hex>`:
//!   a protobuf `StatBlobResponse` listing the blob's chunks (an empty list when the blob
//!   is a single chunk);
//! - chunks at `<base>/chunks/b3/<hex of the first 2 bytes>/<hex>`, zstd-compressed, cut
//!   with FastCDC (v2020, normalisation level 1) at 128/256/512 KiB min/avg/max;
//! - a directory closure as one object at `<base>/dirs/b3/<hex of the first 2 bytes>/<hex>`:
//!   zstd-compressed, a sequence of frames, each a big-endian u32 length and one protobuf
//!   `Directory`, root first.
//!
//! Addresses are `objectstore+<object_store URL>`, e.g.
//! `objectstore+s3://bucket/prefix?endpoint=http://127.0.0.1:3900&region=garage&access_key_id=..&secret_access_key=..&allow_http=true`
//! (query pairs are `object_store::parse_url_opts` options) or `objectstore+memory:///`.
//! A blob address may also carry `cache_dir=/abs/dir&cache_size=4G`: chunks read are kept
//! in a [`ChunkCache`] there (both or neither; they are ours and never reach the store).
//! Every byte read is checked against the digest it is stored under before it is handed on.

pub mod blob;
pub mod cache;
pub mod counting;
pub mod directory;
pub mod verified;

use crate::castore::{B3Digest, Error};
use object_store::path::Path;
use object_store::ObjectStore;
use std::sync::Arc;

pub use self::blob::ObjectStoreBlobService;
pub use self::cache::ChunkCache;
pub use self::directory::ObjectStoreDirectoryService;

/// `addr` without our cache options, and the cache's directory and size if both are given.
fn split_cache_options(addr: &str) -> Result<(String, Option<(String, u64)>), AddrError> {
    let Some((head, query)) = addr.split_once('?') else {
        return Ok((addr.to_owned(), None));
    };
    let (mut dir, mut size) = (None, None);
    let mut kept = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "cache_dir" => dir = Some(v.into_owned()),
            "cache_size" => size = Some(v.into_owned()),
            _ => {
                kept.append_pair(&k, &v);
            }
        }
    }
    let kept = kept.finish();
    let store_addr = if kept.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{kept}")
    };
    let cache_err = |what: String| AddrError::Cache {
        addr: redact(addr),
        what,
    };
    let cache = match (dir, size) {
        (None, None) => None,
        (Some(d), Some(s)) => {
            if !d.starts_with('/') {
                return Err(cache_err(format!("cache_dir {d:?} must be absolute")));
            }
            let size = crate::units::parse_size(&s)
                .map_err(|e| cache_err(format!("cache_size {s:?}: {e}")))?;
            Some((d, size))
        }
        _ => return Err(cache_err("cache_dir and cache_size go together".to_owned())),
    };
    Ok((store_addr, cache))
}

/// The scheme prefix of object-store castore addresses.
pub const SCHEME_PREFIX: &str = "objectstore+";

/// Why an `objectstore+...` address was refused.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("address {0:?} does not start with {SCHEME_PREFIX:?}")]
    Scheme(String),
    #[error("address {addr:?} is not a URL")]
    Url {
        addr: String,
        #[source]
        source: url::ParseError,
    },
    #[error("object store address {addr:?}: {what}")]
    Cache { addr: String, what: String },
    #[error(
        "object store address {addr:?}: unknown option {key:?} (object_store would ignore it)"
    )]
    UnknownOption { addr: String, key: String },
    #[error("object store address {addr:?}: opening the chunk cache")]
    CacheOpen {
        addr: String,
        // Boxed: castore errors are large and this enum travels in every address error.
        #[source]
        source: Box<Error>,
    },
    #[error("object store address {addr:?}")]
    Store {
        addr: String,
        #[source]
        source: Box<object_store::Error>,
    },
}

/// A bucket (or memory) and the prefix every key lives under.
#[derive(Clone)]
pub struct Bucket {
    pub store: Arc<dyn ObjectStore>,
    pub base: Path,
}

impl Bucket {
    /// Opens the store an `objectstore+<url>` address names. The query pairs are options
    /// to the store (credentials among them), so they are taken off the URL first and
    /// never appear in the base path or in errors that quote the store URL.
    pub fn from_addr(addr: &str) -> Result<Self, AddrError> {
        let rest = addr
            .strip_prefix(SCHEME_PREFIX)
            .ok_or_else(|| AddrError::Scheme(redact(addr)))?;
        let mut url = url::Url::parse(rest).map_err(|source| AddrError::Url {
            addr: redact(addr),
            source,
        })?;
        let options: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.set_query(None);
        // object_store drops options it does not know without a word; a misspelt key
        // (`secret_acess_key`, `cache_sise`) would then fail later and far from its cause.
        for (key, _) in &options {
            let known = match url.scheme() {
                "s3" | "s3a" => key
                    .to_ascii_lowercase()
                    .parse::<object_store::aws::AmazonS3ConfigKey>()
                    .is_ok(),
                // object_store's memory and local stores take no options.
                "memory" | "file" => false,
                // Other stores check their own options, or are not built in.
                _ => true,
            };
            if !known {
                return Err(AddrError::UnknownOption {
                    addr: redact(addr),
                    key: key.clone(),
                });
            }
        }
        let (store, base) =
            object_store::parse_url_opts(&url, options).map_err(|source| AddrError::Store {
                addr: redact(addr),
                source: Box::new(source),
            })?;
        Ok(Self {
            store: Arc::from(store),
            base,
        })
    }

    /// The blob service an `objectstore+<url>` address names, with its chunk cache when the
    /// address has `cache_dir` and `cache_size` (see the module documentation).
    pub fn blob_service_from_addr(addr: &str) -> Result<ObjectStoreBlobService, AddrError> {
        let (store_addr, cache) = split_cache_options(addr)?;
        let bucket = Self::from_addr(&store_addr)?;
        Ok(match cache {
            None => ObjectStoreBlobService::new(bucket),
            Some((dir, size)) => {
                let cache =
                    ChunkCache::open(std::path::Path::new(&dir), size).map_err(|source| {
                        AddrError::CacheOpen {
                            addr: redact(addr),
                            source: Box::new(source),
                        }
                    })?;
                ObjectStoreBlobService::with_cache(bucket, Arc::new(cache))
            }
        })
    }

    pub fn new(store: Arc<dyn ObjectStore>, base: Path) -> Self {
        Self { store, base }
    }

    /// `<base>/<kind>/b3/<hex of the first 2 bytes>/<hex>`.
    fn key(&self, kind: &str, digest: &B3Digest) -> Path {
        let hex = digest.to_hex();
        // Two bytes of a digest are four hex characters.
        let shard = hex.get(..4).unwrap_or(&hex).to_string();
        self.base
            .clone()
            .join(kind)
            .join("b3")
            .join(shard)
            .join(hex)
    }

    pub fn blob_key(&self, digest: &B3Digest) -> Path {
        self.key("blobs", digest)
    }

    pub fn chunk_key(&self, digest: &B3Digest) -> Path {
        self.key("chunks", digest)
    }

    pub fn dirs_key(&self, digest: &B3Digest) -> Path {
        self.key("dirs", digest)
    }
}

/// The address without its query (which may hold secret keys), for error messages.
fn redact(addr: &str) -> String {
    match addr.split_once('?') {
        Some((head, _)) => format!("{head}?<options hidden>"),
        None => addr.to_string(),
    }
}

fn store_error(context: impl Into<String>, source: object_store::Error) -> Error {
    Error::ObjectStore {
        context: context.into(),
        source: Box::new(source),
    }
}

/// The whole object at `key`, or `None` if absent; an object larger than `max_bytes` is
/// refused before it is downloaded.
async fn get_bounded(
    bucket: &Bucket,
    key: &Path,
    max_bytes: u64,
    what: &'static str,
    digest: B3Digest,
) -> Result<Option<bytes::Bytes>, Error> {
    use object_store::ObjectStoreExt;
    let got = match bucket.store.get(key).await {
        Ok(got) => got,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(store_error(format!("reading {key}"), e)),
    };
    if got.meta.size > max_bytes {
        return Err(Error::Corrupt {
            what,
            digest,
            reason: format!("a {} byte object, more than {max_bytes}", got.meta.size),
        });
    }
    let raw = got
        .bytes()
        .await
        .map_err(|e| store_error(format!("reading {key}"), e))?;
    Ok(Some(raw))
}

/// Decompresses a zstd object, refusing more than `limit` bytes of output (a small object
/// must not expand into unbounded memory).
fn decompress_bounded(
    data: &[u8],
    limit: usize,
    what: &'static str,
    digest: B3Digest,
) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let corrupt = |reason: String| Error::Corrupt {
        what,
        digest,
        reason,
    };
    let decoder =
        zstd::stream::read::Decoder::new(data).map_err(|e| corrupt(format!("zstd: {e}")))?;
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| corrupt(format!("zstd: {e}")))?;
    if out.len() > limit {
        return Err(corrupt(format!("decompresses to more than {limit} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cache_options_open_a_chunk_cache_and_stay_off_the_store() {
        use crate::castore::blob::{put_bytes, read_to_vec};
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let addr = format!(
            "objectstore+memory:///?cache_dir={}&cache_size=1M",
            cache.display()
        );
        let svc = Bucket::blob_service_from_addr(&addr).unwrap();
        let d = put_bytes(&svc, b"cached chunk").await.unwrap();
        assert_eq!(
            read_to_vec(&svc, &d).await.unwrap().unwrap(),
            b"cached chunk"
        );
        assert!(cache.join(d.to_hex()).is_file());

        for (bad, want) in [
            ("objectstore+memory:///?cache_dir=/x", "go together"),
            ("objectstore+memory:///?cache_size=1M", "go together"),
            (
                "objectstore+memory:///?cache_dir=rel&cache_size=1M",
                "absolute",
            ),
            (
                "objectstore+memory:///?cache_dir=/x&cache_size=lots",
                "cache_size",
            ),
        ] {
            match Bucket::blob_service_from_addr(bad) {
                Err(e) => assert!(e.to_string().contains(want), "{bad}: {e}"),
                Ok(_) => panic!("{bad} was accepted"),
            }
        }
        match Bucket::blob_service_from_addr(
            "objectstore+s3://b/p?region=garage&cache_sise=1G&secret_access_key=SK",
        ) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("unknown option \"cache_sise\""), "{msg}");
                assert!(!msg.contains("SK"), "{msg}");
            }
            Ok(_) => panic!("a misspelt option was accepted"),
        }
        let (kept, _) =
            split_cache_options("objectstore+s3://b/p?region=garage&cache_dir=/c&cache_size=1G")
                .unwrap();
        assert_eq!(kept, "objectstore+s3://b/p?region=garage");
    }

    #[test]
    fn keys_follow_the_shared_layout() {
        let b = Bucket::from_addr("objectstore+memory:///").unwrap();
        let d = B3Digest::of(b"Hello World");
        let hex = d.to_hex();
        assert_eq!(
            b.blob_key(&d).to_string(),
            format!("blobs/b3/{}/{hex}", &hex[..4])
        );
        assert_eq!(
            b.chunk_key(&d).to_string(),
            format!("chunks/b3/{}/{hex}", &hex[..4])
        );
        assert_eq!(
            b.dirs_key(&d).to_string(),
            format!("dirs/b3/{}/{hex}", &hex[..4])
        );
    }

    #[test]
    fn s3_addresses_parse_and_keep_secrets_out_of_errors() {
        let b = Bucket::from_addr(
            "objectstore+s3://castore/some/prefix?endpoint=http://127.0.0.1:3900&region=garage&access_key_id=AK&secret_access_key=SK&allow_http=true",
        )
        .unwrap();
        assert_eq!(b.base.to_string(), "some/prefix");

        let err = Bucket::from_addr("objectstore+nosuch://castore?secret_access_key=SK")
            .err()
            .unwrap();
        let msg = crate::castore::error::error_chain(&err);
        assert!(!msg.contains("SK"), "{msg}");
        assert!(Bucket::from_addr("s3://castore").is_err());
    }
}
