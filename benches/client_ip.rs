//! Cost of resolving the client address: the common direct case (untrusted peer, no
//! header parsing) and proxied requests with 3-hop chains in each header form.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use portcullis::client_ip::{ClientIpConfig, ForwardedHeader};

fn bench(c: &mut Criterion) {
    let cfg = ClientIpConfig::trusted_proxies("10.0.0.0/8, 172.16.0.0/12").unwrap();
    let fwd_cfg = cfg.clone().header(ForwardedHeader::Forwarded).unwrap();
    let mut xff = HeaderMap::new();
    xff.append(
        "x-forwarded-for",
        "198.51.100.7, 10.1.1.1, 10.2.2.2".parse().unwrap(),
    );
    let mut fwd = HeaderMap::new();
    fwd.append(
        "forwarded",
        r#"for=198.51.100.7;proto=https, for="10.1.1.1:443", for=10.2.2.2"#
            .parse()
            .unwrap(),
    );
    let direct: IpAddr = "203.0.113.9".parse().unwrap();
    let proxy: IpAddr = "10.0.0.1".parse().unwrap();

    let mut g = c.benchmark_group("client_ip");
    g.bench_function("untrusted_peer", |b| {
        b.iter(|| cfg.resolve(black_box(direct), black_box(&xff)))
    });
    g.bench_function("x_forwarded_for_3_hops", |b| {
        b.iter(|| cfg.resolve(black_box(proxy), black_box(&xff)))
    });
    g.bench_function("forwarded_3_hops", |b| {
        b.iter(|| fwd_cfg.resolve(black_box(proxy), black_box(&fwd)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
