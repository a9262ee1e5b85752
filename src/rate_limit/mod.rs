//! Per-key rate limiting: 429 with `Retry-After` and the IETF `RateLimit` fields.
//!
//! [`RateLimitLayer`] sits inside authentication, so it can key on who is calling:
//!
//! 1. a custom key function, if one is set and returns a key;
//! 2. else the [`Principal`]'s [identity](Principal::identity), its method and id
//!    (one compromised key cannot spend everyone's quota, and the API key `svc` and
//!    the token subject `svc` count separately);
//! 3. else the [`ClientIp`], IPv6 masked to its /64 (configurable): a client that
//!    rotates through the addresses of its own /64 still has one bucket. Requests
//!    let in by the unauthenticated mode are keyed here too: its principal is
//!    shared by every request and names no one;
//! 4. else one global key.
//!
//! Each [`Policy`] names a [`Quota`] (per tier and per principal if configured); all
//! policies are checked together, all or nothing: a request refused by one policy
//! spends nothing from the others.
//!
//! **Algorithm.** GCRA (the generic cell rate algorithm, the one `governor`
//! implements): one timestamp per key and policy, the "theoretical arrival time". A
//! request is allowed when that time is at most `burst − 1` emission intervals ahead
//! of now; allowing it moves the time one interval on. Refill is smooth, there are no
//! window boundaries to game, and time comes from the monotonic clock, so a wall-clock
//! jump changes nothing.
//!
//! The crate has its own small GCRA instead of using `governor`'s, because the layer
//! needs what `governor` does not offer: several policies checked all or nothing,
//! a check that does not count (the failed-authentication throttle's), and the exact
//! time until each policy's quota is back (the `RateLimit` fields). A property test
//! checks that it decides exactly as `governor` does for one policy.
//!
//! **Memory.** Keys live in a table of 64-byte cache lines allocated once, when
//! the layer is built, at one and a half slots per key of
//! [`max_tracked_keys`](RateLimitBuilder::max_tracked_keys) (default 100 000, at
//! most 16 777 216). A slot is a 64-bit keyed SipHash of the key (under a random
//! key drawn when the layer is built) and one 8-byte timestamp per policy: with
//! one policy 16 bytes, so the table takes 24 bytes per key of the cap (2.4 MB by
//! default; 48 with two policies, 96 with three or four). The allocator zeroes it,
//! usually by mapping fresh pages, which take memory only once a key reaches them;
//! `benches/rate_limit.rs` measures the bytes per tracked key. A key whose quota has fully refilled is
//! indistinguishable from a new key, so its slot is free for any other key: nothing
//! is cleaned up, nothing runs in the background and you spawn nothing. A check of
//! a tracked key reads one cache line and takes no lock.
//! At the cap, new keys share one overflow bucket until tracked keys refill (so
//! does a new key whose sixteen possible slots are all held by keys whose quota still
//! counts, which near the cap can happen before it is reached), so a
//! flood of fresh addresses can neither evict the keys already tracked (and reset
//! their limits) nor grow memory: it can only exhaust the overflow bucket, i.e.
//! newcomers get limited together while the flood lasts. The overflow bucket has
//! each policy's default quota; a newcomer whose tier or override is stricter stays
//! held to its own quota too, one whose quota is larger gets no more than the
//! default, so together the untracked keys never get more than one default quota.
//!
//! **Responses.** Every response (allowed or not) carries `RateLimit-Policy` and
//! `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11); optionally
//! the legacy `X-RateLimit-Limit`, `-Remaining` and `-Reset` for the most constrained
//! policy. A refusal is 429 with `Retry-After` (whole seconds, rounded up, never 0)
//! and a problem+json body, and an audit event `rate_limited`.
//!
//! **Shadow mode** counts, logs (`rate_limited` with `shadow = true`) and sends the
//! fields, but never refuses: for rolling a limit out.
//!
//! With the `redis` feature, [`redis::RedisLimiter`] shares the limits between
//! instances.
//!
//! # Usage credits
//!
//! An API key may have `credits` in the key file (see
//! [`KeyRecord::with_credits`](crate::api_key::KeyRecord::with_credits)): the number
//! of requests it may make in all. The authentication layer hands a verified key's
//! credits on with the request; this layer spends one per request it admits (in
//! shadow mode, every request), after the quotas: a request refused with 429 for its
//! rate does not spend a credit. A key with none left gets 429 with `Retry-After` of
//! an hour (credits do not refill by themselves) and the generic body; the audit event
//! `credits_exhausted` and the denial reason `credits_exhausted` say why.
//!
//! Credits are spent here because this is the layer that owns quotas and their
//! shared state: the same Redis connection, timeout, breaker and failure policy, and
//! an admission decision already made (so a credit is never spent on a request the
//! rate limits refuse). The spent count is kept per key (under a name derived from
//! its digest), atomically: in memory, a compare-and-swap per key (this instance's
//! count, lost on restart); with Redis, one script per request (`<namespace>:cr:k:…`,
//! shared by every instance and kept across restarts, never expiring). No request is
//! admitted beyond the total, however many arrive at once. The number in the key file
//! is the total: raising it grants more. When Redis cannot answer, the failure
//! policy decides: fail-open admits without spending, fail-closed answers 503, and
//! fall-back-local spends from this instance's count.
//! [`RateLimitLayer::credits_remaining`] reads what a key has left.
//!
//! Credits are spent only where a `RateLimitLayer` runs inside the authentication
//! layer, as in the stack (`StackLayer`), which always has one. A stack built by hand
//! declares it with
//! [`AuthenticateLayer::credits_spent_inside`](crate::authenticate::AuthenticateLayer::credits_spent_inside):
//! without that, the authentication layer refuses a key with credits (500, logged)
//! rather than let it in unmetered.
//!
//! ```
//! use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
//!
//! let limits = RateLimitLayer::builder()
//!     // 10 requests per second each, 100 for principals of tier "gold" ...
//!     .policy(Policy::new("burst", Quota::per_second(10)?)?.tier("gold", Quota::per_second(100)?)?)
//!     // ... and at most 5000 per hour.
//!     .policy(Policy::new("hourly", Quota::per_hour(5_000)?)?)
//!     .build()?;
//! # let _ = limits;
//! # Ok::<(), portcullis::ConfigError>(())
//! ```

