//! `TokenIssuer`: mints short-lived service tokens.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use super::keys::{Algorithm, MIN_HMAC_SECRET_LEN};
use super::time::{LONGEST_LIFETIME, in_window, secs_i64, to_system_time, unix_now};
use super::verify::{DEFAULT_MAX_LIFETIME, crypto_self_test};
use crate::{ConfigError, Scopes};

/// Shortest lifetime a minted token can have: one minute.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// Default lifetime of a minted token: 15 minutes.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// A private key (or HMAC secret) that signs tokens with one [`Algorithm`].
///
/// `Debug` shows the `kid` and algorithm only.
///
/// ```
/// use portcullis::jwt::SigningKey;
/// let key = SigningKey::hs256(&[9u8; 32])?.kid("hmac-2026");
/// assert!(!format!("{key:?}").contains("9, 9"));
/// assert!(SigningKey::hs256(&[9u8; 16]).is_err());
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct SigningKey {
    kid: Option<Arc<str>>,
    alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    /// An HS256 key from a secret of at least 32 bytes.
    pub fn hs256(secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.len() < MIN_HMAC_SECRET_LEN {
            return Err(ConfigError::new(format!(
                "an HS256 secret must be at least {MIN_HMAC_SECRET_LEN} bytes"
            )));
        }
        Ok(Self {
            kid: None,
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret),
        })
    }

    /// A private key in PEM form (PKCS#8, or PKCS#1 / SEC1 for RSA / EC) for an RSA,
    /// EC or EdDSA `alg`.
    pub fn from_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, ConfigError> {
        let bad = || ConfigError::new(format!("not a {alg} private key in PEM form"));
        let key = match alg {
            Algorithm::HS256 => {
                return Err(ConfigError::new(
                    "HS256 keys are secrets, not PEM keys: use SigningKey::hs256",
                ));
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                EncodingKey::from_ec_pem(pem).map_err(|_| bad())?
            }
            Algorithm::EdDSA => EncodingKey::from_ed_pem(pem).map_err(|_| bad())?,
            _ => EncodingKey::from_rsa_pem(pem).map_err(|_| bad())?,
        };
        Ok(Self {
            kid: None,
            alg,
            key,
        })
    }

    /// Sets the `kid` written into every token's header.
    pub fn kid(mut self, kid: impl Into<Arc<str>>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A minted token. `Debug` never shows the token.
#[derive(Clone)]
pub struct MintedToken {
    token: Arc<str>,
    jti: Arc<str>,
    issued_at: SystemTime,
    expires_at: SystemTime,
}

impl MintedToken {
    /// The compact token. Treat it as a secret until it expires.
    pub fn as_str(&self) -> &str {
        &self.token
    }

    /// `Authorization: Bearer <token>` as a header value marked sensitive.
    pub fn bearer_header(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.token))
            .expect("a compact JWS is visible ASCII");
        v.set_sensitive(true);
        v
    }

    /// `jti`: a random id that names this token in audit logs.
    pub fn jti(&self) -> &str {
        &self.jti
    }

    /// `iat`.
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// `exp`.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("jti", &self.jti)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Minting failed: the random source or the signer failed, or the clock reads a time
/// whose token would expire after the year 9999. Carries no key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintError(&'static str);

impl fmt::Display for MintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "minting a service token failed: {}", self.0)
    }
}

impl std::error::Error for MintError {}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    iat: i64,
    exp: i64,
    jti: &'a str,
}

/// Mints service tokens: `iss`, `sub`, `aud`, `scope`, `iat`, `exp` and a random
/// `jti`, with the key's `kid` and `typ: JWT` in the header.
///
/// ```
/// use std::time::Duration;
/// use portcullis::jwt::{SigningKey, TokenIssuer};
/// let issuer = TokenIssuer::builder(SigningKey::hs256(&[3u8; 32])?.kid("k1"))
///     .issuer("https://scheduler.internal")
///     .subject("scheduler")
///     .audience("jobs-api")
///     .scope("write:latest-runs")
///     .lifetime(Duration::from_secs(10 * 60))
///     .build()?;
/// let token = issuer.mint()?;
/// assert_eq!(token.as_str().split('.').count(), 3);
/// // Outside 1 minute ..= the maximum lifetime: a configuration error.
/// assert!(TokenIssuer::builder(SigningKey::hs256(&[3u8; 32])?)
///     .issuer("i").subject("s").audience("a")
///     .lifetime(Duration::from_secs(30)).build().is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct TokenIssuer {
    inner: Arc<IssuerInner>,
}

