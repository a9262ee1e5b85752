use super::*;

fn r(s: &str) -> String {
    let red = Redactor::new();
    let once = red.redact(s).into_owned();
    assert_eq!(red.redact(&once), once, "not idempotent for {s:?}");
    once
}

#[test]
fn provider_shapes_keep_their_hint() {
    let cases = [
        ("pc_live_AbCdEfGhIjKlMnOpQrStUvWx1234", "pc_live_****"),
        ("pc_test_AbCdEfGhIjKlMnOpQrStUvWx1234", "pc_test_****"),
        ("AKIAIOSFODNN7EXAMPLE", "AKIA****"),
        ("ASIAIOSFODNN7EXAMPLE", "ASIA****"),
        ("ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "ghp_****"),
        (
            "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
            "github_pat_****",
        ),
        ("glpat-AbCdEfGhIjKlMnOpQrSt", "glpat-****"),
        ("sk_live_AbCdEfGhIjKlMnOp1234", "sk_live_****"),
        ("rk_test_AbCdEfGhIjKlMnOp1234", "rk_test_****"),
        (
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "xoxb-****",
        ),
        ("AIzaSyA-AbCdEfGhIjKlMnOpQrStUvWxYz01234", "AIza****"),
        (
            "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz-0123456789_AA",
            "sk-ant-****",
        ),
        (
            "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
            "sk-proj-****",
        ),
        (
            "sk-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefghij",
            "sk-****",
        ),
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
            "eyJ****",
        ),
    ];
    for (secret, hint) in cases {
        assert_eq!(r(secret), hint, "{secret}");
        assert_eq!(
            r(&format!("x {secret} y")),
            format!("x {hint} y"),
            "{secret}"
        );
        assert_eq!(
            r(&format!("\"{secret}\"")),
            format!("\"{hint}\""),
            "{secret}"
        );
    }
}

#[test]
fn near_misses_are_left_alone() {
    for clean in [
        "risk-assessment-framework-for-everyone",
        "task-sk-not-a-key",
        "AKIAIOSFODNN7EXAMPLEX",
        "ghp_short",
        "eyJhbGciOiJIUzI1NiJ9 without dots",
        "GET /v1/jobs?page=2 200 1.2ms",
        "the bearer of bad news",
        "the bearer authentication scheme",
        "key_id=billing kid=k1 max_tokens=300 status_code=200",
        "https://example.com/path?x=1",
        "ssh://git@github.com/org/repo",
        "time 12:30:45",
        "::1",
    ] {
        assert_eq!(r(clean), clean);
    }
}

