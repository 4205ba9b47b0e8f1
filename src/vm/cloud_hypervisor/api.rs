//! A client for cloud-hypervisor's REST API on its unix socket.
//!
//! HTTP library: reqwest, without default features (no TLS stack, no proxies to honour)
//! and set up for what cloud-hypervisor expects of a client:
//! - no connection pool (`pool_max_idle_per_host(0)`): each call is one connection carrying
//!   one request. cloud-hypervisor answers one request at a time and drops the reply to
//!   `vmm.shutdown` when it exits; a pooled connection would be retried or mistaken for a
//!   stale one;
//! - `Content-Length` set explicitly on every PUT (0 when there is no body), no body and no
//!   `Content-Length` on GETs, and bodies always of a known length, so never chunked;
//! - "the connection closed before a reply" is recognised from the error's source chain
//!   ([`ApiError::is_disconnect`]).
//!
//! Replies are bounded ([`MAX_RESPONSE_BYTES`]) and so is every call (a timeout per call).
//! Error bodies come in two forms: a JSON array of strings (the error chain, v47+) or plain
//! text (older); both become [`ApiError::Status`] with the HTTP status and the chain.

use bytes::{Bytes, BytesMut};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::VmConfig;

/// The most a request body may be (cloud-hypervisor's limit).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The most of a reply this client reads.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// The most of an error body kept in an error.
const MAX_ERROR_TEXT: usize = 4096;
/// The API's base path.
const BASE: &str = "/api/v1/";

/// Errors talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The HTTP client could not be set up.
    #[error("setting up an HTTP client for the cloud-hypervisor API at {path}")]
    Client {
        /// The socket.
        path: PathBuf,
        /// Why (shared: the client is built once and every call reports it).
        #[source]
        source: std::sync::Arc<reqwest::Error>,
    },
    /// The socket could not be reached.
    #[error("connecting to the cloud-hypervisor API at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The HTTP exchange failed (including the connection closing before a reply).
    #[error("{endpoint}: HTTP exchange failed")]
    Http {
        /// The endpoint.
        endpoint: &'static str,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// No complete reply in time.
    #[error("{endpoint}: no reply within {after:?}")]
    Timeout {
        /// The endpoint.
        endpoint: &'static str,
        /// The limit.
        after: Duration,
    },
    /// cloud-hypervisor refused the request.
    #[error("{endpoint}: cloud-hypervisor answered {status}: {}", chain_text(.chain))]
    Status {
        /// The endpoint.
        endpoint: &'static str,
        /// The HTTP status.
        status: u16,
        /// Its error chain, outermost first (possibly empty).
        chain: Vec<String>,
    },
    /// The reply broke off.
    #[error("{endpoint}: reading the reply")]
    Body {
        /// The endpoint.
        endpoint: &'static str,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The reply is longer than [`MAX_RESPONSE_BYTES`].
    #[error("{endpoint}: the reply exceeds {MAX_RESPONSE_BYTES} bytes")]
    ReplyTooLarge {
        /// The endpoint.
        endpoint: &'static str,
    },
    /// A reply body that should be JSON of a known shape is not.
    #[error("{endpoint}: unexpected reply body")]
    Decode {
        /// The endpoint.
        endpoint: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be encoded.
    #[error("{endpoint}: encoding the request")]
    Encode {
        /// The endpoint.
        endpoint: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The request body is over cloud-hypervisor's limit.
    #[error("{endpoint}: request body of {len} bytes exceeds {MAX_REQUEST_BYTES}")]
    RequestTooLarge {
        /// The endpoint.
        endpoint: &'static str,
        /// Its size.
        len: usize,
    },
}

fn chain_text(chain: &[String]) -> String {
    if chain.is_empty() {
        "(no details)".to_owned()
    } else {
        chain.join(": ")
    }
}

/// What hyper (under reqwest) says when the peer closed the connection before a complete
/// reply: it carries no `io::Error`, so its text is how the chain shows it. The test that a
/// reply lost to `vmm.shutdown` counts as success guards this against a change of wording.
const CLOSED_BEFORE_REPLY: &str = "connection closed before message completed";

impl ApiError {
    /// The peer went away: refused or reset connection, or a reply cut off. After
    /// `vmm.shutdown` this is success (cloud-hypervisor exits and may drop the reply).
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        let source: &(dyn std::error::Error + 'static) = match self {
            ApiError::Connect { source, .. } | ApiError::Http { source, .. } => source,
            ApiError::Body { source, .. } => source,
            _ => return false,
        };
        let mut cause = Some(source);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    NotFound | ConnectionRefused | ConnectionReset | BrokenPipe | UnexpectedEof
                ) {
                    return true;
                }
            }
            if e.to_string() == CLOSED_BEFORE_REPLY {
                return true;
            }
            cause = e.source();
        }
        false
    }
}

