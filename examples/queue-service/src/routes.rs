//! The HTTP face of the queue. Handlers are thin: parse, call the engine, map its
//! answer. Every route's access rule lives in [`crate::auth::ROUTES`].
//!
//! Errors are `application/problem+json` with fixed texts (no request input is
//! echoed): 400 malformed JSON, 404 unknown job or route, 405, 409 illegal state
//! transition, 413 body over [`BODY_LIMIT`], 415 not JSON, 422 a value out of range,
//! 503 queue full or its store (Redis) unavailable (with `Retry-After`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::handler::Handler;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Extension, Json, Router};
use http_body_util::Limited;
use pin_project_lite::pin_project;
use portcullis::Principal;
use portcullis::rejection::{DenialReason, Rejection};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};

use crate::auth;
use crate::guard::Guard;
use crate::jobs::Jobs;
use crate::queue::{Enqueued, JobId, JobState, JobView, QueueError};
use crate::session;
use crate::worker::{WorkerSnapshot, WorkerStatus};

/// The largest request body accepted (bytes).
pub const BODY_LIMIT: usize = 16 * 1024;
/// The longest job input accepted (bytes).
pub const MAX_INPUT: usize = 4 * 1024;
/// The highest priority.
pub const MAX_PRIORITY: u8 = 9;

/// Refusals counted from the `DenialReason` in response extensions: filled by
/// whatever layer refused (the scope check, authentication, the
/// failed-auth throttle, the rate limit), as long as they sit inside
/// [`CountDenialsLayer`].
#[derive(Debug, Default)]
pub struct Counters {
    auth_failures: AtomicU64,
    scope_denials: AtomicU64,
    rate_limited: AtomicU64,
}

impl Counters {
    /// Counts one refusal by its reason.
    pub fn record(&self, reason: DenialReason) {
        let c = match reason {
            DenialReason::InsufficientScope | DenialReason::AuthMethodNotAllowed => {
                &self.scope_denials
            }
            DenialReason::RateLimited
            | DenialReason::AuthThrottled
            | DenialReason::CreditsExhausted => &self.rate_limited,
            DenialReason::MissingCredential
            | DenialReason::MalformedCredential
            | DenialReason::MultipleCredentials
            | DenialReason::InvalidKeyFormat
            | DenialReason::UnknownKey
            | DenialReason::ExpiredKey
            | DenialReason::NotYetValidKey
            | DenialReason::RevokedKey
            | DenialReason::InvalidToken => &self.auth_failures,
            _ => return,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The queue, in memory or in Redis.
    pub queue: Jobs,
    /// Refusal counters.
    pub counters: Arc<Counters>,
    /// The in-process worker's figures.
    pub worker: Arc<WorkerStatus>,
}

/// The router: `/health`, the dashboard's login form and its logout in the open
/// (behind the outer layers only); every other route (and unknown paths) behind
/// `guard`'s stack and the scope check of [`auth::ROUTES`]: `GET /dashboard` behind
/// the dashboard's stack, which also takes the session cookie ([`session`]),
/// `POST /dashboard/login` behind the main stack once its form key is a header,
/// `/internal/latest-runs` behind the stack with the internal allowlist. JSON
/// errors; the body limit is [`JsonBody`]'s. The refusal counters wrap it in
/// [`crate::service`].
///
/// Each guarded route gets the stack and the scope check as one `route_layer`.
/// `route_layer` does not reach the fallbacks (no such path, no such
/// method), so they get the stack alone: an unrouted request is authenticated,
/// limited and logged like any other.
pub fn app(state: AppState, guard: &Guard) -> Router {
    let not_allowed = || async {
        problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "This method is not allowed on this resource.",
        )
    };
    let not_found = || async { problem(StatusCode::NOT_FOUND, "No such resource.") };
    let public = Router::new()
        .route("/health", get(health))
        .route("/dashboard/login", get(session::login_form))
        .route("/dashboard/logout", post(session::logout))
        .method_not_allowed_fallback(not_allowed);
    let stack = guard.stack();
    let protected = Router::new()
        .route("/v1/jobs", post(enqueue))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/status", patch(set_status))
        .route("/v1/jobs/{id}/progress", patch(set_progress))
        .route("/v1/jobs/{id}/complete", post(complete))
        .route("/v1/jobs/{id}/fail", post(fail))
        .route("/v1/admin/stats", {
            let guard = guard.clone();
            get(move |state| stats(state, guard))
        })
        .route("/v1/admin/dlq", get(dlq))
        .route_layer((stack.clone(), auth::ScopeCheckLayer))
        .fallback(not_found.layer(stack.clone()))
        .method_not_allowed_fallback(not_allowed.layer(stack));
    // The dashboard: its own stack (API keys, or a session token from the cookie),
    // and the login, whose form key the stack authenticates.
    let dashboard = Router::new()
        .route("/dashboard", get(dashboard))
        .route_layer(axum::middleware::from_fn_with_state(
            guard.clone(),
            session::session_follows_key,
        ))
        .route_layer((guard.dashboard_stack(), auth::ScopeCheckLayer))
        .route_layer(axum::middleware::from_fn(session::cookie_to_bearer));
    let login = Router::new()
        .route("/dashboard/login", post(session::login))
        .route_layer((guard.stack(), auth::ScopeCheckLayer))
        .route_layer(axum::middleware::from_fn(session::form_key_to_header))
        .route_layer(Extension(guard.clone()));
    let stack = guard.internal_stack();
    let internal = Router::new()
        .route("/internal/latest-runs", post(latest_runs))
        .route_layer((stack.clone(), auth::ScopeCheckLayer))
        .method_not_allowed_fallback(not_allowed.layer(stack));
    guard
        .public(public)
        .merge(protected)
        .merge(dashboard)
        .merge(login)
        .merge(internal)
        .with_state(state)
}

/// Layer counting every refusal that passes through it by the [`DenialReason`] in
/// its response extensions. [`crate::service`] puts it around the whole router, so refusals
/// from the scope check and from every guarding layer reach the stats.
#[derive(Clone, Debug)]
pub struct CountDenialsLayer {
    counters: Arc<Counters>,
}

impl CountDenialsLayer {
    /// Counts into `counters`.
    pub fn new(counters: Arc<Counters>) -> Self {
        Self { counters }
    }
}

impl<S> Layer<S> for CountDenialsLayer {
    type Service = CountDenials<S>;

