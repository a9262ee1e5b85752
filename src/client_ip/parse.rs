//! Pure parsers for the forwarding headers and the walk over the chain they describe.
//!
//! No I/O, no configuration, no allocation: plain functions over bytes, fuzzed by
//! `fuzz/fuzz_targets/forwarded_headers.rs` and property-tested below.

use std::net::{IpAddr, Ipv6Addr};

/// One hop of a forwarding chain, as a header reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Node {
    /// An address; a port, if any, is dropped and IPv4-mapped IPv6 is normalised.
    Ip(IpAddr),
    /// `unknown` (RFC 7239 §6.2), or a `Forwarded` element without `for=`: the
    /// proxy did not say who its client was.
    Unknown,
    /// An obfuscated identifier such as `_hidden` (RFC 7239 §6.3).
    Obfuscated,
    /// Anything that does not parse. A syntax error in a `Forwarded` value ends the
    /// value with one `Invalid` node, since the element boundaries after it are lost.
    Invalid,
}

/// The longest node value looked at; `[` + 39-char IPv6 + `]:` + 5-digit port fits.
const MAX_NODE_LEN: usize = 64;

/// Parses one `X-Forwarded-For` value into its nodes, **right to left** (nearest hop
/// first), the order in which a client address is resolved.
///
/// Elements are separated by commas; empty elements are skipped (RFC 9110 §5.6.1).
/// Accepted forms: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:8080`, `unknown` and `_obfuscated`; anything else is
/// [`Node::Invalid`].
pub(crate) fn parse_x_forwarded_for(value: &[u8]) -> impl DoubleEndedIterator<Item = Node> + '_ {
    value
        .rsplit(|&b| b == b',')
        .map(trim_ows)
        .filter(|e| !e.is_empty())
        .map(parse_xff_node)
}

/// Parses a single-value header (`X-Real-IP`, `CF-Connecting-IP`, `True-Client-IP`,
/// `Fly-Client-IP`, `Fastly-Client-IP`): exactly one address, optionally with a
/// port, by the same rules as one `X-Forwarded-For` entry.
pub(crate) fn parse_single_address(value: &[u8]) -> Node {
    parse_xff_node(trim_ows(value))
}

fn parse_xff_node(e: &[u8]) -> Node {
    if e.len() > MAX_NODE_LEN {
        return Node::Invalid;
    }
    if let Some(n) = parse_word(e) {
        return n;
    }
    if let Some(rest) = e.strip_prefix(b"[") {
        // [v6] or [v6]:port
        let Some(close) = rest.iter().position(|&b| b == b']') else {
            return Node::Invalid;
        };
        let (inner, after) = (&rest[..close], &rest[close + 1..]);
        return match (parse_v6(inner), after) {
            (Some(ip), []) => Node::Ip(ip),
            (Some(ip), [b':', port @ ..]) if is_port(port) => Node::Ip(ip),
            _ => Node::Invalid,
        };
    }
    if let Some(ip) = parse_ip(e) {
        return Node::Ip(ip);
    }
    // v4:port (a bare v6 has several colons and was handled above)
    match split_once(e, b':') {
        Some((host, port)) if is_port(port) => match parse_ip(host) {
            Some(ip @ IpAddr::V4(_)) => Node::Ip(ip),
            _ => Node::Invalid,
        },
        _ => Node::Invalid,
    }
}

/// `unknown` or an obfuscated identifier, in either header.
fn parse_word(e: &[u8]) -> Option<Node> {
    if e.eq_ignore_ascii_case(b"unknown") {
        Some(Node::Unknown)
    } else if is_obfuscated(e) {
        Some(Node::Obfuscated)
    } else {
        None
    }
}

/// Parses one `Forwarded` value (RFC 7239) into the `for=` node of each element,
/// **left to right** as written.
///
/// Parameter names are case-insensitive; values are tokens or quoted strings. An
/// element without `for` yields [`Node::Unknown`]; an element with two `for`
/// parameters, or any syntax error, yields [`Node::Invalid`] and ends the value.
pub(crate) fn parse_forwarded(value: &[u8]) -> Forwarded<'_> {
    Forwarded {
        rest: value,
        done: false,
    }
}

