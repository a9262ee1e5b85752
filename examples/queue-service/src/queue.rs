//! The job-queue engine: plain Rust, no HTTP, no I/O, an injectable clock.
//!
//! - Only an HMAC-SHA256 of a job's input (under a random salt drawn at start and
//!   never exported) is kept; the raw input is dropped once the demo's simulated
//!   [`Work`] has been derived from it. The same owner enqueueing the same input gets
//!   the existing job back (dedup); the hash covers the owner too, so one client
//!   cannot learn whether another client submitted a given input.
//! - States: `queued -> running -> completed | failed | cancelled | dead_lettered`,
//!   `failed -> running` (a retry, once its backoff has passed) `| cancelled`,
//!   `queued -> cancelled`. Anything else is [`QueueError::IllegalTransition`] and
//!   leaves the job unchanged. `completed`, `cancelled` and `dead_lettered` are final.
//! - Order: higher priority first, FIFO (by enqueue order) within a priority.
//! - Every job is purged once its TTL (24 h by default) has passed, whatever its state.
//! - A running job holds a lease (5 min by default) that progress reports renew; a
//!   worker that dies without completing or failing the job loses it, and the lapse
//!   counts as a failed attempt (retry with backoff, or the dead-letter queue).
//! - Limits: at most `max_depth` unfinished jobs (beyond, [`QueueError::Full`]) and
//!   `max_retained` jobs in total: at that limit a new job evicts the oldest finished
//!   one (whose dedup entry goes with it); with nothing finished to evict, `Full`.
//!
//! Costs: enqueue, take and every transition are `O(log n)` under one mutex (plus
//! the expired jobs and lapsed leases they clean up); `stats` and `latest_runs` walk
//! every retained job. Nothing is persisted: a restart loses the queue (the Redis
//! backend, [`crate::redis_queue`], keeps it across restarts and instances).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The dedup hash of `(owner, input)`: HMAC-SHA256 under `salt`, the owner
/// length-prefixed so pairs cannot collide by moving the boundary.
pub(crate) fn input_hmac(salt: &[u8; 32], owner: &str, input: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(salt).expect("any key length");
    mac.update(&(owner.len() as u64).to_be_bytes());
    mac.update(owner.as_bytes());
    mac.update(input.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Where the engine reads the time. Tests inject a [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// tokio's clock: real time, or virtual time under `tokio::time::pause`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

/// A clock that only moves when told to.
#[allow(dead_code)]
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

#[allow(dead_code)]
impl ManualClock {
    /// Starts at the current instant.
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(Instant::now())))
    }

    /// Moves the clock forward.
    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap()
    }
}

/// A job id: 128 random bits, shown as 32 lowercase hex digits. Unguessable, so a
/// client cannot walk other clients' ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId([u8; 16]);

impl JobId {
    pub(crate) fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the OS random source is available");
        Self(b)
    }

    /// Parses 32 lowercase hex digits; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.as_bytes();
        if s.len() != 32 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut b = [0u8; 16];
        for (i, pair) in s.chunks(2).enumerate() {
            b[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self(b))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A job's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Taken by a worker.
    Running,
    /// Done (final).
    Completed,
    /// An attempt failed; retried once its backoff has passed.
    Failed,
    /// Cancelled by its owner (final).
    Cancelled,
    /// Failed `max_attempts` times; in the dead-letter queue (final).
    DeadLettered,
}

impl JobState {
    /// Every state, in display order.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Completed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::DeadLettered,
    ];

    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::DeadLettered => "dead_lettered",
        }
    }

    /// Whether a job may go from `self` to `to`. The one transition table.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Running, Completed)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, DeadLettered)
                | (Failed, Running)
                | (Failed, Cancelled)
        )
    }

    /// Counts toward the queue depth (not finished).
    pub fn is_open(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Running | JobState::Failed
        )
    }
}

/// What the demo's simulated job does, derived from the input at enqueue time (the
/// input itself is not kept). Real work would be looked up by the input's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Succeeds.
    Succeed,
    /// Input starting with `fail`: fails on every attempt (ends in the DLQ).
    Fail,
    /// Input starting with `flaky`: fails on its first attempt, then succeeds.
    Flaky,
    /// Input starting with `slow`: takes ten times as long (for shutdown drains).
    Slow,
}

impl Work {
    /// The simulated behaviour of an input.
    pub fn of(input: &str) -> Self {
        if input.starts_with("fail") {
            Work::Fail
        } else if input.starts_with("flaky") {
            Work::Flaky
        } else if input.starts_with("slow") {
            Work::Slow
        } else {
            Work::Succeed
        }
    }
}

/// Exponential backoff with full jitter: attempt `n` (1-based) waits a uniformly
/// random time in `[0, min(cap, base * 2^(n-1))]`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The ceiling of the first retry.
    pub base: Duration,
    /// The largest ceiling.
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling after `attempts` failed attempts (at least 1).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << exp).min(self.cap)
    }

    /// Full jitter: `unit` is a uniform random number; the delay is in
    /// `[0, ceiling(attempts)]`.
    pub fn delay(&self, attempts: u32, unit: u64) -> Duration {
        let ceiling = self.ceiling(attempts).as_millis() as u64;
        Duration::from_millis(unit % (ceiling + 1))
    }
}

