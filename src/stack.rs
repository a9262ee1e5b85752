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
//!    for an address after too many failed authentications, before any credential is
//!    checked;
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
//!   quota string).
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
//! tests). A variable that is unset or blank is not configured. Errors name the
//! variable and never repeat a secret value.
//!
//! | variable | meaning | example |
//! |---|---|---|
//! | `PORTCULLIS_TRUSTED_PROXIES` | CIDRs of the proxies whose forwarding header is read | `10.0.0.0/8, fd00::/8` |
//! | `PORTCULLIS_FORWARDED_HEADER` | which header they write: `x-forwarded-for` (default), `forwarded`, `x-real-ip` | `forwarded` |
//! | `PORTCULLIS_ALLOWLIST` | only these CIDRs get in (403 otherwise) | `10.0.0.0/8` |
//! | `PORTCULLIS_DENYLIST` | these CIDRs never get in (wins over the allow list) | `10.9.0.0/16` |
//! | `PORTCULLIS_KEY_FILE` | TOML key file (digests only), reloaded when it changes | `/etc/svc/keys.toml` |
//! | `PORTCULLIS_KEY_FILE_RELOAD_SECS` | how often the key file is checked (default 10, `0` never) | `30` |
//! | `PORTCULLIS_API_KEYS` | comma-separated raw keys (32+ characters each), the simple case | `pc_live_...` |
//! | `PORTCULLIS_API_KEY_SCOPES` | space-separated scopes of the `PORTCULLIS_API_KEYS` keys | `jobs:read jobs:write` |
//! | `PORTCULLIS_JWKS_FILE` | JWK Set of the service-token signers (feature `jwt`) | `/etc/svc/jwks.json` |
//! | `PORTCULLIS_TOKEN_ISSUERS` | comma-separated accepted `iss` values (required with a JWKS file) | `https://ci.example` |
//! | `PORTCULLIS_TOKEN_AUDIENCE` | our `aud` (required with a JWKS file) | `jobs-api` |
//! | `PORTCULLIS_JWKS_RELOAD_SECS` | how often the JWKS file is checked (default 10, `0` never) | `60` |
//! | `PORTCULLIS_RATE_LIMIT` | quotas, see [`parse_quotas`] (default [`DEFAULT_QUOTA`]) | `100/s, 5000/h` |
//! | `PORTCULLIS_AUTH_THROTTLE` | failed authentications allowed per address, one quota (default `10/5m`) | `5/15m` |
//! | `PORTCULLIS_REDIS_URL` | share the rate limits through Redis (feature `redis`); never logged | `redis://redis:6379` |
//! | `PORTCULLIS_REDIS_ON_FAILURE` | when Redis is down: `local` (default, limit in memory), `closed` (503), `open` | `closed` |
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
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::access_log::{AccessLog, AccessLogLayer};
use crate::allowlist::IpAllowlistLayer;
use crate::api_key::{ApiKeys, KeyStore};
use crate::authenticate::{Authenticate, AuthenticateLayer};
#[cfg(doc)]
use crate::client_ip::PeerAddrLayer;
use crate::client_ip::{ClientIpConfig, ClientIpLayer, ClientIpService, ForwardedHeader};
use crate::future::ResponseFuture;
#[cfg(feature = "jwt")]
use crate::jwt::TokenVerifier;
use crate::rate_limit::{
    AuthThrottle, AuthThrottleLayer, Policy, Quota, RateLimit, RateLimitLayer,
};
use crate::rejection::Rejection;
use crate::request_id::{RequestIdLayer, SetRequestId};
use crate::{ConfigError, IpSet, Scopes};

/// The rate limit applied when none is configured: `100/s`.
pub const DEFAULT_QUOTA: &str = "100/s";

