//! A client of a remote `tvix.castore.v1.DirectoryService` or
//! `snix.castore.v1.DirectoryService` (the same messages; [`PackageChannel`] picks the path).
//!
//! Everything received is validated: each directory must be valid, a plain `get` must return
//! the directory asked for, and a recursive fetch may only contain directories referenced by
//! one received before, each once, with nothing missing at the end.
//!
//! What is sent keeps the protocol's Put contract ([`SameStream`]): an upload may only refer
//! to directories sent before in it. So, unlike the stored backends, this one refuses a
//! `put` of a directory with subdirectories, and a closure upload that leans on directories
//! the server already holds; send the whole closure through `put_multiple_start` instead.

use super::closure::{GetValidator, SameStream};
use super::{put_single, DirectoryPutter, DirectoryService};
use crate::castore::directory::Directory;
use crate::castore::error::ClosureError;
use crate::castore::package::{remote_error, Package, PackageChannel};
use crate::castore::{B3Digest, Error};
use crate::proto::castore as pb;
use futures::stream::BoxStream;
use pb::directory_service_client::DirectoryServiceClient;
use tokio::sync::mpsc;

/// A remote directory service.
#[derive(Clone)]
pub struct GrpcDirectoryService {
    client: DirectoryServiceClient<PackageChannel>,
    package: Package,
}

impl GrpcDirectoryService {
    /// A client of the package `channel` speaks (a plain tonic `Channel`: tvix's).
    pub fn new(channel: impl Into<PackageChannel>) -> Self {
        let channel = channel.into();
        Self {
            package: channel.package(),
            client: DirectoryServiceClient::new(channel),
        }
    }
}

fn request(digest: &B3Digest, recursive: bool) -> pb::GetDirectoryRequest {
    pb::GetDirectoryRequest {
        by_what: Some(pb::get_directory_request::ByWhat::Digest((*digest).into())),
        recursive,
    }
}

fn validate(d: pb::Directory) -> Result<Directory, Error> {
    use prost::Message;
    let digest = B3Digest::of(&d.encode_to_vec());
    Directory::try_from(d).map_err(|source| Error::invalid_directory(digest, source))
}

#[async_trait::async_trait]
impl DirectoryService for GrpcDirectoryService {
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        let ctx = || format!("getting directory {digest}");
        let mut stream = match self.client.clone().get(request(digest, false)).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(remote_error(self.package, ctx(), s)),
        };
        let first = match stream.message().await {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(None),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(remote_error(self.package, ctx(), s)),
        };
        let dir = validate(first)?;
        if dir.digest() != *digest {
            return Err(Error::Protocol(format!(
                "asked for directory {digest}, got {}",
                dir.digest()
            )));
        }
        match stream.message().await {
            Ok(None) => Ok(Some(dir)),
            Ok(Some(_)) => Err(Error::Protocol(format!(
                "non-recursive get of {digest} returned more than one directory"
            ))),
            Err(s) => Err(remote_error(self.package, ctx(), s)),
        }
    }

    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        put_single(self, directory).await
    }

    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'static, Result<Directory, Error>> {
        let mut client = self.client.clone();
        let package = self.package;
        let root = *root;
        Box::pin(async_stream::try_stream! {
            let ctx = || format!("getting the closure of directory {root}");
            let mut stream = match client.get(request(&root, true)).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    Err(Error::DirectoryNotFound(root))?;
                    return;
                }
                Err(s) => {
                    Err(remote_error(package, ctx(), s))?;
                    return;
                }
            };
            let mut validator = GetValidator::new(root);
            loop {
                let next = match stream.message().await {
                    Ok(n) => n,
                    Err(s) if s.code() == tonic::Code::NotFound => Err(Error::DirectoryNotFound(root))?,
                    Err(s) => Err(remote_error(package, ctx(), s))?,
                };
                let Some(d) = next else { break };
                let dir = validate(d)?;
                validator.accept(&dir)?;
                yield dir;
            }
            validator.finish()?;
        })
    }

    fn put_multiple_start(&self) -> Box<dyn DirectoryPutter> {
        Box::new(GrpcPutter {
            client: self.client.clone(),
            package: self.package,
            call: None,
            closed: false,
            same_stream: SameStream::new(),
            refused: None,
        })
    }
}

