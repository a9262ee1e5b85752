//! The pre-parse of a compact JWS and the strict claims parser: plain functions over
//! strings and bytes, fuzzed and property-tested.

use std::collections::HashSet;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserializer as _;
use serde::de::{self, MapAccess, Visitor};
use serde_json::Value;

use super::TokenRejection;

/// The default cap on a token's length, checked before any decoding: 8 KiB.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 8 * 1024;

/// Longest `kid` accepted in a header.
const MAX_KID_LEN: usize = 256;
/// Longest `sub`, `iss`, `jti` or audience entry accepted in the claims.
const MAX_CLAIM_STR_LEN: usize = 256;

/// A compact JWS split into its parts, its header decoded. Nothing here is verified.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ParsedToken<'a> {
    /// The decoded protected header.
    pub(crate) header: TokenHeader,
    /// `BASE64URL(header) "." BASE64URL(payload)`: the bytes the signature covers.
    pub(crate) signing_input: &'a str,
    /// The payload, still base64url-encoded: the verifier decodes it, reads `iss` to
    /// select the keys, and trusts nothing in it until the signature checks.
    pub(crate) payload_b64: &'a str,
    /// The signature, base64url-encoded.
    pub(crate) signature_b64: &'a str,
}

impl fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The parts are token material: only the header is shown.
        f.debug_struct("ParsedToken")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// The protected-header fields verification reads. Every other member is ignored,
/// except `crit`, which is refused (no extension is understood, RFC 7515 §4.1.11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenHeader {
    /// `alg`, as sent. Compared with the selected key's algorithm, never trusted.
    pub(crate) alg: String,
    /// `kid`, when present.
    pub(crate) kid: Option<String>,
    /// `typ`, when present.
    pub(crate) typ: Option<String>,
}

/// Splits and pre-parses a compact JWS: the length cap, exactly three non-empty
/// base64url parts (no padding, no other characters), and a header that is one JSON
/// object without duplicate members, with a string `alg`, an optional string `kid`
/// and `typ`, and no `crit`.
pub(crate) fn parse_compact(
    token: &str,
    max_len: usize,
) -> Result<ParsedToken<'_>, TokenRejection> {
    if token.len() > max_len {
        return Err(TokenRejection::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenRejection::Malformed);
    };
    if [h, p, s]
        .iter()
        .any(|part| part.is_empty() || !part.bytes().all(is_base64url))
    {
        return Err(TokenRejection::Malformed);
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| TokenRejection::Malformed)?;
    let header = parse_header(&header_json)?;
    Ok(ParsedToken {
        header,
        signing_input: &token[..h.len() + 1 + p.len()],
        payload_b64: p,
        signature_b64: s,
    })
}

/// Whether a credential is shaped like a compact JWS with a JSON header: three
/// parts and a first part starting with `eyJ` (base64url of `{"`). A routing hint
/// between API keys and service tokens, not a check.
pub(crate) fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.bytes().filter(|&b| b == b'.').count() == 2
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Decodes a base64url (unpadded, canonical) part.
pub(crate) fn decode_part(part: &str) -> Result<Vec<u8>, TokenRejection> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenRejection::Malformed)
}

/// Parses a header JSON object (see [`parse_compact`]).
fn parse_header(json: &[u8]) -> Result<TokenHeader, TokenRejection> {
    let members = unique_object(json)?;
    let mut header = TokenHeader {
        alg: String::new(),
        kid: None,
        typ: None,
    };
    let mut has_alg = false;
    for (name, value) in members {
        match name.as_str() {
            "alg" => {
                header.alg = string(value)?;
                has_alg = true;
            }
            "kid" => {
                let kid = string(value)?;
                if kid.is_empty() || kid.len() > MAX_KID_LEN {
                    return Err(TokenRejection::Malformed);
                }
                header.kid = Some(kid);
            }
            "typ" => header.typ = Some(string(value)?),
            "crit" => return Err(TokenRejection::UnsupportedHeader),
            _ => {}
        }
    }
    if !has_alg {
        return Err(TokenRejection::Malformed);
    }
    Ok(header)
}

fn string(v: Value) -> Result<String, TokenRejection> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(TokenRejection::Malformed),
    }
}

