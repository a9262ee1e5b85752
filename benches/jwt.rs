//! Service-token verification per algorithm: portcullis cold (cache off), portcullis
//! cached (the same token again), and the peer a user would otherwise call,
//! `jsonwebtoken::decode` with a `Validation` for the same issuer, audience and
//! algorithm. Keys are the committed test-only keys.
//!
//! With the `jwks-remote` feature, also the same ES256 and RS256 tokens verified with
//! keys fetched from a URL (a local server on loopback) and with the same keys from
//! a key file: the request path never touches the network, so the two should cost
//! the same. The two run interleaved (see `interleaved`), so that load from other
//! processes falls on both.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{DecodingKey, Validation};
use portcullis::jwt::{Algorithm, SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};

const EC_KEY: &[u8] = include_bytes!("../tests/data/jwt/ec.key.pem");
const EC_PUB: &[u8] = include_bytes!("../tests/data/jwt/ec.pub.pem");
const ED_KEY: &[u8] = include_bytes!("../tests/data/jwt/ed.key.pem");
const ED_PUB: &[u8] = include_bytes!("../tests/data/jwt/ed.pub.pem");
const RSA_KEY: &[u8] = include_bytes!("../tests/data/jwt/rsa.key.pem");
const RSA_PUB: &[u8] = include_bytes!("../tests/data/jwt/rsa.pub.pem");
const SECRET: [u8; 32] = *b"benchmark-hs256-secret-32-bytes!";
const ISS: &str = "https://ci.example";
const AUD: &str = "jobs-api";

struct Case {
    name: &'static str,
    token: String,
    key: VerifyingKey,
    decoding: DecodingKey,
    alg: jsonwebtoken::Algorithm,
}