/// Environment variable names read by [`StackBuilder::from_env`].
pub mod env {
    /// CIDRs of the trusted proxies.
    pub const TRUSTED_PROXIES: &str = "PORTCULLIS_TRUSTED_PROXIES";
    /// The forwarding header the trusted proxies write.
    pub const FORWARDED_HEADER: &str = "PORTCULLIS_FORWARDED_HEADER";
    /// The allow list (CIDRs).
    pub const ALLOWLIST: &str = "PORTCULLIS_ALLOWLIST";
    /// The deny list (CIDRs).
    pub const DENYLIST: &str = "PORTCULLIS_DENYLIST";
    /// Path of the TOML key file.
    pub const KEY_FILE: &str = "PORTCULLIS_KEY_FILE";
    /// Seconds between checks of the key file (0: never reload).
    pub const KEY_FILE_RELOAD_SECS: &str = "PORTCULLIS_KEY_FILE_RELOAD_SECS";
    /// Comma-separated raw API keys.
    pub const API_KEYS: &str = "PORTCULLIS_API_KEYS";
    /// Space-separated scopes of the raw API keys.
    pub const API_KEY_SCOPES: &str = "PORTCULLIS_API_KEY_SCOPES";
    /// Path of the JWK Set of the service-token signers.
    pub const JWKS_FILE: &str = "PORTCULLIS_JWKS_FILE";
    /// Comma-separated accepted token issuers.
    pub const TOKEN_ISSUERS: &str = "PORTCULLIS_TOKEN_ISSUERS";
    /// Our token audience.
    pub const TOKEN_AUDIENCE: &str = "PORTCULLIS_TOKEN_AUDIENCE";
    /// Seconds between checks of the JWKS file (0: never reload).
    pub const JWKS_RELOAD_SECS: &str = "PORTCULLIS_JWKS_RELOAD_SECS";
    /// The rate-limit quotas.
    pub const RATE_LIMIT: &str = "PORTCULLIS_RATE_LIMIT";
    /// The failed-authentication quota per address.
    pub const AUTH_THROTTLE: &str = "PORTCULLIS_AUTH_THROTTLE";
    /// The Redis URL of the shared rate limits.
    pub const REDIS_URL: &str = "PORTCULLIS_REDIS_URL";
    /// What the rate limiter does when Redis is down.
    pub const REDIS_ON_FAILURE: &str = "PORTCULLIS_REDIS_ON_FAILURE";
}

const DEFAULT_KEY_RELOAD: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// The quota parser
// ---------------------------------------------------------------------------------

/// The longest quota list accepted, in bytes.
const MAX_QUOTA_LIST_LEN: usize = 256;
/// The most quotas in one list (the rate limiter's policy limit).
const MAX_QUOTAS: usize = 4;

/// Parses one quota: `<count>/<window>`, where the window is an optional whole
/// number followed by a unit: `s`, `sec`, `second(s)`; `m`, `min`, `minute(s)`;
/// `h`, `hour(s)`; `d`, `day(s)`. Spaces around the parts are ignored.
///
/// `100/s` is 100 requests per second; `10/5m` is 10 per 5 minutes; `5000/h` 5000
/// per hour. A zero count or window, a window that is not whole seconds, or anything
/// else is an error (the message never repeats the input).
///
/// ```
/// use std::time::Duration;
/// use portcullis::stack::parse_quota;
/// let q = parse_quota("10/5m")?;
/// assert_eq!((q.count(), q.window()), (10, Duration::from_secs(300)));
/// assert!(parse_quota("0/s").is_err());
/// assert!(parse_quota("10 per second").is_err());
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
pub fn parse_quota(s: &str) -> Result<Quota, ConfigError> {
    let (count, window) = s
        .split_once('/')
        .ok_or_else(|| ConfigError::new("quota must look like 100/s or 10/5m"))?;
    let count = parse_number(count.trim())
        .ok_or_else(|| ConfigError::new("quota count must be a whole number"))?;
    if count == 0 {
        return Err(ConfigError::new(
            "quota count must be at least 1 (a zero quota)",
        ));
    }
    let window = window.trim();
    let digits = window.bytes().take_while(u8::is_ascii_digit).count();
    let (n, unit) = window.split_at(digits);
    let n = if n.is_empty() {
        1
    } else {
        parse_number(n).ok_or_else(|| ConfigError::new("quota window must be a whole number"))?
    };
    if n == 0 {
        return Err(ConfigError::new("quota window must be at least 1"));
    }
    let unit_secs: u64 = match unit.trim() {
        "s" | "sec" | "second" | "seconds" => 1,
        "m" | "min" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => {
            return Err(ConfigError::new(
                "quota window unit must be s, m, h or d (e.g. 100/s, 10/5m)",
            ));
        }
    };
    let count = u32::try_from(count)
        .map_err(|_| ConfigError::new("quota count must be at most 1000000000 per window"))?;
    let secs = n
        .checked_mul(unit_secs)
        .ok_or_else(|| ConfigError::new("quota window must be at most 366 days"))?;
    Quota::new(count, Duration::from_secs(secs))
}

/// Parses a comma-separated list of 1 to 4 quotas (see [`parse_quota`]), all
/// enforced together: `100/s, 5000/h` allows bursts of 100 per second but at most
/// 5000 an hour. Two quotas with the same window are an error. Errors name the
/// position of the bad entry.
///
/// ```
/// use portcullis::stack::parse_quotas;
/// let qs = parse_quotas("100/s, 5000/h")?;
/// assert_eq!(qs.len(), 2);
/// let err = parse_quotas("100/s, 0/h").unwrap_err();
/// assert!(err.to_string().contains("quota 2"));
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
pub fn parse_quotas(list: &str) -> Result<Vec<Quota>, ConfigError> {
    if list.len() > MAX_QUOTA_LIST_LEN {
        return Err(ConfigError::new(format!(
            "quota list must be at most {MAX_QUOTA_LIST_LEN} bytes"
        )));
    }
    let mut quotas: Vec<Quota> = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        let n = i + 1;
        if n > MAX_QUOTAS {
            return Err(ConfigError::new(format!(
                "at most {MAX_QUOTAS} quotas in a list"
            )));
        }
        if entry.trim().is_empty() {
            return Err(ConfigError::new(format!("quota {n} is empty")));
        }
        let q = parse_quota(entry).map_err(|e| ConfigError::new(format!("quota {n}: {e}")))?;
        if quotas.iter().any(|p| p.window() == q.window()) {
            return Err(ConfigError::new(format!(
                "quota {n}: another quota has the same window"
            )));
        }
        quotas.push(q);
    }
    Ok(quotas)
}

