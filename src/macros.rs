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
