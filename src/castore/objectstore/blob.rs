//! Blobs in an object store: FastCDC chunks, zstd-compressed, and an index object per blob
//! (see the module above for the layout).

use super::cache::ChunkCache;
use super::verified::{ChunkList, VerifiedLists};
use super::{decompress_bounded, get_bounded, store_error, Bucket};
use crate::castore::blob::{BlobReader, BlobService, BlobWriter};
use crate::castore::{B3Digest, Error};
use crate::proto::tvix::castore::v1 as pb;
use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use prost::Message;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// FastCDC sizes, the same as snix-store's defaults so both cut identical chunks (and so
/// share them in a bucket).
pub const AVG_CHUNK: usize = 256 * 1024;
pub const MIN_CHUNK: usize = AVG_CHUNK / 2;
pub const MAX_CHUNK: usize = AVG_CHUNK * 2;

/// The largest chunk accepted on read. Other writers may choose larger chunk sizes than
/// ours; this bounds the memory one chunk can take.
pub const MAX_READ_CHUNK: usize = 64 << 20;
/// The largest blob index object accepted (about 1.5 M chunks, hundreds of GiB of blob).
pub const MAX_INDEX_OBJECT: usize = 64 << 20;

/// Blobs in a bucket; cheap to clone.
#[derive(Clone)]
pub struct ObjectStoreBlobService {
    bucket: Bucket,
    cache: Option<Arc<ChunkCache>>,
    /// Indexes proven by a whole read in this process: reads of them skip the blob hash.
    verified: Arc<VerifiedLists>,
}

impl ObjectStoreBlobService {
    pub fn new(bucket: Bucket) -> Self {
        Self {
            bucket,
            cache: None,
            verified: Arc::new(VerifiedLists::new()),
        }
    }

    /// Reads chunks through `cache` on local disk: each is fetched from the bucket once.
    pub fn with_cache(bucket: Bucket, cache: Arc<ChunkCache>) -> Self {
        Self {
            bucket,
            cache: Some(cache),
            verified: Arc::new(VerifiedLists::new()),
        }
    }

