//! `TokenVerifier`: the whole verification path, key sources and their reload.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::TokenRejection;
use super::cache::{TokenCache, digest};
use super::keys::{Algorithm, KeySet, VerifyingKey, keys_from_jwks};
use super::parse::{DEFAULT_MAX_TOKEN_LEN, decode_part, parse_claims, parse_compact};
#[cfg(feature = "jwks-remote")]
use super::remote::{PrincipalClaim, RemoteHandle, RemoteIssuer};
use super::time::{
    LONGEST_LEEWAY, LONGEST_LIFETIME, check_times, secs_i64, to_system_time, unix_now,
};
use crate::reload::{self, FileSet, ReloadHandle};
use crate::{AuthMethod, ConfigError, Principal, Scopes};

/// Default maximum token lifetime (`exp - iat`): one hour.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Default clock-skew leeway: 30 seconds.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default number of verified tokens the cache holds.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// A token that passed every check: the [`Principal`] it grants and the claims the
/// audit log names. Never holds the token itself.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    principal: Principal,
    issuer: String,
    kid: Option<Arc<str>>,
    alg: Algorithm,
    jti: Option<String>,
    /// The `sub` claim when the principal id is another claim (the verified email);
    /// `None` when the principal id is the `sub`. Read by the access log.
    #[cfg_attr(not(feature = "access-log"), allow(dead_code))]
    sub: Option<String>,
    issued_at: i64,
    expires_at: i64,
    refused_from: i64,
}

impl VerifiedToken {
    /// The principal: id = `sub` (or the verified email, for a remote issuer mapped
    /// by email), method = [`AuthMethod::ServiceToken`], the scopes.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    /// The principal id: `sub`, or the verified email for a remote issuer mapped by
    /// email.
    pub fn subject(&self) -> &str {
        self.principal.id()
    }
    /// `iss`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// The `kid` of the key that verified the token, if it has one.
    pub fn key_id(&self) -> Option<&str> {
        self.kid.as_deref()
    }
    /// The algorithm of the key that verified the token.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
    /// `jti`, if present.
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }
    /// `iat`.
    pub fn issued_at(&self) -> SystemTime {
        to_system_time(self.issued_at)
    }
    /// `exp`.
    pub fn expires_at(&self) -> SystemTime {
        to_system_time(self.expires_at)
    }
    /// The first second (since the epoch) at which the verifier refuses the token:
    /// `exp` plus the leeway. The cache serves the token only before it.
    /// The `sub` claim (the principal id, unless an issuer maps principals by
    /// email).
    #[cfg(feature = "access-log")]
    pub(crate) fn sub_claim(&self) -> &str {
        self.sub.as_deref().unwrap_or_else(|| self.principal.id())
    }
    pub(crate) fn refused_from(&self) -> i64 {
        self.refused_from
    }
}

/// A key file the verifier loads at build time, and again when it changes while
/// [`TokenVerifier::watch_key_files`] runs or on [`TokenVerifier::reload`].
///
/// The file must be a regular file (symlinks are followed) of at most 1 MiB
/// ([`max_len`](Self::max_len)); see [`reload`] for how it is read
/// and what a reload guarantees.
///
/// ```
/// use portcullis::jwt::{Algorithm, KeyFile};
/// let pem = KeyFile::pem("/etc/svc/ci-signer.pub.pem", Algorithm::ES256).kid("ci-2026");
/// let jwks = KeyFile::jwks("/etc/svc/jwks.json").issuer("https://ci.example");
/// # let _ = (pem, jwks);
/// ```
#[derive(Clone, Debug)]
pub struct KeyFile {
    path: PathBuf,
    kind: KeyFileKind,
    kid: Option<Arc<str>>,
    issuer: Option<Arc<str>>,
    max_len: usize,
}

#[derive(Clone, Copy, Debug)]
enum KeyFileKind {
    Pem(Algorithm),
    Jwks,
}

impl KeyFile {
    /// A public key in PEM form, pinned to `alg` (see [`VerifyingKey::from_pem`]).
    pub fn pem(path: impl Into<PathBuf>, alg: Algorithm) -> Self {
        Self {
            path: path.into(),
            kind: KeyFileKind::Pem(alg),
            kid: None,
            issuer: None,
            max_len: reload::DEFAULT_MAX_FILE_LEN,
        }
    }

