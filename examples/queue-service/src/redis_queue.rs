//! The job queue kept in Redis, for a queue that survives a restart and is shared
//! by every instance on the same Redis.
//!
//! Every operation is one call of one Lua script (`queue.lua`), atomic on the
//! server and timed by the server's clock (`TIME`): claims, leases, retries and
//! expiry never depend on an instance's clock, and no two workers can claim the
//! same job. The semantics are those of the in-memory engine ([`crate::queue`]):
//! the same states and transitions, priorities, dedup, backoff with full jitter,
//! leases, the dead-letter queue, the TTL and the limits; the same conformance
//! tests run against both ([`crate::jobs`]).
//!
//! **Keys** (all under `<namespace>:q:`): `job:<id>` (a hash: owner identity,
//! simulated work, priority, sequence, state, progress, attempts, expiry, and the
//! HMAC of the input), `dedup:<hmac>` (the job id), the indexes `ready`, `retry`,
//! `leases`, `expiry`, `changed` and `st:<state>` (sorted sets of job ids), and the
//! counter `seq`. Every key has a TTL: a job and its dedup entry expire with the
//! job, the indexes and the counter one job TTL after the last write (by then
//! every job in them has expired too).
//!
//! **Only an HMAC-SHA256 of the input** is stored, keyed by a secret derived from
//! the demo's token secret (never stored in Redis), so instances that share the
//! credential files share dedup, and Redis never sees an input.
//!
//! **Failure policy**: fail closed. When Redis does not answer (in
//! [`CALL_TIMEOUT`]) or errs, the call is [`QueueError::Unavailable`] (503 with
//! `Retry-After`) and the connection is dropped; the next call reconnects. Nothing
//! is lost while Redis is down: jobs are only ever changed by the script, which
//! either ran or did not. Redis must persist its data (AOF or RDB) for the queue to
//! survive a Redis restart.
//!
//! **Secrets**: the URL may hold a password; it is never logged, never part of an
//! error, and `Debug` leaves it out.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::queue::{
    Enqueued, JobId, JobState, JobView, QueueConfig, QueueError, QueueStats, Work, input_hmac,
};

/// How long one queue operation may wait for Redis, making a connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// The client's own bound on one connection attempt (TCP, TLS, `AUTH`); the
/// operation that needs the connection is bounded by [`CALL_TIMEOUT`] first.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The `Retry-After` of a refusal while Redis is unavailable.
pub const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(2);

const SCRIPT: &str = include_str!("queue.lua");

/// The queue in Redis. Cheap to share behind an `Arc`.
pub struct RedisQueue {
    client: Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    script: Script,
    prefix: String,
    salt: [u8; 32],
    config: QueueConfig,
    tls: bool,
    down: AtomicBool,
}

impl fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL (it may hold a password) nor the salt.
        f.debug_struct("RedisQueue")
            .field("url", &"<redacted>")
            .field("tls", &self.tls)
            .field("prefix", &self.prefix)
            .field("config", &self.config)
            .finish()
    }
}

/// A job as the script returns it.
#[derive(Deserialize)]
struct RawView {
    id: String,
    state: JobState,
    priority: u8,
    progress: u8,
    attempts: u32,
    expires_in_ms: u64,
    owner: String,
    work: String,
}

/// Every reply of the script: exactly one field is set.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Reply {
    ok: Option<RawView>,
    new: Option<RawView>,
    existing: Option<RawView>,
    illegal: Option<JobState>,
    nf: Option<bool>,
    full: Option<bool>,
    none: Option<bool>,
    list: Option<serde_json::Value>,
    stats: Option<std::collections::BTreeMap<String, usize>>,
    retry_in_ms: Option<u64>,
}

fn work_name(w: Work) -> &'static str {
    match w {
        Work::Succeed => "succeed",
        Work::Fail => "fail",
        Work::Flaky => "flaky",
        Work::Slow => "slow",
    }
}

fn work_of(name: &str) -> Work {
    match name {
        "fail" => Work::Fail,
        "flaky" => Work::Flaky,
        "slow" => Work::Slow,
        _ => Work::Succeed,
    }
}

impl RawView {
    fn into_view(self) -> Result<JobView, QueueError> {
        Ok(JobView {
            id: JobId::parse(&self.id).ok_or_else(unavailable)?,
            state: self.state,
            priority: self.priority,
            progress: self.progress,
            attempts: self.attempts,
            expires_in_secs: self.expires_in_ms / 1000,
            owner: self.owner.into(),
            work: work_of(&self.work),
        })
    }
}

