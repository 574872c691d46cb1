//! Endpoint selection for one cluster, as Envoy does it for Istio's `LoadBalancerSettings`:
//! weighted round robin, least request (power of two choices), weighted random, and consistent
//! hashing over a ring or a Maglev table, optionally over locality priority levels and weighted
//! localities ([`locality::Plan`]) and with slow start for new endpoints (`warmup`).
//! `PASSTHROUGH` needs no balancer (the route dials the original destination).
//!
//! Invariants: a [`Balancer`] is built once per cluster snapshot from the endpoint weights and is
//! never mutated structurally; picks are lock-free (atomics only); an index it returns is always
//! `< len` and never an endpoint the locality plan excludes. Active-request counts live in the
//! balancer and are released by the [`Active`] guard. Priority levels get Envoy's load split:
//! a level takes `min(100, 1.4 × healthy%)` of what is left, normalised when all levels
//! together are below 100.

mod hash;
pub mod locality;

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

pub use hash::{HashTable, key_hash};
pub use locality::Plan;

use crate::config::policy::{self, Algorithm, HashRing};

/// Largest round-robin schedule precomputed; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 65_536;

/// Envoy's overprovisioning factor, in percent.
const OVERPROVISIONING: usize = 140;

/// A cluster's balancer.
#[derive(Debug)]
pub struct Balancer {
    layout: Layout,
    /// In-flight requests (or connections) per endpoint, for `LEAST_REQUEST`.
    active: Arc<[AtomicUsize]>,
    /// Slow start, for `ROUND_ROBIN` and `LEAST_REQUEST` with `warmup`.
    warm: Option<Warm>,
    name: &'static str,
}

#[derive(Debug)]
enum Layout {
    Flat(Picker),
    /// Priority levels, each with its locality groups (weight, picker over the group).
    Tiered {
        plan: Plan,
        levels: Vec<Vec<(u32, Picker)>>,
    },
}

/// One algorithm over a set of endpoints (all of them, or one locality group).
#[derive(Debug)]
struct Picker {
    kind: Kind,
    /// Endpoint weights, 0 raised to 1.
    weights: Vec<u32>,
    /// Walker/Vose alias table for O(1) weighted random choices: `(threshold, alias)` per slot.
    alias: Vec<(u32, u32)>,
    /// The balancer's endpoint index of each of this picker's slots; `None`: the identity.
    ids: Option<Vec<u32>>,
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
    },
    Random,
    Hash(HashTable),
}

/// Slow-start state: when each endpoint joined the cluster, and the window.
#[derive(Debug)]
struct Warm {
    policy: policy::Warmup,
    /// Monotonic ns at which each endpoint joined.
    joined: Box<[AtomicU64]>,
    /// Monotonic ns from which no endpoint is warming any more.
    until: AtomicU64,
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

/// Per-pick view of the balancer's shared state.
#[derive(Clone, Copy)]
struct Shared<'a> {
    active: &'a [AtomicUsize],
    /// Slow-start factors apply (some endpoint is still warming), at this time.
    warm: Option<(&'a Warm, u64)>,
}

// === impl Balancer ===

impl Balancer {
    /// A balancer for endpoints with these weights (0 is treated as 1, as Istio does) under the
    /// effective `loadBalancer` block; `None` is Istio's default, `LEAST_REQUEST`.
    pub fn new(lb: Option<&policy::LoadBalancer>, weights: &[u32], keys: &[String]) -> Self {
        Self::with_plan(lb, weights, keys, None)
    }

