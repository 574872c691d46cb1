//! Kubernetes mode through the real kernel capture path: the daemon's real `kube::Client` lists
//! and watches the test API server (`drover_tests::apiserver`) on loopback, and captured
//! connections from the client namespace reach the pods the API server says are ready, shaped
//! by the DestinationRules and VirtualServices it serves. Needs root; under `CI` it fails rather
//! than skips. Service VIPs are loopback addresses inside the client namespace.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use drover_tests::{
    Daemon, Mesh, MeshBuilder, Netns, PinDir, Proc, Topology,
    apiserver::{
        AUTHORIZATION_POLICY, ApiServer, DESTINATION_RULE, ISTIO, Kind, NAMESPACE,
        PEER_AUTHENTICATION, POD, VIRTUAL_SERVICE,
    },
    echo_servers,
    k8s::{Cluster, istio, namespace, pod},
    probe, require_privileged, unique_id,
};

const VIP: &str = "127.77.0.30";
/// How long a change in the API server may take to reach the data path.
const PROPAGATION: Duration = Duration::from_secs(15);

/// A cluster with service `shop/echo` (`VIP:80` → pods' port 7000), the echo servers of a
/// topology of `n` endpoints, and a daemon in Kubernetes mode capturing the client namespace.
struct Fixture {
    t: Topology,
    /// More client namespaces (see `Topology::add_client`), captured too.
    clients: Vec<Netns>,
    cluster: Cluster,
    daemon: Daemon,
    _servers: Vec<Proc>,
    _pins: PinDir,
}

fn fixture(n: usize, istio_kinds: &[Kind], pods: &[(&str, &str)]) -> Fixture {
    fixture_with_clients(n, 0, istio_kinds, pods)
}

fn fixture_with_clients(
    n: usize,
    extra_clients: usize,
    istio_kinds: &[Kind],
    pods: &[(&str, &str)],
) -> Fixture {
    let t = Topology::new(n);
    let clients: Vec<Netns> = (1..=extra_clients).map(|k| t.add_client(k)).collect();
    let servers = echo_servers(&t);
    let mut cluster = Cluster::new(istio_kinds, "shop", "echo", VIP, ("tcp-echo", 80, 7000));
    for (i, (name, version)) in pods.iter().enumerate() {
        cluster.add_pod(
            name,
            &[("app", "echo"), ("version", version)],
            &Topology::ep4(i + 1).to_string(),
        );
    }
    let pins = PinDir::new();
    let mut netns = vec![t.client.name.as_str()];
    netns.extend(clients.iter().map(|c| c.name.as_str()));
    let daemon = start(&cluster.api, &netns, &pins).expect("daemon starts");
    Fixture {
        t,
        clients,
        cluster,
        daemon,
        _servers: servers,
        _pins: pins,
    }
}

