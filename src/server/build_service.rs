//! The build RPCs over a [`BuildHost`]: `tvix.build.v1.BuildService/DoBuild` in the seed
//! layout or (with `--protocol tvix-2024`) the 2024 tvix layout, and this project's
//! streaming `tvix.build.vm.v1.BuildVmService/Build` (seed layout) and `/BuildPaths` (the
//! 2024 request shape), which send the live log and then the result. All share one
//! implementation; see [`super::status`] for
//! the status codes.

use super::build_host::{BuildHost, Event};
use super::peer::Peer;
use super::status::BuildError;
use crate::agent::LogStream;
use crate::proto::{build as pb, build_2024 as pb2024, build_vm as pbvm};
use crate::provenance::attest::Origin;
use crate::wire::{paths, seed, tvix2024};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Log chunks buffered for a streaming client before the build waits for it.
const LIVE_LOG_BUFFER: usize = 64;

/// `DoBuild` in the seed layout.
pub struct SeedBuildService {
    host: Arc<BuildHost>,
}

impl SeedBuildService {
    pub fn new(host: Arc<BuildHost>) -> Self {
        Self { host }
    }
}

fn validated<T>(
    host: &BuildHost,
    r: Result<T, crate::request::ValidationError>,
) -> Result<T, Status> {
    r.map_err(|e| {
        let e = BuildError::Invalid(e);
        host.refused(&e);
        Status::from(e)
    })
}

#[tonic::async_trait]
impl pb::build_service_server::BuildService for SeedBuildService {
    async fn do_build(
        &self,
        request: Request<pb::BuildRequest>,
    ) -> Result<Response<pb::Build>, Status> {
        let peer = Peer::of(&request);
        let wire = request.into_inner();
        let req = validated(&self.host, seed::decode(wire.clone()))?;
        let origin = self.host.origin(seed::DIALECT, &wire);
        let finished = self.host.start(req, origin, &peer, None).finish().await?;
        Ok(with_provenance(
            Response::new(seed::encode(wire, &finished)),
            &finished,
        ))
    }
}

/// The response metadata key holding the signed provenance's castore digest (hex).
pub const PROVENANCE_METADATA: &str = "tvix-build-vm-provenance";

/// A unary reply with its build's provenance digest in the metadata, where there is one.
fn with_provenance<T>(mut response: Response<T>, f: &crate::wire::Finished) -> Response<T> {
    if let Some(p) = &f.provenance {
        // Lowercase hex is always a valid ASCII metadata value.
        if let Ok(value) = p.digest.to_hex().parse() {
            response.metadata_mut().insert(PROVENANCE_METADATA, value);
        }
    }
    response
}

/// `DoBuild` in the 2024 tvix layout.
pub struct Tvix2024BuildService {
    host: Arc<BuildHost>,
}

impl Tvix2024BuildService {
    pub fn new(host: Arc<BuildHost>) -> Self {
        Self { host }
    }
}

#[tonic::async_trait]
impl pb2024::build_service_server::BuildService for Tvix2024BuildService {
    async fn do_build(
        &self,
        request: Request<pb2024::BuildRequest>,
    ) -> Result<Response<pb2024::Build>, Status> {
        let peer = Peer::of(&request);
        let wire = request.into_inner();
        let req = validated(&self.host, tvix2024::decode(wire.clone()))?;
        let origin = self.host.origin(tvix2024::DIALECT, &wire);
        let finished = self.host.start(req, origin, &peer, None).finish().await?;
        Ok(with_provenance(
            Response::new(tvix2024::encode(wire, &finished)),
            &finished,
        ))
    }
}

/// The streaming build service.
pub struct BuildVmService {
    host: Arc<BuildHost>,
}

impl BuildVmService {
    pub fn new(host: Arc<BuildHost>) -> Self {
        Self { host }
    }
}

type EventStream<E> = Pin<Box<dyn Stream<Item = Result<E, Status>> + Send>>;

/// The live events of a started build as one dialect's stream: `event` wraps each
/// Started/LogChunk, `last` encodes the finished build as the final event.
fn live_stream<E: Send + 'static>(
    host: &Arc<BuildHost>,
    req: crate::request::BuildRequest,
    origin: Option<Origin>,
    peer: &Peer,
    event: fn(Live) -> E,
    last: impl FnOnce(&crate::wire::Finished) -> E + Send + 'static,
) -> EventStream<E> {
    let (tx, mut rx) = mpsc::channel(LIVE_LOG_BUFFER);
    // The handle moves into the stream: when the client goes away, tonic drops the
    // stream, the handle with it, and the build's VM is killed.
    let handle = host.start(req, origin, peer, Some(tx));
    Box::pin(async_stream::stream! {
        while let Some(e) = rx.recv().await {
            yield Ok(event(match e {
                Event::Started { id, queued } => Live::Started(pbvm::Started {
                    build_id: id,
                    queued_us: crate::wire::micros(queued),
                }),
                Event::Log(chunk) => Live::Log(pbvm::LogChunk {
                    stream: match chunk.stream {
                        LogStream::Stdout => pbvm::Stream::Stdout,
                        LogStream::Stderr => pbvm::Stream::Stderr,
                    } as i32,
                    data: chunk.data,
                }),
            }));
        }
        // The channel closes when the build is over.
        match handle.finish().await {
            Ok(finished) => yield Ok(last(&finished)),
            Err(e) => yield Err(Status::from(e)),
        }
    })
}

/// A live event before the result, common to both streaming RPCs.
enum Live {
    Started(pbvm::Started),
    Log(pbvm::LogChunk),
}

#[tonic::async_trait]
impl pbvm::build_vm_service_server::BuildVmService for BuildVmService {
    type BuildStream = EventStream<pbvm::BuildEvent>;
    type BuildPathsStream = EventStream<pbvm::PathsBuildEvent>;

    async fn build(
        &self,
        request: Request<pb::BuildRequest>,
    ) -> Result<Response<Self::BuildStream>, Status> {
        use pbvm::build_event::Event as E;
        let peer = Peer::of(&request);
        let wire = request.into_inner();
        let req = validated(&self.host, seed::decode(wire.clone()))?;
        let origin = self.host.origin(seed::DIALECT, &wire);
        let event = |e| pbvm::BuildEvent {
            event: Some(match e {
                Live::Started(s) => E::Started(s),
                Live::Log(l) => E::Log(l),
            }),
        };
        let last = move |f: &crate::wire::Finished| pbvm::BuildEvent {
            event: Some(E::Build(seed::encode(wire, f))),
        };
        Ok(Response::new(live_stream(
            &self.host, req, origin, &peer, event, last,
        )))
    }

    async fn build_paths(
        &self,
        request: Request<pbvm::PathsBuildRequest>,
    ) -> Result<Response<Self::BuildPathsStream>, Status> {
        use pbvm::paths_build_event::Event as E;
        let peer = Peer::of(&request);
        let wire = request.into_inner();
        let origin = self.host.origin(paths::DIALECT, &wire);
        let req = validated(&self.host, paths::decode(wire))?;
        let event = |e| pbvm::PathsBuildEvent {
            event: Some(match e {
                Live::Started(s) => E::Started(s),
                Live::Log(l) => E::Log(l),
            }),
        };
        let last = |f: &crate::wire::Finished| pbvm::PathsBuildEvent {
            event: Some(E::Build(paths::encode(f))),
        };
        Ok(Response::new(live_stream(
            &self.host, req, origin, &peer, event, last,
        )))
    }
}
