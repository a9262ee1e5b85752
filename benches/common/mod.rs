//! What several benchmarks share: the request body type, a handler answering `ok`,
//! a request as a client sends it, a poll of a future that is ready at once, and the
//! stack a tower user would assemble from peers ([`peer`]).
//! Each benchmark uses part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use portcullis::client_ip::PeerAddr;
use tower::Service;

pub mod peer;

pub type Body = Full<Bytes>;

/// The inner service: `200 ok`, ready at once.
pub fn handler()
-> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Unpin> + Clone
{
    tower::service_fn(|_req: Request<Body>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
            Bytes::from_static(b"ok"),
        ))))
    })
}

/// `GET /v1/jobs/01J9Z6Q?page=2` from `10.1.2.3` with a user agent and the
/// credential header `name: value`.
pub fn request(name: &str, value: &str) -> Request<Body> {
    let mut req = Request::builder()
        .uri("/v1/jobs/01J9Z6Q?page=2")
        .header("user-agent", "bench/1.0")
        .header(name, value)
        .body(Full::new(Bytes::new()))
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("10.1.2.3:51000".parse().unwrap()));
    req
}

/// Drives a future that is ready without waiting (every service here is).
pub fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the benchmark services never wait"),
    }
}
