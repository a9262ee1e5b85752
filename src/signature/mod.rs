//! Signed requests: HTTP Message Signatures (RFC 9421) with `Content-Digest`
//! (RFC 9530), a credential beside API keys and service tokens.
//!
//! A client holding a per-client secret (`hmac-sha256`) or an Ed25519 private key
//! (`ed25519`) signs chosen parts of each request: the method, authority, path and
//! query, some header fields, and (through `Content-Digest`) the body, with a
//! creation time and a nonce. [`VerifySignatureLayer`] checks such a request and
//! makes its key's [`Principal`] (id, scopes, tier; method
//! [`AuthMethod::HttpSignature`]) the request's; [`SignRequestLayer`] is the client
//! side.
//!
//! # What is checked, in order
//!
//! 1. A request with neither `Signature-Input` nor `Signature` passes untouched:
//!    the [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer) inside
//!    handles other credentials (and refuses the request if it has none). Behind
//!    this layer, the authentication layer accepts the signature's principal and
//!    refuses a signed request that carries another credential too (400).
//! 2. Exactly one signature, parsed with `sfv` (structured fields, RFC 9651); it
//!    must name `keyid` and `created`, and a `nonce` unless the verifier was told
//!    otherwise. Malformed: 400.
//! 3. `keyid` names a registered key (else 401 `unknown_key`); an `alg` parameter,
//!    if present, must be that key's algorithm.
//! 4. It covers every component the operator requires (default `@method`,
//!    `@authority`, `@path`, `@query`), and `content-digest` whenever the request
//!    has a body; the supported components are `@method`, `@authority`, `@path`,
//!    `@query`, `@request-target` and header fields without parameters.
//!    `@authority` is the target URI's authority, else the `Host` field's; a
//!    request naming it ambiguously (`Host` twice, or a URI authority and a `Host`
//!    that differ) has none, so a signature covering it is refused.
//! 5. `created` is at most [`max_age`](SignatureVerifierBuilder::max_age) old and
//!    not in the future, and `expires` (if any) not past, each with the
//!    [`clock_skew`](SignatureVerifierBuilder::clock_skew) allowed. Else 401
//!    `stale_signature`.
//! 6. The signature over the signature base (RFC 9421 §2.5) verifies: HMAC-SHA256
//!    compared in constant time, or Ed25519 (strict verification). Else 401
//!    `invalid_signature`.
//! 7. With `content-digest` covered, the body is read, up to
//!    [`max_body_bytes`](SignatureVerifierBuilder::max_body_bytes) (default 1 MiB;
//!    beyond: 413 `body_too_large`), and must match every `sha-256` and `sha-512`
//!    digest of the field (other algorithms are ignored; at least one known one
//!    must be there), compared in constant time (else 401 `digest_mismatch`); the
//!    service then gets exactly those bytes ([`SignedBody`]).
//! 8. The nonce was not seen before for this key within the freshness window, else
//!    401 `replayed_signature`: kept in memory (bounded per key, see below), or in
//!    Redis, shared by every instance, when the verifier has the
//!    [`RedisLimiter`](crate::rate_limit::redis::RedisLimiter). The memory is this
//!    process's alone: a request replayed to another instance, or to this one after
//!    a restart, is not recognised. Use Redis wherever several processes serve the
//!    same keys.
//!
//! Every refusal is the crate's generic problem document: which check failed is in
//! the denial reason and the audit event `auth_failed`, never in the response. A
//! verified request is recorded by the access event (`principal` the key id,
//! `auth_method` `http_signature`); the `auth_succeeded` audit event for it is the
//! authentication layer's opt-in
//! ([`AuthenticateLayer::audit_successes`](crate::authenticate::AuthenticateLayer::audit_successes)).
//!
//! # Keys and secrets
//!
//! A [`SignatureKey`] holds a key id (its public name, the principal's id), the
//! secret or public key, and the principal's scopes and tier. An HMAC secret is at
//! least 32 bytes, never logged and never in `Debug`; it is compared only through
//! the MAC's constant-time check.
//!
//! # Memory
//!
//! The in-memory nonce cache keeps, per key, a 16-byte digest and an expiry for
//! each nonce seen within the freshness window (`max_age` plus twice the skew, plus
//! the second the clock reads last), at
//! most [`max_nonces_per_key`](SignatureVerifierBuilder::max_nonces_per_key)
//! (default 100 000, about 5 MB per key when full). Expired nonces are dropped when
//! a key's set is full; if it is still full the request is refused with 429
//! (`replay_cache_full`) rather than forgetting a nonce that could then be replayed.
//!
//! ```
//! use portcullis::signature::{SignatureKey, SignatureVerifier, VerifySignatureLayer};
//! use portcullis::Scopes;
//!
//! let secret = [7u8; 32]; // from your secret store
//! let verifier = SignatureVerifier::builder()
//!     .key(SignatureKey::hmac_sha256("billing-worker", &secret)?.with_scopes(Scopes::parse("jobs:work")?))
//!     .build()?;
//! let layer = VerifySignatureLayer::new(verifier);
//! # let _ = layer;
//! # Ok::<(), portcullis::ConfigError>(())
//! ```

