//! Errors of the castore services.

use super::B3Digest;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("directory {digest} is invalid")]
    InvalidDirectory {
        digest: B3Digest,
        #[source]
        source: super::directory::ValidationError,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("remote castore: {context}")]
    Remote {
        context: String,
        #[source]
        source: tonic::Status,
    },
}
