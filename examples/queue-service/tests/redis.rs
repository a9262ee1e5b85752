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
    assert_eq!(q.get(JobId::parse(&"0".repeat(32)).unwrap()).await, Err(QueueError::NotFound));
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
    assert_eq!(illegal(q.set_state(a, JobState::DeadLettered).await), JobState::Queued);
    assert_eq!(q.start(a).await.unwrap().state, JobState::Running);
    assert_eq!(illegal(q.start(a).await), JobState::Running, "no second claim");
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
    assert_eq!(q.next_retry_in().await.unwrap(), None, "the retry was dropped");
    let s = q.stats().await.unwrap();
    assert_eq!((s.queue_depth, s.jobs_by_state["cancelled"]), (0, 2));
}

async fn retries_with_backoff_then_the_dead_letter_queue(b: &Backend) {
    let q = b.make(QueueConfig {
        max_attempts: 3,
        ..config()
    })
    .await;
    let a = new(&q, "o", "fail", 0).await;
    q.start(a).await.unwrap();
    let v = q.fail(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::Failed, 1));
    let wait = q.next_retry_in().await.unwrap();
    assert!(wait.is_none_or(|w| w <= 40 * MS), "full jitter within the ceiling: {wait:?}");
    tokio::time::sleep(50 * MS).await;
    assert_eq!(q.peek_next().await.unwrap().map(|v| v.id), Some(a), "due again");
    q.start(a).await.unwrap();
    assert_eq!(q.fail(a).await.unwrap().attempts, 2);
    tokio::time::sleep(50 * MS).await;
    q.start(a).await.unwrap();
    let v = q.fail(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::DeadLettered, 3));
    let s = q.stats().await.unwrap();
    assert_eq!((s.dead_letter_depth, s.queue_depth), (1, 0));
    let dlq: Vec<JobId> = q.dead_letters(10).await.unwrap().iter().map(|v| v.id).collect();
    assert_eq!(dlq, [a]);
    assert_eq!(illegal(q.start(a).await), JobState::DeadLettered);
    assert!(q.peek_next().await.unwrap().is_none());
}

async fn a_retry_is_not_claimed_before_its_time(b: &Backend) {
    let q = b.make(QueueConfig {
        backoff: Backoff {
            base: Duration::from_secs(60),
            cap: Duration::from_secs(60),
        },
        ..config()
    })
    .await;
    // Full jitter may draw 0: try until a job waits (each draw is fresh).
    for i in 0..20 {
        let a = new(&q, "o", &format!("j{i}"), 0).await;
        q.start(a).await.unwrap();
        q.fail(a).await.unwrap();
        if q.next_retry_in().await.unwrap().is_some_and(|w| w > Duration::from_secs(1)) {
            assert_eq!(illegal(q.start(a).await), JobState::Failed);
            return;
        }
    }
    panic!("twenty draws of 0..=60000 ms all under a second");
}

async fn a_lapsed_lease_is_a_failed_attempt(b: &Backend) {
    let q = b.make(QueueConfig {
        lease: 300 * MS,
        max_attempts: 2,
        ..config()
    })
    .await;
    let a = new(&q, "o", "a", 0).await;
    q.start(a).await.unwrap();
    tokio::time::sleep(200 * MS).await;
    q.progress(a, 10).await.unwrap(); // renews the lease
    tokio::time::sleep(200 * MS).await;
    assert_eq!(state(&q, a).await, JobState::Running);
    tokio::time::sleep(150 * MS).await;
    let v = q.get(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::Failed, 1));
    // The worker that lost it can no longer complete it.
    assert_eq!(illegal(q.complete(a).await), JobState::Failed);
    tokio::time::sleep(50 * MS).await;
    q.start(a).await.unwrap();
    tokio::time::sleep(350 * MS).await;
    let v = q.get(a).await.unwrap();
    assert_eq!((v.state, v.attempts), (JobState::DeadLettered, 2));
}

async fn jobs_expire_after_their_ttl(b: &Backend) {
    let q = b.make(QueueConfig {
        ttl: 300 * MS,
        ..config()
    })
    .await;
    let a = new(&q, "o", "a", 0).await;
    let c = new(&q, "o", "c", 0).await;
    q.start(c).await.unwrap();
    q.complete(c).await.unwrap();
    tokio::time::sleep(350 * MS).await;
    assert_eq!(q.get(a).await, Err(QueueError::NotFound));
    assert_eq!(q.get(c).await, Err(QueueError::NotFound));
    assert!(q.peek_next().await.unwrap().is_none());
    let s = q.stats().await.unwrap();
    assert_eq!(s.jobs_by_state.values().sum::<usize>(), 0, "{s:?}");
    // The dedup entry went with the job.
    new(&q, "o", "a", 0).await;
}

async fn a_full_queue_refuses_but_still_dedups(b: &Backend) {
    let q = b.make(QueueConfig {
        max_depth: 2,
        ..config()
    })
    .await;
    let a = new(&q, "o", "a", 0).await;
    new(&q, "o", "b", 0).await;
    assert!(matches!(q.enqueue("o", "c", 0).await, Err(QueueError::Full { .. })));
    assert!(matches!(q.enqueue("o", "a", 0).await, Ok(Enqueued::Existing(_))));
    q.cancel(a).await.unwrap();
    new(&q, "o", "c", 0).await;
}

async fn retention_evicts_the_oldest_finished_job(b: &Backend) {
    let q = b.make(QueueConfig {
        max_retained: 2,
        ..config()
    })
    .await;
    let a = new(&q, "o", "a", 0).await;
    tokio::time::sleep(5 * MS).await;
    let b2 = new(&q, "o", "b", 0).await;
    assert!(matches!(q.enqueue("o", "c", 0).await, Err(QueueError::Full { .. })));
    q.cancel(b2).await.unwrap();
    q.cancel(a).await.unwrap();
    let c = new(&q, "o", "c", 0).await;
    assert_eq!(q.get(a).await, Err(QueueError::NotFound), "the oldest finished job went");
    assert_eq!(state(&q, b2).await, JobState::Cancelled);
    assert_eq!(state(&q, c).await, JobState::Queued);
    new(&q, "o", "a", 0).await; // its dedup entry went with it
}

async fn stats_and_latest_runs(b: &Backend) {
    let q = b.make(QueueConfig {
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
    let runs: Vec<JobId> = q.latest_runs(10).await.unwrap().iter().map(|v| v.id).collect();
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
