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
//! ```
//!
//! Rotation is overlap: add the new key (it may share the id), move the client over,
//! then revoke or delete the old one. A broken file is rejected as a whole, with the
//! line and column of the problem and never a value from the file.
//!
//! # Reloading
//!
//! [`ApiKeys`] is the handle the authentication layer holds. Built from a file, it can
//! poll the file's modification time on an interval ([`ApiKeys::reload_every`]) and be
//! reloaded on demand ([`ApiKeys::reload`]). A new file is parsed and validated in
//! full, then swapped in atomically; requests in flight finish with the store they
//! started with. A broken file keeps the old store and logs an error.
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
mod store;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

pub use digest::KeyDigest;
pub use format::{
    CHECKSUM_LEN, DEFAULT_PREFIX, GeneratedKey, KeyFormatError, MAX_KEY_LEN, MIN_LEGACY_KEY_LEN,
    ParsedKey, RANDOM_LEN, check_prefix, generate_key, parse_key,
};
pub use store::{KeyRecord, KeyRejection, KeyStore};

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
    file: Option<FileSource>,
}

struct FileSource {
    path: PathBuf,
    /// Modification time and length of the file last attempted, loaded or not.
    last: Mutex<Option<Stamp>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
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

    /// Loads a TOML key file. A missing, unreadable, invalid or empty file is an
    /// error. Call [`ApiKeys::reload_every`] to pick up changes.
    pub fn from_file(path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let path = path.into();
        let before = stamp(&path);
        let store = KeyStore::from_file(&path)?;
        Ok(Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(store),
                file: Some(FileSource {
                    path,
                    last: Mutex::new(before),
                }),
            }),
        })
    }

    /// Polls the key file every `interval` from a background thread and reloads it
    /// when its modification time or length changed. A revoked key stops working
    /// within one interval (plus the time to parse the file).
    ///
    /// The thread holds only a weak reference and ends within one interval after the
    /// last clone of this handle is dropped. Replace the file atomically (write a
    /// temporary file, then rename it over the old one) so a half-written file is
    /// never read; if one is, it fails validation and the old store stays.
    ///
    /// Errors: the handle was not built from a file, or `interval` is zero.
    pub fn reload_every(self, interval: Duration) -> Result<Self, ConfigError> {
        if self.shared.file.is_none() {
            return Err(ConfigError::new(
                "reload_every needs a key store loaded from a file (ApiKeys::from_file)",
            ));
        }
        if interval.is_zero() {
            return Err(ConfigError::new(
                "the key file reload interval must be positive",
            ));
        }
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        std::thread::Builder::new()
            .name("portcullis-key-reload".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    let Some(shared) = weak.upgrade() else { break };
                    let _ = shared.reload(false);
                }
            })
            .map_err(|e| ConfigError::new(format!("cannot start the key reload thread: {e}")))?;
        Ok(self)
    }

    /// Re-reads the key file now, whether or not it changed, and swaps it in if it is
    /// valid. On error the old store stays and the error (with the file position) is
    /// returned and logged. For a fixed store this does nothing and returns `Ok`.
    pub fn reload(&self) -> Result<(), ConfigError> {
        self.shared.reload(true)
    }

    /// The current store.
    pub fn snapshot(&self) -> Arc<KeyStore> {
        self.shared.current.load_full()
    }

    /// Verifies a presented key against the current store at the current time.
    pub fn verify(&self, key: &str) -> Result<Principal, KeyRejection> {
        self.shared.current.load().verify_at(key, SystemTime::now)
    }
}

impl Shared {
    fn reload(&self, force: bool) -> Result<(), ConfigError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        // Held for the whole reload: two reloads never race to swap in an older file.
        let mut last = file.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&file.path);
        if !force && now == *last {
            return Ok(());
        }
        // Remember the attempt, so a broken file is reported once, not every tick.
        *last = now;
        match KeyStore::from_file(&file.path) {
            Ok(store) => {
                let keys = store.len();
                self.current.store(Arc::new(store));
                tracing::info!(
                    target: crate::audit::TARGET,
                    event = "key_store_reloaded",
                    path = %file.path.display(),
                    keys,
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    target: crate::audit::TARGET,
                    event = "key_store_reload_failed",
                    error = %e,
                    "key file rejected; the previous keys stay in force"
                );
                Err(e)
            }
        }
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ApiKeys");
        d.field("keys", &self.shared.current.load().len());
        if let Some(file) = &self.shared.file {
            d.field("file", &file.path);
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
    }

    #[test]
    fn reload_every_needs_a_file_and_an_interval() {
        let k = generate_key("pc_test").unwrap();
        let keys = ApiKeys::new(
            KeyStore::from_records([KeyRecord::new("k", k.digest()).unwrap()]).unwrap(),
        );
        assert!(keys.clone().reload_every(Duration::from_secs(1)).is_err());
        assert!(keys.reload().is_ok());
        assert!(!format!("{keys:?}").contains(k.expose_secret()));
    }
}
