//! The HTTP path in-process, as a normal user: the proxy's own `serve` on an in-memory client
//! stream, against HTTP endpoints in this process on 127.0.0.2 and 127.0.0.3 (unmarked upstream
//! sockets, no capture, no namespaces). The privileged tier covers the same path through the
//! kernel; this one is fast and needs no root.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Upstreams, serve};
use crate::{
    proxy::downstream::Timeouts,
    redirect::netns::NetNs,
    registry::RegistryHandle,
    testing::{registry, two_endpoint_service, virtual_service},
};

const VIP: &str = "127.77.0.10:80";

/// Size of the body an endpoint answers `/big` with: more than loopback socket buffers hold.
const BIG: usize = 24 << 20;

/// Endpoint `name`: 503 when the path contains `fail-<name>`, [`BIG`] bytes for `/big`, the
/// request target and the connections accepted so far for `/target`, else 200 with
/// `<name>:<body bytes>`.
async fn endpoint(listener: tokio::net::TcpListener, name: &'static str) {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let accepted = accepted.clone();
                    async move {
                        let fail = req.uri().path().contains(&format!("fail-{name}"));
                        if req.uri().path() == "/big" {
                            let big = hyper::body::Bytes::from(vec![b'x'; BIG]);
                            return Ok(hyper::Response::new(Full::new(big)));
                        }
                        if req.uri().path() == "/target" {
                            let n = accepted.load(std::sync::atomic::Ordering::Relaxed);
                            let body = format!("{name}:{} conns={n}", req.uri());
                            return Ok(hyper::Response::new(Full::new(body.into())));
                        }
                        let n = req
                            .into_body()
                            .collect()
                            .await
                            .map_or(0, |b| b.to_bytes().len());
                        let mut resp = hyper::Response::new(Full::new(hyper::body::Bytes::from(
                            format!("{name}:{n}"),
                        )));
                        if fail {
                            *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Mesh {
    registry: RegistryHandle,
    upstreams: Arc<Upstreams>,
    ns: Arc<NetNs>,
}

/// Endpoints `one` (127.0.0.2) and `two` (127.0.0.3) on one port behind `web` at [`VIP`], with
/// `rules` (YAML documents) appended.
async fn mesh(rules: &str) -> Mesh {
    let first = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    let second = tokio::net::TcpListener::bind(("127.0.0.3", port))
        .await
        .unwrap();
    tokio::spawn(endpoint(first, "one"));
    tokio::spawn(endpoint(second, "two"));
    let yaml = two_endpoint_service("web.default.svc", VIP, ("http", "HTTP"), port)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: default}}
spec:
  host: web.default.svc
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets:
  - {{name: one, labels: {{v: one}}}}
  - {{name: two, labels: {{v: two}}}}
{rules}"
        );
    let registry = registry(&yaml);
    let ns = Arc::new(NetNs::current().expect("own netns"));
    Mesh {
        registry: RegistryHandle::new(registry),
        upstreams: Arc::new(Upstreams::unmarked(ns.clone())),
        ns,
    }
}

impl Mesh {
    /// Serves the client connection `server` (from `src`) as captured for [`VIP`].
    fn serve<T>(&self, server: T, src: SocketAddr, timeouts: Timeouts)
    where
        T: super::Peek + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        tokio::spawn(serve(
            self.registry.clone(),
            self.upstreams.clone(),
            self.ns.clone(),
            server,
            (Some(src), VIP.parse().unwrap()),
            timeouts,
        ));
    }

    /// Sends `raw` on one client connection (then half-closes it) and returns all it got back.
    async fn exchange(&self, raw: &str, timeouts: Timeouts) -> String {
        let (client, server) = tokio::io::duplex(64 * 1024);
        self.serve(server, "127.0.0.1:40000".parse().unwrap(), timeouts);
        send_in_parts(client, &[raw]).await
    }

    async fn request(&self, raw: &str) -> String {
        self.exchange(raw, Timeouts::default()).await
    }
}

