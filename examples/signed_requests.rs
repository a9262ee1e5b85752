//! Both ends of a signed request (RFC 9421): a hyper server verifying signatures
//! in front of API-key authentication, and a client signing its requests.
//!
//! `cargo run --example signed_requests --features signature` starts the server on a
//! free loopback port, then sends from the same process a signed POST (`hmac-sha256`,
//! with `Content-Digest`), a signed GET (`ed25519`), and the POST once more with its
//! body changed in transit, which the server refuses. The secrets are ephemeral.
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::api_key::{ApiKeys, KeyStore, generate_key};
use portcullis::authenticate::AuthenticateLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, PeerAddrLayer};
use portcullis::signature::{
    SignRequestLayer, SignatureKey, SignatureVerifier, SignedBody, SigningKey, VerifySignatureLayer,
};
use portcullis::{Principal, Scopes};
use tower::{Layer, ServiceBuilder, ServiceExt};

type Body = SignedBody<Full<Bytes>>;

async fn hello(req: Request<SignedBody<Incoming>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let id = req
        .extensions()
        .get::<Principal>()
        .map_or("?", Principal::id)
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let text = format!("hello, {id}: {} bytes\n", body.len());
    Ok(Response::new(Full::new(Bytes::from(text))))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Ephemeral keys: an HMAC secret shared with the worker, an Ed25519 key pair.
    let mut secret = [0u8; 32];
    let mut seed = [0u8; 32];
    getrandom::fill(&mut secret)?;
    getrandom::fill(&mut seed)?;
    let hmac = SigningKey::hmac_sha256("worker", &secret)?;
    let ed = SigningKey::ed25519("reporter", &seed)?;
    let verifier = SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256("worker", &secret)?.with_scopes(Scopes::parse("jobs:work")?))
        .key(SignatureKey::ed25519(
            "reporter",
            &ed.public_key().expect("ed25519"),
        )?)
        .build()?;
    let api_key = generate_key("pc_live")?;
    let keys = ApiKeys::new(KeyStore::from_records([
        portcullis::api_key::KeyRecord::new("dashboard", api_key.digest())?,
    ])?);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let layer = VerifySignatureLayer::new(verifier);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let svc = ServiceBuilder::new()
                .layer(PeerAddrLayer::new(peer))
                .layer(ClientIpLayer::new(ClientIpConfig::peer_only()))
                .layer(layer.clone())
                .layer(AuthenticateLayer::api_keys(keys.clone()))
                .service_fn(hello);
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, TowerToHyperService::new(svc))
                    .await;
            });
        }
    });

    for (key, method, body, tamper) in [
        (&hmac, "POST", &b"{\"input\":\"hello\"}"[..], false),
        (&ed, "GET", &b""[..], false),
        (&hmac, "POST", &b"{\"input\":\"hello\"}"[..], true),
    ] {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
        // The connection, changing the signed body on its way when `tamper` is set.
        let client = tower::service_fn(move |req: Request<Body>| {
            let sender = sender.clone();
            async move {
                let (parts, body) = req.into_parts();
                let mut bytes = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                if tamper {
                    bytes = Bytes::from_static(b"{\"input\":\"HELLO\"}");
                }
                let req = Request::from_parts(parts, Full::new(bytes));
                sender.lock().await.send_request(req).await
            }
        });
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}/v1/jobs"))
            .body(Full::new(Bytes::copy_from_slice(body)))?;
        let res = SignRequestLayer::new(key.clone())
            .layer(client)
            .oneshot(req)
            .await?;
        let status = res.status();
        let text = res.into_body().collect().await?.to_bytes();
        println!(
            "{method} signed by {key:?}{}: {status} {}",
            if tamper { ", body changed" } else { "" },
            String::from_utf8_lossy(&text).trim()
        );
    }
    Ok(())
}
