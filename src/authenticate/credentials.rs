//! Credential extraction: pure functions over header bytes, no policy.

use std::fmt;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName};

/// The header API keys are sent in (matched in any case, as all HTTP header names).
const X_API_KEY: &str = "x-api-key";

/// [`X_API_KEY`] as a parsed name: a lookup by `&str` parses the name every time.
pub(crate) static X_API_KEY_NAME: HeaderName = HeaderName::from_static(X_API_KEY);

/// The longest credential header value read; longer is `invalid_request`. Generous
/// enough for a service token, small enough that nothing expensive runs on junk.
pub(crate) const MAX_CREDENTIAL_LEN: usize = 8 * 1024;

/// Where a credential came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub(crate) enum CredentialSource {
    /// `X-API-Key: <key>`.
    ApiKeyHeader,
    /// `Authorization: Bearer <credential>` (RFC 6750).
    Bearer,
    /// `Authorization: ApiKey <key>`.
    ApiKeyScheme,
    /// A query-string parameter (only when explicitly enabled).
    Query,
}

/// A presented credential, borrowed from the request. `Debug` never shows the value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credential<'a> {
    source: CredentialSource,
    value: &'a str,
}

impl<'a> Credential<'a> {
    /// Where it came from.
    pub(crate) fn source(&self) -> CredentialSource {
        self.source
    }

    /// The credential itself: 1 to [`MAX_CREDENTIAL_LEN`] printable ASCII characters
    /// without spaces. Secret: never log it.
    #[cfg_attr(not(any(feature = "api-key", feature = "jwt")), allow(dead_code))]
    pub(crate) fn expose_secret(&self) -> &'a str {
        self.value
    }
}

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("source", &self.source)
            .field(
                "value",
                &format_args!("<redacted, {} bytes>", self.value.len()),
            )
            .finish()
    }
}

/// Why the credentials of a request cannot be read (both are RFC 6750
/// `invalid_request`, answered 400).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub(crate) enum CredentialError {
    /// Empty, over-long, non-ASCII, containing spaces or control characters, or a
    /// known scheme without a credential.
    Malformed,
    /// More than one credential in the request, even if they are the same.
    Multiple,
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CredentialError::Malformed => "malformed credential",
            CredentialError::Multiple => "more than one credential",
        })
    }
}

impl std::error::Error for CredentialError {}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// A credential token: printable ASCII without space (RFC 6750's `b64token` is a
/// subset; keys from a plain list may use any printable character).
fn token(v: &[u8]) -> Result<&str, CredentialError> {
    // Visible ASCII only, checked without an early exit so that the loop vectorises.
    let invisible = v
        .iter()
        .fold(false, |bad, &b| bad | !(0x21..0x7f).contains(&b));
    if v.is_empty() || v.len() > MAX_CREDENTIAL_LEN || invisible {
        return Err(CredentialError::Malformed);
    }
    std::str::from_utf8(v).map_err(|_| CredentialError::Malformed)
}

/// Parses an `X-API-Key` header value.
///
/// Surrounding spaces and tabs are ignored (HTTP does not count them as part of the
/// value); an empty value, or one with inner whitespace, control or non-ASCII bytes,
/// or longer than [`MAX_CREDENTIAL_LEN`], is malformed.
pub(crate) fn parse_api_key_header(value: &[u8]) -> Result<&str, CredentialError> {
    token(trim_ows(value))
}

/// Parses an `Authorization` header value: `Bearer <credential>` or
/// `ApiKey <credential>`, scheme in any case, one or more spaces between.
///
/// `Ok(None)` for another scheme (e.g. `Basic`): not ours, left alone. A known scheme
/// with no credential, an empty value, or a malformed credential is an error.
pub(crate) fn parse_authorization(
    value: &[u8],
) -> Result<Option<(CredentialSource, &str)>, CredentialError> {
    let v = trim_ows(value);
    if v.is_empty() {
        return Err(CredentialError::Malformed);
    }
    let split = v.iter().position(|&b| b == b' ' || b == b'\t');
    let (scheme, rest) = match split {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, &b""[..]),
    };
    let source = if scheme.eq_ignore_ascii_case(b"bearer") {
        CredentialSource::Bearer
    } else if scheme.eq_ignore_ascii_case(b"apikey") {
        CredentialSource::ApiKeyScheme
    } else {
        return Ok(None);
    };
    // RFC 9110 §11.4: 1*SP between scheme and credential; tabs are tolerated too.
    Ok(Some((source, token(trim_ows(rest))?)))
}

