//! The Redis backend against a real `redis-server` that the test starts itself on a
//! free loopback port. Without the binary the tests skip with a message, unless
//! `PORTCULLIS_REQUIRE_REDIS=1` (set by CI), which makes them fail instead.

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis::client_ip::ClientIpConfig;
use portcullis::rate_limit::redis::{FailurePolicy, RedisLimiter};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};

use crate::common::get;
use crate::log_capture;
use crate::rate_limit::{admitted, limits, rt, serve_limited};

const PASSWORD: &str = "s3cret-redis-pw-4e1f";

/// A `redis-server` child process, killed on drop.
pub(crate) struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// For a TLS server: the directory holding its CA and certificate.
    tls: Option<std::path::PathBuf>,
}

impl RedisServer {
    /// Starts a password-protected server, or returns `None` (after saying so) when
    /// the binary is missing and Redis is not required.
    pub(crate) async fn start() -> Option<Self> {
        Self::start_with(None)
    }

    fn start_with(tls: Option<std::path::PathBuf>) -> Option<Self> {
        let found = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            if std::env::var("PORTCULLIS_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("PORTCULLIS_REQUIRE_REDIS=1 but redis-server is not on PATH");
            }
            // Straight to stderr, past the test harness's capture, so it is seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: redis-server is not on PATH; the Redis rate-limit tests did not run \
                 (install redis-server, or set PORTCULLIS_REQUIRE_REDIS=1 to make this an error)"
            );
            return None;
        }
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = Self {
            child: None,
            port,
            tls,
        };
        s.spawn();
        Some(s)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
            Some(dir) => {
                let f = |n: &str| dir.join(n).to_string_lossy().into_owned();
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-cert-file", &f("server.crt")])
                    .args(["--tls-key-file", &f("server.key")])
                    .args(["--tls-ca-cert-file", &f("ca.crt")])
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--requirepass", PASSWORD])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        // Wait until it accepts connections (bounded).
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's URL; a TLS server by the name on its certificate.
    pub(crate) fn url(&self) -> String {
        match self.tls {
            None => self.url_as("redis", "127.0.0.1"),
            Some(_) => self.url_as("rediss", "localhost"),
        }
    }

    fn url_as(&self, scheme: &str, host: &str) -> String {
        format!("{scheme}://:{PASSWORD}@{host}:{}/0", self.port)
    }

    /// Sends `kill -<sig>` to the server: `STOP` freezes it with its connections
    /// open (a hung Redis), `CONT` thaws it.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("server running").id();
        let ok = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid}");
    }

    pub(crate) async fn admin(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A throwaway CA (`ca.crt`), a server certificate it signs for the name
/// `localhost` only (`server.crt`, an RSA key as managed services use), and an
/// unrelated CA (`other-ca.crt`), made with the `openssl` command (CI installs it
/// with redis-server).
#[cfg(feature = "redis-tls")]
fn make_certificates() -> Option<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "portcullis-redis-tls-{}-{}",
        std::process::id(),
        StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").unwrap();
    // Each step: its arguments, split at spaces, then the subject if any.
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        (
            format!("req -x509 {ec} -keyout ca.key -out ca.crt -days 2"),
            Some("/CN=portcullis test CA"),
        ),
        (
            format!("req -x509 {ec} -keyout other-ca.key -out other-ca.crt -days 2"),
            Some("/CN=portcullis unrelated CA"),
        ),
        (
            "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr".to_owned(),
            Some("/CN=localhost"),
        ),
        (
            "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
             -out server.crt -days 2 -extfile ext"
                .to_owned(),
            None,
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
        if !ok {
            let _ = std::fs::remove_dir_all(&dir);
            if std::env::var("PORTCULLIS_REQUIRE_REDIS").as_deref() == Ok("1") {
                panic!("PORTCULLIS_REQUIRE_REDIS=1 but openssl could not make test certificates");
            }
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: openssl is not available; the rediss:// test did not run"
            );
            return None;
        }
    }
    Some(dir)
}