    /// A JWK Set or a single JWK (see [`KeySet::from_jwks`]); each key keeps its own
    /// `kid`. An `oct` (HMAC) key is refused unless the verifier is built with
    /// [`allow_symmetric_keys_from_files`](TokenVerifierBuilder::allow_symmetric_keys_from_files).
    pub fn jwks(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            kind: KeyFileKind::Jwks,
            kid: None,
            issuer: None,
            max_len: reload::DEFAULT_MAX_FILE_LEN,
        }
    }

    /// The `kid` of a PEM file's key (a JWK names its own).
    pub fn kid(mut self, kid: impl Into<Arc<str>>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// Binds every key of the file to one issuer (see [`VerifyingKey::issuer`]).
    pub fn issuer(mut self, iss: impl Into<Arc<str>>) -> Self {
        self.issuer = Some(iss.into());
        self
    }

    /// The largest file accepted, in bytes (default 1 MiB), at start-up and on every
    /// reload. Must be positive.
    pub fn max_len(mut self, bytes: usize) -> Self {
        self.max_len = bytes;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keys in `bytes`, read from this file.
    fn parse(&self, bytes: &[u8], symmetric: bool) -> Result<Vec<VerifyingKey>, ConfigError> {
        let named =
            |e: ConfigError| ConfigError::new(format!("key file {}: {e}", self.path.display()));
        let mut keys = match self.kind {
            KeyFileKind::Pem(alg) => {
                let mut k = VerifyingKey::from_pem(alg, bytes).map_err(named)?;
                k.kid = self.kid.clone();
                vec![k]
            }
            KeyFileKind::Jwks => {
                let text =
                    std::str::from_utf8(bytes).map_err(|_| named(ConfigError::new("not UTF-8")))?;
                keys_from_jwks(text).map_err(named)?
            }
        };
        if !symmetric && let Some(i) = keys.iter().position(|k| k.alg == Algorithm::HS256) {
            return Err(named(ConfigError::new(format!(
                "JWK {}: an `oct` (HMAC) key from a file needs allow_symmetric_keys_from_files() on the verifier builder",
                i + 1
            ))));
        }
        if let Some(iss) = &self.issuer {
            for k in &mut keys {
                k.issuer = Some(iss.clone());
            }
        }
        Ok(keys)
    }
}

/// The claim rules, fixed at build time.
struct Policy {
    /// The issuers whose keys are given in code or files.
    issuers: HashSet<Box<str>>,
    /// The rules of the tokens of `issuers`.
    local: IssuerPolicy,
    /// The issuers whose keys come from a URL, by `iss`: the index of their rules in
    /// `remote_policies` and of their keys in `State::remote`.
    remote: HashMap<Box<str>, usize>,
    remote_policies: Vec<IssuerPolicy>,
    leeway: i64,
    subjects: Option<HashSet<Box<str>>>,
    typ: Option<Box<str>>,
    max_len: usize,
    cache_capacity: usize,
}

/// The rules of one issuer's tokens: audiences, lifetime, principal mapping.
struct IssuerPolicy {
    audiences: Box<[Box<str>]>,
    max_lifetime: i64,
    /// The principal id is `email`, with `email_verified: true`; else `sub`.
    verified_email: bool,
    /// Scopes by principal id; then unmapped principals are refused and the token's
    /// own scopes ignored. `None`: scopes from `scope`/`scp`.
    static_scopes: Option<HashMap<Box<str>, Scopes>>,
}

/// The keys in force and the cache of tokens they verified: swapped as one, so a
/// key change empties the cache by construction.
struct State {
    /// The keys given in code and files; `None` when only remote issuers are trusted.
    keys: Option<KeySet>,
    /// The fetched keys of each remote issuer, `None` before the first fetch.
    remote: Box<[Option<RemoteSet>]>,
    cache: Option<TokenCache>,
}

/// The keys of one remote issuer, from one fetch.
#[derive(Clone)]
struct RemoteSet {
    keys: KeySet,
    /// The SHA-256 of the fetched document: an identical fetch changes nothing.
    #[cfg_attr(not(feature = "jwks-remote"), allow(dead_code))]
    digest: [u8; 32],
    /// The second (since the epoch) from which these keys are too stale to use;
    /// moved forward by every successful fetch.
    fresh_until: Arc<AtomicI64>,
}

/// Where the keys in force came from.
struct Sources {
    in_code: Vec<VerifyingKey>,
    /// The keys of each key file as last applied, in file order.
    from_files: Vec<Vec<VerifyingKey>>,
    /// The keys of each remote issuer as last fetched.
    remote: Vec<Option<RemoteSet>>,
    /// The algorithm of every key id ever in force, per key source (`None` for code
    /// and files, the remote issuer's index otherwise): a `kid` never changes
    /// algorithm (nor key type) for the life of the verifier, so a token cannot be
    /// checked with a former key's material under another algorithm.
    pinned: Pins,
}

type Pins = HashMap<(Option<usize>, Option<Arc<str>>), Algorithm>;

/// The key files and how they are read.
struct KeyFiles {
    files: Vec<KeyFile>,
    watched: Option<FileSet>,
    symmetric: bool,
}

pub(crate) struct Inner {
    policy: Policy,
    state: ArcSwap<State>,
    sources: Mutex<Sources>,
    key_files: KeyFiles,
    generation: AtomicU64,
    /// The fetch worker of each remote issuer, by index.
    #[cfg(feature = "jwks-remote")]
    remotes: Vec<RemoteHandle>,
}

/// Verifies service tokens (compact JWS, RFC 7515/7519) against a [`KeySet`] and
/// turns them into a [`Principal`].
///
/// Every check, in order: the length cap (before any decoding); three base64url
/// parts; a header without duplicate members or `crit`; a token whose `iss` names a
/// remote issuer (feature `jwks-remote`) goes to that issuer's fetched keys and
/// rules, any other to the keys given in code and files; the key named by `kid` (no
/// `kid` only with a single-key set); `alg` equal to that key's algorithm; `typ` when
/// required; the signature; then the claims, parsed strictly (integers for times, no
/// duplicate members): `exp`, `iat`, `iss`, `sub` and `aud` required, `iss` one of
/// the issuers (and the key's own issuer when it is bound to one), `aud` containing
/// the audience (a remote issuer's: one of its audiences), every time between 1970
/// and the end of the year 9999, `now` before
/// `exp + leeway` (a token is refused from the second equal to `exp` plus the
/// leeway), `iat` and `nbf` at most `now + leeway`, `iat` before `exp` and
/// `exp - iat` within the maximum lifetime, the subject in the allowed list when one
/// is set, and valid scope tokens in `scope` or `scp`. Arithmetic on times is
/// checked: no claim value can wrap around a rule.
///
/// A verified token is cached under the SHA-256 of its text until `exp + leeway`,
/// the second from which the checks above refuse it, so a reused token costs one
/// hash and one map lookup. The cache is bounded
/// ([`cache_capacity`](TokenVerifierBuilder::cache_capacity)) and is emptied whenever
/// the key set changes; a token verified with a remote issuer's keys is served from
/// it only while those keys are within their maximum staleness. Cloning a verifier is
/// cheap and shares keys and cache.
///
/// ```
/// use portcullis::jwt::{SigningKey, TokenIssuer, TokenVerifier, VerifyingKey};
/// use portcullis::AuthMethod;
///
/// let secret = [42u8; 32]; // in real code: from a secret store, never a literal
/// let verifier = TokenVerifier::builder()
///     .key(VerifyingKey::hs256(&secret)?.kid("k1"))
///     .issuer("https://ci.example")
///     .audience("jobs-api")
///     .build()?;
/// let issuer = TokenIssuer::builder(SigningKey::hs256(&secret)?.kid("k1"))
///     .issuer("https://ci.example")
///     .subject("scheduler")
///     .audience("jobs-api")
///     .scope("jobs:write")
///     .build()?;
///
/// let token = issuer.mint()?;
/// let principal = verifier.verify(token.as_str())?;
/// assert_eq!(principal.id(), "scheduler");
/// assert_eq!(principal.method(), AuthMethod::ServiceToken);
/// assert!(principal.scopes().contains("jobs:write"));
/// assert!(verifier.verify("not.a.token").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<Inner>,
}

