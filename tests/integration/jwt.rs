//! Service tokens over real TCP: `AuthenticateLayer::service_tokens` in front of a
//! hyper server, every bad input of the threat model, the happy path per algorithm,
//! the client-side `BearerTokenLayer` across a re-mint, and the cache emptied on a
//! key change (key-file reload: `reload.rs`).

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::EncodingKey;
use portcullis::Principal;
use portcullis::authenticate::AuthenticateLayer;
use portcullis::jwt::{
    Algorithm, BearerTokenError, BearerTokenLayer, KeySet, SigningKey, TokenIssuer, TokenRejection,
    TokenVerifier, VerifyingKey,
};
use portcullis::scope::RequireScopeLayer;
use serde_json::json;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::common::{self, Handler, Peer};
use crate::log_capture;

const EC_KEY: &[u8] = include_bytes!("../data/jwt/ec.key.pem");
const EC_PUB: &[u8] = include_bytes!("../data/jwt/ec.pub.pem");
const ED_KEY: &[u8] = include_bytes!("../data/jwt/ed.key.pem");
const RSA_KEY: &[u8] = include_bytes!("../data/jwt/rsa.key.pem");
const RSA_PUB: &[u8] = include_bytes!("../data/jwt/rsa.pub.pem");
const JWKS: &str = include_str!("../data/jwt/jwks.json");

const SECRET: [u8; 32] = *b"integration-test-secret-32-bytes";
const ISS: &str = "https://ci.example";
const AUD: &str = "jobs-api";
const CHALLENGE: &str = r#"Bearer realm="jobs", error="invalid_token""#;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn b64(s: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn sign(header: &str, claims: &str, key: &EncodingKey, alg: jsonwebtoken::Algorithm) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

fn hs(header: &str, claims: &str) -> String {
    sign(
        header,
        claims,
        &EncodingKey::from_secret(&SECRET),
        jsonwebtoken::Algorithm::HS256,
    )
}

fn claims(sub: &str) -> serde_json::Value {
    let n = now();
    json!({"iss": ISS, "sub": sub, "aud": AUD, "iat": n, "exp": n + 600,
           "jti": format!("jti-{sub}"), "scope": "jobs:read jobs:write"})
}

fn edit(sub: &str, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut c = claims(sub);
    f(c.as_object_mut().unwrap());
    c.to_string()
}

/// Four keys, one per family, each with its kid.
fn verifier() -> TokenVerifier {
    TokenVerifier::builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
        .keys(KeySet::from_jwks(JWKS).unwrap())
        .issuer(ISS)
        .audience(AUD)
        .build()
        .unwrap()
}

/// Answers 200 with `id|method|scopes` of the principal.
fn echo_principal() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let body = match req.extensions().get::<Principal>() {
            Some(p) => format!("{}|{}|{}", p.id(), p.method().as_str(), p.scopes()),
            None => "none".to_owned(),
        };
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    }))
}

/// A server with the service-token layer (and optionally a scope requirement) in
/// front of [`echo_principal`]. Successes are audited too: these tests read the
/// `service_token_accepted` events.
async fn serve(verifier: TokenVerifier, scope: Option<&str>) -> SocketAddr {
    let auth = AuthenticateLayer::service_tokens(verifier)
        .realm("jobs")
        .unwrap()
        .audit_successes();
    let scope = scope.map(|s| RequireScopeLayer::new(s).unwrap().realm("jobs").unwrap());
    let layer = ServiceBuilder::new()
        .layer(auth)
        .option_layer(scope)
        .layer(tower::layer::layer_fn(|_default: Handler| echo_principal()));
    common::serve("127.0.0.1:0", layer, Peer::Attached).await
}

async fn with_token(addr: SocketAddr, token: &str) -> common::Reply {
    let h = format!("Authorization: Bearer {token}");
    common::get(addr, &[h.as_bytes()]).await
}

