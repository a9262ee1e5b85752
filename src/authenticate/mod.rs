//! Authentication: a credential in, a [`Principal`] out, or a refusal.
//!
//! [`AuthenticateLayer`] reads the request's one credential, verifies it, and on
//! success inserts the [`Principal`] into the request extensions (and a copy into the
//! response extensions, for the access log outside it); for a service token it also
//! inserts its claims, an `Arc<VerifiedToken>` (feature `jwt`). Parsing is separate from
//! verification: the extraction is a set of crate-private, fuzzed and
//! property-tested functions over header bytes; the layer only decides.
//!
//! Credentials accepted:
//!
//! - `X-API-Key: <key>` (the header name in any case);
//! - `Authorization: Bearer <key>` and `Authorization: ApiKey <key>` (scheme in any
//!   case);
//! - a query-string parameter, only after [`AuthenticateLayer::allow_key_in_query_dangerously`].
//!
//! Refusals (all built by [`rejection`](crate::rejection)):
//!
//! | request | status |
//! |---|---|
//! | no credential | 401, `WWW-Authenticate` without an error code |
//! | empty, malformed, over 8 KiB, non-ASCII credential; a known scheme without one | 400 `invalid_request` |
//! | two credentials (even identical) | 400 `invalid_request` |
//! | wrong checksum, unknown, expired, not yet valid, revoked key | 401 `invalid_token`, one identical response |
//!
//! The credential header is removed before the request reaches the inner service
//! (like Kong's `hide_credentials`; see [`AuthenticateLayer::hide_credentials`]), and
//! marked sensitive if kept. Every failure is an audit event on
//! [`audit::TARGET`](crate::audit::TARGET), `auth_failed` (reason class, client ip,
//! and the key id only when the key matched a revoked, expired or not-yet-valid
//! record). A success is recorded by the access log's one event per request (its
//! `principal` and `auth_method` fields, and a service token's `sub`, `jti` and
//! `kid`); the success audit events as well (`auth_succeeded` per accepted
//! credential, `service_token_accepted` per accepted token) are opt-in,
//! [`AuthenticateLayer::audit_successes`]. No credential is ever logged.
//!
//! ```
//! # #[cfg(feature = "api-key")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use portcullis::api_key::{generate_key, ApiKeys, KeyRecord, KeyStore};
//! use portcullis::authenticate::AuthenticateLayer;
//! use portcullis::{Principal, Scopes};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let key = generate_key("pc_test")?;
//! let store = KeyStore::from_records([KeyRecord::new("billing", key.digest())?
//!     .with_scopes(Scopes::parse("jobs:read")?)])?;
//! let auth = AuthenticateLayer::api_keys(ApiKeys::new(store)).realm("jobs")?;
//!
//! let svc = ServiceBuilder::new().layer(auth).service_fn(|req: Request<()>| async move {
//!     let who = req.extensions().get::<Principal>().unwrap().id().to_owned();
//!     assert!(req.headers().get("x-api-key").is_none(), "hidden from the service");
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(who))))
//! });
//! let req = Request::builder().header("X-API-Key", key.expose_secret()).body(())?;
//! let res = svc.clone().oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.extensions().get::<Principal>().unwrap().id(), "billing");
//!
//! let res = svc.oneshot(Request::new(())).await?;
//! assert_eq!(res.status(), 401);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! # #[cfg(not(feature = "api-key"))]
//! # fn main() {}
//! ```

pub(crate) mod credentials;

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use tower_layer::Layer;
use tower_service::Service;

use credentials::{
    Credential, CredentialError, CredentialSource, extract_credential, parse_authorization,
};

#[cfg(feature = "api-key")]
use crate::api_key::ApiKeys;
#[cfg(feature = "jwt")]
use crate::jwt::TokenVerifier;
use crate::rejection::{Challenge, DenialReason, RefusalBody, Rejection};
use crate::{AuthMethod, ClientIp, ConfigError, Principal, Scopes};

/// The realm of the `WWW-Authenticate` challenge unless another is set.
pub const DEFAULT_REALM: &str = "api";

/// The id of the principal of every request in unauthenticated mode.
pub(crate) const UNAUTHENTICATED_ID: &str = "unauthenticated";

/// A failed verification: the reason class and, when a record matched, its public id.
#[derive(Debug)]
struct Failure {
    reason: DenialReason,
    key_id: Option<Arc<str>>,
}

