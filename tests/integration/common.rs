//! A hyper 1 server on 127.0.0.1:0 (or [::]:0) wrapped in the layers under test, and
//! a raw TCP client that can bind its source address inside 127.0.0.0/8 and send
//! exactly the bytes a test wants (repeated headers, non-UTF-8 values).

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use portcullis::ClientIp;
use portcullis::client_ip::PeerAddrLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder};

pub type Body = Full<Bytes>;
pub type Handler = BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;

/// The handler every test server runs: answers 200 with the resolved client
/// address, or `none`.
pub fn echo_client_ip() -> Handler {
    BoxCloneService::new(tower::service_fn(|req: Request<Incoming>| async move {
        let ip = req
            .extensions()
            .get::<ClientIp>()
            .map_or_else(|| "none".to_owned(), |ip| ip.to_string());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(ip))))
    }))
}

/// Whether each connection gets its peer address attached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Attached,
    Missing,
}

/// Serves `layer` around [`echo_client_ip`] on `bind` (e.g. `127.0.0.1:0`, `[::]:0`).
pub async fn serve<L>(bind: &str, layer: L, peer: Peer) -> SocketAddr
where
    L: Layer<Handler> + Clone + Send + 'static,
    L::Service: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <L::Service as Service<Request<Incoming>>>::Future: Send + 'static,
{
    serve_with(bind, layer, peer, echo_client_ip()).await
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET /` with `headers` (raw lines, e.g. `b"X-Forwarded-For: 1.2.3.4"`) from
/// source address `from` (port chosen by the OS) to `to`.
pub async fn get_from(from: Option<IpAddr>, to: SocketAddr, headers: &[&[u8]]) -> Reply {
    get_path_from(from, to, "/", headers).await
}

pub async fn get(to: SocketAddr, headers: &[&[u8]]) -> Reply {
    get_from(None, to, headers).await
}

fn parse_reply(buf: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").expect("complete response");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Like [`serve`], with the caller's handler behind the layer.
pub async fn serve_with<L>(bind: &str, layer: L, peer: Peer, handler: Handler) -> SocketAddr
where
    L: Layer<Handler> + Clone + Send + 'static,
    L::Service: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    <L::Service as Service<Request<Incoming>>>::Future: Send + 'static,
{
    let listener = TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                continue;
            };
            let svc = layer.clone().layer(handler.clone());
            let peer_layer = (peer == Peer::Attached).then(|| PeerAddrLayer::new(remote));
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let svc = ServiceBuilder::new().option_layer(peer_layer).service(svc);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, TowerToHyperService::new(svc))
                    .await;
            });
        }
    });
    addr
}

/// Sends `GET <path>` with raw header lines from source address `from` to `to`.
pub async fn get_path_from(
    from: Option<IpAddr>,
    to: SocketAddr,
    path: &str,
    headers: &[&[u8]],
) -> Reply {
    let socket = match to {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    if let Some(ip) = from {
        socket
            .bind(SocketAddr::new(ip, 0))
            .expect("bind source address");
    }
    let mut stream = socket.connect(to).await.expect("connect");
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n").into_bytes();
    for h in headers {
        req.extend_from_slice(h);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    stream.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .unwrap();
    parse_reply(&buf)
}
