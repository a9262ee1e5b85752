//! Keys from a URL: an issuer whose JWK Set is fetched over HTTPS (directly, or
//! through OpenID Connect discovery) and refreshed in the background.

use std::fmt;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::fetch::{Client, FetchError};
use super::keys::VerifyingKey;
use super::oidc::{
    FetchUrl, ShownUrl, discovery_url, parse_discovery, parse_remote_jwks, parse_url,
};
use super::time::{LONGEST_LIFETIME, secs_i64, unix_now};
use super::verify::Inner;
use crate::{ConfigError, Scopes};

/// Google's issuer for ID tokens of service accounts and Cloud Run / Workload
/// Identity callers.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// Google's JWK Set for [`GOOGLE_ISSUER`]'s ID tokens.
pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_RESPONSE_LEN: usize = 256 * 1024;
const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(5 * 60);
const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(60 * 60);
/// The refresh interval when the response has no usable `max-age` (then clamped).
const DEFAULT_REFRESH: Duration = Duration::from_secs(15 * 60);
const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(24 * 60 * 60);

/// Which claim of a token becomes the [`Principal`](crate::Principal)'s id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PrincipalClaim {
    /// `sub` (the default).
    Subject,
    /// `email`, accepted only when the token also carries `email_verified: true`
    /// (a JSON boolean); `sub` must still be present.
    VerifiedEmail,
}

/// What [`TokenVerifierBuilder::build`](super::TokenVerifierBuilder::build) does
/// before an issuer's keys have been fetched once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RemoteStart {
    /// `build()` waits for the first successful fetch (discovery included) and fails
    /// if it does not succeed within the fetch timeouts: a start-up with an
    /// unreachable or misconfigured provider fails fast. The default.
    #[default]
    WaitForFirstFetch,
    /// `build()` returns at once; the issuer's tokens are refused
    /// ([`TokenRejection::KeysUnavailable`](super::TokenRejection::KeysUnavailable))
    /// until a fetch succeeds, retried every refetch interval.
    StartEmpty,
}

#[derive(Clone)]
enum KeySource {
    Discovery,
    Jwks(String),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Discovery => f.write_str("Discovery"),
            KeySource::Jwks(url) => f.debug_tuple("Jwks").field(&ShownUrl(url)).finish(),
        }
    }
}