impl Failure {
    fn new(reason: DenialReason) -> Self {
        Self {
            reason,
            key_id: None,
        }
    }
}

/// A key's own policy, when the credential was an API key that has one.
#[cfg(feature = "api-key")]
type Policy = Option<Arc<crate::api_key::KeyPolicy>>;
#[cfg(not(feature = "api-key"))]
type Policy = Option<std::convert::Infallible>;

/// Everything a credential can be verified against. One place, so that a new kind
/// of credential is one more field and one more branch in `verify`.
#[derive(Clone, Default)]
struct Verifiers {
    #[cfg(feature = "api-key")]
    api_keys: Option<ApiKeys>,
    #[cfg(feature = "jwt")]
    service_tokens: Option<TokenVerifier>,
}

impl Verifiers {
    #[cfg(feature = "jwt")]
    fn has_api_keys(&self) -> bool {
        #[cfg(feature = "api-key")]
        return self.api_keys.is_some();
        #[cfg(not(feature = "api-key"))]
        false
    }

    /// API keys answer to `ApiKey`, service tokens to `Bearer`: offer what is
    /// accepted.
    fn challenge(&self, realm: &str) -> Result<Challenge, ConfigError> {
        #[cfg(feature = "jwt")]
        if self.service_tokens.is_some() && !self.has_api_keys() {
            return Challenge::bearer(realm);
        }
        Ok(Challenge::api_key(realm)?.and_bearer())
    }

    /// `audit_success`: whether the service-token verifier also emits its success
    /// event, `service_token_accepted` (the layer's
    /// [`audit_successes`](AuthenticateLayer::audit_successes)).
    #[allow(unused_variables)]
    fn verify(&self, credential: &Credential<'_>, audit_success: bool) -> Result<Proof, Failure> {
        // A Bearer credential shaped like a JWT goes to the service-token verifier
        // (every Bearer credential, when no API keys are configured). The verifier
        // audits the failure's class (`service_token_rejected`); the client and the
        // `auth_failed` event see only `invalid_token`.
        #[cfg(feature = "jwt")]
        if let Some(tokens) = &self.service_tokens {
            let secret = credential.expose_secret();
            if credential.source() == CredentialSource::Bearer
                && (!self.has_api_keys() || crate::jwt::looks_like_jwt(secret))
            {
                return tokens
                    .verify_token_audited(secret, audit_success)
                    .map(|t| Proof {
                        principal: t.principal().clone(),
                        token: Some(t),
                        policy: None,
                    })
                    .map_err(|_| Failure::new(DenialReason::InvalidToken));
            }
        }
        #[cfg(feature = "api-key")]
        if let Some(keys) = &self.api_keys {
            return keys
                .verify_with_policy(credential.expose_secret())
                .map(|(principal, policy)| Proof {
                    principal,
                    #[cfg(feature = "jwt")]
                    token: None,
                    policy,
                })
                .map_err(|e| Failure {
                    reason: e.reason(),
                    key_id: e.key_id().map(Arc::from),
                });
        }
        Err(Failure::new(DenialReason::InvalidToken))
    }
}

/// What a verified credential proved: who, for a service token its claims
/// (inserted into the request extensions beside the principal), and for an API key
/// its own policy (allowed addresses, credits).
struct Proof {
    principal: Principal,
    #[cfg(feature = "jwt")]
    token: Option<Arc<crate::jwt::VerifiedToken>>,
    policy: Policy,
}

#[derive(Clone)]
pub(crate) struct Config {
    verifiers: Verifiers,
    challenge: Challenge,
    hide_credentials: bool,
    query_param: Option<Arc<str>>,
    /// `Some` only in the explicitly requested unauthenticated mode.
    unauthenticated: Option<Principal>,
    /// Whether a layer inside spends usage credits (declared with
    /// [`AuthenticateLayer::credits_spent_inside`]); without one, a key with
    /// credits is refused.
    #[cfg(feature = "api-key")]
    credits_spent: bool,
    /// Whether the refusal of a key with credits and nothing to spend them was
    /// logged already (once per layer and its clones).
    #[cfg(feature = "api-key")]
    credits_unenforced_logged: Arc<std::sync::atomic::AtomicBool>,
    /// Whether every accepted credential is also an `auth_succeeded` audit event.
    audit_successes: bool,
}

