//! The build RPCs over a [`BuildHost`]: `tvix.build.v1.BuildService/DoBuild` in the seed
//! layout or (with `--protocol tvix-2024`) the 2024 tvix layout, and this project's
//! streaming `tvix.build.vm.v1.BuildVmService/Build` (seed layout), which sends the live
//! log and then the Build. All three share one implementation; see [`super::status`] for
//! the status codes.

use super::build_host::{BuildHost, Event};
use super::peer::Peer;
use super::status::BuildError;
use crate::agent::LogStream;
use crate::proto::{build as pb, build_2024 as pb2024, build_vm as pbvm};
use crate::wire::{seed, tvix2024};
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
        let finished = self.host.start(req, &peer, None).finish().await?;
        Ok(Response::new(seed::encode(wire, &finished)))
    }
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
        let finished = self.host.start(req, &peer, None).finish().await?;
        Ok(Response::new(tvix2024::encode(wire, &finished)))
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

type EventStream = Pin<Box<dyn Stream<Item = Result<pbvm::BuildEvent, Status>> + Send>>;

fn event(e: pbvm::build_event::Event) -> pbvm::BuildEvent {
    pbvm::BuildEvent { event: Some(e) }
}

#[tonic::async_trait]
impl pbvm::build_vm_service_server::BuildVmService for BuildVmService {
    type BuildStream = EventStream;

    async fn build(
        &self,
        request: Request<pb::BuildRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let peer = Peer::of(&request);
        let wire = request.into_inner();
        let req = validated(&self.host, seed::decode(wire.clone()))?;
        let (tx, mut rx) = mpsc::channel(LIVE_LOG_BUFFER);
        // The handle moves into the stream: when the client goes away, tonic drops the
        // stream, the handle with it, and the build's VM is killed.
        let handle = self.host.start(req, &peer, Some(tx));
        let stream = async_stream::stream! {
            while let Some(e) = rx.recv().await {
                yield Ok(match e {
                    Event::Started { id, queued } => event(pbvm::build_event::Event::Started(pbvm::Started {
                        build_id: id,
                        queued_us: crate::wire::micros(queued),
                    })),
                    Event::Log(chunk) => event(pbvm::build_event::Event::Log(pbvm::LogChunk {
                        stream: match chunk.stream {
                            LogStream::Stdout => pbvm::Stream::Stdout,
                            LogStream::Stderr => pbvm::Stream::Stderr,
                        } as i32,
                        data: chunk.data,
                    })),
                });
            }
            // The channel closes when the build is over.
            match handle.finish().await {
                Ok(finished) => yield Ok(event(pbvm::build_event::Event::Build(seed::encode(wire, &finished)))),
                Err(e) => yield Err(Status::from(e)),
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
