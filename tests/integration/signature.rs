//! Signed requests (RFC 9421 with `Content-Digest`) over real TCP: a hyper server
//! with ClientIp, VerifySignatureLayer and AuthenticateLayer (API keys) in front of
//! a handler echoing the principal and the body it got. Requests are signed here
//! by an independent implementation of the signature base (and once by
//! `SignRequestLayer` through a real hyper client), then altered on the wire.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::Principal;
use portcullis::Scopes;
use portcullis::api_key::{ApiKeys, KeyRecord, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddrLayer};
use portcullis::signature::{
    SignRequestLayer, SignatureKey, SignatureVerifier, SignedBody, SigningKey, VerifySignatureLayer,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::log_capture;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const SECRET: &[u8; 32] = b"0123456789abcdef0123456789ABCDEF";
const KEY_ID: &str = "signing-worker";

fn verifier() -> portcullis::signature::SignatureVerifierBuilder {
    SignatureVerifier::builder()
        .key(
            SignatureKey::hmac_sha256(KEY_ID, SECRET)
                .unwrap()
                .with_scopes(Scopes::parse("jobs:work").unwrap()),
        )
        .max_body_bytes(64 * 1024)
}

/// The server: answers `<principal id> <body length> <body>`.
async fn serve(layer: VerifySignatureLayer) -> SocketAddr {
    serve_throttled(layer, None).await
}

/// [`serve`], with a failed-authentication throttle outside the signature layer.
async fn serve_throttled(
    layer: VerifySignatureLayer,
    throttle: Option<AuthThrottleLayer>,
) -> SocketAddr {
    let key = generate_key("pc_test").unwrap();
    let keys = ApiKeys::new(
        KeyStore::from_records([KeyRecord::new("api-key-client", key.digest()).unwrap()]).unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                continue;
            };
            let svc = ServiceBuilder::new()
                .layer(PeerAddrLayer::new(remote))
                .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
                .option_layer(throttle.clone())
                .layer(layer.clone())
                .layer(AuthenticateLayer::api_keys(keys.clone()))
                .service_fn(|req: Request<SignedBody<Incoming>>| async move {
                    let id = req
                        .extensions()
                        .get::<Principal>()
                        .map_or("-".to_owned(), |p| {
                            format!("{}:{}", p.method().as_str(), p.id())
                        });
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let text = format!("{id} {} {}", body.len(), String::from_utf8_lossy(&body));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    addr
}

/// A request on the wire: method, target, header lines, body.
#[derive(Clone, Debug)]
struct Wire {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn new(method: &str, target: &str, body: &[u8]) -> Self {
        Self {
            method: method.into(),
            target: target.into(),
            headers: vec![("host".into(), "svc.test".into())],
            body: body.to_vec(),
        }
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name.into(), value.into()));
        self
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Signs, as a client would: `Content-Digest` for a body, then the signature
    /// over `components` with `params` (after the component list).
    fn signed(mut self, components: &[&str], params: &str, secret: &[u8]) -> Self {
        if !self.body.is_empty() && self.get("content-digest").is_none() {
            use sha2::Digest;
            let d = B64.encode(sha2::Sha256::digest(&self.body));
            self = self.header("content-digest", &format!("sha-256=:{d}:"));
        }
        let (path, query) = match self.target.split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (self.target.clone(), None),
        };
        let list: Vec<String> = components.iter().map(|c| format!("\"{c}\"")).collect();
        let line = format!("({}){params}", list.join(" "));
        let mut base = String::new();
        for c in components {
            let value = match *c {
                "@method" => self.method.clone(),
                "@authority" => self.get("host").unwrap().to_owned(),
                "@path" => path.clone(),
                "@query" => format!("?{}", query.clone().unwrap_or_default()),
                field => self.get(field).expect("covered field").to_owned(),
            };
            base.push_str(&format!("\"{c}\": {value}\n"));
        }
        base.push_str(&format!("\"@signature-params\": {line}"));
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(base.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        self.header("signature-input", &format!("sig1={line}"))
            .header("signature", &format!("sig1=:{sig}:"))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn nonce() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).unwrap();
    B64.encode(b)
}

/// The usual parameters: created now, the key, a fresh nonce.
fn params() -> String {
    format!(
        ";created={};keyid=\"{KEY_ID}\";nonce=\"{}\"",
        now(),
        nonce()
    )
}

const GET_COMPONENTS: &[&str] = &["@method", "@authority", "@path", "@query", "x-job"];
const POST_COMPONENTS: &[&str] = &["@method", "@authority", "@path", "@query", "content-digest"];

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

async fn send(to: SocketAddr, w: &Wire) -> Reply {
    let mut stream = TcpStream::connect(to).await.unwrap();
    let mut req = format!(
        "{} {} HTTP/1.1\r\nconnection: close\r\n",
        w.method, w.target
    );
    for (n, v) in &w.headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n", w.body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(&w.body).await.unwrap();
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Nothing of the request's credential comes back.
fn assert_nothing_echoed(r: &Reply, w: &Wire) {
    let text = format!("{}\n{}", r.head, r.body).to_lowercase();
    for secret in [
        KEY_ID.to_owned(),
        w.get("signature").unwrap_or("").to_owned(),
    ] {
        if !secret.is_empty() {
            assert!(!text.contains(&secret.to_lowercase()), "{text}");
        }
    }
    assert!(
        !text.contains("nonce") && !text.contains("signature"),
        "{text}"
    );
}

#[tokio::test]
async fn signed_requests_pass_and_the_body_arrives_unchanged() {
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let get = Wire::new("GET", "/v1/jobs?state=queued", b"")
        .header("x-job", "42")
        .signed(GET_COMPONENTS, &params(), SECRET);
    let r = send(addr, &get).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "http_signature:signing-worker 0 "),
        "{r:?}"
    );
    let body = br#"{"input":"hello"}"#;
    let post = Wire::new("POST", "/v1/jobs", body).signed(POST_COMPONENTS, &params(), SECRET);
    let r = send(addr, &post).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.body,
        format!(
            "http_signature:signing-worker {} {}",
            body.len(),
            String::from_utf8_lossy(body)
        )
    );
}

