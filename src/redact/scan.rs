//! The scanner behind [`Redactor`](super::Redactor).
//!
//! One left-to-right pass over the bytes (made again over its output only in the
//! rare case [`until_settled`] describes). Most bytes cost one table lookup: only a
//! few bytes can start a secret shape (the first byte of a known prefix, `-` of a PEM
//! header, `=` and `:` of a `name=value` pair, `b`/`B` of `Bearer`/`Basic`, `_` or
//! `%5F` before the body of one of this crate's keys). At such a byte each rule
//! examines a bounded number of bytes before it fails, or matches a span that the
//! scan then jumps over; the rules whose failure can cost more remember where they
//! failed (the JWT shape) or read runs that end where the next attempt starts (the
//! key body after a `_`), so no byte is examined twice by them. The whole pass is
//! therefore linear in the input, whatever the input.
//!
//! Every match ends either at a byte that no rule continues through (the end of a
//! maximal run, a delimiter, a closing quote) or at the end of the input, and every
//! replacement ends in `*`, `]` or `REDACTED` followed by that same byte, which is
//! what makes redaction idempotent (checked by the property tests). The one rule
//! that reads on through other matches, a URL's authority, is why a pass is made
//! again when a match changed where an authority ends ([`until_settled`]).

use super::{Rules, prefixes};
use crate::key_format::{BODY_LEN, MAX_PREFIX_LEN, ends_with_checksummed_prefix};

/// Replacement for a secret whose non-secret prefix is kept: `ghp_****`.
pub(super) const STARS: &[u8] = b"****";
/// Replacement for the value of a sensitive field.
pub(super) const REDACTED: &[u8] = b"REDACTED";
/// What replaces a JSON member's number or literal: a string, so the line stays JSON.
const QUOTED_REDACTED: &[u8] = b"\"REDACTED\"";
/// Replacement for a whole PEM private-key block.
pub(super) const PEM: &[u8] = b"[REDACTED PRIVATE KEY]";

/// Longest identifier looked at before `=` or `:`.
pub(super) const MAX_NAME: usize = 128;
/// Most spaces and tabs looked over between a name and its `=` or `:`.
const MAX_PADDING: usize = 64;

// Byte classes.
const ALNUM: u8 = 1;
const UNDERSCORE: u8 = 2;
const DASH: u8 = 4;
const UPPER_DIGIT: u8 = 8;
const CRED_EXTRA: u8 = 16; // . ~ + / = (with ALNUM, - and _: RFC 6750 b64token)
const NAME_EXTRA: u8 = 32; // .
const CRED_EXTRA_NO_PAD: u8 = 128; // . ~ + /
/// Bytes of a field name: letters, digits, `_`, `-`, `.`, and `%` of an escape.
const NAME: u8 = ALNUM | UNDERSCORE | DASH | NAME_EXTRA;
const DELIM: u8 = 64; // ends an unquoted field value

const fn classes() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        let mut v = 0;
        if c.is_ascii_alphanumeric() {
            v |= ALNUM;
        }
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            v |= UPPER_DIGIT;
        }
        if c == b'_' {
            v |= UNDERSCORE;
        }
        if c == b'-' {
            v |= DASH;
        }
        if matches!(c, b'.' | b'~' | b'+' | b'/' | b'=') {
            v |= CRED_EXTRA;
        }
        if matches!(c, b'.' | b'~' | b'+' | b'/') {
            v |= CRED_EXTRA_NO_PAD;
        }
        if c == b'.' || c == b'%' {
            v |= NAME_EXTRA;
        }
        if c.is_ascii_whitespace()
            || c < 0x20
            || matches!(
                c,
                b'"' | b'\'' | b'&' | b',' | b';' | b'}' | b')' | b']' | b'\\' | b'<' | b'>' | b'|'
            )
        {
            v |= DELIM;
        }
        t[b] = v;
        b += 1;
    }
    t
}

static CLASS: [u8; 256] = classes();

#[inline]
fn is(b: u8, mask: u8) -> bool {
    CLASS[usize::from(b)] & mask != 0
}

/// A run charset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Set {
    /// `[A-Za-z0-9]`
    Alnum,
    /// `[A-Za-z0-9_]`
    AlnumUnderscore,
    /// `[A-Za-z0-9-]`
    AlnumDash,
    /// `[A-Za-z0-9_-]` (base64url)
    Base64Url,
    /// `[A-Z0-9]`
    UpperDigit,
}

impl Set {
    #[inline]
    fn mask(self) -> u8 {
        match self {
            Set::Alnum => ALNUM,
            Set::AlnumUnderscore => ALNUM | UNDERSCORE,
            Set::AlnumDash => ALNUM | DASH,
            Set::Base64Url => ALNUM | UNDERSCORE | DASH,
            Set::UpperDigit => UPPER_DIGIT,
        }
    }
}

/// A token shape: a fixed, non-secret prefix followed by a run of `set` bytes.
#[derive(Clone, Debug)]
pub(super) struct Shape {
    pub(super) prefix: Box<[u8]>,
    pub(super) set: Set,
    /// Minimum run length after the prefix.
    pub(super) min: usize,
    /// The run must be exactly `min` long and end at a non-alphanumeric byte.
    pub(super) exact: bool,
    /// The prefix must start at a token boundary (not inside a word).
    pub(super) boundary: bool,
}

const fn shape(prefix: &'static str, set: Set, min: usize) -> StaticShape {
    StaticShape {
        prefix,
        set,
        min,
        exact: false,
        boundary: false,
    }
}

/// A [`Shape`] in a `static` table.
#[derive(Clone, Copy, Debug)]
pub(super) struct StaticShape {
    pub(super) prefix: &'static str,
    pub(super) set: Set,
    pub(super) min: usize,
    pub(super) exact: bool,
    pub(super) boundary: bool,
}

impl StaticShape {
    const fn exact(mut self) -> Self {
        self.exact = true;
        self
    }
    const fn boundary(mut self) -> Self {
        self.boundary = true;
        self
    }
    pub(super) fn to_shape(self) -> Shape {
        Shape {
            prefix: self.prefix.as_bytes().into(),
            set: self.set,
            min: self.min,
            exact: self.exact,
            boundary: self.boundary,
        }
    }
}

/// The provider token shapes (sorted by the rule set, longest prefix first).
pub(super) static SHAPES: &[StaticShape] = &[
    // AWS access key ids: a four-letter type then exactly 16 upper-case letters/digits.
    shape("AKIA", Set::UpperDigit, 16).exact().boundary(),
    shape("ASIA", Set::UpperDigit, 16).exact().boundary(),
    shape("ABIA", Set::UpperDigit, 16).exact().boundary(),
    shape("ACCA", Set::UpperDigit, 16).exact().boundary(),
    // Google API keys.
    shape("AIza", Set::Base64Url, 30),
    // GitHub.
    shape("github_pat_", Set::AlnumUnderscore, 22),
    shape("ghp_", Set::Alnum, 30),
    shape("gho_", Set::Alnum, 30),
    shape("ghu_", Set::Alnum, 30),
    shape("ghs_", Set::Alnum, 30),
    shape("ghr_", Set::Alnum, 30),
    // GitLab.
    shape("glpat-", Set::Base64Url, 20),
    shape("glrt-", Set::Base64Url, 20),
    shape("gldt-", Set::Base64Url, 20),
    // Stripe (secret and restricted keys, webhook secrets; publishable keys are public).
    shape("sk_live_", Set::Alnum, 16),
    shape("sk_test_", Set::Alnum, 16),
    shape("rk_live_", Set::Alnum, 16),
    shape("rk_test_", Set::Alnum, 16),
    shape("whsec_", Set::Alnum, 24),
    // Anthropic, then OpenAI's typed keys, then the generic `sk-` form.
    shape("sk-ant-", Set::Base64Url, 20),
    shape("sk-proj-", Set::Base64Url, 20),
    shape("sk-svcacct-", Set::Base64Url, 20),
    shape("sk-admin-", Set::Base64Url, 20),
    shape("sk-", Set::Base64Url, 20).boundary(),
    // Slack.
    shape("xoxb-", Set::AlnumDash, 10),
    shape("xoxp-", Set::AlnumDash, 10),
    shape("xoxa-", Set::AlnumDash, 10),
    shape("xoxr-", Set::AlnumDash, 10),
    shape("xoxs-", Set::AlnumDash, 10),
    shape("xoxe-", Set::AlnumDash, 10),
];

