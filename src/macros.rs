//! Crate-private macros shared by the layers.

/// The `get_ref`, `get_mut` and `into_inner` accessors of a service whose wrapped
/// service is its `inner: S` field. Expands inside `impl<S> Service<S> { .. }`.
#[allow(unused_macros)] // a build without any layer has no service
macro_rules! define_inner_service_accessors {
    () => {
        /// Gets a reference to the inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// Gets a mutable reference to the inner service.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes `self`, returning the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

/// A layer module's own `ResponseFuture<F, B>`: the shared gate future (the inner
/// service's future, or a refusal ready at once; see `crate::future`), which on
/// completion copies a value of type `$copy` into the response extensions, behind a
/// type of the module so that the future stays opaque. The doc comment goes first.
#[allow(unused_macros)] // a build without any gate layer has no such future
macro_rules! opaque_response_future {
    ($(#[$doc:meta])* copies $copy:ty) => {
        pin_project_lite::pin_project! {
            $(#[$doc])*
            pub struct ResponseFuture<F, B> {
                #[pin]
                inner: crate::future::ResponseFuture<F, B, $copy>,
            }
        }

        #[allow(dead_code)] // each module uses the constructors it needs
        impl<F, B> ResponseFuture<F, B> {
            /// The inner service's future; `copy` goes into its response's extensions.
            pub(crate) fn inner_with(future: F, copy: Option<$copy>) -> Self {
                Self { inner: crate::future::ResponseFuture::inner_with(future, copy) }
            }

            /// The inner service's future, nothing to copy.
            pub(crate) fn inner(future: F) -> Self {
                Self { inner: crate::future::ResponseFuture::inner(future) }
            }

            /// A refusal, ready now.
            pub(crate) fn rejected(response: http::Response<B>) -> Self {
                Self { inner: crate::future::ResponseFuture::rejected(response) }
            }
        }

        impl<F, B, E> std::future::Future for ResponseFuture<F, B>
        where
            F: std::future::Future<Output = Result<http::Response<B>, E>>,
        {
            type Output = Result<http::Response<B>, E>;

            fn poll(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Self::Output> {
                self.project().inner.poll(cx)
            }
        }

        impl<F, B> std::fmt::Debug for ResponseFuture<F, B> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("ResponseFuture").finish_non_exhaustive()
            }
        }
    };
}