    /// The chunks of a blob: `None` if absent, `Some(empty)` if stored as one chunk.
    async fn chunks(&self, digest: &B3Digest) -> Result<Option<Vec<(B3Digest, u64)>>, Error> {
        let key = self.bucket.blob_key(digest);
        let index = get_bounded(
            &self.bucket,
            &key,
            MAX_INDEX_OBJECT as u64,
            "blob index",
            *digest,
        )
        .await?;
        match index {
            Some(raw) => {
                let index = pb::StatBlobResponse::decode(raw).map_err(|e| Error::Corrupt {
                    what: "blob index",
                    digest: *digest,
                    reason: format!("protobuf: {e}"),
                })?;
                let mut out = Vec::with_capacity(index.chunks.len());
                for c in index.chunks {
                    let d = B3Digest::try_from(&c.digest).map_err(|_| Error::Corrupt {
                        what: "blob index",
                        digest: *digest,
                        reason: format!("a chunk digest of {} bytes", c.digest.len()),
                    })?;
                    if c.size == 0 || c.size > MAX_READ_CHUNK as u64 {
                        return Err(Error::Corrupt {
                            what: "blob index",
                            digest: *digest,
                            reason: format!("chunk {d} has size {}", c.size),
                        });
                    }
                    out.push((d, c.size));
                }
                Ok(Some(out))
            }
            None => match self.bucket.store.head(&self.bucket.chunk_key(digest)).await {
                Ok(_) => Ok(Some(Vec::new())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(store_error(format!("looking up chunk {digest}"), e)),
            },
        }
    }
}

/// One chunk, checked, from the cache if it holds it intact, else from the bucket (and
/// then kept in the cache).
async fn cached_chunk(
    bucket: &Bucket,
    cache: Option<&Arc<ChunkCache>>,
    digest: &B3Digest,
    size: Option<u64>,
) -> Result<Option<Bytes>, Error> {
    let Some(cache) = cache else {
        return fetch_chunk(bucket, digest, size).await;
    };
    let (c, d) = (cache.clone(), *digest);
    let hit = tokio::task::spawn_blocking(move || c.get(&d, size))
        .await
        .map_err(|e| Error::io("reading the chunk cache", io::Error::other(e)))?;
    if hit.is_some() {
        return Ok(hit);
    }
    let fetched = fetch_chunk(bucket, digest, size).await?;
    if let Some(data) = &fetched {
        let (c, d, data) = (cache.clone(), *digest, data.clone());
        let kept = tokio::task::spawn_blocking(move || c.put(&d, &data))
            .await
            .map_err(|e| Error::io("writing the chunk cache", io::Error::other(e)))?;
        // The chunk is good and in hand; a full or broken cache disk costs only a later
        // refetch, so the read goes on.
        if let Err(e) = kept {
            tracing::warn!(chunk = %digest, error = %crate::castore::error::error_chain(&e), "chunk not cached");
        }
    }
    Ok(fetched)
}

/// Fetches one chunk, decompresses it and checks it hashes to `digest` (and has `size`
/// bytes when the index said so).
pub(crate) async fn fetch_chunk(
    bucket: &Bucket,
    digest: &B3Digest,
    size: Option<u64>,
) -> Result<Option<Bytes>, Error> {
    let key = bucket.chunk_key(digest);
    // zstd never grows data by more than a little; anything larger is not a chunk of ours.
    let limit = size.map_or(MAX_READ_CHUNK, |s| s as usize);
    let max_object = (limit as u64).saturating_mul(2).saturating_add(4096);
    let Some(raw) = get_bounded(bucket, &key, max_object, "chunk", *digest).await? else {
        return Ok(None);
    };
    let data = decompress_bounded(&raw, limit, "chunk", *digest)?;
    verify_chunk(digest, size, &data)?;
    Ok(Some(Bytes::from(data)))
}

/// Checks chunk bytes against their digest and expected size.
pub(crate) fn verify_chunk(digest: &B3Digest, size: Option<u64>, data: &[u8]) -> Result<(), Error> {
    if let Some(s) = size {
        if data.len() as u64 != s {
            return Err(Error::Corrupt {
                what: "chunk",
                digest: *digest,
                reason: format!("{} bytes where the index says {s}", data.len()),
            });
        }
    }
    let actual = B3Digest::of(data);
    if actual != *digest {
        return Err(Error::Corrupt {
            what: "chunk",
            digest: *digest,
            reason: format!("its contents hash to {actual}"),
        });
    }
    Ok(())
}

/// Stores a chunk unless the bucket has it; returns once the store confirmed the put.
async fn put_chunk(bucket: &Bucket, digest: &B3Digest, data: &[u8]) -> Result<(), Error> {
    let key = bucket.chunk_key(digest);
    match bucket.store.head(&key).await {
        Ok(_) => return Ok(()),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(store_error(format!("looking up {key}"), e)),
    }
    let compressed = zstd::bulk::compress(data, zstd::DEFAULT_COMPRESSION_LEVEL)
        .map_err(|e| Error::io(format!("compressing chunk {digest}"), e))?;
    bucket
        .store
        .put(&key, PutPayload::from(compressed))
        .await
        .map_err(|e| store_error(format!("writing {key}"), e))?;
    Ok(())
}

#[async_trait::async_trait]
impl BlobService for ObjectStoreBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        Ok(self.chunks(digest).await?.is_some())
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        // The index is fetched on every open (the bucket stays the authority on what
        // exists); only the whole-blob hash is skipped when it is the list proven before.
        let Some(chunks) = self.chunks(digest).await? else {
            return Ok(None);
        };
        let chunks = ChunkList::from(chunks);
        let proven = self.verified.get(digest).is_some_and(|p| p == chunks);
        let chunks = if chunks.is_empty() {
            // One chunk: the blob itself; its size is only known after the fetch.
            let Some(data) = cached_chunk(&self.bucket, self.cache.as_ref(), digest, None).await?
            else {
                return Err(Error::Corrupt {
                    what: "blob",
                    digest: *digest,
                    reason: "its chunk vanished".into(),
                });
            };
            return Ok(Some(Box::new(io::Cursor::new(data))));
        } else {
            chunks
        };
        let verified = (!proven).then(|| self.verified.clone());
        Ok(Some(Box::new(ChunkedReader::new(
            self.bucket.clone(),
            self.cache.clone(),
            *digest,
            chunks,
            verified,
        ))))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        Ok(Box::new(ObjectStoreBlobWriter {
            bucket: self.bucket.clone(),
            buf: Vec::new(),
            hasher: blake3::Hasher::new(),
            chunks: Vec::new(),
            pending: None,
            closed: false,
        }))
    }
}

