//! Find secrets in text and replace them, keeping a short hint that is not secret.
//!
//! [`Redactor`] applies two kinds of rules in one pass:
//!
//! 1. **Field names first.** In `name=value`, `name: value`, `"name":"value"` (also
//!    JSON-escaped inside a string), a value whose name is sensitive (`password`,
//!    `api_key`, `x-api-key`, `authorization`, `cookie`, `client_secret`, anything
//!    ending in `token`, `secret`, `password`, `signature`, ... see
//!    [`Redactor::is_sensitive_name`]) becomes `REDACTED`; an authorization value
//!    keeps its scheme (`authorization: Bearer ****`).
//! 2. **Patterns second.** Known secret shapes anywhere in the text, whatever
//!    surrounds them:
//!
//! | shape | becomes |
//! |---|---|
//! | this crate's API keys `pc_live_…`, `pc_test_…` (and prefixes you add) | `pc_live_****` |
//! | JWTs `eyJ….….…` | `eyJ****` |
//! | `Bearer …`, `Basic …` credentials | `Bearer ****` |
//! | PEM private keys (`-----BEGIN … PRIVATE KEY-----` to its `END` line) | `[REDACTED PRIVATE KEY]` |
//! | passwords in URLs `redis://:password@host`, `postgres://u:pw@h` | `redis://:****@host` |
//! | AWS access key ids `AKIA…`, `ASIA…` | `AKIA****` |
//! | GitHub `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_` | `ghp_****` |
//! | GitLab `glpat-`, `glrt-`, `gldt-` | `glpat-****` |
//! | Stripe `sk_live_`, `sk_test_`, `rk_live_`, `rk_test_`, `whsec_` | `sk_live_****` |
//! | Slack `xoxb-`, `xoxp-`, `xoxa-`, `xoxr-`, `xoxs-`, `xoxe-` | `xoxb-****` |
//! | Google API keys `AIza…` | `AIza****` |
//! | Anthropic `sk-ant-…`, OpenAI `sk-proj-…`, `sk-…` | `sk-ant-****` |
//!
//! ```
//! use portcullis::redact::Redactor;
//!
//! let r = Redactor::new();
//! assert_eq!(
//!     r.redact("GET with Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"),
//!     "GET with Authorization: Bearer ****"
//! );
//! assert_eq!(r.redact(r#"{"password":"hunter2","user":"ann"}"#), r#"{"password":"REDACTED","user":"ann"}"#);
//! assert_eq!(r.redact("REDIS_URL=redis://:s3cret@cache:6379/0"), "REDIS_URL=redis://:****@cache:6379/0");
//! assert_eq!(r.redact("key sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAA leaked"), "key sk-ant-**** leaked");
//! // Clean text comes back borrowed, without a copy.
//! assert!(matches!(r.redact("GET /v1/jobs 200"), std::borrow::Cow::Borrowed(_)));
//! ```
//!
//! ## Guarantees
//!
//! - **Idempotent**: redacting redacted text changes nothing (property-tested).
//! - **Linear time** in the input, whatever it contains: a single pass with bounded
//!   look-around, no backtracking (fuzzed, and benchmarked on adversarial input).
//! - **Fast on clean text**: most bytes cost one table lookup; clean text is returned
//!   borrowed, without allocating.
//!
//! ## Limits
//!
//! A redactor recognises shapes; it cannot know that an arbitrary string is secret.
//! A password logged without a sensitive name next to it (`login failed for
//! hunter2`) is not found; an unquoted value that contains spaces is redacted up to
//! the first space only. Keep secrets out of log calls in the first place, and use
//! the redactor as the net under them. Secrets percent-encoded in a URL are found by
//! the access log, which also looks at the decoded form.

mod scan;
#[cfg(feature = "redact-writer")]
mod writer;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use crate::ConfigError;
use scan::{NAME_BUF, SHAPES, Set, Shape, normalise_name};
#[cfg(feature = "redact-writer")]
pub use writer::{RedactingMakeWriter, RedactingWriter};

/// What replaces the value of a sensitive field or query parameter.
pub const REDACTED: &str = "REDACTED";

/// Names that are sensitive only as a whole (normalised: ASCII lower case without
/// `_`, `-`, `.`): `key` is, `key_id` is not.
const EXACT_NAMES: &[&[u8]] = &[
    b"key", b"sig", b"code", b"pwd", b"pass", b"auth", b"jwt", b"session", b"bearer",
];

