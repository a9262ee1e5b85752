//! Per-request cost of the whole stack (`StackLayer`: request id, access log, client
//! address, allowlist, failed-authentication throttle, API key, rate limit) against
//! the bare handler and against the same layers assembled by hand with
//! `ServiceBuilder`, in process: `oneshot` over a cloned service, access events
//! formatted as JSON into a sink.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use portcullis::IpSet;
use portcullis::Scopes;
use portcullis::access_log::AccessLogLayer;
use portcullis::allowlist::IpAllowlistLayer;
use portcullis::api_key::{ApiKeys, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddr};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use portcullis::request_id::RequestIdLayer;
use portcullis::stack::StackLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tracing::Level;

type Body = Full<Bytes>;

fn handler()
-> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Unpin> + Clone
{
    tower::service_fn(|_req: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"ok"),
        ))))
    })
}

fn request(key: &str) -> Request<Body> {
    let mut req = Request::builder()
        .uri("/v1/jobs/01J9Z6Q?page=2")
        .header("user-agent", "bench/1.0")
        .header("x-api-key", key)
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("10.1.2.3:51000".parse().unwrap()));
    req
}

/// Drives a future that is ready without waiting (every service here is).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the benchmark services never wait"),
    }
}

fn per_request<S>(b: &mut criterion::Bencher<'_>, svc: S, key: &str)
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone,
    S::Error: std::fmt::Debug,
{
    // Every variant must answer 200: a refusal would measure the wrong path.
    let res = now(svc.clone().oneshot(request(key))).unwrap();
    assert_eq!(res.status(), 200);
    b.iter(|| {
        let res = now(svc.clone().oneshot(request(key))).unwrap();
        black_box(res.status())
    })
}

/// With the access and audit events formatted as JSON into a sink (as in
/// production), and with no subscriber (the layers' own work only).
fn stack(c: &mut Criterion) {
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    group(c, "stack_per_request");
    drop(guard);
    group(c, "stack_per_request_no_subscriber");
}

fn group(c: &mut Criterion, name: &str) {
    let key = generate_key("pc_live").unwrap();
    let store = KeyStore::from_key_list(key.expose_secret(), Scopes::default()).unwrap();
    let keys = ApiKeys::new(store);
    let k = key.expose_secret();
    // The quota never runs out during a run; the limiter still does its work.
    let quota = "1000000000/s";

    let mut g = c.benchmark_group(name);
    g.bench_function("bare_handler", |b| {
        // The request is still built with its headers: only the layers differ.
        per_request(b, handler(), k)
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
        per_request(b, svc, k)
    });
    g.bench_function("portcullis_StackLayer", |b| {
        let stack = StackLayer::builder()
            .api_keys(keys.clone())
            .trusted_proxies("172.16.0.0/12")
            .allowlist("10.0.0.0/8")
            .quotas(quota)
            .build()
            .unwrap();
        per_request(b, stack.layer(handler()), k)
    });
    g.finish();
}

criterion_group!(benches, stack);
criterion_main!(benches);