/// Rejects a query-string value that would need decoding: keys are URL-safe.
fn query_token(v: &str) -> Result<&str, CredentialError> {
    if v.contains(['%', '+']) {
        return Err(CredentialError::Malformed);
    }
    token(v.as_bytes())
}

/// Finds the one credential of a request.
///
/// Reads every `X-API-Key` header, every `Authorization` header with the `Bearer` or
/// `ApiKey` scheme and, only when `query_param` is `Some`, that query-string
/// parameter. `Ok(None)`: no credential. More than one (even identical copies) is
/// [`CredentialError::Multiple`]: a client that sends two is confused or probing.
pub(crate) fn extract_credential<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    query_param: Option<&str>,
) -> Result<Option<Credential<'a>>, CredentialError> {
    let mut found: Option<Credential<'a>> = None;
    let mut add = |c: Credential<'a>| {
        if found.replace(c).is_some() {
            Err(CredentialError::Multiple)
        } else {
            Ok(())
        }
    };
    for v in headers.get_all(&X_API_KEY_NAME) {
        add(Credential {
            source: CredentialSource::ApiKeyHeader,
            value: parse_api_key_header(v.as_bytes())?,
        })?;
    }
    for v in headers.get_all(AUTHORIZATION) {
        if let Some((source, value)) = parse_authorization(v.as_bytes())? {
            add(Credential { source, value })?;
        }
    }
    if let (Some(param), Some(query)) = (query_param, query) {
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == param {
                add(Credential {
                    source: CredentialSource::Query,
                    value: query_token(value)?,
                })?;
            }
        }
    }
    Ok(found)
}

