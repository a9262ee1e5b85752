//! Rate limits shared by every instance, kept in Redis.
//!
//! One atomic Lua script per request runs the same GCRA as the in-memory backend,
//! over every policy at once, on the Redis server's own clock (`TIME`), so instance
//! clocks never disagree. The script is loaded when a connection is made and then
//! called by its SHA-1 (`EVALSHA`), and reloaded if the server forgets it
//! (`NOSCRIPT`, e.g. after `SCRIPT FLUSH`).
//!
//! Keys are `<namespace>:rl:<policy>:<key>`, where `<key>` is `g` (global),
//! `ip:<masked address>`, or `p:`/`c:` and 32 hex digits of SHA-256 of a principal
//! identity (method and id) or custom key: an id with any characters becomes a
//! short, safe key. Every key
//! expires when its quota has fully refilled, so Redis holds only keys in use.
//!
//! **Connecting.** A background task makes the connection: it starts when the
//! limiter is built inside a Tokio runtime (else on the first request), and again
//! whenever the connection is lost. An attempt (TCP, TLS, `AUTH`, loading the
//! script) has its own timeout (default 2 s); failed attempts are retried after
//! 100 ms, then after doubling delays up to the cool-down. Requests never wait for a
//! connection: until one is up they follow the [`FailurePolicy`]. Await
//! [`RedisLimiter::connect`] at start-up to begin serving connected.
//!
//! **Failure.** Each request's call to Redis has a timeout (default 5 ms). When
//! Redis errs or times out, or no connection is up, the [`FailurePolicy`] decides
//! (there is no default: the builder takes it as an argument) and a circuit breaker
//! opens: for the cool-down (default 5 s) requests go straight to the failure
//! policy without waiting on Redis, then one request probes it again. A timeout, a
//! lost connection or a `READONLY` reply (a demoted primary) also drops the
//! connection, and the background task reconnects; as soon as a new connection is
//! up, the next request is the probe, without waiting out the rest of the
//! cool-down. A Redis that comes back is so used again within one retry delay (at
//! most the cool-down) and one connection attempt. A Redis that accepts connections
//! but keeps failing calls gets ever longer retry delays: in the steady state it
//! costs one request per cool-down, as an unreachable one costs none.
//!
//! **Audit events** (target `portcullis::audit`): `rate_limit_backend_down` (`WARN`)
//! when the breaker opens, `rate_limit_backend_recovered` when a probe succeeds, and
//! `rate_limit_backend_connect_failed` (`WARN`) for the first failed connection
//! attempt of an outage. Their `error` field is a class, never the error's text:
//! `timeout`, `not_connected` (no connection is up yet), `connection_refused`,
//! `connection_lost`, `io`, `tls_untrusted_certificate`, `tls_name_mismatch`,
//! `tls_invalid_certificate`, `tls_protocol` (e.g. a server that does not speak
//! TLS), `tls`, `authentication_failed`, `server_error`, `read_only`, `protocol` or
//! `client`.
//!
//! **Secrets.** The URL may hold a password: it is never logged, never part of an
//! error, and `Debug` shows only whether TLS is used. A `rediss://` URL always
//! verifies the server's certificate and name: the `#insecure` fragment is refused.
//!
//! ```no_run
//! # async fn run() -> Result<(), portcullis::ConfigError> {
//! use std::time::Duration;
//! use portcullis::rate_limit::redis::{FailurePolicy, RedisLimiter};
//! use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
//!
//! let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
//! let redis = RedisLimiter::builder(&url, FailurePolicy::FallbackLocal)?
//!     .timeout(Duration::from_millis(5))
//!     .connect_timeout(Duration::from_secs(2))
//!     .namespace("jobs-api")?
//!     .build()?;
//! redis.connect().await.ok(); // optional: serve connected from the first request
//! let layer = RateLimitLayer::builder()
//!     .policy(Policy::new("api", Quota::per_second(50)?)?)
//!     .redis(redis)
//!     .build()?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, Script, ServerErrorKind};
use tokio::sync::Notify;

use super::key::LocalKey;
use super::local::{MAX_POLICIES, Outcome};
use super::quota::Gcra;
use super::{CheckFuture, Shared, Verdict};
use crate::ConfigError;
#[cfg(feature = "api-key")]
use crate::api_key::Credits;

/// What to do when Redis cannot answer in time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Let the request through, unlimited, without `RateLimit` fields. Logged as a
    /// warning each time the breaker opens.
    FailOpen,
    /// Refuse with 503 (`backend_unavailable`) and `Retry-After`.
    FailClosed,
    /// Limit with this instance's in-memory limiter (same policies): each
    /// instance then allows the full quota on its own.
    FallbackLocal,
}