fn unavailable() -> QueueError {
    QueueError::Unavailable {
        retry_after: UNAVAILABLE_RETRY_AFTER,
    }
}

/// The class of a Redis error, for the log: never its text (it could carry
/// connection details).
fn class(e: &redis::RedisError) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connection_refusal() {
        "connection_refused"
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection_lost"
    } else if e.kind() == redis::ErrorKind::AuthenticationFailed {
        "authentication_failed"
    } else if matches!(e.kind(), redis::ErrorKind::Server(_)) {
        "server_error"
    } else {
        "client"
    }
}

impl RedisQueue {
    /// A queue at `url` (`redis://` or `rediss://`; a `rediss://` URL always checks
    /// the server's certificate and name, trusting `ca_pem` if given, else the
    /// platform's roots) under `<namespace>:q:`. Input hashes are keyed by `salt`.
    /// Nothing is contacted yet; errors never contain the URL.
    pub fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        namespace: &str,
        salt: [u8; 32],
        config: QueueConfig,
    ) -> Result<Self, String> {
        let mut client = Client::open(url).map_err(|_| {
            "Redis URL could not be parsed (not shown: it may hold a password)".to_owned()
        })?;
        let tls = matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { .. }
        );
        if matches!(
            client.get_connection_info().addr(),
            redis::ConnectionAddr::TcpTls { insecure: true, .. }
        ) {
            return Err("Redis URL: #insecure (no certificate checks) is not supported".into());
        }
        if let Some(pem) = ca_pem {
            if !tls {
                return Err("a Redis CA certificate needs a rediss:// URL".into());
            }
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            };
            client = Client::build_with_tls(client.get_connection_info().clone(), certs)
                .map_err(|_| "the Redis CA certificate could not be used".to_owned())?;
        }
        Ok(Self {
            client,
            conn: Mutex::new(None),
            script: Script::new(SCRIPT),
            prefix: format!("{namespace}:q:"),
            salt,
            config,
            tls,
            down: AtomicBool::new(false),
        })
    }

    /// The key prefix of every key the queue writes.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn connection(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// One script call: `op` and its arguments after the common ones.
    async fn call(&self, op: &str, args: &[String]) -> Result<Reply, QueueError> {
        let c = &self.config;
        let mut inv = self.script.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(op)
            .arg(c.ttl.as_millis() as u64)
            .arg(c.lease.as_millis() as u64)
            .arg(c.max_attempts)
            .arg(c.backoff.base.as_millis() as u64)
            .arg(c.backoff.cap.as_millis() as u64)
            // Full jitter: a uniform number below 2^52, exact in Lua's doubles.
            .arg(crate::queue::os_random_u64() >> 12);
        for a in args {
            inv.arg(a);
        }
        let attempt = async {
            let mut conn = self.connection().await?;
            inv.invoke_async::<String>(&mut conn).await
        };
        let out = match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.failed(class(&e)).await),
            Err(_) => return Err(self.failed("timeout").await),
        };
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(event = "queue_backend_recovered");
        }
        serde_json::from_str(&out).map_err(|_| unavailable())
    }

    /// Drops the connection (the next call reconnects) and logs the first failure
    /// of an outage, by class only.
    async fn failed(&self, class: &'static str) -> QueueError {
        *self.conn.lock().await = None;
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(event = "queue_backend_down", error = class);
        }
        unavailable()
    }

    fn one(r: Reply) -> Result<JobView, QueueError> {
        if let Some(v) = r.ok {
            v.into_view()
        } else if let Some(from) = r.illegal {
            Err(QueueError::IllegalTransition { from, to: from })
        } else {
            Err(QueueError::NotFound)
        }
    }

    fn list(r: Reply) -> Result<Vec<JobView>, QueueError> {
        match r.list {
            // An empty Lua table is encoded as `{}`.
            Some(serde_json::Value::Object(o)) if o.is_empty() => Ok(Vec::new()),
            Some(v) => serde_json::from_value::<Vec<RawView>>(v)
                .map_err(|_| unavailable())?
                .into_iter()
                .map(RawView::into_view)
                .collect(),
            None => Err(unavailable()),
        }
    }

    /// Connects now (at start-up, to fail fast on a wrong URL or password).
    pub async fn connect(&self) -> Result<(), QueueError> {
        self.stats().await.map(|_| ())
    }

    /// Enqueues `input` for `owner`, or returns the owner's existing job for it.
    pub async fn enqueue(
        &self,
        owner: &str,
        input: &str,
        priority: u8,
    ) -> Result<Enqueued, QueueError> {
        let hash: String = input_hmac(&self.salt, owner, input)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let args = [
            owner.to_owned(),
            hash,
            work_name(Work::of(input)).to_owned(),
            priority.to_string(),
            JobId::random().to_string(),
            self.config.max_depth.to_string(),
            self.config.max_retained.to_string(),
        ];
        let r = self.call("enqueue", &args).await?;
        if let Some(v) = r.new {
            Ok(Enqueued::New(v.into_view()?))
        } else if let Some(v) = r.existing {
            Ok(Enqueued::Existing(v.into_view()?))
        } else if r.full.is_some() {
            Err(QueueError::Full {
                retry_after: self.config.full_retry_after,
            })
        } else {
            Err(unavailable())
        }
    }

    /// One job, if it exists and has not expired.
    pub async fn get(&self, id: JobId) -> Result<JobView, QueueError> {
        Self::one(self.call("get", &[id.to_string()]).await?)
    }

    /// The next job by priority (then FIFO), left as it is.
    pub async fn peek_next(&self) -> Result<Option<JobView>, QueueError> {
        let r = self.call("peek", &[]).await?;
        match r.ok {
            Some(v) => v.into_view().map(Some),
            None => Ok(None),
        }
    }

    /// Sets a state by name, as the worker status endpoint does (`failed` records a
    /// failed attempt; completing a completed job returns it unchanged), for the
    /// run that claimed the job after `attempt` failed attempts if given (see
    /// [`Queue::set_state_for`](crate::queue::Queue::set_state_for)).
    pub async fn set_state(
        &self,
        id: JobId,
        to: JobState,
        attempt: Option<u32>,
    ) -> Result<JobView, QueueError> {
        let attempt = attempt.map(|a| a.to_string()).unwrap_or_default();
        let r = match to {
            JobState::Running | JobState::Completed | JobState::Cancelled => {
                self.call("set", &[id.to_string(), to.as_str().to_owned(), attempt])
                    .await?
            }
            JobState::Failed => self.call("fail", &[id.to_string(), attempt]).await?,
            JobState::Queued | JobState::DeadLettered => {
                let from = self.get(id).await?.state;
                return Err(QueueError::IllegalTransition { from, to });
            }
        };
        Self::one(r).map_err(|e| match e {
            QueueError::IllegalTransition { from, .. } => {
                QueueError::IllegalTransition { from, to }
            }
            e => e,
        })
    }

    /// Records progress on a running job and renews its lease (for the run that
    /// claimed it after `attempt` failed attempts, if given).
    pub async fn progress(
        &self,
        id: JobId,
        progress: u8,
        attempt: Option<u32>,
    ) -> Result<JobView, QueueError> {
        if progress > 100 {
            return Err(QueueError::BadProgress);
        }
        let attempt = attempt.map(|a| a.to_string()).unwrap_or_default();
        let r = self
            .call("progress", &[id.to_string(), progress.to_string(), attempt])
            .await?;
        Self::one(r).map_err(|e| match e {
            QueueError::IllegalTransition { from, .. } => QueueError::IllegalTransition {
                from,
                to: JobState::Running,
            },
            e => e,
        })
    }

    /// Queue depth, dead-letter depth and jobs per state.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let counts = self
            .call("stats", &[])
            .await?
            .stats
            .ok_or_else(unavailable)?;
        let mut s = QueueStats::default();
        for state in JobState::ALL {
            let n = counts.get(state.as_str()).copied().unwrap_or(0);
            s.jobs_by_state.insert(state.as_str(), n);
            if state.is_open() {
                s.queue_depth += n;
            }
        }
        s.dead_letter_depth = s.jobs_by_state[JobState::DeadLettered.as_str()];
        Ok(s)
    }

    /// The dead-letter queue, oldest first, at most `limit` entries.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<JobView>, QueueError> {
        Self::list(self.call("dead", &[limit.max(1).to_string()]).await?)
            .map(|v| v.into_iter().take(limit).collect())
    }

    /// The jobs that changed state most recently, newest first.
    pub async fn latest_runs(&self, limit: usize) -> Result<Vec<JobView>, QueueError> {
        Self::list(self.call("latest", &[limit.max(1).to_string()]).await?)
            .map(|v| v.into_iter().take(limit).collect())
    }

    /// Time until the next retry becomes due, if any job waits for one.
    pub async fn next_retry_in(&self) -> Result<Option<Duration>, QueueError> {
        let r = self.call("next_retry", &[]).await?;
        Ok(r.retry_in_ms.map(Duration::from_millis))
    }
}
