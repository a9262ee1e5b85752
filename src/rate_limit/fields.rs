//! The `RateLimit-Policy` and `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers-11:
//! written by the layer, parsed by [`parse_ratelimit_policy`] and [`parse_ratelimit`]
//! for clients and tests.
//!
//! Both fields are Structured Field Lists (RFC 9651) of items whose value is the
//! policy name (a String) with parameters:
//!
//! ```text
//! RateLimit-Policy: "burst";q=100;w=1, "hourly";q=5000;w=3600
//! RateLimit: "burst";r=42;t=1, "hourly";r=4870;t=94
//! ```
//!
//! `q` is the quota (requests per window), `w` the window in seconds, `r` the
//! requests left now, `t` the seconds (rounded up) until the full quota is back.
//!
//! ```
//! use portcullis::rate_limit::fields::{parse_ratelimit, parse_ratelimit_policy};
//! let p = parse_ratelimit_policy(br#""burst";q=100;w=1, "hourly";q=5000;w=3600"#).unwrap();
//! assert_eq!((p[1].name.as_str(), p[1].quota, p[1].window), ("hourly", 5000, Some(3600)));
//! let r = parse_ratelimit(br#""burst";r=42;t=1"#).unwrap();
//! assert_eq!((r[0].remaining, r[0].reset), (42, Some(1)));
//! assert!(parse_ratelimit(br#""burst";t=1"#).is_err()); // r is required
//! ```

use std::fmt;

/// One entry of `RateLimit-Policy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyItem {
    /// The policy name.
    pub name: String,
    /// `q`: quota units per window (required).
    pub quota: u64,
    /// `w`: the window in seconds.
    pub window: Option<u64>,
    /// `qu`: the quota unit (`"requests"` when absent).
    pub quota_unit: Option<String>,
    /// `pk`: the partition key, as its base64 text.
    pub partition_key: Option<String>,
}

/// One entry of `RateLimit`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitItem {
    /// The policy name.
    pub name: String,
    /// `r`: quota units left (required).
    pub remaining: u64,
    /// `t`: seconds until the quota resets.
    pub reset: Option<u64>,
    /// `pk`: the partition key, as its base64 text.
    pub partition_key: Option<String>,
}

/// Why a field value did not parse. Per the draft, a client ignores such a field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    at: usize,
    what: &'static str,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid RateLimit field at byte {}: {}",
            self.at, self.what
        )
    }
}

impl std::error::Error for FieldError {}

/// Parses a `RateLimit-Policy` field value.
pub fn parse_ratelimit_policy(value: &[u8]) -> Result<Vec<PolicyItem>, FieldError> {
    let items = parse_list(value)?;
    items
        .into_iter()
        .map(|it| {
            Ok(PolicyItem {
                quota: it
                    .param_uint("q")?
                    .ok_or(err(it.end, "missing q parameter"))?,
                window: it.param_uint("w")?,
                quota_unit: it.param_string("qu")?,
                partition_key: it.param_bytes("pk")?,
                name: it.name,
            })
        })
        .collect()
}

/// Parses a `RateLimit` field value.
pub fn parse_ratelimit(value: &[u8]) -> Result<Vec<LimitItem>, FieldError> {
    let items = parse_list(value)?;
    items
        .into_iter()
        .map(|it| {
            Ok(LimitItem {
                remaining: it
                    .param_uint("r")?
                    .ok_or(err(it.end, "missing r parameter"))?,
                reset: it.param_uint("t")?,
                partition_key: it.param_bytes("pk")?,
                name: it.name,
            })
        })
        .collect()
}

fn err(at: usize, what: &'static str) -> FieldError {
    FieldError { at, what }
}

/// A bare item (RFC 9651 §3.3), as far as these fields need.
#[derive(Clone, Debug, PartialEq)]
enum Bare {
    Integer(i64),
    Decimal,
    String(String),
    Token(String),
    Bytes(String),
    Boolean(bool),
}

#[derive(Debug)]
struct Item {
    name: String,
    params: Vec<(String, Bare)>,
    end: usize,
}

