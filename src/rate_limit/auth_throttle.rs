//! Failed-authentication throttling per client address (brute-force and
//! credential-stuffing defence).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::key::{KeySource, LocalKey, mask};
use super::local::LocalStore;
use super::quota::{Gcra, Quota};
use crate::rejection::{DenialReason, Rejection};
use crate::{ClientIp, ConfigError};

/// 429 for a client address after too many failed authentications, before any
/// credential is checked.
///
/// Place it **outside** the authentication layer (and inside
/// [`ClientIpLayer`](crate::client_ip::ClientIpLayer)). It reads the
/// [`DenialReason`] the authentication layer puts in each refusal's extensions and
/// counts, per client address (IPv6 masked to /64), the refusals that mean a
/// credential was presented and was wrong: `invalid_key_format`, `unknown_key`,
/// `expired_key`, `not_yet_valid_key`, `revoked_key`, `invalid_token`,
/// `malformed_credential` and `multiple_credentials`. A request with **no**
/// credential (`missing_credential`) is not counted: it guesses nothing, and health
/// checks and browsers send those.
///
/// The count is a GCRA bucket like the rate limiter's: `Quota::new(10, 5 min)`
/// (the [`recommended`](AuthThrottleLayer::recommended) setting) allows 10 failures
/// at once, then one more every 30 s. While the bucket is empty the address gets 429
/// `auth_throttled` with `Retry-After`, and the inner service, with its key lookup,
/// never runs. Successful requests are never counted and never refused for
/// failures they did not make, except from an address that is throttled.
///
/// A request without a [`ClientIp`] (e.g. an unusable forwarded header) counts
/// against one shared "unknown address" bucket.
///
/// Memory and cleanup are those of the rate limiter: at most
/// [`max_tracked_addresses`](AuthThrottleLayer::max_tracked_addresses) (default
/// 100 000) addresses, forgotten once their bucket has refilled, no background task.
/// At the cap, the addresses not tracked share one bucket of the same quota, which
/// both the counting and the refusing read: together they get one address's worth
/// of failures.
///
/// ```
/// use portcullis::rate_limit::{AuthThrottleLayer, Quota};
/// use std::time::Duration;
///
/// let default = AuthThrottleLayer::recommended(); // 10 failures per 5 minutes
/// let strict = AuthThrottleLayer::new(Quota::new(5, Duration::from_secs(900))?);
/// # let _ = (default, strict);
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct AuthThrottleLayer {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    quota: Quota,
    gcra: [Gcra; 1],
    store: LocalStore,
    cap: usize,
    ipv6_prefix: u8,
}

impl fmt::Debug for AuthThrottleLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthThrottleLayer")
            .field("failures", &self.shared.quota)
            .field("ipv6_prefix", &self.shared.ipv6_prefix)
            .field("tracked_addresses", &self.shared.store.len())
            .finish()
    }
}

/// Whether a refusal means a presented credential was wrong.
pub(crate) fn is_credential_failure(reason: DenialReason) -> bool {
    matches!(
        reason,
        DenialReason::InvalidKeyFormat
            | DenialReason::UnknownKey
            | DenialReason::ExpiredKey
            | DenialReason::NotYetValidKey
            | DenialReason::RevokedKey
            | DenialReason::InvalidToken
            | DenialReason::MalformedCredential
            | DenialReason::MultipleCredentials
    )
}

impl AuthThrottleLayer {
    /// 10 failed authentications per address per 5 minutes: a person mistyping a
    /// key never meets it; a guesser is held to one guess every 30 s.
    pub fn recommended() -> Self {
        Self::new(Quota::new(10, Duration::from_secs(300)).expect("static quota"))
    }

    /// Allow `failures` (e.g. 10 per 5 minutes) per client address.
    pub fn new(failures: Quota) -> Self {
        Self::build(failures, 64, 100_000)
    }

    fn build(quota: Quota, ipv6_prefix: u8, cap: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                quota,
                gcra: [quota.gcra()],
                store: LocalStore::new(cap, &[quota.gcra()]),
                ipv6_prefix,
                cap,
            }),
        }
    }

    /// Mask IPv6 addresses to this prefix (default 64), 1 to 128.
    pub fn ipv6_prefix(self, bits: u8) -> Result<Self, ConfigError> {
        if bits == 0 || bits > 128 {
            return Err(ConfigError::new("IPv6 prefix must be 1 to 128"));
        }
        Ok(Self::build(self.shared.quota, bits, self.shared.cap))
    }

    /// The most addresses tracked at once (default 100 000; at least 1). At the cap,
    /// failures from untracked addresses share one bucket.
    pub fn max_tracked_addresses(self, n: usize) -> Result<Self, ConfigError> {
        if n == 0 {
            return Err(ConfigError::new("max_tracked_addresses must be at least 1"));
        }
        Ok(Self::build(self.shared.quota, self.shared.ipv6_prefix, n))
    }

    /// Addresses currently tracked.
    pub fn tracked_addresses(&self) -> usize {
        self.shared.store.len()
    }
}

