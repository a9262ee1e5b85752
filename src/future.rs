//! The response future shared by the layers that either refuse a request at once or
//! pass it on.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's future or a refusal that is ready now.
    ///
    /// A layer that learned something about the request (the resolved
    /// [`ClientIp`](crate::ClientIp), the authenticated [`Principal`](crate::Principal))
    /// can also carry a value `X` to insert into the response extensions on completion,
    /// where a layer *outside* it (the access log) reads it. Layers with nothing to
    /// copy use `X = ()` and never insert anything.
    ///
    /// No boxing: a pass-through request costs one enum tag over the inner future.
    pub struct ResponseFuture<F, B, X = ()> {
        #[pin]
        kind: Kind<F, B>,
        copy: Option<X>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B> {
        Inner { #[pin] future: F },
        Rejected { response: Option<Response<B>> },
    }
}

// Which constructors a build uses depends on its features.
#[allow(dead_code)]
impl<F, B, X> ResponseFuture<F, B, X> {
    /// The inner service's future; `copy` goes into its response's extensions.
    pub(crate) fn inner_with(future: F, copy: Option<X>) -> Self {
        Self {
            kind: Kind::Inner { future },
            copy,
        }
    }

    /// The inner service's future, nothing to copy.
    pub(crate) fn inner(future: F) -> Self {
        Self::inner_with(future, None)
    }

    /// A refusal, ready now, nothing to copy.
    pub(crate) fn rejected(response: Response<B>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
            copy: None,
        }
    }
}

impl<F, B, E, X> Future for ResponseFuture<F, B, X>
where
    F: Future<Output = Result<Response<B>, E>>,
    X: CopyToResponse,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = match this.kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Rejected { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        };
        if let Poll::Ready(Ok(res)) = &mut out
            && let Some(copy) = this.copy.take()
        {
            copy.copy_to(res.extensions_mut());
        }
        out
    }
}

/// What a layer copies into the response extensions on completion: usually the
/// value itself, for an outer layer to read.
pub(crate) trait CopyToResponse {
    /// Inserts what the layers outside read into `extensions`.
    fn copy_to(self, extensions: &mut http::Extensions);
}

impl CopyToResponse for () {
    fn copy_to(self, _: &mut http::Extensions) {}
}

impl<F, B, X> fmt::Debug for ResponseFuture<F, B, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Inner { .. } => "Inner",
            Kind::Rejected { .. } => "Rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}