/// Scheme words whose following credential is redacted inside a sensitive field
/// (`authorization: Bearer ****`).
const SCHEMES: &[&[u8]] = &[
    b"bearer",
    b"basic",
    b"token",
    b"apikey",
    b"digest",
    b"negotiate",
    b"ntlm",
    b"dpop",
];

struct Match {
    start: usize,
    end: usize,
    with: &'static [u8],
}

/// Redacts `input`; `None` when nothing was found (the common case, no allocation).
///
/// The rules run at the positions the prefilter proposes, each confirmed against the
/// pair table: exactly the positions [`redact_plain`] visits, found without a look at
/// every byte (property-tested and fuzzed against it). The last [`SHORT`] bytes of a
/// text (all of a short one, such as a field of an access event) are read byte by
/// byte as [`redact_plain`] reads them: there, setting up the vector searches would
/// cost more than it saves.
pub(super) fn redact(rules: &Rules, input: &[u8]) -> Option<Vec<u8>> {
    until_settled(input, |text| {
        let mut candidates = Candidates::new(rules, text);
        redact_at(rules, text, |from| candidates.next(from))
    })
}

/// The reference scan: one pair-table lookup per byte, no prefilter. What
/// [`redact`] must agree with.
#[cfg(any(test, fuzzing))]
pub(super) fn redact_plain(rules: &Rules, input: &[u8]) -> Option<Vec<u8>> {
    until_settled(input, |text| {
        redact_at(rules, text, |from| next_candidate(&rules.pairs, text, from))
    })
}

/// Whether a pass over `input` asks for another ([`until_settled`]): never for text
/// that is already redacted (property-tested).
#[cfg(test)]
pub(super) fn asks_again(rules: &Rules, input: &[u8]) -> bool {
    let mut candidates = Candidates::new(rules, input);
    redact_at(rules, input, |from| candidates.next(from)).1
}

/// Most passes [`until_settled`] makes over one text.
const MAX_PASSES: usize = 8;

/// `pass` over `input`, then over its own output again for as long as a pass
/// reports that the output reads a URL otherwise than the text it came from (see
/// [`each_match`]):
/// - a match replaced the byte that ended a URL's authority: the URL rule reads
///   that authority further in the output, and may find a password there
///   (`://x%20Bearer%20ab/c:pw@h`, whose `ab/c` hid the `/`);
/// - a match took a URL's `://` and the URL's password was hidden on its own: the
///   output holds no URL there, and the rules read what was its user name and
///   password as any other text (`token='https://u'password:pw@h`, whose quoted
///   value ends in the user name, and whose `password:****@h` is then a field).
///
/// So the output is redacted again until every rule reads it as it will on any
/// later pass. Each pass only hides more. Such text is rare (a secret that runs
/// past the end of a URL's authority, or over its `://`), so nearly every text
/// takes one pass, and no text more than [`MAX_PASSES`], which keeps the work
/// linear.
fn until_settled(input: &[u8], pass: impl Fn(&[u8]) -> (Option<Vec<u8>>, bool)) -> Option<Vec<u8>> {
    let (mut out, mut again) = pass(input);
    for _ in 1..MAX_PASSES {
        let Some(text) = out.as_deref().filter(|_| again) else {
            break;
        };
        let next;
        (next, again) = pass(text);
        if next.is_some() {
            out = next;
        }
    }
    out
}

/// The spans of `input` that [`redact`] replaces, each with its replacement: the
/// matches of its first pass, in order, then those of each later pass, whose
/// spans in the text that pass read are taken back to the bytes of `input` they
/// stand for (a replacement, to the whole span it replaced).
pub(super) fn spans(rules: &Rules, input: &[u8]) -> Vec<(std::ops::Range<usize>, &'static [u8])> {
    use std::ops::Range;
    let mut found = Vec::new();
    let mut text = std::borrow::Cow::Borrowed(input);
    // For each byte of `text`, and its end, the bytes of `input` it stands for;
    // `None` while `text` is `input`.
    let mut origin: Option<Vec<Range<usize>>> = None;
    for _ in 0..MAX_PASSES {
        let mut candidates = Candidates::new(rules, &text);
        let mut pass = Vec::new();
        let again = each_match(
            rules,
            &text,
            |from| candidates.next(from),
            |m| pass.push((m.start..m.end, m.with)),
        );
        let in_input = |r: &Range<usize>| match &origin {
            None => r.clone(),
            Some(o) if r.is_empty() => o[r.start].start..o[r.start].start,
            Some(o) => o[r.start].start..o[r.end - 1].end,
        };
        let here: Vec<_> = pass.iter().map(|(r, with)| (in_input(r), *with)).collect();
        // A pass that asks for another has matched (see `each_match`).
        if !again {
            found.extend(here);
            break;
        }
        let o = origin.unwrap_or_else(|| (0..=input.len()).map(|k| k..k + 1).collect());
        let (mut next, mut next_origin) = (Vec::new(), Vec::new());
        let mut last = 0;
        for ((r, with), (r_in, _)) in pass.iter().zip(&here) {
            next.extend_from_slice(&text[last..r.start]);
            next_origin.extend_from_slice(&o[last..r.start]);
            next.extend_from_slice(with);
            next_origin.extend(std::iter::repeat_n(r_in.clone(), with.len()));
            last = r.end;
        }
        next.extend_from_slice(&text[last..]);
        next_origin.extend_from_slice(&o[last..]);
        found.extend(here);
        text = std::borrow::Cow::Owned(next);
        origin = Some(next_origin);
    }
    found
}

/// [`each_match`], writing the text with every match replaced (`None` when nothing
/// matched), and whether the output must be read again.
fn redact_at(
    rules: &Rules,
    input: &[u8],
    next: impl FnMut(usize) -> usize,
) -> (Option<Vec<u8>>, bool) {
    let mut out: Option<Vec<u8>> = None;
    let mut last = 0;
    let again = each_match(rules, input, next, |m| {
        let o = out.get_or_insert_with(|| Vec::with_capacity(input.len()));
        o.extend_from_slice(&input[last..m.start]);
        o.extend_from_slice(m.with);
        last = m.end;
    });
    let Some(mut o) = out else {
        return (None, false);
    };
    o.extend_from_slice(&input[last..]);
    (Some(o), again)
}