pub(crate) mod key;
pub(crate) mod local;
mod policy;
pub(crate) mod quota;
#[cfg(feature = "redis")]
pub mod redis;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

pub use key::KeyContext;
pub use policy::Policy;
pub use quota::Quota;

#[cfg(feature = "api-key")]
use crate::api_key::Credits;
use crate::rejection::{DenialReason, RefusalBody, Rejection};
use crate::{ClientIp, ConfigError, Principal};
use key::KeyRule;
use local::{LocalStore, MAX_POLICIES, Outcome};
use policy::{CompiledPolicy, Entry};
use quota::Gcra;

/// `Retry-After` of a key out of credits.
#[cfg(feature = "api-key")]
const CREDITS_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// `RateLimit-Policy`.
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`.
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const X_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Builds a [`RateLimitLayer`]; see the [module docs](self).
pub struct RateLimitBuilder {
    policies: Vec<Policy>,
    key: KeyRule,
    max_tracked_keys: usize,
    fields: bool,
    legacy: bool,
    shadow: bool,
    #[cfg(feature = "redis")]
    redis: Option<redis::RedisLimiter>,
}

impl fmt::Debug for RateLimitBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("policies", &self.policies)
            .field("key", &self.key)
            .field("max_tracked_keys", &self.max_tracked_keys)
            .field("fields", &self.fields)
            .field("legacy", &self.legacy)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

impl RateLimitBuilder {
    /// Adds a policy. At least one is required, at most four, names unique.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policies.push(policy);
        self
    }

    /// Mask IPv6 client addresses to this prefix before keying (default 64: one
    /// subscriber's allocation). 1 to 128.
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.key.ipv6_prefix = bits;
        self
    }

    /// Mask IPv4 client addresses to this prefix before keying (default 32). 1 to 32.
    pub fn ipv4_prefix(mut self, bits: u8) -> Self {
        self.key.ipv4_prefix = bits;
        self
    }

    /// A custom key, tried first; `None` falls back to principal, address, global.
    /// The string is hashed, never stored or logged. Build it from the principal's
    /// [`identity`](Principal::identity), not its id alone, so that a key and a
    /// token subject with the same id stay apart.
    ///
    /// ```
    /// use portcullis::rate_limit::{KeyContext, Policy, Quota, RateLimitLayer};
    /// let layer = RateLimitLayer::builder()
    ///     .policy(Policy::new("per-route", Quota::per_minute(30)?)?)
    ///     .key_fn(|cx: &KeyContext<'_>| {
    ///         cx.principal().map(|p| format!("{} {}", p.identity(), cx.uri().path()))
    ///     })
    ///     .build()?;
    /// # let _ = layer;
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn key_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&KeyContext<'_>) -> Option<String> + Send + Sync + 'static,
    {
        self.key.custom = Some(Arc::new(f));
        self
    }

    /// The most keys tracked in memory at once (default 100 000, at most
    /// 16 777 216; see the module docs for the memory it takes and what happens at
    /// the cap).
    pub fn max_tracked_keys(mut self, n: usize) -> Self {
        self.max_tracked_keys = n;
        self
    }

    /// Whether to send `RateLimit-Policy` and `RateLimit` (default true).
    pub fn fields(mut self, on: bool) -> Self {
        self.fields = on;
        self
    }

    /// Also send `X-RateLimit-Limit`, `X-RateLimit-Remaining` and
    /// `X-RateLimit-Reset` (seconds) for the most constrained policy (default false).
    pub fn legacy_headers(mut self, on: bool) -> Self {
        self.legacy = on;
        self
    }

    /// Shadow mode: count, log and send the fields, but never refuse. Logged as a
    /// warning when the layer is built.
    pub fn shadow_mode(mut self, on: bool) -> Self {
        self.shadow = on;
        self
    }

    /// Keep the limits in Redis, shared by every instance.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, limiter: redis::RedisLimiter) -> Self {
        self.redis = Some(limiter);
        self
    }

    /// Checks the configuration and builds the layer.
    pub fn build(self) -> Result<RateLimitLayer, ConfigError> {
        if self.policies.is_empty() {
            return Err(ConfigError::new(
                "rate limit: at least one policy is required",
            ));
        }
        if self.policies.len() > MAX_POLICIES {
            return Err(ConfigError::new("rate limit: at most 4 policies"));
        }
        for (i, p) in self.policies.iter().enumerate() {
            if self.policies[..i].iter().any(|q| q.name() == p.name()) {
                return Err(ConfigError::new(format!(
                    "rate limit: policy name {} is used twice",
                    p.name()
                )));
            }
        }
        if self.max_tracked_keys == 0 {
            return Err(ConfigError::new(
                "rate limit: max_tracked_keys must be at least 1",
            ));
        }
        if self.max_tracked_keys > local::MAX_TRACKED_KEYS {
            return Err(ConfigError::new(
                "rate limit: max_tracked_keys must be at most 16777216",
            ));
        }
        self.key.check()?;
        if self.shadow {
            crate::audit::emit!(
                warn,
                RateLimitShadowMode,
                "rate limiting is in shadow mode: limits are logged, not enforced"
            );
        }
        let policies: Vec<CompiledPolicy> = self.policies.iter().map(Policy::compile).collect();
        let mut anonymous = [Gcra { t: 1, tau: 0 }; MAX_POLICIES];
        for (g, p) in anonymous.iter_mut().zip(&policies) {
            *g = p.entry(None).gcra;
        }
        Ok(RateLimitLayer {
            shared: Arc::new(Shared {
                policies,
                anonymous,
                key: self.key,
                // At the cap, untracked keys share one state under each policy's
                // default quota (see `LocalStore`).
                local: LocalStore::new(self.max_tracked_keys, &anonymous[..self.policies.len()]),
                fields: self.fields,
                legacy: self.legacy,
                shadow: self.shadow,
                limited: AtomicU64::new(0),
                shadow_limited: AtomicU64::new(0),
                #[cfg(feature = "api-key")]
                spent: dashmap::DashMap::new(),
                #[cfg(feature = "redis")]
                redis: self.redis,
            }),
        })
    }
}

