//! The L7 path for HTTP ports: hyper serves the captured connection (HTTP/1.1 with keep-alive, or
//! HTTP/2 by prior knowledge), every request is routed on its own (VirtualService match, weighted
//! subset, balancer pick with the request's hash key) and sent over a pooled upstream connection
//! created in the application's namespace and marked — with TLS originated per the cluster's `tls`
//! (one pool per origination, request host and connection settings, so auto SNI names the right
//! host and each cluster's timeouts and stream caps apply). Failed tries are retried per the
//! route's `retries` (Istio's default without), the body replayed from what was kept.
//!
//! Invariants: the proxy adds no header to requests or responses except a generated hash cookie
//! (`Set-Cookie`, as Envoy) and, on locally generated replies, Envoy's response shape; hop-by-hop
//! headers are not forwarded (except `Connection`/`Upgrade` on an HTTP/1.1 upgrade, which is then
//! bridged byte for byte once the endpoint answers 101); every request gets one access-log line
//! (its last try); a failure is a status, never a hang or a panic; a retry is sent only under the
//! cluster's retry cap and never after an overflow.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode, Uri, Version,
    body::{Bytes, Incoming},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    http::request::Parts,
};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{CaptureConnection, capture_connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::time::Instant;

use super::{
    actions::{self, CorsVerdict},
    attempt::Attempt,
    downstream,
    replay::Replay,
    retry,
    streams::{self, StreamPool},
    upstream::{Connector, Dialer, TlsTarget, Uses},
};
use crate::{
    access::{self, ResponseFlag},
    config::policy::{
        Abort, ConnectionPool, Fault, H2Upgrade, HeaderRules, LocalReply, Retries, TcpKeepalive,
    },
    redirect::netns::NetNs,
    registry::{RegistryHandle, RouteError, Target, route},
    tls::Origination,
};

/// Body type of everything the proxy answers with.
pub type Body = BoxBody<Bytes, hyper::Error>;
pub use super::replay::UpstreamBody;

/// Envoy's body for a connection failure before response headers.
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const OVERFLOW: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";
const RESET: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

/// Hop-by-hop headers (RFC 9110 §7.6.1) that a proxy must not forward.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

/// The upstream pools of one namespace, one per (TLS origination, request host, connection
/// settings): clusters whose settings are equal share connections.
pub struct Upstreams {
    ns: Arc<NetNs>,
    mark: bool,
    pools: std::sync::Mutex<HashMap<PoolKey, KeptPool>>,
}

/// (origination identity or 0, request host used for SNI/verification, settings).
type PoolKey = (usize, Option<String>, Settings);
/// A pool and the origination (or HBONE target) it keeps alive (so that its identity is not
/// reused).
type KeptPool = (Option<Arc<dyn std::any::Any + Send + Sync>>, Pool);

/// HTTP/1.1 connections in hyper-util's pool, or HTTP/2 connections in a stream-capped pool.
#[derive(Clone)]
enum Pool {
    /// With `maxRequestsPerConnection`.
    H1(Arc<Client<Connector, UpstreamBody>>, Option<u32>),
    H2(Arc<StreamPool>),
}

/// How a cluster's upstream HTTP connections are opened and kept.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Settings {
    h2: bool,
    connect_timeout: Duration,
    keepalive: Option<TcpKeepalive>,
    /// HTTP/2 only.
    streams: streams::Policy,
}

/// Why an upstream try failed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error(transparent)]
    H1(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    H2(#[from] streams::Error),
    #[error("no response within perTryTimeout {0:?}")]
    Timeout(Duration),
}

/// Why a request got no upstream response.
#[derive(Debug)]
enum TryError {
    Send(SendError),
    /// The route's `timeout` expired.
    RouteTimeout,
}

// === impl Upstreams ===

impl Upstreams {
    pub fn new(ns: Arc<NetNs>) -> Self {
        Self {
            ns,
            mark: true,
            pools: Default::default(),
        }
    }

    /// Pools whose sockets are not marked: for running the HTTP path in-process without capture
    /// (the unprivileged tests, fuzzing), where nothing could take them again and no privilege
    /// is at hand.
    pub fn unmarked(ns: Arc<NetNs>) -> Self {
        Self {
            mark: false,
            ..Self::new(ns)
        }
    }

    /// The pool for a request: per TLS origination and host (auto SNI) and settings.
    fn pick(
        &self,
        tls: Option<(&Arc<Origination>, &Arc<crate::stats::ClusterStats>)>,
        host: Option<&str>,
        settings: Settings,
    ) -> Pool {
        self.pick_via(tls, None, host, settings)
    }

    /// [`Upstreams::pick`], or the pool through HBONE tunnels to `hbone`'s endpoints.
    fn pick_via(
        &self,
        tls: Option<(&Arc<Origination>, &Arc<crate::stats::ClusterStats>)>,
        hbone: Option<&Arc<crate::hbone::Target>>,
        host: Option<&str>,
        settings: Settings,
    ) -> Pool {
        // Auto SNI only uses the host when no `sni` is configured; plaintext ignores it.
        let host = tls
            .filter(|(o, _)| o.sni.is_none())
            .and(host)
            .map(str::to_string);
        let kept: Option<Arc<dyn std::any::Any + Send + Sync>> = match (tls, hbone) {
            (Some((o, _)), _) => Some(o.clone()),
            (None, Some(h)) => Some(h.clone()),
            (None, None) => None,
        };
        let key = (
            kept.as_ref()
                .map_or(0, |k| Arc::as_ptr(k) as *const () as usize),
            host,
            settings,
        );
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = pools.get(&key) {
            return p.clone();
        }
        let (_, host, settings) = &key;
        // Forget pools of originations no snapshot uses any more (only this map holds them).
        pools.retain(|_, (o, _)| o.as_ref().is_none_or(|o| Arc::strong_count(o) > 1));
        let connector = Connector(Dialer {
            ns: self.ns.clone(),
            mark: self.mark,
            connect_timeout: settings.connect_timeout,
            keepalive: settings.keepalive.clone(),
            proxy_header: None,
            hbone: hbone.map(|h| (h.clone(), None)),
            tls: tls.map(|(origination, stats)| TlsTarget {
                origination: origination.clone(),
                host: host.clone(),
                stats: stats.clone(),
            }),
        });
        let pool = if settings.h2 {
            Pool::H2(Arc::new(StreamPool::new(connector, settings.streams)))
        } else {
            // The `Host` header is the client's, never rewritten; idle connections are closed
            // by the pool's timer.
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(settings.streams.idle_timeout)
                .pool_timer(TokioTimer::new())
                .set_host(false);
            Pool::H1(Arc::new(b.build(connector)), settings.streams.max_requests)
        };
        pools.insert(key, (kept, pool.clone()));
        pool
    }
}

// === impl Settings ===

impl Settings {
    /// The cluster's connection settings (Istio's defaults without a `connectionPool`).
    /// `maxConcurrentStreams` and `http2KeepAlive` apply only to an explicitly HTTP/2 upstream,
    /// not to one that follows the client's protocol, as Istio programs them.
    fn of(pool: &ConnectionPool, h2: bool) -> Self {
        let explicit_h2 = h2 && !pool.use_client_protocol;
        Self {
            h2,
            connect_timeout: pool.connect_timeout,
            keepalive: pool.tcp_keepalive.clone(),
            streams: streams::Policy {
                max_streams: if explicit_h2 {
                    pool.max_concurrent_streams
                } else {
                    u32::MAX
                },
                max_requests: pool.max_requests_per_connection,
                idle_timeout: Some(pool.http_idle_timeout).filter(|d| !d.is_zero()),
                keepalive: pool.http2_keepalive.filter(|_| explicit_h2),
            },
        }
    }
}

// === impl Pool ===

impl Pool {
    /// Sends one request to `addr`; the returned guard holds its HTTP/2 stream until dropped.
    async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<streams::Stream>), SendError> {
        match self {
            Pool::H2(p) => {
                let (resp, stream) = p.send(addr, req).await?;
                Ok((resp, Some(stream)))
            }
            Pool::H1(c, max) => {
                let captured = max.map(|_| capture_connection(&mut req));
                let resp = c.request(req).await?;
                if let (Some(max), Some(captured)) = (max, &captured) {
                    retire_after(captured, *max);
                }
                Ok((resp, None))
            }
        }
    }
}