mod body;
mod client;
mod nonce;
pub(crate) mod parse;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use body::SignedBody;
pub use client::{SignRequest, SignRequestLayer, SigningKey};

use crate::principal::check_name;
use crate::rejection::{Challenge, DenialReason, RefusalBody, Rejection};
use crate::{AuthMethod, ClientIp, ConfigError, Principal, Scopes};
use parse::{Component, Message, ParseError, SignatureInput};

/// `Signature-Input`.
pub(crate) const SIGNATURE_INPUT: http::HeaderName =
    http::HeaderName::from_static("signature-input");
/// `Signature`.
pub(crate) const SIGNATURE: http::HeaderName = http::HeaderName::from_static("signature");
/// `Content-Digest`.
pub(crate) const CONTENT_DIGEST: http::HeaderName = http::HeaderName::from_static("content-digest");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The signing algorithms (RFC 9421 §3.3).
#[derive(Clone)]
pub(crate) enum KeyMaterial {
    HmacSha256(Arc<[u8]>),
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl KeyMaterial {
    fn alg(&self) -> &'static str {
        match self {
            KeyMaterial::HmacSha256(_) => "hmac-sha256",
            KeyMaterial::Ed25519(_) => "ed25519",
        }
    }

    /// Whether `signature` is this key's over `base`. HMAC tags are compared by
    /// the MAC's constant-time check; Ed25519 uses strict verification (no
    /// malleable or small-order encodings).
    fn verify(&self, base: &[u8], signature: &[u8]) -> bool {
        match self {
            KeyMaterial::HmacSha256(secret) => {
                use hmac::Mac;
                let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) else {
                    return false;
                };
                mac.update(base);
                mac.verify_slice(signature).is_ok()
            }
            KeyMaterial::Ed25519(key) => {
                let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
                    return false;
                };
                key.verify_strict(base, &sig).is_ok()
            }
        }
    }
}

/// A client's signing key as the verifier knows it: its id, the shared secret or
/// the public key, and the scopes and tier of the [`Principal`] it authenticates.
///
/// `Debug` shows the id and algorithm, never the secret.
#[derive(Clone)]
pub struct SignatureKey {
    id: Arc<str>,
    material: KeyMaterial,
    scopes: Scopes,
    tier: Option<Arc<str>>,
}

impl fmt::Debug for SignatureKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignatureKey")
            .field("id", &self.id)
            .field("alg", &self.material.alg())
            .field("scopes", &self.scopes)
            .field("tier", &self.tier)
            .finish()
    }
}

impl SignatureKey {
    fn new(id: &str, material: KeyMaterial) -> Result<Self, ConfigError> {
        check_name("signature key id", id)?;
        Ok(Self {
            id: id.into(),
            material,
            scopes: Scopes::default(),
            tier: None,
        })
    }

    /// An `hmac-sha256` key: `secret` is shared with the client, at least 32
    /// bytes (draw it from a CSPRNG).
    pub fn hmac_sha256(id: &str, secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.len() < 32 {
            return Err(ConfigError::new(
                "an hmac-sha256 signing secret must be at least 32 bytes",
            ));
        }
        Self::new(id, KeyMaterial::HmacSha256(secret.into()))
    }

    /// An `ed25519` key: the client's 32-byte public key (the client keeps the
    /// private key). A weak (small-order) key is refused.
    pub fn ed25519(id: &str, public_key: &[u8; 32]) -> Result<Self, ConfigError> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(public_key)
            .map_err(|_| ConfigError::new("not an Ed25519 public key"))?;
        if key.is_weak() {
            return Err(ConfigError::new("a weak Ed25519 public key is refused"));
        }
        Self::new(id, KeyMaterial::Ed25519(key))
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

