//! Property tests of the redactor and the query redaction: idempotent, and no planted
//! secret survives, wherever in random text it is planted.

use proptest::prelude::*;

use portcullis::redact::{Redactor, redact_query};

/// Text that is likely to brush against the rules: their trigger bytes and
/// fragments of their prefixes and names, mixed with any character.
fn noisy_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "(?s).{0,6}",
        3 => "[a-zA-Z0-9_ ]{1,12}",
        2 => prop::sample::select(vec![
            "=", ":", "\"", "\\\"", "-", "://", "@", "&", " ", "\\n", "%20", "%5F", "*",
            "]", "eyJ", "eyJhbGciOiJIUzI1NiJ9", ".", "Bearer ", "basic ", "bearer", "sk-", "sk-ant-",
            "pc_live_", "AKIA", "ghp_", "xoxb-", "password", "token", "key", "api_key",
            "authorization", "cookie", "-----BEGIN RSA PRIVATE KEY-----",
            "-----END RSA PRIVATE KEY-----", "REDACTED", "****", "redis://", "'", "\n",
            "_", "a_", "%5F", "%5f", "_AbCdEfGhIjKlMnOpQrStUvWx0123", "pc_demo_",
            "pc_demo_EXAMPLExDOxNOTxUSE00003wHR55", "billing_live_EXAMPLExDOxNOTxUSE00000frrQx",
        ]).prop_map(str::to_owned),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

/// A piece of text around a URL: a `://` with an authority of user names,
/// passwords, `@`, fields and credentials, some running past the authority's end
/// (`/` in a bearer token, a field's value), then a byte that ends it or not.
fn url_piece() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => "[A-Za-z0-9._~!$&'()+,;=^{}|<>`-]{0,6}",
        2 => prop::sample::select(vec![":", "@", ":@", "%2F", "%1D", "%20", "**", "REDACTED"])
            .prop_map(str::to_owned),
        2 => (
            prop::sample::select(vec![
                "Bearer%20", "Bearer ", "Basic ", "token=", "password=", "password:",
                "x-api-key: ", "pc_live_", "eyJhbGciOiJIUzI1NiJ9.",
            ]),
            "[A-Za-z0-9/+=_-]{0,16}",
        )
            .prop_map(|(a, b)| format!("{a}{b}")),
        1 => prop::sample::select(vec!["/", "//", " ", "\"", "?", "#", "\\n", "\n", "<"])
            .prop_map(str::to_owned),
    ];
    (
        prop::sample::select(vec!["", "redis", "https", "x", " ", "/", "@", ":"]),
        prop::collection::vec(part, 0..6),
    )
        .prop_map(|(scheme, parts)| format!("{scheme}://{}", parts.concat()))
}

/// A secret: (the text planted, the part that must not survive).
fn secret() -> impl Strategy<Value = (String, String)> {
    let b62 = |n: usize| proptest::string::string_regex(&format!("[A-Za-z0-9]{{{n}}}")).unwrap();
    let b64u = |n: usize| proptest::string::string_regex(&format!("[A-Za-z0-9_-]{{{n}}}")).unwrap();
    let hint = |p: &'static str| move |body: String| (format!("{p}{body}"), body);
    prop_oneof![
        b62(30).prop_map(hint("pc_live_")),
        b62(30).prop_map(hint("pc_test_")),
        proptest::string::string_regex("[A-Z0-9]{16}")
            .unwrap()
            .prop_map(hint("AKIA")),
        b62(36).prop_map(hint("ghp_")),
        b62(36).prop_map(hint("ghs_")),
        b62(40).prop_map(hint("github_pat_")),
        b64u(20).prop_map(hint("glpat-")),
        b62(24).prop_map(hint("sk_live_")),
        b62(32).prop_map(hint("whsec_")),
        proptest::string::string_regex("[0-9]{12}-[A-Za-z0-9]{24}")
            .unwrap()
            .prop_map(hint("xoxb-")),
        b64u(35).prop_map(hint("AIza")),
        b64u(40).prop_map(hint("sk-ant-api03-")),
        b64u(40).prop_map(hint("sk-proj-")),
        b62(48).prop_map(hint("sk-")),
        (b64u(20), b64u(30), b64u(30))
            .prop_map(|(h, p, s)| (format!("eyJ{h}.{p}.{s}"), format!("{p}.{s}"))),
        b62(24).prop_map(|c| (format!("Bearer {c}"), c)),
        proptest::string::string_regex("[A-Za-z0-9+/]{16}==")
            .unwrap()
            .prop_map(|c| (format!("Basic {c}"), c)),
        b62(16).prop_map(|p| (format!("redis://:{p}@cache:6379/0"), p)),
        b62(16).prop_map(|p| (format!("postgres://app:{p}@db/app"), p)),
        b62(48).prop_map(|b| (
            format!("-----BEGIN PRIVATE KEY-----\n{b}\n-----END PRIVATE KEY-----"),
            b
        )),
        b62(48).prop_map(|b| (
            format!("-----BEGIN EC PRIVATE KEY-----\\n{b}\\n-----END EC PRIVATE KEY-----"),
            b
        )),
        b62(20).prop_map(|v| (format!("password={v}"), v)),
        b62(20).prop_map(|v| (format!("\"client_secret\":\"{v}\""), v)),
        b62(20).prop_map(|v| (format!("X-Api-Key: {v}"), v)),
    ]
}