pub(crate) struct Shared {
    policies: Vec<CompiledPolicy>,
    /// Every policy's default GCRA, for requests without a principal.
    anonymous: [Gcra; MAX_POLICIES],
    key: KeyRule,
    local: LocalStore,
    fields: bool,
    legacy: bool,
    shadow: bool,
    limited: AtomicU64,
    shadow_limited: AtomicU64,
    /// Credits spent per key (by the key's credit name), in memory: one entry per
    /// key with credits that has been used, as many as the key file lists.
    #[cfg(feature = "api-key")]
    spent: dashmap::DashMap<Arc<str>, AtomicU64>,
    #[cfg(feature = "redis")]
    redis: Option<redis::RedisLimiter>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("RateLimit");
        d.field("policies", &self.policies)
            .field("key", &self.key)
            .field("tracked_keys", &self.local.len())
            .field("fields", &self.fields)
            .field("legacy", &self.legacy)
            .field("shadow", &self.shadow);
        #[cfg(feature = "redis")]
        d.field("redis", &self.redis);
        d.finish()
    }
}

/// Counters of refusals since the layer was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimitStats {
    /// Requests refused with 429.
    pub limited: u64,
    /// Requests over the limit let through because of shadow mode.
    pub shadow_limited: u64,
}

/// The result of a check, as the layer acts on it.
#[derive(Debug)]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) enum Verdict {
    Decided(Outcome),
    /// A required backend is down and the policy is fail-closed.
    Unavailable(Duration),
    /// A backend is down and the policy is fail-open: let through, without fields.
    Open,
    /// The key has no credits left (its total).
    #[cfg(feature = "api-key")]
    Exhausted(u64),
}