/// `query` without the parameter `param`; `None` when nothing is left.
pub(crate) fn strip_query_param(query: &str, param: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.split_once('=').map_or(*pair, |(n, _)| n) != param)
        .collect();
    let joined = kept.join("&");
    (!joined.is_empty()).then_some(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn cases() {
        fn ok(h: &HeaderMap) -> Result<Option<(CredentialSource, &str)>, CredentialError> {
            extract_credential(h, None, None).map(|c| c.map(|c| (c.source(), c.expose_secret())))
        }
        assert_eq!(ok(&headers(&[])), Ok(None));
        assert_eq!(ok(&headers(&[("authorization", b"Basic abc")])), Ok(None));
        assert_eq!(
            ok(&headers(&[
                ("authorization", b"Basic abc"),
                ("x-api-key", b"k")
            ])),
            Ok(Some((CredentialSource::ApiKeyHeader, "k")))
        );
        assert_eq!(
            ok(&headers(&[("authorization", b"ApiKey\tk ")])),
            Ok(Some((CredentialSource::ApiKeyScheme, "k")))
        );
        for bad in [
            &[("x-api-key", &b""[..])][..],
            &[("x-api-key", b"  ")],
            &[("x-api-key", b"a\tb")],
            &[("x-api-key", b"caf\xc3\xa9")],
            &[("authorization", b"Bearer ")],
            &[("authorization", b"")],
            &[("authorization", b"bearer a\tb")],
        ] {
            assert_eq!(
                ok(&headers(bad)),
                Err(CredentialError::Malformed),
                "{bad:?}"
            );
        }
        let long = vec![b'a'; MAX_CREDENTIAL_LEN + 1];
        assert_eq!(
            ok(&headers(&[("x-api-key", &long)])),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            ok(&headers(&[("x-api-key", &long[1..])])).map(|c| c.is_some()),
            Ok(true)
        );
        for two in [
            &[("x-api-key", &b"a"[..]), ("x-api-key", b"a")][..],
            &[("x-api-key", b"a"), ("authorization", b"Bearer b")],
            &[
                ("authorization", b"Bearer a"),
                ("authorization", b"ApiKey b"),
            ],
        ] {
            assert_eq!(ok(&headers(two)), Err(CredentialError::Multiple));
        }
    }

    #[test]
    fn query() {
        let h = headers(&[]);
        let q = |query, param| {
            extract_credential(&h, Some(query), param).map(|c| c.map(|c| c.expose_secret()))
        };
        assert_eq!(q("api_key=k1&x=2", Some("api_key")), Ok(Some("k1")));
        assert_eq!(q("api_key=k1", None), Ok(None));
        assert_eq!(
            q("api_key=", Some("api_key")),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            q("api_key=a%20b", Some("api_key")),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            q("api_key=a&api_key=a", Some("api_key")),
            Err(CredentialError::Multiple)
        );
        let h = headers(&[("x-api-key", b"k")]);
        assert_eq!(
            extract_credential(&h, Some("api_key=k"), Some("api_key")),
            Err(CredentialError::Multiple)
        );
        assert_eq!(
            strip_query_param("a=1&api_key=k&b", "api_key").as_deref(),
            Some("a=1&b")
        );
        assert_eq!(strip_query_param("api_key=k", "api_key"), None);
    }

    #[test]
    fn debug_redacts() {
        let h = headers(&[("x-api-key", b"supersecretvalue")]);
        let c = extract_credential(&h, None, None).unwrap().unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }

    #[test]
    fn doc_parse_api_key_header_trims_and_refuses() {
        assert_eq!(parse_api_key_header(b" pc_live_abc "), Ok("pc_live_abc"));
        assert_eq!(parse_api_key_header(b""), Err(CredentialError::Malformed));
        assert_eq!(
            parse_api_key_header(b"a b"),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            parse_api_key_header(b"\xff"),
            Err(CredentialError::Malformed)
        );
    }

    #[test]
    fn doc_parse_authorization_schemes() {
        let (src, key) = parse_authorization(b"bearer  pc_live_abc")
            .unwrap()
            .unwrap();
        assert_eq!((src, key), (CredentialSource::Bearer, "pc_live_abc"));
        let (src, _) = parse_authorization(b"APIKEY k").unwrap().unwrap();
        assert_eq!(src, CredentialSource::ApiKeyScheme);
        assert_eq!(parse_authorization(b"Basic dXNlcjpwYXNz"), Ok(None));
        assert_eq!(
            parse_authorization(b"Bearer"),
            Err(CredentialError::Malformed)
        );
        assert_eq!(
            parse_authorization(b"Bearer a b"),
            Err(CredentialError::Malformed)
        );
    }

    #[test]
    fn doc_extract_credential_one_of_each_source() {
        let mut h = HeaderMap::new();
        h.insert("X-Api-Key", "pc_live_abc".parse().unwrap());
        let c = extract_credential(&h, None, None).unwrap().unwrap();
        assert_eq!(c.source(), CredentialSource::ApiKeyHeader);

        h.insert("authorization", "Bearer other".parse().unwrap());
        assert_eq!(
            extract_credential(&h, None, None),
            Err(CredentialError::Multiple)
        );

        let h = HeaderMap::new();
        assert_eq!(
            extract_credential(&h, Some("a=1&api_key=k"), None),
            Ok(None)
        );
        let c = extract_credential(&h, Some("a=1&api_key=k"), Some("api_key"))
            .unwrap()
            .unwrap();
        assert_eq!(c.source(), CredentialSource::Query);
    }
}

/// Properties of the parsers and of the extraction, over generated header values.
#[cfg(test)]
mod properties {
    use http::{HeaderMap, HeaderValue};
    use proptest::prelude::*;

