//! TLS for the gRPC listener from PEM files: a server identity, and for mutual TLS a CA
//! that every client certificate must chain to (clients without one are refused in the
//! handshake).

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
#[error("reading {what} {}", path.display())]
pub struct TlsError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The PEM files of a TLS setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        what,
        path: path.to_owned(),
        source,
    })
}

impl TlsFiles {
    /// Reads the files. The PEM contents are checked by tonic when the server is built.
    pub fn load(&self) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(
            read("the TLS certificate", &self.cert)?,
            read("the TLS key", &self.key)?,
        );
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read("the client CA", ca)?));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
        };
        let e = files.load().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
    }
}