fn cases() -> Vec<Case> {
    let mint = |key: SigningKey| {
        TokenIssuer::builder(key.kid("k"))
            .issuer(ISS)
            .subject("scheduler")
            .audience(AUD)
            .scope("jobs:read")
            .scope("jobs:write")
            .build()
            .unwrap()
            .mint()
            .unwrap()
            .as_str()
            .to_owned()
    };
    vec![
        Case {
            name: "HS256",
            token: mint(SigningKey::hs256(&SECRET).unwrap()),
            key: VerifyingKey::hs256(&SECRET).unwrap(),
            decoding: DecodingKey::from_secret(&SECRET),
            alg: jsonwebtoken::Algorithm::HS256,
        },
        Case {
            name: "ES256",
            token: mint(SigningKey::from_pem(Algorithm::ES256, EC_KEY).unwrap()),
            key: VerifyingKey::from_pem(Algorithm::ES256, EC_PUB).unwrap(),
            decoding: DecodingKey::from_ec_pem(EC_PUB).unwrap(),
            alg: jsonwebtoken::Algorithm::ES256,
        },
        Case {
            name: "EdDSA",
            token: mint(SigningKey::from_pem(Algorithm::EdDSA, ED_KEY).unwrap()),
            key: VerifyingKey::from_pem(Algorithm::EdDSA, ED_PUB).unwrap(),
            decoding: DecodingKey::from_ed_pem(ED_PUB).unwrap(),
            alg: jsonwebtoken::Algorithm::EdDSA,
        },
        Case {
            name: "RS256",
            token: mint(SigningKey::from_pem(Algorithm::RS256, RSA_KEY).unwrap()),
            key: VerifyingKey::from_pem(Algorithm::RS256, RSA_PUB).unwrap(),
            decoding: DecodingKey::from_rsa_pem(RSA_PUB).unwrap(),
            alg: jsonwebtoken::Algorithm::RS256,
        },
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("jwt_verify");
    for case in cases() {
        let verifier = |capacity| {
            TokenVerifier::builder()
                .key(case.key.clone().kid("k"))
                .issuer(ISS)
                .audience(AUD)
                .cache_capacity(capacity)
                .build()
                .unwrap()
        };
        let cold = verifier(0);
        let cached = verifier(1024);
        cold.verify(&case.token).unwrap();
        cached.verify(&case.token).unwrap();
        assert_eq!(cached.cached_tokens(), 1);

        // The peer: what a user of jsonwebtoken writes, made as strict as it allows.
        let mut validation = Validation::new(case.alg);
        validation.set_issuer(&[ISS]);
        validation.set_audience(&[AUD]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        jsonwebtoken::decode::<serde_json::Value>(&case.token, &case.decoding, &validation)
            .unwrap();

        let token = case.token.as_str();
        g.bench_function(format!("{}/portcullis_cold", case.name), |b| {
            b.iter(|| cold.verify(black_box(token)).unwrap())
        });
        g.bench_function(format!("{}/portcullis_cached", case.name), |b| {
            b.iter(|| cached.verify(black_box(token)).unwrap())
        });
        g.bench_function(format!("{}/jsonwebtoken_decode", case.name), |b| {
            b.iter(|| {
                jsonwebtoken::decode::<serde_json::Value>(
                    black_box(token),
                    &case.decoding,
                    &validation,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

/// A server on `127.0.0.1` that answers every request with `body` as a JWK Set.
#[cfg(feature = "jwks-remote")]
fn serve_jwks(body: &'static str) -> std::net::SocketAddr {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[cfg(feature = "jwks-remote")]
fn bench_remote(c: &mut Criterion) {
    use portcullis::jwt::{KeyFile, RemoteIssuer};
    const JWKS: &str = include_str!("../tests/data/jwt/jwks.json");
    let addr = serve_jwks(JWKS);
    let dir = std::env::temp_dir().join(format!("portcullis-bench-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, JWKS).unwrap();
    let mut g = c.benchmark_group("jwt_keys_source");
    for (name, alg, pem, kid) in [
        ("ES256", Algorithm::ES256, EC_KEY, "ec-1"),
        ("RS256", Algorithm::RS256, RSA_KEY, "rsa-1"),
    ] {
        let token = TokenIssuer::builder(SigningKey::from_pem(alg, pem).unwrap().kid(kid))
            .issuer(ISS)
            .subject("scheduler")
            .audience(AUD)
            .scope("jobs:read")
            .build()
            .unwrap()
            .mint()
            .unwrap()
            .as_str()
            .to_owned();
        for capacity in [0, 1024] {
            let from_file = TokenVerifier::builder()
                .key_file(KeyFile::jwks(&path))
                .issuer(ISS)
                .audience(AUD)
                .cache_capacity(capacity)
                .build()
                .unwrap();
            let from_url = TokenVerifier::builder()
                .remote_issuer(
                    RemoteIssuer::jwks(ISS, format!("http://{addr}/keys"))
                        .allow_plain_http_to_loopback_dangerously()
                        .audience(AUD),
                )
                .cache_capacity(capacity)
                .build()
                .unwrap();
            from_file.verify(&token).unwrap();
            from_url.verify(&token).unwrap();
            let mode = if capacity == 0 { "cold" } else { "cached" };
            let token = token.as_str();
            let file = || {
                from_file.verify(black_box(token)).unwrap();
            };
            let url = || {
                from_url.verify(black_box(token)).unwrap();
            };
            // Both benchmarks run the same interleaved work and each times its own
            // half, so a busy machine slows both alike.
            g.bench_function(format!("{name}/{mode}/key_file"), |b| {
                b.iter_custom(|iters| interleaved(&file, &url, iters))
            });
            g.bench_function(format!("{name}/{mode}/url"), |b| {
                b.iter_custom(|iters| interleaved(&url, &file, iters))
            });
        }
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `timed` and `other` alternately in blocks of 16 calls until `timed` ran
/// `iters` times; returns the time spent in `timed` only.
#[cfg(feature = "jwks-remote")]
fn interleaved(timed: &dyn Fn(), other: &dyn Fn(), iters: u64) -> std::time::Duration {
    const BLOCK: u64 = 16;
    let mut total = std::time::Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = BLOCK.min(iters - done);
        let start = std::time::Instant::now();
        for _ in 0..n {
            timed();
        }
        total += start.elapsed();
        for _ in 0..n {
            other();
        }
        done += n;
    }
    total
}

#[cfg(not(feature = "jwks-remote"))]
fn bench_remote(_: &mut Criterion) {}

criterion_group!(benches, bench, bench_remote);
criterion_main!(benches);
