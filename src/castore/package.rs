//! The castore's two gRPC package names: `tvix.castore.v1` and `snix.castore.v1`.
//!
//! snix renamed tvix's castore package (and some message names) without changing a byte of
//! the wire encoding: a test in `src/proto.rs` checks that the two packages encode alike. So
//! one implementation serves both, and one client speaks both: only the request path
//! (`/tvix.castore.v1.BlobService/Read` or `/snix.castore.v1.BlobService/Read`) differs.
//! [`PackageChannel`] rewrites the path of outgoing calls for the gRPC clients;
//! [`SnixAlias`] serves a tvix service under its snix name.

use super::Error;
use std::marker::PhantomData;
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::Channel;

/// Which package a castore gRPC peer speaks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Package {
    /// `tvix.castore.v1`: tvix-store, and this project's own server (which serves both).
    #[default]
    Tvix,
    /// `snix.castore.v1`: snix-store.
    Snix,
}

impl Package {
    /// The start of every method path of the package.
    const fn path_prefix(self) -> &'static str {
        match self {
            Package::Tvix => "/tvix.castore.v1.",
            Package::Snix => "/snix.castore.v1.",
        }
    }

    /// The package's name as an address option takes it (`?package=snix`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Package::Tvix => "tvix",
            Package::Snix => "snix",
        }
    }
}

impl std::fmt::Display for Package {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.castore.v1", self.as_str())
    }
}

/// An unknown package name.
#[derive(Debug, thiserror::Error)]
#[error("unknown castore package {0:?} (expected tvix or snix)")]
pub struct UnknownPackage(pub String);

impl std::str::FromStr for Package {
    type Err = UnknownPackage;
    fn from_str(s: &str) -> Result<Self, UnknownPackage> {
        match s {
            "tvix" => Ok(Package::Tvix),
            "snix" => Ok(Package::Snix),
            other => Err(UnknownPackage(other.to_owned())),
        }
    }
}

/// Moves a request from one package's path to the other's; other paths stay as they are.
fn rename<B>(req: &mut http::Request<B>, from: Package, to: Package) {
    let Some(rest) = req.uri().path().strip_prefix(from.path_prefix()) else {
        return;
    };
    let path = format!("{}{rest}", to.path_prefix());
    let mut parts = req.uri().clone().into_parts();
    // A path made of a valid path with a constant prefix swapped is valid; should either
    // step fail anyway, the call goes out unchanged and the peer answers it.
    let Ok(path) = http::uri::PathAndQuery::try_from(path) else {
        return;
    };
    parts.path_and_query = Some(path);
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// A failed call to a castore peer. An UNIMPLEMENTED answer most likely means the peer
/// speaks the other package, so the message says how to pick it.
pub(crate) fn remote_error(package: Package, context: String, status: tonic::Status) -> Error {
    let context = if status.code() == tonic::Code::Unimplemented {
        let other = match package {
            Package::Tvix => Package::Snix,
            Package::Snix => Package::Tvix,
        };
        format!(
            "{context} (the server does not serve {package}; for one that speaks {other}, add \
             ?package={} to the address)",
            other.as_str()
        )
    } else {
        context
    };
    Error::remote(context, status)
}

/// A channel whose castore calls (generated for `tvix.castore.v1`) go to `package`.
#[derive(Clone, Debug)]
pub struct PackageChannel {
    channel: Channel,
    package: Package,
}

impl PackageChannel {
    pub fn new(channel: Channel, package: Package) -> Self {
        Self { channel, package }
    }

    /// The package the calls go to.
    pub fn package(&self) -> Package {
        self.package
    }
}

/// A plain channel speaks `tvix.castore.v1`.
impl From<Channel> for PackageChannel {
    fn from(channel: Channel) -> Self {
        Self::new(channel, Package::Tvix)
    }
}

impl tower::Service<http::Request<Body>> for PackageChannel {
    type Response = <Channel as tower::Service<http::Request<Body>>>::Response;
    type Error = <Channel as tower::Service<http::Request<Body>>>::Error;
    type Future = <Channel as tower::Service<http::Request<Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.channel, cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        rename(&mut req, Package::Tvix, self.package);
        tower::Service::call(&mut self.channel, req)
    }
}

/// The snix name of a castore service (the `SERVICE_NAME` tonic generates for it).
pub trait SnixName {
    const NAME: &'static str;
}

/// `snix.castore.v1.BlobService`
pub enum SnixBlobService {}
impl SnixName for SnixBlobService {
    const NAME: &'static str = crate::proto::snix_castore::blob_service_server::SERVICE_NAME;
}

/// `snix.castore.v1.DirectoryService`
pub enum SnixDirectoryService {}
impl SnixName for SnixDirectoryService {
    const NAME: &'static str = crate::proto::snix_castore::directory_service_server::SERVICE_NAME;
}

/// Serves the `tvix.castore.v1` service `S` under its snix name `N`: the same
/// implementation, limits and stores answer both packages.
pub struct SnixAlias<S, N> {
    inner: S,
    name: PhantomData<fn() -> N>,
}

impl<S, N> SnixAlias<S, N> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            name: PhantomData,
        }
    }
}

impl<S: Clone, N> Clone for SnixAlias<S, N> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone())
    }
}

impl<S, N: SnixName> NamedService for SnixAlias<S, N> {
    const NAME: &'static str = N::NAME;
}

impl<S, N, B> tower::Service<http::Request<B>> for SnixAlias<S, N>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        rename(&mut req, Package::Snix, Package::Tvix);
        self.inner.call(req)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "a failure should fail the test")]
mod tests {
    use super::*;

    fn request(uri: &str) -> http::Request<()> {
        http::Request::builder().uri(uri).body(()).unwrap()
    }

    #[test]
    fn renames_only_the_package_of_castore_paths() {
        let mut r = request("http://[::1]:8000/tvix.castore.v1.BlobService/Read");
        rename(&mut r, Package::Tvix, Package::Snix);
        assert_eq!(
            r.uri().to_string(),
            "http://[::1]:8000/snix.castore.v1.BlobService/Read"
        );
        let mut r = request("/snix.castore.v1.DirectoryService/Put");
        rename(&mut r, Package::Snix, Package::Tvix);
        assert_eq!(r.uri().path(), "/tvix.castore.v1.DirectoryService/Put");
        // Another package's path, or the package as a mere substring, stays.
        for other in [
            "/tvix.build.v1.BuildService/DoBuild",
            "/x/tvix.castore.v1.BlobService/Read",
            "/grpc.health.v1.Health/Check",
        ] {
            let mut r = request(other);
            rename(&mut r, Package::Tvix, Package::Snix);
            assert_eq!(r.uri().path(), other);
        }
    }

    #[test]
    fn package_names() {
        assert_eq!("snix".parse::<Package>().unwrap(), Package::Snix);
        assert_eq!("tvix".parse::<Package>().unwrap(), Package::Tvix);
        let e = "nix".parse::<Package>().unwrap_err().to_string();
        assert!(e.contains("\"nix\""), "{e}");
        assert_eq!(Package::Snix.to_string(), "snix.castore.v1");
    }
}
