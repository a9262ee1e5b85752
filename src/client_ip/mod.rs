//! Resolve the real client address once, from the TCP peer and trusted proxies.
//!
//! The source of truth is the TCP peer. Forwarding headers are read **only** when
//! the peer is inside the configured trusted-proxy networks; from anyone else they
//! are client-written and ignored. The header is walked right to left over all its
//! instances: trusted hops are skipped and the first untrusted address is the client.
//! An `unknown`, obfuscated or unparsable entry stops the walk and the request gets
//! no [`ClientIp`] (the allowlist then denies it), because everything to the left of
//! such an entry could have been written by anyone.
//!
//! Behind a CDN that writes one client address per request (`CF-Connecting-IP`,
//! `True-Client-IP`, `Fly-Client-IP`, `Fastly-Client-IP`), choose that header with
//! [`ClientIpConfig::header`] and list the CDN's edge networks as the trusted
//! proxies: the header is read only from those peers, parsed as strictly as one
//! `X-Forwarded-For` entry, and two instances resolve to no address.
//!
//! Plain hyper has no peer address in the request: wrap each connection's service in
//! [`PeerAddrLayer`]. With the `axum` feature, axum's `ConnectInfo<SocketAddr>` (from
//! `into_make_service_with_connect_info`) is accepted too, and with the `tonic`
//! feature the `TcpConnectInfo` tonic's server attaches. A request with none is
//! a wiring bug: it is answered with 500 and logged at error level, never resolved to
//! a made-up address.
//!
//! ```
//! use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, ForwardedHeader};
//!
//! // Behind two load balancers in 10.0.0.0/8 that append to `Forwarded`:
//! let layer = ClientIpLayer::new(
//!     ClientIpConfig::trusted_proxies("10.0.0.0/8")?.header(ForwardedHeader::Forwarded)?,
//! );
//! // Exposed directly, no proxy: headers are never read.
//! let direct = ClientIpLayer::new(ClientIpConfig::peer_only());
//! # let _ = (layer, direct);
//! # Ok::<(), portcullis::ConfigError>(())
//! ```
//!
//! ## Costs and limits
//! From an untrusted peer: one set lookup, no header parsing. From a trusted peer:
//! one pass over at most 33 entries from the right, and no allocation. A `Forwarded`
//! value is scanned whole, since quotes may hide commas, but only its last 33
//! entries are kept, in a fixed buffer. A chain of more than 32 trusted hops
//! resolves to no address.

mod parse;
#[cfg(test)]
mod properties;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};

use http::header::{FORWARDED, HeaderMap, HeaderName};
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::rejection::{RefusalBody, Rejection};
use crate::{ClientIp, ConfigError, IpSet};
pub(crate) use parse::{
    MAX_HOPS, Node, parse_forwarded, parse_forwarded_rev, parse_single_address,
    parse_x_forwarded_for, walk, walk_depth,
};

/// The TCP peer of the connection, in the request extensions.
///
/// Inserted by [`PeerAddrLayer`] for plain hyper servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// Which forwarding header the trusted proxies write. Exactly one is read: reading a
/// second header that the proxies do not sanitise would let a client write its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default; what most proxies write).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
    /// `X-Real-IP: client`: one address set by the nearest proxy. Several instances
    /// are ambiguous and resolve to nothing.
    XRealIp,
    /// `CF-Connecting-IP: client`, set by Cloudflare's edge. A single-value header,
    /// read as `X-Real-IP` is: only from a trusted peer (list the CDN's edge
    /// networks as the trusted proxies), one address, several instances resolve to
    /// nothing.
    CfConnectingIp,
    /// `True-Client-IP: client` (Cloudflare Enterprise, Akamai), single-value as
    /// [`CfConnectingIp`](Self::CfConnectingIp).
    TrueClientIp,
    /// `Fly-Client-IP: client`, set by Fly.io's proxy, single-value as
    /// [`CfConnectingIp`](Self::CfConnectingIp).
    FlyClientIp,
    /// `Fastly-Client-IP: client`, set by Fastly, single-value as
    /// [`CfConnectingIp`](Self::CfConnectingIp). Fastly lets a client send it too:
    /// the edge must be configured to overwrite it.
    FastlyClientIp,
}

