//! The peers report: `report.md` (tables of medians with their spread, the goals as
//! ratios measured in this run) and one SVG bar chart per metric, min–max as whiskers.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use plotters::prelude::*;

/// What is measured per peer and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    Rps,
    ClosedP99,
    CpuPerRequest,
    FixedP50,
    FixedP99,
    Bulk,
    IdleKib,
    H2Rps,
    H2CpuPerRequest,
    TlsConnsPerSec,
    TlsCpuPerConn,
    TlsBulk,
    GrpcRps,
    GrpcP99,
}

impl Metric {
    const ALL: [Metric; 14] = [
        Metric::Rps,
        Metric::ClosedP99,
        Metric::CpuPerRequest,
        Metric::H2Rps,
        Metric::H2CpuPerRequest,
        Metric::GrpcRps,
        Metric::GrpcP99,
        Metric::FixedP50,
        Metric::FixedP99,
        Metric::Bulk,
        Metric::TlsConnsPerSec,
        Metric::TlsCpuPerConn,
        Metric::TlsBulk,
        Metric::IdleKib,
    ];

    fn label(self) -> &'static str {
        match self {
            Metric::Rps => "HTTP/1.1 req/s (wrk -t1 -c16)",
            Metric::ClosedP99 => "HTTP/1.1 p99 µs under wrk",
            Metric::CpuPerRequest => "proxy CPU µs per request",
            Metric::FixedP50 => "p50 µs at a fixed rate",
            Metric::FixedP99 => "p99 µs at a fixed rate",
            Metric::Bulk => "L4 bulk Gbit/s",
            Metric::IdleKib => "KiB per idle HTTP keep-alive connection",
            Metric::H2Rps => "HTTP/2 req/s (h2load -c16 -m1)",
            Metric::H2CpuPerRequest => "proxy CPU µs per HTTP/2 request",
            Metric::TlsConnsPerSec => "mTLS origination: connections/s (one handshake each)",
            Metric::TlsCpuPerConn => "proxy CPU µs per mTLS connection",
            Metric::TlsBulk => "mTLS origination: bulk Gbit/s",
            Metric::GrpcRps => "gRPC unary calls/s (16 in flight, one channel)",
            Metric::GrpcP99 => "gRPC unary p99 µs",
        }
    }

    fn file(self) -> &'static str {
        match self {
            Metric::Rps => "rps.svg",
            Metric::ClosedP99 => "closed_p99.svg",
            Metric::CpuPerRequest => "cpu_per_request.svg",
            Metric::FixedP50 => "fixed_p50.svg",
            Metric::FixedP99 => "fixed_p99.svg",
            Metric::Bulk => "bulk.svg",
            Metric::IdleKib => "idle_kib.svg",
            Metric::H2Rps => "h2_rps.svg",
            Metric::H2CpuPerRequest => "h2_cpu_per_request.svg",
            Metric::TlsConnsPerSec => "tls_conns.svg",
            Metric::TlsCpuPerConn => "tls_cpu_per_conn.svg",
            Metric::TlsBulk => "tls_bulk.svg",
            Metric::GrpcRps => "grpc_rps.svg",
            Metric::GrpcP99 => "grpc_p99.svg",
        }
    }
}

/// Closed-loop (connections, req/s, p99 µs, errors) points of one peer, as connections grow.
pub struct Curve {
    pub name: &'static str,
    pub points: Vec<(u32, f64, f64, u64)>,
}

impl Curve {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            points: Vec::new(),
        }
    }
}

/// Every round's value of every metric, for one peer.
pub struct Samples {
    pub name: &'static str,
    values: BTreeMap<Metric, Vec<f64>>,
}

impl Samples {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            values: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, m: Metric, v: f64) {
        self.values.entry(m).or_default().push(v);
    }

    /// (median, min, max), if measured.
    fn summary(&self, m: Metric) -> Option<(f64, f64, f64)> {
        let mut v = self.values.get(&m)?.clone();
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some((v[v.len() / 2], v[0], v[v.len() - 1]))
    }

    fn median(&self, m: Metric) -> f64 {
        self.summary(m).map_or(f64::NAN, |s| s.0)
    }
}

