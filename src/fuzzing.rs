//! Entry points of the cargo-fuzz targets in `fuzz/`. **Not part of the API**: hidden
//! from the documentation, exempt from the listing of the public API and from any
//! compatibility promise; they may change or go away in any release.
//!
//! They live in the crate so that each target is a one-line shim, so that they can
//! reach the crate-private parsers they exercise, and so that `cargo test` replays
//! every target's seed corpus through exactly the code the fuzzer runs. Each function
//! is compiled with the features it needs.

#[cfg(feature = "client-ip")]
use std::net::IpAddr;

#[cfg(any(feature = "client-ip", feature = "api-key"))]
use http::{HeaderMap, HeaderValue};

#[cfg(feature = "client-ip")]
use crate::IpSet;
#[cfg(feature = "client-ip")]
use crate::client_ip::{
    ClientIpConfig, ForwardedHeader, Node, parse_forwarded, parse_x_forwarded_for, walk, walk_depth,
};

/// `forwarded_headers` target. Input: one selector byte, then header values
/// separated by `\n` (one per header instance). Selector bits 0-1 pick the peer;
/// bit 3 clear: bit 2 picks `X-Forwarded-For` or `Forwarded`, bits 4-7 the depth
/// of hop-count mode (0: the trusted-hop walk); bit 3 set: a single-value header
/// (`X-Real-IP` and the CDN headers, picked by bits 4-6).
///
/// Checks, besides "no panic": the resolved client is the peer or an address that
/// appears in the chain with only trusted hops to its right; and the resolver over a
/// `HeaderMap` agrees with the pure walk over every node of the same values (in
/// hop-count mode, with the pure count from the right). For a single-value
/// header: the client is the peer when the peer is untrusted or sent no header, the
/// one value's address when it parses, and nothing otherwise (two instances, or a
/// value that is not exactly one address).
#[cfg(feature = "client-ip")]
pub fn forwarded_headers(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let trusted = IpSet::parse("10.0.0.0/8, fd00::/8, 127.0.0.0/8").expect("static list");
    let peers = ["10.0.0.1", "203.0.113.1", "fd00::1", "::ffff:10.0.0.1"];
    let peer: IpAddr = peers[usize::from(sel & 3)].parse().expect("static address");
    if sel & 8 != 0 {
        single_value_header(sel, peer, trusted, rest);
        return;
    }
    let header = if sel & 4 == 0 {
        ForwardedHeader::XForwardedFor
    } else {
        ForwardedHeader::Forwarded
    };
    let values: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();

    // Nodes right to left over all instances, the resolver's order.
    let mut nodes: Vec<Node> = Vec::new();
    for v in values.iter().rev() {
        let mut per: Vec<Node> = match header {
            ForwardedHeader::Forwarded => parse_forwarded(v).collect(),
            _ => parse_x_forwarded_for(v).rev().collect(),
        };
        per.reverse();
        nodes.extend(per);
    }
    let is_trusted = |ip: IpAddr| trusted.contains(ip);
    let client = walk(peer, nodes.iter().copied(), is_trusted);
    if let Some(c) = client {
        assert!(
            is_allowed_result(peer, &nodes, c, is_trusted),
            "resolved client is neither the peer nor reachable through trusted hops"
        );
    }

    let mut headers = HeaderMap::new();
    let name = match header {
        ForwardedHeader::Forwarded => "forwarded",
        _ => "x-forwarded-for",
    };
    let mut representable = true;
    for v in &values {
        match HeaderValue::from_bytes(v) {
            Ok(hv) => {
                headers.append(name, hv);
            }
            Err(_) => representable = false,
        }
    }
    if representable {
        let cfg = ClientIpConfig::trusted_proxy_set(trusted.clone())
            .header(header)
            .expect("trusted proxies are set");
        assert_eq!(
            cfg.resolve(peer, &headers),
            client,
            "resolver and walk disagree"
        );
        let depth = usize::from(sel >> 4);
        if depth > 0 {
            let cfg = cfg.depth(depth).expect("a depth of 1 to 15");
            assert_eq!(
                cfg.resolve(peer, &headers),
                walk_depth(peer, nodes.iter().copied(), depth, is_trusted),
                "resolver and count from the right disagree"
            );
        }
    }
}

