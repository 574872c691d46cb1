//! The data path: outbound listeners inside each enrolled network namespace; connections to
//! HTTP ports go to the L7 path ([`http`]), all others to the L4 relay here, which routes once per
//! connection, applies the cluster's connection slot, keepalive and TLS origination, and copies
//! bytes both ways within the TCP bounds of [`relay`].
//!
//! Invariants: every socket Drover opens towards an endpoint carries `SO_MARK` 0x4452 (so capture
//! never takes it again) and is created in the application's network namespace; a connection
//! whose original destination or route is unknown is closed, never guessed (on HTTP ports the
//! client gets Envoy's status for the failure instead: 404 `NR`, 503 `NC`/`UH`/`UF`); every
//! accepted connection is tracked so that shutdown can drain it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use drover_common::PROXY_PORT;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

mod actions;
mod attempt;
pub mod downstream;
pub mod http;
mod proxy_protocol;
pub mod relay;
mod replay;
mod retry;
mod sni;
mod streams;
pub mod upstream;

pub use http::Body;

use crate::{
    access::ResponseFlag,
    config::policy::ConnectionPool,
    redirect::{self, OriginalDst, netns::NetNs},
    registry::{RegistryHandle, RouteError, Target, route::is_http},
};

/// How long a connection to a port with `tls` routes may take to send its ClientHello before it
/// is routed without a server name (Envoy's listener filter timeout is of this order).
const SNI_WAIT: Duration = Duration::from_secs(5);

