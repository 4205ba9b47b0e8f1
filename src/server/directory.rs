//! `tvix.castore.v1.DirectoryService` over any [`DirectoryService`]; the router also serves
//! it as `snix.castore.v1.DirectoryService` (wire-identical, see [`crate::castore::package`]).

use super::blob::tenant_of;
use super::quota::UploadQuota;
use crate::castore::directory::Directory;
use crate::castore::directory_service::closure::SameStream;
use crate::castore::{B3Digest, DirectoryService, Error};
use crate::proto::castore as pb;
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Serves a directory service over gRPC.
pub struct DirectoryServer {
    directories: Arc<dyn DirectoryService>,
    /// Charges every upload to its tenant; no quota without.
    quota: Option<Arc<UploadQuota>>,
}

impl DirectoryServer {
    pub fn new(directories: Arc<dyn DirectoryService>) -> Self {
        Self {
            directories,
            quota: None,
        }
    }

    /// Charges uploads to their tenants' quotas, refusing what would cross one.
    pub fn with_quota(mut self, quota: Option<Arc<UploadQuota>>) -> Self {
        self.quota = quota;
        self
    }
}

#[tonic::async_trait]
impl pb::directory_service_server::DirectoryService for DirectoryServer {
    type GetStream = BoxStream<'static, Result<pb::Directory, Status>>;

    async fn get(
        &self,
        request: Request<pb::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let req = request.into_inner();
        let Some(pb::get_directory_request::ByWhat::Digest(raw)) = req.by_what else {
            return Err(Status::invalid_argument("by_what: no digest given"));
        };
        let digest = B3Digest::try_from(&raw)
            .map_err(|e| Status::invalid_argument(format!("digest: {e}")))?;
        // Answer a missing root with NOT_FOUND as the call's status, not mid-stream.
        let Some(root) = self.directories.get(&digest).await? else {
            return Err(Status::not_found(format!("directory {digest} not found")));
        };
        if !req.recursive {
            let one = futures::stream::once(async move { Ok(root.to_proto()) });
            return Ok(Response::new(one.boxed()));
        }
        let stream = self
            .directories
            .get_recursive(&digest)
            .map(|r| r.map(|d| d.to_proto()).map_err(Status::from));
        Ok(Response::new(stream.boxed()))
    }

    async fn put(
        &self,
        request: Request<Streaming<pb::Directory>>,
    ) -> Result<Response<pb::PutDirectoryResponse>, Status> {
        let mut upload = self.quota.as_ref().map(|q| q.upload(tenant_of(&request)));
        let mut stream = request.into_inner();
        let mut putter = self.directories.put_multiple_start();
        let mut same_stream = SameStream::new();
        let mut size = 0u64;
        // An error or a cancelled stream returns early and drops the putter: nothing stored
        // (and the upload's charge is given back).
        while let Some(msg) = stream.message().await? {
            let bytes = msg.encode_to_vec();
            let n = bytes.len() as u64;
            if let Some(upload) = &mut upload {
                upload.charge(n)?;
            }
            size += n;
            let digest = B3Digest::of(&bytes);
            let dir = Directory::try_from(msg)
                .map_err(|source| Error::invalid_directory(digest, source))?;
            // The store would take a reference to a directory it holds; the protocol does not.
            same_stream.check(digest, &dir).map_err(Error::from)?;
            putter.put(dir).await?;
        }
        let root = putter.close().await?;
        if let Some(upload) = upload {
            upload.commit(size);
        }
        Ok(Response::new(pb::PutDirectoryResponse {
            root_digest: root.into(),
        }))
    }
}
