//! Who a request is for: the tenant, from what the transport proves. In order: a bearer
//! token (`authorization: Bearer <token>`) found in the operator's tokens file, else the
//! common name of the verified client certificate (mutual TLS), else the unix peer's uid
//! (`uid-<n>`), else nobody ([`ANONYMOUS`], refused under `--require-auth`).
//!
//! A token that is presented but not in the file is always refused: a typo or a revoked
//! token must not quietly become an anonymous caller. The file holds only SHA-256 hashes,
//! and a presented token's hash is compared with every entry in constant time.
//!
//! [`AuthLayer`] runs on every RPC of the router (castore and builds alike) and leaves the
//! [`Tenant`] in the request's extensions, where [`super::peer::Peer::of`] finds it.

use super::peer::Peer;
pub use super::tenant_name::{Tenant, TenantError, ANONYMOUS, MAX_TENANT_NAME};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tonic::service::Interceptor;
use tracing::{info, warn};

/// Largest tokens file: a table, not a database.
const MAX_TOKENS_FILE: u64 = 1 << 20;
/// Longest line of the tokens file (a name, a space, 64 hex digits, and a comment's room).
const MAX_TOKENS_LINE: usize = 512;
/// Longest bearer token accepted (it is hashed, but need not be read past this).
const MAX_TOKEN: usize = 4096;
/// Health probes come from load balancers that hold no token.
const UNAUTHENTICATED_PREFIXES: &[&str] = &["/grpc.health.v1.Health/"];

/// Errors of reading the tokens file; a line's error names the line.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("reading the tokens file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tokens file {} is larger than {MAX_TOKENS_FILE} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("the tokens file {}, line {line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// The tokens file: `<tenant> <sha256 of the token, 64 hex digits>` per line; `#` starts a
/// comment, blank lines are skipped.
#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    entries: Vec<([u8; 32], Tenant)>,
}

impl TokenTable {
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        use std::io::Read;
        let read = |source| TokensError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_TOKENS_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_TOKENS_FILE {
            return Err(TokensError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&text).map_err(|(line, reason)| TokensError::Line {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parses the file's text; an error is (1-based line, reason).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut entries: Vec<([u8; 32], Tenant)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            if raw.len() > MAX_TOKENS_LINE {
                return Err((n, format!("longer than {MAX_TOKENS_LINE} bytes")));
            }
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(name), Some(hash), None) = (words.next(), words.next(), words.next()) else {
                return Err((n, "expected `<tenant> <sha256 hex of the token>`".into()));
            };
            let tenant = Tenant::new(name).map_err(|e| (n, e.to_string()))?;
            let hash = parse_sha256_hex(hash).ok_or_else(|| {
                (
                    n,
                    "the second word is not a SHA-256 in hex (64 hex digits)".to_owned(),
                )
            })?;
            if entries.iter().any(|(h, _)| *h == hash) {
                // Which tenant a token means must never depend on the order of lines.
                return Err((n, "the same token hash appears on an earlier line".into()));
            }
            entries.push((hash, tenant));
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tenant of `token`. Every entry is compared, each in constant time, so the time
    /// taken says nothing about how close a guess came.
    pub fn lookup(&self, token: &[u8]) -> Option<Tenant> {
        let hash: [u8; 32] = Sha256::digest(token).into();
        let mut found = None;
        for (h, tenant) in &self.entries {
            if constant_time_eq(h, &hash) {
                found = Some(tenant.clone());
            }
        }
        found
    }
}

fn parse_sha256_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// Why a request has no tenant (the client's UNAUTHENTICATED).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the authorization metadata is not `Bearer <token>`")]
    Malformed,
    #[error("the bearer token is not known to this host")]
    UnknownToken,
    #[error("the client certificate's common name is not a usable tenant name: {0}")]
    BadCertificateName(TenantError),
    #[error("this host requires authentication (a bearer token or a client certificate)")]
    Required,
}

/// Settles the tenant of each request; shared by every RPC, reloaded on SIGHUP.
#[derive(Debug, Default)]
pub struct Authenticator {
    tokens_path: Option<PathBuf>,
    tokens: RwLock<Arc<TokenTable>>,
    require_auth: bool,
}

impl Authenticator {
    /// Reads the tokens file (if any) now, so a bad one stops the server from starting.
    pub fn new(tokens_path: Option<PathBuf>, require_auth: bool) -> Result<Self, TokensError> {
        let table = match &tokens_path {
            Some(p) => TokenTable::load(p)?,
            None => TokenTable::default(),
        };
        Ok(Self {
            tokens_path,
            tokens: RwLock::new(Arc::new(table)),
            require_auth,
        })
    }

    /// Reads the tokens file again. On an error the old table stays (and the error is
    /// returned for the log); running and queued builds are never touched.
    pub fn reload(&self) -> Result<usize, TokensError> {
        let Some(path) = &self.tokens_path else {
            return Ok(0);
        };
        let table = TokenTable::load(path)?;
        let n = table.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        Ok(n)
    }

    /// [`Authenticator::reload`], logged: what a SIGHUP does.
    pub fn reload_logged(&self) {
        if self.tokens_path.is_none() {
            info!("SIGHUP: there is no tokens file to reread");
            return;
        }
        match self.reload() {
            Ok(n) => info!(tokens = n, "reloaded the tokens file"),
            Err(e) => warn!(
                error = %crate::castore::error::error_chain(&e),
                "the tokens file was not reloaded; the previous tokens stay in force"
            ),
        }
    }

