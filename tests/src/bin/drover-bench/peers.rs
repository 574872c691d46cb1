//! The comparison a user makes before choosing: HTTP/1.1 and L4 bulk through Drover, HAProxy
//! and Envoy, one worker each, against the same nginx origin (1 KiB), from the same client
//! namespace, interleaved over rounds (each round starts with the next peer), so noise falls on
//! every peer alike. Measures closed-loop rps and p99 (`wrk -t1 -c16`), the proxy's CPU per
//! request, p50/p99 at a fixed rate, and bulk throughput; writes the report with its plots.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
};

use drover_tests::{PinDir, Pki, Proc, Topology, probe, write_config};
use serde_json::Value;

use super::report::{self, Metric, Samples};

/// What the comparison runs.
pub struct Setup {
    pub rounds: usize,
    /// Seconds of each closed-loop run.
    pub secs: u32,
    /// Requests per second of the fixed-rate run.
    pub rate: u32,
    /// Bytes of each bulk transfer.
    pub bytes: u64,
    pub envoy: Option<PathBuf>,
    /// Where `report.md` and the plots go.
    pub report_dir: PathBuf,
    /// Concurrent connections of the cost-growth curve.
    pub levels: Vec<u32>,
    /// Idle keep-alive connections held for the memory measurement.
    pub idle_conns: usize,
    /// The scenarios to run; empty runs all.
    pub scenarios: Vec<Scenario>,
}

impl Setup {
    fn runs(&self, s: Scenario) -> bool {
        self.scenarios.is_empty() || self.scenarios.contains(&s)
    }
}

/// One scenario of the comparison (`--peer-scenarios`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Scenario {
    /// KiB per idle keep-alive connection.
    Memory,
    /// `wrk`: req/s, p99 and CPU per request.
    Http1,
    /// `h2load`: req/s and CPU per request.
    H2,
    /// gRPC unary calls.
    Grpc,
    /// p50/p99 at a fixed rate.
    Fixed,
    /// L4 bulk.
    Bulk,
    /// mTLS origination: handshakes and bulk.
    Tls,
    /// req/s and p99 against connections.
    Growth,
    /// Drover's req/s and p99 against endpoints in one cluster.
    Endpoints,
}

/// One way from the client to the origin.
struct Peer {
    name: &'static str,
    http: String,
    /// The same origin over HTTP/2 (cleartext, prior knowledge).
    h2: String,
    /// The gRPC echo service (`drover.test.Echo`, h2c).
    grpc: String,
    /// `host:port` of the bulk sink through this peer.
    bulk: String,
    /// `host:port` of the TLS echo (`rr`) and sink (`bulk`): through a proxy, plaintext from the
    /// client and MUTUAL TLS (P-256, resumption on) to the endpoint; direct, plaintext.
    tls: (String, String),
    /// The proxy process, for its CPU time.
    pid: Option<u32>,
}

/// The origin's body: 1 KiB.
const BODY: usize = 1024;
/// Drover's service address for this comparison.
const VIP: &str = "127.77.0.10";
/// Drover's address for the same endpoint with TLS origination.
const TLS_VIP: &str = "127.77.0.12";
/// The gRPC origin's port.
const GRPC_PORT: u16 = 50051;
/// The name the TLS endpoint's certificate carries (SNI and SAN check).
const TLS_NAME: &str = "tlsb.svc";