#[tokio::test]
async fn every_alteration_and_every_stale_or_unknown_signature_is_refused() {
    let _capture = log_capture::capture();
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let get = || Wire::new("GET", "/v1/jobs?state=queued", b"").header("x-job", "42");
    let post = || Wire::new("POST", "/v1/jobs", br#"{"input":"hello"}"#);
    let t = now();
    let cases: Vec<(&str, Wire, u16)> = vec![
        (
            "method",
            {
                let mut w = get().signed(GET_COMPONENTS, &params(), SECRET);
                w.method = "DELETE".into();
                w
            },
            401,
        ),
        (
            "path",
            {
                let mut w = get().signed(GET_COMPONENTS, &params(), SECRET);
                w.target = "/v1/admin?state=queued".into();
                w
            },
            401,
        ),
        (
            "query",
            {
                let mut w = get().signed(GET_COMPONENTS, &params(), SECRET);
                w.target = "/v1/jobs?state=failed".into();
                w
            },
            401,
        ),
        (
            "covered header",
            get()
                .signed(GET_COMPONENTS, &params(), SECRET)
                .header("x-job", "43"),
            401,
        ),
        (
            "authority",
            get()
                .signed(GET_COMPONENTS, &params(), SECRET)
                .header("host", "other.test"),
            401,
        ),
        (
            "body",
            {
                let mut w = post().signed(POST_COMPONENTS, &params(), SECRET);
                w.body = br#"{"input":"HELLO"}"#.to_vec();
                w
            },
            401,
        ),
        (
            "digest",
            {
                let w = post().signed(POST_COMPONENTS, &params(), SECRET);
                let mut w2 = w.clone();
                w2.body.clear();
                w2.body.extend_from_slice(b"{}");
                w2
            },
            401,
        ),
        (
            "body without digest",
            post().signed(
                &["@method", "@authority", "@path", "@query"],
                &params(),
                SECRET,
            ),
            401,
        ),
        (
            "expired",
            get().signed(
                GET_COMPONENTS,
                &format!(
                    ";created={};keyid=\"{KEY_ID}\";nonce=\"{}\"",
                    t - 400,
                    nonce()
                ),
                SECRET,
            ),
            401,
        ),
        (
            "future",
            get().signed(
                GET_COMPONENTS,
                &format!(
                    ";created={};keyid=\"{KEY_ID}\";nonce=\"{}\"",
                    t + 120,
                    nonce()
                ),
                SECRET,
            ),
            401,
        ),
        (
            "expires past",
            get().signed(
                GET_COMPONENTS,
                &format!(
                    ";created={t};expires={};keyid=\"{KEY_ID}\";nonce=\"{}\"",
                    t - 60,
                    nonce()
                ),
                SECRET,
            ),
            401,
        ),
        (
            "unknown keyid",
            get().signed(
                GET_COMPONENTS,
                &format!(";created={t};keyid=\"stranger\";nonce=\"{}\"", nonce()),
                SECRET,
            ),
            401,
        ),
        (
            "wrong secret",
            get().signed(
                GET_COMPONENTS,
                &params(),
                b"0123456789abcdef0123456789ABCDEX",
            ),
            401,
        ),
        (
            "missing covered component",
            get().signed(
                &["@method", "@authority", "@path", "x-job"],
                &params(),
                SECRET,
            ),
            401,
        ),
        (
            "no nonce",
            get().signed(
                GET_COMPONENTS,
                &format!(";created={t};keyid=\"{KEY_ID}\""),
                SECRET,
            ),
            401,
        ),
        (
            "malformed input",
            get()
                .header("signature-input", "sig1=(")
                .header("signature", "sig1=:AAAA:"),
            400,
        ),
        (
            "signature without input",
            get().header("signature", "sig1=:AAAA:"),
            400,
        ),
        (
            "body over the cap",
            {
                let mut w = Wire::new("POST", "/v1/jobs", &vec![b'a'; 64 * 1024 + 1]);
                w = w.signed(POST_COMPONENTS, &params(), SECRET);
                w
            },
            413,
        ),
        (
            "also an API key",
            get()
                .signed(GET_COMPONENTS, &params(), SECRET)
                .header("x-api-key", "pc_test_whatever"),
            400,
        ),
    ];
    for (what, w, status) in cases {
        let r = send(addr, &w).await;
        assert_eq!(r.status, status, "{what}: {r:?}");
        assert!(
            r.head.to_lowercase().contains("application/problem+json"),
            "{what}: {r:?}"
        );
        assert_nothing_echoed(&r, &w);
    }
    // Each refusal's reason is in the audit log, not in the response.
    let reasons: Vec<String> = log_capture::capture()
        .events_with("auth_failed")
        .into_iter()
        .filter_map(|e| e["fields"]["reason"].as_str().map(str::to_owned))
        .collect();
    for reason in [
        "invalid_signature",
        "digest_mismatch",
        "stale_signature",
        "unknown_key",
        "body_too_large",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} in {reasons:?}"
        );
    }
}

