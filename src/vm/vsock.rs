//! The host side of hybrid vsock, as QEMU (through `vhost-device-vsock`) and cloud-hypervisor
//! (natively) both implement it: a guest `connect()` to CID 2, port P lands on the host unix
//! listener at `<uds path>_P`, which must be listening before the guest dials.
//!
//! [`HostListener`] is that listener, for any backend. [`VhostDeviceVsock`] locates and
//! describes the helper QEMU needs; cloud-hypervisor needs none.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

/// The largest unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The program QEMU's vhost-user vsock device talks to.
pub const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";

/// Errors of the host side of vsock.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A socket path does not fit in `sun_path`.
    #[error(
        "socket path {path} is {len} bytes, more than the {MAX_SOCKET_PATH} a unix socket allows"
    )]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Binding the listener failed (e.g. the path exists already).
    #[error("listening on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Accepting failed.
    #[error("accepting on {path}")]
    Accept {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Nobody connected before the deadline.
    #[error("no guest connection on {path} within {waited:?}")]
    AcceptTimeout {
        /// The socket path.
        path: PathBuf,
        /// How long it waited.
        waited: Duration,
    },
    /// The connecting peer is not a process of ours.
    #[error("connection on {path} from uid {uid}, expected {expected}")]
    ForeignPeer {
        /// The socket path.
        path: PathBuf,
        /// The peer's uid.
        uid: u32,
        /// Ours.
        expected: u32,
    },
    /// `vhost-device-vsock` was not found.
    #[error(
        "{VHOST_DEVICE_VSOCK} not found {where_}: install it with `cargo install vhost-device-vsock` \
         (it lands in ~/.cargo/bin) or name it explicitly"
    )]
    HelperMissing {
        /// Where it was looked for.
        where_: String,
    },
}

/// The unix path on which guest connections to `port` arrive.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut os = uds_path.as_os_str().to_owned();
    os.push(format!("_{port}"));
    PathBuf::from(os)
}

/// Checks that `path` fits in a unix socket address.
pub fn check_socket_path(path: &Path) -> Result<(), VsockError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VsockError::PathTooLong {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

/// A listener for guest connections to one vsock port. Removes its socket file when dropped.
#[derive(Debug)]
pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
}

impl HostListener {
    /// Binds `<uds_path>_<port>`. Call it before the VM starts: a guest that dials before
    /// anyone listens is refused. Fails if the path exists (a leftover is a bug to surface,
    /// not to paper over).
    pub fn bind(uds_path: &Path, port: u32) -> Result<Self, VsockError> {
        let path = port_path(uds_path, port);
        check_socket_path(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(HostListener { listener, path })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection before `deadline`. The peer must run under our uid (the VMM
    /// or its vsock helper); the runtime directory's permissions keep others out, and this
    /// check makes a mistake there visible instead of silent.
    pub async fn accept(&self, deadline: Instant) -> Result<UnixStream, VsockError> {
        let started = Instant::now();
        let (stream, _) = tokio::time::timeout_at(deadline, self.listener.accept())
            .await
            .map_err(|_| VsockError::AcceptTimeout {
                path: self.path.clone(),
                waited: started.elapsed(),
            })?
            .map_err(|source| VsockError::Accept {
                path: self.path.clone(),
                source,
            })?;
        let cred = stream.peer_cred().map_err(|source| VsockError::Accept {
            path: self.path.clone(),
            source,
        })?;
        let expected = nix::unistd::geteuid().as_raw();
        if cred.uid() != expected {
            return Err(VsockError::ForeignPeer {
                path: self.path.clone(),
                uid: cred.uid(),
                expected,
            });
        }
        Ok(stream)
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `vhost-device-vsock` program QEMU's `vhost-user-vsock-device` needs.
#[derive(Debug, Clone)]
pub struct VhostDeviceVsock {
    program: PathBuf,
}

impl VhostDeviceVsock {
    /// Uses `explicit` if given (it must be an executable file), else searches `PATH`, then
    /// `~/.cargo/bin` (where `cargo install` puts it).
    pub fn locate(explicit: Option<&Path>) -> Result<Self, VsockError> {
        // `cargo install` puts it in ~/.cargo/bin, which a service's PATH often lacks.
        let cargo_bin: Vec<PathBuf> = std::env::var_os("HOME")
            .map(|home| Path::new(&home).join(".cargo/bin"))
            .into_iter()
            .collect();
        super::program::locate(explicit, VHOST_DEVICE_VSOCK, &cargo_bin)
            .map(|program| VhostDeviceVsock { program })
            .map_err(|where_| VsockError::HelperMissing { where_ })
    }

    /// The program path.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The command serving one VM: the VMM connects to `vhost_socket`; guest connections go
    /// to `<uds_path>_<port>`; host connections to the guest go through `uds_path`.
    pub fn command(
        &self,
        guest_cid: u32,
        vhost_socket: &Path,
        uds_path: &Path,
    ) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.program);
        command
            .arg("--guest-cid")
            .arg(guest_cid.to_string())
            .arg("--socket")
            .arg(vhost_socket)
            .arg("--uds-path")
            .arg(uds_path);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn port_paths_follow_the_hybrid_convention() {
        assert_eq!(
            port_path(Path::new("/run/x/vsock.sock"), 1024),
            PathBuf::from("/run/x/vsock.sock_1024")
        );
    }

    #[tokio::test]
    async fn accepts_one_connection_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uds = dir.path().join("vs.sock");
        let listener = HostListener::bind(&uds, 1024).expect("bind");
        assert!(matches!(
            HostListener::bind(&uds, 1024),
            Err(VsockError::Bind { .. })
        ));
        let path = listener.path().to_owned();
        let client = tokio::spawn(async move {
            let mut s = UnixStream::connect(&path).await.expect("connect");
            s.write_all(b"hi").await.expect("write");
        });
        let mut stream = listener
            .accept(Instant::now() + Duration::from_secs(5))
            .await
            .expect("accept");
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.expect("read");
        assert_eq!(buf, b"hi");
        client.await.expect("client");
        let path = listener.path().to_owned();
        drop(listener);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn accept_has_a_deadline() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = HostListener::bind(&dir.path().join("vs.sock"), 5).expect("bind");
        let err = listener
            .accept(Instant::now() + Duration::from_millis(50))
            .await
            .expect_err("nobody connects");
        assert!(matches!(err, VsockError::AcceptTimeout { .. }), "{err}");
    }

    #[test]
    fn long_paths_are_refused_before_binding() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(100)));
        assert!(matches!(
            HostListener::bind(&long, 1024),
            Err(VsockError::PathTooLong { .. })
        ));
    }

    #[test]
    fn helper_lookup_errors_say_how_to_install() {
        let err = VhostDeviceVsock::locate(Some(Path::new("/nonexistent/vhost-device-vsock")))
            .expect_err("missing");
        assert!(
            err.to_string().contains("cargo install vhost-device-vsock"),
            "{err}"
        );
    }
}
