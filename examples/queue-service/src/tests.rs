//! The service over real TCP: the routes, the engine, the worker and every guarding
//! layer together, with real API keys and service tokens.
//!
//! Each test's demo has its own key store: one key per name below (`client`,
//! `other`, `reader`, `admin`, `nobody`, plus a `revoked` and an `expired` one) and
//! service tokens signed with its own secret (`worker` holds `jobs:work`,
//! `reporter` only `jobs:read`, `client-token` is a token whose `sub` is `client`,
//! the same text as the `client` key's id). The in-process worker, when running, calls the
//! worker endpoints over HTTP with its own token, as in `main`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use portcullis::Scopes;
use portcullis::api_key::{ApiKeys, KeyRecord, KeyStore, generate_key};
use portcullis::client_ip::ClientIpConfig;
use portcullis::rate_limit::Quota;
use portcullis::rate_limit::redis::RedisLimiter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;
use crate::auth::{Access, ROUTES};
use crate::guard::TokenSecret;
use crate::queue::{Backoff, JobId, JobState, QueueConfig};
use crate::worker::BreakerConfig;
use crate::worker::tests::eventually;

const MS: Duration = Duration::from_millis(1);

/// The API keys of a test demo: `(name, scopes, revoked, expired)`.
const TEST_KEYS: &[(&str, &str, bool, bool)] = &[
    ("client", "jobs:read jobs:write", false, false),
    ("other", "jobs:read jobs:write", false, false),
    ("reader", "jobs:read", false, false),
    ("admin", "admin dashboard:read", false, false),
    ("nobody", "profile:read", false, false),
    // An API key holding the worker scope: the worker routes take service tokens only.
    ("key-worker", "jobs:work", false, false),
    ("revoked", "jobs:read jobs:write", true, false),
    ("expired", "jobs:read jobs:write", false, true),
];

/// How a test demo is set up.
struct Setup {
    queue: QueueConfig,
    worker: Option<WorkerConfig>,
    client_ip: ClientIpConfig,
    internal: IpSet,
    rate: Quota,
    auth_failures: Quota,
    redis: Option<RedisLimiter>,
    secret: TokenSecret,
    /// The in-process worker's token issuer instead of the guard's.
    worker_issuer: Option<portcullis::jwt::TokenIssuer>,
    /// A key store instead of the test keys (whose names then authenticate as
    /// nothing).
    keys: Option<ApiKeys>,
}

impl Setup {
    fn new(queue: QueueConfig, worker: Option<WorkerConfig>) -> Self {
        Self {
            queue,
            worker,
            client_ip: ClientIpConfig::peer_only(),
            internal: IpSet::parse(DEFAULT_INTERNAL).unwrap(),
            // Lenient unless a test is about the limits.
            rate: Quota::per_second(10_000).unwrap(),
            auth_failures: Quota::per_minute(10_000).unwrap(),
            redis: None,
            secret: TokenSecret::generate().unwrap(),
            worker_issuer: None,
            keys: None,
        }
    }
}

struct Demo {
    addr: SocketAddr,
    state: AppState,
    /// Name -> the header line that authenticates as it.
    credentials: HashMap<&'static str, String>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
}

impl Demo {
    /// The demo on 127.0.0.1:0 with the in-process worker, wired as `main` wires it.
    async fn start(config: QueueConfig, worker: WorkerConfig) -> Self {
        Self::launch(Setup::new(config, Some(worker))).await
    }

    async fn launch(setup: Setup) -> Self {
        let mut credentials = HashMap::new();
        let mut records = Vec::new();
        for &(name, scopes, revoked, expired) in TEST_KEYS {
            let key = generate_key("pc_test").unwrap();
            let mut r = KeyRecord::new(name, key.digest())
                .unwrap()
                .with_scopes(Scopes::parse(scopes).unwrap())
                .revoked(revoked);
            if expired {
                r = r.expires_at(SystemTime::now() - Duration::from_secs(60));
            }
            records.push(r);
            credentials.insert(name, format!("X-API-Key: {}", key.expose_secret()));
        }
        // A key with two usage credits.
        let key = generate_key("pc_test").unwrap();
        records.push(
            KeyRecord::new("metered", key.digest())
                .unwrap()
                .with_scopes(Scopes::parse("jobs:read").unwrap())
                .with_credits(2),
        );
        credentials.insert("metered", format!("X-API-Key: {}", key.expose_secret()));
        let keys = setup
            .keys
            .unwrap_or_else(|| ApiKeys::new(KeyStore::from_records(records).unwrap()));
        let mut config = GuardConfig::new(keys, setup.secret, setup.internal).unwrap();
        config.client_ip = setup.client_ip;
        config.rate = setup.rate;
        config.auth_failures = setup.auth_failures;
        config.redis = setup.redis;
        let guard = Guard::new(config).unwrap();
        for (name, sub, scope) in [
            ("worker", "test-worker", "jobs:work"),
            ("reporter", "reporter", "jobs:read"),
            ("client-token", "client", "jobs:read jobs:write"),
        ] {
            let token = guard.issuer(sub, scope).unwrap().mint().unwrap();
            credentials.insert(name, format!("Authorization: Bearer {}", token.as_str()));
        }
        let state = state(setup.queue);
        let router = service(&state, &guard);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let s = state.clone();
        let issuer = setup
            .worker_issuer
            .unwrap_or_else(|| guard.worker_issuer().unwrap());
        let worker = setup.worker.map(|w| (w, issuer));
        let server = tokio::spawn(async move {
            serve(listener, router, &s, worker, async {
                let _ = rx.await;
            })
            .await
        });
        Self {
            addr,
            state,
            credentials,
            stop: Some(tx),
            server,
        }
    }

    /// Without the in-process worker: the test drives the worker endpoints itself.
    async fn manual(config: QueueConfig) -> Self {
        Self::launch(Setup::new(config, None)).await
    }

    /// The header line of a named credential.
    fn auth(&self, who: &str) -> &str {
        self.credentials
            .get(who)
            .unwrap_or_else(|| panic!("no credential named {who}"))
    }

    async fn call(&self, method: &str, path: &str, who: Option<&str>, body: Option<&str>) -> Reply {
        let headers: Vec<&str> = who.map(|w| self.auth(w)).into_iter().collect();
        self.call_with(method, path, &headers, body).await
    }

    /// A request with these header lines (`Name: value`).
    async fn call_with(
        &self,
        method: &str,
        path: &str,
        headers: &[&str],
        body: Option<&str>,
    ) -> Reply {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        raw(self.addr, req.as_bytes()).await
    }

    async fn shutdown(mut self) -> AppState {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("stops within 10 s")
            .unwrap()
            .unwrap();
        self.state
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn assert_problem(&self, status: u16) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{self:?}"
        );
        assert_eq!(self.json()["status"], status);
    }

    fn id(&self) -> String {
        self.json()["id"].as_str().unwrap().to_owned()
    }
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn fast_queue() -> QueueConfig {
    QueueConfig {
        backoff: Backoff {
            base: MS,
            cap: 4 * MS,
        },
        ..QueueConfig::default()
    }
}

fn fast_worker() -> WorkerConfig {
    WorkerConfig {
        idle_poll: MS,
        work_time: 2 * MS,
        breaker: BreakerConfig {
            threshold: 100,
            cooldown: Duration::from_secs(30),
        },
    }
}

fn job_state(state: &AppState, id: &str) -> JobState {
    state
        .queue
        .memory()
        .unwrap()
        .get(JobId::parse(id).unwrap())
        .unwrap()
        .state
}

