//! Failed-authentication throttling per client address (brute-force and
//! credential-stuffing defence).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::rate_limit::Quota;
use crate::rate_limit::key::{KeySource, LocalKey, mask};
use crate::rate_limit::local::{Charge, LocalStore};
use crate::rate_limit::quota::Gcra;
use crate::rejection::{DenialReason, RefusalBody, Rejection, is_grpc_request};
use crate::{AuthMethod, ClientIp, ConfigError, IpSet, Principal};

#[cfg(feature = "redis")]
use crate::rate_limit::redis::{Bypassed, FailurePolicy, RedisLimiter};

/// Slows the guessing of credentials per client address, without denying a valid
/// credential by default.
///
/// Place it **outside** the authentication layer (and inside
/// [`ClientIpLayer`](crate::client_ip::ClientIpLayer)). It reads the
/// [`DenialReason`] the authentication layer puts in each refusal's extensions and
/// counts, per client address (IPv6 masked to /64), the refusals that mean a
/// credential was presented and was wrong: `invalid_key_format`, `unknown_key`,
/// `expired_key`, `not_yet_valid_key`, `revoked_key`, `invalid_token`,
/// `malformed_credential` and `multiple_credentials`. A request with **no**
/// credential (`missing_credential`) is never counted: it guesses nothing, and
/// health checks and browsers send those. Successes are never counted, and never
/// uncount anything (a client holding one valid key cannot reset its count by
/// interleaving it).
///
/// The count is a GCRA bucket like the rate limiter's: `Quota::new(10, 5 min)`
/// (the [`recommended`](AuthThrottleLayer::recommended) setting) allows 10 failures
/// at once, then one more per refill interval (here 30 s). An address whose bucket
/// is empty is *throttled* until it refills. A failure is counted when its refusal
/// comes back, all or nothing: of all the wrong credentials an address sends, at most
/// the quota's worth are answered 401; every other one is answered 429
/// `auth_throttled` with `Retry-After` (with the audit event `auth_throttled`) and
/// changes nothing, so a throttled address is never held longer by what it sends
/// while throttled.
///
/// # The default: every credential is verified
///
/// A throttled address is not locked out. Its requests still reach the
/// authentication layer, and:
///
/// - a **valid** credential passes as usual; if its address is throttled, the audit
///   event `auth_succeeded_while_throttled` (`principal`, `method`, `client_ip`)
///   records it;
/// - a **wrong** credential gets 429 `auth_throttled` with `Retry-After` instead of
///   its 401, and is not counted;
/// - a request with **no** credential gets its usual 401, uncounted.
///
/// So one client guessing cannot deny service to the others behind the same address:
/// a NAT, a corporate proxy, a TLS terminator on the same host, or the service
/// calling itself over loopback.
///
/// What a guesser gets: the quota's worth of answered guesses, then one per refill
/// interval; every other wrong guess is refused with 429 and `Retry-After`, which a
/// well-behaved client obeys. This mode does **not** bound the number of guesses: each
/// one is verified and a right one is let in, so the 429 tells a guesser what the 401
/// would have (not this one). It relies on credentials that cannot be guessed
/// online, which is what this crate issues (API keys of at least 128 random bits,
/// signed service tokens). Alert on `auth_succeeded_while_throttled`: a guess that
/// succeeded looks exactly like that. Every refused guess still costs a key lookup
/// (a digest) or a token verification.
///
/// # Lockout before verification
///
/// [`lockout_before_verify`](AuthThrottleLayer::lockout_before_verify) refuses a
/// throttled address with 429 `auth_throttled` **before** any credential is read,
/// whatever the request carries: valid, wrong or none. A guesser then gets the
/// quota's worth of verified guesses and one per refill interval, and learns nothing
/// from a refused one, since it was never checked. Every request is counted as a
/// failure when it arrives and the count is given back when its answer is not one,
/// so requests sent at once (HTTP/2 streams) get no more verified guesses than one
/// at a time; while valid requests are in flight they hold part of the quota, and a
/// burst larger than the quota is refused in part. What is given back is what is
/// left of the count when the answer comes: all of it for an answer within
/// moments, less the time the request took, nothing for one that took a refill
/// interval or more (a long poll), whose count had run out on its own meanwhile;
/// giving it back then would credit the address with a failure on top of a full
/// quota. The price: every client sharing the
/// address is locked out as well, valid credentials included, until the bucket
/// refills. Use it when the secrets can be guessed (e.g. keys people chose, accepted
/// from a plain list), and exempt the addresses that must never be locked out.
///
/// # Exempt networks
///
/// [`exempt`](AuthThrottleLayer::exempt) names networks whose addresses are never
/// counted nor throttled, in either mode: the service's own address, a health
/// checker, a trusted internal network. Their requests authenticate as usual (a
/// wrong credential gets its 401). An exempt address can guess without limit: keep
/// the set small.
///
/// # Memory, and what happens at the cap
///
/// At most [`max_tracked_addresses`](AuthThrottleLayer::max_tracked_addresses)
/// (default 100 000) addresses are tracked, each forgotten once its bucket has
/// refilled, with no background task (as the rate limiter's keys). At the cap (or,
/// near it, when the few slots an address may take are all counting), the
/// addresses not tracked share **one** bucket of the same quota, which both the
/// counting and the refusing read: together they get one address's worth of answered
/// failures. A flood of fresh addresses can therefore neither grow memory, nor evict
/// the tracked addresses (and reset their counts), nor buy guesses with addresses.
/// While it lasts, new addresses are throttled together: in the default mode that
/// costs them the 401 of a wrong credential only; in the lockout mode it locks out
/// every untracked address.
///
/// A request without a [`ClientIp`] (e.g. an unusable forwarded header) counts
/// against one shared "unknown address" bucket.
///
/// ```
/// use portcullis::IpSet;
/// use portcullis::auth_throttle::AuthThrottleLayer;
/// use portcullis::rate_limit::Quota;
/// use std::time::Duration;
///
/// // 10 failures per 5 minutes; valid credentials always pass.
/// let default = AuthThrottleLayer::recommended();
/// // For guessable secrets: 5 failures per 15 minutes, then the address is locked
/// // out before verification, except the service's own address and the health checker.
/// let strict = AuthThrottleLayer::new(Quota::new(5, Duration::from_secs(900))?)
///     .lockout_before_verify()
///     .exempt(IpSet::parse("127.0.0.1, 10.0.9.7")?);
/// # let _ = (default, strict);
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct AuthThrottleLayer {
    shared: Arc<Shared>,
}

