//! [`StackBuilder`]: the stack's settings, checked once by [`StackBuilder::build`].

use std::fmt;

use super::{DEFAULT_QUOTA, StackLayer};
use crate::access_log::AccessLogLayer;
use crate::allowlist::IpAllowlistLayer;
use crate::api_key::ApiKeys;
use crate::auth_throttle::AuthThrottleLayer;
use crate::authenticate::AuthenticateLayer;
use crate::client_ip::{ClientIpConfig, ClientIpLayer, ForwardedHeader};
#[cfg(feature = "jwt")]
use crate::jwt::TokenVerifier;
use crate::rate_limit::{Policy, Quota, RateLimitLayer};
use crate::reload::ReloadHandle;
use crate::request_id::RequestIdLayer;
use crate::{ConfigError, IpSet, Scopes};

/// The rate-limit policies of a quota list, named after their windows (`per-1s`,
/// `per-3600s`), as they appear in the `RateLimit-Policy` field.
fn policies(quotas: &[Quota]) -> Result<Vec<Policy>, ConfigError> {
    quotas
        .iter()
        .map(|q| Policy::new(&format!("per-{}s", q.window().as_secs()), *q))
        .collect()
}

enum RateLimitChoice {
    Default,
    Quotas(String),
    Layer(RateLimitLayer),
}

