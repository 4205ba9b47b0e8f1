//! The gRPC server: castore Blob and Directory services (as `tvix.castore.v1` and
//! `snix.castore.v1`), `grpc.health.v1` and reflection, on a TCP or unix socket, until a
//! shutdown future completes.
//!
//! [`router`] builds the castore service set; [`router_with`] adds the build services
//! (see [`build_service`]), TLS and message size limits. [`serve`] runs a router on a
//! [`Listener`] until a shutdown future completes.

pub mod admission;
pub mod blob;
pub mod build_host;
pub mod build_service;
pub mod config;
pub mod directory;
pub mod gc_task;
pub mod log_store;
pub mod metrics_http;
pub mod peer;
pub mod pins;
pub mod quota;
pub mod run;
pub mod status;
pub mod tenant;
pub mod tenant_name;
pub mod tls;

use crate::castore::{BlobService, DirectoryService};
use crate::proto::castore as pb;
use build_host::BuildHost;
use build_service::{BuildVmService, SeedBuildService, SnixBuildService, Tvix2024BuildService};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use tonic::transport::server::Router;
use tonic::transport::{Server, ServerTlsConfig};
use tower::layer::util::{Identity, Stack};
use tower::util::MapRequestLayer;

pub use blob::BlobServer;
pub use directory::DirectoryServer;

/// `snix.castore.v1.BlobService`: the tvix one under its snix name.
type SnixBlobServer = crate::castore::package::SnixAlias<
    pb::blob_service_server::BlobServiceServer<BlobServer>,
    crate::castore::package::SnixBlobService,
>;
/// `snix.castore.v1.DirectoryService`: the tvix one under its snix name.
type SnixDirectoryServer = crate::castore::package::SnixAlias<
    pb::directory_service_server::DirectoryServiceServer<DirectoryServer>,
    crate::castore::package::SnixDirectoryService,
>;

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
    #[error("setting up TLS")]
    Tls(#[source] tonic::transport::Error),
    #[error("merging the file descriptors for reflection")]
    Descriptors(#[source] prost::DecodeError),
}

/// Which wire layout `tvix.build.v1.BuildService/DoBuild` speaks (`snix.build.v1` is served
/// beside either).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The original layout (this project's primary contract), plus the streaming
    /// `tvix.build.vm.v1.BuildVmService`.
    #[default]
    Seed,
    /// The layout tvix clients of 2024 send (anonymous output nodes, refscan needles).
    #[value(name = "tvix-2024")]
    #[serde(rename = "tvix-2024")]
    Tvix2024,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Seed => "seed",
            Protocol::Tvix2024 => "tvix-2024",
        })
    }
}

