//! Endpoint selection for one cluster, as Envoy does it for Istio's `LoadBalancerSettings`:
//! weighted round robin, least request (power of two choices), weighted random, and consistent
//! hashing over a ring or a Maglev table. `PASSTHROUGH` needs no balancer (the route dials the
//! original destination).
//!
//! Invariants: a [`Balancer`] is built once per cluster snapshot from the endpoint weights and is
//! never mutated structurally; picks are lock-free (atomics only); an index it returns is always
//! `< len`. Active-request counts live in the balancer and are released by the [`Active`] guard.

mod hash;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

pub use hash::{HashTable, key_hash};

use crate::config::policy::{self, Algorithm, HashRing};

/// Largest round-robin schedule precomputed; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 65_536;

/// A cluster's balancer.
#[derive(Debug)]
pub struct Balancer {
    kind: Kind,
    /// In-flight requests (or connections) per endpoint, for `LEAST_REQUEST`.
    active: Arc<[AtomicUsize]>,
    /// Walker/Vose alias table for O(1) weighted random choices: `(threshold, alias)` per slot.
    alias: Vec<(u32, u32)>,
}

#[derive(Debug)]
enum Kind {
    /// Weighted round robin over a precomputed smooth schedule.
    RoundRobin {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    LeastRequest {
        equal_weights: bool,
        weights: Vec<u32>,
    },
    Random,
    Hash(HashTable),
}

/// What a pick may use from the request or connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickContext {
    /// Hash of the consistent-hash key, when the request carries one. Absent: a random endpoint,
    /// as Envoy does when the hash policy yields nothing.
    pub hash: Option<u64>,
}

/// Marks one request in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct Active {
    active: Arc<[AtomicUsize]>,
    index: usize,
}

// === impl Balancer ===

impl Balancer {
    /// A balancer for endpoints with these weights (0 is treated as 1, as Istio does) under the
    /// effective `loadBalancer` block; `None` is Istio's default, `LEAST_REQUEST`.
    pub fn new(lb: Option<&policy::LoadBalancer>, weights: &[u32], keys: &[String]) -> Self {
        let weights: Vec<u32> = weights.iter().map(|w| (*w).max(1)).collect();
        let algorithm = lb.map_or(&Algorithm::LeastRequest, |lb| &lb.algorithm);
        let kind = match algorithm {
            Algorithm::RoundRobin => Kind::RoundRobin {
                schedule: schedule(&weights),
                next: AtomicUsize::new(0),
            },
            Algorithm::Random | Algorithm::Passthrough => Kind::Random,
            Algorithm::ConsistentHash(ch) => Kind::Hash(match ch.ring {
                HashRing::RingHash { minimum_ring_size } => {
                    HashTable::ring(keys, &weights, minimum_ring_size)
                }
                HashRing::Maglev { table_size } => HashTable::maglev(keys, &weights, table_size),
            }),
            Algorithm::LeastRequest => Kind::LeastRequest {
                equal_weights: weights.windows(2).all(|w| w[0] == w[1]),
                weights: weights.clone(),
            },
        };
        Self {
            kind,
            active: (0..weights.len()).map(|_| AtomicUsize::new(0)).collect(),
            alias: alias_table(&weights),
        }
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.active.len()
    }