impl TokenVerifier {
    /// Starts a builder: at least one key, one issuer and the audience are required.
    pub fn builder() -> TokenVerifierBuilder {
        TokenVerifierBuilder::default()
    }

    /// Verifies `token` (without the `Bearer ` prefix) and returns its principal.
    /// The error names only the class of the failure.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenRejection> {
        self.verify_token(token).map(|t| t.principal.clone())
    }

    /// Like [`verify`](Self::verify), returning the verified claims as well.
    ///
    /// Every call is an audit event: `service_token_accepted` or
    /// `service_token_rejected`. Behind an
    /// [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer), the acceptance
    /// is an audit event only with the layer's
    /// [`audit_successes`](crate::authenticate::AuthenticateLayer::audit_successes)
    /// (the access event records the token's `sub`, `jti` and `kid`).
    pub fn verify_token(&self, token: &str) -> Result<Arc<VerifiedToken>, TokenRejection> {
        self.verify_token_at(token, unix_now())
    }

    /// [`verify_token`](Self::verify_token), with `service_token_accepted` emitted
    /// only when `audit_success` (a refusal is always an audit event).
    pub(crate) fn verify_token_audited(
        &self,
        token: &str,
        audit_success: bool,
    ) -> Result<Arc<VerifiedToken>, TokenRejection> {
        self.verify_token_at_audited(token, unix_now(), audit_success)
    }

    /// [`verify_token`](Self::verify_token) with the clock read by the caller: `now`
    /// in seconds since the epoch. The one verification path; tests and the fuzz
    /// target fix the clock through it.
    pub(crate) fn verify_token_at(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<VerifiedToken>, TokenRejection> {
        self.verify_token_at_audited(token, now, true)
    }

    fn verify_token_at_audited(
        &self,
        token: &str,
        now: i64,
        audit_success: bool,
    ) -> Result<Arc<VerifiedToken>, TokenRejection> {
        let result = self.verify_inner(token, now);
        match &result {
            Ok(_) if !audit_success => {}
            Ok((t, cached)) => crate::audit::emit!(
            info,
            ServiceTokenAccepted,
                sub = &*crate::log_text::sanitize_id(t.subject()),
                iss = &*crate::log_text::sanitize_id(t.issuer()),
                kid = t.key_id().map(crate::log_text::sanitize_id).as_deref(),
                scopes = %t.principal.scopes(),
                jti = t.jti().map(crate::log_text::sanitize_id).as_deref(),
                cached = *cached,
            ),
            Err(reason) => {
                crate::audit::emit!(info, ServiceTokenRejected, reason = reason.as_str(),)
            }
        }
        result.map(|(t, _)| t)
    }

    fn verify_inner(
        &self,
        token: &str,
        now: i64,
    ) -> Result<(Arc<VerifiedToken>, bool), TokenRejection> {
        let policy = &self.inner.policy;
        if token.len() > policy.max_len {
            return Err(TokenRejection::TooLarge);
        }
        let state = self.inner.state.load();
        let d = state.cache.as_ref().map(|_| digest(token));
        if let (Some(cache), Some(d)) = (&state.cache, &d)
            && let Some(t) = cache.get(d, now)
        {
            return Ok((t, true));
        }
        let verified = Arc::new(check(policy, &state, token, now, |_i| {
            #[cfg(feature = "jwks-remote")]
            self.inner.remotes[_i].request_refetch();
        })?);
        if let (Some(cache), Some(d)) = (&state.cache, d) {
            cache.insert(d, now, verified.clone());
        }
        Ok((verified, false))
    }

    /// Re-reads every key file now and, when all load and pass the key rules, swaps
    /// in the new key set and empties the cache, without waiting for the files to
    /// settle (call it once they are complete). When any file fails, the keys in
    /// force stay, an audit event records the failure, and the error is returned.
    /// Without key files this does nothing.
    pub fn reload(&self) -> Result<(), ConfigError> {
        reload::reload_now(&*self.inner)
    }

    /// Replaces the keys given in code (key files stay) and empties the cache. As on
    /// every change of the key set, a `kid` that was ever in force must keep its
    /// algorithm. A watched key file that was refused for clashing with the keys
    /// replaced is judged again at the next poll.
    pub fn replace_keys(
        &self,
        keys: impl IntoIterator<Item = VerifyingKey>,
    ) -> Result<(), ConfigError> {
        let mut sources = self
            .inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let result = self
            .inner
            .install(&mut sources, Some(keys.into_iter().collect()), None);
        drop(sources);
        match result {
            Ok(count) => {
                crate::audit::emit!(info, ServiceTokenKeysReplaced, keys = count,);
                // A key file refused for clashing with the keys replaced (a `kid`
                // both used) is judged again at the next poll, not left out, with
                // the keys it removed still in force, until it changes.
                if let Some(files) = &self.inner.key_files.watched {
                    files.rejudge();
                }
                Ok(())
            }
            Err(e) => {
                crate::audit::emit!(
                error,
                ServiceTokenKeysReplaceFailed,
                        error = %e,
                        "the previous key set stays in force"
                    );
                Err(e)
            }
        }
    }

    /// Polls the key files every `interval` on a background thread and swaps in each
    /// settled change (see [`reload`] for the guarantees). Reloading
    /// stops when the returned handle is dropped, or when the last clone of this
    /// verifier is.
    ///
    /// Errors: the verifier has no key files, `interval` is zero, or the thread
    /// cannot be started.
    pub fn watch_key_files(&self, interval: Duration) -> Result<ReloadHandle, ConfigError> {
        reload::watch(&self.inner, interval)
    }

    /// One poll of the key files' watcher, now (tests drive it without a thread).
    #[cfg(test)]
    pub(crate) fn poll_key_files(&self) {
        reload::poll(&*self.inner);
    }

    /// Number of keys in force.
    /// Introspection for the tests and benchmarks; hidden, not part of the API.
    #[doc(hidden)]
    pub fn key_count(&self) -> usize {
        let state = self.inner.state.load();
        state.keys.as_ref().map_or(0, KeySet::len)
            + state
                .remote
                .iter()
                .flatten()
                .map(|r| r.keys.len())
                .sum::<usize>()
    }

    /// How many times the key set was replaced since the verifier was built.
    /// Introspection for the tests and benchmarks; hidden, not part of the API.
    #[doc(hidden)]
    pub fn key_generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// Number of tokens in the verified-token cache.
    /// Introspection for the tests and benchmarks; hidden, not part of the API.
    #[doc(hidden)]
    pub fn cached_tokens(&self) -> usize {
        self.inner
            .state
            .load()
            .cache
            .as_ref()
            .map_or(0, TokenCache::len)
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.inner.policy;
        let mut d = f.debug_struct("TokenVerifier");
        d.field("issuers", &p.issuers)
            .field("audiences", &p.local.audiences);
        // Remote issuers exist only with the feature; their names are URLs.
        #[cfg(feature = "jwks-remote")]
        d.field(
            "remote_issuers",
            &p.remote
                .keys()
                .map(|k| super::oidc::ShownUrl(k))
                .collect::<Vec<_>>(),
        );
        d.field("keys", &self.inner.state.load().keys)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Swaps in the key set made of the keys in code and from files, each either new
    /// or the ones in force, if it is valid and no `kid` changes algorithm. Returns the
    /// number of keys in force.
    fn install(
        &self,
        sources: &mut Sources,
        in_code: Option<Vec<VerifyingKey>>,
        from_files: Option<Vec<Vec<VerifyingKey>>>,
    ) -> Result<usize, ConfigError> {
        let in_code = in_code.unwrap_or_else(|| sources.in_code.clone());
        let from_files = from_files.unwrap_or_else(|| sources.from_files.clone());
        let keys = combine(&self.policy, &in_code, &from_files)?;
        let pinned = match &keys {
            Some(k) => pin(&sources.pinned, None, k)?,
            None => sources.pinned.clone(),
        };
        let count = keys.as_ref().map_or(0, KeySet::len);
        sources.in_code = in_code;
        sources.from_files = from_files;
        sources.pinned = pinned;
        self.publish(sources, keys);
        Ok(count)
    }

    /// Stores a new state made of `keys` and the remote sets of `sources`, with an
    /// empty cache.
    fn publish(&self, sources: &Sources, keys: Option<KeySet>) {
        self.state.store(Arc::new(State {
            keys,
            remote: sources.remote.clone().into_boxed_slice(),
            cache: TokenCache::new(self.policy.cache_capacity),
        }));
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Installs the keys fetched for remote issuer `index`, fresh until
    /// `fresh_until`. An identical document only extends the freshness; a different
    /// one replaces the issuer's whole set (keys removed upstream stop verifying)
    /// and empties the cache. Refused when a `kid` changes algorithm.
    #[cfg(feature = "jwks-remote")]
    pub(crate) fn install_remote(
        &self,
        index: usize,
        keys: Vec<VerifyingKey>,
        digest: [u8; 32],
        fresh_until: i64,
    ) -> Result<(), ConfigError> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = &sources.remote[index]
            && current.digest == digest
        {
            current.fresh_until.store(fresh_until, Ordering::Release);
            return Ok(());
        }
        let set = KeySet::new(keys)?;
        let pinned = pin(&sources.pinned, Some(index), &set)?;
        let count = set.len();
        sources.remote[index] = Some(RemoteSet {
            keys: set,
            digest,
            fresh_until: Arc::new(AtomicI64::new(fresh_until)),
        });
        sources.pinned = pinned;
        let local = self.state.load().keys.clone();
        self.publish(&sources, local);
        drop(sources);
        crate::audit::emit!(
            info,
            RemoteKeysUpdated,
            issuer = &*crate::log_text::sanitize_id(
                &super::oidc::ShownUrl(self.policy.remote_name(index)).to_string()
            ),
            keys = count,
        );
        Ok(())
    }
}

impl Policy {
    #[cfg(feature = "jwks-remote")]
    fn remote_name(&self, index: usize) -> &str {
        self.remote
            .iter()
            .find(|(_, i)| **i == index)
            .map_or("", |(name, _)| name)
    }
}

impl reload::Source for Inner {
    const NAME: &'static str = "service_tokens";
    type Parsed = Vec<Vec<VerifyingKey>>;

    fn files(&self) -> Option<&FileSet> {
        self.key_files.watched.as_ref()
    }

    fn parse(&self, contents: &[&[u8]]) -> Result<Self::Parsed, ConfigError> {
        parse_files(&self.key_files, contents)
    }

    fn swap(&self, from_files: Self::Parsed) -> Result<usize, ConfigError> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        self.install(&mut sources, None, Some(from_files))
    }
}

