//! The one queue interface the routes, the worker and the stats use, over two
//! backends: the in-memory engine ([`Queue`], the zero-configuration default) and
//! Redis ([`RedisQueue`], with `REDIS_URL`). Both have the same semantics; the
//! conformance tests below run the same cases against each.
//!
//! Every call may fail with [`QueueError::Unavailable`] (Redis only): the routes
//! answer 503 with `Retry-After`, the worker waits and tries again.
//!
//! A Redis call's future is boxed when the call is made: the client's futures are
//! kilobytes large, and held inline they would make every caller's future (each
//! route's handler, which axum allocates per request) as large with the in-memory
//! queue too.

use std::sync::Arc;
use std::time::Duration;

use crate::queue::{Enqueued, JobId, JobState, JobView, Queue, QueueError, QueueStats};
use crate::redis_queue::RedisQueue;

/// The queue in use. Cheap to clone (clones share the queue).
#[derive(Clone, Debug)]
pub enum Jobs {
    /// In process memory: lost on restart, not shared.
    Memory(Arc<Queue>),
    /// In Redis: kept across restarts, shared by every instance.
    Redis(Arc<RedisQueue>),
}

impl From<Arc<Queue>> for Jobs {
    fn from(q: Arc<Queue>) -> Self {
        Self::Memory(q)
    }
}

impl From<Arc<RedisQueue>> for Jobs {
    fn from(q: Arc<RedisQueue>) -> Self {
        Self::Redis(q)
    }
}

impl Jobs {
    /// The backend's name, for the stats.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// The in-memory engine, if that is the backend.
    pub fn memory(&self) -> Option<&Arc<Queue>> {
        match self {
            Self::Memory(q) => Some(q),
            Self::Redis(_) => None,
        }
    }

    /// Enqueues `input` for `owner`, or returns the owner's existing job for it.
    pub async fn enqueue(
        &self,
        owner: &str,
        input: &str,
        priority: u8,
    ) -> Result<Enqueued, QueueError> {
        match self {
            Self::Memory(q) => q.enqueue(owner, input, priority),
            Self::Redis(q) => Box::pin(q.enqueue(owner, input, priority)).await,
        }
    }

    /// One job, if it exists and has not expired.
    pub async fn get(&self, id: JobId) -> Result<JobView, QueueError> {
        match self {
            Self::Memory(q) => q.get(id),
            Self::Redis(q) => Box::pin(q.get(id)).await,
        }
    }

    /// The next job by priority (then FIFO), left as it is.
    pub async fn peek_next(&self) -> Result<Option<JobView>, QueueError> {
        match self {
            Self::Memory(q) => Ok(q.peek_next()),
            Self::Redis(q) => Box::pin(q.peek_next()).await,
        }
    }

    /// Sets a state by name: `running` claims, `completed` completes (again: the
    /// job unchanged), `failed` records a failed attempt, `cancelled` cancels.
    pub async fn set_state(&self, id: JobId, to: JobState) -> Result<JobView, QueueError> {
        self.set_state_for(id, to, None).await
    }

    /// [`set_state`](Self::set_state) for the run that claimed the job after
    /// `attempt` failed attempts, if given: a running job claimed again since
    /// (that run's lease lapsed) refuses it ([`QueueError::IllegalTransition`]), so a
    /// stale run never records an outcome over the live one.
    pub async fn set_state_for(
        &self,
        id: JobId,
        to: JobState,
        attempt: Option<u32>,
    ) -> Result<JobView, QueueError> {
        match self {
            Self::Memory(q) => q.set_state_for(id, to, attempt),
            Self::Redis(q) => Box::pin(q.set_state(id, to, attempt)).await,
        }
    }

    /// Claims a job (queued, or failed and due for its retry).
    pub async fn start(&self, id: JobId) -> Result<JobView, QueueError> {
        self.set_state(id, JobState::Running).await
    }

    /// Records progress on a running job and renews its lease.
    pub async fn progress(&self, id: JobId, progress: u8) -> Result<JobView, QueueError> {
        self.progress_for(id, progress, None).await
    }