/// Engine limits and policies.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// At most this many unfinished (queued, running, failed) jobs.
    pub max_depth: usize,
    /// At most this many jobs in any state: finished ones stay until their TTL or
    /// until a new job needs the room (the oldest finished one goes first).
    pub max_retained: usize,
    /// A job is purged this long after it was enqueued.
    pub ttl: Duration,
    /// A job that failed this many attempts is dead-lettered.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// The `Retry-After` a full queue suggests.
    pub full_retry_after: Duration,
    /// A running job without a progress report for this long counts as failed.
    pub lease: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_depth: 1_000,
            max_retained: 10_000,
            ttl: Duration::from_secs(24 * 60 * 60),
            max_attempts: 3,
            backoff: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(30),
            },
            full_retry_after: Duration::from_secs(5),
            lease: Duration::from_secs(5 * 60),
        }
    }
}

/// Why an engine call was refused. The queue is unchanged in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// No such job (never existed, expired, or not the caller's).
    NotFound,
    /// The transition is not in [`JobState::can_become`], or a retry before its time.
    IllegalTransition {
        /// The state the job is in (and stays in).
        from: JobState,
        /// The state asked for.
        to: JobState,
    },
    /// Progress outside `0..=100`.
    BadProgress,
    /// The queue is at its depth or retention limit.
    Full {
        /// When to try again.
        retry_after: Duration,
    },
    /// The queue's store (Redis) did not answer: nothing was changed, or the
    /// change is not known to the caller (a retry is safe: every operation is
    /// idempotent or refused when repeated).
    Unavailable {
        /// When to try again.
        retry_after: Duration,
    },
}

/// A snapshot of one job, safe to show to its owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobView {
    /// The id.
    pub id: JobId,
    /// The state.
    pub state: JobState,
    /// Higher runs first.
    pub priority: u8,
    /// 0..=100.
    pub progress: u8,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Seconds until the job is purged.
    pub expires_in_secs: u64,
    /// The principal that enqueued it: its identity, method and id (public).
    #[serde(skip)]
    pub owner: Arc<str>,
    /// What the simulated worker does with it.
    #[serde(skip)]
    pub work: Work,
}

/// Queue figures for the admin endpoints and the dashboard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Unfinished jobs: queued, running or failed-awaiting-retry.
    pub queue_depth: usize,
    /// Dead-lettered jobs.
    pub dead_letter_depth: usize,
    /// Jobs per state (every state present).
    pub jobs_by_state: BTreeMap<&'static str, usize>,
}

/// The outcome of an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job.
    New(JobView),
    /// The owner already has a job for this input.
    Existing(JobView),
}

struct Job {
    id: JobId,
    hash: [u8; 32],
    owner: Arc<str>,
    work: Work,
    priority: u8,
    seq: u64,
    state: JobState,
    progress: u8,
    attempts: u32,
    expires: Instant,
    retry_at: Option<Instant>,
    lease_until: Option<Instant>,
    changed: Instant,
}

struct Inner {
    /// How long a running job's lease lasts.
    lease: Duration,
    jobs: HashMap<JobId, Job>,
    by_hash: HashMap<[u8; 32], JobId>,
    /// Jobs a worker may take now: (higher priority first, then FIFO).
    ready: BTreeSet<(Reverse<u8>, u64, JobId)>,
    /// Failed jobs waiting for their backoff to pass.
    retries: BTreeSet<(Instant, JobId)>,
    /// Every job by its purge deadline.
    expiry: BTreeSet<(Instant, JobId)>,
    /// Running jobs by the end of their lease.
    leases: BTreeSet<(Instant, JobId)>,
    dead: BTreeSet<(u64, JobId)>,
    /// Jobs in an open state (the queue depth).
    open: usize,
    next_seq: u64,
}

/// The engine. Cheap to share behind an `Arc`.
pub struct Queue {
    inner: Mutex<Inner>,
    salt: [u8; 32],
    config: QueueConfig,
    clock: Arc<dyn Clock>,
    jitter: fn() -> u64,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the salt.
        f.debug_struct("Queue")
            .field("config", &self.config)
            .finish()
    }
}

pub(crate) fn os_random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source is available");
    u64::from_le_bytes(b)
}

impl Queue {
    /// A queue on tokio's clock with a fresh random salt.
    pub fn new(config: QueueConfig) -> Self {
        Self::with_clock(config, Arc::new(TokioClock))
    }

    /// A queue on the given clock.
    pub fn with_clock(config: QueueConfig, clock: Arc<dyn Clock>) -> Self {
        let mut salt = [0u8; 32];
        getrandom::fill(&mut salt).expect("the OS random source is available");
        Self {
            inner: Mutex::new(Inner {
                lease: config.lease,
                jobs: HashMap::new(),
                by_hash: HashMap::new(),
                ready: BTreeSet::new(),
                retries: BTreeSet::new(),
                expiry: BTreeSet::new(),
                leases: BTreeSet::new(),
                dead: BTreeSet::new(),
                open: 0,
                next_seq: 0,
            }),
            salt,
            config,
            clock,
            jitter: os_random_u64,
        }
    }

    /// Replaces the jitter source (tests pass a constant).
    #[allow(dead_code)]
    pub fn with_jitter(mut self, jitter: fn() -> u64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The current time on the queue's clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    fn hash(&self, owner: &str, input: &str) -> [u8; 32] {
        input_hmac(&self.salt, owner, input)
    }

    /// Locks the state and brings it up to `now`: drops every job whose TTL has
    /// passed, fails every running job whose lease lapsed, readies due retries.
    fn lock(&self) -> (MutexGuard<'_, Inner>, Instant) {
        let now = self.clock.now();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.purge_expired(now);
        while let Some(&(at, id)) = g.leases.first() {
            if at > now {
                break;
            }
            // Running -> failed/dead-lettered is always legal and drops the lease.
            let _ = g.fail_attempt(id, now, &self.config, (self.jitter)());
        }
        g.promote_due(now);
        (g, now)
    }