    /// Like [`Balancer::new`], over the priority levels and locality groups of `plan`.
    pub fn with_plan(
        lb: Option<&policy::LoadBalancer>,
        weights: &[u32],
        keys: &[String],
        plan: Option<Plan>,
    ) -> Self {
        let algorithm = lb.map_or(&Algorithm::LeastRequest, |lb| &lb.algorithm);
        let layout = match plan {
            None => Layout::Flat(Picker::new(algorithm, weights, keys, None)),
            Some(plan) => {
                let levels = (plan.levels.iter())
                    .map(|groups| {
                        groups
                            .iter()
                            .map(|g| {
                                let w: Vec<u32> = g.members.iter().map(|m| weights[*m]).collect();
                                let k: Vec<String> =
                                    g.members.iter().map(|m| keys[*m].clone()).collect();
                                let ids = g.members.iter().map(|m| *m as u32).collect();
                                (g.weight, Picker::new(algorithm, &w, &k, Some(ids)))
                            })
                            .collect()
                    })
                    .collect();
                Layout::Tiered { plan, levels }
            }
        };
        let warm = lb
            .and_then(|lb| lb.warmup.clone())
            .filter(|_| matches!(algorithm, Algorithm::RoundRobin | Algorithm::LeastRequest))
            .map(|policy| {
                let now = crate::stats::monotonic_ns();
                Warm {
                    until: AtomicU64::new(now + policy.duration.as_nanos() as u64),
                    policy,
                    joined: weights.iter().map(|_| AtomicU64::new(now)).collect(),
                }
            });
        let name = match algorithm {
            Algorithm::RoundRobin => "ROUND_ROBIN",
            Algorithm::LeastRequest => "LEAST_REQUEST",
            Algorithm::Random | Algorithm::Passthrough => "RANDOM",
            Algorithm::ConsistentHash(ch) => match ch.ring {
                HashRing::RingHash { .. } => "RING_HASH",
                HashRing::Maglev { .. } => "MAGLEV",
            },
        };
        Self {
            layout,
            active: (0..weights.len()).map(|_| AtomicUsize::new(0)).collect(),
            warm,
            name,
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
        self.name
    }

    /// The number of slots (ring points or Maglev entries) of a consistent-hash balancer,
    /// over all its locality groups.
    pub fn hash_slots(&self) -> Option<usize> {
        let pickers: Vec<&Picker> = match &self.layout {
            Layout::Flat(p) => vec![p],
            Layout::Tiered { levels, .. } => levels.iter().flatten().map(|(_, p)| p).collect(),
        };
        pickers
            .iter()
            .map(|p| match &p.kind {
                Kind::Hash(t) => Some(t.slots()),
                _ => None,
            })
            .sum()
    }

    /// The locality plan, when locality changes anything for this cluster.
    pub fn plan(&self) -> Option<&Plan> {
        match &self.layout {
            Layout::Flat(_) => None,
            Layout::Tiered { plan, .. } => Some(plan),
        }
    }

    /// Picks an endpoint index, or `None` when there are no endpoints.
    pub fn pick(&self, cx: PickContext) -> Option<usize> {
        self.select(cx, &|_| true, false)
    }

    /// Picks an endpoint that `accept` takes (not ejected): a few fresh picks as Envoy retries host
    /// selection, then the first acceptable endpoint after the last pick; `None` when no endpoint
    /// is acceptable. Priority levels and localities are weighed by how many of their endpoints
    /// `accept` takes.
    pub fn pick_with(&self, cx: PickContext, accept: impl Fn(usize) -> bool) -> Option<usize> {
        self.select(cx, &accept, true)
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

    /// Takes over when endpoints joined from the balancer this one replaces: `joined(i)` is the
    /// previous balancer's index of endpoint `i`, if it had it. Endpoints new to the cluster keep
    /// "now" and warm up.
    pub fn inherit_joined(&self, prev: &Balancer, joined: impl Fn(usize) -> Option<usize>) {
        let (Some(warm), Some(old)) = (&self.warm, &prev.warm) else {
            return;
        };
        for (i, t) in warm.joined.iter().enumerate() {
            if let Some(at) = joined(i).and_then(|j| old.joined.get(j)) {
                t.store(at.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        let last = warm.joined.iter().map(|t| t.load(Ordering::Relaxed)).max();
        let window = warm.policy.duration.as_nanos() as u64;
        warm.until
            .store(last.unwrap_or(0).saturating_add(window), Ordering::Relaxed);
    }

    /// Endpoint `i`'s current slow-start factor in percent (100 when warm or without warmup).
    pub fn warmup_percent(&self, i: usize) -> f64 {
        self.warm
            .as_ref()
            .map_or(100.0, |w| w.factor(i, crate::stats::monotonic_ns()) * 100.0)
    }

    fn select(
        &self,
        cx: PickContext,
        accept: &dyn Fn(usize) -> bool,
        count: bool,
    ) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        let now = crate::stats::monotonic_ns();
        let shared = Shared {
            active: &self.active,
            warm: self
                .warm
                .as_ref()
                .filter(|w| w.warming(now))
                .map(|w| (w, now)),
        };
        match &self.layout {
            Layout::Flat(p) => p.pick_with(cx, shared, accept),
            Layout::Tiered { levels, .. } => {
                let healthy = |p: &Picker| {
                    if count {
                        p.globals().filter(|g| accept(*g)).count()
                    } else {
                        p.len()
                    }
                };
                let roll = cx
                    .hash
                    .map_or_else(|| fastrand::usize(0..100), |h| (h % 100) as usize);
                let level = choose_level(levels, &healthy, roll);
                let groups = &levels[level];
                let group = if groups.len() == 1 {
                    &groups[0].1
                } else {
                    // Envoy's locality-weighted choice: weight × min(1, 1.4 × healthy share).
                    let eff: Vec<u64> = groups
                        .iter()
                        .map(|(w, p)| {
                            u64::from(*w)
                                * (OVERPROVISIONING * healthy(p)).min(100 * p.len()) as u64
                                / p.len().max(1) as u64
                        })
                        .collect();
                    &groups[weighted_index(&eff).unwrap_or(0)].1
                };
                group
                    .pick_with(cx, shared, accept)
                    // Nothing acceptable where the split pointed: any acceptable endpoint, in
                    // priority order.
                    .or_else(|| {
                        levels
                            .iter()
                            .flatten()
                            .flat_map(|(_, p)| p.globals())
                            .find(|g| accept(*g))
                    })
            }
        }
    }

    #[cfg(test)]
    fn pick_at(&self, now: u64) -> usize {
        let shared = Shared {
            active: &self.active,
            warm: self.warm.as_ref().map(|w| (w, now)),
        };
        match &self.layout {
            Layout::Flat(p) => p.global(p.pick(PickContext::default(), shared)),
            Layout::Tiered { .. } => unreachable!("slow-start tests use flat balancers"),
        }
    }
}

/// The priority level a pick goes to: Envoy's load split from each level's health
/// (`min(100, 1.4 × healthy / total)` percent), with `roll` in `0..100`.
fn choose_level(
    levels: &[Vec<(u32, Picker)>],
    healthy: &dyn Fn(&Picker) -> usize,
    roll: usize,
) -> usize {
    let mut health = Vec::with_capacity(levels.len());
    for groups in levels {
        let total: usize = groups.iter().map(|(_, p)| p.len()).sum();
        let ok: usize = groups.iter().map(|(_, p)| healthy(p)).sum();
        let h = (OVERPROVISIONING * ok / total.max(1)).min(100);
        health.push(h);
        if h == 100 && health.iter().sum::<usize>() >= 100 {
            // Everything goes to the levels seen so far; the rest need not be counted.
            break;
        }
    }
    let available = health.iter().sum::<usize>().min(100);
    if available == 0 {
        return 0;
    }
    let mut left = 100;
    let mut loads: Vec<usize> = health
        .iter()
        .map(|h| {
            let l = (h * 100 / available).min(left);
            left -= l;
            l
        })
        .collect();
    // Rounding leftovers go to the first level with any health.
    if let Some(first) = health.iter().position(|h| *h > 0) {
        loads[first] += left;
    }
    let mut acc = 0;
    loads
        .iter()
        .position(|l| {
            acc += l;
            roll < acc
        })
        .unwrap_or(0)
}

/// An index drawn in proportion to `weights`; `None` when they are all 0.
fn weighted_index(weights: &[u64]) -> Option<usize> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return None;
    }
    let mut r = fastrand::u64(0..total);
    weights.iter().position(|w| {
        if r < *w {
            true
        } else {
            r -= w;
            false
        }
    })
}

// === impl Picker ===

impl Picker {
    fn new(algorithm: &Algorithm, weights: &[u32], keys: &[String], ids: Option<Vec<u32>>) -> Self {
        let weights: Vec<u32> = weights.iter().map(|w| (*w).max(1)).collect();
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
            },
        };
        Self {
            kind,
            alias: alias_table(&weights),
            weights,
            ids,
        }
    }