/// A TLS `redis-server` and the PEM of the CA that signed its certificate.
#[cfg(feature = "redis-tls")]
fn tls_server() -> Option<(RedisServer, Vec<u8>)> {
    let dir = make_certificates()?;
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    Some((RedisServer::start_with(Some(dir))?, ca))
}

/// A `rediss://` limiter trusting `ca`, with the default timeouts (5 ms per call,
/// 2 s to connect) and cool-down.
#[cfg(feature = "redis-tls")]
fn tls_limiter(url: &str, ca: &[u8], on_failure: FailurePolicy, ns: &str) -> RedisLimiter {
    tls_limiter_builder(url, ca, on_failure, ns)
        .build()
        .unwrap()
}

#[cfg(feature = "redis-tls")]
fn tls_limiter_builder(
    url: &str,
    ca: &[u8],
    on_failure: FailurePolicy,
    ns: &str,
) -> portcullis::rate_limit::redis::RedisLimiterBuilder {
    RedisLimiter::builder(url, on_failure)
        .unwrap()
        .tls_root_certificate(ca)
        .unwrap()
        .namespace(ns)
        .unwrap()
}

/// The per-call timeout of the TLS quota test: the default 5 ms is a production
/// bound, which a test process running many servers at once on two cores can miss
/// (fail-closed then answers 503, as it should); this test is about connecting,
/// which keeps its default timeout and happens off the request path.
#[cfg(feature = "redis-tls")]
const LOADED_MACHINE_CALL_TIMEOUT: Duration = Duration::from_millis(250);

#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn rediss_with_the_default_connect_timeout_shares_one_quota() {
    let Some((server, ca)) = tls_server() else {
        return;
    };
    // A TLS handshake takes longer than the 5 ms a request may wait: connecting has
    // its own timeout and happens off the request path.
    let q = Quota::per_minute(4).unwrap();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let l = tls_limiter_builder(&server.url(), &ca, FailurePolicy::FailClosed, "tls")
            .timeout(LOADED_MACHINE_CALL_TIMEOUT)
            .build()
            .unwrap();
        l.connect()
            .await
            .expect("TLS connection with the private CA and the default timeouts");
        addrs.push(serve_limited(layer(l, q), ClientIpConfig::peer_only()).await);
    }
    let who: &[&[u8]] = &[b"X-Test-Principal: tls-user"];
    let mut remaining = Vec::new();
    for addr in [addrs[0], addrs[1], addrs[0], addrs[1]] {
        let r = get(addr, who).await;
        assert_eq!(r.status, 200, "{r:?}");
        remaining.push(limits(&r)[0].remaining);
    }
    assert_eq!(remaining, [3, 2, 1, 0], "one quota across both instances");
    for addr in &addrs {
        assert_eq!(get(*addr, who).await.status, 429);
    }
    // Without `connect`, an instance limits locally (a fresh quota: 200) until its
    // background connection is up, then shares the spent one (429); no request
    // waits meanwhile.
    let late = tls_limiter_builder(&server.url(), &ca, FailurePolicy::FallbackLocal, "tls")
        .timeout(LOADED_MACHINE_CALL_TIMEOUT)
        .build()
        .unwrap();
    let late = serve_limited(layer(late, q), ClientIpConfig::peer_only()).await;
    let started = Instant::now();
    loop {
        let asked = Instant::now();
        let r = get(late, who).await;
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "{:?}",
            asked.elapsed()
        );
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A root certificate for a plain redis:// URL is a configuration error, and so
    // is a rediss:// URL that turns the certificate checks off.
    assert!(
        RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailClosed)
            .unwrap()
            .tls_root_certificate(&ca)
            .is_err()
    );
    let insecure = format!("rediss://:{PASSWORD}@localhost:{}/0#insecure", server.port);
    let e = RedisLimiter::builder(&insecure, FailurePolicy::FailOpen).unwrap_err();
    assert!(!e.to_string().contains(PASSWORD), "{e}");
}