    /// The key id (`keyid`), the principal's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn principal(&self) -> Principal {
        let p =
            Principal::new(&*self.id, AuthMethod::HttpSignature).with_scopes(self.scopes.clone());
        match &self.tier {
            Some(t) => p.with_tier(t.clone()),
            None => p,
        }
    }
}

/// Builds a [`SignatureVerifier`].
#[derive(Debug)]
pub struct SignatureVerifierBuilder {
    keys: Vec<SignatureKey>,
    required: Vec<Component>,
    required_error: Option<ConfigError>,
    max_age: Duration,
    skew: Duration,
    require_nonce: bool,
    max_body: usize,
    max_nonces: usize,
    realm: String,
    #[cfg(feature = "redis")]
    redis: Option<crate::rate_limit::redis::RedisLimiter>,
    clock: fn() -> u64,
}

impl SignatureVerifierBuilder {
    /// The clock the layer reads (seconds since the epoch), for tests that fix it
    /// (e.g. to verify RFC 9421's published signatures over the wire).
    #[cfg(test)]
    pub(crate) fn clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    /// Registers a key. Key ids are unique.
    pub fn key(mut self, key: SignatureKey) -> Self {
        self.keys.push(key);
        self
    }

    /// The components every signature must cover, space separated (default
    /// `@method @authority @path @query`). `content-digest` is required on top
    /// whenever a request has a body. An empty list is a configuration error: a
    /// signature covering nothing would authorise any method, path and query. A list
    /// that leaves out `@method`, `@path` or `@query` lets one signature authorise
    /// the requests that differ only there: keep them unless a client cannot sign
    /// them.
    ///
    /// ```
    /// use portcullis::signature::{SignatureKey, SignatureVerifier};
    /// let key = || SignatureKey::hmac_sha256("k1", &[7; 32]).unwrap();
    /// let v = SignatureVerifier::builder().key(key()).required_components("@method @path");
    /// assert!(v.build().is_ok());
    /// let none = SignatureVerifier::builder().key(key()).required_components(" ");
    /// assert!(none.build().is_err());
    /// ```
    pub fn required_components(mut self, list: &str) -> Self {
        let parsed: Result<Vec<_>, _> = list.split_whitespace().map(Component::parse).collect();
        match parsed {
            Ok(v) if v.is_empty() => {
                self.required_error = Some(ConfigError::new(
                    "required signature components: at least one (a signature covering \
                     nothing would authorise any request)",
                ))
            }
            Ok(v) => self.required = v,
            Err(_) => {
                self.required_error = Some(ConfigError::new(
                    "required signature components: each must be @method, @authority, @path, \
                     @query, @request-target or a lowercase header field name",
                ))
            }
        }
        self
    }