/// Names that are sensitive when a name ends with them (after trailing digits):
/// `client_secret`, `X-Hub-Signature-256`, `refresh_token`, `set-cookie`.
const SUFFIX_NAMES: &[&[u8]] = &[
    b"password",
    b"passwd",
    b"passphrase",
    b"secret",
    b"token",
    b"apikey",
    b"accesskey",
    b"secretkey",
    b"privatekey",
    b"authorization",
    b"cookie",
    b"credential",
    b"credentials",
    b"signature",
    b"sessionid",
    b"sessionkey",
];

/// The default key prefixes of this crate's API keys.
const KEY_PREFIXES: &[&str] = &["pc_live_", "pc_test_"];

/// The rule set, shared by clones of a [`Redactor`].
struct Rules {
    /// Sorted by first byte, longest prefix first within one (`sk-ant-` before `sk-`).
    shapes: Vec<Shape>,
    /// The range of `shapes` starting with each byte.
    by_first: [(u16, u16); 256],
    /// The pairs of bytes at which some rule can start, as a 65536-bit set (8 KiB):
    /// one lookup per byte rejects almost every `e`, `s`, `p` ... of ordinary text.
    pairs: Box<[u64; 1024]>,
    /// Bytes (lower case) a sensitive name can end with.
    last: [bool; 256],
    /// For each last byte, the indices (bits) of the `SUFFIX_NAMES` / `EXACT_NAMES`
    /// ending with it.
    suffix_by_last: [u32; 256],
    exact_by_last: [u32; 256],
    /// Extra exact names, normalised.
    names: Vec<Box<[u8]>>,
}

fn set_pair(pairs: &mut [u64; 1024], first: u8, next: u8) {
    let k = usize::from(first) << 8 | usize::from(next);
    pairs[k >> 6] |= 1 << (k & 63);
}

impl Rules {
    fn new(key_prefixes: &[String], names: Vec<Box<[u8]>>) -> Self {
        let mut shapes: Vec<Shape> = key_prefixes
            .iter()
            .map(|p| Shape {
                prefix: p.as_bytes().into(),
                set: Set::Alnum,
                min: 20,
                exact: false,
                boundary: false,
            })
            .collect();
        shapes.extend(SHAPES.iter().map(|s| s.to_shape()));
        shapes.sort_by(|a, b| {
            (a.prefix[0], std::cmp::Reverse(a.prefix.len()))
                .cmp(&(b.prefix[0], std::cmp::Reverse(b.prefix.len())))
        });
        let mut by_first = [(0u16, 0u16); 256];
        let mut seen = [false; 256];
        let mut pairs = Box::new([0u64; 1024]);
        for (i, s) in shapes.iter().enumerate() {
            let f = usize::from(s.prefix[0]);
            let i = u16::try_from(i).expect("fewer than 65536 shapes");
            if !seen[f] {
                by_first[f] = (i, i + 1);
            } else {
                by_first[f].1 = i + 1;
            }
            seen[f] = true;
            set_pair(&mut pairs, s.prefix[0], s.prefix[1]);
            if matches!(s.prefix[1], b'_' | b'-') {
                set_pair(&mut pairs, s.prefix[0], b'%');
            }
        }
        // `Bearer`, `Basic` (any case), `eyJ`, `-----BEGIN`.
        for (first, next) in [
            (b'b', b"eEaA"),
            (b'B', b"eEaA"),
            (b'e', b"yyyy"),
            (b'-', b"----"),
        ] {
            for &n in next {
                set_pair(&mut pairs, first, n);
            }
        }
        // `name=value`, `name: value`, `scheme://user:password@host`: any next byte.
        for b in [b'=', b':'] {
            for n in 0..=255 {
                set_pair(&mut pairs, b, n);
            }
        }
        let mut last = [false; 256];
        for n in EXACT_NAMES
            .iter()
            .chain(SUFFIX_NAMES)
            .copied()
            .chain(names.iter().map(|n| &**n))
        {
            if let Some(&l) = n.last() {
                last[usize::from(l)] = true;
            }
        }
        // Trailing digits, separators and the hex digits of a trailing escape.
        for b in b"0123456789abcdef_-.".iter() {
            last[usize::from(*b)] = true;
        }
        let by_last = |list: &[&[u8]]| {
            let mut t = [0u32; 256];
            for (i, n) in list.iter().enumerate() {
                t[usize::from(n[n.len() - 1])] |= 1 << i;
            }
            t
        };
        Self {
            shapes,
            by_first,
            pairs,
            last,
            suffix_by_last: by_last(SUFFIX_NAMES),
            exact_by_last: by_last(EXACT_NAMES),
            names,
        }
    }

