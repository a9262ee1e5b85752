//! Unit tests of the verification path: the published examples, every bad input of
//! the threat model, key rules, the cache and reload.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::EncodingKey;
use proptest::prelude::*;
use serde_json::json;

use super::time::unix_now;
use super::*;
use crate::AuthMethod;

const EC_KEY: &[u8] = include_bytes!("../../tests/data/jwt/ec.key.pem");
const EC_PUB: &[u8] = include_bytes!("../../tests/data/jwt/ec.pub.pem");
const EC2_KEY: &[u8] = include_bytes!("../../tests/data/jwt/ec2.key.pem");
const ED_KEY: &[u8] = include_bytes!("../../tests/data/jwt/ed.key.pem");
const ED_PUB: &[u8] = include_bytes!("../../tests/data/jwt/ed.pub.pem");
const RSA_KEY: &[u8] = include_bytes!("../../tests/data/jwt/rsa.key.pem");
const RSA_PUB: &[u8] = include_bytes!("../../tests/data/jwt/rsa.pub.pem");
const JWKS: &str = include_str!("../../tests/data/jwt/jwks.json");

const SECRET: [u8; 32] = *b"0123456789abcdef0123456789abcdef";
const ISS: &str = "https://ci.example";
const AUD: &str = "jobs-api";

