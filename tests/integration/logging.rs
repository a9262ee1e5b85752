//! RequestIdLayer and AccessLogLayer over real TCP: every bad input of the logging
//! stack (control characters and 64 KiB in the path, oversized and unsafe request
//! ids, hostile query strings, secrets split across percent-encodings), the fields of
//! the access event, refusals, inner errors and cancelled requests.
//!
//! Events are read from the binary's one JSON capture; each test finds its own lines
//! by a marker (a request id or a path segment) unique to it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::ClientIp;
use portcullis::IpSet;
use portcullis::access_log::AccessLogLayer;
use portcullis::allowlist::IpAllowlistLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddrLayer};
use portcullis::request_id::{RequestId, RequestIdLayer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder};

use crate::log_capture::capture;

type Body = Full<Bytes>;
type Handler = BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;

/// Answers 200 with the request id it saw and the `x-request-id` header it got.
fn echo_request_id() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let ext = req
            .extensions()
            .get::<RequestId>()
            .map_or_else(|| "none".to_owned(), |id| id.to_string());
        let header = req.headers().get("x-request-id").map_or_else(
            || "none".to_owned(),
            |v| String::from_utf8_lossy(v.as_bytes()).into_owned(),
        );
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
            "{ext} {header}"
        )))))
    }))
}

/// Serves `layer` around `handler` on 127.0.0.1:0 with the peer attached.
async fn serve<L, S>(layer: L, handler: S) -> SocketAddr
where
    S: Clone + Send + 'static,
    L: Layer<S> + Clone + Send + 'static,
    L::Service: Service<Request<Incoming>, Response = Response<Body>> + Clone + Send + 'static,
    <L::Service as Service<Request<Incoming>>>::Future: Send + 'static,
    <L::Service as Service<Request<Incoming>>>::Error: std::error::Error + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                continue;
            };
            let svc = ServiceBuilder::new()
                .layer(PeerAddrLayer::new(remote))
                .service(layer.clone().layer(handler.clone()));
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    addr
}

/// Sends raw bytes, returns (status, head, body); status 0 when the server closed
/// the connection without an answer.
async fn send(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, text, String::new());
    };
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn get(target: &str, headers: &[&str]) -> Vec<u8> {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// The access events carrying `marker`, polled briefly: the event is emitted when
/// the response head is ready, which can be a moment after the client has read it.
async fn access_events(marker: &str) -> Vec<Value> {
    for _ in 0..100 {
        let events: Vec<Value> = capture()
            .events_with(marker)
            .into_iter()
            .filter(|e| e["target"] == "portcullis::access")
            .collect();
        if !events.is_empty() {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no access event with {marker}");
}

type LoggingStack = Stack<ClientIpLayer, Stack<AccessLogLayer, Stack<RequestIdLayer, Identity>>>;

fn logging_stack() -> LoggingStack {
    ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new())
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .into_inner()
}

#[tokio::test]
async fn a_safe_request_id_is_kept_logged_and_echoed() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let (status, head, body) =
        send(addr, &get("/kept", &["X-Request-Id: log-kept-7Q2:a.b_c"])).await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("x-request-id: log-kept-7q2:a.b_c"),
        "{head}"
    );
    assert_eq!(body, "log-kept-7Q2:a.b_c log-kept-7Q2:a.b_c");
    let e = &access_events("log-kept-7Q2:a.b_c").await[0]["fields"];
    assert_eq!(e["request_id"], "log-kept-7Q2:a.b_c");
    assert_eq!(e["method"], "GET");
    assert_eq!(e["path"], "/kept");
    assert_eq!(e["status"], 200);
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert_eq!(e["outcome"], "response");
    assert!(e["latency_us"].as_u64().is_some());
    assert!(e.get("query").is_none());
    assert!(e.get("principal").is_none());
}

/// A fresh UUID v4 replaced the incoming id: the handler, the response and the log
/// agree on it.
fn assert_replaced(status: u16, head: &str, body: &str) -> String {
    assert_eq!(status, 200, "{head}");
    let (ext, header) = body.split_once(' ').unwrap();
    assert_eq!(ext.len(), 36, "{body}");
    assert_eq!(&ext[14..15], "4");
    assert_eq!(ext, header, "the request header was replaced too");
    assert!(head.contains(ext));
    ext.to_owned()
}

#[tokio::test]
async fn a_10_kib_request_id_is_replaced() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let huge = "A".repeat(10 * 1024);
    let (status, head, body) =
        send(addr, &get("/huge-id", &[&format!("X-Request-Id: {huge}")])).await;
    let id = assert_replaced(status, &head, &body);
    let e = &access_events(&id).await[0]["fields"];
    assert_eq!(e["path"], "/huge-id");
    assert!(!capture().text().contains(&huge[..100]));
}

