//! The composed data path in-process, as a normal user: [`DataPath`] over loopback listeners on
//! port 0 and a [`ByListener`] original-destination source, with real endpoints in this process
//! on 127.0.0.2 and 127.0.0.3 (unmarked upstream sockets, no capture, no namespaces). It covers
//! the L4 relay (`proxy`), HTTP/2 upstream streams (`streams`), TLS origination (`tls`) and
//! routing (`route`) as the daemon composes them; the privileged tier covers the same through
//! the kernel. Each test uses its own host names: counters are kept by cluster name, per
//! process.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

use super::{DataPath, Serving};
use crate::{
    proxy::downstream::{Overload, Timeouts},
    redirect::{ByListener, netns::NetNs},
    registry::RegistryHandle,
    testing::two_endpoint_service,
};

/// Bounds every wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A served data path: where to dial each service VIP, and the registry it routes by.
struct InProcess {
    dial: HashMap<SocketAddr, SocketAddr>,
    registry: RegistryHandle,
    serving: Serving,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.serving.shutdown.cancel();
    }
}

/// Serves `yaml` (TLS files resolved as the daemon does), with one loopback listener per VIP.
async fn serve(yaml: &str, vips: &[&str]) -> InProcess {
    let mut registry = crate::testing::registry(yaml);
    registry
        .originate(&Default::default())
        .expect("TLS files load");
    let ns = Arc::new(NetNs::current().expect("own netns"));
    let (mut routes, mut dial, mut listeners) = (HashMap::new(), HashMap::new(), Vec::new());
    for vip in vips {
        let vip: SocketAddr = vip.parse().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        routes.insert(l.local_addr().unwrap(), vip);
        dial.insert(vip, l.local_addr().unwrap());
        listeners.push((ns.clone(), l));
    }
    let registry = RegistryHandle::new(registry);
    let serving = DataPath {
        views: crate::workload::Views::single(registry.clone()),
        original: Arc::new(ByListener(routes)),
        listeners,
        downstream: Timeouts::default(),
        overload: Overload::new(0, 0),
        mark: false,
    }
    .serve()
    .unwrap();
    assert_eq!(serving.listeners.len(), vips.len());
    InProcess {
        dial,
        registry,
        serving,
    }
}

impl InProcess {
    async fn connect(&self, vip: &str) -> TcpStream {
        let at = self.dial[&vip.parse::<SocketAddr>().unwrap()];
        TcpStream::connect(at).await.unwrap()
    }

    /// The first line a new connection to `vip` gets, or `None` when the proxy closes it.
    async fn greeting(&self, vip: &str) -> Option<String> {
        let mut lines = BufReader::new(self.connect(vip).await).lines();
        tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("an answer or a close")
            .ok()
            .flatten()
    }

    /// A counter of the cluster named `name`.
    fn stat(&self, name: &str, counter: impl Fn(&crate::stats::ClusterStats) -> &AtomicU64) -> u64 {
        let snapshot = self.registry.load();
        let c = snapshot
            .clusters()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"));
        counter(&c.stats).load(Ordering::Relaxed)
    }
}

/// Two endpoints (127.0.0.2 and .3) on one free port, each running `serve(name, connection)`.
async fn endpoints<F, Fut>(serve: F) -> u16
where
    F: Fn(&'static str, TcpStream) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let first = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    let second = TcpListener::bind(("127.0.0.3", port)).await.unwrap();
    for (l, name) in [(first, "one"), (second, "two")] {
        let serve = serve.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(name, s));
            }
        });
    }
    port
}

/// Greets with its name, then echoes.
async fn greeter(name: &'static str, mut s: TcpStream) {
    let _ = s.write_all(format!("{name}\n").as_bytes()).await;
    let mut buf = [0; 1024];
    while let Ok(n @ 1..) = s.read(&mut buf).await {
        let _ = s.write_all(&buf[..n]).await;
    }
}

/// A ServiceEntry `host` at `vip` → both endpoints on `port`, with a DestinationRule's `policy`.
fn service(host: &str, vip: &str, protocol: &str, port: u16, policy: &str) -> String {
    two_endpoint_service(host, vip, ("p", protocol), port)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}, namespace: default}}
