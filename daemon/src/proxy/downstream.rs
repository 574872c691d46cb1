//! Downstream (client-side) limits of the proxy: Envoy's `request_headers_timeout` and HTTP
//! connection manager `idle_timeout` for captured HTTP connections, and the overload guard (a
//! global cap on open downstream connections and a memory threshold) applied at accept.
//!
//! Invariants: a downstream HTTP connection always has exactly one deadline running — waiting
//! for request headers (from accept for the first request, and from the first byte of each later
//! HTTP/1.1 request) or idle (no request in flight) — or none while a request is in flight; the
//! watchdog only reads atomics the connection's I/O and requests update, so the data path takes
//! no lock. The overload guard refuses a connection before any byte is read and counts it.
//!
//! An HTTP/1.1 connection idle for [`PARK_AFTER`] is parked: its server gives back its buffers
//! and the socket alone waits for the next request. [`State::parkable`] only resolves when that
//! loses nothing and changes nothing the client sees: no request in flight or begun, and every
//! response byte handed to the socket; bytes the server had read ahead come back and are
//! replayed ([`Watched::unread`]).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// Default for `--request-headers-timeout`.
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for `--downstream-idle-timeout` (Envoy's HTTP connection manager default, 1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Timeouts of captured HTTP connections (zero disables one).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accept (first request) or a request's first byte until its headers are complete.
    pub request_headers: Duration,
    /// With no request in flight.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request_headers: DEFAULT_REQUEST_HEADERS_TIMEOUT,
            idle: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why the watchdog closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// Request headers incomplete at the deadline (Envoy: `downstream_rq_header_timeout`).
    RequestHeaders,
    /// No request for the idle timeout (Envoy: `downstream_cx_idle_timeout`).
    Idle,
}

/// No deadline recorded.
const NONE: u64 = u64::MAX;

/// What the watchdog of one connection sees; updated by [`Watched`] reads and [`Active`] guards.
#[derive(Debug)]
pub struct State {
    start: Instant,
    timeouts: Timeouts,
    /// Requests in flight (service called, response body not yet finished).
    active: AtomicU32,
    /// Since when (ns after `start`) request headers are awaited, or [`NONE`].
    headers_since: AtomicU64,
    /// Since when (ns after `start`) no request is in flight.
    idle_since: AtomicU64,
    /// The client spoke the HTTP/2 preface: after the first request, reads (pings, settings,
    /// window updates) do not start a header deadline.
    h2: AtomicBool,
    first_read: AtomicBool,
    /// The last write to the client did not take everything (the server still holds bytes).
    write_blocked: AtomicBool,
    /// The server is being parked: its shutdown leaves the socket open.
    parking: AtomicBool,
}

/// How long an HTTP/1.1 connection stays idle before its server's buffers are given back.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

