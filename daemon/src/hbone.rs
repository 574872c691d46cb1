//! HBONE, Istio ambient's wire protocol between nodes: an HTTP/2 `CONNECT` whose `:authority`
//! is the original destination `ip:port`, over mutual TLS 1.3 (ALPN `h2`) with SPIFFE identities
//! on both ends, to the destination pod's address on port 15008.
//!
//! The client side ([`connect`]) keeps one pool of HTTP/2 connections per (network namespace,
//! source identity, destination identity, destination address), as ztunnel keys its pool, and
//! opens a new connection when every pooled one carries [`MAX_STREAMS`] tunnels or has closed;
//! the server certificate must name exactly the destination workload's identity. The server side
//! ([`serve`]) runs in every enrolled pod's namespace: it requires a client certificate of the
//! trust domain, accepts only `CONNECT` to one of the pod's own addresses on a port that is not
//! Drover's, dials it from inside the namespace and relays.
//!
//! Invariants: a tunnel is counted in its connection's stream count from the request until the
//! tunnel is dropped; a connection whose handshake or `CONNECT` failed is never pooled; the server
//! answers a refused stream with an HTTP status on that stream (400, 403, 405, 503), never by
//! closing the connection the other streams share.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{inbound::Inbound, mesh::IdentityFiles, registry::RegistryHandle};

