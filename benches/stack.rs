//! Per-request cost of the whole stack (`StackLayer`: request id, access log, client
//! address, allowlist, failed-authentication throttle, API key, rate limit) against
//! the bare handler, against the same layers assembled by hand with `ServiceBuilder`,
//! and against the stack a tower user would assemble from peers, in process:
//! `oneshot` over a cloned service, with the events formatted as JSON into a sink and
//! with no subscriber. With JSON, the crate's layers log through the crate's
//! `RedactingJson` format (every line redacted), the peer stack through
//! `tracing-subscriber`'s JSON format (nothing redacted); `StackLayer` is also
//! measured with the peer's format.
//!
//! The peer stack, outermost first: tower-http's `SetRequestId` (UUID v4) and
//! `PropagateRequestId` on `x-request-id`, `SetSensitiveRequestHeaders`
//! (`authorization`, `cookie`, `x-api-key`), `TraceLayer` with its span and its
//! response event at INFO, `ValidateRequestHeader` checking `x-api-key` against a key
//! set, and tower_governor keyed by that key, on the same quota.

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use portcullis::IpSet;
use portcullis::Scopes;
use portcullis::access_log::AccessLogLayer;
use portcullis::allowlist::IpAllowlistLayer;
use portcullis::api_key::{ApiKeys, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use portcullis::redact::RedactingJson;
use portcullis::request_id::RequestIdLayer;
use portcullis::stack::StackLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tracing::{Dispatch, Level};

mod common;
use common::{Body, now, request};

/// The response body: tower_governor answers its refusals with axum's.
type ResBody = axum::body::Body;

fn handler()
-> impl Service<Request<Body>, Response = Response<ResBody>, Error = Infallible, Future: Unpin + Send>
+ Clone
+ Send
+ Sync {
    tower::service_fn(|_req: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(ResBody::from(
            Bytes::from_static(b"ok"),
        ))))
    })
}

/// The peer stack (see the module docs) around the handler, knowing `key`.
fn peer_stack(
    key: &str,
) -> impl Service<Request<Body>, Response = Response<impl Sized + use<>>, Error = Infallible>
+ Clone
+ use<> {
    common::peer::peer_stack(key, handler())
}

fn per_request<S, B>(b: &mut criterion::Bencher<'_>, svc: S, key: &str)
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    // Every variant must answer 200: a refusal would measure the wrong path.
    let res = now(svc.clone().oneshot(request("x-api-key", key))).unwrap();
    assert_eq!(res.status(), 200);
    b.iter(|| {
        let res = now(svc.clone().oneshot(request("x-api-key", key))).unwrap();
        black_box(res.status())
    })
}

/// With the events formatted as JSON into a sink (as in production), and with no
/// subscriber (the layers' own work only). Every variant answers 200 with the
/// same request.
fn stack(c: &mut Criterion) {
    // PORTCULLIS_BENCH_INTERLEAVED=<rounds> times the stack and the peer stack in
    // turns instead (see `interleaved`).
    if let Some(rounds) = std::env::var_os("PORTCULLIS_BENCH_INTERLEAVED") {
        interleaved(
            rounds
                .to_str()
                .and_then(|r| r.parse().ok())
                .expect("a number of rounds"),
        );
        return;
    }
    group(c, "stack_per_request", true);
    group(c, "stack_per_request_no_subscriber", false);
}

/// One variant for [`interleaved`]: `n` requests through a service under a
/// subscriber, returning the time per request.
type Timed = Box<dyn FnMut(u32) -> Duration>;

fn timed<S, B>(svc: S, key: String, logs: Option<fn() -> Dispatch>) -> Timed
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + 'static,
    S::Error: std::fmt::Debug,
{
    let dispatch = logs.map(|make| make());
    Box::new(move |n| {
        let run = || {
            let start = Instant::now();
            for _ in 0..n {
                let res = now(svc.clone().oneshot(request("x-api-key", &key))).unwrap();
                assert_eq!(res.status(), 200);
                black_box(res);
            }
            start.elapsed() / n
        };
        match &dispatch {
            Some(d) => tracing::dispatcher::with_default(d, run),
            None => run(),
        }
    })
}