/// A JSON value in which no object, at any depth, repeats a member name: parsers
/// disagree on which of two equal members counts (the first, the last, both), so a
/// document that has them is refused rather than read one way.
struct Strict(Value);

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
                Ok(Value::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
                Ok(Value::from(n))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
                Ok(Value::from(n))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
                Ok(Value::from(n))
            }
            fn visit_str<E>(self, s: &str) -> Result<Value, E> {
                Ok(Value::String(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Value, E> {
                Ok(Value::String(s))
            }
            fn visit_unit<E>(self) -> Result<Value, E> {
                Ok(Value::Null)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let mut out = Vec::new();
                while let Some(Strict(v)) = seq.next_element()? {
                    out.push(v);
                }
                Ok(Value::Array(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
                Members
                    .visit_map(map)
                    .map(|m| Value::Object(m.into_iter().collect()))
            }
        }
        d.deserialize_any(V).map(Strict)
    }
}

/// An object's members in order, each name once, the values [`Strict`] too.
struct Members;

impl<'de> Visitor<'de> for Members {
    type Value = Vec<(String, Value)>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom("duplicate member"));
            }
            let Strict(value) = map.next_value()?;
            out.push((name, value));
        }
        Ok(out)
    }
}

/// One JSON value, whole, with no member name repeated in any object (see
/// [`Strict`]); `None` otherwise. How key documents (JWK, JWK Set) are read.
pub(crate) fn strict_value(json: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Strict>(json).ok().map(|s| s.0)
}

/// A JSON object's members in order; a duplicate member name, at the top level or
/// in any object within, is an error (RFC 7515 §5.2 lets a parser reject them,
/// RFC 8725 §3.12 asks it to).
pub(crate) fn unique_object(json: &[u8]) -> Result<Vec<(String, Value)>, TokenRejection> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let members = de
        .deserialize_map(Members)
        .map_err(|_| TokenRejection::Malformed)?;
    de.end().map_err(|_| TokenRejection::Malformed)?;
    Ok(members)
}

/// The registered and scope claims of a service token, as parsed by
/// [`parse_claims`]. Presence and types are checked here; values (times, issuer,
/// audience) are checked by the verifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenClaims {
    /// `iss`: a single string.
    pub(crate) iss: Option<String>,
    /// `sub`: a string without control characters.
    pub(crate) sub: Option<String>,
    /// `aud`: a string or an array of strings, as a list.
    pub(crate) aud: Option<Vec<String>>,
    /// `exp`, in seconds since the epoch: an integer.
    pub(crate) exp: Option<i64>,
    /// `iat`, in seconds since the epoch: an integer.
    pub(crate) iat: Option<i64>,
    /// `nbf`, in seconds since the epoch: an integer.
    pub(crate) nbf: Option<i64>,
    /// `jti`: a string.
    pub(crate) jti: Option<String>,
    /// The scope tokens from `scope` (space separated) or `scp` (array); never both.
    pub(crate) scopes: Option<Vec<String>>,
    /// `email`: a string like `sub`.
    pub(crate) email: Option<String>,
    /// `email_verified`: a JSON boolean.
    pub(crate) email_verified: Option<bool>,
}

