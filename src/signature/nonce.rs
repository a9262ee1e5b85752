//! The in-memory replay cache: per key, the nonces seen while their signatures
//! are fresh.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

/// What [`NonceCache::claim`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Not seen before: now recorded.
    Fresh,
    /// Seen before, and its signature is still fresh.
    Replayed,
    /// The key's set is full of live nonces; one expires in this many seconds.
    Full(u64),
}

/// A nonce's name: 16 bytes of SHA-256 over the key id and the nonce, so that a
/// nonce of any length costs the same, and its hex form is a safe Redis key.
fn nonce_digest(key: &str, nonce: &str) -> [u8; 16] {
    let d = Sha256::new()
        .chain_update(key.as_bytes())
        .chain_update([0u8])
        .chain_update(nonce.as_bytes())
        .finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// The nonce's Redis key suffix: `sn:` and 32 hex digits.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn nonce_name(key: &str, nonce: &str) -> String {
    let mut s = String::with_capacity(35);
    s.push_str("sn:");
    for b in nonce_digest(key, nonce) {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// One key's live nonces: digest to expiry (seconds since the epoch).
type Nonces = HashMap<[u8; 16], u64>;

pub(crate) struct NonceCache {
    cap: usize,
    keys: Mutex<HashMap<Arc<str>, Nonces>>,
}

impl NonceCache {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Records `nonce` for `key` until `until` (seconds since the epoch), unless it
    /// is there already. At the cap, the expired nonces of the key are dropped
    /// first; a set still full refuses the new nonce rather than forget a live one.
    pub(crate) fn claim(&self, key: &Arc<str>, nonce: &str, until: u64, now: u64) -> Claim {
        let d = nonce_digest(key, nonce);
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let set = keys.entry(key.clone()).or_default();
        if let Some(&exp) = set.get(&d) {
            if exp > now {
                return Claim::Replayed;
            }
            set.remove(&d);
        }
        if set.len() >= self.cap {
            set.retain(|_, exp| *exp > now);
            if set.len() >= self.cap {
                let soonest = set.values().min().copied().unwrap_or(now);
                return Claim::Full(soonest.saturating_sub(now));
            }
        }
        set.insert(d, until);
        Claim::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the order of nonces, keys and times: a nonce is fresh exactly
        /// once while it lives, no key ever holds more than the cap, and a full
        /// set refuses rather than forgets.
        #[test]
        fn a_live_nonce_is_accepted_once_and_memory_stays_bounded(
            cap in 1usize..6,
            steps in proptest::collection::vec((0u8..2, 0u8..8, 0u64..5, 1u64..10), 1..200),
        ) {
            let cache = NonceCache::new(cap);
            let keys: [Arc<str>; 2] = ["a".into(), "b".into()];
            let mut now = 1000u64;
            let mut live: HashMap<(u8, u8), u64> = HashMap::new();
            for (k, n, step, life) in steps {
                now += step;
                let nonce = n.to_string();
                let got = cache.claim(&keys[k as usize], &nonce, now + life, now);
                let was_live = live.get(&(k, n)).is_some_and(|&exp| exp > now);
                match got {
                    Claim::Replayed => prop_assert!(was_live),
                    Claim::Fresh => {
                        prop_assert!(!was_live);
                        live.insert((k, n), now + life);
                    }
                    Claim::Full(_) => {
                        prop_assert!(!was_live);
                        let count = live.iter().filter(|((kk, _), exp)| *kk == k && **exp > now).count();
                        prop_assert!(count >= cap);
                    }
                }
                let sets = cache.keys.lock().unwrap();
                prop_assert!(sets.values().all(|s| s.len() <= cap));
            }
        }
    }
}
