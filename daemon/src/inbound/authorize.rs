//! `AuthorizationPolicy` on the inbound side: every connection (or HBONE stream) to a workload,
//! once its peer is authenticated, goes through [`Inbound::deliver`]. Without policies it is
//! relayed as before. With policies that do not read HTTP and allow it, it is relayed after one
//! check. Otherwise the first bytes decide: HTTP/1.1 or HTTP/2 (prior knowledge) is served
//! request by request — each checked with its host, method, normalized path and headers, a
//! denied one answered `403` with `RBAC: access denied` as Envoy answers, an allowed one sent to
//! the workload on one upstream connection; any other protocol gets the connection-level
//! decision (denied: closed). With `--inbound-http-metrics`, a port a service declares HTTP is
//! also served request by request, so that each request is counted with
//! `reporter="destination"` as a sidecar counts it. Every request served here is counted; the
//! other connections are counted as TCP.
//!
//! Invariants: a request reaches the workload only after an allowing decision for it; the
//! workload receives the path the policies saw (normalized); every denial is counted per policy
//! and logged with the policy and the reason.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{Error, Inbound};
use crate::{
    authz::{Attributes, Authorizer, Decision, Http, PathNormalization},
    registry::RegistryHandle,
};

/// Who is on the other end of an inbound connection, as policies read it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// SPIFFE id with its scheme (`None`: plaintext).
    pub identity: Option<String>,
    /// The original client the peer names (HBONE `forwarded: for=`), else the peer.
    pub remote: IpAddr,
    pub sni: Option<String>,
}

/// The body Envoy sends with an RBAC denial.
pub const DENIED_BODY: &str = "RBAC: access denied";
/// How long a client may take to send enough bytes to tell HTTP from other protocols.
const SNIFF: Duration = Duration::from_millis(100);

static NORMALIZATION: std::sync::OnceLock<PathNormalization> = std::sync::OnceLock::new();

/// Sets the path normalization (`--path-normalization`; once, at start).
pub fn set_path_normalization(n: PathNormalization) {
    let _ = NORMALIZATION.set(n);
}

fn normalization() -> PathNormalization {
    NORMALIZATION.get().copied().unwrap_or_default()
}

static HTTP_METRICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Serves ports declared HTTP request by request for the standard metrics
/// (`--inbound-http-metrics`; at start).
pub fn set_http_metrics(on: bool) {
    HTTP_METRICS.store(on, std::sync::atomic::Ordering::Relaxed);
}

impl Peer {
    /// A peer with no identity of its own beyond its address.
    pub fn plaintext(addr: SocketAddr) -> Self {
        Self {
            addr,
            identity: None,
            remote: addr.ip(),
            sni: None,
        }
    }

    fn attributes(&self, destination: SocketAddr) -> Attributes<'_> {
        Attributes {
            principal: (self.identity.as_deref()).map(|i| i.trim_start_matches("spiffe://")),
            source: self.addr.ip(),
            remote: self.remote,
            destination,
            sni: self.sni.as_deref(),
            http: None,
        }
    }
}

/// The AuthorizationPolicies of a workload, and what its declared ports speak.
pub(super) struct Policies {
    authz: Arc<Authorizer>,
    /// Workload port → HTTP (true) or not (see [`crate::registry::Registry::declared_http`]).
    declared: std::collections::HashMap<u16, bool>,
    /// Some applying rule reads an HTTP-only attribute.
    reads_http: bool,
}

/// How a delivered connection was served.
enum Served {
    /// Relayed as bytes: (from the client, to the client), counted in `conn` as they moved.
    Tcp {
        bytes: (u64, u64),
        conn: crate::telemetry::Connection,
    },
    /// Served request by request (each counted on its own).
    Http,
}

/// The standard-metric labels of one inbound HTTP connection's requests, and what the
/// workload's Telemetry overrides read.
struct Meter {
    edge: crate::telemetry::Edge,
    settings: Arc<crate::telemetry::Settings>,
    mtls: bool,
}

/// What Istio's request metrics need of a request before it is sent on.
struct Begun {
    start: std::time::Instant,
    grpc: bool,
    request_bytes: u64,
    method: hyper::Method,
    host: String,
    path: String,
    /// Kept only when the workload's metric overrides have expressions that may read them.
    headers: Option<hyper::HeaderMap>,
}

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    Other,
}

// === impl Inbound ===

