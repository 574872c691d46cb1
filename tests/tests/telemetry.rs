//! Istio's standard metrics as their real consumer reads them: Debian's Prometheus scrapes two
//! daemons (a client node capturing `productpage-v1`'s namespace, a server node terminating
//! mTLS for `db-v1`) and answers the queries Kiali's graph and the Istio dashboards make, after
//! a known traffic mix through the kernel capture path: 200s from `reviews-v1`, 503s from
//! `reviews-v2`, and TCP connections and HTTP requests to `db` over ISTIO_MUTUAL (the server
//! node counts those with `reporter="destination"`).

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    time::Duration,
};

use drover_tests::{
    Daemon, PinDir, Pki, Proc, Topology, VIP, probe, prometheus::Prometheus, require_privileged,
    write_config,
};

const DB_VIP: &str = "127.77.0.20";

/// productpage-v1 (the client namespace), reviews-v1/v2 (HTTP, ep1/ep2), db-v1 (TCP and an
/// HTTP API, ep3).
fn bookinfo(t: &Topology) -> String {
    bookinfo_with(t, "ISTIO_MUTUAL")
}

/// [`bookinfo`] with `db_tls` as db's TLS mode.
fn bookinfo_with(t: &Topology, db_tls: &str) -> String {
    // The client's address facing db's node: as a pod's one IP, it names the workload on
    // both sides (the server node sees connections come from it).
    let (client, r1, r2, db) = (
        Topology::client4(3),
        Topology::ep4(1),
        Topology::ep4(2),
        Topology::ep4(3),
    );
    let _ = t;
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  addresses: [{VIP}]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{app: reviews}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v1, namespace: demo}}
spec: {{address: {r1}, serviceAccount: bookinfo-reviews, labels: {{app: reviews, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v2, namespace: demo}}
spec: {{address: {r2}, serviceAccount: bookinfo-reviews, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: productpage-v1, namespace: demo}}
spec: {{address: {client}, serviceAccount: bookinfo-productpage, labels: {{app: productpage, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: demo}}
spec:
  host: reviews.demo.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  http:
  - match: [{{headers: {{x-version: {{exact: v2}}}}}}]
    route: [{{destination: {{host: reviews.demo.svc.cluster.local, subset: v2}}}}]
    retries: {{attempts: 0}}
  - route: [{{destination: {{host: reviews.demo.svc.cluster.local, subset: v1}}}}]
    retries: {{attempts: 0}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: demo}}
spec:
  hosts: [db.demo.svc.cluster.local]
  addresses: [{DB_VIP}]
  ports:
  - {{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}
  - {{number: 8080, name: http-api, protocol: HTTP, targetPort: 9080}}
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{app: db}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: db-v1, namespace: demo}}
spec: {{address: {db}, serviceAccount: db, labels: {{app: db, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: demo}}
spec:
  host: db.demo.svc.cluster.local
  trafficPolicy: {{tls: {{mode: {db_tls}}}}}
"
    )
}

fn daemon(cfg: &std::path::Path, mesh: &str, args: &[&str]) -> (Daemon, PinDir) {
    let pins = PinDir::new();
    let mut extra = vec!["--mesh-ca", mesh];
    extra.extend(args);
    let a = drover_tests::args(cfg, &pins, &extra);
    (Daemon::start(&a).expect("daemon starts"), pins)
}

/// reviews-v1 (ep1), reviews-v2 answering 503 (ep2), db-v1's echo (7000) and HTTP API (9080).
fn servers(t: &Topology) -> Vec<Proc> {
    let http = |i: usize, name: &str, extra: &[&str]| {
        let addr = SocketAddr::new(Topology::ep4(i + 1), 9080);
        Proc::server_with(Some(&t.endpoints[i]), "http", &[addr], name, extra)
    };
    vec![
        http(0, "reviews-v1", &[]),
        http(1, "reviews-v2", &["--status", "503"]),
        Proc::server(
            Some(&t.endpoints[2]),
            "echo",
            &[SocketAddr::new(Topology::ep4(3), 7000)],
            "db-v1",
        ),
        http(2, "db-v1", &[]),
    ]
}

/// The node of db-v1: terminates mTLS for its namespace, ports 7000 and 9080 (whose requests it
/// counts one by one).
fn db_node(t: &Topology, cfg: &std::path::Path, mesh: &str) -> (Daemon, PinDir) {
    let args = [
        "--inbound-http-metrics",
        "--inbound-netns",
        &t.endpoints[2].name,
        "--inbound-port",
        "7000",
        "--inbound-port",
        "9080",
        "--client-workload",
        "demo/db-v1",
        "--client-namespace",
        "demo",
        "--service-account",
        "db",
    ];
    daemon(cfg, mesh, &args)
}

/// The one value of a single-series answer.
fn value(samples: &[drover_tests::prometheus::Sample]) -> f64 {
    assert_eq!(samples.len(), 1, "{samples:?}");
    samples[0].value
}

#[test]
fn kiali_and_istio_dashboard_queries_see_each_workload_pair_with_its_counts() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let mesh = pki.mesh_ca();
    let t = Topology::new(3);
    let _servers = servers(&t);
    let cfg = write_config(&bookinfo(&t));
    let (client, _client_pins) = daemon(&cfg, &mesh, &["--netns", &t.client.name]);
    let (server, _server_pins) = db_node(&t, &cfg, &mesh);
    let prom = Prometheus::scraping(&[client.admin.unwrap(), server.admin.unwrap()]);

    // The traffic mix: 12 × 200 from v1, 8 × 503 from v2, 5 TCP connections and 6 HTTP
    // requests to db over mTLS.
    traffic_mix(
        &t.client,
        &format!("http://{VIP}:9080/"),
        format!("{DB_VIP}:80").parse().unwrap(),
    );
    let api = probe(
        Some(&t.client),
        None,
        &["http", &format!("http://{DB_VIP}:8080/"), "--count", "6"],
    );
    assert_eq!(api["status"]["200"], 6, "{api}");

    // Kiali's workload graph reads `istio_requests_total{reporter="source"}` of a namespace,
    // grouped by both workloads and the response (kiali/kiali, business/graph telemetry
    // istio appender: `sum(rate(istio_requests_total{reporter="source",
    // source_workload_namespace="demo"} [..])) by (source_workload_namespace, source_workload,
    // source_canonical_service, source_canonical_revision, destination_service_namespace,
    // destination_service, destination_workload_namespace, destination_workload,
    // destination_canonical_service, destination_canonical_revision, request_protocol,
    // response_code, grpc_response_status, response_flags)`). Totals rather than rates, so
    // that the values are exact.
    let by = "source_workload_namespace,source_workload,source_canonical_service,\
              source_canonical_revision,destination_service_namespace,destination_service,\
              destination_workload_namespace,destination_workload,destination_canonical_service,\
              destination_canonical_revision,request_protocol,response_code,grpc_response_status,\
              response_flags";
    let graph = format!(
        "sum(istio_requests_total{{reporter=\"source\",source_workload_namespace=\"demo\"}}) by ({by})"
    );
    let edges = prom.query_until(&graph, Duration::from_secs(20), |s| {
        s.iter().map(|s| s.value).sum::<f64>() >= 26.0
    });
    assert!(prom.targets_up(), "{}", prom.targets());
    // What the README shows (`--nocapture`).
    #[expect(clippy::print_stdout, reason = "the README quotes this answer")]
    for e in &edges {
        let l = |k: &str| e.labels[k].as_str().unwrap_or_default().to_string();
        println!(
            "{} -> {} ({}) code={} flags={} value={}",
            l("source_workload"),
            l("destination_workload"),
            l("destination_service"),
            l("response_code"),
            l("response_flags"),
            e.value
        );
    }
    let edge = |workload: &str, code: &str| {
        edges
            .iter()
            .find(|s| {
                s.labels["destination_workload"] == workload && s.labels["response_code"] == code
            })
            .unwrap_or_else(|| panic!("{workload} {code} in {edges:?}"))
            .clone()
    };
    let v1 = edge("reviews-v1", "200");
    assert_eq!(v1.value, 12.0);
    for (label, want) in [
        ("source_workload", "productpage-v1"),
        ("source_canonical_service", "productpage"),
        ("source_canonical_revision", "v1"),
        ("destination_service", "reviews.demo.svc.cluster.local"),
        ("destination_service_namespace", "demo"),
        ("destination_canonical_service", "reviews"),
        ("destination_canonical_revision", "v1"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ] {
        assert_eq!(v1.labels[label], want, "{label}: {v1:?}");
    }
    assert_eq!(edge("reviews-v2", "503").value, 8.0);
    assert_eq!(edge("db-v1", "200").value, 6.0);
    assert_eq!(edges.len(), 3, "no other edge: {edges:?}");

    // The same requests as the server node reports them (Kiali reads the destination side for
    // edges from outside the mesh and for mTLS badges; the Istio workload dashboard's inbound
    // panels read `reporter="destination"` by `source_workload` and
    // `connection_security_policy`).
    let inbound = prom.query_until(
        "sum(istio_requests_total{reporter=\"destination\",destination_workload=\"db-v1\"}) by (source_workload,source_principal,destination_service,destination_canonical_revision,connection_security_policy,request_protocol,response_code,response_flags)",
        Duration::from_secs(20),
        |s| s.first().is_some_and(|s| s.value >= 6.0),
    );
    assert_eq!(value(&inbound), 6.0, "{inbound:?}");
    for (label, want) in [
        ("source_workload", "productpage-v1"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/demo/sa/bookinfo-productpage",
        ),
        ("destination_service", "db.demo.svc.cluster.local"),
        ("destination_canonical_revision", "v1"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("response_flags", "-"),
    ] {
        assert_eq!(inbound[0].labels[label], want, "{label}: {inbound:?}");
    }
    let sizes =
        prom.query("sum(istio_response_bytes_sum{destination_workload=\"db-v1\"}) by (reporter)");
    assert_eq!(
        sizes.len(),
        2,
        "both sides count the response bytes: {sizes:?}"
    );
    assert!(sizes.iter().all(|s| s.value > 0.0), "{sizes:?}");

    // Kiali's TCP edges read `istio_tcp_sent_bytes_total` from the destination for sources it
    // knows; the Istio TCP panels read `istio_tcp_received_bytes_total` and the connection
    // counts by `connection_security_policy`.
    let opened = prom.query_until(
        "sum(istio_tcp_connections_opened_total{reporter=\"destination\",destination_workload=\"db-v1\"}) by (source_workload,source_principal,destination_service,connection_security_policy)",
        Duration::from_secs(20),
        |s| s.first().is_some_and(|s| s.value >= 5.0),
    );
    assert_eq!(value(&opened), 5.0, "{opened:?}");
    let db = &opened[0].labels;
    assert_eq!(db["source_workload"], "productpage-v1", "{db:?}");
    assert_eq!(
        db["source_principal"],
        "spiffe://cluster.local/ns/demo/sa/bookinfo-productpage"
    );
    assert_eq!(db["destination_service"], "db.demo.svc.cluster.local");
    assert_eq!(db["connection_security_policy"], "mutual_tls");
    let received = prom.query(
        "sum(istio_tcp_received_bytes_total{reporter=\"destination\",destination_workload=\"db-v1\"})",
    );
    assert_eq!(value(&received), 25.0, "5 × \"ping\\n\"");
    let sent_by_source = prom.query_until(
        "sum(istio_tcp_received_bytes_total{reporter=\"source\",destination_workload=\"db-v1\"})",
        Duration::from_secs(10),
        |s| s.first().is_some_and(|s| s.value >= 25.0),
    );
    assert_eq!(
        value(&sent_by_source),
        25.0,
        "the client side counts the same bytes"
    );

    // The Istio service dashboard: request volume, success rate (non-5xx) and latency of a
    // service (istio/istio, manifests/addons/dashboards/istio-service-dashboard: `sum(irate(
    // istio_requests_total{reporter=~"$qrep",destination_service=~"$service"}[5m]))`, the same
    // with `response_code!~"5.*"` over it, `histogram_quantile(0.50, sum(irate(
    // istio_request_duration_milliseconds_bucket{…}[1m])) by (le))`), on totals.
    let svc = "reporter=\"source\",destination_service=~\"reviews.demo.svc.cluster.local\"";
    let volume = prom.query(&format!("sum(istio_requests_total{{{svc}}})"));
    assert_eq!(value(&volume), 20.0);
    let success = prom.query(&format!(
        "sum(istio_requests_total{{{svc},response_code!~\"5.*\"}}) / sum(istio_requests_total{{{svc}}})"
    ));
    assert!((value(&success) - 0.6).abs() < 1e-9, "{success:?}");
    let p50 = prom.query(&format!(
        "histogram_quantile(0.50, sum(istio_request_duration_milliseconds_bucket{{{svc}}}) by (le))"
    ));
    let p50 = value(&p50);
    assert!(p50 > 0.0 && p50 <= 1000.0, "p50 {p50} ms");
    let sizes = prom.query(&format!("sum(istio_response_bytes_count{{{svc}}})"));
    assert_eq!(value(&sizes), 20.0);
}

/// Sends the traffic mix of these tests through `ns`: 12 requests to `http` (routed to v1), 8
/// with `x-version: v2` (routed to v2, which answers 503), and 5 connections to `tcp` that read
/// db's greeting, send `ping\n` and read its echo.
fn traffic_mix(ns: &drover_tests::Netns, http: &str, tcp: SocketAddr) {
    let ok = probe(Some(ns), None, &["http", http, "--count", "12"]);
    assert_eq!(ok["status"]["200"], 12, "{ok}");
    let failed = probe(
        Some(ns),
        None,
        &["http", http, "--count", "8", "--header", "x-version: v2"],
    );
    assert_eq!(failed["status"]["503"], 8, "{failed}");
    for _ in 0..5 {
        let c = ns.connect(tcp, None).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(&c);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("hello from db-v1"), "{line}");
        (&c).write_all(b"ping\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
}

/// Envoy 1.40 as the client's sidecar would be configured for the same routes: `x-version: v2`
/// to reviews-v2, the rest to reviews-v1, db by TCP proxy; admin on 15124.
fn sidecar_envoy() -> String {
    let cluster = |name: &str, addr: std::net::IpAddr, port: u16| {
        format!(
            "  - name: {name}
    type: STATIC
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {addr}, port_value: {port}}}}}}}}}]}}]
"
        )
    };
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15124}}}}}}
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: 15123}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: reviews
              domains: ['*']
              routes:
              - match: {{prefix: /, headers: [{{name: x-version, string_match: {{exact: v2}}}}]}}
                route: {{cluster: reviews-v2}}
              - match: {{prefix: /}}
                route: {{cluster: reviews-v1}}
  - address: {{socket_address: {{address: 127.0.0.1, port_value: 15125}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: db
          cluster: db
  clusters:
{}{}{}",
        cluster("reviews-v1", Topology::ep4(1), 9080),
        cluster("reviews-v2", Topology::ep4(2), 9080),
        cluster("db", Topology::ep4(3), 7000),
    )
}

#[test]
fn the_standard_metrics_count_what_an_envoy_sidecar_counts_for_the_same_traffic() {
    if !require_privileged() {
        return;
    }
    // The goal's reference: Kiali's edges and rates within 2 % of a sidecar mesh's. Istio's
    // stats filter is not in upstream Envoy, so the sidecar's counts are read from the
    // counters it derives them from: per-cluster requests by code, connections and bytes.
    let Some(bin) = drover_tests::envoy::bin() else {
        return;
    };
    let t = Topology::new(3);
    let _servers = servers(&t);
    // The sidecar first, alone in the client namespace.
    let dir = Pki::new();
    let envoy =
        drover_tests::envoy::Envoy::start(&bin, &t.client, &dir.dir, "sidecar", &sidecar_envoy());
    // Its HTTP listener (a connection to the TCP one would reach db and be counted).
    envoy.wait_listening(&t.client, "127.0.0.1:15123".parse().unwrap());
    traffic_mix(
        &t.client,
        "http://127.0.0.1:15123/",
        "127.0.0.1:15125".parse().unwrap(),
    );
    let stats = t
        .client
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:15124/stats?filter=^cluster\\.",
        ])
        .output()
        .expect("curl envoy admin");
    let stats = String::from_utf8_lossy(&stats.stdout).to_string();
    drop(envoy);
    let envoy_stat = |name: &str| -> f64 {
        (stats.lines())
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };

    // Then Drover, capturing the same namespace, for the same traffic.
    let pins = PinDir::new();
    let cfg = write_config(&bookinfo_with(&t, "DISABLE"));
    let a = drover_tests::args(&cfg, &pins, &["--netns", &t.client.name]);
    let drover = Daemon::start(&a).expect("daemon starts");
    let prom = Prometheus::scraping(&[drover.admin.unwrap()]);
    traffic_mix(
        &t.client,
        &format!("http://{VIP}:9080/"),
        format!("{DB_VIP}:80").parse().unwrap(),
    );
    let requests = prom.query_until(
        "sum(istio_requests_total{reporter=\"source\"}) by (destination_workload,response_code)",
        Duration::from_secs(20),
        |s| s.iter().map(|s| s.value).sum::<f64>() >= 20.0,
    );
    let drover_requests = |workload: &str, code: &str| -> f64 {
        (requests.iter())
            .find(|s| {
                s.labels["destination_workload"] == workload && s.labels["response_code"] == code
            })
            .map_or(0.0, |s| s.value)
    };
    let tcp = |metric: &str| -> f64 {
        let q = format!("sum({metric}{{reporter=\"source\",destination_workload=\"db-v1\"}})");
        let got = prom.query_until(&q, Duration::from_secs(20), |s| {
            s.first().is_some_and(|s| s.value > 0.0)
        });
        value(&got)
    };
    let pairs = [
        (
            "reviews-v1 200",
            drover_requests("reviews-v1", "200"),
            envoy_stat("cluster.reviews-v1.upstream_rq_200"),
        ),
        (
            "reviews-v2 503",
            drover_requests("reviews-v2", "503"),
            envoy_stat("cluster.reviews-v2.upstream_rq_503"),
        ),
        (
            "db connections",
            tcp("istio_tcp_connections_opened_total"),
            envoy_stat("cluster.db.upstream_cx_total"),
        ),
        (
            "db bytes from the client",
            tcp("istio_tcp_received_bytes_total"),
            envoy_stat("cluster.db.upstream_cx_tx_bytes_total"),
        ),
        (
            "db bytes to the client",
            tcp("istio_tcp_sent_bytes_total"),
            envoy_stat("cluster.db.upstream_cx_rx_bytes_total"),
        ),
    ];
    #[expect(clippy::print_stdout, reason = "the closing note quotes this table")]
    for (what, ours, envoy) in &pairs {
        println!("{what:>28}: drover {ours} envoy {envoy}");
    }
    for (what, ours, envoy) in pairs {
        assert!(envoy > 0.0, "{what}: envoy counted nothing\n{stats}");
        assert!(
            (ours - envoy).abs() <= 0.02 * envoy,
            "{what}: drover {ours}, envoy {envoy}\n{requests:?}\n{stats}"
        );
    }
}

