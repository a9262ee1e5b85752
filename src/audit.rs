//! The audit log: one `tracing` target, one typed schema of events, for every layer.
//!
//! Security-relevant decisions are emitted as `tracing` events on the target
//! [`TARGET`] (`portcullis::audit`), separate from the access log, so they can be
//! routed to their own sink. Every event carries an `event` field whose value is one
//! of [`Event`]'s names ([`Event::as_str`]); the variant's documentation lists the
//! level and the other fields. No other event names exist: every emission in the
//! crate names an [`Event`] variant, and a test fails on one that does not.
//!
//! Field values are never secrets: a key is named by its public id, a token by its
//! `jti`, `sub` and `kid`, a failure by its reason class
//! ([`DenialReason::as_str`](crate::rejection::DenialReason::as_str)). A value a
//! client can influence (a principal id, which for a service token is its `sub`; a
//! token's `jti`, `iss`, `kid`; a key id) is bounded and has its control,
//! bidirectional and invisible characters escaped, by the same function as the
//! access log's fields ([`sanitize`](crate::redact::sanitize) describes it).
//!
//! **Successes are recorded once, by the access log.** A request that passes every
//! layer is one event, the access event ([`access_log`](crate::access_log)), whose
//! `principal` and `auth_method` fields say who it was and how it authenticated
//! (for an API key or a signature, `principal` is the key id), and whose `sub`,
//! `jti` and `kid` fields name a service token. The per-request success events,
//! `auth_succeeded` and `service_token_accepted`, are opt-in: one setting,
//! `audit_successes` on the authentication layer or the stack
//! (`PORTCULLIS_AUDIT_SUCCESSES=true` from the environment), for an audit sink that
//! must list successes on its own. Failures, refusals, throttling, reloads and
//! configuration events are always audit events, `service_token_rejected`
//! included.
//!
//! Fields common to request events: `reason` (a
//! [`DenialReason`](crate::rejection::DenialReason) name), `client_ip`, `principal`
//! (the principal's id) and `method` (`api_key`, `service_token`, `unauthenticated`):
//! the principal's identity is `method` and `principal` together, see
//! [`Principal::identity`](crate::Principal::identity).
//!
//! ```
//! use portcullis::audit::{Event, TARGET};
//!
//! // Route audit events to their own sink with a tracing-subscriber filter such as
//! // `portcullis::audit=info`; alert on the names you care about.
//! assert_eq!(TARGET, "portcullis::audit");
//! assert_eq!(Event::AuthThrottled.as_str(), "auth_throttled");
//! assert!(Event::ALL.iter().any(|e| e.as_str() == "ip_denied"));
//! ```

/// The `tracing` target of every audit event.
pub const TARGET: &str = "portcullis::audit";

macro_rules! events {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// Every audit event this crate emits; the value of its `event` field is
        /// [`as_str`](Event::as_str).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Event {
            $($(#[$doc])* $variant,)*
        }

        impl Event {
            /// Every event, in the order of this page.
            pub const ALL: &'static [Event] = &[$(Event::$variant,)*];

            /// The value of the event's `event` field, e.g. `auth_failed`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Event::$variant => $name,)*
                }
            }
        }
    };
}

