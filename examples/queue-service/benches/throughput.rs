//! Requests per second of `GET /v1/jobs/{id}` over keep-alive loopback connections,
//! in ten configurations served side by side:
//!
//! - `bare`: the handler with no layers (the `Principal` it reads is a fixed
//!   extension);
//! - `fields`: `bare` sending the response fields the full service adds (the names
//!   and values of one real full response): what those fields cost by themselves,
//!   the client's parsing included;
//! - `full`: the demo as it serves (every layer, the scope table, the refusal
//!   counters), with no log subscriber;
//! - `full-logs`: the same with JSON logs in the redacting JSON format into a sink,
//!   as the binary writes them to standard error;
//! - `peer`: `bare` inside the stack a tower user would assemble from peers
//!   (tower-http and tower_governor, `benches/common/peer.rs` of the crate), the
//!   request carrying the key it checks, no log subscriber;
//! - `peer-logs`: the same with `tracing-subscriber`'s JSON logs into a sink;
//! - `bare+1us`: `bare` busy for 1 µs per request before the handler: what one
//!   microsecond of the server's work per request costs in this measurement;
//! - `bare-served`: `bare` served as the demo's binary serves (connect info,
//!   graceful shutdown), where the others are served by a plain `axum::serve`;
//! - `auth`: the handler behind the crate's authentication layer alone (API keys);
//! - `peer-auth`: `bare` behind the peer stack's key check alone (tower-http's
//!   `ValidateRequestHeader`, the key looked up in a set).
//!
//! `cargo bench -p queue-service --bench throughput` runs rounds of 1 s, each
//! loading every configuration in turn, the order reversed every other round; it
//! prints each configuration's median rate and the median of its per-round ratios
//! to `bare`, and beside them the server's CPU time per request (its threads' time
//! on a CPU, user and kernel, over the requests served) and the median of the
//! per-round ratios of `bare`'s to it; then the medians of the per-round rate ratios
//! `full` ÷ `fields`, `full` ÷ `peer`, `full-logs` ÷ `peer-logs` and `auth` ÷
//! `peer-auth`. `PORTCULLIS_BENCH_ROUNDS` sets the number of rounds
//! (default 11), `PORTCULLIS_BENCH_CONNECTIONS` the load generator's connections
//! (default 32), `PORTCULLIS_BENCH_SERVER_THREADS` each server's worker threads
//! (default 2).
//! `PORTCULLIS_BENCH_CONFIG=<name>` loads that configuration alone for
//! `PORTCULLIS_BENCH_SECS` (default 10) after 1 s of warm-up, for a profiler.
//! Without `--bench` (as a test target) it runs one short round as a check.
//!
//! Each server has a runtime of its own (two worker threads, named
//! `server-<configuration's position>`); the load generator runs on another. Only
//! `full-logs`'s and `peer-logs`'s threads have a log subscriber; the other servers'
//! threads have one that takes no event (see `main`). The bytes of log written are
//! counted, and a run in which either wrote none fails (and, for one configuration
//! alone, one in which another wrote some).

mod common;
#[path = "../../../benches/common/peer.rs"]
mod peer;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use portcullis::redact::RedactingJson;
use queue_service::routes;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tracing::Dispatch;
use tracing::dispatcher::DefaultGuard;

/// The bytes of log `full-logs` wrote (in the redacting JSON format, then dropped).
static LOGGED: AtomicUsize = AtomicUsize::new(0);
/// The bytes of log `peer-logs` wrote (in `tracing-subscriber`'s JSON format).
static PEER_LOGGED: AtomicUsize = AtomicUsize::new(0);