/// Layer applying [`Authenticate`]: verifies the request's credential and inserts the
/// [`Principal`]. See the [module docs](self).
#[derive(Clone)]
pub struct AuthenticateLayer {
    config: Arc<Config>,
}

impl AuthenticateLayer {
    fn with_verifiers(verifiers: Verifiers) -> Self {
        Self {
            config: Arc::new(Config {
                challenge: verifiers
                    .challenge(DEFAULT_REALM)
                    .expect("the default realm is valid"),
                verifiers,
                hide_credentials: true,
                query_param: None,
                unauthenticated: None,
                #[cfg(feature = "api-key")]
                credits_spent: false,
                #[cfg(feature = "api-key")]
                credits_unenforced_logged: Arc::default(),
                audit_successes: false,
            }),
        }
    }

    /// Authenticates requests with API keys from `keys`.
    ///
    /// The store is never empty (an empty one cannot be built), so this layer cannot
    /// run open.
    #[cfg(feature = "api-key")]
    // The other fields exist only with their features.
    #[allow(clippy::needless_update)]
    pub fn api_keys(keys: ApiKeys) -> Self {
        Self::with_verifiers(Verifiers {
            api_keys: Some(keys),
            ..Verifiers::default()
        })
    }

    /// Authenticates requests with service tokens (JWT) checked by `verifier`, sent
    /// as `Authorization: Bearer <token>` (RFC 6750). A refused token is 401
    /// `WWW-Authenticate: Bearer realm="...", error="invalid_token"`, whatever the
    /// check that failed; the class of the failure is in the audit log
    /// (`service_token_rejected`).
    ///
    /// ```
    /// use portcullis::authenticate::AuthenticateLayer;
    /// use portcullis::jwt::{TokenVerifier, VerifyingKey};
    /// let verifier = TokenVerifier::builder()
    ///     .key(VerifyingKey::hs256(&[1u8; 32])?)
    ///     .issuer("https://ci.example")
    ///     .audience("jobs-api")
    ///     .build()?;
    /// let auth = AuthenticateLayer::service_tokens(verifier).realm("jobs")?;
    /// # let _ = auth;
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    #[cfg(feature = "jwt")]
    // The other fields exist only with their features.
    #[allow(clippy::needless_update)]
    pub fn service_tokens(verifier: TokenVerifier) -> Self {
        Self::with_verifiers(Verifiers {
            service_tokens: Some(verifier),
            ..Verifiers::default()
        })
    }

    /// Also accepts service tokens: a `Bearer` credential shaped like a JWT goes to
    /// `verifier`, every other credential to the API keys.
    #[cfg(feature = "jwt")]
    pub fn with_service_tokens(mut self, verifier: TokenVerifier) -> Self {
        let config = Arc::make_mut(&mut self.config);
        config.verifiers.service_tokens = Some(verifier);
        config.challenge = config
            .verifiers
            .challenge(config.challenge.realm())
            .expect("the realm was checked when it was set");
        self
    }

    /// Lets **every request in without authentication**, as the principal
    /// `unauthenticated` with [`AuthMethod::Unauthenticated`] and the given scopes.
    ///
    /// For local development only. Logs a warning (on the audit target) when called;
    /// credentials are not read; handlers and logs can tell such requests apart by the
    /// principal's method. There is no other way to run this layer open.
    pub fn allow_unauthenticated_requests_dangerously(scopes: Scopes) -> Self {
        crate::audit::emit!(
            warn,
            AuthenticationDisabled,
            scopes = %scopes,
            "AUTHENTICATION IS DISABLED: every request is let in unauthenticated"
        );
        let mut layer = Self::with_verifiers(Verifiers::default());
        Arc::make_mut(&mut layer.config).unauthenticated = Some(
            Principal::new(UNAUTHENTICATED_ID, AuthMethod::Unauthenticated).with_scopes(scopes),
        );
        layer
    }

    /// Sets the realm of the `WWW-Authenticate` challenges (default `api`).
    pub fn realm(mut self, realm: &str) -> Result<Self, ConfigError> {
        let config = Arc::make_mut(&mut self.config);
        config.challenge = config.verifiers.challenge(realm)?;
        Ok(self)
    }

