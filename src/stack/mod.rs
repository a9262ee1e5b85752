//! The whole stack in one layer, in the secure order, from code or from the
//! environment.
//!
//! [`StackLayer`] assembles, outermost first:
//!
//! 1. [`RequestIdLayer`]: accept a safe `x-request-id` or make one, echo it;
//! 2. [`AccessLogLayer`]: one redacted event per request, refusals included;
//! 3. [`ClientIpLayer`]: the real client address (peer, or trusted proxies' header);
//! 4. [`IpAllowlistLayer`] (optional): 403 unless the address is allowed (and not
//!    denied);
//! 5. [`AuthThrottleLayer`] (on by default, [`AuthThrottleLayer::recommended`]): 429
//!    to wrong credentials from an address after too many failed authentications
//!    (valid ones still pass);
//! 6. [`AuthenticateLayer`]: API keys, service tokens or both, else 401;
//! 7. [`RateLimitLayer`]: per-principal quotas, 429 with `Retry-After`.
//!
//! Every piece is still usable alone; the stack only fixes the order and refuses an
//! unsafe configuration when it is built:
//!
//! - **no credentials**: no API keys, no token verifier, and not the explicit
//!   [`allow_unauthenticated_requests_dangerously`](StackBuilder::allow_unauthenticated_requests_dangerously)
//!   mode — the stack never runs open by accident;
//! - an allow list, deny list or trusted-proxy list that does not parse;
//! - a zero (or otherwise invalid) quota, a quota list that does not parse;
//! - two settings that contradict each other (e.g. a whole rate-limit layer and a
//!   quota string), or one setting given twice (e.g. a deny list read by
//!   [`from_env`](StackBuilder::from_env) and another given in code), which would
//!   otherwise silently replace the first.
//!
//! **Rate limit default.** Without a configured limit the stack applies
//! [`DEFAULT_QUOTA`], `100/s` (100 requests per second, burst 100) per principal
//! (else per client address): generous enough for any interactive client, low
//! enough that one leaked key cannot flood the service. Set your own with
//! [`quotas`](StackBuilder::quotas) or [`rate_limit`](StackBuilder::rate_limit).
//!
//! **Failed-authentication throttle.** On by default. Turning it off takes an
//! explicit call, [`disable_auth_throttle_dangerously`](StackBuilder::disable_auth_throttle_dangerously),
//! which logs a warning on the audit target when the stack is built.
//!
//! The stack does not include the per-connection [`PeerAddrLayer`]: plain hyper
//! servers wrap each connection's service in it (axum users enable the `axum` feature
//! and serve with connect info).
//!
//! ```
//! use std::convert::Infallible;
//! use std::net::SocketAddr;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use portcullis::api_key::{generate_key, ApiKeys, KeyStore};
//! use portcullis::client_ip::PeerAddrLayer;
//! use portcullis::stack::StackLayer;
//! use portcullis::{Principal, Scopes};
//! use tower::{Layer, ServiceBuilder};
//!
//! let key = generate_key("pc_live")?;
//! let store = KeyStore::from_key_list(key.expose_secret(), Scopes::parse("jobs:read")?)?;
//! let stack = StackLayer::builder()
//!     .api_keys(ApiKeys::new(store))
//!     .trusted_proxies("10.0.0.0/8")
//!     .allowlist("10.0.0.0/8, 192.168.0.0/16")
//!     .quotas("100/s, 5000/h")
//!     .build()?;
//!
//! // Per accepted connection:
//! let peer: SocketAddr = "10.1.2.3:51000".parse().unwrap();
//! let service = ServiceBuilder::new()
//!     .layer(PeerAddrLayer::new(peer))
//!     .layer(stack.clone())
//!     .service_fn(|req: Request<Full<Bytes>>| async move {
//!         let who = req.extensions().get::<Principal>().map(|p| p.id().to_owned());
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{who:?}")))))
//!     });
//! # let _ = service;
//!
//! // No credentials: a construction error, never an open service.
//! let err = StackLayer::builder().build().unwrap_err();
//! assert!(err.to_string().contains("no credentials"));
//! # Ok::<(), portcullis::ConfigError>(())
//! ```
//!
//! # From the environment
//!
//! [`StackBuilder::from_env`] reads the variables below (and
//! [`StackBuilder::from_env_with`] the same names from any lookup function, for
//! tests). Values are read as raw bytes: a variable that is set must hold a valid
//! value, so one that is not UTF-8, empty or blank, or that does not parse, is an
//! error naming the variable (never repeating the value); unset a variable to leave
//! its setting out. A variable that only means something with another one that is
//! not set is an error too, and so, for [`StackBuilder::from_env`], is a variable
//! spelled like one of these, in its prefix, its name or its case
//! (`PORTCULLIS_ALOWLIST`, `PORTCULIS_ALLOWLIST`, `portcullis_allowlist`): the error
//! names the setting it resembles.
//!
//! | variable | meaning | example |
//! |---|---|---|
//! | `PORTCULLIS_TRUSTED_PROXIES` | CIDRs of the proxies whose forwarding header is read | `10.0.0.0/8, fd00::/8` |
//! | `PORTCULLIS_FORWARDED_HEADER` | which header they write: `x-forwarded-for` (default), `forwarded`, `x-real-ip`, or a CDN's `cf-connecting-ip`, `true-client-ip`, `fly-client-ip`, `fastly-client-ip` | `cf-connecting-ip` |
//! | `PORTCULLIS_ALLOWLIST` | only these CIDRs get in (403 otherwise) | `10.0.0.0/8` |
//! | `PORTCULLIS_DENYLIST` | these CIDRs never get in (wins over the allow list) | `10.9.0.0/16` |
//! | `PORTCULLIS_KEY_FILE` | TOML key file (digests only), reloaded when it changes | `/etc/svc/keys.toml` |
//! | `PORTCULLIS_KEY_FILE_RELOAD_SECS` | how often the key file is checked (default 10, `0` never) | `30` |
//! | `PORTCULLIS_API_KEYS` | comma-separated raw keys (32+ characters each), the simple case | `pc_live_...` |
//! | `PORTCULLIS_API_KEY_SCOPES` | space- or comma-separated scopes of the `PORTCULLIS_API_KEYS` keys | `jobs:read jobs:write` |
//! | `PORTCULLIS_JWKS_FILE` | JWK Set of the service-token signers (feature `jwt`) | `/etc/svc/jwks.json` |
//! | `PORTCULLIS_TOKEN_ISSUERS` | comma-separated accepted `iss` values (required with a JWKS file) | `https://ci.example` |
//! | `PORTCULLIS_TOKEN_AUDIENCE` | our `aud` (required with a JWKS file or discovery issuers) | `jobs-api` |
//! | `PORTCULLIS_JWKS_RELOAD_SECS` | how often the JWKS file is checked (default 10, `0` never) | `60` |
//! | `PORTCULLIS_OIDC_ISSUERS` | comma-separated issuer URLs (HTTPS) whose keys are found by OpenID Connect discovery and refreshed in the background (feature `jwks-remote`, see [`RemoteIssuer`](crate::jwt::RemoteIssuer)); their tokens need `PORTCULLIS_TOKEN_AUDIENCE` | `https://kubernetes.default.svc.cluster.local` |
//! | `PORTCULLIS_OIDC_ROOTS_FILE` | PEM root certificates trusted for those issuers instead of the platform's (a private or cluster CA) | `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt` |
//! | `PORTCULLIS_OIDC_START` | `wait` (default: start-up fails unless the first fetch succeeds) or `empty` (start at once, refuse their tokens until it does) | `empty` |
//! | `PORTCULLIS_RATE_LIMIT` | 1 to 4 comma-separated [`Quota`](crate::rate_limit::Quota)s (default [`DEFAULT_QUOTA`]) | `100/s, 5000/h` |
//! | `PORTCULLIS_AUTH_THROTTLE` | failed authentications allowed per address, one quota (default `10/5m`) | `5/15m` |
//! | `PORTCULLIS_REDIS_URL` | share the rate limits and the failed-authentication counts through Redis (feature `redis`); never logged | `redis://redis:6379` |
//! | `PORTCULLIS_REDIS_ON_FAILURE` | when Redis is down: `local` (default, limit in memory), `closed` (503), `open` | `closed` |
//! | `PORTCULLIS_REDIS_TIMEOUT_MS` | how long one Redis call may take, 1 to 1000 (default 5) | `20` |
//! | `PORTCULLIS_REDIS_CONNECT_TIMEOUT_MS` | how long one connection attempt (TCP, TLS, `AUTH`) may take, 10 to 60000 (default 2000) | `5000` |
//! | `PORTCULLIS_AUDIT_SUCCESSES` | `true`: every accepted credential is an audit event too (`auth_succeeded`, `service_token_accepted`; [`StackBuilder::audit_successes`]); `false` (default): the access event records it | `true` |
//!
//! `PORTCULLIS_KEY_FILE` and `PORTCULLIS_API_KEYS` exclude each other. A variable of
//! a feature that is not compiled in is an error, not silently ignored.
//!
//! ```
//! use portcullis::stack::StackBuilder;
//! let env = |name: &str| match name {
//!     "PORTCULLIS_API_KEYS" => Some("0123456789abcdef0123456789abcdef".to_owned()),
//!     "PORTCULLIS_API_KEY_SCOPES" => Some("jobs:read".to_owned()),
//!     "PORTCULLIS_RATE_LIMIT" => Some("20/s, 1000/h".to_owned()),
//!     _ => None,
//! };
//! let stack = StackBuilder::from_env_with(env)?.build()?;
//! # let _ = stack;
//! let bad = |name: &str| (name == "PORTCULLIS_RATE_LIMIT").then(|| "0/s".to_owned());
//! let err = StackBuilder::from_env_with(bad).unwrap_err();
//! assert!(err.to_string().starts_with("PORTCULLIS_RATE_LIMIT"));
//! # Ok::<(), portcullis::ConfigError>(())
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::ServiceBuilder;
use tower::util::Either;
use tower_layer::Layer;
use tower_service::Service;