#[tokio::test]
async fn unsafe_request_ids_are_replaced() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    for (i, bad) in [
        "abc\tdef-tab-log-inject",
        "\"quoted-log-inject\"",
        "abc def-space-log-inject",
        "abc%0Adef-encoded-newline-log-inject",
        "caf\u{e9}-non-ascii-log-inject",
        "a/b-slash-log-inject",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/unsafe-id-{i}");
        let mut raw = get(&path, &[]);
        // Insert the header with raw bytes (non-ASCII included).
        let at = raw.len() - 2;
        raw.splice(at..at, format!("X-Request-Id: {bad}\r\n").into_bytes());
        let (status, head, body) = send(addr, &raw).await;
        let id = assert_replaced(status, &head, &body);
        let e = &access_events(&path).await[0]["fields"];
        assert_eq!(e["request_id"], id.as_str());
    }
    assert!(!capture().text().contains("log-inject"));
}

#[tokio::test]
async fn two_request_id_headers_are_ambiguous_and_replaced() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let (status, head, body) = send(
        addr,
        &get(
            "/two-ids",
            &["X-Request-Id: first-id-dup", "X-Request-Id: second-id-dup"],
        ),
    )
    .await;
    let id = assert_replaced(status, &head, &body);
    assert_eq!(
        access_events("/two-ids").await[0]["fields"]["request_id"],
        id.as_str()
    );
    assert!(!head.contains("-id-dup"));
}

#[tokio::test]
async fn a_request_id_with_a_raw_newline_never_reaches_the_log() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    // A bare LF ends the header line in HTTP/1.1: what follows is either a second
    // header or a malformed line hyper refuses. Either way the logged id is safe.
    let raw = b"GET /raw-newline-id HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Request-Id: nl-ok\nInjected-line-marker\r\n\r\n";
    let (status, _, _) = send(addr, raw).await;
    if status == 200 {
        let e = &access_events("/raw-newline-id").await[0]["fields"];
        assert!(!e["request_id"].as_str().unwrap().contains('\n'));
    } else {
        assert_eq!(status, 400);
    }
    assert!(!capture().text().contains("Injected-line-marker"));
}

#[tokio::test]
async fn a_hostile_path_is_logged_bounded_and_without_control_characters() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    // 64 KiB of characters: hyper refuses a request target that long (414) before
    // any layer runs.
    let long = "x".repeat(64 * 1024);
    let (status, _, _) = send(
        addr,
        &get(&format!("/{long}"), &["X-Request-Id: too-long-1"]),
    )
    .await;
    assert_eq!(status, 414);
    // Encoded newline, CR, ESC (ANSI colour) and DEL, and as many characters as
    // hyper lets through (just under 64 KiB).
    let long = "x".repeat(65_000);
    let target = format!("/hostile-path/%0Afake%0D%1B[31mred%7F/{long}");
    let (status, _, _) = send(addr, &get(&target, &["X-Request-Id: hostile-path-1"])).await;
    assert_eq!(status, 200);
    let e = &access_events("hostile-path-1").await[0]["fields"];
    let path = e["path"].as_str().unwrap();
    assert!(
        path.starts_with("/hostile-path/%0Afake%0D%1B[31mred%7F/xxx"),
        "{path}"
    );
    assert!(path.len() <= 1024, "{}", path.len());
    assert!(path.ends_with('…'));
    assert!(!path.chars().any(char::is_control));

    // Raw control bytes in the request line are refused by hyper before any layer.
    for raw in [
        &b"GET /a\x1b[31mb HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"[..],
        b"GET /a\x7fb HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ] {
        let (status, _, _) = send(addr, raw).await;
        assert_eq!(status, 400);
    }
    assert!(!capture().text().contains('\u{1b}'));
}

#[tokio::test]
async fn a_decoded_secret_with_control_characters_is_logged_clean() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    // Decoding (to find the split key) yields a newline and an ESC: both escaped.
    let target = "/decoded/%0A%1B[2J/pc%5Flive%5FAbCdEfGhIjKlMnOpQrStUvWx0123";
    let (status, _, _) = send(addr, &get(target, &["X-Request-Id: decoded-ctl-1"])).await;
    assert_eq!(status, 200);
    let e = &access_events("decoded-ctl-1").await[0]["fields"];
    assert_eq!(e["path"], r"/decoded/\u{a}\u{1b}[2J/pc_live_****");
    assert!(!capture().text().contains("AbCdEfGhIjKlMnOpQrStUvWx0123"));
}