#[tokio::test]
async fn happy_path_per_algorithm() {
    let capture = log_capture::capture();
    let addr = serve(verifier(), None).await;
    for (kid, alg, key, sub) in [
        (
            "hs-1",
            jsonwebtoken::Algorithm::HS256,
            EncodingKey::from_secret(&SECRET),
            "happy-hs256",
        ),
        (
            "ec-1",
            jsonwebtoken::Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_KEY).unwrap(),
            "happy-es256",
        ),
        (
            "ed-1",
            jsonwebtoken::Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_KEY).unwrap(),
            "happy-eddsa",
        ),
        (
            "rsa-1",
            jsonwebtoken::Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
            "happy-rs256",
        ),
    ] {
        let header = format!(r#"{{"alg":"{alg:?}","kid":"{kid}","typ":"JWT"}}"#);
        let token = sign(&header, &claims(sub).to_string(), &key, alg);
        let r = with_token(addr, &token).await;
        assert_eq!(r.status, 200, "{kid}: {r:?}");
        assert_eq!(r.body, format!("{sub}|service_token|jobs:read jobs:write"));

        // The audit event names sub, iss, kid, scopes and jti; never the token.
        let events = capture.events_with(&format!("\"sub\":\"{sub}\""));
        let accepted: Vec<_> = events
            .iter()
            .filter(|e| e["fields"]["event"] == "service_token_accepted")
            .collect();
        assert_eq!(accepted.len(), 1, "{events:?}");
        let f = &accepted[0]["fields"];
        assert_eq!(f["iss"], ISS);
        assert_eq!(f["kid"], kid);
        assert_eq!(f["scopes"], "jobs:read jobs:write");
        assert_eq!(f["jti"], format!("jti-{sub}"));
        assert_eq!(accepted[0]["target"], "portcullis::audit");
        let text = capture.text();
        assert!(!text.contains(&token));
        assert!(!text.contains(token.rsplit('.').next().unwrap()));
    }
}

