//! Who a request counts against.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Request, Uri};

use crate::{AuthMethod, ClientIp, ConfigError, Principal};

/// What the key function sees of a request.
///
/// ```
/// use portcullis::rate_limit::KeyContext;
/// // A key per principal and route, e.g. for an expensive endpoint. Key on the
/// // principal's identity (method and id), never on its id alone.
/// let key = |cx: &KeyContext<'_>| {
///     cx.principal().map(|p| format!("{} {}", p.identity(), cx.uri().path()))
/// };
/// # let _ = key;
/// ```
#[derive(Debug)]
pub struct KeyContext<'a> {
    principal: Option<&'a Principal>,
    client_ip: Option<ClientIp>,
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

impl<'a> KeyContext<'a> {
    #[inline]
    pub(crate) fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            principal: counted(req.extensions().get::<Principal>()),
            client_ip: req.extensions().get::<ClientIp>().copied(),
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
        }
    }

    /// The authenticated principal, if an authentication layer set one. `None` for
    /// the unauthenticated mode's principal too: every request shares it and it
    /// names no one, so such requests are keyed like anonymous ones.
    pub fn principal(&self) -> Option<&'a Principal> {
        self.principal
    }

    /// The resolved client address, if the client-IP layer set one.
    pub fn client_ip(&self) -> Option<ClientIp> {
        self.client_ip
    }

    /// The request method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The request headers. Never key on a credential header: hashing a secret into
    /// a key is safe, but keying on unauthenticated input lets a client pick its bucket.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }
}

/// The principal a request counts against: the one authentication set, unless it
/// is the unauthenticated mode's. That one is shared by every request and names no
/// one, so its requests count like anonymous ones (per client address, default
/// quotas), not all in one bucket.
#[inline]
pub(crate) fn counted(principal: Option<&Principal>) -> Option<&Principal> {
    principal.filter(|p| p.method() != AuthMethod::Unauthenticated)
}

pub(crate) type KeyFn = Arc<dyn Fn(&KeyContext<'_>) -> Option<String> + Send + Sync>;

/// How requests map to keys: the principal's identity, else the masked client
/// address, else one global key; or a custom function first.
#[derive(Clone)]
pub(crate) struct KeyRule {
    pub(crate) ipv4_prefix: u8,
    pub(crate) ipv6_prefix: u8,
    pub(crate) custom: Option<KeyFn>,
}

impl fmt::Debug for KeyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRule")
            .field("ipv4_prefix", &self.ipv4_prefix)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("custom", &self.custom.is_some())
            .finish()
    }
}

impl Default for KeyRule {
    fn default() -> Self {
        Self {
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            custom: None,
        }
    }
}

impl KeyRule {
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if self.ipv4_prefix == 0 || self.ipv4_prefix > 32 {
            return Err(ConfigError::new("IPv4 key prefix must be 1 to 32"));
        }
        if self.ipv6_prefix == 0 || self.ipv6_prefix > 128 {
            return Err(ConfigError::new("IPv6 key prefix must be 1 to 128"));
        }
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn derive<'a>(&self, cx: &KeyContext<'a>) -> KeySource<'a> {
        if let Some(f) = &self.custom
            && let Some(k) = f(cx)
        {
            return KeySource::Custom(k);
        }
        if let Some(p) = cx.principal {
            return KeySource::Principal(p.identity());
        }
        if let Some(ip) = cx.client_ip {
            return KeySource::Ip(mask(ip.addr(), self.ipv4_prefix, self.ipv6_prefix));
        }
        KeySource::Global
    }
}