    /// [`progress`](Self::progress) for the run that claimed the job after
    /// `attempt` failed attempts, if given (as [`set_state_for`](Self::set_state_for)).
    pub async fn progress_for(
        &self,
        id: JobId,
        progress: u8,
        attempt: Option<u32>,
    ) -> Result<JobView, QueueError> {
        match self {
            Self::Memory(q) => q.progress_for(id, progress, attempt),
            Self::Redis(q) => Box::pin(q.progress(id, progress, attempt)).await,
        }
    }

    /// Completes a running job (idempotent).
    pub async fn complete(&self, id: JobId) -> Result<JobView, QueueError> {
        self.set_state(id, JobState::Completed).await
    }

    /// Records a failed attempt of a running job.
    pub async fn fail(&self, id: JobId) -> Result<JobView, QueueError> {
        self.set_state(id, JobState::Failed).await
    }

    /// Cancels a queued, running or failed job.
    pub async fn cancel(&self, id: JobId) -> Result<JobView, QueueError> {
        self.set_state(id, JobState::Cancelled).await
    }

    /// Queue depth, dead-letter depth and jobs per state.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        match self {
            Self::Memory(q) => Ok(q.stats()),
            Self::Redis(q) => Box::pin(q.stats()).await,
        }
    }

    /// The dead-letter queue, oldest first, at most `limit` entries.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<JobView>, QueueError> {
        match self {
            Self::Memory(q) => Ok(q.dead_letters(limit)),
            Self::Redis(q) => Box::pin(q.dead_letters(limit)).await,
        }
    }

    /// The jobs that changed state most recently, newest first.
    pub async fn latest_runs(&self, limit: usize) -> Result<Vec<JobView>, QueueError> {
        match self {
            Self::Memory(q) => Ok(q.latest_runs(limit)),
            Self::Redis(q) => Box::pin(q.latest_runs(limit)).await,
        }
    }

    /// Time until the next retry becomes due, if any job waits for one.
    pub async fn next_retry_in(&self) -> Result<Option<Duration>, QueueError> {
        match self {
            Self::Memory(q) => Ok(q.next_retry_in()),
            Self::Redis(q) => Box::pin(q.next_retry_in()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of_val;

    use super::*;
    use crate::queue::QueueConfig;

    /// Every call's future is small whichever the backend, as the Redis branch's
    /// future is boxed: a route's handler future stays a small allocation.
    #[test]
    fn every_call_future_is_small() {
        const MAX: usize = 256;
        let jobs = Jobs::from(Arc::new(Queue::new(QueueConfig::default())));
        let id = JobId::parse("0123456789abcdef0123456789abcdef").unwrap();
        let sizes = [
            ("enqueue", size_of_val(&jobs.enqueue("o", "i", 0))),
            ("get", size_of_val(&jobs.get(id))),
            ("peek_next", size_of_val(&jobs.peek_next())),
            (
                "set_state_for",
                size_of_val(&jobs.set_state_for(id, JobState::Running, None)),
            ),
            (
                "set_state",
                size_of_val(&jobs.set_state(id, JobState::Running)),
            ),
            ("start", size_of_val(&jobs.start(id))),
            ("progress_for", size_of_val(&jobs.progress_for(id, 1, None))),
            ("progress", size_of_val(&jobs.progress(id, 1))),
            ("complete", size_of_val(&jobs.complete(id))),
            ("fail", size_of_val(&jobs.fail(id))),
            ("cancel", size_of_val(&jobs.cancel(id))),
            ("stats", size_of_val(&jobs.stats())),
            ("dead_letters", size_of_val(&jobs.dead_letters(1))),
            ("latest_runs", size_of_val(&jobs.latest_runs(1))),
            ("next_retry_in", size_of_val(&jobs.next_retry_in())),
        ];
        for (call, size) in sizes {
            assert!(size <= MAX, "{call}: {size} bytes");
        }
    }
}
