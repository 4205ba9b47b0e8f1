//! gRPC channels to a remote castore, from addresses as tvix and snix users write them.
//!
//! - `grpc+unix:///abs/path.sock` (tvix) or `grpc+unix:/abs/path.sock` (snix);
//! - `grpc+http://host:port`.
//!
//! Options go in the query: `package=tvix|snix` picks the castore package the peer speaks
//! (default `tvix`, which this project's server answers beside `snix`; a snix-store needs
//! `package=snix`); `wait-connect=0|1` is accepted for tvix/snix compatibility and changes
//! nothing (channels here always connect on first use).

use super::package::{Package, PackageChannel};
use tonic::transport::Endpoint;

/// Why a gRPC address could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "{addr:?}: a grpc+unix address needs an absolute socket path and no host \
         (grpc+unix:/abs/path.sock or grpc+unix:///abs/path.sock)"
    )]
    UnixPath { addr: String },
    #[error(
        "{addr:?}: a grpc+http address needs host and port and no path (grpc+http://host:port)"
    )]
    HttpAddr { addr: String },
    #[error("{addr:?}: unsupported gRPC scheme (use grpc+unix: or grpc+http://)")]
    Scheme { addr: String },
    #[error("{addr:?}: option {option:?}: {why} (options: package=tvix|snix, wait-connect=0|1)")]
    Option {
        addr: String,
        option: String,
        why: String,
    },
    #[error("{addr:?}: invalid endpoint")]
    Endpoint {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The castore package named by the query of `addr` (tvix without one).
fn package_from_query(addr: &str, query: Option<&str>) -> Result<Package, ChannelError> {
    let mut package = Package::default();
    for option in query.into_iter().flat_map(|q| q.split('&')) {
        let bad = |why: String| ChannelError::Option {
            addr: addr.to_owned(),
            option: option.to_owned(),
            why,
        };
        match option.split_once('=') {
            Some(("package", v)) => package = v.parse().map_err(|e| bad(format!("{e}")))?,
            Some(("wait-connect", "0" | "1")) => {}
            Some(("wait-connect", _)) => return Err(bad("expected 0 or 1".into())),
            _ => return Err(bad("unknown option".into())),
        }
    }
    Ok(package)
}

/// A lazily connecting channel for a `grpc+unix:` or `grpc+http://` address (connection
/// errors show up on the first call), speaking the castore package the address names.
/// Must be called inside a tokio runtime.
pub fn channel_from_addr(addr: &str) -> Result<PackageChannel, ChannelError> {
    let (target, query) = match addr.split_once('?') {
        Some((t, q)) => (t, Some(q)),
        None => (addr, None),
    };
    let package = package_from_query(addr, query)?;
    let uri = if let Some(rest) = target.strip_prefix("grpc+unix:") {
        // snix writes `grpc+unix:/abs`, tvix `grpc+unix:///abs` (an empty host); a host
        // (`grpc+unix://host/abs`) or a relative path is refused.
        let path = rest.strip_prefix("//").unwrap_or(rest);
        if !path.starts_with('/') || path.starts_with("//") || path.len() < 2 {
            return Err(ChannelError::UnixPath {
                addr: addr.to_owned(),
            });
        }
        format!("unix://{path}")
    } else if let Some(rest) = target.strip_prefix("grpc+http://") {
        let host_port = rest.trim_end_matches('/');
        if host_port.is_empty() || host_port.contains('/') || !host_port.contains(':') {
            return Err(ChannelError::HttpAddr {
                addr: addr.to_owned(),
            });
        }
        format!("http://{host_port}")
    } else {
        return Err(ChannelError::Scheme {
            addr: addr.to_owned(),
        });
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|source| ChannelError::Endpoint {
        addr: addr.to_owned(),
        source,
    })?;
    Ok(PackageChannel::new(endpoint.connect_lazy(), package))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_spellings_and_the_package_option() {
        for (addr, package) in [
            ("grpc+unix:///run/x.sock", Package::Tvix),
            ("grpc+unix:/run/x.sock", Package::Tvix),
            ("grpc+unix:/run/x.sock?package=snix", Package::Snix),
            ("grpc+unix:///run/x.sock?package=tvix", Package::Tvix),
            (
                "grpc+unix:/run/x.sock?wait-connect=1&package=snix",
                Package::Snix,
            ),
            ("grpc+http://127.0.0.1:8000", Package::Tvix),
            ("grpc+http://[::1]:12345/?package=snix", Package::Snix),
        ] {
            match channel_from_addr(addr) {
                Ok(c) => assert_eq!(c.package(), package, "{addr}"),
                Err(e) => panic!("{addr}: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn bad_addresses_say_what_is_wrong() {
        for (addr, want) in [
            ("grpc+unix:rel.sock", "absolute socket path"),
            ("grpc+unix://host/abs.sock", "no host"),
            ("grpc+unix://rel.sock", "absolute socket path"),
            ("grpc+unix:////x.sock", "absolute socket path"),
            ("grpc+unix:/", "absolute socket path"),
            ("grpc+http://host", "host and port"),
            ("grpc+http://host:1/path", "host and port"),
            ("grpc+https://host:1", "unsupported gRPC scheme"),
            ("grpc+unix:/x.sock?package=nix", "unknown castore package"),
            ("grpc+unix:/x.sock?wait-connect=2", "expected 0 or 1"),
            ("grpc+unix:/x.sock?colour=blue", "unknown option"),
            ("grpc+unix:/x.sock?package", "unknown option"),
        ] {
            let msg = match channel_from_addr(addr) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{addr} accepted"),
            };
            assert!(msg.contains(addr) && msg.contains(want), "{addr}: {msg}");
        }
    }
}
