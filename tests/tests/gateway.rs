//! The Gateway API mesh routes (GAMMA) through the real capture path: each test is one case of
//! the Gateway API repository's mesh conformance suite (`conformance/tests/mesh/*.go`, cited per
//! test), rebuilt with network namespaces: the client is captured by Drover, the services are
//! ServiceEntries with VIPs in 127.77.0.0/16, the backends `echo-v1` and `echo-v2` are
//! `drover-testsrv http` servers that report their name and the request they saw. Root needed;
//! under `CI` the tests fail rather than skip.

use drover_tests::{Daemon, Mesh, MeshBuilder, Topology, replace_config, require_privileged};
use serde_json::Value;

/// The conformance suite's mesh namespace.
const NS: &str = "gateway-conformance-mesh";
/// Service VIPs: `echo` (both versions), `echo-v1`, `echo-v2`.
const ECHO: &str = "127.77.0.10";
const ECHO_V1: &str = "127.77.0.11";
const ECHO_V2: &str = "127.77.0.12";

/// The suite's three Services, each with ports 80 and 8080 (both to the servers' 7080).
fn services() -> String {
    let mut out = String::new();
    for (name, vip, eps) in [
        ("echo", ECHO, vec![1, 2]),
        ("echo-v1", ECHO_V1, vec![1]),
        ("echo-v2", ECHO_V2, vec![2]),
    ] {
        let endpoints: Vec<String> = eps
            .iter()
            .map(|i| format!("{{address: {}}}", Topology::ep4(*i)))
            .collect();
        out.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {NS}}}
spec:
  hosts: [{name}.{NS}.svc.cluster.local]
  addresses: [{vip}]
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 7080}}
  - {{number: 8080, name: http-alt, protocol: HTTP, targetPort: 7080}}
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints: [{}]
",
            endpoints.join(", ")
        ));
    }
    out
}

/// The services and `routes`, a client in `client_ns`.
fn mesh(routes: &str, client_ns: &str) -> Mesh {
    MeshBuilder::new(2)
        .server(1, "http", &[7080], "echo-v1", &[])
        .server(2, "http", &[7080], "echo-v2", &[])
        .yaml(format!("{}---\n{routes}", services()))
        .args(&["--client-namespace", client_ns])
        .start()
}

/// One request from the client: the probe's report (status, first body, first headers).
fn get(m: &Mesh, url: &str, headers: &[&str]) -> Value {
    let mut args = vec![url];
    for h in headers {
        args.extend(["--header", h]);
    }
    m.http(&args)
}

fn status(r: &Value) -> u64 {
    r["status"]
        .as_object()
        .and_then(|s| s.keys().next())
        .and_then(|k| k.parse().ok())
        .unwrap_or(0)
}

fn backend(r: &Value) -> &str {
    r["first"]["podname"].as_str().unwrap_or("-")
}

fn response_header<'a>(r: &'a Value, name: &str) -> Option<&'a str> {
    r["first_headers"][name].as_str()
}

fn request_header<'a>(r: &'a Value, name: &str) -> Option<&'a str> {
    r["first"]["header_values"][name].as_str()
}

/// An HTTPRoute `name` whose parent is Service `parent` (with `port`), with `rules` (YAML list,
/// indented two spaces).
fn route(name: &str, parent: &str, port: Option<u16>, rules: &str) -> String {
    let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: {parent}{port}}}]
  rules:
{rules}"
    )
}

/// `MeshPorts` (conformance/tests/mesh/mesh-ports.go) and `MeshFrontendHostname`
/// (mesh-frontend-hostname.go): a parentRef port limits the route to that port; the route
/// binds the Service's address, not the Host header.
#[test]
fn mesh_ports_and_frontend_bind_the_service_address_and_port() {
    if !require_privileged() {
        return;
    }
    let set = |v: &str| {
        format!(
            "  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: {v}}}]}}}}]
    backendRefs: [{{name: echo-{v}, port: 80}}]
"
        )
    };
    let routes = route("mesh-ports-v1", "echo-v1", Some(80), &set("v1"))
        + &route("mesh-ports-v2", "echo-v2", None, &set("v2"));
    let m = mesh(&routes, NS);
    // MeshPorts: explicit port set, send to that port.
    let r = get(&m, &format!("http://{ECHO_V1}/"), &[]);
    assert_eq!((status(&r), backend(&r)), (200, "echo-v1"), "{r}");
    assert_eq!(response_header(&r, "x-header-set"), Some("v1"), "{r}");
    // Explicit port, send to an excluded port: the route does not apply.
    let r = get(&m, &format!("http://{ECHO_V1}:8080/"), &[]);
    assert_eq!((status(&r), backend(&r)), (200, "echo-v1"), "{r}");
    assert_eq!(response_header(&r, "x-header-set"), None, "{r}");
    // No port set: every port.
    for port in [80, 8080] {
        let r = get(&m, &format!("http://{ECHO_V2}:{port}/"), &[]);
        assert_eq!(response_header(&r, "x-header-set"), Some("v2"), "{r}");
        assert_eq!(backend(&r), "echo-v2", "{r}");
    }
    // MeshFrontendHostname: sent to echo-v2 with Host echo-v1 → echo-v2's route applies.
    let r = get(&m, &format!("http://{ECHO_V2}/"), &["host: echo-v1"]);
    assert_eq!(response_header(&r, "x-header-set"), Some("v2"), "{r}");
    assert_eq!(backend(&r), "echo-v2", "{r}");
}

