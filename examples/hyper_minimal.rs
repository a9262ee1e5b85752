//! A plain hyper 1 server behind the whole portcullis stack, one handler.
//!
//! `cargo run --example hyper_minimal` listens on 127.0.0.1:8080 (`PORT` changes it;
//! 0 picks a free port). Configuration comes from the `PORTCULLIS_*` variables (see
//! the README). With no key configured it makes an ephemeral API key, valid until
//! the process exits, and prints it once with a curl line to try.
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::api_key::{ApiKeys, KeyStore, generate_key};
use portcullis::client_ip::PeerAddrLayer;
use portcullis::stack::StackBuilder;
use portcullis::{Principal, Scopes};
use tower::ServiceBuilder;
use tracing_subscriber::fmt;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let principal = req.extensions().get::<Principal>();
    let id = principal.map_or("?", Principal::id);
    let body = format!("hello, {id}\n");
    Ok(Response::new(Full::new(Bytes::from(body))))
}

/// Whether the environment configures credentials (a blank variable does not).
fn configured(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.trim().is_empty())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The access log and audit events, as JSON lines on standard error.
    fmt().json().with_writer(std::io::stderr).init();
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");

    // Configuration errors surface here, before the first request.
    let mut builder = StackBuilder::from_env()?;
    let vars = [
        "PORTCULLIS_KEY_FILE",
        "PORTCULLIS_API_KEYS",
        "PORTCULLIS_JWKS_FILE",
    ];
    if !vars.into_iter().any(configured) {
        let key = generate_key("pc_test")?;
        let store = KeyStore::from_key_list(key.expose_secret(), Scopes::default())?;
        builder = builder.api_keys(ApiKeys::new(store));
        let k = key.expose_secret();
        println!("no key configured; ephemeral key (until exit): {k}");
        println!("try: curl -i -H 'X-API-Key: {k}' http://{addr}/");
    }
    let stack = builder.build()?;

    loop {
        let (stream, peer) = listener.accept().await?;
        let svc = ServiceBuilder::new()
            .layer(PeerAddrLayer::new(peer))
            .layer(stack.clone())
            .service_fn(hello);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            if let Err(e) = conn.await {
                eprintln!("connection error: {e}");
            }
        });
    }
}