// === impl SendError ===

impl SendError {
    /// How the try ended, for retries and counters.
    fn outcome(&self) -> retry::Outcome {
        match self {
            SendError::H1(e) if e.is_connect() => retry::Outcome::ConnectFailure,
            SendError::H2(streams::Error::Connect(_)) => retry::Outcome::ConnectFailure,
            SendError::H2(streams::Error::Http(e)) if refused_stream(e) => {
                retry::Outcome::RefusedStream
            }
            SendError::Timeout(_) => retry::Outcome::Timeout,
            SendError::H1(_) | SendError::H2(_) => retry::Outcome::Reset,
        }
    }
}

/// An HTTP/2 stream reset with REFUSED_STREAM (safe to retry: the endpoint did not process it).
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

// === impl TryError ===

impl TryError {
    /// Envoy's local reply: status, response flag, body.
    fn reply(&self) -> (StatusCode, ResponseFlag, &'static str) {
        match self {
            TryError::Send(SendError::Timeout(_)) | TryError::RouteTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                ResponseFlag::UpstreamRequestTimeout,
                "upstream request timeout",
            ),
            TryError::Send(e) if e.outcome() == retry::Outcome::ConnectFailure => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionFailure,
                CONNECT_FAILURE,
            ),
            TryError::Send(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlag::UpstreamConnectionTermination,
                RESET,
            ),
        }
    }
}

