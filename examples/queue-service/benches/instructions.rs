//! The cost of one `GET /v1/jobs/{id}` in process (no TCP): the service is called
//! directly with requests as `axum::serve` hands them over, on one thread.
//!
//! Configurations (`PORTCULLIS_BENCH_CONFIG`; all three in turn when unset):
//! `bare` (the handler with no layers), `full` (the demo as it serves, no log
//! subscriber) and `full-logs` (JSON logs in the redacting JSON format into a
//! sink). `PORTCULLIS_BENCH_N` requests each (default 100 000; 100 without
//! `--bench`), after as many of warm-up; prints the wall time per request.
//!
//! Instructions per request: run one configuration under callgrind, counting only
//! the measured requests (`measured`, not the warm-up), for two values of `N`; the
//! difference of the counts divided by the difference of `N` is the per-request
//! count without setup:
//!
//! ```text
//! PORTCULLIS_BENCH_CONFIG=full PORTCULLIS_BENCH_N=1000 valgrind --tool=callgrind \
//!   --collect-atstart=no '--toggle-collect=*instructions::measured*' <bench binary> --bench
//! ```

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use portcullis::redact::RedactingJson;
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

const CONFIGS: [&str; 3] = ["bare", "full", "full-logs"];

/// Calls `svc` `n` times with `request()`; each answer must be 200.
async fn drive<S>(svc: &mut S, n: u64, request: &impl Fn() -> Request)
where
    S: Service<Request, Response = Response>,
    S::Error: std::fmt::Debug,
{
    for _ in 0..n {
        let res = svc.ready().await.unwrap().call(request()).await.unwrap();
        assert_eq!(res.status(), 200);
        black_box(res);
    }
}

/// The timed requests: the function callgrind counts (never inlined, so that its
/// name stays in the binary).
#[inline(never)]
fn measured<S>(rt: &Runtime, svc: &mut S, n: u64, request: &impl Fn() -> Request)
where
    S: Service<Request, Response = Response>,
    S::Error: std::fmt::Debug,
{
    rt.block_on(drive(svc, n, request));
}

/// The wall time per request of `n` requests to `svc`, after `n` of warm-up.
fn measure<S>(svc: &mut S, n: u64, request: impl Fn() -> Request) -> Duration
where
    S: Service<Request, Response = Response>,
    S::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(drive(svc, n, &request));
    let start = Instant::now();
    measured(&rt, svc, n, &request);
    start.elapsed() / u32::try_from(n).unwrap()
}

fn run(config: &str, n: u64) -> Duration {
    let f = common::fixture();
    let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    let (path, key) = (f.path.clone(), f.key.clone());
    let request = move || {
        let mut req = Request::get(path.as_str())
            .header("host", "bench")
            .header("x-api-key", key.as_str())
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    };
    match config {
        "bare" => measure(&mut common::bare(f.state), n, request),
        "full" => measure(&mut queue_service::service(&f.state, &f.guard), n, request),
        "full-logs" => {
            let subscriber = tracing_subscriber::fmt()
                .event_format(RedactingJson::new())
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                measure(&mut queue_service::service(&f.state, &f.guard), n, request)
            })
        }
        other => panic!("PORTCULLIS_BENCH_CONFIG is one of {CONFIGS:?}, not {other:?}"),
    }
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let n = std::env::var("PORTCULLIS_BENCH_N")
        .map_or(if measuring { 100_000 } else { 100 }, |v| {
            v.parse().expect("PORTCULLIS_BENCH_N is a number")
        });
    let configs: Vec<String> = match std::env::var("PORTCULLIS_BENCH_CONFIG") {
        Ok(c) => vec![c],
        Err(_) => CONFIGS.iter().map(|c| (*c).to_owned()).collect(),
    };
    for config in &configs {
        let per_request = run(config, n);
        println!("{config:>10}: {per_request:?} per request ({n} requests, in process)");
    }
}
