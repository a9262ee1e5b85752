//! The demo job-queue service: every portcullis layer guarding a small job queue.
//!
//! `cargo run -p queue-service --release` listens on 127.0.0.1:8080, makes
//! ephemeral credentials (an admin key, a client key, a worker signing key) and
//! prints them once to standard output with ready-to-paste curl lines. Logs are
//! JSON lines on standard error, every line redacted (`RedactingJson`).
//!
//! Settings (flags win over the environment):
//!
//! | flag / variable | meaning | default |
//! |---|---|---|
//! | `--addr HOST:PORT` / `PORTCULLIS_DEMO_ADDR` | listen address (port 0: a free port, printed) | `127.0.0.1:8080` |
//! | `--redis URL` / `REDIS_URL` | keep the queue, the rate limits and the failed-authentication counts in Redis, shared by every instance (fails closed); a URL with a password only in `REDIS_URL` | in memory |
//! | `PORTCULLIS_DEMO_REDIS_NAMESPACE` | the prefix of every Redis key (`A-Z a-z 0-9 _ - .`, 1 to 64) | `portcullis-demo` |
//! | `PORTCULLIS_DEMO_REDIS_CA_FILE` | a CA (PEM) to trust for `rediss://` instead of the platform's roots | platform roots |
//! | `PORTCULLIS_DEMO_KEY_FILE` | API-key file (TOML, reloaded on change) | ephemeral keys |
//! | `PORTCULLIS_DEMO_TOKEN_KEY_FILE` | HS256 secret (>= 32 bytes) of the service tokens | ephemeral secret |
//! | `PORTCULLIS_DEMO_INTERNAL_CIDRS` | who may call `POST /internal/latest-runs` | `127.0.0.0/8, ::1` |
//! | `PORTCULLIS_DEMO_INTERNAL_ISSUER` | an OpenID Connect issuer (HTTPS, keys by discovery) whose tokens may also call it, with `aud` `portcullis-demo-queue` | none |
//! | `PORTCULLIS_DEMO_INTERNAL_CALLERS` | the principals (`sub`) of that issuer granted `jobs:work`, comma-separated (required with it) | none |
//! | `PORTCULLIS_DEMO_TRUSTED_PROXIES` | proxies whose `X-Forwarded-For` names the client (CIDRs) | none: the TCP peer is the client |
//! | `PORTCULLIS_DEMO_JOB_TTL_SECS` | job lifetime, 1 to 2592000 (30 days) | 86400 |
//! | `PORTCULLIS_DEMO_MAX_DEPTH` | open jobs before 503, 1 to 1000000 | 1000 |
//! | `PORTCULLIS_DEMO_LEASE_SECS` | a running job's lease (a worker that dies loses it), 1 to 3600 | 300 |
//!
//! A variable that is set must be valid: one that is not UTF-8, is blank, or is out
//! of range is an error naming it.
//!
//! The two credential files go together (one without the other is an error); with
//! them, nothing secret is printed. SIGINT/SIGTERM: the worker finishes the job in
//! flight (through the HTTP endpoints, which stay up meanwhile), then the server
//! stops accepting and exits.
//!
//! The binary (`src/main.rs`) installs the log subscriber and calls [`start`] and
//! [`serve`]; the benchmarks in `benches/` build the same service with [`service`].
//! Modules: [`queue`] the in-memory engine, [`redis_queue`] the same queue in
//! Redis, [`jobs`] the one interface over both, [`worker`] the in-process worker, [`client`] its
//! HTTP client, [`routes`] the handlers, [`auth`] the one scope table, [`guard`]
//! the layers and credentials, [`session`] the dashboard's login and cookie.

#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod guard;
pub mod jobs;
pub mod queue;
pub mod redis_queue;
pub mod routes;
pub mod session;
#[cfg(test)]
mod tests;
pub mod worker;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::ServiceExt;
use axum::extract::Request;
use portcullis::IpSet;
use portcullis::jwt::TokenIssuer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::Layer;

