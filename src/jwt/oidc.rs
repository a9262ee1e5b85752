//! The parsers of remote key sources: fetch URLs, the OpenID Connect discovery
//! document, a fetched JWK Set, `Cache-Control` and `Content-Type`. Plain functions
//! over strings and bytes, fuzzed and property-tested; the fetcher only decides.

use std::fmt;
use std::net::IpAddr;

use http::Uri;
use serde_json::Value;

use super::keys::{Algorithm, KeySet, VerifyingKey, keys_from_jwks};
use super::parse::unique_object;
use crate::ConfigError;

/// The path OpenID Connect Discovery 1.0 §4 appends to an issuer.
pub(crate) const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// A configured URL (an issuer, a JWK Set or discovery URL) as every error, log
/// event and `Debug` of the remote-key code shows it: `scheme://host[:port]/path`.
/// User information, the query and the fragment are left out, since each can carry
/// a credential (`https://svc:password@…`, `?access_token=…`).
///
/// A string that is not plainly such a URL is not shown at all (`<URL not shown>`):
/// one that does not start with a scheme (a letter, then letters, digits, `+`, `-`
/// or `.`) and `://`, with a character that is not printable ASCII, or with an `@`
/// past the authority, where a user information holding `/`, `?` or `#` may have
/// ended (`https://svc:pa/ss@host`): there, which part is the host is a guess.
#[derive(Clone, Copy)]
pub(crate) struct ShownUrl<'a>(pub(crate) &'a str);

/// What [`ShownUrl`] shows for a string that is not plainly a URL.
const NOT_SHOWN: &str = "<URL not shown>";

impl<'a> ShownUrl<'a> {
    /// The scheme, the host with its port, and the path (empty or from `/`).
    fn parts(self) -> Option<(&'a str, &'a str, &'a str)> {
        let (scheme, rest) = self.0.split_once("://")?;
        // A `://` after anything but a scheme is in a path or query
        // (`https:/u:pw@h/?r=https://x`): what comes before it is not a scheme.
        let is_scheme = scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        if !self.0.bytes().all(|b| b.is_ascii_graphic()) || !is_scheme {
            return None;
        }
        let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        if tail.contains('@') {
            return None;
        }
        // The user information ends at the authority's last `@`.
        let host = authority.rsplit('@').next().unwrap_or(authority);
        let path = &tail[..tail.find(['?', '#']).unwrap_or(tail.len())];
        Some((scheme, host, path))
    }
}

impl fmt::Display for ShownUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.parts() {
            Some((scheme, host, path)) => write!(f, "{scheme}://{host}{path}"),
            None => f.write_str(NOT_SHOWN),
        }
    }
}

impl fmt::Debug for ShownUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A URL the fetcher may request: `https://host[:port]/path[?query]`, or
/// `http://` to a loopback host when plain HTTP was allowed. `Debug` shows it as
/// [`ShownUrl`] does, without the query.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct FetchUrl {
    /// TLS (`https`) or not.
    pub(crate) tls: bool,
    /// The host as it is resolved and named in TLS: no brackets around IPv6.
    pub(crate) host: Box<str>,
    pub(crate) port: u16,
    /// The `Host` header: the authority as written.
    pub(crate) authority: Box<str>,
    /// The request target: path and query, `/` when empty.
    pub(crate) target: Box<str>,
}

impl FetchUrl {
    /// `scheme://authority`, for logs and for comparing origins.
    pub(crate) fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl fmt::Debug for FetchUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = format!("{}{}", self.origin(), self.target);
        f.debug_tuple("FetchUrl").field(&ShownUrl(&url)).finish()
    }
}

