//! One direction of a plain-TCP relay with `splice(2)`: socket → pipe → socket, the bytes never
//! copied into user space. Pipes come from a process-wide pool and go back to it as soon as a
//! direction has nothing in flight, so an idle connection holds no pipe (and no descriptor
//! beyond its two sockets), and the number of pipes follows the directions with data moving,
//! not the connections open.
//!
//! Invariants: a pipe goes back to the pool only empty (a pipe with bytes left is closed); a
//! direction reads into its pipe only when the pipe is empty, so a read never blocks on a full
//! pipe; `moved` counts bytes written to the other socket; end of input shuts the other side's
//! write half, as the copying relay does.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
    task::{Context, Poll, ready},
};

use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::{io::Interest, net::TcpStream};

/// Bytes asked of one `splice` call: the pipe's capacity, so a read fills what the pipe holds.
const PIPE_BYTES: usize = 1024 * 1024;
/// Empty pipes kept for reuse; more are closed when returned.
const POOL_MAX: usize = 256;

/// The pipes not in use.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A pipe: (read end, write end).
#[derive(Debug)]
struct Pipe(OwnedFd, OwnedFd);

impl Pipe {
    /// One from the pool, or a new one of [`PIPE_BYTES`] (the kernel's default of 64 KiB when
    /// the larger size is refused, e.g. over `pipe-user-pages-soft`).
    fn take() -> io::Result<Self> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
        Ok(Self(r, w))
    }

    /// Back to the pool (it must be empty).
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

/// One direction's state.
#[derive(Debug, Default)]
pub struct Pump {
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet written out.
    in_pipe: usize,
    eof: bool,
    done: bool,
    moved: u64,
}

impl Pump {
    /// Bytes written to the other side so far.
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Moves bytes from `from` to `to` until `from` ends (then shuts `to`'s write half down);
    /// calls `stamp` on input.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        stamp: &dyn Fn(),
    ) -> Poll<io::Result<u64>> {
        if self.done {
            return Poll::Ready(Ok(self.moved));
        }
        loop {
            if self.in_pipe == 0 && !self.eof {
                if from.poll_read_ready(cx)?.is_pending() {
                    // Nothing in flight: the pipe goes back while this direction is idle.
                    if let Some(p) = self.pipe.take() {
                        p.give_back();
                    }
                    return Poll::Pending;
                }
                let pipe = match &self.pipe {
                    Some(p) => p,
                    None => self.pipe.insert(Pipe::take()?),
                };
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_fd(), pipe.1.as_fd(), PIPE_BYTES)
                }) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.in_pipe = n;
                        stamp();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            while self.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                let Some(pipe) = &self.pipe else {
                    return Poll::Ready(Err(io::Error::other("bytes in flight without a pipe")));
                };
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe.0.as_fd(), to.as_fd(), self.in_pipe)
                }) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.moved += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.eof {
                if let Some(p) = self.pipe.take() {
                    p.give_back();
                }
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                self.done = true;
                return Poll::Ready(Ok(self.moved));
            }
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        // A pipe with bytes left is closed with them; an empty one is reused.
        if let Some(p) = self.pipe.take()
            && self.in_pipe == 0
        {
            p.give_back();
        }
    }
}

/// `splice(2)` of at most `len` bytes, non-blocking on the pipe (the sockets are non-blocking).
fn splice(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    //! Real loopback sockets: the splice path needs kernel sockets, not in-memory streams.

    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::super::{End, bounded_tcp};

    /// A connected pair: (the side a peer holds, the side the relay holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    use super::*;

    /// FNV-1a over a stream of bytes.
    fn fnv(h: u64, bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
    }

    /// (bytes, hash) of everything `r` yields until it ends.
    async fn read_all(mut r: impl tokio::io::AsyncRead + Unpin) -> (usize, u64) {
        let (mut h, mut n, mut buf) = (0xcbf2_9ce4_8422_2325, 0usize, vec![0u8; 65536]);
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                return (n, h);
            }
            h = fnv(h, &buf[..k]);
            n += k;
        }
    }

    #[tokio::test]
    async fn moves_many_mebibytes_both_ways_with_half_close_and_exact_counts() {
        let (mut app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            bounded_tcp(&client, &upstream, Duration::from_secs(60), None, None).await
        });
        const UP: usize = 48 << 20;
        const DOWN: usize = 17 << 20 | 12345;
        let data = |n: usize, seed: u64| -> Vec<u8> {
            (0..n)
                .map(|i| ((i as u64).wrapping_mul(seed) >> 7) as u8)
                .collect()
        };
        let (up_data, down_data) = (data(UP, 31), data(DOWN, 17));
        let (want_up, want_down) = (
            fnv(0xcbf2_9ce4_8422_2325, &up_data),
            fnv(0xcbf2_9ce4_8422_2325, &down_data),
        );
        let (app_r, mut app_w) = app.split();
        let (srv_r, mut srv_w) = server.split();
        let send_up = async {
            app_w.write_all(&up_data).await.unwrap();
            // Half close: the server must still be able to answer.
            app_w.shutdown().await.unwrap();
        };
        let send_down = async {
            srv_w.write_all(&down_data).await.unwrap();
            srv_w.shutdown().await.unwrap();
        };
        let all = async { tokio::join!(send_up, send_down, read_all(srv_r), read_all(app_r)) };
        let ((), (), at_server, at_app) = tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .expect("the transfer ends");
        assert_eq!(at_server, (UP, want_up), "client → server intact");
        assert_eq!(at_app, (DOWN, want_down), "server → client intact");
        assert_eq!(
            relay.await.unwrap().unwrap(),
            End::Closed(UP as u64, DOWN as u64)
        );
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_timeout_holds_on_the_splice_path_and_idle_directions_hold_no_pipe() {
        let (mut app, client) = pair().await;
        let (upstream, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            bounded_tcp(&client, &upstream, Duration::from_secs(10), None, None).await
        });
        tokio::time::sleep(Duration::from_secs(6)).await;
        app.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!relay.is_finished(), "inside the idle window at t=15 s");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            relay.await.unwrap().unwrap(),
            End::IdleTimeout(Duration::from_secs(10))
        );

        // A direction with nothing to read gives its pipe back.
        let (_peer, from) = pair().await;
        let (to, _sink) = pair().await;
        let mut pump = Pump::default();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(pump.poll(&mut cx, &from, &to, &|| {}).is_pending());
        assert!(pump.pipe.is_none());
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay_with_an_error_not_a_hang() {
        let (mut app, client) = pair().await;
        let (upstream, server) = pair().await;
        let relay = tokio::spawn(async move {
            bounded_tcp(&client, &upstream, Duration::from_secs(60), None, None).await
        });
        // RST: linger 0 then close.
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        app.write_all(b"after the reset").await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("the relay ends")
            .unwrap();
        assert!(
            ended.is_err(),
            "a reset is an error, not a clean close: {ended:?}"
        );
    }
}