/// The single-value half of [`forwarded_headers`].
#[cfg(feature = "client-ip")]
fn single_value_header(sel: u8, peer: IpAddr, trusted: IpSet, rest: &[u8]) {
    use crate::client_ip::parse_single_address;

    let headers_in_order = [
        ForwardedHeader::XRealIp,
        ForwardedHeader::CfConnectingIp,
        ForwardedHeader::TrueClientIp,
        ForwardedHeader::FlyClientIp,
        ForwardedHeader::FastlyClientIp,
    ];
    let header = headers_in_order[usize::from(sel >> 4) % headers_in_order.len()];
    let name = header.single_value_name().expect("a single-value header");
    let mut headers = HeaderMap::new();
    let mut values = Vec::new();
    for v in rest.split(|&b| b == b'\n').filter(|v| !v.is_empty()) {
        let Ok(hv) = HeaderValue::from_bytes(v) else {
            return;
        };
        headers.append(name, hv);
        values.push(v);
    }
    // A header of another name is never read.
    if let Ok(decoy) = HeaderValue::from_bytes(b"192.0.2.200") {
        headers.append("x-forwarded-for", decoy);
    }
    let got = ClientIpConfig::trusted_proxy_set(trusted.clone())
        .header(header)
        .expect("trusted proxies are set")
        .resolve(peer, &headers);
    let peer = peer.to_canonical();
    let expected = if !trusted.contains(peer) {
        Some(peer)
    } else {
        match values.as_slice() {
            [] => Some(peer),
            [one] => match parse_single_address(one) {
                Node::Ip(ip) => Some(ip),
                _ => None,
            },
            _ => None,
        }
    };
    assert_eq!(got, expected, "single-value header resolved wrongly");
    if let (Some(c), [one]) = (got, values.as_slice())
        && c != peer
    {
        let text = String::from_utf8_lossy(one);
        let canon = |s: &str| s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
        let t = text.trim_matches([' ', '\t']);
        let ok = canon(t) == Some(c)
            || t.parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.ip().to_canonical())
                == Some(c)
            || t.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(canon)
                == Some(c);
        assert!(
            ok,
            "a resolved address that is not the header's one address"
        );
    }
}

