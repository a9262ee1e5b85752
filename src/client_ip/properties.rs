//! Property tests on the forwarded-header parsers and the client-address walk.

use std::net::IpAddr;

use proptest::prelude::*;

use super::parse::{
    MAX_HOPS, Node, parse_forwarded, parse_single_address, parse_x_forwarded_for, walk, walk_depth,
};
use super::{ClientIpConfig, ForwardedHeader};
use crate::IpSet;

fn trusted() -> IpSet {
    IpSet::parse("10.0.0.0/8, fd00::/8").unwrap()
}

/// A hop as a proxy might write it.
#[derive(Clone, Debug)]
enum Hop {
    Trusted(IpAddr),
    Untrusted(IpAddr),
    Unknown,
    Obfuscated,
    Garbage(String),
}

fn hop() -> impl Strategy<Value = Hop> {
    prop_oneof![
        4 => (any::<[u8; 3]>()).prop_map(|b| Hop::Trusted(IpAddr::from([10, b[0], b[1], b[2]]))),
        1 => any::<u64>().prop_map(|x| Hop::Trusted(IpAddr::from(std::net::Ipv6Addr::from((0xfd00u128 << 112) | u128::from(x))))),
        4 => (1u8..=9, any::<[u8; 3]>()).prop_map(|(a, b)| Hop::Untrusted(IpAddr::from([a, b[0], b[1], b[2]]))),
        1 => any::<u64>().prop_map(|x| Hop::Untrusted(IpAddr::from(std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | u128::from(x))))),
        1 => Just(Hop::Unknown),
        1 => "_[a-z0-9]{1,6}".prop_map(|_| Hop::Obfuscated),
        1 => "[a-z]{1,5}".prop_map(Hop::Garbage),
    ]
}

fn hop_trusted() -> impl Strategy<Value = Hop> {
    any::<[u8; 3]>().prop_map(|b| Hop::Trusted(IpAddr::from([10, b[0], b[1], b[2]])))
}

