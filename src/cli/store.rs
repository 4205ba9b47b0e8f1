//! `tvix-build-vm store ...`: import host paths, list and export nodes, print blobs.

use super::store_args::StoreArgs;
use crate::castore::directory::{Directory, Node};
use crate::castore::export::export_node;
use crate::castore::import::import_path;
use crate::castore::{B3Digest, BlobService, DirectoryService};
use crate::proto::castore as pb;
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures::TryStreamExt;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Work with the content-addressed store.
#[derive(Debug, clap::Args)]
pub struct StoreCommand {
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(subcommand)]
    pub command: StoreSubcommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum StoreSubcommand {
    /// Import host paths; print each root node as one line of proto3 JSON, named by the
    /// path's basename.
    Import {
        /// Files, directories or symlinks (a symlink itself is imported, not its target).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List a node recursively: one line per entry (kind, size, digest, path).
    Ls {
        /// A castore Node as proto3 JSON (as printed by `store import`).
        node_json: String,
    },
    /// Write a blob's contents to stdout.
    Cat {
        /// The blob digest: b3:<base64> or 64 hex characters.
        digest: String,
    },
    /// Write a node to a host path that must not exist yet.
    Export {
        /// A castore Node as proto3 JSON (as printed by `store import`).
        node_json: String,
        /// Destination path.
        dest: PathBuf,
    },
    /// Remove what no root keeps from the embedded store: roots are pins, builds younger
    /// than --keep-for, and uploads within --grace (see docs/serve.md).
    Gc(super::store_gc::GcArgs),
    /// Keep a node and its closure in the embedded store until unpinned.
    Pin {
        /// A castore Node as proto3 JSON (as printed by `store import`).
        node_json: String,
        #[command(flatten)]
        serve: ServeAddr,
    },
    /// Remove a pin made by `store pin`.
    Unpin {
        /// The Node JSON it was pinned with.
        node_json: String,
        #[command(flatten)]
        serve: ServeAddr,
    },
    /// List the pins: one JSON line each (node, pinned_at in seconds since the epoch, who;
    /// through a serve, the caller's own pins only).
    Pins {
        #[command(flatten)]
        serve: ServeAddr,
    },
}

/// Where a running serve listens, for the pin commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeAddr {
    /// Talk to the pin service of the serve at this address (grpc+unix:/abs/path.sock or
    /// grpc+http://host:port) instead of opening the store, which serve holds locked.
    #[arg(long, value_name = "ADDR")]
    pub addr: Option<String>,
}

/// Runs a `store` subcommand.
pub async fn run(cmd: StoreCommand) -> anyhow::Result<()> {
    use super::{store_gc, store_pins_remote};
    match cmd.command {
        StoreSubcommand::Gc(args) => return store_gc::gc(&cmd.store, args).await,
        StoreSubcommand::Pin { node_json, serve } => {
            return match serve.addr {
                Some(addr) => store_pins_remote::pin(&addr, &node_json).await,
                None => store_gc::pin(&cmd.store, &node_json).await,
            }
        }
        StoreSubcommand::Unpin { node_json, serve } => {
            return match serve.addr {
                Some(addr) => store_pins_remote::unpin(&addr, &node_json).await,
                None => store_gc::unpin(&cmd.store, &node_json).await,
            }
        }
        StoreSubcommand::Pins { serve } => {
            return match serve.addr {
                Some(addr) => store_pins_remote::pins(&addr).await,
                None => store_gc::pins(&cmd.store).await,
            }
        }
        _ => {}
    }
    let (blobs, directories) = cmd.store.open().context("opening the store")?;
    match cmd.command {
        StoreSubcommand::Import { paths } => import(blobs, directories, &paths).await,
        StoreSubcommand::Ls { node_json } => ls(directories.as_ref(), &node_json).await,
        StoreSubcommand::Cat { digest } => cat(blobs.as_ref(), &digest).await,
        StoreSubcommand::Export { node_json, dest } => {
            let (_, node) = parse_node(&node_json)?;
            export_node(blobs.as_ref(), directories.as_ref(), &node, &dest)
                .await
                .with_context(|| format!("exporting to {}", dest.display()))
        }
        StoreSubcommand::Gc(_)
        | StoreSubcommand::Pin { .. }
        | StoreSubcommand::Unpin { .. }
        | StoreSubcommand::Pins { .. } => unreachable!("handled above"),
    }
}

