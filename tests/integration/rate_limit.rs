//! RateLimitLayer and AuthThrottleLayer over real TCP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use portcullis::rejection::{Challenge, DenialReason, Rejection};
use portcullis::{AuthMethod, Principal};
use tower::{Layer, Service, ServiceBuilder};

use crate::common::{Peer, Reply, get, get_from, ip, serve};
use crate::log_capture;

/// Test-only authentication: `X-Test-Principal: id[;tier]` becomes a [`Principal`],
/// an API key unless `X-Test-Method: service_token` says otherwise.
/// (The real authentication layers are tested on their own.)
#[derive(Clone)]
pub struct TestPrincipalLayer;

impl<S> Layer<S> for TestPrincipalLayer {
    type Service = TestPrincipal<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TestPrincipal(inner)
    }
}

#[derive(Clone)]
pub struct TestPrincipal<S>(S);

impl<S, B> Service<Request<B>> for TestPrincipal<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let p = req
            .headers()
            .get("x-test-principal")
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .map(|v| {
                let (id, tier) = v.split_once(';').map_or((v, None), |(a, b)| (a, Some(b)));
                let method = match req.headers().get("x-test-method").map(|m| m.as_bytes()) {
                    Some(b"service_token") => AuthMethod::ServiceToken,
                    _ => AuthMethod::ApiKey,
                };
                let p = Principal::new(id, method);
                match tier {
                    Some(t) => p.with_tier(t),
                    None => p,
                }
            });
        if let Some(p) = p {
            req.extensions_mut().insert(p);
        }
        self.0.call(req)
    }
}

pub async fn serve_limited(layer: RateLimitLayer, client_ip: ClientIpConfig) -> SocketAddr {
    let stack = ServiceBuilder::new()
        .layer(ClientIpLayer::new(client_ip))
        .layer(TestPrincipalLayer)
        .layer(layer)
        .into_inner();
    serve("127.0.0.1:0", stack, Peer::Attached).await
}

/// One entry of the `RateLimit-Policy` field (draft-ietf-httpapi-ratelimit-headers-11).
#[derive(Debug)]
pub struct PolicyItem {
    pub name: String,
    /// `q`: requests per window.
    pub quota: u64,
    /// `w`: the window in seconds.
    pub window: Option<u64>,
}

/// One entry of the `RateLimit` field.
#[derive(Debug)]
pub struct LimitItem {
    pub name: String,
    /// `r`: requests left.
    pub remaining: u64,
    /// `t`: seconds until the quota is back.
    pub reset: Option<u64>,
}

/// A field's entries as (name, parameters), read as a Structured Field List
/// (RFC 9651) by `sfv`, an independent parser of what the layer writes.
fn sf_list(value: &str) -> Vec<(String, sfv::Parameters)> {
    let list: sfv::List = sfv::Parser::new(value)
        .parse()
        .expect("a structured field list");
    list.into_iter()
        .map(|entry| match entry {
            sfv::ListEntry::Item(item) => {
                let name = item.bare_item.as_string().expect("a string item").as_str();
                (name.to_owned(), item.params)
            }
            sfv::ListEntry::InnerList(_) => panic!("an inner list in a RateLimit field"),
        })
        .collect()
}

fn sf_u64(params: &sfv::Parameters, key: &str) -> Option<u64> {
    let key = sfv::KeyRef::from_str(key).unwrap();
    params
        .get(key)
        .map(|v| u64::try_from(i64::from(v.as_integer().expect("an integer"))).unwrap())
}

pub fn limits(r: &Reply) -> Vec<LimitItem> {
    sf_list(r.header("ratelimit").expect("RateLimit field"))
        .into_iter()
        .map(|(name, p)| LimitItem {
            remaining: sf_u64(&p, "r").expect("r is required"),
            reset: sf_u64(&p, "t"),
            name,
        })
        .collect()
}

pub fn policies(r: &Reply) -> Vec<PolicyItem> {
    sf_list(r.header("ratelimit-policy").expect("RateLimit-Policy"))
        .into_iter()
        .map(|(name, p)| PolicyItem {
            quota: sf_u64(&p, "q").expect("q is required"),
            window: sf_u64(&p, "w"),
            name,
        })
        .collect()
}

pub fn rt(r: &Reply) -> Vec<(String, u64, Option<u64>)> {
    limits(r)
        .into_iter()
        .map(|l| (l.name, l.remaining, l.reset))
        .collect()
}

