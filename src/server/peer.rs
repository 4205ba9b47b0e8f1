//! Who is calling: the remote address (TCP) or the peer's credentials (unix socket), and
//! under mutual TLS the subject of the client certificate, and the tenant the request was
//! authenticated as (see [`super::tenant`]). Recorded on every build's span.

use super::tenant_name::Tenant;
use std::fmt;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};

/// The identity of a caller, as far as the transport tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// `tcp:<addr>` or `unix:uid=<uid>,pid=<pid>`; empty when the transport says nothing.
    pub transport: String,
    /// The subject of the verified client certificate (mutual TLS).
    pub cert_subject: Option<String>,
    /// The common name of that certificate: the tenant when no token is given.
    pub cert_common_name: Option<String>,
    /// The unix peer's uid: the tenant (`uid-<n>`) when nothing else is proven.
    pub uid: Option<u32>,
    /// The tenant the request was authenticated as ([`super::tenant::AuthLayer`]).
    pub tenant: Tenant,
}

impl Peer {
    /// Reads the connection info tonic attached to the request.
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        let ext = req.extensions();
        let mut peer = Self::transport_of(ext);
        if let Some(tenant) = ext.get::<Tenant>() {
            peer.tenant = tenant.clone();
        }
        peer
    }

    fn transport_of(ext: &http::Extensions) -> Self {
        // TLS first: tonic may attach the plain connection's info beside the TLS one, and
        // the certificate is only in the latter.
        if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
            return Self {
                transport: tcp_label(tls.get_ref()),
                ..Self::certified(tls.peer_certs().as_deref())
            };
        }
        if let Some(tls) = ext.get::<TlsConnectInfo<UdsConnectInfo>>() {
            return Self {
                transport: unix_label(tls.get_ref()),
                uid: unix_uid(tls.get_ref()),
                ..Self::certified(tls.peer_certs().as_deref())
            };
        }
        if let Some(tcp) = ext.get::<TcpConnectInfo>() {
            return Self::plain(tcp_label(tcp));
        }
        if let Some(uds) = ext.get::<UdsConnectInfo>() {
            return Self {
                uid: unix_uid(uds),
                ..Self::plain(unix_label(uds))
            };
        }
        Self::default()
    }

    fn plain(transport: String) -> Self {
        Self {
            transport,
            ..Self::default()
        }
    }

    fn certified(certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>) -> Self {
        let (cert_subject, cert_common_name) = match first_subject(certs) {
            Some((subject, cn)) => (Some(subject), cn),
            None => (None, None),
        };
        Self {
            cert_subject,
            cert_common_name,
            ..Self::default()
        }
    }
}

fn unix_uid(info: &UdsConnectInfo) -> Option<u32> {
    info.peer_cred.as_ref().map(|c| c.uid())
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.transport, &self.cert_subject) {
            (t, _) if t.is_empty() && self.cert_subject.is_none() => f.write_str("unknown"),
            (t, None) => f.write_str(t),
            (t, Some(s)) => write!(f, "{t} cert={s:?}"),
        }
    }
}

fn tcp_label(info: &TcpConnectInfo) -> String {
    match info.remote_addr() {
        Some(a) => format!("tcp:{a}"),
        None => "tcp:?".into(),
    }
}

fn unix_label(info: &UdsConnectInfo) -> String {
    match &info.peer_cred {
        Some(c) => match c.pid() {
            Some(pid) => format!("unix:uid={},pid={pid}", c.uid()),
            None => format!("unix:uid={}", c.uid()),
        },
        None => "unix:?".into(),
    }
}

/// The subject of the leaf certificate and its (first) common name; rustls has verified
/// the chain already.
fn first_subject(
    certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
) -> Option<(String, Option<String>)> {
    let leaf = certs?.first()?;
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert)) => {
            let cn = cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned);
            Some((cert.subject().to_string(), cn))
        }
        Err(e) => Some((format!("<unparseable certificate: {e}>"), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        let mut req = tonic::Request::new(());
        assert_eq!(Peer::of(&req).to_string(), "unknown");
        req.extensions_mut().insert(TcpConnectInfo {
            local_addr: None,
            remote_addr: Some("127.0.0.1:4000".parse().unwrap()),
        });
        assert_eq!(Peer::of(&req).to_string(), "tcp:127.0.0.1:4000");
    }

    #[test]
    fn subject_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = vec![cert.der().clone()];
        assert_eq!(
            first_subject(Some(&der)),
            Some(("CN=alice".to_owned(), Some("alice".to_owned())))
        );
        assert_eq!(
            first_subject(Some(&vec![b"junk".to_vec().into()]))
                .map(|(s, cn)| s.starts_with("<unparseable") && cn.is_none()),
            Some(true)
        );
    }
}