#[test]
fn a_long_tcp_connection_is_reported_every_reporting_interval_while_it_runs() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let mesh = pki.mesh_ca();
    let t = Topology::new(3);
    let _servers = servers(&t);
    // Reported every second instead of Istio's 5 s default, mesh-wide.
    let interval = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  metrics: [{reportingInterval: 1s}]
";
    let cfg = write_config(&format!("{}{interval}", bookinfo(&t)));
    let (client, _client_pins) = daemon(&cfg, &mesh, &["--netns", &t.client.name]);
    let (server, _server_pins) = db_node(&t, &cfg, &mesh);
    let prom = Prometheus::scraping(&[client.admin.unwrap(), server.admin.unwrap()]);
    let c = t
        .client
        .connect(format!("{DB_VIP}:80").parse().unwrap(), None)
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(&c);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("hello from db-v1"), "{line}");
    (&c).write_all(b"ping\n").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();

    // Still open: both sides have counted it opened and its 5 bytes, neither closed it.
    let by_reporter =
        |metric: &str| format!("sum({metric}{{destination_workload=\"db-v1\"}}) by (reporter)");
    let both = |want: f64| {
        move |s: &[drover_tests::prometheus::Sample]| {
            s.len() == 2 && s.iter().all(|s| s.value == want)
        }
    };
    let received = prom.query_until(
        &by_reporter("istio_tcp_received_bytes_total"),
        Duration::from_secs(20),
        both(5.0),
    );
    assert!(
        both(5.0)(&received),
        "{received:?}\n{}\n{}",
        client.log(),
        server.log()
    );
    let opened = prom.query(&by_reporter("istio_tcp_connections_opened_total"));
    assert!(both(1.0)(&opened), "{opened:?}");
    let closed = prom.query(&by_reporter("istio_tcp_connections_closed_total"));
    assert!(both(0.0)(&closed), "not closed yet: {closed:?}");

    // Closed: counted closed once per side, each byte still counted once.
    c.shutdown(std::net::Shutdown::Both).unwrap();
    drop(r);
    let closed = prom.query_until(
        &by_reporter("istio_tcp_connections_closed_total"),
        Duration::from_secs(20),
        both(1.0),
    );
    assert!(both(1.0)(&closed), "{closed:?}");
    let received = prom.query(&by_reporter("istio_tcp_received_bytes_total"));
    assert!(both(5.0)(&received), "{received:?}");
}

