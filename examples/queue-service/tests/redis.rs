//! The queue on Redis, against a real `redis-server` each test starts itself: the
//! same conformance cases against the in-memory and the Redis backend, then the
//! demo as a deployment would run it (its binary killed and restarted, two
//! instances sharing one queue, a worker that dies holding a lease, Redis
//! restarted mid-run, a Redis ACL user limited to the namespace, `rediss://`), and
//! what Redis holds: no input, a TTL on every key, nothing outside the namespace.
//!
//! Without redis-server the tests skip with a message, unless
//! `PORTCULLIS_REQUIRE_REDIS=1` (CI), which makes them fail.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use queue_service::jobs::Jobs;
use queue_service::queue::{Backoff, Enqueued, JobId, JobState, Queue, QueueConfig, QueueError};
use queue_service::redis_queue::RedisQueue;
use queue_service::routes::AppState;
use queue_service::worker::{BreakerConfig, WorkerConfig};
use tokio::sync::oneshot;

use common::*;

const MS: Duration = Duration::from_millis(1);

/// Where a conformance case's queue lives.
enum Backend {
    Memory,
    Redis(String),
}

impl Backend {
    /// A fresh, empty queue with `config` (on Redis: its own namespace).
    async fn make(&self, config: QueueConfig) -> Jobs {
        match self {
            Backend::Memory => Arc::new(Queue::new(config)).into(),
            Backend::Redis(url) => {
                let mut salt = [0u8; 32];
                getrandom::fill(&mut salt).unwrap();
                let ns = format!("conf{}", u32::from_le_bytes(salt[..4].try_into().unwrap()));
                let q = RedisQueue::new(url, None, &ns, salt, config).unwrap();
                q.connect().await.unwrap();
                Arc::new(q).into()
            }
        }
    }
}

fn config() -> QueueConfig {
    QueueConfig {
        backoff: Backoff {
            base: 40 * MS,
            cap: 40 * MS,
        },
        ..QueueConfig::default()
    }
}

async fn new(q: &Jobs, owner: &str, input: &str, priority: u8) -> JobId {
    match q.enqueue(owner, input, priority).await.unwrap() {
        Enqueued::New(v) => {
            assert_eq!((v.state, v.progress, v.attempts), (JobState::Queued, 0, 0));
            v.id
        }
        other => panic!("expected a new job: {other:?}"),
    }
}

fn illegal<T: std::fmt::Debug>(r: Result<T, QueueError>) -> JobState {
    match r {
        Err(QueueError::IllegalTransition { from, .. }) => from,
        other => panic!("expected an illegal transition: {other:?}"),
    }
}

async fn state(q: &Jobs, id: JobId) -> JobState {
    q.get(id).await.unwrap().state
}

async fn dedup_and_ownership(b: &Backend) {
    let q = b.make(config()).await;
    let a = new(&q, "alice", "resize img-1", 3).await;
    match q.enqueue("alice", "resize img-1", 7).await.unwrap() {
        Enqueued::Existing(v) => assert_eq!((v.id, v.priority), (a, 3)),
        other => panic!("{other:?}"),
    }
    let b2 = new(&q, "bob", "resize img-1", 3).await;
    assert_ne!(a, b2, "another owner gets its own job");
    let v = q.get(a).await.unwrap();
    assert_eq!(&*v.owner, "alice");
    assert_eq!(v.expires_in_secs, 24 * 3600 - 1, "{v:?}");
    assert_eq!(
        q.get(JobId::parse(&"0".repeat(32)).unwrap()).await,
        Err(QueueError::NotFound)
    );
    assert_eq!(q.stats().await.unwrap().queue_depth, 2);
}

async fn priority_then_fifo(b: &Backend) {
    let q = b.make(config()).await;
    let low = new(&q, "o", "low", 1).await;
    let m1 = new(&q, "o", "m1", 5).await;
    let m2 = new(&q, "o", "m2", 5).await;
    let top = new(&q, "o", "top", 9).await;
    let m3 = new(&q, "o", "m3", 5).await;
    let mut order = Vec::new();
    while let Some(v) = q.peek_next().await.unwrap() {
        q.start(v.id).await.unwrap();
        order.push(v.id);
    }
    assert_eq!(order, [top, m1, m2, m3, low]);
    assert_eq!(q.stats().await.unwrap().jobs_by_state["running"], 5);
}

