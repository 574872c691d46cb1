//! The L7 path through the real capture path: HTTP services in namespaces, the walkthrough's
//! scenarios, weighted canaries, balancers under a slow endpoint, hash stickiness, cookies, route
//! matching and HTTP/2. Root needed; under `CI` the tests fail rather than skip.

use drover_tests::{
    Mesh, MeshBuilder, Topology, bpftool_dump, named, probe, replace_config, require_privileged,
};
use serde_json::Value;

const URL: &str = "http://127.77.0.10:9080";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seeds");

/// `reviews` in namespace `demo`: VIP 127.77.0.10:9080, one endpoint per version (`reviews-vN`
/// answering on 198.18.N.2:9080), port protocol `protocol`.
fn reviews_service(n: usize, protocol: &str) -> String {
    let mut out = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  addresses: [127.77.0.10]
  ports: [{{number: 9080, name: http, protocol: {protocol}}}]
  location: MESH_INTERNAL
  resolution: STATIC
  workloadSelector: {{labels: {{app: reviews}}}}
"
    );
    for i in 1..=n {
        out.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v{i}, namespace: demo}}
spec: {{address: {}, labels: {{app: reviews, version: v{i}}}}}
",
            Topology::ep4(i)
        ));
    }
    out
}

/// Subsets v1..v3 and an optional top-level traffic policy (flow YAML).
fn subsets(policy: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: demo}}
spec:
  host: reviews.demo.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
  - {{name: v3, labels: {{version: v3}}}}
{policy}"
    )
}

fn split(routes: &[(&str, u32)]) -> String {
    let dests: String = routes
        .iter()
        .map(|(subset, w)| {
            format!(
                "    - destination: {{host: reviews.demo.svc.cluster.local, subset: {subset}}}\n      weight: {w}\n"
            )
        })
        .collect();
    virtual_service(&format!("  - route:\n{dests}"))
}

/// The `reviews` VirtualService with these `http` routes (YAML indented two spaces).
fn virtual_service(http: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: demo}}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  http:
{http}"
    )
}

fn mesh(n: usize, delays: &[u64], yaml: &str) -> Mesh {
    mesh_with(n, delays, yaml, &[])
}

fn mesh_with(n: usize, delays: &[u64], yaml: &str, extra: &[&str]) -> Mesh {
    mesh_of("http", n, delays, yaml, extra)
}

/// Endpoints `reviews-v1..n` running `drover-testsrv MODE` (`http` or `grpc`) on port 9080
/// (endpoint i answers after `delays[i-1]` ms), and the daemon.
fn mesh_of(mode: &str, n: usize, delays: &[u64], yaml: &str, extra: &[&str]) -> Mesh {
    let args: Vec<Vec<String>> = (0..n)
        .map(|i| {
            let delay = delays.get(i).copied().unwrap_or(0);
            vec!["--delay-ms".to_string(), delay.to_string()]
        })
        .collect();
    mesh_full(mode, &args, yaml, extra)
}

/// Endpoint `i` (0-based) gets `server_args[i]` (e.g. `--status 500`).
fn mesh_full(mode: &str, server_args: &[Vec<String>], yaml: &str, extra: &[&str]) -> Mesh {
    server_args
        .iter()
        .enumerate()
        .fold(MeshBuilder::new(server_args.len()), |b, (i, a)| {
            b.server(i + 1, mode, &[9080], &format!("reviews-v{}", i + 1), a)
        })
        .yaml(yaml)
        .args(extra)
        .start()
}

fn served(v: &Value, pod: &str) -> u64 {
    v["served"][pod].as_u64().unwrap_or(0)
}

fn ok_count(v: &Value) -> u64 {
    v["status"]["200"].as_u64().unwrap_or(0)
}

#[test]
fn walkthrough_scenario1_splits_50_50_across_subsets() {
    if !require_privileged() {
        return;
    }
    // The walkthrough's own YAML (Gateway, VirtualService 50/50, DestinationRule v1/v2).
    let scenario =
        std::fs::read_to_string(format!("{FIXTURES}/walkthrough-scenario1.yaml")).unwrap();
    let m = mesh(3, &[], &(reviews_service(3, "HTTP") + "---\n" + &scenario));
    let n = 1000;
    let r = m.http(&[
        &format!("{URL}/reviews/1"),
        "--count",
        &n.to_string(),
        "--concurrency",
        "4",
    ]);
    assert_eq!(ok_count(&r), n, "{r}");
    let v1 = served(&r, "reviews-v1") as f64 / n as f64;
    // Binomial sd for p=0.5, n=1000 is 0.016; ±0.06 is more than 3.5 sd.
    assert!((0.44..=0.56).contains(&v1), "v1 share {v1}: {r}");
    assert_eq!(served(&r, "reviews-v3"), 0, "v3 is in no route: {r}");
    let log = m.daemon.log();
    assert!(
        log.contains("cluster=outbound|9080|v1|reviews.demo.svc.cluster.local")
            && log.contains("route=demo/reviews-traffic-split http[0]"),
        "per-request access log names cluster and route"
    );
}

