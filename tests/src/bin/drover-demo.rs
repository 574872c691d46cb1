//! `cargo xtask demo`: the bookinfo `reviews` endpoints (v1, v2, v3) in network namespaces, the
//! daemon capturing a client namespace and enforcing the walkthrough's DestinationRule subsets and
//! 50/50 VirtualService split, HTTP requests to the service VIP, and which endpoint served each
//! one. Halfway through, the VirtualService is rewritten to send everything to v2 and the daemon
//! hot-reloads it. Everything it creates is removed when it ends (duration or Ctrl-C).
#![expect(clippy::print_stdout, reason = "the demo reports on stdout")]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use drover_tests::{Daemon, PinDir, Proc, Topology};

static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "10")]
    duration: u64,
    #[arg(long, default_value = "deploy/examples/bookinfo")]
    config: PathBuf,
}

extern "C" fn on_sigint(_: std::ffi::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_sigint),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    #[expect(unsafe_code, reason = "installing a signal handler")]
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        nix::sys::signal::sigaction(nix::sys::signal::SIGINT, &action)?;
    }

    println!("== drover demo: bookinfo reviews v1/v2/v3 behind VIP 127.77.0.10:9080 ==");
    let topo = Topology::new(3);
    let _servers: Vec<Proc> = (1..=3)
        .map(|i| {
            let listen = [SocketAddr::new(Topology::ep4(i), 9080)];
            Proc::server(
                Some(&topo.endpoints[i - 1]),
                "http",
                &listen,
                &format!("reviews-v{i}"),
            )
        })
        .collect();
    println!(
        "endpoints: reviews-v1 198.18.1.2, reviews-v2 198.18.2.2, reviews-v3 198.18.3.2 (namespaces drv{}e1..3)",
        topo.id
    );
    let pins = PinDir::new();
    // Work on a copy: the second phase edits it.
    let config_dir = std::env::temp_dir().join(format!("drover-demo-{}", topo.id));
    std::fs::create_dir_all(&config_dir)?;
    let config = config_dir.join("reviews.yaml");
    let mut original = String::new();
    for entry in std::fs::read_dir(&args.config)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            original.push_str(&std::fs::read_to_string(&path)?);
            original.push_str("\n---\n");
        }
    }
    std::fs::write(&config, &original)?;
    let daemon_args: Vec<String> = vec![
        "--config".into(),
        config.display().to_string(),
        "--netns".into(),
        topo.client.name.clone(),
        "--pin-dir".into(),
        pins.path.display().to_string(),
    ];
    let mut daemon = match Daemon::start(&daemon_args) {
        Ok(d) => d,
        Err((code, log)) => anyhow::bail!("drover did not start ({code:?}):\n{log}"),
    };
    println!(
        "drover running; client namespace {} captured; sending requests…\n",
        topo.client.name
    );

    let half = Duration::from_secs(args.duration) / 2;
    println!("phase 1 ({half:?}): VirtualService reviews-traffic-split, subsets v1 50 / v2 50");
    let phase1 = requests(&topo, half);
    let promoted = original.replace("subset: v1}", "subset: v2}");
    let tmp = config.with_extension("tmp");
    std::fs::write(&tmp, promoted)?;
    std::fs::rename(&tmp, &config)?;
    if !daemon.wait_log("configuration reloaded", Duration::from_secs(5)) {
        anyhow::bail!("drover did not reload:\n{}", daemon.log());
    }
    println!("\nphase 2 ({half:?}): VirtualService rewritten to v2 100 (hot reload, no restart)");
    let phase2 = requests(&topo, half);

    for (name, (n, failures, counts)) in [("phase 1", phase1), ("phase 2", phase2)] {
        println!("\n== {name}: {n} requests, {failures} failed ==");
        for (pod, c) in &counts {
            println!(
                "  {pod:<12} {c:>4}  ({:.0}%)",
                f64::from(*c) * 100.0 / f64::from(n.max(1))
            );
        }
    }
    daemon.stop();
    let log = daemon.log();
    if let Some(line) = log.lines().find(|l| l.contains("configuration reloaded")) {
        println!("\ndrover: {}", line.trim());
    }
    let access = log.lines().filter(|l| l.contains("drover::access")).count();
    println!("drover logged {access} access lines; cleaning up namespaces and pins");
    let _ = std::fs::remove_dir_all(&config_dir);
    Ok(())
}

/// Sends requests for `len` (bounded to 10 000), returning (sent, failed, served by endpoint).
fn requests(topo: &Topology, len: Duration) -> (u32, u32, BTreeMap<String, u32>) {
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures = 0u32;
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < len && !STOP.load(Ordering::SeqCst) && n < 10_000 {
        n += 1;
        let out = topo
            .client
            .command("curl")
            .args([
                "-s",
                "--max-time",
                "3",
                "http://127.77.0.10:9080/reviews/123",
            ])
            .output();
        let Ok(out) = out else {
            failures += 1;
            continue;
        };
        let body = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<serde_json::Value>(body.trim())
            .ok()
            .and_then(|v| v["podname"].as_str().map(String::from))
        {
            Some(pod) => {
                println!("request {n:>3} → {pod}");
                *counts.entry(pod).or_default() += 1;
            }
            None => {
                println!(
                    "request {n:>3} → failed (curl exit {:?})",
                    out.status.code()
                );
                failures += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (n, failures, counts)
}