/// One `Forwarded` element: a hop, or a syntax error that ends its value.
fn forwarded_element() -> impl Strategy<Value = String> {
    prop_oneof![
        38 => hop().prop_map(|h| forwarded_text(&h)),
        1 => Just(r#"for="10.0.0.7"#.to_owned()),
        1 => Just("for=10.0.0.7:80".to_owned()),
    ]
}

fn xff_text(h: &Hop) -> String {
    match h {
        Hop::Trusted(ip) | Hop::Untrusted(ip) => ip.to_string(),
        Hop::Unknown => "unknown".into(),
        Hop::Obfuscated => "_hidden".into(),
        Hop::Garbage(g) => g.clone(),
    }
}

fn forwarded_text(h: &Hop) -> String {
    match h {
        Hop::Trusted(IpAddr::V6(ip)) | Hop::Untrusted(IpAddr::V6(ip)) => {
            format!("for=\"[{ip}]:443\"")
        }
        Hop::Trusted(ip) | Hop::Untrusted(ip) => format!("for={ip};proto=https"),
        Hop::Unknown => "for=unknown".into(),
        Hop::Obfuscated => "for=_hidden".into(),
        Hop::Garbage(g) => format!("for=\"{g}\""),
    }
}

/// The client by the definition, computed from the hops rather than the text.
fn model(peer: IpAddr, hops: &[Hop]) -> Option<IpAddr> {
    let set = trusted();
    if !set.contains(peer) {
        return Some(peer);
    }
    let mut client = peer;
    for (i, h) in hops.iter().rev().enumerate() {
        if i == MAX_HOPS {
            return None;
        }
        match h {
            Hop::Trusted(ip) => client = *ip,
            Hop::Untrusted(ip) => return Some(*ip),
            _ => return None,
        }
    }
    Some(client)
}

/// Whether `client` appears in the chain with only trusted hops to its right.
fn reached_through_trusted_hops(hops: &[Hop], client: IpAddr) -> bool {
    for h in hops.iter().rev() {
        match h {
            Hop::Trusted(ip) | Hop::Untrusted(ip) if *ip == client => return true,
            Hop::Trusted(_) => {}
            _ => return false,
        }
    }
    false
}

fn peer() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        Just("10.0.0.1".parse().unwrap()),
        Just("192.0.2.1".parse().unwrap()),
        Just("::ffff:10.0.0.1".parse().unwrap())
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_forwarded(&bytes).count();
        let _ = parse_x_forwarded_for(&bytes).count();
        let _ = parse_x_forwarded_for(&bytes).rev().count();
        let _ = parse_single_address(&bytes);
        let set = trusted();
        let _ = walk("10.0.0.1".parse().unwrap(), parse_x_forwarded_for(&bytes), |ip| set.contains(ip));
    }

    #[test]
    fn forwarded_like_text_never_panics(s in r#"((for|For|by|proto)=("[^"\\]{0,20}"|[a-z0-9._:\[\]]{0,12})[;, ]{0,2}){0,6}"#) {
        let _ = parse_forwarded(s.as_bytes()).count();
    }

    /// Resolution over XFF text split into random header instances equals the model
    /// and satisfies the property: peer, or an address with only trusted hops to its right.
    #[test]
    fn xff_walk_matches_model(peer in peer(), hops in proptest::collection::vec(hop(), 0..40), split in any::<prop::sample::Index>()) {
        let text: Vec<String> = hops.iter().map(xff_text).collect();
        let cut = if hops.is_empty() { 0 } else { split.index(hops.len() + 1) };
        let values = [text[..cut].join(", "), text[cut..].join(",")];
        let nodes: Vec<Node> = values.iter().rev().flat_map(|v| parse_x_forwarded_for(v.as_bytes()).collect::<Vec<_>>()).collect();
        let set = trusted();
        let got = walk(peer, nodes.iter().copied(), |ip| set.contains(ip));
        prop_assert_eq!(got, model(peer.to_canonical(), &hops));
        if let Some(c) = got {
            prop_assert!(c == peer.to_canonical() || reached_through_trusted_hops(&hops, c));
        }
    }

    #[test]
    fn forwarded_walk_matches_model(peer in peer(), hops in proptest::collection::vec(hop(), 0..40)) {
        let text = hops.iter().map(forwarded_text).collect::<Vec<_>>().join(", ");
        let mut nodes: Vec<Node> = parse_forwarded(text.as_bytes()).collect();
        nodes.reverse();
        let set = trusted();
        prop_assert_eq!(walk(peer, nodes, |ip| set.contains(ip)), model(peer.to_canonical(), &hops));
    }

    /// The resolver over `Forwarded` values of any length (a long run of trusted hops
    /// on the right, broken elements anywhere), split over header instances, equals
    /// the walk over every node of every value, in both modes: the last entries it
    /// keeps of each value are all that a walk can look at.
    #[test]
    fn forwarded_resolver_matches_the_whole_chain(
        peer in peer(),
        head in proptest::collection::vec(forwarded_element(), 0..40),
        tail in proptest::collection::vec(hop_trusted(), 0..50),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
        depth in prop::option::of(1usize..=MAX_HOPS),
    ) {
        let mut text = head;
        text.extend(tail.iter().map(forwarded_text));
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c.index(text.len() + 1)).collect();
        bounds.extend([0, text.len()]);
        bounds.sort_unstable();
        bounds.dedup();
        let values: Vec<String> = bounds.windows(2).map(|w| text[w[0]..w[1]].join(", ")).collect();
        let mut headers = http::HeaderMap::new();
        for v in &values {
            headers.append(http::header::FORWARDED, http::HeaderValue::from_str(v).unwrap());
        }
        let whole: Vec<Node> = values
            .iter()
            .rev()
            .flat_map(|v| {
                let mut nodes: Vec<Node> = parse_forwarded(v.as_bytes()).collect();
                nodes.reverse();
                nodes
            })
            .collect();
        let set = trusted();
        let cfg = ClientIpConfig::trusted_proxy_set(set.clone()).header(ForwardedHeader::Forwarded).unwrap();
        let (cfg, want) = match depth {
            None => (cfg, walk(peer, whole, |ip| set.contains(ip))),
            Some(d) => (cfg.depth(d).unwrap(), walk_depth(peer, whole, d, |ip| set.contains(ip))),
        };
        prop_assert_eq!(cfg.resolve(peer, &headers), want);
    }

    /// After the layer, the request's `ClientIp` is the one this layer resolved, or
    /// none: never one an outer layer (e.g. a peer-only one, which saw the proxy)
    /// put there before it.
    #[test]
    fn the_layer_leaves_only_its_own_address(
        peer in peer(),
        hops in proptest::collection::vec(hop(), 0..6),
        earlier in prop::option::of(prop_oneof![
            Just("10.0.0.1".parse::<IpAddr>().unwrap()),
            Just("192.0.2.1".parse().unwrap()),
        ]),
    ) {
        let text = hops.iter().map(xff_text).collect::<Vec<_>>().join(", ");
        let mut req = http::Request::new(());
        req.headers_mut().append("x-forwarded-for", http::HeaderValue::from_str(&text).unwrap());
        req.extensions_mut().insert(super::PeerAddr(std::net::SocketAddr::new(peer, 443)));
        if let Some(ip) = earlier {
            req.extensions_mut().insert(crate::ClientIp::new(ip));
        }
        let cfg = ClientIpConfig::trusted_proxy_set(trusted());
        let want = cfg.resolve(peer, req.headers()).map(crate::ClientIp::new);
        let got = super::resolve(&cfg, &mut req).ok().flatten();
        prop_assert_eq!(got, want);
        prop_assert_eq!(req.extensions().get::<crate::ClientIp>().copied(), want);
    }

    /// Depth mode only ever picks an address that is in the header, or the peer.
    #[test]
    fn depth_picks_from_the_header(peer in peer(), hops in proptest::collection::vec(hop(), 0..10), depth in 1usize..12) {
        let text = hops.iter().map(xff_text).collect::<Vec<_>>().join(",");
        let set = trusted();
        let got = walk_depth(peer, parse_x_forwarded_for(text.as_bytes()), depth, |ip| set.contains(ip));
        if let Some(c) = got {
            let in_header = hops.iter().any(|h| matches!(h, Hop::Trusted(ip) | Hop::Untrusted(ip) if *ip == c));
            prop_assert!(c == peer.to_canonical() || in_header);
        }
    }

    /// A single-value header (`X-Real-IP`, `CF-Connecting-IP`, `True-Client-IP`,
    /// `Fly-Client-IP`, `Fastly-Client-IP`): from an untrusted peer the peer, whatever
    /// the header says; from a trusted peer the one value's address exactly when a
    /// standard parser reads it as one address (with an optional port, or brackets),
    /// nothing for two instances or anything else, and never an address a standard
    /// parser would not read there.
    #[test]
    fn single_value_headers_are_strict(
        peer in peer(),
        header in prop::sample::select(vec![
            ForwardedHeader::XRealIp,
            ForwardedHeader::CfConnectingIp,
            ForwardedHeader::TrueClientIp,
            ForwardedHeader::FlyClientIp,
            ForwardedHeader::FastlyClientIp,
        ]),
        values in proptest::collection::vec(prop_oneof![
            3 => well_formed_single().prop_map(|v| (v, true)),
            1 => "[0-9a-fA-F:.\\[\\], \t_unkow]{0,24}".prop_map(|v| (v, false)),
        ], 0..3),
    ) {
        let name = header.single_value_name().unwrap();
        let mut headers = http::HeaderMap::new();
        for (v, _) in &values {
            headers.append(name, http::HeaderValue::from_str(v).unwrap());
        }
        // A client-written header of another kind is never read.
        headers.append("x-forwarded-for", http::HeaderValue::from_static("192.0.2.77"));
        let got = ClientIpConfig::trusted_proxy_set(trusted()).header(header).unwrap().resolve(peer, &headers);
        let peer = peer.to_canonical();
        if !trusted().contains(peer) {
            prop_assert_eq!(got, Some(peer));
            return Ok(());
        }
        match values.as_slice() {
            [] => prop_assert_eq!(got, Some(peer)),
            [(one, generated)] => {
                let oracle = std_single(one);
                prop_assert!(got.is_none() || got == oracle, "{:?} -> {:?}, std {:?}", one, got, oracle);
                if *generated {
                    prop_assert!(oracle.is_some());
                    prop_assert_eq!(got, oracle);
                }
            }
            _ => prop_assert_eq!(got, None),
        }
    }
}