#[test]
fn canary_90_10_and_transparency() {
    if !require_privileged() {
        return;
    }
    let m = mesh(
        3,
        &[],
        &(reviews_service(3, "HTTP") + &subsets("") + &split(&[("v1", 90), ("v2", 10)])),
    );
    let n = 1000;
    let r = m.http(&[
        &format!("{URL}/"),
        "--count",
        &n.to_string(),
        "--concurrency",
        "4",
    ]);
    assert_eq!(ok_count(&r), n, "{r}");
    let v2 = served(&r, "reviews-v2") as f64 / n as f64;
    // sd for p=0.1, n=1000 is 0.0095; ±0.04 is over 4 sd.
    assert!((0.06..=0.14).contains(&v2), "v2 share {v2}: {r}");
    // The proxy adds only what an Istio sidecar's Envoy adds to a request without them: the
    // request id and a trace context (W3C and B3); nothing else.
    let headers: Vec<&str> = r["first"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(
        headers,
        [
            "host",
            "x-request-id",
            "traceparent",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-sampled"
        ],
        "{r}"
    );
}

#[test]
fn least_request_avoids_a_slow_endpoint_round_robin_does_not() {
    if !require_privileged() {
        return;
    }
    // Scenario 2's DestinationRule: LEAST_CONN (an alias of LEAST_REQUEST).
    let scenario =
        std::fs::read_to_string(format!("{FIXTURES}/walkthrough-scenario2.yaml")).unwrap();
    let share_of_slow = |yaml: String| {
        let m = mesh(3, &[150, 0, 0], &yaml);
        let n = 300;
        let r = m.http(&[
            &format!("{URL}/"),
            "--count",
            &n.to_string(),
            "--concurrency",
            "8",
        ]);
        assert_eq!(ok_count(&r), n, "{r}");
        served(&r, "reviews-v1") as f64 / n as f64
    };
    let least = share_of_slow(reviews_service(3, "HTTP") + "---\n" + &scenario);
    let round_robin = share_of_slow(
        reviews_service(3, "HTTP")
            + &subsets("  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n"),
    );
    eprintln!("slow endpoint share: LEAST_REQUEST {least:.3}, ROUND_ROBIN {round_robin:.3}");
    assert!(
        (0.28..=0.39).contains(&round_robin),
        "round robin ignores load: {round_robin}"
    );
    assert!(
        least < 0.15,
        "least request avoids the slow endpoint: {least}"
    );
}

#[test]
fn consistent_hash_on_header_and_generated_cookie() {
    if !require_privileged() {
        return;
    }
    let m = mesh(
        3,
        &[],
        &(reviews_service(3, "HTTP")
            + &subsets(
                "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}\n",
            )),
    );
    let url = format!("{URL}/");
    for user in ["alice", "bob", "carol"] {
        let r = m.http(&[
            &url,
            "--count",
            "100",
            "--header",
            &format!("x-user: {user}"),
        ]);
        assert_eq!(
            r["served"].as_object().unwrap().len(),
            1,
            "sticky for {user}: {r}"
        );
    }
    // Without the key Envoy picks at random: several endpoints serve.
    let r = m.http(&[&url, "--count", "200"]);
    assert!(r["served"].as_object().unwrap().len() >= 2, "{r}");
    drop(m);

    let m = mesh(
        3,
        &[],
        &(reviews_service(3, "HTTP")
            + &subsets(
                "  trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: user}}}\n",
            )),
    );
    for user in ["alice", "bob"] {
        let r = m.http(&[&format!("{URL}/?user={user}&x=1"), "--count", "60"]);
        assert_eq!(
            r["served"].as_object().unwrap().len(),
            1,
            "sticky on ?user={user}: {r}"
        );
    }
    let r = m.http(&[&url, "--count", "200"]);
    assert!(
        r["served"].as_object().unwrap().len() >= 2,
        "no parameter: random: {r}"
    );
    drop(m);

    // useSourceIp: every request of this client (one source address) lands on one endpoint.
    let m = mesh(
        3,
        &[],
        &(reviews_service(3, "HTTP")
            + &subsets(
                "  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}}\n",
            )),
    );
    let r = m.http(&[&url, "--count", "100", "--concurrency", "4"]);
    assert_eq!(r["served"].as_object().unwrap().len(), 1, "{r}");
    drop(m);

    let m = mesh(
        3,
        &[],
        &(reviews_service(3, "HTTP")
            + &subsets(
                "  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, path: /, ttl: 60s}}}}\n",
            )),
    );
    let r = m.http(&[&url, "--count", "50", "--cookie-jar"]);
    let cookie = r["set_cookie"]
        .as_str()
        .unwrap_or_else(|| panic!("no Set-Cookie: {r}"));
    let re = regex::Regex::new(r#"^s="[0-9a-f]{16}"; Max-Age=60; Path=/; HttpOnly$"#).unwrap();
    assert!(re.is_match(cookie), "{cookie}");
    assert_eq!(
        r["served"].as_object().unwrap().len(),
        1,
        "cookie replay sticks: {r}"
    );
}

#[test]
fn route_matching_no_route_and_unknown_subset() {
    if !require_privileged() {
        return;
    }
    let vs = "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  http:
  - match: [{headers: {x-canary: {exact: 'yes'}}, uri: {prefix: /api}}]
    route: [{destination: {host: reviews.demo.svc.cluster.local, subset: v2}}]
  - match: [{uri: {regex: '/api/v[0-9]+/.*'}, method: {exact: GET}}]
    route: [{destination: {host: reviews.demo.svc.cluster.local, subset: v1}}]
  - match: [{uri: {exact: /missing}}]
    route: [{destination: {host: reviews.demo.svc.cluster.local, subset: v9}}]
";
    let m = mesh(3, &[], &(reviews_service(3, "HTTP") + &subsets("") + vs));
    let r = m.http(&[
        &format!("{URL}/api/v1/x"),
        "--count",
        "20",
        "--header",
        "x-canary: yes",
    ]);
    assert_eq!(served(&r, "reviews-v2"), 20, "{r}");
    let r = m.http(&[&format!("{URL}/api/v1/x"), "--count", "20"]);
    assert_eq!(served(&r, "reviews-v1"), 20, "{r}");
    // No route matches: Envoy's 404 (NR).
    let r = m.http(&[&format!("{URL}/other"), "--count", "3"]);
    assert_eq!(r["status"]["404"], 3, "{r}");
    // A route to an undefined subset: 503 naming the subset (NC).
    let r = m.http(&[&format!("{URL}/missing"), "--count", "1"]);
    assert_eq!(r["status"]["503"], 1, "{r}");
    assert!(
        r["first"].as_str().unwrap_or("").contains("subset \"v9\""),
        "{r}"
    );
    assert!(m.daemon.log().contains("flag=NR") && m.daemon.log().contains("flag=NC"));
}

#[test]
fn http2_streams_share_one_connection() {
    if !require_privileged() {
        return;
    }
    let m = mesh(1, &[20], &reviews_service(1, "HTTP2"));
    let n = 200;
    let r = m.http(&[
        &format!("{URL}/"),
        "--count",
        &n.to_string(),
        "--concurrency",
        "50",
        "--h2",
    ]);
    assert_eq!(ok_count(&r), n, "{r}");
    assert_eq!(r["first"]["version"], "HTTP/2.0", "h2c upstream: {r}");
    // 50 concurrent streams from one client connection reach the endpoint multiplexed on few
    // upstream connections (the pool's), not one connection per stream.
    let peers = r["peers"].as_u64().unwrap();
    assert!(peers <= 2, "upstream connections: {peers}: {r}");
    // With a 20 ms server delay, 200 requests 50 at a time take about 4 × 20 ms, not 200 × 20.
    assert!(r["elapsed_ms"].as_f64().unwrap() < 2000.0, "{r}");
}

#[test]
fn http_upgrade_is_bridged() {
    if !require_privileged() {
        return;
    }
    let m = mesh(1, &[], &reviews_service(1, "HTTP"));
    m.t.client
        .check_upgrade_bridged("127.77.0.10:9080".parse().unwrap(), "/ws");
}

#[test]
fn json_access_log_has_one_object_per_request() {
    if !require_privileged() {
        return;
    }
    let m = mesh_with(
        1,
        &[],
        &reviews_service(1, "HTTP"),
        &["--log-format", "json"],
    );
    let r = m.http(&[&format!("{URL}/json"), "--count", "3"]);
    assert_eq!(ok_count(&r), 3, "{r}");
    assert!(
        m.daemon
            .wait_log("\"path\":\"/json\"", std::time::Duration::from_secs(2))
    );
    let lines: Vec<Value> = m
        .daemon
        .log()
        .lines()
        .filter(|l| l.contains("drover::access"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let f = &lines[0]["fields"];
    assert_eq!(f["status"], 200);
    assert_eq!(f["endpoint"], "reviews-v1@198.18.1.2:9080");
    assert_eq!(
        f["cluster"],
        "outbound|9080||reviews.demo.svc.cluster.local"
    );
    assert_eq!(f["flag"], "-");
}

#[test]
fn malformed_requests_and_dead_endpoints_get_statuses() {
    if !require_privileged() {
        return;
    }
    use std::io::{Read, Write};
    // A second endpoint, subset `dead`, where nothing listens (port 9999).
    let yaml = reviews_service(1, "HTTP")
        + "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-dead, namespace: demo}
spec: {address: 198.18.1.2, ports: {http: 9999}, labels: {app: reviews, version: dead}}
" + &subsets("  - {name: dead, labels: {version: dead}}\n")
        + &split(&[("dead", 1)]);
    let m = mesh(1, &[], &yaml);
    // Garbage instead of HTTP: 400, then the connection is closed.
    let mut conn =
        m.t.client
            .connect("127.77.0.10:9080".parse().unwrap(), None)
            .expect("captured connect");
    conn.write_all(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply:?}");
    // Connection refused by the endpoint: 503 with Envoy's reason, flag UF in the log.
    let r = m.http(&[&format!("{URL}/"), "--count", "2"]);
    assert_eq!(r["status"]["503"], 2, "{r}");
    assert!(
        r["first"]
            .as_str()
            .unwrap_or("")
            .contains("reset reason: connection failure"),
        "{r}"
    );
    // Istio's default retries went back to the only endpoint, twice, and gave up.
    assert!(m.daemon.log().contains("flag=UF,URX"), "{}", m.daemon.log());
}

#[test]
fn grpc_unary_streaming_and_status_through_the_proxy() {
    if !require_privileged() {
        return;
    }
    let yaml = reviews_service(2, "GRPC")
        + &subsets("  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\n");
    let m = mesh_of("grpc", 2, &[], &yaml, &[]);
    let grpc = |call: &str, count: &str| {
        probe(
            Some(&m.t.client),
            None,
            &["grpc", URL, "--call", call, "--count", count],
        )
    };
    // Unary calls on one channel are balanced per request (HTTP/2 streams, not connections).
    let r = grpc("unary", "10");
    assert_eq!(r["messages"], 10, "{r}");
    assert_eq!(r["servers"]["reviews-v1"], 5, "{r}");
    assert_eq!(r["servers"]["reviews-v2"], 5, "{r}");
    // Server streaming and bidirectional streaming keep order and complete with trailers.
    let r = grpc("stream", "500");
    assert_eq!(r["messages"], 500, "{r}");
    let r = grpc("chat", "200");
    assert_eq!(r["messages"], 200, "{r}");
    // A gRPC error status travels in the trailers-only response.
    let r = grpc("fail", "1");
    assert_eq!(r["code"], "Unavailable", "{r}");
    assert_eq!(r["message"], "asked to fail", "{r}");
}

#[test]
fn outlier_detection_ejects_after_n_errors_and_backs_off() {
    if !require_privileged() {
        return;
    }
    // reviews-v1 answers 500; the others 200. Round robin makes every third request hit v1.
    let servers = vec![
        vec!["--status".to_string(), "500".to_string()],
        Vec::new(),
        Vec::new(),
    ];
    let yaml = reviews_service(3, "HTTP")
        + &subsets(
            "  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: 50}
",
        );
    let m = mesh_full("http", &servers, &yaml, &[]);
    let errors = |count: u32| {
        let r = m.http(&[&format!("{URL}/"), "--count", &count.to_string()]);
        assert_eq!(r["errors"], 0, "{r}");
        r["status"]["500"].as_u64().unwrap_or(0)
    };
    // Exactly three 500s reach the client, then v1 is ejected at once.
    assert_eq!(errors(9), 3);
    let ejected = std::time::Instant::now();
    assert_eq!(errors(9), 0, "ejected endpoints get no traffic");
    // Poll until v1 serves again (bounded), then make it fail again immediately.
    let back_after = |since: std::time::Instant| loop {
        if errors(3) > 0 {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < std::time::Duration::from_secs(12),
            "never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let first = back_after(ejected);
    // The second ejection: two more errors complete the run of three.
    let mut seen = 1;
    while seen < 3 {
        seen += errors(3);
    }
    let ejected = std::time::Instant::now();
    let second = back_after(ejected);
    eprintln!("ejection 1 lasted {first:?}, ejection 2 lasted {second:?}");
    // base 2 s, then 2 × base; unejection waits for the next 1 s sweep tick.
    assert!(
        first >= std::time::Duration::from_millis(1500)
            && first <= std::time::Duration::from_millis(3600),
        "{first:?}"
    );
    assert!(
        second >= std::time::Duration::from_millis(3500)
            && second <= std::time::Duration::from_millis(5600),
        "{second:?}"
    );
    assert!(
        m.daemon
            .log()
            .contains("outlier detection: endpoint ejected")
    );
}

#[test]
fn walkthrough_scenario3_pool_limits_overflow_with_503() {
    if !require_privileged() {
        return;
    }
    // The walkthrough's own rule: maxConnections 1, http1MaxPendingRequests 1.
    let scenario =
        std::fs::read_to_string(format!("{FIXTURES}/walkthrough-scenario3.yaml")).unwrap();
    let m = mesh(
        1,
        &[20],
        &(reviews_service(1, "HTTP") + "---\n" + &scenario),
    );
    let out =
        m.t.client
            .command("hey")
            .args(["-z", "5s", "-c", "20", &format!("{URL}/")])
            .output()
            .expect("hey");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    let count = |code: &str| drover_tests::hey_responses(&report, code);
    let (ok, overflow) = (count("200"), count("503"));
    eprintln!("scenario 3: {ok} × 200, {overflow} × 503");
    assert!(
        !report.contains("Error distribution"),
        "no request failed or hung: {report}"
    );
    assert!(ok > 0 && overflow > ok, "mostly 503: {report}");
    // Every 503 is a circuit-breaker overflow, logged as UO.
    assert!(
        m.daemon
            .wait_log("flag=UO", std::time::Duration::from_secs(2))
    );
    let uo = m
        .daemon
        .log()
        .lines()
        .filter(|l| l.contains("flag=UO"))
        .count() as u64;
    assert_eq!(uo, overflow, "{report}");
    // The overflow counters of /clusters count exactly the 503s.
    let c = &m.daemon.clusters()["clusters"][0];
    let counted = c["stats"]["upstream_rq_pending_overflow"].as_u64().unwrap()
        + c["stats"]["upstream_rq_overflow"].as_u64().unwrap();
    assert_eq!(counted, overflow, "{c}");
    assert!(
        c["stats"]["upstream_cx_overflow"].as_u64().unwrap() >= overflow,
        "{c}"
    );
    assert_eq!(c["circuit_breakers"]["max_connections"], 1, "{c}");
    // maxRequestsPerConnection 1: one upstream connection per request that got through.
    let k = bpftool_dump(&m._pins.path.join("EP_KSTATS"));
    let attempts: u64 = k.iter().map(|(_, v)| v["attempts"].as_u64().unwrap()).sum();
    assert_eq!(attempts, ok, "{k:?}");
}

/// Endpoints `reviews-v1..n` each answering `statuses[i]`, one cluster with `policy` (flow YAML
/// under `trafficPolicy:`), round robin.
fn failing(statuses: &[u16], policy: &str) -> Mesh {
    let servers: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| vec!["--status".to_string(), s.to_string()])
        .collect();
    let yaml = reviews_service(statuses.len(), "HTTP")
        + &subsets(&format!(
            "  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n    {policy}\n"
        ));
    mesh_full("http", &servers, &yaml, &[])
}

/// The `/clusters` entry of the service's subset-less cluster.
fn whole_cluster(m: &Mesh) -> Value {
    let c = m.daemon.clusters();
    c["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["subset"].is_null())
        .unwrap_or_else(|| panic!("{c}"))
        .clone()
}

fn endpoints(m: &Mesh) -> Vec<Value> {
    whole_cluster(m)["endpoints"].as_array().unwrap().clone()
}

#[test]
fn max_requests_per_connection_retires_upstream_connections() {
    if !require_privileged() {
        return;
    }
    for (policy, conns) in [
        ("connectionPool: {http: {maxRequestsPerConnection: 2}}", 5),
        ("connectionPool: {tcp: {connectTimeout: 1s}}", 1),
    ] {
        let m = failing(&[200], policy);
        let r = m.http(&[&format!("{URL}/"), "--count", "10", "--concurrency", "1"]);
        assert_eq!(ok_count(&r), 10, "{r}");
        assert_eq!(r["peers"], conns, "{policy}: {r}");
        let k = bpftool_dump(&m._pins.path.join("EP_KSTATS"));
        let attempts: u64 = k.iter().map(|(_, v)| v["attempts"].as_u64().unwrap()).sum();
        assert_eq!(attempts, conns, "{policy}: {k:?}");
    }
}

#[test]
fn max_ejection_percent_holds_with_four_bad_endpoints_of_five() {
    if !require_privileged() {
        return;
    }
    let m = failing(
        &[500, 500, 500, 500, 200],
        "outlierDetection: {consecutive5xxErrors: 2, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 40}",
    );
    let r = m.http(&[&format!("{URL}/"), "--count", "60", "--concurrency", "1"]);
    assert_eq!(r["errors"], 0, "{r}");
    let eps = endpoints(&m);
    let ejected = eps.iter().filter(|e| e["health"] == "ejected").count();
    // 40 % of 5 = 2: a third ejection would exceed the cap and is refused.
    assert_eq!(ejected, 2, "{eps:?}");
    let c = whole_cluster(&m);
    let stats = &c["stats"];
    assert_eq!(stats["outlier_detection_ejections_active"], 2, "{stats}");
    assert!(
        stats["outlier_detection_ejections_overflow"]
            .as_u64()
            .unwrap()
            > 0,
        "{stats}"
    );
    // The healthy endpoint is never ejected.
    assert!(
        eps.iter()
            .any(|e| e["name"] == "reviews-v5" && e["health"] == "healthy"),
        "{eps:?}"
    );
}

#[test]
fn min_health_percent_panic_balances_across_all_endpoints() {
    if !require_privileged() {
        return;
    }
    // Two of three fail; with maxEjectionPercent 100 both are ejected. minHealthPercent 50: one
    // healthy of three (33 %) is below it, so the cluster panics and all three get traffic again.
    for (min_health, expect_errors) in [(0, false), (50, true)] {
        let m = failing(
            &[500, 500, 200],
            &format!(
                "outlierDetection: {{consecutive5xxErrors: 1, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 100, minHealthPercent: {min_health}}}"
            ),
        );
        let _ = m.http(&[&format!("{URL}/"), "--count", "6", "--concurrency", "1"]);
        let eps = endpoints(&m);
        assert_eq!(
            eps.iter().filter(|e| e["health"] == "ejected").count(),
            2,
            "{eps:?}"
        );
        let r = m.http(&[&format!("{URL}/"), "--count", "30", "--concurrency", "1"]);
        let errors = r["status"]["500"].as_u64().unwrap_or(0);
        assert_eq!(
            errors > 0,
            expect_errors,
            "minHealthPercent {min_health}: {r}"
        );
        if expect_errors {
            // Panic mode spreads over all endpoints (round robin: about two thirds fail).
            assert!((15..=25).contains(&errors), "{r}");
        }
    }
}

#[test]
fn gateway_errors_eject_on_their_own_counter_and_500_only_counts_as_5xx() {
    if !require_privileged() {
        return;
    }
    // consecutive5xxErrors 0 disables the 5xx rule; only 502/503/504 runs eject.
    let policy = "outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 3, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 100}";
    let m = failing(&[500, 503, 200], policy);
    let r = m.http(&[&format!("{URL}/"), "--count", "30", "--concurrency", "1"]);
    assert_eq!(r["errors"], 0, "{r}");
    let eps = whole_cluster(&m)["endpoints"].clone();
    let (v1, v2) = (named(&eps, "reviews-v1"), named(&eps, "reviews-v2"));
    assert_eq!(v1["health"], "healthy", "500 is not a gateway error: {v1}");
    assert_eq!(v2["health"], "ejected", "{v2}");
    // Exactly three 503s reached v2 before its ejection.
    assert_eq!(v2["rq_5xx"], 3, "{v2}");
    assert_eq!(v2["gateway_errors"], 3, "{v2}");
    assert_eq!(v1["gateway_errors"], 0, "{v1}");
    assert_eq!(v1["rq_5xx"], v1["rq_total"], "{v1}");
    assert_eq!(v1["outlier"]["consecutive_gateway"], 0, "{v1}");
}

#[test]
fn listed_outlier_error_codes_eject_on_those_codes_only() {
    if !require_privileged() {
        return;
    }
    // The listed codes replace the 5xx rule: 418 counts as an error, 500 no longer does.
    let policy = "outlierDetection: {outlierDetectionHttpErrorCodes: [418], consecutive5xxErrors: 2, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 100}";
    let m = failing(&[418, 500, 200], policy);
    let r = m.http(&[&format!("{URL}/"), "--count", "30", "--concurrency", "1"]);
    assert_eq!(r["errors"], 0, "{r}");
    let eps = whole_cluster(&m)["endpoints"].clone();
    let (v1, v2) = (named(&eps, "reviews-v1"), named(&eps, "reviews-v2"));
    assert_eq!(v1["health"], "ejected", "418 is listed: {v1}");
    assert_eq!(v2["health"], "healthy", "500 is not listed: {v2}");
    assert_eq!(v2["rq_5xx"], v2["rq_total"], "{v2}");
}

#[test]
fn default_retries_hide_a_refusing_endpoint_which_is_still_ejected() {
    if !require_privileged() {
        return;
    }
    // reviews-v3's workload port has no listener: connects are refused. With split local-origin
    // errors its own counter ejects it after 2 refusals. Istio's default retries (2, on
    // connect-failure, to another endpoint) hide them from clients; with `attempts: 0` the
    // clients see 503 UF until the ejection.
    let v3 = format!("spec: {{address: {},", Topology::ep4(3));
    for (retries, failures) in [("", 0), ("    retries: {attempts: 0}\n", 2)] {
        let yaml = reviews_service(3, "HTTP")
            .replace(&v3, &format!("{v3} ports: {{http: 9999}},"))
            + &subsets(
                "  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 100}
",
            )
            + &whole_service_route(retries);
        assert!(yaml.contains("9999"), "{yaml}");
        let m = mesh(3, &[], &yaml);
        let r = m.http(&[&format!("{URL}/"), "--count", "30", "--concurrency", "1"]);
        assert_eq!(
            r["status"]["503"].as_u64().unwrap_or(0),
            failures,
            "{retries}: {r}"
        );
        assert_eq!(ok_count(&r), 30 - failures, "{retries}: {r}");
        let c = whole_cluster(&m);
        let v3 = named(&c["endpoints"], "reviews-v3");
        assert_eq!(v3["health"], "ejected", "{v3}");
        assert_eq!(v3["local_origin_failures"], 2, "{v3}");
        assert_eq!(
            v3["rq_5xx"], 0,
            "local-origin failures are not upstream 5xx: {v3}"
        );
        let retried = 2 - failures;
        assert_eq!(c["stats"]["upstream_rq_retry"], retried, "{c}");
        assert_eq!(c["stats"]["upstream_rq_retry_success"], retried, "{c}");
    }
}

/// A VirtualService sending all of `reviews` to its default cluster, with extra route fields
/// (indented four spaces, e.g. `    retries: {attempts: 0}\n`).
fn whole_service_route(extra: &str) -> String {
    virtual_service(&format!(
        "  - route: [{{destination: {{host: reviews.demo.svc.cluster.local}}}}]\n{extra}"
    ))
}

/// Endpoints started with `server_args` (e.g. `--status 503`), a round-robin rule and a
/// VirtualService route with `route_extra`.
fn routed(server_args: &[&[&str]], route_extra: &str) -> Mesh {
    let args: Vec<Vec<String>> = server_args
        .iter()
        .map(|a| a.iter().map(|s| s.to_string()).collect())
        .collect();
    let yaml = reviews_service(args.len(), "HTTP")
        + &subsets("  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n")
        + &whole_service_route(route_extra);
    mesh_full("http", &args, &yaml, &[])
}

#[test]
fn retry_on_per_try_timeout_and_route_timeout() {
    if !require_privileged() {
        return;
    }
    let url = format!("{URL}/");
    // An endpoint's 503 is retried on the other endpoint by Istio's default policy (no
    // `retries`: `retriable_status_codes: [503]`), by `retries` without `retryOn` (which keeps
    // the default conditions), and by `retryOn: 5xx` or `gateway-error`; a `retryOn` that lists
    // neither does not retry it.
    for (extra, retries) in [
        ("", true),
        ("    retries: {attempts: 2}\n", true),
        ("    retries: {attempts: 2, retryOn: 5xx}\n", true),
        ("    retries: {attempts: 2, retryOn: gateway-error}\n", true),
        (
            "    retries: {attempts: 2, retryOn: connect-failure}\n",
            false,
        ),
    ] {
        let m = routed(&[&["--status", "503"], &[]], extra);
        let r = m.http(&[&url, "--count", "10", "--concurrency", "1"]);
        let c = whole_cluster(&m);
        let s = &c["stats"];
        let errors = s["upstream_rq_5xx"].as_u64().unwrap();
        assert!(errors >= 1, "{extra}: the 503 endpoint was tried: {c}");
        if retries {
            assert_eq!(ok_count(&r), 10, "{extra}: {r}");
            assert_eq!(s["upstream_rq_retry"], errors, "every 503 retried: {c}");
            assert_eq!(s["upstream_rq_retry_success"], errors, "{c}");
        } else {
            assert_eq!(r["status"]["503"], errors, "{r}");
            assert_eq!(s["upstream_rq_retry"], 0, "{c}");
        }
    }
    // A slow endpoint (2 s): `perTryTimeout` gives up on it after 200 ms and retries elsewhere.
    let m = routed(
        &[&["--delay-ms", "2000"], &[]],
        "    retries: {attempts: 1, perTryTimeout: 200ms, retryOn: reset}\n",
    );
    let start = std::time::Instant::now();
    let r = m.http(&[&url, "--count", "4", "--concurrency", "1"]);
    assert_eq!(ok_count(&r), 4, "{r}");
    assert_eq!(served(&r, "reviews-v2"), 4, "{r}");
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(400) && took < std::time::Duration::from_secs(3),
        "two tries timed out after 200 ms each: {took:?}"
    );
    // The route `timeout` bounds the whole request: 504 UT.
    let m = routed(
        &[&["--delay-ms", "2000"], &[]],
        "    timeout: 300ms\n    retries: {attempts: 0}\n",
    );
    let r = m.http(&[&url, "--count", "4", "--concurrency", "1"]);
    assert_eq!(ok_count(&r), 2, "{r}");
    assert_eq!(r["status"]["504"], 2, "{r}");
    assert!(m.daemon.log().contains("flag=UT"), "{}", m.daemon.log());
}

#[test]
fn max_retries_caps_concurrent_retries_across_the_cluster() {
    if !require_privileged() {
        return;
    }
    // Endpoint v1 refuses connections; v2 answers after 400 ms. Round robin sends half of 10
    // concurrent requests to v1; each is retried on v2 — but with `maxRetries: 1` only one retry
    // may be in flight, the others fail at once (503, counted as retry overflow).
    let v1 = format!("spec: {{address: {},", Topology::ep4(1));
    for (policy, min_failures) in [
        ("    connectionPool: {http: {maxRetries: 1}}\n", 1),
        ("", 0),
    ] {
        let yaml = reviews_service(2, "HTTP").replace(&v1, &format!("{v1} ports: {{http: 9999}},"))
            + &subsets(&format!(
                "  trafficPolicy:\n    loadBalancer: {{simple: ROUND_ROBIN}}\n{policy}"
            ));
        let m = mesh_of("http", 2, &[0, 400], &yaml, &[]);
        let r = m.http(&[&format!("{URL}/"), "--count", "10", "--concurrency", "10"]);
        let failed = r["status"]["503"].as_u64().unwrap_or(0);
        let c = whole_cluster(&m);
        let s = &c["stats"];
        assert_eq!(ok_count(&r) + failed, 10, "{r}");
        assert!(failed >= min_failures, "{policy}: {r}");
        if min_failures == 0 {
            assert_eq!(failed, 0, "unlimited retries: {r}");
        }
        assert_eq!(s["upstream_rq_retry_overflow"], failed, "{c}");
        let v1 = named(&c["endpoints"], "reviews-v1");
        let refused = v1["local_origin_failures"].as_u64().unwrap();
        assert!(refused >= 3, "round robin sent about half to v1: {c}");
        assert_eq!(
            s["upstream_rq_retry"].as_u64().unwrap() + failed,
            refused,
            "every refused try was retried or overflowed: {c}"
        );
    }
}

#[test]
fn h2_upgrade_policy_and_use_client_protocol_pick_the_upstream_protocol() {
    if !require_privileged() {
        return;
    }
    let version = |policy: &str, h2_client: bool| {
        let m = failing(&[200], policy);
        let mut a = vec![format!("{URL}/"), "--count".into(), "1".into()];
        if h2_client {
            a.push("--h2".into());
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let r = m.http(&a);
        assert_eq!(ok_count(&r), 1, "{r}");
        r["first"]["version"].as_str().unwrap().to_string()
    };
    // An `http` port speaks HTTP/1.1 upstream by default, whatever the client speaks.
    assert_eq!(
        version("connectionPool: {tcp: {connectTimeout: 1s}}", true),
        "HTTP/1.1"
    );
    assert_eq!(
        version("connectionPool: {http: {h2UpgradePolicy: UPGRADE}}", false),
        "HTTP/2.0"
    );
    assert_eq!(
        version("connectionPool: {http: {useClientProtocol: true}}", true),
        "HTTP/2.0"
    );
    assert_eq!(
        version("connectionPool: {http: {useClientProtocol: true}}", false),
        "HTTP/1.1"
    );
}

/// One endpoint (0 ms delay unless given) behind `reviews` on a `protocol` port, with `policy`
/// as the top-level traffic policy.
fn one_endpoint(protocol: &str, delay_ms: u64, policy: &str) -> Mesh {
    let yaml =
        reviews_service(1, protocol) + &subsets(&format!("  trafficPolicy:\n    {policy}\n"));
    mesh(1, &[delay_ms], &yaml)
}

/// Established connections the endpoint holds on its port (seen from its own namespace).
fn established(m: &Mesh) -> usize {
    let out = m.t.endpoints[0]
        .command("ss")
        .args(["-Htn", "state", "established", "( sport = :9080 )"])
        .output()
        .expect("run ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn http_idle_timeout_closes_idle_upstream_connections() {
    if !require_privileged() {
        return;
    }
    for (protocol, policy, closes) in [
        ("HTTP", "connectionPool: {http: {idleTimeout: 1s}}", true),
        ("HTTP2", "connectionPool: {http: {idleTimeout: 1s}}", true),
        // `tcp.idleTimeout` is the fallback when `http.idleTimeout` is unset.
        ("HTTP", "connectionPool: {tcp: {idleTimeout: 1s}}", true),
        // Istio's default: 1 h.
        ("HTTP", "connectionPool: {tcp: {connectTimeout: 1s}}", false),
    ] {
        let m = one_endpoint(protocol, 0, policy);
        let url = format!("{URL}/");
        let first = m.http(&[&url, "--count", "1"]);
        let start = std::time::Instant::now();
        assert_eq!(ok_count(&first), 1, "{first}");
        assert_eq!(established(&m), 1, "{protocol} {policy}: pooled connection");
        // Bounded wait: the pooled connection should go between 1 s and 3 s later.
        while established(&m) > 0 && start.elapsed() < std::time::Duration::from_secs(3) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let gone = established(&m) == 0;
        assert_eq!(gone, closes, "{protocol} {policy}");
        if closes {
            assert!(
                start.elapsed() >= std::time::Duration::from_millis(900),
                "{protocol} {policy}: closed after {:?}, before the idle timeout",
                start.elapsed()
            );
        }
        let second = m.http(&[&url, "--count", "1"]);
        assert_eq!(ok_count(&second), 1, "{second}");
        let reused = first["first"]["peer"] == second["first"]["peer"];
        assert_eq!(reused, !closes, "{protocol} {policy}: {first} {second}");
    }
}

#[test]
fn max_concurrent_streams_spreads_http2_requests_over_connections() {
    if !require_privileged() {
        return;
    }
    for (protocol, policy, conns) in [
        // 20 streams at once, 5 per connection: 4 connections.
        (
            "HTTP2",
            "connectionPool: {http: {maxConcurrentStreams: 5}}",
            4,
        ),
        ("HTTP2", "connectionPool: {tcp: {connectTimeout: 1s}}", 1),
        // Ignored unless the upstream is explicitly HTTP/2, as Istio does.
        (
            "HTTP",
            "connectionPool: {http: {maxConcurrentStreams: 5, useClientProtocol: true}}",
            1,
        ),
        // Each HTTP/2 connection takes 5 requests over its life.
        (
            "HTTP2",
            "connectionPool: {http: {maxRequestsPerConnection: 5}}",
            4,
        ),
    ] {
        // Every answer takes 300 ms, so all 20 requests are in flight together.
        let m = one_endpoint(protocol, 300, policy);
        let r = m.http(&[
            &format!("{URL}/"),
            "--count",
            "20",
            "--concurrency",
            "20",
            "--h2",
        ]);
        assert_eq!(ok_count(&r), 20, "{protocol} {policy}: {r}");
        assert_eq!(
            r["first"]["version"], "HTTP/2.0",
            "{protocol} {policy}: {r}"
        );
        assert_eq!(r["peers"], conns, "{protocol} {policy}: {r}");
    }
}

#[test]
fn http_connect_timeout_is_the_clusters() {
    if !require_privileged() {
        return;
    }
    let m = one_endpoint("HTTP", 0, "connectionPool: {tcp: {connectTimeout: 300ms}}");
    // The endpoint drops SYNs: only the connect timeout ends an attempt (the mesh default would
    // wait 10 s).
    let mut drop = m.t.endpoints[0].command("iptables");
    drop.args(["-A", "INPUT", "-p", "tcp", "--dport", "9080", "-j", "DROP"]);
    assert!(drop.status().expect("run iptables").success());
    let start = std::time::Instant::now();
    let r = m.http(&[&format!("{URL}/"), "--count", "1"]);
    let took = start.elapsed();
    assert_eq!(r["status"]["503"], 1, "{r}");
    assert!(
        took >= std::time::Duration::from_millis(300) && took < std::time::Duration::from_secs(3),
        "answered after {took:?}: {r}"
    );
    assert!(
        m.daemon
            .wait_log("flag=UF", std::time::Duration::from_secs(2)),
        "{}",
        m.daemon.log()
    );
}

/// `reviews` with endpoint `i` (1-based) in `localities[i-1]`, and a DestinationRule with this
/// top-level traffic policy (flow YAML, indented four spaces).
fn zoned(localities: &[&str], policy: &str) -> String {
    let mut out = reviews_service(0, "HTTP");
    for (i, l) in localities.iter().enumerate() {
        out.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v{n}, namespace: demo}}
spec: {{address: {}, locality: {l}, labels: {{app: reviews, version: v{n}}}}}
",
            Topology::ep4(i + 1),
            n = i + 1
        ));
    }
    out + &format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: demo}}
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy:
{policy}"
    )
}

