//! The redactor's throughput on clean and on secret-bearing JSON log lines (and on
//! clean plain-text lines, about 64 KiB each; the JSON lines also with a rule set
//! holding a sensitive name of the user's own), beside the same
//! secret shapes written as one `regex` (what a user would otherwise write); and the
//! per-request cost of `AccessLogLayer` beside tower-http's `TraceLayer` (the layer a
//! tower user would otherwise pick), both emitting one INFO event per request through
//! a JSON subscriber that writes to a sink, and beside no layer at all.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use portcullis::access_log::AccessLogLayer;
use portcullis::redact::Redactor;
use portcullis::request_id::RequestIdLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

mod common;
use common::{Body, handler, now};

/// About 64 KiB of JSON access-log lines; with `secrets`, every line carries one.
fn log_text(secrets: bool) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < 64 * 1024 {
        let secret = match i % 6 {
            0 => "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2ln",
            1 => "pc_live_AbCdEfGhIjKlMnOpQrStUvWx0123",
            2 => "redis://:hunter2hunter2@cache:6379/0",
            3 => "AKIAIOSFODNN7EXAMPLE",
            4 => "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz",
            _ => "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        };
        let note = if secrets {
            secret
        } else {
            "nothing to see here at all, move along"
        };
        s.push_str(&format!(
            "{{\"timestamp\":\"2026-12-01T02:15:18.{i:06}Z\",\"level\":\"INFO\",\"fields\":{{\"message\":\"request\",\"request_id\":\"0b6c1e2a-5f3d-4c8e-9a71-{i:012}\",\"method\":\"GET\",\"path\":\"/v1/jobs/{i}\",\"status\":200,\"latency_us\":412,\"client_ip\":\"203.0.113.{}\",\"principal\":\"billing-svc\",\"note\":\"{note}\"}},\"target\":\"portcullis::access\"}}\n",
            i % 256
        ));
        i += 1;
    }
    s
}

/// The peer: the same secret shapes as one regex, replaced with `****`.
fn regex_peer() -> regex::Regex {
    regex::Regex::new(concat!(
        r"(?:pc_live_|pc_test_)[A-Za-z0-9]{20,}",
        r"|(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
        r"|AIza[A-Za-z0-9_-]{30,}",
        r"|github_pat_[A-Za-z0-9_]{22,}|gh[pousr]_[A-Za-z0-9]{30,}",
        r"|gl(?:pat|rt|dt)-[A-Za-z0-9_-]{20,}",
        r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}|whsec_[A-Za-z0-9]{24,}",
        r"|sk-[A-Za-z0-9_-]{20,}",
        r"|xox[bpares]-[A-Za-z0-9-]{10,}",
        r"|eyJ[A-Za-z0-9_-]{7,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*",
        r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/-]{4,}=*",
        r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\sA-Za-z0-9+/=]*(?:-----END [A-Z ]*PRIVATE KEY-----)?",
        r"|://[^/\s:@]*:[^/\s@]*@",
        r#"|(?i:password|passwd|secret|token|api[_-]?key|authorization|cookie)["']?\s*[:=]\s*["']?[^\s"'&,;]+"#,
    ))
    .unwrap()
}

fn redactor(c: &mut Criterion) {
    let r = Redactor::new();
    let re = regex_peer();
    let mut g = c.benchmark_group("redactor");
    // Plain-text log lines without separators: what the prefilter skips outright.
    let text_lines = "GET /v1/jobs/123 200 in 412 us from 203.0.113.5 for billing-svc, nothing to see here at all, move along\n"
        .repeat(600);
    for (name, text) in [
        ("clean", log_text(false)),
        ("secrets", log_text(true)),
        ("clean_text_lines", text_lines),
    ] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("portcullis", name), &text, |b, t| {
            b.iter(|| black_box(r.redact(black_box(t))).len())
        });
        g.bench_with_input(BenchmarkId::new("regex", name), &text, |b, t| {
            b.iter(|| black_box(re.replace_all(black_box(t), "****")).len())
        });
    }
    // A rule set with a sensitive name of the user's own, on the same lines.
    let own = Redactor::builder()
        .sensitive_name("x-custom-secret")
        .build()
        .expect("a valid name");
    for (name, text) in [
        ("clean_own_name", log_text(false)),
        ("secrets_own_name", log_text(true)),
    ] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("portcullis", name), &text, |b, t| {
            b.iter(|| black_box(own.redact(black_box(t))).len())
        });
    }
    // Adversarial input: no rule may go quadratic.
    let adversarial = "eyJaaaaaaaaaaa.b".repeat(4096);
    g.throughput(Throughput::Bytes(adversarial.len() as u64));
    g.bench_with_input(
        BenchmarkId::new("portcullis", "adversarial"),
        &adversarial,
        |b, t| b.iter(|| black_box(r.redact(black_box(t))).len()),
    );
    g.finish();
}

fn request() -> Request<Body> {
    Request::builder()
        .uri("/v1/jobs/01J9Z6Q?page=2&api_key=pc_live_AbCdEfGhIjKlMnOpQrStUvWx0123")
        .header("user-agent", "bench/1.0")
        .header(
            "authorization",
            "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        )
        .header("x-request-id", "bench-request-1")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn per_request<S, B>(b: &mut criterion::Bencher<'_>, svc: S)
where
    S: Service<Request<Body>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    b.iter(|| {
        let res = now(svc.clone().oneshot(request())).unwrap();
        black_box(res.status())
    })
}

fn access_log(c: &mut Criterion) {
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(Level::INFO)
        .with_writer(std::io::sink)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut g = c.benchmark_group("access_log_per_request");
    g.bench_function("no_layer", |b| per_request(b, handler()));
    g.bench_function("portcullis_AccessLogLayer", |b| {
        per_request(b, AccessLogLayer::new().layer(handler()))
    });
    g.bench_function("tower_http_TraceLayer", |b| {
        let trace = TraceLayer::new_for_http()
            .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
            .on_response(DefaultOnResponse::new().level(Level::INFO));
        per_request(b, trace.layer(handler()))
    });
    g.bench_function("portcullis_RequestId_and_AccessLog", |b| {
        let svc = ServiceBuilder::new()
            .layer(RequestIdLayer::new())
            .layer(AccessLogLayer::new())
            .service(handler());
        per_request(b, svc)
    });
    g.finish();
}

criterion_group!(benches, redactor, access_log);
criterion_main!(benches);
