//! Endpoint selection. This first version is plain round robin per (service, port); the
//! `LoadBalancerSettings` algorithms arrive with the load-balancing work.
//!
//! Invariant: selection is lock-free and only reads the registry snapshot it belongs to.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Round robin over `n` candidates; the counter lives in the snapshot, so a new snapshot restarts it.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

// === impl RoundRobin ===

impl RoundRobin {
    /// Index of the next candidate out of `n`, or `None` when there are none.
    pub fn pick(&self, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_and_handles_empty() {
        let rr = RoundRobin::default();
        assert_eq!(rr.pick(0), None);
        let picks: Vec<_> = (0..6).map(|_| rr.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
