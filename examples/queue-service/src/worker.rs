//! The in-process worker: picks jobs by priority, claims each, runs the simulated
//! work and records the outcome through the worker endpoints ([`Calls::Http`]: real
//! HTTP on the service's own address, through every guarding layer, with its own
//! service token), and pauses when the downstream keeps failing (a circuit
//! breaker). [`Calls::Engine`] makes the same calls on the engine directly, for
//! the engine's own tests.
//!
//! Retries and the dead-letter queue are the queue's ([`Jobs::fail`]); the worker
//! only reports. On shutdown it finishes the job in flight, then returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::client::{CallError, Outcome, WorkerClient};
use crate::jobs::Jobs;
use crate::queue::{JobId, JobState, JobView, QueueError, Work};

/// How the worker's calls reach the worker endpoints' logic.
#[derive(Clone, Debug)]
pub enum Calls {
    /// Straight to the queue (no authentication: for the engine's tests only).
    Engine(Jobs),
    /// Over HTTP through the guarded worker endpoints, with a service token.
    Http(WorkerClient),
}

fn engine(r: Result<JobView, QueueError>) -> Result<Outcome, CallError> {
    match r {
        Ok(v) => Ok(Outcome {
            state: v.state,
            attempts: v.attempts,
        }),
        Err(QueueError::NotFound) => Err(CallError::Gone),
        Err(QueueError::Unavailable { .. }) => Err(CallError::Refused(503)),
        Err(_) => Err(CallError::Changed),
    }
}

impl Calls {
    async fn start(&self, id: JobId) -> Result<Outcome, CallError> {
        match self {
            Self::Engine(q) => engine(q.start(id).await),
            Self::Http(c) => c.start(id).await,
        }
    }

    async fn progress(&self, id: JobId, p: u8, attempt: u32) -> Result<Outcome, CallError> {
        match self {
            Self::Engine(q) => engine(q.progress_for(id, p, Some(attempt)).await),
            Self::Http(c) => c.progress(id, p, attempt).await,
        }
    }

    async fn complete(&self, id: JobId, attempt: u32) -> Result<Outcome, CallError> {
        match self {
            Self::Engine(q) => engine(
                q.set_state_for(id, JobState::Completed, Some(attempt))
                    .await,
            ),
            Self::Http(c) => c.complete(id, attempt).await,
        }
    }

    async fn fail(&self, id: JobId, attempt: u32) -> Result<Outcome, CallError> {
        match self {
            Self::Engine(q) => engine(q.set_state_for(id, JobState::Failed, Some(attempt)).await),
            Self::Http(c) => c.fail(id, attempt).await,
        }
    }
}

/// After `threshold` failed attempts in a row the worker pauses for `cooldown`, then
/// tries one job (half-open): a success closes the breaker, a failure reopens it.
#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub threshold: u32,
    /// How long an open breaker pauses the worker.
    pub cooldown: Duration,
}

/// The circuit breaker's state. Plain data; the caller passes the time.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            consecutive_failures: 0,
            open_until: None,
        }
    }

    /// `Err(wait)` while the breaker is open.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        match self.open_until {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// A job succeeded: close.
    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
        self.open_until = None;
    }

    /// A job failed: open once the threshold is reached (again at once when the
    /// half-open trial fails).
    pub fn record_failure(&mut self, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.consecutive_failures >= self.config.threshold {
            self.open_until = Some(now + self.config.cooldown);
        }
    }
}

/// What the worker is doing, for the stats endpoint and the dashboard.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    paused: AtomicBool,
    busy: AtomicBool,
    processed: AtomicU64,
}

/// A snapshot of [`WorkerStatus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerSnapshot {
    /// The circuit breaker is open.
    pub paused: bool,
    /// A job is in flight.
    pub busy: bool,
    /// Attempts run since start.
    pub processed: u64,
}

impl WorkerStatus {
    /// The current figures.
    pub fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot {
            paused: self.paused.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            processed: self.processed.load(Ordering::Relaxed),
        }
    }
}

/// Worker timing.
#[derive(Clone, Copy, Debug)]
pub struct WorkerConfig {
    /// The longest the worker sleeps when the queue is empty.
    pub idle_poll: Duration,
    /// How long one simulated job takes (`slow` inputs take ten times as long).
    pub work_time: Duration,
    /// The circuit breaker.
    pub breaker: BreakerConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            idle_poll: Duration::from_millis(250),
            work_time: Duration::from_millis(200),
            breaker: BreakerConfig {
                threshold: 5,
                cooldown: Duration::from_secs(30),
            },
        }
    }
}