#[tokio::test]
async fn every_bad_input_is_the_same_401() {
    let capture = log_capture::capture();
    let v = verifier();
    let addr = serve(v.clone(), None).await;
    let n = now();
    use TokenRejection as R;
    let hs_claims = |c: &str| hs(r#"{"alg":"HS256","kid":"hs-1"}"#, c);
    let forged_with_public_key = |pem: &[u8], kid: &str| {
        sign(
            &format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
            &claims("forger").to_string(),
            &EncodingKey::from_secret(pem),
            jsonwebtoken::Algorithm::HS256,
        )
    };
    let good = claims("bad-input").to_string();
    let cases: Vec<(&str, String, R)> = vec![
        (
            "alg none",
            format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(good.as_bytes())),
            R::Malformed,
        ),
        (
            "alg none, signature bytes",
            format!(
                "{}.{}.c2ln",
                b64(br#"{"alg":"none","kid":"hs-1"}"#),
                b64(good.as_bytes())
            ),
            R::AlgorithmMismatch,
        ),
        (
            "HS256 with the RSA public key",
            forged_with_public_key(RSA_PUB, "rsa-1"),
            R::AlgorithmMismatch,
        ),
        (
            "HS256 with the EC public key",
            forged_with_public_key(EC_PUB, "ec-1"),
            R::AlgorithmMismatch,
        ),
        (
            "unknown kid",
            hs(r#"{"alg":"HS256","kid":"who"}"#, &good),
            R::UnknownKey,
        ),
        (
            "missing kid, several keys",
            hs(r#"{"alg":"HS256"}"#, &good),
            R::UnknownKey,
        ),
        (
            "expired",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(n - 900));
                c.insert("exp".into(), json!(n - 300));
            })),
            R::Expired,
        ),
        (
            "beyond the maximum lifetime",
            hs_claims(&edit("bad-input", |c| {
                c.insert("exp".into(), json!(n + 7200));
            })),
            R::LifetimeTooLong,
        ),
        (
            "exp plus the leeway is now",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(n - 600));
                c.insert("exp".into(), json!(n - 30));
            })),
            R::Expired,
        ),
        (
            "exp - iat overflows i64",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(i64::MIN));
                c.insert("exp".into(), json!(i64::MAX));
            })),
            R::InvalidClaims,
        ),
        (
            "iat before 1970, exp - iat overflows i64",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(i64::MIN));
                c.insert("exp".into(), json!(n + 600));
            })),
            R::InvalidClaims,
        ),
        (
            "exp after the year 9999",
            hs_claims(&edit("bad-input", |c| {
                c.insert("exp".into(), json!(253_402_300_800_i64));
            })),
            R::InvalidClaims,
        ),
        (
            "nbf before 1970",
            hs_claims(&edit("bad-input", |c| {
                c.insert("nbf".into(), json!(i64::MIN));
            })),
            R::InvalidClaims,
        ),
        (
            "iat in the future",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(n + 300));
                c.insert("exp".into(), json!(n + 900));
            })),
            R::IssuedInFuture,
        ),
        (
            "wrong aud (string)",
            hs_claims(&edit("bad-input", |c| {
                c.insert("aud".into(), json!("billing-api"));
            })),
            R::WrongAudience,
        ),
        (
            "wrong aud (array)",
            hs_claims(&edit("bad-input", |c| {
                c.insert("aud".into(), json!(["billing-api", "jobs-api-v2"]));
            })),
            R::WrongAudience,
        ),
        (
            "wrong iss",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iss".into(), json!("https://evil.example"));
            })),
            R::WrongIssuer,
        ),
        (
            "missing sub",
            hs_claims(&edit("bad-input", |c| {
                c.remove("sub");
            })),
            R::MissingClaim,
        ),
        ("garbage base64", "eyJ!!!.???.$$$".to_owned(), R::Malformed),
        (
            "not base64 at all",
            "eyJhbGciOiJIUzI1NiJ9.e30.%%%".to_owned(),
            R::Malformed,
        ),
        (
            "three dots",
            format!("{good_token}.x", good_token = hs_claims(&good)),
            R::Malformed,
        ),
        ("only dots", "...".to_owned(), R::Malformed),
        (
            "duplicate keys",
            hs_claims(&format!(
                r#"{{"iss":"{ISS}","sub":"bad-input","sub":"admin","aud":"{AUD}","iat":{n},"exp":{}}}"#,
                n + 60
            )),
            R::Malformed,
        ),
        (
            "duplicate header keys",
            hs(r#"{"alg":"HS256","kid":"hs-1","kid":"ec-1"}"#, &good),
            R::Malformed,
        ),
        (
            "exp as a string",
            hs_claims(&edit("bad-input", |c| {
                c.insert("exp".into(), json!((n + 600).to_string()));
            })),
            R::InvalidClaims,
        ),
        (
            "exp as a float",
            hs_claims(&edit("bad-input", |c| {
                c.insert("exp".into(), json!((n + 600) as f64 + 0.5));
            })),
            R::InvalidClaims,
        ),
        (
            "iat as a float",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(n as f64));
            })),
            R::InvalidClaims,
        ),
        (
            "iat as a string",
            hs_claims(&edit("bad-input", |c| {
                c.insert("iat".into(), json!(n.to_string()));
            })),
            R::InvalidClaims,
        ),
        (
            "bad signature",
            {
                let t = hs_claims(&good);
                format!("{}AAAA", &t[..t.len() - 4])
            },
            R::BadSignature,
        ),
    ];

    let mut bodies = HashSet::new();
    for (name, token, class) in &cases {
        // The class, for the audit log ...
        assert_eq!(v.verify(token).unwrap_err(), *class, "{name}");
        // ... and on the wire, the same 401 for every one.
        let r = with_token(addr, token).await;
        assert_eq!(r.status, 401, "{name}: {r:?}");
        assert_eq!(r.header("www-authenticate"), Some(CHALLENGE), "{name}");
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        bodies.insert(r.body.clone());
    }
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let body = bodies.into_iter().next().unwrap();
    assert!(body.contains("\"status\":401"));

    // The server is still up; nothing secret reached the logs.
    let ok = with_token(addr, &hs_claims(&good)).await;
    assert_eq!(ok.status, 200);
    let text = capture.text();
    for (name, token, _) in &cases {
        assert!(!text.contains(token.as_str()), "{name} logged");
        if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 8) {
            assert!(!text.contains(sig), "{name}: signature logged");
        }
    }
    assert!(!text.contains("integration-test-secret"));
    // Each class reached the audit log.
    for (_, _, class) in &cases {
        let needle = format!("\"reason\":\"{}\"", class.as_str());
        assert!(
            text.lines()
                .any(|l| l.contains("service_token_rejected") && l.contains(&needle)),
            "{needle}"
        );
    }
}

