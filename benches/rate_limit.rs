//! Per-request cost of `RateLimitLayer` next to `tower_governor` (the governor-based
//! tower layer a user would otherwise pick), in the same run, on the same quota and
//! the same key (the `ClientIp` extension):
//!
//! - `hot_key`: every request from one address;
//! - `spread_1m`: requests cycle over 1 000 000 addresses, all already tracked;
//! - each with and without response header fields (portcullis: `RateLimit-Policy` +
//!   `RateLimit`; tower_governor: its `x-ratelimit-*` headers via `use_headers`);
//! - `bare`: the inner service alone, with the same requests made and dropped, so
//!   that each limiter's own cost is its time less this one;
//! - tower_governor twice without headers: keyed on the `ClientIp` alone (the least
//!   it can do), and `same_key`, keyed as portcullis keys by default (the `Principal`
//!   identity if any, else the address with IPv6 masked to its /64), so that both sides
//!   look up the same extensions per request.
//!
//! Before the timings it prints the heap bytes per tracked key of each limiter,
//! measured with a counting allocator from building it to after 1 000 000 inserted
//! keys (portcullis allocates its table when built, for its cap of 2 000 000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::pin;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use criterion::{Criterion, criterion_group, criterion_main};
use governor::middleware::NoOpMiddleware;
use http::{Request, Response};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
use portcullis::{ClientIp, Principal};
use tower::{Layer, Service};
use tower_governor::GovernorError;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;

/// Counts live heap bytes, for the bytes-per-key figure.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// tower_governor keyed on the same `ClientIp` extension portcullis reads.
#[derive(Clone)]
struct ClientIpKey;

impl KeyExtractor for ClientIpKey {
    type Key = IpAddr;
    fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
        req.extensions()
            .get::<ClientIp>()
            .map(|ip| ip.addr())
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// tower_governor keyed the way portcullis keys by default, so that both sides do
/// the same per-request work: the `Principal` identity when authenticated, else the
/// `ClientIp` with IPv6 masked to its /64.
#[derive(Clone)]
struct SameKey;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Who {
    Principal(String),
    Ip(IpAddr),
}

impl KeyExtractor for SameKey {
    type Key = Who;
    fn extract<T>(&self, req: &Request<T>) -> Result<Who, GovernorError> {
        if let Some(p) = req.extensions().get::<Principal>() {
            return Ok(Who::Principal(p.identity().to_owned()));
        }
        let ip = req
            .extensions()
            .get::<ClientIp>()
            .ok_or(GovernorError::UnableToExtractKey)?
            .addr();
        Ok(Who::Ip(match ip.to_canonical() {
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & !(u128::MAX >> 64)).into()),
            v4 => v4,
        }))
    }
}

const SPREAD: u32 = 1_000_000;

fn ip(i: u32) -> ClientIp {
    // Spread over the whole space, not one /8.
    ClientIp::new(IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761))))
}

fn request(ip: ClientIp) -> Request<()> {
    let mut req = Request::new(());
    req.extensions_mut().insert(ip);
    req
}

/// Calls the service once and polls its (immediately ready) future.
fn once<S>(svc: &mut S, req: Request<()>) -> Response<Body>
where
    S: Service<Request<()>, Response = Response<Body>, Error = Infallible>,
{
    let mut cx = Context::from_waker(Waker::noop());
    let mut fut = pin!(svc.call(req));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        _ => unreachable!("every future here is ready at once"),
    }
}

type Inner = tower::util::ServiceFn<
    fn(Request<()>) -> std::future::Ready<Result<Response<Body>, Infallible>>,
>;

fn inner() -> Inner {
    fn ok(_: Request<()>) -> std::future::Ready<Result<Response<Body>, Infallible>> {
        std::future::ready(Ok(Response::new(Body::empty())))
    }
    tower::service_fn(ok as fn(_) -> _)
}

// The same quota on both sides, chosen so that nothing is refused during the run:
// - hot key: one request per nanosecond, burst 10⁹ (time outruns the requests);
// - spread keys: one request per hour, burst 8 760 (a year of hours, within the
//   366 days a quota's burst may take to come back), far more than the visits one
//   key gets in a run; each visit leaves the key an hour from idle, so none is
//   swept and re-inserted while the bench runs.
fn burst(keys: u32) -> u32 {
    if keys == 1 { 1_000_000_000 } else { 8_760 }
}

fn period(keys: u32) -> Duration {
    if keys == 1 {
        Duration::from_nanos(1)
    } else {
        Duration::from_secs(3600)
    }
}

