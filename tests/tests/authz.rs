//! AuthorizationPolicy on the inbound side of an enrolled pod, through the real capture path:
//! three daemons ("nodes") — the server pod's (PERMISSIVE, so plaintext peers are checked too),
//! a client pod of namespace `test` (`client-sa`) and one of namespace `evil` (`other-sa`), each
//! reaching the server over HBONE. The policies live in the shared configuration file; edits
//! are picked up by the file watch. Root needed; under `CI` the tests fail rather than skip.

use std::{net::SocketAddr, time::Duration};

use drover_tests::{Daemon, PinDir, Pki, Proc, Topology, probe, require_privileged, write_config};

const VIP: &str = "127.77.0.10";

/// The server pod's service (80 → 7000, 81 → 7001, HTTP 9080), reached over HBONE, and the
/// policies `policies`.
fn config(ep: std::net::IpAddr, policies: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: test}}
spec:
  hosts: [web.test.svc]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}
  - {{number: 81, name: tcp-b, protocol: TCP, targetPort: 7001}}
  - {{number: 9080, name: http, protocol: HTTP, targetPort: 9080}}
  resolution: STATIC
  endpoints:
  - {{address: {ep}, serviceAccount: server-sa, labels: {{ambient.istio.io/redirection: enabled}}}}
{policies}"
    )
}

/// DENY by namespace over an ALLOW that would admit it; ALLOW by principal with `notPorts`,
/// by `ipBlocks` with `ports`; an HTTP rule (`GET /api/*`); an AUDIT policy.
const POLICIES: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-evil, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [evil]}}]
    to: [{operation: {ports: ['7000']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: test}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/test/sa/client-sa]}}]
    to: [{operation: {notPorts: ['7001', '9080']}}]
  - from: [{source: {namespaces: [evil]}}]
    to: [{operation: {ports: ['7000']}}]
  - from: [{source: {ipBlocks: [198.19.0.0/16]}}]
    to: [{operation: {ports: ['7001']}}]
  - to: [{operation: {ports: ['9080'], methods: [GET], paths: ['/api/*']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-evil, namespace: test}
spec:
  action: AUDIT
  rules: [{from: [{source: {namespaces: [evil]}}]}]
";

/// Locks client-sa out of port 7000.
const LOCKDOWN: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lockdown, namespace: test}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ['*/sa/client-sa']}}]
    to: [{operation: {ports: ['7000']}}]
";

/// Not valid: CUSTOM needs an external authorizer Drover does not have.
const INVALID: &str = "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: external, namespace: test}
spec:
  action: CUSTOM
  provider: {name: ext-authz}
  rules: [{}]
";