    /// Enqueues `input` for `owner`, or returns the owner's existing job for it.
    pub fn enqueue(&self, owner: &str, input: &str, priority: u8) -> Result<Enqueued, QueueError> {
        let hash = self.hash(owner, input);
        let (mut g, now) = self.lock();
        if let Some(id) = g.by_hash.get(&hash) {
            return Ok(Enqueued::Existing(g.jobs[id].view(now)));
        }
        let full = Err(QueueError::Full {
            retry_after: self.config.full_retry_after,
        });
        if g.open >= self.config.max_depth {
            return full;
        }
        if g.jobs.len() >= self.config.max_retained && !g.evict_oldest_finished() {
            return full;
        }
        let id = JobId::random();
        let seq = g.next_seq;
        g.next_seq += 1;
        let job = Job {
            id,
            hash,
            owner: owner.into(),
            work: Work::of(input),
            priority,
            seq,
            state: JobState::Queued,
            progress: 0,
            attempts: 0,
            expires: now + self.config.ttl,
            retry_at: None,
            lease_until: None,
            changed: now,
        };
        let view = job.view(now);
        g.ready.insert((Reverse(priority), seq, id));
        g.expiry.insert((job.expires, id));
        g.by_hash.insert(hash, id);
        g.jobs.insert(id, job);
        g.open += 1;
        Ok(Enqueued::New(view))
    }

    /// One job, if it exists and has not expired.
    pub fn get(&self, id: JobId) -> Result<JobView, QueueError> {
        let (g, now) = self.lock();
        g.jobs
            .get(&id)
            .map(|j| j.view(now))
            .ok_or(QueueError::NotFound)
    }

    /// Takes the next job by priority (then FIFO) and marks it running (the worker
    /// claims through the status endpoint instead: [`peek_next`](Self::peek_next),
    /// then `start`).
    #[cfg(test)]
    pub fn take_next(&self) -> Option<JobView> {
        let (mut g, now) = self.lock();
        let &(_, _, id) = g.ready.first()?;
        g.transition(id, JobState::Running, now).ok()
    }

    /// The next job by priority (then FIFO), left as it is.
    pub fn peek_next(&self) -> Option<JobView> {
        let (g, now) = self.lock();
        let &(_, _, id) = g.ready.first()?;
        g.jobs.get(&id).map(|j| j.view(now))
    }

    /// Marks one specific job running (a worker claiming it by id).
    pub fn start(&self, id: JobId) -> Result<JobView, QueueError> {
        let (mut g, now) = self.lock();
        g.transition(id, JobState::Running, now)
    }

    /// Records progress on a running job and renews its lease.
    pub fn progress(&self, id: JobId, progress: u8) -> Result<JobView, QueueError> {
        self.progress_for(id, progress, None)
    }

    /// [`progress`](Self::progress) for the run that claimed the job after
    /// `attempt` failed attempts (if given): refused when the job has been claimed
    /// again since (that run's lease lapsed).
    pub fn progress_for(
        &self,
        id: JobId,
        progress: u8,
        attempt: Option<u32>,
    ) -> Result<JobView, QueueError> {
        if progress > 100 {
            return Err(QueueError::BadProgress);
        }
        let (mut g, now) = self.lock();
        g.check_run(id, attempt, JobState::Running)?;
        let job = g.jobs.get_mut(&id).ok_or(QueueError::NotFound)?;
        if job.state != JobState::Running {
            return Err(QueueError::IllegalTransition {
                from: job.state,
                to: JobState::Running,
            });
        }
        job.progress = progress;
        job.changed = now;
        let view = job.view(now);
        g.renew_lease(id, now);
        Ok(view)
    }

    /// Completes a running job. Completing a completed job again returns it
    /// unchanged (a worker may repeat a completion whose answer it did not get).
    pub fn complete(&self, id: JobId) -> Result<JobView, QueueError> {
        self.set_state_for(id, JobState::Completed, None)
    }

    /// Records a failed attempt of a running job: `failed` with a backoff before
    /// the retry, or `dead_lettered` after `max_attempts`.
    pub fn fail(&self, id: JobId) -> Result<JobView, QueueError> {
        self.set_state_for(id, JobState::Failed, None)
    }

    /// Cancels a queued, running or failed job.
    pub fn cancel(&self, id: JobId) -> Result<JobView, QueueError> {
        let (mut g, now) = self.lock();
        g.transition(id, JobState::Cancelled, now)
    }

    /// Sets a state by name, as the worker status endpoint does.
    pub fn set_state(&self, id: JobId, to: JobState) -> Result<JobView, QueueError> {
        self.set_state_for(id, to, None)
    }

    /// [`set_state`](Self::set_state) for the run that claimed the job after
    /// `attempt` failed attempts (if given): completing, failing or cancelling a
    /// running job is refused when it has been claimed again since (that run's
    /// lease lapsed), so a stale run never records an outcome over a live one.
    pub fn set_state_for(
        &self,
        id: JobId,
        to: JobState,
        attempt: Option<u32>,
    ) -> Result<JobView, QueueError> {
        let (mut g, now) = self.lock();
        match to {
            JobState::Running => g.transition(id, JobState::Running, now),
            JobState::Completed => {
                if let Some(job) = g.jobs.get(&id)
                    && job.state == JobState::Completed
                {
                    return Ok(job.view(now));
                }
                g.check_run(id, attempt, to)?;
                g.transition(id, JobState::Completed, now)
            }
            JobState::Failed => {
                g.check_run(id, attempt, to)?;
                g.fail_attempt(id, now, &self.config, (self.jitter)())
            }
            JobState::Cancelled => {
                g.check_run(id, attempt, to)?;
                g.transition(id, JobState::Cancelled, now)
            }
            // Only the engine queues and dead-letters.
            JobState::Queued | JobState::DeadLettered => {
                let from = g.jobs.get(&id).ok_or(QueueError::NotFound)?.state;
                Err(QueueError::IllegalTransition { from, to })
            }
        }
    }