    /// Also emits an `auth_succeeded` audit event (`principal`, `method`,
    /// `client_ip`) for every accepted credential (an API key, a service token, or
    /// the signature a [`VerifySignatureLayer`](crate::signature::VerifySignatureLayer)
    /// outside verified), and the verifier's `service_token_accepted` (`sub`, `iss`,
    /// `kid`, `jti`, `scopes`, `cached`) for every accepted service token. Off by
    /// default: the access log's event for the request already names the principal,
    /// how it authenticated and, for a service token, its `sub`, `jti` and `kid`
    /// ([`access_log`](crate::access_log)), so a second event per request only costs.
    /// Turn it on when the audit target goes to a sink of its own that must list
    /// successes as well; failures (`auth_failed`, `service_token_rejected`) are
    /// always audit events.
    ///
    /// ```
    /// # #[cfg(feature = "api-key")] {
    /// use portcullis::api_key::{generate_key, ApiKeys, KeyStore};
    /// use portcullis::authenticate::AuthenticateLayer;
    /// let key = generate_key("pc_test").unwrap();
    /// let store = KeyStore::from_key_list(key.expose_secret(), Default::default()).unwrap();
    /// let auth = AuthenticateLayer::api_keys(ApiKeys::new(store)).audit_successes();
    /// # let _ = auth;
    /// # }
    /// ```
    pub fn audit_successes(mut self) -> Self {
        Arc::make_mut(&mut self.config).audit_successes = true;
        self
    }

    /// Whether the credential is removed from the request before the inner service
    /// sees it (default `true`). When kept, the header value is marked sensitive.
    pub fn hide_credentials(mut self, hide: bool) -> Self {
        Arc::make_mut(&mut self.config).hide_credentials = hide;
        self
    }

    /// Also accepts a key in the query-string parameter `name` (e.g. `api_key`).
    ///
    /// Off by default, and dangerous: URLs end up in proxy logs, browser history and
    /// `Referer` headers, where a key outlives its revocation in plain text. Use it
    /// only for clients that cannot set a header. The value must be URL-safe as is
    /// (generated keys are); a parameter given twice, or with a header credential, is
    /// `invalid_request`. With hidden credentials the parameter is removed from the
    /// URI before the inner service.
    ///
    /// With the `redact` feature (which the access log needs), `name` must also be
    /// one the log redactor hides the value of ([`Redactor::is_sensitive_name`], e.g.
    /// `api_key`, `key`, `token`, `access_token`): the access log sits outside this
    /// layer and records the query as the client sent it, and a parameter it does
    /// not know (`k`) would put every key sent in it, in full, into the log.
    ///
    /// [`Redactor::is_sensitive_name`]: crate::redact::Redactor::is_sensitive_name
    pub fn allow_key_in_query_dangerously(mut self, name: &str) -> Result<Self, ConfigError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(ConfigError::new(
                "query parameter name must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'",
            ));
        }
        #[cfg(feature = "redact")]
        if !crate::redact::Redactor::new().is_sensitive_name(name) {
            return Err(ConfigError::new(
                "the query parameter of a key must be a name the log redactor hides \
                 (e.g. api_key, key, token, access_token): the access log records the query",
            ));
        }
        Arc::make_mut(&mut self.config).query_param = Some(name.into());
        Ok(self)
    }

    /// Declares that a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) runs
    /// inside this layer and spends the usage credits of keys that have them (see
    /// [usage credits](crate::rate_limit#usage-credits)). `StackLayer` declares it
    /// itself; a stack built by hand must, and must put the rate limiter inside.
    ///
    /// Without it, a request authenticated by a key with credits is refused with
    /// 500 (the generic body; denial reason `misconfigured`) rather than served
    /// with its credits unenforced, and the error event `credits_unenforced`,
    /// naming this remedy, is logged once. Keys without credits are unaffected.
    ///
    /// ```
    /// use portcullis::api_key::{generate_key, ApiKeys, KeyRecord, KeyStore};
    /// use portcullis::authenticate::AuthenticateLayer;
    /// use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
    /// use tower::ServiceBuilder;
    ///
    /// let key = generate_key("pc_test")?;
    /// let store = KeyStore::from_records([KeyRecord::new("trial", key.digest())?.with_credits(100)])?;
    /// let layers = ServiceBuilder::new()
    ///     .layer(AuthenticateLayer::api_keys(ApiKeys::new(store)).credits_spent_inside())
    ///     .layer(RateLimitLayer::builder().policy(Policy::new("api", Quota::per_second(10)?)?).build()?);
    /// # let _ = layers;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(all(feature = "api-key", feature = "rate-limit"))]
    pub fn credits_spent_inside(mut self) -> Self {
        Arc::make_mut(&mut self.config).credits_spent = true;
        self
    }
}