/// GCRA over N policies. KEYS: one per policy. ARGV: t1, tau1, t2, tau2, ... in
/// microseconds. Returns {allowed, remaining1, reset1, wait1, ..., now} (µs; `now`
/// the server's time of the decision, for a refund to measure from).
const SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local n = #KEYS
local tats = {}
local allowed = 1
for i = 1, n do
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  tats[i] = tat
  if tat - now > tau then allowed = 0 end
end
local out = {allowed}
for i = 1, n do
  local t = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tats[i]
  local wait = 0
  if allowed == 1 then
    tat = tat + t
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  elseif tat - now > tau then
    wait = tat - now - tau
  end
  local remaining = math.floor((tau + t - (tat - now)) / t)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = tat - now
  out[#out + 1] = wait
end
out[#out + 1] = now
return out
"#;

/// How long a key's failures keep it throttled, without counting. KEYS: the key.
/// ARGV: tau (µs). Returns the wait in µs until one more would be allowed, 0 if none.
#[cfg(feature = "auth-throttle")]
const PEEK_SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local over = tat - now - tonumber(ARGV[1])
if over > 0 then return over end
return 0
"#;

/// Gives back one request counted at the server's time `at`: what is left of its
/// interval `t` (all of it at once, nothing from one interval on, as in memory).
/// KEYS: the key. ARGV: t, at (µs).
#[cfg(feature = "auth-throttle")]
const REFUND_SCRIPT: &str = r#"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local elapsed = now - tonumber(ARGV[2])
if elapsed < 0 then elapsed = 0 end
local left = tonumber(ARGV[1]) - elapsed
if left <= 0 then return 0 end
local tat = tonumber(redis.call('GET', KEYS[1]) or '')
if not tat then return 0 end
tat = tat - left
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
return 1
"#;

/// Spends one credit. KEYS: the key's spent count. ARGV: its total. Returns 1 if
/// one was spent, 0 if none was left. The count never expires. A count that is
/// not a number (written by something else) spends nothing: 0, as if exhausted,
/// never an error that a fail-open policy would turn into an unmetered request.
#[cfg(feature = "api-key")]
const SPEND_SCRIPT: &str = r#"
local raw = redis.call('GET', KEYS[1])
local spent = 0
if raw then
  if not string.match(raw, '^%d+$') then return 0 end
  spent = tonumber(raw)
end
if spent >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
return 1
"#;

/// Builds a [`RedisLimiter`].
pub struct RedisLimiterBuilder {
    client: Client,
    tls: bool,
    policy: FailurePolicy,
    timeout: Duration,
    connect_timeout: Duration,
    cooldown: Duration,
    namespace: String,
}

impl fmt::Debug for RedisLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiterBuilder")
            .field("url", &"<redacted>")
            .field("tls", &self.tls)
            .field("failure_policy", &self.policy)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("cooldown", &self.cooldown)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl RedisLimiterBuilder {
    /// How long a request waits for Redis, 1 ms to 1 s (default 5 ms). Connecting is
    /// not part of it (see [`connect_timeout`](Self::connect_timeout)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long one connection attempt may take (TCP, TLS handshake, `AUTH`,
    /// loading the script), 10 ms to 60 s (default 2 s). Attempts run in the
    /// background: no request waits for them.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long the breaker stays open after a failure (default 5 s, 100 ms to
    /// 10 min), unless a new connection ends it earlier; also the longest delay
    /// between two connection attempts.
    pub fn cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// The key prefix (default `portcullis`): 1 to 64 of `A-Z a-z 0-9 _ - .`.
    pub fn namespace(mut self, ns: &str) -> Result<Self, ConfigError> {
        let ok = !ns.is_empty()
            && ns.len() <= 64
            && ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if !ok {
            return Err(ConfigError::new(
                "Redis namespace must be 1 to 64 characters of A-Z a-z 0-9 _ - .",
            ));
        }
        self.namespace = ns.to_owned();
        Ok(self)
    }

    /// Trust this CA (PEM) for `rediss://` instead of the platform's root
    /// certificates, e.g. a private CA in front of a managed Redis.
    #[cfg(feature = "redis-tls")]
    pub fn tls_root_certificate(mut self, pem: &[u8]) -> Result<Self, ConfigError> {
        if !self.tls {
            return Err(ConfigError::new(
                "a TLS root certificate needs a rediss:// URL",
            ));
        }
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem.to_vec()),
        };
        self.client = Client::build_with_tls(self.client.get_connection_info().clone(), certs)
            .map_err(|_| ConfigError::new("Redis TLS root certificate could not be used"))?;
        Ok(self)
    }

    /// Checks the settings. Inside a Tokio runtime the first connection attempt
    /// starts in the background; outside one, the first request starts it.
    pub fn build(self) -> Result<RedisLimiter, ConfigError> {
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(1) {
            return Err(ConfigError::new("Redis timeout must be 1 ms to 1 s"));
        }
        if self.connect_timeout < Duration::from_millis(10)
            || self.connect_timeout > Duration::from_secs(60)
        {
            return Err(ConfigError::new(
                "Redis connect timeout must be 10 ms to 60 s",
            ));
        }
        if self.cooldown < Duration::from_millis(100) || self.cooldown > Duration::from_secs(600) {
            return Err(ConfigError::new("Redis cool-down must be 100 ms to 10 min"));
        }
        // Both timeouts are applied around whole operations (`Inner::check`,
        // `Inner::establish`); a response timeout inside the connection would also
        // hold the set-up's round trips to the per-call timeout.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        let inner = Arc::new(Inner {
            client: self.client,
            config,
            link: Mutex::new(Link::default()),
            wake: Arc::new(Notify::new()),
            attempted: Notify::new(),
            connect_failing: AtomicBool::new(false),
            losses: AtomicU32::new(0),
            script: Script::new(SCRIPT),
            #[cfg(feature = "api-key")]
            spend_script: Script::new(SPEND_SCRIPT),
            #[cfg(feature = "auth-throttle")]
            peek_script: Script::new(PEEK_SCRIPT),
            #[cfg(feature = "auth-throttle")]
            refund_script: Script::new(REFUND_SCRIPT),
            tls: self.tls,
            policy: self.policy,
            timeout: self.timeout,
            connect_timeout: self.connect_timeout,
            cooldown: self.cooldown,
            namespace: self.namespace,
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            inner.connection();
        }
        Ok(RedisLimiter { inner })
    }
}

