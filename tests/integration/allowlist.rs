//! IpAllowlistLayer over real TCP: v4, v6, mapped, deny-over-allow, behind proxies.

use portcullis::IpSet;
use portcullis::allowlist::IpAllowlistLayer;
use portcullis::client_ip::{ClientIpConfig, ClientIpLayer};
use tower::layer::util::Stack;

use crate::common::{Peer, get, get_from, ip, serve};

fn stack(
    client_ip: ClientIpConfig,
    allow: &str,
    deny: Option<&str>,
) -> Stack<IpAllowlistLayer, ClientIpLayer> {
    let mut l = IpAllowlistLayer::new(IpSet::parse(allow).unwrap());
    if let Some(d) = deny {
        l = l.deny(IpSet::parse(d).unwrap());
    }
    Stack::new(l, ClientIpLayer::new(client_ip))
}

#[tokio::test]
async fn allowed_and_denied_v4_v6_and_mapped() {
    // Dual-stack listener: v4 clients arrive as IPv4-mapped IPv6.
    let layers = stack(ClientIpConfig::peer_only(), "127.0.0.2, ::1", None);
    let addr = serve("[::]:0", layers, Peer::Attached).await;
    let v4 = std::net::SocketAddr::new(ip("127.0.0.1"), addr.port());
    let v6 = std::net::SocketAddr::new(ip("::1"), addr.port());

    let ok = get_from(Some(ip("127.0.0.2")), v4, &[]).await;
    assert_eq!((ok.status, ok.body.as_str()), (200, "127.0.0.2"));
    assert_eq!(get(v6, &[]).await.status, 200);

    let denied = get_from(Some(ip("127.0.0.3")), v4, &[]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        denied.body,
        r#"{"type":"about:blank","title":"Forbidden","status":403,"detail":"The request is not allowed."}"#
    );
    assert!(
        !denied.body.contains("127.0.0.3"),
        "never echoes the address"
    );

    // An IPv6 client against a v4-only list.
    let v4_only = serve(
        "[::]:0",
        stack(ClientIpConfig::peer_only(), "127.0.0.0/8", None),
        Peer::Attached,
    )
    .await;
    let r = get(std::net::SocketAddr::new(ip("::1"), v4_only.port()), &[]).await;
    assert_eq!(r.status, 403);
    let r = get(
        std::net::SocketAddr::new(ip("127.0.0.1"), v4_only.port()),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn deny_wins_over_allow() {
    let addr = serve(
        "127.0.0.1:0",
        stack(
            ClientIpConfig::peer_only(),
            "127.0.0.0/8",
            Some("127.0.0.3/32"),
        ),
        Peer::Attached,
    )
    .await;
    assert_eq!(get_from(Some(ip("127.0.0.2")), addr, &[]).await.status, 200);
    assert_eq!(get_from(Some(ip("127.0.0.3")), addr, &[]).await.status, 403);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_resolved_client_is_checked() {
    let cfg = ClientIpConfig::trusted_proxies("127.0.0.1").unwrap();
    let addr = serve(
        "127.0.0.1:0",
        stack(cfg, "10.0.0.0/8", None),
        Peer::Attached,
    )
    .await;
    // Through the proxy, from an internal client: allowed.
    let r = get_from(Some(ip("127.0.0.1")), addr, &[b"X-Forwarded-For: 10.1.2.3"]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "10.1.2.3"));
    // Through the proxy, from an outside client that forged an internal entry.
    let r = get_from(
        Some(ip("127.0.0.1")),
        addr,
        &[b"X-Forwarded-For: 10.1.2.3, 198.51.100.7"],
    )
    .await;
    assert_eq!(r.status, 403);
    // Directly, forging the header: the peer is not a proxy, the header is ignored.
    let r = get_from(Some(ip("127.0.0.9")), addr, &[b"X-Forwarded-For: 10.1.2.3"]).await;
    assert_eq!(r.status, 403);
    // The proxy reported something unusable: no client address, denied.
    let r = get_from(
        Some(ip("127.0.0.1")),
        addr,
        &[b"X-Forwarded-For: 10.1.2.3, unknown"],
    )
    .await;
    assert_eq!(r.status, 403);
}

#[test]
fn bad_lists_fail_at_construction_with_the_position() {
    let e = IpSet::parse("10.0.0.0/8, 300.1.1.1")
        .unwrap_err()
        .to_string();
    assert!(e.contains("entry 2"), "{e}");
    assert!(IpSet::parse("").is_err());
    assert!(IpSet::parse("10.0.0.0/8,,").is_err());
}