/// Splits an error body into the chain it carries: a JSON array of strings (v47+), a JSON
/// string, or plain text (older versions), bounded and trimmed.
pub fn parse_error_body(body: &[u8]) -> Vec<String> {
    if let Ok(chain) = serde_json::from_slice::<Vec<String>>(body) {
        return chain.into_iter().map(bounded).collect();
    }
    if let Ok(text) = serde_json::from_slice::<String>(body) {
        return vec![bounded(text)];
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        Vec::new()
    } else {
        vec![bounded(text.to_owned())]
    }
}

fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// The reply to `vmm.ping`. Only `version` is guaranteed; the shape grows between releases,
/// so other fields are optional and unknown ones accepted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmmPing {
    /// The release, e.g. `v48.0.0` (or `v48.0.0-dirty`).
    pub version: String,
    /// The exact build.
    #[serde(default)]
    pub build_version: Option<String>,
    /// The VMM's pid.
    #[serde(default)]
    pub pid: Option<i64>,
    /// Compiled-in features.
    #[serde(default)]
    pub features: Option<Vec<String>>,
}

impl VmmPing {
    /// The major version (`v48.0.0` -> 48), if the string has one.
    pub fn major(&self) -> Option<u32> {
        let digits: String = self
            .version
            .trim_start_matches('v')
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }
}

/// The VM's state in `vm.info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmState {
    /// Created, not booted.
    Created,
    /// Running.
    Running,
    /// Shut down (the process stays).
    Shutdown,
    /// Paused.
    Paused,
    /// Stopped at a debugger breakpoint.
    BreakPoint,
}

/// The parts of `vm.info` this crate reads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmInfo {
    /// The state.
    pub state: VmState,
    /// The config as cloud-hypervisor holds it (with its defaults filled in).
    pub config: serde_json::Value,
}

/// Per-call time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `vmm.ping`, `vm.info`.
    pub query: Duration,
    /// `vm.create`, `vm.shutdown`, `vm.delete`, `vmm.shutdown`.
    pub action: Duration,
    /// `vm.boot`: memory allocation and vhost-user connections (which cloud-hypervisor
    /// retries for up to 60 s when a socket is not there yet).
    pub boot: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            query: Duration::from_secs(2),
            action: Duration::from_secs(10),
            boot: Duration::from_secs(30),
        }
    }
}

/// A cloud-hypervisor API endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmShutdown,
    VmDelete,
    VmPowerButton,
    VmInfo,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::VmmPing => "vmm.ping",
            Endpoint::VmmShutdown => "vmm.shutdown",
            Endpoint::VmCreate => "vm.create",
            Endpoint::VmBoot => "vm.boot",
            Endpoint::VmShutdown => "vm.shutdown",
            Endpoint::VmDelete => "vm.delete",
            Endpoint::VmPowerButton => "vm.power-button",
            Endpoint::VmInfo => "vm.info",
        }
    }

    fn method(self) -> Method {
        match self {
            Endpoint::VmmPing | Endpoint::VmInfo => Method::GET,
            _ => Method::PUT,
        }
    }
}

/// A client for one cloud-hypervisor process's API socket. Cheap to clone; holds no
/// connection between calls.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
    timeouts: Timeouts,
    http: Result<reqwest::Client, std::sync::Arc<reqwest::Error>>,
}