#[tokio::test]
async fn hostile_query_strings_keep_names_and_hide_sensitive_values() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let cases = [
        // Repeated, empty and valueless parameters.
        (
            "q-repeat",
            "token=s3cr3tA1&token=s3cr3tA2&token=&token&page=2",
            "token=REDACTED&token=REDACTED&token=&token&page=2",
        ),
        // Percent-encoded and upper-case names.
        (
            "q-encoded",
            "api%5Fkey=s3cr3tB1&API_KEY=s3cr3tB2&Api%2DKey=s3cr3tB3&x=1",
            "api%5Fkey=REDACTED&API_KEY=REDACTED&Api%2DKey=REDACTED&x=1",
        ),
        // Non-UTF-8 names and values, and an encoded `=` inside a value.
        (
            "q-bytes",
            "%FF%FE=1&password=%FFs3cr3tC1&sig=a%3Ds3cr3tC2&%C3%A9=%C3%A9",
            "%FF%FE=1&password=REDACTED&sig=REDACTED&%C3%A9=%C3%A9",
        ),
        // OAuth code and state.
        (
            "q-oauth",
            "code=s3cr3tD1&state=xyz&client_secret=s3cr3tD2",
            "code=REDACTED&state=xyz&client_secret=REDACTED",
        ),
    ];
    for (marker, query, expected) in cases {
        let (status, _, _) = send(
            addr,
            &get(
                &format!("/query?{query}"),
                &[&format!("X-Request-Id: {marker}")],
            ),
        )
        .await;
        assert_eq!(status, 200);
        let e = &access_events(marker).await[0]["fields"];
        assert_eq!(e["query"], expected, "{marker}");
    }
    let text = capture().text();
    for secret in ["s3cr3tA", "s3cr3tB", "s3cr3tC", "s3cr3tD"] {
        assert!(!text.contains(secret), "{secret} leaked");
    }
}

#[tokio::test]
async fn secrets_split_across_encodings_are_caught() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let cases = [
        // A key with its underscores encoded, in the path.
        (
            "split-1",
            "/split/pc%5Flive%5FZyXwVuTsRqPoNmLkJiHgFeDc9876",
            "path",
        ),
        // Lower-case escapes and a doubly encoded prefix.
        (
            "split-2",
            "/split/gh%70%5fZyXwVuTsRqPoNmLkJiHgFeDc9876abcdefghij",
            "path",
        ),
        (
            "split-3",
            "/split/sk%252Dant%252DZyXwVuTsRqPoNmLkJiHgFeDc9876",
            "path",
        ),
        // A bearer token in a harmless-looking parameter, space encoded.
        (
            "split-4",
            "/split?next=Bearer%20ZyXwVuTsRqPoNmLkJiHgFeDc9876",
            "query",
        ),
        (
            "split-5",
            "/split?next=Bearer+ZyXwVuTsRqPoNmLkJiHgFeDc9876",
            "query",
        ),
        // A Redis URL with its password, encoded.
        (
            "split-6",
            "/split?to=redis%3A%2F%2F%3AZyXwVuTsRqPoNmLkJiHgFeDc9876%40cache",
            "query",
        ),
    ];
    each_field_shows_stars(addr, &cases).await;
    assert!(!capture().text().contains("ZyXwVuTsRqPoNmLkJiHgFeDc9876"));
}

/// Sends each `(marker, target, field)` with the marker as its request id, and
/// checks that the access event's `field` shows a hidden secret (`****`).
async fn each_field_shows_stars(addr: SocketAddr, cases: &[(&str, &str, &str)]) {
    for &(marker, target, field) in cases {
        let (status, _, _) = send(addr, &get(target, &[&format!("X-Request-Id: {marker}")])).await;
        assert_eq!(status, 200);
        let e = &access_events(marker).await[0]["fields"];
        let logged = e[field].as_str().unwrap();
        assert!(logged.contains("****"), "{marker}: {logged}");
    }
}