/// Serves one captured HTTP connection (from `src`, dialled to `orig`) until the client closes
/// it, or until its request headers or its idleness outlast `timeouts` (then it is closed and
/// counted, as Envoy does). Any byte stream will do as the client (the fuzz target feeds one).
pub async fn serve<T>(
    registry: RegistryHandle,
    upstreams: Arc<Upstreams>,
    ns: Arc<NetNs>,
    client: T,
    (src, orig): (Option<SocketAddr>, SocketAddr),
    timeouts: downstream::Timeouts,
) where
    T: Peek + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = format!("{}{}", src.map(|a| a.to_string()).unwrap_or_default(), orig);
    let state = downstream::State::new(timeouts);
    let watch = state.clone();
    let service = hyper::service::service_fn(move |req| {
        let registry = registry.clone();
        let upstreams = upstreams.clone();
        let ns = ns.clone();
        let connection = connection.clone();
        let active = state.request();
        // Boxed: the connection keeps its service future inline for its whole life, so an idle
        // keep-alive connection would otherwise carry the (large) request state machine.
        Box::pin(async move {
            let peers = (src, orig);
            Ok::<_, Infallible>(
                handle(&registry, &upstreams, &ns, peers, &connection, req, active).await,
            )
        })
    });
    let io = downstream::Watched::new(client, watch.clone());
    let stats = &crate::stats::store().downstream;
    tokio::select! {
        r = serve_sniffed(io, service) => if let Err(e) = r {
            tracing::debug!(error = %e, "http connection ended with an error");
        },
        why = watch.expired() => {
            let counter = match why {
                downstream::Expired::RequestHeaders => &stats.rq_header_timeout,
                downstream::Expired::Idle => &stats.cx_idle_timeout,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(src = ?src, dst = %orig, reason = ?why, "closing downstream connection");
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client stream whose first bytes can be looked at without consuming them.
pub trait Peek {
    /// Copies the bytes that have arrived into `buf` without consuming them (waiting for the
    /// first one); `Ok(0)` at end of stream, or always for a stream that cannot peek.
    fn peek(&self, buf: &mut [u8]) -> impl Future<Output = std::io::Result<usize>> + Send;
}

impl Peek for tokio::net::TcpStream {
    fn peek(&self, buf: &mut [u8]) -> impl Future<Output = std::io::Result<usize>> + Send {
        tokio::net::TcpStream::peek(self, buf)
    }
}

/// In-memory streams (the fuzz target's) cannot peek: their protocol is read by hyper's
/// detecting server.
impl Peek for tokio::io::DuplexStream {
    fn peek(&self, _: &mut [u8]) -> impl Future<Output = std::io::Result<usize>> + Send {
        std::future::ready(Ok(0))
    }
}

/// The service a downstream connection's server calls for each request.
trait ConnService:
    hyper::service::Service<
        Request<Incoming>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + Unpin + 'static,
    > + Send
    + Unpin
    + 'static
{
}

impl<S> ConnService for S where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + Unpin + 'static,
        > + Send
        + Unpin
        + 'static
{
}

/// Serves `io` with the protocol its first bytes name, peeked from the socket: HTTP/1.1 or
/// HTTP/2 by prior knowledge go straight to hyper's server for that version. Only a connection
/// whose first bytes are a prefix of the HTTP/2 preface (or that cannot be peeked) goes through
/// the detecting server, which reads the preface into a rewind buffer: hyper's HTTP/1 read
/// buffer then grows from 8 to 16 KiB on the first request and keeps that for the
/// connection's life, which doubled the memory of an idle keep-alive connection.
async fn serve_sniffed<T, S>(
    io: downstream::Watched<T>,
    service: S,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    T: Peek + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    let mut first = [0u8; H2_PREFACE.len()];
    let seen = io.inner().peek(&mut first).await.unwrap_or(0);
    let first = &first[..seen];
    if seen > 0 && !H2_PREFACE.starts_with(first) {
        Ok(serve_h1(io, service).await?)
    } else if first == H2_PREFACE {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        Ok(Box::pin(conn.serve_connection(TokioIo::new(io), service)).await?)
    } else {
        let conn = auto::Builder::new(TokioExecutor::new());
        Box::pin(conn.serve_connection_with_upgrades(TokioIo::new(io), service)).await
    }
}

/// Serves an HTTP/1.1 connection, parking it whenever it has been idle for
/// [`downstream::PARK_AFTER`]: hyper's server closes without shutting the socket down and is
/// dropped with its buffers (8 KiB each way); the socket alone waits for the next request, which
/// a new server reads, after any bytes the old one had read ahead.
async fn serve_h1<T, S>(mut io: downstream::Watched<T>, mut service: S) -> hyper::Result<()>
where
    T: Peek + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: ConnService,
{
    loop {
        let state = io.state().clone();
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
        // Boxed: a parked connection keeps none of the server's state.
        let mut conn = Box::pin(conn.with_upgrades());
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            () = state.parkable(downstream::PARK_AFTER) => {}
        }
        // Idle and nothing held: the server closes at once, leaving the socket open.
        state.set_parking(true);
        conn.as_mut().graceful_shutdown();
        let done = conn.as_mut().await;
        state.set_parking(false);
        done?;
        // `None`: upgraded meanwhile, the bridge owns the socket.
        let Some(parts) = std::pin::Pin::into_inner(conn).into_parts() else {
            return Ok(());
        };
        (crate::stats::store().downstream.cx_parked).fetch_add(1, Ordering::Relaxed);
        (io, service) = (parts.io.into_inner(), parts.service);
        if !parts.read_buf.is_empty() {
            io.unread(parts.read_buf);
        } else if io.inner().peek(&mut [0u8]).await.unwrap_or(0) == 0 {
            // The client closed (or the socket failed) while parked.
            return Ok(());
        }
    }
}

/// Routes and forwards one request, top to bottom: route → admit → tries → respond. Always
/// produces a response. `active` counts the request as in flight (for the downstream timeouts)
/// until a proxied response's body ends; a local reply is written at once.
async fn handle(
    registry: &RegistryHandle,
    upstreams: &Upstreams,
    ns: &NetNs,
    peers: (Option<SocketAddr>, SocketAddr),
    connection: &str,
    mut req: Request<Incoming>,
    active: downstream::Active,
) -> Response<Body> {
    let upgrade = (req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE))
    .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let exchange = Exchange::new(ns, peers, &parts);
    let snapshot = registry.load();
    let mut routed = match exchange.route(&snapshot, &parts, connection) {
        Ok(r) => r,
        Err(e) => return exchange.unrouted(&e),
    };
    let mut injected = Vec::new();
    if let Some(route) = routed.decision.http_route {
        // Envoy's filter order: CORS, then fault, then the router.
        if let Some(c) = &route.cors {
            match actions::cors(c, &parts.method, &parts.headers) {
                CorsVerdict::Preflight(h) => return exchange.preflight(&routed, h),
                CorsVerdict::Ignore => return exchange.preflight(&routed, HeaderMap::new()),
                CorsVerdict::Forward(h) => routed.cors = h,
            }
        }
        if let Some(reply) = &route.local {
            return exchange.answer(&routed, reply, &parts);
        }
        if let Some(fault) = &route.fault
            && let Some(reply) = exchange.inject(&routed, fault, &mut injected).await
        {
            return reply;
        }
    }
    let Some(forward) = Forward::new(&exchange, &routed, parts, upgrade.is_some(), upstreams)
    else {
        return local(StatusCode::BAD_REQUEST, "", &[]);
    };
    let admission = match exchange.admit(&routed, &forward).await {
        Ok(a) => a,
        Err(e) => return exchange.refused(&routed, &e),
    };
    let replay = Replay::new(body);
    let (result, endpoint, mut flags) = routed.tries(&forward, &replay).await;
    routed.mirror(exchange.peers.1, &forward, &replay, upstreams);
    flags.splice(0..0, injected);
    exchange.respond(
        &routed,
        (result, endpoint, flags),
        upgrade,
        admission,
        active,
    )
}

/// One request as it arrived: what routing, the access log and the reply need of it.
struct Exchange {
    start: Instant,
    netns: String,
    peers: (Option<SocketAddr>, SocketAddr),
    method: hyper::Method,
    path: String,
    /// The URI's authority, else the `Host` header.
    authority: String,
    /// The request id and trace context this hop forwards.
    trace: crate::trace::Context,
    /// The workload that sent it, as the standard metrics name it, and its Telemetry settings.
    source: crate::telemetry::Source,
    /// The request's headers, kept only when the workload's Telemetry has expressions that
    /// may read them (metric overrides, an access-log filter).
    headers: Option<HeaderMap>,
    /// Its span's custom tags (`tracing[].customTags`), when it is sampled and exported.
    tags: Vec<opentelemetry::KeyValue>,
    /// What Istio's access-log format adds (`--access-log-format istio` only).
    envoy: Option<Box<access::Envoy>>,
    /// `application/grpc*` (reported as `request_protocol="grpc"`).
    grpc: bool,
    /// Its headers' size plus its declared body length (`istio_request_bytes`).
    request_bytes: u64,
}

/// A routed request: the routing decision (in the snapshot it was made by), the names the
/// access log gives it, and the first endpoint.
struct Routed<'s> {
    snapshot: &'s crate::registry::Registry,
    decision: route::Decision<'s>,
    route_name: String,
    first: (SocketAddr, Named<'s>),
    /// CORS headers every response to this request carries (an allowed origin's).
    cors: HeaderMap,
}

/// The upstream request every try sends (to its own endpoint), and the pool it goes through.
struct Forward {
    pool: Pool,
    h2: bool,
    connect_timeout: Duration,
    method: hyper::Method,
    version: Version,
    headers: HeaderMap,
    path_and_query: String,
    first_uri: Uri,
    /// The authority sent upstream (after `rewrite.authority`).
    authority: String,
    /// Auto mTLS: the pool for members with a mesh identity (ISTIO_MUTUAL).
    auto_pool: Option<Pool>,
    /// The pool for members reached over HBONE.
    hbone_pool: Option<Pool>,
}

// === impl Exchange ===

impl Exchange {
    fn new(ns: &NetNs, peers: (Option<SocketAddr>, SocketAddr), parts: &Parts) -> Self {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let source = crate::telemetry::source(&ns.name);
        let settings = &source.settings;
        let trace = crate::trace::Context::from_request(
            &parts.headers,
            settings.sampling.unwrap_or_else(crate::trace::sampling),
            crate::trace::Dice::roll(),
        );
        let exported = trace.sampled && !settings.disable_spans && crate::trace::export::enabled();
        let tags = match exported {
            true => custom_tags(&settings.custom_tags, &parts.headers),
            false => Vec::new(),
        };
        let reads = !settings.overrides.is_empty() || settings.access_log_filter.is_some();
        Self {
            start: Instant::now(),
            netns: ns.name.clone(),
            peers,
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            authority,
            trace,
            headers: reads.then(|| parts.headers.clone()),
            tags,
            envoy: (access::format() == access::Format::Istio).then(|| {
                let text = |name: &str| {
                    let v = parts.headers.get(name)?.to_str().ok()?;
                    Some(v.to_string())
                };
                Box::new(access::Envoy {
                    protocol: match parts.version {
                        Version::HTTP_2 => "HTTP/2",
                        Version::HTTP_10 => "HTTP/1.0",
                        _ => "HTTP/1.1",
                    },
                    user_agent: text("user-agent"),
                    forwarded_for: text("x-forwarded-for"),
                    body_received: (parts.headers.get(header::CONTENT_LENGTH))
                        .and_then(|v| v.to_str().ok()?.parse().ok())
                        .unwrap_or(0),
                    ..Default::default()
                })
            }),
            source,
            grpc: crate::telemetry::is_grpc(&parts.headers),
            request_bytes: crate::telemetry::request_bytes(&parts.headers),
        }
    }

    /// Counts a request answered here in the standard metrics and writes its access-log line,
    /// when the access log is on.
    fn log(&self, status: u16, names: (&str, &str), to: To<'_>, flags: Vec<ResponseFlag>) {
        let grpc_status =
            (self.grpc && status != 200).then(|| crate::telemetry::grpc_status_for(status));
        let (edge, measured) = (self.edge(to), self.measured(status, &flags, 0, grpc_status));
        if let Some(span) = self.span(names.0, to, &edge) {
            span.finish(&measured);
        }
        crate::telemetry::metrics().http(&edge, &measured);
        if access::enabled() && self.logs(status, &measured.flags) {
            self.record(status, names, to, flags).emit();
        }
    }

    /// Who talked to whom, as the standard metrics name them (`reporter="source"`).
    fn edge(&self, to: To<'_>) -> crate::telemetry::Edge {
        let (service, endpoint) = match to {
            To::Nowhere => (None, None),
            To::Service(d) => (Some(d), None),
            To::Endpoint(n) => (Some(n.service), n.index.map(|i| (i, n.mtls))),
        };
        crate::telemetry::outbound(&self.source.workload, service, endpoint)
    }

    /// What the workload's Telemetry expressions see of this request with `status`.
    fn attributes<'a>(
        &'a self,
        status: u16,
        flags: &'a str,
    ) -> crate::telemetry::settings::Attributes<'a> {
        crate::telemetry::settings::Attributes {
            method: self.method.as_str(),
            host: &self.authority,
            path: &self.path,
            headers: self.headers.as_ref(),
            code: status,
            flags,
            mtls: false,
        }
    }

    /// Whether the workload's Telemetry lets this request's access-log line be written.
    fn logs(&self, status: u16, flags: &str) -> bool {
        self.source.settings.logs(&self.attributes(status, flags))
    }

    /// The span of this request, when it is sampled and spans are exported: all it says but
    /// the outcome.
    fn span(&self, cluster: &str, to: To<'_>, edge: &crate::telemetry::Edge) -> Option<Box<Span>> {
        if !self.trace.sampled
            || self.source.settings.disable_spans
            || !crate::trace::export::enabled()
        {
            return None;
        }
        use opentelemetry::KeyValue;
        let port = self.peers.1.port();
        let name = match to {
            To::Nowhere => format!("{}/*", self.authority),
            To::Service(d) => format!("{}:{port}/*", d.service.host),
            To::Endpoint(n) => format!("{}:{port}/*", n.service.service.host),
        };
        let (me, peer) = (&edge.source, &edge.destination);
        let mut attributes = vec![
            KeyValue::new("component", "proxy"),
            KeyValue::new("http.method", self.method.to_string()),
            KeyValue::new(
                "http.url",
                format!("http://{}{}", self.authority, self.path),
            ),
            KeyValue::new("guid:x-request-id", self.trace.request_id.clone()),
            KeyValue::new("upstream_cluster", cluster.to_string()),
            KeyValue::new("upstream_cluster.name", cluster.to_string()),
            KeyValue::new("downstream_cluster", "-"),
            KeyValue::new("istio.canonical_service", me.canonical_service.clone()),
            KeyValue::new("istio.canonical_revision", me.canonical_revision.clone()),
            KeyValue::new("istio.namespace", me.namespace.clone()),
            KeyValue::new("peer.workload", peer.workload.clone()),
            KeyValue::new("peer.namespace", peer.namespace.clone()),
        ];
        if let Some(src) = self.peers.0 {
            attributes.push(KeyValue::new("peer.address", src.ip().to_string()));
        }
        if let To::Endpoint(n) = to {
            attributes.push(KeyValue::new("upstream_address", n.addr.to_string()));
        }
        attributes.extend(self.tags.iter().cloned());
        Some(Box::new(Span {
            trace: self.trace.clone(),
            name,
            service: format!("{}.{}", me.canonical_service, me.namespace),
            attributes,
        }))
    }

    /// This request's outcome for the standard metrics.
    fn measured(
        &self,
        status: u16,
        flags: &[ResponseFlag],
        response_bytes: u64,
        grpc_status: Option<u32>,
    ) -> crate::telemetry::Request {
        let flags = if flags.is_empty() {
            String::new()
        } else {
            access::render(flags)
        };
        let overrides = (self.source.settings).overrides(true, &self.attributes(status, &flags));
        crate::telemetry::Request {
            protocol: if self.grpc {
                crate::telemetry::Protocol::Grpc
            } else {
                crate::telemetry::Protocol::Http
            },
            code: status,
            grpc_status,
            flags,
            duration: self.start.elapsed(),
            request_bytes: self.request_bytes,
            response_bytes,
            overrides,
        }
    }

    /// The access-log record of this request.
    fn record(
        &self,
        status: u16,
        (cluster, route): (&str, &str),
        endpoint: To<'_>,
        flags: Vec<ResponseFlag>,
    ) -> access::Record {
        access::Record {
            netns: self.netns.clone(),
            src: self.peers.0,
            dst: self.peers.1,
            start: self.start,
            kind: access::Kind::Http {
                method: self.method.clone(),
                path: self.path.clone(),
                authority: self.authority.clone(),
                status,
                cluster: cluster.to_string(),
                route: route.to_string(),
                endpoint: endpoint.to_string(),
                flags,
                request_id: self.trace.request_id.clone(),
                trace_id: self.trace.trace_id.clone(),
                envoy: self.envoy.clone(),
            },
        }
    }

    /// Route: the VirtualService route, subset and endpoint.
    fn route<'s>(
        &self,
        snapshot: &'s crate::registry::Registry,
        parts: &Parts,
        connection: &str,
    ) -> Result<Routed<'s>, RouteError> {
        let (src, orig) = self.peers;
        let request = route::Request {
            method: self.method.as_str(),
            scheme: parts.uri.scheme_str().unwrap_or("http"),
            authority: &self.authority,
            path: &self.path,
            query: parts.uri.query(),
            headers: &parts.headers,
            connection,
        };
        let decision = snapshot.route_request(orig, src.map(|s| s.ip()), &request)?;
        Ok(Routed {
            snapshot,
            cors: HeaderMap::new(),
            route_name: decision.route.clone().unwrap_or_else(|| "-".into()),
            first: describe(snapshot, decision.cluster, decision.target),
            decision,
        })
    }

    /// A CORS preflight answered here: 200, no body, `headers` (none for an origin that is not
    /// allowed under `unmatchedPreflights: IGNORE`), logged.
    fn preflight(&self, routed: &Routed<'_>, headers: HeaderMap) -> Response<Body> {
        let mut resp = Response::new(Body::default());
        *resp.headers_mut() = headers;
        self.log(200, ("-", &routed.route_name), routed.service(), Vec::new());
        resp
    }

    /// A route's `redirect` or `directResponse`, answered here (with the route's response
    /// headers), logged.
    fn answer(&self, routed: &Routed<'_>, reply: &LocalReply, parts: &Parts) -> Response<Body> {
        let mut resp = match reply {
            LocalReply::Redirect(r) => {
                let scheme = parts.uri.scheme_str().unwrap_or("http");
                let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                let matched = routed.decision.http_match.and_then(|m| m.uri.as_ref());
                let location = actions::location(r, matched, scheme, &self.authority, path);
                let mut resp = Response::new(Body::default());
                *resp.status_mut() = r.code;
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                resp
            }
            LocalReply::Direct { status, body } => {
                let mut resp = Response::new(
                    Full::new(Bytes::from(body.clone()))
                        .map_err(|never| match never {})
                        .boxed(),
                );
                *resp.status_mut() = *status;
                if !body.is_empty() {
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                }
                resp
            }
        };
        if let Some(route) = routed.decision.http_route {
            actions::apply(&route.headers.response, resp.headers_mut());
        }
        routed.add_cors(resp.headers_mut());
        self.log(
            resp.status().as_u16(),
            ("-", &routed.route_name),
            routed.service(),
            Vec::new(),
        );
        resp
    }

    /// A route's `fault`: waits out an injected delay (flag `DI`), then answers an injected
    /// abort (flag `FI`, as Envoy's fault filter does, before any circuit breaker or endpoint).
    async fn inject(
        &self,
        routed: &Routed<'_>,
        fault: &Fault,
        flags: &mut Vec<ResponseFlag>,
    ) -> Option<Response<Body>> {
        if let Some((delay, percent)) = fault.delay
            && actions::applies(percent, fastrand::f64())
        {
            tokio::time::sleep(delay).await;
            flags.push(ResponseFlag::DelayInjected);
        }
        let (abort, percent) = fault.abort?;
        if !actions::applies(percent, fastrand::f64()) {
            return None;
        }
        flags.push(ResponseFlag::FaultInjected);
        let mut resp = match abort {
            Abort::Http(status) => local(status, "fault filter abort", flags),
            Abort::Grpc(code) => {
                let mut resp = local(StatusCode::OK, "", flags);
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.insert("grpc-status", HeaderValue::from(code));
                h.insert(
                    "grpc-message",
                    HeaderValue::from_static("fault filter abort"),
                );
                resp
            }
        };
        if let Some(route) = routed.decision.http_route {
            actions::apply(&route.headers.response, resp.headers_mut());
        }
        routed.add_cors(resp.headers_mut());
        self.log(
            resp.status().as_u16(),
            routed.names(),
            routed.service(),
            flags.clone(),
        );
        Some(resp)
    }

    /// Envoy's reply when routing failed, logged.
    fn unrouted(&self, e: &RouteError) -> Response<Body> {
        let reply = route_failure(e);
        let status = reply.status().as_u16();
        self.log(status, ("-", "-"), To::Nowhere, vec![e.response_flag()]);
        reply
    }

    /// Admit: the cluster's circuit breakers.
    async fn admit(
        &self,
        routed: &Routed<'_>,
        forward: &Forward,
    ) -> Result<crate::breakers::Admission, crate::breakers::Error> {
        let c = routed.decision.cluster;
        // Counted as pending on its endpoint while it waits for a slot.
        let _pending = endpoint_of(c, routed.decision.pick).map(|e| e.pending());
        c.limits.admit(!forward.h2, forward.connect_timeout).await
    }

    /// A breaker's refusal, answered at once as Envoy does (503 `UO`, not retried, not reported
    /// to outlier detection), logged.
    fn refused(&self, routed: &Routed<'_>, e: &crate::breakers::Error) -> Response<Body> {
        tracing::debug!(reason = %e, cluster = %routed.decision.cluster.name, "circuit breaker");
        let (flag, reply) = breaker_reply(e);
        self.log(
            503,
            routed.names(),
            To::Endpoint(routed.first.1),
            vec![flag],
        );
        reply
    }

    /// Respond: the endpoint's response (its body logged when it ends, holding the request's
    /// breaker slot and stream until then), or Envoy's local reply for why there is none.
    fn respond(
        &self,
        routed: &Routed<'_>,
        (result, endpoint, mut flags): Tried<'_>,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
        admission: crate::breakers::Admission,
        active: downstream::Active,
    ) -> Response<Body> {
        let (mut resp, stream) = match result {
            Ok(r) => r,
            Err(e) => {
                let (status, flag, body) = e.reply();
                flags.insert(0, flag);
                self.log(
                    status.as_u16(),
                    routed.names(),
                    To::Endpoint(endpoint),
                    flags.clone(),
                );
                return local(status, body, &flags);
            }
        };
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching && let Some(downstream) = upgrade {
            bridge(downstream, hyper::upgrade::on(&mut resp));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, switching);
        for rules in routed.header_rules() {
            actions::apply(&rules.response, &mut parts.headers);
        }
        routed.add_cors(&mut parts.headers);
        if let Some(c) = &routed.decision.set_cookie
            && let Ok(v) = HeaderValue::from_str(c)
        {
            parts.headers.append(header::SET_COOKIE, v);
        }
        let status = parts.status.as_u16();
        let to = To::Endpoint(endpoint);
        let grpc_status =
            (parts.headers.get("grpc-status")).and_then(|v| v.to_str().ok()?.parse().ok());
        let edge = self.edge(to);
        let measure = Measure {
            span: self.span(routed.names().0, to, &edge),
            edge,
            request: self.measured(
                status,
                &flags,
                crate::telemetry::header_bytes(&parts.headers),
                grpc_status,
            ),
            start: self.start,
        };
        let logs = access::enabled() && self.logs(status, &measure.request.flags);
        let line = logs.then(|| {
            let mut line = self.record(status, routed.names(), to, flags);
            if let access::Kind::Http { envoy: Some(e), .. } = &mut line.kind {
                e.via_upstream = true;
            }
            line
        });
        let body = body.map_frame(move |f| {
            let _held = (&admission, &stream);
            f
        });
        let logged = Logged {
            body,
            line,
            measure,
            cut: None,
            ended: false,
            _active: active,
        };
        Response::from_parts(parts, logged.boxed())
    }
}