/// An issuer whose keys are fetched from a URL, with its own audiences, principal
/// mapping and fetch settings. Add it with
/// [`TokenVerifierBuilder::remote_issuer`](super::TokenVerifierBuilder::remote_issuer);
/// a token whose `iss` is exactly this issuer is checked against these keys and
/// rules only.
///
/// # Fetching
///
/// - HTTPS only, through rustls, trusting the platform's root certificates or the
///   ones given with [`tls_root_certificates`](Self::tls_root_certificates). Plain
///   HTTP is possible only to a loopback host, after
///   [`allow_plain_http_to_loopback_dangerously`](Self::allow_plain_http_to_loopback_dangerously).
/// - A connect timeout (default 5 s) and a total timeout per request (default 10 s),
///   a response size cap (default 256 KiB), `Content-Type` `application/json` or
///   `application/jwk-set+json`, status 200. Redirects are never followed, to
///   another origin or the same one: configure the final URL.
/// - The JWK Set is fetched again after its `Cache-Control: max-age`, clamped to
///   [`refresh_bounds`](Self::refresh_bounds) (default 5 min to 1 h; 15 min when the
///   response has none).
/// - A token naming an unknown `kid` asks for a refetch: at most one fetch per
///   [`refetch_interval`](Self::refetch_interval) (default 30 s), shared by every
///   request, so a flood of random `kid`s costs one fetch per interval. The request
///   itself is refused at once ([`UnknownKey`](super::TokenRejection::UnknownKey)):
///   requests never wait on the network. A failed fetch is retried after the same
///   interval.
/// - A failed or invalid fetch (an error status, a timeout, a body that is not a
///   JWK Set, an empty set, a key with `use: enc`, without a pinnable algorithm,
///   with weak key material (see [`KeySet`](super::KeySet)), or an `oct` secret)
///   keeps the last good keys for up to
///   [`max_staleness`](Self::max_staleness) (default 24 h) after the last successful
///   fetch; past it, the issuer's tokens are refused
///   ([`KeysUnavailable`](super::TokenRejection::KeysUnavailable)) until a fetch
///   succeeds. A successful fetch replaces the issuer's whole set: a key removed
///   upstream stops verifying at once, and the verified-token cache is emptied.
/// - Audit events: `remote_keys_updated`, `remote_keys_fetch_failed`,
///   `remote_keys_expired` (see [`audit::Event`](crate::audit::Event)).
///
/// The fetcher runs on a thread of its own (with a single-threaded Tokio runtime),
/// which ends once the last clone of the verifier is dropped.
///
/// # What remote keys change, and what they do not protect against
///
/// The keys are whatever the issuer's HTTPS endpoint serves: whoever controls that
/// endpoint, its domain or a certificate authority trusted for it can publish a key
/// and mint tokens that pass. Availability becomes the provider's too: past the
/// maximum staleness without a successful fetch, the issuer's tokens are refused. A
/// key removed upstream is trusted until the next successful fetch. The issuer,
/// audiences and principal mapping are the whole policy: a provider that issues
/// tokens to every account of a cloud or every service account of a cluster needs
/// the accepted principals listed. The [threat model](crate::threat_model) has the
/// full list.
///
/// # Example: an OpenID Connect issuer
///
/// ```no_run
/// use portcullis::jwt::{RemoteIssuer, TokenVerifier};
///
/// # fn main() -> Result<(), portcullis::ConfigError> {
/// let verifier = TokenVerifier::builder()
///     .remote_issuer(
///         RemoteIssuer::discover("https://auth.example/realms/services")
///             .audience("jobs-api"),
///     )
///     .build()?; // waits for the first fetch: fails fast if the issuer is unreachable
/// # let _ = verifier;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RemoteIssuer {
    pub(crate) issuer: String,
    source: KeySource,
    pub(crate) audiences: Vec<String>,
    pub(crate) id_claim: PrincipalClaim,
    pub(crate) static_scopes: Option<Vec<(String, String)>>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) needs_principal_list: bool,
    start: RemoteStart,
    roots_pem: Option<Vec<u8>>,
    loopback_http: bool,
    connect_timeout: Duration,
    total_timeout: Duration,
    max_response_len: usize,
    min_refresh: Duration,
    max_refresh: Duration,
    refetch_interval: Duration,
    max_staleness: Duration,
}

/// The issuer and the JWK Set URL are shown without user information, query or
/// fragment, which can carry a credential: `scheme://host[:port]/path`.
impl fmt::Debug for RemoteIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteIssuer")
            .field("issuer", &ShownUrl(&self.issuer))
            .field("source", &self.source)
            .field("audiences", &self.audiences)
            .field("principal_claim", &self.id_claim)
            .field("start", &self.start)
            .field("custom_roots", &self.roots_pem.is_some())
            .field("plain_http_to_loopback", &self.loopback_http)
            .finish_non_exhaustive()
    }
}

impl RemoteIssuer {
    fn new(issuer: &str, source: KeySource) -> Self {
        Self {
            issuer: issuer.to_owned(),
            source,
            audiences: Vec::new(),
            id_claim: PrincipalClaim::Subject,
            static_scopes: None,
            max_lifetime: None,
            needs_principal_list: false,
            start: RemoteStart::default(),
            roots_pem: None,
            loopback_http: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            total_timeout: DEFAULT_TOTAL_TIMEOUT,
            max_response_len: DEFAULT_MAX_RESPONSE_LEN,
            min_refresh: DEFAULT_MIN_REFRESH,
            max_refresh: DEFAULT_MAX_REFRESH,
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
            max_staleness: DEFAULT_MAX_STALENESS,
        }
    }

    /// An issuer resolved through OpenID Connect discovery: its keys are at the
    /// `jwks_uri` of `<issuer>/.well-known/openid-configuration`, whose `issuer`
    /// must equal `issuer` exactly and whose `jwks_uri` must be HTTPS. The document
    /// is read again after a failed key fetch.
    pub fn discover(issuer: impl AsRef<str>) -> Self {
        Self::new(issuer.as_ref(), KeySource::Discovery)
    }