type ChunkFuture = Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>>;

/// Cuts the written bytes into chunks as they arrive and uploads each full chunk before
/// accepting more bytes (so memory stays at about one maximal chunk); `close` uploads the
/// rest and the index, and returns only after the store confirmed every put.
struct ObjectStoreBlobWriter {
    bucket: Bucket,
    /// Bytes not yet cut into a chunk.
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    chunks: Vec<(B3Digest, u64)>,
    /// The upload of the last chunk cut, awaited before more bytes are taken.
    pending: Option<ChunkFuture>,
    closed: bool,
}

/// The length of the next chunk of `buf`: final only when `buf` holds at least a maximal
/// chunk, or at the end of the blob.
fn next_cut(buf: &[u8]) -> usize {
    let (_, len) =
        fastcdc::v2020::FastCDC::new(buf, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK).cut(0, buf.len());
    len
}

impl ObjectStoreBlobWriter {
    /// Cuts one chunk off the front of `buf` and starts its upload.
    fn cut_one(&mut self, len: usize) {
        let data: Vec<u8> = self.buf.drain(..len).collect();
        let digest = B3Digest::of(&data);
        self.chunks.push((digest, data.len() as u64));
        let bucket = self.bucket.clone();
        self.pending = Some(Box::pin(
            async move { put_chunk(&bucket, &digest, &data).await },
        ));
    }

    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(fut) = self.pending.as_mut() {
            let res = futures::ready!(fut.as_mut().poll(cx));
            self.pending = None;
            res.map_err(io::Error::other)?;
        }
        Poll::Ready(Ok(()))
    }
}

fn closed() -> io::Error {
    io::Error::other("blob writer already closed")
}

impl AsyncWrite for ObjectStoreBlobWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(closed()));
        }
        futures::ready!(this.poll_pending(cx))?;
        if this.buf.len() >= MAX_CHUNK {
            // The first cut of a buffer holding a maximal chunk is final. The bytes offered
            // now are taken once that chunk's upload is confirmed (the poll above, next time).
            let len = next_cut(&this.buf);
            this.cut_one(len);
            futures::ready!(this.poll_pending(cx))?;
        }
        let take = data.len().min(MAX_CHUNK);
        this.buf.extend_from_slice(&data[..take]);
        this.hasher.update(&data[..take]);
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_pending(cx)
    }
}