#[tokio::test]
async fn oversized_tokens() {
    let v = verifier();
    let addr = serve(v.clone(), None).await;
    // 1 MiB: refused by the verifier before any decoding ...
    let huge = format!("eyJ{}", "A".repeat((1 << 20) - 3));
    assert_eq!(v.verify(&huge).unwrap_err(), TokenRejection::TooLarge);
    // ... and over TCP hyper refuses the header block before any layer runs (431).
    let r = with_token(addr, &huge).await;
    assert_eq!(r.status, 431, "{:?}", r.status);
    // 8 KiB + 1 fits hyper's buffer: the shared credential parser refuses it as an
    // over-long credential, 400 invalid_request.
    let long = format!("eyJ{}", "A".repeat(8 * 1024 - 2));
    assert_eq!(v.verify(&long).unwrap_err(), TokenRejection::TooLarge);
    let r = with_token(addr, &long).await;
    assert_eq!(r.status, 400);
    // Exactly at the cap it reaches the verifier: 401.
    let at_cap = format!("eyJ{}.e30.c2ln", "A".repeat(8 * 1024 - 12));
    assert_eq!(at_cap.len(), 8 * 1024);
    let r = with_token(addr, &at_cap).await;
    assert_eq!(r.status, 401);
    // Still serving.
    let ok = with_token(
        addr,
        &hs(
            r#"{"alg":"HS256","kid":"hs-1"}"#,
            &claims("after-huge").to_string(),
        ),
    )
    .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn missing_credential_and_insufficient_scope() {
    let addr = serve(verifier(), Some("jobs:admin")).await;
    let r = common::get(addr, &[]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some(r#"Bearer realm="jobs""#));

    let token = hs(
        r#"{"alg":"HS256","kid":"hs-1"}"#,
        &claims("scope-test").to_string(),
    );
    let r = with_token(addr, &token).await;
    assert_eq!(r.status, 403);
    let challenges: Vec<_> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("www-authenticate"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        challenges
            .contains(&r#"Bearer realm="jobs", error="insufficient_scope", scope="jobs:admin""#),
        "{challenges:?}"
    );

    // Two credentials: 400 invalid_request.
    let h = format!("Authorization: Bearer {token}");
    let r = common::get(addr, &[h.as_bytes(), h.as_bytes()]).await;
    assert_eq!(r.status, 400);
}

/// A tower client over hyper's HTTP/1 connection API: one connection per request.
fn http_client(
    addr: SocketAddr,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Incoming>,
    Error = hyper::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<Full<Bytes>>| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        send.send_request(req).await
    })
}

type Client = BoxCloneService<Request<Full<Bytes>>, Response<Incoming>, BearerTokenError>;

/// 16 concurrent requests through clones of one client.
async fn burst(client: &Client, addr: SocketAddr, ok: &Arc<AtomicUsize>) {
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = client.clone();
        let ok = ok.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get(format!("http://{addr}/"))
                .header("host", "test")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let res = c.oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200);
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"roundtrip-client|service_token|jobs:work");
            ok.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn client_layer_round_trip_across_a_remint() {
    let capture = log_capture::capture();
    let addr = serve(verifier(), Some("jobs:work")).await;
    let issuer = TokenIssuer::builder(
        SigningKey::from_pem(Algorithm::ES256, EC_KEY)
            .unwrap()
            .kid("ec-1"),
    )
    .issuer(ISS)
    .subject("roundtrip-client")
    .audience(AUD)
    .scope("jobs:work")
    .lifetime(Duration::from_secs(60))
    .build()
    .unwrap();
    let layer = BearerTokenLayer::new(issuer)
        .refresh_after(Duration::from_millis(1500))
        .unwrap();
    let client: Client = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(layer)
            .service(http_client(addr)),
    );
    let ok = Arc::new(AtomicUsize::new(0));
    burst(&client, addr, &ok).await;
    let jtis = |capture: &log_capture::Capture| -> HashSet<String> {
        capture
            .events_with("\"sub\":\"roundtrip-client\"")
            .iter()
            .filter(|e| e["fields"]["event"] == "service_token_accepted")
            .map(|e| e["fields"]["jti"].as_str().unwrap().to_owned())
            .collect()
    };
    // 16 concurrent requests shared one token.
    assert_eq!(jtis(capture).len(), 1);

    tokio::time::sleep(Duration::from_millis(1700)).await;
    burst(&client, addr, &ok).await;
    // Past the refresh age: exactly one new token, shared again.
    assert_eq!(jtis(capture).len(), 2);
    assert_eq!(ok.load(Ordering::Relaxed), 32);
    assert!(!capture.text().contains("Bearer ey"));
}

