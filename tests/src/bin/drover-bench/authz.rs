//! What AuthorizationPolicy enforcement costs on a pod's inbound side.
//!
//! 1. The decision alone, in process: `Authorizer::check` for a new mTLS connection (L4) and for
//!    an HTTP request, with 1, 5, 20 and 50 policies selecting the pod (half DENY that do not
//!    match, then ALLOW policies of which only the last matches: every rule is walked), and the
//!    per-snapshot selection of the applying policies.
//! 2. Through the kernel path, two nodes over HBONE: the server node's CPU per new connection
//!    (TCP connect + round trip + close) and per HTTP/1.1 request (keep-alive), with no policy,
//!    20 L4 policies, and 20 policies with HTTP rules (each request parsed and checked on the
//!    inbound side); and with no policy but `--inbound-http-metrics` (each request parsed and
//!    counted with `reporter="destination"`).

use std::{net::IpAddr, time::Instant};

use drover_tests::{Proc, Topology, probe, write_config};

use super::{VIP, cpu_ns, hbone::mesh_node};

/// `n` policies in namespace `test` selecting every pod of it: DENY policies for other
/// namespaces, then ALLOW policies for other principals, the last one allowing `client`
/// (`http`: `GET /api/*` on HTTP, and TCP to port 7000 by a second rule).
fn policies(n: usize, http: bool) -> String {
    let mut out = String::new();
    for i in 0..n {
        let last = i + 1 == n;
        let (action, rule) = if i < n / 2 {
            (
                "DENY",
                format!(
                    "from: [{{source: {{namespaces: [other{i}]}}}}]\n    to: [{{operation: {{ports: ['{}']}}}}]",
                    9000 + i
                ),
            )
        } else {
            let who = if last {
                "client".to_string()
            } else {
                format!("sa{i}")
            };
            let to = if http {
                "to: [{operation: {methods: [GET, HEAD], paths: ['/api/*', '/']}}]"
            } else {
                "to: [{operation: {notPorts: ['22']}}]"
            };
            let mut rule = format!(
                "from: [{{source: {{principals: [cluster.local/ns/test/sa/{who}]}}}}]\n    {to}"
            );
            if http && last {
                rule += "\n  - from: [{source: {principals: [cluster.local/ns/test/sa/client]}}]\n    to: [{operation: {ports: ['7000']}}]";
            }
            ("ALLOW", rule)
        };
        out += &format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: test}}\nspec:\n  action: {action}\n  rules:\n  - {rule}\n"
        );
    }
    out
}

/// Nanoseconds per call of `f`, median of 5 runs of `iters` calls.
pub fn per_call(iters: u32, mut f: impl FnMut() -> bool) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            let mut kept = 0u32;
            for _ in 0..iters {
                kept += u32::from(std::hint::black_box(f()));
            }
            std::hint::black_box(kept);
            start.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

/// Part 1: the decision in process.
fn decisions() {
    println!(
        "\nAuthorizationPolicy decision, in process (median of 5 runs; every policy walked, the last ALLOW matches)"
    );
    println!(
        "{:>9} {:>18} {:>20} {:>22}",
        "policies", "L4 check ns", "HTTP check ns", "selection/snapshot µs"
    );
    let client = drover::registry::Client {
        namespace: "test".into(),
        ..Default::default()
    };
    let addr: IpAddr = "198.18.1.2".parse().unwrap();
    for n in [1usize, 5, 20, 50] {
        let row: Vec<f64> = [false, true]
            .iter()
            .map(|http| {
                let cfg = write_config(&policies(n, *http));
                let reg = drover::reload::snapshot(&[cfg], None, &client).expect("policies load");
                let authz = reg.authorizer(&[addr]);
                assert_eq!(authz.policies().count(), n);
                let headers = hyper::HeaderMap::new();
                let base = drover::authz::Attributes {
                    principal: Some("cluster.local/ns/test/sa/client"),
                    source: "198.18.1.1".parse().unwrap(),
                    remote: "198.18.1.1".parse().unwrap(),
                    destination: std::net::SocketAddr::new(addr, 9080),
                    sni: None,
                    http: None,
                };
                if *http {
                    let req = drover::authz::Attributes {
                        http: Some(drover::authz::Http {
                            host: "web.test.svc:9080",
                            method: "GET",
                            path: "/api/items",
                            headers: &headers,
                        }),
                        ..base.clone()
                    };
                    assert!(authz.check(&req).allowed);
                    per_call(200_000, || {
                        let path = drover::authz::PathNormalization::Base.apply("/api/items");
                        let mut r = req.clone();
                        if let Some(h) = r.http.as_mut() {
                            h.path = &path;
                        }
                        authz.check(&r).allowed
                    })
                } else {
                    assert!(authz.check(&base).allowed);
                    let l4 = per_call(200_000, || authz.check(&base).allowed);
                    let select = per_call(2_000, || !reg.authorizer(&[addr]).is_empty());
                    print!("{n:>9} {l4:>18.0}");
                    select / 1000.0
                }
            })
            .collect();
        println!(" {:>20.0} {:>22.1}", row[1], row[0]);
    }
}

