//! Jobs per second through the queue interface ([`Jobs`]), in memory against Redis,
//! measured side by side in the same run: each job is enqueued, claimed and
//! completed (the calls a client and the worker make, without HTTP).
//!
//! Two loads for each backend: one caller at a time (`seq`: the latency of the
//! three calls in a row) and 16 concurrent callers (`c16`: what one instance can
//! push through a single multiplexed Redis connection).
//!
//! `cargo bench -p queue-service --bench queue_backends` starts its own
//! `redis-server` (no persistence, on a free loopback port), then runs rounds of
//! 1 s per configuration, the order reversed every other round, each round on a
//! fresh queue (a new namespace; `FLUSHALL` between rounds). It prints each
//! configuration's median rate and the median of the per-round ratios of Redis to
//! memory. `PORTCULLIS_BENCH_ROUNDS` sets the number of rounds (default 7).
//! Without `--bench` (as a test target) it runs one short round as a check.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use queue_service::jobs::Jobs;
use queue_service::queue::{Enqueued, Queue, QueueConfig};
use queue_service::redis_queue::RedisQueue;

/// The configurations, in the order of a round.
const CONFIGS: [(&str, usize); 4] = [
    ("memory-seq", 1),
    ("redis-seq", 1),
    ("memory-c16", 16),
    ("redis-c16", 16),
];

struct Server(Child, u16);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> Option<Server> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = Server(child, port);
    for _ in 0..500 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(server);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn config() -> QueueConfig {
    QueueConfig {
        max_depth: 1_000_000,
        max_retained: 10_000_000,
        ..QueueConfig::default()
    }
}

async fn fresh(name: &str, url: &str, round: usize) -> Jobs {
    if name.starts_with("memory") {
        return Arc::new(Queue::new(config())).into();
    }
    let q = RedisQueue::new(url, None, &format!("bench{round}"), [7; 32], config()).unwrap();
    q.connect().await.unwrap();
    Arc::new(q).into()
}

/// Jobs per second through `q` for `secs` with `callers` concurrent callers.
async fn load(q: Jobs, callers: usize, secs: f64) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let (q, done) = (q.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < until {
                    let input = format!("bench {c} {i}");
                    i += 1;
                    let Ok(Enqueued::New(v)) = q.enqueue("api_key:bench", &input, 0).await else {
                        panic!("enqueue failed");
                    };
                    q.start(v.id).await.unwrap();
                    q.complete(v.id).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let Some(server) = redis_server() else {
        eprintln!("SKIPPED: redis-server is not on PATH; the queue backend benchmark did not run");
        return;
    };
    let url = format!("redis://127.0.0.1:{}/0", server.1);
    let rounds: usize = if bench {
        std::env::var("PORTCULLIS_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(7)
    } else {
        1
    };
    let secs = if bench { 1.0 } else { 0.1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); CONFIGS.len()];
    rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut admin = client.get_multiplexed_async_connection().await.unwrap();
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..CONFIGS.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (name, callers) = CONFIGS[i];
                let q = fresh(name, &url, round).await;
                rates[i].push(load(q, callers, secs).await);
                let _: () = redis::cmd("FLUSHALL")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
            }
        }
    });
    println!(
        "queue backends: jobs (enqueue + claim + complete) per second, median of {rounds} rounds"
    );
    for (i, (name, _)) in CONFIGS.iter().enumerate() {
        println!("  {name:<11} {:>10.0} /s", median(rates[i].clone()));
    }
    for (mem, red, label) in [(0, 1, "seq"), (2, 3, "c16")] {
        let ratios: Vec<f64> = rates[red]
            .iter()
            .zip(&rates[mem])
            .map(|(r, m)| r / m)
            .collect();
        println!(
            "  redis / memory ({label}): {:.4} (median of per-round ratios)",
            median(ratios)
        );
    }
}
