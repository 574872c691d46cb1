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

/// The suite's three Services, each with HTTP ports 80 and 8080 (both to the servers' 7080) and
/// gRPC port 7070.
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
  - {{number: 7070, name: grpc, protocol: GRPC, targetPort: 7070}}
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
        .server(1, "grpc", &[7070], "echo-v1", &[])
        .server(2, "grpc", &[7070], "echo-v2", &[])
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

/// Replaces the routes of the running daemon with `routes`, waits (10 s at most) for the
/// reload, and checks that a request to `echo` + `probe` reaches `want`.
fn apply(m: &Mesh, routes: &str, probe: &str, want: &str) {
    const RELOADED: &str = "configuration reloaded";
    let before = m.daemon.log().matches(RELOADED).count();
    replace_config(&m.cfg, &format!("{}{routes}", services()));
    assert!(
        m.daemon
            .wait_log_count(RELOADED, before + 1, std::time::Duration::from_secs(10)),
        "reload not applied"
    );
    let r = get(m, &format!("http://{ECHO}{probe}"), &[]);
    assert_eq!(backend(&r), want, "{probe}: {r}");
}

/// `MeshPorts` (conformance/tests/mesh/mesh-ports.go), `MeshFrontend` (mesh-frontend.go) and
/// `MeshFrontendHostname` (mesh-frontend-hostname.go): a parentRef port limits the route to
/// that port; the route binds the Service's address, not the Host header.
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
    // MeshFrontend: each Service's route stays on its own address.
    let r = get(&m, &format!("http://{ECHO_V1}/"), &[]);
    assert_ne!(response_header(&r, "x-header-set"), Some("v2"), "{r}");
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

    let apply = |routes: &str, probe: &str, want: &str| apply(&m, routes, probe, want);
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
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {remove: [content-type]}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {value: /rewrite-host}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: four.example.org}}]
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
    // The response header the rule removes, and a rewritten host.
    let r = get(&m, &format!("{echo}/prefix/one/two"), &[]);
    assert_eq!(response_header(&r, "content-type"), None, "{r}");
    let r = get(&m, &format!("{echo}/rewrite-host"), &[]);
    assert_eq!(r["first"]["authority"], "four.example.org", "{r}");
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

/// The response of `GET echo` + `path` with request `headers`.
fn echo_get(m: &Mesh, path: &str, headers: &[&str]) -> Value {
    get(m, &format!("http://{ECHO}{path}"), headers)
}

/// A rule on `path` (PathPrefix) with `filters` and `backends` (YAML flow lists).
fn rule(path: &str, filters: &str, backends: &str) -> String {
    format!(
        "  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]
    filters: {filters}
    backendRefs: {backends}
"
    )
}

/// The header modifiers of `MeshHTTPRouteRequestHeaderModifier`, as a rule filter or (for
/// `MeshHTTPRouteBackendRequestHeaderModifier`) on the backend.
fn header_modifier_rules(on_backend: bool) -> String {
    let cases = [
        (
            "/set",
            "{set: [{name: X-Header-Set, value: set-overwrites-values}]}",
        ),
        (
            "/add",
            "{add: [{name: X-Header-Add, value: add-appends-values}]}",
        ),
        ("/remove", "{remove: [X-Header-Remove]}"),
        (
            "/multiple",
            "{set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}], add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, {name: X-Header-Add-3, value: header-add-3}], remove: [X-Header-Remove-1, X-Header-Remove-2]}",
        ),
        (
            "/case-insensitivity",
            "{set: [{name: X-Header-Set, value: header-set}], add: [{name: X-Header-Add, value: header-add}], remove: [X-Header-Remove]}",
        ),
    ];
    cases
        .iter()
        .map(|(path, m)| {
            let filter = format!("[{{type: RequestHeaderModifier, requestHeaderModifier: {m}}}]");
            match on_backend {
                false => rule(path, &filter, "[{name: echo-v1, port: 80}]"),
                true => rule(
                    path,
                    "[]",
                    &format!("[{{name: echo-v1, port: 80, filters: {filter}}}]"),
                ),
            }
        })
        .collect()
}

