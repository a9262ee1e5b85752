//! The audit log: one `tracing` target, one field schema, for every layer.
//!
//! Security-relevant decisions are emitted as `tracing` events on the target
//! [`TARGET`] (`portcullis::audit`), separate from the access log, so they can be
//! routed to their own sink. Every event carries an `event` field naming what
//! happened; the other fields depend on the event and are listed in the README
//! ("Audit events"). Field values are never secrets: a key is named by its public
//! id, a token by its `jti`, `sub` and `kid`, a failure by its reason class
//! ([`DenialReason::as_str`](crate::rejection::DenialReason::as_str)). A value a
//! client can influence (a principal id, which for a service token is its `sub`; a
//! token's `jti`, `iss`, `kid`; a key id) is bounded and has its control,
//! bidirectional and invisible characters escaped, by the same function as the
//! access log's fields ([`sanitize`](crate::redact::sanitize) describes it).
//!
//! ```
//! // Route audit events to their own sink with a tracing-subscriber filter such as
//! // `portcullis::audit=info`.
//! assert_eq!(portcullis::audit::TARGET, "portcullis::audit");
//! ```

/// The `tracing` target of every audit event.
pub const TARGET: &str = "portcullis::audit";