/// The property every resolution must satisfy.
#[cfg(feature = "client-ip")]
fn is_allowed_result(
    peer: IpAddr,
    nodes_right_to_left: &[Node],
    client: IpAddr,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> bool {
    let peer = peer.to_canonical();
    if client == peer {
        return true;
    }
    if !is_trusted(peer) {
        return false;
    }
    for n in nodes_right_to_left {
        match *n {
            Node::Ip(ip) if ip == client => return true,
            Node::Ip(ip) if is_trusted(ip) => continue,
            _ => return false,
        }
    }
    false
}

/// `jwt_verify` target: the pre-parse and the whole verification path with fixed
/// keys and a fixed clock (1750000000, i.e. 2025-06-15T15:06:40Z; leeway 30 s,
/// maximum lifetime 3600 s). The first byte selects the mode:
///
/// - `0`: the rest is a token, verified as is (and pre-parsed alone);
/// - `1`: the rest is a claims set, signed with the fixed HS256 key and verified, so
///   the claims checks run behind a valid signature;
/// - `2`: the rest is a protected header, signed over valid claims and verified;
/// - `3`: the rest goes to the claims parser and the pre-parser directly.
///
/// Checks, besides "no panic": an accepted token's principal is its `sub` and its
/// claims pass the rules independently, computed without overflow; a second
/// verification (served by the cache) gives the same answer as the first; an
/// accepted token is still accepted (from the cache) in the last second before
/// `exp + leeway` and refused from that second on.
#[cfg(feature = "jwt")]
pub fn jwt_verify(data: &[u8]) {
    use crate::jwt::{self, TokenVerifier, VerifyingKey};
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use std::sync::OnceLock;

    const SECRET: [u8; 32] = *b"fuzzing-fixed-hs256-secret-32-by";
    const NOW: i64 = 1_750_000_000;
    const LEEWAY: i64 = 30;
    const MAX_LIFETIME: i64 = 3600;
    static VERIFIER: OnceLock<TokenVerifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| {
        TokenVerifier::builder()
            .key(VerifyingKey::hs256(&SECRET).expect("32 bytes").kid("fuzz"))
            .key(
                VerifyingKey::from_jwk(
                    r#"{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#,
                )
                .expect("static JWK"),
            )
            .issuer("https://fuzz.example")
            .audience("fuzz-api")
            .cache_capacity(64)
            .leeway(std::time::Duration::from_secs(LEEWAY.unsigned_abs()))
            .max_lifetime(std::time::Duration::from_secs(MAX_LIFETIME.unsigned_abs()))
            .build()
            .expect("static configuration")
    });
    let sign = |header: &[u8], claims: &[u8]| -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let sig = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(&SECRET),
            jsonwebtoken::Algorithm::HS256,
        )
        .expect("HS256 signing");
        format!("{input}.{sig}")
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = match mode % 4 {
        0 => String::from_utf8_lossy(rest).into_owned(),
        1 => sign(br#"{"alg":"HS256","kid":"fuzz"}"#, rest),
        2 => {
            let claims = format!(
                r#"{{"iss":"https://fuzz.example","sub":"svc","aud":"fuzz-api","iat":{NOW},"exp":{}}}"#,
                NOW + 60
            );
            sign(rest, claims.as_bytes())
        }
        _ => {
            let _ = jwt::parse_claims(rest);
            let _ = jwt::parse_compact(&String::from_utf8_lossy(rest), 8192);
            return;
        }
    };
    let first = verifier.verify_token_at(&token, NOW);
    let second = verifier.verify_token_at(&token, NOW);
    match (&first, &second) {
        (Ok(a), Ok(b)) => assert_eq!(a.principal(), b.principal(), "cache changed the answer"),
        (Err(a), Err(b)) => assert_eq!(a, b, "a refused token changed its reason"),
        _ => panic!("the second verification disagrees with the first"),
    }
    if let Ok(t) = first {
        let parsed = jwt::parse_compact(&token, 8192).expect("accepted tokens pre-parse");
        assert_eq!(
            parsed.header.alg, "HS256",
            "only the HS256 key can sign here"
        );
        let payload = URL_SAFE_NO_PAD
            .decode(parsed.payload_b64)
            .expect("accepted payloads decode");
        let claims = jwt::parse_claims(&payload).expect("accepted claims parse");
        assert_eq!(claims.sub.as_deref(), Some(t.subject()));
        assert_eq!(claims.iss.as_deref(), Some("https://fuzz.example"));
        assert!(claims.aud.expect("aud").iter().any(|a| a == "fuzz-api"));
        let (exp, iat) = (claims.exp.expect("exp"), claims.iat.expect("iat"));
        // The rules in i128, where no sum or difference of two i64 overflows.
        let window = 0..=253_402_300_799_i128;
        let (e, i, n, l) = (
            i128::from(exp),
            i128::from(iat),
            i128::from(NOW),
            i128::from(LEEWAY),
        );
        assert!(window.contains(&e) && window.contains(&i), "time window");
        assert!(i < e && e - i <= i128::from(MAX_LIFETIME), "lifetime rule");
        assert!(i <= n + l, "iat rule");
        assert!(n < e + l, "exp rule");
        if let Some(nbf) = claims.nbf {
            assert!(window.contains(&i128::from(nbf)), "time window");
            assert!(i128::from(nbf) <= n + l, "nbf rule");
        }
        // Verifier and cache agree on the boundary: accepted in the last second
        // before exp + leeway, refused from it on.
        let refused_from = exp + LEEWAY;
        assert!(
            verifier.verify_token_at(&token, refused_from - 1).is_ok(),
            "accepted until exp + leeway"
        );
        assert_eq!(
            verifier.verify_token_at(&token, refused_from).unwrap_err(),
            jwt::TokenRejection::Expired,
            "refused from exp + leeway on"
        );
    }
}
/// `credentials` target: credential extraction and key-format parsing.
///
/// Input: one selector byte (bit 0: accept the `api_key` query parameter), then
/// lines separated by `\n`. Each line's first byte picks where the rest goes:
/// `0` and `2` `X-API-Key`, `1` `Authorization`, `3` another header,
/// anything else the query string (last one wins).
///
/// Checks, besides "no panic": an extracted credential is non-empty printable ASCII
/// without spaces, within the length cap, taken verbatim from one input value, and
/// the only credential present; the per-header parsers agree with the extraction;
/// a key that passes the format check round-trips through its checksum, and a
/// one-character change breaks it; the key store refuses everything but its key.
#[cfg(feature = "api-key")]
pub fn credentials(data: &[u8]) {
    use std::sync::OnceLock;
    use std::time::SystemTime;

    use crate::api_key::{KeyRecord, KeyStore, MAX_KEY_LEN, generate_key, parse_key};
    use crate::authenticate::credentials::{
        CredentialError, MAX_CREDENTIAL_LEN, extract_credential, parse_api_key_header,
        parse_authorization,
    };

    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let query_param = (sel & 1 == 1).then_some("api_key");
    let mut headers = HeaderMap::new();
    let mut raw_values: Vec<&[u8]> = Vec::new();
    let mut query: Option<&str> = None;
    let mut ours = 0usize;
    let mut representable = true;
    for line in rest.split(|&b| b == b'\n') {
        let Some((&kind, value)) = line.split_first() else {
            continue;
        };
        let name = match kind {
            0 => "x-api-key",
            1 => "authorization",
            2 => "x-api-key",
            3 => "cookie",
            _ => {
                query = std::str::from_utf8(value).ok();
                continue;
            }
        };
        // The per-header parsers over the raw bytes, representable or not.
        let direct = if kind == 1 {
            parse_authorization(value).map(|o| o.map(|(_, v)| v))
        } else {
            parse_api_key_header(value).map(Some)
        };
        if let Ok(Some(v)) = direct {
            assert!(
                contains(value, v.as_bytes()),
                "parser invented a credential"
            );
        }
        match HeaderValue::from_bytes(value) {
            Ok(hv) => {
                headers.append(name, hv);
                if kind != 3 {
                    raw_values.push(value);
                    // A header counts as a credential unless it is another scheme.
                    if !(kind == 1 && matches!(direct, Ok(None))) {
                        ours += 1;
                    }
                }
            }
            Err(_) => representable = false,
        }
    }
    let query = query.filter(|q| !q.contains('#'));
    if let (Some(q), Some(p)) = (query, query_param) {
        ours += q
            .split('&')
            .filter(|pair| pair.split_once('=').map_or(*pair, |(n, _)| n) == p)
            .count();
        raw_values.push(q.as_bytes());
    }
    if !representable {
        return;
    }
    match extract_credential(&headers, query, query_param) {
        Ok(Some(c)) => {
            let v = c.expose_secret().as_bytes();
            assert!(!v.is_empty() && v.len() <= MAX_CREDENTIAL_LEN);
            assert!(v.iter().all(|b| (0x21..0x7f).contains(b)));
            assert!(raw_values.iter().any(|r| contains(r, v)));
            assert_eq!(ours, 1, "one credential extracted from several");
        }
        Ok(None) => assert_eq!(ours, 0, "a credential was missed"),
        Err(CredentialError::Multiple) => assert!(ours > 1),
        Err(_) => assert!(ours >= 1),
    }

    // Key format and verification over every value and the whole input.
    static STORE: OnceLock<(KeyStore, String)> = OnceLock::new();
    let (store, known) = STORE.get_or_init(|| {
        let k = generate_key("pc_fuzz").expect("randomness");
        let store = KeyStore::from_records([KeyRecord::new("fuzz", k.digest()).expect("id")])
            .expect("one key");
        (store, k.expose_secret().to_owned())
    });
    let candidates = raw_values
        .iter()
        .copied()
        .chain([rest])
        .filter_map(|v| std::str::from_utf8(v).ok());
    for s in candidates {
        if let Ok(parsed) = parse_key(s) {
            assert!(s.starts_with(parsed.prefix()) && s.len() <= MAX_KEY_LEN);
            // Any one-character change of the body is caught by the checksum.
            let mut changed = s.as_bytes().to_vec();
            let last = changed.len() - 1;
            changed[last] = if changed[last] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(changed).expect("ASCII");
            assert!(parse_key(&changed).is_err());
        }
        let verdict = store.verify(s, SystemTime::now());
        assert_eq!(verdict.is_ok(), s == known.as_str());
    }
}