pub fn run(setup: &Setup, t: &Topology, ep: IpAddr) {
    let dir = scratch_dir();
    let _origin = nginx(t, ep, &dir);
    wait_http(t, &format!("http://{ep}:9080/"), "nginx");
    let pki = Pki::new();
    let tls = TlsFiles::new(&pki, &dir);
    let _tls_servers = tls_servers(t, ep, &pki);
    let _grpc = Proc::server(
        Some(&t.endpoints[0]),
        "grpc",
        &[SocketAddr::new(ep, GRPC_PORT)],
        "bench",
    );
    let cfg = drover_config(ep, &tls);
    let pins = PinDir::new();
    let drover = super::one_worker(t, &cfg, &pins);
    let haproxy = haproxy(t, ep, &dir, &tls);
    wait_http(t, "http://127.0.0.1:10001/", "haproxy");
    let envoy = setup.envoy.as_ref().map(|bin| {
        let p = envoy(t, ep, bin, &tls);
        wait_http(t, "http://127.0.0.1:10000/", "envoy");
        p
    });
    let peers = peers(
        ep,
        drover.pid(),
        haproxy.child.id(),
        envoy.as_ref().map(|e| e.child.id()),
    );

    let mut samples: Vec<Samples> = peers.iter().map(|p| Samples::new(p.name)).collect();
    if setup.runs(Scenario::Memory) {
        idle_memory(setup, t, &peers, &mut samples);
    }
    for round in 0..setup.rounds {
        for k in 0..peers.len() {
            let i = (round + k) % peers.len();
            measure(setup, t, &peers[i], &mut samples[i]);
        }
        eprintln!("peers: round {}/{} done", round + 1, setup.rounds);
    }
    let curves = if setup.runs(Scenario::Growth) {
        growth(setup, t, &peers)
    } else {
        Vec::new()
    };
    // Its own daemons, one per endpoint count: the comparison's daemon goes first.
    drop(drover);
    let endpoints = if setup.runs(Scenario::Endpoints) {
        vec![endpoint_growth(t, &pins)]
    } else {
        Vec::new()
    };
    let mut command = format!(
        "cargo xtask bench -- --only peers --peer-rounds {} --peer-secs {} --peer-rate {} --bytes {} --idle-conns {}",
        setup.rounds, setup.secs, setup.rate, setup.bytes, setup.idle_conns
    );
    if !setup.scenarios.is_empty() {
        let names: Vec<String> = setup
            .scenarios
            .iter()
            .map(|s| format!("{s:?}").to_lowercase())
            .collect();
        command += &format!(" --peer-scenarios {}", names.join(","));
    }
    let text = report::write(&setup.report_dir, &samples, (&curves, &endpoints), &command)
        .expect("report written");
    println!("\n{text}");
    println!("report: {}", setup.report_dir.join("report.md").display());
    drop((haproxy, envoy));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Drover's configuration: the origin's HTTP/1.1, HTTP/2 and bulk ports at [`VIP`], and the TLS
/// endpoint at [`TLS_VIP`] with MUTUAL origination.
fn drover_config(ep: IpAddr, tls: &TlsFiles) -> PathBuf {
    write_config(&format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: peers}}
spec:
  hosts: [peers.svc]
  addresses: [{VIP}]
  ports: [{{number: 9080, name: http, protocol: HTTP}}, {{number: 9081, name: http2, protocol: HTTP2}}, {{number: 7001, name: tcp-bulk, protocol: TCP}}, {{number: {GRPC_PORT}, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: {ep}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: tlsb}}
spec:
  hosts: [{TLS_NAME}]
  addresses: [{TLS_VIP}]
  ports: [{{number: 7000, name: tcp-rr, targetPort: 7443}}, {{number: 7001, name: tcp-bulk, targetPort: 7444}}]
  resolution: STATIC
  endpoints: [{{address: {ep}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tlsb}}
spec:
  host: {TLS_NAME}
  trafficPolicy:
    tls: {{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {cert}, privateKey: {key}, sni: {TLS_NAME}, subjectAltNames: [{TLS_NAME}]}}
",
        ca = tls.ca,
        cert = tls.cert,
        key = tls.key,
    ))
}

/// The paths compared: direct, then each proxy (its process for the CPU figures).
fn peers(ep: IpAddr, drover: Option<u32>, haproxy: u32, envoy: Option<u32>) -> Vec<Peer> {
    let mut peers = vec![
        Peer {
            name: "direct",
            http: format!("http://{ep}:9080/"),
            h2: format!("http://{ep}:9081/"),
            grpc: format!("http://{ep}:{GRPC_PORT}"),
            bulk: format!("{ep}:7001"),
            tls: (format!("{ep}:7000"), format!("{ep}:7001")),
            pid: None,
        },
        Peer {
            name: "drover",
            http: format!("http://{VIP}:9080/"),
            h2: format!("http://{VIP}:9081/"),
            grpc: format!("http://{VIP}:{GRPC_PORT}"),
            bulk: format!("{VIP}:7001"),
            tls: (format!("{TLS_VIP}:7000"), format!("{TLS_VIP}:7001")),
            pid: drover,
        },
        Peer {
            name: "haproxy 2.6",
            http: "http://127.0.0.1:10001/".into(),
            h2: "http://127.0.0.1:10011/".into(),
            grpc: "http://127.0.0.1:10041".into(),
            bulk: "127.0.0.1:10002".into(),
            tls: ("127.0.0.1:10021".into(), "127.0.0.1:10022".into()),
            pid: Some(haproxy),
        },
    ];
    if let Some(e) = envoy {
        peers.push(Peer {
            name: "envoy 1.40",
            http: "http://127.0.0.1:10000/".into(),
            h2: "http://127.0.0.1:10010/".into(),
            grpc: "http://127.0.0.1:10040".into(),
            bulk: "127.0.0.1:10003".into(),
            tls: ("127.0.0.1:10031".into(), "127.0.0.1:10032".into()),
            pid: Some(e),
        });
    }

    peers
}

