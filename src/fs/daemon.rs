//! Serving one VM: a vhost-user socket, virtiofsd's vhost-user-fs backend over a
//! [`FileSystem`], exactly one frontend connection, and an end when it hangs up.

use nix::fcntl::OFlag;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserDaemon;
use virtiofsd::filesystem::{FileSystem, SerializableFileSystem};
use virtiofsd::vhost_user::{VhostUserFsBackendBuilder, MAX_TAG_LEN};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Failures of the daemon itself (as opposed to failed filesystem requests).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("tag {0:?} is empty or longer than {MAX_TAG_LEN} bytes")]
    InvalidTag(String),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the vhost-user-fs backend")]
    Backend(#[source] virtiofsd::vhost_user::Error),
    #[error("cannot create the vhost-user daemon")]
    Daemon(#[source] BackendFailure),
    #[error("accepting the VMM's connection on {path} failed")]
    Accept {
        path: PathBuf,
        #[source]
        source: BackendFailure,
    },
    #[error("serving the VMM failed")]
    Serve(#[source] BackendFailure),
}

/// An error of the vhost-user-backend crate. Its type implements neither
/// `std::error::Error` nor `Sync` (one variant holds a thread's panic payload), so it is kept
/// as its full rendered message, which includes the inner causes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendFailure(String);

impl From<vhost_user_backend::Error> for BackendFailure {
    fn from(e: vhost_user_backend::Error) -> Self {
        Self(e.to_string())
    }
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The vhost-user socket the VMM connects to.
    pub socket: PathBuf,
    /// The virtio-fs tag the guest mounts (at most [`MAX_TAG_LEN`] bytes); `None` leaves the
    /// tag to the VMM's device configuration.
    pub tag: Option<String>,
    /// virtiofsd worker threads; 0 handles requests on the queue thread itself.
    pub threads: usize,
}

impl DaemonConfig {
    /// Checks what the backend would otherwise reject late.
    pub fn validate(&self) -> Result<(), DaemonError> {
        if let Some(tag) = &self.tag {
            if tag.is_empty() || tag.len() > MAX_TAG_LEN {
                return Err(DaemonError::InvalidTag(tag.clone()));
            }
        }
        Ok(())
    }
}

/// A listening socket and where it sits, so that it can be removed once the VMM connected
/// even after the daemon changed its root directory.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    place: SocketPlace,
}

/// The socket's directory (an `O_PATH` descriptor) and its name there.
#[derive(Debug)]
struct SocketPlace {
    dir: OwnedFd,
    name: OsString,
}

impl SocketPlace {
    /// Removes the socket's name (the listener itself stays open until dropped).
    fn unlink(&self) -> nix::Result<()> {
        nix::unistd::unlinkat(
            &self.dir,
            self.name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
    }
}

/// Binds the socket so that it appears at `path` only once it accepts connections: bound
/// and listening under a temporary name, owner-only, then renamed into place. A VMM that
/// sees the path can connect.
pub fn bind(path: &Path) -> Result<BoundSocket, DaemonError> {
    let err = |source| DaemonError::Listen {
        path: path.to_owned(),
        source,
    };
    let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
        return Err(err(io::Error::from(io::ErrorKind::InvalidInput)));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let dir = nix::fcntl::open(
        parent,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| err(io::Error::from(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(BoundSocket {
        listener,
        place: SocketPlace {
            dir,
            name: name.to_owned(),
        },
    })
}

/// Serves `fs` to the one VMM that connects on `socket` (bound at `cfg.socket`), until it
/// disconnects. The socket path is removed once the VMM is connected, so no one else can
/// connect.
pub fn serve<F>(fs: F, socket: BoundSocket, cfg: &DaemonConfig) -> Result<(), DaemonError>
where
    F: FileSystem + SerializableFileSystem + Send + Sync + 'static,
{
    cfg.validate()?;
    let backend = VhostUserFsBackendBuilder::default()
        .set_thread_pool_size(cfg.threads)
        .set_tag(cfg.tag.clone())
        .build(fs)
        .map_err(DaemonError::Backend)?;
    let mut daemon = VhostUserDaemon::new(
        "tvix-build-vm-fs".to_owned(),
        Arc::new(backend),
        GuestMemoryAtomic::new(GuestMemoryMmap::<BitmapMmapRegion>::new()),
    )
    .map_err(|e| DaemonError::Daemon(e.into()))?;

    let BoundSocket { listener, place } = socket;
    let mut listener = Listener::from(listener);
    tracing::info!(socket = %cfg.socket.display(), "waiting for the VMM");
    daemon
        .start(&mut listener)
        .map_err(|source| DaemonError::Accept {
            path: cfg.socket.clone(),
            source: source.into(),
        })?;
    drop(listener);
    if let Err(e) = place.unlink() {
        tracing::warn!(socket = %cfg.socket.display(), error = %e, "cannot remove the socket");
    }
    // A descriptor of a directory outside a chroot is a way out of it: close it now.
    drop(place);
    tracing::info!("VMM connected, serving");

    match daemon.wait() {
        Ok(()) => Ok(()),
        // The ordinary end: the VMM exited or closed the connection.
        Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(DaemonError::Serve(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_appears_only_when_listening_and_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs.sock");
        std::fs::write(&path, b"stale").unwrap();
        let _l = bind(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        std::os::unix::net::UnixStream::connect(&path).unwrap();
        // No temporary name is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn bad_tags_and_unbindable_paths_are_named() {
        let cfg = |tag: &str| DaemonConfig {
            socket: PathBuf::from("/x"),
            tag: Some(tag.to_owned()),
            threads: 0,
        };
        assert!(matches!(
            cfg("").validate(),
            Err(DaemonError::InvalidTag(_))
        ));
        assert!(matches!(
            cfg(&"t".repeat(MAX_TAG_LEN + 1)).validate(),
            Err(DaemonError::InvalidTag(_))
        ));
        cfg("inputs").validate().unwrap();
        let err = bind(Path::new("/nonexistent-dir/fs.sock")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/fs.sock"));
    }
}