    /// The tenant of a request with this `authorization` value (if any) from `peer`.
    pub fn identify(&self, authorization: Option<&[u8]>, peer: &Peer) -> Result<Tenant, AuthError> {
        if let Some(value) = authorization {
            let token = bearer(value).ok_or(AuthError::Malformed)?;
            let table = Arc::clone(&self.tokens.read().unwrap_or_else(|e| e.into_inner()));
            return table.lookup(token).ok_or(AuthError::UnknownToken);
        }
        if let Some(cn) = &peer.cert_common_name {
            return Tenant::new(cn).map_err(AuthError::BadCertificateName);
        }
        if let Some(uid) = peer.uid {
            return Ok(Tenant::of_uid(uid));
        }
        match self.require_auth {
            true => Err(AuthError::Required),
            false => Ok(Tenant::anonymous()),
        }
    }
}

/// The token of an `authorization: Bearer <token>` value (the scheme is case-insensitive,
/// RFC 6750).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    if value.len() > MAX_TOKEN + 7 || value.len() < 7 {
        return None;
    }
    let (scheme, token) = value.split_at(7);
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The RPC path of a request, noted before the interceptor (which does not see the URI).
#[derive(Clone, Debug)]
pub struct RpcPath(pub String);

/// The interceptor every RPC passes: puts the [`Tenant`] into the request's extensions, or
/// refuses the call.
#[derive(Clone, Debug, Default)]
pub struct AuthLayer(pub Arc<Authenticator>);

impl Interceptor for AuthLayer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let exempt = req.extensions().get::<RpcPath>().is_some_and(|p| {
            UNAUTHENTICATED_PREFIXES
                .iter()
                .any(|prefix| p.0.starts_with(prefix))
        });
        let peer = Peer::of(&req);
        let authorization = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes().to_vec());
        match self.0.identify(authorization.as_deref(), &peer) {
            Ok(tenant) => {
                req.extensions_mut().insert(tenant);
                Ok(req)
            }
            Err(_) if exempt => Ok(req),
            Err(e) => {
                info!(peer = %peer, error = %e, "refused an unauthenticated call");
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn tenant_names() {
        assert!(Tenant::new("team-a.ci_1").is_ok());
        for bad in ["", "a b", "é", "a\"b", &"x".repeat(65)] {
            assert!(Tenant::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_file_parses_and_names_bad_lines() {
        let text = format!(
            "# operators\n\nalice {}  # laptop\nbob {}\n",
            hex("s3cret"),
            hex("other").to_uppercase()
        );
        let t = TokenTable::parse(&text).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(b"s3cret").unwrap().as_str(), "alice");
        assert_eq!(t.lookup(b"other").unwrap().as_str(), "bob");
        assert_eq!(t.lookup(b"s3cre"), None);

        let line_of = |text: &str| TokenTable::parse(text).unwrap_err().0;
        assert_eq!(line_of("\nalice\n"), 2);
        assert_eq!(line_of(&format!("a {}\nb c {}\n", hex("x"), hex("y"))), 2);
        assert_eq!(line_of("alice abcd\n"), 1);
        assert_eq!(line_of(&format!("a {}\nb {}\n", hex("x"), hex("x"))), 2);
        assert_eq!(line_of(&format!("bad name {}\n", hex("x"))), 1);
        assert_eq!(line_of(&format!("x {}\n", "a".repeat(600))), 1);
    }

    #[test]
    fn identity_order_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("alice {}\n", hex("tok-a"))).unwrap();
        let auth = Authenticator::new(Some(path.clone()), true).unwrap();
        let tcp = Peer {
            transport: "tcp:127.0.0.1:1".into(),
            ..Default::default()
        };
        let id = |v: Option<&str>, p: &Peer| auth.identify(v.map(str::as_bytes), p);
        assert_eq!(id(Some("Bearer tok-a"), &tcp).unwrap().as_str(), "alice");
        assert_eq!(id(Some("bearer tok-a"), &tcp).unwrap().as_str(), "alice");
        assert_eq!(id(Some("Bearer nope"), &tcp), Err(AuthError::UnknownToken));
        assert_eq!(id(Some("Basic tok-a"), &tcp), Err(AuthError::Malformed));
        assert_eq!(id(Some("Bearer "), &tcp), Err(AuthError::Malformed));
        assert_eq!(id(None, &tcp), Err(AuthError::Required));
        let cert = Peer {
            cert_common_name: Some("carol".into()),
            ..tcp.clone()
        };
        assert_eq!(id(None, &cert).unwrap().as_str(), "carol");
        // The token wins over the certificate.
        assert_eq!(id(Some("Bearer tok-a"), &cert).unwrap().as_str(), "alice");
        let unix = Peer {
            uid: Some(1000),
            ..Default::default()
        };
        assert_eq!(id(None, &unix).unwrap().as_str(), "uid-1000");

        // A reload that fails keeps the old table; one that works replaces it.
        std::fs::write(&path, "alice not-a-hash\n").unwrap();
        let e = auth.reload().unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(id(Some("Bearer tok-a"), &tcp).unwrap().as_str(), "alice");
        std::fs::write(&path, format!("bob {}\n", hex("tok-b"))).unwrap();
        assert_eq!(auth.reload().unwrap(), 1);
        assert_eq!(id(Some("Bearer tok-a"), &tcp), Err(AuthError::UnknownToken));
        assert_eq!(id(Some("Bearer tok-b"), &tcp).unwrap().as_str(), "bob");

        let open = Authenticator::new(None, false).unwrap();
        assert_eq!(open.identify(None, &tcp).unwrap().as_str(), ANONYMOUS);
        assert_eq!(
            open.identify(Some(b"Bearer x"), &tcp),
            Err(AuthError::UnknownToken),
            "a token is never silently anonymous"
        );
    }

    #[test]
    fn oversized_tokens_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "#".repeat(MAX_TOKENS_FILE as usize + 1)).unwrap();
        assert!(matches!(
            TokenTable::load(&path),
            Err(TokensError::TooLarge { .. })
        ));
    }
}