// === impl Routed ===

impl<'s> Routed<'s> {
    /// Puts the CORS filter's headers on a response (replacing any the endpoint sent).
    fn add_cors(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.cors {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// The route's `mirror`/`mirrors`: for each that its percentage picks, a copy of the request
    /// (same method, path, headers and body, the authority suffixed `-shadow` as Envoy does) to
    /// an endpoint of the mirror's cluster, fire-and-forget: the reply is read and dropped. Sent
    /// once the request's tries are over, so that it only replays the body they kept (a body
    /// over the retry buffer is not mirrored).
    fn mirror(
        &self,
        orig: SocketAddr,
        forward: &Forward,
        body: &Replay<Incoming>,
        upstreams: &Upstreams,
    ) {
        let Some(route) = self.decision.http_route else {
            return;
        };
        if route.mirrors.is_empty() || !body.replayable() {
            return;
        }
        for (dest, percent) in &route.mirrors {
            if !actions::applies(*percent, fastrand::f64()) {
                continue;
            }
            // A passthrough mirror would dial the original destination again: not mirrored.
            let Ok((cluster, Target::Endpoint { addr, .. }, pick)) =
                self.snapshot.mirror_target(dest, orig)
            else {
                continue;
            };
            let settings = cluster
                .policy
                .connection_pool
                .value
                .as_ref()
                .unwrap_or(ConnectionPool::istio_defaults());
            let shadow = actions::shadow_authority(&forward.authority);
            let pool = upstreams.pick(
                cluster.tls.as_ref().map(|o| (o, &cluster.stats)),
                Some(split_host(&shadow)).filter(|h| !h.is_empty()),
                Settings::of(settings, forward.h2),
            );
            let req = forward.shadow(addr, &shadow, body.attempt());
            // Counted in the mirror cluster's statistics, as Envoy counts shadow requests.
            let mut attempt = Attempt::start(cluster, pick);
            tokio::spawn(async move {
                match pool.send(addr, req).await {
                    Ok((resp, _stream)) => {
                        attempt.response(resp.status().as_u16());
                        let _ = resp.into_body().collect().await;
                    }
                    Err(e) => attempt.failed(e.outcome() == retry::Outcome::ConnectFailure),
                }
            });
        }
    }

    /// The route's `headers`, then its destination's, in the order Envoy applies them.
    fn header_rules(&self) -> impl Iterator<Item = &HeaderRules> {
        let d = &self.decision;
        d.http_route
            .map(|r| &r.headers)
            .into_iter()
            .chain(d.destination.map(|w| &w.headers))
    }

    /// (cluster, route) as the access log names them.
    fn names(&self) -> (&str, &str) {
        (&self.decision.cluster.name, &self.route_name)
    }

    /// The routed service, for replies made here (no endpoint).
    fn service(&self) -> To<'s> {
        To::Service(self.snapshot.services()[self.decision.cluster.service].telemetry())
    }

    /// Tries: the first to the routed endpoint, retries (the route's `retries`, else Istio's
    /// default) to other endpoints, all within the route's `timeout`.
    async fn tries(&self, forward: &Forward, body: &Replay<Incoming>) -> Tried<'s> {
        let d = &self.decision;
        let tries = Tries {
            snapshot: self.snapshot,
            cluster: d.cluster,
            forward,
            retries: d
                .http_route
                .and_then(|r| r.retries.as_ref())
                .unwrap_or_else(|| default_retries()),
            body,
        };
        let tries = tries.run(d.target, d.pick);
        match d.http_route.and_then(|r| r.timeout) {
            None => tries.await,
            Some(t) => tokio::time::timeout(t, tries)
                .await
                .unwrap_or_else(|_| (Err(TryError::RouteTimeout), self.first.1, Vec::new())),
        }
    }
}