/// A sink that counts what it is given.
struct Counted(&'static AtomicUsize);

impl std::io::Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(b.len(), Ordering::Relaxed);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Keep-alive connections of the load generator, unless `PORTCULLIS_BENCH_CONNECTIONS`
/// says otherwise.
const CONNECTIONS: u64 = 32;

/// The configurations, in the order of a round.
const CONFIGS: [&str; 12] = [
    "bare",
    "fields",
    "full",
    "full-logs",
    "peer",
    "peer-logs",
    "bare+1us",
    "bare-served",
    "auth",
    "peer-auth",
    "auth-fields",
    "peer-auth-fields",
];

/// The ratios printed besides those to `bare`: (numerator, denominator).
const PAIRS: [(usize, usize); 6] = [(2, 1), (2, 4), (3, 5), (8, 9), (10, 1), (11, 1)];

/// One served configuration: where, what to ask, with which credential.
struct Target {
    addr: SocketAddr,
    path: String,
    auth: Option<(HeaderName, HeaderValue)>,
}

thread_local! {
    /// The log subscriber of this thread, for the threads of `full-logs`'s runtime.
    static LOGS: RefCell<Option<DefaultGuard>> = const { RefCell::new(None) };
}

/// A runtime for one server, each of its threads with `logs` as its subscriber.
fn server_runtime(which: usize, logs: Dispatch) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads())
        .thread_name(server_thread_name(which))
        .enable_all()
        .on_thread_start(move || {
            LOGS.with(|g| *g.borrow_mut() = Some(tracing::dispatcher::set_default(&logs)));
        })
        .build()
        .unwrap()
}

/// Worker threads per server: `PORTCULLIS_BENCH_SERVER_THREADS`, else 2.
fn server_threads() -> usize {
    usize::try_from(env_number("PORTCULLIS_BENCH_SERVER_THREADS", 2)).unwrap()
}

/// The name of the threads of configuration `which`'s server.
fn server_thread_name(which: usize) -> String {
    format!("server-{which}")
}

/// The CPU time (ns) the threads of configuration `which`'s server have used so far,
/// from `/proc/self/task/*/schedstat` (its first field: time on a CPU, user and
/// kernel). `None` where the kernel does not provide it.
fn server_cpu_ns(which: usize) -> Option<u64> {
    let name = server_thread_name(which);
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = task.ok()?.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread has ended
        };
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// A free loopback port, bound now; the server takes it on its own runtime.
fn bind() -> (std::net::TcpListener, SocketAddr) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// `router` (no connect info) on `rt`.
fn serve_router(rt: &Runtime, router: axum::Router) -> SocketAddr {
    let (listener, addr) = bind();
    rt.spawn(async move {
        let listener = TcpListener::from_std(listener).unwrap();
        axum::serve(listener, router).await
    });
    addr
}

/// `router` on `rt`, served as the demo's binary serves (connect info, graceful
/// shutdown).
fn serve_router_as_demo(rt: &Runtime, router: axum::Router) -> SocketAddr {
    let (listener, addr) = bind();
    rt.spawn(async move {
        let listener = TcpListener::from_std(listener).unwrap();
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })
        .await
    });
    addr
}

/// The whole demo on `rt`, served as the binary serves it (without the worker).
fn serve_full(rt: &Runtime) -> Target {
    let f = common::fixture();
    let (listener, addr) = bind();
    rt.spawn(async move {
        let listener = TcpListener::from_std(listener).unwrap();
        let app = queue_service::service(&f.state, &f.guard);
        queue_service::serve(listener, app, &f.state, None, std::future::pending()).await
    });
    Target {
        addr,
        path: f.path,
        auth: Some((
            HeaderName::from_static("x-api-key"),
            HeaderValue::try_from(f.key).unwrap(),
        )),
    }
}

/// `bare` plus `fields` on every response. One `layer` call, as `bare`'s, so that
/// the two routers differ only in the fields.
fn fields_router(state: routes::AppState, fields: HeaderMap) -> axum::Router {
    axum::Router::new()
        .route("/v1/jobs/{id}", get(routes::get_job))
        .layer((Extension(common::client()), fields_layer(fields)))
        .with_state(state)
}