    /// How old `created` may be (default 5 minutes, 1 s to 1 hour).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    /// How far the client's clock may be off (default 30 s, at most 5 minutes).
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.skew = skew;
        self
    }

    /// Accepts signatures without a `nonce`. They can then be replayed within the
    /// freshness window: use only where a replayed request is harmless.
    pub fn allow_signatures_without_nonce_dangerously(mut self) -> Self {
        self.require_nonce = false;
        self
    }

    /// The largest body read to check its `Content-Digest` (default 1 MiB).
    pub fn max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The most nonces remembered per key within the freshness window (default
    /// 100 000; see the [module docs](self#memory)).
    pub fn max_nonces_per_key(mut self, n: usize) -> Self {
        self.max_nonces = n;
        self
    }

    /// The realm of the 401 challenge (default `api`).
    pub fn realm(mut self, realm: &str) -> Self {
        realm.clone_into(&mut self.realm);
        self
    }

    /// Keeps the nonces in Redis, shared by every instance (`<namespace>:sn:…`,
    /// each expiring with the freshness window), through the limiter's connection,
    /// timeout, breaker and failure policy: fail-open accepts unchecked nonces,
    /// fail-closed answers 503, fall-back-local checks this instance's memory.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, limiter: crate::rate_limit::redis::RedisLimiter) -> Self {
        self.redis = Some(limiter);
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<SignatureVerifier, ConfigError> {
        if let Some(e) = self.required_error {
            return Err(e);
        }
        if self.keys.is_empty() {
            return Err(ConfigError::new("no signature keys: register at least one"));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&self.max_age) {
            return Err(ConfigError::new("signature max_age must be 1 s to 1 hour"));
        }
        if self.skew > Duration::from_secs(300) {
            return Err(ConfigError::new(
                "signature clock_skew must be at most 5 minutes",
            ));
        }
        if self.max_body == 0 || self.max_nonces == 0 {
            return Err(ConfigError::new(
                "max_body_bytes and max_nonces_per_key must be at least 1",
            ));
        }
        let mut keys = HashMap::with_capacity(self.keys.len());
        for k in self.keys {
            let id = k.id.clone();
            if keys.insert(id.clone(), k).is_some() {
                return Err(ConfigError::new(format!(
                    "signature key `{id}` is registered twice"
                )));
            }
        }
        let challenge = Challenge::api_key(&self.realm)?.and_bearer();
        Ok(SignatureVerifier {
            inner: Arc::new(Inner {
                keys,
                required: self.required,
                max_age: self.max_age.as_secs(),
                skew: self.skew.as_secs(),
                require_nonce: self.require_nonce,
                max_body: self.max_body,
                nonces: nonce::NonceCache::new(self.max_nonces),
                challenge,
                #[cfg(feature = "redis")]
                redis: self.redis,
                clock: self.clock,
            }),
        })
    }
}

/// The keys and rules signed requests are verified against; give it to
/// [`VerifySignatureLayer::new`]. Cheap to clone (clones share the nonce cache).
#[derive(Clone)]
pub struct SignatureVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    keys: HashMap<Arc<str>, SignatureKey>,
    required: Vec<Component>,
    max_age: u64,
    skew: u64,
    require_nonce: bool,
    max_body: usize,
    nonces: nonce::NonceCache,
    challenge: Challenge,
    #[cfg(feature = "redis")]
    redis: Option<crate::rate_limit::redis::RedisLimiter>,
    /// Seconds since the epoch: [`now_secs`] but in tests.
    clock: fn() -> u64,
}

impl fmt::Debug for SignatureVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let mut ids: Vec<&str> = i.keys.keys().map(|k| &**k).collect();
        ids.sort_unstable();
        f.debug_struct("SignatureVerifier")
            .field("keys", &ids)
            .field(
                "required",
                &i.required.iter().map(Component::name).collect::<Vec<_>>(),
            )
            .field("max_age_secs", &i.max_age)
            .field("clock_skew_secs", &i.skew)
            .field("require_nonce", &i.require_nonce)
            .field("max_body_bytes", &i.max_body)
            .finish()
    }
}

impl SignatureVerifier {
    /// Starts a configuration.
    pub fn builder() -> SignatureVerifierBuilder {
        SignatureVerifierBuilder {
            keys: Vec::new(),
            required: vec![
                Component::Method,
                Component::Authority,
                Component::Path,
                Component::Query,
            ],
            required_error: None,
            max_age: Duration::from_secs(300),
            skew: Duration::from_secs(30),
            require_nonce: true,
            max_body: 1 << 20,
            max_nonces: 100_000,
            realm: crate::authenticate::DEFAULT_REALM.to_owned(),
            #[cfg(feature = "redis")]
            redis: None,
            clock: now_secs,
        }
    }
}

/// A signature that verified, before its body and nonce are checked.
struct Checked {
    principal: Principal,
    key: Arc<str>,
    nonce: Option<String>,
    /// The digests the body must match, if `content-digest` is covered.
    digests: Option<Vec<(parse::DigestAlg, Vec<u8>)>>,
    /// The first second (since the epoch) at which the signature is stale
    /// anyway: until then its nonce must be remembered.
    stale_at: u64,
}

/// The time as the verifier reads it: seconds since the epoch.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request's authority for `@authority` (RFC 9421 §2.2.3): the target URI's
/// (absolute form, HTTP/2), else the one `Host` field's. `None`, so that a
/// signature covering `@authority` is refused, when the request names its
/// authority ambiguously: `Host` given twice, a URI authority and a `Host` that
/// differ (the signature would bind one while the service may route by the
/// other), or user information in the URI.
fn authority<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(h), None) => Some(h.to_str().ok()?),
        (Some(_), Some(_)) => return None,
    };
    match (uri.authority().map(http::uri::Authority::as_str), host) {
        (Some(a), _) if a.contains('@') => None,
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => None,
        (Some(a), _) => Some(a),
        (None, h) => h,
    }
}

