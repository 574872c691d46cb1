//! `--only sockmap`: the go/no-go experiment for splicing relayed plain-TCP pairs inside the
//! kernel with an `sk_skb` stream verdict, against the daemon's `splice(2)` relay
//! (`drover::proxy::relay::bounded_tcp`), on this kernel, over loopback. Both relays sit between
//! the same client and server threads; each run checks the bytes (length and FNV-1a checksum),
//! half-close (the server answers after the client's FIN), a reset from the server (the client
//! must see the end), and the kernel's TCP memory while the server reads slowly.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use drover::redirect::sockmap::SockmapRelay;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Relay {
    Splice,
    Sockmap,
}

/// What the server does with a connection.
#[derive(Clone, Copy)]
enum Serve {
    /// Count and checksum until EOF, then answer `count checksum`.
    Sink,
    /// Echo 64-byte messages.
    Echo,
    /// Read 1 KiB every millisecond (a slow reader), for `secs`.
    Slow(u64),
    /// Read 1 MiB, then reset the connection.
    Reset,
}

/// A running checksum over a byte stream, eight bytes at a time (read boundaries do not matter:
/// a partial word waits for the next bytes).
#[derive(Default)]
struct Sum {
    h: u64,
    n: u64,
    carry: Vec<u8>,
}

impl Sum {
    fn add(&mut self, mut bytes: &[u8]) {
        self.n += bytes.len() as u64;
        if !self.carry.is_empty() {
            let take = (8 - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() == 8 {
                let w = u64::from_le_bytes(self.carry[..].try_into().expect("8 bytes"));
                self.word(w);
                self.carry.clear();
            }
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        self.carry.extend_from_slice(words.remainder());
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h.rotate_left(7) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn done(mut self) -> String {
        for b in std::mem::take(&mut self.carry) {
            self.word(u64::from(b));
        }
        format!("{} {}", self.n, self.h)
    }
}

fn server(serve: Serve) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind server");
    let addr = l.local_addr().expect("server addr");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        match serve {
            Serve::Sink => {
                let mut sum = Sum::default();
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    sum.add(&buf[..k]);
                }
                let _ = s.write_all(format!("{}\n", sum.done()).as_bytes());
            }
            Serve::Echo => {
                let mut m = [0u8; 64];
                while s.read_exact(&mut m).is_ok() {
                    if s.write_all(&m).is_err() {
                        break;
                    }
                }
            }
            Serve::Slow(secs) => {
                let end = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < end {
                    let _ = s.read(&mut buf[..1024]);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Serve::Reset => {
                let mut left = 1 << 20;
                while left > 0 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => left -= k.min(left),
                    }
                }
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
        }
    });
    addr
}

/// A relay in front of `upstream`: accepts one client and relays it with `relay`.
fn relay(kind: Relay, upstream: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = l.local_addr().expect("relay addr");
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().expect("accept client");
        let b = TcpStream::connect(upstream).expect("connect upstream");
        match kind {
            Relay::Splice => {
                a.write_all(b"R").expect("ready byte");
                splice(a, b);
            }
            Relay::Sockmap => {
                let mut relay = SockmapRelay::load().expect("sockmap relay loads");
                relay.pair(&a, &b).expect("pair");
                a.write_all(b"R").expect("ready byte");
                sockmap(&a, &b);
                let _ = relay.unpair(&a, &b);
            }
        }
    });
    addr
}

/// A client of the relay at `proxy`, once the relay is ready: bytes that reach a socket before
/// it enters the sockmap stay in its receive queue, where the verdict never sees them (a real
/// proxy cannot hold its clients back like this; see the README).
fn client(proxy: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(proxy).expect("connect relay");
    let mut ready = [0u8; 1];
    c.read_exact(&mut ready).expect("relay ready");
    c
}

fn splice(a: TcpStream, b: TcpStream) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let a = tokio::net::TcpStream::from_std(a).expect("tokio stream");
        let b = tokio::net::TcpStream::from_std(b).expect("tokio stream");
        let _ = drover::proxy::relay::bounded_tcp(&a, &b, Duration::ZERO, None, None).await;
    });
}

