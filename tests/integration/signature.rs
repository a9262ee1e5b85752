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
        if !self.body.is_empty() {
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