use crate::client::WorkerClient;
use crate::guard::{Credentials, Guard, GuardConfig};
use crate::jobs::Jobs;
use crate::queue::{Queue, QueueConfig};
use crate::redis_queue::RedisQueue;
use crate::routes::{AppState, CountDenials, CountDenialsLayer, Counters};
use crate::worker::{Calls, Worker, WorkerConfig, WorkerStatus};

/// How long shutdown waits for the worker's job in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The internal networks by default: loopback only.
pub const DEFAULT_INTERNAL: &str = "127.0.0.0/8, ::1";

/// The state shared by the routes and the worker, the queue in memory.
pub fn state(config: QueueConfig) -> AppState {
    state_with(Arc::new(Queue::new(config)).into())
}

/// The state shared by the routes and the worker, around `queue`.
pub fn state_with(queue: Jobs) -> AppState {
    AppState {
        queue,
        counters: Arc::new(Counters::default()),
        worker: Arc::new(WorkerStatus::default()),
    }
}

/// The whole service (see [`service`]).
pub type App = CountDenials<Router>;

/// The whole service: the refusal counters around the router, which holds each
/// route inside its guarding stack and scope check (see [`guard`],
/// [`routes::app`]). The counters wrap the router as a whole, so they see every
/// refusal, the unrouted requests' included.
///
/// The client address comes from axum's `ConnectInfo` (served with
/// `into_make_service_with_connect_info`), which the crate's `axum` feature reads.
pub fn service(state: &AppState, guard: &Guard) -> App {
    CountDenialsLayer::new(state.counters.clone()).layer(routes::app(state.clone(), guard))
}