/// Memory per idle keep-alive connection, each proxy measured fresh (before the load, whose
/// buffers a proxy's own pools would keep and reuse, hiding the cost of new connections).
fn idle_memory(setup: &Setup, t: &Topology, peers: &[Peer], samples: &mut [Samples]) {
    for (peer, s) in peers.iter().zip(samples.iter_mut()) {
        if let Some(pid) = peer.pid {
            let addr = peer
                .http
                .trim_start_matches("http://")
                .trim_end_matches('/');
            let (before, after) =
                super::idle_rss(t, pid, addr, Some("peers.svc"), setup.idle_conns);
            s.add(
                Metric::IdleKib,
                after.saturating_sub(before) as f64 / setup.idle_conns as f64,
            );
        }
    }
}

/// Cost growth: closed-loop rps and p99 as connections grow (one pass, every peer per level).
fn growth(setup: &Setup, t: &Topology, peers: &[Peer]) -> Vec<report::Curve> {
    let mut curves: Vec<report::Curve> = peers.iter().map(|p| report::Curve::new(p.name)).collect();
    for &c in &setup.levels {
        for (peer, curve) in peers.iter().zip(&mut curves) {
            let (text, parsed) = wrk_with(t, &peer.http, CURVE_SECS, c);
            let (rps, p99, _) = parsed.unwrap_or((f64::NAN, f64::NAN, 0));
            curve.points.push((c, rps, p99, wrk_errors(&text)));
        }
        eprintln!("peers: {c} connections done");
    }
    curves
}

/// Endpoint counts of the endpoint cost-growth curve.
const ENDPOINT_LEVELS: [u32; 3] = [10, 1000, 10_000];
/// The many endpoints: every address of this block is local to the first endpoint namespace (a
/// `local` route to its loopback, where nginx listens on [`WIDE_PORT`] of any address), and the
/// client namespace routes the block to it.
const WIDE_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 192, 0), 18);
const WIDE_PORT: u16 = 9082;
/// Drover's service address for the many endpoints.
const WIDE_VIP: &str = "127.77.0.14";

/// Drover's req/s and p99 (`wrk -c16`) with 10, 1 000 and 10 000 endpoints in the service's one
/// cluster (Istio's default LEAST_REQUEST), each count with a fresh daemon.
fn endpoint_growth(t: &Topology, pins: &PinDir) -> report::Curve {
    let net = format!("{}/{}", WIDE_NET.0, WIDE_NET.1);
    t.endpoints[0].ip(&["route", "add", "local", &net, "dev", "lo"]);
    t.client.ip(&["route", "add", &net, "via", "198.18.1.2"]);
    let mut curve = report::Curve::new("drover");
    for n in ENDPOINT_LEVELS {
        let endpoints: Vec<String> = (1..=n)
            .map(|i| format!("{{address: {}}}", Ipv4Addr::from(u32::from(WIDE_NET.0) + i)))
            .collect();
        let cfg = write_config(&format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: wide}}
spec:
  hosts: [wide.svc]
  addresses: [{WIDE_VIP}]
  ports: [{{number: {WIDE_PORT}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{}]
",
            endpoints.join(", ")
        ));
        let daemon = super::one_worker(t, &cfg, pins);
        let url = format!("http://{WIDE_VIP}:{WIDE_PORT}/");
        wait_http(t, &url, "drover with many endpoints");
        let (text, parsed) = wrk_with(t, &url, CURVE_SECS, 16);
        let (rps, p99, _) = parsed.unwrap_or((f64::NAN, f64::NAN, 0));
        curve.points.push((n, rps, p99, wrk_errors(&text)));
        drop(daemon);
        eprintln!("peers: {n} endpoints done");
    }
    curve
}