fn b64(s: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// Signs arbitrary header and payload JSON text, so tests can craft any claims.
fn sign(header: &str, payload: &str, key: &EncodingKey, alg: jsonwebtoken::Algorithm) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

fn hs(header: &str, payload: &str) -> String {
    sign(
        header,
        payload,
        &EncodingKey::from_secret(&SECRET),
        jsonwebtoken::Algorithm::HS256,
    )
}

fn good_claims() -> serde_json::Value {
    let now = unix_now();
    json!({"iss": ISS, "sub": "scheduler", "aud": AUD, "iat": now, "exp": now + 600, "jti": "j-1", "scope": "jobs:write jobs:read"})
}

fn with(
    mut claims: serde_json::Value,
    f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> String {
    f(claims.as_object_mut().unwrap());
    claims.to_string()
}

fn hs_claims(claims: &str) -> String {
    hs(r#"{"alg":"HS256","kid":"hs-1"}"#, claims)
}

fn builder() -> TokenVerifierBuilder {
    TokenVerifier::builder().issuer(ISS).audience(AUD)
}

fn hs_verifier() -> TokenVerifier {
    builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
        .build()
        .unwrap()
}

/// Several keys of every family, by kid.
fn multi_verifier() -> TokenVerifier {
    builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
        .keys(KeySet::from_jwks(JWKS).unwrap())
        .key(
            VerifyingKey::from_pem(Algorithm::RS256, RSA_PUB)
                .unwrap()
                .kid("rsa-pem"),
        )
        .build()
        .unwrap()
}

#[test]
fn happy_paths_for_every_family() {
    let v = multi_verifier();
    let claims = good_claims().to_string();
    for (kid, alg, key) in [
        (
            "hs-1",
            jsonwebtoken::Algorithm::HS256,
            EncodingKey::from_secret(&SECRET),
        ),
        (
            "ec-1",
            jsonwebtoken::Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_KEY).unwrap(),
        ),
        (
            "ed-1",
            jsonwebtoken::Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_KEY).unwrap(),
        ),
        (
            "rsa-1",
            jsonwebtoken::Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        ),
        (
            "rsa-pem",
            jsonwebtoken::Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_KEY).unwrap(),
        ),
    ] {
        let header = format!(r#"{{"alg":"{alg:?}","kid":"{kid}","typ":"JWT"}}"#);
        let t = v.verify_token(&sign(&header, &claims, &key, alg)).unwrap();
        assert_eq!(t.subject(), "scheduler", "{kid}");
        assert_eq!(t.key_id(), Some(kid));
        assert_eq!(t.issuer(), ISS);
        assert_eq!(t.jti(), Some("j-1"));
        let p = t.principal();
        assert_eq!(p.method(), AuthMethod::ServiceToken);
        assert_eq!(
            p.scopes().iter().collect::<Vec<_>>(),
            ["jobs:read", "jobs:write"]
        );
    }
}

#[test]
fn issuer_round_trip_for_every_family() {
    let v = multi_verifier();
    for (kid, key) in [
        ("hs-1", SigningKey::hs256(&SECRET).unwrap()),
        (
            "ec-1",
            SigningKey::from_pem(Algorithm::ES256, EC_KEY).unwrap(),
        ),
        (
            "ed-1",
            SigningKey::from_pem(Algorithm::EdDSA, ED_KEY).unwrap(),
        ),
        (
            "rsa-1",
            SigningKey::from_pem(Algorithm::RS256, RSA_KEY).unwrap(),
        ),
    ] {
        let issuer = TokenIssuer::builder(key.kid(kid))
            .issuer(ISS)
            .subject("coordinator")
            .audience(AUD)
            .scope("jobs:work")
            .build()
            .unwrap();
        let minted = issuer.mint().unwrap();
        let t = v.verify_token(minted.as_str()).unwrap();
        assert_eq!(t.subject(), "coordinator");
        assert_eq!(t.jti(), Some(minted.jti()));
        assert_eq!(t.expires_at(), minted.expires_at());
        assert!(t.principal().scopes().contains("jobs:work"));
        // Two mints never share a jti.
        assert_ne!(issuer.mint().unwrap().jti(), minted.jti());
    }
}

// ---- RFC 7515 appendix A and RFC 8037 appendix A ---------------------------------

const RFC7515_PAYLOAD: &str = "eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ";

/// Flips one character of the signature.
fn tamper(token: &str) -> String {
    let mut t = token.to_owned().into_bytes();
    let i = t.len() - 3;
    t[i] = if t[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(t).unwrap()
}

/// The examples' claims lack `iat`, `sub` and `aud`, so a verifier refuses them, but
/// only *after* the signature verified: `MissingClaim`, not `BadSignature`. The same
/// token with one signature character changed is `BadSignature`.
fn assert_signature_verifies(v: &TokenVerifier, token: &str) {
    assert_eq!(v.verify(token).unwrap_err(), TokenRejection::MissingClaim);
    assert_eq!(
        v.verify(&tamper(token)).unwrap_err(),
        TokenRejection::BadSignature
    );
}

#[test]
fn rfc7515_a1_hs256() {
    let jwk = r#"{"kty":"oct","alg":"HS256","k":"AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"}"#;
    let v = TokenVerifier::builder()
        .issuer("joe")
        .audience(AUD)
        .key(VerifyingKey::from_jwk(jwk).unwrap())
        .build()
        .unwrap();
    let header = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9";
    let token = format!("{header}.{RFC7515_PAYLOAD}.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
    assert_signature_verifies(&v, &token);
    // Our signer produces the published signature for the same input.
    let secret = URL_SAFE_NO_PAD
        .decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
        .unwrap();
    let sig = jsonwebtoken::crypto::sign(
        format!("{header}.{RFC7515_PAYLOAD}").as_bytes(),
        &EncodingKey::from_secret(&secret),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    assert_eq!(sig, "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk");
}

#[test]
fn rfc7515_a2_rs256() {
    let jwk = r#"{"kty":"RSA","alg":"RS256","e":"AQAB","n":"ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ"}"#;
    let v = TokenVerifier::builder()
        .issuer("joe")
        .audience(AUD)
        .key(VerifyingKey::from_jwk(jwk).unwrap())
        .build()
        .unwrap();
    let token = format!(
        "eyJhbGciOiJSUzI1NiJ9.{RFC7515_PAYLOAD}.cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw"
    );
    assert_signature_verifies(&v, &token);
}

#[test]
fn rfc7515_a3_es256() {
    let jwk = r#"{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
    let v = TokenVerifier::builder()
        .issuer("joe")
        .audience(AUD)
        .key(VerifyingKey::from_jwk(jwk).unwrap())
        .build()
        .unwrap();
    let token = format!(
        "eyJhbGciOiJFUzI1NiJ9.{RFC7515_PAYLOAD}.DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q"
    );
    assert_signature_verifies(&v, &token);
}

#[test]
fn rfc7515_a5_unsecured_is_refused() {
    let v = hs_verifier();
    // As published: empty signature.
    let token = format!("eyJhbGciOiJub25lIn0.{RFC7515_PAYLOAD}.");
    assert_eq!(v.verify(&token).unwrap_err(), TokenRejection::Malformed);
    // With any signature bytes, `none` matches no key.
    assert_eq!(
        v.verify(&format!("{token}c2ln")).unwrap_err(),
        TokenRejection::AlgorithmMismatch
    );
}

#[test]
fn rfc8037_a4_ed25519() {
    let jwk = r#"{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
    let v = TokenVerifier::builder()
        .issuer("joe")
        .audience(AUD)
        .key(VerifyingKey::from_jwk(jwk).unwrap())
        .build()
        .unwrap();
    let input = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
    let sig =
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
    let token = format!("{input}.{sig}");
    // The payload is the text "Example of Ed25519 signing", not a claims set: the
    // signature verifies, then the claims parser refuses it.
    assert_eq!(v.verify(&token).unwrap_err(), TokenRejection::Malformed);
    assert_eq!(
        v.verify(&tamper(&token)).unwrap_err(),
        TokenRejection::BadSignature
    );
    // Ed25519 is deterministic: our signer reproduces the published signature.
    let d = URL_SAFE_NO_PAD
        .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
        .unwrap();
    let mut pkcs8 = hex_prefix();
    pkcs8.extend_from_slice(&d);
    let ours = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_ed_der(&pkcs8),
        jsonwebtoken::Algorithm::EdDSA,
    )
    .unwrap();
    assert_eq!(ours, sig);
}

/// PKCS#8 wrapping of a raw Ed25519 private key (RFC 8410): the fixed 16-byte prefix.
fn hex_prefix() -> Vec<u8> {
    vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ]
}

// ---- the bad-input list ----------------------------------------------------------

#[test]
fn alg_none_is_refused_in_every_form() {
    let v = hs_verifier();
    let claims = good_claims().to_string();
    for header in [
        r#"{"alg":"none","kid":"hs-1"}"#,
        r#"{"alg":"none"}"#,
        r#"{"alg":"None","kid":"hs-1"}"#,
        r#"{"alg":"NONE"}"#,
        r#"{"alg":""}"#,
    ] {
        let t = format!("{}.{}.c2ln", b64(header.as_bytes()), b64(claims.as_bytes()));
        assert_eq!(
            v.verify(&t).unwrap_err(),
            TokenRejection::AlgorithmMismatch,
            "{header}"
        );
        let unsigned = format!("{}.{}.", b64(header.as_bytes()), b64(claims.as_bytes()));
        assert_eq!(v.verify(&unsigned).unwrap_err(), TokenRejection::Malformed);
    }
}

#[test]
fn hmac_signed_with_a_public_key_is_refused() {
    let claims = good_claims().to_string();
    for (pem, alg, kid) in [
        (RSA_PUB, Algorithm::RS256, "rsa"),
        (EC_PUB, Algorithm::ES256, "ec"),
        (ED_PUB, Algorithm::EdDSA, "ed"),
    ] {
        // Single key (no kid needed) and by kid: both refuse.
        let single = builder()
            .key(VerifyingKey::from_pem(alg, pem).unwrap())
            .build()
            .unwrap();
        let by_kid = builder()
            .key(VerifyingKey::from_pem(alg, pem).unwrap().kid(kid))
            .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
            .build()
            .unwrap();
        let forged_key = EncodingKey::from_secret(pem);
        let hs = jsonwebtoken::Algorithm::HS256;
        let t = sign(r#"{"alg":"HS256"}"#, &claims, &forged_key, hs);
        assert_eq!(
            single.verify(&t).unwrap_err(),
            TokenRejection::AlgorithmMismatch
        );
        let t = sign(
            &format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
            &claims,
            &forged_key,
            hs,
        );
        assert_eq!(
            by_kid.verify(&t).unwrap_err(),
            TokenRejection::AlgorithmMismatch
        );
        // Nor can an HS256 key be made from a public key in the first place.
        assert!(VerifyingKey::from_pem(Algorithm::HS256, pem).is_err());
    }
    // A JWK of an asymmetric key cannot claim HS256; an `oct` key cannot claim RS256.
    let ec = r#"{"kty":"EC","crv":"P-256","alg":"HS256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}"#;
    assert!(VerifyingKey::from_jwk(ec).is_err());
    let oct = format!(r#"{{"kty":"oct","alg":"RS256","k":"{}"}}"#, b64(&SECRET));
    assert!(VerifyingKey::from_jwk(&oct).is_err());
}

#[test]
fn kid_rules() {
    let v = multi_verifier();
    let claims = good_claims().to_string();
    assert_eq!(
        v.verify(&hs(r#"{"alg":"HS256","kid":"nope"}"#, &claims))
            .unwrap_err(),
        TokenRejection::UnknownKey
    );
    assert_eq!(
        v.verify(&hs(r#"{"alg":"HS256"}"#, &claims)).unwrap_err(),
        TokenRejection::UnknownKey
    );
    // A single-key set accepts a token without kid.
    assert!(
        hs_verifier()
            .verify(&hs(r#"{"alg":"HS256"}"#, &claims))
            .is_ok()
    );
    // The right kid with the wrong key family's alg.
    assert_eq!(
        v.verify(&hs(r#"{"alg":"HS256","kid":"ec-1"}"#, &claims))
            .unwrap_err(),
        TokenRejection::AlgorithmMismatch
    );
}

#[test]
fn claim_checks() {
    let v = builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
        .allowed_subjects(["scheduler", "coordinator"])
        .build()
        .unwrap();
    let now = unix_now();
    let g = good_claims;
    use TokenRejection as R;
    let cases: Vec<(String, R)> = vec![
        (
            with(g(), |c| {
                c.insert("exp".into(), json!(now - 31));
                c.insert("iat".into(), json!(now - 600));
            }),
            R::Expired,
        ),
        (
            with(g(), |c| {
                c.insert("exp".into(), json!(now + 3600));
                c.insert("iat".into(), json!(now - 1));
            }),
            R::LifetimeTooLong,
        ),
        (
            with(g(), |c| {
                c.insert("iat".into(), json!(now + 120));
                c.insert("exp".into(), json!(now + 600));
            }),
            R::IssuedInFuture,
        ),
        (
            with(g(), |c| {
                c.insert("nbf".into(), json!(now + 120));
            }),
            R::NotYetValid,
        ),
        (
            with(g(), |c| {
                c.insert("aud".into(), json!("other-api"));
            }),
            R::WrongAudience,
        ),
        (
            with(g(), |c| {
                c.insert("aud".into(), json!(["other-api", "third"]));
            }),
            R::WrongAudience,
        ),
        (
            with(g(), |c| {
                c.insert("aud".into(), json!([]));
            }),
            R::WrongAudience,
        ),
        (
            with(g(), |c| {
                c.insert("iss".into(), json!("https://evil.example"));
            }),
            R::WrongIssuer,
        ),
        (
            with(g(), |c| {
                c.insert("iss".into(), json!([ISS]));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("sub".into(), json!("intruder"));
            }),
            R::SubjectNotAllowed,
        ),
        (
            with(g(), |c| {
                c.remove("sub");
            }),
            R::MissingClaim,
        ),
        (
            with(g(), |c| {
                c.remove("aud");
            }),
            R::MissingClaim,
        ),
        (
            with(g(), |c| {
                c.remove("iss");
            }),
            R::MissingClaim,
        ),
        (
            with(g(), |c| {
                c.remove("exp");
            }),
            R::MissingClaim,
        ),
        (
            with(g(), |c| {
                c.remove("iat");
            }),
            R::MissingClaim,
        ),
        (
            with(g(), |c| {
                c.insert("exp".into(), json!((now + 600).to_string()));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("exp".into(), json!((now + 600) as f64));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("iat".into(), json!(now as f64 + 0.5));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("nbf".into(), json!(now.to_string()));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("exp".into(), json!(now - 10));
                c.insert("iat".into(), json!(now));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("scope".into(), json!("ok bad\"scope"));
            }),
            R::InvalidClaims,
        ),
        (
            with(g(), |c| {
                c.insert("scp".into(), json!(["a"]));
            }),
            R::InvalidClaims,
        ),
        (
            format!(
                r#"{{"iss":"{ISS}","sub":"scheduler","sub":"admin","aud":"{AUD}","iat":{now},"exp":{}}}"#,
                now + 60
            ),
            R::Malformed,
        ),
    ];
    for (claims, want) in cases {
        assert_eq!(v.verify(&hs_claims(&claims)).unwrap_err(), want, "{claims}");
    }
    // Within the leeway: just expired, `iat` slightly ahead, `nbf` slightly ahead.
    for claims in [
        with(g(), |c| {
            c.insert("exp".into(), json!(now - 20));
            c.insert("iat".into(), json!(now - 600));
        }),
        with(g(), |c| {
            c.insert("iat".into(), json!(now + 20));
        }),
        with(g(), |c| {
            c.insert("nbf".into(), json!(now + 20));
        }),
        with(g(), |c| {
            c.insert("aud".into(), json!(["x", AUD]));
            c.remove("scope");
            c.insert("scp".into(), json!(["a:b"]));
        }),
    ] {
        assert!(v.verify(&hs_claims(&claims)).is_ok(), "{claims}");
    }
}

#[test]
fn header_checks() {
    let typed = builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid("hs-1"))
        .required_type("at+jwt")
        .build()
        .unwrap();
    let claims = good_claims().to_string();
    assert!(
        typed
            .verify(&hs(r#"{"alg":"HS256","typ":"at+jwt"}"#, &claims))
            .is_ok()
    );
    assert!(
        typed
            .verify(&hs(
                r#"{"alg":"HS256","typ":"application/AT+JWT"}"#,
                &claims
            ))
            .is_ok()
    );
    assert_eq!(
        typed
            .verify(&hs(r#"{"alg":"HS256","typ":"JWT"}"#, &claims))
            .unwrap_err(),
        TokenRejection::WrongType
    );
    assert_eq!(
        typed
            .verify(&hs(r#"{"alg":"HS256"}"#, &claims))
            .unwrap_err(),
        TokenRejection::WrongType
    );
    let v = hs_verifier();
    assert_eq!(
        v.verify(&hs(r#"{"alg":"HS256","crit":["exp"],"exp":1}"#, &claims))
            .unwrap_err(),
        TokenRejection::UnsupportedHeader
    );
    assert_eq!(
        v.verify(&hs(r#"{"alg":"HS256","alg":"HS256"}"#, &claims))
            .unwrap_err(),
        TokenRejection::Malformed
    );
    // An embedded `jwk` / `jku` is never used to verify.
    let (_, other) = ("", EncodingKey::from_secret(&[1u8; 32]));
    let t = sign(
        r#"{"alg":"HS256","jku":"https://evil.example/jwks","jwk":{"kty":"oct","k":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}}"#,
        &claims,
        &other,
        jsonwebtoken::Algorithm::HS256,
    );
    assert_eq!(v.verify(&t).unwrap_err(), TokenRejection::BadSignature);
}

#[test]
fn shape_and_size() {
    let v = hs_verifier();
    let good = hs_claims(&good_claims().to_string());
    assert!(v.verify(&good).is_ok());
    for t in [
        "".to_owned(),
        "...".to_owned(),
        "a.b".to_owned(),
        "%%%.###.$$$".to_owned(),
        format!("{good}.{}", good.rsplit('.').next().unwrap()),
        good.replacen('.', "..", 1),
        format!("Bearer {good}"),
        format!("{}+", &good[..good.len() - 1]),
        format!("{}=", good),
    ] {
        let r = v.verify(&t).unwrap_err();
        assert!(
            matches!(r, TokenRejection::Malformed | TokenRejection::BadSignature),
            "{t}: {r:?}"
        );
    }
    let huge = "a".repeat(1 << 20);
    assert_eq!(v.verify(&huge).unwrap_err(), TokenRejection::TooLarge);
    let big = format!("{good}{}", "A".repeat(8 * 1024));
    assert_eq!(v.verify(&big).unwrap_err(), TokenRejection::TooLarge);
}

#[test]
fn bound_issuer() {
    let v = builder()
        .issuer("https://other.example")
        .key(
            VerifyingKey::hs256(&SECRET)
                .unwrap()
                .kid("hs-1")
                .issuer(ISS),
        )
        .build()
        .unwrap();
    assert!(v.verify(&hs_claims(&good_claims().to_string())).is_ok());
    let other = with(good_claims(), |c| {
        c.insert("iss".into(), json!("https://other.example"));
    });
    assert_eq!(
        v.verify(&hs_claims(&other)).unwrap_err(),
        TokenRejection::WrongIssuer
    );
    // A key bound to an issuer the verifier does not accept is a configuration error.
    assert!(
        builder()
            .key(
                VerifyingKey::hs256(&SECRET)
                    .unwrap()
                    .issuer("https://nobody.example")
            )
            .build()
            .is_err()
    );
}

#[test]
fn configuration_errors() {
    let key = || VerifyingKey::hs256(&SECRET).unwrap();
    assert!(
        TokenVerifier::builder()
            .audience(AUD)
            .key(key())
            .build()
            .is_err()
    );
    assert!(
        TokenVerifier::builder()
            .issuer(ISS)
            .key(key())
            .build()
            .is_err()
    );
    assert!(builder().build().is_err());
    assert!(
        builder()
            .key(key())
            .max_lifetime(Duration::ZERO)
            .build()
            .is_err()
    );
    assert!(
        builder()
            .key(key())
            .leeway(Duration::from_secs(3600))
            .build()
            .is_err()
    );
    assert!(builder().key(key()).max_token_len(10).build().is_err());
    assert!(
        builder()
            .key(key())
            .allowed_subjects(Vec::<String>::new())
            .build()
            .is_err()
    );
    assert!(
        builder()
            .key(key().kid("a"))
            .key(key().kid("a"))
            .build()
            .is_err()
    );
    assert!(builder().key(key()).key(key().kid("b")).build().is_err());
    assert!(VerifyingKey::hs256(&[0u8; 31]).is_err());
    assert!(SigningKey::from_pem(Algorithm::ES256, RSA_PUB).is_err());
    assert!(VerifyingKey::from_pem(Algorithm::ES256, RSA_PUB).is_err());
}

#[test]
fn jwk_rules() {
    let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    assert!(
        VerifyingKey::from_jwk(&format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}"}}"#)).is_ok()
    );
    for bad in [
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}","use":"enc"}}"#),
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}","key_ops":["encrypt"]}}"#),
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}","d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}}"#),
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}","alg":"ES256"}}"#),
        r#"{"kty":"RSA","e":"AQAB","n":"ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx"}"#.to_owned(),
        format!(r#"{{"kty":"oct","alg":"HS256","k":"{}"}}"#, b64(&[1u8; 16])),
        r#"{"kty":"oct","k":"AQ"}"#.to_owned(),
        "[]".to_owned(),
        "{".to_owned(),
    ] {
        assert!(VerifyingKey::from_jwk(&bad).is_err(), "{bad}");
    }
    assert!(
        VerifyingKey::from_jwk(&format!(
            r#"{{"kty":"OKP","crv":"Ed25519","x":"{x}","key_ops":["verify"],"use":"sig"}}"#
        ))
        .is_ok()
    );
    let set = KeySet::from_jwks(JWKS).unwrap();
    assert_eq!(set.len(), 3);
    // A JWKS with two keys and one without kid.
    let two = format!(
        r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}"}},{{"kty":"OKP","crv":"Ed25519","x":"{x}","kid":"b"}}]}}"#
    );
    assert!(KeySet::from_jwks(&two).is_err());
    assert!(KeySet::from_jwks(r#"{"keys":[]}"#).is_err());
}

#[test]
fn cache_serves_repeats_and_empties_on_key_change() {
    let v = hs_verifier();
    let t = hs_claims(&good_claims().to_string());
    assert_eq!(v.cached_tokens(), 0);
    let first = v.verify_token(&t).unwrap();
    assert_eq!(v.cached_tokens(), 1);
    let second = v.verify_token(&t).unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&first, &second),
        "the second verification is the cached one"
    );
    // A different token is a different entry.
    v.verify(&hs_claims(&with(good_claims(), |c| {
        c.insert("jti".into(), json!("j-2"));
    })))
    .unwrap();
    assert_eq!(v.cached_tokens(), 2);
    // Rotate to another key: the cache is emptied and the old token no longer passes,
    // although it was cached a moment ago.
    v.replace_keys([VerifyingKey::hs256(&[9u8; 32]).unwrap().kid("hs-2")])
        .unwrap();
    assert_eq!(v.cached_tokens(), 0);
    assert_eq!(v.verify(&t).unwrap_err(), TokenRejection::UnknownKey);
    assert_eq!(v.key_generation(), 1);
    // A refused replacement keeps the keys in force.
    assert!(v.replace_keys(Vec::new()).is_err());
    assert_eq!(v.key_count(), 1);
}

#[test]
fn cache_is_bounded_and_ends_at_exp() {
    let v = builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap())
        .cache_capacity(32)
        .build()
        .unwrap();
    for i in 0..500 {
        let c = with(good_claims(), |c| {
            c.insert("jti".into(), json!(format!("j-{i}")));
        });
        v.verify(&hs(r#"{"alg":"HS256"}"#, &c)).unwrap();
    }
    assert!(v.cached_tokens() <= 32, "{}", v.cached_tokens());
    assert!(v.cached_tokens() >= 16);

    // exp one second away, no leeway: cached now, refused (not served from the
    // cache) in the second equal to exp.
    let v = builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap())
        .leeway(Duration::ZERO)
        .build()
        .unwrap();
    let now = unix_now();
    let t = hs(
        r#"{"alg":"HS256"}"#,
        &with(good_claims(), |c| {
            c.insert("exp".into(), json!(now + 1));
        }),
    );
    v.verify_token_at(&t, now).unwrap();
    assert_eq!(v.cached_tokens(), 1);
    assert_eq!(
        v.verify_token_at(&t, now + 1).unwrap_err(),
        TokenRejection::Expired
    );
    assert_eq!(v.cached_tokens(), 0);

    let off = builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap())
        .cache_capacity(0)
        .build()
        .unwrap();
    off.verify(&hs(r#"{"alg":"HS256"}"#, &good_claims().to_string()))
        .unwrap();
    assert_eq!(off.cached_tokens(), 0);
}

#[test]
fn key_file_reload_keeps_old_set_on_error() {
    let dir = std::env::temp_dir().join(format!("portcullis-jwt-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("jwks.json");
    std::fs::write(&path, JWKS).unwrap();
    let v = builder().key_file(KeyFile::jwks(&path)).build().unwrap();
    assert_eq!(v.key_count(), 3);
    std::fs::write(&path, "{ broken").unwrap();
    assert!(v.reload().is_err());
    assert_eq!(v.key_count(), 3);
    let rotated = include_str!("../../tests/data/jwt/jwks-rotated.json");
    std::fs::write(&path, rotated).unwrap();
    v.reload().unwrap();
    assert_eq!(v.key_count(), 1);
    // A token from the rotated-in key passes.
    let t = sign(
        r#"{"alg":"ES256","kid":"ec-2"}"#,
        &good_claims().to_string(),
        &EncodingKey::from_ec_pem(EC2_KEY).unwrap(),
        jsonwebtoken::Algorithm::ES256,
    );
    assert!(v.verify(&t).is_ok());
    // PEM files.
    let pem = dir.join("ec.pub.pem");
    std::fs::write(&pem, EC_PUB).unwrap();
    let v = builder()
        .key_file(KeyFile::pem(&pem, Algorithm::ES256).kid("ec-1"))
        .build()
        .unwrap();
    let t = sign(
        r#"{"alg":"ES256","kid":"ec-1"}"#,
        &good_claims().to_string(),
        &EncodingKey::from_ec_pem(EC_KEY).unwrap(),
        jsonwebtoken::Algorithm::ES256,
    );
    assert!(v.verify(&t).is_ok());
    // A missing file at build time is a configuration error.
    assert!(
        builder()
            .key_file(KeyFile::jwks(dir.join("missing.json")))
            .build()
            .is_err()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debug_output_has_no_key_material() {
    let secret = [0xabu8; 32];
    let v = builder()
        .key(VerifyingKey::hs256(&secret).unwrap().kid("k"))
        .build()
        .unwrap();
    let s = SigningKey::hs256(&secret).unwrap().kid("k");
    let issuer = TokenIssuer::builder(s.clone())
        .issuer(ISS)
        .subject("a")
        .audience(AUD)
        .build()
        .unwrap();
    let minted = issuer.mint().unwrap();
    for text in [
        format!("{v:?}"),
        format!("{s:?}"),
        format!("{issuer:?}"),
        format!("{minted:?}"),
    ] {
        assert!(!text.contains("171"), "{text}");
        assert!(
            !text.contains("ab, ab") && !text.contains("AB, AB"),
            "{text}"
        );
        assert!(!text.contains(minted.as_str()), "{text}");
        assert!(!text.contains(&minted.as_str()[..20]), "{text}");
    }
    assert!(minted.bearer_header().is_sensitive());
}

#[test]
fn issuer_lifetime_bounds() {
    let b = || {
        TokenIssuer::builder(SigningKey::hs256(&SECRET).unwrap())
            .issuer(ISS)
            .subject("s")
            .audience(AUD)
    };
    assert!(b().lifetime(Duration::from_secs(59)).build().is_err());
    assert!(b().lifetime(Duration::from_secs(60)).build().is_ok());
    assert!(b().lifetime(Duration::from_secs(3600)).build().is_ok());
    assert!(b().lifetime(Duration::from_secs(3601)).build().is_err());
    // Never beyond a day, the longest maximum a verifier accepts, whatever the
    // issuer's own maximum: no `exp` arithmetic can overflow.
    for lifetime in [86_401, u64::MAX] {
        assert!(
            b().max_lifetime(Duration::MAX)
                .lifetime(Duration::from_secs(lifetime))
                .build()
                .is_err()
        );
    }
    assert!(
        b().max_lifetime(Duration::MAX)
            .lifetime(Duration::from_secs(86_400))
            .build()
            .is_ok()
    );
    assert!(
        b().max_lifetime(Duration::from_secs(7200))
            .lifetime(Duration::from_secs(3601))
            .build()
            .is_ok()
    );
    assert!(b().scope("bad scope\"").build().is_err());
    assert!(
        TokenIssuer::builder(SigningKey::hs256(&SECRET).unwrap())
            .issuer(ISS)
            .audience(AUD)
            .build()
            .is_err()
    );
    let i = b().lifetime(Duration::from_secs(120)).build().unwrap();
    let m = i.mint().unwrap();
    let lifetime = m.expires_at().duration_since(m.issued_at()).unwrap();
    assert_eq!(lifetime, Duration::from_secs(120));
}

#[test]
fn self_test_passes_with_the_configured_backend() {
    super::verify::crypto_self_test().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_strings_never_verify(s in ".{0,600}") {
        let v = hs_verifier();
        prop_assert!(v.verify(&s).is_err());
        let _ = parse_compact(&s, 8192);
    }

    #[test]
    fn arbitrary_three_part_tokens_never_verify(h in "[A-Za-z0-9_-]{1,80}", p in "[A-Za-z0-9_-]{1,200}", s in "[A-Za-z0-9_-]{1,90}") {
        let v = multi_verifier();
        let token = format!("{h}.{p}.{s}");
        prop_assert!(v.verify(&token).is_err());
    }

    #[test]
    fn any_single_character_change_is_refused(pos in 0usize..10_000, c in "[A-Za-z0-9_.-]") {
        let v = hs_verifier();
        let t = hs_claims(&good_claims().to_string());
        let i = pos % t.len();
        let mut b = t.clone().into_bytes();
        let c = c.as_bytes()[0];
        prop_assume!(b[i] != c);
        b[i] = c;
        let changed = String::from_utf8(b).unwrap();
        // Base64url's last character can carry unused bits; the canonical check
        // refuses those, so every change is refused.
        prop_assert!(v.verify(&changed).is_err(), "{changed}");
    }

    #[test]
    fn minted_claims_round_trip(sub in "[a-z][a-z0-9-]{0,30}", scopes in proptest::collection::vec("[a-z]{1,8}(:[a-z]{1,8})?", 0..6)) {
        let v = hs_verifier();
        let mut b = TokenIssuer::builder(SigningKey::hs256(&SECRET).unwrap().kid("hs-1"))
            .issuer(ISS).subject(sub.clone()).audience(AUD);
        for s in &scopes {
            b = b.scope(s.clone());
        }
        let t = b.build().unwrap().mint().unwrap();
        let p = v.verify(t.as_str()).unwrap();
        prop_assert_eq!(p.id(), sub.as_str());
        let mut want = scopes.clone();
        want.sort();
        want.dedup();
        prop_assert_eq!(p.scopes().iter().collect::<Vec<_>>(), want);
    }

    #[test]
    fn claims_parser_total(json in "\\{(\"[a-z]{1,4}\":(-?[0-9]{1,12}(\\.[0-9])?|\"[a-z ]{0,8}\"|\\[\\]|true|null),?){0,6}\\}") {
        // Never panics; a numeric date is accepted exactly when it is an integer.
        if let Ok(c) = parse_claims(json.as_bytes()) {
            for d in [c.exp, c.iat, c.nbf].into_iter().flatten() {
                prop_assert!(json.contains(&d.to_string()));
            }
        }
    }
}

#[test]
fn doc_parse_compact_splits_and_reads_the_header() {
    // {"alg":"HS256","kid":"k1"} . {} . sig
    let t = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.e30.c2ln";
    let p = parse_compact(t, 8192).unwrap();
    assert_eq!(p.header.alg, "HS256");
    assert_eq!(p.header.kid.as_deref(), Some("k1"));
    assert_eq!(
        parse_compact("a.b.c.d", 8192).unwrap_err(),
        TokenRejection::Malformed
    );
    assert_eq!(parse_compact(t, 10).unwrap_err(), TokenRejection::TooLarge);
}

#[test]
fn doc_looks_like_jwt_by_shape() {
    assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.e30.c2ln"));
    assert!(!looks_like_jwt("pc_live_3Zb1sT8qNw0aX4vE7kR2mY9cH5fJ6dL1"));
}

#[test]
fn doc_parse_claims_reads_the_registered_claims() {
    let c = parse_claims(br#"{"sub":"svc","exp":1700000000,"scp":["a","b"]}"#).unwrap();
    assert_eq!(c.exp, Some(1700000000));
    assert_eq!(c.scopes.unwrap(), ["a", "b"]);
    assert_eq!(
        parse_claims(br#"{"exp":1.7e9}"#).unwrap_err(),
        TokenRejection::InvalidClaims
    );
    assert_eq!(
        parse_claims(br#"{"sub":"a","sub":"b"}"#).unwrap_err(),
        TokenRejection::Malformed
    );
}

/// A key whose material is unusable or weak is a configuration error wherever it
/// comes from (PEM, JWK, a key file on reload), never a key that verifies forgeries,
/// nothing, or panics.
mod key_material {
    use super::*;

    fn okp(x: &[u8]) -> String {
        format!(r#"{{"kty":"OKP","crv":"Ed25519","x":"{}"}}"#, b64(x))
    }

    fn rsa_jwk(n: &[u8], e: &[u8]) -> String {
        format!(
            r#"{{"kty":"RSA","alg":"RS256","n":"{}","e":"{}"}}"#,
            b64(n),
            b64(e)
        )
    }

    /// A DER `RSAPublicKey` of `n` and `e` (magnitudes without leading zeros).
    fn rsa_der(n: &[u8], e: &[u8]) -> Vec<u8> {
        fn element(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut out = vec![tag];
            match content.len() {
                l @ 0..=0x7f => out.push(l as u8),
                l @ 0x80..=0xff => out.extend([0x81, l as u8]),
                l => out.extend([0x82, (l >> 8) as u8, l as u8]),
            }
            out.extend_from_slice(content);
            out
        }
        let int = |m: &[u8]| {
            let mut c = Vec::new();
            if m.first().is_some_and(|b| b & 0x80 != 0) {
                c.push(0);
            }
            c.extend_from_slice(m);
            element(0x02, &c)
        };
        element(0x30, &[int(n), int(e)].concat())
    }

    /// A token naming the algorithm `alg`, with `sig` as its signature bytes.
    fn token(alg: &str, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(format!(r#"{{"alg":"{alg}"}}"#).as_bytes()),
            b64(good_claims().to_string().as_bytes()),
            b64(sig)
        )
    }

    /// With the neutral point as the public key, `R` = the neutral point and
    /// `s = 0` is a valid Ed25519 signature of every message.
    #[test]
    fn small_order_ed25519_keys_are_refused() {
        let mut neutral = [0u8; 32];
        neutral[0] = 1;
        for x in super::super::keys::tests_support::small_order_encodings() {
            let e = VerifyingKey::from_jwk(&okp(&x)).unwrap_err().to_string();
            assert!(e.contains("small order"), "{e}");
        }
        // The forgery such a key would let through.
        let forged = token("EdDSA", &[&neutral[..], &[0u8; 32]].concat());
        let v = multi_verifier();
        assert_eq!(v.verify(&forged).unwrap_err(), TokenRejection::UnknownKey);
        // Non-canonical encodings (y >= p) are refused too.
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert!(VerifyingKey::from_jwk(&okp(&p)).is_err());
    }

    #[test]
    fn unusable_keys_are_refused_at_load() {
        // Ed25519 keys of another length (a shorter one used to panic in every
        // verification).
        for len in [0, 1, 16, 31, 33, 57, 64] {
            assert!(
                VerifyingKey::from_jwk(&okp(&vec![7u8; len])).is_err(),
                "{len}"
            );
        }
        // EC points off the curve, or of the other curve's size.
        for (crv, len) in [("P-256", 32), ("P-256", 48), ("P-384", 48), ("P-384", 32)] {
            let c = b64(&vec![3u8; len]);
            let jwk = format!(r#"{{"kty":"EC","crv":"{crv}","x":"{c}","y":"{c}"}}"#);
            assert!(VerifyingKey::from_jwk(&jwk).is_err(), "{crv} {len}");
        }
        // An RSA private key in PEM form is not a verifying key.
        assert!(VerifyingKey::from_pem(Algorithm::RS256, RSA_KEY).is_err());
        assert!(VerifyingKey::from_pem(Algorithm::RS256, RSA_PUB).is_ok());
        // RSA moduli below 2048 bits (RFC 7518 §3.3) or beyond what verifies.
        let mut n = vec![0xc5u8; 256];
        n[255] |= 1;
        assert!(VerifyingKey::from_jwk(&rsa_jwk(&n, &[1, 0, 1])).is_ok());
        let mut even = n.clone();
        even[255] &= 0xfe;
        let mut huge = vec![0xc5u8; 513];
        huge[512] |= 1;
        for bad_n in [&n[1..], &even, &huge] {
            assert!(VerifyingKey::from_jwk(&rsa_jwk(bad_n, &[1, 0, 1])).is_err());
        }
        for bad_e in [&[][..], &[1], &[2], &[1, 0, 0], &[2, 0, 0, 0, 1]] {
            assert!(
                VerifyingKey::from_jwk(&rsa_jwk(&n, bad_e)).is_err(),
                "{bad_e:?}"
            );
        }
    }

    #[test]
    fn a_key_file_with_a_weak_key_keeps_the_keys_in_force() {
        let dir = std::env::temp_dir().join(format!("portcullis-jwt-weak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jwks.json");
        std::fs::write(&path, JWKS).unwrap();
        let v = builder().key_file(KeyFile::jwks(&path)).build().unwrap();
        let weak = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"ed-2","x":"{}"}}]}}"#,
            b64(&[0u8; 32])
        );
        std::fs::write(&path, &weak).unwrap();
        let e = v.reload().unwrap_err().to_string();
        assert!(
            e.contains("small order") && !e.contains(&b64(&[0u8; 32])),
            "{e}"
        );
        assert_eq!(v.key_count(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest! {
        /// Whatever the bytes of an OKP or EC key, a key that loads verifies
        /// without panicking, and refuses a signature that is not its own.
        #[test]
        fn loaded_keys_never_panic_nor_pass_garbage(
            x in proptest::collection::vec(any::<u8>(), 0..70),
            y in proptest::collection::vec(any::<u8>(), 0..70),
            kind in 0u8..3,
            sig in proptest::collection::vec(any::<u8>(), 1..100),
        ) {
            let (jwk, alg) = match kind {
                0 => (okp(&x), "EdDSA"),
                1 => (format!(r#"{{"kty":"EC","crv":"P-256","x":"{}","y":"{}"}}"#, b64(&x), b64(&y)), "ES256"),
                _ => (format!(r#"{{"kty":"EC","crv":"P-384","x":"{}","y":"{}"}}"#, b64(&x), b64(&y)), "ES384"),
            };
            if let Ok(key) = VerifyingKey::from_jwk(&jwk) {
                let v = builder().key(key).build().unwrap();
                let r = std::panic::catch_unwind(|| v.verify(&token(alg, &sig)));
                prop_assert!(r.is_ok(), "{}", jwk);
                prop_assert!(r.unwrap().is_err());
            }
        }

        /// The RSA rules read the same from a JWK and from a DER public key, and
        /// accept exactly the odd moduli of 2048 to 4096 bits with an odd exponent
        /// from 3 to 2^33 - 1.
        #[test]
        fn rsa_rules_agree_across_forms(
            bytes in 200usize..560,
            top in any::<u8>(),
            fill in any::<u8>(),
            low in any::<u8>(),
            e in prop_oneof![Just(65537u64), Just(3), any::<u64>(), 0u64..8, (1u64 << 33) - 2..(1 << 33) + 2],
        ) {
            let mut n = vec![fill; bytes];
            n[0] = top;
            n[bytes - 1] = low;
            let n = &n[n.iter().take_while(|&&b| b == 0).count()..];
            let e_bytes = e.to_be_bytes();
            let e_bytes = &e_bytes[e_bytes.iter().take_while(|&&b| b == 0).count()..];
            let bits = n.first().map_or(0, |&b| n.len() * 8 - b.leading_zeros() as usize);
            let want = (2048..=4096).contains(&bits)
                && low & 1 == 1
                && (3..=(1u64 << 33) - 1).contains(&e)
                && e & 1 == 1;
            let jwk = VerifyingKey::from_jwk(&rsa_jwk(n, e_bytes)).is_ok();
            let der = jsonwebtoken::DecodingKey::from_rsa_der(&rsa_der(n, e_bytes));
            let der = super::super::keys::check_public_key(Algorithm::RS256, &der).is_ok();
            prop_assert_eq!(jwk, want, "bits {} e {}", bits, e);
            prop_assert_eq!(der, want, "bits {} e {}", bits, e);
        }
    }

    /// The list of small-order points agrees with the Ed25519 implementation the
    /// crate verifies with: each encoding (either sign bit) that decodes is weak,
    /// and a key that loads is never weak.
    #[cfg(feature = "signature")]
    mod against_dalek {
        use super::*;

        #[test]
        fn every_listed_encoding_is_weak() {
            let mut decoded = 0;
            for x in super::super::super::keys::tests_support::small_order_encodings() {
                if let Ok(k) = ed25519_dalek::VerifyingKey::from_bytes(&x) {
                    assert!(k.is_weak(), "{x:?}");
                    decoded += 1;
                }
            }
            // The eight points of small order, and "negative zero" `x` for two.
            assert!(decoded >= 8, "{decoded}");
        }

        proptest! {
            #[test]
            fn loaded_ed25519_keys_are_never_weak(x in any::<[u8; 32]>()) {
                if VerifyingKey::from_jwk(&okp(&x)).is_ok() {
                    let k = ed25519_dalek::VerifyingKey::from_bytes(&x);
                    prop_assert!(k.is_ok_and(|k| !k.is_weak()));
                }
            }
        }
    }
}

/// A `kid` in a refusal (it goes to the audit log) cannot forge a log line.
#[test]
fn a_kid_in_a_pin_refusal_is_escaped() {
    let kid = "k\n{\"event\":\"forged\"}\u{202e}";
    let v = builder()
        .key(VerifyingKey::hs256(&SECRET).unwrap().kid(kid))
        .build()
        .unwrap();
    let e = v
        .replace_keys([VerifyingKey::from_pem(Algorithm::RS256, RSA_PUB)
            .unwrap()
            .kid(kid)])
        .unwrap_err()
        .to_string();
    assert!(e.contains("was HS256 and would become RS256"), "{e}");
    assert!(!e.contains('\n') && !e.contains('\u{202e}'), "{e}");
}

/// A key file refused because its `kid`s clash with the keys given in code is
/// judged again once those keys are replaced: whatever the order of file writes,
/// replacements and polls, three polls after the last change the keys in force are
/// the file's current keys whenever they can be combined with the keys in code, and
/// a key the file no longer lists (nor the code) never verifies then.
mod refused_key_files {
    use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

    use super::*;

    const KIDS: [&str; 3] = ["k0", "k1", "k2"];

    /// The secret of `kid` in the file (`file`) or in code.
    fn secret(kid: usize, file: bool) -> [u8; 32] {
        [kid as u8 + if file { 10 } else { 50 }; 32]
    }

    fn keys_in_code(kids: &[usize]) -> Vec<VerifyingKey> {
        kids.iter()
            .map(|&k| VerifyingKey::hs256(&secret(k, false)).unwrap().kid(KIDS[k]))
            .collect()
    }

    fn jwks(kids: &[usize]) -> String {
        let keys: Vec<_> = kids
            .iter()
            .map(|&k| json!({"kty": "oct", "alg": "HS256", "kid": KIDS[k], "k": b64(&secret(k, true))}))
            .collect();
        json!({ "keys": keys }).to_string()
    }

    fn token(kid: usize, file: bool) -> String {
        sign(
            &json!({"alg": "HS256", "kid": KIDS[kid]}).to_string(),
            &good_claims().to_string(),
            &EncodingKey::from_secret(&secret(kid, file)),
            jsonwebtoken::Algorithm::HS256,
        )
    }

    /// A non-empty subset of the kids, from three bits.
    fn kids(bits: u8) -> Vec<usize> {
        let bits = if bits & 7 == 0 { 1 } else { bits & 7 };
        (0..3).filter(|k| bits >> k & 1 == 1).collect()
    }

    fn rename_in(path: &std::path::Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn the_current_file_is_in_force_once_it_combines_with_the_keys_in_code(
            ops in proptest::collection::vec((any::<bool>(), 0u8..8, 0u8..4), 1..10),
        ) {
            static RUN: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "portcullis-jwt-rejudge-{}-{}",
                std::process::id(),
                RUN.fetch_add(1, AtomicOrdering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("jwks.json");
            let mut file = vec![0];
            let mut code = vec![1];
            std::fs::write(&path, jwks(&file)).unwrap();
            let mut builder = TokenVerifier::builder()
                .key_file(KeyFile::jwks(&path))
                .allow_symmetric_keys_from_files()
                .issuer(ISS)
                .audience(AUD);
            for k in keys_in_code(&code) {
                builder = builder.key(k);
            }
            let v = builder.build().unwrap();
            for (write, set, polls) in ops {
                let set = kids(set);
                if write {
                    rename_in(&path, &jwks(&set));
                    file = set;
                } else if v.replace_keys(keys_in_code(&set)).is_ok() {
                    code = set;
                }
                for _ in 0..polls {
                    v.poll_key_files();
                }
            }
            for _ in 0..3 {
                v.poll_key_files();
            }
            if file.iter().any(|k| code.contains(k)) {
                return Ok(());
            }
            for k in 0..3 {
                let verified = v.verify(&token(k, true)).is_ok();
                prop_assert_eq!(verified, file.contains(&k), "kid {} of the file {:?}, code {:?}", k, file, code);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