/// One field's lines joined with `, ` (as RFC 9110 combines them); `None` if
/// absent or not ASCII.
fn joined(headers: &HeaderMap, name: &http::HeaderName) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (i, v) in headers.get_all(name).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(v.as_bytes());
    }
    (!out.is_empty() || headers.contains_key(name)).then_some(out)
}

impl Inner {
    /// Steps 2 to 6 of the [module docs](self): everything but the body and the
    /// nonce, on the request head at time `now` (seconds since the epoch).
    fn check_head(
        &self,
        method: &str,
        uri: &http::Uri,
        headers: &HeaderMap,
        has_body: bool,
        now: u64,
    ) -> Result<Checked, DenialReason> {
        let (Some(input), Some(signature)) = (
            joined(headers, &SIGNATURE_INPUT),
            joined(headers, &SIGNATURE),
        ) else {
            return Err(DenialReason::MalformedCredential);
        };
        let sig = parse::parse_signature(&input, &signature).map_err(|e| match e {
            ParseError::Component => DenialReason::InvalidSignature,
            _ => DenialReason::MalformedCredential,
        })?;
        self.check_signature(&sig, method, uri, headers, has_body, now)
    }

    fn check_signature(
        &self,
        sig: &SignatureInput,
        method: &str,
        uri: &http::Uri,
        headers: &HeaderMap,
        has_body: bool,
        now: u64,
    ) -> Result<Checked, DenialReason> {
        let key = self
            .keys
            .get(sig.keyid.as_str())
            .ok_or(DenialReason::UnknownKey)?;
        if sig.alg.as_deref().is_some_and(|a| a != key.material.alg()) {
            return Err(DenialReason::InvalidSignature);
        }
        if self.require_nonce && sig.nonce.as_deref().is_none_or(str::is_empty) {
            return Err(DenialReason::InvalidSignature);
        }
        let digest = Component::Field("content-digest".to_owned());
        let covers_digest = sig.components.contains(&digest);
        if self.required.iter().any(|c| !sig.components.contains(c)) || (has_body && !covers_digest)
        {
            return Err(DenialReason::InvalidSignature);
        }
        // Freshness: created within [now - max_age - skew, now + skew], expires
        // (if any) after now - skew. Checked arithmetic: any value is refused,
        // never wrapped.
        let created = u64::try_from(sig.created).map_err(|_| DenialReason::StaleSignature)?;
        if created > now.saturating_add(self.skew)
            || now.saturating_sub(created) > self.max_age.saturating_add(self.skew)
        {
            return Err(DenialReason::StaleSignature);
        }
        if let Some(expires) = sig.expires {
            let expires = u64::try_from(expires).map_err(|_| DenialReason::StaleSignature)?;
            if expires.saturating_add(self.skew) <= now {
                return Err(DenialReason::StaleSignature);
            }
        }
        let msg = Message {
            method,
            authority: authority(uri, headers),
            path: uri.path(),
            query: uri.query(),
            headers,
        };
        let base = parse::signature_base(&msg, &sig.components, &sig.params_line)
            .map_err(|_| DenialReason::InvalidSignature)?;
        if !key.material.verify(base.as_bytes(), &sig.signature) {
            return Err(DenialReason::InvalidSignature);
        }
        let digests = if covers_digest {
            let field = joined(headers, &CONTENT_DIGEST).ok_or(DenialReason::DigestMismatch)?;
            let d =
                parse::parse_content_digest(&field).map_err(|_| DenialReason::DigestMismatch)?;
            if d.is_empty() {
                return Err(DenialReason::DigestMismatch);
            }
            Some(d)
        } else {
            None
        };
        Ok(Checked {
            principal: key.principal(),
            key: key.id.clone(),
            nonce: sig.nonce.clone(),
            digests,
            stale_at: self.stale_at(created).max(now),
        })
    }

