//! The TCP proxy's byte relay with Istio's connection bounds: `idleTimeout` (no byte in either
//! direction for the duration closes both sides; 1 h by default, 0 disables) and
//! `maxConnectionDuration` (the proxied connection is closed when it expires).
//!
//! Invariants: driven by tokio time only (unit-tested with a paused clock); whichever bound ends
//! the relay is reported, and both streams are simply dropped by the caller (closed).

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// How a bounded relay ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both sides closed: bytes client → upstream and upstream → client.
    Closed(u64, u64),
    IdleTimeout(Duration),
    MaxDuration(Duration),
}

/// A stream that stamps the time of the last byte it moved.
struct Stamped<'a, S> {
    inner: &'a mut S,
    base: Instant,
    last_ms: Arc<AtomicU64>,
}

impl<S> Stamped<'_, S> {
    fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stamped<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stamped<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides close or a bound ends the connection. `idle` of zero
/// disables the idle bound, as Istio's `idleTimeout: 0s`.
pub async fn bounded<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Duration,
    max: Option<Duration>,
) -> io::Result<End>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let base = Instant::now();
    let last_ms = Arc::new(AtomicU64::new(0));
    let mut a = Stamped {
        inner: client,
        base,
        last_ms: last_ms.clone(),
    };
    let mut b = Stamped {
        inner: upstream,
        base,
        last_ms: last_ms.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
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
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_timeout_counts_from_the_last_byte_either_way() {
        let (mut app, mut client) = duplex(64);
        let (mut upstream, mut server) = duplex(64);
        let relay = tokio::spawn(async move {
            bounded(&mut client, &mut upstream, Duration::from_secs(10), None).await
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
    async fn closing_both_sides_reports_bytes() {
        let (mut app, mut client) = duplex(64);
        let (mut upstream, mut server) = duplex(64);
        let relay = tokio::spawn(async move {
            bounded(&mut client, &mut upstream, Duration::from_secs(3600), None).await
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
}
