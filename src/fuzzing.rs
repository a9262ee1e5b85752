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

/// `redactor` target: any bytes through the [`Redactor`](crate::redact::Redactor).
///
/// Checks, besides "no panic" and no hang: redaction is idempotent; the `&str` and
/// the bytes entry points agree, and valid UTF-8 stays valid; the URL-part entry
/// point (which also decodes percent-escapes) is idempotent on its own output's
/// secrets (it never reveals a shape the raw pass hid).
#[cfg(feature = "redact")]
pub fn redactor(data: &[u8]) {
    use crate::redact::Redactor;
    let r = Redactor::new();
    let once = r.redact_bytes(data);
    let twice = r.redact_bytes(&once);
    assert_eq!(once, twice, "redaction is not idempotent");
    if let Ok(s) = std::str::from_utf8(data) {
        let out = r.redact(s);
        assert_eq!(
            out.as_bytes(),
            &*once,
            "str and bytes entry points disagree"
        );
        let uri = r.redact_uri_part(s);
        assert_eq!(r.redact(&uri), uri, "redacted URL part still holds a shape");
    }
}

/// `query_redaction` target: a query string through
/// [`redact_query`](crate::redact::redact_query).
///
/// Checks: the parameters keep their number, order and names; a changed parameter
/// is exactly `name=REDACTED` for a sensitive name; the result is a fixed point.
#[cfg(feature = "redact")]
pub fn query_redaction(data: &[u8]) {
    use crate::redact::{Redactor, redact_query};
    let q = String::from_utf8_lossy(data);
    let out = redact_query(&q);
    assert_eq!(out.split('&').count(), q.split('&').count());
    let r = Redactor::new();
    for (before, after) in q.split('&').zip(out.split('&')) {
        if before != after {
            let (name, value) = before
                .split_once('=')
                .expect("only name=value pairs change");
            assert!(!value.is_empty(), "an empty value is kept");
            assert_eq!(after, format!("{name}=REDACTED"));
            let decoded = crate::redact::percent_decode(name.as_bytes(), true);
            assert!(r.is_sensitive_name(&String::from_utf8_lossy(&decoded)) || !decoded.is_ascii());
        }
    }
    assert_eq!(redact_query(&out), out, "not a fixed point");
}