/// One round of every chosen scenario through `peer`.
fn measure(setup: &Setup, t: &Topology, peer: &Peer, s: &mut Samples) {
    if setup.runs(Scenario::Http1) {
        let cpu_before = peer.pid.map(super::cpu_ns);
        let (rps, p99, requests) = wrk(t, &peer.http, setup.secs);
        add_cpu(peer, cpu_before, requests, Metric::CpuPerRequest, s);
        s.add(Metric::Rps, rps);
        s.add(Metric::ClosedP99, p99);
    }
    if setup.runs(Scenario::H2) {
        let cpu_before = peer.pid.map(super::cpu_ns);
        let (h2_rps, h2_requests) = h2load(t, &peer.h2, setup.secs);
        add_cpu(peer, cpu_before, h2_requests, Metric::H2CpuPerRequest, s);
        s.add(Metric::H2Rps, h2_rps);
    }
    if setup.runs(Scenario::Grpc) {
        let grpc = probe(
            Some(&t.client),
            None,
            &[
                "grpc",
                &peer.grpc,
                "--call",
                "load",
                "--concurrency",
                "16",
                "--secs",
                &setup.secs.to_string(),
            ],
        );
        assert!(
            grpc.get("error").is_none() && grpc["failed"] == 0,
            "{}: {grpc}",
            peer.name
        );
        s.add(Metric::GrpcRps, num(&grpc, "per_s"));
        s.add(Metric::GrpcP99, num(&grpc, "p99_us"));
    }
    if setup.runs(Scenario::Fixed) {
        let fixed = probe(
            Some(&t.client),
            None,
            &[
                "http",
                &peer.http,
                "--count",
                &(setup.rate * 5).to_string(),
                "--rate",
                &setup.rate.to_string(),
                "--max-secs",
                "30",
            ],
        );
        assert_eq!(fixed["errors"].as_u64(), Some(0), "{}: {fixed}", peer.name);
        s.add(Metric::FixedP50, num(&fixed, "p50_us"));
        s.add(Metric::FixedP99, num(&fixed, "p99_us"));
    }
    if setup.runs(Scenario::Bulk) {
        s.add(Metric::Bulk, bulk(setup, t, peer, &peer.bulk));
    }
    if setup.runs(Scenario::Tls) {
        let cpu_before = peer.pid.map(super::cpu_ns);
        let crr = probe(
            Some(&t.client),
            None,
            &["crr", &peer.tls.0, "--count", &TLS_CONNECTIONS.to_string()],
        );
        assert!(crr.get("error").is_none(), "{}: {crr}", peer.name);
        add_cpu(
            peer,
            cpu_before,
            TLS_CONNECTIONS.into(),
            Metric::TlsCpuPerConn,
            s,
        );
        s.add(Metric::TlsConnsPerSec, num(&crr, "per_s"));
        s.add(Metric::TlsBulk, bulk(setup, t, peer, &peer.tls.1));
    }
}

/// The proxy's CPU µs per request (or connection) since `before` (its CPU ns), if it is a proxy.
fn add_cpu(peer: &Peer, before: Option<u64>, requests: u64, m: Metric, s: &mut Samples) {
    if let (Some(pid), Some(before)) = (peer.pid, before) {
        let ns = super::cpu_ns(pid).saturating_sub(before);
        s.add(m, ns as f64 / 1000.0 / requests.max(1) as f64);
    }
}

/// Gbit/s of one bulk transfer of `setup.bytes` to `addr`.
fn bulk(setup: &Setup, t: &Topology, peer: &Peer, addr: &str) -> f64 {
    let bulk = probe(
        Some(&t.client),
        None,
        &["bulk", addr, "--bytes", &setup.bytes.to_string()],
    );
    assert!(bulk.get("error").is_none(), "{}: {bulk}", peer.name);
    num(&bulk, "gbit_per_s")
}

/// Connections (each with an upstream TLS handshake) per round of the TLS measurement.
const TLS_CONNECTIONS: u32 = 2000;

/// The PEM files of the TLS comparison: the CA that signed the endpoint's certificate (and the
/// client CA), the client certificate and key, and both in one file (HAProxy's `crt`).
struct TlsFiles {
    ca: String,
    cert: String,
    key: String,
    bundle: String,
}

