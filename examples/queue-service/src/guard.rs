//! The guarding layers of the demo: the crate's [`StackLayer`], which assembles them
//! in the order of the design, then the scope check per route
//! ([`crate::auth::ScopeCheckLayer`]):
//!
//! ```text
//! RequestId → AccessLog → ClientIp → (IpAllowlist) → AuthThrottle
//!   → Authenticate (API keys and service tokens) → RateLimit → scope check per route
//! ```
//!
//! Three stacks share one key store, one failed-auth throttle and one rate limiter
//! (clones share state): the main one, the one of `POST /internal/latest-runs`,
//! which adds the internal-network allowlist, and the one of `GET /dashboard`,
//! whose token verifier accepts only dashboard sessions (audience
//! [`DASHBOARD_AUDIENCE`]) where the other two accept only the API's tokens
//! ([`AUDIENCE`]). `GET /health`, `GET /dashboard/login` and
//! `POST /dashboard/logout` have only the request id, the access log and the
//! client address: they are the routes without authentication (see
//! [`crate::session`]).
//!
//! Credentials: an API-key store (ephemeral demo keys, or a TOML key file) and one
//! HS256 secret that signs the in-process worker's service tokens and verifies every
//! service token. There is no open mode: an empty key store cannot be built.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use portcullis::AuthMethod;
use portcullis::ConfigError;
use portcullis::IpSet;
use portcullis::Scopes;
use portcullis::access_log::AccessLogLayer;
use portcullis::api_key::{ApiKeys, KeyDigest, KeyRecord, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use portcullis::jwt::{RemoteIssuer, SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};
use portcullis::rate_limit::redis::{FailurePolicy, RedisLimiter};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use portcullis::rejection::DenialReason;
use portcullis::reload::ReloadHandle;
use portcullis::request_id::RequestIdLayer;
use portcullis::stack::StackLayer;
use tower::ServiceBuilder;

use crate::routes::AppState;

/// A configuration error with its message (never a secret).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The realm of every challenge the demo sends.
pub const REALM: &str = "portcullis-demo";
/// The `iss` of the demo's service tokens.
pub const ISSUER: &str = "portcullis-demo";
/// The `aud` the demo requires in service tokens.
pub const AUDIENCE: &str = "portcullis-demo-queue";
/// The `aud` of the dashboard's session tokens (in its cookie). Only the
/// dashboard's verifier accepts it; the API's requires [`AUDIENCE`].
pub const DASHBOARD_AUDIENCE: &str = "portcullis-demo-dashboard";
/// How long a dashboard session lasts (the token's lifetime and the cookie's
/// `Max-Age`).
pub const DASHBOARD_SESSION: Duration = Duration::from_secs(10 * 60);
/// The `sub` of the in-process worker's tokens. Its own quota applies to service
/// tokens with this subject only, never to an API key with the same id.
pub const WORKER_SUBJECT: &str = "queue-worker";
/// The scope that binds a dashboard session to the key that signed in:
/// `session-key:` and the key's digest (`sha256:<hex>`, as in the key file). Only
/// the dashboard's sessions carry it; no route requires it.
pub const SESSION_KEY_SCOPE: &str = "session-key:";
/// The prefix of the generated demo keys.
pub const KEY_PREFIX: &str = "pc_demo";

/// The HMAC secret of the service tokens (HS256, at least 32 bytes). `Debug` never
/// shows it.
#[derive(Clone)]
pub struct TokenSecret(Vec<u8>);

impl TokenSecret {
    /// 32 random bytes.
    pub fn generate() -> Result<Self, BoxError> {
        let mut b = vec![0u8; 32];
        getrandom::fill(&mut b).map_err(|_| BoxError::from("no OS randomness"))?;
        Ok(Self(b))
    }

    /// From a file: its bytes, without a final line break; at least 32 bytes.
    pub fn from_file(path: &std::path::Path) -> Result<Self, BoxError> {
        let mut b = std::fs::read(path)
            .map_err(|_| BoxError::from("PORTCULLIS_DEMO_TOKEN_KEY_FILE could not be read"))?;
        while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b.pop();
        }
        if b.len() < 32 {
            return Err(BoxError::from(
                "PORTCULLIS_DEMO_TOKEN_KEY_FILE must hold at least 32 bytes",
            ));
        }
        Ok(Self(b))
    }

    /// These bytes (tests craft their own tokens with them).
    #[cfg(test)]
    pub fn from_bytes(b: &[u8]) -> Self {
        Self(b.to_vec())
    }

    /// A key derived for one purpose (`label`): HMAC-SHA256 of the label under this
    /// secret. Instances sharing the secret derive the same key; the secret itself
    /// never leaves the process.
    pub(crate) fn derive(&self, label: &str) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("any key length");
        mac.update(label.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Lowercase hex, for printing the ephemeral secret once.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenSecret(REDACTED)")
    }
}