#[cfg(feature = "api-key")]
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
/// `redactor` target: any bytes through the [`Redactor`](crate::redact::Redactor).
///
/// Checks, besides "no panic" and no hang: the prefiltered scan gives what the
/// reference scan, which looks at every byte, gives (under the fuzzer, which builds
/// with `--cfg fuzzing`); redaction is idempotent; the `&str` and
/// the bytes entry points agree, and valid UTF-8 stays valid; the URL-part entry
/// point (which also decodes percent-escapes) is idempotent on its own output's
/// secrets (it never reveals a shape the raw pass hid).
#[cfg(feature = "redact")]
pub fn redactor(data: &[u8]) {
    use crate::redact::Redactor;
    use std::sync::OnceLock;
    // The default rules, and rules with a key prefix, a token prefix and sensitive
    // names of a user's own (one with trailing digits), built once.
    static RULES: OnceLock<[Redactor; 2]> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        [
            Redactor::new(),
            Redactor::builder()
                .key_prefix("acme_")
                .token_prefix("tok-", 8)
                .sensitive_name("x-internal-auth")
                .sensitive_name("route.pin-42")
                .build()
                .expect("valid rules"),
        ]
    });
    for r in rules {
        redactor_with(r, data);
    }
}

#[cfg(feature = "redact")]
fn redactor_with(r: &crate::redact::Redactor, data: &[u8]) {
    let once = r.redact_bytes(data);
    // Under the fuzzer, the prefiltered scan against the reference scan.
    #[cfg(fuzzing)]
    assert_eq!(
        once,
        r.redact_bytes_plain(data),
        "the prefiltered and the plain scan disagree"
    );
    let twice = r.redact_bytes(&once);
    assert_eq!(once, twice, "redaction is not idempotent");
    // A JSON document stays one, with the same objects, arrays and members.
    #[cfg(feature = "jwt")]
    if serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok() {
        assert!(
            serde_json::from_slice::<serde::de::IgnoredAny>(&once).is_ok(),
            "redaction broke a JSON document"
        );
        assert_eq!(
            json_skeleton(data),
            json_skeleton(&once),
            "redaction changed a JSON document's structure"
        );
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let out = r.redact(s);
        assert_eq!(
            out.as_bytes(),
            &*once,
            "str and bytes entry points disagree"
        );
        let uri = r.redact_uri_part(s);
        assert_eq!(r.redact(&uri), uri, "redacted URL part still holds a shape");
    }
}

