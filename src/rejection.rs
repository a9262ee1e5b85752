//! Every refusal portcullis makes, built in one place.
//!
//! A layer that refuses a request returns `Ok(response)` built from a [`Rejection`];
//! the inner service's error type is never used for a denial. The response:
//!
//! - is `application/problem+json` (RFC 9457) with a fixed `title` and `detail` per
//!   class: it never echoes request input, key material, or which check failed
//!   beyond the class (missing vs invalid credential, as RFC 6750 distinguishes);
//! - carries `Cache-Control: no-store`;
//! - on 401 carries one `WWW-Authenticate` challenge per accepted scheme, with
//!   `error="invalid_token"` when a credential was presented (RFC 6750 §3), and on
//!   400/403 from the authentication layers `error="invalid_request"` /
//!   `error="insufficient_scope"` with the required `scope`;
//! - on 429 and 503 carries `Retry-After` in whole seconds, rounded up, never 0;
//! - carries the [`DenialReason`] in its *extensions* so the access log knows why.
//!   The reason never reaches the client.
//!
//! ## gRPC
//!
//! A gRPC request ([`Rejection::into_response_to`] decides which requests are) is
//! refused the gRPC way instead: a *trailers-only* response, HTTP 200 with an empty
//! body and `content-type: application/grpc`, whose headers carry `grpc-status` and
//! a fixed, generic `grpc-message`. The mapping:
//!
//! | refusal | HTTP | `grpc-status` |
//! |---|---|---|
//! | malformed or several credentials | 400 | `INVALID_ARGUMENT` (3) |
//! | missing or invalid credential | 401 | `UNAUTHENTICATED` (16) |
//! | address denied, insufficient scope or method | 403 | `PERMISSION_DENIED` (7) |
//! | rate limited, throttled | 429 | `RESOURCE_EXHAUSTED` (8), with `grpc-retry-pushback-ms` |
//! | backend down (fail-closed) | 503 | `UNAVAILABLE` (14), with `grpc-retry-pushback-ms` when known |
//! | server wired wrongly | 500 | `INTERNAL` (13) |
//!
//! Extra headers (the `RateLimit` fields) and the [`DenialReason`] extension are the
//! same in both forms; `WWW-Authenticate` and `Retry-After` belong to HTTP and are
//! left out.
//!
//! ```
//! use http::Request;
//! use portcullis::rejection::{DenialReason, Rejection};
//!
//! let req = Request::post("/queue.Jobs/Submit")
//!     .header("content-type", "application/grpc+proto")
//!     .body(())
//!     .unwrap();
//! let res = Rejection::forbidden(DenialReason::IpDenied).into_response_to::<(), _>(&req);
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()["grpc-status"], "7");
//! assert_eq!(res.headers()["grpc-message"], "permission denied");
//! ```
//!
//! ## Response bodies
//!
//! A layer never changes the response body type, so it must build a refusal in the
//! inner service's body type. The only trait that axum's `Body`, hyper's
//! `Full<Bytes>` and tonic's `Body` all implement is [`Default`], so that is the whole
//! bound ([`RefusalBody`]). The problem document is written into the body types
//! that can carry bytes and are known here: `http_body_util::Full<Bytes>`,
//! `http_body_util::combinators::{BoxBody, UnsyncBoxBody}<Bytes, BoxError>`,
//! `axum::body::Body` (feature `axum`), `tonic::body::Body` (feature `tonic`),
//! [`Bytes`], `Vec<u8>` and `String`. Any other body type gets an empty body, with
//! the same status and headers but no `Content-Type`: the status and headers carry
//! the whole refusal either way, the document only repeats the class in words.
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use portcullis::rejection::{Challenge, DenialReason, Rejection};
//!
//! let challenge = Challenge::bearer("api").unwrap();
//! let res = Rejection::invalid_credential(&challenge, DenialReason::ExpiredKey)
//!     .into_response::<Full<Bytes>>();
//! assert_eq!(res.status(), 401);
//! assert_eq!(res.headers()["www-authenticate"], r#"Bearer realm="api", error="invalid_token""#);
//! assert_eq!(res.extensions().get::<DenialReason>(), Some(&DenialReason::ExpiredKey));
//! ```

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};

use crate::{ConfigError, Scopes};

