//! A client of a remote `tvix.castore.v1.BlobService` or `snix.castore.v1.BlobService`
//! (the same messages; [`PackageChannel`] picks the path).
//!
//! Reading streams `Read`. Seeking forward skips bytes of the stream; seeking backward
//! re-opens the stream and skips to the target; `SeekFrom::End` first reads to the end to
//! learn the size. So sequential reads are cheap and random access costs a re-read (callers
//! that seek a lot should read through a local cache).
//!
//! Writing streams `Put` from a background task. The request stream only ends when `close`
//! says so: a writer dropped without `close` aborts the call, so the server sees a cancelled
//! stream and stores nothing.

use super::{BlobReader, BlobService, BlobWriter};
use crate::castore::package::{remote_error, Package, PackageChannel};
use crate::castore::{B3Digest, Error};
use crate::proto::castore as pb;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::TryStreamExt;
use pb::blob_service_client::BlobServiceClient;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;

/// Largest BlobChunk this client sends (well under tonic's 4 MiB message limit).
pub const MAX_CHUNK: usize = 1 << 20;

/// A remote blob service.
#[derive(Clone)]
pub struct GrpcBlobService {
    client: Client,
}

/// A blob client and the package it speaks (for error messages).
#[derive(Clone)]
struct Client {
    grpc: BlobServiceClient<PackageChannel>,
    package: Package,
}

impl GrpcBlobService {
    /// A client of the package `channel` speaks (a plain tonic `Channel`: tvix's).
    pub fn new(channel: impl Into<PackageChannel>) -> Self {
        let channel = channel.into();
        Self {
            client: Client {
                package: channel.package(),
                grpc: BlobServiceClient::new(channel),
            },
        }
    }
}

type ByteReader = Pin<Box<dyn AsyncRead + Send>>;

/// Opens `Read` for `digest`: `None` if the server says NOT_FOUND.
async fn open_stream(mut client: Client, digest: B3Digest) -> Result<Option<ByteReader>, Error> {
    let req = pb::ReadBlobRequest {
        digest: digest.into(),
    };
    let package = client.package;
    match client.grpc.read(req).await {
        Ok(resp) => {
            let stream = resp.into_inner().map_ok(|c| c.data).map_err(move |s| {
                io::Error::other(remote_error(package, format!("reading blob {digest}"), s))
            });
            Ok(Some(Box::pin(tokio_util::io::StreamReader::new(stream))))
        }
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(remote_error(package, format!("reading blob {digest}"), s)),
    }
}

#[async_trait::async_trait]
impl BlobService for GrpcBlobService {
    async fn has(&self, digest: &B3Digest) -> Result<bool, Error> {
        let req = pb::StatBlobRequest {
            digest: (*digest).into(),
            ..Default::default()
        };
        match self.client.grpc.clone().stat(req).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(remote_error(
                self.client.package,
                format!("stat of blob {digest}"),
                s,
            )),
        }
    }

    async fn open_read(&self, digest: &B3Digest) -> Result<Option<Box<dyn BlobReader>>, Error> {
        let Some(inner) = open_stream(self.client.clone(), *digest).await? else {
            return Ok(None);
        };
        Ok(Some(Box::new(GrpcBlobReader {
            client: self.client.clone(),
            digest: *digest,
            inner: Inner::Open(inner),
            phys: 0,
            pos: 0,
            seek: None,
        })))
    }

    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, Error> {
        let (tx, mut rx) = mpsc::channel::<Msg>(4);
        let body = async_stream::stream! {
            while let Some(m) = rx.recv().await {
                match m {
                    Msg::Data(data) => yield pb::BlobChunk { data },
                    Msg::Done => return,
                }
            }
            // The writer went away without `close`: never end the stream cleanly (that would
            // store a truncated blob); the task is aborted and the call cancelled instead.
            futures::future::pending::<()>().await;
        };
        let mut client = self.client.grpc.clone();
        let task = tokio::spawn(async move { client.put(body).await.map(|r| r.into_inner()) });
        Ok(Box::new(GrpcBlobWriter {
            package: self.client.package,
            tx: Some(PollSender::new(tx)),
            task: Some(task),
            hasher: blake3::Hasher::new(),
        }))
    }
}