    /// An issuer whose JWK Set is at `jwks_url` (HTTPS), without discovery.
    pub fn jwks(issuer: impl AsRef<str>, jwks_url: impl Into<String>) -> Self {
        Self::new(issuer.as_ref(), KeySource::Jwks(jwks_url.into()))
    }

    /// Google-signed ID tokens: GCP service accounts, Cloud Run and Workload
    /// Identity callers of an internal endpoint. Issuer [`GOOGLE_ISSUER`], keys from
    /// [`GOOGLE_JWKS_URL`], the principal is the service account's verified email
    /// ([`PrincipalClaim::VerifiedEmail`]), and `audience` is the URL of the endpoint
    /// the caller asked its token for.
    ///
    /// Any Google account can obtain an ID token for any audience, so the audience
    /// alone does not say who calls: `build()` refuses this issuer unless the callers
    /// are listed, with [`scopes_for`](Self::scopes_for) (Google ID tokens carry no
    /// scopes, so this is also where they come from) or the verifier's
    /// [`allowed_subjects`](super::TokenVerifierBuilder::allowed_subjects).
    ///
    /// ```no_run
    /// use portcullis::jwt::{RemoteIssuer, TokenVerifier};
    ///
    /// # fn main() -> Result<(), portcullis::ConfigError> {
    /// // The caller runs
    /// //   curl -H 'Metadata-Flavor: Google' \
    /// //     'http://metadata/computeMetadata/v1/instance/service-accounts/default/identity?audience=https://jobs.internal.example'
    /// // and sends the token as `Authorization: Bearer <token>`.
    /// let verifier = TokenVerifier::builder()
    ///     .remote_issuer(
    ///         RemoteIssuer::google("https://jobs.internal.example")
    ///             .scopes_for("scheduler@my-project.iam.gserviceaccount.com", "jobs:write")?
    ///             .scopes_for("reports@my-project.iam.gserviceaccount.com", "jobs:read")?,
    ///     )
    ///     .build()?;
    /// // A token of scheduler@…: principal id = the email, scopes = jobs:write.
    /// // Another account, another audience, or `email_verified` not true: refused.
    /// # let _ = verifier;
    /// # Ok(())
    /// # }
    /// ```
    pub fn google(audience: impl Into<String>) -> Self {
        let mut me = Self::jwks(GOOGLE_ISSUER, GOOGLE_JWKS_URL)
            .audience(audience)
            .principal_claim(PrincipalClaim::VerifiedEmail);
        me.needs_principal_list = true;
        me
    }

    /// Kubernetes projected service-account tokens: the cluster's issuer (the API
    /// server's `--service-account-issuer`) through discovery, principal =
    /// `sub` = `system:serviceaccount:<namespace>:<name>`, and the audience the pod's
    /// projected volume asks for. The longest accepted lifetime is 2 hours (the
    /// kubelet's default `expirationSeconds` is 3607).
    ///
    /// The discovery document and the JWK Set are served by the API server
    /// (`/.well-known/openid-configuration`, `/openid/v1/jwks`) to any caller once
    /// the `system:service-account-issuer-discovery` role is bound to
    /// `system:unauthenticated`; for the API server's own certificate, give the
    /// cluster CA with [`tls_root_certificates`](Self::tls_root_certificates).
    ///
    /// ```no_run
    /// use portcullis::jwt::{RemoteIssuer, TokenVerifier};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The calling pod mounts:
    /// //   volumes:
    /// //   - name: jobs-token
    /// //     projected:
    /// //       sources:
    /// //       - serviceAccountToken: {path: token, audience: jobs-api, expirationSeconds: 3607}
    /// // and sends /var/run/secrets/jobs/token as `Authorization: Bearer <token>`.
    /// let cluster_ca = std::fs::read("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")?;
    /// let verifier = TokenVerifier::builder()
    ///     .remote_issuer(
    ///         RemoteIssuer::kubernetes("https://kubernetes.default.svc.cluster.local", "jobs-api")
    ///             .tls_root_certificates(&cluster_ca),
    ///     )
    ///     .allowed_subjects(["system:serviceaccount:batch:scheduler"])
    ///     .build()?;
    /// # let _ = verifier;
    /// # Ok(())
    /// # }
    /// ```
    pub fn kubernetes(issuer: impl AsRef<str>, audience: impl Into<String>) -> Self {
        Self::discover(issuer)
            .audience(audience)
            .max_lifetime(Duration::from_secs(2 * 60 * 60))
    }