enum Msg {
    Dir(pb::Directory),
    Done,
}

type PutCall = (
    mpsc::Sender<Msg>,
    tokio::task::JoinHandle<Result<pb::PutDirectoryResponse, tonic::Status>>,
);

/// Streams the closure to the server as it is put; the server validates it and stores
/// nothing unless the stream ends cleanly, which only `close` makes it do.
struct GrpcPutter {
    client: DirectoryServiceClient<PackageChannel>,
    package: Package,
    call: Option<PutCall>,
    closed: bool,
    same_stream: SameStream,
    /// Why a `put` was refused; every later call answers the same.
    refused: Option<ClosureError>,
}

impl Drop for GrpcPutter {
    fn drop(&mut self) {
        if let Some((_, task)) = self.call.take() {
            task.abort();
        }
    }
}

impl GrpcPutter {
    /// Waits for the call's result.
    async fn finish_call(&mut self) -> Result<pb::PutDirectoryResponse, Error> {
        let Some((_, task)) = self.call.take() else {
            return Err(Error::InvalidClosure(ClosureError::Empty));
        };
        task.await
            .map_err(|e| Error::io("directory upload task failed", std::io::Error::other(e)))?
            .map_err(|s| remote_error(self.package, "uploading directories".into(), s))
    }
}

#[async_trait::async_trait]
impl DirectoryPutter for GrpcPutter {
    async fn put(&mut self, directory: Directory) -> Result<(), Error> {
        if self.closed {
            return Err(Error::InvalidRequest("put after close".into()));
        }
        if let Some(e) = &self.refused {
            return Err(e.clone().into());
        }
        // Refused before it is sent (the server would refuse the stream anyway), and the
        // call is cancelled, so a later `close` cannot store what came before.
        if let Err(e) = self.same_stream.check(directory.digest(), &directory) {
            if let Some((_, task)) = self.call.take() {
                task.abort();
            }
            self.refused = Some(e.clone());
            return Err(e.into());
        }
        if self.call.is_none() {
            let (tx, mut rx) = mpsc::channel::<Msg>(16);
            let body = async_stream::stream! {
                while let Some(m) = rx.recv().await {
                    match m {
                        Msg::Dir(d) => yield d,
                        Msg::Done => return,
                    }
                }
                // Dropped without close: never end cleanly (that could store a partial
                // closure); the task is aborted and the call cancelled instead.
                futures::future::pending::<()>().await;
            };
            let mut client = self.client.clone();
            let task = tokio::spawn(async move { client.put(body).await.map(|r| r.into_inner()) });
            self.call = Some((tx, task));
        }
        let sent = match &self.call {
            Some((tx, _)) => tx.send(Msg::Dir(directory.to_proto())).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The call ended early; its result says why.
        match self.finish_call().await {
            Err(e) => Err(e),
            Ok(_) => Err(Error::Protocol(
                "the Put call ended before the closure was sent".into(),
            )),
        }
    }

    async fn close(&mut self) -> Result<B3Digest, Error> {
        if std::mem::replace(&mut self.closed, true) {
            return Err(Error::InvalidRequest("closed twice".into()));
        }
        if let Some(e) = &self.refused {
            return Err(e.clone().into());
        }
        if let Some((tx, _)) = &self.call {
            // If the call already ended, this fails and the call's result says why.
            let _ = tx.send(Msg::Done).await;
        }
        let resp = self.finish_call().await?;
        B3Digest::try_from(&resp.root_digest)
            .map_err(|e| Error::Protocol(format!("Put returned an invalid root digest: {e}")))
    }
}
