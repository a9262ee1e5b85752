//! One redacted `tracing` event per request, refusals included.
//!
//! [`AccessLogLayer`] emits one `INFO` event on the target [`TARGET`]
//! (`portcullis::access`) when the response head is ready, when the inner service
//! fails, or when the request is dropped before either (the client went away). The
//! fields, all flat, for JSON output from `tracing-subscriber`:
//!
//! | field | value |
//! |---|---|
//! | `request_id` | the [`RequestId`] (put there by [`RequestIdLayer`](crate::request_id::RequestIdLayer), outside this layer) |
//! | `method`, `path` | from the request line: redacted, control characters escaped, bounded |
//! | `query` | sensitive parameters replaced by `REDACTED` (names kept), then redacted like the path |
//! | `status` | the response status (absent on error or cancel) |
//! | `latency_us` | microseconds from the request reaching this layer to the response head |
//! | `client_ip` | the [`ClientIp`] (absent when the client-ip layer inside resolved none, whatever a layer outside resolved) |
//! | `principal` | the [`Principal`]'s public id: the key id of an API key or of a request signature, the `sub` of a service token (its verified email, for an issuer mapped by email); absent, with `auth_method`, `sub`, `jti` and `kid`, for a request refused at authentication (an unknown, expired or second credential, a key outside its address list, a throttled address), whatever principal a layer outside the refusing one found |
//! | `auth_method` | how it authenticated: `api_key`, `service_token`, `http_signature`, `unauthenticated` (with `principal`, the [identity](Principal::identity)) |
//! | `sub`, `jti`, `kid` | a service token's `sub` and `jti` claims and the `kid` of the key that verified it (each absent when the token has none; all absent for other methods) |
//! | `denial_reason` | the [`DenialReason`] class of a refusal, e.g. `unknown_key` |
//! | `user_agent` | redacted (raw and percent-decoded, as the path), control characters escaped, at most 256 bytes |
//! | `outcome` | `response`, `error` (the inner service failed: returned an error or panicked) or `cancelled` (the request was dropped first: the client went away) |
//!
//! **The one event of a successful request.** The access event records the
//! authentication outcome, so a request that passes every layer is this one event:
//! the per-request success audit events (`auth_succeeded`, and
//! `service_token_accepted` for a token) are opt-in
//! ([`AuthenticateLayer::audit_successes`](crate::authenticate::AuthenticateLayer::audit_successes)),
//! while refusals are audit events as well (see [`audit`](crate::audit)). Every
//! field is recorded as a string or an integer, never through `Debug` or `Display`
//! formatting, so a JSON formatter writes each value once without an intermediate
//! string.
//!
//! Every field a client can influence (request id, method, path, query, user agent,
//! principal id, which for a service token is its `sub`; a token's `jti` and `kid`)
//! is redacted where it can carry a secret (the request line and the user agent in
//! their raw and percent-decoded forms alike), then passed through the one sanitiser
//! the audit events use too
//! ([`sanitize`](crate::redact::sanitize)): control characters, line separators,
//! bidirectional controls and invisible format characters are escaped (`\u{202e}`),
//! and the value is bounded. The redactor finds this crate's keys with any prefix
//! (by their checksum), so a key built with a prefix of your own is hidden too. A
//! request id the [`RequestIdLayer`](crate::request_id::RequestIdLayer) generated
//! (a UUID v4, hex digits and dashes) is not client text: it is logged as it is.
//!
//! Headers other than the user agent are never recorded, bodies never. The
//! credential headers (`authorization`, `proxy-authorization`, `cookie`,
//! `x-api-key`, plus [`AccessLogLayer::sensitive_header`]) and `set-cookie` on the
//! response are marked sensitive, so a `Debug` print of the request or response
//! further in shows `Sensitive` instead of the value.
//!
//! The layer sits *outside* [`ClientIpLayer`](crate::client_ip::ClientIpLayer) and
//! the authentication layer so that it logs their refusals too; those layers copy
//! what they found into the *response* extensions, where this layer reads
//! `ClientIp`, `Principal`, `DenialReason` and the verified service token (the
//! request extensions are read as well, for a `ClientIp` or `Principal` set outside
//! this layer).
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use portcullis::access_log::AccessLogLayer;
//! use portcullis::request_id::RequestIdLayer;
//! use tower::ServiceBuilder;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(RequestIdLayer::new())
//!     .layer(AccessLogLayer::new())
//!     // .layer(client_ip).layer(authenticate) ...
//!     .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });
//! # let _ = svc;
//! ```
//!
//! With [`AccessLogLayer::request_span`], the inner service runs in a `request`
//! span carrying the request id, so every event logged further in is correlated.
//!
//! Cost: when the target is enabled, a few reference-count increments at the
//! request, and at completion the redaction of the path, query and user agent (one
//! linear pass each) plus the event itself. When the target is disabled, only the
//! sensitive-header marking.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{
    AUTHORIZATION, COOKIE, HeaderName, PROXY_AUTHORIZATION, SET_COOKIE, USER_AGENT,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::ip::AddrText;
