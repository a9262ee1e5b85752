//! Who a request counts against.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
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

    #[inline]
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
    /// network) it is a second keyed hash, 128 bits in all. Two distinct keys can
    /// only share a state if their keyed hashes are equal, which without the
    /// per-process random key cannot be steered (see [`LocalKey`]).
    #[inline]
    pub(crate) fn local(&self, hasher: &impl BuildHasher) -> LocalKey {
        // Every hashed message is the value's bytes then its kind's byte: a kind's
        // messages are its values' bytes (of one length for addresses), and messages
        // of different kinds differ in their last byte.
        let (hash, tag) = match self {
            KeySource::Global => (hash64(hasher, 0, &[]), 0),
            KeySource::Ip(IpAddr::V4(a)) => {
                let tag = u64::from(u32::from(*a)) | (1 << 56);
                (hash64(hasher, 1, &a.octets()), tag)
            }
            KeySource::Ip(IpAddr::V6(a)) => {
                let v = u128::from(*a);
                let (net, host) = ((v >> 64) as u64, v as u64);
                if host == 0 {
                    (hash64(hasher, 2, &net.to_be_bytes()), net)
                } else {
                    hash128(hasher, 5, &v.to_be_bytes())
                }
            }
            KeySource::Principal(s) => hash128(hasher, 3, s.as_bytes()),
            KeySource::Custom(s) => hash128(hasher, 4, s.as_bytes()),
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

/// The keyed hash of `bytes kind`.
#[inline]
fn hash64(hasher: &impl BuildHasher, kind: u8, bytes: &[u8]) -> u64 {
    let mut h = hasher.build_hasher();
    h.write(bytes);
    h.write_u8(kind);
    h.finish()
}

fn hash128(hasher: &impl BuildHasher, kind: u8, bytes: &[u8]) -> (u64, u64) {
    // Two keyed hashes of distinct inputs, `bytes kind` and `bytes kind 0xff` (a
    // fixed-length suffix, so each input has one reading), the bytes compressed once.
    let mut h = hasher.build_hasher();
    h.write(bytes);
    h.write_u8(kind);
    let hi = h.finish();
    h.write_u8(0xff);
    (hi, h.finish())
}

/// The in-memory key, 16 bytes whatever the principal identity's length: a keyed
/// hash, which is also the table's hash, and a tag (see [`KeySource::local`]).
///
/// Keys are compared on both words. Two distinct keys of one kind whose value is
/// its own tag (IPv4 addresses, IPv6 networks of at most 64 bits) never compare
/// equal. Any other two distinct keys compare equal only if the store's keyed
/// SipHash maps their inputs to equal 64-bit values and their tags are equal too (a
/// second 64-bit keyed hash for strings): about 2⁻¹²⁸ per pair of strings, and at
/// worst 2⁻⁶⁴ per pair when an attacker picks an address as the tag. The hash key
/// is random per process and never leaves it, so equal hashes cannot be searched
/// for offline. If two keys did collide, they would share one state: both held to
/// one budget, stricter than their own, never looser than a single key's quota.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LocalKey {
    hash: u64,
    tag: u64,
}

impl PartialEq for LocalKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        (self.hash, self.tag) == (other.hash, other.tag)
    }
}

impl Eq for LocalKey {}

impl std::hash::Hash for LocalKey {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The hasher of the tables keyed by [`LocalKey`]: the key's hash is already keyed
/// and computed once (see [`KeySource::local`]), so hashing it again would only add
/// a SipHash per lookup. The tables stay resistant to flooding with chosen keys.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        // Only `LocalKey`'s `write_u64` is expected; fold anything else in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
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
    fn a_key_is_two_words() {
        assert_eq!(std::mem::size_of::<LocalKey>(), 16);
    }

    #[test]
    fn kinds_never_collide() {
        let h = std::hash::RandomState::new();
        let a = KeySource::Principal("x").local(&h);
        let b = KeySource::Custom("x".into()).local(&h);
        assert_ne!(a, b);
        assert_eq!(a, KeySource::Principal("x").local(&h));
        assert_ne!(
            KeySource::Ip("0.0.0.0".parse().unwrap()).local(&h),
            KeySource::Global.local(&h)
        );
    }

    /// A hasher that maps everything to 0: every key collides on its hash, so
    /// only the tag tells keys apart.
    #[derive(Default)]
    struct Zero;

    impl Hasher for Zero {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, _: &[u8]) {}
    }

    type AllCollide = std::hash::BuildHasherDefault<Zero>;

    /// A hasher whose value is the last byte written.
    #[derive(Default)]
    struct LastByte(u64);

    impl Hasher for LastByte {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            if let Some(&b) = bytes.last() {
                self.0 = u64::from(b);
            }
        }
    }

    /// Every hashed message ends in its kind's byte, so keys of different kinds are
    /// different inputs to the keyed hash, whatever bytes a string key holds (here a
    /// custom key made of an IPv6 network's bytes).
    #[test]
    fn each_kind_hashes_its_own_messages() {
        let h = std::hash::BuildHasherDefault::<LastByte>::default();
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
            let h = AllCollide::default();
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
            let h = std::hash::RandomState::new();
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
    }
}
