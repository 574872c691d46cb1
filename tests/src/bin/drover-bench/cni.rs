//! Pod start overhead of `drover-cni`: `--cni-pods` pods started and removed (`podman run --rm`
//! of a command that exits at once) on a network with the plugin chained and a daemon serving
//! it, then as many on the same network with the bridge plugin alone; p50/p99 of each and the
//! difference. Rounds alternate so that drift hits both alike.

use std::time::{Duration, Instant};

use drover_tests::{Daemon, PinDir, podman::Bed};

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
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(v.len() - 1)]
}