/// Why a request was refused: the class the access and audit logs record.
///
/// It travels in the response extensions of a refused request. Unknown, expired,
/// revoked and not-yet-valid keys are distinct here and identical on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenialReason {
    /// No credential was presented.
    MissingCredential,
    /// A credential header that does not parse (RFC 6750 `invalid_request`).
    MalformedCredential,
    /// More than one credential in one request (RFC 6750 `invalid_request`).
    MultipleCredentials,
    /// A key that fails its format or checksum check, before any lookup.
    InvalidKeyFormat,
    /// A well-formed key that is not in the store.
    UnknownKey,
    /// A key past its expiry.
    ExpiredKey,
    /// A key before its not-before time.
    NotYetValidKey,
    /// A revoked key.
    RevokedKey,
    /// A service token that failed verification.
    InvalidToken,
    /// The principal lacks a required scope.
    InsufficientScope,
    /// The principal authenticated by a method the route does not accept (e.g. an
    /// API key on a route for service tokens only).
    AuthMethodNotAllowed,
    /// The client address is outside the allowlist or inside the deny list.
    IpDenied,
    /// The client address is outside the allowlist of the key that authenticated.
    KeyIpDenied,
    /// The key that authenticated has used up its credits.
    CreditsExhausted,
    /// A request signature that does not verify, or that does not cover what it must.
    InvalidSignature,
    /// A request signature created too long ago, in the future, or expired.
    StaleSignature,
    /// A request signature whose nonce was seen before.
    ReplayedSignature,
    /// A body that does not match its signed `Content-Digest`, or no digest.
    DigestMismatch,
    /// A body larger than the verifier reads.
    BodyTooLarge,
    /// A signing key's replay cache is full of live nonces.
    ReplayCacheFull,
    /// No client address could be resolved (e.g. an obfuscated forwarded entry).
    NoClientIp,
    /// The request exceeded its rate limit.
    RateLimited,
    /// Too many failed authentications from this client address.
    AuthThrottled,
    /// A backend the check needs is down and the policy is fail-closed.
    BackendUnavailable,
    /// The server is wired wrongly (e.g. no peer address attached): a bug to fix.
    Misconfigured,
}

impl DenialReason {
    /// A stable snake_case name for logs, e.g. `unknown_key`.
    pub fn as_str(self) -> &'static str {
        match self {
            DenialReason::MissingCredential => "missing_credential",
            DenialReason::MalformedCredential => "malformed_credential",
            DenialReason::MultipleCredentials => "multiple_credentials",
            DenialReason::InvalidKeyFormat => "invalid_key_format",
            DenialReason::UnknownKey => "unknown_key",
            DenialReason::ExpiredKey => "expired_key",
            DenialReason::NotYetValidKey => "not_yet_valid_key",
            DenialReason::RevokedKey => "revoked_key",
            DenialReason::InvalidToken => "invalid_token",
            DenialReason::InsufficientScope => "insufficient_scope",
            DenialReason::AuthMethodNotAllowed => "auth_method_not_allowed",
            DenialReason::IpDenied => "ip_denied",
            DenialReason::KeyIpDenied => "key_ip_denied",
            DenialReason::CreditsExhausted => "credits_exhausted",
            DenialReason::InvalidSignature => "invalid_signature",
            DenialReason::StaleSignature => "stale_signature",
            DenialReason::ReplayedSignature => "replayed_signature",
            DenialReason::DigestMismatch => "digest_mismatch",
            DenialReason::BodyTooLarge => "body_too_large",
            DenialReason::ReplayCacheFull => "replay_cache_full",
            DenialReason::NoClientIp => "no_client_ip",
            DenialReason::RateLimited => "rate_limited",
            DenialReason::AuthThrottled => "auth_throttled",
            DenialReason::BackendUnavailable => "backend_unavailable",
            DenialReason::Misconfigured => "misconfigured",
        }
    }

    /// Whether the request was refused at authentication: no credential was
    /// accepted (none, a malformed, unknown, expired, revoked or stale one,
    /// several, a signature that does not verify or cover its body), or the one
    /// that was verified was refused before the request got in (outside its key's
    /// address list, a throttled address). No principal speaks for such a request,
    /// whatever a layer outside the refusing one put in the response (a signature
    /// layer around an authentication layer that then refused a second credential).
    /// Refusals after authentication (scope, method, rate limit, credits) keep
    /// theirs.
    #[cfg_attr(not(feature = "access-log"), allow(dead_code))]
    pub(crate) fn refuses_authentication(self) -> bool {
        self.is_credential_failure()
            || matches!(
                self,
                DenialReason::MissingCredential
                    | DenialReason::KeyIpDenied
                    | DenialReason::BodyTooLarge
                    | DenialReason::ReplayCacheFull
                    | DenialReason::AuthThrottled
            )
    }

    /// Whether the refusal means a presented credential was wrong (what the
    /// failed-authentication throttle counts): malformed, unknown, expired, revoked
    /// or stale, several at once, or a signature that does not verify or cover its
    /// body.
    #[cfg_attr(
        not(any(feature = "access-log", feature = "auth-throttle")),
        allow(dead_code)
    )]
    pub(crate) fn is_credential_failure(self) -> bool {
        matches!(
            self,
            DenialReason::InvalidKeyFormat
                | DenialReason::UnknownKey
                | DenialReason::ExpiredKey
                | DenialReason::NotYetValidKey
                | DenialReason::RevokedKey
                | DenialReason::InvalidToken
                | DenialReason::MalformedCredential
                | DenialReason::MultipleCredentials
                | DenialReason::InvalidSignature
                | DenialReason::StaleSignature
                | DenialReason::ReplayedSignature
                | DenialReason::DigestMismatch
        )
    }
}

