//! The `PORTCULLIS_*` environment variables read by [`StackBuilder::from_env`].
//!
//! Every known variable is read once, as raw bytes. A variable that is set must hold a
//! valid value: one that is not UTF-8, empty or blank, or that does not parse, is a
//! [`ConfigError`] naming the variable (never its value), and so is a variable that
//! only means something together with another one that is not set. Nothing that is
//! set is ever read as unset.

use std::collections::HashMap;
use std::ffi::OsString;
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
/// Comma-separated issuer URLs whose keys are found by OpenID Connect discovery.
const OIDC_ISSUERS: &str = "PORTCULLIS_OIDC_ISSUERS";
/// PEM root certificates trusted for the discovery issuers instead of the platform's.
const OIDC_ROOTS_FILE: &str = "PORTCULLIS_OIDC_ROOTS_FILE";
/// Whether the build waits for the discovery issuers' first fetch.
const OIDC_START: &str = "PORTCULLIS_OIDC_START";
/// The rate-limit quotas.
const RATE_LIMIT: &str = "PORTCULLIS_RATE_LIMIT";
/// The failed-authentication quota per address.
const AUTH_THROTTLE: &str = "PORTCULLIS_AUTH_THROTTLE";
/// The Redis URL of the shared rate limits and failed-authentication counts.
const REDIS_URL: &str = "PORTCULLIS_REDIS_URL";
/// What the rate limiter does when Redis is down.
const REDIS_ON_FAILURE: &str = "PORTCULLIS_REDIS_ON_FAILURE";
/// Milliseconds one Redis call may take before the failure policy applies.
const REDIS_TIMEOUT_MS: &str = "PORTCULLIS_REDIS_TIMEOUT_MS";
/// Milliseconds one connection attempt to Redis (TCP, TLS, `AUTH`) may take.
const REDIS_CONNECT_TIMEOUT_MS: &str = "PORTCULLIS_REDIS_CONNECT_TIMEOUT_MS";
/// Whether every accepted credential is an audit event too (`true` or `false`).
const AUDIT_SUCCESSES: &str = "PORTCULLIS_AUDIT_SUCCESSES";

/// Every variable [`StackBuilder::from_env`] reads, in the order of the table in the
/// [module docs](crate::stack).
pub(crate) const ALL: [&str; 22] = [
    TRUSTED_PROXIES,
    FORWARDED_HEADER,
    ALLOWLIST,
    DENYLIST,
    KEY_FILE,
    KEY_FILE_RELOAD_SECS,
    API_KEYS,
    API_KEY_SCOPES,
    JWKS_FILE,
    TOKEN_ISSUERS,
    TOKEN_AUDIENCE,
    JWKS_RELOAD_SECS,
    OIDC_ISSUERS,
    OIDC_ROOTS_FILE,
    OIDC_START,
    RATE_LIMIT,
    AUTH_THROTTLE,
    REDIS_URL,
    REDIS_ON_FAILURE,
    REDIS_TIMEOUT_MS,
    REDIS_CONNECT_TIMEOUT_MS,
    AUDIT_SUCCESSES,
];