fn parse_files(
    files: &KeyFiles,
    contents: &[&[u8]],
) -> Result<Vec<Vec<VerifyingKey>>, ConfigError> {
    files
        .files
        .iter()
        .zip(contents)
        .map(|(f, bytes)| f.parse(bytes, files.symmetric))
        .collect()
}

/// The key set of the keys in code and from files; a key bound to an issuer must be
/// bound to one of the verifier's. `None` when the verifier trusts remote issuers
/// only (then no such key may be given).
fn combine(
    policy: &Policy,
    in_code: &[VerifyingKey],
    from_files: &[Vec<VerifyingKey>],
) -> Result<Option<KeySet>, ConfigError> {
    let keys: Vec<VerifyingKey> = in_code
        .iter()
        .chain(from_files.iter().flatten())
        .cloned()
        .collect();
    if policy.issuers.is_empty() {
        if keys.is_empty() && !policy.remote.is_empty() {
            return Ok(None);
        }
        return Err(ConfigError::new(
            "keys given in code or files need an issuer: add it with issuer()",
        ));
    }
    for (i, k) in keys.iter().enumerate() {
        if let Some(iss) = &k.issuer
            && !policy.issuers.contains(&**iss)
        {
            return Err(ConfigError::new(format!(
                "key {}: its bound issuer is not one of the verifier's issuers",
                i + 1
            )));
        }
    }
    KeySet::new(keys).map(Some)
}