async fn transitions_and_idempotent_completion(b: &Backend) {
    let q = b.make(config()).await;
    let a = new(&q, "o", "a", 0).await;
    assert_eq!(illegal(q.complete(a).await), JobState::Queued);
    assert_eq!(illegal(q.fail(a).await), JobState::Queued);
    assert_eq!(illegal(q.progress(a, 10).await), JobState::Queued);
    assert_eq!(
        illegal(q.set_state(a, JobState::DeadLettered).await),
        JobState::Queued
    );
    assert_eq!(q.start(a).await.unwrap().state, JobState::Running);
    assert_eq!(
        illegal(q.start(a).await),
        JobState::Running,
        "no second claim"
    );
    assert_eq!(q.progress(a, 40).await.unwrap().progress, 40);
    assert_eq!(q.progress(a, 101).await, Err(QueueError::BadProgress));
    let done = q.complete(a).await.unwrap();
    assert_eq!((done.state, done.progress), (JobState::Completed, 100));
    // Completing again: the same job, unchanged, counted once.
    assert_eq!(q.complete(a).await.unwrap(), q.get(a).await.unwrap());
    assert_eq!(q.stats().await.unwrap().jobs_by_state["completed"], 1);
    assert_eq!(illegal(q.cancel(a).await), JobState::Completed);
    assert_eq!(illegal(q.start(a).await), JobState::Completed);
    // Cancellation of queued, running and failed jobs.
    let c = new(&q, "o", "c", 0).await;
    assert_eq!(q.cancel(c).await.unwrap().state, JobState::Cancelled);
    let d = new(&q, "o", "d", 0).await;
    q.start(d).await.unwrap();
    q.fail(d).await.unwrap();
    assert_eq!(q.cancel(d).await.unwrap().state, JobState::Cancelled);
    assert_eq!(
        q.next_retry_in().await.unwrap(),
        None,
        "the retry was dropped"
    );
    let s = q.stats().await.unwrap();
    assert_eq!((s.queue_depth, s.jobs_by_state["cancelled"]), (0, 2));
}

async fn retries_with_backoff_then_the_dead_letter_queue(b: &Backend) {
    let q = b
        .make(QueueConfig {
            max_attempts: 3,
            ..config()
        })
        .await;
    let a = new(&q, "o", "fail", 0).await;
    q.start(a).await.unwrap();
    let v = q.fail(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::Failed, 1));
    let wait = q.next_retry_in().await.unwrap();
    assert!(
        wait.is_none_or(|w| w <= 40 * MS),
        "full jitter within the ceiling: {wait:?}"
    );
    tokio::time::sleep(50 * MS).await;
    assert_eq!(
        q.peek_next().await.unwrap().map(|v| v.id),
        Some(a),
        "due again"
    );
    q.start(a).await.unwrap();
    assert_eq!(q.fail(a).await.unwrap().attempts, 2);
    tokio::time::sleep(50 * MS).await;
    q.start(a).await.unwrap();
    let v = q.fail(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::DeadLettered, 3));
    let s = q.stats().await.unwrap();
    assert_eq!((s.dead_letter_depth, s.queue_depth), (1, 0));
    let dlq: Vec<JobId> = q
        .dead_letters(10)
        .await
        .unwrap()
        .iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(dlq, [a]);
    assert_eq!(illegal(q.start(a).await), JobState::DeadLettered);
    assert!(q.peek_next().await.unwrap().is_none());
}