#[tokio::test]
async fn a_replayed_nonce_is_refused() {
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let w = Wire::new("GET", "/v1/jobs?state=queued", b"")
        .header("x-job", "1")
        .signed(GET_COMPONENTS, &params(), SECRET);
    assert_eq!(send(addr, &w).await.status, 200);
    let r = send(addr, &w).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_nothing_echoed(&r, &w);
    // Another nonce, same everything else: accepted.
    let w2 = Wire::new("GET", "/v1/jobs?state=queued", b"")
        .header("x-job", "1")
        .signed(GET_COMPONENTS, &params(), SECRET);
    assert_eq!(send(addr, &w2).await.status, 200);
}

/// A request naming its authority twice, differently, is refused even when the
/// one the signature covers is right: the service behind could route by the other.
#[tokio::test]
async fn an_ambiguous_authority_is_refused() {
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let signed = || {
        Wire::new("GET", "/v1/jobs?state=queued", b"")
            .header("x-job", "1")
            .signed(GET_COMPONENTS, &params(), SECRET)
    };
    // The absolute form names the signed authority, `Host` another.
    let mut w = signed().header("host", "other.test");
    w.target = "http://svc.test/v1/jobs?state=queued".into();
    let r = send(addr, &w).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_nothing_echoed(&r, &w);
    // `Host` twice: the signed one first.
    let mut w = signed();
    w.headers.push(("host".into(), "other.test".into()));
    let r = send(addr, &w).await;
    assert!(r.status == 401 || r.status == 400, "{r:?}");
    assert_nothing_echoed(&r, &w);
    // The absolute form and `Host` agreeing (in any case): accepted.
    let mut w = signed().header("host", "SVC.test");
    w.target = "http://svc.test/v1/jobs?state=queued".into();
    assert_eq!(send(addr, &w).await.status, 200);
}

