//! A fake cloud-hypervisor: its REST API on a unix socket, its event monitor and its serial
//! output, strict wherever the real one is strict (see docs/architecture.md on cloud-hypervisor's
//! API). Include with `#[path = "support/ch_fake/mod.rs"] mod ch_fake;`.
//!
//! - `http`: the HTTP/1.1 framing, as strict as the real server's.
//! - `api`: the routes and the VM's state machine.
//! - `config`: `vm.create` bodies and the validation at `vm.boot`.
//! - `guest`: the fake guest (serial output, power-off, reboot, vsock) and the event monitor.
//! - `exe.rs`: the fake `cloud-hypervisor` process around all of it (its own module, included
//!   next to this one as `ch_fake_exe`).
//!
//! It parses `vm.create` bodies with its own structs, written from the contract and not shared
//! with the crate, so a wrong field name or enum case in the crate fails here. It validates
//! at `vm.boot`, not at `vm.create`, like the real one.
//!
//! Used in two ways: in-process ([`FakeVmm::start`]) to test the API client, and inside a whole
//! fake `cloud-hypervisor` executable (`exe.rs`) that the backend launches, so its
//! lifecycle is tested end to end without KVM.
#![allow(
    dead_code,
    reason = "each test crate uses a different subset of the helpers"
)]

mod api;
mod config;
mod guest;
mod http;

use api::{route, Vm, VmState};
use guest::emit;
use http::{framing, read_head, write_reply, Reply};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// The real limit on a request body.
pub const MAX_BODY: u64 = 4 << 20;
/// The version the fake reports.
pub const FAKE_VERSION: &str = "v53.0.0-fake";

/// What the fake guest does once booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guest {
    /// Prints to the serial port and powers off after the delay.
    PowerOff(Duration),
    /// Reboots after the delay, again and again (as a real guest with `panic=-1` might).
    Reboot(Duration),
    /// Runs until stopped through the API.
    Run,
    /// Dials host port `port` over hybrid vsock, sends a line, prints the reply, powers off.
    DialVsock(u32),
}

/// How the fake answers `vmm.shutdown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmShutdown {
    /// `200` with an empty body, then exit.
    Reply,
    /// Close the connection without a reply, then exit (cloud-hypervisor #6247).
    CloseWithoutReply,
    /// `200`, but never exit: the client must kill the process.
    Ignore,
}

/// Behaviour of one fake VMM.
#[derive(Debug, Clone)]
pub struct Options {
    /// Error bodies as plain text (before v47) instead of a JSON array.
    pub legacy_errors: bool,
    /// See [`VmmShutdown`].
    pub vmm_shutdown: VmmShutdown,
    /// See [`Guest`].
    pub guest: Guest,
    /// The event monitor file.
    pub events: Option<PathBuf>,
    /// Where serial output in `Tty` mode goes (the process's stdout); `None` discards it.
    pub stdout: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            legacy_errors: false,
            vmm_shutdown: VmmShutdown::Reply,
            guest: Guest::PowerOff(Duration::from_millis(100)),
            events: None,
            stdout: None,
        }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// The status answered (0 if the connection was closed instead).
    pub status: u16,
}

struct Shared {
    pub(super) options: Options,
    pub(super) vm: Mutex<Option<Vm>>,
    pub(super) seen: Mutex<Vec<Seen>>,
    /// Set to the exit code when the process should exit.
    pub(super) exit: watch::Sender<Option<i32>>,
}

/// A running in-process fake.
pub struct FakeVmm {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<i32>,
    socket: PathBuf,
}

impl FakeVmm {
    /// Serves the API on `socket` (bound now) until the fake VMM would exit.
    pub fn start(socket: &Path, options: Options) -> FakeVmm {
        let listener = UnixListener::bind(socket)
            .unwrap_or_else(|e| panic!("fake: binding {}: {e}", socket.display()));
        let (exit, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            options,
            vm: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            exit,
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        FakeVmm {
            shared,
            task,
            socket: socket.to_owned(),
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.shared.seen).clone()
    }

    /// The state name of the VM (`None` if there is no VM).
    pub fn state(&self) -> Option<&'static str> {
        lock(&self.shared.vm).as_ref().map(|vm| match vm.state {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Shutdown => "Shutdown",
        })
    }

    /// Waits until the fake VMM exits; its exit code.
    pub async fn exited(self) -> i32 {
        self.task.await.unwrap_or(-1)
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn serve(listener: UnixListener, shared: Arc<Shared>) -> i32 {
    emit(&shared, "vmm", "starting");
    let mut exit = shared.exit.subscribe();
    loop {
        // One connection at a time: cloud-hypervisor serves one request at a time, and a
        // client that keeps a connection open while opening another would hang here.
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => panic!("fake: accept: {e}"),
            },
            _ = exit.wait_for(Option::is_some) => break,
        };
        serve_connection(stream, &shared).await;
        if shared.exit.borrow().is_some() {
            break;
        }
    }
    let code = shared.exit.borrow().unwrap_or(0);
    if let Some(vm) = lock(&shared.vm).as_mut() {
        if let Some(task) = vm.guest.take() {
            task.abort();
        }
        if let Some((_, path)) = vm.vsock.take() {
            let _ = std::fs::remove_file(path);
        }
    }
    code
}

async fn serve_connection(stream: UnixStream, shared: &Arc<Shared>) {
    let mut reader = BufReader::new(stream);
    let mut exit = shared.exit.subscribe();
    loop {
        // An idle connection ends when the VMM exits; a request being answered does not.
        let head = tokio::select! {
            head = read_head(&mut reader) => head,
            _ = exit.wait_for(Option::is_some) => return,
        };
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(reply) => {
                record(shared, "?", "?", vec![], vec![], &reply);
                let _ = write_reply(reader.get_mut(), &reply, shared).await;
                return;
            }
        };
        let (reply, body, keep_open) = match framing(&head) {
            Err(reply) => (reply, Vec::new(), false),
            Ok(length) => {
                let mut body = vec![0u8; length as usize];
                if reader.read_exact(&mut body).await.is_err() {
                    return;
                }
                (route(shared, &head, &body), body, true)
            }
        };
        record(
            shared,
            &head.method,
            &head.path,
            head.headers.clone(),
            body,
            &reply,
        );
        if write_reply(reader.get_mut(), &reply, shared).await.is_err() || !keep_open {
            return;
        }
        if shared.exit.borrow().is_some() {
            return;
        }
    }
}

fn record(
    shared: &Shared,
    method: &str,
    path: &str,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    reply: &Reply,
) {
    let status = match reply {
        Reply::Status(s, _) => *s,
        Reply::Close => 0,
    };
    lock(&shared.seen).push(Seen {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body,
        status,
    });
}