#[async_trait::async_trait]
impl BlobWriter for ObjectStoreBlobWriter {
    async fn close(&mut self) -> Result<B3Digest, Error> {
        if self.closed {
            return Err(Error::io("closing blob", closed()));
        }
        self.closed = true;
        if let Some(fut) = self.pending.take() {
            fut.await?;
        }
        while !self.buf.is_empty() {
            let len = next_cut(&self.buf);
            self.cut_one(len);
            if let Some(fut) = self.pending.take() {
                fut.await?;
            }
        }
        let digest = B3Digest::from(self.hasher.finalize());
        if self.chunks.is_empty() {
            // The empty blob is one empty chunk.
            put_chunk(&self.bucket, &digest, &[]).await?;
        }
        // A blob of one chunk is that chunk; its index lists no chunks.
        let listed = if self.chunks.len() < 2 {
            Vec::new()
        } else {
            self.chunks
                .iter()
                .map(|(d, s)| pb::stat_blob_response::ChunkMeta {
                    digest: Bytes::from(*d),
                    size: *s,
                })
                .collect()
        };
        let key = self.bucket.blob_key(&digest);
        match self.bucket.store.head(&key).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                let index = pb::StatBlobResponse {
                    chunks: listed,
                    bao: Bytes::new(),
                };
                self.bucket
                    .store
                    .put(&key, PutPayload::from(index.encode_to_vec()))
                    .await
                    .map_err(|e| store_error(format!("writing {key}"), e))?;
            }
            Err(e) => return Err(store_error(format!("looking up {key}"), e)),
        }
        Ok(digest)
    }
}

/// A chunk being fetched by its own task, so several are in flight while one is read.
type Fetch = tokio::task::JoinHandle<Result<Option<Bytes>, Error>>;

/// Bytes of chunks fetched ahead of the read position (the chunk under it included; that
/// one is fetched whatever its size). One at a time a cold 256 MiB read waited out ~1000
/// sequential bucket round trips (16 s here); several in flight overlap them. Bounded in
/// bytes, not chunks, so that chunks of other writers (up to [`MAX_READ_CHUNK`]) cannot
/// multiply the memory a reader holds.
const READ_AHEAD_BYTES: u64 = 8 << 20;
/// And at most this many requests in flight per reader (32 of our 256 KiB chunks).
const READ_AHEAD_MAX: usize = 32;

/// The end (exclusive) of the read-ahead window starting at chunk `idx` of `chunks`
/// ((digest, size, offset)): at least `idx + 1` (if that chunk exists), at most
/// [`READ_AHEAD_MAX`] chunks, and no chunk beyond the first that would take the window
/// past [`READ_AHEAD_BYTES`].
fn read_ahead_end(chunks: &[(B3Digest, u64, u64)], idx: usize) -> usize {
    let mut end = idx;
    let mut bytes = 0u64;
    while end < chunks.len() && end - idx < READ_AHEAD_MAX {
        bytes = bytes.saturating_add(chunks[end].1);
        if end > idx && bytes > READ_AHEAD_BYTES {
            break;
        }
        end += 1;
    }
    end
}

/// Reads a chunked blob, fetching the chunk under the read position on demand and the next
/// few ahead of it ([`read_ahead_end`]; a seek elsewhere drops them). Each chunk is
/// checked against its digest; unless the list is proven already ([`VerifiedLists`]), a
/// read from the start to the end is also checked against the blob's digest (the index
/// could list valid chunks of another blob), and a mismatch is an error at the end
/// instead of the end of file.
struct ChunkedReader {
    bucket: Bucket,
    cache: Option<Arc<ChunkCache>>,
    blob: B3Digest,
    /// (digest, size, offset of its first byte).
    chunks: Vec<(B3Digest, u64, u64)>,
    total: u64,
    pos: u64,
    /// The chunk index and bytes currently held.
    current: Option<(usize, Bytes)>,
    /// Fetches in flight, for consecutive chunk indexes, the lowest first.
    ahead: std::collections::VecDeque<(usize, Fetch)>,
    /// Hash of bytes read so far, while reads have been sequential from the start; `None`
    /// from the start when the list is proven already.
    sequential: Option<(blake3::Hasher, u64)>,
    /// Where to record the list once a whole read proved it (with the list as given).
    prove: Option<(Arc<VerifiedLists>, ChunkList)>,
}