// === impl Forward ===

impl Forward {
    /// The request as forwarded: same method, path, headers (minus hop-by-hop) and body, in the
    /// upstream protocol, through the pool of the cluster's origination and settings. The
    /// client's authority travels as `Host` on HTTP/1.1 (set when absent) and as `:authority`
    /// on HTTP/2 (with no `Host` header beside it, as RFC 9113 §8.3.1 asks and Envoy does); the
    /// endpoint is the pool's to dial. `None` when no valid URI can be built.
    fn new(
        exchange: &Exchange,
        routed: &Routed<'_>,
        mut parts: Parts,
        upgrading: bool,
        upstreams: &Upstreams,
    ) -> Option<Self> {
        let c = routed.decision.cluster;
        let pool = c
            .policy
            .connection_pool
            .value
            .as_ref()
            .unwrap_or(ConnectionPool::istio_defaults());
        let h2 = !upgrading && upstream_h2(routed.snapshot, exchange.peers.1, pool, parts.version);
        let mut path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        strip_hop_by_hop(&mut parts.headers, upgrading);
        let mut authority = &exchange.authority;
        if let Some(rw) = routed.decision.http_route.and_then(|r| r.rewrite.as_ref()) {
            let matched = routed.decision.http_match.and_then(|m| m.uri.as_ref());
            if rw.uri.is_some() || rw.uri_regex.is_some() {
                path_and_query = actions::rewrite_path(&path_and_query, matched, rw);
            }
            if let Some(a) = &rw.authority {
                authority = a;
                parts.headers.remove(header::HOST);
            }
        }
        // The request id and trace context first: a route's header rules may still override them.
        exchange.trace.write(&mut parts.headers);
        for rules in routed.header_rules() {
            actions::apply(&rules.request, &mut parts.headers);
        }
        let first_uri = if h2 {
            parts.headers.remove(header::HOST);
            let scheme = if c.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{authority}{path_and_query}")
                .parse()
                .or_else(|_| uri_for(routed.first.0, &path_and_query))
                .ok()?
        } else {
            if !parts.headers.contains_key(header::HOST)
                && let Ok(v) = HeaderValue::from_str(authority)
            {
                parts.headers.insert(header::HOST, v);
            }
            uri_for(routed.first.0, &path_and_query).ok()?
        };
        let host = Some(split_host(authority)).filter(|h| !h.is_empty());
        Some(Self {
            authority: authority.clone(),
            pool: upstreams.pick(
                c.tls.as_ref().map(|o| (o, &c.stats)),
                host,
                Settings::of(pool, h2),
            ),
            auto_pool: c
                .auto_tls
                .as_ref()
                .map(|o| upstreams.pick(Some((o, &c.stats)), host, Settings::of(pool, h2))),
            hbone_pool: (c.hbone.as_ref())
                .map(|t| upstreams.pick_via(None, Some(t), host, Settings::of(pool, h2))),
            h2,
            connect_timeout: pool.connect_timeout,
            method: parts.method,
            version: if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            },
            headers: parts.headers,
            path_and_query,
            first_uri,
        })
    }

    /// The pool a try to member `pick` of `c` goes through: HBONE or auto mTLS for a member
    /// reached so (when the cluster has no `tls` of its own), else the cluster's.
    fn pool_for(&self, c: &crate::registry::Cluster, pick: Option<usize>) -> &Pool {
        if let (Some(hbone), Some(_)) = (&self.hbone_pool, c.hbone_for(pick)) {
            return hbone;
        }
        match (
            &self.auto_pool,
            c.tls.is_none() && c.origination_for(pick).is_some(),
        ) {
            (Some(auto), true) => auto,
            _ => &self.pool,
        }
    }

    /// The mirrored copy of the request, to `addr`, naming the `shadow` authority.
    fn shadow(&self, addr: SocketAddr, shadow: &str, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        let uri = if self.h2 {
            let scheme = self.first_uri.scheme_str().unwrap_or("http");
            format!("{scheme}://{shadow}{}", self.path_and_query)
                .parse()
                .ok()
        } else {
            if let Ok(v) = HeaderValue::from_str(shadow) {
                req.headers_mut().insert(header::HOST, v);
            }
            uri_for(addr, &self.path_and_query).ok()
        };
        *req.uri_mut() = uri.unwrap_or_else(|| self.first_uri.clone());
        req
    }

    /// The request of one try to `addr` (the `n`th try).
    fn request(&self, n: u32, addr: SocketAddr, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        // The first try's URI was built before. On HTTP/1.1 a retry's differs only in the
        // endpoint (which the connector dials); on HTTP/2 it names the authority, not the
        // endpoint, so it stays.
        *req.uri_mut() = match n {
            _ if n == 0 || self.h2 => self.first_uri.clone(),
            _ => uri_for(addr, &self.path_and_query).unwrap_or_else(|_| self.first_uri.clone()),
        };
        req
    }
}

