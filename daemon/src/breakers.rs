//! Circuit breakers of one cluster, as Istio programs Envoy's cluster-wide thresholds: shared by
//! every endpoint of the cluster (not per endpoint), for this client only.
//! `http2MaxRequests` caps requests in flight (overflow answered at once); for HTTP/1.1
//! `maxConnections` caps requests holding an upstream connection and `http1MaxPendingRequests`
//! bounds the queue of requests waiting for one (overflow answered at once, never queued without
//! bound).
//!
//! Invariants: every admission is released by dropping its [`Admission`]; no wait is unbounded
//! (the pending queue is capped and each wait times out); overflow is counted, never retried, and
//! not reported to outlier detection.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{
    config::policy::{ConnectionPool, RetryBudget, UNLIMITED},
    stats::ClusterStats,
};

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("http2MaxRequests {0} reached")]
    RequestOverflow(u32),
    #[error("maxConnections {0} reached")]
    ConnectionOverflow(u32),
    #[error("http1MaxPendingRequests {0} reached")]
    PendingOverflow(u32),
    #[error("no connection became free within {0:?}")]
    PendingTimeout(Duration),
}

/// The thresholds and live counts of one cluster.
#[derive(Debug)]
pub struct Limits {
    max_requests: u32,
    max_pending: u32,
    max_connections: u32,
    active: Arc<AtomicU32>,
    pending: AtomicU32,
    connections: Arc<Semaphore>,
    /// `maxRetries`, unless a `retryBudget` (percent, minimum concurrency) overrides it.
    max_retries: u32,
    retry_budget: Option<(f64, u32)>,
    retries: Arc<AtomicU32>,
    /// Where overflows and waits are counted (survives reloads).
    stats: Arc<ClusterStats>,
}

/// One retry in flight; releases its slot when dropped.
#[derive(Debug)]
pub struct RetrySlot(Arc<AtomicU32>);

/// One admitted request; releases its slots when dropped.
#[derive(Debug)]
pub struct Admission {
    active: Arc<AtomicU32>,
    _connection: Option<OwnedSemaphorePermit>,
}

// === impl Limits ===

impl Limits {
    /// Istio's defaults (every limit 2³²−1) when the cluster has no `connectionPool`.
    pub fn new(
        pool: Option<&ConnectionPool>,
        retry_budget: Option<&RetryBudget>,
        stats: Arc<ClusterStats>,
    ) -> Self {
        let (max_requests, max_pending, max_connections) =
            pool.map_or((UNLIMITED, UNLIMITED, UNLIMITED), |p| {
                (
                    p.http2_max_requests,
                    p.http1_max_pending_requests,
                    p.max_connections,
                )
            });
        let permits = (max_connections as usize).min(Semaphore::MAX_PERMITS);
        Self {
            max_requests,
            max_pending,
            max_connections,
            active: Arc::new(AtomicU32::new(0)),
            pending: AtomicU32::new(0),
            connections: Arc::new(Semaphore::new(permits)),
            max_retries: pool.map_or(UNLIMITED, |p| p.max_retries),
            retry_budget: retry_budget.map(|b| (b.percent, b.min_retry_concurrency)),
            retries: Arc::default(),
            stats,
        }
    }

    /// Admits one retry: at most `maxRetries` retries in flight across the cluster, or with a
    /// `retryBudget` max(minRetryConcurrency, percent × (active + pending requests)). A refused
    /// retry is counted as `upstream_rq_retry_overflow` and simply not sent.
    pub fn admit_retry(&self) -> Option<RetrySlot> {
        let limit = match self.retry_budget {
            Some((percent, min)) => {
                let load =
                    self.active.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed);
                ((percent / 100.0 * f64::from(load)) as u32).max(min)
            }
            None => self.max_retries,
        };
        if self.retries.fetch_add(1, Ordering::AcqRel) >= limit {
            self.retries.fetch_sub(1, Ordering::AcqRel);
            self.stats.rq_retry_overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(RetrySlot(self.retries.clone()))
    }

    /// Requests in flight, requests waiting for a connection slot, connection slots in use.
    pub fn gauges(&self) -> (u32, u32, u32) {
        let permits = (self.max_connections as usize).min(Semaphore::MAX_PERMITS);
        (
            self.active.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
            (permits - self.connections.available_permits()) as u32,
        )
    }

    /// `(http2MaxRequests, http1MaxPendingRequests, maxConnections)`.
    pub fn thresholds(&self) -> (u32, u32, u32) {
        (self.max_requests, self.max_pending, self.max_connections)
    }

    /// Admits one TCP-proxy connection: it needs a connection slot; when all are busy it is
    /// refused at once and counted as `upstream_cx_overflow`. Envoy 1.40's TCP proxy does exactly
    /// this (measured: with `max_connections: 1` and `max_pending_requests: 1` the second and
    /// third downstream connections were reset at once, `upstream_cx_overflow` 2, nothing queued).
    pub fn admit_connection(&self) -> Result<OwnedSemaphorePermit, Error> {
        self.connections.clone().try_acquire_owned().map_err(|_| {
            self.stats.cx_overflow.fetch_add(1, Ordering::Relaxed);
            Error::ConnectionOverflow(self.max_connections)
        })
    }

