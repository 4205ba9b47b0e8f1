//! A fake cloud-hypervisor: its REST API on a unix socket, its event monitor and its serial
//! output, strict wherever the real one is strict (see docs/architecture.md on cloud-hypervisor's API).
//! Include with `#[path = "support/ch_fake.rs"] mod ch_fake;`.
//!
//! It parses `vm.create` bodies with its own structs, written from the contract and not shared
//! with the crate, so a wrong field name or enum case in the crate fails here. It validates
//! at `vm.boot`, not at `vm.create`, like the real one.
//!
//! Used in two ways: in-process ([`FakeVmm::start`]) to test the API client, and inside a whole
//! fake `cloud-hypervisor` executable (`ch_fake_exe.rs`) that the backend launches, so its
//! lifecycle is tested end to end without KVM.
#![allow(
    dead_code,
    reason = "each test crate uses a different subset of the helpers"
)]

use serde::Deserialize;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// The real limit on a request body.
pub const MAX_BODY: u64 = 4 << 20;
const MAX_HEAD: usize = 16 << 10;
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

// ---- vm.create bodies, from the contract ----

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmConfig {
    payload: Payload,
    #[serde(default)]
    cpus: Option<Cpus>,
    #[serde(default)]
    memory: Option<Memory>,
    #[serde(default)]
    fs: Option<Vec<Fs>>,
    #[serde(default)]
    vsock: Option<Vsock>,
    #[serde(default)]
    disks: Option<Vec<Disk>>,
    #[serde(default)]
    net: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    serial: Option<Console>,
    #[serde(default)]
    console: Option<Console>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(default)]
    kernel: Option<PathBuf>,
    #[serde(default)]
    firmware: Option<PathBuf>,
    #[serde(default)]
    initramfs: Option<PathBuf>,
    #[serde(default)]
    cmdline: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cpus {
    boot_vcpus: u32,
    max_vcpus: u32,
    #[serde(default = "yes")]
    nested: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Memory {
    size: u64,
    #[serde(default)]
    shared: bool,
    #[serde(default)]
    hugepages: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fs {
    tag: String,
    socket: PathBuf,
    #[serde(default = "one")]
    num_queues: u32,
    #[serde(default = "queue_1024")]
    queue_size: u16,
    #[serde(default)]
    id: Option<String>,
}

fn one() -> u32 {
    1
}

fn queue_1024() -> u16 {
    1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vsock {
    cid: u32,
    socket: PathBuf,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Disk {
    path: PathBuf,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    image_type: Option<ImageType>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum ImageType {
    Raw,
    Qcow2,
    FixedVhd,
    Vhdx,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Console {
    mode: Mode,
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
enum Mode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

// ---- state ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VmState {
    Created,
    Running,
    Shutdown,
}

struct Vm {
    raw: serde_json::Value,
    config: VmConfig,
    state: VmState,
    guest: Option<tokio::task::JoinHandle<()>>,
    vsock: Option<(UnixListener, PathBuf)>,
}

struct Shared {
    options: Options,
    vm: Mutex<Option<Vm>>,
    seen: Mutex<Vec<Seen>>,
    /// Set to the exit code when the process should exit.
    exit: watch::Sender<Option<i32>>,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What to do with a request.
enum Reply {
    /// Status and optional JSON body.
    Status(u16, Option<String>),
    /// Close the connection without answering.
    Close,
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

async fn read_head(reader: &mut BufReader<UnixStream>) -> Result<Option<Head>, Reply> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = (&mut *reader)
            .take((MAX_HEAD - total + 1) as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|_| Reply::Close)?;
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(Reply::Close)
            };
        }
        total += n;
        if total > MAX_HEAD {
            return Err(bad("request head too large"));
        }
        if !line.ends_with(b"\r\n") {
            return Err(bad("header lines must end with CRLF"));
        }
        line.truncate(line.len() - 2);
        if line.is_empty() {
            break;
        }
        lines.push(String::from_utf8(line).map_err(|_| bad("header is not UTF-8"))?);
    }
    let request_line = lines.first().ok_or_else(|| bad("empty request"))?;
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, path, version] = parts[..] else {
        return Err(bad("malformed request line"));
    };
    if version != "HTTP/1.1" {
        return Err(bad("only HTTP/1.1"));
    }
    let mut headers = Vec::new();
    for line in &lines[1..] {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("malformed header"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(Some(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
    }))
}

/// Checks the body framing; the body length.
fn framing(head: &Head) -> Result<u64, Reply> {
    if !head.header("transfer-encoding").is_empty() {
        return Err(bad("chunked bodies are not supported"));
    }
    let lengths = head.header("content-length");
    match (head.method.as_str(), lengths.as_slice()) {
        ("PUT", []) => Err(Reply::Status(411, Some(chain(&["Length Required"], false)))),
        (_, []) => Ok(0),
        (_, [one]) => {
            let length: u64 = one.parse().map_err(|_| bad("bad Content-Length"))?;
            if length > MAX_BODY {
                return Err(Reply::Status(
                    413,
                    Some(chain(&["Payload Too Large"], false)),
                ));
            }
            Ok(length)
        }
        _ => Err(bad("more than one Content-Length")),
    }
}

fn bad(why: &str) -> Reply {
    Reply::Status(400, Some(chain(&["Bad Request", why], false)))
}

fn chain(parts: &[&str], legacy: bool) -> String {
    if legacy {
        parts.join(": ")
    } else {
        serde_json::to_string(parts).unwrap_or_default()
    }
}

async fn write_reply(
    stream: &mut UnixStream,
    reply: &Reply,
    shared: &Shared,
) -> std::io::Result<()> {
    let Reply::Status(status, body) = reply else {
        return Ok(());
    };
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        _ => "Internal Server Error",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\nServer: Cloud Hypervisor API\r\n");
    match body {
        Some(body) => {
            // Error chains become plain text for "old" versions.
            let body = if *status >= 400 && shared.options.legacy_errors {
                serde_json::from_str::<Vec<String>>(body)
                    .map(|c| c.join(": "))
                    .unwrap_or_else(|_| body.clone())
            } else {
                body.clone()
            };
            out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        }
        None if *status == 204 => out.push_str("\r\n"),
        None => out.push_str("Content-Length: 0\r\n\r\n"),
    }
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await
}

fn api_error(status: u16, parts: &[&str]) -> Reply {
    let mut all = vec!["Error from API"];
    all.extend_from_slice(parts);
    Reply::Status(status, Some(chain(&all, false)))
}

fn route(shared: &Arc<Shared>, head: &Head, body: &[u8]) -> Reply {
    let Some(endpoint) = head.path.strip_prefix("/api/v1/") else {
        return Reply::Status(404, Some(chain(&["Not Found"], false)));
    };
    let get = match endpoint {
        "vmm.ping" | "vm.info" | "vm.counters" => true,
        "vm.create" | "vm.boot" | "vm.shutdown" | "vm.delete" | "vm.power-button" | "vm.reboot"
        | "vmm.shutdown" => false,
        _ => return Reply::Status(404, Some(chain(&["Not Found"], false))),
    };
    let method_ok = if get {
        head.method == "GET"
    } else {
        head.method == "PUT"
    };
    if !method_ok {
        return bad("wrong method");
    }
    if get && !body.is_empty() {
        return bad("a GET has no body");
    }
    if endpoint != "vm.create" && !body.is_empty() {
        return bad("this endpoint takes no body");
    }
    match endpoint {
        "vmm.ping" => Reply::Status(
            200,
            Some(
                serde_json::json!({
                    "build_version": FAKE_VERSION,
                    "version": FAKE_VERSION,
                    "pid": std::process::id(),
                    "features": ["kvm"],
                })
                .to_string(),
            ),
        ),
        "vm.create" => create(shared, body),
        "vm.boot" => boot(shared),
        "vm.shutdown" => shutdown_vm(shared),
        "vm.delete" => {
            let mut vm = lock(&shared.vm);
            match vm.take() {
                Some(mut old) => {
                    if let Some(task) = old.guest.take() {
                        task.abort();
                    }
                    if let Some((_, path)) = old.vsock.take() {
                        let _ = std::fs::remove_file(path);
                    }
                    drop(vm);
                    emit(shared, "vm", "deleted");
                    Reply::Status(204, None)
                }
                None => api_error(404, &["The VM is not created"]),
            }
        }
        "vm.info" => match lock(&shared.vm).as_ref() {
            Some(vm) => Reply::Status(
                200,
                Some(
                    serde_json::json!({
                        "config": vm.raw,
                        "state": match vm.state {
                            VmState::Created => "Created",
                            VmState::Running => "Running",
                            VmState::Shutdown => "Shutdown",
                        },
                        "memory_actual_size": vm.config.memory.as_ref().map_or(512 << 20, |m| m.size),
                    })
                    .to_string(),
                ),
            ),
            None => api_error(404, &["The VM is not created"]),
        },
        "vmm.shutdown" => {
            if lock(&shared.vm).as_ref().is_some_and(|vm| vm.state == VmState::Running) {
                emit(shared, "vm", "shutdown");
            }
            emit(shared, "vm", "deleted");
            emit(shared, "vmm", "shutdown");
            match shared.options.vmm_shutdown {
                VmmShutdown::Reply => {
                    shared.exit.send_replace(Some(0));
                    Reply::Status(200, None)
                }
                VmmShutdown::CloseWithoutReply => {
                    shared.exit.send_replace(Some(0));
                    Reply::Close
                }
                VmmShutdown::Ignore => Reply::Status(200, None),
            }
        }
        _ => api_error(500, &["not implemented by the fake"]),
    }
}

fn create(shared: &Arc<Shared>, body: &[u8]) -> Reply {
    if body.is_empty() {
        return bad("vm.create needs a body");
    }
    let raw: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Reply::Status(
                400,
                Some(chain(
                    &["Failed to deserialize JSON", &e.to_string()],
                    false,
                )),
            )
        }
    };
    let config: VmConfig = match serde_json::from_value(raw.clone()) {
        Ok(c) => c,
        Err(e) => {
            return Reply::Status(
                400,
                Some(chain(
                    &["Failed to deserialize JSON", &e.to_string()],
                    false,
                )),
            )
        }
    };
    let mut vm = lock(&shared.vm);
    if vm.is_some() {
        return api_error(500, &["The VM is already created"]);
    }
    *vm = Some(Vm {
        raw,
        config,
        state: VmState::Created,
        guest: None,
        vsock: None,
    });
    Reply::Status(204, None)
}

/// cloud-hypervisor's boot-time validation, for the fields the contract names.
fn validate(config: &VmConfig) -> Result<(), Reply> {
    let invalid =
        |why: &str| api_error(400, &["Error booting VM", "Invalid VM configuration", why]);
    let p = &config.payload;
    match (&p.kernel, &p.firmware) {
        (Some(_), Some(_)) => return Err(invalid("Both kernel and firmware given")),
        (None, None) => return Err(invalid("No kernel or firmware given")),
        _ => {}
    }
    for path in p.kernel.iter().chain(&p.initramfs) {
        if !path.is_file() {
            return Err(api_error(
                500,
                &[
                    "Error booting VM",
                    &format!("Cannot open {}", path.display()),
                ],
            ));
        }
    }
    let boot_vcpus = config.cpus.as_ref().map_or(1, |c| c.boot_vcpus);
    if let Some(cpus) = &config.cpus {
        if cpus.boot_vcpus == 0 || cpus.max_vcpus < cpus.boot_vcpus {
            return Err(invalid("Max vCPUs lower than boot vCPUs"));
        }
    }
    let shared_memory = config
        .memory
        .as_ref()
        .is_some_and(|m| m.shared || m.hugepages);
    let mut ids = BTreeSet::new();
    let mut id = |id: &Option<String>| -> Result<(), Reply> {
        if let Some(id) = id {
            if id.starts_with("__") {
                return Err(invalid(&format!("Identifier {id} is not valid")));
            }
            if !ids.insert(id.clone()) {
                return Err(api_error(
                    409,
                    &[
                        "Error booting VM",
                        "Invalid VM configuration",
                        &format!("Identifier {id} is not unique"),
                    ],
                ));
            }
        }
        Ok(())
    };
    for fs in config.fs.iter().flatten() {
        if !shared_memory {
            return Err(invalid(
                "Using vhost-user requires using shared memory or huge pages",
            ));
        }
        if fs.num_queues == 0 || fs.num_queues > boot_vcpus {
            return Err(invalid(
                "Number of queues to virtio_fs greater than number of vCPUs",
            ));
        }
        if !fs.queue_size.is_power_of_two() {
            return Err(invalid("Queue size is not a power of two"));
        }
        id(&fs.id)?;
    }
    if let Some(vsock) = &config.vsock {
        if [0, 1, 2, u32::MAX].contains(&vsock.cid) {
            return Err(invalid(&format!("{} is a special VSOCK CID", vsock.cid)));
        }
        id(&vsock.id)?;
    }
    for disk in config.disks.iter().flatten() {
        id(&disk.id)?;
    }
    for console in config.serial.iter().chain(&config.console) {
        if console.mode == Mode::File && console.file.is_none() {
            return Err(invalid("Path missing when using file console mode"));
        }
        if console.mode == Mode::Socket && console.socket.is_none() {
            return Err(invalid("Path missing when using socket console mode"));
        }
    }
    Ok(())
}

fn boot(shared: &Arc<Shared>) -> Reply {
    let mut guard = lock(&shared.vm);
    let Some(vm) = guard.as_mut() else {
        return api_error(404, &["The VM is not created"]);
    };
    if vm.state == VmState::Running {
        return api_error(500, &["Error booting VM", "VM is already running"]);
    }
    if let Err(reply) = validate(&vm.config) {
        return reply;
    }
    for fs in vm.config.fs.iter().flatten() {
        if let Err(e) = std::os::unix::net::UnixStream::connect(&fs.socket) {
            return api_error(
                500,
                &[
                    "Error booting VM",
                    "Error creating device manager",
                    &format!(
                        "Failed connecting the vhost-user backend at {}: {e}",
                        fs.socket.display()
                    ),
                ],
            );
        }
    }
    for disk in vm.config.disks.iter().flatten() {
        if !disk.path.is_file() {
            return api_error(
                500,
                &[
                    "Error booting VM",
                    "Cannot open disk",
                    &disk.path.display().to_string(),
                ],
            );
        }
    }
    if let Some(vsock) = &vm.config.vsock {
        // The real one binds this path at boot and fails if anything is there.
        match std::os::unix::net::UnixListener::bind(&vsock.socket) {
            Ok(l) => {
                let _ = l.set_nonblocking(true);
                match UnixListener::from_std(l) {
                    Ok(l) => vm.vsock = Some((l, vsock.socket.clone())),
                    Err(e) => return api_error(500, &["Error booting VM", &e.to_string()]),
                }
            }
            Err(e) => {
                return api_error(
                    500,
                    &[
                        "Error booting VM",
                        "Cannot create virtio-vsock device",
                        &e.to_string(),
                    ],
                )
            }
        }
    }
    vm.state = VmState::Running;
    let serial = Serial::open(&vm.config, &shared.options);
    let config = vm.config.clone();
    drop(guard);
    emit(shared, "vm", "booting");
    emit(shared, "vm", "booted");
    let task = tokio::spawn(run_guest(shared.clone(), config, serial));
    if let Some(vm) = lock(&shared.vm).as_mut() {
        vm.guest = Some(task);
    }
    Reply::Status(204, None)
}

fn shutdown_vm(shared: &Arc<Shared>) -> Reply {
    let mut guard = lock(&shared.vm);
    let Some(vm) = guard.as_mut() else {
        return api_error(404, &["The VM is not created"]);
    };
    if vm.state != VmState::Running {
        return api_error(500, &["Error shutting down VM", "VM is not running"]);
    }
    if let Some(task) = vm.guest.take() {
        task.abort();
    }
    vm.state = VmState::Shutdown;
    drop(guard);
    emit(shared, "vm", "shutdown");
    Reply::Status(204, None)
}

/// Where the fake guest's serial output goes.
enum Serial {
    Discard,
    File(std::fs::File),
}

impl Serial {
    fn open(config: &VmConfig, options: &Options) -> Serial {
        let serial = config.serial.as_ref().map_or(Mode::Null, |s| s.mode);
        let file = match serial {
            // Truncated at boot, as the real one does.
            Mode::File => config
                .serial
                .as_ref()
                .and_then(|s| s.file.as_ref())
                .and_then(|f| std::fs::File::create(f).ok()),
            Mode::Tty => options.stdout.as_ref().and_then(|p| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
                    .ok()
            }),
            _ => None,
        };
        file.map_or(Serial::Discard, Serial::File)
    }

    fn line(&mut self, text: &str) {
        if let Serial::File(f) = self {
            let _ = writeln!(f, "{text}");
        }
    }
}

async fn run_guest(shared: Arc<Shared>, config: VmConfig, mut serial: Serial) {
    let cmdline = config.payload.cmdline.clone().unwrap_or_default();
    serial.line(&format!("fake guest: cmdline={cmdline}"));
    let cpus = config.cpus.clone().unwrap_or(Cpus {
        boot_vcpus: 1,
        max_vcpus: 1,
        nested: true,
    });
    let memory = config.memory.clone().unwrap_or(Memory {
        size: 512 << 20,
        shared: false,
        hugepages: false,
    });
    let tags: Vec<_> = config.fs.iter().flatten().map(|f| f.tag.clone()).collect();
    serial.line(&format!(
        "fake guest: vcpus={} nested={} memory={} shared={} fs={} vsock={} disks={} net={}",
        cpus.boot_vcpus,
        cpus.nested,
        memory.size,
        memory.shared,
        tags.join(","),
        config.vsock.as_ref().map_or(0, |v| v.cid),
        config.disks.as_ref().map_or(0, Vec::len),
        config.net.as_ref().map_or(0, Vec::len),
    ));
    if !cmdline.contains("console=ttyS0") {
        // Without it a real kernel prints nothing to the serial port.
        return;
    }
    match shared.options.guest.clone() {
        Guest::PowerOff(after) => {
            tokio::time::sleep(after).await;
            serial.line("fake guest: powering off");
            power_off(&shared);
        }
        Guest::Reboot(after) => loop {
            tokio::time::sleep(after).await;
            serial.line("fake guest: rebooting");
            emit(&shared, "vm", "rebooting");
            emit(&shared, "vm", "rebooted");
        },
        Guest::Run => std::future::pending().await,
        Guest::DialVsock(port) => {
            let Some(vsock) = &config.vsock else {
                serial.line("fake guest: no vsock device");
                return power_off(&shared);
            };
            let mut path = vsock.socket.clone().into_os_string();
            path.push(format!("_{port}"));
            match UnixStream::connect(&path).await {
                Ok(stream) => {
                    let mut stream = BufReader::new(stream);
                    let _ = stream.get_mut().write_all(b"hello-from-fake-guest\n").await;
                    let mut reply = String::new();
                    let _ = stream.read_line(&mut reply).await;
                    serial.line(&format!("fake guest: reply: {}", reply.trim_end()));
                }
                Err(e) => serial.line(&format!("fake guest: vsock connect failed: {e}")),
            }
            power_off(&shared);
        }
    }
}

fn power_off(shared: &Shared) {
    emit(shared, "vm", "shutdown");
    emit(shared, "vm", "deleted");
    emit(shared, "vmm", "shutdown");
    shared.exit.send_replace(Some(0));
}

/// Appends an event as cloud-hypervisor does: pretty JSON, then a blank line, in two writes.
fn emit(shared: &Shared, source: &str, event: &str) {
    let Some(path) = &shared.options.events else {
        return;
    };
    let since = START.get_or_init(std::time::Instant::now).elapsed();
    let value = serde_json::json!({
        "timestamp": {"secs": since.as_secs(), "nanos": since.subsec_nanos()},
        "source": source,
        "event": event,
        "properties": null,
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = f.write_all(
            serde_json::to_string_pretty(&value)
                .unwrap_or_default()
                .as_bytes(),
        );
        let _ = f.write_all(b"\n\n");
    }
}

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
