//! AuthenticateLayer and RequireScopeLayer over real TCP: every bad-input case, the
//! identical refusals, hidden credentials, revocation, the audit trail, and that no
//! presented key ever reaches the logs (key-file reload: `reload.rs`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyRecord, KeyStore, generate_key};
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use portcullis::scope::RequireScopeLayer;
use portcullis::{Principal, Scopes};
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower::util::BoxCloneService;

use crate::common::{Handler, Peer, Reply, get_path_from, ip, serve_with};
use crate::log_capture;

/// Answers 200 with what the inner service saw: the principal and whether any
/// credential reached it.
fn whoami() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let p = req.extensions().get::<Principal>();
        let body = format!(
            "id={} method={} scopes={} x-api-key={} authorization={} uri={}",
            p.map_or("-", |p| p.id()),
            p.map_or("-", |p| p.method().as_str()),
            p.map(|p| p.scopes().to_string()).unwrap_or_default(),
            req.headers().contains_key("x-api-key"),
            req.headers().contains_key("authorization"),
            req.uri(),
        );
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
    }))
}

type Layers<L> = Stack<L, Stack<ClientIpLayer, Identity>>;

fn with_client_ip<L>(inner: L) -> Layers<L> {
    ServiceBuilder::new()
        .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
        .layer(inner)
        .into_inner()
}

async fn serve<L>(layer: L) -> SocketAddr
where
    L: tower::Layer<Handler> + Clone + Send + 'static,
    L::Service: tower::Service<
            Request<Incoming>,
            Response = Response<crate::common::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<Request<Incoming>>>::Future: Send + 'static,
{
    serve_with(
        "127.0.0.1:0",
        with_client_ip(layer),
        Peer::Attached,
        whoami(),
    )
    .await
}

/// Requests come from a loopback address of each test's own, so its audit events
/// can be told apart in the shared log capture.
async fn get(from: &str, to: SocketAddr, headers: &[&[u8]]) -> Reply {
    get_path_from(Some(ip(from)), to, "/", headers).await
}

fn h(name: &str, value: &str) -> Vec<u8> {
    format!("{name}: {value}").into_bytes()
}

const UNAUTHORIZED_BODY: &str = r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"The credential presented is not valid."}"#;
const MISSING_BODY: &str = r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"This resource requires a credential."}"#;
const BAD_REQUEST_BODY: &str = r#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"The credential is malformed, or more than one credential was presented."}"#;

struct Keys {
    valid: GeneratedKey,
    expired: GeneratedKey,
    future: GeneratedKey,
    revoked: GeneratedKey,
    unknown: GeneratedKey,
}

fn keys_and_store(tag: &str) -> (Keys, KeyStore) {
    let g = || generate_key("pc_test").unwrap();
    let k = Keys {
        valid: g(),
        expired: g(),
        future: g(),
        revoked: g(),
        unknown: g(),
    };
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let scopes = Scopes::parse("jobs:read").unwrap();
    let store = KeyStore::from_records([
        KeyRecord::new(&format!("{tag}-valid"), k.valid.digest())
            .unwrap()
            .with_scopes(scopes.clone()),
        KeyRecord::new(&format!("{tag}-expired"), k.expired.digest())
            .unwrap()
            .expires_at(now - day),
        KeyRecord::new(&format!("{tag}-future"), k.future.digest())
            .unwrap()
            .not_before(now + day),
        KeyRecord::new(&format!("{tag}-revoked"), k.revoked.digest())
            .unwrap()
            .revoked(true),
    ])
    .unwrap();
    (k, store)
}

fn typo(key: &str) -> String {
    let mut s = key.to_owned();
    let last = s.pop().unwrap();
    s.push(if last == 'a' { 'b' } else { 'a' });
    s
}

