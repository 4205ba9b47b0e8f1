//! gRPC channels to a remote castore, from tvix-style addresses.

use tonic::transport::{Channel, Endpoint};

/// Why a gRPC address could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "{addr:?}: a grpc+unix address needs an absolute socket path (grpc+unix:///abs/path.sock)"
    )]
    UnixPath { addr: String },
    #[error(
        "{addr:?}: a grpc+http address needs host and port and no path (grpc+http://host:port)"
    )]
    HttpAddr { addr: String },
    #[error("{addr:?}: unsupported gRPC scheme (use grpc+unix:// or grpc+http://)")]
    Scheme { addr: String },
    #[error("{addr:?}: invalid endpoint")]
    Endpoint {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A lazily connecting channel for `grpc+unix:///abs/path.sock` or `grpc+http://host:port`
/// (connection errors show up on the first call). Must be called inside a tokio runtime.
pub fn channel_from_addr(addr: &str) -> Result<Channel, ChannelError> {
    let uri = if let Some(path) = addr.strip_prefix("grpc+unix://") {
        // Ignore a query (tvix allows `?wait-connect=1` and the like).
        let path = path.split('?').next().unwrap_or(path);
        if !path.starts_with('/') || path.len() < 2 {
            return Err(ChannelError::UnixPath {
                addr: addr.to_owned(),
            });
        }
        format!("unix://{path}")
    } else if let Some(rest) = addr.strip_prefix("grpc+http://") {
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
    Ok(endpoint.connect_lazy())
}