/// The Redis backend of [`RateLimitLayer`](super::RateLimitLayer); give it to
/// [`RateLimitBuilder::redis`](super::RateLimitBuilder::redis). Cheap to clone.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: AsyncConnectionConfig,
    link: Mutex<Link>,
    /// Cuts the reconnect task's wait short ([`RedisLimiter::connect`]).
    wake: Arc<Notify>,
    /// Signalled after every connection attempt, whatever its result.
    attempted: Notify,
    /// A connection attempt failed since the last connection was made: the first
    /// failure of an outage is logged, its retries are not.
    connect_failing: AtomicBool,
    /// Connections lost since the last successful call: a Redis that accepts
    /// connections but keeps failing calls is retried ever more slowly.
    losses: AtomicU32,
    script: Script,
    #[cfg(feature = "api-key")]
    spend_script: Script,
    #[cfg(feature = "auth-throttle")]
    peek_script: Script,
    #[cfg(feature = "auth-throttle")]
    refund_script: Script,
    tls: bool,
    policy: FailurePolicy,
    timeout: Duration,
    connect_timeout: Duration,
    cooldown: Duration,
    namespace: String,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which the breaker is open; 0 = closed, and a
    /// past instant = half-open (the next request probes).
    open_until: AtomicU64,
}

/// The connection, if one is up, and whether the reconnect task is running.
#[derive(Default)]
struct Link {
    /// A connection that has answered, with its number (to drop only that one).
    conn: Option<(u64, MultiplexedConnection)>,
    made: u64,
    reconnecting: bool,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let connected = i.lock().conn.is_some();
        let breaker_open = self.breaker_open();
        f.debug_struct("RedisLimiter")
            .field("url", &"<redacted>")
            .field("tls", &i.tls)
            .field("failure_policy", &i.policy)
            .field("timeout", &i.timeout)
            .field("connect_timeout", &i.connect_timeout)
            .field("cooldown", &i.cooldown)
            .field("namespace", &i.namespace)
            .field("connected", &connected)
            .field("breaker_open", &breaker_open)
            .finish()
    }
}

/// Redis did not answer in time or answered with an error. Says nothing more: the
/// underlying error could carry connection details.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisUnavailable(());

impl fmt::Display for RedisUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Redis rate-limit backend unavailable")
    }
}

impl std::error::Error for RedisUnavailable {}

