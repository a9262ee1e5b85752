//! The immutable key store with its O(1) verification.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::format::{KeyFormatError, MAX_KEY_LEN, MIN_LEGACY_KEY_LEN, parse_key};
use super::record::{KeyPolicy, KeyRecord};
use super::{KeyDigest, file};
use crate::rejection::DenialReason;
use crate::{ConfigError, Principal, Scopes};

/// Why a presented key was refused, and which record it matched, if any.
///
/// `key_id` is set only when the digest matched a record (revoked, expired, not yet
/// valid): the id is public, and naming it in the audit log tells an operator whose
/// old key is still in use. The client sees the same 401 either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRejection {
    reason: DenialReason,
    key_id: Option<Arc<str>>,
}

impl KeyRejection {
    fn new(reason: DenialReason) -> Self {
        Self {
            reason,
            key_id: None,
        }
    }

    /// One of `InvalidKeyFormat`, `UnknownKey`, `RevokedKey`, `NotYetValidKey`,
    /// `ExpiredKey`.
    pub fn reason(&self) -> DenialReason {
        self.reason
    }

    /// The id of the matched record, for revoked, expired and not-yet-valid keys.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }
}

/// What a lookup touches, kept small so that one map slot is about one cache line:
/// the prebuilt principal and the validity window in milliseconds since the epoch.
struct Slot {
    principal: Principal,
    not_before_ms: i64,
    expires_at_ms: i64,
    revoked: bool,
    /// Index of the full record in `KeyStore::records`.
    record: u32,
}

/// Milliseconds since the epoch, rounded down (`ceil` false) or up.
fn epoch_ms_rounded(t: SystemTime, ceil: bool) -> i64 {
    let (d, negative) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d, false),
        Err(e) => (e.duration(), true),
    };
    let partial = d.subsec_nanos() % 1_000_000 != 0;
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let up = i64::from(partial);
    // Rounding a negative time up is rounding its magnitude down, and vice versa.
    match (negative, ceil) {
        (false, false) => ms,
        (false, true) => ms.saturating_add(up),
        (true, false) => -ms.saturating_add(up),
        (true, true) => -ms,
    }
}

fn epoch_ms(t: SystemTime) -> i64 {
    epoch_ms_rounded(t, false)
}

/// Not-before times round up and expiry times and `now` round down, so rounding
/// never lets a key in early or keeps it valid late.
fn epoch_ms_ceil(t: SystemTime) -> i64 {
    epoch_ms_rounded(t, true)
}

/// The map's hasher: the first 8 bytes of the digest, not keyed.
///
/// Why that is safe:
/// - The table holds only the operator's keys, fixed when the store is built, and a
///   lookup of an absent key inserts nothing. No request adds an entry, lengthens a
///   probe sequence or makes the table grow: each costs one lookup in a table whose
///   shape no client influences.
/// - The operator's digests are SHA-256 outputs, uniform already: they spread over
///   the buckets without a keyed hash.
/// - A client can pick guesses whose digests land in a bucket of its choice (a
///   bucket and its tag are a few dozen bits of the digest, found by trial), but
///   that only decides where its own lookup probes. The most that lookup's timing
///   could reveal is whether some stored digest shares those bits: part of a digest,
///   which gives nothing towards a generated key's 128 random bits (SHA-256 is
///   one-way; a key from a plain list is as strong as whoever chose it). A match is
///   confirmed by the constant-time comparison of all 32 bytes.
///
/// A keyed hash (SipHash) would cost a second hash per lookup and change none of this.
#[derive(Clone, Copy, Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached through `KeyDigest`'s `Hash`, which writes one u64; fold
        // anything else in so the hasher stays correct if that changes.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type DigestMap = HashMap<KeyDigest, Slot, BuildHasherDefault<DigestHasher>>;

