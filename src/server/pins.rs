//! `tvixbuildvm.store.v1.PinService`: pins on serve's embedded store, made by tenants.
//!
//! Each pin belongs to the tenant that made it ([`super::tenant::AuthLayer`] names it):
//! only that tenant lists or removes it (PERMISSION_DENIED for others), and a node another tenant pinned is refused
//! (ALREADY_EXISTS: it is kept anyway). A tenant holds at most its `max-pins`. A pin is made
//! only when the node's whole closure is stored, checked under an in-use hold so that a GC
//! running meanwhile keeps what was found (see [`crate::castore::gc::presence`]). Without an
//! embedded store every call answers FAILED_PRECONDITION: there is no GC here to pin against.

use super::admission::Shares;
use super::blob::tenant_of;
use super::tenant::Tenant;
use crate::castore::blob::LocalBlobService;
use crate::castore::directory::ValidationError;
use crate::castore::directory_service::redb::RedbDirectoryService;
use crate::castore::gc::presence::{self, Incomplete};
use crate::castore::gc::{in_use, records};
use crate::castore::{Error, Node};
use crate::proto::castore as cpb;
use crate::proto::pins as pb;
use tonic::{Request, Response, Status};

/// The embedded store pins are kept in, and the tenants' limits.
#[derive(Clone)]
pub struct PinStore {
    pub blobs: LocalBlobService,
    pub dirs: RedbDirectoryService,
    pub shares: Shares,
}

/// Why a pin call was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "pins apply to serve's embedded store only; this serve uses a remote castore, \
         which collects its own garbage"
    )]
    NotEmbedded,
    #[error("the request has no node")]
    NoNode,
    #[error("invalid node")]
    BadNode(#[source] ValidationError),
    #[error("cannot pin: {0}")]
    Incomplete(Incomplete),
    #[error("the node is pinned by tenant {0:?}, not by you")]
    HeldBy(String),
    #[error("tenant {tenant} holds {held} pins, its limit ({key})")]
    Limit {
        tenant: String,
        held: usize,
        key: String,
    },
    #[error("the node is not pinned")]
    NotPinned,
    #[error("the pin belongs to tenant {0:?}: only it may unpin")]
    NotYours(String),
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<PinError> for Status {
    fn from(e: PinError) -> Self {
        let msg = crate::castore::error::error_chain(&e);
        match e {
            PinError::NotEmbedded => Status::failed_precondition(msg),
            PinError::NoNode | PinError::BadNode(_) => Status::invalid_argument(msg),
            PinError::Incomplete(Incomplete::TooLarge(_)) => Status::invalid_argument(msg),
            PinError::Incomplete(_) | PinError::NotPinned => Status::not_found(msg),
            PinError::HeldBy(_) => Status::already_exists(msg),
            PinError::NotYours(_) => Status::permission_denied(msg),
            PinError::Limit { .. } => Status::resource_exhausted(msg),
            PinError::Store(e) => e.into(),
        }
    }
}

/// Serves pins; `None`: not the embedded store.
pub struct PinServer {
    store: Option<PinStore>,
}

impl PinServer {
    pub fn new(store: Option<PinStore>) -> Self {
        Self { store }
    }

    fn store(&self) -> Result<&PinStore, PinError> {
        self.store.as_ref().ok_or(PinError::NotEmbedded)
    }
}

/// The request's node, validated like every node from outside.
fn node_of(node: Option<cpb::Node>) -> Result<(cpb::Node, Node), PinError> {
    let node = node.ok_or(PinError::NoNode)?;
    let (_, parsed) = Node::from_proto(node.clone()).map_err(PinError::BadNode)?;
    Ok((node, parsed))
}

impl PinServer {
    async fn pin(&self, tenant: &Tenant, node: Option<cpb::Node>) -> Result<bool, PinError> {
        let store = self.store()?;
        let (raw, node) = node_of(node)?;
        let max = store.shares.limits(tenant).max_pins;
        // Held until the pin is committed: a GC meanwhile keeps what the check finds.
        let _hold = in_use::hold(node.digest().copied());
        if let Err(missing) = presence::check(&store.blobs, &store.dirs, &node).await? {
            return Err(PinError::Incomplete(missing));
        }
        match records::pin_owned(&store.dirs, &raw, tenant.as_str(), max).await? {
            records::PinOutcome::Created => Ok(true),
            records::PinOutcome::Refreshed => Ok(false),
            records::PinOutcome::HeldBy(other) => Err(PinError::HeldBy(other)),
            records::PinOutcome::LimitReached(held) => Err(PinError::Limit {
                key: store.shares.key(tenant, "max-pins"),
                tenant: tenant.to_string(),
                held,
            }),
        }
    }

    async fn unpin(&self, tenant: &str, node: Option<cpb::Node>) -> Result<(), PinError> {
        let store = self.store()?;
        let (raw, _) = node_of(node)?;
        match records::unpin_owned(&store.dirs, &raw, tenant).await? {
            records::UnpinOutcome::Removed => Ok(()),
            records::UnpinOutcome::NotPinned => Err(PinError::NotPinned),
            records::UnpinOutcome::HeldBy(other) => Err(PinError::NotYours(other)),
        }
    }

    async fn list(&self, tenant: &str) -> Result<Vec<pb::Pin>, PinError> {
        let store = self.store()?;
        // Only the caller's own: at most its max-pins.
        Ok(records::pins(&store.dirs)
            .await?
            .into_iter()
            .filter(|p| p.who == tenant)
            .map(|p| pb::Pin {
                node: Some(p.node),
                tenant: p.who,
                pinned_at: p.pinned_at,
            })
            .collect())
    }
}

#[tonic::async_trait]
impl pb::pin_service_server::PinService for PinServer {
    async fn pin(
        &self,
        request: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinResponse>, Status> {
        let tenant = tenant_of(&request);
        let created = PinServer::pin(self, &tenant, request.into_inner().node).await?;
        Ok(Response::new(pb::PinResponse { created }))
    }

    async fn unpin(
        &self,
        request: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinResponse>, Status> {
        let tenant = tenant_of(&request);
        PinServer::unpin(self, tenant.as_str(), request.into_inner().node).await?;
        Ok(Response::new(pb::UnpinResponse {}))
    }

    async fn list(
        &self,
        request: Request<pb::ListPinsRequest>,
    ) -> Result<Response<pb::ListPinsResponse>, Status> {
        let tenant = tenant_of(&request);
        let pins = PinServer::list(self, tenant.as_str()).await?;
        Ok(Response::new(pb::ListPinsResponse { pins }))
    }
}