/// Transport options and the optional build services of a router.
#[derive(Default)]
pub struct RouterOptions {
    /// TLS (and, with a client CA, mutual TLS); plaintext without.
    pub tls: Option<ServerTlsConfig>,
    /// Largest message decoded or encoded by any service (tonic's default otherwise: 4 MiB).
    pub max_message_bytes: Option<usize>,
    /// The build services and the layout of `DoBuild`; castore only without.
    pub builds: Option<(Protocol, Arc<BuildHost>)>,
    /// Who may call, and as which tenant; without, callers are known by their transport
    /// and nobody is refused (a bearer token still is: no token is known).
    pub auth: Option<Arc<tenant::Authenticator>>,
    /// Charges castore uploads to their tenants; no quota without.
    pub quota: Option<Arc<quota::UploadQuota>>,
    /// The embedded store the pin service works on; without, it answers FAILED_PRECONDITION.
    pub pins: Option<pins::PinStore>,
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

/// Notes the RPC path for [`tenant::AuthLayer`], which does not see the URI.
fn note_rpc_path(mut req: Req) -> Req {
    let path = tenant::RpcPath(req.uri().path().to_owned());
    req.extensions_mut().insert(path);
    req
}

/// The layers every server here runs requests through (see [`strict_request_end`], then
/// the tenant of the request: [`tenant::AuthLayer`]).
pub type StrictLayer = Stack<
    tonic::service::InterceptorLayer<tenant::AuthLayer>,
    Stack<MapRequestLayer<fn(Req) -> Req>, Stack<MapRequestLayer<fn(Req) -> Req>, Identity>>,
>;

/// The service set built by [`router`]; add more services with `add_service`.
pub type CastoreRouter = Router<StrictLayer>;

/// Blob and Directory services, plus health (all serving) and reflection.
pub async fn router(
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
) -> Result<CastoreRouter, ServerError> {
    router_with(RouterOptions::default(), blobs, directories).await
}

/// Applies the message size limit to a generated service.
macro_rules! limited {
    ($svc:expr, $limit:expr) => {{
        let svc = $svc;
        match $limit {
            Some(n) => svc
                .max_decoding_message_size(n)
                .max_encoding_message_size(n),
            None => svc,
        }
    }};
}

/// The descriptors reflection serves: the 2024 layout replaces the seed layout's build
/// protos (and the streaming service, which uses them); the two cannot coexist in one pool.
fn descriptors(protocol: Option<Protocol>) -> Result<prost_types::FileDescriptorSet, ServerError> {
    use prost::Message;
    let mut main = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .map_err(ServerError::Descriptors)?;
    // Reflection lists only what is served: no build protos for a castore-only server.
    main.file.retain(|f| {
        protocol.is_some()
            || !(f.package().starts_with("tvix.build.") || f.package().starts_with("snix.build."))
    });
    if protocol != Some(Protocol::Tvix2024) {
        return Ok(main);
    }
    let layout =
        prost_types::FileDescriptorSet::decode(crate::proto::build_2024::FILE_DESCRIPTOR_SET)
            .map_err(ServerError::Descriptors)?;
    let mut file: Vec<_> = main
        .file
        .into_iter()
        .filter(|f| !f.package().starts_with("tvix.build."))
        .collect();
    for f in layout.file {
        if !file.iter().any(|have| have.name() == f.name()) {
            file.push(f);
        }
    }
    Ok(prost_types::FileDescriptorSet { file })
}

/// The castore services, health and reflection, and, when asked, the build services.
pub async fn router_with(
    options: RouterOptions,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
) -> Result<CastoreRouter, ServerError> {
    let limit = options.max_message_bytes;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::blob_service_server::BlobServiceServer<BlobServer>>()
        .await;
    health_reporter
        .set_serving::<pb::directory_service_server::DirectoryServiceServer<DirectoryServer>>()
        .await;
    health_reporter.set_serving::<SnixBlobServer>().await;
    health_reporter.set_serving::<SnixDirectoryServer>().await;
    health_reporter
        .set_serving::<crate::proto::pins::pin_service_server::PinServiceServer<pins::PinServer>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_file_descriptor_set(descriptors(options.builds.as_ref().map(|(p, _)| *p))?)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(ServerError::Reflection)?;
    let mut server = Server::builder();
    if let Some(tls) = options.tls {
        server = server.tls_config(tls).map_err(ServerError::Tls)?;
    }
    // One server per service answers both packages (wire-identical): the same stores.
    let blob_server = limited!(
        pb::blob_service_server::BlobServiceServer::new(
            BlobServer::new(blobs).with_quota(options.quota.clone())
        ),
        limit
    );
    let directory_server = limited!(
        pb::directory_service_server::DirectoryServiceServer::new(
            DirectoryServer::new(directories).with_quota(options.quota.clone())
        ),
        limit
    );
    let mut router = server
        .layer(MapRequestLayer::new(strict_request_end as fn(Req) -> Req))
        .layer(MapRequestLayer::new(note_rpc_path as fn(Req) -> Req))
        .layer(tonic::service::InterceptorLayer::new(tenant::AuthLayer(
            options.auth.unwrap_or_default(),
        )))
        .add_service(health)
        .add_service(reflection)
        .add_service(SnixBlobServer::new(blob_server.clone()))
        .add_service(blob_server)
        .add_service(SnixDirectoryServer::new(directory_server.clone()))
        .add_service(directory_server)
        .add_service(limited!(
            crate::proto::pins::pin_service_server::PinServiceServer::new(pins::PinServer::new(
                options.pins
            )),
            limit
        ));
    // snix.build.v1 has its own package, so it is served beside either tvix layout.
    if let Some((_, host)) = &options.builds {
        use crate::proto::snix_build::build_service_server::BuildServiceServer;
        health_reporter
            .set_serving::<BuildServiceServer<SnixBuildService>>()
            .await;
        router = router.add_service(limited!(
            BuildServiceServer::new(SnixBuildService::new(Arc::clone(host))),
            limit
        ));
    }
    match options.builds {
        None => {}
        Some((Protocol::Seed, host)) => {
            use crate::proto::build::build_service_server::BuildServiceServer;
            use crate::proto::build_vm::build_vm_service_server::BuildVmServiceServer;
            health_reporter
                .set_serving::<BuildServiceServer<SeedBuildService>>()
                .await;
            health_reporter
                .set_serving::<BuildVmServiceServer<BuildVmService>>()
                .await;
            router = router
                .add_service(limited!(
                    BuildServiceServer::new(SeedBuildService::new(Arc::clone(&host))),
                    limit
                ))
                .add_service(limited!(
                    BuildVmServiceServer::new(BuildVmService::new(host)),
                    limit
                ));
        }
        Some((Protocol::Tvix2024, host)) => {
            use crate::proto::build_2024::build_service_server::BuildServiceServer;
            health_reporter
                .set_serving::<BuildServiceServer<Tvix2024BuildService>>()
                .await;
            router = router.add_service(limited!(
                BuildServiceServer::new(Tvix2024BuildService::new(host)),
                limit
            ));
        }
    }
    Ok(router)
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
