//! The Redis backend against a real `redis-server` that the test starts itself on a
//! free loopback port. Without the binary the tests skip with a message, unless
//! `PORTCULLIS_REQUIRE_REDIS=1` (set by CI), which makes them fail instead.

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis::client_ip::ClientIpConfig;
use portcullis::rate_limit::redis::{FailurePolicy, RedisLimiter};
use portcullis::rate_limit::{Policy, Quota, RateLimitLayer};

use crate::common::get;
use crate::log_capture;
use crate::rate_limit::{limits, rt, serve_limited};

const PASSWORD: &str = "s3cret-redis-pw-4e1f";

/// A `redis-server` child process, killed on drop.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    /// For a TLS server: the directory holding its CA and certificate.
    tls: Option<std::path::PathBuf>,
}

impl RedisServer {
    /// Starts a password-protected server, or returns `None` (after saying so) when
    /// the binary is missing and Redis is not required.
    async fn start() -> Option<Self> {
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

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://:{PASSWORD}@127.0.0.1:{}/0", self.port)
    }

    async fn admin(&self) -> redis::aio::MultiplexedConnection {
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

/// A throwaway CA and a server certificate for 127.0.0.1, made with the `openssl`
/// command (CI installs it with redis-server).
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
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=portcullis test CA",
        ],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    ];
    for args in steps {
        let ok = Command::new("openssl")
            .args(args)
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

#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn rediss_with_a_private_ca() {
    let Some(dir) = make_certificates() else {
        return;
    };
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let Some(server) = RedisServer::start_with(Some(dir)) else {
        return;
    };
    let trusted = RedisLimiter::builder(&server.url(), FailurePolicy::FailClosed)
        .unwrap()
        .tls_root_certificate(&ca)
        .unwrap()
        .namespace("tls")
        .unwrap()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    trusted
        .connect()
        .await
        .expect("TLS connection with the private CA");
    let addr = serve_limited(
        layer(trusted, Quota::per_minute(3).unwrap()),
        ClientIpConfig::peer_only(),
    )
    .await;
    for remaining in [2, 1, 0] {
        let r = get(addr, &[]).await;
        assert_eq!((r.status, limits(&r)[0].remaining), (200, remaining));
    }
    assert_eq!(get(addr, &[]).await.status, 429);

    // Without the CA the server's certificate is not trusted: no connection.
    let untrusted = limiter(&server.url(), FailurePolicy::FailClosed, "tls-untrusted");
    assert!(untrusted.connect().await.is_err());
    // A root certificate for a plain redis:// URL is a configuration error.
    assert!(
        RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailClosed)
            .unwrap()
            .tls_root_certificate(&ca)
            .is_err()
    );
}

fn limiter(url: &str, on_failure: FailurePolicy, ns: &str) -> RedisLimiter {
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

fn layer(limiter: RedisLimiter, quota: Quota) -> RateLimitLayer {
    RateLimitLayer::builder()
        .policy(Policy::new("api", quota).unwrap())
        .redis(limiter)
        .build()
        .unwrap()
}

#[tokio::test]
async fn two_instances_share_one_quota() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let q = Quota::per_minute(4).unwrap();
    let a = serve_limited(
        layer(
            limiter(&server.url(), FailurePolicy::FailClosed, "shared"),
            q,
        ),
        ClientIpConfig::peer_only(),
    )
    .await;
    let b = serve_limited(
        layer(
            limiter(&server.url(), FailurePolicy::FailClosed, "shared"),
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

#[tokio::test]
async fn script_is_reloaded_after_script_flush() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let addr = serve_limited(
        layer(
            limiter(&server.url(), FailurePolicy::FailClosed, "flush"),
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
            limiter(&server.url(), FailurePolicy::FailClosed, "odd"),
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
    let open_l = limiter(&server.url(), FailurePolicy::FailOpen, "kill-open");
    let closed_l = limiter(&server.url(), FailurePolicy::FailClosed, "kill-closed");
    let local_l = limiter(&server.url(), FailurePolicy::FallbackLocal, "kill-local");
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
    // A required timeout: out-of-range values are refused.
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
            .namespace("bad ns")
            .is_err()
    );
}

#[tokio::test]
async fn a_dead_redis_costs_the_timeout_once_per_cooldown() {
    // Nothing listens on this port: every call would fail. Count calls that reach
    // the network by whether the breaker lets them through.
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
    .cooldown(Duration::from_secs(30))
    .build()
    .unwrap();
    assert!(l.connect().await.is_err());
    let addr = serve_limited(
        layer(l.clone(), Quota::per_second(100).unwrap()),
        ClientIpConfig::peer_only(),
    )
    .await;
    assert!(!l.breaker_open());
    assert_eq!(get(addr, &[]).await.status, 503);
    assert!(l.breaker_open(), "the first failure opens the breaker");
    for _ in 0..20 {
        assert_eq!(get(addr, &[]).await.status, 503);
    }
    assert!(l.breaker_open());
    let r = get(addr, &[]).await;
    let secs: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&secs), "{secs}");
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
    let l = limiter(&server.url(), FailurePolicy::FailClosed, "errs");
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
async fn a_silent_redis_times_out_and_opens_the_breaker() {
    let capture = log_capture::capture();
    // Accepts connections and never answers.
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
    .timeout(Duration::from_millis(50))
    .cooldown(Duration::from_secs(30))
    .build()
    .unwrap();
    let addr = serve_limited(
        layer(l.clone(), Quota::per_second(10).unwrap()),
        ClientIpConfig::peer_only(),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(get(addr, &[]).await.status, 503);
    }
    assert!(l.breaker_open());
    let down: Vec<_> = capture
        .events_with("silent-probe-ns")
        .into_iter()
        .filter(|e| e["fields"]["event"] == "rate_limit_backend_down")
        .collect();
    assert_eq!(
        down.len(),
        1,
        "logged once per opening, not per request: {down:?}"
    );
    assert_eq!(down[0]["fields"]["error"], "timeout");
}