    /// Queue depth, dead-letter depth and jobs per state.
    pub fn stats(&self) -> QueueStats {
        let (g, _) = self.lock();
        let mut s = QueueStats::default();
        for state in JobState::ALL {
            s.jobs_by_state.insert(state.as_str(), 0);
        }
        for j in g.jobs.values() {
            *s.jobs_by_state.get_mut(j.state.as_str()).unwrap() += 1;
            s.queue_depth += usize::from(j.state.is_open());
        }
        s.dead_letter_depth = g.dead.len();
        s
    }

    /// The dead-letter queue, oldest first, at most `limit` entries.
    pub fn dead_letters(&self, limit: usize) -> Vec<JobView> {
        let (g, now) = self.lock();
        g.dead
            .iter()
            .take(limit)
            .map(|(_, id)| g.jobs[id].view(now))
            .collect()
    }

    /// The jobs that changed state most recently, newest first, finished or not.
    pub fn latest_runs(&self, limit: usize) -> Vec<JobView> {
        let (g, now) = self.lock();
        let mut jobs: Vec<&Job> = g
            .jobs
            .values()
            .filter(|j| j.state != JobState::Queued)
            .collect();
        jobs.sort_by_key(|j| Reverse((j.changed, j.seq)));
        jobs.into_iter().take(limit).map(|j| j.view(now)).collect()
    }

    /// Time until the next retry becomes due, if any job waits for one.
    pub fn next_retry_in(&self) -> Option<Duration> {
        let (g, now) = self.lock();
        g.retries
            .first()
            .map(|(at, _)| at.saturating_duration_since(now))
    }
}

impl Job {
    fn view(&self, now: Instant) -> JobView {
        JobView {
            id: self.id,
            state: self.state,
            priority: self.priority,
            progress: self.progress,
            attempts: self.attempts,
            expires_in_secs: self.expires.saturating_duration_since(now).as_secs(),
            owner: self.owner.clone(),
            work: self.work,
        }
    }
}

impl Inner {
    /// A running job claimed by another run than the one after `attempt` failed
    /// attempts: [`QueueError::IllegalTransition`].
    fn check_run(&self, id: JobId, attempt: Option<u32>, to: JobState) -> Result<(), QueueError> {
        match (self.jobs.get(&id), attempt) {
            (Some(j), Some(a)) if j.state == JobState::Running && j.attempts != a => {
                Err(QueueError::IllegalTransition {
                    from: JobState::Running,
                    to,
                })
            }
            _ => Ok(()),
        }
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.expiry.first() {
            if at > now {
                break;
            }
            self.remove(id);
        }
    }

    /// Drops the finished job closest to its expiry; `false` if none is finished.
    fn evict_oldest_finished(&mut self) -> bool {
        let oldest = self
            .expiry
            .iter()
            .map(|&(_, id)| id)
            .find(|id| !self.jobs[id].state.is_open());
        oldest.map(|id| self.remove(id)).is_some()
    }