/// Sleeps until the wall clock is 50 ms into second `s`.
async fn sleep_until_second(s: i64) {
    let target = UNIX_EPOCH + Duration::from_secs(s as u64) + Duration::from_millis(50);
    if let Ok(d) = target.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

/// RFC 7519 §4.1.4: a token is refused on or after `exp` plus the leeway, and a
/// token the cache holds is refused from the same second.
#[tokio::test]
async fn tokens_are_refused_from_exp_plus_leeway_on() {
    let capture = log_capture::capture();
    let v = TokenVerifier::builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
        .issuer(ISS)
        .audience(AUD)
        .leeway(Duration::from_secs(1))
        .build()
        .unwrap();
    let addr = serve(v.clone(), None).await;
    let n = now();
    let exp = n + 1;
    let token = hs(
        r#"{"alg":"HS256","kid":"hs-1"}"#,
        &edit("exp-boundary", |c| {
            c.insert("exp".into(), json!(exp));
        }),
    );
    assert_eq!(with_token(addr, &token).await.status, 200);
    assert_eq!(v.cached_tokens(), 1);
    // In the second equal to `exp`, inside the leeway: served from the cache (checked
    // only when the request did not straddle into the next second).
    sleep_until_second(exp).await;
    let r = with_token(addr, &token).await;
    if now() == exp {
        assert_eq!(r.status, 200, "{r:?}");
        let cached = capture
            .events_with("jti-exp-boundary")
            .into_iter()
            .filter(|e| e["fields"]["event"] == "service_token_accepted")
            .filter(|e| e["fields"]["cached"] == true)
            .count();
        assert_eq!(cached, 1, "the second request was served from the cache");
    }
    // From `exp + leeway` on: refused, the cached entry included.
    sleep_until_second(exp + 1).await;
    let r = with_token(addr, &token).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("www-authenticate"), Some(CHALLENGE));
    assert_eq!(v.cached_tokens(), 0);
    assert_eq!(v.verify(&token).unwrap_err(), TokenRejection::Expired);
}

#[tokio::test]
async fn cache_is_emptied_when_keys_change() {
    let v = verifier();
    let addr = serve(v.clone(), None).await;
    let token = hs(
        r#"{"alg":"HS256","kid":"hs-1"}"#,
        &claims("cache-test").to_string(),
    );
    assert_eq!(with_token(addr, &token).await.status, 200);
    assert_eq!(with_token(addr, &token).await.status, 200);
    assert!(v.cached_tokens() >= 1);
    // Rotate the HMAC key away: the cached verification must not outlive it.
    v.replace_keys(
        KeySet::from_jwks(JWKS)
            .unwrap()
            .iter()
            .cloned()
            .chain([VerifyingKey::hs256(&[7u8; 32]).unwrap().kid("hs-2")]),
    )
    .unwrap();
    assert_eq!(v.cached_tokens(), 0);
    let r = with_token(addr, &token).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some(CHALLENGE));
}

/// One layer, both credentials: an API key (any header form) goes to the key store,
/// a JWT-shaped Bearer credential to the token verifier.
#[cfg(feature = "api-key")]
#[tokio::test]
async fn api_keys_and_service_tokens_in_one_layer() {
    use portcullis::api_key::{ApiKeys, KeyRecord, KeyStore, generate_key};
    let key = generate_key("pc_test").unwrap();
    let store =
        KeyStore::from_records([KeyRecord::new("billing-key", key.digest()).unwrap()]).unwrap();
    let auth = AuthenticateLayer::api_keys(ApiKeys::new(store))
        .with_service_tokens(verifier())
        .realm("jobs")
        .unwrap();
    let layer = ServiceBuilder::new()
        .layer(auth)
        .layer(tower::layer::layer_fn(|_default: Handler| echo_principal()));
    let addr = common::serve("127.0.0.1:0", layer, Peer::Attached).await;

    let token = hs(
        r#"{"alg":"HS256","kid":"hs-1"}"#,
        &claims("both-svc").to_string(),
    );
    let r = with_token(addr, &token).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "both-svc|service_token|jobs:read jobs:write");

    let h = format!("X-API-Key: {}", key.expose_secret());
    let r = common::get(addr, &[h.as_bytes()]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "billing-key|api_key|"));
    let r = with_token(addr, key.expose_secret()).await;
    assert_eq!((r.status, r.body.as_str()), (200, "billing-key|api_key|"));

    // A token in X-API-Key is not a service token; a bad token is invalid_token with
    // both schemes offered.
    let h = format!("X-API-Key: {token}");
    assert_eq!(common::get(addr, &[h.as_bytes()]).await.status, 401);
    let r = with_token(addr, &format!("{}AAAA", &token[..token.len() - 4])).await;
    assert_eq!(r.status, 401);
    let challenges: Vec<_> = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("www-authenticate"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        challenges,
        [
            r#"Bearer realm="jobs", error="invalid_token""#,
            r#"ApiKey realm="jobs", error="invalid_token""#
        ]
    );
}
