//! `store gc`, `store pin`, `store unpin`, `store pins`: the embedded store's garbage
//! collection and its pins, on the store opened directly (so not while `serve` holds it).

use super::store_args::{StoreArgs, StoreArgsError};
use crate::castore::blob::LocalBlobService;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::gc::{self, records};
use crate::proto::castore as pb;
use crate::units::parse_duration;
use anyhow::{bail, Context};
use std::io::Write;
use std::time::Duration;

/// Defaults shared with `serve`'s flags and config.
pub const DEFAULT_GRACE: &str = "1h";
pub const DEFAULT_KEEP_FOR: &str = "168h";

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Count what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep anything uploaded within this long (e.g. 30m, 1h).
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_GRACE, value_parser = parse_duration)]
    pub grace: Duration,
    /// Keep the inputs, outputs and logs of builds that finished within this long.
    #[arg(long, value_name = "DURATION", default_value = DEFAULT_KEEP_FOR, value_parser = parse_duration)]
    pub keep_for: Duration,
}

/// The embedded store, opened for GC; refused with any other address.
fn open_embedded(store: &StoreArgs) -> anyhow::Result<(LocalBlobService, RedbDirectoryService)> {
    let other = store.blob_service_addr.as_ref();
    if let Some(addr) = other.or(store.directory_service_addr.as_ref()) {
        bail!(
            "garbage collection and pins apply to the embedded store only, not {addr:?} \
             (an object store's bucket has lifecycle rules for this; a remote castore \
             collects its own)"
        );
    }
    match store.castore_embedded() {
        Ok((_, Some(e))) => Ok((e.blobs, e.dirs)),
        Ok((_, None)) => bail!("garbage collection applies to the embedded store only"),
        Err(StoreArgsError::Embedded(e)) if e.is_locked() => bail!(
            "the store {} is in use by another process (a running serve?): stop it first, \
             or pin through that serve with --addr grpc+unix:/path/to/serve.sock; \
             serve collects garbage itself (--gc-interval)",
            store.store_dir()?.display()
        ),
        Err(e) => Err(e.into()),
    }
}

pub async fn gc(store: &StoreArgs, args: GcArgs) -> anyhow::Result<()> {
    let (blobs, dirs) = open_embedded(store)?;
    let options = gc::Options {
        grace: args.grace,
        keep_for: args.keep_for,
        dry_run: args.dry_run,
    };
    let r = gc::collect(&blobs, &dirs, options, vec![]).await?;
    let verb = if r.dry_run { "would remove" } else { "removed" };
    println!(
        "directories: {} kept, {} {verb}; blobs: {} kept, {} {verb} ({} bytes); \
         tmp files {verb}: {}; build records {verb}: {}; {:.2}s",
        r.directories_kept,
        r.directories_removed,
        r.blobs_kept,
        r.blobs_removed,
        r.bytes_freed,
        r.tmp_files_removed,
        r.build_records_removed,
        r.seconds
    );
    Ok(())
}

pub(super) fn parse_node(json: &str) -> anyhow::Result<pb::Node> {
    let node: pb::Node = serde_json::from_str(json).context("parsing the node JSON")?;
    // Validated like every node from outside: a pin names a real node or nothing.
    crate::castore::Node::from_proto(node.clone()).context("invalid node")?;
    Ok(node)
}

pub async fn pin(store: &StoreArgs, node_json: &str) -> anyhow::Result<()> {
    let node = parse_node(node_json)?;
    let (_, dirs) = open_embedded(store)?;
    // Named as serve names a unix peer of this uid, so serve can unpin it for its owner.
    let who =
        crate::server::tenant_name::Tenant::of_uid(nix::unistd::getuid().as_raw()).to_string();
    if !records::pin(&dirs, &node, &who).await? {
        eprintln!("already pinned (who and when updated)");
    }
    Ok(())
}

pub async fn unpin(store: &StoreArgs, node_json: &str) -> anyhow::Result<()> {
    let node = parse_node(node_json)?;
    let (_, dirs) = open_embedded(store)?;
    if !records::unpin(&dirs, &node).await? {
        bail!("that node is not pinned");
    }
    Ok(())
}

pub async fn pins(store: &StoreArgs) -> anyhow::Result<()> {
    let (_, dirs) = open_embedded(store)?;
    print_pins(
        records::pins(&dirs)
            .await?
            .into_iter()
            .map(|p| (p.node, p.pinned_at, p.who)),
    )
}

/// One JSON line per pin: node, pinned_at, who.
pub(super) fn print_pins(
    pins: impl IntoIterator<Item = (pb::Node, u64, String)>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for (node, pinned_at, who) in pins {
        let line = serde_json::json!({
            "node": node,
            "pinned_at": pinned_at,
            "who": who,
        });
        writeln!(out, "{line}")?;
    }
    Ok(())
}