fn one(name: &str, r: u64, t: u64) -> Vec<(String, u64, Option<u64>)> {
    vec![(name.to_owned(), r, Some(t))]
}

#[tokio::test]
async fn keys_are_independent_and_fields_exact() {
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("api", Quota::per_minute(3).unwrap()).unwrap())
        .build()
        .unwrap();
    let addr = serve_limited(layer, ClientIpConfig::peer_only()).await;
    let alice: &[&[u8]] = &[b"X-Test-Principal: alice"];
    let bob: &[&[u8]] = &[b"X-Test-Principal: bob"];

    // One request every 20 s: burst 3 at once, each refills in 20 s.
    for (r, t) in [(2, 20), (1, 40), (0, 60)] {
        let res = get(addr, alice).await;
        assert_eq!(res.status, 200);
        assert_eq!(rt(&res), one("api", r, t));
        let p = policies(&res);
        assert_eq!(
            (p[0].name.as_str(), p[0].quota, p[0].window),
            ("api", 3, Some(60))
        );
    }
    let refused = get(addr, alice).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("20"));
    assert_eq!(rt(&refused), one("api", 0, 60));
    assert_eq!(policies(&refused)[0].quota, 3);
    assert_eq!(
        refused.header("content-type"),
        Some("application/problem+json")
    );
    assert!(refused.body.contains("\"status\":429"), "{}", refused.body);
    assert!(!refused.body.contains("alice"));
    assert!(
        refused.header("x-ratelimit-limit").is_none(),
        "legacy headers are opt-in"
    );

    // Bob, from the same address, has his own bucket.
    let res = get(addr, bob).await;
    assert_eq!((res.status, rt(&res)), (200, one("api", 2, 20)));
    // So does an anonymous client (keyed by its address).
    let res = get(addr, &[]).await;
    assert_eq!((res.status, rt(&res)), (200, one("api", 2, 20)));
}

