//! The acceptance test of the logging stack: a real server with
//! RequestId → AccessLog → ClientIp → authentication → a handler that logs carelessly,
//! JSON output captured in memory twice: `tracing-subscriber`'s JSON format through
//! `RedactingMakeWriter`, and the `RedactingJson` format. Requests carry planted
//! secrets in every place a client can put them (headers, query, path, user agent,
//! request id, body); none may appear in the output, while the request ids and the
//! principal ids must; both outputs hold the same events.
//!
//! Its own test binary: it installs its own global subscriber (with the redacting
//! writer), which the integration binary's capture must not be.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::access_log::AccessLogLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddrLayer};
use portcullis::redact::{RedactingJson, RedactingMakeWriter};
use portcullis::rejection::{Challenge, DenialReason, Rejection};
use portcullis::request_id::RequestIdLayer;
use portcullis::{AuthMethod, Principal, Scopes};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, Service, ServiceBuilder};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

type Body = Full<Bytes>;

// ---- capture: every formatted line, after the redacting writer ----

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

/// What each format wrote.
#[derive(Default)]
struct Sink {
    /// `tracing-subscriber`'s JSON through `RedactingMakeWriter`.
    writer: Buf,
    /// `RedactingJson`.
    format: Buf,
}

struct SinkWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buf {
    type Writer = SinkWriter;
    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter(self.0.clone())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Sink {
    /// What went through `RedactingMakeWriter`.
    fn text(&self) -> String {
        self.writer.text()
    }

    /// What the `RedactingJson` format wrote.
    fn format_text(&self) -> String {
        self.format.text()
    }
}

fn sink() -> &'static Sink {
    static SINK: OnceLock<Sink> = OnceLock::new();
    SINK.get_or_init(|| {
        let sink = Sink::default();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(RedactingMakeWriter::new(sink.writer.clone())),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(RedactingJson::new())
                    .with_writer(sink.format.clone()),
            );
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        sink
    })
}

/// What `read` returns once `ready` holds of it, or after two seconds: the access
/// events are written when each response head is ready, after the client may
/// have read it.
async fn wait_for(read: impl Fn() -> String, ready: impl Fn(&str) -> bool) -> String {
    let mut text = read();
    for _ in 0..100 {
        if ready(&text) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        text = read();
    }
    text
}

// ---- a stand-in for the authentication layer ----

/// Accepts one API key in `x-api-key`; the principal goes into the request
/// extensions and is copied into the response extensions, as the real layer does.
#[derive(Clone)]
struct TestAuthLayer;

#[derive(Clone)]
struct TestAuth<S>(S);

impl<S> Layer<S> for TestAuthLayer {
    type Service = TestAuth<S>;
    fn layer(&self, inner: S) -> TestAuth<S> {
        TestAuth(inner)
    }
}

fn equal_ct(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S> Service<Request<Incoming>> for TestAuth<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let challenge = Challenge::api_key("test").unwrap();
        let principal = match req.headers().get("x-api-key") {
            None => {
                let res = Rejection::missing_credential(&challenge).into_response();
                return Box::pin(async move { Ok(res) });
            }
            Some(k) if equal_ct(k.as_bytes(), VALID_KEY.as_bytes()) => {
                Principal::new("billing-svc", AuthMethod::ApiKey)
                    .with_scopes(Scopes::parse("jobs:write").unwrap())
            }
            Some(_) => {
                tracing::info!(
                    target: portcullis::audit::TARGET,
                    event = "auth_failed",
                    reason = DenialReason::UnknownKey.as_str(),
                );
                let res = Rejection::invalid_credential(&challenge, DenialReason::UnknownKey)
                    .into_response();
                return Box::pin(async move { Ok(res) });
            }
        };
        req.extensions_mut().insert(principal.clone());
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut res = fut.await?;
            res.extensions_mut().insert(principal);
            Ok(res)
        })
    }
}

// ---- the careless handler ----

/// Logs everything it got, as application code too often does: the headers, the
/// URI, the user agent and the body.
async fn careless(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    tracing::info!(
        headers = ?parts.headers,
        uri = %parts.uri,
        user_agent = ?parts.headers.get("user-agent"),
        body = %String::from_utf8_lossy(&body),
        "handling request"
    );
    tracing::debug!("raw body: {}", String::from_utf8_lossy(&body));
    tracing::warn!(request = ?parts, "dumping the request parts");
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

async fn serve() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let svc = ServiceBuilder::new()
                .layer(PeerAddrLayer::new(peer))
                .layer(RequestIdLayer::new())
                .layer(AccessLogLayer::new())
                .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
                .layer(TestAuthLayer)
                .service(tower::service_fn(careless));
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    addr
}

