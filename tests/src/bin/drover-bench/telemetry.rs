//! What Istio-compatible telemetry costs on the data path: the daemon's CPU per keep-alive
//! HTTP/1.1 request and per TCP connection (connect, one round trip, close), through the kernel
//! capture path, with telemetry off (`--no-standard-metrics --trace-sampling 0`) and with the
//! defaults (standard metrics, 1 % of new traces sampled and exported over OTLP to a receiver
//! in this process, access log off as in Istio), in the same run, alternating.

use std::net::{IpAddr, SocketAddr};

use drover_tests::{PinDir, Proc, Topology, probe, write_config};

use super::{VIP, cpu_ns, daemon};

/// One configuration's cost: (µs per request, µs per connection).
fn cost(t: &Topology, cfg: &std::path::Path, extra: &[&str], count: u32) -> (f64, f64) {
    let pins = PinDir::new();
    let d = daemon(t, cfg, &pins, extra);
    let pid = d.pid().expect("daemon pid");
    let url = format!("http://{VIP}:9080/");
    probe(Some(&t.client), None, &["http", &url, "--count", "200"]);
    let before = cpu_ns(pid);
    let r = probe(
        Some(&t.client),
        None,
        &["http", &url, "--count", &count.to_string()],
    );
    let request_us = (cpu_ns(pid) - before) as f64 / 1000.0 / f64::from(count);
    assert_eq!(r["status"]["200"], count, "{r}");
    let conns = (count / 5).max(100);
    let before = cpu_ns(pid);
    let crr = probe(
        Some(&t.client),
        None,
        &["crr", &format!("{VIP}:7000"), "--count", &conns.to_string()],
    );
    assert!(crr.get("error").is_none(), "{crr}");
    let conn_us = (cpu_ns(pid) - before) as f64 / 1000.0 / f64::from(conns);
    (request_us, conn_us)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The recording alone, in process: one request (or connection: opened, then closed with its
/// bytes) into the standard metrics with a realistic label set, in a store already holding
/// `series` series.
fn in_process() {
    use std::{sync::Arc, time::Duration};

    use drover::telemetry::{
        Connection, Edge, Metrics, Peer, Protocol, Reporter, Request, Security, ServiceName, Tcp,
    };
    let labels = |app: &str, v: &str| {
        [("app", app), ("version", v)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let edge = |i: usize| Edge {
        reporter: Reporter::Source,
        source: Arc::new(Peer::new(
            Some(&format!("frontend-{i}")),
            "shop",
            &labels("frontend", "v1"),
            None,
        )),
        destination: Arc::new(Peer::new(
            Some("web-v1"),
            "shop",
            &labels("web", "v1"),
            None,
        )),
        service: Arc::new(ServiceName::new("web.shop.svc.cluster.local", "shop")),
        security: Security::Unknown,
    };
    let request = Request {
        protocol: Protocol::Http,
        code: 200,
        grpc_status: None,
        flags: String::new(),
        duration: Duration::from_micros(800),
        request_bytes: 180,
        response_bytes: 2400,
        overrides: None,
    };
    println!("\nStandard metrics recording, in process (median of 5 runs)");
    println!(
        "{:>16} {:>16} {:>18}",
        "series held", "ns / request", "ns / connection"
    );
    for series in [1usize, 1_000, 10_000] {
        let m = Metrics::new(series + 10);
        // Connections go to the process's store, as in the daemon.
        let global = drover::telemetry::metrics();
        global.set_max_series(series + 10);
        let tcp = Tcp {
            opened: 1,
            closed: 1,
            sent: 120,
            received: 80,
            ..Tcp::default()
        };
        for i in 0..series {
            m.http(&edge(i), &request);
            global.tcp(&edge(i), &tcp);
        }
        let e = edge(0);
        let rq = super::authz::per_call(200_000, || {
            m.http(&e, &request);
            true
        });
        let cx = super::authz::per_call(200_000, || {
            Connection::open(e.clone(), None).close((80, 120));
            true
        });
        println!("{series:>16} {rq:>16.0} {cx:>18.0}");
    }
}

/// The comparison (the echo server on the endpoint's port 7000 is the bench's own).
pub fn run(t: &Topology, ep: IpAddr, count: u32, rounds: usize) {
    in_process();
    let _http = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[SocketAddr::new(ep, 9081)],
        "bench",
    );
    let client = Topology::client4(1);
    let cfg = write_config(&format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  addresses: [{VIP}]
  ports:
  - {{number: 9080, name: http, protocol: HTTP, targetPort: 9081}}
  - {{number: 7000, name: tcp, protocol: TCP}}
  resolution: STATIC
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web-v1, namespace: shop}}
spec: {{address: {ep}, serviceAccount: web, labels: {{app: web, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: frontend-v1, namespace: shop}}
spec: {{address: {client}, serviceAccount: frontend, labels: {{app: frontend, version: v1}}}}
"
    ));
    let otlp = drover_tests::otlp::Receiver::start();
    let endpoint = format!("http://{}", otlp.grpc);
    let off = ["--no-standard-metrics", "--trace-sampling", "0"];
    let on = ["--trace-sampling", "1", "--otlp-endpoint", &endpoint];
    let (mut off_rq, mut off_cx, mut on_rq, mut on_cx) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds.max(1) {
        let (rq, cx) = cost(t, &cfg, &off, count);
        off_rq.push(rq);
        off_cx.push(cx);
        let (rq, cx) = cost(t, &cfg, &on, count);
        on_rq.push(rq);
        on_cx.push(cx);
    }
    let show = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        format!("[{:.1}–{:.1}]", s[0], s[s.len() - 1])
    };
    println!(
        "\nTelemetry cost: daemon CPU through the kernel capture path, median of {} rounds [min–max]",
        rounds.max(1)
    );
    println!(
        "{:>34} {:>26} {:>26}",
        "", "µs CPU / HTTP/1.1 request", "µs CPU / TCP connection"
    );
    let (orq, ocx, nrq, ncx) = (
        median(off_rq.clone()),
        median(off_cx.clone()),
        median(on_rq.clone()),
        median(on_cx.clone()),
    );
    println!(
        "{:>34} {:>12.2} {:>13} {:>12.2} {:>13}",
        "telemetry off",
        orq,
        show(&off_rq),
        ocx,
        show(&off_cx)
    );
    println!(
        "{:>34} {:>12.2} {:>13} {:>12.2} {:>13}",
        "defaults (metrics, 1 % traces)",
        nrq,
        show(&on_rq),
        ncx,
        show(&on_cx)
    );
    println!(
        "{:>34} {:>12.2} {:>13} {:>12.2}",
        "added by telemetry",
        nrq - orq,
        "",
        ncx - ocx
    );
    println!(
        "spans received by the OTLP receiver: {}",
        otlp.spans().len()
    );
    println!("reproduce: cargo xtask bench -- --only telemetry --l4-rounds {rounds}");
}