/// A server this client must not trust, reached through `url` with `ca` as root.
#[cfg(feature = "redis-tls")]
struct Untrusted {
    case: &'static str,
    url: String,
    ca: Vec<u8>,
    /// The `error` classes its failed connection may be logged with.
    classes: &'static [&'static str],
}

#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn rediss_to_an_untrusted_server_follows_the_failure_policy() {
    let Some(dir) = make_certificates() else {
        return;
    };
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let other_ca = std::fs::read(dir.join("other-ca.crt")).unwrap();
    let Some(server) = RedisServer::start_with(Some(dir)) else {
        return;
    };
    let Some(plain) = RedisServer::start().await else {
        return;
    };
    let capture = log_capture::capture();
    let cases = [
        Untrusted {
            case: "wrong-ca",
            url: server.url(),
            ca: other_ca,
            classes: &["tls_untrusted_certificate"],
        },
        Untrusted {
            // The certificate names `localhost`, not the address.
            case: "name-mismatch",
            url: server.url_as("rediss", "127.0.0.1"),
            ca: ca.clone(),
            classes: &["tls_name_mismatch"],
        },
        Untrusted {
            // A server without TLS waits for the rest of what it takes for a
            // command (the connect timeout ends it), answers garbage, or closes.
            case: "plaintext",
            url: plain.url_as("rediss", "127.0.0.1"),
            ca,
            classes: &["timeout", "tls_protocol", "connection_lost"],
        },
    ];
    let q = Quota::per_minute(2).unwrap();
    let mut namespaces = Vec::new();
    for c in &cases {
        let closed_ns = format!("untrusted-{}-closed", c.case);
        let local_ns = format!("untrusted-{}-local", c.case);
        let closed = tls_limiter(&c.url, &c.ca, FailurePolicy::FailClosed, &closed_ns);
        let local = tls_limiter(&c.url, &c.ca, FailurePolicy::FallbackLocal, &local_ns);
        let closed_addr =
            serve_limited(layer(closed.clone(), q), ClientIpConfig::peer_only()).await;
        let local_addr = serve_limited(layer(local.clone(), q), ClientIpConfig::peer_only()).await;
        // No request waits for the connection attempt (2 s by default).
        let started = Instant::now();
        for _ in 0..3 {
            let r = get(closed_addr, &[]).await;
            assert_eq!(r.status, 503, "{}: fail closed", c.case);
            assert!(r.header("retry-after").is_some());
        }
        let statuses: Vec<u16> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                v.push(get(local_addr, &[]).await.status);
            }
            v
        };
        assert_eq!(
            statuses,
            [200, 200, 429],
            "{}: this instance's own limit",
            c.case
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{}: requests waited {:?}",
            c.case,
            started.elapsed()
        );
        // Waiting for a connection gives up within about the connect timeout.
        let started = Instant::now();
        assert!(closed.connect().await.is_err(), "{}", c.case);
        assert!(started.elapsed() < Duration::from_secs(3), "{}", c.case);
        assert!(closed.breaker_open() && local.breaker_open(), "{}", c.case);
        namespaces.push((c, closed_ns, local_ns));
    }
    // Each limiter logged that it bypasses Redis, and why it cannot connect.
    for (c, closed_ns, local_ns) in &namespaces {
        for (ns, policy) in [(closed_ns, "FailClosed"), (local_ns, "FallbackLocal")] {
            let events = wait_for_events(capture, ns, "rate_limit_backend_connect_failed").await;
            let class = events[0]["fields"]["error"].as_str().unwrap_or_default();
            assert!(c.classes.contains(&class), "{}: {events:?}", c.case);
            let down = capture
                .events_with(ns)
                .into_iter()
                .filter(|e| e["fields"]["event"] == "rate_limit_backend_down")
                .collect::<Vec<_>>();
            assert_eq!(down.len(), 1, "{}: {down:?}", c.case);
            assert_eq!(down[0]["fields"]["failure_policy"], policy);
            assert_eq!(down[0]["level"], "WARN");
        }
    }
    assert!(!capture.text().contains(PASSWORD));
}

