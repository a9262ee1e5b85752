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
    /// The fixed-size in-memory key, two words: the table's hash, the store's
    /// randomly keyed SipHash of the kind and value, and a tag. The tag is the value
    /// itself where it fits in a word beside that hash (an IPv4 address with its
    /// kind, the first half of an IPv6 network of at most 64 bits), so that two such
    /// keys of one kind never share a state; otherwise (a string, a longer IPv6
    /// network) it is the second half of a 128-bit keyed hash. Two distinct keys can
    /// only share a state if their keyed hashes are equal, which without the
    /// per-process random key cannot be steered (see [`LocalKey`]).
    #[inline(always)]
    pub(crate) fn local(&self, hasher: &impl KeyHash) -> LocalKey {
        // Every hashed message is the value's bytes then its kind's byte: a kind's
        // messages are its values' bytes (of one length for addresses), and messages
        // of different kinds differ in their last byte.
        let (hash, tag) = match self {
            KeySource::Global => (hasher.hash64(&[], 0), 0),
            KeySource::Ip(IpAddr::V4(a)) => {
                let tag = u64::from(u32::from(*a)) | (1 << 56);
                (hasher.hash64(&a.octets(), 1), tag)
            }
            KeySource::Ip(IpAddr::V6(a)) => {
                let v = u128::from(*a);
                let (net, host) = ((v >> 64) as u64, v as u64);
                if host == 0 {
                    (hasher.hash64(&net.to_be_bytes(), 2), net)
                } else {
                    hasher.hash128(&v.to_be_bytes(), 5)
                }
            }
            KeySource::Principal(s) => hasher.hash128(s.as_bytes(), 3),
            KeySource::Custom(s) => hasher.hash128(s.as_bytes(), 4),
        };
        LocalKey { hash, tag }
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
    /// A 128-bit keyed hash of `bytes ‖ kind`, as two words.
    fn hash128(&self, bytes: &[u8], kind: u8) -> (u64, u64);
}

/// SipHash-1-3 (the keyed hash of the standard library's `HashMap`) under a random
/// 128-bit key, with its 64-bit and its 128-bit output.
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
        sip::<1, 3>(self, bytes, kind, false).0
    }

    /// Out of line: strings are the rarer keys, and their loop the larger code.
    #[inline(never)]
    fn hash128(&self, bytes: &[u8], kind: u8) -> (u64, u64) {
        sip::<1, 3>(self, bytes, kind, true)
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

/// SipHash-`C`-`D` under `key` of the message `bytes ‖ kind`: its 64-bit output in
/// the first word, or (`wide`) its 128-bit output in two.
#[inline(always)]
fn sip<const C: usize, const D: usize>(
    key: &SipKey,
    bytes: &[u8],
    kind: u8,
    wide: bool,
) -> (u64, u64) {
    let mut s = Sip([
        key.k0 ^ 0x736f_6d65_7073_6575,
        key.k1 ^ 0x646f_7261_6e64_6f6d ^ if wide { 0xee } else { 0 },
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
    s.0[2] ^= if wide { 0xee } else { 0xff };
    let first = s.out::<D>();
    if !wide {
        return (first, 0);
    }
    s.0[1] ^= 0xdd;
    (first, s.out::<D>())
}

/// The in-memory key, 16 bytes whatever the principal identity's length: a keyed
/// hash and a tag (see [`KeySource::local`]).
///
/// Keys are compared on both words. Two distinct keys of one kind whose value is
/// its own tag (IPv4 addresses, IPv6 networks of at most 64 bits) never compare
/// equal. Any other two distinct keys compare equal only if the store's keyed
/// SipHash maps their inputs to equal 64-bit values and their tags are equal too (a
/// second 64-bit keyed hash for strings).
///
/// The in-memory store identifies a key by its keyed hash alone (one word per slot,
/// see `local`): there two distinct keys share a state only if their keyed 64-bit
/// hashes are equal, about 2⁻⁶⁴ per pair, addresses included. The hash key is
/// random per process and never leaves it, so equal hashes cannot be searched for
/// offline. If two keys did collide, they would share one state: both held to one
/// budget, stricter than their own, never looser than a single key's quota.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalKey {
    hash: u64,
    tag: u64,
}

impl LocalKey {
    /// The keyed 64-bit hash: the in-memory store's tag and bucket.
    #[inline(always)]
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }
}

impl PartialEq for LocalKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        (self.hash, self.tag) == (other.hash, other.tag)
    }
}