async fn send(addr: SocketAddr, raw: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---- the planted secrets ----

const VALID_KEY: &str = "pc_live_Vk7Qm2Xz9Lp4Rt8Wn3Yb6Hc1Jd5Fg0Sa";
const WRONG_KEY: &str = "pc_live_Wr0ngKeyAbCdEfGhIjKlMnOpQrSt12";
/// Each planted secret, with the part that must never appear in the output.
const SECRETS: &[&str] = &[
    "Vk7Qm2Xz9Lp4Rt8Wn3Yb6Hc1Jd5Fg0Sa", // the valid key (x-api-key)
    "Wr0ngKeyAbCdEfGhIjKlMnOpQrSt12",   // a wrong key (x-api-key)
    "eyJzdWIiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0", // JWT payload (authorization)
    "c2lnbmF0dXJlLXNlY3JldC1zaWduYXR1cmU", // JWT signature
    "cookieSecretQ8w7e6r5t4",           // cookie
    "sk-ant-api03-PlantedAnthropicKey0123456789abcdef", // custom header
    "PlantedAnthropicKey0123456789abcdef",
    "querySecretApiKey11",                     // ?api_key=
    "querySecretApiKey22",                     // ?API%5FKEY=
    "PlantedGithubToken0123456789abcdefghijk", // ghp_ in the query
    "redisPw0rdInQuery",                       // redis URL in the query
    "PlantedKeyInPath0123456789",              // pc_live_ in the path
    "AKIAPLANTED0PATH1234",                    // AWS id in the path
    "SplitEncodedKeyInPath98765",              // pc%5Flive%5F... in the path
    "PlantedSlackInUserAgent42",               // xoxb- in the user agent
    "PlantedOpenAiKeyInRequestId0123",         // sk-proj- as the request id
    "bodyPassw0rdHunter2",                     // "password" in the body
    "PlantedStripeKeyInBody12345",             // sk_live_ in the body
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",        // PEM body in the body
    "AKIABODYPLANTED12345",                    // AWS id in the body
    "bracketPassw0rdInQuery",                  // ?user%5Bpassword%5D=
    "bracketPassw0rdArray",                    // ?password%5B%5D=
    "bodyPasswordConfirmation7",               // "password_confirmation" in the body
    "basicUser:basicPass",                     // decoded Basic credential
    "YmFzaWNVc2VyOmJhc2ljUGFzcw",              // Basic credential
];

fn request(target: &str, headers: &[String], body: &str) -> Vec<u8> {
    let mut r = format!("POST {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for h in headers {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    r.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_planted_secret_reaches_the_logs() {
    let sink = sink();
    let addr = serve().await;
    let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiIsImV4cCI6OTk5OTk5OTk5OX0.c2lnbmF0dXJlLXNlY3JldC1zaWduYXR1cmU";
    let body = r#"{"user":"ann","password":"bodyPassw0rdHunter2","password_confirmation":"bodyPasswordConfirmation7","note":"use sk_live_PlantedStripeKeyInBody12345 and AKIABODYPLANTED12345","pem":"-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"}"#;
    let common = |key: &str, id: &str| {
        vec![
            format!("X-API-Key: {key}"),
            format!("X-Request-Id: {id}"),
            format!("Authorization: Bearer {jwt}"),
            "Cookie: session=cookieSecretQ8w7e6r5t4; theme=dark".to_owned(),
            "X-Debug: sk-ant-api03-PlantedAnthropicKey0123456789abcdef".to_owned(),
            "Proxy-Authorization: Basic YmFzaWNVc2VyOmJhc2ljUGFzcw==".to_owned(),
            "User-Agent: probe/1.0 xoxb-PlantedSlackInUserAgent42".to_owned(),
        ]
    };
    let target = "/v1/jobs/pc_live_PlantedKeyInPath0123456789/AKIAPLANTED0PATH1234/pc%5Flive%5FSplitEncodedKeyInPath98765\
                  ?api_key=querySecretApiKey11&API%5FKEY=querySecretApiKey22&q=ghp_PlantedGithubToken0123456789abcdefghijk\
                  &cache=redis://:redisPw0rdInQuery@cache:6379&page=2\
                  &user%5Bemail%5D=ann&user%5Bpassword%5D=bracketPassw0rdInQuery&password%5B%5D=bracketPassw0rdArray";

    // Authenticated, with every secret planted.
    assert_eq!(
        send(
            addr,
            &request(target, &common(VALID_KEY, "stack-ok-1"), body)
        )
        .await,
        200
    );
    // Refused: a wrong key.
    assert_eq!(
        send(
            addr,
            &request(target, &common(WRONG_KEY, "stack-denied-2"), body)
        )
        .await,
        401
    );
    // Refused: no key, and a secret as the request id (safe alphabet, so kept).
    let headers = vec!["X-Request-Id: sk-proj-PlantedOpenAiKeyInRequestId0123".to_owned()];
    assert_eq!(send(addr, &request(target, &headers, body)).await, 401);

    // The access events are written when each response head is ready.
    let text = wait_for(
        || sink.text(),
        |t| {
            t.matches("\"path\":\"/v1/jobs/pc_live_****/AKIA****/pc_live_****\"")
                .count()
                >= 3
        },
    )
    .await;

    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "planted secret {secret} reached the logs:\n{text}"
        );
    }

    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("redaction keeps every line valid JSON"))
        .collect();
    // Other tests of this binary log too: this test's access events are the ones
    // for its target.
    let access: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["target"] == "portcullis::access"
                && e["fields"]["path"] == "/v1/jobs/pc_live_****/AKIA****/pc_live_****"
        })
        .collect();
    assert_eq!(access.len(), 3, "{text}");
    let ok = access
        .iter()
        .find(|e| e["fields"]["request_id"] == "stack-ok-1")
        .expect("ok event");
    assert_eq!(ok["fields"]["status"], 200);
    assert_eq!(ok["fields"]["principal"], "billing-svc");
    assert_eq!(ok["fields"]["auth_method"], "api_key");
    assert_eq!(ok["fields"]["client_ip"], "127.0.0.1");
    assert_eq!(
        ok["fields"]["path"],
        "/v1/jobs/pc_live_****/AKIA****/pc_live_****"
    );
    let query = ok["fields"]["query"].as_str().unwrap();
    assert!(query.contains("api_key=REDACTED"), "{query}");
    assert!(query.contains("page=2"), "{query}");
    // The query holds escaped secrets (`API%5FKEY`), so its decoded form is logged.
    assert!(
        query.contains("&user[email]=ann&user[password]=REDACTED&password[]=REDACTED"),
        "{query}"
    );
    let denied = access
        .iter()
        .find(|e| e["fields"]["request_id"] == "stack-denied-2")
        .expect("denied event");
    assert_eq!(denied["fields"]["status"], 401);
    assert_eq!(denied["fields"]["denial_reason"], "unknown_key");
    assert!(denied["fields"].get("principal").is_none());
    let anonymous = access
        .iter()
        .find(|e| e["fields"]["denial_reason"] == "missing_credential")
        .expect("missing-credential event");
    assert_eq!(anonymous["fields"]["request_id"], "sk-proj-****");

    // The `RedactingJson` format wrote the same access events, and no secret.
    let access_fields = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("every line is JSON"))
            .filter(|e| {
                e["target"] == "portcullis::access"
                    && e["fields"]["path"] == "/v1/jobs/pc_live_****/AKIA****/pc_live_****"
            })
            .map(|e| e["fields"].to_string())
            .collect();
        v.sort();
        v
    };
    let formatted = wait_for(|| sink.format_text(), |t| access_fields(t).len() >= 3).await;
    for secret in SECRETS {
        assert!(
            !formatted.contains(secret),
            "planted secret {secret} reached the RedactingJson lines:\n{formatted}"
        );
    }
    assert_eq!(access_fields(&formatted), access_fields(&text));
    assert!(formatted.contains("sk-ant-****"), "{formatted}");

    // The careless handler's lines were written, and scrubbed.
    assert!(text.contains("handling request"), "{text}");
    assert!(text.contains("dumping the request parts"));
    // A header nobody marked sensitive, printed by the handler, scrubbed by the writer.
    assert!(text.contains("sk-ant-****"), "{text}");
    // The audit event of the refusal is there, on its own target.
    assert!(
        events
            .iter()
            .any(|e| e["target"] == "portcullis::audit" && e["fields"]["event"] == "auth_failed")
    );
}