use crate::log_text::{sanitize, sanitize_id};
use crate::redact::Redactor;
use crate::rejection::DenialReason;
use crate::request_id::RequestId;
use crate::{ClientIp, Principal};

/// The `tracing` target of access-log events.
pub const TARGET: &str = "portcullis::access";

const MAX_METHOD: usize = 32;
const MAX_PATH: usize = 1024;
const MAX_QUERY: usize = 1024;
const MAX_USER_AGENT: usize = 256;
const MAX_REQUEST_ID: usize = 128;

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

pub(crate) struct Config {
    redactor: Redactor,
    sensitive: SensitiveNames,
    span: bool,
}

/// The request headers marked sensitive, with the set of their lengths (modulo 64)
/// as a bit mask: a header whose name has none of those lengths is passed over
/// without comparing its name with each sensitive one. A length in the mask only
/// means the names are compared; the names decide.
#[derive(Clone)]
struct SensitiveNames {
    names: Vec<HeaderName>,
    lengths: u64,
}

impl SensitiveNames {
    fn new(names: Vec<HeaderName>) -> Self {
        let mut set = Self {
            names: Vec::new(),
            lengths: 0,
        };
        for name in names {
            set.add(name);
        }
        set
    }

    fn add(&mut self, name: HeaderName) {
        if !self.names.contains(&name) {
            self.lengths |= length_bit(&name);
            self.names.push(name);
        }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        self.lengths & length_bit(name) != 0 && self.names.contains(name)
    }
}

/// The bit of `name`'s length (modulo 64) in [`SensitiveNames::lengths`].
fn length_bit(name: &HeaderName) -> u64 {
    1 << (name.as_str().len() % 64)
}

/// Layer applying [`AccessLog`]; see the [module docs](self).
#[derive(Clone)]
pub struct AccessLogLayer {
    config: Arc<Config>,
}

impl fmt::Debug for AccessLogLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLogLayer")
            .field("redactor", &self.config.redactor)
            .field("sensitive_headers", &self.config.sensitive.names)
            .finish()
    }
}