impl State {
    /// A new connection: awaiting its first request's headers.
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            timeouts,
            active: AtomicU32::new(0),
            headers_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            first_read: AtomicBool::new(true),
            write_blocked: AtomicBool::new(false),
            parking: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Bytes arrived from the client (`head`: the first bytes of this read).
    fn on_read(&self, head: &[u8]) {
        if self.first_read.swap(false, Ordering::Relaxed) && head.starts_with(b"PRI * HTTP/2") {
            self.h2.store(true, Ordering::Relaxed);
        }
        // Most reads happen mid-request or with a deadline already running: no clock read then.
        if self.active.load(Ordering::Relaxed) == 0
            && self.headers_since.load(Ordering::Relaxed) == NONE
            && !(self.h2.load(Ordering::Relaxed) && self.idle_since.load(Ordering::Relaxed) != 0)
        {
            let _ = self.headers_since.compare_exchange(
                NONE,
                self.now(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// A request's headers are complete: it is in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.headers_since.store(NONE, Ordering::Relaxed);
        Active(self.clone())
    }

    /// Resolves once the connection has been idle for `after` and can be parked now: no request
    /// in flight, no byte of a new one seen, and no response byte still held by the server.
    /// Must be acted on without yielding (the server could start a request meanwhile).
    pub async fn parkable(&self, after: Duration) {
        let after = nanos(after);
        loop {
            let idle = self.idle_since.load(Ordering::Relaxed);
            let quiet = self.active.load(Ordering::Relaxed) == 0
                && self.headers_since.load(Ordering::Relaxed) == NONE
                && !self.write_blocked.load(Ordering::Relaxed);
            let now = self.now();
            let wait = match quiet {
                true if now >= idle.saturating_add(after) => return,
                true => idle.saturating_add(after) - now,
                false => after,
            };
            tokio::time::sleep(Duration::from_nanos(wait)).await;
        }
    }

    /// While set, the server's shutdown of the socket is skipped (it is being parked).
    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Relaxed);
    }

    /// Resolves when a deadline passes; the caller closes the connection.
    pub async fn expired(&self) -> Expired {
        loop {
            let now = self.now();
            let headers = self.headers_since.load(Ordering::Relaxed);
            let idle = self.idle_since.load(Ordering::Relaxed);
            let (deadline, kind) = if headers != NONE {
                (
                    headers.saturating_add(nanos(self.timeouts.request_headers)),
                    Some(Expired::RequestHeaders),
                )
            } else if self.active.load(Ordering::Relaxed) == 0 {
                (
                    idle.saturating_add(nanos(self.timeouts.idle)),
                    Some(Expired::Idle),
                )
            } else {
                // In flight: look again later (a finished request records when).
                let next = nanos(self.timeouts.request_headers).min(nanos(self.timeouts.idle));
                (now.saturating_add(next), None)
            };
            match kind {
                Some(kind) if now >= deadline => return kind,
                _ => tokio::time::sleep(Duration::from_nanos(deadline - now)).await,
            }
        }
    }
}

/// A timeout in nanoseconds; zero (disabled) and overlong ones never expire.
fn nanos(d: Duration) -> u64 {
    match u64::try_from(d.as_nanos()) {
        Ok(0) | Err(_) => u64::MAX,
        Ok(n) => n,
    }
}

/// Keeps one request in flight; dropped when its response body is finished (or abandoned).
#[derive(Debug)]
pub struct Active(Arc<State>);

impl Drop for Active {
    fn drop(&mut self) {
        let s = &self.0;
        if s.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Never 0: 0 stands for "the connection's start" (HTTP/2: before the first request).
            s.idle_since.store(s.now().max(1), Ordering::Relaxed);
        }
    }
}

/// The client socket, reporting reads and blocked writes to the connection's [`State`].
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    state: Arc<State>,
    /// Bytes read before (by a parked server), served again before the socket's.
    unread: bytes::Bytes,
}

impl<T> Watched<T> {
    pub fn new(inner: T, state: Arc<State>) -> Self {
        Self {
            inner,
            state,
            unread: bytes::Bytes::new(),
        }
    }

    /// The client socket itself.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The connection's state.
    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Puts back bytes a server read and did not use: the next reads return them first. They
    /// begin a request (its header deadline runs, and the next server is not parked before
    /// it has answered it).
    pub fn unread(&mut self, bytes: bytes::Bytes) {
        self.state.on_read(&bytes);
        self.unread = bytes;
    }