impl ChunkedReader {
    fn new(
        bucket: Bucket,
        cache: Option<Arc<ChunkCache>>,
        blob: B3Digest,
        list: ChunkList,
        verified: Option<Arc<VerifiedLists>>,
    ) -> Self {
        let mut chunks = Vec::with_capacity(list.len());
        let mut off = 0u64;
        for &(d, s) in list.iter() {
            chunks.push((d, s, off));
            off = off.saturating_add(s);
        }
        Self {
            bucket,
            cache,
            blob,
            chunks,
            total: off,
            pos: 0,
            current: None,
            ahead: std::collections::VecDeque::new(),
            sequential: verified.is_some().then(|| (blake3::Hasher::new(), 0)),
            prove: verified.map(|v| (v, list)),
        }
    }

    /// Starts fetches so that the read-ahead window from `idx` ([`read_ahead_end`]) is in
    /// flight; `ahead` holds consecutive indexes from `idx` on.
    fn fill_ahead(&mut self, idx: usize) {
        let end = read_ahead_end(&self.chunks, idx);
        let mut next = self.ahead.back().map_or(idx, |(i, _)| i + 1);
        while next < end {
            let (d, s, _) = self.chunks[next];
            let bucket = self.bucket.clone();
            let cache = self.cache.clone();
            let fetch =
                tokio::spawn(
                    async move { cached_chunk(&bucket, cache.as_ref(), &d, Some(s)).await },
                );
            self.ahead.push_back((next, fetch));
            next += 1;
        }
    }

