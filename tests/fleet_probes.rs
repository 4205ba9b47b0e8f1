//! The load balancer's probes on a real `serve` process: `/healthz` and `/readyz` on the
//! metrics listener; once the process drains (SIGTERM with a request still in flight) it is
//! alive but not ready, so HAProxy stops sending it new work (deploy/haproxy.cfg).

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failure should fail the test"
)]

mod support;

use bytes::Bytes;
use std::time::{Duration, Instant};
use support::serve::{free_port, http_probe, Listen, Serve};
use tvix_build_vm::proto::castore as pb;

/// `GET <path>` on the metrics listener: the status line and the body.
#[tokio::test]
async fn a_draining_host_is_alive_but_not_ready() {
    let store = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut server = Serve::castore(
        &[
            "--store",
            store.path().to_str().unwrap(),
            "--metrics-listen",
            &metrics,
        ],
        Listen::Unix,
    );
    server.wait_for(
        || std::net::TcpStream::connect(&metrics).is_ok(),
        "the metrics listener",
    );
    assert_eq!(http_probe(&metrics, "/healthz").await.0, "HTTP/1.1 200 OK");
    assert_eq!(
        http_probe(&metrics, "/readyz").await,
        ("HTTP/1.1 200 OK".to_owned(), "ready\n".to_owned())
    );

    // An upload left open keeps the process draining after SIGTERM.
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::BlobChunk>(1);
    let mut client = pb::blob_service_client::BlobServiceClient::new(server.channel());
    let upload = tokio::spawn(async move {
        client
            .put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tx.send(pb::BlobChunk {
        data: Bytes::from_static(b"in flight"),
    })
    .await
    .unwrap();
    // The upload reached the server before the signal: the server logs nothing per request,
    // so give the first message time to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal(nix::sys::signal::Signal::SIGTERM);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_probe(&metrics, "/readyz").await;
        if status.starts_with("HTTP/1.1 503 ") {
            assert_eq!(body, "not ready: draining\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready after SIGTERM: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_probe(&metrics, "/healthz").await.0, "HTTP/1.1 200 OK");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "exited with an upload in flight"
    );

    // The upload ends, the process exits, and its probes go with it.
    drop(tx);
    let put = upload.await.unwrap();
    assert!(put.is_ok(), "the in-flight upload was cut: {put:?}");
    assert!(
        server.wait(Duration::from_secs(30)).success(),
        "{}",
        server.log()
    );
    assert!(tokio::net::TcpStream::connect(&metrics).await.is_err());
}
