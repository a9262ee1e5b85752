//! The failed-authentication throttle sharing its counts through a real
//! `redis-server`: two instances (two throttles, each with its own Redis client, as
//! two processes would have) in front of one key store. A guesser spreading its
//! guesses over both gets one budget; with the counts in memory, it gets one per
//! instance (the contrast test shows the scenario tells the two apart).

use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::client_ip::ClientIpConfig;
use portcullis::rate_limit::Quota;
use portcullis::rate_limit::redis::FailurePolicy;

use crate::auth_throttle::{assert_throttled, audit_events, call, keys, serve};
use crate::log_capture;
use crate::rate_limit_redis::{RedisServer, connected};

fn quota() -> Quota {
    // 3 failures, then one per 20 minutes: nothing refills during a test.
    Quota::per_hour(3).unwrap()
}

#[tokio::test]
async fn failures_at_one_instance_count_at_the_other() {
    let _capture = log_capture::capture();
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let (valid, unknown, store) = keys("shared-throttle-client");
    let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());
    let mut instances = Vec::new();
    for _ in 0..2 {
        let redis = connected(&url, FailurePolicy::FailClosed, "at-shared").await;
        let throttle = AuthThrottleLayer::new(quota()).redis(redis);
        instances.push(serve(throttle, store.clone(), ClientIpConfig::peer_only()).await);
    }
    let (a, b) = (instances[0], instances[1]);
    let from = "127.5.0.1";

    assert_eq!(call(a, from, Some(wrong), &[]).await.status, 401);
    assert_eq!(call(a, from, Some(wrong), &[]).await.status, 401);
    assert_eq!(call(b, from, Some(wrong), &[]).await.status, 401);
    // The budget is spent across both instances.
    assert_throttled(&call(b, from, Some(wrong), &[]).await);
    assert_throttled(&call(a, from, Some(wrong), &[]).await);
    // A valid key still passes at either, and is audited as passing while throttled.
    for to in [a, b] {
        let r = call(to, from, Some(valid), &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "shared-throttle-client"));
    }
    // Another address has its own budget.
    assert_eq!(call(b, "127.5.0.2", Some(wrong), &[]).await.status, 401);

    // The success's lookup runs after its answer: wait for its event (bounded).
    let mut passed = 0;
    for _ in 0..100 {
        passed = audit_events(from)
            .iter()
            .filter(|e| e["fields"]["event"] == "auth_succeeded_while_throttled")
            .count();
        if passed == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(passed, 2);
    let throttled = audit_events(from)
        .iter()
        .filter(|e| e["fields"]["event"] == "auth_throttled")
        .count();
    assert_eq!(throttled, 2);
}

/// The same guesses against two instances counting in memory: each instance
/// answers its own budget of 401s.
#[tokio::test]
async fn in_memory_counts_give_each_instance_its_own_budget() {
    let (_, unknown, store) = keys("local-throttle-client");
    let wrong = unknown.expose_secret();
    let a = serve(
        AuthThrottleLayer::new(quota()),
        store.clone(),
        ClientIpConfig::peer_only(),
    )
    .await;
    let b = serve(
        AuthThrottleLayer::new(quota()),
        store,
        ClientIpConfig::peer_only(),
    )
    .await;
    let from = "127.5.1.1";
    for _ in 0..3 {
        assert_eq!(call(a, from, Some(wrong), &[]).await.status, 401);
    }
    assert_eq!(call(b, from, Some(wrong), &[]).await.status, 401);
}

#[tokio::test]
async fn lockout_at_one_instance_locks_out_at_the_other() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let (valid, unknown, store) = keys("shared-lockout-client");
    let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());
    let mut instances = Vec::new();
    for _ in 0..2 {
        let redis = connected(&url, FailurePolicy::FailClosed, "at-lockout").await;
        let throttle = AuthThrottleLayer::new(quota())
            .lockout_before_verify()
            .redis(redis);
        instances.push(serve(throttle, store.clone(), ClientIpConfig::peer_only()).await);
    }
    let (a, b) = (instances[0], instances[1]);
    let from = "127.5.2.1";
    // Valid requests give their count back: any number of them pass.
    for _ in 0..5 {
        assert_eq!(call(a, from, Some(valid), &[]).await.status, 200);
        assert_eq!(call(b, from, Some(valid), &[]).await.status, 200);
    }
    // The refunds run after the answers; let them land before counting failures.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for to in [a, b, a] {
        assert_eq!(call(to, from, Some(wrong), &[]).await.status, 401);
    }
    // Locked out at both, valid key included.
    assert_throttled(&call(b, from, Some(valid), &[]).await);
    assert_throttled(&call(a, from, Some(valid), &[]).await);
    assert_eq!(call(a, "127.5.2.2", Some(valid), &[]).await.status, 200);
}