impl Inbound {
    /// The policies that apply to this workload in the current snapshot (recomputed once per
    /// snapshot).
    pub(super) fn policies(&self, policy: &RegistryHandle) -> Arc<Policies> {
        let snapshot = policy.load();
        let mut cached = self.authz.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, a)) = &*cached
            && Arc::ptr_eq(s, &snapshot)
        {
            return a.clone();
        }
        let authz = Arc::new(snapshot.authorizer(&self.ns.addresses));
        let declared = snapshot.declared_http(&self.ns.addresses);
        let reads_http = authz.reads_http();
        let a = Arc::new(Policies {
            authz,
            declared,
            reads_http,
        });
        *cached = Some((snapshot, a.clone()));
        a
    }

    /// Authorizes `client` (from `peer`, to `target`) and relays it to the workload, on
    /// `upstream` when the caller connected already (HBONE answers 503 before accepting a
    /// stream it cannot connect).
    pub async fn deliver<S>(
        &self,
        client: S,
        target: SocketAddr,
        peer: &Peer,
        policy: &RegistryHandle,
        upstream: Option<TcpStream>,
    ) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self
            .authorized(client, target, peer, policy, upstream)
            .await
        {
            Ok(Served::Http) => Ok(()),
            Ok(Served::Tcp { bytes, conn }) => {
                conn.close(bytes);
                Ok(())
            }
            Err(e) => {
                self.measure_refused(peer, target, policy, &e);
                Err(e)
            }
        }
    }

    /// Who talked to whom (`reporter="destination"`): the client named by its address (a known
    /// endpoint) and certificate, this workload as the destination; and this workload's
    /// Telemetry settings.
    fn edge(
        &self,
        peer: &Peer,
        target: SocketAddr,
        policy: &RegistryHandle,
    ) -> (crate::telemetry::Edge, crate::telemetry::Source) {
        use crate::telemetry::{Edge, Peer as Labels, Reporter, Security};
        let snapshot = policy.load();
        let mtls = peer.identity.is_some();
        let known = (snapshot.workload_at(peer.remote)).map(|(_, w)| w.peer(false).clone());
        let source = match (&peer.identity, known) {
            (Some(id), Some(w)) => Arc::new(w.with_principal(id.clone())),
            (Some(id), None) => Arc::new(Labels::from_principal(id)),
            (None, Some(w)) => w,
            (None, None) => crate::telemetry::unknown_peer(),
        };
        let me = crate::telemetry::source(&self.ns.name);
        let service = (snapshot.workload_at(target.ip()))
            .and_then(|(s, _)| s.clone())
            .unwrap_or_else(crate::telemetry::unknown_service);
        let edge = Edge {
            reporter: Reporter::Destination,
            source,
            destination: me.workload.peer(mtls).clone(),
            service,
            security: if mtls {
                Security::MutualTls
            } else {
                Security::None
            },
        };
        (edge, me)
    }

    /// Counts a connection that was refused or could not reach the workload in the standard
    /// TCP metrics (opened and closed at once).
    fn measure_refused(&self, peer: &Peer, target: SocketAddr, policy: &RegistryHandle, e: &Error) {
        let (edge, me) = self.edge(peer, target, policy);
        // A denial is no upstream failure (Envoy's RBAC filter sets no flag); a workload that
        // could not be reached is `UF`.
        let flags = match e {
            Error::Forward { .. } => "UF".to_string(),
            _ => String::new(),
        };
        let attributes = crate::telemetry::settings::Attributes {
            flags: &flags,
            mtls: peer.identity.is_some(),
            ..Default::default()
        };
        let overrides = me.settings.overrides(false, &attributes);
        crate::telemetry::metrics().tcp(
            &edge,
            &crate::telemetry::Tcp {
                opened: 1,
                closed: 1,
                flags,
                overrides,
                ..Default::default()
            },
        );
    }

    /// [`Self::deliver`] up to the end of the connection: bytes from and to the client.
    async fn authorized<S>(
        &self,
        client: S,
        target: SocketAddr,
        peer: &Peer,
        policy: &RegistryHandle,
        upstream: Option<TcpStream>,
    ) -> Result<Served, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let policies = self.policies(policy);
        let authz = policies.authz.clone();
        // With `--inbound-http-metrics`, requests to a port declared HTTP are served (and
        // counted) one by one.
        let metered = HTTP_METRICS.load(std::sync::atomic::Ordering::Relaxed)
            && crate::telemetry::enabled()
            && policies.declared.get(&target.port()) == Some(&true);
        if authz.is_empty() && !metered {
            return self.relay(client, target, peer, policy, upstream).await;
        }
        let attrs = peer.attributes(target);
        let decision = authz.check(&attrs);
        if decision.allowed && !policies.reads_http && !metered {
            self.audit(&decision, peer, target, None);
            return self.relay(client, target, peer, policy, upstream).await;
        }
        // A port a service declares TCP is checked as TCP; HTTP or undeclared ports are
        // sniffed (HTTP/1.1 or HTTP/2; an undeclared one may be anything).
        let (client, protocol) = match policies.declared.get(&target.port()) {
            Some(false) => (Prefixed::new(Vec::new(), client), Protocol::Other),
            _ => sniff(client).await,
        };
        match protocol {
            Protocol::Other if decision.allowed => {
                self.audit(&decision, peer, target, None);
                self.relay(client, target, peer, policy, upstream).await
            }
            Protocol::Other => {
                let reason = decision.reason();
                self.deny(&decision, peer, target, None);
                Err(Error::Denied(reason))
            }
            Protocol::Http1 | Protocol::Http2 => {
                let h2 = protocol == Protocol::Http2;
                let meter = crate::telemetry::enabled().then(|| {
                    let (edge, me) = self.edge(peer, target, policy);
                    Meter {
                        edge,
                        settings: me.settings,
                        mtls: peer.identity.is_some(),
                    }
                });
                self.serve_http(client, h2, target, peer, authz, upstream, meter)
                    .await
                    .map(|()| Served::Http)
            }
        }
    }

    /// `upstream`, else a new connection to `target`.
    async fn upstream(
        &self,
        target: SocketAddr,
        upstream: Option<TcpStream>,
    ) -> Result<TcpStream, Error> {
        match upstream {
            Some(s) => Ok(s),
            None => self.forward(target).await,
        }
    }

    /// Relays `client` to the workload, counted in the standard TCP metrics as it runs.
    async fn relay<S>(
        &self,
        mut client: S,
        target: SocketAddr,
        peer: &Peer,
        policy: &RegistryHandle,
        upstream: Option<TcpStream>,
    ) -> Result<Served, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut upstream = self.upstream(target, upstream).await?;
        let (edge, me) = self.edge(peer, target, policy);
        let attributes = crate::telemetry::settings::Attributes {
            mtls: peer.identity.is_some(),
            ..Default::default()
        };
        let overrides = me.settings.overrides(false, &attributes);
        let mut conn = crate::telemetry::Connection::open(edge, overrides);
        let mut sink = |up, down| conn.moved(up, down);
        let end = crate::proxy::relay::bounded(
            &mut client,
            &mut upstream,
            crate::config::policy::ConnectionPool::istio_defaults().tcp_idle_timeout,
            None,
            Some(crate::proxy::relay::Report {
                every: me.settings.reporting_interval(),
                sink: &mut sink,
            }),
        )
        .await;
        let bytes = match end {
            Ok(crate::proxy::relay::End::Closed(up, down)) => (up, down),
            _ => (0, 0),
        };
        Ok(Served::Tcp { bytes, conn })
    }

    /// Serves HTTP on `client`: each request checked, the allowed ones sent to the workload;
    /// each counted on `meter`'s edge when there is one.
    #[expect(
        clippy::too_many_arguments,
        reason = "one connection's parts, passed once"
    )]
    async fn serve_http<S>(
        &self,
        client: S,
        h2: bool,
        target: SocketAddr,
        peer: &Peer,
        authz: Arc<Authorizer>,
        upstream: Option<TcpStream>,
        meter: Option<Meter>,
    ) -> Result<(), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let upstream = TokioIo::new(self.upstream(target, upstream).await?);
        let forward_err = |e: hyper::Error| Error::Forward {
            addr: target,
            source: io::Error::other(e),
        };
        let sender = if h2 {
            let (s, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(upstream)
                .await
                .map_err(forward_err)?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(upstream)
                .await
                .map_err(forward_err)?;
            tokio::spawn(conn.with_upgrades());
            Sender::H1(tokio::sync::Mutex::new(s))
        };
        let shared = Arc::new(Shared {
            sender,
            authz,
            peer: peer.clone(),
            target,
            inbound: self.log_context(),
            meter,
        });
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, std::convert::Infallible>(shared.request(req).await) }
        });
        let io = TokioIo::new(client);
        let served = if h2 {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service)
                .await
        } else {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(io, service)
                .with_upgrades()
                .await
        };
        if let Err(e) = served {
            tracing::debug!(%target, error = %e, "inbound HTTP connection ended");
        }
        Ok(())
    }

    fn log_context(&self) -> LogContext {
        LogContext {
            netns: self.ns.name.clone(),
        }
    }

    fn audit(&self, d: &Decision, peer: &Peer, target: SocketAddr, req: Option<(&str, &str)>) {
        // The common case (no AUDIT policy matched) builds nothing.
        if !d.audited.is_empty() {
            audit(&self.log_context(), d, peer, target, req);
        }
    }

    fn deny(&self, d: &Decision, peer: &Peer, target: SocketAddr, req: Option<(&str, &str)>) {
        deny(&self.log_context(), d, peer, target, req);
    }
}

