//! Counters of the data path, per cluster and per (cluster, endpoint), kept outside the registry
//! snapshots so that they survive hot reloads: a rebuilt cluster with the same name finds its
//! counters (and its id) again. Read by the admin API, Prometheus, `drover status` (through the
//! daemon-written `EP_DSTATS` map) and the tests.
//!
//! Invariants: counters only grow; gauges are released by drop guards; the data path touches
//! only atomics (the store's locks are taken when a registry is built or a connection opens, never
//! per request); cluster ids are unique for the life of the process, and a name keeps its id
//! across restarts once the ids are restored ([`Store::restore_ids`]) from the pinned
//! `CLUSTER_IDS` (sockets balanced by the kernel hold their cluster's id beyond the daemon).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use drover_common::{EpDKey, EpDStats};

/// Every cluster's counters and the per-address connection gauges, for this process.
#[derive(Debug, Default)]
pub struct Store {
    clusters: Mutex<HashMap<String, Arc<ClusterStats>>>,
    ids: Mutex<Ids>,
    connections: Mutex<HashMap<SocketAddr, Arc<AtomicU64>>>,
    /// Inbound termination outcomes.
    pub inbound: InboundStats,
    /// Captured (downstream) connections: limits and timeouts.
    pub downstream: DownstreamStats,
    /// AuthorizationPolicy denials by policy (`""`: no ALLOW policy matched), and AUDIT
    /// matches by policy.
    pub authz_denials: Mutex<std::collections::BTreeMap<String, u64>>,
    pub authz_audits: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Store {
    /// Counts a denial by `policy` (`None`: no ALLOW policy matched).
    pub fn authz_denied(&self, policy: Option<&str>) {
        let mut m = self.authz_denials.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(policy.unwrap_or_default().to_string()).or_default() += 1;
    }

    /// Counts a match of AUDIT policy `policy`.
    pub fn authz_audited(&self, policy: &str) {
        let mut m = self.authz_audits.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(policy.to_string()).or_default() += 1;
    }
}

/// Cluster ids by [`name_key`] of the cluster's name: restored ones, then those given since.
#[derive(Debug, Default)]
struct Ids {
    by_key: HashMap<u64, u32>,
    taken: std::collections::HashSet<u32>,
    last: u32,
    /// Given since the last [`Store::unsaved_ids`].
    unsaved: Vec<(u64, u32)>,
}

/// Downstream connection counters, by Envoy's names (`downstream_*` of the HTTP connection
/// manager and the listener).
#[derive(Debug, Default, serde::Serialize)]
pub struct DownstreamStats {
    pub cx_total: AtomicU64,
    /// Gauge: admitted and still open.
    pub cx_active: AtomicU64,
    /// Refused at accept: `--max-downstream-connections` reached.
    pub cx_overflow: AtomicU64,
    /// Refused at accept: resident memory above `--max-memory-mb`.
    pub cx_overload_memory: AtomicU64,
    /// Closed: request headers incomplete after `--request-headers-timeout`.
    pub rq_header_timeout: AtomicU64,
    /// Closed: no request for `--downstream-idle-timeout`.
    pub cx_idle_timeout: AtomicU64,
    /// HTTP/1.1 connections parked while idle (their server's buffers freed; not Envoy's).
    pub cx_parked: AtomicU64,
}

/// How inbound connections (15006) ended, one counter per outcome.
#[derive(Debug, Default, serde::Serialize)]
pub struct InboundStats {
    pub mtls: AtomicU64,
    pub plaintext_passed: AtomicU64,
    pub plaintext_refused: AtomicU64,
    pub foreign_identity: AtomicU64,
    pub tls_error: AtomicU64,
    pub silent: AtomicU64,
    pub forward_failed: AtomicU64,
    /// HBONE tunnels served, and HBONE streams refused for their target.
    pub hbone: AtomicU64,
    pub bad_target: AtomicU64,
    /// Closed by an AuthorizationPolicy (non-HTTP connections; HTTP requests get 403).
    pub denied: AtomicU64,
}

/// Counters of one cluster (Envoy's `cluster.<name>.*` statistics where one exists).
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Stable id, the `cluster_id` of `EP_DSTATS` keys.
    pub id: u32,
    pub name: String,
    /// `upstream_rq_total`: requests (HTTP) or connections (TCP) sent upstream.
    pub rq_total: AtomicU64,
    /// `upstream_rq_pending_total`: requests that had to wait for a connection slot.
    pub rq_pending_total: AtomicU64,
    /// `upstream_rq_pending_overflow`: refused because the pending queue was full.
    pub rq_pending_overflow: AtomicU64,
    /// `upstream_rq_pending_failure_eject`-like: waited too long for a slot (answered 503 UT).
    pub rq_pending_timeout: AtomicU64,
    /// `upstream_rq_overflow`: refused by `http2MaxRequests`.
    pub rq_overflow: AtomicU64,
    /// `upstream_rq_retry`: retries sent.
    pub rq_retry: AtomicU64,
    /// `upstream_rq_retry_success`: retries that got a response not retried again.
    pub rq_retry_success: AtomicU64,
    /// `upstream_rq_retry_overflow`: retries refused by `maxRetries` / `retryBudget`.
    pub rq_retry_overflow: AtomicU64,
    /// `upstream_rq_retry_limit_exceeded`: retriable failures with no attempt left.
    pub rq_retry_limit_exceeded: AtomicU64,
    /// `upstream_cx_overflow`: a connection was wanted while `maxConnections` were in use.
    pub cx_overflow: AtomicU64,
    /// `upstream_cx_connect_fail`: connect failures and timeouts.
    pub cx_connect_fail: AtomicU64,
    /// `ssl.handshake`, `ssl.fail_verify_san`, `ssl.fail_verify_error`, `ssl.connection_error`.
    pub ssl_handshake: AtomicU64,
    pub ssl_fail_verify_san: AtomicU64,
    pub ssl_fail_verify_error: AtomicU64,
    pub ssl_connection_error: AtomicU64,
    /// `ssl.session_reused`: successful handshakes that resumed an earlier session.
    pub ssl_session_reused: AtomicU64,
    /// `upstream_rq_5xx` and the 2xx/3xx/4xx classes of upstream responses.
    pub rq_xx: [AtomicU64; 5],
    endpoints: Mutex<HashMap<SocketAddr, Arc<EndpointStats>>>,
}