/// The variables that are set, each checked to be UTF-8 and not blank.
struct Vars(HashMap<&'static str, String>);

impl Vars {
    fn read(get: impl Fn(&str) -> Option<OsString>) -> Result<Self, ConfigError> {
        let mut set = HashMap::new();
        for name in ALL {
            let Some(raw) = get(name) else { continue };
            let Ok(value) = raw.into_string() else {
                return Err(ConfigError::new(format!("{name}: is not valid UTF-8")));
            };
            if value.trim().is_empty() {
                return Err(ConfigError::new(format!(
                    "{name}: is set but empty; unset it to leave the setting out"
                )));
            }
            set.insert(name, value);
        }
        Ok(Self(set))
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// An error unless `name` is unset: it means something only with `needs`.
    fn unused(&self, name: &str, needs: &str) -> Result<(), ConfigError> {
        match self.0.contains_key(name) {
            true => Err(ConfigError::new(format!(
                "{name} is set but {needs} is not"
            ))),
            false => Ok(()),
        }
    }
}

/// The scopes of `PORTCULLIS_API_KEY_SCOPES`: separated by spaces or commas, as the
/// key-file tool takes them. `a,b` is a valid scope token of its own, which no route
/// would require: read as two scopes, as its writer meant.
fn scope_list(s: &str) -> Result<Scopes, ConfigError> {
    Scopes::from_iter_checked(s.split([' ', ',']).filter(|t| !t.is_empty()))
}

/// An error for the first name that is not a variable [`StackBuilder::from_env`]
/// reads but is within a few edits of one that it reads, in any case: a typo in the
/// prefix (`PORTCULIS_ALLOWLIST`) or the case (`portcullis_allowlist`) would
/// otherwise leave the setting out as surely as one in the rest of the name. Names
/// further from every variable (another program's, e.g. a demo's own
/// `PORTCULLIS_DEMO_*` settings) are left alone.
pub(crate) fn check_names(names: impl Iterator<Item = OsString>) -> Result<(), ConfigError> {
    for name in names {
        let Some(name) = name.to_str() else { continue };
        if ALL.contains(&name) {
            continue;
        }
        let upper = name.to_ascii_uppercase();
        let closest = ALL
            .iter()
            .map(|known| (edit_distance(&upper, known), *known))
            .min();
        if let Some((distance, known)) = closest
            && distance <= 3
        {
            return Err(ConfigError::new(format!(
                "{name} is not a portcullis setting; did you mean {known}?"
            )));
        }
    }
    Ok(())
}

/// Levenshtein distance over bytes (the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// A duration in whole milliseconds, `min..=max`.
#[cfg(feature = "redis")]
fn millis(value: &str, name: &str, min: u64, max: u64) -> Result<Duration, ConfigError> {
    match parse_number(value.trim()) {
        Some(n) if (min..=max).contains(&n) => Ok(Duration::from_millis(n)),
        _ => Err(ConfigError::new(format!(
            "{name}: must be a whole number of milliseconds from {min} to {max}"
        ))),
    }
}

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
    ///
    /// A variable that is not one of them but is spelled like one, in its prefix, its
    /// name or its case (e.g. `PORTCULLIS_ALOWLIST`, `PORTCULIS_ALLOWLIST`,
    /// `portcullis_allowlist`), is an error naming the setting it resembles: a
    /// misspelled allowlist must not leave the service open.
    pub fn from_env() -> Result<Self, ConfigError> {
        check_names(std::env::vars_os().map(|(name, _)| name))?;
        Self::from_env_with(|name| std::env::var_os(name))
    }

    /// Reads the configuration through `get` (e.g. a map in tests), with the names of
    /// [`from_env`](Self::from_env); `get` returns a variable's raw value (a `String`
    /// or an `OsString`), `None` when it is not set. Errors name the variable, never a
    /// value.
    pub fn from_env_with<V: Into<OsString>>(
        get: impl Fn(&str) -> Option<V>,
    ) -> Result<Self, ConfigError> {
        let vars = Vars::read(|name| get(name).map(Into::into))?;
        let get = |name: &str| vars.get(name);
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
                "cf-connecting-ip" => ForwardedHeader::CfConnectingIp,
                "true-client-ip" => ForwardedHeader::TrueClientIp,
                "fly-client-ip" => ForwardedHeader::FlyClientIp,
                "fastly-client-ip" => ForwardedHeader::FastlyClientIp,
                _ => {
                    return Err(ConfigError::new(format!(
                        "{}: must be x-forwarded-for, forwarded, x-real-ip, cf-connecting-ip, \
                         true-client-ip, fly-client-ip or fastly-client-ip",
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
                    Some(s) => scope_list(&s).map_err(named(API_KEY_SCOPES))?,
                    None => Scopes::default(),
                };
                let store = KeyStore::from_key_list(&list, scopes).map_err(named(API_KEYS))?;
                b = b.api_keys(ApiKeys::new(store));
            }
            (None, None) => vars.unused(API_KEY_SCOPES, API_KEYS)?,
        }
        if get(KEY_FILE).is_none() {
            vars.unused(KEY_FILE_RELOAD_SECS, KEY_FILE)?;
        }

        b = b.tokens_from_env(&vars)?;

        if let Some(v) = get(RATE_LIMIT) {
            parse_list(&v).map_err(named(RATE_LIMIT))?;
            b = b.quotas(&v);
        }
        if let Some(v) = get(AUTH_THROTTLE) {
            let q: Quota = v.parse().map_err(named(AUTH_THROTTLE))?;
            b = b.auth_throttle(AuthThrottleLayer::new(q));
        }
        b = b.redis_from_env(&vars)?;
        if let Some(v) = get(AUDIT_SUCCESSES) {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => b = b.audit_successes(),
                "false" => {}
                _ => {
                    return Err(ConfigError::new(format!(
                        "{AUDIT_SUCCESSES}: must be true or false"
                    )));
                }
            }
        }
        Ok(b)
    }

    #[cfg(feature = "jwt")]
    fn tokens_from_env(self, vars: &Vars) -> Result<Self, ConfigError> {
        use crate::jwt::KeyFile;
        let get = |name: &str| vars.get(name);
        let file = get(JWKS_FILE);
        let issuers = get(TOKEN_ISSUERS);
        let audience = get(TOKEN_AUDIENCE);
        let oidc = get(OIDC_ISSUERS);
        if file.is_none() && issuers.is_none() && audience.is_none() && oidc.is_none() {
            vars.unused(JWKS_RELOAD_SECS, JWKS_FILE)?;
            vars.unused(OIDC_ROOTS_FILE, OIDC_ISSUERS)?;
            vars.unused(OIDC_START, OIDC_ISSUERS)?;
            return Ok(self);
        }
        let need = |v: Option<String>, name: &str| {
            v.ok_or_else(|| {
                ConfigError::new(format!(
                    "service tokens need {TOKEN_AUDIENCE}, and {JWKS_FILE} with {TOKEN_ISSUERS} or {OIDC_ISSUERS}: {name} is not set",
                ))
            })
        };
        let mut builder = crate::jwt::TokenVerifier::builder();
        let (file, audience) = match (file, issuers) {
            (None, None) if oidc.is_some() => {
                vars.unused(JWKS_RELOAD_SECS, JWKS_FILE)?;
                (None, need(audience, TOKEN_AUDIENCE)?)
            }
            (file, issuers) => {
                let file = need(file, JWKS_FILE)?;
                let issuers = need(issuers, TOKEN_ISSUERS)?;
                let audience = need(audience, TOKEN_AUDIENCE)?;
                builder = builder
                    .key_file(KeyFile::jwks(&file))
                    .audience(audience.trim());
                for iss in list(&issuers, TOKEN_ISSUERS)? {
                    builder = builder.issuer(iss);
                }
                (Some(file), audience)
            }
        };
        let audience = audience.trim();
        match oidc {
            Some(oidc) => builder = oidc_issuers(builder, &oidc, audience, vars)?,
            None => {
                vars.unused(OIDC_ROOTS_FILE, OIDC_ISSUERS)?;
                vars.unused(OIDC_START, OIDC_ISSUERS)?;
            }
        }
        let every = match file {
            Some(_) => reload_interval(get(JWKS_RELOAD_SECS), JWKS_RELOAD_SECS)?,
            None => None,
        };
        // The issuers and the audience are checked above: what the verifier can still
        // refuse is the key file, or the first fetch of a discovery issuer's keys.
        let verifier = builder.build().map_err(|e| {
            let name = if e.to_string().starts_with("remote issuer") {
                OIDC_ISSUERS
            } else {
                JWKS_FILE
            };
            ConfigError::new(format!("{name}: {e}"))
        })?;
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
    fn tokens_from_env(self, vars: &Vars) -> Result<Self, ConfigError> {
        for name in [
            JWKS_FILE,
            TOKEN_ISSUERS,
            TOKEN_AUDIENCE,
            JWKS_RELOAD_SECS,
            OIDC_ISSUERS,
            OIDC_ROOTS_FILE,
            OIDC_START,
        ] {
            if vars.get(name).is_some() {
                return Err(ConfigError::new(format!(
                    "{name} is set but portcullis was built without the jwt feature"
                )));
            }
        }
        Ok(self)
    }

    #[cfg(feature = "redis")]
    fn redis_from_env(self, vars: &Vars) -> Result<Self, ConfigError> {
        use crate::rate_limit::redis::{FailurePolicy, RedisLimiter};
        let get = |name: &str| vars.get(name);
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
            for name in [REDIS_ON_FAILURE, REDIS_TIMEOUT_MS, REDIS_CONNECT_TIMEOUT_MS] {
                vars.unused(name, REDIS_URL)?;
            }
            return Ok(self);
        };
        // The URL may hold a password: errors name the variable only (the limiter's
        // own errors never repeat the URL either).
        let mut builder = RedisLimiter::builder(url.trim(), policy)
            .map_err(|e| ConfigError::new(format!("{REDIS_URL}: {e}")))?;
        if let Some(v) = get(REDIS_TIMEOUT_MS) {
            builder = builder.timeout(millis(&v, REDIS_TIMEOUT_MS, 1, 1_000)?);
        }
        if let Some(v) = get(REDIS_CONNECT_TIMEOUT_MS) {
            builder = builder.connect_timeout(millis(&v, REDIS_CONNECT_TIMEOUT_MS, 10, 60_000)?);
        }
        let limiter = builder
            .build()
            .map_err(|e| ConfigError::new(format!("{REDIS_URL}: {e}")))?;
        Ok(self.redis(limiter))
    }

    #[cfg(not(feature = "redis"))]
    fn redis_from_env(self, vars: &Vars) -> Result<Self, ConfigError> {
        for name in [
            REDIS_URL,
            REDIS_ON_FAILURE,
            REDIS_TIMEOUT_MS,
            REDIS_CONNECT_TIMEOUT_MS,
        ] {
            if vars.get(name).is_some() {
                return Err(ConfigError::new(format!(
                    "{name} is set but portcullis was built without the redis feature"
                )));
            }
        }
        Ok(self)
    }
}

/// The entries of a comma-separated list, trimmed; an empty entry is an error.
#[cfg(feature = "jwt")]
fn list<'a>(value: &'a str, name: &str) -> Result<Vec<&'a str>, ConfigError> {
    value
        .split(',')
        .enumerate()
        .map(|(i, v)| match v.trim() {
            "" => Err(ConfigError::new(format!(
                "{name}: entry {} is empty",
                i + 1
            ))),
            v => Ok(v),
        })
        .collect()
}