impl ForwardedHeader {
    /// The single-value headers, each with its name: one address per request.
    pub(crate) fn single_value_name(self) -> Option<&'static HeaderName> {
        match self {
            ForwardedHeader::XForwardedFor | ForwardedHeader::Forwarded => None,
            ForwardedHeader::XRealIp => Some(&X_REAL_IP),
            ForwardedHeader::CfConnectingIp => Some(&CF_CONNECTING_IP),
            ForwardedHeader::TrueClientIp => Some(&TRUE_CLIENT_IP),
            ForwardedHeader::FlyClientIp => Some(&FLY_CLIENT_IP),
            ForwardedHeader::FastlyClientIp => Some(&FASTLY_CLIENT_IP),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static CF_CONNECTING_IP: HeaderName = HeaderName::from_static("cf-connecting-ip");
static TRUE_CLIENT_IP: HeaderName = HeaderName::from_static("true-client-ip");
static FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
static FASTLY_CLIENT_IP: HeaderName = HeaderName::from_static("fastly-client-ip");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Skip trusted hops; the first untrusted one is the client.
    Trusted,
    /// The n-th entry from the right is the client.
    Depth(usize),
}

/// How the client address is found. One resolver serves every layer that needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIpConfig {
    trusted: Option<IpSet>,
    header: ForwardedHeader,
    mode: Mode,
}

impl ClientIpConfig {
    /// The peer is the client; forwarding headers are never read. The safe default
    /// for a service that is reached directly.
    pub fn peer_only() -> Self {
        Self {
            trusted: None,
            header: ForwardedHeader::default(),
            mode: Mode::Trusted,
        }
    }

    /// Read `X-Forwarded-For` (see [`header`](Self::header)) from peers inside these
    /// comma-separated networks, skipping hops inside them.
    pub fn trusted_proxies(cidrs: &str) -> Result<Self, ConfigError> {
        Ok(Self::trusted_proxy_set(IpSet::parse(cidrs)?))
    }

    /// As [`trusted_proxies`](Self::trusted_proxies), from a parsed set.
    pub fn trusted_proxy_set(set: IpSet) -> Self {
        Self {
            trusted: Some(set),
            header: ForwardedHeader::default(),
            mode: Mode::Trusted,
        }
    }

    /// Which header the trusted proxies write. Refused on a
    /// [`peer_only`](Self::peer_only) configuration, which reads no header (a header
    /// is read only from trusted proxies), and, in [hop-count mode](Self::depth), for
    /// a single-value header (`X-Real-IP`, the CDN headers), which has no entries to
    /// count: either would be a setting with no effect.
    ///
    /// ```
    /// use portcullis::client_ip::{ClientIpConfig, ForwardedHeader};
    /// let cfg = ClientIpConfig::trusted_proxies("10.0.0.0/8")?.header(ForwardedHeader::XRealIp)?;
    /// # let _ = cfg;
    /// assert!(ClientIpConfig::peer_only().header(ForwardedHeader::Forwarded).is_err());
    /// # Ok::<(), portcullis::ConfigError>(())
    /// ```
    pub fn header(mut self, header: ForwardedHeader) -> Result<Self, ConfigError> {
        if self.trusted.is_none() {
            return Err(ConfigError::new(
                "a forwarding header is read only from trusted proxies: configure them first",
            ));
        }
        self.header = header;
        self.check_depth_header()?;
        Ok(self)
    }

    /// Hop-count mode, for proxies whose addresses are not known in advance: when
    /// the peer is trusted, the client is the `depth`-th entry from the right of the
    /// header (1 = the entry the peer appended). `depth` must be 1 to 32,
    /// and the peer must still be inside the trusted networks, so that a client
    /// connecting directly cannot choose its own address. Only `X-Forwarded-For` and
    /// `Forwarded` have entries to count: with a single-value header it is refused.
    pub fn depth(mut self, depth: usize) -> Result<Self, ConfigError> {
        if self.trusted.is_none() {
            return Err(ConfigError::new(
                "client IP depth mode needs trusted proxies for the peer",
            ));
        }
        if !(1..=MAX_HOPS).contains(&depth) {
            return Err(ConfigError::new(format!(
                "client IP depth must be between 1 and {MAX_HOPS}"
            )));
        }
        self.mode = Mode::Depth(depth);
        self.check_depth_header()?;
        Ok(self)
    }

    /// Hop-count mode counts the entries of a list header.
    fn check_depth_header(&self) -> Result<(), ConfigError> {
        match (self.mode, self.header.single_value_name()) {
            (Mode::Depth(_), Some(name)) => Err(ConfigError::new(format!(
                "client IP depth counts the entries of X-Forwarded-For or Forwarded; {name} holds one address"
            ))),
            _ => Ok(()),
        }
    }