/// The in-process worker.
pub struct Worker {
    queue: Jobs,
    calls: Calls,
    config: WorkerConfig,
    breaker: Breaker,
    status: Arc<WorkerStatus>,
}

/// The least the worker waits before looking again while the queue's store is
/// unavailable.
const UNAVAILABLE_POLL: Duration = Duration::from_millis(250);

/// How often an outcome is reported before the worker gives up on it (the lease
/// then lapses and the job is retried).
const REPORT_TRIES: u32 = 7;
/// The first delay between two reports of an outcome, doubling: 0.1 s to 3.2 s,
/// 6.3 s in all, longer than the rate limiter's default cool-down.
const REPORT_FIRST_DELAY: Duration = Duration::from_millis(100);

/// Whether a failed call may succeed if repeated: the service was briefly
/// unavailable (503) or over a limit (429), or did not answer.
fn transient(e: CallError) -> bool {
    matches!(e, CallError::Refused(429 | 503) | CallError::Unreachable)
}

/// The current instant on tokio's clock (virtual under `tokio::time::pause`).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The simulated outcome of one attempt.
pub(crate) fn simulate(work: Work, failed_attempts: u32) -> Result<(), ()> {
    match work {
        Work::Succeed | Work::Slow => Ok(()),
        Work::Fail => Err(()),
        Work::Flaky if failed_attempts == 0 => Err(()),
        Work::Flaky => Ok(()),
    }
}

impl Worker {
    /// A worker on `queue`, reporting into `status`.
    pub fn new(queue: impl Into<Jobs>, config: WorkerConfig, status: Arc<WorkerStatus>) -> Self {
        let queue = queue.into();
        Self {
            calls: Calls::Engine(queue.clone()),
            queue,
            breaker: Breaker::new(config.breaker),
            config,
            status,
        }
    }