#[tokio::test]
async fn every_bad_input_case() {
    let capture = log_capture::capture();
    let from = "127.3.0.1";
    let (k, store) = keys_and_store("itest-bad");
    // Successes are audit events too here (opt-in); failures always are.
    let addr = serve(AuthenticateLayer::api_keys(ApiKeys::new(store)).audit_successes()).await;
    let valid = k.valid.expose_secret();

    // Accepted: the header name in any case, the scheme in any case, surrounding
    // whitespace (not part of an HTTP field value).
    for header in [
        h("X-API-Key", valid),
        h("x-api-key", valid),
        h("X-Api-Key", &format!("   {valid}\t ")),
        h("Authorization", &format!("Bearer {valid}")),
        h("authorization", &format!("bearer   {valid}")),
        h("Authorization", &format!("APIKEY {valid}")),
        h("Authorization", &format!("apikey {valid}")),
    ] {
        let r = get(from, addr, &[&header]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&header));
        assert!(
            r.body
                .starts_with("id=itest-bad-valid method=api_key scopes=jobs:read"),
            "{}",
            r.body
        );
        assert!(
            r.body.contains("x-api-key=false authorization=false"),
            "hidden: {}",
            r.body
        );
    }

    // Missing credential: 401 without an error code, one challenge per scheme.
    for headers in [&[][..], &[&b"Authorization: Basic dXNlcjpwYXNz"[..]]] {
        let r = get(from, addr, headers).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.body, MISSING_BODY);
        let challenges: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("www-authenticate"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            challenges,
            [r#"Bearer realm="api""#, r#"ApiKey realm="api""#]
        );
    }

    // Malformed or several credentials: 400 invalid_request.
    let big = "A".repeat(16 * 1024);
    let malformed: Vec<Vec<Vec<u8>>> = vec![
        vec![b"X-API-Key:".to_vec()],
        vec![b"X-API-Key:    ".to_vec()],
        vec![h(
            "X-API-Key",
            &format!("{} {}", &valid[..10], &valid[10..]),
        )],
        vec![h("X-API-Key", &big)],
        vec![h("Authorization", &format!("Bearer {big}"))],
        vec![[&b"X-API-Key: "[..], valid.as_bytes(), b"\xff\xfe"].concat()],
        vec![b"Authorization: Bearer \xc3\xa9t\xc3\xa9".to_vec()],
        vec![b"Authorization: Bearer".to_vec()],
        vec![b"Authorization: Bearer    ".to_vec()],
        vec![b"Authorization: ApiKey".to_vec()],
        vec![
            h("X-API-Key", valid),
            h("Authorization", &format!("Bearer {valid}")),
        ],
        vec![
            h("X-API-Key", valid),
            h("X-API-Key", k.unknown.expose_secret()),
        ],
        vec![
            h("Authorization", &format!("Bearer {valid}")),
            h("Authorization", &format!("ApiKey {valid}")),
        ],
    ];
    for headers in &malformed {
        let refs: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        let r = get(from, addr, &refs).await;
        assert_eq!(
            r.status,
            400,
            "{:?}",
            String::from_utf8_lossy(&refs[0][..refs[0].len().min(60)])
        );
        assert_eq!(r.body, BAD_REQUEST_BODY);
        assert!(
            r.header("www-authenticate")
                .unwrap()
                .contains(r#"error="invalid_request""#)
        );
    }

    // Invalid credentials: one identical 401 for every reason.
    let invalid = [
        typo(valid),
        k.unknown.expose_secret().to_owned(),
        k.expired.expose_secret().to_owned(),
        k.future.expose_secret().to_owned(),
        k.revoked.expose_secret().to_owned(),
        "x".repeat(40),
    ];
    let mut replies = Vec::new();
    for key in &invalid {
        for header in [
            h("X-API-Key", key),
            h("Authorization", &format!("Bearer {key}")),
        ] {
            let r = get(from, addr, &[&header]).await;
            assert_eq!(r.status, 401);
            assert_eq!(r.body, UNAUTHORIZED_BODY);
            let mut headers: Vec<_> = r
                .headers
                .iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case("date"))
                .cloned()
                .collect();
            headers.sort();
            replies.push(headers);
        }
    }
    assert!(replies.windows(2).all(|w| w[0] == w[1]), "{replies:#?}");
    assert!(
        replies[0]
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("www-authenticate")
                && v == r#"Bearer realm="api", error="invalid_token""#)
    );

    // The audit trail: reason classes, the key id only for matched records, and no
    // presented key anywhere in any log line.
    let events: Vec<_> = capture
        .events_with(from)
        .into_iter()
        .filter(|e| e["target"] == "portcullis::audit")
        .collect();
    let count = |event: &str, reason: &str| {
        events
            .iter()
            .filter(|e| {
                e["fields"]["event"] == event
                    && (reason.is_empty() || e["fields"]["reason"] == reason)
            })
            .count()
    };
    assert_eq!(count("auth_succeeded", ""), 7);
    assert_eq!(count("auth_failed", "missing_credential"), 2);
    assert_eq!(count("auth_failed", "malformed_credential"), 10);
    assert_eq!(count("auth_failed", "multiple_credentials"), 3);
    assert_eq!(count("auth_failed", "invalid_key_format"), 4);
    assert_eq!(count("auth_failed", "unknown_key"), 2);
    for (reason, id) in [
        ("expired_key", "itest-bad-expired"),
        ("not_yet_valid_key", "itest-bad-future"),
        ("revoked_key", "itest-bad-revoked"),
    ] {
        let matched: Vec<_> = events
            .iter()
            .filter(|e| e["fields"]["reason"] == reason)
            .collect();
        assert_eq!(matched.len(), 2, "{reason}");
        assert!(matched.iter().all(|e| e["fields"]["key_id"] == id));
    }
    assert!(
        events
            .iter()
            .filter(|e| e["fields"]["reason"] == "unknown_key")
            .all(|e| e["fields"].get("key_id").is_none())
    );
    assert!(
        events
            .iter()
            .filter(|e| e["fields"]["event"] == "auth_succeeded")
            .all(|e| e["fields"]["principal"] == "itest-bad-valid"
                && e["fields"]["client_ip"] == from)
    );
    let all = capture.text();
    for key in invalid.iter().map(String::as_str).chain([valid]) {
        assert!(!all.contains(key), "a presented key reached the logs");
        assert!(
            !all.contains(&key[8..]),
            "part of a presented key reached the logs"
        );
    }
}