/// The settings, kept to rebuild the state when one changes.
#[derive(Clone)]
struct Config {
    quota: Quota,
    ipv6_prefix: u8,
    cap: usize,
    lockout: bool,
    exempt: Option<IpSet>,
    #[cfg(feature = "redis")]
    redis: Option<RedisLimiter>,
}

pub(crate) struct Shared {
    config: Config,
    gcra: [Gcra; 1],
    store: LocalStore,
}

impl fmt::Debug for AuthThrottleLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.shared.config;
        let mut d = f.debug_struct("AuthThrottleLayer");
        d.field("failures", &c.quota)
            .field("lockout_before_verify", &c.lockout)
            .field("exempt", &c.exempt)
            .field("ipv6_prefix", &c.ipv6_prefix)
            .field("tracked_addresses", &self.shared.store.len());
        #[cfg(feature = "redis")]
        d.field("redis", &c.redis);
        d.finish()
    }
}

impl AuthThrottleLayer {
    /// 10 failed authentications per address per 5 minutes, in the default mode: a
    /// person mistyping a key never meets it; past it, a wrong credential is answered
    /// 429 except one every 30 s, and valid credentials always pass.
    pub fn recommended() -> Self {
        Self::new(Quota::new(10, Duration::from_secs(300)).expect("static quota"))
    }

    /// Allow `failures` (e.g. 10 per 5 minutes) per client address, in the default
    /// mode (every credential verified; see the [type docs](Self)).
    pub fn new(failures: Quota) -> Self {
        Self::build(Config {
            quota: failures,
            ipv6_prefix: 64,
            cap: 100_000,
            lockout: false,
            exempt: None,
            #[cfg(feature = "redis")]
            redis: None,
        })
    }

    fn build(config: Config) -> Self {
        let gcra = [config.quota.gcra()];
        Self {
            shared: Arc::new(Shared {
                store: LocalStore::new(config.cap, &gcra),
                gcra,
                config,
            }),
        }
    }

    /// Refuse a throttled address with 429 **before** its credential is verified,
    /// valid credentials included: every client sharing the address is locked out
    /// until its bucket refills. For deployments whose secrets can be guessed; see
    /// the [type docs](Self#lockout-before-verification) for the trade-off.
    pub fn lockout_before_verify(self) -> Self {
        Self::build(Config {
            lockout: true,
            ..self.shared.config.clone()
        })
    }

    /// Never count nor throttle client addresses inside `networks` (e.g. the
    /// service's own address, a health checker); they still authenticate as usual.
    /// Replaces any set given before.
    pub fn exempt(self, networks: IpSet) -> Self {
        Self::build(Config {
            exempt: Some(networks),
            ..self.shared.config.clone()
        })
    }

    /// Mask IPv6 addresses to this prefix (default 64), 1 to 128.
    pub fn ipv6_prefix(self, bits: u8) -> Result<Self, ConfigError> {
        if bits == 0 || bits > 128 {
            return Err(ConfigError::new("IPv6 prefix must be 1 to 128"));
        }
        Ok(Self::build(Config {
            ipv6_prefix: bits,
            ..self.shared.config.clone()
        }))
    }

    /// The most addresses tracked at once (default 100 000; 1 to 16 777 216). At the cap,
    /// the untracked addresses share one bucket (see the
    /// [type docs](Self#memory-and-what-happens-at-the-cap)).
    pub fn max_tracked_addresses(self, n: usize) -> Result<Self, ConfigError> {
        if n == 0 {
            return Err(ConfigError::new("max_tracked_addresses must be at least 1"));
        }
        if n > crate::rate_limit::local::MAX_TRACKED_KEYS {
            return Err(ConfigError::new(
                "max_tracked_addresses must be at most 16777216",
            ));
        }
        Ok(Self::build(Config {
            cap: n,
            ..self.shared.config.clone()
        }))
    }

    /// Keeps the failure counts in Redis, shared by every instance, so that a
    /// guesser spreading its guesses over instances gets one budget, not one per
    /// instance. Give it the rate limiter's [`RedisLimiter`] (or a clone): the
    /// throttle then uses the same connection, per-call timeout, circuit breaker and
    /// [`FailurePolicy`]. Keys are `<namespace>:at:ip:<masked address>` (and
    /// `<namespace>:at:g` for requests without a client address), each expiring once
    /// its bucket has refilled.
    ///
    /// When Redis cannot answer, the failure policy decides for the throttle as it
    /// does for the rate limits: [`FailOpen`](FailurePolicy::FailOpen) counts nothing
    /// (each refusal keeps its 401), [`FailClosed`](FailurePolicy::FailClosed)
    /// answers 503 `backend_unavailable` where a count was needed (a wrong
    /// credential; in the lockout mode, every request), and
    /// [`FallbackLocal`](FailurePolicy::FallbackLocal) counts in this instance's
    /// memory as without Redis.
    ///
    /// A wrong credential's answer waits for its count on Redis (one round trip);
    /// a valid credential's does not: whether its address is throttled, for the
    /// audit event `auth_succeeded_while_throttled`, is looked up in the
    /// background. In the lockout mode, every request waits for its count before
    /// its credential is read.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), portcullis::ConfigError> {
    /// use portcullis::auth_throttle::AuthThrottleLayer;
    /// use portcullis::rate_limit::redis::{FailurePolicy, RedisLimiter};
    ///
    /// let redis = RedisLimiter::builder("redis://127.0.0.1:6379", FailurePolicy::FallbackLocal)?
    ///     .build()?;
    /// let throttle = AuthThrottleLayer::recommended().redis(redis.clone());
    /// # let _ = throttle;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "redis")]
    pub fn redis(self, limiter: RedisLimiter) -> Self {
        Self::build(Config {
            redis: Some(limiter),
            ..self.shared.config.clone()
        })
    }

