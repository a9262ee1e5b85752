//! ClientIpLayer over real TCP: the peer, trusted proxy chains, spoofing, garbage.

use portcullis::client_ip::{ClientIpConfig, ClientIpLayer, ForwardedHeader};

use crate::common::{Peer, get, get_from, ip, serve};

fn trusted(cidrs: &str) -> ClientIpLayer {
    ClientIpLayer::new(ClientIpConfig::trusted_proxies(cidrs).unwrap())
}

#[tokio::test]
async fn no_trusted_proxies_means_headers_are_ignored() {
    let addr = serve(
        "127.0.0.1:0",
        ClientIpLayer::new(ClientIpConfig::peer_only()),
        Peer::Attached,
    )
    .await;
    let r = get_from(
        Some(ip("127.0.0.7")),
        addr,
        &[
            b"X-Forwarded-For: 203.0.113.66",
            b"Forwarded: for=203.0.113.66",
            b"X-Real-IP: 203.0.113.66",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "127.0.0.7");
}

#[tokio::test]
async fn spoofed_header_from_an_untrusted_peer_is_ignored() {
    // Only 127.0.0.1 is a proxy; 127.0.0.9 is a client writing its own header.
    let addr = serve("127.0.0.1:0", trusted("127.0.0.1"), Peer::Attached).await;
    let r = get_from(Some(ip("127.0.0.9")), addr, &[b"X-Forwarded-For: 10.0.0.1"]).await;
    assert_eq!(r.body, "127.0.0.9");
}

#[tokio::test]
async fn trusted_chain_of_one_hop() {
    let addr = serve("127.0.0.1:0", trusted("127.0.0.1"), Peer::Attached).await;
    let r = get_from(
        Some(ip("127.0.0.1")),
        addr,
        &[b"X-Forwarded-For: 198.51.100.7"],
    )
    .await;
    assert_eq!(r.body, "198.51.100.7");
    // No header from the trusted proxy: the proxy itself is the client.
    let r = get_from(Some(ip("127.0.0.1")), addr, &[]).await;
    assert_eq!(r.body, "127.0.0.1");
}

#[tokio::test]
async fn trusted_chain_of_three_hops_skips_proxies_and_client_spoofing() {
    // client -> 10.0.0.2 -> 10.0.0.3 -> 127.0.0.1 (peer) -> us; the client
    // prepended its own fake entries.
    let addr = serve(
        "127.0.0.1:0",
        trusted("127.0.0.0/8, 10.0.0.0/8"),
        Peer::Attached,
    )
    .await;
    let r = get_from(
        Some(ip("127.0.0.1")),
        addr,
        &[
            b"X-Forwarded-For: 10.9.9.9, 6.6.6.6, 198.51.100.7, 10.0.0.2",
            b"X-Forwarded-For: 10.0.0.3",
        ],
    )
    .await;
    assert_eq!(r.body, "198.51.100.7");

    let fwd = ClientIpLayer::new(
        ClientIpConfig::trusted_proxies("127.0.0.0/8, 10.0.0.0/8")
            .unwrap()
            .header(ForwardedHeader::Forwarded)
            .unwrap(),
    );
    let addr = serve("127.0.0.1:0", fwd, Peer::Attached).await;
    let r = get_from(
        Some(ip("127.0.0.1")),
        addr,
        &[
            b"Forwarded: for=6.6.6.6",
            br#"Forwarded: for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.2"#,
            br#"forwarded: For="10.0.0.3:443";by=_lb"#,
        ],
    )
    .await;
    assert_eq!(r.body, "2001:db8:cafe::17");
}

#[tokio::test]
async fn unusable_entries_stop_the_walk() {
    let addr = serve("127.0.0.1:0", trusted("127.0.0.0/8"), Peer::Attached).await;
    for h in [
        &b"X-Forwarded-For: 198.51.100.7, garbage"[..],
        b"X-Forwarded-For: 198.51.100.7, unknown",
        b"X-Forwarded-For: 198.51.100.7, _hidden",
        b"X-Forwarded-For: 198.51.100.7, 127.0.0.1:99999",
        b"X-Forwarded-For: 198.51.100.7, \xff\xfe",
    ] {
        let r = get_from(Some(ip("127.0.0.1")), addr, &[h]).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "none", "{}", String::from_utf8_lossy(h));
    }
    // An oversized header of trusted hops is not walked past MAX_HOPS.
    let long = format!("X-Forwarded-For: 198.51.100.7{}", ", 127.0.0.5".repeat(500));
    let r = get_from(Some(ip("127.0.0.1")), addr, &[long.as_bytes()]).await;
    assert_eq!(r.body, "none");
    // Empty values and empty elements are not hops.
    let r = get_from(
        Some(ip("127.0.0.1")),
        addr,
        &[b"X-Forwarded-For: 198.51.100.7,, ,", b"X-Forwarded-For:"],
    )
    .await;
    assert_eq!(r.body, "198.51.100.7");
}

#[tokio::test]
async fn ipv6_peer_and_ipv4_mapped_peer() {
    let addr = serve("[::]:0", trusted("::1, 127.0.0.1"), Peer::Attached).await;
    let v6 = std::net::SocketAddr::new(ip("::1"), addr.port());
    let r = get(v6, &[b"X-Forwarded-For: 2001:db8::42"]).await;
    assert_eq!(r.body, "2001:db8::42");
    // A v4 client on a dual-stack socket arrives as ::ffff:127.0.0.1 and is
    // normalised, so the IPv4 trusted entry matches it.
    let v4 = std::net::SocketAddr::new(ip("127.0.0.1"), addr.port());
    let r = get(v4, &[b"X-Forwarded-For: ::ffff:198.51.100.7"]).await;
    assert_eq!(r.body, "198.51.100.7");
    let r = get(v4, &[]).await;
    assert_eq!(r.body, "127.0.0.1");
}