    /// A connection slot: at once when one is free, else a bounded, timed wait in the queue.
    async fn slot(&self, wait: Duration) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(p) = self.connections.clone().try_acquire_owned() {
            return Ok(p);
        }
        self.stats.cx_overflow.fetch_add(1, Ordering::Relaxed);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.stats
                .rq_pending_overflow
                .fetch_add(1, Ordering::Relaxed);
            return Err(Error::PendingOverflow(self.max_pending));
        }
        self.stats.rq_pending_total.fetch_add(1, Ordering::Relaxed);
        let waited = tokio::time::timeout(wait, self.connections.clone().acquire_owned()).await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(p)) => Ok(p),
            _ => {
                self.stats
                    .rq_pending_timeout
                    .fetch_add(1, Ordering::Relaxed);
                Err(Error::PendingTimeout(wait))
            }
        }
    }

    /// Admits one request: `http1` requests also need a connection slot, waiting (bounded by the
    /// pending limit and `wait`) when all are busy.
    pub async fn admit(&self, http1: bool, wait: Duration) -> Result<Admission, Error> {
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max_requests {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.stats.rq_overflow.fetch_add(1, Ordering::Relaxed);
            return Err(Error::RequestOverflow(self.max_requests));
        }
        let admission = |connection| Admission {
            active: self.active.clone(),
            _connection: connection,
        };
        if !http1 {
            return Ok(admission(None));
        }
        match self.slot(wait).await {
            Ok(p) => Ok(admission(Some(p))),
            Err(e) => {
                self.active.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }
}

// === impl RetrySlot ===

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Admission ===

impl Drop for Admission {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(f: impl FnOnce(&mut ConnectionPool)) -> ConnectionPool {
        let mut p = ConnectionPool::default();
        f(&mut p);
        p
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn pending_queue_is_bounded_and_overflow_is_immediate() {
        let l = Limits::new(
            Some(&pool(|p| {
                p.max_connections = 1;
                p.http1_max_pending_requests = 1;
            })),
            None,
            Arc::default(),
        );
        let wait = Duration::from_secs(5);
        let first = l.admit(true, wait).await.unwrap();
        // The second waits as pending; the third overflows at once.
        let second = tokio::spawn({
            let l = Arc::new(l);
            let l2 = l.clone();
            async move {
                let r = l2.admit(true, wait).await.map(|_| ());
                (r, l2)
            }
        });
        tokio::task::yield_now().await;
        drop(first);
        let (r, l) = second.await.unwrap();
        assert!(r.is_ok(), "the pending request got the freed connection");
        let _a = l.admit(true, wait).await.unwrap();
        let pending = tokio::spawn({
            let l = l.clone();
            async move { l.admit(true, wait).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(
            l.admit(true, wait).await.unwrap_err(),
            Error::PendingOverflow(1)
        );
        assert_eq!(l.stats.rq_pending_overflow.load(Ordering::Relaxed), 1);
        assert_eq!(l.stats.rq_pending_total.load(Ordering::Relaxed), 2);
        // The queued one times out instead of waiting forever.
        tokio::time::advance(wait).await;
        assert_eq!(
            pending.await.unwrap().unwrap_err(),
            Error::PendingTimeout(wait)
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn tcp_connections_over_the_cap_are_refused_at_once() {
        let l = Limits::new(
            Some(&pool(|p| {
                p.max_connections = 1;
                p.http1_max_pending_requests = 5;
            })),
            None,
            Arc::default(),
        );
        let held = l.admit_connection().unwrap();
        assert_eq!(
            l.admit_connection().unwrap_err(),
            Error::ConnectionOverflow(1)
        );
        assert_eq!(l.stats.cx_overflow.load(Ordering::Relaxed), 1);
        drop(held);
        assert!(l.admit_connection().is_ok(), "a freed slot is reusable");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn max_requests_is_not_queued_and_defaults_are_unlimited() {
        let l = Limits::new(
            Some(&pool(|p| p.http2_max_requests = 1)),
            None,
            Arc::default(),
        );
        let _a = l.admit(false, Duration::from_secs(1)).await.unwrap();
        assert_eq!(
            l.admit(false, Duration::from_secs(1)).await.unwrap_err(),
            Error::RequestOverflow(1)
        );
        assert_eq!(l.stats.rq_overflow.load(Ordering::Relaxed), 1);
        let l = Limits::new(None, None, Arc::default());
        let held: Vec<_> = futures_admit(&l, 1000).await;
        assert_eq!(held.len(), 1000);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn retries_in_flight_are_capped_by_max_retries_or_the_budget() {
        let l = Limits::new(Some(&pool(|p| p.max_retries = 2)), None, Arc::default());
        let (a, b) = (l.admit_retry().unwrap(), l.admit_retry().unwrap());
        assert!(
            l.admit_retry().is_none(),
            "a third concurrent retry overflows"
        );
        assert_eq!(l.stats.rq_retry_overflow.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(l.admit_retry().is_some(), "a finished retry frees its slot");
        drop(b);
        // A budget overrides maxRetries: max(3, 50 % of 10 active requests) = 5.
        let budget = RetryBudget {
            percent: 50.0,
            min_retry_concurrency: 3,
            budget_interval: None,
        };
        let l = Limits::new(
            Some(&pool(|p| p.max_retries = 1)),
            Some(&budget),
            Arc::default(),
        );
        let slots: Vec<_> = (0..3).map_while(|_| l.admit_retry()).collect();
        assert_eq!(slots.len(), 3, "the minimum concurrency with no load");
        assert!(l.admit_retry().is_none());
        let _active = futures_admit(&l, 10).await;
        let more: Vec<_> = (0..10).map_while(|_| l.admit_retry()).collect();
        assert_eq!(slots.len() + more.len(), 5, "50 % of 10 active requests");
    }

    async fn futures_admit(l: &Limits, n: usize) -> Vec<Admission> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(l.admit(true, Duration::from_secs(1)).await.unwrap());
        }
        v
    }
}
