//! Rate limits shared by every instance, kept in Redis.
//!
//! One atomic Lua script per request runs the same GCRA as the in-memory backend,
//! over every policy at once, on the Redis server's own clock (`TIME`), so instance
//! clocks never disagree. The script is loaded once and then called by its SHA-1
//! (`EVALSHA`), and reloaded if the server forgets it (`NOSCRIPT`, e.g. after a
//! restart or `SCRIPT FLUSH`).
//!
//! Keys are `<namespace>:rl:<policy>:<key>`, where `<key>` is `g` (global),
//! `ip:<masked address>`, or `p:`/`c:` and 32 hex digits of SHA-256 of a principal
//! identity (method and id) or custom key: an id with any characters becomes a
//! short, safe key. Every key
//! expires when its quota has fully refilled, so Redis holds only keys in use.
//!
//! **Failure.** Every call has a timeout (default 5 ms, connecting included). When
//! Redis errs or times out, the [`FailurePolicy`] decides (there is no default: the
//! builder takes it as an argument) and a circuit breaker opens: for the cool-down
//! (default 5 s) requests go straight to the failure policy without waiting on
//! Redis, then one request probes it again. A dead Redis so costs the timeout at most
//! once per cool-down, not once per request. The first request after start connects;
//! [`RedisLimiter::connect`] does it earlier with a longer timeout.
//!
//! **Secrets.** The URL may hold a password: it is never logged, never part of an
//! error, and `Debug` shows only whether TLS is used.
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
//!     .namespace("jobs-api")?
//!     .build()?;
//! redis.connect().await.ok(); // optional: warm the connection at start-up
//! let layer = RateLimitLayer::builder()
//!     .policy(Policy::new("api", Quota::per_second(50)?)?)
//!     .redis(redis)
//!     .build()?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::key::LocalKey;
use super::local::{MAX_POLICIES, Outcome};
use super::quota::Gcra;
use super::{CheckFuture, Shared, Verdict};
use crate::ConfigError;

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
/// microseconds. Returns {allowed, remaining1, reset1, wait1, ...} (µs).
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
return out
"#;

/// Builds a [`RedisLimiter`].
pub struct RedisLimiterBuilder {
    client: Client,
    tls: bool,
    policy: FailurePolicy,
    timeout: Duration,
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
            .field("cooldown", &self.cooldown)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl RedisLimiterBuilder {
    /// The per-call timeout, 1 ms to 1 s (default 5 ms). It bounds the whole
    /// check, connecting included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long the breaker stays open after a failure (default 5 s, 100 ms to 10 min).
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

    /// Checks the settings. Nothing connects yet (see [`RedisLimiter::connect`]).
    pub fn build(self) -> Result<RedisLimiter, ConfigError> {
        if self.timeout < Duration::from_millis(1) || self.timeout > Duration::from_secs(1) {
            return Err(ConfigError::new("Redis timeout must be 1 ms to 1 s"));
        }
        if self.cooldown < Duration::from_millis(100) || self.cooldown > Duration::from_secs(600) {
            return Err(ConfigError::new("Redis cool-down must be 100 ms to 10 min"));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.cooldown);
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                client: self.client,
                config,
                conn: OnceLock::new(),
                script: Script::new(SCRIPT),
                tls: self.tls,
                policy: self.policy,
                timeout: self.timeout,
                cooldown: self.cooldown,
                namespace: self.namespace,
                epoch: Instant::now(),
                open_until: AtomicU64::new(0),
            }),
        })
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
    config: ConnectionManagerConfig,
    /// Made on first use, inside the runtime (it spawns its reconnect task there).
    conn: OnceLock<ConnectionManager>,
    script: Script,
    tls: bool,
    policy: FailurePolicy,
    timeout: Duration,
    cooldown: Duration,
    namespace: String,
    epoch: Instant,
    /// Nanoseconds since `epoch` until which the breaker is open; 0 = closed.
    open_until: AtomicU64,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisLimiter")
            .field("url", &"<redacted>")
            .field("tls", &i.tls)
            .field("failure_policy", &i.policy)
            .field("timeout", &i.timeout)
            .field("cooldown", &i.cooldown)
            .field("namespace", &i.namespace)
            .field("breaker_open", &self.breaker_open())
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
        Ok(RedisLimiterBuilder {
            client,
            tls,
            policy: on_failure,
            timeout: Duration::from_millis(5),
            cooldown: Duration::from_secs(5),
            namespace: "portcullis".to_owned(),
        })
    }

    /// Connects (or checks the connection) with `PING`, under a 1 s timeout: call it
    /// at start-up to fail fast or warm the connection. Not required.
    pub async fn connect(&self) -> Result<(), RedisUnavailable> {
        let Ok(mut conn) = self.inner.conn() else {
            return Err(RedisUnavailable(()));
        };
        let ping = async move { redis::cmd("PING").query_async::<String>(&mut conn).await };
        match tokio::time::timeout(Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(RedisUnavailable(())),
        }
    }

    /// Whether the circuit breaker is open now (Redis is being bypassed).
    pub fn breaker_open(&self) -> bool {
        let until = self.inner.open_until.load(Ordering::Relaxed);
        until != 0 && self.inner.now() < until
    }

    /// The failure policy.
    pub fn failure_policy(&self) -> FailurePolicy {
        self.inner.policy
    }

    pub(crate) fn check(
        &self,
        name: String,
        local_key: LocalKey,
        gcras: [Gcra; MAX_POLICIES],
        n: usize,
        shared: Arc<Shared>,
    ) -> CheckFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.check(name, local_key, gcras, n, shared).await })
    }
}

