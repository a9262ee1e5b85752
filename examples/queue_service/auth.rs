//! Who may call what: the one scope table of the demo, and the one check.
//!
//! Every route is listed in [`ROUTES`] with its access rule. [`require_scope`] is a
//! router-level middleware that looks the matched route up and answers
//!
//! - 401 (`Bearer realm="portcullis-demo"`) when the request carries no
//!   [`Principal`] (the authentication layer did not admit it),
//! - 403 `insufficient_scope` when the principal lacks the route's scope,
//! - 500 when a route is missing from the table: an unlisted route is a wiring bug
//!   and is never served open.
//!
//! The `Principal` is inserted by the authentication layers (API keys, service
//! tokens). Until they are wired in, no request has one, so every protected route
//! answers 401. When the crate's `RequireScope` layer lands, each row of [`ROUTES`]
//! becomes a `.route_layer(RequireScope::new(..))` and this module goes away.

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{Method, Response};
use axum::middleware::Next;
use portcullis::rejection::{Challenge, Rejection};
use portcullis::{ClientIp, Principal, Scopes};

/// Enqueue and cancel jobs.
pub const JOBS_WRITE: &str = "jobs:write";
/// Read one's own jobs.
pub const JOBS_READ: &str = "jobs:read";
/// The worker endpoints and the internal endpoint (service tokens).
pub const JOBS_WORK: &str = "jobs:work";
/// Stats and the dead-letter queue.
pub const ADMIN: &str = "admin";
/// The HTML dashboard.
pub const DASHBOARD_READ: &str = "dashboard:read";

/// The access rule of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, no credential (only `/health`).
    Public,
    /// A principal holding this scope.
    Scope(&'static str),
}

/// Every route of the demo, `(method, path template, access)`.
pub const ROUTES: &[(Method, &str, Access)] = &[
    (Method::GET, "/health", Access::Public),
    (Method::POST, "/v1/jobs", Access::Scope(JOBS_WRITE)),
    (Method::GET, "/v1/jobs/{id}", Access::Scope(JOBS_READ)),
    (Method::DELETE, "/v1/jobs/{id}", Access::Scope(JOBS_WRITE)),
    (
        Method::PATCH,
        "/v1/jobs/{id}/status",
        Access::Scope(JOBS_WORK),
    ),
    (
        Method::PATCH,
        "/v1/jobs/{id}/progress",
        Access::Scope(JOBS_WORK),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/complete",
        Access::Scope(JOBS_WORK),
    ),
    (Method::POST, "/v1/jobs/{id}/fail", Access::Scope(JOBS_WORK)),
    // Later also behind the internal-network allowlist.
    (
        Method::POST,
        "/internal/latest-runs",
        Access::Scope(JOBS_WORK),
    ),
    (Method::GET, "/v1/admin/stats", Access::Scope(ADMIN)),
    (Method::GET, "/v1/admin/dlq", Access::Scope(ADMIN)),
    (Method::GET, "/dashboard", Access::Scope(DASHBOARD_READ)),
];

/// The challenge every 401/403 of the demo offers.
pub static CHALLENGE: LazyLock<Challenge> =
    LazyLock::new(|| Challenge::bearer("portcullis-demo").expect("a valid realm"));

/// The rule of a route; `HEAD` follows `GET`. `None` for an unlisted route.
pub fn access_for(method: &Method, path: &str) -> Option<Access> {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    ROUTES
        .iter()
        .find(|(m, p, _)| m == method && *p == path)
        .map(|(_, _, a)| *a)
}

/// The one scope check: `Ok` when `principal` holds `scope`, else the refusal.
#[allow(clippy::result_large_err)]
pub fn check(
    principal: Option<&Principal>,
    client_ip: Option<&ClientIp>,
    scope: &'static str,
) -> Result<(), Response<Body>> {
    let Some(p) = principal else {
        return Err(Rejection::missing_credential(&CHALLENGE).into_response());
    };
    if p.scopes().contains(scope) {
        return Ok(());
    }
    let required = Scopes::parse(scope).expect("the table's scopes are valid tokens");
    tracing::info!(
        target: "portcullis::audit",
        event = "scope_denied",
        reason = "insufficient_scope",
        client_ip = client_ip.map(tracing::field::display),
        principal = p.id(),
        method = p.method().as_str(),
        scope,
    );
    Err(Rejection::insufficient_scope(&CHALLENGE, &required).into_response())
}

/// Router-level middleware (`Router::route_layer`) enforcing [`ROUTES`].
pub async fn require_scope(
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response<Body> {
    let access = matched.and_then(|m| access_for(req.method(), m.as_str()));
    match access {
        Some(Access::Public) => next.run(req).await,
        Some(Access::Scope(scope)) => {
            let ext = req.extensions();
            match check(ext.get::<Principal>(), ext.get::<ClientIp>(), scope) {
                Ok(()) => next.run(req).await,
                Err(refusal) => refusal,
            }
        }
        None => {
            tracing::error!(
                method = %req.method(),
                "route missing from the scope table; answering 500"
            );
            Rejection::misconfigured().into_response()
        }
    }
}