/// A secret the target shows as it is, next to something only its decoded form
/// shows (`token=1` once `%3D` is decoded): the logged, decoded line keeps the
/// first hidden too.
#[tokio::test]
async fn what_the_raw_target_hides_stays_hidden_when_decoding_finds_more() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let cases = [
        // A URL password with its `/` or `@` escaped, as userinfo requires.
        (
            "raw-1",
            "/proxy/redis://:QwErTyUiOpAsDf%2FGhJkLzXcVbNm@cache:6379/token%3D1",
            "path",
        ),
        (
            "raw-2",
            "/connect?dsn=postgres://app:QwErTyUiOpAsDf%40GhJkLzXcVbNm@db/x&t=token%253D1",
            "query",
        ),
        // A bearer credential with a base64 byte escaped.
        (
            "raw-3",
            "/x?next=Bearer%20QwErTyUiOpAsDf%2BGhJkLzXcVbNm",
            "query",
        ),
    ];
    each_field_shows_stars(addr, &cases).await;
    let text = capture().text();
    assert!(!text.contains("QwErTyUiOpAsDf"), "{text}");
    assert!(!text.contains("GhJkLzXcVbNm"), "{text}");
}

#[tokio::test]
async fn credential_headers_and_bodies_are_never_logged_user_agent_is_cleaned() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let body = r#"{"password":"bodySecret77"}"#;
    let mut raw = format!(
        "POST /hdr HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Request-Id: hdr-1\r\n\
         Authorization: Bearer hdrSecret1\r\nCookie: sid=hdrSecret2\r\nX-API-Key: hdrSecret3\r\n\
         Proxy-Authorization: Basic hdrSecret4\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    // A user agent with a tab, bytes that are not UTF-8, a token and 1000 more bytes.
    raw.extend_from_slice(
        b"User-Agent: curl/8.0\tred\xff\xfe ghp_hdrSecret5AAAAAAAAAAAAAAAAAAAAAAAAAAAAA ",
    );
    raw.extend_from_slice("u".repeat(1000).as_bytes());
    raw.extend_from_slice(b"\r\n\r\n");
    raw.extend_from_slice(body.as_bytes());
    let (status, _, _) = send(addr, &raw).await;
    assert_eq!(status, 200);
    let e = &access_events("hdr-1").await[0]["fields"];
    let ua = e["user_agent"].as_str().unwrap();
    assert!(
        ua.starts_with("curl/8.0\\u{9}red\u{fffd}\u{fffd} ghp_**** uuu"),
        "{ua}"
    );
    assert!(ua.len() <= 256);
    let text = capture().text();
    for secret in ["hdrSecret", "bodySecret77"] {
        assert!(!text.contains(secret), "{secret:?} leaked");
    }
    // An escape byte in a header value is refused by hyper before any layer.
    let raw =
        b"GET /esc HTTP/1.1\r\nHost: t\r\nConnection: close\r\nUser-Agent: a\x1b[31mb\r\n\r\n";
    assert_eq!(send(addr, raw).await.0, 400);
}

#[tokio::test]
async fn refusals_are_logged_with_their_reason_and_client_ip() {
    capture();
    let stack = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new())
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(IpAllowlistLayer::new(IpSet::parse("192.0.2.0/24").unwrap()))
        .into_inner();
    let addr = serve(stack, echo_request_id()).await;
    let (status, head, body) = send(addr, &get("/denied", &["X-Request-Id: denied-1"])).await;
    assert_eq!(status, 403);
    assert!(
        head.contains("denied-1"),
        "the refusal carries the request id too"
    );
    assert!(
        !body.contains("ip_denied"),
        "the reason never reaches the client"
    );
    let e = &access_events("denied-1").await[0]["fields"];
    assert_eq!(e["status"], 403);
    assert_eq!(e["denial_reason"], "ip_denied");
    assert_eq!(e["client_ip"], "127.0.0.1");
}

/// ClientIpLayer copies the resolved address into the response extensions.
#[tokio::test]
async fn client_ip_is_copied_into_the_response_extensions() {
    #[derive(Clone)]
    struct ReadBack;
    impl<S> Layer<S> for ReadBack {
        type Service = tower::util::MapResponse<S, fn(Response<Body>) -> Response<Body>>;
        fn layer(&self, inner: S) -> Self::Service {
            tower::util::MapResponse::new(inner, |mut res: Response<Body>| {
                let ip = res.extensions().get::<ClientIp>().map(|ip| ip.to_string());
                res.headers_mut().insert(
                    "x-seen-client-ip",
                    ip.unwrap_or_else(|| "none".into()).parse().unwrap(),
                );
                res
            })
        }
    }
    let stack = ServiceBuilder::new()
        .layer(ReadBack)
        .layer(ClientIpLayer::new(
            ClientIpConfig::trusted_proxies("127.0.0.0/8").unwrap(),
        ))
        .into_inner();
    let addr = serve(stack, echo_request_id()).await;
    let (_, head, _) = send(addr, &get("/", &["X-Forwarded-For: 198.51.100.9"])).await;
    assert!(head.contains("x-seen-client-ip: 198.51.100.9"), "{head}");
    // Refused by a layer inside: still copied.
    let stack = ServiceBuilder::new()
        .layer(ReadBack)
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(IpAllowlistLayer::new(IpSet::parse("192.0.2.0/24").unwrap()))
        .into_inner();
    let addr = serve(stack, echo_request_id()).await;
    let (status, head, _) = send(addr, &get("/", &[])).await;
    assert_eq!(status, 403);
    assert!(head.contains("x-seen-client-ip: 127.0.0.1"), "{head}");
}

