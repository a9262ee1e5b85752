//! RFC 9421 appendix B test vectors (B.2.5 `hmac-sha256`, B.2.6 `ed25519`), and the
//! checks of a signed request head.

use base64::Engine as _;

use super::*;
use std::convert::Infallible;

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
/// carry no nonce and cover neither `@query` nor `content-digest`; both cover
/// `@authority`, `date` and `content-type`).
fn rfc_verifier() -> Arc<Inner> {
    let secret = B64.decode(B15_SECRET).unwrap();
    SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256("test-shared-secret", &secret).unwrap())
        .key(SignatureKey::ed25519("test-key-ed25519", &last32(B14_PUBLIC)).unwrap())
        .required_components("@authority date content-type")
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

proptest::proptest! {
    /// However `max_age`, the skew, `created` and the two arrival seconds combine:
    /// if a signature is accepted at `first` and again at a later `second`, its
    /// nonce, claimed at `first`, is still remembered at `second`, in memory and
    /// in Redis (whose expiry counts from somewhere within the second `first`).
    #[test]
    fn a_nonce_outlives_every_second_its_signature_is_accepted(
        max_age in 1u64..=3600,
        skew in proptest::prop_oneof![0u64..=2, 0u64..=300],
        created in 1_000_000_000u64..1_000_010_000,
        // The second arrival near the last second the signature is accepted (where
        // a nonce forgotten too early shows), or anywhere.
        back in proptest::prop_oneof![0u64..3, 0u64..8000],
        gap in proptest::prop_oneof![0u64..3, 0u64..8000],
    ) {
        let secret = [9u8; 32];
        let v = SignatureVerifier::builder()
            .key(SignatureKey::hmac_sha256("k", &secret).unwrap())
            .max_age(Duration::from_secs(max_age))
            .clock_skew(Duration::from_secs(skew))
            .required_components("@method")
            .build()
            .unwrap()
            .inner;
        let key = SigningKey::hmac_sha256("k", &secret).unwrap();
        let params = format!(r#"("@method");created={created};keyid="k";nonce="n""#);
        let parsed = parse::parse_signature(format!("s={params}").as_bytes(), b"s=:AAAA:").unwrap();
        let empty = HeaderMap::new();
        let msg = Message { method: "GET", authority: None, path: "/", query: None, headers: &empty };
        let base = parse::signature_base(&msg, &parsed.components, &parsed.params_line).unwrap();
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_INPUT, format!("s={params}").parse().unwrap());
        h.insert(
            SIGNATURE,
            format!("s=:{}:", B64.encode(key.sign(base.as_bytes()))).parse().unwrap(),
        );
        let uri: http::Uri = "/".parse().unwrap();
        let second = (created + max_age + skew).saturating_sub(back);
        let first = second.saturating_sub(gap);
        let (Ok(a), Ok(_)) = (
            v.check_head("GET", &uri, &h, false, first),
            v.check_head("GET", &uri, &h, false, second),
        ) else {
            return Ok(());
        };
        proptest::prop_assert!(matches!(v.claim_local(&a, "n", first), Ok(())));
        proptest::prop_assert!(
            matches!(v.claim_local(&a, "n", second), Err(Refusal::Denied(DenialReason::ReplayedSignature))),
            "replay accepted at {second} (first {first})"
        );
        // Redis: the key, set at some instant within the second `first`, lives
        // `ttl` from then, so through the whole second `second`.
        proptest::prop_assert!(first + Inner::nonce_ttl(&a, first).as_secs() > second);
    }
}