impl fmt::Debug for AuthenticateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("AuthenticateLayer");
        #[cfg(feature = "api-key")]
        d.field("api_keys", &self.verifiers.api_keys);
        #[cfg(feature = "jwt")]
        d.field("service_tokens", &self.verifiers.service_tokens);
        d.field("realm", &self.challenge.realm())
            .field("hide_credentials", &self.hide_credentials)
            .field("query_param", &self.query_param)
            .field("unauthenticated", &self.unauthenticated.is_some())
            .field("audit_successes", &self.audit_successes);
        #[cfg(feature = "api-key")]
        d.field("credits_spent_inside", &self.credits_spent);
        d.finish()
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Service that authenticates requests; see [`AuthenticateLayer`].
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Authenticate<S> {
    define_inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for Authenticate<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticate")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish()
    }
}

/// The opt-in `auth_succeeded` audit event of an accepted credential.
fn audit_success(principal: &Principal, client_ip: Option<ClientIp>) {
    crate::audit::emit!(
        info,
        AuthSucceeded,
        principal = &*crate::log_text::sanitize_id(principal.id()),
        method = principal.method().as_str(),
        client_ip = client_ip.map(tracing::field::display),
    );
}

/// What the layer copies into the response extensions for the layers outside it:
/// the [`Principal`] (read by the access log and the failed-authentication
/// throttle) and, for a service token, its claims (read by the access log, which
/// records the token's `sub`, `jti` and `kid`). One reference count each.
pub(crate) struct Authenticated {
    principal: Principal,
    #[cfg(all(feature = "jwt", feature = "access-log"))]
    token: Option<Arc<crate::jwt::VerifiedToken>>,
}

impl Authenticated {
    fn principal(principal: Principal) -> Self {
        Self {
            principal,
            #[cfg(all(feature = "jwt", feature = "access-log"))]
            token: None,
        }
    }
}

/// The verified service token of a request, in its *response* extensions, where
/// the access log reads it. Crate-private: nothing outside this crate can put one
/// there, so the access log records only what this layer verified. Without the
/// access log, nothing is copied.
#[cfg(all(feature = "jwt", feature = "access-log"))]
#[derive(Clone)]
pub(crate) struct AuthenticatedToken(pub(crate) Arc<crate::jwt::VerifiedToken>);

impl crate::future::CopyToResponse for Authenticated {
    fn copy_to(self, extensions: &mut http::Extensions) {
        extensions.insert(self.principal);
        #[cfg(all(feature = "jwt", feature = "access-log"))]
        if let Some(token) = self.token {
            extensions.insert(AuthenticatedToken(token));
        }
    }
}