/// `POLLRDHUP` (the peer shut down its sending side), which nix does not name.
fn rdhup() -> PollFlags {
    PollFlags::from_bits_retain(libc::POLLRDHUP)
}

/// Pairs the sockets in the kernel, then only propagates the ends (sockmap carries no FIN):
/// a peer that closed its sending side gets its counterpart's write side shut down; an error
/// or hang-up ends both.
fn sockmap(a: &TcpStream, b: &TcpStream) {
    let (mut a_done, mut b_done) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a_done && b_done) && Instant::now() < deadline {
        let wanted = rdhup();
        let mut fds = [
            PollFd::new(a.as_fd(), wanted),
            PollFd::new(b.as_fd(), wanted),
        ];
        let _ = poll(&mut fds, PollTimeout::from(100u16));
        let ev = |i: usize| fds[i].revents().unwrap_or(PollFlags::empty());
        let (ea, eb) = (ev(0), ev(1));
        let bad = PollFlags::POLLERR | PollFlags::POLLHUP;
        if ea.intersects(bad) || eb.intersects(bad) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
            break;
        }
        if !a_done && ea.contains(rdhup()) {
            let _ = b.shutdown(Shutdown::Write);
            a_done = true;
        }
        if !b_done && eb.contains(rdhup()) {
            let _ = a.shutdown(Shutdown::Write);
            b_done = true;
        }
    }
}

/// Sends `bytes` through `kind` and checks the server's count and checksum: (Gbit/s, intact).
fn bulk(kind: Relay, bytes: u64) -> (f64, bool) {
    let proxy = relay(kind, server(Serve::Sink));
    let mut c = client(proxy);
    c.set_read_timeout(Some(Duration::from_secs(30))).ok();
    // Pseudo-random content, a different first word in every chunk.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk: Vec<u8> = (0..256 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (mut sum, mut sent) = (Sum::default(), 0u64);
    let t = Instant::now();
    while sent < bytes {
        chunk[..8].copy_from_slice(&sent.to_le_bytes());
        let n = chunk.len().min((bytes - sent) as usize);
        if c.write_all(&chunk[..n]).is_err() {
            break;
        }
        sum.add(&chunk[..n]);
        sent += n as u64;
    }
    let _ = c.shutdown(Shutdown::Write);
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply);
    let secs = t.elapsed().as_secs_f64();
    let expected = sum.done();
    let intact = reply.trim() == expected;
    if !intact {
        println!("{kind:?}: server saw {:?}, sent {expected:?}", reply.trim());
    }
    (sent as f64 * 8.0 / secs / 1e9, intact)
}

/// 64-byte round trips: (p50 µs, p99 µs).
fn rr(kind: Relay, count: u32) -> (f64, f64) {
    let proxy = relay(kind, server(Serve::Echo));
    let mut c = client(proxy);
    c.set_nodelay(true).ok();
    c.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut m = [7u8; 64];
    let mut lat = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let t = Instant::now();
        if c.write_all(&m).is_err() || c.read_exact(&mut m).is_err() {
            return (f64::NAN, f64::NAN);
        }
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

/// The server resets after 1 MiB while the client keeps sending: ms until the client sees the
/// end (write error or EOF), capped at 5 s.
fn reset_seen_ms(kind: Relay) -> f64 {
    let proxy = relay(kind, server(Serve::Reset));
    let mut c = client(proxy);
    c.set_write_timeout(Some(Duration::from_millis(200))).ok();
    let chunk = vec![1u8; 64 * 1024];
    let t = Instant::now();
    let mut sent = 0usize;
    while t.elapsed() < Duration::from_secs(5) {
        match c.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return t.elapsed().as_secs_f64() * 1e3,
        }
        if sent > (1 << 20) {
            c.set_read_timeout(Some(Duration::from_millis(10))).ok();
            let mut b = [0u8; 1];
            if matches!(c.read(&mut b), Ok(0) | Err(_)) && c.take_error().ok().flatten().is_some() {
                return t.elapsed().as_secs_f64() * 1e3;
            }
        }
    }
    5000.0
}

