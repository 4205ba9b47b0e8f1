//! Receiving the outputs from the guest and ingesting them into the castore.
//!
//! The guest names entries and sends bytes; the host decides everything else: it hashes
//! every file itself (streaming into [`BlobService::open_write`], never holding a whole
//! file), builds each directory with the castore domain types (so names and sizes are
//! valid by construction), checks order, counts and sizes against [`HarvestLimits`], and
//! keeps at most `max_depth` directories open.
//!
//! Directories go into one [`DirectoryPutter`] per output, leaves to root, and the putters
//! are closed only after OutputsDone: a harvest that fails anywhere leaves no directory
//! visible. Blobs become visible as each file completes; they are content-addressed and
//! referenced by nothing until a directory is, so a failed harvest exposes no partial tree.

use super::connection::{kind_of, Connection};
use super::error::{
    from_connection, show_bytes, DeadlineKind, Error, InfraError, Limit, LimitExceeded, Location,
    Phase, ProtocolError, Timeout, TreeViolation,
};
use super::limits::{HarvestLimits, SessionLimits};
use super::session::agent_failure;
use crate::castore::directory::{Directory, Node, PathComponent, SymlinkTarget};
use crate::castore::{B3Digest, BlobService, DirectoryPutter, DirectoryService};
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tvix_build_vm_agent::proto::{guest_message::Msg, Entry, EntryKind};

/// How much of a guest-sent name goes into an error message.
const SHOWN_NAME_BYTES: usize = 300;

/// Receives every output of the job (in order, then OutputsDone) and stores it. Returns one
/// entry per output: its root node, or `None` if the guest reported it missing.
pub(crate) async fn harvest<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    outputs: &[String],
    session_limits: &SessionLimits,
    blobs: &dyn BlobService,
    dirs: &dyn DirectoryService,
    limits: &HarvestLimits,
) -> Result<Vec<Option<Node>>, Error> {
    let timeout = Timeout {
        which: DeadlineKind::Harvest,
        after: limits.deadline,
    };
    let mut harvester = Harvester {
        conn,
        outputs,
        session_limits,
        blobs,
        dirs,
        limits,
        entries: 0,
        bytes: 0,
        last_file: None,
    };
    tokio::time::timeout(limits.deadline, harvester.all())
        .await
        .map_err(|_elapsed| Error::from(timeout))?
}

/// A directory being received.
#[derive(Default)]
struct OpenDir {
    dir: Directory,
    /// The last child's name, to check strictly increasing order.
    last: Option<PathComponent>,
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
    /// The file received last, while nothing else has come since: a FileChunk now means
    /// that file was longer than announced.
    last_file: Option<(Box<Location>, u64)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Harvester<'_, S> {
    async fn all(&mut self) -> Result<Vec<Option<Node>>, Error> {
        let mut nodes = Vec::with_capacity(self.outputs.len());
        let mut putters = Vec::new();
        for i in 0..self.outputs.len() {
            // Job.outputs is built by the host and far below u32::MAX entries.
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            match self.recv("OutputStart").await? {
                Msg::OutputStart(start) if start.index != index => {
                    return Err(ProtocolError::OutputOrder {
                        expected: index,
                        got: start.index,
                    }
                    .into())
                }
                Msg::OutputStart(start) if start.missing => nodes.push(None),
                Msg::OutputStart(_) => {
                    let (node, putter) = self.tree(index).await?;
                    nodes.push(Some(node));
                    putters.extend(putter);
                }
                other => return Err(self.unexpected("OutputStart", &other)),
            }
        }
        match self.recv("OutputsDone").await? {
            Msg::OutputsDone(_) => {}
            other => return Err(self.unexpected("OutputsDone", &other)),
        }
        for (mut putter, at, expected) in putters {
            let root = putter.close().await.map_err(|source| InfraError::Castore {
                what: "storing the output's directories",
                at: Some(at.clone()),
                source: Box::new(source),
            })?;
            if root != expected {
                return Err(InfraError::PutterRoot { at, expected, root }.into());
            }
        }
        Ok(nodes)
    }