/// Adds the discovery issuers of `PORTCULLIS_OIDC_ISSUERS`, each with the audience
/// and the roots of `PORTCULLIS_OIDC_ROOTS_FILE`; the build waits for their first
/// fetch.
#[cfg(feature = "jwks-remote")]
fn oidc_issuers(
    mut builder: crate::jwt::TokenVerifierBuilder,
    value: &str,
    audience: &str,
    vars: &Vars,
) -> Result<crate::jwt::TokenVerifierBuilder, ConfigError> {
    use crate::jwt::{RemoteIssuer, RemoteStart};
    let roots = match vars.get(OIDC_ROOTS_FILE) {
        Some(path) => {
            let named = |e: ConfigError| ConfigError::new(format!("{OIDC_ROOTS_FILE}: {e}"));
            let pem = crate::reload::read_file(std::path::Path::new(path.trim()), 1 << 20)
                .map_err(named)?
                .bytes()
                .to_vec();
            crate::jwt::check_root_certificates(&pem).map_err(named)?;
            Some(pem)
        }
        None => None,
    };
    let start = match vars.get(OIDC_START) {
        None => RemoteStart::WaitForFirstFetch,
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "wait" => RemoteStart::WaitForFirstFetch,
            "empty" => RemoteStart::StartEmpty,
            _ => {
                return Err(ConfigError::new(format!(
                    "{OIDC_START}: must be `wait` or `empty`"
                )));
            }
        },
    };
    for (i, iss) in list(value, OIDC_ISSUERS)?.into_iter().enumerate() {
        // Checked here so that the error names the entry without repeating it.
        crate::jwt::oidc::discovery_url(iss, false)
            .map_err(|e| ConfigError::new(format!("{OIDC_ISSUERS}: entry {}: {e}", i + 1)))?;
        let mut remote = RemoteIssuer::discover(iss).audience(audience).start(start);
        if let Some(pem) = &roots {
            remote = remote.tls_root_certificates(pem);
        }
        builder = builder.remote_issuer(remote);
    }
    Ok(builder)
}