    /// Fetches the JWK Set from `url` (HTTPS) without discovery, e.g. a preset's
    /// keys through a mirror or an egress proxy's address.
    pub fn jwks_url(mut self, url: impl Into<String>) -> Self {
        self.source = KeySource::Jwks(url.into());
        self
    }

    /// Accepts tokens whose `aud` contains `aud`. At least one is required.
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.audiences.push(aud.into());
        self
    }

    /// The claim that becomes the principal's id (default `sub`).
    pub fn principal_claim(mut self, claim: PrincipalClaim) -> Self {
        self.id_claim = claim;
        self
    }

    /// Grants `scopes` (space separated) to the principal `principal`. Once called,
    /// scopes come from this mapping only (a token's `scope`/`scp` is ignored) and a
    /// principal that is not mapped is refused
    /// ([`SubjectNotAllowed`](super::TokenRejection::SubjectNotAllowed)). Without
    /// it, scopes come from the token's `scope` or `scp`.
    pub fn scopes_for(
        mut self,
        principal: impl Into<String>,
        scopes: &str,
    ) -> Result<Self, ConfigError> {
        Scopes::parse(scopes)?;
        self.static_scopes
            .get_or_insert_with(Vec::new)
            .push((principal.into(), scopes.to_owned()));
        Ok(self)
    }

    /// Longest accepted `exp - iat` for this issuer (default: the verifier's
    /// [`max_lifetime`](super::TokenVerifierBuilder::max_lifetime); at most 24 h).
    pub fn max_lifetime(mut self, d: Duration) -> Self {
        self.max_lifetime = Some(d);
        self
    }

    /// Whether `build()` waits for the first fetch (the default) or starts empty.
    pub fn start(mut self, start: RemoteStart) -> Self {
        self.start = start;
        self
    }

    /// Trusts only these root certificates (PEM, one or more) for this issuer
    /// instead of the platform's: a private CA, or a Kubernetes cluster CA. Checked
    /// at `build()`.
    pub fn tls_root_certificates(mut self, pem: &[u8]) -> Self {
        self.roots_pem = Some(pem.to_vec());
        self
    }

    /// Allows `http://` URLs to a loopback host (`localhost`, `127.0.0.0/8`, `::1`),
    /// for a provider on the same machine or in the same pod. **Dangerous**: keys
    /// fetched without TLS are only as trustworthy as every process that can listen
    /// on that address. Other hosts stay HTTPS-only.
    pub fn allow_plain_http_to_loopback_dangerously(mut self) -> Self {
        self.loopback_http = true;
        self
    }

    /// The connect timeout (name resolution, TCP, TLS; default 5 s) and the total
    /// timeout of one request (default 10 s). Each from 10 ms to 60 s, the connect
    /// timeout at most the total.
    pub fn timeouts(mut self, connect: Duration, total: Duration) -> Self {
        self.connect_timeout = connect;
        self.total_timeout = total;
        self
    }

    /// The largest response accepted, in bytes (default 256 KiB; 1 KiB to 16 MiB).
    pub fn max_response_len(mut self, bytes: usize) -> Self {
        self.max_response_len = bytes;
        self
    }

    /// The bounds the `Cache-Control: max-age` of the JWK Set is clamped to, which
    /// set when it is fetched again (default 5 min to 1 h). `min` at least 100 ms,
    /// `min <= max`.
    pub fn refresh_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.min_refresh = min;
        self.max_refresh = max;
        self
    }

    /// The shortest time between two fetches asked for by unknown `kid`s, and the
    /// wait before retrying a failed fetch (default 30 s; at least 100 ms).
    pub fn refetch_interval(mut self, d: Duration) -> Self {
        self.refetch_interval = d;
        self
    }

    /// How long after the last successful fetch its keys stay in force while every
    /// fetch fails (default 24 h). Must be longer than the longest refresh interval
    /// and at least 1 s.
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.max_staleness = d;
        self
    }

    /// The issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Checks the settings and makes the fetcher. Errors show the issuer as
    /// [`ShownUrl`] does, never its user information or query.
    pub(crate) fn fetcher(&self) -> Result<Fetcher, ConfigError> {
        let err = |what: &str| {
            ConfigError::new(format!("remote issuer {}: {what}", ShownUrl(&self.issuer)))
        };
        parse_url(&self.issuer, self.loopback_http).map_err(err)?;
        let source = match &self.source {
            KeySource::Discovery => {
                Source::Discovery(discovery_url(&self.issuer, self.loopback_http).map_err(err)?)
            }
            KeySource::Jwks(url) => Source::Jwks(
                parse_url(url, self.loopback_http).map_err(|e| err(&format!("JWKS URL: {e}")))?,
            ),
        };
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(err("at least one non-empty audience is required"));
        }
        let ms = Duration::from_millis;
        if !(ms(10)..=Duration::from_secs(60)).contains(&self.connect_timeout)
            || !(ms(10)..=Duration::from_secs(60)).contains(&self.total_timeout)
            || self.connect_timeout > self.total_timeout
        {
            return Err(err(
                "timeouts must be 10 ms to 60 s, the connect timeout at most the total",
            ));
        }
        if !(1024..=16 << 20).contains(&self.max_response_len) {
            return Err(err("max_response_len must be 1 KiB to 16 MiB"));
        }
        if self.min_refresh < ms(100) || self.min_refresh > self.max_refresh {
            return Err(err("refresh bounds: min at least 100 ms and at most max"));
        }
        if self.refetch_interval < ms(100) {
            return Err(err("refetch_interval must be at least 100 ms"));
        }
        if self.max_staleness < Duration::from_secs(1) || self.max_staleness <= self.max_refresh {
            return Err(err(
                "max_staleness must be at least 1 s and longer than the longest refresh interval",
            ));
        }
        if self
            .max_lifetime
            .is_some_and(|d| d < Duration::from_secs(1) || d > LONGEST_LIFETIME)
        {
            return Err(err("max_lifetime must be between 1 s and 24 h"));
        }
        let tls = Client::tls_config(self.roots_pem.as_deref()).map_err(|e| err(&e.to_string()))?;
        Ok(Fetcher {
            issuer: self.issuer.clone(),
            source,
            loopback_http: self.loopback_http,
            client: Client {
                tls,
                connect_timeout: self.connect_timeout,
                total_timeout: self.total_timeout,
                max_len: self.max_response_len,
            },
            start: self.start,
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
            refetch_interval: self.refetch_interval,
            max_staleness: self.max_staleness,
        })
    }
}