#[tokio::test]
async fn tiers_overrides_and_several_policies() {
    let layer = RateLimitLayer::builder()
        .policy(
            Policy::new("burst", Quota::per_minute(2).unwrap())
                .unwrap()
                .tier("gold", Quota::per_minute(4).unwrap())
                .unwrap()
                .principal(AuthMethod::ApiKey, "vip", Quota::per_minute(6).unwrap())
                .unwrap(),
        )
        .policy(Policy::new("hourly", Quota::per_hour(5).unwrap()).unwrap())
        .legacy_headers(true)
        .build()
        .unwrap();
    let addr = serve_limited(layer, ClientIpConfig::peer_only()).await;

    let count_allowed = |who: &'static [u8]| async move {
        let mut n = 0;
        loop {
            let r = get(addr, &[who]).await;
            if r.status != 200 {
                return (n, r);
            }
            n += 1;
        }
    };
    let (n, last) = count_allowed(b"X-Test-Principal: plain").await;
    assert_eq!(n, 2);
    let p = policies(&last);
    assert_eq!(
        (p[0].quota, p[0].window, p[1].quota, p[1].window),
        (2, Some(60), 5, Some(3600))
    );
    // Refused by "burst"; "hourly" spent exactly what was let through.
    assert_eq!(
        rt(&last),
        vec![
            ("burst".into(), 0, Some(60)),
            ("hourly".into(), 3, Some(1440))
        ]
    );
    assert_eq!(last.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(last.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(last.header("x-ratelimit-reset"), Some("60"));

    let (n, last) = count_allowed(b"X-Test-Principal: g1;gold").await;
    assert_eq!(n, 4);
    assert_eq!(policies(&last)[0].quota, 4);

    // The override beats the tier; the hourly policy caps it at 5.
    let (n, last) = count_allowed(b"X-Test-Principal: vip;gold").await;
    assert_eq!(n, 5);
    assert_eq!(policies(&last)[0].quota, 6);
    assert_eq!(limits(&last)[1].remaining, 0);
    assert_eq!(last.header("x-ratelimit-limit"), Some("5"));
    assert_eq!(last.header("retry-after"), Some("720"));

    // The override names the API key `vip`: a token whose `sub` is `vip` gets its tier.
    let token: &[&[u8]] = &[
        b"X-Test-Principal: vip;gold",
        b"X-Test-Method: service_token",
    ];
    let r = get(addr, token).await;
    assert_eq!((r.status, policies(&r)[0].quota), (200, 4));
}

#[tokio::test]
async fn a_key_and_a_token_subject_with_the_same_id_count_separately() {
    let capture = log_capture::capture();
    let layer = RateLimitLayer::builder()
        .policy(
            Policy::new("ns", Quota::per_minute(2).unwrap())
                .unwrap()
                .principal(
                    AuthMethod::ServiceToken,
                    "ns-probe",
                    Quota::per_minute(4).unwrap(),
                )
                .unwrap(),
        )
        .build()
        .unwrap();
    let addr = serve_limited(layer, ClientIpConfig::peer_only()).await;
    let key: &[&[u8]] = &[b"X-Test-Principal: ns-probe"];
    let token: &[&[u8]] = &[
        b"X-Test-Principal: ns-probe",
        b"X-Test-Method: service_token",
    ];

    for r in [1, 0] {
        let res = get(addr, key).await;
        assert_eq!((res.status, rt(&res)), (200, one("ns", r, 30 * (2 - r))));
    }
    assert_eq!(get(addr, key).await.status, 429);
    // The token has a bucket of its own, with its own override (4 per minute).
    for r in [3, 2, 1, 0] {
        let res = get(addr, token).await;
        assert_eq!((res.status, rt(&res)), (200, one("ns", r, 15 * (4 - r))));
    }
    let refused = get(addr, token).await;
    assert_eq!((refused.status, policies(&refused)[0].quota), (429, 4));
    // The audit events say which principal was limited: method and id.
    let methods: Vec<_> = capture
        .events_with("ns-probe")
        .iter()
        .map(|e| e["fields"]["method"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["api_key", "service_token"]);
}

/// The same through the real authentication layer: the API key `svc` and a
/// service token whose `sub` is `svc`, on one server, over TCP.
#[cfg(all(feature = "api-key", feature = "jwt"))]
#[tokio::test]
async fn real_keys_and_tokens_with_the_same_id_count_separately() {
    use portcullis::api_key::{ApiKeys, KeyRecord, KeyStore, generate_key};
    use portcullis::authenticate::AuthenticateLayer;
    use portcullis::jwt::{SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};

    const SECRET: [u8; 32] = *b"rate-limit-namespace-secret-32by";
    let key = generate_key("pc_test").unwrap();
    let keys = ApiKeys::new(
        KeyStore::from_records([KeyRecord::new("svc", key.digest()).unwrap()]).unwrap(),
    );
    let verifier = TokenVerifier::builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap())
        .issuer("https://issuer.test")
        .audience("api")
        .build()
        .unwrap();
    let token = TokenIssuer::builder(SigningKey::hs256(&SECRET).unwrap())
        .issuer("https://issuer.test")
        .subject("svc")
        .audience("api")
        .build()
        .unwrap()
        .mint()
        .unwrap();
    let limits = RateLimitLayer::builder()
        .policy(
            Policy::new("real", Quota::per_minute(2).unwrap())
                .unwrap()
                .principal(
                    AuthMethod::ServiceToken,
                    "svc",
                    Quota::per_minute(3).unwrap(),
                )
                .unwrap(),
        )
        .build()
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(AuthenticateLayer::api_keys(keys).with_service_tokens(verifier))
        .layer(limits)
        .into_inner();
    let addr = serve("127.0.0.1:0", stack, Peer::Attached).await;
    let key_header = format!("X-API-Key: {}", key.expose_secret());
    let token_header = format!("Authorization: Bearer {}", token.as_str());
    let as_key: &[&[u8]] = &[key_header.as_bytes()];
    let as_token: &[&[u8]] = &[token_header.as_bytes()];

    for _ in 0..2 {
        assert_eq!(get(addr, as_key).await.status, 200);
    }
    assert_eq!(
        get(addr, as_key).await.status,
        429,
        "the key's quota is spent"
    );
    let res = get(addr, as_token).await;
    assert_eq!(
        (res.status, rt(&res), policies(&res)[0].quota),
        (200, one("real", 2, 20), 3),
        "the token has its own bucket and its own override"
    );
}

#[cfg(feature = "authenticate")]
#[tokio::test]
async fn unauthenticated_mode_is_limited_per_client_address() {
    use portcullis::Scopes;
    use portcullis::authenticate::AuthenticateLayer;
    use portcullis::rate_limit::KeyContext;

    for custom_key in [false, true] {
        let mut builder = RateLimitLayer::builder()
            .policy(Policy::new("open", Quota::per_minute(2).unwrap()).unwrap());
        if custom_key {
            // A key function built on the principal sees none in this mode.
            builder = builder.key_fn(|cx: &KeyContext<'_>| {
                cx.principal()
                    .map(|p| format!("{} {}", p.identity(), cx.uri().path()))
            });
        }
        let stack = ServiceBuilder::new()
            .layer(ClientIpLayer::new(
                ClientIpConfig::trusted_proxies("127.0.0.1").unwrap(),
            ))
            .layer(AuthenticateLayer::allow_unauthenticated_requests_dangerously(Scopes::default()))
            .layer(builder.build().unwrap())
            .into_inner();
        let addr = serve("127.0.0.1:0", stack, Peer::Attached).await;
        let from = |xff: &'static str| async move {
            let h = format!("X-Forwarded-For: {xff}");
            get_from(Some(ip("127.0.0.1")), addr, &[h.as_bytes()]).await
        };
        assert_eq!(from("2001:db8:0:1::1").await.status, 200);
        assert_eq!(from("2001:db8:0:1::2").await.status, 200);
        assert_eq!(
            from("2001:db8:0:1:ffff::3").await.status,
            429,
            "one /64 is one client"
        );
        let r = from("2001:db8:0:2::1").await;
        assert_eq!(
            (r.status, rt(&r)),
            (200, one("open", 1, 30)),
            "another address has its own bucket (custom key: {custom_key})"
        );
        assert_eq!(from("198.51.100.7").await.status, 200);
    }
}

