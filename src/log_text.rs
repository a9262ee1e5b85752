//! The one sanitiser for client-influenced text on its way into a log line.
//!
//! Every string a client can influence (the access log's path, query, user agent,
//! method and request id; a principal id, which is a token's `sub`; a token's `jti`,
//! `iss` and `kid`; a key id) passes through [`sanitize`] before it becomes a field
//! of an access or audit event. A client therefore cannot forge a line (CR, LF,
//! NEL, U+2028), colour or rewrite a terminal (ESC and the other C0/C1 controls),
//! reorder what a reader sees (bidirectional embeddings, overrides, isolates and
//! marks), or hide text (zero-width characters, the other format characters, and
//! every character Unicode says to render as nothing: see [`INVISIBLE`]).
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
/// C1, which includes NEL) or a character of [`INVISIBLE`] (format characters, the
/// line and paragraph separators, and the characters Unicode says to render as
/// nothing). ASCII is answered without the table, so that text which is mostly
/// ASCII (paths, user agents, ids) costs one comparison per character.
pub(crate) fn is_unsafe(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_control();
    }
    c.is_control()
        || INVISIBLE
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

/// The characters other than controls that [`sanitize`] escapes, as sorted,
/// disjoint, non-adjacent inclusive ranges (the binary search of [`is_unsafe`]
/// relies on the order). Unicode 16.0.0, the union of:
///
/// - general category Cf (format): soft hyphen, the Arabic and Syriac number and
///   end-of-ayah signs, bidirectional controls, zero-width characters, the word
///   joiner and invisible operators, U+FEFF, interlinear annotations, Egyptian
///   hieroglyph, shorthand and musical format controls, tag characters;
/// - Zl and Zp (U+2028, U+2029), which end a line in some viewers;
/// - the property Default_Ignorable_Code_Point: what a renderer shows as nothing
///   though it is not Cf (combining grapheme joiner, Hangul fillers, Khmer inherent
///   vowels, Mongolian and other variation selectors), and the code points Unicode
///   reserves for future invisible characters (U+2065, U+FFF0..U+FFF8,
///   U+E0000..U+E0FFF), so that a later Unicode version cannot make one invisible.
///
/// Escaping the variation selectors also escapes U+FE0F in emoji (`❤\u{fe0f}`):
/// legible, and a log line is not the place for presentation.
///
/// Not here, on purpose: private use (Co: U+E000..U+F8FF, planes 15 and 16) has no
/// standard meaning and is shown as a glyph or a box, never as nothing;
/// surrogates (Cs) cannot occur in a `&str`; other unassigned code points
/// are shown as a box until a Unicode version assigns them.
///
/// Generated from the `ucd-generate` tables of regex-syntax 0.8.12 (Unicode
/// 16.0.0: `FORMAT`, `LINE_SEPARATOR`, `PARAGRAPH_SEPARATOR`,
/// `DEFAULT_IGNORABLE_CODE_POINT`), merged into ranges; Python's `unicodedata`
/// (Unicode 14.0.0) was checked to list no Cf, Zl or Zp code point outside them.
/// The tests compare the table with the regex crate's `\p{…}` classes over every
/// `char` and with Python's Cf list, so a regex release with a newer Unicode that
/// adds a format character fails them until the table is regenerated.
const INVISIBLE: [(char, char); 25] = [
    ('\u{ad}', '\u{ad}'),
    ('\u{34f}', '\u{34f}'),
    ('\u{600}', '\u{605}'),
    ('\u{61c}', '\u{61c}'),
    ('\u{6dd}', '\u{6dd}'),
    ('\u{70f}', '\u{70f}'),
    ('\u{890}', '\u{891}'),
    ('\u{8e2}', '\u{8e2}'),
    ('\u{115f}', '\u{1160}'),
    ('\u{17b4}', '\u{17b5}'),
    ('\u{180b}', '\u{180f}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{2028}', '\u{202e}'),
    ('\u{2060}', '\u{206f}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{fe00}', '\u{fe0f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{ffa0}', '\u{ffa0}'),
    ('\u{fff0}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0000}', '\u{e0fff}'),
];

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
            '\u{600}',
            '\u{34f}',
            '\u{3164}',
            '\u{1343f}',
            '\u{1d173}',
        ] {
            assert!(is_unsafe(c), "{c:?}");
        }
        // Private use is shown as a glyph or a box: not escaped (see `INVISIBLE`).
        for c in [
            'a',
            ' ',
            'é',
            '…',
            '\u{fffd}',
            '中',
            '\u{1f600}',
            '\u{e000}',
        ] {
            assert!(!is_unsafe(c), "{c:?}");
        }
    }

    #[test]
    fn every_character_of_the_table_is_escaped() {
        // The binary search of `is_unsafe` needs sorted, disjoint ranges.
        for w in INVISIBLE.windows(2) {
            assert!(
                w[0].0 <= w[0].1 && (w[0].1 as u32) + 1 < w[1].0 as u32,
                "{w:?}"
            );
        }
        for &(lo, hi) in &INVISIBLE {
            for c in lo..=hi {
                let escaped = format!("adm{}in", c.escape_unicode());
                assert_eq!(sanitize(&format!("adm{c}in"), 128), escaped, "{c:?}");
            }
        }
    }

    /// Every `char` against a second definition, the regex crate's Unicode classes
    /// (its own tables): a range missing from `INVISIBLE`, or one too many, fails.
    #[test]
    fn escapes_exactly_controls_format_separators_and_default_ignorables() {
        let every: String = (0..=0x10_ffff).filter_map(char::from_u32).collect();
        let class = r"[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Default_Ignorable_Code_Point}]";
        let regex = regex::Regex::new(class).unwrap();
        let want: Vec<char> = regex
            .find_iter(&every)
            .flat_map(|m| m.as_str().chars())
            .collect();
        let got: Vec<char> = every.chars().filter(|&c| is_unsafe(c)).collect();
        // Both lists are in code point order.
        let missing: Vec<_> = want
            .iter()
            .filter(|c| got.binary_search(c).is_err())
            .take(20)
            .collect();
        let extra: Vec<_> = got
            .iter()
            .filter(|c| want.binary_search(c).is_err())
            .take(20)
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "not escaped: {missing:?}; escaped but not in {class}: {extra:?}"
        );
    }

    /// Category Cf as Python's `unicodedata` (Unicode 14.0.0) lists it, printed by
    /// `python3 -c 'import unicodedata as u; print([c for c in range(0x110000) if
    /// u.category(chr(c)) == "Cf"])'` and merged into ranges: a second source for
    /// the table, from another implementation of the Unicode data.
    #[test]
    fn escapes_every_format_character_python_knows() {
        const PYTHON_CF_14: [(u32, u32); 21] = [
            (0xAD, 0xAD),
            (0x600, 0x605),
            (0x61C, 0x61C),
            (0x6DD, 0x6DD),
            (0x70F, 0x70F),
            (0x890, 0x891),
            (0x8E2, 0x8E2),
            (0x180E, 0x180E),
            (0x200B, 0x200F),
            (0x202A, 0x202E),
            (0x2060, 0x2064),
            (0x2066, 0x206F),
            (0xFEFF, 0xFEFF),
            (0xFFF9, 0xFFFB),
            (0x110BD, 0x110BD),
            (0x110CD, 0x110CD),
            (0x13430, 0x13438),
            (0x1BCA0, 0x1BCA3),
            (0x1D173, 0x1D17A),
            (0xE0001, 0xE0001),
            (0xE0020, 0xE007F),
        ];
        for (lo, hi) in PYTHON_CF_14 {
            for c in (lo..=hi).filter_map(char::from_u32) {
                assert!(!sanitize(&format!("adm{c}in"), 128).contains(c), "{c:?}");
            }
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
