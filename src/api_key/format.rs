//! The key format: `<prefix>_<random><checksum>`.

use std::fmt;

use subtle::ConstantTimeEq;

use crate::ConfigError;
use crate::key_format::{
    ALNUM, ALPHABET, CHECKSUM_LEN, MAX_PREFIX_LEN, RANDOM_LEN, all_in, base62_value, checksum,
    crc32, is_prefix,
};

/// The prefix of generated keys unless another is chosen.
pub const DEFAULT_PREFIX: &str = "pc_live";

/// The longest presented key the store digests; anything longer is refused unread.
pub(crate) const MAX_KEY_LEN: usize = 256;

/// The shortest key accepted from a plain key list (keys not in the generated format).
pub(crate) const MIN_LEGACY_KEY_LEN: usize = 32;

/// A freshly generated key. Shown once, then only its digest is kept.
///
/// `Debug` prints the prefix only; read the key with [`GeneratedKey::expose_secret`].
///
/// ```
/// use portcullis::api_key::{check_key, generate_key, KeyDigest};
/// let key = generate_key("pc_test").unwrap();
/// assert!(key.expose_secret().starts_with("pc_test_"));
/// assert!(check_key(key.expose_secret()).is_ok());
/// assert!(!format!("{key:?}").contains(key.expose_secret()));
/// assert_eq!(key.digest(), KeyDigest::of(key.expose_secret()));
/// ```
#[derive(Clone)]
pub struct GeneratedKey {
    key: String,
    prefix_len: usize,
}

impl GeneratedKey {
    /// The key itself. Show it to its owner once; store only [`GeneratedKey::digest`].
    pub fn expose_secret(&self) -> &str {
        &self.key
    }

    /// The SHA-256 digest to put in the key file.
    pub fn digest(&self) -> super::KeyDigest {
        super::KeyDigest::of(&self.key)
    }

    /// The prefix, e.g. `pc_live`.
    pub fn prefix(&self) -> &str {
        &self.key[..self.prefix_len]
    }
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GeneratedKey({}_<redacted>)", self.prefix())
    }
}

/// Generates a key `<prefix>_<22 base62 characters from the OS CSPRNG><6 base62 checksum>`.
///
/// The prefix is 1 to 32 characters of `a-z`, `0-9` and `_`, starting with a letter
/// and not ending with `_` (e.g. `pc_live`, `pc_test`, `billing_live`). It names the
/// key's kind for people and secret scanners; it is not a secret.
///
/// Fails only for a bad prefix or when the OS has no randomness to give.
pub fn generate_key(prefix: &str) -> Result<GeneratedKey, ConfigError> {
    check_prefix(prefix)?;
    let mut random = [0u8; RANDOM_LEN];
    let mut filled = 0;
    let mut buf = [0u8; 64];
    while filled < RANDOM_LEN {
        getrandom::fill(&mut buf)
            .map_err(|_| ConfigError::new("the OS random number generator failed"))?;
        // Rejection sampling: 248 = 4 * 62, so `b % 62` is uniform for b < 248.
        for &b in &buf {
            if b < 248 && filled < RANDOM_LEN {
                random[filled] = ALPHABET[usize::from(b % 62)];
                filled += 1;
            }
        }
    }
    let mut key = String::with_capacity(prefix.len() + 1 + RANDOM_LEN + CHECKSUM_LEN);
    key.push_str(prefix);
    key.push('_');
    key.extend(random.iter().map(|&b| char::from(b)));
    let sum = checksum(key.as_bytes());
    key.extend(sum.iter().map(|&b| char::from(b)));
    Ok(GeneratedKey {
        key,
        prefix_len: prefix.len(),
    })
}

/// Checks a key prefix (see [`generate_key`]).
pub fn check_prefix(prefix: &str) -> Result<(), ConfigError> {
    if is_prefix(prefix.as_bytes()) {
        Ok(())
    } else {
        Err(ConfigError::new(
            "key prefix must be 1 to 32 characters of a-z, 0-9 and '_', start with a letter and not end with '_'",
        ))
    }
}

/// Why a string is not a key in the generated format (see [`check_key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyFormatError {
    /// Not `<prefix>_<28 base62 characters>` at all (maybe a plain listed key).
    Shape,
    /// The right shape, but the checksum does not match: a typo or a made-up key.
    Checksum,
}

impl fmt::Display for KeyFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyFormatError::Shape => "not in the <prefix>_<random><checksum> key format",
            KeyFormatError::Checksum => "the key's checksum does not match",
        })
    }
}

impl std::error::Error for KeyFormatError {}

/// A key that passed the format and checksum check. `Debug` shows the prefix only.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ParsedKey<'a> {
    prefix: &'a str,
}

impl<'a> ParsedKey<'a> {
    /// The prefix, e.g. `pc_live`.
    pub(crate) fn prefix(&self) -> &'a str {
        self.prefix
    }
}

impl fmt::Debug for ParsedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ParsedKey({}_<redacted>)", self.prefix)
    }
}