/// `pinned` plus the keys of `set`, or an error naming the first `kid` whose
/// algorithm differs from the one it was pinned to. The `kid` comes from a key file
/// or a fetched document and the error goes to the audit log: it is escaped there
/// as every key id is (`log_text`), so it cannot forge a log line.
fn pin(pinned: &Pins, source: Option<usize>, set: &KeySet) -> Result<Pins, ConfigError> {
    let mut next = pinned.clone();
    for key in set.iter() {
        let was = *next.entry((source, key.kid.clone())).or_insert(key.alg);
        if was != key.alg {
            let name = key
                .kid
                .as_deref()
                .map_or("the key without a kid".to_owned(), |k| {
                    format!("kid `{}`", crate::log_text::sanitize_id(k))
                });
            return Err(ConfigError::new(format!(
                "{name} was {was} and would become {}: a key id never changes algorithm; publish the new key under a new kid",
                key.alg
            )));
        }
    }
    Ok(next)
}

/// `typ` comparison per RFC 7515 §4.1.9: case-insensitive, `application/` optional.
fn typ_matches(got: &str, want: &str) -> bool {
    let strip = |s: &str| -> String {
        let l = s.to_ascii_lowercase();
        l.strip_prefix("application/")
            .map(str::to_owned)
            .unwrap_or(l)
    };
    strip(got) == strip(want)
}