    /// Whether the counts are kept in Redis (for the stack's builder).
    #[cfg(all(feature = "redis", feature = "stack"))]
    pub(crate) fn has_redis(&self) -> bool {
        self.shared.config.redis.is_some()
    }

    /// Slots ever given an address: the addresses tracked, and the slots of those
    /// whose bucket has refilled, which any new address may take. At most the cap.
    /// Introspection for the tests and benchmarks; hidden, not part of the API.
    #[doc(hidden)]
    pub fn tracked_addresses(&self) -> usize {
        self.shared.store.len()
    }

    /// The same settings on `clock` (tests drive time).
    #[cfg(test)]
    fn with_clock(self, clock: quanta::Clock) -> Self {
        let config = self.shared.config.clone();
        let gcra = [config.quota.gcra()];
        Self {
            shared: Arc::new(Shared {
                store: LocalStore::new(config.cap, &gcra).with_clock(clock),
                gcra,
                config,
            }),
        }
    }
}

impl Shared {
    fn source(&self, ip: Option<ClientIp>) -> KeySource<'static> {
        match ip {
            Some(ip) => KeySource::Ip(mask(ip.addr(), 32, self.config.ipv6_prefix)),
            None => KeySource::Global,
        }
    }

    fn key(&self, ip: Option<ClientIp>) -> LocalKey {
        self.source(ip).local(self.store.hasher())
    }

    fn is_exempt(&self, ip: Option<ClientIp>) -> bool {
        matches!((&self.config.exempt, ip), (Some(set), Some(ip)) if set.contains(ip.addr()))
    }

    /// How long until the address may fail once more, if it is throttled now.
    fn throttled(&self, ip: Option<ClientIp>) -> Option<Duration> {
        // No address has failed lately (the common case): nothing to look up.
        if !self.store.tracks_any() {
            return None;
        }
        self.store
            .peek(self.key(ip), &self.gcra, self.store.now())
            .map(Duration::from_nanos)
    }

    /// The 429 for a throttled address, audited; `checked` says whether its
    /// credential was verified (and found wrong) first.
    fn refusal<B: RefusalBody>(
        &self,
        ip: Option<ClientIp>,
        retry: Duration,
        checked: bool,
        grpc: bool,
    ) -> Response<B> {
        crate::audit::emit!(
            info,
            AuthThrottled,
            reason = DenialReason::AuthThrottled.as_str(),
            client_ip = ip.map(tracing::field::display),
            retry_after = crate::rejection::retry_after_secs(retry),
            credential_checked = checked,
        );
        Rejection::too_many_requests(DenialReason::AuthThrottled, retry).render(grpc)
    }

    /// The inner response in the lockout mode: the failure counted on arrival
    /// (`charge`) stays counted for a wrong credential and is given back otherwise,
    /// to the bucket that counted it, as much of it as has not run out meanwhile.
    fn settle<B>(&self, ip: Option<ClientIp>, charge: Charge, res: Response<B>) -> Response<B> {
        let failed = res
            .extensions()
            .get::<DenialReason>()
            .is_some_and(|r| r.is_credential_failure());
        if !failed {
            self.store
                .refund(self.key(ip), &self.gcra, charge, self.store.now());
        }
        res
    }

    /// The inner response of a counted address: a wrong credential is counted, or
    /// answered 429 if the address is out of failures; a valid one from a throttled
    /// address is audited. `grpc` says whether the request was a gRPC call.
    fn respond<B: RefusalBody>(
        &self,
        ip: Option<ClientIp>,
        grpc: bool,
        res: Response<B>,
    ) -> Response<B> {
        if let Some(&reason) = res.extensions().get::<DenialReason>()
            && reason.is_credential_failure()
        {
            let outcome = self.store.check(self.key(ip), &self.gcra, self.store.now());
            if outcome.allowed {
                return res;
            }
            return self.refusal(ip, Duration::from_nanos(outcome.wait()), true, grpc);
        }
        // The throttle state first: it is usually empty, and then the principal is
        // not looked up.
        if self.throttled(ip).is_some()
            && let Some(p) = res.extensions().get::<Principal>()
            && p.method() != AuthMethod::Unauthenticated
        {
            crate::audit::emit!(
                info,
                AuthSucceededWhileThrottled,
                principal = &*crate::log_text::sanitize_id(p.id()),
                method = p.method().as_str(),
                client_ip = ip.map(tracing::field::display),
            );
        }
        res
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

/// Service throttling addresses with too many failed authentications; see
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
            .field("failures", &self.shared.config.quota)
            .field("lockout_before_verify", &self.shared.config.lockout)
            .finish()
    }
}

impl<S> AuthThrottle<S> {
    /// Wraps `inner` with the throttle of `layer`.
    pub fn new(inner: S, layer: &AuthThrottleLayer) -> Self {
        layer.layer(inner)
    }
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthThrottle<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: RefusalBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let ip = req.extensions().get::<ClientIp>().copied();
        if self.shared.is_exempt(ip) {
            return ResponseFuture {
                kind: ThrottleKind::Exempt {
                    future: self.inner.call(req),
                },
            };
        }
        #[cfg(feature = "redis")]
        if let Some(redis) = &self.shared.config.redis {
            return ResponseFuture {
                kind: redis::call(&self.shared, redis, &mut self.inner, req, ip),
            };
        }
        if self.shared.config.lockout {
            return ResponseFuture {
                kind: self.shared.charge(&mut self.inner, req, ip),
            };
        }
        let grpc = is_grpc_request(&req);
        ResponseFuture {
            kind: ThrottleKind::Counted {
                future: self.inner.call(req),
                ip,
                grpc,
                shared: self.shared.clone(),
            },
        }
    }
}

