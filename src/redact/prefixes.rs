//! The process-wide list of key prefixes learnt from key stores.
//!
//! Every [`Redactor`](super::Redactor) finds keys of this crate's generated format
//! whatever their prefix, by their checksum. A key that fails its checksum (a typo,
//! a truncated paste, a key cut by a log line) or a listed key outside the generated
//! format is found only by its prefix. The prefixes of the keys a key store was
//! built from are therefore registered here when the store is built
//! ([`KeyStore::from_key_list`](crate::api_key::KeyStore::from_key_list) and
//! `from_env`), and every redactor consults this list, so the access log and
//! [`RedactingMakeWriter`](super::RedactingMakeWriter) know them without any wiring.
//!
//! Why a process-wide list is safe:
//! - **It only ever redacts more.** An entry adds a rule; nothing can remove or
//!   weaken a rule, so one store's prefixes cannot make another's keys visible.
//! - **Nothing secret is kept.** A prefix names a kind of key (`pc_live`), it is
//!   not part of the secret; it is checked against the generator's prefix rules
//!   (1 to 32 characters of `a-z 0-9 _`, starting with a letter, not ending in
//!   `_`), so an entry is a plain, short rule.
//! - **Bounded and append-only.** At most [`MAX_PREFIXES`] entries, each written
//!   once and never changed; readers never lock (an atomic length, then entries that
//!   are already set). When it is full, further prefixes are not added: keys in the
//!   generated format are still found by their checksum.
//! - **Operator input only.** Only key stores add entries, from the keys the
//!   operator configured; nothing a client sends reaches this list.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::key_format::{ALNUM, all_in, is_prefix};

/// The most prefixes the list holds.
pub(crate) const MAX_PREFIXES: usize = 64;

/// The shortest run after `<prefix>_` that the prefix rule redacts (as for the
/// prefixes given to [`RedactorBuilder::key_prefix`](super::RedactorBuilder::key_prefix)).
pub(crate) const MIN_RUN: usize = 20;

static ENTRIES: [OnceLock<Box<[u8]>>; MAX_PREFIXES] = [const { OnceLock::new() }; MAX_PREFIXES];
/// Entries `0..LEN` are set.
static LEN: AtomicUsize = AtomicUsize::new(0);
/// Serialises writers (rare: once per prefix per store build).
static WRITE: Mutex<()> = Mutex::new(());

/// Registers the prefix of `key` when the key is shaped `<prefix>_<run>`: a valid
/// prefix, then at least [`MIN_RUN`] letters and digits (every generated key, and a
/// listed key such as `acme_live_` followed by random letters and digits). Other
/// keys have no prefix the redactor could use, and are not registered. The built-in
/// `pc_live` and `pc_test` are always known and not stored.
#[cfg_attr(not(feature = "api-key"), allow(dead_code))]
pub(crate) fn register_prefix_of(key: &str) {
    let Some(sep) = key.rfind('_') else {
        return;
    };
    let (prefix, run) = (&key.as_bytes()[..sep], &key.as_bytes()[sep + 1..]);
    if run.len() < MIN_RUN || !all_in(run, ALNUM) || !is_prefix(prefix) {
        return;
    }
    if matches!(prefix, b"pc_live" | b"pc_test") {
        return;
    }
    register(prefix);
}

/// Adds a prefix (already checked) unless it is there or the list is full.
/// Returns whether the prefix is in the list afterwards.
#[cfg_attr(not(any(feature = "api-key", test)), allow(dead_code))]
fn register(prefix: &[u8]) -> bool {
    let _writer = WRITE.lock().unwrap_or_else(|p| p.into_inner());
    let n = LEN.load(Ordering::Acquire);
    if registered_upto(n).any(|p| p == prefix) {
        return true;
    }
    if n == MAX_PREFIXES {
        return false;
    }
    // Only writers set entries, one at a time, at index `LEN`: this slot is empty.
    let _ = ENTRIES[n].set(prefix.into());
    LEN.store(n + 1, Ordering::Release);
    true
}

fn registered_upto(n: usize) -> impl Iterator<Item = &'static [u8]> {
    ENTRIES[..n].iter().filter_map(|e| e.get().map(|p| &**p))
}

/// Whether no prefix was registered (the common case: one atomic load).
#[inline]
pub(crate) fn is_empty() -> bool {
    LEN.load(Ordering::Relaxed) == 0
}

/// The registered prefixes (without their `_`), lock-free.
pub(crate) fn registered() -> impl Iterator<Item = &'static [u8]> {
    registered_upto(LEN.load(Ordering::Acquire))
}

#[cfg(test)]
pub(crate) fn register_for_test(prefix: &str) -> bool {
    is_prefix(prefix.as_bytes()) && register(prefix.as_bytes())
}