impl TlsFiles {
    fn new(pki: &Pki, dir: &Path) -> Self {
        let (cert, key) = pki.leaf("client", &["client.svc"], true, false);
        let bundle = dir.join("client-bundle.pem");
        let joined = std::fs::read_to_string(&cert).expect("client cert")
            + &std::fs::read_to_string(&key).expect("client key");
        std::fs::write(&bundle, joined).expect("bundle");
        Self {
            ca: pki.path("ca.pem"),
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            bundle: bundle.display().to_string(),
        }
    }
}

/// The TLS endpoint: echo on 7443 and sink on 7444, certificate for [`TLS_NAME`], client
/// certificates required.
fn tls_servers(t: &Topology, ep: IpAddr, pki: &Pki) -> Vec<Proc> {
    let (cert, key) = pki.leaf("server", &[TLS_NAME], false, false);
    let args = [
        "--tls-cert".to_string(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--tls-client-ca".into(),
        pki.path("client-ca.pem"),
    ];
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    [("echo", 7443), ("sink", 7444)]
        .into_iter()
        .map(|(mode, port)| {
            Proc::server_with(
                Some(&t.endpoints[0]),
                mode,
                &[SocketAddr::new(ep, port)],
                "bench",
                &a,
            )
        })
        .collect()
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// `h2load -c16 -m1` (HTTP/2 prior knowledge, 16 streams in flight) for `secs`: (req/s,
/// requests); every request must succeed.
fn h2load(t: &Topology, url: &str, secs: u32) -> (f64, u64) {
    let out = t
        .client
        .command("h2load")
        .args(["-c16", "-m1", "-D", &secs.to_string(), url])
        .stderr(Stdio::inherit())
        .output()
        .expect("h2load runs (apt install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).unwrap_or_else(|| panic!("{url}: h2load failed\n{text}"))
}

/// (req/s, requests) from h2load's text, `None` unless every request succeeded.
fn parse_h2load(text: &str) -> Option<(f64, u64)> {
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))?
        .split(", ")
        .find_map(|p| p.strip_suffix(" req/s"))?
        .parse()
        .ok()?;
    let counts = text.lines().find_map(|l| l.strip_prefix("requests: "))?;
    let field = |name: &str| -> Option<u64> {
        counts
            .split(", ")
            .find_map(|p| p.strip_suffix(name))?
            .trim()
            .parse()
            .ok()
    };
    let (done, ok) = (field(" done")?, field(" succeeded")?);
    (done > 0 && ok == done).then_some((rps, ok))
}

/// Seconds of each point of the cost-growth curve.
const CURVE_SECS: u32 = 3;

/// `wrk -t1 -c16` for `secs` from the client namespace, which must see no error: (req/s,
/// p99 µs, requests).
fn wrk(t: &Topology, url: &str, secs: u32) -> (f64, f64, u64) {
    let (text, parsed) = wrk_with(t, url, secs, 16);
    assert_eq!(wrk_errors(&text), 0, "{url}: wrk saw errors\n{text}");
    parsed.unwrap_or_else(|| panic!("{url}: unreadable wrk output\n{text}"))
}

/// Socket errors and non-2xx/3xx responses wrk reports.
fn wrk_errors(text: &str) -> u64 {
    let numbers = |l: &str| -> u64 {
        l.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("Socket errors:")
                .or_else(|| l.strip_prefix("Non-2xx or 3xx responses:"))
        })
        .map(numbers)
        .sum()
}

/// `wrk -t1 -cN`: its text and what [`parse_wrk`] reads of it.
fn wrk_with(
    t: &Topology,
    url: &str,
    secs: u32,
    connections: u32,
) -> (String, Option<(f64, f64, u64)>) {
    let out = t
        .client
        .command("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--timeout",
            "10s",
            "--latency",
            url,
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("wrk runs (apt install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let parsed = parse_wrk(&text);
    (text, parsed)
}

/// (req/s, p99 µs, requests) from wrk's text.
fn parse_wrk(text: &str) -> Option<(f64, f64, u64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| duration_us(v.trim()))?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((rps, p99, requests))
}

/// wrk's durations (`812.00us`, `1.23ms`, `2.00s`) in µs.
fn duration_us(v: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else {
        (v.strip_suffix('s')?, 1e6)
    };
    Some(n.parse::<f64>().ok()? * scale)
}

/// A private directory for the peers' files.
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drover-peers-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("www")).expect("scratch dir");
    dir
}