proptest::proptest! {
    /// `@authority` comes from one unambiguous source: the URI's authority and the
    /// `Host` lines, in any combination and case, give a value only when there is
    /// at most one `Host` line, no user information, and the two (when both are
    /// there) agree; the value is then what both say.
    #[test]
    fn the_authority_is_one_unambiguous_value(
        uri_host in proptest::option::of(proptest::prop_oneof!["svc\\.test", "SVC\\.test", "other\\.test", "u@svc\\.test", "svc\\.test:8080"]),
        hosts in proptest::collection::vec(proptest::prop_oneof!["svc\\.test", "Svc\\.Test", "other\\.test", "svc\\.test:8080"], 0..3),
    ) {
        let uri: http::Uri = match &uri_host {
            Some(a) => format!("http://{a}/p?q").parse().unwrap(),
            None => "/p?q".parse().unwrap(),
        };
        let mut h = HeaderMap::new();
        for v in &hosts {
            h.append(http::header::HOST, v.parse().unwrap());
        }
        let got = authority(&uri, &h);
        let expected = match (uri_host.as_deref(), hosts.as_slice()) {
            (_, [_, _, ..]) => None,
            (Some(a), _) if a.contains('@') => None,
            (Some(a), [h]) => a.eq_ignore_ascii_case(h).then_some(a),
            (Some(a), []) => Some(a),
            (None, [h]) => Some(h.as_str()),
            (None, []) => None,
        };
        proptest::prop_assert_eq!(got, expected);
    }
}

/// Over real TCP, through `VerifySignatureLayer` and a hyper server, with the
/// layer's clock fixed: RFC 9421's published signatures, and the replay window's
/// last second.
mod tcp {
    use super::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceBuilder;

