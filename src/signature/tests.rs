//! RFC 9421 appendix B test vectors (B.2.5 `hmac-sha256`, B.2.6 `ed25519`), and the
//! checks of a signed request head.

use base64::Engine as _;

use super::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// RFC 9421 B.1.5: the shared secret `test-shared-secret`.
const B15_SECRET: &str =
    "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==";
/// RFC 9421 B.1.4: `test-key-ed25519`, the public key (SPKI, DER in base64) and the
/// private key (PKCS#8).
const B14_PUBLIC: &str = "MCowBQYDK2VwAyEAJrQLj5P/89iXES9+vFgrIy29clF9CC/oPPsw3c5D0bs=";
const B14_PRIVATE: &str = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF";

/// The test request of RFC 9421 B.2: `POST /foo?param=Value&Pet=dog` with its
/// header fields (the body is `{"hello": "world"}`).
fn b2_request() -> (http::Uri, HeaderMap) {
    let uri: http::Uri = "/foo?param=Value&Pet=dog".parse().unwrap();
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("host", "example.com"),
        ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
        ("content-type", "application/json"),
        (
            "content-digest",
            "sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:",
        ),
        ("content-length", "18"),
    ] {
        h.insert(n, v.parse().unwrap());
    }
    (uri, h)
}

fn last32(b64: &str) -> [u8; 32] {
    let der = B64.decode(b64).unwrap();
    der[der.len() - 32..].try_into().unwrap()
}

/// A verifier with the RFC's keys and rules loose enough for its vectors (which
/// carry no nonce and cover neither `@query` nor `content-digest`).
fn rfc_verifier() -> Arc<Inner> {
    let secret = B64.decode(B15_SECRET).unwrap();
    SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256("test-shared-secret", &secret).unwrap())
        .key(SignatureKey::ed25519("test-key-ed25519", &last32(B14_PUBLIC)).unwrap())
        .required_components("")
        .allow_signatures_without_nonce_dangerously()
        .build()
        .unwrap()
        .inner
}

const CREATED: u64 = 1_618_884_473;

fn check(
    v: &Inner,
    input: &str,
    signature: &str,
    headers: &HeaderMap,
    uri: &http::Uri,
) -> Result<Checked, DenialReason> {
    let mut h = headers.clone();
    h.insert(SIGNATURE_INPUT, input.parse().unwrap());
    h.insert(SIGNATURE, signature.parse().unwrap());
    v.check_head("POST", uri, &h, false, CREATED)
}

#[test]
fn rfc_9421_b_2_5_hmac_sha256_verifies() {
    let (uri, h) = b2_request();
    let v = rfc_verifier();
    let input = r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#;
    let ok = check(
        &v,
        input,
        "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:",
        &h,
        &uri,
    )
    .unwrap();
    assert_eq!(ok.principal.id(), "test-shared-secret");
    assert_eq!(ok.principal.method(), AuthMethod::HttpSignature);
    // One bit off, or another date: refused.
    let bad = check(
        &v,
        input,
        "sig-b25=:qxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:",
        &h,
        &uri,
    );
    assert_eq!(bad.err(), Some(DenialReason::InvalidSignature));
    let mut other = h.clone();
    other.insert("date", "Tue, 20 Apr 2021 02:07:56 GMT".parse().unwrap());
    let bad = check(
        &v,
        input,
        "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:",
        &other,
        &uri,
    );
    assert_eq!(bad.err(), Some(DenialReason::InvalidSignature));
}

