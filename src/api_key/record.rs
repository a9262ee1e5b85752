//! A key record: the public facts about one key and its digest, never the key.

use std::sync::Arc;
use std::time::SystemTime;

use super::KeyDigest;
use crate::{AuthMethod, ConfigError, Principal, Scopes};

/// One key as the store knows it: public facts and the digest, never the key.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use portcullis::api_key::{KeyDigest, KeyRecord};
/// use portcullis::Scopes;
///
/// let record = KeyRecord::new("billing", KeyDigest::of("pc_live_..."))?
///     .with_scopes(Scopes::parse("jobs:read jobs:write")?)
///     .with_tier("gold")?
///     .expires_at(SystemTime::now() + Duration::from_secs(90 * 86_400));
/// assert_eq!(record.id(), "billing");
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct KeyRecord {
    pub(super) id: Arc<str>,
    pub(super) digest: KeyDigest,
    pub(super) scopes: Scopes,
    pub(super) tier: Option<Arc<str>>,
    pub(super) not_before: Option<SystemTime>,
    pub(super) expires_at: Option<SystemTime>,
    pub(super) revoked: bool,
}

/// Ids and tiers: 1 to 64 characters of `A-Z a-z 0-9 . _ : -`, safe in logs and as
/// rate-limit keys.
pub(crate) fn check_name(what: &str, s: &str) -> Result<(), ConfigError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(format!(
            "{what} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
        )))
    }
}

impl KeyRecord {
    /// A valid, unrevoked record without scopes, tier or validity window.
    ///
    /// The id is the key's public name in logs and audit events; as the principal
    /// identity `api_key:<id>` it keys rate limiting (a service token whose `sub` is
    /// the same text is another principal). Several records may share an id (old and
    /// new key of one client during rotation): they are one principal.
    pub fn new(id: &str, digest: KeyDigest) -> Result<Self, ConfigError> {
        check_name("key id", id)?;
        Ok(Self {
            id: id.into(),
            digest,
            scopes: Scopes::default(),
            tier: None,
            not_before: None,
            expires_at: None,
            revoked: false,
        })
    }

    /// Sets the scopes the key grants.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }

    /// Sets the rate-limit tier.
    pub fn with_tier(mut self, tier: &str) -> Result<Self, ConfigError> {
        check_name("tier", tier)?;
        self.tier = Some(tier.into());
        Ok(self)
    }

    /// The key is refused before this time.
    pub fn not_before(mut self, t: SystemTime) -> Self {
        self.not_before = Some(t);
        self
    }

    /// The key is refused from this time on.
    pub fn expires_at(mut self, t: SystemTime) -> Self {
        self.expires_at = Some(t);
        self
    }

    /// Marks the key revoked (or not).
    pub fn revoked(mut self, revoked: bool) -> Self {
        self.revoked = revoked;
        self
    }

    /// The public id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The key's digest.
    pub fn digest(&self) -> &KeyDigest {
        &self.digest
    }
    /// The granted scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }
    /// The rate-limit tier.
    pub fn tier(&self) -> Option<&str> {
        self.tier.as_deref()
    }
    /// Start of validity, if any.
    pub fn valid_from(&self) -> Option<SystemTime> {
        self.not_before
    }
    /// End of validity, if any.
    pub fn valid_until(&self) -> Option<SystemTime> {
        self.expires_at
    }
    /// Whether the key is revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked
    }

    pub(super) fn principal(&self) -> Principal {
        let p =
            Principal::new(self.id.clone(), AuthMethod::ApiKey).with_scopes(self.scopes.clone());
        match &self.tier {
            Some(t) => p.with_tier(t.clone()),
            None => p,
        }
    }
}