/// The scan over the candidate positions `next(from)` returns: the first position at
/// or after `from` where a rule can start (by the pair table), or `input.len()`.
/// `from` never decreases from one call to the next. Calls `found` with each match,
/// in order; matches do not overlap.
///
/// Returns whether the output must be read again ([`until_settled`]): a match that
/// starts in a URL's authority covered the byte that ended it and changed it to a
/// replacement that an authority may run through (`****`, `REDACTED`), or a URL's
/// password was held for a match that took its `://`. A match whose bytes are
/// already its replacement (text redacted before) changes nothing and asks for no
/// other pass.
fn each_match(
    rules: &Rules,
    input: &[u8],
    mut next: impl FnMut(usize) -> usize,
    mut found: impl FnMut(&Match),
) -> bool {
    let n = input.len();
    let mut i = 0;
    // The authority of the last URL the scan read: its first byte and the byte that
    // ended it (authorities do not overlap, so no earlier one is still open).
    let mut open: Option<(usize, usize)> = None;
    let mut again = false;
    // The JWT rule failed for every start before this index.
    let mut jwt_fail_until = 0;
    // A URL's password, found from the `://` before its user name, held back while
    // the rules run over that user name: a secret there (a key, a token as the user
    // name) is found as anywhere else. Every other rule's match starts at most a
    // separator, a quote or its own prefix after the position that found it, so
    // only this one passes over bytes that no rule has read.
    let mut held: Option<Match> = None;
    loop {
        i = next(i);
        if let Some(h) = held.take_if(|h| i >= h.start) {
            found(&h);
            i = i.max(h.end);
            continue;
        }
        if i >= n {
            break;
        }
        let b = input[i];
        let mut url = false;
        let m = match b {
            b'=' => field(rules, input, i),
            b':' => {
                if input[i + 1..].starts_with(b"//") {
                    url = true;
                    let a = authority(input, i + 3);
                    open = Some((i + 3, a.0));
                    url_credentials(a)
                } else {
                    field(rules, input, i)
                }
            }
            b'-' => pem(input, i),
            b'_' | b'%' => key(input, i),
            _ => {
                let mut m = None;
                if b == b'b' || b == b'B' {
                    m = scheme(input, i);
                }
                if m.is_none() && b == b'e' && i >= jwt_fail_until {
                    match jwt(input, i) {
                        Ok(found) => m = Some(found),
                        Err(until) => jwt_fail_until = until,
                    }
                }
                if m.is_none() {
                    m = shapes(rules, input, i);
                }
                m
            }
        };
        match m {
            Some(m) if url && held.is_none() => {
                held = Some(m);
                i += 1;
            }
            Some(mut m) => {
                if let Some(h) = held.take_if(|h| m.start >= h.start) {
                    // At or past the password: the password first, and the scan
                    // goes on after it, as it does after any match.
                    found(&h);
                    i = i.max(h.end);
                    continue;
                }
                if let Some(h) = &held {
                    // In the user name: a match that would run on through the `:`
                    // before the password (a field's value) ends there, and a
                    // field's value is replaced by `****`, not `REDACTED`, at which
                    // the URL rule stops: a second pass then reads the same URL
                    // and makes the same matches.
                    m.end = m.end.min(h.start - 1);
                    if m.with == REDACTED {
                        m.with = STARS;
                    }
                    if m.end <= m.start {
                        i += 1;
                        continue;
                    }
                }
                found(&m);
                if open.is_some_and(|(from, end)| (from..=end).contains(&m.start) && m.end > end)
                    && (m.with == STARS || m.with == REDACTED)
                    && input[m.start..m.end] != *m.with
                {
                    again = true;
                }
                i = m.end.max(i + 1);
                // A match that took a URL's `://` and ends in its user name (a
                // quoted value, `password='https://u'x:pw@h`): the
                // URL rule starts at that `://` and would not run, so its password
                // is held here, and the rest of the user name read, as above.
                if held.is_none()
                    && !url
                    && let Some(k) = input[m.start..m.end].windows(3).rposition(|w| w == b"://")
                {
                    let a = authority(input, m.start + k + 3);
                    open = Some((m.start + k + 3, a.0));
                    // The password, or what of it runs on past the match (a quoted
                    // value that ends inside it: `password=' https://:a'b@h`).
                    if let Some(mut p) = url_credentials(a).filter(|p| p.end > m.end) {
                        p.start = p.start.max(m.end);
                        held = Some(p);
                        again = true;
                    }
                }
            }
            None => i += 1,
        }
    }
    again
}

/// Whether a rule can start at a byte `a` followed by `b` (`0` past the end).
#[inline]
fn hit(pairs: &[u64; 1024], a: u8, b: u8) -> bool {
    super::has_pair(pairs, a, b)
}

/// The first index at or after `from` where a rule can start (by the byte there and
/// the next one), or `input.len()`: one table lookup per byte.
fn next_candidate(pairs: &[u64; 1024], input: &[u8], from: usize) -> usize {
    let Some(rest) = input.get(from..) else {
        return input.len();
    };
    let mut it = rest.iter();
    let Some(&first) = it.next() else {
        return input.len();
    };
    let mut prev = first;
    for (off, &b) in it.enumerate() {
        if hit(pairs, prev, b) {
            return from + off;
        }
        prev = b;
    }
    if hit(pairs, prev, 0) {
        input.len() - 1
    } else {
        input.len()
    }
}

/// The prefilter: where in a text a rule can match, found by vectorised searches
/// instead of a look at every byte.
///
/// - The separators `=` and `:` and the `_` before a key body, which start rules
///   whatever follows them, are found 64 bytes at a time as a bit mask (SSE2
///   compares where the target has them), and with `memchr3` across stretches
///   without any (plain text).
/// - Every other rule needs a literal start of at least three bytes: `eyJ` (JWT),
///   `bea`/`bas` in any case (`Bearer`, `Basic`), `---` (PEM), `%5F` (an escaped
///   `_` before a key body), and the first three bytes of every shape's prefix in
///   each form the scan accepts (`_` and `-` also written `%5F`, `%2D`). These are
///   found with one Aho-Corasick automaton, which searches for a few dozen short
///   strings at once with SIMD (Teddy) where the CPU has it.
///
/// At any other position every rule fails, so skipping it changes nothing; a
/// proposed position is still confirmed by the pair table, so the scan runs its rules
/// at exactly the positions where the reference scan, which looks at every byte,
/// finds them a match (property-tested and fuzzed against it). A separator that
/// [`nothing_at`] turns down (one per field of a JSON line: the name before it is
/// plainly not sensitive) is passed over without running the rules at all.
#[derive(Clone)]
pub(super) struct Prefilter {
    /// The literal starts, with its SIMD prefilter.
    starts: aho_corasick::AhoCorasick,
}

/// Below this many bytes left, the scan reads byte by byte (see [`redact`]).
const SHORT: usize = 64;

/// The bytes that start a rule whatever follows them.
const SEPARATORS: [u8; 3] = [b'=', b':', b'_'];

impl Prefilter {
    pub(super) fn new(shapes: &[Shape]) -> Self {
        let mut starts: Vec<Vec<u8>> = Vec::new();
        for lit in [&b"eyJ"[..], b"---", b"%5F", b"%5f"] {
            starts.push(lit.to_vec());
        }
        for s in shapes {
            input_starts(&s.prefix, &mut Vec::new(), &mut starts);
        }
        starts.sort();
        starts.dedup();
        // Every literal once, in byte order, then the case variants of `bea` and
        // `bas`. The order changes nothing that is found (only where a match starts
        // is used); it decides how the SIMD search groups the literals, and this
        // one raises few false alarms on log lines and prose (benches/redact.rs).
        for word in [b"bea", b"bas"] {
            for mask in 0..8u8 {
                let mut w = *word;
                for (k, c) in w.iter_mut().enumerate() {
                    if mask >> k & 1 == 1 {
                        c.make_ascii_uppercase();
                    }
                }
                if !starts.iter().any(|s| *s == w) {
                    starts.push(w.to_vec());
                }
            }
        }
        Self {
            starts: aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostFirst)
                .kind(Some(aho_corasick::AhoCorasickKind::DFA))
                .build(&starts)
                .expect("a few dozen three-byte patterns always build"),
        }
    }
}

/// The separators among the 64 bytes of `block`, as bits (bit `k` for byte `k`).
#[inline(always)]
fn separator_bits(block: &[u8; 64]) -> u64 {
    block.chunks_exact(16).enumerate().fold(0, |m, (k, chunk)| {
        m | u64::from(separators_in(chunk.try_into().expect("16 bytes"))) << (16 * k)
    })
}

