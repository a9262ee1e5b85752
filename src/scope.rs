//! Scopes per route: 403 `insufficient_scope` unless the [`Principal`] holds them;
//! optionally, per route, the authentication methods the route accepts.
//!
//! [`RequireScopeLayer`] sits inside [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer)
//! (per route, e.g. axum's `route_layer`) and reads the [`Principal`] it inserted. A
//! request without a principal (the layer is mounted without authentication in
//! front) is refused with 401, never let through. [`require_scope`] is the same
//! check for a handler, and [`RequireScopeLayer::check`] the check of a built layer
//! by reference (for a service that picks one of several layers per request). Every refusal for a missing scope is an audit event
//! `scope_denied` (principal, method, the required scope, client ip).
//!
//! A route for one kind of caller (the worker routes of a queue, for service tokens
//! only) names the methods it accepts with [`RequireScopeLayer::methods`]: a
//! principal that authenticated any other way is refused with 403 (reason
//! `auth_method_not_allowed`, audited as `scope_denied`) *whatever its scopes*, so an
//! API key that holds the right scope still cannot call it.
//!
//! ```
//! use portcullis::AuthMethod;
//! use portcullis::scope::RequireScopeLayer;
//! let write = RequireScopeLayer::new("jobs:write")?;
//! let both = RequireScopeLayer::new("jobs:read jobs:write")?.realm("jobs")?;
//! let workers = RequireScopeLayer::new("jobs:work")?.methods(&[AuthMethod::ServiceToken])?;
//! assert!(RequireScopeLayer::new("").is_err());
//! # let _ = (write, both, workers);
//! # Ok::<(), portcullis::ConfigError>(())
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Extensions, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::rejection::{Challenge, DenialReason, RefusalBody, Rejection};
use crate::{AuthMethod, ClientIp, ConfigError, Principal, Scopes};

/// The default realm, the same as the authentication layer's.
const DEFAULT_REALM: &str = "api";

#[derive(Clone)]
struct Policy {
    required: Scopes,
    challenge: Challenge,
    /// The methods the route accepts; `None` accepts every method.
    methods: Option<Arc<[AuthMethod]>>,
}

impl Policy {
    #[allow(clippy::result_large_err)]
    fn check<'a>(&self, extensions: &'a Extensions) -> Result<&'a Principal, Rejection> {
        // The client address is read only for an audit event, off the allowed path.
        let client_ip = || extensions.get::<ClientIp>().copied();
        let Some(p) = extensions.get::<Principal>() else {
            crate::audit::emit!(
            error,
            ScopeDenied,
                reason = "missing_credential",
                client_ip = client_ip().map(tracing::field::display),
                scope = %self.required,
                "no Principal: RequireScopeLayer must sit inside the authentication layer"
            );
            return Err(Rejection::missing_credential(&self.challenge));
        };
        if let Some(methods) = &self.methods
            && !methods.contains(&p.method())
        {
            let reason = DenialReason::AuthMethodNotAllowed;
            crate::audit::emit!(
                info,
                ScopeDenied,
                reason = reason.as_str(),
                client_ip = client_ip().map(tracing::field::display),
                principal = &*crate::log_text::sanitize_id(p.id()),
                method = p.method().as_str(),
                scope = %self.required,
                allowed_methods = %MethodList(methods),
            );
            return Err(Rejection::forbidden(reason));
        }
        if p.scopes().contains_all(&self.required) {
            return Ok(p);
        }
        crate::audit::emit!(
            info,
            ScopeDenied,
            reason = "insufficient_scope",
            client_ip = client_ip().map(tracing::field::display),
            principal = &*crate::log_text::sanitize_id(p.id()),
            method = p.method().as_str(),
            scope = %self.required,
        );
        Err(Rejection::insufficient_scope(
            &self.challenge,
            &self.required,
        ))
    }
}

/// Layer applying [`RequireScope`]: every scope in the list is required.
#[derive(Clone)]
pub struct RequireScopeLayer {
    policy: Arc<Policy>,
}

