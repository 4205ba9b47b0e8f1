//! Errors of the castore services, and how they map to gRPC status codes.

use super::directory::ValidationError;
use super::B3Digest;

/// Why a closure upload or a recursive directory fetch was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ClosureError {
    #[error("the closure is empty")]
    Empty,
    #[error("directory {parent} refers to directory {child} (entry {name}), which was neither sent before it nor stored")]
    DanglingReference {
        parent: B3Digest,
        name: String,
        child: B3Digest,
    },
    /// The Put contract of the castore gRPC protocol: one stream carries a whole closure.
    #[error("directory {parent} refers to directory {child} (entry {name}), which was not sent before it in this upload (a Put stream carries the whole closure, leaves first)")]
    NotInStream {
        parent: B3Digest,
        name: String,
        child: B3Digest,
    },
    #[error("the closure has {0} roots; exactly one directory must not be referenced by another")]
    RootCount(usize),
    #[error("directory {0} was sent twice")]
    Repeated(B3Digest),
    #[error(
        "directory {0} was not asked for (it is not referenced by a directory received before)"
    )]
    Unexpected(B3Digest),
    #[error("directory {0} is missing from the closure")]
    Missing(B3Digest),
    #[error("the closure has more than {0} directories")]
    TooLarge(usize),
}

/// An error of a blob or directory service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("directory {digest} is invalid")]
    InvalidDirectory {
        digest: B3Digest,
        #[source]
        source: Box<ValidationError>,
    },
    #[error("invalid directory closure")]
    InvalidClosure(#[source] ClosureError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("directory {0} not found")]
    DirectoryNotFound(B3Digest),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("directory database: {context}")]
    Database {
        context: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error(transparent)]
    NoSpace(Box<crate::castore::blob::floor::BelowFloor>),
    #[error("remote castore: {context}")]
    Remote {
        context: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("remote castore: {0}")]
    Protocol(String),
    #[error("object store: {context}")]
    ObjectStore {
        context: String,
        #[source]
        source: Box<object_store::Error>,
    },
    /// Bytes from a store that do not hash to the digest they were stored under: never
    /// handed on.
    #[error("{what} {digest} is corrupt in the store: {reason}")]
    Corrupt {
        what: &'static str,
        digest: B3Digest,
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid_directory(digest: B3Digest, source: ValidationError) -> Self {
        Error::InvalidDirectory {
            digest,
            source: Box::new(source),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn db(context: impl Into<String>, source: impl Into<redb::Error>) -> Self {
        Error::Database {
            context: context.into(),
            source: Box::new(source.into()),
        }
    }

    /// Whether this is the directory database being held open by another process (redb
    /// locks its file while it is open, e.g. by a running `serve`).
    pub fn is_locked(&self) -> bool {
        matches!(self, Error::Database { source, .. }
            if matches!(**source, redb::Error::DatabaseAlreadyOpen))
    }

    pub(crate) fn remote(context: impl Into<String>, source: tonic::Status) -> Self {
        Error::Remote {
            context: context.into(),
            source: Box::new(source),
        }
    }
}

impl From<ClosureError> for Error {
    fn from(e: ClosureError) -> Self {
        Error::InvalidClosure(e)
    }
}

/// The full chain of an error, `: `-separated, for messages that leave the process.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = error_chain(&e);
        match &e {
            Error::InvalidDirectory { .. }
            | Error::InvalidClosure(_)
            | Error::InvalidRequest(_) => tonic::Status::invalid_argument(msg),
            Error::DirectoryNotFound(_) => tonic::Status::not_found(msg),
            Error::NoSpace(_) => tonic::Status::resource_exhausted(msg),
            Error::Remote { source, .. } => tonic::Status::new(source.code(), msg),
            // A full disk (or the store's free-space floor) is the host's state, not a bug:
            // the client may retry later or elsewhere.
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
                tonic::Status::resource_exhausted(msg)
            }
            Error::Io { .. }
            | Error::Database { .. }
            | Error::Protocol(_)
            | Error::ObjectStore { .. }
            | Error::Corrupt { .. } => tonic::Status::internal(msg),
        }
    }
}
