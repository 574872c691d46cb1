//! Gives freed heap back to the operating system after load: glibc's allocator keeps what a
//! burst of connections freed in its per-thread arenas, so resident memory would otherwise stay
//! at the burst's high-water mark (and creep up over repeated bursts). The trimmer watches the
//! downstream connection high-water mark and calls `malloc_trim` once load has fallen (or many
//! idle connections were parked, giving back their buffers), and after each configuration
//! reload (a rebuild frees a whole parse's worth of memory at once).
//!
//! Invariant: trimming never runs on the data path — only on its own task, at most once per
//! [`INTERVAL`] for load, so its cost (a walk over the arenas' free lists) is not paid per
//! request.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// How often the trimmer looks at the connection high-water mark.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Connections that must have closed (or been parked) since the last look before a trim is
/// worth it.
pub const CLOSED_BEFORE_TRIM: u64 = 256;

/// The highest number of open downstream connections since the trimmer last looked.
static PEAK: AtomicU64 = AtomicU64::new(0);

/// Records `open` downstream connections (called at accept).
pub fn note_open(open: u64) {
    PEAK.fetch_max(open, Ordering::Relaxed);
}

/// Returns freed heap pages to the OS now; resident bytes before and after, when known.
pub fn trim() -> (Option<u64>, Option<u64>) {
    let before = crate::proxy::downstream::resident_bytes();
    #[cfg(target_env = "gnu")]
    #[expect(unsafe_code, reason = "malloc_trim has no safe wrapper")]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
    (before, crate::proxy::downstream::resident_bytes())
}

/// Trims on a blocking thread without waiting for it, unless a trim is already running (a
/// reload must not wait for the trim of the previous one: on a large heap a trim takes longer
/// than the next change takes to arrive).
pub fn trim_in_background() {
    static RUNNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if RUNNING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::task::spawn_blocking(|| {
        trim();
        RUNNING.store(false, Ordering::Release);
    });
}

/// Trims whenever at least [`CLOSED_BEFORE_TRIM`] connections closed, or were parked, since the
/// last look.
pub async fn trim_after_load(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    let downstream = &crate::stats::store().downstream;
    let mut parked_before = downstream.cx_parked.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let open = downstream.cx_active.load(Ordering::Relaxed);
        let peak = PEAK.swap(open, Ordering::Relaxed);
        let parked_now = downstream.cx_parked.load(Ordering::Relaxed);
        let parked = parked_now - std::mem::replace(&mut parked_before, parked_now);
        if peak >= open + CLOSED_BEFORE_TRIM || parked >= CLOSED_BEFORE_TRIM {
            let (before, after) = tokio::task::spawn_blocking(trim).await.unwrap_or_default();
            tracing::debug!(peak, open, rss_before = ?before, rss_after = ?after, "heap trimmed after load");
        }
    }
}