    /// One output's tree. For a directory output, also the putter holding its directories
    /// (still open), where it is, and the root digest the putter must report.
    #[allow(clippy::type_complexity)]
    async fn tree(
        &mut self,
        index: u32,
    ) -> Result<
        (
            Node,
            Option<(Box<dyn DirectoryPutter>, Box<Location>, B3Digest)>,
        ),
        Error,
    > {
        let mut path: Vec<PathComponent> = Vec::new();
        let root = match self.recv("the output's root Entry").await? {
            Msg::Entry(e) => e,
            other => return Err(self.unexpected("the output's root Entry", &other)),
        };
        let at = self.location(index, &path, None);
        if !root.name.is_empty() {
            return Err(tree(
                at,
                TreeViolation::NamedRoot(show_bytes(&root.name, SHOWN_NAME_BYTES)),
            ));
        }
        self.count_entry(&at)?;
        match kind(&root, &at)? {
            EntryKind::File => return Ok((self.file(at, &root).await?, None)),
            EntryKind::Symlink => return Ok((symlink_node(&root, &at)?, None)),
            EntryKind::Directory | EntryKind::Unspecified => {}
        }

        let mut putter = self.dirs.put_multiple_start();
        let mut root_dir = OpenDir::default();
        // The open directories below the root, innermost last; bounded by max_depth.
        let mut open: Vec<OpenDir> = Vec::new();
        loop {
            let msg = self.recv("Entry or DirectoryEnd").await?;
            match msg {
                Msg::Entry(entry) => {
                    let at = self.location(index, &path, Some(entry.name.as_slice()));
                    self.count_entry(&at)?;
                    let parent = open.last_mut().unwrap_or(&mut root_dir);
                    let name = self.child_name(parent, &entry.name, &at)?;
                    match kind(&entry, &at)? {
                        EntryKind::File => {
                            let node = self.file(at.clone(), &entry).await?;
                            insert(parent, name, node, at)?;
                        }
                        EntryKind::Symlink => {
                            let node = symlink_node(&entry, &at)?;
                            insert(parent, name, node, at)?;
                        }
                        EntryKind::Directory | EntryKind::Unspecified => {
                            let depth = open.len() + 2;
                            if depth > self.limits.max_depth {
                                return Err(LimitExceeded {
                                    limit: Limit::Depth,
                                    value: depth as u64,
                                    max: self.limits.max_depth as u64,
                                    at: Some(at),
                                }
                                .into());
                            }
                            path.push(name);
                            open.push(OpenDir::default());
                        }
                    }
                }
                Msg::DirectoryEnd(_) => {
                    self.last_file = None;
                    let at = self.location(index, &path, None);
                    let (Some(done), Some(name)) = (open.pop(), path.pop()) else {
                        let (digest, size) = store(&mut *putter, root_dir.dir, &at).await?;
                        let node = Node::Directory { digest, size };
                        return Ok((node, Some((putter, at, digest))));
                    };
                    let (digest, size) = store(&mut *putter, done.dir, &at).await?;
                    let parent = open.last_mut().unwrap_or(&mut root_dir);
                    insert(parent, name, Node::Directory { digest, size }, at)?;
                }
                other => return Err(self.unexpected("Entry or DirectoryEnd", &other)),
            }
        }
    }

