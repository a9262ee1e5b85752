//! The verified-token cache: SHA-256 of the token -> the verified token, until the
//! second from which the verifier refuses it (`exp` plus the leeway, see
//! `VerifiedToken::refused_from`): an entry is served only while `now` is before
//! that second, so the cache and the verifier agree on the boundary.
//!
//! Only tokens that passed every check are inserted, so an attacker cannot fill it
//! with garbage; the bound still holds when many valid tokens arrive. 16 shards, each
//! a `Mutex<HashMap>` holding at most `capacity / 16` entries (at least 1). When a
//! shard is full, expired entries are dropped first, then one arbitrary entry. Cost
//! per entry: the 32-byte digest, an expiry and one `Arc` (the verified token is
//! shared with the requests that use it) plus the map's overhead, about 100 bytes.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

use super::VerifiedToken;

const SHARDS: usize = 16;

pub(crate) type TokenDigest = [u8; 32];

pub(crate) fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The digest is already uniformly distributed: its first 8 bytes are the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length followed by its bytes: keep the first 8
        // bytes of the longest write.
        if bytes.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[..8]);
            self.0 = u64::from_le_bytes(b);
        }
    }
}

struct Entry {
    /// The first second at which the entry is not served.
    refused_from: i64,
    token: Arc<VerifiedToken>,
}

type Shard = HashMap<TokenDigest, Entry, BuildHasherDefault<DigestHasher>>;

pub(crate) struct TokenCache {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
}

impl TokenCache {
    /// `capacity` 0 disables the cache.
    pub(crate) fn new(capacity: usize) -> Option<Self> {
        if capacity == 0 {
            return None;
        }
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Some(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard,
        })
    }

    fn shard(&self, d: &TokenDigest) -> &Mutex<Shard> {
        &self.shards[usize::from(d[31]) % SHARDS]
    }

    /// The cached token, if present and `now` is before its `refused_from`.
    pub(crate) fn get(&self, d: &TokenDigest, now: i64) -> Option<Arc<VerifiedToken>> {
        let mut shard = self.shard(d).lock().unwrap_or_else(PoisonError::into_inner);
        match shard.get(d) {
            Some(e) if now < e.refused_from => Some(e.token.clone()),
            Some(_) => {
                shard.remove(d);
                None
            }
            None => None,
        }
    }

    pub(crate) fn insert(&self, d: TokenDigest, now: i64, token: Arc<VerifiedToken>) {
        let refused_from = token.refused_from();
        if now >= refused_from {
            return;
        }
        let mut shard = self
            .shard(&d)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.per_shard && !shard.contains_key(&d) {
            shard.retain(|_, e| now < e.refused_from);
            if shard.len() >= self.per_shard
                && let Some(victim) = shard.keys().next().copied()
            {
                shard.remove(&victim);
            }
        }
        shard.insert(
            d,
            Entry {
                refused_from,
                token,
            },
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }
}