/// Checks that `pem` holds usable root certificates.
#[cfg(feature = "stack")]
pub(crate) fn check_root_certificates(pem: &[u8]) -> Result<(), ConfigError> {
    Client::tls_config(Some(pem)).map(drop)
}

enum Source {
    Discovery(FetchUrl),
    Jwks(FetchUrl),
}

/// One issuer's fetch settings, owned by its worker thread.
pub(crate) struct Fetcher {
    issuer: String,
    source: Source,
    loopback_http: bool,
    client: Client,
    pub(crate) start: RemoteStart,
    min_refresh: Duration,
    max_refresh: Duration,
    refetch_interval: Duration,
    max_staleness: Duration,
}

impl Fetcher {
    /// The first wait of a `WaitForFirstFetch` build: discovery and key fetch.
    pub(crate) fn first_fetch_deadline(&self) -> Duration {
        self.client.total_timeout * 2 + Duration::from_secs(1)
    }

    /// The JWK Set, through discovery when `jwks` is not known yet.
    async fn fetch(
        &self,
        jwks: &mut Option<FetchUrl>,
    ) -> Result<(Vec<VerifyingKey>, Option<u64>, [u8; 32]), FetchError> {
        let url = match (&self.source, jwks.as_ref()) {
            (Source::Jwks(url), _) => url.clone(),
            (Source::Discovery(_), Some(url)) => url.clone(),
            (Source::Discovery(doc), None) => {
                let got = self.client.get(doc).await?;
                let url = parse_discovery(&got.body, &self.issuer, self.loopback_http)
                    .map_err(|e| FetchError::Invalid(e.to_owned()))?;
                *jwks = Some(url.clone());
                url
            }
        };
        let got = self.client.get(&url).await?;
        let keys = parse_remote_jwks(&got.body).map_err(|e| FetchError::Invalid(e.to_string()))?;
        Ok((keys, got.max_age, Sha256::digest(&got.body).into()))
    }