    /// Resolves the client address of a request from `peer`. `None` when a trusted
    /// proxy reported an address that cannot be used (see the module docs).
    ///
    /// ```
    /// use http::HeaderMap;
    /// use portcullis::client_ip::ClientIpConfig;
    /// let cfg = ClientIpConfig::trusted_proxies("127.0.0.0/8").unwrap();
    /// let mut h = HeaderMap::new();
    /// h.append("x-forwarded-for", "203.0.113.5, 127.0.0.2".parse().unwrap());
    /// assert_eq!(cfg.resolve("127.0.0.1".parse().unwrap(), &h), Some("203.0.113.5".parse().unwrap()));
    /// assert_eq!(cfg.resolve("192.0.2.1".parse().unwrap(), &h), Some("192.0.2.1".parse().unwrap()));
    /// ```
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer.to_canonical();
        let Some(trusted) = &self.trusted else {
            return Some(peer);
        };
        let is_trusted = |ip: IpAddr| trusted.contains(ip);
        if !is_trusted(peer) {
            return Some(peer);
        }
        match self.header {
            ForwardedHeader::XForwardedFor => {
                let nodes = headers
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .rev()
                    .flat_map(|v| parse_x_forwarded_for(v.as_bytes()));
                self.pick(peer, nodes, is_trusted)
            }
            ForwardedHeader::Forwarded => {
                let nodes = headers
                    .get_all(FORWARDED)
                    .iter()
                    .rev()
                    .flat_map(|v| parse_forwarded_rev(v.as_bytes()));
                self.pick(peer, nodes, is_trusted)
            }
            single => {
                let name = single
                    .single_value_name()
                    .expect("the other headers are lists");
                let mut values = headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (Some(v), None) => match parse_single_address(v.as_bytes()) {
                        Node::Ip(ip) => Some(ip),
                        _ => None,
                    },
                    (None, _) => Some(peer),
                    (Some(_), Some(_)) => None,
                }
            }
        }
    }

    fn pick(
        &self,
        peer: IpAddr,
        nodes: impl Iterator<Item = Node>,
        is_trusted: impl Fn(IpAddr) -> bool,
    ) -> Option<IpAddr> {
        match self.mode {
            Mode::Trusted => walk(peer, nodes, is_trusted),
            Mode::Depth(d) => walk_depth(peer, nodes, d, is_trusted),
        }
    }
}

impl fmt::Debug for ClientIpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIpConfig")
            .field("trusted", &self.trusted)
            .field("header", &self.header)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Inserts the connection's [`PeerAddr`] into every request; build one per accepted
/// connection.
///
/// ```
/// use portcullis::client_ip::PeerAddrLayer;
/// use tower::ServiceBuilder;
/// # async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
/// let (_stream, peer) = listener.accept().await?;
/// let svc = ServiceBuilder::new()
///     .layer(PeerAddrLayer::new(peer))
///     .service_fn(|_req: http::Request<()>| async { Ok::<_, std::convert::Infallible>(http::Response::new(())) });
/// # let _ = svc; Ok(()) }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct PeerAddrLayer {
    peer: SocketAddr,
}

impl PeerAddrLayer {
    /// The layer for one connection from `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        Self { peer }
    }
}

impl<S> Layer<S> for PeerAddrLayer {
    type Service = AddPeerAddr<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AddPeerAddr {
            inner,
            peer: self.peer,
        }
    }
}

/// Service that inserts [`PeerAddr`]; see [`PeerAddrLayer`].
#[derive(Clone, Copy, Debug)]
pub struct AddPeerAddr<S> {
    inner: S,
    peer: SocketAddr,
}

impl<S> AddPeerAddr<S> {
    define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for AddPeerAddr<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(PeerAddr(self.peer));
        self.inner.call(req)
    }
}

/// Resolves [`ClientIp`] once per request; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct ClientIpLayer {
    config: std::sync::Arc<ClientIpConfig>,
}

impl ClientIpLayer {
    /// A layer resolving with `config`.
    pub fn new(config: ClientIpConfig) -> Self {
        Self {
            config: std::sync::Arc::new(config),
        }
    }
}

impl<S> Layer<S> for ClientIpLayer {
    type Service = ClientIpService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientIpService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Service that resolves [`ClientIp`]; see [`ClientIpLayer`].
#[derive(Clone, Debug)]
pub struct ClientIpService<S> {
    inner: S,
    config: std::sync::Arc<ClientIpConfig>,
}

impl<S> ClientIpService<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, config: ClientIpConfig) -> Self {
        ClientIpLayer::new(config).layer(inner)
    }
    define_inner_service_accessors!();
}