/// productpage (the client namespace) → front (ep1, captured too, forwarding to back) → back.
/// The endpoint namespaces reach only the client's, so back listens there, on the address
/// facing ep1; productpage is named by the client's other address (listed first, so that the
/// client namespace is productpage).
fn two_hops() -> String {
    let (client, front, back) = (Topology::client4(2), Topology::ep4(1), Topology::client4(1));
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: front, namespace: demo}}
spec:
  hosts: [front.demo.svc.cluster.local]
  addresses: [{VIP}]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: front}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: back, namespace: demo}}
spec:
  hosts: [back.demo.svc.cluster.local]
  addresses: [{BACK_VIP}]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: back}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: productpage-v1, namespace: demo}}
spec: {{address: {client}, labels: {{app: productpage, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: front-v1, namespace: demo}}
spec: {{address: {front}, labels: {{app: front, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: back-v1, namespace: demo}}
spec: {{address: {back}, labels: {{app: back, version: v1}}}}
"
    )
}

const BACK_VIP: &str = "127.77.0.30";

#[test]
fn a_request_through_two_drover_hops_is_one_trace_exported_over_otlp_grpc_and_http() {
    if !require_privileged() {
        return;
    }
    let t = Topology::new(2);
    let _servers = [
        Proc::server_with(
            Some(&t.endpoints[0]),
            "http",
            &[SocketAddr::new(Topology::ep4(1), 9080)],
            "front",
            &["--forward", &format!("http://{BACK_VIP}:9080/")],
        ),
        Proc::server(
            Some(&t.client),
            "http",
            &[SocketAddr::new(Topology::client4(1), 9080)],
            "back",
        ),
    ];
    let cfg = write_config(&two_hops());
    let otlp = drover_tests::otlp::Receiver::start();
    let url = format!("http://{VIP}:9080/");
    let args = |endpoint: String, protocol: &str| -> Vec<String> {
        [
            "--config",
            &cfg.display().to_string(),
            "--netns",
            &t.client.name,
            "--netns",
            &t.endpoints[0].name,
            "--trace-sampling",
            "100",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let pins = PinDir::new();
    let with_pins = |mut a: Vec<String>| {
        a.extend(["--pin-dir".to_string(), pins.path.display().to_string()]);
        a
    };
    let daemon = Daemon::start(&with_pins(args(format!("http://{}", otlp.grpc), "grpc")))
        .expect("daemon starts");

    // A new trace: two CLIENT spans, the second hop's parented on the first.
    let r = probe(Some(&t.client), None, &["http", &url]);
    assert_eq!(r["status"]["200"], 1, "{r}\n{}", daemon.log());
    let spans = otlp.wait(2, Duration::from_secs(10));
    assert_eq!(spans.len(), 2, "{spans:#?}\n{}", daemon.log());
    let first = spans
        .iter()
        .find(|s| s.name == "front.demo.svc.cluster.local:9080/*")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    let second = spans
        .iter()
        .find(|s| s.name == "back.demo.svc.cluster.local:9080/*")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(first.trace_id, second.trace_id, "one trace");
    assert_eq!(second.parent_span_id, first.span_id, "parent and child");
    assert_eq!(first.parent_span_id, "", "the root");
    assert_eq!((first.kind, second.kind), (3, 3), "CLIENT spans");
    assert_eq!(first.service, "productpage.demo");
    assert_eq!(second.service, "front.demo");
    for (key, want) in [
        ("http.status_code", "200"),
        ("http.method", "GET"),
        ("response_flags", "-"),
        (
            "upstream_cluster",
            "outbound|9080||front.demo.svc.cluster.local",
        ),
        ("peer.workload", "front-v1"),
        ("peer.namespace", "demo"),
        ("istio.canonical_service", "productpage"),
    ] {
        assert_eq!(first.attributes[key], want, "{key}: {first:#?}");
    }
    assert_eq!(
        first.attributes["guid:x-request-id"], second.attributes["guid:x-request-id"],
        "the request id the application passed on"
    );

    // An incoming `traceparent` is honoured: its trace, its span as the first hop's parent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let traceparent = format!("traceparent: 00-{trace}-{parent}-01");
    let r = probe(
        Some(&t.client),
        None,
        &["http", &url, "--header", &traceparent],
    );
    assert_eq!(r["status"]["200"], 1, "{r}");
    let spans = otlp.wait(4, Duration::from_secs(10));
    let continued: Vec<_> = spans.iter().filter(|s| s.trace_id == trace).collect();
    assert_eq!(continued.len(), 2, "{spans:#?}");
    assert!(
        continued.iter().any(|s| s.parent_span_id == parent),
        "{continued:#?}"
    );
    drop(daemon);

    // The same over OTLP/HTTP.
    let daemon = Daemon::start(&with_pins(args(
        format!("http://{}/v1/traces", otlp.http),
        "http",
    )))
    .expect("daemon starts");
    let r = probe(Some(&t.client), None, &["http", &url]);
    assert_eq!(r["status"]["200"], 1, "{r}");
    let spans = otlp.wait(6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}\n{}", daemon.log());
}

/// The mesh's Telemetry (root namespace): every new trace sampled and tagged, access-log lines
/// for failures only, and Istio's standard metrics without the duration histogram and without
/// `response_flags` on the request count.
const MESH_TELEMETRY: &str = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - randomSamplingPercentage: 100
    customTags:
      team: {literal: {value: checkout}}
      tenant: {header: {name: x-tenant, defaultValue: none}}
      region: {environment: {name: DROVER_TEST_UNSET_REGION, defaultValue: local}}
  metrics:
  - overrides:
    - match: {metric: REQUEST_DURATION}
      disabled: true
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides:
        response_flags: {operation: REMOVE}
        request_host: {value: request.host}
  accessLogging:
  - filter: {expression: 'response.code >= 500'}
";

#[test]
fn a_telemetry_resource_samples_tags_filters_the_log_and_overrides_metrics() {
    if !require_privileged() {
        return;
    }
    let t = Topology::new(2);
    let _servers = [
        Proc::server(
            Some(&t.endpoints[0]),
            "http",
            &[SocketAddr::new(Topology::ep4(1), 9080)],
            "front-ok",
        ),
        Proc::server_with(
            Some(&t.endpoints[1]),
            "http",
            &[SocketAddr::new(Topology::ep4(2), 9080)],
            "front-failing",
            &["--status", "503"],
        ),
    ];
    // Both endpoints behind `front`, round robin, no retries: alternately 200 and 503.
    let yaml = two_hops()
        + "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: front-v2, namespace: demo}
spec: {address: 198.18.2.2, labels: {app: front, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: front, namespace: demo}
spec:
  hosts: [front.demo.svc.cluster.local]
  http: [{route: [{destination: {host: front.demo.svc.cluster.local}}], retries: {attempts: 0}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: front, namespace: demo}
spec: {host: front.demo.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
" + MESH_TELEMETRY;
    assert_eq!(Topology::ep4(2).to_string(), "198.18.2.2");
    let cfg = write_config(&yaml);
    let otlp = drover_tests::otlp::Receiver::start();
    let pins = PinDir::new();
    let endpoint = format!("http://{}", otlp.grpc);
    let a = drover_tests::args(
        &cfg,
        &pins,
        &["--netns", &t.client.name, "--otlp-endpoint", &endpoint],
    );
    let daemon = Daemon::start(&a).expect("daemon starts");
    let url = format!("http://{VIP}:9080/");
    let r = probe(
        Some(&t.client),
        None,
        &["http", &url, "--count", "6", "--header", "x-tenant: acme"],
    );
    assert_eq!(r["status"]["200"], 3, "{r}");
    assert_eq!(r["status"]["503"], 3, "{r}");

    // Sampled at the Telemetry's 100 % (the flag's default is 1 %), with its custom tags.
    let spans = otlp.wait(6, Duration::from_secs(10));
    assert_eq!(spans.len(), 6, "{spans:#?}");
    for s in &spans {
        assert_eq!(s.attributes["team"], "checkout", "{s:#?}");
        assert_eq!(s.attributes["tenant"], "acme", "{s:#?}");
        assert_eq!(s.attributes["region"], "local", "{s:#?}");
    }

    // Access-log lines for the failures only.
    assert!(daemon.wait_log_count("status=503", 3, Duration::from_secs(3)));
    assert!(
        !daemon.log().contains("status=200"),
        "the filter keeps 2xx out: {}",
        daemon.log()
    );

    // The request count without response_flags and with the host; no duration histogram.
    let prom = daemon.admin_get("/stats/prometheus");
    let counts: Vec<&str> = (prom.lines())
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert_eq!(counts.len(), 2, "{counts:#?}");
    for l in &counts {
        assert!(!l.contains("response_flags="), "{l}");
        assert!(l.contains("request_host=\"127.77.0.10:9080\""), "{l}");
        assert!(l.ends_with(" 3"), "{l}");
    }
    assert!(
        !prom.contains("istio_request_duration_milliseconds_bucket{"),
        "{prom}"
    );
    assert!(
        prom.contains("istio_response_bytes_bucket{"),
        "other families stay"
    );
}

#[test]
fn access_log_lines_can_be_written_in_istios_default_text_format() {
    if !require_privileged() {
        return;
    }
    let t = Topology::new(1);
    let _front = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[SocketAddr::new(Topology::ep4(1), 9080)],
        "front",
    );
    let cfg = write_config(&two_hops());
    let pins = PinDir::new();
    let a = drover_tests::args(
        &cfg,
        &pins,
        &["--netns", &t.client.name, "--access-log-format", "istio"],
    );
    let daemon = Daemon::start(&a).expect("daemon starts");
    let url = format!("http://{VIP}:9080/items");
    let r = probe(
        Some(&t.client),
        None,
        &[
            "http",
            &url,
            "--header",
            "user-agent: shop-ui/2.1",
            "--header",
            "x-request-id: req-42",
            "--header",
            "x-forwarded-for: 203.0.113.9",
        ],
    );
    assert_eq!(r["status"]["200"], 1, "{r}");
    let body = r["first_headers"]["content-length"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Envoy's fields in Istio's order: method, path, protocol, code, flags, details, bytes in
    // and out, the client's headers, authority, endpoint, cluster, addresses, route.
    let want = format!("\"GET /items HTTP/1.1\" 200 - via_upstream - \"-\" 0 {body} ");
    assert!(
        daemon.wait_log(&want, Duration::from_secs(3)),
        "{want}\n{}",
        daemon.log()
    );
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains(&want)).unwrap_or_default();
    let part = "\"203.0.113.9\" \"shop-ui/2.1\" \"req-42\" \"127.77.0.10:9080\" \"198.18.1.2:9080\" outbound|9080||front.demo.svc.cluster.local - 127.77.0.10:9080 198.18.1.1:";
    assert!(line.contains(part), "{part}\n{line}");
    assert!(line.contains("Z] \"GET"), "an RFC 3339 start time: {line}");
}