/// `MeshConsumerRoute` (conformance/tests/mesh/mesh-consumer-route.go): a route in another
/// namespace than its parent's applies only to clients of its own namespace.
#[test]
fn mesh_consumer_route_applies_to_its_namespace_only() {
    if !require_privileged() {
        return;
    }
    let consumer = "gateway-conformance-mesh-consumer";
    let routes = format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: mesh-consumer-route, namespace: {consumer}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo-v1, namespace: {NS}, port: 80}}]
  rules:
  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set}}]}}}}]
    backendRefs: [{{name: echo-v1, namespace: {NS}, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: consumer, namespace: {NS}}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {consumer}}}]
  to: [{{group: '', kind: Service}}]
"
    );
    let mut m = mesh(&routes, consumer);
    let url = format!("http://{ECHO_V1}/");
    let r = get(&m, &url, &[]);
    assert_eq!(
        response_header(&r, "x-header-set"),
        Some("set"),
        "consumer client: {r}"
    );
    assert_eq!(backend(&r), "echo-v1", "{r}");
    // The same request from the producer's namespace is not modified.
    m.daemon.stop();
    let args = drover_tests::args(
        &m.cfg,
        &m._pins,
        &["--netns", &m.t.client.name, "--client-namespace", NS],
    );
    m.daemon = Daemon::start(&args).expect("daemon restarts");
    let r = get(&m, &url, &[]);
    assert_eq!((status(&r), backend(&r)), (200, "echo-v1"), "{r}");
    assert_eq!(
        response_header(&r, "x-header-set"),
        None,
        "producer client: {r}"
    );
}