/// Part 2's measurements: the server node's CPU per connection and per request.
struct Cost {
    conn_us: f64,
    request_us: f64,
    conn_p50: f64,
    request_p50: f64,
}

fn through_nodes(
    t: &Topology,
    ep: IpAddr,
    mesh: &str,
    (extra, flags): (&str, &[&str]),
    count: u32,
) -> Cost {
    let cfg = write_config(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: web, namespace: test}}\nspec:\n  hosts: [web.test.svc]\n  addresses: [{VIP}]\n  ports: [{{number: 7000, name: tcp-rr}}, {{number: 9080, name: http}}]\n  resolution: STATIC\n  endpoints: [{{address: {ep}, serviceAccount: server, labels: {{ambient.istio.io/redirection: enabled}}}}]\n{extra}"
    ));
    let (server, _p1) = mesh_node(&cfg, mesh, &t.endpoints[0].name, "server", Some(flags));
    let (_client, _p2) = mesh_node(&cfg, mesh, &t.client.name, "client", None);
    let pid = server.pid().expect("pid");
    // Warm: the pooled HBONE connection and the first snapshot's policy selection.
    probe(
        Some(&t.client),
        None,
        &["crr", &format!("{VIP}:7000"), "--count", "20"],
    );
    let before = cpu_ns(pid);
    let crr = probe(
        Some(&t.client),
        None,
        &["crr", &format!("{VIP}:7000"), "--count", &count.to_string()],
    );
    let conn_us = (cpu_ns(pid) - before) as f64 / 1000.0 / f64::from(count);
    let url = format!("http://{VIP}:9080/api/items");
    probe(Some(&t.client), None, &["http", &url, "--count", "50"]);
    let before = cpu_ns(pid);
    let http = probe(
        Some(&t.client),
        None,
        &["http", &url, "--count", &(count * 5).to_string()],
    );
    assert_eq!(http["status"]["200"], count * 5, "{http}");
    let request_us = (cpu_ns(pid) - before) as f64 / 1000.0 / f64::from(count * 5);
    Cost {
        conn_us,
        request_us,
        conn_p50: crr["p50_us"].as_f64().unwrap_or(f64::NAN),
        request_p50: http["p50_us"].as_f64().unwrap_or(f64::NAN),
    }
}

/// Runs both parts (`rounds` interleaved rounds of `count` connections for part 2).
pub fn run(t: &Topology, ep: IpAddr, count: u32, rounds: usize) {
    decisions();
    let dir = drover_tests::Pki::new();
    let mesh = dir.mesh_ca();
    let _http = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[std::net::SocketAddr::new(ep, 9080)],
        "ep1",
    );
    let metered: &[&str] = &["--inbound-http-metrics"];
    let cases = [
        ("no policy", String::new(), &[][..]),
        ("20 L4 policies", policies(20, false), &[]),
        ("20 policies, HTTP rules", policies(20, true), &[]),
        ("no policy, HTTP metrics", String::new(), metered),
    ];
    let mut rows: Vec<Vec<Cost>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let case = (cases[i].1.as_str(), cases[i].2);
            rows[i].push(through_nodes(t, ep, &mesh, case, count));
        }
    }
    let median = |v: &[Cost], pick: &dyn Fn(&Cost) -> f64| {
        let mut v: Vec<f64> = v.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "\nServer node over HBONE (1 worker): CPU per new TCP connection ({count} connect+round-trip+close) and per HTTP/1.1 request ({} keep-alive); median of {rounds} interleaved rounds",
        count * 5
    );
    println!(
        "{:<26} {:>14} {:>12} {:>16} {:>14}",
        "policies", "CPU µs/conn", "crr p50 µs", "CPU µs/request", "http p50 µs"
    );
    let base = (
        median(&rows[0], &|c| c.conn_us),
        median(&rows[0], &|c| c.request_us),
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let (c, r) = (
            median(&rows[i], &|c| c.conn_us),
            median(&rows[i], &|c| c.request_us),
        );
        println!(
            "{name:<26} {c:>9.1} ({:+.1}) {:>12.0} {r:>10.1} ({:+.1}) {:>14.0}",
            c - base.0,
            median(&rows[i], &|c| c.conn_p50),
            r - base.1,
            median(&rows[i], &|c| c.request_p50),
        );
    }
    println!("reproduce: cargo xtask bench -- --only authz --l4-rounds {rounds}");
}