impl fmt::Display for DenialReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authentication schemes a 401 response offers, with their realm.
///
/// Built once at layer construction; the realm is checked then, so rendering the
/// header at request time cannot fail.
///
/// ```
/// use portcullis::rejection::Challenge;
/// let c = Challenge::bearer("jobs").unwrap().and_api_key();
/// assert!(Challenge::bearer("bad\"realm").is_err());
/// # let _ = c;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    realm: Arc<str>,
    bearer: bool,
    api_key: bool,
}

impl Challenge {
    /// A `Bearer` challenge (RFC 6750).
    pub fn bearer(realm: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            realm: check_realm(realm)?,
            bearer: true,
            api_key: false,
        })
    }

    /// An `ApiKey` challenge, for clients that send `X-API-Key` or
    /// `Authorization: ApiKey`.
    pub fn api_key(realm: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            realm: check_realm(realm)?,
            bearer: false,
            api_key: true,
        })
    }

    /// Also offer the `Bearer` scheme.
    pub fn and_bearer(mut self) -> Self {
        self.bearer = true;
        self
    }

    /// Also offer the `ApiKey` scheme.
    pub fn and_api_key(mut self) -> Self {
        self.api_key = true;
        self
    }

    /// The realm.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    fn write(&self, headers: &mut HeaderMap, error: Option<&str>, scope: Option<&Scopes>) {
        for (on, scheme) in [(self.bearer, "Bearer"), (self.api_key, "ApiKey")] {
            if !on {
                continue;
            }
            let mut v = format!("{scheme} realm=\"{}\"", self.realm);
            if let Some(e) = error {
                v.push_str(", error=\"");
                v.push_str(e);
                v.push('"');
            }
            if let Some(s) = scope {
                v.push_str(", scope=\"");
                v.push_str(&s.to_string());
                v.push('"');
            }
            // Realm and scope tokens were checked to be printable ASCII without '"'.
            let v = HeaderValue::from_str(&v).expect("challenge is a valid header value");
            headers.append(WWW_AUTHENTICATE, v);
        }
    }
}