#[test]
fn the_command_line_and_its_environment() {
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let a = parse_args(&[], env(&[])).unwrap();
    assert_eq!(a.addr, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(a.redis, None);
    let a = parse_args(
        &[],
        env(&[
            ("PORTCULLIS_DEMO_ADDR", "127.0.0.1:0"),
            ("REDIS_URL", "redis://127.0.0.1:6379"),
        ]),
    )
    .unwrap();
    assert_eq!(a.addr.port(), 0);
    assert_eq!(a.redis.as_deref(), Some("redis://127.0.0.1:6379"));
    let a = parse_args(
        &args(&["--redis", "redis://h:1", "--addr", "[::1]:9000"]),
        env(&[
            ("PORTCULLIS_DEMO_ADDR", "127.0.0.1:1"),
            ("REDIS_URL", "redis://x:2"),
        ]),
    )
    .unwrap();
    assert_eq!(
        (a.addr, a.redis.as_deref()),
        ("[::1]:9000".parse().unwrap(), Some("redis://h:1")),
        "the flags win over the environment"
    );
    assert!(parse_args(&args(&["--addr"]), env(&[])).is_err());
    assert!(
        parse_args(
            &args(&["--addr", "127.0.0.1:1", "--addr", "127.0.0.1:2"]),
            env(&[])
        )
        .is_err()
    );
    assert!(parse_args(&args(&["--port", "1"]), env(&[])).is_err());
    assert!(parse_args(&[], env(&[("PORTCULLIS_DEMO_ADDR", "localhost")])).is_err());
    assert!(parse_args(&args(&["--redis", ""]), env(&[])).is_err());
    // A password on the command line is visible to every local user: refused, and
    // never repeated; in the environment it is taken, and hidden from `Debug`.
    for url in [
        "redis://:hunter2@h:1",
        "rediss://user:hunter2@h:1/0",
        "redis://u:hunter2@x@h:1",
        "redis://:@h:1",
    ] {
        let err = parse_args(&args(&["--redis", url]), env(&[])).unwrap_err();
        assert!(
            err.contains("REDIS_URL") && !err.contains("hunter2"),
            "{err}"
        );
    }
    for url in ["redis://h:1", "redis://user@h:1", "redis://h:1/0?x=a:b@c"] {
        assert!(
            parse_args(&args(&["--redis", url]), env(&[])).is_ok(),
            "{url}"
        );
    }
    let a = parse_args(&[], env(&[("REDIS_URL", "redis://:hunter2@h:1")])).unwrap();
    assert_eq!(a.redis.as_deref(), Some("redis://:hunter2@h:1"));
    assert!(!format!("{a:?}").contains("hunter2"), "{a:?}");
}

#[test]
fn half_a_credential_configuration_is_refused() {
    let only_keys = |k: &str| (k == "PORTCULLIS_DEMO_KEY_FILE").then(|| "/nonexistent".to_owned());
    let err = Credentials::from_env(only_keys).unwrap_err().to_string();
    assert!(err.contains("both"), "{err}");
    let only_token =
        |k: &str| (k == "PORTCULLIS_DEMO_TOKEN_KEY_FILE").then(|| "/nonexistent".to_owned());
    assert!(Credentials::from_env(only_token).is_err());
    assert!(matches!(
        Credentials::from_env(|_| None).unwrap(),
        Credentials::Ephemeral { .. }
    ));
}

#[test]
fn an_external_issuer_for_the_internal_endpoint_from_the_environment() {
    let env = |issuer: Option<&'static str>, callers: Option<&'static str>| {
        move |k: &str| match k {
            "PORTCULLIS_DEMO_INTERNAL_ISSUER" => issuer.map(str::to_owned),
            "PORTCULLIS_DEMO_INTERNAL_CALLERS" => callers.map(str::to_owned),
            _ => None,
        }
    };
    assert!(crate::internal_issuer(env(None, None)).unwrap().is_none());
    let issuer = "https://127.0.0.1:1";
    let callers = "system:serviceaccount:batch:reporter";
    let remote = crate::internal_issuer(env(Some(issuer), Some(callers)))
        .unwrap()
        .unwrap();
    assert_eq!(remote.issuer(), issuer);
    for (i, c) in [
        (Some(issuer), None),
        (None, Some(callers)),
        (Some("http://issuer.example"), Some(callers)),
        (Some(issuer), Some("a,,b")),
    ] {
        assert!(crate::internal_issuer(env(i, c)).is_err(), "{i:?} {c:?}");
    }
    // Its keys are fetched when the guard is built: nobody answers there.
    let (keys, secret) = Credentials::from_env(|_| None).unwrap().parts();
    let mut config = GuardConfig::new(
        keys,
        secret,
        portcullis::IpSet::parse("127.0.0.0/8").unwrap(),
    )
    .unwrap();
    config.internal_issuer = Some(remote);
    let e = Guard::new(config).unwrap_err().to_string();
    assert!(e.contains("first key fetch failed"), "{e}");
}

#[test]
fn the_queue_limits_from_the_environment() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let c = queue_config(env(&[])).unwrap();
    assert_eq!((c.ttl, c.max_depth), (Duration::from_secs(86_400), 1_000));
    let c = queue_config(env(&[
        ("PORTCULLIS_DEMO_JOB_TTL_SECS", "60"),
        ("PORTCULLIS_DEMO_MAX_DEPTH", "20000"),
    ]))
    .unwrap();
    assert_eq!((c.ttl, c.max_depth), (Duration::from_secs(60), 20_000));
    assert!(c.max_retained >= c.max_depth);
    let c = queue_config(env(&[
        ("PORTCULLIS_DEMO_JOB_TTL_SECS", "2592000"),
        ("PORTCULLIS_DEMO_MAX_DEPTH", "1000000"),
    ]))
    .unwrap();
    assert_eq!(
        (c.ttl.as_secs(), c.max_depth),
        (MAX_JOB_TTL_SECS, 1_000_000)
    );
    const BAD: &[&[(&str, &str)]] = &[
        &[("PORTCULLIS_DEMO_JOB_TTL_SECS", "0")],
        &[("PORTCULLIS_DEMO_JOB_TTL_SECS", "-1")],
        &[("PORTCULLIS_DEMO_JOB_TTL_SECS", "2592001")],
        &[("PORTCULLIS_DEMO_JOB_TTL_SECS", "18446744073709551615")],
        &[("PORTCULLIS_DEMO_JOB_TTL_SECS", "99999999999999999999")],
        &[("PORTCULLIS_DEMO_MAX_DEPTH", "ten")],
        &[("PORTCULLIS_DEMO_MAX_DEPTH", "")],
        &[("PORTCULLIS_DEMO_MAX_DEPTH", "1000001")],
        &[("PORTCULLIS_DEMO_LEASE_SECS", "0")],
        &[("PORTCULLIS_DEMO_LEASE_SECS", "3601")],
        &[("PORTCULLIS_DEMO_LEASE_SECS", "5m")],
    ];
    for bad in BAD {
        let e = queue_config(env(bad)).unwrap_err();
        assert!(e.starts_with(bad[0].0), "{bad:?}: {e}");
    }
}

#[test]
fn the_lease_and_the_redis_settings_from_the_environment() {
    let one = |name: &'static str, value: &'static str| {
        move |k: &str| (k == name).then(|| value.to_owned())
    };
    assert_eq!(
        queue_config(|_| None).unwrap().lease,
        Duration::from_secs(300)
    );
    let c = queue_config(one("PORTCULLIS_DEMO_LEASE_SECS", "3600")).unwrap();
    assert_eq!(c.lease, Duration::from_secs(MAX_LEASE_SECS));
    assert_eq!(redis_namespace(|_| None).unwrap(), "portcullis-demo");
    let ns = one("PORTCULLIS_DEMO_REDIS_NAMESPACE", "acme.jobs-1_a");
    assert_eq!(redis_namespace(ns).unwrap(), "acme.jobs-1_a");
    let long: &'static str = "n".repeat(65).leak();
    for bad in ["a:b", "a*", "a b", "ns/x", "ümlaut", long] {
        let e = redis_namespace(one("PORTCULLIS_DEMO_REDIS_NAMESPACE", bad)).unwrap_err();
        assert!(
            e.starts_with("PORTCULLIS_DEMO_REDIS_NAMESPACE"),
            "{bad}: {e}"
        );
        assert!(!e.contains(bad), "the value is not echoed: {e}");
    }
}

#[test]
fn a_redis_url_never_shows_in_errors_or_debug() {
    use crate::redis_queue::RedisQueue;
    let secret = "hunter2-redis-pw";
    let config = QueueConfig::default();
    let q = RedisQueue::new(
        &format!("redis://:{secret}@127.0.0.1:1/0"),
        None,
        "ns",
        [0; 32],
        config,
    )
    .unwrap();
    assert!(!format!("{q:?}").contains(secret));
    assert_eq!(q.prefix(), "ns:q:");
    for bad in [
        format!("redis://:{secret}@[not-a-host/0"),
        format!("rediss://:{secret}@localhost:1/0#insecure"),
        format!("nope://:{secret}@h:1"),
    ] {
        let e = RedisQueue::new(&bad, None, "ns", [0; 32], config).unwrap_err();
        assert!(!e.contains(secret), "{e}");
    }
    // A CA certificate needs a rediss:// URL.
    let plain = format!("redis://:{secret}@127.0.0.1:1/0");
    let e = RedisQueue::new(&plain, Some(b"pem"), "ns", [0; 32], config).unwrap_err();
    assert!(e.contains("rediss://") && !e.contains(secret), "{e}");
    let args = ["--redis".to_owned(), plain.clone()];
    let e = parse_args(&args, |_| None).unwrap_err();
    assert!(e.contains("REDIS_URL") && !e.contains(secret), "{e}");
    let a = parse_args(&[], |k| (k == "REDIS_URL").then(|| plain.clone())).unwrap();
    assert!(!format!("{a:?}").contains(secret));
}

#[tokio::test]
async fn an_unreachable_redis_stops_the_start_without_showing_the_url() {
    let secret = "hunter2-redis-pw";
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://:{secret}@127.0.0.1:{port}/0");
    let url = &url;
    let get = move |k: &str| match k {
        "PORTCULLIS_DEMO_ADDR" => Some("127.0.0.1:0".to_owned()),
        "REDIS_URL" => Some(url.clone()),
        _ => None,
    };
    let Err(e) = start(&[], get).await else {
        panic!("started without Redis")
    };
    assert!(e.to_string().contains("did not answer"), "{e}");
    assert!(!e.to_string().contains(secret), "{e}");
}

/// The longest lifetime the settings allow is one every enqueue can compute with:
/// a job enqueued with it is accepted and readable.
#[tokio::test]
async fn the_longest_job_ttl_is_usable() {
    let config = queue_config(|k| {
        (k == "PORTCULLIS_DEMO_JOB_TTL_SECS").then(|| MAX_JOB_TTL_SECS.to_string())
    })
    .unwrap();
    let demo = Demo::manual(config).await;
    let r = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    demo.shutdown().await;
}

#[test]
fn a_variable_that_is_set_is_never_read_as_unset() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;
    for name in ENV_VARS {
        for raw in [vec![0xff, 0xfe], vec![], b" ".to_vec(), b"\t\n".to_vec()] {
            let e = read_env(|k| (k == name).then(|| OsString::from_vec(raw.clone()))).unwrap_err();
            assert!(e.starts_with(name), "{name} = {raw:?}: {e}");
        }
    }
    let set =
        read_env(|k| (k == "PORTCULLIS_DEMO_MAX_DEPTH").then(|| OsString::from("5"))).unwrap();
    assert_eq!(
        set.get("PORTCULLIS_DEMO_MAX_DEPTH").map(String::as_str),
        Some("5")
    );
}

#[test]
fn every_route_is_in_the_scope_table_once() {
    let mut seen = std::collections::HashSet::new();
    for (m, p, _) in ROUTES {
        assert!(seen.insert((m.clone(), *p)), "{m} {p} listed twice");
    }
    let public: Vec<(&str, &str)> = ROUTES
        .iter()
        .filter(|r| r.2 == Access::Public)
        .map(|(m, p, _)| (m.as_str(), *p))
        .collect();
    assert_eq!(
        public,
        [
            ("GET", "/health"),
            ("GET", "/dashboard/login"),
            ("POST", "/dashboard/logout")
        ],
        "only these are public"
    );
}

fn concrete(path: &str) -> String {
    path.replace("{id}", &"0".repeat(32))
}