/// The separators among 16 bytes, as bits: SSE2 compares and a mask, where the
/// target has them.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline(always)]
pub(super) fn separators_in(chunk: [u8; 16]) -> u16 {
    use safe_arch::{cmp_eq_mask_i8_m128i, m128i, move_mask_i8_m128i, set_splat_i8_m128i};
    let v = m128i::from(chunk);
    let eq = |b: u8| cmp_eq_mask_i8_m128i(v, set_splat_i8_m128i(b as i8));
    let [x, y, z] = SEPARATORS;
    // The mask has one bit per byte: 16 bits.
    move_mask_i8_m128i(eq(x) | eq(y) | eq(z)) as u16
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
use separators_in_plain as separators_in;

/// The separators among 16 bytes, as bits, one byte at a time.
#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "sse2"))))]
#[inline(always)]
pub(super) fn separators_in_plain(chunk: [u8; 16]) -> u16 {
    chunk
        .iter()
        .enumerate()
        .fold(0, |m, (k, b)| m | u16::from(SEPARATORS.contains(b)) << k)
}

/// Whether one of the 64 bytes of `block` is a `\`: SSE2 compares and one mask,
/// where the target has them.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline(always)]
pub(super) fn block_has_backslash(block: &[u8; 64]) -> bool {
    use safe_arch::{cmp_eq_mask_i8_m128i, m128i, move_mask_i8_m128i, set_splat_i8_m128i};
    let eq = |k: usize| {
        let chunk: [u8; 16] = block[16 * k..16 * k + 16].try_into().expect("16 bytes");
        cmp_eq_mask_i8_m128i(m128i::from(chunk), set_splat_i8_m128i(b'\\' as i8))
    };
    move_mask_i8_m128i(eq(0) | eq(1) | eq(2) | eq(3)) != 0
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
use block_has_backslash_plain as block_has_backslash;

/// Whether one of the 64 bytes of `block` is a `\`, one byte at a time.
#[cfg(any(test, not(all(target_arch = "x86_64", target_feature = "sse2"))))]
#[inline(always)]
pub(super) fn block_has_backslash_plain(block: &[u8; 64]) -> bool {
    block.contains(&b'\\')
}

/// The first three bytes of every form of `prefix` that [`match_prefix`] accepts
/// (each `_` or `-` may be a percent-escape, in either case of hex digit).
fn input_starts(prefix: &[u8], acc: &mut Vec<u8>, out: &mut Vec<Vec<u8>>) {
    let Some((&c, rest)) = prefix.split_first().filter(|_| acc.len() < 3) else {
        out.push(acc[..acc.len().min(3)].to_vec());
        return;
    };
    let forms: &[&[u8]] = match c {
        b'_' => &[b"_", b"%5F", b"%5f"],
        b'-' => &[b"-", b"%2D", b"%2d"],
        _ => &[std::slice::from_ref(&c)],
    };
    for form in forms {
        let len = acc.len();
        acc.extend_from_slice(form);
        input_starts(rest, acc, out);
        acc.truncate(len);
    }
}

/// The candidate positions of one text: the prefilter's two searches, each result
/// kept until the scan has passed it, confirmed by the pair table.
struct Candidates<'a> {
    rules: &'a Rules,
    input: &'a [u8],
    /// The next separator that [`nothing_at`] keeps, at or after the last search's
    /// start (`None` before any).
    byte: Option<usize>,
    /// The next literal start, likewise.
    pair: usize,
}

impl<'a> Candidates<'a> {
    fn new(rules: &'a Rules, input: &'a [u8]) -> Self {
        Self {
            rules,
            input,
            byte: None,
            pair: 0,
        }
    }

    /// See [`redact_at`]; `from` never decreases.
    fn next(&mut self, mut from: usize) -> usize {
        let input = self.input;
        let n = input.len();
        let pre = &self.rules.prefilter;
        while from < n {
            if n - from < SHORT {
                return next_candidate(&self.rules.pairs, input, from);
            }
            let byte = match self.byte {
                Some(b) if b >= from => b,
                _ => *self.byte.insert(self.next_separator(from)),
            };
            if self.pair < from {
                self.pair = pre
                    .starts
                    .find(aho_corasick::Input::new(input).span(from..n))
                    .map_or(n, |m| m.start());
            }
            let c = byte.min(self.pair);
            if c >= n {
                break;
            }
            if c == byte {
                // A separator `nothing_at` keeps is in the pair table whatever
                // follows it (`_` by the letter or digit `nothing_at` saw after it).
                debug_assert!(hit(
                    &self.rules.pairs,
                    input[c],
                    input.get(c + 1).copied().unwrap_or(0)
                ));
                return c;
            }
            if hit(
                &self.rules.pairs,
                input[c],
                input.get(c + 1).copied().unwrap_or(0),
            ) && !nothing_at(self.rules, input, c, false)
            {
                return c;
            }
            from = c + 1;
        }
        // The last byte is also tried against the end of the input, as a pair with 0.
        if n > 0 && from < n && hit(&self.rules.pairs, input[n - 1], 0) {
            n - 1
        } else {
            n
        }
    }

    /// The first separator at or after `from` that [`nothing_at`] does not turn
    /// down, or `input.len()`: in JSON, the separators after the names of a line
    /// are passed over in this one loop.
    fn next_separator(&self, mut from: usize) -> usize {
        let input = self.input;
        // Whether the 64 bytes before `from` are known to hold no `\`.
        let mut clean_before = false;
        while let Some(block) = input.get(from..from + 64) {
            let block: &[u8; 64] = block.try_into().expect("64 bytes");
            let mut bits = separator_bits(block);
            if bits == 0 {
                // Sparse separators (plain text): `memchr3` takes longer strides.
                let [x, y, z] = SEPARATORS;
                match memchr::memchr3(x, y, z, &input[from + 64..]) {
                    Some(p) => from += 64 + p,
                    None => return input.len(),
                }
                clean_before = false;
                continue;
            }
            // With no `\` in this block or the one before, none is among the 18
            // bytes before any separator of this block.
            let clean = !block_has_backslash(block);
            let no_backslash = clean_before && clean;
            while bits != 0 {
                let c = from + bits.trailing_zeros() as usize;
                if !nothing_at(self.rules, input, c, no_backslash) {
                    return c;
                }
                bits &= bits - 1;
            }
            clean_before = clean;
            from += 64;
        }
        (from..input.len())
            .find(|&c| SEPARATORS.contains(&input[c]) && !nothing_at(self.rules, input, c, false))
            .unwrap_or(input.len())
    }
}

/// Whether no rule can match at `i`, told cheaply for the dense cases: a separator
/// after a name that is plainly not sensitive (one per field of a JSON line), and
/// an `_` not followed by the run of letters and digits a key body needs. At such a
/// position [`redact_at`] runs only the rule this answers for; `false` means "try".
/// `no_backslash`: the caller knows that none of the 18 bytes before `i` is a `\`.
#[inline(always)]
fn nothing_at(rules: &Rules, input: &[u8], i: usize, no_backslash: bool) -> bool {
    match input[i] {
        b'=' => rules.plainly_not_sensitive(input, i, no_backslash),
        b':' => {
            !input[i + 1..].starts_with(b"//")
                && rules.plainly_not_sensitive(input, i, no_backslash)
        }
        b'_' => input
            .get(i + 1..i + 5)
            .is_none_or(|next| !next.iter().all(|&c| is(c, ALNUM))),
        _ => false,
    }
}

/// Whether a token starting at `i` is not glued to a word on its left. A
/// percent-escape (`%20`) or a backslash escape (`\n` in JSON) counts as a boundary.
fn left_boundary(input: &[u8], i: usize) -> bool {
    if i == 0 || !is(input[i - 1], ALNUM) {
        return true;
    }
    if i >= 2 && input[i - 2] == b'\\' {
        return true;
    }
    i >= 3
        && input[i - 3] == b'%'
        && input[i - 2].is_ascii_hexdigit()
        && input[i - 1].is_ascii_hexdigit()
}

/// Whether `b` can be part of a field name (`[A-Za-z0-9_.%-]`).
pub(super) fn is_name_byte(b: u8) -> bool {
    is(b, NAME)
}

fn run(input: &[u8], from: usize, mask: u8) -> usize {
    let mut j = from;
    while j < input.len() && is(input[j], mask) {
        j += 1;
    }
    j
}

fn shapes(rules: &Rules, input: &[u8], i: usize) -> Option<Match> {
    let b = input[i];
    for s in rules.shapes_from(b) {
        let Some(start) = match_prefix(input, i, &s.prefix) else {
            continue;
        };
        if s.boundary && !left_boundary(input, i) {
            continue;
        }
        let mask = s.set.mask();
        let end = if s.exact {
            let end = start + s.min;
            if end > input.len()
                || !input[start..end].iter().all(|&c| is(c, mask))
                || input.get(end).is_some_and(|&c| is(c, ALNUM))
            {
                continue;
            }
            end
        } else {
            let (end, len) = run_escaped(input, start, mask);
            if len < s.min {
                continue;
            }
            end
        };
        return Some(Match {
            start,
            end,
            with: STARS,
        });
    }
    None
}

/// The end of `prefix` at `i`, where `_` and `-` may also be written `%5F` and `%2D`
/// (a key split across encodings in a logged URL).
fn match_prefix(input: &[u8], i: usize, prefix: &[u8]) -> Option<usize> {
    if input[i..].starts_with(prefix) {
        return Some(i + prefix.len());
    }
    let mut j = i;
    for &p in prefix {
        match input.get(j) {
            Some(&c) if c == p => j += 1,
            Some(b'%') if escape_of(input, j) == Some(p) && matches!(p, b'_' | b'-') => j += 3,
            _ => return None,
        }
    }
    Some(j)
}

/// The byte a `%XX` escape at `j` encodes.
fn escape_of(input: &[u8], j: usize) -> Option<u8> {
    if input.get(j) != Some(&b'%') || j + 2 >= input.len() {
        return None;
    }
    Some(hex(input[j + 1])? << 4 | hex(input[j + 2])?)
}

/// A run of `mask` bytes, where `_` and `-` may be percent-escaped when the set
/// holds them. Returns the end and the decoded length.
fn run_escaped(input: &[u8], from: usize, mask: u8) -> (usize, usize) {
    let mut j = from;
    let mut len = 0;
    while j < input.len() {
        if is(input[j], mask) {
            j += 1;
        } else if input[j] == b'%'
            && escape_of(input, j).is_some_and(|c| matches!(c, b'_' | b'-') && is(c, mask))
        {
            j += 3;
        } else {
            break;
        }
        len += 1;
    }
    (j, len)
}

/// This crate's API keys, `<prefix>_<body>`, found at the `_` (or `%5F`) before the
/// body, whatever the prefix:
///
/// - a body of exactly 28 letters and digits whose last six are the CRC32 of the
///   prefix, `_` and the first 22, for any prefix the key generator accepts (the
///   checksum makes this precise: a random word passes with odds of 1 in 2^32);
/// - a run of at least 20 letters and digits after a prefix registered by a key
///   store ([`prefixes`]), starting the prefix-character run or after a `_`.
///
/// The body becomes `****`; the prefix is kept as the hint. The prefix is read
/// backwards over at most 32 of `a-z 0-9 _` (an `_` may be written `%5F`); every
/// start inside it is tried, so a key glued to a word is found too. Work per `_` is
/// bounded: a run after one `_` ends at the next, so runs are read once each.
fn key(input: &[u8], i: usize) -> Option<Match> {
    let start = match input[i] {
        b'_' => i + 1,
        _ if is_escaped_underscore(input, i) => i + 3,
        _ => return None,
    };
    let end = run(input, start, ALNUM);
    let len = end - start;
    if len < prefixes::MIN_RUN || (len != BODY_LEN && prefixes::is_empty()) {
        return None;
    }
    // The prefix characters before the separator, decoded, right-aligned in `buf`.
    let mut buf = [0u8; MAX_PREFIX_LEN];
    let mut n = 0;
    let mut j = i;
    while n < MAX_PREFIX_LEN && j > 0 {
        let c = if j >= 3 && is_escaped_underscore(input, j - 3) {
            j -= 3;
            b'_'
        } else if matches!(input[j - 1], b'a'..=b'z' | b'0'..=b'9' | b'_') {
            j -= 1;
            input[j]
        } else {
            break;
        };
        n += 1;
        buf[MAX_PREFIX_LEN - n] = c;
    }
    let region = &buf[MAX_PREFIX_LEN - n..];
    if region.last().is_none_or(|&c| c == b'_') {
        return None;
    }
    let found = (len == BODY_LEN && ends_with_checksummed_prefix(region, &input[start..end]))
        || prefixes::registered().any(|p| {
            region.ends_with(p)
                && (region.len() == p.len() || region[region.len() - p.len() - 1] == b'_')
        });
    found.then_some(Match {
        start,
        end,
        with: STARS,
    })
}

/// Whether `%5F` (or `%5f`), an escaped `_`, starts at `j`.
fn is_escaped_underscore(input: &[u8], j: usize) -> bool {
    input.len() >= j + 3
        && input[j] == b'%'
        && input[j + 1] == b'5'
        && matches!(input[j + 2], b'F' | b'f')
}

/// `eyJ<header>.<payload>.<signature>`: keeps `eyJ`. Each segment may end in
/// base64 padding (`=`, `==`). On failure returns the index before which no other
/// start can succeed (the same segments would be re-read).
///
/// Only a header whose JSON starts with `{"` is looked for (`eyJ`), as every JWT
/// library writes it: a header with whitespace after its `{` would need four more
/// starts in the prefilter (`eyA`, `ewo`, `ew0`, `ewk`), which would slow every
/// clean text by a fifth.
fn jwt(input: &[u8], i: usize) -> Result<Match, usize> {
    if !input[i..].starts_with(b"eyJ") {
        return Err(0);
    }
    let h = segment(input, i);
    if h - i < 10 || input.get(h) != Some(&b'.') {
        return Err(h);
    }
    let p = segment(input, h + 1);
    if p - (h + 1) < 2 || input.get(p) != Some(&b'.') {
        return Err(p);
    }
    let end = segment(input, p + 1);
    Ok(Match {
        start: i + 3,
        end,
        with: STARS,
    })
}

/// The bytes of a JWT segment other than padding.
const JWT_SEGMENT: u8 = ALNUM | UNDERSCORE | DASH;

/// The end of the JWT segment at `from`: base64url, then up to two `=` when no
/// segment byte follows them (`sig=abc` is not padding).
fn segment(input: &[u8], from: usize) -> usize {
    let end = run(input, from, JWT_SEGMENT);
    let pad = input[end..]
        .iter()
        .take(2)
        .take_while(|&&c| c == b'=')
        .count();
    if pad > 0
        && input
            .get(end + pad)
            .is_some_and(|&c| is(c, JWT_SEGMENT) || c == b'=')
    {
        return end;
    }
    end + pad
}

/// `Bearer <credential>` / `Basic <credential>` anywhere in text.
fn scheme(input: &[u8], i: usize) -> Option<Match> {
    if !left_boundary(input, i) {
        return None;
    }
    let word_len = if starts_with_ci(&input[i..], b"bearer") {
        6
    } else if starts_with_ci(&input[i..], b"basic") {
        5
    } else {
        return None;
    };
    let word = &input[i..i + word_len];
    let after = i + word_len;
    if after < input.len() && is(input[after], ALNUM | UNDERSCORE | DASH) {
        return None;
    }
    let start = skip_separators(input, after);
    if start == after {
        return None;
    }
    if starts_pem(input, start) {
        return None;
    }
    let end = b64token(input, start);
    let cred = &input[start..end];
    if is_scheme(cred) {
        // `Bearer Bearer x`: the second word is the scheme of the credential.
        return None;
    }
    let lowercase_word = word.iter().all(u8::is_ascii_lowercase);
    // A capitalised scheme word is an HTTP header; a lower-case one may be prose
    // ("the bearer authentication scheme"), so its credential must look like one.
    let ok = if lowercase_word {
        cred.len() >= 8 && looks_like_credential(cred)
    } else {
        cred.len() >= 4
    };
    ok.then_some(Match {
        start,
        end,
        with: STARS,
    })
}

/// RFC 6750 `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
/// Padding only at the end, so a run never reaches into a following `name=value`.
fn b64token(input: &[u8], start: usize) -> usize {
    let mut end = run(input, start, ALNUM | UNDERSCORE | DASH | CRED_EXTRA_NO_PAD);
    if end > start {
        let unpadded = end;
        while input.get(end) == Some(&b'=') {
            end += 1;
        }
        // `Bearer password=x` is a name and a value, not a padded token; so is
        // `Bearer password=****`, which a value hidden in a URL's user name becomes
        // (a second pass must read it as the first did).
        if end > unpadded
            && (input[end..].starts_with(STARS)
                || input.get(end).is_some_and(|&c| is(c, ALNUM | UNDERSCORE)))
        {
            end = unpadded;
        }
    }
    end
}

fn looks_like_credential(c: &[u8]) -> bool {
    c.iter()
        .any(|&b| b.is_ascii_digit() || b.is_ascii_uppercase() || is(b, CRED_EXTRA | DASH))
}

/// Spaces, tabs, `+` and `%20` between a scheme word and its credential.
fn skip_separators(input: &[u8], mut j: usize) -> usize {
    loop {
        match input.get(j) {
            Some(b' ' | b'\t' | b'+') => j += 1,
            Some(b'%') if input[j..].starts_with(b"%20") => j += 3,
            _ => return j,
        }
    }
}

fn starts_with_ci(s: &[u8], word: &[u8]) -> bool {
    s.len() >= word.len() && s[..word.len()].eq_ignore_ascii_case(word)
}

/// `scheme://user:password@host`: the password becomes `****`. Reads the
/// [`authority`] after the `://`.
///
/// The authority is the run of bytes a URL parser keeps in one: those RFC 3986
/// allows (letters, digits, `-._~`, `%`, the sub-delims `!$&'()*+,;=`, `:`, `@`,
/// `[`, `]`), and those the WHATWG parser (the `url` crate's, which the `redis`
/// and `reqwest` crates use) also takes into a user name or password and
/// percent-encodes there: `^`, `{`, `}`, `|`, `<`, `>`, `` ` `` and non-ASCII
/// bytes. A generated password holding them works in such a URL written as is
/// (`redis://:Xy7^k{9|Q@cache`), so it must be hidden as written. The authority
/// ends at `/`, `?`, `#`, whitespace, a `"`, a `\`, a control character or the end
/// of the input: bytes that end a URL in the text around it (a quoted string, a
/// JSON string, a sentence). As the `url` crate reads it, the userinfo runs to the
/// authority's last `@` and the password from the first `:` in it:
/// `redis://:pa@ss;w@host` hides `pa@ss;w`.
///
/// The authority also ends before a `REDACTED` that starts a word, as the field
/// rule's replacement does: a field inside an authority that the first pass hid,
/// with the byte that ended the authority (`redis://password:?;@` becomes
/// `redis://password:REDACTED;@`, `://(password=x/y':@` becomes
/// `://(password=REDACTED':@`), must not join the `@` after it on a second pass, or
/// redaction would not be idempotent. A user name or password that itself starts a
/// word with that one is then not read as part of a URL; glued to the letters or
/// digits before it (a token holding the word) it is.
///
/// An authority holds no `/`, so the authorities read from two `://` never
/// overlap: each byte is read once by this rule, and the work is linear however
/// long the authority is.
fn url_credentials((_, colon, at): (usize, Option<usize>, Option<usize>)) -> Option<Match> {
    let at = at?;
    let colon = colon.filter(|&c| c < at)?;
    Some(Match {
        start: colon + 1,
        end: at,
        with: STARS,
    })
}

/// The URL authority that starts at `from` (after `://`), from which
/// [`url_credentials`] reads the password: where it ends, its first `:` and its last `@`.
fn authority(input: &[u8], from: usize) -> (usize, Option<usize>, Option<usize>) {
    let mut colon = None;
    let mut at = None;
    let mut j = from;
    while j < input.len()
        && in_authority(input[j])
        && !(input[j] == b'R'
            && input[j..].starts_with(REDACTED)
            && (j == 0 || !input[j - 1].is_ascii_alphanumeric()))
    {
        match input[j] {
            b'@' => at = Some(j),
            b':' if colon.is_none() => colon = Some(j),
            _ => {}
        }
        j += 1;
    }
    (j, colon, at)
}

/// The end of a field's value that starts at `v`: where `end_from(from)` ends it,
/// or, when a URL starts in it, not before the end of that URL's authority, then
/// where `end_from` ends a value from there, and so on while the value takes in
/// another URL. A delimiter in a user name (`password=redis://u;x:pw@h`) would
/// otherwise end the value and leave the password after it, which the URL rule,
/// whose `://` the value took, no longer sees. Only the last `://` before the end
/// can start an authority that runs past it (an authority holds no `/`), so each
/// round looks only at what the last one added: the work is linear.
fn value_end(input: &[u8], v: usize, from: usize, end_from: impl Fn(usize) -> usize) -> usize {
    let mut e = end_from(from);
    let mut search = v;
    while let Some(k) = input[search..e].windows(3).rposition(|w| w == b"://") {
        let (a, _, _) = authority(input, search + k + 3);
        // Never into a private key block, which its own rule hides whole.
        let a = (e..a).find(|&p| starts_pem(input, p)).unwrap_or(a);
        if a <= e {
            break;
        }
        (search, e) = (e - 2, end_from(a));
    }
    e
}

/// Whether `c` can be part of a URL's authority (see [`url_credentials`]).
fn in_authority(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || c >= 0x80
        || matches!(
            c,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'['
                | b']'
                | b'^'
                | b'{'
                | b'}'
                | b'|'
                | b'<'
                | b'>'
                | b'`'
        )
}

/// `-----BEGIN … PRIVATE KEY-----` and everything after it up to and including
/// the next `-----END …-----` line, replaced as a whole: the base64 body and any
/// armor header lines before it (`Proc-Type:` and `DEK-Info:` of an encrypted key,
/// OpenPGP's `Version:` and `Comment:`), whatever bytes they hold, raw or with
/// escaped line breaks (`\n`, `\\n`, `\r\n`).
///
/// Without an END line the block is taken to the end of the text that holds it,
/// so that no part of the body is left (trailing whitespace and escaped line
/// breaks are kept out):
/// - written on lines of its own (a raw line break after the BEGIN line): to the
///   end of the input, a writer's whole event;
/// - otherwise (line breaks escaped, as in a JSON string, or none): to the first
///   `"` that is not backslash-escaped and can end a JSON string (`,`, `:`, `}`,
///   `]` or the end of the input after it), which ends the string holding the
///   block, so that the document's structure after it is kept; or to the end of the
///   input. A quote inside the block (`Comment: "backup"`) does not end it.
///
/// Work is linear: the bytes read are the ones the match then covers, apart from
/// the trailing whitespace left out, and the label after each `-----END ` is read
/// once (a label holds no `-`).
fn pem(input: &[u8], i: usize) -> Option<Match> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    if !input[i..].starts_with(BEGIN) {
        return None;
    }
    let label_start = i + BEGIN.len();
    let label_end = label(input, label_start)?;
    if !contains(&input[label_start..label_end], b"PRIVATE KEY") {
        return None;
    }
    let body = label_end + 5;
    let raw_lines = input[body..]
        .iter()
        .find(|c| !matches!(c, b' ' | b'\t'))
        .is_some_and(|c| matches!(c, b'\r' | b'\n'));
    let mut j = body;
    // Backslashes right before `j`: a `"` after an odd number is escaped.
    let mut backslashes = 0usize;
    while j < input.len() {
        let c = input[j];
        if c == b'-'
            && input[j..].starts_with(END)
            && let Some(e) = label(input, j + END.len())
        {
            return Some(Match {
                start: i,
                end: e + 5,
                with: PEM,
            });
        }
        if c == b'"' && !raw_lines && backslashes.is_multiple_of(2) && closes_json_string(input, j)
        {
            break;
        }
        backslashes = if c == b'\\' { backslashes + 1 } else { 0 };
        j += 1;
    }
    Some(Match {
        start: i,
        end: without_trailing_breaks(input, body, j),
        with: PEM,
    })
}

