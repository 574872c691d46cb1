//! The HTTP request path — routing, header handling, retries with body replay: the input is the
//! client's side of one captured HTTP connection, served in-process by the proxy's own
//! `serve` against a fixed mesh whose two endpoints are HTTP servers in this process (paths
//! containing `fail` get 503, so retries replay request bodies). Must never panic and never hang:
//! the connection ends within a bound once the client has sent everything.
#![no_main]

use std::{net::SocketAddr, sync::Arc, sync::LazyLock, time::Duration};

use drover::{
    proxy::{downstream::Timeouts, http},
    redirect::netns::NetNs,
    registry::RegistryHandle,
    testing,
};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIP: &str = "127.77.0.10:80";

struct Mesh {
    rt: tokio::runtime::Runtime,
    registry: RegistryHandle,
    upstreams: Arc<http::Upstreams>,
    ns: Arc<NetNs>,
}

static MESH: LazyLock<Mesh> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Two endpoints on one port: 127.0.0.2 and 127.0.0.3.
    let first = std::net::TcpListener::bind("127.0.0.2:0").expect("endpoint 1");
    let port = first.local_addr().expect("port").port();
    let second = std::net::TcpListener::bind(("127.0.0.3", port)).expect("endpoint 2");
    for l in [first, second] {
        l.set_nonblocking(true).expect("nonblocking");
        rt.spawn(endpoint(l));
    }
    let yaml = testing::two_endpoint_service("web.default.svc", VIP, ("http", "HTTP"), port)
        + "---\n"
        + r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc
  trafficPolicy:
    connectionPool: {http: {http1MaxPendingRequests: 4, maxRetries: 8}}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 1s}
  subsets:
  - {name: one, labels: {v: one}}
  - name: two
    labels: {v: two}
    trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
"#
        + &testing::virtual_service(
            r#"  - match: [{headers: {x-route: {exact: two}}}]
    route: [{destination: {host: web.default.svc, subset: two}}]
    retries: {attempts: 3, retryOn: 5xx}
  - match: [{uri: {regex: "/r/[a-z]+"}, queryParams: {q: {prefix: a}}}]
    route:
    - {destination: {host: web.default.svc, subset: one}, weight: 50}
    - {destination: {host: web.default.svc, subset: two}, weight: 50}
    timeout: 2s
  - match: [{method: {exact: POST}}]
    route: [{destination: {host: web.default.svc}}]
    retries: {attempts: 2, retryOn: "5xx,reset,connect-failure", perTryTimeout: 1s}
  - route: [{destination: {host: web.default.svc}}]
"#,
        );
    let registry = testing::registry(&yaml);
    let ns = Arc::new(NetNs::current().expect("own netns"));
    Mesh {
        rt,
        registry: RegistryHandle::new(registry),
        upstreams: Arc::new(http::Upstreams::unmarked(ns.clone())),
        ns,
    }
});

/// An HTTP/1.1 and HTTP/2 endpoint: 503 for paths containing `fail`, else 200 with the number of
/// body bytes it read.
async fn endpoint(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let fail = req.uri().path().contains("fail");
                let n = req.into_body().collect().await.map_or(0, |b| b.to_bytes().len());
                let mut resp = hyper::Response::new(Full::new(hyper::body::Bytes::from(n.to_string())));
                if fail {
                    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                }
                Ok::<_, std::convert::Infallible>(resp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fuzz_target!(|data: &[u8]| {
    let m = &*MESH;
    let vip: SocketAddr = VIP.parse().expect("vip");
    let src: SocketAddr = "127.0.0.1:40000".parse().expect("src");
    m.rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(http::serve(
            m.registry.clone(),
            m.upstreams.clone(),
            m.ns.clone(),
            server,
            (Some(src), vip),
            Timeouts {
                request_headers: Duration::from_secs(1),
                idle: Duration::from_secs(1),
            },
        ));
        let (mut r, mut w) = tokio::io::split(client);
        let writer = async {
            let _ = w.write_all(data).await;
            let _ = w.shutdown().await;
        };
        let mut out = Vec::new();
        let reader = r.read_to_end(&mut out);
        let done = tokio::time::timeout(Duration::from_secs(10), async {
            let ((), _) = tokio::join!(writer, reader);
        })
        .await;
        assert!(done.is_ok(), "the connection did not end within 10 s");
        serving.abort();
    });
});