    fn len(&self) -> usize {
        self.weights.len()
    }

    /// The balancer's index of slot `i`.
    fn global(&self, i: usize) -> usize {
        self.ids.as_ref().map_or(i, |ids| ids[i] as usize)
    }

    fn globals(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len()).map(|i| self.global(i))
    }

    /// A slot, by the algorithm alone (`len() > 0`).
    fn pick(&self, cx: PickContext, s: Shared<'_>) -> usize {
        let n = self.len();
        if n == 1 {
            return 0;
        }
        let load = |i: usize| s.active[self.global(i)].load(Ordering::Relaxed) as f64 + 1.0;
        if let Some((warm, now)) = s.warm
            && matches!(
                self.kind,
                Kind::RoundRobin { .. } | Kind::LeastRequest { .. }
            )
        {
            // Weights change with time while an endpoint warms up: draw by the current ones
            // (round robin in proportion, least request between two weighted candidates).
            let eff: Vec<f64> = (0..n)
                .map(|i| f64::from(self.weights[i]) * warm.factor(self.global(i), now))
                .collect();
            let draw = || {
                let mut r = fastrand::f64() * eff.iter().sum::<f64>();
                eff.iter()
                    .position(|w| {
                        r -= w;
                        r < 0.0
                    })
                    .unwrap_or(n - 1)
            };
            let a = draw();
            if matches!(self.kind, Kind::RoundRobin { .. }) {
                return a;
            }
            let b = draw();
            return if load(b) / eff[b] < load(a) / eff[a] {
                b
            } else {
                a
            };
        }
        match &self.kind {
            Kind::RoundRobin { schedule, next } => {
                schedule[next.fetch_add(1, Ordering::Relaxed) % schedule.len()] as usize
            }
            Kind::Random => self.weighted_random(),
            Kind::Hash(table) => match cx.hash {
                Some(h) => table.lookup(h),
                None => self.weighted_random(),
            },
            Kind::LeastRequest { equal_weights } => {
                // Power of two choices: two distinct candidates, the less loaded wins. With
                // unequal weights candidates are drawn by weight and load is scaled by it.
                let (a, b) = if *equal_weights {
                    let a = fastrand::usize(0..n);
                    let b = fastrand::usize(0..n - 1);
                    (a, if b >= a { b + 1 } else { b })
                } else {
                    (self.weighted_random(), self.weighted_random())
                };
                let scaled = |i: usize| load(i) / f64::from(self.weights[i]);
                if scaled(b) < scaled(a) { b } else { a }
            }
        }
    }