/// Writes `report.md` and the plots into `dir`; returns the markdown.
pub fn write(
    dir: &Path,
    samples: &[Samples],
    (curves, endpoints): (&[Curve], &[Curve]),
    command: &str,
) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Drover and the peers users would pick instead\n");
    let _ = writeln!(
        md,
        "One run on this machine ({} CPUs, kernel {}). Each proxy has one worker; the origin is \
         nginx (one worker) serving 1 KiB; every path runs in the same client namespace. Rounds \
         are interleaved (each round starts with the next peer); cells are the median with \
         [min–max] over the rounds.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let _ = write!(md, "| |");
    for s in samples {
        let _ = write!(md, " {} |", s.name);
    }
    let _ = write!(md, "\n|---|");
    for _ in samples {
        let _ = write!(md, "---|");
    }
    let _ = writeln!(md);
    for m in Metric::ALL {
        let _ = write!(md, "| {} |", m.label());
        for s in samples {
            match s.summary(m) {
                Some((med, lo, hi)) => {
                    let _ = write!(md, " {} [{}–{}] |", fmt(med), fmt(lo), fmt(hi));
                }
                None => {
                    let _ = write!(md, " — |");
                }
            }
        }
        let _ = writeln!(md);
    }
    goals(&mut md, samples);
    let _ = writeln!(md, "\n## Plots\n");
    for m in Metric::ALL {
        let bars: Vec<_> = samples
            .iter()
            .filter_map(|s| s.summary(m).map(|v| (s.name, v)))
            .collect();
        if bars.is_empty() {
            continue;
        }
        chart(&dir.join(m.file()), m.label(), &bars)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = writeln!(md, "![{}]({})\n", m.label(), m.file());
    }
    growth(&mut md, dir, curves, &CONNECTIONS)?;
    growth(&mut md, dir, endpoints, &ENDPOINTS)?;
    let _ = writeln!(md, "Reproduce: `{command}`");
    std::fs::write(dir.join("report.md"), &md)?;
    Ok(md)
}

/// What a set of curves is plotted against.
pub struct Axis {
    /// The section's heading.
    pub heading: &'static str,
    /// The x quantity (table column and axis label).
    pub x: &'static str,
    /// Prefix of the plot files.
    pub file: &'static str,
}

/// Concurrent connections (`wrk -cN`) through every peer.
pub const CONNECTIONS: Axis = Axis {
    heading: "Cost growth (`wrk -t1 -cN`, one pass)",
    x: "connections",
    file: "growth",
};

/// Endpoints in Drover's one cluster (`wrk -t1 -c16`).
pub const ENDPOINTS: Axis = Axis {
    heading: "Cost growth with endpoints in one cluster (Drover, LEAST_REQUEST, `wrk -t1 -c16`, one pass)",
    x: "endpoints",
    file: "endpoints",
};

/// A cost-growth table and its two plots (req/s and p99 against the axis).
fn growth(md: &mut String, dir: &Path, curves: &[Curve], axis: &Axis) -> std::io::Result<()> {
    if curves.iter().all(|c| c.points.is_empty()) {
        return Ok(());
    }
    let _ = writeln!(
        md,
        "## {}\n\n| {} | {} |\n|---|{}",
        axis.heading,
        axis.x,
        curves
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(curves.len())
    );
    for (i, (n, ..)) in curves[0].points.iter().enumerate() {
        let cells: Vec<String> = curves
            .iter()
            .map(|c| {
                c.points.get(i).map_or("—".into(), |p| {
                    let errors = if p.3 > 0 {
                        format!(", {} errors", p.3)
                    } else {
                        String::new()
                    };
                    format!("{} req/s, p99 {} µs{errors}", fmt(p.1), fmt(p.2))
                })
            })
            .collect();
        let _ = writeln!(md, "| {n} | {} |", cells.join(" | "));
    }
    let _ = writeln!(md);
    for (suffix, what, pick) in [("rps", "req/s", 1), ("p99", "p99 µs", 2)] {
        let file = format!("{}_{suffix}.svg", axis.file);
        let title = format!("{what} against {}", axis.x);
        line_chart(&dir.join(&file), &title, curves, pick, axis.x)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = writeln!(md, "![{title}]({file})\n");
    }
    Ok(())
}