/// The host of an authority (`host[:port]`, IPv6 brackets removed), for SNI.
fn split_host(authority: &str) -> &str {
    authority
        .rsplit_once(':')
        .filter(|(_, port)| port.parse::<u16>().is_ok())
        .map_or(authority, |(h, _)| h)
        .trim_matches(|c| c == '[' || c == ']')
}

/// Upstream protocol: the port's (http2/grpc → h2), unless the rule mirrors the client's
/// (`useClientProtocol`) or upgrades (`h2UpgradePolicy: UPGRADE`).
fn upstream_h2(
    snapshot: &crate::registry::Registry,
    orig: SocketAddr,
    pool: &ConnectionPool,
    client: Version,
) -> bool {
    match pool {
        p if p.use_client_protocol => client == Version::HTTP_2,
        p if p.h2_upgrade == H2Upgrade::Upgrade => true,
        _ => route::is_h2(
            snapshot
                .lookup(orig)
                .and_then(|(_, p)| p.protocol.as_deref()),
        ),
    }
}

/// One request's tries: the first to the routed endpoint, retries (the route's `retries`, else
/// Istio's default) to other endpoints, each reported to outlier detection (of the snapshot the
/// request was routed by) and the counters.
struct Tries<'a, 's> {
    snapshot: &'s crate::registry::Registry,
    cluster: &'s crate::registry::Cluster,
    forward: &'a Forward,
    retries: &'a Retries,
    body: &'a Replay<Incoming>,
}