/// The events named `event` among the lines carrying `marker`, waiting up to 5 s for
/// the first.
async fn wait_for_events(
    capture: &log_capture::Capture,
    marker: &str,
    event: &str,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<_> = capture
            .events_with(marker)
            .into_iter()
            .filter(|e| e["fields"]["event"] == event)
            .collect();
        if !found.is_empty() || Instant::now() > deadline {
            assert!(!found.is_empty(), "no {event} for {marker}");
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn limiter(url: &str, on_failure: FailurePolicy, ns: &str) -> RedisLimiter {
    RedisLimiter::builder(url, on_failure)
        .unwrap()
        .namespace(ns)
        .unwrap()
        // Generous for a loaded CI machine; production default is 5 ms.
        .timeout(Duration::from_millis(200))
        .cooldown(Duration::from_millis(500))
        .build()
        .unwrap()
}

/// [`limiter`], connected: requests before the first connection follow the
/// failure policy.
pub(crate) async fn connected(url: &str, on_failure: FailurePolicy, ns: &str) -> RedisLimiter {
    let l = limiter(url, on_failure, ns);
    connect(&l).await;
    l
}

/// Connects `l` to a running server. On a loaded machine one attempt can outlast
/// the limiter's timeout, so up to 20 are made: the tests that call this start
/// connected, and what they check comes after.
async fn connect(l: &RedisLimiter) {
    for _ in 0..20 {
        if l.connect().await.is_ok() {
            return;
        }
    }
    panic!("could not connect to redis-server in 20 attempts");
}

fn layer(limiter: RedisLimiter, quota: Quota) -> RateLimitLayer {
    RateLimitLayer::builder()
        .policy(Policy::new("api", quota).unwrap())
        .redis(limiter)
        .build()
        .unwrap()
}

#[test]
fn a_limiter_outlives_the_runtime_it_was_built_in() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let Some((server, limiters)) = first.block_on(async {
        let server = RedisServer::start().await?;
        // Connected in the first runtime, whose tasks (the connection's own) end.
        let used = connected(&server.url(), FailurePolicy::FailClosed, "outlive-used").await;
        // Its background connection attempt is dropped before it ever runs.
        let unused = limiter(&server.url(), FailurePolicy::FailClosed, "outlive-unused");
        Some((server, [used, unused]))
    }) else {
        return;
    };
    drop(first);
    runtime().block_on(async {
        for l in limiters {
            connect(&l).await;
            let addr = serve_limited(
                layer(l, Quota::per_minute(5).unwrap()),
                ClientIpConfig::peer_only(),
            )
            .await;
            assert_eq!(get(addr, &[]).await.status, 200);
        }
    });
    drop(server);
}

#[tokio::test]
async fn two_instances_share_one_quota() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let q = Quota::per_minute(4).unwrap();
    let a = serve_limited(
        layer(
            connected(&server.url(), FailurePolicy::FailClosed, "shared").await,
            q,
        ),
        ClientIpConfig::peer_only(),
    )
    .await;
    let b = serve_limited(
        layer(
            connected(&server.url(), FailurePolicy::FailClosed, "shared").await,
            q,
        ),
        ClientIpConfig::peer_only(),
    )
    .await;
    let who: &[&[u8]] = &[b"X-Test-Principal: shared-user"];
    let mut remaining = Vec::new();
    for (i, addr) in [a, b, a, b].into_iter().enumerate() {
        let r = get(addr, who).await;
        assert_eq!(r.status, 200, "request {i}");
        remaining.push(limits(&r)[0].remaining);
    }
    assert_eq!(remaining, [3, 2, 1, 0], "one quota across both instances");
    for addr in [a, b] {
        let r = get(addr, who).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("15"));
        assert_eq!(rt(&r), vec![("api".to_owned(), 0, Some(60))]);
    }
    // Another principal is unaffected.
    let r = get(a, &[b"X-Test-Principal: other-user"]).await;
    assert_eq!((r.status, limits(&r)[0].remaining), (200, 3));
}

