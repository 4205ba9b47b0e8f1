//! A throwaway certificate authority for mutual-TLS tests: a server certificate for
//! `localhost` and client certificates with the common names a test asks for.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let pem = params.self_signed(&key).unwrap().pem();
        Self { params, key, pem }
    }

    /// (certificate PEM, key PEM) for `common_name`, also valid for the DNS name
    /// `localhost`.
    pub fn issue(&self, common_name: &str) -> (String, String) {
        self.sign(leaf(common_name))
    }

    /// Like [`TestCa::issue`], but valid only during 2020: expired.
    pub fn issue_expired(&self, common_name: &str) -> (String, String) {
        let mut p = leaf(common_name);
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.sign(p)
    }

    /// A certificate for `common_name` that signs itself: no CA vouches for it.
    pub fn self_signed(common_name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = leaf(common_name).self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Garbage in a PEM certificate block, with a real key: not a certificate at all.
    pub fn garbage() -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let pem = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGUgYXQgYWxs\n-----END CERTIFICATE-----\n";
        (pem.to_owned(), key.serialize_pem())
    }

    fn sign(&self, p: CertificateParams) -> (String, String) {
        let issuer = Issuer::from_params(&self.params, &self.key);
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    /// Writes the CA and a `localhost` server certificate into `dir`; the serve flags
    /// `--tls-cert`, `--tls-key`, `--tls-client-ca` with their paths.
    pub fn server_flags(&self, dir: &Path) -> Vec<String> {
        let (cert, key) = self.issue("localhost");
        let mut flags = Vec::new();
        for (flag, name, text) in [
            ("--tls-cert", "server.pem", cert.as_str()),
            ("--tls-key", "server.key", key.as_str()),
            ("--tls-client-ca", "ca.pem", self.pem.as_str()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            flags.push(flag.to_owned());
            flags.push(path.to_str().unwrap().to_owned());
        }
        flags
    }

    /// A client TLS config trusting this CA, presenting a certificate for `common_name`.
    pub fn client(&self, common_name: &str) -> ClientTlsConfig {
        self.client_presenting(self.issue(common_name))
    }

    /// A client TLS config trusting this CA, presenting `(cert, key)` (PEM), whoever
    /// issued it.
    pub fn client_presenting(&self, (cert, key): (String, String)) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pem))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key))
    }
}

/// The parameters of a certificate for `common_name`, valid for `localhost`.
fn leaf(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p
}

impl TestCa {
    /// A TLS handshake with rustls itself (no gRPC on top), presenting `(cert, key)` (PEM)
    /// to `127.0.0.1:port` and trusting this CA; then one write and one read, which is
    /// where TLS 1.3 delivers a server's refusal of the client certificate. The error of the
    /// first step that failed, or `Ok` when the server took the certificate.
    pub fn raw_handshake(&self, port: u16, (cert, key): (String, String)) -> Result<(), String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use std::io::{Read, Write};
        use std::sync::Arc;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider.key_provider.load_private_key(key).unwrap();
        // Sent as it is: rustls' own client setup would refuse a certificate that does not
        // parse or match the key, and the server must be shown refusing it too.
        let presented = PresentAnyway(Arc::new(rustls::sign::CertifiedKey::new(chain, signer)));
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(presented));
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        // The HTTP/2 preface: what a gRPC client sends first.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .map_err(|e| format!("handshake or write: {e}"))?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf) {
            Ok(0) => Err("read: the connection closed without an alert".to_owned()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// Presents one certificate chain, whatever it holds.
#[derive(Debug)]
struct PresentAnyway(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for PresentAnyway {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
