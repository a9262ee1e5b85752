//! `BearerTokenLayer`: attaches a service token to outgoing requests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::header::AUTHORIZATION;
use http::{HeaderValue, Request};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::issue::{MintError, TokenIssuer};
use crate::ConfigError;

/// The error type of [`BearerToken`]: the inner service's error, or a [`MintError`].
pub type BearerTokenError = Box<dyn std::error::Error + Send + Sync>;

struct Current {
    header: HeaderValue,
    /// Read before minting, so no later than the clock reading the token's `iat`
    /// was taken from.
    minted: Instant,
    /// How long after `minted` the token is still surely valid: its lifetime less
    /// one second, since `iat` is the minting time rounded down to the second and
    /// the verifier refuses it from `exp` on.
    valid_for: Duration,
}

impl Current {
    /// Whether the token is younger than `age`; durations only, no instant
    /// arithmetic that could overflow.
    fn younger_than(&self, age: Duration) -> bool {
        self.minted.elapsed() < age
    }
}

struct Shared {
    issuer: TokenIssuer,
    refresh_after: Duration,
    current: ArcSwapOption<Current>,
    minting: Mutex<()>,
}

impl Shared {
    /// The token to send: the current one while it is younger than `refresh_after`,
    /// else a new one. One caller mints; concurrent callers wait for it and share the
    /// result, so a burst of requests never mints a burst of tokens.
    fn header(&self) -> Result<HeaderValue, MintError> {
        if let Some(h) = self.fresh() {
            return Ok(h);
        }
        let _minting = self.minting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = self.fresh() {
            return Ok(h);
        }
        let minted = Instant::now();
        match self.issuer.mint() {
            Ok(t) => {
                let header = t.bearer_header();
                self.current.store(Some(Arc::new(Current {
                    header: header.clone(),
                    minted,
                    valid_for: self.valid_for(),
                })));
                tracing::debug!(jti = t.jti(), "minted a service token");
                Ok(header)
            }
            Err(e) => {
                // Keep sending the previous token while it stays valid for 5 more
                // seconds; the next request tries to mint again.
                let still_valid = self.current.load().as_ref().and_then(|c| {
                    c.younger_than(c.valid_for.saturating_sub(Duration::from_secs(5)))
                        .then(|| c.header.clone())
                });
                tracing::warn!(error = %e, reusing = still_valid.is_some(), "could not mint a service token");
                still_valid.ok_or(e)
            }
        }
    }

    fn fresh(&self) -> Option<HeaderValue> {
        let c = self.current.load();
        let c = c.as_ref()?;
        c.younger_than(self.refresh_after.min(c.valid_for))
            .then(|| c.header.clone())
    }

    fn valid_for(&self) -> Duration {
        self.issuer
            .lifetime()
            .saturating_sub(Duration::from_secs(1))
    }
}

/// Layer applying [`BearerToken`]: sets `Authorization: Bearer <token>` on every
/// outgoing request, from a [`TokenIssuer`].
///
/// One token is shared by every clone of the layer and of its services; it is
/// re-minted once it is older than 80% of its lifetime (configurable with
/// [`refresh_after`](Self::refresh_after)), so a request never leaves with a token
/// about to expire. The header value is marked sensitive.
///
/// ```
/// use portcullis::jwt::{BearerTokenLayer, SigningKey, TokenIssuer};
/// use tower::ServiceBuilder;
///
/// let issuer = TokenIssuer::builder(SigningKey::hs256(&[5u8; 32])?.kid("k1"))
///     .issuer("https://scheduler.internal")
///     .subject("scheduler")
///     .audience("jobs-api")
///     .build()?;
/// let client = ServiceBuilder::new()
///     .layer(BearerTokenLayer::new(issuer))
///     .service_fn(|req: http::Request<()>| async move {
///         // e.g. a hyper-util client
///         assert!(req.headers()["authorization"].as_bytes().starts_with(b"Bearer ey"));
///         Ok::<_, std::convert::Infallible>(http::Response::new(()))
///     });
/// # let _ = client;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct BearerTokenLayer {
    shared: Arc<Shared>,
}

impl BearerTokenLayer {
    /// Attaches tokens minted by `issuer`.
    pub fn new(issuer: TokenIssuer) -> Self {
        let lifetime = issuer.lifetime();
        let refresh_after = lifetime.saturating_sub(lifetime / 5);
        Self {
            shared: Arc::new(Shared {
                issuer,
                refresh_after,
                current: ArcSwapOption::empty(),
                minting: Mutex::new(()),
            }),
        }
    }

    /// Re-mints once the token is older than `age` (default: 80% of the lifetime).
    /// Must be above zero and below the token lifetime. Whatever `age`, a token is
    /// not sent in the last second of its lifetime, from which `iat` rounding can put
    /// it at or past its `exp`.
    pub fn refresh_after(self, age: Duration) -> Result<Self, ConfigError> {
        let issuer = self.shared.issuer.clone();
        if age.is_zero() || age >= issuer.lifetime() {
            return Err(ConfigError::new(
                "refresh_after must be above zero and below the token lifetime",
            ));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                issuer,
                refresh_after: age,
                current: ArcSwapOption::empty(),
                minting: Mutex::new(()),
            }),
        })
    }
}

impl fmt::Debug for BearerTokenLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerTokenLayer")
            .field("issuer", &self.shared.issuer)
            .field("refresh_after", &self.shared.refresh_after)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for BearerTokenLayer {
    type Service = BearerToken<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BearerToken {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Service that sets a service token on each request; see [`BearerTokenLayer`].
#[derive(Clone)]
pub struct BearerToken<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> BearerToken<S> {
    /// Wraps `inner`, attaching tokens from `issuer`.
    pub fn new(inner: S, issuer: TokenIssuer) -> Self {
        BearerTokenLayer::new(issuer).layer(inner)
    }
    /// Returns a layer attaching tokens from `issuer`.
    pub fn layer(issuer: TokenIssuer) -> BearerTokenLayer {
        BearerTokenLayer::new(issuer)
    }
    define_inner_service_accessors!();
}

impl<S> fmt::Debug for BearerToken<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken").finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for BearerToken<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BearerTokenError>,
{
    type Response = S::Response;
    type Error = BearerTokenError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match self.shared.header() {
            Ok(h) => {
                req.headers_mut().insert(AUTHORIZATION, h);
                ResponseFuture {
                    kind: Kind::Inner {
                        future: self.inner.call(req),
                    },
                }
            }
            Err(e) => ResponseFuture {
                kind: Kind::Failed { error: Some(e) },
            },
        }
    }
}

pin_project! {
    /// Response future of [`BearerToken`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Failed { error: Option<MintError> },
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BearerTokenError>,
{
    type Output = Result<T, BearerTokenError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx).map_err(Into::into),
            KindProj::Failed { error } => Poll::Ready(Err(Box::new(
                error.take().expect("polled after completion"),
            ))),
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
