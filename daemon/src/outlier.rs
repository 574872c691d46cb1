//! Outlier detection for one cluster, as Envoy's detector runs Istio's `outlierDetection`: per
//! endpoint consecutive-error counters (5xx, gateway, local origin), immediate ejection when a
//! counter reaches its threshold, ejection time growing with repeat ejections and capped at
//! `max(300 s, baseEjectionTime)`, unejection and backoff decay on the `interval` sweep, the strict
//! `maxEjectionPercent` check, and `minHealthPercent` panic mode (§6 of the semantics reference).
//!
//! Invariants: a small explicit state machine per endpoint, driven only by the events and
//! `tokio::time::Instant`s it is given (no clock of its own, no I/O); the number of ejected
//! endpoints never exceeds what `maxEjectionPercent` allows; ejection never removes an endpoint
//! from the registry, it only makes [`Detector::eligible`] skip it.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::config::policy::OutlierDetection;

/// What one attempt to an endpoint produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An upstream HTTP response with this status.
    Http(u16),
    /// The connection was established (the TCP proxy's success signal).
    Connected,
    /// Connect failure, refusal, timeout or reset before a response (locally originated).
    LocalFailure,
}

/// What the detector did with an outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Counted (or reset); no threshold reached.
    Counted,
    /// The endpoint is ejected for this long.
    Ejected(Duration),
    /// A threshold was reached but ejecting would exceed `maxEjectionPercent`.
    Overflow,
    /// The endpoint is already ejected; the outcome only updated counters.
    AlreadyEjected,
}

/// Which counter reached its threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Consecutive5xx,
    Gateway,
    LocalOrigin,
}

/// Per-endpoint state.
#[derive(Clone, Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    consecutive_local: u32,
    ejected_at: Option<Instant>,
    /// Multiplier of `baseEjectionTime` for the current or next ejection.
    backoff: u32,
    times_ejected: u32,
    last_unejected: Option<Instant>,
}

/// The detector of one cluster.
#[derive(Debug)]
pub struct Detector {
    policy: OutlierDetection,
    hosts: Vec<Host>,
    ejected: usize,
    /// Ejections refused by `maxEjectionPercent` (Envoy's `ejections_overflow`).
    pub overflows: u64,
}

/// A cluster's detector as the data path shares it: the periodic sweep is run lazily, catching
/// up every missed `interval` tick before each use, so that no timer task is needed and the
/// timeline is the same as with one.
#[derive(Debug)]
pub struct ClusterDetector {
    inner: Mutex<(Detector, Instant)>,
}

// === impl ClusterDetector ===