/// Serves `app` on `listener` with the worker (if any) running beside it, its
/// calls going over HTTP to `listener`'s address with tokens from the issuer. When
/// `shutdown` resolves: the worker finishes the job in flight (the server still
/// answers its calls), then the server stops accepting, lets open requests finish,
/// and this returns.
pub async fn serve(
    listener: TcpListener,
    app: App,
    state: &AppState,
    worker: Option<(WorkerConfig, TokenIssuer)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut own = listener.local_addr()?;
    if own.ip().is_unspecified() {
        own.set_ip(match own.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    let (worker_tx, worker_rx) = watch::channel(false);
    let worker = worker.map(|(config, issuer)| {
        let calls = Calls::Http(WorkerClient::new(own, issuer));
        let w = Worker::new(state.queue.clone(), config, state.worker.clone()).with_calls(calls);
        tokio::spawn(w.run(worker_rx))
    });
    let (server_tx, mut server_rx) = watch::channel(false);
    let server = axum::serve(
        listener,
        ServiceExt::<Request>::into_make_service_with_connect_info::<SocketAddr>(app),
    )
    .with_graceful_shutdown(async move {
        let _ = server_rx.wait_for(|stop| *stop).await;
    });
    let coordinator = tokio::spawn(async move {
        shutdown.await;
        tracing::info!(event = "shutdown_requested");
        let _ = worker_tx.send(true);
        if let Some(worker) = worker
            && tokio::time::timeout(DRAIN_TIMEOUT, worker).await.is_err()
        {
            tracing::warn!(
                event = "drain_timeout",
                "the job in flight did not finish in time"
            );
        }
        let _ = server_tx.send(true);
    });
    server.await?;
    let _ = coordinator.await;
    tracing::info!(event = "stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed now, so a failure
/// stops the start instead of leaving a server that ignores SIGTERM.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// The longest job lifetime: 30 days (every deadline the queue computes stays far
/// inside `Instant`'s range).
pub const MAX_JOB_TTL_SECS: u64 = 30 * 24 * 3600;
/// The most open jobs.
pub const MAX_DEPTH: u64 = 1_000_000;
/// The longest lease.
pub const MAX_LEASE_SECS: u64 = 3600;

/// Every variable the demo reads.
pub const ENV_VARS: [&str; 13] = [
    "PORTCULLIS_DEMO_ADDR",
    "REDIS_URL",
    "PORTCULLIS_DEMO_REDIS_NAMESPACE",
    "PORTCULLIS_DEMO_REDIS_CA_FILE",
    "PORTCULLIS_DEMO_LEASE_SECS",
    "PORTCULLIS_DEMO_KEY_FILE",
    "PORTCULLIS_DEMO_TOKEN_KEY_FILE",
    "PORTCULLIS_DEMO_INTERNAL_CIDRS",
    "PORTCULLIS_DEMO_INTERNAL_ISSUER",
    "PORTCULLIS_DEMO_INTERNAL_CALLERS",
    "PORTCULLIS_DEMO_TRUSTED_PROXIES",
    "PORTCULLIS_DEMO_JOB_TTL_SECS",
    "PORTCULLIS_DEMO_MAX_DEPTH",
];

/// The demo's variables that are set, read through `get` as raw values: one that is
/// not UTF-8 or is blank is an error naming it, never read as unset.
pub fn read_env(
    get: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<std::collections::HashMap<&'static str, String>, String> {
    let mut set = std::collections::HashMap::new();
    for name in ENV_VARS {
        let Some(raw) = get(name) else { continue };
        let value = raw
            .into_string()
            .map_err(|_| format!("{name}: is not valid UTF-8"))?;
        if value.trim().is_empty() {
            return Err(format!("{name}: is set but empty; unset it instead"));
        }
        set.insert(name, value);
    }
    Ok(set)
}

/// The engine's limits from the environment (`get` reads a variable):
/// `PORTCULLIS_DEMO_JOB_TTL_SECS` (default 86400, at most [`MAX_JOB_TTL_SECS`]),
/// `PORTCULLIS_DEMO_MAX_DEPTH` (default 1000, at most [`MAX_DEPTH`]) and
/// `PORTCULLIS_DEMO_LEASE_SECS` (default 300, at most [`MAX_LEASE_SECS`]). Anything
/// but a whole number in range is an error.
pub fn queue_config(get: impl Fn(&str) -> Option<String>) -> Result<QueueConfig, String> {
    let bounded = |name: &str, max: u64| -> Result<Option<u64>, String> {
        match get(name) {
            None => Ok(None),
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => Err(format!("{name} must be a whole number from 1 to {max}")),
            },
        }
    };
    let mut config = QueueConfig::default();
    if let Some(secs) = bounded("PORTCULLIS_DEMO_JOB_TTL_SECS", MAX_JOB_TTL_SECS)? {
        config.ttl = Duration::from_secs(secs);
    }
    if let Some(depth) = bounded("PORTCULLIS_DEMO_MAX_DEPTH", MAX_DEPTH)? {
        config.max_depth = usize::try_from(depth).map_err(|e| e.to_string())?;
        config.max_retained = config.max_retained.max(config.max_depth);
    }
    if let Some(secs) = bounded("PORTCULLIS_DEMO_LEASE_SECS", MAX_LEASE_SECS)? {
        config.lease = Duration::from_secs(secs);
    }
    Ok(config)
}

/// The Redis namespace from `PORTCULLIS_DEMO_REDIS_NAMESPACE` (default
/// [`guard::DEFAULT_NAMESPACE`]): 1 to 64 of `A-Z a-z 0-9 _ - .`, so a key prefix
/// can never reach into another namespace.
pub fn redis_namespace(get: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let ns =
        get("PORTCULLIS_DEMO_REDIS_NAMESPACE").unwrap_or_else(|| guard::DEFAULT_NAMESPACE.into());
    let ok = !ns.is_empty()
        && ns.len() <= 64
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(ns)
    } else {
        Err("PORTCULLIS_DEMO_REDIS_NAMESPACE must be 1 to 64 of A-Z a-z 0-9 _ - .".into())
    }
}

/// The label of the key that hashes job inputs in Redis (derived from the token
/// secret, so instances sharing the credential files share dedup).
const DEDUP_KEY_LABEL: &str = "portcullis-demo queue input hmac v1";

/// The command line: `--addr HOST:PORT` and `--redis URL`, each at most once.
/// `Debug` leaves the Redis URL out: it may hold a password.
#[derive(PartialEq, Eq)]
pub struct Args {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The Redis URL of the shared rate limits, if any.
    pub redis: Option<String>,
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Args")
            .field("addr", &self.addr)
            .field("redis", &self.redis.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Parses the flags; `get` reads the environment (`PORTCULLIS_DEMO_ADDR`,
/// `REDIS_URL`), which the flags override.
pub fn parse_args(args: &[String], get: impl Fn(&str) -> Option<String>) -> Result<Args, String> {
    const USAGE: &str = "usage: queue-service [--addr HOST:PORT] [--redis redis://HOST:PORT]";
    let (mut addr, mut redis) = (None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--addr" => &mut addr,
            "--redis" => &mut redis,
            _ => return Err(USAGE.into()),
        };
        match (slot.is_some(), it.next()) {
            (false, Some(v)) => *slot = Some(v.clone()),
            _ => return Err(USAGE.into()),
        }
    }
    let raw = addr
        .or_else(|| get("PORTCULLIS_DEMO_ADDR"))
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let addr = raw
        .parse()
        .map_err(|_| format!("not a socket address (HOST:PORT): {raw:?}"))?;
    if redis.as_deref().is_some_and(has_password) {
        return Err(
            "--redis: a URL with a password is readable by every local user in \
                    the process list; pass it in REDIS_URL instead"
                .into(),
        );
    }
    let redis = redis.or_else(|| get("REDIS_URL"));
    if redis.as_deref().is_some_and(|u| u.trim().is_empty()) {
        return Err("--redis / REDIS_URL: is set but empty; leave it out instead".into());
    }
    Ok(Args { addr, redis })
}

/// Whether a URL's authority holds a password (`scheme://user:password@host`): its
/// user information, before the authority's last `@`, has a `:`.
fn has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// What standard output shows at start: the address, and for ephemeral
/// credentials the keys, the worker's signing key and curl lines that work as
/// pasted (in one shell: the first sets `JOB`).
pub fn banner(bound: SocketAddr, credentials: &Credentials) -> String {
    let base = format!("http://{bound}");
    let mut out = format!("portcullis demo queue listening on {base}\n");
    let Credentials::Ephemeral { keys, secret, .. } = credentials else {
        out.push_str(
            "Credentials: PORTCULLIS_DEMO_KEY_FILE and PORTCULLIS_DEMO_TOKEN_KEY_FILE (not shown).\n",
        );
        return out;
    };
    let key = |id: &str| {
        keys.iter()
            .find(|k| k.id == id)
            .map(|k| k.key.expose_secret().to_owned())
            .expect("the demo keys")
    };
    let (admin, client) = (key("demo-admin"), key("demo-client"));
    out.push_str(&format!(
        "\nEphemeral demo credentials (shown once, valid until this process exits):\n\
         \x20 admin key  (admin dashboard:read): {admin}\n\
         \x20 client key (jobs:read jobs:write): {client}\n\
         \x20 worker signing key (HS256, hex; iss {iss}, aud {aud}): {}\n\
         \nTry it (in one shell; the first line keeps the job id in JOB):\n\n",
        secret.to_hex(),
        iss = guard::ISSUER,
        aud = guard::AUDIENCE,
    ));
    out.push_str(&format!(
        "JOB=$(curl -s -H 'X-API-Key: {client}' -H 'Content-Type: application/json' \
         -d '{{\"input\":\"resize photo-1\",\"priority\":5}}' {base}/v1/jobs | sed -E 's/.*\"id\":\"([0-9a-f]+)\".*/\\1/')\n\
         curl -s -H 'X-API-Key: {client}' {base}/v1/jobs/$JOB\n\
         curl -s -H 'X-API-Key: {admin}' {base}/v1/admin/stats\n\
         curl -s -H 'X-API-Key: {admin}' {base}/dashboard\n\
         \nIn a browser: {base}/dashboard/login (sign in with the admin key).\n"
    ));
    out
}

/// The external issuer trusted on the internal endpoint (`get` reads a variable):
/// `PORTCULLIS_DEMO_INTERNAL_ISSUER` with its callers in
/// `PORTCULLIS_DEMO_INTERNAL_CALLERS`, each granted `jobs:work`; either without the
/// other is an error. Its keys are fetched when the guard is built.
pub fn internal_issuer(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<portcullis::jwt::RemoteIssuer>, String> {
    const ISSUER: &str = "PORTCULLIS_DEMO_INTERNAL_ISSUER";
    const CALLERS: &str = "PORTCULLIS_DEMO_INTERNAL_CALLERS";
    let (issuer, callers) = match (get(ISSUER), get(CALLERS)) {
        (None, None) => return Ok(None),
        (Some(i), Some(c)) => (i, c),
        _ => return Err(format!("set both {ISSUER} and {CALLERS}, or neither")),
    };
    if !issuer.trim().starts_with("https://") {
        return Err(format!("{ISSUER} must be an https:// URL"));
    }
    let mut remote =
        portcullis::jwt::RemoteIssuer::discover(issuer.trim()).audience(guard::AUDIENCE);
    for (i, caller) in callers.split(',').map(str::trim).enumerate() {
        if caller.is_empty() {
            return Err(format!("{CALLERS}: entry {} is empty", i + 1));
        }
        remote = remote
            .scopes_for(caller, auth::JOBS_WORK)
            .map_err(|e| format!("{CALLERS}: {e}"))?;
    }
    Ok(Some(remote))
}

/// Everything `main` does before serving: configuration from `args` and `get` (the
/// environment), credentials, the guard, the bound listener, and the banner.
pub async fn start(
    args: &[String],
    get: impl Fn(&str) -> Option<String> + Copy,
) -> Result<(TcpListener, App, AppState, TokenIssuer, String), guard::BoxError> {
    let args = parse_args(args, get)?;
    let internal = get("PORTCULLIS_DEMO_INTERNAL_CIDRS");
    let internal = IpSet::parse(internal.as_deref().unwrap_or(DEFAULT_INTERNAL))?;
    let queue_config = queue_config(get)?;
    let credentials = Credentials::from_env(get)?;
    let (keys, secret) = credentials.parts();
    let namespace = redis_namespace(get)?;
    let ca = match get("PORTCULLIS_DEMO_REDIS_CA_FILE") {
        Some(path) => Some(
            std::fs::read(path).map_err(|_| "PORTCULLIS_DEMO_REDIS_CA_FILE could not be read")?,
        ),
        None => None,
    };
    let state = match args.redis.as_deref() {
        None => state(queue_config),
        Some(url) => {
            let queue = RedisQueue::new(
                url,
                ca.as_deref(),
                &namespace,
                secret.derive(DEDUP_KEY_LABEL),
                queue_config,
            )?;
            queue
                .connect()
                .await
                .map_err(|_| "Redis (REDIS_URL / --redis) did not answer")?;
            state_with(Arc::new(queue).into())
        }
    };
    let mut config = GuardConfig::new(keys, secret, internal)?;
    if let Some(proxies) = get("PORTCULLIS_DEMO_TRUSTED_PROXIES") {
        config.client_ip = portcullis::client_ip::ClientIpConfig::trusted_proxies(&proxies)
            .map_err(|e| format!("PORTCULLIS_DEMO_TRUSTED_PROXIES: {e}"))?;
    }
    config.reloading = credentials.reloading();
    config.internal_issuer = internal_issuer(get)?;
    config.redis = guard::redis_limiter(args.redis.as_deref(), &namespace, ca.as_deref())?;
    if let Some(redis) = &config.redis {
        redis
            .connect()
            .await
            .map_err(|_| "Redis (REDIS_URL / --redis) did not answer")?;
    }
    let guard = Guard::new(config)?;
    let issuer = guard.worker_issuer()?;
    let app = service(&state, &guard);
    let listener = TcpListener::bind(args.addr).await?;
    let banner = banner(listener.local_addr()?, &credentials);
    Ok((listener, app, state, issuer, banner))
}
