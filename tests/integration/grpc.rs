//! The stack in front of a real tonic server, called by a real tonic client over TCP
//! (HTTP/2, a hand-written codec: no protobuf compiler). Every refusal class comes
//! back as a trailers-only gRPC response with its `grpc-status` and a generic
//! message (a server wired without a peer address, INTERNAL); a request that is not a gRPC call gets the HTTP refusal even from a
//! tonic server.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use portcullis::Principal;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyStore, generate_key};
use portcullis::auth_throttle::AuthThrottleLayer;
use portcullis::rate_limit::Quota;
use portcullis::scope::RequireScopeLayer;
use portcullis::stack::StackLayer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic::{Code, Status};
use tower::Service;

use crate::log_capture::capture;

/// Messages are raw bytes: no protobuf, no code generation.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;
#[derive(Debug)]
struct RawEncoder;
#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// `portcullis.test.Echo/Who`: answers with the caller's principal id, or `none`.
#[derive(Clone, Debug)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "portcullis.test.Echo";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let who = tower::service_fn(|r: tonic::Request<Bytes>| async move {
                let id = r
                    .extensions()
                    .get::<Principal>()
                    .map_or_else(|| "none".to_owned(), |p| p.id().to_owned());
                Ok::<_, Status>(tonic::Response::new(Bytes::from(id)))
            });
            Ok(tonic::server::Grpc::new(RawCodec).unary(who, req).await)
        })
    }
}

const WHO: &str = "/portcullis.test.Echo/Who";

/// Serves `stack` (and, inside it, `scope` if given) around [`Echo`] with tonic's
/// own server, which also accepts HTTP/1.1 for the non-gRPC checks.
async fn serve(stack: StackLayer, scope: Option<RequireScopeLayer>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Server::builder()
        .accept_http1(true)
        .layer(stack)
        .layer(tower::util::option_layer(scope))
        .add_service(Echo);
    tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
    addr
}

fn key_store(scopes: &str) -> (ApiKeys, GeneratedKey) {
    let key = generate_key("pc_test").unwrap();
    let file = format!(
        "[[keys]]\nid = \"grpc-client\"\ndigest = \"{}\"\nscopes = [{scopes}]\n",
        key.digest()
    );
    (ApiKeys::new(KeyStore::from_toml(&file).unwrap()), key)
}