/// Everything the guard is built from.
#[derive(Debug)]
pub struct GuardConfig {
    /// The API keys.
    pub keys: ApiKeys,
    /// Signs and verifies service tokens.
    pub token_secret: TokenSecret,
    /// How the client address is found.
    pub client_ip: ClientIpConfig,
    /// Who may call `POST /internal/latest-runs`.
    pub internal: IpSet,
    /// The per-principal quota.
    pub rate: Quota,
    /// The in-process worker's own quota.
    pub worker_rate: Quota,
    /// Failed authentications allowed per client address.
    pub auth_failures: Quota,
    /// The shared Redis limiter, else limits are per instance.
    pub redis: Option<RedisLimiter>,
    /// Keeps the key file reloading for as long as the stacks live.
    pub reloading: Option<ReloadHandle>,
    /// An external issuer (e.g. a Kubernetes cluster's) whose tokens are accepted on
    /// the internal endpoint only, beside the demo's own.
    pub internal_issuer: Option<RemoteIssuer>,
}

impl GuardConfig {
    /// The defaults around `keys` and `token_secret`: the TCP peer is the client;
    /// 20 requests per second per principal (bursts of 40); 10 failed
    /// authentications per address per 5 minutes; limits in memory.
    pub fn new(
        keys: ApiKeys,
        token_secret: TokenSecret,
        internal: IpSet,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            keys,
            token_secret,
            client_ip: ClientIpConfig::peer_only(),
            internal,
            rate: Quota::per_second(20)?.with_burst(40)?,
            worker_rate: Quota::per_second(1000)?,
            auth_failures: Quota::new(10, Duration::from_secs(300))?,
            redis: None,
            reloading: None,
            internal_issuer: None,
        })
    }
}

/// The built layers, cloned onto the routers they guard (clones share state).
#[derive(Clone, Debug)]
pub struct Guard {
    stack: StackLayer,
    internal: StackLayer,
    dashboard: StackLayer,
    client_ip: ClientIpLayer,
    secret: TokenSecret,
    keys: ApiKeys,
    rate: RateLimitLayer,
}

impl Guard {
    /// Checks and builds every layer; any unsafe or incomplete setting is an error.
    pub fn new(c: GuardConfig) -> Result<Self, ConfigError> {
        let own = || -> Result<_, ConfigError> {
            Ok(TokenVerifier::builder()
                .key(VerifyingKey::hs256(&c.token_secret.0)?.issuer(ISSUER))
                .issuer(ISSUER)
                .audience(AUDIENCE))
        };
        let verifier = own()?.build()?;
        // The external issuer's keys are fetched now: start-up fails if it is down.
        let internal_verifier = match c.internal_issuer {
            Some(remote) => own()?.remote_issuer(remote).build()?,
            None => verifier.clone(),
        };
        let dashboard_verifier = TokenVerifier::builder()
            .key(VerifyingKey::hs256(&c.token_secret.0)?.issuer(ISSUER))
            .issuer(ISSUER)
            .audience(DASHBOARD_AUDIENCE)
            .build()?;
        let policy = Policy::new("demo", c.rate)?.principal(
            AuthMethod::ServiceToken,
            WORKER_SUBJECT,
            c.worker_rate,
        )?;
        let mut rate = RateLimitLayer::builder().policy(policy);
        if let Some(redis) = c.redis {
            rate = rate.redis(redis);
        }
        let rate = rate.build()?;
        let throttle = AuthThrottleLayer::new(c.auth_failures);
        let stack = |verifier: &TokenVerifier| {
            let b = StackLayer::builder()
                .client_ip(c.client_ip.clone())
                .api_keys(c.keys.clone())
                .service_tokens(verifier.clone())
                .realm(REALM)
                .auth_throttle(throttle.clone())
                .rate_limit(rate.clone());
            match &c.reloading {
                Some(handle) => b.keep_reloading(handle.clone()),
                None => b,
            }
        };
        Ok(Self {
            stack: stack(&verifier).build()?,
            internal: stack(&internal_verifier).allow(c.internal).build()?,
            dashboard: stack(&dashboard_verifier).build()?,
            client_ip: ClientIpLayer::new(c.client_ip),
            secret: c.token_secret,
            keys: c.keys,
            rate,
        })
    }

    /// An issuer of tokens signed with the demo's secret, for `subject` with
    /// `scope` (space separated; may be empty).
    pub fn issuer(&self, subject: &str, scope: &str) -> Result<TokenIssuer, ConfigError> {
        let mut b = TokenIssuer::builder(SigningKey::hs256(&self.secret.0)?)
            .issuer(ISSUER)
            .subject(subject)
            .audience(AUDIENCE)
            .lifetime(Duration::from_secs(10 * 60));
        for s in scope.split_whitespace() {
            b = b.scope(s);
        }
        b.build()
    }

