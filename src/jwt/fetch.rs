//! One HTTPS GET of a discovery document or a JWK Set, bounded in time and size.
//!
//! Each fetch opens its own connection (TCP, then TLS through rustls with the `ring`
//! provider and the configured roots, then HTTP/1.1 through hyper's connection API)
//! and sends one request. There is no connection pool and no redirect following: a
//! `3xx` is a failed fetch, so the keys can only come from the configured origin.
//! The connect phase (name resolution, TCP, TLS) has its own timeout, and the whole
//! exchange another; the body is read frame by frame and refused past the size cap.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::oidc::{FetchUrl, cache_max_age, content_type_is};
use crate::ConfigError;

/// Why a fetch failed: a class for the audit log, with a short description that
/// never holds a response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FetchError {
    /// Name resolution, TCP or TLS failed (untrusted certificate included).
    Connect(String),
    /// The connect or total timeout passed.
    Timeout,
    /// A `3xx` answer: redirects are not followed.
    Redirect(u16),
    /// Any other status than 200.
    Status(u16),
    /// The `Content-Type` is not a JSON type.
    ContentType,
    /// The body is larger than the cap.
    TooLarge,
    /// The HTTP exchange failed after connecting.
    Http,
    /// The document does not pass its parser (discovery or JWK Set rules).
    Invalid(String),
}

impl FetchError {
    /// A stable snake_case class for the audit log.
    pub(crate) fn class(&self) -> &'static str {
        match self {
            FetchError::Connect(_) => "connect",
            FetchError::Timeout => "timeout",
            FetchError::Redirect(_) => "redirect",
            FetchError::Status(_) => "status",
            FetchError::ContentType => "content_type",
            FetchError::TooLarge => "too_large",
            FetchError::Http => "http",
            FetchError::Invalid(_) => "invalid_document",
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Connect(e) => write!(f, "cannot connect: {e}"),
            FetchError::Timeout => f.write_str("timed out"),
            FetchError::Redirect(s) => write!(f, "HTTP {s}: redirects are not followed"),
            FetchError::Status(s) => write!(f, "HTTP {s}"),
            FetchError::ContentType => f.write_str("the content type is not JSON"),
            FetchError::TooLarge => f.write_str("the response is larger than the limit"),
            FetchError::Http => f.write_str("the HTTP exchange failed"),
            FetchError::Invalid(e) => write!(f, "invalid document: {e}"),
        }
    }
}

/// How every fetch of one issuer is made.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) tls: tokio_rustls::TlsConnector,
    pub(crate) connect_timeout: Duration,
    pub(crate) total_timeout: Duration,
    pub(crate) max_len: usize,
}

/// A successful response: its body and its `Cache-Control: max-age`, if any.
pub(crate) struct Fetched {
    pub(crate) body: Bytes,
    pub(crate) max_age: Option<u64>,
}

/// The media types a discovery document or a JWK Set is served with.
pub(crate) const JSON_TYPES: [&str; 2] = ["application/json", "application/jwk-set+json"];

impl Client {
    /// The TLS configuration: rustls with `ring`, TLS 1.2 and 1.3, the given roots
    /// (PEM) or else the platform's, HTTP/1.1 by ALPN.
    pub(crate) fn tls_config(
        roots_pem: Option<&[u8]>,
    ) -> Result<tokio_rustls::TlsConnector, ConfigError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        match roots_pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert
                        .map_err(|_| ConfigError::new("the root certificate PEM does not parse"))?;
                    roots
                        .add(cert)
                        .map_err(|_| ConfigError::new("a root certificate is not usable"))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
        }
        if roots.is_empty() {
            return Err(ConfigError::new(
                "no trusted root certificate: the platform has none and none was given",
            ));
        }
        // ring, the provider the crate already uses for rediss://. Newer rustls
        // releases deprecate it for lacking post-quantum key exchange, which ring
        // does not offer; the classical groups it has are what is used here.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| ConfigError::new("the TLS configuration is not usable"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// GETs `url` and returns its body, or why not.
    pub(crate) async fn get(&self, url: &FetchUrl) -> Result<Fetched, FetchError> {
        match tokio::time::timeout(self.total_timeout, self.exchange(url)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout),
        }
    }

    async fn exchange(&self, url: &FetchUrl) -> Result<Fetched, FetchError> {
        let io = match tokio::time::timeout(self.connect_timeout, self.connect(url)).await {
            Ok(r) => r?,
            Err(_) => return Err(FetchError::Timeout),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|_| FetchError::Http)?;
        // The connection is driven beside the request and dropped with it.
        let driver = tokio::spawn(conn);
        let _abort = AbortOnDrop(driver.abort_handle());
        let request = Request::get(&*url.target)
            .header(header::HOST, &*url.authority)
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .header(
                header::USER_AGENT,
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|_| FetchError::Http)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| FetchError::Http)?;
        let status = response.status();
        if status.is_redirection() {
            return Err(FetchError::Redirect(status.as_u16()));
        }
        if status != StatusCode::OK {
            return Err(FetchError::Status(status.as_u16()));
        }
        let headers = response.headers();
        if !headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| content_type_is(v.as_bytes(), &JSON_TYPES))
        {
            return Err(FetchError::ContentType);
        }
        let max_age = headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let max_age = cache_max_age(&max_age);
        if let Some(len) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > self.max_len as u64
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = response.into_body();
        let mut out = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| FetchError::Http)?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > self.max_len {
                    return Err(FetchError::TooLarge);
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(Fetched {
            body: out.freeze(),
            max_age,
        })
    }

    async fn connect(&self, url: &FetchUrl) -> Result<TokioIo<Stream>, FetchError> {
        let addrs = tokio::net::lookup_host((&*url.host, url.port))
            .await
            .map_err(|e| FetchError::Connect(format!("cannot resolve the host: {}", e.kind())))?;
        let mut last = FetchError::Connect("the host has no address".into());
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = FetchError::Connect(format!("TCP: {}", e.kind())),
            }
        }
        let tcp = tcp.ok_or(last)?;
        let _ = tcp.set_nodelay(true);
        if !url.tls {
            return Ok(TokioIo::new(Stream::Plain(tcp)));
        }
        let name = rustls::pki_types::ServerName::try_from(url.host.to_string())
            .map_err(|_| FetchError::Connect("the host is not a valid TLS name".into()))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Connect(format!("TLS: {e}")))?;
        Ok(TokioIo::new(Stream::Tls(Box::new(tls))))
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A plain (loopback only) or TLS connection.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
