//! Per-request cost of the success path's logging for a service token through the
//! whole stack (`StackLayer`), with the events formatted as JSON into a sink: the
//! default (one event, the access event with the token's `sub`, `jti` and `kid`)
//! against `audit_successes` (the access event plus `service_token_accepted` and
//! `auth_succeeded`). The token is served from the verifier's cache, as a reused
//! token is; `oneshot` over a cloned service, in process.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portcullis::jwt::{SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};
use portcullis::stack::StackLayer;
use tower::{Layer, ServiceExt};
use tracing::Level;

mod common;
use common::{handler, now, request};

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
        let res = now(svc
            .clone()
            .oneshot(request("authorization", &authorization)))
        .unwrap();
        assert_eq!(res.status(), 200);
        g.bench_function(name, |b| {
            b.iter(|| {
                let res = now(svc
                    .clone()
                    .oneshot(request("authorization", &authorization)))
                .unwrap();
                black_box(res.status())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, events);
criterion_main!(benches);