/// The signature fields and the covered header lines are read strictly: one
/// signature, its label in both fields; a covered field's value is the field's
/// lines, each stripped of surrounding whitespace (RFC 9421 §2.1), so padding is
/// harmless but inner whitespace, another line or a folded line is not.
#[tokio::test]
async fn signature_fields_and_covered_lines_are_read_strictly() {
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let signed = || {
        Wire::new("GET", "/v1/jobs?state=queued", b"")
            .header("x-job", "42")
            .signed(GET_COMPONENTS, &params(), SECRET)
    };
    let input = |w: &Wire| w.get("signature-input").unwrap().to_owned();
    let signature = |w: &Wire| w.get("signature").unwrap().to_owned();
    let mut cases: Vec<(&str, Wire, u16)> = Vec::new();
    // Two signatures, both valid copies under two labels.
    let w = signed();
    let two_inputs = format!("{}, {}", input(&w), input(&w).replacen("sig1=", "sig2=", 1));
    let two_sigs = format!(
        "{}, {}",
        signature(&w),
        signature(&w).replacen("sig1=", "sig2=", 1)
    );
    cases.push((
        "two signatures",
        w.clone()
            .header("signature-input", &two_inputs)
            .header("signature", &two_sigs),
        400,
    ));
    cases.push((
        "labels differ",
        w.clone()
            .header("signature", &signature(&w).replacen("sig1=", "sig2=", 1)),
        400,
    ));
    // A second `Signature-Input` line: the field then holds two members.
    let mut two_lines = w.clone();
    two_lines.headers.push((
        "signature-input".into(),
        input(&w).replacen("sig1=", "sig9=", 1),
    ));
    cases.push(("second input line", two_lines, 400));
    // A second line of a covered field.
    let mut second = signed();
    second.headers.push(("x-job".into(), "43".into()));
    cases.push(("covered field twice", second, 401));
    cases.push(("inner whitespace", signed().header("x-job", "4 2"), 401));
    cases.push(("folded line", signed().header("x-job", "42\r\n 43"), 400));
    cases.push(("padding", signed().header("x-job", " \t42 \t"), 200));
    for (what, w, status) in cases {
        let r = send(addr, &w).await;
        assert_eq!(r.status, status, "{what}: {r:?}");
        if status != 200 {
            assert_nothing_echoed(&r, &w);
        }
    }
}

