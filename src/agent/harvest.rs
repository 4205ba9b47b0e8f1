//! Receiving the outputs from the guest and ingesting them into the castore.
//!
//! The guest names entries and sends bytes; the host decides everything else: it hashes
//! every file itself (streaming into [`BlobService::open_write`], never holding a whole
//! file), builds each directory with the castore domain types (so names and sizes are
//! valid by construction), checks order, counts and sizes against [`HarvestLimits`], and
//! keeps at most `max_depth` directories open.
//!
//! Memory stays bounded: one frame at a time, the open directories (at most `max_depth`),
//! and the directories of the outputs until they are stored, which `max_entries` and
//! `max_metadata_bytes` bound.
//!
//! Directories go into one [`DirectoryPutter`] per output, leaves to root, and the putters
//! are closed only after OutputsDone: a harvest that fails anywhere leaves no directory
//! visible. Blobs become visible as each file completes; they are content-addressed and
//! referenced by nothing until a directory is, so a failed harvest exposes no partial tree.

use super::connection::{kind_of, Connection, ConnectionError};
use super::error::{
    from_connection, show_bytes, AgentFailure, DeadlineKind, Error, InfraError, Limit,
    LimitExceeded, Location, Phase, ProtocolError, Timeout, TreeViolation,
};
use super::limits::{HarvestLimits, SessionLimits};
use crate::castore::directory::{Directory, Node, PathComponent, SymlinkTarget};
use crate::castore::{B3Digest, BlobService, DirectoryPutter, DirectoryService};
use crate::refscan::{Found, Scanner};
use bytes::Bytes;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tvix_build_vm_agent::proto::{guest_message::Msg, Entry, EntryKind};

/// How much of a guest-sent name goes into an error message.
const SHOWN_NAME_BYTES: usize = 300;
/// Roughly how much of a path inside an output goes into an error message.
const SHOWN_PATH_BYTES: usize = 1024;

/// The castore calls of a harvest, for [`InfraError::CastoreStalled`]: a harvest deadline
/// that fires while one of these is pending blames the castore, not the guest.
const CASTORE_OPS: [&str; 5] = [
    "opening a blob for writing",
    "writing a blob",
    "storing a blob",
    "storing a directory",
    "storing the output's directories",
];
const OPEN_BLOB: usize = 0;
const WRITE_BLOB: usize = 1;
const CLOSE_BLOB: usize = 2;
const PUT_DIRECTORY: usize = 3;
const CLOSE_DIRECTORIES: usize = 4;
/// Nothing of the castore's is pending.
const NO_OP: usize = usize::MAX;

/// One output as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarvestedOutput {
    /// The output's root node.
    pub node: Node,
    /// The indices (ascending) of the request's refscan needles that the output's file
    /// contents and symlink targets hold, found while they were received.
    pub needles: Vec<u64>,
    /// The sum of its files' sizes.
    pub bytes: u64,
}

/// Receives every output of the job (in order, then OutputsDone) and stores it, scanning
/// it for `needles` on the way. Returns one entry per output, or `None` if the guest
/// reported it missing.
pub(crate) async fn harvest<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    outputs: &[String],
    session_limits: &SessionLimits,
    blobs: &dyn BlobService,
    dirs: &dyn DirectoryService,
    limits: &HarvestLimits,
    needles: &Scanner,
) -> Result<Vec<Option<HarvestedOutput>>, Error> {
    let timeout = Timeout {
        which: DeadlineKind::Harvest,
        after: limits.deadline,
    };
    let pending = AtomicUsize::new(NO_OP);
    let mut harvester = Harvester {
        conn,
        outputs,
        session_limits,
        blobs,
        dirs,
        limits,
        entries: 0,
        bytes: 0,
        metadata_bytes: 0,
        last_file: None,
        pending: &pending,
        empty_blob: None,
        scanner: needles,
        found: needles.found(),
    };
    let result = tokio::time::timeout(limits.deadline, harvester.all()).await;
    result.map_err(
        |_elapsed| match CASTORE_OPS.get(pending.load(Ordering::Relaxed)) {
            Some(what) => Error::from(InfraError::CastoreStalled {
                what,
                after: limits.deadline,
            }),
            None => Error::from(timeout),
        },
    )?
}