/// The nodes of one `Forwarded` value **right to left** (nearest hop first), at most
/// its last `MAX_HOPS + 1`: all that a walk can look at, since [`walk`] stops at the
/// `MAX_HOPS + 1`-th node and a depth is at most [`MAX_HOPS`]. Elements are
/// delimited left to right (quotes may hide commas), so the value is parsed whole,
/// its last nodes kept in a fixed ring: no allocation, whatever the element count.
pub(crate) fn parse_forwarded_rev(value: &[u8]) -> impl Iterator<Item = Node> {
    const KEPT: usize = MAX_HOPS + 1;
    let mut ring = [Node::Invalid; KEPT];
    let mut count = 0usize;
    for node in parse_forwarded(value) {
        ring[count % KEPT] = node;
        count += 1;
    }
    (1..=count.min(KEPT)).map(move |i| ring[(count - i) % KEPT])
}

/// Iterator returned by [`parse_forwarded`].
#[derive(Debug, Clone)]
pub(crate) struct Forwarded<'a> {
    rest: &'a [u8],
    done: bool,
}

impl Iterator for Forwarded<'_> {
    type Item = Node;

    fn next(&mut self) -> Option<Node> {
        if self.done {
            return None;
        }
        loop {
            self.rest = trim_start_ows(self.rest);
            match self.rest.first() {
                None => {
                    self.done = true;
                    return None;
                }
                // Empty list element (RFC 9110 §5.6.1).
                Some(b',') => self.rest = &self.rest[1..],
                Some(_) => break,
            }
        }
        match parse_element(self.rest) {
            Ok((node, rest)) => {
                self.rest = rest;
                Some(node)
            }
            Err(()) => {
                self.done = true;
                Some(Node::Invalid)
            }
        }
    }
}

/// Parses one element up to and including its terminating comma.
fn parse_element(mut s: &[u8]) -> Result<(Node, &[u8]), ()> {
    let mut node: Option<Node> = None;
    loop {
        s = trim_start_ows(s);
        // forwarded-pair is optional between semicolons.
        if !matches!(s.first(), Some(b';' | b',') | None) {
            let name_len = s.iter().take_while(|&&b| is_tchar(b)).count();
            if name_len == 0 {
                return Err(());
            }
            let name = &s[..name_len];
            s = s[name_len..].strip_prefix(b"=").ok_or(())?;
            let mut buf = [0u8; MAX_NODE_LEN];
            let value: Option<&[u8]>;
            if s.first() == Some(&b'"') {
                let (len, rest) = quoted_string(&s[1..], &mut buf)?;
                value = len.map(|l| &buf[..l]);
                s = rest;
            } else {
                let len = s.iter().take_while(|&&b| is_tchar(b)).count();
                if len == 0 {
                    return Err(());
                }
                value = Some(&s[..len]);
                s = &s[len..];
            }
            if name.eq_ignore_ascii_case(b"for") {
                if node.is_some() {
                    return Err(()); // a parameter may appear once per element
                }
                node = Some(value.map_or(Node::Invalid, parse_forwarded_node));
            }
            s = trim_start_ows(s);
        }
        match s.first() {
            Some(b';') => s = &s[1..],
            Some(b',') => return Ok((node.unwrap_or(Node::Unknown), &s[1..])),
            None => return Ok((node.unwrap_or(Node::Unknown), s)),
            Some(_) => return Err(()),
        }
    }
}

/// Reads a quoted-string body (after the opening quote) into `buf`, unescaping.
/// Returns `None` as the length when the content is longer than `buf` (such a value
/// is no node), and the input after the closing quote.
fn quoted_string<'a>(s: &'a [u8], buf: &mut [u8]) -> Result<(Option<usize>, &'a [u8]), ()> {
    let mut len = 0usize;
    let mut overflow = false;
    let mut i = 0;
    while i < s.len() {
        let b = match s[i] {
            b'"' => return Ok(((!overflow).then_some(len), &s[i + 1..])),
            b'\\' => {
                i += 1;
                match s.get(i) {
                    Some(&c) if c == b'\t' || (0x20..0x7f).contains(&c) || c >= 0x80 => c,
                    _ => return Err(()),
                }
            }
            c if c == b'\t' || c == b' ' || c == 0x21 || (0x23..0x7f).contains(&c) || c >= 0x80 => {
                c
            }
            _ => return Err(()),
        };
        if len < buf.len() {
            buf[len] = b;
            len += 1;
        } else {
            overflow = true;
        }
        i += 1;
    }
    Err(()) // unterminated
}