#[tokio::test]
async fn without_a_principal_every_protected_route_is_401_and_health_is_public() {
    let demo = Demo::start(fast_queue(), fast_worker()).await;
    for (method, path, access) in ROUTES {
        if (method.as_str(), *path) == ("POST", "/dashboard/login") {
            continue; // its credential comes from a same-origin form: its own test
        }
        if (method.as_str(), *path) == ("POST", "/dashboard/logout") {
            continue; // same-origin only: its own test
        }
        let body = (*method == "POST" || *method == "PATCH").then_some("{not json");
        let r = demo
            .call(method.as_str(), &concrete(path), None, body)
            .await;
        match access {
            Access::Public => assert_eq!(r.status, 200, "{method} {path}"),
            Access::Scope(_) | Access::Token(_) => {
                // 401 before the body is even parsed.
                r.assert_problem(401);
                assert_eq!(
                    r.header("www-authenticate"),
                    Some(r#"Bearer realm="portcullis-demo""#)
                );
            }
        }
    }
    let r = demo.call("GET", "/health", None, None).await;
    assert_eq!(r.body, r#"{"status":"ok"}"#);
    demo.shutdown().await;
}

#[tokio::test]
async fn unrouted_requests_are_behind_the_stack_too() {
    let demo = Demo::manual(fast_queue()).await;
    let job = concrete("/v1/jobs/{id}");
    // No credential: 401 before the router answers 404 or 405.
    for (method, path) in [
        ("GET", "/nowhere"),
        ("PUT", job.as_str()),
        ("GET", "/internal/latest-runs"),
    ] {
        let r = demo.call(method, path, None, None).await;
        r.assert_problem(401);
        assert!(r.header("x-request-id").is_some(), "{method} {path}");
    }
    // With one, the router's own answers.
    let cases = [
        ("GET", "/nowhere", "client", 404),
        ("PUT", job.as_str(), "client", 405),
        ("GET", "/internal/latest-runs", "worker", 405),
    ];
    for (method, path, who, status) in cases {
        let r = demo.call(method, path, Some(who), None).await;
        r.assert_problem(status);
    }
    // The public route's fallback is public.
    demo.call("POST", "/health", None, None)
        .await
        .assert_problem(405);
    demo.shutdown().await;
}

#[tokio::test]
async fn a_principal_without_the_scope_is_403_insufficient_scope() {
    let demo = Demo::start(fast_queue(), fast_worker()).await;
    for (method, path, access) in ROUTES {
        // A worker route is tried with a service token lacking the scope.
        let (scope, who) = match access {
            Access::Scope(scope) => (scope, "nobody"),
            Access::Token(scope) => (scope, "reporter"),
            Access::Public => continue,
        };
        if *path == "/dashboard/login" {
            continue; // its credential comes from a same-origin form: its own test
        }
        let r = demo
            .call(method.as_str(), &concrete(path), Some(who), Some("{}"))
            .await;
        r.assert_problem(403);
        assert_eq!(
            r.header("www-authenticate").unwrap(),
            format!(
                r#"Bearer realm="portcullis-demo", error="insufficient_scope", scope="{scope}""#
            )
        );
    }
    // A client key on the worker endpoints, a worker on the client endpoints.
    let r = demo
        .call(
            "POST",
            &concrete("/v1/jobs/{id}/complete"),
            Some("client"),
            None,
        )
        .await;
    r.assert_problem(403);
    let r = demo
        .call("POST", "/v1/jobs", Some("worker"), Some(r#"{"input":"x"}"#))
        .await;
    r.assert_problem(403);
    let r = demo.call("GET", "/dashboard", Some("client"), None).await;
    r.assert_problem(403);
    assert_eq!(demo.state.queue.stats().await.unwrap().queue_depth, 0);
    demo.shutdown().await;
}

#[tokio::test]
async fn an_api_key_holding_the_worker_scope_is_refused_on_every_worker_route() {
    let demo = Demo::manual(fast_queue()).await;
    let r = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"resize photo-1"}"#),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let job = r.json()["id"].as_str().unwrap().to_owned();
    let mut token_routes = 0;
    for (method, path, access) in ROUTES {
        if !matches!(access, Access::Token(_)) {
            continue;
        }
        token_routes += 1;
        let path = path.replace("{id}", &job);
        let body = (*method == "POST" || *method == "PATCH").then_some("{}");
        let r = demo
            .call(method.as_str(), &path, Some("key-worker"), body)
            .await;
        r.assert_problem(403);
        // A method refusal: no challenge to present another credential of the
        // same kind.
        assert_eq!(r.header("www-authenticate"), None, "{method} {path}");
    }
    assert_eq!(token_routes, 5);
    let stats = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    assert_eq!(stats.json()["scope_denials"], 5, "{}", stats.body);
    // The job was never touched by the key.
    let r = demo
        .call("GET", &format!("/v1/jobs/{job}"), Some("client"), None)
        .await;
    assert_eq!(r.json()["state"], "queued", "{r:?}");
    demo.shutdown().await;
}

#[tokio::test]
async fn a_full_life_cycle_through_the_worker_endpoints() {
    let demo = Demo::manual(fast_queue()).await;
    let r = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"resize photo-1","priority":5}"#),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.id();
    assert_eq!(r.header("location").unwrap(), format!("/v1/jobs/{id}"));
    assert_eq!(r.json()["state"], "queued");
    assert!(!r.body.contains("photo-1"), "the input is never echoed");

    let job = format!("/v1/jobs/{id}");
    let r = demo.call("GET", &job, Some("client"), None).await;
    assert_eq!((r.status, r.json()["priority"].as_u64()), (200, Some(5)));

    let r = demo
        .call(
            "PATCH",
            &format!("{job}/status"),
            Some("worker"),
            Some(r#"{"state":"running"}"#),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("running"))
    );
    let r = demo
        .call(
            "PATCH",
            &format!("{job}/progress"),
            Some("worker"),
            Some(r#"{"progress":60}"#),
        )
        .await;
    assert_eq!((r.status, r.json()["progress"].as_u64()), (200, Some(60)));
    let r = demo
        .call("POST", &format!("{job}/complete"), Some("worker"), None)
        .await;
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("completed"))
    );

    let r = demo.call("GET", &job, Some("client"), None).await;
    assert_eq!(r.json()["state"], "completed");
    assert_eq!(r.json()["progress"], 100);

    let r = demo
        .call(
            "POST",
            "/internal/latest-runs",
            Some("worker"),
            Some(r#"{"limit":5}"#),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["runs"][0]["id"], id.as_str());

    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    assert_eq!(r.status, 200);
    let s = r.json();
    assert_eq!(s["jobs_by_state"]["completed"], 1);
    assert_eq!(s["queue_depth"], 0);
    demo.shutdown().await;
}

#[tokio::test]
async fn the_in_process_worker_retries_into_the_dead_letter_queue() {
    let demo = Demo::start(fast_queue(), fast_worker()).await;
    let ok = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"thumbnail"}"#),
        )
        .await
        .id();
    let bad = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"fail: corrupt"}"#),
        )
        .await
        .id();
    let state = &demo.state;
    eventually("dead-lettered", || {
        job_state(state, &bad) == JobState::DeadLettered
    })
    .await;
    eventually("completed", || job_state(state, &ok) == JobState::Completed).await;
    let r = demo
        .call("GET", &format!("/v1/jobs/{bad}"), Some("client"), None)
        .await;
    assert_eq!(
        (r.json()["state"].as_str(), r.json()["attempts"].as_u64()),
        (Some("dead_lettered"), Some(3))
    );
    let r = demo.call("GET", "/v1/admin/dlq", Some("admin"), None).await;
    assert_eq!(r.json()["dead_letters"][0]["id"], bad.as_str());
    assert_eq!(r.json()["dead_letters"].as_array().unwrap().len(), 1);
    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    assert_eq!(r.json()["dead_letter_depth"], 1);
    demo.shutdown().await;
}

#[tokio::test]
async fn dedup_queue_full_and_cancellation() {
    let demo = Demo::manual(QueueConfig {
        max_depth: 2,
        ..fast_queue()
    })
    .await;
    let enqueue = |who, input: &str| {
        let body = format!(r#"{{"input":"{input}"}}"#);
        let demo = &demo;
        async move { demo.call("POST", "/v1/jobs", Some(who), Some(&body)).await }
    };
    let first = enqueue("client", "a").await;
    assert_eq!(first.status, 201);
    let again = enqueue("client", "a").await;
    assert_eq!((again.status, again.id()), (200, first.id()), "dedup");
    let other = enqueue("other", "a").await;
    assert_eq!(other.status, 201, "another owner's job is its own");
    assert_ne!(other.id(), first.id());

    let full = enqueue("client", "b").await;
    full.assert_problem(503);
    assert_eq!(full.header("retry-after"), Some("5"));
    assert_eq!(demo.state.queue.stats().await.unwrap().queue_depth, 2);

    // Another owner can neither see nor cancel the job.
    let job = format!("/v1/jobs/{}", first.id());
    demo.call("GET", &job, Some("other"), None)
        .await
        .assert_problem(404);
    demo.call("DELETE", &job, Some("other"), None)
        .await
        .assert_problem(404);
    let r = demo.call("DELETE", &job, Some("client"), None).await;
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("cancelled"))
    );
    // Completing a cancelled job is a conflict and changes nothing.
    let r = demo
        .call("POST", &format!("{job}/complete"), Some("worker"), None)
        .await;
    r.assert_problem(409);
    demo.call("DELETE", &job, Some("client"), None)
        .await
        .assert_problem(409);
    assert_eq!(job_state(&demo.state, &first.id()), JobState::Cancelled);
    // The slot is free again.
    assert_eq!(enqueue("client", "b").await.status, 201);
    demo.shutdown().await;
}

