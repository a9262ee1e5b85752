//! axum: extractors for what the layers found, and how to mount the layers.
//!
//! With the `axum` feature, a handler takes what the layers put in the request
//! extensions as arguments:
//!
//! | argument | from | when it is absent |
//! |---|---|---|
//! | [`Principal`] | [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer) (or the stack) | 500: the layer is not mounted in front of the route |
//! | [`ClientIp`](crate::ClientIp) | [`ClientIpLayer`](crate::client_ip::ClientIpLayer) (or the stack) | 403 when a trusted proxy reported no usable address; 500 when the layer is not mounted |
//! | `Option<ClientIp>` | the same | `None` when a trusted proxy reported no usable address; 500 when the layer is not mounted |
//! | `VerifiedToken` (feature `jwt`) | the authentication layer, for a service token | 403 when the caller used another credential; 500 when the layer is not mounted |
//! | `Option<VerifiedToken>` (feature `jwt`) | the same | `None` for another credential; 500 when the layer is not mounted |
//!
//! A refusal is a [`Rejection`]: the same `application/problem+json` as the layers',
//! never echoing the request. A missing layer is a wiring mistake that repeats on
//! every request: it is logged once per kind, at error level on the
//! `portcullis::extract` target, naming the layer to mount. [`Rejection`] implements
//! `IntoResponse`, so handlers can also return
//! [`require_scope`](crate::scope::require_scope)'s refusal with `?`.
//!
//! ## Mounting
//!
//! Three ways, all served with the peer address axum attaches
//! (`into_make_service_with_connect_info::<SocketAddr>()`; without it every request
//! is answered 500, and the log says why):
//!
//! - `Router::layer(stack)`: the stack runs on every request the router gets,
//!   unmatched paths included (a scan of unknown paths is authenticated and limited too).
//! - `Router::route_layer(layer)`: per route, and only on matched routes. Use it for
//!   what differs between routes: [`RequireScopeLayer`](crate::scope::RequireScopeLayer)
//!   (scopes, and with [`methods`](crate::scope::RequireScopeLayer::methods) the
//!   authentication methods a route accepts). It must sit inside the stack.
//! - `stack.layer(router)`: the router wrapped as a service; the stack's service has
//!   its own `into_make_service_with_connect_info`, so no turbofish is needed.
//!
//! ```no_run
//! # #[cfg(feature = "stack")]
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::net::SocketAddr;
//!
//! use axum::{Router, routing::{get, post}};
//! use portcullis::scope::RequireScopeLayer;
//! use portcullis::stack::StackBuilder;
//! use portcullis::{AuthMethod, ClientIp, Principal};
//! use tower::Layer;
//!
//! async fn jobs(principal: Principal, ip: ClientIp) -> String {
//!     format!("{} from {ip}\n", principal.id())
//! }
//!
//! let stack = StackBuilder::from_env()?.build()?;
//! let workers = RequireScopeLayer::new("jobs:work")?.methods(&[AuthMethod::ServiceToken])?;
//! let router = Router::new()
//!     .route("/v1/jobs", get(jobs))
//!     .route("/v1/work", post(jobs).route_layer(workers));
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! // Either `router.layer(stack).into_make_service_with_connect_info::<SocketAddr>()`, or:
//! axum::serve(listener, stack.layer(router).into_make_service_with_connect_info()).await?;
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;

use crate::Principal;
use crate::rejection::Rejection;

impl IntoResponse for Rejection {
    /// The HTTP refusal (`application/problem+json`).
    fn into_response(self) -> Response {
        Rejection::into_response::<axum::body::Body>(self)
    }
}

/// A layer a handler's argument needs and the request did not pass through.
#[derive(Clone, Copy)]
enum Missing {
    Authenticate,
    #[cfg(feature = "client-ip")]
    ClientIp,
}

impl Missing {
    /// 500, logged once per kind with the remedy.
    fn refuse(self) -> Rejection {
        static SAID: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let (i, message) = match self {
            Missing::Authenticate => (
                0,
                "a handler takes a Principal or a VerifiedToken but the request did not pass \
                 through AuthenticateLayer (or StackLayer): mount it in front of the route; \
                 every such request is answered 500",
            ),
            #[cfg(feature = "client-ip")]
            Missing::ClientIp => (
                1,
                "a handler takes a ClientIp but the request did not pass through ClientIpLayer \
                 (or StackLayer): mount it in front of the route; every such request is \
                 answered 500",
            ),
        };
        if !SAID[i].swap(true, Ordering::Relaxed) {
            tracing::error!(target: "portcullis::extract", "{message}");
        }
        Rejection::misconfigured()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Rejection> {
        match parts.extensions.get::<Principal>() {
            Some(p) => Ok(p.clone()),
            None => Err(Missing::Authenticate.refuse()),
        }
    }
}

#[cfg(feature = "client-ip")]
mod client_ip {
    use axum::extract::OptionalFromRequestParts;

    use super::*;
    use crate::ClientIp;

    impl<S: Send + Sync> OptionalFromRequestParts<S> for ClientIp {
        type Rejection = Rejection;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Rejection> {
            if let Some(&ip) = parts.extensions.get::<ClientIp>() {
                return Ok(Some(ip));
            }
            if parts
                .extensions
                .get::<crate::client_ip::Unresolved>()
                .is_some()
            {
                return Ok(None);
            }
            Err(Missing::ClientIp.refuse())
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
        type Rejection = Rejection;

        async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Rejection> {
            match <ClientIp as OptionalFromRequestParts<S>>::from_request_parts(parts, state)
                .await?
            {
                Some(ip) => Ok(ip),
                // The layer ran and a trusted proxy reported nothing usable: refused as
                // the allowlist refuses it.
                None => Err(Rejection::forbidden(
                    crate::rejection::DenialReason::NoClientIp,
                )),
            }
        }
    }
}

#[cfg(feature = "jwt")]
mod token {
    use std::sync::Arc;

    use axum::extract::OptionalFromRequestParts;

    use super::*;
    use crate::ClientIp;
    use crate::jwt::VerifiedToken;
    use crate::rejection::DenialReason;

    impl<S: Send + Sync> OptionalFromRequestParts<S> for VerifiedToken {
        type Rejection = Rejection;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Rejection> {
            if let Some(t) = parts.extensions.get::<Arc<VerifiedToken>>() {
                return Ok(Some(VerifiedToken::clone(t)));
            }
            if parts.extensions.get::<Principal>().is_some() {
                return Ok(None);
            }
            Err(Missing::Authenticate.refuse())
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for VerifiedToken {
        type Rejection = Rejection;

        async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Rejection> {
            match <VerifiedToken as OptionalFromRequestParts<S>>::from_request_parts(parts, state)
                .await?
            {
                Some(t) => Ok(t),
                None => {
                    let reason = DenialReason::AuthMethodNotAllowed;
                    let p = parts.extensions.get::<Principal>();
                    crate::audit::emit!(
                        info,
                        ScopeDenied,
                        reason = reason.as_str(),
                        client_ip = parts
                            .extensions
                            .get::<ClientIp>()
                            .map(tracing::field::display),
                        principal = p.map(|p| crate::log_text::sanitize_id(p.id())).as_deref(),
                        method = p.map(|p| p.method().as_str()),
                        allowed_methods = crate::AuthMethod::ServiceToken.as_str(),
                    );
                    Err(Rejection::forbidden(reason))
                }
            }
        }
    }
}