/// The cold path: every check of [`TokenVerifier`], no cache, no logging.
/// `unknown_remote_kid` is called with a remote issuer's index when its set lacks
/// the token's `kid`.
fn check(
    policy: &Policy,
    state: &State,
    token: &str,
    now: i64,
    unknown_remote_kid: impl FnOnce(usize),
) -> Result<VerifiedToken, TokenRejection> {
    use TokenRejection as R;
    let parsed = parse_compact(token, policy.max_len)?;
    // The issuer selects the keys and the rules before any key is tried: a token
    // whose `iss` names a remote issuer is checked with that issuer's keys and rules
    // only; every other token with the keys given in code and files (its `iss` is
    // checked after the signature, as every claim). Nothing read from the payload is
    // trusted before the signature verifies; the payload is parsed by the same
    // strict parser, whose errors are reported after the signature check.
    let claims = decode_part(parsed.payload_b64).and_then(|p| parse_claims(&p));
    let remote_index = match &claims {
        Ok(c) => c
            .iss
            .as_deref()
            .and_then(|iss| policy.remote.get(iss))
            .copied(),
        Err(_) => None,
    };
    let (keys, rules, fresh_until, remote) = match (remote_index, &state.keys) {
        (Some(i), _) => {
            let set = state.remote[i].as_ref().ok_or(R::KeysUnavailable)?;
            let fresh_until = set.fresh_until.load(Ordering::Acquire);
            if now >= fresh_until {
                return Err(R::KeysUnavailable);
            }
            (&set.keys, &policy.remote_policies[i], fresh_until, Some(i))
        }
        (None, Some(keys)) => (keys, &policy.local, i64::MAX, None),
        (None, None) => return Err(claims.err().unwrap_or(R::WrongIssuer)),
    };
    let key = match keys.select(parsed.header.kid.as_deref()) {
        Ok(key) => key,
        Err(e) => {
            if let Some(i) = remote {
                unknown_remote_kid(i);
            }
            return Err(e);
        }
    };
    if parsed.header.alg != key.alg.as_str() {
        return Err(R::AlgorithmMismatch);
    }
    if let Some(want) = &policy.typ {
        match &parsed.header.typ {
            Some(got) if typ_matches(got, want) => {}
            _ => return Err(R::WrongType),
        }
    }
    match jsonwebtoken::crypto::verify(
        parsed.signature_b64,
        parsed.signing_input.as_bytes(),
        &key.key,
        key.alg.to_jwt(),
    ) {
        Ok(true) => {}
        _ => return Err(R::BadSignature),
    }
    let claims = claims?;
    let (Some(exp), Some(iat), Some(iss), Some(sub), Some(aud)) =
        (claims.exp, claims.iat, claims.iss, claims.sub, claims.aud)
    else {
        return Err(R::MissingClaim);
    };
    if remote.is_none()
        && (!policy.issuers.contains(iss.as_str())
            || key.issuer.as_deref().is_some_and(|b| b != iss))
    {
        return Err(R::WrongIssuer);
    }
    if !aud
        .iter()
        .any(|a| rules.audiences.iter().any(|want| **want == **a))
    {
        return Err(R::WrongAudience);
    }
    let refused_from = check_times(exp, iat, claims.nbf, now, policy.leeway, rules.max_lifetime)?;
    let (id, sub) = if rules.verified_email {
        let email = claims.email.ok_or(R::MissingClaim)?;
        if claims.email_verified != Some(true) {
            return Err(R::EmailNotVerified);
        }
        (email, Some(sub))
    } else {
        (sub, None)
    };
    if policy
        .subjects
        .as_ref()
        .is_some_and(|s| !s.contains(id.as_str()))
    {
        return Err(R::SubjectNotAllowed);
    }
    let scopes = match (&rules.static_scopes, claims.scopes) {
        (Some(map), _) => map.get(id.as_str()).ok_or(R::SubjectNotAllowed)?.clone(),
        (None, Some(s)) => Scopes::from_iter_checked(s).map_err(|_| R::InvalidClaims)?,
        (None, None) => Scopes::default(),
    };
    Ok(VerifiedToken {
        principal: Principal::new(id, AuthMethod::ServiceToken).with_scopes(scopes),
        issuer: iss,
        kid: key.kid.clone(),
        alg: key.alg,
        jti: claims.jti,
        sub,
        issued_at: iat,
        expires_at: exp,
        // The cache serves the token only while the keys that verified it are fresh.
        refused_from: refused_from.min(fresh_until),
    })
}

/// Builds a [`TokenVerifier`]; see [`TokenVerifier::builder`].
#[derive(Debug)]
pub struct TokenVerifierBuilder {
    keys: Vec<VerifyingKey>,
    files: Vec<KeyFile>,
    symmetric_from_files: bool,
    issuers: Vec<String>,
    audience: Option<String>,
    max_lifetime: Duration,
    leeway: Duration,
    subjects: Option<Vec<String>>,
    typ: Option<String>,
    max_len: usize,
    cache_capacity: usize,
    #[cfg(feature = "jwks-remote")]
    remote: Vec<RemoteIssuer>,
}

impl Default for TokenVerifierBuilder {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            files: Vec::new(),
            symmetric_from_files: false,
            issuers: Vec::new(),
            audience: None,
            max_lifetime: DEFAULT_MAX_LIFETIME,
            leeway: DEFAULT_LEEWAY,
            subjects: None,
            typ: None,
            max_len: DEFAULT_MAX_TOKEN_LEN,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            #[cfg(feature = "jwks-remote")]
            remote: Vec::new(),
        }
    }
}