/// Counters of one endpoint of one cluster.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub addr: Option<SocketAddr>,
    pub rq_total: AtomicU64,
    /// Requests that picked this endpoint and wait for a connection slot (gauge).
    pub rq_pending: AtomicU64,
    pub rq_5xx: AtomicU64,
    /// 502, 503 and 504 responses.
    pub gateway_errors: AtomicU64,
    /// Connect failures, timeouts and resets before a response.
    pub local_origin_failures: AtomicU64,
    /// Upstream connections open to this address (shared by every cluster containing it).
    pub cx_active: Arc<AtomicU64>,
}

/// Keeps one upstream connection counted until dropped.
#[derive(Debug)]
pub struct Connection(Arc<AtomicU64>);

/// Keeps one request counted as pending until dropped.
#[derive(Debug)]
pub struct Pending<'a>(&'a AtomicU64);

static STORE: LazyLock<Store> = LazyLock::new(Store::default);

/// The process-wide store.
pub fn store() -> &'static Store {
    &STORE
}

// === impl Store ===

impl Store {
    /// The counters of cluster `name`, created on first use.
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ClusterStats {
                    id: self
                        .ids
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .give(name),
                    name: name.to_string(),
                    ..ClusterStats::default()
                })
            })
            .clone()
    }

    /// Takes the ids a previous daemon gave (`(name key, id)`), so that each cluster gets its
    /// old id back; called before the first cluster is created (a key already given keeps
    /// the id it has).
    pub fn restore_ids(&self, saved: impl IntoIterator<Item = (u64, u32)>) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        for (key, id) in saved {
            if id == 0 || ids.by_key.contains_key(&key) || !ids.taken.insert(id) {
                continue;
            }
            ids.by_key.insert(key, id);
            ids.last = ids.last.max(id);
        }
    }

    /// The ids given since the last call, to be saved beside the kernel's state.
    pub fn unsaved_ids(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.ids.lock().unwrap_or_else(|e| e.into_inner()).unsaved)
    }

    /// The open-connection gauge of an upstream address.
    fn address(&self, addr: SocketAddr) -> Arc<AtomicU64> {
        let mut map = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(addr).or_default().clone()
    }

    /// Counts one open upstream connection to `addr` until the guard drops.
    pub fn connection(&self, addr: SocketAddr) -> Connection {
        let gauge = self.address(addr);
        gauge.fetch_add(1, Ordering::Relaxed);
        Connection(gauge)
    }
}

// === impl Ids ===

impl Ids {
    /// The id of cluster `name`: its restored one, or the next free one.
    fn give(&mut self, name: &str) -> u32 {
        let key = name_key(name);
        if let Some(id) = self.by_key.get(&key) {
            return *id;
        }
        loop {
            self.last = self.last.wrapping_add(1).max(1);
            if self.taken.insert(self.last) {
                break;
            }
        }
        self.by_key.insert(key, self.last);
        self.unsaved.push((key, self.last));
        self.last
    }
}

/// A cluster name's key in `CLUSTER_IDS`: 64-bit FNV-1a, the same in every build and process.
pub fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// === impl ClusterStats ===