/// nginx, one worker, serving a 1 KiB file on `ep:9080` (HTTP/1.1) and `ep:9081` (HTTP/2
/// cleartext) in the endpoint namespace.
fn nginx(t: &Topology, ep: IpAddr, dir: &Path) -> Origin {
    std::fs::write(dir.join("www/index.html"), vec![b'x'; BODY]).expect("body");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx.err crit;
worker_rlimit_nofile 65536;
events {{ worker_connections 32768; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 3600s;
  server {{
    listen {addr};
    root {d}/www;
  }}
  server {{
    listen {addr2} http2;
    root {d}/www;
  }}
  server {{
    listen {WIDE_PORT};
    root {d}/www;
  }}
}}
",
            d = dir.display(),
            addr = SocketAddr::new(ep, 9080),
            addr2 = SocketAddr::new(ep, 9081)
        ),
    )
    .expect("nginx.conf");
    Origin(spawn(
        t.endpoints[0].command("nginx").args([
            "-c",
            &conf.display().to_string(),
            "-e",
            &dir.join("nginx.err").display().to_string(),
        ]),
        "nginx (apt install nginx-light)",
    ))
}

/// The nginx master: stopped with SIGTERM, so that it stops its worker too (a killed master
/// leaves the worker running).
struct Origin(Proc);

impl Drop for Origin {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let _ = self.0.child.wait();
        }
    }
}

/// HAProxy with one thread: HTTP/1.1 on 127.0.0.1:10001, HTTP/2 on 10011, gRPC on 10041, TCP on
/// 10002, TCP with MUTUAL TLS to the endpoint on 10021 (echo) and 10022 (sink), in the client
/// namespace.
fn haproxy(t: &Topology, ep: IpAddr, dir: &Path, tls: &TlsFiles) -> Proc {
    let conf = dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global
  nbthread 1
  maxconn 8000
defaults
  maxconn 8000
  timeout connect 10s
  timeout client 3600s
  timeout server 3600s
frontend web
  mode http
  bind 127.0.0.1:10001
  default_backend web
backend web
  mode http
  server origin {ep}:9080
frontend web2
  mode http
  bind 127.0.0.1:10011 proto h2
  default_backend web2
backend web2
  mode http
  server origin {ep}:9081 proto h2
frontend grpc
  mode http
  bind 127.0.0.1:10041 proto h2
  default_backend grpc
backend grpc
  mode http
  server origin {ep}:{GRPC_PORT} proto h2
listen bulk
  mode tcp
  bind 127.0.0.1:10002
  server sink {ep}:7001
listen tls_rr
  mode tcp
  bind 127.0.0.1:10021
  server echo {ep}:7443 {server_tls}
listen tls_bulk
  mode tcp
  bind 127.0.0.1:10022
  server sink {ep}:7444 {server_tls}
",
            server_tls = format!(
                "ssl verify required ca-file {} crt {} sni str({TLS_NAME}) verifyhost {TLS_NAME}",
                tls.ca, tls.bundle
            )
        ),
    )
    .expect("haproxy.cfg");
    spawn(
        t.client
            .command("haproxy")
            .args(["-db", "-f", &conf.display().to_string()]),
        "haproxy (apt install haproxy)",
    )
}