impl Shared {
    fn key(&self, ip: Option<ClientIp>) -> LocalKey {
        let source = match ip {
            Some(ip) => KeySource::Ip(mask(ip.addr(), 32, self.ipv6_prefix)),
            None => KeySource::Global,
        };
        source.local(self.store.hasher())
    }
}

impl<S> Layer<S> for AuthThrottleLayer {
    type Service = AuthThrottle<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthThrottle {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Service refusing addresses with too many failed authentications; see
/// [`AuthThrottleLayer`].
#[derive(Clone)]
pub struct AuthThrottle<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for AuthThrottle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthThrottle")
            .field("inner", &self.inner)
            .field("failures", &self.shared.quota)
            .finish()
    }
}

impl<S> AuthThrottle<S> {
    /// Wraps `inner` with the throttle of `layer`.
    pub fn new(inner: S, layer: &AuthThrottleLayer) -> Self {
        layer.layer(inner)
    }
    /// Gets a reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Gets a mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthThrottle<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ThrottleFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        call_with(&self.shared, req, |req| self.inner.call(req))
    }
}

/// The layer's work around `next`, the inner service's call (shared with the
/// assembled stack, which holds its layers' settings behind one reference count).
pub(crate) fn call_with<ReqBody, ResBody, F>(
    shared: &Arc<Shared>,
    req: Request<ReqBody>,
    next: impl FnOnce(Request<ReqBody>) -> F,
) -> ThrottleFuture<F, ResBody>
where
    ResBody: From<Bytes>,
{
    let ip = req.extensions().get::<ClientIp>().copied();
    let store = &shared.store;
    // No address has failed lately (the common case): nothing to look up.
    if store.tracks_any()
        && let Some(wait) = store.peek(shared.key(ip), &shared.gcra, store.now())
    {
        let retry = Duration::from_nanos(wait);
        tracing::info!(
            target: crate::audit::TARGET,
            event = "auth_throttled",
            reason = DenialReason::AuthThrottled.as_str(),
            client_ip = ip.map(tracing::field::display),
            retry_after = crate::rejection::retry_after_secs(retry),
        );
        let res = Rejection::too_many_requests(DenialReason::AuthThrottled, retry).into_response();
        return ThrottleFuture {
            kind: ThrottleKind::Rejected {
                response: Some(res),
            },
        };
    }
    ThrottleFuture {
        kind: ThrottleKind::Inner {
            future: next(req),
            ip,
            shared: shared.clone(),
        },
    }
}

pin_project! {
    /// Response future of [`AuthThrottle`]: counts a credential failure when the
    /// inner response carries one.
    pub struct ThrottleFuture<F, B> {
        #[pin]
        kind: ThrottleKind<F, B>,
    }
}

pin_project! {
    #[project = ThrottleKindProj]
    enum ThrottleKind<F, B> {
        Inner { #[pin] future: F, ip: Option<ClientIp>, shared: Arc<Shared> },
        Rejected { response: Option<Response<B>> },
    }
}

impl<F, B, E> Future for ThrottleFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            ThrottleKindProj::Inner { future, ip, shared } => {
                // The inner poll's result is returned in place.
                let out = future.poll(cx);
                if let Poll::Ready(Ok(res)) = &out
                    && let Some(&reason) = res.extensions().get::<DenialReason>()
                    && is_credential_failure(reason)
                {
                    // A failure the bucket refuses (concurrent with the last one
                    // allowed) changes nothing.
                    let _ = shared
                        .store
                        .check(shared.key(*ip), &shared.gcra, shared.store.now());
                }
                out
            }
            ThrottleKindProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

impl<F, B> fmt::Debug for ThrottleFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ThrottleKind::Inner { .. } => "Inner",
            ThrottleKind::Rejected { .. } => "Rejected",
        };
        f.debug_struct("ThrottleFuture")
            .field("kind", &kind)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rejection::Challenge;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt};

    #[tokio::test]
    async fn counts_only_credential_failures() {
        let layer = AuthThrottleLayer::new(Quota::per_minute(2).unwrap());
        let call = |reason: Option<DenialReason>| {
            let layer = layer.clone();
            async move {
                let svc = ServiceBuilder::new().layer(layer).service_fn(
                    move |_req: Request<()>| async move {
                        let c = Challenge::api_key("api").unwrap();
                        Ok::<_, Infallible>(match reason {
                            Some(DenialReason::MissingCredential) => {
                                Rejection::missing_credential(&c).into_response()
                            }
                            Some(r) => Rejection::invalid_credential(&c, r).into_response(),
                            None => Response::new(Bytes::new()),
                        })
                    },
                );
                let mut req = Request::new(());
                req.extensions_mut()
                    .insert(ClientIp::new("192.0.2.1".parse().unwrap()));
                svc.oneshot(req).await.unwrap().status().as_u16()
            }
        };
        for _ in 0..5 {
            assert_eq!(call(Some(DenialReason::MissingCredential)).await, 401);
            assert_eq!(call(None).await, 200);
        }
        assert_eq!(call(Some(DenialReason::UnknownKey)).await, 401);
        assert_eq!(call(Some(DenialReason::RevokedKey)).await, 401);
        assert_eq!(
            call(None).await,
            429,
            "throttled before the inner service runs"
        );
    }
}