use crate::access_log::{AccessLog, AccessLogLayer};
use crate::allowlist::{IpAllowlist, IpAllowlistLayer};
use crate::auth_throttle::{AuthThrottle, AuthThrottleLayer};
use crate::authenticate::{Authenticate, AuthenticateLayer};
#[cfg(doc)]
use crate::client_ip::PeerAddrLayer;
use crate::client_ip::{ClientIpLayer, ClientIpService};
use crate::rate_limit::{RateLimit, RateLimitLayer};
use crate::rejection::RefusalBody;
use crate::request_id::{RequestIdLayer, SetRequestId};

mod builder;
mod env;

pub use builder::StackBuilder;

/// The rate limit applied when none is configured: `100/s`.
pub const DEFAULT_QUOTA: &str = "100/s";

/// The whole stack as one [`Layer`]; build it with [`StackLayer::builder`] or
/// [`StackBuilder::from_env`]. Cloning is cheap (the layers share their state), so
/// clone it per connection.
#[derive(Clone)]
pub struct StackLayer {
    pub(super) request_id: RequestIdLayer,
    pub(super) access_log: AccessLogLayer,
    pub(super) client_ip: ClientIpLayer,
    pub(super) allowlist: Option<IpAllowlistLayer>,
    pub(super) throttle: Option<AuthThrottleLayer>,
    pub(super) auth: AuthenticateLayer,
    pub(super) rate_limit: RateLimitLayer,
    /// Keeps the key files reloading (from the environment, or
    /// [`StackBuilder::keep_reloading`]) while a clone of the layer or of a service
    /// built from it lives; `None` without any.
    pub(super) reloads: Option<Arc<[crate::reload::ReloadHandle]>>,
}