impl Default for AccessLogLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessLogLayer {
    /// With the default [`Redactor`] and sensitive headers.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                redactor: Redactor::new(),
                sensitive: SensitiveNames::new(vec![
                    AUTHORIZATION,
                    PROXY_AUTHORIZATION,
                    COOKIE,
                    X_API_KEY.clone(),
                ]),
                span: false,
            }),
        }
    }

    /// Redacts with `redactor` (e.g. one that knows your key prefix).
    pub fn redactor(self, redactor: Redactor) -> Self {
        let mut config = self.into_config();
        config.redactor = redactor;
        Self {
            config: Arc::new(config),
        }
    }

    /// Also marks this request header sensitive (e.g. `x-internal-token`). It is
    /// never logged either way.
    pub fn sensitive_header(self, name: HeaderName) -> Self {
        let mut config = self.into_config();
        config.sensitive.add(name);
        Self {
            config: Arc::new(config),
        }
    }

    /// Also runs the inner service inside an `INFO` span named `request` (target
    /// `portcullis::access`) with a `request_id` field, so that every event the
    /// layers inside and your handler emit carries the request id (with
    /// `tracing-subscriber`'s JSON output: in `span` / `spans`). Costs one span per
    /// request; off by default.
    ///
    /// ```
    /// use portcullis::access_log::AccessLogLayer;
    /// let layer = AccessLogLayer::new().request_span();
    /// # let _ = layer;
    /// ```
    pub fn request_span(self) -> Self {
        let mut config = self.into_config();
        config.span = true;
        Self {
            config: Arc::new(config),
        }
    }

    fn into_config(self) -> Config {
        Config {
            redactor: self.config.redactor.clone(),
            sensitive: self.config.sensitive.clone(),
            span: self.config.span,
        }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Service that logs each request; see [`AccessLogLayer`].
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for AccessLog<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> AccessLog<S> {
    /// Wraps `inner` with the default configuration.
    pub fn new(inner: S) -> Self {
        AccessLogLayer::new().layer(inner)
    }
    /// Returns a layer with the default configuration.
    pub fn layer() -> AccessLogLayer {
        AccessLogLayer::new()
    }
    define_inner_service_accessors!();
}

/// Marks every value of the headers named in `names` sensitive, in one pass over the
/// headers (`HeaderMap::entry` per name would clone the name and reserve capacity).
fn mark_sensitive(headers: &mut HeaderMap, names: &SensitiveNames) {
    for (name, value) in headers.iter_mut() {
        if names.contains(name) {
            value.set_sensitive(true);
        }
    }
}

/// The response side: one name, usually absent, so a lookup instead of a walk over
/// every header (`entry` only when present: it may grow the map).
fn mark_set_cookie_sensitive(headers: &mut HeaderMap) {
    if headers.contains_key(SET_COOKIE)
        && let http::header::Entry::Occupied(mut e) = headers.entry(SET_COOKIE)
    {
        for v in e.iter_mut() {
            v.set_sensitive(true);
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AccessLog<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        mark_sensitive(req.headers_mut(), &self.config.sensitive);
        let pending = tracing::enabled!(target: TARGET, tracing::Level::INFO).then(|| Pending {
            start: Instant::now(),
            method: req.method().clone(),
            uri: req.uri().clone(),
            user_agent: req.headers().get(USER_AGENT).cloned(),
            request_id: req.extensions().get::<RequestId>().cloned(),
            client_ip: req.extensions().get::<ClientIp>().copied(),
            principal: req.extensions().get::<Principal>().cloned(),
            config: self.config.clone(),
            done: false,
        });
        let span = self.config.span.then(|| {
            let id = req.extensions().get::<RequestId>();
            let id = id.map(|id| request_id_text(&self.config.redactor, id));
            tracing::info_span!(target: TARGET, "request", request_id = id.as_deref())
        });
        ResponseFuture {
            inner: match &span {
                Some(span) => span.in_scope(|| self.inner.call(req)),
                None => self.inner.call(req),
            },
            pending,
            span,
        }
    }
}

pin_project! {
    /// Response future of [`AccessLog`]: logs when it completes or is dropped.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
        span: Option<tracing::Span>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let entered = this.span.as_ref().map(tracing::Span::enter);
        let mut out = this.inner.poll(cx);
        drop(entered);
        let Poll::Ready(result) = &mut out else {
            return out;
        };
        if let Some(mut p) = this.pending.take() {
            match result {
                Ok(res) => {
                    mark_set_cookie_sensitive(res.headers_mut());
                    p.emit(Outcome::Response(res));
                }
                Err(_) => p.emit::<()>(Outcome::Error),
            }
        } else if let Ok(res) = result {
            mark_set_cookie_sensitive(res.headers_mut());
        }
        out
    }
}

/// What the layer captured at the request, logged at completion.
struct Pending {
    start: Instant,
    method: Method,
    uri: Uri,
    user_agent: Option<HeaderValue>,
    request_id: Option<RequestId>,
    client_ip: Option<ClientIp>,
    principal: Option<Principal>,
    config: Arc<Config>,
    done: bool,
}

enum Outcome<'a, B> {
    Response(&'a Response<B>),
    Error,
    Cancelled,
}

impl Pending {
    fn emit<B>(&mut self, outcome: Outcome<'_, B>) {
        self.done = true;
        let latency_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let r = &self.config.redactor;
        // An extension method is any token a client chooses, a key included; the
        // standard methods are constants.
        let method = if is_standard(&self.method) {
            Cow::Borrowed(self.method.as_str())
        } else {
            client_text(r, self.method.as_str(), MAX_METHOD)
        };
        let request_id = self.request_id.as_ref().map(|id| request_id_text(r, id));
        let path = client_text(r, self.uri.path(), MAX_PATH);
        let query = self.uri.query().map(|q| r.redact_query(q));
        let query = query.as_deref().map(|q| client_text(r, q, MAX_QUERY));
        let user_agent = self
            .user_agent
            .as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()));
        let user_agent = user_agent
            .as_deref()
            .map(|ua| client_text(r, ua, MAX_USER_AGENT));
        let (status, ext) = match &outcome {
            Outcome::Response(res) => (Some(res.status().as_u16()), Some(res.extensions())),
            _ => (None, None),
        };
        let client_ip = recorded_client_ip(ext, self.client_ip);
        let denial = ext.and_then(|e| e.get::<DenialReason>()).copied();
        let principal = recorded_principal(ext, self.principal.as_ref(), denial);
        let ip_text = client_ip.map(|ip| AddrText::new(ip.addr()));
        let client_ip = ip_text.as_ref().map(AddrText::as_str);
        let principal_id = principal.map(|p| sanitize_id(p.id()));
        let token = TokenFields::of(
            ext.filter(|_| principal.is_some()),
            principal.map(Principal::id).zip(principal_id.as_deref()),
        );
        let outcome = match outcome {
            Outcome::Response(_) => "response",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        };
        tracing::info!(
            target: TARGET,
            request_id = request_id.as_deref(),
            method = &*method,
            path = &*path,
            query = query.as_deref(),
            status,
            latency_us,
            client_ip,
            principal = principal_id.as_deref(),
            auth_method = principal.map(|p| p.method().as_str()),
            sub = token.sub.as_deref(),
            jti = token.jti.as_deref(),
            kid = token.kid.as_deref(),
            denial_reason = denial.map(DenialReason::as_str),
            user_agent = user_agent.as_deref(),
            outcome,
            "request"
        );
    }
}