/// The masked network a client address counts against.
#[inline]
pub(crate) fn mask(ip: IpAddr, v4: u8, v6: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// A derived key before a backend turns it into its own representation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KeySource<'a> {
    Custom(String),
    /// A [`Principal::identity`].
    Principal(&'a str),
    Ip(IpAddr),
    Global,
}

impl KeySource<'_> {
    /// The fixed-size in-memory key: the store's randomly keyed SipHash of the kind
    /// and value. Two distinct keys share a state only if their keyed hashes are
    /// equal, which without the per-process random key cannot be steered (see
    /// [`LocalKey`]).
    #[inline(always)]
    pub(crate) fn local(&self, hasher: &impl KeyHash) -> LocalKey {
        // Every hashed message is the value's bytes then its kind's byte: a kind's
        // messages are its values' bytes (of one length for addresses), and messages
        // of different kinds differ in their last byte.
        let hash = match self {
            KeySource::Global => hasher.hash64(&[], 0),
            KeySource::Ip(IpAddr::V4(a)) => hasher.hash64(&a.octets(), 1),
            KeySource::Ip(IpAddr::V6(a)) => {
                let v = u128::from(*a);
                if v as u64 == 0 {
                    // A network of at most 64 bits: its first half.
                    hasher.hash64(&((v >> 64) as u64).to_be_bytes(), 2)
                } else {
                    hasher.hash64(&v.to_be_bytes(), 5)
                }
            }
            KeySource::Principal(s) => hasher.hash64(s.as_bytes(), 3),
            KeySource::Custom(s) => hasher.hash64(s.as_bytes(), 4),
        };
        LocalKey { hash }
    }

    /// A stable, printable name for the key, for shared backends: the same on every
    /// instance. Strings are hashed (SHA-256, truncated to 128 bits, hex), so an id
    /// with any characters becomes a safe key of fixed length.
    #[cfg(feature = "redis")]
    pub(crate) fn stable_name(&self) -> String {
        use sha2::{Digest, Sha256};
        let hex = |kind: &str, s: &str| {
            let d = Sha256::new()
                .chain_update(kind.as_bytes())
                .chain_update([0u8])
                .chain_update(s.as_bytes())
                .finalize();
            let mut out = String::with_capacity(34);
            out.push_str(kind);
            out.push(':');
            for b in &d[..16] {
                out.push_str(&format!("{b:02x}"));
            }
            out
        };
        match self {
            KeySource::Global => "g".to_owned(),
            KeySource::Ip(ip) => format!("ip:{ip}"),
            KeySource::Principal(s) => hex("p", s),
            KeySource::Custom(s) => hex("c", s),
        }
    }
}

/// A keyed hash of the messages keys are made of: `bytes` followed by one `kind`
/// byte.
pub(crate) trait KeyHash {
    /// A 64-bit keyed hash of `bytes ‖ kind`.
    fn hash64(&self, bytes: &[u8], kind: u8) -> u64;
}

/// SipHash-1-3 (the keyed hash of the standard library's `HashMap`) under a random
/// 128-bit key, with its 64-bit output.
///
/// The key is drawn once per store from the standard library's per-process random
/// hashing keys (seeded from the operating system): two outputs of its keyed SipHash
/// on fixed inputs, unpredictable without that key. It never leaves the process and
/// is never logged (`Debug` does not show it). The messages are hashed in one pass
/// over their bytes, the last partial block and the length assembled in a register;
/// an address's message (at most 17 bytes) takes one to three compressions.
#[derive(Clone)]
pub(crate) struct SipKey {
    k0: u64,
    k1: u64,
}

impl fmt::Debug for SipKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SipKey(..)")
    }
}

impl SipKey {
    /// A fresh random key.
    pub(crate) fn random() -> Self {
        use std::hash::BuildHasher;
        let s = std::hash::RandomState::new();
        Self {
            k0: s.hash_one(0x6b30_u64),
            k1: s.hash_one(0x6b31_u64),
        }
    }

    #[cfg(test)]
    pub(crate) fn from_words(k0: u64, k1: u64) -> Self {
        Self { k0, k1 }
    }
}

impl KeyHash for SipKey {
    #[inline(always)]
    fn hash64(&self, bytes: &[u8], kind: u8) -> u64 {
        sip::<1, 3>(self, bytes, kind)
    }
}