impl StackLayer {
    /// A new [`StackBuilder`].
    pub fn builder() -> StackBuilder {
        StackBuilder::new()
    }

    /// The rate limiter, e.g. for its [`stats`](RateLimitLayer::stats).
    pub fn rate_limit(&self) -> &RateLimitLayer {
        &self.rate_limit
    }

    /// The failed-authentication throttle, `None` when disabled.
    pub fn auth_throttle(&self) -> Option<&AuthThrottleLayer> {
        self.throttle.as_ref()
    }
}

impl fmt::Debug for StackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackLayer")
            .field("request_id", &self.request_id)
            .field("access_log", &self.access_log)
            .field("client_ip", &self.client_ip)
            .field("allowlist", &self.allowlist)
            .field("auth_throttle", &self.throttle)
            .field("authenticate", &self.auth)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

/// The layers inside the client address: authentication and rate limit, behind
/// the optional allowlist and failed-authentication throttle.
type Authenticated<S> = Authenticate<RateLimit<S>>;
type Throttled<S> = Either<AuthThrottle<Authenticated<S>>, Authenticated<S>>;
type Allowed<S> = Either<IpAllowlist<Throttled<S>>, Throttled<S>>;
type Composed<S> = SetRequestId<AccessLog<ClientIpService<Allowed<S>>>>;