/// node = nodename [ ":" node-port ]; nodename = IPv4 / "[" IPv6 "]" / "unknown" / obfnode.
fn parse_forwarded_node(v: &[u8]) -> Node {
    if let Some(n) = parse_word(v) {
        return n;
    }
    let (host, port) = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(close) = rest.iter().position(|&b| b == b']') else {
            return Node::Invalid;
        };
        let host = &v[..close + 2];
        match &rest[close + 1..] {
            [] => (host, None),
            [b':', port @ ..] => (host, Some(port)),
            _ => return Node::Invalid,
        }
    } else {
        match split_once(v, b':') {
            Some((h, p)) => (h, Some(p)),
            None => (v, None),
        }
    };
    if let Some(p) = port
        && !(is_port(p) || is_obfuscated(p))
    {
        return Node::Invalid;
    }
    if let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        return parse_v6(inner).map_or(Node::Invalid, Node::Ip);
    }
    match parse_ip(host) {
        Some(ip @ IpAddr::V4(_)) => Node::Ip(ip),
        _ if is_unknown_or_obf(host) => parse_word(host).unwrap_or(Node::Invalid),
        _ => Node::Invalid,
    }
}

fn is_unknown_or_obf(h: &[u8]) -> bool {
    h.eq_ignore_ascii_case(b"unknown") || is_obfuscated(h)
}