/// One address as a proxy writes it: v4, v6, mapped, with a port, bracketed.
fn well_formed_single() -> impl Strategy<Value = String> {
    let ip = prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(|s| IpAddr::from(std::net::Ipv6Addr::from(s))),
        any::<[u8; 4]>().prop_map(|b| IpAddr::V6(std::net::Ipv4Addr::from(b).to_ipv6_mapped())),
    ];
    (ip, any::<Option<u16>>(), any::<bool>(), "[ \t]{0,2}").prop_map(|(ip, port, brackets, pad)| {
        let text = match (ip, port, brackets) {
            (IpAddr::V4(v4), Some(p), _) => format!("{v4}:{p}"),
            (IpAddr::V6(v6), Some(p), _) => format!("[{v6}]:{p}"),
            (IpAddr::V6(v6), None, true) => format!("[{v6}]"),
            (ip, None, _) => ip.to_string(),
        };
        format!("{pad}{text}{pad}")
    })
}

/// The address the standard library reads in a single-value header value.
fn std_single(v: &str) -> Option<IpAddr> {
    let t = v.trim_matches([' ', '\t']);
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = t.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

/// One call of the configuration's builder.
#[derive(Clone, Copy, Debug)]
enum Setting {
    Header(ForwardedHeader),
    Depth(usize),
}

fn any_header() -> impl Strategy<Value = ForwardedHeader> {
    prop::sample::select(vec![
        ForwardedHeader::XForwardedFor,
        ForwardedHeader::Forwarded,
        ForwardedHeader::XRealIp,
        ForwardedHeader::CfConnectingIp,
        ForwardedHeader::TrueClientIp,
        ForwardedHeader::FlyClientIp,
        ForwardedHeader::FastlyClientIp,
    ])
}

proptest! {
    /// Every configuration the builder accepts, whatever the order of its calls,
    /// does what each call says: the header it names is the one read, from a trusted
    /// peer, and a depth picks that many entries from the right. A call that would
    /// have no effect (a header on a peer-only configuration, a depth with a
    /// single-value header) is refused instead of ignored.
    #[test]
    fn every_accepted_setting_takes_effect(
        peer_only: bool,
        settings in proptest::collection::vec(prop_oneof![
            any_header().prop_map(Setting::Header),
            (1usize..=4).prop_map(Setting::Depth),
        ], 0..4),
    ) {
        let mut cfg = Ok(if peer_only {
            ClientIpConfig::peer_only()
        } else {
            ClientIpConfig::trusted_proxy_set(trusted())
        });
        let (mut header, mut depth, mut called) = (ForwardedHeader::XForwardedFor, None, false);
        for s in settings {
            cfg = cfg.and_then(|c| {
                called = true;
                match s {
                Setting::Header(h) => {
                    header = h;
                    c.header(h)
                }
                Setting::Depth(d) => {
                    depth = Some(d);
                    c.depth(d)
                }
                }
            });
        }
        // What the calls made so far (up to a refused one) would leave without effect.
        let void = (peer_only && called) || (depth.is_some() && header.single_value_name().is_some());
        let Ok(cfg) = cfg else {
            prop_assert!(void, "refused: {:?} {:?}", header, depth);
            return Ok(());
        };
        prop_assert!(!void, "accepted: {:?} {:?}", header, depth);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let client: IpAddr = "192.0.2.9".parse().unwrap();
        let mut headers = http::HeaderMap::new();
        // The client's entry, then `depth - 1` more proxies: the entry a depth of
        // `depth` picks, and the first untrusted one from the right.
        let proxies = depth.unwrap_or(1) - 1;
        let entries: Vec<String> = std::iter::once(client.to_string())
            .chain((0..proxies).map(|i| format!("10.0.1.{i}")))
            .collect();
        let value = match header {
            ForwardedHeader::Forwarded => entries.iter().map(|e| format!("for={e}")).collect::<Vec<_>>().join(", "),
            _ => entries.join(", "),
        };
        let name = header.single_value_name().cloned().unwrap_or(match header {
            ForwardedHeader::Forwarded => http::header::FORWARDED,
            _ => http::HeaderName::from_static("x-forwarded-for"),
        });
        headers.append(name, http::HeaderValue::from_str(&value).unwrap());
        let want = if peer_only { peer } else { client };
        prop_assert_eq!(cfg.resolve(peer, &headers), Some(want));
    }
}
