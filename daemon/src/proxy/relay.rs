//! The TCP proxy's byte relay with Istio's connection bounds: `idleTimeout` (no byte in either
//! direction for the duration closes both sides; 1 h by default, 0 disables) and
//! `maxConnectionDuration` (the proxied connection is closed when it expires). Two movers share
//! the bounds: [`bounded`] copies through a user-space buffer (any stream: TLS, tests), and
//! [`bounded_tcp`] moves plain TCP socket → pipe → socket with `splice(2)` ([`splice`]), so the
//! bytes never enter user space.
//!
//! Invariants: driven by tokio time only (unit-tested with a paused clock); whichever bound ends
//! the relay is reported, and both streams are simply dropped by the caller (closed); an idle
//! connection holds no copy buffer and no pipe (see `Pump` and `splice::Pump`); the byte counts
//! are what was written to the other side; a [`Report`] hears of them while the relay runs,
//! each byte once.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};
use tokio_util::io::poll_read_buf;

pub mod splice;

/// How a bounded relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed: bytes client → upstream and upstream → client.
    Closed(u64, u64),
    IdleTimeout(Duration),
    MaxDuration(Duration),
}

/// Periodic reports of the bytes a running relay moved (Istio's proxies report TCP metrics
/// every `reportingInterval`, not only when the connection closes).
pub struct Report<'a> {
    pub every: Duration,
    /// Called with the bytes moved (to upstream, back) since its previous call; not called
    /// when none moved.
    pub sink: &'a mut (dyn FnMut(u64, u64) + Send),
}

/// Bytes moved per read at most; a buffer exists only while its direction has data in flight.
/// Bulk transfers move far more per system call than with 8–16 KiB, and an idle connection
/// still holds nothing.
const BUF: usize = 64 * 1024;

/// One direction of the relay. Unlike `tokio::io::copy_bidirectional`, which keeps two 8 KiB
/// buffers for a connection's whole life, the buffer is dropped whenever the reader has nothing
/// more and everything read was written, so an idle connection holds no buffer at all. The
/// buffer is never zero-filled: reads go to its spare capacity.
#[derive(Default)]
struct Pump {
    /// Read and not yet written.
    buf: Option<BytesMut>,
    eof: bool,
    done: bool,
    unflushed: bool,
    moved: u64,
}

