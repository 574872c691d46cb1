//! The upstream transport, one for the L4 relay, the HTTP/1.1 pools and the HTTP/2 stream pools:
//! a socket marked with Drover's mark and created in the workload's network namespace,
//! connected within the cluster's `connectTimeout`, with its `tcpKeepalive`, and the TLS
//! handshake (counted per cluster) when the cluster originates TLS. [`Stream`] is the one
//! connection type; [`Connector`] is how hyper's pools dial it.
//!
//! Invariants: every socket made here under capture carries `SO_MARK` 0x4452, so capture never
//! takes it again;
//! a TLS cluster's connection exists only once its handshake succeeded (as Envoy counts it);
//! nothing here depends on the proxy modules above it.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use drover_common::DROVER_MARK;
use hyper::Uri;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};

use crate::{
    config::policy::TcpKeepalive, redirect::netns::NetNs, stats::ClusterStats, tls::Origination,
};

/// Why an upstream connection could not be made (every one is Envoy's `UF`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("upstream socket in namespace {netns}: {source}")]
    Socket { netns: String, source: io::Error },
    #[error(transparent)]
    Tls(crate::tls::HandshakeError),
    #[error("bad upstream {0}")]
    Address(String),
    #[error("tunnel CONNECT {target}: {reason}")]
    Tunnel { target: String, reason: String },
    #[error(transparent)]
    Hbone(Box<crate::hbone::Error>),
}

/// An upstream connection: plaintext, TLS originated by Drover, or an HBONE tunnel.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Hbone(Box<crate::hbone::Tunnel>),
}

/// How to dial the endpoints of one cluster.
#[derive(Clone)]
pub struct Dialer {
    pub ns: Arc<NetNs>,
    /// Mark the socket (always, under capture; in-process use without capture need not, and
    /// needs no privilege then).
    pub mark: bool,
    pub connect_timeout: Duration,
    pub keepalive: Option<TcpKeepalive>,
    pub tls: Option<TlsTarget>,
    /// A PROXY protocol header to send first (before any TLS), as Envoy's upstream proxy
    /// protocol transport socket does.
    pub proxy_header: Option<Vec<u8>>,
    /// Reach the endpoint through an HBONE tunnel instead (and the original client, for the
    /// tunnel's `forwarded` header).
    pub hbone: Option<(Arc<crate::hbone::Target>, Option<SocketAddr>)>,
}

/// What a TLS dial needs: the origination, the request host (auto SNI, HTTP only) and where to
/// count handshakes.
#[derive(Clone)]
pub struct TlsTarget {
    pub origination: Arc<Origination>,
    pub host: Option<String>,
    pub stats: Arc<ClusterStats>,
}

// === impl Dialer ===

impl Dialer {
    /// A connection to `addr`: connected, kept alive as configured, and TLS-wrapped when the
    /// cluster originates TLS (the handshake counted as `ssl.*`).
    pub async fn dial(&self, addr: SocketAddr) -> Result<Stream, Error> {
        if let Some((target, src)) = &self.hbone {
            return match crate::hbone::connect(self, target, addr, *src).await {
                Ok(t) => Ok(Stream::Hbone(Box::new(t))),
                Err(e) => Err(Error::Hbone(Box::new(e))),
            };
        }
        let mut tcp = connect(&self.ns, addr, self.connect_timeout, self.mark).await?;
        if let Some(k) = &self.keepalive {
            set_keepalive(&tcp, k);
        }
        if let Some(h) = &self.proxy_header {
            tokio::io::AsyncWriteExt::write_all(&mut tcp, h)
                .await
                .map_err(|source| Error::Connect { addr, source })?;
        }
        let Some(t) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let host = t.host.as_deref();
        match crate::tls::handshake(&t.origination, tcp, host, addr, self.connect_timeout).await {
            Ok(s) => {
                let kind = s.get_ref().1.handshake_kind();
                t.stats
                    .handshake_done(kind == Some(rustls::HandshakeKind::Resumed));
                Ok(Stream::Tls(Box::new(s)))
            }
            Err(e) => {
                t.stats.handshake(Some(e.kind()));
                Err(Error::Tls(e))
            }
        }
    }
}