    /// Drops a job from every index.
    fn remove(&mut self, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.expiry.remove(&(job.expires, id));
        self.by_hash.remove(&job.hash);
        self.ready.remove(&(Reverse(job.priority), job.seq, id));
        if let Some(r) = job.retry_at {
            self.retries.remove(&(r, id));
        }
        if let Some(l) = job.lease_until {
            self.leases.remove(&(l, id));
        }
        self.dead.remove(&(job.seq, id));
        self.open -= usize::from(job.state.is_open());
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            let job = &self.jobs[&id];
            self.ready.insert((Reverse(job.priority), job.seq, id));
        }
    }

    fn renew_lease(&mut self, id: JobId, now: Instant) {
        let job = self.jobs.get_mut(&id).expect("a running job");
        if let Some(l) = job.lease_until.replace(now + self.lease) {
            self.leases.remove(&(l, id));
        }
        self.leases.insert((now + self.lease, id));
    }

    /// A failed attempt of a running job: `failed` with a backoff before the retry
    /// (`unit` is the jitter's random number), or `dead_lettered` after
    /// `max_attempts`.
    fn fail_attempt(
        &mut self,
        id: JobId,
        now: Instant,
        config: &QueueConfig,
        unit: u64,
    ) -> Result<JobView, QueueError> {
        let job = self.jobs.get(&id).ok_or(QueueError::NotFound)?;
        let attempts = job.attempts + 1;
        let to = if attempts >= config.max_attempts {
            JobState::DeadLettered
        } else {
            JobState::Failed
        };
        let delay = config.backoff.delay(attempts, unit);
        self.transition_with(id, to, now, |j| {
            j.attempts = attempts;
            j.retry_at = (to == JobState::Failed).then_some(now + delay);
        })
    }

    fn transition(&mut self, id: JobId, to: JobState, now: Instant) -> Result<JobView, QueueError> {
        self.transition_with(id, to, now, |_| {})
    }

    /// Checks the transition, applies `update` and moves the job between the
    /// indexes. On any error nothing has changed.
    fn transition_with(
        &mut self,
        id: JobId,
        to: JobState,
        now: Instant,
        update: impl FnOnce(&mut Job),
    ) -> Result<JobView, QueueError> {
        let job = self.jobs.get_mut(&id).ok_or(QueueError::NotFound)?;
        let from = job.state;
        let ready_key = (Reverse(job.priority), job.seq, id);
        // A failed job may run again only once its backoff has passed (it is then
        // back in `ready`).
        let waiting = from == JobState::Failed && !self.ready.contains(&ready_key);
        if !from.can_become(to) || (to == JobState::Running && waiting) {
            return Err(QueueError::IllegalTransition { from, to });
        }
        self.ready.remove(&ready_key);
        if let Some(r) = job.retry_at.take() {
            self.retries.remove(&(r, id));
        }
        if let Some(l) = job.lease_until.take() {
            self.leases.remove(&(l, id));
        }
        job.state = to;
        job.changed = now;
        if to == JobState::Completed {
            job.progress = 100;
        }
        update(job);
        if let Some(r) = job.retry_at {
            self.retries.insert((r, id));
        }
        if to == JobState::Running {
            job.lease_until = Some(now + self.lease);
            self.leases.insert((now + self.lease, id));
        }
        if to == JobState::DeadLettered {
            self.dead.insert((job.seq, id));
        }
        self.open -= usize::from(from.is_open() && !to.is_open());
        Ok(job.view(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn queue(config: QueueConfig) -> (Queue, Arc<ManualClock>) {
        let clock = ManualClock::new();
        let q = Queue::with_clock(config, clock.clone()).with_jitter(|| 499);
        (q, clock)
    }

    fn new(e: Result<Enqueued, QueueError>) -> JobView {
        match e {
            Ok(Enqueued::New(v)) => v,
            other => panic!("expected a new job, got {other:?}"),
        }
    }

    #[test]
    fn job_ids_round_trip_and_reject_anything_else() {
        let id = JobId::random();
        assert_eq!(JobId::parse(&id.to_string()), Some(id));
        assert_eq!(id.to_string().len(), 32);
        for bad in [
            "",
            "abc",
            &id.to_string().to_uppercase(),
            &"g".repeat(32),
            &"0".repeat(33),
        ] {
            assert_eq!(JobId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_an_hmac_of_the_input_is_kept() {
        let (q, _) = queue(QueueConfig::default());
        let secret = "customer-4242-card-0000";
        let v = new(q.enqueue("alice", secret, 0));
        let shown = serde_json::to_string(&v).unwrap();
        assert!(!shown.contains("4242"), "{shown}");
        assert!(!format!("{q:?}").contains("4242"));
        // The hash is keyed: two queues (two salts) hash the same input differently.
        let (q2, _) = queue(QueueConfig::default());
        assert_ne!(q.hash("alice", secret), q2.hash("alice", secret));
        // Owner and input are length-prefixed: no collision by moving the boundary.
        assert_ne!(q.hash("ab", "c"), q.hash("a", "bc"));
    }

    #[test]
    fn the_same_input_from_the_same_owner_returns_the_existing_job() {
        let (q, _) = queue(QueueConfig::default());
        let a = new(q.enqueue("alice", "resize img-1", 3));
        match q.enqueue("alice", "resize img-1", 7).unwrap() {
            Enqueued::Existing(v) => {
                assert_eq!(v.id, a.id);
                assert_eq!(v.priority, 3, "the existing job is returned unchanged");
            }
            other => panic!("{other:?}"),
        }
        // Another owner gets its own job: dedup does not reveal other clients' inputs.
        let b = new(q.enqueue("bob", "resize img-1", 3));
        assert_ne!(a.id, b.id);
        assert_eq!(q.stats().queue_depth, 2);
    }

    #[test]
    fn a_full_queue_refuses_new_jobs_but_still_dedups() {
        let config = QueueConfig {
            max_depth: 2,
            ..QueueConfig::default()
        };
        let (q, _) = queue(config);
        let a = new(q.enqueue("o", "a", 0));
        new(q.enqueue("o", "b", 0));
        assert_eq!(
            q.enqueue("o", "c", 0),
            Err(QueueError::Full {
                retry_after: config.full_retry_after
            })
        );
        assert!(matches!(q.enqueue("o", "a", 0), Ok(Enqueued::Existing(_))));
        assert_eq!(q.stats().queue_depth, 2, "a refusal changes nothing");
        // Finishing a job frees a slot.
        q.cancel(a.id).unwrap();
        new(q.enqueue("o", "c", 0));
    }

    #[test]
    fn retention_is_bounded_by_evicting_the_oldest_finished_job() {
        let (q, clock) = queue(QueueConfig {
            max_retained: 2,
            ..QueueConfig::default()
        });
        let a = new(q.enqueue("o", "a", 0));
        clock.advance(Duration::from_secs(1));
        let b = new(q.enqueue("o", "b", 0));
        // Nothing finished: nothing to evict.
        assert!(matches!(
            q.enqueue("o", "c", 0),
            Err(QueueError::Full { .. })
        ));
        q.cancel(b.id).unwrap();
        q.cancel(a.id).unwrap();
        let c = new(q.enqueue("o", "c", 0));
        assert_eq!(
            q.get(a.id),
            Err(QueueError::NotFound),
            "the oldest finished job went"
        );
        assert_eq!(q.get(b.id).unwrap().state, JobState::Cancelled);
        // Its dedup entry went with it.
        new(q.enqueue("o", "a", 0));
        assert_eq!(q.get(b.id), Err(QueueError::NotFound));
        assert_eq!(q.get(c.id).unwrap().state, JobState::Queued);
    }

    #[test]
    fn the_transition_table() {
        use JobState::*;
        let legal = [
            (Queued, Running),
            (Queued, Cancelled),
            (Running, Completed),
            (Running, Failed),
            (Running, Cancelled),
            (Running, DeadLettered),
            (Failed, Running),
            (Failed, Cancelled),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
        for done in [Completed, Cancelled, DeadLettered] {
            assert!(!done.is_open());
            assert!(JobState::ALL.iter().all(|&to| !done.can_become(to)));
        }
    }

    #[test]
    fn illegal_transitions_leave_the_job_unchanged() {
        let (q, _) = queue(QueueConfig::default());
        let a = new(q.enqueue("o", "a", 0));
        // Completing or failing a queued job: it was never taken.
        for r in [q.complete(a.id), q.fail(a.id), q.progress(a.id, 10)] {
            assert!(matches!(
                r,
                Err(QueueError::IllegalTransition {
                    from: JobState::Queued,
                    ..
                })
            ));
        }
        q.cancel(a.id).unwrap();
        // Completing a cancelled job.
        assert_eq!(
            q.complete(a.id),
            Err(QueueError::IllegalTransition {
                from: JobState::Cancelled,
                to: JobState::Completed
            })
        );
        assert_eq!(
            q.set_state(a.id, JobState::Running),
            Err(QueueError::IllegalTransition {
                from: JobState::Cancelled,
                to: JobState::Running
            })
        );
        let v = q.get(a.id).unwrap();
        assert_eq!(
            (v.state, v.progress, v.attempts),
            (JobState::Cancelled, 0, 0)
        );
        assert!(q.take_next().is_none(), "a cancelled job is never taken");
        // Only the engine queues and dead-letters.
        let b = new(q.enqueue("o", "b", 0));
        for to in [JobState::Queued, JobState::DeadLettered] {
            assert!(matches!(
                q.set_state(b.id, to),
                Err(QueueError::IllegalTransition { .. })
            ));
        }
        assert_eq!(q.get(b.id).unwrap().state, JobState::Queued);
        assert_eq!(q.complete(JobId::random()), Err(QueueError::NotFound));
    }

    #[test]
    fn progress_is_0_to_100_on_a_running_job() {
        let (q, _) = queue(QueueConfig::default());
        let a = new(q.enqueue("o", "a", 0));
        q.start(a.id).unwrap();
        assert_eq!(q.progress(a.id, 0).unwrap().progress, 0);
        assert_eq!(q.progress(a.id, 100).unwrap().progress, 100);
        assert_eq!(q.progress(a.id, 101), Err(QueueError::BadProgress));
        assert_eq!(q.progress(a.id, 40).unwrap().progress, 40);
        let done = q.complete(a.id).unwrap();
        assert_eq!((done.state, done.progress), (JobState::Completed, 100));
    }

    #[test]
    fn cancellation_of_queued_running_and_failed_jobs() {
        let (q, _) = queue(QueueConfig::default());
        let a = new(q.enqueue("o", "a", 0));
        assert_eq!(q.cancel(a.id).unwrap().state, JobState::Cancelled);
        let b = new(q.enqueue("o", "b", 0));
        q.start(b.id).unwrap();
        assert_eq!(q.cancel(b.id).unwrap().state, JobState::Cancelled);
        let c = new(q.enqueue("o", "c", 0));
        q.start(c.id).unwrap();
        q.fail(c.id).unwrap();
        assert_eq!(q.cancel(c.id).unwrap().state, JobState::Cancelled);
        assert_eq!(q.next_retry_in(), None, "the retry was dropped");
        assert!(matches!(
            q.cancel(c.id),
            Err(QueueError::IllegalTransition { .. })
        ));
        assert_eq!(q.stats().queue_depth, 0);
    }

    #[test]
    fn higher_priority_first_fifo_within_a_priority() {
        let (q, _) = queue(QueueConfig::default());
        let low = new(q.enqueue("o", "low", 1));
        let b = new(q.enqueue("o", "b", 5));
        let c = new(q.enqueue("o", "c", 5));
        let top = new(q.enqueue("o", "top", 9));
        let d = new(q.enqueue("o", "d", 5));
        let order: Vec<JobId> = std::iter::from_fn(|| q.take_next().map(|v| v.id)).collect();
        assert_eq!(order, [top.id, b.id, c.id, d.id, low.id]);
        assert!(q.stats().jobs_by_state["running"] == 5);
    }

    #[test]
    fn jobs_expire_after_their_ttl_whatever_their_state() {
        let (q, clock) = queue(QueueConfig::default());
        let a = new(q.enqueue("o", "a", 0));
        assert_eq!(a.expires_in_secs, DAY.as_secs());
        clock.advance(Duration::from_secs(60 * 60));
        let b = new(q.enqueue("o", "b", 0));
        q.start(b.id).unwrap();
        q.complete(b.id).unwrap();
        clock.advance(DAY - Duration::from_secs(60 * 60) - Duration::from_millis(1));
        assert_eq!(q.get(a.id).unwrap().expires_in_secs, 0);
        clock.advance(Duration::from_millis(1));
        assert_eq!(q.get(a.id), Err(QueueError::NotFound));
        assert!(q.take_next().is_none(), "an expired job is not taken");
        // Dedup is released with the job.
        new(q.enqueue("o", "a", 0));
        clock.advance(Duration::from_secs(60 * 60));
        assert_eq!(q.get(b.id), Err(QueueError::NotFound));
        assert_eq!(q.stats().jobs_by_state["completed"], 0);
    }

    #[test]
    fn the_ttl_is_configurable() {
        let (q, clock) = queue(QueueConfig {
            ttl: Duration::from_secs(10),
            ..QueueConfig::default()
        });
        let a = new(q.enqueue("o", "a", 0));
        q.start(a.id).unwrap();
        q.fail(a.id).unwrap();
        clock.advance(Duration::from_secs(10));
        assert_eq!(q.get(a.id), Err(QueueError::NotFound));
        assert_eq!(q.next_retry_in(), None);
        assert_eq!(q.stats(), queue(QueueConfig::default()).0.stats());
    }

    #[test]
    fn backoff_is_exponential_capped_with_full_jitter() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        };
        let ceilings: Vec<u128> = (1..=9).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(
            ceilings,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(b.ceiling(0), b.base);
        assert_eq!(b.ceiling(u32::MAX), b.cap, "no overflow");
        for attempts in 1..8 {
            let ceiling = b.ceiling(attempts);
            for unit in [0, 1, 499, 500, 12345, u64::MAX / 3, u64::MAX] {
                assert!(b.delay(attempts, unit) <= ceiling);
            }
            assert_eq!(b.delay(attempts, 0), Duration::ZERO);
            assert_eq!(b.delay(attempts, ceiling.as_millis() as u64), ceiling);
        }
    }

    #[test]
    fn a_failed_job_is_retried_after_its_backoff_then_dead_lettered() {
        let config = QueueConfig {
            max_attempts: 3,
            ..QueueConfig::default()
        };
        let (q, clock) = queue(config); // jitter 499: the first delay is 499 ms
        let a = new(q.enqueue("o", "fail", 0));
        let other = new(q.enqueue("o", "other", 0));
        assert_eq!(q.take_next().unwrap().id, a.id);
        let v = q.fail(a.id).unwrap();
        assert_eq!((v.state, v.attempts), (JobState::Failed, 1));
        assert_eq!(q.next_retry_in(), Some(Duration::from_millis(499)));
        // Not before its time, neither by take nor by claim.
        assert_eq!(q.take_next().unwrap().id, other.id);
        assert!(q.take_next().is_none());
        assert!(matches!(
            q.start(a.id),
            Err(QueueError::IllegalTransition { .. })
        ));
        clock.advance(Duration::from_millis(499));
        assert_eq!(q.take_next().unwrap().id, a.id);
        assert_eq!(q.fail(a.id).unwrap().attempts, 2);
        clock.advance(Duration::from_secs(1));
        q.start(a.id).unwrap();
        let v = q.fail(a.id).unwrap();
        assert_eq!((v.state, v.attempts), (JobState::DeadLettered, 3));
        let s = q.stats();
        assert_eq!(
            (s.dead_letter_depth, s.jobs_by_state["dead_lettered"]),
            (1, 1)
        );
        assert_eq!(
            q.dead_letters(10).iter().map(|v| v.id).collect::<Vec<_>>(),
            [a.id]
        );
        assert!(matches!(
            q.start(a.id),
            Err(QueueError::IllegalTransition { .. })
        ));
    }

    #[test]
    fn a_running_job_whose_lease_lapses_counts_as_a_failed_attempt() {
        let (q, clock) = queue(QueueConfig {
            lease: Duration::from_secs(60),
            max_attempts: 2,
            ..QueueConfig::default()
        });
        let a = new(q.enqueue("o", "a", 0));
        q.take_next().unwrap();
        clock.advance(Duration::from_secs(59));
        // Progress renews the lease.
        q.progress(a.id, 10).unwrap();
        clock.advance(Duration::from_secs(59));
        assert_eq!(q.get(a.id).unwrap().state, JobState::Running);
        clock.advance(Duration::from_secs(1));
        let v = q.get(a.id).unwrap();
        assert_eq!((v.state, v.attempts), (JobState::Failed, 1));
        // The worker that lost it can no longer complete it.
        assert!(matches!(
            q.complete(a.id),
            Err(QueueError::IllegalTransition { .. })
        ));
        clock.advance(Duration::from_millis(499)); // the backoff (jitter 499)
        q.take_next().unwrap();
        clock.advance(Duration::from_secs(60));
        let v = q.get(a.id).unwrap();
        assert_eq!((v.state, v.attempts), (JobState::DeadLettered, 2));
        // A completed job holds no lease.
        let b = new(q.enqueue("o", "b", 0));
        q.start(b.id).unwrap();
        q.complete(b.id).unwrap();
        clock.advance(Duration::from_secs(120));
        assert_eq!(q.get(b.id).unwrap().state, JobState::Completed);
    }

    #[test]
    fn stats_count_every_state() {
        let (q, _) = queue(QueueConfig {
            max_attempts: 1,
            ..QueueConfig::default()
        });
        let ids: Vec<JobId> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|i| new(q.enqueue("o", i, 0)).id)
            .collect();
        q.start(ids[1]).unwrap();
        q.start(ids[2]).unwrap();
        q.complete(ids[2]).unwrap();
        q.cancel(ids[3]).unwrap();
        q.start(ids[4]).unwrap();
        q.fail(ids[4]).unwrap(); // max_attempts 1: dead-lettered
        let s = q.stats();
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
    }

    #[test]
    fn latest_runs_are_newest_first_and_skip_queued_jobs() {
        let (q, clock) = queue(QueueConfig::default());
        let a = new(q.enqueue("o", "a", 0));
        let b = new(q.enqueue("o", "b", 0));
        new(q.enqueue("o", "c", 0));
        q.start(a.id).unwrap();
        clock.advance(Duration::from_millis(1));
        q.start(b.id).unwrap();
        clock.advance(Duration::from_millis(1));
        q.complete(a.id).unwrap();
        let runs: Vec<JobId> = q.latest_runs(10).iter().map(|v| v.id).collect();
        assert_eq!(runs, [a.id, b.id]);
        assert_eq!(q.latest_runs(1).len(), 1);
    }

    #[test]
    fn work_is_derived_from_the_input_prefix() {
        assert_eq!(Work::of("fail: x"), Work::Fail);
        assert_eq!(Work::of("flaky"), Work::Flaky);
        assert_eq!(Work::of("slow 1"), Work::Slow);
        assert_eq!(Work::of("resize"), Work::Succeed);
        assert_eq!(Work::of("xfail"), Work::Succeed);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    impl Queue {
        /// Every index agrees with the jobs.
        fn check_invariants(&self) {
            let g = self.inner.lock().unwrap();
            let mut open = 0;
            for (id, j) in &g.jobs {
                let ready = g.ready.contains(&(Reverse(j.priority), j.seq, *id));
                let retry = j.retry_at.is_some_and(|r| g.retries.contains(&(r, *id)));
                match j.state {
                    JobState::Queued => assert!(ready && !retry),
                    JobState::Failed => assert!(ready ^ retry),
                    _ => assert!(!ready && !retry && j.retry_at.is_none()),
                }
                assert_eq!(
                    g.dead.contains(&(j.seq, *id)),
                    j.state == JobState::DeadLettered
                );
                let leased = j.lease_until.is_some_and(|l| g.leases.contains(&(l, *id)));
                assert_eq!(leased, j.state == JobState::Running);
                assert_eq!(g.by_hash.get(&j.hash), Some(id));
                assert!(g.expiry.contains(&(j.expires, *id)));
                assert!(j.progress <= 100);
                assert!(j.attempts <= self.config.max_attempts);
                open += usize::from(j.state.is_open());
            }
            assert_eq!(g.open, open);
            assert!(open <= self.config.max_depth);
            assert_eq!(g.by_hash.len(), g.jobs.len());
            assert_eq!(g.expiry.len(), g.jobs.len());
            let running = g
                .jobs
                .values()
                .filter(|j| j.state == JobState::Running)
                .count();
            assert_eq!(g.leases.len(), running);
            assert!(g.ready.len() + g.retries.len() <= open);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Enqueue(u8, u8, u8),
        Take,
        Start(usize),
        Progress(usize, u8),
        Complete(usize),
        Fail(usize),
        Cancel(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..2, 0u8..6, 0u8..3).prop_map(|(o, i, p)| Op::Enqueue(o, i, p)),
            2 => Just(Op::Take),
            1 => any::<usize>().prop_map(Op::Start),
            1 => (any::<usize>(), 0u8..=120).prop_map(|(i, p)| Op::Progress(i, p)),
            2 => any::<usize>().prop_map(Op::Complete),
            2 => any::<usize>().prop_map(Op::Fail),
            1 => any::<usize>().prop_map(Op::Cancel),
            1 => prop_oneof![0u64..2_000, Just(60_000), Just(24 * 3_600_000)].prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn job_ids_parse_only_what_they_print(s in "\\PC{0,40}", bytes in any::<[u8; 16]>()) {
            let id = JobId(bytes);
            prop_assert_eq!(JobId::parse(&id.to_string()), Some(id));
            if let Some(id) = JobId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn any_sequence_of_operations_keeps_the_engine_consistent(ops in prop::collection::vec(op(), 1..80)) {
            let clock = ManualClock::new();
            let config = QueueConfig { max_depth: 5, max_retained: 8, max_attempts: 2, lease: Duration::from_secs(1), ..QueueConfig::default() };
            let q = Queue::with_clock(config, clock.clone()).with_jitter(|| 700);
            let mut ids: Vec<JobId> = Vec::new();
            for op in ops {
                let pick = |i: usize| ids.get(i % ids.len().max(1)).copied().unwrap_or(JobId([0; 16]));
                let (id, to, r) = match op {
                    Op::Enqueue(o, i, p) => {
                        match q.enqueue(&o.to_string(), &i.to_string(), p) {
                            Ok(Enqueued::New(v)) => ids.push(v.id),
                            Ok(Enqueued::Existing(v)) => prop_assert!(ids.contains(&v.id)),
                            Err(e) => {
                                let full = matches!(e, QueueError::Full { .. });
                                prop_assert!(full, "{:?}", e);
                            }
                        }
                        q.check_invariants();
                        continue;
                    }
                    Op::Take => {
                        if let Some(v) = q.take_next() {
                            prop_assert_eq!(v.state, JobState::Running);
                        }
                        q.check_invariants();
                        continue;
                    }
                    Op::Advance(ms) => {
                        clock.advance(Duration::from_millis(ms));
                        q.check_invariants();
                        continue;
                    }
                    Op::Start(i) => (pick(i), Some(JobState::Running), q.start(pick(i))),
                    Op::Progress(i, p) => (pick(i), None, q.progress(pick(i), p)),
                    Op::Complete(i) => (pick(i), Some(JobState::Completed), q.complete(pick(i))),
                    Op::Fail(i) => (pick(i), None, q.fail(pick(i))),
                    Op::Cancel(i) => (pick(i), Some(JobState::Cancelled), q.cancel(pick(i))),
                };
                match r {
                    Ok(v) => {
                        if let Some(to) = to {
                            prop_assert_eq!(v.state, to);
                        }
                    }
                    // A refused call leaves the job as it was.
                    Err(QueueError::IllegalTransition { from, .. }) => {
                        prop_assert_eq!(q.get(id).unwrap().state, from);
                    }
                    Err(QueueError::NotFound) => prop_assert!(q.get(id).is_err()),
                    Err(QueueError::BadProgress) => {}
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                }
                q.check_invariants();
            }
        }
    }
}
