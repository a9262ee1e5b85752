//! Entry points of the cargo-fuzz targets in `fuzz/`, kept in the crate so that
//! `cargo test --all-features` replays each target's seed corpus through exactly the
//! code the fuzzer runs. Not a public API.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use crate::IpSet;
use crate::client_ip::{
    ClientIpConfig, ForwardedHeader, Node, parse_forwarded, parse_x_forwarded_for, walk,
};

/// `forwarded_headers` target. Input: one selector byte, then header values
/// separated by `\n` (one per header instance).
///
/// Checks, besides "no panic": the resolved client is the peer or an address that
/// appears in the chain with only trusted hops to its right; and the resolver over a
/// `HeaderMap` agrees with the pure walk over the same values.
pub fn forwarded_headers(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let trusted = IpSet::parse("10.0.0.0/8, fd00::/8, 127.0.0.0/8").expect("static list");
    let peers = ["10.0.0.1", "203.0.113.1", "fd00::1", "::ffff:10.0.0.1"];
    let peer: IpAddr = peers[usize::from(sel & 3)].parse().expect("static address");
    let header = if sel & 4 == 0 {
        ForwardedHeader::XForwardedFor
    } else {
        ForwardedHeader::Forwarded
    };
    let values: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();

    // Nodes right to left over all instances, the resolver's order.
    let mut nodes: Vec<Node> = Vec::new();
    for v in values.iter().rev() {
        let mut per: Vec<Node> = match header {
            ForwardedHeader::Forwarded => parse_forwarded(v).collect(),
            _ => parse_x_forwarded_for(v).rev().collect(),
        };
        per.reverse();
        nodes.extend(per);
    }
    let is_trusted = |ip: IpAddr| trusted.contains(ip);
    let client = walk(peer, nodes.iter().copied(), is_trusted);
    if let Some(c) = client {
        assert!(
            is_allowed_result(peer, &nodes, c, is_trusted),
            "resolved client is neither the peer nor reachable through trusted hops"
        );
    }

    let mut headers = HeaderMap::new();
    let name = match header {
        ForwardedHeader::Forwarded => "forwarded",
        _ => "x-forwarded-for",
    };
    let mut representable = true;
    for v in &values {
        match HeaderValue::from_bytes(v) {
            Ok(hv) => {
                headers.append(name, hv);
            }
            Err(_) => representable = false,
        }
    }
    if representable {
        let cfg = ClientIpConfig::trusted_proxy_set(trusted.clone()).header(header);
        assert_eq!(
            cfg.resolve(peer, &headers),
            client,
            "resolver and walk disagree"
        );
    }
}

/// The property every resolution must satisfy.
pub fn is_allowed_result(
    peer: IpAddr,
    nodes_right_to_left: &[Node],
    client: IpAddr,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> bool {
    let peer = peer.to_canonical();
    if client == peer {
        return true;
    }
    if !is_trusted(peer) {
        return false;
    }
    for n in nodes_right_to_left {
        match *n {
            Node::Ip(ip) if ip == client => return true,
            Node::Ip(ip) if is_trusted(ip) => continue,
            _ => return false,
        }
    }
    false
}

/// `ratelimit_fields` target. Input: one `RateLimit` or `RateLimit-Policy` field
/// value (both parsers run on it).
///
/// Checks, besides "no panic": whatever parses, written back out in the canonical
/// form, parses to the same items.
#[cfg(feature = "rate-limit")]
pub fn ratelimit_fields(data: &[u8]) {
    use crate::rate_limit::fields::{parse_ratelimit, parse_ratelimit_policy};

    fn sf_string(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    if let Ok(items) = parse_ratelimit(data) {
        let text: Vec<String> = items
            .iter()
            .map(|i| {
                let mut s = format!("{};r={}", sf_string(&i.name), i.remaining);
                if let Some(t) = i.reset {
                    s.push_str(&format!(";t={t}"));
                }
                if let Some(pk) = &i.partition_key {
                    s.push_str(&format!(";pk=:{pk}:"));
                }
                s
            })
            .collect();
        let again = parse_ratelimit(text.join(", ").as_bytes()).expect("canonical form parses");
        assert_eq!(again, items, "RateLimit round trip");
    }
    if let Ok(items) = parse_ratelimit_policy(data) {
        let text: Vec<String> = items
            .iter()
            .map(|i| {
                let mut s = format!("{};q={}", sf_string(&i.name), i.quota);
                if let Some(w) = i.window {
                    s.push_str(&format!(";w={w}"));
                }
                if let Some(qu) = &i.quota_unit {
                    s.push_str(&format!(";qu={}", sf_string(qu)));
                }
                if let Some(pk) = &i.partition_key {
                    s.push_str(&format!(";pk=:{pk}:"));
                }
                s
            })
            .collect();
        let again =
            parse_ratelimit_policy(text.join(", ").as_bytes()).expect("canonical form parses");
        assert_eq!(again, items, "RateLimit-Policy round trip");
    }
}