fn portcullis(fields: bool, keys: u32) -> RateLimitLayer {
    let quota = if keys == 1 {
        Quota::per_second(1_000_000_000).unwrap()
    } else {
        Quota::per_hour(1).unwrap().with_burst(burst(keys)).unwrap()
    };
    RateLimitLayer::builder()
        .policy(Policy::new("bench", quota).unwrap())
        .max_tracked_keys(2 * SPREAD as usize)
        .fields(fields)
        .build()
        .unwrap()
}

/// Live heap bytes from building `make()`'s service to after its 1 000 000 keys,
/// divided by the keys: what a limiter allocates up front counts too.
fn bytes_per_key<S>(make: impl FnOnce() -> S) -> f64
where
    S: Service<Request<()>, Response = Response<Body>, Error = Infallible>,
{
    let before = LIVE.load(Ordering::Relaxed);
    let mut svc = make();
    for i in 0..SPREAD {
        black_box(once(&mut svc, request(ip(i))));
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per = (after - before) as f64 / f64::from(SPREAD);
    drop(svc);
    per
}

fn bench(c: &mut Criterion) {
    // PORTCULLIS_BENCH_CALLS=<case>:<n> runs one case n times outside criterion and
    // returns, for instruction counts: `valgrind --tool=callgrind
    // --toggle-collect='*calls_loop*'` then counts only the n requests.
    if let Some(spec) = std::env::var_os("PORTCULLIS_BENCH_CALLS") {
        calls(spec.to_str().expect("ASCII"));
        return;
    }
    // PORTCULLIS_BENCH_INTERLEAVED=<group>:<rounds> times `bare`, portcullis and
    // tower_governor keyed alike in turns of 20 000 requests each, so that a busy
    // machine slows all three alike, and prints the medians (see `interleaved`).
    if let Some(spec) = std::env::var_os("PORTCULLIS_BENCH_INTERLEAVED") {
        interleaved(spec.to_str().expect("ASCII"));
        return;
    }
    // Memory first, each limiter fresh (PORTCULLIS_BENCH_NO_MEMORY=1 skips it, for
    // profiling one timing).
    if std::env::var_os("PORTCULLIS_BENCH_NO_MEMORY").is_none() {
        memory();
    }
    timings(c);
}

fn memory() {
    let ours = bytes_per_key(|| portcullis(true, SPREAD).layer(inner()));
    let theirs = bytes_per_key(|| {
        let cfg = governor(SPREAD, ClientIpKey).finish().unwrap();
        tower_governor::GovernorLayer::new(cfg).layer(inner())
    });
    println!(
        "memory per tracked key over {SPREAD} keys: portcullis {ours:.1} B, tower_governor {theirs:.1} B"
    );
}

/// tower_governor's configuration on the bench's quota for `keys` keys, keyed by
/// `key`.
fn governor<K: KeyExtractor>(keys: u32, key: K) -> GovernorConfigBuilder<K, NoOpMiddleware> {
    GovernorConfigBuilder::default()
        .period(period(keys))
        .burst_size(burst(keys))
        .key_extractor(key)
}

/// The four services of one group, by name.
fn service(name: &str, keys: u32) -> Box<dyn FnMut(Request<()>) -> Response<Body>> {
    fn boxed<S>(mut s: S) -> Box<dyn FnMut(Request<()>) -> Response<Body>>
    where
        S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + 'static,
    {
        Box::new(move |req| once(&mut s, req))
    }
    match name {
        "bare" => boxed(inner()),
        "portcullis/no_fields" => boxed(portcullis(false, keys).layer(inner())),
        "portcullis/fields" => boxed(portcullis(true, keys).layer(inner())),
        "tower_governor/no_headers" => {
            let cfg = governor(keys, ClientIpKey).finish().unwrap();
            boxed(tower_governor::GovernorLayer::new(cfg).layer(inner()))
        }
        "tower_governor/no_headers_same_key" => {
            let cfg = governor(keys, SameKey).finish().unwrap();
            boxed(tower_governor::GovernorLayer::new(cfg).layer(inner()))
        }
        "tower_governor/headers" => {
            let cfg = governor(keys, ClientIpKey).use_headers().finish().unwrap();
            boxed(tower_governor::GovernorLayer::new(cfg).layer(inner()))
        }
        _ => panic!("unknown case {name}"),
    }
}

fn calls(spec: &str) {
    let (case, n) = spec.rsplit_once(':').expect("<case>:<n>");
    let n: u32 = n.parse().expect("a count");
    let (group, name) = case.split_once('/').expect("<group>/<name>");
    let keys = if group == "hot_key" { 1 } else { SPREAD };
    let mut svc = service(name, keys);
    for k in 0..keys {
        svc(request(ip(k)));
    }
    calls_loop(&mut *svc, keys, n);
}

/// Times the three services of the target's ratio (`bare`, portcullis without
/// fields, tower_governor keyed as portcullis keys) in turns: each round runs
/// 20 000 requests of each, one service after the other. Prints per service the
/// median time per request over the rounds, and the median over the rounds of the
/// ratio (portcullis − `bare`) ÷ (tower_governor − `bare`), each round's three
/// timings taken within a few milliseconds of each other.
fn interleaved(spec: &str) {
    const BLOCK: u32 = 20_000;
    let (group, rounds) = spec.rsplit_once(':').expect("<group>:<rounds>");
    let rounds: usize = rounds.parse().expect("a count");
    let keys = if group == "hot_key" { 1 } else { SPREAD };
    let names = [
        "bare",
        "portcullis/no_fields",
        "tower_governor/no_headers_same_key",
    ];
    let mut services: Vec<_> = names
        .iter()
        .map(|name| {
            let mut svc = service(name, keys);
            for k in 0..keys {
                svc(request(ip(k)));
            }
            svc
        })
        .collect();
    let mut next = [0u32; 3];
    let mut times: Vec<Vec<f64>> = (0..3).map(|_| Vec::with_capacity(rounds)).collect();
    for _ in 0..rounds {
        for (j, svc) in services.iter_mut().enumerate() {
            let start = std::time::Instant::now();
            for _ in 0..BLOCK {
                next[j] = if next[j] + 1 == keys { 0 } else { next[j] + 1 };
                black_box(svc(request(ip(next[j]))));
            }
            times[j].push(start.elapsed().as_nanos() as f64 / f64::from(BLOCK));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|r| (times[1][r] - times[0][r]) / (times[2][r] - times[0][r]))
        .collect();
    for (name, t) in names.iter().zip(&mut times) {
        println!("{group}/{name}: median {:.1} ns per request", median(t));
    }
    println!(
        "{group}: (portcullis - bare) / (tower_governor same key - bare), median of {rounds} rounds: {:.3}",
        median(&mut ratios)
    );
}

#[inline(never)]
fn calls_loop(svc: &mut dyn FnMut(Request<()>) -> Response<Body>, keys: u32, n: u32) {
    let mut i = 0u32;
    for _ in 0..n {
        i = if i + 1 == keys { 0 } else { i + 1 };
        black_box(svc(request(ip(i))));
    }
}

/// Times `make()`'s service over `keys` keys, all tracked before the timing starts.
/// The service is built on first use, so a filtered-out benchmark costs nothing.
fn time<S, F>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    keys: u32,
    make: F,
) where
    S: Service<Request<()>, Response = Response<Body>, Error = Infallible>,
    F: Fn() -> S,
{
    let mut svc: Option<S> = None;
    let mut i = 0u32;
    g.bench_function(name, |b| {
        let svc = svc.get_or_insert_with(|| {
            let mut s = make();
            for k in 0..keys {
                once(&mut s, request(ip(k)));
            }
            s
        });
        b.iter(|| {
            i = if i + 1 == keys { 0 } else { i + 1 };
            black_box(once(svc, request(ip(i))))
        })
    });
}

fn timings(c: &mut Criterion) {
    for (group, keys) in [
        ("rate_limit/hot_key", 1u32),
        ("rate_limit/spread_1m", SPREAD),
    ] {
        let mut g = c.benchmark_group(group);
        time(&mut g, "bare", keys, inner);
        time(&mut g, "portcullis/no_fields", keys, || {
            portcullis(false, keys).layer(inner())
        });
        time(&mut g, "portcullis/fields", keys, || {
            portcullis(true, keys).layer(inner())
        });
        time(&mut g, "tower_governor/no_headers", keys, || {
            let cfg = governor(keys, ClientIpKey).finish().unwrap();
            tower_governor::GovernorLayer::new(cfg).layer(inner())
        });
        time(&mut g, "tower_governor/no_headers_same_key", keys, || {
            let cfg = governor(keys, SameKey).finish().unwrap();
            tower_governor::GovernorLayer::new(cfg).layer(inner())
        });
        time(&mut g, "tower_governor/headers", keys, || {
            let cfg = governor(keys, ClientIpKey).use_headers().finish().unwrap();
            tower_governor::GovernorLayer::new(cfg).layer(inner())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