/// The SipHash state.
struct Sip([u64; 4]);

impl Sip {
    #[inline(always)]
    fn round(&mut self) {
        let [v0, v1, v2, v3] = &mut self.0;
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13) ^ *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16) ^ *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21) ^ *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17) ^ *v2;
        *v2 = v2.rotate_left(32);
    }

    #[inline(always)]
    fn block<const C: usize>(&mut self, m: u64) {
        self.0[3] ^= m;
        for _ in 0..C {
            self.round();
        }
        self.0[0] ^= m;
    }

    #[inline(always)]
    fn out<const D: usize>(&mut self) -> u64 {
        for _ in 0..D {
            self.round();
        }
        let [v0, v1, v2, v3] = self.0;
        v0 ^ v1 ^ v2 ^ v3
    }
}

/// SipHash-`C`-`D` under `key` of the message `bytes ‖ kind`, its 64-bit output.
#[inline(always)]
fn sip<const C: usize, const D: usize>(key: &SipKey, bytes: &[u8], kind: u8) -> u64 {
    let mut s = Sip([
        key.k0 ^ 0x736f_6d65_7073_6575,
        key.k1 ^ 0x646f_7261_6e64_6f6d,
        key.k0 ^ 0x6c79_6765_6e65_7261,
        key.k1 ^ 0x7465_6462_7974_6573,
    ]);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        s.block::<C>(u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    // The rest (0 to 7 bytes) and the kind byte, little-endian, in one word.
    let rest = chunks.remainder();
    let mut word = 0u64;
    for (i, &b) in rest.iter().enumerate() {
        word |= u64::from(b) << (8 * i);
    }
    word |= u64::from(kind) << (8 * rest.len());
    if rest.len() == 7 {
        s.block::<C>(word);
        word = 0;
    }
    // The last block ends with the message length (mod 256).
    s.block::<C>(word | ((bytes.len() as u64 + 1) << 56));
    s.0[2] ^= 0xff;
    s.out::<D>()
}

/// The in-memory key, one word whatever the principal identity's length: a keyed
/// hash (see [`KeySource::local`]).
///
/// The in-memory store identifies a key by this hash alone (one word per slot, see
/// `local`): two distinct keys share a state only if their keyed 64-bit hashes are
/// equal, about 2⁻⁶⁴ per pair, addresses included. The hash key is random per
/// process and never leaves it, so equal hashes cannot be searched for offline. If
/// two keys did collide, they would share one state: both held to one budget,
/// stricter than their own, never looser than a single key's quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LocalKey {
    hash: u64,
}

