//! Per-request cost of the success path's logging for a service token through the
//! whole stack (`StackLayer`), with the events formatted as JSON into a sink: the
//! default (one event, the access event with the token's `sub`, `jti` and `kid`)
//! against `audit_successes` (the access event plus `service_token_accepted` and
//! `auth_succeeded`). The token is served from the verifier's cache, as a reused
//! token is; `oneshot` over a cloned service, in process.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use portcullis::client_ip::PeerAddr;
use portcullis::jwt::{SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};
use portcullis::stack::StackLayer;
use tower::{Layer, Service, ServiceExt};
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

fn request(authorization: &str) -> Request<Body> {
    let mut req = Request::builder()
        .uri("/v1/jobs/01J9Z6Q?page=2")
        .header("user-agent", "bench/1.0")
        .header("authorization", authorization)
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

fn events(c: &mut Criterion) {
    let secret = [7u8; 32];
    let issuer = TokenIssuer::builder(SigningKey::hs256(&secret).unwrap().kid("bench-1"))
        .issuer("https://ci.example")
        .subject("bench-worker")
        .audience("jobs-api")
        .scope("jobs:work")
        .build()
        .unwrap();
    let authorization = format!("Bearer {}", issuer.mint().unwrap().as_str());
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut g = c.benchmark_group("token_request_json_logs");
    for (name, audit_successes) in [("one_event", false), ("audit_successes", true)] {
        let verifier = TokenVerifier::builder()
            .key(VerifyingKey::hs256(&secret).unwrap().kid("bench-1"))
            .issuer("https://ci.example")
            .audience("jobs-api")
            .build()
            .unwrap();
        let mut builder = StackLayer::builder()
            .service_tokens(verifier)
            .quotas("1000000000/s");
        if audit_successes {
            builder = builder.audit_successes();
        }
        let svc = builder.build().unwrap().layer(handler());
        // Every variant must answer 200: a refusal would measure the wrong path.
        let res = now(svc.clone().oneshot(request(&authorization))).unwrap();
        assert_eq!(res.status(), 200);
        g.bench_function(name, |b| {
            b.iter(|| {
                let res = now(svc.clone().oneshot(request(&authorization))).unwrap();
                black_box(res.status())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, events);
criterion_main!(benches);
