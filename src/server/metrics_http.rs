//! A minimal HTTP/1.1 endpoint for Prometheus and load balancers: `GET /metrics` answers the
//! text exposition, `GET /healthz` 200 while the process answers at all, `GET /readyz` 200
//! while it takes new work and 503 (with the reason) once it drains; anything else is 404
//! (or 405 for other methods). One request per connection, heads bounded in size and time,
//! so a scraper cannot hold the service up.
//!
//! Why HTTP probes and not `grpc.health.v1`: HAProxy (deploy/haproxy.cfg) checks backends
//! over HTTP, not gRPC, and the listener stays up while the host drains, so a balancer sees
//! "not ready" (and stops sending) rather than a refused connection it may retry.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

const MAX_HEAD_BYTES: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the process takes new work: `Err(reason)` when it does not (e.g. draining).
pub type Readiness = Result<(), String>;

/// What the endpoint answers from.
struct Probes<R, Q> {
    render: R,
    ready: Q,
}

/// Serves `render()` at `/metrics` and `ready()` at `/readyz` on `listener` until
/// `shutdown` completes.
pub async fn serve<R, Q>(
    listener: TcpListener,
    render: R,
    ready: Q,
    shutdown: impl Future<Output = ()>,
) where
    R: Fn() -> String + Send + Sync + 'static,
    Q: Fn() -> Readiness + Send + Sync + 'static,
{
    let probes = Arc::new(Probes { render, ready });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let probes = Arc::clone(&probes);
                    tokio::spawn(async move {
                        if let Err(e) = tokio::time::timeout(IO_TIMEOUT, answer(stream, &*probes)).await {
                            debug!(%peer, error = %e, "metrics request timed out");
                        }
                    });
                }
                Err(e) => {
                    debug!(error = %e, "accepting a metrics connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn answer<R, Q>(mut stream: TcpStream, probes: &Probes<R, Q>)
where
    R: Fn() -> String,
    Q: Fn() -> Readiness,
{
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    // A probe may carry a query string (`/readyz?verbose`); it changes nothing.
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let (status, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", (probes.render)()),
        (b"GET", b"/healthz") => ("200 OK", "ok\n".to_owned()),
        (b"GET", b"/readyz") => match (probes.ready)() {
            Ok(()) => ("200 OK", "ready\n".to_owned()),
            Err(reason) => ("503 Service Unavailable", format!("not ready: {reason}\n")),
        },
        (b"GET", _) => (
            "404 Not Found",
            "not found; try /metrics, /healthz or /readyz\n".to_owned(),
        ),
        _ => ("405 Method Not Allowed", "only GET\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_metrics_and_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, || "m 1\n".to_owned(), || Ok(()), async {
            let _ = stopped.await;
        }));
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nm 1\n"), "{ok}");
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn healthz_always_readyz_follows_the_host() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let draining = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&draining);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            String::new,
            move || {
                if d.load(Ordering::SeqCst) {
                    Err("draining".to_owned())
                } else {
                    Ok(())
                }
            },
            async {
                let _ = stopped.await;
            },
        ));
        let h = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            h.starts_with("HTTP/1.1 200 OK\r\n") && h.ends_with("ok\n"),
            "{h}"
        );
        let r = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("ready\n"),
            "{r}"
        );
        draining.store(true, Ordering::SeqCst);
        let r = get(addr, "GET /readyz?verbose HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(r.ends_with("not ready: draining\n"), "{r}");
        // Alive while draining: only readiness changes.
        let h = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
