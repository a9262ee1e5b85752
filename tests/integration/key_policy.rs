//! Per-key policy from the key file, over real TCP: an allowlist of client
//! addresses per key (refused like the global allowlist, after the key is
//! verified), and usage credits spent by the rate-limit layer (in memory, and on a
//! real `redis-server` shared by two instances), never over-spent under concurrent
//! requests.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use portcullis::Principal;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyStore, generate_key};
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

use crate::common::{Handler, Peer, Reply, get_from, ip, serve_with};
use crate::log_capture;

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

/// A key file entry for `key` with extra `lines`.
fn entry(id: &str, key: &GeneratedKey, lines: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\ndigest = \"{}\"\n{lines}\n",
        key.digest()
    )
}

fn limiter() -> RateLimitLayer {
    RateLimitLayer::builder()
        .policy(Policy::new("api", Quota::per_second(10_000).unwrap()).unwrap())
        .build()
        .unwrap()
}

async fn serve(keys: ApiKeys, limit: RateLimitLayer) -> SocketAddr {
    let layers = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(AuthenticateLayer::api_keys(keys))
        .layer(limit)
        .into_inner();
    serve_with("127.0.0.1:0", layers, Peer::Attached, whoami()).await
}

async fn call(to: SocketAddr, from: &str, key: &GeneratedKey) -> Reply {
    let h = format!("X-API-Key: {}", key.expose_secret());
    get_from(Some(ip(from)), to, &[h.as_bytes()]).await
}

fn events(event: &str, marker: &str) -> Vec<serde_json::Value> {
    log_capture::capture()
        .events_with(marker)
        .into_iter()
        .filter(|e| e["target"] == "portcullis::audit" && e["fields"]["event"] == event)
        .collect()
}

#[tokio::test]
async fn a_key_with_an_allowlist_is_refused_elsewhere_like_the_global_allowlist() {
    let _capture = log_capture::capture();
    let (fenced, open) = (
        generate_key("pc_test").unwrap(),
        generate_key("pc_test").unwrap(),
    );
    let file = entry(
        "fenced-key-client",
        &fenced,
        "allowed_ips = [\"127.6.0.1\", \"10.0.0.0/8\"]",
    ) + &entry("open-key-client", &open, "");
    let keys = ApiKeys::new(KeyStore::from_toml(&file).unwrap());
    let addr = serve(keys, limiter()).await;

    let r = call(addr, "127.6.0.1", &fenced).await;
    assert_eq!((r.status, r.body.as_str()), (200, "fenced-key-client"));
    let r = call(addr, "127.6.0.2", &fenced).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.header("www-authenticate").is_none());
    for secret in [
        fenced.expose_secret(),
        "fenced-key-client",
        "127.6.0.2",
        "key_ip",
    ] {
        assert!(!r.body.contains(secret), "{}", r.body);
    }
    // An unrestricted key works from both addresses.
    for from in ["127.6.0.1", "127.6.0.2"] {
        assert_eq!(call(addr, from, &open).await.status, 200);
    }
    let denied = events("ip_denied", "127.6.0.2");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["fields"]["reason"], "key_ip_denied");
    assert_eq!(denied[0]["fields"]["principal"], "fenced-key-client");
}

#[tokio::test]
async fn credits_are_spent_one_per_admitted_request_then_429() {
    let _capture = log_capture::capture();
    let (limited, free) = (
        generate_key("pc_test").unwrap(),
        generate_key("pc_test").unwrap(),
    );
    let file = entry("credit-key-client", &limited, "credits = 3")
        + &entry("uncredited-client", &free, "");
    let store = KeyStore::from_toml(&file).unwrap();
    let record = store.records().next().unwrap().clone();
    assert_eq!(record.credits(), Some(3));
    let limit = limiter();
    let addr = serve(ApiKeys::new(store), limit.clone()).await;
    let from = "127.6.1.1";

    for left in [2, 1, 0] {
        assert_eq!(call(addr, from, &limited).await.status, 200);
        assert_eq!(limit.credits_remaining(&record).await, Some(left));
    }
    for _ in 0..2 {
        let r = call(addr, from, &limited).await;
        assert_eq!(r.status, 429, "{r:?}");
        assert!(r.header("retry-after").is_some());
        assert!(!r.body.contains("credit"), "{}", r.body);
    }
    assert_eq!(limit.credits_remaining(&record).await, Some(0));
    for _ in 0..5 {
        assert_eq!(call(addr, from, &free).await.status, 200);
    }
    let exhausted = events("credits_exhausted", from);
    assert_eq!(exhausted.len(), 2, "{exhausted:?}");
    assert_eq!(exhausted[0]["fields"]["reason"], "credits_exhausted");
    assert_eq!(exhausted[0]["fields"]["principal"], "credit-key-client");
}