/// The structure of a valid JSON document: its brackets, colons and commas, each
/// string, number or literal as one `s`.
#[cfg(all(feature = "redact", any(test, feature = "jwt")))]
pub(crate) fn json_skeleton(doc: &[u8]) -> Vec<u8> {
    let end = |c: u8| {
        matches!(c, b'{' | b'}' | b'[' | b']' | b':' | b',' | b'"') || c.is_ascii_whitespace()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < doc.len() {
        match doc[i] {
            b'"' => {
                i += 1;
                while i < doc.len() && doc[i] != b'"' {
                    i += if doc[i] == b'\\' { 2 } else { 1 };
                }
                out.push(b's');
            }
            c @ (b'{' | b'}' | b'[' | b']' | b':' | b',') => out.push(c),
            c if c.is_ascii_whitespace() => {}
            _ => {
                while i + 1 < doc.len() && !end(doc[i + 1]) {
                    i += 1;
                }
                out.push(b's');
            }
        }
        i += 1;
    }
    out
}

/// `query_redaction` target: a query string through
/// [`redact_query`](crate::redact::redact_query).
///
/// Checks: the parameters keep their number, order and names; a changed parameter
/// is exactly `name=REDACTED` for a sensitive name; the result is a fixed point.
#[cfg(feature = "redact")]
pub fn query_redaction(data: &[u8]) {
    use crate::redact::{Redactor, redact_query};
    let q = String::from_utf8_lossy(data);
    let out = redact_query(&q);
    assert_eq!(out.split('&').count(), q.split('&').count());
    let r = Redactor::new();
    for (before, after) in q.split('&').zip(out.split('&')) {
        if before != after {
            let (name, value) = before
                .split_once('=')
                .expect("only name=value pairs change");
            assert!(!value.is_empty(), "an empty value is kept");
            assert_eq!(after, format!("{name}=REDACTED"));
            let decoded = crate::redact::percent_decode(name.as_bytes(), true);
            assert!(r.is_sensitive_name(&String::from_utf8_lossy(&decoded)) || !decoded.is_ascii());
        }
    }
    assert_eq!(redact_query(&out), out, "not a fixed point");
}

/// `stack_config` target: the quota-list parser and the environment configuration
/// of the stack. Input: lines of UTF-8; the first is parsed by
/// the quota-list parser, then each line is the value of one
/// variable (in the order below) for
/// [`StackBuilder::from_env_with`](crate::stack::StackBuilder::from_env_with),
/// followed by `build`. The file-path variables are left out (no file access).
///
/// Checks, besides "no panic": an accepted quota list has 1 to 4 quotas with
/// non-zero counts and distinct windows, and each entry parses alone to the same
/// quota; an error never repeats the raw API keys value.
#[cfg(feature = "stack")]
pub fn stack_config(data: &[u8]) {
    use crate::rate_limit::Quota;
    use crate::rate_limit::quota::parse_list;
    use crate::stack::StackBuilder;
    const VARS: [&str; 9] = [
        "PORTCULLIS_RATE_LIMIT",
        "PORTCULLIS_TRUSTED_PROXIES",
        "PORTCULLIS_FORWARDED_HEADER",
        "PORTCULLIS_ALLOWLIST",
        "PORTCULLIS_DENYLIST",
        "PORTCULLIS_API_KEYS",
        "PORTCULLIS_API_KEY_SCOPES",
        "PORTCULLIS_AUTH_THROTTLE",
        "PORTCULLIS_TOKEN_AUDIENCE",
    ];
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines: Vec<&str> = text.split('\n').collect();
    if let Ok(quotas) = parse_list(lines[0]) {
        assert!((1..=4).contains(&quotas.len()));
        for (i, (q, entry)) in quotas.iter().zip(lines[0].split(',')).enumerate() {
            assert!(q.count() >= 1 && q.window().as_secs() >= 1);
            assert_eq!(entry.parse::<Quota>().ok(), Some(*q));
            assert!(quotas[..i].iter().all(|p| p.window() != q.window()));
        }
    }
    let get = |name: &str| {
        let i = VARS.iter().position(|v| *v == name)?;
        lines.get(i).map(|v| (*v).to_owned())
    };
    // Only a value longer than any space-free run of the fixed message texts (the
    // longest is a variable name) can be told apart from them.
    let keys = lines.get(5).map(|v| v.trim()).unwrap_or("");
    let checkable = keys.len() > 40 && !keys.contains(char::is_whitespace);
    let check = |e: crate::ConfigError| {
        let msg = e.to_string();
        assert!(
            !checkable || !msg.contains(keys),
            "an error repeats the API keys value"
        );
    };
    match StackBuilder::from_env_with(get) {
        Ok(builder) => {
            if let Err(e) = builder.build() {
                check(e);
            }
        }
        Err(e) => check(e),
    }
}

/// `jwks_documents` target: the parsers of remote key sources. Input: one selector
/// byte, then the document or value.
///
/// - `0`: a fetch URL, with and without plain HTTP to loopback allowed;
/// - `1`: a discovery document for the issuer `https://issuer.example`;
/// - `2`: a fetched JWK Set;
/// - `3`: a `Cache-Control` value and a `Content-Type` value.
///
/// Checks, besides "no panic": an accepted URL has a host and a non-zero port, no
/// user information, and is HTTPS unless it goes to a loopback host with plain HTTP
/// allowed; a URL accepted without loopback HTTP is accepted the same with it; an
/// accepted discovery document names an HTTPS `jwks_uri`; an accepted JWK Set is a
/// valid key set without HMAC keys, each of whose keys the crypto backend can
/// verify with; a `max-age` read back is the one written.
#[cfg(feature = "jwks-remote")]
pub fn jwks_documents(data: &[u8]) {
    use crate::jwt::{KeySet, oidc};
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            let strict = oidc::parse_url(s, false);
            let loose = oidc::parse_url(s, true);
            for (u, loopback) in [(&strict, false), (&loose, true)] {
                if let Ok(u) = u {
                    assert!(!u.host.is_empty() && u.port != 0);
                    assert!(!u.authority.contains('@'));
                    assert!(u.tls || (loopback && oidc::is_loopback_host(&u.host)));
                }
            }
            if let Ok(u) = &strict {
                assert_eq!(
                    Ok(u),
                    loose.as_ref(),
                    "allowing loopback HTTP changes an HTTPS URL"
                );
            }
        }
        1 => {
            if let Ok(u) = oidc::parse_discovery(rest, "https://issuer.example", false) {
                assert!(u.tls);
            }
        }
        2 => {
            if let Ok(keys) = oidc::parse_remote_jwks(rest) {
                assert!(!keys.is_empty());
                assert!(
                    keys.iter()
                        .all(|k| k.algorithm() != crate::jwt::Algorithm::HS256)
                );
                // Every accepted key is usable: it verifies (here, refuses a
                // signature that is not its own) without an error or a panic.
                for k in &keys {
                    assert_eq!(
                        jsonwebtoken::crypto::verify("AAAA", b"x", &k.key, k.alg.to_jwt()).ok(),
                        Some(false),
                        "an accepted key the backend cannot use"
                    );
                }
                let set = KeySet::new(keys).expect("an accepted document is a valid key set");
                assert!(!set.is_empty());
            }
        }
        _ => {
            let Ok(s) = std::str::from_utf8(rest) else {
                return;
            };
            let _ = oidc::content_type_is(rest, &["application/json"]);
            if let Some(n) = oidc::cache_max_age(s)
                && n > 0
            {
                let v = format!("max-age={n}");
                assert_eq!(oidc::cache_max_age(&v), Some(n));
            }
        }
    }
}