#[test]
fn field_names_first() {
    assert_eq!(r("password=hunter2 user=ann"), "password=REDACTED user=ann");
    assert_eq!(r("api_key: abc123"), "api_key: REDACTED");
    assert_eq!(
        r(r#"{"client_secret":"x y z","n":1}"#),
        r#"{"client_secret":"REDACTED","n":1}"#
    );
    // A number becomes a string, so that the line stays JSON.
    assert_eq!(r(r#"{"token": 12345}"#), r#"{"token": "REDACTED"}"#);
    assert_eq!(
        r(r#"{"message":"login with \"password\":\"hunter2\" failed"}"#),
        r#"{"message":"login with \"password\":\"REDACTED\" failed"}"#
    );
    assert_eq!(
        r(r#"msg="x" password=\"hunter2\""#),
        r#"msg="x" password=\"REDACTED\""#
    );
    assert_eq!(
        r("Authorization: Bearer abc.def"),
        "Authorization: Bearer ****"
    );
    assert_eq!(
        r("authorization=Basic dXNlcjpwYXNz"),
        "authorization=Basic ****"
    );
    assert_eq!(
        r(r#""authorization":"ApiKey legacy-key""#),
        r#""authorization":"ApiKey ****""#
    );
    assert_eq!(
        r("Cookie: sid=abc; theme=dark\nnext"),
        "Cookie: REDACTED\nnext"
    );
    assert_eq!(
        r(r#"{"set-cookie":"a=b; HttpOnly","x":1}"#),
        r#"{"set-cookie":"REDACTED","x":1}"#
    );
    assert_eq!(r("key=v"), "key=REDACTED");
    assert_eq!(
        r("X-Hub-Signature-256: sha256=abcdef"),
        "X-Hub-Signature-256: REDACTED"
    );
    assert_eq!(r("password="), "password=");
    // A field name takes precedence over the shape: no hint.
    assert_eq!(
        r("token=pc_live_AbCdEfGhIjKlMnOpQrStUvWx"),
        "token=REDACTED"
    );
}

#[test]
fn bearer_and_basic_in_prose() {
    assert_eq!(
        r("sent Bearer abcdefgh12 upstream"),
        "sent Bearer **** upstream"
    );
    assert_eq!(
        r("curl -H 'Authorization: Basic dXNlcjpwYXNz'"),
        "curl -H 'Authorization: Basic ****'"
    );
    assert_eq!(r("auth=Bearer%20abcdefgh12"), "auth=REDACTED");
    // A percent-escaped separator before the scheme word is a word boundary too.
    let out = r("password=%20Bearer a0aAaaa00AAA0aAaa0aaaaaA ");
    assert!(!out.contains("a0aAaaa00AAA0aAaa0aaaaaA"), "{out}");
    assert_eq!(r("h=Bearer%20abcdefgh12"), "h=Bearer%20****");
}

#[test]
fn urls_with_passwords() {
    assert_eq!(
        r("redis://:p4ss@cache:6379/0"),
        "redis://:****@cache:6379/0"
    );
    assert_eq!(
        r("rediss://default:p4ss@cache:6380"),
        "rediss://default:****@cache:6380"
    );
    assert_eq!(
        r("postgres://app:p%40ss@db/app"),
        "postgres://app:****@db/app"
    );
    assert_eq!(r("url=\"amqp://u:p@h\""), "url=\"amqp://u:****@h\"");
    // What the WHATWG parser takes into a password as written (`^{}|<>` and `` ` ``).
    assert_eq!(
        r("redis://:Xy7^k{9|Q@cache:6379"),
        "redis://:****@cache:6379"
    );
    assert_eq!(
        r("postgres://app:a<b>c`d@db/app"),
        "postgres://app:****@db/app"
    );
    assert_eq!(
        r("{\"url\":\"redis://u:Xy7^k{9}|Q@cache\",\"n\":1}"),
        "{\"url\":\"redis://u:****@cache\",\"n\":1}"
    );
    // A URL in braces or angle brackets keeps them.
    assert_eq!(r("<https://u:p@h>"), "<https://u:****@h>");
    assert_eq!(r("{redis://u:p@h}"), "{redis://u:****@h}");
    assert_eq!(
        r("https://example.com:8443/x@y"),
        "https://example.com:8443/x@y"
    );
}

#[test]
fn pem_private_keys() {
    let raw = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\naFDrBz9vFqU4yR3SbQ==\n-----END RSA PRIVATE KEY-----";
    assert_eq!(
        r(&format!("key:\n{raw}\nnext")),
        "key:\n[REDACTED PRIVATE KEY]\nnext"
    );
    let escaped = raw.replace('\n', "\\n");
    assert_eq!(
        r(&format!("{{\"pem\":\"{escaped}\"}}")),
        "{\"pem\":\"[REDACTED PRIVATE KEY]\"}"
    );
    // Without its END line the body is still taken, the closing quote kept.
    let cut = &escaped[..80];
    assert_eq!(
        r(&format!("{{\"m\":\"{cut}\"}}")),
        "{\"m\":\"[REDACTED PRIVATE KEY]\"}"
    );
    assert_eq!(
        r("-----BEGIN PUBLIC KEY-----"),
        "-----BEGIN PUBLIC KEY-----"
    );
    assert_eq!(
        r("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn==\n-----END OPENSSH PRIVATE KEY-----\n"),
        "[REDACTED PRIVATE KEY]\n"
    );
}

#[test]
fn padding_before_another_rule_is_stable() {
    // Found by the fuzzer: the byte after `==` changed class once the PEM block
    // behind it was replaced.
    assert_eq!(
        r("Basic dX====-----BEGIN EC PRIVATE KEY-----"),
        "Basic ****[REDACTED PRIVATE KEY]"
    );
    assert_eq!(r("Bearer password=abcdefgh"), "Bearer ****=REDACTED");
}

#[test]
fn escapes_are_boundaries() {
    assert_eq!(r("a\\nsk-AbCdEfGhIjKlMnOpQrStUvWxYz0123"), "a\\nsk-****");
    assert_eq!(r("q=%20sk-AbCdEfGhIjKlMnOpQrStUvWxYz0123"), "q=%20sk-****");
}

#[test]
fn query_redaction() {
    assert_eq!(redact_query("a=1&b=2"), "a=1&b=2");
    assert!(matches!(redact_query("a=1&b=2"), Cow::Borrowed(_)));
    assert_eq!(
        redact_query("api%5Fkey=x&API_KEY=y&Api-Key=z"),
        "api%5Fkey=REDACTED&API_KEY=REDACTED&Api-Key=REDACTED"
    );
    assert_eq!(
        redact_query("token=a&token=b&token"),
        "token=REDACTED&token=REDACTED&token"
    );
    assert_eq!(
        redact_query("=x&&token=&%ff%fe=1&code=abc"),
        "=x&&token=&%ff%fe=1&code=REDACTED"
    );
    assert_eq!(redact_query("access%5ftoken=x"), "access%5ftoken=REDACTED");
    // PHP reads `+` and a space as `_`: `pass+word` is its `pass_word`.
    assert_eq!(redact_query("pass+word=x"), "pass+word=REDACTED");
    assert_eq!(
        redact_query("x=1&client_secret=a%26b"),
        "x=1&client_secret=REDACTED"
    );
}

#[test]
fn uri_parts_are_checked_decoded_too() {
    let red = Redactor::new();
    assert_eq!(
        red.redact_uri_part("/k/pc%5flive%5fAbCdEfGhIjKlMnOpQrStUvWx"),
        "/k/pc_live_****"
    );
    assert_eq!(
        red.redact_uri_part("/k/pc%255Flive%255FAbCdEfGhIjKlMnOpQrStUvWx"),
        "/k/pc_live_****"
    );
    assert_eq!(red.redact_uri_part("/a%20b/c"), "/a%20b/c");
    assert_eq!(
        red.redact_uri_part("x=Bearer%20abcdefgh12"),
        "x=Bearer ****"
    );
}

#[test]
fn builder_checks_its_rules() {
    assert!(Redactor::builder().key_prefix("Bad").build().is_err());
    assert!(
        Redactor::builder()
            .key_prefix("nounderscore")
            .build()
            .is_err()
    );
    assert!(Redactor::builder().sensitive_name("").build().is_err());
    assert!(Redactor::builder().sensitive_name("a b").build().is_err());
    assert!(Redactor::builder().sensitive_name("---").build().is_err());
    // Names are compared without trailing digits: one of digits alone is nothing.
    assert!(Redactor::builder().sensitive_name("42").build().is_err());
    assert!(Redactor::builder().sensitive_name("_4.2").build().is_err());
    // At a `_` the scan looks for a key by its checksum, never for a prefix: a
    // prefix starting with `_` would be accepted and never found.
    assert!(Redactor::builder().key_prefix("_cn_").build().is_err());
    assert!(Redactor::builder().key_prefix("__x_").build().is_err());
    let red = Redactor::builder()
        .key_prefix("acme_")
        .sensitive_name("X-Acme")
        .build()
        .unwrap();
    assert_eq!(
        red.redact("acme_AbCdEfGhIjKlMnOpQrStUv x_acme=1"),
        "acme_**** x_acme=REDACTED"
    );
}

#[test]
fn every_key_prefix_the_builder_accepts_is_found() {
    for prefix in ["cn_", "cn__", "9ab_", "a_b_", "x9_live_", "zz___"] {
        let r = Redactor::builder().key_prefix(prefix).build().unwrap();
        for line in [
            format!("k={prefix}AbCdEfGhIjKlMnOpQrStUv x"),
            format!("{{\"k\":\"{prefix}AbCdEfGhIjKlMnOpQrStUv\"}}"),
            format!("{prefix}AbCdEfGhIjKlMnOpQrStUv"),
        ] {
            let out = r.redact(&line);
            assert!(!out.contains("AbCdEfGhIjKlMnOpQrStUv"), "{prefix}: {out}");
            assert!(out.contains(&format!("{prefix}****")), "{prefix}: {out}");
        }
    }
}

#[test]
fn names_written_with_json_escapes_are_decoded() {
    let r = Redactor::new();
    for (line, want) in [
        (
            r#"{"\u0070assword":"hunter2"}"#,
            r#"{"\u0070assword":"REDACTED"}"#,
        ),
        (
            r#"{"passwor\u0064":"hunter2"}"#,
            r#"{"passwor\u0064":"REDACTED"}"#,
        ),
        (r#"{"toke\u006E":"abc"}"#, r#"{"toke\u006E":"REDACTED"}"#),
        (r#"{"to\u006B_en":"abc"}"#, r#"{"to\u006B_en":"REDACTED"}"#),
        (
            r#"{"to\u006Ben77":"abc"}"#,
            r#"{"to\u006Ben77":"REDACTED"}"#,
        ),
        (
            r#"{"TOKE\u006e12":"abc"}"#,
            r#"{"TOKE\u006e12":"REDACTED"}"#,
        ),
        (
            r#"{"api\u005fkey":"abc"}"#,
            r#"{"api\u005fkey":"REDACTED"}"#,
        ),
        (r#"{"k\u0065y":7}"#, r#"{"k\u0065y":"REDACTED"}"#),
        (r#"x \u0073ecret=abc y"#, r#"x \u0073ecret=REDACTED y"#),
        // Inside a JSON string, as a log line holds a client's JSON body.
        (
            r#"{"body":"{\"\\u0070assword\":\"hunter2\"}"}"#,
            r#"{"body":"{\"\\u0070assword\":\"REDACTED\"}"}"#,
        ),
        // An escape of a byte no name has ends the name: `word` is not sensitive.
        (r#"{"pass\u0022word":"abc"}"#, r#"{"pass\u0022word":"abc"}"#),
    ] {
        assert_eq!(r.redact(line), want, "{line}");
        assert_eq!(r.redact_bytes_plain(line.as_bytes()), want.as_bytes());
        // Inside long text, where the separators are looked for 64 bytes at a time,
        // at every offset from those blocks; after dense fields too, so that no
        // block is skipped for having no separator (the escape's `\` may be in the
        // block before the separator's).
        let tail = r#","a":1"#.repeat(30);
        for n in 0..140 {
            let sparse = format!(r#"{{"level":"INFO","message":"{}"}} "#, "a".repeat(n));
            let dense = format!(r#"{}"{}":2,"#, r#""a":1,"#.repeat(12), "y".repeat(n % 64));
            for pad in [sparse, dense] {
                assert_eq!(
                    r.redact(&format!("{pad}{line}{tail}")),
                    format!("{pad}{want}{tail}"),
                    "{n}"
                );
            }
        }
    }
    assert!(r.is_sensitive_name("\\u0070assword"));
}

#[test]
fn extra_names_ignore_trailing_digits_like_the_built_in_ones() {
    let r = Redactor::builder()
        .sensitive_name("pin")
        .sensitive_name("Route.Code-42")
        .sensitive_name("pw7")
        .build()
        .unwrap();
    for name in [
        "pin",
        "PIN1",
        "pin_22",
        "route_code",
        "routecode42",
        "ROUTE-CODE7",
        "pw",
        "pw7",
        "PW_77",
    ] {
        assert!(r.is_sensitive_name(name), "{name}");
        assert_eq!(
            r.redact(&format!("{name}=s3cr3t")),
            format!("{name}=REDACTED")
        );
        assert_eq!(
            r.redact(&format!(r#"{{"{name}":"s3cr3t"}}"#)),
            format!(r#"{{"{name}":"REDACTED"}}"#)
        );
    }
    for name in ["pins", "spin", "route", "routes", "pwd7x", "pw7x"] {
        assert!(!r.is_sensitive_name(name), "{name}");
    }
}

/// A key in the generated format: `<prefix>_<random><checksum>`.
fn key_with(prefix: &str, random: &str) -> String {
    assert_eq!(random.len(), crate::key_format::RANDOM_LEN);
    let mut k = format!("{prefix}_{random}");
    let sum = crate::key_format::checksum(k.as_bytes());
    k.extend(sum.iter().map(|&b| char::from(b)));
    k
}

#[test]
fn keys_of_any_prefix_are_found_by_their_checksum() {
    for prefix in [
        "pc_demo",
        "a",
        "billing_live_2",
        "x9",
        &"q".repeat(32),
        "pc_live",
    ] {
        let k = key_with(prefix, "AbCdEfGhIjKlMnOpQrStUv");
        let body = &k[prefix.len() + 1..];
        for (text, expected) in [
            (k.clone(), format!("{prefix}_****")),
            (
                format!("GET /v1/{k}?x=1"),
                format!("GET /v1/{prefix}_****?x=1"),
            ),
            (
                format!("\"id\":\"{k}\""),
                format!("\"id\":\"{prefix}_****\""),
            ),
            // Glued to a word, or to another key-like run: every start is tried.
            (format!("xyz{k} "), format!("xyz{prefix}_**** ")),
            (
                format!("ab_cd_{k}_tail"),
                format!("ab_cd_{prefix}_****_tail"),
            ),
            // The separators written as escapes, as in a logged URL.
            (
                format!("/k/{}", k.replace('_', "%5F")),
                format!("/k/{}%5F****", prefix.replace('_', "%5F")),
            ),
        ] {
            let out = r(&text);
            assert_eq!(out, expected, "{text}");
            assert!(!out.contains(body));
        }
    }
}

#[test]
fn a_key_shape_without_a_valid_checksum_is_left_alone() {
    let k = key_with("zz_unreg", "AbCdEfGhIjKlMnOpQrStUv");
    let mut typo = k.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    for text in [
        typo.as_str(),
        // One character too many or too few.
        &format!("{k}x"),
        &k[..k.len() - 1],
        "request_id=abcdefghijklmnopqrstuvwxyz01",
        "snake_case_identifier_ABCDEFGHIJKLMNOPQRSTUVWXYZ01",
    ] {
        assert_eq!(r(text), text);
    }
    // A prefix the generator refuses: upper case, or a leading digit.
    assert_eq!(r(&k.replacen("zz", "ZZ", 1)), k.replacen("zz", "ZZ", 1));
}

#[test]
fn registered_prefixes_catch_mistyped_keys_at_a_word_boundary() {
    assert!(prefixes::register_for_test("zz_registered"));
    let typo = "zz_registered_AbCdEfGhIjKlMnOpQrStUvWxYz";
    assert_eq!(r(typo), "zz_registered_****");
    assert_eq!(r(&format!("k=x_{typo}&")), "k=x_zz_registered_****&");
    assert_eq!(
        r("zz_registered_AbCdEfGhIjKlMnOpQrS"),
        "zz_registered_AbCdEfGhIjKlMnOpQrS"
    );
    assert_eq!(r(&format!("a{typo}")), format!("a{typo}"));
    assert_eq!(
        r("/k/zz%5Fregistered%5FAbCdEfGhIjKlMnOpQrStUvWx"),
        "/k/zz%5Fregistered%5F****"
    );
    // Not a prefix the generator accepts: refused.
    assert!(!prefixes::register_for_test("Bad_prefix"));
    assert!(!prefixes::register_for_test("trailing_"));
}

#[test]
fn sanitize_escapes_controls_and_bounds() {
    assert_eq!(
        sanitize("/a\nb\rc\td\x1b[0m\u{7f}\u{85}e", 100),
        r"/a\u{a}b\u{d}c\u{9}d\u{1b}[0m\u{7f}\u{85}e"
    );
    assert_eq!(sanitize("abcdef", 5), "ab…");
    assert_eq!(sanitize("ok", 3), "ok");
}

#[test]
fn adversarial_inputs_stay_linear() {
    // Each of these would be quadratic for a naive rescan-per-start scanner; here they
    // finish at once (a regression shows up as a hanging test).
    let n = 200_000;
    for unit in [
        "eyJ",
        "eyJa.",
        "eyJaaaaaaaaaaa.b",
        "eyJaaaaaaaaaaa=.b=",
        "ewoAAAAAAAAAA.b",
        " ewoAAAAAAAAAA.b.c",
        "://",
        "://:;@",
        "redis://a:b@",
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "-----BEGIN RSA PRIVATE KEY-----\\n\"-----END ",
        "=",
        "-----BEGIN ",
        "Bearer ",
        "a=",
        "sk-",
        "%",
        "_",
        "a_",
        "%5F",
        "abcdefghijklmnopqrstuvwxyzabcdef_AbCdEfGhIjKlMnOpQrStUvWx0123 ",
        // A checksum below 2^32: every start of the prefix run is tried.
        "abcdefghijklmnopqrstuvwxyzabcdef_AbCdEfGhIjKlMnOpQrStUv000000 ",
        "a_b_c_d_e_f_g_h_i_j_k_l_m_n_o_p_AbCdEfGhIjKlMnOpQrStUvWx0123_",
    ] {
        let s = unit.repeat(n / unit.len());
        let _ = Redactor::new().redact(&s);
        let _ = Redactor::new().redact_uri_part(&s);
        let _ = redact_query(&s);
    }
}

/// A sensitive field whose value ends in `:` before a delimiter: the `:` starts a
/// field of its own, and a second pass leaves the first pass's output unchanged.
#[test]
fn a_value_ending_in_a_colon_is_redacted_idempotently() {
    assert_eq!(r("KEY=cookie:\0"), "KEY=REDACTED:REDACTED");
    assert_eq!(
        r("password=authorization:\u{1}x"),
        r("password=authorization:\u{1}x")
    );
    for s in [
        "token=cookie: a",
        "api_key=set-cookie:\tv",
        "secret=x-api-key:\0\0",
    ] {
        let once = r(s);
        assert!(
            !once.contains(&s[s.find('=').unwrap() + 1..]),
            "{s:?} -> {once:?}"
        );
    }
}

mod prefilter {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The vector search for separators finds what a look at every byte finds.
        #[test]
        fn separator_bits_match_a_look_at_every_byte(
            chunk in proptest::array::uniform16(prop_oneof![Just(b'='), Just(b':'), Just(b'_'), any::<u8>()])
        ) {
            prop_assert_eq!(scan::separators_in(chunk), scan::separators_in_plain(chunk));
        }

        /// The vector look for a `\` in a block finds what a look at every byte finds.
        #[test]
        fn block_backslash_search_matches_a_look_at_every_byte(
            at in proptest::collection::vec(0usize..64, 0..3),
            noise in proptest::array::uniform32(prop_oneof![Just(0x5d), Just(0xdc), Just(0x1c), any::<u8>()]),
        ) {
            let mut block = [0u8; 64];
            for (k, b) in block.iter_mut().enumerate() {
                *b = noise[k % 32].wrapping_add((k / 32) as u8);
            }
            for &k in &at {
                block[k] = b'\\';
            }
            prop_assert_eq!(scan::block_has_backslash(&block), scan::block_has_backslash_plain(&block));
        }

        /// The 8-byte look for a `\` finds what a look at each byte finds.
        #[test]
        fn backslash_search_matches_a_look_at_every_byte(
            bytes in proptest::collection::vec(prop_oneof![Just(b'\\'), Just(0x5d), Just(0xdc), any::<u8>()], 8..24),
            end in 8usize..24,
        ) {
            let end = end.min(bytes.len());
            prop_assert_eq!(
                crate::redact::has_backslash(crate::redact::eight_before(&bytes, end)),
                bytes[end - 8..end].contains(&b'\\')
            );
        }
    }

    /// The separators are looked for 64 bytes at a time, and past a stretch of text
    /// without any by a longer search: a field at every offset from the start, and
    /// after every length of such a stretch, is found.
    #[test]
    fn fields_are_found_at_every_offset_of_the_separator_search() {
        let r = Redactor::new();
        for pad in 0..200 {
            for (sep, field) in [
                (":", "password: hunter2"),
                ("=", "token=hunter2"),
                ("_", "pc_live_AbCdEfGhIjKlMnOpQrStUv"),
            ] {
                let text = format!("{}{field} {}", "a".repeat(pad), "b".repeat(150));
                let out = r.redact(&text);
                assert!(
                    !out.contains("hunter2") && !out.contains("AbCdEfGh"),
                    "{sep} after {pad}: {out}"
                );
                assert_eq!(
                    out.as_bytes(),
                    r.redact_bytes_plain(text.as_bytes()).as_ref(),
                    "{sep} after {pad}"
                );
            }
        }
    }

    /// Pieces that start, nearly start, or end a rule, glued in any order.
    const PIECES: &[&str] = &[
        "=",
        ":",
        "://",
        "_",
        "%",
        "%5F",
        "%5f",
        "%2D",
        "%20",
        "-",
        "--",
        "-----BEGIN ",
        "RSA PRIVATE KEY-----",
        "-----END ",
        "-----END RSA PRIVATE KEY-----",
        "Proc-Type: 4,ENCRYPTED",
        "redis://:",
        ";",
        "'",
        ")",
        "!",
        "\\n",
        "\\\"",
        "\"",
        "'",
        " ",
        "\n",
        ",",
        "@",
        "e",
        "ey",
        "eyJ",
        "eyJhbGciOiJIUzI1NiJ9",
        "ewo",
        "eyA",
        "ewogImFsZyI6ICJIUzI1NiIKfQ",
        "=.",
        "==",
        ".",
        "b",
        "B",
        "be",
        "Bearer ",
        "basic ",
        "token",
        "password",
        "api_key",
        "x-api-key",
        "cookie",
        "authorization",
        "pc_live_",
        "pc_test_",
        "cnp_live_",
        "billing_live_",
        "AbCdEfGhIjKlMnOpQrStUvWx0123",
        "EXAMPLExDOxNOTxUSE00000frrQx",
        "AKIA",
        "IOSFODNN7EXAMPLE",
        "AIza",
        "ghp_",
        "github_pat_",
        "glpat-",
        "sk_live_",
        "sk-ant-",
        "sk-",
        "xoxb-",
        "whsec_",
        "rk_test_",
        "gh",
        "sk",
        "0123456789",
        "abcdefghij",
        "é",
        "\u{202e}",
        "\0",
        "{\"a\":\"",
        "\"}",
        "[",
        "]",
        "[]",
        "%5B",
        "%5D",
        "user[",
        "password]",
        "(",
        ")",
        "Some(",
        "ApiToken(\\\"",
        "\\\\",
        "        ",
        "\t",
        "=>",
        "_pass",
        "Pwd",
        "api key",
        "PHPSESSID",
        "password_confirmation",
        "/",
        "?",
        "REDACTED",
        "****",
    ];

    pub(super) fn text() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(
                prop_oneof![
                    proptest::sample::select(PIECES).prop_map(|p| p.as_bytes().to_vec()),
                    "[a-zA-Z0-9_]{0,12}".prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 0..4),
                ],
                0..40,
            )
            .prop_map(|v| v.concat()),
        ]
    }

    /// The default rules; extra rules whose names the shortcuts know (three letters
    /// before any trailing digits); and an extra name too short for them, which
    /// switches them off.
    pub(super) fn redactors() -> [Redactor; 3] {
        [
            Redactor::new(),
            Redactor::builder()
                .key_prefix("cnp_live_")
                .key_prefix("a_b_")
                .token_prefix("acme-", 8)
                .token_prefix("b_x", 8)
                .sensitive_name("x-internal-auth")
                .sensitive_name("Route.Pin-42")
                .build()
                .unwrap(),
            Redactor::builder().sensitive_name("pw7").build().unwrap(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The prefiltered scan and the reference scan, which looks at every byte,
        /// give the same output on any bytes, secrets and near-secrets included,
        /// and redacting that output changes nothing in one pass.
        #[test]
        fn the_prefiltered_scan_agrees_with_the_plain_scan(t in text(), cut in 0usize..300) {
            for r in redactors() {
                let once = r.redact_bytes(&t);
                prop_assert_eq!(&once, &r.redact_bytes_plain(&t));
                prop_assert_eq!(&r.redact_bytes(&once), &once, "not idempotent");
                // Redacted text is read once: it asks for no other pass.
                prop_assert!(!scan::asks_again(&r.rules, &once), "{:?}", String::from_utf8_lossy(&once));
                // Every suffix: a candidate at the very start or end of the input.
                let s = &t[cut.min(t.len())..];
                prop_assert_eq!(r.redact_bytes(s), r.redact_bytes_plain(s));
            }
        }
    }

    /// Field names as they come in JSON log lines: ordinary ones, sensitive ones in
    /// any case, and near misses that share a sensitive name's last letters (the
    /// shortcuts decide by those), with separators, digits and escapes.
    pub(super) fn json_name() -> impl Strategy<Value = String> {
        let words: Vec<&'static [u8]> = SUFFIX_NAMES.iter().chain(EXACT_NAMES).copied().collect();
        prop_oneof![
            proptest::sample::select(vec![
                "timestamp",
                "level",
                "message",
                "request_id",
                "method",
                "path",
                "status",
                "latency_us",
                "client_ip",
                "principal",
                "target",
                "sid",
                "id",
                "t",
                "",
                // The test redactors' extra names, and near misses.
                "x-internal-auth",
                "X_INTERNAL_AUTH",
                "internal-auth",
                "xinternalauth2",
                "route.pin-42",
                "ROUTEPIN42",
                "route_pin4",
                "routepin",
                "epin42",
                "pw7",
                "PW",
                "xpw7",
            ])
            .prop_map(str::to_owned),
            // Trailing digits, after letters, digits, escapes or nothing (`T02`, `15`).
            "[a-zA-Z0-9%:_-]{0,4}[0-9]{1,9}",
            (
                proptest::sample::select(words.clone()),
                "[_.-]?[0-9]{0,2}",
                proptest::bool::ANY
            )
                .prop_map(|(w, tail, upper)| {
                    let w = String::from_utf8_lossy(w).into_owned();
                    format!("{}{tail}", if upper { w.to_uppercase() } else { w })
                }),
            // One letter percent-escaped (`pa%73s1`) or JSON-escaped (`to\u006Ben`),
            // which names are compared after decoding, then trailing digits.
            (
                proptest::sample::select(words.clone()),
                0usize..16,
                "[0-9]{0,2}",
                proptest::bool::ANY,
                proptest::sample::select(vec!["%", "\\u00"]),
                proptest::sample::select(vec!["", "", "_", "-", "."]),
            )
                .prop_map(|(w, at, tail, upper, how, sep)| {
                    let at = at % w.len();
                    let escape = if upper {
                        format!("{how}{:02X}", w[at])
                    } else {
                        format!("{how}{:02x}", w[at])
                    };
                    format!(
                        "{}{escape}{sep}{}{tail}",
                        String::from_utf8_lossy(&w[..at]),
                        String::from_utf8_lossy(&w[at + 1..])
                    )
                }),
            (
                "[a-zA-Z_]{0,3}",
                proptest::sample::select(words),
                0usize..5,
                proptest::sample::select(vec!["", "_", "-", ".", "%5F", "%2d", "1"]),
                0usize..4,
            )
                .prop_map(|(head, w, cut, sep, at)| {
                    // The word without its first letters, a separator put inside.
                    let rest = &w[cut.min(w.len() - 1)..];
                    let at = rest.len().saturating_sub(at.min(rest.len()));
                    format!(
                        "{head}{}{sep}{}",
                        String::from_utf8_lossy(&rest[..at]),
                        String::from_utf8_lossy(&rest[at..])
                    )
                }),
        ]
    }

    /// JSON lines of such names: quoted, escaped as inside a string, or `name=value`.
    fn json_line() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            (
                json_name(),
                proptest::sample::select(vec![
                    r#""{}":"#,
                    r#"\"{}\":"#,
                    "{}=",
                    "{}: ",
                    r#""{}" : "#,
                ]),
                prop_oneof![
                    proptest::sample::select(PIECES).prop_map(str::to_owned),
                    "[a-zA-Z0-9 /:._-]{0,16}",
                ],
            ),
            0..8,
        )
        .prop_map(|fields| {
            let body: Vec<String> = fields
                .into_iter()
                .map(|(name, form, value)| format!("{}\"{value}\"", form.replace("{}", &name)))
                .collect();
            format!("{{{}}}", body.join(",")).into_bytes()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// On JSON-shaped lines the prefiltered scan agrees with the plain one, and at
        /// every separator the field rule's shortcut agrees with its long way round.
        #[test]
        fn json_lines_agree_with_the_plain_scan_and_the_full_field_rule(line in json_line()) {
            for r in redactors() {
                prop_assert_eq!(r.redact_bytes(&line), r.redact_bytes_plain(&line));
                for (i, &b) in line.iter().enumerate() {
                    if b == b':' || b == b'=' {
                        prop_assert!(
                            scan::field_shortcut_holds(&r.rules, &line, i),
                            "{} at {}", String::from_utf8_lossy(&line), i
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn agrees_on_log_lines_clean_and_secret() {
        let r = Redactor::new();
        for line in [
            r#"{"timestamp":"2026-12-01T02:15:18.000001Z","level":"INFO","fields":{"request_id":"0b6c1e2a","path":"/v1/jobs/1","latency_us":412},"target":"portcullis::access"}"#,
            r#"{"note":"Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2ln","k":"pc_live_AbCdEfGhIjKlMnOpQrStUvWx0123"}"#,
            "REDIS_URL=redis://:hunter2@cache:6379/0 AKIAIOSFODNN7EXAMPLE token=x",
            "=",
            ":",
            "_",
            "e",
            "",
            "ab",
            "x=",
            "x:",
        ] {
            assert_eq!(
                r.redact_bytes(line.as_bytes()),
                r.redact_bytes_plain(line.as_bytes()),
                "{line}"
            );
        }
    }
}

mod names {
    use super::*;
    use proptest::prelude::*;

    /// The built-in sensitive names and the test redactors' extra names, normalised.
    fn known_names() -> Vec<&'static [u8]> {
        SUFFIX_NAMES
            .iter()
            .chain(EXACT_NAMES)
            .chain(WORD_NAMES)
            .copied()
            .chain([&b"xinternalauth"[..], b"routepin42", b"pw7"])
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// The one-lookup shortcut never turns down a name the full check finds sensitive.
        #[test]
        fn the_name_shortcut_only_turns_down_names_that_are_not_sensitive(
            name in proptest::prop_oneof![
                "[a-zA-Z0-9_.%-]{0,20}",
                // Spaces (dropped, as PHP reads them), brackets, a word's case.
                "[a-zA-Z0-9_.%\\[\\] -]{0,20}",
                (
                    "[a-zA-Z0-9_ \\[-]{0,6}",
                    proptest::sample::select(known_names()),
                    proptest::sample::select(vec!["]", "[]", "][]", "[0]", "%5D", "%5d", "] ", ""]),
                )
                    .prop_map(|(a, n, b)| format!("{a}{}{b}", String::from_utf8_lossy(n))),
                // A name with one letter JSON-escaped (`to\u006Ben`).
                (
                    proptest::sample::select(known_names()),
                    0usize..16,
                    "[0-9]{0,2}",
                )
                    .prop_map(|(n, at, tail)| {
                        let at = at % n.len();
                        format!(
                            "{}\\u00{:02X}{}{tail}",
                            String::from_utf8_lossy(&n[..at]),
                            n[at],
                            String::from_utf8_lossy(&n[at + 1..])
                        )
                    }),
                (
                    "[a-zA-Z0-9_.-]{0,6}",
                    proptest::sample::select(known_names()),
                    "[_.-]?[0-9]{0,3}",
                )
                    .prop_map(|(a, n, b)| format!("{a}{}{b}", String::from_utf8_lossy(n).to_uppercase())),
                // Near misses: a name's last letters after other ones, a separator
                // or digit among them (`request_id` ends like `sessionid`).
                (
                    "[a-zA-Z0-9_.-]{0,3}",
                    proptest::sample::select(known_names()),
                    1usize..6,
                    "[_.0-9-]?",
                    0usize..3,
                )
                    .prop_map(|(a, n, keep, sep, at)| {
                        let tail = &n[n.len() - keep.min(n.len())..];
                        let at = at.min(tail.len());
                        format!(
                            "{a}{}{sep}{}",
                            String::from_utf8_lossy(&tail[..at]),
                            String::from_utf8_lossy(&tail[at..])
                        )
                    }),
            ],
            whole in proptest::bool::ANY,
        ) {
            for r in prefilter::redactors() {
                let rules = &r.rules;
                if rules.surely_not_sensitive(name.as_bytes()) {
                    proptest::prop_assert!(!rules.is_sensitive_name_closely(name.as_bytes(), whole), "{}", name);
                }
            }
        }

        /// Read from the end of a longer text, the shortcut stops where the name
        /// starts, and still never turns down a sensitive name.
        #[test]
        fn the_name_shortcut_stops_where_the_name_starts(
            before in "[ :\"'={},/a-z0-9%]{0,3}",
            name in "[a-zA-Z0-9_.%-]{0,6}",
            word in proptest::sample::select(known_names()),
            cut in 0usize..12,
        ) {
            let word = String::from_utf8_lossy(word);
            let text = format!("{before}{name}{}", &word[cut.min(word.len())..]);
            let t = text.as_bytes();
            let start = t.iter().rposition(|&c| !scan::is_name_byte(c)).map_or(0, |p| p + 1);
            for r in prefilter::redactors() {
                let rules = &r.rules;
                if rules.surely_not_sensitive(t) {
                    proptest::prop_assert!(!rules.is_sensitive_name_closely(&t[start..], true), "{}", text);
                }
            }
        }
    }
}

#[test]
fn tokens_of_your_own_format() {
    let r = Redactor::builder()
        .token_prefix("acme-", 24)
        .token_prefix("XY_live_", 10)
        .build()
        .unwrap();
    let cases = [
        ("t=acme-Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5", "t=acme-****"),
        (
            "{\"k\":\"XY_live_abcDEF_123-x\"}",
            "{\"k\":\"XY_live_****\"}",
        ),
        (
            "GET /v1?k=acme%2DZm9vYmFyYmF6cXV4MTIzNDU2Nzg5",
            "GET /v1?k=acme%2D****",
        ),
        // Too short, or another prefix: left alone.
        ("acme-widgets-and-more", "acme-widgets-and-more"),
        ("XY_test_abcdefghijkl", "XY_test_abcdefghijkl"),
    ];
    for (input, want) in cases {
        let once = r.redact(input);
        assert_eq!(once, want, "{input}");
        assert_eq!(r.redact(&once), once, "not idempotent: {input}");
    }
    // The default redactor does not know the format.
    assert_eq!(
        Redactor::new().redact("t=acme-Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5"),
        "t=acme-Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5"
    );
    for (prefix, min) in [
        ("ac", 24),
        ("-acme", 24),
        ("acme!", 24),
        ("acme-", 7),
        ("acme-", 2000),
    ] {
        assert!(
            Redactor::builder()
                .token_prefix(prefix, min)
                .build()
                .is_err(),
            "{prefix} {min}"
        );
    }
}

/// `RedactingJson` writes the line `tracing-subscriber`'s JSON format would write,
/// and redacts it as `RedactingMakeWriter` would.
#[cfg(feature = "redact-writer")]
mod json_format {
    use proptest::prelude::*;

    use super::prefilter::text;
    use super::*;
    use crate::test_support::Capture;

    /// The line each formatter writes for the event `emit` makes, the timestamps
    /// (read from the clock by each) cut off.
    fn both(r: &Redactor, emit: impl Fn()) -> (String, String) {
        let (peer, ours) = (Capture::default(), Capture::default());
        let s = tracing_subscriber::fmt()
            .json()
            .with_writer(RedactingMakeWriter::with_redactor(peer.clone(), r.clone()))
            .finish();
        tracing::subscriber::with_default(s, &emit);
        let s = tracing_subscriber::fmt()
            .event_format(RedactingJson::with_redactor(r.clone()))
            .with_writer(ours.clone())
            .finish();
        tracing::subscriber::with_default(s, &emit);
        (untimed(&peer.take()), untimed(&ours.take()))
    }

    /// Each line without its `{"timestamp":"` and 27 characters of time.
    fn untimed(lines: &str) -> String {
        let mut out = String::new();
        for line in lines.split_inclusive('\n') {
            assert_eq!(&line[..14], r#"{"timestamp":""#, "{line}");
            out.push_str(&line[41..]);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any text in any kind of field, secrets and control characters included:
        /// the same line as the peer format through the redacting writer.
        #[test]
        fn lines_match_the_redacted_peer_format(
            a in text(), b in text(), c in text(), n in any::<i64>(), u in any::<u64>(), flag in any::<bool>()
        ) {
            let (a, b, c) = (
                String::from_utf8_lossy(&a).into_owned(),
                String::from_utf8_lossy(&b).into_owned(),
                String::from_utf8_lossy(&c).into_owned(),
            );
            for r in prefilter::redactors() {
                let (peer, ours) = both(&r, || {
                    tracing::info!(target: "app::part", s = a.as_str(), n, u, flag, d = ?b, "{c}");
                    tracing::warn!(shown = %a, "{}", b.len());
                    tracing::error!(api_key = a.as_str(), token = %c);
                });
                prop_assert_eq!(&peer, &ours);
                // Every line is JSON, and none leaks what the redactor removes.
                for line in ours.lines() {
                    let line = format!("{{\"t\":\"{line}");
                    prop_assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok(), "{}", line);
                }
            }
        }
    }

    proptest! {
        /// The escaping is serde_json's, for any text.
        #[test]
        fn strings_are_escaped_as_serde_json_escapes_them(
            s in prop_oneof![any::<String>(), "[\\x00-\\x7f]{0,40}", "[\"\\\\a\\x1b\\n]{0,40}"]
        ) {
            let mut ours = String::from("\"");
            super::super::json::push_escaped(&mut ours, &s);
            ours.push('"');
            prop_assert_eq!(ours, serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn floats_spans_and_nesting() {
        let r = Redactor::new();
        let (peer, ours) = both(&r, || {
            tracing::info!(x = 1.0f64, y = -0.5f64, z = 12345.25f64, w = 3u8, "m");
        });
        assert_eq!(peer, ours);
        // A large float: a JSON number that reads back the same (its form may differ).
        let (_, ours) = both(&r, || tracing::info!(z = 1e300f64, m = f64::MIN_POSITIVE));
        let v: serde_json::Value = serde_json::from_str(&format!("{{\"t\":\"{ours}")).unwrap();
        assert_eq!(v["fields"]["z"].as_f64(), Some(1e300), "{ours}");
        assert_eq!(v["fields"]["m"].as_f64(), Some(f64::MIN_POSITIVE), "{ours}");
        let (_, ours) = both(&r, || tracing::info!(x = f64::NAN, y = f64::INFINITY));
        assert!(ours.contains(r#""fields":{"x":null,"y":null}"#), "{ours}");

        // Spans: from the root, each with its fields as the field formatter wrote
        // them, redacted with the rest of the line.
        let (_, ours) = both(&r, || {
            let outer = tracing::info_span!("outer", token = "abc123", n = 1);
            let _o = outer.enter();
            let inner = tracing::info_span!("inner");
            let _i = inner.enter();
            tracing::info!("in");
        });
        let v: serde_json::Value = serde_json::from_str(&format!("{{\"t\":\"{ours}")).unwrap();
        assert_eq!(v["spans"][0]["name"], "outer");
        assert_eq!(v["spans"][0]["fields"], "token=\"REDACTED\" n=1");
        assert_eq!(v["spans"][1]["name"], "inner");
        assert!(v["spans"][1].get("fields").is_none(), "{ours}");
        assert!(!ours.contains("abc123"), "{ours}");

        // An event logged while another is being formatted gets its own buffer.
        struct Nested;
        impl fmt::Debug for Nested {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                tracing::info!(password = "hunter2", "inner");
                f.write_str("outer value")
            }
        }
        let (peer, ours) = both(&r, || tracing::info!(v = ?Nested));
        assert_eq!(peer, ours);
        assert!(!ours.contains("hunter2"), "{ours}");
    }
}

/// Redaction keeps a JSON document what it was: valid, with the same objects, arrays
/// and members in the same places; only the text of strings (and a sensitive
/// member's scalar, which becomes a string) changes.
mod json_structure {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::prefilter::{json_name, redactors, text};
    use crate::fuzzing::json_skeleton;

    /// Text as log lines carry it: anything, and sensitive names followed by each
    /// separator and quote, the value left open or closed.
    fn value_text() -> impl Strategy<Value = String> {
        let lossy = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        prop_oneof![
            text().prop_map(lossy),
            (
                json_name(),
                proptest::sample::select(vec![
                    "=", ": ", ":", "=\"", "='", ":\"", ": '", "=\\\"", " = ", "=`"
                ]),
                text(),
                proptest::sample::select(vec!["", "\"", "'", " x", "\\"]),
            )
                .prop_map(move |(n, s, t, end)| format!("{n}{s}{}{end}", lossy(t))),
        ]
    }

    fn member_name() -> impl Strategy<Value = String> {
        prop_oneof![json_name(), value_text()]
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            value_text().prop_map(Value::String),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
            (-1e6f64..1e6).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec((member_name(), inner), 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Value> {
        proptest::collection::vec((member_name(), value()), 0..8)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn redaction_keeps_json_lines_whole(doc in object(), pretty in any::<bool>()) {
            let doc = if pretty {
                serde_json::to_string_pretty(&doc)
            } else {
                serde_json::to_string(&doc)
            };
            let line = format!("{}\n", doc.unwrap());
            for r in redactors() {
                let out = r.redact(&line);
                let parsed = serde_json::from_str::<Value>(&out);
                prop_assert!(parsed.is_ok(), "{:?}:\n{}{}", parsed.err(), line, out);
                prop_assert_eq!(
                    json_skeleton(line.as_bytes()),
                    json_skeleton(out.as_bytes()),
                    "\n{}{}", line, out
                );
                prop_assert_eq!(out.matches('\n').count(), line.matches('\n').count(), "{}", out);
            }
            // The fuzz target's checks on the same input.
            crate::fuzzing::redactor(line.as_bytes());
        }
    }

    #[test]
    fn json_cases() {
        let r = crate::redact::Redactor::new();
        for (line, want) in [
            // A value's quote that is the end of the string the name is in.
            (r#"{"m":"token=","s":""}"#, r#"{"m":"token=","s":""}"#),
            (r#"{"m":"Bearer =","s":"x"}"#, r#"{"m":"Bearer =","s":"x"}"#),
            (r#"{"m":"token="}"#, r#"{"m":"token="}"#),
            // A value in single quotes ends with the JSON string it is in.
            (
                r#"{"m":"token='abc","s":"x'"}"#,
                r#"{"m":"token='REDACTED","s":"x'"}"#,
            ),
            (
                "{\"m\":\"password='\",\"s\":\"x\"}\n",
                "{\"m\":\"password='\",\"s\":\"x\"}\n",
            ),
            // A sensitive member's number or literal becomes a string.
            (
                r#"{"password":5,"token":true,"secret":-1.5e3,"n":1}"#,
                r#"{"password":"REDACTED","token":"REDACTED","secret":"REDACTED","n":1}"#,
            ),
            (
                r#"{"k\\\"":{"token":null}}"#,
                r#"{"k\\\"":{"token":"REDACTED"}}"#,
            ),
            // Inside a string, a member of escaped JSON is text: no quotes are added.
            (
                r#"{"m":"{\"password\":5}"}"#,
                r#"{"m":"{\"password\":REDACTED}"}"#,
            ),
            // Plain text keeps its quoted values.
            (r#"token="abc def" x"#, r#"token="REDACTED" x"#),
            (r#"password='ab"cd' x"#, r#"password='REDACTED' x"#),
        ] {
            assert_eq!(r.redact(line), want, "{line}");
        }
    }
}

/// The forms of names and values a field can take beyond `name=value`: bracketed
/// names, Rust `Debug` values, aligned listings, and the names that hold a secret
/// without ending in a sensitive word. Each property is checked by the prefiltered
/// scan and by the plain one, which must agree.
mod field_forms {
    use super::*;
    use proptest::prelude::*;

    /// A secret of a length and alphabet that nothing else in a line has.
    const SECRET: &str = "[A-Z][a-z]{3}[0-9]{2}[A-Za-z]{8,12}";

    /// Redacts `text` with the default rules, checking the two scans agree and the
    /// output is stable.
    fn red(text: &str) -> String {
        let red = Redactor::new();
        let out = red.redact(text).into_owned();
        assert_eq!(
            out.as_bytes(),
            &*red.redact_bytes_plain(text.as_bytes()),
            "the scans disagree on {text:?}"
        );
        assert_eq!(red.redact(&out), out, "not idempotent for {text:?}");
        out
    }

    /// A built-in sensitive name, written in one of the ways names are written.
    fn sensitive_name() -> impl Strategy<Value = String> {
        (
            proptest::sample::select(vec![
                "password",
                "api_key",
                "token",
                "client_secret",
                "key",
                "pass",
                "access-token",
                "Authorization",
                "SECRET_KEY_BASE",
                "password_confirmation",
                "PHPSESSID",
            ]),
            any::<bool>(),
        )
            .prop_map(|(n, upper)| {
                if upper {
                    n.to_uppercase()
                } else {
                    n.to_owned()
                }
            })
    }

    /// A name as Rails, PHP and `qs` nest parameters, raw or percent-encoded, whose
    /// value is that of `inner`.
    fn bracketed(inner: &str, outer: &str, form: usize, encoded: u8) -> String {
        let name = match form {
            0 => format!("{outer}[{inner}]"),
            1 => format!("{inner}[]"),
            2 => format!("{outer}[{inner}][]"),
            3 => format!("{outer}[{inner}][0]"),
            _ => format!("{outer}[x][{inner}]"),
        };
        match encoded {
            0 => name,
            1 => name.replace('[', "%5B").replace(']', "%5D"),
            _ => name.replace('[', "%5b").replace(']', "%5d"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A bracketed name is sensitive when its last segment (or the name
        /// before `[]`) is: in a query, in free text and in JSON lines.
        #[test]
        fn bracketed_sensitive_names_hide_their_value(
            inner in sensitive_name(),
            outer in proptest::sample::select(vec!["user", "session", "a", "creds_0"]),
            form in 0usize..5,
            encoded in 0u8..3,
            secret in SECRET,
            context in 0usize..5,
        ) {
            let name = bracketed(&inner, outer, form, encoded);
            let out = match context {
                0 => redact_query(&format!("page=1&{name}={secret}&q=x")).into_owned(),
                1 => red(&format!("GET /login?{name}={secret} 200")),
                2 => red(&format!("{name}: {secret}")),
                3 => red(&format!(r#"{{"{name}":"{secret}","n":1}}"#)),
                _ => red(&format!(r#"{{"msg":"params {{\"{name}\":\"{secret}\"}}"}}"#)),
            };
            prop_assert!(!out.contains(&secret), "{} -> {}", name, out);
        }

        /// A bracketed name whose segments are ordinary keeps its value, and the
        /// name rule answers for it what it answers for its last segment.
        #[test]
        fn bracketed_ordinary_names_keep_their_value(
            inner in proptest::sample::select(vec!["email", "key_id", "status", "request_id", "path", "passage"]),
            outer in proptest::sample::select(vec!["user", "password", "token"]),
            form in 0usize..5,
            encoded in 0u8..3,
        ) {
            let name = bracketed(inner, outer, form, encoded);
            let r = Redactor::new();
            let decoded = String::from_utf8(percent_decode(name.as_bytes(), true).into_owned()).unwrap();
            let expect = if form == 1 { r.is_sensitive_name(inner) } else { false };
            prop_assert_eq!(r.is_sensitive_name(&decoded), expect, "{}", decoded);
            if !expect {
                let q = format!("{name}=plainvalue");
                prop_assert_eq!(redact_query(&q), q.as_str());
                prop_assert_eq!(red(&q), q);
            }
        }
    }

    /// A Rust `Debug` string of a value, as `{:?}` writes it.
    fn debug_of(wrappers: &[&str], secret: &str) -> String {
        let mut v = format!("{secret:?}");
        for w in wrappers.iter().rev() {
            v = format!("{w}({v})");
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A sensitive field of a `Debug` dump whose value is an `Option` or a
        /// newtype (`password: Some("…")`, nested, with quotes, backslashes and
        /// parentheses inside) is hidden whole: written as is, and JSON-escaped in
        /// a JSON line, which stays the same JSON document.
        #[test]
        fn debug_values_of_sensitive_fields_are_hidden_whole(
            name in sensitive_name(),
            wrappers in proptest::collection::vec(
                proptest::sample::select(vec!["Some", "ApiToken", "Secret", "Box"]), 1..4),
            secret in SECRET,
            noise in proptest::sample::select(vec!["", "\"", "\\", ")", "(", "\")", "\\\")", ", x: ("]),
            after in proptest::sample::select(vec!["", ", port: 5432", " }", ")"]),
            in_json in any::<bool>(),
        ) {
            let value = debug_of(&wrappers, &format!("{secret}{noise}{secret}"));
            let dump = format!("Config {{ host: \"db\", {name}: {value}{after} }}");
            let out = if in_json {
                let line = serde_json::json!({"cfg": dump, "n": 1}).to_string();
                let out = red(&line);
                let doc: serde_json::Value = serde_json::from_str(&out)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {out}")))?;
                prop_assert_eq!(&doc["n"], 1);
                prop_assert!(doc["cfg"].as_str().unwrap().starts_with("Config { host: \"db\", "), "{}", out);
                out
            } else {
                red(&dump)
            };
            prop_assert!(!out.contains(&secret), "{} -> {}", dump, out);
            if after == ", port: 5432" {
                prop_assert!(out.contains("port: 5432"), "{}", out);
            }
        }

        /// Text a client controls, inside a JSON string, cannot make a `Debug`
        /// value take in the fields after it.
        #[test]
        fn debug_values_end_with_their_json_string(
            name in sensitive_name(),
            text in proptest::collection::vec(proptest::sample::select(vec![
                "Some(", "(", ")", "\"", "\\", "\\\"", ",", "x", " ", "}", ":"]), 0..12),
        ) {
            let line = serde_json::json!({"ua": format!("{name}: Some({})", text.concat()), "n": 1}).to_string();
            let out = red(&line);
            let doc: serde_json::Value = serde_json::from_str(&out)
                .map_err(|e| TestCaseError::fail(format!("{e}: {line} -> {out}")))?;
            prop_assert_eq!(&doc["n"], 1, "{}", out);
        }

        /// A name padded for alignment (`password      = v`, with spaces or tabs)
        /// keeps its value hidden, whatever the padding up to 64 (with the separator's).
        #[test]
        fn aligned_names_hide_their_value(
            name in sensitive_name(),
            pad in proptest::collection::vec(proptest::sample::select(vec![" ", "\t"]), 0..=62),
            sep in proptest::sample::select(vec!["=", ":", " = ", ": "]),
            quoted in any::<bool>(),
            secret in SECRET,
        ) {
            let name = if quoted { format!("\"{name}\"") } else { name };
            let text = format!("{name}{}{sep}{secret}\n", pad.concat());
            let out = red(&text);
            prop_assert!(!out.contains(&secret), "{:?} -> {:?}", text, out);
            let r = Redactor::new();
            for (i, &b) in text.as_bytes().iter().enumerate() {
                if b == b'=' || b == b':' {
                    prop_assert!(scan::field_shortcut_holds(&r.rules, text.as_bytes(), i), "{:?}", text);
                }
            }
        }

        /// The names that hold a secret without ending in one of the sensitive
        /// words: what forms keep beside a password, `pass` and `pwd` as words of
        /// their own, PHP's session cookie, framework keys, and names PHP reads with
        /// `+` or a space as `_`; in any case, with any separators.
        #[test]
        fn names_holding_a_secret_are_sensitive(
            head in proptest::sample::select(vec!["", "new_", "user.", "DB_", "smtp-", "x"]),
            word in proptest::sample::select(vec![
                "password_confirmation", "passwordConfirm", "password_hash", "password_digest",
                "password_again", "password_repeat", "_pass", "_pwd", "-PASS", ".Pwd", "Pass",
                "Pwd", "sessid", "SECRET_KEY_BASE", "signing_key", "encryption-key",
                "AccountKey", "api key", "api+key", "api%20key", "access token",
            ]),
            digits in "[0-9]{0,2}",
            upper in any::<bool>(),
            secret in SECRET,
        ) {
            // A word marked by case alone needs a lower-case letter before it.
            let head = if head.is_empty() && matches!(word, "Pass" | "Pwd") { "db" } else { head };
            let mut name = format!("{head}{word}{digits}");
            if upper && !matches!(word, "passwordConfirm" | "Pass" | "Pwd" | "AccountKey") {
                name = name.to_uppercase();
            }
            let decoded = String::from_utf8(percent_decode(name.as_bytes(), true).into_owned()).unwrap();
            prop_assert!(Redactor::new().is_sensitive_name(&decoded), "{}", decoded);
            let q = format!("a=1&{name}={secret}");
            prop_assert!(!redact_query(&q).contains(&secret), "{}", q);
            if !name.contains(['+', ' ']) {
                for text in [format!("{name}={secret}"), format!(r#"{{"{name}":"{secret}"}}"#)] {
                    let out = red(&text);
                    prop_assert!(!out.contains(&secret), "{} -> {}", text, out);
                }
            }
        }
    }

    /// Ordinary names stay ordinary, near misses of the new names included.
    #[test]
    fn ordinary_names_stay_ordinary() {
        let r = Redactor::new();
        for name in [
            "request_id",
            "path",
            "user",
            "status",
            "key_id",
            "passage",
            "bypass",
            "compass",
            "cache_bypass",
            "password_length",
            "password_policy",
            "passwordless",
            "session_count",
            "key_base",
            "account",
            "signing_alg",
            "DBPass",
            "passport",
            "pwd_dir",
        ] {
            assert!(!r.is_sensitive_name(name), "{name}");
            let q = format!("{name}=v");
            assert_eq!(redact_query(&q), q, "{name}");
            assert_eq!(red(&q), q, "{name}");
        }
    }

    /// The low-cost forms: Ruby's `=>`, and a Go map's `map[key:v]`, which the
    /// bracket rule must not change.
    #[test]
    fn ruby_hashes_and_go_maps() {
        assert_eq!(
            red(r#"{"password" => "hunter2", "user" => "ann"}"#),
            r#"{"password" => "REDACTED", "user" => "ann"}"#
        );
        assert_eq!(red("{:token=>abc123}"), "{:token=>REDACTED}");
        assert_eq!(red("map[key:abc user:ann]"), "map[key:REDACTED user:ann]");
        assert_eq!(
            red("user[password]=x&user[email]=a"),
            "user[password]=REDACTED&user[email]=a"
        );
    }
}

/// Secret shapes written in the variants their producers use: PEM blocks with armor
/// headers, URL passwords with the bytes RFC 3986 allows in userinfo, JWTs with
/// padding or spaced header JSON. For each: nothing of the secret is left, the
/// prefiltered and the plain scan agree, and redaction is idempotent.
mod shape_variants {
    use super::prefilter::redactors;
    use super::*;
    use proptest::prelude::*;

    /// Redacts `text` with every test redactor, checking that the two scans agree
    /// and that a second pass changes nothing; returns the default redactor's output.
    fn checked(text: &str) -> Result<String, TestCaseError> {
        let mut first = None;
        for red in redactors() {
            let out = red.redact(text).into_owned();
            prop_assert_eq!(
                out.as_bytes(),
                &*red.redact_bytes_plain(text.as_bytes()),
                "{:?}",
                text
            );
            prop_assert_eq!(&red.redact(&out), &out, "not idempotent: {:?}", text);
            first.get_or_insert(out);
        }
        Ok(first.unwrap())
    }

    /// Whether any 12 bytes in a row of `secret` are in `out`.
    fn shows_part_of(out: &str, secret: &str) -> bool {
        secret
            .as_bytes()
            .windows(12.min(secret.len()))
            .any(|w| out.contains(std::str::from_utf8(w).unwrap()))
    }

    /// A private key block: its label, armor headers, base64 body lines (and an
    /// OpenPGP checksum line) and END line, with `\n` line breaks.
    fn pem_block() -> impl Strategy<Value = (String, Vec<String>)> {
        (
            proptest::sample::select(vec![
                "RSA PRIVATE KEY",
                "EC PRIVATE KEY",
                "PRIVATE KEY",
                "ENCRYPTED PRIVATE KEY",
                "OPENSSH PRIVATE KEY",
                "PGP PRIVATE KEY BLOCK",
            ]),
            proptest::sample::select(vec![
                "",
                "Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0123456789ABCDEF\n\n",
                "Version: GnuPG v2\n\n",
                "Comment: \"Ann's key\", backup; see https://example.com/k?a=1&b=2\n\n",
                "Version: OpenPGP.js v4\nComment: token=x password: y\n\n",
                "Hash: SHA256\nCharset: UTF-8\n\n",
            ]),
            proptest::collection::vec("[A-Za-z0-9+/]{16,64}", 1..5),
            proptest::bool::ANY,
        )
            .prop_map(|(label, headers, body, checksum)| {
                let mut text = format!("-----BEGIN {label}-----\n{headers}");
                for line in &body {
                    text.push_str(line);
                    text.push('\n');
                }
                if checksum {
                    text.push_str("=Xb2Q\n");
                }
                text.push_str(&format!("-----END {label}-----"));
                (text, body)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Everything from the BEGIN line to the END line goes, armor headers and
        /// all, however the line breaks are written and wherever the block is.
        #[test]
        fn private_key_blocks_with_armor_headers_go_whole(
            (block, body) in pem_block(),
            crlf in proptest::bool::ANY,
            // Written raw, as in a JSON string, or as in a JSON string in a string.
            escapes in 0usize..3,
            context in proptest::sample::select(vec!["{}", "key={} next", "loaded:\n{}\nnext line", "msg=\"{}\" x=1"]),
        ) {
            let mut block = if crlf { block.replace('\n', "\r\n") } else { block };
            for _ in 0..escapes {
                let quoted = serde_json::to_string(&block).unwrap();
                block = quoted[1..quoted.len() - 1].to_owned();
            }
            let text = context.replace("{}", &block);
            let out = checked(&text)?;
            for line in &body {
                prop_assert!(!shows_part_of(&out, line), "{:?} -> {:?}", text, out);
            }
            prop_assert!(!out.contains("Proc-Type") && !out.contains("Comment"), "{:?}", out);
            prop_assert!(out.contains("[REDACTED PRIVATE KEY]"), "{:?}", out);
            // What follows the END line is kept.
            let after = &context[context.find("{}").unwrap() + 2..];
            prop_assert!(out.ends_with(after), "{:?} -> {:?}", text, out);
        }

        /// Cut anywhere after its BEGIN line (a truncated log field), no byte of the
        /// body that is there is left; in a JSON string the block ends with the
        /// string, and the document keeps its structure.
        #[test]
        fn private_key_blocks_without_an_end_line_fail_closed(
            (block, body) in pem_block(),
            cut in 0usize..400,
            json in proptest::bool::ANY,
        ) {
            let begin_line = block.find('\n').unwrap();
            let cut = (begin_line + cut).min(block.len() - 1);
            let cut_block = &block[..cut];
            let text = if json {
                let doc = serde_json::json!({"m": cut_block, "n": "after", "k": 1});
                serde_json::to_string(&doc).unwrap()
            } else {
                format!("loaded {cut_block}")
            };
            let out = checked(&text)?;
            for line in &body {
                for part in cut_block.split('\n') {
                    if part.len() >= 12 && line.contains(part) {
                        prop_assert!(!out.contains(part), "{:?} -> {:?}", text, out);
                    }
                }
                prop_assert!(!shows_part_of(&out, line), "{:?} -> {:?}", text, out);
            }
            if json {
                let v: serde_json::Value = serde_json::from_str(&out)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {out}")))?;
                prop_assert_eq!(&v["n"], "after");
                prop_assert_eq!(&v["k"], 1);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A URL password holding the bytes RFC 3986 allows in userinfo (the
        /// sub-delims, `:`, escapes, non-ASCII) or an `@` (URL parsers take the
        /// last one of the authority) is hidden whole, and only the password.
        #[test]
        fn url_passwords_with_any_userinfo_byte_are_hidden_whole(
            scheme in proptest::sample::select(vec!["redis", "rediss", "postgres", "amqp", "https"]),
            user in proptest::sample::select(vec!["", "default", "app", "a;b", "u%40x", "é"]),
            a in "[A-Za-z0-9]{6,12}",
            mid in "[!$&'()*+,;=@:%~._-]{1,3}|é|%40|%2F",
            b in "[A-Za-z0-9]{6,12}",
            host in proptest::sample::select(vec!["cache.internal:6379", "[::1]:6379", "db", "h@st"]),
            rest in proptest::sample::select(vec!["", "/0", "/db?sslmode=require", "#f", "?x=1"]),
            (before, after) in proptest::sample::select(vec![
                ("", ""),
                ("connecting to ", " then mail ann@example.com"),
                ("url=", " x=1"),
                ("{\"dsn\":\"", "\",\"n\":\"a@b\"}"),
                ("url='", "' ok"),
            ]),
        ) {
            // A host holding `@` is read as part of the userinfo, as by `url`.
            let (host, hidden_host) = match host.split_once('@') {
                Some((h, rest)) => (host, Some((h, rest))),
                None => (host, None),
            };
            let text = format!("{before}{scheme}://{user}:{a}{mid}{b}@{host}{rest}{after}");
            let out = checked(&text)?;
            prop_assert!(!out.contains(&a) && !out.contains(&b), "{:?} -> {:?}", text, out);
            let want = match hidden_host {
                None => format!("{before}{scheme}://{user}:****@{host}{rest}{after}"),
                Some((_, tail)) => format!("{before}{scheme}://{user}:****@{tail}{rest}{after}"),
            };
            prop_assert_eq!(out, want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// An authority that holds a sensitive field, whatever ends or follows it:
        /// a field the first pass hides with the bytes that ended the authority (a
        /// `/`) never joins a later `@` on a second pass, so redacting the output
        /// changes nothing (the checks of `checked`).
        #[test]
        fn fields_inside_an_authority_stay_redacted_once(
            name in proptest::sample::select(vec![
                "", "password", "token", "Route.Pin-42", "routepin", "x-internal-auth", "u",
            ]),
            rest in proptest::collection::vec(
                proptest::sample::select(vec![
                    ":", "::", "/", ";", "@", "?", "#", "=", "'", "x", "ab", "REDACTED", "****",
                    "://", "%2F", " ", "\"",
                ]),
                0..10,
            ),
        ) {
            checked(&format!("redis://{name}{}", rest.concat()))?;
        }
    }

    #[test]
    fn url_password_cases() {
        for (text, want) in [
            (
                "redis://:aa0aa0;A0AA0a@cache.internal:6379/0",
                "redis://:****@cache.internal:6379/0",
            ),
            ("redis://:pa@ss@host", "redis://:****@host"),
            ("x redis://u:p'w)d,(x@h y", "x redis://u:****@h y"),
            ("redis://a@b:c@host/0", "redis://a@b:****@host/0"),
            // The authority ends at `/`, `?`, `#`, whitespace and quotes.
            (
                "https://example.com:8443/x@y",
                "https://example.com:8443/x@y",
            ),
            ("https://h:1?u=a:b@c", "https://h:1?u=a:b@c"),
            ("https://h:1#a:b@c", "https://h:1#a:b@c"),
            (
                "ssh://git@github.com/org/repo",
                "ssh://git@github.com/org/repo",
            ),
            (
                "see http://h:1 or mail a:b@c",
                "see http://h:1 or mail a:b@c",
            ),
            (
                r#"{"a":"http://h:1","b":"x:y@z"}"#,
                r#"{"a":"http://h:1","b":"x:y@z"}"#,
            ),
        ] {
            assert_eq!(r(text), want, "{text}");
        }
    }

    fn b64url(bytes: &[u8]) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A JWT: its header JSON written compactly or with whitespace after `{` (and
    /// inside), any segment padded or not, and its signature.
    fn jwt() -> impl Strategy<Value = (String, String)> {
        (
            proptest::sample::select(vec!["", " ", "\n  ", "\r\n", "\t", "\n"]),
            proptest::sample::select(vec!["HS256", "RS256", "ES384"]),
            "[a-z0-9]{1,12}",
            proptest::collection::vec(any::<u8>(), 16..64),
            proptest::array::uniform3(0usize..3),
        )
            .prop_map(|(ws, alg, sub, sig, pads)| {
                let end = if ws.is_empty() { "" } else { "\n" };
                let header = format!(r#"{{"alg":{ws}"{alg}",{ws}"typ":"JWT"{end}}}"#);
                let payload = format!(r#"{{"sub":"{sub}","exp":1900000000}}"#);
                let sig = b64url(&sig);
                let seg = |s: String, pad: usize| format!("{s}{}", "=".repeat(pad));
                let token = format!(
                    "{}.{}.{}",
                    seg(b64url(header.as_bytes()), pads[0]),
                    seg(b64url(payload.as_bytes()), pads[1]),
                    seg(sig.clone(), pads[2]),
                );
                (token, sig)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// A JWT is found whether its segments carry padding and whitespace inside
        /// its header JSON; only its first three bytes are kept.
        #[test]
        fn jwts_with_padding_are_found(
            (token, sig) in jwt(),
            (before, after) in proptest::sample::select(vec![
                ("", ""), ("x ", " y"), ("\"", "\""), ("GET /cb?t=", "&s=1"), ("{\"m\":\"", "\"}"),
            ]),
        ) {
            let text = format!("{before}{token}{after}");
            let out = checked(&text)?;
            prop_assert_eq!(&out, &format!("{before}{}****{after}", &token[..3]));
            prop_assert!(!shows_part_of(&out, &sig));
        }
    }

    #[test]
    fn jwt_cases() {
        for (text, want) in [
            (
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9=.SecretSignatureAAAA",
                "eyJ****",
            ),
            (
                "t=eyJhbGciOiJIUzI1NiJ9==.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl= x",
                "t=eyJ**** x",
            ),
            // Padding is only padding before a `.` or a byte no segment has.
            (
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln=abc",
                "eyJ****=abc",
            ),
            // Not a token: words and dotted names, base64 that is no JWT header.
            (
                "framework.configuration.value",
                "framework.configuration.value",
            ),
            ("ewoAAAAAAAAAAAAAAA.bb.cc", "ewoAAAAAAAAAAAAAAA.bb.cc"),
            (
                "xewogImFsZyI6ICJIUzI1NiIKfQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
                "xewogImFsZyI6ICJIUzI1NiIKfQ.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
            ),
            // An `eyJ` token glued to a word is found.
            (
                "ewoAAAAeyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
                "ewoAAAAeyJ****",
            ),
        ] {
            assert_eq!(r(text), want, "{text}");
            let red = Redactor::new();
            assert_eq!(
                &*red.redact_bytes_plain(text.as_bytes()),
                want.as_bytes(),
                "{text}"
            );
        }
    }

    /// A secret of each kind in a URL path or query, percent-escaped in part, and
    /// the random pieces that no output may show once hidden.
    fn uri_secret() -> impl Strategy<Value = (String, Vec<String>)> {
        let esc = proptest::sample::select(vec![
            "%40", "%2F", "%2f", "%3F", "%23", "%25", "%20", "%3A", "%2B", "%30", "%41", "%5F",
        ]);
        (
            0usize..5,
            "[A-Za-z0-9]{8,12}",
            esc,
            "[A-Za-z0-9]{8,12}",
            "[A-Za-z0-9]{22}",
        )
            .prop_map(|(kind, a, esc, b, random)| match kind {
                // A URL password with a byte escaped, as userinfo requires for `@ / ? #`.
                0 => (
                    format!("postgres://app:{a}{esc}{b}@db.internal/x"),
                    vec![a, b],
                ),
                // A bearer credential with a base64 byte escaped.
                1 => (format!("Bearer%20{a}{esc}{b}"), vec![a, b]),
                // A key of any prefix found by its checksum, then an escape.
                2 => {
                    let k = key_with("billing_live", &random);
                    let body = k["billing_live_".len()..].to_owned();
                    (format!("{k}{esc}{a}"), vec![body])
                }
                // A key with its `_` escaped, then an escape.
                3 => (format!("pc%5Flive%5F{a}{b}{esc}"), vec![format!("{a}{b}")]),
                // A sensitive parameter.
                _ => (format!("token={a}{esc}{b}"), vec![a, b]),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Whatever the decoded forms of a URL part hold, every secret that the
        /// redaction of the part as it is hides is hidden by `redact_uri_part` too,
        /// and its output is redacted already.
        #[test]
        fn uri_parts_keep_hidden_what_the_raw_form_hides(
            (secret, pieces) in uri_secret(),
            before in proptest::sample::select(vec!["/proxy/", "/v1/keys/", "/connect?dsn=", "/a%20b/", "q=", ""]),
            after in proptest::sample::select(vec!["", "/x;token=1", "%3Btoken%3D1", "?q=a%20b", "/Bearer%20abcdefgh12", "&n=%2541"]),
        ) {
            let part = format!("{before}{secret}{after}");
            for red in redactors() {
                let raw = red.redact(&part);
                let out = red.redact_uri_part(&part);
                for piece in &pieces {
                    if !raw.contains(piece.as_str()) {
                        prop_assert!(!out.contains(piece.as_str()), "{:?}: {:?} -> {:?}", piece, part, out);
                    }
                }
                prop_assert_eq!(&red.redact(&out), &out, "{:?}", part);
            }
        }

        /// The same on any text: no stretch of 8 bytes that the raw redaction hid
        /// (as written, or decoded) is shown.
        #[test]
        fn uri_parts_never_show_what_the_raw_redaction_hid(t in super::prefilter::text()) {
            let part = String::from_utf8_lossy(&t).into_owned();
            // The part as written and decoded, as `redact_uri_part` reads it.
            let mut forms = vec![part.clone()];
            for _ in 0..3 {
                let next = percent_decode(forms.last().unwrap().as_bytes(), false);
                let Cow::Owned(next) = next else { break };
                forms.push(String::from_utf8_lossy(&next).into_owned());
            }
            for red in redactors() {
                let out = red.redact_uri_part(&part);
                let shown = red.redact(&part);
                for (span, _) in scan::spans(&red.rules, part.as_bytes()) {
                    let hidden = &part.as_bytes()[span];
                    for form in [hidden.to_vec(), percent_decode(hidden, false).into_owned()] {
                        for w in form.windows(8) {
                            // Only pieces that occur nowhere else in the part, in
                            // any of its forms (`%5Fab…` decodes to another `_ab…`).
                            let w = String::from_utf8_lossy(w);
                            if !shown.contains(&*w)
                                && part.matches(&*w).count() == 1
                                && forms.iter().all(|f| f.matches(&*w).count() <= 1)
                            {
                                prop_assert!(!out.contains(&*w), "{:?}: {:?} -> {:?}", w, part, out);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn uri_part_cases() {
        let red = Redactor::new();
        let k = key_with("billing_live", "AbCdEfGhIjKlMnOpQrStUv");
        for (part, want) in [
            (
                "/proxy/postgres://app:aa0aa0%40A0AA0a@db.internal/x;token=1".to_owned(),
                "/proxy/postgres://app:****@db.internal/x;token=REDACTED".to_owned(),
            ),
            (
                "/proxy/redis://:Sup3rSecretPa%2Fssw0rd@cache:6379/token=1".to_owned(),
                "/proxy/redis://:****@cache:6379/token=REDACTED".to_owned(),
            ),
            // Decoded, the key body is 29 characters and no longer a key.
            (
                format!("/v1/keys/{k}%30/token=1"),
                "/v1/keys/billing_live_****0/token=REDACTED".to_owned(),
            ),
            // A password that only a second pass over the raw form hides (the
            // token hid the `/` that ended the authority) stays hidden decoded,
            // where the space ends the authority before it.
            (
                "/p/://x%20Bearer%20ab/c:pw2@h/".to_owned(),
                "/p/://x Bearer ****:****@h/".to_owned(),
            ),
            // What only the decoded form shows is hidden as before.
            (
                "/x?next=Bearer%20abcdefgh12%2Bijklmnop".to_owned(),
                "/x?next=Bearer ****".to_owned(),
            ),
        ] {
            assert_eq!(red.redact_uri_part(&part), want, "{part}");
        }
    }

    #[test]
    fn private_key_block_cases() {
        let body = "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB";
        let enc = format!(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0123\n\n{body}\n-----END RSA PRIVATE KEY-----"
        );
        assert_eq!(
            r(&format!("key:\n{enc}\nnext")),
            "key:\n[REDACTED PRIVATE KEY]\nnext"
        );
        let escaped = enc.replace('\n', "\\n");
        assert_eq!(
            r(&format!(r#"{{"pem":"{escaped}","n":1}}"#)),
            r#"{"pem":"[REDACTED PRIVATE KEY]","n":1}"#
        );
        // No END line: on lines of its own, to the end of the input (its last line
        // break kept); in a string, to the string's end.
        let cut = &enc[..enc.find(body).unwrap() + 20];
        assert_eq!(
            r(&format!("loaded {cut}\nmore text: x\n")),
            "loaded [REDACTED PRIVATE KEY]\n"
        );
        let cut = cut.replace('\n', "\\n");
        assert_eq!(
            r(&format!(r#"{{"m":"{cut}\n","n":"x"}}"#)),
            r#"{"m":"[REDACTED PRIVATE KEY]\n","n":"x"}"#
        );
        // An escaped quote in a header does not end the string.
        let pgp = format!(
            r#"-----BEGIN PGP PRIVATE KEY BLOCK-----\nComment: \"ann\"\n\n{body}\n-----END PGP PRIVATE KEY BLOCK-----"#
        );
        assert_eq!(
            r(&format!(r#"{{"m":"{pgp}"}}"#)),
            r#"{"m":"[REDACTED PRIVATE KEY]"}"#
        );
        // On one line, a quote that cannot end a JSON string does not end it
        // either: the block goes to its END line.
        for comment in [r#""ann""#, r#""a" b"#, r#"x""#] {
            let line = format!(
                "loaded -----BEGIN RSA PRIVATE KEY----- Comment: {comment} {body} -----END RSA PRIVATE KEY----- ok"
            );
            assert_eq!(r(&line), "loaded [REDACTED PRIVATE KEY] ok", "{line}");
        }
        // Public blocks are left alone.
        let public =
            "-----BEGIN PUBLIC KEY-----\nComment: x\n\nMIIBIjANBgkqh\n-----END PUBLIC KEY-----";
        assert_eq!(r(public), public);
    }
}

#[test]
fn a_secret_as_a_urls_user_name_is_hidden_with_its_password() {
    for (text, want) in [
        (
            "https://ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789:x-oauth-basic@github.com/org/repo",
            "https://ghp_****:****@github.com/org/repo",
        ),
        (
            "redis://pc_live_AbCdEfGhIjKlMnOpQrStUvWxYz0123:pw@cache:6379/0",
            "redis://pc_live_****:****@cache:6379/0",
        ),
        (
            "amqp://'a_oSxfeMEMvtLDPaYs9maZZ53E0eME':@mq",
            "amqp://'a_****':****@mq",
        ),
        // A field's value in the user name ends at the `:` before the password.
        (
            "redis://token=abc0123456789:pw@cache/0 next",
            "redis://token=****:****@cache/0 next",
        ),
        (
            "https://(cookie=ghp_AbCdE@c00A(:A&@a/x rest",
            "https://(cookie=****:****@a/x rest",
        ),
        // The word `REDACTED` glued inside a user name ends nothing there.
        (
            "https://ghp_AbCdEfGhIjKlMnOpQrStUvWxREDACTEDYz0123456789:x-oauth-basic@github.com",
            "https://ghp_****:****@github.com",
        ),
        // A field's replacement in an authority, where the first pass took the `/`
        // that ended it: a second pass reads no URL across it.
        (
            "://(password=ghp_AbCdE@c/oSxfeMEMvtLDPaYs9maZZ53E0eME':@",
            "://(password=REDACTED':@",
        ),
        // A field's value in the user name is replaced by `****` (the URL rule
        // stops at a `REDACTED`), so that a second pass reads the same URL.
        (
            "redis://password=abc0123456789&token:pw@cache/0",
            "redis://password=****&token:****@cache/0",
        ),
        // A credential after a scheme word that holds a URL runs through its
        // authority, as a value does.
        (
            "password=Bearer  https://'pc_live_aAa00A0AaaAaaA0AA0aA0aaAa0aaAA':$@a/x",
            "password=Bearer  ****",
        ),
        (
            "authorization: Bearer https://u:se;cret@h/",
            "authorization: Bearer ****",
        ),
        // A quoted value that took a URL's `://` and ends in its user name: the
        // password is hidden, and the output, which holds no URL there, is read
        // again (`password:****@h` is then a field).
        (
            "token='https://u'password:pw@h/",
            "token='REDACTED'password:REDACTED",
        ),
        // A quoted value that ends inside a URL's password: the rest of the
        // password is hidden too.
        (
            "password=' authorization: Bearer https://:0a0A0aA0'0AaaA00A@h/x",
            "password='REDACTED",
        ),
        // A value holding a URL never runs into a private key block.
        (
            "password= https://-----BEGIN PRIVATE KEY-----\nAaaA00AaAA0AaaaAAA0AAAAA0AAaa0a0aAAAAa0aaA000Aa0\n-----END PRIVATE KEY-----:@a/x",
            "password= REDACTED[REDACTED PRIVATE KEY]:REDACTED",
        ),
        // Without a password the user name is read as any other text.
        (
            "https://ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789@github.com",
            "https://ghp_****@github.com",
        ),
    ] {
        assert_eq!(r(text), want, "{text}");
        assert_eq!(r(want), want, "{want}");
    }
}

/// Text that is already redacted is read once, whatever URL it holds; text whose
/// replacement changes how a URL's authority reads is read again.
#[test]
fn only_a_replacement_that_moves_an_authoritys_end_asks_for_another_pass() {
    let r = Redactor::new();
    for settled in [
        "x://password=REDACTED",
        "redis://x&password='REDACTED' rest",
        "://x%20Bearer%20****:****@h",
        "token='REDACTED'password:REDACTED",
    ] {
        assert_eq!(r.redact(settled), settled);
        assert!(!scan::asks_again(&r.rules, settled.as_bytes()), "{settled}");
    }
    for moving in [
        "://x%20Bearer%20ab/c:pw@h",
        "token='https://u'password:pw@h/",
    ] {
        assert!(scan::asks_again(&r.rules, moving.as_bytes()), "{moving}");
    }
}

/// A scheme word glued to a byte that is not a letter or digit, after a field's
/// scheme word, names the credential after it: that credential is hidden.
#[test]
fn a_scheme_word_after_a_fields_scheme_word_names_the_next_credential() {
    for glue in ["{", "(", "[", ":", "=", "^", "`", "%22"] {
        let text = format!("Bearer :Bearer {glue}Bearer aa0aa0aAa00aaaAAAaaAAaaA ");
        let out = r(&text);
        assert!(
            !out.contains("aa0aa0aAa00aaaAAAaaAAaaA"),
            "{text:?} -> {out:?}"
        );
        let text = format!("authorization: Basic {glue}Bearer Zm9vOmJhcg== x");
        let out = r(&text);
        assert!(!out.contains("Zm9vOmJhcg"), "{text:?} -> {out:?}");
        // After a value that ends with a scheme word, too.
        let text = format!("Bearer :¡Bearer {glue}Bearer aa0aa0aAa00aaaAAAaaAAaaA ");
        let out = r(&text);
        assert!(
            !out.contains("aa0aa0aAa00aaaAAAaaAAaaA"),
            "{text:?} -> {out:?}"
        );
    }
    // A word that holds more than a scheme word is the credential: a URL in it is
    // hidden with its password, not passed over.
    let out = r("authorization: Bearer https://:AAAAAAAAAA@h-Bearer a");
    assert!(!out.contains("AAAAAAAAAA"), "{out:?}");
    assert_eq!(
        r("token: Bearer (Bearer abc123xyz"),
        "token: Bearer (Bearer ****"
    );
    assert_eq!(r("password=(Bearer (Basic abc123xyz"), "password=REDACTED");
}

/// A private key as a JSON-escaped quoted value under a sensitive name (a `Debug`
/// print of a configuration in a JSON log line) is hidden whole, not only its
/// first line.
#[test]
fn a_private_key_in_an_escaped_quoted_value_is_hidden_whole() {
    let body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC";
    for line in [
        "{\"message\":\"loaded Config { private_key: \\\"-----BEGIN PRIVATE KEY-----\\\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\\\n-----END PRIVATE KEY-----\\\" }\"}",
        "{\"message\":\"password=\\\" -----BEGIN EC PRIVATE KEY-----\\\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\\\\n-----END EC PRIVATE KEY-----\\\"\"}",
    ] {
        let out = r(line);
        assert!(!out.contains(body), "{line} -> {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert!(v["message"].is_string());
    }
}

/// A credential after a scheme word that runs into a private key block ends before
/// it: the block is hidden whole by its own rule.
#[test]
fn a_credential_that_runs_into_a_private_key_block_leaves_it_to_its_rule() {
    let body = "A0aAAAaaa0A0aaA0aaaA0aa0A0AaA0AaA0aa0aaA0A0aaaaa";
    for text in [
        format!(
            "password=token https://-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----:@a/x"
        ),
        format!(
            "authorization: Bearer x-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----"
        ),
    ] {
        let out = r(&text);
        assert!(!out.contains(body), "{text:?} -> {out:?}");
    }
}
