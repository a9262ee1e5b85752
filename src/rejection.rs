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

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, Response, StatusCode};

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

    /// Builds the response.
    pub fn into_response<B: From<Bytes>>(self) -> Response<B> {
        let mut res = Response::new(B::from(Bytes::from_static(self.class.body().as_bytes())));
        *res.status_mut() = self.class.status();
        let headers = res.headers_mut();
        *headers = self.headers;
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
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

/// Whole seconds, rounded up, never 0 (a `Retry-After: 0` invites a tight retry loop).
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
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
}