/// Through Redis a burst on a long window (back in 300 days) is held exactly.
#[tokio::test]
async fn redis_holds_a_long_window_burst_exactly() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let long = Quota::per_day(1).unwrap().with_burst(300).unwrap();
    let addr = serve_limited(
        layer(
            connected(&server.url(), FailurePolicy::FailClosed, "long").await,
            long,
        ),
        ClientIpConfig::peer_only(),
    )
    .await;
    let ok = admitted(addr, b"X-Test-Principal: bursty", 310).await;
    assert_eq!(ok, 300, "a burst of 300 let {ok} of 310 through");
}

#[tokio::test]
async fn script_is_reloaded_after_script_flush() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let addr = serve_limited(
        layer(
            connected(&server.url(), FailurePolicy::FailClosed, "flush").await,
            Quota::per_minute(5).unwrap(),
        ),
        ClientIpConfig::peer_only(),
    )
    .await;
    assert_eq!(limits(&get(addr, &[]).await)[0].remaining, 4);
    let mut admin = server.admin().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut admin)
        .await
        .unwrap();
    let r = get(addr, &[]).await;
    assert_eq!(
        r.status, 200,
        "NOSCRIPT is answered by reloading the script"
    );
    assert_eq!(limits(&r)[0].remaining, 3, "and the state survived");
}

#[tokio::test]
async fn odd_principal_ids_become_safe_expiring_keys() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let addr = serve_limited(
        layer(
            connected(&server.url(), FailurePolicy::FailClosed, "odd").await,
            Quota::per_minute(2).unwrap(),
        ),
        ClientIpConfig::peer_only(),
    )
    .await;
    let long = format!("X-Test-Principal: {}", "x".repeat(4000));
    let ids: [&[u8]; 5] = [
        b"X-Test-Principal: a:b*c?[d]{e}",
        b"X-Test-Principal: odd:rl:api:g",
        b"X-Test-Principal: spaces and \"quotes\" \\ slashes/../",
        b"X-Test-Principal: \xc3\xa9t\xc3\xa9",
        long.as_bytes(),
    ];
    for id in ids {
        for expected in [200, 200, 429] {
            assert_eq!(get(addr, &[id]).await.status, expected);
        }
    }
    let mut admin = server.admin().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("odd:*")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(keys.len(), ids.len(), "{keys:?}");
    for k in &keys {
        let hex = k.strip_prefix("odd:rl:api:p:").expect(k);
        assert!(
            hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "{k}"
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_001, "{k} expires ({ttl} ms)");
    }
}