impl Inner {
    fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let c = ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone())?;
        // A concurrent first call may have won: use whichever was stored.
        Ok(self.conn.get_or_init(|| c).clone())
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    async fn check(
        &self,
        name: String,
        local_key: LocalKey,
        gcras: [Gcra; MAX_POLICIES],
        n: usize,
        shared: Arc<Shared>,
    ) -> Verdict {
        let now = self.now();
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 {
            // Open: bypass. Expired: exactly one caller wins the probe; the others
            // keep bypassing until it reports.
            if now < until
                || self
                    .open_until
                    .compare_exchange(
                        until,
                        now + self.cooldown.as_nanos() as u64,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                return self.on_failure(local_key, &gcras[..n], &shared);
            }
        }
        let keys: Vec<String> = shared.policies[..n]
            .iter()
            .map(|p| format!("{}:rl:{}:{}", self.namespace, p.name, name))
            .collect();
        let result = tokio::time::timeout(self.timeout, self.run(keys, &gcras[..n])).await;
        match result {
            Ok(Ok(outcome)) => {
                if self.open_until.swap(0, Ordering::AcqRel) != 0 {
                    crate::audit::emit!(
                    info,
                    RateLimitBackendRecovered,
                                backend = "redis",
                                namespace = %self.namespace,
                            );
                }
                Verdict::Decided(outcome)
            }
            Ok(Err(e)) => self.trip(now, Some(e.kind()), local_key, &gcras[..n], &shared),
            Err(_) => self.trip(now, None, local_key, &gcras[..n], &shared),
        }
    }

    fn trip(
        &self,
        now: u64,
        kind: Option<redis::ErrorKind>,
        local_key: LocalKey,
        gcras: &[Gcra],
        shared: &Shared,
    ) -> Verdict {
        let prev = self
            .open_until
            .swap(now + self.cooldown.as_nanos() as u64, Ordering::AcqRel);
        if prev == 0 {
            // Only the error's kind: its text may name the host or the user.
            crate::audit::emit!(
            warn,
            RateLimitBackendDown,
                backend = "redis",
                namespace = %self.namespace,
                error = kind.map_or("timeout".to_owned(), |k| format!("{k:?}")),
                failure_policy = ?self.policy,
                cooldown_ms = self.cooldown.as_millis() as u64,
            );
        }
        self.on_failure(local_key, gcras, shared)
    }

    fn on_failure(&self, local_key: LocalKey, gcras: &[Gcra], shared: &Shared) -> Verdict {
        match self.policy {
            FailurePolicy::FailOpen => Verdict::Open,
            FailurePolicy::FailClosed => {
                let until = self.open_until.load(Ordering::Relaxed);
                let left = until.saturating_sub(self.now());
                Verdict::Unavailable(Duration::from_nanos(left.max(1)))
            }
            FailurePolicy::FallbackLocal => {
                Verdict::Decided(shared.local.check(local_key, gcras, shared.local.now()))
            }
        }
    }

    async fn run(&self, keys: Vec<String>, gcras: &[Gcra]) -> redis::RedisResult<Outcome> {
        let mut conn = self.conn()?;
        let mut inv = self.script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for g in gcras {
            inv.arg((g.t / 1000).max(1)).arg(g.tau / 1000);
        }
        let v: Vec<i64> = inv.invoke_async(&mut conn).await?;
        if v.len() != 1 + 3 * gcras.len() {
            return Err((redis::ErrorKind::Parse, "unexpected script reply").into());
        }
        let mut out = Outcome {
            allowed: v[0] == 1,
            len: gcras.len(),
            ahead: [0; MAX_POLICIES],
            waits: [0; MAX_POLICIES],
        };
        for i in 0..gcras.len() {
            // Microseconds from the script; the remaining count follows from `ahead`.
            let us = |x: i64| (x.max(0) as u64).saturating_mul(1000);
            out.ahead[i] = us(v[2 + 3 * i]);
            out.waits[i] = us(v[3 + 3 * i]);
        }
        Ok(out)
    }
}
