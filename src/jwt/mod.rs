//! Service tokens: short-lived JWTs between services, both sides.
//!
//! - Receiving side: [`TokenVerifier`] checks a compact JWS against a [`KeySet`] and
//!   returns the caller's [`Principal`](crate::Principal)
//!   ([`AuthMethod::ServiceToken`](crate::AuthMethod::ServiceToken), id = `sub`,
//!   scopes from `scope` or `scp`). Keys come from code ([`VerifyingKey`]), PEM and
//!   JWK / JWKS files ([`KeyFile`], reloaded while the
//!   [`ReloadHandle`](crate::reload::ReloadHandle) of
//!   [`TokenVerifier::watch_key_files`] lives; see [`reload`](crate::reload)). A key
//!   id keeps its algorithm for the life of the verifier, and `oct` (HMAC) keys are
//!   read from files only after
//!   [`allow_symmetric_keys_from_files`](TokenVerifierBuilder::allow_symmetric_keys_from_files).
//!   A verified token is cached until its `exp` plus the leeway, the second from
//!   which the verifier refuses it. With the feature `jwks-remote`, keys also come
//!   from a JWK Set URL or an OpenID Connect issuer ([`RemoteIssuer`], with presets
//!   for Google ID tokens and Kubernetes service-account tokens), each issuer with
//!   its own audiences and principal mapping.
//! - Sending side: [`TokenIssuer`] mints tokens, and [`BearerTokenLayer`] attaches
//!   one to every outgoing request, re-minting before it expires.
//!
//! Every key is pinned to one [`Algorithm`] and a token's `alg` must equal its key's:
//! `alg: none` matches no key, and an HS256 key can only be made from a secret, so a
//! token "signed" with a public key's bytes as an HMAC secret matches nothing.
//! Signatures are checked with `jsonwebtoken` and its pure-Rust (`rust_crypto`)
//! backend; the parsing around it is this crate's own and strict (one JSON object
//! per part, no duplicate members in any object, integer times only), fuzzed and
//! property-tested. Key documents (JWK, JWK Set) are read as strictly.
//!
//! A failure is a [`TokenRejection`]: the class of the failure, for the audit log.
//! The client sees only "invalid token" (RFC 6750).
//!
//! ```
//! use std::time::Duration;
//! use portcullis::jwt::{KeyFile, TokenVerifier, VerifyingKey};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("portcullis-jwt-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let path = dir.join("jwks.json");
//! # std::fs::write(&path, r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"ci-1","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#).unwrap();
//! let verifier = TokenVerifier::builder()
//!     .key_file(KeyFile::jwks(&path))
//!     .issuer("https://ci.example")
//!     .audience("jobs-api")
//!     .allowed_subjects(["scheduler", "coordinator"])
//!     .max_lifetime(Duration::from_secs(15 * 60))
//!     .build()?;
//! // Follow the JWKS while `reloading` lives; a broken file keeps the keys in force.
//! let reloading = verifier.watch_key_files(Duration::from_secs(5))?;
//! # drop(reloading);
//! # Ok(())
//! # }
//! ```

mod cache;
mod client;
#[cfg(feature = "jwks-remote")]
mod fetch;
mod issue;
mod keys;
#[cfg(feature = "jwks-remote")]
pub(crate) mod oidc;
mod parse;
#[cfg(feature = "jwks-remote")]
mod remote;
#[cfg(test)]
mod tests;
mod time;
mod verify;

use std::fmt;