/// `MeshHTTPRouteMatching` (conformance/tests/mesh/httproute-matching.go),
/// `MeshHTTPRouteRequestHeaderModifier` and `MeshHTTPRouteBackendRequestHeaderModifier`
/// (httproute-request-header-modifier.go), `MeshHTTPRouteRedirectHostAndStatus`
/// (httproute-redirect-host-and-status.go, with the 303/307/308 variants of
/// httproute-30x-redirect-host-and-status.go and httproute-additional-redirect-host-and-status.go),
/// `MeshHTTPRoute303Redirect`, `…307Redirect`, `…308Redirect` (httproute-30x-redirect.go),
/// `MeshHTTPRouteRedirectPath`
/// (httproute-redirect-path.go), `MeshHTTPRouteSchemeRedirect` (httproute-redirect-scheme.go)
/// and `MeshHTTPRouteNamedRule` (httproute-named-rule.go), each applied to `echo` in turn on a
/// live daemon.
#[test]
fn mesh_matching_header_modifiers_redirects_and_named_rules() {
    if !require_privileged() {
        return;
    }
    let m = mesh("", NS);
    // MeshHTTPRouteMatching.
    apply(
        &m,
        &route(
            "mesh-matching",
            "echo",
            Some(80),
            "  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: version, value: two}]}]
    backendRefs: [{name: echo-v2, port: 80}]
",
        ),
        "/v2",
        "echo-v2",
    );
    let none: &[&str] = &[];
    for (path, headers, want) in [
        ("/", none, "echo-v1"),
        ("/example", none, "echo-v1"),
        ("/", &["version: one"], "echo-v1"),
        ("/v2", none, "echo-v2"),
        ("/v2/example", none, "echo-v2"),
        ("/", &["version: two"], "echo-v2"),
        ("/v2/", none, "echo-v2"),
        // Not a path segment prefix, so not /v2.
        ("/v2example", none, "echo-v1"),
        ("/foo/v2/example", none, "echo-v1"),
    ] {
        let r = echo_get(&m, path, headers);
        assert_eq!(backend(&r), want, "{path} {headers:?}: {r}");
    }

    // MeshHTTPRouteRequestHeaderModifier, then the same modifiers on the backend.
    for on_backend in [false, true] {
        let name = match on_backend {
            true => "mesh-backend-header-modifier",
            false => "mesh-header-modifier",
        };
        let routes = route(name, "echo", Some(80), &header_modifier_rules(on_backend));
        apply(&m, &routes, "/set", "echo-v1");
        let seen = |path: &str, headers: &[&str]| {
            echo_get(&m, path, headers)["first"]["header_values"].clone()
        };
        let h = seen("/set", &["Some-Other-Header: val"]);
        assert_eq!(h["some-other-header"], "val", "{h}");
        assert_eq!(h["x-header-set"], "set-overwrites-values", "{h}");
        let h = seen(
            "/set",
            &["Some-Other-Header: val", "X-Header-Set: some-other-value"],
        );
        assert_eq!(h["x-header-set"], "set-overwrites-values", "{h}");
        let h = seen("/add", &["Some-Other-Header: val"]);
        assert_eq!(h["x-header-add"], "add-appends-values", "{h}");
        let h = seen(
            "/add",
            &["Some-Other-Header: val", "X-Header-Add: some-other-value"],
        );
        assert_eq!(
            h["x-header-add"], "some-other-value, add-appends-values",
            "{h}"
        );
        let h = seen("/remove", &["X-Header-Remove: val"]);
        assert!(h.get("x-header-remove").is_none(), "{h}");
        let h = seen(
            "/multiple",
            &[
                "X-Header-Set-2: set-val-2",
                "X-Header-Add-2: add-val-2",
                "X-Header-Remove-2: remove-val-2",
                "Another-Header: another-header-val",
            ],
        );
        for (k, v) in [
            ("x-header-set-1", "header-set-1"),
            ("x-header-set-2", "header-set-2"),
            ("x-header-add-1", "header-add-1"),
            ("x-header-add-2", "add-val-2, header-add-2"),
            ("x-header-add-3", "header-add-3"),
            ("another-header", "another-header-val"),
        ] {
            assert_eq!(h[k], v, "{k}: {h}");
        }
        assert!(h.get("x-header-remove-1").is_none(), "{h}");
        assert!(h.get("x-header-remove-2").is_none(), "{h}");
        let h = seen(
            "/case-insensitivity",
            &[
                "x-header-set: original-val-set",
                "x-header-add: original-val-add",
                "x-header-remove: original-val-remove",
                "Another-Header: another-header-val",
            ],
        );
        assert_eq!(h["x-header-set"], "header-set", "{h}");
        assert_eq!(h["x-header-add"], "original-val-add, header-add", "{h}");
        assert!(h.get("x-header-remove").is_none(), "{h}");
    }

    // MeshHTTPRouteRedirectHostAndStatus (and the 303/307/308 cases), MeshHTTPRouteRedirectPath,
    // MeshHTTPRouteSchemeRedirect: one route, each case on its own prefix.
    let redirect = |path: &str, r: &str| {
        rule(
            path,
            &format!("[{{type: RequestRedirect, requestRedirect: {r}}}]"),
            "[]",
        )
    };
    let prefix = "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}";
    let full = "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}";
    let routes = [
        redirect("/hostname-redirect", "{hostname: example.org}"),
        redirect(
            "/host-and-status",
            "{hostname: example.org, statusCode: 301}",
        ),
        redirect(
            "/host-and-see-other",
            "{hostname: example.org, statusCode: 303}",
        ),
        redirect(
            "/host-and-temporary",
            "{hostname: example.org, statusCode: 307}",
        ),
        redirect(
            "/host-and-permanent",
            "{hostname: example.org, statusCode: 308}",
        ),
        redirect(
            "/host-and-status-temporary",
            "{hostname: example.org, statusCode: 307}",
        ),
        redirect(
            "/host-and-status-permanent",
            "{hostname: example.org, statusCode: 308}",
        ),
        // The 303/307/308 cases each redirect `/redirect` with their code; one path each here.
        redirect("/redirect-303", "{statusCode: 303}"),
        redirect("/redirect-307", "{statusCode: 307}"),
        redirect("/redirect-308", "{statusCode: 308}"),
        redirect("/original-prefix", &format!("{{{prefix}}}")),
        redirect(
            "/full",
            "{path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}",
        ),
        redirect(
            "/path-and-host",
            &format!("{{hostname: example.org, {prefix}}}"),
        ),
        redirect(
            "/path-and-status",
            &format!("{{statusCode: 301, {prefix}}}"),
        ),
        redirect(
            "/full-path-and-host",
            &format!("{{hostname: example.org, {full}}}"),
        ),
        redirect(
            "/full-path-and-status",
            &format!("{{statusCode: 301, {full}}}"),
        ),
        redirect("/scheme", "{scheme: https}"),
        redirect("/scheme-and-host", "{scheme: https, hostname: example.org}"),
        redirect("/scheme-and-status", "{scheme: https, statusCode: 301}"),
        redirect(
            "/scheme-and-host-and-status",
            "{scheme: https, hostname: example.org, statusCode: 302}",
        ),
        rule("/backend", "[]", "[{name: echo-v2, port: 80}]"),
    ]
    .concat();
    apply(
        &m,
        &route("mesh-redirects", "echo", Some(80), &routes),
        "/backend",
        "echo-v2",
    );
    let here = format!("http://{ECHO}");
    let example = "http://example.org";
    for (path, code, location) in [
        (
            "/hostname-redirect",
            302,
            format!("{example}/hostname-redirect"),
        ),
        (
            "/host-and-status",
            301,
            format!("{example}/host-and-status"),
        ),
        (
            "/host-and-see-other",
            303,
            format!("{example}/host-and-see-other"),
        ),
        (
            "/host-and-temporary",
            307,
            format!("{example}/host-and-temporary"),
        ),
        (
            "/host-and-permanent",
            308,
            format!("{example}/host-and-permanent"),
        ),
        (
            "/host-and-status-temporary",
            307,
            format!("{example}/host-and-status-temporary"),
        ),
        (
            "/host-and-status-permanent",
            308,
            format!("{example}/host-and-status-permanent"),
        ),
        ("/redirect-303", 303, format!("{here}/redirect-303")),
        ("/redirect-307", 307, format!("{here}/redirect-307")),
        ("/redirect-308", 308, format!("{here}/redirect-308")),
        (
            "/original-prefix/lemon",
            302,
            format!("{here}/replacement-prefix/lemon"),
        ),
        (
            "/full/path/original",
            302,
            format!("{here}/full-path-replacement"),
        ),
        (
            "/path-and-host",
            302,
            format!("{example}/replacement-prefix"),
        ),
        (
            "/path-and-status",
            301,
            format!("{here}/replacement-prefix"),
        ),
        (
            "/full-path-and-host",
            302,
            format!("{example}/replacement-full"),
        ),
        (
            "/full-path-and-status",
            301,
            format!("{here}/replacement-full"),
        ),
        ("/scheme", 302, format!("https://{ECHO}/scheme")),
        (
            "/scheme-and-host",
            302,
            "https://example.org/scheme-and-host".into(),
        ),
        (
            "/scheme-and-status",
            301,
            format!("https://{ECHO}/scheme-and-status"),
        ),
        (
            "/scheme-and-host-and-status",
            302,
            "https://example.org/scheme-and-host-and-status".into(),
        ),
    ] {
        let r = echo_get(&m, path, &[]);
        assert_eq!(status(&r), code, "{path}: {r}");
        assert_eq!(
            response_header(&r, "location"),
            Some(location.as_str()),
            "{path}: {r}"
        );
    }

    // MeshHTTPRouteNamedRule: a rule's name changes nothing but the label.
    apply(
        &m,
        &route(
            "mesh-named-rules",
            "echo",
            Some(80),
            "  - name: named-rule
    matches: [{path: {type: PathPrefix, value: /named}}]
    backendRefs: [{name: echo-v1, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /unnamed}}]
    backendRefs: [{name: echo-v2, port: 8080}]
",
        ),
        "/unnamed",
        "echo-v2",
    );
    assert_eq!(backend(&echo_get(&m, "/named", &[])), "echo-v1");
    assert!(
        m.daemon.wait_log(
            &format!("HTTPRoute {NS}/mesh-named-rules rules[0] (named-rule)"),
            std::time::Duration::from_secs(2)
        ),
        "the access log names the named rule"
    );
}

