//! Pod to pod across two nodes: direct, through Drover in plaintext (one node's daemon), through
//! two Drover nodes over HBONE (mutual TLS 1.3, HTTP/2 `CONNECT`, the pool warm), and — with
//! `ZTUNNEL_BIN` — through two ztunnels over HBONE (dedicated mode, fake CA, one worker each).
//! Round trips of 64 B (p50/p99), connect + round trip + close, and bulk throughput; one
//! worker per proxy; interleaved rounds, medians with [min–max].

use std::net::IpAddr;

use drover_tests::{Daemon, PinDir, Proc, Topology, sh, write_config};

use super::{Row, VIP, measure};

/// The measured paths, in the order of a round.
const PATHS: [&str; 4] = ["direct", "drover-plain", "drover-hbone", "ztunnel-hbone"];

/// Runs `rounds` interleaved rounds of `count` round trips and `bytes` of bulk per path.
pub fn run(t: &Topology, ep: IpAddr, (count, bytes, rounds): (u32, u64, usize)) {
    let dir = drover_tests::Pki::new();
    let mesh = dir.dir.join("mesh").display().to_string();
    sh(&[
        drover_tests::bin("drover").to_str().unwrap(),
        "ca",
        "init",
        "--dir",
        &mesh,
    ]);
    let ztunnel = std::env::var_os("ZTUNNEL_BIN").map(std::path::PathBuf::from);
    let paths: Vec<&str> = (PATHS.iter().copied())
        .filter(|p| *p != "ztunnel-hbone" || ztunnel.is_some())
        .collect();
    let mut rows: Vec<Vec<Row>> = paths.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..paths.len() {
            let i = (round + k) % paths.len();
            let row = match paths[i] {
                "direct" => measure(t, "direct", &ep.to_string(), count, bytes),
                "ztunnel-hbone" => {
                    let bin = ztunnel.as_deref().expect("ZTUNNEL_BIN");
                    let _z = Ztunnels::start(bin, t, ep, &dir.dir);
                    measure(t, "ztunnel-hbone", VIP, count, bytes)
                }
                name => {
                    let hbone = name == "drover-hbone";
                    let _nodes = Nodes::start(t, ep, &mesh, hbone);
                    measure(t, paths[i], VIP, count, bytes)
                }
            };
            rows[i].push(row);
        }
    }
    report(&paths, &rows, (count, bytes, rounds));
}

fn report(paths: &[&str], rows: &[Vec<Row>], (count, bytes, rounds): (u32, u64, usize)) {
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let stat = |i: usize, pick: &dyn Fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows[i].iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!(
        "\nPod to pod across two nodes: {count} round trips of 64 B, {} connect+round-trip+close, {:.1} GiB bulk; one worker per proxy; median [min–max] of {rounds} interleaved rounds",
        (count / 5).max(100),
        bytes as f64 / (1u64 << 30) as f64,
    );
    println!(
        "{:<14} {:>20} {:>20} {:>20} {:>22}",
        "path", "rr p50 µs", "rr p99 µs", "crr p50 µs", "bulk Gbit/s"
    );
    for (i, name) in paths.iter().enumerate() {
        let cells = [
            stat(i, &|r| f(&r.rr, "p50_us")),
            stat(i, &|r| f(&r.rr, "p99_us")),
            stat(i, &|r| f(&r.crr, "p50_us")),
            stat(i, &|r| f(&r.bulk, "gbit_per_s")),
        ];
        print!("{name:<14}");
        for (m, lo, hi) in cells {
            print!(" {m:>7.2} [{lo:>5.1}–{hi:>5.1}]");
        }
        println!();
    }
    println!(
        "reproduce: [ZTUNNEL_BIN=../shared/tools/ztunnel] cargo xtask bench -- --only hbone --l4-rounds {rounds}"
    );
}

/// The Drover nodes of one measurement: node A enrolling the client's namespace and, for HBONE,
/// node B enrolling the endpoint's with `--inbound-pods`; one worker each.
struct Nodes {
    _daemons: Vec<(Daemon, PinDir)>,
}