/// Envoy with one worker: HTTP on 127.0.0.1:10000, HTTP/2 on 10010 and gRPC on 10040 (router,
/// LEAST_REQUEST as Istio's default; the codec detects the protocol), `tcp_proxy` on 10003, and `tcp_proxy`
/// with MUTUAL TLS upstream on 10031 (echo) and 10032 (sink), in the client namespace.
fn envoy(t: &Topology, ep: IpAddr, bin: &Path, tls: &TlsFiles) -> Proc {
    let cfg = write_config(&format!(
        "static_resources:
  listeners:
{web}{web2}{grpc}{bulk}{tls_rr}{tls_bulk}  clusters:
  - name: web
    type: STATIC
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: web
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ep}, port_value: 9080}}}}}}
{web2_cluster}  - name: bulk
    type: STATIC
    load_assignment:
      cluster_name: bulk
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ep}, port_value: 7001}}}}}}
{grpc_cluster}{tls_rr_cluster}{tls_bulk_cluster}",
        web = envoy_http_listener(10000, "web"),
        web2 = envoy_http_listener(10010, "web2"),
        grpc = envoy_http_listener(10040, "grpc"),
        web2_cluster = envoy_h2_cluster("web2", SocketAddr::new(ep, 9081)),
        grpc_cluster = envoy_h2_cluster("grpc", SocketAddr::new(ep, GRPC_PORT)),
        bulk = envoy_tcp_listener(10003, "bulk"),
        tls_rr = envoy_tcp_listener(10031, "tls_rr"),
        tls_bulk = envoy_tcp_listener(10032, "tls_bulk"),
        tls_rr_cluster = envoy_tls_cluster("tls_rr", SocketAddr::new(ep, 7443), tls),
        tls_bulk_cluster = envoy_tls_cluster("tls_bulk", SocketAddr::new(ep, 7444), tls),
    ));
    spawn(
        t.client.command(bin).args([
            "-c",
            &cfg.display().to_string(),
            "--concurrency",
            "1",
            "--log-level",
            "error",
            "--base-id",
            &(std::process::id() + 1).to_string(),
        ]),
        "envoy",
    )
}

/// An Envoy cluster `name` of one endpoint at `addr` spoken to in HTTP/2 (cleartext).
fn envoy_h2_cluster(name: &str, addr: SocketAddr) -> String {
    format!(
        "  - name: {name}
    type: STATIC
    lb_policy: LEAST_REQUEST
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
",
        ip = addr.ip(),
        port = addr.port(),
    )
}

/// An Envoy `tcp_proxy` listener on `127.0.0.1:port` to `cluster`.
fn envoy_tcp_listener(port: u16, cluster: &str) -> String {
    format!(
        "  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {cluster}
          cluster: {cluster}
"
    )
}

/// An Envoy cluster `name` of one endpoint at `addr` with MUTUAL TLS (client certificate, CA,
/// SNI and SAN check as Drover's DestinationRule says).
fn envoy_tls_cluster(name: &str, addr: SocketAddr, tls: &TlsFiles) -> String {
    format!(
        "  - name: {name}
    type: STATIC
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {TLS_NAME}
        common_tls_context:
          tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: {TLS_NAME}}}}}]
",
        ip = addr.ip(),
        port = addr.port(),
        cert = tls.cert,
        key = tls.key,
        ca = tls.ca,
    )
}

/// An Envoy HTTP listener on `127.0.0.1:port` routing everything to `cluster`.
fn envoy_http_listener(port: u16, cluster: &str) -> String {
    format!(
        "  - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {cluster}
          route_config:
            virtual_hosts:
            - name: all
              domains: ['*']
              routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"
    )
}

fn spawn(cmd: &mut std::process::Command, what: &str) -> Proc {
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    Proc { child }
}

/// Waits (10 s at most) until `url` answers 200 from the client namespace.
fn wait_http(t: &Topology, url: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while probe(Some(&t.client), None, &["http", url])["status"]["200"] != 1 {
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 5s test @ http://x/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.00us  100.00us   5.00ms   90.00%
  Latency Distribution
     50%  790.00us
     75%  850.00us
     90%    0.95ms
     99%    1.23ms
  98765 requests in 5.00s, 120.00MB read
Requests/sec:  19753.00
Transfer/sec:     24.00MB
";
        assert_eq!(parse_wrk(text), Some((19753.0, 1230.0, 98765)));
        assert_eq!(wrk_errors(text), 0);
        let errors = "  Socket errors: connect 0, read 163, write 2, timeout 0\n  Non-2xx or 3xx responses: 5\n";
        assert_eq!(wrk_errors(errors), 170);
        let h2 = "finished in 8.00s, 41234.50 req/s, 45.67MB/s
requests: 329876 total, 329876 started, 329876 done, 329876 succeeded, 0 failed, 0 errored, 0 timeout
";
        assert_eq!(parse_h2load(h2), Some((41234.5, 329876)));
        let failed = h2.replace("329876 succeeded, 0 failed", "329000 succeeded, 876 failed");
        assert_eq!(parse_h2load(&failed), None);
        assert_eq!(duration_us("2.00s"), Some(2e6));
        assert_eq!(duration_us("15.5us"), Some(15.5));
    }
}
