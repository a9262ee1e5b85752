//! Verification keys, each pinned to one algorithm, and the key set that selects one
//! by `kid`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use serde_json::Value;

use super::TokenRejection;
use super::parse::{decode_part, strict_value};
use crate::ConfigError;

/// JWK members that hold private key material (RFC 7518 §6.2.2, §6.3.2).
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "oth"];

/// Shortest HMAC secret accepted: 32 bytes, the output size of SHA-256 (RFC 7518 §3.2).
pub const MIN_HMAC_SECRET_LEN: usize = 32;

/// A signature algorithm a key is pinned to (RFC 7518 names).
///
/// `none` is not an algorithm here, and `HS256` keys are only ever made from a secret
/// (never from a PEM or an asymmetric JWK), so neither an unsigned token nor an HMAC
/// signed with a public key can select a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC with SHA-256, from a secret of at least 32 bytes.
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
    /// Ed25519 (RFC 8037).
    EdDSA,
}

impl Algorithm {
    /// The `alg` header value, e.g. `ES256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::HS256 => "HS256",
            Algorithm::RS256 => "RS256",
            Algorithm::RS384 => "RS384",
            Algorithm::RS512 => "RS512",
            Algorithm::PS256 => "PS256",
            Algorithm::PS384 => "PS384",
            Algorithm::PS512 => "PS512",
            Algorithm::ES256 => "ES256",
            Algorithm::ES384 => "ES384",
            Algorithm::EdDSA => "EdDSA",
        }
    }

    /// Parses an `alg` value (case-sensitive, as RFC 7515 §4.1.1 requires).
    ///
    /// ```
    /// use portcullis::jwt::Algorithm;
    /// assert_eq!(Algorithm::parse("ES256"), Some(Algorithm::ES256));
    /// assert_eq!(Algorithm::parse("none"), None);
    /// assert_eq!(Algorithm::parse("es256"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            _ => return None,
        })
    }

    pub(crate) fn to_jwt(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as A;
        match self {
            Algorithm::HS256 => A::HS256,
            Algorithm::RS256 => A::RS256,
            Algorithm::RS384 => A::RS384,
            Algorithm::RS512 => A::RS512,
            Algorithm::PS256 => A::PS256,
            Algorithm::PS384 => A::PS384,
            Algorithm::PS512 => A::PS512,
            Algorithm::ES256 => A::ES256,
            Algorithm::ES384 => A::ES384,
            Algorithm::EdDSA => A::EdDSA,
        }
    }

    fn is_rsa(self) -> bool {
        matches!(
            self,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        )
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key that verifies tokens signed with exactly one [`Algorithm`].
///
/// `Debug` shows the `kid`, the algorithm and the bound issuer, never key material.
///
/// ```
/// use portcullis::jwt::{Algorithm, VerifyingKey};
/// let k = VerifyingKey::hs256(&[7u8; 32])?.kid("hmac-2026").issuer("https://ci.example");
/// assert_eq!(k.algorithm(), Algorithm::HS256);
/// assert!(VerifyingKey::hs256(b"too short").is_err());
/// assert!(!format!("{k:?}").contains("7, 7"));
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct VerifyingKey {
    pub(crate) kid: Option<Arc<str>>,
    pub(crate) alg: Algorithm,
    pub(crate) issuer: Option<Arc<str>>,
    pub(crate) key: DecodingKey,
}

impl VerifyingKey {
    /// An HS256 key from a secret of at least 32 bytes.
    pub fn hs256(secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.len() < MIN_HMAC_SECRET_LEN {
            return Err(ConfigError::new(format!(
                "an HS256 secret must be at least {MIN_HMAC_SECRET_LEN} bytes"
            )));
        }
        Ok(Self::new(
            Algorithm::HS256,
            DecodingKey::from_secret(secret),
        ))
    }

    /// A public key in PEM form (`PUBLIC KEY` / SubjectPublicKeyInfo, or
    /// `RSA PUBLIC KEY`), pinned to `alg`, which must be an RSA, EC or EdDSA
    /// algorithm matching the key's type. The key material is checked as described
    /// under [`KeySet`]: a private key, an RSA modulus outside 2048 to 4096 bits, or
    /// a point that is not on the curve (or of small order, for Ed25519) is refused.
    ///
    /// ```
    /// use portcullis::jwt::{Algorithm, VerifyingKey};
    /// let pem = b"-----BEGIN PUBLIC KEY-----
    /// MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=
    /// -----END PUBLIC KEY-----";
    /// let k = VerifyingKey::from_pem(Algorithm::EdDSA, pem)?;
    /// assert!(VerifyingKey::from_pem(Algorithm::HS256, pem).is_err());
    /// # let _ = k;
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn from_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, ConfigError> {
        let bad = || ConfigError::new(format!("not a {alg} public key in PEM form"));
        let key = match alg {
            Algorithm::HS256 => {
                return Err(ConfigError::new(
                    "HS256 keys are secrets, not PEM public keys: use VerifyingKey::hs256",
                ));
            }
            a if a.is_rsa() => DecodingKey::from_rsa_pem(pem).map_err(|_| bad())?,
            Algorithm::ES256 | Algorithm::ES384 => {
                DecodingKey::from_ec_pem(pem).map_err(|_| bad())?
            }
            _ => DecodingKey::from_ed_pem(pem).map_err(|_| bad())?,
        };
        let expected = match alg {
            a if a.is_rsa() => jsonwebtoken::AlgorithmFamily::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => jsonwebtoken::AlgorithmFamily::Ec,
            _ => jsonwebtoken::AlgorithmFamily::Ed,
        };
        if key.family() != expected {
            return Err(bad());
        }
        Self::public(alg, key).map_err(|what| ConfigError::new(format!("{}: {what}", bad())))
    }

    /// One JWK (RFC 7517) as JSON, with no member name repeated in any object (which
    /// of two `use` members counts is parser-dependent). The key must name or imply
    /// exactly one algorithm
    /// (`alg`, or the curve of an `EC`/`OKP` key), its `use`, if present, must be
    /// `sig`, and its `key_ops`, if present, must include `verify`. A JWK carrying
    /// any private member (`d`, `p`, `q`, `dp`, `dq`, `qi`, `oth`, or `k` in a key
    /// that is not `oct`) is refused: verification needs the public half only.
    /// The key material is checked as described under [`KeySet`].
    /// Its `kid`, if any, becomes the key's.
    pub fn from_jwk(json: &str) -> Result<Self, ConfigError> {
        let value = strict_value(json.as_bytes()).ok_or_else(|| {
            ConfigError::new("the JWK is not valid JSON without duplicate members")
        })?;
        Self::from_jwk_value(value, 1)
    }

    fn from_jwk_value(value: Value, position: usize) -> Result<Self, ConfigError> {
        let err = |what: &str| ConfigError::new(format!("JWK {position}: {what}"));
        let obj = value.as_object().ok_or_else(|| err("not a JSON object"))?;
        if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
            return Err(err(&format!(
                "contains private key material (`{member}`); publish only the public key"
            )));
        }
        if obj.contains_key("k") && obj.get("kty").and_then(Value::as_str) != Some("oct") {
            return Err(err(
                "contains a symmetric secret (`k`) in a key that is not `oct`",
            ));
        }
        let jwk: Jwk =
            serde_json::from_value(value.clone()).map_err(|_| err("not a supported JWK"))?;
        let common = &jwk.common;
        match &common.public_key_use {
            None | Some(PublicKeyUse::Signature) => {}
            Some(_) => return Err(err("`use` is not `sig`")),
        }
        if let Some(ops) = &common.key_operations
            && !ops.iter().any(|o| matches!(o, KeyOperations::Verify))
        {
            return Err(err("`key_ops` does not include `verify`"));
        }
        let named = match common.key_algorithm {
            None => None,
            Some(a) => Some(
                jwk_alg(a).ok_or_else(|| err("`alg` is not a supported signature algorithm"))?,
            ),
        };
        let alg = match (&jwk.algorithm, named) {
            (AlgorithmParameters::RSA(_), Some(a)) if a.is_rsa() => a,
            (AlgorithmParameters::RSA(_), None) => {
                return Err(err("an RSA key needs `alg` to pin its algorithm"));
            }
            (AlgorithmParameters::EllipticCurve(p), a) => {
                let implied = match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Err(err("unsupported EC curve")),
                };
                if a.is_some_and(|a| a != implied) {
                    return Err(err("`alg` does not match the curve"));
                }
                implied
            }
            (AlgorithmParameters::OctetKeyPair(p), a) => {
                if p.curve != EllipticCurve::Ed25519 || a.is_some_and(|a| a != Algorithm::EdDSA) {
                    return Err(err("an OKP key must be Ed25519 with `alg` EdDSA"));
                }
                Algorithm::EdDSA
            }
            (AlgorithmParameters::OctetKey(p), Some(Algorithm::HS256)) => {
                let secret = decode_part(&p.value).map_err(|_| err("`k` is not base64url"))?;
                let mut key = VerifyingKey::hs256(&secret).map_err(|e| err(&e.to_string()))?;
                key.kid = common.key_id.as_deref().map(Into::into);
                return Ok(key);
            }
            (AlgorithmParameters::OctetKey(_), _) => {
                return Err(err("an `oct` key must have `alg` HS256"));
            }
            _ => return Err(err("`alg` does not match the key type")),
        };
        let key = DecodingKey::from_jwk(&jwk).map_err(|_| err("invalid key parameters"))?;
        let mut key = Self::public(alg, key).map_err(err)?;
        key.kid = common.key_id.as_deref().map(Into::into);
        Ok(key)
    }

    /// A public key, once its material passes [`check_public_key`].
    fn public(alg: Algorithm, key: DecodingKey) -> Result<Self, &'static str> {
        check_public_key(alg, &key)?;
        Ok(Self::new(alg, key))
    }

    fn new(alg: Algorithm, key: DecodingKey) -> Self {
        Self {
            kid: None,
            alg,
            issuer: None,
            key,
        }
    }

    /// Sets the key id that tokens name in their `kid` header.
    pub fn kid(mut self, kid: impl Into<Arc<str>>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// Binds the key to one issuer: a token it verifies must carry exactly this
    /// `iss` (which must also be one of the verifier's issuers).
    pub fn issuer(mut self, iss: impl Into<Arc<str>>) -> Self {
        self.issuer = Some(iss.into());
        self
    }

    /// The algorithm this key is pinned to.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The key id, if set.
    pub fn key_id(&self) -> Option<&str> {
        self.kid.as_deref()
    }
}