/// Where HBONE listens in every pod.
pub const PORT: u16 = drover_common::HBONE_PORT;
/// Tunnels carried by one pooled connection (ztunnel's `POOL_MAX_STREAMS_PER_CONNECTION`).
pub const MAX_STREAMS: usize = 100;
/// The workload label (on a WorkloadEntry) or Pod annotation that says a workload is reached over
/// HBONE, as istiod reads it (istio-cni sets it on the pods it enrolled in ambient mode).
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
/// HTTP/2 flow-control windows and frame size of HBONE connections (ztunnel's: 4 MiB per
/// stream, 16 MiB per connection, 1 MiB frames), so that a tunnel's throughput is not bound by
/// window updates.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const FRAME_SIZE: u32 = 1 << 20;
/// The label of a workload that terminates HBONE itself (Istio's native tunnel support).
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// Why a tunnel could not be opened or served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HBONE to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: crate::proxy::upstream::Error,
    },
    #[error("HBONE to {addr}: TLS: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HBONE to {addr}: no identity of our own to present")]
    NoIdentity { addr: SocketAddr },
    #[error("HBONE client configuration: {0}")]
    Config(#[from] crate::tls::Error),
    #[error("HBONE to {addr}: HTTP/2: {source}")]
    H2 {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("HBONE CONNECT {target} answered {status}")]
    Refused {
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("HBONE handshake with {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Whether a workload with these labels (a WorkloadEntry's, or a Pod's labels with its
/// annotations folded in by the API feed) is reached over HBONE, as istiod decides it.
pub fn speaks_hbone(labels: &std::collections::BTreeMap<String, String>) -> bool {
    labels.get(REDIRECTION).map(String::as_str) == Some("enabled")
        || labels.get(TUNNEL_LABEL).map(String::as_str) == Some("http")
}

/// What a cluster's HBONE dials need: the identity the source presents and, per endpoint
/// address, the identity the destination must present.
#[derive(Debug)]
pub struct Target {
    pub source: IdentityFiles,
    pub peers: HashMap<IpAddr, String>,
}

/// An open tunnel: the bytes of one `CONNECT` stream, counted in its connection until dropped.
pub struct Tunnel {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _stream: StreamSlot,
    /// Who answered (its certificate's SPIFFE identity).
    pub peer: String,
}

/// One stream's place in a pooled connection.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    netns: String,
    source: String,
    peer: String,
    addr: SocketAddr,
}

struct Conn {
    send: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
}

/// The HBONE connections of this daemon, and the client configurations they were made with
/// (by certificate file, its modification time and the expected peer).
#[derive(Default)]
struct Pool {
    conns: Mutex<HashMap<Key, Vec<Conn>>>,
    configs: crate::tls::ByFile<(std::path::PathBuf, String), ClientConfig>,
}

static POOL: LazyLock<Pool> = LazyLock::new(Pool::default);

/// Opens a tunnel from namespace `ns` to `addr` (the endpoint's own address and port) through
/// `addr`'s HBONE port, presenting `target.source`; `src` is the original client (`forwarded`).
pub async fn connect(
    dialer: &crate::proxy::upstream::Dialer,
    target: &Target,
    addr: SocketAddr,
    src: Option<SocketAddr>,
) -> Result<Tunnel, Error> {
    let peer = (target.peers.get(&addr.ip()).cloned()).ok_or(Error::NoIdentity { addr })?;
    let key = Key {
        netns: dialer.ns.name.clone(),
        source: target.source.spiffe.clone(),
        peer: peer.clone(),
        addr: SocketAddr::new(addr.ip(), PORT),
    };
    let (send, slot) = match POOL.reuse(&key) {
        Some(c) => c,
        None => POOL.open(dialer, &target.source, key).await?,
    };
    let mut send = send;
    let req = connect_request(addr, src, &target.source);
    let resp = send
        .send_request(req)
        .await
        .map_err(|source| Error::H2 { addr, source })?;
    if resp.status() != StatusCode::OK {
        return Err(Error::Refused {
            target: addr,
            status: resp.status(),
        });
    }
    let io = hyper::upgrade::on(resp)
        .await
        .map_err(|source| Error::H2 { addr, source })?;
    Ok(Tunnel {
        io: TokioIo::new(io),
        _stream: slot,
        peer,
    })
}

/// The `CONNECT` of a tunnel to `addr`, with the headers ztunnel sends.
fn connect_request(
    addr: SocketAddr,
    src: Option<SocketAddr>,
    source: &IdentityFiles,
) -> Request<Empty<Bytes>> {
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(addr.to_string())
        .version(hyper::Version::HTTP_2)
        .header("traceparent", traceparent());
    if let Some((ns, sa)) = namespace_and_account(&source.spiffe) {
        b = b.header(
            "baggage",
            format!("k8s.namespace.name={ns},service.account={sa}"),
        );
    }
    if let Some(src) = src {
        b = b.header("forwarded", format!("for={}", src.ip()));
    }
    b.body(Empty::new())
        .expect("a CONNECT request is well formed")
}

/// A fresh W3C trace context (sampled off), as ztunnel sends with every tunnel.
fn traceparent() -> String {
    format!(
        "00-{:016x}{:016x}-{:016x}-00",
        fastrand::u64(1..),
        fastrand::u64(..),
        fastrand::u64(1..)
    )
}

/// `(namespace, service account)` of `spiffe://td/ns/N/sa/S`.
fn namespace_and_account(spiffe: &str) -> Option<(&str, &str)> {
    let path = spiffe.strip_prefix("spiffe://")?.split_once('/')?.1;
    let rest = path.strip_prefix("ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    Some((ns, sa))
}

// === impl Pool ===

impl Pool {
    /// A pooled connection of `key` with room for one more stream (the stream counted).
    fn reuse(&self, key: &Key) -> Option<(SendRequest<Empty<Bytes>>, StreamSlot)> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.send.is_closed());
        let c = list
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < MAX_STREAMS && c.send.is_ready())?;
        c.streams.fetch_add(1, Ordering::Relaxed);
        Some((c.send.clone(), StreamSlot(c.streams.clone())))
    }

    /// A new connection for `key` (pooled once its handshakes succeeded), with one stream counted.
    async fn open(
        &self,
        dialer: &crate::proxy::upstream::Dialer,
        source: &IdentityFiles,
        key: Key,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamSlot), Error> {
        let addr = key.addr;
        let config = self.config(source, &key.peer)?;
        let tcp =
            crate::proxy::upstream::connect(&dialer.ns, addr, dialer.connect_timeout, dialer.mark)
                .await
                .map_err(|source| Error::Connect { addr, source })?;
        if let Some(k) = &dialer.keepalive {
            crate::proxy::upstream::set_keepalive(&tcp, k);
        }
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = tokio::time::timeout(
            dialer.connect_timeout,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| Error::Timeout {
            addr,
            timeout: dialer.connect_timeout,
        })?
        .map_err(|source| Error::Tls { addr, source })?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME_SIZE)
            .max_send_buf_size(FRAME_SIZE as usize)
            .keep_alive_interval(Duration::from_secs(20))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| Error::H2 { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "HBONE connection ended");
            }
        });
        let streams = Arc::new(AtomicUsize::new(1));
        let slot = StreamSlot(streams.clone());
        (self.conns.lock().unwrap_or_else(|e| e.into_inner()))
            .entry(key)
            .or_default()
            .push(Conn {
                send: send.clone(),
                streams,
            });
        Ok((send, slot))
    }

    /// The client configuration presenting `source` and requiring `peer`; rebuilt when the
    /// certificate file changed (renewal).
    fn config(&self, source: &IdentityFiles, peer: &str) -> Result<Arc<ClientConfig>, Error> {
        let key = (source.cert.clone(), peer.to_string());
        let config = self
            .configs
            .get(key, &source.cert, || crate::tls::hbone_config(source, peer))?;
        Ok(config)
    }
}

// === impl Tunnel ===

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
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
}

// === server ===

/// Serves HBONE on `listener` (15008 in the pod's namespace) until `shutdown`: one task per
/// connection, one per tunnel. `policy` is the pod's snapshot (its identity); `inbound` knows the
/// pod's addresses (the only targets served).
pub async fn serve(
    inbound: Arc<Inbound>,
    listener: tokio::net::TcpListener,
    policy: RegistryHandle,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let tasks = tracker.clone();
    crate::inbound::accept_each(listener, shutdown, "HBONE", |stream, peer| {
        let peer = crate::inbound::canonical(peer);
        // Tunnels carry small writes (a CONNECT's headers, then its first data): never delayed.
        let _ = stream.set_nodelay(true);
        let (inbound, policy, tracker) = (inbound.clone(), policy.clone(), tracker.clone());
        tasks.spawn(async move {
            let start = tokio::time::Instant::now();
            match inbound.accept_mtls(stream, &policy, true).await {
                Ok((tls, client)) => {
                    let peer = crate::inbound::Peer {
                        identity: Some(client),
                        sni: tls.get_ref().1.server_name().map(str::to_string),
                        ..crate::inbound::Peer::plaintext(peer)
                    };
                    serve_connection(inbound, tls, peer, policy, tracker).await
                }
                Err(e) => inbound.refused(peer, None, start, e),
            }
        });
    })
    .await
}