#[tokio::test]
async fn header_match_routes_to_its_subset() {
    let m = mesh(&virtual_service(
        "  - match: [{headers: {x-route: {exact: two}}}]
    route: [{destination: {host: web.default.svc, subset: two}}]
  - route: [{destination: {host: web.default.svc, subset: one}}]
",
    ))
    .await;
    for _ in 0..4 {
        let r = m
            .request("GET / HTTP/1.1\r\nHost: web\r\nx-route: two\r\nConnection: close\r\n\r\n")
            .await;
        assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("two:0"), "{r}");
        let r = m
            .request("GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await;
        assert!(r.ends_with("one:0"), "{r}");
    }
}

#[tokio::test]
async fn a_503_is_retried_on_the_other_endpoint_with_the_same_body() {
    let m = mesh(&virtual_service(
        "  - route: [{destination: {host: web.default.svc}}]
    retries: {attempts: 2, retryOn: 5xx}
",
    ))
    .await;
    for _ in 0..4 {
        let r = m
            .request(
                "POST /fail-one HTTP/1.1\r\nHost: web\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world",
            )
            .await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("two:11"),
            "{r}"
        );
    }
}

#[tokio::test]
async fn no_matching_route_is_404_nr() {
    let m = mesh(&virtual_service(
        "  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: web.default.svc}}]
",
    ))
    .await;
    let r = m
        .request("GET /other HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert!(r.contains("x-drover-response-flag: NR"), "{r}");
}

#[tokio::test]
async fn a_silent_client_is_closed_by_the_header_timeout() {
    let m = mesh("").await;
    let counter = &crate::stats::store().downstream.rq_header_timeout;
    let before = counter.load(std::sync::atomic::Ordering::Relaxed);
    let (mut client, server) = tokio::io::duplex(1024);
    let timeouts = Timeouts {
        request_headers: Duration::from_millis(200),
        idle: Duration::from_secs(60),
    };
    m.serve(server, "127.0.0.1:40000".parse().unwrap(), timeouts);
    client.write_all(b"GET / HT").await.unwrap();
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
        .await
        .expect("closed by the header timeout")
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "{:?}",
        start.elapsed()
    );
    assert!(counter.load(std::sync::atomic::Ordering::Relaxed) > before);
}

impl Mesh {
    /// One client connection over loopback TCP, served as a captured one is (its protocol
    /// peeked from the socket); returns the client's end.
    async fn tcp_client(&self, timeouts: Timeouts) -> tokio::net::TcpStream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(connect, listener.accept());
        let (server, src) = accepted.unwrap();
        self.serve(server, src, timeouts);
        let client = client.unwrap();
        client.set_nodelay(true).unwrap();
        client
    }
}

/// Writes `parts` one by one (with a pause between them) and returns all the answer.
async fn send_in_parts<C>(mut client: C, parts: &[&str]) -> String
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        client.write_all(part.as_bytes()).await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
        .await
        .expect("the connection ends")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn tcp_clients_are_served_by_the_version_their_first_bytes_name() {
    let m = mesh("").await;
    // HTTP/1.1 in one write: hyper's HTTP/1 server straight away.
    let client = m.tcp_client(Timeouts::default()).await;
    let r = send_in_parts(
        client,
        &["POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"],
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with(":2"), "{r}");
    // A first byte that could still start the HTTP/2 preface: the detecting server reads on.
    let client = m.tcp_client(Timeouts::default()).await;
    let r = send_in_parts(
        client,
        &[
            "P",
            "OST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        ],
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with(":3"), "{r}");
    // HTTP/2 by prior knowledge: the preface peeked whole.
    let client = m.tcp_client(Timeouts::default()).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(client),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("http://web/")
        .body(Full::new(hyper::body::Bytes::from_static(b"four")))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("an HTTP/2 answer")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b":4"), "{body:?}");
}

#[tokio::test]
async fn a_silent_tcp_client_is_closed_by_the_header_timeout() {
    let m = mesh("").await;
    let timeouts = Timeouts {
        request_headers: Duration::from_millis(200),
        idle: Duration::from_secs(60),
    };
    let start = std::time::Instant::now();
    let r = send_in_parts(m.tcp_client(timeouts).await, &[]).await;
    assert!(r.is_empty(), "{r}");
    assert!(start.elapsed() >= Duration::from_millis(150));
}