impl ApiClient {
    /// A client for the API at `socket`. A client that cannot be set up (reqwest found no
    /// usable resolver or similar) reports that on its first call.
    pub fn new(socket: &Path, timeouts: Timeouts) -> Self {
        let http = reqwest::Client::builder()
            .unix_socket(socket.to_owned())
            // One connection per call: nothing idle is kept.
            .pool_max_idle_per_host(0)
            .http1_only()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(std::sync::Arc::new);
        ApiClient {
            socket: socket.to_owned(),
            timeouts,
            http,
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET vmm.ping`: the VMM is up; its version.
    pub async fn ping(&self) -> Result<VmmPing, ApiError> {
        self.ping_within(self.timeouts.query).await
    }

    /// [`ApiClient::ping`] with its own time limit (readiness polling uses a short one).
    pub async fn ping_within(&self, limit: Duration) -> Result<VmmPing, ApiError> {
        let body = self.call(Endpoint::VmmPing, None, limit).await?;
        decode(Endpoint::VmmPing, &body)
    }

    /// `GET vm.info`.
    pub async fn info(&self) -> Result<VmInfo, ApiError> {
        let body = self
            .call(Endpoint::VmInfo, None, self.timeouts.query)
            .await?;
        decode(Endpoint::VmInfo, &body)
    }

    /// `PUT vm.create` with `config`. cloud-hypervisor validates it only at boot.
    pub async fn create(&self, config: &VmConfig) -> Result<(), ApiError> {
        let endpoint = Endpoint::VmCreate;
        let body = serde_json::to_vec(config).map_err(|source| ApiError::Encode {
            endpoint: endpoint.name(),
            source,
        })?;
        self.call(endpoint, Some(body), self.timeouts.action)
            .await
            .map(drop)
    }

    /// `PUT vm.boot`.
    pub async fn boot(&self) -> Result<(), ApiError> {
        self.call(Endpoint::VmBoot, None, self.timeouts.boot)
            .await
            .map(drop)
    }

    /// `PUT vm.shutdown`: a hard stop of the guest; the VMM process stays.
    pub async fn shutdown_vm(&self) -> Result<(), ApiError> {
        self.call(Endpoint::VmShutdown, None, self.timeouts.action)
            .await
            .map(drop)
    }

    /// `PUT vm.delete`.
    pub async fn delete_vm(&self) -> Result<(), ApiError> {
        self.call(Endpoint::VmDelete, None, self.timeouts.action)
            .await
            .map(drop)
    }

    /// `PUT vm.power-button`: an ACPI event a minimal init may ignore.
    pub async fn power_button(&self) -> Result<(), ApiError> {
        self.call(Endpoint::VmPowerButton, None, self.timeouts.action)
            .await
            .map(drop)
    }

    /// `PUT vmm.shutdown`: the VMM exits. A connection that closes instead of replying
    /// counts as success (cloud-hypervisor may exit before its reply is written); the caller
    /// still has to wait for the process.
    pub async fn shutdown_vmm(&self) -> Result<(), ApiError> {
        match self
            .call(Endpoint::VmmShutdown, None, self.timeouts.action)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_disconnect() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn call(
        &self,
        endpoint: Endpoint,
        body: Option<Vec<u8>>,
        limit: Duration,
    ) -> Result<Bytes, ApiError> {
        let name = endpoint.name();
        match tokio::time::timeout(limit, self.exchange(endpoint, body)).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::Timeout {
                endpoint: name,
                after: limit,
            }),
        }
    }

    /// One connection, one request, one reply.
    async fn exchange(&self, endpoint: Endpoint, body: Option<Vec<u8>>) -> Result<Bytes, ApiError> {
        let name = endpoint.name();
        let method = endpoint.method();
        if let Some(body) = &body {
            if body.len() > MAX_REQUEST_BYTES {
                return Err(ApiError::RequestTooLarge {
                    endpoint: name,
                    len: body.len(),
                });
            }
        }
        let http = self.http.as_ref().map_err(|e| ApiError::Client {
            path: self.socket.clone(),
            source: std::sync::Arc::clone(e),
        })?;
        // The host part only fills the Host header; the socket is the destination.
        let mut request = http.request(method.clone(), format!("http://localhost{BASE}{name}"));
        request = match body {
            Some(body) => request
                .header(CONTENT_TYPE, "application/json")
                .header(CONTENT_LENGTH, body.len())
                .body(body),
            None if method == Method::PUT => request.header(CONTENT_LENGTH, 0).body(Vec::new()),
            None => request,
        };
        let mut response = request.send().await.map_err(|source| {
            if source.is_connect() {
                ApiError::Connect {
                    path: self.socket.clone(),
                    source,
                }
            } else {
                ApiError::Http {
                    endpoint: name,
                    source,
                }
            }
        })?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        {
            return Err(ApiError::ReplyTooLarge { endpoint: name });
        }
        let mut bytes = BytesMut::new();
        while let Some(chunk) = response.chunk().await.map_err(|source| ApiError::Body {
            endpoint: name,
            source,
        })? {
            if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(ApiError::ReplyTooLarge { endpoint: name });
            }
            bytes.extend_from_slice(&chunk);
        }
        let bytes = bytes.freeze();
        if status.is_success() {
            let expected_body = matches!(endpoint, Endpoint::VmmPing | Endpoint::VmInfo);
            if expected_body && status != StatusCode::OK {
                return Err(ApiError::Status {
                    endpoint: name,
                    status: status.as_u16(),
                    chain: vec!["expected 200 with a body".to_owned()],
                });
            }
            Ok(bytes)
        } else {
            Err(ApiError::Status {
                endpoint: name,
                status: status.as_u16(),
                chain: parse_error_body(&bytes),
            })
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|source| ApiError::Decode {
        endpoint: endpoint.name(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_in_both_forms() {
        assert_eq!(
            parse_error_body(
                br#"["Error from API","The VM could not boot","Invalid VM configuration"]"#
            ),
            [
                "Error from API",
                "The VM could not boot",
                "Invalid VM configuration"
            ]
        );
        assert_eq!(
            parse_error_body(b"VmBoot(VmConfigValidation(VhostUserRequiresSharedMemory))\n"),
            ["VmBoot(VmConfigValidation(VhostUserRequiresSharedMemory))"]
        );
        assert_eq!(parse_error_body(br#""quoted""#), ["quoted"]);
        assert!(parse_error_body(b"  ").is_empty());
        let long = parse_error_body(&vec![b'x'; 10_000]);
        assert_eq!(long[0].len(), MAX_ERROR_TEXT + 3);
    }

    #[test]
    fn status_errors_show_status_and_chain() {
        let e = ApiError::Status {
            endpoint: "vm.boot",
            status: 500,
            chain: vec!["Error from API".into(), "boom".into()],
        };
        assert_eq!(
            e.to_string(),
            "vm.boot: cloud-hypervisor answered 500: Error from API: boom"
        );
    }

    #[test]
    fn ping_versions() {
        let ping: VmmPing = serde_json::from_str(
            r#"{"build_version":"v48.0.0-12-gabc","version":"v48.0.0","pid":7,"features":["kvm"],"later":true}"#,
        )
        .expect("parse");
        assert_eq!(ping.major(), Some(48));
        let bare: VmmPing = serde_json::from_str(r#"{"version":"41.0"}"#).expect("parse");
        assert_eq!(bare.major(), Some(41));
        assert!(
            serde_json::from_str::<VmmPing>(r#"{"pid":1}"#).is_err(),
            "version is required"
        );
    }

    /// A server that answers every request on a connection with `reply` and keeps the
    /// connection open; returns the number of connections it accepted.
    fn keep_alive_server(
        socket: &Path,
        reply: &'static [u8],
    ) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match stream.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line == "\r\n" => {
                                if stream.get_mut().write_all(reply).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                        }
                    }
                });
            }
        });
        accepted
    }

    #[tokio::test]
    async fn every_call_opens_its_own_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let accepted = keep_alive_server(
            &socket,
            b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\n{\"version\":\"v1\"}",
        );
        let client = ApiClient::new(&socket, Timeouts::default());
        for _ in 0..3 {
            assert_eq!(client.ping().await.expect("ping").version, "v1");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn replies_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        // Announced as too long: refused before reading it.
        keep_alive_server(
            &socket,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1048577\r\n\r\n",
        );
        let err = ApiClient::new(&socket, Timeouts::default())
            .ping()
            .await
            .expect_err("too long");
        assert!(matches!(err, ApiError::ReplyTooLarge { .. }), "{err}");

        // Chunked without an announced length: refused once the limit is passed.
        let socket = dir.path().join("chunked.sock");
        let chunk = format!("{:x}\r\n{}\r\n", 600_000, "x".repeat(600_000));
        let reply =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n");
        keep_alive_server(&socket, Box::leak(reply.into_bytes().into_boxed_slice()));
        let err = ApiClient::new(&socket, Timeouts::default())
            .ping()
            .await
            .expect_err("too long");
        assert!(matches!(err, ApiError::ReplyTooLarge { .. }), "{err}");
    }

    /// A server that reads one request's head, writes `reply` and closes the connection.
    fn reply_then_close(socket: &Path, reply: &'static [u8]) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::UnixListener::bind(socket).expect("bind");
        tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            while stream.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                if line.ends_with("\r\n\r\n") || line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let _ = stream.get_mut().write_all(reply).await;
        });
    }

    #[tokio::test]
    async fn only_a_closed_connection_ends_vmm_shutdown_well() {
        let dir = tempfile::tempdir().expect("tempdir");
        let closed = dir.path().join("closed.sock");
        let garbled = dir.path().join("garbled.sock");
        reply_then_close(&closed, b"");
        reply_then_close(&garbled, b"HTTP/1.1 2xx nonsense\r\n\r\n");
        ApiClient::new(&closed, Timeouts::default())
            .shutdown_vmm()
            .await
            .expect("closed without a reply: the VMM is exiting");
        let err = ApiClient::new(&garbled, Timeouts::default())
            .shutdown_vmm()
            .await
            .expect_err("a garbled reply is no success");
        assert!(
            matches!(err, ApiError::Http { .. }) && !err.is_disconnect(),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_disconnect() {
        let client = ApiClient::new(Path::new("/nonexistent/ch.sock"), Timeouts::default());
        let err = client.ping().await.expect_err("no socket");
        assert!(
            matches!(err, ApiError::Connect { .. }) && err.is_disconnect(),
            "{err}"
        );
        client
            .shutdown_vmm()
            .await
            .expect("a VMM that is gone is shut down");
    }
}