/// One gRPC probe call to `echo`'s gRPC port.
fn grpc(m: &Mesh, args: &[&str]) -> Value {
    let url = format!("http://{ECHO}:7070");
    let mut a = vec!["grpc", url.as_str()];
    a.extend_from_slice(args);
    drover_tests::probe(Some(&m.t.client), None, &a)
}

/// A GRPCRoute `name` on `echo`'s gRPC port with `rules` (YAML list, indented two spaces).
fn grpc_route(name: &str, rules: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {{name: {name}, namespace: {NS}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: echo, port: 7070}}]
  rules:
{rules}"
    )
}

/// `MeshGRPCRouteWeight` (conformance/tests/mesh/grpcroute-weight.go),
/// `MeshGRPCRouteRequestHeaderModifier` (grpcroute-request-header-modifier.go) and
/// `MeshGRPCRouteRequestMirror` (grpcroute-request-mirror.go), with this repository's gRPC echo
/// service (`drover.test.Echo/Unary`) in place of the suite's.
#[test]
fn mesh_grpc_routes_weight_header_modifier_and_mirror() {
    if !require_privileged() {
        return;
    }
    let m = mesh(
        &grpc_route(
            "mesh-grpc-weighted-backends",
            "  - backendRefs: [{name: echo-v1, port: 7070, weight: 70}, {name: echo-v2, port: 7070, weight: 30}]\n",
        ),
        NS,
    );
    // 500 calls; binomial sd for p=0.7 is 0.02, ±0.07 is 3.5 of them.
    let r = grpc(&m, &["--count", "500"]);
    let v1 = r["servers"]["echo-v1"].as_u64().unwrap_or(0) as f64 / 500.0;
    assert!((0.63..=0.77).contains(&v1), "echo-v1 share {v1}: {r}");

    // Header modifiers: of three rules with the same match only the first applies (set).
    let modifier = |filter: &str| {
        format!(
            "  - matches: [{{method: {{service: drover.test.Echo, method: Unary}}}}]
    filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {filter}}}]
    backendRefs: [{{name: echo-v1, port: 7070}}]