    /// The first whole second at which a signature `created` then is refused on
    /// every instance: this clock accepts it through the second
    /// `created + max_age + skew`, and another instance's clock may read up to
    /// `skew` behind. Its nonce is remembered until then, so that no second in
    /// which the signature is accepted (the clock reads whole seconds) can see its
    /// nonce forgotten.
    fn stale_at(&self, created: u64) -> u64 {
        created
            .saturating_add(self.max_age)
            .saturating_add(2 * self.skew)
            .saturating_add(1)
    }

    /// How long the nonce of `c`, claimed at `now`, is remembered in Redis: until
    /// `c.stale_at` at the earliest, whatever fraction of the second `now` has run.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn nonce_ttl(c: &Checked, now: u64) -> Duration {
        Duration::from_secs(c.stale_at.saturating_sub(now).max(1))
    }

    /// Whether `body` matches every digest of `digests` (those of the algorithms
    /// this crate computes; at least one), compared in constant time. A field
    /// whose digests disagree is refused whichever one the body matches: no
    /// algorithm can stand in for another the signer named.
    fn digest_matches(digests: &[(parse::DigestAlg, Vec<u8>)], body: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        !digests.is_empty()
            && digests.iter().all(|(alg, expected)| {
                let actual = alg.digest(body);
                // Lengths are public (fixed per algorithm); the bytes are compared in
                // constant time.
                actual.len() == expected.len() && bool::from(actual.ct_eq(expected))
            })
    }

    /// Step 8: records the nonce, or refuses a replay. In memory unless Redis is
    /// configured.
    async fn claim(&self, c: &Checked, now: u64) -> Result<(), Refusal> {
        let Some(nonce) = &c.nonce else { return Ok(()) };
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.redis {
            let ttl = Self::nonce_ttl(c, now);
            return match redis
                .claim_nonce(&nonce::nonce_name(&c.key, nonce), ttl)
                .await
            {
                Ok(true) => Ok(()),
                Ok(false) => Err(Refusal::Denied(DenialReason::ReplayedSignature)),
                Err(_) => {
                    use crate::rate_limit::redis::FailurePolicy;
                    match redis.failure_policy() {
                        FailurePolicy::FailOpen => Ok(()),
                        FailurePolicy::FailClosed => Err(Refusal::Unavailable(redis.retry_after())),
                        FailurePolicy::FallbackLocal => self.claim_local(c, nonce, now),
                    }
                }
            };
        }
        self.claim_local(c, nonce, now)
    }

    fn claim_local(&self, c: &Checked, nonce: &str, now: u64) -> Result<(), Refusal> {
        match self.nonces.claim(&c.key, nonce, c.stale_at, now) {
            nonce::Claim::Fresh => Ok(()),
            nonce::Claim::Replayed => Err(Refusal::Denied(DenialReason::ReplayedSignature)),
            nonce::Claim::Full(retry) => Err(Refusal::Full(Duration::from_secs(retry.max(1)))),
        }
    }

    fn refuse<B: RefusalBody>(
        &self,
        refusal: Refusal,
        ip: Option<ClientIp>,
        key: Option<&str>,
    ) -> Response<B> {
        let reason = match refusal {
            Refusal::Denied(r) => r,
            Refusal::Full(_) => DenialReason::ReplayCacheFull,
            Refusal::Unavailable(_) => DenialReason::BackendUnavailable,
        };
        crate::audit::emit!(
            info,
            AuthFailed,
            reason = reason.as_str(),
            client_ip = ip.map(tracing::field::display),
            key_id = key.map(crate::log_text::sanitize_id).as_deref(),
        );
        let rejection = match refusal {
            Refusal::Full(retry) => Rejection::too_many_requests(reason, retry),
            Refusal::Unavailable(retry) => Rejection::unavailable(reason, Some(retry)),
            Refusal::Denied(DenialReason::MalformedCredential) => {
                Rejection::invalid_request(&self.challenge, reason)
            }
            Refusal::Denied(DenialReason::BodyTooLarge) => Rejection::payload_too_large(reason),
            Refusal::Denied(r) => Rejection::invalid_credential(&self.challenge, r),
        };
        rejection.into_response()
    }
}

/// Why a signed request is refused.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    Denied(DenialReason),
    /// The key's nonce cache is full; retry after this long.
    Full(Duration),
    /// Redis is down and the policy is fail-closed.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Unavailable(Duration),
}

/// A principal that a signature verified, for the authentication layer inside:
/// only this crate can put one in a request.
#[derive(Clone, Debug)]
pub(crate) struct SignedPrincipal(pub(crate) Principal);

