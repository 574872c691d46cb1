//! Upstream HTTP connections of one pool, per endpoint. HTTP/2: requests are multiplexed over as
//! few connections as `maxConcurrentStreams` allows — when every open connection to the endpoint
//! carries that many streams the next request opens another, as Envoy's HTTP/2 pool does —.
//! HTTP/1.1: the same with one stream per connection, so a request takes an idle keep-alive
//! connection to its endpoint or opens one. Either way a connection that has carried
//! `maxRequestsPerConnection` requests takes no more and closes when its last stream ends; a
//! connection without a stream for the idle timeout is closed; with `http2KeepAlive` an HTTP/2
//! connection is pinged and closed when a ping goes unanswered.
//!
//! Invariants: a stream counts on its connection from the pick until its response body ends (the
//! [`Stream`] guard is held by the body); a connection still being opened already counts the
//! requests waiting for it, so a burst of N opens ⌈N / cap⌉ connections, not N; a reservation is
//! atomic, so a connection being closed for idleness is never handed a new stream; a failed
//! connect fails the requests waiting for it once each. The one retry here is of a request an
//! HTTP/1.1 connection gave back unsent (the endpoint closed that keep-alive connection just
//! before): it goes to another connection, as hyper's own pool does, never twice to the wire.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};
use tower_service::Service;

use super::{replay::UpstreamBody, upstream::Connector};

/// Marks a connection that is closing for idleness: no reservation can succeed on it.
const CLOSING: u32 = u32::MAX;

/// How a pool's connections are used and kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    /// Streams per connection (`maxConcurrentStreams`), at least 1.
    pub max_streams: u32,
    /// Requests per connection over its life (`maxRequestsPerConnection`).
    pub max_requests: Option<u32>,
    /// Close a connection after this long without a stream (`idleTimeout`).
    pub idle_timeout: Option<Duration>,
    /// `http2KeepAlive`: (ping interval, ping timeout).
    pub keepalive: Option<(Duration, Duration)>,
}

/// The HTTP version a pool speaks to its endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Times an HTTP/1.1 request given back unsent is offered to another connection.
const UNSENT_TRIES: usize = 3;

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection never became usable (connect, TLS or HTTP/2 handshake failed).
    #[error("{0}")]
    Connect(Arc<str>),
    /// The connection closed before the request could use it.
    #[error("connection closed before the request was sent")]
    Closed,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// The connections of one pool, per endpoint address.
pub struct StreamPool {
    connector: Connector,
    policy: Policy,
    protocol: Protocol,
    conns: Mutex<HashMap<SocketAddr, Vec<Arc<Conn>>>>,
}

/// One upstream connection (or one being opened).
struct Conn {
    state: watch::Receiver<State>,
    /// Streams reserved on it, or [`CLOSING`].
    streams: AtomicU32,
    uses: AtomicU32,
    /// Takes no more streams (its request budget is spent).
    retired: AtomicBool,
    /// When its last stream ended.
    idle_since: Mutex<Instant>,
    /// Woken when a stream ends.
    changed: Notify,
}

#[derive(Clone)]
enum State {
    Connecting,
    Ready(Sender),
    Failed(Arc<str>),
    Closed,
}

/// Where a connection takes requests.
#[derive(Clone)]
enum Sender {
    /// One request at a time; the connection's one stream makes the lock uncontended.
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<UpstreamBody>>>),
    H2(http2::SendRequest<UpstreamBody>),
}

/// How sending over one connection failed.
enum Unsent {
    /// The connection closed before the request was written: it can go to another.
    Back(Box<Request<UpstreamBody>>),
    Failed(Error),
}

/// A stream reserved on a connection; released when dropped.
pub struct Stream(Arc<Conn>);

// === impl StreamPool ===

impl StreamPool {
    /// A pool speaking `protocol`; HTTP/1.1 connections carry one stream and no pings.
    pub fn new(connector: Connector, policy: Policy, protocol: Protocol) -> Self {
        let policy = match protocol {
            Protocol::Http1 => Policy {
                max_streams: 1,
                keepalive: None,
                ..policy
            },
            Protocol::Http2 => Policy {
                max_streams: policy.max_streams.clamp(1, CLOSING - 1),
                ..policy
            },
        };
        Self {
            connector,
            policy,
            protocol,
            conns: Mutex::default(),
        }
    }