#[test]
fn rfc_9421_b_2_6_ed25519_verifies_and_signs_identically() {
    let (uri, h) = b2_request();
    let v = rfc_verifier();
    let input = r#"sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#;
    let sig =
        "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==";
    let ok = check(&v, input, &format!("sig-b26=:{sig}:"), &h, &uri).unwrap();
    assert_eq!(ok.principal.id(), "test-key-ed25519");
    // The signing side makes the same signature over the same base (Ed25519 is
    // deterministic).
    let key = SigningKey::ed25519("test-key-ed25519", &last32(B14_PRIVATE)).unwrap();
    assert_eq!(key.public_key(), Some(last32(B14_PUBLIC)));
    let parsed =
        parse::parse_signature(input.as_bytes(), format!("sig-b26=:{sig}:").as_bytes()).unwrap();
    let msg = Message {
        method: "POST",
        authority: Some("example.com"),
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    let base = parse::signature_base(&msg, &parsed.components, &parsed.params_line).unwrap();
    assert_eq!(B64.encode(key.sign(base.as_bytes())), sig);
    // Another method: refused.
    let mut hh = h.clone();
    hh.insert(SIGNATURE_INPUT, input.parse().unwrap());
    hh.insert(SIGNATURE, format!("sig-b26=:{sig}:").parse().unwrap());
    assert_eq!(
        v.check_head("PUT", &uri, &hh, false, CREATED).err(),
        Some(DenialReason::InvalidSignature)
    );
}

#[test]
fn rfc_9421_b_2_5_signature_base_is_the_published_one() {
    let (uri, h) = b2_request();
    let parsed = parse::parse_signature(
        br#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#,
        b"sig-b25=:AAAA:",
    )
    .unwrap();
    let msg = Message {
        method: "POST",
        authority: Some("example.com"),
        path: uri.path(),
        query: uri.query(),
        headers: &h,
    };
    assert_eq!(
        parse::signature_base(&msg, &parsed.components, &parsed.params_line).unwrap(),
        "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\"content-type\": application/json\n\"@signature-params\": (\"date\" \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""
    );
}

/// The checks before the signature: freshness, required components, nonce, alg.
#[test]
fn head_checks_refuse_with_their_reason() {
    let secret = [9u8; 32];
    let v = SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256("k", &secret).unwrap())
        .max_age(Duration::from_secs(300))
        .clock_skew(Duration::from_secs(30))
        .build()
        .unwrap()
        .inner;
    let key = SigningKey::hmac_sha256("k", &secret).unwrap();
    let uri: http::Uri = "/a?b=c".parse().unwrap();
    let now = 2_000_000_000u64;
    let sign = |params: &str, headers: &HeaderMap| {
        let parsed = parse::parse_signature(format!("s={params}").as_bytes(), b"s=:AAAA:").unwrap();
        let msg = Message {
            method: "GET",
            authority: Some("svc"),
            path: "/a",
            query: Some("b=c"),
            headers,
        };
        let base = parse::signature_base(&msg, &parsed.components, &parsed.params_line).unwrap();
        let mut h = headers.clone();
        h.insert(SIGNATURE_INPUT, format!("s={params}").parse().unwrap());
        h.insert(
            SIGNATURE,
            format!("s=:{}:", B64.encode(key.sign(base.as_bytes())))
                .parse()
                .unwrap(),
        );
        h
    };
    let mut base_headers = HeaderMap::new();
    base_headers.insert("host", "svc".parse().unwrap());
    let all = r#"("@method" "@authority" "@path" "@query")"#;
    let run = |params: String, has_body: bool| {
        v.check_head("GET", &uri, &sign(&params, &base_headers), has_body, now)
            .err()
    };
    assert_eq!(
        run(
            format!(r#"{all};created={now};keyid="k";nonce="n1""#),
            false
        ),
        None
    );
    for (params, has_body, reason) in [
        // Created too long ago, in the future, or expired.
        (
            format!(r#"{all};created={};keyid="k";nonce="n""#, now - 331),
            false,
            DenialReason::StaleSignature,
        ),
        (
            format!(r#"{all};created={};keyid="k";nonce="n""#, now + 31),
            false,
            DenialReason::StaleSignature,
        ),
        (
            format!(
                r#"{all};created={now};expires={};keyid="k";nonce="n""#,
                now - 30
            ),
            false,
            DenialReason::StaleSignature,
        ),
        (
            format!(r#"{all};created=-1;keyid="k";nonce="n""#),
            false,
            DenialReason::StaleSignature,
        ),
        // A required component not covered; a body without a covered digest.
        (
            format!(r#"("@method" "@authority" "@path");created={now};keyid="k";nonce="n""#),
            false,
            DenialReason::InvalidSignature,
        ),
        (
            format!(r#"{all};created={now};keyid="k";nonce="n""#),
            true,
            DenialReason::InvalidSignature,
        ),
        // No nonce; another algorithm; an unknown key.
        (
            format!(r#"{all};created={now};keyid="k""#),
            false,
            DenialReason::InvalidSignature,
        ),
        (
            format!(r#"{all};created={now};keyid="k";nonce="n";alg="ed25519""#),
            false,
            DenialReason::InvalidSignature,
        ),
        (
            format!(r#"{all};created={now};keyid="other";nonce="n""#),
            false,
            DenialReason::UnknownKey,
        ),
    ] {
        assert_eq!(run(params.clone(), has_body), Some(reason), "{params}");
    }
    // Within the skew on both sides: accepted.
    assert_eq!(
        run(
            format!(r#"{all};created={};keyid="k";nonce="n""#, now - 329),
            false
        ),
        None
    );
    assert_eq!(
        run(
            format!(r#"{all};created={};keyid="k";nonce="n""#, now + 29),
            false
        ),
        None
    );
}

#[test]
fn configuration_errors_at_construction() {
    let ok_key = || SignatureKey::hmac_sha256("k", &[1u8; 32]).unwrap();
    assert!(SignatureKey::hmac_sha256("k", &[1u8; 31]).is_err());
    assert!(SignatureKey::hmac_sha256("a b", &[1u8; 32]).is_err());
    assert!(
        SignatureKey::ed25519("k", &[0u8; 32]).is_err(),
        "small-order key"
    );
    assert!(SignatureVerifier::builder().build().is_err());
    assert!(
        SignatureVerifier::builder()
            .key(ok_key())
            .key(ok_key())
            .build()
            .is_err()
    );
    assert!(
        SignatureVerifier::builder()
            .key(ok_key())
            .required_components("@status")
            .build()
            .is_err()
    );
    assert!(
        SignatureVerifier::builder()
            .key(ok_key())
            .max_age(Duration::ZERO)
            .build()
            .is_err()
    );
    let debug = format!(
        "{:?} {:?}",
        ok_key(),
        SigningKey::hmac_sha256("k", &[0xAB; 32]).unwrap()
    );
    assert!(
        !debug.contains("171") && !debug.to_lowercase().contains("ab, "),
        "{debug}"
    );
}