/// The RSA moduli accepted, in bits: RFC 7518 §3.3 requires at least 2048, and the
/// crypto backend verifies with moduli of at most 4096.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

/// The largest RSA public exponent the crypto backend verifies with.
const MAX_RSA_EXPONENT: u64 = (1 << 33) - 1;

/// The Ed25519 points of small order (the eight-torsion subgroup: order 1, 2, 4
/// and 8), as the `y` coordinate of their canonical encoding with the sign bit of
/// `x` cleared. A public key among them verifies forged signatures: with the
/// neutral point (`y = 1`), the signature `R` = the neutral point, `s = 0` passes
/// for every message, and a point of order 4 or 8 lets a forger succeed once in 4
/// or 8 tries, without the private key.
const ED25519_SMALL_ORDER: [[u8; 32]; 5] = [
    // y = 0: order 4.
    [0; 32],
    // y = 1: the neutral point, order 1.
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    // Order 8.
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    // Order 8.
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    // y = p - 1: order 2.
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Checks the material of an asymmetric key for `alg` before it can verify
/// anything; the error says what is wrong, never a value.
///
/// - RSA: a public key (`n` and `e` only: a PEM private key is refused), a modulus
///   of 2048 to 4096 bits, odd, and an odd exponent from 3 to 2^33 - 1.
/// - Ed25519: 32 bytes, the canonical encoding of a point that is not of small
///   order (see [`ED25519_SMALL_ORDER`]).
/// - Every key: the crypto backend loads it (an EC point must be on its curve, of
///   the curve's size), so a key that could verify nothing is refused at load
///   rather than failing, or panicking in, every verification.
pub(crate) fn check_public_key(alg: Algorithm, key: &DecodingKey) -> Result<(), &'static str> {
    use jsonwebtoken::DecodingKeyKind as Kind;
    if alg.is_rsa() {
        let (n, e) = match key.kind() {
            Kind::RsaModulusExponent { n, e } => (n.as_slice(), e.as_slice()),
            Kind::SecretOrDer(der) => rsa_public_der(der).ok_or("not an RSA public key")?,
        };
        return check_rsa(n, e);
    }
    if alg == Algorithm::EdDSA {
        let x = key.try_get_as_bytes().map_err(|_| "not an Ed25519 key")?;
        let x: &[u8; 32] = x
            .try_into()
            .map_err(|_| "an Ed25519 public key is 32 bytes")?;
        let mut y = *x;
        y[31] &= 0x7f;
        // y >= p = 2^255 - 19: not the canonical encoding of any point.
        if y[31] == 0x7f && y[1..31].iter().all(|&b| b == 0xff) && y[0] >= 0xed {
            return Err("the Ed25519 public key is not canonically encoded");
        }
        if ED25519_SMALL_ORDER.contains(&y) {
            return Err("the Ed25519 public key is a point of small order");
        }
    }
    // The backend parses the key before it decodes the signature: an error here is
    // the key's. ("AA" is one byte, no signature of any algorithm.)
    match jsonwebtoken::crypto::verify("AA", b"", key, alg.to_jwt()) {
        Ok(_) => Ok(()),
        Err(_) => Err("the key is not a valid point or key of its type"),
    }
}

fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), &'static str> {
    let n = strip_zeros(n);
    let bits = n
        .first()
        .map_or(0, |&b| n.len() * 8 - b.leading_zeros() as usize);
    if !RSA_BITS.contains(&bits) || n.last().is_some_and(|b| b & 1 == 0) {
        return Err("an RSA modulus must be odd and of 2048 to 4096 bits");
    }
    let e = strip_zeros(e);
    let e = match e.len() {
        1..=8 => e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        _ => 0,
    };
    if !(3..=MAX_RSA_EXPONENT).contains(&e) || e & 1 == 0 {
        return Err("an RSA public exponent must be odd, from 3 to 2^33 - 1");
    }
    Ok(())
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    &b[b.iter().take_while(|&&x| x == 0).count()..]
}

/// The modulus and exponent of a DER `RSAPublicKey` (RFC 8017 §A.1.1: a SEQUENCE
/// of exactly two non-negative INTEGERs, nothing after it), or `None`: a private
/// key (a SEQUENCE of nine INTEGERs) is not one.
fn rsa_public_der(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (seq, rest) = der_element(der, 0x30)?;
    let (n, seq) = der_element(seq, 0x02)?;
    let (e, seq) = der_element(seq, 0x02)?;
    if !rest.is_empty() || !seq.is_empty() {
        return None;
    }
    for int in [n, e] {
        // Non-negative and minimally encoded.
        match int {
            [] => return None,
            [b, ..] if b & 0x80 != 0 => return None,
            [0, b, ..] if b & 0x80 == 0 => return None,
            _ => {}
        }
    }
    Some((n, e))
}