impl RedisLimiter {
    /// Parses `url` (`redis://[user:password@]host[:port][/db]`, or `rediss://` with
    /// the `redis-tls` feature). Errors never repeat the URL.
    pub fn builder(
        url: &str,
        on_failure: FailurePolicy,
    ) -> Result<RedisLimiterBuilder, ConfigError> {
        let lower = url.get(..9).unwrap_or("").to_ascii_lowercase();
        let tls = lower.starts_with("rediss://");
        if !tls && !lower.starts_with("redis://") {
            return Err(ConfigError::new(
                "Redis URL must start with redis:// or rediss://",
            ));
        }
        if tls && !cfg!(feature = "redis-tls") {
            return Err(ConfigError::new(
                "Redis URL uses rediss:// (TLS): enable the redis-tls feature",
            ));
        }
        let client = Client::open(url).map_err(|_| {
            ConfigError::new("Redis URL could not be parsed (not shown: it may hold a password)")
        })?;
        // `#insecure` would turn off certificate and name checks (if another crate
        // in the build enables the client's insecure TLS feature).
        #[cfg(feature = "redis-tls")]
        if matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { insecure: true, .. }
        ) {
            return Err(ConfigError::new(
                "Redis URL: #insecure (no certificate checks) is not supported",
            ));
        }
        Ok(RedisLimiterBuilder {
            client,
            tls,
            policy: on_failure,
            timeout: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(2),
            cooldown: Duration::from_secs(5),
            namespace: "portcullis".to_owned(),
        })
    }

    /// Waits until a connection is up, starting an attempt now if none is running,
    /// for about the connect timeout at most: await it at start-up to fail fast, or to
    /// serve connected from the first request. A connection that is up is checked
    /// with `PING` (and replaced if dead). Not required: the limiter connects in the
    /// background either way.
    pub async fn connect(&self) -> Result<(), RedisUnavailable> {
        let inner = &self.inner;
        let mut attempted = std::pin::pin!(inner.attempted.notified());
        attempted.as_mut().enable();
        if let Some((id, mut conn)) = inner.connection() {
            let ping = redis::cmd("PING");
            let ping = ping.query_async::<String>(&mut conn);
            match tokio::time::timeout(inner.connect_timeout, ping).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if !needs_new_connection(&e) => return Err(RedisUnavailable(())),
                // Dead (e.g. made in a runtime that has shut down): wait for a new one.
                _ => inner.lose(id),
            }
        }
        inner.wake.notify_one();
        // The attempt under way, or the one just woken, reports within its timeout.
        let grace = Duration::from_millis(100);
        let _ = tokio::time::timeout(inner.connect_timeout + grace, attempted).await;
        match inner.lock().conn {
            Some(_) => Ok(()),
            None => Err(RedisUnavailable(())),
        }
    }

    /// Credits spent for a key, as Redis counts them; `None` if Redis cannot answer.
    /// A count that is not a whole number reads as everything spent, as the spend
    /// script treats it (and is no Redis failure: the breaker stays closed).
    #[cfg(feature = "api-key")]
    pub(crate) async fn credits_spent(&self, credits: &Credits) -> Option<u64> {
        let key = format!("{}:cr:{}", self.inner.namespace, credits.name);
        let raw: Option<Vec<u8>> = self
            .inner
            .call(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
            .ok()?;
        Some(match raw {
            None => 0,
            Some(raw) if !raw.is_empty() && raw.iter().all(u8::is_ascii_digit) => {
                std::str::from_utf8(&raw)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u64::MAX)
            }
            Some(_) => u64::MAX,
        })
    }

    /// Records a signature nonce (`<namespace>:<name>`) for `ttl`; `Ok(false)` if it
    /// was recorded already (a replay). One `SET NX PX`, atomic across instances.
    #[cfg(feature = "signature")]
    pub(crate) async fn claim_nonce(&self, name: &str, ttl: Duration) -> Result<bool, Bypassed> {
        let key = format!("{}:{name}", self.inner.namespace);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let set: Option<String> = self
            .inner
            .call(|mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// Whether the circuit breaker is open now: requests bypass Redis because the
    /// cool-down after a failure is running, or because no connection is up since.
    pub fn breaker_open(&self) -> bool {
        let until = self.inner.open_until.load(Ordering::Relaxed);
        until != 0 && (self.inner.now() < until || self.inner.lock().conn.is_none())
    }

    pub(crate) fn check(
        &self,
        name: String,
        local_key: LocalKey,
        gcras: [Gcra; MAX_POLICIES],
        n: usize,
        shared: Arc<Shared>,
        #[cfg(feature = "api-key")] credits: Option<Credits>,
    ) -> CheckFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let verdict = inner
                .clone()
                .check(name, local_key, gcras, n, shared.clone())
                .await;
            #[cfg(feature = "api-key")]
            if let (Verdict::Decided(o), Some(credits)) = (&verdict, credits)
                && (o.allowed || shared.shadow)
            {
                return inner.spend(&credits, &shared, verdict).await;
            }
            verdict
        })
    }
}