    use super::*;

    /// A credential as a client could send it: printable ASCII without spaces.
    fn token() -> impl Strategy<Value = String> {
        "[!-~]{1,80}"
    }

    fn ows() -> impl Strategy<Value = String> {
        "[ \t]{0,3}"
    }

    /// A scheme name in random case.
    fn cased(word: &'static str) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<bool>(), word.len()).prop_map(move |upper| {
            word.chars()
                .zip(upper)
                .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
                .collect()
        })
    }

    #[derive(Clone, Debug)]
    enum Cred {
        Header(String),
        Bearer(String),
        ApiKey(String),
        Basic,
    }

    fn cred() -> impl Strategy<Value = Cred> {
        prop_oneof![
            token().prop_map(Cred::Header),
            token().prop_map(Cred::Bearer),
            token().prop_map(Cred::ApiKey),
            Just(Cred::Basic),
        ]
    }

    proptest! {
        #[test]
        fn api_key_header_trims_only_surrounding_whitespace(t in token(), a in ows(), b in ows()) {
            let v = format!("{a}{t}{b}");
            prop_assert_eq!(parse_api_key_header(v.as_bytes()), Ok(t.as_str()));
        }
        #[test]
        fn api_key_header_refuses_inner_whitespace_controls_and_non_ascii(
            a in token(), b in token(), bad in prop_oneof![Just(b' '), Just(b'\t'), 0u8..0x20, 0x7fu8..=0xff],
        ) {
            let v = [a.as_bytes(), &[bad], b.as_bytes()].concat();
            prop_assert_eq!(parse_api_key_header(&v), Err(CredentialError::Malformed));
        }
        #[test]
        fn authorization_schemes_in_any_case(
            scheme in prop_oneof![cased("bearer"), cased("apikey")],
            spaces in "[ ]{1,4}", t in token(), b in ows(),
        ) {
            let v = format!("{scheme}{spaces}{t}{b}");
            let want = if scheme.eq_ignore_ascii_case("bearer") {
                CredentialSource::Bearer
            } else {
                CredentialSource::ApiKeyScheme
            };
            prop_assert_eq!(parse_authorization(v.as_bytes()), Ok(Some((want, t.as_str()))));
            // The scheme alone, or with only whitespace after it, is malformed.
            let bare = format!("{scheme}{b}");
            prop_assert_eq!(parse_authorization(bare.as_bytes()), Err(CredentialError::Malformed));
        }
        #[test]
        fn other_schemes_are_left_alone(scheme in "[A-Za-z]{1,12}", rest in "[ -~]{0,40}") {
            prop_assume!(!scheme.eq_ignore_ascii_case("bearer") && !scheme.eq_ignore_ascii_case("apikey"));
            let v = format!("{scheme} {rest}");
            prop_assert_eq!(parse_authorization(v.as_bytes()), Ok(None));
        }
        #[test]
        fn exactly_one_credential_is_extracted(creds in proptest::collection::vec(cred(), 0..4)) {
            let mut h = HeaderMap::new();
            let mut ours = Vec::new();
            for c in &creds {
                let (name, value) = match c {
                    Cred::Header(t) => { ours.push(t.clone()); ("x-api-key", t.clone()) }
                    Cred::Bearer(t) => { ours.push(t.clone()); ("authorization", format!("Bearer {t}")) }
                    Cred::ApiKey(t) => { ours.push(t.clone()); ("authorization", format!("ApiKey {t}")) }
                    Cred::Basic => ("authorization", "Basic dXNlcjpwYXNz".to_owned()),
                };
                h.append(name, HeaderValue::from_str(&value).unwrap());
            }
            let got = extract_credential(&h, None, None);
            match ours.len() {
                0 => prop_assert_eq!(got, Ok(None)),
                1 => prop_assert_eq!(got.unwrap().unwrap().expose_secret(), ours[0].as_str()),
                _ => prop_assert_eq!(got, Err(CredentialError::Multiple)),
            }
        }
    }
}