/// Sends `n` requests at once, spread over `targets`; the statuses, sorted.
async fn burst(targets: &[SocketAddr], key: &GeneratedKey, n: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (to, h) = (
                targets[i % targets.len()],
                format!("X-API-Key: {}", key.expose_secret()),
            );
            tokio::spawn(async move { get_from(Some(ip("127.6.2.1")), to, &[h.as_bytes()]).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status);
    }
    statuses.sort();
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_overspend_credits_in_memory() {
    let key = generate_key("pc_test").unwrap();
    let store = KeyStore::from_toml(&entry("burst-client", &key, "credits = 7")).unwrap();
    let addr = serve(ApiKeys::new(store), limiter()).await;
    let statuses = burst(&[addr], &key, 30).await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        23,
        "{statuses:?}"
    );
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use crate::rate_limit_redis::{RedisServer, connected};
    use portcullis::rate_limit::redis::FailurePolicy;

    fn shared_limiter(redis: portcullis::rate_limit::redis::RedisLimiter) -> RateLimitLayer {
        RateLimitLayer::builder()
            .policy(Policy::new("api", Quota::per_second(10_000).unwrap()).unwrap())
            .redis(redis)
            .build()
            .unwrap()
    }

    /// Two instances, one `redis-server`: the credits are one budget, spent
    /// atomically, whichever instance the concurrent requests reach. Without the
    /// shared count each instance would admit the full budget (the in-memory test
    /// shows one instance admits exactly its budget).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_instances_share_credits_without_overspending() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let url = server.url();
        let key = generate_key("pc_test").unwrap();
        let store =
            KeyStore::from_toml(&entry("shared-credit-client", &key, "credits = 10")).unwrap();
        let record = store.records().next().unwrap().clone();
        let keys = ApiKeys::new(store);
        let mut instances = Vec::new();
        let mut limits = Vec::new();
        for _ in 0..2 {
            let l = shared_limiter(connected(&url, FailurePolicy::FailClosed, "credits").await);
            limits.push(l.clone());
            instances.push(serve(keys.clone(), l).await);
        }
        let statuses = burst(&instances, &key, 40).await;
        assert_eq!(
            statuses.iter().filter(|&&s| s == 200).count(),
            10,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|&&s| s == 429).count(),
            30,
            "{statuses:?}"
        );
        for l in &limits {
            assert_eq!(l.credits_remaining(&record).await, Some(0));
        }
        // The count lives in Redis: a new instance sees the budget spent.
        let late = shared_limiter(connected(&url, FailurePolicy::FailClosed, "credits").await);
        let addr = serve(keys, late).await;
        assert_eq!(call(addr, "127.6.2.1", &key).await.status, 429);
    }

    /// Redis down: fail-closed answers 503 rather than spend a credit it cannot
    /// count.
    #[tokio::test]
    async fn credits_follow_the_failure_policy_when_redis_is_down() {
        let Some(mut server) = RedisServer::start().await else {
            return;
        };
        let key = generate_key("pc_test").unwrap();
        let store =
            KeyStore::from_toml(&entry("down-credit-client", &key, "credits = 10")).unwrap();
        let limit = shared_limiter(connected(&server.url(), FailurePolicy::FailClosed, "cd").await);
        let addr = serve(ApiKeys::new(store), limit).await;
        assert_eq!(call(addr, "127.6.3.1", &key).await.status, 200);
        server.kill();
        assert_eq!(call(addr, "127.6.3.1", &key).await.status, 503);
    }
}