async fn a_retry_is_not_claimed_before_its_time(b: &Backend) {
    // Full jitter may draw 0: try until a job waits (each draw is fresh). Each try has
    // a queue of its own, since the queue's next retry is its earliest one: an early
    // short draw would otherwise hide every later long one.
    for i in 0..20 {
        let q = b
            .make(QueueConfig {
                backoff: Backoff {
                    base: Duration::from_secs(60),
                    cap: Duration::from_secs(60),
                },
                ..config()
            })
            .await;
        let a = new(&q, "o", &format!("j{i}"), 0).await;
        q.start(a).await.unwrap();
        q.fail(a).await.unwrap();
        if q.next_retry_in()
            .await
            .unwrap()
            .is_some_and(|w| w > Duration::from_secs(1))
        {
            assert_eq!(illegal(q.start(a).await), JobState::Failed);
            return;
        }
    }
    panic!("twenty draws of 0..=60000 ms all under a second");
}

async fn a_lapsed_lease_is_a_failed_attempt(b: &Backend) {
    // A check that the job still runs comes half a lease before the lease ends;
    // a check that it lapsed comes after the end, which a slow machine only delays.
    let q = b
        .make(QueueConfig {
            lease: 1000 * MS,
            max_attempts: 2,
            ..config()
        })
        .await;
    let a = new(&q, "o", "a", 0).await;
    q.start(a).await.unwrap();
    tokio::time::sleep(500 * MS).await;
    q.progress(a, 10).await.unwrap(); // renews the lease
    tokio::time::sleep(500 * MS).await;
    assert_eq!(state(&q, a).await, JobState::Running, "renewed");
    tokio::time::sleep(600 * MS).await;
    let v = q.get(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::Failed, 1));
    // The worker that lost it can no longer complete it.
    assert_eq!(illegal(q.complete(a).await), JobState::Failed);
    tokio::time::sleep(50 * MS).await;
    q.start(a).await.unwrap();
    tokio::time::sleep(1100 * MS).await;
    let v = q.get(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::DeadLettered, 2));
}

async fn a_stale_run_cannot_record_an_outcome(b: &Backend) {
    let q = b
        .make(QueueConfig {
            lease: 1000 * MS,
            ..config()
        })
        .await;
    let a = new(&q, "o", "a", 0).await;
    assert_eq!(q.start(a).await.unwrap().attempts, 0); // the first run
    tokio::time::sleep(1100 * MS).await; // its lease lapses
    assert_eq!(state(&q, a).await, JobState::Failed);
    tokio::time::sleep(50 * MS).await;
    assert_eq!(q.start(a).await.unwrap().attempts, 1); // the second run
    // The first run comes back: every outcome it reports is refused.
    assert_eq!(
        illegal(q.progress_for(a, 90, Some(0)).await),
        JobState::Running
    );
    for to in [JobState::Completed, JobState::Failed, JobState::Cancelled] {
        assert_eq!(
            illegal(q.set_state_for(a, to, Some(0)).await),
            JobState::Running,
            "{to:?}"
        );
    }
    let v = q.get(a).await.unwrap();
    assert_eq!((v.state, v.attempts, v.progress), (JobState::Running, 1, 0));
    // The live run's reports pass.
    assert_eq!(q.progress_for(a, 50, Some(1)).await.unwrap().progress, 50);
    let done = q
        .set_state_for(a, JobState::Completed, Some(1))
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Completed);
    // A late completion of the stale run finds it done: unchanged.
    assert_eq!(
        q.set_state_for(a, JobState::Completed, Some(0))
            .await
            .unwrap(),
        done
    );
    assert_eq!(q.stats().await.unwrap().jobs_by_state["completed"], 1);
}

async fn jobs_expire_after_their_ttl(b: &Backend) {
    let q = b
        .make(QueueConfig {
            ttl: 1000 * MS,
            ..config()
        })
        .await;
    let a = new(&q, "o", "a", 0).await;
    let c = new(&q, "o", "c", 0).await;
    q.start(c).await.unwrap();
    q.complete(c).await.unwrap();
    tokio::time::sleep(1100 * MS).await;
    assert_eq!(q.get(a).await, Err(QueueError::NotFound));
    assert_eq!(q.get(c).await, Err(QueueError::NotFound));
    assert!(q.peek_next().await.unwrap().is_none());
    let s = q.stats().await.unwrap();
    assert_eq!(s.jobs_by_state.values().sum::<usize>(), 0, "{s:?}");
    // The dedup entry went with the job.
    new(&q, "o", "a", 0).await;
}

