//! Integration tests: real hyper servers on loopback, driven over TCP.
//!
//! One test binary (modules below) keeps link time down.

mod common;
mod log_capture;

#[cfg(feature = "allowlist")]
mod allowlist;
#[cfg(feature = "api-key")]
mod api_key_properties;
#[cfg(all(feature = "rate-limit", feature = "api-key"))]
mod auth_throttle;
#[cfg(all(feature = "redis", feature = "auth-throttle", feature = "api-key"))]
mod auth_throttle_redis;
#[cfg(all(feature = "api-key", feature = "client-ip"))]
mod authenticate;
#[cfg(all(feature = "axum", feature = "stack"))]
mod axum;
#[cfg(feature = "client-ip")]
mod client_ip;
mod fuzz_corpus;
#[cfg(all(feature = "stack", feature = "tonic"))]
mod grpc;
#[cfg(feature = "jwks-remote")]
mod jwks;
#[cfg(feature = "jwt")]
mod jwt;
#[cfg(all(feature = "api-key", feature = "rate-limit", feature = "client-ip"))]
mod key_policy;
#[cfg(all(feature = "access-log", feature = "allowlist"))]
mod logging;
#[cfg(feature = "rate-limit")]
mod rate_limit;
#[cfg(feature = "redis")]
mod rate_limit_redis;
#[cfg(feature = "redact")]
mod redact_properties;
#[cfg(all(feature = "api-key", feature = "jwt", feature = "client-ip"))]
mod reload;
#[cfg(all(feature = "signature", feature = "api-key", feature = "client-ip"))]
mod signature;
#[cfg(feature = "stack")]
mod stack;
