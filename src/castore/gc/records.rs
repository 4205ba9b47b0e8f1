//! Pins and build records: the GC's persistent roots, in tables of `directories.redb`.
//!
//! A pin keeps one node (and its closure) until it is unpinned, and says who pinned it and
//! when. A build record keeps a finished build's inputs, outputs and log blob while it is
//! younger than the GC's `keep_for`; the GC drops older records.

use crate::castore::directory_service::redb::{now_secs, RedbDirectoryService, BUILDS, PINS};
use crate::castore::{B3Digest, Error};
use crate::proto::castore as pb;
use prost::Message;
use redb::{ReadableDatabase, ReadableTable};

/// One pin as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Pin {
    pub node: pb::Node,
    /// Seconds since the epoch.
    pub pinned_at: u64,
    pub who: String,
}

/// The longest `who` stored (a tenant name, a uid): longer ones are cut.
const MAX_WHO: usize = 256;

/// Pins `node` for `who`; true if it was not pinned before (a re-pin updates who and when).
pub async fn pin(dirs: &RedbDirectoryService, node: &pb::Node, who: &str) -> Result<bool, Error> {
    let key = node.encode_to_vec();
    let who: String = who.chars().take(MAX_WHO).collect();
    dirs.blocking(move |db, path| {
        let ctx = || format!("pinning in {}", path.display());
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        let new = {
            let mut t = txn.open_table(PINS).map_err(|e| Error::db(ctx(), e))?;
            let old = t
                .insert(key.as_slice(), (now_secs(), who.as_str()))
                .map_err(|e| Error::db(ctx(), e))?;
            old.is_none()
        };
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(new)
    })
    .await
}

/// Removes the pin of `node`; true if it was pinned.
pub async fn unpin(dirs: &RedbDirectoryService, node: &pb::Node) -> Result<bool, Error> {
    let key = node.encode_to_vec();
    dirs.blocking(move |db, path| {
        let ctx = || format!("unpinning in {}", path.display());
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        let was = {
            let mut t = txn.open_table(PINS).map_err(|e| Error::db(ctx(), e))?;
            let old = t.remove(key.as_slice()).map_err(|e| Error::db(ctx(), e))?;
            old.is_some()
        };
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(was)
    })
    .await
}

/// What [`pin_owned`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinOutcome {
    /// Pinned now.
    Created,
    /// The same owner had pinned it; its time is refreshed.
    Refreshed,
    /// Another owner holds the pin (named); nothing changed.
    HeldBy(String),
    /// The owner holds this many pins already; nothing changed.
    LimitReached(usize),
}

/// Pins `node` for `who` unless another owner holds it or `who` already holds `max` pins
/// (checked in the same write transaction as the insert, so concurrent pins cannot overshoot).
pub async fn pin_owned(
    dirs: &RedbDirectoryService,
    node: &pb::Node,
    who: &str,
    max: usize,
) -> Result<PinOutcome, Error> {
    let key = node.encode_to_vec();
    let who: String = who.chars().take(MAX_WHO).collect();
    dirs.blocking(move |db, path| {
        let ctx = || format!("pinning in {}", path.display());
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        let outcome = {
            let mut t = txn.open_table(PINS).map_err(|e| Error::db(ctx(), e))?;
            let outcome = match owner(&t, &key).map_err(|e| Error::db(ctx(), e))? {
                Some(other) if other != who => return Ok(PinOutcome::HeldBy(other)),
                Some(_) => PinOutcome::Refreshed,
                None => {
                    let mut held = 0;
                    for entry in t.iter().map_err(|e| Error::db(ctx(), e))? {
                        let (_, v) = entry.map_err(|e| Error::db(ctx(), e))?;
                        held += usize::from(v.value().1 == who);
                    }
                    if held >= max {
                        return Ok(PinOutcome::LimitReached(held));
                    }
                    PinOutcome::Created
                }
            };
            t.insert(key.as_slice(), (now_secs(), who.as_str()))
                .map_err(|e| Error::db(ctx(), e))?;
            outcome
        };
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(outcome)
    })
    .await
}