impl ClusterStats {
    /// The counters of endpoint `addr` in this cluster, created on first use.
    pub fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointStats> {
        let mut eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        eps.entry(addr)
            .or_insert_with(|| {
                Arc::new(EndpointStats {
                    addr: Some(addr),
                    cx_active: store().address(addr),
                    ..EndpointStats::default()
                })
            })
            .clone()
    }

    /// Counts one request (or TCP connection) sent upstream, to `ep` when there is one.
    pub fn request(&self, ep: Option<&EndpointStats>) {
        self.rq_total.fetch_add(1, Ordering::Relaxed);
        if let Some(ep) = ep {
            ep.rq_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an upstream response status (class and, for `ep`, 5xx and gateway errors).
    pub fn response(&self, ep: Option<&EndpointStats>, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.rq_xx[class].fetch_add(1, Ordering::Relaxed);
        if let Some(ep) = ep
            && status >= 500
        {
            ep.rq_5xx.fetch_add(1, Ordering::Relaxed);
            if matches!(status, 502..=504) {
                ep.gateway_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts one successful upstream TLS handshake, and whether it resumed a session.
    pub fn handshake_done(&self, resumed: bool) {
        self.handshake(None);
        if resumed {
            self.ssl_session_reused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one upstream TLS handshake and how it ended.
    pub fn handshake(&self, failure: Option<crate::tls::FailureKind>) {
        use crate::tls::FailureKind;
        let c = match failure {
            None => &self.ssl_handshake,
            Some(FailureKind::VerifySan) => &self.ssl_fail_verify_san,
            Some(FailureKind::VerifyError) => &self.ssl_fail_verify_error,
            Some(FailureKind::Connection) => &self.ssl_connection_error,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a connect failure or timeout (`connect`) or a reset before a response.
    pub fn local_failure(&self, ep: Option<&EndpointStats>, connect: bool) {
        if connect {
            self.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(ep) = ep {
            ep.local_origin_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// === impl EndpointStats ===

impl EndpointStats {
    /// Marks a request as waiting for a connection slot until the guard drops.
    pub fn pending(&self) -> Pending<'_> {
        self.rq_pending.fetch_add(1, Ordering::Relaxed);
        Pending(&self.rq_pending)
    }

    /// This endpoint's row of `EP_DSTATS`; `health` comes from the cluster's outlier detector.
    pub fn row(
        &self,
        cluster_id: u32,
        rq_active: u64,
        health: &Health,
    ) -> Option<(EpDKey, EpDStats)> {
        let addr = self.addr?;
        let key = EpDKey {
            cluster_id,
            addr: crate::redirect::addr_words(addr),
            port_be: addr.port().to_be(),
            proto: 6,
            family: if addr.is_ipv4() { 4 } else { 6 },
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some((
            key,
            EpDStats {
                cx_active: get(&self.cx_active),
                rq_total: get(&self.rq_total),
                rq_active,
                rq_pending: get(&self.rq_pending),
                rq_5xx: get(&self.rq_5xx),
                gateway_errors: get(&self.gateway_errors),
                local_origin_failures: get(&self.local_origin_failures),
                ejection_deadline_ns: health.deadline_ns,
                times_ejected: health.times_ejected,
                ejected: health.ejected as u32,
            },
        ))
    }
}

/// Outlier-detection state of one endpoint, as published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    pub ejected: bool,
    pub times_ejected: u32,
    /// CLOCK_MONOTONIC ns at which the current ejection may end (0 when not ejected).
    pub deadline_ns: u64,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local_origin: u32,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_names_get_their_old_ids_and_new_names_fresh_ones_in_any_order() {
        // A previous daemon gave `a` 1, `b` 2, `c` 7 (and saved them).
        let saved = [("a", 1), ("b", 2), ("c", 7)].map(|(n, id)| (name_key(n), id));
        let store = Store::default();
        store.restore_ids(saved);
        // This one meets its clusters in another order, and a new one first.
        let d = store.cluster("d").id;
        let c = store.cluster("c").id;
        let a = store.cluster("a").id;
        assert_eq!((c, a, store.cluster("b").id), (7, 1, 2));
        assert!(
            ![1, 2, 7].contains(&d),
            "a new name never takes a saved id: {d}"
        );
        assert_eq!(store.cluster("d").id, d);
        // Only the new id needs saving, once.
        assert_eq!(store.unsaved_ids(), vec![(name_key("d"), d)]);
        assert!(store.unsaved_ids().is_empty());
    }

    #[test]
    fn a_saved_id_two_names_claim_goes_to_the_first() {
        let store = Store::default();
        store.restore_ids([(name_key("a"), 3), (name_key("b"), 3)]);
        let (a, b) = (store.cluster("a").id, store.cluster("b").id);
        assert_eq!(a, 3);
        assert_ne!(b, 3);
    }
}
