//! `cargo xtask soak --minutes N`: the reliability suite (not in CI). Three endpoint namespaces
//! serve HTTP, TCP echo and TLS echo; one daemon captures the client namespace with three
//! services (HTTP, TCP, TCP with SIMPLE TLS origination). For N minutes it runs mixed load every
//! second while the configuration churns every 5 s (the endpoint set rotates; half the rewrites
//! are atomic renames, half truncate-then-write in place), sends SIGHUP at half time and restarts
//! the daemon at three quarters. It prints a timeline (requests, failures, p99, daemon RSS and
//! open fds) and fails if any request failed outside the restart window or if RSS or fds grew
//! without bound (last quarter against the second quarter).
#![expect(
    clippy::print_stdout,
    reason = "the soak report is printed for the developer"
)]

use std::{
    io::Write,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use clap::Parser;
use drover_tests::{Daemon, PinDir, Pki, Proc, Topology, probe, require_privileged};

const WEB_VIP: &str = "127.77.0.10";
const ECHO_VIP: &str = "127.77.0.11";
const TLS_VIP: &str = "127.77.0.12";

#[derive(Parser)]
struct Args {
    /// How long to soak.
    #[arg(long, default_value = "30")]
    minutes: f64,
    /// HTTP requests per second-long round.
    #[arg(long, default_value = "200")]
    http_per_round: u32,
}

/// One sample of the timeline.
struct Sample {
    at: Duration,
    requests: u64,
    failed: u64,
    p99_us: f64,
    rss_kib: u64,
    fds: u64,
}

fn main() {
    let args = Args::parse();
    assert!(require_privileged(), "the soak needs root");
    let t = Topology::new(3);
    let pki = Pki::new();
    let (cert, key) = pki.leaf("secure", &["secure.test.svc"], false, false);
    let mut servers = Vec::new();
    for i in 1..=3 {
        let ep = Topology::ep4(i);
        let ns = Some(&t.endpoints[i - 1]);
        let name = format!("ep{i}");
        servers.push(Proc::server(
            ns,
            "http",
            &[SocketAddr::new(ep, 9080)],
            &name,
        ));
        servers.push(Proc::server(
            ns,
            "echo",
            &[SocketAddr::new(ep, 7000)],
            &name,
        ));
        servers.push(Proc::server_with(
            ns,
            "echo",
            &[SocketAddr::new(ep, 7443)],
            &name,
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        ));
    }
    let dir = std::env::temp_dir().join(format!("drover-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("mesh.yaml");
    let ca = pki.path("ca.pem");
    std::fs::write(&cfg, config(&[1, 2, 3], &ca)).unwrap();
    let pins = PinDir::new();
    let daemon_args: Vec<String> = [
        "--config",
        cfg.to_str().unwrap(),
        "--pin-dir",
        pins.path.to_str().unwrap(),
        "--netns",
        &t.client.name,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut daemon = Daemon::start(&daemon_args).expect("daemon starts");

    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let start = Instant::now();
    let subsets: [&[usize]; 4] = [&[1, 2], &[2, 3], &[1, 3], &[1, 2, 3]];
    let (mut hup_sent, mut restarted) = (false, false);
    let mut restart_window: Option<(Duration, Duration)> = None;
    let mut samples = Vec::new();
    let (mut failed_outside, mut failed_restart, mut requests) = (0u64, 0u64, 0u64);
    let mut first_failure: Option<String> = None;
    let mut round = 0u64;
    let mut last_sample = Duration::ZERO;
    let (mut window_req, mut window_failed, mut window_p99) = (0u64, 0u64, 0f64);
    while start.elapsed() < total {
        round += 1;
        let now = start.elapsed();
        if round.is_multiple_of(5) {
            let eps = subsets[(round / 5) as usize % subsets.len()];
            rewrite(&cfg, &config(eps, &ca), round.is_multiple_of(10));
        }
        if !hup_sent && now >= total / 2 {
            hup_sent = true;
            let pid = nix::unistd::Pid::from_raw(daemon.pid().unwrap() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::SIGHUP).unwrap();
        }
        if !restarted && now >= total * 3 / 4 {
            restarted = true;
            let from = start.elapsed();
            daemon.stop();
            daemon = Daemon::start(&daemon_args).expect("daemon restarts");
            // Clients see the new daemon once it is ready; allow a second for the first round.
            restart_window = Some((from, start.elapsed() + Duration::from_secs(1)));
        }
        let (n, failed, p99, why) = load_round(&t, args.http_per_round);
        let in_restart = restart_window.is_some_and(|(a, b)| now >= a && now <= b);
        requests += n;
        window_req += n;
        window_failed += failed;
        window_p99 = window_p99.max(p99);
        if in_restart {
            failed_restart += failed;
        } else {
            failed_outside += failed;
            if failed > 0 && first_failure.is_none() {
                first_failure = why;
            }
        }
        if now - last_sample >= Duration::from_secs(10) || samples.is_empty() {
            let pid = daemon.pid().unwrap();
            samples.push(Sample {
                at: now,
                requests: window_req,
                failed: window_failed,
                p99_us: window_p99,
                rss_kib: rss_kib(pid),
                fds: fds(pid),
            });
            (window_req, window_failed, window_p99) = (0, 0, 0.0);
            last_sample = now;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop();

    println!("\nsoak: {:.1} min, {round} rounds\n", args.minutes);
    println!(
        "{:>8} {:>9} {:>7} {:>10} {:>10} {:>6}",
        "t (s)", "requests", "failed", "p99 µs", "RSS KiB", "fds"
    );
    for s in &samples {
        println!(
            "{:>8.0} {:>9} {:>7} {:>10.0} {:>10} {:>6}",
            s.at.as_secs_f64(),
            s.requests,
            s.failed,
            s.p99_us,
            s.rss_kib,
            s.fds
        );
    }
    // Growth: the last quarter against the second quarter (the first is warm-up), each read
    // from the same daemon process as far as possible (the restart starts a new one).
    let quarter = |q: usize| -> Vec<&Sample> {
        let (a, b) = (total * q as u32 / 4, total * (q as u32 + 1) / 4);
        samples.iter().filter(|s| s.at >= a && s.at < b).collect()
    };
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let (q2, q4) = (quarter(1), quarter(3));
    let rss2 = median(&mut q2.iter().map(|s| s.rss_kib).collect());
    let rss4 = median(&mut q4.iter().map(|s| s.rss_kib).collect());
    let fds2 = median(&mut q2.iter().map(|s| s.fds).collect());
    let fds4 = median(&mut q4.iter().map(|s| s.fds).collect());
    println!(
        "\nrequests {requests}; failed outside the restart window {failed_outside}, inside it {failed_restart}"
    );
    println!("RSS median: 2nd quarter {rss2} KiB, last quarter {rss4} KiB");
    println!("fds median: 2nd quarter {fds2}, last quarter {fds4}");
    let mut ok = true;
    if failed_outside > 0 {
        println!("FAIL: failed requests outside the restart window; first: {first_failure:?}");
        ok = false;
    }
    if rss4 > rss2 + rss2 / 4 + 8 * 1024 {
        println!("FAIL: RSS grew by more than 25 % + 8 MiB");
        ok = false;
    }
    if fds4 > fds2 + 16 {
        println!("FAIL: open fds grew");
        ok = false;
    }
    let _ = std::io::stdout().flush();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    if !ok {
        std::process::exit(1);
    }
    println!("soak passed");
}

/// The three services with endpoints `eps` (1-based endpoint namespaces).
fn config(eps: &[usize], ca: &str) -> String {
    let list = eps
        .iter()
        .map(|&i| format!("{{address: \"{}\"}}", Topology::ep4(i)))
        .collect::<Vec<_>>()
        .join(", ");
    let se = |name: &str, vip: &str, port: u16, proto: &str, target: u16| {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: test}}
spec:
  hosts: [{name}.test.svc]
  addresses: [\"{vip}\"]
  ports: [{{number: {port}, name: p, protocol: {proto}, targetPort: {target}}}]
  resolution: STATIC
  endpoints: [{list}]
"
        )
    };
    se("web", WEB_VIP, 80, "HTTP", 9080)
        + &se("echo", ECHO_VIP, 7000, "TCP", 7000)
        + &se("secure", TLS_VIP, 443, "TCP", 7443)
        + &format!(
            "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: test}}
spec:
  host: secure.test.svc
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}, sni: secure.test.svc}}
"
        )
}

/// Replaces the file atomically (rename), or in place: truncated, a pause, then written.
fn rewrite(path: &Path, yaml: &str, atomic: bool) {
    if atomic {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    } else {
        let mut f = std::fs::File::create(path).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        f.write_all(yaml.as_bytes()).unwrap();
    }
}

/// One round of mixed load: HTTP requests, TCP connects and TLS-originated connects. Returns
/// (requests, failed, HTTP p99 µs, first failure).
fn load_round(t: &Topology, http: u32) -> (u64, u64, f64, Option<String>) {
    let r = probe(
        Some(&t.client),
        None,
        &[
            "http",
            &format!("http://{WEB_VIP}/soak"),
            "--count",
            &http.to_string(),
            "--concurrency",
            "4",
            "--max-secs",
            "10",
        ],
    );
    let ok = r["status"]["200"].as_u64().unwrap_or(0);
    let mut failed = u64::from(http).saturating_sub(ok);
    let mut why = (failed > 0).then(|| format!("http: {r}"));
    let mut n = u64::from(http);
    for vip in [ECHO_VIP, ECHO_VIP, ECHO_VIP, TLS_VIP, TLS_VIP] {
        let port = if vip == TLS_VIP { 443 } else { 7000 };
        let c = probe(
            Some(&t.client),
            None,
            &["connect", &format!("{vip}:{port}"), "--send", "soak"],
        );
        n += 1;
        let good = c["greeting"]
            .as_str()
            .is_some_and(|g| g.starts_with("hello from ep"))
            && c["echo"] == "soak";
        if !good {
            failed += 1;
            why.get_or_insert_with(|| format!("{vip}:{port}: {c}"));
        }
    }
    (n, failed, r["p99_us"].as_f64().unwrap_or(0.0), why)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}