/// What the tries came to: the response (or why none), the last endpoint tried, the flags.
type Tried<'s> = (
    Result<(Response<Incoming>, Option<streams::Stream>), TryError>,
    Named<'s>,
    Vec<ResponseFlag>,
);

impl<'s> Tries<'_, 's> {
    async fn run(&self, mut target: Target, mut pick: Option<usize>) -> Tried<'s> {
        let (c, stats, retries) = (self.cluster, &self.cluster.stats, self.retries);
        let mut tried = Vec::new();
        let mut _retry_slot = None;
        let mut flags = Vec::new();
        let mut n = 0;
        loop {
            let (addr, endpoint) = describe(self.snapshot, c, target);
            let mut attempt = Attempt::start(c, pick);
            let req = self.forward.request(n, addr, self.body.attempt());
            let sent = self.forward.pool_for(c, pick).send(addr, req);
            let result = match retries.per_try_timeout {
                None => sent.await,
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .unwrap_or(Err(SendError::Timeout(t))),
            };
            let outcome = observe(&result, &mut attempt, endpoint);
            let retriable = retry::retriable(&retries.retry_on, outcome);
            if retriable && n < retries.attempts && self.body.replayable() {
                if let Some(slot) = c.limits.admit_retry() {
                    stats.rq_retry.fetch_add(1, Ordering::Relaxed);
                    drop(result);
                    let wait = retry::backoff(n + 1, fastrand::f64(), retries.backoff);
                    tokio::time::sleep(wait).await;
                    _retry_slot = Some(slot);
                    if let Some(i) = pick {
                        tried.push(i);
                        pick = c.repick(&tried, retries.ignore_previous_hosts);
                        target = pick.map_or(target, |i| c.target(i));
                    }
                    n += 1;
                    continue;
                }
                flags.push(ResponseFlag::UpstreamOverflow);
            } else if retriable && retries.attempts > 0 && n >= retries.attempts {
                stats
                    .rq_retry_limit_exceeded
                    .fetch_add(1, Ordering::Relaxed);
                flags.push(ResponseFlag::UpstreamRetryLimitExceeded);
            }
            if n > 0 && !retriable {
                stats.rq_retry_success.fetch_add(1, Ordering::Relaxed);
            }
            return (result.map_err(TryError::Send), endpoint, flags);
        }
    }
}

/// Reports one try's result through its attempt; how it ended, for retries.
fn observe(
    result: &Result<(Response<Incoming>, Option<streams::Stream>), SendError>,
    attempt: &mut Attempt,
    endpoint: Named<'_>,
) -> retry::Outcome {
    match result {
        Ok((resp, _)) => {
            let status = resp.status().as_u16();
            attempt.response(status);
            retry::Outcome::Response {
                status,
                grpc: resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, endpoint = %endpoint, "upstream request failed");
            let outcome = e.outcome();
            attempt.failed(outcome == retry::Outcome::ConnectFailure);
            outcome
        }
    }
}

/// The endpoint a target names, for the upstream request and the access log.
fn describe<'s>(
    snapshot: &'s crate::registry::Registry,
    c: &crate::registry::Cluster,
    target: Target,
) -> (SocketAddr, Named<'s>) {
    let svc = &snapshot.services()[c.service];
    let service = svc.telemetry();
    match target {
        Target::Endpoint { index, addr } => {
            let ep = &svc.endpoints[index];
            let named = Named {
                name: Some(ep.name.as_str()),
                addr,
                service,
                index: Some(index),
                mtls: c.proves_identity(ep),
            };
            (addr, named)
        }
        Target::Passthrough(addr) => {
            let named = Named {
                name: None,
                addr,
                service,
                index: None,
                mtls: false,
            };
            (addr, named)
        }
    }
}

/// Where a request went, as its access-log line and the standard metrics name it.
#[derive(Clone, Copy)]
enum To<'s> {
    /// Not routed.
    Nowhere,
    /// Answered here for a routed service.
    Service(&'s crate::telemetry::Destinations),
    /// Sent to an endpoint.
    Endpoint(Named<'s>),
}

impl std::fmt::Display for To<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            To::Endpoint(n) => n.fmt(f),
            _ => f.write_str("-"),
        }
    }
}

/// The values of a span's custom tags for a request with `headers` (literal, environment
/// variable, or request header, each with its default).
fn custom_tags(
    tags: &std::collections::BTreeMap<String, crate::config::policy::CustomTag>,
    headers: &HeaderMap,
) -> Vec<opentelemetry::KeyValue> {
    use crate::config::policy::CustomTag;
    (tags.iter())
        .map(|(name, tag)| {
            let value = match tag {
                CustomTag::Literal(v) => v.clone(),
                CustomTag::Environment { name, default } => {
                    std::env::var(name).unwrap_or_else(|_| default.clone())
                }
                CustomTag::Header { name, default } => (headers.get(name.as_str()))
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| default.clone(), str::to_string),
            };
            opentelemetry::KeyValue::new(name.clone(), value)
        })
        .collect()
}

/// An endpoint as the access log names it (`name@addr`, or `passthrough@addr`), formatted only
/// when a line is written.
#[derive(Clone, Copy)]
struct Named<'s> {
    name: Option<&'s str>,
    addr: SocketAddr,
    /// Its service's and its own labels in the standard metrics.
    service: &'s crate::telemetry::Destinations,
    /// Its index in the service's endpoints (`None`: passthrough).
    index: Option<usize>,
    /// The connection to it proves both identities.
    mtls: bool,
}

impl std::fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name.unwrap_or("passthrough"), self.addr)
    }
}

/// The counters of the picked endpoint.
fn endpoint_of(
    c: &crate::registry::Cluster,
    pick: Option<usize>,
) -> Option<&crate::stats::EndpointStats> {
    pick.and_then(|i| c.members.get(i)).map(|m| &*m.stats)
}

