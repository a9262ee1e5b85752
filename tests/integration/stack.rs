//! The assembled stack over real TCP: the order of its checks (a denied address is
//! refused before any credential is read, a throttled address before its key is
//! checked, the rate limit keyed by principal), the request id and one access event
//! on every refusal, API keys and service tokens, construction errors for every
//! incomplete or unsafe configuration, and configuration from environment variables.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::client_ip::ClientIpConfig;
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use portcullis::stack::{StackBuilder, StackLayer};
use portcullis::{Principal, Scopes};
use serde_json::Value;
use tower::util::BoxCloneService;

use crate::common::{self, Handler, Peer, Reply, ip};
use crate::log_capture::capture;

/// Answers 200 with the principal's id, or `none`.
fn echo_principal() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let id = req
            .extensions()
            .get::<Principal>()
            .map_or_else(|| "none".to_owned(), |p| p.id().to_owned());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id))))
    }))
}

async fn serve(stack: StackLayer) -> SocketAddr {
    common::serve_with("127.0.0.1:0", stack, Peer::Attached, echo_principal()).await
}

/// A key store with one generated key per id.
fn keys(ids: &[&str]) -> (ApiKeys, Vec<GeneratedKey>) {
    let generated: Vec<GeneratedKey> = ids
        .iter()
        .map(|_| generate_key("pc_test").unwrap())
        .collect();
    let mut file = String::new();
    for (id, key) in ids.iter().zip(&generated) {
        file.push_str(&format!(
            "[[keys]]\nid = \"{id}\"\ndigest = \"{}\"\nscopes = [\"jobs:read\"]\n",
            key.digest()
        ));
    }
    (ApiKeys::new(KeyStore::from_toml(&file).unwrap()), generated)
}

/// `GET <path>` from `from` with a request id and optionally an API key.
async fn call(addr: SocketAddr, from: &str, path: &str, rid: &str, key: Option<&str>) -> Reply {
    let rid_header = format!("X-Request-Id: {rid}");
    let key_header = key.map(|k| format!("X-API-Key: {k}"));
    let mut headers: Vec<&[u8]> = vec![rid_header.as_bytes()];
    if let Some(k) = &key_header {
        headers.push(k.as_bytes());
    }
    common::get_path_from(Some(ip(from)), addr, path, &headers).await
}