fn check_realm(realm: &str) -> Result<Arc<str>, ConfigError> {
    let ok = !realm.is_empty()
        && realm.len() <= 128
        && realm
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(realm.into())
    } else {
        Err(ConfigError::new(
            "realm must be 1 to 128 printable ASCII characters without '\"' or '\\'",
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    InvalidRequest,
    MissingCredential,
    InvalidCredential,
    Forbidden,
    InsufficientScope,
    TooManyRequests,
    PayloadTooLarge,
    Unavailable,
    Misconfigured,
}

impl Class {
    fn status(self) -> StatusCode {
        match self {
            Class::InvalidRequest => StatusCode::BAD_REQUEST,
            Class::MissingCredential | Class::InvalidCredential => StatusCode::UNAUTHORIZED,
            Class::Forbidden | Class::InsufficientScope => StatusCode::FORBIDDEN,
            Class::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Class::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Class::Misconfigured => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The gRPC status code and its fixed message (printable ASCII without `%`, so
    /// it needs no percent-encoding).
    fn grpc(self) -> (&'static str, &'static str) {
        match self {
            Class::InvalidRequest => ("3", "invalid argument"),
            Class::MissingCredential | Class::InvalidCredential => ("16", "unauthenticated"),
            Class::Forbidden | Class::InsufficientScope => ("7", "permission denied"),
            // gRPC reports a message over the receiver's limit as RESOURCE_EXHAUSTED.
            Class::TooManyRequests | Class::PayloadTooLarge => ("8", "resource exhausted"),
            Class::Unavailable => ("14", "unavailable"),
            Class::Misconfigured => ("13", "internal"),
        }
    }

    /// The fixed problem document: no request input can reach it.
    fn body(self) -> &'static str {
        match self {
            Class::InvalidRequest => {
                r#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"The credential is malformed, or more than one credential was presented."}"#
            }
            Class::MissingCredential => {
                r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"This resource requires a credential."}"#
            }
            Class::InvalidCredential => {
                r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"The credential presented is not valid."}"#
            }
            Class::Forbidden => {
                r#"{"type":"about:blank","title":"Forbidden","status":403,"detail":"The request is not allowed."}"#
            }
            Class::InsufficientScope => {
                r#"{"type":"about:blank","title":"Forbidden","status":403,"detail":"The credential does not grant the scope this resource requires."}"#
            }
            Class::TooManyRequests => {
                r#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"Too many requests. Retry after the number of seconds in Retry-After."}"#
            }
            Class::PayloadTooLarge => {
                r#"{"type":"about:blank","title":"Content Too Large","status":413,"detail":"The request body is larger than this resource accepts."}"#
            }
            Class::Unavailable => {
                r#"{"type":"about:blank","title":"Service Unavailable","status":503,"detail":"A service this request depends on is unavailable. Retry later."}"#
            }
            Class::Misconfigured => {
                r#"{"type":"about:blank","title":"Internal Server Error","status":500,"detail":"The server could not process the request."}"#
            }
        }
    }
}

/// A refusal, turned into a response by [`Rejection::into_response`].
///
/// The constructors are the whole vocabulary of refusals; each picks the status,
/// the fixed body and the headers. Extra headers (e.g. the `RateLimit` fields) can
/// be added with [`Rejection::with_header`].
#[derive(Clone, Debug)]
pub struct Rejection {
    class: Class,
    reason: DenialReason,
    challenge: Option<Challenge>,
    scope: Option<Scopes>,
    retry_after: Option<Duration>,
    headers: HeaderMap,
}

impl Rejection {
    fn new(class: Class, reason: DenialReason) -> Self {
        Self {
            class,
            reason,
            challenge: None,
            scope: None,
            retry_after: None,
            headers: HeaderMap::new(),
        }
    }

    /// 401 without an error code: no credential was presented (RFC 6750 §3.1).
    pub fn missing_credential(challenge: &Challenge) -> Self {
        let mut r = Self::new(Class::MissingCredential, DenialReason::MissingCredential);
        r.challenge = Some(challenge.clone());
        r
    }

    /// 400 `invalid_request`: a malformed credential header or several credentials.
    pub fn invalid_request(challenge: &Challenge, reason: DenialReason) -> Self {
        let mut r = Self::new(Class::InvalidRequest, reason);
        r.challenge = Some(challenge.clone());
        r
    }

    /// 401 `invalid_token`: a credential was presented and is not valid. Unknown,
    /// expired, revoked and not-yet-valid credentials all get this same response.
    pub fn invalid_credential(challenge: &Challenge, reason: DenialReason) -> Self {
        let mut r = Self::new(Class::InvalidCredential, reason);
        r.challenge = Some(challenge.clone());
        r
    }

    /// 403 `insufficient_scope` naming the scopes the resource requires.
    pub fn insufficient_scope(challenge: &Challenge, required: &Scopes) -> Self {
        let mut r = Self::new(Class::InsufficientScope, DenialReason::InsufficientScope);
        r.challenge = Some(challenge.clone());
        r.scope = Some(required.clone());
        r
    }

    /// 403 without a challenge, e.g. an address outside the allowlist.
    pub fn forbidden(reason: DenialReason) -> Self {
        Self::new(Class::Forbidden, reason)
    }

    /// 429 with `Retry-After` (whole seconds, rounded up, at least 1).
    pub fn too_many_requests(reason: DenialReason, retry_after: Duration) -> Self {
        let mut r = Self::new(Class::TooManyRequests, reason);
        r.retry_after = Some(retry_after);
        r
    }

    /// 413: the body is larger than the check reads.
    pub fn payload_too_large(reason: DenialReason) -> Self {
        Self::new(Class::PayloadTooLarge, reason)
    }

    /// 503: a backend the check depends on is down and the policy is fail-closed.
    pub fn unavailable(reason: DenialReason, retry_after: Option<Duration>) -> Self {
        let mut r = Self::new(Class::Unavailable, reason);
        r.retry_after = retry_after;
        r
    }

    /// 500: the server is wired wrongly. The client learns nothing more.
    pub fn misconfigured() -> Self {
        Self::new(Class::Misconfigured, DenialReason::Misconfigured)
    }

    /// Adds a header to the response (e.g. `RateLimit`).
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// The reason class.
    pub fn reason(&self) -> DenialReason {
        self.reason
    }

    /// The status the response will have.
    pub fn status(&self) -> StatusCode {
        self.class.status()
    }

    /// Builds the HTTP response (`application/problem+json`), whatever the request.
    pub fn into_response<B: RefusalBody>(self) -> Response<B> {
        self.render(false)
    }

    /// Builds the response to `request`: the gRPC refusal described in the
    /// [module docs](self#grpc) when `request` is a gRPC call, else the HTTP one.
    ///
    /// A request is a gRPC call when its method is `POST` and it has exactly one
    /// `Content-Type`, which is `application/grpc` or `application/grpc+<subtype>`
    /// (ASCII case-insensitive; the subtype 1 to 32 letters, digits, `-`, `.` or
    /// `_`; no parameters, no other characters). Anything else, gRPC-Web included,
    /// gets the HTTP refusal: a client that did not ask for gRPC never sees a 200.
    pub fn into_response_to<B: RefusalBody, T>(self, request: &Request<T>) -> Response<B> {
        self.render(is_grpc_request(request))
    }

    /// The gRPC form when `grpc`, else the HTTP form.
    pub(crate) fn render<B: RefusalBody>(self, grpc: bool) -> Response<B> {
        if grpc {
            self.render_grpc()
        } else {
            self.render_http()
        }
    }

    fn render_grpc<B: RefusalBody>(self) -> Response<B> {
        let mut res = Response::new(B::default());
        let headers = res.headers_mut();
        *headers = self.headers;
        let (code, message) = self.class.grpc();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(GRPC_STATUS, HeaderValue::from_static(code));
        headers.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
        if let Some(d) = self.retry_after {
            headers.insert(
                GRPC_RETRY_PUSHBACK_MS,
                HeaderValue::from(retry_pushback_ms(d)),
            );
        }
        res.extensions_mut().insert(self.reason);
        res
    }

    fn render_http<B: RefusalBody>(self) -> Response<B> {
        let (body, written) = problem_body::<B>(self.class.body());
        let mut res = Response::new(body);
        *res.status_mut() = self.class.status();
        let headers = res.headers_mut();
        *headers = self.headers;
        if written {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
        }
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(d) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(d)));
        }
        if let Some(c) = &self.challenge {
            let error = match self.class {
                Class::InvalidRequest => Some("invalid_request"),
                Class::InvalidCredential => Some("invalid_token"),
                Class::InsufficientScope => Some("insufficient_scope"),
                _ => None,
            };
            c.write(headers, error, self.scope.as_ref());
        }
        res.extensions_mut().insert(self.reason);
        res
    }
}

