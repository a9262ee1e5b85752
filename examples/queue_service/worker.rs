//! The in-process worker: takes jobs by priority, runs the simulated work, records
//! the outcome through the same engine calls the worker endpoints use, and pauses
//! when the downstream keeps failing (a circuit breaker).
//!
//! Retries and the dead-letter queue are the engine's ([`Queue::fail`]); the worker
//! only reports. On shutdown it finishes the job in flight, then returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::queue::{JobView, Queue, QueueError, Work};

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
    queue: Arc<Queue>,
    config: WorkerConfig,
    breaker: Breaker,
    status: Arc<WorkerStatus>,
}

/// The simulated outcome of one attempt.
pub fn simulate(work: Work, failed_attempts: u32) -> Result<(), ()> {
    match work {
        Work::Succeed | Work::Slow => Ok(()),
        Work::Fail => Err(()),
        Work::Flaky if failed_attempts == 0 => Err(()),
        Work::Flaky => Ok(()),
    }
}

impl Worker {
    /// A worker on `queue`, reporting into `status`.
    pub fn new(queue: Arc<Queue>, config: WorkerConfig, status: Arc<WorkerStatus>) -> Self {
        Self {
            queue,
            breaker: Breaker::new(config.breaker),
            config,
            status,
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped), finishing the
    /// job in flight first.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(event = "worker_started");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            let wait = match self.breaker.check(self.queue.now()) {
                Err(wait) => {
                    self.status.paused.store(true, Ordering::Relaxed);
                    wait
                }
                Ok(()) => {
                    self.status.paused.store(false, Ordering::Relaxed);
                    match self.queue.take_next() {
                        // Not raced against shutdown: in-flight work drains.
                        Some(job) => {
                            self.run_job(job).await;
                            continue;
                        }
                        None => self
                            .queue
                            .next_retry_in()
                            .map_or(self.config.idle_poll, |d| d.min(self.config.idle_poll)),
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

    async fn run_job(&mut self, job: JobView) {
        self.status.busy.store(true, Ordering::Relaxed);
        let total = match job.work {
            Work::Slow => self.config.work_time * 10,
            _ => self.config.work_time,
        };
        tokio::time::sleep(total / 2).await;
        // Cancelled meanwhile: stop early, the engine already has its final state.
        let cancelled = self.queue.progress(job.id, 50).is_err();
        if !cancelled {
            tokio::time::sleep(total / 2).await;
        }
        let result = if cancelled {
            None
        } else if simulate(job.work, job.attempts).is_ok() {
            Some(self.queue.complete(job.id).map(|v| (v, true)))
        } else {
            Some(self.queue.fail(job.id).map(|v| (v, false)))
        };
        match result {
            Some(Ok((view, ok))) => {
                if ok {
                    self.breaker.record_success();
                } else {
                    self.breaker.record_failure(self.queue.now());
                }
                tracing::info!(
                    event = "job_attempt",
                    job = %view.id,
                    state = view.state.as_str(),
                    attempts = view.attempts,
                );
            }
            Some(Err(QueueError::IllegalTransition { from, .. })) => {
                tracing::info!(event = "job_changed_under_worker", job = %job.id, state = from.as_str());
            }
            None | Some(Err(_)) => {
                tracing::info!(event = "job_gone_under_worker", job = %job.id);
            }
        }
        self.status.processed.fetch_add(1, Ordering::Relaxed);
        self.status.busy.store(false, Ordering::Relaxed);
    }
}
