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
    /// A request signed with a registered key (HTTP Message Signatures, RFC 9421).
    HttpSignature,
    /// Nobody: authentication was switched off by an explicit, loudly named call.
    /// Handlers and logs can see that a request was let in unauthenticated.
    Unauthenticated,
}

impl AuthMethod {
    /// A stable lowercase name for logs, and the namespace of a
    /// [`Principal::identity`]: `api_key`, `service_token`, `http_signature`,
    /// `unauthenticated`. None
    /// contains a `:`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ApiKey => "api_key",
            AuthMethod::ServiceToken => "service_token",
            AuthMethod::HttpSignature => "http_signature",
            AuthMethod::Unauthenticated => "unauthenticated",
        }
    }
}

/// Who is calling: set in the request extensions by the authentication layer.
///
/// It carries only public facts: an id (a configured key id or a token's `sub`,
/// never secret material), how it authenticated, its scopes and an optional
/// rate-limit tier. Cloning is cheap (one reference count).
///
/// **Identity is the method and the id together.** The API key `svc` and a service
/// token whose `sub` is `svc` are two principals: key ids are chosen by whoever
/// writes the key file, token subjects by whoever holds a signing key, and neither
/// may speak for the other. [`identity`](Self::identity) is the one string that
/// names a principal, `api_key:svc` or `service_token:svc`; everything that keys on
/// who is calling uses it: the rate limiter's buckets, per-principal `Policy`
/// overrides (which name the method), and your own records, such as who owns what.
/// [`id`](Self::id) alone is for display; logs and audit events record it next to
/// the method.
///
/// The principal of the unauthenticated mode
/// (`allow_unauthenticated_requests_dangerously`) is shared by every request and
/// names no one: the rate limiter counts its requests per client address, like
/// requests without a principal.
///
/// ```
/// use portcullis::{AuthMethod, Principal, Scopes};
/// let p = Principal::new("billing", AuthMethod::ApiKey)
///     .with_scopes(Scopes::parse("jobs:read jobs:write").unwrap())
///     .with_tier("gold");
/// assert!(p.scopes().contains("jobs:write"));
/// assert_eq!(p.tier(), Some("gold"));
///
/// let token = Principal::new("billing", AuthMethod::ServiceToken);
/// assert_eq!((p.identity(), token.identity()), ("api_key:billing", "service_token:billing"));
/// assert_ne!(p.identity(), token.identity());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    inner: Arc<Inner>,
}

#[derive(Clone, PartialEq, Eq)]
struct Inner {
    /// `<method>:<id>`; the id is the part after the method's name and the colon.
    identity: Arc<str>,
    method: AuthMethod,
    scopes: Scopes,
    tier: Option<Arc<str>>,
}

/// The identity of the principal `id` authenticated by `method`: `<method>:<id>`.
///
/// The one definition, shared by [`Principal`] and the configuration that names
/// principals. Injective: the method names are fixed and contain no `:`, so the
/// text up to the first `:` is the method and the rest, whatever it holds, the id.
pub(crate) fn identity(method: AuthMethod, id: &str) -> String {
    let method = method.as_str();
    let mut s = String::with_capacity(method.len() + 1 + id.len());
    s.push_str(method);
    s.push(':');
    s.push_str(id);
    s
}

impl Principal {
    /// A principal with no scopes and no tier.
    pub fn new(id: impl AsRef<str>, method: AuthMethod) -> Self {
        Self {
            inner: Arc::new(Inner {
                identity: identity(method, id.as_ref()).into(),
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

    /// The public id: a key id or a token subject. Safe to log. Not unique on its
    /// own: an API key and a token subject may share it (see
    /// [`identity`](Self::identity)).
    pub fn id(&self) -> &str {
        &self.inner.identity[self.inner.method.as_str().len() + 1..]
    }

    /// Who this is, method and id together: `api_key:<key id>`,
    /// `service_token:<sub>` or `unauthenticated:<id>`. Two principals are the same
    /// caller exactly when their identities are equal; key anything per caller on
    /// this, never on [`id`](Self::id) alone. Public, safe to log.
    pub fn identity(&self) -> &str {
        &self.inner.identity
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

/// Principal ids and tiers of every credential kind (API key ids, signature key
/// ids): 1 to 64 characters of `A-Z a-z 0-9 . _ : -`, safe in logs and as
/// rate-limit keys.
#[cfg(any(feature = "api-key", feature = "signature"))]
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

    const METHODS: [AuthMethod; 3] = [
        AuthMethod::ApiKey,
        AuthMethod::ServiceToken,
        AuthMethod::Unauthenticated,
    ];

    #[test]
    fn identity_names_the_method() {
        let key = Principal::new("svc", AuthMethod::ApiKey);
        let token = Principal::new("svc", AuthMethod::ServiceToken);
        assert_eq!(key.identity(), "api_key:svc");
        assert_eq!(token.identity(), "service_token:svc");
        assert_eq!((key.id(), token.id()), ("svc", "svc"));
        assert_ne!(key, token);
        // An id that spells another method's prefix is still its own method's.
        let odd = Principal::new("service_token:svc", AuthMethod::ApiKey);
        assert_eq!(odd.id(), "service_token:svc");
        assert_ne!(odd.identity(), token.identity());
    }

    proptest::proptest! {
        /// Identities are equal exactly when method and id both are, whatever the
        /// ids hold (colons, method names, nothing at all).
        #[test]
        fn identities_are_equal_exactly_when_method_and_id_are(
            m1 in 0usize..3,
            m2 in 0usize..3,
            id1 in "(api_key:|service_token:|unauthenticated:|:)?.{0,12}",
            id2 in "(api_key:|service_token:|unauthenticated:|:)?.{0,12}",
        ) {
            let (m1, m2) = (METHODS[m1], METHODS[m2]);
            let (a, b) = (Principal::new(&id1, m1), Principal::new(&id2, m2));
            proptest::prop_assert_eq!(a.id(), id1.as_str());
            proptest::prop_assert_eq!(a.method(), m1);
            proptest::prop_assert_eq!(
                a.identity() == b.identity(),
                m1 == m2 && id1 == id2
            );
            proptest::prop_assert_eq!(a.identity(), identity(m1, &id1));
            // The same id under two methods: always two identities.
            for m in METHODS {
                proptest::prop_assert_eq!(
                    Principal::new(&id1, m).identity() == a.identity(),
                    m == m1
                );
            }
        }
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