spec:
  host: {host}
  trafficPolicy: {policy}
"
        )
}

#[tokio::test]
async fn l4_relays_round_robin_both_ways() {
    let port = endpoints(greeter).await;
    let vip = "127.77.1.1:5000";
    let yaml = service(
        "l4.inproc",
        vip,
        "TCP",
        port,
        "{loadBalancer: {simple: ROUND_ROBIN}}",
    );
    let p = serve(&yaml, &[vip]).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(p.greeting(vip).await.expect("relayed"));
    }
    assert_eq!(seen, ["one", "two", "one", "two"]);

    // Bytes go both ways on one connection.
    let mut s = BufReader::new(p.connect(vip).await);
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    s.get_mut().write_all(b"ping\n").await.unwrap();
    line.clear();
    tokio::time::timeout(WAIT, s.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "ping\n");
}

#[tokio::test]
async fn l4_max_connections_closes_the_overflow_at_once() {
    let port = endpoints(greeter).await;
    let vip = "127.77.1.2:5000";
    let policy = "{connectionPool: {tcp: {maxConnections: 1}}}";
    let p = serve(&service("cap.inproc", vip, "TCP", port, policy), &[vip]).await;
    let mut held = BufReader::new(p.connect(vip).await);
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    assert!(!line.is_empty(), "the first connection is relayed");
    assert_eq!(p.greeting(vip).await, None, "the second is closed");
    let cluster = "outbound|5000||cap.inproc";
    assert_eq!(p.stat(cluster, |s| &s.cx_overflow), 1);
    drop(held);
    // The slot is released with the connection.
    let relayed = async {
        loop {
            if p.greeting(vip).await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, relayed)
        .await
        .expect("relayed again once the first connection closed");
}

#[tokio::test]
async fn unknown_destination_and_dead_endpoints_are_closed() {
    // Nothing listens on this port of the endpoints.
    let dead = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let vip = "127.77.1.3:5000";
    let yaml = service(
        "dead.inproc",
        vip,
        "TCP",
        port,
        "{loadBalancer: {simple: ROUND_ROBIN}}",
    );
    let p = serve(&yaml, &[vip, "127.77.1.4:5000"]).await;
    assert_eq!(p.greeting(vip).await, None, "connect failure closes");
    assert!(p.stat("outbound|5000||dead.inproc", |s| &s.cx_connect_fail) >= 1);
    // A listener whose destination is no service: closed, not guessed.
    assert_eq!(p.greeting("127.77.1.4:5000").await, None);
}

/// An HTTP/2 endpoint: answers each request after 200 ms with its name, the request's
/// `:authority` and how many `Host` headers came beside it; counts connections.
fn h2_endpoint(
    connections: Arc<AtomicU64>,
) -> impl Fn(&'static str, TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
+ Clone
+ Send
+ 'static {
    move |name, s| {
        connections.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| async move {
                let authority = req.uri().authority().map(|a| a.to_string());
                let hosts = req.headers().get_all(hyper::header::HOST).iter().count();
                tokio::time::sleep(Duration::from_millis(200)).await;
                let body = format!("{name} {} {hosts}", authority.unwrap_or_default());
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::from(body),
                )))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                .await;
        })
    }
}

/// `n` concurrent HTTP/1.1 requests with `Host: h2.inproc`, one per client connection: their
/// statuses and bodies.
async fn concurrent_gets(p: &InProcess, vip: &str, n: usize) -> Vec<(u16, String)> {
    let at = p.dial[&vip.parse::<SocketAddr>().unwrap()];
    let mut gets = tokio::task::JoinSet::new();
    for _ in 0..n {
        gets.spawn(async move {
            let s = TcpStream::connect(at).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get("/")
                .header("host", "h2.inproc")
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap();
            let resp = tokio::time::timeout(WAIT, send.send_request(req))
                .await
                .unwrap()
                .unwrap();
            let status = resp.status().as_u16();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            (status, body)
        });
    }
    gets.join_all().await
}