    /// Serves `verifier`; the handler answers the principal's id. `drop_body`
    /// hands the layer an empty body (and keeps the head): the RFC's signatures
    /// do not cover the body of their request, which this verifier otherwise
    /// refuses.
    async fn serve(verifier: SignatureVerifier, drop_body: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let svc = ServiceBuilder::new()
                    .map_request(move |req: Request<hyper::body::Incoming>| {
                        req.map(|b| {
                            if drop_body {
                                http_body_util::Either::Left(http_body_util::Empty::<Bytes>::new())
                            } else {
                                http_body_util::Either::Right(b)
                            }
                        })
                    })
                    .layer(VerifySignatureLayer::new(verifier.clone()))
                    .service_fn(|req: Request<SignedBody<_>>| async move {
                        let id = req
                            .extensions()
                            .get::<Principal>()
                            .map_or("-".to_owned(), |p| p.id().to_owned());
                        Ok::<_, Infallible>(Response::new(http_body_util::Full::new(Bytes::from(
                            id,
                        ))))
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(
                            hyper_util::rt::TokioIo::new(stream),
                            hyper_util::service::TowerToHyperService::new(svc),
                        )
                        .await;
                });
            }
        });
        addr
    }

    /// Sends `head` (lines without the final blank line) and `body`; the status
    /// and the body of the answer.
    async fn send(to: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
        let req = format!("{head}connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, body.to_owned())
    }

    /// The RFC 9421 B.2 request on the wire, with a date and a signature.
    fn b2_wire(date: &str, input: &str, signature: &str) -> String {
        format!(
            "POST /foo?param=Value&Pet=dog HTTP/1.1\r\nhost: example.com\r\ndate: {date}\r\n\
             content-type: application/json\r\ncontent-digest: sha-512=:WZDPaVn/7XgHaAy8pmojAkGWoRx2UFChF41A2svX+TaPm+AbwAgBWnrIiYllu7BNNyealdVLvRwEmTHWXvJwew==:\r\n\
             content-length: 18\r\nsignature-input: {input}\r\nsignature: {signature}\r\n"
        )
    }

    const DATE: &str = "Tue, 20 Apr 2021 02:07:55 GMT";
    const BODY: &[u8] = br#"{"hello": "world"}"#;

    #[tokio::test]
    async fn rfc_9421_b_2_5_and_b_2_6_verify_through_the_layer() {
        fn rfc_time() -> u64 {
            CREATED
        }
        let secret = B64.decode(B15_SECRET).unwrap();
        let verifier = SignatureVerifier::builder()
            .key(SignatureKey::hmac_sha256("test-shared-secret", &secret).unwrap())
            .key(SignatureKey::ed25519("test-key-ed25519", &last32(B14_PUBLIC)).unwrap())
            .required_components("@authority date content-type")
            .allow_signatures_without_nonce_dangerously()
            .clock(rfc_time)
            .build()
            .unwrap();
        let addr = serve(verifier, true).await;
        let b25 = (
            r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#,
            "sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:",
            "test-shared-secret",
        );
        let b26 = (
            r#"sig-b26=("date" "@method" "@path" "@authority" "content-type" "content-length");created=1618884473;keyid="test-key-ed25519""#,
            "sig-b26=:wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw==:",
            "test-key-ed25519",
        );
        for (input, signature, id) in [b25, b26] {
            let r = send(addr, &b2_wire(DATE, input, signature), BODY).await;
            assert_eq!(r, (200, id.to_owned()), "{id}");
            // A covered field changed on the way: refused.
            let other = "Tue, 20 Apr 2021 02:07:56 GMT";
            let r = send(addr, &b2_wire(other, input, signature), BODY).await;
            assert_eq!(r.0, 401, "{id}");
        }
        // The same request through a layer that reads its body: refused, as the
        // signatures do not cover it.
        fn rfc_time_too() -> u64 {
            CREATED
        }
        let strict = SignatureVerifier::builder()
            .key(SignatureKey::hmac_sha256("test-shared-secret", &secret).unwrap())
            .required_components("@authority date content-type")
            .allow_signatures_without_nonce_dangerously()
            .clock(rfc_time_too)
            .build()
            .unwrap();
        let addr = serve(strict, false).await;
        let r = send(addr, &b2_wire(DATE, b25.0, b25.1), BODY).await;
        assert_eq!(r.0, 401);
    }

    /// With no clock skew allowed, a signature is accepted through the second
    /// `created + max_age`: its nonce is refused again in that same second.
    #[tokio::test]
    async fn a_nonce_replayed_in_the_last_accepted_second_is_refused() {
        const CREATED_AT: u64 = 2_000_000_000;
        static NOW: AtomicU64 = AtomicU64::new(CREATED_AT);
        fn clock() -> u64 {
            NOW.load(Ordering::Relaxed)
        }
        let secret = [5u8; 32];
        let verifier = SignatureVerifier::builder()
            .key(SignatureKey::hmac_sha256("edge-client", &secret).unwrap())
            .max_age(Duration::from_secs(60))
            .clock_skew(Duration::ZERO)
            .clock(clock)
            .build()
            .unwrap();
        let addr = serve(verifier, false).await;
        let key = SigningKey::hmac_sha256("edge-client", &secret).unwrap();
        let params = format!(
            r#"("@method" "@authority" "@path" "@query");created={CREATED_AT};keyid="edge-client";nonce="edge-nonce""#
        );
        let parsed = parse::parse_signature(format!("s={params}").as_bytes(), b"s=:AAAA:").unwrap();
        let empty = HeaderMap::new();
        let msg = Message {
            method: "GET",
            authority: Some("svc.test"),
            path: "/jobs",
            query: None,
            headers: &empty,
        };
        let base = parse::signature_base(&msg, &parsed.components, &parsed.params_line).unwrap();
        let head = format!(
            "GET /jobs HTTP/1.1\r\nhost: svc.test\r\nsignature-input: s={params}\r\nsignature: s=:{}:\r\n",
            B64.encode(key.sign(base.as_bytes()))
        );
        // The last second the signature is accepted: once, then a replay.
        NOW.store(CREATED_AT + 60, Ordering::Relaxed);
        assert_eq!(
            send(addr, &head, b"").await,
            (200, "edge-client".to_owned())
        );
        assert_eq!(send(addr, &head, b"").await.0, 401);
        // A second later the signature itself is stale.
        NOW.store(CREATED_AT + 61, Ordering::Relaxed);
        assert_eq!(send(addr, &head, b"").await.0, 401);
    }
}