    fn chunk_at(&self, pos: u64) -> usize {
        self.chunks.partition_point(|(_, s, off)| off + s <= pos)
    }
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos >= this.total || out.remaining() == 0 {
            if let Some((hasher, n)) = this.sequential.take() {
                if n == this.total {
                    if B3Digest::from(hasher.finalize()) != this.blob {
                        return Poll::Ready(Err(io::Error::other(Error::Corrupt {
                            what: "blob",
                            digest: this.blob,
                            reason: "its chunks do not hash to it".into(),
                        })));
                    }
                    if let Some((verified, list)) = this.prove.take() {
                        verified.insert(this.blob, list);
                    }
                } else {
                    this.sequential = Some((hasher, n));
                }
            }
            return Poll::Ready(Ok(()));
        }
        let idx = this.chunk_at(this.pos);
        let have = matches!(&this.current, Some((i, _)) if *i == idx);
        if !have {
            // In flight for another position (a seek): those fetches are of no use now.
            if this.ahead.front().is_some_and(|(i, _)| *i != idx) {
                for (_, f) in this.ahead.drain(..) {
                    f.abort();
                }
            }
            this.fill_ahead(idx);
            let Some((_, fetch)) = this.ahead.front_mut() else {
                return Poll::Ready(Err(io::Error::other("chunk fetch vanished")));
            };
            let res = futures::ready!(std::future::Future::poll(Pin::new(fetch), cx));
            this.ahead.pop_front();
            let res = res.unwrap_or_else(|e| {
                Err(Error::io(
                    "fetching a chunk",
                    io::Error::other(e.to_string()),
                ))
            });
            let d = this.chunks[idx].0;
            match res {
                Ok(Some(bytes)) => this.current = Some((idx, bytes)),
                Ok(None) => {
                    return Poll::Ready(Err(io::Error::other(Error::Corrupt {
                        what: "blob",
                        digest: this.blob,
                        reason: format!("its chunk {d} is missing"),
                    })))
                }
                Err(e) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
        let Some((_, bytes)) = &this.current else {
            return Poll::Ready(Err(io::Error::other("chunk vanished")));
        };
        let (_, _, start) = this.chunks[idx];
        let within = (this.pos - start) as usize;
        let n = out.remaining().min(bytes.len() - within);
        let slice = &bytes[within..within + n];
        out.put_slice(slice);
        if let Some((hasher, done)) = this.sequential.as_mut() {
            if *done == this.pos {
                hasher.update(slice);
                *done += n as u64;
            } else {
                this.sequential = None;
            }
        }
        this.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl Drop for ChunkedReader {
    /// A reader dropped early (a guest closed the file) stops what it fetched ahead.
    fn drop(&mut self) {
        for (_, f) in self.ahead.drain(..) {
            f.abort();
        }
    }
}

impl AsyncSeek for ChunkedReader {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let new = match position {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => this.total.checked_add_signed(d),
            SeekFrom::Current(d) => this.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the blob",
            )
        })?;
        if new != this.pos {
            if let Some((_, done)) = &this.sequential {
                if *done != new {
                    this.sequential = None;
                }
            }
        }
        this.pos = new;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::castore::blob::{put_bytes, read_to_vec};
    use futures::TryStreamExt;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use std::sync::Arc;

    fn bucket() -> Bucket {
        Bucket::new(Arc::new(InMemory::new()), Path::from("base"))
    }

    /// Bytes that do not repeat, so FastCDC finds content-defined cuts.
    fn noise(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut h = blake3::Hasher::new().finalize_xof();
        out.resize(len, 0);
        h.fill(&mut out);
        out
    }

    async fn keys(b: &Bucket, kind: &str) -> Vec<Path> {
        b.store
            .list(Some(&b.base.clone().join(kind)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .unwrap()
    }

    /// Rewrites a chunk object with one byte of its contents flipped (validly compressed,
    /// so only the digest check can catch it).
    async fn flip_chunk(b: &Bucket, key: &Path) {
        let raw = b.store.get(key).await.unwrap().bytes().await.unwrap();
        let mut data = zstd::decode_all(&raw[..]).unwrap();
        data[0] ^= 1;
        let again = zstd::encode_all(&data[..], 3).unwrap();
        b.store.put(key, PutPayload::from(again)).await.unwrap();
    }

    #[tokio::test]
    async fn a_large_blob_is_chunked_in_the_shared_layout() {
        let b = bucket();
        let svc = ObjectStoreBlobService::new(b.clone());
        let data = noise(3 << 20);
        let d = put_bytes(&svc, &data).await.unwrap();
        assert_eq!(d, B3Digest::of(&data));
        let chunks = keys(&b, "chunks").await;
        // 3 MiB at 512 KiB at most per chunk.
        assert!(chunks.len() >= 6, "{chunks:?}");
        let index = b
            .store
            .get(&b.blob_key(&d))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let index = pb::StatBlobResponse::decode(index).unwrap();
        assert_eq!(index.chunks.len(), chunks.len());
        assert_eq!(
            index.chunks.iter().map(|c| c.size).sum::<u64>(),
            data.len() as u64
        );
        for c in &index.chunks {
            assert!(c.size as usize <= MAX_CHUNK);
        }
        assert_eq!(read_to_vec(&svc, &d).await.unwrap().unwrap(), data);
    }

    /// Reads ahead of the position, then seeks elsewhere (back, into the middle, near the
    /// end): every read returns the bytes at the position, whatever was in flight.
    #[tokio::test]
    async fn seeks_between_reads_ahead_return_the_right_bytes() {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let b = bucket();
        let svc = ObjectStoreBlobService::new(b.clone());
        // More than one read-ahead window.
        let len = READ_AHEAD_BYTES as usize + (4 << 20);
        let data = noise(len);
        let d = put_bytes(&svc, &data).await.unwrap();
        let mut r = svc.open_read(&d).await.unwrap().unwrap();
        let mut buf = vec![0u8; 1000];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, data[..1000]);
        for at in [3 << 20, 10, len - 1000, len - (3 << 20), 2 << 20, 0] {
            r.seek(SeekFrom::Start(at as u64)).await.unwrap();
            r.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, data[at..at + 1000], "at {at}");
        }
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, data[1000..]);
    }