#[derive(Debug)]
struct IssuerInner {
    key: SigningKey,
    header: Header,
    iss: String,
    sub: String,
    aud: String,
    scope: Option<String>,
    lifetime: Duration,
}

impl TokenIssuer {
    /// Starts a builder; `issuer`, `subject` and `audience` are required.
    pub fn builder(key: SigningKey) -> TokenIssuerBuilder {
        TokenIssuerBuilder {
            key,
            iss: None,
            sub: None,
            aud: None,
            scopes: Vec::new(),
            lifetime: DEFAULT_LIFETIME,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }

    /// The lifetime of each minted token.
    pub fn lifetime(&self) -> Duration {
        self.inner.lifetime
    }

    /// Mints a new token, valid from now for [`lifetime`](Self::lifetime).
    pub fn mint(&self) -> Result<MintedToken, MintError> {
        let i = &self.inner;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|_| MintError("no randomness for the jti"))?;
        let jti = URL_SAFE_NO_PAD.encode(id);
        let iat = unix_now();
        // The lifetime is at most a day and `iat` inside the window, so this fits;
        // it is checked all the same, and an `exp` no verifier accepts is not minted.
        let exp = iat
            .checked_add(secs_i64(i.lifetime))
            .filter(|&exp| in_window(exp))
            .ok_or(MintError("the clock is outside the supported range"))?;
        let claims = Claims {
            iss: &i.iss,
            sub: &i.sub,
            aud: &i.aud,
            scope: i.scope.as_deref(),
            iat,
            exp,
            jti: &jti,
        };
        let token = jsonwebtoken::encode(&i.header, &claims, &i.key.key)
            .map_err(|_| MintError("signing failed"))?;
        Ok(MintedToken {
            token: token.into(),
            jti: jti.into(),
            issued_at: to_system_time(iat),
            expires_at: to_system_time(exp),
        })
    }
}

/// Builds a [`TokenIssuer`]; see [`TokenIssuer::builder`].
#[derive(Debug)]
pub struct TokenIssuerBuilder {
    key: SigningKey,
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<String>,
    scopes: Vec<String>,
    lifetime: Duration,
    max_lifetime: Duration,
}

impl TokenIssuerBuilder {
    /// `iss`: who mints (required).
    pub fn issuer(mut self, iss: impl Into<String>) -> Self {
        self.iss = Some(iss.into());
        self
    }
    /// `sub`: the calling service's name (required).
    pub fn subject(mut self, sub: impl Into<String>) -> Self {
        self.sub = Some(sub.into());
        self
    }
    /// `aud`: the service the token is for (required).
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.aud = Some(aud.into());
        self
    }
    /// Adds a scope token to `scope`.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }
    /// Lifetime of each token (default 15 minutes; 1 minute ..= the maximum, and at
    /// most 24 hours, the longest maximum a verifier accepts).
    pub fn lifetime(mut self, d: Duration) -> Self {
        self.lifetime = d;
        self
    }
    /// The maximum lifetime the verifiers accept (default one hour); `lifetime`
    /// must not exceed it.
    pub fn max_lifetime(mut self, d: Duration) -> Self {
        self.max_lifetime = d;
        self
    }

    /// Checks the configuration and mints one token as a self-test.
    pub fn build(self) -> Result<TokenIssuer, ConfigError> {
        let required = |v: Option<String>, name: &str| match v {
            Some(s) if !s.is_empty() && !s.chars().any(char::is_control) && s.len() <= 256 => Ok(s),
            _ => Err(ConfigError::new(format!(
                "{name} is required: 1 to 256 bytes without control characters"
            ))),
        };
        let iss = required(self.iss, "issuer")?;
        let sub = required(self.sub, "subject")?;
        let aud = required(self.aud, "audience")?;
        if self.lifetime < MIN_LIFETIME
            || self.lifetime > self.max_lifetime
            || self.lifetime > LONGEST_LIFETIME
        {
            return Err(ConfigError::new(
                "lifetime must be between 1 minute and the maximum lifetime, at most 24 hours",
            ));
        }
        let scopes = Scopes::from_iter_checked(&self.scopes)?;
        crypto_self_test()?;
        let mut header = Header::new(self.key.alg.to_jwt());
        header.kid = self.key.kid.as_deref().map(str::to_owned);
        header.typ = Some("JWT".to_owned());
        let issuer = TokenIssuer {
            inner: Arc::new(IssuerInner {
                header,
                iss,
                sub,
                aud,
                scope: (!scopes.is_empty()).then(|| scopes.to_string()),
                lifetime: self.lifetime,
                key: self.key,
            }),
        };
        issuer
            .mint()
            .map_err(|_| ConfigError::new("the signing key could not sign a test token"))?;
        Ok(issuer)
    }
}