/// What denial and audit logs name.
struct LogContext {
    netns: String,
}

fn audit(
    ctx: &LogContext,
    d: &Decision,
    peer: &Peer,
    target: SocketAddr,
    req: Option<(&str, &str)>,
) {
    for policy in &d.audited {
        crate::stats::store().authz_audited(policy);
        tracing::info!(netns = %ctx.netns, %policy, peer = %peer.addr, identity = ?peer.identity, %target, request = ?req, allowed = d.allowed, "AUDIT policy matched");
    }
}

fn deny(
    ctx: &LogContext,
    d: &Decision,
    peer: &Peer,
    target: SocketAddr,
    req: Option<(&str, &str)>,
) {
    audit(ctx, d, peer, target, req);
    let policy = d.policy.as_ref().map(|(p, _)| &**p);
    crate::stats::store().authz_denied(policy);
    tracing::warn!(netns = %ctx.netns, policy = policy.unwrap_or("-"), reason = %d.reason(), peer = %peer.addr, identity = ?peer.identity, %target, request = ?req, "authorization denied");
}

/// The upstream connection of one inbound HTTP connection.
enum Sender {
    H1(tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// What every request of one inbound HTTP connection shares.
struct Shared {
    sender: Sender,
    authz: Arc<Authorizer>,
    peer: Peer,
    target: SocketAddr,
    inbound: LogContext,
    meter: Option<Meter>,
}

type Body = BoxBody<Bytes, hyper::Error>;

impl Shared {
    /// Answers one request, counted in the standard metrics when the connection is metered.
    async fn request(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(meter) = &self.meter else {
            return self.answer(req).await.0;
        };
        let begun = meter.begin(&req);
        let (resp, flags) = self.answer(req).await;
        meter.finish(begun, resp, flags)
    }

    /// The workload's (or this proxy's) answer to one request, and its response flags.
    async fn answer(&self, mut req: Request<Incoming>) -> (Response<Body>, &'static str) {
        let path = normalization().apply(req.uri().path());
        if path != req.uri().path() {
            let mut parts = req.uri().clone().into_parts();
            let pq = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            parts.path_and_query = pq.parse().ok();
            if let Ok(uri) = hyper::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        let host = (req.uri().authority().map(|a| a.as_str()))
            .or_else(|| req.headers().get(hyper::header::HOST)?.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let decision = if self.authz.is_empty() {
            Decision {
                allowed: true,
                policy: None,
                audited: Vec::new(),
            }
        } else {
            let mut attrs = self.peer.attributes(self.target);
            attrs.http = Some(Http {
                host: &host,
                method: req.method().as_str(),
                path: &path,
                headers: req.headers(),
            });
            self.authz.check(&attrs)
        };
        let what = Some((req.method().as_str(), path.as_str()));
        if !decision.allowed {
            deny(&self.inbound, &decision, &self.peer, self.target, what);
            return (denied(), "");
        }
        audit(&self.inbound, &decision, &self.peer, self.target, what);
        // An HTTP/1.1 `Upgrade` (WebSocket): once the workload switches protocols, both sides'
        // upgraded connections are bridged.
        let client_upgrade = (req.headers().contains_key(hyper::header::UPGRADE))
            .then(|| hyper::upgrade::on(&mut req));
        let sent = match &self.sender {
            Sender::H1(s) => {
                let mut s = s.lock().await;
                match s.ready().await {
                    Ok(()) => s.send_request(req).await,
                    Err(e) => Err(e),
                }
            }
            Sender::H2(s) => s.clone().send_request(req).await,
        };
        match sent {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client) = client_upgrade
                {
                    let workload = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        if let (Ok(a), Ok(b)) = (client.await, workload.await) {
                            let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                            let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                        }
                    });
                }
                (resp.map(|b| b.boxed()), "")
            }
            Err(e) => {
                tracing::debug!(target = %self.target, error = %e, "inbound request to the workload failed");
                let reply = status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error or disconnect/reset before headers",
                );
                (reply, "UC")
            }
        }
    }
}