/// One unary call with the given metadata.
async fn call(addr: SocketAddr, metadata: &[(&'static str, &str)]) -> Result<String, Status> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let mut req = tonic::Request::new(Bytes::from_static(b"ping"));
    for (name, value) in metadata {
        req.metadata_mut().append(*name, value.parse().unwrap());
    }
    let res = client
        .unary(req, PathAndQuery::from_static(WHO), RawCodec)
        .await?;
    Ok(String::from_utf8(res.into_inner().to_vec()).unwrap())
}

/// A gRPC refusal: `code`, the fixed message, nothing the client sent.
fn assert_refused(r: Result<String, Status>, code: Code, message: &str, sent: &str) -> Status {
    let status = r.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    // The message is ours, not tonic's inference from an HTTP status.
    assert_eq!(status.message(), message);
    assert!(status.details().is_empty());
    let all = format!("{status:?}");
    assert!(
        !sent.is_empty() && !all.contains(sent),
        "input echoed: {all}"
    );
    status
}

#[tokio::test]
async fn a_valid_key_passes_and_the_handler_sees_the_principal() {
    let (keys, key) = key_store("\"jobs:read\"");
    let addr = serve(StackLayer::builder().api_keys(keys).build().unwrap(), None).await;
    let r = call(addr, &[("x-api-key", key.expose_secret())]).await;
    assert_eq!(r.unwrap(), "grpc-client");
    let bearer = format!("Bearer {}", key.expose_secret());
    let r = call(addr, &[("authorization", &bearer)]).await;
    assert_eq!(r.unwrap(), "grpc-client");
}

#[tokio::test]
async fn missing_and_wrong_credentials_are_unauthenticated() {
    capture();
    let (keys, _) = key_store("\"jobs:read\"");
    let addr = serve(StackLayer::builder().api_keys(keys).build().unwrap(), None).await;
    let r = call(addr, &[("x-test", "none-sent")]).await;
    assert_refused(r, Code::Unauthenticated, "unauthenticated", "none-sent");
    let wrong = generate_key("pc_test").unwrap();
    let r = call(addr, &[("x-api-key", wrong.expose_secret())]).await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "unauthenticated",
        wrong.expose_secret(),
    );
    // The refusal was audited, and the key is nowhere in the logs.
    let text = capture().text();
    assert!(text.contains("auth_failed"));
    assert!(!text.contains(wrong.expose_secret()));
}

#[tokio::test]
async fn two_credentials_are_an_invalid_argument() {
    let (keys, key) = key_store("\"jobs:read\"");
    let addr = serve(StackLayer::builder().api_keys(keys).build().unwrap(), None).await;
    let bearer = format!("Bearer {}", key.expose_secret());
    let r = call(
        addr,
        &[
            ("x-api-key", key.expose_secret()),
            ("authorization", &bearer),
        ],
    )
    .await;
    assert_refused(
        r,
        Code::InvalidArgument,
        "invalid argument",
        key.expose_secret(),
    );
}

#[tokio::test]
async fn a_denied_address_and_a_missing_scope_are_permission_denied() {
    let (keys, key) = key_store("\"jobs:read\"");
    let stack = StackLayer::builder()
        .api_keys(keys)
        .allowlist("10.0.0.0/8")
        .build()
        .unwrap();
    let addr = serve(stack, None).await;
    let r = call(addr, &[("x-api-key", key.expose_secret())]).await;
    assert_refused(
        r,
        Code::PermissionDenied,
        "permission denied",
        key.expose_secret(),
    );

    let (keys, key) = key_store("\"jobs:read\"");
    let stack = StackLayer::builder().api_keys(keys).build().unwrap();
    let scope = RequireScopeLayer::new("jobs:write").unwrap();
    let addr = serve(stack, Some(scope)).await;
    let r = call(addr, &[("x-api-key", key.expose_secret())]).await;
    let status = assert_refused(
        r,
        Code::PermissionDenied,
        "permission denied",
        key.expose_secret(),
    );
    assert!(status.metadata().get("www-authenticate").is_none());
}

#[tokio::test]
async fn the_rate_limit_and_the_throttle_are_resource_exhausted_with_pushback() {
    let (keys, key) = key_store("\"jobs:read\"");
    let stack = StackLayer::builder()
        .api_keys(keys)
        .quotas("1/h")
        .build()
        .unwrap();
    let addr = serve(stack, None).await;
    let sent = [("x-api-key", key.expose_secret())];
    assert_eq!(call(addr, &sent).await.unwrap(), "grpc-client");
    let status = assert_refused(
        call(addr, &sent).await,
        Code::ResourceExhausted,
        "resource exhausted",
        key.expose_secret(),
    );
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 1_000 && pushback <= 3_600_000, "{pushback}");
    assert!(status.metadata().get("ratelimit").is_some());

    let (keys, key) = key_store("\"jobs:read\"");
    let stack = StackLayer::builder()
        .api_keys(keys)
        .auth_throttle(
            AuthThrottleLayer::new(Quota::new(1, Duration::from_secs(3600)).unwrap())
                .lockout_before_verify(),
        )
        .build()
        .unwrap();
    let addr = serve(stack, None).await;
    let wrong = generate_key("pc_test").unwrap();
    let r = call(addr, &[("x-api-key", wrong.expose_secret())]).await;
    assert_refused(
        r,
        Code::Unauthenticated,
        "unauthenticated",
        wrong.expose_secret(),
    );
    let r = call(addr, &[("x-api-key", key.expose_secret())]).await;
    let status = assert_refused(
        r,
        Code::ResourceExhausted,
        "resource exhausted",
        key.expose_secret(),
    );
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
}