/// Checks that `key` is in the generated format, `<prefix>_<random><checksum>`, with
/// a matching checksum: what a tool that imports keys into a key file checks first
/// (`portcullis hash` does), since a key file holds digests of such keys only.
///
/// The checksum catches typos and garbage cheaply; it is not a security control
/// (anyone can compute it for a guess). [`KeyStore::verify`](super::KeyStore::verify)
/// runs the same check on every presented key before any lookup.
///
/// ```
/// use portcullis::api_key::{check_key, generate_key, KeyFormatError};
/// let key = generate_key("pc_live").unwrap();
/// let key = key.expose_secret();
/// assert_eq!(check_key(key), Ok(()));
///
/// // One changed character fails the checksum.
/// let mut typo = key.to_owned();
/// let last = typo.pop().unwrap();
/// typo.push(if last == 'a' { 'b' } else { 'a' });
/// assert_eq!(check_key(&typo), Err(KeyFormatError::Checksum));
/// assert_eq!(check_key("hunter2"), Err(KeyFormatError::Shape));
/// ```
pub fn check_key(key: &str) -> Result<(), KeyFormatError> {
    parse_key(key).map(|_| ())
}

/// Checks the format and checksum of a presented key, before any lookup, and returns
/// its prefix.
///
/// A pure function over the string: no allocation, and the checksum is compared in
/// constant time.
pub(crate) fn parse_key(key: &str) -> Result<ParsedKey<'_>, KeyFormatError> {
    let bytes = key.as_bytes();
    let body_len = RANDOM_LEN + CHECKSUM_LEN;
    if bytes.len() < body_len + 2 || bytes.len() > MAX_PREFIX_LEN + 1 + body_len {
        return Err(KeyFormatError::Shape);
    }
    let sep = bytes.len() - body_len - 1;
    let (prefix, body) = (&bytes[..sep], &bytes[sep + 1..]);
    if bytes[sep] != b'_' || !is_prefix(prefix) || !all_in(body, ALNUM) {
        return Err(KeyFormatError::Shape);
    }
    // Six base62 digits spell each number below 62^6 exactly once, so comparing the
    // number they spell with the CRC is the same test as comparing the text.
    let expected = u64::from(crc32(&bytes[..sep + 1 + RANDOM_LEN]));
    if bool::from(expected.ct_eq(&base62_value(&body[RANDOM_LEN..]))) {
        Ok(ParsedKey {
            prefix: &key[..sep],
        })
    } else {
        Err(KeyFormatError::Checksum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_key_is_well_formed() {
        assert!(parse_key("pc_live_EXAMPLExDOxNOTxUSE00000bJVDo").is_ok());
    }

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate_key("pc_test").unwrap();
        let b = generate_key("pc_test").unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_eq!(
            a.expose_secret().len(),
            "pc_test_".len() + RANDOM_LEN + CHECKSUM_LEN
        );
        assert_eq!(parse_key(a.expose_secret()).unwrap().prefix(), "pc_test");
        assert_eq!(a.prefix(), "pc_test");
    }

    #[test]
    fn prefixes() {
        for ok in ["pc_live", "a", "x9", "billing_live_2"] {
            assert!(check_prefix(ok).is_ok(), "{ok}");
        }
        for bad in ["", "_pc", "pc_", "PC", "9pc", "pc-live", &"a".repeat(33)] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn shapes() {
        let k = generate_key("pc_live").unwrap();
        let k = k.expose_secret();
        assert_eq!(parse_key(&k[..k.len() - 1]), Err(KeyFormatError::Shape));
        assert_eq!(parse_key(&k[1..]), Err(KeyFormatError::Checksum));
        assert_eq!(parse_key(&format!("{k}x")), Err(KeyFormatError::Shape));
        assert_eq!(
            parse_key(&k.replace("pc_live_", "pc_live-")),
            Err(KeyFormatError::Shape)
        );
        assert_eq!(
            parse_key(&k.replace("pc_live", "pc_test")),
            Err(KeyFormatError::Checksum),
            "the prefix is covered by the checksum"
        );
        assert_eq!(parse_key(""), Err(KeyFormatError::Shape));
    }
}

/// Properties of the key format over generated keys.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::api_key::KeyDigest;

    proptest! {
        #[test]
        fn generated_keys_round_trip(prefix in "[a-z][a-z0-9_]{0,20}[a-z0-9]") {
            prop_assume!(check_prefix(&prefix).is_ok());
            let k = generate_key(&prefix).unwrap();
            let parsed = parse_key(k.expose_secret()).unwrap();
            prop_assert_eq!(parsed.prefix(), prefix.as_str());
            prop_assert_eq!(KeyDigest::parse(&k.digest().to_string()).unwrap(), k.digest());
        }
        #[test]
        fn the_checksum_catches_one_substitution_or_adjacent_swap(
            pos in any::<proptest::sample::Index>(), c in "[0-9A-Za-z_]", swap in any::<bool>(),
        ) {
            let k = generate_key("pc_test").unwrap();
            let original = k.expose_secret().as_bytes();
            let mut bytes = original.to_vec();
            if swap {
                let i = pos.index(bytes.len() - 1);
                bytes.swap(i, i + 1);
            } else {
                let i = pos.index(bytes.len());
                bytes[i] = c.as_bytes()[0];
            }
            prop_assume!(bytes != original);
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(parse_key(&changed).is_err());
        }
    }
}
