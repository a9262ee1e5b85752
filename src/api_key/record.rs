//! A key record: the public facts about one key and its digest, never the key.

use std::sync::Arc;
use std::time::SystemTime;

use super::KeyDigest;
use crate::principal::check_name;
use crate::{AuthMethod, ConfigError, IpSet, Principal, Scopes};

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
    pub(super) policy: Option<Arc<KeyPolicy>>,
}

/// What a key allows beyond its scopes: the addresses it may be used from, and how
/// many requests it may make in all. Travels with a verified key to the layers that
/// enforce it.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyPolicy {
    /// The client addresses the key is accepted from (checked by the
    /// authentication layer against [`ClientIp`](crate::ClientIp)).
    pub(crate) allowed_ips: Option<IpSet>,
    /// The key's usage credits (spent by the rate-limit layer).
    pub(crate) credits: Option<Credits>,
}

/// A key's usage credits: how many requests it may make in all, and the name its
/// spent count is kept under (`k:` and 32 hex digits of SHA-256 over the key's
/// digest: no key material, the same on every instance).
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
pub(crate) struct Credits {
    pub(crate) total: u64,
    pub(crate) name: Arc<str>,
}

impl Credits {
    fn new(total: u64, digest: &KeyDigest) -> Self {
        use sha2::{Digest, Sha256};
        let d = Sha256::new()
            .chain_update(b"portcullis credits\0")
            .chain_update(digest.as_bytes())
            .finalize();
        let mut name = String::with_capacity(34);
        name.push_str("k:");
        for b in &d[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        Self {
            total,
            name: name.into(),
        }
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
            policy: None,
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

    /// Accepts the key only from client addresses inside `networks` (the resolved
    /// [`ClientIp`](crate::ClientIp), as the global allowlist reads it). From any
    /// other address, or when no address is known, the key is refused with 403 after
    /// it is verified, exactly as the global allowlist refuses (`key_ip_denied` in
    /// the logs).
    pub fn with_allowed_ips(mut self, networks: IpSet) -> Self {
        Arc::make_mut(self.policy.get_or_insert_default()).allowed_ips = Some(networks);
        self
    }

    /// Allows the key `credits` requests in all (0: none). Each request the
    /// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) admits spends one,
    /// atomically (in memory, or on Redis when the limiter has its Redis backend);
    /// once none are left the key's requests get 429 (`credits_exhausted` in the
    /// logs). The count spent is kept by the limiter, by key: raising the number in
    /// the key file grants more.
    pub fn with_credits(mut self, credits: u64) -> Self {
        let c = Credits::new(credits, &self.digest);
        Arc::make_mut(self.policy.get_or_insert_default()).credits = Some(c);
        self
    }

    /// The client addresses the key is accepted from, if it is restricted.
    pub fn allowed_ips(&self) -> Option<&IpSet> {
        self.policy.as_ref()?.allowed_ips.as_ref()
    }

    /// The key's usage credits (requests allowed in all), if it has any.
    pub fn credits(&self) -> Option<u64> {
        Some(self.policy.as_ref()?.credits.as_ref()?.total)
    }

    pub(crate) fn policy(&self) -> Option<&Arc<KeyPolicy>> {
        self.policy.as_ref()
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