/// How many of `n` requests carrying `header`, sent one after another, got 200.
pub async fn admitted(addr: SocketAddr, header: &[u8], n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if get(addr, &[header]).await.status == 200 {
            ok += 1;
        }
    }
    ok
}

/// The longest bursts a quota may have (back in 300 days here) are held exactly:
/// the tolerance is far from the clock's end, never saturated into "always
/// allowed".
#[tokio::test]
async fn a_burst_on_a_long_window_is_held_exactly() {
    let quota = Quota::per_day(1).unwrap().with_burst(300).unwrap();
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("daily", quota).unwrap())
        .build()
        .unwrap();
    let addr = serve_limited(layer, ClientIpConfig::peer_only()).await;
    let ok = admitted(addr, b"X-Test-Principal: bursty", 310).await;
    assert_eq!(ok, 300, "a burst of 300 let {ok} of 310 through");
    // A burst that would take more than 366 days to come back is refused.
    assert!(Quota::per_day(1).unwrap().with_burst(367).is_err());
}

#[tokio::test]
async fn retry_after_is_right_after_waiting() {
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("slow", Quota::new(1, Duration::from_secs(2)).unwrap()).unwrap())
        .build()
        .unwrap();
    let addr = serve_limited(layer, ClientIpConfig::peer_only()).await;
    assert_eq!(get(addr, &[]).await.status, 200);
    let r = get(addr, &[]).await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("2")));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(addr, &[]).await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = get(addr, &[]).await;
    assert_eq!(r.status, 200, "allowed once Retry-After has passed");
    assert_eq!(rt(&r), one("slow", 0, 2));
}

#[tokio::test]
async fn shadow_mode_never_rejects_but_counts_and_logs() {
    let capture = log_capture::capture();
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("shadowed", Quota::per_minute(2).unwrap()).unwrap())
        .shadow_mode(true)
        .build()
        .unwrap();
    let addr = serve_limited(layer.clone(), ClientIpConfig::peer_only()).await;
    let who: &[&[u8]] = &[b"X-Test-Principal: shadow-probe-principal"];
    for i in 0..10 {
        let r = get(addr, who).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(limits(&r)[0].remaining, 2u64.saturating_sub(i + 1));
    }
    assert_eq!(layer.stats().shadow_limited, 8);
    assert_eq!(layer.stats().limited, 0);
    let events = capture.events_with("shadow-probe-principal");
    assert_eq!(events.len(), 8);
    for e in &events {
        assert_eq!(e["target"], portcullis::audit::TARGET);
        assert_eq!(e["fields"]["event"], "rate_limited");
        assert_eq!(e["fields"]["shadow"], true);
        assert_eq!(e["fields"]["policy"], "shadowed");
    }
}

