//! Upstream HTTP/2 connections of one pool, per endpoint: requests are multiplexed over as few
//! connections as `maxConcurrentStreams` allows — when every open connection to the endpoint
//! carries that many streams the next request opens another, as Envoy's HTTP/2 pool does —; a
//! connection that has carried `maxRequestsPerConnection` requests takes no more and closes when
//! its last stream ends; a connection without a stream for the idle timeout is closed; with
//! `http2KeepAlive` it is pinged and closed when a ping goes unanswered.
//!
//! Invariants: a stream counts on its connection from the pick until its response body ends (the
//! [`Stream`] guard is held by the body); a connection still being opened already counts the
//! requests waiting for it, so a burst of N opens ⌈N / cap⌉ connections, not N; a reservation is
//! atomic, so a connection being closed for idleness is never handed a new stream; a failed
//! connect fails the requests waiting for it once each, and nothing here retries.

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
    client::conn::http2::{Builder, SendRequest},
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

/// The HTTP/2 connections of one pool, per endpoint address.
pub struct StreamPool {
    connector: Connector,
    policy: Policy,
    conns: Mutex<HashMap<SocketAddr, Vec<Arc<Conn>>>>,
}

/// One upstream HTTP/2 connection (or one being opened).
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
    Ready(SendRequest<UpstreamBody>),
    Failed(Arc<str>),
    Closed,
}

/// A stream reserved on a connection; released when dropped.
pub struct Stream(Arc<Conn>);

// === impl StreamPool ===

impl StreamPool {
    pub fn new(connector: Connector, policy: Policy) -> Self {
        Self {
            connector,
            policy: Policy {
                max_streams: policy.max_streams.clamp(1, CLOSING - 1),
                ..policy
            },
            conns: Mutex::default(),
        }
    }

    /// Sends `req` to `addr` over a connection with a free stream, opening one when none has.
    pub async fn send(
        &self,
        addr: SocketAddr,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Stream), Error> {
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
                self.policy,
            ));
        }
        let mut rx = conn.state.clone();
        let state = rx
            .wait_for(|s| !matches!(s, State::Connecting))
            .await
            .map(|s| s.clone())
            .unwrap_or(State::Closed);
        let mut sender = match state {
            State::Ready(s) => s,
            State::Failed(e) => return Err(Error::Connect(e)),
            State::Connecting | State::Closed => return Err(Error::Closed),
        };
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        Ok((resp, stream))
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
    policy: Policy,
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
    let mut builder = Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some((interval, timeout)) = policy.keepalive {
        builder
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
    }
    let (sender, connection) = match builder.handshake(io).await {
        Ok(h) => h,
        Err(e) => {
            tx.send_replace(State::Failed(format!("HTTP/2 handshake: {e}").into()));
            return;
        }
    };
    tx.send_replace(State::Ready(sender));
    drive(connection, &conn, policy.idle_timeout).await;
    tx.send_replace(State::Closed);
}

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
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
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
                    tracing::debug!("upstream HTTP/2 connection idle, closed");
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

// === impl Stream ===

impl Drop for Stream {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        self.0.changed.notify_one();
    }
}