#[derive(Debug)]
struct Boom;
impl std::fmt::Display for Boom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("boom with password=errSecret1")
    }
}
impl std::error::Error for Boom {}

#[tokio::test]
async fn an_inner_error_and_a_cancelled_request_are_logged_once_each() {
    capture();
    let handler = tower::service_fn(|req: Request<Incoming>| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Err::<Response<Body>, Boom>(Boom)
    });
    let stack = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new())
        .into_inner();
    let addr = serve(stack, handler).await;
    let (status, _, _) = send(addr, &get("/err", &["X-Request-Id: inner-error-1"])).await;
    assert_eq!(status, 0, "hyper closes the connection on a service error");
    let events = access_events("inner-error-1").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["fields"]["outcome"], "error");
    assert!(events[0]["fields"].get("status").is_none());

    // The client goes away while the handler is still working: hyper drops the future.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&get("/slow", &["X-Request-Id: cancelled-1"]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream);
    let events = access_events("cancelled-1").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["fields"]["outcome"], "cancelled");
    assert_eq!(events[0]["fields"]["path"], "/slow");
    assert!(!capture().text().contains("errSecret1"));
}

#[tokio::test]
async fn the_request_span_carries_the_request_id_into_handler_logs() {
    capture();
    let handler = tower::service_fn(|_req: Request<Incoming>| async move {
        tracing::info!(marker = "handler-in-span-7", "inside the handler");
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let stack = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new().request_span())
        .into_inner();
    let addr = serve(stack, handler).await;
    let (status, _, _) = send(addr, &get("/span", &["X-Request-Id: span-id-7"])).await;
    assert_eq!(status, 200);
    let events = capture().events_with("handler-in-span-7");
    assert_eq!(events.len(), 1);
    let spans = events[0]["spans"].as_array().expect("span list");
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "request" && s["request_id"] == "span-id-7"),
        "{events:?}"
    );
}

/// The characters a client must not get into a log line as themselves: bidi
/// embeddings, overrides, isolates and marks, line separators, zero-width text.
const HIDDEN: &[char] = &[
    '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{202e}', '\u{2066}', '\u{2067}', '\u{2068}',
    '\u{2069}', '\u{200e}', '\u{200f}', '\u{61c}', '\u{2028}', '\u{2029}', '\u{200b}', '\u{feff}',
    '\u{85}',
];

#[tokio::test]
async fn a_user_agent_with_bidi_controls_is_logged_escaped() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    let mut raw = get("/bidi-ua", &["X-Request-Id: bidi-ua-1"]);
    let at = raw.len() - 2;
    raw.splice(
        at..at,
        "User-Agent: probe\u{202e}gpj.exe\u{2066}x\u{2028}y\u{85}z\r\n"
            .as_bytes()
            .iter()
            .copied(),
    );
    let (status, _, _) = send(addr, &raw).await;
    assert_eq!(status, 200);
    let e = &access_events("bidi-ua-1").await[0]["fields"];
    assert_eq!(
        e["user_agent"],
        r"probe\u{202e}gpj.exe\u{2066}x\u{2028}y\u{85}z"
    );
    for line in capture().text().lines().filter(|l| l.contains("bidi-ua-1")) {
        assert!(!line.contains(HIDDEN), "{line}");
    }
}

