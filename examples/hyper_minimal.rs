//! A plain hyper 1 server guarded by portcullis.
//!
//! `cargo run --example hyper_minimal` listens on 127.0.0.1:8080 (`PORT` changes it;
//! 0 picks a free port and prints it). Only loopback clients are allowed.
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::allowlist::IpAllowlistLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddrLayer};
use portcullis::{ClientIp, IpSet};
use tower::ServiceBuilder;

async fn hello(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let ip = req
        .extensions()
        .get::<ClientIp>()
        .expect("resolved by ClientIpLayer");
    Ok(Response::new(Full::new(Bytes::from(format!(
        "hello, {ip}\n"
    )))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Configuration errors surface here, before the server starts.
    let client_ip = ClientIpLayer::new(ClientIpConfig::peer_only());
    let allowlist = IpAllowlistLayer::new(IpSet::parse("127.0.0.0/8, ::1")?);

    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("listening on http://{}", listener.local_addr()?);
    loop {
        let (stream, peer) = listener.accept().await?;
        let svc = ServiceBuilder::new()
            .layer(PeerAddrLayer::new(peer))
            .layer(client_ip.clone())
            .layer(allowlist.clone())
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
