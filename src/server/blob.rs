//! `tvix.castore.v1.BlobService` over any [`BlobService`]; the router also serves it as
//! `snix.castore.v1.BlobService` (wire-identical, see [`crate::castore::package`]).

use super::quota::UploadQuota;
use super::tenant_name::Tenant;
use crate::castore::{B3Digest, BlobService, Error};
use crate::proto::castore as pb;
use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

/// Size of the BlobChunks this server sends (well under tonic's 4 MiB message limit).
pub const READ_CHUNK: usize = 256 * 1024;

/// Serves a blob service over gRPC.
pub struct BlobServer {
    blobs: Arc<dyn BlobService>,
    /// Charges every upload to its tenant; no quota without.
    quota: Option<Arc<UploadQuota>>,
}

impl BlobServer {
    pub fn new(blobs: Arc<dyn BlobService>) -> Self {
        Self { blobs, quota: None }
    }

    /// Charges uploads to their tenants' quotas, refusing what would cross one.
    pub fn with_quota(mut self, quota: Option<Arc<UploadQuota>>) -> Self {
        self.quota = quota;
        self
    }
}

/// The tenant the router's authentication left on `request` (anonymous without).
pub(super) fn tenant_of<T>(request: &Request<T>) -> Tenant {
    request
        .extensions()
        .get::<Tenant>()
        .cloned()
        .unwrap_or_default()
}

fn parse_digest(raw: &[u8]) -> Result<B3Digest, Status> {
    B3Digest::try_from(raw).map_err(|e| Status::invalid_argument(format!("digest: {e}")))
}

#[tonic::async_trait]
impl pb::blob_service_server::BlobService for BlobServer {
    async fn stat(
        &self,
        request: Request<pb::StatBlobRequest>,
    ) -> Result<Response<pb::StatBlobResponse>, Status> {
        let digest = parse_digest(&request.into_inner().digest)?;
        if !self.blobs.has(&digest).await? {
            return Err(Status::not_found(format!("blob {digest} not found")));
        }
        // Blobs are not split into chunks here, so the chunk list is empty (as in tvix's
        // unchunked backends); no bao either.
        Ok(Response::new(pb::StatBlobResponse::default()))
    }

    type ReadStream = BoxStream<'static, Result<pb::BlobChunk, Status>>;

    async fn read(
        &self,
        request: Request<pb::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let digest = parse_digest(&request.into_inner().digest)?;
        let Some(reader) = self.blobs.open_read(&digest).await? else {
            return Err(Status::not_found(format!("blob {digest} not found")));
        };
        let stream =
            tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK).map(move |r| match r {
                Ok(data) => Ok(pb::BlobChunk { data }),
                Err(e) => Err(Status::from(Error::io(format!("reading blob {digest}"), e))),
            });
        Ok(Response::new(stream.boxed()))
    }

    async fn put(
        &self,
        request: Request<Streaming<pb::BlobChunk>>,
    ) -> Result<Response<pb::PutBlobResponse>, Status> {
        let mut upload = self.quota.as_ref().map(|q| q.upload(tenant_of(&request)));
        let mut stream = request.into_inner();
        let mut writer = self.blobs.open_write().await?;
        let mut size = 0u64;
        // An error or a cancelled stream returns early and drops the writer: nothing stored
        // (and the upload's charge is given back).
        while let Some(chunk) = stream.message().await? {
            let n = chunk.data.len() as u64;
            if let Some(upload) = &mut upload {
                upload.charge(n)?;
            }
            size += n;
            writer
                .write_all(&chunk.data)
                .await
                .map_err(|e| Status::from(Error::io("writing blob", e)))?;
        }
        let digest = writer.close().await?;
        if let Some(upload) = upload {
            upload.commit(size);
        }
        Ok(Response::new(pb::PutBlobResponse {
            digest: digest.into(),
        }))
    }
}