/// One line per peer: `pick` 1 = req/s, 2 = p99, against log2(x).
fn line_chart(
    path: &Path,
    title: &str,
    curves: &[Curve],
    pick: usize,
    x_desc: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let value = |p: &(u32, f64, f64, u64)| if pick == 1 { p.1 } else { p.2 };
    let top = curves
        .iter()
        .flat_map(|c| c.points.iter().map(value))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.15
        + f64::EPSILON;
    let right = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| f64::from(p.0.max(1)).log2()))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (720, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..right, 0.0..top)?;
    c.configure_mesh()
        .x_desc(x_desc)
        .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
        .draw()?;
    let palette = [
        RGBColor(0x55, 0x55, 0x55),
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
    ];
    for (i, curve) in curves.iter().enumerate() {
        let color = palette[i % palette.len()];
        c.draw_series(LineSeries::new(
            curve
                .points
                .iter()
                .map(|p| (f64::from(p.0.max(1)).log2(), value(p))),
            color.stroke_width(2),
        ))?
        .label(curve.name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The goals as ratios of this run's medians.
fn goals(md: &mut String, samples: &[Samples]) {
    let by = |name: &str| samples.iter().find(|s| s.name.starts_with(name));
    let (Some(direct), Some(drover)) = (by("direct"), by("drover")) else {
        return;
    };
    let _ = writeln!(md, "\n## Goals (ratios of medians in this run)\n");
    let mut goal = |text: String, met: bool| {
        let _ = writeln!(md, "- {text}: **{}**", if met { "met" } else { "missed" });
    };
    let m = |s: &Samples, k| s.median(k);
    if let Some(h) = by("haproxy") {
        let r = m(drover, Metric::Rps) / m(h, Metric::Rps);
        goal(format!("HTTP req/s ≥ 1.1× HAProxy: {r:.2}×"), r >= 1.1);
        let (a, b) = (
            m(drover, Metric::CpuPerRequest),
            m(h, Metric::CpuPerRequest),
        );
        goal(
            format!("CPU per request ≤ HAProxy's: {a:.1} µs vs {b:.1} µs"),
            a <= b,
        );
        let base = m(direct, Metric::FixedP99);
        let (a, b) = (
            m(drover, Metric::FixedP99) - base,
            m(h, Metric::FixedP99) - base,
        );
        goal(
            format!("added p99 at a fixed rate ≤ HAProxy's: +{a:.0} µs vs +{b:.0} µs"),
            a <= b,
        );
    }
    if let Some(e) = by("envoy") {
        let r = m(drover, Metric::Bulk) / m(e, Metric::Bulk);
        goal(format!("L4 bulk ≥ 1.2× Envoy tcp_proxy: {r:.2}×"), r >= 1.2);
        let r = m(drover, Metric::TlsConnsPerSec) / m(e, Metric::TlsConnsPerSec);
        goal(format!("mTLS handshakes/s ≥ 1.1× Envoy: {r:.2}×"), r >= 1.1);
        let r = m(drover, Metric::TlsBulk) / m(e, Metric::TlsBulk);
        goal(format!("mTLS bulk ≥ 1.0× Envoy: {r:.2}×"), r >= 1.0);
    }
    let r = m(drover, Metric::Bulk) / m(direct, Metric::Bulk);
    goal(format!("L4 bulk ≥ 0.8× direct: {r:.2}×"), r >= 0.8);
    let k = m(drover, Metric::IdleKib);
    if k.is_finite() {
        goal(
            format!("idle HTTP keep-alive ≤ 12 KiB per connection: {k:.1} KiB"),
            k <= 12.0,
        );
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A bar per peer (median) with a min–max whisker.
fn chart(
    path: &Path,
    title: &str,
    bars: &[(&str, (f64, f64, f64))],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (720, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = bars.iter().map(|(_, v)| v.2).fold(0.0, f64::max) * 1.15 + f64::EPSILON;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..bars.len() as f64, 0.0..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = *x - 0.5;
            if i.fract().abs() < 1e-9 && i >= 0.0 {
                bars.get(i as usize)
                    .map(|b| b.0.to_string())
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    c.draw_series(bars.iter().enumerate().map(|(i, (name, v))| {
        let color = if name.starts_with("drover") {
            RGBColor(0x1f, 0x77, 0xb4)
        } else {
            RGBColor(0xaa, 0xaa, 0xaa)
        };
        Rectangle::new(
            [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, v.0)],
            color.filled(),
        )
    }))?;
    c.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        PathElement::new(vec![(i as f64 + 0.5, v.1), (i as f64 + 0.5, v.2)], BLACK)
    }))?;
    root.present()?;
    Ok(())
}

/// One Kubernetes-mode measurement: a size and an identity count.
pub struct KubeRow {
    pub services: usize,
    pub identities: usize,
    pub ready_s: f64,
    pub rss_mib: u64,
    pub rss_after_mib: u64,
    /// EndpointSlice change → first connection routed by it: (p50, p99) ms.
    pub change: (f64, f64),
    /// The daemon's CPU time per change, ms.
    pub cpu_ms: f64,
    /// `drover-cni ADD` → enrolled while changes stream in: (p50, p99) ms.
    pub add: (f64, f64),
    /// A DestinationRule edit → the patched snapshots swapped in, as the daemon logs it:
    /// (p50, p99) ms.
    pub rule: (f64, f64),
}

impl KubeRow {
    /// The table's head, as [`KubeRow::markdown`] fills it.
    pub const HEADER: &str = "| Services | identities | start → ready | RSS ready | RSS after \
         changes | change p50 / p99 | CPU per change | CNI ADD p50 / p99 | DR edit p50 / p99 \
         |\n|---|---|---|---|---|---|---|---|---|";

    /// The row of the table.
    pub fn markdown(&self) -> String {
        format!(
            "| {} | {} | {:.1} s | {} MiB | {} MiB | {:.0} / {:.0} ms | {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms |",
            self.services,
            self.identities,
            self.ready_s,
            self.rss_mib,
            self.rss_after_mib,
            self.change.0,
            self.change.1,
            self.cpu_ms,
            self.add.0,
            self.add.1,
            self.rule.0,
            self.rule.1
        )
    }
}

/// Writes `kube.md` (the table) and one plot per quantity against the identities on the node,
/// a line per Service count; returns the report's path.
pub fn kube(dir: &Path, rows: &[KubeRow], command: &str) -> std::io::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Kubernetes mode at node scale\n\nOne run on this machine ({} CPUs). Each Service has \
         10 endpoints and a DestinationRule with two subsets.\n\n{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        KubeRow::HEADER
    );
    for r in rows {
        let _ = writeln!(md, "{}", r.markdown());
    }
    let _ = writeln!(md);
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.services).collect();
    sizes.dedup();
    type Pick = fn(&KubeRow) -> f64;
    let quantities: [(&str, &str, Pick); 4] = [
        ("kube_rss", "RSS once ready, MiB", |r| r.rss_mib as f64),
        (
            "kube_change_p99",
            "EndpointSlice change → routed, p99 ms",
            |r| r.change.1,
        ),
        ("kube_add_p99", "CNI ADD → enrolled, p99 ms", |r| r.add.1),
        ("kube_cpu", "CPU per change, ms", |r| r.cpu_ms),
    ];
    for (file, title, pick) in quantities {
        let curves: Vec<Curve> = sizes
            .iter()
            .map(|&n| Curve {
                // Leaked: a handful of labels for the life of the bench.
                name: Box::leak(format!("{n} Services").into_boxed_str()),
                points: (rows.iter().filter(|r| r.services == n))
                    .map(|r| (r.identities as u32, pick(r), 0.0, 0))
                    .collect(),
            })
            .collect();
        let file = format!("{file}.svg");
        line_chart(
            &dir.join(&file),
            title,
            &curves,
            1,
            "identities on the node",
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = writeln!(md, "![{title}]({file})\n");
    }
    let _ = writeln!(md, "Reproduce: `{command}`");
    let path = dir.join("kube.md");
    std::fs::write(&path, &md)?;
    Ok(path)
}