/// A signed service token whose `sub` and `jti` carry bidi overrides and invisible
/// characters: every audit event and the access event name the principal with the
/// characters escaped, never raw (the token is valid: the issuer signed these).
#[cfg(all(feature = "jwt", feature = "rate-limit"))]
#[tokio::test]
async fn a_token_subject_with_bidi_controls_reaches_no_log_line_raw() {
    use jsonwebtoken::{EncodingKey, Header};
    use portcullis::authenticate::AuthenticateLayer;
    use portcullis::jwt::{TokenVerifier, VerifyingKey};
    use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};
    use portcullis::scope::RequireScopeLayer;

    const SECRET: &[u8; 32] = b"logging-test-hs256-secret-32-byt";
    capture();
    let verifier = TokenVerifier::builder()
        .key(VerifyingKey::hs256(SECRET).unwrap().kid("hs-log"))
        .issuer("https://issuer.example")
        .audience("jobs-api")
        .build()
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new())
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(AuthenticateLayer::service_tokens(verifier).audit_successes())
        .layer(
            RateLimitLayer::builder()
                .policy(Policy::new("bidi", Quota::per_hour(1).unwrap()).unwrap())
                .build()
                .unwrap(),
        )
        .layer(RequireScopeLayer::new("admin:all").unwrap())
        .into_inner();
    let addr = serve(stack, echo_request_id()).await;

    let sub = "bidi-sub-7\u{202e}nimda\u{2066}x\u{200f}y\u{200b}z\u{2028}w";
    let jti = "bidi-jti-7\u{2067}q\u{61c}r\u{feff}";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": "https://issuer.example", "aud": "jobs-api", "sub": sub, "jti": jti,
        "iat": now, "exp": now + 300, "scope": "jobs:read",
    });
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("hs-log".into());
    let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
    let auth = format!("Authorization: Bearer {token}");

    // Authenticated, counted, then refused by the scope check; then rate limited.
    let (status, _, _) = send(
        addr,
        &get("/bidi-token", &[&auth, "X-Request-Id: bidi-tok-1"]),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = send(
        addr,
        &get("/bidi-token", &[&auth, "X-Request-Id: bidi-tok-2"]),
    )
    .await;
    assert_eq!(status, 429);

    let escaped_sub = r"bidi-sub-7\u{202e}nimda\u{2066}x\u{200f}y\u{200b}z\u{2028}w";
    let escaped_jti = r"bidi-jti-7\u{2067}q\u{61c}r\u{feff}";
    // The last event is written; the audit events before it are too.
    access_events("bidi-tok-2").await;
    let events = capture().events_with("bidi-sub-7");
    let fields_of = |event: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| e["target"] == "portcullis::audit" && e["fields"]["event"] == event)
            .map(|e| &e["fields"])
            .collect()
    };
    let accepted = fields_of("service_token_accepted");
    assert_eq!(accepted.len(), 2, "{events:?}");
    for f in &accepted {
        assert_eq!(f["sub"], escaped_sub);
        assert_eq!(f["jti"], escaped_jti);
        assert_eq!(f["kid"], "hs-log");
        assert_eq!(f["iss"], "https://issuer.example");
    }
    for event in ["auth_succeeded", "scope_denied", "rate_limited"] {
        let f = fields_of(event);
        assert!(!f.is_empty(), "no {event} event: {events:?}");
        assert!(
            f.iter().all(|f| f["principal"] == escaped_sub),
            "{event}: {f:?}"
        );
    }
    for id in ["bidi-tok-1", "bidi-tok-2"] {
        let e = &access_events(id).await[0]["fields"];
        assert_eq!(e["principal"], escaped_sub, "{id}");
        assert_eq!(e["sub"], escaped_sub, "{id}");
        assert_eq!(e["jti"], escaped_jti, "{id}");
        assert_eq!(e["kid"], "hs-log", "{id}");
    }
    // No line that names this principal or token carries any of the characters raw.
    let text = capture().text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("bidi-sub-7") || l.contains("bidi-jti-7") || l.contains("bidi-tok-"))
        .collect();
    assert!(lines.len() >= 8, "{lines:?}");
    for line in lines {
        assert!(!line.contains(HIDDEN), "{line}");
    }
    assert!(!text.contains(&token));
}

/// A successful authenticated request is one event, the access event, which names
/// the principal and how it authenticated; an `auth_succeeded` audit event is added
/// only when asked for.
#[tokio::test]
async fn a_successful_request_is_one_event_naming_its_principal() {
    use portcullis::api_key::{ApiKeys, KeyRecord, KeyStore, generate_key};
    use portcullis::stack::StackLayer;

    capture();
    for (id, audit_successes) in [("one-event-default", false), ("one-event-audited", true)] {
        let key = generate_key("pc_test").unwrap();
        let store = KeyStore::from_records([KeyRecord::new(id, key.digest()).unwrap()]).unwrap();
        let mut builder = StackLayer::builder().api_keys(ApiKeys::new(store));
        if audit_successes {
            builder = builder.audit_successes();
        }
        let addr = serve(builder.build().unwrap(), echo_request_id()).await;
        let credential = format!("X-API-Key: {}", key.expose_secret());
        let request_id = format!("X-Request-Id: {id}-1");
        let (status, _, _) = send(addr, &get("/one-event", &[&credential, &request_id])).await;
        assert_eq!(status, 200);

        let access = access_events(&format!("{id}-1")).await;
        assert_eq!(access.len(), 1, "{access:?}");
        let f = &access[0]["fields"];
        assert_eq!(f["principal"], id);
        assert_eq!(f["auth_method"], "api_key");
        assert_eq!(f["status"], 200);
        assert_eq!(f["outcome"], "response");

        // The audit events naming the principal (emitted before the access event).
        let audit: Vec<String> = capture()
            .events_with(id)
            .into_iter()
            .filter(|e| e["target"] == "portcullis::audit")
            .map(|e| e["fields"]["event"].as_str().unwrap_or_default().to_owned())
            .collect();
        let expected: &[&str] = if audit_successes {
            &["auth_succeeded"]
        } else {
            &[]
        };
        assert_eq!(audit, expected, "{id}");
        assert!(!capture().text().contains(key.expose_secret()));
    }
}