impl Config {
    /// The policy: who is calling, or the refusal. Reads the request, changes nothing.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        client_ip: Option<ClientIp>,
    ) -> Result<(Proof, CredentialSource), DenialReason> {
        let query_param = self.query_param.as_deref();
        let refuse = |failure: Failure| {
            crate::audit::emit!(
                info,
                AuthFailed,
                reason = failure.reason.as_str(),
                client_ip = client_ip.map(tracing::field::display),
                key_id = failure
                    .key_id
                    .as_deref()
                    .map(crate::log_text::sanitize_id)
                    .as_deref(),
            );
            failure.reason
        };
        let credential = match extract_credential(headers, uri.query(), query_param) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(refuse(Failure::new(DenialReason::MissingCredential))),
            Err(CredentialError::Multiple) => {
                return Err(refuse(Failure::new(DenialReason::MultipleCredentials)));
            }
            Err(_) => return Err(refuse(Failure::new(DenialReason::MalformedCredential))),
        };
        let proof = self
            .verifiers
            .verify(&credential, self.audit_successes)
            .map_err(refuse)?;
        let principal = &proof.principal;
        #[cfg(feature = "api-key")]
        if let Some(allowed) = proof.policy.as_ref().and_then(|p| p.allowed_ips.as_ref())
            && !client_ip.is_some_and(|ip| allowed.contains(ip.addr()))
        {
            crate::audit::emit!(
                info,
                IpDenied,
                reason = DenialReason::KeyIpDenied.as_str(),
                principal = &*crate::log_text::sanitize_id(principal.id()),
                method = principal.method().as_str(),
                client_ip = client_ip.map(tracing::field::display),
            );
            return Err(DenialReason::KeyIpDenied);
        }
        if self.audit_successes {
            audit_success(principal, client_ip);
        }
        Ok((proof, credential.source()))
    }

    /// The response for a refusal: the class is all the client learns.
    /// Logs, once, that a key with usage credits was refused because no layer
    /// inside is declared to spend them.
    #[cfg(feature = "api-key")]
    #[cold]
    fn credits_unenforced(&self, principal: &Principal) {
        use std::sync::atomic::Ordering;
        if self.credits_unenforced_logged.swap(true, Ordering::Relaxed) {
            return;
        }
        crate::audit::emit!(
            error,
            CreditsUnenforced,
            reason = DenialReason::Misconfigured.as_str(),
            principal = &*crate::log_text::sanitize_id(principal.id()),
            method = principal.method().as_str(),
            "a key with usage credits was refused: no layer inside the AuthenticateLayer \
             is declared to spend them. Put a RateLimitLayer inside it and call \
             AuthenticateLayer::credits_spent_inside (StackLayer does both)"
        );
    }

    pub(crate) fn rejection(&self, reason: DenialReason) -> Rejection {
        match reason {
            DenialReason::MissingCredential => Rejection::missing_credential(&self.challenge),
            DenialReason::MalformedCredential | DenialReason::MultipleCredentials => {
                Rejection::invalid_request(&self.challenge, reason)
            }
            // As the global allowlist refuses: the client learns only "forbidden".
            DenialReason::KeyIpDenied => Rejection::forbidden(reason),
            reason => Rejection::invalid_credential(&self.challenge, reason),
        }
    }

    /// Removes (or marks sensitive) the credential the request was authenticated with.
    fn hide<B>(&self, req: &mut Request<B>, source: CredentialSource) {
        let headers = req.headers_mut();
        match source {
            CredentialSource::ApiKeyHeader if self.hide_credentials => {
                headers.remove(&credentials::X_API_KEY_NAME);
            }
            CredentialSource::Bearer | CredentialSource::ApiKeyScheme if self.hide_credentials => {
                // Keep `Authorization` values of other schemes; drop ours. Usually
                // ours is the only value: then nothing is copied.
                let is_other =
                    |v: &HeaderValue| matches!(parse_authorization(v.as_bytes()), Ok(None));
                if !headers.get_all(AUTHORIZATION).iter().any(is_other) {
                    headers.remove(AUTHORIZATION);
                    return;
                }
                let others: Vec<HeaderValue> = headers
                    .get_all(AUTHORIZATION)
                    .iter()
                    .filter(|v| is_other(v))
                    .cloned()
                    .collect();
                headers.remove(AUTHORIZATION);
                for v in others {
                    headers.append(AUTHORIZATION, v);
                }
            }
            CredentialSource::Query if self.hide_credentials => {
                if let Some(param) = self.query_param.as_deref() {
                    strip_query(req.uri_mut(), param);
                }
            }
            _ => {
                for name in [&credentials::X_API_KEY_NAME, &AUTHORIZATION] {
                    if let http::header::Entry::Occupied(mut e) = headers.entry(name) {
                        for v in e.iter_mut() {
                            v.set_sensitive(true);
                        }
                    }
                }
            }
        }
    }
}