/// The access events (target `portcullis::access`) of request id `rid`: waits until
/// one is there, then a little longer to see any duplicate.
async fn access_events(rid: &str) -> Vec<Value> {
    let find = || -> Vec<Value> {
        capture()
            .events_with(rid)
            .into_iter()
            .filter(|e| e["target"] == "portcullis::access" && e["fields"]["request_id"] == rid)
            .map(|e| e["fields"].clone())
            .collect()
    };
    for _ in 0..100 {
        if !find().is_empty() {
            tokio::time::sleep(Duration::from_millis(30)).await;
            return find();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access event for request id {rid}");
}

/// One access event for `rid`, with this status, denial reason and client address.
async fn assert_logged(rid: &str, status: u16, reason: Option<&str>, client: &str) -> Value {
    let events = access_events(rid).await;
    assert_eq!(
        events.len(),
        1,
        "exactly one access event for {rid}: {events:?}"
    );
    let e = events.into_iter().next().unwrap();
    assert_eq!(e["status"], status, "{rid}: {e}");
    match reason {
        Some(r) => assert_eq!(e["denial_reason"], r, "{rid}: {e}"),
        None => assert!(e.get("denial_reason").is_none(), "{rid}: {e}"),
    }
    assert_eq!(e["client_ip"], client, "{rid}: {e}");
    e
}

#[tokio::test]
async fn a_denied_address_gets_403_before_any_credential_check() {
    capture();
    let (keys, k) = keys(&["stack-deny-client"]);
    let stack = StackLayer::builder()
        .api_keys(keys)
        .allowlist("127.0.0.0/8")
        .denylist("127.0.0.66/32")
        .build()
        .unwrap();
    let addr = serve(stack).await;

    // From the denied address: 403 with a valid key, a wrong key and no key at all.
    let valid = k[0].expose_secret();
    let wrong = "pc_test_wrongwrongwrongwrongwrongwrong";
    for (rid, key) in [
        ("stack-deny-valid", Some(valid)),
        ("stack-deny-wrong", Some(wrong)),
        ("stack-deny-none", None),
    ] {
        let r = call(addr, "127.0.0.66", "/", rid, key).await;
        assert_eq!(r.status, 403, "{rid}");
        assert!(
            r.header("www-authenticate").is_none(),
            "{rid}: no credential challenge"
        );
        assert_eq!(r.header("x-request-id"), Some(rid));
        assert!(!r.body.contains("ip_denied") && !r.body.contains(valid));
        let e = assert_logged(rid, 403, Some("ip_denied"), "127.0.0.66").await;
        assert!(e.get("principal").is_none());
    }
    // From an allowed address the key works, and the principal is logged.
    let r = call(addr, "127.0.0.67", "/", "stack-deny-allowed", Some(valid)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "stack-deny-client"));
    let e = assert_logged("stack-deny-allowed", 200, None, "127.0.0.67").await;
    assert_eq!(e["principal"], "stack-deny-client");
    assert_eq!(e["auth_method"], "api_key");
    assert!(!capture().text().contains(valid), "the key is never logged");
}

#[tokio::test]
async fn a_throttled_address_gets_429_before_the_key_is_checked() {
    capture();
    let (keys, k) = keys(&["stack-throttle-client"]);
    let stack = StackLayer::builder()
        .api_keys(keys)
        .auth_throttle(
            AuthThrottleLayer::new(Quota::new(2, Duration::from_secs(3600)).unwrap())
                .lockout_before_verify(),
        )
        .build()
        .unwrap();
    let addr = serve(stack).await;
    let valid = k[0].expose_secret();
    let other = generate_key("pc_test").unwrap();
    let wrong = other.expose_secret();

    for rid in ["stack-thr-1", "stack-thr-2"] {
        let r = call(addr, "127.0.0.71", "/", rid, Some(wrong)).await;
        assert_eq!(r.status, 401, "{rid}");
        assert_eq!(r.header("x-request-id"), Some(rid));
        assert_logged(rid, 401, Some("unknown_key"), "127.0.0.71").await;
    }
    // The third request carries the valid key, and is refused without a lookup.
    let r = call(addr, "127.0.0.71", "/", "stack-thr-3", Some(valid)).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-request-id"), Some("stack-thr-3"));
    let e = assert_logged("stack-thr-3", 429, Some("auth_throttled"), "127.0.0.71").await;
    assert!(e.get("principal").is_none(), "the key was not checked: {e}");
    // A request without a credential is throttled too (the address is).
    let r = call(addr, "127.0.0.71", "/", "stack-thr-4", None).await;
    assert_eq!(r.status, 429);
    // The audit trail of this address: two failures, then only throttling; the
    // valid key was never looked up (no auth_succeeded).
    let audit: Vec<String> = capture()
        .events_with("127.0.0.71")
        .iter()
        .filter(|e| e["target"] == "portcullis::audit" && e["fields"]["client_ip"] == "127.0.0.71")
        .map(|e| e["fields"]["event"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        audit,
        [
            "auth_failed",
            "auth_failed",
            "auth_throttled",
            "auth_throttled"
        ]
    );
    // Another address is untouched.
    let r = call(addr, "127.0.0.72", "/", "stack-thr-5", Some(valid)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "stack-throttle-client"));
}

#[tokio::test]
async fn the_default_throttle_is_on_and_can_be_disabled_only_explicitly() {
    capture();
    let wrong = "0123456789abcdef0123456789abcdef-wrong";
    let (keys_on, _) = keys(&["stack-default-throttle"]);
    let on = serve(StackLayer::builder().api_keys(keys_on).build().unwrap()).await;
    // The recommended setting allows 10 failures, then refuses.
    let mut statuses = Vec::new();
    for i in 0..11 {
        let rid = format!("stack-dthr-{i}");
        statuses.push(call(on, "127.0.0.81", "/", &rid, Some(wrong)).await.status);
    }
    assert_eq!(statuses[..10], [401; 10]);
    assert_eq!(statuses[10], 429);

    let (keys_off, _) = keys(&["stack-no-throttle"]);
    let stack = StackLayer::builder()
        .api_keys(keys_off)
        .disable_auth_throttle_dangerously()
        .build()
        .unwrap();
    assert!(stack.auth_throttle().is_none());
    let off = serve(stack).await;
    for i in 0..12 {
        let rid = format!("stack-nothr-{i}");
        assert_eq!(
            call(off, "127.0.0.82", "/", &rid, Some(wrong)).await.status,
            401
        );
    }
    assert!(
        capture()
            .text()
            .contains("FAILED-AUTHENTICATION THROTTLING IS DISABLED"),
        "disabling the throttle is logged loudly"
    );
}

#[tokio::test]
async fn the_rate_limit_is_keyed_by_principal() {
    capture();
    let (keys, k) = keys(&["stack-rl-a", "stack-rl-b"]);
    let stack = StackLayer::builder()
        .api_keys(keys)
        .quotas("2/h")
        .build()
        .unwrap();
    let addr = serve(stack).await;
    let (a, b) = (k[0].expose_secret(), k[1].expose_secret());
    for rid in ["stack-rl-a1", "stack-rl-a2"] {
        let r = call(addr, "127.0.0.91", "/", rid, Some(a)).await;
        assert_eq!(r.status, 200, "{rid}");
        assert!(r.header("ratelimit").is_some());
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"per-3600s\";q=2;w=3600")
        );
    }
    let r = call(addr, "127.0.0.91", "/", "stack-rl-a3", Some(a)).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-request-id"), Some("stack-rl-a3"));
    let e = assert_logged("stack-rl-a3", 429, Some("rate_limited"), "127.0.0.91").await;
    assert_eq!(e["principal"], "stack-rl-a");
    // Same address, other key: its own quota.
    let r = call(addr, "127.0.0.91", "/", "stack-rl-b1", Some(b)).await;
    assert_eq!((r.status, r.body.as_str()), (200, "stack-rl-b"));
    // Same key, other address: still limited.
    let r = call(addr, "127.0.0.92", "/", "stack-rl-a4", Some(a)).await;
    assert_eq!(r.status, 429);
}

