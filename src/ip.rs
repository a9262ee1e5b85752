use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use crate::ConfigError;

/// The resolved address of the client, in the request extensions.
///
/// Set once by [`ClientIpLayer`](crate::client_ip::ClientIpLayer) from the TCP peer
/// and, when the peer is a trusted proxy, the forwarded header; read by the allowlist,
/// the rate limiter and the access log. An IPv4-mapped IPv6 address
/// (`::ffff:192.0.2.1`) is always stored as plain IPv4.
///
/// A request without this extension has no resolvable client address, and the layers
/// that need one treat it as denied, never as allowed.
///
/// ```
/// use portcullis::ClientIp;
/// let ip = ClientIp::new("::ffff:192.0.2.1".parse().unwrap());
/// assert_eq!(ip.addr().to_string(), "192.0.2.1");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(IpAddr);

impl ClientIp {
    /// Wraps an address, normalising IPv4-mapped IPv6 to IPv4.
    pub fn new(addr: IpAddr) -> Self {
        Self(addr.to_canonical())
    }

    /// The client address.
    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl From<ClientIp> for IpAddr {
    fn from(ip: ClientIp) -> Self {
        ip.0
    }
}

impl fmt::Debug for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIp({})", self.0)
    }
}

impl fmt::Display for ClientIp {
    /// The address as `IpAddr` shows it, handed to the formatter in one piece: the
    /// standard formatting makes seven writes for an IPv4 address, and a log writer
    /// (JSON escaping, redaction) pays for each one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(AddrText::new(self.0).as_str())
    }
}

/// An address as text in a stack buffer (at most 45 bytes), formatted once: the
/// access log records it as a `&str`, `Display` hands it over in one piece.
pub(crate) struct AddrText {
    bytes: [u8; 64],
    len: usize,
}

impl AddrText {
    pub(crate) fn new(ip: IpAddr) -> Self {
        let mut buf = Self {
            bytes: [0; 64],
            len: 0,
        };
        match ip {
            IpAddr::V4(a) => {
                for (i, octet) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        buf.push(b'.');
                    }
                    if octet >= 100 {
                        buf.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        buf.push(b'0' + octet / 10 % 10);
                    }
                    buf.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(a) => {
                // At most 45 bytes: the buffer cannot overflow; if it ever did, the
                // text would be empty rather than cut.
                if fmt::Write::write_fmt(&mut buf, format_args!("{a}")).is_err() {
                    buf.len = 0;
                }
            }
        }
        buf
    }

    /// The text (ASCII digits, `.`, `:` and hex letters only).
    pub(crate) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }

    fn push(&mut self, b: u8) {
        self.bytes[self.len] = b;
        self.len += 1;
    }
}

impl fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        self.bytes
            .get_mut(self.len..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A set of IPv4 and IPv6 networks, checked in O(log n).
///
/// Parsed from a comma-separated list (the form an environment variable holds) of
/// CIDRs or single addresses. A CIDR with host bits set (`10.0.0.1/8`) is refused as
/// ambiguous rather than guessed at, and so is an octet or prefix length written with
/// a leading zero (`010.0.0.0/8`: 8.0.0.0/8 to `inet_aton`, 10.0.0.0/8 elsewhere):
/// the address of a CIDR is read exactly as a single address is, by the standard
/// parser (four decimal octets, no short forms). An IPv4-mapped IPv6 network
/// (`::ffff:10.0.0.0/104`) is stored as the IPv4 network it names, since addresses
/// are normalised the same way before lookup.
///
/// ```
/// use portcullis::IpSet;
/// let set = IpSet::parse("10.0.0.0/8, 2001:db8::/32, 192.0.2.7").unwrap();
/// assert!(set.contains("10.20.30.40".parse().unwrap()));
/// assert!(set.contains("::ffff:10.0.0.1".parse().unwrap()));
/// assert!(set.contains("2001:db8::1".parse().unwrap()));
/// assert!(!set.contains("192.0.2.8".parse().unwrap()));
/// let err = IpSet::parse("10.0.0.1/8").unwrap_err();
/// assert!(err.to_string().contains("host bits"));
/// assert!(IpSet::parse("010.0.0.0/8").is_err());
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IpSet {
    nets: Vec<IpNet>,
    // Sorted, merged, inclusive ranges for the lookup.
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpSet {
    /// Parses a comma-separated list. Empty entries are refused, so is an empty list.
    pub fn parse(list: &str) -> Result<Self, ConfigError> {
        let mut nets = Vec::new();
        for (i, entry) in list.split(',').enumerate() {
            nets.push(
                parse_net(entry.trim())
                    .map_err(|why| ConfigError::new(format!("IP list entry {}: {why}", i + 1)))?,
            );
        }
        Self::from_nets(nets)
    }

    /// Builds a set from networks. An empty set is refused: a list that matches
    /// nothing is almost always a configuration mistake. So is a network with host
    /// bits set (`10.0.0.1/8`, an interface's address and mask, as
    /// [`parse`](Self::parse) refuses it): it is not widened to the network.
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> Result<Self, ConfigError> {
        let nets = nets
            .into_iter()
            .enumerate()
            .map(|(i, net)| {
                if has_host_bits(net) {
                    Err(ConfigError::new(format!(
                        "IP list entry {}: {HOST_BITS}",
                        i + 1
                    )))
                } else {
                    Ok(normalise_net(net))
                }
            })
            .collect::<Result<Vec<IpNet>, ConfigError>>()?;
        if nets.is_empty() {
            return Err(ConfigError::new("IP list is empty"));
        }
        let mut v4: Vec<(u32, u32)> = Vec::new();
        let mut v6: Vec<(u128, u128)> = Vec::new();
        for net in &nets {
            match net {
                IpNet::V4(n) => v4.push((n.network().into(), n.broadcast().into())),
                IpNet::V6(n) => v6.push((n.network().into(), n.broadcast().into())),
            }
        }
        Ok(Self {
            nets,
            v4: merge(v4),
            v6: merge(v6),
        })
    }

    /// Whether `ip` (normalised first) is inside one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => in_ranges(&self.v4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.v6, u128::from(a)),
        }
    }

    /// The networks, as configured (after normalisation).
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

impl fmt::Debug for IpSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.nets.iter().map(ToString::to_string))
            .finish()
    }
}

