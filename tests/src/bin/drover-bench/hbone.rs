//! Pod to pod across two nodes: direct, through Drover in plaintext (one node's daemon), through
//! two Drover nodes over HBONE (mutual TLS 1.3, HTTP/2 `CONNECT`, the pool warm), and — with
//! `ZTUNNEL_BIN` — through two ztunnels over HBONE (dedicated mode, fake CA, one worker each).
//! Round trips of 64 B (p50/p99), connect + round trip + close, and bulk throughput; one
//! worker per proxy; interleaved rounds, medians with [min–max].

use std::net::IpAddr;

use drover_tests::{Daemon, PinDir, Proc, Topology, write_config};

use super::{Row, VIP, measure};

/// The measured paths, in the order of a round.
const PATHS: [&str; 4] = ["direct", "drover-plain", "drover-hbone", "ztunnel-hbone"];

/// Runs `rounds` interleaved rounds of `count` round trips and `bytes` of bulk per path.
pub fn run(t: &Topology, ep: IpAddr, (count, bytes, rounds): (u32, u64, usize)) {
    let dir = drover_tests::Pki::new();
    let mesh = dir.mesh_ca();
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
        let mut daemons = vec![mesh_node(&cfg, mesh, &t.client.name, "client", None)];
        if hbone {
            daemons.push(mesh_node(
                &cfg,
                mesh,
                &t.endpoints[0].name,
                "server",
                Some(&[]),
            ));
        }
        Self { _daemons: daemons }
    }
}

/// A Drover node of namespace `test` (one worker, identities from `mesh`) capturing `netns` as
/// service account `sa`; with `inbound`, terminating its inbound side too (`--inbound-pods`,
/// and these flags).
pub fn mesh_node(
    cfg: &std::path::Path,
    mesh: &str,
    netns: &str,
    sa: &str,
    inbound: Option<&[&str]>,
) -> (Daemon, PinDir) {
    let pins = PinDir::new();
    let mut a = drover_tests::args(
        cfg,
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
    if let Some(flags) = inbound {
        a.push("--inbound-pods".into());
        a.extend(flags.iter().map(|f| f.to_string()));
    }
    (Daemon::start(&a).expect("drover starts"), pins)
}

/// Two ztunnels in dedicated mode with the fake CA: one in the client's namespace (capturing
/// the VIP), one in the endpoint's (HBONE on 15008).
struct Ztunnels<'t> {
    _procs: Vec<Proc>,
    client: &'t drover_tests::Netns,
}

impl<'t> Ztunnels<'t> {
    fn start(bin: &std::path::Path, t: &'t Topology, ep: IpAddr, dir: &std::path::Path) -> Self {
        use drover_tests::ztunnel::{self, Workload};
        let xds = dir.join("ztunnel-xds.yaml");
        let (client, server) = (
            Workload {
                namespace: "default",
                name: "client",
                service_account: "client",
                ip: Topology::client4(1),
            },
            Workload {
                namespace: "default",
                name: "server",
                service_account: "server",
                ip: ep,
            },
        );
        ztunnel::write_workloads(
            &xds,
            (&client, &server),
            ("bench", VIP, &[(7000, 7000), (7001, 7001)]),
        );
        let fake = [("FAKE_CA", "true")];
        let procs = vec![
            ztunnel::start(
                bin,
                &t.client,
                (dir, None),
                ("default/client/client", &xds),
                &fake,
            ),
            ztunnel::start(
                bin,
                &t.endpoints[0],
                (dir, None),
                ("default/server/server", &xds),
                &fake,
            ),
        ];
        ztunnel::capture(&t.client, VIP, "-A");
        Self {
            _procs: procs,
            client: &t.client,
        }
    }
}

impl Drop for Ztunnels<'_> {
    fn drop(&mut self) {
        drover_tests::ztunnel::capture(self.client, VIP, "-D");
    }
}