/// `MeshBasic` (mesh-basic.go), `MeshHTTPRouteSimpleSameNamespace`
/// (httproute-simple-same-namespace.go), `MeshSplit` (mesh-split.go) and `MeshHTTPRouteWeight`
/// (httproute-weight.go), then `MeshHTTPRouteRewritePath` (httproute-rewrite-path.go) with its
/// header modifiers, `MeshHTTPRouteRedirectPort` (httproute-redirect-port.go) and
/// `MeshHTTPRouteQueryParamMatching` (httproute-query-param-matching.go), applied to `echo` in
/// turn by editing the running configuration.
#[test]
fn mesh_routes_split_rewrite_redirect_and_match_on_a_live_daemon() {
    if !require_privileged() {
        return;
    }
    let m = mesh("", NS);
    let echo = format!("http://{ECHO}");
    // MeshBasic: no route, both versions answer.
    let r = m.http(&[&format!("{echo}/"), "--count", "40"]);
    assert_eq!(r["status"]["200"], 40, "{r}");
    assert!(
        r["served"]["echo-v1"].as_u64() > Some(0) && r["served"]["echo-v2"].as_u64() > Some(0),
        "{r}"
    );

    let apply = |routes: &str, probe: &str, want: &str| {
        replace_config(&m.cfg, &format!("{}{routes}", services()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = get(&m, &format!("{echo}{probe}"), &[]);
            if backend(&r) == want {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reload not applied: {r}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // MeshHTTPRouteSimpleSameNamespace: every request to echo goes to echo-v1.
    apply(
        &route(
            "mesh-simple",
            "echo",
            None,
            "  - backendRefs: [{name: echo-v1, port: 80}]\n",
        ),
        "/",
        "echo-v1",
    );
    let r = m.http(&[&format!("{echo}/"), "--count", "30"]);
    assert_eq!(r["served"]["echo-v1"], 30, "{r}");

    // MeshSplit: /v1 → echo-v1, /v2 → echo-v2; MeshHTTPRouteWeight: 70/30 on /weighted.
    apply(
        &route(
            "mesh-split",
            "echo",
            None,
            "  - matches: [{path: {type: Exact, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {value: /weighted}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 70}, {name: echo-v2, port: 80, weight: 30}]
",
        ),
        "/v2",
        "echo-v2",
    );
    assert_eq!(backend(&get(&m, &format!("{echo}/v1"), &[])), "echo-v1");
    // No rule matches: 404.
    assert_eq!(status(&get(&m, &format!("{echo}/other"), &[])), 404);
    let n = 500;
    let r = m.http(&[
        &format!("{echo}/weighted/x"),
        "--count",
        &n.to_string(),
        "--concurrency",
        "4",
    ]);
    let v1 = r["served"]["echo-v1"].as_u64().unwrap_or(0) as f64 / n as f64;
    // Binomial sd for p=0.7, n=500 is 0.02; ±0.08 is four of them.
    assert!((0.62..=0.78).contains(&v1), "echo-v1 share {v1}: {r}");

    // MeshHTTPRouteRewritePath, MeshHTTPRouteRedirectPort, MeshHTTPRouteQueryParamMatching.
    apply(
        &route(
            "mesh-rewrite-redirect-query",
            "echo",
            Some(80),
            "  - matches: [{path: {value: /prefix/one}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /strip-prefix}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /full/rewrite-path-and-modify-headers}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /test}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Header-Set, value: set-overwrites-values}]
        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]
        remove: [X-Header-Remove]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /port-and-host-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, hostname: example.org, statusCode: 302}}]
  - matches: [{path: {value: /port}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]
  - matches: [{path: {value: /port-and-status}}]
    filters: [{type: RequestRedirect, requestRedirect: {port: 8083, statusCode: 301}}]
  - matches: [{path: {value: /q}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /q}, queryParams: [{name: animal, value: dolphin}]}]
    backendRefs: [{name: echo-v2, port: 80}]
",
        ),
        "/prefix/one/two",
        "echo-v1",
    );
    let path = |p: &str| get(&m, &format!("{echo}{p}"), &[])["first"]["path"].clone();
    assert_eq!(path("/prefix/one/two"), "/one/two");
    assert_eq!(path("/strip-prefix/three"), "/three");
    assert_eq!(path("/strip-prefix"), "/");
    assert_eq!(path("/full/one/two"), "/one");
    let r = get(
        &m,
        &format!("{echo}/full/rewrite-path-and-modify-headers/test"),
        &[
            "X-Header-Remove: remove-val",
            "X-Header-Add-Append: append-val-1",
            "X-Header-Set: set-val",
        ],
    );
    assert_eq!(r["first"]["path"], "/test", "{r}");
    assert_eq!(
        request_header(&r, "x-header-add"),
        Some("header-val-1"),
        "{r}"
    );
    assert_eq!(
        request_header(&r, "x-header-add-append"),
        Some("append-val-1, header-val-2"),
        "{r}"
    );
    assert_eq!(
        request_header(&r, "x-header-set"),
        Some("set-overwrites-values"),
        "{r}"
    );
    assert_eq!(request_header(&r, "x-header-remove"), None, "{r}");
    // Redirects: the spec's default is 302; the port is replaced, the host kept unless named.
    for (p, code, location) in [
        ("/port", 302, format!("http://{ECHO}:8083/port")),
        (
            "/port-and-status",
            301,
            format!("http://{ECHO}:8083/port-and-status"),
        ),
        (
            "/port-and-host-and-status",
            302,
            "http://example.org:8083/port-and-host-and-status".to_string(),
        ),
    ] {
        let r = get(&m, &format!("{echo}{p}"), &[]);
        assert_eq!(status(&r), code, "{p}: {r}");
        assert_eq!(
            response_header(&r, "location"),
            Some(location.as_str()),
            "{p}: {r}"
        );
    }
    // Query parameters choose the backend; none matching is a 404.
    assert_eq!(
        backend(&get(&m, &format!("{echo}/q?animal=whale"), &[])),
        "echo-v1"
    );
    assert_eq!(
        backend(&get(&m, &format!("{echo}/q?animal=dolphin"), &[])),
        "echo-v2"
    );
    assert_eq!(
        status(&get(&m, &format!("{echo}/q?animal=shark"), &[])),
        404
    );
    // The route is bound to port 80 only: 8080 keeps the Service's own balancing.
    let r = m.http(&[
        &format!("http://{ECHO}:8080/prefix/one/two"),
        "--count",
        "20",
    ]);
    assert_eq!(r["first"]["path"], "/prefix/one/two", "{r}");
    // An access log line names the rule.
    assert!(
        m.daemon.log().contains(&format!(
            "HTTPRoute {NS}/mesh-rewrite-redirect-query rules[0]"
        )),
        "the access log names the route rule"
    );
}
