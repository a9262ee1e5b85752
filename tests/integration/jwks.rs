//! Keys from a URL: a `TokenVerifier` trusting issuers whose keys a local identity
//! provider serves over TCP with TLS (a throwaway CA made with `openssl`). The
//! provider counts the requests it saw and can be told to fail in every way a real
//! one can: error statuses, slowness, oversize bodies, wrong content, a discovery
//! document naming another issuer, a redirect to another origin.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::EncodingKey;
use portcullis::authenticate::AuthenticateLayer;
use portcullis::jwt::{
    Algorithm, GOOGLE_ISSUER, PrincipalClaim, RemoteIssuer, RemoteStart, SigningKey, TokenIssuer,
    TokenRejection, TokenVerifier,
};
use serde_json::{Value, json};

use crate::common::{self, Peer};
use crate::log_capture;

const EC_KEY: &[u8] = include_bytes!("../data/jwt/ec.key.pem");
const EC2_KEY: &[u8] = include_bytes!("../data/jwt/ec2.key.pem");
const RSA_KEY: &[u8] = include_bytes!("../data/jwt/rsa.key.pem");
const JWKS: &str = include_str!("../data/jwt/jwks.json");
const JWKS_ROTATED: &str = include_str!("../data/jwt/jwks-rotated.json");
const AUD: &str = "jobs-api";

/// The JWK with `kid` from the committed test sets.
fn jwk(kid: &str) -> Value {
    [JWKS, JWKS_ROTATED]
        .iter()
        .flat_map(|s| {
            serde_json::from_str::<Value>(s).unwrap()["keys"]
                .as_array()
                .unwrap()
                .clone()
        })
        .find(|k| k["kid"] == kid)
        .unwrap()
}

fn jwks(kids: &[&str]) -> String {
    json!({ "keys": kids.iter().map(|k| jwk(k)).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token from `iss` signed by the EC key `kid` (`ec-1` or `ec-2`).
fn token(iss: &str, kid: &str) -> String {
    let pem = if kid == "ec-2" { EC2_KEY } else { EC_KEY };
    TokenIssuer::builder(
        SigningKey::from_pem(Algorithm::ES256, pem)
            .unwrap()
            .kid(kid),
    )
    .issuer(iss)
    .subject("scheduler")
    .audience(AUD)
    .scope("jobs:write")
    .build()
    .unwrap()
    .mint()
    .unwrap()
    .as_str()
    .to_owned()
}

/// A token with any header and claims, signed with `key`.
fn sign(header: &Value, claims: &Value, key: &EncodingKey, alg: jsonwebtoken::Algorithm) -> String {
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

/// Polls `f` every 20 ms until it is true, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- certificates

/// A throwaway CA (`ca.crt`), a server certificate it signs for `localhost`
/// (`server.crt`, `server.key`), made with the `openssl` command once per run.
fn certs() -> &'static PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-jwks-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").unwrap();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let steps = [
            (
                format!("req -x509 {ec} -keyout ca.key -out ca.crt -days 2"),
                Some("/CN=portcullis jwks test CA"),
            ),
            (
                format!("req {ec} -keyout server.key -out server.csr"),
                Some("/CN=localhost"),
            ),
            (
                "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
                 -out server.crt -days 2 -extfile ext"
                    .to_owned(),
                None,
            ),
            (
                format!("req -x509 {ec} -keyout other-ca.key -out other-ca.crt -days 2"),
                Some("/CN=portcullis unrelated CA"),
            ),
        ];
        for (args, subject) in steps {
            let ok = Command::new("openssl")
                .args(args.split_whitespace())
                .args(subject.into_iter().flat_map(|s| ["-subj", s]))
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "openssl could not make the test certificates (openssl {args})"
            );
        }
        dir
    })
}

fn ca() -> Vec<u8> {
    std::fs::read(certs().join("ca.crt")).unwrap()
}

// ---------------------------------------------------------------- the provider

/// How the provider answers.
#[derive(Clone, Debug)]
enum Mode {
    Normal,
    Status(u16),
    Slow(Duration),
    Oversize,
    NotJson,
    BadJson,
    Redirect(String),
}

struct Behaviour {
    jwks: String,
    jwks_type: &'static str,
    cache_control: Option<String>,
    /// Applies to the JWK Set.
    mode: Mode,
    /// The `issuer` the discovery document names, when not the provider's own.
    discovery_issuer: Option<String>,
}