#[tokio::test]
async fn killing_redis_shows_each_failure_policy() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let capture = log_capture::capture();
    let q = Quota::per_minute(2).unwrap();
    let open_l = connected(&server.url(), FailurePolicy::FailOpen, "kill-open").await;
    let closed_l = connected(&server.url(), FailurePolicy::FailClosed, "kill-closed").await;
    let local_l = connected(&server.url(), FailurePolicy::FallbackLocal, "kill-local").await;
    let open = serve_limited(layer(open_l.clone(), q), ClientIpConfig::peer_only()).await;
    let closed = serve_limited(layer(closed_l.clone(), q), ClientIpConfig::peer_only()).await;
    let local = serve_limited(layer(local_l.clone(), q), ClientIpConfig::peer_only()).await;
    for addr in [open, closed, local] {
        let r = get(addr, &[]).await;
        assert_eq!((r.status, limits(&r)[0].remaining), (200, 1));
    }

    server.kill();

    // Fail open: let through, no fields (nothing is known about the quota).
    for _ in 0..4 {
        let r = get(open, &[]).await;
        assert_eq!(r.status, 200);
        assert!(r.header("ratelimit").is_none());
    }
    // Fail closed: 503 with Retry-After.
    for _ in 0..3 {
        let r = get(closed, &[]).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.body.contains("\"status\":503"));
    }
    // Fallback: this instance's own limiter takes over (a fresh quota of 2).
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get(local, &[]).await.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429]);
    // The breakers are open: requests no longer wait on the dead server.
    for l in [&open_l, &closed_l, &local_l] {
        assert!(l.breaker_open(), "{l:?}");
    }
    let down: Vec<_> = capture
        .events_with("rate_limit_backend_down")
        .into_iter()
        .filter(|e| {
            e["fields"]["failure_policy"]
                .as_str()
                .is_some_and(|p| ["FailOpen", "FailClosed", "FallbackLocal"].contains(&p))
        })
        .collect();
    assert!(down.len() >= 3, "{down:?}");

    // Redis comes back on the same port: after the cool-down one probe closes the
    // breaker and the shared limit applies again.
    server.spawn();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut back = false;
    for _ in 0..50 {
        let r = get(closed, &[]).await;
        if r.status == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the fail-closed limiter recovers when Redis is back");
    assert!(!closed_l.breaker_open());

    // The URL's password appears in no log line, error or Debug output.
    let text = capture.text();
    assert!(!text.contains(PASSWORD));
    assert!(!format!("{open_l:?}").contains(PASSWORD));
    assert!(!format!("{:?}", layer(local_l, q)).contains(PASSWORD));
}

#[test]
fn urls_never_leak_into_errors_or_debug() {
    let secret = "hunter2-very-secret";
    let bad = format!("redis://:{secret}@[not-a-host/0");
    let e = RedisLimiter::builder(&bad, FailurePolicy::FailClosed).unwrap_err();
    assert!(!e.to_string().contains(secret), "{e}");
    assert!(!format!("{e:?}").contains(secret));
    let e = RedisLimiter::builder(&format!("http://:{secret}@h"), FailurePolicy::FailClosed)
        .unwrap_err();
    assert!(!e.to_string().contains(secret));
    let ok = RedisLimiter::builder(
        &format!("redis://:{secret}@127.0.0.1:1/0"),
        FailurePolicy::FailOpen,
    )
    .unwrap();
    assert!(!format!("{ok:?}").contains(secret));
    let built = ok.build().unwrap();
    assert!(!format!("{built:?}").contains(secret));
    // Required timeouts: out-of-range values are refused.
    assert!(
        RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailOpen)
            .unwrap()
            .timeout(Duration::ZERO)
            .build()
            .is_err()
    );
    assert!(
        RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailOpen)
            .unwrap()
            .connect_timeout(Duration::from_millis(1))
            .build()
            .is_err()
    );
    assert!(
        RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailOpen)
            .unwrap()
            .namespace("bad ns")
            .is_err()
    );
}

#[tokio::test]
async fn a_dead_redis_costs_requests_nothing() {
    let capture = log_capture::capture();
    // Nothing listens on this port: no connection is ever up.
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let l = RedisLimiter::builder(
        &format!("redis://127.0.0.1:{port}"),
        FailurePolicy::FailClosed,
    )
    .unwrap()
    .namespace("dead-ns")
    .unwrap()
    .timeout(Duration::from_secs(1))
    .cooldown(Duration::from_secs(30))
    .build()
    .unwrap();
    assert!(l.connect().await.is_err());
    let addr = serve_limited(
        layer(l.clone(), Quota::per_second(100).unwrap()),
        ClientIpConfig::peer_only(),
    )
    .await;
    assert!(!l.breaker_open(), "nothing has been refused yet");
    assert_eq!(get(addr, &[]).await.status, 503);
    assert!(l.breaker_open(), "the first refusal opens the breaker");
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(addr, &[]).await.status, 503);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "no request waits"
    );
    assert!(l.breaker_open());
    let r = get(addr, &[]).await;
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&secs), "{secs}");
    let failed = wait_for_events(capture, "dead-ns", "rate_limit_backend_connect_failed").await;
    assert_eq!(
        failed.len(),
        1,
        "once per outage, not per attempt: {failed:?}"
    );
    assert_eq!(failed[0]["fields"]["error"], "connection_refused");
}