// ---- this crate's keys with any prefix, in every field a client controls ----

/// A key generated with a random valid prefix, planted in one field per request
/// (path, query value, query name, user agent, request id, method, and a header and
/// a body the careless handler logs itself): neither the key nor its body may
/// reach the output, through the access log or through the user's own events.
#[cfg(feature = "api-key")]
#[test]
fn keys_of_any_prefix_never_reach_the_logs() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sink = sink();
    let addr = rt.block_on(serve());
    let prefixes = "[a-z][a-z0-9_]{0,31}".prop_filter("no '_' last", |p| !p.ends_with('_'));
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&prefixes, |prefix| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let key = portcullis::api_key::generate_key(&prefix)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let key = key.expose_secret().to_owned();
            let body = &key[prefix.len() + 1..];
            let valid = format!("X-API-Key: {VALID_KEY}");
            let marker = format!("/anyprefix-{case}");
            let requests: Vec<(&str, Vec<u8>)> = vec![
                (
                    "path",
                    request(
                        &format!("{marker}/path/{key}/x"),
                        std::slice::from_ref(&valid),
                        "",
                    ),
                ),
                (
                    "query value",
                    request(
                        &format!("{marker}/qv?next={key}&page=2"),
                        std::slice::from_ref(&valid),
                        "",
                    ),
                ),
                (
                    "query name",
                    request(
                        &format!("{marker}/qn?{key}=1&page=2"),
                        std::slice::from_ref(&valid),
                        "",
                    ),
                ),
                (
                    "user agent",
                    request(
                        &format!("{marker}/ua"),
                        &[valid.clone(), format!("User-Agent: probe/1.0 ({key})")],
                        "",
                    ),
                ),
                (
                    "request id",
                    request(
                        &format!("{marker}/rid"),
                        &[valid.clone(), format!("X-Request-Id: {key}")],
                        "",
                    ),
                ),
                (
                    "own event",
                    request(
                        &format!("{marker}/own"),
                        &[valid.clone(), format!("X-Note: {key}")],
                        &format!("note: {key}"),
                    ),
                ),
                ("method", {
                    let mut r = request(
                        &format!("{marker}/method"),
                        std::slice::from_ref(&valid),
                        "",
                    );
                    r.splice(0..4, key.bytes());
                    r
                }),
            ];
            let n = requests.len();
            rt.block_on(async {
                for (field, raw) in &requests {
                    let status = send(addr, raw).await;
                    if *field != "method" {
                        assert_eq!(status, 200, "{field}");
                    }
                }
                // Wait for this case's access events.
                wait_for(
                    || sink.text(),
                    |t| {
                        t.lines()
                            .filter(|l| {
                                l.contains("\"target\":\"portcullis::access\"")
                                    && l.contains(&marker)
                            })
                            .count()
                            >= n
                    },
                )
                .await;
            });
            let text = sink.text();
            prop_assert!(
                !text.contains(body),
                "the body of {key} reached the logs:\n{text}"
            );
            // What the other format has written by now (its line of an event follows
            // the writer's).
            let formatted = sink.format_text();
            prop_assert!(
                !formatted.contains(body),
                "the body of {key} reached the RedactingJson lines:\n{formatted}"
            );
            let access: Vec<Value> = text
                .lines()
                .filter(|l| l.contains("\"target\":\"portcullis::access\"") && l.contains(&marker))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            prop_assert_eq!(access.len(), n, "{}", text);
            let hint = format!("{prefix}_****");
            let field = |p: &str, name: &str| -> String {
                access
                    .iter()
                    .find(|e| {
                        e["fields"]["path"]
                            .as_str()
                            .is_some_and(|v| v.starts_with(&format!("{marker}{p}")))
                    })
                    .and_then(|e| e["fields"][name].as_str())
                    .unwrap_or_else(|| panic!("no {name} in the access event for {p}"))
                    .to_owned()
            };
            prop_assert_eq!(field("/path/", "path"), format!("{marker}/path/{hint}/x"));
            prop_assert_eq!(field("/qv", "query"), format!("next={hint}&page=2"));
            prop_assert_eq!(field("/qn", "query"), format!("{hint}=1&page=2"));
            prop_assert_eq!(field("/ua", "user_agent"), format!("probe/1.0 ({hint})"));
            prop_assert_eq!(field("/rid", "request_id"), hint.clone());
            // The method is bounded to 32 bytes: a long hint is cut, after redaction.
            let method = field("/method", "method");
            prop_assert!(
                method == hint
                    || (method.len() <= 32 && hint.starts_with(method.trim_end_matches('…'))),
                "{} for {}",
                method,
                hint
            );
            Ok(())
        })
        .unwrap();
}

