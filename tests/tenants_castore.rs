//! Tenants on a real castore-only `serve` over real gRPC (no VMs): the per-tenant upload
//! quota (an upload that would cross it is refused with RESOURCE_EXHAUSTED and nothing of
//! it is stored, on the blob and the directory service, in the tvix and the snix package),
//! and client certificates under mutual TLS that prove nothing (expired, issued by another
//! CA, self-signed, or not a certificate at all) refused in the handshake, which the server
//! logs.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use bytes::Bytes;
use cpb::blob_service_client::BlobServiceClient;
use cpb::directory_service_client::DirectoryServiceClient;
use prost::Message;
use std::path::Path;
use std::time::Duration;
use support::serve::*;
use support::tokens::{with_token, write_tokens};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tvix_build_vm::castore::package::{Package, PackageChannel};
use tvix_build_vm::castore::B3Digest;
use tvix_build_vm::proto::castore as cpb;

/// "small" may upload 256 KiB an hour, "dirs" 4 KiB, everyone else 1 MiB.
const QUOTA_CONFIG: &str = r#"
min-free-space = "0"
[tenant-defaults]
upload-bytes-per-hour = "1M"
[tenants.small]
upload-bytes-per-hour = "256K"
[tenants.dirs]
upload-bytes-per-hour = "4K"
"#;

struct QuotaHost {
    _server: Serve,
    store: tempfile::TempDir,
    metrics: String,
    _dir: tempfile::TempDir,
    port: u16,
}