#[tokio::test]
async fn a_redis_error_reply_is_a_failure_too() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    // The anonymous global key holds a hash: GET inside the script fails (WRONGTYPE).
    let mut admin = server.admin().await;
    let _: () = redis::cmd("HSET")
        .arg("errs:rl:api:g")
        .arg("f")
        .arg("v")
        .query_async(&mut admin)
        .await
        .unwrap();
    let l = connected(&server.url(), FailurePolicy::FailClosed, "errs").await;
    let layer = RateLimitLayer::builder()
        .policy(Policy::new("api", Quota::per_minute(5).unwrap()).unwrap())
        .redis(l.clone())
        .build()
        .unwrap();
    // No ClientIp layer in this stack: requests fall back to the global key.
    let stack = tower::ServiceBuilder::new().layer(layer).into_inner();
    let addr = crate::common::serve("127.0.0.1:0", stack, crate::common::Peer::Attached).await;
    let r = get(addr, &[]).await;
    assert_eq!(r.status, 503);
    assert!(l.breaker_open());
}

#[tokio::test]
async fn a_silent_redis_never_holds_up_a_request() {
    let capture = log_capture::capture();
    // Accepts connections and never answers: a connection attempt can only time out.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let l = RedisLimiter::builder(
        &format!("redis://127.0.0.1:{port}"),
        FailurePolicy::FailClosed,
    )
    .unwrap()
    .namespace("silent-probe-ns")
    .unwrap()
    .timeout(Duration::from_millis(500))
    .connect_timeout(Duration::from_millis(300))
    .cooldown(Duration::from_secs(30))
    .build()
    .unwrap();
    let addr = serve_limited(
        layer(l.clone(), Quota::per_second(10).unwrap()),
        ClientIpConfig::peer_only(),
    )
    .await;
    // Neither the per-call timeout nor the connect timeout is spent on a request.
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(get(addr, &[]).await.status, 503);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(250),
            "a request waited {took:?}"
        );
    }
    assert!(l.breaker_open());
    let failed = wait_for_events(
        capture,
        "silent-probe-ns",
        "rate_limit_backend_connect_failed",
    )
    .await;
    assert_eq!(failed[0]["fields"]["error"], "timeout");
    // Retried in the background (100 ms, 200 ms, ...), logged once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let events = capture.events_with("silent-probe-ns");
    let count = |name: &str| {
        events
            .iter()
            .filter(|e| e["fields"]["event"] == name)
            .count()
    };
    assert_eq!(count("rate_limit_backend_connect_failed"), 1, "{events:?}");
    assert_eq!(
        count("rate_limit_backend_down"),
        1,
        "once per opening: {events:?}"
    );
    let down = events
        .iter()
        .find(|e| e["fields"]["event"] == "rate_limit_backend_down")
        .unwrap();
    assert_eq!(down["fields"]["error"], "not_connected");
}

