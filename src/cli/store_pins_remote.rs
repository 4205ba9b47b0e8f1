//! `store pin|unpin|pins --addr ...`: the same commands through a running serve's
//! `tvixbuildvm.store.v1.PinService`, as the tenant serve identifies the caller as (a unix
//! socket's uid, a client certificate).

use super::store_gc::{parse_node, print_pins};
use crate::castore::channel::channel_from_addr;
use crate::castore::package::PackageChannel;
use crate::proto::pins as pb;
use anyhow::Context;
use pb::pin_service_client::PinServiceClient;

fn client(addr: &str) -> anyhow::Result<PinServiceClient<PackageChannel>> {
    Ok(PinServiceClient::new(channel_from_addr(addr)?))
}

/// A refused call, with the server's message (which names what was wrong).
fn refused(addr: &str, what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what} through {addr}: {:?}: {}", s.code(), s.message())
}

pub async fn pin(addr: &str, node_json: &str) -> anyhow::Result<()> {
    let node = parse_node(node_json)?;
    let r = client(addr)?
        .pin(pb::PinRequest { node: Some(node) })
        .await
        .map_err(|s| refused(addr, "pinning", s))?;
    if !r.into_inner().created {
        eprintln!("already pinned (time updated)");
    }
    Ok(())
}

pub async fn unpin(addr: &str, node_json: &str) -> anyhow::Result<()> {
    let node = parse_node(node_json)?;
    client(addr)?
        .unpin(pb::UnpinRequest { node: Some(node) })
        .await
        .map_err(|s| refused(addr, "unpinning", s))?;
    Ok(())
}

pub async fn pins(addr: &str) -> anyhow::Result<()> {
    let r = client(addr)?
        .list(pb::ListPinsRequest {})
        .await
        .map_err(|s| refused(addr, "listing pins", s))?;
    let pins = r
        .into_inner()
        .pins
        .into_iter()
        .map(|p| (p.node.unwrap_or_default(), p.pinned_at, p.tenant));
    print_pins(pins).context("printing the pins")
}