impl Nodes {
    fn start(t: &Topology, ep: IpAddr, mesh: &str, hbone: bool) -> Self {
        let label = if hbone {
            ", labels: {ambient.istio.io/redirection: enabled}"
        } else {
            ""
        };
        let cfg = write_config(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bench, namespace: test}}\nspec:\n  hosts: [bench.test.svc]\n  addresses: [{VIP}]\n  ports: [{{number: 7000, name: tcp-rr}}, {{number: 7001, name: tcp-bulk}}]\n  resolution: STATIC\n  endpoints: [{{address: {ep}, serviceAccount: server{label}}}]\n"
        ));
        let node = |netns: &str, sa: &str, inbound: bool| {
            let pins = PinDir::new();
            let mut a = drover_tests::args(
                &cfg,
                &pins,
                &[
                    "--netns",
                    netns,
                    "--workers",
                    "1",
                    "--mesh-ca",
                    mesh,
                    "--client-namespace",
                    "test",
                    "--service-account",
                    sa,
                ],
            );
            if inbound {
                a.push("--inbound-pods".into());
            }
            (Daemon::start(&a).expect("drover starts"), pins)
        };
        let mut daemons = vec![node(&t.client.name, "client", false)];
        if hbone {
            daemons.push(node(&t.endpoints[0].name, "server", true));
        }
        Self { _daemons: daemons }
    }
}

/// Two ztunnels in dedicated mode with the fake CA, from a local workload file: one in the
/// client's namespace (capture by iptables REDIRECT of the VIP, its own sockets marked and
/// exempt), one in the endpoint's (HBONE on 15008).
struct Ztunnels {
    _procs: Vec<Proc>,
    client_ns: String,
}

impl Ztunnels {
    fn start(bin: &std::path::Path, t: &Topology, ep: IpAddr, dir: &std::path::Path) -> Self {
        let client_ip = Topology::client4(1);
        let xds = dir.join("ztunnel-xds.yaml");
        std::fs::write(
            &xds,
            format!(
                "workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: [{client_ip}]
  protocol: HBONE
  node: a
  network: \"\"
  services: {{}}
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: [{ep}]
  protocol: HBONE
  node: b
  network: \"\"
  services:
    default/bench.default.svc.cluster.local: {{7000: 7000, 7001: 7001}}
services:
- name: bench
  namespace: default
  hostname: bench.default.svc.cluster.local
  vips: [\"/{VIP}\"]
  ports: {{7000: 7000, 7001: 7001}}
"
            ),
        )
        .expect("ztunnel workloads");
        let start = |ns: &drover_tests::Netns, workload: &str, extra: &[(&str, &str)]| {
            let mut cmd = ns.command(bin);
            cmd.env("FAKE_CA", "true")
                .env("XDS_ADDRESS", "")
                .env("LOCAL_XDS_PATH", &xds)
                .env("PROXY_MODE", "dedicated")
                .env("PROXY_WORKLOAD_INFO", workload)
                .env("ZTUNNEL_WORKER_THREADS", "1")
                .env("PACKET_MARK", "1337")
                .env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            for (k, v) in extra {
                cmd.env(k, v);
            }
            Proc {
                child: cmd.spawn().expect("start ztunnel"),
            }
        };
        let procs = vec![
            start(&t.client, "default/client/client", &[]),
            start(
                &t.endpoints[0],
                "default/server/server",
                &[("ENABLE_ORIG_SRC", "false")],
            ),
        ];
        let ns = t.client.name.clone();
        let nat = |op: &str, rule: &[&str]| {
            let mut cmd = vec![
                "ip", "netns", "exec", &ns, "iptables", "-t", "nat", op, "OUTPUT", "-p", "tcp",
            ];
            cmd.extend(rule);
            sh(&cmd);
        };
        nat("-A", &["-m", "mark", "--mark", "1337", "-j", "RETURN"]);
        nat("-A", &["-d", VIP, "-j", "REDIRECT", "--to-ports", "15001"]);
        // Ready: both answer on their readiness port.
        for n in [&t.client, &t.endpoints[0]] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while n.connect("127.0.0.1:15021".parse().unwrap(), None).is_err() {
                assert!(std::time::Instant::now() < deadline, "ztunnel not ready");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        Self {
            _procs: procs,
            client_ns: ns,
        }
    }
}

impl Drop for Ztunnels {
    fn drop(&mut self) {
        for rule in [
            vec!["-m", "mark", "--mark", "1337", "-j", "RETURN"],
            vec!["-d", VIP, "-j", "REDIRECT", "--to-ports", "15001"],
        ] {
            let mut cmd = vec![
                "ip",
                "netns",
                "exec",
                &self.client_ns,
                "iptables",
                "-t",
                "nat",
                "-D",
                "OUTPUT",
                "-p",
                "tcp",
            ];
            cmd.extend(rule);
            sh(&cmd);
        }
    }
}