events! {
    /// `INFO`, [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer): a
    /// credential was refused. Fields: `reason` (`unknown_key`, `expired_key`,
    /// `invalid_token`, ...), `client_ip`, `key_id` (the public id of a known key that
    /// was expired, revoked or not yet valid).
    AuthFailed => "auth_failed",
    /// `INFO`, [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer), **opt-in**
    /// ([`AuthenticateLayer::audit_successes`](crate::authenticate::AuthenticateLayer::audit_successes),
    /// [`StackBuilder::audit_successes`](crate::stack::StackBuilder::audit_successes)):
    /// a credential was accepted: an API key, a service token, or the signature a
    /// [`VerifySignatureLayer`](crate::signature::VerifySignatureLayer) outside it
    /// verified (`method` `http_signature`). Fields: `principal`, `method`,
    /// `client_ip`. Without the opt-in, the access event of the request records the
    /// same facts.
    AuthSucceeded => "auth_succeeded",
    /// `WARN`, at construction: the unauthenticated mode
    /// (`allow_unauthenticated_requests_dangerously`) lets every request in. Fields:
    /// `scopes` (granted to every request).
    AuthenticationDisabled => "authentication_disabled",
    /// `INFO`, [`AuthThrottleLayer`](crate::auth_throttle::AuthThrottleLayer): a
    /// wrong credential from an address past its failure quota got 429 (in the
    /// lockout mode: any request from it, before verification). Fields: `reason`,
    /// `client_ip`, `retry_after` (seconds), `credential_checked` (false in the
    /// lockout mode).
    AuthThrottled => "auth_throttled",
    /// `INFO`, [`AuthThrottleLayer`](crate::auth_throttle::AuthThrottleLayer): a
    /// valid credential from a throttled address was let in (a shared address, or a
    /// guess that succeeded: alert on it). Fields: `principal`, `method`, `client_ip`.
    AuthSucceededWhileThrottled => "auth_succeeded_while_throttled",
    /// `WARN`, at construction of the stack: failed-authentication throttling was
    /// turned off (`disable_auth_throttle_dangerously`).
    AuthThrottleDisabled => "auth_throttle_disabled",
    /// `INFO`, [`IpAllowlistLayer`](crate::allowlist::IpAllowlistLayer): the client
    /// address is outside the allowlist, inside the deny list, or unknown. Fields:
    /// `reason` (`ip_denied`, `no_client_ip`), `client_ip`. From
    /// [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer), for a key with an
    /// allowlist of its own: `reason` `key_ip_denied`, `principal`, `method`,
    /// `client_ip`.
    IpDenied => "ip_denied",
    /// `INFO` (`ERROR` when misconfigured),
    /// [`RequireScopeLayer`](crate::scope::RequireScopeLayer): the principal lacks a
    /// required scope or authenticated by a method the route does not accept.
    /// Fields: `reason` (`insufficient_scope`; `auth_method_not_allowed`;
    /// `missing_credential` when no authentication layer ran; `misconfigured`),
    /// `principal`, `method`, `scope` (the required scopes), `allowed_methods` (with
    /// `auth_method_not_allowed`), `client_ip`.
    ScopeDenied => "scope_denied",
    /// `INFO`, [`RateLimitLayer`](crate::rate_limit::RateLimitLayer): a request
    /// exceeded its quota (also in shadow mode, where it was let through). Fields:
    /// `reason`, `policy`, `principal`, `method`, `client_ip`, `retry_after`
    /// (seconds), `shadow`.
    RateLimited => "rate_limited",
    /// `INFO`, [`RateLimitLayer`](crate::rate_limit::RateLimitLayer): a key with
    /// usage credits has none left; the request got 429. Fields: `reason`
    /// (`credits_exhausted`), `principal`, `method`, `client_ip`, `credits` (the
    /// key's total).
    CreditsExhausted => "credits_exhausted",
    /// `ERROR`, once per [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer):
    /// a key with usage credits was refused (500) because no layer inside is declared
    /// to spend them
    /// ([`credits_spent_inside`](crate::authenticate::AuthenticateLayer::credits_spent_inside)).
    /// Fields: `reason` (`misconfigured`), `principal`, `method`.
    CreditsUnenforced => "credits_unenforced",
    /// `WARN`, at construction: the rate limiter is in shadow mode (counts and logs,
    /// never refuses).
    RateLimitShadowMode => "rate_limit_shadow_mode",
    /// `WARN`, the Redis backend: its circuit breaker opened; the failure policy
    /// applies until it closes. Fields: `backend`, `namespace`, `error` (a class, as
    /// for `rate_limit_backend_connect_failed`), `failure_policy`, `cooldown_ms`.
    RateLimitBackendDown => "rate_limit_backend_down",
    /// `INFO`, the Redis backend: the breaker closed again. Fields: `backend`,
    /// `namespace`.
    RateLimitBackendRecovered => "rate_limit_backend_recovered",
    /// `WARN`, the Redis backend: connecting (TCP, TLS, `AUTH`, loading the script)
    /// failed, once per outage; requests follow the failure policy meanwhile and
    /// never wait for a connection. Fields: `backend`, `namespace`, `error` (a class
    /// such as `timeout`, `tls_untrusted_certificate`, `authentication_failed`; never
    /// the error's text or the URL), `connect_timeout_ms`.
    RateLimitBackendConnectFailed => "rate_limit_backend_connect_failed",
    /// `INFO`, [`TokenVerifier`](crate::jwt::TokenVerifier) (feature `jwt`): a service
    /// token was accepted. Fields: `sub`, `iss`, `kid`, `jti`, `scopes`, `cached`.
    /// Behind an [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer),
    /// **opt-in** with `auth_succeeded` (the same setting); the access event records
    /// the token's `sub`, `jti` and `kid` either way. A direct call of
    /// [`TokenVerifier::verify`](crate::jwt::TokenVerifier::verify) always emits it.
    ServiceTokenAccepted => "service_token_accepted",
    /// `INFO`, [`TokenVerifier`](crate::jwt::TokenVerifier): a service token was
    /// refused. Fields: `reason` (the check that failed, e.g. `expired`,
    /// `bad_signature`, `algorithm_mismatch`; never on the wire).
    ServiceTokenRejected => "service_token_rejected",
    /// `INFO`, [`TokenVerifier::replace_keys`](crate::jwt::TokenVerifier::replace_keys):
    /// a key set given in code was swapped in. Fields: `keys` (count).
    ServiceTokenKeysReplaced => "service_token_keys_replaced",
    /// `ERROR`, [`TokenVerifier::replace_keys`](crate::jwt::TokenVerifier::replace_keys):
    /// a key set given in code was refused; the keys in force stay. Fields: `error`.
    ServiceTokenKeysReplaceFailed => "service_token_keys_replace_failed",
    /// `INFO`, [`reload`](crate::reload): a changed key file (API keys or service-token
    /// keys) was loaded and swapped in. Fields: `source` (`api_keys`,
    /// `service_tokens`), `path`, `keys` (count).
    KeyFileReloaded => "key_file_reloaded",
    /// `ERROR`, [`reload`](crate::reload): a changed key file could not be read or was
    /// refused; the keys in force stay and the file is read again on the next poll.
    /// Fields: `source`, `path`, `error` (what is wrong and where, never a key).
    KeyFileReloadFailed => "key_file_reload_failed",
    /// `INFO`, [`RemoteIssuer`](crate::jwt::RemoteIssuer) (feature `jwks-remote`): a
    /// fetched JWK Set differs from the one in force and replaced it (keys removed
    /// upstream stop verifying). Fields: `issuer` (`scheme://host[:port]/path`: never
    /// a URL's user information or query, here and below), `keys` (count).
    RemoteKeysUpdated => "remote_keys_updated",
    /// `ERROR`, [`RemoteIssuer`](crate::jwt::RemoteIssuer): fetching the discovery
    /// document or the JWK Set failed or gave an invalid document; the keys in force
    /// stay until the maximum staleness. Fields: `issuer`, `url` (the origin),
    /// `error` (`connect`, `timeout`, `redirect`, `status`, `content_type`,
    /// `too_large`, `http`, `invalid_document`, `refused`), `detail`.
    RemoteKeysFetchFailed => "remote_keys_fetch_failed",
    /// `ERROR`, [`RemoteIssuer`](crate::jwt::RemoteIssuer): no fetch succeeded within
    /// the maximum staleness; the issuer's tokens are refused until one does. Fields:
    /// `issuer`, `max_staleness_secs`.
    RemoteKeysExpired => "remote_keys_expired",
}

