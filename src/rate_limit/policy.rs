//! Named policies: a default quota, per-tier quotas and per-principal overrides.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::HeaderValue;

use super::key::counted;
use super::quota::{Gcra, Quota};
use crate::principal::identity;
use crate::{AuthMethod, ConfigError, Principal};

/// A named limit: a default [`Quota`], quotas per tier (the
/// [`Principal::tier`]), and overrides per principal. The most specific one
/// applies: principal override, then tier, then the default.
///
/// An override names a principal by method and id, as its
/// [`identity`](Principal::identity) does: an override for the API key
/// `batch-importer` does not apply to a service token whose `sub` is
/// `batch-importer`.
///
/// The name appears in the `RateLimit-Policy` and `RateLimit` fields and in audit
/// events: 1 to 32 characters of `A-Z a-z 0-9 _ - .`.
///
/// ```
/// use portcullis::AuthMethod;
/// use portcullis::rate_limit::{Policy, Quota};
/// let p = Policy::new("burst", Quota::per_second(10)?)?
///     .tier("gold", Quota::per_second(100)?)?
///     .principal(AuthMethod::ApiKey, "batch-importer", Quota::per_second(500)?)?;
/// # let _ = p;
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Policy {
    name: Arc<str>,
    default: Quota,
    tiers: Vec<(Arc<str>, Quota)>,
    /// By [`Principal::identity`].
    principals: Vec<(Arc<str>, Quota)>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("default", &self.default)
            .field("tiers", &self.tiers)
            .field("principals", &self.principals)
            .finish()
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "rate-limit policy name must be 1 to 32 characters of A-Z a-z 0-9 _ - .",
        ))
    }
}

impl Policy {
    /// A policy named `name` with `default` for every key.
    pub fn new(name: &str, default: Quota) -> Result<Self, ConfigError> {
        check_name(name)?;
        Ok(Self {
            name: name.into(),
            default,
            tiers: Vec::new(),
            principals: Vec::new(),
        })
    }

    /// The quota for principals of tier `tier`. A tier named twice is an error.
    pub fn tier(mut self, tier: &str, quota: Quota) -> Result<Self, ConfigError> {
        if tier.is_empty() || self.tiers.iter().any(|(t, _)| &**t == tier) {
            return Err(ConfigError::new(format!(
                "rate-limit policy {}: tier names must be non-empty and unique",
                self.name
            )));
        }
        self.tiers.push((tier.into(), quota));
        Ok(self)
    }