/// A response body type a refusal can be built in: every type with a [`Default`].
///
/// Implemented for every `Default + 'static` type and for nothing else, so the
/// bound names one requirement in every layer's signature. Which bodies carry the
/// problem document, and which are empty, is listed in the [module docs](self).
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::Full;
/// use portcullis::rejection::{DenialReason, Rejection};
///
/// // A body type without bytes of its own gets an empty refusal.
/// #[derive(Default)]
/// struct Opaque;
/// let res = Rejection::forbidden(DenialReason::IpDenied).into_response::<Opaque>();
/// assert_eq!(res.status(), 403);
/// assert!(res.headers().get("content-type").is_none());
///
/// let res = Rejection::forbidden(DenialReason::IpDenied).into_response::<Full<Bytes>>();
/// assert_eq!(res.headers()["content-type"], "application/problem+json");
/// ```
pub trait RefusalBody: Default + 'static {}

impl<B: Default + 'static> RefusalBody for B {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `B` holding `doc` when `B` is a body type known to carry bytes, else `B::default()`;
/// the flag says which.
fn problem_body<B: RefusalBody>(doc: &'static str) -> (B, bool) {
    use http_body_util::BodyExt;
    use http_body_util::Full;
    use http_body_util::combinators::{BoxBody, UnsyncBoxBody};

    /// Writes `make()` into `slot` if `slot` is an `Option<T>`.
    fn fill<T: 'static>(slot: &mut dyn Any, make: impl FnOnce() -> T) -> bool {
        match slot.downcast_mut::<Option<T>>() {
            Some(s) => {
                *s = Some(make());
                true
            }
            None => false,
        }
    }

    let bytes = || Bytes::from_static(doc.as_bytes());
    let mut slot: Option<B> = None;
    let any: &mut dyn Any = &mut slot;
    let filled = fill(any, || Full::new(bytes()))
        || fill(any, bytes)
        || fill(any, || doc.as_bytes().to_vec())
        || fill(any, || doc.to_owned())
        || fill::<BoxBody<Bytes, BoxError>>(any, || {
            Full::new(bytes()).map_err(|e| match e {}).boxed()
        })
        || fill::<UnsyncBoxBody<Bytes, BoxError>>(any, || {
            Full::new(bytes()).map_err(|e| match e {}).boxed_unsync()
        });
    #[cfg(feature = "axum")]
    let filled = filled || fill(any, || axum::body::Body::from(bytes()));
    #[cfg(feature = "tonic")]
    let filled = filled || fill(any, || tonic::body::Body::new(Full::new(bytes())));
    debug_assert_eq!(filled, slot.is_some());
    match slot {
        Some(body) => (body, true),
        None => (B::default(), false),
    }
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_RETRY_PUSHBACK_MS: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// Whether `request` is a gRPC call; see [`Rejection::into_response_to`].
pub(crate) fn is_grpc_request<T>(request: &Request<T>) -> bool {
    if request.method() != Method::POST {
        return false;
    }
    let mut values = request.headers().get_all(CONTENT_TYPE).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => is_grpc_content_type(v.as_bytes()),
        _ => false,
    }
}