/// Serves the `CONNECT` streams of one authenticated connection from `peer`.
async fn serve_connection(
    inbound: Arc<Inbound>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: crate::inbound::Peer,
    policy: RegistryHandle,
    tasks: TaskTracker,
) {
    let addr = peer.addr;
    let peer = Arc::new(peer);
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let (inbound, peer, policy, tasks) =
            (inbound.clone(), peer.clone(), policy.clone(), tasks.clone());
        async move {
            Ok::<_, std::convert::Infallible>(tunnel(inbound, req, &peer, policy, &tasks).await)
        }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(FRAME_SIZE)
        .max_send_buf_size(FRAME_SIZE as usize)
        .max_concurrent_streams(MAX_STREAMS as u32 * 10)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(peer = %addr, error = %e, "HBONE connection ended");
    }
}

/// Answers one stream: 200 and a relay to the target, or the status that says why not.
async fn tunnel(
    inbound: Arc<Inbound>,
    req: Request<hyper::body::Incoming>,
    from: &crate::inbound::Peer,
    policy: RegistryHandle,
    tasks: &TaskTracker,
) -> Response<Empty<Bytes>> {
    let peer = from.addr;
    let start = tokio::time::Instant::now();
    let answer = |status: StatusCode| {
        let mut r = Response::new(Empty::new());
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::CONNECT {
        return answer(StatusCode::METHOD_NOT_ALLOWED);
    }
    let target = req.uri().authority().and_then(|a| a.as_str().parse().ok());
    let target: SocketAddr = match target {
        Some(t) if inbound.serves(t) => t,
        _ => {
            let e = crate::inbound::Error::BadTarget(req.uri().to_string());
            inbound.refused(peer, None, start, e);
            return answer(StatusCode::BAD_REQUEST);
        }
    };
    let upstream = match inbound.forward(target).await {
        Ok(s) => s,
        Err(e) => {
            inbound.refused(peer, Some(target), start, e);
            return answer(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    // The original client, as the source node names it (`forwarded: for=<ip>`).
    let remote = (req.headers().get("forwarded"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').find_map(|p| p.trim().strip_prefix("for=")))
        .and_then(|ip| ip.trim_matches('"').trim_matches(['[', ']']).parse().ok())
        .unwrap_or(peer.ip());
    let from = crate::inbound::Peer {
        remote,
        ..from.clone()
    };
    let how = format!(
        "HBONE from {}",
        from.identity.as_deref().unwrap_or_default()
    );
    let inbound = inbound.clone();
    tasks.spawn(async move {
        let outcome = match hyper::upgrade::on(req).await {
            Ok(up) => inbound
                .deliver(TokioIo::new(up), target, &from, &policy, Some(upstream))
                .await
                .map(|()| how),
            Err(e) => Err(crate::inbound::Error::Tls(io::Error::other(e))),
        };
        inbound.served(peer, target, start, outcome, true);
    });
    answer(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_baggage_names_the_source_namespace_and_account() {
        assert_eq!(
            namespace_and_account("spiffe://cluster.local/ns/demo/sa/reviews"),
            Some(("demo", "reviews"))
        );
        assert_eq!(namespace_and_account("spiffe://cluster.local/x"), None);
    }

    #[test]
    fn a_workload_speaks_hbone_by_istiods_label_or_annotation() {
        let labels = |k: &str, v: &str| [(k.to_string(), v.to_string())].into_iter().collect();
        assert!(speaks_hbone(&labels(REDIRECTION, "enabled")));
        assert!(speaks_hbone(&labels(TUNNEL_LABEL, "http")));
        assert!(!speaks_hbone(&labels(REDIRECTION, "disabled")));
        assert!(!speaks_hbone(&labels("security.istio.io/tlsMode", "istio")));
    }

    #[test]
    fn a_tunnel_request_names_the_original_destination_and_carries_ztunnels_headers() {
        let source = IdentityFiles {
            spiffe: "spiffe://cluster.local/ns/a/sa/client".into(),
            trust_domain: "cluster.local".into(),
            cert: "c".into(),
            key: "k".into(),
            root: "r".into(),
        };
        let req = connect_request(
            "198.18.0.2:8080".parse().unwrap(),
            Some("198.18.0.1:40000".parse().unwrap()),
            &source,
        );
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "198.18.0.2:8080");
        assert_eq!(req.headers()["forwarded"], "for=198.18.0.1");
        assert_eq!(
            req.headers()["baggage"],
            "k8s.namespace.name=a,service.account=client"
        );
        let tp = req.headers()["traceparent"].to_str().unwrap();
        assert_eq!(tp.len(), 55, "{tp}");
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
    }
}