    /// The quota for the principal that authenticated by `method` with id `id` (a
    /// key id or a token `sub`), whatever its tier. It applies to that method only:
    /// a key and a token subject with the same id are two principals.
    ///
    /// An empty id, the same principal twice, and
    /// [`AuthMethod::Unauthenticated`] are errors: the unauthenticated mode's
    /// requests name no one and are limited per client address with the default
    /// quota.
    ///
    /// ```
    /// use portcullis::rate_limit::{Policy, Quota};
    /// use portcullis::{AuthMethod, Principal};
    /// let p = Policy::new("api", Quota::per_second(10)?)?
    ///     .principal(AuthMethod::ServiceToken, "scheduler", Quota::per_second(500)?)?;
    /// let token = Principal::new("scheduler", AuthMethod::ServiceToken);
    /// let key = Principal::new("scheduler", AuthMethod::ApiKey);
    /// assert_eq!(p.quota_for(Some(&token)).count(), 500);
    /// assert_eq!(p.quota_for(Some(&key)).count(), 10);
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn principal(
        mut self,
        method: AuthMethod,
        id: &str,
        quota: Quota,
    ) -> Result<Self, ConfigError> {
        if method == AuthMethod::Unauthenticated {
            return Err(ConfigError::new(format!(
                "rate-limit policy {}: an override names an API key or a service token; unauthenticated requests are limited per client address",
                self.name
            )));
        }
        let identity = identity(method, id);
        if id.is_empty() || self.principals.iter().any(|(p, _)| **p == *identity) {
            return Err(ConfigError::new(format!(
                "rate-limit policy {}: principal overrides must be non-empty and unique",
                self.name
            )));
        }
        self.principals.push((identity.into(), quota));
        Ok(self)
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The quota that applies to `principal` (or to an anonymous request). The
    /// unauthenticated mode's principal gets the default quota, as an anonymous
    /// request does.
    ///
    /// ```
    /// use portcullis::rate_limit::{Policy, Quota};
    /// use portcullis::{AuthMethod, Principal};
    /// let p = Policy::new("api", Quota::per_second(10)?)?.tier("gold", Quota::per_second(100)?)?;
    /// let gold = Principal::new("acme", AuthMethod::ApiKey).with_tier("gold");
    /// assert_eq!(p.quota_for(Some(&gold)).count(), 100);
    /// assert_eq!(p.quota_for(None).count(), 10);
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn quota_for(&self, principal: Option<&Principal>) -> Quota {
        if let Some(p) = counted(principal) {
            if let Some((_, q)) = self.principals.iter().find(|(i, _)| &**i == p.identity()) {
                return *q;
            }
            if let Some(t) = p.tier()
                && let Some((_, q)) = self.tiers.iter().find(|(n, _)| &**n == t)
            {
                return *q;
            }
        }
        self.default
    }

    pub(crate) fn compile(&self) -> CompiledPolicy {
        let entry = |q: Quota| Entry::new(&self.name, q);
        CompiledPolicy {
            name: self.name.clone(),
            default: entry(self.default),
            tiers: Overrides::new(
                self.tiers
                    .iter()
                    .map(|(t, q)| (t.clone(), entry(*q)))
                    .collect(),
            ),
            principals: Overrides::new(
                self.principals
                    .iter()
                    .map(|(p, q)| (p.clone(), entry(*q)))
                    .collect(),
            ),
        }
    }
}

/// One quota of one policy, with its precomputed `RateLimit-Policy` item.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) quota: Quota,
    pub(crate) gcra: Gcra,
    pub(crate) item: HeaderValue,
}

impl Entry {
    fn new(name: &str, quota: Quota) -> Self {
        let item = format!(
            "\"{name}\";q={};w={}",
            quota.count(),
            quota.window().as_secs()
        );
        Self {
            quota,
            gcra: quota.gcra(),
            item: HeaderValue::from_str(&item).expect("checked name and integers"),
        }
    }
}

/// A policy ready for lookups.
#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    pub(crate) name: Arc<str>,
    default: Entry,
    tiers: Overrides,
    principals: Overrides,
}

/// The quotas of named tiers or principals: a handful are scanned, more go in a map
/// keyed with a random SipHash. The names are the operator's, never the client's,
/// and either way a lookup is bounded.
#[derive(Debug)]
enum Overrides {
    Few(Vec<(Arc<str>, Entry)>),
    Many(HashMap<Arc<str>, Entry>),
}

impl Overrides {
    /// The most entries scanned rather than hashed.
    const SCAN_MAX: usize = 8;

    fn new(entries: Vec<(Arc<str>, Entry)>) -> Self {
        if entries.len() <= Self::SCAN_MAX {
            Overrides::Few(entries)
        } else {
            Overrides::Many(entries.into_iter().collect())
        }
    }

    #[inline]
    fn get(&self, name: &str) -> Option<&Entry> {
        match self {
            Overrides::Few(v) => v.iter().find(|(n, _)| **n == *name).map(|(_, e)| e),
            Overrides::Many(m) => m.get(name),
        }
    }
}