impl TokenVerifierBuilder {
    /// Adds a key given in code.
    pub fn key(mut self, key: VerifyingKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Adds every key of a set.
    pub fn keys(mut self, keys: KeySet) -> Self {
        self.keys.extend(keys.iter().cloned());
        self
    }

    /// Adds a key file, loaded at build time and on every reload.
    pub fn key_file(mut self, file: KeyFile) -> Self {
        self.files.push(file);
        self
    }

    /// Accepts `oct` (HMAC, HS256) keys in JWK / JWKS key files. Off by default: a
    /// key file normally holds public keys only, and a secret in a file is one more
    /// copy of it to protect. HMAC keys given in code are always accepted.
    pub fn allow_symmetric_keys_from_files(mut self) -> Self {
        self.symmetric_from_files = true;
        self
    }

    /// Trusts an issuer whose keys are fetched from a URL, with its own audiences
    /// and principal mapping (see [`RemoteIssuer`]). A token whose `iss` is this
    /// issuer is checked against its keys and rules only. Its issuer must differ
    /// from every other issuer of the verifier.
    #[cfg(feature = "jwks-remote")]
    pub fn remote_issuer(mut self, issuer: RemoteIssuer) -> Self {
        self.remote.push(issuer);
        self
    }

    /// Accepts tokens from this issuer (`iss`), verified with the keys given in code
    /// and files. At least one issuer is required, this one or a remote one.
    pub fn issuer(mut self, iss: impl Into<String>) -> Self {
        self.issuers.push(iss.into());
        self
    }

    /// Our audience for the issuers of [`issuer`](Self::issuer): `aud` must contain
    /// it. Required with them (a remote issuer has its own).
    pub fn audience(mut self, aud: impl Into<String>) -> Self {
        self.audience = Some(aud.into());
        self
    }

    /// Longest accepted `exp - iat` (default one hour, at most one day).
    pub fn max_lifetime(mut self, d: Duration) -> Self {
        self.max_lifetime = d;
        self
    }

    /// Clock-skew allowance for `exp`, `nbf` and `iat` (default 30 s, at most 5 min).
    pub fn leeway(mut self, d: Duration) -> Self {
        self.leeway = d;
        self
    }

    /// Accepts only these principals, e.g. the names of the calling services: the
    /// `sub`, or the email for a remote issuer mapped by
    /// [`PrincipalClaim::VerifiedEmail`](super::PrincipalClaim::VerifiedEmail).
    pub fn allowed_subjects<I, S>(mut self, subjects: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.subjects = Some(subjects.into_iter().map(Into::into).collect());
        self
    }

    /// Requires the header `typ` (e.g. `JWT` or `at+jwt`; case-insensitive, with or
    /// without `application/`), so tokens minted for another purpose are refused
    /// (RFC 8725 §3.11).
    pub fn required_type(mut self, typ: impl Into<String>) -> Self {
        self.typ = Some(typ.into());
        self
    }

    /// Longest token accepted, checked before any decoding (default 8 KiB; 256 B to
    /// 64 KiB).
    pub fn max_token_len(mut self, len: usize) -> Self {
        self.max_len = len;
        self
    }

    /// Bound of the verified-token cache, in tokens (default 10 000; 0 disables it).
    pub fn cache_capacity(mut self, n: usize) -> Self {
        self.cache_capacity = n;
        self
    }

    /// Checks the configuration, loads the keys and runs a sign-and-verify self-test
    /// of the crypto backend.
    pub fn build(self) -> Result<TokenVerifier, ConfigError> {
        #[cfg(feature = "jwks-remote")]
        let has_remote = !self.remote.is_empty();
        #[cfg(not(feature = "jwks-remote"))]
        let has_remote = false;
        if (self.issuers.is_empty() && !has_remote) || self.issuers.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                "at least one non-empty issuer is required",
            ));
        }
        let audience = match self.audience {
            Some(a) if !a.is_empty() => Some(a),
            _ if self.issuers.is_empty() => None,
            _ => return Err(ConfigError::new("the audience is required")),
        };
        if self.max_lifetime < Duration::from_secs(1) || self.max_lifetime > LONGEST_LIFETIME {
            return Err(ConfigError::new(
                "max_lifetime must be between 1 s and 24 h",
            ));
        }
        if self.leeway > LONGEST_LEEWAY {
            return Err(ConfigError::new("leeway must be at most 5 minutes"));
        }
        if !(256..=64 * 1024).contains(&self.max_len) {
            return Err(ConfigError::new(
                "max_token_len must be between 256 B and 64 KiB",
            ));
        }
        if self.subjects.as_ref().is_some_and(Vec::is_empty) {
            return Err(ConfigError::new(
                "allowed_subjects is empty: no token could pass",
            ));
        }
        crypto_self_test()?;
        #[cfg(feature = "jwks-remote")]
        let (remote, remote_policies, fetchers) = remote_policies(
            &self.remote,
            &self.issuers,
            self.max_lifetime,
            self.subjects.is_some(),
        )?;
        #[cfg(not(feature = "jwks-remote"))]
        let (remote, remote_policies) = (HashMap::new(), Vec::new());
        let remote_count = remote_policies.len();
        let policy = Policy {
            issuers: self.issuers.into_iter().map(Into::into).collect(),
            local: IssuerPolicy {
                audiences: audience.into_iter().map(Into::into).collect(),
                max_lifetime: secs_i64(self.max_lifetime),
                verified_email: false,
                static_scopes: None,
            },
            remote,
            remote_policies,
            leeway: secs_i64(self.leeway),
            subjects: self
                .subjects
                .map(|s| s.into_iter().map(Into::into).collect()),
            typ: self.typ.map(Into::into),
            max_len: self.max_len,
            cache_capacity: self.cache_capacity,
        };
        if let Some(f) = self.files.iter().find(|f| f.max_len == 0) {
            return Err(ConfigError::new(format!(
                "key file {}: the size limit must be positive",
                f.path.display()
            )));
        }
        let key_files = KeyFiles {
            watched: FileSet::new(
                self.files
                    .iter()
                    .map(|f| (f.path.clone(), f.max_len))
                    .collect(),
            ),
            files: self.files,
            symmetric: self.symmetric_from_files,
        };
        // The first load reads the files as every reload does.
        let snapshot = key_files
            .watched
            .as_ref()
            .map(FileSet::read_all)
            .transpose()?;
        let from_files = match &snapshot {
            Some(s) => parse_files(&key_files, &s.bytes())?,
            None => Vec::new(),
        };
        let keys = combine(&policy, &self.keys, &from_files)?;
        let pinned = match &keys {
            Some(k) => pin(&HashMap::new(), None, k)?,
            None => HashMap::new(),
        };
        if let (Some(watched), Some(snapshot)) = (&key_files.watched, &snapshot) {
            watched.loaded(snapshot);
        }
        let cache = TokenCache::new(policy.cache_capacity);
        #[cfg(feature = "jwks-remote")]
        let (handles, pending): (Vec<_>, Vec<_>) =
            (0..remote_count).map(|_| super::remote::channel()).unzip();
        let inner = Arc::new(Inner {
            policy,
            state: ArcSwap::from_pointee(State {
                keys,
                remote: vec![None; remote_count].into_boxed_slice(),
                cache,
            }),
            sources: Mutex::new(Sources {
                in_code: self.keys,
                from_files,
                remote: vec![None; remote_count],
                pinned,
            }),
            key_files,
            generation: AtomicU64::new(0),
            #[cfg(feature = "jwks-remote")]
            remotes: handles,
        });
        #[cfg(feature = "jwks-remote")]
        for (i, (fetcher, pending)) in fetchers.into_iter().zip(pending).enumerate() {
            super::remote::start(&inner, i, fetcher, pending)?;
        }
        Ok(TokenVerifier { inner })
    }
}