    /// The balancer's index of an acceptable endpoint: see [`Balancer::pick_with`].
    fn pick_with(
        &self,
        cx: PickContext,
        s: Shared<'_>,
        accept: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.len();
        if n == 0 {
            return None;
        }
        let mut last = self.pick(cx, s);
        for _ in 0..5 {
            if accept(self.global(last)) {
                return Some(self.global(last));
            }
            // A hash key would map to the same endpoint again: retry with random candidates.
            last = self.pick(PickContext::default(), s);
        }
        (1..=n)
            .map(|k| self.global((last + k) % n))
            .find(|g| accept(*g))
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

// === impl Warm ===

impl Warm {
    /// Whether any endpoint is still inside the window at `now`.
    fn warming(&self, now: u64) -> bool {
        now < self.until.load(Ordering::Relaxed)
    }

    /// Envoy's slow-start factor of endpoint `i` at `now`: inside the window,
    /// `max(minimumPercent / 100, (max(age, 1 ms) / window)^(1 / aggression))`; 1 after it.
    fn factor(&self, i: usize, now: u64) -> f64 {
        let window = self.policy.duration.as_nanos() as f64;
        let age = now.saturating_sub(self.joined[i].load(Ordering::Relaxed)) as f64;
        if age >= window {
            return 1.0;
        }
        let t = age.max(1e6) / window;
        t.powf(1.0 / self.policy.aggression)
            .max(self.policy.minimum_percent / 100.0)
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