impl Eq for LocalKey {}

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
    fn a_key_is_two_words() {
        assert_eq!(std::mem::size_of::<LocalKey>(), 16);
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

    /// A hash that maps everything to 0: every key collides on its hash, so only the
    /// tag tells keys apart.
    struct AllCollide;

    impl KeyHash for AllCollide {
        fn hash64(&self, _: &[u8], _: u8) -> u64 {
            0
        }
        fn hash128(&self, _: &[u8], _: u8) -> (u64, u64) {
            (0, 0)
        }
    }

    /// A hash whose value is the message's last byte, and whose tag its length.
    struct LastByte;

    impl KeyHash for LastByte {
        fn hash64(&self, _: &[u8], kind: u8) -> u64 {
            u64::from(kind)
        }
        fn hash128(&self, bytes: &[u8], kind: u8) -> (u64, u64) {
            (u64::from(kind), bytes.len() as u64 + 1)
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

    /// SipHash-2-4 with its 128-bit output: the reference implementation's vectors
    /// (key 00 01 .. 0f, message 00 01 .. of each length), the output's two words
    /// little-endian.
    #[test]
    fn sip_128_matches_the_reference_vectors() {
        let key = SipKey::from_words(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        let vectors: [[u8; 16]; 4] = [
            [
                0xda, 0x87, 0xc1, 0xd8, 0x6b, 0x99, 0xaf, 0x44, 0x34, 0x76, 0x59, 0x11, 0x9b, 0x22,
                0xfc, 0x45,
            ],
            [
                0x81, 0x77, 0x22, 0x8d, 0xa4, 0xa4, 0x5d, 0xc7, 0xfc, 0xa3, 0x8b, 0xde, 0xf6, 0x0a,
                0xff, 0xe4,
            ],
            [
                0x9c, 0x70, 0xb6, 0x0c, 0x52, 0x67, 0xa9, 0x4e, 0x5f, 0x33, 0xb6, 0xb0, 0x29, 0x85,
                0xed, 0x51,
            ],
            [
                0xf8, 0x81, 0x64, 0xc1, 0x2d, 0x9c, 0x8f, 0xaf, 0x7d, 0x0f, 0x6e, 0x7c, 0x7b, 0xcd,
                0x55, 0x79,
            ],
        ];
        let input: Vec<u8> = (0..=4).collect();
        for (i, want) in vectors.iter().enumerate() {
            // The message of length i + 1: bytes 0 .. i, then the byte i as the kind.
            let (a, b) = sip::<2, 4>(&key, &input[..i], i as u8, true);
            let mut got = [0u8; 16];
            got[..8].copy_from_slice(&a.to_le_bytes());
            got[8..].copy_from_slice(&b.to_le_bytes());
            assert_eq!(&got, want, "length {}", i + 1);
        }
    }

    proptest::proptest! {
        /// Addresses are their own tags: two different IPv4 addresses, or two
        /// different IPv6 networks of at most 64 bits, never share a key, even
        /// under a hash where everything collides.
        #[test]
        fn distinct_addresses_never_share_a_key(
            a in proptest::prelude::any::<u32>(),
            b in proptest::prelude::any::<u32>(),
            x in proptest::prelude::any::<u64>(),
            y in proptest::prelude::any::<u64>(),
        ) {
            let h = AllCollide;
            let v4 = |n: u32| KeySource::Ip(IpAddr::V4(n.into())).local(&h);
            let v6 = |n: u64| KeySource::Ip(IpAddr::V6((u128::from(n) << 64).into())).local(&h);
            proptest::prop_assert_eq!(a == b, v4(a) == v4(b));
            proptest::prop_assert_eq!(x == y, v6(x) == v6(y));
            proptest::prop_assert_ne!(v4(a), KeySource::Global.local(&h));
        }

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
            let ours = sip::<2, 4>(&SipKey::from_words(k0, k1), &bytes, kind, false);
            proptest::prop_assert_eq!(ours, (std24.finish(), 0));
            let mut std13 = std::hash::DefaultHasher::new();
            std13.write(&m);
            let zero = SipKey::from_words(0, 0);
            proptest::prop_assert_eq!(zero.hash64(&bytes, kind), std13.finish());
            // The wide output's first word is not the narrow one (their
            // initialisations differ).
            proptest::prop_assert_ne!(zero.hash128(&bytes, kind).0, std13.finish());
        }
    }
}