/// The fields computed for one response, kept in the response future: the IETF
/// pair inline (no allocation on the common path), the rarer legacy fields boxed.
#[derive(Clone, Debug, Default)]
struct FieldSet {
    ietf: Option<(HeaderValue, HeaderValue)>,
    legacy: Option<Box<[HeaderValue; 3]>>,
}

impl FieldSet {
    fn apply(self, headers: &mut HeaderMap) {
        if let Some((policy, limit)) = self.ietf {
            headers.append(RATELIMIT_POLICY, policy);
            headers.append(RATELIMIT, limit);
        }
        if let Some(legacy) = self.legacy {
            let [limit, remaining, reset] = *legacy;
            headers.append(X_LIMIT, limit);
            headers.append(X_REMAINING, remaining);
            headers.append(X_RESET, reset);
        }
    }
}

/// Each policy's entry for one principal, looked up once per request (the first
/// `policies.len()` are meaningful).
type Entries<'a> = [&'a Entry; MAX_POLICIES];

impl Shared {
    #[inline]
    fn entries(&self, principal: Option<&Principal>) -> Entries<'_> {
        let mut e = [self.policies[0].entry(None); MAX_POLICIES];
        for (slot, p) in e.iter_mut().zip(&self.policies) {
            *slot = p.entry(principal);
        }
        e
    }

    #[inline]
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    fn gcras(entries: &Entries<'_>) -> [Gcra; MAX_POLICIES] {
        std::array::from_fn(|i| entries[i].gcra)
    }

    #[inline]
    fn render(&self, entries: &Entries<'_>, outcome: &Outcome) -> Option<FieldSet> {
        if !self.fields && !self.legacy {
            return None;
        }
        Some(self.render_fields(entries, outcome))
    }

    /// [`render`](Self::render) with the entries of the request's principal, or of
    /// an anonymous request if `None`.
    #[inline]
    fn render_for(&self, entries: Option<&Entries<'_>>, outcome: &Outcome) -> Option<FieldSet> {
        if !self.fields && !self.legacy {
            return None;
        }
        Some(match entries {
            Some(e) => self.render_fields(e, outcome),
            None => self.render_fields(&self.entries(None), outcome),
        })
    }

    #[inline(never)]
    fn render_fields(&self, entries: &Entries<'_>, outcome: &Outcome) -> FieldSet {
        let mut set = FieldSet::default();
        if self.fields {
            let mut limit = FieldBuf::new();
            for (i, p) in self.policies.iter().enumerate() {
                if i > 0 {
                    limit.put(b", ");
                }
                limit.put(b"\"");
                limit.put(p.name.as_bytes());
                limit.put(b"\";r=");
                limit.put_u64(outcome.remaining(i, &entries[i].gcra));
                limit.put(b";t=");
                limit.put_u64(quota::secs_ceil(outcome.reset(i)));
            }
            // One policy: its precomputed item (a reference-count increment).
            let policy = match &entries[..self.policies.len()] {
                [one] => one.item.clone(),
                many => {
                    let mut v = BytesMut::with_capacity(32 * many.len());
                    for (i, e) in many.iter().enumerate() {
                        if i > 0 {
                            v.put_slice(b", ");
                        }
                        v.put_slice(e.item.as_bytes());
                    }
                    HeaderValue::from_maybe_shared(v.freeze()).expect("checked items")
                }
            };
            let limit = HeaderValue::from_bytes(limit.as_bytes()).expect("ASCII digits");
            set.ietf = Some((policy, limit));
        }
        if self.legacy {
            // The most constrained policy: a refusing one (longest wait), else the
            // one with the fewest requests left.
            let remaining = |i: usize| outcome.remaining(i, &entries[i].gcra);
            let i = (0..outcome.len)
                .max_by_key(|&i| (outcome.waits[i], std::cmp::Reverse(remaining(i))))
                .unwrap_or(0);
            let q = entries[i].quota;
            set.legacy = Some(Box::new([
                HeaderValue::from(q.count()),
                HeaderValue::from(remaining(i)),
                HeaderValue::from(quota::secs_ceil(outcome.reset(i))),
            ]));
        }
        set
    }

    fn finish<S, ReqBody, ResBody>(
        &self,
        inner: &mut S,
        req: Request<ReqBody>,
        verdict: Verdict,
    ) -> Kind<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: RefusalBody,
    {
        let outcome = match verdict {
            Verdict::Decided(o) => o,
            Verdict::Open => {
                return Kind::Inner {
                    future: inner.call(req),
                };
            }
            Verdict::Unavailable(retry) => {
                return Kind::Other {
                    state: Box::new(Other::Rejected(Some(
                        Rejection::unavailable(DenialReason::BackendUnavailable, Some(retry))
                            .into_response_to(&req),
                    ))),
                };
            }
            #[cfg(feature = "api-key")]
            Verdict::Exhausted(total) => return self.exhausted(&req, total),
        };
        let fields = self.render(&self.entries(req.extensions().get::<Principal>()), &outcome);
        self.act(inner, req, outcome, fields)
    }

    /// Lets an allowed (or shadowed) request through with its fields, or refuses it.
    #[inline]
    fn act<S, ReqBody, ResBody>(
        &self,
        inner: &mut S,
        req: Request<ReqBody>,
        outcome: Outcome,
        fields: Option<FieldSet>,
    ) -> Kind<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: RefusalBody,
    {
        if outcome.allowed {
            return Kind::pass(inner.call(req), fields);
        }
        self.refuse(inner, req, outcome, fields)
    }

    /// A request over the limit: audited, then let through (shadow mode) or refused.
    #[cold]
    #[inline(never)]
    fn refuse<S, ReqBody, ResBody>(
        &self,
        inner: &mut S,
        req: Request<ReqBody>,
        outcome: Outcome,
        fields: Option<FieldSet>,
    ) -> Kind<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: RefusalBody,
    {
        self.audit(&req, &outcome);
        if self.shadow {
            self.shadow_limited.fetch_add(1, Ordering::Relaxed);
            return Kind::pass(inner.call(req), fields);
        }
        self.limited.fetch_add(1, Ordering::Relaxed);
        let mut rejection = Rejection::too_many_requests(
            DenialReason::RateLimited,
            Duration::from_nanos(outcome.wait()),
        );
        if let Some(set) = fields {
            if let Some((policy, limit)) = set.ietf {
                rejection = rejection
                    .with_header(RATELIMIT_POLICY, policy)
                    .with_header(RATELIMIT, limit);
            }
            if let Some(legacy) = set.legacy {
                let [limit, remaining, reset] = *legacy;
                rejection = rejection
                    .with_header(X_LIMIT, limit)
                    .with_header(X_REMAINING, remaining)
                    .with_header(X_RESET, reset);
            }
        }
        Kind::Other {
            state: Box::new(Other::Rejected(Some(rejection.into_response_to(&req)))),
        }
    }

    /// Spends one of the key's credits in memory, atomically; `false` if none
    /// were left (nothing spent).
    #[cfg(feature = "api-key")]
    fn spend_local(&self, credits: &Credits) -> bool {
        let spend = |n: &AtomicU64| {
            n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |spent| {
                (spent < credits.total).then_some(spent + 1)
            })
            .is_ok()
        };
        if let Some(n) = self.spent.get(&credits.name) {
            return spend(&n);
        }
        let n = self
            .spent
            .entry(credits.name.clone())
            .or_insert_with(|| AtomicU64::new(0));
        spend(&n)
    }

    /// Credits spent in memory for the key named `name`.
    #[cfg(feature = "api-key")]
    pub(crate) fn spent_local(&self, name: &str) -> u64 {
        self.spent
            .get(name)
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// The 429 for a key without credits left: audited, `credits_exhausted` in the
    /// logs, the generic 429 for the client. Credits do not refill by themselves;
    /// `Retry-After` is an hour, a polite interval at which to see whether more were
    /// granted.
    #[cfg(feature = "api-key")]
    #[cold]
    fn exhausted<S, ReqBody, ResBody>(
        &self,
        req: &Request<ReqBody>,
        total: u64,
    ) -> Kind<S, ReqBody, ResBody>
    where
        S: Service<Request<ReqBody>>,
        ResBody: RefusalBody,
    {
        let principal = req.extensions().get::<Principal>();
        crate::audit::emit!(
            info,
            CreditsExhausted,
            reason = DenialReason::CreditsExhausted.as_str(),
            principal = principal
                .map(|p| crate::log_text::sanitize_id(p.id()))
                .as_deref(),
            method = principal.map(|p| p.method().as_str()),
            client_ip = req
                .extensions()
                .get::<ClientIp>()
                .map(tracing::field::display),
            credits = total,
        );
        let rejection =
            Rejection::too_many_requests(DenialReason::CreditsExhausted, CREDITS_RETRY_AFTER);
        Kind::Other {
            state: Box::new(Other::Rejected(Some(rejection.into_response_to(req)))),
        }
    }

    fn audit<B>(&self, req: &Request<B>, outcome: &Outcome) {
        let policy = (0..outcome.len)
            .max_by_key(|&i| outcome.waits[i])
            .map(|i| &*self.policies[i].name);
        let principal = req.extensions().get::<Principal>();
        let client_ip = req.extensions().get::<ClientIp>();
        crate::audit::emit!(
            info,
            RateLimited,
            reason = DenialReason::RateLimited.as_str(),
            policy,
            principal = principal
                .map(|p| crate::log_text::sanitize_id(p.id()))
                .as_deref(),
            method = principal.map(|p| p.method().as_str()),
            client_ip = client_ip.map(tracing::field::display),
            retry_after = crate::rejection::retry_after_secs(Duration::from_nanos(outcome.wait())),
            shadow = self.shadow,
        );
    }
}