impl RequireScopeLayer {
    /// Requires every scope of a space-separated list, e.g. `"jobs:read jobs:write"`.
    /// An empty or invalid list is an error.
    pub fn new(scopes: &str) -> Result<Self, ConfigError> {
        Self::scopes(Scopes::parse(scopes)?)
    }

    /// Requires every scope of `scopes`; an empty set is an error (it would require
    /// nothing, which is never what a route meant).
    pub fn scopes(scopes: Scopes) -> Result<Self, ConfigError> {
        if scopes.is_empty() {
            return Err(ConfigError::new(
                "RequireScopeLayer needs at least one scope",
            ));
        }
        Ok(Self {
            policy: Arc::new(Policy {
                required: scopes,
                challenge: Challenge::bearer(DEFAULT_REALM)
                    .expect("the default realm is valid")
                    .and_api_key(),
                methods: None,
            }),
        })
    }

    /// Sets the realm of the challenge (default `api`; use the authentication
    /// layer's).
    pub fn realm(self, realm: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            policy: Arc::new(Policy {
                challenge: Challenge::bearer(realm)?.and_api_key(),
                ..(*self.policy).clone()
            }),
        })
    }

    /// Accepts only principals that authenticated by one of `methods`, e.g.
    /// `&[AuthMethod::ServiceToken]` for a route meant for services. Anyone else is
    /// refused with 403 before the scopes are looked at. An empty list is an error
    /// (it would refuse every request, which is never what a route meant).
    ///
    /// ```
    /// use http::Request;
    /// use portcullis::scope::RequireScopeLayer;
    /// use portcullis::{AuthMethod, Principal, Scopes};
    ///
    /// let work = RequireScopeLayer::new("jobs:work")?.methods(&[AuthMethod::ServiceToken])?;
    /// let scopes = Scopes::parse("jobs:work")?;
    /// let mut req = Request::new(());
    /// req.extensions_mut()
    ///     .insert(Principal::new("worker-1", AuthMethod::ApiKey).with_scopes(scopes.clone()));
    /// assert_eq!(work.check(req.extensions()).unwrap_err().status(), 403);
    /// req.extensions_mut()
    ///     .insert(Principal::new("worker-1", AuthMethod::ServiceToken).with_scopes(scopes));
    /// assert!(work.check(req.extensions()).is_ok());
    /// assert!(RequireScopeLayer::new("jobs:work")?.methods(&[]).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn methods(self, methods: &[AuthMethod]) -> Result<Self, ConfigError> {
        if methods.is_empty() {
            return Err(ConfigError::new(
                "RequireScopeLayer::methods needs at least one method",
            ));
        }
        Ok(Self {
            policy: Arc::new(Policy {
                methods: Some(methods.into()),
                ..(*self.policy).clone()
            }),
        })
    }
}

/// Methods as a space-separated list for the audit event.
struct MethodList<'a>(&'a [AuthMethod]);

impl fmt::Display for MethodList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(m.as_str())?;
        }
        Ok(())
    }
}

impl RequireScopeLayer {
    /// This layer's check, by reference, for code that dispatches to one of several
    /// built layers per request (e.g. a table of routes) and would otherwise build a
    /// [`RequireScope`] per call: `Ok` with the principal when it holds every
    /// required scope, else the refusal the layer would answer with (401 without a
    /// principal, 403 `insufficient_scope` without the scope), after the same
    /// `scope_denied` audit event. Nothing is cloned or allocated on success.
    ///
    /// ```
    /// use http::Request;
    /// use portcullis::scope::RequireScopeLayer;
    /// use portcullis::{AuthMethod, Principal, Scopes};
    ///
    /// let write = RequireScopeLayer::new("jobs:write")?;
    /// let mut req = Request::new(());
    /// assert_eq!(write.check(req.extensions()).unwrap_err().status(), 401);
    /// req.extensions_mut().insert(
    ///     Principal::new("billing", AuthMethod::ApiKey).with_scopes(Scopes::parse("jobs:read")?),
    /// );
    /// assert_eq!(write.check(req.extensions()).unwrap_err().status(), 403);
    /// let read = RequireScopeLayer::new("jobs:read")?;
    /// assert_eq!(read.check(req.extensions()).unwrap().id(), "billing");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[allow(clippy::result_large_err)]
    pub fn check<'a>(&self, extensions: &'a Extensions) -> Result<&'a Principal, Rejection> {
        self.policy.check(extensions)
    }
}