    fn refresh_after(&self, max_age: Option<u64>) -> Duration {
        max_age
            .map_or(DEFAULT_REFRESH, Duration::from_secs)
            .clamp(self.min_refresh, self.max_refresh)
    }

    fn origin(&self, jwks: Option<&FetchUrl>) -> String {
        match (&self.source, jwks) {
            (Source::Jwks(u), _) | (Source::Discovery(_), Some(u)) => u.origin(),
            (Source::Discovery(u), None) => u.origin(),
        }
    }
}

/// The request side of one issuer's worker: asks for a refetch without waiting.
pub(crate) struct RemoteHandle {
    wake: SyncSender<()>,
}

impl RemoteHandle {
    /// Asks the worker for a fetch (an unknown `kid`). Never blocks: with a request
    /// already pending, this one is the same request.
    pub(crate) fn request_refetch(&self) {
        let _ = self.wake.try_send(());
    }
}

/// The channels of a worker not started yet.
pub(crate) struct Pending {
    wake: Receiver<()>,
}

/// A handle for the verifier and the receiving end for the worker.
pub(crate) fn channel() -> (RemoteHandle, Pending) {
    let (wake, rx) = mpsc::sync_channel(1);
    (RemoteHandle { wake }, Pending { wake: rx })
}

/// Starts the worker of issuer `index`. With [`RemoteStart::WaitForFirstFetch`],
/// waits for its first fetch and returns its error.
pub(crate) fn start(
    inner: &Arc<Inner>,
    index: usize,
    fetcher: Fetcher,
    pending: Pending,
) -> Result<(), ConfigError> {
    let wait = fetcher.start == RemoteStart::WaitForFirstFetch;
    let deadline = fetcher.first_fetch_deadline();
    let issuer = ShownUrl(&fetcher.issuer).to_string();
    let (first_tx, first_rx) = mpsc::sync_channel(1);
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("portcullis-jwks".to_owned())
        .spawn(move || run(&weak, index, &fetcher, &pending.wake, Some(first_tx)))
        .map_err(|e| ConfigError::new(format!("cannot start the key fetch thread: {e}")))?;
    if !wait {
        return Ok(());
    }
    match first_rx.recv_timeout(deadline) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ConfigError::new(format!(
            "remote issuer {issuer}: the first key fetch failed: {e}"
        ))),
        Err(_) => Err(ConfigError::new(format!(
            "remote issuer {issuer}: the first key fetch did not finish in time"
        ))),
    }
}

