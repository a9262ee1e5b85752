//! 403 unless the client address is inside the allowed networks.
//!
//! Reads the [`ClientIp`] that [`ClientIpLayer`](crate::client_ip::ClientIpLayer)
//! resolved, so it must sit inside that layer. A request without a client address is
//! denied, never allowed. An optional deny list wins over the allow list (e.g. allow
//! `10.0.0.0/8` but not the `10.9.0.0/16` guest network). Lookups are a binary search
//! over merged ranges: O(log n) in the number of networks, no allocation.
//!
//! ```
//! use portcullis::allowlist::IpAllowlistLayer;
//! use portcullis::IpSet;
//!
//! // e.g. from INTERNAL_CIDRS="10.0.0.0/8, fd00::/8"
//! let layer = IpAllowlistLayer::new(IpSet::parse("10.0.0.0/8, fd00::/8")?)
//!     .deny(IpSet::parse("10.9.0.0/16")?);
//! # let _ = layer;
//! # Ok::<(), portcullis::ConfigError>(())
//! ```

use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::rejection::{DenialReason, RefusalBody, Rejection};
use crate::{ClientIp, IpSet};

#[derive(Debug)]
pub(crate) struct Policy {
    allow: IpSet,
    deny: Option<IpSet>,
}

impl Policy {
    fn check(&self, ip: Option<ClientIp>) -> Result<(), DenialReason> {
        let Some(ip) = ip.map(ClientIp::addr) else {
            return Err(DenialReason::NoClientIp);
        };
        let denied = self.deny.as_ref().is_some_and(|d| d.contains(ip));
        if denied || !self.allow.contains(ip) {
            Err(DenialReason::IpDenied)
        } else {
            Ok(())
        }
    }
}

/// Layer applying [`IpAllowlist`].
#[derive(Clone, Debug)]
pub struct IpAllowlistLayer {
    policy: Arc<Policy>,
}

impl IpAllowlistLayer {
    /// Allow only addresses inside `allow`. The set is never empty (see [`IpSet`]),
    /// so a misconfigured empty list fails at start-up, not open.
    pub fn new(allow: IpSet) -> Self {
        Self {
            policy: Arc::new(Policy { allow, deny: None }),
        }
    }

    /// Also deny addresses inside `deny`, even when they are allowed.
    pub fn deny(self, deny: IpSet) -> Self {
        Self {
            policy: Arc::new(Policy {
                allow: self.policy.allow.clone(),
                deny: Some(deny),
            }),
        }
    }

    /// Whether `ip` would be let through.
    ///
    /// ```
    /// # use portcullis::{allowlist::IpAllowlistLayer, IpSet};
    /// let l = IpAllowlistLayer::new(IpSet::parse("10.0.0.0/8").unwrap())
    ///     .deny(IpSet::parse("10.9.0.0/16").unwrap());
    /// assert!(l.allows("10.1.2.3".parse().unwrap()));
    /// assert!(!l.allows("10.9.2.3".parse().unwrap()));
    /// ```
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.policy.check(Some(ClientIp::new(ip))).is_ok()
    }
}

impl<S> Layer<S> for IpAllowlistLayer {
    type Service = IpAllowlist<S>;
    fn layer(&self, inner: S) -> Self::Service {
        IpAllowlist {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// Service that refuses requests from outside the allowlist; see [`IpAllowlistLayer`].
#[derive(Clone, Debug)]
pub struct IpAllowlist<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S> IpAllowlist<S> {
    /// Wraps `inner`, allowing only `allow`.
    pub fn new(inner: S, allow: IpSet) -> Self {
        IpAllowlistLayer::new(allow).layer(inner)
    }
    /// Returns a layer allowing only `allow`.
    pub fn layer(allow: IpSet) -> IpAllowlistLayer {
        IpAllowlistLayer::new(allow)
    }
    define_inner_service_accessors!();
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IpAllowlist<S>
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
        let ip = req.extensions().get::<ClientIp>().copied();
        match self.policy.check(ip) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(reason) => {
                crate::audit::emit!(
                    info,
                    IpDenied,
                    reason = reason.as_str(),
                    client_ip = ip.map(tracing::field::display),
                );
                ResponseFuture::rejected(Rejection::forbidden(reason).into_response_to(&req))
            }
        }
    }
}

opaque_response_future! {
    /// Response future of [`IpAllowlist`]: the inner service's future, or the 403
    /// answer, ready at once.
    copies ()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::convert::Infallible;
    use tower::{ServiceBuilder, ServiceExt};

    async fn status(layer: &IpAllowlistLayer, ip: Option<&str>) -> u16 {
        let svc =
            ServiceBuilder::new()
                .layer(layer.clone())
                .service_fn(|_req: Request<()>| async {
                    Ok::<_, Infallible>(Response::new(Bytes::new()))
                });
        let mut req = Request::new(());
        if let Some(ip) = ip {
            req.extensions_mut()
                .insert(ClientIp::new(ip.parse().unwrap()));
        }
        svc.oneshot(req).await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn allow_deny_and_missing() {
        let l = IpAllowlistLayer::new(IpSet::parse("10.0.0.0/8, ::1").unwrap())
            .deny(IpSet::parse("10.9.0.0/16").unwrap());
        assert_eq!(status(&l, Some("10.1.1.1")).await, 200);
        assert_eq!(status(&l, Some("::ffff:10.1.1.1")).await, 200);
        assert_eq!(status(&l, Some("::1")).await, 200);
        assert_eq!(status(&l, Some("10.9.0.1")).await, 403);
        assert_eq!(status(&l, Some("11.0.0.1")).await, 403);
        assert_eq!(status(&l, None).await, 403);
    }
}