enum Inner {
    Open(ByteReader),
    Reopening(BoxFuture<'static, Result<Option<ByteReader>, Error>>),
}

/// A pending seek: to an absolute offset, or relative to the (not yet known) end.
#[derive(Clone, Copy)]
enum Target {
    Abs(u64),
    FromEnd(i64),
}

struct GrpcBlobReader {
    client: Client,
    digest: B3Digest,
    inner: Inner,
    /// Bytes consumed from the current stream.
    phys: u64,
    /// The logical position; larger than `phys` only after seeking past the end.
    pos: u64,
    seek: Option<Target>,
}

impl GrpcBlobReader {
    /// Drives `inner` to an open stream.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Inner::Reopening(fut) = &mut self.inner {
            let digest = self.digest;
            let r = ready!(fut.as_mut().poll(cx)).map_err(io::Error::other)?;
            let r = r.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("blob {digest} disappeared from the remote store"),
                )
            })?;
            self.inner = Inner::Open(r);
            self.phys = 0;
        }
        Poll::Ready(Ok(()))
    }

    fn reopen(&mut self) {
        self.inner = Inner::Reopening(Box::pin(open_stream(self.client.clone(), self.digest)));
    }

    /// Reads and discards up to `limit` bytes; returns how many (0 at the end).
    fn poll_skip(&mut self, cx: &mut Context<'_>, limit: u64) -> Poll<io::Result<u64>> {
        let Inner::Open(r) = &mut self.inner else {
            return Poll::Ready(Err(io::Error::other("blob stream is not open")));
        };
        let mut scratch = [0u8; 8192];
        let want = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(scratch.len());
        let mut buf = ReadBuf::new(&mut scratch[..want]);
        ready!(r.as_mut().poll_read(cx, &mut buf))?;
        let n = buf.filled().len() as u64;
        self.phys += n;
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for GrpcBlobReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_open(cx))?;
        if this.pos != this.phys {
            // Past the end after a seek: nothing to read.
            return Poll::Ready(Ok(()));
        }
        let Inner::Open(r) = &mut this.inner else {
            return Poll::Ready(Err(io::Error::other("blob stream is not open")));
        };
        let before = buf.filled().len();
        ready!(r.as_mut().poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        this.phys += n;
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for GrpcBlobReader {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let target = match position {
            SeekFrom::Start(n) => Target::Abs(n),
            SeekFrom::Current(d) => {
                Target::Abs(this.pos.checked_add_signed(d).ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "seek before the start or overflow",
                    )
                })?)
            }
            SeekFrom::End(d) => Target::FromEnd(d),
        };
        this.seek = Some(target);
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_open(cx))?;
            let Some(target) = this.seek else {
                return Poll::Ready(Ok(this.pos));
            };
            match target {
                Target::FromEnd(d) => {
                    // Learn the size by reading to the end.
                    if ready!(this.poll_skip(cx, u64::MAX))? == 0 {
                        let t = this.phys.checked_add_signed(d).ok_or_else(|| {
                            io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
                        })?;
                        this.pos = this.phys;
                        this.seek = Some(Target::Abs(t));
                    }
                }
                Target::Abs(t) if t < this.phys => this.reopen(),
                Target::Abs(t) if t == this.phys => {
                    this.pos = t;
                    this.seek = None;
                }
                Target::Abs(t) => {
                    if ready!(this.poll_skip(cx, t - this.phys))? == 0 {
                        // Past the end: reads return nothing until a seek back.
                        this.pos = t;
                        this.seek = None;
                    }
                }
            }
        }
    }
}

enum Msg {
    Data(Bytes),
    Done,
}

struct GrpcBlobWriter {
    package: Package,
    /// `None` once closed.
    tx: Option<PollSender<Msg>>,
    task: Option<tokio::task::JoinHandle<Result<pb::PutBlobResponse, tonic::Status>>>,
    hasher: blake3::Hasher,
}

impl Drop for GrpcBlobWriter {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn closed() -> io::Error {
    io::Error::other("blob writer already closed")
}

impl tokio::io::AsyncWrite for GrpcBlobWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(tx) = this.tx.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        ready!(tx.poll_reserve(cx))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the Put call ended early"))?;
        let n = buf.len().min(MAX_CHUNK);
        tx.send_item(Msg::Data(Bytes::copy_from_slice(&buf[..n])))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the Put call ended early"))?;
        this.hasher.update(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl BlobWriter for GrpcBlobWriter {
    async fn close(&mut self) -> Result<B3Digest, Error> {
        let (Some(tx), Some(task)) = (self.tx.take(), self.task.take()) else {
            return Err(Error::io("closing blob", closed()));
        };
        // If the call already ended, the send fails and the task's result says why.
        if let Some(sender) = tx.get_ref() {
            let _ = sender.send(Msg::Done).await;
        }
        drop(tx);
        let resp = task
            .await
            .map_err(|e| Error::io("blob upload task failed", io::Error::other(e)))?
            .map_err(|s| remote_error(self.package, "uploading a blob".into(), s))?;
        let got = B3Digest::try_from(&resp.digest)
            .map_err(|e| Error::Protocol(format!("Put returned an invalid digest: {e}")))?;
        let want = B3Digest::from(self.hasher.finalize());
        if got != want {
            return Err(Error::Protocol(format!(
                "Put returned digest {got}, but the bytes sent have digest {want}"
            )));
        }
        Ok(got)
    }
}