impl ClusterDetector {
    pub fn new(policy: OutlierDetection, endpoints: usize) -> Self {
        let next = Instant::now() + policy.interval;
        Self {
            inner: Mutex::new((Detector::new(policy, endpoints), next)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Detector) -> T) -> T {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (d, next) = &mut *guard;
        let now = Instant::now();
        // Bounded catch-up: after a long idle period only the last 1000 ticks matter.
        let mut ticks = 0;
        while *next <= now && ticks < 1000 {
            for i in d.sweep(*next) {
                tracing::info!(endpoint = i, "outlier detection: endpoint back in rotation");
            }
            *next += d.interval().max(Duration::from_millis(1));
            ticks += 1;
        }
        if *next <= now {
            *next = now + d.interval();
        }
        f(d)
    }

    /// Records an outcome for endpoint `i` (index into the cluster's members).
    pub fn observe(&self, i: usize, outcome: Outcome) -> Verdict {
        self.with(|d| {
            let v = d.observe(i, outcome, Instant::now());
            if let Verdict::Ejected(t) = v {
                tracing::info!(endpoint = i, duration = ?t, times = d.times_ejected(i), "outlier detection: endpoint ejected");
            }
            v
        })
    }

    /// The published state of endpoint `i`.
    pub fn health(&self, i: usize) -> crate::stats::Health {
        self.with(|d| d.health(i, Instant::now(), crate::stats::monotonic_ns()))
    }

    /// `(ejections_active, ejections_overflow, ejections_enforced_total)` of the cluster.
    pub fn summary(&self) -> (usize, u64, u64) {
        self.with(|d| {
            let enforced = d.hosts.iter().map(|h| h.times_ejected as u64).sum();
            (d.ejected, d.overflows, enforced)
        })
    }

    /// Picks with `balancer` among the endpoints that may take traffic now (one lock, no
    /// allocation: this runs per request).
    pub fn pick(
        &self,
        balancer: &crate::balance::Balancer,
        cx: crate::balance::PickContext,
    ) -> Option<usize> {
        self.with(|d| balancer.pick_with(cx, |i| d.eligible(i)))
    }

    /// For each endpoint, whether it may take traffic now (what [`ClusterDetector::pick`]
    /// would consider); the kernel fast path's tables are built from it.
    pub fn eligible_members(&self) -> Vec<bool> {
        self.with(|d| (0..d.hosts.len()).map(|i| d.eligible(i)).collect())
    }

    /// Like [`ClusterDetector::pick`], among the endpoints `accept` also takes.
    pub fn pick_where(
        &self,
        balancer: &crate::balance::Balancer,
        cx: crate::balance::PickContext,
        accept: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        self.with(|d| balancer.pick_with(cx, |i| d.eligible(i) && accept(i)))
    }
}

// === impl Detector ===

impl Detector {
    pub fn new(policy: OutlierDetection, endpoints: usize) -> Self {
        Self {
            policy,
            hosts: vec![Host::default(); endpoints],
            ejected: 0,
            overflows: 0,
        }
    }

    /// How often [`Detector::sweep`] should run.
    pub fn interval(&self) -> Duration {
        self.policy.interval
    }

    /// Records one outcome for endpoint `i`; ejects at once when a counter reaches its threshold.
    pub fn observe(&mut self, i: usize, outcome: Outcome, now: Instant) -> Verdict {
        let p = &self.policy;
        let h = &mut self.hosts[i];
        let mut hit = None;
        let error_code = |status: u16| {
            if p.http_error_codes.is_empty() {
                status >= 500
            } else {
                p.http_error_codes.contains(&status)
            }
        };
        match outcome {
            Outcome::Http(status) if error_code(status) => {
                h.consecutive_5xx += 1;
                if matches!(status, 502..=504) {
                    h.consecutive_gateway += 1;
                } else {
                    h.consecutive_gateway = 0;
                }
                if p.consecutive_5xx > 0 && h.consecutive_5xx == p.consecutive_5xx {
                    hit = Some(Kind::Consecutive5xx);
                } else if p.consecutive_gateway > 0
                    && h.consecutive_gateway == p.consecutive_gateway
                {
                    hit = Some(Kind::Gateway);
                }
            }
            Outcome::Http(_) => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
            }
            Outcome::Connected if p.split_local_origin => h.consecutive_local = 0,
            Outcome::Connected => {
                h.consecutive_5xx = 0;
                h.consecutive_gateway = 0;
            }
            Outcome::LocalFailure if p.split_local_origin => {
                h.consecutive_local += 1;
                if h.consecutive_local == p.consecutive_local_origin {
                    hit = Some(Kind::LocalOrigin);
                }
            }
            // Without the split, a local failure is reported as a 503: both counters move.
            Outcome::LocalFailure => {
                h.consecutive_5xx += 1;
                h.consecutive_gateway += 1;
                if p.consecutive_5xx > 0 && h.consecutive_5xx == p.consecutive_5xx {
                    hit = Some(Kind::Consecutive5xx);
                } else if p.consecutive_gateway > 0
                    && h.consecutive_gateway == p.consecutive_gateway
                {
                    hit = Some(Kind::Gateway);
                }
            }
        }
        match hit {
            None if h.ejected_at.is_some() => Verdict::AlreadyEjected,
            None => Verdict::Counted,
            Some(kind) => self.eject(i, kind, now),
        }
    }