/// The signing layer derives `@authority` as the verifier does: a request whose
/// URI authority and `Host` differ is not signed (the verifier would refuse it).
#[tokio::test]
async fn the_signer_refuses_an_ambiguous_authority() {
    use tower::ServiceExt;
    let key = SigningKey::hmac_sha256("k", &[3u8; 32]).unwrap();
    let inner = tower::service_fn(
        |req: Request<SignedBody<http_body_util::Empty<Bytes>>>| async move {
            Ok::<_, Infallible>(req.headers().contains_key(&SIGNATURE))
        },
    );
    let svc = SignRequestLayer::new(key).layer(inner);
    let req = |host: &str| {
        Request::builder()
            .uri("http://svc.test/jobs")
            .header("host", host)
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    assert!(svc.clone().oneshot(req("svc.test")).await.unwrap());
    assert!(svc.clone().oneshot(req("other.test")).await.is_err());
}

proptest::proptest! {
    /// `created` and `expires` anywhere in the range a structured-field integer
    /// can carry (negative, far past, far future), against any clock: accepted
    /// exactly when the freshness rule, computed without overflow, says so; never
    /// a panic or a wrapped comparison.
    #[test]
    fn freshness_is_exact_over_the_whole_integer_range(
        created in proptest::prop_oneof![
            -999_999_999_999_999i64..=999_999_999_999_999,
            1_999_999_000i64..2_000_001_000,
        ],
        expires in proptest::option::of(proptest::prop_oneof![
            -999_999_999_999_999i64..=999_999_999_999_999,
            1_999_999_000i64..2_000_001_000,
        ]),
        now in proptest::prop_oneof![0u64..=u64::MAX / 2, 1_999_999_000u64..2_000_001_000],
        max_age in 1u64..=3600,
        skew in 0u64..=300,
    ) {
        let secret = [9u8; 32];
        let v = SignatureVerifier::builder()
            .key(SignatureKey::hmac_sha256("k", &secret).unwrap())
            .max_age(Duration::from_secs(max_age))
            .clock_skew(Duration::from_secs(skew))
            .required_components("@method")
            .build()
            .unwrap()
            .inner;
        let key = SigningKey::hmac_sha256("k", &secret).unwrap();
        let mut params = format!(r#"("@method");created={created};keyid="k";nonce="n""#);
        if let Some(e) = expires {
            params.push_str(&format!(";expires={e}"));
        }
        let parsed = parse::parse_signature(format!("s={params}").as_bytes(), b"s=:AAAA:").unwrap();
        let empty = HeaderMap::new();
        let msg = Message { method: "GET", authority: None, path: "/", query: None, headers: &empty };
        let base = parse::signature_base(&msg, &parsed.components, &parsed.params_line).unwrap();
        let mut h = HeaderMap::new();
        h.insert(SIGNATURE_INPUT, format!("s={params}").parse().unwrap());
        h.insert(
            SIGNATURE,
            format!("s=:{}:", B64.encode(key.sign(base.as_bytes()))).parse().unwrap(),
        );
        let got = v.check_head("GET", &"/".parse().unwrap(), &h, false, now);
        let (c, n, age, sk) = (i128::from(created), i128::from(now), i128::from(max_age), i128::from(skew));
        let fresh = c >= 0
            && c <= n + sk
            && n - c <= age + sk
            && expires.is_none_or(|e| e >= 0 && i128::from(e) + sk > n);
        match got {
            Ok(_) => proptest::prop_assert!(fresh),
            Err(r) => {
                proptest::prop_assert!(!fresh);
                proptest::prop_assert_eq!(r, DenialReason::StaleSignature);
            }
        }
    }
}

#[test]
fn no_debug_output_shows_key_material() {
    use base64::engine::general_purpose::STANDARD;
    let secret = b"SECRET-material-of-a-client-0123456789";
    let seed = [0x5a_u8; 32];
    let hmac = SigningKey::hmac_sha256("client-a", secret).unwrap();
    let ed = SigningKey::ed25519("client-b", &seed).unwrap();
    let verifier = SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256("client-a", secret).unwrap())
        .key(SignatureKey::ed25519("client-b", &ed.public_key().unwrap()).unwrap())
        .build()
        .unwrap();
    let shown = [
        format!(
            "{:?}",
            SignatureKey::hmac_sha256("client-a", secret).unwrap()
        ),
        format!("{hmac:?}"),
        format!("{ed:?}"),
        format!("{verifier:?}"),
        format!("{:?}", VerifySignatureLayer::new(verifier.clone())),
        format!("{:?}", SignRequestLayer::new(hmac.clone())),
        format!("{:?}", SignRequestLayer::new(ed.clone())),
    ];
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let forbidden = [
        String::from_utf8(secret.to_vec()).unwrap(),
        hex(secret),
        STANDARD.encode(secret),
        hex(&seed),
        STANDARD.encode(seed),
        format!("{:?}", secret.as_slice()),
        format!("{:?}", seed),
        "90, 90, 90".to_owned(),
    ];
    for text in &shown {
        assert!(text.contains("client-"), "the id is shown: {text}");
        for f in &forbidden {
            assert!(!text.contains(f.as_str()), "key material in {text}");
        }
    }
}