#[tokio::test]
async fn refusals_are_audited() {
    let capture = log_capture::capture();
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("audited", Quota::per_minute(1).unwrap()).unwrap())
        .build()
        .unwrap();
    let addr = serve_limited(layer.clone(), ClientIpConfig::peer_only()).await;
    let who: &[&[u8]] = &[b"X-Test-Principal: audit-probe-principal"];
    assert_eq!(get(addr, who).await.status, 200);
    assert_eq!(get(addr, who).await.status, 429);
    let events = capture.events_with("audit-probe-principal");
    assert_eq!(events.len(), 1);
    let f = &events[0]["fields"];
    assert_eq!(events[0]["target"], "portcullis::audit");
    assert_eq!(f["event"], "rate_limited");
    assert_eq!(f["reason"], "rate_limited");
    assert_eq!(f["shadow"], false);
    assert_eq!(f["client_ip"], "127.0.0.1");
    assert_eq!(f["retry_after"], 60);
    assert_eq!(layer.stats().limited, 1);
}

#[tokio::test]
async fn ipv6_rotation_inside_a_64_shares_a_bucket() {
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("anon", Quota::per_minute(2).unwrap()).unwrap())
        .build()
        .unwrap();
    // Behind a trusted proxy on loopback, so the test can pick client addresses.
    let addr = serve_limited(layer, ClientIpConfig::trusted_proxies("127.0.0.1").unwrap()).await;
    let from = |xff: &'static str| async move {
        let h = format!("X-Forwarded-For: {xff}");
        get_from(Some(ip("127.0.0.1")), addr, &[h.as_bytes()]).await
    };
    assert_eq!(from("2001:db8:0:1::1").await.status, 200);
    assert_eq!(from("2001:db8:0:1:aaaa:bbbb:cccc:dddd").await.status, 200);
    let r = from("2001:db8:0:1:ffff::7").await;
    assert_eq!(
        r.status, 429,
        "a new address in the same /64 is the same client"
    );
    assert_eq!(
        from("2001:db8:0:2::1").await.status,
        200,
        "the next /64 is another client"
    );
    assert_eq!(from("198.51.100.1").await.status, 200);
    assert_eq!(
        from("198.51.100.2").await.status,
        200,
        "IPv4 is per address"
    );
}

#[tokio::test]
async fn ipv6_prefix_is_configurable() {
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("anon", Quota::per_minute(1).unwrap()).unwrap())
        .ipv6_prefix(128)
        .build()
        .unwrap();
    let addr = serve_limited(layer, ClientIpConfig::trusted_proxies("127.0.0.1").unwrap()).await;
    for a in ["2001:db8::1", "2001:db8::2"] {
        let h = format!("X-Forwarded-For: {a}");
        assert_eq!(
            get_from(Some(ip("127.0.0.1")), addr, &[h.as_bytes()])
                .await
                .status,
            200
        );
    }
    assert!(
        RateLimitLayer::builder()
            .policy(Policy::new("x", Quota::per_second(1).unwrap()).unwrap())
            .ipv6_prefix(129)
            .build()
            .is_err()
    );
}

#[test]
fn bad_configuration_fails_at_build() {
    let q = Quota::per_second(1).unwrap();
    assert!(RateLimitLayer::builder().build().is_err(), "no policy");
    let dup = RateLimitLayer::builder()
        .policy(Policy::new("a", q).unwrap())
        .policy(Policy::new("a", q).unwrap())
        .build();
    assert!(dup.unwrap_err().to_string().contains("twice"));
    assert!(Policy::new("has space", q).is_err());
    assert!(Policy::new("quote\"", q).is_err());
    assert!(Quota::per_second(0).is_err());
    assert!(Quota::per_hour(2_000_000_000).is_err());
    assert!(
        RateLimitLayer::builder()
            .policy(Policy::new("a", q).unwrap())
            .max_tracked_keys(0)
            .build()
            .is_err()
    );
    // The table is allocated up front: a cap past 2^24 keys is refused, not reserved.
    let too_many = RateLimitLayer::builder()
        .policy(Policy::new("a", q).unwrap())
        .max_tracked_keys((1 << 24) + 1)
        .build();
    assert!(too_many.unwrap_err().to_string().contains("at most"));
    assert!(
        RateLimitLayer::builder()
            .policy(Policy::new("a", q).unwrap())
            .max_tracked_keys(1 << 24)
            .build()
            .is_ok()
    );
}