/// A store built from a key list registers its keys' prefixes: a mistyped key with
/// such a prefix (which no checksum can recognise) is hidden in the access log and
/// in the user's own events, with no configuration of either.
#[cfg(feature = "api-key")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stores_prefixes_reach_the_access_log_and_the_writer() {
    use portcullis::api_key::KeyStore;
    let sink = sink();
    let addr = serve().await;
    // Typos of keys with this prefix: before the store exists, nothing hides them.
    let typo = "acmelisted_live_TypoBeforeStoreAbCdEfGhIjKl";
    tracing::info!("before the store: {typo}");
    assert!(sink.text().contains("TypoBeforeStoreAbCdEfGhIjKl"));

    let listed = "acmelisted_live_0123456789abcdefghijABCDEFGHIJ";
    KeyStore::from_key_list(listed, portcullis::Scopes::default()).unwrap();
    let typo = "acmelisted_live_MistypedKeyAbCdEfGhIjKlMnOp";
    tracing::info!("user code logged {typo} by mistake");
    let status = send(
        addr,
        &request(
            &format!("/registered/{typo}"),
            &[
                format!("X-API-Key: {VALID_KEY}"),
                "X-Request-Id: registered-prefix-1".to_owned(),
            ],
            "",
        ),
    )
    .await;
    assert_eq!(status, 200);
    let text = wait_for(|| sink.text(), |t| t.contains("registered-prefix-1")).await;
    assert!(!text.contains("MistypedKeyAbCdEfGhIjKlMnOp"), "{text}");
    let formatted = sink.format_text();
    assert!(
        !formatted.contains("MistypedKeyAbCdEfGhIjKlMnOp"),
        "{formatted}"
    );
    assert!(text.contains("user code logged acmelisted_live_**** by mistake"));
    assert!(
        text.contains("\"path\":\"/registered/acmelisted_live_****\""),
        "{text}"
    );
}