    fn eject(&mut self, i: usize, kind: Kind, now: Instant) -> Verdict {
        let total = self.hosts.len();
        let h = &mut self.hosts[i];
        match kind {
            Kind::Consecutive5xx => h.consecutive_5xx = 0,
            Kind::Gateway => h.consecutive_gateway = 0,
            Kind::LocalOrigin => h.consecutive_local = 0,
        }
        if h.ejected_at.is_some() {
            return Verdict::AlreadyEjected;
        }
        // Strict, as current Envoy: the share ejected *after* this ejection must stay within the cap.
        if 100 * (self.ejected + 1) > self.policy.max_ejection_percent as usize * total {
            self.overflows += 1;
            return Verdict::Overflow;
        }
        let base = self.policy.base_ejection_time;
        let max = self.policy.max_ejection_time();
        if base * h.backoff < max + base {
            h.backoff += 1;
        }
        h.times_ejected += 1;
        h.ejected_at = Some(now);
        self.ejected += 1;
        Verdict::Ejected((base * h.backoff).min(max))
    }

    /// The periodic pass: unejects endpoints whose time is up and decays the backoff of
    /// endpoints that stayed healthy for an interval. Returns the unejected endpoints.
    pub fn sweep(&mut self, now: Instant) -> Vec<usize> {
        let base = self.policy.base_ejection_time;
        let max = self.policy.max_ejection_time();
        let interval = self.policy.interval;
        let mut back = Vec::new();
        for (i, h) in self.hosts.iter_mut().enumerate() {
            match h.ejected_at {
                Some(at) if now.duration_since(at) >= (base * h.backoff).min(max) => {
                    h.ejected_at = None;
                    h.last_unejected = Some(now);
                    h.consecutive_5xx = 0;
                    h.consecutive_gateway = 0;
                    h.consecutive_local = 0;
                    self.ejected -= 1;
                    back.push(i);
                }
                Some(_) => {}
                None => {
                    if h.backoff > 0
                        && h.last_unejected
                            .is_none_or(|t| now.duration_since(t) >= interval)
                    {
                        h.backoff -= 1;
                    }
                }
            }
        }
        back
    }

    /// Endpoint `i`'s counters and ejection, with the ejection deadline on CLOCK_MONOTONIC
    /// (`now_ns` is that clock at `now`).
    pub fn health(&self, i: usize, now: Instant, now_ns: u64) -> crate::stats::Health {
        let h = &self.hosts[i];
        let deadline_ns = h.ejected_at.map_or(0, |at| {
            let length =
                (self.policy.base_ejection_time * h.backoff).min(self.policy.max_ejection_time());
            let ends = at + length;
            now_ns + ends.saturating_duration_since(now).as_nanos() as u64
        });
        crate::stats::Health {
            ejected: h.ejected_at.is_some(),
            times_ejected: h.times_ejected,
            deadline_ns,
            consecutive_5xx: h.consecutive_5xx,
            consecutive_gateway: h.consecutive_gateway,
            consecutive_local_origin: h.consecutive_local,
        }
    }

    /// Whether endpoint `i` is ejected.
    pub fn is_ejected(&self, i: usize) -> bool {
        self.hosts[i].ejected_at.is_some()
    }

    /// How many times endpoint `i` has been ejected.
    pub fn times_ejected(&self, i: usize) -> u32 {
        self.hosts[i].times_ejected
    }

    /// Endpoints currently ejected.
    pub fn ejected(&self) -> usize {
        self.ejected
    }

    /// Whether the balancer should ignore health (Envoy's panic threshold): the healthy share is
    /// below `minHealthPercent` (0, Istio's default, never panics).
    pub fn panic(&self) -> bool {
        let total = self.hosts.len();
        total > 0 && 100 * (total - self.ejected) < self.policy.min_health_percent as usize * total
    }

    /// Whether endpoint `i` may be picked: not ejected, or the cluster is in panic mode.
    pub fn eligible(&self, i: usize) -> bool {
        !self.is_ejected(i) || self.panic()
    }
}

#[cfg(test)]
mod tests;
