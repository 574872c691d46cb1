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

fn plan(levels: Vec<Vec<(u32, Vec<usize>)>>) -> Plan {
    Plan {
        weighted: levels.iter().any(|l| l.len() > 1),
        levels: levels
            .into_iter()
            .map(|groups| {
                groups
                    .into_iter()
                    .map(|(weight, members)| locality::Group {
                        locality: String::new(),
                        weight,
                        members,
                    })
                    .collect()
            })
            .collect(),
        excluded: Vec::new(),
        reason: String::new(),
    }
}

/// Shares of `picks` picks per endpoint, among the endpoints `accept` takes.
fn shares(b: &Balancer, picks: usize, accept: impl Fn(usize) -> bool) -> Vec<f64> {
    let mut c = vec![0; b.len()];
    for _ in 0..picks {
        c[b.pick_with(PickContext::default(), &accept).unwrap()] += 1;
    }
    c.iter().map(|x| *x as f64 / picks as f64).collect()
}

#[test]
fn priority_levels_spill_over_as_envoy_splits_load() {
    let b = Balancer::with_plan(
        Some(&lb(Algorithm::RoundRobin)),
        &[1; 6],
        &keys(6),
        Some(plan(vec![
            vec![(0, vec![0, 1, 2, 3])],
            vec![(0, vec![4])],
            vec![(0, vec![5])],
        ])),
    );
    // All healthy: every pick stays in priority 0, spread over its endpoints.
    let s = shares(&b, 4000, |_| true);
    assert_eq!(s[4] + s[5], 0.0, "{s:?}");
    assert!(s[..4].iter().all(|x| (0.2..0.3).contains(x)), "{s:?}");
    // One of four ejected: 75% healthy × 1.4 > 100%, still all in priority 0.
    let s = shares(&b, 4000, |i| i != 0);
    assert_eq!(s[0] + s[4] + s[5], 0.0, "{s:?}");
    // Two of four: 50% × 1.4 = 70% stays, 30% spills to priority 1.
    let s = shares(&b, 20_000, |i| i > 1);
    assert!((0.67..0.73).contains(&(s[2] + s[3])), "{s:?}");
    assert!((0.27..0.33).contains(&s[4]), "{s:?}");
    assert_eq!(s[5], 0.0);
    // Priority 0 gone and 1 gone: everything to priority 2.
    let s = shares(&b, 1000, |i| i == 5);
    assert_eq!(s[5], 1.0);
    // Nothing acceptable at all: no pick.
    assert_eq!(b.pick_with(PickContext::default(), |_| false), None);
}

#[test]
fn weighted_localities_share_by_weight_and_health() {
    let b = Balancer::with_plan(
        None,
        &[1; 4],
        &keys(4),
        Some(plan(vec![vec![(80, vec![0, 1]), (20, vec![2, 3])]])),
    );
    let s = shares(&b, 20_000, |_| true);
    assert!((0.77..0.83).contains(&(s[0] + s[1])), "{s:?}");
    // Half of the heavy locality ejected: its weight × min(1, 1.4 × 50%) = 56 against 20.
    let s = shares(&b, 20_000, |i| i != 0);
    assert!((0.70..0.77).contains(&s[1]), "{s:?}");
}

#[test]
fn warmup_ramps_new_endpoints_from_the_minimum_weight() {
    let window = std::time::Duration::from_secs(60);
    let warmup = policy::Warmup {
        duration: window,
        minimum_percent: 10.0,
        aggression: 1.0,
    };
    let settings = LoadBalancer {
        warmup: Some(warmup),
        ..lb(Algorithm::RoundRobin)
    };
    let b = Balancer::new(Some(&settings), &[1, 1], &keys(2));
    let w = b.warm.as_ref().unwrap();
    // Endpoint 0 has been there for ages; endpoint 1 joins at t0.
    let t0 = 10 * window.as_nanos() as u64;
    w.joined[0].store(0, Ordering::Relaxed);
    w.joined[1].store(t0, Ordering::Relaxed);
    let share_of_new = |at: u64| {
        let n = 20_000;
        (0..n).filter(|_| b.pick_at(at) == 1).count() as f64 / n as f64
    };
    // Just joined: the 10% minimum, so 0.1 / 1.1 of the picks.
    let s = share_of_new(t0 + 1_000_000);
    assert!((0.075..0.107).contains(&s), "{s}");
    // Half-way through a linear ramp: 0.5 / 1.5.
    let s = share_of_new(t0 + window.as_nanos() as u64 / 2);
    assert!((0.31..0.36).contains(&s), "{s}");
    // After the window: even.
    let s = share_of_new(t0 + window.as_nanos() as u64);
    assert!((0.47..0.53).contains(&s), "{s}");
    // Aggression 2 ramps faster: (0.25)^(1/2) = 0.5 at a quarter of the window.
    let fast = LoadBalancer {
        warmup: Some(policy::Warmup {
            aggression: 2.0,
            ..settings.warmup.clone().unwrap()
        }),
        ..settings.clone()
    };
    let b = Balancer::new(Some(&fast), &[1, 1], &keys(2));
    b.warm.as_ref().unwrap().joined[1].store(t0, Ordering::Relaxed);
    b.warm.as_ref().unwrap().joined[0].store(0, Ordering::Relaxed);
    assert!(
        (b.warm
            .as_ref()
            .unwrap()
            .factor(1, t0 + window.as_nanos() as u64 / 4)
            - 0.5)
            .abs()
            < 1e-9
    );
    // Not for RANDOM or hashing, as Envoy.
    let random = LoadBalancer {
        algorithm: Algorithm::Random,
        ..settings
    };
    assert!(
        Balancer::new(Some(&random), &[1, 1], &keys(2))
            .warm
            .is_none()
    );
}

#[test]
fn endpoints_that_stay_keep_their_join_time() {
    let settings = LoadBalancer {
        warmup: Some(policy::Warmup {
            duration: std::time::Duration::from_secs(60),
            minimum_percent: 10.0,
            aggression: 1.0,
        }),
        ..lb(Algorithm::LeastRequest)
    };
    let old = Balancer::new(Some(&settings), &[1, 1], &keys(2));
    old.warm.as_ref().unwrap().joined[0].store(5, Ordering::Relaxed);
    let new = Balancer::new(Some(&settings), &[1, 1, 1], &keys(3));
    // The new balancer's endpoint 1 is the old 0; its 0 and 2 are new.
    new.inherit_joined(&old, |i| (i == 1).then_some(0));
    let joined: Vec<u64> = (new.warm.as_ref().unwrap().joined.iter())
        .map(|t| t.load(Ordering::Relaxed))
        .collect();
    assert_eq!(joined[1], 5);
    assert!(joined[0] > 5 && joined[2] > 5);
    assert!(new.warmup_percent(0) < 100.0);
}
