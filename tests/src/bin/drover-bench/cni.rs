//! Pod start overhead of `drover-cni`: `--cni-pods` pods started and removed (`podman run --rm`
//! of a command that exits at once) on a network with the plugin chained and a daemon serving
//! it, then as many on the same network with the bridge plugin alone; p50/p99 of each and the
//! difference. Rounds alternate so that drift hits both alike.
//!
//! Then the upgrade: connect-request-close load from a pod through the daemon for 8 s, steady,
//! and again while a new daemon takes over (at 2 s) and the old one is stopped (at 4 s): failed
//! connections, p50 and p99 of each.

use std::time::{Duration, Instant};

use drover_tests::{Daemon, PinDir, podman::Bed};

/// The service VIP (loopback inside the pods).
const VIP: &str = "127.77.0.60";

/// Runs the measurement with `pods` pods per chain.
pub fn run(pods: usize) {
    let bed = Bed::new(250, None);
    let pins = PinDir::new();
    let cfg = drover_tests::write_config("");
    let _daemon = Daemon::start(&drover_tests::args(
        &cfg,
        &pins,
        &[
            "--allow-empty",
            "--cni-socket",
            &bed.socket.display().to_string(),
        ],
    ))
    .expect("daemon starts");
    let chained = std::fs::read_to_string(bed.conflist()).expect("conflist");
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for i in 0..pods {
        for plugin in [true, false] {
            if plugin {
                std::fs::write(bed.conflist(), &chained).expect("conflist");
            } else {
                bed.write_network();
            }
            let started = Instant::now();
            let out = bed.run(
                &format!("p{i}{plugin}"),
                20,
                &["/bin/drover-probe", "--help"],
            );
            let took = started.elapsed();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if plugin { &mut with } else { &mut without }.push(took);
        }
    }
    let (w50, w99) = (percentile(&mut with, 50), percentile(&mut with, 99));
    let (o50, o99) = (percentile(&mut without, 50), percentile(&mut without, 99));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("\ndrover-cni pod start overhead ({pods} pods per chain, podman run --rm, runc)");
    println!("  {:<26} {:>9} {:>9}", "chain", "p50 ms", "p99 ms");
    println!("  {:<26} {:>9.1} {:>9.1}", "bridge", ms(o50), ms(o99));
    println!(
        "  {:<26} {:>9.1} {:>9.1}",
        "bridge + drover-cni",
        ms(w50),
        ms(w99)
    );
    println!(
        "  {:<26} {:>9.1} {:>9.1}",
        "added by drover-cni",
        ms(w50) - ms(o50),
        ms(w99) - ms(o99)
    );
    println!("reproduce: cargo xtask bench -- --only cni --cni-pods {pods}");
    drop(_daemon);
    std::fs::write(bed.conflist(), &chained).expect("conflist");
    upgrade(&bed, &cfg);
}

/// The upgrade under load (see the module doc).
fn upgrade(bed: &Bed, cfg: &std::path::Path) {
    let pins = PinDir::new();
    let args = |extra: &str| {
        let socket = bed.socket.display().to_string();
        let mut a = drover_tests::args(cfg, &pins, &["--allow-empty", "--cni-socket", &socket]);
        a.push(extra.to_string());
        a
    };
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: echo, namespace: default}}\nspec:\n  hosts: [echo.default.svc]\n  addresses: [{VIP}]\n  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}]\n  resolution: STATIC\n  endpoints: [{{address: {}10}}]\n",
        bed.prefix
    );
    std::fs::write(cfg, yaml).expect("config");
    let old = Daemon::start(&args("--no-watch")).expect("daemon starts");
    let listen = |host: u8, port: u16| format!("{}{host}:{port}", bed.prefix);
    bed.start(
        "srv",
        10,
        &["/bin/drover-testsrv", "echo", "--listen", &listen(10, 7000)],
    );
    // One client pod per run: connections that close leave TIME_WAIT entries in the pod's
    // namespace, which would slow the second run's connects.
    bed.start(
        "cli",
        11,
        &["/bin/drover-testsrv", "echo", "--listen", &listen(11, 7001)],
    );
    bed.start(
        "cli2",
        12,
        &["/bin/drover-testsrv", "echo", "--listen", &listen(12, 7001)],
    );
    std::thread::sleep(Duration::from_secs(1));
    let load = |pod: &str| {
        let out = bed.exec(
            pod,
            &[
                "/bin/drover-probe",
                "crr",
                &format!("{VIP}:80"),
                "--count",
                "10000000",
                "--max-secs",
                "8",
            ],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let (handover, new) = std::thread::scope(|s| {
        let running = s.spawn(|| load("cli"));
        std::thread::sleep(Duration::from_secs(2));
        let new = Daemon::start(&args("--no-watch")).expect("new daemon starts");
        std::thread::sleep(Duration::from_secs(2));
        drop(old);
        (running.join().expect("load"), new)
    });
    let steady = load("cli2");
    drop(new);
    println!("\nupgrade under load (connect, request, close from a pod; 8 s each)");
    println!(
        "  {:<28} {:>8} {:>8} {:>9} {:>9}",
        "run", "conns", "failed", "p50 ms", "p99 ms"
    );
    // (The probe stops at its first failure: "failed" is 0 or 1.)
    for (name, v) in [
        ("steady", &steady),
        ("handover + old daemon stop", &handover),
    ] {
        let failed = u32::from(v.get("error").is_some());
        println!(
            "  {:<28} {:>8} {:>8} {:>9.2} {:>9.2}",
            name,
            v["n"].as_u64().unwrap_or(0),
            failed,
            v["p50_us"].as_f64().unwrap_or(0.0) / 1000.0,
            v["p99_us"].as_f64().unwrap_or(0.0) / 1000.0,
        );
    }
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(v.len() - 1)]
}