/// What opens and closes a value around a URL: the forms the field rule and the
/// scheme rule read, and text with no name.
fn value_form() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop::sample::select(vec![
        ("password=", ""),
        ("password='", "'"),
        ("password=\"", "\""),
        ("password=\\\"", "\\\""),
        ("{\"password\":\"", "\"}"),
        ("token=Some(\"", "\")"),
        ("token=Some(", ")"),
        ("token=Token(\\\"", "\\\")"),
        ("authorization: Bearer ", ""),
        ("Authorization: Basic ", ""),
        ("password=(Bearer ", ")"),
        ("cookie: a=", "; b=1"),
        ("x-api-key=[", "]"),
        ("secret => '", "'"),
        ("note=", ""),
        ("{\"url\":\"", "\"}"),
        (" ", " "),
        ("", ""),
    ])
}

/// A piece of a URL's user name or password: any byte an authority may hold,
/// rules' names, prefixes and scheme words among them, and percent-escapes of
/// bytes that end values (`%22`, `%27`, `%5C`, `%20`).
fn authority_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[a-z0-9]{0,4}",
        3 => prop::sample::select(vec![
            "'", "(", ")", ";", ",", "&", "=", "!", "$", "+", "*", ":", "@", "~", ".", "-", "_",
            "[", "]", "^", "{", "}", "|", "<", ">", "`", "%22", "%27", "%5C", "%20", "%3A", "%40",
            "password=", "token:", "Bearer",
            "Bearer%20", "Basic", "pc_live_", "eyJ", "sk-", "Some(", "cookie=", "**", "**:",
        ])
        .prop_map(str::to_owned),
    ]
}