#[tokio::test]
async fn depth_mode_and_x_real_ip() {
    let depth = ClientIpLayer::new(
        ClientIpConfig::trusted_proxies("127.0.0.1")
            .unwrap()
            .depth(2)
            .unwrap(),
    );
    let addr = serve("127.0.0.1:0", depth, Peer::Attached).await;
    let r = get(
        addr,
        &[b"X-Forwarded-For: 6.6.6.6, 198.51.100.7, 203.0.113.1"],
    )
    .await;
    assert_eq!(r.body, "198.51.100.7");
    let r = get(addr, &[b"X-Forwarded-For: 203.0.113.1"]).await;
    assert_eq!(r.body, "none");

    let real = ClientIpLayer::new(
        ClientIpConfig::trusted_proxies("127.0.0.1")
            .unwrap()
            .header(ForwardedHeader::XRealIp)
            .unwrap(),
    );
    let addr = serve("127.0.0.1:0", real, Peer::Attached).await;
    assert_eq!(
        get(addr, &[b"X-Real-IP: 198.51.100.7"]).await.body,
        "198.51.100.7"
    );
    assert_eq!(
        get(addr, &[b"X-Real-IP: 1.1.1.1", b"X-Real-IP: 2.2.2.2"])
            .await
            .body,
        "none"
    );
    // The other headers are not read in X-Real-IP mode.
    assert_eq!(
        get(addr, &[b"X-Forwarded-For: 198.51.100.7"]).await.body,
        "127.0.0.1"
    );
}

#[tokio::test]
async fn missing_peer_address_is_a_loud_500() {
    let capture = crate::log_capture::capture();
    let addr = serve(
        "127.0.0.1:0",
        ClientIpLayer::new(ClientIpConfig::peer_only()),
        Peer::Missing,
    )
    .await;
    let r = get(addr, &[]).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(
        !r.body.contains("PeerAddr"),
        "wiring details stay in the log"
    );
    // Every such request is a 500; the log says so once, with both remedies (this
    // is the only test of this binary that serves without a peer address).
    for _ in 0..3 {
        assert_eq!(get(addr, &[]).await.status, 500);
    }
    let said = capture.events_with("requests have no peer address");
    assert_eq!(said.len(), 1, "{said:?}");
    let message = said[0]["fields"]["message"].as_str().unwrap();
    assert!(message.contains("into_make_service_with_connect_info::<SocketAddr>()"));
    assert!(message.contains("PeerAddrLayer"));
}

#[test]
fn configuration_errors() {
    assert!(ClientIpConfig::trusted_proxies("").is_err());
    assert!(ClientIpConfig::trusted_proxies("10.0.0.0/8, nope").is_err());
    assert!(ClientIpConfig::peer_only().depth(1).is_err());
    let t = ClientIpConfig::trusted_proxies("10.0.0.0/8").unwrap();
    assert!(t.clone().depth(0).is_err());
    assert!(t.clone().depth(33).is_err());
    assert!(t.depth(3).is_ok());
}

#[tokio::test]
async fn cdn_single_value_headers_are_read_only_from_the_edge() {
    let cases: [(ForwardedHeader, &str); 4] = [
        (ForwardedHeader::CfConnectingIp, "CF-Connecting-IP"),
        (ForwardedHeader::TrueClientIp, "True-Client-IP"),
        (ForwardedHeader::FlyClientIp, "Fly-Client-IP"),
        (ForwardedHeader::FastlyClientIp, "Fastly-Client-IP"),
    ];
    for (header, name) in cases {
        // The CDN's edge is 127.0.0.0/28; 127.0.0.99 is a client connecting directly.
        let layer = ClientIpLayer::new(
            ClientIpConfig::trusted_proxies("127.0.0.0/28")
                .unwrap()
                .header(header)
                .unwrap(),
        );
        let addr = serve("127.0.0.1:0", layer, Peer::Attached).await;
        let line = |v: &str| format!("{name}: {v}");
        let edge = Some(ip("127.0.0.3"));
        let one = line("203.0.113.5");
        let r = get_from(edge, addr, &[one.as_bytes()]).await;
        assert_eq!(r.body, "203.0.113.5", "{name}");
        let v6 = line("[2001:db8::7]:443");
        assert_eq!(
            get_from(edge, addr, &[v6.as_bytes()]).await.body,
            "2001:db8::7"
        );
        // From outside the edge the header is the client's own: ignored.
        let r = get_from(Some(ip("127.0.0.99")), addr, &[one.as_bytes()]).await;
        assert_eq!(r.body, "127.0.0.99", "{name}");
        // Other forwarding headers are not read when a CDN header is chosen.
        let r = get_from(edge, addr, &[b"X-Forwarded-For: 198.51.100.1"]).await;
        assert_eq!(r.body, "127.0.0.3", "{name}");
        // Two instances, a list, garbage: no address, never a guess.
        let bad_requests: [Vec<String>; 5] = [
            vec![one.clone(), line("198.51.100.1")],
            vec![line("203.0.113.5, 198.51.100.1")],
            vec![line("unknown")],
            vec![line("203.0.113.5:99999")],
            vec![line("203.0.113.005")],
        ];
        for bad in bad_requests {
            let bad: Vec<&[u8]> = bad.iter().map(|l| l.as_bytes()).collect();
            let r = get_from(edge, addr, &bad).await;
            assert_eq!(r.body, "none", "{name}: {bad:?}");
        }
    }
}
