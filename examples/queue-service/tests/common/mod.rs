//! What the Redis tests share: a `redis-server` they start themselves, credential
//! files, HTTP calls over real TCP, and the demo served in process or run as its
//! own binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis::api_key::generate_key;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The default user's password of every test server.
pub const ADMIN_PASSWORD: &str = "adm1n-pw-for-the-test-server-9c2e";

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        let name = format!(
            "qs-{tag}-{}-{}",
            std::process::id(),
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether redis-server is on `PATH`; without it the tests skip with a message,
/// unless `PORTCULLIS_REQUIRE_REDIS=1` (CI), which makes them fail.
pub fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        let required = std::env::var("PORTCULLIS_REQUIRE_REDIS").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "PORTCULLIS_REQUIRE_REDIS=1 but redis-server is not on PATH"
        );
        eprintln!("SKIPPED: redis-server is not on PATH; the demo's Redis queue tests did not run");
    }
    found
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A password-protected `redis-server` on a free loopback port, persisting to its
/// own directory (append-only file, fsync on every write), so a restart keeps its
/// data; optionally TLS only. Killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: TempDir,
    /// For a TLS server: the directory holding its CA and certificate.
    pub tls: Option<PathBuf>,
}

impl RedisServer {
    /// `None` (after saying so) when redis-server is missing and not required.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    pub fn start_with(tls: Option<PathBuf>) -> Option<Self> {
        if !redis_available() {
            return None;
        }
        let mut s = Self {
            child: None,
            port: free_port(),
            dir: TempDir::new("redis"),
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
            .args(["--requirepass", ADMIN_PASSWORD])
            .args(["--dir", &self.dir.path().to_string_lossy()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start");
    }

    /// Kills the server (SIGKILL: no shutdown save; the append-only file holds
    /// every acknowledged write).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The URL of the default (admin) user.
    pub fn url(&self) -> String {
        self.url_as("", ADMIN_PASSWORD)
    }

    /// The URL of `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        match self.tls {
            None => format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port),
            Some(_) => format!("rediss://{user}:{password}@localhost:{}/0", self.port),
        }
    }

    /// A connection as the admin user.
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        let client = match &self.tls {
            None => redis::Client::open(self.url()).unwrap(),
            Some(dir) => {
                let info = redis::Client::open(self.url())
                    .unwrap()
                    .get_connection_info()
                    .clone();
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(dir.join("ca.crt")).unwrap()),
                };
                redis::Client::build_with_tls(info, certs).unwrap()
            }
        };
        client.get_multiplexed_async_connection().await.unwrap()
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

/// A throwaway CA (`ca.crt`) and a server certificate it signs for `localhost`
/// (`server.crt`), made with the `openssl` command (CI installs it with
/// redis-server). `None` (after saying so) when openssl is missing and Redis is
/// not required.
pub fn make_certificates() -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "qs-redis-tls-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ext"), "subjectAltName=DNS:localhost\n").unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        (
            format!("req -x509 {ec} -keyout ca.key -out ca.crt -days 2"),
            Some("/CN=queue-service test CA"),
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
            let required = std::env::var("PORTCULLIS_REQUIRE_REDIS").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "PORTCULLIS_REQUIRE_REDIS=1 but openssl could not make test certificates"
            );
            eprintln!("SKIPPED: openssl is not available; the demo's rediss:// test did not run");
            return None;
        }
    }
    Some(dir)
}

/// Configured credentials: a key file (a client key and an admin key) and a
/// token secret, shared by every instance of a test.
pub struct Creds {
    pub dir: TempDir,
    pub client: String,
    pub admin: String,
}

impl Creds {
    pub fn new() -> Self {
        let dir = TempDir::new("creds");
        let client = generate_key("pc_test").unwrap();
        let admin = generate_key("pc_test").unwrap();
        std::fs::write(
            dir.path().join("keys.toml"),
            format!(
                "[[keys]]\nid = \"client\"\ndigest = \"{}\"\nscopes = [\"jobs:read\", \"jobs:write\"]\n\n\
                 [[keys]]\nid = \"admin\"\ndigest = \"{}\"\nscopes = [\"admin\", \"dashboard:read\"]\n",
                client.digest(),
                admin.digest()
            ),
        )
        .unwrap();
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).unwrap();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.path().join("token.key"), hex).unwrap();
        Self {
            client: client.expose_secret().to_owned(),
            admin: admin.expose_secret().to_owned(),
            dir,
        }
    }

    /// The environment of an instance: these credentials, a free port, Redis at
    /// `url`, and `extra`.
    pub fn env(&self, url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = self.env_in_memory(extra);
        env.push(("REDIS_URL".to_owned(), url.to_owned()));
        env
    }

    /// The environment of an instance with its queue in memory: these
    /// credentials, a free port, and `extra`.
    pub fn env_in_memory(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("PORTCULLIS_DEMO_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
            (
                "PORTCULLIS_DEMO_KEY_FILE".to_owned(),
                self.dir.path().join("keys.toml").display().to_string(),
            ),
            (
                "PORTCULLIS_DEMO_TOKEN_KEY_FILE".to_owned(),
                self.dir.path().join("token.key").display().to_string(),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection with a raw body and exactly these
/// headers (plus `Host`, `Connection: close` and `Content-Length`).
pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    send(addr, req).await
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    send(addr, req).await
}

async fn send(addr: SocketAddr, req: String) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
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

/// The demo binary, run as a child process; killed (SIGKILL) on drop.
pub struct DemoProcess {
    child: Child,
    pub addr: SocketAddr,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl DemoProcess {
    /// Runs the binary with exactly `env` (plus `PATH`), and waits for the address
    /// it prints.
    pub fn spawn(env: &[(String, String)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_queue-service"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the demo binary");
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the demo did not start: {line:?}"));
        // Keep draining standard output so the child never blocks on it.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        Self {
            child,
            addr,
            stderr: Some(stderr),
        }
    }

    /// Kills it (SIGKILL: no drain, no goodbye) and returns what it logged.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().unwrap().join().unwrap()
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 100 ms (well within the client's rate limit) until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