    /// The issuer of a dashboard session for `subject`, signed in with the key
    /// whose digest is `key`: audience [`DASHBOARD_AUDIENCE`], scope
    /// `dashboard:read` and the key's binding ([`SESSION_KEY_SCOPE`]),
    /// [`DASHBOARD_SESSION`].
    pub fn dashboard_issuer(
        &self,
        subject: &str,
        key: &KeyDigest,
    ) -> Result<TokenIssuer, ConfigError> {
        TokenIssuer::builder(SigningKey::hs256(&self.secret.0)?)
            .issuer(ISSUER)
            .subject(subject)
            .audience(DASHBOARD_AUDIENCE)
            .lifetime(DASHBOARD_SESSION)
            .scope(crate::auth::DASHBOARD_READ)
            .scope(format!("{SESSION_KEY_SCOPE}{key}"))
            .build()
    }

    /// Why the key whose digest is `key` may not hold a dashboard session now, from
    /// `client` (the request's [`ClientIp`](portcullis::ClientIp)), or `None` when
    /// it may. A session is a token minted from one key (bound to it by
    /// [`SESSION_KEY_SCOPE`]), so it keeps every limit of that key in the live
    /// store: the key must still be listed, not revoked, inside its validity
    /// window, hold `dashboard:read`, and accept `client` if it lists
    /// `allowed_ips`. A key with usage credits never holds one (a session would
    /// spend none). Checked at login and on every request a session makes
    /// ([`crate::session::session_follows_key`]).
    pub fn session_refusal(
        &self,
        key: &KeyDigest,
        now: std::time::SystemTime,
        client: Option<std::net::IpAddr>,
    ) -> Option<DenialReason> {
        let store = self.keys.snapshot();
        let Some(r) = store.records().find(|r| r.digest() == key) else {
            return Some(DenialReason::UnknownKey);
        };
        Some(if r.is_revoked() {
            DenialReason::RevokedKey
        } else if r.valid_from().is_some_and(|t| now < t) {
            DenialReason::NotYetValidKey
        } else if r.valid_until().is_some_and(|t| now >= t) {
            DenialReason::ExpiredKey
        } else if !r.scopes().contains(crate::auth::DASHBOARD_READ) {
            DenialReason::InsufficientScope
        } else if r
            .allowed_ips()
            .is_some_and(|allowed| !client.is_some_and(|ip| allowed.contains(ip)))
        {
            DenialReason::KeyIpDenied
        } else if r.credits().is_some() {
            DenialReason::AuthMethodNotAllowed
        } else {
            return None;
        })
    }

    /// The stack of `GET /dashboard`: the same layers and shared state as
    /// [`stack`](Self::stack), but its service tokens are the dashboard's sessions
    /// (audience [`DASHBOARD_AUDIENCE`]) and nothing else.
    pub fn dashboard_stack(&self) -> StackLayer {
        self.dashboard.clone()
    }

    /// The in-process worker's issuer: `sub` [`WORKER_SUBJECT`], scope `jobs:work`.
    pub fn worker_issuer(&self) -> Result<TokenIssuer, ConfigError> {
        self.issuer(WORKER_SUBJECT, crate::auth::JOBS_WORK)
    }

    /// Every key with usage credits: its id, its total and what it has left, for
    /// the admin view.
    pub async fn credits(&self) -> Vec<serde_json::Value> {
        let store = self.keys.snapshot();
        let mut out = Vec::new();
        for r in store.records().filter(|r| r.credits().is_some()) {
            out.push(serde_json::json!({
                "id": r.id(),
                "credits": r.credits(),
                "remaining": self.rate.credits_remaining(r).await,
            }));
        }
        out
    }

    /// The whole stack. [`routes::app`](crate::routes::app) puts it, then the scope
    /// check, around each guarded route, and it alone around their fallbacks.
    pub fn stack(&self) -> StackLayer {
        self.stack.clone()
    }

    /// The whole stack plus the internal-network allowlist.
    pub fn internal_stack(&self) -> StackLayer {
        self.internal.clone()
    }

    /// Only the outer layers (client address, access log, request id), for the
    /// public route.
    pub fn public(&self, router: Router<AppState>) -> Router<AppState> {
        router.layer(
            ServiceBuilder::new()
                .layer(RequestIdLayer::new())
                .layer(AccessLogLayer::new())
                .layer(self.client_ip.clone()),
        )
    }
}