async fn a_full_queue_refuses_but_still_dedups(b: &Backend) {
    let q = b
        .make(QueueConfig {
            max_depth: 2,
            ..config()
        })
        .await;
    let a = new(&q, "o", "a", 0).await;
    new(&q, "o", "b", 0).await;
    assert!(matches!(
        q.enqueue("o", "c", 0).await,
        Err(QueueError::Full { .. })
    ));
    assert!(matches!(
        q.enqueue("o", "a", 0).await,
        Ok(Enqueued::Existing(_))
    ));
    q.cancel(a).await.unwrap();
    new(&q, "o", "c", 0).await;
}

async fn retention_evicts_the_oldest_finished_job(b: &Backend) {
    let q = b
        .make(QueueConfig {
            max_retained: 2,
            ..config()
        })
        .await;
    let a = new(&q, "o", "a", 0).await;
    tokio::time::sleep(5 * MS).await;
    let b2 = new(&q, "o", "b", 0).await;
    assert!(matches!(
        q.enqueue("o", "c", 0).await,
        Err(QueueError::Full { .. })
    ));
    q.cancel(b2).await.unwrap();
    q.cancel(a).await.unwrap();
    let c = new(&q, "o", "c", 0).await;
    assert_eq!(
        q.get(a).await,
        Err(QueueError::NotFound),
        "the oldest finished job went"
    );
    assert_eq!(state(&q, b2).await, JobState::Cancelled);
    assert_eq!(state(&q, c).await, JobState::Queued);
    new(&q, "o", "a", 0).await; // its dedup entry went with it
}

async fn stats_and_latest_runs(b: &Backend) {
    let q = b
        .make(QueueConfig {
            max_attempts: 1,
            ..config()
        })
        .await;
    let mut ids = Vec::new();
    for i in ["a", "b", "c", "d", "e", "f"] {
        ids.push(new(&q, "o", i, 0).await);
    }
    q.start(ids[1]).await.unwrap();
    tokio::time::sleep(3 * MS).await;
    q.start(ids[2]).await.unwrap();
    tokio::time::sleep(3 * MS).await;
    q.complete(ids[2]).await.unwrap();
    tokio::time::sleep(3 * MS).await;
    q.cancel(ids[3]).await.unwrap();
    tokio::time::sleep(3 * MS).await;
    q.start(ids[4]).await.unwrap();
    tokio::time::sleep(3 * MS).await;
    q.fail(ids[4]).await.unwrap(); // max_attempts 1: dead-lettered
    let s = q.stats().await.unwrap();
    let by: Vec<(&str, usize)> = s.jobs_by_state.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(
        by,
        [
            ("cancelled", 1),
            ("completed", 1),
            ("dead_lettered", 1),
            ("failed", 0),
            ("queued", 2),
            ("running", 1)
        ]
    );
    assert_eq!((s.queue_depth, s.dead_letter_depth), (3, 1));
    let runs: Vec<JobId> = q
        .latest_runs(10)
        .await
        .unwrap()
        .iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(runs, [ids[4], ids[3], ids[2], ids[1]]);
    assert_eq!(q.latest_runs(1).await.unwrap().len(), 1);
}

async fn concurrent_claims_of_one_job_succeed_once(b: &Backend) {
    let q = b.make(config()).await;
    let a = new(&q, "o", "contended", 0).await;
    let claims = (0..32).map(|_| {
        let q = q.clone();
        tokio::spawn(async move { q.start(a).await.is_ok() })
    });
    let mut won = 0;
    for c in claims {
        won += usize::from(c.await.unwrap());
    }
    assert_eq!(won, 1);
}