/// `end`, moved back over whitespace and escaped line breaks (`\n`, `\\r`, `\t`)
/// but not before `from`.
fn without_trailing_breaks(input: &[u8], from: usize, mut end: usize) -> usize {
    while end > from {
        match input[end - 1] {
            b' ' | b'\t' | b'\r' | b'\n' => end -= 1,
            b'n' | b'r' | b't' if end - 1 > from && input[end - 2] == b'\\' => {
                end -= 1;
                while end > from && input[end - 1] == b'\\' {
                    end -= 1;
                }
            }
            _ => break,
        }
    }
    end
}

/// A PEM label (`RSA PRIVATE KEY`) followed by `-----`: returns the label's end.
fn label(input: &[u8], from: usize) -> Option<usize> {
    let mut j = from;
    while j < input.len()
        && j - from <= 64
        && (input[j].is_ascii_uppercase() || input[j].is_ascii_digit() || input[j] == b' ')
    {
        j += 1;
    }
    input[j..].starts_with(b"-----").then_some(j)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `name=value`, `name: value`, `"name":"value"`, `\"name\": \"value\"` where the
/// name is sensitive: the value becomes `REDACTED` (or `Bearer ****` for an
/// authorization value with a scheme word). `sep` is the index of `=` or `:`.
fn field(rules: &Rules, input: &[u8], sep: usize) -> Option<Match> {
    if rules.plainly_not_sensitive(input, sep, false) {
        return None;
    }
    field_closely(rules, input, sep)
}

/// Whether [`field`]'s shortcut agrees with its long way round at `sep`: when the
/// shortcut turns the name down, the full rule finds nothing either.
#[cfg(test)]
pub(super) fn field_shortcut_holds(rules: &Rules, input: &[u8], sep: usize) -> bool {
    !rules.plainly_not_sensitive(input, sep, false) || field_closely(rules, input, sep).is_none()
}

/// [`field`] without the shortcut for the common `name=`, `name:` and `"name":`.
fn field_closely(rules: &Rules, input: &[u8], sep: usize) -> Option<Match> {
    // Look back over spaces (up to [`MAX_PADDING`]: `password      = v` in an aligned
    // listing), closing quotes and escapes to the name.
    let mut j = sep;
    while j > 0 && matches!(input[j - 1], b' ' | b'\t') && sep - j < MAX_PADDING {
        j -= 1;
    }
    let quotes_end = j;
    while j > 0 && matches!(input[j - 1], b'"' | b'\'' | b'\\') && quotes_end - j < 8 {
        j -= 1;
    }
    let name_end = j;
    // `"name":`, a member of a JSON object: its closing quote is not escaped (an
    // even number of backslashes before it), so it is not inside a string.
    let member = input[sep] == b':'
        && quotes_end > 0
        && input[quotes_end - 1] == b'"'
        && input[..quotes_end - 1]
            .iter()
            .rev()
            .take_while(|&&c| c == b'\\')
            .count()
            % 2
            == 0;
    // Most names are turned down by their last two letters.
    if rules.surely_not_sensitive(&input[name_end.saturating_sub(MAX_NAME)..name_end]) {
        return None;
    }
    // The brackets of a name ending in `]` belong to it (`user[password]`): the
    // name rule reads its segments. Elsewhere a `[` starts a name (`map[key:v]`).
    let brackets = name_end > 0 && input[name_end - 1] == b']';
    while j > 0
        && name_end - j < MAX_NAME
        && (is(input[j - 1], NAME)
            || brackets && matches!(input[j - 1], b'[' | b']')
            || json_escape(&input[j - 1..name_end.min(j + 5)]).is_some())
    {
        j -= 1;
    }
    if j == name_end {
        return None;
    }
    // A name is whole when nothing name-like (nor the end of a replacement) is on its left.
    let whole = j == 0 || !matches!(input[j - 1], b'*' | b']') && !is(input[j - 1], NAME);
    if !rules.is_sensitive_name(&input[j..name_end], whole) {
        return None;
    }
    // Forward to the value, past Ruby's `=>` (`"password" => "v"`).
    let mut v = sep + 1 + usize::from(input[sep] == b'=' && input.get(sep + 1) == Some(&b'>'));
    while v < input.len() && matches!(input[v], b' ' | b'\t') {
        v += 1;
    }
    let (start, end) = if input[v..].starts_with(b"\\\"") {
        let start = v + 2;
        // It ends before a private key block, which its own rule hides whole (its
        // line breaks are escaped here, so a `\` would end the value in its first line).
        let end = input[start..]
            .iter()
            .position(|&c| c == b'\\' || c == b'"')
            .map_or(input.len(), |p| start + p);
        let end = (start..end).find(|&p| starts_pem(input, p)).unwrap_or(end);
        (start, end)
    } else if v < input.len() && (input[v] == b'"' || input[v] == b'\'') {
        let q = input[v];
        if q == b'"' && !member && closes_json_string(input, v) {
            // `"k":"token=","n":1`: the quote ends the string the name is in; what
            // follows is the document's structure, not a value.
            return None;
        }
        let start = v + 1;
        let mut e = start;
        // A quoted value ends at its quote, or where the JSON string it is in ends
        // (`"k":"token='abc","n":1` keeps `","n":1`), so that a replacement never
        // takes in the structure of a JSON line.
        while e < input.len()
            && input[e] != q
            && !(input[e] == b'"' && closes_json_string(input, e))
        {
            e += if input[e] == b'\\' { 2 } else { 1 };
        }
        (start, e.min(input.len()))
    } else if member && matches!(input.get(v), Some(b'{' | b'[')) {
        // An object or array as a member's value: its own members are looked at by
        // their names, and its strings by their shapes.
        return None;
    } else if let Some(e) = member.then(|| json_scalar(input, v)).flatten() {
        // A number, `true`, `false` or `null` as a member's value: replaced by a
        // string, so that the document stays valid JSON.
        return Some(Match {
            start: v,
            end: e,
            with: QUOTED_REDACTED,
        });
    } else {
        if input[v..].starts_with(PEM) {
            // Already redacted by the rule below.
            return Some(Match {
                start: v,
                end: v + PEM.len(),
                with: PEM,
            });
        }
        if input[v..].starts_with(b"-----BEGIN ")
            && let Some(m) = pem(input, v)
        {
            return Some(m);
        }
        // A Rust `Debug` value (`Some("…")`, `ApiToken("…")`) is hidden whole; the
        // rules below then run on from its end, as from a value's start.
        let mut e = debug_value(input, v).unwrap_or(v);
        if Rules::is_wide_name(&input[j..name_end]) {
            e = value_end(input, v, e, |mut e| {
                while e < input.len()
                    && !matches!(input[e], b'\r' | b'\n' | b'"' | b'\'' | b'\\')
                    && !starts_pem(input, e)
                {
                    e += 1;
                }
                e
            });
            // Keep the separator to the next field (`"cookie": Sensitive, "x": 1`).
            while e > v && matches!(input[e - 1], b' ' | b',' | b'\t') {
                e -= 1;
            }
            return (e > v).then_some(Match {
                start: v,
                end: e,
                with: REDACTED,
            });
        }
        e = value_end(input, v, e, |mut e| {
            while e < input.len() && !is(input[e], DELIM) && !starts_pem(input, e) {
                e += 1;
            }
            e
        });
        // `password: X-Api-Key: v`: a trailing `:` makes the word a name of its own,
        // left for the rule at that `:`.
        while e > v && input[e - 1] == b':' {
            e -= 1;
        }
        // A replacement followed by `:` is that replacement alone, so that a second
        // pass leaves the first one's output as it is (`KEY=cookie:` gives
        // `KEY=REDACTED:`, whose `:` then starts a field of its own).
        if input[v..e].starts_with(REDACTED) && input.get(v + REDACTED.len()) == Some(&b':') {
            e = v + REDACTED.len();
        }
        // The end of an unquoted credential that starts at `c`; as a value's, a
        // credential that holds a URL runs at least to the end of its authority
        // ([`value_end`]), so that its password is hidden whatever it holds.
        // It stops before a private key block, as a value does, for the block's rule.
        let to_delimiter = |mut c: usize| {
            while c < input.len() && !is(input[c], DELIM) && !starts_pem(input, c) {
                c += 1;
            }
            c
        };
        // The credential after a scheme word that ends at `from`: the next word, or,
        // while that word names a credential in its place ([`names_credential`]:
        // `Bearer {Bearer abc`), the word after it.
        let credential = |from: usize| {
            let mut c = skip_separators(input, from);
            let mut ce = c;
            loop {
                ce = to_delimiter(ce);
                let next = skip_separators(input, ce);
                if !names_credential(&input[c..ce]) || next == ce {
                    return (c, ce);
                }
                (c, ce) = (next, next);
            }
        };
        if is_scheme(&input[v..e]) {
            // An unquoted scheme word: the credential is hidden, the words before
            // it kept.
            let (c, ce) = credential(e);
            if c > e && ce > c && !starts_pem(input, c) {
                return Some(Match {
                    start: c,
                    end: value_end(input, c, ce, to_delimiter),
                    with: STARS,
                });
            }
        } else if ends_with_scheme(&input[v..e]) {
            // `password=(Bearer abc`: the credential after the space goes too.
            let (c, ce) = credential(e);
            if c > e && ce > c && !starts_pem(input, c) {
                return Some(Match {
                    start: v,
                    end: value_end(input, c, ce, to_delimiter),
                    with: REDACTED,
                });
            }
        }
        (v, e)
    };
    if start >= end {
        return None;
    }
    // A quoted value with a scheme word: keep the word.
    let value = &input[start..end];
    if let Some(w) = value.iter().position(|&c| c == b' ')
        && is_scheme(&value[..w])
    {
        let c = skip_separators(input, start + w);
        if c < end {
            return Some(Match {
                start: c,
                end,
                with: STARS,
            });
        }
    }
    Some(Match {
        start,
        end,
        with: REDACTED,
    })
}

/// Whether the `"` at `i` can end a JSON string: what follows it, past any
/// whitespace, is `,`, `:`, `}`, `]` or the end of the input.
fn closes_json_string(input: &[u8], i: usize) -> bool {
    input[i + 1..]
        .iter()
        .find(|c| !matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
        .is_none_or(|c| matches!(c, b',' | b':' | b'}' | b']'))
}

/// The end of the JSON number or literal (`true`, `false`, `null`) at `v`, if one is
/// there and ends at `,`, `}`, `]`, whitespace or the end of the input. Reads only
/// the run of letters, digits, `+`, `-` and `.` at `v`, which no separator is in, so
/// the scan stays linear however many members there are.
fn json_scalar(input: &[u8], v: usize) -> Option<usize> {
    let e = input[v..]
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')))
        .map_or(input.len(), |p| v + p);
    if !input
        .get(e)
        .is_none_or(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
    {
        return None;
    }
    let t = &input[v..e];
    let number = t.first().is_some_and(|c| c.is_ascii_digit() || *c == b'-')
        && t.iter()
            .all(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'));
    (number || matches!(t, b"true" | b"false" | b"null")).then_some(e)
}

/// Longest Rust `Debug` value [`debug_value`] reads.
const MAX_DEBUG: usize = 4096;

/// The end of a Rust `Debug` value `Ident(…)` at `v` (`Some("x")`,
/// `ApiToken("x")`, nested, written as is or JSON-escaped inside a JSON string):
/// after its matching `)`, with parentheses inside its strings ignored. It ends
/// earlier where the JSON string holding it ends, so a replacement never takes in a
/// JSON line's structure: in a JSON-escaped value (its first quote is `\"`, or a
/// `\` comes before any quote) at any raw `"`; in a value written as is, at a `"`
/// that opens no string but can end a JSON one ([`closes_json_string`]). Reads at
/// most [`MAX_DEBUG`] bytes and ends there if no `)` closed it: every byte read is
/// in the value, which the scan then jumps over. `None` when no identifier and `(`
/// start at `v`.
fn debug_value(input: &[u8], v: usize) -> Option<usize> {
    let name = input[v..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    if name == 0 || !input[v].is_ascii_alphabetic() || input.get(v + name) != Some(&b'(') {
        return None;
    }
    let end = input.len().min(v + MAX_DEBUG);
    // Whether the value is JSON-escaped: unknown until its first quote or `\`.
    let mut escaped: Option<bool> = None;
    // Inside a string of the value, and after its `\`.
    let (mut in_string, mut after_backslash) = (false, false);
    let mut depth = 0usize;
    let mut k = v + name;
    while k < end {
        // The byte of the `Debug` text at `k`, and how many bytes of input it takes.
        let (c, width) = match input[k] {
            b'"' if escaped == Some(true) => return Some(k),
            b'"' if !in_string && closes_json_string(input, k) => return Some(k),
            b'\\' if escaped != Some(false) => {
                escaped = Some(true);
                match input.get(k + 1) {
                    Some(&d @ (b'"' | b'\\')) => (d, 2),
                    // Another escape (`\n`, `\u0041`) is no quote, backslash or parenthesis.
                    Some(_) => (b' ', 2),
                    None => return Some(k + 1),
                }
            }
            c => (c, 1),
        };
        if c == b'"' && escaped.is_none() {
            escaped = Some(false);
        }
        k += width;
        if in_string {
            if after_backslash {
                after_backslash = false;
            } else if c == b'\\' {
                after_backslash = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(k);
                }
            }
            _ => {}
        }
    }
    // `k` is past `end` only by the second byte of an escape.
    Some(k)
}

/// Whether a PEM block (or its replacement) starts at `e`: a field value stops
/// there and leaves the block to its own rule.
fn starts_pem(input: &[u8], e: usize) -> bool {
    e < input.len()
        && ((input[e] == b'-' && input[e..].starts_with(b"-----BEGIN "))
            || (input[e] == b'[' && input[e..].starts_with(PEM)))
}

/// Whether `value` ends with a scheme word that starts at a word boundary inside it
/// (after a non-alphanumeric byte, or a percent-escape of one: `%20Bearer`).
fn ends_with_scheme(value: &[u8]) -> bool {
    SCHEMES.iter().any(|s| {
        if value.len() <= s.len() || !value[value.len() - s.len()..].eq_ignore_ascii_case(s) {
            return false;
        }
        let before = &value[..value.len() - s.len()];
        !is(before[before.len() - 1], ALNUM) || ends_with_escaped_separator(before)
    })
}

/// Whether `b` ends with a percent-escape (`%20`) of a byte that is not a letter or digit.
fn ends_with_escaped_separator(b: &[u8]) -> bool {
    let n = b.len();
    n >= 3
        && b[n - 3] == b'%'
        && matches!((hex(b[n - 2]), hex(b[n - 1])), (Some(h), Some(l)) if !(h << 4 | l).is_ascii_alphanumeric())
}

/// Whether `word` names a credential rather than being one: a scheme word, alone
/// or glued after bytes that are neither letters, digits, `/` nor a lone `%`
/// (`{Bearer`, `(Basic`, `%22Bearer`). The field rule then takes the word after
/// it as the credential, and keeps `word` as it is: it holds nothing another rule
/// reads (no name, no prefix of a shape, no `://`), so the scan loses nothing by
/// going on after the credential.
fn names_credential(word: &[u8]) -> bool {
    SCHEMES.iter().any(|s| {
        let Some(split) = word.len().checked_sub(s.len()) else {
            return false;
        };
        if !word[split..].eq_ignore_ascii_case(s) {
            return false;
        }
        let mut before = &word[..split];
        loop {
            if ends_with_escaped_separator(before) {
                before = &before[..before.len() - 3];
                continue;
            }
            match before.split_last() {
                None => return true,
                Some((c, rest)) if !c.is_ascii_alphanumeric() && !matches!(c, b'/' | b'%') => {
                    before = rest;
                }
                Some(_) => return false,
            }
        }
    })
}

fn is_scheme(word: &[u8]) -> bool {
    SCHEMES.iter().any(|s| word.eq_ignore_ascii_case(s))
}

/// Normalises the tail of a field name for matching: ASCII lower case without `_`,
/// `-`, `.` and spaces (PHP reads `api key` as `api_key`), into `buf`; returns the
/// used length, whether the whole name fit, and where words start in it (bit `p`
/// for the byte at `p`): after a dropped separator, or at an upper-case letter after
/// a lower-case one (`dbPass`).
pub(super) fn normalise_name(name: &[u8], buf: &mut [u8; NAME_BUF]) -> (usize, bool, u128) {
    // Filled from the end: the suffix rules look at the end of a name.
    let mut k = buf.len();
    let mut i = name.len();
    let mut words = 0u128;
    // Whether the byte written last (the one after this one) is an upper-case letter.
    let mut after_upper = false;
    while i > 0 {
        i -= 1;
        let mut c = name[i];
        // A percent-escape (`api%5Fkey`) or a JSON escape (`\u0070assword`) counts
        // as the byte it encodes.
        if i >= 2
            && name[i - 2] == b'%'
            && let (Some(h), Some(l)) = (hex(name[i - 1]), hex(c))
        {
            c = h << 4 | l;
            i -= 2;
        } else if let Some(d) = json_escape(&name[i.saturating_sub(5)..=i]) {
            c = d;
            i -= 5;
        }
        if matches!(c, b'_' | b'-' | b'.' | b' ') {
            if k < buf.len() {
                words |= 1 << k;
            }
            after_upper = false;
            continue;
        }
        if k == 0 {
            return (buf.len(), false, words);
        }
        if after_upper && c.is_ascii_lowercase() {
            words |= 1 << k;
        }
        after_upper = c.is_ascii_uppercase();
        k -= 1;
        buf[k] = c.to_ascii_lowercase();
    }
    let n = buf.len() - k;
    buf.copy_within(k.., 0);
    (n, true, words.checked_shr(k as u32).unwrap_or(0))
}

/// Where words start in a name of letters and digits as written (see
/// [`normalise_name`]): at an upper-case letter after a lower-case one.
pub(super) fn camel_words(name: &[u8]) -> u128 {
    let mut words = 0u128;
    for (p, w) in name.windows(2).enumerate().take(NAME_BUF - 1) {
        if w[0].is_ascii_lowercase() && w[1].is_ascii_uppercase() {
            words |= 1 << (p + 1);
        }
    }
    words
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The byte `s` encodes when it is a JSON escape `\u00XX` of a field-name byte
/// (`\u0070` is `p`). JSON encoders do not write a letter so, but hand-made text
/// may, and a name written with one is still the name.
pub(super) fn json_escape(s: &[u8]) -> Option<u8> {
    let &[b'\\', b'u', b'0', b'0', h, l] = s else {
        return None;
    };
    let c = hex(h)? << 4 | hex(l)?;
    is(c, NAME).then_some(c)
}

/// Room for a normalised name.
pub(super) const NAME_BUF: usize = MAX_NAME;