    /// Receives a file's bytes into a new blob; the size must match exactly.
    async fn file(&mut self, at: Box<Location>, entry: &Entry) -> Result<Node, Error> {
        let size = entry.size;
        let total = self.bytes.saturating_add(size);
        if total > self.limits.max_total_bytes {
            return Err(LimitExceeded {
                limit: Limit::OutputBytes,
                value: total,
                max: self.limits.max_total_bytes,
                at: Some(at),
            }
            .into());
        }
        self.bytes = total;
        let mut writer = self
            .blobs
            .open_write()
            .await
            .map_err(|source| InfraError::Castore {
                what: "opening a blob for writing",
                at: Some(at.clone()),
                source: Box::new(source),
            })?;
        let mut received = 0u64;
        while received < size {
            let chunk = match self.conn.recv().await {
                Ok(Msg::FileChunk(chunk)) => chunk,
                Ok(Msg::Failure(f)) => return Err(agent_failure(f, self.session_limits).into()),
                Ok(other) => {
                    return Err(tree(
                        at,
                        TreeViolation::FileTooShort {
                            announced: size,
                            received,
                            got: kind_of(&other),
                        },
                    ))
                }
                Err(super::connection::ConnectionError::Closed { .. }) => {
                    return Err(tree(
                        at,
                        TreeViolation::FileTooShort {
                            announced: size,
                            received,
                            got: "the end of the stream",
                        },
                    ))
                }
                Err(e) => return Err(self.conn_error(e)),
            };
            if chunk.data.is_empty() {
                return Err(tree(at, TreeViolation::EmptyChunk));
            }
            let len = chunk.data.len() as u64;
            if len > size - received {
                return Err(tree(at, TreeViolation::FileTooLong { announced: size }));
            }
            writer
                .write_all(&chunk.data)
                .await
                .map_err(|source| InfraError::BlobWrite {
                    at: at.clone(),
                    source,
                })?;
            received += len;
        }
        let digest = writer.close().await.map_err(|source| InfraError::Castore {
            what: "storing a blob",
            at: Some(at.clone()),
            source: Box::new(source),
        })?;
        self.last_file = Some((at, size));
        Ok(Node::File {
            digest,
            size,
            executable: entry.executable,
        })
    }

    /// Validates a child's name: length limit, castore rules, strictly after its elder
    /// sibling. Records it as the directory's last name.
    fn child_name(
        &self,
        parent: &mut OpenDir,
        raw: &[u8],
        at: &Location,
    ) -> Result<PathComponent, Error> {
        if raw.len() > self.limits.max_name_bytes {
            return Err(LimitExceeded {
                limit: Limit::NameBytes,
                value: raw.len() as u64,
                max: self.limits.max_name_bytes as u64,
                at: Some(Box::new(at.clone())),
            }
            .into());
        }
        let shown = || show_bytes(raw, SHOWN_NAME_BYTES);
        let name = PathComponent::try_from(raw).map_err(|source| {
            tree(
                Box::new(at.clone()),
                TreeViolation::InvalidName {
                    name: shown(),
                    source,
                },
            )
        })?;
        if let Some(previous) = &parent.last {
            if name == *previous {
                return Err(tree(
                    Box::new(at.clone()),
                    TreeViolation::Duplicate(shown()),
                ));
            }
            if name < *previous {
                return Err(tree(
                    Box::new(at.clone()),
                    TreeViolation::NotSorted {
                        name: shown(),
                        previous: show_bytes(previous.as_bytes(), SHOWN_NAME_BYTES),
                    },
                ));
            }
        }
        parent.last = Some(name.clone());
        Ok(name)
    }