#[tokio::test]
async fn credentials_can_be_kept_and_query_keys_are_opt_in() {
    let from = "127.3.0.2";
    let (k, store) = keys_and_store("itest-hide");
    let keys = ApiKeys::new(store);
    let valid = k.valid.expose_secret();

    let keep = serve(AuthenticateLayer::api_keys(keys.clone()).hide_credentials(false)).await;
    let r = get(from, keep, &[&h("X-API-Key", valid)]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains("x-api-key=true authorization=false"),
        "{}",
        r.body
    );
    let r = get(
        from,
        keep,
        &[&h("Authorization", &format!("Bearer {valid}"))],
    )
    .await;
    assert!(
        r.body.contains("x-api-key=false authorization=true"),
        "{}",
        r.body
    );

    // Another scheme's Authorization header is not ours: it stays.
    let hide = serve(AuthenticateLayer::api_keys(keys.clone())).await;
    let r = get(
        from,
        hide,
        &[&h("X-API-Key", valid), b"Authorization: Basic dXNlcjpwYXNz"],
    )
    .await;
    assert!(
        r.body.contains("x-api-key=false authorization=true"),
        "{}",
        r.body
    );

    // Query-string keys: ignored unless enabled, then removed from the URI.
    let path = format!("/jobs?page=2&api_key={valid}");
    let r = get_path_from(Some(ip(from)), hide, &path, &[]).await;
    assert_eq!(r.status, 401);
    let query = serve(
        AuthenticateLayer::api_keys(keys)
            .allow_key_in_query_dangerously("api_key")
            .unwrap(),
    )
    .await;
    let r = get_path_from(Some(ip(from)), query, &path, &[]).await;
    assert_eq!(r.status, 200);
    assert!(r.body.ends_with("uri=/jobs?page=2"), "{}", r.body);
    let r = get_path_from(Some(ip(from)), query, &path, &[&h("X-API-Key", valid)]).await;
    assert_eq!(r.status, 400, "query and header together");
}