/// Emits an audit event on [`TARGET`]: `emit!(level, Variant, fields...)`, where
/// `Variant` names an [`Event`] (an unknown name does not compile) and the fields
/// follow `tracing`'s syntax.
#[allow(unused_macros)]
macro_rules! emit {
    ($level:ident, $event:ident $(, $($field:tt)+)?) => {
        ::tracing::$level!(
            target: $crate::audit::TARGET,
            event = $crate::audit::Event::$event.as_str()
            $(, $($field)+)?
        )
    };
}
#[allow(unused_imports)] // without features, no layer emits audit events
pub(crate) use emit;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::path::Path;

    #[test]
    fn names_are_unique_snake_case() {
        let mut seen = HashSet::new();
        for e in Event::ALL {
            let name = e.as_str();
            assert!(seen.insert(name), "{name} twice");
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
        }
    }

    /// Every audit emission in the crate goes through `emit!`, which only takes an
    /// [`Event`] variant: the schema is the whole list of names.
    #[test]
    fn every_audit_event_in_the_sources_is_in_the_schema() {
        fn visit(dir: &Path, offenders: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    visit(&path, offenders);
                } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("audit.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (i, line) in text.lines().enumerate() {
                        let code = !line.trim_start().starts_with("//");
                        if code && (line.contains("audit::TARGET") || line.contains("event = \"")) {
                            offenders.push(format!("{}:{}: {line}", path.display(), i + 1));
                        }
                    }
                }
            }
        }
        let mut offenders = Vec::new();
        visit(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut offenders,
        );
        assert!(
            offenders.is_empty(),
            "audit events emitted outside audit::emit! (so outside the schema):\n{}",
            offenders.join("\n")
        );
    }
}
