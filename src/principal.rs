use std::fmt;
use std::sync::Arc;

use crate::ConfigError;

/// How a [`Principal`] proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthMethod {
    /// A key from the API-key store.
    ApiKey,
    /// A verified service token (JWT).
    ServiceToken,
    /// Nobody: authentication was switched off by an explicit, loudly named call.
    /// Handlers and logs can see that a request was let in unauthenticated.
    Unauthenticated,
}

impl AuthMethod {
    /// A stable lowercase name for logs: `api_key`, `service_token`, `unauthenticated`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::ServiceToken => "service_token",
            AuthMethod::Unauthenticated => "unauthenticated",
        }
    }
}

/// Who is calling: set in the request extensions by the authentication layer.
///
/// It carries only public facts: an id (a configured key id or a token's `sub`,
/// never secret material), how it authenticated, its scopes and an optional
/// rate-limit tier. The rate limiter keys on the id, scope checks read the scopes, the
/// access log records the id. Cloning is cheap (one reference count).
///
/// ```
/// use portcullis::{AuthMethod, Principal, Scopes};
/// let p = Principal::new("billing", AuthMethod::ApiKey)
///     .with_scopes(Scopes::parse("jobs:read jobs:write").unwrap())
///     .with_tier("gold");
/// assert!(p.scopes().contains("jobs:write"));
/// assert_eq!(p.tier(), Some("gold"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    inner: Arc<Inner>,
}

#[derive(Clone, PartialEq, Eq)]
struct Inner {
    id: Arc<str>,
    method: AuthMethod,
    scopes: Scopes,
    tier: Option<Arc<str>>,
}

impl Principal {
    /// A principal with no scopes and no tier.
    pub fn new(id: impl Into<Arc<str>>, method: AuthMethod) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: id.into(),
                method,
                scopes: Scopes::default(),
                tier: None,
            }),
        }
    }

    /// Replaces the scopes.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        Arc::make_mut(&mut self.inner).scopes = scopes;
        self
    }

    /// Sets the rate-limit tier.
    pub fn with_tier(mut self, tier: impl Into<Arc<str>>) -> Self {
        Arc::make_mut(&mut self.inner).tier = Some(tier.into());
        self
    }

    /// The public id: a key id or a token subject. Safe to log.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// How this principal authenticated.
    pub fn method(&self) -> AuthMethod {
        self.inner.method
    }

    /// The granted scopes.
    pub fn scopes(&self) -> &Scopes {
        &self.inner.scopes
    }

    /// The rate-limit tier, if one was configured.
    pub fn tier(&self) -> Option<&str> {
        self.inner.tier.as_deref()
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("id", &self.id())
            .field("method", &self.method())
            .field("scopes", self.scopes())
            .field("tier", &self.tier())
            .finish()
    }
}

/// A set of OAuth-style scope tokens (RFC 6749 §3.3), such as `jobs:read`.
///
/// Kept sorted and de-duplicated; lookups are a binary search. A scope token is one
/// or more printable ASCII characters other than space, `"` and `\`.
///
/// ```
/// use portcullis::Scopes;
/// let s = Scopes::parse("jobs:write  jobs:read jobs:read").unwrap();
/// assert_eq!(s.iter().collect::<Vec<_>>(), ["jobs:read", "jobs:write"]);
/// assert!(Scopes::parse("bad\"scope").is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Scopes(Arc<[Box<str>]>);

impl Scopes {
    /// Parses a space-separated scope string (the form of a token's `scope` claim).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        Self::from_iter_checked(s.split(' ').filter(|t| !t.is_empty()))
    }

    /// Builds a set from individual scope tokens, checking each one.
    pub fn from_iter_checked<I, T>(tokens: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let mut v: Vec<Box<str>> = Vec::new();
        for (i, t) in tokens.into_iter().enumerate() {
            let t = t.as_ref();
            if !is_scope_token(t) {
                return Err(ConfigError::new(format!(
                    "scope {} is not a valid scope token (printable ASCII without space, '\"' or '\\\\')",
                    i + 1
                )));
            }
            v.push(t.into());
        }
        v.sort_unstable();
        v.dedup();
        Ok(Self(v.into()))
    }

    /// Whether `scope` is granted.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.binary_search_by(|s| (**s).cmp(scope)).is_ok()
    }

    /// Whether every scope of `required` is granted.
    pub fn contains_all(&self, required: &Scopes) -> bool {
        required.iter().all(|s| self.contains(s))
    }

    /// The scopes in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| &**s)
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no scopes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub(crate) fn is_scope_token(t: &str) -> bool {
    !t.is_empty()
        && t.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for Scopes {
    /// The space-separated form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_does_not_affect_clones() {
        let a = Principal::new("a", AuthMethod::ApiKey);
        let b = a.clone().with_tier("gold");
        assert_eq!(a.tier(), None);
        assert_eq!(b.tier(), Some("gold"));
    }

    #[test]
    fn scope_tokens() {
        assert!(is_scope_token("jobs:read"));
        assert!(!is_scope_token(""));
        assert!(!is_scope_token("a b"));
        assert!(!is_scope_token("a\\b"));
        assert!(!is_scope_token("é"));
        let s = Scopes::parse("b a").unwrap();
        assert_eq!(s.to_string(), "a b");
        assert!(s.contains_all(&Scopes::parse("a").unwrap()));
        assert!(!s.contains_all(&Scopes::parse("a c").unwrap()));
    }
}
