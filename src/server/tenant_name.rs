//! A tenant's name, validated: what [`super::peer::Peer`] carries and
//! [`super::tenant`] hands out, in a module of its own so that neither needs the other.

use std::fmt;
use std::sync::Arc;

/// The tenant of requests that prove nothing (plain TCP, no token).
pub const ANONYMOUS: &str = "anonymous";
/// Longest tenant name: it goes into logs, spans and metric labels.
pub const MAX_TENANT_NAME: usize = 64;

/// A tenant's name: 1 to [`MAX_TENANT_NAME`] of `[A-Za-z0-9._-]`, so it is safe as a log
/// field and a metric label value without escaping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(Arc<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantError {
    #[error("a tenant name is 1 to {MAX_TENANT_NAME} characters of A-Z a-z 0-9 . _ -, not {0:?}")]
    BadName(String),
}

impl Tenant {
    pub fn new(name: &str) -> Result<Self, TenantError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_TENANT_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !ok {
            let shown: String = name.chars().take(MAX_TENANT_NAME + 1).collect();
            return Err(TenantError::BadName(shown));
        }
        Ok(Self(name.into()))
    }

    /// The tenant of a unix peer known only by its uid: `uid-<n>` (always a valid name).
    pub fn of_uid(uid: u32) -> Self {
        Self(format!("uid-{uid}").into())
    }

    pub fn anonymous() -> Self {
        Self(ANONYMOUS.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Tenant {
    fn default() -> Self {
        Self::anonymous()
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