#[tokio::test]
async fn plain_keys_from_a_list() {
    let capture = log_capture::capture();
    let from = "127.3.0.6";
    let plain = "itest-plain-key-0123456789-abcdefghijklmnop";
    let store = KeyStore::from_key_list(&format!(" {plain} ,"), Scopes::default()).unwrap_err();
    assert!(store.to_string().contains("entry 2 is empty"));
    let store = KeyStore::from_key_list(plain, Scopes::parse("jobs:read").unwrap()).unwrap();
    let addr = serve(AuthenticateLayer::api_keys(ApiKeys::new(store))).await;
    let r = get(
        from,
        addr,
        &[&h("Authorization", &format!("Bearer {plain}"))],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("id=env-"), "{}", r.body);
    let r = get(from, addr, &[&h("X-API-Key", &plain[..31])]).await;
    assert_eq!((r.status, r.body.as_str()), (401, UNAUTHORIZED_BODY));
    let r = get(from, addr, &[&h("X-API-Key", &format!("{plain}x"))]).await;
    assert_eq!((r.status, r.body.as_str()), (401, UNAUTHORIZED_BODY));
    assert!(!capture.text().contains(plain));
}

#[tokio::test]
async fn require_scope_layer() {
    let capture = log_capture::capture();
    let from = "127.3.0.3";
    let reader = generate_key("pc_test").unwrap();
    let writer = generate_key("pc_test").unwrap();
    let store = KeyStore::from_records([
        KeyRecord::new("itest-scope-reader", reader.digest())
            .unwrap()
            .with_scopes(Scopes::parse("jobs:read").unwrap()),
        KeyRecord::new("itest-scope-writer", writer.digest())
            .unwrap()
            .with_scopes(Scopes::parse("jobs:read jobs:write").unwrap()),
    ])
    .unwrap();
    let layers = ServiceBuilder::new()
        .layer(
            AuthenticateLayer::api_keys(ApiKeys::new(store))
                .realm("jobs")
                .unwrap(),
        )
        .layer(
            RequireScopeLayer::new("jobs:write")
                .unwrap()
                .realm("jobs")
                .unwrap(),
        )
        .into_inner();
    let addr = serve(layers).await;

    let r = get(from, addr, &[&h("X-API-Key", writer.expose_secret())]).await;
    assert_eq!(r.status, 200);
    let r = get(from, addr, &[&h("X-API-Key", reader.expose_secret())]).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("www-authenticate"),
        Some(r#"Bearer realm="jobs", error="insufficient_scope", scope="jobs:write""#)
    );
    assert!(r.body.contains("does not grant the scope"));
    let r = get(from, addr, &[]).await;
    assert_eq!(r.status, 401, "authentication runs first");

    let denied = capture.events_with("itest-scope-reader");
    let denied: Vec<_> = denied
        .iter()
        .filter(|e| e["fields"]["event"] == "scope_denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["fields"]["scope"], "jobs:write");
    assert_eq!(denied[0]["fields"]["client_ip"], from);
}

#[tokio::test]
async fn unauthenticated_mode_is_explicit_and_marked() {
    let capture = log_capture::capture();
    let layer = AuthenticateLayer::allow_unauthenticated_requests_dangerously(
        Scopes::parse("itest-open:scope").unwrap(),
    );
    assert!(
        capture
            .events_with("itest-open:scope")
            .iter()
            .any(|e| e["level"] == "WARN" && e["fields"]["event"] == "authentication_disabled")
    );
    let addr = serve(layer).await;
    let r = get("127.3.0.4", addr, &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .starts_with("id=unauthenticated method=unauthenticated scopes=itest-open:scope"),
        "{}",
        r.body
    );
}