/// Requests served per endpoint name for `n` sequential requests, all of which must succeed.
fn spread(m: &Mesh, n: u64) -> Value {
    let r = m.http(&[
        &format!("{URL}/"),
        "--count",
        &n.to_string(),
        "--concurrency",
        "1",
    ]);
    assert_eq!(ok_count(&r), n, "{r}");
    r["served"].clone()
}

#[test]
fn locality_keeps_traffic_local_and_fails_over_in_priority_order() {
    if !require_privileged() {
        return;
    }
    // The client is in r1/z1. With outlier detection: P0 = r1/z1 (v1, v2), P1 = r1/z2 (v3),
    // then `failover` puts r3 (v5) before every other region (r2, v4).
    let yaml = zoned(
        &["r1/z1", "r1/z1", "r1/z2", "r2/z1", "r3/z1"],
        "    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting: {failover: [{from: r1, to: r3}]}
    outlierDetection: {consecutive5xxErrors: 1, interval: 30s, baseEjectionTime: 60s, maxEjectionPercent: 100}
",
    );
    let mut m = mesh_with(5, &[], &yaml, &["--client-locality", "r1/z1"]);
    let only = |served: &Value, names: &[&str]| {
        let total: u64 = names.iter().map(|n| served[*n].as_u64().unwrap_or(0)).sum();
        let all: u64 = served
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        total == all
    };
    let s = spread(&m, 40);
    assert!(only(&s, &["reviews-v1", "reviews-v2"]), "stays local: {s}");
    assert_eq!(s["reviews-v1"], 20, "round robin inside the zone: {s}");
    // The local zone goes down: connect failures eject v1 and v2 (retries hide them from the
    // client), and the next priority, the other zone of the region, takes everything.
    drop(m._servers.drain(..2));
    let _ = m.http(&[&format!("{URL}/"), "--count", "10", "--concurrency", "1"]);
    let s = spread(&m, 20);
    assert!(only(&s, &["reviews-v3"]), "next: r1/z2 {s}");
    // The region is down: `failover` names r3 before r2.
    drop(m._servers.remove(0));
    let _ = m.http(&[&format!("{URL}/"), "--count", "10", "--concurrency", "1"]);
    let s = spread(&m, 20);
    assert!(only(&s, &["reviews-v5"]), "then r3: {s}");
    let eps = endpoints(&m);
    let state = |name: &str| {
        let e = named(&Value::Array(eps.clone()), name);
        (e["priority"].as_u64().unwrap(), e["health"].clone())
    };
    assert_eq!(state("reviews-v1"), (0, "ejected".into()), "{eps:?}");
    assert_eq!(state("reviews-v3"), (1, "ejected".into()), "{eps:?}");
    assert_eq!(state("reviews-v5"), (2, "healthy".into()), "{eps:?}");
    assert_eq!(state("reviews-v4"), (3, "healthy".into()), "{eps:?}");
}