/// The client address the event records: the one a client-ip layer inside put in
/// the response extensions, else one set outside this layer, unless a layer inside
/// resolved none (a trusted proxy reported no usable address): then none, as the
/// request had none past that layer.
fn recorded_client_ip(
    ext: Option<&http::Extensions>,
    outside: Option<ClientIp>,
) -> Option<ClientIp> {
    let Some(ext) = ext else {
        return outside;
    };
    if let Some(&ip) = ext.get::<ClientIp>() {
        return Some(ip);
    }
    #[cfg(feature = "client-ip")]
    if ext.get::<crate::client_ip::Unresolved>().is_some() {
        return None;
    }
    outside
}

/// The principal the event names: the one a layer inside put in the response
/// extensions, else one set outside this layer; none for a request refused at
/// authentication ([`DenialReason::refuses_authentication`]), whichever layer put a
/// principal next to that refusal (a signature layer outside an authentication
/// layer that refused a second credential): the event never names a principal
/// whose request was refused at authentication.
fn recorded_principal<'a>(
    ext: Option<&'a http::Extensions>,
    outside: Option<&'a Principal>,
    denial: Option<DenialReason>,
) -> Option<&'a Principal> {
    if denial.is_some_and(DenialReason::refuses_authentication) {
        return None;
    }
    ext.and_then(|e| e.get::<Principal>()).or(outside)
}

/// The service token's fields of the event, sanitised and bounded: from the
/// verified token the authentication layer put in the response extensions (a
/// crate-private type: nothing else can put one there). All `None` otherwise.
#[derive(Default)]
struct TokenFields<'a> {
    sub: Option<Cow<'a, str>>,
    jti: Option<Cow<'a, str>>,
    kid: Option<Cow<'a, str>>,
}

impl<'a> TokenFields<'a> {
    /// `principal` is the principal id and its sanitised text: the `sub` of most
    /// tokens, whose text is reused rather than sanitised twice.
    #[cfg(feature = "jwt")]
    fn of(ext: Option<&'a http::Extensions>, principal: Option<(&str, &'a str)>) -> Self {
        let Some(token) = ext.and_then(|e| e.get::<crate::authenticate::AuthenticatedToken>())
        else {
            return Self::default();
        };
        let t = &*token.0;
        let sub = t.sub_claim();
        let sub = match principal {
            Some((raw, clean)) if raw == sub => Cow::Borrowed(clean),
            _ => sanitize_id(sub),
        };
        Self {
            sub: Some(sub),
            jti: t.jti().map(sanitize_id),
            kid: t.key_id().map(sanitize_id),
        }
    }

    #[cfg(not(feature = "jwt"))]
    fn of(_: Option<&'a http::Extensions>, _: Option<(&str, &'a str)>) -> Self {
        Self::default()
    }
}