    /// Sends `req` to `addr` over a connection with a free stream, opening one when none has.
    pub async fn send(
        &self,
        addr: SocketAddr,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Stream), Error> {
        if self.protocol == Protocol::Http1 {
            origin_form(&mut req);
        }
        for _ in 0..UNSENT_TRIES {
            let (sender, stream) = self.stream(addr).await?;
            match sender.send(req).await {
                Ok(resp) => return Ok((resp, stream)),
                Err(Unsent::Back(r)) => req = *r,
                Err(Unsent::Failed(e)) => return Err(e),
            }
        }
        Err(Error::Closed)
    }

    /// A stream reserved on a connection to `addr` once that connection is ready.
    async fn stream(&self, addr: SocketAddr) -> Result<(Sender, Stream), Error> {
        let (conn, opener) = self.reserve(addr);
        let stream = Stream(conn.clone());
        if let Some(tx) = opener {
            // Opened on its own task, so that a request that goes away does not abandon the
            // others waiting for the same connection.
            tokio::spawn(open(
                self.connector.clone(),
                addr,
                conn.clone(),
                tx,
                (self.policy, self.protocol),
            ));
        }
        let mut rx = conn.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, State::Connecting))
            .await
            .map(|s| s.clone())
            .unwrap_or(State::Closed);
        match state {
            State::Ready(s) => Ok((s, stream)),
            State::Failed(e) => Err(Error::Connect(e)),
            State::Connecting | State::Closed => Err(Error::Closed),
        }
    }

    /// A stream on a usable connection to `addr`, or a new connection (with the sender that
    /// publishes its state) when every one is full.
    fn reserve(&self, addr: SocketAddr) -> (Arc<Conn>, Option<watch::Sender<State>>) {
        let cap = self.policy.max_streams;
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.entry(addr).or_default();
        list.retain(|c| c.alive());
        for c in list.iter() {
            if c.retired.load(Ordering::Acquire) || !c.usable() {
                continue;
            }
            let reserved = c
                .streams
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < cap).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                self.count_use(c);
                return (c.clone(), None);
            }
        }
        let (tx, rx) = watch::channel(State::Connecting);
        let c = Arc::new(Conn {
            state: rx,
            streams: AtomicU32::new(1),
            uses: AtomicU32::new(0),
            retired: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
            changed: Notify::new(),
        });
        self.count_use(&c);
        list.push(c.clone());
        (c, Some(tx))
    }

    /// `maxRequestsPerConnection`: the request that spends the budget retires the connection.
    fn count_use(&self, c: &Conn) {
        if let Some(max) = self.policy.max_requests
            && c.uses.fetch_add(1, Ordering::AcqRel) + 1 >= max
        {
            c.retired.store(true, Ordering::Release);
        }
    }
}

/// Opens one connection, publishes it, and drives it until it closes.
async fn open(
    mut connector: Connector,
    addr: SocketAddr,
    conn: Arc<Conn>,
    tx: watch::Sender<State>,
    (policy, protocol): (Policy, Protocol),
) {
    let uri = match format!("http://{addr}").parse() {
        Ok(u) => u,
        Err(e) => {
            tx.send_replace(State::Failed(format!("bad upstream {addr}: {e}").into()));
            return;
        }
    };
    let io = match connector.call(uri).await {
        Ok(io) => io,
        Err(e) => {
            tx.send_replace(State::Failed(e.to_string().into()));
            return;
        }
    };
    let handshake = match protocol {
        Protocol::Http1 => http1::Builder::new().handshake(io).await.map(|(s, c)| {
            let sender = Sender::H1(Arc::new(tokio::sync::Mutex::new(s)));
            (sender, Box::pin(c.with_upgrades()) as Driven)
        }),
        Protocol::Http2 => {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            if let Some((interval, timeout)) = policy.keepalive {
                builder
                    .keep_alive_interval(interval)
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true);
            }
            builder
                .handshake(io)
                .await
                .map(|(s, c)| (Sender::H2(s), Box::pin(c) as Driven))
        }
    };
    let (sender, connection) = match handshake {
        Ok(h) => h,
        Err(e) => {
            tx.send_replace(State::Failed(format!("{protocol:?} handshake: {e}").into()));
            return;
        }
    };
    tx.send_replace(State::Ready(sender));
    drive(connection, &conn, policy.idle_timeout).await;
    tx.send_replace(State::Closed);
}