#[test]
fn locality_distribute_splits_by_the_given_percentages() {
    if !require_privileged() {
        return;
    }
    // From r1/z1: 70% to r1/z1 (v1, v2), 30% to any zone of r2 (v3 and v4 by their own
    // weights); r3 (v5) is not listed and gets nothing. No outlier detection needed.
    let yaml = zoned(
        &["r1/z1", "r1/z1", "r2/z1", "r2/z2", "r3/z1"],
        "    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {\"r1/z1/*\": 70, \"r2/*\": 30}
",
    );
    let m = mesh_with(5, &[], &yaml, &["--client-locality", "r1/z1"]);
    let n = 1000;
    let s = spread(&m, n);
    let share = |names: &[&str]| {
        names
            .iter()
            .map(|x| s[*x].as_u64().unwrap_or(0))
            .sum::<u64>() as f64
            / n as f64
    };
    // Binomial sd at p = 0.3, n = 1000 is 0.015: ±0.06 is four sd.
    assert!(
        (0.64..=0.76).contains(&share(&["reviews-v1", "reviews-v2"])),
        "{s}"
    );
    assert!(
        (0.24..=0.36).contains(&share(&["reviews-v3", "reviews-v4"])),
        "{s}"
    );
    assert!(
        share(&["reviews-v3"]) > 0.08 && share(&["reviews-v4"]) > 0.08,
        "{s}"
    );
    assert_eq!(share(&["reviews-v5"]), 0.0, "{s}");
}