#[tokio::test]
async fn http2_upstream_multiplexes_carries_the_authority_and_max_concurrent_streams_spreads() {
    let shared = Arc::new(AtomicU64::new(0));
    let port = endpoints(h2_endpoint(shared.clone())).await;
    let (vip, capped) = ("127.77.1.5:80", "127.77.1.6:80");
    let one_endpoint = "{loadBalancer: {simple: ROUND_ROBIN}}";
    let yaml = service("h2.inproc", vip, "HTTP2", port, one_endpoint)
        + "---\n"
        + &service(
            "h2cap.inproc",
            capped,
            "HTTP2",
            port,
            "{connectionPool: {http: {maxConcurrentStreams: 1}}}",
        );
    // One endpoint each, so connection counts are per endpoint.
    let yaml = yaml.replace("  - {address: 127.0.0.3, labels: {v: two}}\n", "");
    let p = serve(&yaml, &[vip, capped]).await;

    // The client's Host travels as :authority, with no Host header beside it (RFC 9113).
    let ok = (200, "one h2.inproc 0".to_string());
    assert_eq!(concurrent_gets(&p, vip, 4).await, vec![ok.clone(); 4]);
    assert_eq!(
        shared.load(Ordering::Relaxed),
        1,
        "four concurrent requests share one HTTP/2 connection"
    );
    let before = shared.load(Ordering::Relaxed);
    assert_eq!(concurrent_gets(&p, capped, 4).await, vec![ok; 4]);
    let opened = shared.load(Ordering::Relaxed) - before;
    assert!(
        opened >= 2,
        "maxConcurrentStreams 1 spreads concurrent requests over connections ({opened})"
    );
}