    #[tokio::test]
    async fn a_small_blob_is_one_chunk_under_its_own_digest() {
        let b = bucket();
        let svc = ObjectStoreBlobService::new(b.clone());
        let d = put_bytes(&svc, b"Hello World").await.unwrap();
        assert_eq!(keys(&b, "chunks").await, vec![b.chunk_key(&d)]);
        let index = b
            .store
            .get(&b.blob_key(&d))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert!(pb::StatBlobResponse::decode(index)
            .unwrap()
            .chunks
            .is_empty());
        assert_eq!(
            read_to_vec(&svc, &d).await.unwrap().unwrap(),
            b"Hello World"
        );
    }

    #[tokio::test]
    async fn a_flipped_byte_in_a_chunk_is_refused_naming_the_digest() {
        let b = bucket();
        let svc = ObjectStoreBlobService::new(b.clone());
        let data = noise(2 << 20);
        let d = put_bytes(&svc, &data).await.unwrap();
        let victim = keys(&b, "chunks").await.pop().unwrap();
        flip_chunk(&b, &victim).await;
        let err = read_to_vec(&svc, &d).await.unwrap_err();
        let msg = crate::castore::error::error_chain(&err);
        // Keys name chunks in hex (snix's layout); errors print digests as everywhere else.
        let chunk: B3Digest = victim.filename().unwrap().parse().unwrap();
        assert!(msg.contains(&chunk.to_string()), "{msg}");
        assert!(msg.contains("corrupt"), "{msg}");

        let small = put_bytes(&svc, b"small").await.unwrap();
        flip_chunk(&b, &b.chunk_key(&small)).await;
        let err = read_to_vec(&svc, &small).await.unwrap_err();
        let msg = crate::castore::error::error_chain(&err);
        assert!(
            msg.contains(&small.to_string()) && msg.contains("corrupt"),
            "{msg}"
        );
    }