/// The `RateLimit` field's value, built on the stack and copied out once.
struct FieldBuf {
    bytes: [u8; FieldBuf::CAP],
    len: usize,
}

impl FieldBuf {
    /// Per policy at most `, "` + a 32-byte name + `";r=` + 20 digits + `;t=` + 20
    /// digits (82 bytes), for at most [`MAX_POLICIES`] policies.
    const CAP: usize = 96 * MAX_POLICIES;

    fn new() -> Self {
        Self {
            bytes: [0; Self::CAP],
            len: 0,
        }
    }

    #[inline]
    fn put(&mut self, s: &[u8]) {
        self.bytes[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }

    /// `n` in decimal, two digits at a time.
    #[inline]
    fn put_u64(&mut self, mut n: u64) {
        const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
            2021222324252627282930313233343536373839\
            4041424344454647484950515253545556575859\
            6061626364656667686970717273747576777879\
            8081828384858687888990919293949596979899";
        let end = self.len + n.checked_ilog10().map_or(1, |d| d as usize + 1);
        let digits = &mut self.bytes[self.len..end];
        let mut i = digits.len();
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i -= 2;
            digits[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
        }
        if n >= 10 {
            let pair = n as usize * 2;
            digits[..2].copy_from_slice(&PAIRS[pair..pair + 2]);
        } else {
            digits[0] = b'0' + n as u8;
        }
        self.len = end;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Layer applying [`RateLimit`]; build it with [`RateLimitLayer::builder`].
///
/// Clones share the limits: build once, clone into every connection.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    shared: Arc<Shared>,
}

impl RateLimitLayer {
    /// The Redis limiter the limits are kept in, if any (for the stack's builder,
    /// which gives it to the failed-authentication throttle too).
    #[cfg(all(feature = "redis", feature = "stack"))]
    pub(crate) fn redis_limiter(&self) -> Option<&redis::RedisLimiter> {
        self.shared.redis.as_ref()
    }

    /// Starts a configuration.
    pub fn builder() -> RateLimitBuilder {
        RateLimitBuilder {
            policies: Vec::new(),
            key: KeyRule::default(),
            max_tracked_keys: 100_000,
            fields: true,
            legacy: false,
            shadow: false,
            #[cfg(feature = "redis")]
            redis: None,
        }
    }

    /// Slots of the in-memory table ever given a key: the keys tracked, and the
    /// slots of keys whose quota has refilled, which any new key may take. At most
    /// the cap. Introspection for the tests and benchmarks; hidden, not part of the
    /// API.
    #[doc(hidden)]
    pub fn tracked_keys(&self) -> usize {
        self.shared.local.len()
    }

    /// The credits `record`'s key has left (its total less those spent through this
    /// layer), or `None` for a key without credits. With the Redis backend, the count
    /// shared by every instance (one Redis read; this instance's count while Redis
    /// cannot answer).
    #[cfg(feature = "api-key")]
    pub async fn credits_remaining(&self, record: &crate::api_key::KeyRecord) -> Option<u64> {
        let credits = record.policy()?.credits.as_ref()?;
        #[cfg(feature = "redis")]
        if let Some(r) = &self.shared.redis
            && let Some(spent) = r.credits_spent(credits).await
        {
            return Some(credits.total.saturating_sub(spent));
        }
        Some(
            credits
                .total
                .saturating_sub(self.shared.spent_local(&credits.name)),
        )
    }

    /// Refusals so far.
    pub fn stats(&self) -> RateLimitStats {
        RateLimitStats {
            limited: self.shared.limited.load(Ordering::Relaxed),
            shadow_limited: self.shared.shadow_limited.load(Ordering::Relaxed),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Service that limits requests per key; see [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> RateLimit<S> {
    /// Wraps `inner` with the limits of `layer`.
    pub fn new(inner: S, layer: &RateLimitLayer) -> Self {
        layer.layer(inner)
    }
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S>
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
        #[cfg(feature = "redis")]
        if self.shared.redis.is_some() {
            return call_shared_backend(&self.shared, &mut self.inner, req);
        }
        let shared = &*self.shared;
        let cx = KeyContext::of(&req);
        let key = shared.key.derive(&cx).local(shared.local.hasher());
        // Anonymous requests use the default quotas, computed at build time; their
        // policy entries are looked up only if fields are rendered.
        let entries = cx.principal().map(|p| shared.entries(Some(p)));
        let per_principal;
        let gcras = match &entries {
            None => &shared.anonymous[..shared.policies.len()],
            Some(entries) => {
                per_principal = Shared::gcras(entries);
                &per_principal[..shared.policies.len()]
            }
        };
        let outcome = shared.local.check(key, gcras, shared.local.now());
        let fields = shared.render_for(entries.as_ref(), &outcome);
        // An admitted request (shadow mode admits them all) spends one of its key's
        // credits, if it has credits.
        #[cfg(feature = "api-key")]
        if (outcome.allowed || shared.shadow)
            && let Some(credits) = req.extensions().get::<Credits>()
            && !shared.spend_local(credits)
        {
            let total = credits.total;
            return ResponseFuture {
                kind: shared.exhausted(&req, total),
            };
        }
        if outcome.allowed {
            let kind = match fields {
                None => Kind::Inner {
                    future: self.inner.call(req),
                },
                Some(set) => Kind::WithFields {
                    future: self.inner.call(req),
                    fields: Some(Box::new(set)),
                },
            };
            return ResponseFuture { kind };
        }
        ResponseFuture {
            kind: shared.refuse(&mut self.inner, req, outcome, fields),
        }
    }
}

/// The check through a shared backend: a future that decides, then acts.
#[cfg(feature = "redis")]
fn call_shared_backend<S, ReqBody, ResBody>(
    shared_arc: &Arc<Shared>,
    inner: &mut S,
    req: Request<ReqBody>,
) -> ResponseFuture<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: RefusalBody,
{
    let shared = &**shared_arc;
    let r = shared.redis.as_ref().expect("checked by the caller");
    let cx = KeyContext::of(&req);
    let source = shared.key.derive(&cx);
    let (gcras, n) = (
        Shared::gcras(&shared.entries(cx.principal())),
        shared.policies.len(),
    );
    let check = r.check(
        source.stable_name(),
        source.local(shared.local.hasher()),
        gcras,
        n,
        shared_arc.clone(),
        #[cfg(feature = "api-key")]
        req.extensions().get::<Credits>().cloned(),
    );
    let clone = inner.clone();
    let inner = std::mem::replace(inner, clone);
    ResponseFuture {
        kind: Kind::Other {
            state: Box::new(Other::Checking {
                check,
                pending: Some((inner, req, shared_arc.clone())),
            }),
        },
    }
}

pub(crate) type CheckFuture = Pin<Box<dyn Future<Output = Verdict> + Send>>;

pin_project! {
    /// Response future of [`RateLimit`]: the inner future plus the fields to add,
    /// a ready refusal, or (with a shared backend) the check in flight.
    pub struct ResponseFuture<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        kind: Kind<S, ReqBody, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, ReqBody, B>
    where
        S: Service<Request<ReqBody>>,
    {
        Inner { #[pin] future: S::Future },
        // Its own variant, so that a response without fields has nothing more to
        // drop; the fields boxed, so that the future stays one word larger than the
        // inner one, whichever variant it is.
        WithFields { #[pin] future: S::Future, fields: Option<Box<FieldSet>> },
        // Boxed, so that the future (and its drop) stays small on the common path.
        Other { state: Box<Other<S, ReqBody, B>> },
    }
}

impl<S, ReqBody, B> Kind<S, ReqBody, B>
where
    S: Service<Request<ReqBody>>,
{
    #[inline]
    fn pass(future: S::Future, fields: Option<FieldSet>) -> Self {
        match fields {
            None => Kind::Inner { future },
            Some(set) => Kind::WithFields {
                future,
                fields: Some(Box::new(set)),
            },
        }
    }
}

/// The rarer states of [`ResponseFuture`].
enum Other<S, ReqBody, B>
where
    S: Service<Request<ReqBody>>,
{
    /// A ready refusal.
    Rejected(Option<Response<B>>),
    /// A shared-backend check in flight, then the inner service to call.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Checking {
        check: CheckFuture,
        pending: Option<(S, Request<ReqBody>, Arc<Shared>)>,
    },
}

impl<S, ReqBody, B> Future for ResponseFuture<S, ReqBody, B>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    B: RefusalBody,
{
    type Output = Result<Response<B>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        // The common cases first and alone: the inner future, then the fields if any.
        match kind.as_mut().project() {
            KindProj::Inner { future } => return future.poll(cx),
            KindProj::WithFields { future, fields } => {
                let mut out = future.poll(cx);
                if let Poll::Ready(Ok(r)) = &mut out
                    && let Some(set) = fields.take()
                {
                    (*set).apply(r.headers_mut());
                }
                return out;
            }
            KindProj::Other { .. } => {}
        }
        poll_other(kind, cx)
    }
}

/// The rarer states: a ready refusal, or a shared-backend check in flight.
#[inline(never)]
fn poll_other<S, ReqBody, B>(
    mut kind: Pin<&mut Kind<S, ReqBody, B>>,
    cx: &mut Context<'_>,
) -> Poll<Result<Response<B>, S::Error>>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    B: RefusalBody,
{
    loop {
        match kind.as_mut().project() {
            KindProj::Inner { future } => return future.poll(cx),
            KindProj::WithFields { future, fields } => {
                let mut res = ready!(future.poll(cx));
                if let (Ok(r), Some(set)) = (&mut res, fields.take()) {
                    (*set).apply(r.headers_mut());
                }
                return Poll::Ready(res);
            }
            KindProj::Other { state } => {
                let next = match &mut **state {
                    Other::Rejected(response) => {
                        return Poll::Ready(Ok(response.take().expect("polled after completion")));
                    }
                    Other::Checking { check, pending } => {
                        let verdict = ready!(check.as_mut().poll(cx));
                        let (mut svc, req, shared) =
                            pending.take().expect("polled after completion");
                        shared.finish(&mut svc, req, verdict)
                    }
                };
                kind.set(next);
            }
        }
    }
}

impl<S, ReqBody, B> fmt::Debug for ResponseFuture<S, ReqBody, B>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } | Kind::WithFields { .. } => "Inner",
            Kind::Other { ref state } => match **state {
                Other::Rejected(_) => "Rejected",
                Other::Checking { .. } => "Checking",
            },
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::FieldBuf;

    #[test]
    fn field_numbers_are_plain_decimal() {
        for n in [
            0,
            7,
            9,
            10,
            42,
            99,
            100,
            101,
            999,
            1000,
            12_345,
            u64::MAX / 3,
            u64::MAX,
        ] {
            let mut b = FieldBuf::new();
            b.put(b"r=");
            b.put_u64(n);
            assert_eq!(b.as_bytes(), format!("r={n}").as_bytes());
        }
    }
}
