//! Integration tests: real hyper servers on loopback, driven over TCP.
//!
//! One test binary (modules below) keeps link time down.

mod common;
mod log_capture;

#[cfg(feature = "allowlist")]
mod allowlist;
#[cfg(feature = "client-ip")]
mod client_ip;
#[cfg(feature = "fuzzing")]
mod fuzz_corpus;
#[cfg(all(feature = "access-log", feature = "allowlist"))]
mod logging;
#[cfg(feature = "client-ip")]
mod properties;
#[cfg(feature = "redact")]
mod redact_properties;
