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
        let issuer = Issuer::from_params(&self.params, &self.key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, common_name);
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
        let (cert, key) = self.issue(common_name);
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.pem))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert, key))
    }
}