"
        )
    };
    let rules = [
        modifier("{set: [{name: X-Header-Set, value: set-overwrites-values}]}"),
        modifier("{add: [{name: X-Header-Add, value: add-appends-values}]}"),
        modifier("{remove: [X-Header-Remove]}"),
    ]
    .concat();
    let config = format!(
        "{}{}",
        services(),
        grpc_route("grpc-header-modifier", &rules)
    );
    replace_config(&m.cfg, &config);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let headers = [
        "--call",
        "headers",
        "--header",
        "X-Header-Set: some-other-value",
        "--header",
        "X-Header-Remove: val",
    ];
    let seen = loop {
        let r = grpc(&m, &headers);
        if r["headers"]["x-header-set"] == "set-overwrites-values" {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(seen["server"], "echo-v1", "{seen}");
    assert!(seen["headers"].get("x-header-add").is_none(), "{seen}");
    assert_eq!(seen["headers"]["x-header-remove"], "val", "{seen}");

    // Mirror: calls with x-mirror-only go to echo-v1, and a copy of each to echo-v2.
    let rules = "  - matches: [{headers: [{name: x-mirror-only, value: 'true'}]}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 7070}}}]
    backendRefs: [{name: echo-v1, port: 7070}]
";
    let config = format!(
        "{}{}",
        services(),
        grpc_route("mesh-grpc-request-mirror", rules)
    );
    replace_config(&m.cfg, &config);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Once the new route is in, a call without the header matches no rule and fails.
    while grpc(&m, &["--count", "1"])["error"].is_null() {
        assert!(std::time::Instant::now() < deadline, "reload not applied");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mirrored = || -> u64 {
        let c = m.daemon.clusters();
        (c["clusters"].as_array().unwrap().iter())
            .filter(|c| {
                (c["name"].as_str()).is_some_and(|n| n.starts_with("outbound|7070||echo-v2."))
            })
            .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| e["rq_total"].as_u64().unwrap_or(0))
            .sum()
    };
    let before = mirrored();
    let r = grpc(&m, &["--count", "10", "--header", "x-mirror-only: true"]);
    assert_eq!(
        r["servers"]["echo-v1"], 10,
        "the client sees echo-v1 only: {r}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while mirrored() < before + 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "mirror copies: {} of 10",
            mirrored() - before
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