    fn shapes_from(&self, b: u8) -> &[Shape] {
        let (s, e) = self.by_first[usize::from(b)];
        &self.shapes[usize::from(s)..usize::from(e)]
    }

    /// Whether the value of this name runs to the end of the line, not the next
    /// space or `;` (a `Cookie` header holds several `name=value` pairs).
    fn is_wide_name(name: &[u8]) -> bool {
        let mut buf = [0u8; NAME_BUF];
        let (n, _) = normalise_name(name, &mut buf);
        buf[..n].ends_with(b"cookie")
    }

    /// `whole`: the name was seen from its start (not cut, not glued to other text).
    fn is_sensitive_name(&self, name: &[u8], whole: bool) -> bool {
        let Some(&l) = name.last() else {
            return false;
        };
        if !self.last[usize::from(l.to_ascii_lowercase())] {
            return false;
        }
        if name.len() <= NAME_BUF && name.iter().all(u8::is_ascii_alphanumeric) {
            // The common case: nothing to normalise.
            return self.check_normalised(name, whole, true);
        }
        let mut buf = [0u8; NAME_BUF];
        let (n, fit) = normalise_name(name, &mut buf);
        self.check_normalised(&buf[..n], whole, fit)
    }

    /// `norm`: letters and digits only, any case.
    fn check_normalised(&self, norm: &[u8], whole: bool, fit: bool) -> bool {
        let mut e = norm.len();
        while e > 0 && norm[e - 1].is_ascii_digit() {
            e -= 1;
        }
        let trimmed = &norm[..e];
        let Some(&l) = trimmed.last() else {
            return false;
        };
        let l = usize::from(l.to_ascii_lowercase());
        let mut bits = self.suffix_by_last[l];
        while bits != 0 {
            let s = SUFFIX_NAMES[bits.trailing_zeros() as usize];
            bits &= bits - 1;
            if trimmed.len() >= s.len()
                && trimmed[trimmed.len() - s.len()..].eq_ignore_ascii_case(s)
            {
                return true;
            }
        }
        if !(whole && fit) {
            return false;
        }
        let mut bits = self.exact_by_last[l];
        while bits != 0 {
            let x = EXACT_NAMES[bits.trailing_zeros() as usize];
            bits &= bits - 1;
            if trimmed.eq_ignore_ascii_case(x) {
                return true;
            }
        }
        self.names.iter().any(|x| norm.eq_ignore_ascii_case(x))
    }
}

/// Finds secrets in text and replaces them; see the [module docs](self).
///
/// Build it once and share it: cloning is one reference count.
#[derive(Clone)]
pub struct Redactor {
    rules: Arc<Rules>,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("shapes", &self.rules.shapes.len())
            .field("extra_names", &self.rules.names.len())
            .finish()
    }
}

impl Redactor {
    /// The default rules: every shape in the module table, this crate's `pc_live_` and
    /// `pc_test_` key prefixes, and the default sensitive names.
    pub fn new() -> Self {
        RedactorBuilder::default()
            .build()
            .expect("the default rules are valid")
    }

    /// Starts a redactor with extra key prefixes or sensitive names.
    ///
    /// ```
    /// use portcullis::redact::Redactor;
    /// let r = Redactor::builder()
    ///     .key_prefix("cnp_live_")
    ///     .sensitive_name("x-internal-auth")
    ///     .build()?;
    /// assert_eq!(r.redact("k=cnp_live_AbCdEfGhIjKlMnOpQrStUv"), "k=cnp_live_****");
    /// assert_eq!(r.redact("x-internal-auth: hunter2"), "x-internal-auth: REDACTED");
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn builder() -> RedactorBuilder {
        RedactorBuilder::default()
    }

