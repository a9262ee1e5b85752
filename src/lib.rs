//! # portcullis
//!
//! Composable [tower](https://docs.rs/tower) layers that guard the front door of a hyper-based service
//! (plain hyper 1, axum, tonic). Each layer does one check, is usable on its own, and
//! refuses a request with a generic `application/problem+json` response that never
//! echoes what the client sent.
//!
//! The request path, outermost first:
//!
//! | layer | module | what it does |
//! |---|---|---|
//! | [`RequestIdLayer`](request_id::RequestIdLayer) | [`request_id`] | accept a safe incoming `x-request-id` or make one; echo it on the response |
//! | [`AccessLogLayer`](access_log::AccessLogLayer) | [`access_log`] | one redacted `tracing` event per request, refusals included |
//! | [`ClientIpLayer`](client_ip::ClientIpLayer) | [`client_ip`] | resolve the real client address once: the TCP peer, or a forwarded header when the peer is a trusted proxy |
//! | [`IpAllowlistLayer`](allowlist::IpAllowlistLayer) | [`allowlist`] | 403 unless the client address is inside the allowed CIDRs |
//! | [`AuthenticateLayer`](authenticate::AuthenticateLayer) | [`authenticate`], [`api_key`] | verify the request's API key and insert its [`Principal`], else 401 (400 for a malformed credential) |
//! | [`RequireScopeLayer`](scope::RequireScopeLayer) | [`scope`] | per route: 403 `insufficient_scope` unless the [`Principal`] holds the scopes (and, where named, authenticated by an accepted method) |
//! | `TokenVerifier` / `BearerTokenLayer` (feature `jwt`) | `jwt` | verify service tokens (JWT) into a [`Principal`]; mint and attach them on outgoing requests |
//! | [`AuthThrottleLayer`](auth_throttle::AuthThrottleLayer) | [`auth_throttle`] | 429 to wrong credentials from a client address after too many failed authentications; valid credentials still pass (a lockout mode refuses before verification) |
//! | [`RateLimitLayer`](rate_limit::RateLimitLayer) | [`rate_limit`] | per-principal (else per-address) quotas: 429 with `Retry-After` and the IETF `RateLimit` fields; in memory or shared through Redis |
//! | [`StackLayer`](stack::StackLayer) | [`stack`] | all of the above in this order as one layer, from code or `PORTCULLIS_*` environment variables; refuses to build without credentials |
//!
//! Layers talk to each other through request extensions: [`ClientIp`] and
//! [`Principal`]. A gRPC call is refused the gRPC way (see [`rejection`]). Every refusal is built by one module, [`rejection`], so every layer
//! answers in the same shape.
//!
//! ## Example
//!
//! Plain hyper has no peer address in the request: attach it per connection with
//! [`PeerAddrLayer`](client_ip::PeerAddrLayer), then resolve and check it.
//!
//! ```
//! # #[cfg(all(feature = "client-ip", feature = "allowlist"))]
//! # fn main() -> Result<(), portcullis::ConfigError> {
//! use std::convert::Infallible;
//! use std::net::SocketAddr;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use portcullis::allowlist::IpAllowlistLayer;
//! use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddrLayer};
//! use portcullis::{ClientIp, IpSet};
//! use tower::ServiceBuilder;
//!
//! let client_ip = ClientIpLayer::new(ClientIpConfig::trusted_proxies("10.0.0.0/8")?);
//! let allowlist = IpAllowlistLayer::new(IpSet::parse("10.0.0.0/8, 192.168.0.0/16")?);
//!
//! // Per accepted connection:
//! let peer: SocketAddr = "10.1.2.3:51000".parse().unwrap();
//! let service = ServiceBuilder::new()
//!     .layer(PeerAddrLayer::new(peer))
//!     .layer(client_ip.clone())
//!     .layer(allowlist.clone())
//!     .service_fn(|req: Request<Full<Bytes>>| async move {
//!         let ip = req.extensions().get::<ClientIp>().copied();
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{ip:?}")))))
//!     });
//! # let _ = service;
//! # Ok(())
//! # }
//! # #[cfg(not(all(feature = "client-ip", feature = "allowlist")))]
//! # fn main() {}
//! ```
//!
//! ## Response bodies
//!
//! A layer that refuses a request builds the body itself, in the inner service's
//! body type: the body type passes through unchanged, so stacking layers never nests
//! body types. The bound is [`RefusalBody`](rejection::RefusalBody), which every
//! `Default` body meets: `http_body_util::Full<Bytes>`, `axum::body::Body` and
//! `tonic::body::Body` among them. [`rejection`] lists which bodies carry the
//! problem document.
//!
//! ## Features
//!
//! Each layer sits behind its own cargo feature; all features are additive.
//!
//! - `client-ip` (default): [`client_ip`].
//! - `allowlist` (default): [`allowlist`].
//! - `authenticate`: [`authenticate`] and [`scope`] (the layers, without a verifier).
//! - `api-key` (default): [`api_key`], API keys for [`authenticate`].
//! - `cli`: the `portcullis` command (`keygen`, `hash`, `check`) for key files.
//! - `jwt`: service tokens (`jwt`): verifier, issuer and client-side layer.
//! - `rate-limit` (default): [`rate_limit`].
//! - `auth-throttle` (default): [`auth_throttle`], failed-authentication throttling per client address.
//! - `redis`: share rate limits between instances through Redis; `redis-tls` adds `rediss://`.
//! - `request-id` (default): [`request_id`].
//! - `access-log` (default): [`access_log`].
//! - `redact` (default): [`redact`], the redactor the access log uses.
//! - `redact-writer`: for `tracing-subscriber`, [`RedactingJson`](redact::RedactingJson),
//!   a JSON event format that scrubs every line, and
//!   [`RedactingMakeWriter`](redact::RedactingMakeWriter), a writer that scrubs what
//!   any format writes.
//! - `axum`: accept axum's `ConnectInfo<SocketAddr>` as the peer address;
//!   [`extract`]: [`Principal`], [`ClientIp`] and verified tokens as handler arguments.
//! - `tonic`: accept the `TcpConnectInfo` tonic's server attaches as the peer address.
//! - `stack` (default): [`stack`], the whole stack as one layer ([`StackLayer`](stack::StackLayer)).
//!
//! ## The public API
//!
//! Everything public is listed, one item per line, in `public-api.txt` at the root of
//! the repository, and CI regenerates that listing and fails on any difference: every
//! change to the public surface is a visible diff in review. Parsers, walkers and
//! other internals are crate-private. The shared request extensions ([`ClientIp`],
//! [`Principal`], [`Scopes`], [`AuthMethod`]), [`IpSet`] and [`ConfigError`] have one
//! path each, at the crate root.
//!
//! `portcullis::fuzzing` holds the entry points of the cargo-fuzz targets in `fuzz/`.
//! It is hidden from these docs and left out of the listing: it is not part of the
//! API and may change in any release.
//!
//! After an intended change to the surface, regenerate the listing (it needs the
//! nightly toolchain, which builds the rustdoc JSON it reads) and commit it with the
//! change:
//!
//! ```text
//! cargo install --locked cargo-public-api --version 0.52.0   # once
//! cargo public-api --package portcullis --all-features -sss > public-api.txt
//! ```
//!
//! ## What portcullis does not protect against
//!
//! [`threat_model`] says, layer by layer, what each defends against and what it
//! leaves to you (TLS, body limits, authorisation beyond scopes, attackers inside an
//! allowed network).
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations, rust_2018_idioms)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[macro_use]
mod macros;