/// The request target an HTTP/1.1 endpoint expects (RFC 9112 §3.2): the path and query, or the
/// authority alone for `CONNECT`. The pool's URIs are absolute (they name the endpoint).
fn origin_form(req: &mut Request<UpstreamBody>) {
    let uri = req.uri();
    let target = match (req.method() == hyper::Method::CONNECT, uri.authority()) {
        (true, Some(a)) => hyper::Uri::from(a.clone()),
        _ => hyper::Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/")),
        ),
    };
    *req.uri_mut() = target;
}

/// A connection's own future (hyper's), run by [`drive`].
type Driven = std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>;

/// Runs the connection until the peer closes it, or it is retired with no stream left, or it
/// has had no stream for `idle` (dropping the connection closes the socket).
async fn drive(
    connection: impl std::future::Future<Output = hyper::Result<()>>,
    conn: &Conn,
    idle: Option<Duration>,
) {
    tokio::pin!(connection);
    loop {
        let quiet = conn.streams.load(Ordering::Acquire) == 0;
        if quiet && conn.retired.load(Ordering::Acquire) && conn.try_close() {
            return;
        }
        let deadline = idle.map(|d| *conn.idle_since.lock().unwrap_or_else(|e| e.into_inner()) + d);
        tokio::select! {
            r = &mut connection => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream HTTP connection ended");
                }
                return;
            }
            () = conn.changed.notified() => {}
            () = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            }, if quiet => {
                // The last stream may have ended while this deadline was computed.
                let idle_for = conn.idle_since.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                if idle.is_some_and(|d| idle_for >= d) && conn.try_close() {
                    tracing::debug!("upstream HTTP connection idle, closed");
                    return;
                }
            }
        }
    }
}

// === impl Conn ===

impl Conn {
    /// Still open or opening, and not about to close.
    fn alive(&self) -> bool {
        self.usable() && !self.spent()
    }

    /// Retired and without a stream: about to close.
    fn spent(&self) -> bool {
        self.retired.load(Ordering::Acquire) && self.streams.load(Ordering::Acquire) == 0
    }

    /// Can carry a new stream (not closed by the peer).
    fn usable(&self) -> bool {
        match &*self.state.borrow() {
            State::Connecting => true,
            State::Ready(s) => !s.is_closed(),
            State::Failed(_) | State::Closed => false,
        }
    }

    /// Claims a connection with no stream for closing; fails when a stream was just reserved.
    fn try_close(&self) -> bool {
        self.streams
            .compare_exchange(0, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

// === impl Sender ===

impl Sender {
    /// Closed by the peer (an HTTP/1.1 connection in use counts as open).
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.try_lock().is_ok_and(|s| s.is_closed()),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends `req` once the connection can take it.
    async fn send(&self, req: Request<UpstreamBody>) -> Result<Response<Incoming>, Unsent> {
        match self {
            Sender::H1(s) => {
                let mut s = s.lock().await;
                if s.ready().await.is_err() {
                    return Err(Unsent::Back(Box::new(req)));
                }
                s.try_send_request(req)
                    .await
                    .map_err(|mut e| match e.take_message() {
                        Some(req) => Unsent::Back(Box::new(req)),
                        None => Unsent::Failed(Error::Http(e.into_error())),
                    })
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                let sent = async {
                    s.ready().await?;
                    s.send_request(req).await
                };
                sent.await.map_err(|e| Unsent::Failed(Error::Http(e)))
            }
        }
    }
}

// === impl Stream ===

impl Drop for Stream {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        self.0.changed.notify_one();
    }
}
