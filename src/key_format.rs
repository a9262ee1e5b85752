//! The shape and checksum of this crate's API keys, `<prefix>_<random><checksum>`:
//! shared by the key parser ([`crate::api_key`]) and the redactor, which finds keys
//! of any prefix in log text by the same checksum.
//!
//! Pure functions over bytes, no allocation.

/// Base62 characters of CSPRNG output in a key: 22 characters carry 130.9 bits.
pub(crate) const RANDOM_LEN: usize = 22;

/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
pub(crate) const CHECKSUM_LEN: usize = 6;

/// Base62 characters after the prefix's `_`: the random part and the checksum.
#[cfg_attr(not(feature = "redact"), allow(dead_code))]
pub(crate) const BODY_LEN: usize = RANDOM_LEN + CHECKSUM_LEN;

/// The longest prefix (without its `_`).
pub(crate) const MAX_PREFIX_LEN: usize = 32;

/// The base62 digits, in value order.
pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Character classes, one bit each, for [`all_in`].
pub(crate) const ALNUM: u8 = 1;
pub(crate) const PREFIX: u8 = 2;
const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] |= ALNUM;
        }
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' {
            t[b] |= PREFIX;
        }
        b += 1;
    }
    t
};

/// Whether every byte is of `class`: a table lookup per byte, without branches
/// (this runs on every presented key).
#[inline]
pub(crate) fn all_in(bytes: &[u8], class: u8) -> bool {
    bytes
        .iter()
        .fold(class, |acc, &b| acc & CLASSES[usize::from(b)])
        == class
}

/// Whether `p` is a key prefix: 1 to 32 characters of `a-z`, `0-9` and `_`,
/// starting with a letter and not ending with `_`.
pub(crate) fn is_prefix(p: &[u8]) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PREFIX_LEN
        && p[0].is_ascii_lowercase()
        && p[p.len() - 1] != b'_'
        && all_in(p, PREFIX)
}

/// Whether `region` ends with a key prefix that, followed by `_` and `body`, makes a
/// key whose checksum verifies. Every suffix of `region` that starts with a letter
/// is tried (the caller has checked `region` is at most [`MAX_PREFIX_LEN`] bytes of
/// `a-z 0-9 _` not ending in `_`, and `body` is [`BODY_LEN`] letters and digits).
///
/// Most texts are refused before any CRC: six base62 digits spell a number below
/// 2^32, as every checksum does, for only 7.6% of them. Not constant time: this
/// finds keys in log text, and the checksum is no secret.
#[cfg_attr(not(feature = "redact"), allow(dead_code))]
pub(crate) fn ends_with_checksummed_prefix(region: &[u8], body: &[u8]) -> bool {
    debug_assert!(region.len() <= MAX_PREFIX_LEN && body.len() == BODY_LEN);
    let expected = base62_value(&body[RANDOM_LEN..]);
    if expected > u64::from(u32::MAX) {
        return false;
    }
    // `region`, `_` and the random part, contiguous: each start is one CRC.
    let mut buf = [0u8; MAX_PREFIX_LEN + 1 + RANDOM_LEN];
    let n = region.len();
    buf[..n].copy_from_slice(region);
    buf[n] = b'_';
    buf[n + 1..n + 1 + RANDOM_LEN].copy_from_slice(&body[..RANDOM_LEN]);
    let data = &buf[..n + 1 + RANDOM_LEN];
    (0..n).any(|k| region[k].is_ascii_lowercase() && u64::from(crc32(&data[k..])) == expected)
}

/// The number spelled by base62 digits (of [`ALPHABET`], most significant first;
/// the caller has checked they are alphanumeric).
pub(crate) fn base62_value(digits: &[u8]) -> u64 {
    digits
        .iter()
        .fold(0, |n, &d| n * 62 + u64::from(BASE62_DIGITS[usize::from(d)]))
}

/// Each alphanumeric byte's value in [`ALPHABET`] (0 elsewhere).
const BASE62_DIGITS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// CRC32 (IEEE) of `data` as six base62 digits, most significant first.
#[cfg_attr(not(feature = "api-key"), allow(dead_code))]
pub(crate) fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32(data);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// CRC-32 (IEEE, the checksum of GitHub-style tokens) of `data`.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        // The standard CRC-32/ISO-HDLC check value.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn crc32_matches_the_bitwise_definition_at_every_length() {
        fn bitwise(data: &[u8]) -> u32 {
            let mut c = !0u32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in 0..data.len() {
            assert_eq!(crc32(&data[..n]), bitwise(&data[..n]), "{n} bytes");
        }
    }

    #[test]
    fn base62_value_reads_what_checksum_writes() {
        for n in [0, 1, 61, 62, 12_345, 0xCBF4_3926, u32::MAX - 1, u32::MAX] {
            let mut text = [b'0'; CHECKSUM_LEN];
            let mut m = n;
            for slot in text.iter_mut().rev() {
                *slot = ALPHABET[(m % 62) as usize];
                m /= 62;
            }
            assert_eq!(base62_value(&text), u64::from(n), "{n}");
        }
        assert_eq!(base62_value(b"zzzzzz"), 62u64.pow(6) - 1);
        // Every text with a value at or above 2^32 is refused: it equals no CRC.
        assert!(base62_value(b"4gfFC4") > u64::from(u32::MAX));
    }

    #[test]
    fn the_documented_example_key_checks() {
        let key = b"pc_live_EXAMPLExDOxNOTxUSE00000bJVDo";
        assert!(ends_with_checksummed_prefix(&key[..7], &key[8..]));
        assert!(ends_with_checksummed_prefix(b"x_9pc_live", &key[8..]));
        assert!(!ends_with_checksummed_prefix(b"pc_test", &key[8..]));
        assert!(!ends_with_checksummed_prefix(b"c_live", &key[8..]));
        assert!(is_prefix(b"pc_live") && !is_prefix(b"pc_") && !is_prefix(b"Pc"));
    }
}