/// The failed-authentication throttle's state on Redis: one GCRA key per client
/// address (`<namespace>:at:<key>`), through the same connection, timeout, breaker
/// and failure policy as the rate limits. `Err` means Redis was not asked or did not
/// answer; the caller applies [`failure_policy`](Self::failure_policy).
#[cfg(any(feature = "auth-throttle", feature = "signature"))]
impl RedisLimiter {
    pub(crate) fn failure_policy(&self) -> FailurePolicy {
        self.inner.policy
    }

    /// `Retry-After` of a fail-closed refusal: the rest of the breaker's cool-down.
    pub(crate) fn retry_after(&self) -> Duration {
        self.inner.retry_after()
    }
}

#[cfg(feature = "auth-throttle")]
impl RedisLimiter {
    fn throttle_key(&self, key: &str) -> String {
        format!("{}:at:{key}", self.inner.namespace)
    }

    /// Counts one failure for `key`, all or nothing, as the rate limits count; with
    /// the server's time of the decision (µs), which a refund measures from.
    pub(crate) async fn throttle_count(
        &self,
        key: &str,
        g: Gcra,
    ) -> Result<(Outcome, u64), Bypassed> {
        let keys = vec![self.throttle_key(key)];
        let inner = &*self.inner;
        self.inner
            .call(|mut conn| async move { inner.run(&mut conn, keys, &[g]).await })
            .await
    }

    /// The wait (ns) until `key` may fail once more, if it is throttled now.
    pub(crate) async fn throttle_peek(&self, key: &str, g: Gcra) -> Result<Option<u64>, Bypassed> {
        let k = self.throttle_key(key);
        let script = &self.inner.peek_script;
        let wait: i64 = self
            .inner
            .call(|mut conn| async move {
                script
                    .key(k)
                    .arg(g.micros().1)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok((wait > 0).then(|| (wait as u64).saturating_mul(1000)))
    }

    /// Gives back one failure counted for `key` at the server's time `at` (µs), as
    /// much of it as has not run out since.
    pub(crate) async fn throttle_refund(
        &self,
        key: &str,
        g: Gcra,
        at: u64,
    ) -> Result<(), Bypassed> {
        let k = self.throttle_key(key);
        let script = &self.inner.refund_script;
        self.inner
            .call(|mut conn| async move {
                script
                    .key(k)
                    .arg(g.micros().0)
                    .arg(at)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await
            .map(drop)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Link> {
        // Nothing panics while holding the lock; a poisoned one is still consistent.
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    /// The connection if one is up; otherwise starts the reconnect task (unless it
    /// runs already) and returns at once.
    fn connection(self: &Arc<Self>) -> Option<(u64, MultiplexedConnection)> {
        {
            let mut link = self.lock();
            if let Some((id, conn)) = &link.conn {
                return Some((*id, conn.clone()));
            }
            if link.reconnecting {
                return None;
            }
            link.reconnecting = true;
        }
        // Outside the lock: a runtime that is shutting down drops the task at once,
        // and with it `Running`, which takes the lock.
        tokio::spawn(reconnect(Running(Arc::downgrade(self)), self.wake.clone()));
        None
    }

    /// Drops connection `id` (if it is still the current one) and reconnects.
    fn lose(self: &Arc<Self>, id: u64) {
        {
            let mut link = self.lock();
            if link.conn.as_ref().is_none_or(|(current, _)| *current != id) {
                return;
            }
            link.conn = None;
        }
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.connection();
    }

    /// Makes `conn` the connection, and ends the breaker's cool-down: the next
    /// request is the probe (still exactly one, through the half-open state).
    fn install(&self, conn: MultiplexedConnection) {
        {
            let mut link = self.lock();
            link.made += 1;
            link.conn = Some((link.made, conn));
        }
        self.connect_failing.store(false, Ordering::Relaxed);
        let _ = self
            .open_until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u != 0).then_some(1)
            });
        self.attempted.notify_waiters();
    }

    /// One connection attempt: connect (TLS and `AUTH` included), then load the
    /// script, which also shows that the server answers.
    async fn establish(&self) -> Result<MultiplexedConnection, &'static str> {
        let attempt = async {
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await?;
            match self.script.load_async(&mut conn).await {
                // An error reply (e.g. `LOADING`, or no permission for `SCRIPT
                // LOAD`) still shows a server that answers; the probe decides.
                Err(e) if needs_new_connection(&e) => Err(e),
                _ => Ok(conn),
            }
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(class(&e)),
            Err(_) => Err("timeout"),
        }
    }

    async fn check(
        self: Arc<Self>,
        name: String,
        local_key: LocalKey,
        gcras: [Gcra; MAX_POLICIES],
        n: usize,
        shared: Arc<Shared>,
    ) -> Verdict {
        let keys: Vec<String> = shared.policies[..n]
            .iter()
            .map(|p| format!("{}:rl:{}:{}", self.namespace, p.name, name))
            .collect();
        let gcra = &gcras[..n];
        let this = &*self;
        match self
            .call(|mut conn| async move { this.run(&mut conn, keys, gcra).await })
            .await
        {
            Ok((outcome, _)) => Verdict::Decided(outcome),
            Err(Bypassed) => self.on_failure(local_key, gcra, &shared),
        }
    }

    /// Runs `op` on the connection under the breaker and the per-call timeout: the
    /// one path by which every use of Redis (rate limits, the failed-authentication
    /// throttle) meets the same timeout, breaker and reconnection. `Err` means Redis
    /// was not asked or did not answer: the caller applies the failure policy.
    pub(crate) async fn call<T, F, Fut>(self: &Arc<Self>, op: F) -> Result<T, Bypassed>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let now = self.now();
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 && now < until {
            return Err(Bypassed);
        }
        let Some((id, conn)) = self.connection() else {
            self.trip(now, "not_connected");
            return Err(Bypassed);
        };
        // Half-open: exactly one caller wins the probe; the others keep bypassing
        // until it reports.
        if until != 0
            && self
                .open_until
                .compare_exchange(
                    until,
                    now + self.cooldown.as_nanos() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return Err(Bypassed);
        }
        let result = tokio::time::timeout(self.timeout, op(conn)).await;
        match result {
            Ok(Ok(value)) => {
                self.losses.store(0, Ordering::Relaxed);
                if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                    crate::audit::emit!(
                        info,
                        RateLimitBackendRecovered,
                        backend = "redis",
                        namespace = %self.namespace,
                    );
                }
                Ok(value)
            }
            Ok(Err(e)) => {
                if needs_new_connection(&e) {
                    self.lose(id);
                }
                self.trip(now, class(&e));
                Err(Bypassed)
            }
            Err(_) => {
                // A connection that stopped answering may never answer again (a
                // silent network drop): only a new one is trusted.
                self.lose(id);
                self.trip(now, "timeout");
                Err(Bypassed)
            }
        }
    }