/// Parses a token's claims strictly: one JSON object without duplicate members;
/// `exp`, `iat`, `nbf` integers (a float such as `1.7e9` or a string is refused);
/// `iss`, `sub`, `jti`, `email` strings of at most 256 bytes without control
/// characters; `email_verified` a boolean;
/// `aud` a string or an array of such strings; `scope` a string or `scp` an array of
/// strings, not both. Unknown claims are ignored. Missing claims are `None`: the
/// verifier decides which are required.
pub(crate) fn parse_claims(json: &[u8]) -> Result<TokenClaims, TokenRejection> {
    let members = unique_object(json)?;
    let mut c = TokenClaims {
        iss: None,
        sub: None,
        aud: None,
        exp: None,
        iat: None,
        nbf: None,
        jti: None,
        scopes: None,
        email: None,
        email_verified: None,
    };
    let mut scope = None;
    let mut scp = None;
    for (name, value) in members {
        match name.as_str() {
            "iss" => c.iss = Some(claim_str(value)?),
            "sub" => c.sub = Some(claim_str(value)?),
            "jti" => c.jti = Some(claim_str(value)?),
            "email" => c.email = Some(claim_str(value)?),
            "email_verified" => match value {
                Value::Bool(b) => c.email_verified = Some(b),
                _ => return Err(TokenRejection::InvalidClaims),
            },
            "aud" => {
                c.aud = Some(match value {
                    Value::String(_) => vec![claim_str(value)?],
                    Value::Array(items) => {
                        items.into_iter().map(claim_str).collect::<Result<_, _>>()?
                    }
                    _ => return Err(TokenRejection::InvalidClaims),
                });
            }
            "exp" => c.exp = Some(numeric_date(&value)?),
            "iat" => c.iat = Some(numeric_date(&value)?),
            "nbf" => c.nbf = Some(numeric_date(&value)?),
            "scope" => match value {
                Value::String(s) => {
                    scope = Some(
                        s.split(' ')
                            .filter(|t| !t.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    )
                }
                _ => return Err(TokenRejection::InvalidClaims),
            },
            "scp" => match value {
                Value::Array(items) => {
                    scp = Some(
                        items
                            .into_iter()
                            .map(|v| match v {
                                Value::String(s) => Ok(s),
                                _ => Err(TokenRejection::InvalidClaims),
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                    )
                }
                _ => return Err(TokenRejection::InvalidClaims),
            },
            _ => {}
        }
    }
    c.scopes = match (scope, scp) {
        (Some(_), Some(_)) => return Err(TokenRejection::InvalidClaims),
        (a, b) => a.or(b),
    };
    Ok(c)
}

fn claim_str(v: Value) -> Result<String, TokenRejection> {
    match v {
        Value::String(s)
            if !s.is_empty()
                && s.len() <= MAX_CLAIM_STR_LEN
                && !s.chars().any(char::is_control) =>
        {
            Ok(s)
        }
        _ => Err(TokenRejection::InvalidClaims),
    }
}

/// RFC 7519 allows fractional NumericDates; service tokens do not need them, and
/// refusing them keeps one representation per instant.
fn numeric_date(v: &Value) -> Result<i64, TokenRejection> {
    match v {
        Value::Number(n) if !n.is_f64() => n.as_i64().ok_or(TokenRejection::InvalidClaims),
        _ => Err(TokenRejection::InvalidClaims),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A JSON value of objects, arrays and scalars, as text, built so that
    /// `dup` (when some) repeats one member of the object it lands in.
    fn json_text(v: &Value, dup: &mut Option<usize>, out: &mut String) {
        match v {
            Value::Object(m) => {
                out.push('{');
                let here = dup.map(|d| d == 0);
                *dup = dup.and_then(|d| d.checked_sub(1));
                let mut first = true;
                for (k, v) in m {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    json_text(v, dup, out);
                }
                if here == Some(true)
                    && let Some((k, v)) = m.iter().next()
                {
                    out.push(',');
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    out.push_str(&v.to_string());
                }
            }
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    json_text(v, dup, out);
                }
                out.push(']');
                return;
            }
            other => {
                out.push_str(&other.to_string());
                return;
            }
        }
        out.push('}');
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c]{1,2}", inner, 1..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn objects(v: &Value) -> usize {
        match v {
            Value::Object(m) => 1 + m.values().map(objects).sum::<usize>(),
            Value::Array(a) => a.iter().map(objects).sum(),
            _ => 0,
        }
    }

    proptest! {
        /// A member repeated in any object, at any depth, refuses the document in
        /// every reader of this module (headers, claims, key documents); without
        /// it, the document reads as serde_json reads it.
        #[test]
        fn duplicate_members_are_refused_at_any_depth(
            members in proptest::collection::btree_map("[a-c]{1,2}", json_value(), 1..4),
            pick in any::<prop::sample::Index>(),
        ) {
            let root = Value::Object(members.into_iter().collect());
            let mut clean = String::new();
            json_text(&root, &mut None, &mut clean);
            prop_assert_eq!(strict_value(clean.as_bytes()), Some(root.clone()));
            prop_assert!(unique_object(clean.as_bytes()).is_ok());
            let mut dup = Some(pick.index(objects(&root)));
            let mut doubled = String::new();
            json_text(&root, &mut dup, &mut doubled);
            prop_assert!(strict_value(doubled.as_bytes()).is_none(), "{}", doubled);
            prop_assert!(unique_object(doubled.as_bytes()).is_err(), "{}", doubled);
            prop_assert!(parse_claims(doubled.as_bytes()).is_err(), "{}", doubled);
            prop_assert!(crate::jwt::KeySet::from_jwks(&doubled).is_err(), "{}", doubled);
        }
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn tok(header: &str, payload: &str) -> String {
        format!("{}.{}.c2ln", b64(header), b64(payload))
    }

    #[test]
    fn header_rules() {
        let ok = tok(r#"{"alg":"ES256","typ":"JWT"}"#, "{}");
        let p = parse_compact(&ok, 8192).unwrap();
        assert_eq!(p.header.typ.as_deref(), Some("JWT"));
        assert_eq!(p.header.kid, None);
        assert_eq!(p.signing_input, &ok[..ok.rfind('.').unwrap()]);
        assert_eq!(p.signature_b64, "c2ln");

        for (h, want) in [
            (r#"{"alg":"HS256","alg":"none"}"#, TokenRejection::Malformed),
            (r#"{"kid":"k"}"#, TokenRejection::Malformed),
            (r#"{"alg":1}"#, TokenRejection::Malformed),
            (r#"{"alg":"HS256","kid":7}"#, TokenRejection::Malformed),
            (r#"{"alg":"HS256","kid":""}"#, TokenRejection::Malformed),
            (
                r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
                TokenRejection::UnsupportedHeader,
            ),
            (r#"["alg"]"#, TokenRejection::Malformed),
            (r#"{"alg":"HS256"} x"#, TokenRejection::Malformed),
            ("", TokenRejection::Malformed),
        ] {
            assert_eq!(parse_compact(&tok(h, "{}"), 8192).unwrap_err(), want, "{h}");
        }
    }

    #[test]
    fn shape_rules() {
        let h = b64(r#"{"alg":"HS256"}"#);
        for t in [
            String::new(),
            "..".into(),
            "...".into(),
            format!("{h}.e30"),
            format!("{h}.e30."),
            format!("{h}..c2ln"),
            format!("{h}.e30.c2ln."),
            format!("{h}.e30=.c2ln"),
            format!("{h}.e30.c2l+"),
            format!("{h}.e 30.c2ln"),
            format!("{h}=.e30.c2ln"),
            // Non-canonical trailing bits in the header part.
            "eyJhbGciOiJIUzI1NiJ9a.e30.c2ln".into(),
        ] {
            assert_eq!(
                parse_compact(&t, 8192).unwrap_err(),
                TokenRejection::Malformed,
                "{t}"
            );
        }
    }

    #[test]
    fn claims_types() {
        let c = parse_claims(
            br#"{"iss":"i","sub":"s","aud":["a","b"],"exp":2,"iat":1,"nbf":1,"jti":"j","scope":"x  y","other":{"exp":"no"}}"#,
        )
        .unwrap();
        assert_eq!(c.aud.unwrap(), ["a", "b"]);
        assert_eq!(c.scopes.unwrap(), ["x", "y"]);
        assert_eq!(parse_claims(br#"{"aud":"a"}"#).unwrap().aud.unwrap(), ["a"]);
        for bad in [
            r#"{"exp":"1700000000"}"#,
            r#"{"exp":1700000000.0}"#,
            r#"{"iat":1.5}"#,
            r#"{"nbf":true}"#,
            r#"{"exp":18446744073709551615}"#,
            r#"{"iss":["a"]}"#,
            r#"{"sub":""}"#,
            r#"{"sub":"a\nb"}"#,
            r#"{"sub":1}"#,
            r#"{"aud":[1]}"#,
            r#"{"aud":{}}"#,
            r#"{"scope":["a"]}"#,
            r#"{"scp":"a"}"#,
            r#"{"scp":[1]}"#,
            r#"{"scope":"a","scp":["a"]}"#,
            r#"{"email_verified":"true"}"#,
            r#"{"email":""}"#,
        ] {
            assert_eq!(
                parse_claims(bad.as_bytes()).unwrap_err(),
                TokenRejection::InvalidClaims,
                "{bad}"
            );
        }
        for bad in [
            r#"{"exp":1,"exp":1}"#,
            r#"{"x":1,"x":2}"#,
            "[]",
            "null",
            "{",
        ] {
            assert_eq!(
                parse_claims(bad.as_bytes()).unwrap_err(),
                TokenRejection::Malformed,
                "{bad}"
            );
        }
        // Nested duplicates, escaped or not, are refused as well.
        for bad in [
            r#"{"x":{"a":1,"a":2}}"#,
            r#"{"x":[{"a":1,"\u0061":2}]}"#,
            r#"{"aud":"a","x":[[{"b":{"c":1,"c":1}}]]}"#,
        ] {
            assert_eq!(
                parse_claims(bad.as_bytes()).unwrap_err(),
                TokenRejection::Malformed,
                "{bad}"
            );
            assert!(strict_value(bad.as_bytes()).is_none(), "{bad}");
        }
        let long = format!(r#"{{"sub":"{}"}}"#, "a".repeat(257));
        assert_eq!(
            parse_claims(long.as_bytes()).unwrap_err(),
            TokenRejection::InvalidClaims
        );
    }
}