    fn layer(&self, inner: S) -> CountDenials<S> {
        CountDenials {
            inner,
            counters: self.counters.clone(),
        }
    }
}

/// The service of [`CountDenialsLayer`].
#[derive(Clone, Debug)]
pub struct CountDenials<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CountDenials<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = CountDenialsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        CountDenialsFuture {
            future: self.inner.call(req),
            counters: self.counters.clone(),
        }
    }
}

pin_project! {
    /// The response future of [`CountDenials`]: the inner future, then one look at
    /// the response's extensions. No boxing.
    pub struct CountDenialsFuture<F> {
        #[pin]
        future: F,
        counters: Arc<Counters>,
    }
}

impl<F, B, E> Future for CountDenialsFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.future.poll(cx));
        if let Ok(res) = &res
            && let Some(reason) = res.extensions().get::<DenialReason>()
        {
            this.counters.record(*reason);
        }
        Poll::Ready(res)
    }
}

/// An RFC 9457 problem document with a fixed detail.
pub fn problem(status: StatusCode, detail: &'static str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [
            (CONTENT_TYPE, "application/problem+json"),
            (CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn queue_error(e: QueueError) -> Response {
    match e {
        QueueError::NotFound => problem(StatusCode::NOT_FOUND, "No such job."),
        QueueError::IllegalTransition { .. } => problem(
            StatusCode::CONFLICT,
            "The job's current state does not allow this change.",
        ),
        QueueError::BadProgress => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Progress must be between 0 and 100.",
        ),
        QueueError::Full { retry_after } | QueueError::Unavailable { retry_after } => {
            Rejection::unavailable(DenialReason::BackendUnavailable, Some(retry_after))
                .into_response()
        }
    }
}

/// `axum::Json` with problem+json refusals that never echo the parser's message,
/// and the body limit: a body over [`BODY_LIMIT`] is 413.
///
/// The limit lives here, in the one extractor that reads bodies: every route that
/// takes a body takes it through `JsonBody`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Response> {
        let req = req.map(|body| Body::new(Limited::new(body, BODY_LIMIT)));
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => Err(json_rejection(&e)),
        }
    }
}

fn json_rejection(e: &JsonRejection) -> Response {
    let status = e.status();
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "The request body is larger than the limit.",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "The request body must be application/json.",
        StatusCode::UNPROCESSABLE_ENTITY => "The request body does not have the expected fields.",
        _ => "The request body is not valid JSON.",
    };
    problem(status, detail)
}