/// Request id, source address, key, expected status and denial reason.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, u16, Option<&'a str>);

#[tokio::test]
async fn every_refusal_carries_the_request_id_and_one_access_event() {
    capture();
    let (keys, k) = keys(&["stack-every"]);
    let stack = StackLayer::builder()
        .api_keys(keys)
        .allowlist("127.0.0.0/8")
        .denylist("127.0.0.102/32")
        .quotas("1/h")
        .build()
        .unwrap();
    let addr = serve(stack).await;
    let valid = k[0].expose_secret();
    let cases: [Case<'_>; 5] = [
        (
            "stack-every-missing",
            "127.0.0.101",
            None,
            401,
            Some("missing_credential"),
        ),
        (
            "stack-every-garbage",
            "127.0.0.101",
            Some("pc_test_short"),
            401,
            Some("invalid_key_format"),
        ),
        (
            "stack-every-denied",
            "127.0.0.102",
            Some(valid),
            403,
            Some("ip_denied"),
        ),
        ("stack-every-ok", "127.0.0.101", Some(valid), 200, None),
        (
            "stack-every-limited",
            "127.0.0.101",
            Some(valid),
            429,
            Some("rate_limited"),
        ),
    ];
    for (rid, from, key, status, reason) in cases {
        let r = call(addr, from, "/", rid, key).await;
        assert_eq!(r.status, status, "{rid}");
        assert_eq!(r.header("x-request-id"), Some(rid), "{rid}");
        if status != 200 {
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
        }
        assert_logged(rid, status, reason, from).await;
    }
    // A request without an id gets one made, on a refusal too.
    let r = common::get_path_from(Some(ip("127.0.0.101")), addr, "/no-id", &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn trusted_proxies_and_the_allowlist_from_the_environment() {
    capture();
    let key = generate_key("pc_test").unwrap();
    let env: HashMap<&str, String> = HashMap::from([
        ("PORTCULLIS_TRUSTED_PROXIES", "127.0.0.0/8".to_owned()),
        ("PORTCULLIS_FORWARDED_HEADER", "forwarded".to_owned()),
        ("PORTCULLIS_ALLOWLIST", "203.0.113.0/24".to_owned()),
        ("PORTCULLIS_DENYLIST", "203.0.113.66".to_owned()),
        ("PORTCULLIS_API_KEYS", key.expose_secret().to_owned()),
        (
            "PORTCULLIS_API_KEY_SCOPES",
            "jobs:read jobs:write".to_owned(),
        ),
        ("PORTCULLIS_RATE_LIMIT", "50/s, 1000/h".to_owned()),
        ("PORTCULLIS_AUTH_THROTTLE", "3/10m".to_owned()),
    ]);
    let stack = StackBuilder::from_env_with(|n| env.get(n).cloned())
        .unwrap()
        .build()
        .unwrap();
    assert!(!format!("{stack:?}").contains(key.expose_secret()));
    let addr = serve(stack).await;
    let kh = format!("X-API-Key: {}", key.expose_secret());
    let send = |fwd: &'static str, rid: &'static str| {
        let kh = kh.clone();
        async move {
            let f = format!("Forwarded: for={fwd}");
            let r = format!("X-Request-Id: {rid}");
            common::get_path_from(
                Some(ip("127.0.0.111")),
                addr,
                "/",
                &[kh.as_bytes(), f.as_bytes(), r.as_bytes()],
            )
            .await
        }
    };
    let r = send("203.0.113.9", "stack-env-ok").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "env-1", "raw env keys get an env-<position> id");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"per-1s\";q=50;w=1, \"per-3600s\";q=1000;w=3600")
    );
    assert_logged("stack-env-ok", 200, None, "203.0.113.9").await;
    let r = send("198.51.100.1", "stack-env-out").await;
    assert_eq!(r.status, 403);
    assert_logged("stack-env-out", 403, Some("ip_denied"), "198.51.100.1").await;
    let r = send("203.0.113.66", "stack-env-deny").await;
    assert_eq!(r.status, 403);
    // X-Forwarded-For is not the configured header: the peer is the client.
    let r = common::get_path_from(
        Some(ip("127.0.0.111")),
        addr,
        "/",
        &[kh.as_bytes(), b"X-Forwarded-For: 203.0.113.9"],
    )
    .await;
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn a_cdn_client_header_from_the_environment() {
    let key = generate_key("pc_test").unwrap();
    let env: HashMap<&str, String> = HashMap::from([
        ("PORTCULLIS_TRUSTED_PROXIES", "127.0.0.0/28".to_owned()),
        ("PORTCULLIS_FORWARDED_HEADER", "CF-Connecting-IP".to_owned()),
        ("PORTCULLIS_ALLOWLIST", "203.0.113.0/24".to_owned()),
        ("PORTCULLIS_API_KEYS", key.expose_secret().to_owned()),
    ]);
    let stack = StackBuilder::from_env_with(|n| env.get(n).cloned())
        .unwrap()
        .build()
        .unwrap();
    let addr = serve(stack).await;
    let kh = format!("X-API-Key: {}", key.expose_secret());
    let send = |from: &'static str, cdn: &'static str| {
        let kh = kh.clone();
        async move {
            let h: [&[u8]; 2] = [kh.as_bytes(), cdn.as_bytes()];
            common::get_path_from(Some(ip(from)), addr, "/", &h).await
        }
    };
    // Through the edge, the CDN's client address is the one the allowlist checks.
    assert_eq!(
        send("127.0.0.2", "CF-Connecting-IP: 203.0.113.9")
            .await
            .status,
        200
    );
    assert_eq!(
        send("127.0.0.2", "CF-Connecting-IP: 198.51.100.9")
            .await
            .status,
        403
    );
    // A client outside the edge cannot claim an allowed address.
    assert_eq!(
        send("127.0.0.77", "CF-Connecting-IP: 203.0.113.9")
            .await
            .status,
        403
    );
    // An X-Forwarded-For from the edge is not the configured header.
    assert_eq!(
        send("127.0.0.2", "X-Forwarded-For: 203.0.113.9")
            .await
            .status,
        403
    );
}

