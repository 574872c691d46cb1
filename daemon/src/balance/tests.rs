//! Selection tests: distributions with stated bounds, least-request preference, hash stickiness
//! and remapping on endpoint removal.

use super::*;
use crate::config::policy::{ConsistentHash, HashKey, LoadBalancer};

fn lb(algorithm: Algorithm) -> LoadBalancer {
    LoadBalancer {
        algorithm,
        locality: None,
        warmup: None,
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("198.18.{i}.2:8080")).collect()
}

fn hashed(ring: HashRing, n: usize) -> Balancer {
    Balancer::new(
        Some(&lb(Algorithm::ConsistentHash(ConsistentHash {
            key: HashKey::Header("x-user".into()),
            ring,
        }))),
        &vec![1; n],
        &keys(n),
    )
}

fn counts(b: &Balancer, picks: usize, cx: PickContext) -> Vec<usize> {
    let mut c = vec![0; b.len()];
    for _ in 0..picks {
        c[b.pick(cx).unwrap()] += 1;
    }
    c
}

#[test]
fn round_robin_is_weighted_and_interleaved() {
    let b = Balancer::new(Some(&lb(Algorithm::RoundRobin)), &[1, 1, 1], &keys(3));
    let picks: Vec<_> = (0..6)
        .map(|_| b.pick(PickContext::default()).unwrap())
        .collect();
    assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    let b = Balancer::new(Some(&lb(Algorithm::RoundRobin)), &[3, 1], &keys(2));
    let picks: Vec<_> = (0..8)
        .map(|_| b.pick(PickContext::default()).unwrap())
        .collect();
    assert_eq!(picks.iter().filter(|p| **p == 0).count(), 6);
    // Smooth: the light endpoint is not starved for three picks in a row at the start.
    assert_eq!(&picks[..4], &[0, 0, 1, 0]);
    // Weight 0 counts as 1.
    let b = Balancer::new(Some(&lb(Algorithm::RoundRobin)), &[0, 1], &keys(2));
    assert_eq!(counts(&b, 10, PickContext::default()), [5, 5]);
}

#[test]
fn random_follows_weights() {
    let b = Balancer::new(Some(&lb(Algorithm::Random)), &[3, 1], &keys(2));
    let c = counts(&b, 40_000, PickContext::default());
    // Expected 0.75; binomial sd ≈ 0.002, so ±0.02 is ten sd.
    let share = c[0] as f64 / 40_000.0;
    assert!((0.73..0.77).contains(&share), "{share}");
}

#[test]
fn least_request_avoids_busy_endpoints() {
    // Istio's default when no loadBalancer is set.
    let b = Balancer::new(None, &[1, 1, 1], &keys(3));
    assert_eq!(b.name(), "LEAST_REQUEST");
    let _busy: Vec<Active> = (0..10).map(|_| b.start(0)).collect();
    assert_eq!(b.active(0), 10);
    // Two distinct candidates: the busy one always loses a comparison, so it is never chosen.
    let c = counts(&b, 3000, PickContext::default());
    assert_eq!(c[0], 0, "{c:?}");
    assert!(c[1] > 1200 && c[2] > 1200, "{c:?}");
    drop(_busy);
    assert_eq!(b.active(0), 0, "guards release their request");
    let c = counts(&b, 3000, PickContext::default());
    assert!(
        c.iter().all(|x| *x > 800),
        "idle endpoints share evenly: {c:?}"
    );
}

#[test]
fn consistent_hash_is_sticky_and_falls_back_to_random() {
    for ring in [
        HashRing::RingHash {
            minimum_ring_size: 1024,
        },
        HashRing::Maglev { table_size: 65537 },
    ] {
        let b = hashed(ring.clone(), 5);
        let h = key_hash(b"alice");
        let first = b.pick(PickContext { hash: Some(h) }).unwrap();
        for _ in 0..100 {
            assert_eq!(
                b.pick(PickContext { hash: Some(h) }),
                Some(first),
                "{ring:?}"
            );
        }
        // No key: spread at random, like Envoy when the hash policy yields nothing.
        let c = counts(&b, 5000, PickContext::default());
        assert!(c.iter().all(|x| *x > 700), "{ring:?} {c:?}");
        // Many keys spread over every endpoint.
        let mut seen = vec![0; 5];
        for k in 0..5000 {
            let hash = Some(key_hash(format!("user-{k}").as_bytes()));
            seen[b.pick(PickContext { hash }).unwrap()] += 1;
        }
        assert!(seen.iter().all(|x| *x > 500), "{ring:?} {seen:?}");
    }
}

#[test]
fn removing_one_of_n_endpoints_remaps_about_one_nth_of_keys() {
    let n = 10;
    for (ring, bound) in [
        (
            HashRing::RingHash {
                minimum_ring_size: 1024,
            },
            0.16,
        ),
        // Maglev trades some extra movement for lookup speed.
        (HashRing::Maglev { table_size: 65537 }, 0.2),
    ] {
        let all = keys(n);
        let full = HashTable::ring(&all, &vec![1; n], 1024);
        let full = match &ring {
            HashRing::RingHash { .. } => full,
            HashRing::Maglev { table_size } => HashTable::maglev(&all, &vec![1; n], *table_size),
        };
        let fewer_keys: Vec<String> = all[..n - 1].to_vec();
        let fewer = match &ring {
            HashRing::RingHash { minimum_ring_size } => {
                HashTable::ring(&fewer_keys, &vec![1; n - 1], *minimum_ring_size)
            }
            HashRing::Maglev { table_size } => {
                HashTable::maglev(&fewer_keys, &vec![1; n - 1], *table_size)
            }
        };
        let total = 20_000;
        let moved = (0..total)
            .filter(|k| {
                let h = key_hash(format!("key-{k}").as_bytes());
                let before = full.lookup(h);
                // Keys on the removed endpoint must move; the others should stay.
                before != n - 1 && fewer.lookup(h) != before
            })
            .count();
        let on_removed = (0..total)
            .filter(|k| full.lookup(key_hash(format!("key-{k}").as_bytes())) == n - 1)
            .count() as f64
            / total as f64;
        let moved = moved as f64 / total as f64;
        // Total remapped = keys of the removed endpoint (≈ 1/N) + keys moved needlessly.
        let remapped = on_removed + moved;
        assert!(
            (0.05..bound).contains(&remapped),
            "{ring:?}: remapped {remapped:.3} (removed endpoint held {on_removed:.3})"
        );
    }
}

#[test]
fn alias_sampling_matches_uneven_weights() {
    let b = Balancer::new(Some(&lb(Algorithm::Random)), &[1, 2, 7], &keys(3));
    let n = 60_000.0;
    let c = counts(&b, n as usize, PickContext::default());
    // sd of each share is at most 0.002 here; ±0.015 is over 7 sd.
    for (got, want) in c.iter().zip([0.1, 0.2, 0.7]) {
        let share = *got as f64 / n;
        assert!((share - want).abs() < 0.015, "{c:?}");
    }
}