/// The upstream URI of a try to `addr`.
fn uri_for(addr: SocketAddr, path_and_query: &str) -> Result<Uri, hyper::http::uri::InvalidUri> {
    let mut uri = String::with_capacity(32 + path_and_query.len());
    uri.push_str("http://");
    match addr {
        // Written by hand: `Display` for addresses costs more than the rest of the URI.
        SocketAddr::V4(a) => {
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    uri.push('.');
                }
                push_decimal(&mut uri, octet.into());
            }
            uri.push(':');
            push_decimal(&mut uri, a.port());
        }
        SocketAddr::V6(a) => {
            use std::fmt::Write;
            let _ = write!(uri, "{a}");
        }
    }
    uri.push_str(path_and_query);
    Uri::try_from(uri)
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, mut n: u16) {
    let mut digits = [0u8; 5];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Envoy's answer when a circuit breaker refuses a request: 503 with `UO` and
/// `x-envoy-overloaded` on overflow, `UT` when the pending queue timed out.
fn breaker_reply(e: &crate::breakers::Error) -> (ResponseFlag, Response<Body>) {
    let (flag, body) = match e {
        crate::breakers::Error::PendingTimeout(_) => (
            ResponseFlag::UpstreamRequestTimeout,
            "upstream request timeout",
        ),
        _ => (ResponseFlag::UpstreamOverflow, OVERFLOW),
    };
    let mut reply = local(StatusCode::SERVICE_UNAVAILABLE, body, &[flag]);
    if flag == ResponseFlag::UpstreamOverflow {
        reply
            .headers_mut()
            .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    }
    (flag, reply)
}

/// Copies bytes both ways between an upgraded client connection and the upgraded upstream one
/// (WebSocket and other HTTP/1.1 `Upgrade`s), on its own task.
fn bridge(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match (downstream.await, upstream.await) {
            (Ok(d), Ok(u)) => {
                let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                let _ = tokio::io::copy_bidirectional(&mut d, &mut u).await;
            }
            (d, u) => tracing::debug!(
                downstream = ?d.err(),
                upstream = ?u.err(),
                "upgrade failed"
            ),
        }
    });
}

/// A proxied response body that writes its access-log line once, when it ends or is dropped:
/// `UC` when the upstream connection ended mid-body, `UR` when the upstream reset the stream,
/// `DC` when the client went away first (Envoy's flags); the flags of the tries before stay.
/// It also keeps the request counted as in flight until then.
struct Logged<B: hyper::body::Body> {
    body: B,
    /// `None` when the access log is off.
    line: Option<access::Record>,
    /// The request in the standard metrics, counted when the body ends.
    measure: Measure,
    cut: Option<ResponseFlag>,
    ended: bool,
    _active: downstream::Active,
}

impl<B> hyper::body::Body for Logged<B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.ended = true,
            std::task::Poll::Ready(Some(Err(e))) => {
                let reset = std::error::Error::source(e)
                    .and_then(|s| s.downcast_ref::<h2::Error>())
                    .is_some_and(h2::Error::is_reset);
                self.cut = Some(if reset {
                    ResponseFlag::UpstreamRemoteReset
                } else {
                    ResponseFlag::UpstreamConnectionTermination
                });
            }
            std::task::Poll::Ready(Some(Ok(frame))) => {
                self.measure.request.count(frame);
                if let Some(data) = frame.data_ref()
                    && let Some(access::Kind::Http { envoy: Some(e), .. }) =
                        self.line.as_mut().map(|l| &mut l.kind)
                {
                    e.body_sent += data.len() as u64;
                }
                if self.body.is_end_stream() {
                    self.ended = true;
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B: hyper::body::Body> Drop for Logged<B> {
    fn drop(&mut self) {
        let ended = self.ended || hyper::body::Body::is_end_stream(&self.body);
        let cut = match (self.cut, ended) {
            (Some(flag), _) => Some(flag),
            (None, false) => Some(ResponseFlag::DownstreamConnectionTermination),
            (None, true) => None,
        };
        let m = &mut self.measure;
        m.request.duration = m.start.elapsed();
        if let Some(flag) = cut {
            let sep = if m.request.flags.is_empty() { "" } else { "," };
            m.request.flags = format!("{}{sep}{}", m.request.flags, flag.code());
        }
        if let Some(span) = m.span.take() {
            span.finish(&m.request);
        }
        crate::telemetry::metrics().http(&m.edge, &m.request);
        let Some(line) = &mut self.line else { return };
        if let access::Kind::Http { flags, .. } = &mut line.kind {
            flags.extend(cut);
        }
        line.emit();
    }
}

/// A proxied request's standard-metric labels and outcome, completed as its body passes.
struct Measure {
    edge: crate::telemetry::Edge,
    request: crate::telemetry::Request,
    start: Instant,
    /// Its span, when sampled and exported.
    span: Option<Box<Span>>,
}

/// A sampled request's span before its outcome is known.
struct Span {
    trace: crate::trace::Context,
    name: String,
    /// The source workload as `<canonical service>.<namespace>`.
    service: String,
    attributes: Vec<opentelemetry::KeyValue>,
}

impl Span {
    /// Ends the span with `r`'s outcome and hands it to the exporter.
    fn finish(mut self, r: &crate::telemetry::Request) {
        use opentelemetry::KeyValue;
        let end = std::time::SystemTime::now();
        let flags = if r.flags.is_empty() { "-" } else { &r.flags };
        self.attributes.extend([
            KeyValue::new("http.status_code", i64::from(r.code)),
            KeyValue::new("response_flags", flags.to_string()),
            KeyValue::new("request_size", r.request_bytes as i64),
            KeyValue::new("response_size", r.response_bytes as i64),
        ]);
        let error = r.code >= 500 || r.code == 0;
        if error {
            self.attributes.push(KeyValue::new("error", "true"));
        }
        crate::trace::export::record(crate::trace::export::Finished {
            trace: &self.trace,
            name: self.name,
            start: end.checked_sub(r.duration).unwrap_or(end),
            end,
            service: self.service,
            attributes: self.attributes,
            error,
        });
    }
}

/// Istio's retry policy for routes that set none.
fn default_retries() -> &'static Retries {
    static DEFAULT: std::sync::OnceLock<Retries> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(Retries::istio_default)
}

/// `maxRequestsPerConnection`: once the connection that carried this request has carried `max`,
/// it is not reused (closed once the response ends, as Envoy does).
fn retire_after(captured: &CaptureConnection, max: u32) {
    if let Some(meta) = captured.connection_metadata().as_ref() {
        let mut extras = hyper::http::Extensions::new();
        meta.get_extras(&mut extras);
        if let Some(uses) = extras.get::<Uses>()
            && uses.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 >= max
        {
            meta.poison();
        }
    }
}

/// Envoy's local reply for a routing failure.
fn route_failure(e: &RouteError) -> Response<Body> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let body = match e {
        RouteError::NoEndpoint { .. } => "no healthy upstream".to_string(),
        RouteError::NoRouteMatched { .. } | RouteError::NotCaptured(_) => String::new(),
        other => other.to_string(),
    };
    local(status, &body, &[e.response_flag()])
}

/// A locally generated response (plain text body).
pub fn local(status: StatusCode, body: &str, flags: &[ResponseFlag]) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(v) = HeaderValue::from_str(&access::render(flags)) {
        h.insert("x-drover-response-flag", v);
    }
    resp
}

/// Removes hop-by-hop headers; `upgrading` keeps `Connection` and `Upgrade`, which an HTTP/1.1
/// upgrade needs on both hops.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Headers named by `Connection` are hop-by-hop too.
    let named = |name: &HeaderName| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
    };
    // One pass over the (few) headers present, rather than a lookup per hop-by-hop name.
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name) || named(name))
        .filter(|name| !(upgrading && (*name == header::CONNECTION || *name == header::UPGRADE)))
        // gRPC needs `te: trailers` end to end.
        .filter(|name| {
            *name != header::TE
                || !headers
                    .get(header::TE)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests;
