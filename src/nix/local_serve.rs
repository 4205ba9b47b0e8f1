//! The local `serve` that `nix-builder` talks to when it is given no `--builder-addr`.
//!
//! Nix runs up to `max-jobs` builder programs at once and the embedded store is
//! single-process, so the programs share one server instead: the first one starts
//! `tvix-build-vm serve` on a unix socket in the state directory, later ones find it there.
//! Starting happens under a `flock` on a file in the state directory, so concurrent first
//! builds start one server. The server is put in a session of its own (`setsid`): Nix ends a
//! build by SIGKILLing the program's process group, which must not take the server down.
//!
//! This is only sound while every build runs as the same user (single-user Nix, or
//! `build-users-group =`): under a multi-user daemon, Nix kills every process of the build
//! user when a build ends, so a server started by one build would die under the next. There
//! the operator runs `serve` as a service and passes `--builder-addr` (docs/nix.md).

use nix::fcntl::{Flock, FlockArg};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a freshly started server may take to accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
/// How much of the server's log an error about its start shows.
const LOG_TAIL_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LocalServeError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("starting {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the local server exited ({status}) before accepting connections; its log ends:\n{log_tail}")]
    Exited { status: String, log_tail: String },
    #[error("the local server did not accept connections on {socket} within {timeout:?}; its log ends:\n{log_tail}")]
    Timeout {
        socket: PathBuf,
        timeout: Duration,
        log_tail: String,
    },
}

/// Where the local server of a state directory lives.
#[derive(Clone, Debug)]
pub struct LocalServe {
    pub state_dir: PathBuf,
}

impl LocalServe {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("serve.sock")
    }

    /// The embedded store the local server keeps.
    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("serve.log")
    }

    /// The input cache that belongs to the local server's store.
    pub fn input_cache_dir(&self) -> PathBuf {
        self.state_dir.join("inputs")
    }

    fn accepts(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
    }

    /// Returns the socket of a running local server, starting `program serve --listen
    /// unix:SOCKET --store STORE extra_args…` if none answers. Safe to call from many
    /// processes at once.
    pub fn ensure(
        &self,
        program: &Path,
        extra_args: &[OsString],
    ) -> Result<PathBuf, LocalServeError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LocalServeError::Io { path, source }
        };
        std::fs::create_dir_all(&self.state_dir).map_err(io(&self.state_dir))?;
        let socket = self.socket();
        // The common case needs no lock: a server is there.
        if self.accepts() {
            return Ok(socket);
        }
        let lock_path = self.state_dir.join("serve.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        // Blocking: another process may be starting the server right now.
        let _lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| {
            LocalServeError::Lock {
                path: lock_path.clone(),
                source,
            }
        })?;
        if self.accepts() {
            return Ok(socket);
        }
        // A socket nobody answers on is a leftover of a server that died.
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&socket)(e)),
        }
        let log_path = self.log_path();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(&log_path))?;
        let log_err = log.try_clone().map_err(io(&log_path))?;
        let mut listen = OsString::from("unix:");
        listen.push(&socket);
        let mut command = Command::new(program);
        command
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--store")
            .arg(self.store_dir())
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: between fork and exec the child only calls setsid(2), which is
        // async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| LocalServeError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        let started = Instant::now();
        loop {
            if self.accepts() {
                // The server outlives us; its exit status is nobody's business here.
                drop(child);
                return Ok(socket);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LocalServeError::Exited {
                    status: status.to_string(),
                    log_tail: log_tail(&log_path),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                // Not a server anyone can use: do not leave it running.
                let _ = child.kill();
                let _ = child.wait();
                return Err(LocalServeError::Timeout {
                    socket,
                    timeout: START_TIMEOUT,
                    log_tail: log_tail(&log_path),
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
    let mut buf = Vec::new();
    let _ = f.take(LOG_TAIL_BYTES).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
