//! The one sanitiser for client-influenced text on its way into a log line.
//!
//! Every string a client can influence (the access log's path, query, user agent,
//! method and request id; a principal id, which is a token's `sub`; a token's `jti`,
//! `iss` and `kid`; a key id) passes through [`sanitize`] before it becomes a field
//! of an access or audit event. A client therefore cannot forge a line (CR, LF,
//! NEL, U+2028), colour or rewrite a terminal (ESC and the other C0/C1 controls),
//! reorder what a reader sees (bidirectional embeddings, overrides, isolates and
//! marks), or hide text (zero-width and other invisible format characters).
//!
//! Such characters are *escaped* (`\u{202e}`), not removed: removing them would join
//! what they separated, so a subject `adm\u{200b}in` would be logged as the
//! different principal `admin`. An escape is plain ASCII, so it cannot combine into
//! a secret shape the redactor did not see: redact first, then sanitise.

use std::borrow::Cow;

/// The bound for a principal id, key id or token claim in a log line, in bytes.
#[cfg_attr(
    not(any(
        feature = "access-log",
        feature = "authenticate",
        feature = "rate-limit"
    )),
    allow(dead_code)
)]
pub(crate) const MAX_ID: usize = 128;

/// What ends a cut string.
const CUT: char = '…';

/// Whether `c` must not reach a log line as itself: a control character (C0, DEL,
/// C1, which includes NEL), a line or paragraph separator, a bidirectional
/// control (U+061C, U+200E, U+200F, U+202A..U+202E, U+2066..U+2069), or another
/// invisible format character (soft hyphen, zero-width characters, word joiner and
/// invisible operators, U+FEFF, interlinear annotations, tag characters).
pub(crate) fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{61c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// Makes a client-influenced string safe for a log line: every character of
/// [`is_unsafe`] becomes its escape `\u{…}` (lower-case hex), and the result is cut
/// at a character or escape boundary so that it is at most `max_bytes` bytes long,
/// `…` included when it was cut. Borrowed when there is nothing to do, which is the
/// common case (printable ASCII within the bound costs one pass over the bytes).
pub(crate) fn sanitize(s: &str, max_bytes: usize) -> Cow<'_, str> {
    if s.len() <= max_bytes && s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Cow::Borrowed(s);
    }
    if s.len() <= max_bytes && !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(max_bytes));
    // The longest prefix of `out`, at a piece boundary, that leaves room for `CUT`.
    let mut room_for_cut = 0;
    let cut_len = CUT.len_utf8();
    let mut escape = String::new();
    for c in s.chars() {
        let mut utf8 = [0u8; 4];
        let piece: &str = if is_unsafe(c) {
            escape.clear();
            escape.extend(c.escape_unicode());
            &escape
        } else {
            c.encode_utf8(&mut utf8)
        };
        if out.len() + piece.len() > max_bytes {
            if room_for_cut + cut_len <= max_bytes {
                out.truncate(room_for_cut);
                out.push(CUT);
            }
            return Cow::Owned(out);
        }
        out.push_str(piece);
        if out.len() + cut_len <= max_bytes {
            room_for_cut = out.len();
        }
    }
    Cow::Owned(out)
}

/// [`sanitize`] with the bound of ids and claims, [`MAX_ID`].
#[cfg_attr(
    not(any(
        feature = "access-log",
        feature = "authenticate",
        feature = "rate-limit"
    )),
    allow(dead_code)
)]
pub(crate) fn sanitize_id(s: &str) -> Cow<'_, str> {
    sanitize(s, MAX_ID)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn escapes_controls_bidi_and_invisible_characters() {
        assert_eq!(
            sanitize("a\r\nb\x1b[31mc\u{202e}d\u{85}e\u{2028}f", 128),
            r"a\u{d}\u{a}b\u{1b}[31mc\u{202e}d\u{85}e\u{2028}f"
        );
        assert_eq!(sanitize("adm\u{200b}in", 128), r"adm\u{200b}in");
        for c in [
            '\u{0}',
            '\t',
            '\u{7f}',
            '\u{9f}',
            '\u{61c}',
            '\u{200e}',
            '\u{200f}',
            '\u{202a}',
            '\u{2066}',
            '\u{2069}',
            '\u{feff}',
            '\u{e0041}',
        ] {
            assert!(is_unsafe(c), "{c:?}");
        }
        for c in ['a', ' ', 'é', '…', '\u{fffd}', '中', '\u{1f600}'] {
            assert!(!is_unsafe(c), "{c:?}");
        }
    }

    #[test]
    fn bounds_at_a_character_or_escape_boundary() {
        assert_eq!(sanitize("abcdef", 6), "abcdef");
        assert_eq!(sanitize("abcdefg", 6), "abc…");
        assert_eq!(sanitize("ééééé", 8), "éé…");
        // An escape is never cut in half.
        assert_eq!(sanitize("ab\u{202e}cdefgh", 12), r"ab…");
        assert_eq!(sanitize("abc", 2), "ab");
        assert_eq!(sanitize("", 0), "");
        assert!(matches!(sanitize("GET /v1/jobs", 32), Cow::Borrowed(_)));
        assert!(matches!(sanitize("café", 32), Cow::Borrowed(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever goes in: no unsafe character comes out, the bound holds, and
        /// what comes out reads back as the input's prefix once escapes are undone.
        #[test]
        fn no_unsafe_character_survives_and_the_bound_holds(
            s in prop_oneof![
                "(?s).{0,200}",
                proptest::collection::vec(
                    prop_oneof![
                        Just('\u{202e}'), Just('\u{2066}'), Just('\u{200f}'), Just('\u{2028}'),
                        Just('\u{85}'), Just('\n'), Just('\u{1b}'), Just('\u{feff}'),
                        Just('\u{e0001}'), any::<char>(), Just('a'), Just('é'),
                    ],
                    0..100,
                ).prop_map(|v| v.into_iter().collect::<String>()),
            ],
            max in 0usize..160,
        ) {
            let out = sanitize(&s, max);
            prop_assert!(!out.chars().any(is_unsafe), "{:?} -> {:?}", s, out);
            prop_assert!(out.len() <= max, "{} > {}", out.len(), max);
            if s.len() <= max && !s.chars().any(is_unsafe) {
                prop_assert_eq!(out.as_ref(), s.as_str());
            }
            let full: String = s
                .chars()
                .map(|c| if is_unsafe(c) { c.escape_unicode().to_string() } else { c.to_string() })
                .collect();
            let kept = if out.len() < full.len() { out.strip_suffix(CUT).unwrap_or(&out) } else { &out };
            prop_assert!(full.starts_with(kept), "{:?} is not a prefix of {:?}", kept, full);
        }
    }
}