/// A reload interval in whole seconds (`None`: the default; `0`: never).
fn reload_interval(value: Option<String>, name: &str) -> Result<Option<Duration>, ConfigError> {
    match value {
        None => Ok(Some(DEFAULT_KEY_RELOAD)),
        Some(s) => match parse_number(s.trim()) {
            Some(0) => Ok(None),
            Some(n) => Ok(Some(Duration::from_secs(n))),
            None => Err(ConfigError::new(format!(
                "{name}: must be a whole number of seconds"
            ))),
        },
    }
}

/// A decimal number of at most 10 digits, nothing else (no sign, no separators).
fn parse_number(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The rate-limit policies of a quota list, named after their windows (`per-1s`,
/// `per-3600s`), as they appear in the `RateLimit-Policy` field.
fn policies(quotas: &[Quota]) -> Result<Vec<Policy>, ConfigError> {
    quotas
        .iter()
        .map(|q| Policy::new(&format!("per-{}s", q.window().as_secs()), *q))
        .collect()
}

// ---------------------------------------------------------------------------------
// The builder
// ---------------------------------------------------------------------------------

enum RateLimitChoice {
    Default,
    Quotas(String),
    Layer(RateLimitLayer),
}

/// Builds a [`StackLayer`]; see the [module docs](self).
///
/// String settings are checked by [`build`](Self::build), which reports the first
/// problem; nothing is checked at request time.
pub struct StackBuilder {
    request_id: RequestIdLayer,
    access_log: AccessLogLayer,
    client_ip: Option<ClientIpConfig>,
    trusted_proxies: Option<String>,
    forwarded_header: Option<ForwardedHeader>,
    allow: Option<Result<IpSet, String>>,
    deny: Option<Result<IpSet, String>>,
    api_keys: Option<ApiKeys>,
    #[cfg(feature = "jwt")]
    service_tokens: Option<TokenVerifier>,
    unauthenticated: Option<Scopes>,
    realm: Option<String>,
    throttle: Option<AuthThrottleLayer>,
    rate_limit: RateLimitChoice,
    #[cfg(feature = "redis")]
    redis: Option<crate::rate_limit::redis::RedisLimiter>,
    #[cfg(feature = "jwt")]
    jwks_watcher: Option<Arc<crate::jwt::KeyFileWatcher>>,
    conflict: Option<&'static str>,
}

impl Default for StackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for StackBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("StackBuilder");
        d.field("client_ip", &self.client_ip)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("allowlist", &self.allow.is_some())
            .field("denylist", &self.deny.is_some())
            .field("api_keys", &self.api_keys.is_some());
        #[cfg(feature = "jwt")]
        d.field("service_tokens", &self.service_tokens.is_some());
        d.field("unauthenticated", &self.unauthenticated.is_some())
            .field("auth_throttle", &self.throttle)
            .field(
                "rate_limit",
                &match &self.rate_limit {
                    RateLimitChoice::Default => DEFAULT_QUOTA,
                    RateLimitChoice::Quotas(q) => q.as_str(),
                    RateLimitChoice::Layer(_) => "<layer>",
                },
            );
        #[cfg(feature = "redis")]
        d.field("redis", &self.redis);
        d.finish_non_exhaustive()
    }
}