impl std::str::FromStr for IpSet {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Self::parse(s)
    }
}

fn parse_net(s: &str) -> Result<IpNet, &'static str> {
    const NOT_AN_ADDRESS: &str = "not an IP address or CIDR";
    if s.is_empty() {
        return Err("empty entry");
    }
    // One grammar for both forms: the address by the standard parser (as forwarded
    // headers are read), the prefix in plain decimal. A leading zero is refused in
    // either: `010.0.0.0/8` is 8.0.0.0/8 to `inet_aton` and to tools built on it.
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return Err(if has_leading_zero_octet(addr) {
            "an octet with a leading zero is ambiguous (octal to some tools): write it without"
        } else {
            NOT_AN_ADDRESS
        });
    };
    let Some(prefix) = prefix else {
        return Ok(IpNet::from(ip));
    };
    let is_decimal = (1..=3).contains(&prefix.len())
        && prefix.bytes().all(|b| b.is_ascii_digit())
        && (prefix == "0" || !prefix.starts_with('0'));
    // Host bits are refused by `from_nets`, for every way a set is built.
    is_decimal
        .then(|| prefix.parse::<u8>().ok())
        .flatten()
        .and_then(|len| IpNet::new(ip, len).ok())
        .ok_or("not a prefix length (0 to 32 for IPv4, 0 to 128 for IPv6, no leading zero)")
}

const HOST_BITS: &str = "host bits are set below the prefix (write the network address)";

fn has_host_bits(net: IpNet) -> bool {
    net.addr() != net.network()
}

/// Whether the dotted-decimal part of `addr` has an octet written with a leading
/// zero (only to name the mistake; the standard parser refuses it anyway).
fn has_leading_zero_octet(addr: &str) -> bool {
    let dotted = addr.rsplit(':').next().unwrap_or(addr);
    dotted.contains('.')
        && dotted
            .split('.')
            .any(|o| o.len() > 1 && o.starts_with('0') && o.bytes().all(|b| b.is_ascii_digit()))
}

fn normalise_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && let (Some(v4), true) = (n.addr().to_ipv4_mapped(), n.prefix_len() >= 96)
        && let Ok(n4) = Ipv4Net::new(v4, n.prefix_len() - 96)
    {
        return IpNet::V4(n4.trunc());
    }
    net.trunc()
}