/// The audit events (their names) among the captured lines that contain `marker`.
fn audit_events_with(marker: &str) -> Vec<String> {
    let mut names: Vec<String> = capture()
        .events_with(marker)
        .into_iter()
        .filter(|e| e["target"] == "portcullis::audit")
        .map(|e| e["fields"]["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    names.sort();
    names
}

/// A request with a service token is one event, the access event, which carries
/// the token's `sub`, `jti` and `kid`, whether the token was verified or served
/// from the verifier's cache; with the stack's one opt-in, the success audit events
/// (`service_token_accepted` and `auth_succeeded`) are added.
#[cfg(all(feature = "jwt", feature = "stack"))]
#[tokio::test]
async fn a_token_request_is_one_event_carrying_the_token_ids() {
    use jsonwebtoken::{EncodingKey, Header};
    use portcullis::jwt::{TokenVerifier, VerifyingKey};
    use portcullis::stack::StackLayer;

    const SECRET: &[u8; 32] = b"one-event-test-hs256-secret-32by";
    capture();
    for (run, audit_successes) in [("tok-one-default", false), ("tok-one-audited", true)] {
        let verifier = TokenVerifier::builder()
            .key(VerifyingKey::hs256(SECRET).unwrap().kid("hs-one"))
            .issuer("https://issuer.example")
            .audience("jobs-api")
            .build()
            .unwrap();
        let mut builder = StackLayer::builder().service_tokens(verifier);
        if audit_successes {
            builder = builder.audit_successes();
        }
        let addr = serve(builder.build().unwrap(), echo_request_id()).await;

        let sub = format!("{run}-sub");
        let jti = format!("{run}-jti");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": "https://issuer.example", "aud": "jobs-api", "sub": sub, "jti": jti,
            "iat": now, "exp": now + 300,
        });
        let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("hs-one".into());
        let token =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        let auth = format!("Authorization: Bearer {token}");
        // Verified, then served from the cache.
        for n in 1..=2 {
            let request_id = format!("X-Request-Id: {run}-{n}");
            let (status, _, _) = send(addr, &get("/one-event", &[&auth, &request_id])).await;
            assert_eq!(status, 200);
        }
        for n in 1..=2 {
            let access = access_events(&format!("{run}-{n}")).await;
            assert_eq!(access.len(), 1, "{access:?}");
            let f = &access[0]["fields"];
            assert_eq!(f["principal"], sub.as_str());
            assert_eq!(f["auth_method"], "service_token");
            assert_eq!(f["sub"], sub.as_str());
            assert_eq!(f["jti"], jti.as_str());
            assert_eq!(f["kid"], "hs-one");
            assert_eq!(f["status"], 200);
        }
        // Every line naming the token: the two access events, plus the audit
        // events only with the opt-in.
        let expected: &[&str] = if audit_successes {
            &[
                "auth_succeeded",
                "auth_succeeded",
                "service_token_accepted",
                "service_token_accepted",
            ]
        } else {
            &[]
        };
        assert_eq!(audit_events_with(&sub), expected, "{run}");
        let lines = capture().events_with(&sub).len();
        assert_eq!(lines, 2 + expected.len(), "{run}");
        assert!(!capture().text().contains(&token));
    }
}