fn node(cfg: &std::path::Path, mesh: &str, netns: &str, ns: &str, sa: &str) -> (Daemon, PinDir) {
    let pins = PinDir::new();
    let args: Vec<String> = [
        "--config",
        &cfg.display().to_string(),
        "--pin-dir",
        &pins.path.display().to_string(),
        "--client-namespace",
        ns,
        "--service-account",
        sa,
        "--netns",
        netns,
        "--inbound-pods",
        "--peer-authentication",
        "permissive",
        "--mesh-ca",
        mesh,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    (Daemon::start(&args).expect("daemon starts"), pins)
}

/// `drover_authz_denials_total` of `policy` on `d`.
fn denials(d: &Daemon, policy: &str) -> u64 {
    let metrics = d.admin_get("/stats/prometheus");
    let needle = format!("drover_authz_denials_total{{policy=\"{policy}\"}} ");
    (metrics.lines())
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// `istio_requests_total{reporter="destination"}` with `code` on `d`, summed over its series.
fn destination_requests(d: &Daemon, code: &str) -> u64 {
    let metrics = d.admin_get("/stats/prometheus");
    let code = format!("response_code=\"{code}\"");
    (metrics.lines())
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&code))
        .filter(|l| l.contains("reporter=\"destination\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Waits (bounded by `within`) until `check` holds; how long it took.
fn within(within: Duration, check: impl Fn() -> bool) -> Option<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if check() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

#[test]
fn authorization_policies_decide_per_peer_port_and_request_on_the_pods_inbound_side() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let mesh = pki.mesh_ca();
    let t = Topology::new(1);
    let evil_ns = t.add_client(1);
    let ep = Topology::ep4(1);
    let _servers = [
        Proc::server(
            Some(&t.endpoints[0]),
            "echo",
            &[SocketAddr::new(ep, 7000), SocketAddr::new(ep, 7001)],
            "ep1",
        ),
        Proc::server(
            Some(&t.endpoints[0]),
            "http",
            &[SocketAddr::new(ep, 9080)],
            "ep1",
        ),
    ];
    let cfg = write_config(&config(ep, POLICIES));
    let (server, _p1) = node(&cfg, &mesh, &t.endpoints[0].name, "test", "server-sa");
    let (_client, _p2) = node(&cfg, &mesh, &t.client.name, "test", "client-sa");
    let (_evil, _p3) = node(&cfg, &mesh, &evil_ns.name, "evil", "other-sa");
    let vip = |port: u16| -> SocketAddr { format!("{VIP}:{port}").parse().unwrap() };
    let greets = |ns: &drover_tests::Netns, addr: SocketAddr| {
        ns.greeting(addr)
            .is_some_and(|l| l.starts_with("hello from ep1"))
    };

    // ALLOW by principal (with notPorts): client-sa reaches 7000, not 7001.
    assert!(greets(&t.client, vip(80)), "{}", server.log());
    assert!(!greets(&t.client, vip(81)));
    // DENY by namespace wins over the ALLOW rule that admits evil on 7000.
    assert!(!greets(&evil_ns, vip(80)));
    assert!(
        server.wait_log(
            "denied by DENY policy istio-system/deny-evil rule 0",
            Duration::from_secs(3)
        ),
        "{}",
        server.log()
    );
    assert_eq!(denials(&server, "istio-system/deny-evil"), 1);
    // ipBlocks with ports: evil's node (198.19.0.0/16) reaches 7001; AUDIT logs it, allowed.
    assert!(greets(&evil_ns, vip(81)));
    assert!(server.wait_log("AUDIT policy matched", Duration::from_secs(3)));
    assert!(server.log().contains("test/audit-evil"));
    // Plaintext peers (PERMISSIVE) have no principal: the client's plaintext is refused on
    // 7000; the evil namespace's plaintext passes on 7001 by its address.
    assert!(!greets(&t.client, SocketAddr::new(ep, 7000)));
    assert!(greets(&evil_ns, SocketAddr::new(ep, 7001)));
    assert!(server.clusters()["inbound"]["denied"].as_u64().unwrap() >= 3);

    // HTTP over HBONE: GET /api/* allowed, the rest answered 403 as Envoy answers.
    let http = |method: &str, path: &str| {
        probe(
            Some(&t.client),
            None,
            &[
                "http",
                &format!("http://{VIP}:9080{path}"),
                "--method",
                method,
            ],
        )
    };
    assert_eq!(http("GET", "/api/x")["status"]["200"], 1);
    // A dot segment is normalized before matching: /api/../admin is /admin.
    for (method, path) in [
        ("POST", "/api/x"),
        ("GET", "/admin"),
        ("GET", "/api/../admin"),
    ] {
        let r = http(method, path);
        assert_eq!(r["status"]["403"], 1, "{method} {path}: {r}");
        assert_eq!(r["first"], "RBAC: access denied", "{r}");
    }
    assert_eq!(
        denials(&server, ""),
        3 + 2,
        "{}",
        server.admin_get("/stats/prometheus")
    );
    // The requests checked here are counted at the destination as a sidecar counts them:
    // denials as 403.
    assert_eq!(destination_requests(&server, "403"), 3);
    assert!(destination_requests(&server, "200") >= 1);

    // An allowed HTTP/1.1 upgrade is bridged through the checked HTTP path.
    t.client.check_upgrade_bridged(vip(9080), "/api/ws");

    // A policy edit applies to new connections within a second (file watch).
    std::fs::write(&cfg, config(ep, &format!("{POLICIES}{LOCKDOWN}"))).unwrap();
    let took = within(Duration::from_secs(1), || !greets(&t.client, vip(80)));
    assert!(
        took.is_some(),
        "lockdown not applied within 1 s: {}",
        server.log()
    );

    // An invalid policy is refused, located; the last valid policies keep enforcing.
    std::fs::write(&cfg, config(ep, &format!("{POLICIES}{LOCKDOWN}{INVALID}"))).unwrap();
    assert!(
        server.wait_log("spec.action", Duration::from_secs(3)),
        "{}",
        server.log()
    );
    assert!(server.log().contains("CUSTOM needs an external authorizer"));
    assert!(!greets(&t.client, vip(80)));
    assert!(greets(&evil_ns, vip(81)));
}