/// Whether `m` is one of the methods of RFC 9110 and RFC 5789 (`http`'s constants).
fn is_standard(m: &Method) -> bool {
    [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ]
    .contains(m)
}

/// The request id as logged. Safe characters only, but a client can still send a
/// token as its id, so a kept id is redacted and bounded; an id this crate
/// generated is 36 bytes of hex digits and dashes, which the redactor and the
/// sanitiser would return unchanged, so it is logged as it is.
fn request_id_text<'a>(r: &Redactor, id: &'a RequestId) -> Cow<'a, str> {
    if id.is_generated() {
        Cow::Borrowed(id.as_str())
    } else {
        client_text(r, id.as_str(), MAX_REQUEST_ID)
    }
}

/// A client-written string as logged: redacted in its raw and percent-decoded
/// forms ([`Redactor::redact_uri_part`]: a secret whose `=`, `_` or space is
/// escaped, `token%3D…`, is caught wherever the client put it, the user agent and
/// an extension method included), then sanitised and bounded. Text without `%`
/// costs one redaction pass, as before.
fn client_text<'a>(r: &Redactor, s: &'a str, max: usize) -> Cow<'a, str> {
    clean(r.redact_uri_part(s), max)
}

/// Redacted text sanitised for the log line, without a copy when there is nothing
/// to escape or cut.
fn clean(s: Cow<'_, str>, max: usize) -> Cow<'_, str> {
    let cleaned = match sanitize(&s, max) {
        Cow::Borrowed(_) => None,
        Cow::Owned(o) => Some(o),
    };
    cleaned.map_or(s, Cow::Owned)
}

impl Drop for Pending {
    /// A request dropped before it ended: the client went away (`cancelled`), or
    /// the inner service panicked, in `call` or while its future was polled, and
    /// the unwinding drops the request (`error`: the inner service failed).
    fn drop(&mut self) {
        if !self.done {
            if std::thread::panicking() {
                self.emit::<()>(Outcome::Error);
            } else {
                self.emit::<()>(Outcome::Cancelled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt};

    #[test]
    fn a_kept_request_id_is_redacted_a_generated_one_logged_as_it_is() {
        let r = Redactor::new();
        let secret = "sk-proj-PlantedOpenAiKeyInRequestId0123";
        let kept = RequestId::parse(secret.as_bytes()).unwrap();
        let logged = request_id_text(&r, &kept);
        assert!(!logged.contains("Planted"), "{logged}");
        let made = RequestId::generate();
        assert_eq!(request_id_text(&r, &made), made.as_str());
        assert_eq!(r.redact(made.as_str()), made.as_str());
    }

    /// A header name of 1 to 80 letters from a small alphabet: lengths 64 apart share
    /// a bit of the length mask, and names of one length often differ.
    fn header_name() -> impl proptest::strategy::Strategy<Value = HeaderName> {
        use proptest::strategy::Strategy;
        proptest::string::string_regex("[ab-]{0,2}[ab]{1,78}")
            .unwrap()
            .prop_map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap())
    }

    proptest::proptest! {
        /// Exactly the values of the headers named in the set are marked, whatever
        /// the lengths the set's mask lets through.
        #[test]
        fn marks_exactly_the_named_headers(
            sensitive in proptest::collection::vec(header_name(), 0..6),
            headers in proptest::collection::vec((header_name(), 0u8..3), 0..12),
        ) {
            let set = SensitiveNames::new(sensitive.clone());
            let mut map = HeaderMap::new();
            for (name, value) in &headers {
                map.append(name, http::HeaderValue::from(u16::from(*value)));
            }
            mark_sensitive(&mut map, &set);
            for (name, value) in &map {
                proptest::prop_assert_eq!(value.is_sensitive(), sensitive.contains(name), "{}", name);
            }
        }
    }

    #[tokio::test]
    async fn credential_headers_are_marked_sensitive_on_the_way_in_and_out() {
        let svc = ServiceBuilder::new()
            .layer(AccessLogLayer::new().sensitive_header(HeaderName::from_static("x-internal")))
            .service_fn(|req: Request<()>| async move {
                for h in [
                    "authorization",
                    "cookie",
                    "x-api-key",
                    "proxy-authorization",
                    "x-internal",
                ] {
                    assert!(req.headers()[h].is_sensitive(), "{h}");
                    assert!(!format!("{:?}", req.headers()).contains("s3cret"));
                }
                assert!(!req.headers()["accept"].is_sensitive());
                let mut res = Response::new(());
                res.headers_mut()
                    .insert(SET_COOKIE, HeaderValue::from_static("sid=s3cret"));
                Ok::<_, Infallible>(res)
            });
        let req = Request::builder()
            .header("Authorization", "Bearer s3cret")
            .header("Cookie", "sid=s3cret")
            .header("X-API-Key", "s3cret")
            .header("Proxy-Authorization", "Basic s3cret")
            .header("X-Internal", "s3cret")
            .header("Accept", "*/*")
            .body(())
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert!(res.headers()[SET_COOKIE].is_sensitive());
        assert!(!format!("{:?}", res.headers()).contains("s3cret"));
    }

    /// Runs `run` under a subscriber that writes every event as a JSON line, and
    /// returns the access events' fields.
    fn access_fields(run: impl FnOnce()) -> Vec<serde_json::Map<String, serde_json::Value>> {
        let text = crate::test_support::json_lines(run);
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["target"] == TARGET)
            .map(|e| e["fields"].as_object().unwrap().clone())
            .collect()
    }

    mod properties {
        use std::net::{IpAddr, Ipv4Addr};
        use std::task::{Poll, Waker};

        use proptest::prelude::*;

        use super::*;
        use crate::AuthMethod;
        use crate::log_text::is_unsafe;
        use crate::rejection::Rejection;

        /// Every reason, and the oracle: the refusals at authentication, after which
        /// no principal may be named (written out here, apart from the code).
        const REASONS: &[(DenialReason, bool)] = &[
            (DenialReason::MissingCredential, true),
            (DenialReason::MalformedCredential, true),
            (DenialReason::MultipleCredentials, true),
            (DenialReason::InvalidKeyFormat, true),
            (DenialReason::UnknownKey, true),
            (DenialReason::ExpiredKey, true),
            (DenialReason::NotYetValidKey, true),
            (DenialReason::RevokedKey, true),
            (DenialReason::InvalidToken, true),
            (DenialReason::InsufficientScope, false),
            (DenialReason::AuthMethodNotAllowed, false),
            (DenialReason::IpDenied, false),
            (DenialReason::KeyIpDenied, true),
            (DenialReason::CreditsExhausted, false),
            (DenialReason::InvalidSignature, true),
            (DenialReason::StaleSignature, true),
            (DenialReason::ReplayedSignature, true),
            (DenialReason::DigestMismatch, true),
            (DenialReason::BodyTooLarge, true),
            (DenialReason::ReplayCacheFull, true),
            (DenialReason::NoClientIp, false),
            (DenialReason::RateLimited, false),
            (DenialReason::AuthThrottled, true),
            (DenialReason::BackendUnavailable, false),
            (DenialReason::Misconfigured, false),
        ];

        /// The planted secret: behind a sensitive name, and after `Bearer `.
        const SECRET: &str = "Zq9Wv8Xu7Ts6Rp5On4Ml3";

        /// `text` with each byte of `escape` percent-encoded where `pick` says so.
        fn encode(text: &str, escape: &[u8], pick: &[bool]) -> String {
            let mut out = String::new();
            for (i, c) in text.chars().enumerate() {
                if c.is_ascii() && (escape.contains(&(c as u8)) || pick.get(i) == Some(&true)) {
                    out.push_str(&format!("%{:02X}", c as u32));
                } else {
                    out.push(c);
                }
            }
            out
        }

        /// Up to four rounds of percent-decoding, lossy: what a reader of the line can
        /// recover from a field.
        fn decoded(s: &str) -> String {
            let mut b = s.as_bytes().to_vec();
            for _ in 0..4 {
                b = crate::redact::percent_decode(&b, true).into_owned();
            }
            String::from_utf8_lossy(&b).into_owned()
        }

        fn text() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    4 => proptest::char::range('a', 'z'),
                    1 => Just('/'),
                    1 => Just('%'),
                    1 => Just('\u{202e}'),
                    1 => Just('\u{2028}'),
                    1 => Just('\u{85}'),
                    1 => Just('é'),
                    1 => any::<char>(),
                ],
                0..40,
            )
            .prop_map(|v| v.into_iter().collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the request and the response: every string field of the
            /// one access event is free of unsafe characters and within its bound,
            /// a secret planted in the method, path, query or user agent, raw or
            /// percent-encoded, cannot be read back even after decoding, a
            /// principal is named only for a request not refused at authentication,
            /// and the client address is the one the client-ip layer inside
            /// resolved, none when it resolved none, and one set outside only when
            /// no such layer ran.
            #[test]
            fn the_access_event_is_clean_bounded_and_names_no_refused_principal(
                reason in proptest::option::of(0..REASONS.len()),
                principal_inside in any::<bool>(),
                principal_outside in any::<bool>(),
                ip_inside in 0u8..3,
                ip_outside in any::<bool>(),
                id in text(),
                filler in text(),
                long in 0usize..1500,
                place in 0usize..4,
                bearer in any::<bool>(),
                pick in proptest::collection::vec(any::<bool>(), 40),
            ) {
                let planted = if bearer {
                    format!("Bearer {SECRET}")
                } else {
                    format!("token={SECRET}")
                };
                // Encoded as each place requires, and otherwise as `pick` says.
                let (method, path, query, ua) = {
                    let enc = |escape: &[u8]| encode(&planted, escape, &pick);
                    let pad = "a".repeat(long % 40);
                    match place {
                        0 => (enc(b" ="), "/p".to_owned(), None, filler.clone()),
                        1 => ("GET".to_owned(), format!("/p/{pad}/{}", enc(b" ")), None, filler.clone()),
                        2 => ("GET".to_owned(), "/p".to_owned(), Some(format!("q={pad}&{}", enc(b" &"))), filler.clone()),
                        _ => ("GET".to_owned(), "/p".to_owned(), None, format!("{filler}{pad} {}", enc(b""))),
                    }
                };
                let path = format!("{path}/{}", encode(&filler, b" ?#", &[]).replace(|c: char| c.is_control() || c == '\u{7f}', "x"));
                let path = format!("{path}{}", "b".repeat(long));
                let uri = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path,
                };
                let Ok(uri) = uri.parse::<Uri>() else {
                    // Not a request line hyper would hand over.
                    return Ok(());
                };
                let ua: Vec<u8> = ua.into_bytes().into_iter().map(|b| if b < 0x20 || b == 0x7f { b'x' } else { b }).collect();
                let mut req = Request::builder()
                    .method(Method::from_bytes(method.as_bytes()).unwrap())
                    .uri(uri)
                    .header(USER_AGENT, HeaderValue::from_bytes(&ua).unwrap())
                    .body(())
                    .unwrap();
                let p = Principal::new(&id, AuthMethod::HttpSignature);
                if principal_outside {
                    req.extensions_mut().insert(p.clone());
                }
                let (outer_ip, inner_ip) = (ClientIp::new(IpAddr::V4(Ipv4Addr::LOCALHOST)), ClientIp::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))));
                if ip_outside {
                    req.extensions_mut().insert(outer_ip);
                }
                let reason = reason.map(|i| REASONS[i]);
                let inner = {
                    let p = p.clone();
                    tower::service_fn(move |_req: Request<()>| {
                        let mut res = match reason {
                            Some((r, _)) => Rejection::forbidden(r).into_response::<()>(),
                            None => Response::new(()),
                        };
                        // As a signature layer outside an authentication layer does.
                        if principal_inside {
                            res.extensions_mut().insert(p.clone());
                        }
                        // What a client-ip layer inside copies: an address, none, or
                        // (0) nothing, when no such layer ran.
                        #[cfg(feature = "client-ip")]
                        if ip_inside > 0 {
                            use crate::future::CopyToResponse;
                            let ip = (ip_inside == 1).then_some(inner_ip);
                            crate::client_ip::Resolution(ip).copy_to(res.extensions_mut());
                        }
                        std::future::ready(Ok::<_, Infallible>(res))
                    })
                };
                let events = access_fields(|| {
                    let mut svc = AccessLogLayer::new().layer(inner);
                    let fut = std::pin::pin!(svc.call(req));
                    let polled = fut.poll(&mut Context::from_waker(Waker::noop()));
                    assert!(polled.is_ready());
                });
                prop_assert_eq!(events.len(), 1);
                let e = &events[0];
                let bounds = [
                    ("method", MAX_METHOD),
                    ("path", MAX_PATH),
                    ("query", MAX_QUERY),
                    ("user_agent", MAX_USER_AGENT),
                    ("principal", crate::log_text::MAX_ID),
                ];
                for (name, max) in bounds {
                    if let Some(v) = e.get(name) {
                        let v = v.as_str().unwrap();
                        prop_assert!(v.len() <= max, "{} over {}: {}", name, max, v.len());
                        prop_assert!(!v.chars().any(is_unsafe), "{}: {:?}", name, v);
                        prop_assert!(!decoded(v).contains(SECRET), "{} leaks: {:?}", name, v);
                    }
                }
                let refused = reason.is_some_and(|(_, refused)| refused);
                let named = (principal_inside || principal_outside) && !refused;
                prop_assert_eq!(e.contains_key("principal"), named, "{:?}", e);
                prop_assert_eq!(e.contains_key("auth_method"), named, "{:?}", e);
                let logged_ip = e.get("client_ip").and_then(|v| v.as_str());
                let want = match ip_inside {
                    1 if cfg!(feature = "client-ip") => Some(inner_ip),
                    2 if cfg!(feature = "client-ip") => None,
                    _ => ip_outside.then_some(outer_ip),
                };
                prop_assert_eq!(logged_ip.map(str::to_owned), want.map(|ip| ip.to_string()));
            }
        }

        /// How the inner service ends a request.
        #[derive(Clone, Copy, Debug)]
        enum End {
            Respond,
            Fail,
            PanicInCall,
            PanicInPoll,
            Drop,
        }

        proptest! {
            /// Whatever the inner service does, the request is one event, whose
            /// outcome says what happened: a panic in the inner service (in `call`
            /// or while polling) is its failure, `error`, never `cancelled`, which
            /// is kept for a request dropped before it ended (the client went away).
            #[test]
            fn every_request_is_one_event_with_its_outcome(
                end in prop_oneof![
                    Just(End::Respond), Just(End::Fail), Just(End::PanicInCall),
                    Just(End::PanicInPoll), Just(End::Drop),
                ],
                polls in 0usize..3,
            ) {
                let inner = tower::service_fn(move |_req: Request<()>| {
                    if matches!(end, End::PanicInCall) {
                        panic!("inner call");
                    }
                    let mut n = 0;
                    std::future::poll_fn(move |_| {
                        if n < polls {
                            n += 1;
                            return Poll::Pending;
                        }
                        match end {
                            End::Respond => Poll::Ready(Ok(Response::new(()))),
                            End::Fail => Poll::Ready(Err("inner error")),
                            End::PanicInPoll => panic!("inner poll"),
                            End::PanicInCall | End::Drop => Poll::Pending,
                        }
                    })
                });
                let events = access_fields(|| {
                    let mut svc = AccessLogLayer::new().layer(inner);
                    let run = std::panic::AssertUnwindSafe(|| {
                        let mut fut = Box::pin(svc.call(Request::new(())));
                        let cx = &mut Context::from_waker(Waker::noop());
                        for _ in 0..=polls {
                            if fut.as_mut().poll(cx).is_ready() {
                                break;
                            }
                        }
                    });
                    let _ = std::panic::catch_unwind(run);
                });
                prop_assert_eq!(events.len(), 1, "{:?}", events);
                let want = match end {
                    End::Respond => "response",
                    End::Fail | End::PanicInCall | End::PanicInPoll => "error",
                    End::Drop => "cancelled",
                };
                prop_assert_eq!(events[0]["outcome"].as_str(), Some(want));
            }
        }
    }
}