    fn count_entry(&mut self, at: &Location) -> Result<(), Error> {
        self.last_file = None;
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(LimitExceeded {
                limit: Limit::Entries,
                value: self.entries,
                max: self.limits.max_entries,
                at: Some(Box::new(at.clone())),
            }
            .into());
        }
        Ok(())
    }

    /// The next message; an AgentFailure becomes its error.
    async fn recv(&mut self, _expected: &'static str) -> Result<Msg, Error> {
        match self.conn.recv().await {
            Ok(Msg::Failure(f)) => Err(agent_failure(f, self.session_limits).into()),
            Ok(msg) => Ok(msg),
            Err(e) => Err(self.conn_error(e)),
        }
    }

    fn conn_error(&self, e: super::connection::ConnectionError) -> Error {
        from_connection(
            Phase::Harvest,
            e,
            Timeout {
                which: DeadlineKind::Harvest,
                after: self.limits.deadline,
            },
        )
    }

    /// `got` came where `expected` should have. A FileChunk right after a file means that
    /// file was longer than announced, which is the more useful thing to say.
    fn unexpected(&mut self, expected: &'static str, got: &Msg) -> Error {
        if let (Msg::FileChunk(_), Some((at, announced))) = (got, self.last_file.take()) {
            return tree(at, TreeViolation::FileTooLong { announced });
        }
        ProtocolError::Unexpected {
            phase: Phase::Harvest,
            expected,
            got: kind_of(got),
        }
        .into()
    }

    fn location(&self, index: u32, path: &[PathComponent], name: Option<&[u8]>) -> Box<Location> {
        let mut shown = String::new();
        for component in path.iter().map(|c| c.as_bytes()).chain(name) {
            if !shown.is_empty() {
                shown.push('/');
            }
            shown.push_str(&show_bytes(component, SHOWN_NAME_BYTES));
        }
        Box::new(Location {
            index,
            output: self
                .outputs
                .get(index as usize)
                .cloned()
                .unwrap_or_default(),
            path: shown,
        })
    }
}

fn tree(at: Box<Location>, violation: TreeViolation) -> Error {
    ProtocolError::Tree { at, violation }.into()
}

/// The entry's kind, after checking it sets no field that belongs to another kind.
fn kind(entry: &Entry, at: &Location) -> Result<EntryKind, Error> {
    let kind = EntryKind::try_from(entry.kind)
        .ok()
        .filter(|k| *k != EntryKind::Unspecified)
        .ok_or_else(|| tree(Box::new(at.clone()), TreeViolation::UnknownKind(entry.kind)))?;
    let (name, stray) = match kind {
        EntryKind::File => ("file", [(!entry.target.is_empty(), "target")].to_vec()),
        EntryKind::Symlink => (
            "symlink",
            [(entry.size != 0, "size"), (entry.executable, "executable")].to_vec(),
        ),
        EntryKind::Directory | EntryKind::Unspecified => (
            "directory",
            [
                (entry.size != 0, "size"),
                (entry.executable, "executable"),
                (!entry.target.is_empty(), "target"),
            ]
            .to_vec(),
        ),
    };
    if let Some((_, field)) = stray.into_iter().find(|(set, _)| *set) {
        return Err(tree(
            Box::new(at.clone()),
            TreeViolation::StrayField { kind: name, field },
        ));
    }
    Ok(kind)
}

fn symlink_node(entry: &Entry, at: &Location) -> Result<Node, Error> {
    let target =
        SymlinkTarget::try_from(Bytes::copy_from_slice(&entry.target)).map_err(|source| {
            tree(
                Box::new(at.clone()),
                TreeViolation::InvalidSymlinkTarget {
                    target: show_bytes(&entry.target, SHOWN_NAME_BYTES),
                    source,
                },
            )
        })?;
    Ok(Node::Symlink { target })
}

fn insert(
    parent: &mut OpenDir,
    name: PathComponent,
    node: Node,
    at: Box<Location>,
) -> Result<(), Error> {
    let shown = show_bytes(name.as_bytes(), SHOWN_NAME_BYTES);
    parent.dir.try_insert(name, node).map_err(|source| {
        tree(
            at,
            TreeViolation::Insert {
                name: shown,
                source,
            },
        )
    })
}

/// Puts a finished directory into the closure upload; returns its digest and size.
async fn store(
    putter: &mut dyn DirectoryPutter,
    dir: Directory,
    at: &Location,
) -> Result<(B3Digest, u64), Error> {
    let named = (dir.digest(), dir.size());
    putter
        .put(dir)
        .await
        .map_err(|source| InfraError::Castore {
            what: "storing a directory",
            at: Some(Box::new(at.clone())),
            source: Box::new(source),
        })?;
    Ok(named)
}

#[cfg(test)]
#[path = "harvest_tests.rs"]
mod tests;