#[test]
fn warmup_gives_a_new_endpoint_a_small_share_that_grows_to_its_full_weight() {
    if !require_privileged() {
        return;
    }
    let policy = "    loadBalancer:
      simple: ROUND_ROBIN
      warmup: {duration: 4s, minimumPercent: 10}
";
    let one = zoned(&["r1/z1"], policy);
    let m = mesh(2, &[], &one);
    let warmup = |name: &str| {
        let eps = endpoints(&m);
        let e = eps.iter().find(|e| e["name"] == name)?;
        e["warmup_percent"].as_f64()
    };
    assert_eq!(spread(&m, 10)["reviews-v1"], 10);
    // As in Envoy, the endpoints a cluster starts with warm up too (all alike).
    let started = std::time::Instant::now();
    assert!(warmup("reviews-v1").unwrap() < 100.0);
    let wait_warm = |name: &str, since: std::time::Instant| {
        while warmup(name) != Some(100.0) {
            assert!(
                since.elapsed() < std::time::Duration::from_secs(9),
                "{name} still warming"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_warm("reviews-v1", started);
    // v2 joins the warm v1 and starts at the 10% minimum.
    replace_config(&m.cfg, &zoned(&["r1/z1", "r1/z1"], policy));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while warmup("reviews-v2").is_none() {
        assert!(std::time::Instant::now() < deadline, "reload not applied");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let joined = std::time::Instant::now();
    assert_eq!(warmup("reviews-v1"), Some(100.0), "v1 keeps its join time");
    let s = spread(&m, 200);
    let early = joined.elapsed().as_secs_f64();
    let new_share = s["reviews-v2"].as_u64().unwrap_or(0) as f64 / 200.0;
    // Its weight was at most max(10%, elapsed / 4 s) during the burst.
    eprintln!(
        "warmup: the new endpoint served {new_share:.3} of 200 requests in its first {early:.2} s"
    );
    let bound = (early / 4.0).max(0.1);
    assert!(
        new_share < bound / (1.0 + bound) + 0.07,
        "share {new_share} after {early:.2} s: {s}"
    );
    // After the window both are equal again (round robin, exactly alternating).
    wait_warm("reviews-v2", joined);
    let s = spread(&m, 100);
    assert_eq!(s["reviews-v2"], 50, "{s}");
}

#[test]
fn route_actions_rewrite_headers_redirect_direct_response_and_fault() {
    if !require_privileged() {
        return;
    }
    let dest = "reviews.demo.svc.cluster.local";
    let yaml = reviews_service(2, "HTTP")
        + &subsets("")
        + &virtual_service(&format!(
            "  - match: [{{uri: {{prefix: /old/}}}}]
    redirect: {{uri: /new, authority: moved.example, redirectCode: 302}}
  - match: [{{uri: {{exact: /health}}}}]
    directResponse: {{status: 418, body: {{string: short and stout}}}}
    headers: {{response: {{set: {{x-direct: 'yes'}}}}}}
  - match: [{{uri: {{prefix: /api/}}}}]
    rewrite: {{uri: /v2/, authority: internal.reviews}}
    headers:
      request: {{set: {{x-route: api}}, add: {{x-added: one}}, remove: [x-secret]}}
      response: {{set: {{x-resp: route}}, remove: [content-type]}}
    route:
    - destination: {{host: {dest}, subset: v1}}
      headers: {{request: {{add: {{x-added: two}}}}, response: {{add: {{x-dest: v1}}}}}}
  - match: [{{uri: {{prefix: /abort}}}}]
    fault: {{abort: {{httpStatus: 503, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: {dest}, subset: v2}}}}]
  - match: [{{uri: {{prefix: /half}}}}]
    fault: {{abort: {{httpStatus: 500, percentage: {{value: 50}}}}}}
    route: [{{destination: {{host: {dest}, subset: v2}}}}]
  - match: [{{uri: {{prefix: /slow}}}}]
    fault: {{delay: {{fixedDelay: 300ms, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: {dest}, subset: v2}}}}]
"
        ));
    let m = mesh(2, &[], &yaml);
    let get = |path: &str, extra: &[&str]| {
        let url = format!("{URL}{path}");
        let mut args = vec![url.as_str()];
        args.extend_from_slice(extra);
        m.http(&args)
    };
    // redirect: 302 with the new authority (its own port: none) and path; the query stays.
    let r = get("/old/page?x=1", &[]);
    assert_eq!(r["status"]["302"], 1, "{r}");
    assert_eq!(
        r["first_headers"]["location"], "http://moved.example/new?x=1",
        "{r}"
    );
    assert!(
        r["served"].as_object().unwrap().is_empty(),
        "nothing was forwarded: {r}"
    );
    // directResponse: the status and body, with the route's response headers.
    let r = get("/health", &[]);
    assert_eq!(r["status"]["418"], 1, "{r}");
    assert_eq!(r["first"], "short and stout", "{r}");
    assert_eq!(r["first_headers"]["x-direct"], "yes", "{r}");
    // rewrite and headers: what the endpoint received, and what the client got back.
    let r = get(
        "/api/users?id=7",
        &["--header", "x-secret: s3", "--header", "x-added: zero"],
    );
    let seen = &r["first"];
    assert_eq!(seen["podname"], "reviews-v1", "{r}");
    assert_eq!(seen["path"], "/v2/users", "{r}");
    assert_eq!(seen["query"], "id=7", "{r}");
    assert_eq!(seen["authority"], "internal.reviews", "{r}");
    let h = &seen["header_values"];
    assert_eq!(h["x-route"], "api", "{r}");
    assert_eq!(
        h["x-added"], "zero, one, two",
        "route then destination add: {r}"
    );
    assert!(h.get("x-secret").is_none(), "removed: {r}");
    let back = &r["first_headers"];
    assert_eq!(back["x-resp"], "route", "{r}");
    assert_eq!(back["x-dest"], "v1", "{r}");
    assert!(back.get("content-type").is_none(), "removed: {r}");
    // fault abort at 100%: never forwarded; at 50%: about half.
    let r = get("/abort", &["--count", "20"]);
    assert_eq!(r["status"]["503"], 20, "{r}");
    assert_eq!(r["first"], "fault filter abort", "{r}");
    assert!(r["served"].as_object().unwrap().is_empty(), "{r}");
    let r = m.http(&[&format!("{URL}/half"), "--count", "400"]);
    let aborted = r["status"]["500"].as_u64().unwrap_or(0);
    // Binomial sd at n = 400 is 10: ±50 is five sd.
    assert!((150..=250).contains(&aborted), "{r}");
    assert_eq!(served(&r, "reviews-v2"), 400 - aborted, "{r}");
    // fault delay: every request waits the fixed delay, then is served.
    let r = get("/slow", &["--count", "3"]);
    assert_eq!(ok_count(&r), 3, "{r}");
    assert!(r["p50_us"].as_f64().unwrap() >= 300_000.0, "{r}");
    // The access log names the injected faults with Envoy's flags.
    let log = m.daemon.log();
    assert!(log.contains("flag=FI"), "{log}");
    assert!(log.contains("flag=DI"), "{log}");
}

#[test]
fn cors_preflights_are_answered_and_allowed_origins_see_their_headers() {
    if !require_privileged() {
        return;
    }
    let dest = "reviews.demo.svc.cluster.local";
    let yaml = reviews_service(1, "HTTP")
        + &virtual_service(&format!(
            "  - match: [{{uri: {{prefix: /strict}}}}]
    corsPolicy:
      allowOrigins: [{{exact: 'https://app.example'}}]
      allowMethods: [GET, POST]
      unmatchedPreflights: IGNORE
    route: [{{destination: {{host: {dest}}}}}]
  - corsPolicy:
      allowOrigins: [{{exact: 'https://app.example'}}, {{prefix: 'https://dev.'}}]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-trace]
      maxAge: 600s
      allowCredentials: true
    route: [{{destination: {{host: {dest}}}}}]
"
        ));
    let m = mesh(1, &[], &yaml);
    let call = |path: &str, method: &str, origin: &str| {
        let url = format!("{URL}{path}");
        let origin = format!("origin: {origin}");
        m.http(&[
            &url,
            "--method",
            method,
            "--header",
            &origin,
            "--header",
            "access-control-request-method: POST",
        ])
    };
    // An allowed preflight is answered by the proxy: 200, the policy's headers, no endpoint.
    let r = call("/", "OPTIONS", "https://app.example");
    assert_eq!(r["status"]["200"], 1, "{r}");
    assert!(r["served"].as_object().unwrap().is_empty(), "{r}");
    let h = &r["first_headers"];
    assert_eq!(
        h["access-control-allow-origin"], "https://app.example",
        "{r}"
    );
    assert_eq!(h["access-control-allow-methods"], "GET,POST", "{r}");
    assert_eq!(h["access-control-allow-headers"], "x-token", "{r}");
    assert_eq!(h["access-control-max-age"], "600", "{r}");
    assert_eq!(h["access-control-allow-credentials"], "true", "{r}");
    // An actual request from an allowed origin reaches the endpoint and gets the headers back.
    let r = call("/", "GET", "https://dev.example");
    assert_eq!(served(&r, "reviews-v1"), 1, "{r}");
    let h = &r["first_headers"];
    assert_eq!(
        h["access-control-allow-origin"], "https://dev.example",
        "{r}"
    );
    assert_eq!(h["access-control-expose-headers"], "x-trace", "{r}");
    // Another origin: forwarded untouched (its preflight too, by default).
    let r = call("/", "OPTIONS", "https://evil.example");
    assert_eq!(served(&r, "reviews-v1"), 1, "{r}");
    assert!(
        r["first_headers"]
            .get("access-control-allow-origin")
            .is_none(),
        "{r}"
    );
    // Under IGNORE its preflight is answered here, with no CORS headers.
    let r = call("/strict", "OPTIONS", "https://evil.example");
    assert_eq!(r["status"]["200"], 1, "{r}");
    assert!(r["served"].as_object().unwrap().is_empty(), "{r}");
    assert!(
        r["first_headers"]
            .get("access-control-allow-origin")
            .is_none(),
        "{r}"
    );
}

#[test]
fn mirrors_copy_requests_to_their_subset_and_the_client_sees_only_the_route() {
    if !require_privileged() {
        return;
    }
    let dest = "reviews.demo.svc.cluster.local";
    let yaml = reviews_service(3, "HTTP")
        + &subsets("")
        + &virtual_service(&format!(
            "  - route: [{{destination: {{host: {dest}, subset: v1}}}}]
    mirrors:
    - destination: {{host: {dest}, subset: v2}}
    - destination: {{host: {dest}, subset: v3}}
      percentage: {{value: 0}}
"
        ));
    let m = mesh(3, &[], &yaml);
    let r = m.http(&[&format!("{URL}/"), "--count", "20"]);
    assert_eq!(
        served(&r, "reviews-v1"),
        20,
        "the client only sees the route: {r}"
    );
    let requests = |subset: &str| {
        let c = m.daemon.clusters();
        c["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["subset"] == subset)
            .map_or(0, |c| {
                c["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["rq_total"].as_u64().unwrap_or(0))
                    .sum()
            })
    };
    // Fire-and-forget: the copies arrive shortly after the replies.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while requests("v2") < 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(requests("v2"), 20, "every request mirrored to v2");
    assert_eq!(requests("v3"), 0, "percentage 0 mirrors nothing");
    assert_eq!(requests("v1"), 20);
}

#[test]
fn envoy_with_istios_default_retry_policy_also_hides_a_503_endpoint() {
    if !require_privileged() {
        return;
    }
    // The reference for Drover's default (`retry_on_per_try_timeout_and_route_timeout`): Envoy
    // 1.40 given the route retry policy istiod writes for a route without `retries`, with one
    // endpoint answering 503 and one 200, round robin.
    let Some(bin) = drover_tests::envoy::bin() else {
        return;
    };
    let t = Topology::new(2);
    let _servers: Vec<_> = [
        ("reviews-v1", &["--status", "503"][..]),
        ("reviews-v2", &[][..]),
    ]
    .iter()
    .enumerate()
    .map(|(i, (name, extra))| {
        let addr = std::net::SocketAddr::new(Topology::ep4(i + 1), 9080);
        drover_tests::Proc::server_with(Some(&t.endpoints[i]), "http", &[addr], name, extra)
    })
    .collect();
    let config = format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15124}}}}}}