// ---- `Debug` dumps of configuration ----

#[derive(Debug)]
#[allow(dead_code)]
struct DbConfig {
    host: String,
    password: Option<String>,
    port: u16,
}

#[derive(Debug)]
#[allow(dead_code)]
struct ApiToken(String);

#[derive(Debug)]
#[allow(dead_code)]
struct VendorClient {
    api_key: ApiToken,
    retries: u8,
}

/// A configuration logged with `?` (its `Debug`), the ordinary way a service logs
/// one: a secret in an `Option` or a newtype is hidden whole through both sinks, a
/// quote or parenthesis in it included, the other fields are kept, and every line
/// stays JSON.
#[test]
fn debug_dumps_of_secrets_in_options_and_newtypes_are_hidden() {
    let sink = sink();
    let cfg = DbConfig {
        host: "db.internal".into(),
        password: Some("debugPassw0rd\"(Hunter2)".into()),
        port: 5432,
    };
    let client = VendorClient {
        api_key: ApiToken("debugOpaqueVendorKey123".into()),
        retries: 3,
    };
    tracing::info!(?cfg, "connecting debug-dump-1");
    tracing::info!(?client, "calling debug-dump-2");
    for text in [sink.text(), sink.format_text()] {
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| l.contains("debug-dump-"))
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        for secret in ["debugPassw0rd", "Hunter2", "debugOpaqueVendorKey123"] {
            assert!(!text.contains(secret), "{secret} reached the logs:\n{text}");
        }
        let cfg = lines[0]["fields"]["cfg"].as_str().unwrap();
        assert!(cfg.contains("password: REDACTED, port: 5432"), "{cfg}");
        let client = lines[1]["fields"]["client"].as_str().unwrap();
        assert!(client.contains("api_key: REDACTED, retries: 3"), "{client}");
    }
}