/// The `{id}` of a job route. Anything but 32 lowercase hex digits (including a
/// path that does not decode) is 404, like an unknown id.
pub struct JobPath(pub JobId);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(raw)) => JobId::parse(&raw)
                .map(JobPath)
                .ok_or_else(|| queue_error(QueueError::NotFound)),
            Err(_) => Err(queue_error(QueueError::NotFound)),
        }
    }
}

/// The query of a worker call: empty, or `attempt=N` (`N` in decimal as printed:
/// no sign, no leading zero; the failed attempts behind
/// the run that claimed the job, as its claim answered), so a run whose lease
/// lapsed cannot record an outcome over the run that claimed the job since.
/// Anything else is [`BadAttempt`].
pub fn attempt_param(query: Option<&str>) -> Result<Option<u32>, BadAttempt> {
    match query {
        None | Some("") => Ok(None),
        Some(q) => {
            let n = q.strip_prefix("attempt=").ok_or(BadAttempt)?;
            // Digits as printed: no sign, no leading zero, so one run has one spelling.
            let leading_zero = n.len() > 1 && n.starts_with('0');
            if n.is_empty()
                || n.len() > 10
                || leading_zero
                || !n.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(BadAttempt);
            }
            n.parse().map(Some).map_err(|_| BadAttempt)
        }
    }
}

/// A worker call's query that is neither empty nor `attempt=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadAttempt;

/// The `?attempt=N` of a worker call ([`attempt_param`]); a malformed query is 400.
pub struct RunAttempt(pub Option<u32>);

impl<S: Send + Sync> FromRequestParts<S> for RunAttempt {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        attempt_param(parts.uri.query())
            .map(RunAttempt)
            .map_err(|BadAttempt| {
                problem(
                    StatusCode::BAD_REQUEST,
                    "The query must be empty or attempt=<number>.",
                )
            })
    }
}

fn json<T: Serialize>(status: StatusCode, v: &T) -> Response {
    (status, [(CACHE_CONTROL, "no-store")], Json(v)).into_response()
}

fn view(r: Result<JobView, QueueError>) -> Response {
    match r {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => queue_error(e),
    }
}

async fn health() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnqueueRequest {
    input: String,
    #[serde(default)]
    priority: u8,
}

async fn enqueue(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    JsonBody(req): JsonBody<EnqueueRequest>,
) -> Response {
    if req.input.is_empty() || req.input.len() > MAX_INPUT || req.priority > MAX_PRIORITY {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "input must be 1 to 4096 bytes and priority 0 to 9.",
        );
    }
    // Owned by the principal's identity (method and id): the API key `client` and a
    // token whose `sub` is `client` are two owners.
    match s
        .queue
        .enqueue(p.identity(), &req.input, req.priority)
        .await
    {
        Ok(Enqueued::New(v)) => {
            let mut res = json(StatusCode::CREATED, &v);
            let loc = HeaderValue::try_from(format!("/v1/jobs/{}", v.id)).expect("hex id");
            res.headers_mut().insert(LOCATION, loc);
            res
        }
        Ok(Enqueued::Existing(v)) => json(StatusCode::OK, &v),
        Err(e) => queue_error(e),
    }
}

/// A job is visible to its owner only (the same [`Principal::identity`]); to anyone
/// else it does not exist.
async fn owned(s: &AppState, p: &Principal, id: JobId) -> Result<JobView, QueueError> {
    match s.queue.get(id).await {
        Ok(v) if *v.owner == *p.identity() => Ok(v),
        Err(e @ QueueError::Unavailable { .. }) => Err(e),
        _ => Err(QueueError::NotFound),
    }
}

/// `GET /v1/jobs/{id}`.
pub async fn get_job(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    JobPath(id): JobPath,
) -> Response {
    view(owned(&s, &p, id).await)
}