/// A layer that sets `fields` on every response.
fn fields_layer(
    fields: HeaderMap,
) -> tower::util::MapResponseLayer<impl Fn(Response) -> Response + Clone> {
    tower::util::MapResponseLayer::new(move |mut res: Response| {
        for (k, v) in &fields {
            res.headers_mut().insert(k, v.clone());
        }
        res
    })
}

/// `bare` inside the peer stack, which checks `key`.
fn peer_router(state: routes::AppState, key: &str) -> axum::Router {
    let key = key.to_owned();
    let peer = tower::layer::layer_fn(move |inner| {
        tower::ServiceExt::map_response(peer::peer_stack(&key, inner), |res| {
            res.map(axum::body::Body::new)
        })
    });
    axum::Router::new()
        .route("/v1/jobs/{id}", get(routes::get_job))
        .layer((peer, Extension(common::client())))
        .with_state(state)
}

/// The handler behind the crate's authentication layer alone, API keys only: the
/// `Principal` the handler reads is the layer's.
fn auth_router(state: routes::AppState, keys: portcullis::api_key::ApiKeys) -> axum::Router {
    axum::Router::new()
        .route("/v1/jobs/{id}", get(routes::get_job))
        .layer(portcullis::authenticate::AuthenticateLayer::api_keys(keys))
        .with_state(state)
}

/// `bare` behind the peer stack's key check alone (tower-http's
/// `ValidateRequestHeader`, the key looked up in a set).
fn peer_auth_router(state: routes::AppState, key: &str) -> axum::Router {
    axum::Router::new()
        .route("/v1/jobs/{id}", get(routes::get_job))
        .layer((Extension(common::client()), peer::key_check(key)))
        .with_state(state)
}

/// `bare` busy for one microsecond per request before the handler.
fn busy_router(state: routes::AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/jobs/{id}", get(routes::get_job))
        .layer((
            Extension(common::client()),
            tower::util::MapRequestLayer::new(|req: Request| {
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_micros(1) {
                    std::hint::spin_loop();
                }
                req
            }),
        ))
        .with_state(state)
}

/// `router` with a fresh fixture's state on `rt`; the requests carry the fixture's
/// key when `with_key`.
fn serve_fixture(
    rt: &Runtime,
    router: impl FnOnce(routes::AppState, &str) -> axum::Router,
    with_key: bool,
) -> Target {
    let f = common::fixture();
    let auth = with_key.then(|| {
        (
            HeaderName::from_static("x-api-key"),
            HeaderValue::try_from(f.key.as_str()).unwrap(),
        )
    });
    Target {
        addr: serve_router(rt, router(f.state, &f.key)),
        path: f.path,
        auth,
    }
}

/// [`auth_router`] with a fresh fixture's state, wrapped by `wrap`, on `rt`; the
/// requests carry a key of the principal the fixture's job belongs to (`client`).
fn serve_auth(rt: &Runtime, wrap: impl FnOnce(axum::Router) -> axum::Router) -> Target {
    let (keys, store) = queue_service::guard::demo_keys(&[("client", "jobs:read")]).unwrap();
    let f = common::fixture();
    Target {
        addr: serve_router(rt, wrap(auth_router(f.state, store))),
        path: f.path,
        auth: Some((
            HeaderName::from_static("x-api-key"),
            HeaderValue::try_from(keys[0].key.expose_secret()).unwrap(),
        )),
    }
}

