//! DSSE envelopes (Dead Simple Signing Envelope, its standard JSON form) signed with
//! Ed25519.
//!
//! The signature covers the pre-authentication encoding
//! `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in ASCII decimal, never the
//! base64 text. `keyid` is not signed: it only tells which key to try, so a mismatch is
//! reported as "another key" before the signature is checked.

use super::keys::key_id;
use data_encoding::BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// Upper bound on an envelope this service reads (a statement lists the inputs and outputs
/// of one build; a few MiB is plenty).
pub const MAX_ENVELOPE_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// base64 (standard alphabet, padded) of the payload bytes.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    #[serde(default)]
    pub keyid: String,
    /// base64 of the 64-byte Ed25519 signature.
    pub sig: String,
}

/// Why an envelope does not verify.
#[derive(Debug, thiserror::Error)]
pub enum DsseError {
    #[error("envelope is not DSSE JSON")]
    Json(#[source] serde_json::Error),
    #[error("envelope is {0} bytes, more than the {MAX_ENVELOPE_BYTES} accepted")]
    TooLarge(usize),
    #[error("payloadType is {0:?}, not {PAYLOAD_TYPE:?}")]
    PayloadType(String),
    #[error("payload is not base64")]
    PayloadBase64(#[source] data_encoding::DecodeError),
    #[error("the envelope has no signatures")]
    NoSignature,
    #[error("signature {index}: not base64")]
    SignatureBase64 {
        index: usize,
        #[source]
        source: data_encoding::DecodeError,
    },
    #[error("signature {index}: {len} bytes, an Ed25519 signature has 64")]
    SignatureLength { index: usize, len: usize },
    #[error("signed by key {envelope}, not by the given public key {given}")]
    OtherKey { envelope: String, given: String },
    #[error("the signature does not verify with the given public key: the payload or the signature was changed after signing")]
    BadSignature(#[source] ed25519_dalek::SignatureError),
}

/// DSSE's pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// Signs an in-toto payload.
    pub fn sign(payload: &[u8], key: &SigningKey) -> Self {
        let sig = key.sign(&pae(PAYLOAD_TYPE, payload));
        Self {
            payload: BASE64.encode(payload),
            payload_type: PAYLOAD_TYPE.to_owned(),
            signatures: vec![EnvelopeSignature {
                keyid: key_id(&key.verifying_key()),
                sig: BASE64.encode(&sig.to_bytes()),
            }],
        }
    }

    /// Parses an envelope's JSON (bounded).
    pub fn parse(bytes: &[u8]) -> Result<Self, DsseError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(DsseError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(DsseError::Json)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Strings and a list of them: serialising cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The payload, if one signature on it verifies with `key` (strictly: no small-order
    /// or malleable signatures). A signature whose keyid names another key is skipped; if
    /// none names this key (or has no keyid), the first error is returned.
    pub fn verify(&self, key: &VerifyingKey) -> Result<Vec<u8>, DsseError> {
        if self.payload_type != PAYLOAD_TYPE {
            return Err(DsseError::PayloadType(self.payload_type.clone()));
        }
        let payload = BASE64
            .decode(self.payload.as_bytes())
            .map_err(DsseError::PayloadBase64)?;
        let given = key_id(key);
        let mut first_error = None;
        for (index, s) in self.signatures.iter().enumerate() {
            let result = if !s.keyid.is_empty() && s.keyid != given {
                Err(DsseError::OtherKey {
                    envelope: s.keyid.clone(),
                    given: given.clone(),
                })
            } else {
                check_one(index, s, key, &payload)
            };
            match result {
                Ok(()) => return Ok(payload),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(DsseError::NoSignature))
    }
}

fn check_one(
    index: usize,
    s: &EnvelopeSignature,
    key: &VerifyingKey,
    payload: &[u8],
) -> Result<(), DsseError> {
    let raw = BASE64
        .decode(s.sig.as_bytes())
        .map_err(|source| DsseError::SignatureBase64 { index, source })?;
    let bytes: [u8; 64] = raw
        .as_slice()
        .try_into()
        .map_err(|_| DsseError::SignatureLength {
            index,
            len: raw.len(),
        })?;
    key.verify_strict(&pae(PAYLOAD_TYPE, payload), &Signature::from_bytes(&bytes))
        .map_err(DsseError::BadSignature)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn pae_is_the_specified_encoding() {
        // The example of the DSSE protocol description.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn a_signed_envelope_verifies_and_round_trips() {
        let k = key(1);
        let env = Envelope::sign(b"{\"a\":1}", &k);
        let back = Envelope::parse(&env.to_json()).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.verify(&k.verifying_key()).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn tampering_is_caught() {
        let k = key(1);
        let env = Envelope::sign(b"{\"a\":1}", &k);

        let mut payload = env.clone();
        payload.payload = BASE64.encode(b"{\"a\":2}");
        let e = payload.verify(&k.verifying_key()).unwrap_err();
        assert!(matches!(e, DsseError::BadSignature(_)), "{e}");

        let mut sig = env.clone();
        let mut raw = BASE64.decode(sig.signatures[0].sig.as_bytes()).unwrap();
        raw[10] ^= 1;
        sig.signatures[0].sig = BASE64.encode(&raw);
        let e = sig.verify(&k.verifying_key()).unwrap_err();
        assert!(matches!(e, DsseError::BadSignature(_)), "{e}");

        let e = env.verify(&key(2).verifying_key()).unwrap_err();
        assert!(matches!(e, DsseError::OtherKey { .. }), "{e}");
        // Without a keyid, another key fails on the signature itself.
        let mut anon = env.clone();
        anon.signatures[0].keyid.clear();
        let e = anon.verify(&key(2).verifying_key()).unwrap_err();
        assert!(matches!(e, DsseError::BadSignature(_)), "{e}");

        let mut typ = env.clone();
        typ.payload_type = "text/plain".into();
        let e = typ.verify(&k.verifying_key()).unwrap_err();
        assert!(matches!(e, DsseError::PayloadType(_)), "{e}");

        let mut none = env.clone();
        none.signatures.clear();
        let e = none.verify(&k.verifying_key()).unwrap_err();
        assert!(matches!(e, DsseError::NoSignature), "{e}");

        let mut short = env;
        short.signatures[0].sig = BASE64.encode(&[0u8; 63]);
        let e = short.verify(&k.verifying_key()).unwrap_err();
        assert!(
            matches!(e, DsseError::SignatureLength { len: 63, .. }),
            "{e}"
        );
    }
}
