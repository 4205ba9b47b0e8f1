//! Test helpers: a fake guest that writes frames, and minimal in-memory castore fakes that
//! keep directory uploads invisible until `close` (as the real backends promise).

use crate::castore::directory::{Directory, Node};
use crate::castore::{B3Digest, BlobReader, BlobService, BlobWriter, DirectoryPutter};
use crate::castore::{DirectoryService, Error as CastoreError};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tvix_build_vm_agent::frame;
use tvix_build_vm_agent::proto::{
    exited, guest_message::Msg, DirectoryEnd, Entry, EntryKind, Exited, FileChunk, GuestMessage,
    Hello, Log, OutputStart, OutputsDone,
};
use tvix_build_vm_agent::PROTOCOL_VERSION;

// ---- messages -------------------------------------------------------------------------

pub fn hello() -> Msg {
    Msg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test-agent 0".into(),
        timings: None,
    })
}

pub fn log(stream: i32, data: &[u8]) -> Msg {
    Msg::Log(Log {
        stream,
        data: data.to_vec(),
    })
}

pub fn exited_code(code: i32) -> Msg {
    Msg::Exited(Exited {
        status: Some(exited::Status::Code(code)),
        oom_killed: false,
        duration_us: 1000,
    })
}

pub fn start(index: u32) -> Msg {
    Msg::OutputStart(OutputStart {
        index,
        missing: false,
    })
}

pub fn missing(index: u32) -> Msg {
    Msg::OutputStart(OutputStart {
        index,
        missing: true,
    })
}

pub fn done() -> Msg {
    Msg::OutputsDone(OutputsDone {})
}

pub fn dir(name: &[u8]) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: EntryKind::Directory as i32,
        ..Default::default()
    })
}

pub fn end() -> Msg {
    Msg::DirectoryEnd(DirectoryEnd {})
}

pub fn symlink(name: &[u8], target: &[u8]) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: EntryKind::Symlink as i32,
        target: target.to_vec(),
        ..Default::default()
    })
}

/// A file entry announcing `size` bytes, without its chunks.
pub fn file_entry(name: &[u8], size: u64, executable: bool) -> Msg {
    Msg::Entry(Entry {
        name: name.to_vec(),
        kind: EntryKind::File as i32,
        executable,
        size,
        ..Default::default()
    })
}

pub fn chunk(data: &[u8]) -> Msg {
    Msg::FileChunk(FileChunk {
        data: data.to_vec(),
    })
}

/// A whole file: its entry and its contents in chunks of `FILE_CHUNK_BYTES`.
pub fn file(name: &[u8], data: &[u8], executable: bool) -> Vec<Msg> {
    let mut out = vec![file_entry(name, data.len() as u64, executable)];
    out.extend(data.chunks(frame::FILE_CHUNK_BYTES).map(chunk));
    out
}

pub fn wire(msgs: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend(
            frame::encode(&GuestMessage {
                msg: Some(m.clone()),
            })
            .expect("encodes"),
        );
    }
    out
}

/// The host's end of a connection whose guest writes `bytes`, then closes its sending side
/// (or, with `hold_open`, keeps it open forever, as a stuck guest would). Either way it
/// drains what the host sends until the host hangs up.
pub fn fake_guest(bytes: Vec<u8>, hold_open: bool) -> DuplexStream {
    let (host, guest) = tokio::io::duplex(64 * 1024);
    let (mut from_host, mut to_host) = tokio::io::split(guest);
    tokio::spawn(async move {
        let mut sink = Vec::new();
        // Ends when the host hangs up.
        let _ = from_host.read_to_end(&mut sink).await;
    });
    tokio::spawn(async move {
        // Fails once the host hangs up early, which some tests do on purpose.
        let _ = to_host.write_all(&bytes).await;
        if hold_open {
            std::future::pending::<()>().await;
        }
        let _ = to_host.shutdown().await;
    });
    host
}

// ---- castore fakes ----------------------------------------------------------------------

#[derive(Clone, Default)]
pub struct MemBlobs(pub Arc<Mutex<HashMap<B3Digest, Vec<u8>>>>);

struct MemBlobWriter {
    buf: Vec<u8>,
    store: Arc<Mutex<HashMap<B3Digest, Vec<u8>>>>,
}