/// Sends `w` with a chunked body (chunks of `chunk` bytes), or with the
/// `Content-Length` given instead of the true one, closing the write side after.
async fn send_framed(
    to: SocketAddr,
    w: &Wire,
    chunk: Option<usize>,
    length: Option<usize>,
) -> Reply {
    let mut stream = TcpStream::connect(to).await.unwrap();
    let mut req = format!(
        "{} {} HTTP/1.1\r\nconnection: close\r\n",
        w.method, w.target
    );
    for (n, v) in &w.headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    let mut bytes = Vec::new();
    match (chunk, length) {
        (Some(size), _) => {
            req.push_str("transfer-encoding: chunked\r\n\r\n");
            for c in w.body.chunks(size) {
                bytes.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                bytes.extend_from_slice(c);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        }
        (None, Some(len)) => {
            req.push_str(&format!("content-length: {len}\r\n\r\n"));
            bytes.extend_from_slice(&w.body);
        }
        (None, None) => unreachable!(),
    }
    stream.write_all(req.as_bytes()).await.unwrap();
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The body cap holds whatever the framing says: a chunked body over the cap is
/// 413 however it is split; a `Content-Length` promising more than is sent is
/// refused once the body ends short; a chunked body under the cap passes.
#[tokio::test]
async fn the_body_cap_holds_for_every_framing() {
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let big = Wire::new("POST", "/v1/jobs", &vec![b'a'; 64 * 1024 + 1]);
    let small = Wire::new("POST", "/v1/jobs", br#"{"input":"chunked"}"#);
    for size in [1024, 64 * 1024, 64 * 1024 + 1] {
        let w = big.clone().signed(POST_COMPONENTS, &params(), SECRET);
        let r = send_framed(addr, &w, Some(size), None).await;
        assert_eq!(r.status, 413, "chunks of {size}: {r:?}");
        assert_nothing_echoed(&r, &w);
    }
    let w = small.clone().signed(POST_COMPONENTS, &params(), SECRET);
    let r = send_framed(addr, &w, Some(4), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.ends_with(r#"{"input":"chunked"}"#), "{r:?}");
    // A length that lies upwards: the body ends short, nothing reaches the service.
    let w = small.clone().signed(POST_COMPONENTS, &params(), SECRET);
    let r = send_framed(addr, &w, None, Some(w.body.len() + 10)).await;
    assert!(r.status == 400 || r.status == 0, "{r:?}");
    assert!(!r.body.contains("http_signature:"), "{r:?}");
}

/// Every `Content-Digest` of an algorithm the verifier computes must match the
/// body: a right `sha-256` does not excuse a wrong `sha-512` the signer named.
#[tokio::test]
async fn every_known_content_digest_must_match() {
    use sha2::Digest;
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let body = br#"{"input":"hello"}"#;
    let sha256 = B64.encode(sha2::Sha256::digest(body));
    let sha512 = B64.encode(sha2::Sha512::digest(body));
    let wrong512 = B64.encode(sha2::Sha512::digest(b"another body"));
    for (field, status) in [
        (format!("sha-256=:{sha256}:, sha-512=:{wrong512}:"), 401),
        (format!("sha-512=:{wrong512}:, sha-256=:{sha256}:"), 401),
        (format!("sha-256=:{sha256}:, sha-512=:{sha512}:"), 200),
        // An unknown algorithm is ignored beside a known one, refused alone.
        (format!("md5=:AAAA:, sha-512=:{sha512}:"), 200),
        ("md5=:AAAA:".to_owned(), 401),
        // Algorithm names are lowercase keys: `SHA-256` is not a dictionary.
        (format!("SHA-256=:{sha256}:"), 401),
    ] {
        let w = Wire::new("POST", "/v1/jobs", body)
            .header("content-digest", &field)
            .signed(POST_COMPONENTS, &params(), SECRET);
        let r = send(addr, &w).await;
        assert_eq!(r.status, status, "{field}: {r:?}");
    }
}

/// Wrong signatures count as failed authentications for the throttle outside.
#[tokio::test]
async fn the_throttle_counts_signature_failures() {
    let throttle = AuthThrottleLayer::new(portcullis::rate_limit::Quota::per_hour(2).unwrap());
    let addr = serve_throttled(
        VerifySignatureLayer::new(verifier().build().unwrap()),
        Some(throttle),
    )
    .await;
    let bad = || {
        Wire::new("GET", "/v1/jobs?state=queued", b"")
            .header("x-job", "1")
            .signed(
                GET_COMPONENTS,
                &params(),
                b"0123456789abcdef0123456789ABCDEX",
            )
    };
    assert_eq!(send(addr, &bad()).await.status, 401);
    assert_eq!(send(addr, &bad()).await.status, 401);
    let r = send(addr, &bad()).await;
    assert_eq!(r.status, 429, "{r:?}");
    // A valid signature from the throttled address still passes (the default mode).
    let good = Wire::new("GET", "/v1/jobs?state=queued", b"")
        .header("x-job", "1")
        .signed(GET_COMPONENTS, &params(), SECRET);
    assert_eq!(send(addr, &good).await.status, 200);
}

#[tokio::test]
async fn unsigned_requests_go_to_the_other_credentials() {
    let addr = serve(VerifySignatureLayer::new(verifier().build().unwrap())).await;
    let r = send(addr, &Wire::new("GET", "/", b"")).await;
    assert_eq!(r.status, 401);
    assert!(r.head.to_lowercase().contains("www-authenticate"));
}

/// The client layer through a real hyper client connection signs what the server
/// verifies, GET and POST.
#[tokio::test]
async fn the_signing_layer_signs_what_the_verifier_accepts() {
    let ed_seed = [42u8; 32];
    let ed = SigningKey::ed25519("ed-worker", &ed_seed).unwrap();
    let layer = VerifySignatureLayer::new(
        verifier()
            .key(SignatureKey::ed25519("ed-worker", &ed.public_key().unwrap()).unwrap())
            .build()
            .unwrap(),
    );
    let addr = serve(layer).await;
    for key in [SigningKey::hmac_sha256(KEY_ID, SECRET).unwrap(), ed] {
        for (method, body) in [("GET", &b""[..]), ("POST", &b"{\"input\":\"signed\"}"[..])] {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
            let client = tower::service_fn(move |req: Request<SignedBody<Full<Bytes>>>| {
                let sender = sender.clone();
                async move { sender.lock().await.send_request(req).await }
            });
            let svc = SignRequestLayer::new(key.clone()).layer(client);
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{addr}/v1/jobs?x=1"))
                .body(Full::new(Bytes::from_static(body)))
                .unwrap();
            let res = svc.oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200, "{method}");
            let text = res.into_body().collect().await.unwrap().to_bytes();
            let expected = format!("http_signature:{} {} ", key_id(&key), body.len());
            assert!(
                String::from_utf8_lossy(&text).starts_with(&expected),
                "{text:?}"
            );
        }
    }
}

fn key_id(k: &SigningKey) -> &'static str {
    if k.public_key().is_some() {
        "ed-worker"
    } else {
        KEY_ID
    }
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_nonce_replayed_at_another_instance_sharing_redis_is_refused() {
    use crate::rate_limit_redis::{RedisServer, connected};
    use portcullis::rate_limit::redis::FailurePolicy;
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let url = server.url();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let redis = connected(&url, FailurePolicy::FailClosed, "sig").await;
        instances.push(
            serve(VerifySignatureLayer::new(
                verifier().redis(redis).build().unwrap(),
            ))
            .await,
        );
    }
    let w = Wire::new("GET", "/v1/jobs?state=queued", b"")
        .header("x-job", "7")
        .signed(GET_COMPONENTS, &params(), SECRET);
    assert_eq!(send(instances[0], &w).await.status, 200);
    let r = send(instances[1], &w).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_nothing_echoed(&r, &w);
}

/// A server on loopback with the request id, the access log and the client address
/// outside `verifier`'s signature layer, and `auth` inside it, answering 200 to what
/// they let through.
#[cfg(feature = "access-log")]
async fn serve_logged(verifier: SignatureVerifier, auth: AuthenticateLayer) -> SocketAddr {
    use portcullis::access_log::AccessLogLayer;
    use portcullis::request_id::RequestIdLayer;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = VerifySignatureLayer::new(verifier);
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                continue;
            };
            let svc = ServiceBuilder::new()
                .layer(PeerAddrLayer::new(remote))
                .layer(RequestIdLayer::new())
                .layer(AccessLogLayer::new())
                .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
                .layer(layer.clone())
                .layer(auth.clone())
                .service_fn(|_req: Request<SignedBody<Incoming>>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    addr
}

/// A signed request is one event, the access event naming the key id and
/// `http_signature`; the `auth_succeeded` audit event is added only with the
/// authentication layer's opt-in.
#[cfg(feature = "access-log")]
#[tokio::test]
async fn a_signed_request_is_one_event_unless_successes_are_audited() {
    let capture = log_capture::capture();
    for (key_id, audit_successes) in [("sig-one-default", false), ("sig-one-audited", true)] {
        let verifier = SignatureVerifier::builder()
            .key(SignatureKey::hmac_sha256(key_id, SECRET).unwrap())
            .build()
            .unwrap();
        let store = KeyStore::from_records([KeyRecord::new(
            "api-key-client",
            generate_key("pc_test").unwrap().digest(),
        )
        .unwrap()])
        .unwrap();
        let mut auth = AuthenticateLayer::api_keys(ApiKeys::new(store));
        if audit_successes {
            auth = auth.audit_successes();
        }
        let addr = serve_logged(verifier, auth).await;
        let params = format!(
            ";created={};keyid=\"{key_id}\";nonce=\"{}\"",
            now(),
            nonce()
        );
        let w = Wire::new("GET", "/v1/jobs", b"")
            .header("x-job", "1")
            .header("x-request-id", &format!("{key_id}-req"))
            .signed(GET_COMPONENTS, &params, SECRET);
        let r = send(addr, &w).await;
        assert_eq!(r.status, 200, "{r:?}");

        // The access event is emitted when the response head is ready.
        let mut events = Vec::new();
        for _ in 0..100 {
            events = capture.events_with(key_id);
            if events.iter().any(|e| e["target"] == "portcullis::access") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let access: Vec<_> = events
            .iter()
            .filter(|e| e["target"] == "portcullis::access")
            .collect();
        assert_eq!(access.len(), 1, "{events:?}");
        let f = &access[0]["fields"];
        assert_eq!(f["principal"], key_id);
        assert_eq!(f["auth_method"], "http_signature");
        assert_eq!(f["status"], 200);
        let audit: Vec<_> = events
            .iter()
            .filter(|e| e["target"] == "portcullis::audit")
            .map(|e| (&e["fields"]["event"], &e["fields"]["method"]))
            .collect();
        if audit_successes {
            assert_eq!(audit.len(), 1, "{events:?}");
            assert_eq!(audit[0].0, "auth_succeeded");
            assert_eq!(audit[0].1, "http_signature");
        } else {
            assert!(audit.is_empty(), "{events:?}");
        }
    }
}

/// A request whose signature verifies but which the authentication layer inside
/// refuses (it carries an API key too: `multiple_credentials`) is logged with the
/// refusal and without the signing key as its principal: the access event never
/// names a principal whose request was refused at authentication.
#[cfg(feature = "access-log")]
#[tokio::test]
async fn a_signed_request_refused_inside_names_no_principal() {
    let capture = log_capture::capture();
    let key_id = "sig-refused-inside";
    let verifier = SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256(key_id, SECRET).unwrap())
        .build()
        .unwrap();
    let key = generate_key("pc_test").unwrap();
    let store =
        KeyStore::from_records([KeyRecord::new("api-key-client", key.digest()).unwrap()]).unwrap();
    let auth = AuthenticateLayer::api_keys(ApiKeys::new(store));
    let addr = serve_logged(verifier, auth).await;
    let params = format!(
        ";created={};keyid=\"{key_id}\";nonce=\"{}\"",
        now(),
        nonce()
    );
    let w = Wire::new("GET", "/v1/jobs", b"")
        .header("x-job", "1")
        .header("x-api-key", key.expose_secret())
        .header("x-request-id", &format!("{key_id}-req"))
        .signed(GET_COMPONENTS, &params, SECRET);
    let r = send(addr, &w).await;
    assert_eq!(r.status, 400, "{r:?}");
    let mut access = Vec::new();
    for _ in 0..100 {
        access = capture
            .events_with(&format!("{key_id}-req"))
            .into_iter()
            .filter(|e| e["target"] == "portcullis::access")
            .collect();
        if !access.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(access.len(), 1, "{access:?}");
    let f = &access[0]["fields"];
    assert_eq!(f["status"], 400);
    assert_eq!(f["denial_reason"], "multiple_credentials");
    assert!(f.get("principal").is_none(), "{f}");
    assert!(f.get("auth_method").is_none(), "{f}");
}