    /// Makes the worker's calls through `calls`.
    pub fn with_calls(mut self, calls: Calls) -> Self {
        self.calls = calls;
        self
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), finishing the
    /// job in flight first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(event = "worker_started");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            let wait = match self.breaker.check(now()) {
                Err(wait) => {
                    self.status.paused.store(true, Ordering::Relaxed);
                    wait
                }
                Ok(()) => {
                    self.status.paused.store(false, Ordering::Relaxed);
                    match self.queue.peek_next().await {
                        // Not raced against shutdown: in-flight work drains.
                        Ok(Some(mut job)) => match self.calls.start(job.id).await {
                            Ok(claimed) => {
                                // The run is the claim's: its failed attempts so far
                                // identify it in every later call.
                                job.attempts = claimed.attempts;
                                self.run_job(job).await;
                                continue;
                            }
                            // Cancelled, gone, or claimed by another worker between
                            // the look and the claim.
                            Err(CallError::Gone | CallError::Changed) => continue,
                            Err(e) => {
                                self.refused(job.id, e);
                                self.config.idle_poll
                            }
                        },
                        Ok(None) => match self.queue.next_retry_in().await {
                            Ok(Some(d)) => d.min(self.config.idle_poll),
                            _ => self.config.idle_poll,
                        },
                        // The queue's store is down: wait, it is not a job's failure.
                        Err(_) => self.config.idle_poll.max(UNAVAILABLE_POLL),
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        tracing::info!(event = "worker_stopped");
    }

    /// A call the service refused or did not answer: a downstream failure.
    fn refused(&mut self, job: JobId, e: CallError) {
        let status = match e {
            CallError::Refused(s) => s,
            _ => 0,
        };
        tracing::warn!(event = "worker_call_failed", job = %job, status);
        self.breaker.record_failure(now());
    }

    /// Reports the outcome of a run (complete or fail) as the run that claimed the
    /// job after `attempt` failed attempts, repeated with a doubling delay while the
    /// service is briefly unavailable or did not answer. Repeating is safe:
    /// completing a completed job returns it unchanged, and failing a job that is no
    /// longer running, or running under a later claim, is refused (409) without
    /// changing it.
    async fn report(&self, id: JobId, attempt: u32, ok: bool) -> Result<Outcome, CallError> {
        let mut delay = REPORT_FIRST_DELAY;
        let mut tries = 1;
        loop {
            let r = if ok {
                self.calls.complete(id, attempt).await
            } else {
                self.calls.fail(id, attempt).await
            };
            match r {
                Err(e) if transient(e) && tries < REPORT_TRIES => {
                    tracing::info!(event = "job_report_repeated", job = %id, tries);
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    async fn run_job(&mut self, job: JobView) {
        self.status.busy.store(true, Ordering::Relaxed);
        let total = match job.work {
            Work::Slow => self.config.work_time * 10,
            _ => self.config.work_time,
        };
        tokio::time::sleep(total / 2).await;
        // Cancelled meanwhile: stop early, the queue already has its final state. A
        // transient refusal of the report does not stop the work: the outcome is
        // what matters, and it is repeated until it gets through.
        let halfway = match self.calls.progress(job.id, 50, job.attempts).await {
            Err(e) if transient(e) => Ok(()),
            r => r.map(|_| ()),
        };
        if halfway.is_ok() {
            tokio::time::sleep(total / 2).await;
        }
        let result = match halfway {
            Err(e) => Err(e),
            Ok(()) => {
                let ok = simulate(job.work, job.attempts).is_ok();
                self.report(job.id, job.attempts, ok).await.map(|v| (v, ok))
            }
        };
        match result {
            Ok((view, ok)) => {
                if ok {
                    self.breaker.record_success();
                } else {
                    self.breaker.record_failure(now());
                }
                tracing::info!(
                    event = "job_attempt",
                    job = %job.id,
                    state = view.state.as_str(),
                    attempts = view.attempts,
                );
            }
            Err(CallError::Changed) => {
                tracing::info!(event = "job_changed_under_worker", job = %job.id);
            }
            Err(CallError::Gone) => {
                tracing::info!(event = "job_gone_under_worker", job = %job.id);
            }
            Err(e) => self.refused(job.id, e),
        }
        self.status.processed.fetch_add(1, Ordering::Relaxed);
        self.status.busy.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::queue::{Backoff, Enqueued, JobId, JobState, Queue, QueueConfig};

    const MS: Duration = Duration::from_millis(1);

    fn fast_queue(max_attempts: u32) -> Arc<Queue> {
        Arc::new(Queue::new(QueueConfig {
            max_attempts,
            backoff: Backoff {
                base: MS,
                cap: 4 * MS,
            },
            ..QueueConfig::default()
        }))
    }

    fn fast_worker(threshold: u32, cooldown: Duration) -> WorkerConfig {
        WorkerConfig {
            idle_poll: MS,
            work_time: 2 * MS,
            breaker: BreakerConfig {
                threshold,
                cooldown,
            },
        }
    }

    fn enqueue(q: &Queue, input: &str, priority: u8) -> JobId {
        match q.enqueue("o", input, priority).unwrap() {
            Enqueued::New(v) => v.id,
            Enqueued::Existing(v) => panic!("dedup hit {v:?}"),
        }
    }

    /// Polls `f` until it holds (fails after 10 s).
    pub(crate) async fn eventually(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(MS).await;
        }
    }

    fn start(
        q: &Arc<Queue>,
        config: WorkerConfig,
    ) -> (
        Arc<WorkerStatus>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let status = Arc::new(WorkerStatus::default());
        let (tx, rx) = watch::channel(false);
        let handle = tokio::spawn(Worker::new(q.clone(), config, status.clone()).run(rx));
        (status, tx, handle)
    }

    fn state(q: &Queue, id: JobId) -> JobState {
        q.get(id).unwrap().state
    }

    #[test]
    fn the_breaker_opens_after_the_threshold_and_half_opens_after_the_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig {
            threshold: 3,
            cooldown: Duration::from_secs(30),
        });
        b.record_failure(t0);
        b.record_failure(t0);
        assert_eq!(b.check(t0), Ok(()));
        b.record_success();
        b.record_failure(t0);
        b.record_failure(t0);
        assert_eq!(b.check(t0), Ok(()), "a success reset the count");
        b.record_failure(t0);
        assert_eq!(b.check(t0), Err(Duration::from_secs(30)));
        assert_eq!(
            b.check(t0 + Duration::from_secs(10)),
            Err(Duration::from_secs(20))
        );
        // Half-open: one trial after the cooldown.
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.check(t1), Ok(()));
        b.record_failure(t1);
        assert_eq!(
            b.check(t1),
            Err(Duration::from_secs(30)),
            "a failed trial reopens"
        );
        let t2 = t1 + Duration::from_secs(30);
        b.record_success();
        assert_eq!(b.check(t2), Ok(()));
        b.record_failure(t2);
        assert_eq!(b.check(t2), Ok(()), "closed again: counting from zero");
    }

    #[test]
    fn simulated_outcomes() {
        assert_eq!(simulate(Work::Succeed, 0), Ok(()));
        assert_eq!(simulate(Work::Slow, 0), Ok(()));
        assert_eq!(simulate(Work::Fail, 0), Err(()));
        assert_eq!(simulate(Work::Fail, 5), Err(()));
        assert_eq!(simulate(Work::Flaky, 0), Err(()));
        assert_eq!(simulate(Work::Flaky, 1), Ok(()));
    }

    #[tokio::test]
    async fn the_worker_runs_jobs_by_priority() {
        let q = fast_queue(3);
        let ids = [
            enqueue(&q, "low", 0),
            enqueue(&q, "mid-1", 5),
            enqueue(&q, "high", 9),
            enqueue(&q, "mid-2", 5),
        ];
        let (_, stop, handle) = start(&q, fast_worker(5, Duration::from_secs(30)));
        eventually("all completed", || {
            q.stats().jobs_by_state["completed"] == 4
        })
        .await;
        let mut order: Vec<JobId> = q.latest_runs(10).iter().map(|v| v.id).collect();
        order.reverse();
        assert_eq!(order, [ids[2], ids[1], ids[3], ids[0]]);
        assert!(ids.iter().all(|&id| q.get(id).unwrap().progress == 100));
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn failures_are_retried_then_dead_lettered() {
        let q = fast_queue(3);
        let bad = enqueue(&q, "fail always", 0);
        let flaky = enqueue(&q, "flaky once", 0);
        let (status, stop, handle) = start(&q, fast_worker(100, Duration::from_secs(30)));
        eventually("dead-lettered", || state(&q, bad) == JobState::DeadLettered).await;
        eventually("flaky completed", || {
            state(&q, flaky) == JobState::Completed
        })
        .await;
        assert_eq!(q.get(bad).unwrap().attempts, 3);
        assert_eq!(q.get(flaky).unwrap().attempts, 1);
        assert_eq!(q.stats().dead_letter_depth, 1);
        assert_eq!(status.snapshot().processed, 5);
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn repeated_failures_pause_the_worker() {
        let q = fast_queue(1);
        enqueue(&q, "fail-1", 9);
        enqueue(&q, "fail-2", 9);
        let good = enqueue(&q, "good", 0);
        let (status, stop, handle) = start(&q, fast_worker(2, Duration::from_secs(3600)));
        eventually("paused", || status.snapshot().paused).await;
        tokio::time::sleep(20 * MS).await;
        assert_eq!(
            state(&q, good),
            JobState::Queued,
            "no job runs while paused"
        );
        assert_eq!(q.stats().dead_letter_depth, 2);
        // Shutdown is not held up by an open breaker.
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn the_worker_resumes_after_the_cooldown() {
        let q = fast_queue(1);
        enqueue(&q, "fail-1", 9);
        let good = enqueue(&q, "good", 0);
        let (_, stop, handle) = start(&q, fast_worker(1, 30 * MS));
        eventually("completed", || state(&q, good) == JobState::Completed).await;
        stop.send(true).unwrap();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_drains_the_job_in_flight() {
        let q = fast_queue(3);
        let slow = enqueue(&q, "slow job", 0);
        let waiting = enqueue(&q, "next", 0);
        let config = WorkerConfig {
            work_time: 10 * MS, // slow: 100 ms
            ..fast_worker(5, Duration::from_secs(30))
        };
        let (status, stop, handle) = start(&q, config);
        eventually("busy", || status.snapshot().busy).await;
        stop.send(true).unwrap();
        handle.await.unwrap();
        assert_eq!(
            state(&q, slow),
            JobState::Completed,
            "finished, not abandoned"
        );
        assert_eq!(
            state(&q, waiting),
            JobState::Queued,
            "nothing new was taken"
        );
        assert!(!status.snapshot().busy);
    }

    #[tokio::test]
    async fn a_job_cancelled_while_running_stays_cancelled() {
        let q = fast_queue(3);
        let slow = enqueue(&q, "slow job", 0);
        let config = WorkerConfig {
            work_time: 10 * MS,
            ..fast_worker(1, Duration::from_secs(3600))
        };
        let (status, stop, handle) = start(&q, config);
        eventually("running", || state(&q, slow) == JobState::Running).await;
        q.cancel(slow).unwrap();
        eventually("idle", || status.snapshot().processed == 1).await;
        assert_eq!(state(&q, slow), JobState::Cancelled);
        assert!(
            !status.snapshot().paused,
            "a cancellation is not a downstream failure"
        );
        stop.send(true).unwrap();
        handle.await.unwrap();
    }
}