impl Pump {
    /// Copies from `r` to `w` until `r` ends (then shuts `w` down); stamps `last_ms` on input.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        stamp: &dyn Fn(),
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            let empty = self.buf.as_ref().is_none_or(BytesMut::is_empty);
            if empty && !self.eof {
                let buf = self.buf.get_or_insert_with(|| BytesMut::with_capacity(BUF));
                // Everything read was written: take the whole allocation back (no copy).
                buf.reserve(BUF);
                match poll_read_buf(r.as_mut(), cx, buf) {
                    Poll::Pending => {
                        // Nothing buffered: give the memory back while the reader is idle.
                        self.buf = None;
                        if self.unflushed {
                            std::task::ready!(w.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(0)) => self.eof = true,
                    Poll::Ready(Ok(_)) => stamp(),
                }
            }
            while let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
                let n = std::task::ready!(w.as_mut().poll_write(cx, buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                buf.advance(n);
                self.moved += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                self.buf = None;
                std::task::ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

/// Copies both ways until both sides close or a bound ends the connection. `idle` of zero
/// disables the idle bound, as Istio's `idleTimeout: 0s`.
pub async fn bounded<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Duration,
    max: Option<Duration>,
    report: Option<Report<'_>>,
) -> io::Result<End>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up, mut down) = (Pump::default(), Pump::default());
    within_bounds(idle, max, report, |cx, stamp| {
        let a = up.poll(cx, Pin::new(&mut *client), Pin::new(&mut *upstream), stamp);
        let b = down.poll(cx, Pin::new(&mut *upstream), Pin::new(&mut *client), stamp);
        (both(a, b), (up.moved, down.moved))
    })
    .await
}

/// [`bounded`] for two plain TCP sockets, with `splice(2)` through pipes.
pub async fn bounded_tcp(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    max: Option<Duration>,
    report: Option<Report<'_>>,
) -> io::Result<End> {
    let (mut up, mut down) = (splice::Pump::default(), splice::Pump::default());
    within_bounds(idle, max, report, |cx, stamp| {
        let a = up.poll(cx, client, upstream, stamp);
        let b = down.poll(cx, upstream, client, stamp);
        (both(a, b), (up.moved(), down.moved()))
    })
    .await
}

/// Both directions' result: the first error, or both counts once both are done.
fn both(a: Poll<io::Result<u64>>, b: Poll<io::Result<u64>>) -> Poll<io::Result<(u64, u64)>> {
    match (a, b) {
        (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
        (Poll::Ready(Ok(a)), Poll::Ready(Ok(b))) => Poll::Ready(Ok((a, b))),
        _ => Poll::Pending,
    }
}

/// What one poll of a relay says: its end (once both directions are done) and the bytes moved
/// so far each way.
type Polled = (Poll<io::Result<(u64, u64)>>, (u64, u64));

/// Drives `relay` (both directions; it calls the stamp on every input) until it ends or a
/// bound does, reporting its bytes to `report` as they move.
async fn within_bounds(
    idle: Duration,
    max: Option<Duration>,
    report: Option<Report<'_>>,
    mut relay: impl FnMut(&mut Context<'_>, &dyn Fn()) -> Polled,
) -> io::Result<End> {
    let base = Instant::now();
    let last_ms = AtomicU64::new(0);
    let stamp = || last_ms.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
    let moved = [AtomicU64::new(0), AtomicU64::new(0)];
    let copy = std::future::poll_fn(|cx| {
        let (polled, (up, down)) = relay(cx, &stamp);
        moved[0].store(up, Ordering::Relaxed);
        moved[1].store(down, Ordering::Relaxed);
        polled
    });
    let reporting = async {
        let Some(Report { every, sink }) = report else {
            return std::future::pending::<std::convert::Infallible>().await;
        };
        let mut reported = (0, 0);
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = (
                moved[0].load(Ordering::Relaxed),
                moved[1].load(Ordering::Relaxed),
            );
            if now != reported {
                sink(now.0 - reported.0, now.1 - reported.1);
                reported = now;
            }
        }
    };
    let idle_watch = async {
        if idle.is_zero() {
            return std::future::pending().await;
        }
        loop {
            let last = base + Duration::from_millis(last_ms.load(Ordering::Relaxed));
            if Instant::now() >= last + idle {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    };
    let deadline = async {
        match max {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = copy => r.map(|(up, down)| End::Closed(up, down)),
        _ = idle_watch => Ok(End::IdleTimeout(idle)),
        _ = deadline => Ok(End::MaxDuration(max.unwrap_or_default())),
        never = reporting => match never {},
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::Pump;

    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_timeout_counts_from_the_last_byte_either_way() {
        let (mut app, mut client) = duplex(64);
        let (mut upstream, mut server) = duplex(64);
        let relay = tokio::spawn(async move {
            bounded(
                &mut client,
                &mut upstream,
                Duration::from_secs(10),
                None,
                None,
            )
            .await
        });
        // Traffic at t=6 s moves the idle deadline to t=16 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        app.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            !relay.is_finished(),
            "still inside the idle window at t=15 s"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            relay.await.unwrap().unwrap(),
            End::IdleTimeout(Duration::from_secs(10))
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn max_duration_closes_a_busy_connection_and_zero_idle_disables() {
        let (mut app, mut client) = duplex(64);
        let (mut upstream, mut server) = duplex(64);
        let relay = tokio::spawn(async move {
            bounded(
                &mut client,
                &mut upstream,
                Duration::ZERO,
                Some(Duration::from_secs(30)),
                None,
            )
            .await
        });
        for _ in 0..29 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            server.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            app.read_exact(&mut b).await.unwrap();
        }
        assert!(!relay.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            relay.await.unwrap().unwrap(),
            End::MaxDuration(Duration::from_secs(30))
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_running_relay_reports_new_bytes_every_interval_each_byte_once() {
        let (mut app, mut client) = duplex(64);
        let (mut upstream, mut server) = duplex(64);
        let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let relay = tokio::spawn(async move {
            let mut sink = |up, down| seen.lock().unwrap().push((up, down));
            let report = Report {
                every: Duration::from_secs(5),
                sink: &mut sink,
            };
            bounded(
                &mut client,
                &mut upstream,
                Duration::ZERO,
                None,
                Some(report),
            )
            .await
        });
        let mut buf = [0u8; 4];
        app.write_all(b"ping").await.unwrap();
        server.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            reports.lock().unwrap().is_empty(),
            "nothing before the first interval"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*reports.lock().unwrap(), [(4, 0)]);
        // An interval without traffic reports nothing; the next bytes are reported alone.
        tokio::time::sleep(Duration::from_secs(5)).await;
        server.write_all(b"pong!").await.unwrap();
        let mut back = [0u8; 5];
        app.read_exact(&mut back).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(*reports.lock().unwrap(), [(4, 0), (0, 5)]);
        app.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(relay.await.unwrap().unwrap(), End::Closed(4, 5));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn closing_both_sides_reports_bytes() {
        let (mut app, mut client) = duplex(64);
        let (mut upstream, mut server) = duplex(64);
        let relay = tokio::spawn(async move {
            bounded(
                &mut client,
                &mut upstream,
                Duration::from_secs(3600),
                None,
                None,
            )
            .await
        });
        app.write_all(b"hello").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(b"ok").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        app.read_to_end(&mut back).await.unwrap();
        assert_eq!(
            (got.as_slice(), back.as_slice()),
            (&b"hello"[..], &b"ok"[..])
        );
        assert_eq!(relay.await.unwrap().unwrap(), End::Closed(5, 2));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn both_directions_survive_backpressure_and_idle_pumps_hold_no_buffer() {
        // 64-byte pipes force partial writes; 300 KiB each way, concurrently.
        let (app, mut client) = duplex(64);
        let (mut upstream, server) = duplex(64);
        let data: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
        let relay = tokio::spawn(async move {
            bounded(
                &mut client,
                &mut upstream,
                Duration::from_secs(60),
                None,
                None,
            )
            .await
        });
        let (d1, d2) = (data.clone(), data.clone());
        let (mut app_r, mut app_w) = tokio::io::split(app);
        let (mut srv_r, mut srv_w) = tokio::io::split(server);
        let up = tokio::spawn(async move {
            app_w.write_all(&d1).await.unwrap();
            app_w.shutdown().await.unwrap();
        });
        let down = tokio::spawn(async move {
            srv_w.write_all(&d2).await.unwrap();
            srv_w.shutdown().await.unwrap();
        });
        let (mut at_server, mut at_app) = (Vec::new(), Vec::new());
        srv_r.read_to_end(&mut at_server).await.unwrap();
        app_r.read_to_end(&mut at_app).await.unwrap();
        up.await.unwrap();
        down.await.unwrap();
        assert!(at_server == data && at_app == data);
        let n = data.len() as u64;
        assert_eq!(relay.await.unwrap().unwrap(), End::Closed(n, n));

        // A pump whose reader has nothing frees its buffer.
        let (mut idle_r, _keep) = duplex(64);
        let (mut sink, _keep2) = duplex(64);
        let mut pump = Pump::default();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let r = pump.poll(&mut cx, Pin::new(&mut idle_r), Pin::new(&mut sink), &|| {});
        assert!(r.is_pending());
        assert!(pump.buf.is_none());
    }
}
