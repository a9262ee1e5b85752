//! What both measurements serve: the demo's guard with one API key, a queue holding
//! one job of that key, and the bare router (the same handler without any layer).

use axum::routing::get;
use axum::{Extension, Router};
use portcullis::rate_limit::Quota;
use portcullis::{AuthMethod, IpSet, Principal};
use queue_service::guard::{self, Guard, GuardConfig, TokenSecret};
use queue_service::queue::{Enqueued, QueueConfig};
use queue_service::routes::{self, AppState};

/// One configuration's service and the request it is measured with.
pub struct Fixture {
    /// The queue, holding one job of the API key `client`.
    pub state: AppState,
    /// The demo's layers with one key, `client` (`jobs:read jobs:write`), and a
    /// quota that never runs out during a measurement.
    pub guard: Guard,
    /// The key of `client`, in clear.
    pub key: String,
    /// `/v1/jobs/{id}` of the one job.
    pub path: String,
}

/// A fresh fixture: new key, new secret, new queue.
pub fn fixture() -> Fixture {
    let (keys, store) = guard::demo_keys(&[("client", "jobs:read jobs:write")]).unwrap();
    let mut config = GuardConfig::new(
        store,
        TokenSecret::generate().unwrap(),
        IpSet::parse(queue_service::DEFAULT_INTERNAL).unwrap(),
    )
    .unwrap();
    config.rate = Quota::per_second(100_000_000).unwrap();
    let state = queue_service::state(QueueConfig::default());
    let owner = client();
    let queue = state.queue.memory().expect("the queue is in memory");
    let Enqueued::New(job) = queue.enqueue(owner.identity(), "bench", 0).unwrap() else {
        unreachable!("the queue is empty")
    };
    Fixture {
        state,
        guard: Guard::new(config).unwrap(),
        key: keys[0].key.expose_secret().to_owned(),
        path: format!("/v1/jobs/{}", job.id),
    }
}

/// The principal the full service finds for the key `client`.
pub fn client() -> Principal {
    Principal::new("client", AuthMethod::ApiKey)
}

/// `GET /v1/jobs/{id}` with no layers: the `Principal` the handler reads is a fixed
/// extension.
pub fn bare(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs/{id}", get(routes::get_job))
        .layer(Extension(client()))
        .with_state(state)
}