static_resources:
  listeners:
  - address: {{socket_address: {{address: 127.0.0.1, port_value: 15123}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            virtual_hosts:
            - name: reviews
              domains: ['*']
              routes:
              - match: {{prefix: /}}
                route:
                  cluster: reviews
                  retry_policy:
                    retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
                    num_retries: 2
                    retriable_status_codes: [503]
                    host_selection_retry_max_attempts: 5
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: {{'@type': type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}
  clusters:
  - name: reviews
    type: STATIC
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: reviews
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {}, port_value: 9080}}}}}}
        - endpoint: {{address: {{socket_address: {{address: {}, port_value: 9080}}}}}}
",
        Topology::ep4(1),
        Topology::ep4(2)
    );
    let dir = drover_tests::Pki::new();
    let envoy = drover_tests::envoy::Envoy::start(&bin, &t.client, &dir.dir, "retry", &config);
    envoy.wait_listening(&t.client, "127.0.0.1:15123".parse().unwrap());
    let r = probe(
        Some(&t.client),
        None,
        &[
            "http",
            "http://127.0.0.1:15123/",
            "--count",
            "10",
            "--concurrency",
            "1",
        ],
    );
    assert_eq!(r["status"]["200"], 10, "{r}\n{}", envoy.log());
    let stats = t
        .client
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "http://127.0.0.1:15124/stats?filter=cluster.reviews.upstream_rq_retry",
        ])
        .output()
        .expect("curl envoy admin");
    let stats = String::from_utf8_lossy(&stats.stdout);
    let retries: u64 = (stats.lines())
        .find_map(|l| l.strip_prefix("cluster.reviews.upstream_rq_retry: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        retries >= 4,
        "about every other request met the 503 endpoint: {stats}"
    );
}