/// Reads one HTTP/1.1 response with a `content-length` from `client`; returns its head and body.
async fn read_response(client: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                while buf.len() < end + 4 + len {
                    let mut chunk = vec![0u8; 1 << 16];
                    let n = client.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed mid-response");
                    buf.extend_from_slice(&chunk[..n]);
                }
                return (head, buf[end + 4..].to_vec());
            }
            let mut chunk = [0u8; 4096];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a response");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response")
}

/// Longer than a connection stays idle before it is parked.
const PARKED: Duration = Duration::from_millis(600);

#[tokio::test]
async fn an_idle_keep_alive_connection_is_parked_and_serves_the_next_request() {
    let m = mesh("").await;
    let mut client = m.tcp_client(Timeouts::default()).await;
    let parked_total = || {
        let d = &crate::stats::store().downstream;
        d.cx_parked.load(std::sync::atomic::Ordering::Relaxed)
    };
    let parked = parked_total();
    // The second request's first bytes come with the first one: the server reads them ahead,
    // and parking must hand them to the next server.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\nPOST / HTTP/1.1\r\nHost: w")
        .await
        .unwrap();
    let (head, body) = read_response(&mut client).await;
    assert!(
        head.starts_with("http/1.1 200") && body.ends_with(b":0"),
        "{head}"
    );
    tokio::time::sleep(PARKED).await;
    assert!(parked_total() > parked, "not parked");
    client
        .write_all(b"eb\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (head, body) = read_response(&mut client).await;
    assert!(
        head.starts_with("http/1.1 200") && body.ends_with(b":5"),
        "{head}"
    );
    assert!(!head.contains("connection: close"), "{head}");
    // Parked again, then the client closes: the connection ends.
    tokio::time::sleep(PARKED).await;
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("closed after the client")
        .unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn a_connection_is_not_parked_while_its_client_is_slow_to_read() {
    let m = mesh("").await;
    let mut client = m.tcp_client(Timeouts::default()).await;
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    // Nothing read for a while: the response fills the socket buffers and waits.
    tokio::time::sleep(PARKED).await;
    let (head, body) = read_response(&mut client).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body.len(), BIG);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut client).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
}

#[test]
fn upstream_uris_name_the_endpoint_as_display_would() {
    for addr in [
        "0.0.0.0:0",
        "10.0.9.1:9",
        "127.0.0.1:80",
        "198.18.100.255:65535",
        "[::1]:8080",
        "[fd00:d7:1::2]:10",
    ] {
        let addr: SocketAddr = addr.parse().unwrap();
        let uri = super::uri_for(addr, "/a/b?c=d").unwrap();
        assert_eq!(uri.to_string(), format!("http://{addr}/a/b?c=d"));
    }
}

#[test]
fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
    use hyper::header::{HeaderMap, HeaderValue};
    let headers = |pairs: &[(&'static str, &'static str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    };
    let mut h = headers(&[
        ("connection", "keep-alive, X-Private"),
        ("keep-alive", "timeout=5"),
        ("x-private", "1"),
        ("transfer-encoding", "chunked"),
        ("te", "gzip"),
        ("trailer", "x-sum"),
        ("upgrade", "websocket"),
        ("x-kept", "1"),
    ]);
    super::strip_hop_by_hop(&mut h, false);
    let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(left, ["x-kept"]);

    // gRPC's `te: trailers` stays; an upgrade keeps `Connection` and `Upgrade`.
    let mut h = headers(&[
        ("te", "trailers"),
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
    ]);
    super::strip_hop_by_hop(&mut h, true);
    let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(left, ["te", "connection", "upgrade"]);
}

#[tokio::test]
async fn http1_upstream_connections_are_kept_alive_and_sent_origin_form() {
    let m = mesh(&virtual_service(
        "  - route: [{destination: {host: web.default.svc, subset: one}}]\n",
    ))
    .await;
    // Three clients, one after another: one upstream connection carries all three requests,
    // each with the path and query as its target (not the absolute URI the pool dials by).
    for _ in 0..3 {
        let r = m
            .request("GET /target?x=1 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with("one:/target?x=1 conns=1"), "{r}");
    }
}