/// An immutable set of key records, indexed by digest.
///
/// Verification digests the presented key once (SHA-256), finds the record by digest
/// in a hash map (O(1) however many keys), confirms with a constant-time comparison
/// of the 32-byte digests, then checks revocation and the validity window. There is
/// no scan over the keys and no `==` on key material.
///
/// The map hashes a digest by its first 8 bytes, without a random key. That is safe
/// because the table holds only the configured keys and a lookup never inserts: a
/// client cannot change the table, and the most a chosen guess can do is pick the
/// bucket its own lookup probes, whose timing reveals at most part of a stored key's
/// digest (the bits that choose a bucket), nothing towards the key.
///
/// Memory: roughly 300 bytes per key plus its id and scopes (the record, a prebuilt
/// `Principal`, and a 64-byte map slot).
///
/// An empty store cannot be built: portcullis never runs open by accident.
///
/// ```
/// use std::time::SystemTime;
/// use portcullis::api_key::{generate_key, KeyRecord, KeyStore};
/// use portcullis::rejection::DenialReason;
///
/// let key = generate_key("pc_live")?;
/// let store = KeyStore::from_records([KeyRecord::new("billing", key.digest())?])?;
/// let p = store.verify(key.expose_secret(), SystemTime::now()).unwrap();
/// assert_eq!(p.id(), "billing");
///
/// let other = generate_key("pc_live")?;
/// let err = store.verify(other.expose_secret(), SystemTime::now()).unwrap_err();
/// assert_eq!(err.reason(), DenialReason::UnknownKey);
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
pub struct KeyStore {
    by_digest: DigestMap,
    records: Vec<KeyRecord>,
    /// Whether keys outside the generated format were listed (a plain key list).
    legacy: bool,
}

impl KeyStore {
    /// Builds a store from records. Fails on an empty list or two records with the
    /// same digest.
    pub fn from_records<I>(records: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = KeyRecord>,
    {
        Self::build(records.into_iter().map(|r| (r, None)), false)
    }

    /// `positions` names each record in errors (e.g. "key file line 7").
    pub(super) fn build<I>(records: I, legacy: bool) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (KeyRecord, Option<String>)>,
    {
        let input = records.into_iter();
        let mut by_digest =
            DigestMap::with_capacity_and_hasher(input.size_hint().0, Default::default());
        let mut records = Vec::with_capacity(input.size_hint().0);
        for (i, (record, pos)) in input.enumerate() {
            let index =
                u32::try_from(i).map_err(|_| ConfigError::new("more than 4 294 967 295 keys"))?;
            // Credits are spent by the rate-limit layer: without it they would be
            // ignored, so a key with credits is refused rather than left unlimited.
            if cfg!(not(feature = "rate-limit")) && record.credits().is_some() {
                let at = pos.unwrap_or_else(|| format!("record {}", i + 1));
                return Err(ConfigError::new(format!(
                    "{at}: key `{}` has credits, which need the rate-limit feature",
                    record.id
                )));
            }
            match by_digest.entry(record.digest) {
                Entry::Occupied(_) => {
                    let at = pos.unwrap_or_else(|| format!("record {}", i + 1));
                    return Err(ConfigError::new(format!(
                        "{at}: key `{}` has the same digest as an earlier key",
                        record.id
                    )));
                }
                Entry::Vacant(v) => {
                    v.insert(Slot {
                        principal: record.principal(),
                        not_before_ms: record.not_before.map_or(i64::MIN, epoch_ms_ceil),
                        expires_at_ms: record.expires_at.map_or(i64::MAX, epoch_ms),
                        revoked: record.revoked,
                        record: index,
                    });
                }
            }
            records.push(record);
        }
        if by_digest.is_empty() {
            return Err(ConfigError::new(
                "the key store is empty: configure at least one key (portcullis never runs open by default)",
            ));
        }
        Ok(Self {
            by_digest,
            records,
            legacy,
        })
    }

    /// Parses a TOML key file's text (format in the module docs). Errors name the
    /// line and column, never a value.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        KeyStore::build(file::parse_key_file(text)?, false)
    }

