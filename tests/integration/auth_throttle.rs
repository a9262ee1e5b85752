//! AuthThrottleLayer in front of AuthenticateLayer with an API-key store, over real
//! TCP. Every client of a test on loopback shares one address, exactly the case of
//! clients behind a NAT, a proxy or a local TLS terminator, or of a service calling
//! itself: in the default mode one client's wrong keys never lock the others out; in
//! the lockout mode they do, by design; exempt addresses are never throttled; at the
//! address cap, the untracked addresses share one quota.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyRecord, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use portcullis::rate_limit::Quota;
use portcullis::{IpSet, Principal};
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

use crate::common::{Handler, Peer, Reply, get_from, ip, serve_with};
use crate::log_capture;

/// Answers 200 with the principal's id.
fn whoami() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let id = req
            .extensions()
            .get::<Principal>()
            .map_or("-", Principal::id)
            .to_owned();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id))))
    }))
}

/// A valid key (id `id`) and a well-formed key the store does not know.
pub(crate) fn keys(id: &str) -> (GeneratedKey, GeneratedKey, ApiKeys) {
    let valid = generate_key("pc_test").unwrap();
    let unknown = generate_key("pc_test").unwrap();
    let store = KeyStore::from_records([KeyRecord::new(id, valid.digest()).unwrap()]).unwrap();
    (valid, unknown, ApiKeys::new(store))
}

/// ClientIp (from `client_ip`), the throttle, API-key authentication, `whoami`.
pub(crate) async fn serve(
    throttle: AuthThrottleLayer,
    keys: ApiKeys,
    client_ip: ClientIpConfig,
) -> SocketAddr {
    let layers = ServiceBuilder::new()
        .layer(ClientIpLayer::new(client_ip))
        .layer(throttle)
        .layer(AuthenticateLayer::api_keys(keys))
        .into_inner();
    serve_with("127.0.0.1:0", layers, Peer::Attached, whoami()).await
}

/// `GET /` from loopback address `from`, with `key` in `X-API-Key` if any, and
/// `extra` header lines.
pub(crate) async fn call(to: SocketAddr, from: &str, key: Option<&str>, extra: &[&[u8]]) -> Reply {
    let header = key.map(|k| format!("X-API-Key: {k}"));
    let mut headers: Vec<&[u8]> = header.iter().map(|h| h.as_bytes()).collect();
    headers.extend_from_slice(extra);
    get_from(Some(ip(from)), to, &headers).await
}

pub(crate) fn assert_throttled(r: &Reply) {
    assert_eq!(r.status, 429, "{r:?}");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=1800).contains(&retry), "{retry}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(
        r.header("www-authenticate").is_none(),
        "a throttled answer says nothing about the credential"
    );
}

/// The audit events carrying `client_ip`.
pub(crate) fn audit_events(from: &str) -> Vec<serde_json::Value> {
    log_capture::capture()
        .events_with(from)
        .into_iter()
        .filter(|e| e["target"] == "portcullis::audit" && e["fields"]["client_ip"] == from)
        .collect()
}

fn quota() -> Quota {
    // 3 failures, then one per 20 minutes: nothing refills during a test.
    Quota::per_hour(3).unwrap()
}

#[tokio::test]
async fn by_default_a_valid_key_passes_behind_a_throttled_address() {
    let capture = log_capture::capture();
    let from = "127.4.0.1";
    let (valid, unknown, keys) = keys("throttle-default-client");
    let addr = serve(
        AuthThrottleLayer::new(quota()),
        keys,
        ClientIpConfig::peer_only(),
    )
    .await;
    let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());

    for _ in 0..3 {
        assert_eq!(call(addr, from, Some(wrong), &[]).await.status, 401);
    }
    // The address is throttled. A valid key from it still passes, every time ...
    for _ in 0..3 {
        let r = call(addr, from, Some(valid), &[]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "throttle-default-client")
        );
    }
    // ... a wrong key is verified, and answered 429 instead of 401, uncounted ...
    for _ in 0..3 {
        assert_throttled(&call(addr, from, Some(wrong), &[]).await);
    }
    // ... and a request without a credential gets its usual 401.
    let r = call(addr, from, None, &[]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    let r = call(addr, from, Some(valid), &[]).await;
    assert_eq!(r.status, 200);

    let events = audit_events(from);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["fields"]["event"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names.iter().filter(|&&n| n == "auth_throttled").count(), 3);
    let passed: Vec<_> = events
        .iter()
        .filter(|e| e["fields"]["event"] == "auth_succeeded_while_throttled")
        .collect();
    assert_eq!(passed.len(), 4, "{names:?}");
    assert_eq!(passed[0]["fields"]["principal"], "throttle-default-client");
    assert_eq!(passed[0]["fields"]["method"], "api_key");
    let throttled = events
        .iter()
        .find(|e| e["fields"]["event"] == "auth_throttled")
        .unwrap();
    assert_eq!(throttled["fields"]["credential_checked"], true);
    let text = capture.text();
    assert!(
        !text.contains(valid) && !text.contains(wrong),
        "no key is logged"
    );
}

