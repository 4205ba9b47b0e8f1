//! An independent DSSE verifier for the provenance tests: Python's `cryptography` (OpenSSL)
//! over DSSE's pre-authentication encoding, sharing no code with the project.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

const VERIFIER: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives.serialization import load_pem_public_key
pub = load_pem_public_key(open(sys.argv[1], "rb").read())
env = json.load(open(sys.argv[2]))
payload = base64.b64decode(env["payload"], validate=True)
ptype = env["payloadType"].encode()
pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)
assert env["signatures"], "no signatures"
for s in env["signatures"]:
    pub.verify(base64.b64decode(s["sig"], validate=True), pae)
st = json.loads(payload)
assert st["_type"] == "https://in-toto.io/Statement/v1", st["_type"]
assert st["predicateType"] == "https://slsa.dev/provenance/v1", st["predicateType"]
print(json.dumps({s["name"]: s["digest"]["narSha256"] for s in st["subject"]}))
"#;

/// Whether python3 with `cryptography` is here; a test that needs it fails loudly if not.
pub fn require_python_cryptography() {
    let ok = Command::new("python3")
        .args(["-c", "import cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the independent verifier needs python3 with `cryptography` (pip install cryptography)"
    );
}

/// Verifies `envelope` with `public_key` independently; on success, the subjects'
/// `name -> narSha256`; on failure, Python's error.
pub fn independent_verify(
    public_key: &Path,
    envelope: &Path,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    require_python_cryptography();
    let out = Command::new("python3")
        .args(["-c", VERIFIER])
        .arg(public_key)
        .arg(envelope)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// Whether OpenSSL (through Python) reads the private key `keygen` wrote.
pub fn python_loads_private_key(private_key: &Path) -> bool {
    Command::new("python3")
        .args([
            "-c",
            "import sys; from cryptography.hazmat.primitives.serialization import load_pem_private_key; \
             from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey; \
             k = load_pem_private_key(open(sys.argv[1], 'rb').read(), None); \
             assert isinstance(k, Ed25519PrivateKey)",
        ])
        .arg(private_key)
        .status()
        .is_ok_and(|s| s.success())
}

/// sha256 of `nix-store --dump PATH`, as lowercase hex.
pub fn nix_store_dump_sha256(path: &Path) -> String {
    use sha2::Digest;
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .expect("nix-store is missing: run scripts/install-deps.sh (Debian's nix-bin)");
    assert!(
        out.status.success(),
        "nix-store --dump {}: {out:?}",
        path.display()
    );
    data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(&out.stdout))
}