/// Redis down: fail-closed refuses a wrong credential with 503 (it cannot be
/// counted) but never a valid one; fall-back-local counts in memory.
#[tokio::test]
async fn redis_down_follows_the_failure_policy() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let (valid, unknown, store) = keys("down-throttle-client");
    let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());
    let closed = connected(&url, FailurePolicy::FailClosed, "at-down").await;
    let local = connected(&url, FailurePolicy::FallbackLocal, "at-down").await;
    let closed = serve(
        AuthThrottleLayer::new(quota()).redis(closed),
        store.clone(),
        ClientIpConfig::peer_only(),
    )
    .await;
    let local = serve(
        AuthThrottleLayer::new(quota()).redis(local),
        store,
        ClientIpConfig::peer_only(),
    )
    .await;
    server.kill();
    let from = "127.5.3.1";

    let r = call(closed, from, Some(wrong), &[]).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());
    assert!(!r.body.contains(wrong));
    assert_eq!(call(closed, from, Some(valid), &[]).await.status, 200);

    for _ in 0..3 {
        assert_eq!(call(local, from, Some(wrong), &[]).await.status, 401);
    }
    assert_throttled(&call(local, from, Some(wrong), &[]).await);
    assert_eq!(call(local, from, Some(valid), &[]).await.status, 200);
}

/// The stack gives its Redis backend to the throttle: two stacks built with the
/// same Redis (as `PORTCULLIS_REDIS_URL` builds them) share one failure budget.
#[cfg(feature = "stack")]
#[tokio::test]
async fn stacks_sharing_redis_share_the_failure_budget() {
    use portcullis::stack::StackLayer;
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let (_, unknown, store) = keys("stack-shared-throttle");
    let wrong = unknown.expose_secret();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let redis = connected(&url, FailurePolicy::FailClosed, "at-stack").await;
        let stack = StackLayer::builder()
            .api_keys(store.clone())
            .auth_throttle(AuthThrottleLayer::new(quota()))
            .redis(redis)
            .build()
            .unwrap();
        instances.push(
            crate::common::serve_with(
                "127.0.0.1:0",
                stack,
                crate::common::Peer::Attached,
                crate::common::echo_client_ip(),
            )
            .await,
        );
    }
    let (a, b) = (instances[0], instances[1]);
    let from = "127.5.4.1";
    for to in [a, b, a] {
        assert_eq!(call(to, from, Some(wrong), &[]).await.status, 401);
    }
    assert_throttled(&call(b, from, Some(wrong), &[]).await);
}

/// In the lockout mode on Redis, valid requests held in flight until their counts
/// have run out (a long poll, a slow upload) give nothing back when answered: the
/// address's next burst of guesses is verified up to the quota and no further.
#[tokio::test]
async fn lockout_a_count_that_expired_in_flight_is_not_given_back() {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use portcullis::authenticate::AuthenticateLayer;
    use portcullis::client_ip::ClientIpLayer;
    use tower::ServiceBuilder;
    use tower::util::BoxCloneService;

    use crate::common::{Peer, serve_with};

    let Some(server) = RedisServer::start().await else {
        return;
    };
    let redis = connected(&server.url(), FailurePolicy::FailClosed, "at-held").await;
    // 2 failures at once, then one per second.
    let throttle = AuthThrottleLayer::new(Quota::new(2, Duration::from_secs(2)).unwrap())
        .lockout_before_verify()
        .redis(redis);
    let (valid, unknown, store) = keys("held-lockout-client");
    let (valid, wrong) = (valid.expose_secret(), unknown.expose_secret());
    // The service answers once the gate opens.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let handler = BoxCloneService::new(tower::service_fn(move |_req: Request<Incoming>| {
        let mut opened = opened.clone();
        async move {
            let _ = opened.wait_for(|open| *open).await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    }));
    let layers = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(throttle)
        .layer(AuthenticateLayer::api_keys(store))
        .into_inner();
    let to = serve_with("127.0.0.1:0", layers, Peer::Attached, handler).await;
    let from = "127.5.4.1";
    let held: Vec<_> = (0..2)
        .map(|_| {
            let valid = valid.to_owned();
            tokio::spawn(async move { call(to, from, Some(&valid), &[]).await.status })
        })
        .collect();
    // Both counted, then both run out while the requests wait.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let mut verified = 0;
    for _ in 0..3 {
        if call(to, from, Some(wrong), &[]).await.status == 401 {
            verified += 1;
        }
    }
    gate.send(true).unwrap();
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    // The refunds run after the answers; let them land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        if call(to, from, Some(wrong), &[]).await.status == 401 {
            verified += 1;
        }
    }
    assert_eq!(verified, 2, "{verified} guesses verified at once, quota 2");
}
