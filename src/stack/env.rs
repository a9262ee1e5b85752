//! The `PORTCULLIS_*` environment variables read by [`StackBuilder::from_env`].

use std::time::Duration;

use super::StackBuilder;
use crate::api_key::{ApiKeys, KeyStore};
use crate::auth_throttle::AuthThrottleLayer;
use crate::client_ip::{ClientIpConfig, ForwardedHeader};
use crate::rate_limit::Quota;
use crate::rate_limit::quota::{parse_list, parse_number};
use crate::{ConfigError, IpSet, Scopes};

/// CIDRs of the trusted proxies.
const TRUSTED_PROXIES: &str = "PORTCULLIS_TRUSTED_PROXIES";
/// The forwarding header the trusted proxies write.
const FORWARDED_HEADER: &str = "PORTCULLIS_FORWARDED_HEADER";
/// The allow list (CIDRs).
const ALLOWLIST: &str = "PORTCULLIS_ALLOWLIST";
/// The deny list (CIDRs).
const DENYLIST: &str = "PORTCULLIS_DENYLIST";
/// Path of the TOML key file.
const KEY_FILE: &str = "PORTCULLIS_KEY_FILE";
/// Seconds between checks of the key file (0: never reload).
const KEY_FILE_RELOAD_SECS: &str = "PORTCULLIS_KEY_FILE_RELOAD_SECS";
/// Comma-separated raw API keys.
const API_KEYS: &str = "PORTCULLIS_API_KEYS";
/// Space-separated scopes of the raw API keys.
const API_KEY_SCOPES: &str = "PORTCULLIS_API_KEY_SCOPES";
/// Path of the JWK Set of the service-token signers.
const JWKS_FILE: &str = "PORTCULLIS_JWKS_FILE";
/// Comma-separated accepted token issuers.
const TOKEN_ISSUERS: &str = "PORTCULLIS_TOKEN_ISSUERS";
/// Our token audience.
const TOKEN_AUDIENCE: &str = "PORTCULLIS_TOKEN_AUDIENCE";
/// Seconds between checks of the JWKS file (0: never reload).
const JWKS_RELOAD_SECS: &str = "PORTCULLIS_JWKS_RELOAD_SECS";
/// The rate-limit quotas.
const RATE_LIMIT: &str = "PORTCULLIS_RATE_LIMIT";
/// The failed-authentication quota per address.
const AUTH_THROTTLE: &str = "PORTCULLIS_AUTH_THROTTLE";
/// The Redis URL of the shared rate limits.
const REDIS_URL: &str = "PORTCULLIS_REDIS_URL";
/// What the rate limiter does when Redis is down.
const REDIS_ON_FAILURE: &str = "PORTCULLIS_REDIS_ON_FAILURE";

const DEFAULT_KEY_RELOAD: Duration = Duration::from_secs(10);

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

impl StackBuilder {
    /// Reads the configuration from the process environment; see the
    /// [module docs](crate::stack) for the variables.
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

        if let Some(v) = get(TRUSTED_PROXIES) {
            b = b.client_ip(ClientIpConfig::trusted_proxies(&v).map_err(named(TRUSTED_PROXIES))?);
        }
        if let Some(v) = get(FORWARDED_HEADER) {
            let header = match v.trim().to_ascii_lowercase().as_str() {
                "x-forwarded-for" => ForwardedHeader::XForwardedFor,
                "forwarded" => ForwardedHeader::Forwarded,
                "x-real-ip" => ForwardedHeader::XRealIp,
                _ => {
                    return Err(ConfigError::new(format!(
                        "{}: must be x-forwarded-for, forwarded or x-real-ip",
                        FORWARDED_HEADER
                    )));
                }
            };
            if get(TRUSTED_PROXIES).is_none() {
                return Err(ConfigError::new(format!(
                    "{} needs {}: headers are read only from trusted proxies",
                    FORWARDED_HEADER, TRUSTED_PROXIES
                )));
            }
            b = b.forwarded_header(header);
        }
        if let Some(v) = get(ALLOWLIST) {
            b = b.allow(IpSet::parse(&v).map_err(named(ALLOWLIST))?);
        }
        if let Some(v) = get(DENYLIST) {
            b = b.deny(IpSet::parse(&v).map_err(named(DENYLIST))?);
        }