/// Builds a [`StackLayer`]; see the [module docs](crate::stack).
///
/// String settings are checked by [`build`](Self::build), which reports the first
/// problem; nothing is checked at request time. Each setting is given at most once
/// (the [`keep_reloading`](Self::keep_reloading) handles excepted): a second call of
/// a setter, or of two setters of one setting (`allowlist` and `allow`,
/// `auth_throttle` and `disable_auth_throttle_dangerously`), including after
/// [`from_env`](Self::from_env) gave it from a variable, is an error at build rather
/// than a silent replacement of the first.
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
    audit_successes: bool,
    throttle: Option<AuthThrottleLayer>,
    rate_limit: RateLimitChoice,
    #[cfg(feature = "redis")]
    redis: Option<crate::rate_limit::redis::RedisLimiter>,
    pub(super) reloads: Vec<ReloadHandle>,
    conflict: Option<&'static str>,
    /// The settings given so far, and the first one given twice.
    given: Vec<&'static str>,
    twice: Option<&'static str>,
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
            audit_successes: false,
            throttle: Some(AuthThrottleLayer::recommended()),
            rate_limit: RateLimitChoice::Default,
            #[cfg(feature = "redis")]
            redis: None,
            reloads: Vec::new(),
            conflict: None,
            given: Vec::new(),
            twice: None,
        }
    }

    /// Records that `setting` was given; a second time is an error at build (it
    /// would silently replace the first, e.g. a deny list read from the environment).
    fn given(&mut self, setting: &'static str) {
        if self.given.contains(&setting) {
            self.twice.get_or_insert(setting);
        } else {
            self.given.push(setting);
        }
    }

    /// Replaces the request-id layer (e.g. another header name).
    pub fn request_id(mut self, layer: RequestIdLayer) -> Self {
        self.given("request-id layer");
        self.request_id = layer;
        self
    }

    /// Replaces the access-log layer (e.g. more sensitive headers, a request span).
    pub fn access_log(mut self, layer: AccessLogLayer) -> Self {
        self.given("access-log layer");
        self.access_log = layer;
        self
    }

    /// How the client address is found (default: the TCP peer only). Conflicts with
    /// [`trusted_proxies`](Self::trusted_proxies).
    pub fn client_ip(mut self, config: ClientIpConfig) -> Self {
        self.given("client address configuration");
        self.client_ip = Some(config);
        self
    }

    /// Reads the forwarding header from peers inside these comma-separated CIDRs
    /// (checked by [`build`](Self::build)).
    pub fn trusted_proxies(mut self, cidrs: &str) -> Self {
        self.given("trusted proxies");
        self.trusted_proxies = Some(cidrs.to_owned());
        self
    }

    /// Which forwarding header the trusted proxies write (default
    /// `X-Forwarded-For`).
    pub fn forwarded_header(mut self, header: ForwardedHeader) -> Self {
        self.given("forwarded header");
        self.forwarded_header = Some(header);
        self
    }

    /// Only these comma-separated CIDRs get in (checked by [`build`](Self::build)).
    pub fn allowlist(mut self, cidrs: &str) -> Self {
        self.given("allow list");
        self.allow = Some(IpSet::parse(cidrs).map_err(|e| e.to_string()));
        self
    }

    /// Only these networks get in.
    pub fn allow(mut self, set: IpSet) -> Self {
        self.given("allow list");
        self.allow = Some(Ok(set));
        self
    }

    /// These comma-separated CIDRs never get in, even when allowed (checked by
    /// [`build`](Self::build)). Without an allow list, every other address is
    /// allowed.
    pub fn denylist(mut self, cidrs: &str) -> Self {
        self.given("deny list");
        self.deny = Some(IpSet::parse(cidrs).map_err(|e| e.to_string()));
        self
    }

    /// These networks never get in.
    pub fn deny(mut self, set: IpSet) -> Self {
        self.given("deny list");
        self.deny = Some(Ok(set));
        self
    }

    /// Authenticates with these API keys.
    pub fn api_keys(mut self, keys: ApiKeys) -> Self {
        self.given("API keys");
        self.api_keys = Some(keys);
        self
    }

    /// Keeps `handle` (e.g. from [`ApiKeys::watch_key_file`]) alive as long as the
    /// built [`StackLayer`], a clone of it, or a service it built lives, so its key
    /// file keeps reloading (a router typically keeps only the services).
    pub fn keep_reloading(mut self, handle: ReloadHandle) -> Self {
        self.reloads.push(handle);
        self
    }

    /// Authenticates with service tokens (JWT) checked by `verifier`; with API keys
    /// too, a `Bearer` credential shaped like a JWT goes to the verifier. For keys
    /// from an issuer URL, build it with
    /// [`TokenVerifierBuilder::remote_issuer`](crate::jwt::TokenVerifierBuilder::remote_issuer)
    /// (feature `jwks-remote`; from the environment, `PORTCULLIS_OIDC_ISSUERS`).
    #[cfg(feature = "jwt")]
    pub fn service_tokens(mut self, verifier: TokenVerifier) -> Self {
        self.given("service tokens");
        self.service_tokens = Some(verifier);
        self
    }

    /// Lets **every request in without authentication** (see
    /// [`AuthenticateLayer::allow_unauthenticated_requests_dangerously`]). For local
    /// development only; cannot be combined with credentials.
    pub fn allow_unauthenticated_requests_dangerously(mut self, scopes: Scopes) -> Self {
        self.given("unauthenticated mode");
        self.unauthenticated = Some(scopes);
        self
    }

    /// The realm of the `WWW-Authenticate` challenges (default `api`).
    pub fn realm(mut self, realm: &str) -> Self {
        self.given("realm");
        self.realm = Some(realm.to_owned());
        self
    }

    /// Also emits the success audit events, `auth_succeeded` for every accepted
    /// credential and `service_token_accepted` for every accepted service token
    /// (see [`AuthenticateLayer::audit_successes`]). Off by default: the access
    /// event of each request names its principal already, and a token's `sub`,
    /// `jti` and `kid`. From the environment: `PORTCULLIS_AUDIT_SUCCESSES=true`.
    pub fn audit_successes(mut self) -> Self {
        self.audit_successes = true;
        self
    }

    /// Replaces the failed-authentication throttle (default
    /// [`AuthThrottleLayer::recommended`]).
    pub fn auth_throttle(mut self, layer: AuthThrottleLayer) -> Self {
        self.given("failed-authentication throttle");
        self.throttle = Some(layer);
        self
    }

    /// Removes the failed-authentication throttle: a client may then guess
    /// credentials as fast as the rate limit lets it. Logged as a warning on the
    /// audit target when the stack is built. Use only when something in front
    /// throttles failures already.
    pub fn disable_auth_throttle_dangerously(mut self) -> Self {
        self.given("failed-authentication throttle");
        self.throttle = None;
        self
    }

    /// The rate-limit quotas, e.g. `100/s, 5000/h`: 1 to 4 comma-separated
    /// [`Quota`]s (see its `FromStr`), enforced together, parsed at build time (default
    /// [`DEFAULT_QUOTA`]), keyed per principal, else per client address.
    pub fn quotas(mut self, quotas: &str) -> Self {
        self.given("rate limit");
        if matches!(self.rate_limit, RateLimitChoice::Layer(_)) {
            self.conflict = Some("set either quotas or a whole rate-limit layer, not both");
        }
        self.rate_limit = RateLimitChoice::Quotas(quotas.to_owned());
        self
    }

    /// Replaces the rate limiter with a fully configured one (tiers, per-principal
    /// overrides, a key function, Redis ...). When the layer keeps its limits in
    /// Redis, the failed-authentication throttle keeps its counts there too (see
    /// [`redis`](Self::redis)), unless it has a Redis backend of its own.
    pub fn rate_limit(mut self, layer: RateLimitLayer) -> Self {
        self.given("rate limit");
        if matches!(self.rate_limit, RateLimitChoice::Quotas(_)) {
            self.conflict = Some("set either quotas or a whole rate-limit layer, not both");
        }
        self.rate_limit = RateLimitChoice::Layer(layer);
        self
    }

    /// Keeps the [`quotas`](Self::quotas) in Redis, shared by every instance. Not
    /// with a whole [`rate_limit`](Self::rate_limit) layer (configure Redis on it).
    /// The failed-authentication throttle keeps its counts there too (see
    /// [`AuthThrottleLayer::redis`]), unless the throttle given to
    /// [`auth_throttle`](Self::auth_throttle) has a Redis backend of its own.
    #[cfg(feature = "redis")]
    pub fn redis(mut self, limiter: crate::rate_limit::redis::RedisLimiter) -> Self {
        self.given("Redis limiter");
        self.redis = Some(limiter);
        self
    }

    /// Checks the configuration and builds the stack.
    ///
    /// Errors: no credentials and not the unauthenticated mode; credentials together
    /// with the unauthenticated mode; an allow, deny or trusted-proxy list that does
    /// not parse; a bad quota; contradicting settings; a setting given twice.
    pub fn build(self) -> Result<StackLayer, ConfigError> {
        if let Some(conflict) = self.conflict {
            return Err(ConfigError::new(format!("stack: {conflict}")));
        }
        if let Some(setting) = self.twice {
            return Err(ConfigError::new(format!(
                "stack: {setting} given twice (in code, or in the environment and in code): \
                 give each setting once, since the second would silently replace the first"
            )));
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
            client_ip = client_ip
                .header(header)
                .map_err(|e| ConfigError::new(format!("forwarded header: {e}")))?;
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
        // The stack's rate limiter runs inside the authentication and spends the
        // keys' usage credits.
        auth = auth.credits_spent_inside();
        if self.audit_successes {
            auth = auth.audit_successes();
        }

        // Throttle: one failure budget across instances when they share Redis,
        // whether the stack or the rate-limit layer given to it holds the limiter.
        #[cfg(feature = "redis")]
        let shared = match &self.rate_limit {
            RateLimitChoice::Layer(layer) => layer.redis_limiter().or(self.redis.as_ref()),
            _ => self.redis.as_ref(),
        };
        #[cfg(feature = "redis")]
        let throttle = match (self.throttle, shared) {
            (Some(t), Some(redis)) if !t.has_redis() => Some(t.redis(redis.clone())),
            (t, _) => t,
        };
        #[cfg(not(feature = "redis"))]
        let throttle = self.throttle;
        if throttle.is_none() {
            crate::audit::emit!(
                warn,
                AuthThrottleDisabled,
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
                let quotas = crate::rate_limit::quota::parse_list(list)
                    .map_err(|e| ConfigError::new(format!("rate limit: {e}")))?;
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
            request_id: self.request_id,
            access_log: self.access_log,
            client_ip: ClientIpLayer::new(client_ip),
            allowlist,
            throttle,
            auth,
            rate_limit,
            reloads: (!self.reloads.is_empty()).then(|| self.reloads.into()),
        })
    }
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use proptest::prelude::*;
    use tower::ServiceExt as _;
    use tower_layer::Layer as _;

    use super::*;
    use crate::api_key::KeyStore;
    use crate::client_ip::PeerAddr;
    use crate::rate_limit::redis::{FailurePolicy, RedisLimiter};

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    /// A limiter of a Redis that never answers: fail-closed, so a count it is asked
    /// for answers 503.
    fn unreachable_redis() -> RedisLimiter {
        RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailClosed)
            .unwrap()
            .build()
            .unwrap()
    }

    fn redis_layer() -> RateLimitLayer {
        RateLimitLayer::builder()
            .policy(Policy::new("p", Quota::per_second(100).unwrap()).unwrap())
            .redis(unreachable_redis())
            .build()
            .unwrap()
    }

    fn builder() -> StackBuilder {
        StackBuilder::new().api_keys(ApiKeys::new(
            KeyStore::from_key_list(KEY, Scopes::default()).unwrap(),
        ))
    }

    #[tokio::test]
    async fn a_rate_limit_layer_on_redis_puts_the_throttle_there_too() {
        for stack in [
            builder().redis(unreachable_redis()).build().unwrap(),
            builder().rate_limit(redis_layer()).build().unwrap(),
        ] {
            let service = stack.layer(tower::service_fn(|_: Request<Full<Bytes>>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }));
            let mut req = Request::new(Full::new(Bytes::new()));
            req.headers_mut().insert(
                "x-api-key",
                "pc_test_not_a_listed_key_at_all_x".parse().unwrap(),
            );
            req.extensions_mut()
                .insert(PeerAddr("10.0.0.1:1000".parse().unwrap()));
            // The wrong key's count is asked of the unreachable Redis: 503, not a
            // 401 counted in this instance's memory alone.
            let status = service.oneshot(req).await.unwrap().status();
            assert_eq!(status, 503);
        }
    }

    /// Calls setter `i` (of 18, each with a valid value); returns the setting it sets.
    fn set(b: StackBuilder, i: u8) -> (StackBuilder, &'static str) {
        let net = || IpSet::parse("10.0.0.0/8").unwrap();
        match i {
            0 => (b.request_id(RequestIdLayer::new()), "request id"),
            1 => (b.access_log(AccessLogLayer::new()), "access log"),
            2 => (b.client_ip(ClientIpConfig::peer_only()), "client ip"),
            3 => (b.trusted_proxies("10.0.0.0/8"), "trusted proxies"),
            4 => (b.forwarded_header(ForwardedHeader::XRealIp), "header"),
            5 => (b.allowlist("10.0.0.0/8"), "allow"),
            6 => (b.allow(net()), "allow"),
            7 => (b.denylist("10.9.0.0/16"), "deny"),
            8 => (b.deny(net()), "deny"),
            9 => (b.api_keys(builder().api_keys.unwrap()), "keys"),
            10 => (
                b.allow_unauthenticated_requests_dangerously(Scopes::default()),
                "open",
            ),
            11 => (b.realm("api"), "realm"),
            12 => (
                b.auth_throttle(AuthThrottleLayer::recommended()),
                "throttle",
            ),
            13 => (b.disable_auth_throttle_dangerously(), "throttle"),
            14 => (b.quotas("10/s"), "rate"),
            15 => (b.rate_limit(redis_layer()), "rate"),
            _ => (b.redis(unreachable_redis()), "redis"),
        }
    }

    #[test]
    fn a_setting_given_twice_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let e = builder()
            .denylist("10.0.0.0/8")
            .deny(IpSet::parse("192.168.0.0/16").unwrap())
            .build()
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "stack: deny list given twice (in code, or in the environment and in code): \
             give each setting once, since the second would silently replace the first"
        );
        // A list read from the environment is not replaced by one given in code.
        let env = |name: &str| match name {
            "PORTCULLIS_API_KEYS" => Some(KEY.to_owned()),
            "PORTCULLIS_ALLOWLIST" => Some("10.0.0.0/8".to_owned()),
            _ => None,
        };
        let e = StackBuilder::from_env_with(env)
            .unwrap()
            .allowlist("0.0.0.0/0")
            .build()
            .unwrap_err();
        assert!(
            e.to_string().starts_with("stack: allow list given twice"),
            "{e}"
        );
        assert!(
            builder()
                .disable_auth_throttle_dangerously()
                .auth_throttle(AuthThrottleLayer::recommended())
                .build()
                .is_err()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Whatever the settings and their order, a stack in which one setting was
        /// given twice is never built.
        #[test]
        fn no_stack_is_built_with_a_setting_given_twice(
            calls in proptest::collection::vec(0u8..17, 1..8),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _guard = rt.enter();
            let mut b = StackBuilder::new();
            let mut seen = Vec::new();
            let mut twice = false;
            for i in calls {
                let (next, setting) = set(b, i);
                b = next;
                twice |= seen.contains(&setting);
                seen.push(setting);
            }
            let built = b.build();
            if twice {
                prop_assert!(built.is_err());
            }
        }

        /// Wherever Redis is configured (on the stack or on the rate-limit layer),
        /// the throttle counts there, unless it was disabled or has its own.
        #[test]
        fn the_throttle_counts_in_any_redis_the_stack_has(
            redis_at in 0u8..3,
            throttle in 0u8..4,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _guard = rt.enter();
            let mut b = builder();
            b = match redis_at {
                0 => b,
                1 => b.redis(unreachable_redis()),
                _ => b.rate_limit(redis_layer()),
            };
            b = match throttle {
                0 => b,
                1 => b.auth_throttle(AuthThrottleLayer::new(Quota::per_hour(3).unwrap())),
                2 => b.auth_throttle(AuthThrottleLayer::recommended().redis(unreachable_redis())),
                _ => b.disable_auth_throttle_dangerously(),
            };
            let stack = b.build().unwrap();
            let on_redis = stack.auth_throttle().map(AuthThrottleLayer::has_redis);
            let expected = match throttle {
                3 => None,
                2 => Some(true),
                _ => Some(redis_at != 0),
            };
            prop_assert_eq!(on_redis, expected);
        }
    }
}