/// The worker loop: a fetch when the refresh is due, or when a refetch was asked
/// for and the refetch interval has passed since the last fetch.
fn run(
    weak: &Weak<Inner>,
    index: usize,
    fetcher: &Fetcher,
    wake: &Receiver<()>,
    mut first: Option<SyncSender<Result<(), String>>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            if let Some(first) = first.take() {
                let _ = first.send(Err(format!("cannot start the fetch runtime: {e}")));
            }
            return;
        }
    };
    let mut jwks: Option<FetchUrl> = None;
    let mut next_refresh = Instant::now();
    let mut last_fetch: Option<Instant> = None;
    let mut asked = false;
    // When the keys in force pass the maximum staleness, and whether that was told.
    let mut stale_at: Option<Instant> = None;
    let mut expiry_reported = false;
    loop {
        let now = Instant::now();
        let refetch_at = last_fetch.map_or(now, |t| t + fetcher.refetch_interval);
        if now < next_refresh && !(asked && now >= refetch_at) {
            let mut until = next_refresh;
            if asked {
                until = until.min(refetch_at);
            }
            if let Some(s) = stale_at.filter(|_| !expiry_reported) {
                until = until.min(s);
            }
            match wake.recv_timeout(until.saturating_duration_since(now)) {
                Ok(()) => asked = true,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Some(s) = stale_at
                && !expiry_reported
                && Instant::now() >= s
            {
                expiry_reported = true;
                crate::audit::emit!(
                    error,
                    RemoteKeysExpired,
                    issuer = %ShownUrl(&fetcher.issuer),
                    max_staleness_secs = fetcher.max_staleness.as_secs(),
                    "no successful fetch within the maximum staleness: the issuer's tokens are refused"
                );
            }
            continue;
        }
        last_fetch = Some(now);
        asked = false;
        let result = rt.block_on(fetcher.fetch(&mut jwks));
        let Some(inner) = weak.upgrade() else { return };
        let result =
            result
                .map_err(|e| (e.class(), e.to_string()))
                .and_then(|(keys, max_age, digest)| {
                    let fresh_until = unix_now().saturating_add(secs_i64(fetcher.max_staleness));
                    inner
                        .install_remote(index, keys, digest, fresh_until)
                        .map(|_| max_age)
                        .map_err(|e| ("refused", e.to_string()))
                });
        drop(inner);
        match result {
            Ok(max_age) => {
                next_refresh = now + fetcher.refresh_after(max_age);
                stale_at = Some(now + fetcher.max_staleness);
                expiry_reported = false;
                if let Some(first) = first.take() {
                    let _ = first.send(Ok(()));
                }
            }
            Err((class, message)) => {
                crate::audit::emit!(
                    error,
                    RemoteKeysFetchFailed,
                    issuer = %ShownUrl(&fetcher.issuer),
                    url = %fetcher.origin(jwks.as_ref()),
                    error = class,
                    detail = %message,
                    "the keys in force stay until the maximum staleness"
                );
                if matches!(fetcher.source, Source::Discovery(_)) {
                    // The document may have moved the keys: read it again.
                    jwks = None;
                }
                next_refresh = now + fetcher.refetch_interval;
                if let Some(first) = first.take() {
                    let _ = first.send(Err(message));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::TokenVerifier;

    const SECRETS: [&str; 2] = ["Sup3rSecretPw", "Sup3rSecretTok"];

    #[test]
    fn refusals_do_not_repeat_url_credentials() {
        let with_password = "https://svc:Sup3rSecretPw@idp.example.com";
        let with_token = RemoteIssuer::jwks(
            "https://idp.example.com/?access_token=Sup3rSecretTok",
            "https://idp.example.com/jwks",
        );
        let remote = |r: RemoteIssuer| TokenVerifier::builder().remote_issuer(r);
        for (builder, why) in [
            // Refused by the issuer's own checks, then by the verifier's.
            (
                remote(RemoteIssuer::discover(with_password).audience("api")),
                "user information",
            ),
            (
                remote(RemoteIssuer::discover(with_password))
                    .issuer(with_password)
                    .audience("api"),
                "configured twice",
            ),
            (remote(with_token), "audience"),
        ] {
            let e = builder.build().unwrap_err();
            let e = format!("{e} {e:?}");
            assert!(
                e.contains(why) && e.contains("https://idp.example.com"),
                "{e}"
            );
            assert!(!SECRETS.iter().any(|s| e.contains(s)), "{e}");
        }
    }
    #[test]
    fn debug_hides_url_credentials() {
        let r = RemoteIssuer::jwks(
            "https://idp.example.com/?access_token=Sup3rSecretTok",
            "https://svc:Sup3rSecretPw@idp.example.com/jwks?access_token=Sup3rSecretTok",
        );
        let d = format!("{r:?}");
        assert!(!SECRETS.iter().any(|s| d.contains(s)), "{d}");
        assert!(d.contains(r#"Jwks("https://idp.example.com/jwks")"#), "{d}");
    }

    /// The verifier that holds such an issuer shows it the same way.
    #[tokio::test]
    async fn the_verifier_debug_hides_its_remote_issuers_credentials() {
        let r = RemoteIssuer::jwks(
            "https://idp.example.com/?access_token=Sup3rSecretTok",
            "https://idp.example.com/jwks",
        )
        .audience("api")
        .start(RemoteStart::StartEmpty);
        let v = TokenVerifier::builder().remote_issuer(r).build().unwrap();
        let d = format!("{v:?}");
        assert!(!SECRETS.iter().any(|s| d.contains(s)), "{d}");
        assert!(
            d.contains(r#"remote_issuers: ["https://idp.example.com/"]"#),
            "{d}"
        );
    }
}