impl fmt::Debug for RequireScopeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireScopeLayer")
            .field("required", &self.policy.required)
            .field("methods", &self.policy.methods)
            .field("realm", &self.policy.challenge.realm())
            .finish()
    }
}

impl<S> Layer<S> for RequireScopeLayer {
    type Service = RequireScope<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireScope {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Service refusing principals without the required scopes; see [`RequireScopeLayer`].
#[derive(Clone)]
pub struct RequireScope<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> RequireScope<S> {
    define_inner_service_accessors!();
}

impl<S: fmt::Debug> fmt::Debug for RequireScope<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireScope")
            .field("inner", &self.inner)
            .field("required", &self.policy.required)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequireScope<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.policy.check(req.extensions()) {
            Ok(_) => ResponseFuture::inner(self.inner.call(req)),
            Err(rejection) => ResponseFuture::rejected(rejection.into_response_to(&req)),
        }
    }
}

/// The scope check for a handler: `Ok` with the principal when it holds every scope
/// of `scopes` (space separated), else the refusal to return (401 without a
/// principal, 403 `insufficient_scope` without the scope). Emits the same
/// `scope_denied` audit event as the layer. An invalid `scopes` string denies.
///
/// ```
/// use http::Request;
/// use portcullis::{AuthMethod, Principal, Scopes};
/// use portcullis::scope::require_scope;
///
/// let mut req = Request::new(());
/// assert_eq!(require_scope(req.extensions(), "jobs:write").unwrap_err().status(), 401);
/// req.extensions_mut().insert(
///     Principal::new("billing", AuthMethod::ApiKey).with_scopes(Scopes::parse("jobs:read")?),
/// );
/// assert_eq!(require_scope(req.extensions(), "jobs:read").unwrap().id(), "billing");
/// let refusal = require_scope(req.extensions(), "jobs:write").unwrap_err();
/// assert_eq!(refusal.status(), 403);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[allow(clippy::result_large_err)]
pub fn require_scope<'a>(
    extensions: &'a Extensions,
    scopes: &str,
) -> Result<&'a Principal, Rejection> {
    let policy = match RequireScopeLayer::new(scopes) {
        Ok(layer) => layer.policy,
        Err(_) => {
            crate::audit::emit!(
                error,
                ScopeDenied,
                reason = "misconfigured",
                "require_scope called with an invalid scope list; denying"
            );
            return Err(Rejection::misconfigured());
        }
    };
    policy.check(extensions)
}