pub mod audit;
mod error;
mod future;
mod ip;
#[cfg(any(feature = "api-key", feature = "redact"))]
mod key_format;
#[cfg(any(feature = "redact", feature = "authenticate", feature = "rate-limit"))]
mod log_text;
mod principal;
pub mod rejection;

#[cfg(feature = "client-ip")]
pub mod client_ip;

#[cfg(feature = "allowlist")]
pub mod allowlist;

#[cfg(feature = "authenticate")]
pub mod authenticate;

#[cfg(feature = "authenticate")]
pub mod scope;

#[cfg(feature = "api-key")]
pub mod api_key;
#[cfg(feature = "jwt")]
pub mod jwt;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(any(feature = "api-key", feature = "jwt"))]
pub mod reload;

#[cfg(feature = "auth-throttle")]
pub mod auth_throttle;

#[cfg(feature = "signature")]
pub mod signature;

#[doc(hidden)]
pub mod fuzzing;

// Each feature set's tests use part of it.
#[cfg(test)]
#[allow(dead_code)]
mod test_support;

#[cfg(feature = "redact-writer")]
mod civil;

#[cfg(feature = "request-id")]
pub mod request_id;

#[cfg(feature = "access-log")]
pub mod access_log;

#[cfg(feature = "redact")]
pub mod redact;

#[cfg(feature = "stack")]
pub mod stack;

#[cfg(feature = "axum")]
pub mod extract;

#[doc = include_str!("../SECURITY.md")]
pub mod threat_model {}

pub use error::ConfigError;
pub use ip::{ClientIp, IpSet};
pub use principal::{AuthMethod, Principal, Scopes};

/// The README's examples are compiled and run as doc tests (they use the stack and
/// the axum extractors).
#[cfg(all(doctest, feature = "stack", feature = "axum"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
