//! API keys: the key format, the hashed key store, the key file and its hot reload.
//!
//! # Keys
//!
//! A generated key is `<prefix>_<random><checksum>`, e.g.
//! `pc_live_EXAMPLExDOxNOTxUSE00000bJVDo`: a prefix naming its kind (default `pc_live`),
//! 22 base62 characters from the OS CSPRNG (130 bits), and a 6-character base62 CRC32
//! of everything before it. The checksum rejects typos and garbage before any lookup
//! and lets secret scanners recognise leaked keys; it is not a security control.
//! Generate keys with [`generate_key`] or `portcullis keygen`.
//!
//! Only the SHA-256 [`KeyDigest`] of a key is stored. A [`KeyStore`] maps digests to
//! [`KeyRecord`]s (public id, scopes, tier, validity window, revocation) and verifies a
//! presented key in O(1), confirming with a constant-time comparison.
//!
//! # The key file
//!
//! ```toml
//! # Written by `portcullis keygen`; holds digests only.
//! [[keys]]
//! id = "billing"                       # public: logs, audit events, rate limiting
//! digest = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! scopes = ["jobs:read", "jobs:write"]
//! tier = "gold"                        # optional rate-limit tier
//! not_before = 2026-01-01T00:00:00Z    # optional
//! expires_at = 2027-01-01T00:00:00Z    # optional
//! revoked = false                      # optional
//! allowed_ips = ["10.0.0.0/8"]         # optional: accepted only from these addresses
//! credits = 10000                      # optional: requests allowed in all
//! ```
//!
//! `allowed_ips` is checked by the authentication layer against the resolved
//! [`ClientIp`](crate::ClientIp) once the key is verified: from elsewhere the key is
//! refused with 403, as the global allowlist refuses (`key_ip_denied` in the logs).
//! `credits` are spent one per request by the
//! [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) (see its
//! [module docs](crate::rate_limit#usage-credits)); without the `rate-limit` feature
//! a key with credits is a load error, never an unlimited key.
//!
//! Rotation is overlap: add the new key (it may share the id), move the client over,
//! then revoke or delete the old one. A broken file is rejected as a whole, with the
//! line and column of the problem and never a value from the file.
//!
//! # Reloading
//!
//! [`ApiKeys`] is the handle the authentication layer holds. Built from a file
//! ([`ApiKeys::from_file`]), it follows the file while the [`ReloadHandle`] of
//! [`ApiKeys::watch_key_file`] lives, and reloads on demand ([`ApiKeys::reload`]). A
//! new file is parsed and validated in full, then swapped in atomically; requests in
//! flight finish with the store they started with. A file that cannot be read or is
//! invalid keeps the old store and is an audit event. What a reload guarantees (every
//! change seen, only settled content applied, bounded non-blocking reads) and how to
//! write the file safely (a temporary file in the same directory, renamed over the
//! old one) is in [`reload`].
//!
//! ```
//! use std::time::SystemTime;
//! use portcullis::api_key::{generate_key, ApiKeys, KeyStore};
//!
//! let key = generate_key("pc_test")?;
//! let file = format!(
//!     "[[keys]]\nid = \"billing\"\ndigest = \"{}\"\nscopes = [\"jobs:read\"]\n",
//!     key.digest()
//! );
//! let keys = ApiKeys::new(KeyStore::from_toml(&file)?);
//! let principal = keys.verify(key.expose_secret()).unwrap();
//! assert_eq!(principal.id(), "billing");
//! assert!(principal.scopes().contains("jobs:read"));
//! # Ok::<(), portcullis::ConfigError>(())
//! ```

mod digest;
mod file;
mod format;
mod record;
mod store;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

pub use digest::KeyDigest;
pub use format::{
    DEFAULT_PREFIX, GeneratedKey, KeyFormatError, check_key, check_prefix, generate_key,
};
pub(crate) use format::{MAX_KEY_LEN, parse_key};
#[cfg(feature = "rate-limit")]
pub(crate) use record::Credits;
pub(crate) use record::KeyPolicy;
pub use record::KeyRecord;
pub use store::{KeyRejection, KeyStore};

use crate::reload::{self, FileSet, ReloadHandle};
use crate::{ConfigError, Principal};

/// A shared, reloadable key store: what [`AuthenticateLayer`](crate::authenticate::AuthenticateLayer) verifies against.
///
/// Cloning is cheap and every clone sees the same store. A lookup reads the current
/// store without locking (an atomic pointer load).
#[derive(Clone)]
pub struct ApiKeys {
    shared: Arc<Shared>,
}

struct Shared {
    current: ArcSwap<KeyStore>,
    /// The key file, for stores loaded from one.
    file: Option<FileSet>,
}