/// obfnode / obfport = "_" 1*( ALPHA / DIGIT / "." / "_" / "-" )
fn is_obfuscated(v: &[u8]) -> bool {
    v.len() > 1
        && v[0] == b'_'
        && v[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_port(p: &[u8]) -> bool {
    (1..=5).contains(&p.len())
        && p.iter().all(u8::is_ascii_digit)
        && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
}

fn parse_ip(b: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(b)
        .ok()?
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

fn parse_v6(b: &[u8]) -> Option<IpAddr> {
    let ip: Ipv6Addr = std::str::from_utf8(b).ok()?.parse().ok()?;
    Some(IpAddr::V6(ip).to_canonical())
}

fn split_once(b: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == sep)?;
    Some((&b[..i], &b[i + 1..]))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim_start_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let mut s = trim_start_ows(s);
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The most hops a walk looks at. A chain longer than this (all trusted) cannot be
/// resolved; real deployments have a handful of proxies.
pub(crate) const MAX_HOPS: usize = 32;

/// Walks a forwarding chain from the nearest hop outwards and returns the client.
///
/// `nodes_right_to_left` starts at the hop nearest to us (the rightmost header
/// entry). If the peer is not trusted it is the client and the headers are not
/// read. Otherwise each trusted address is skipped; the first untrusted address is
/// the client. An unknown, obfuscated or invalid node stops the walk with `None`:
/// the entry is never skipped past, since everything to its left could have been
/// written by anyone. If every hop is trusted, the leftmost one is the client. More
/// than [`MAX_HOPS`] trusted hops also yields `None`.
///
/// The result is therefore always the peer or an address that appears in the chain
/// with only trusted hops to its right.
pub(crate) fn walk<I, F>(peer: IpAddr, nodes_right_to_left: I, is_trusted: F) -> Option<IpAddr>
where
    I: IntoIterator<Item = Node>,
    F: Fn(IpAddr) -> bool,
{
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return Some(peer);
    }
    let mut client = peer;
    for (i, node) in nodes_right_to_left.into_iter().enumerate() {
        if i == MAX_HOPS {
            return None;
        }
        match node {
            Node::Ip(ip) if is_trusted(ip) => client = ip,
            Node::Ip(ip) => return Some(ip),
            Node::Unknown | Node::Obfuscated | Node::Invalid => return None,
        }
    }
    Some(client)
}

/// Hop-count mode: with a trusted peer, the client is the `depth`-th entry from the
/// right (1 = the entry the peer itself appended). Too few entries, or a node that is
/// not an address at that position, yields `None`. An untrusted peer is the client.
pub(crate) fn walk_depth<I, F>(
    peer: IpAddr,
    nodes_right_to_left: I,
    depth: usize,
    is_trusted: F,
) -> Option<IpAddr>
where
    I: IntoIterator<Item = Node>,
    F: Fn(IpAddr) -> bool,
{
    let peer = peer.to_canonical();
    if !is_trusted(peer) {
        return Some(peer);
    }
    match nodes_right_to_left.into_iter().nth(depth.checked_sub(1)?) {
        Some(Node::Ip(ip)) => Some(ip),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fwd(v: &str) -> Vec<Node> {
        parse_forwarded(v.as_bytes()).collect()
    }

    // RFC 7239 §4 examples.
    #[test]
    fn rfc7239_section4_examples() {
        assert_eq!(fwd(r#"for="_gazonk""#), [Node::Obfuscated]);
        assert_eq!(
            fwd(r#"For="[2001:db8:cafe::17]:4711""#),
            [Node::Ip(ip("2001:db8:cafe::17"))]
        );
        assert_eq!(
            fwd("for=192.0.2.60;proto=http;by=203.0.113.43"),
            [Node::Ip(ip("192.0.2.60"))]
        );
        assert_eq!(
            fwd("for=192.0.2.43, for=198.51.100.17"),
            [Node::Ip(ip("192.0.2.43")), Node::Ip(ip("198.51.100.17"))]
        );
    }

    // RFC 7239 §7.1: one value or split over several header instances, same chain.
    #[test]
    fn rfc7239_section7_examples() {
        let one = fwd(r#"for=192.0.2.43, for="[2001:db8:cafe::17]", for=unknown"#);
        let mut split = fwd("for=192.0.2.43");
        split.extend(fwd(r#"for="[2001:db8:cafe::17]", for=unknown"#));
        let want = [
            Node::Ip(ip("192.0.2.43")),
            Node::Ip(ip("2001:db8:cafe::17")),
            Node::Unknown,
        ];
        assert_eq!(one, want);
        assert_eq!(split, want);
        // §7.4: X-Forwarded-For transitions to Forwarded with the same nodes.
        let xff: Vec<Node> = parse_x_forwarded_for(b"192.0.2.43, 2001:db8:cafe::17")
            .rev()
            .collect();
        assert_eq!(xff, fwd(r#"for=192.0.2.43, for="[2001:db8:cafe::17]""#));
        // §6.3 obfuscated identifiers, §7.5 `by` without `for`.
        assert_eq!(fwd(r#"for=_hidden, for=_SEVKISEK"#), [Node::Obfuscated; 2]);
        assert_eq!(fwd("proto=https;by=203.0.113.43"), [Node::Unknown]);
    }

    #[test]
    fn forwarded_edge_cases() {
        // unquoted ports and brackets are not tokens: syntax error, stream ends.
        assert_eq!(fwd("for=192.0.2.1:80"), [Node::Invalid]);
        assert_eq!(fwd(r#"for="192.0.2.1:80""#), [Node::Ip(ip("192.0.2.1"))]);
        assert_eq!(fwd(r#"for="192.0.2.1:_p0rt""#), [Node::Ip(ip("192.0.2.1"))]);
        assert_eq!(fwd(r#"for="192.0.2.1:999999""#), [Node::Invalid]);
        assert_eq!(
            fwd(r#"for="[::ffff:192.0.2.1]""#),
            [Node::Ip(ip("192.0.2.1"))]
        );
        assert_eq!(fwd(r#"for="[2001:db8::1""#), [Node::Invalid]);
        assert_eq!(fwd(r#"for="unterminated, for=1.2.3.4"#), [Node::Invalid]);
        assert_eq!(fwd("for=1.2.3.4;for=5.6.7.8"), [Node::Invalid]);
        assert_eq!(
            fwd("for=1.2.3.4,,, for=5.6.7.8"),
            [Node::Ip(ip("1.2.3.4")), Node::Ip(ip("5.6.7.8"))]
        );
        assert_eq!(fwd(""), []);
        assert_eq!(fwd(" , "), []);
        assert_eq!(fwd("for="), [Node::Invalid]);
        assert_eq!(fwd("=1.2.3.4"), [Node::Invalid]);
        assert_eq!(fwd("for=1.2.3.4 garbage"), [Node::Invalid]);
        assert_eq!(
            fwd("for=1.2.3.4, garbage, for=5.6.7.8"),
            [Node::Ip(ip("1.2.3.4")), Node::Invalid]
        );
        assert_eq!(fwd(r#"for="\"1.2.3.4""#), [Node::Invalid]);
        assert_eq!(fwd(r#"for="1.2.3\.4""#), [Node::Ip(ip("1.2.3.4"))]);
        let long = format!(r#"for="{}""#, "1".repeat(100));
        assert_eq!(fwd(&long), [Node::Invalid]);
        assert_eq!(
            parse_forwarded(b"for=\xff").collect::<Vec<_>>(),
            [Node::Invalid]
        );
        assert_eq!(fwd(r#"for="2001:db8::1""#), [Node::Invalid]);
        assert_eq!(fwd("for=UNKNOWN"), [Node::Unknown]);
        assert_eq!(fwd("for=_"), [Node::Invalid]);
    }

    #[test]
    fn xff_forms() {
        let nodes = |v: &str| {
            parse_x_forwarded_for(v.as_bytes())
                .rev()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            nodes(" 1.2.3.4 ,\t[2001:db8::1]:80, 2001:db8::2, 5.6.7.8:443, [::ffff:9.9.9.9]"),
            [
                Node::Ip(ip("1.2.3.4")),
                Node::Ip(ip("2001:db8::1")),
                Node::Ip(ip("2001:db8::2")),
                Node::Ip(ip("5.6.7.8")),
                Node::Ip(ip("9.9.9.9")),
            ]
        );
        assert_eq!(
            nodes("unknown, _x, foo, 1.2.3.4:99999, [1.2.3.4]"),
            [
                Node::Unknown,
                Node::Obfuscated,
                Node::Invalid,
                Node::Invalid,
                Node::Invalid,
            ]
        );
        assert_eq!(nodes(",, ,"), []);
        assert_eq!(nodes("1.2.3.4\n"), [Node::Invalid]);
        assert_eq!(nodes("01.2.3.4"), [Node::Invalid]);
    }

    #[test]
    fn walk_stops_and_skips() {
        let trusted = |ip: IpAddr| matches!(ip, IpAddr::V4(v) if v.octets()[0] == 10);
        let peer = ip("10.0.0.1");
        let w = |v: &str| walk(peer, parse_x_forwarded_for(v.as_bytes()), trusted);
        assert_eq!(w(""), Some(peer));
        assert_eq!(w("1.1.1.1"), Some(ip("1.1.1.1")));
        assert_eq!(w("1.1.1.1, 10.0.0.2, 10.0.0.3"), Some(ip("1.1.1.1")));
        assert_eq!(w("6.6.6.6, 1.1.1.1, 10.0.0.3"), Some(ip("1.1.1.1")));
        assert_eq!(w("10.0.0.9, 10.0.0.3"), Some(ip("10.0.0.9")));
        assert_eq!(w("1.1.1.1, garbage, 10.0.0.3"), None);
        assert_eq!(w("1.1.1.1, unknown"), None);
        assert_eq!(w("1.1.1.1, _obf"), None);
        // untrusted peer: headers ignored
        assert_eq!(
            walk(ip("8.8.8.8"), parse_x_forwarded_for(b"1.1.1.1"), trusted),
            Some(ip("8.8.8.8"))
        );
        // mapped peer is normalised before the trust check
        assert_eq!(
            walk(
                ip("::ffff:10.0.0.1"),
                parse_x_forwarded_for(b"1.1.1.1"),
                trusted
            ),
            Some(ip("1.1.1.1"))
        );
        let many = vec!["10.0.0.5"; MAX_HOPS + 1].join(",");
        assert_eq!(w(&many), None);
    }

    #[test]
    fn doc_parse_x_forwarded_for_right_to_left() {
        let nodes: Vec<Node> = parse_x_forwarded_for(b"203.0.113.7, [2001:db8::1]:443").collect();
        assert_eq!(
            nodes,
            [
                Node::Ip("2001:db8::1".parse().unwrap()),
                Node::Ip("203.0.113.7".parse().unwrap())
            ]
        );
    }

    #[test]
    fn doc_parse_single_address_one_address() {
        assert_eq!(
            parse_single_address(b" 192.0.2.9 "),
            Node::Ip("192.0.2.9".parse().unwrap())
        );
        assert_eq!(
            parse_single_address(b"192.0.2.9, 192.0.2.10"),
            Node::Invalid
        );
    }

    #[test]
    fn doc_parse_forwarded_left_to_right() {
        let nodes: Vec<Node> =
            parse_forwarded(br#"for=192.0.2.43, For="[2001:db8:cafe::17]:4711";proto=https"#)
                .collect();
        assert_eq!(
            nodes,
            [
                Node::Ip("192.0.2.43".parse().unwrap()),
                Node::Ip("2001:db8:cafe::17".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn doc_walk_skips_trusted_hops() {
        let trusted = |ip: std::net::IpAddr| ip.to_string().starts_with("10.");
        let peer = "10.0.0.1".parse().unwrap();
        let chain = parse_x_forwarded_for(b"6.6.6.6, 203.0.113.9, 10.0.0.2");
        assert_eq!(
            walk(peer, chain, trusted),
            Some("203.0.113.9".parse().unwrap())
        );
    }

    #[test]
    fn doc_walk_depth_counts_from_the_right() {
        let peer = "10.0.0.1".parse().unwrap();
        let chain = || parse_x_forwarded_for(b"6.6.6.6, 203.0.113.9, 198.51.100.4");
        assert_eq!(
            walk_depth(peer, chain(), 2, |_| true),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(walk_depth(peer, chain(), 4, |_| true), None);
    }
}