impl QuotaHost {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        write_tokens(
            &tokens,
            &[
                ("small", "tok-small"),
                ("big", "tok-big"),
                ("dirs", "tok-dirs"),
            ],
        );
        let config = dir.path().join("serve.toml");
        std::fs::write(&config, QUOTA_CONFIG).unwrap();
        let (port, metrics_port) = (free_port(), free_port());
        let metrics = format!("127.0.0.1:{metrics_port}");
        let server = Serve::castore(
            &[
                "--config",
                config.to_str().unwrap(),
                "--store",
                store.path().to_str().unwrap(),
                "--tokens",
                tokens.to_str().unwrap(),
                "--require-auth",
                "--metrics-listen",
                &metrics,
            ],
            Listen::Tcp(port),
        );
        Self {
            _server: server,
            store,
            metrics,
            _dir: dir,
            port,
        }
    }

    async fn channel(&self, package: Package) -> PackageChannel {
        let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))
            .unwrap()
            .connect()
            .await
            .unwrap();
        PackageChannel::new(channel, package)
    }

    /// Files left in the blob store's temp directory (a refused upload must leave none).
    fn tmp_files(&self) -> Vec<String> {
        let tmp = self.store.path().join("blobs").join("tmp");
        files_in(&tmp)
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Bytes no other upload of this test has: `n` bytes from `seed`.
fn content(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Puts `data` in chunks of `chunk` bytes as `token`.
async fn put_blob(
    channel: PackageChannel,
    token: &str,
    data: &[u8],
    chunk: usize,
) -> Result<B3Digest, tonic::Status> {
    let chunks: Vec<cpb::BlobChunk> = data
        .chunks(chunk)
        .map(|c| cpb::BlobChunk {
            data: Bytes::copy_from_slice(c),
        })
        .collect();
    let r = BlobServiceClient::new(channel)
        .put(with_token(futures::stream::iter(chunks), token))
        .await?;
    Ok(B3Digest::try_from(&r.into_inner().digest).unwrap())
}

/// Whether the store has the blob `digest` (Stat, as `token`).
async fn has_blob(channel: PackageChannel, token: &str, digest: &B3Digest) -> bool {
    let req = cpb::StatBlobRequest {
        digest: (*digest).into(),
        ..Default::default()
    };
    match BlobServiceClient::new(channel)
        .stat(with_token(req, token))
        .await
    {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("stat {digest}: {e:?}"),
    }
}

fn assert_over_quota(e: &tonic::Status, tenant: &str, key_and_limit: &str) {
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    for needle in [
        format!("tenant {tenant}"),
        key_and_limit.to_owned(),
        "resets in".to_owned(),
    ] {
        assert!(e.message().contains(&needle), "{needle}: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_upload_over_the_quota_is_refused_and_nothing_of_it_is_stored() {
    let host = QuotaHost::start();
    let tvix = host.channel(Package::Tvix).await;
    let snix = host.channel(Package::Snix).await;
    const K: usize = 1024;

    // 200 KiB of small's 256 KiB.
    let first = content(1, 200 * K);
    let d = put_blob(tvix.clone(), "tok-small", &first, 64 * K)
        .await
        .unwrap();
    assert!(has_blob(tvix.clone(), "tok-small", &d).await);

    // 100 KiB more in 25 KiB chunks: two chunks are written, the third would cross.
    let second = content(2, 100 * K);
    let e = put_blob(tvix.clone(), "tok-small", &second, 25 * K)
        .await
        .unwrap_err();
    assert_over_quota(&e, "small", "tenants.small.upload-bytes-per-hour = 262144");
    let second_digest = B3Digest::of(&second);
    assert!(!has_blob(tvix.clone(), "tok-small", &second_digest).await);
    assert_eq!(
        host.tmp_files(),
        Vec::<String>::new(),
        "a temp file is left"
    );

    // The same over the snix package (the same services, the same quota).
    let e = put_blob(snix.clone(), "tok-small", &second, 25 * K)
        .await
        .unwrap_err();
    assert_over_quota(&e, "small", "tenants.small.upload-bytes-per-hour");
    assert!(!has_blob(snix.clone(), "tok-small", &second_digest).await);
    assert_eq!(
        host.tmp_files(),
        Vec::<String>::new(),
        "a temp file is left"
    );

    // The refused calls' charges were given back: what still fits goes through.
    let third = content(3, 50 * K);
    let d3 = put_blob(snix.clone(), "tok-small", &third, 64 * K)
        .await
        .unwrap();
    assert!(has_blob(tvix.clone(), "tok-small", &d3).await);

    // Another tenant, under the defaults, uploads the refused blob and more.
    let d2 = put_blob(tvix.clone(), "tok-big", &second, 25 * K)
        .await
        .unwrap();
    assert_eq!(d2, second_digest);
    let big = content(4, 600 * K);
    put_blob(snix, "tok-big", &big, 64 * K).await.unwrap();
    assert!(has_blob(tvix, "tok-big", &d2).await);

    let (status, text) = http_probe(&host.metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    for line in [
        "tvix_build_vm_tenant_uploads_refused_total{tenant=\"small\"} 2\n",
        // 200 KiB + 50 KiB stored; the refused 2 x 50 KiB are not counted.
        "tvix_build_vm_tenant_upload_bytes_total{tenant=\"small\",source=\"castore\"} 256000\n",
        // "big" is not configured: counted as "other".
        "tvix_build_vm_tenant_upload_bytes_total{tenant=\"other\",source=\"castore\"} 716800\n",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    drop(host);
}

/// A directory with `n` files named long enough to make it about `n * 60` bytes.
fn wide_dir(seed: u8, n: usize) -> cpb::Directory {
    cpb::Directory {
        files: (0..n)
            .map(|i| cpb::FileNode {
                name: Bytes::from(format!("file-{seed}-{i:04}-{}", "x".repeat(20))),
                digest: B3Digest::of(&[seed, i as u8]).into(),
                size: i as u64,
                executable: false,
            })
            .collect(),
        ..Default::default()
    }
}

async fn put_dirs(
    channel: PackageChannel,
    token: &str,
    dirs: Vec<cpb::Directory>,
) -> Result<B3Digest, tonic::Status> {
    let r = DirectoryServiceClient::new(channel)
        .put(with_token(futures::stream::iter(dirs), token))
        .await?;
    Ok(B3Digest::try_from(&r.into_inner().root_digest).unwrap())
}

async fn has_dir(channel: PackageChannel, token: &str, digest: &B3Digest) -> bool {
    let req = cpb::GetDirectoryRequest {
        recursive: false,
        by_what: Some(cpb::get_directory_request::ByWhat::Digest((*digest).into())),
    };
    match DirectoryServiceClient::new(channel)
        .get(with_token(req, token))
        .await
    {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => false,
        Err(e) => panic!("get {digest}: {e:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_upload_over_the_quota_is_refused_and_nothing_of_it_is_stored() {
    let host = QuotaHost::start();
    // A leaf of about 2.5 KiB and a root of about 2.5 KiB that holds it: the root's
    // message would take "dirs" over its 4 KiB.
    let leaf = wide_dir(1, 40);
    let leaf_digest = B3Digest::of(&leaf.encode_to_vec());
    let mut root = wide_dir(2, 40);
    root.directories.push(cpb::DirectoryNode {
        name: Bytes::from_static(b"leaf"),
        digest: leaf_digest.into(),
        size: 40,
    });
    let root_digest = B3Digest::of(&root.encode_to_vec());
    let (leaf_len, root_len) = (leaf.encoded_len(), root.encoded_len());
    assert!(
        leaf_len < 4096 && leaf_len + root_len > 4096,
        "{leaf_len} + {root_len}"
    );

    for package in [Package::Tvix, Package::Snix] {
        let c = host.channel(package).await;
        let e = put_dirs(c.clone(), "tok-dirs", vec![leaf.clone(), root.clone()])
            .await
            .unwrap_err();
        assert_over_quota(&e, "dirs", "tenants.dirs.upload-bytes-per-hour = 4096");
        // Not even the leaf, which fit, is stored: the closure is one upload.
        assert!(!has_dir(c.clone(), "tok-dirs", &leaf_digest).await);
        assert!(!has_dir(c, "tok-dirs", &root_digest).await);
    }

    // The leaf alone fits (the refused calls' charges were given back).
    let c = host.channel(Package::Snix).await;
    let got = put_dirs(c.clone(), "tok-dirs", vec![leaf.clone()])
        .await
        .unwrap();
    assert_eq!(got, leaf_digest);
    // Another tenant uploads the whole closure.
    let got = put_dirs(c.clone(), "tok-big", vec![leaf, root])
        .await
        .unwrap();
    assert_eq!(got, root_digest);
    assert!(has_dir(c, "tok-dirs", &root_digest).await);
}

/// A castore-only server under mutual TLS with `ca`'s client certificates required.
fn mtls_server(ca: &support::tls::TestCa, dir: &Path, store: &Path) -> (Serve, u16) {
    let mut flags = ca.server_flags(dir);
    flags.extend([
        "--store".to_owned(),
        store.to_str().unwrap().to_owned(),
        "--require-auth".to_owned(),
    ]);
    let port = free_port();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    (Serve::castore(&flags, Listen::Tcp(port)), port)
}

/// Connects with `tls` and calls Stat: the server refuses in the handshake, so the client
/// sees a transport error (on connect or on the call), never an answer of the service.
async fn assert_refused_over_grpc(port: u16, tls: tonic::transport::ClientTlsConfig) {
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(10));
    let channel: Channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(_) => return,
    };
    let e = BlobServiceClient::new(channel)
        .stat(cpb::StatBlobRequest {
            digest: vec![0u8; 32].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let transport = std::error::Error::source(&e)
        .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(
        transport
            && matches!(
                e.code(),
                Code::Cancelled | Code::Unavailable | Code::Unknown
            ),
        "not a transport error: {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_foreign_or_malformed_client_certificates_are_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let ca = support::tls::TestCa::new();
    let (server, port) = mtls_server(&ca, dir.path(), store.path());

    // The control: a valid certificate of this CA gets through to the service.
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(ca.client("alice"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ok = BlobServiceClient::new(channel)
        .stat(cpb::StatBlobRequest {
            digest: vec![0u8; 32].into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(ok.code(), Code::NotFound, "{ok:?}");

    let expired = ca.issue_expired("alice");
    let foreign = support::tls::TestCa::new().issue("alice");
    // Over gRPC the call fails as a transport error (never a served call)...
    assert_refused_over_grpc(port, ca.client_presenting(expired.clone())).await;
    assert_refused_over_grpc(port, ca.client_presenting(foreign.clone())).await;
    // ...and the TLS layer underneath names the server's refusal: its alert.
    for (what, cert, alert) in [
        ("expired", expired, "CertificateExpired"),
        // Both test CAs are named "test CA": the server finds the issuer by name and
        // refuses the signature (rustls' alert for a bad signature).
        ("foreign", foreign, "DecryptError"),
        (
            "self-signed",
            support::tls::TestCa::self_signed("alice"),
            "UnknownCA",
        ),
        ("garbage", support::tls::TestCa::garbage(), "BadCertificate"),
    ] {
        let e = tokio::task::block_in_place(|| ca.raw_handshake(port, cert)).unwrap_err();
        assert!(e.contains(alert), "{what}: {e}");
    }
    server.wait_for(
        || {
            let log = server.log();
            log.matches("tls accept error").count() >= 4
        },
        "the server logs the refused handshakes",
    );
    let log = server.log();
    assert!(log.to_lowercase().contains("expired"), "{log}");
    for reason in ["BadSignature", "UnknownIssuer", "BadEncoding"] {
        assert!(log.contains(reason), "{reason}: {log}");
    }
}