fn strip_query(uri: &mut Uri, param: &str) {
    let Some(query) = uri.query() else { return };
    let path = uri.path();
    let pq = match credentials::strip_query_param(query, param) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    // The new path-and-query is a subset of a valid one, so it parses.
    parts.path_and_query = pq.parse().ok();
    if let Ok(u) = Uri::from_parts(parts) {
        *uri = u;
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Authenticate<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &*self.config;
        if let Some(p) = &config.unauthenticated {
            req.extensions_mut().insert(p.clone());
            let copy = Authenticated::principal(p.clone());
            return ResponseFuture::inner_with(self.inner.call(req), Some(copy));
        }
        let client_ip = req.extensions().get::<ClientIp>().copied();
        // A request whose signature the signature layer outside verified: its
        // principal, unless the request carries another credential too.
        #[cfg(feature = "signature")]
        if let Some(crate::signature::SignedPrincipal(p)) = req.extensions_mut().remove() {
            let query_param = config.query_param.as_deref();
            if !matches!(
                extract_credential(req.headers(), req.uri().query(), query_param),
                Ok(None)
            ) {
                crate::audit::emit!(
                    info,
                    AuthFailed,
                    reason = DenialReason::MultipleCredentials.as_str(),
                    client_ip = client_ip.map(tracing::field::display),
                );
                let reason = DenialReason::MultipleCredentials;
                return ResponseFuture::rejected(
                    self.config.rejection(reason).into_response_to(&req),
                );
            }
            if config.audit_successes {
                audit_success(&p, client_ip);
            }
            req.extensions_mut().insert(p.clone());
            return ResponseFuture::inner_with(
                self.inner.call(req),
                Some(Authenticated::principal(p)),
            );
        }
        match config.authenticate(req.headers(), req.uri(), client_ip) {
            Ok((proof, source)) => {
                config.hide(&mut req, source);
                // The key's credits, for the rate limiter that spends them; with
                // none declared, refused rather than served unmetered.
                #[cfg(feature = "api-key")]
                let credits = proof.policy.as_ref().and_then(|p| p.credits.clone());
                #[cfg(feature = "api-key")]
                if credits.is_some() && !config.credits_spent {
                    config.credits_unenforced(&proof.principal);
                    return ResponseFuture::rejected(
                        Rejection::misconfigured().into_response_to(&req),
                    );
                }
                #[cfg(feature = "jwt")]
                let token = proof.token.inspect(|token| {
                    req.extensions_mut().insert(token.clone());
                });
                #[cfg(all(feature = "jwt", not(feature = "access-log")))]
                drop(token);
                #[cfg(feature = "api-key")]
                if let Some(credits) = credits {
                    req.extensions_mut().insert(credits);
                }
                #[cfg(not(feature = "api-key"))]
                let _ = proof.policy;
                let principal = proof.principal;
                req.extensions_mut().insert(principal.clone());
                let copy = Authenticated {
                    principal,
                    #[cfg(all(feature = "jwt", feature = "access-log"))]
                    token,
                };
                ResponseFuture::inner_with(self.inner.call(req), Some(copy))
            }
            Err(reason) => {
                ResponseFuture::rejected(self.config.rejection(reason).into_response_to(&req))
            }
        }
    }
}

opaque_response_future! {
    /// Response future of [`Authenticate`]: the inner service's future, which also
    /// copies the [`Principal`] into the response extensions, or a refusal.
    copies Authenticated
}

#[cfg(all(test, feature = "api-key"))]
mod tests {
    use super::*;
    use crate::api_key::{KeyRecord, KeyStore, generate_key};
    use bytes::Bytes;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt};

    async fn call(layer: &AuthenticateLayer, req: Request<()>) -> (Response<Bytes>, String) {
        let svc =
            ServiceBuilder::new()
                .layer(layer.clone())
                .service_fn(|req: Request<()>| async move {
                    let seen = format!(
                        "{:?}|{:?}|{}",
                        req.headers().get(&credentials::X_API_KEY_NAME),
                        req.headers().get(AUTHORIZATION).map(|v| v.is_sensitive()),
                        req.uri()
                    );
                    Ok::<_, Infallible>(Response::new(Bytes::from(seen)))
                });
        let res = svc.oneshot(req).await.unwrap();
        let body = String::from_utf8(res.body().to_vec()).unwrap();
        (res, body)
    }

    fn layer() -> (AuthenticateLayer, String) {
        let key = generate_key("pc_test").unwrap();
        let store = KeyStore::from_records([KeyRecord::new("k", key.digest()).unwrap()]).unwrap();
        (
            AuthenticateLayer::api_keys(ApiKeys::new(store)),
            key.expose_secret().to_owned(),
        )
    }

    #[tokio::test]
    async fn hides_or_marks_credentials() {
        let (l, key) = layer();
        let req = |h: &str, v: String| Request::builder().header(h, v).body(()).unwrap();
        let (res, seen) = call(&l, req("x-api-key", key.clone())).await;
        assert_eq!(res.status(), 200);
        assert_eq!(seen, "None|None|/");
        assert_eq!(res.extensions().get::<Principal>().unwrap().id(), "k");

        let (_, seen) = call(&l, req("authorization", format!("Bearer {key}"))).await;
        assert_eq!(seen, "None|None|/");

        let kept = l.clone().hide_credentials(false);
        let (_, seen) = call(&kept, req("authorization", format!("ApiKey {key}"))).await;
        assert_eq!(seen, "None|Some(true)|/");

        let q = l.allow_key_in_query_dangerously("api_key").unwrap();
        let r = Request::builder()
            .uri(format!("/x?a=1&api_key={key}&b=2"))
            .body(())
            .unwrap();
        let (res, seen) = call(&q, r).await;
        assert_eq!(res.status(), 200);
        assert_eq!(seen, "None|None|/x?a=1&b=2");
        assert!(
            AuthenticateLayer::api_keys(ApiKeys::new(
                KeyStore::from_records([
                    KeyRecord::new("k", crate::api_key::KeyDigest::of("x")).unwrap()
                ])
                .unwrap()
            ))
            .allow_key_in_query_dangerously("a b")
            .is_err()
        );
    }

    #[tokio::test]
    async fn hiding_keeps_authorization_values_of_other_schemes() {
        let (l, key) = layer();
        let svc = ServiceBuilder::new()
            .layer(l)
            .service_fn(|req: Request<()>| async move {
                let values: Vec<_> = req
                    .headers()
                    .get_all(AUTHORIZATION)
                    .iter()
                    .cloned()
                    .collect();
                Ok::<_, Infallible>(Response::new(Bytes::from(format!("{values:?}"))))
            });
        let req = Request::builder()
            .header("authorization", "Basic dXNlcjpwYXNz")
            .header("authorization", format!("Bearer {key}"))
            .header("authorization", "Digest x")
            .body(())
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.body(), "[\"Basic dXNlcjpwYXNz\", \"Digest x\"]");
    }

    #[tokio::test]
    async fn unauthenticated_mode_marks_the_principal() {
        let l = AuthenticateLayer::allow_unauthenticated_requests_dangerously(
            Scopes::parse("jobs:read").unwrap(),
        );
        let (res, _) = call(&l, Request::new(())).await;
        assert_eq!(res.status(), 200);
        let p = res.extensions().get::<Principal>().unwrap();
        assert_eq!(p.method(), AuthMethod::Unauthenticated);
        assert_eq!(p.id(), UNAUTHENTICATED_ID);
    }
}