impl LocalKey {
    /// The keyed 64-bit hash: the in-memory store's tag and bucket.
    #[inline(always)]
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            mask(ip("2001:db8:1:2:3:4:5:6"), 32, 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            mask(ip("2001:db8:1:2:3:4:5:6"), 32, 128),
            ip("2001:db8:1:2:3:4:5:6")
        );
        assert_eq!(mask(ip("192.0.2.77"), 24, 64), ip("192.0.2.0"));
        assert_eq!(mask(ip("192.0.2.77"), 32, 64), ip("192.0.2.77"));
        assert_eq!(mask(ip("::ffff:192.0.2.77"), 32, 64), ip("192.0.2.77"));
        assert_eq!(mask(ip("192.0.2.77"), 1, 64), ip("128.0.0.0"));
    }

    #[test]
    fn a_key_is_one_word() {
        assert_eq!(std::mem::size_of::<LocalKey>(), 8);
    }

    #[test]
    fn kinds_never_collide() {
        let h = SipKey::random();
        let a = KeySource::Principal("x").local(&h);
        let b = KeySource::Custom("x".into()).local(&h);
        assert_ne!(a, b);
        assert_eq!(a, KeySource::Principal("x").local(&h));
        assert_ne!(
            KeySource::Ip("0.0.0.0".parse().unwrap()).local(&h),
            KeySource::Global.local(&h)
        );
    }

    /// A hash whose value is the message's last byte.
    struct LastByte;

    impl KeyHash for LastByte {
        fn hash64(&self, _: &[u8], kind: u8) -> u64 {
            u64::from(kind)
        }
    }

    /// Every hashed message ends in its kind's byte, so keys of different kinds are
    /// different inputs to the keyed hash, whatever bytes a string key holds (here a
    /// custom key made of an IPv6 network's bytes).
    #[test]
    fn each_kind_hashes_its_own_messages() {
        let h = LastByte;
        let net = 0x0a03_0405_0607_0809_u64;
        let mut as_custom = net.to_be_bytes().to_vec();
        as_custom.push(2);
        for (source, kind) in [
            (KeySource::Global, 0),
            (KeySource::Ip("192.0.2.1".parse().unwrap()), 1),
            (KeySource::Ip(IpAddr::V6((u128::from(net) << 64).into())), 2),
            (KeySource::Principal("2001:db8::"), 3),
            (KeySource::Custom(String::from_utf8(as_custom).unwrap()), 4),
            (KeySource::Ip("2001:db8::1".parse().unwrap()), 5),
        ] {
            assert_eq!(source.local(&h).hash, kind, "{source:?}");
        }
    }

    /// The message `bytes ‖ kind` as one byte string.
    fn message(bytes: &[u8], kind: u8) -> Vec<u8> {
        let mut m = bytes.to_vec();
        m.push(kind);
        m
    }

    proptest::proptest! {
        /// With the store's hasher, a key depends on its source alone, and two
        /// different sources (of any kind, including strings and full IPv6
        /// addresses, which are hashed) get different keys.
        #[test]
        fn keys_follow_their_source(
            s in "[a-z:]{0,24}",
            t in "[a-z:]{0,24}",
            a in proptest::prelude::any::<u128>(),
            b in proptest::prelude::any::<u128>(),
        ) {
            let h = SipKey::random();
            let all = |s: &str, a: u128| {
                [
                    KeySource::Principal(s).local(&h),
                    KeySource::Custom(s.to_owned()).local(&h),
                    KeySource::Ip(IpAddr::V6(a.into())).local(&h),
                    KeySource::Ip(IpAddr::V4((a as u32).into())).local(&h),
                    KeySource::Global.local(&h),
                ]
            };
            let (x, y) = (all(&s, a), all(&t, b));
            proptest::prop_assert_eq!(x, all(&s, a));
            for (i, kx) in x.iter().enumerate() {
                for (j, ky) in y.iter().enumerate() {
                    let same_source = i == j
                        && match i {
                            0 | 1 => s == t,
                            2 => a == b,
                            3 => a as u32 == b as u32,
                            _ => true,
                        };
                    proptest::prop_assert_eq!(same_source, kx == ky, "kinds {} and {}", i, j);
                }
            }
        }

        /// SipHash-2-4 with its 64-bit output equals the standard library's
        /// (`SipHasher`, the one it lets a caller key), for any key and message of up
        /// to three blocks; SipHash-1-3, the store's, equals its `DefaultHasher`
        /// (SipHash-1-3 with the zero key).
        #[test]
        fn sip_matches_the_standard_library(
            k0 in proptest::prelude::any::<u64>(),
            k1 in proptest::prelude::any::<u64>(),
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
            kind in proptest::prelude::any::<u8>(),
        ) {
            use std::hash::Hasher;
            let m = message(&bytes, kind);
            #[allow(deprecated)]
            let mut std24 = std::hash::SipHasher::new_with_keys(k0, k1);
            std24.write(&m);
            let ours = sip::<2, 4>(&SipKey::from_words(k0, k1), &bytes, kind);
            proptest::prop_assert_eq!(ours, std24.finish());
            let mut std13 = std::hash::DefaultHasher::new();
            std13.write(&m);
            let zero = SipKey::from_words(0, 0);
            proptest::prop_assert_eq!(zero.hash64(&bytes, kind), std13.finish());
        }
    }
}
