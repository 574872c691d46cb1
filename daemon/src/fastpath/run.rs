//! The fast path while the daemon runs: publishes the tables after each reload, feeds the
//! kernel's connect outcomes to the primary snapshot's outlier detectors, and republishes the
//! tables of clusters with outlier detection when an ejection starts or ends.
//!
//! Invariants: the kernel's tables are only written here; with `--fast-path off` they are
//! emptied at start (a previous daemon's tables never outlive its configuration).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use drover_common::{FastEvent, FastTable, fast};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::Mode;
use crate::{
    outlier::{Outcome, Verdict},
    redirect::{Kernel, words_addr},
    registry::Registry,
    workload::Views,
};

/// How often tables of clusters with outlier detection are rebuilt (the ejection sweep's
/// resolution on the fast path).
const SWEEP: Duration = Duration::from_millis(50);

/// The fast path's publisher.
pub struct FastPath {
    kernel: Arc<Kernel>,
    mode: Mode,
    views: Views,
    /// The last published tables.
    published: Mutex<Vec<(SocketAddr, FastTable)>>,
}

impl FastPath {
    /// Starts the publisher: publishes now, then follows outcomes and ejections until
    /// `shutdown`.
    pub fn start(
        kernel: Arc<Kernel>,
        mode: Mode,
        views: Views,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            kernel,
            mode,
            views,
            published: Mutex::default(),
        });
        me.publish();
        if mode == Mode::Auto {
            if let Some(ring) = me.kernel.take_fast_events() {
                tokio::spawn(me.clone().outcomes(ring, shutdown.clone()));
            }
            tokio::spawn(me.clone().sweep(shutdown));
        }
        me
    }

    /// The snapshots whose tables must agree, the primary first.
    fn snapshots(&self) -> Vec<Arc<Registry>> {
        let mut all = vec![self.views.primary.load()];
        self.views.each(|_, h| {
            let s = h.load();
            if !all.iter().any(|a| Arc::ptr_eq(a, &s)) {
                all.push(s);
            }
        });
        all
    }

    /// Rebuilds every table from the current snapshots and writes the changed ones.
    pub fn publish(&self) {
        let tables = match self.mode {
            Mode::Off => Vec::new(),
            Mode::Auto => super::plan(&self.snapshots()).0,
        };
        self.write(tables);
    }

    fn write(&self, tables: Vec<(SocketAddr, FastTable)>) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        self.write_locked(&mut published, tables);
    }

    fn write_locked(
        &self,
        published: &mut Vec<(SocketAddr, FastTable)>,
        tables: Vec<(SocketAddr, FastTable)>,
    ) {
        match self.kernel.set_fast_tables(&tables) {
            Ok(()) => *published = tables,
            Err(e) => tracing::error!(error = %e, "updating fast-path tables failed"),
        }
    }

    /// Rebuilds the tables of clusters with outlier detection (ejections come and go). Runs
    /// under the lock of the published set, with the snapshot current once it holds it, so a
    /// concurrent reload's tables are never overwritten by older ones.
    fn refresh(&self) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let primary = self.views.primary.load();
        let mut tables = published.clone();
        let mut changed = false;
        for (vip, t) in &mut tables {
            if t.flags & fast::flags::OUTCOMES == 0 {
                continue;
            }
            if let Ok(new) = super::table(&primary, *vip, true)
                && new != *t
            {
                *t = new;
                changed = true;
            }
        }
        if changed {
            self.write_locked(&mut published, tables);
        }
    }

    async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.refresh(),
            }
        }
    }

    async fn outcomes(self: Arc<Self>, ring: RingBuf<MapData>, shutdown: CancellationToken) {
        #[expect(
            unsafe_code,
            reason = "tokio's AsyncFd registration is unsafe since 1.52"
        )]
        // SAFETY: the ring owns its map fd for as long as it lives and `as_raw_fd` always
        // returns that fd; the AsyncFd owns the ring, so the fd outlives the registration.
        let registered =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
        let Ok(mut fd) = registered else {
            tracing::warn!("fast path: cannot poll the connect-outcome ring; no outlier feed");
            return;
        };
        loop {
            let ready = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = fd.readable_mut() => r,
            };
            let Ok(mut guard) = ready else { return };
            let mut ejected = false;
            {
                let ring = guard.get_inner_mut();
                let primary = self.views.primary.load();
                while let Some(item) = ring.next() {
                    if let Some(ev) = decode(&item) {
                        ejected |= observe(&primary, &ev);
                    }
                }
            }
            guard.clear_ready();
            if ejected {
                self.refresh();
            }
        }
    }
}

/// A `FastEvent` from its bytes (native order, the kernel's layout).
pub(super) fn decode(b: &[u8]) -> Option<FastEvent> {
    if b.len() < std::mem::size_of::<FastEvent>() {
        return None;
    }
    let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Some(FastEvent {
        cluster_id: u32_at(0),
        kind: u32_at(4),
        endpoint: drover_common::EpKey {
            addr: [u32_at(8), u32_at(12), u32_at(16), u32_at(20)],
            port_be: u16::from_ne_bytes([b[24], b[25]]),
            proto: b[26],
            family: b[27],
        },
        _pad: 0,
    })
}

/// Feeds one outcome to its cluster's detector; true when it ejected the endpoint.
fn observe(reg: &Registry, ev: &FastEvent) -> bool {
    let Some(c) = reg.clusters().find(|c| c.stats.id == ev.cluster_id) else {
        return false;
    };
    let (Some(od), addr) = (
        &c.outlier,
        words_addr(ev.endpoint.addr, ev.endpoint.port_be),
    ) else {
        return false;
    };
    let Some(i) = c.members.iter().position(|m| m.addr == addr) else {
        return false;
    };
    let outcome = if ev.kind == fast::outcome::FAILED {
        Outcome::LocalFailure
    } else {
        Outcome::Connected
    };
    matches!(od.observe(i, outcome), Verdict::Ejected(_))
}