// === impl Meter ===

impl Meter {
    /// What the request's metrics need before it is sent on.
    fn begin(&self, req: &Request<Incoming>) -> Begun {
        let headers = req.headers();
        Begun {
            start: std::time::Instant::now(),
            grpc: crate::telemetry::is_grpc(headers),
            request_bytes: crate::telemetry::request_bytes(headers),
            method: req.method().clone(),
            host: (req.uri().authority().map(|a| a.as_str()))
                .or_else(|| headers.get(hyper::header::HOST)?.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            path: req.uri().path().to_string(),
            headers: (!self.settings.overrides.is_empty()).then(|| headers.clone()),
        }
    }

    /// `resp`, counted on this edge when its body ends.
    fn finish(&self, b: Begun, resp: Response<Body>, flags: &str) -> Response<Body> {
        use crate::telemetry::{Metered, Protocol, grpc_status_for};
        let code = resp.status().as_u16();
        let grpc_status = match b.grpc {
            true => (resp.headers().get("grpc-status"))
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .or_else(|| (code != 200).then(|| grpc_status_for(code))),
            false => None,
        };
        let attributes = crate::telemetry::settings::Attributes {
            method: b.method.as_str(),
            host: &b.host,
            path: &b.path,
            headers: b.headers.as_ref(),
            code,
            flags,
            mtls: self.mtls,
        };
        let request = crate::telemetry::Request {
            protocol: if b.grpc {
                Protocol::Grpc
            } else {
                Protocol::Http
            },
            code,
            grpc_status,
            flags: flags.to_string(),
            duration: Duration::ZERO,
            request_bytes: b.request_bytes,
            response_bytes: crate::telemetry::header_bytes(resp.headers()),
            overrides: self.settings.overrides(false, &attributes),
        };
        let edge = self.edge.clone();
        resp.map(|body| Metered::new(body, edge, request, b.start).boxed())
    }
}

/// Envoy's RBAC denial.
fn denied() -> Response<Body> {
    status(StatusCode::FORBIDDEN, DENIED_BODY)
}

fn status(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// Reads the first bytes of `client` (at most [`SNIFF`]) and tells HTTP from the rest; the
/// bytes read are replayed.
async fn sniff<S: AsyncRead + Unpin>(mut client: S) -> (Prefixed<S>, Protocol) {
    let mut buf = Vec::with_capacity(32);
    let deadline = tokio::time::Instant::now() + SNIFF;
    loop {
        let protocol = classify(&buf);
        if protocol.is_some() {
            return (
                Prefixed::new(buf, client),
                protocol.unwrap_or(Protocol::Other),
            );
        }
        let mut chunk = [0u8; 32];
        match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (Prefixed::new(buf, client), Protocol::Other),
        }
    }
}

/// `Some` once the bytes decide: the HTTP/2 preface, an HTTP/1 method and a space, or not HTTP.
fn classify(b: &[u8]) -> Option<Protocol> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    if b.len() >= PREFACE.len() && b.starts_with(PREFACE) {
        return Some(Protocol::Http2);
    }
    if PREFACE.starts_with(b) && !b.is_empty() && b.len() < PREFACE.len() {
        return None;
    }
    match b.iter().position(|c| *c == b' ') {
        Some(0) => Some(Protocol::Other),
        Some(n) if b[..n].iter().all(u8::is_ascii_uppercase) => Some(Protocol::Http1),
        Some(_) => Some(Protocol::Other),
        None if b.len() > 16 || !b.iter().all(u8::is_ascii_uppercase) => Some(Protocol::Other),
        None => None,
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.at < me.prefix.len() {
            let n = (me.prefix.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.prefix[me.at..me.at + n]);
            me.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_http_from_other_protocols() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Protocol::Other));
        assert_eq!(classify(b"hello world"), Some(Protocol::Other));
        assert_eq!(classify(b""), None);
    }

    #[tokio::test]
    async fn sniffed_bytes_are_replayed() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET /x HTTP/1.1\r\n")
            .await
            .unwrap();
        let (mut p, proto) = sniff(b).await;
        assert_eq!(proto, Protocol::Http1);
        let mut out = vec![0u8; 17];
        p.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"GET /x HTTP/1.1\r\n");
    }
}