#[tokio::test]
async fn lockout_before_verify_refuses_a_valid_key_behind_a_throttled_address() {
    log_capture::capture();
    let from = "127.4.0.2";
    let (valid, unknown, keys) = keys("throttle-lockout-client");
    let addr = serve(
        AuthThrottleLayer::new(quota()).lockout_before_verify(),
        keys,
        ClientIpConfig::peer_only(),
    )
    .await;
    let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());

    let r = call(addr, from, Some(valid), &[]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "throttle-lockout-client")
    );
    for _ in 0..3 {
        assert_eq!(call(addr, from, Some(wrong), &[]).await.status, 401);
    }
    // Locked out before verification: valid, wrong and missing credentials alike.
    assert_throttled(&call(addr, from, Some(valid), &[]).await);
    assert_throttled(&call(addr, from, Some(wrong), &[]).await);
    assert_throttled(&call(addr, from, None, &[]).await);

    let events = audit_events(from);
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["fields"]["event"].as_str().unwrap_or(""))
        .collect();
    // The refused requests never reached the key store. The success is no audit
    // event (the access log records it), the failures are.
    assert_eq!(
        names,
        [
            "auth_failed",
            "auth_failed",
            "auth_failed",
            "auth_throttled",
            "auth_throttled",
            "auth_throttled"
        ]
    );
    assert_eq!(events[3]["fields"]["credential_checked"], false);
}

#[tokio::test]
async fn an_exempt_address_is_never_throttled() {
    let exempt = "127.4.0.3";
    let other = "127.4.0.4";
    for (n, throttle) in [
        AuthThrottleLayer::new(quota()),
        AuthThrottleLayer::new(quota()).lockout_before_verify(),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("throttle-exempt-client-{n}");
        let (valid, unknown, keys) = keys(&id);
        let throttle = throttle.exempt(IpSet::parse("127.4.0.3/32").unwrap());
        let addr = serve(throttle.clone(), keys, ClientIpConfig::peer_only()).await;
        let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());
        for _ in 0..10 {
            // Authenticated as usual: a wrong key gets its 401, never a 429.
            assert_eq!(call(addr, exempt, Some(wrong), &[]).await.status, 401);
        }
        let r = call(addr, exempt, Some(valid), &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, id.as_str()));
        assert_eq!(throttle.tracked_addresses(), 0, "never counted");
        // An address outside the set is throttled as usual.
        for _ in 0..3 {
            assert_eq!(call(addr, other, Some(wrong), &[]).await.status, 401);
        }
        assert_throttled(&call(addr, other, Some(wrong), &[]).await);
        assert_eq!(throttle.tracked_addresses(), 1);
    }
}

/// At the address cap, the addresses not tracked share one bucket: together they
/// get one quota of answered failures, in both modes, while the tracked address
/// keeps its own. (Client addresses come from `X-Forwarded-For`, the loopback peer
/// being a trusted proxy.)
#[tokio::test]
async fn at_the_cap_untracked_addresses_share_one_quota() {
    for lockout in [false, true] {
        let (valid, unknown, keys) = keys("throttle-cap-client");
        let mut throttle = AuthThrottleLayer::new(Quota::per_hour(2).unwrap())
            .max_tracked_addresses(1)
            .unwrap();
        if lockout {
            throttle = throttle.lockout_before_verify();
        }
        let proxied = ClientIpConfig::trusted_proxies("127.0.0.1").unwrap();
        let addr = serve(throttle.clone(), keys, proxied).await;
        let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());
        let from = |client: String| format!("X-Forwarded-For: {client}");

        let resident = from("198.51.100.1".to_owned());
        let r = call(addr, "127.0.0.1", Some(wrong), &[resident.as_bytes()]).await;
        assert_eq!(r.status, 401);
        assert_eq!(throttle.tracked_addresses(), 1);

        let mut answered = 0;
        for i in 0..12 {
            let newcomer = from(format!("203.0.113.{i}"));
            let r = call(addr, "127.0.0.1", Some(wrong), &[newcomer.as_bytes()]).await;
            match r.status {
                401 => answered += 1,
                _ => assert_throttled(&r),
            }
        }
        assert_eq!(
            answered, 2,
            "one quota for every untracked address (lockout: {lockout})"
        );
        assert_eq!(throttle.tracked_addresses(), 1);

        // A valid key from a new address: it passes in the default mode; the
        // lockout mode locks out every untracked address while the bucket is empty.
        let newcomer = from("203.0.113.200".to_owned());
        let r = call(addr, "127.0.0.1", Some(valid), &[newcomer.as_bytes()]).await;
        if lockout {
            assert_throttled(&r);
        } else {
            assert_eq!((r.status, r.body.as_str()), (200, "throttle-cap-client"));
        }
        // The tracked address has its own bucket, one failure spent of two.
        let r = call(addr, "127.0.0.1", Some(wrong), &[resident.as_bytes()]).await;
        assert_eq!(r.status, 401);
    }
}

/// The address table is allocated when the layer is built: the cap is 1 to 2^24.
#[test]
fn tracked_address_cap_is_checked_at_build() {
    let q = Quota::per_minute(5).unwrap();
    assert!(AuthThrottleLayer::new(q).max_tracked_addresses(0).is_err());
    assert!(
        AuthThrottleLayer::new(q)
            .max_tracked_addresses((1 << 24) + 1)
            .is_err()
    );
    assert!(
        AuthThrottleLayer::new(q)
            .max_tracked_addresses(1 << 24)
            .is_ok()
    );
}
