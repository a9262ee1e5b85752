//! Service-token verification per algorithm: portcullis cold (cache off), portcullis
//! cached (the same token again), and the peer a user would otherwise call,
//! `jsonwebtoken::decode` with a `Validation` for the same issuer, audience and
//! algorithm. Keys are the committed test-only keys.

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

criterion_group!(benches, bench);
criterion_main!(benches);
