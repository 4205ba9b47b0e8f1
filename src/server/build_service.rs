//! The build RPCs over a [`BuildHost`]: `tvix.build.v1.BuildService/DoBuild` in the seed
//! layout or (with `--protocol tvix-2024`) the 2024 tvix layout, `snix.build.v1.BuildService/
//! DoBuild` (always, beside it), and this project's streaming
//! `tvix.build.vm.v1.BuildVmService/Build` (seed layout) and `/BuildPaths` (the 2024 and snix
//! request shape), which send the live log and then the result. All share one
//! implementation; see [`super::status`] for the status codes.

use super::build_host::{BuildHost, Event};
use super::peer::Peer;
use super::status::BuildError;
use crate::agent::LogStream;
use crate::proto::{build as pb, build_2024 as pb2024, build_vm as pbvm, snix_build as pbsnix};
use crate::provenance::attest::Origin;
use crate::request::{BuildRequest, ValidationError};
use crate::wire::{paths, seed, snix, tvix2024, Finished};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

/// Log chunks buffered for a streaming client before the build waits for it.
const LIVE_LOG_BUFFER: usize = 64;

fn validated<T>(host: &BuildHost, r: Result<T, ValidationError>) -> Result<T, Status> {
    r.map_err(|e| {
        let e = BuildError::Invalid(e);
        host.refused(&e);
        Status::from(e)
    })
}

/// One unary `DoBuild` of any dialect: the request's origin (for provenance, when the host
/// signs), then decode and validate, build, encode. `decode` also returns what `encode`
/// needs of the wire request (the dialects that echo it keep a copy; snix keeps nothing).
async fn do_build<W, K, R>(
    host: &Arc<BuildHost>,
    request: Request<W>,
    dialect: &'static str,
    decode: impl FnOnce(W) -> (Result<BuildRequest, ValidationError>, K),
    encode: impl FnOnce(K, &Finished) -> R,
) -> Result<Response<R>, Status>
where
    W: prost::Message + serde::Serialize,
{
    let peer = Peer::of(&request);
    let wire = request.into_inner();
    let origin = host.origin(dialect, &wire);
    let (req, kept) = decode(wire);
    let req = validated(host, req)?;
    let finished = host.start(req, origin, &peer, None).finish().await?;
    Ok(with_provenance(
        Response::new(encode(kept, &finished)),
        &finished,
    ))
}

/// The response metadata key holding the signed provenance's castore digest (hex).
pub const PROVENANCE_METADATA: &str = "tvix-build-vm-provenance";

/// A unary reply with its build's provenance digest in the metadata, where there is one.
fn with_provenance<T>(mut response: Response<T>, f: &Finished) -> Response<T> {
    if let Some(p) = &f.provenance {
        // Lowercase hex is always a valid ASCII metadata value.
        if let Ok(value) = p.digest.to_hex().parse() {
            response.metadata_mut().insert(PROVENANCE_METADATA, value);
        }
    }
    response
}

/// For [`do_build`]: decoders of the dialects whose answer echoes the request.
fn echoing<W: Clone>(
    decode: fn(W) -> Result<BuildRequest, ValidationError>,
) -> impl FnOnce(W) -> (Result<BuildRequest, ValidationError>, W) {
    move |w| (decode(w.clone()), w)
}

/// A unary `DoBuild` service of one dialect over the shared [`do_build`]: `$dialect`,
/// `$decode` and `$encode` as [`do_build`] takes them.
macro_rules! unary_build_service {
    ($(#[$doc:meta])* $name:ident, $pb:ident, $reply:ident, $dialect:expr, $decode:expr, $encode:expr) => {
        $(#[$doc])*
        pub struct $name {
            host: Arc<BuildHost>,
        }

        impl $name {
            pub fn new(host: Arc<BuildHost>) -> Self {
                Self { host }
            }
        }

        #[tonic::async_trait]
        impl $pb::build_service_server::BuildService for $name {
            async fn do_build(
                &self,
                request: Request<$pb::BuildRequest>,
            ) -> Result<Response<$pb::$reply>, Status> {
                do_build(&self.host, request, $dialect, $decode, $encode).await
            }
        }
    };
}

unary_build_service!(
    /// `DoBuild` in the seed layout.
    SeedBuildService, pb, Build, seed::DIALECT, echoing(seed::decode), seed::encode
);
unary_build_service!(
    /// `DoBuild` in the 2024 tvix layout.
    Tvix2024BuildService, pb2024, Build, tvix2024::DIALECT, echoing(tvix2024::decode), tvix2024::encode
);
// snix's reply does not echo the request: nothing is kept of it.
unary_build_service!(
    /// `snix.build.v1.BuildService/DoBuild`.
    SnixBuildService, pbsnix, BuildResponse, snix::DIALECT, |w| (snix::decode(w), ()), |(), f| snix::encode(f)
);

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
    req: BuildRequest,
    origin: Option<Origin>,
    peer: &Peer,
    event: fn(Live) -> E,
    last: impl FnOnce(&Finished) -> E + Send + 'static,
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
        let last = move |f: &Finished| pbvm::BuildEvent {
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
        let last = |f: &Finished| pbvm::PathsBuildEvent {
            event: Some(E::Build(paths::encode(f))),
        };
        Ok(Response::new(live_stream(
            &self.host, req, origin, &peer, event, last,
        )))
    }
}