/// One ephemeral demo key: its id, scopes and the secret (printed once).
pub struct DemoKey {
    /// The public key id (logs); as `api_key:<id>`, the identity that rate
    /// limiting and job ownership key on.
    pub id: &'static str,
    /// Its scopes.
    pub scopes: &'static str,
    /// The key itself.
    pub key: portcullis::api_key::GeneratedKey,
}

impl fmt::Debug for DemoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemoKey")
            .field("id", &self.id)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

/// Generates one key per `(id, scopes)` and the store that accepts them.
pub fn demo_keys(
    specs: &[(&'static str, &'static str)],
) -> Result<(Vec<DemoKey>, ApiKeys), ConfigError> {
    let mut keys = Vec::new();
    let mut records = Vec::new();
    for &(id, scopes) in specs {
        let key = generate_key(KEY_PREFIX)?;
        records.push(KeyRecord::new(id, key.digest())?.with_scopes(Scopes::parse(scopes)?));
        keys.push(DemoKey { id, scopes, key });
    }
    Ok((keys, ApiKeys::new(KeyStore::from_records(records)?)))
}

/// The demo's two keys: an admin key and a client key.
pub const DEMO_KEYS: &[(&str, &str)] = &[
    ("demo-admin", "admin dashboard:read"),
    ("demo-client", "jobs:read jobs:write"),
];

/// Where the credentials come from.
#[derive(Debug)]
pub enum Credentials {
    /// Generated now; printed once to standard output.
    Ephemeral {
        /// The demo keys.
        keys: Vec<DemoKey>,
        /// Their store.
        store: ApiKeys,
        /// The token secret.
        secret: TokenSecret,
    },
    /// From files (nothing is printed): the key file is reloaded on change.
    Configured {
        /// The key store from `PORTCULLIS_DEMO_KEY_FILE`.
        store: ApiKeys,
        /// Keeps the key file reloading.
        reloading: ReloadHandle,
        /// The secret from `PORTCULLIS_DEMO_TOKEN_KEY_FILE`.
        secret: TokenSecret,
    },
}

impl Credentials {
    /// `PORTCULLIS_DEMO_KEY_FILE` and `PORTCULLIS_DEMO_TOKEN_KEY_FILE` both set: use
    /// them; neither: generate; only one: an error (half a configuration is never
    /// completed with generated secrets).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, BoxError> {
        match (
            get("PORTCULLIS_DEMO_KEY_FILE"),
            get("PORTCULLIS_DEMO_TOKEN_KEY_FILE"),
        ) {
            (None, None) => {
                let (keys, store) = demo_keys(DEMO_KEYS)?;
                Ok(Self::Ephemeral {
                    keys,
                    store,
                    secret: TokenSecret::generate()?,
                })
            }
            (Some(keys), Some(token)) => {
                let store = ApiKeys::from_file(PathBuf::from(keys))?;
                Ok(Self::Configured {
                    reloading: store.watch_key_file(Duration::from_secs(5))?,
                    store,
                    secret: TokenSecret::from_file(std::path::Path::new(&token))?,
                })
            }
            _ => Err(BoxError::from(
                "set both PORTCULLIS_DEMO_KEY_FILE and PORTCULLIS_DEMO_TOKEN_KEY_FILE, or neither",
            )),
        }
    }

    /// The key store and the token secret.
    pub fn parts(&self) -> (ApiKeys, TokenSecret) {
        match self {
            Self::Ephemeral { store, secret, .. } | Self::Configured { store, secret, .. } => {
                (store.clone(), secret.clone())
            }
        }
    }

    /// The handle that keeps the key file reloading, for configured credentials.
    pub fn reloading(&self) -> Option<ReloadHandle> {
        match self {
            Self::Ephemeral { .. } => None,
            Self::Configured { reloading, .. } => Some(reloading.clone()),
        }
    }
}

/// The default namespace of every key the demo keeps in Redis.
pub const DEFAULT_NAMESPACE: &str = "portcullis-demo";

/// The Redis limiter from `REDIS_URL` (or `--redis URL`), if set, with its keys
/// under `namespace` and, for `rediss://`, trusting `ca_pem` if given: fails
/// closed (503) when Redis does not answer, so two instances never silently stop
/// sharing their limits.
pub fn redis_limiter(
    url: Option<&str>,
    namespace: &str,
    ca_pem: Option<&[u8]>,
) -> Result<Option<RedisLimiter>, ConfigError> {
    let Some(url) = url else {
        return Ok(None);
    };
    let mut b = RedisLimiter::builder(url, FailurePolicy::FailClosed)?
        .timeout(Duration::from_millis(50))
        .namespace(namespace)?;
    if let Some(pem) = ca_pem {
        b = b.tls_root_certificate(pem)?;
    }
    Ok(Some(b.build()?))
}