#[cfg(feature = "jwt")]
mod tokens {
    use super::*;
    use portcullis::jwt::{Algorithm, SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};

    const EC_KEY: &[u8] = include_bytes!("../data/jwt/ec.key.pem");
    const ISS: &str = "https://ci.example";
    const AUD: &str = "jobs-api";

    fn issuer(sub: &str) -> TokenIssuer {
        TokenIssuer::builder(
            SigningKey::from_pem(Algorithm::ES256, EC_KEY)
                .unwrap()
                .kid("ec-1"),
        )
        .issuer(ISS)
        .subject(sub)
        .audience(AUD)
        .scope("jobs:work")
        .build()
        .unwrap()
    }

    fn jwks_path() -> String {
        format!("{}/tests/data/jwt/jwks.json", env!("CARGO_MANIFEST_DIR"))
    }

    async fn bearer(addr: SocketAddr, from: &str, rid: &str, token: &str) -> Reply {
        let a = format!("Authorization: Bearer {token}");
        let r = format!("X-Request-Id: {rid}");
        common::get_path_from(Some(ip(from)), addr, "/", &[a.as_bytes(), r.as_bytes()]).await
    }

    #[tokio::test]
    async fn service_tokens_only_from_the_environment() {
        capture();
        let env: HashMap<&str, String> = HashMap::from([
            ("PORTCULLIS_JWKS_FILE", jwks_path()),
            (
                "PORTCULLIS_TOKEN_ISSUERS",
                format!("https://other.example, {ISS}"),
            ),
            ("PORTCULLIS_TOKEN_AUDIENCE", AUD.to_owned()),
        ]);
        let stack = StackBuilder::from_env_with(|n| env.get(n).cloned())
            .unwrap()
            .build()
            .unwrap();
        let addr = serve(stack).await;
        let token = issuer("stack-worker").mint().unwrap();
        let r = bearer(addr, "127.0.0.121", "stack-tok-ok", token.as_str()).await;
        assert_eq!((r.status, r.body.as_str()), (200, "stack-worker"));
        let e = assert_logged("stack-tok-ok", 200, None, "127.0.0.121").await;
        assert_eq!(e["principal"], "stack-worker");
        assert_eq!(e["auth_method"], "service_token");
        // A tampered token: 401 invalid_token.
        let mut bad = token.as_str().to_owned();
        bad.pop();
        bad.push(if token.as_str().ends_with('A') {
            'B'
        } else {
            'A'
        });
        let r = bearer(addr, "127.0.0.121", "stack-tok-bad", &bad).await;
        assert_eq!(r.status, 401);
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains("invalid_token")
        );
        assert_logged("stack-tok-bad", 401, Some("invalid_token"), "127.0.0.121").await;
        // An API key is no credential here.
        let r = call(
            addr,
            "127.0.0.121",
            "/",
            "stack-tok-key",
            Some("0123456789abcdef0123456789abcdef"),
        )
        .await;
        assert_eq!(r.status, 401);
    }

    #[tokio::test]
    async fn the_jwks_file_from_the_environment_is_reloaded() {
        capture();
        let dir =
            std::env::temp_dir().join(format!("portcullis-stack-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jwt");
        std::fs::copy(data.join("jwks.json"), &path).unwrap();
        let env: HashMap<&str, String> = HashMap::from([
            ("PORTCULLIS_JWKS_FILE", path.to_str().unwrap().to_owned()),
            ("PORTCULLIS_TOKEN_ISSUERS", ISS.to_owned()),
            ("PORTCULLIS_TOKEN_AUDIENCE", AUD.to_owned()),
            ("PORTCULLIS_JWKS_RELOAD_SECS", "1".to_owned()),
        ]);
        let stack = StackBuilder::from_env_with(|n| env.get(n).cloned())
            .unwrap()
            .build()
            .unwrap();
        let addr = serve(stack).await;
        let token = issuer("stack-reload-worker").mint().unwrap();
        let r = bearer(addr, "127.0.0.125", "stack-reload-1", token.as_str()).await;
        assert_eq!(r.status, 200);
        // Rotate: ec-1 is gone from the new file. Replace atomically.
        let tmp = dir.join("jwks.json.tmp");
        std::fs::copy(data.join("jwks-rotated.json"), &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let mut status = 200;
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let rid = format!("stack-reload-poll-{i}");
            status = bearer(addr, "127.0.0.125", &rid, token.as_str())
                .await
                .status;
            if status == 401 {
                break;
            }
        }
        assert_eq!(
            status, 401,
            "the rotated-out key is refused after the reload"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn api_keys_and_service_tokens_together() {
        capture();
        let (keys, k) = keys(&["stack-both-client"]);
        let verifier = TokenVerifier::builder()
            .key(VerifyingKey::hs256(&[7u8; 32]).unwrap().kid("hs"))
            .keys(
                portcullis::jwt::KeySet::from_jwks(include_str!("../data/jwt/jwks.json")).unwrap(),
            )
            .issuer(ISS)
            .audience(AUD)
            .build()
            .unwrap();
        let stack = StackLayer::builder()
            .api_keys(keys)
            .service_tokens(verifier)
            .quotas("1/h")
            .build()
            .unwrap();
        let addr = serve(stack).await;
        let r = call(
            addr,
            "127.0.0.131",
            "/",
            "stack-both-key",
            Some(k[0].expose_secret()),
        )
        .await;
        assert_eq!((r.status, r.body.as_str()), (200, "stack-both-client"));
        let token = issuer("stack-both-worker").mint().unwrap();
        let r = bearer(addr, "127.0.0.131", "stack-both-tok", token.as_str()).await;
        assert_eq!((r.status, r.body.as_str()), (200, "stack-both-worker"));
        // Each principal has its own quota of one.
        let r = bearer(addr, "127.0.0.131", "stack-both-tok2", token.as_str()).await;
        assert_eq!(r.status, 429);
        let e = assert_logged("stack-both-tok2", 429, Some("rate_limited"), "127.0.0.131").await;
        assert_eq!(e["principal"], "stack-both-worker");
    }
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn works_with_axum_bodies_and_connect_info() {
    use axum::Router;
    use axum::routing::get;
    let (keys, k) = keys(&["stack-axum"]);
    let stack = StackLayer::builder().api_keys(keys).build().unwrap();
    let app: Router = Router::new()
        .route(
            "/",
            get(|p: axum::Extension<Principal>| async move { p.id().to_owned() }),
        )
        .layer(stack);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let r = call(
        addr,
        "127.0.0.141",
        "/",
        "stack-axum-ok",
        Some(k[0].expose_secret()),
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, "stack-axum"));
    let r = call(addr, "127.0.0.141", "/", "stack-axum-no", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-request-id"), Some("stack-axum-no"));
}

// ---------------------------------------------------------------------------------
// Construction errors
// ---------------------------------------------------------------------------------

fn one_key() -> ApiKeys {
    keys(&["stack-cfg"]).0
}

fn err(b: StackBuilder) -> String {
    b.build()
        .expect_err("an unsafe configuration must not build")
        .to_string()
}

#[test]
fn construction_errors_for_incomplete_or_unsafe_configs() {
    let no_credentials = err(StackLayer::builder().allowlist("10.0.0.0/8"));
    assert!(
        no_credentials.contains("no credentials"),
        "{no_credentials}"
    );

    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .allowlist("10.0.0.0/8, nope"));
    assert!(e.starts_with("allowlist:") && e.contains("entry 2"), "{e}");
    let e = err(StackLayer::builder().api_keys(one_key()).denylist(""));
    assert!(e.starts_with("denylist:"), "{e}");
    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .trusted_proxies("10.0.0.0/33"));
    assert!(e.starts_with("trusted proxies:"), "{e}");
    let e = err(StackLayer::builder().api_keys(one_key()).quotas("0/s"));
    assert!(e.contains("rate limit") && e.contains("zero quota"), "{e}");
    let e = err(StackLayer::builder().api_keys(one_key()).quotas("10/0s"));
    assert!(e.contains("rate limit"), "{e}");
    let e = err(StackLayer::builder().api_keys(one_key()).quotas(""));
    assert!(e.contains("quota 1 is empty"), "{e}");
    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .allow_unauthenticated_requests_dangerously(Scopes::default()));
    assert!(e.contains("unauthenticated mode cannot be combined"), "{e}");
    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .forwarded_header(portcullis::client_ip::ForwardedHeader::Forwarded));
    assert!(e.contains("without trusted proxies"), "{e}");
    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .trusted_proxies("10.0.0.0/8")
        .client_ip(ClientIpConfig::peer_only()));
    assert!(e.contains("not both"), "{e}");
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("p", Quota::per_second(1).unwrap()).unwrap())
        .build()
        .unwrap();
    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .quotas("1/s")
        .rate_limit(layer));
    assert!(e.contains("not both"), "{e}");
    let e = err(StackLayer::builder()
        .api_keys(one_key())
        .realm("bad\"realm"));
    assert!(!e.is_empty());
}

