//! The stack a tower user would assemble from peers, around any inner service:
//! outermost first, tower-http's `SetRequestId` (UUID v4) and `PropagateRequestId`
//! on `x-request-id`, `SetSensitiveRequestHeaders` (`authorization`, `cookie`,
//! `x-api-key`), `TraceLayer` with its span and its response event at INFO,
//! `ValidateRequestHeader` checking `x-api-key` against a key set, and
//! tower_governor keyed by that key, with a quota that never runs out.
//!
//! The crate's `stack` bench measures it in process; the demo's `throughput` bench
//! (which includes this file) serves it over TCP.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body as AxumBody, HttpBody};
use axum::http::{self, Request, Response};
use tower::{Service, ServiceBuilder};
use tower_governor::GovernorError;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tower_http::validate_request::ValidateRequestHeaderLayer;
use tracing::Level;

/// tower_governor keyed by the API key, as the peer stack counts per key.
#[derive(Clone)]
struct ApiKeyHeader;

impl KeyExtractor for ApiKeyHeader {
    type Key = String;
    fn extract<T>(&self, req: &Request<T>) -> Result<String, GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}

/// The peer stack around `inner`, knowing `key`. `inner` answers with axum's body,
/// in which tower_governor writes its refusals.
// tower-http's `ValidateRequest` returns the refusal as the error of a `Result`.
#[allow(clippy::result_large_err)]
pub fn peer_stack<S, B>(
    key: &str,
    inner: S,
) -> impl Service<
    Request<B>,
    Response = Response<
        impl HttpBody<Data = bytes::Bytes, Error = axum::Error> + Send + 'static + use<S, B>,
    >,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync
+ use<S, B>
where
    S: Service<Request<B>, Response = Response<AxumBody>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: HttpBody + Send + 'static,
{
    let governor = GovernorConfigBuilder::default()
        .per_nanosecond(1)
        .burst_size(1_000_000_000)
        .key_extractor(ApiKeyHeader)
        .finish()
        .unwrap();
    ServiceBuilder::new()
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetSensitiveRequestHeadersLayer::new([
            http::header::AUTHORIZATION,
            http::header::COOKIE,
            http::HeaderName::from_static("x-api-key"),
        ]))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .layer(key_check(key))
        .layer(tower_governor::GovernorLayer::new(governor))
        .service(inner)
}

/// The peer stack's key check alone: tower-http's `ValidateRequestHeader`, the
/// `x-api-key` value looked up in a set holding `key`; 401 otherwise.
// tower-http's `ValidateRequest` returns the refusal as the error of a `Result`.
#[allow(clippy::result_large_err)]
pub fn key_check<B>(
    key: &str,
) -> ValidateRequestHeaderLayer<
    impl FnMut(&mut Request<B>) -> Result<(), Response<AxumBody>> + Clone + Send + Sync + use<B>,
> {
    let keys: Arc<HashSet<String>> = Arc::new([key.to_owned()].into_iter().collect());
    ValidateRequestHeaderLayer::custom(
        move |req: &mut Request<B>| -> Result<(), Response<AxumBody>> {
            let known = req
                .headers()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|k| keys.contains(k));
            if known {
                Ok(())
            } else {
                let mut res = Response::new(AxumBody::empty());
                *res.status_mut() = http::StatusCode::UNAUTHORIZED;
                Err(res)
            }
        },
    )
}