impl Shared {
    /// The lockout mode, in memory: the request is counted as a failure before its
    /// credential is read, and the count given back if it was not one, so that
    /// however many requests arrive at once, at most the quota's worth of
    /// credentials is ever verified.
    fn charge<S, ReqBody, B>(
        self: &Arc<Self>,
        inner: &mut S,
        req: Request<ReqBody>,
        ip: Option<ClientIp>,
    ) -> ThrottleKind<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>, Response = Response<B>>,
        B: RefusalBody,
    {
        let now = self.store.now();
        let outcome = self.store.check(self.key(ip), &self.gcra, now);
        if !outcome.allowed {
            let retry = Duration::from_nanos(outcome.wait());
            return ThrottleKind::Rejected {
                response: Some(self.refusal(ip, retry, false, is_grpc_request(&req))),
            };
        }
        ThrottleKind::Charged {
            future: inner.call(req),
            ip,
            charge: outcome.charge(now),
            shared: self.clone(),
        }
    }
}

pin_project! {
    /// Response future of [`AuthThrottle`]: counts a wrong credential when the inner
    /// response refuses one, or answers it 429 if the address is out of failures.
    pub struct ResponseFuture<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        kind: ThrottleKind<S, ReqBody, B>,
    }
}

pin_project! {
    #[project = ThrottleKindProj]
    enum ThrottleKind<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>>,
    {
        Counted { #[pin] future: S::Future, ip: Option<ClientIp>, grpc: bool, shared: Arc<Shared> },
        // The lockout mode: a failure was counted when the request arrived.
        Charged { #[pin] future: S::Future, ip: Option<ClientIp>, charge: Charge, shared: Arc<Shared> },
        Exempt { #[pin] future: S::Future },
        Rejected { response: Option<Response<B>> },
        // The counts on Redis (boxed: the rarer, slower path).
        Remote { state: Box<Remote<S, ReqBody, B>> },
    }
}

/// The states of a request whose address is counted on Redis.
#[cfg(feature = "redis")]
type Remote<S, ReqBody, B> = redis::State<S, ReqBody, B>;
#[cfg(not(feature = "redis"))]
type Remote<S, ReqBody, B> = (
    std::marker::PhantomData<(S, ReqBody)>,
    std::convert::Infallible,
    B,
);

impl<S, ReqBody, B> Future for ResponseFuture<S, ReqBody, B>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    B: RefusalBody,
{
    type Output = Result<Response<B>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            ThrottleKindProj::Counted {
                future,
                ip,
                grpc,
                shared,
            } => Poll::Ready(ready!(future.poll(cx)).map(|res| shared.respond(*ip, *grpc, res))),
            ThrottleKindProj::Charged {
                future,
                ip,
                charge,
                shared,
            } => Poll::Ready(ready!(future.poll(cx)).map(|res| shared.settle(*ip, *charge, res))),
            ThrottleKindProj::Exempt { future } => future.poll(cx),
            ThrottleKindProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            #[cfg(feature = "redis")]
            ThrottleKindProj::Remote { state } => state.poll(cx),
            #[cfg(not(feature = "redis"))]
            ThrottleKindProj::Remote { state } => match state.1 {},
        }
    }
}

impl<S, ReqBody, B> fmt::Debug for ResponseFuture<S, ReqBody, B>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ThrottleKind::Counted { .. } => "Counted",
            ThrottleKind::Charged { .. } => "Charged",
            ThrottleKind::Exempt { .. } => "Exempt",
            ThrottleKind::Rejected { .. } => "Rejected",
            ThrottleKind::Remote { .. } => "Remote",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

/// The counts on Redis: the same decisions as in memory, each count one atomic
/// script on the server's clock, under the limiter's timeout, breaker and failure
/// policy.
#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::rate_limit::local::Outcome;

    /// A count on Redis: its outcome, and the server's time of it (µs).
    type Decision = Pin<Box<dyn Future<Output = Result<(Outcome, u64), Bypassed>> + Send>>;

    pub(super) fn call<S, ReqBody, B>(
        shared: &Arc<Shared>,
        redis: &RedisLimiter,
        inner: &mut S,
        req: Request<ReqBody>,
        ip: Option<ClientIp>,
    ) -> ThrottleKind<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>, Response = Response<B>> + Clone,
        B: RefusalBody,
    {
        let grpc = is_grpc_request(&req);
        if shared.config.lockout {
            // Counted before the credential is read: the inner service is called
            // once Redis has answered.
            let clone = inner.clone();
            let inner = std::mem::replace(inner, clone);
            return ThrottleKind::Remote {
                state: Box::new(State::Admitting {
                    decision: count(redis, shared, ip),
                    pending: Some((inner, req)),
                    ip,
                    grpc,
                    shared: shared.clone(),
                }),
            };
        }
        ThrottleKind::Remote {
            state: Box::new(State::Inner {
                future: Box::pin(inner.call(req)),
                charged: None,
                ip,
                grpc,
                shared: shared.clone(),
            }),
        }
    }

    fn count(redis: &RedisLimiter, shared: &Shared, ip: Option<ClientIp>) -> Decision {
        let (redis, key, g) = (
            redis.clone(),
            shared.source(ip).stable_name(),
            shared.gcra[0],
        );
        Box::pin(async move { redis.throttle_count(&key, g).await })
    }

    fn redis(shared: &Shared) -> &RedisLimiter {
        shared.config.redis.as_ref().expect("set on the Redis path")
    }

    /// Runs `task` on the current Tokio runtime, if any, without waiting for it.
    fn detach(task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(task);
        }
    }

    pub(crate) enum State<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>>,
    {
        /// The lockout mode: the failure counted on arrival, before calling `pending`.
        Admitting {
            decision: Decision,
            pending: Option<(S, Request<ReqBody>)>,
            ip: Option<ClientIp>,
            grpc: bool,
            shared: Arc<Shared>,
        },
        /// The credential being verified; `charged`: the server's time (µs) of the
        /// failure counted on arrival, if one was.
        Inner {
            future: Pin<Box<S::Future>>,
            charged: Option<u64>,
            ip: Option<ClientIp>,
            grpc: bool,
            shared: Arc<Shared>,
        },
        /// A wrong credential's refusal, waiting for its count.
        Counting {
            decision: Decision,
            response: Option<Response<B>>,
            ip: Option<ClientIp>,
            grpc: bool,
            shared: Arc<Shared>,
        },
        /// Redis is down and the policy falls back to memory: the in-memory path.
        Local(Pin<Box<ResponseFuture<S, ReqBody, B>>>),
        Done,
    }

    impl<S, ReqBody, B> State<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>, Response = Response<B>>,
        B: RefusalBody,
    {
        pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<B>, S::Error>> {
            loop {
                match self {
                    State::Admitting {
                        decision,
                        pending,
                        ip,
                        grpc,
                        shared,
                    } => {
                        let decided = ready!(decision.as_mut().poll(cx));
                        let (ip, grpc, shared) = (*ip, *grpc, shared.clone());
                        let (mut inner, req) = pending.take().expect("polled after completion");
                        let charged = match decided {
                            Ok((o, at)) if o.allowed => Some(at),
                            Ok((o, _)) => {
                                let retry = Duration::from_nanos(o.wait());
                                *self = State::Done;
                                return Poll::Ready(Ok(shared.refusal(ip, retry, false, grpc)));
                            }
                            Err(Bypassed) => match redis(&shared).failure_policy() {
                                FailurePolicy::FailOpen => None,
                                FailurePolicy::FailClosed => {
                                    *self = State::Done;
                                    return Poll::Ready(Ok(unavailable(&shared, grpc)));
                                }
                                FailurePolicy::FallbackLocal => {
                                    // In memory, as without Redis: that path counts
                                    // and settles on its own.
                                    let kind = shared.charge(&mut inner, req, ip);
                                    *self = State::Local(Box::pin(ResponseFuture { kind }));
                                    continue;
                                }
                            },
                        };
                        *self = State::Inner {
                            future: Box::pin(inner.call(req)),
                            charged,
                            ip,
                            grpc,
                            shared,
                        };
                    }
                    State::Inner {
                        future,
                        charged,
                        ip,
                        grpc,
                        shared,
                    } => {
                        let res = match ready!(future.as_mut().poll(cx)) {
                            Ok(res) => res,
                            Err(e) => {
                                *self = State::Done;
                                return Poll::Ready(Err(e));
                            }
                        };
                        let (ip, grpc, shared, charged) = (*ip, *grpc, shared.clone(), *charged);
                        let failed = res
                            .extensions()
                            .get::<DenialReason>()
                            .is_some_and(|r| r.is_credential_failure());
                        if let Some(at) = charged {
                            if !failed {
                                let (redis, key, g) = (
                                    redis(&shared).clone(),
                                    shared.source(ip).stable_name(),
                                    shared.gcra[0],
                                );
                                detach(async move {
                                    let _ = redis.throttle_refund(&key, g, at).await;
                                });
                            }
                            *self = State::Done;
                            return Poll::Ready(Ok(res));
                        }
                        if failed && !shared.config.lockout {
                            *self = State::Counting {
                                decision: count(redis(&shared), &shared, ip),
                                response: Some(res),
                                ip,
                                grpc,
                                shared,
                            };
                            continue;
                        }
                        if !shared.config.lockout
                            && let Some(p) = res.extensions().get::<Principal>()
                            && p.method() != AuthMethod::Unauthenticated
                        {
                            audit_if_throttled(&shared, ip, p);
                        }
                        *self = State::Done;
                        return Poll::Ready(Ok(res));
                    }
                    State::Counting {
                        decision,
                        response,
                        ip,
                        grpc,
                        shared,
                    } => {
                        let decided = ready!(decision.as_mut().poll(cx));
                        let res = response.take().expect("polled after completion");
                        let (ip, grpc, shared) = (*ip, *grpc, shared.clone());
                        *self = State::Done;
                        return Poll::Ready(Ok(match decided {
                            Ok((o, _)) if o.allowed => res,
                            Ok((o, _)) => {
                                shared.refusal(ip, Duration::from_nanos(o.wait()), true, grpc)
                            }
                            Err(Bypassed) => match redis(&shared).failure_policy() {
                                FailurePolicy::FailOpen => res,
                                FailurePolicy::FailClosed => unavailable(&shared, grpc),
                                FailurePolicy::FallbackLocal => shared.respond(ip, grpc, res),
                            },
                        }));
                    }
                    State::Local(future) => return future.as_mut().poll(cx),
                    State::Done => panic!("polled after completion"),
                }
            }
        }
    }

    /// A valid credential's address is looked up in the background, so that its
    /// answer never waits for Redis: the audit event follows the response.
    fn audit_if_throttled(shared: &Arc<Shared>, ip: Option<ClientIp>, p: &Principal) {
        let (redis, key, g) = (
            redis(shared).clone(),
            shared.source(ip).stable_name(),
            shared.gcra[0],
        );
        let principal = crate::log_text::sanitize_id(p.id()).into_owned();
        let method = p.method().as_str();
        detach(async move {
            if let Ok(Some(_)) = redis.throttle_peek(&key, g).await {
                crate::audit::emit!(
                    info,
                    AuthSucceededWhileThrottled,
                    principal = &*principal,
                    method,
                    client_ip = ip.map(tracing::field::display),
                );
            }
        });
    }

    fn unavailable<B: RefusalBody>(shared: &Shared, grpc: bool) -> Response<B> {
        Rejection::unavailable(
            DenialReason::BackendUnavailable,
            Some(redis(shared).retry_after()),
        )
        .render(grpc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rejection::Challenge;
    use bytes::Bytes;
    use std::convert::Infallible;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{ServiceBuilder, ServiceExt};

    /// What the stand-in authentication layer makes of a request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Credential {
        Valid,
        Wrong,
        Missing,
    }

    /// The response the authentication layer gives for `credential`.
    fn authenticate(credential: Credential) -> Response<Bytes> {
        let c = Challenge::api_key("api").unwrap();
        match credential {
            Credential::Valid => {
                let mut res = Response::new(Bytes::new());
                res.extensions_mut()
                    .insert(Principal::new("k", AuthMethod::ApiKey));
                res
            }
            Credential::Wrong => {
                Rejection::invalid_credential(&c, DenialReason::UnknownKey).into_response()
            }
            Credential::Missing => Rejection::missing_credential(&c).into_response(),
        }
    }

    /// Polls a future that must be ready at once (every service here answers
    /// without waiting).
    fn ready_now<F: Future>(f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        match f
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(out) => out,
            Poll::Pending => panic!("not ready"),
        }
    }

    /// Sends one request from `ip` carrying `credential` through `layer`; the
    /// status, and whether the authentication layer ran.
    fn send(layer: &AuthThrottleLayer, ip: IpAddr, credential: Credential) -> (u16, bool) {
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(move |_req: Request<()>| {
                seen.fetch_add(1, Ordering::Relaxed);
                std::future::ready(Ok::<_, Infallible>(authenticate(credential)))
            });
        let mut req = Request::new(());
        req.extensions_mut().insert(ClientIp::new(ip));
        let res = ready_now(svc.oneshot(req)).unwrap();
        if res.status() == 429 {
            assert!(res.headers().contains_key(http::header::RETRY_AFTER));
        }
        (res.status().as_u16(), ran.load(Ordering::Relaxed) == 1)
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn by_default_a_throttled_address_keeps_its_valid_credentials() {
        let layer = AuthThrottleLayer::new(Quota::per_minute(2).unwrap());
        let ip = addr("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(send(&layer, ip, Credential::Missing), (401, true));
            assert_eq!(send(&layer, ip, Credential::Valid), (200, true));
        }
        assert_eq!(send(&layer, ip, Credential::Wrong), (401, true));
        assert_eq!(send(&layer, ip, Credential::Wrong), (401, true));
        // Throttled: a wrong credential is verified and answered 429, uncounted ...
        for _ in 0..5 {
            assert_eq!(send(&layer, ip, Credential::Wrong), (429, true));
        }
        // ... a valid one passes, and one without a credential gets its 401.
        assert_eq!(send(&layer, ip, Credential::Valid), (200, true));
        assert_eq!(send(&layer, ip, Credential::Missing), (401, true));
        // Another address is untouched.
        assert_eq!(
            send(&layer, addr("192.0.2.2"), Credential::Wrong),
            (401, true)
        );
    }

    #[test]
    fn lockout_refuses_a_throttled_address_before_verification() {
        let layer = AuthThrottleLayer::new(Quota::per_minute(2).unwrap()).lockout_before_verify();
        let ip = addr("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(send(&layer, ip, Credential::Missing), (401, true));
        }
        assert_eq!(send(&layer, ip, Credential::Wrong), (401, true));
        assert_eq!(send(&layer, ip, Credential::Wrong), (401, true));
        for c in [Credential::Valid, Credential::Wrong, Credential::Missing] {
            assert_eq!(send(&layer, ip, c), (429, false), "{c:?}");
        }
        assert_eq!(
            send(&layer, addr("192.0.2.2"), Credential::Valid),
            (200, true)
        );
    }

    /// Wrong guesses sent at once (e.g. as HTTP/2 streams) before any of them is
    /// answered: in the lockout mode at most the quota's worth is ever verified; the
    /// valid requests in flight meanwhile give their count back.
    #[test]
    fn lockout_verifies_at_most_the_quota_of_guesses_in_flight() {
        use std::sync::atomic::AtomicBool;
        let layer = AuthThrottleLayer::new(Quota::per_minute(3).unwrap()).lockout_before_verify();
        let open = Arc::new(AtomicBool::new(false));
        let ran = Arc::new(AtomicUsize::new(0));
        let svc = {
            let (open, ran) = (open.clone(), ran.clone());
            ServiceBuilder::new().layer(layer.clone()).service_fn(
                move |req: Request<Credential>| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    let (open, credential) = (open.clone(), *req.body());
                    std::future::poll_fn(move |_| match open.load(Ordering::Acquire) {
                        true => Poll::Ready(Ok::<_, Infallible>(authenticate(credential))),
                        false => Poll::Pending,
                    })
                },
            )
        };
        let request = |credential| {
            let mut req = Request::new(credential);
            req.extensions_mut()
                .insert(ClientIp::new(addr("192.0.2.1")));
            req
        };
        let cx = &mut Context::from_waker(std::task::Waker::noop());
        // A valid request in flight and answered: its count is given back.
        let mut valid = std::pin::pin!(svc.clone().oneshot(request(Credential::Valid)));
        assert!(valid.as_mut().poll(cx).is_pending());
        open.store(true, Ordering::Release);
        assert!(matches!(valid.as_mut().poll(cx), Poll::Ready(Ok(r)) if r.status() == 200));
        open.store(false, Ordering::Release);
        ran.store(0, Ordering::Relaxed);
        // Ten wrong guesses at once.
        let mut guesses: Vec<_> = (0..10)
            .map(|_| Box::pin(svc.clone().oneshot(request(Credential::Wrong))))
            .collect();
        let mut statuses = Vec::new();
        let mut pending = Vec::new();
        for mut g in guesses.drain(..) {
            match g.as_mut().poll(cx) {
                Poll::Ready(res) => statuses.push(res.unwrap().status().as_u16()),
                Poll::Pending => pending.push(g),
            }
        }
        open.store(true, Ordering::Release);
        for mut g in pending {
            match g.as_mut().poll(cx) {
                Poll::Ready(res) => statuses.push(res.unwrap().status().as_u16()),
                Poll::Pending => panic!("released"),
            }
        }
        statuses.sort();
        assert_eq!(statuses, [401, 401, 401, 429, 429, 429, 429, 429, 429, 429]);
        assert_eq!(ran.load(Ordering::Relaxed), 3, "credentials verified");
    }

    /// The strict mode verifies exactly the burst from one address, for the longest
    /// bursts a quota may have (back in 300 days here).
    #[test]
    fn lockout_holds_a_long_window_burst_exactly() {
        let quota = Quota::per_day(1).unwrap().with_burst(300).unwrap();
        let layer = AuthThrottleLayer::new(quota).lockout_before_verify();
        let ip = addr("192.0.2.1");
        let verified = (0..310)
            .filter(|_| send(&layer, ip, Credential::Wrong).1)
            .count();
        assert_eq!(
            verified, 300,
            "{verified} of 310 wrong guesses were verified"
        );
    }

    #[test]
    fn exempt_addresses_are_never_counted_nor_throttled() {
        for layer in [
            AuthThrottleLayer::new(Quota::per_minute(1).unwrap()),
            AuthThrottleLayer::new(Quota::per_minute(1).unwrap()).lockout_before_verify(),
        ] {
            let layer = layer.exempt(IpSet::parse("127.0.0.0/8, 2001:db8::/64").unwrap());
            for ip in ["127.0.0.1", "::ffff:127.0.0.9", "2001:db8::7"] {
                for _ in 0..5 {
                    assert_eq!(send(&layer, addr(ip), Credential::Wrong), (401, true));
                }
                assert_eq!(send(&layer, addr(ip), Credential::Valid), (200, true));
            }
            assert_eq!(layer.tracked_addresses(), 0);
            let outside = addr("2001:db8:0:1::7");
            assert_eq!(send(&layer, outside, Credential::Wrong), (401, true));
            assert_eq!(send(&layer, outside, Credential::Wrong).0, 429);
        }
    }

    /// A request whose answer is held until its gate opens (a long poll, a slow
    /// upload): the inner service is called at once, its response waits.
    type Held = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Infallible>>>>;

    /// Sends a request from `ip` with `credential` whose answer waits for `gate`:
    /// the answer, unless it came at once (a refusal), and whether the
    /// authentication layer ran (the credential was verified).
    fn send_held(
        layer: &AuthThrottleLayer,
        ip: IpAddr,
        credential: Credential,
        gate: Arc<std::sync::atomic::AtomicBool>,
    ) -> (Option<Held>, bool) {
        let ran = Arc::new(AtomicUsize::new(0));
        let seen = ran.clone();
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .service_fn(move |_req: Request<()>| {
                seen.fetch_add(1, Ordering::Relaxed);
                let gate = gate.clone();
                std::future::poll_fn(move |_| match gate.load(Ordering::Acquire) {
                    true => Poll::Ready(Ok::<_, Infallible>(authenticate(credential))),
                    false => Poll::Pending,
                })
            });
        let mut req = Request::new(());
        req.extensions_mut().insert(ClientIp::new(ip));
        let mut fut: Held = Box::pin(svc.oneshot(req));
        let cx = &mut Context::from_waker(std::task::Waker::noop());
        let pending = fut.as_mut().poll(cx).is_pending();
        (pending.then_some(fut), ran.load(Ordering::Relaxed) == 1)
    }

    /// Opens `gate` and takes the held answer's status.
    fn release(mut held: Held, gate: &std::sync::atomic::AtomicBool) -> u16 {
        gate.store(true, Ordering::Release);
        let cx = &mut Context::from_waker(std::task::Waker::noop());
        match held.as_mut().poll(cx) {
            Poll::Ready(res) => res.unwrap().status().as_u16(),
            Poll::Pending => panic!("released"),
        }
    }

    /// A valid request held in flight until its address's bucket has refilled
    /// gives back nothing when it is answered: its count had expired on its own,
    /// and giving it back again would let the address's next burst of guesses
    /// verify one more than the quota.
    #[test]
    fn lockout_a_count_that_expired_in_flight_is_not_given_back() {
        use std::sync::atomic::AtomicBool;
        let (clock, mock) = quanta::Clock::mock();
        let layer = AuthThrottleLayer::new(Quota::per_minute(3).unwrap())
            .lockout_before_verify()
            .with_clock(clock);
        let ip = addr("192.0.2.1");
        let gates: Vec<_> = (0..3).map(|_| Arc::new(AtomicBool::new(false))).collect();
        let held: Vec<_> = gates
            .iter()
            .map(|g| send_held(&layer, ip, Credential::Valid, g.clone()))
            .collect();
        assert!(held.iter().all(|(_, ran)| *ran));
        // The bucket refills while the requests wait (three intervals of 20 s).
        mock.increment(61_000_000_000);
        let mut verified = (0..5)
            .filter(|_| send(&layer, ip, Credential::Wrong).1)
            .count();
        for ((h, _), g) in held.into_iter().zip(&gates) {
            assert_eq!(release(h.expect("held"), g), 200);
        }
        verified += (0..5)
            .filter(|_| send(&layer, ip, Credential::Wrong).1)
            .count();
        assert_eq!(verified, 3, "{verified} guesses verified at once, quota 3");
    }

    /// In the lockout mode, a request counted against the shared bucket of the
    /// untracked addresses is given back to that bucket, never to a slot its
    /// address took meanwhile (which holds the count of a later guess).
    #[test]
    fn lockout_gives_a_count_back_to_the_bucket_that_took_it() {
        use std::sync::atomic::AtomicBool;
        let (clock, mock) = quanta::Clock::mock();
        // 2 per minute: one every 30 s, 2 at once.
        let layer = AuthThrottleLayer::new(Quota::per_minute(2).unwrap())
            .lockout_before_verify()
            .max_tracked_addresses(1)
            .unwrap()
            .with_clock(clock);
        let shared = layer.shared.clone();
        let (a, b) = (addr("192.0.2.1"), addr("192.0.2.2"));
        // A takes the one slot, for 30 s.
        assert_eq!(send(&layer, a, Credential::Wrong), (401, true));
        mock.increment(15_000_000_000);
        // B is counted against the shared bucket, and held.
        let gate = Arc::new(AtomicBool::new(false));
        let (held, ran) = send_held(&layer, b, Credential::Valid, gate.clone());
        assert!(ran);
        assert!(!shared.store.is_tracked(shared.key(Some(ClientIp::new(b)))));
        // A's slot refills; B's next request (a guess) takes it.
        mock.increment(15_000_000_000);
        assert_eq!(send(&layer, b, Credential::Wrong), (401, true));
        assert!(shared.store.is_tracked(shared.key(Some(ClientIp::new(b)))));
        assert_eq!(release(held.expect("held"), &gate), 200);
        // B's slot still counts its guess: one more, then 429.
        assert_eq!(send(&layer, b, Credential::Wrong), (401, true));
        assert_eq!(send(&layer, b, Credential::Wrong), (429, false));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// At the cap, the addresses not tracked share one bucket: across all of
        /// them, the wrong credentials answered 401 never exceed one quota (its
        /// burst plus one per emission interval elapsed), whatever the cap, the
        /// mode, the order of addresses, outcomes and time steps. Valid credentials
        /// pass in the default mode, and a 401 for a wrong credential is counted.
        #[test]
        fn untracked_addresses_share_one_quota_at_the_cap(
            cap in 1usize..8,
            count in 1u32..5,
            window in 1u64..20,
            lockout in proptest::bool::ANY,
            steps in proptest::collection::vec((0u8..20, 0u8..3, 0u64..3_000_000_000), 1..200),
        ) {
            let quota = Quota::new(count, Duration::from_secs(window)).unwrap();
            let g = quota.gcra();
            let (clock, mock) = quanta::Clock::mock();
            let mut layer = AuthThrottleLayer::new(quota)
                .max_tracked_addresses(cap)
                .unwrap();
            if lockout {
                layer = layer.lockout_before_verify();
            }
            let layer = layer.with_clock(clock);
            let shared = layer.shared.clone();
            let start = shared.store.now();
            let mut overflow_failures = 0u64;
            for (host, outcome, step) in steps {
                mock.increment(step);
                let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, host));
                let credential = [Credential::Valid, Credential::Wrong, Credential::Missing]
                    [usize::from(outcome)];
                let (status, ran) = send(&layer, ip, credential);
                match credential {
                    Credential::Valid if !lockout => proptest::prop_assert_eq!(status, 200),
                    Credential::Valid => proptest::prop_assert!(status == 200 || status == 429),
                    Credential::Missing if !lockout => proptest::prop_assert_eq!(status, 401),
                    _ => {}
                }
                proptest::prop_assert_eq!(ran, status != 429 || !lockout);
                if credential == Credential::Wrong
                    && status == 401
                    && !shared.store.is_tracked(shared.key(Some(ClientIp::new(ip))))
                {
                    // Answered, and counted without an entry of its own: against
                    // the shared bucket.
                    overflow_failures += 1;
                    let elapsed = shared.store.now() - start;
                    let bound = u64::from(quota.burst()) + elapsed / g.t;
                    proptest::prop_assert!(
                        overflow_failures <= bound,
                        "{} answered failures of untracked addresses, quota allows {}",
                        overflow_failures,
                        bound
                    );
                }
                proptest::prop_assert!(shared.store.len() <= cap);
            }
        }

        /// In the lockout mode, with requests held in flight and answered in any
        /// order, valid ones among them (whose counts are given back): over every
        /// span of time, the wrong credentials verified for one address never
        /// exceed its quota (its burst plus one per emission interval elapsed).
        #[test]
        fn lockout_never_verifies_more_guesses_than_the_quota(
            count in 1u32..5,
            window in 1u64..20,
            burst in 1u32..5,
            steps in proptest::collection::vec(
                (0u8..4, 0u8..2, 0u8..3, proptest::bool::ANY, 0u8..8, 0u64..4_000_000_000),
                1..150,
            ),
        ) {
            use std::sync::atomic::AtomicBool;
            let quota = Quota::new(count, Duration::from_secs(window))
                .unwrap()
                .with_burst(burst)
                .unwrap();
            let g = quota.gcra();
            let (clock, mock) = quanta::Clock::mock();
            let layer = AuthThrottleLayer::new(quota).lockout_before_verify().with_clock(clock);
            let shared = layer.shared.clone();
            let mut held: Vec<(Held, Arc<AtomicBool>)> = Vec::new();
            // Per address, the times at which a wrong credential was verified.
            let mut guesses: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
            for (op, host, outcome, hold, pick, step) in steps {
                mock.increment(step);
                let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, host));
                if op == 0 && !held.is_empty() {
                    let (h, gate) = held.swap_remove(usize::from(pick) % held.len());
                    release(h, &gate);
                    continue;
                }
                let credential = [Credential::Valid, Credential::Wrong, Credential::Missing]
                    [usize::from(outcome)];
                let ran = if hold {
                    let gate = Arc::new(AtomicBool::new(false));
                    let (h, ran) = send_held(&layer, ip, credential, gate.clone());
                    held.extend(h.map(|h| (h, gate)));
                    ran
                } else {
                    send(&layer, ip, credential).1
                };
                if ran && credential == Credential::Wrong {
                    guesses[usize::from(host)].push(shared.store.now());
                }
            }
            for times in &guesses {
                for (i, first) in times.iter().enumerate() {
                    for (j, last) in times.iter().enumerate().skip(i) {
                        let n = (j - i + 1) as u64;
                        let bound = 1 + (g.tau + (last - first)) / g.t;
                        proptest::prop_assert!(
                            n <= bound,
                            "{} guesses verified in {} ns, quota {:?} allows {}",
                            n, last - first, g, bound
                        );
                    }
                }
            }
        }
    }
}