async fn cancel_job(
    State(s): State<AppState>,
    Extension(p): Extension<Principal>,
    JobPath(id): JobPath,
) -> Response {
    let r = match owned(&s, &p, id).await {
        Ok(v) => s.queue.cancel(v.id).await,
        Err(e) => Err(e),
    };
    view(r)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusRequest {
    state: JobState,
}

async fn set_status(
    State(s): State<AppState>,
    JobPath(id): JobPath,
    RunAttempt(attempt): RunAttempt,
    JsonBody(req): JsonBody<StatusRequest>,
) -> Response {
    view(s.queue.set_state_for(id, req.state, attempt).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgressRequest {
    progress: u8,
}

async fn set_progress(
    State(s): State<AppState>,
    JobPath(id): JobPath,
    RunAttempt(attempt): RunAttempt,
    JsonBody(req): JsonBody<ProgressRequest>,
) -> Response {
    view(s.queue.progress_for(id, req.progress, attempt).await)
}

async fn complete(
    State(s): State<AppState>,
    JobPath(id): JobPath,
    RunAttempt(attempt): RunAttempt,
) -> Response {
    view(
        s.queue
            .set_state_for(id, JobState::Completed, attempt)
            .await,
    )
}

async fn fail(
    State(s): State<AppState>,
    JobPath(id): JobPath,
    RunAttempt(attempt): RunAttempt,
) -> Response {
    view(s.queue.set_state_for(id, JobState::Failed, attempt).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatestRunsRequest {
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    20
}

async fn latest_runs(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<LatestRunsRequest>,
) -> Response {
    if !(1..=100).contains(&req.limit) {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "limit must be 1 to 100.");
    }
    match s.queue.latest_runs(req.limit).await {
        Ok(runs) => json(StatusCode::OK, &serde_json::json!({ "runs": runs })),
        Err(e) => queue_error(e),
    }
}

/// The figures of the stats endpoint and the dashboard.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Where the queue lives: `memory` or `redis`.
    backend: &'static str,
    #[serde(flatten)]
    queue: crate::queue::QueueStats,
    auth_failures: u64,
    scope_denials: u64,
    rate_limited: u64,
    worker: WorkerSnapshot,
}

/// The current figures, the queue's read from the backend in use.
pub async fn gather(s: &AppState) -> Result<Stats, QueueError> {
    Ok(Stats {
        backend: s.queue.backend(),
        queue: s.queue.stats().await?,
        auth_failures: s.counters.auth_failures.load(Ordering::Relaxed),
        scope_denials: s.counters.scope_denials.load(Ordering::Relaxed),
        rate_limited: s.counters.rate_limited.load(Ordering::Relaxed),
        worker: s.worker.snapshot(),
    })
}

async fn stats(State(s): State<AppState>, guard: Guard) -> Response {
    let st = match gather(&s).await {
        Ok(st) => st,
        Err(e) => return queue_error(e),
    };
    let mut figures = serde_json::to_value(st).unwrap_or_default();
    figures["credits"] = serde_json::Value::Array(guard.credits().await);
    json(StatusCode::OK, &figures)
}

async fn dlq(State(s): State<AppState>) -> Response {
    match s.queue.dead_letters(100).await {
        Ok(d) => json(StatusCode::OK, &serde_json::json!({ "dead_letters": d })),
        Err(e) => queue_error(e),
    }
}

async fn dashboard(State(s): State<AppState>) -> Response {
    let st = match gather(&s).await {
        Ok(st) => st,
        Err(e) => return queue_error(e),
    };
    // Every value below is a number or a fixed state name: nothing to escape.
    let mut rows = String::new();
    let mut row = |k: &str, v: String| {
        rows.push_str(&format!("<tr><th>{k}</th><td id=\"{k}\">{v}</td></tr>\n"));
    };
    row("backend", st.backend.to_string());
    row("queue_depth", st.queue.queue_depth.to_string());
    row("dead_letter_depth", st.queue.dead_letter_depth.to_string());
    for (state, n) in &st.queue.jobs_by_state {
        row(state, n.to_string());
    }
    row("auth_failures", st.auth_failures.to_string());
    row("scope_denials", st.scope_denials.to_string());
    row("rate_limited", st.rate_limited.to_string());
    row(
        "worker",
        if st.worker.paused {
            "paused"
        } else {
            "running"
        }
        .to_string(),
    );
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>portcullis demo queue</title>\
         <style>body{{font-family:sans-serif;margin:2em}}th{{text-align:left;padding-right:2em}}</style>\
         </head><body><h1>Job queue</h1><table>\n{rows}</table>\
         <form method=\"post\" action=\"/dashboard/logout\"><button type=\"submit\">Sign out</button></form>\
         </body></html>\n"
    );
    let mut res = (StatusCode::OK, html).into_response();
    session::html_headers(res.headers_mut());
    res
}
