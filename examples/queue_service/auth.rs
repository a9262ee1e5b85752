//! Who may call what: the one scope table of the demo, and the one check.
//!
//! Every route is listed in [`ROUTES`] with its access rule. [`require_scope`] is a
//! router-level middleware that looks the matched route up and answers
//!
//! through the crate's `RequireScope` for that route's scope:
//!
//! - 401 when the request carries no `Principal` (cannot happen behind
//!   `Authenticate`, which refuses first; kept as the layer's own guarantee),
//! - 403 `insufficient_scope` when the principal lacks the route's scope,
//! - 500 when a route is missing from the table: an unlisted route is a wiring bug
//!   and is never served open.
//!
//! One table rather than a `route_layer` per route: a route added to the router
//! without a row fails closed, and a test checks that every row is unique.

use std::sync::LazyLock;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{Method, Response};
use axum::middleware::Next;
use portcullis::rejection::Rejection;
use portcullis::scope::RequireScopeLayer;
use tower::{Layer, ServiceExt};

use crate::guard::REALM;

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

/// The crate's scope check for `scope`, with the demo's realm: one layer per scope,
/// built once.
fn scope_layer(scope: &'static str) -> &'static RequireScopeLayer {
    static LAYERS: LazyLock<Vec<(&'static str, RequireScopeLayer)>> = LazyLock::new(|| {
        [JOBS_WRITE, JOBS_READ, JOBS_WORK, ADMIN, DASHBOARD_READ]
            .into_iter()
            .map(|s| {
                let layer = RequireScopeLayer::new(s)
                    .and_then(|l| l.realm(REALM))
                    .expect("the table's scopes and the realm are valid");
                (s, layer)
            })
            .collect()
    });
    LAYERS
        .iter()
        .find(|(s, _)| *s == scope)
        .map(|(_, l)| l)
        .expect("every scope of the table has a layer")
}

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

/// Router-level middleware (`Router::route_layer`) enforcing [`ROUTES`]: the
/// matched route's scope is checked by the crate's `RequireScope` (401 without a
/// principal, 403 `insufficient_scope`, an audit event `scope_denied`).
pub async fn require_scope(
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response<Body> {
    let access = matched.and_then(|m| access_for(req.method(), m.as_str()));
    match access {
        Some(Access::Public) => next.run(req).await,
        Some(Access::Scope(scope)) => match scope_layer(scope).layer(next).oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        },
        None => {
            tracing::error!(
                method = %req.method(),
                "route missing from the scope table; answering 500"
            );
            Rejection::misconfigured().into_response()
        }
    }
}