#[tokio::test]
async fn a_hung_redis_times_out_once_then_recovers() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let capture = log_capture::capture();
    let cooldown = Duration::from_millis(1000);
    let l = RedisLimiter::builder(&server.url(), FailurePolicy::FailClosed)
        .unwrap()
        .namespace("hung-ns")
        .unwrap()
        .timeout(Duration::from_millis(100))
        .connect_timeout(Duration::from_millis(300))
        .cooldown(cooldown)
        .build()
        .unwrap();
    connect(&l).await;
    let addr = serve_limited(
        layer(l.clone(), Quota::per_minute(100).unwrap()),
        ClientIpConfig::peer_only(),
    )
    .await;
    assert_eq!(get(addr, &[]).await.status, 200);

    // Frozen with its connections open: the call times out, once.
    server.signal("STOP");
    let resumed = {
        let guard = scopeguard(&server);
        let started = Instant::now();
        assert_eq!(get(addr, &[]).await.status, 503);
        assert!(started.elapsed() >= Duration::from_millis(100));
        let started = Instant::now();
        for _ in 0..5 {
            assert_eq!(get(addr, &[]).await.status, 503);
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the breaker is open"
        );
        drop(guard);
        Instant::now()
    };
    let mut back = None;
    while resumed.elapsed() < cooldown * 3 {
        if get(addr, &[]).await.status == 200 {
            back = Some(resumed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let back = back.expect("back after the server resumes");
    assert!(back <= cooldown + Duration::from_millis(600), "{back:?}");
    let events = capture.events_with("hung-ns");
    let named = |name: &str| {
        events
            .iter()
            .filter(|e| e["fields"]["event"] == name)
            .collect::<Vec<_>>()
    };
    assert_eq!(named("rate_limit_backend_down").len(), 1, "{events:?}");
    assert_eq!(
        named("rate_limit_backend_down")[0]["fields"]["error"],
        "timeout"
    );
    assert_eq!(named("rate_limit_backend_recovered").len(), 1, "{events:?}");
}

/// Thaws a frozen server when dropped, also when an assertion fails.
fn scopeguard(server: &RedisServer) -> impl Drop + '_ {
    struct Thaw<'a>(&'a RedisServer);
    impl Drop for Thaw<'_> {
        fn drop(&mut self) {
            self.0.signal("CONT");
        }
    }
    Thaw(server)
}

#[tokio::test]
async fn a_restarted_redis_is_used_again_within_one_cooldown() {
    let Some(mut server) = RedisServer::start().await else {
        return;
    };
    let cooldown = Duration::from_millis(1500);
    let timeout = Duration::from_millis(200);
    let make = |ns: &str| {
        RedisLimiter::builder(&server.url(), FailurePolicy::FailClosed)
            .unwrap()
            .namespace(ns)
            .unwrap()
            .timeout(timeout)
            .cooldown(cooldown)
            .build()
            .unwrap()
    };
    let (probed, polled) = (make("restart-probed"), make("restart-polled"));
    let q = Quota::per_minute(100).unwrap();
    let mut addrs = Vec::new();
    for l in [&probed, &polled] {
        connect(l).await;
        let addr = serve_limited(layer(l.clone(), q), ClientIpConfig::peer_only()).await;
        assert_eq!(get(addr, &[]).await.status, 200);
        addrs.push(addr);
    }
    let (probed_addr, polled_addr) = (addrs[0], addrs[1]);

    server.kill();
    // Each breaker opens on its first failed call.
    assert_eq!(get(probed_addr, &[]).await.status, 503);
    let opened = Instant::now();
    assert_eq!(get(polled_addr, &[]).await.status, 503);
    // Down long enough for any reconnect attempts made meanwhile to fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.spawn();
    let restarted = Instant::now();

    // Polled: the shared limit is back within one cool-down (plus a call's timeout
    // and a margin), not two.
    let bound = cooldown + timeout + Duration::from_millis(300);
    let mut back = None;
    while restarted.elapsed() < bound * 2 {
        let r = get(polled_addr, &[]).await;
        if r.status == 200 {
            back = Some(restarted.elapsed());
            assert_eq!(limits(&r)[0].remaining, 99, "a fresh server, a fresh quota");
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Probed: the first request after the cool-down finds Redis, nothing stale.
    let after_cooldown = cooldown + Duration::from_millis(50);
    if let Some(left) = after_cooldown.checked_sub(opened.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let r = get(probed_addr, &[]).await;
    assert_eq!(r.status, 200, "the first request after the cool-down");

    let back = back.expect("the limiter uses Redis again");
    assert!(back <= bound, "back after {back:?}, more than {bound:?}");
    assert!(!probed.breaker_open() && !polled.breaker_open());
}