opaque_response_future! {
    /// Response future of [`RequireScope`]: the inner service's future, or the
    /// refusal, ready at once.
    copies ()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthMethod;
    use bytes::Bytes;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt};

    async fn status(layer: &RequireScopeLayer, p: Option<Principal>) -> Response<Bytes> {
        let svc =
            ServiceBuilder::new()
                .layer(layer.clone())
                .service_fn(|_req: Request<()>| async {
                    Ok::<_, Infallible>(Response::new(Bytes::new()))
                });
        let mut req = Request::new(());
        if let Some(p) = p {
            req.extensions_mut().insert(p);
        }
        svc.oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn scopes_are_all_required() {
        let l = RequireScopeLayer::new("jobs:write jobs:read").unwrap();
        let p = |s: &str| {
            Principal::new("p", AuthMethod::ApiKey).with_scopes(Scopes::parse(s).unwrap())
        };
        assert_eq!(
            status(&l, Some(p("jobs:read jobs:write admin")))
                .await
                .status(),
            200
        );
        let res = status(&l, Some(p("jobs:read"))).await;
        assert_eq!(res.status(), 403);
        assert_eq!(
            res.headers()["www-authenticate"],
            "Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"jobs:read jobs:write\""
        );
        assert_eq!(status(&l, None).await.status(), 401);
        assert!(RequireScopeLayer::scopes(Scopes::default()).is_err());
        assert!(
            RequireScopeLayer::new("a")
                .unwrap()
                .realm("bad\"realm")
                .is_err()
        );
    }

    #[tokio::test]
    async fn check_by_reference_answers_as_the_layer() {
        let l = RequireScopeLayer::new("jobs:write")
            .unwrap()
            .realm("jobs")
            .unwrap();
        let p = |s: &str| {
            Principal::new("p", AuthMethod::ApiKey).with_scopes(Scopes::parse(s).unwrap())
        };
        for who in [None, Some(p("jobs:read")), Some(p("jobs:write"))] {
            let layered = status(&l, who.clone()).await;
            let mut ext = Extensions::new();
            if let Some(p) = who {
                ext.insert(p);
            }
            match l.check(&ext) {
                Ok(principal) => {
                    assert_eq!(layered.status(), 200);
                    assert_eq!(principal.id(), "p");
                }
                Err(refusal) => {
                    let direct: Response<Bytes> = refusal.into_response();
                    assert_eq!(direct.status(), layered.status());
                    assert_eq!(direct.headers(), layered.headers());
                    assert_eq!(direct.body(), layered.body());
                }
            }
        }
    }

    #[test]
    fn handler_check_with_bad_scope_list_denies() {
        let mut ext = Extensions::new();
        ext.insert(Principal::new("p", AuthMethod::ApiKey));
        assert_eq!(require_scope(&ext, "bad\"scope").unwrap_err().status(), 500);
    }

    #[tokio::test]
    async fn a_route_for_one_method_refuses_the_others_whatever_their_scopes() {
        let l = RequireScopeLayer::new("jobs:work")
            .unwrap()
            .methods(&[AuthMethod::ServiceToken])
            .unwrap()
            .realm("jobs")
            .unwrap();
        let p = |m: AuthMethod, s: &str| {
            Principal::new("worker", m).with_scopes(Scopes::parse(s).unwrap())
        };
        assert_eq!(
            status(&l, Some(p(AuthMethod::ServiceToken, "jobs:work")))
                .await
                .status(),
            200
        );
        for other in [AuthMethod::ApiKey, AuthMethod::Unauthenticated] {
            let res = status(&l, Some(p(other, "jobs:work admin"))).await;
            assert_eq!(res.status(), 403, "{other:?}");
            assert!(res.headers().get("www-authenticate").is_none());
            assert_eq!(res.headers()["content-type"], "application/problem+json");
            assert_eq!(
                res.extensions().get::<DenialReason>(),
                Some(&DenialReason::AuthMethodNotAllowed)
            );
        }
        // The right method without the scope is still refused for the scope.
        let res = status(&l, Some(p(AuthMethod::ServiceToken, "jobs:read"))).await;
        assert_eq!(
            res.extensions().get::<DenialReason>(),
            Some(&DenialReason::InsufficientScope)
        );
        // The realm kept the methods, and the methods the realm.
        assert_eq!(
            status(&l, None).await.headers()["www-authenticate"],
            "Bearer realm=\"jobs\""
        );
        let both = RequireScopeLayer::new("jobs:work")
            .unwrap()
            .methods(&[AuthMethod::ServiceToken, AuthMethod::ApiKey])
            .unwrap();
        assert_eq!(
            status(&both, Some(p(AuthMethod::ApiKey, "jobs:work")))
                .await
                .status(),
            200
        );
        assert!(RequireScopeLayer::new("a").unwrap().methods(&[]).is_err());
    }
}
