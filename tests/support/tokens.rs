//! Bearer tokens for tenant tests: a tokens file written the way an operator would (aside,
//! then renamed), and requests carrying `authorization: Bearer <token>`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use sha2::{Digest, Sha256};
use std::path::Path;

/// A tokens file line for `tenant` holding `token`.
pub fn token_line(tenant: &str, token: &str) -> String {
    let hex: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{tenant} {hex}\n")
}

/// Writes the tokens file at `path`: `(tenant, token)` per line.
pub fn write_tokens(path: &Path, lines: &[(&str, &str)]) {
    let text: String = lines.iter().map(|(t, k)| token_line(t, k)).collect();
    // Written aside and renamed: the server never reads half a file.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("# tenants of this test\n{text}")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `msg` with `authorization: Bearer <token>`.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}
