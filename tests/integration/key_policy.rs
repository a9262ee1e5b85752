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
        .layer(AuthenticateLayer::api_keys(keys).credits_spent_inside())
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

/// A stack built by hand that does not declare a rate limiter spending credits
/// inside the authentication: a key with credits is refused (500, nothing said to
/// the client, one error naming the remedy), never let in unmetered; a key without
/// credits is served. With a rate limiter inside but undeclared, nothing is spent.
#[tokio::test]
async fn credits_without_a_declared_spender_are_refused_loudly() {
    let capture = log_capture::capture();
    let (limited, free) = (
        generate_key("pc_test").unwrap(),
        generate_key("pc_test").unwrap(),
    );
    let file = entry("unspent-credit-client", &limited, "credits = 3")
        + &entry("unspent-free-client", &free, "");
    let store = KeyStore::from_toml(&file).unwrap();
    let record = store.records().next().unwrap().clone();
    let keys = ApiKeys::new(store);
    let limit = limiter();
    let no_limiter = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(AuthenticateLayer::api_keys(keys.clone()))
        .into_inner();
    let undeclared = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(AuthenticateLayer::api_keys(keys))
        .layer(limit.clone())
        .into_inner();
    let a = serve_with("127.0.0.1:0", no_limiter, Peer::Attached, whoami()).await;
    let b = serve_with("127.0.0.1:0", undeclared, Peer::Attached, whoami()).await;
    for addr in [a, a, b, b] {
        let r = call(addr, "127.6.3.1", &limited).await;
        assert_eq!(r.status, 500, "{r:?}");
        assert!(
            !r.body.contains("credit") && !r.body.contains("unspent"),
            "{}",
            r.body
        );
        let r = call(addr, "127.6.3.1", &free).await;
        assert_eq!((r.status, r.body.as_str()), (200, "unspent-free-client"));
    }
    assert_eq!(limit.credits_remaining(&record).await, Some(3));
    // One error per layer, naming the remedy.
    let logged: Vec<_> = capture
        .events_with("unspent-credit-client")
        .into_iter()
        .filter(|e| e["fields"]["event"] == "credits_unenforced")
        .collect();
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert_eq!(logged[0]["level"], "ERROR");
    assert_eq!(logged[0]["fields"]["reason"], "misconfigured");
    let message = logged[0]["fields"]["message"].as_str().unwrap();
    assert!(message.contains("credits_spent_inside"), "{message}");
}

/// The stack declares its rate limiter: a key with credits spends them there.
#[cfg(feature = "stack")]
#[tokio::test]
async fn the_stack_spends_credits() {
    let key = generate_key("pc_test").unwrap();
    let store = KeyStore::from_toml(&entry("stack-credit-client", &key, "credits = 2")).unwrap();
    let stack = portcullis::stack::StackLayer::builder()
        .api_keys(ApiKeys::new(store))
        .build()
        .unwrap();
    let addr = serve_with("127.0.0.1:0", stack, Peer::Attached, whoami()).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(call(addr, "127.6.4.1", &key).await.status);
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
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

    /// A spent count that is not a number (written by something else sharing the
    /// namespace) admits nothing, even under fail-open: the script answers
    /// "exhausted" rather than fail into an unmetered request.
    #[tokio::test]
    async fn a_corrupt_credit_count_admits_nothing() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let key = generate_key("pc_test").unwrap();
        let store =
            KeyStore::from_toml(&entry("corrupt-credit-client", &key, "credits = 10")).unwrap();
        let record = store.records().next().unwrap().clone();
        let redis = connected(&server.url(), FailurePolicy::FailOpen, "cc").await;
        let limit = shared_limiter(redis.clone());
        let addr = serve(ApiKeys::new(store), limit.clone()).await;
        assert_eq!(call(addr, "127.6.5.1", &key).await.status, 200);
        let mut admin = server.admin().await;
        let names: Vec<String> = ::redis::cmd("KEYS")
            .arg("cc:cr:*")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(names.len(), 1, "{names:?}");
        for garbage in ["not a number", "-1", "1.5", "1e3", ""] {
            let () = ::redis::cmd("SET")
                .arg(&names[0])
                .arg(garbage)
                .query_async(&mut admin)
                .await
                .unwrap();
            let r = call(addr, "127.6.5.1", &key).await;
            assert_eq!(r.status, 429, "{garbage:?}: {r:?}");
            assert_eq!(
                limit.credits_remaining(&record).await,
                Some(0),
                "{garbage:?}"
            );
            // Not a Redis failure: the rate limits stay shared.
            assert!(!redis.breaker_open(), "{garbage:?}");
        }
        // A count that is a number again: spending resumes.
        let () = ::redis::cmd("SET")
            .arg(&names[0])
            .arg("9")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(limit.credits_remaining(&record).await, Some(1));
        assert_eq!(call(addr, "127.6.5.1", &key).await.status, 200);
        assert_eq!(call(addr, "127.6.5.1", &key).await.status, 429);
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