impl StackBuilder {
    /// An empty configuration: add credentials, then [`build`](Self::build).
    pub fn new() -> Self {
        Self {
            request_id: RequestIdLayer::new(),
            access_log: AccessLogLayer::new(),
            client_ip: None,
            trusted_proxies: None,
            forwarded_header: None,
            allow: None,
            deny: None,
            api_keys: None,
            #[cfg(feature = "jwt")]
            service_tokens: None,
            unauthenticated: None,
            realm: None,
            throttle: Some(AuthThrottleLayer::recommended()),
            rate_limit: RateLimitChoice::Default,
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "jwt")]
            jwks_watcher: None,
            conflict: None,
        }
    }

    /// Reads the configuration from the process environment; see the
    /// [module docs](self) for the variables.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_env_with(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get` (e.g. a map in tests), with the names of
    /// [`from_env`](Self::from_env). Errors name the variable, never a secret value.
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let named =
            |name: &'static str| move |e: ConfigError| ConfigError::new(format!("{name}: {e}"));
        let mut b = Self::new();

        if let Some(v) = get(env::TRUSTED_PROXIES) {
            b = b.client_ip(
                ClientIpConfig::trusted_proxies(&v).map_err(named(env::TRUSTED_PROXIES))?,
            );
        }
        if let Some(v) = get(env::FORWARDED_HEADER) {
            let header = match v.trim().to_ascii_lowercase().as_str() {
                "x-forwarded-for" => ForwardedHeader::XForwardedFor,
                "forwarded" => ForwardedHeader::Forwarded,
                "x-real-ip" => ForwardedHeader::XRealIp,
                _ => {
                    return Err(ConfigError::new(format!(
                        "{}: must be x-forwarded-for, forwarded or x-real-ip",
                        env::FORWARDED_HEADER
                    )));
                }
            };
            if get(env::TRUSTED_PROXIES).is_none() {
                return Err(ConfigError::new(format!(
                    "{} needs {}: headers are read only from trusted proxies",
                    env::FORWARDED_HEADER,
                    env::TRUSTED_PROXIES
                )));
            }
            b = b.forwarded_header(header);
        }
        if let Some(v) = get(env::ALLOWLIST) {
            b = b.allow(IpSet::parse(&v).map_err(named(env::ALLOWLIST))?);
        }
        if let Some(v) = get(env::DENYLIST) {
            b = b.deny(IpSet::parse(&v).map_err(named(env::DENYLIST))?);
        }

        match (get(env::KEY_FILE), get(env::API_KEYS)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(format!(
                    "{} and {} exclude each other: set one",
                    env::KEY_FILE,
                    env::API_KEYS
                )));
            }
            (Some(path), None) => {
                if get(env::API_KEY_SCOPES).is_some() {
                    return Err(ConfigError::new(format!(
                        "{} applies to {} only: the key file names each key's scopes",
                        env::API_KEY_SCOPES,
                        env::API_KEYS
                    )));
                }
                let every =
                    reload_interval(get(env::KEY_FILE_RELOAD_SECS), env::KEY_FILE_RELOAD_SECS)?;
                let mut keys = ApiKeys::from_file(path).map_err(named(env::KEY_FILE))?;
                if let Some(every) = every {
                    keys = keys.reload_every(every).map_err(named(env::KEY_FILE))?;
                }
                b = b.api_keys(keys);
            }
            (None, Some(list)) => {
                let scopes = match get(env::API_KEY_SCOPES) {
                    Some(s) => Scopes::parse(&s).map_err(named(env::API_KEY_SCOPES))?,
                    None => Scopes::default(),
                };
                let store = KeyStore::from_key_list(&list, scopes).map_err(named(env::API_KEYS))?;
                b = b.api_keys(ApiKeys::new(store));
            }
            (None, None) => {
                if get(env::API_KEY_SCOPES).is_some() {
                    return Err(ConfigError::new(format!(
                        "{} is set but {} is not",
                        env::API_KEY_SCOPES,
                        env::API_KEYS
                    )));
                }
            }
        }

        b = b.tokens_from_env(&get)?;

        if let Some(v) = get(env::RATE_LIMIT) {
            parse_quotas(&v).map_err(named(env::RATE_LIMIT))?;
            b = b.quotas(&v);
        }
        if let Some(v) = get(env::AUTH_THROTTLE) {
            let q = parse_quota(&v).map_err(named(env::AUTH_THROTTLE))?;
            b = b.auth_throttle(AuthThrottleLayer::new(q));
        }
        b = b.redis_from_env(&get)?;
        Ok(b)
    }

    #[cfg(feature = "jwt")]
    fn tokens_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        use crate::jwt::KeyFile;
        let file = get(env::JWKS_FILE);
        let issuers = get(env::TOKEN_ISSUERS);
        let audience = get(env::TOKEN_AUDIENCE);
        if file.is_none() && issuers.is_none() && audience.is_none() {
            if get(env::JWKS_RELOAD_SECS).is_some() {
                return Err(ConfigError::new(format!(
                    "{} is set but {} is not",
                    env::JWKS_RELOAD_SECS,
                    env::JWKS_FILE
                )));
            }
            return Ok(self);
        }
        let need = |v: Option<String>, name: &str| {
            v.ok_or_else(|| {
                ConfigError::new(format!(
                    "service tokens need {}, {} and {}: {name} is not set",
                    env::JWKS_FILE,
                    env::TOKEN_ISSUERS,
                    env::TOKEN_AUDIENCE
                ))
            })
        };
        let file = need(file, env::JWKS_FILE)?;
        let issuers = need(issuers, env::TOKEN_ISSUERS)?;
        let audience = need(audience, env::TOKEN_AUDIENCE)?;
        let mut builder = TokenVerifier::builder()
            .key_file(KeyFile::jwks(file))
            .audience(audience.trim());
        for (i, iss) in issuers.split(',').enumerate() {
            let iss = iss.trim();
            if iss.is_empty() {
                return Err(ConfigError::new(format!(
                    "{}: entry {} is empty",
                    env::TOKEN_ISSUERS,
                    i + 1
                )));
            }
            builder = builder.issuer(iss);
        }
        let every = reload_interval(get(env::JWKS_RELOAD_SECS), env::JWKS_RELOAD_SECS)?;
        let verifier = builder
            .build()
            .map_err(|e| ConfigError::new(format!("{}: {e}", env::JWKS_FILE)))?;
        let mut this = self;
        if let Some(every) = every {
            let watcher = verifier.watch_key_files(every).map_err(|e| {
                ConfigError::new(format!(
                    "{}: cannot start the reload thread: {e}",
                    env::JWKS_FILE
                ))
            })?;
            this.jwks_watcher = Some(Arc::new(watcher));
        }
        Ok(this.service_tokens(verifier))
    }

    #[cfg(not(feature = "jwt"))]
    fn tokens_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        for name in [
            env::JWKS_FILE,
            env::TOKEN_ISSUERS,
            env::TOKEN_AUDIENCE,
            env::JWKS_RELOAD_SECS,
        ] {
            if get(name).is_some() {
                return Err(ConfigError::new(format!(
                    "{name} is set but portcullis was built without the jwt feature"
                )));
            }
        }
        Ok(self)
    }

    #[cfg(feature = "redis")]
    fn redis_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        use crate::rate_limit::redis::{FailurePolicy, RedisLimiter};
        let policy = match get(env::REDIS_ON_FAILURE) {
            None => FailurePolicy::FallbackLocal,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "local" => FailurePolicy::FallbackLocal,
                "closed" => FailurePolicy::FailClosed,
                "open" => FailurePolicy::FailOpen,
                _ => {
                    return Err(ConfigError::new(format!(
                        "{}: must be local, closed or open",
                        env::REDIS_ON_FAILURE
                    )));
                }
            },
        };
        let Some(url) = get(env::REDIS_URL) else {
            if get(env::REDIS_ON_FAILURE).is_some() {
                return Err(ConfigError::new(format!(
                    "{} is set but {} is not",
                    env::REDIS_ON_FAILURE,
                    env::REDIS_URL
                )));
            }
            return Ok(self);
        };
        // The URL may hold a password: errors name the variable only (the limiter's
        // own errors never repeat the URL either).
        let limiter = RedisLimiter::builder(url.trim(), policy)
            .and_then(|b| b.build())
            .map_err(|e| ConfigError::new(format!("{}: {e}", env::REDIS_URL)))?;
        Ok(self.redis(limiter))
    }

    #[cfg(not(feature = "redis"))]
    fn redis_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        for name in [env::REDIS_URL, env::REDIS_ON_FAILURE] {
            if get(name).is_some() {
                return Err(ConfigError::new(format!(
                    "{name} is set but portcullis was built without the redis feature"
                )));
            }
        }
        Ok(self)
    }

    /// Replaces the request-id layer (e.g. another header name).
    pub fn request_id(mut self, layer: RequestIdLayer) -> Self {
        self.request_id = layer;
        self
    }

    /// Replaces the access-log layer (e.g. more sensitive headers, a request span).
    pub fn access_log(mut self, layer: AccessLogLayer) -> Self {
        self.access_log = layer;
        self
    }

    /// How the client address is found (default: the TCP peer only). Conflicts with
    /// [`trusted_proxies`](Self::trusted_proxies).
    pub fn client_ip(mut self, config: ClientIpConfig) -> Self {
        self.client_ip = Some(config);
        self
    }

    /// Reads the forwarding header from peers inside these comma-separated CIDRs
    /// (checked by [`build`](Self::build)).
    pub fn trusted_proxies(mut self, cidrs: &str) -> Self {
        self.trusted_proxies = Some(cidrs.to_owned());
        self
    }

    /// Which forwarding header the trusted proxies write (default
    /// `X-Forwarded-For`).
    pub fn forwarded_header(mut self, header: ForwardedHeader) -> Self {
        self.forwarded_header = Some(header);
        self
    }

    /// Only these comma-separated CIDRs get in (checked by [`build`](Self::build)).
    pub fn allowlist(mut self, cidrs: &str) -> Self {
        self.allow = Some(IpSet::parse(cidrs).map_err(|e| e.to_string()));
        self
    }

    /// Only these networks get in.
    pub fn allow(mut self, set: IpSet) -> Self {
        self.allow = Some(Ok(set));
        self
    }

    /// These comma-separated CIDRs never get in, even when allowed (checked by
    /// [`build`](Self::build)). Without an allow list, every other address is
    /// allowed.
    pub fn denylist(mut self, cidrs: &str) -> Self {
        self.deny = Some(IpSet::parse(cidrs).map_err(|e| e.to_string()));
        self
    }

    /// These networks never get in.
    pub fn deny(mut self, set: IpSet) -> Self {
        self.deny = Some(Ok(set));
        self
    }

    /// Authenticates with these API keys.
    pub fn api_keys(mut self, keys: ApiKeys) -> Self {
        self.api_keys = Some(keys);
        self
    }

    /// Authenticates with service tokens (JWT) checked by `verifier`; with API keys
    /// too, a `Bearer` credential shaped like a JWT goes to the verifier.
    #[cfg(feature = "jwt")]
    pub fn service_tokens(mut self, verifier: TokenVerifier) -> Self {
        self.service_tokens = Some(verifier);
        self
    }

    /// Lets **every request in without authentication** (see
    /// [`AuthenticateLayer::allow_unauthenticated_requests_dangerously`]). For local
    /// development only; cannot be combined with credentials.
    pub fn allow_unauthenticated_requests_dangerously(mut self, scopes: Scopes) -> Self {
        self.unauthenticated = Some(scopes);
        self
    }

    /// The realm of the `WWW-Authenticate` challenges (default `api`).
    pub fn realm(mut self, realm: &str) -> Self {
        self.realm = Some(realm.to_owned());
        self
    }

    /// Replaces the failed-authentication throttle (default
    /// [`AuthThrottleLayer::recommended`]).
    pub fn auth_throttle(mut self, layer: AuthThrottleLayer) -> Self {
        self.throttle = Some(layer);
        self
    }

    /// Removes the failed-authentication throttle: a client may then guess
    /// credentials as fast as the rate limit lets it. Logged as a warning on the
    /// audit target when the stack is built. Use only when something in front
    /// throttles failures already.
    pub fn disable_auth_throttle_dangerously(mut self) -> Self {
        self.throttle = None;
        self
    }

    /// The rate-limit quotas, parsed by [`parse_quotas`] at build time (default
    /// [`DEFAULT_QUOTA`]), keyed per principal, else per client address.
    pub fn quotas(mut self, quotas: &str) -> Self {
        if matches!(self.rate_limit, RateLimitChoice::Layer(_)) {
            self.conflict = Some("set either quotas or a whole rate-limit layer, not both");
        }
        self.rate_limit = RateLimitChoice::Quotas(quotas.to_owned());
        self
    }

    /// Replaces the rate limiter with a fully configured one (tiers, per-principal
    /// overrides, a key function, Redis ...).
    pub fn rate_limit(mut self, layer: RateLimitLayer) -> Self {
        if matches!(self.rate_limit, RateLimitChoice::Quotas(_)) {
            self.conflict = Some("set either quotas or a whole rate-limit layer, not both");
        }
        self.rate_limit = RateLimitChoice::Layer(layer);
        self
    }

    /// Keeps the [`quotas`](Self::quotas) in Redis, shared by every instance. Not
    /// with a whole [`rate_limit`](Self::rate_limit) layer (configure Redis on it).
    #[cfg(feature = "redis")]
    pub fn redis(mut self, limiter: crate::rate_limit::redis::RedisLimiter) -> Self {
        self.redis = Some(limiter);
        self
    }

    /// Checks the configuration and builds the stack.
    ///
    /// Errors: no credentials and not the unauthenticated mode; credentials together
    /// with the unauthenticated mode; an allow, deny or trusted-proxy list that does
    /// not parse; a bad quota; contradicting settings.
    pub fn build(self) -> Result<StackLayer, ConfigError> {
        if let Some(conflict) = self.conflict {
            return Err(ConfigError::new(format!("stack: {conflict}")));
        }

        // Client address.
        let mut client_ip = match (&self.trusted_proxies, self.client_ip) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    "stack: set either trusted_proxies or a client_ip configuration, not both",
                ));
            }
            (Some(cidrs), None) => ClientIpConfig::trusted_proxies(cidrs)
                .map_err(|e| ConfigError::new(format!("trusted proxies: {e}")))?,
            (None, Some(config)) => config,
            (None, None) => ClientIpConfig::peer_only(),
        };
        if let Some(header) = self.forwarded_header {
            if client_ip == ClientIpConfig::peer_only() {
                return Err(ConfigError::new(
                    "forwarded header set without trusted proxies: headers are read only from trusted proxies",
                ));
            }
            client_ip = client_ip.header(header);
        }

        // Allow and deny lists.
        let allow = self
            .allow
            .transpose()
            .map_err(|e| ConfigError::new(format!("allowlist: {e}")))?;
        let deny = self
            .deny
            .transpose()
            .map_err(|e| ConfigError::new(format!("denylist: {e}")))?;
        let allowlist = match (allow, deny) {
            (None, None) => None,
            (Some(allow), deny) => Some((allow, deny)),
            (None, Some(deny)) => Some((
                IpSet::parse("0.0.0.0/0, ::/0").expect("static networks"),
                Some(deny),
            )),
        }
        .map(|(allow, deny)| {
            let layer = IpAllowlistLayer::new(allow);
            match deny {
                Some(deny) => layer.deny(deny),
                None => layer,
            }
        });

        // Authentication.
        #[cfg(feature = "jwt")]
        let has_tokens = self.service_tokens.is_some();
        #[cfg(not(feature = "jwt"))]
        let has_tokens = false;
        let auth = match (self.unauthenticated, self.api_keys) {
            (Some(_), Some(_)) => None,
            (Some(_), None) if has_tokens => None,
            (Some(scopes), None) => {
                Some(AuthenticateLayer::allow_unauthenticated_requests_dangerously(scopes))
            }
            (None, Some(keys)) => {
                let layer = AuthenticateLayer::api_keys(keys);
                #[cfg(feature = "jwt")]
                let layer = match self.service_tokens {
                    Some(v) => layer.with_service_tokens(v),
                    None => layer,
                };
                Some(layer)
            }
            (None, None) => {
                #[cfg(feature = "jwt")]
                let layer = self.service_tokens.map(AuthenticateLayer::service_tokens);
                #[cfg(not(feature = "jwt"))]
                let layer: Option<AuthenticateLayer> = None;
                match layer {
                    Some(layer) => Some(layer),
                    None => {
                        return Err(ConfigError::new(
                            "stack: no credentials configured: give API keys or service tokens \
                             (or call allow_unauthenticated_requests_dangerously for local development)",
                        ));
                    }
                }
            }
        };
        let Some(mut auth) = auth else {
            return Err(ConfigError::new(
                "stack: the unauthenticated mode cannot be combined with credentials",
            ));
        };
        if let Some(realm) = &self.realm {
            auth = auth.realm(realm)?;
        }

        // Throttle.
        if self.throttle.is_none() {
            tracing::warn!(
                target: crate::audit::TARGET,
                event = "auth_throttle_disabled",
                "FAILED-AUTHENTICATION THROTTLING IS DISABLED: credentials can be guessed at the rate limit"
            );
        }

        // Rate limit.
        let rate_limit = match self.rate_limit {
            RateLimitChoice::Layer(layer) => {
                #[cfg(feature = "redis")]
                if self.redis.is_some() {
                    return Err(ConfigError::new(
                        "stack: Redis goes on the rate-limit layer given to rate_limit, not on the stack",
                    ));
                }
                layer
            }
            choice => {
                let list = match &choice {
                    RateLimitChoice::Quotas(q) => q.as_str(),
                    _ => DEFAULT_QUOTA,
                };
                let quotas =
                    parse_quotas(list).map_err(|e| ConfigError::new(format!("rate limit: {e}")))?;
                let mut builder = RateLimitLayer::builder();
                for p in policies(&quotas)? {
                    builder = builder.policy(p);
                }
                #[cfg(feature = "redis")]
                if let Some(redis) = self.redis {
                    builder = builder.redis(redis);
                }
                builder.build()?
            }
        };

        Ok(StackLayer {
            #[cfg(feature = "jwt")]
            _jwks_watcher: self.jwks_watcher,
            layers: Arc::new(Layers {
                request_id: self.request_id,
                access_log: self.access_log,
                client_ip: ClientIpLayer::new(client_ip),
                allowlist,
                throttle: self.throttle,
                auth,
                rate_limit,
            }),
        })
    }
}

