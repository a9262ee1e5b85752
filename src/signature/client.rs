//! `SignRequestLayer`: signs outgoing requests (RFC 9421), the client side of
//! [`VerifySignatureLayer`](super::VerifySignatureLayer).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

use super::parse::{self, Component, DigestAlg, Message};
use super::{BoxError, CONTENT_DIGEST, SIGNATURE, SIGNATURE_INPUT, SignedBody};
use crate::ConfigError;
use crate::principal::check_name;

/// A client's signing key: its id (`keyid`) and its secret. `Debug` shows the id
/// and algorithm only.
#[derive(Clone)]
pub struct SigningKey {
    id: Arc<str>,
    signer: Signer,
}

#[derive(Clone)]
enum Signer {
    Hmac(Arc<[u8]>),
    Ed25519(Arc<ed25519_dalek::SigningKey>),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alg = match self.signer {
            Signer::Hmac(_) => "hmac-sha256",
            Signer::Ed25519(_) => "ed25519",
        };
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .field("alg", &alg)
            .finish()
    }
}

impl SigningKey {
    /// An `hmac-sha256` key: the secret shared with the verifier, at least 32 bytes.
    pub fn hmac_sha256(id: &str, secret: &[u8]) -> Result<Self, ConfigError> {
        check_name("signature key id", id)?;
        if secret.len() < 32 {
            return Err(ConfigError::new(
                "an hmac-sha256 signing secret must be at least 32 bytes",
            ));
        }
        Ok(Self {
            id: id.into(),
            signer: Signer::Hmac(secret.into()),
        })
    }

    /// An `ed25519` key from its 32-byte secret seed; the verifier registers
    /// [`public_key`](Self::public_key).
    pub fn ed25519(id: &str, seed: &[u8; 32]) -> Result<Self, ConfigError> {
        check_name("signature key id", id)?;
        Ok(Self {
            id: id.into(),
            signer: Signer::Ed25519(Arc::new(ed25519_dalek::SigningKey::from_bytes(seed))),
        })
    }

    /// The Ed25519 public key to register with the verifier; `None` for an HMAC key.
    pub fn public_key(&self) -> Option<[u8; 32]> {
        match &self.signer {
            Signer::Ed25519(k) => Some(k.verifying_key().to_bytes()),
            Signer::Hmac(_) => None,
        }
    }

    pub(crate) fn sign(&self, base: &[u8]) -> Vec<u8> {
        match &self.signer {
            Signer::Hmac(secret) => {
                use hmac::Mac;
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret)
                    .expect("HMAC takes keys of any length");
                mac.update(base);
                mac.finalize().into_bytes().to_vec()
            }
            Signer::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                key.sign(base).to_bytes().to_vec()
            }
        }
    }
}

/// Signs each outgoing request with a [`SigningKey`]: `Signature-Input` and
/// `Signature` (label `sig1`) over `@method`, `@authority`, `@path`, `@query`, the
/// configured header fields, and, for a request with a body, a `Content-Digest`
/// (`sha-256`) it adds; with `created` (now), a random `nonce` (128 bits) and
/// `keyid`. The body is read (up to
/// [`max_body_bytes`](Self::max_body_bytes)) to digest it, and sent unchanged.
///
/// ```
/// use portcullis::signature::{SignRequestLayer, SigningKey};
///
/// let key = SigningKey::hmac_sha256("billing-worker", &[7u8; 32])?;
/// let layer = SignRequestLayer::new(key).cover_header("content-type")?;
/// # let _ = layer;
/// # Ok::<(), portcullis::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct SignRequestLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    key: SigningKey,
    headers: Vec<Component>,
    max_body: usize,
}