#[test]
fn the_explicit_unauthenticated_mode_builds() {
    let stack = StackLayer::builder()
        .allow_unauthenticated_requests_dangerously(Scopes::parse("jobs:read").unwrap())
        .build();
    assert!(stack.is_ok());
}

#[test]
fn the_default_rate_limit_is_documented_and_applied() {
    let stack = StackLayer::builder().api_keys(one_key()).build().unwrap();
    assert_eq!(portcullis::stack::DEFAULT_QUOTA, "100/s");
    assert!(format!("{stack:?}").contains("per-1s"));
}

// ---------------------------------------------------------------------------------
// Environment parsing
// ---------------------------------------------------------------------------------

fn from_env(vars: &[(&str, &str)]) -> Result<StackBuilder, String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    StackBuilder::from_env_with(|n| map.get(n).cloned()).map_err(|e| e.to_string())
}

const RAW_KEY: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn env_errors_name_the_variable_and_never_echo_secrets() {
    // A bad raw key: named by variable and position, never echoed.
    let secret = "hunter2-is-too-short";
    let e = from_env(&[("PORTCULLIS_API_KEYS", secret)]).unwrap_err();
    assert!(
        e.starts_with("PORTCULLIS_API_KEYS:") && e.contains("entry 1"),
        "{e}"
    );
    assert!(!e.contains(secret), "{e}");

    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("PORTCULLIS_TRUSTED_PROXIES", "10.0.0.0/8, x")],
            "PORTCULLIS_TRUSTED_PROXIES:",
        ),
        (
            &[("PORTCULLIS_ALLOWLIST", "10.0.0.300")],
            "PORTCULLIS_ALLOWLIST:",
        ),
        (
            &[("PORTCULLIS_DENYLIST", "::1/129")],
            "PORTCULLIS_DENYLIST:",
        ),
        (
            &[("PORTCULLIS_RATE_LIMIT", "100/s, 0/h")],
            "PORTCULLIS_RATE_LIMIT: quota 2",
        ),
        (
            &[("PORTCULLIS_RATE_LIMIT", "100 per second")],
            "PORTCULLIS_RATE_LIMIT:",
        ),
        (
            &[("PORTCULLIS_AUTH_THROTTLE", "0/5m")],
            "PORTCULLIS_AUTH_THROTTLE:",
        ),
        (
            &[("PORTCULLIS_FORWARDED_HEADER", "via")],
            "PORTCULLIS_FORWARDED_HEADER:",
        ),
        (
            &[("PORTCULLIS_FORWARDED_HEADER", "forwarded")],
            "PORTCULLIS_FORWARDED_HEADER needs PORTCULLIS_TRUSTED_PROXIES",
        ),
        (
            &[("PORTCULLIS_API_KEY_SCOPES", "jobs:read")],
            "PORTCULLIS_API_KEY_SCOPES is set but PORTCULLIS_API_KEYS is not",
        ),
        (
            &[
                ("PORTCULLIS_API_KEYS", RAW_KEY),
                ("PORTCULLIS_API_KEY_SCOPES", "bad\"scope"),
            ],
            "PORTCULLIS_API_KEY_SCOPES:",
        ),
        (
            &[
                ("PORTCULLIS_API_KEYS", RAW_KEY),
                ("PORTCULLIS_KEY_FILE", "/nonexistent"),
            ],
            "PORTCULLIS_KEY_FILE and PORTCULLIS_API_KEYS exclude each other",
        ),
        (
            &[("PORTCULLIS_KEY_FILE", "/nonexistent/keys.toml")],
            "PORTCULLIS_KEY_FILE:",
        ),
        (
            &[
                ("PORTCULLIS_KEY_FILE", "/x"),
                ("PORTCULLIS_KEY_FILE_RELOAD_SECS", "soon"),
            ],
            "PORTCULLIS_KEY_FILE_RELOAD_SECS:",
        ),
    ];
    for (vars, want) in cases {
        let e = from_env(vars).expect_err(want);
        assert!(e.starts_with(want), "{vars:?}: {e}");
    }
}