// ---------------------------------------------------------------------------------
// The layer and the service
// ---------------------------------------------------------------------------------

/// The whole stack as one [`Layer`]; build it with [`StackLayer::builder`] or
/// [`StackBuilder::from_env`]. Cloning is cheap (the layers share their state), so
/// clone it per connection.
#[derive(Clone)]
pub struct StackLayer {
    /// Reloads the JWKS file configured from the environment while a clone lives.
    #[cfg(feature = "jwt")]
    _jwks_watcher: Option<Arc<crate::jwt::KeyFileWatcher>>,
    /// Shared with every [`Stack`] this layer makes.
    layers: Arc<Layers>,
}

impl fmt::Debug for StackLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.layers.fmt(f)
    }
}

impl fmt::Debug for Layers {
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

impl StackLayer {
    /// A new [`StackBuilder`].
    pub fn builder() -> StackBuilder {
        StackBuilder::new()
    }

    /// The rate limiter, e.g. for its [`stats`](RateLimitLayer::stats).
    pub fn rate_limit(&self) -> &RateLimitLayer {
        &self.layers.rate_limit
    }

    /// The failed-authentication throttle, `None` when disabled.
    pub fn auth_throttle(&self) -> Option<&AuthThrottleLayer> {
        self.layers.throttle.as_ref()
    }
}

/// The service inside the access log: client address, throttle, authentication,
/// rate limit. The allowlist has no place in the stack's future: it refuses at once
/// (a refusal is the client-address future's ready response) or passes the request
/// on, so it has nothing to do when the response comes back.
type Guarded<S> = ClientIpService<Toggle<Authenticated<S>, AuthThrottle<Authenticated<S>>>>;
type Authenticated<S> = Authenticate<RateLimit<S>>;
type Inner<S> = SetRequestId<AccessLog<Guarded<S>>>;

impl<S> Layer<S> for StackLayer {
    type Service = Stack<S>;