    /// Records whether a write left bytes behind.
    fn wrote<R>(&self, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        (self.state.write_blocked).store(r.is_pending(), Ordering::Relaxed);
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && buf.filled().len() > before
        {
            self.state.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.parking.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Overload protection at accept (Envoy's overload manager in spirit): a cap on open downstream
/// connections and a resident-memory threshold beyond which new connections are refused.
#[derive(Debug)]
pub struct Overload {
    /// At most this many downstream connections open at once (0: no cap).
    pub max_connections: u64,
    /// Refuse new connections while the process's resident memory exceeds this (0: no limit).
    pub max_rss_bytes: u64,
    open: AtomicU64,
    /// Resident memory as last sampled (bytes).
    rss: AtomicU64,
    /// When (ms since the process's first sample) a refusal was last logged.
    logged: AtomicU64,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Connections,
    Memory,
}

/// An admitted downstream connection; releases its slot when dropped.
#[derive(Debug)]
pub struct Slot(Arc<Overload>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        crate::stats::store()
            .downstream
            .cx_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often resident memory is sampled.
pub const RSS_SAMPLE: Duration = Duration::from_millis(250);

impl Overload {
    pub fn new(max_connections: u64, max_rss_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            max_connections,
            max_rss_bytes,
            open: AtomicU64::new(0),
            rss: AtomicU64::new(0),
            logged: AtomicU64::new(NONE),
        })
    }

    /// Admits one accepted connection, or says why not (counted and logged at most once a
    /// second).
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Refused> {
        let stats = &crate::stats::store().downstream;
        let refused =
            if self.max_rss_bytes > 0 && self.rss.load(Ordering::Relaxed) > self.max_rss_bytes {
                Some(Refused::Memory)
            } else if self.max_connections > 0
                && self.open.fetch_add(1, Ordering::Relaxed) >= self.max_connections
            {
                self.open.fetch_sub(1, Ordering::Relaxed);
                Some(Refused::Connections)
            } else {
                if self.max_connections == 0 {
                    self.open.fetch_add(1, Ordering::Relaxed);
                }
                None
            };
        match refused {
            None => {
                stats.cx_total.fetch_add(1, Ordering::Relaxed);
                let open = stats.cx_active.fetch_add(1, Ordering::Relaxed) + 1;
                crate::memory::note_open(open);
                Ok(Slot(self.clone()))
            }
            Some(why) => {
                let counter = match why {
                    Refused::Connections => &stats.cx_overflow,
                    Refused::Memory => &stats.cx_overload_memory,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let now = crate::stats::monotonic_ns() / 1_000_000;
                let last = self.logged.load(Ordering::Relaxed);
                if (last == NONE || now.saturating_sub(last) >= 1000)
                    && self
                        .logged
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        reason = ?why,
                        open = self.open.load(Ordering::Relaxed),
                        max_connections = self.max_connections,
                        rss_bytes = self.rss.load(Ordering::Relaxed),
                        max_rss_bytes = self.max_rss_bytes,
                        "overload: refusing new downstream connections"
                    );
                }
                Err(why)
            }
        }
    }

    /// Samples resident memory every [`RSS_SAMPLE`] while a memory threshold is set.
    pub async fn watch_memory(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if self.max_rss_bytes == 0 {
            return;
        }
        let mut tick = tokio::time::interval(RSS_SAMPLE);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Some(rss) = resident_bytes() {
                        self.rss.store(rss, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// This process's resident memory (`/proc/self/statm`, second field, in pages).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            request_headers: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }

    /// `elapsed` is `secs`, give or take the timer wheel's millisecond (the clock is paused).
    fn assert_within(elapsed: Duration, secs: u64) {
        let want = Duration::from_secs(secs);
        assert!(
            elapsed >= want && elapsed <= want + Duration::from_millis(2),
            "{elapsed:?} vs {want:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connection_expires_after_the_header_timeout() {
        let s = State::new(timeouts());
        let t = Instant::now();
        assert_eq!(s.expired().await, Expired::RequestHeaders);
        assert_eq!(t.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn finished_request_waits_idle_then_a_partial_header_times_out() {
        let s = State::new(timeouts());
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.on_read(b"GET / HTTP/1.1\r\n\r\n");
        let active = s.request();
        // In flight: no deadline, however long it takes.
        let slow = tokio::time::timeout(Duration::from_secs(500), s.expired()).await;
        assert!(slow.is_err(), "a request in flight never expires");
        drop(active);
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(30)).await;
        // The next request starts; its headers never complete.
        s.on_read(b"GET /next HT");
        assert_eq!(s.expired().await, Expired::RequestHeaders);
        assert_within(t.elapsed(), 40);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_expires_after_the_idle_timeout() {
        let s = State::new(timeouts());
        s.on_read(b"GET / HTTP/1.1\r\n\r\n");
        drop(s.request());
        let t = Instant::now();
        assert_eq!(s.expired().await, Expired::Idle);
        assert_within(t.elapsed(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_pings_after_a_request_do_not_start_a_header_deadline() {
        let s = State::new(timeouts());
        s.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        drop(s.request());
        tokio::time::sleep(Duration::from_secs(5)).await;
        s.on_read(b"\x00\x00\x08\x06"); // a PING frame
        let t = Instant::now();
        assert_eq!(s.expired().await, Expired::Idle);
        assert_within(t.elapsed(), 55);
    }

    #[test]
    fn connection_cap_admits_exactly_max_and_frees_on_drop() {
        let o = Overload::new(2, 0);
        let a = o.admit().unwrap();
        let _b = o.admit().unwrap();
        assert_eq!(o.admit().unwrap_err(), Refused::Connections);
        drop(a);
        assert!(o.admit().is_ok());
    }

    #[test]
    fn memory_threshold_refuses_while_over() {
        let o = Overload::new(0, 1000);
        o.rss.store(2000, Ordering::Relaxed);
        assert_eq!(o.admit().unwrap_err(), Refused::Memory);
        o.rss.store(500, Ordering::Relaxed);
        assert!(o.admit().is_ok());
    }
}