/// Whether a `Content-Type` value is `application/grpc` or
/// `application/grpc+<subtype>`, ASCII case-insensitive, the subtype 1 to 32 of
/// `[A-Za-z0-9._-]`. Nothing else is: no parameters, no whitespace, no
/// `application/grpc-web`.
pub(crate) fn is_grpc_content_type(value: &[u8]) -> bool {
    const BASE: &[u8] = b"application/grpc";
    if value.len() < BASE.len() || !value[..BASE.len()].eq_ignore_ascii_case(BASE) {
        return false;
    }
    match &value[BASE.len()..] {
        [] => true,
        [b'+', subtype @ ..] => {
            (1..=32).contains(&subtype.len())
                && subtype
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        }
        _ => false,
    }
}

/// Milliseconds, rounded up, never 0 (as `Retry-After`, a 0 invites a tight loop).
fn retry_pushback_ms(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// Whole seconds, rounded up, never 0 (a `Retry-After: 0` invites a tight retry loop).
/// Saturating: a wait of `Duration::MAX` is `u64::MAX` seconds, never a wrapped 0
/// read as 1 (nor a panic in a debug build).
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(60)), 60);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
        let r: Response<Bytes> =
            Rejection::too_many_requests(DenialReason::RateLimited, Duration::MAX).into_response();
        assert_eq!(r.headers()[RETRY_AFTER], u64::MAX.to_string().as_str());
    }

    #[test]
    fn statuses_and_challenges() {
        let c = Challenge::bearer("api").unwrap().and_api_key();
        let r: Response<Bytes> = Rejection::missing_credential(&c).into_response();
        assert_eq!(r.status(), 401);
        let v: Vec<_> = r.headers().get_all(WWW_AUTHENTICATE).iter().collect();
        assert_eq!(v, ["Bearer realm=\"api\"", "ApiKey realm=\"api\""]);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store");

        let r: Response<Bytes> =
            Rejection::invalid_request(&c, DenialReason::MultipleCredentials).into_response();
        assert_eq!(r.status(), 400);
        assert!(
            r.headers()[WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .ends_with("error=\"invalid_request\"")
        );

        let scopes = Scopes::parse("jobs:write admin").unwrap();
        let r: Response<Bytes> = Rejection::insufficient_scope(&c, &scopes).into_response();
        assert_eq!(r.status(), 403);
        assert_eq!(
            r.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"admin jobs:write\""
        );

        let r: Response<Bytes> =
            Rejection::too_many_requests(DenialReason::RateLimited, Duration::from_millis(1500))
                .into_response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        assert!(r.body().starts_with(
            b"{\"type\":\"about:blank\",\"title\":\"Too Many Requests\",\"status\":429"
        ));

        let r: Response<Bytes> = Rejection::forbidden(DenialReason::IpDenied).into_response();
        assert_eq!(r.status(), 403);
        assert!(r.headers().get(WWW_AUTHENTICATE).is_none());
        assert_eq!(
            r.extensions().get::<DenialReason>(),
            Some(&DenialReason::IpDenied)
        );
    }

    #[test]
    fn invalid_credentials_are_indistinguishable() {
        let c = Challenge::api_key("api").unwrap();
        let render = |reason| {
            let r: Response<Bytes> = Rejection::invalid_credential(&c, reason).into_response();
            (r.status(), r.headers().clone(), r.into_body())
        };
        let unknown = render(DenialReason::UnknownKey);
        for reason in [
            DenialReason::ExpiredKey,
            DenialReason::RevokedKey,
            DenialReason::NotYetValidKey,
        ] {
            assert_eq!(render(reason), unknown);
        }
    }

    #[test]
    fn every_body_is_problem_json_with_its_status() {
        for class in [
            Class::InvalidRequest,
            Class::MissingCredential,
            Class::InvalidCredential,
            Class::Forbidden,
            Class::InsufficientScope,
            Class::TooManyRequests,
            Class::Unavailable,
            Class::Misconfigured,
        ] {
            let b = class.body();
            assert!(b.starts_with("{\"type\":\"about:blank\",\"title\":\""));
            assert!(b.contains(&format!("\"status\":{}", class.status().as_u16())));
            assert!(b.ends_with("\"}"));
        }
    }

    /// The body bytes and content type of a 403 built in body type `B`.
    async fn refusal_in<B>() -> (Bytes, Option<HeaderValue>)
    where
        B: RefusalBody + http_body::Body,
        B::Error: fmt::Debug,
    {
        use http_body_util::BodyExt;
        let res: Response<B> = Rejection::forbidden(DenialReason::IpDenied).into_response();
        let ct = res.headers().get(CONTENT_TYPE).cloned();
        (res.into_body().collect().await.unwrap().to_bytes(), ct)
    }

    #[tokio::test]
    async fn every_known_body_type_carries_the_document_and_others_are_empty() {
        use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
        use http_body_util::{Empty, Full};
        let doc = Bytes::from_static(Class::Forbidden.body().as_bytes());
        let problem = Some(HeaderValue::from_static("application/problem+json"));
        let expected = (doc.clone(), problem);
        assert_eq!(refusal_in::<Full<Bytes>>().await, expected);
        assert_eq!(refusal_in::<BoxBody<Bytes, BoxError>>().await, expected);
        assert_eq!(
            refusal_in::<UnsyncBoxBody<Bytes, BoxError>>().await,
            expected
        );
        #[cfg(feature = "axum")]
        assert_eq!(refusal_in::<axum::body::Body>().await, expected);
        #[cfg(feature = "tonic")]
        assert_eq!(refusal_in::<tonic::body::Body>().await, expected);
        assert_eq!(refusal_in::<String>().await, expected);
        let bytes: Response<Bytes> = Rejection::forbidden(DenialReason::IpDenied).into_response();
        assert_eq!(bytes.body(), &doc);
        let vec: Response<Vec<u8>> = Rejection::forbidden(DenialReason::IpDenied).into_response();
        assert_eq!(vec.body(), &doc);
        // A body this module does not know: empty, no Content-Type, same status.
        assert_eq!(refusal_in::<Empty<Bytes>>().await, (Bytes::new(), None));
        // A Full of another buffer type is another type.
        assert_eq!(
            refusal_in::<Full<std::collections::VecDeque<u8>>>().await,
            (Bytes::new(), None)
        );
    }

    fn grpc_request(content_type: &str) -> Request<()> {
        Request::post("/pkg.Service/Method")
            .header(CONTENT_TYPE, content_type)
            .body(())
            .unwrap()
    }

    #[test]
    fn grpc_refusals_are_trailers_only_with_the_class_status() {
        let c = Challenge::bearer("api").unwrap();
        let req = grpc_request("application/grpc");
        let cases: [(Rejection, &str); 8] = [
            (
                Rejection::invalid_request(&c, DenialReason::MalformedCredential),
                "3",
            ),
            (Rejection::missing_credential(&c), "16"),
            (
                Rejection::invalid_credential(&c, DenialReason::UnknownKey),
                "16",
            ),
            (Rejection::forbidden(DenialReason::IpDenied), "7"),
            (
                Rejection::insufficient_scope(&c, &Scopes::parse("a").unwrap()),
                "7",
            ),
            (
                Rejection::too_many_requests(
                    DenialReason::RateLimited,
                    Duration::from_micros(1500),
                ),
                "8",
            ),
            (
                Rejection::unavailable(DenialReason::BackendUnavailable, None),
                "14",
            ),
            (Rejection::misconfigured(), "13"),
        ];
        for (rejection, code) in cases {
            let reason = rejection.reason();
            let r: Response<Bytes> = rejection.into_response_to(&req);
            assert_eq!(r.status(), 200);
            assert!(r.body().is_empty());
            assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
            assert_eq!(r.headers()["grpc-status"], code);
            let message = r.headers()["grpc-message"].as_bytes();
            assert!(
                message
                    .iter()
                    .all(|b| (0x20..0x7f).contains(b) && *b != b'%')
            );
            assert!(r.headers().get(WWW_AUTHENTICATE).is_none());
            assert!(r.headers().get(RETRY_AFTER).is_none());
            assert_eq!(r.extensions().get::<DenialReason>(), Some(&reason));
            assert_eq!(
                r.headers().contains_key("grpc-retry-pushback-ms"),
                code == "8"
            );
        }
        let r: Response<Bytes> =
            Rejection::too_many_requests(DenialReason::RateLimited, Duration::from_micros(1500))
                .into_response_to(&req);
        assert_eq!(r.headers()["grpc-retry-pushback-ms"], "2");
        let r: Response<Bytes> = Rejection::unavailable(
            DenialReason::BackendUnavailable,
            Some(Duration::from_secs(3)),
        )
        .into_response_to(&req);
        assert_eq!(r.headers()["grpc-retry-pushback-ms"], "3000");
    }

    #[test]
    fn only_grpc_calls_get_the_grpc_form() {
        let http = |req: &Request<()>| {
            let r: Response<Bytes> =
                Rejection::forbidden(DenialReason::IpDenied).into_response_to(req);
            assert_eq!(r.headers().contains_key("grpc-status"), r.status() == 200);
            r.status() == 403
        };
        assert!(!http(&grpc_request("application/grpc+proto")));
        for ct in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc; charset=utf-8",
            "application/grpc+",
            "application/json",
        ] {
            assert!(http(&grpc_request(ct)), "{ct}");
        }
        let mut get = grpc_request("application/grpc");
        *get.method_mut() = Method::GET;
        assert!(http(&get));
        let mut two = grpc_request("application/grpc");
        two.headers_mut()
            .append(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        assert!(http(&two));
        let mut none = grpc_request("application/grpc");
        none.headers_mut().remove(CONTENT_TYPE);
        assert!(http(&none));
    }

    #[test]
    fn grpc_content_types() {
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "Application/GRPC+Proto",
            "application/grpc+my.codec_v-2",
        ] {
            assert!(is_grpc_content_type(ok.as_bytes()), "{ok}");
        }
        let long = format!("application/grpc+{}", "a".repeat(33));
        for bad in [
            "",
            "application/grp",
            "application/grpcx",
            "application/grpc+",
            "application/grpc++proto",
            "application/grpc+pro to",
            "application/grpc+proto;q=1",
            "application/grpc;charset=utf-8",
            " application/grpc",
            "application/grpc ",
            "application/grpc-web",
            "application/grpc-web-text",
            "application/grpc\0",
            "xapplication/grpc",
            "application/grpc+proto/x",
            long.as_str(),
        ] {
            assert!(!is_grpc_content_type(bad.as_bytes()), "{bad:?}");
        }
        assert!(!is_grpc_content_type(b"application/grpc+\xff"));
    }

    #[test]
    fn retry_pushback_rounds_up_and_is_never_zero() {
        assert_eq!(retry_pushback_ms(Duration::ZERO), 1);
        assert_eq!(retry_pushback_ms(Duration::from_nanos(1)), 1);
        assert_eq!(retry_pushback_ms(Duration::from_millis(7)), 7);
        assert_eq!(retry_pushback_ms(Duration::from_nanos(7_000_001)), 8);
        assert_eq!(retry_pushback_ms(Duration::MAX), u64::MAX);
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::is_grpc_content_type;

        /// The definition, written independently: `application/grpc`, optionally
        /// followed by `+` and 1 to 32 of `[A-Za-z0-9._-]`, case-insensitive.
        fn oracle(v: &[u8]) -> bool {
            let re =
                regex::bytes::Regex::new(r"\A(?i-u:application/grpc)(\+[A-Za-z0-9._-]{1,32})?\z")
                    .unwrap();
            re.is_match(v)
        }

        fn near_grpc() -> impl Strategy<Value = Vec<u8>> {
            let base = prop_oneof![
                Just(b"application/grpc".to_vec()),
                Just(b"APPLICATION/Grpc".to_vec()),
                Just(b"application/grpc-web".to_vec()),
                Just(b"application/grp".to_vec()),
            ];
            let tail = prop_oneof![
                Just(Vec::new()),
                "\\+[a-zA-Z0-9._-]{0,40}".prop_map(String::into_bytes),
                proptest::collection::vec(any::<u8>(), 0..8),
                "[ ;+=a-z\t]{0,10}".prop_map(String::into_bytes),
            ];
            (base, tail).prop_map(|(mut b, t)| {
                b.extend(t);
                b
            })
        }

        proptest! {
            /// `Retry-After` is the wait in whole seconds rounded up, at least 1, and
            /// saturates rather than wraps: computed in 128-bit nanoseconds here.
            #[test]
            fn retry_after_is_the_wait_rounded_up(
                secs in prop_oneof![0u64..100_000, Just(u64::MAX), u64::MAX - 3..=u64::MAX],
                nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000, Just(999_999_999u32)],
            ) {
                use std::time::Duration;
                let d = Duration::new(secs, nanos);
                let exact = d.as_nanos().div_ceil(1_000_000_000);
                let want = u64::try_from(exact).unwrap_or(u64::MAX).max(1);
                prop_assert_eq!(super::super::retry_after_secs(d), want);
                prop_assert!(super::super::retry_pushback_ms(d) >= 1);
            }

            #[test]
            fn matches_its_definition(v in prop_oneof![near_grpc(), proptest::collection::vec(any::<u8>(), 0..40)]) {
                prop_assert_eq!(is_grpc_content_type(&v), oracle(&v));
            }

            #[test]
            fn every_codec_subtype_is_grpc(sub in "[a-zA-Z0-9._-]{1,32}", upper in any::<bool>()) {
                let base = if upper { "APPLICATION/GRPC" } else { "application/grpc" };
                let ct = format!("{base}+{sub}");
                prop_assert!(is_grpc_content_type(ct.as_bytes()));
            }

            #[test]
            fn padding_or_parameters_are_never_grpc(pre in "[ \t]{0,2}", post in "([ \t]|;[a-z=]{0,6}){0,2}") {
                prop_assume!(!pre.is_empty() || !post.is_empty());
                let ct = format!("{pre}application/grpc+proto{post}");
                prop_assert!(!is_grpc_content_type(ct.as_bytes()));
            }
        }
    }
}