/// The query-string parameter of a key, against the log redaction of the query.
#[cfg(all(test, feature = "api-key", feature = "redact"))]
mod query_properties {
    use super::*;
    use crate::api_key::{KeyDigest, KeyRecord, KeyStore};
    use crate::redact::Redactor;
    use proptest::prelude::*;

    fn layer() -> AuthenticateLayer {
        let store = KeyStore::from_records([KeyRecord::new("k", KeyDigest::of("x")).unwrap()]);
        AuthenticateLayer::api_keys(ApiKeys::new(store.unwrap()))
    }

    #[test]
    fn a_parameter_the_log_shows_is_refused() {
        for shown in ["k", "q", "apikey_id", "key_id", "x-key-name"] {
            assert!(
                layer().allow_key_in_query_dangerously(shown).is_err(),
                "{shown}"
            );
        }
        for hidden in [
            "api_key",
            "apiKey",
            "key",
            "token",
            "access_token",
            "X-API-Key",
        ] {
            assert!(
                layer().allow_key_in_query_dangerously(hidden).is_ok(),
                "{hidden}"
            );
        }
    }

    proptest! {
        /// Whatever parameter the layer is told to read a key from, the key the
        /// layer reads there is hidden by what the access log does to the query
        /// (`redact_query`, then the pattern rules), for plain keys too.
        #[test]
        fn a_key_read_from_the_query_never_reaches_the_log(
            name in prop_oneof![
                "[A-Za-z0-9_-]{1,12}",
                "[a-z_-]{0,6}(api_key|apikey|key|token|secret|auth|sig|access_token)[0-9]{0,2}",
            ],
            key in "[0-9A-Za-z._~-]{32,64}",
        ) {
            let Ok(layer) = layer().allow_key_in_query_dangerously(&name) else {
                return Ok(());
            };
            let query = format!("page=2&{name}={key}&q=cats");
            let headers = HeaderMap::new();
            let found = extract_credential(
                &headers,
                Some(&query),
                layer.config.query_param.as_deref(),
            );
            prop_assert_eq!(found.map(|c| c.map(|c| c.expose_secret())), Ok(Some(key.as_str())));
            let r = Redactor::new();
            let logged = r.redact_uri_part(&r.redact_query(&query)).into_owned();
            prop_assert!(!logged.contains(&key), "{} -> {}", query, logged);
        }
    }
}