/// The rules and fetchers of the remote issuers, checked: each issuer once, none
/// also given with `issuer()`, Google-style issuers with their callers listed.
#[cfg(feature = "jwks-remote")]
#[allow(clippy::type_complexity)]
fn remote_policies(
    remote: &[RemoteIssuer],
    local: &[String],
    max_lifetime: Duration,
    has_subjects: bool,
) -> Result<
    (
        HashMap<Box<str>, usize>,
        Vec<IssuerPolicy>,
        Vec<super::remote::Fetcher>,
    ),
    ConfigError,
> {
    let mut by_name = HashMap::new();
    let mut policies = Vec::new();
    let mut fetchers = Vec::new();
    for (i, r) in remote.iter().enumerate() {
        let err = |what: &str| {
            let issuer = super::oidc::ShownUrl(&r.issuer);
            ConfigError::new(format!("remote issuer {issuer}: {what}"))
        };
        if local.contains(&r.issuer) || by_name.insert(r.issuer.clone().into(), i).is_some() {
            return Err(err("configured twice"));
        }
        let fetcher = r.fetcher()?;
        if r.needs_principal_list && r.static_scopes.is_none() && !has_subjects {
            return Err(err(
                "any account of this provider can get a token for any audience: list the callers with scopes_for() or allowed_subjects()",
            ));
        }
        let static_scopes = match &r.static_scopes {
            None => None,
            Some(list) => {
                let mut map = HashMap::new();
                for (principal, scopes) in list {
                    if principal.is_empty() {
                        return Err(err("scopes_for: an empty principal"));
                    }
                    if map
                        .insert(principal.as_str().into(), Scopes::parse(scopes)?)
                        .is_some()
                    {
                        return Err(err("scopes_for: a principal is mapped twice"));
                    }
                }
                Some(map)
            }
        };
        policies.push(IssuerPolicy {
            audiences: r.audiences.iter().map(|a| a.as_str().into()).collect(),
            max_lifetime: secs_i64(r.max_lifetime.unwrap_or(max_lifetime)),
            verified_email: r.id_claim == PrincipalClaim::VerifiedEmail,
            static_scopes,
        });
        fetchers.push(fetcher);
    }
    Ok((by_name, policies, fetchers))
}

/// `jsonwebtoken` needs exactly one crypto backend feature; with both or neither
/// (features merge across a dependency graph) it panics on every use. Fail at build
/// time instead.
pub(crate) fn crypto_self_test() -> Result<(), ConfigError> {
    use jsonwebtoken::{DecodingKey, EncodingKey};
    let ok = std::panic::catch_unwind(|| {
        let secret = [0x5a_u8; 32];
        let alg = jsonwebtoken::Algorithm::HS256;
        let sig = jsonwebtoken::crypto::sign(b"self-test", &EncodingKey::from_secret(&secret), alg)
            .ok()?;
        jsonwebtoken::crypto::verify(&sig, b"self-test", &DecodingKey::from_secret(&secret), alg)
            .ok()
    });
    match ok {
        Ok(Some(true)) => Ok(()),
        _ => Err(ConfigError::new(
            "the jsonwebtoken crypto backend failed its self-test: enable exactly one of its `rust_crypto` and `aws_lc_rs` features",
        )),
    }
}