/// What [`unpin_owned`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnpinOutcome {
    Removed,
    NotPinned,
    /// Another owner holds the pin (named); nothing changed.
    HeldBy(String),
}

/// Who holds the pin keyed `key`, if anyone.
fn owner(
    t: &impl ReadableTable<&'static [u8], (u64, &'static str)>,
    key: &[u8],
) -> Result<Option<String>, redb::StorageError> {
    Ok(t.get(key)?.map(|v| v.value().1.to_owned()))
}

/// Removes the pin of `node` if `who` holds it.
pub async fn unpin_owned(
    dirs: &RedbDirectoryService,
    node: &pb::Node,
    who: &str,
) -> Result<UnpinOutcome, Error> {
    let key = node.encode_to_vec();
    let who: String = who.chars().take(MAX_WHO).collect();
    dirs.blocking(move |db, path| {
        let ctx = || format!("unpinning in {}", path.display());
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        let outcome = {
            let mut t = txn.open_table(PINS).map_err(|e| Error::db(ctx(), e))?;
            match owner(&t, &key).map_err(|e| Error::db(ctx(), e))? {
                None => return Ok(UnpinOutcome::NotPinned),
                Some(other) if other != who => return Ok(UnpinOutcome::HeldBy(other)),
                Some(_) => {
                    t.remove(key.as_slice()).map_err(|e| Error::db(ctx(), e))?;
                    UnpinOutcome::Removed
                }
            }
        };
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(outcome)
    })
    .await
}

/// Every pin.
pub async fn pins(dirs: &RedbDirectoryService) -> Result<Vec<Pin>, Error> {
    dirs.blocking(|db, path| {
        let ctx = || format!("listing pins in {}", path.display());
        let txn = db.begin_read().map_err(|e| Error::db(ctx(), e))?;
        let t = txn.open_table(PINS).map_err(|e| Error::db(ctx(), e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| Error::db(ctx(), e))? {
            let (k, v) = entry.map_err(|e| Error::db(ctx(), e))?;
            let node = pb::Node::decode(k.value()).map_err(|e| corrupt(ctx(), e))?;
            let (pinned_at, who) = v.value();
            out.push(Pin {
                node,
                pinned_at,
                who: who.to_owned(),
            });
        }
        Ok(out)
    })
    .await
}

/// Records a finished build's roots (inputs, outputs, log blob: directory or blob digests)
/// under `id`, finished now.
pub async fn record_build(
    dirs: &RedbDirectoryService,
    id: &str,
    roots: &[B3Digest],
) -> Result<(), Error> {
    let id = id.to_owned();
    let value: Vec<u8> = roots.iter().flat_map(|d| *d.as_bytes()).collect();
    dirs.blocking(move |db, path| {
        let ctx = || format!("recording build {id} in {}", path.display());
        let txn = db.begin_write().map_err(|e| Error::db(ctx(), e))?;
        {
            let mut t = txn.open_table(BUILDS).map_err(|e| Error::db(ctx(), e))?;
            t.insert(id.as_str(), (now_secs(), value.as_slice()))
                .map_err(|e| Error::db(ctx(), e))?;
        }
        txn.commit().map_err(|e| Error::db(ctx(), e))?;
        Ok(())
    })
    .await
}

/// The digests a build record's value holds.
pub(super) fn record_digests(raw: &[u8]) -> impl Iterator<Item = B3Digest> + '_ {
    raw.chunks_exact(32)
        .filter_map(|c| B3Digest::try_from(c).ok())
}

/// The root digest a pinned node keeps (a symlink keeps nothing beyond its pin).
pub(super) fn pin_digest(raw: &[u8]) -> Result<Option<B3Digest>, prost::DecodeError> {
    let node = pb::Node::decode(raw)?;
    let digest = match node.node {
        Some(pb::node::Node::Directory(d)) => d.digest,
        Some(pb::node::Node::File(f)) => f.digest,
        _ => return Ok(None),
    };
    Ok(B3Digest::try_from(&digest).ok())
}

pub(super) fn corrupt(context: String, e: impl std::fmt::Display) -> Error {
    Error::io(
        context,
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    )
}