/// The peer address of a request: [`PeerAddr`], else axum's `ConnectInfo`, else
/// tonic's `TcpConnectInfo`.
fn peer_addr<B>(req: &Request<B>) -> Option<SocketAddr> {
    if let Some(p) = req.extensions().get::<PeerAddr>() {
        return Some(p.0);
    }
    #[cfg(feature = "axum")]
    if let Some(c) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(c.0);
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = req
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|c| c.remote_addr())
    {
        return Some(addr);
    }
    None
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ClientIpService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: RefusalBody,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match resolve(&self.config, &mut req) {
            Ok(ip) => ResponseFuture::inner_with(self.inner.call(req), Some(Resolution(ip))),
            Err(NoPeer) => {
                ResponseFuture::rejected(Rejection::misconfigured().into_response_to(&req))
            }
        }
    }
}

/// A request without a peer address: a wiring bug, answered with 500.
struct NoPeer;

/// In the request extensions when the layer ran and resolved no address (a trusted
/// proxy reported none usable), so that a handler can tell this from a missing layer;
/// and in the response extensions, so that the access log outside does not record
/// an address a layer further out resolved in its place.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Unresolved;

/// What the layer copies into the response extensions: the resolved [`ClientIp`],
/// or [`Unresolved`] (and no `ClientIp`) when it resolved none.
pub(crate) struct Resolution(pub(crate) Option<ClientIp>);

impl crate::future::CopyToResponse for Resolution {
    fn copy_to(self, extensions: &mut http::Extensions) {
        match self.0 {
            Some(ip) => {
                extensions.insert(ip);
            }
            None => {
                extensions.remove::<ClientIp>();
                extensions.insert(Unresolved);
            }
        }
    }
}

/// What a request without a peer address means and how to fix it (logged once).
#[cfg(feature = "axum")]
const NO_PEER_REMEDY: &str = "requests have no peer address, so every one is answered 500: \
    serve axum with `into_make_service_with_connect_info::<SocketAddr>()`, or with plain \
    hyper wrap each connection's service in `PeerAddrLayer`";
#[cfg(not(feature = "axum"))]
const NO_PEER_REMEDY: &str = "requests have no peer address, so every one is answered 500: \
    with plain hyper, wrap each connection's service in `PeerAddrLayer`; with axum, enable \
    portcullis's `axum` feature (it reads axum's ConnectInfo) and serve with \
    `into_make_service_with_connect_info::<SocketAddr>()`";
#[cfg(feature = "tonic")]
const NO_PEER_TONIC: &str = "; tonic's server attaches its TcpConnectInfo only when it accepts \
    the connections itself (`serve`, or `serve_with_incoming` over a TcpIncoming)";
#[cfg(not(feature = "tonic"))]
const NO_PEER_TONIC: &str = "; with tonic, enable portcullis's `tonic` feature (it reads \
    tonic's TcpConnectInfo)";

/// The layer's request-side work, in place: resolves the client address and inserts
/// it into the request extensions, replacing any an outer layer put there (and
/// removing it when this layer resolves none). Returns the address (also for the
/// response extensions), `Ok(None)` when a trusted proxy reported none, `Err`
/// (logged) when the request has no peer address.
fn resolve<ReqBody>(
    config: &ClientIpConfig,
    req: &mut Request<ReqBody>,
) -> Result<Option<ClientIp>, NoPeer> {
    let Some(peer) = peer_addr(req) else {
        // A wiring mistake repeats on every request: said once, with its remedy.
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(target: "portcullis::client_ip", "{NO_PEER_REMEDY}{NO_PEER_TONIC}");
        }
        return Err(NoPeer);
    };
    let ip = config.resolve(peer.ip(), req.headers()).map(ClientIp::new);
    match ip {
        Some(ip) => {
            req.extensions_mut().insert(ip);
        }
        None => {
            tracing::debug!(
                target: "portcullis::client_ip",
                "a trusted proxy reported no usable client address; request has no ClientIp"
            );
            // An address an outer layer resolved (the peer, when that one reads no
            // header) must not stand in for the one this layer could not resolve.
            let extensions = req.extensions_mut();
            extensions.remove::<ClientIp>();
            extensions.insert(Unresolved);
        }
    }
    Ok(ip)
}

opaque_response_future! {
    /// Response future of [`ClientIpService`]: the inner service's future, or the 500
    /// answer to a request without a peer address. It also copies the resolved
    /// [`ClientIp`] (or that none was resolved) into the response extensions, where
    /// an access log *outside* this layer reads it.
    copies Resolution
}