/// `signature_fields` target. Input: a `Signature-Input` value, `\n`, a `Signature`
/// value, `\n`, a `Content-Digest` value, `\n`, then a header value covered as
/// `x-f`.
///
/// Checks, besides "no panic": a signature that parses round-trips (its
/// `@signature-params` line parses back to the same signature), and its
/// signature base has exactly one line per covered component plus the parameters
/// line, whatever the covered values hold.
#[cfg(feature = "signature")]
pub fn signature_fields(data: &[u8]) {
    use crate::signature::parse::{Message, parse_content_digest, parse_signature, signature_base};
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let (input, signature) = (parts.next().unwrap_or(b""), parts.next().unwrap_or(b""));
    let digest = parts.next().unwrap_or(b"");
    let field = parts.next().unwrap_or(b"");
    let _ = parse_content_digest(digest);
    let Ok(sig) = parse_signature(input, signature) else {
        return;
    };
    let again = format!("{}={}", sig.label, sig.params_line);
    assert_eq!(
        parse_signature(again.as_bytes(), signature).as_ref(),
        Ok(&sig),
        "the parameters line does not parse back to the same signature"
    );
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(field) {
        for c in &sig.components {
            if let crate::signature::parse::Component::Field(name) = c
                && let Ok(name) = http::HeaderName::from_bytes(name.as_bytes())
            {
                headers.append(name, v.clone());
            }
        }
    }
    let msg = Message {
        method: "POST",
        authority: Some("example.com"),
        path: "/p",
        query: Some("q=1"),
        headers: &headers,
    };
    if let Ok(base) = signature_base(&msg, &sig.components, &sig.params_line) {
        assert_eq!(
            base.split('\n').count(),
            sig.components.len() + 1,
            "a covered value added a line to the signature base"
        );
    }
}

/// `grpc_content_type` target. Input: a `Content-Type` value.
///
/// Checks, besides "no panic": an accepted value is `application/grpc`, optionally
/// `+` and a short subtype of token characters, and nothing longer; and a `POST`
/// carrying the value is a gRPC call exactly when the value is accepted.
pub fn grpc_content_type(data: &[u8]) {
    use crate::rejection::{is_grpc_content_type, is_grpc_request};

    let accepted = is_grpc_content_type(data);
    if accepted {
        let (base, rest) = data.split_at(16);
        assert!(base.eq_ignore_ascii_case(b"application/grpc"));
        if let Some((&plus, sub)) = rest.split_first() {
            assert_eq!(plus, b'+');
            assert!((1..=32).contains(&sub.len()));
            assert!(
                sub.iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            );
        }
    }
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let req = http::Request::post("/s/m")
            .header(http::header::CONTENT_TYPE, v)
            .body(())
            .expect("valid request");
        assert_eq!(is_grpc_request(&req), accepted);
    }
}