/// Whether `host` (without brackets) names the loopback interface.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Parses a fetch URL. Refused: a scheme other than `https` (or `http` to a
/// loopback host when `loopback_http`), no host, user information, a fragment,
/// port 0, and anything `http::Uri` does not accept. Errors say what is wrong
/// without repeating the URL.
pub(crate) fn parse_url(s: &str, loopback_http: bool) -> Result<FetchUrl, &'static str> {
    if s.contains('#') {
        return Err("a fetch URL has no fragment");
    }
    let uri: Uri = s.parse().map_err(|_| "not a valid absolute URL")?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("the URL must start with https://"),
    };
    let authority = uri.authority().ok_or("the URL has no host")?;
    if authority.as_str().contains('@') {
        return Err("the URL carries user information");
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err("the URL has no host");
    }
    let allowed_plain = loopback_http && is_loopback_host(host);
    if !tls && !allowed_plain {
        return Err(
            "the URL must start with https:// (plain http only to a loopback host, when allowed)",
        );
    }
    let port = match authority.port_u16() {
        Some(0) => return Err("port 0"),
        Some(p) => p,
        None if authority.as_str().ends_with(':') => return Err("an empty port"),
        None if tls => 443,
        None => 80,
    };
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let target = if target.is_empty() { "/" } else { target };
    Ok(FetchUrl {
        tls,
        host: host.into(),
        port,
        authority: authority.as_str().into(),
        target: target.into(),
    })
}

/// The discovery URL of an issuer: the issuer (an `https` URL without query or
/// fragment; a trailing `/` is dropped) followed by [`DISCOVERY_PATH`].
pub(crate) fn discovery_url(issuer: &str, loopback_http: bool) -> Result<FetchUrl, &'static str> {
    let url = parse_url(issuer, loopback_http)?;
    if url.target.contains('?') {
        return Err("an issuer URL has no query");
    }
    let base = issuer.strip_suffix('/').unwrap_or(issuer);
    parse_url(&format!("{base}{DISCOVERY_PATH}"), loopback_http)
}

/// Reads an OpenID Connect discovery document: one JSON object without duplicate
/// members whose `issuer` is exactly `issuer` (OpenID Connect Discovery 1.0 §4.3)
/// and whose `jwks_uri` is a fetch URL. Other members are ignored.
pub(crate) fn parse_discovery(
    bytes: &[u8],
    issuer: &str,
    loopback_http: bool,
) -> Result<FetchUrl, &'static str> {
    let members =
        unique_object(bytes).map_err(|_| "the discovery document is not one JSON object")?;
    let mut found_issuer = None;
    let mut jwks_uri = None;
    for (name, value) in members {
        match (name.as_str(), value) {
            ("issuer", Value::String(s)) => found_issuer = Some(s),
            ("jwks_uri", Value::String(s)) => jwks_uri = Some(s),
            ("issuer" | "jwks_uri", _) => {
                return Err("`issuer` or `jwks_uri` is not a string");
            }
            _ => {}
        }
    }
    if found_issuer.as_deref() != Some(issuer) {
        return Err("the document's `issuer` is not the configured issuer");
    }
    let jwks_uri = jwks_uri.ok_or("the document has no `jwks_uri`")?;
    parse_url(&jwks_uri, loopback_http).map_err(|_| "`jwks_uri` is not an https URL")
}

/// Reads a fetched JWK Set: UTF-8, a `{"keys": [...]}` object (a single JWK is not
/// a set) with no member name repeated in any object, at least one key, every key valid for verification under the rules of
/// [`VerifyingKey::from_jwk`] (no `use: enc`, no key without a pinnable algorithm,
/// no private member), no `oct` (HMAC) key (a secret is never fetched), and the
/// set rules of [`KeySet::new`]. One bad key refuses the whole document.
pub(crate) fn parse_remote_jwks(bytes: &[u8]) -> Result<Vec<VerifyingKey>, ConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::new("not UTF-8"))?;
    let is_set = unique_object(bytes)
        .map_err(|_| ConfigError::new("not one JSON object without duplicate members"))?
        .iter()
        .any(|(name, v)| name == "keys" && v.is_array());
    if !is_set {
        return Err(ConfigError::new("not a JWK Set: no `keys` array"));
    }
    let keys = keys_from_jwks(text)?;
    if keys.is_empty() {
        return Err(ConfigError::new("the JWK Set is empty"));
    }
    if let Some(i) = keys.iter().position(|k| k.alg == Algorithm::HS256) {
        return Err(ConfigError::new(format!(
            "JWK {}: an `oct` (HMAC) key is never accepted from a URL",
            i + 1
        )));
    }
    KeySet::new(keys.iter().cloned())?;
    Ok(keys)
}