/// `--kubernetes` with a kubeconfig for `api` and node `node1`.
fn kube_flags(api: &ApiServer) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("drover-kube-{}", unique_id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    [
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "node1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The daemon's arguments in Kubernetes mode against `api`, capturing `netns`.
fn kube_args(api: &ApiServer, netns: &[&str], pins: &std::path::Path) -> Vec<String> {
    let mut args = kube_flags(api);
    args.extend(["--pin-dir".to_string(), pins.display().to_string()]);
    for ns in netns {
        args.extend(["--netns".to_string(), ns.to_string()]);
    }
    args
}

fn start(api: &ApiServer, netns: &[&str], pins: &PinDir) -> Result<Daemon, (Option<i32>, String)> {
    Daemon::start(&kube_args(api, netns, &pins.path))
}

/// Which endpoint answered each of `n` connections to `VIP:80` from the topology's client.
fn served(t: &Topology, n: usize) -> BTreeMap<String, usize> {
    served_from(&t.client, n)
}

/// Which endpoint answered each of `n` connections to `VIP:80` from `ns` (`"refused"` for a
/// failure).
fn served_from(ns: &Netns, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let r = probe(
            Some(ns),
            None,
            &["connect", &format!("{VIP}:80"), "--send", "hi"],
        );
        // "hello from ep1 peer=…"
        let who = r["greeting"]
            .as_str()
            .and_then(|g| g.split_whitespace().nth(2))
            .unwrap_or("refused")
            .to_string();
        *seen.entry(who).or_insert(0) += 1;
    }
    seen
}

/// Polls (bounded by [`PROPAGATION`]) until 8 connections in a row are served by exactly the
/// endpoints `want`; panics with what was seen.
fn converges(t: &Topology, want: &[&str]) {
    let deadline = Instant::now() + PROPAGATION;
    loop {
        let seen = served(t, 8);
        let names: Vec<&str> = seen.keys().map(String::as_str).collect();
        if names == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "wanted {want:?} within {PROPAGATION:?}, still served by {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn services_and_endpoints_follow_the_api_server() {
    if !require_privileged() {
        return;
    }
    let Fixture {
        t,
        clients: _,
        mut cluster,
        daemon,
        _servers,
        _pins,
    } = fixture(3, &ISTIO, &[("ep1", "v1"), ("ep2", "v2")]);
    assert!(
        daemon.log().contains("kubernetes: synced"),
        "{}",
        daemon.log()
    );
    converges(&t, &["ep1", "ep2"]);

    // A pod that stops being ready (terminating) leaves the rotation: an endpoint change, which
    // patches the served snapshot (no build, no reload of the configuration).
    let reloads = |d: &Daemon| d.log().matches("configuration reloaded").count();
    let before = reloads(&daemon);
    cluster.set_ready("ep2", false, true);
    converges(&t, &["ep1"]);
    cluster.set_ready("ep2", true, false);
    converges(&t, &["ep1", "ep2"]);
    assert_eq!(reloads(&daemon), before, "{}", daemon.log());
    assert!(
        daemon.log().contains("snapshots patched"),
        "{}",
        daemon.log()
    );

    // An EndpointSlice naming a pod the daemon has not seen yet: that endpoint waits for it.
    cluster.pods.push(drover_tests::k8s::TestPod {
        name: "ep3".into(),
        labels: BTreeMap::new(),
        ip: Topology::ep4(3).to_string(),
        ready: true,
        terminating: false,
    });
    cluster.write_slice();
    std::thread::sleep(Duration::from_secs(1));
    converges(&t, &["ep1", "ep2"]);
    cluster.api.apply(
        POD,
        pod(
            "shop",
            "ep3",
            &[("app", "echo"), ("version", "v3")],
            "default",
            "node1",
            &Topology::ep4(3).to_string(),
        ),
    );
    converges(&t, &["ep1", "ep2", "ep3"]);

    // A DestinationRule edit no route depends on patches the snapshot too: the cluster's
    // balancer follows it, with no reload.
    let rule = |simple: &str| {
        istio(&format!(
            "
metadata: {{name: echo, namespace: shop}}
spec:
  host: echo.shop.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
"
        ))
    };
    let lb = |d: &Daemon| {
        let clusters = &d.clusters()["clusters"];
        drover_tests::named(clusters, "outbound|80||echo.shop.svc.cluster.local")["lb"].clone()
    };
    let until = |d: &Daemon, want: &str| {
        let deadline = std::time::Instant::now() + PROPAGATION;
        while lb(d) != want && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        lb(d)
    };
    // (A new rule is a full reload: its log line may follow the swap.)
    let first = reloads(&daemon);
    cluster.api.apply(DESTINATION_RULE, rule("LEAST_REQUEST"));
    assert_eq!(until(&daemon, "LEAST_REQUEST"), "LEAST_REQUEST");
    assert!(
        daemon.wait_log_count("configuration reloaded", first + 1, PROPAGATION),
        "{}",
        daemon.log()
    );
    let before = reloads(&daemon);
    cluster.api.apply(DESTINATION_RULE, rule("RANDOM"));
    assert_eq!(until(&daemon, "RANDOM"), "RANDOM", "{}", daemon.log());
    assert_eq!(reloads(&daemon), before, "{}", daemon.log());
    converges(&t, &["ep1", "ep2", "ep3"]);

    // The Service deleted: its VIP is no longer captured (nothing listens on it in the client
    // namespace, so the connection is refused rather than proxied).
    cluster
        .api
        .delete(drover_tests::apiserver::SERVICE, "shop", "echo");
    converges(&t, &["refused"]);
}

const SUBSETS: &str = "
metadata: {name: echo, namespace: shop}
spec:
  host: echo.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

fn route_to(subset: &str) -> serde_json::Value {
    istio(&format!(
        "
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.shop.svc.cluster.local]
  tcp:
  - route:
    - destination: {{host: echo.shop.svc.cluster.local, subset: {subset}}}
"
    ))
}

#[test]
fn istio_resources_from_the_api_server_apply_live_and_invalid_ones_are_rejected_alone() {
    if !require_privileged() {
        return;
    }
    let Fixture {
        t,
        clients: _,
        cluster,
        daemon,
        _servers,
        _pins,
    } = fixture(2, &ISTIO, &[("ep1", "v1"), ("ep2", "v2")]);
    converges(&t, &["ep1", "ep2"]);
    cluster.api.apply(DESTINATION_RULE, istio(SUBSETS));
    cluster.api.apply(VIRTUAL_SERVICE, route_to("v2"));
    converges(&t, &["ep2"]);
    cluster.api.apply(VIRTUAL_SERVICE, route_to("v1"));
    converges(&t, &["ep1"]);

    // An invalid edit of the DestinationRule is rejected alone, with its name and field; its
    // last valid version (the subsets the route needs) keeps serving.
    let invalid = SUBSETS.replace(
        "  subsets:",
        "  trafficPolicy: {loadBalancer: {simple: BOGUS}}\n  subsets:",
    );
    cluster.api.apply(DESTINATION_RULE, istio(&invalid));
    assert!(
        daemon.wait_log("DestinationRule shop/echo: spec.trafficPolicy", PROPAGATION),
        "{}",
        daemon.log()
    );
    assert!(
        daemon
            .log()
            .contains("its last valid version keeps serving")
    );
    converges(&t, &["ep1"]);

    // Deleting the route spreads over both pods again.
    cluster.api.delete(VIRTUAL_SERVICE, "shop", "echo");
    converges(&t, &["ep1", "ep2"]);
}

#[test]
fn crd_installed_later_relists_and_api_server_restarts_keep_serving() {
    if !require_privileged() {
        return;
    }
    let Fixture {
        t,
        clients: _,
        mut cluster,
        daemon,
        _servers,
        _pins,
    } = fixture(2, &[], &[("ep1", "v1"), ("ep2", "v2")]);
    assert!(
        daemon.log().contains("CRD not installed"),
        "{}",
        daemon.log()
    );
    converges(&t, &["ep1", "ep2"]);

    // The Istio CRDs are installed after the daemon started.
    cluster.api.install(DESTINATION_RULE);
    cluster.api.install(VIRTUAL_SERVICE);
    cluster.api.apply(DESTINATION_RULE, istio(SUBSETS));
    cluster.api.apply(VIRTUAL_SERVICE, route_to("v2"));
    converges(&t, &["ep2"]);

    // History compacted and every watch dropped: the watchers get 410 Gone and relist.
    cluster.api.compact();
    cluster.api.drop_watches();
    assert!(
        daemon.wait_log("kubernetes: relisted", PROPAGATION),
        "{}",
        daemon.log()
    );
    converges(&t, &["ep2"]);

    // The API server goes away: the snapshot keeps serving, every connection succeeds.
    cluster.api.stop();
    let seen = served(&t, 20);
    assert_eq!(seen.get("ep2"), Some(&20), "{seen:?}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(served(&t, 10).get("ep2"), Some(&10));

    // Back, with a change made meanwhile: the daemon resyncs and applies it.
    let before = cluster
        .api
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    cluster.api.delete(VIRTUAL_SERVICE, "shop", "echo");
    cluster.api.restart();
    converges(&t, &["ep1", "ep2"]);
    assert!(
        cluster
            .api
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
    );
    cluster.set_ready("ep1", false, false);
    converges(&t, &["ep2"]);
    // The watch's troubles are counted: six first lists (four core kinds, two Istio kinds) and
    // relists after the 410 (some may still be in backoff after the restart), errors seen.
    let metrics = daemon.admin_get("/stats/prometheus");
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert!(value("drover_kubernetes_relists_total") > 6, "{metrics}");
    assert!(
        value("drover_kubernetes_watch_errors_total") >= 1,
        "{metrics}"
    );
    assert_eq!(value("drover_kubernetes_rejected_objects_total"), 0);
}

#[test]
fn unreachable_api_server_and_missing_node_name_are_clear_errors() {
    if !require_privileged() {
        return;
    }
    let t = Topology::new(1);
    let pins = PinDir::new();
    // No node name.
    let out = std::process::Command::new(drover_tests::bin("drover"))
        .args(["run", "--kubernetes", "--netns", &t.client.name])
        .env_remove("NODE_NAME")
        .output()
        .expect("run drover");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--node-name"), "{err}");

    // An API server that is down at start: the daemon says which URL and credentials, retries
    // with backoff, and becomes ready once the server answers.
    let mut api = ApiServer::start(&ISTIO);
    api.stop();
    let api_url = api.url();
    let (tx, rx) = std::sync::mpsc::channel();
    let readiness = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut args = kube_args(&api, &[&t.client.name], &pins.path);
    args.extend(["--readiness".to_string(), readiness.to_string()]);
    let probe_ready = || {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
            ])
            .arg(format!("http://{readiness}/healthz/ready"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    std::thread::spawn(move || {
        let _ = tx.send(Daemon::start(&args));
    });
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        rx.try_recv().is_err(),
        "the daemon must not be ready without the API server"
    );
    assert_eq!(probe_ready(), "503", "the readiness probe says not ready");
    api.restart();
    let daemon = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("daemon start returns")
        .expect("daemon ready once the API server answers");
    let log = daemon.log();
    let failures = log.matches("kubernetes watch failed").count();
    assert_eq!(probe_ready(), "200");
    assert!(log.contains(&api_url), "{log}");
    assert!(log.contains("kubeconfig"), "{log}");
    // Retried with backoff, not in a hot loop: four watchers over ~4 s.
    assert!((4..200).contains(&failures), "{failures} failures:\n{log}");
}

#[test]
fn use_source_ip_hashes_each_workload_address_sticky_per_workload_spread_across() {
    if !require_privileged() {
        return;
    }
    let Fixture {
        t,
        clients,
        cluster,
        daemon: _daemon,
        _servers,
        _pins,
    } = fixture_with_clients(3, 5, &ISTIO, &[("ep1", "v1"), ("ep2", "v2"), ("ep3", "v3")]);
    converges(&t, &["ep1", "ep2", "ep3"]);
    cluster.api.apply(
        DESTINATION_RULE,
        istio(
            "
metadata: {name: echo, namespace: shop}
spec:
  host: echo.shop.svc.cluster.local
  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
",
        ),
    );
    // Sticky: every connection of one workload reaches the same endpoint.
    let deadline = Instant::now() + PROPAGATION;
    while served(&t, 8).len() != 1 {
        assert!(Instant::now() < deadline, "useSourceIp never applied");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut picked = BTreeMap::new();
    for ns in std::iter::once(&t.client).chain(&clients) {
        let seen = served_from(ns, 6);
        assert_eq!(seen.len(), 1, "{}: not sticky: {seen:?}", ns.name);
        let ep = seen.into_keys().next().expect("one endpoint");
        assert_ne!(ep, "refused");
        picked.insert(ns.name.clone(), ep);
    }
    // Spread: the workloads' own addresses are hashed (all captured connections come from
    // loopback, which would put every workload on one endpoint).
    let distinct: std::collections::BTreeSet<_> = picked.values().collect();
    assert!(
        distinct.len() >= 2,
        "every workload on one endpoint: {picked:?}"
    );
}

// === The walkthrough's scenarios, as Kubernetes objects ===

const REVIEWS: &str = "http://127.77.0.10:9080";
const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/seeds");

/// `reviews` in `demo` as a Service with pods `reviews-v1..n` (endpoint i runs `drover-testsrv
/// http` with `server_args[i]`), the Istio resources of `yaml` in the API server, and a daemon
/// in Kubernetes mode.
fn reviews_mesh(server_args: &[Vec<String>], yaml: &str) -> (Cluster, Mesh) {
    let ips: Vec<_> = (1..=server_args.len()).map(Topology::ep4).collect();
    let cluster = Cluster::reviews("127.77.0.10", &ips);
    let skipped = cluster.apply_yaml(yaml);
    assert!(skipped.iter().all(|k| k == "Gateway"), "{skipped:?}");
    let flags = kube_flags(&cluster.api);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let m = server_args
        .iter()
        .enumerate()
        .fold(MeshBuilder::new(server_args.len()), |b, (i, a)| {
            b.server(i + 1, "http", &[9080], &format!("reviews-v{}", i + 1), a)
        })
        .without_config()
        .args(&flags)
        .start();
    (cluster, m)
}

fn delays(ms: &[u64]) -> Vec<Vec<String>> {
    ms.iter()
        .map(|d| vec!["--delay-ms".to_string(), d.to_string()])
        .collect()
}

/// `reviews_mesh` with the walkthrough's scenario `k` YAML; endpoint i answers after
/// `delays_ms[i]`.
fn scenario(k: u32, delays_ms: &[u64]) -> (Cluster, Mesh) {
    let yaml = std::fs::read_to_string(format!("{SEEDS}/walkthrough-scenario{k}.yaml")).unwrap();
    reviews_mesh(&delays(delays_ms), &yaml)
}

/// `n` requests to `path` of `reviews` (`concurrency` at once), every one answered 200.
fn all_ok(m: &Mesh, path: &str, n: u64, concurrency: u32) -> serde_json::Value {
    let r = m.http(&[
        &format!("{REVIEWS}{path}"),
        "--count",
        &n.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ]);
    assert_eq!(r["status"]["200"].as_u64(), Some(n), "{r}");
    r
}

fn share(r: &serde_json::Value, pod: &str, n: u64) -> f64 {
    r["served"][pod].as_u64().unwrap_or(0) as f64 / n as f64
}

#[test]
fn walkthrough_scenario1_from_kubernetes_objects_splits_50_50() {
    if !require_privileged() {
        return;
    }
    let (_cluster, m) = scenario(1, &[0, 0, 0]);
    let n = 1000;
    let r = all_ok(&m, "/reviews/1", n, 4);
    let v1 = share(&r, "reviews-v1", n);
    // Binomial sd for p=0.5, n=1000 is 0.016; ±0.06 is more than 3.5 sd.
    assert!((0.44..=0.56).contains(&v1), "v1 share {v1}: {r}");
    assert_eq!(share(&r, "reviews-v3", n), 0.0, "v3 is in no route: {r}");
    assert!(
        m.daemon
            .log()
            .contains("cluster=outbound|9080|v1|reviews.demo.svc.cluster.local"),
        "access log names the subset cluster"
    );
}

#[test]
fn walkthrough_scenario2_from_kubernetes_objects_least_conn_avoids_the_slow_pod() {
    if !require_privileged() {
        return;
    }
    let (_cluster, m) = scenario(2, &[150, 0, 0]);
    let n = 300;
    let r = all_ok(&m, "/", n, 8);
    let slow = share(&r, "reviews-v1", n);
    assert!(slow < 0.15, "least request avoids the slow pod: {slow}");
}

/// The walkthrough's scenario `k` written with the Gateway API (`fixtures/gamma/`): `reviews`
/// as in [`scenario`] plus a Service per version (`reviews-vN` at `127.77.0.1N`, selecting pod
/// `reviews-vN`); endpoint i answers after `delays_ms[i]`.
fn gamma_scenario(k: u32, delays_ms: &[u64]) -> (Cluster, Mesh) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/gamma");
    let yaml = std::fs::read_to_string(format!("{dir}/walkthrough-scenario{k}.yaml")).unwrap();
    let (cluster, m) = reviews_mesh(&delays(delays_ms), &yaml);
    for (i, pod) in cluster.pods.iter().enumerate() {
        let name = format!("reviews-v{}", i + 1);
        let vip = format!("127.77.0.1{}", i + 1);
        cluster.api.apply(
            drover_tests::apiserver::SERVICE,
            drover_tests::k8s::service("demo", &name, &[&vip], &[("http", 9080, 9080)]),
        );
        cluster.api.apply(
            drover_tests::apiserver::ENDPOINT_SLICE,
            drover_tests::k8s::endpoint_slice(
                "demo",
                &format!("{name}-slice"),
                &name,
                &[(pod.ip.as_str(), pod.name.as_str(), true, false)],
                &[("http", 9080)],
            ),
        );
    }
    (cluster, m)
}

#[test]
fn walkthrough_scenario1_as_gateway_api_routes_splits_50_50_between_version_services() {
    if !require_privileged() {
        return;
    }
    let (_cluster, m) = gamma_scenario(1, &[0, 0, 0]);
    // The route's backends are Services created after the daemon started: wait for them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while m.http(&[&format!("{REVIEWS}/"), "--count", "4"])["status"]["200"] != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the version Services never resolved"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let n = 1000;
    let r = all_ok(&m, "/reviews/1", n, 4);
    let v1 = share(&r, "reviews-v1", n);
    // Binomial sd for p=0.5, n=1000 is 0.016; ±0.06 is more than 3.5 sd.
    assert!((0.44..=0.56).contains(&v1), "v1 share {v1}: {r}");
    assert_eq!(share(&r, "reviews-v3", n), 0.0, "v3 is in no route: {r}");
    let log = m.daemon.log();
    assert!(
        log.contains("cluster=outbound|9080||reviews-v1.demo.svc.cluster.local"),
        "the access log names the backend Service's cluster"
    );
    assert!(
        log.contains("HTTPRoute demo/reviews-traffic-split rules[0]"),
        "and the rule"
    );
}

#[test]
fn walkthrough_scenario2_as_gateway_api_routes_least_conn_avoids_the_slow_pod() {
    if !require_privileged() {
        return;
    }
    let (_cluster, m) = gamma_scenario(2, &[150, 0, 0]);
    let n = 300;
    let r = all_ok(&m, "/", n, 8);
    let slow = share(&r, "reviews-v1", n);
    assert!(slow < 0.15, "least request avoids the slow pod: {slow}");
    assert!(
        m.daemon.wait_log(
            "HTTPRoute demo/reviews rules[0]",
            std::time::Duration::from_secs(2)
        ),
        "the route applied"
    );
}

#[test]
fn walkthrough_scenario3_from_kubernetes_objects_overflows_with_503() {
    if !require_privileged() {
        return;
    }
    let (_cluster, m) = scenario(3, &[20]);
    let out =
        m.t.client
            .command("hey")
            .args(["-z", "3s", "-c", "20", &format!("{REVIEWS}/")])
            .output()
            .expect("hey");
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    let count = |code: &str| drover_tests::hey_responses(&report, code);
    let (ok, overflow) = (count("200"), count("503"));
    assert!(!report.contains("Error distribution"), "{report}");
    assert!(ok > 0 && overflow > ok, "mostly 503: {report}");
    let c = &m.daemon.clusters()["clusters"][0];
    assert_eq!(c["circuit_breakers"]["max_connections"], 1, "{c}");
}

#[test]
fn service_port_renamed_from_tcp_to_http_switches_to_the_l7_path() {
    if !require_privileged() {
        return;
    }
    let ips = [Topology::ep4(1)];
    let mut cluster = Cluster::reviews("127.77.0.10", &ips);
    let rename = |cluster: &mut Cluster, name: &str| {
        cluster.port.0 = name.into();
        cluster.api.apply(
            drover_tests::apiserver::SERVICE,
            drover_tests::k8s::service("demo", "reviews", &["127.77.0.10"], &[(name, 9080, 9080)]),
        );
        cluster.write_slice();
    };
    rename(&mut cluster, "tcp-web");
    let flags = kube_flags(&cluster.api);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let m = MeshBuilder::new(1)
        .server(1, "http", &[9080], "reviews-v1", &[])
        .without_config()
        .args(&flags)
        .start();
    let r = m.http(&[&format!("{REVIEWS}/tcp"), "--count", "3"]);
    assert_eq!(r["status"]["200"].as_u64(), Some(3), "{r}");
    assert!(
        !m.daemon.log().contains("path=/tcp"),
        "TCP port: relayed as bytes"
    );
    rename(&mut cluster, "http-web");
    let deadline = Instant::now() + PROPAGATION;
    loop {
        let r = m.http(&[&format!("{REVIEWS}/http"), "--count", "1"]);
        assert_eq!(r["status"]["200"].as_u64(), Some(1), "{r}");
        if m.daemon.log().contains("path=/http") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never switched to HTTP:\n{}",
            m.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How many reloads gave the two workloads `own` snapshots besides the daemon's own one.
fn snapshots(daemon: &Daemon, own: usize) -> usize {
    let line = format!("workloads=2 own_snapshots={own}");
    daemon.log().lines().filter(|l| l.ends_with(&line)).count()
}

#[test]
fn each_client_pod_gets_its_own_source_labels_routes_and_workload_selector_rules() {
    if !require_privileged() {
        return;
    }
    let Fixture {
        t,
        clients,
        cluster,
        daemon,
        _servers,
        _pins,
    } = fixture_with_clients(2, 1, &ISTIO, &[("ep1", "v1"), ("ep2", "v2")]);
    let b = &clients[0];
    // The client namespaces' pods, known only after the daemon started: identity follows.
    for (name, role, ip) in [
        ("client-a", "a", Topology::client4(1)),
        ("client-b", "b", Topology::client_k4(1)),
    ] {
        cluster.api.apply(
            POD,
            pod(
                "shop",
                name,
                &[("app", "frontend"), ("role", role)],
                name,
                "node1",
                &ip.to_string(),
            ),
        );
    }
    cluster.api.apply(DESTINATION_RULE, istio(SUBSETS));
    cluster.api.apply(
        VIRTUAL_SERVICE,
        istio(
            "
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo.shop.svc.cluster.local]
  tcp:
  - match: [{sourceLabels: {role: a}}]
    route: [{destination: {host: echo.shop.svc.cluster.local, subset: v1}}]
  - match: [{sourceLabels: {role: b}}]
    route: [{destination: {host: echo.shop.svc.cluster.local, subset: v2}}]
",
        ),
    );
    converges(&t, &["ep1"]);
    let deadline = Instant::now() + PROPAGATION;
    while served_from(b, 8).keys().collect::<Vec<_>>() != ["ep2"] {
        assert!(
            Instant::now() < deadline,
            "role b never routed to v2:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.log().contains("shop/client-a"), "identity logged");
    // `sourceLabels: {role: …}` tells them apart: a snapshot each.
    assert!(snapshots(&daemon, 2) > 0, "{}", daemon.log());

    // No rule reads `role` any more: the two pods share the daemon's own snapshot again.
    let before = snapshots(&daemon, 0);
    cluster.api.apply(VIRTUAL_SERVICE, route_to("v1"));
    let deadline = Instant::now() + PROPAGATION;
    while snapshots(&daemon, 0) == before {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A DestinationRule selecting role b redefines subset v1 for it alone.
    cluster.api.apply(
        DESTINATION_RULE,
        istio(
            "
metadata: {name: echo-for-b, namespace: shop}
spec:
  host: echo.shop.svc.cluster.local
  workloadSelector: {matchLabels: {role: b}}
  subsets:
  - {name: v1, labels: {version: v2}}
",
        ),
    );
    std::thread::sleep(Duration::from_secs(1));
    converges(&t, &["ep1"]);
    assert_eq!(served_from(b, 8).keys().collect::<Vec<_>>(), ["ep2"]);

    // `drover explain --workload` shows the pod's identity (and its namespace's labels), the
    // rule it gets, and where the service and each endpoint came from.
    cluster
        .api
        .apply(NAMESPACE, namespace("shop", &[("team", "shop")]));
    let explain = |pod: &str| {
        let mut args = vec!["explain".to_string()];
        args.extend(
            kube_flags(&cluster.api)
                .into_iter()
                .filter(|a| a != "--node-name" && a != "node1"),
        );
        args.extend(
            [
                "--host",
                "echo.shop.svc.cluster.local",
                "--subset",
                "v1",
                "--workload",
                pod,
            ]
            .map(String::from),
        );
        let out = std::process::Command::new(drover_tests::bin("drover"))
            .args(&args)
            .output()
            .expect("drover explain");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let for_b = explain("shop/client-b");
    assert!(
        for_b.contains("workload   pod shop/client-b (service account client-b"),
        "{for_b}"
    );
    assert!(for_b.contains("from Service shop/echo"), "{for_b}");
    assert!(
        for_b.contains("namespace  shop labels {team=shop}"),
        "{for_b}"
    );
    assert!(
        for_b.contains("from Pod shop/ep2 via EndpointSlice shop/echo-slice"),
        "{for_b}"
    );
    assert!(for_b.contains("DestinationRule shop/echo-for-b"), "{for_b}");
    let for_a = explain("shop/client-a");
    assert!(!for_a.contains("echo-for-b"), "{for_a}");
    assert!(for_a.contains("DestinationRule shop/echo"), "{for_a}");
}

#[test]
fn istio_mutual_presents_the_client_pods_own_service_account_identity() {
    if !require_privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("drover-kube-mesh-{}", unique_id()));
    let mesh = dir.join("mesh");
    let identity_dir = dir.join("identity");
    let path = |p: &std::path::Path| p.display().to_string();
    let drover = |args: &[&str]| {
        let out = std::process::Command::new(drover_tests::bin("drover"))
            .args(args)
            .output()
            .expect("drover");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    drover(&["ca", "init", "--dir", &path(&mesh)]);
    // The server is pod reviews-v1, service account `default` in `demo`.
    let cert = dir.join("server.pem");
    drover(&[
        "ca",
        "issue",
        "--dir",
        &path(&mesh),
        "--spiffe",
        "spiffe://cluster.local/ns/demo/sa/default",
        "--out",
        &path(&cert),
    ]);
    let cluster = Cluster::reviews("127.77.0.10", &[Topology::ep4(1)]);
    // The client namespace's pod runs as service account `frontend`.
    cluster.api.apply(
        POD,
        pod(
            "demo",
            "frontend-1",
            &[("app", "frontend")],
            "frontend",
            "node1",
            &Topology::client4(1).to_string(),
        ),
    );
    cluster.api.apply(
        DESTINATION_RULE,
        istio(
            "
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
",
        ),
    );
    let mut flags = kube_flags(&cluster.api);
    flags.extend([
        "--mesh-ca".into(),
        path(&mesh),
        "--identity-dir".into(),
        path(&identity_dir),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server_args: Vec<String> = [
        "--tls-cert",
        &path(&cert),
        "--tls-key",
        &path(&dir.join("server-key.pem")),
        "--tls-client-ca",
        &path(&mesh.join("root-cert.pem")),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let m = MeshBuilder::new(1)
        .server(1, "http", &[9080], "reviews-v1", &server_args)
        .without_config()
        .args(&flags)
        .start();
    let r = m.http(&[&format!("{REVIEWS}/"), "--count", "2"]);
    assert_eq!(
        r["status"]["200"].as_u64(),
        Some(2),
        "{r}\n{}",
        m.daemon.log()
    );
    // The certificate presented is the pod's own (ns demo, sa frontend), not the daemon's.
    let own = identity_dir
        .join("demo")
        .join("frontend")
        .join("workload.pem");
    assert_eq!(
        r["first"]["client_cert_id"],
        drover_tests::pem_id(&own),
        "{r}"
    );
    assert_ne!(
        drover_tests::pem_id(&own),
        drover_tests::pem_id(&identity_dir.join("workload.pem"))
    );
    assert!(
        m.daemon
            .log()
            .contains("spiffe://cluster.local/ns/demo/sa/frontend")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A daemon in Kubernetes mode terminating inbound (PERMISSIVE) for pod shop/ep1 (app=echo,
/// the endpoint namespace of a one-endpoint topology) on port 7000, with a mesh CA.
struct InboundPod {
    t: Topology,
    cluster: Cluster,
    daemon: Daemon,
    _servers: Vec<drover_tests::Proc>,
    _pins: PinDir,
    _pki: drover_tests::Pki,
}

impl InboundPod {
    fn start() -> Self {
        let pki = drover_tests::Pki::new();
        let mesh = pki.mesh_ca();
        let t = Topology::new(1);
        let servers = echo_servers(&t);
        let mut cluster = Cluster::new(&ISTIO, "shop", "echo", VIP, ("tcp-echo", 80, 7000));
        // The inbound namespace holds pod shop/ep1 (app=echo): its identity comes from the Pod.
        cluster.add_pod("ep1", &[("app", "echo")], &Topology::ep4(1).to_string());
        let pins = PinDir::new();
        let mut args = kube_args(&cluster.api, &[], &pins.path);
        args.extend(
            [
                "--mesh-ca",
                &mesh,
                "--inbound-netns",
                &t.endpoints[0].name,
                "--inbound-port",
                "7000",
                "--peer-authentication",
                "permissive",
            ]
            .map(String::from),
        );
        let daemon = Daemon::start(&args).expect("daemon starts");
        Self {
            t,
            cluster,
            daemon,
            _servers: servers,
            _pins: pins,
            _pki: pki,
        }
    }

    /// Whether a plaintext client from the client namespace gets the workload's greeting.
    fn passes(&self) -> bool {
        let workload = std::net::SocketAddr::new(Topology::ep4(1), 7000);
        self.t.client.greeting(workload).is_some()
    }

    /// Waits (bounded) until [`InboundPod::passes`] is `want`.
    fn until(&self, want: bool, what: &str) {
        let deadline = Instant::now() + PROPAGATION;
        while self.passes() != want {
            assert!(Instant::now() < deadline, "{what}\n{}", self.daemon.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn peer_authentication_from_the_api_server_applies_to_the_inbound_pods_labels() {
    if !require_privileged() {
        return;
    }
    let pod = InboundPod::start();
    assert!(pod.passes(), "no policy: the daemon's PERMISSIVE");
    let policy = |app: &str| {
        istio(&format!(
            "
metadata: {{name: echo-strict, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  mtls: {{mode: STRICT}}
"
        ))
    };
    // A policy selecting the pod's labels makes it STRICT; one selecting other labels does not.
    pod.cluster.api.apply(PEER_AUTHENTICATION, policy("echo"));
    pod.until(false, "STRICT selecting app=echo refuses plaintext");
    pod.cluster.api.apply(PEER_AUTHENTICATION, policy("other"));
    pod.until(true, "a selector that misses the pod leaves it PERMISSIVE");
    assert!(pod.daemon.log().contains("plaintext client refused"));
}

#[test]
fn authorization_policy_from_the_api_server_applies_to_the_inbound_pod_and_an_invalid_one_is_rejected_alone()
 {
    if !require_privileged() {
        return;
    }
    let pod = InboundPod::start();
    assert!(pod.passes(), "no policy");
    let apply = |app: &str, action: &str| {
        let provider = if action == "CUSTOM" {
            "  provider: {name: ext-authz}\n"
        } else {
            ""
        };
        pod.cluster.api.apply(
            AUTHORIZATION_POLICY,
            istio(&format!(
                "
metadata: {{name: echo-guard, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: {action}
{provider}  rules:
  - from: [{{source: {{ipBlocks: [198.18.1.0/24]}}}}]
    to: [{{operation: {{ports: ['7000']}}}}]
"
            )),
        )
    };
    // A DENY of the client's addresses selecting the pod closes its connections.
    apply("echo", "DENY");
    pod.until(false, "DENY by ipBlocks from the API server");
    // A CUSTOM version is rejected alone: the last valid version keeps enforcing.
    apply("echo", "CUSTOM");
    let deadline = Instant::now() + PROPAGATION;
    while !pod
        .daemon
        .log()
        .contains("CUSTOM needs an external authorizer")
    {
        assert!(Instant::now() < deadline, "{}", pod.daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!pod.passes(), "the last valid DENY keeps enforcing");
    // A valid version selecting other labels lets the client through again.
    apply("other", "DENY");
    pod.until(true, "a selector that misses the pod");
    assert!(
        pod.daemon
            .log()
            .contains("denied by DENY policy shop/echo-guard rule 0")
    );
}

#[test]
fn an_istio_kind_that_cannot_be_listed_does_not_keep_the_daemon_unready() {
    if !require_privileged() {
        return;
    }
    let t = Topology::new(2);
    let _servers = echo_servers(&t);
    let mut cluster = Cluster::new(
        &[DESTINATION_RULE],
        "shop",
        "echo",
        VIP,
        ("tcp-echo", 80, 7000),
    );
    for (i, version) in ["v1", "v2"].iter().enumerate() {
        cluster.add_pod(
            &format!("ep{}", i + 1),
            &[("app", "echo"), ("version", version)],
            &Topology::ep4(i + 1).to_string(),
        );
    }
    // RBAC refuses DestinationRules (403 on list and watch).
    cluster.api.forbid("destinationrules", true);
    let pins = PinDir::new();
    let daemon = Daemon::start_within(
        &kube_args(&cluster.api, &[t.client.name.as_str()], &pins.path),
        Duration::from_secs(20),
    )
    .expect("ready without the refused kind");
    assert!(
        daemon.log().contains("this Istio kind cannot be listed"),
        "{}",
        daemon.log()
    );
    let kube = &daemon.clusters()["kubernetes"];
    assert!(
        kube["unavailable"]["DestinationRule"]
            .as_str()
            .is_some_and(|e| e.contains("403") || e.contains("orbidden")),
        "{kube}"
    );
    let ready = daemon.admin_get("/ready");
    assert!(
        ready.starts_with("LIVE\nserving without DestinationRule: "),
        "{ready}"
    );
    converges(&t, &["ep1", "ep2"]);
    // Once allowed, the kind is listed (the watcher retries with backoff) and applies.
    cluster.api.apply(DESTINATION_RULE, istio(SUBSETS));
    cluster.api.forbid("destinationrules", false);
    assert!(
        daemon.wait_log(
            "this Istio kind can be listed again",
            Duration::from_secs(45)
        ),
        "{}",
        daemon.log()
    );
    assert!(
        daemon.clusters()["kubernetes"]["unavailable"]
            .as_object()
            .is_some_and(|m| m.is_empty())
    );
    assert_eq!(daemon.admin_get("/ready"), "LIVE\n");
}

#[test]
fn standard_metrics_name_pod_workloads_by_controller_and_a_telemetry_object_turns_the_log_off() {
    if !require_privileged() {
        return;
    }
    // The mesh-wide Telemetry, from the API server: no access log.
    let telemetry = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging: [{disabled: true}]
";
    let (cluster, m) = reviews_mesh(&delays(&[0, 0]), telemetry);
    // reviews-v1 belongs to a Deployment `reviews-app` (through its ReplicaSet), as Istio
    // names workloads; reviews-v2 has no controller and keeps its pod name.
    let mut pod = drover_tests::k8s::pod(
        "demo",
        "reviews-v1",
        &[
            ("app", "reviews"),
            ("version", "v1"),
            ("pod-template-hash", "7f4669bdd9"),
        ],
        "default",
        "node1",
        &Topology::ep4(1).to_string(),
    );
    pod["metadata"]["ownerReferences"] = serde_json::json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "reviews-app-7f4669bdd9",
        "uid": "rs-1", "controller": true
    }]);
    cluster.api.apply(drover_tests::apiserver::POD, pod);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = m.http(&[&format!("{REVIEWS}/"), "--count", "4"]);
        assert_eq!(r["status"]["200"], 4, "{r}");
        let prom = m.daemon.admin_get("/stats/prometheus");
        if prom.contains("destination_workload=\"reviews-app\"") {
            assert!(
                prom.contains("destination_workload=\"reviews-v2\""),
                "{prom}"
            );
            assert!(prom.contains("destination_service=\"reviews.demo.svc.cluster.local\""));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the owner never named the workload: {prom}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        !m.daemon.log().contains("drover::access"),
        "the Telemetry object turned the access log off: {}",
        m.daemon.log()
    );
}