    /// True when there is nothing to pick.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// The algorithm's name as `drover explain` and logs show it.
    pub fn name(&self) -> &'static str {
        match &self.kind {
            Kind::RoundRobin { .. } => "ROUND_ROBIN",
            Kind::LeastRequest { .. } => "LEAST_REQUEST",
            Kind::Random => "RANDOM",
            Kind::Hash(t) => t.name(),
        }
    }

    /// Picks an endpoint index, or `None` when there are no endpoints.
    pub fn pick(&self, cx: PickContext) -> Option<usize> {
        let n = self.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return Some(0);
        }
        Some(match &self.kind {
            Kind::RoundRobin { schedule, next } => {
                schedule[next.fetch_add(1, Ordering::Relaxed) % schedule.len()] as usize
            }
            Kind::Random => self.weighted_random(),
            Kind::Hash(table) => match cx.hash {
                Some(h) => table.lookup(h),
                None => self.weighted_random(),
            },
            Kind::LeastRequest {
                equal_weights,
                weights,
            } => {
                // Power of two choices: two distinct candidates, the less loaded wins. With
                // unequal weights candidates are drawn by weight and load is scaled by it.
                let a = if *equal_weights {
                    fastrand::usize(0..n)
                } else {
                    self.weighted_random()
                };
                let mut b = if *equal_weights {
                    fastrand::usize(0..n - 1)
                } else {
                    self.weighted_random()
                };
                if *equal_weights && b >= a {
                    b += 1;
                }
                let load = |i: usize| {
                    (self.active[i].load(Ordering::Relaxed) as u64 + 1) * 1_000_000
                        / u64::from(weights[i])
                };
                if load(b) < load(a) { b } else { a }
            }
        })
    }

    /// Picks an endpoint that `accept` takes (not ejected): a few fresh picks as Envoy retries host
    /// selection, then the first acceptable endpoint after the last pick; `None` when no endpoint
    /// is acceptable.
    pub fn pick_with(&self, cx: PickContext, accept: impl Fn(usize) -> bool) -> Option<usize> {
        let mut last = self.pick(cx)?;
        for _ in 0..5 {
            if accept(last) {
                return Some(last);
            }
            // A hash key would map to the same endpoint again: retry with random candidates.
            last = self.pick(PickContext::default())?;
        }
        let n = self.len();
        (1..=n).map(|k| (last + k) % n).find(|i| accept(*i))
    }

    /// Counts a request in flight on `index` until the guard drops.
    pub fn start(&self, index: usize) -> Active {
        self.active[index].fetch_add(1, Ordering::Relaxed);
        Active {
            active: self.active.clone(),
            index,
        }
    }

    /// Requests in flight on `index`.
    pub fn active(&self, index: usize) -> usize {
        self.active[index].load(Ordering::Relaxed)
    }

    fn weighted_random(&self) -> usize {
        let i = fastrand::usize(0..self.alias.len());
        let (threshold, alias) = self.alias[i];
        if fastrand::u32(..) < threshold {
            i
        } else {
            alias as usize
        }
    }
}

// === impl Active ===

impl Drop for Active {
    fn drop(&mut self) {
        self.active[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// A smooth weighted round-robin schedule (nginx's algorithm): each endpoint appears in
/// proportion to its weight, interleaved rather than in runs.
fn schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0u32, |g, w| gcd(g, *w)).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| u64::from(x / g)).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        let scale = total.div_ceil(MAX_SCHEDULE);
        w.iter_mut().for_each(|x| *x = (*x / scale).max(1));
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += *wi as i64;
        }
        let best = (0..current.len())
            .max_by_key(|i| (current[*i], std::cmp::Reverse(*i)))
            .unwrap_or(0);
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

/// Vose's alias method: slot `i` keeps itself with probability `threshold / 2³²`, else its alias,
/// so that every index comes out in proportion to its weight.
fn alias_table(weights: &[u32]) -> Vec<(u32, u32)> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let total: f64 = weights.iter().map(|w| f64::from(*w)).sum();
    let mut scaled: Vec<f64> = weights
        .iter()
        .map(|w| f64::from(*w) * n as f64 / total)
        .collect();
    let mut table = vec![(u32::MAX, 0u32); n];
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|i| scaled[*i] < 1.0);
    while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
        table[s] = ((scaled[s] * f64::from(u32::MAX)) as u32, l as u32);
        scaled[l] -= 1.0 - scaled[s];
        if scaled[l] < 1.0 {
            large.pop();
            small.push(l);
        }
    }
    // Leftovers are 1.0 up to rounding: they keep themselves.
    for i in small.into_iter().chain(large) {
        table[i] = (u32::MAX, i as u32);
    }
    table
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests;