/// The `max-age` of a `Cache-Control` value, in seconds: `Some(0)` for `no-store`
/// or `no-cache`, `None` when absent, malformed or given twice with different
/// values (the caller's default applies). Directive names are case-insensitive
/// (RFC 9111 §5.2); the value is digits, optionally quoted.
pub(crate) fn cache_max_age(value: &str) -> Option<u64> {
    let mut max_age = None;
    let mut no_cache = false;
    for directive in value.split(',') {
        let directive = directive.trim();
        let (name, arg) = match directive.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (directive, None),
        };
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            no_cache = true;
        } else if name.eq_ignore_ascii_case("max-age") {
            let arg = arg?;
            let arg = arg
                .strip_prefix('"')
                .and_then(|a| a.strip_suffix('"'))
                .unwrap_or(arg);
            if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Past u64: as long as can be (clamped by the caller anyway).
            let secs = arg.parse::<u64>().unwrap_or(u64::MAX);
            match max_age {
                Some(m) if m != secs => return None,
                _ => max_age = Some(secs),
            }
        }
    }
    if no_cache { Some(0) } else { max_age }
}

/// Whether a `Content-Type` value's media type (before any parameter) is one of
/// `allowed`, compared case-insensitively.
pub(crate) fn content_type_is(value: &[u8], allowed: &[&str]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    let media = value.split(';').next().unwrap_or("").trim();
    allowed.iter().any(|a| media.eq_ignore_ascii_case(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn urls() {
        let u = parse_url("https://issuer.example/realms/a?x=1", false).unwrap();
        assert_eq!(
            (u.tls, &*u.host, u.port, &*u.target),
            (true, "issuer.example", 443, "/realms/a?x=1")
        );
        assert_eq!(u.origin(), "https://issuer.example");
        let u = parse_url("https://[::1]:8443", false).unwrap();
        assert_eq!((&*u.host, u.port, &*u.target), ("::1", 8443, "/"));
        assert!(parse_url("http://127.0.0.1:80/x", true).is_ok());
        assert!(parse_url("http://localhost/x", true).is_ok());
        for bad in [
            "http://127.0.0.1/x",
            "http://issuer.example/x",
            "ftp://issuer.example/",
            "https://user:pw@issuer.example/",
            "https:///x",
            "https://issuer.example:0/",
            "https://issuer.example/#frag",
            "/relative",
            "",
            "https://issuer.example:/",
        ] {
            assert!(parse_url(bad, false).is_err(), "{bad}");
        }
        assert!(parse_url("http://issuer.example/", true).is_err());
        let d = discovery_url("https://issuer.example/realms/a/", false).unwrap();
        assert_eq!(&*d.target, "/realms/a/.well-known/openid-configuration");
        assert!(discovery_url("https://issuer.example/?q", false).is_err());
    }

    #[test]
    fn shown_urls_keep_scheme_host_port_and_path_only() {
        let shown = |s| ShownUrl(s).to_string();
        assert_eq!(
            shown("https://svc:Sup3rSecretPw@idp.example.com:8443/jwks?access_token=T#f"),
            "https://idp.example.com:8443/jwks"
        );
        assert_eq!(shown("https://idp.example.com"), "https://idp.example.com");
        assert_eq!(shown("http://[::1]:8080/a/b/?x"), "http://[::1]:8080/a/b/");
        assert_eq!(shown("https://a:b@c@idp.example/"), "https://idp.example/");
        for unclear in [
            "https://svc:pa/ss@idp.example/",
            "https://svc:pa?ss@idp.example/",
            "https://svc:pa#ss@idp.example/",
            "https://idp.example/ pw",
            "idp.example/jwks",
            "",
            "://x",
        ] {
            assert_eq!(shown(unclear), NOT_SHOWN, "{unclear}");
        }
        let u = parse_url("https://idp.example/jwks?access_token=T", false).unwrap();
        assert_eq!(format!("{u:?}"), r#"FetchUrl("https://idp.example/jwks")"#);
    }

    #[test]
    fn discovery_documents() {
        let iss = "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c";
        let doc = format!(
            r#"{{"issuer":"{iss}","jwks_uri":"https://10.0.0.1:443/openid/v1/jwks","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["RS256"]}}"#
        );
        let u = parse_discovery(doc.as_bytes(), iss, false).unwrap();
        assert_eq!(&*u.target, "/openid/v1/jwks");
        assert!(parse_discovery(doc.as_bytes(), &format!("{iss}/"), false).is_err());
        for bad in [
            r#"{"issuer":"https://i.example","jwks_uri":"http://i.example/jwks"}"#,
            r#"{"issuer":"https://i.example"}"#,
            r#"{"issuer":"https://i.example","issuer":"https://i.example","jwks_uri":"https://i.example/k"}"#,
            r#"{"issuer":"https://i.example","jwks_uri":7}"#,
            r#"{"issuer":"https://evil.example","jwks_uri":"https://i.example/k"}"#,
            r#"[]"#,
        ] {
            assert!(
                parse_discovery(bad.as_bytes(), "https://i.example", false).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn remote_jwks_rules() {
        let ed = r#"{"kty":"OKP","crv":"Ed25519","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        assert_eq!(
            parse_remote_jwks(format!(r#"{{"keys":[{ed}]}}"#).as_bytes())
                .unwrap()
                .len(),
            1
        );
        let enc = ed.replace(r#""kid":"a""#, r#""kid":"b","use":"enc""#);
        let oct = r#"{"kty":"oct","alg":"HS256","kid":"h","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}"#;
        let rsa_no_alg = r#"{"kty":"RSA","kid":"r","n":"sXch","e":"AQAB"}"#;
        for bad in [
            r#"{"keys":[]}"#.to_owned(),
            ed.to_owned(),
            format!(r#"{{"keys":[{ed},{enc}]}}"#),
            format!(r#"{{"keys":[{oct}]}}"#),
            format!(r#"{{"keys":[{rsa_no_alg}]}}"#),
            format!(r#"{{"keys":[{ed},{ed}]}}"#),
            format!(r#"{{"keys":[{ed}],"keys":[{ed}]}}"#),
            "not json".to_owned(),
        ] {
            assert!(parse_remote_jwks(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn cache_control() {
        assert_eq!(
            cache_max_age("public, max-age=19845, must-revalidate, no-transform"),
            Some(19845)
        );
        assert_eq!(cache_max_age("Max-Age=\"60\""), Some(60));
        assert_eq!(cache_max_age("no-store"), Some(0));
        assert_eq!(cache_max_age("max-age=60, no-cache"), Some(0));
        assert_eq!(cache_max_age("private"), None);
        assert_eq!(cache_max_age("max-age=-1"), None);
        assert_eq!(cache_max_age("max-age=1, max-age=2"), None);
        assert_eq!(cache_max_age("max-age"), None);
        assert_eq!(
            cache_max_age("max-age=99999999999999999999999"),
            Some(u64::MAX)
        );
    }

    #[test]
    fn content_types() {
        let json = ["application/json", "application/jwk-set+json"];
        assert!(content_type_is(b"application/json; charset=UTF-8", &json));
        assert!(content_type_is(b"Application/JWK-Set+JSON", &json));
        assert!(!content_type_is(b"text/html", &json));
        assert!(!content_type_is(b"application/jsonx", &json));
        assert!(!content_type_is(b"\xff", &json));
    }

    proptest! {
        #[test]
        fn url_parser_accepts_only_safe_urls(s in "\\PC{0,64}", loopback in any::<bool>()) {
            if let Ok(u) = parse_url(&s, loopback) {
                prop_assert!(!u.host.is_empty());
                prop_assert!(u.port != 0);
                prop_assert!(u.target.starts_with('/') || u.target.starts_with('*') || u.target.starts_with('?'));
                prop_assert!(u.tls || (loopback && is_loopback_host(&u.host)));
                prop_assert!(!u.authority.contains('@'));
            }
        }

        #[test]
        fn https_urls_round_trip(host in "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){1,2}", port in 1u16.., path in "(/[a-zA-Z0-9._~-]{0,10}){0,4}") {
            let s = format!("https://{host}:{port}{path}");
            let u = parse_url(&s, false).unwrap();
            prop_assert_eq!(&*u.host, host.as_str());
            prop_assert_eq!(u.port, port);
            let want = if path.is_empty() { "/" } else { path.as_str() };
            prop_assert_eq!(&*u.target, want);
        }

        /// Whatever the user information and query hold, `/ ? # @` included (which
        /// a URL would escape, and a hand-written one may not), neither is shown.
        #[test]
        fn shown_urls_never_hold_user_information_or_query(
            scheme in "https?",
            user in "[A-Z]{0,8}",
            password in "[A-Z]{4}([/?#@:;&=]|%2F)?[A-Z]{4}",
            host in "[a-z][a-z0-9-]{0,12}(\\.[a-z]{2,6}){1,2}",
            port in proptest::option::of(1u16..),
            path in "(/[a-z0-9._~-]{0,8}){0,3}",
            query in "\\?([a-z]{1,6}=)?[A-Z]{8}",
            fragment in "(#[A-Z]{0,6})?",
        ) {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let url = format!("{scheme}://{user}:{password}@{host}{port}{path}{query}{fragment}");
            let shown = ShownUrl(&url).to_string();
            // The secrets are the only upper-case letters of `url`.
            let clean = shown == NOT_SHOWN || !shown.bytes().any(|b| b.is_ascii_uppercase());
            prop_assert!(clean, "{} -> {}", url, shown);
            if !password.contains(['/', '?', '#']) {
                prop_assert_eq!(shown, format!("{scheme}://{host}{port}{path}"));
            }
        }

        /// A string that only looks like a URL further on (a malformed scheme, a
        /// `://` in its query) never shows the user information before it.
        #[test]
        fn malformed_urls_never_show_user_information(
            start in "[a-z0-9:/.+-]{0,10}",
            password in "[A-Z]{8}",
            rest in "[a-z./]{0,10}(\\?[a-z]{1,4}=[a-z]{0,5}://[a-z]{1,5})?",
        ) {
            let url = format!("{start}svc:{password}@idp{rest}");
            let shown = ShownUrl(&url).to_string();
            prop_assert!(!shown.contains(&password), "{} -> {}", url, shown);
        }

        #[test]
        fn max_age_reads_back(n in any::<u64>(), before in "(public|private|must-revalidate)?", upper in any::<bool>()) {
            let name = if upper { "MAX-AGE" } else { "max-age" };
            let v = if before.is_empty() { format!("{name}={n}") } else { format!("{before}, {name}={n}") };
            prop_assert_eq!(cache_max_age(&v), Some(n));
        }

        #[test]
        fn cache_control_never_panics(s in "\\PC{0,80}") {
            let _ = cache_max_age(&s);
        }

        #[test]
        fn discovery_requires_the_exact_issuer(iss in "https://[a-z]{1,8}\\.example(/[a-z]{0,5})?", other in "https://[a-z]{1,8}\\.example(/[a-z]{0,5})?") {
            let doc = serde_json::json!({"issuer": other, "jwks_uri": "https://keys.example/jwks"}).to_string();
            let r = parse_discovery(doc.as_bytes(), &iss, false);
            prop_assert_eq!(r.is_ok(), iss == other);
        }

        #[test]
        fn document_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_discovery(&bytes, "https://i.example", true);
            let _ = parse_remote_jwks(&bytes);
        }
    }
}
