//! Who may call what: the one scope table of the demo, and the one check.
//!
//! Every route is listed in [`ROUTES`] with its access rule. [`ScopeCheckLayer`]
//! (a `Router::route_layer`) looks the matched route up and answers with the
//! crate's scope check for that route's scope (`RequireScopeLayer::check`, the
//! layer's own check by reference):
//!
//! - 401 when the request carries no `Principal` (cannot happen behind
//!   `Authenticate`, which refuses first; kept as the layer's own guarantee),
//! - 403 `insufficient_scope` when the principal lacks the route's scope,
//! - 403 `auth_method_not_allowed` when a worker route ([`Access::Token`]) is
//!   called with anything but a service token,
//! - 500 when a route is missing from the table: an unlisted route is a wiring bug
//!   and is never served open.
//!
//! One table rather than a `route_layer` per route: a route added to the router
//! without a row fails closed, and a test checks that every row is unique.
//!
//! Each row's `RequireScopeLayer` is built once, with the table; a request is
//! checked against the row of its matched route.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{Method, Response};
use pin_project_lite::pin_project;
use portcullis::AuthMethod;
use portcullis::rejection::Rejection;
use portcullis::scope::RequireScopeLayer;
use tower::{Layer, Service};

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
    /// Anyone, no credential (`/health`, the dashboard's login form and logout).
    Public,
    /// A principal holding this scope.
    Scope(&'static str),
    /// A service token holding this scope: an API key holding it is refused with
    /// 403 (`auth_method_not_allowed`), so a leaked client key cannot act as a worker.
    Token(&'static str),
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
        Access::Token(JOBS_WORK),
    ),
    (
        Method::PATCH,
        "/v1/jobs/{id}/progress",
        Access::Token(JOBS_WORK),
    ),
    (
        Method::POST,
        "/v1/jobs/{id}/complete",
        Access::Token(JOBS_WORK),
    ),
    (Method::POST, "/v1/jobs/{id}/fail", Access::Token(JOBS_WORK)),
    // Later also behind the internal-network allowlist.
    (
        Method::POST,
        "/internal/latest-runs",
        Access::Token(JOBS_WORK),
    ),
    (Method::GET, "/v1/admin/stats", Access::Scope(ADMIN)),
    (Method::GET, "/v1/admin/dlq", Access::Scope(ADMIN)),
    (Method::GET, "/dashboard", Access::Scope(DASHBOARD_READ)),
    // The key comes from the form, then the stack authenticates it.
    (
        Method::POST,
        "/dashboard/login",
        Access::Scope(DASHBOARD_READ),
    ),
    (Method::GET, "/dashboard/login", Access::Public),
    (Method::POST, "/dashboard/logout", Access::Public),
];

/// The row of [`ROUTES`] of a route; `HEAD` follows `GET`. `None` for an unlisted
/// route.
fn row(method: &Method, path: &str) -> Option<usize> {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    ROUTES
        .iter()
        .position(|(m, p, _)| *p == path && m == method)
}

/// The check of each row of [`ROUTES`], in the same order: `None` for a public
/// row, else the crate's scope check for the row's scope with the demo's realm.
/// Built once.
static CHECKS: LazyLock<Vec<Option<RequireScopeLayer>>> = LazyLock::new(|| {
    ROUTES
        .iter()
        .map(|(_, _, access)| match access {
            Access::Public => None,
            Access::Scope(scope) => Some(
                RequireScopeLayer::new(scope)
                    .and_then(|l| l.realm(REALM))
                    .expect("the table's scopes and the realm are valid"),
            ),
            Access::Token(scope) => Some(
                RequireScopeLayer::new(scope)
                    .and_then(|l| l.realm(REALM))
                    .and_then(|l| l.methods(&[AuthMethod::ServiceToken]))
                    .expect("the table's scopes and the realm are valid"),
            ),
        })
        .collect()
});

/// Layer enforcing [`ROUTES`] on the routes it wraps; mount it with
/// `Router::route_layer`, inside the authentication layer (it reads axum's
/// `MatchedPath`, which only matched routes carry).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScopeCheckLayer;

impl<S> Layer<S> for ScopeCheckLayer {
    type Service = ScopeCheck<S>;

    fn layer(&self, inner: S) -> ScopeCheck<S> {
        ScopeCheck { inner }
    }
}

/// The service of [`ScopeCheckLayer`]: the matched route's row of [`ROUTES`]
/// decides, the crate's scope check answers (401 without a principal, 403
/// `insufficient_scope` and an audit event `scope_denied`), an unlisted route is 500.
#[derive(Clone, Debug)]
pub struct ScopeCheck<S> {
    inner: S,
}

impl<S> Service<Request> for ScopeCheck<S>
where
    S: Service<Request, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ScopeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let row = req
            .extensions()
            .get::<MatchedPath>()
            .and_then(|m| row(req.method(), m.as_str()));
        match row.map(|i| &CHECKS[i]) {
            Some(None) => ScopeFuture::Open {
                future: self.inner.call(req),
            },
            Some(Some(check)) => match check.check(req.extensions()) {
                Ok(_) => ScopeFuture::Open {
                    future: self.inner.call(req),
                },
                Err(refusal) => ScopeFuture::Refused {
                    response: Some(refusal.into_response()),
                },
            },
            None => {
                tracing::error!(
                    method = %req.method(),
                    "route missing from the scope table; answering 500"
                );
                ScopeFuture::Refused {
                    response: Some(Rejection::misconfigured().into_response()),
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`ScopeCheck`]: the inner service's, or a refusal
    /// (the scope check's 401 or 403, or the 500 of an unlisted route). No boxing.
    #[project = ScopeFutureProj]
    pub enum ScopeFuture<F> {
        /// A public route, or a principal holding the route's scope: the inner
        /// service's future.
        Open { #[pin] future: F },
        /// A refusal.
        Refused { response: Option<Response<Body>> },
    }
}

impl<F, E> Future for ScopeFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ScopeFutureProj::Open { future } => future.poll(cx),
            ScopeFutureProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}