/// A directory being received.
#[derive(Default)]
struct OpenDir {
    dir: Directory,
    /// The last child's name, to check strictly increasing order.
    last: Option<PathComponent>,
}

/// Where an entry is: cheap to pass around, rendered into a [`Location`] only for an error.
#[derive(Clone, Copy)]
struct Place<'p> {
    index: u32,
    /// The open directories below the output's root.
    path: &'p [PathComponent],
    /// The entry's own name; `None` for the directory `path` names.
    name: Option<&'p [u8]>,
}

impl<'p> Place<'p> {
    fn root(index: u32) -> Self {
        Place {
            index,
            path: &[],
            name: None,
        }
    }
}

/// A directory output whose directories wait in their open putter until OutputsDone.
struct PendingRoot {
    putter: Box<dyn DirectoryPutter>,
    index: u32,
    digest: B3Digest,
}

struct Harvester<'a, S> {
    conn: &'a mut Connection<S>,
    outputs: &'a [String],
    session_limits: &'a SessionLimits,
    blobs: &'a dyn BlobService,
    dirs: &'a dyn DirectoryService,
    limits: &'a HarvestLimits,
    entries: u64,
    bytes: u64,
    metadata_bytes: u64,
    /// The file received last, while nothing else has come since: its output, its name
    /// (`None` for an output's root) and announced size. A FileChunk now means that file
    /// was longer than announced.
    last_file: Option<(u32, Option<PathComponent>, u64)>,
    /// The castore call in progress (an index into [`CASTORE_OPS`]), or [`NO_OP`].
    pending: &'a AtomicUsize,
    /// The empty blob, once stored by this harvest: later empty files reuse it instead of
    /// costing the castore a write each (a guest can send a million of them).
    empty_blob: Option<B3Digest>,
    scanner: &'a Scanner,
    /// The needles the output being received holds so far.
    found: Found,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Harvester<'_, S> {
    /// Awaits a castore call, noting it as pending meanwhile (see [`CASTORE_OPS`]).
    async fn castore<T>(&self, op: usize, call: impl std::future::Future<Output = T>) -> T {
        self.pending.store(op, Ordering::Relaxed);
        let out = call.await;
        self.pending.store(NO_OP, Ordering::Relaxed);
        out
    }

    async fn all(&mut self) -> Result<Vec<Option<HarvestedOutput>>, Error> {
        let mut nodes = Vec::with_capacity(self.outputs.len());
        let mut pending = Vec::new();
        for i in 0..self.outputs.len() {
            // Job.outputs is built by the host and far below u32::MAX entries.
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            match self.recv().await? {
                Msg::OutputStart(start) if start.index != index => {
                    return Err(ProtocolError::OutputOrder {
                        expected: index,
                        got: start.index,
                    }
                    .into())
                }
                Msg::OutputStart(start) if start.missing => nodes.push(None),
                Msg::OutputStart(_) => {
                    self.found = self.scanner.found();
                    let before = self.bytes;
                    let (node, root) = self.tree(index).await?;
                    let needles = self.found.indices();
                    let bytes = self.bytes.saturating_sub(before);
                    nodes.push(Some(HarvestedOutput {
                        node,
                        needles,
                        bytes,
                    }));
                    pending.extend(root);
                }
                other => return Err(self.unexpected("OutputStart", &other, &[])),
            }
        }
        match self.recv().await? {
            Msg::OutputsDone(_) => {}
            other => return Err(self.unexpected("OutputsDone", &other, &[])),
        }
        for mut root in pending {
            let at = self.location(Place::root(root.index));
            let got = self
                .castore(CLOSE_DIRECTORIES, root.putter.close())
                .await
                .map_err(|source| InfraError::Castore {
                    what: "storing the output's directories",
                    at: Some(at.clone()),
                    source: Box::new(source),
                })?;
            if got != root.digest {
                return Err(InfraError::PutterRoot {
                    at,
                    expected: root.digest,
                    root: got,
                }
                .into());
            }
        }
        Ok(nodes)
    }

    /// One output's tree. For a directory output, also its still open putter.
    async fn tree(&mut self, index: u32) -> Result<(Node, Option<PendingRoot>), Error> {
        let root_place = Place::root(index);
        let root = match self.recv().await? {
            Msg::Entry(e) => e,
            other => return Err(self.unexpected("the output's root Entry", &other, &[])),
        };
        if !root.name.is_empty() {
            let shown = show_bytes(&root.name, SHOWN_NAME_BYTES);
            return Err(self.violation(root_place, TreeViolation::NamedRoot(shown)));
        }
        self.count_entry(root_place, &root)?;
        match self.kind(root_place, &root)? {
            EntryKind::File => return Ok((self.file(root_place, None, &root).await?, None)),
            EntryKind::Symlink => return Ok((self.symlink(root_place, &root)?, None)),
            EntryKind::Directory | EntryKind::Unspecified => {}
        }

        let mut putter = self.dirs.put_multiple_start();
        let mut root_dir = OpenDir::default();
        // The open directories below the root and their names, innermost last; both
        // bounded by max_depth.
        let mut open: Vec<OpenDir> = Vec::new();
        let mut path: Vec<PathComponent> = Vec::new();
        loop {
            match self.recv().await? {
                Msg::Entry(entry) => {
                    let place = Place {
                        index,
                        path: &path,
                        name: Some(&entry.name),
                    };
                    self.count_entry(place, &entry)?;
                    let parent = open.last_mut().unwrap_or(&mut root_dir);
                    let name = self.child_name(place, parent)?;
                    let node = match self.kind(place, &entry)? {
                        EntryKind::File => self.file(place, Some(name.clone()), &entry).await?,
                        EntryKind::Symlink => self.symlink(place, &entry)?,
                        EntryKind::Directory | EntryKind::Unspecified => {
                            let depth = open.len() + 2;
                            if depth > self.limits.max_depth {
                                return Err(self.limit(
                                    place,
                                    Limit::Depth,
                                    depth as u64,
                                    self.limits.max_depth as u64,
                                ));
                            }
                            path.push(name);
                            open.push(OpenDir::default());
                            continue;
                        }
                    };
                    self.insert(place, parent, name, node)?;
                }
                Msg::DirectoryEnd(_) => {
                    self.last_file = None;
                    let (Some(done), Some(name)) = (open.pop(), path.pop()) else {
                        let (digest, size) =
                            self.store(root_place, &mut *putter, root_dir.dir).await?;
                        let pending = PendingRoot {
                            putter,
                            index,
                            digest,
                        };
                        return Ok((Node::Directory { digest, size }, Some(pending)));
                    };
                    let place = Place {
                        index,
                        path: &path,
                        name: Some(name.as_bytes()),
                    };
                    let (digest, size) = self.store(place, &mut *putter, done.dir).await?;
                    let parent = open.last_mut().unwrap_or(&mut root_dir);
                    let node = Node::Directory { digest, size };
                    self.insert(place, parent, name.clone(), node)?;
                }
                other => return Err(self.unexpected("Entry or DirectoryEnd", &other, &path)),
            }
        }
    }

    /// Receives a file's bytes into a new blob; the size must match exactly.
    async fn file(
        &mut self,
        place: Place<'_>,
        name: Option<PathComponent>,
        entry: &Entry,
    ) -> Result<Node, Error> {
        let size = entry.size;
        let total = self.bytes.saturating_add(size);
        if total > self.limits.max_total_bytes {
            return Err(self.limit(
                place,
                Limit::OutputBytes,
                total,
                self.limits.max_total_bytes,
            ));
        }
        self.bytes = total;
        if let (0, Some(digest)) = (size, self.empty_blob) {
            self.last_file = Some((place.index, name, 0));
            return Ok(Node::File {
                digest,
                size: 0,
                executable: entry.executable,
            });
        }
        let mut writer = self
            .castore(OPEN_BLOB, self.blobs.open_write())
            .await
            .map_err(|source| InfraError::Castore {
                what: "opening a blob for writing",
                at: Some(self.location(place)),
                source: Box::new(source),
            })?;
        let mut received = 0u64;
        let scanner = self.scanner;
        let mut scan = scanner.stream();
        while received < size {
            let short = |got| TreeViolation::FileTooShort {
                announced: size,
                received,
                got,
            };
            let chunk = match self.conn.recv().await {
                Ok(Msg::FileChunk(chunk)) => chunk,
                Ok(Msg::Failure(f)) => {
                    return Err(AgentFailure::from_report(f, self.session_limits).into())
                }
                Ok(other) => return Err(self.violation(place, short(kind_of(&other)))),
                Err(ConnectionError::Closed { .. }) => {
                    return Err(self.violation(place, short("the end of the stream")))
                }
                Err(e) => return Err(self.conn_error(e)),
            };
            if chunk.data.is_empty() {
                return Err(self.violation(place, TreeViolation::EmptyChunk));
            }
            let len = chunk.data.len() as u64;
            if len > size - received {
                return Err(self.violation(place, TreeViolation::FileTooLong { announced: size }));
            }
            if let Err(source) = self
                .castore(WRITE_BLOB, writer.write_all(&chunk.data))
                .await
            {
                let at = self.location(place);
                return Err(InfraError::BlobWrite { at, source }.into());
            }
            scan.feed(&chunk.data, &mut self.found);
            received += len;
        }
        let digest = self
            .castore(CLOSE_BLOB, writer.close())
            .await
            .map_err(|source| InfraError::Castore {
                what: "storing a blob",
                at: Some(self.location(place)),
                source: Box::new(source),
            })?;
        if size == 0 {
            self.empty_blob = Some(digest);
        }
        self.last_file = Some((place.index, name, size));
        Ok(Node::File {
            digest,
            size,
            executable: entry.executable,
        })
    }

    fn symlink(&mut self, place: Place<'_>, entry: &Entry) -> Result<Node, Error> {
        let target =
            SymlinkTarget::try_from(Bytes::copy_from_slice(&entry.target)).map_err(|source| {
                let target = show_bytes(&entry.target, SHOWN_NAME_BYTES);
                self.violation(
                    place,
                    TreeViolation::InvalidSymlinkTarget { target, source },
                )
            })?;
        self.scanner.scan(target.as_bytes(), &mut self.found);
        Ok(Node::Symlink { target })
    }

    /// Validates a child's name: length limit, castore rules, strictly after its elder
    /// sibling. Records it as the directory's last name.
    fn child_name(&self, place: Place<'_>, parent: &mut OpenDir) -> Result<PathComponent, Error> {
        let raw = place.name.unwrap_or_default();
        if raw.len() > self.limits.max_name_bytes {
            let max = self.limits.max_name_bytes as u64;
            return Err(self.limit(place, Limit::NameBytes, raw.len() as u64, max));
        }
        let shown = || show_bytes(raw, SHOWN_NAME_BYTES);
        let name = PathComponent::try_from(raw).map_err(|source| {
            let name = shown();
            self.violation(place, TreeViolation::InvalidName { name, source })
        })?;
        if let Some(previous) = &parent.last {
            if name == *previous {
                return Err(self.violation(place, TreeViolation::Duplicate(shown())));
            }
            if name < *previous {
                let previous = show_bytes(previous.as_bytes(), SHOWN_NAME_BYTES);
                let name = shown();
                return Err(self.violation(place, TreeViolation::NotSorted { name, previous }));
            }
        }
        parent.last = Some(name.clone());
        Ok(name)
    }

    /// Counts an entry, and its name and target bytes, against the limits.
    fn count_entry(&mut self, place: Place<'_>, entry: &Entry) -> Result<(), Error> {
        self.last_file = None;
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(self.limit(place, Limit::Entries, self.entries, self.limits.max_entries));
        }
        let metadata = (entry.name.len() as u64).saturating_add(entry.target.len() as u64);
        self.metadata_bytes = self.metadata_bytes.saturating_add(metadata);
        if self.metadata_bytes > self.limits.max_metadata_bytes {
            return Err(self.limit(
                place,
                Limit::MetadataBytes,
                self.metadata_bytes,
                self.limits.max_metadata_bytes,
            ));
        }
        Ok(())
    }

    /// The entry's kind, after checking it sets no field that belongs to another kind.
    fn kind(&self, place: Place<'_>, entry: &Entry) -> Result<EntryKind, Error> {
        let kind = match EntryKind::try_from(entry.kind) {
            Ok(EntryKind::Unspecified) | Err(_) => {
                return Err(self.violation(place, TreeViolation::UnknownKind(entry.kind)))
            }
            Ok(kind) => kind,
        };
        let (name, stray): (_, &[(bool, &'static str)]) = match kind {
            EntryKind::File => ("file", &[(!entry.target.is_empty(), "target")]),
            EntryKind::Symlink => (
                "symlink",
                &[(entry.size != 0, "size"), (entry.executable, "executable")],
            ),
            EntryKind::Directory | EntryKind::Unspecified => (
                "directory",
                &[
                    (entry.size != 0, "size"),
                    (entry.executable, "executable"),
                    (!entry.target.is_empty(), "target"),
                ],
            ),
        };
        if let Some((_, field)) = stray.iter().find(|(set, _)| *set) {
            let violation = TreeViolation::StrayField { kind: name, field };
            return Err(self.violation(place, violation));
        }
        Ok(kind)
    }

    fn insert(
        &self,
        place: Place<'_>,
        parent: &mut OpenDir,
        name: PathComponent,
        node: Node,
    ) -> Result<(), Error> {
        let shown = show_bytes(name.as_bytes(), SHOWN_NAME_BYTES);
        parent.dir.try_insert(name, node).map_err(|source| {
            self.violation(
                place,
                TreeViolation::Insert {
                    name: shown,
                    source,
                },
            )
        })
    }

    /// Puts a finished directory into the closure upload; returns its digest and size.
    async fn store(
        &self,
        place: Place<'_>,
        putter: &mut dyn DirectoryPutter,
        dir: Directory,
    ) -> Result<(B3Digest, u64), Error> {
        let named = (dir.digest(), dir.size());
        self.castore(PUT_DIRECTORY, putter.put(dir))
            .await
            .map_err(|source| InfraError::Castore {
                what: "storing a directory",
                at: Some(self.location(place)),
                source: Box::new(source),
            })?;
        Ok(named)
    }

    /// The next message; an AgentFailure becomes its error.
    async fn recv(&mut self) -> Result<Msg, Error> {
        match self.conn.recv().await {
            Ok(Msg::Failure(f)) => Err(AgentFailure::from_report(f, self.session_limits).into()),
            Ok(msg) => Ok(msg),
            Err(e) => Err(self.conn_error(e)),
        }
    }

    fn conn_error(&self, e: ConnectionError) -> Error {
        let timeout = Timeout {
            which: DeadlineKind::Harvest,
            after: self.limits.deadline,
        };
        from_connection(Phase::Harvest, e, timeout)
    }

    /// `got` came where `expected` should have, in the directory `path` names. A FileChunk
    /// right after a file means that file was longer than announced, which is the more
    /// useful thing to say.
    fn unexpected(&mut self, expected: &'static str, got: &Msg, path: &[PathComponent]) -> Error {
        if let (Msg::FileChunk(_), Some((index, name, announced))) = (got, self.last_file.take()) {
            let place = Place {
                index,
                path,
                name: name.as_ref().map(|n| n.as_bytes()),
            };
            return self.violation(place, TreeViolation::FileTooLong { announced });
        }
        ProtocolError::Unexpected {
            phase: Phase::Harvest,
            expected,
            got: kind_of(got),
        }
        .into()
    }

    fn violation(&self, place: Place<'_>, violation: TreeViolation) -> Error {
        ProtocolError::Tree {
            at: self.location(place),
            violation,
        }
        .into()
    }

    fn limit(&self, place: Place<'_>, limit: Limit, value: u64, max: u64) -> Error {
        LimitExceeded {
            limit,
            value,
            max,
            at: Some(self.location(place)),
        }
        .into()
    }

    fn location(&self, place: Place<'_>) -> Box<Location> {
        // The innermost components say the most; a deep path keeps only its end, so that a
        // hostile tree (256 levels of 255-byte names) cannot make one error 64 KiB long.
        let mut parts = Vec::new();
        let mut len = 0;
        for component in place
            .path
            .iter()
            .map(|c| c.as_bytes())
            .chain(place.name)
            .rev()
        {
            if len > SHOWN_PATH_BYTES {
                parts.push("...".to_owned());
                break;
            }
            let part = show_bytes(component, SHOWN_NAME_BYTES);
            len += part.len() + 1;
            parts.push(part);
        }
        parts.reverse();
        let shown = parts.join("/");
        Box::new(Location {
            index: place.index,
            output: self
                .outputs
                .get(place.index as usize)
                .cloned()
                .unwrap_or_default(),
            path: shown,
        })
    }
}

#[cfg(test)]
#[path = "harvest_tests.rs"]
mod tests;