/// `s` as a JSON string, as a JSON log line holds it.
fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What may stand right before or after a secret: not a letter or digit.
fn separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        " ", "\n", "\t", "\"", "'", ",", ";", "(", ")", "[", "]", "{", "}", "<", ">", "|", "\\n",
        "%20", " = ", ": ",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn redaction_is_idempotent(text in noisy_text()) {
        let r = Redactor::new();
        let once = r.redact(&text).into_owned();
        prop_assert_eq!(r.redact(&once), once.as_str());
        let bytes = r.redact_bytes(text.as_bytes()).into_owned();
        prop_assert_eq!(bytes, once.as_bytes());
    }

    #[test]
    fn no_planted_secret_survives(
        left in noisy_text(),
        right in noisy_text(),
        (planted, body) in secret(),
        sep1 in separator(),
        sep2 in separator(),
    ) {
        let text = format!("{left}{sep1}{planted}{sep2}{right}");
        let r = Redactor::new();
        let out = r.redact(&text);
        prop_assert!(!out.contains(&body), "secret survived: {:?} -> {:?}", text, out);
        let out_bytes = r.redact_bytes(text.as_bytes());
        prop_assert!(!String::from_utf8_lossy(&out_bytes).contains(&body));
        // And once more over the redacted text: still gone, still the same.
        prop_assert_eq!(r.redact(&out), out.as_ref());
    }

    /// A secret as a URL's user name (`https://ghp_…:x-oauth-basic@github.com`) is
    /// hidden as anywhere else, and so is the password after it.
    #[test]
    fn a_secret_as_a_urls_user_name_never_survives(
        left in noisy_text(),
        (planted, body) in secret(),
        scheme in prop::sample::select(vec!["https", "redis", "postgres", "amqp"]),
        quote in prop::sample::select(vec!["", "'", "(", "!", "%27"]),
        password in "[A-Za-z0-9._~!$&'()+,;=%^{}|<>`-]{0,20}",
        host in "[a-z]{1,10}(:[0-9]{1,5})?",
    ) {
        let text = format!("{left} {scheme}://{quote}{planted}{quote}:{password}@{host}/x");
        let r = Redactor::new();
        let out = r.redact(&text);
        prop_assert!(!out.contains(&body), "{:?} -> {:?}", text, out);
        let authority =
            |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:@[]^{}|<>`".contains(&b);
        if !password.is_empty() && planted.bytes().all(authority) {
            let shown = format!(":{password}@{host}/x");
            prop_assert!(!out.ends_with(&shown), "{:?} -> {:?}", text, out);
        }
        prop_assert_eq!(r.redact(&out), out.as_ref());
        prop_assert_eq!(&*r.redact_bytes(text.as_bytes()), out.as_bytes());
    }

    /// A sensitive field as a URL's user name, its value running into the password
    /// or not: both hidden, and the output a fixed point.
    #[test]
    fn a_sensitive_field_as_a_urls_user_name_is_hidden_once(
        left in noisy_text(),
        name in prop::sample::select(vec!["password", "token", "cookie", "authorization", "api_key"]),
        value in "[A-Za-z0-9]{12,20}",
        tail in prop::sample::select(vec!["", ";", "&", "'", "&token", ";password", "&x=1", "@x"]),
        password in "[A-Za-z0-9._~!$&'()+,;=%^{}|<>`-]{1,20}",
        host in "[a-z]{1,10}",
        right in noisy_text(),
    ) {
        let text = format!("{left} redis://{name}={value}{tail}:{password}@{host}/0 {right}");
        let r = Redactor::new();
        let out = r.redact(&text);
        prop_assert!(!out.contains(&value), "{:?} -> {:?}", text, out);
        if !password.contains('*') {
            prop_assert!(!out.contains(&format!(":{password}@{host}/0")), "{:?} -> {:?}", text, out);
        }
        prop_assert_eq!(r.redact(&out), out.as_ref());
        prop_assert_eq!(&*r.redact_bytes(text.as_bytes()), out.as_bytes());
    }

    /// URLs one after another, inside each other's authorities and credentials, with
    /// secrets that run past an authority's end (a bearer token holding `/`): the
    /// output is a fixed point, whichever byte each rule stops at.
    #[test]
    fn urls_one_after_another_are_redacted_to_a_fixed_point(
        text in prop::collection::vec(url_piece(), 1..8).prop_map(|v| v.concat()),
    ) {
        let r = Redactor::new();
        let once = r.redact(&text).into_owned();
        prop_assert_eq!(r.redact(&once), once.as_str(), "not a fixed point: {:?}", text);
        prop_assert_eq!(&*r.redact_bytes(text.as_bytes()), once.as_bytes());
    }

    /// A URL as the credential after a scheme word, in a sensitive field or not,
    /// its password holding bytes that end a field's value (`;`, `'`, `,`, `&`):
    /// no part of the password is shown.
    #[test]
    fn a_url_as_a_credential_never_shows_its_password(
        left in noisy_text(),
        name in prop::sample::select(vec![
            "authorization: ", "Authorization=", "password=(", "token=", "x-api-key: ",
            "password: ", "", "note=",
        ]),
        scheme_word in prop::sample::select(vec!["Bearer ", "bearer ", "Basic ", "Bearer%20"]),
        scheme in prop::sample::select(vec!["https", "redis", "postgres"]),
        user in "[a-z]{0,6}",
        head in "[A-Za-z0-9]{8}",
        delimiter in prop::sample::select(vec![";", "'", ",", "&", "(", ")", "=", "!", "$", "+", "*"]),
        tail in "[A-Za-z0-9]{8}",
        rest in prop::sample::select(vec!["@h/x", "@h", "@h:6379/0 x", "@h?token=1"]),
    ) {
        let text = format!("{left} {name}{scheme_word}{scheme}://{user}:{head}{delimiter}{tail}{rest}");
        let r = Redactor::new();
        let out = r.redact(&text);
        prop_assert!(!out.contains(&head) && !out.contains(&tail), "{:?} -> {:?}", text, out);
        prop_assert_eq!(r.redact(&out), out.as_ref());
    }

    /// A URL in any of the forms a value takes (quoted, JSON-escaped, a JSON member,
    /// a Rust `Debug` value, after a scheme word, in brackets, or none), its user
    /// name and password built from every byte an authority may hold, rules'
    /// names and prefixes among them: no piece of the password is shown, in the
    /// text or in the text as a JSON log line, and the output is a fixed point.
    #[test]
    fn a_urls_password_is_hidden_in_every_value_form(
        left in noisy_text(),
        (open, close) in value_form(),
        scheme in prop::sample::select(vec!["https", "redis", "x"]),
        user in prop::collection::vec(authority_piece(), 0..4).prop_map(|v| v.concat()),
        pieces in prop::collection::vec(("[A-Z]{10}", authority_piece()), 1..4),
        after in prop::sample::select(vec!["", "/", "/x", ":6379/0", "?a=1", " ", "\"", "'", ")", "\\\""]),
        right in noisy_text(),
    ) {
        let password: String = pieces.iter().map(|(p, d)| format!("{p}{d}")).collect();
        let text = format!("{left}{open}{scheme}://{user}:{password}@h{after}{close}{right}");
        let r = Redactor::new();
        let json = format!("{{\"message\":{}}}", json_string(&text));
        for input in [&text, &json] {
            let out = r.redact(input);
            for (piece, _) in &pieces {
                if input.matches(piece.as_str()).count() == 1 {
                    prop_assert!(!out.contains(piece.as_str()), "{:?} shown: {:?} -> {:?}", piece, input, out);
                }
            }
            prop_assert_eq!(r.redact(&out), out.as_ref());
            prop_assert_eq!(&*r.redact_bytes(input.as_bytes()), out.as_bytes());
        }
    }

    /// The same text as a URL path: what the redaction of the raw text hides, on
    /// any of its passes, stays hidden in what `redact_uri_part` shows, raw or
    /// decoded.
    #[test]
    fn urls_one_after_another_in_a_path_stay_hidden_when_decoded(
        text in prop::collection::vec(url_piece(), 1..8).prop_map(|v| v.concat()),
    ) {
        let r = Redactor::new();
        let part = format!("/p/{text}");
        let shown = r.redact(&part);
        let out = r.redact_uri_part(&part);
        // An empty password is shown as `****` too: the bytes around it are not hidden.
        let shown_around_empty = shown.replace(":****@", ":@");
        // What is shown apart from the replacements (`: REDACTED` decoded is not ` REDAC`
        // shown).
        let out = out.replace("REDACTED", "\0").replace("****", "\0");
        let forms = [part.clone(), percent_decoded(&part)];
        // Occurrences of `piece` in `s`, overlapping ones included.
        let count = |s: &str, piece: &str| {
            s.as_bytes().windows(piece.len()).filter(|x| *x == piece.as_bytes()).count()
        };
        for w in part.as_bytes().windows(8).filter(|w| w.is_ascii()) {
            let w = std::str::from_utf8(w).unwrap();
            let decoded = percent_decoded(w);
            if shown.contains(w)
                || shown_around_empty.contains(w)
                || count(&part, w) != 1
                || decoded.len() < 6
            {
                continue;
            }
            // A piece that occurs once in every form, so that it can only come
            // from here.
            if forms.iter().all(|f| count(f, &decoded) <= 1) {
                prop_assert!(
                    !out.contains(w) && !out.contains(&*decoded),
                    "{:?} shown: {:?} -> {:?} (raw: {:?})", w, part, out, shown
                );
            }
        }
    }

    #[test]
    fn secrets_split_across_percent_encodings_are_found(
        (planted, body) in secret(),
        mask in any::<u64>(),
    ) {
        // Percent-encode a random subset of the bytes, as a client might in a path.
        let encoded: String = planted.bytes().enumerate().map(|(i, b)| {
            if mask >> (i % 64) & 1 == 1 || !b.is_ascii_alphanumeric() {
                format!("%{b:02X}")
            } else {
                (b as char).to_string()
            }
        }).collect();
        let path = format!("/v1/{encoded}/x");
        let out = Redactor::new().redact_uri_part(&path);
        prop_assert!(!out.contains(&body), "{:?} -> {:?}", encoded, out);
    }

    #[test]
    fn query_redaction_hides_sensitive_values_and_keeps_the_rest(
        params in prop::collection::vec(
            (
                prop::sample::select(vec!["api_key", "API_KEY", "api%5Fkey", "Api-Key", "token", "access_token", "password", "sig", "code", "page", "q", "sort", ""]),
                "[A-Za-z0-9%+._~-]{0,16}",
                any::<bool>(),
            ),
            0..10,
        ),
    ) {
        let query = params
            .iter()
            .map(|(n, v, eq)| if *eq { format!("{n}={v}") } else { (*n).to_owned() })
            .collect::<Vec<_>>()
            .join("&");
        let out = redact_query(&query);
        let out_params: Vec<&str> = out.split('&').collect();
        prop_assert_eq!(out_params.len(), query.split('&').count());
        for ((n, v, eq), o) in params.iter().zip(&out_params) {
            let sensitive = !matches!(*n, "page" | "q" | "sort" | "");
            if *eq && sensitive && !v.is_empty() {
                prop_assert_eq!(*o, format!("{n}=REDACTED"));
            } else if *eq {
                prop_assert_eq!(*o, format!("{n}={v}"));
            } else {
                prop_assert_eq!(*o, *n);
            }
        }
        prop_assert_eq!(redact_query(&out), out.as_ref());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn sanitize_leaves_no_control_or_bidi_character_and_bounds_the_length(
        s in prop_oneof![
            "(?s).{0,200}",
            prop::collection::vec(
                prop_oneof![
                    Just('\u{202a}'), Just('\u{202b}'), Just('\u{202c}'), Just('\u{202d}'),
                    Just('\u{202e}'), Just('\u{2066}'), Just('\u{2067}'), Just('\u{2068}'),
                    Just('\u{2069}'), Just('\u{200e}'), Just('\u{200f}'), Just('\u{2028}'),
                    Just('\u{2029}'), Just('\u{85}'), Just('\u{9b}'), Just('\u{1b}'),
                    Just('\r'), Just('\n'), Just('\0'), Just('\u{7f}'), Just('é'),
                    Just('a'), Just('\\'), any::<char>(),
                ],
                0..120,
            )
            .prop_map(|v| v.into_iter().collect::<String>()),
        ],
        max in 0usize..160,
    ) {
        let out = portcullis::redact::sanitize(&s, max);
        let forbidden = |c: char| {
            c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
        };
        prop_assert!(!out.chars().any(forbidden), "{:?} -> {:?}", s, out);
        prop_assert!(out.len() <= max, "{} bytes for a bound of {}", out.len(), max);
        // Nothing to do: the same text, not a copy.
        if s.len() <= max && !s.chars().any(forbidden) && s.is_ascii() {
            prop_assert!(matches!(out, std::borrow::Cow::Borrowed(_)));
        }
        // What is kept is the input's beginning, with characters escaped as `\u{…}`
        // (every forbidden one, and other invisible ones): undoing the escapes gives
        // back a prefix of the input (when the input has no backslash of its own).
        if !s.contains('\\') {
            let kept = out.strip_suffix('…').filter(|_| !s.starts_with(out.as_ref())).unwrap_or(&out);
            let mut unescaped = String::new();
            let mut rest = kept;
            while let Some(at) = rest.find("\\u{") {
                unescaped.push_str(&rest[..at]);
                let end = rest[at..].find('}').expect("a whole escape") + at;
                let code = u32::from_str_radix(&rest[at + 3..end], 16).unwrap();
                unescaped.push(char::from_u32(code).unwrap());
                rest = &rest[end + 1..];
            }
            unescaped.push_str(rest);
            prop_assert!(s.starts_with(&unescaped), "{:?} -> {:?}", s, out);
            for c in unescaped.chars().filter(|&c| forbidden(c)) {
                prop_assert!(out.contains(&c.escape_unicode().to_string()));
            }
        }
    }

    #[test]
    fn request_ids_are_kept_exactly_when_safe(id in prop::collection::vec(any::<u8>(), 0..80)) {
        use portcullis::request_id::{RequestId, MAX_LEN};
        let safe = !id.is_empty()
            && id.len() <= MAX_LEN
            && id.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b));
        match RequestId::parse(&id) {
            Some(parsed) => {
                prop_assert!(safe);
                prop_assert_eq!(parsed.as_str().as_bytes(), &id[..]);
            }
            None => prop_assert!(!safe),
        }
    }
}