/// Kernel TCP memory (pages, `/proc/net/sockstat`).
fn tcp_mem_pages() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A client pushes as fast as it can for 3 s to a server reading 1 KiB/ms: the peak growth of
/// kernel TCP memory in KiB (a bounded relay stays near two socket buffers).
fn slow_reader_kib(kind: Relay) -> u64 {
    let base = tcp_mem_pages();
    let proxy = relay(kind, server(Serve::Slow(4)));
    let mut c = client(proxy);
    c.set_write_timeout(Some(Duration::from_millis(50))).ok();
    let chunk = vec![2u8; 64 * 1024];
    let t = Instant::now();
    let mut peak = 0;
    while t.elapsed() < Duration::from_secs(3) {
        let _ = c.write(&chunk);
        peak = peak.max(tcp_mem_pages().saturating_sub(base));
    }
    peak * 4
}

/// One round of one relay: (Gbit/s, intact, RR p50 µs, RR p99 µs, reset seen ms, slow-reader KiB).
type Measured = (f64, bool, f64, f64, f64, u64);

/// Runs both relays in interleaved rounds and prints the comparison and the verdict.
pub fn run(bytes: u64, count: u32, rounds: usize) {
    let kinds = [Relay::Splice, Relay::Sockmap];
    let mut rows: Vec<Vec<Measured>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            let kind = kinds[i];
            let (gbit, intact) = bulk(kind, bytes);
            let (p50, p99) = rr(kind, count);
            let reset = reset_seen_ms(kind);
            let mem = slow_reader_kib(kind);
            rows[i].push((gbit, intact, p50, p99, reset, mem));
        }
    }
    println!(
        "\nsockmap relay experiment: {:.1} GiB checksummed bulk, {count} round trips of 64 B, server reset, slow reader; {rounds} interleaved rounds",
        bytes as f64 / (1u64 << 30) as f64
    );
    println!(
        "{:<8} {:>22} {:>8} {:>10} {:>10} {:>14} {:>18}",
        "relay",
        "Gbit/s [min–max]",
        "intact",
        "rr p50 µs",
        "rr p99 µs",
        "reset seen ms",
        "slow reader KiB"
    );
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let mut summary = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let r = &rows[i];
        let g = med(&mut r.iter().map(|x| x.0).collect());
        let intact = r.iter().filter(|x| x.1).count();
        let p50 = med(&mut r.iter().map(|x| x.2).collect()).0;
        let p99 = med(&mut r.iter().map(|x| x.3).collect()).0;
        let reset = med(&mut r.iter().map(|x| x.4).collect()).0;
        let mem = r.iter().map(|x| x.5).max().unwrap_or(0);
        println!(
            "{:<8} {:>7.2} [{:>5.2}–{:>5.2}] {:>5}/{:<2} {:>10.1} {:>10.1} {:>14.0} {:>18}",
            format!("{kind:?}").to_lowercase(),
            g.0,
            g.1,
            g.2,
            intact,
            r.len(),
            p50,
            p99,
            reset,
            mem
        );
        summary.push((g.0, intact == r.len(), p50, reset, mem));
    }
    let (s, m) = (summary[0], summary[1]);
    let go = m.1 && m.0 > s.0 && m.2 <= s.2 && m.3 < 5000.0 && m.4 <= s.4.max(1) * 2;
    println!(
        "verdict: {} (sockmap bulk {:.2}× splice, rr p50 {:+.1} µs, all transfers intact: {}, reset seen: {}, slow-reader memory {} vs {} KiB)",
        if go { "GO" } else { "NO-GO" },
        m.0 / s.0,
        m.2 - s.2,
        m.1,
        m.3 < 5000.0,
        m.4,
        s.4
    );
    println!(
        "reproduce: cargo xtask bench -- --only sockmap --bytes {bytes} --count {count} --sockmap-rounds {rounds}"
    );
}