/// Verifies HTTP Message Signatures and authenticates the signer; see the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct VerifySignatureLayer {
    verifier: SignatureVerifier,
}

impl VerifySignatureLayer {
    /// A layer verifying signed requests with `verifier`.
    pub fn new(verifier: SignatureVerifier) -> Self {
        Self { verifier }
    }
}

impl<S> Layer<S> for VerifySignatureLayer {
    type Service = VerifySignature<S>;
    fn layer(&self, inner: S) -> Self::Service {
        VerifySignature {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// Service verifying signed requests; see [`VerifySignatureLayer`].
#[derive(Clone, Debug)]
pub struct VerifySignature<S> {
    inner: S,
    verifier: SignatureVerifier,
}

impl<S> VerifySignature<S> {
    /// Wraps `inner` with the verification of `layer`.
    pub fn new(inner: S, layer: &VerifySignatureLayer) -> Self {
        layer.layer(inner)
    }
    define_inner_service_accessors!();
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for VerifySignature<S>
where
    S: Service<Request<SignedBody<B>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResBody: RefusalBody + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let headers = req.headers();
        if !headers.contains_key(&SIGNATURE_INPUT) && !headers.contains_key(&SIGNATURE) {
            return ResponseFuture::inner(self.inner.call(req.map(SignedBody::streaming)));
        }
        let ip = req.extensions().get::<ClientIp>().copied();
        let v = self.verifier.inner.clone();
        let now = (v.clock)();
        let has_body = !http_body::Body::is_end_stream(req.body());
        let checked = match v.check_head(req.method().as_str(), req.uri(), headers, has_body, now) {
            Ok(c) => c,
            Err(reason) => {
                return ResponseFuture::rejected(v.refuse(Refusal::Denied(reason), ip, None));
            }
        };
        if let Some(len) = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|l| l.to_str().ok()?.parse::<u64>().ok())
            && len > v.max_body as u64
        {
            let r = Refusal::Denied(DenialReason::BodyTooLarge);
            return ResponseFuture::rejected(v.refuse(r, ip, Some(&checked.key)));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::boxed(Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let body = match &checked.digests {
                None => SignedBody::streaming(body),
                Some(digests) => {
                    use http_body_util::BodyExt;
                    let limited = http_body_util::Limited::new(body, v.max_body);
                    let bytes = match limited.collect().await {
                        Ok(c) => c.to_bytes(),
                        Err(e) => {
                            let reason = if e.is::<http_body_util::LengthLimitError>() {
                                DenialReason::BodyTooLarge
                            } else {
                                DenialReason::MalformedCredential
                            };
                            return Ok(v.refuse(Refusal::Denied(reason), ip, Some(&checked.key)));
                        }
                    };
                    if !Inner::digest_matches(digests, &bytes) {
                        let r = Refusal::Denied(DenialReason::DigestMismatch);
                        return Ok(v.refuse(r, ip, Some(&checked.key)));
                    }
                    SignedBody::buffered(bytes)
                }
            };
            if let Err(r) = v.claim(&checked, now).await {
                return Ok(v.refuse(r, ip, Some(&checked.key)));
            }
            // The success is recorded by the access event; the opt-in
            // `auth_succeeded` audit event is the authentication layer's, emitted
            // when it accepts this principal.
            parts.extensions.insert(checked.principal.clone());
            parts
                .extensions
                .insert(SignedPrincipal(checked.principal.clone()));
            let principal = checked.principal;
            // `inner` is the service this one was made ready as (a clone took its
            // place), so it may be called without waiting again.
            let mut res = inner.call(Request::from_parts(parts, body)).await?;
            res.extensions_mut().insert(principal);
            Ok(res)
        }))
    }
}

pin_project! {
    /// Response future of [`VerifySignature`]: the inner service's future (an
    /// unsigned request), a refusal, or the verification of a signed one.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Inner { #[pin] future: F },
        Rejected { response: Option<Response<B>> },
        Verifying { future: BoxFuture<Result<Response<B>, E>> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }
    fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
    fn boxed(future: BoxFuture<Result<Response<B>, E>>) -> Self {
        Self {
            kind: Kind::Verifying { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Verifying { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Rejected { .. } => "Rejected",
            Kind::Verifying { .. } => "Verifying",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

#[cfg(test)]
mod tests;