/// Valid key prefixes: every shape the key generator accepts (1 to 32 characters of
/// `a-z 0-9 _`, a letter first, no `_` last; runs of `_` included).
#[cfg(feature = "api-key")]
pub(crate) fn key_prefix() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,31}"
        .prop_filter("a prefix does not end with '_'", |p| !p.ends_with('_'))
        .prop_map(|p| {
            portcullis::api_key::check_prefix(&p).expect("the strategy makes valid prefixes");
            p
        })
}

#[cfg(feature = "api-key")]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// A generated key with any prefix, anywhere in any text, is redacted: the body
    /// never survives, the prefix is kept as the hint, and the result is a fixed point.
    #[test]
    fn generated_keys_of_any_prefix_never_survive(
        prefix in key_prefix(),
        left in noisy_text(),
        right in noisy_text(),
        sep1 in separator(),
        sep2 in separator(),
    ) {
        let key = portcullis::api_key::generate_key(&prefix).unwrap();
        let key = key.expose_secret();
        let body = &key[prefix.len() + 1..];
        let r = Redactor::new();
        let text = format!("{left}{sep1}{key}{sep2}{right}");
        let out = r.redact(&text);
        prop_assert!(!out.contains(body), "{:?} -> {:?}", text, out);
        prop_assert_eq!(r.redact(&out), out.as_ref());
        let out_bytes = r.redact_bytes(text.as_bytes());
        prop_assert_eq!(&*out_bytes, out.as_bytes());
        // The prefix stays as the hint.
        let line = format!("GET /{key} 200");
        prop_assert_eq!(r.redact(&line), format!("GET /{prefix}_**** 200"));
        // Glued to a word on its left, or written with its separators escaped.
        let glued = format!("{left}x{key}");
        prop_assert!(!r.redact(&glued).contains(body));
        let escaped = format!("/v1/{}/x", key.replace('_', "%5F"));
        prop_assert!(!r.redact(&escaped).contains(body));
    }

    #[test]
    fn generated_keys_of_any_prefix_split_across_percent_encodings_are_found(
        prefix in key_prefix(),
        mask in any::<u64>(),
    ) {
        let key = portcullis::api_key::generate_key(&prefix).unwrap();
        let key = key.expose_secret();
        let body = &key[prefix.len() + 1..];
        let encoded: String = key.bytes().enumerate().map(|(i, b)| {
            if mask >> (i % 64) & 1 == 1 || !b.is_ascii_alphanumeric() {
                format!("%{b:02X}")
            } else {
                (b as char).to_string()
            }
        }).collect();
        let path = format!("/v1/{encoded}/x");
        let out = Redactor::new().redact_uri_part(&path);
        // Not in the logged text, nor in what a reader gets by decoding it.
        prop_assert!(!out.contains(body), "{:?} -> {:?}", encoded, out);
        prop_assert!(!percent_decoded(&out).contains(body), "{:?} -> {:?}", encoded, out);
    }
}

/// `%XX` escapes decoded (lossy UTF-8), as a reader of a logged URL would.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
