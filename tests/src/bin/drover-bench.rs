//! `cargo xtask bench`: L4 request/response latency and bulk throughput from a client namespace to
//! an endpoint namespace, (a) direct, (b) through Drover with eBPF capture, (c) through the same
//! daemon fed by an iptables REDIRECT rule — in one run, printed as a table with ratios to direct.
#![expect(clippy::print_stdout, reason = "the bench reports on stdout")]

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
}

const VIP: &str = "127.77.0.10";

struct Row {
    name: &'static str,
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
    Row {
        name,
        rr,
        crr,
        bulk,
    }
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
    // SAFETY-free: access logs at info would dominate the measurement; keep the daemon at warn.
    // SAFETY: single-threaded at this point; the variable is read by child processes only.
    #[expect(unsafe_code, reason = "set_var before any thread is spawned")]
    unsafe {
        std::env::set_var("DROVER_TEST_LOG", "warn,drover::app=info");
    }

    let mut rows = vec![measure(
        &t,
        "direct",
        &ep.to_string(),
        args.count,
        args.bytes,
    )];

    let pins = PinDir::new();
    let mut a = Vec::new();
    quiet(&mut a, &pins);
    let mut d = Daemon::start(&a).expect("drover (ebpf) starts");
    rows.push(measure(&t, "drover-ebpf", VIP, args.count, args.bytes));
    d.stop();
    drop(pins);

    let rule = [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        VIP,
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    ];
    let ns = t.client.name.clone();
    let mut cmd = vec!["ip", "netns", "exec", &ns, "iptables"];
    cmd.extend(rule);
    sh(&cmd);
    let pins = PinDir::new();
    let mut a = vec!["--capture".to_string(), "iptables".to_string()];
    quiet(&mut a, &pins);
    let mut d = Daemon::start(&a).expect("drover (iptables) starts");
    rows.push(measure(&t, "drover-iptables", VIP, args.count, args.bytes));
    d.stop();

    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let direct = (
        f(&rows[0].rr, "p50_us"),
        f(&rows[0].crr, "p50_us"),
        f(&rows[0].bulk, "gbit_per_s"),
    );
    println!(
        "\nL4 benchmark: {} round trips of 64 B, {} connect+round-trip+close, {:.1} GiB bulk, one client",
        args.count,
        (args.count / 5).max(100),
        args.bytes as f64 / (1u64 << 30) as f64
    );
    println!(
        "{:<16} {:>10} {:>10} {:>11} {:>11} {:>10} {:>13} {:>13} {:>10}",
        "path",
        "rr p50 µs",
        "rr p99 µs",
        "crr p50 µs",
        "crr p99 µs",
        "Gbit/s",
        "+rr p50 µs",
        "+crr p50 µs",
        "tput/dir"
    );
    for r in &rows {
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>11.1} {:>11.1} {:>10.2} {:>13.1} {:>13.1} {:>10.2}",
            r.name,
            f(&r.rr, "p50_us"),
            f(&r.rr, "p99_us"),
            f(&r.crr, "p50_us"),
            f(&r.crr, "p99_us"),
            f(&r.bulk, "gbit_per_s"),
            f(&r.rr, "p50_us") - direct.0,
            f(&r.crr, "p50_us") - direct.1,
            f(&r.bulk, "gbit_per_s") / direct.2,
        );
    }
    println!("reproduce: cargo xtask bench --count {}", args.count);
}
