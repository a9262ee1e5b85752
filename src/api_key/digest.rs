//! The one key digest function.

use std::fmt;
use std::hash::{Hash, Hasher};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::ConfigError;

/// The SHA-256 digest of a key: the only form in which a key is kept.
///
/// Equality is constant-time (`subtle`) over the fixed 32 bytes. Written
/// `sha256:<64 hex digits>` in key files. `Debug` shows only the first 8 hex digits.
///
/// Plain SHA-256 suffices: keys carry at least 128 random bits, so there is nothing
/// for a slow password hash to protect, and it would only add latency to every request.
///
/// ```
/// use portcullis::api_key::KeyDigest;
/// let d = KeyDigest::of("pc_live_example");
/// let text = d.to_string();
/// assert!(text.starts_with("sha256:") && text.len() == 7 + 64);
/// assert_eq!(KeyDigest::parse(&text).unwrap(), d);
/// ```
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Digests a presented or generated key.
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses `sha256:<64 hex digits>` (either case).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let err = || ConfigError::new("a digest must be written sha256:<64 hex digits>");
        let hex = s.strip_prefix("sha256:").ok_or_else(err)?.as_bytes();
        if hex.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let hi = hex_val(pair[0]).ok_or_else(err)?;
            let lo = hex_val(pair[1]).ok_or_else(err)?;
            *o = hi << 4 | lo;
        }
        Ok(Self(out))
    }

    /// Constant-time equality (`subtle`, over four 64-bit words).
    pub(crate) fn ct_eq(&self, other: &KeyDigest) -> bool {
        bool::from(self.words().ct_eq(&other.words()))
    }

    fn words(&self) -> [u64; 4] {
        let mut w = [0u64; 4];
        for (w, b) in w.iter_mut().zip(self.0.chunks_exact(8)) {
            *w = u64::from_le_bytes(b.try_into().expect("8-byte chunk"));
        }
        w
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl PartialEq for KeyDigest {
    /// Constant-time, so that map lookups compare in constant time too.
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other)
    }
}

impl Eq for KeyDigest {}

impl Hash for KeyDigest {
    /// The first 8 bytes: a digest is uniform already (see the key store's hasher).
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.words()[0]);
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyDigest(sha256:{:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_parse_errors() {
        assert_eq!(
            KeyDigest::of("abc").to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let upper = "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(KeyDigest::parse(upper).unwrap(), KeyDigest::of("abc"));
        assert!(KeyDigest::parse("ba7816bf").is_err());
        assert!(KeyDigest::parse(&upper.replace('B', "g")).is_err());
        assert!(KeyDigest::parse(&upper[..upper.len() - 1]).is_err());
        assert_ne!(KeyDigest::of("a"), KeyDigest::of("b"));
        assert_eq!(
            format!("{:?}", KeyDigest::of("abc")),
            "KeyDigest(sha256:ba7816bf…)"
        );
    }
}