impl Item {
    /// The last value of `key` (RFC 9651: a later duplicate overrides).
    fn param(&self, key: &str) -> Option<&Bare> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn param_uint(&self, key: &'static str) -> Result<Option<u64>, FieldError> {
        match self.param(key) {
            None => Ok(None),
            Some(Bare::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(_) => Err(err(self.end, "parameter must be a non-negative integer")),
        }
    }

    fn param_string(&self, key: &'static str) -> Result<Option<String>, FieldError> {
        match self.param(key) {
            None => Ok(None),
            Some(Bare::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(self.end, "parameter must be a string")),
        }
    }

    fn param_bytes(&self, key: &'static str) -> Result<Option<String>, FieldError> {
        match self.param(key) {
            None => Ok(None),
            Some(Bare::Bytes(s)) => Ok(Some(s.clone())),
            Some(_) => Err(err(self.end, "parameter must be a byte sequence")),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

/// Fields longer than this are refused outright: no real policy list comes close.
const MAX_FIELD: usize = 8 * 1024;

fn parse_list(value: &[u8]) -> Result<Vec<Item>, FieldError> {
    if value.len() > MAX_FIELD {
        return Err(err(0, "field too long"));
    }
    let mut p = Parser { s: value, i: 0 };
    p.skip_sp();
    let mut out = Vec::new();
    if p.eof_after_ows() {
        return Ok(out);
    }
    loop {
        out.push(p.item()?);
        p.skip_ows();
        if p.i == p.s.len() {
            return Ok(out);
        }
        if p.s[p.i] != b',' {
            return Err(err(p.i, "expected ',' between list members"));
        }
        p.i += 1;
        p.skip_ows();
        if p.i == p.s.len() {
            return Err(err(p.i, "trailing comma"));
        }
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn eof_after_ows(&mut self) -> bool {
        self.skip_ows();
        self.i == self.s.len()
    }

    fn item(&mut self) -> Result<Item, FieldError> {
        let name = match self.bare()? {
            Bare::String(s) | Bare::Token(s) => s,
            _ => return Err(err(self.i, "policy name must be a string")),
        };
        let mut params = Vec::new();
        while self.peek() == Some(b';') {
            self.i += 1;
            self.skip_sp();
            let key = self.key()?;
            let value = if self.peek() == Some(b'=') {
                self.i += 1;
                self.bare()?
            } else {
                Bare::Boolean(true)
            };
            if params.len() >= 32 {
                return Err(err(self.i, "too many parameters"));
            }
            params.push((key, value));
        }
        Ok(Item {
            name,
            params,
            end: self.i,
        })
    }

    fn key(&mut self) -> Result<String, FieldError> {
        let start = self.i;
        match self.peek() {
            Some(b'a'..=b'z' | b'*') => self.i += 1,
            _ => return Err(err(self.i, "parameter key must start with a-z or '*'")),
        }
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*')
        ) {
            self.i += 1;
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn bare(&mut self) -> Result<Bare, FieldError> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'"') => self.string(),
            Some(b':') => self.bytes(),
            Some(b'?') => {
                self.i += 1;
                let b = match self.peek() {
                    Some(b'0') => false,
                    Some(b'1') => true,
                    _ => return Err(err(self.i, "boolean must be ?0 or ?1")),
                };
                self.i += 1;
                Ok(Bare::Boolean(b))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => Ok(Bare::Token(self.token())),
            _ => Err(err(self.i, "expected an item")),
        }
    }

    fn number(&mut self) -> Result<Bare, FieldError> {
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let start = self.i;
        let mut int: i64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            if self.i - start >= 15 {
                return Err(err(self.i, "integer longer than 15 digits"));
            }
            int = int * 10 + i64::from(c - b'0');
            self.i += 1;
        }
        if self.i == start {
            return Err(err(self.i, "expected a digit"));
        }
        if self.peek() == Some(b'.') {
            if self.i - start > 12 {
                return Err(err(self.i, "decimal integer part longer than 12 digits"));
            }
            self.i += 1;
            let fstart = self.i;
            while let Some(b'0'..=b'9') = self.peek() {
                self.i += 1;
            }
            let frac = self.i - fstart;
            if frac == 0 || frac > 3 {
                return Err(err(self.i, "decimal needs 1 to 3 fraction digits"));
            }
            return Ok(Bare::Decimal);
        }
        Ok(Bare::Integer(if neg { -int } else { int }))
    }

    fn string(&mut self) -> Result<Bare, FieldError> {
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(err(self.i, "unterminated string"));
            };
            self.i += 1;
            match c {
                b'"' => return Ok(Bare::String(out)),
                b'\\' => match self.peek() {
                    Some(e @ (b'"' | b'\\')) => {
                        out.push(char::from(e));
                        self.i += 1;
                    }
                    _ => return Err(err(self.i, "bad escape in string")),
                },
                0x20..=0x7e => out.push(char::from(c)),
                _ => return Err(err(self.i - 1, "string holds a non-printable byte")),
            }
            if out.len() > 256 {
                return Err(err(self.i, "string longer than 256 characters"));
            }
        }
    }

    fn token(&mut self) -> String {
        let start = self.i;
        self.i += 1;
        while let Some(c) = self.peek() {
            let tchar = c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&c);
            if !tchar {
                break;
            }
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn bytes(&mut self) -> Result<Bare, FieldError> {
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == b':' {
                let b64 = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(Bare::Bytes(b64));
            }
            if !(c.is_ascii_alphanumeric() || c == b'+' || c == b'/' || c == b'=') {
                return Err(err(self.i, "byte sequence holds a non-base64 byte"));
            }
            self.i += 1;
        }
        Err(err(self.i, "unterminated byte sequence"))
    }
}

/// Seconds for a field: whole seconds, rounded up (0 stays 0).
pub(crate) fn secs_ceil(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_drafts_examples_and_whitespace() {
        let p = parse_ratelimit_policy(
            b"  \"default\";q=100;w=10 ,\t\"daily\";q=1000;w=86400;qu=\"requests\"",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].quota_unit.as_deref(), Some("requests"));
        let r = parse_ratelimit(b"\"default\";r=50;t=30;pk=:cHJvamVjdC0xMjM=:").unwrap();
        assert_eq!(r[0].partition_key.as_deref(), Some("cHJvamVjdC0xMjM="));
        assert_eq!(parse_ratelimit(b"").unwrap(), vec![]);
        // Unknown parameters are ignored; a later duplicate wins.
        let r = parse_ratelimit(b"\"a\";r=1;x=?1;r=2").unwrap();
        assert_eq!(r[0].remaining, 2);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b"\"a\";r=-1"[..],
            b"\"a\";r=1.5",
            b"\"a\";r=1,",
            b"\"a\";r=1 \"b\";r=2",
            b"\"a;r=1",
            b"\"a\";R=1",
            b"\"a\";r=1234567890123456",
            b"(\"a\");r=1",
            b"\"a\xff\";r=1",
            b"\"a\";r=\"1\"",
            b"1;r=1",
        ] {
            assert!(
                parse_ratelimit(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_.-]{1,20}"
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_ratelimit(&bytes);
            let _ = parse_ratelimit_policy(&bytes);
        }

        #[test]
        fn rendered_fields_round_trip(
            items in proptest::collection::vec((name(), 0u64..1_000_000_000, 0u64..40_000_000), 1..5)
        ) {
            let rendered: Vec<String> = items.iter().map(|(n, r, t)| format!("\"{n}\";r={r};t={t}")).collect();
            let parsed = parse_ratelimit(rendered.join(", ").as_bytes()).unwrap();
            prop_assert_eq!(parsed.len(), items.len());
            for (p, (n, r, t)) in parsed.iter().zip(&items) {
                prop_assert_eq!(&p.name, n);
                prop_assert_eq!(p.remaining, *r);
                prop_assert_eq!(p.reset, Some(*t));
            }
        }
    }
}