#[tokio::test]
async fn a_wrong_credential_from_a_throttled_address_is_refused_after_the_inner_answer() {
    // The default mode verifies first: the 429 is built from the inner refusal, after
    // the request has gone, and must still take the gRPC form.
    let (keys, _) = key_store("\"jobs:read\"");
    let stack = StackLayer::builder()
        .api_keys(keys)
        .auth_throttle(AuthThrottleLayer::new(
            Quota::new(1, Duration::from_secs(3600)).unwrap(),
        ))
        .build()
        .unwrap();
    let addr = serve(stack, None).await;
    let wrong = generate_key("pc_test").unwrap();
    let sent = [("x-api-key", wrong.expose_secret())];
    assert_refused(
        call(addr, &sent).await,
        Code::Unauthenticated,
        "unauthenticated",
        wrong.expose_secret(),
    );
    assert_refused(
        call(addr, &sent).await,
        Code::ResourceExhausted,
        "resource exhausted",
        wrong.expose_secret(),
    );
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_fail_closed_backend_that_is_down_is_unavailable() {
    use portcullis::rate_limit::redis::{FailurePolicy, RedisLimiter};
    let (keys, key) = key_store("\"jobs:read\"");
    // Nothing listens on port 1.
    let redis = RedisLimiter::builder("redis://127.0.0.1:1", FailurePolicy::FailClosed)
        .unwrap()
        .build()
        .unwrap();
    let stack = StackLayer::builder()
        .api_keys(keys)
        .quotas("100/s")
        .redis(redis)
        .build()
        .unwrap();
    let addr = serve(stack, None).await;
    let r = call(addr, &[("x-api-key", key.expose_secret())]).await;
    let status = assert_refused(r, Code::Unavailable, "unavailable", key.expose_secret());
    assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
}

#[tokio::test]
async fn a_server_that_attaches_no_peer_address_is_internal() {
    // tonic's routes served by plain hyper over HTTP/2 without `PeerAddrLayer`: a
    // wiring mistake, answered INTERNAL, not a made-up client address.
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    use tower::Layer;

    let (keys, key) = key_store("\"jobs:read\"");
    let stack = StackLayer::builder().api_keys(keys).build().unwrap();
    let service = stack.layer(tonic::service::Routes::new(Echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service.clone()),
                );
            tokio::spawn(conn);
        }
    });
    let r = call(addr, &[("x-api-key", key.expose_secret())]).await;
    assert_refused(r, Code::Internal, "internal", key.expose_secret());
}

/// A raw HTTP/1.1 `POST` with `content_type`: status, headers, body.
async fn post_http1(addr: SocketAddr, content_type: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {WHO} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn only_well_formed_grpc_content_types_get_the_grpc_form() {
    let (keys, _) = key_store("\"jobs:read\"");
    let addr = serve(StackLayer::builder().api_keys(keys).build().unwrap(), None).await;
    for ct in [
        "application/grpc",
        "application/grpc+proto",
        "Application/GRPC+json",
    ] {
        let (status, head, body) = post_http1(addr, ct).await;
        assert_eq!(status, 200, "{ct}");
        assert!(head.contains("grpc-status: 16"), "{ct}: {head}");
        assert!(!head.contains("www-authenticate"), "{ct}");
        assert!(body.is_empty() || body == "0\r\n\r\n", "{ct}: {body:?}");
    }
    for ct in [
        "application/grpc-web",
        "application/grpc-web+proto",
        "application/grpc; charset=utf-8",
        "application/grpc+",
        "application/grpcx",
        "application/grpc+proto+<script>",
        "text/plain",
    ] {
        let (status, head, body) = post_http1(addr, ct).await;
        assert_eq!(status, 401, "{ct}");
        assert!(!head.contains("grpc-status"), "{ct}");
        assert!(
            head.contains("content-type: application/problem+json"),
            "{ct}: {head}"
        );
        assert!(
            body.contains("\"status\":401"),
            "tonic's body carries the document: {body:?}"
        );
        assert!(!body.contains("script") && !head.contains("script"), "{ct}");
    }
}