#[tokio::test]
async fn a_token_does_not_own_the_jobs_of_a_key_with_its_subject_as_id() {
    let demo = Demo::manual(fast_queue()).await;
    let enqueue = |who, input: &str| {
        let body = format!(r#"{{"input":"{input}"}}"#);
        let demo = &demo;
        async move { demo.call("POST", "/v1/jobs", Some(who), Some(&body)).await }
    };
    let by_key = enqueue("client", "same input").await;
    assert_eq!(by_key.status, 201);
    let key_job = format!("/v1/jobs/{}", by_key.id());
    // The token with `sub` `client` neither sees nor cancels the key's job ...
    demo.call("GET", &key_job, Some("client-token"), None)
        .await
        .assert_problem(404);
    demo.call("DELETE", &key_job, Some("client-token"), None)
        .await
        .assert_problem(404);
    // ... and the same input is a job of its own, not the key's job deduplicated.
    let by_token = enqueue("client-token", "same input").await;
    assert_eq!(by_token.status, 201, "{by_token:?}");
    assert_ne!(by_token.id(), by_key.id());
    let token_job = format!("/v1/jobs/{}", by_token.id());
    demo.call("GET", &token_job, Some("client"), None)
        .await
        .assert_problem(404);
    // Each still reads its own.
    for (who, job) in [("client", &key_job), ("client-token", &token_job)] {
        let r = demo.call("GET", job, Some(who), None).await;
        assert_eq!(
            (r.status, r.json()["state"].as_str()),
            (200, Some("queued"))
        );
    }
    assert_eq!(job_state(&demo.state, &by_key.id()), JobState::Queued);
    demo.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_a_4xx_problem_and_changes_nothing() {
    let demo = Demo::manual(fast_queue()).await;
    let id = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await
        .id();
    let before = demo.state.queue.stats().await.unwrap();
    let job = format!("/v1/jobs/{id}");
    let cases: Vec<(&str, String, &str, Option<String>, u16)> = vec![
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some("{\"input\":".into()),
            400,
        ),
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some(format!(r#"{{"input":"{}"}}"#, "a".repeat(17 * 1024))),
            413,
        ),
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some(r#"{"input":"x","extra":1}"#.into()),
            422,
        ),
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some(r#"{"priority":1}"#.into()),
            422,
        ),
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some(r#"{"input":"y","priority":10}"#.into()),
            422,
        ),
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some(r#"{"input":""}"#.into()),
            422,
        ),
        (
            "POST",
            "/v1/jobs".into(),
            "client",
            Some(format!(r#"{{"input":"{}"}}"#, "a".repeat(4097))),
            422,
        ),
        (
            "GET",
            format!("/v1/jobs/{}", "f".repeat(32)),
            "client",
            None,
            404,
        ),
        ("GET", "/v1/jobs/not-an-id".into(), "client", None, 404),
        ("GET", "/v1/jobs/%FF%FE".into(), "client", None, 404),
        (
            "GET",
            format!("/v1/jobs/{}", id.to_uppercase()),
            "client",
            None,
            404,
        ),
        (
            "PATCH",
            format!("{job}/progress"),
            "worker",
            Some(r#"{"progress":101}"#.into()),
            422,
        ),
        (
            "PATCH",
            format!("{job}/progress"),
            "worker",
            Some(r#"{"progress":-1}"#.into()),
            422,
        ),
        (
            "PATCH",
            format!("{job}/progress"),
            "worker",
            Some(r#"{"progress":5}"#.into()),
            409,
        ),
        (
            "PATCH",
            format!("{job}/status"),
            "worker",
            Some(r#"{"state":"dead_lettered"}"#.into()),
            409,
        ),
        (
            "PATCH",
            format!("{job}/status"),
            "worker",
            Some(r#"{"state":"exploded"}"#.into()),
            422,
        ),
        ("POST", format!("{job}/fail"), "worker", None, 409),
        (
            "POST",
            "/internal/latest-runs".into(),
            "worker",
            Some(r#"{"limit":0}"#.into()),
            422,
        ),
        ("GET", "/nowhere".into(), "client", None, 404),
        ("PUT", job.clone(), "client", None, 405),
    ];
    for (method, path, who, body, status) in cases {
        let r = demo.call(method, &path, Some(who), body.as_deref()).await;
        assert_eq!(r.status, status, "{method} {path} {body:?}: {r:?}");
        r.assert_problem(status);
        assert!(!r.body.contains("aaaa"), "no input echoed");
    }
    // Not JSON at all.
    let req = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: d\r\nConnection: close\r\n{}\r\nContent-Type: text/plain\r\nContent-Length: 1\r\n\r\nx",
        demo.auth("client")
    );
    raw(demo.addr, req.as_bytes()).await.assert_problem(415);
    assert_eq!(demo.state.queue.stats().await.unwrap(), before);
    assert_eq!(job_state(&demo.state, &id), JobState::Queued);
    demo.shutdown().await;
}

#[tokio::test]
async fn refusals_are_counted_in_the_stats_and_the_dashboard_renders_them() {
    let demo = Demo::manual(fast_queue()).await;
    demo.call("GET", "/v1/admin/stats", None, None)
        .await
        .assert_problem(401);
    demo.call("GET", "/v1/admin/stats", Some("client"), None)
        .await
        .assert_problem(403);
    demo.call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"q"}"#))
        .await;
    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    let s = r.json();
    assert_eq!(
        (s["auth_failures"].as_u64(), s["scope_denials"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(s["rate_limited"], 0);
    assert_eq!(s["queue_depth"], 1);

    demo.call("GET", "/dashboard", None, None)
        .await
        .assert_problem(401);
    let r = demo.call("GET", "/dashboard", Some("admin"), None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(
        r.header("content-security-policy")
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert!(
        r.body.contains(r#"<td id="queue_depth">1</td>"#),
        "{}",
        r.body
    );
    assert!(r.body.contains(r#"<td id="queued">1</td>"#));
    assert!(
        r.body.contains(r#"<td id="auth_failures">2</td>"#),
        "the dashboard's own 401 counted"
    );
    demo.shutdown().await;
}

#[tokio::test]
async fn the_internal_endpoint_needs_the_scope_and_an_internal_address() {
    // The test peer (127.0.0.1) is a trusted proxy; the client is in X-Forwarded-For.
    let demo = Demo::launch(Setup {
        client_ip: ClientIpConfig::trusted_proxies("127.0.0.1/32").unwrap(),
        internal: IpSet::parse("10.0.0.0/8").unwrap(),
        ..Setup::new(fast_queue(), None)
    })
    .await;
    let call = |from: &str, who: Option<&str>| {
        let forwarded = format!("X-Forwarded-For: {from}");
        let mut headers = vec![forwarded];
        headers.extend(who.map(|w| demo.auth(w).to_owned()));
        let demo = &demo;
        async move {
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            demo.call_with("POST", "/internal/latest-runs", &headers, Some("{}"))
                .await
        }
    };
    let r = call("10.1.2.3", Some("worker")).await;
    assert_eq!(
        (r.status, r.json()["runs"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let r = call("203.0.113.9", Some("worker")).await;
    r.assert_problem(403);
    assert!(
        r.header("www-authenticate").is_none(),
        "an address refusal, not a scope one"
    );
    call("10.1.2.3", Some("client")).await.assert_problem(403);
    call("10.1.2.3", None).await.assert_problem(401);
    // Other routes are not restricted by address.
    let r = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await;
    assert_eq!(r.status, 201);
    demo.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_a_job_in_flight_and_stops() {
    let worker = WorkerConfig {
        work_time: 20 * MS, // a slow job takes 200 ms
        ..fast_worker()
    };
    let demo = Demo::start(fast_queue(), worker).await;
    let id = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"slow render"}"#),
        )
        .await
        .id();
    let waiting = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"next"}"#),
        )
        .await
        .id();
    let state = demo.state.clone();
    eventually("running", || job_state(&state, &id) == JobState::Running).await;
    let addr = demo.addr;
    demo.shutdown().await;
    assert_eq!(
        job_state(&state, &id),
        JobState::Completed,
        "drained, not abandoned"
    );
    assert_eq!(job_state(&state, &waiting), JobState::Queued);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn a_worker_whose_token_is_refused_changes_nothing_and_pauses() {
    use portcullis::jwt::{SigningKey, TokenIssuer};
    let forged = TokenIssuer::builder(SigningKey::hs256(&[9u8; 32]).unwrap())
        .issuer(guard::ISSUER)
        .subject(guard::WORKER_SUBJECT)
        .audience(guard::AUDIENCE)
        .scope("jobs:work")
        .build()
        .unwrap();
    let demo = Demo::launch(Setup {
        worker_issuer: Some(forged),
        ..Setup::new(
            fast_queue(),
            Some(WorkerConfig {
                breaker: BreakerConfig {
                    threshold: 3,
                    cooldown: Duration::from_secs(3600),
                },
                ..fast_worker()
            }),
        )
    })
    .await;
    let id = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await
        .id();
    let state = demo.state.clone();
    eventually("paused", || state.worker.snapshot().paused).await;
    assert_eq!(job_state(&state, &id), JobState::Queued, "never claimed");
    let s = serde_json::to_value(routes::gather(&state).await.unwrap()).unwrap();
    assert_eq!(s["auth_failures"], 3, "each claim refused with 401: {s}");
    demo.shutdown().await;
}

#[tokio::test]
async fn a_worker_over_its_limit_repeats_the_outcome_until_it_gets_through() {
    let secret = TokenSecret::generate().unwrap();
    let demo_guard = Guard::new(
        GuardConfig::new(
            guard::demo_keys(guard::DEMO_KEYS).unwrap().1,
            secret.clone(),
            IpSet::parse(DEFAULT_INTERNAL).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    // Not the worker's own subject: the principal quota applies, one call a second.
    let slow_lane = demo_guard.issuer("slow-lane-worker", "jobs:work").unwrap();
    let demo = Demo::launch(Setup {
        worker_issuer: Some(slow_lane),
        rate: Quota::per_second(1).unwrap(),
        secret,
        ..Setup::new(fast_queue(), Some(fast_worker()))
    })
    .await;
    let id = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await
        .id();
    let state = demo.state.clone();
    // The claim passes; the progress report and the first completions get 429; the
    // completion is repeated until the quota lets it through.
    eventually("completed", || {
        job_state(&state, &id) == JobState::Completed
    })
    .await;
    let v = state.queue.get(JobId::parse(&id).unwrap()).await.unwrap();
    assert_eq!(v.attempts, 0, "{v:?}");
    let s = serde_json::to_value(routes::gather(&state).await.unwrap()).unwrap();
    assert!(s["rate_limited"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["worker"]["paused"], false, "{s}");
    demo.shutdown().await;
}

#[test]
fn the_attempt_of_a_worker_call_is_a_number_or_nothing() {
    assert_eq!(routes::attempt_param(None), Ok(None));
    assert_eq!(routes::attempt_param(Some("")), Ok(None));
    assert_eq!(routes::attempt_param(Some("attempt=0")), Ok(Some(0)));
    assert_eq!(
        routes::attempt_param(Some("attempt=4294967295")),
        Ok(Some(u32::MAX))
    );
    for bad in [
        "attempt=",
        "attempt=-1",
        "attempt=+1",
        "attempt=4294967296",
        "attempt=99999999999",
        "attempt=1&x=2",
        "x=1",
        "attempt=1 ",
        "attempt=%31",
        "Attempt=1",
        "attempt=01",
        "attempt=00",
        "attempt=04294967295",
    ] {
        assert_eq!(
            routes::attempt_param(Some(bad)),
            Err(routes::BadAttempt),
            "{bad}"
        );
    }
}

proptest::proptest! {
    #[test]
    fn attempt_params_parse_only_what_they_print(n in proptest::prelude::any::<u32>(), q in "\\PC{0,30}") {
        let printed = format!("attempt={n}");
        proptest::prop_assert_eq!(routes::attempt_param(Some(&printed)), Ok(Some(n)));
        if let Ok(Some(m)) = routes::attempt_param(Some(&q)) {
            proptest::prop_assert_eq!(q, format!("attempt={m}"));
        }
    }

    /// Digits with leading zeros, a sign or padding are not the printed form: refused.
    #[test]
    fn attempt_params_in_another_spelling_are_refused(
        pad in "(0{1,3}|\\+|-| )",
        n in proptest::prelude::any::<u32>(),
    ) {
        let q = format!("attempt={pad}{n}");
        proptest::prop_assert_eq!(routes::attempt_param(Some(&q)), Err(routes::BadAttempt));
    }
}

#[tokio::test]
async fn a_worker_call_for_a_stale_run_is_409() {
    let demo = Demo::manual(fast_queue()).await;
    let id = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await
        .id();
    let status = format!("/v1/jobs/{id}/status");
    let r = demo
        .call(
            "PATCH",
            &status,
            Some("worker"),
            Some(r#"{"state":"running"}"#),
        )
        .await;
    assert_eq!((r.status, r.json()["attempts"].as_u64()), (200, Some(0)));
    for path in ["complete", "fail"] {
        let r = demo
            .call(
                "POST",
                &format!("/v1/jobs/{id}/{path}?attempt=x"),
                Some("worker"),
                None,
            )
            .await;
        r.assert_problem(400);
        assert!(!r.body.contains("attempt=x"));
        let r = demo
            .call(
                "POST",
                &format!("/v1/jobs/{id}/{path}?attempt=3"),
                Some("worker"),
                None,
            )
            .await;
        r.assert_problem(409);
    }
    let r = demo
        .call(
            "PATCH",
            &format!("/v1/jobs/{id}/progress?attempt=3"),
            Some("worker"),
            Some(r#"{"progress":10}"#),
        )
        .await;
    r.assert_problem(409);
    assert_eq!(job_state(&demo.state, &id), JobState::Running);
    let r = demo
        .call(
            "POST",
            &format!("/v1/jobs/{id}/complete?attempt=0"),
            Some("worker"),
            None,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["state"].as_str()),
        (200, Some("completed"))
    );
    demo.shutdown().await;
}

/// A token signed with `secret`, with these claims (times relative to now).
fn craft_token(secret: &[u8], aud: &str, scope: &str, iat: i64, exp: i64) -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({
        "iss": guard::ISSUER, "sub": "test-worker", "aud": aud, "scope": scope,
        "iat": now + iat, "exp": now + exp,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn every_authentication_failure_is_refused_and_changes_nothing() {
    let secret = [7u8; 32];
    let demo = Demo::launch(Setup {
        secret: TokenSecret::from_bytes(&secret),
        ..Setup::new(fast_queue(), None)
    })
    .await;
    let id = demo
        .call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
        .await
        .id();
    let before = demo.state.queue.stats().await.unwrap();
    let job = format!("/v1/jobs/{id}");
    let complete = format!("{job}/complete");
    let unknown = format!(
        "X-API-Key: {}",
        generate_key("pc_test").unwrap().expose_secret()
    );
    let bearer = |t: String| format!("Authorization: Bearer {t}");
    let forged = bearer(craft_token(
        &[9u8; 32],
        guard::AUDIENCE,
        "jobs:work",
        -10,
        600,
    ));
    let expired = bearer(craft_token(
        &secret,
        guard::AUDIENCE,
        "jobs:work",
        -7200,
        -3600,
    ));
    let wrong_aud = bearer(craft_token(&secret, "another-api", "jobs:work", -10, 600));
    let valid = bearer(craft_token(&secret, guard::AUDIENCE, "jobs:work", -10, 600));
    let both = [demo.auth("client"), demo.auth("worker")];

    // The crafted valid token proves the crafted ones differ only in what is tested.
    let r = demo.call_with("POST", &complete, &[&valid], None).await;
    assert_eq!(
        r.status, 409,
        "a cancelled-or-queued job: past authentication {r:?}"
    );

    // (what, path, headers, status)
    let cases: Vec<(&str, &str, Vec<&str>, u16)> = vec![
        ("no credential", &job, vec![], 401),
        (
            "garbage key",
            &job,
            vec!["X-API-Key: not-a-key-at-all"],
            401,
        ),
        (
            "bad checksum",
            &job,
            vec!["X-API-Key: pc_test_AAAAAAAAAAAAAAAAAAAAAAAAAAAA"],
            401,
        ),
        ("unknown key", &job, vec![&unknown], 401),
        ("revoked key", &job, vec![demo.auth("revoked")], 401),
        ("expired key", &job, vec![demo.auth("expired")], 401),
        ("forged token", &complete, vec![&forged], 401),
        ("expired token", &complete, vec![&expired], 401),
        (
            "token for another audience",
            &complete,
            vec![&wrong_aud],
            401,
        ),
        ("a key and a token at once", &job, both.to_vec(), 400),
        (
            "worker token without jobs:work",
            &complete,
            vec![demo.auth("reporter")],
            403,
        ),
        (
            "client key on a worker endpoint",
            &complete,
            vec![demo.auth("client")],
            403,
        ),
        (
            "worker token on a client endpoint",
            &job,
            vec![demo.auth("worker")],
            403,
        ),
        ("dashboard without a key", "/dashboard", vec![], 401),
        (
            "dashboard with a client key",
            "/dashboard",
            vec![demo.auth("client")],
            403,
        ),
    ];
    let mut invalid_key_bodies = std::collections::HashSet::new();
    for (what, path, headers, status) in &cases {
        let method = if path.ends_with("complete") {
            "POST"
        } else {
            "GET"
        };
        let r = demo.call_with(method, path, headers, None).await;
        assert_eq!(r.status, *status, "{what}: {r:?}");
        r.assert_problem(*status);
        for secret_part in headers.iter().filter_map(|h| h.split_once(": ")) {
            assert!(!r.body.contains(secret_part.1), "{what}: credential echoed");
        }
        if ["unknown key", "revoked key", "expired key"].contains(what) {
            invalid_key_bodies.insert((
                r.body.clone(),
                r.header("www-authenticate").map(str::to_owned),
            ));
        }
    }
    assert_eq!(
        invalid_key_bodies.len(),
        1,
        "unknown, revoked and expired keys get the identical answer: {invalid_key_bodies:?}"
    );
    assert_eq!(demo.state.queue.stats().await.unwrap(), before);
    assert_eq!(job_state(&demo.state, &id), JobState::Queued);
    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    assert_eq!(r.json()["auth_failures"], 11, "{}", r.body);
    assert_eq!(r.json()["scope_denials"], 4, "{}", r.body);
    demo.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_answers_429_per_principal() {
    let demo = Demo::launch(Setup {
        rate: Quota::per_minute(3).unwrap(),
        ..Setup::new(fast_queue(), None)
    })
    .await;
    let job = format!(
        "/v1/jobs/{}",
        demo.call("POST", "/v1/jobs", Some("client"), Some(r#"{"input":"x"}"#))
            .await
            .id()
    );
    for _ in 0..2 {
        let r = demo.call("GET", &job, Some("client"), None).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("ratelimit").is_some(), "{r:?}");
    }
    let r = demo.call("GET", &job, Some("client"), None).await;
    r.assert_problem(429);
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    // Per principal: another key is not limited by the first one's use, nor is a
    // token whose subject is the same text as the key's id (it is another
    // principal, so the job is not its own either).
    assert_eq!(
        demo.call("GET", &job, Some("other"), None).await.status,
        404
    );
    for _ in 0..3 {
        let r = demo.call("GET", &job, Some("client-token"), None).await;
        assert_eq!(r.status, 404, "{r:?}");
    }
    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    assert_eq!(r.json()["rate_limited"], 1, "{}", r.body);
    demo.shutdown().await;
}

#[tokio::test]
async fn repeated_failed_authentication_is_throttled_per_address() {
    let demo = Demo::launch(Setup {
        auth_failures: Quota::new(3, Duration::from_secs(600)).unwrap(),
        ..Setup::new(fast_queue(), Some(fast_worker()))
    })
    .await;
    let unknown = format!(
        "X-API-Key: {}",
        generate_key("pc_test").unwrap().expose_secret()
    );
    // Requests without a credential guess nothing and are not counted.
    for _ in 0..5 {
        demo.call("GET", "/v1/admin/stats", None, None)
            .await
            .assert_problem(401);
    }
    for _ in 0..3 {
        demo.call_with("GET", "/v1/admin/stats", &[&unknown], None)
            .await
            .assert_problem(401);
    }
    let r = demo
        .call_with("GET", "/v1/admin/stats", &[&unknown], None)
        .await;
    r.assert_problem(429);
    assert!(r.header("retry-after").is_some());
    // The address (loopback, shared by every client here and by the in-process
    // worker) is throttled: wrong keys get 429, valid credentials still pass.
    assert_eq!(
        demo.call("GET", "/v1/admin/stats", Some("admin"), None)
            .await
            .status,
        200
    );
    assert_eq!(demo.call("GET", "/health", None, None).await.status, 200);
    let id = demo
        .call(
            "POST",
            "/v1/jobs",
            Some("client"),
            Some(r#"{"input":"thumbnail"}"#),
        )
        .await
        .id();
    let state = &demo.state;
    eventually(
        "completed by the worker while the address is throttled",
        || job_state(state, &id) == JobState::Completed,
    )
    .await;
    let s = serde_json::to_value(routes::gather(&demo.state).await.unwrap()).unwrap();
    assert_eq!(
        (s["auth_failures"].as_u64(), s["rate_limited"].as_u64()),
        (Some(8), Some(1)),
        "{s}"
    );
    demo.shutdown().await;
}

/// A `redis-server` on a free loopback port, killed on drop; `None` (after saying
/// so) when the binary is missing, unless `PORTCULLIS_REQUIRE_REDIS=1`.
struct RedisServer(std::process::Child, u16);

impl RedisServer {
    fn start() -> Option<Self> {
        use std::process::{Command, Stdio};
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !found {
            let required = std::env::var("PORTCULLIS_REQUIRE_REDIS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "PORTCULLIS_REQUIRE_REDIS=1 but redis-server is not on PATH"
            );
            eprintln!(
                "SKIPPED: redis-server is not on PATH; the demo's shared-limit test did not run"
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        // Owned by the guard from here on: killed and waited for on drop.
        let server = Self(child, port);
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn two_instances_share_their_limits_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}/0", redis.1);
    let secret = TokenSecret::generate().unwrap();
    let instance = || async {
        let limiter = guard::redis_limiter(Some(&url), guard::DEFAULT_NAMESPACE, None)
            .unwrap()
            .unwrap();
        // As `main` does: serve connected from the first request.
        limiter.connect().await.unwrap();
        Demo::launch(Setup {
            rate: Quota::per_minute(3).unwrap(),
            redis: Some(limiter),
            secret: secret.clone(),
            ..Setup::new(fast_queue(), None)
        })
        .await
    };
    let (a, b) = (instance().await, instance().await);
    // Each instance generated its own keys: the shared bucket is keyed by the
    // principal's id ("reader" on both).
    let path = format!("/v1/jobs/{}", "0".repeat(32));
    assert_eq!(a.call("GET", &path, Some("reader"), None).await.status, 404);
    assert_eq!(b.call("GET", &path, Some("reader"), None).await.status, 404);
    assert_eq!(a.call("GET", &path, Some("reader"), None).await.status, 404);
    let r = b.call("GET", &path, Some("reader"), None).await;
    r.assert_problem(429);
    let r = a.call("GET", &path, Some("reader"), None).await;
    r.assert_problem(429);
    drop(redis);
    // Redis gone: the limiter fails closed (503), it never silently stops sharing.
    let r = a.call("GET", &path, Some("other"), None).await;
    r.assert_problem(503);
    a.shutdown().await;
    b.shutdown().await;
}

/// With Redis, the failed-authentication counts are kept there too (one budget
/// of guesses across instances, not one per instance): a wrong key's count is asked
/// of Redis, so while Redis does not answer the fail-closed demo refuses it with 503
/// rather than counting it in this instance's memory alone.
#[tokio::test]
async fn failed_authentications_are_counted_in_redis() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let limiter = guard::redis_limiter(Some(&url), guard::DEFAULT_NAMESPACE, None)
        .unwrap()
        .unwrap();
    let demo = Demo::launch(Setup {
        redis: Some(limiter),
        ..Setup::new(fast_queue(), None)
    })
    .await;
    let unknown = format!(
        "X-API-Key: {}",
        generate_key("pc_test").unwrap().expose_secret()
    );
    demo.call_with("GET", "/v1/admin/stats", &[&unknown], None)
        .await
        .assert_problem(503);
    demo.shutdown().await;
}

/// Replays one printed curl line without curl: `-H`, `-d` and the URL.
async fn replay(line: &str, job: &str) -> String {
    let line = line.replace("$JOB", job);
    let quoted: Vec<&str> = line.split('\'').collect();
    let mut headers = Vec::new();
    let mut body = None;
    for (i, part) in quoted.iter().enumerate().skip(1).step_by(2) {
        match quoted[i - 1].trim_end().rsplit(' ').next() {
            Some("-H") => headers.push(part.to_string()),
            Some("-d") => body = Some(part.to_string()),
            _ => {}
        }
    }
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap();
    let (addr, path) = url["http://".len()..].split_once('/').unwrap();
    let method = if body.is_some() { "POST" } else { "GET" };
    let mut req = format!("{method} /{path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in &headers {
        req.push_str(&format!("{h}\r\n"));
    }
    if let Some(b) = &body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    req.push_str(body.as_deref().unwrap_or(""));
    raw(addr.parse().unwrap(), req.as_bytes()).await.body
}

#[tokio::test]
async fn the_printed_curl_lines_work_verbatim() {
    let env = |k: &str| (k == "PORTCULLIS_DEMO_ADDR").then(|| "127.0.0.1:0".to_owned());
    let (listener, router, state, _issuer, banner) = start(&[], env).await.unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let s = state.clone();
    let server = tokio::spawn(async move {
        serve(listener, router, &s, None, async {
            let _ = rx.await;
        })
        .await
    });
    let lines: Vec<&str> = banner
        .lines()
        .filter(|l| l.starts_with("curl ") || l.starts_with("JOB=$(curl "))
        .collect();
    assert_eq!(lines.len(), 4, "{banner}");
    let has_curl = std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok();
    let outputs: Vec<String> = if has_curl {
        // One shell, the lines exactly as printed, a separator printed between them.
        let script = lines.join("\nprintf '\\n@@\\n'\n");
        let script = format!("{script}\nprintf '\\n@@\\nJOB=%s\\n' \"$JOB\"");
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                // Loopback is never proxied, whatever the environment says.
                .env("no_proxy", "*")
                .env("NO_PROXY", "*")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .split("\n@@\n")
            .map(str::to_owned)
            .collect()
    } else {
        eprintln!("curl is not on PATH: replaying the printed lines through the test client");
        let created = replay(lines[0].split_once("$(").unwrap().1, "").await;
        let job = serde_json::from_str::<serde_json::Value>(&created).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut v = vec![String::new()];
        for l in &lines[1..] {
            v.push(replay(l, &job).await);
        }
        v.push(format!("JOB={job}\n"));
        v
    };
    let job = outputs[4].trim().strip_prefix("JOB=").unwrap().to_owned();
    assert_eq!(job.len(), 32, "{outputs:?}");
    let got: serde_json::Value = serde_json::from_str(&outputs[1]).unwrap();
    assert_eq!(
        (got["id"].as_str(), got["state"].as_str()),
        (Some(job.as_str()), Some("queued"))
    );
    let stats: serde_json::Value = serde_json::from_str(&outputs[2]).unwrap();
    assert_eq!(stats["queue_depth"], 1, "{stats}");
    assert!(
        outputs[3].contains(r#"<td id="queue_depth">1</td>"#),
        "{}",
        outputs[3]
    );
    assert!(banner.contains("worker signing key"));
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn configured_credentials_are_used_and_never_printed() {
    let dir = std::env::temp_dir().join(format!("qs-creds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = generate_key("pc_live").unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[keys]]\nid = \"ops\"\ndigest = \"{}\"\nscopes = [\"admin\"]\n",
            key.digest()
        ),
    )
    .unwrap();
    let token = dir.join("token.key");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef-secret\n").unwrap();
    let (k, t) = (keys.display().to_string(), token.display().to_string());
    let env = move |name: &str| match name {
        "PORTCULLIS_DEMO_ADDR" => Some("127.0.0.1:0".to_owned()),
        "PORTCULLIS_DEMO_KEY_FILE" => Some(k.clone()),
        "PORTCULLIS_DEMO_TOKEN_KEY_FILE" => Some(t.clone()),
        _ => None,
    };
    let env = &env;
    let (listener, router, state, _issuer, banner) = start(&[], |n| env(n)).await.unwrap();
    assert!(!banner.contains("pc_"), "{banner}");
    assert!(!banner.contains("curl"), "{banner}");
    assert!(!banner.contains("secret"), "{banner}");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let s = state.clone();
    let server = tokio::spawn(async move {
        serve(listener, router, &s, None, async {
            let _ = rx.await;
        })
        .await
    });
    let req = format!(
        "GET /v1/admin/stats HTTP/1.1\r\nHost: d\r\nConnection: close\r\nX-API-Key: {}\r\n\r\n",
        key.expose_secret()
    );
    assert_eq!(raw(addr, req.as_bytes()).await.status, 200);
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where the browser driver lives, and whether it and Chromium are installed. With
/// `PORTCULLIS_REQUIRE_BROWSER=1` (set by CI) a missing piece fails the test;
/// otherwise the test is skipped with a message.
fn browser_driver() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let missing: Vec<String> = [
        (
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core (npm ci --prefix examples/queue-service/browser)".to_owned(),
        ),
        (
            std::path::Path::new(&chromium).exists(),
            format!("Chromium at {chromium}"),
        ),
        (
            std::process::Command::new("node")
                .arg("--version")
                .output()
                .is_ok(),
            "node".to_owned(),
        ),
    ]
    .into_iter()
    .filter_map(|(ok, what)| (!ok).then_some(what))
    .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let required = std::env::var("PORTCULLIS_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    assert!(!required, "the browser test needs: {}", missing.join(", "));
    eprintln!("SKIPPED: the browser test needs {}", missing.join(", "));
    None
}

/// A path under the demo's `test-artifacts` (kept for a person to look at), with no
/// file left there by an earlier run.
fn fresh_artifact(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

#[tokio::test]
async fn a_real_browser_shows_the_dashboard_only_with_the_credential() {
    let Some(driver) = browser_driver() else {
        return;
    };
    let demo = Demo::manual(fast_queue()).await;
    demo.call(
        "POST",
        "/v1/jobs",
        Some("client"),
        Some(r#"{"input":"seen in a browser"}"#),
    )
    .await;
    let shot = fresh_artifact("dashboard.png");
    let base = format!("http://{}", demo.addr);
    let admin = demo.auth("admin").to_owned();
    let (header, value) = admin
        .split_once(": ")
        .map(|(h, v)| (h.to_owned(), v.to_owned()))
        .unwrap();
    let out = {
        let (driver, shot) = (driver.clone(), shot.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("node")
                .arg(driver.join("dashboard.mjs"))
                .args([base.as_str(), header.as_str(), value.as_str()])
                .arg(&shot)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser driver failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["refused_status"], 401, "{seen}");
    assert_eq!(seen["refused_has_figures"], false, "{seen}");
    assert_eq!(seen["status"], 200, "{seen}");
    assert_eq!(seen["title"], "portcullis demo queue");
    assert_eq!(seen["heading"], "Job queue");
    assert_eq!(seen["cells"]["queue_depth"], "1", "{seen}");
    assert_eq!(seen["cells"]["queued"], "1", "{seen}");
    assert_eq!(seen["cells"]["worker"], "running", "{seen}");
    assert!(
        seen["csp"]
            .as_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1000,
        "a real PNG"
    );
    demo.shutdown().await;
}

#[tokio::test]
async fn trusted_proxies_come_from_the_environment() {
    let args = vec!["--addr".to_owned(), "127.0.0.1:0".to_owned()];
    let bad = |k: &str| (k == "PORTCULLIS_DEMO_TRUSTED_PROXIES").then(|| "not-a-cidr".to_owned());
    let Err(e) = start(&args, bad).await else {
        panic!("a bad proxy list is refused")
    };
    assert!(
        e.to_string().starts_with("PORTCULLIS_DEMO_TRUSTED_PROXIES"),
        "{e}"
    );
    let good =
        |k: &str| (k == "PORTCULLIS_DEMO_TRUSTED_PROXIES").then(|| "127.0.0.1/32".to_owned());
    let (listener, app, state, _issuer, _banner) = start(&args, good).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        serve(listener, app, &state, None, async move {
            let _ = stopped.await;
        })
        .await
    });
    // The peer (127.0.0.1) is a trusted proxy: the client named in X-Forwarded-For is
    // outside the internal networks, so the internal endpoint refuses it by address.
    let r = raw(
        addr,
        b"POST /internal/latest-runs HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A form POST of `body` to the login with these extra header lines, as a browser
/// sends it (`Host: demo`).
async fn login_with(demo: &Demo, body: &str, headers: &[&str]) -> Reply {
    let mut req = format!(
        "POST /dashboard/login HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(demo.addr, req.as_bytes()).await
}

/// The key of a named credential.
fn key_of<'a>(demo: &'a Demo, who: &str) -> &'a str {
    demo.auth(who).strip_prefix("X-API-Key: ").unwrap()
}

const SAME_ORIGIN: &str = "Origin: http://demo";

/// The session token a successful login sets.
fn session_token(r: &Reply) -> String {
    let cookie = r.header("set-cookie").expect("a cookie");
    let (pair, _) = cookie.split_once(';').unwrap();
    pair.strip_prefix("pc_dashboard=").unwrap().to_owned()
}

#[tokio::test]
async fn the_dashboard_login_sets_a_session_cookie_for_the_dashboard_only() {
    let demo = Demo::manual(fast_queue()).await;
    let form = demo.call("GET", "/dashboard/login", None, None).await;
    assert_eq!(form.status, 200);
    assert!(
        form.body
            .contains(r#"<form method="post" action="/dashboard/login">"#)
    );
    assert!(form.body.contains(r#"name="key""#));
    let csp = form.header("content-security-policy").unwrap();
    assert!(csp.contains("form-action 'self'") && csp.starts_with("default-src 'none'"));

    let admin = key_of(&demo, "admin").to_owned();
    let r = login_with(&demo, &format!("key={admin}"), &[SAME_ORIGIN]).await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/dashboard"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let cookie = r.header("set-cookie").unwrap();
    assert!(
        cookie.ends_with("; Path=/dashboard; Max-Age=600; HttpOnly; SameSite=Strict"),
        "{cookie}"
    );
    assert!(!r.body.contains(&admin) && !cookie.contains(&admin));
    let token = session_token(&r);
    let with_cookie = format!("Cookie: theme=dark; pc_dashboard={token}");

    // The cookie opens the dashboard.
    let page = demo
        .call_with("GET", "/dashboard", &[&with_cookie], None)
        .await;
    assert_eq!(page.status, 200, "{page:?}");
    assert!(page.body.contains("<h1>Job queue</h1>"));
    assert!(page.body.contains(r#"action="/dashboard/logout""#));
    // It opens nothing else: no API route reads the cookie, and its token is not
    // one the API accepts.
    let bearer = format!("Authorization: Bearer {token}");
    for path in [
        "/v1/admin/stats",
        "/v1/admin/dlq",
        "/v1/jobs/00000000000000000000000000000000",
    ] {
        for h in [&with_cookie, &bearer] {
            let r = demo.call_with("GET", path, &[h], None).await;
            r.assert_problem(401);
        }
    }
    let r = demo
        .call_with("POST", "/internal/latest-runs", &[&bearer], Some("{}"))
        .await;
    r.assert_problem(401);
    // A credential header wins over the cookie: the client key has no
    // dashboard:read.
    let client = demo.auth("client").to_owned();
    let r = demo
        .call_with("GET", "/dashboard", &[&client, &with_cookie], None)
        .await;
    r.assert_problem(403);

    // Logout clears it.
    let r = demo
        .call_with(
            "POST",
            "/dashboard/logout",
            &[SAME_ORIGIN, &with_cookie],
            None,
        )
        .await;
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/dashboard/login"));
    assert_eq!(
        r.header("set-cookie"),
        Some("pc_dashboard=; Path=/dashboard; Max-Age=0; HttpOnly; SameSite=Strict")
    );
    demo.shutdown().await;
}

#[tokio::test]
async fn bad_dashboard_logins_and_cookies_are_refused_and_never_echoed() {
    let secret = [9u8; 32];
    let demo = Demo::launch(Setup {
        secret: TokenSecret::from_bytes(&secret),
        ..Setup::new(fast_queue(), None)
    })
    .await;
    let admin = key_of(&demo, "admin").to_owned();
    let form = format!("key={admin}");
    // Not same-origin: refused before the key is even read.
    for headers in [
        &[][..],
        &["Origin: http://evil.example"],
        &["Origin: null"],
        &["Origin: http://demo.evil.example"],
        &[SAME_ORIGIN, "Sec-Fetch-Site: cross-site"],
        &[SAME_ORIGIN, "Sec-Fetch-Site: same-site"],
    ] {
        let r = login_with(&demo, &form, headers).await;
        r.assert_problem(403);
        assert!(r.header("set-cookie").is_none());
        assert!(
            !r.body.contains(&admin) && !r.body.contains("evil"),
            "{r:?}"
        );
    }
    let r = demo.call_with("POST", "/dashboard/logout", &[], None).await;
    r.assert_problem(403);
    assert!(r.header("set-cookie").is_none());
    // Same-origin, but no usable key: the stack refuses it like any request.
    let planted = "pc_test_notARealKey000000000000000000";
    for body in [
        format!("key={planted}"),
        String::new(),
        "key=".to_owned(),
        format!("key={admin}&key={admin}"),
        "key=%3Cscript%3E".to_owned(),
    ] {
        let r = login_with(&demo, &body, &[SAME_ORIGIN]).await;
        r.assert_problem(401);
        assert!(r.header("set-cookie").is_none());
        assert!(
            !r.body.contains(planted) && !r.body.contains("script"),
            "{r:?}"
        );
    }
    // A key without dashboard:read.
    let client = key_of(&demo, "client").to_owned();
    let r = login_with(&demo, &format!("key={client}"), &[SAME_ORIGIN]).await;
    r.assert_problem(403);
    assert!(r.header("set-cookie").is_none());
    // A credential header is not a login: only the form's key counts.
    let admin_header = demo.auth("admin").to_owned();
    let r = login_with(&demo, "", &[SAME_ORIGIN, &admin_header]).await;
    r.assert_problem(401);
    // Not a form.
    let mut req = format!(
        "POST /dashboard/login HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n{SAME_ORIGIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        form.len()
    );
    req.push_str(&form);
    raw(demo.addr, req.as_bytes()).await.assert_problem(415);
    let big = format!("key={}", "a".repeat(2000));
    login_with(&demo, &big, &[SAME_ORIGIN])
        .await
        .assert_problem(413);

    // Cookies the dashboard refuses: an API token (wrong audience), an expired or
    // forged session, garbage.
    let cookie = |t: &str| format!("Cookie: pc_dashboard={t}");
    let worker = demo
        .auth("worker")
        .strip_prefix("Authorization: Bearer ")
        .unwrap()
        .to_owned();
    let aud = guard::DASHBOARD_AUDIENCE;
    let expired = craft_token(&secret, aud, "dashboard:read", -700, -100);
    let forged = craft_token(&[1u8; 32], aud, "dashboard:read", -10, 600);
    // A session names the key it was minted from; one that names none is refused.
    let bound = format!(
        "dashboard:read {}{}",
        guard::SESSION_KEY_SCOPE,
        portcullis::api_key::KeyDigest::of(&admin)
    );
    let valid = craft_token(&secret, aud, &bound, -10, 600);
    let unbound = craft_token(&secret, aud, "dashboard:read", -10, 600);
    let no_scope = craft_token(&secret, aud, "jobs:read", -10, 600);
    for (t, status) in [
        (worker.as_str(), 401),
        (expired.as_str(), 401),
        (forged.as_str(), 401),
        ("not-a-token", 401),
        ("<script>alert(1)</script>", 401),
        (no_scope.as_str(), 403),
        (unbound.as_str(), 401),
        (valid.as_str(), 200),
    ] {
        let r = demo
            .call_with("GET", "/dashboard", &[&cookie(t)], None)
            .await;
        assert_eq!(r.status, status, "{t}: {r:?}");
        assert!(!r.body.contains("script") && !r.body.contains(t), "{r:?}");
    }
    // Two session cookies: ambiguous, neither is used.
    let two = format!("Cookie: pc_dashboard={valid}; pc_dashboard={valid}");
    demo.call_with("GET", "/dashboard", &[&two], None)
        .await
        .assert_problem(401);
    demo.shutdown().await;
}

#[tokio::test]
async fn a_real_browser_logs_in_sees_the_figures_and_is_refused_after_logout() {
    let Some(driver) = browser_driver() else {
        return;
    };
    let demo = Demo::manual(fast_queue()).await;
    demo.call(
        "POST",
        "/v1/jobs",
        Some("client"),
        Some(r#"{"input":"seen after a login"}"#),
    )
    .await;
    let shot = fresh_artifact("dashboard-login.png");
    let base = format!("http://{}", demo.addr);
    let key = key_of(&demo, "admin").to_owned();
    let out = {
        let (driver, shot) = (driver.clone(), shot.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("node")
                .arg(driver.join("dashboard_login.mjs"))
                .args([base.as_str(), key.as_str()])
                .arg(&shot)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser driver failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["before_status"], 401, "{seen}");
    assert_eq!(seen["login_status"], 200, "{seen}");
    assert_eq!(
        seen["url"],
        format!("http://{}/dashboard", demo.addr),
        "{seen}"
    );
    assert_eq!(seen["heading"], "Job queue", "{seen}");
    assert_eq!(seen["cells"]["queued"], "1", "{seen}");
    assert_eq!(seen["cells"]["backend"], "memory", "{seen}");
    let cookie = &seen["cookie"];
    assert_eq!(cookie["httpOnly"], true, "{seen}");
    assert_eq!(cookie["sameSite"], "Strict", "{seen}");
    assert_eq!(cookie["path"], "/dashboard", "{seen}");
    assert!(
        cookie["expires"].as_f64().unwrap() > 0.0,
        "a session of limited life: {seen}"
    );
    assert_eq!(seen["script_sees_cookie"], false, "{seen}");
    assert_eq!(seen["api_status"], 401, "the cookie grants no API: {seen}");
    assert_eq!(seen["cookies_after_logout"], 0, "{seen}");
    assert_eq!(seen["after_status"], 401, "{seen}");
    assert_eq!(seen["after_has_figures"], false, "{seen}");
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 1000,
        "a real PNG"
    );
    println!("screenshot: {}", shot.display());
    demo.shutdown().await;
}

#[tokio::test]
async fn the_admin_view_reports_usage_credits() {
    let demo = Demo::manual(fast_queue()).await;
    let credits = |s: serde_json::Value| s["credits"].clone();
    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    assert_eq!(
        credits(r.json()),
        serde_json::json!([{"id": "metered", "credits": 2, "remaining": 2}])
    );
    for _ in 0..2 {
        let r = demo
            .call("GET", "/v1/jobs/no-such-job", Some("metered"), None)
            .await;
        assert_ne!(r.status, 429);
    }
    let r = demo
        .call("GET", "/v1/jobs/no-such-job", Some("metered"), None)
        .await;
    assert_eq!(r.status, 429);
    let r = demo
        .call("GET", "/v1/admin/stats", Some("admin"), None)
        .await;
    let s = r.json();
    assert_eq!(credits(s.clone())[0]["remaining"], 0);
    assert_eq!(s["rate_limited"], 1);
    demo.shutdown().await;
}

/// A session is a token minted from one key: it ends as soon as that key could not
/// open the dashboard itself (revoked, expired, its scope taken, removed, another
/// client address than its `allowed_ips`), not when the token expires; a key with
/// usage credits, which a session would not spend, gets none.
#[tokio::test]
async fn a_dashboard_session_keeps_the_limits_of_its_key() {
    let dir = std::env::temp_dir().join(format!("qs-session-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    // Two keys share the id `admin` (a rotation: the old one is revoked later).
    let ids = ["admin", "admin", "confined", "metered"];
    let keys: Vec<_> = ids
        .iter()
        .map(|_| generate_key("pc_test").unwrap())
        .collect();
    const SCOPE: &str = "scopes = [\"dashboard:read\"]";
    // Each key's lines after its digest; `None` leaves the key out.
    let file = |lines: [Option<&str>; 4]| {
        let mut text = String::new();
        for ((id, key), lines) in ids.iter().zip(&keys).zip(lines) {
            if let Some(lines) = lines {
                let digest = key.digest();
                text.push_str(&format!(
                    "[[keys]]\nid = \"{id}\"\ndigest = \"{digest}\"\n{lines}\n"
                ));
            }
        }
        std::fs::write(&path, text).unwrap();
    };
    let confined = format!("{SCOPE}\nallowed_ips = [\"192.0.2.0/24\"]");
    let metered = format!("{SCOPE}\ncredits = 100");
    let base = [Some(SCOPE), Some(SCOPE), Some(&*confined), Some(&*metered)];
    file(base);
    let store = ApiKeys::from_file(&path).unwrap();
    let secret = [7u8; 32];
    let demo = Demo::launch(Setup {
        client_ip: ClientIpConfig::trusted_proxies("127.0.0.1/32").unwrap(),
        keys: Some(store.clone()),
        secret: TokenSecret::from_bytes(&secret),
        ..Setup::new(fast_queue(), None)
    })
    .await;
    let from = |ip: &str| format!("X-Forwarded-For: {ip}");
    let inside = from("192.0.2.7");
    let login = async |i: usize| {
        let body = format!("key={}", keys[i].expose_secret());
        login_with(&demo, &body, &[SAME_ORIGIN, &inside]).await
    };
    let page = async |token: &str, ip: &str| {
        let cookie = format!("Cookie: pc_dashboard={token}");
        demo.call_with("GET", "/dashboard", &[&cookie, &from(ip)], None)
            .await
            .status
    };
    let admin = session_token(&login(0).await);
    let rotated = session_token(&login(1).await);
    let confined = session_token(&login(2).await);
    for t in [&admin, &rotated, &confined] {
        assert_eq!(page(t, "192.0.2.7").await, 200);
    }
    // Another address than the key's allowed_ips: the session does not escape them.
    assert_eq!(page(&confined, "198.51.100.9").await, 403);
    // A metered key gets no session.
    let r = login(3).await;
    r.assert_problem(403);
    assert!(r.header("set-cookie").is_none());
    // The rotated-out key is revoked: its sessions end, the other key's do not,
    // though both have the id `admin`.
    let revoked = format!("{SCOPE}\nrevoked = true");
    file([base[0], Some(&revoked), base[2], base[3]]);
    store.reload().unwrap();
    assert_eq!(page(&rotated, "192.0.2.7").await, 401);
    assert_eq!(page(&admin, "192.0.2.7").await, 200);
    // Revoked, expired, not yet valid, its scope taken, removed: each ends the
    // key's sessions, and undoing it restores them.
    let expired = format!("{SCOPE}\nexpires_at = 2001-01-01T00:00:00Z");
    let later = format!("{SCOPE}\nnot_before = 2999-01-01T00:00:00Z");
    for (change, status) in [
        (Some(&*revoked), 401),
        (Some(&*expired), 401),
        (Some(&*later), 401),
        (Some("scopes = [\"jobs:read\"]"), 403),
        (None, 401),
    ] {
        file([change, Some(&revoked), base[2], base[3]]);
        store.reload().unwrap();
        assert_eq!(page(&admin, "192.0.2.7").await, status, "{change:?}");
        file(base);
        store.reload().unwrap();
        assert_eq!(page(&admin, "192.0.2.7").await, 200, "{change:?}");
    }
    // A session token bound to no key (the demo never mints one) opens nothing.
    let aud = guard::DASHBOARD_AUDIENCE;
    let bare = craft_token(&secret, aud, "dashboard:read", -10, 600);
    assert_eq!(page(&bare, "192.0.2.7").await, 401);
    let digest = keys[0].digest();
    let bound = craft_token(
        &secret,
        aud,
        &format!("dashboard:read session-key:{digest}"),
        -10,
        600,
    );
    assert_eq!(page(&bound, "192.0.2.7").await, 200);
    std::fs::remove_dir_all(&dir).unwrap();
    demo.shutdown().await;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// A session is accepted exactly when the key it is bound to would be accepted
    /// itself, from the same address, with `dashboard:read`, and spends no credits:
    /// never where the key would be refused.
    #[test]
    fn a_session_is_never_accepted_where_its_key_would_not_be(
        revoked in proptest::prelude::any::<bool>(),
        window in 0u8..4,
        dashboard in proptest::prelude::any::<bool>(),
        confined in proptest::prelude::any::<bool>(),
        inside in proptest::prelude::any::<bool>(),
        credits in proptest::prelude::any::<bool>(),
        listed in proptest::prelude::any::<bool>(),
    ) {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let key = generate_key("pc_test").unwrap();
        let scopes = if dashboard { "admin dashboard:read" } else { "admin" };
        let mut r = KeyRecord::new("admin", key.digest())
            .unwrap()
            .with_scopes(Scopes::parse(scopes).unwrap())
            .revoked(revoked);
        r = match window {
            1 => r.expires_at(now - hour),
            2 => r.not_before(now + hour),
            3 => r.not_before(now - hour).expires_at(now + hour),
            _ => r,
        };
        if confined {
            r = r.with_allowed_ips(IpSet::parse("192.0.2.0/24").unwrap());
        }
        if credits {
            r = r.with_credits(10);
        }
        let other = generate_key("pc_test").unwrap();
        // Another key with the same id, always usable: it never vouches for this one.
        let twin = KeyRecord::new("admin", other.digest())
            .unwrap()
            .with_scopes(Scopes::parse("dashboard:read").unwrap());
        let records = if listed { vec![r, twin] } else { vec![twin] };
        let store = KeyStore::from_records(records).unwrap();
        let key_ok = store.verify(key.expose_secret(), now).is_ok();
        let keys = ApiKeys::new(store);
        let config = GuardConfig::new(
            keys,
            TokenSecret::generate().unwrap(),
            IpSet::parse(DEFAULT_INTERNAL).unwrap(),
        )
        .unwrap();
        let guard = Guard::new(config).unwrap();
        let client: std::net::IpAddr = if inside { "192.0.2.7" } else { "198.51.100.9" }.parse().unwrap();
        let accepted = guard.session_refusal(&key.digest(), now, Some(client)).is_none();
        let expected = key_ok && dashboard && (!confined || inside) && !credits;
        proptest::prop_assert_eq!(accepted, expected);
    }
}