#[test]
fn request_ids_and_trace_context_are_generated_or_continued_upstream() {
    if !require_privileged() {
        return;
    }
    let m = mesh_with(
        1,
        &[],
        &reviews_service(1, "HTTP"),
        &["--trace-sampling", "100"],
    );
    let seen = |headers: &[&str]| {
        let mut args = vec![format!("{URL}/")];
        for h in headers {
            args.extend(["--header".to_string(), h.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        m.http(&args)["first"]["header_values"].clone()
    };
    // Nothing from the client: a UUID v4 request id, a new sampled trace in both formats.
    let h = seen(&[]);
    let id = h["x-request-id"].as_str().unwrap_or_default().to_string();
    assert_eq!(id.len(), 36, "{h}");
    assert_eq!(&id[14..15], "4", "a version 4 UUID: {h}");
    let tp: Vec<&str> = h["traceparent"]
        .as_str()
        .unwrap_or_default()
        .split('-')
        .collect();
    assert_eq!((tp.len(), tp[0], tp[3]), (4, "00", "01"), "{h}");
    assert_eq!(h["x-b3-traceid"], tp[1], "{h}");
    assert_eq!(h["x-b3-spanid"], tp[2], "{h}");
    assert_eq!(h["x-b3-sampled"], "1", "{h}");
    assert_ne!(
        seen(&[])["x-request-id"],
        id.as_str(),
        "a new id per request"
    );
    assert!(
        m.daemon.wait_log(
            &format!("request_id={id} trace_id={}", tp[1]),
            std::time::Duration::from_secs(2)
        ),
        "the access log carries both"
    );
    // The client's ids: kept; its trace continued with a new span and its decision.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let h = seen(&[
        "x-request-id: client-id-1",
        &format!("traceparent: 00-{trace}-00f067aa0ba902b7-00"),
        "tracestate: vendor=x",
    ]);
    assert_eq!(h["x-request-id"], "client-id-1", "{h}");
    let tp: Vec<&str> = h["traceparent"]
        .as_str()
        .unwrap_or_default()
        .split('-')
        .collect();
    assert_eq!((tp[1], tp[3]), (trace, "00"), "{h}");
    assert_ne!(tp[2], "00f067aa0ba902b7", "this hop's own span: {h}");
    assert_eq!(h["tracestate"], "vendor=x", "{h}");
    assert!(h.get("x-b3-traceid").is_none(), "{h}");
}
