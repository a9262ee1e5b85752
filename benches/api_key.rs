//! Cost of verifying a presented API key against stores of 1, 10 000 and 1 000 000
//! keys, beside the approach the reviewed services hand-rolled: a linear scan over
//! the raw keys with a constant-time comparison of each (no early exit, so the scan
//! itself leaks nothing about where a match was).
//!
//! `key_store` presents the next of up to 1024 valid keys spread over the store in
//! each iteration, so a large store pays the cache and TLB misses a real mix of
//! clients causes; `key_store_one_key` presents the same key every time, as the
//! 1-key store necessarily does, which isolates the algorithm from memory effects.
//! The scan over
//! 1 000 000 keys is left out: it costs milliseconds per request and would dominate
//! the run; 10 000 already shows the gap.

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use portcullis::api_key::{KeyRecord, KeyStore, generate_key};
use subtle::{Choice, ConstantTimeEq};

/// The hand-rolled check: compare the presented key with every configured key.
fn linear_ct_scan(keys: &[String], presented: &str) -> bool {
    let mut found = Choice::from(0);
    for k in keys {
        found |= k.as_bytes().ct_eq(presented.as_bytes());
    }
    found.into()
}

fn bench(c: &mut Criterion) {
    let now = SystemTime::now();
    let mut g = c.benchmark_group("api_key_verify");
    for n in [1usize, 10_000, 1_000_000] {
        let keys: Vec<String> = (0..n)
            .map(|_| generate_key("pc_live").unwrap().expose_secret().to_owned())
            .collect();
        let store = KeyStore::from_records(keys.iter().enumerate().map(|(i, k)| {
            KeyRecord::new(&format!("key-{i}"), portcullis::api_key::KeyDigest::of(k)).unwrap()
        }))
        .unwrap();
        // Fresh copies, allocated together: the probes' own cache misses are the
        // client's, not the store's.
        let probes: Vec<String> = (0..n.min(1024))
            .map(|i| keys[i * (n / n.min(1024))].clone())
            .collect();

        g.bench_with_input(BenchmarkId::new("key_store", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % probes.len();
                store.verify(black_box(&probes[i]), now).is_ok()
            })
        });
        if n > 1 {
            let one = probes[probes.len() / 2].as_str();
            g.bench_with_input(BenchmarkId::new("key_store_one_key", n), &n, |b, _| {
                b.iter(|| store.verify(black_box(one), now).is_ok())
            });
        }
        if n <= 10_000 {
            g.bench_with_input(BenchmarkId::new("linear_ct_scan", n), &n, |b, _| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % probes.len();
                    linear_ct_scan(black_box(&keys), black_box(&probes[i]))
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