/// An OpenID Connect provider on `https://localhost:<port>`: the discovery document
/// at `/.well-known/openid-configuration`, the JWK Set at `/keys`.
struct Provider {
    issuer: String,
    behaviour: Arc<Mutex<Behaviour>>,
    jwks_hits: Arc<AtomicUsize>,
    discovery_hits: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        // Also from inside an async test.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Provider {
    fn start(kids: &[&str]) -> Self {
        Self::start_on(StdListener::bind("127.0.0.1:0").unwrap(), kids)
    }

    fn start_on(listener: StdListener, kids: &[&str]) -> Self {
        let addr: SocketAddr = listener.local_addr().unwrap();
        let issuer = format!("https://localhost:{}", addr.port());
        let behaviour = Arc::new(Mutex::new(Behaviour {
            jwks: jwks(kids),
            jwks_type: "application/jwk-set+json",
            cache_control: None,
            mode: Mode::Normal,
            discovery_issuer: None,
        }));
        let jwks_hits = Arc::new(AtomicUsize::new(0));
        let discovery_hits = Arc::new(AtomicUsize::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let acceptor = tls_acceptor();
        let (b, jh, dh, iss) = (
            behaviour.clone(),
            jwks_hits.clone(),
            discovery_hits.clone(),
            issuer.clone(),
        );
        listener.set_nonblocking(true).unwrap();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, b, jh, dh, iss) = (
                    acceptor.clone(),
                    b.clone(),
                    jh.clone(),
                    dh.clone(),
                    iss.clone(),
                );
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (b, jh, dh, iss) = (b.clone(), jh.clone(), dh.clone(), iss.clone());
                        async move { Ok::<_, Infallible>(answer(&req, &b, &jh, &dh, &iss).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Provider {
            issuer,
            behaviour,
            jwks_hits,
            discovery_hits,
            rt: Some(rt),
        }
    }

    fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }

    fn jwks_hits(&self) -> usize {
        self.jwks_hits.load(Ordering::SeqCst)
    }

    fn jwks_url(&self) -> String {
        format!("{}/keys", self.issuer)
    }

    /// A remote issuer of this provider through discovery, trusting the test CA.
    fn discover(&self) -> RemoteIssuer {
        RemoteIssuer::discover(&self.issuer)
            .audience(AUD)
            .tls_root_certificates(&ca())
    }
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = certs();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    #[allow(deprecated)] // ring, as the client uses
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn answer(
    req: &Request<Incoming>,
    b: &Mutex<Behaviour>,
    jwks_hits: &AtomicUsize,
    discovery_hits: &AtomicUsize,
    issuer: &str,
) -> Response<Full<Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match req.uri().path() {
        "/.well-known/openid-configuration" => {
            discovery_hits.fetch_add(1, Ordering::SeqCst);
            let named = b.lock().unwrap().discovery_issuer.clone();
            // Shaped like a Kubernetes API server's document.
            let doc = json!({
                "issuer": named.as_deref().unwrap_or(issuer),
                "jwks_uri": format!("{issuer}/keys"),
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            });
            reply(200, "application/json", doc.to_string())
        }
        "/keys" => {
            jwks_hits.fetch_add(1, Ordering::SeqCst);
            let (mode, body, ctype, cache) = {
                let b = b.lock().unwrap();
                (
                    b.mode.clone(),
                    b.jwks.clone(),
                    b.jwks_type,
                    b.cache_control.clone(),
                )
            };
            match mode {
                Mode::Normal => {
                    let mut r = reply(200, ctype, body);
                    if let Some(c) = cache {
                        r.headers_mut().insert("cache-control", c.parse().unwrap());
                    }
                    r
                }
                Mode::Status(s) => reply(s, "text/plain", "unavailable".into()),
                Mode::Slow(d) => {
                    tokio::time::sleep(d).await;
                    reply(200, ctype, body)
                }
                Mode::Oversize => reply(200, ctype, format!("{body}{}", " ".repeat(300 * 1024))),
                Mode::NotJson => reply(200, "text/html", body),
                Mode::BadJson => reply(200, ctype, "{\"keys\": [".into()),
                Mode::Redirect(to) => Response::builder()
                    .status(302)
                    .header("location", to)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            }
        }
        _ => reply(404, "text/plain", String::new()),
    }
}

/// Fast settings for tests: short timeouts, a 300 ms refetch interval.
fn fast(r: RemoteIssuer) -> RemoteIssuer {
    r.timeouts(Duration::from_millis(500), Duration::from_millis(800))
        .refetch_interval(Duration::from_millis(300))
}

fn verifier(r: RemoteIssuer) -> TokenVerifier {
    TokenVerifier::builder().remote_issuer(r).build().unwrap()
}

// ---------------------------------------------------------------- tests

#[test]
fn discovery_finds_the_keys_and_tokens_verify_over_tls() {
    let p = Provider::start(&["ec-1"]);
    let v = verifier(p.discover());
    assert_eq!(p.discovery_hits.load(Ordering::SeqCst), 1);
    assert_eq!(p.jwks_hits(), 1, "the first fetch happened during build()");
    let t = v.verify_token(&token(&p.issuer, "ec-1")).unwrap();
    assert_eq!(t.principal().id(), "scheduler");
    assert!(t.principal().scopes().contains("jobs:write"));
    assert_eq!(t.issuer(), p.issuer);
    // Another issuer: refused before any key is tried.
    assert_eq!(
        v.verify(&token("https://evil.example", "ec-1"))
            .unwrap_err(),
        TokenRejection::WrongIssuer
    );
    // Another audience.
    let other_aud = TokenIssuer::builder(
        SigningKey::from_pem(Algorithm::ES256, EC_KEY)
            .unwrap()
            .kid("ec-1"),
    )
    .issuer(&p.issuer)
    .subject("scheduler")
    .audience("other-api")
    .build()
    .unwrap()
    .mint()
    .unwrap();
    assert_eq!(
        v.verify(other_aud.as_str()).unwrap_err(),
        TokenRejection::WrongAudience
    );
    // Verifying never touched the network.
    for _ in 0..50 {
        v.verify(&token(&p.issuer, "ec-1")).unwrap();
    }
    assert_eq!(p.jwks_hits(), 1);
    assert_eq!(p.discovery_hits.load(Ordering::SeqCst), 1);
}

#[test]
fn a_server_with_a_certificate_of_another_ca_is_not_trusted() {
    let p = Provider::start(&["ec-1"]);
    let other = std::fs::read(certs().join("other-ca.crt")).unwrap();
    let e = TokenVerifier::builder()
        .remote_issuer(fast(
            RemoteIssuer::discover(&p.issuer)
                .audience(AUD)
                .tls_root_certificates(&other),
        ))
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("TLS"), "{e}");
    assert_eq!(p.discovery_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authenticate_layer_accepts_tokens_of_the_remote_issuer_over_tcp() {
    let p = Provider::start(&["ec-1"]);
    let r = p.discover();
    let v = tokio::task::spawn_blocking(move || verifier(r))
        .await
        .unwrap();
    let auth = AuthenticateLayer::service_tokens(v).realm("jobs").unwrap();
    let addr = common::serve("127.0.0.1:0", auth, Peer::Attached).await;
    let good = format!("Authorization: Bearer {}", token(&p.issuer, "ec-1"));
    assert_eq!(common::get(addr, &[good.as_bytes()]).await.status, 200);
    let bad = format!("Authorization: Bearer {}", token(&p.issuer, "ec-2"));
    assert_eq!(common::get(addr, &[bad.as_bytes()]).await.status, 401);
}

#[test]
fn rotation_adds_keys_on_an_unknown_kid_and_a_removed_key_stops_at_once() {
    let p = Provider::start(&["ec-1"]);
    let v = verifier(
        fast(p.discover()).refresh_bounds(Duration::from_millis(300), Duration::from_millis(300)),
    );
    let old = token(&p.issuer, "ec-1");
    let new = token(&p.issuer, "ec-2");
    v.verify(&old).unwrap();
    assert_eq!(v.verify(&new).unwrap_err(), TokenRejection::UnknownKey);
    // The provider publishes the new key beside the old one.
    p.set(|b| b.jwks = jwks(&["ec-1", "ec-2"]));
    eventually(Duration::from_secs(5), "the new key is fetched", || {
        v.verify(&new).is_ok()
    });
    v.verify(&old).unwrap();
    assert!(v.cached_tokens() >= 1);
    // Then retires the old one: the next fetch removes it, cached tokens included.
    p.set(|b| b.jwks = jwks(&["ec-2"]));
    eventually(Duration::from_secs(5), "the old key is removed", || {
        v.verify(&old).is_err()
    });
    assert_eq!(v.verify(&old).unwrap_err(), TokenRejection::UnknownKey);
    v.verify(&new).unwrap();
    let events = log_capture::capture().events_with(&p.issuer);
    assert!(
        events
            .iter()
            .filter(|e| e["fields"]["event"] == "remote_keys_updated")
            .count()
            >= 3,
        "{events:?}"
    );
}

#[test]
fn a_flood_of_unknown_kids_costs_at_most_one_fetch_per_interval() {
    let p = Provider::start(&["ec-1"]);
    let interval = Duration::from_millis(500);
    let v = verifier(p.discover().refetch_interval(interval));
    assert_eq!(p.jwks_hits(), 1);
    // The key is looked up before the signature is checked: these need none.
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let claims =
        b64(&json!({"iss": p.issuer, "sub": "x", "aud": AUD, "iat": now(), "exp": now() + 60}));
    let start = Instant::now();
    let mut n = 0u64;
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (v, claims) = (v.clone(), claims.clone());
            std::thread::spawn(move || {
                let mut sent = 0u64;
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(1600) {
                    let kid = format!("random-{t}-{sent}");
                    let tok = format!(
                        "{}.{claims}.c2ln",
                        b64(&json!({"alg": "ES256", "kid": kid}))
                    );
                    assert_eq!(v.verify(&tok).unwrap_err(), TokenRejection::UnknownKey);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    for t in threads {
        n += t.join().unwrap();
    }
    let elapsed = start.elapsed();
    std::thread::sleep(interval + Duration::from_millis(300));
    let hits = p.jwks_hits();
    // The start-up fetch, then at most one per interval of the flood, plus one
    // asked for at its very end.
    let bound = 1 + elapsed.as_millis().div_ceil(interval.as_millis()) as usize + 1;
    assert!(n > 100, "the flood sent {n} tokens");
    assert!(hits >= 2, "the flood caused a refetch ({hits})");
    assert!(
        hits <= bound,
        "{n} random kids over {elapsed:?} caused {hits} fetches (bound {bound})"
    );
    assert_eq!(p.discovery_hits.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_or_invalid_fetch_keeps_the_last_good_keys() {
    type Break = Box<dyn Fn(&mut Behaviour)>;
    let cases: Vec<(&str, Break)> = vec![
        ("status", Box::new(|b| b.mode = Mode::Status(503))),
        (
            "timeout",
            Box::new(|b| b.mode = Mode::Slow(Duration::from_secs(3))),
        ),
        ("too_large", Box::new(|b| b.mode = Mode::Oversize)),
        ("content_type", Box::new(|b| b.mode = Mode::NotJson)),
        ("invalid_document", Box::new(|b| b.mode = Mode::BadJson)),
        (
            "redirect",
            Box::new(|b| b.mode = Mode::Redirect("https://attacker.example/keys".into())),
        ),
        (
            "invalid_document",
            Box::new(|b| b.jwks = r#"{"keys":[]}"#.into()),
        ),
        (
            "invalid_document",
            Box::new(|b| {
                let mut enc = jwk("ec-2");
                enc["use"] = json!("enc");
                b.jwks = json!({"keys": [jwk("ec-1"), enc]}).to_string();
            }),
        ),
        (
            "invalid_document",
            Box::new(|b| {
                let mut no_alg = jwk("rsa-1");
                no_alg.as_object_mut().unwrap().remove("alg");
                b.jwks = json!({"keys": [jwk("ec-1"), no_alg]}).to_string();
            }),
        ),
    ];
    for (class, break_it) in cases {
        let p = Provider::start(&["ec-1"]);
        let v = verifier(fast(p.discover()).max_response_len(64 * 1024));
        let good = token(&p.issuer, "ec-1");
        v.verify(&good).unwrap();
        let generation = v.key_generation();
        p.set(|b| break_it(b));
        // An unknown kid asks for a refetch.
        let _ = v.verify(&token(&p.issuer, "ec-2"));
        eventually(Duration::from_secs(6), class, || {
            log_capture::capture()
                .events_with(&p.issuer)
                .iter()
                .any(|e| e["fields"]["event"] == "remote_keys_fetch_failed")
        });
        let failed: Vec<Value> = log_capture::capture()
            .events_with(&p.issuer)
            .into_iter()
            .filter(|e| e["fields"]["event"] == "remote_keys_fetch_failed")
            .collect();
        assert_eq!(failed[0]["fields"]["error"], class, "{failed:?}");
        assert_eq!(v.key_generation(), generation, "{class}: keys unchanged");
        v.verify(&good)
            .unwrap_or_else(|e| panic!("{class}: the last good keys stay: {e}"));
        assert_eq!(
            v.verify(&token(&p.issuer, "ec-2")).unwrap_err(),
            TokenRejection::UnknownKey
        );
    }
}

#[test]
fn past_the_maximum_staleness_the_issuers_tokens_are_refused_until_a_fetch_succeeds() {
    let p = Provider::start(&["ec-1"]);
    let v = verifier(
        fast(p.discover())
            .refresh_bounds(Duration::from_millis(200), Duration::from_millis(400))
            .max_staleness(Duration::from_secs(2)),
    );
    let good = token(&p.issuer, "ec-1");
    v.verify(&good).unwrap();
    let broke_at = Instant::now();
    p.set(|b| b.mode = Mode::Status(500));
    eventually(Duration::from_secs(6), "the keys go stale", || {
        v.verify(&good).is_err()
    });
    // Kept from the last good fetch (at most the 400 ms refresh interval before the
    // break) for the 2 s maximum, counted in whole seconds of Unix time (ending up
    // to 1 s early, never late): at least 600 ms after the break.
    assert!(
        broke_at.elapsed() >= Duration::from_millis(600),
        "the last good keys were kept for a while ({:?})",
        broke_at.elapsed()
    );
    assert_eq!(
        v.verify(&good).unwrap_err(),
        TokenRejection::KeysUnavailable
    );
    eventually(
        Duration::from_secs(3),
        "the expiry is in the audit log",
        || {
            log_capture::capture()
                .events_with(&p.issuer)
                .iter()
                .any(|e| e["fields"]["event"] == "remote_keys_expired")
        },
    );
    p.set(|b| b.mode = Mode::Normal);
    eventually(
        Duration::from_secs(5),
        "a good fetch restores the keys",
        || v.verify(&good).is_ok(),
    );
}

#[test]
fn start_up_with_the_provider_down_fails_fast_or_starts_empty() {
    // A port with nobody listening.
    let reserved = StdListener::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap().port();
    drop(reserved);
    let issuer = format!("https://localhost:{port}");
    let remote = || {
        fast(
            RemoteIssuer::discover(&issuer)
                .audience(AUD)
                .tls_root_certificates(&ca()),
        )
    };
    let start = Instant::now();
    let e = TokenVerifier::builder()
        .remote_issuer(remote())
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("first key fetch failed"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5));

    let v = TokenVerifier::builder()
        .remote_issuer(remote().start(RemoteStart::StartEmpty))
        .build()
        .unwrap();
    let good = token(&issuer, "ec-1");
    assert_eq!(
        v.verify(&good).unwrap_err(),
        TokenRejection::KeysUnavailable
    );
    // The provider comes up on that port: the retries find it.
    let p = Provider::start_on(StdListener::bind(("127.0.0.1", port)).unwrap(), &["ec-1"]);
    eventually(Duration::from_secs(5), "the first fetch succeeds", || {
        v.verify(&good).is_ok()
    });
    assert_eq!(p.issuer, issuer);
}

#[test]
fn a_discovery_document_for_another_issuer_is_refused() {
    let p = Provider::start(&["ec-1"]);
    p.set(|b| b.discovery_issuer = Some("https://evil.example".into()));
    let e = TokenVerifier::builder()
        .remote_issuer(fast(p.discover()))
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("not the configured issuer"), "{e}");
    assert_eq!(p.jwks_hits(), 0, "no key was fetched");
}

#[test]
fn a_max_age_sets_the_refresh_within_its_bounds() {
    let p = Provider::start(&["ec-1"]);
    p.set(|b| b.cache_control = Some("public, max-age=0".into()));
    let _v = verifier(
        p.discover()
            .refresh_bounds(Duration::from_millis(400), Duration::from_millis(400)),
    );
    // max-age=0 is clamped up to 400 ms: about 5 fetches in 2 s, not hundreds.
    std::thread::sleep(Duration::from_millis(2000));
    let hits = p.jwks_hits();
    assert!((3..=7).contains(&hits), "{hits} fetches");
}

// ---------------------------------------------------------------- presets

/// Google's JWK Set as served by `https://www.googleapis.com/oauth2/v3/certs`: RSA
/// keys with `alg`, `use`, `kid`, served as JSON with a long `max-age`.
fn google_provider() -> Provider {
    let p = Provider::start(&["rsa-1"]);
    let mut key = jwk("rsa-1");
    key["kid"] = json!("6f7254101f56e41cf35c9926de84a2d552b4c6f1");
    p.set(|b| {
        b.jwks = json!({"keys": [key]}).to_string();
        b.jwks_type = "application/json; charset=UTF-8";
        b.cache_control = Some("public, max-age=19845, must-revalidate, no-transform".into());
    });
    p
}

/// An ID token shaped like one from the GCE metadata server for a service account.
fn google_token(aud: &str, iss: &str, email: &str, verified: Value) -> String {
    let iat = now();
    let mut claims = json!({
        "aud": aud,
        "azp": "113774264463038321964",
        "email": email,
        "email_verified": verified,
        "exp": iat + 3600,
        "iat": iat,
        "iss": iss,
        "sub": "113774264463038321964",
    });
    if verified.is_null() {
        claims.as_object_mut().unwrap().remove("email_verified");
    }
    sign(
        &json!({"alg": "RS256", "kid": "6f7254101f56e41cf35c9926de84a2d552b4c6f1", "typ": "JWT"}),
        &claims,
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        jsonwebtoken::Algorithm::RS256,
    )
}

#[test]
fn google_id_tokens_pass_through_the_preset() {
    let p = google_provider();
    let aud = "https://jobs.internal.example";
    let sa = "scheduler@my-project.iam.gserviceaccount.com";
    let v = TokenVerifier::builder()
        .remote_issuer(
            RemoteIssuer::google(aud)
                .jwks_url(p.jwks_url())
                .tls_root_certificates(&ca())
                .scopes_for(sa, "jobs:write")
                .unwrap(),
        )
        .build()
        .unwrap();
    let t = v
        .verify_token(&google_token(aud, GOOGLE_ISSUER, sa, json!(true)))
        .unwrap();
    assert_eq!(t.principal().id(), sa);
    assert!(t.principal().scopes().contains("jobs:write"));
    for (token, want) in [
        (
            google_token("https://other.example", GOOGLE_ISSUER, sa, json!(true)),
            TokenRejection::WrongAudience,
        ),
        (
            google_token(aud, GOOGLE_ISSUER, sa, json!(false)),
            TokenRejection::EmailNotVerified,
        ),
        (
            google_token(aud, GOOGLE_ISSUER, sa, Value::Null),
            TokenRejection::EmailNotVerified,
        ),
        (
            google_token(aud, GOOGLE_ISSUER, sa, json!("true")),
            TokenRejection::InvalidClaims,
        ),
        (
            google_token(aud, "accounts.google.example", sa, json!(true)),
            TokenRejection::WrongIssuer,
        ),
        (
            google_token(
                aud,
                GOOGLE_ISSUER,
                "intruder@other-project.iam.gserviceaccount.com",
                json!(true),
            ),
            TokenRejection::SubjectNotAllowed,
        ),
    ] {
        assert_eq!(v.verify(&token).unwrap_err(), want);
    }
    // Without a list of callers, the preset does not build.
    let e = TokenVerifier::builder()
        .remote_issuer(RemoteIssuer::google(aud).jwks_url(p.jwks_url()))
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("scopes_for"), "{e}");
}

/// A projected service-account token as the kubelet mounts it.
fn kubernetes_token(iss: &str, aud: &str, lifetime: i64) -> String {
    let iat = now();
    sign(
        &json!({"alg": "RS256", "kid": "rsa-1"}),
        &json!({
            "aud": [aud],
            "exp": iat + lifetime,
            "iat": iat,
            "iss": iss,
            "jti": "4d2a1d0e-7c1b-4a53-9f0e-2b8f3f6c2a11",
            "kubernetes.io": {
                "namespace": "batch",
                "node": {"name": "node-1", "uid": "0b0c3a8e-5f4b-4c7e-9f65-a6a2b5c2f0a1"},
                "pod": {"name": "scheduler-7d9f8b6c5-x2k4q", "uid": "9a3e1f2c-4b5d-4e6f-8a7b-1c2d3e4f5a6b"},
                "serviceaccount": {"name": "scheduler", "uid": "5c6d7e8f-9a0b-4c1d-8e2f-3a4b5c6d7e8f"},
                "warnafter": iat + 3600,
            },
            "nbf": iat,
            "sub": "system:serviceaccount:batch:scheduler",
        }),
        &EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        jsonwebtoken::Algorithm::RS256,
    )
}

#[test]
fn kubernetes_service_account_tokens_pass_through_the_preset() {
    let p = Provider::start(&["rsa-1"]);
    let v = TokenVerifier::builder()
        .remote_issuer(RemoteIssuer::kubernetes(&p.issuer, AUD).tls_root_certificates(&ca()))
        .allowed_subjects(["system:serviceaccount:batch:scheduler"])
        .build()
        .unwrap();
    assert_eq!(p.discovery_hits.load(Ordering::SeqCst), 1);
    // The kubelet's default lifetime, 3607 s.
    let t = v
        .verify_token(&kubernetes_token(&p.issuer, AUD, 3607))
        .unwrap();
    assert_eq!(t.principal().id(), "system:serviceaccount:batch:scheduler");
    assert!(t.principal().scopes().is_empty());
    assert_eq!(
        v.verify(&kubernetes_token(
            &p.issuer,
            "https://kubernetes.default.svc",
            3607
        ))
        .unwrap_err(),
        TokenRejection::WrongAudience
    );
    assert_eq!(
        v.verify(&kubernetes_token(
            "https://other-cluster.example",
            AUD,
            3607
        ))
        .unwrap_err(),
        TokenRejection::WrongIssuer
    );
    assert_eq!(
        v.verify(&kubernetes_token(&p.issuer, AUD, 3 * 3600))
            .unwrap_err(),
        TokenRejection::LifetimeTooLong
    );
}

#[test]
fn several_issuers_each_with_their_own_keys_audiences_and_mapping() {
    let a = Provider::start(&["ec-1"]);
    let b = Provider::start(&["ec-2"]);
    let v = TokenVerifier::builder()
        .remote_issuer(a.discover())
        .remote_issuer(
            RemoteIssuer::discover(&b.issuer)
                .audience(AUD)
                .tls_root_certificates(&ca())
                .principal_claim(PrincipalClaim::Subject)
                .scopes_for("scheduler", "jobs:read")
                .unwrap(),
        )
        .build()
        .unwrap();
    let ta = v.verify_token(&token(&a.issuer, "ec-1")).unwrap();
    assert!(ta.principal().scopes().contains("jobs:write"));
    let tb = v.verify_token(&token(&b.issuer, "ec-2")).unwrap();
    assert!(tb.principal().scopes().contains("jobs:read"));
    assert!(
        !tb.principal().scopes().contains("jobs:write"),
        "b maps its scopes"
    );
    // A key of one issuer does not verify the other's tokens.
    assert_eq!(
        v.verify(&token(&a.issuer, "ec-2")).unwrap_err(),
        TokenRejection::UnknownKey
    );
    assert_eq!(
        v.verify(&token(&b.issuer, "ec-1")).unwrap_err(),
        TokenRejection::UnknownKey
    );
}

#[test]
fn configuration_errors_are_reported_at_build() {
    let build = |r: RemoteIssuer| {
        TokenVerifier::builder()
            .remote_issuer(r.start(RemoteStart::StartEmpty))
            .build()
            .unwrap_err()
            .to_string()
    };
    let iss = "https://issuer.example";
    for (r, want) in [
        (
            RemoteIssuer::discover("http://issuer.example").audience(AUD),
            "https://",
        ),
        (
            RemoteIssuer::discover("http://127.0.0.1:1").audience(AUD),
            "https://",
        ),
        (
            RemoteIssuer::jwks(iss, "http://issuer.example/keys").audience(AUD),
            "JWKS URL",
        ),
        (RemoteIssuer::discover(iss), "audience"),
        (
            RemoteIssuer::discover(iss)
                .audience(AUD)
                .max_staleness(Duration::from_secs(60)),
            "max_staleness",
        ),
        (
            RemoteIssuer::discover(iss)
                .audience(AUD)
                .timeouts(Duration::from_secs(5), Duration::from_secs(1)),
            "timeouts",
        ),
        (
            RemoteIssuer::discover(iss)
                .audience(AUD)
                .tls_root_certificates(b"not a certificate"),
            "root certificate",
        ),
    ] {
        let e = build(r);
        assert!(e.contains(want), "{e} (want {want})");
    }
    assert!(
        RemoteIssuer::discover(iss)
            .scopes_for("a", "bad\"scope")
            .is_err()
    );
    let e = TokenVerifier::builder()
        .issuer(iss)
        .audience(AUD)
        .key(portcullis::jwt::VerifyingKey::hs256(&[1; 32]).unwrap())
        .remote_issuer(RemoteIssuer::discover(iss).audience(AUD))
        .build()
        .unwrap_err()
        .to_string();
    assert!(e.contains("configured twice"), "{e}");
    // Plain HTTP to a loopback host needs the dangerous switch, and works with it.
    let ok = TokenVerifier::builder()
        .remote_issuer(
            RemoteIssuer::discover("http://127.0.0.1:1")
                .audience(AUD)
                .allow_plain_http_to_loopback_dangerously()
                .start(RemoteStart::StartEmpty),
        )
        .build();
    assert!(ok.is_ok());
}

/// The stack from the environment, trusting the provider by discovery: the
/// variables accept issuer URLs and a roots file, and a token passes the stack.
#[cfg(feature = "stack")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_from_the_environment_trusts_a_discovery_issuer() {
    use portcullis::stack::StackBuilder;
    let p = Provider::start(&["ec-1"]);
    let (issuer, roots) = (p.issuer.clone(), certs().join("ca.crt"));
    let stack = tokio::task::spawn_blocking(move || {
        let env = |name: &str| match name {
            "PORTCULLIS_OIDC_ISSUERS" => Some(issuer.clone()),
            "PORTCULLIS_OIDC_ROOTS_FILE" => Some(roots.display().to_string()),
            "PORTCULLIS_TOKEN_AUDIENCE" => Some(AUD.to_owned()),
            _ => None,
        };
        StackBuilder::from_env_with(env).and_then(StackBuilder::build)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(p.jwks_hits(), 1, "the build waited for the first fetch");
    let addr = common::serve("127.0.0.1:0", stack, Peer::Attached).await;
    let good = format!("Authorization: Bearer {}", token(&p.issuer, "ec-1"));
    assert_eq!(common::get(addr, &[good.as_bytes()]).await.status, 200);
    let other = format!(
        "Authorization: Bearer {}",
        token("https://ci.example", "ec-1")
    );
    assert_eq!(common::get(addr, &[other.as_bytes()]).await.status, 401);

    // Down at start-up: `wait` (the default) fails naming the variable.
    let reserved = StdListener::bind("127.0.0.1:0").unwrap();
    let down = format!(
        "https://localhost:{}",
        reserved.local_addr().unwrap().port()
    );
    drop(reserved);
    let roots = certs().join("ca.crt");
    let e = tokio::task::spawn_blocking(move || {
        let env = |name: &str| match name {
            "PORTCULLIS_OIDC_ISSUERS" => Some(down.clone()),
            "PORTCULLIS_OIDC_ROOTS_FILE" => Some(roots.display().to_string()),
            "PORTCULLIS_TOKEN_AUDIENCE" => Some(AUD.to_owned()),
            _ => None,
        };
        StackBuilder::from_env_with(env).map(drop)
    })
    .await
    .unwrap()
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("PORTCULLIS_OIDC_ISSUERS"), "{e}");
}

/// For an issuer that maps principals by verified email, the access event names
/// the principal by its email and the token by its own `sub`, `jti` and `kid`.
#[cfg(feature = "access-log")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_event_of_an_email_mapped_token_carries_its_own_sub() {
    use portcullis::access_log::AccessLogLayer;
    use portcullis::request_id::RequestIdLayer;
    use tower::ServiceBuilder;

    let capture = log_capture::capture();
    let p = google_provider();
    let aud = "https://jobs.internal.example";
    let sa = "access-mapped@my-project.iam.gserviceaccount.com";
    let jwks_url = p.jwks_url();
    let v = tokio::task::spawn_blocking(move || {
        TokenVerifier::builder()
            .remote_issuer(
                RemoteIssuer::google(aud)
                    .jwks_url(jwks_url)
                    .tls_root_certificates(&ca())
                    .scopes_for(sa, "jobs:write")
                    .unwrap(),
            )
            .build()
            .unwrap()
    })
    .await
    .unwrap();
    let layer = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new())
        .layer(AuthenticateLayer::service_tokens(v))
        .into_inner();
    let addr = common::serve("127.0.0.1:0", layer, Peer::Attached).await;
    let good = format!(
        "Authorization: Bearer {}",
        google_token(aud, GOOGLE_ISSUER, sa, json!(true))
    );
    assert_eq!(common::get(addr, &[good.as_bytes()]).await.status, 200);
    let mut access = Vec::new();
    for _ in 0..100 {
        access = capture
            .events_with(sa)
            .into_iter()
            .filter(|e| e["target"] == "portcullis::access")
            .collect();
        if !access.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(access.len(), 1, "{access:?}");
    let f = &access[0]["fields"];
    assert_eq!(f["principal"], sa);
    assert_eq!(f["auth_method"], "service_token");
    assert_eq!(f["sub"], "113774264463038321964");
    assert_eq!(f["kid"], "6f7254101f56e41cf35c9926de84a2d552b4c6f1");
    assert!(f.get("jti").is_none(), "{f}");
    // Without the opt-in, no success audit event names the principal.
    assert!(
        capture
            .events_with(sa)
            .iter()
            .all(|e| e["target"] != "portcullis::audit"),
        "{access:?}"
    );
}