#[test]
fn env_without_credentials_fails_at_build() {
    let b = from_env(&[("PORTCULLIS_ALLOWLIST", "10.0.0.0/8")]).unwrap();
    let e = b.build().unwrap_err().to_string();
    assert!(e.contains("no credentials"), "{e}");
    // A blank value is not "unset": it is an error naming the variable.
    let e = from_env(&[
        ("PORTCULLIS_ALLOWLIST", "10.0.0.0/8"),
        ("PORTCULLIS_API_KEYS", "  "),
    ])
    .unwrap_err();
    assert!(e.starts_with("PORTCULLIS_API_KEYS:"), "{e}");
}

#[test]
fn env_key_file_is_loaded() {
    let key = generate_key("pc_test").unwrap();
    let dir = std::env::temp_dir().join(format!("portcullis-stack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!(
            "[[keys]]\nid = \"from-file\"\ndigest = \"{}\"\n",
            key.digest()
        ),
    )
    .unwrap();
    let b = from_env(&[
        ("PORTCULLIS_KEY_FILE", path.to_str().unwrap()),
        ("PORTCULLIS_KEY_FILE_RELOAD_SECS", "0"),
    ])
    .unwrap();
    assert!(b.build().is_ok());
    let e = from_env(&[
        ("PORTCULLIS_KEY_FILE", path.to_str().unwrap()),
        ("PORTCULLIS_API_KEY_SCOPES", "a"),
    ])
    .unwrap_err();
    assert!(
        e.starts_with("PORTCULLIS_API_KEY_SCOPES applies to PORTCULLIS_API_KEYS only"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(feature = "jwt")]
#[test]
fn env_service_tokens_need_all_three_variables() {
    let jwks = format!("{}/tests/data/jwt/jwks.json", env!("CARGO_MANIFEST_DIR"));
    for (vars, missing) in [
        (
            vec![("PORTCULLIS_JWKS_FILE", jwks.as_str())],
            "PORTCULLIS_TOKEN_ISSUERS",
        ),
        (
            vec![
                ("PORTCULLIS_JWKS_FILE", jwks.as_str()),
                ("PORTCULLIS_TOKEN_ISSUERS", "https://a"),
            ],
            "PORTCULLIS_TOKEN_AUDIENCE",
        ),
        (
            vec![("PORTCULLIS_TOKEN_AUDIENCE", "x")],
            "PORTCULLIS_JWKS_FILE",
        ),
    ] {
        let e = from_env(&vars).unwrap_err();
        assert!(e.ends_with(&format!("{missing} is not set")), "{e}");
    }
    let e = from_env(&[
        ("PORTCULLIS_JWKS_FILE", "/nonexistent.json"),
        ("PORTCULLIS_TOKEN_ISSUERS", "https://a"),
        ("PORTCULLIS_TOKEN_AUDIENCE", "x"),
    ])
    .unwrap_err();
    assert!(e.starts_with("PORTCULLIS_JWKS_FILE:"), "{e}");
    let e = from_env(&[
        ("PORTCULLIS_JWKS_FILE", jwks.as_str()),
        ("PORTCULLIS_TOKEN_ISSUERS", "https://a,,https://b"),
        ("PORTCULLIS_TOKEN_AUDIENCE", "x"),
    ])
    .unwrap_err();
    assert!(e.starts_with("PORTCULLIS_TOKEN_ISSUERS: entry 2"), "{e}");
    let e = from_env(&[
        ("PORTCULLIS_JWKS_FILE", jwks.as_str()),
        ("PORTCULLIS_TOKEN_ISSUERS", "https://a"),
        ("PORTCULLIS_TOKEN_AUDIENCE", "x"),
        ("PORTCULLIS_JWKS_RELOAD_SECS", "often"),
    ])
    .unwrap_err();
    assert!(e.starts_with("PORTCULLIS_JWKS_RELOAD_SECS:"), "{e}");
    let e = from_env(&[("PORTCULLIS_JWKS_RELOAD_SECS", "5")]).unwrap_err();
    assert!(e.contains("but PORTCULLIS_JWKS_FILE is not"), "{e}");
}

#[cfg(feature = "redis")]
#[test]
fn env_redis_url_never_appears_in_errors_or_debug() {
    let password = "s3cr3t-redis-pw";
    let bad = format!("http://user:{password}@localhost:6379");
    let e = from_env(&[
        ("PORTCULLIS_API_KEYS", RAW_KEY),
        ("PORTCULLIS_REDIS_URL", &bad),
    ])
    .unwrap_err();
    assert!(
        e.starts_with("PORTCULLIS_REDIS_URL:") && !e.contains(password),
        "{e}"
    );

    let good = format!("redis://:{password}@127.0.0.1:1/0");
    let b = from_env(&[
        ("PORTCULLIS_API_KEYS", RAW_KEY),
        ("PORTCULLIS_REDIS_URL", &good),
        ("PORTCULLIS_REDIS_ON_FAILURE", "closed"),
    ])
    .unwrap();
    assert!(!format!("{b:?}").contains(password));
    let stack = b.build().unwrap();
    assert!(!format!("{stack:?}").contains(password));

    let e = from_env(&[("PORTCULLIS_REDIS_ON_FAILURE", "maybe")]).unwrap_err();
    assert!(e.starts_with("PORTCULLIS_REDIS_ON_FAILURE:"), "{e}");
    let e = from_env(&[("PORTCULLIS_REDIS_ON_FAILURE", "open")]).unwrap_err();
    assert!(e.contains("PORTCULLIS_REDIS_URL is not"), "{e}");
}