/// Why a captured connection was not relayed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("original destination: {0}")]
    Original(#[from] redirect::Error),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error("no byte either way for {0:?} (idleTimeout)")]
    IdleTimeout(Duration),
    #[error("maxConnectionDuration {0:?} reached")]
    MaxDuration(Duration),
    #[error("circuit breaker: {0}")]
    Overflow(crate::breakers::Error),
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

/// Shared state of the outbound proxy.
pub struct Proxy {
    registry: RegistryHandle,
    original: Arc<dyn OriginalDst>,
    timeouts: downstream::Timeouts,
    overload: Arc<downstream::Overload>,
    /// Upstream sockets carry `SO_MARK` (always, when anything captures).
    mark: bool,
}

// === impl Error ===

impl Error {
    /// Envoy's response flag for the access log.
    pub fn response_flag(&self) -> ResponseFlag {
        match self {
            Error::Original(_) => ResponseFlag::NoRoute,
            Error::Route(e) => e.response_flag(),
            Error::Upstream(_) => ResponseFlag::UpstreamConnectionFailure,
            Error::Overflow(crate::breakers::Error::PendingTimeout(_)) | Error::IdleTimeout(_) => {
                ResponseFlag::UpstreamRequestTimeout
            }
            Error::Overflow(_) => ResponseFlag::UpstreamOverflow,
            Error::Io(_) => ResponseFlag::UpstreamConnectionTermination,
            Error::MaxDuration(_) => ResponseFlag::DurationTimeout,
        }
    }
}

// === impl Proxy ===

impl Proxy {
    /// The proxy, with the downstream limits it applies to every captured connection.
    pub fn new(
        registry: RegistryHandle,
        original: Arc<dyn OriginalDst>,
        timeouts: downstream::Timeouts,
        overload: Arc<downstream::Overload>,
    ) -> Self {
        Self {
            registry,
            original,
            timeouts,
            overload,
            mark: true,
        }
    }

    /// The proxy with unmarked upstream sockets: for serving without capture (nothing could
    /// take them again) and without the privilege marking needs.
    pub fn unmarked(self) -> Self {
        Self {
            mark: false,
            ..self
        }
    }

    /// Accepts on `listener` until `shutdown`, relaying each connection on its own task.
    pub async fn serve(
        self: Arc<Self>,
        ns: Arc<NetNs>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let upstreams = Arc::new(match self.mark {
            true => http::Upstreams::new(ns.clone()),
            false => http::Upstreams::unmarked(ns.clone()),
        });
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    // Over the overload limits the connection is closed before a byte is read.
                    let Ok(slot) = self.overload.admit() else {
                        continue;
                    };
                    let proxy = self.clone();
                    let ns = ns.clone();
                    let upstreams = upstreams.clone();
                    tracker.spawn(async move {
                        proxy.handle(ns, upstreams, stream).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(netns = %ns.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, ns: Arc<NetNs>, upstreams: Arc<http::Upstreams>, mut client: TcpStream) {
        let start = Instant::now();
        let src = client.peer_addr().ok().map(|peer| ns.source(peer));
        let orig = match self.original.original_dst(ns.cookie, &client) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(netns = %ns.name, src = ?src, error = %e, "closing connection without original destination");
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let http_port = self
            .registry
            .load()
            .lookup(orig)
            .is_some_and(|(_, p)| is_http(p.protocol.as_deref()));
        if http_port {
            // Each kind of connection keeps only its own state: boxed, neither the HTTP
            // connection nor the relay sizes the task the other one runs in.
            Box::pin(http::serve(
                self.registry.clone(),
                upstreams,
                ns,
                client,
                (src, orig),
                self.timeouts,
            ))
            .await;
            return;
        }
        let mut log = AccessLog::new(crate::telemetry::source(&ns.name));
        let result = Box::pin(self.relay(&ns, (src, orig), &mut client, &mut log)).await;
        let AccessLog {
            host,
            cluster,
            endpoint,
            route,
            edge,
            open,
            source,
        } = log;
        let (bytes, flags, reason) = match &result {
            Ok(bytes) => (Some(*bytes), Vec::new(), None),
            Err(e) => (None, vec![e.response_flag()], Some(e.to_string())),
        };
        let logs = measure_tcp(&source, (edge, open), &host, bytes, &flags);
        let record = crate::access::Record {
            netns: ns.name.clone(),
            src,
            dst: orig,
            start,
            kind: crate::access::Kind::Tcp {
                host,
                cluster,
                route,
                endpoint,
                bytes,
                flags,
                reason,
            },
        };
        if logs {
            record.emit();
        }
        if result.is_err() {
            let _ = client.shutdown().await;
        }
    }

    /// Routes and relays one connection; fills `log` as it learns.
    async fn relay(
        &self,
        ns: &Arc<NetNs>,
        (src, orig): (Option<SocketAddr>, SocketAddr),
        client: &mut TcpStream,
        log: &mut AccessLog,
    ) -> Result<(u64, u64), Error> {
        let registry = self.registry.load();
        if let Some((svc, _)) = registry.lookup(orig) {
            log.host = svc.host.clone();
        }
        // `tls` routes match the ClientHello's server name, read without consuming it.
        let sni = match registry.needs_sni(orig) {
            true => sni::peek(client, SNI_WAIT).await,
            false => None,
        };
        let d = registry.route_tls(orig, src.map(|a| a.ip()), sni.as_deref())?;
        log.cluster = d.cluster.name.clone();
        log.route = d.route.clone().unwrap_or_else(|| "-".into());
        let pool = d
            .cluster
            .policy
            .connection_pool
            .value
            .clone()
            .unwrap_or_else(|| ConnectionPool::istio_defaults().clone());
        let addr = match d.target {
            Target::Endpoint { index, addr } => {
                let svc = &registry.services()[d.cluster.service];
                log.endpoint = endpoint_label(&svc.endpoints[index].name, addr, &d);
                addr
            }
            Target::Passthrough(addr) => {
                log.endpoint = format!("passthrough@{addr}");
                addr
            }
        };
        let svc = &registry.services()[d.cluster.service];
        let endpoint = match d.target {
            Target::Endpoint { index, .. } => {
                Some((index, d.cluster.proves_identity(&svc.endpoints[index])))
            }
            Target::Passthrough(_) => None,
        };
        log.edge = Some(crate::telemetry::outbound(
            &log.source.workload,
            Some(svc.telemetry()),
            endpoint,
        ));
        // Circuit breaker: a connection slot, or the connection is closed at once (UO), as
        // Envoy's TCP proxy does.
        let _slot = d
            .cluster
            .limits
            .admit_connection()
            .map_err(Error::Overflow)?;
        // Held for the whole connection: the balancer counts it in flight until it closes.
        let mut attempt = attempt::Attempt::start(d.cluster, d.pick);
        let dialer = self.dialer(ns, &d, &pool, (src, orig));
        // A TLS cluster's connection is up once the handshake is done (as Envoy counts), a
        // tunnelled one once the tunnel answered.
        let upstream = match (dialer.dial(addr).await, &d.cluster.policy.tunnel.value) {
            (Ok(s), Some(t)) if t.protocol == "CONNECT" => {
                let target = format!("{}:{}", t.target_host, t.target_port);
                upstream::tunnel(s, &target).await.map(Relayed::Tunnel)
            }
            (Ok(s), _) => Ok(Relayed::Direct(s)),
            (Err(e), _) => Err(e),
        };
        match &upstream {
            Ok(_) => attempt.connected(),
            Err(e) => attempt.failed(!matches!(e, upstream::Error::Tls(_))),
        }
        drop(registry);
        let _counted = crate::stats::store().connection(addr);
        let upstream = upstream?;
        // Counted opened now, its bytes as they move (every reporting interval).
        let every = log.source.settings.reporting_interval();
        let conn = log
            .open
            .insert(log.source.tcp_connection(log.edge.clone(), &log.host));
        let mut sink = |up, down| conn.moved(up, down);
        let report = relay::Report {
            every,
            sink: &mut sink,
        };
        upstream.relay(client, &pool, report).await
    }

    /// How to dial the routed endpoint of `d`: the cluster's pool settings, its TLS (or auto
    /// mTLS, or HBONE) and its PROXY protocol header for the connection `(src, orig)`.
    fn dialer(
        &self,
        ns: &Arc<NetNs>,
        d: &crate::registry::Decision<'_>,
        pool: &ConnectionPool,
        (src, orig): (Option<SocketAddr>, SocketAddr),
    ) -> upstream::Dialer {
        upstream::Dialer {
            ns: ns.clone(),
            mark: self.mark,
            connect_timeout: pool.connect_timeout,
            keepalive: pool.tcp_keepalive.clone(),
            proxy_header: (d.cluster.policy.proxy_protocol.value)
                .map(|v| proxy_protocol::header(v, src, orig)),
            hbone: (d.cluster.hbone_for(d.pick)).map(|h| (h.clone(), src)),
            tls: d
                .cluster
                .origination_for(d.pick)
                .cloned()
                .map(|origination| upstream::TlsTarget {
                    origination,
                    host: None,
                    stats: d.cluster.stats.clone(),
                }),
        }
    }
}

/// How the access log names the routed endpoint: `name@addr`, and for an HBONE tunnel the two
/// identities (ours, the one the endpoint must present).
fn endpoint_label(name: &str, addr: SocketAddr, d: &crate::registry::Decision<'_>) -> String {
    match d.cluster.hbone_for(d.pick) {
        Some(h) => {
            let peer = h.peers.get(&addr.ip()).map_or("-", String::as_str);
            format!("{name}@{addr} HBONE {} -> {peer}", h.source.spiffe)
        }
        None => format!("{name}@{addr}"),
    }
}

/// The upstream side of a relayed connection: the endpoint itself, or a tunnel through it.
enum Relayed {
    Direct(upstream::Stream),
    Tunnel(hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>),
}

impl Relayed {
    /// Relays `client` to this upstream within the pool's bounds, reporting the bytes as they
    /// move: (to upstream, back) once both sides closed.
    async fn relay(
        self,
        client: &mut TcpStream,
        pool: &ConnectionPool,
        report: relay::Report<'_>,
    ) -> Result<(u64, u64), Error> {
        let (idle, max, report) = (
            pool.tcp_idle_timeout,
            pool.max_connection_duration,
            Some(report),
        );
        let end = match self {
            Relayed::Direct(upstream::Stream::Plain(s)) => {
                relay::bounded_tcp(client, &s, idle, max, report).await?
            }
            Relayed::Direct(upstream::Stream::Tls(mut s)) => {
                relay::bounded(client, &mut *s, idle, max, report).await?
            }
            Relayed::Direct(upstream::Stream::Hbone(mut s)) => {
                relay::bounded(client, &mut *s, idle, max, report).await?
            }
            Relayed::Tunnel(mut io) => relay::bounded(client, &mut io, idle, max, report).await?,
        };
        match end {
            relay::End::Closed(up, down) => Ok((up, down)),
            relay::End::IdleTimeout(d) => Err(Error::IdleTimeout(d)),
            relay::End::MaxDuration(d) => Err(Error::MaxDuration(d)),
        }
    }
}

/// What the access log line says about a connection.
struct AccessLog {
    host: String,
    cluster: String,
    endpoint: String,
    route: String,
    /// Who talked to whom, for the standard metrics (`None`: not routed).
    edge: Option<crate::telemetry::Edge>,
    /// Its standard metrics since the relay started (`None`: it did not).
    open: Option<crate::telemetry::Connection>,
    /// The captured workload and its Telemetry settings.
    source: crate::telemetry::Source,
}

impl AccessLog {
    fn new(source: crate::telemetry::Source) -> Self {
        Self {
            host: "-".into(),
            cluster: "-".into(),
            endpoint: "-".into(),
            route: "-".into(),
            edge: None,
            open: None,
            source,
        }
    }
}

/// Counts a relayed connection (`bytes`: to upstream, back from it) in the standard TCP
/// metrics of `source` (`edge`: who it reached, `None` when it was not routed); whether the
/// workload's Telemetry lets its access-log line be written.
fn measure_tcp(
    source: &crate::telemetry::Source,
    (edge, open): (
        Option<crate::telemetry::Edge>,
        Option<crate::telemetry::Connection>,
    ),
    host: &str,
    bytes: Option<(u64, u64)>,
    flags: &[crate::access::ResponseFlag],
) -> bool {
    let (sent, received) = bytes.unwrap_or_default();
    let rendered = if flags.is_empty() {
        String::new()
    } else {
        crate::access::render(flags)
    };
    let attributes = crate::telemetry::settings::Attributes {
        host,
        flags: &rendered,
        ..Default::default()
    };
    let overrides = source.settings.overrides(true, &attributes);
    // Istio's received bytes come from the client, its sent bytes go to it (the response).
    match open {
        Some(conn) => conn.close_flagged((sent, received), rendered.clone(), overrides),
        None => crate::telemetry::metrics().tcp(
            &edge.unwrap_or_else(|| crate::telemetry::outbound(&source.workload, None, None)),
            &crate::telemetry::Tcp {
                opened: 1,
                closed: 1,
                sent: received,
                received: sent,
                overrides,
                flags: rendered.clone(),
            },
        ),
    }
    source.settings.logs(&attributes)
}

/// Binds the capture listeners (`127.0.0.1:15001` and, where IPv6 is up, `[::1]:15001`) in `ns`.
pub fn bind_listeners(ns: &NetNs) -> io::Result<Vec<TcpListener>> {
    let addrs = [
        SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, PROXY_PORT)),
    ];
    let mut out = Vec::new();
    for addr in addrs {
        match ns.enter(|| listen(addr))? {
            Ok(l) => out.push(TcpListener::from_std(l)?),
            Err(e) if addr.is_ipv6() => {
                tracing::warn!(netns = %ns.name, error = %e, "no IPv6 listener; IPv6 services in this namespace are refused");
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("bind {addr} in {}: {e}", ns.name),
                ));
            }
        }
    }
    Ok(out)
}

fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    // Lets a new daemon bind while the old one drains.
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}