    /// Spends one of a key's credits on Redis, atomically (no instance can spend
    /// one that another has spent). `admitted` is the rate limits' verdict, kept
    /// when a credit was spent; when Redis cannot answer, the failure policy
    /// decides as for the rate limits.
    #[cfg(feature = "api-key")]
    async fn spend(
        self: &Arc<Self>,
        credits: &Credits,
        shared: &Shared,
        admitted: Verdict,
    ) -> Verdict {
        let key = format!("{}:cr:{}", self.namespace, credits.name);
        let (script, total) = (&self.spend_script, credits.total);
        let spent = self
            .call(|mut conn| async move {
                script
                    .key(key)
                    .arg(total)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        match spent {
            Ok(1) => admitted,
            Ok(_) => Verdict::Exhausted(total),
            Err(Bypassed) => match self.policy {
                FailurePolicy::FailOpen => admitted,
                FailurePolicy::FailClosed => Verdict::Unavailable(self.retry_after()),
                FailurePolicy::FallbackLocal if shared.spend_local(credits) => admitted,
                FailurePolicy::FallbackLocal => Verdict::Exhausted(total),
            },
        }
    }

    /// Opens the breaker for the cool-down, logging the outage once.
    fn trip(&self, now: u64, error: &'static str) {
        let prev = self
            .open_until
            .swap(now + self.cooldown.as_nanos() as u64, Ordering::AcqRel);
        if prev == 0 {
            crate::audit::emit!(
                warn,
                RateLimitBackendDown,
                backend = "redis",
                namespace = %self.namespace,
                error,
                failure_policy = ?self.policy,
                cooldown_ms = self.cooldown.as_millis() as u64,
            );
        }
    }

    fn on_failure(&self, local_key: LocalKey, gcras: &[Gcra], shared: &Shared) -> Verdict {
        match self.policy {
            FailurePolicy::FailOpen => Verdict::Open,
            FailurePolicy::FailClosed => Verdict::Unavailable(self.retry_after()),
            FailurePolicy::FallbackLocal => {
                Verdict::Decided(shared.local.check(local_key, gcras, shared.local.now()))
            }
        }
    }

    /// How long until the breaker's cool-down ends (at least 1 ns): the
    /// `Retry-After` of a fail-closed refusal.
    pub(crate) fn retry_after(&self) -> Duration {
        let until = self.open_until.load(Ordering::Relaxed);
        Duration::from_nanos(until.saturating_sub(self.now()).max(1))
    }

    async fn run(
        &self,
        conn: &mut MultiplexedConnection,
        keys: Vec<String>,
        gcras: &[Gcra],
    ) -> redis::RedisResult<(Outcome, u64)> {
        let mut inv = self.script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for g in gcras {
            let (t, tau) = g.micros();
            inv.arg(t).arg(tau);
        }
        let v: Vec<i64> = inv.invoke_async(conn).await?;
        if v.len() != 2 + 3 * gcras.len() {
            return Err((ErrorKind::Parse, "unexpected script reply").into());
        }
        let mut out = Outcome {
            allowed: v[0] == 1,
            len: gcras.len(),
            ahead: [0; MAX_POLICIES],
            waits: [0; MAX_POLICIES],
            overflow: false,
        };
        for i in 0..gcras.len() {
            // Microseconds from the script; the remaining count follows from `ahead`.
            let us = |x: i64| (x.max(0) as u64).saturating_mul(1000);
            out.ahead[i] = us(v[2 + 3 * i]);
            out.waits[i] = us(v[3 + 3 * i]);
        }
        let now = v[1 + 3 * gcras.len()].max(0) as u64;
        Ok((out, now))
    }
}

/// Redis was not asked (breaker open, no connection) or did not answer in time.
#[derive(Debug)]
pub(crate) struct Bypassed;

/// The reconnect task: one per outage. It holds the limiter only while it tries,
/// so that dropping every [`RedisLimiter`] ends it.
async fn reconnect(running: Running, wake: Arc<Notify>) {
    let limiter = &running.0;
    let mut attempt = match limiter.upgrade() {
        // After a loss that followed a successful call, at once; after losses in a
        // row (a server that accepts connections but fails calls), later each time.
        Some(inner) => inner.losses.load(Ordering::Relaxed).saturating_sub(1),
        None => return,
    };
    loop {
        let delay = match limiter.upgrade() {
            Some(inner) => retry_delay(attempt, inner.cooldown),
            None => return,
        };
        if !delay.is_zero() {
            let _ = tokio::time::timeout(delay, wake.notified()).await;
        }
        let Some(inner) = limiter.upgrade() else {
            return;
        };
        match inner.establish().await {
            Ok(conn) => {
                inner.install(conn);
                return;
            }
            Err(error) => {
                if !inner.connect_failing.swap(true, Ordering::Relaxed) {
                    crate::audit::emit!(
                    warn,
                    RateLimitBackendConnectFailed,
                                backend = "redis",
                                namespace = %inner.namespace,
                                error,
                                connect_timeout_ms = inner.connect_timeout.as_millis() as u64,
                            );
                }
                inner.attempted.notify_waiters();
            }
        }
        attempt = attempt.saturating_add(1);
    }
}

/// The reconnect task's hold on the limiter. Dropping it marks the task as ended,
/// however it ends (done, limiter dropped, or its runtime shut down, even before
/// it first ran), so that a later loss can start a new one.
struct Running(Weak<Inner>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.lock().reconnecting = false;
        }
    }
}