    /// Reads and parses a TOML key file: a regular file of at most 1 MiB, read
    /// without blocking (see [`reload`](crate::reload)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let content = crate::reload::read_file(path, crate::reload::DEFAULT_MAX_FILE_LEN)?;
        Self::from_file_bytes(path, content.bytes())
    }

    /// Parses the bytes read from the key file at `path`; errors name the path.
    pub(crate) fn from_file_bytes(path: &Path, bytes: &[u8]) -> Result<Self, ConfigError> {
        let named =
            |e: &dyn fmt::Display| ConfigError::new(format!("key file {}: {e}", path.display()));
        let text = std::str::from_utf8(bytes).map_err(|_| named(&"not UTF-8"))?;
        file::parse_key_file(text)
            .and_then(|records| KeyStore::build(records, false))
            .map_err(|e| named(&e))
    }

    /// Reads a comma-separated list of raw keys from the environment variable `var`.
    /// See [`KeyStore::from_key_list`].
    pub fn from_env(var: &str, scopes: Scopes) -> Result<Self, ConfigError> {
        let list = std::env::var(var).map_err(|e| match e {
            std::env::VarError::NotPresent => {
                ConfigError::new(format!("environment variable {var} is not set"))
            }
            std::env::VarError::NotUnicode(_) => {
                ConfigError::new(format!("environment variable {var} is not valid UTF-8"))
            }
        })?;
        Self::from_key_list(&list, scopes).map_err(|e| ConfigError::new(format!("{var}: {e}")))
    }

    /// Builds a store from a comma-separated list of raw keys, the simple case.
    ///
    /// Every key gets `scopes` and the id `env-<n>`, its position in the list (`env-1`
    /// for the first): stable across restarts of the same list, and derived from
    /// nothing secret. (An id taken from the key's digest would let anyone who reads
    /// the logs check guesses of a key chosen by hand.) Each entry
    /// is trimmed; an empty entry, one under 32 characters, one with characters outside
    /// printable ASCII or a comma, a key in the generated format whose checksum is
    /// wrong (a typo), and a repeated key are load errors naming the entry's position.
    /// Keys need not be in the generated format. The prefix of each key shaped
    /// `<prefix>_<20 or more letters and digits>` is registered with the log
    /// redactor (feature `redact`), which then hides such keys even mistyped.
    ///
    /// ```
    /// use portcullis::api_key::KeyStore;
    /// use portcullis::Scopes;
    /// let store = KeyStore::from_key_list(
    ///     "0123456789abcdef0123456789abcdef, fedcba9876543210fedcba9876543210",
    ///     Scopes::parse("jobs:read")?,
    /// )?;
    /// assert_eq!(store.len(), 2);
    /// let err = KeyStore::from_key_list("short", Scopes::default()).unwrap_err();
    /// assert!(err.to_string().contains("entry 1"));
    /// assert!(!err.to_string().contains("short"));
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn from_key_list(list: &str, scopes: Scopes) -> Result<Self, ConfigError> {
        let mut records = Vec::new();
        for (i, entry) in list.split(',').enumerate() {
            let n = i + 1;
            let key = entry.trim();
            if key.is_empty() {
                return Err(ConfigError::new(format!("key list entry {n} is empty")));
            }
            if key.len() < MIN_LEGACY_KEY_LEN || key.len() > MAX_KEY_LEN {
                return Err(ConfigError::new(format!(
                    "key list entry {n} must be {MIN_LEGACY_KEY_LEN} to {MAX_KEY_LEN} characters long"
                )));
            }
            if !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
                return Err(ConfigError::new(format!(
                    "key list entry {n} has a character outside printable ASCII"
                )));
            }
            if parse_key(key) == Err(KeyFormatError::Checksum) {
                return Err(ConfigError::new(format!(
                    "key list entry {n} looks like a generated key but its checksum is wrong (a typo?)"
                )));
            }
            let id = format!("env-{n}");
            records.push((
                KeyRecord::new(&id, KeyDigest::of(key))?.with_scopes(scopes.clone()),
                Some(format!("key list entry {n}")),
            ));
        }
        let store = Self::build(records, true)?;
        // Every redactor learns the listed keys' prefixes, so a mistyped or truncated
        // key is hidden in logs too (see the `redact` module).
        #[cfg(feature = "redact")]
        for key in list.split(',') {
            crate::redact::register_prefix_of(key.trim());
        }
        Ok(store)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Always `false`: an empty store cannot be built.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The records, in the order they were given (file order for a key file).
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.records.iter()
    }

    /// Verifies a presented key at time `now`; on success the key's [`Principal`].
    ///
    /// Order: length and format (checksum) before any lookup, then the digest lookup
    /// and constant-time confirmation, then revocation, not-before and expiry.
    pub fn verify(&self, key: &str, now: SystemTime) -> Result<Principal, KeyRejection> {
        self.verify_at(key, || now).map(|(p, _)| p)
    }

    /// [`verify`](Self::verify), reading the clock only for a key that has a
    /// validity window (most have none).
    pub(crate) fn verify_at(
        &self,
        key: &str,
        now: impl FnOnce() -> SystemTime,
    ) -> Result<(Principal, Option<Arc<KeyPolicy>>), KeyRejection> {
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(KeyRejection::new(DenialReason::InvalidKeyFormat));
        }
        match parse_key(key) {
            Ok(_) => {}
            // Listed plain keys may have any shape; a wrong checksum never matches,
            // since listed keys in the generated format were checked at load.
            Err(KeyFormatError::Shape) if self.legacy && key.len() >= MIN_LEGACY_KEY_LEN => {}
            Err(_) => return Err(KeyRejection::new(DenialReason::InvalidKeyFormat)),
        }
        let digest = KeyDigest::of(key);
        // The map compares its keys with `KeyDigest`'s constant-time equality; the
        // explicit confirmation below keeps that guarantee visible here.
        let Some((stored_digest, slot)) = self.by_digest.get_key_value(&digest) else {
            return Err(KeyRejection::new(DenialReason::UnknownKey));
        };
        if !stored_digest.ct_eq(&digest) {
            return Err(KeyRejection::new(DenialReason::UnknownKey));
        }
        let timeless = slot.not_before_ms == i64::MIN && slot.expires_at_ms == i64::MAX;
        let reason = if slot.revoked {
            Some(DenialReason::RevokedKey)
        } else if timeless {
            None
        } else {
            let now = epoch_ms(now());
            if now < slot.not_before_ms {
                Some(DenialReason::NotYetValidKey)
            } else if now >= slot.expires_at_ms {
                Some(DenialReason::ExpiredKey)
            } else {
                None
            }
        };
        match reason {
            None => Ok((
                slot.principal.clone(),
                self.records[slot.record as usize].policy().cloned(),
            )),
            Some(reason) => Err(KeyRejection {
                reason,
                key_id: Some(self.records[slot.record as usize].id.clone()),
            }),
        }
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("keys", &self.by_digest.len())
            .field("plain_keys_allowed", &self.legacy)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;
    use crate::api_key::generate_key;
    use std::time::Duration;

    #[test]
    fn verification_order_and_reasons() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let keys: Vec<_> = (0..5).map(|_| generate_key("pc_test").unwrap()).collect();
        let store = KeyStore::from_records([
            KeyRecord::new("ok", keys[0].digest())
                .unwrap()
                .with_tier("gold")
                .unwrap(),
            KeyRecord::new("revoked", keys[1].digest())
                .unwrap()
                .revoked(true),
            KeyRecord::new("future", keys[2].digest())
                .unwrap()
                .not_before(now + hour),
            KeyRecord::new("old", keys[3].digest())
                .unwrap()
                .expires_at(now - hour),
        ])
        .unwrap();
        let p = store.verify(keys[0].expose_secret(), now).unwrap();
        assert_eq!((p.id(), p.tier()), ("ok", Some("gold")));
        assert_eq!(p.method(), AuthMethod::ApiKey);
        for (k, reason, id) in [
            (1, DenialReason::RevokedKey, Some("revoked")),
            (2, DenialReason::NotYetValidKey, Some("future")),
            (3, DenialReason::ExpiredKey, Some("old")),
            (4, DenialReason::UnknownKey, None),
        ] {
            let e = store.verify(keys[k].expose_secret(), now).unwrap_err();
            assert_eq!((e.reason(), e.key_id()), (reason, id));
        }
        // Valid again once the window opens.
        assert!(
            store
                .verify(keys[2].expose_secret(), now + 2 * hour)
                .is_ok()
        );
        // Plain keys are refused by a store of generated keys, before any lookup.
        let e = store.verify(&"x".repeat(40), now).unwrap_err();
        assert_eq!(e.reason(), DenialReason::InvalidKeyFormat);
        let e = store.verify("", now).unwrap_err();
        assert_eq!(e.reason(), DenialReason::InvalidKeyFormat);
    }

    #[test]
    fn empty_and_duplicate_stores_are_errors() {
        assert!(KeyStore::from_records([]).is_err());
        let d = KeyDigest::of("same");
        let err = KeyStore::from_records([
            KeyRecord::new("a", d).unwrap(),
            KeyRecord::new("b", d).unwrap(),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("record 2"), "{err}");
        assert!(KeyRecord::new("bad id", d).is_err());
        assert!(KeyRecord::new("", d).is_err());
    }

    #[test]
    fn key_lists() {
        let a = "A".repeat(32);
        let store =
            KeyStore::from_key_list(&format!(" {a} ,{}", "b".repeat(40)), Scopes::default())
                .unwrap();
        assert_eq!(store.len(), 2);
        let p = store.verify(&a, SystemTime::now()).unwrap();
        assert_eq!(p.id(), "env-1");
        let p = store.verify(&"b".repeat(40), SystemTime::now()).unwrap();
        assert_eq!(p.id(), "env-2");
        assert_eq!(
            store
                .verify(&"A".repeat(31), SystemTime::now())
                .unwrap_err()
                .reason(),
            DenialReason::InvalidKeyFormat
        );
        for (list, needle) in [
            ("", "entry 1 is empty"),
            (&format!("{a},"), "entry 2 is empty"),
            (&format!("{a},{}", "c".repeat(31)), "entry 2 must be"),
            (&format!("{a},{a}"), "entry 2"),
            (&format!("{}é", "c".repeat(32)), "printable ASCII"),
        ] {
            let e = KeyStore::from_key_list(list, Scopes::default()).unwrap_err();
            assert!(e.to_string().contains(needle), "{list:?}: {e}");
            assert!(!e.to_string().contains(&a));
        }
        // A generated key with a typo in a list is caught at load.
        let k = generate_key("pc_live").unwrap();
        let mut typo = k.expose_secret().to_owned();
        let last = typo.pop().unwrap();
        typo.push(if last == '0' { '1' } else { '0' });
        let e = KeyStore::from_key_list(&typo, Scopes::default()).unwrap_err();
        assert!(e.to_string().contains("checksum"));
        // A generated key is accepted in a list too.
        let s = KeyStore::from_key_list(k.expose_secret(), Scopes::default()).unwrap();
        assert!(s.verify(k.expose_secret(), SystemTime::now()).is_ok());
    }

    #[test]
    fn env_errors_name_the_variable() {
        let e =
            KeyStore::from_env("PORTCULLIS_TEST_UNSET_VARIABLE_3", Scopes::default()).unwrap_err();
        assert!(
            e.to_string()
                .contains("PORTCULLIS_TEST_UNSET_VARIABLE_3 is not set")
        );
    }

    #[test]
    fn millisecond_rounding() {
        let t = |ms: i64, extra_ns: u32| {
            let base = if ms >= 0 {
                UNIX_EPOCH + Duration::from_millis(ms as u64)
            } else {
                UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
            };
            base + Duration::from_nanos(extra_ns.into())
        };
        assert_eq!(epoch_ms(t(5, 0)), 5);
        assert_eq!(epoch_ms_ceil(t(5, 0)), 5);
        assert_eq!(epoch_ms(t(5, 1)), 5);
        assert_eq!(epoch_ms_ceil(t(5, 1)), 6);
        // -1.5 ms
        let neg = UNIX_EPOCH - Duration::from_micros(1500);
        assert_eq!(epoch_ms(neg), -2);
        assert_eq!(epoch_ms_ceil(neg), -1);
        assert_eq!(epoch_ms(t(-3, 0)), -3);
        assert_eq!(epoch_ms_ceil(t(-3, 0)), -3);
    }

    #[test]
    fn validity_edges() {
        let k = generate_key("pc_test").unwrap();
        let nb = UNIX_EPOCH + Duration::from_nanos(1_000_000_500);
        let exp = UNIX_EPOCH + Duration::from_secs(2);
        let store = KeyStore::from_records([KeyRecord::new("e", k.digest())
            .unwrap()
            .not_before(nb)
            .expires_at(exp)])
        .unwrap();
        let at = |t| {
            store
                .verify(k.expose_secret(), t)
                .map(|_| ())
                .map_err(|e| e.reason())
        };
        assert_eq!(
            at(nb - Duration::from_nanos(1)),
            Err(DenialReason::NotYetValidKey)
        );
        assert_eq!(
            at(nb),
            Err(DenialReason::NotYetValidKey),
            "rounded up to the next ms"
        );
        assert_eq!(at(UNIX_EPOCH + Duration::from_millis(1001)), Ok(()));
        assert_eq!(at(exp - Duration::from_millis(1)), Ok(()));
        assert_eq!(at(exp), Err(DenialReason::ExpiredKey));
    }

    #[test]
    fn debug_holds_no_digests() {
        let k = generate_key("pc_live").unwrap();
        let s = KeyStore::from_records([KeyRecord::new("x", k.digest()).unwrap()]).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(&k.digest().to_string()[7..]));
        assert!(!dbg.contains(k.expose_secret()));
    }

    proptest::proptest! {
        /// A listed key's id is its position in the list, whatever the key: an id
        /// carries nothing of the key (a digest prefix in every log line would let a
        /// reader test guesses of a key chosen by hand).
        #[test]
        fn listed_keys_ids_carry_nothing_of_the_keys(
            keys in proptest::collection::hash_set("[!-+\\--^`-~]{32,48}", 1..5),
        ) {
            let keys: Vec<String> = keys.into_iter().collect();
            let store = KeyStore::from_key_list(&keys.join(","), Scopes::default()).unwrap();
            for (i, key) in keys.iter().enumerate() {
                let p = store.verify(key, SystemTime::now()).unwrap();
                proptest::prop_assert_eq!(p.id(), format!("env-{}", i + 1));
            }
        }
    }
}
