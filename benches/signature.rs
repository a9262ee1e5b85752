//! Cost of verifying a signed request (RFC 9421) beside its peer, an API key, each
//! through its layer in process (no TCP): `api_key_get` (AuthenticateLayer),
//! `signed_get_hmac` and `signed_get_ed25519` (VerifySignatureLayer, covering
//! `@method @authority @path @query` with a nonce, which the replay cache records),
//! and `signed_post_16k_hmac` (the same plus `content-digest` over a 16 KiB body,
//! read and digested). Each signed request is made fresh (its own nonce) outside
//! the timed part.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::task::{Context, Poll};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use portcullis::api_key::{ApiKeys, KeyRecord, KeyStore, generate_key};
use portcullis::authenticate::AuthenticateLayer;
use portcullis::signature::{
    SignRequestLayer, SignatureKey, SignatureVerifier, SignedBody, SigningKey, VerifySignatureLayer,
};
use tower::{Layer, Service, ServiceExt};

/// Polls a future that every service here completes without waiting.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f
        .as_mut()
        .poll(&mut Context::from_waker(std::task::Waker::noop()))
    {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("not ready"),
    }
}

fn ok<B>(_req: Request<B>) -> std::future::Ready<Result<Response<Bytes>, Infallible>> {
    std::future::ready(Ok(Response::new(Bytes::new())))
}

/// A request signed by `SignRequestLayer` (captured, not sent).
fn signed(layer: &SignRequestLayer, method: &str, body: Bytes) -> Request<SignedBody<Full<Bytes>>> {
    let capture = tower::service_fn(|req: Request<SignedBody<Full<Bytes>>>| {
        std::future::ready(Ok::<_, Infallible>(req))
    });
    let req = Request::builder()
        .method(method)
        .uri("http://svc.test/v1/jobs?state=queued")
        .body(Full::new(body))
        .unwrap();
    now(layer.layer(capture).oneshot(req)).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("signature_verify");

    let key = generate_key("pc_live").unwrap();
    let keys =
        ApiKeys::new(KeyStore::from_records([KeyRecord::new("k", key.digest()).unwrap()]).unwrap());
    let mut api = AuthenticateLayer::api_keys(keys).layer(tower::service_fn(ok::<()>));
    let header = key.expose_secret().to_owned();
    g.bench_function("api_key_get", |b| {
        b.iter_batched(
            || {
                Request::builder()
                    .uri("http://svc.test/v1/jobs?state=queued")
                    .header("x-api-key", black_box(&header))
                    .body(())
                    .unwrap()
            },
            |req| {
                let res = now(api.call(req)).unwrap();
                assert_eq!(res.status(), 200);
            },
            BatchSize::SmallInput,
        )
    });

    let secret = [7u8; 32];
    let ed = SigningKey::ed25519("ed", &[9u8; 32]).unwrap();
    let verifier = SignatureVerifier::builder()
        .key(SignatureKey::hmac_sha256("hm", &secret).unwrap())
        .key(SignatureKey::ed25519("ed", &ed.public_key().unwrap()).unwrap())
        .max_nonces_per_key(10_000_000)
        .build()
        .unwrap();
    let mut verify = VerifySignatureLayer::new(verifier)
        .layer(tower::service_fn(ok::<SignedBody<SignedBody<Full<Bytes>>>>));
    let hmac = SignRequestLayer::new(SigningKey::hmac_sha256("hm", &secret).unwrap());
    let ed = SignRequestLayer::new(ed);
    let body16k = Bytes::from(vec![b'x'; 16 * 1024]);
    for (name, signer, method, body) in [
        ("signed_get_hmac", &hmac, "GET", Bytes::new()),
        ("signed_get_ed25519", &ed, "GET", Bytes::new()),
        ("signed_post_16k_hmac", &hmac, "POST", body16k),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || signed(signer, method, body.clone()),
                |req| {
                    let res = now(verify.call(req)).unwrap();
                    assert_eq!(res.status(), 200);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
