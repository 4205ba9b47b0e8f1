//! BLAKE3-256 digests, printed like tvix (`b3:` + padded standard base64) and parsed from
//! that or from 64 hex characters.

use bytes::Bytes;
use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use std::fmt;
use std::str::FromStr;

/// Length of every castore digest.
pub const DIGEST_LEN: usize = 32;

/// A BLAKE3-256 digest: of a blob's contents, or of a Directory's canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct B3Digest([u8; DIGEST_LEN]);

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum DigestError {
    #[error("digest has {0} bytes, expected 32")]
    WrongLength(usize),
    #[error("digest {0:?} is neither b3:<base64> nor 64 hex characters")]
    Unparseable(String),
}

impl B3Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    /// Lowercase hex, as used for file names in the local blob store.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl From<[u8; DIGEST_LEN]> for B3Digest {
    fn from(b: [u8; DIGEST_LEN]) -> Self {
        Self(b)
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = DigestError;
    fn try_from(b: &[u8]) -> Result<Self, DigestError> {
        let arr: [u8; DIGEST_LEN] = b
            .try_into()
            .map_err(|_| DigestError::WrongLength(b.len()))?;
        Ok(Self(arr))
    }
}

impl TryFrom<&Bytes> for B3Digest {
    type Error = DigestError;
    fn try_from(b: &Bytes) -> Result<Self, DigestError> {
        Self::try_from(b.as_ref())
    }
}

impl From<B3Digest> for Bytes {
    fn from(d: B3Digest) -> Bytes {
        Bytes::copy_from_slice(&d.0)
    }
}

impl FromStr for B3Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        let unparseable = || DigestError::Unparseable(s.to_owned());
        let bytes = if let Some(b64) = s.strip_prefix("b3:") {
            BASE64.decode(b64.as_bytes()).map_err(|_| unparseable())?
        } else if s.len() == 2 * DIGEST_LEN {
            HEXLOWER_PERMISSIVE
                .decode(s.as_bytes())
                .map_err(|_| unparseable())?
        } else {
            return Err(unparseable());
        };
        Self::try_from(bytes.as_slice())
    }
}

impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{}", BASE64.encode(&self.0))
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_DIR: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn empty_input_digest_matches_golden_value() {
        assert_eq!(B3Digest::of(b"").to_hex(), EMPTY_DIR);
    }

    #[test]
    fn display_and_parse_round_trip() {
        let d = B3Digest::of(b"hello");
        let shown = d.to_string();
        assert!(shown.starts_with("b3:") && shown.ends_with('='));
        assert_eq!(shown.parse::<B3Digest>().unwrap(), d);
        assert_eq!(d.to_hex().parse::<B3Digest>().unwrap(), d);
        assert_eq!(d.to_hex().to_uppercase().parse::<B3Digest>().unwrap(), d);
    }

    #[test]
    fn wrong_lengths_and_garbage_are_rejected() {
        assert_eq!(
            B3Digest::try_from(&[0u8; 31][..]),
            Err(DigestError::WrongLength(31))
        );
        assert_eq!(
            "b3:AAAA".parse::<B3Digest>(),
            Err(DigestError::WrongLength(3))
        );
        assert!(matches!(
            "zz".repeat(32).parse::<B3Digest>(),
            Err(DigestError::Unparseable(_))
        ));
        assert!(matches!(
            "b3:!!".parse::<B3Digest>(),
            Err(DigestError::Unparseable(_))
        ));
    }
}