pub use client::{BearerToken, BearerTokenError, BearerTokenLayer, ResponseFuture};
pub use issue::{
    DEFAULT_LIFETIME, MIN_LIFETIME, MintError, MintedToken, SigningKey, TokenIssuer,
    TokenIssuerBuilder,
};
pub use keys::{Algorithm, KeySet, MIN_HMAC_SECRET_LEN, VerifyingKey};
pub use parse::DEFAULT_MAX_TOKEN_LEN;
pub(crate) use parse::{looks_like_jwt, parse_claims, parse_compact};
#[cfg(all(feature = "jwks-remote", feature = "stack"))]
pub(crate) use remote::check_root_certificates;
#[cfg(feature = "jwks-remote")]
pub use remote::{GOOGLE_ISSUER, GOOGLE_JWKS_URL, PrincipalClaim, RemoteIssuer, RemoteStart};
pub use verify::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_LEEWAY, DEFAULT_MAX_LIFETIME, KeyFile, TokenVerifier,
    TokenVerifierBuilder, VerifiedToken,
};

/// Why a service token was refused: a class for the audit log, never the token or
/// which value failed. Every class gets the same response on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenRejection {
    /// Longer than the configured cap; refused before any decoding.
    TooLarge,
    /// Not three base64url parts, or a header or claims set that is not one JSON
    /// object without duplicate members, or a header field of the wrong type.
    Malformed,
    /// The header carries `crit`: no extension is understood.
    UnsupportedHeader,
    /// No key has the token's `kid`, or the token has no `kid` and the set holds
    /// several keys.
    UnknownKey,
    /// The token's `alg` is not the algorithm its key is pinned to (`none` included).
    AlgorithmMismatch,
    /// The signature does not verify.
    BadSignature,
    /// `typ` is missing or not the required one.
    WrongType,
    /// One of `exp`, `iat`, `iss`, `sub`, `aud` is missing.
    MissingClaim,
    /// A claim has the wrong type or form (a time as a string or a float, a time
    /// before 1970 or after the year 9999, an invalid scope token, `exp` not after
    /// `iat`, both `scope` and `scp`).
    InvalidClaims,
    /// `iss` is missing from the accepted issuers, or not the one its key is bound to.
    WrongIssuer,
    /// `aud` does not contain our audience.
    WrongAudience,
    /// At or past `exp` plus the leeway.
    Expired,
    /// Before `nbf` minus the leeway.
    NotYetValid,
    /// `iat` later than now plus the leeway.
    IssuedInFuture,
    /// `exp - iat` longer than the maximum lifetime.
    LifetimeTooLong,
    /// The principal id (`sub`, or the email for an issuer mapped by email) is not
    /// in the allowed-subject list, nor in the issuer's scope mapping when it has one.
    SubjectNotAllowed,
    /// The issuer's principal is its `email`, and the token lacks
    /// `email_verified: true`.
    EmailNotVerified,
    /// The token's issuer takes its keys from a URL and none are in force: not
    /// fetched yet, or the last successful fetch is older than the maximum
    /// staleness.
    KeysUnavailable,
}

impl TokenRejection {
    /// A stable snake_case name for logs, e.g. `bad_signature`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRejection::TooLarge => "too_large",
            TokenRejection::Malformed => "malformed",
            TokenRejection::UnsupportedHeader => "unsupported_header",
            TokenRejection::UnknownKey => "unknown_key",
            TokenRejection::AlgorithmMismatch => "algorithm_mismatch",
            TokenRejection::BadSignature => "bad_signature",
            TokenRejection::WrongType => "wrong_type",
            TokenRejection::MissingClaim => "missing_claim",
            TokenRejection::InvalidClaims => "invalid_claims",
            TokenRejection::WrongIssuer => "wrong_issuer",
            TokenRejection::WrongAudience => "wrong_audience",
            TokenRejection::Expired => "expired",
            TokenRejection::NotYetValid => "not_yet_valid",
            TokenRejection::IssuedInFuture => "issued_in_future",
            TokenRejection::LifetimeTooLong => "lifetime_too_long",
            TokenRejection::SubjectNotAllowed => "subject_not_allowed",
            TokenRejection::EmailNotVerified => "email_not_verified",
            TokenRejection::KeysUnavailable => "keys_unavailable",
        }
    }
}

impl fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service token rejected: {}", self.as_str())
    }
}

impl std::error::Error for TokenRejection {}