/// The wait before connection attempt `attempt` (0: none), 100 ms doubling up to
/// `cap`; each wait is between half and all of that, so that instances restarted
/// together do not reconnect in step.
fn retry_delay(attempt: u32, cap: Duration) -> Duration {
    if attempt == 0 {
        return Duration::ZERO;
    }
    let full = Duration::from_millis(100)
        .saturating_mul(1 << (attempt - 1).min(20))
        .min(cap);
    let spread = (RandomState::new().hash_one(attempt) % 1024) as u32;
    full / 2 + full / 2 * spread / 1024
}

/// Whether only a new connection can help after `e`: anything but an error reply
/// from a server that is up, and a `READONLY` reply (the server is now a replica).
fn needs_new_connection(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ReadOnly) => true,
        ErrorKind::Server(_) | ErrorKind::Extension => e.is_unrecoverable_error(),
        _ => true,
    }
}

/// The class of `e` logged as `error`: never its text, which may name the host, the
/// user or a key.
fn class(e: &RedisError) -> &'static str {
    #[cfg(feature = "redis-tls")]
    if let Some(class) = tls_class(e) {
        return class;
    }
    if e.is_timeout() {
        "timeout"
    } else if e.is_connection_refusal() {
        "connection_refused"
    } else if e.is_connection_dropped() {
        "connection_lost"
    } else {
        match e.kind() {
            ErrorKind::Io => "io",
            ErrorKind::AuthenticationFailed => "authentication_failed",
            ErrorKind::Server(ServerErrorKind::ReadOnly) => "read_only",
            ErrorKind::Server(_) | ErrorKind::Extension => "server_error",
            ErrorKind::Parse => "protocol",
            _ => "client",
        }
    }
}