    /// Puts the index object of `from` under the key of `to`.
    async fn copy_index(b: &Bucket, from: &B3Digest, to: &B3Digest) {
        let index = b
            .store
            .get(&b.blob_key(from))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        b.store
            .put(&b.blob_key(to), PutPayload::from(index))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_index_listing_another_blobs_chunks_fails_a_full_read() {
        let b = bucket();
        let svc = ObjectStoreBlobService::new(b.clone());
        let one = put_bytes(&svc, &noise(2 << 20)).await.unwrap();
        let mut other_data = noise(2 << 20);
        other_data[0] ^= 1;
        let other = put_bytes(&svc, &other_data).await.unwrap();
        copy_index(&b, &other, &one).await;
        let err = read_to_vec(&svc, &one).await.unwrap_err();
        let msg = crate::castore::error::error_chain(&err);
        assert!(msg.contains(&one.to_string()), "{msg}");
        // Refused, so not remembered as proven: a second read is refused too.
        assert!(svc.verified.get(&one).is_none());
        assert!(read_to_vec(&svc, &one).await.is_err());
    }

    #[tokio::test]
    async fn a_second_read_through_the_cache_fetches_nothing_from_the_bucket() {
        use crate::castore::objectstore::counting::CountingStore;
        use std::sync::atomic::Ordering;
        let counting = Arc::new(CountingStore::new(Arc::new(InMemory::new())));
        let counts = counting.counts.clone();
        let b = Bucket::new(counting, Path::from("base"));
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ChunkCache::open(dir.path(), 64 << 20).unwrap());
        let svc = ObjectStoreBlobService::with_cache(b.clone(), cache.clone());
        let data = noise(2 << 20);
        let d = put_bytes(&ObjectStoreBlobService::new(b.clone()), &data)
            .await
            .unwrap();

        assert_eq!(read_to_vec(&svc, &d).await.unwrap().unwrap(), data);
        let gets_after_first = counts.gets.load(Ordering::Relaxed);
        assert_eq!(cache.used_bytes(), data.len() as u64);
        assert_eq!(read_to_vec(&svc, &d).await.unwrap().unwrap(), data);
        // Only the index object is read again; no chunk is.
        assert_eq!(counts.gets.load(Ordering::Relaxed), gets_after_first + 1);

        // A cached chunk gone bad is refetched, not handed on.
        let victim = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&victim, &bytes).unwrap();
        assert_eq!(read_to_vec(&svc, &d).await.unwrap().unwrap(), data);
        assert_eq!(counts.gets.load(Ordering::Relaxed), gets_after_first + 3);
    }

    /// Only a whole read proves an index (after a partial one, nothing is remembered), and
    /// only that very list is trusted later (a bad index is never remembered: the test
    /// above).
    #[tokio::test]
    async fn only_a_whole_matching_read_proves_an_index() {
        use crate::castore::objectstore::counting::CountingStore;
        use std::sync::atomic::Ordering;
        use tokio::io::AsyncReadExt;
        let counting = Arc::new(CountingStore::new(Arc::new(InMemory::new())));
        let counts = counting.counts.clone();
        let b = Bucket::new(counting, Path::from("base"));
        let svc = ObjectStoreBlobService::new(b.clone());
        let data = noise(2 << 20);
        let d = put_bytes(&svc, &data).await.unwrap();
        let gets = || counts.gets.load(Ordering::Relaxed);

        let mut r = svc.open_read(&d).await.unwrap().unwrap();
        let mut buf = vec![0u8; 1000];
        r.read_exact(&mut buf).await.unwrap();
        drop(r);
        assert!(svc.verified.get(&d).is_none());
        let before = gets();
        assert_eq!(read_to_vec(&svc, &d).await.unwrap().unwrap(), data);
        assert!(gets() > before, "the index and the chunks were fetched");
        assert_eq!(
            svc.verified
                .get(&d)
                .unwrap()
                .iter()
                .map(|c| c.1)
                .sum::<u64>(),
            data.len() as u64
        );

        // Proven, and then the bucket's index changes to another blob's chunks: that list
        // is not the proven one, so the read is hashed again and refused.
        let mut other_data = data.clone();
        other_data[0] ^= 1;
        let other = put_bytes(&svc, &other_data).await.unwrap();
        copy_index(&b, &other, &d).await;
        let err = read_to_vec(&svc, &d).await.unwrap_err();
        let msg = crate::castore::error::error_chain(&err);
        assert!(msg.contains(&d.to_string()), "{msg}");
    }

    #[test]
    fn the_read_ahead_window_is_bounded_in_bytes_and_requests() {
        let list = |sizes: &[u64]| {
            let mut off = 0;
            sizes
                .iter()
                .map(|&s| {
                    off += s;
                    (B3Digest::of(&[]), s, off - s)
                })
                .collect::<Vec<_>>()
        };
        // Our chunks: the request bound.
        let ours = list(&[AVG_CHUNK as u64; 100]);
        assert_eq!(read_ahead_end(&ours, 0), READ_AHEAD_MAX);
        assert_eq!(read_ahead_end(&ours, 90), 100);
        assert_eq!(read_ahead_end(&ours, 100), 100);
        // Large chunks: the byte bound, and never less than the chunk under the position.
        let big = list(&[3 << 20; 10]);
        assert_eq!(
            read_ahead_end(&big, 0),
            (READ_AHEAD_BYTES / (3 << 20)) as usize
        );
        let huge = list(&[MAX_READ_CHUNK as u64; 3]);
        assert_eq!(read_ahead_end(&huge, 1), 2);
        for idx in 0..ours.len() {
            let end = read_ahead_end(&ours, idx);
            let bytes: u64 = ours[idx..end].iter().map(|c| c.1).sum();
            assert!(end > idx && end - idx <= READ_AHEAD_MAX && bytes <= READ_AHEAD_BYTES);
        }
    }
}