#[cfg(all(feature = "jwt", not(feature = "jwks-remote")))]
fn oidc_issuers(
    _builder: crate::jwt::TokenVerifierBuilder,
    _value: &str,
    _audience: &str,
    _vars: &Vars,
) -> Result<crate::jwt::TokenVerifierBuilder, ConfigError> {
    Err(ConfigError::new(format!(
        "{OIDC_ISSUERS} is set but portcullis was built without the jwks-remote feature"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStringExt;

    /// A configuration that builds, so that the variable under test is the only
    /// thing wrong: API keys, and what each variable needs beside it.
    fn context(name: &str) -> Vec<(&'static str, String)> {
        let needs: &[&str] = match name {
            FORWARDED_HEADER => &[API_KEYS, TRUSTED_PROXIES],
            JWKS_FILE | TOKEN_ISSUERS | TOKEN_AUDIENCE | JWKS_RELOAD_SECS => {
                &[API_KEYS, JWKS_FILE, TOKEN_ISSUERS, TOKEN_AUDIENCE]
            }
            OIDC_ISSUERS | OIDC_ROOTS_FILE | OIDC_START => {
                &[API_KEYS, TOKEN_AUDIENCE, OIDC_ISSUERS, OIDC_START]
            }
            REDIS_ON_FAILURE | REDIS_TIMEOUT_MS | REDIS_CONNECT_TIMEOUT_MS => {
                &[API_KEYS, REDIS_URL]
            }
            KEY_FILE => &[],
            KEY_FILE_RELOAD_SECS => &[KEY_FILE],
            _ => &[API_KEYS],
        };
        needs
            .iter()
            .filter(|n| **n != name)
            .map(|n| (*n, valid(n)))
            .collect()
    }

    /// `name` set to `value` (raw bytes) in `context(name)`, read and built.
    fn outcome(name: &str, value: Vec<u8>) -> Result<(), String> {
        let mut vars: Vec<(&str, OsString)> = context(name)
            .into_iter()
            .map(|(n, v)| (n, OsString::from(v)))
            .collect();
        vars.push((name, OsString::from_vec(value)));
        // Build inside a runtime: the Redis limiter starts connecting in the background.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        StackBuilder::from_env_with(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()))
            .and_then(StackBuilder::build)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// A valid value of each variable: with it, `context(name)` builds, so in the
    /// tests below the variable under test is the only thing wrong.
    fn valid(name: &str) -> String {
        match name {
            TRUSTED_PROXIES => "10.0.0.0/8".into(),
            FORWARDED_HEADER => "forwarded".into(),
            ALLOWLIST => "127.0.0.0/8".into(),
            DENYLIST => "10.9.0.0/16".into(),
            KEY_FILE => {
                // One file per call: tests run in parallel in this process, and one
                // test's write must not be read half-done by another.
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let key = crate::api_key::generate_key("pc_test").unwrap();
                let dir =
                    std::env::temp_dir().join(format!("portcullis-env-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&dir).unwrap();
                let path = dir.join("keys.toml");
                let entry = format!("[[keys]]\nid = \"a\"\ndigest = \"{}\"\n", key.digest());
                std::fs::write(&path, entry).unwrap();
                path.display().to_string()
            }
            KEY_FILE_RELOAD_SECS | JWKS_RELOAD_SECS => "30".into(),
            API_KEYS => "0123456789abcdef0123456789abcdef".into(),
            API_KEY_SCOPES => "jobs:read jobs:write".into(),
            JWKS_FILE => concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jwt/jwks.json").into(),
            TOKEN_ISSUERS => "https://issuer.example".into(),
            TOKEN_AUDIENCE => "jobs-api".into(),
            // Nothing listens there; the stack starts empty and keeps trying.
            OIDC_ISSUERS => "https://127.0.0.1:1".into(),
            OIDC_ROOTS_FILE => {
                concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jwt/test-ca.pem").into()
            }
            OIDC_START => "empty".into(),
            RATE_LIMIT => "100/s, 5000/h".into(),
            AUTH_THROTTLE => "5/15m".into(),
            REDIS_URL => "redis://127.0.0.1:1".into(),
            REDIS_ON_FAILURE => "closed".into(),
            REDIS_TIMEOUT_MS => "20".into(),
            REDIS_CONNECT_TIMEOUT_MS => "5000".into(),
            AUDIT_SUCCESSES => "true".into(),
            other => panic!("no valid value for {other}"),
        }
    }

    #[cfg(all(feature = "jwt", feature = "redis"))]
    #[test]
    fn every_variable_with_a_valid_value_builds() {
        for name in ALL {
            let value = valid(name);
            outcome(name, value.into_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// Values that are present but not valid, for every variable: never read as
    /// unset, always an error naming the variable.
    #[cfg(all(feature = "jwt", feature = "redis"))]
    #[test]
    fn present_but_invalid_is_an_error_naming_the_variable() {
        let everywhere: [&[u8]; 6] = [b"\xff\xfe", b"pc\x80live", b"", b" ", b"\t\n", b"  \r "];
        for name in ALL {
            for value in everywhere {
                let e = outcome(name, value.to_vec()).expect_err(name);
                assert!(e.starts_with(name), "{name} = {value:?}: {e}");
            }
        }
        // Garbage for every variable with a grammar (paths, issuers and audiences
        // accept any text; a path that does not exist is an error).
        let garbage: &[(&str, &[&str])] = &[
            (
                TRUSTED_PROXIES,
                &["garbage!!", "10.0.0.0/33", "10.0.0.0/8,,"],
            ),
            (FORWARDED_HEADER, &["x-forwarded", "garbage!!"]),
            (ALLOWLIST, &["garbage!!", "300.1.1.1", "10.0.0.0/8;"]),
            (DENYLIST, &["garbage!!", "::1/129"]),
            (KEY_FILE, &["/nonexistent/keys.toml"]),
            (KEY_FILE_RELOAD_SECS, &["-1", "ten", "1.5"]),
            (API_KEYS, &["short", "garbage!!"]),
            (API_KEY_SCOPES, &["a\u{7f}b", "jobs:read\u{0}"]),
            (JWKS_FILE, &["/nonexistent/jwks.json"]),
            (TOKEN_ISSUERS, &["https://a,,https://b", ","]),
            (JWKS_RELOAD_SECS, &["-1", "1.5", "ten", "99999999999"]),
            (
                OIDC_ISSUERS,
                &[
                    "http://issuer.example",
                    "https://a.example,,https://b.example",
                    "garbage!!",
                ],
            ),
            (
                OIDC_ROOTS_FILE,
                &[
                    "/nonexistent/roots.pem",
                    "/dev/null",
                    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jwt/jwks.json"),
                ],
            ),
            (OIDC_START, &["later", "garbage!!"]),
            (RATE_LIMIT, &["0/s", "garbage!!", "10/5x", "1/s,1/s"]),
            (AUTH_THROTTLE, &["0/s", "garbage!!", "10/5m, 1/h"]),
            (REDIS_URL, &["garbage!!", "http://127.0.0.1:6379"]),
            (REDIS_ON_FAILURE, &["sometimes", "garbage!!"]),
            (REDIS_TIMEOUT_MS, &["0", "1001", "5ms", "-5"]),
            (REDIS_CONNECT_TIMEOUT_MS, &["9", "60001", "2s"]),
            (
                AUDIT_SUCCESSES,
                &["yes", "1", "on", "tru", "true false", "garbage!!"],
            ),
        ];
        for (name, values) in garbage {
            for value in *values {
                let e = outcome(name, value.as_bytes().to_vec()).expect_err(value);
                assert!(e.contains(name), "{name} = {value:?}: {e}");
            }
        }
        // A valid value that means nothing without another variable is an error too.
        let alone = [
            (KEY_FILE_RELOAD_SECS, KEY_FILE),
            (API_KEY_SCOPES, API_KEYS),
            (JWKS_RELOAD_SECS, JWKS_FILE),
            (OIDC_ROOTS_FILE, OIDC_ISSUERS),
            (OIDC_START, OIDC_ISSUERS),
            (REDIS_ON_FAILURE, REDIS_URL),
            (REDIS_TIMEOUT_MS, REDIS_URL),
            (REDIS_CONNECT_TIMEOUT_MS, REDIS_URL),
        ];
        for (name, needs) in alone {
            let e = StackBuilder::from_env_with(|n| (n == name).then(|| valid(name))).unwrap_err();
            assert_eq!(e.to_string(), format!("{name} is set but {needs} is not"));
        }
    }

    #[test]
    fn misspelled_names_are_errors_naming_the_setting() {
        let check = |names: &[&str]| check_names(names.iter().map(OsString::from));
        for (typo, meant) in [
            ("PORTCULLIS_RATLIMIT", RATE_LIMIT),
            ("PORTCULLIS_ALOWLIST", ALLOWLIST),
            ("PORTCULLIS_ALLOW_LIST", ALLOWLIST),
            ("PORTCULLIS_APIKEYS", API_KEYS),
            ("PORTCULLIS_TRUSTED_PROXY", TRUSTED_PROXIES),
            ("PORTCULLIS_REDIS_UR", REDIS_URL),
            ("PORTCULLIS_AUDIT_SUCCESS", AUDIT_SUCCESSES),
            ("PORTCULLIS_AUDIT_SUCESSES", AUDIT_SUCCESSES),
        ] {
            let e = check(&[typo]).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("{typo} is not a portcullis setting; did you mean {meant}?")
            );
        }
        // A typo in the prefix or the case is caught as well.
        for (typo, meant) in [
            ("PORTCULIS_ALLOWLIST", ALLOWLIST),
            ("PORTCULLIS-ALLOWLIST", ALLOWLIST),
            ("PORTCULLISALLOWLIST", ALLOWLIST),
            ("portcullis_allowlist", ALLOWLIST),
            ("Portcullis_Denylist", DENYLIST),
            ("PORTCULLIS_KEY_FIL", KEY_FILE),
        ] {
            let e = check(&[typo]).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("{typo} is not a portcullis setting; did you mean {meant}?")
            );
        }
        // Known names, other programs' names, and names far from every setting pass:
        // the demo's own variables among them.
        assert!(check(&ALL).is_ok());
        assert!(
            check(&[
                "PATH",
                "ALLOWLIST",
                "REDIS_URL",
                "PORTCULLIS_DEMO_ADDR",
                "PORTCULLIS_DEMO_REDIS_NAMESPACE",
                "PORTCULLIS_DEMO_REDIS_CA_FILE",
                "PORTCULLIS_DEMO_LEASE_SECS",
                "PORTCULLIS_DEMO_KEY_FILE",
                "PORTCULLIS_DEMO_TOKEN_KEY_FILE",
                "PORTCULLIS_DEMO_INTERNAL_CIDRS",
                "PORTCULLIS_DEMO_INTERNAL_ISSUER",
                "PORTCULLIS_DEMO_INTERNAL_CALLERS",
                "PORTCULLIS_DEMO_TRUSTED_PROXIES",
                "PORTCULLIS_DEMO_JOB_TTL_SECS",
                "PORTCULLIS_DEMO_MAX_DEPTH",
            ])
            .is_ok()
        );
    }

    #[test]
    fn key_scopes_are_separated_by_spaces_or_commas() {
        let both = Scopes::parse("jobs:read jobs:write").unwrap();
        for list in [
            "jobs:read jobs:write",
            "jobs:read,jobs:write",
            "jobs:read, jobs:write",
            " ,jobs:write,,jobs:read ",
        ] {
            assert_eq!(scope_list(list).unwrap(), both, "{list}");
        }
        assert!(scope_list("jobs:read,bad\"scope").is_err());
    }

    proptest! {
        /// A known name with one byte changed, removed or doubled anywhere, the
        /// prefix included, and its letters in any case, is always caught.
        #[test]
        fn one_edit_from_a_setting_is_caught(
            index in 0..ALL.len(),
            at in 0usize..40,
            byte in prop_oneof![b'A'..=b'Z', b'a'..=b'z', Just(b'_'), Just(b'-')],
            op in 0u8..4,
            lower in any::<u64>(),
        ) {
            let known = ALL[index];
            let at = at.min(known.len() - 1);
            let mut typo = known.as_bytes().to_vec();
            match op {
                0 => typo[at] = byte,
                1 => { typo.remove(at); }
                2 => typo.insert(at, byte),
                _ => {}
            }
            for (i, b) in typo.iter_mut().enumerate() {
                if lower >> (i % 64) & 1 == 1 {
                    b.make_ascii_lowercase();
                }
            }
            let typo = String::from_utf8(typo).unwrap();
            let e = check_names(std::iter::once(OsString::from(&typo)));
            prop_assert!(ALL.contains(&typo.as_str()) || e.is_err(), "{}", typo);
        }

        /// Arbitrary bytes in any variable: never a panic; bytes that are not UTF-8,
        /// or blank, are an error naming the variable; an error never repeats the
        /// value.
        #[test]
        fn arbitrary_bytes_never_pass_as_unset(
            index in 0..ALL.len(),
            value in proptest::collection::vec(any::<u8>(), 0..48),
        ) {
            let name = ALL[index];
            let text = String::from_utf8(value.clone());
            let result = outcome(name, value);
            match &text {
                Err(_) => prop_assert!(result.as_ref().is_err_and(|e| e.starts_with(name))),
                Ok(t) if t.trim().is_empty() => {
                    prop_assert!(result.as_ref().is_err_and(|e| e.starts_with(name)))
                }
                Ok(t) => {
                    if let Err(e) = &result {
                        prop_assert!(t.trim().len() < 12 || !e.contains(t.trim()), "{}", e);
                    }
                }
            }
        }
    }
}