    /// Redacts `text`. Returns it borrowed when nothing was found.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match scan::redact(&self.rules, text.as_bytes()) {
            None => Cow::Borrowed(text),
            // Every match starts and ends at an ASCII byte and every replacement is
            // ASCII, so the output is UTF-8; the fallback never runs.
            Some(v) => Cow::Owned(
                String::from_utf8(v)
                    .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            ),
        }
    }

    /// Redacts bytes that may not be UTF-8 (e.g. a log line being written).
    ///
    /// ```
    /// use portcullis::redact::Redactor;
    /// let out = Redactor::new().redact_bytes(b"\xff token=abc\n");
    /// assert_eq!(&*out, b"\xff token=REDACTED\n");
    /// ```
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        match scan::redact(&self.rules, bytes) {
            None => Cow::Borrowed(bytes),
            Some(v) => Cow::Owned(v),
        }
    }

    /// Whether a field, header or query-parameter name is sensitive. Case, `_`, `-`
    /// and `.` do not matter; trailing digits are ignored. Sensitive are names ending
    /// in `password`, `passwd`, `passphrase`, `secret`, `token`, `apikey`,
    /// `accesskey`, `secretkey`, `privatekey`, `authorization`, `cookie`,
    /// `credential(s)`, `signature`, `sessionid`, `sessionkey`; the whole names
    /// `key`, `sig`, `code`, `pwd`, `pass`, `auth`, `jwt`, `session`, `bearer`; and the
    /// names added with [`RedactorBuilder::sensitive_name`].
    ///
    /// ```
    /// use portcullis::redact::Redactor;
    /// let r = Redactor::new();
    /// for name in ["API_KEY", "x-api-key", "access_token", "Client-Secret", "sig", "set-cookie"] {
    ///     assert!(r.is_sensitive_name(name), "{name}");
    /// }
    /// for name in ["key_id", "max_tokens", "user", "status_code", "kid"] {
    ///     assert!(!r.is_sensitive_name(name), "{name}");
    /// }
    /// ```
    pub fn is_sensitive_name(&self, name: &str) -> bool {
        self.rules.is_sensitive_name(name.as_bytes(), true)
    }

    /// Replaces the values of sensitive query parameters by `REDACTED`, keeping the
    /// names; see [`redact_query`].
    pub fn redact_query<'a>(&self, query: &'a str) -> Cow<'a, str> {
        redact_query_with(&self.rules, query)
    }

    /// Redacts a URL path or query as it appears on the wire: the raw form, and also
    /// the percent-decoded form (up to three rounds of decoding), so that a secret
    /// written partly or wholly in percent-escapes (`pc%5Flive%5F…`) is caught. When
    /// the decoded form holds a secret the raw form does not show, the redacted
    /// *decoded* form is returned (lossy UTF-8).
    ///
    /// ```
    /// use portcullis::redact::Redactor;
    /// let r = Redactor::new();
    /// let out = r.redact_uri_part("/keys/pc%5Flive%5FAbCdEfGhIjKlMnOpQrStUvWx");
    /// assert_eq!(out, "/keys/pc_live_****");
    /// ```
    pub fn redact_uri_part<'a>(&self, part: &'a str) -> Cow<'a, str> {
        let raw = self.redact(part);
        if !part.contains('%') {
            return raw;
        }
        let mut decoded: Cow<'_, [u8]> = Cow::Borrowed(part.as_bytes());
        let mut found = false;
        for _ in 0..3 {
            let next = percent_decode(&decoded, false);
            let Cow::Owned(next) = next else { break };
            decoded = Cow::Owned(next);
            if scan::redact(&self.rules, &decoded).is_some_and(|r| r != *decoded) {
                found = true;
            }
            if !decoded.contains(&b'%') {
                break;
            }
        }
        if !found {
            return raw;
        }
        let redacted = self.redact_bytes(&decoded).into_owned();
        Cow::Owned(String::from_utf8_lossy(&redacted).into_owned())
    }
}

/// Builds a [`Redactor`] with extra rules; see [`Redactor::builder`].
#[derive(Clone, Debug, Default)]
pub struct RedactorBuilder {
    key_prefixes: Vec<String>,
    names: Vec<String>,
}

impl RedactorBuilder {
    /// Also redacts keys with this prefix (3 to 32 characters of `[a-z0-9_]`, ending
    /// in `_`, e.g. `cnp_live_`), keeping the prefix as the hint. The run after it
    /// must be at least 20 base62 characters.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.key_prefixes.push(prefix.to_owned());
        self
    }

    /// Also treats this field name as sensitive (compared as a whole, normalised like
    /// the built-in names). 1 to 64 characters of `[A-Za-z0-9_.-]`.
    pub fn sensitive_name(mut self, name: &str) -> Self {
        self.names.push(name.to_owned());
        self
    }

    /// Checks the rules.
    pub fn build(self) -> Result<Redactor, ConfigError> {
        let mut prefixes: Vec<String> = KEY_PREFIXES.iter().map(|p| (*p).to_owned()).collect();
        for (i, p) in self.key_prefixes.into_iter().enumerate() {
            let ok = (3..=32).contains(&p.len())
                && p.ends_with('_')
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(ConfigError::new(format!(
                    "redactor key prefix {}: must be 3 to 32 characters of [a-z0-9_] ending in '_'",
                    i + 1
                )));
            }
            if !prefixes.contains(&p) {
                prefixes.push(p);
            }
        }
        let mut names = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            let ok = (1..=64).contains(&n.len())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !ok {
                return Err(ConfigError::new(format!(
                    "redactor sensitive name {}: must be 1 to 64 characters of [A-Za-z0-9_.-]",
                    i + 1
                )));
            }
            let mut buf = [0u8; NAME_BUF];
            let (len, _) = normalise_name(n.as_bytes(), &mut buf);
            if len == 0 {
                return Err(ConfigError::new(format!(
                    "redactor sensitive name {}: has no letters or digits",
                    i + 1
                )));
            }
            names.push(buf[..len].into());
        }
        Ok(Redactor {
            rules: Arc::new(Rules::new(&prefixes, names)),
        })
    }
}

