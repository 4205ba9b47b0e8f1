//! The fake's HTTP/1.1 framing, as strict as cloud-hypervisor's: CRLF header lines, a
//! bounded head, `Content-Length` required on every PUT, no chunked bodies, bodies up to
//! [`MAX_BODY`](super::MAX_BODY); replies with the real server's headers and, for the old
//! releases, plain-text error chains.

use super::{Shared, MAX_BODY};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The most bytes a request head may have.
const MAX_HEAD: usize = 16 << 10;

/// A parsed request head.
pub(super) struct Head {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) headers: Vec<(String, String)>,
}

impl Head {
    pub(super) fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What to do with a request.
pub(super) enum Reply {
    /// Status and optional JSON body.
    Status(u16, Option<String>),
    /// Close the connection without answering.
    Close,
}

pub(super) async fn read_head(reader: &mut BufReader<UnixStream>) -> Result<Option<Head>, Reply> {
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
pub(super) fn framing(head: &Head) -> Result<u64, Reply> {
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

pub(super) fn bad(why: &str) -> Reply {
    Reply::Status(400, Some(chain(&["Bad Request", why], false)))
}

pub(super) fn chain(parts: &[&str], legacy: bool) -> String {
    if legacy {
        parts.join(": ")
    } else {
        serde_json::to_string(parts).unwrap_or_default()
    }
}

pub(super) async fn write_reply(
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