impl<S> Layer<S> for StackLayer {
    type Service = Stack<S>;

    /// The public layers, outermost first, in the order of the [module docs](self).
    fn layer(&self, inner: S) -> Stack<S> {
        let inner = ServiceBuilder::new()
            .layer(self.request_id.clone())
            .layer(self.access_log.clone())
            .layer(self.client_ip.clone())
            .option_layer(self.allowlist.clone())
            .option_layer(self.throttle.clone())
            .layer(self.auth.clone())
            .layer(self.rate_limit.clone())
            .service(inner);
        Stack {
            inner,
            _reloads: self.reloads.clone(),
        }
    }
}

/// The service of [`StackLayer`]: request id, access log, client address,
/// allowlist, failed-authentication throttle, authentication and rate limit around
/// `S`, each the public layer of its module. Works with any response body that
/// meets [`RefusalBody`] (`http_body_util::Full<Bytes>`, `axum::body::Body`,
/// `tonic::body::Body`).
///
/// The type can be named, e.g. to store the service in a struct:
///
/// ```
/// use std::convert::Infallible;
/// use bytes::Bytes;
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use portcullis::stack::{Stack, StackLayer};
/// use portcullis::Scopes;
/// use tower::util::BoxCloneService;
/// use tower::Layer;
///
/// type Handler = BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible>;
/// struct App {
///     service: Stack<Handler>,
/// }
///
/// let stack = StackLayer::builder()
///     .allow_unauthenticated_requests_dangerously(Scopes::default())
///     .build()?;
/// let handler: Handler = BoxCloneService::new(tower::service_fn(|_req| async {
///     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
/// }));
/// let app = App { service: stack.layer(handler) };
/// # let _ = app.service;
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Stack<S> {
    inner: Composed<S>,
    /// The services outlive the layer (a router keeps only what `layer` built), so
    /// they keep the key files reloading too.
    _reloads: Option<Arc<[crate::reload::ReloadHandle]>>,
}

impl<S> fmt::Debug for Stack<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack").finish_non_exhaustive()
    }
}

#[cfg(feature = "axum")]
impl<S> Stack<S> {
    /// The make-service `axum::serve` takes, attaching each connection's peer
    /// address (axum's `ConnectInfo<SocketAddr>`, which the stack reads): what
    /// `Router::into_make_service_with_connect_info` is for a router the stack is
    /// layered on, for the stack wrapped around a router (`stack.layer(router)`).
    /// Without it the request type would have to be named (axum's `ServiceExt` is
    /// generic over it), and without connect info every request is answered 500.
    ///
    /// ```no_run
    /// # async fn run(stack: portcullis::stack::StackLayer) -> std::io::Result<()> {
    /// use axum::{Router, routing::get};
    /// use tower::Layer;
    ///
    /// let router = Router::new().route("/", get(|| async { "ok" }));
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
    /// axum::serve(listener, stack.layer(router).into_make_service_with_connect_info()).await
    /// # }
    /// ```
    pub fn into_make_service_with_connect_info(
        self,
    ) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Self, std::net::SocketAddr>
    where
        Self: Service<axum::extract::Request>,
    {
        axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info(self)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Stack<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: RefusalBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<<Composed<S> as Service<Request<ReqBody>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// Response future of [`Stack`]: the composed layers' future, opaque.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