/// The class of a TLS failure, found through the I/O error that carries it.
#[cfg(feature = "redis-tls")]
fn tls_class(e: &RedisError) -> Option<&'static str> {
    use rustls::{CertificateError as C, Error as T};
    use std::error::Error;
    type Wrapped = Arc<dyn Error + Send + Sync>;
    let source = e.source()?;
    let io = source.downcast_ref::<std::io::Error>().or_else(|| {
        source
            .downcast_ref::<Wrapped>()
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
    })?;
    Some(match io.get_ref()?.downcast_ref::<T>()? {
        T::InvalidCertificate(
            C::UnknownIssuer | C::BadSignature | C::BadEncoding | C::UnhandledCriticalExtension,
        ) => "tls_untrusted_certificate",
        T::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "tls_name_mismatch"
        }
        T::InvalidCertificate(_) | T::NoCertificatesPresented => "tls_invalid_certificate",
        T::InvalidMessage(_)
        | T::InappropriateMessage { .. }
        | T::InappropriateHandshakeMessage { .. }
        | T::PeerMisbehaved(_)
        | T::PeerIncompatible(_)
        | T::PeerSentOversizedRecord => "tls_protocol",
        _ => "tls",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io;

    proptest! {
        #[test]
        fn retry_delays_grow_to_the_cap_with_spread(attempt in 0u32..200, cap_ms in 100u64..600_000) {
            let cap = Duration::from_millis(cap_ms);
            let d = retry_delay(attempt, cap);
            if attempt == 0 {
                prop_assert_eq!(d, Duration::ZERO);
            } else {
                let full = Duration::from_millis(100)
                    .saturating_mul(1 << (attempt - 1).min(20))
                    .min(cap);
                prop_assert!(d >= full / 2 && d <= full, "{d:?} of {full:?}");
            }
        }
    }

    #[test]
    fn errors_are_logged_by_class() {
        let io = |kind| RedisError::from(io::Error::from(kind));
        assert_eq!(class(&io(io::ErrorKind::TimedOut)), "timeout");
        assert_eq!(
            class(&io(io::ErrorKind::ConnectionRefused)),
            "connection_refused"
        );
        assert_eq!(
            class(&io(io::ErrorKind::ConnectionReset)),
            "connection_lost"
        );
        let e = RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert_eq!(class(&e), "authentication_failed");
        let e = RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "x"));
        assert_eq!(class(&e), "server_error");
    }

    #[cfg(feature = "redis-tls")]
    #[test]
    fn tls_failures_are_told_apart() {
        use rustls::CertificateError as C;
        let tls = |e: rustls::Error| {
            class(&RedisError::from(io::Error::new(
                io::ErrorKind::InvalidData,
                e,
            )))
        };
        let cert = |c| tls(rustls::Error::InvalidCertificate(c));
        assert_eq!(cert(C::UnknownIssuer), "tls_untrusted_certificate");
        assert_eq!(cert(C::NotValidForName), "tls_name_mismatch");
        assert_eq!(cert(C::Expired), "tls_invalid_certificate");
        let garbage = rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        assert_eq!(tls(garbage), "tls_protocol");
    }

    #[test]
    fn only_an_answering_server_keeps_its_connection() {
        let server = |k| RedisError::from((ErrorKind::Server(k), "x"));
        assert!(!needs_new_connection(&server(
            ServerErrorKind::ResponseError
        )));
        assert!(!needs_new_connection(&server(ServerErrorKind::BusyLoading)));
        assert!(needs_new_connection(&server(ServerErrorKind::ReadOnly)));
        let io = RedisError::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(needs_new_connection(&io));
        assert!(needs_new_connection(&RedisError::from((
            ErrorKind::Parse,
            "x"
        ))));
    }
}