async fn conformance(b: &Backend) {
    dedup_and_ownership(b).await;
    priority_then_fifo(b).await;
    transitions_and_idempotent_completion(b).await;
    retries_with_backoff_then_the_dead_letter_queue(b).await;
    a_retry_is_not_claimed_before_its_time(b).await;
    a_lapsed_lease_is_a_failed_attempt(b).await;
    a_stale_run_cannot_record_an_outcome(b).await;
    jobs_expire_after_their_ttl(b).await;
    a_full_queue_refuses_but_still_dedups(b).await;
    retention_evicts_the_oldest_finished_job(b).await;
    stats_and_latest_runs(b).await;
    concurrent_claims_of_one_job_succeed_once(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_memory_backend_meets_the_queue_contract() {
    conformance(&Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_backend_meets_the_same_contract() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    conformance(&Backend::Redis(server.url())).await;
}

/// A demo instance served in this process, as `main` serves it (configuration
/// from `env`), with its worker when `worker` is given.
struct Instance {
    addr: std::net::SocketAddr,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Instance {
    async fn start(env: &[(String, String)], worker: Option<WorkerConfig>) -> Self {
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let (listener, app, state, issuer, _banner) = queue_service::start(&[], get)
            .await
            .unwrap_or_else(|e| panic!("the demo did not start: {e}"));
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let s = state.clone();
        let server = tokio::spawn(async move {
            queue_service::serve(listener, app, &s, worker.map(|w| (w, issuer)), async {
                let _ = rx.await;
            })
            .await
        });
        Self {
            addr,
            state,
            stop: Some(tx),
            server,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.server)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
    }
}

fn fast_worker(work_time: Duration) -> WorkerConfig {
    WorkerConfig {
        idle_poll: 5 * MS,
        work_time,
        breaker: BreakerConfig {
            threshold: 1_000_000,
            cooldown: Duration::from_secs(1),
        },
    }
}

/// The field of a job's hash in Redis (`claims`: how often it was claimed).
async fn job_field(
    admin: &mut redis::aio::MultiplexedConnection,
    ns: &str,
    id: &str,
    f: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("{ns}:q:job:{id}"))
        .arg(f)
        .query_async(admin)
        .await
        .unwrap()
}

async fn enqueue_http(addr: std::net::SocketAddr, key: &str, input: &str) -> Reply {
    let body = serde_json::json!({ "input": input, "priority": 5 }).to_string();
    http(addr, "POST", "/v1/jobs", &[("X-API-Key", key)], Some(&body)).await
}

/// `send` again while the answer is 503, for up to 15 s: a Redis call that takes
/// longer than the demo's timeout on a loaded machine opens its breaker, and the
/// demo fails closed for the cool-down (5 s). The tests that use it look at the
/// queue, not at that.
async fn past_a_breaker<F: std::future::Future<Output = Reply>>(
    mut send: impl FnMut() -> F,
) -> Reply {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = send().await;
        if r.status != 503 || tokio::time::Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn job_http(addr: std::net::SocketAddr, key: &str, id: &str) -> serde_json::Value {
    let path = format!("/v1/jobs/{id}");
    let headers = [("X-API-Key", key)];
    let r = past_a_breaker(|| http(addr, "GET", &path, &headers, None)).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_killed_mid_job_completes_it_once_after_a_restart() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let creds = Creds::new();
    // A lease of 3 s: the 2 s job reports progress after 1 s, well within it.
    let env = creds.env(&server.url(), &[("PORTCULLIS_DEMO_LEASE_SECS", "3")]);
    let demo = DemoProcess::spawn(&env);
    // A slow job: 2 s of work, progress reported halfway.
    let r = enqueue_http(demo.addr, &creds.client, "slow monthly report").await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    eventually("the worker claims it", 10, || async {
        (job_http(demo.addr, &creds.client, &id).await["state"] == "running").then_some(())
    })
    .await;
    let first_log = demo.kill();
    let mut admin = server.admin().await;
    assert_eq!(
        job_field(&mut admin, "portcullis-demo", &id, "state")
            .await
            .as_deref(),
        Some("running")
    );

    let demo = DemoProcess::spawn(&env);
    // The client asks again for the same input: the same job (dedup survived).
    let again =
        past_a_breaker(|| enqueue_http(demo.addr, &creds.client, "slow monthly report")).await;
    assert_eq!(
        (again.status, again.json()["id"].as_str()),
        (200, Some(id.as_str()))
    );
    let done = eventually("completed after the restart", 20, || async {
        let v = job_http(demo.addr, &creds.client, &id).await;
        (v["state"] == "completed").then_some(v)
    })
    .await;
    // The lapsed lease counted as one failed attempt; the job ran to completion
    // once more and was completed once.
    assert_eq!(
        (done["progress"].as_u64(), done["attempts"].as_u64()),
        (Some(100), Some(1)),
        "{done}"
    );
    assert_eq!(
        job_field(&mut admin, "portcullis-demo", &id, "claims")
            .await
            .as_deref(),
        Some("2")
    );
    let stats = http(
        demo.addr,
        "GET",
        "/v1/admin/stats",
        &[("X-API-Key", &creds.admin)],
        None,
    )
    .await;
    let stats = stats.json();
    assert_eq!(stats["backend"], "redis", "{stats}");
    assert_eq!(stats["jobs_by_state"]["completed"], 1, "{stats}");
    assert_eq!(stats["queue_depth"], 0, "{stats}");
    let second_log = demo.kill();
    for log in [first_log, second_log] {
        assert!(log.contains("\"listening\""), "{log}");
        assert!(
            !log.contains(common::ADMIN_PASSWORD),
            "the Redis password was logged"
        );
        assert!(!log.contains("monthly report"), "an input was logged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_1000_jobs_with_no_duplicate_and_none_lost() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let creds = Creds::new();
    // A short lease, so a claim whose answer was lost (a timeout under load) is
    // retried within the test.
    let env = creds.env(&server.url(), &[("PORTCULLIS_DEMO_LEASE_SECS", "5")]);
    let a = Instance::start(&env, Some(fast_worker(MS))).await;
    let b = Instance::start(&env, Some(fast_worker(MS))).await;
    let mut ids = Vec::new();
    for i in 0..1000 {
        let input = format!("job {i}");
        let e = a
            .state
            .queue
            .enqueue("api_key:client", &input, (i % 10) as u8);
        match e.await.unwrap() {
            Enqueued::New(v) => ids.push(v.id),
            other => panic!("{other:?}"),
        }
    }
    eventually("1000 jobs completed", 300, || async {
        let s = b.state.queue.stats().await.unwrap();
        (s.jobs_by_state["completed"] == 1000).then_some(())
    })
    .await;
    let mut admin = server.admin().await;
    let mut seen = HashSet::new();
    let mut claims_total = 0;
    for id in &ids {
        let v = b.state.queue.get(*id).await.unwrap();
        assert_eq!(v.state, JobState::Completed, "{v:?}");
        // Claimed once, or once more after each lapsed lease (a failed attempt):
        // never by two workers at a time.
        let claims = job_field(&mut admin, "portcullis-demo", &id.to_string(), "claims").await;
        let claims: u32 = claims.unwrap().parse().unwrap();
        assert_eq!(
            claims,
            v.attempts + 1,
            "{id}: claimed {claims} times, {v:?}"
        );
        claims_total += claims;
        assert!(seen.insert(*id));
    }
    assert!(claims_total < 1010, "{claims_total} claims for 1000 jobs");
    let (pa, pb) = (
        a.state.worker.snapshot().processed,
        b.state.worker.snapshot().processed,
    );
    assert!(
        (1000..=claims_total as u64).contains(&(pa + pb)),
        "every job ran, at most once per claim: {pa} + {pb}"
    );
    assert!(pa > 0 && pb > 0, "both instances took jobs: {pa} + {pb}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_died_is_claimed_again_after_the_lease() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let creds = Creds::new();
    let env = creds.env(&server.url(), &[("PORTCULLIS_DEMO_LEASE_SECS", "1")]);
    // The first instance's worker claims the job and dies with it (the claim is
    // made on its behalf here, and the instance stops without finishing it).
    let first = Instance::start(&env, None).await;
    let r = enqueue_http(first.addr, &creds.client, "orphaned job").await;
    let id = JobId::parse(r.json()["id"].as_str().unwrap()).unwrap();
    first.state.queue.start(id).await.unwrap();
    first.stop().await;
    let second = Instance::start(&env, Some(fast_worker(MS))).await;
    let v = eventually("claimed again and completed", 20, || async {
        let v = second.state.queue.get(id).await.unwrap();
        (v.state == JobState::Completed).then_some(v)
    })
    .await;
    assert_eq!(v.attempts, 1, "the lapsed lease was a failed attempt");
    let mut admin = server.admin().await;
    let claims = job_field(&mut admin, "portcullis-demo", &id.to_string(), "claims").await;
    assert_eq!(claims.as_deref(), Some("2"));
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_run_is_503_then_the_queue_resumes_with_every_job() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let creds = Creds::new();
    let env = creds.env(&server.url(), &[("PORTCULLIS_DEMO_LEASE_SECS", "1")]);
    let demo = Instance::start(&env, Some(fast_worker(10 * MS))).await;
    let mut ids = Vec::new();
    for i in 0..150 {
        match demo
            .state
            .queue
            .enqueue("api_key:client", &format!("batch {i}"), 0)
            .await
            .unwrap()
        {
            Enqueued::New(v) => ids.push(v.id),
            other => panic!("{other:?}"),
        }
    }
    eventually("some jobs done", 30, || async {
        let s = demo.state.queue.stats().await.unwrap();
        (s.jobs_by_state["completed"] >= 10).then_some(())
    })
    .await;
    server.kill();
    // Redis is down: every route that needs it answers 503 with Retry-After.
    let admin_key = [("X-API-Key", creds.admin.as_str())];
    let r = http(demo.addr, "GET", "/v1/admin/stats", &admin_key, None).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let r = enqueue_http(demo.addr, &creds.client, "while down").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(!r.body.contains("while down"));
    assert_eq!(
        demo.state.queue.stats().await.map(|_| ()),
        Err(QueueError::Unavailable {
            retry_after: queue_service::redis_queue::UNAVAILABLE_RETRY_AFTER
        })
    );
    let r = http(demo.addr, "GET", "/health", &[], None).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    eventually("every job completed after the restart", 120, || async {
        let s = demo.state.queue.stats().await.ok()?;
        (s.jobs_by_state["completed"] == 150).then_some(())
    })
    .await;
    for id in &ids {
        assert_eq!(
            demo.state.queue.get(*id).await.unwrap().state,
            JobState::Completed
        );
    }
    let r = eventually("the routes answer again", 30, || async {
        let r = enqueue_http(demo.addr, &creds.client, "after the restart").await;
        (r.status != 503).then_some(r)
    })
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    demo.stop().await;
}

/// The `ACL SETUSER` line of the README, for `namespace` and `password`.
fn documented_acl(namespace: &str, password: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("ACL SETUSER"))
        .expect("the README documents the ACL user");
    line.replace("~portcullis-demo:*", &format!("~{namespace}:*"))
        .replace(">CHANGE-ME", &format!(">{password}"))
        .split_whitespace()
        .skip(2)
        .map(str::to_owned)
        .collect()
}

/// Every key and what it holds, as one text per key (`key = value...`).
async fn dump_all(admin: &mut redis::aio::MultiplexedConnection) -> Vec<(String, String, i64)> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(admin)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE").arg(&k).query_async(admin).await.unwrap();
        let value: Vec<String> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(&k).query_async(admin).await.unwrap()],
            "hash" => redis::cmd("HGETALL")
                .arg(&k)
                .query_async(admin)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(admin)
                .await
                .unwrap(),
            other => panic!("unexpected type {other} of {k}"),
        };
        let ttl: i64 = redis::cmd("PTTL").arg(&k).query_async(admin).await.unwrap();
        out.push((k, value.join(" "), ttl));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_suffices_and_redis_never_holds_an_input() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    const NS: &str = "acme-jobs";
    const USER_PASSWORD: &str = "limited-user-pw-5b7d1e";
    const PLANTED: &str = "planted-input-8d41c6a0-do-not-store";
    let mut admin = server.admin().await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(documented_acl(NS, USER_PASSWORD))
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("other-app:untouched")
        .arg("as it was")
        .query_async(&mut admin)
        .await
        .unwrap();
    let creds = Creds::new();
    let url = server.url_as("portcullis-demo", USER_PASSWORD);
    let env = creds.env(&url, &[("PORTCULLIS_DEMO_REDIS_NAMESPACE", NS)]);
    let demo = DemoProcess::spawn(&env);
    let mut ids = Vec::new();
    for input in [
        PLANTED.to_owned(),
        format!("fail {PLANTED}"),
        format!("flaky {PLANTED}"),
    ] {
        let r = enqueue_http(demo.addr, &creds.client, &input).await;
        assert_eq!(r.status, 201, "{r:?}");
        assert!(!r.body.contains(PLANTED));
        ids.push(r.json()["id"].as_str().unwrap().to_owned());
    }
    eventually("every job finished", 60, || async {
        let r = http(
            demo.addr,
            "GET",
            "/v1/admin/stats",
            &[("X-API-Key", &creds.admin)],
            None,
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        let s = r.json();
        (s["jobs_by_state"]["completed"] == 2 && s["dead_letter_depth"] == 1).then_some(())
    })
    .await;
    let r = http(
        demo.addr,
        "GET",
        "/dashboard",
        &[("X-API-Key", &creds.admin)],
        None,
    )
    .await;
    assert!(
        r.body.contains("<td id=\"backend\">redis</td>"),
        "{}",
        r.body
    );
    let log = demo.kill();
    // The limited user was refused nothing.
    let denied: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(denied.is_empty(), "ACL denials: {denied:?}");
    // And it is limited: outside its namespace it can do nothing.
    let limited = redis::Client::open(url.as_str()).unwrap();
    let mut limited = limited.get_multiplexed_async_connection().await.unwrap();
    let outside: redis::RedisResult<Option<String>> = redis::cmd("GET")
        .arg("other-app:untouched")
        .query_async(&mut limited)
        .await;
    assert!(outside.is_err(), "the ACL user reads outside its namespace");
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query_async(&mut admin)
        .await
        .unwrap();

    let all = dump_all(&mut admin).await;
    assert!(
        all.iter()
            .any(|(k, _, _)| k.starts_with(&format!("{NS}:q:job:"))),
        "{all:?}"
    );
    assert!(
        all.iter()
            .any(|(k, _, _)| k.starts_with(&format!("{NS}:rl:"))),
        "{all:?}"
    );
    for (k, v, ttl) in &all {
        if k == "other-app:untouched" {
            assert_eq!((v.as_str(), *ttl), ("as it was", -1), "untouched");
            continue;
        }
        assert!(
            k.starts_with(&format!("{NS}:")),
            "a key outside the namespace: {k}"
        );
        assert!(*ttl > 0, "{k} has no TTL ({ttl})");
        for part in ["planted", "8d41c6a0", "do-not-store"] {
            assert!(
                !k.contains(part) && !v.contains(part),
                "{k} holds the input: {v}"
            );
        }
    }
    // Nor did any write ever carry it: the append-only file holds every write.
    for f in std::fs::read_dir(server.dir.path().join("appendonlydir")).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(8).any(|w| w == b"8d41c6a0"),
            "an input reached Redis"
        );
    }
    assert!(
        !log.contains(USER_PASSWORD) && !log.contains(PLANTED),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca() {
    let Some(certs) = make_certificates() else {
        return;
    };
    let Some(server) = RedisServer::start_with(Some(certs.clone())) else {
        return;
    };
    let creds = Creds::new();
    let ca = certs.join("ca.crt").display().to_string();
    let env = creds.env(&server.url(), &[("PORTCULLIS_DEMO_REDIS_CA_FILE", &ca)]);
    let demo = DemoProcess::spawn(&env);
    let r = enqueue_http(demo.addr, &creds.client, "over tls").await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()["id"].as_str().unwrap().to_owned();
    eventually("completed over TLS", 20, || async {
        (job_http(demo.addr, &creds.client, &id).await["state"] == "completed").then_some(())
    })
    .await;
    let mut admin = server.admin().await;
    assert_eq!(
        job_field(&mut admin, "portcullis-demo", &id, "state")
            .await
            .as_deref(),
        Some("completed")
    );
    let log = demo.kill();
    assert!(!log.contains(common::ADMIN_PASSWORD));
    // Without the CA the server is not trusted: the demo refuses to start.
    let env = creds.env(&server.url(), &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_queue-service"))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(common::ADMIN_PASSWORD), "{err}");
}