impl CompiledPolicy {
    #[inline]
    pub(crate) fn entry(&self, principal: Option<&Principal>) -> &Entry {
        if let Some(p) = counted(principal) {
            if let Some(e) = self.principals.get(p.identity()) {
                return e;
            }
            if let Some(e) = p.tier().and_then(|t| self.tiers.get(t)) {
                return e;
            }
        }
        &self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;

    #[test]
    fn compiled_lookups_agree_with_the_policy_scanned_or_hashed() {
        for n in [
            0,
            1,
            Overrides::SCAN_MAX as u32,
            Overrides::SCAN_MAX as u32 + 1,
            40,
        ] {
            let mut policy = Policy::new("p", Quota::per_second(1).unwrap()).unwrap();
            for i in 0..n {
                let q = Quota::per_second(100 + i).unwrap();
                // Even overrides name keys, odd ones tokens.
                let method = [AuthMethod::ApiKey, AuthMethod::ServiceToken][i as usize % 2];
                policy = policy
                    .principal(method, &format!("id{i}"), q)
                    .unwrap()
                    .tier(&format!("tier{i}"), Quota::per_second(1000 + i).unwrap())
                    .unwrap();
            }
            if n > 0 {
                // `id0` is named for both methods.
                let q = Quota::per_second(7).unwrap();
                policy = policy
                    .principal(AuthMethod::ServiceToken, "id0", q)
                    .unwrap();
            }
            let compiled = policy.compile();
            let check = |p: Option<&Principal>| {
                assert_eq!(
                    compiled.entry(p).quota.count(),
                    policy.quota_for(p).count(),
                    "{n} overrides, {:?}",
                    p.map(|p| (p.identity().to_owned(), p.tier().map(str::to_owned)))
                );
            };
            check(None);
            let methods = [
                AuthMethod::ApiKey,
                AuthMethod::ServiceToken,
                AuthMethod::Unauthenticated,
            ];
            for id in ["id0", "id1", "id7", "id8", "id39", "nobody", "id", ""] {
                for method in methods {
                    for tier in [
                        None,
                        Some("tier0"),
                        Some("tier8"),
                        Some("tier39"),
                        Some("none"),
                    ] {
                        let mut p = Principal::new(id, method);
                        if let Some(t) = tier {
                            p = p.with_tier(t);
                        }
                        check(Some(&p));
                    }
                }
            }
        }
    }

    #[test]
    fn an_override_applies_to_the_named_method_only() {
        let q = |n| Quota::per_second(n).unwrap();
        let policy = Policy::new("p", q(1))
            .unwrap()
            .tier("gold", q(2))
            .unwrap()
            .principal(AuthMethod::ApiKey, "svc", q(10))
            .unwrap()
            .principal(AuthMethod::ServiceToken, "svc", q(20))
            .unwrap()
            .principal(AuthMethod::ServiceToken, "only-token", q(30))
            .unwrap();
        let compiled = policy.compile();
        let count = |id: &str, method| {
            let p = Principal::new(id, method).with_tier("gold");
            let n = policy.quota_for(Some(&p)).count();
            assert_eq!(compiled.entry(Some(&p)).quota.count(), n);
            n
        };
        assert_eq!(count("svc", AuthMethod::ApiKey), 10);
        assert_eq!(count("svc", AuthMethod::ServiceToken), 20);
        assert_eq!(count("only-token", AuthMethod::ServiceToken), 30);
        assert_eq!(
            count("only-token", AuthMethod::ApiKey),
            2,
            "the tier, not the token's override"
        );
        // Ids that spell an identity do not reach another method's override.
        assert_eq!(count("service_token:svc", AuthMethod::ApiKey), 2);
        // The unauthenticated mode's principal gets the default, tier or not.
        assert_eq!(count("svc", AuthMethod::Unauthenticated), 1);
    }

    #[test]
    fn bad_overrides_are_configuration_errors() {
        let q = Quota::per_second(1).unwrap();
        let p = || Policy::new("p", q).unwrap();
        assert!(p().principal(AuthMethod::ApiKey, "", q).is_err());
        assert!(
            p().principal(AuthMethod::Unauthenticated, "unauthenticated", q)
                .is_err()
        );
        let twice = p()
            .principal(AuthMethod::ApiKey, "a", q)
            .unwrap()
            .principal(AuthMethod::ApiKey, "a", q);
        assert!(twice.unwrap_err().to_string().contains("unique"));
        // The same id for two methods is two principals.
        assert!(
            p().principal(AuthMethod::ApiKey, "a", q)
                .unwrap()
                .principal(AuthMethod::ServiceToken, "a", q)
                .is_ok()
        );
    }
}