/// One DER element with tag `tag`: its content and what follows it. Definite,
/// minimal lengths of up to two bytes (an RSA key of 4096 bits needs two).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&b, rest) = rest.split_first()?;
            (b >= 0x80).then_some((usize::from(b), rest))?
        }
        0x82 => {
            let (b, rest) = rest.split_at_checked(2)?;
            let len = usize::from(u16::from_be_bytes([b[0], b[1]]));
            (len >= 0x100).then_some((len, rest))?
        }
        _ => return None,
    };
    rest.split_at_checked(len)
}

fn jwk_alg(a: KeyAlgorithm) -> Option<Algorithm> {
    Some(match a {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// The keys a verifier accepts, by `kid`. Never empty.
///
/// A token names its key with `kid`; a token without `kid` is accepted only when the
/// set holds exactly one key. Several keys must each have a distinct `kid`. Lookup is
/// one hash-map probe.
///
/// Every public key's material is checked when it is loaded (from PEM, a JWK, a key
/// file or a fetched JWK Set), so a key that would verify forgeries, or nothing, is
/// a configuration error: an RSA key must be a public key (not a private key's
/// PEM) with a modulus of 2048 to 4096 bits (RFC 7518 §3.3); an EC point must lie
/// on the key's curve; an Ed25519 key must be 32 bytes, canonically encoded, and not
/// a point of small order (whose "signatures" anyone can forge).
///
/// ```
/// use portcullis::jwt::{KeySet, VerifyingKey};
/// let set = KeySet::new([
///     VerifyingKey::hs256(&[1u8; 32])?.kid("old"),
///     VerifyingKey::hs256(&[2u8; 32])?.kid("new"),
/// ])?;
/// assert_eq!(set.len(), 2);
/// // Two keys and one without a kid: refused.
/// assert!(KeySet::new([VerifyingKey::hs256(&[1u8; 32])?, VerifyingKey::hs256(&[2u8; 32])?.kid("b")]).is_err());
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct KeySet {
    by_kid: HashMap<Arc<str>, Arc<VerifyingKey>>,
    only: Option<Arc<VerifyingKey>>,
    len: usize,
}

impl KeySet {
    /// Builds a set; fails when it is empty, when a `kid` repeats, or when several
    /// keys are given and one has no `kid`.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Result<Self, ConfigError> {
        let keys: Vec<VerifyingKey> = keys.into_iter().collect();
        if keys.is_empty() {
            return Err(ConfigError::new("the key set is empty"));
        }
        let len = keys.len();
        let mut by_kid = HashMap::with_capacity(len);
        let mut only = None;
        for (i, key) in keys.into_iter().enumerate() {
            let key = Arc::new(key);
            match &key.kid {
                Some(kid) if by_kid.insert(kid.clone(), key.clone()).is_some() => {
                    return Err(ConfigError::new(format!(
                        "key {}: its kid is used by another key",
                        i + 1
                    )));
                }
                Some(_) => {}
                None if len > 1 => {
                    return Err(ConfigError::new(format!(
                        "key {}: every key needs a kid when the set holds several",
                        i + 1
                    )));
                }
                None => {}
            }
            if len == 1 {
                only = Some(key);
            }
        }
        Ok(Self { by_kid, only, len })
    }

    /// Parses a JWK Set (`{"keys": [...]}`) or a single JWK, with the rules of
    /// [`VerifyingKey::from_jwk`] for each key and of [`KeySet::new`] for the set.
    pub fn from_jwks(json: &str) -> Result<Self, ConfigError> {
        Self::new(keys_from_jwks(json)?)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a key set is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keys, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &VerifyingKey> {
        self.only
            .iter()
            .filter(|k| k.kid.is_none())
            .chain(self.by_kid.values())
            .map(|k| &**k)
    }

    /// The key a token header names, or why there is none.
    pub(crate) fn select(&self, kid: Option<&str>) -> Result<&Arc<VerifyingKey>, TokenRejection> {
        match kid {
            Some(kid) => self.by_kid.get(kid).ok_or(TokenRejection::UnknownKey),
            None => self.only.as_ref().ok_or(TokenRejection::UnknownKey),
        }
    }
}

pub(crate) fn keys_from_jwks(json: &str) -> Result<Vec<VerifyingKey>, ConfigError> {
    let value = strict_value(json.as_bytes()).ok_or_else(|| {
        ConfigError::new("the JWK Set is not valid JSON without duplicate members")
    })?;
    match value {
        Value::Object(mut obj) if obj.contains_key("keys") => {
            let Some(Value::Array(keys)) = obj.remove("keys") else {
                return Err(ConfigError::new("`keys` is not an array"));
            };
            keys.into_iter()
                .enumerate()
                .map(|(i, k)| VerifyingKey::from_jwk_value(k, i + 1))
                .collect()
        }
        other => Ok(vec![VerifyingKey::from_jwk_value(other, 1)?]),
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// Every listed small-order encoding with both values of the sign bit.
    pub(crate) fn small_order_encodings() -> Vec<[u8; 32]> {
        super::ED25519_SMALL_ORDER
            .iter()
            .flat_map(|y| {
                let mut negative = *y;
                negative[31] |= 0x80;
                [*y, negative]
            })
            .collect()
    }
}