/// A client connection to `addr`.
async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// The request, built from parts parsed once (cloning them is a reference count),
/// as a load tool sends a pre-built request.
fn request(uri: &Uri, auth: Option<&(HeaderName, HeaderValue)>) -> Request<Empty<Bytes>> {
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = uri.clone();
    req.headers_mut()
        .insert(header::HOST, HeaderValue::from_static("bench"));
    if let Some((k, v)) = auth {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    req
}

/// The response headers of one request to `target` (status 200).
async fn headers_of(target: &Target) -> HeaderMap {
    let uri: Uri = target.path.parse().unwrap();
    let mut sender = connect(target.addr).await;
    let res = sender
        .send_request(request(&uri, target.auth.as_ref()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.headers().clone()
}

/// Requests per second to `target` over `connections` connections for `dur`.
async fn load(target: &Target, connections: u64, dur: Duration) -> f64 {
    let deadline = tokio::time::Instant::now() + dur;
    let uri: Uri = target.path.parse().unwrap();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (addr, uri, auth) = (target.addr, uri.clone(), target.auth.clone());
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                let mut n = 0u64;
                while tokio::time::Instant::now() < deadline {
                    let res = sender
                        .send_request(request(&uri, auth.as_ref()))
                        .await
                        .unwrap();
                    assert_eq!(res.status(), 200);
                    res.into_body().collect().await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / dur.as_secs_f64()
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number"))
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let only = std::env::var("PORTCULLIS_BENCH_CONFIG").ok();
    if let Some(name) = &only {
        assert!(
            CONFIGS.contains(&name.as_str()),
            "PORTCULLIS_BENCH_CONFIG is one of {CONFIGS:?}, not {name:?}"
        );
    }
    let logs = Dispatch::new(
        tracing_subscriber::fmt()
            .event_format(RedactingJson::new())
            .with_writer(|| Counted(&LOGGED))
            .finish(),
    );
    let peer_logs = Dispatch::new(
        tracing_subscriber::fmt()
            .json()
            .with_writer(|| Counted(&PEER_LOGGED))
            .finish(),
    );
    // The other servers' threads get a subscriber that takes no event, rather than
    // none: tracing decides once per call site whether any subscriber may want its
    // events, and while only one subscriber exists it asks the one of the thread that
    // reaches the call site first. Were the logs the only one, the first request to
    // `full` would switch the access log off for `full-logs` too.
    let off = Dispatch::new(tracing::subscriber::NoSubscriber::default());
    let subscribers = CONFIGS.map(|name| match name {
        "full-logs" => logs.clone(),
        "peer-logs" => peer_logs.clone(),
        _ => off.clone(),
    });
    let runtimes: Vec<Runtime> = subscribers
        .into_iter()
        .enumerate()
        .map(|(which, logs)| server_runtime(which, logs))
        .collect();
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let bare = serve_fixture(&runtimes[0], |state, _| common::bare(state), false);
    let full = serve_full(&runtimes[2]);
    let full_logs = serve_full(&runtimes[3]);
    // The fields a full response has and a bare one lacks, with their values.
    let (full_headers, bare_headers) =
        client.block_on(async { (headers_of(&full).await, headers_of(&bare).await) });
    let mut added = HeaderMap::new();
    for (k, v) in &full_headers {
        if !bare_headers.contains_key(k) {
            added.append(k, v.clone());
        }
    }
    let names: Vec<&str> = added.keys().map(HeaderName::as_str).collect();
    for required in ["x-request-id", "ratelimit", "ratelimit-policy"] {
        assert!(names.contains(&required), "{names:?}");
    }
    println!("fields: {}", names.join(", "));
    let fields = serve_fixture(
        &runtimes[1],
        |state, _| fields_router(state, added.clone()),
        false,
    );
    let peer = serve_fixture(&runtimes[4], peer_router, true);
    let peer_logs = serve_fixture(&runtimes[5], peer_router, true);
    let busy = serve_fixture(&runtimes[6], |state, _| busy_router(state), false);
    let bare_served = {
        let f = common::fixture();
        Target {
            addr: serve_router_as_demo(&runtimes[7], common::bare(f.state)),
            path: f.path,
            auth: None,
        }
    };
    let auth = serve_auth(&runtimes[8], |router| router);
    let peer_auth = serve_fixture(&runtimes[9], peer_auth_router, true);
    // The least a stack that checks a key and sends the required fields does.
    let auth_fields = serve_auth(&runtimes[10], |router| {
        router.layer(fields_layer(added.clone()))
    });
    let peer_auth_fields = serve_fixture(
        &runtimes[11],
        |state, key| peer_auth_router(state, key).layer(fields_layer(added.clone())),
        true,
    );
    let targets = [
        bare,
        fields,
        full,
        full_logs,
        peer,
        peer_logs,
        busy,
        bare_served,
        auth,
        peer_auth,
        auth_fields,
        peer_auth_fields,
    ];

    client.block_on(async {
        let connections = env_number("PORTCULLIS_BENCH_CONNECTIONS", CONNECTIONS);
        if let Some(name) = only {
            let which = CONFIGS.iter().position(|c| *c == name).unwrap();
            let secs = if measuring {
                env_number("PORTCULLIS_BENCH_SECS", 10)
            } else {
                1
            };
            load(&targets[which], connections, Duration::from_secs(1)).await;
            let rate = load(&targets[which], connections, Duration::from_secs(secs)).await;
            println!("{name}: {rate:.0} req/s over {secs} s (after 1 s of warm-up)");
            assert_eq!(
                (
                    LOGGED.load(Ordering::Relaxed) > 0,
                    PEER_LOGGED.load(Ordering::Relaxed) > 0
                ),
                (name == "full-logs", name == "peer-logs"),
                "only full-logs and peer-logs write log lines"
            );
            return;
        }
        let (rounds, dur) = if measuring {
            (
                usize::try_from(env_number("PORTCULLIS_BENCH_ROUNDS", 11)).unwrap(),
                Duration::from_secs(1),
            )
        } else {
            (1, Duration::from_millis(100))
        };
        for t in &targets {
            load(t, connections, dur).await;
        }
        let mut rates: [Vec<f64>; CONFIGS.len()] = Default::default();
        // The server's CPU time per request (ns), where the kernel reports it.
        let mut cpu: [Vec<f64>; CONFIGS.len()] = Default::default();
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..CONFIGS.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for which in order {
                let before = server_cpu_ns(which);
                let rate = load(&targets[which], connections, dur).await;
                if let (Some(a), Some(b)) = (before, server_cpu_ns(which)) {
                    cpu[which].push(b.saturating_sub(a) as f64 / (rate * dur.as_secs_f64()));
                }
                rates[which].push(rate);
            }
        }
        println!(
            "GET /v1/jobs/{{id}}, {connections} connections, rounds of {dur:?}: {rounds}; \
             median req/s, and the median of the per-round ratios to bare; the server's \
             CPU time per request, and the median of bare's per-round CPU time over it"
        );
        for (which, name) in CONFIGS.iter().enumerate() {
            let (r, c) = (&rates[which], &cpu[which]);
            let ratios: Vec<f64> = r.iter().zip(&rates[0]).map(|(x, b)| x / b).collect();
            print!(
                "{name:>16}: {:>8.0} req/s {:>6.1} %",
                median(r),
                100.0 * median(&ratios)
            );
            if c.len() == rounds {
                let ratios: Vec<f64> = cpu[0].iter().zip(c).map(|(b, x)| b / x).collect();
                print!(
                    "   server CPU {:>5.2} µs/request {:>6.1} %",
                    median(c) / 1e3,
                    100.0 * median(&ratios)
                );
            }
            println!();
            assert!(median(r) > 0.0);
        }
        for (a, b) in PAIRS {
            let ratios: Vec<f64> = rates[a].iter().zip(&rates[b]).map(|(x, y)| x / y).collect();
            println!(
                "{:>16} ÷ {}: {:.1} %",
                CONFIGS[a],
                CONFIGS[b],
                100.0 * median(&ratios)
            );
        }
        assert!(
            LOGGED.load(Ordering::Relaxed) > 0 && PEER_LOGGED.load(Ordering::Relaxed) > 0,
            "full-logs and peer-logs both write log lines"
        );
    });
}