/// The name a path's root node gets: its basename (of the absolute path, for `.` and the like).
fn basename(path: &Path) -> anyhow::Result<Bytes> {
    let abs = std::fs::canonicalize(
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
    .ok()
    .and_then(|p| path.file_name().map(|n| p.join(n)));
    let abs = match (path.file_name(), abs) {
        (Some(_), Some(a)) => a,
        _ => std::fs::canonicalize(path).with_context(|| format!("{}", path.display()))?,
    };
    let name = abs
        .file_name()
        .ok_or_else(|| anyhow!("{}: has no basename to name the node", path.display()))?;
    Ok(Bytes::copy_from_slice(name.as_bytes()))
}

async fn import(
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    paths: &[PathBuf],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for path in paths {
        let name = basename(path)?;
        crate::castore::directory::PathComponent::try_from(name.clone())
            .with_context(|| format!("{}: the basename cannot name a node", path.display()))?;
        let node = import_path(blobs.clone(), directories.clone(), path)
            .await
            .with_context(|| format!("importing {}", path.display()))?;
        let json = serde_json::to_string(&node.to_proto(name))?;
        writeln!(out, "{json}")?;
        out.flush()?;
    }
    Ok(())
}

fn parse_node(json: &str) -> anyhow::Result<(crate::castore::PathComponent, Node)> {
    let pb: pb::Node = serde_json::from_str(json).context("parsing the node JSON")?;
    Node::from_proto(pb).context("invalid node")
}

async fn ls(directories: &dyn DirectoryService, node_json: &str) -> anyhow::Result<()> {
    let (name, node) = parse_node(node_json)?;
    let closure: HashMap<B3Digest, Directory> = match &node {
        Node::Directory { digest, .. } => directories
            .get_recursive(digest)
            .map_ok(|d| (d.digest(), d))
            .try_collect()
            .await
            .context("fetching the directory closure")?,
        _ => HashMap::new(),
    };
    let mut out = std::io::stdout().lock();
    let mut stack = vec![(name.to_string(), node)];
    while let Some((path, node)) = stack.pop() {
        match &node {
            Node::Directory { digest, size } => {
                writeln!(out, "d {size} {digest} {path}")?;
                let dir = closure
                    .get(digest)
                    .ok_or_else(|| anyhow!("directory {digest} is missing from its closure"))?;
                // Reverse, so the stack pops entries in name order.
                let children: Vec<_> = dir.nodes().collect();
                for (n, child) in children.into_iter().rev() {
                    stack.push((format!("{path}/{n}"), child.clone()));
                }
            }
            Node::File {
                digest,
                size,
                executable,
            } => {
                let kind = if *executable { 'x' } else { 'f' };
                writeln!(out, "{kind} {size} {digest} {path}")?;
            }
            Node::Symlink { target } => writeln!(out, "l {path} -> {target}")?,
        }
    }
    Ok(())
}

async fn cat(blobs: &dyn BlobService, digest: &str) -> anyhow::Result<()> {
    let digest: B3Digest = digest.parse().context("parsing the digest")?;
    let Some(mut reader) = blobs.open_read(&digest).await? else {
        bail!("blob {digest} not found");
    };
    let mut stdout = tokio::io::stdout();
    tokio::io::copy(&mut reader, &mut stdout)
        .await
        .with_context(|| format!("writing blob {digest} to stdout"))?;
    tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
    Ok(())
}