impl ApiKeys {
    /// A fixed store, never reloaded.
    pub fn new(store: KeyStore) -> Self {
        Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(store),
                file: None,
            }),
        }
    }

    /// Loads a TOML key file of at most 1 MiB. A missing, unreadable, oversized,
    /// invalid or empty file, or a path that is not a regular file (a FIFO, a device,
    /// a directory), is an error. Call [`ApiKeys::watch_key_file`] to follow changes.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        Self::from_file_with_max_len(path, reload::DEFAULT_MAX_FILE_LEN)
    }

    /// [`from_file`](Self::from_file) with another limit on the file's size, in bytes,
    /// which applies to every reload too (a digest entry takes about 100 bytes).
    pub fn from_file_with_max_len(
        path: impl Into<PathBuf>,
        max_len: usize,
    ) -> Result<Self, ConfigError> {
        if max_len == 0 {
            return Err(ConfigError::new("the key file size limit must be positive"));
        }
        let path = path.into();
        let file = FileSet::new(vec![(path.clone(), max_len)])
            .ok_or_else(|| ConfigError::new("no key file"))?;
        let snapshot = file.read_all()?;
        let store = KeyStore::from_file_bytes(&path, snapshot.bytes()[0])?;
        file.loaded(&snapshot);
        Ok(Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(store),
                file: Some(file),
            }),
        })
    }

    /// Polls the key file every `interval` from a background thread and swaps in
    /// each settled change: a revoked key stops working about two intervals after
    /// the file is written (see [`reload`] for the guarantees). The
    /// returned handle keeps the thread running: reloading stops when it is dropped,
    /// or when the last clone of this `ApiKeys` is.
    ///
    /// Errors: the store was not loaded from a file, `interval` is zero, or the
    /// thread cannot be started.
    pub fn watch_key_file(&self, interval: Duration) -> Result<ReloadHandle, ConfigError> {
        reload::watch(&self.shared, interval)
    }

    /// Re-reads the key file now and swaps it in if it is valid, without waiting for
    /// it to settle (call it once the file is complete). On error the old store stays
    /// and the error (with the file position) is returned and audited. For a fixed
    /// store this does nothing and returns `Ok`.
    pub fn reload(&self) -> Result<(), ConfigError> {
        reload::reload_now(&*self.shared)
    }

    /// The current store.
    pub fn snapshot(&self) -> Arc<KeyStore> {
        self.shared.current.load_full()
    }

    /// Verifies a presented key against the current store at the current time.
    pub fn verify(&self, key: &str) -> Result<Principal, KeyRejection> {
        self.verify_with_policy(key).map(|(p, _)| p)
    }

    /// [`verify`](Self::verify), with the key's own policy (allowed addresses,
    /// credits) for the layers that enforce it.
    pub(crate) fn verify_with_policy(
        &self,
        key: &str,
    ) -> Result<(Principal, Option<Arc<KeyPolicy>>), KeyRejection> {
        self.shared.current.load().verify_at(key, SystemTime::now)
    }
}

impl reload::Source for Shared {
    const NAME: &'static str = "api_keys";
    type Parsed = KeyStore;

    fn files(&self) -> Option<&FileSet> {
        self.file.as_ref()
    }

    fn parse(&self, contents: &[&[u8]]) -> Result<KeyStore, ConfigError> {
        let (Some(file), [bytes]) = (&self.file, contents) else {
            return Err(ConfigError::new("the key store has no key file"));
        };
        KeyStore::from_file_bytes(file.path(0), bytes)
    }

    fn swap(&self, store: KeyStore) -> Result<usize, ConfigError> {
        let keys = store.len();
        self.current.store(Arc::new(store));
        Ok(keys)
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ApiKeys");
        d.field("keys", &self.shared.current.load().len());
        if let Some(file) = &self.shared.file {
            d.field("file", &file.path(0));
        }
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, key: &GeneratedKey, extra: &str) -> String {
        format!(
            "[[keys]]\nid = \"{id}\"\ndigest = \"{}\"\n{extra}\n",
            key.digest()
        )
    }

    #[test]
    fn reload_swaps_valid_files_and_keeps_the_old_store_on_errors() {
        let dir =
            std::env::temp_dir().join(format!("portcullis-reload-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        let a = generate_key("pc_test").unwrap();
        let b = generate_key("pc_test").unwrap();
        std::fs::write(&path, entry("a", &a, "")).unwrap();
        let keys = ApiKeys::from_file(&path).unwrap();
        assert!(keys.verify(a.expose_secret()).is_ok());
        assert!(keys.verify(b.expose_secret()).is_err());

        std::fs::write(
            &path,
            entry("a", &a, "revoked = true") + &entry("b", &b, ""),
        )
        .unwrap();
        keys.reload().unwrap();
        assert!(keys.verify(a.expose_secret()).is_err());
        assert!(keys.verify(b.expose_secret()).is_ok());

        std::fs::write(&path, "[[keys]]\nid = \"broken\n").unwrap();
        let e = keys.reload().unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(keys.verify(b.expose_secret()).is_ok(), "old store kept");
        assert_eq!(keys.snapshot().len(), 2);

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(keys.reload().is_err(), "a missing file keeps the old store");
        assert!(keys.verify(b.expose_secret()).is_ok());
        assert!(keys.watch_key_file(Duration::ZERO).is_err());
        assert!(ApiKeys::from_file_with_max_len(&path, 0).is_err());
    }

    #[test]
    fn watching_needs_a_file_and_an_interval() {
        let k = generate_key("pc_test").unwrap();
        let keys = ApiKeys::new(
            KeyStore::from_records([KeyRecord::new("k", k.digest()).unwrap()]).unwrap(),
        );
        assert!(keys.watch_key_file(Duration::from_secs(1)).is_err());
        assert!(keys.reload().is_ok());
        assert!(!format!("{keys:?}").contains(k.expose_secret()));
    }
}
