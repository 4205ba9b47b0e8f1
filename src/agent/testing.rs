//! Test helpers: a fake guest that writes frames, and the in-memory castore with a record of
//! what the harvest handed to it.

use crate::castore::blob::MemoryBlobService;
use crate::castore::directory::{Directory, Node};
use crate::castore::directory_service::MemoryDirectoryService;
use crate::castore::{B3Digest, BlobService, DirectoryPutter};
use crate::castore::{DirectoryService, Error as CastoreError};
use futures::stream::BoxStream;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
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
        usage: None,
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

// ---- castore ----------------------------------------------------------------------------

/// The in-memory directory service, recording every directory handed to a putter so a
/// test can ask whether any of them became visible.
#[derive(Clone, Default)]
pub struct RecordingDirs {
    pub inner: MemoryDirectoryService,
    handed: Arc<Mutex<Vec<B3Digest>>>,
}

impl RecordingDirs {
    /// How many of the directories handed to putters can be read back.
    pub async fn visible(&self) -> usize {
        let handed = self.handed.lock().expect("lock").clone();
        let mut n = 0;
        for d in handed {
            if self.inner.get(&d).await.expect("get").is_some() {
                n += 1;
            }
        }
        n
    }

    /// How many directories were handed to putters.
    pub fn handed(&self) -> usize {
        self.handed.lock().expect("lock").len()
    }
}

struct RecordingPutter {
    inner: Box<dyn DirectoryPutter>,
    handed: Arc<Mutex<Vec<B3Digest>>>,
}

#[async_trait::async_trait]
impl DirectoryPutter for RecordingPutter {
    async fn put(&mut self, directory: Directory) -> Result<(), CastoreError> {
        self.handed.lock().expect("lock").push(directory.digest());
        self.inner.put(directory).await
    }
    async fn close(&mut self) -> Result<B3Digest, CastoreError> {
        self.inner.close().await
    }
}

#[async_trait::async_trait]
impl DirectoryService for RecordingDirs {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, CastoreError> {
        self.inner.get(digest).await
    }
    async fn put(&self, directory: Directory) -> Result<B3Digest, CastoreError> {
        self.inner.put(directory).await
    }
    fn get_recursive(
        &self,
        root: &B3Digest,
    ) -> BoxStream<'static, Result<Directory, CastoreError>> {
        self.inner.get_recursive(root)
    }
    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
        Box::new(RecordingPutter {
            inner: self.inner.put_multiple_start(),
            handed: self.handed.clone(),
        })
    }
}

/// The blob's contents, if stored.
pub async fn blob(blobs: &MemoryBlobService, digest: &B3Digest) -> Option<Vec<u8>> {
    let mut reader = blobs.open_read(digest).await.expect("open_read")?;
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await.expect("read");
    Some(out)
}

/// The node for `data` as a file, computed independently of the harvest.
pub fn file_node(data: &[u8], executable: bool) -> Node {
    Node::File {
        digest: B3Digest::of(data),
        size: data.len() as u64,
        executable,
    }
}