/// Opens an HTTP/1.1 `CONNECT target` tunnel over `stream` (DestinationRule `tunnel`, as
/// Envoy's TCP proxy tunnels): the bytes that follow a 2xx answer go to `target`.
pub async fn tunnel(
    stream: Stream,
    target: &str,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, Error> {
    let failed = |reason: String| Error::Tunnel {
        target: target.to_string(),
        reason,
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    let req = hyper::Request::connect(target)
        .header(hyper::header::HOST, target)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(failed(format!("answered {}", resp.status())));
    }
    hyper::upgrade::on(resp)
        .await
        .map(TokioIo::new)
        .map_err(|e| failed(e.to_string()))
}

// === impl Stream ===

impl Stream {
    /// The TCP socket underneath (an HBONE tunnel shares its connection: none of its own).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Hbone(_) => None,
        }
    }

    /// Whether TLS negotiated HTTP/2 by ALPN.
    pub fn negotiated_h2(&self) -> bool {
        matches!(self, Stream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2"))
    }
}

/// Runs `$e` on whichever transport `$s` holds (pinned).
macro_rules! with_stream {
    ($s:expr, |$io:ident| $e:expr) => {
        match $s.get_mut() {
            Stream::Plain(s) => {
                let $io = Pin::new(s);
                $e
            }
            Stream::Tls(s) => {
                let $io = Pin::new(&mut **s);
                $e
            }
            Stream::Hbone(s) => {
                let $io = Pin::new(&mut **s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        with_stream!(self, |s| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        with_stream!(self, |s| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        with_stream!(self, |s| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Hbone(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        with_stream!(self, |s| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        with_stream!(self, |s| s.poll_shutdown(cx))
    }
}

// === Connector ===

/// Dials for hyper's pools: a [`Dialer`] as a `tower` service over `http://ADDR` URIs.
#[derive(Clone)]
pub struct Connector(pub Dialer);

/// A pooled upstream connection, counted in its address's `cx_active` while open, with the
/// number of requests it carried (for `maxRequestsPerConnection`).
pub struct Tracked {
    io: TokioIo<Stream>,
    uses: Uses,
    _counted: crate::stats::Connection,
}

/// Requests sent over one upstream connection, reachable from a request through hyper-util's
/// connection metadata.
#[derive(Clone, Debug, Default)]
pub struct Uses(pub Arc<std::sync::atomic::AtomicU32>);

impl tower_service::Service<Uri> for Connector {
    type Response = Tracked;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.0.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| Error::Address(uri.to_string()))?;
            let stream = dialer.dial(addr).await.inspect_err(|e| {
                if let (Error::Tls(_), Some(t)) = (e, &dialer.tls) {
                    tracing::warn!(cluster = %t.stats.name, error = %e, "upstream TLS failed");
                }
            })?;
            Ok(Tracked {
                io: TokioIo::new(stream),
                uses: Uses::default(),
                _counted: crate::stats::store().connection(addr),
            })
        })
    }
}

impl hyper::rt::Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl hyper_util::client::legacy::connect::Connection for Tracked {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let stream = self.io.inner();
        let connected = stream
            .tcp()
            .map_or_else(hyper_util::client::legacy::connect::Connected::new, |t| {
                t.connected()
            });
        let connected = if stream.negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        };
        connected.extra(self.uses.clone())
    }
}

// === free functions ===

/// `tcpKeepalive` on an upstream socket: keepalive on, and the fields given (whole seconds, as
/// Envoy truncates them; a field that truncates to 0 keeps the OS default).
pub fn set_keepalive(stream: &TcpStream, k: &TcpKeepalive) {
    let secs = |d: Option<Duration>| {
        d.map(|d| Duration::from_secs(d.as_secs()))
            .filter(|d| !d.is_zero())
    };
    let mut ka = socket2::TcpKeepalive::new();
    if let Some(t) = secs(k.time) {
        ka = ka.with_time(t);
    }
    if let Some(i) = secs(k.interval) {
        ka = ka.with_interval(i);
    }
    if let Some(p) = k.probes.filter(|p| *p > 0) {
        ka = ka.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::warn!(error = %e, "cannot set tcpKeepalive on an upstream socket");
    }
}

/// Opens an upstream connection (marked when `mark`) from inside `ns`, within
/// `connect_timeout`.
pub async fn connect(
    ns: &NetNs,
    addr: SocketAddr,
    connect_timeout: Duration,
    mark: bool,
) -> Result<TcpStream, Error> {
    let socket = ns
        .enter(|| socket(addr, mark))
        .and_then(|r| r)
        .map_err(|source| Error::Socket {
            netns: ns.name.clone(),
            source,
        })?;
    match tokio::time::timeout(connect_timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(Error::Connect { addr, source }),
        Err(_) => Err(Error::ConnectTimeout {
            addr,
            timeout: connect_timeout,
        }),
    }
}

fn socket(addr: SocketAddr, mark: bool) -> io::Result<TcpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(
        domain,
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    if mark {
        sock.set_mark(DROVER_MARK)?;
    }
    Ok(TcpSocket::from_std_stream(sock.into()))
}
