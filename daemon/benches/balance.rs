//! Selection cost per algorithm and endpoint count (3, 100, 10 000): one `pick` on a built
//! balancer, as the data path does per request or connection. Run with `cargo xtask bench`.

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use drover::{
    balance::{Balancer, PickContext, key_hash},
    config::policy::{Algorithm, ConsistentHash, HashKey, HashRing, LoadBalancer},
};

fn lb(algorithm: Algorithm) -> LoadBalancer {
    LoadBalancer {
        algorithm,
        locality: None,
        warmup: None,
    }
}

fn hash(ring: HashRing) -> Algorithm {
    Algorithm::ConsistentHash(ConsistentHash {
        key: HashKey::Header("x-user".into()),
        ring,
    })
}

fn selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in [3usize, 100, 10_000] {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("198.18.{}.{}:8080", i / 250, i % 250))
            .collect();
        // Unequal weights exercise the weighted paths.
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 3) as u32).collect();
        let algorithms = [
            ("ROUND_ROBIN", lb(Algorithm::RoundRobin)),
            ("LEAST_REQUEST", lb(Algorithm::LeastRequest)),
            ("RANDOM", lb(Algorithm::Random)),
            (
                "RING_HASH",
                lb(hash(HashRing::RingHash {
                    minimum_ring_size: 1024,
                })),
            ),
            ("MAGLEV", lb(hash(HashRing::Maglev { table_size: 65537 }))),
        ];
        for (name, policy) in algorithms {
            let b = Balancer::new(Some(&policy), &weights, &keys);
            let mut k = 0u64;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    k = k.wrapping_add(1);
                    let cx = PickContext {
                        hash: Some(key_hash(&k.to_le_bytes())),
                    };
                    black_box(b.pick(black_box(cx)))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, selection);
criterion_main!(benches);
