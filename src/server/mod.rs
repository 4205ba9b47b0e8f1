//! The gRPC server: castore Blob and Directory services, `grpc.health.v1` and reflection,
//! on a TCP or unix socket, until a shutdown future completes.
//!
//! [`router`] builds the service set; more services (the build service) can be added to
//! the returned [`CastoreRouter`] before handing it to [`serve`].

pub mod blob;
pub mod directory;

use crate::castore::{BlobService, DirectoryService};
use crate::proto::castore as pb;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};
use tower::util::MapRequestLayer;

pub use blob::BlobServer;
pub use directory::DirectoryServer;

/// Errors of setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listen address {0:?}: expected host:port or unix:/abs/path")]
    BadListenAddr(String),
    #[error("building the reflection service")]
    Reflection(#[source] tonic_reflection::server::Error),
    #[error("listening on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unix socket {0} is in use by a running server")]
    SocketInUse(PathBuf),
    #[error("serving gRPC")]
    Serve(#[source] tonic::transport::Error),
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `host:port`, e.g. `[::]:8000` or `127.0.0.1:0`.
    Tcp(SocketAddr),
    /// `unix:/abs/path.sock`.
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = ServerError;
    fn from_str(s: &str) -> Result<Self, ServerError> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(ServerError::BadListenAddr(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| ServerError::BadListenAddr(s.to_owned()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A request body error that tonic cannot recognise.
#[derive(Debug, thiserror::Error)]
#[error("request stream broke off: {0}")]
struct RequestStreamBroken(String);

type Req = http::Request<tonic::body::Body>;

/// tonic treats a client-streaming request whose HTTP/2 stream was reset with CANCEL (a
/// client that dropped the call mid-upload) as a clean end of stream, so a handler would
/// store a truncated blob or closure. Wrapping body errors in a type tonic does not look
/// into keeps them errors. The message keeps the original text.
fn strict_request_end(req: Req) -> Req {
    req.map(|body| {
        tonic::body::Body::new(http_body_util::BodyExt::map_err(body, |e| {
            RequestStreamBroken(e.to_string())
        }))
    })
}

/// The layer every server here runs requests through (see [`strict_request_end`]).
pub type StrictLayer = Stack<MapRequestLayer<fn(Req) -> Req>, Identity>;

/// The service set built by [`router`]; add more services with `add_service`.
pub type CastoreRouter = Router<StrictLayer>;

/// Blob and Directory services, plus health (all serving) and reflection.
pub async fn router(
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
) -> Result<CastoreRouter, ServerError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::blob_service_server::BlobServiceServer<BlobServer>>()
        .await;
    health_reporter
        .set_serving::<pb::directory_service_server::DirectoryServiceServer<DirectoryServer>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServerError::Reflection)?;
    Ok(Server::builder()
        .layer(MapRequestLayer::new(strict_request_end as fn(Req) -> Req))
        .add_service(health)
        .add_service(reflection)
        .add_service(pb::blob_service_server::BlobServiceServer::new(
            BlobServer::new(blobs),
        ))
        .add_service(pb::directory_service_server::DirectoryServiceServer::new(
            DirectoryServer::new(directories),
        )))
}

/// A bound listener, so callers can learn the port (`127.0.0.1:0`) before serving.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A unix socket path left behind by a dead server is replaced; one that a
    /// live server answers on is refused.
    pub async fn bind(addr: &ListenAddr) -> Result<Self, ServerError> {
        let listen_err = |source| ServerError::Listen {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(a) => Ok(Listener::Tcp(
                tokio::net::TcpListener::bind(a).await.map_err(listen_err)?,
            )),
            ListenAddr::Unix(path) => {
                if tokio::fs::symlink_metadata(path).await.is_ok() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(ServerError::SocketInUse(path.clone()));
                    }
                    tokio::fs::remove_file(path).await.map_err(listen_err)?;
                }
                let l = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
                Ok(Listener::Unix(l, path.clone()))
            }
        }
    }

    /// The bound TCP address, if this is a TCP listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes running calls.
pub async fn serve(
    router: CastoreRouter,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    match listener {
        Listener::Tcp(l) => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(ServerError::Serve)
        }
        Listener::Unix(l, path) => {
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
            let r = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(ServerError::Serve);
            // Best effort: a leftover socket is replaced on the next bind anyway.
            let _ = tokio::fs::remove_file(&path).await;
            r
        }
    }
}

/// Binds `addr` and serves the castore services until `shutdown` completes.
pub async fn serve_castore(
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
    addr: &ListenAddr,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let router = router(blobs, directories).await?;
    let listener = Listener::bind(addr).await?;
    serve(router, listener, shutdown).await
}