/// Replaces the value of every sensitive query parameter with `REDACTED`, keeping
/// the parameter names and order, with the default rules.
///
/// A name is compared after percent-decoding (`api%5Fkey`) and `+` decoding, case
/// insensitively ([`Redactor::is_sensitive_name`]); repeated, empty and non-UTF-8
/// parameters are each handled. Values of other parameters are left alone here (the
/// access log also runs the pattern rules over the result). Pure and linear.
///
/// ```
/// use portcullis::redact::redact_query;
/// assert_eq!(
///     redact_query("page=2&api%5Fkey=pc_live_x&API_KEY=y&token=&q=cats&token=z"),
///     "page=2&api%5Fkey=REDACTED&API_KEY=REDACTED&token=&q=cats&token=REDACTED"
/// );
/// ```
pub fn redact_query(query: &str) -> Cow<'_, str> {
    static DEFAULT: std::sync::OnceLock<Redactor> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Redactor::new).redact_query(query)
}

fn redact_query_with<'a>(rules: &Rules, query: &'a str) -> Cow<'a, str> {
    let mut out: Option<String> = None;
    let mut pos = 0;
    for (idx, param) in query.split('&').enumerate() {
        let start = pos;
        pos += param.len() + 1;
        let Some((name, value)) = param.split_once('=') else {
            if let Some(o) = out.as_mut() {
                if idx > 0 {
                    o.push('&');
                }
                o.push_str(param);
            }
            continue;
        };
        let decoded = percent_decode(name.as_bytes(), true);
        let sensitive = !value.is_empty() && rules.is_sensitive_name(&decoded, true);
        if sensitive && out.is_none() {
            out = Some(query[..start.saturating_sub(1)].to_owned());
        }
        if let Some(o) = out.as_mut() {
            if idx > 0 {
                o.push('&');
            }
            o.push_str(name);
            o.push('=');
            o.push_str(if sensitive { REDACTED } else { value });
        }
    }
    match out {
        Some(o) => Cow::Owned(o),
        None => Cow::Borrowed(query),
    }
}

/// Percent-decodes (and, in a query, `+` to space); malformed escapes stay as they are.
pub(crate) fn percent_decode(s: &[u8], plus: bool) -> Cow<'_, [u8]> {
    if !s.iter().any(|&b| b == b'%' || (plus && b == b'+')) {
        return Cow::Borrowed(s);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    if out == s {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(out)
    }
}

/// Makes a client-controlled string safe to put in a log line, as the access log and
/// the audit events do with every client-influenced field: control characters (C0,
/// DEL, C1), line and paragraph separators, bidirectional controls and invisible
/// format characters are escaped as `\u{…}`, so no one can forge a line, rewrite a
/// terminal, reorder or hide text; then the string is cut at a character or escape
/// boundary to at most `max_bytes` bytes, `…` included when it was cut.
///
/// Characters are escaped rather than removed, so that removing one cannot join
/// the text around it into something else (`adm\u{200b}in` is not `admin`).
/// Redact first, then sanitise: the escapes are plain ASCII and hide nothing.
///
/// ```
/// use portcullis::redact::sanitize;
/// assert_eq!(sanitize("a\r\nb\x1b[31mc\u{202e}d", 64), r"a\u{d}\u{a}b\u{1b}[31mc\u{202e}d");
/// assert_eq!(sanitize("ééé", 6), "ééé");
/// assert_eq!(sanitize("éééé", 7), "éé…");
/// ```
pub fn sanitize(s: &str, max_bytes: usize) -> Cow<'_, str> {
    crate::log_text::sanitize(s, max_bytes)
}

#[cfg(test)]
mod tests;