impl SignRequestLayer {
    /// Signs with `key`.
    pub fn new(key: SigningKey) -> Self {
        Self {
            shared: Arc::new(Shared {
                key,
                headers: Vec::new(),
                max_body: 1 << 20,
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Shared)) -> Self {
        let s = &*self.shared;
        let mut shared = Shared {
            key: s.key.clone(),
            headers: s.headers.clone(),
            max_body: s.max_body,
        };
        f(&mut shared);
        Self {
            shared: Arc::new(shared),
        }
    }

    /// Covers the header field `name` (lowercase) too; a request without it fails
    /// to sign.
    pub fn cover_header(self, name: &str) -> Result<Self, ConfigError> {
        match Component::parse(name) {
            Ok(c @ Component::Field(_)) if c.name() != "content-digest" => {
                Ok(self.with(|s| s.headers.push(c)))
            }
            _ => Err(ConfigError::new(
                "cover_header takes a lowercase header field name (content-digest is added for bodies)",
            )),
        }
    }

    /// The largest body read to digest it (default 1 MiB); a larger one fails.
    pub fn max_body_bytes(self, bytes: usize) -> Self {
        self.with(|s| s.max_body = bytes)
    }
}

impl<S> Layer<S> for SignRequestLayer {
    type Service = SignRequest<S>;
    fn layer(&self, inner: S) -> Self::Service {
        SignRequest {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Service signing outgoing requests; see [`SignRequestLayer`].
#[derive(Clone, Debug)]
pub struct SignRequest<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> SignRequest<S> {
    /// Wraps `inner` with the signing of `layer`.
    pub fn new(inner: S, layer: &SignRequestLayer) -> Self {
        layer.layer(inner)
    }
    define_inner_service_accessors!();
}

/// Why a request could not be signed. Says nothing about the key.
#[derive(Debug)]
struct SignError(&'static str);

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request not signed: {}", self.0)
    }
}

impl std::error::Error for SignError {}

impl Shared {
    /// Adds `Content-Digest` (if `body` is given) and the signature fields to `parts`.
    fn sign(&self, parts: &mut http::request::Parts, body: Option<&[u8]>) -> Result<(), SignError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut components = vec![
            Component::Method,
            Component::Authority,
            Component::Path,
            Component::Query,
        ];
        components.extend(self.headers.iter().cloned());
        if let Some(body) = body {
            let digest = format!("sha-256=:{}:", b64.encode(DigestAlg::Sha256.digest(body)));
            parts.headers.insert(
                CONTENT_DIGEST,
                HeaderValue::from_str(&digest).expect("base64 is a valid header value"),
            );
            components.push(Component::Field("content-digest".to_owned()));
        }
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|_| SignError("no randomness for the nonce"))?;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let names: Vec<String> = components
            .iter()
            .map(|c| format!("\"{}\"", c.name()))
            .collect();
        let params = format!(
            "({});created={created};keyid=\"{}\";nonce=\"{}\"",
            names.join(" "),
            self.key.id,
            b64.encode(nonce),
        );
        // The authority as the verifier derives it: a request it would find
        // ambiguous (a URI authority and a different Host) is not signed.
        let authority = super::authority(&parts.uri, &parts.headers).ok_or(SignError(
            "no single authority (an absolute URI or one Host field, agreeing)",
        ))?;
        let msg = Message {
            method: parts.method.as_str(),
            authority: Some(authority),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let base = parse::signature_base(&msg, &components, &params)
            .map_err(|_| SignError("a covered header field is missing or not ASCII"))?;
        let signature = b64.encode(self.key.sign(base.as_bytes()));
        let input = HeaderValue::from_str(&format!("sig1={params}"))
            .map_err(|_| SignError("the signature parameters are not a valid field"))?;
        parts.headers.insert(SIGNATURE_INPUT, input);
        parts.headers.insert(
            SIGNATURE,
            HeaderValue::from_str(&format!("sig1=:{signature}:"))
                .expect("base64 is a valid header value"),
        );
        Ok(())
    }
}

impl<S, B> Service<Request<B>> for SignRequest<S>
where
    S: Service<Request<SignedBody<B>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let shared = self.shared.clone();
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let body = if http_body::Body::is_end_stream(&body) {
                shared.sign(&mut parts, None)?;
                SignedBody::streaming(body)
            } else {
                use http_body_util::BodyExt;
                let bytes = http_body_util::Limited::new(body, shared.max_body)
                    .collect()
                    .await?
                    .to_bytes();
                shared.sign(&mut parts, Some(&bytes))?;
                SignedBody::buffered(bytes)
            };
            inner
                .call(Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
    }
}