/// An API key's access event names the key by its id (`principal`) and has no
/// token fields; `PORTCULLIS_AUDIT_SUCCESSES` is the stack's opt-in from the
/// environment: `true` adds the `auth_succeeded` audit event, `false` does not.
#[cfg(feature = "stack")]
#[tokio::test]
async fn the_audit_successes_variable_switches_the_success_audit_event() {
    use portcullis::stack::StackBuilder;

    capture();
    for (run, value) in [("env-audit-false", "false"), ("env-audit-true", " TRUE ")] {
        let mut raw = [0u8; 24];
        getrandom::fill(&mut raw).unwrap();
        let key: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let vars = [
            ("PORTCULLIS_API_KEYS", key.clone()),
            ("PORTCULLIS_AUDIT_SUCCESSES", value.to_owned()),
        ];
        let stack = StackBuilder::from_env_with(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
        })
        .unwrap()
        .build()
        .unwrap();
        let addr = serve(stack, echo_request_id()).await;
        let credential = format!("X-API-Key: {key}");
        let request_id = format!("X-Request-Id: {run}-1");
        let (status, _, _) = send(addr, &get("/env-audit", &[&credential, &request_id])).await;
        assert_eq!(status, 200);

        let access = access_events(&format!("{run}-1")).await;
        assert_eq!(access.len(), 1, "{access:?}");
        let f = &access[0]["fields"];
        assert_eq!(f["auth_method"], "api_key");
        for absent in ["sub", "jti", "kid"] {
            assert!(f.get(absent).is_none(), "{absent}: {f}");
        }
        let id = f["principal"].as_str().unwrap().to_owned();
        assert!(id.starts_with("env-"), "{id}");
        let expected: &[&str] = if value == "false" {
            &[]
        } else {
            &["auth_succeeded"]
        };
        assert_eq!(audit_events_with(&id), expected, "{run}");
        assert!(!capture().text().contains(&key));
    }
    let bad = StackBuilder::from_env_with(|name| {
        (name == "PORTCULLIS_AUDIT_SUCCESSES").then(|| "yes".to_owned())
    })
    .unwrap_err();
    assert_eq!(
        bad.to_string(),
        "PORTCULLIS_AUDIT_SUCCESSES: must be true or false"
    );
}

/// The user agent and an extension method are redacted in their percent-decoded
/// form as the path is: `token%3D…` and `Bearer%20…` show no secret.
#[tokio::test]
async fn a_secret_escaped_in_the_user_agent_or_method_is_caught() {
    capture();
    let addr = serve(logging_stack(), echo_request_id()).await;
    for (marker, ua) in [
        ("agent-escaped-1", "app/1 token%3DUaSecretZyXwVuTsRqPoNm"),
        ("agent-escaped-2", "app/1 Bearer%20UaSecretZyXwVuTsRqPoNm"),
    ] {
        let ua = format!("User-Agent: {ua}");
        let (status, _, _) = send(
            addr,
            &get("/ua", &[&format!("X-Request-Id: {marker}"), &ua]),
        )
        .await;
        assert_eq!(status, 200);
        let e = &access_events(marker).await[0]["fields"];
        assert!(
            e["user_agent"].as_str().unwrap().starts_with("app/1 "),
            "{e}"
        );
    }
    let raw = b"token%3DUaSecretZyXwVuTsRqPoNm /m HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
                X-Request-Id: verb-escaped-1\r\n\r\n";
    assert_eq!(send(addr, raw).await.0, 200);
    access_events("verb-escaped-1").await;
    assert!(!capture().text().contains("UaSecret"));
}

/// A trusted proxy reported no usable address: the client-ip layer inside the
/// access log resolves none, and the event records none, not the address a layer
/// outside resolved (here the proxy itself, which is not the client).
#[tokio::test]
async fn an_address_the_inner_layer_could_not_resolve_is_not_logged_as_an_outer_one() {
    capture();
    let stack = ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(RequestIdLayer::new())
        .layer(AccessLogLayer::new())
        .layer(ClientIpLayer::new(
            ClientIpConfig::trusted_proxies("127.0.0.0/8").unwrap(),
        ))
        .into_inner();
    let addr = serve(stack, echo_request_id()).await;
    let (status, _, _) = send(
        addr,
        &get(
            "/",
            &["X-Request-Id: unresolved-1", "X-Forwarded-For: unknown"],
        ),
    )
    .await;
    assert_eq!(status, 200);
    let e = &access_events("unresolved-1").await[0]["fields"];
    assert!(e.get("client_ip").is_none(), "{e}");
    // Resolved inside: that address, not the outer one.
    let (status, _, _) = send(
        addr,
        &get(
            "/",
            &[
                "X-Request-Id: unresolved-2",
                "X-Forwarded-For: 198.51.100.4",
            ],
        ),
    )
    .await;
    assert_eq!(status, 200);
    let e = &access_events("unresolved-2").await[0]["fields"];
    assert_eq!(e["client_ip"], "198.51.100.4");
}
