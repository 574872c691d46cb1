//! One try against one endpoint, as a guard: [`Attempt::start`] counts the request (cluster and
//! endpoint) and holds the balancer's in-flight count for as long as the guard lives; the try's
//! outcome is reported once — to the counters and to outlier detection — through
//! [`Attempt::connected`], [`Attempt::response`] or [`Attempt::failed`]. The L4 relay and every
//! HTTP try use it, so no path can forget a report or make it twice.
//!
//! Invariant: at most one outcome per attempt reaches the counters and the detector; a try
//! dropped without an outcome (cancelled by a route timeout) reports nothing.

use std::sync::Arc;

use crate::{
    balance,
    outlier::{self, Outcome},
    registry::Cluster,
    stats::{ClusterStats, EndpointStats},
};

/// A try in flight; see the module doc.
pub struct Attempt {
    stats: Arc<ClusterStats>,
    endpoint: Option<Arc<EndpointStats>>,
    outlier: Option<(Arc<outlier::ClusterDetector>, usize)>,
    _active: Option<balance::Active>,
    reported: bool,
}

impl Attempt {
    /// Starts a try on the cluster's endpoint `pick` (none for passthrough).
    pub fn start(cluster: &Cluster, pick: Option<usize>) -> Self {
        let endpoint = pick
            .and_then(|i| cluster.members.get(i))
            .map(|m| m.stats.clone());
        cluster.stats.request(endpoint.as_deref());
        Self {
            stats: cluster.stats.clone(),
            endpoint,
            outlier: cluster.outlier.clone().zip(pick),
            _active: pick.map(|i| cluster.balancer.start(i)),
            reported: false,
        }
    }

    /// The connection is established (the TCP proxy's success).
    pub fn connected(&mut self) {
        self.report(Outcome::Connected);
    }

    /// An upstream response with `status`.
    pub fn response(&mut self, status: u16) {
        if !self.reported {
            self.stats.response(self.endpoint.as_deref(), status);
        }
        self.report(Outcome::Http(status));
    }

    /// A locally originated failure: a connect failure or timeout (`connect`), or a TLS failure
    /// or reset before a response.
    pub fn failed(&mut self, connect: bool) {
        if !self.reported {
            self.stats.local_failure(self.endpoint.as_deref(), connect);
        }
        self.report(Outcome::LocalFailure);
    }

    fn report(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        if let Some((od, i)) = &self.outlier {
            od.observe(*i, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::{
        config::source::ConfigSet,
        registry::{Client, Registry},
    };

    #[test]
    fn an_outcome_is_reported_once_and_the_balancer_count_lasts_as_long_as_the_guard() {
        let set = ConfigSet::parse_ok(
            "t.yaml",
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a, namespace: default}
spec:
  hosts: [attempt.test]
  addresses: [127.77.9.1]
  ports: [{number: 80, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 198.18.9.2}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: default}
spec:
  host: attempt.test
  trafficPolicy: {outlierDetection: {consecutiveLocalOriginFailures: 1, splitExternalLocalOriginErrors: true, interval: 1s, baseEjectionTime: 30s}}
",
        );
        let registry = Registry::build(&set, &Client::default()).expect("valid");
        let c = registry.cluster(0, 80, None).expect("cluster");
        let ep = &c.members[0].stats;
        let (requests, failures) = (
            ep.rq_total.load(Ordering::Relaxed),
            ep.local_origin_failures.load(Ordering::Relaxed),
        );
        let mut a = Attempt::start(c, Some(0));
        assert_eq!(c.balancer.active(0), 1);
        a.failed(true);
        a.failed(true);
        a.response(200);
        assert_eq!(ep.rq_total.load(Ordering::Relaxed), requests + 1);
        assert_eq!(
            ep.local_origin_failures.load(Ordering::Relaxed),
            failures + 1,
            "reported once"
        );
        drop(a);
        assert_eq!(c.balancer.active(0), 0);
    }
}