/// At the cap, principals not tracked share one overflow bucket under the default
/// quota: a newcomer of a larger tier gets no more from it than anyone else, so a
/// flood of new keys cannot spend more than one default quota together.
#[tokio::test]
async fn untracked_keys_at_the_cap_share_one_default_quota() {
    let layer = RateLimitLayer::builder()
        .policy(
            Policy::new("api", Quota::per_hour(2).unwrap())
                .unwrap()
                .tier("gold", Quota::per_hour(1000).unwrap())
                .unwrap(),
        )
        .max_tracked_keys(1)
        .build()
        .unwrap();
    let addr = serve_limited(layer.clone(), ClientIpConfig::peer_only()).await;
    assert_eq!(
        get(addr, &[b"X-Test-Principal: resident"]).await.status,
        200
    );
    assert_eq!(layer.tracked_keys(), 1);

    // Every further principal is untracked: together they get the default 2 per hour,
    // gold or not.
    let mut allowed = 0;
    for i in 0..10 {
        let who = format!("X-Test-Principal: newcomer-{i};gold");
        let r = get(addr, &[who.as_bytes()]).await;
        if r.status == 200 {
            allowed += 1;
        } else {
            assert_eq!(r.status, 429);
            assert!(r.header("retry-after").is_some());
        }
    }
    assert_eq!(
        allowed, 2,
        "the overflow bucket's quota, not the gold tier's"
    );
    assert_eq!(layer.tracked_keys(), 1);
    // The tracked principal keeps its own bucket.
    assert_eq!(
        get(addr, &[b"X-Test-Principal: resident"]).await.status,
        200
    );
}

/// A stand-in for the authentication layer: `X-Test-Key: bad` is an unknown key,
/// no header is a missing credential, `X-Test-Key: good` passes.
#[derive(Clone)]
struct FakeAuthLayer;

impl<S> Layer<S> for FakeAuthLayer {
    type Service = FakeAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        FakeAuth(inner)
    }
}

#[derive(Clone)]
struct FakeAuth<S>(S);

impl<S, B> Service<Request<B>> for FakeAuth<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let c = Challenge::api_key("test").unwrap();
        match req.headers().get("x-test-key").map(|v| v.as_bytes()) {
            Some(b"good") => Box::pin(self.0.call(req)),
            Some(_) => {
                let r = Rejection::invalid_credential(&c, DenialReason::UnknownKey).into_response();
                Box::pin(async move { Ok(r) })
            }
            None => {
                let r = Rejection::missing_credential(&c).into_response();
                Box::pin(async move { Ok(r) })
            }
        }
    }
}

#[tokio::test]
async fn failed_auth_throttling_kicks_in_and_expires() {
    let capture = log_capture::capture();
    // 3 failures, then one more per second.
    let throttle = AuthThrottleLayer::new(Quota::new(3, Duration::from_secs(3)).unwrap());
    let stack = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(throttle)
        .layer(FakeAuthLayer)
        .into_inner();
    let addr = serve("127.0.0.1:0", stack, Peer::Attached).await;
    let attacker = Some(ip("127.0.0.21"));
    let bystander = Some(ip("127.0.0.22"));
    let bad: &[&[u8]] = &[b"X-Test-Key: bad"];
    let good: &[&[u8]] = &[b"X-Test-Key: good"];

    // Missing credentials are not guesses: never counted.
    for _ in 0..10 {
        assert_eq!(get_from(attacker, addr, &[]).await.status, 401);
    }
    for _ in 0..3 {
        assert_eq!(get_from(attacker, addr, bad).await.status, 401);
    }
    // Now throttled: a wrong key is answered 429 instead of 401, a valid one passes.
    let r = get_from(attacker, addr, bad).await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    assert!(
        r.header("www-authenticate").is_none(),
        "the refusal says nothing about the key"
    );
    assert_eq!(get_from(attacker, addr, good).await.status, 200);
    assert_eq!(get_from(attacker, addr, &[]).await.status, 401);
    // Other addresses are unaffected.
    assert_eq!(get_from(bystander, addr, good).await.status, 200);
    assert_eq!(get_from(bystander, addr, bad).await.status, 401);

    let events = capture.events_with("127.0.0.21");
    assert!(
        events.iter().any(|e| e["fields"]["event"] == "auth_throttled"
            && e["target"] == "portcullis::audit"),
        "{events:?}"
    );

    // It expires: after Retry-After one more failure is answered.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(get_from(attacker, addr, bad).await.status, 401);
    assert_eq!(get_from(attacker, addr, bad).await.status, 429);
    assert_eq!(get_from(attacker, addr, good).await.status, 200);
}