        match (get(KEY_FILE), get(API_KEYS)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(format!(
                    "{} and {} exclude each other: set one",
                    KEY_FILE, API_KEYS
                )));
            }
            (Some(path), None) => {
                if get(API_KEY_SCOPES).is_some() {
                    return Err(ConfigError::new(format!(
                        "{} applies to {} only: the key file names each key's scopes",
                        API_KEY_SCOPES, API_KEYS
                    )));
                }
                let every = reload_interval(get(KEY_FILE_RELOAD_SECS), KEY_FILE_RELOAD_SECS)?;
                let keys = ApiKeys::from_file(path).map_err(named(KEY_FILE))?;
                if let Some(every) = every {
                    b = b.keep_reloading(keys.watch_key_file(every).map_err(named(KEY_FILE))?);
                }
                b = b.api_keys(keys);
            }
            (None, Some(list)) => {
                let scopes = match get(API_KEY_SCOPES) {
                    Some(s) => Scopes::parse(&s).map_err(named(API_KEY_SCOPES))?,
                    None => Scopes::default(),
                };
                let store = KeyStore::from_key_list(&list, scopes).map_err(named(API_KEYS))?;
                b = b.api_keys(ApiKeys::new(store));
            }
            (None, None) => {
                if get(API_KEY_SCOPES).is_some() {
                    return Err(ConfigError::new(format!(
                        "{} is set but {} is not",
                        API_KEY_SCOPES, API_KEYS
                    )));
                }
            }
        }

        b = b.tokens_from_env(&get)?;

        if let Some(v) = get(RATE_LIMIT) {
            parse_list(&v).map_err(named(RATE_LIMIT))?;
            b = b.quotas(&v);
        }
        if let Some(v) = get(AUTH_THROTTLE) {
            let q: Quota = v.parse().map_err(named(AUTH_THROTTLE))?;
            b = b.auth_throttle(AuthThrottleLayer::new(q));
        }
        b = b.redis_from_env(&get)?;
        Ok(b)
    }

    #[cfg(feature = "jwt")]
    fn tokens_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        use crate::jwt::KeyFile;
        let file = get(JWKS_FILE);
        let issuers = get(TOKEN_ISSUERS);
        let audience = get(TOKEN_AUDIENCE);
        if file.is_none() && issuers.is_none() && audience.is_none() {
            if get(JWKS_RELOAD_SECS).is_some() {
                return Err(ConfigError::new(format!(
                    "{} is set but {} is not",
                    JWKS_RELOAD_SECS, JWKS_FILE
                )));
            }
            return Ok(self);
        }
        let need = |v: Option<String>, name: &str| {
            v.ok_or_else(|| {
                ConfigError::new(format!(
                    "service tokens need {}, {} and {}: {name} is not set",
                    JWKS_FILE, TOKEN_ISSUERS, TOKEN_AUDIENCE
                ))
            })
        };
        let file = need(file, JWKS_FILE)?;
        let issuers = need(issuers, TOKEN_ISSUERS)?;
        let audience = need(audience, TOKEN_AUDIENCE)?;
        let mut builder = crate::jwt::TokenVerifier::builder()
            .key_file(KeyFile::jwks(file))
            .audience(audience.trim());
        for (i, iss) in issuers.split(',').enumerate() {
            let iss = iss.trim();
            if iss.is_empty() {
                return Err(ConfigError::new(format!(
                    "{}: entry {} is empty",
                    TOKEN_ISSUERS,
                    i + 1
                )));
            }
            builder = builder.issuer(iss);
        }
        let every = reload_interval(get(JWKS_RELOAD_SECS), JWKS_RELOAD_SECS)?;
        let verifier = builder
            .build()
            .map_err(|e| ConfigError::new(format!("{}: {e}", JWKS_FILE)))?;
        let mut this = self;
        if let Some(every) = every {
            let reloading = verifier
                .watch_key_files(every)
                .map_err(|e| ConfigError::new(format!("{}: {e}", JWKS_FILE)))?;
            this = this.keep_reloading(reloading);
        }
        Ok(this.service_tokens(verifier))
    }

    #[cfg(not(feature = "jwt"))]
    fn tokens_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        for name in [JWKS_FILE, TOKEN_ISSUERS, TOKEN_AUDIENCE, JWKS_RELOAD_SECS] {
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
        let policy = match get(REDIS_ON_FAILURE) {
            None => FailurePolicy::FallbackLocal,
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "local" => FailurePolicy::FallbackLocal,
                "closed" => FailurePolicy::FailClosed,
                "open" => FailurePolicy::FailOpen,
                _ => {
                    return Err(ConfigError::new(format!(
                        "{}: must be local, closed or open",
                        REDIS_ON_FAILURE
                    )));
                }
            },
        };
        let Some(url) = get(REDIS_URL) else {
            if get(REDIS_ON_FAILURE).is_some() {
                return Err(ConfigError::new(format!(
                    "{} is set but {} is not",
                    REDIS_ON_FAILURE, REDIS_URL
                )));
            }
            return Ok(self);
        };
        // The URL may hold a password: errors name the variable only (the limiter's
        // own errors never repeat the URL either).
        let limiter = RedisLimiter::builder(url.trim(), policy)
            .and_then(|b| b.build())
            .map_err(|e| ConfigError::new(format!("{}: {e}", REDIS_URL)))?;
        Ok(self.redis(limiter))
    }

    #[cfg(not(feature = "redis"))]
    fn redis_from_env(self, get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        for name in [REDIS_URL, REDIS_ON_FAILURE] {
            if get(name).is_some() {
                return Err(ConfigError::new(format!(
                    "{name} is set but portcullis was built without the redis feature"
                )));
            }
        }
        Ok(self)
    }
}