impl AsyncWrite for MemBlobWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl BlobWriter for MemBlobWriter {
    async fn close(&mut self) -> Result<B3Digest, CastoreError> {
        let digest = B3Digest::of(&self.buf);
        self.store
            .lock()
            .expect("lock")
            .insert(digest, std::mem::take(&mut self.buf));
        Ok(digest)
    }
}

#[async_trait::async_trait]
impl BlobService for MemBlobs {
    async fn has(&self, digest: &B3Digest) -> Result<bool, CastoreError> {
        Ok(self.0.lock().expect("lock").contains_key(digest))
    }
    async fn open_read(
        &self,
        digest: &B3Digest,
    ) -> Result<Option<Box<dyn BlobReader>>, CastoreError> {
        let data = self.0.lock().expect("lock").get(digest).cloned();
        Ok(data.map(|d| Box::new(std::io::Cursor::new(d)) as Box<dyn BlobReader>))
    }
    async fn open_write(&self) -> Result<Box<dyn BlobWriter>, CastoreError> {
        Ok(Box::new(MemBlobWriter {
            buf: Vec::new(),
            store: self.0.clone(),
        }))
    }
}

#[derive(Clone, Default)]
pub struct MemDirs(pub Arc<Mutex<HashMap<B3Digest, Directory>>>);

impl MemDirs {
    pub fn len(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}

fn fake_error(what: &str) -> CastoreError {
    CastoreError::Io {
        context: what.to_owned(),
        source: std::io::Error::other(what.to_owned()),
    }
}

struct MemPutter {
    pending: Vec<Directory>,
    store: Arc<Mutex<HashMap<B3Digest, Directory>>>,
}

#[async_trait::async_trait]
impl DirectoryPutter for MemPutter {
    async fn put(&mut self, directory: Directory) -> Result<(), CastoreError> {
        let store = self.store.lock().expect("lock");
        let known: HashSet<B3Digest> = self.pending.iter().map(|d| d.digest()).collect();
        for (_, digest, _) in directory.directories() {
            if !known.contains(digest) && !store.contains_key(digest) {
                return Err(fake_error("dangling directory reference"));
            }
        }
        drop(store);
        self.pending.push(directory);
        Ok(())
    }

    async fn close(&mut self) -> Result<B3Digest, CastoreError> {
        let referenced: HashSet<B3Digest> = self
            .pending
            .iter()
            .flat_map(|d| {
                d.directories()
                    .map(|(_, digest, _)| *digest)
                    .collect::<Vec<_>>()
            })
            .collect();
        let roots: HashSet<B3Digest> = self
            .pending
            .iter()
            .map(|d| d.digest())
            .filter(|d| !referenced.contains(d))
            .collect();
        let [root] = roots.into_iter().collect::<Vec<_>>()[..] else {
            return Err(fake_error("not exactly one root"));
        };
        let mut store = self.store.lock().expect("lock");
        for d in self.pending.drain(..) {
            store.insert(d.digest(), d);
        }
        Ok(root)
    }
}

#[async_trait::async_trait]
impl DirectoryService for MemDirs {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, CastoreError> {
        Ok(self.0.lock().expect("lock").get(digest).cloned())
    }
    async fn put(&self, directory: Directory) -> Result<B3Digest, CastoreError> {
        let digest = directory.digest();
        self.0.lock().expect("lock").insert(digest, directory);
        Ok(digest)
    }
    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, CastoreError>> {
        let store = self.0.lock().expect("lock").clone();
        let mut queue = std::collections::VecDeque::from([*root]);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while let Some(d) = queue.pop_front() {
            if !seen.insert(d) {
                continue;
            }
            match store.get(&d) {
                Some(dir) => {
                    queue.extend(dir.directories().map(|(_, digest, _)| *digest));
                    out.push(Ok(dir.clone()));
                }
                None => out.push(Err(fake_error("missing directory"))),
            }
        }
        futures::stream::iter(out).boxed()
    }
    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
        Box::new(MemPutter {
            pending: Vec::new(),
            store: self.0.clone(),
        })
    }
}

/// The node for `data` as a file, computed independently of the harvest.
pub fn file_node(data: &[u8], executable: bool) -> Node {
    Node::File {
        digest: B3Digest::of(data),
        size: data.len() as u64,
        executable,
    }
}