fn merge<T: Ord + Copy + num::One>(mut r: Vec<(T, T)>) -> Vec<(T, T)> {
    r.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(r.len());
    for (lo, hi) in r {
        match out.last_mut() {
            Some((_, phi)) if lo <= num::succ(*phi) => *phi = (*phi).max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // Index of the first range starting after x; the one before it may contain x.
    let i = ranges.partition_point(|&(lo, _)| lo <= x);
    i > 0 && x <= ranges[i - 1].1
}

mod num {
    pub(super) trait One: Sized {
        fn checked_succ(self) -> Option<Self>;
    }
    impl One for u32 {
        fn checked_succ(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
    impl One for u128 {
        fn checked_succ(self) -> Option<Self> {
            self.checked_add(1)
        }
    }
    /// x + 1, saturating: adjacent ranges merge, and the top of the space stays put.
    pub(super) fn succ<T: One + Copy>(x: T) -> T {
        x.checked_succ().unwrap_or(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Every address, v4 or v6 (mapped, compressed, with leading zeros in any
        /// group), is the standard text, in `Display` and in the log's buffer.
        #[test]
        fn every_address_formats_as_the_standard_text(v4: u32, v6: u128, mapped: bool) {
            let v6 = if mapped { u128::from(v4) | 0xffff_0000_0000 } else { v6 };
            for ip in [IpAddr::from(v4.to_be_bytes()), IpAddr::from(v6.to_be_bytes())] {
                let text = AddrText::new(ip);
                proptest::prop_assert_eq!(text.as_str(), ip.to_string());
                proptest::prop_assert_eq!(ClientIp(ip).to_string(), ip.to_string());
            }
        }
    }

    proptest::proptest! {
        /// An entry is read as the standard parser reads its address, with or
        /// without a prefix, plain or IPv4-mapped: an octet or a prefix length with a
        /// leading zero (`010.0.0.0/8`, `10.0.0.0/08`), which tools built on
        /// `inet_aton` read as octal, is refused, and an accepted entry is exactly
        /// the network its text names.
        #[test]
        fn entries_are_read_as_the_standard_parser_reads_them(
            addr: u32,
            len in 0u8..=32,
            zeros in proptest::collection::vec(0usize..3, 4),
            prefix_zero: bool,
            mapped: bool,
            with_prefix: bool,
        ) {
            let (len, prefix_zero) = if with_prefix { (len, prefix_zero) } else { (32, false) };
            let net = Ipv4Net::new(addr.into(), len).unwrap().trunc();
            let octets: Vec<String> = net
                .network()
                .octets()
                .iter()
                .zip(&zeros)
                .map(|(o, &z)| format!("{}{o}", "0".repeat(z)))
                .collect();
            let mut text = octets.join(".");
            if mapped {
                text = format!("::ffff:{text}");
            }
            if with_prefix {
                let len = if mapped { len + 96 } else { len };
                text = format!("{text}/{}{len}", if prefix_zero { "0" } else { "" });
            }
            let plain = zeros.iter().all(|&z| z == 0) && !prefix_zero;
            let got = IpSet::parse(&text);
            proptest::prop_assert_eq!(got.is_ok(), plain, "{} -> {:?}", text, got);
            if let Ok(set) = got {
                proptest::prop_assert_eq!(set.nets(), &[IpNet::V4(net)][..]);
            }
        }
    }

    proptest::proptest! {
        /// A network built from parts is accepted by `from_nets` exactly when its
        /// text is accepted by `parse`, as the same set: a network with host bits
        /// set is refused by both, never widened to the network around it.
        #[test]
        fn from_nets_accepts_what_parse_accepts(addr: u128, len in 0u8..=128, v4: bool) {
            let net = if v4 {
                IpNet::V4(Ipv4Net::new((addr as u32).into(), len % 33).unwrap())
            } else {
                IpNet::V6(ipnet::Ipv6Net::new(addr.into(), len).unwrap())
            };
            let built = IpSet::from_nets([net]);
            let parsed = IpSet::parse(&net.to_string());
            proptest::prop_assert_eq!(built.is_ok(), parsed.is_ok(), "{}", net);
            proptest::prop_assert_eq!(built.is_ok(), net.addr() == net.network(), "{}", net);
            if let (Ok(b), Ok(p)) = (built, parsed) {
                proptest::prop_assert_eq!(b, p);
            }
        }
    }

    #[test]
    fn client_ip_displays_as_the_standard_address() {
        for s in [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "192.168.0.255",
            "255.255.255.255",
            "::",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "fe80::1:2:3:4",
        ] {
            let ip: IpAddr = s.parse().unwrap();
            let c = ClientIp(ip);
            assert_eq!(c.to_string(), ip.to_string());
            assert_eq!(format!("[{c:>20}]"), format!("[{ip:>20}]"));
            assert_eq!(format!("[{c:<8.5}]"), format!("[{ip:<8.5}]"));
        }
    }

    #[test]
    fn parse_errors_name_the_entry() {
        for (list, pos) in [
            ("", 1),
            ("10.0.0.0/8,", 2),
            ("10.0.0.0/8, x", 2),
            ("1.2.3.4/33", 1),
            ("10.0.0.0/8, 010.0.0.0/8", 2),
            ("10.0.0.0/08", 1),
            ("::/0128", 1),
            ("::ffff:010.0.0.0/104", 1),
            ("1.2.3/24", 1),
            ("10.0.0.0/", 1),
        ] {
            let e = IpSet::parse(list).unwrap_err().to_string();
            assert!(e.contains(&format!("entry {pos}")), "{list:?}: {e}");
        }
    }

    #[test]
    fn lookup_matches_linear_scan() {
        let set = IpSet::parse(
            "10.0.0.0/8, 10.1.0.0/16, 192.168.0.0/24, 192.168.1.0/24, 0.0.0.0/32, 255.255.255.255, ::/128, 2001:db8::/32, ::ffff:172.16.0.0/108",
        )
        .unwrap();
        assert!(set.contains("172.16.5.1".parse().unwrap()));
        assert!(!set.contains("172.32.0.1".parse().unwrap()));
        for probe in [
            "9.255.255.255",
            "10.0.0.0",
            "11.0.0.0",
            "192.167.255.255",
            "192.168.1.255",
            "192.168.2.0",
            "0.0.0.0",
            "0.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "2001:db8:ffff::1",
            "2001:db9::",
        ] {
            let ip: IpAddr = probe.parse().unwrap();
            let linear = set.nets().iter().any(|n| n.contains(&ip.to_canonical()));
            assert_eq!(set.contains(ip), linear, "{probe}");
        }
    }
}