/// A TLS endpoint with `cert`: greets with the SNI the client sent.
fn tls_endpoint(
    config: Arc<rustls::ServerConfig>,
) -> impl Fn(&'static str, TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
+ Clone
+ Send
+ 'static {
    move |_name, s| {
        let acceptor = tokio_rustls::TlsAcceptor::from(config.clone());
        Box::pin(async move {
            if let Ok(mut tls) = acceptor.accept(s).await {
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let _ = tls.write_all(format!("sni={sni}\n").as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        })
    }
}

#[tokio::test]
async fn simple_tls_origination_verifies_the_server_and_sends_sni() {
    let dir = std::env::temp_dir().join(format!("drover-inproc-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = crate::mesh::init(&dir).unwrap();
    let ca = crate::mesh::Ca::load(&dir).unwrap();
    let (cert, key) = ca
        .issue(
            "spiffe://cluster.local/ns/default/sa/server",
            &["secure.inproc".into()],
            Duration::from_secs(3600),
        )
        .unwrap();
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let port = endpoints(tls_endpoint(Arc::new(config))).await;
    let (good, wrong) = ("127.77.1.7:443", "127.77.1.8:443");
    let root = root.display();
    let yaml = service(
        "secure.inproc",
        good,
        "TCP",
        port,
        &format!("{{tls: {{mode: SIMPLE, caCertificates: {root}, sni: secure.inproc}}}}"),
    ) + "---\n"
        + &service(
            "wrong.inproc",
            wrong,
            "TCP",
            port,
            &format!(
                "{{tls: {{mode: SIMPLE, caCertificates: {root}, sni: secure.inproc, subjectAltNames: [other.inproc]}}}}"
            ),
        );
    let p = serve(&yaml, &[good, wrong]).await;
    assert_eq!(p.greeting(good).await.as_deref(), Some("sni=secure.inproc"));
    assert_eq!(
        p.stat("outbound|443||secure.inproc", |s| &s.ssl_handshake),
        1
    );
    assert_eq!(
        p.greeting(wrong).await,
        None,
        "a server outside subjectAltNames gets no bytes"
    );
    assert_eq!(
        p.stat("outbound|443||wrong.inproc", |s| &s.ssl_fail_verify_san),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Relays each connection to the HTTP/2 endpoint at `to` until `frozen` is set, then stops
/// forwarding (a peer that has gone silent) and sets `closed` once the daemon closes its side.
fn freezing_relay(
    to: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    closed: Arc<std::sync::atomic::AtomicBool>,
) -> impl Fn(&'static str, TcpStream) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
+ Clone
+ Send
+ 'static {
    move |_, mut daemon_side| {
        let (frozen, closed) = (frozen.clone(), closed.clone());
        Box::pin(async move {
            let Ok(mut server) = TcpStream::connect(to).await else {
                return;
            };
            let (mut a, mut b) = ([0u8; 16384], [0u8; 16384]);
            loop {
                if frozen.load(Ordering::Relaxed) {
                    // Silent: read nothing more from the server, answer nothing; only notice
                    // when the daemon gives up on the connection.
                    let gone = matches!(daemon_side.read(&mut a).await, Ok(0) | Err(_));
                    if gone {
                        closed.store(true, Ordering::Relaxed);
                        return;
                    }
                    continue;
                }
                tokio::select! {
                    r = daemon_side.read(&mut a) => match r {
                        Ok(n @ 1..) if !frozen.load(Ordering::Relaxed) => {
                            let _ = server.write_all(&a[..n]).await;
                        }
                        Ok(1..) => {}
                        _ => { closed.store(true, Ordering::Relaxed); return; }
                    },
                    r = server.read(&mut b) => match r {
                        Ok(n @ 1..) => { let _ = daemon_side.write_all(&b[..n]).await; }
                        _ => return,
                    },
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        })
    }
}

#[tokio::test]
async fn http2_keepalive_closes_a_connection_whose_peer_stops_answering() {
    // The real HTTP/2 server, reached only through the relay.
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let to = server.local_addr().unwrap();
    let h2 = h2_endpoint(Arc::new(AtomicU64::new(0)));
    tokio::spawn(async move {
        while let Ok((s, _)) = server.accept().await {
            tokio::spawn(h2("one", s));
        }
    });
    let (frozen, closed) = (
        Arc::default(),
        Arc::<std::sync::atomic::AtomicBool>::default(),
    );
    let port = endpoints(freezing_relay(to, Arc::clone(&frozen), Arc::clone(&closed))).await;
    let pinged = "127.77.1.9:80";
    let yaml = service(
        "keepalive.inproc",
        pinged,
        "HTTP2",
        port,
        "{connectionPool: {http: {http2KeepAlive: {interval: 200ms, timeout: 200ms}}}}",
    )
    .replace("  - {address: 127.0.0.3, labels: {v: two}}\n", "");
    let p = serve(&yaml, &[pinged]).await;
    let ok = (200, "one h2.inproc 0".to_string());
    assert_eq!(concurrent_gets(&p, pinged, 1).await, vec![ok]);
    frozen.store(true, Ordering::Relaxed);
    // A ping goes unanswered: within interval + timeout (plus scheduling) the daemon closes it.
    let start = std::time::Instant::now();
    while !closed.load(Ordering::Relaxed) {
        assert!(
            start.elapsed() < WAIT,
            "the silent connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn grpc_fault_abort_is_a_trailers_only_reply() {
    let shared = Arc::new(AtomicU64::new(0));
    let port = endpoints(h2_endpoint(shared.clone())).await;
    let vip = "127.77.1.11:80";
    let yaml = service(
        "grpcfault.inproc",
        vip,
        "GRPC",
        port,
        "{loadBalancer: {simple: ROUND_ROBIN}}",
    ) + "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: grpcfault, namespace: default}
spec:
  hosts: [grpcfault.inproc]
  http:
  - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: grpcfault.inproc}}]
";
    let p = serve(&yaml, &[vip]).await;
    let s = TcpStream::connect(p.dial[&vip.parse::<SocketAddr>().unwrap()])
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/drover.test.Echo/Unary")
        .header("host", "grpcfault.inproc")
        .header("content-type", "application/grpc")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    // Envoy's gRPC abort: HTTP 200, the status in grpc-status, nothing reaches the endpoint.
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(shared.load(Ordering::Relaxed), 0);
}