    fn layer(&self, inner: S) -> Stack<S> {
        Stack {
            layers: self.layers.clone(),
            inner,
        }
    }
}

/// The settings of a [`Stack`]'s layers, behind one reference count: a clone of
/// the service (axum clones it for every request) costs one increment, not one per
/// layer. Each layer's work is its own module's, the same code as the layer alone.
struct Layers {
    request_id: RequestIdLayer,
    access_log: AccessLogLayer,
    client_ip: ClientIpLayer,
    allowlist: Option<IpAllowlistLayer>,
    throttle: Option<AuthThrottleLayer>,
    auth: AuthenticateLayer,
    rate_limit: RateLimitLayer,
}

/// The service of [`StackLayer`]: request id, access log, client address,
/// allowlist, failed-authentication throttle, authentication and rate limit around
/// `S`. Works with any response body that implements `From<Bytes>`
/// (`http_body_util::Full<Bytes>`, `axum::body::Body`).
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
pub struct Stack<S> {
    layers: Arc<Layers>,
    inner: S,
}

impl<S: Clone> Clone for Stack<S> {
    fn clone(&self) -> Self {
        Self {
            layers: self.layers.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S> fmt::Debug for Stack<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Stack<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = <Inner<S> as Service<Request<ReqBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    // Inlined into the caller, which usually boxes the future (axum does): one copy
    // of it fewer on its way into the box.
    #[inline]
    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The futures of the layers nested one by one, in the same order (`Inner<S>`;
        // the allowlist needs none), without a service per layer. The client
        // address, allowlist and authentication work on the request in place (it is
        // not small), and the address resolved once is handed to the layers after it.
        let l = &*self.layers;
        let inner = &mut self.inner;
        crate::request_id::call_with(&l.request_id.header, req, |req| {
            crate::access_log::call_with(&l.access_log.config, req, |mut req| {
                let ip = match crate::client_ip::resolve_into(&l.client_ip.config, &mut req) {
                    Ok(ip) => ip,
                    Err(crate::client_ip::NoPeer) => {
                        return ResponseFuture::rejected(
                            Rejection::misconfigured().into_response(),
                        );
                    }
                };
                if let Some(a) = &l.allowlist
                    && let Err(reason) = crate::allowlist::admit(&a.policy, ip)
                {
                    let res = Rejection::forbidden(reason).into_response();
                    return ResponseFuture::rejected_with(res, ip);
                }
                let auth = &l.auth.config;
                let mut authenticated =
                    |mut req| match crate::authenticate::admit(auth, &mut req, ip) {
                        Ok(principal) => ResponseFuture::inner_with(
                            crate::rate_limit::call_with(&l.rate_limit.shared, inner, req),
                            Some(principal),
                        ),
                        Err(reason) => {
                            ResponseFuture::rejected(auth.rejection(reason).into_response())
                        }
                    };
                let future = match &l.throttle {
                    Some(t) => ToggleFuture::On {
                        future: crate::rate_limit::auth_throttle::call_with(
                            &t.shared,
                            req,
                            authenticated,
                        ),
                    },
                    None => ToggleFuture::Off {
                        future: authenticated(req),
                    },
                };
                ResponseFuture::inner_with(future, ip)
            })
        })
    }
}

/// An optional layer of the stack: `On` wraps the service in the layer, `Off` is
/// the service itself.
#[derive(Clone, Debug)]
pub enum Toggle<S, L> {
    /// The layer is off: requests go straight to the service.
    Off(S),
    /// The layer is on.
    On(L),
}

impl<S, L, ReqBody, ResBody> Service<Request<ReqBody>> for Toggle<S, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    L: Service<Request<ReqBody>, Response = Response<ResBody>, Error = S::Error>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ToggleFuture<S::Future, L::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Toggle::Off(s) => s.poll_ready(cx),
            Toggle::On(l) => l.poll_ready(cx),
        }
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self {
            Toggle::Off(s) => ToggleFuture::Off {
                future: s.call(req),
            },
            Toggle::On(l) => ToggleFuture::On {
                future: l.call(req),
            },
        }
    }
}

pin_project! {
    /// Response future of [`Toggle`].
    #[project = ToggleProj]
    #[allow(missing_docs)]
    pub enum ToggleFuture<A, B> {
        /// The layer is off.
        Off { #[pin] future: A },
        /// The layer is on.
        On { #[pin] future: B },
    }
}

impl<A, B, T> Future for ToggleFuture<A, B>
where
    A: Future<Output = T>,
    B: Future<Output = T>,
{
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.project() {
            ToggleProj::Off { future } => future.poll(cx),
            ToggleProj::On { future } => future.poll(cx),
        }
    }
}

impl<A, B> fmt::Debug for ToggleFuture<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ToggleFuture::Off { .. } => "ToggleFuture::Off",
            ToggleFuture::On { .. } => "ToggleFuture::On",
        })
    }
}