/// The stack, the stack with the peer's log format and the peer stack, with logs and
/// without, each `REQUESTS` requests in turn per round, the order reversed every
/// other round: a change of the machine's speed falls on all of them alike. Prints
/// each variant's median time per request and the median over the rounds of each
/// ratio to the peer stack.
fn interleaved(rounds: usize) {
    const REQUESTS: u32 = 2_000;
    let key = generate_key("pc_live").unwrap();
    let store = KeyStore::from_key_list(key.expose_secret(), Scopes::default()).unwrap();
    let k = key.expose_secret();
    let stack = StackLayer::builder()
        .api_keys(ApiKeys::new(store))
        .trusted_proxies("172.16.0.0/12")
        .allowlist("10.0.0.0/8")
        .quotas("1000000000/s")
        .build()
        .unwrap();
    let ours = Some(redacting_json as fn() -> Dispatch);
    let peer = Some(peer_json as fn() -> Dispatch);
    let mut variants: Vec<(&str, Timed)> = vec![
        (
            "json/portcullis_StackLayer",
            timed(stack.layer(handler()), k.to_owned(), ours),
        ),
        (
            "json/portcullis_StackLayer_peer_json_format",
            timed(stack.layer(handler()), k.to_owned(), peer),
        ),
        ("json/peer_stack", timed(peer_stack(k), k.to_owned(), peer)),
        (
            "none/portcullis_StackLayer",
            timed(stack.layer(handler()), k.to_owned(), None),
        ),
        ("none/peer_stack", timed(peer_stack(k), k.to_owned(), None)),
    ];
    // Warm-up.
    for (_, v) in &mut variants {
        v(REQUESTS);
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); variants.len()];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..variants.len()).collect()
        } else {
            (0..variants.len()).rev().collect()
        };
        for i in order {
            times[i].push((variants[i].1)(REQUESTS));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for ((name, _), t) in variants.iter().zip(&times) {
        let ns = median(t.iter().map(|d| d.as_nanos() as f64).collect());
        println!("{name}: median {ns:.0} ns per request");
    }
    for (a, b) in [(0, 2), (1, 2), (3, 4)] {
        let ratio = median(
            times[a]
                .iter()
                .zip(&times[b])
                .map(|(x, y)| x.as_nanos() as f64 / y.as_nanos() as f64)
                .collect(),
        );
        println!(
            "{} / {}: median of {rounds} rounds {ratio:.3}",
            variants[a].0, variants[b].0
        );
    }
}

/// `tracing-subscriber`'s JSON format into a sink: the peer stack's logs.
fn peer_json() -> Dispatch {
    Dispatch::new(
        tracing_subscriber::fmt()
            .json()
            .with_max_level(Level::INFO)
            .with_writer(std::io::sink)
            .finish(),
    )
}

/// The crate's JSON format, which redacts every line, into a sink.
fn redacting_json() -> Dispatch {
    Dispatch::new(
        tracing_subscriber::fmt()
            .event_format(RedactingJson::new())
            .with_max_level(Level::INFO)
            .with_writer(std::io::sink)
            .finish(),
    )
}

/// Runs `f` with `logs` as the thread's subscriber, if there is one.
fn with_logs(logs: Option<fn() -> Dispatch>, f: impl FnOnce()) {
    match logs {
        Some(make) => tracing::dispatcher::with_default(&make(), f),
        None => f(),
    }
}

fn group(c: &mut Criterion, name: &str, logs: bool) {
    let (ours, peer) = if logs {
        (
            Some(redacting_json as fn() -> Dispatch),
            Some(peer_json as fn() -> Dispatch),
        )
    } else {
        (None, None)
    };
    let key = generate_key("pc_live").unwrap();
    let store = KeyStore::from_key_list(key.expose_secret(), Scopes::default()).unwrap();
    let keys = ApiKeys::new(store);
    let k = key.expose_secret();
    // The quota never runs out during a run; the limiter still does its work.
    let quota = "1000000000/s";

    let mut g = c.benchmark_group(name);
    g.bench_function("bare_handler", |b| {
        // The request is still built with its headers: only the layers differ.
        with_logs(peer, || per_request(b, handler(), k))
    });
    g.bench_function("hand_assembled_ServiceBuilder", |b| {
        let svc = ServiceBuilder::new()
            .layer(RequestIdLayer::new())
            .layer(AccessLogLayer::new())
            .layer(ClientIpLayer::new(
                ClientIpConfig::trusted_proxies("172.16.0.0/12").unwrap(),
            ))
            .layer(IpAllowlistLayer::new(IpSet::parse("10.0.0.0/8").unwrap()))
            .layer(AuthThrottleLayer::recommended())
            .layer(AuthenticateLayer::api_keys(keys.clone()))
            .layer(
                RateLimitLayer::builder()
                    .policy(
                        Policy::new("per-1s", Quota::per_second(1_000_000_000).unwrap()).unwrap(),
                    )
                    .build()
                    .unwrap(),
            )
            .service(handler());
        with_logs(ours, || per_request(b, svc, k))
    });
    let stack = StackLayer::builder()
        .api_keys(keys.clone())
        .trusted_proxies("172.16.0.0/12")
        .allowlist("10.0.0.0/8")
        .quotas(quota)
        .build()
        .unwrap();
    g.bench_function("portcullis_StackLayer", |b| {
        with_logs(ours, || per_request(b, stack.layer(handler()), k))
    });
    if logs {
        // The same stack with the peer's log format, which does not redact.
        g.bench_function("portcullis_StackLayer_peer_json_format", |b| {
            with_logs(peer, || per_request(b, stack.layer(handler()), k))
        });
    }
    g.bench_function("peer_stack_tower_http_tower_governor", |b| {
        with_logs(peer, || per_request(b, peer_stack(k), k))
    });
    g.finish();
}

criterion_group!(benches, stack);
criterion_main!(benches);
