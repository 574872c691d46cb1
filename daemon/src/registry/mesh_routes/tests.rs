//! Gateway API routes bound and routed over built snapshots, no I/O: precedence across
//! routes, segment prefixes, producer and consumer routes, ReferenceGrants, the spec's 500s
//! and a VirtualService on the same host.

use std::{path::PathBuf, sync::Arc};

use super::super::{
    Registry,
    resolve::Client,
    route::{Request, RouteError},
};
use crate::{config::source::ConfigSet, testing::two_endpoint_service};

const VIP: &str = "127.77.0.10:80";

/// Services `web` (VIP, endpoints .2/.3) and `v1`, `v2` (no VIP) in `default`, `api` in `prod`,
/// and `yaml`; the snapshot of a client in `namespace`.
fn registry_for(namespace: &str, yaml: &str) -> Result<Registry, Vec<String>> {
    let mut text = two_endpoint_service("web.default.svc.cluster.local", VIP, ("http", "HTTP"), 80);
    for (name, ns, ip) in [
        ("v1", "default", "127.0.0.4"),
        ("v2", "default", "127.0.0.5"),
        ("api", "prod", "127.0.0.6"),
    ] {
        text.push_str(&format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{name}.{ns}.svc.cluster.local]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {ip}}}]
"
        ));
    }
    text.push_str("---\n");
    text.push_str(yaml);
    let mut set = ConfigSet::default();
    let mut problems = Vec::new();
    set.add_text(Arc::new(PathBuf::from("routes.yaml")), &text, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    let client = Client {
        namespace: namespace.to_string(),
        ..Default::default()
    };
    Registry::build(&set, &client).map_err(|r| r.errors.iter().map(|e| e.to_string()).collect())
}

fn registry(yaml: &str) -> Registry {
    registry_for("default", yaml).unwrap()
}

/// An HTTPRoute `name` in `ns` on Service `web` with `rules` (YAML indented two spaces).
fn http_route(name: &str, ns: &str, created: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, namespace: default}}]
  rules:
{rules}---
"
    )
}

/// The host, route label and status-less outcome of `GET path` with `headers`.
fn route(
    reg: &Registry,
    method: &str,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<(String, String), RouteError> {
    let headers: hyper::HeaderMap = (headers.iter())
        .map(|(k, v)| {
            (
                hyper::header::HeaderName::from_static(k),
                v.parse().unwrap(),
            )
        })
        .collect();
    let req = Request {
        method,
        scheme: "http",
        authority: "web",
        path,
        query: None,
        headers: &headers,
        connection: "-",
    };
    let d = reg.route_request(VIP.parse().unwrap(), None, &req)?;
    let host = match d.destination {
        Some(dest) => dest.host.clone(),
        None => "(local)".into(),
    };
    Ok((host, d.route.unwrap_or_default()))
}

/// Header operations as `set name=value`, `add name=value`, `remove name`.
fn ops(o: &crate::config::policy::HeaderOps) -> Vec<String> {
    let pairs = |verb: &str, l: &[(hyper::header::HeaderName, hyper::header::HeaderValue)]| {
        (l.iter())
            .map(|(n, v)| format!("{verb} {n}={}", v.to_str().unwrap()))
            .collect::<Vec<_>>()
    };
    let mut out = pairs("set", &o.set);
    out.extend(pairs("add", &o.add));
    out.extend(o.remove.iter().map(|n| format!("remove {n}")));
    out
}

fn host(reg: &Registry, path: &str) -> String {
    route(reg, "GET", path, &[])
        .map(|r| r.0)
        .unwrap_or_else(|e| format!("error {}", e.http_status()))
}

#[test]
fn precedence_orders_matches_across_routes_as_the_spec_says() {
    // The older route has the catch-all and a shorter prefix; the newer one's exact path and
    // longer prefix still win, and a method match beats a bare prefix of equal length.
    let yaml = http_route(
        "old",
        "default",
        "2024-01-01T00:00:00Z",
        "  - backendRefs: [{name: v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: v1, port: 80}]
",
    ) + &http_route(
        "new",
        "default",
        "2025-01-01T00:00:00Z",
        "  - matches: [{path: {type: Exact, value: /api/v2}}, {path: {type: PathPrefix, value: /api/v2/}}]
    backendRefs: [{name: v2, port: 80}]
  - matches: [{path: {value: /api}, method: POST}]
    backendRefs: [{name: api, namespace: prod, port: 80}]
  - matches: [{path: {value: /api}, headers: [{name: X-Canary, value: 'yes'}]}]
    backendRefs: [{name: v2, port: 80}]
",
    );
    let reg = registry(&yaml);
    assert_eq!(host(&reg, "/api/v2"), "v2.default.svc.cluster.local");
    assert_eq!(host(&reg, "/api/v2/x"), "v2.default.svc.cluster.local");
    // Segment prefix: /api/v2x is not under /api/v2.
    assert_eq!(host(&reg, "/api/v2x"), "v1.default.svc.cluster.local");
    assert_eq!(host(&reg, "/apix"), "v1.default.svc.cluster.local");
    // POST /api prefers the method match; its cross-namespace backend has no grant: 500.
    let post = route(&reg, "POST", "/api/x", &[]).unwrap_err();
    assert_eq!(post.http_status(), 500, "{post}");
    assert!(
        post.to_string()
            .contains("no ReferenceGrant in namespace prod"),
        "{post}"
    );
    // A header match (names case-insensitive) beats the bare prefix of the older route.
    let canary = route(&reg, "GET", "/api/x", &[("x-canary", "yes")]).unwrap();
    assert_eq!(canary.0, "v2.default.svc.cluster.local");
    assert_eq!(host(&reg, "/api/x"), "v1.default.svc.cluster.local");
    let (_, label) = route(&reg, "GET", "/api/v2", &[]).unwrap();
    assert_eq!(label, "HTTPRoute default/new rules[0]");
}

#[test]
fn a_reference_grant_opens_a_backend_in_another_namespace() {
    let route_yaml = http_route(
        "r",
        "default",
        "2024-01-01T00:00:00Z",
        "  - backendRefs: [{name: api, namespace: prod, port: 80}]\n",
    );
    let grant = |from_kind: &str, name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: g, namespace: prod}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: {from_kind}, namespace: default}}]
  to: [{{group: '', kind: Service, name: {name}}}]
"
        )
    };
    assert_eq!(host(&registry(&route_yaml), "/"), "error 500");
    let granted = registry(&(route_yaml.clone() + &grant("HTTPRoute", "api")));
    assert_eq!(host(&granted, "/"), "api.prod.svc.cluster.local");
    // A grant for another kind or another Service does not count.
    assert_eq!(
        host(
            &registry(&(route_yaml.clone() + &grant("GRPCRoute", "api"))),
            "/"
        ),
        "error 500"
    );
    assert_eq!(
        host(&registry(&(route_yaml + &grant("HTTPRoute", "other"))), "/"),
        "error 500"
    );
}

#[test]
fn zero_weights_no_backends_and_unknown_services_answer_500() {
    let reg = registry(&http_route(
        "r",
        "default",
        "",
        "  - matches: [{path: {value: /zero}}]
    backendRefs: [{name: v1, port: 80, weight: 0}]
  - matches: [{path: {value: /none}}]
  - matches: [{path: {value: /unknown}}]
    backendRefs: [{name: nope, port: 80}]
  - matches: [{path: {value: /split}}]
    backendRefs: [{name: v1, port: 80, weight: 0}, {name: v2, port: 80, weight: 5}]
  - matches: [{path: {value: /kind}}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: v1, port: 80}]
  - matches: [{path: {value: /explicit}}]
    backendRefs: [{group: '', kind: Service, name: v2, port: 80}]
",
    ));
    for p in ["/zero", "/none"] {
        let d = reg
            .route_request(VIP.parse().unwrap(), None, &req_get(p))
            .unwrap();
        assert!(
            matches!(d.http_route.and_then(|r| r.local.as_ref()), Some(crate::config::policy::LocalReply::Direct { status, .. }) if status.as_u16() == 500),
            "{p}"
        );
    }
    assert_eq!(host(&reg, "/unknown"), "error 500");
    // Another kind of backend (a multi-cluster ServiceImport): 500; an explicit core Service:
    // routed.
    assert_eq!(host(&reg, "/kind"), "error 500");
    assert_eq!(host(&reg, "/explicit"), "v2.default.svc.cluster.local");
    for _ in 0..50 {
        assert_eq!(host(&reg, "/split"), "v2.default.svc.cluster.local");
    }
    // No rule matches: 404, as Envoy's NR.
    assert_eq!(host(&reg, "/other"), "error 404");
}

fn req_get(path: &'static str) -> Request<'static> {
    static EMPTY: std::sync::LazyLock<hyper::HeaderMap> =
        std::sync::LazyLock::new(hyper::HeaderMap::new);
    Request {
        method: "GET",
        scheme: "http",
        authority: "web",
        path,
        query: None,
        headers: &EMPTY,
        connection: "-",
    }
}

#[test]
fn a_consumer_route_applies_to_its_namespace_only_and_wins_there() {
    let yaml = http_route(
        "producer",
        "default",
        "2024-01-01T00:00:00Z",
        "  - backendRefs: [{name: v1, port: 80}]\n",
    ) + &http_route(
        "consumer",
        "shop",
        "2025-01-01T00:00:00Z",
        "  - backendRefs: [{name: v2, namespace: default, port: 80}]\n",
    ) + "apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: '', kind: Service}]
";
    let in_shop = registry_for("shop", &yaml).unwrap();
    assert_eq!(host(&in_shop, "/"), "v2.default.svc.cluster.local");
    for ns in ["default", "other"] {
        let reg = registry_for(ns, &yaml).unwrap();
        assert_eq!(
            host(&reg, "/"),
            "v1.default.svc.cluster.local",
            "client in {ns}"
        );
    }
}

#[test]
fn with_a_virtual_service_on_the_same_host_the_older_applies() {
    let vs = |created: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default, creationTimestamp: '{created}'}}
spec:
  hosts: [web.default.svc.cluster.local]
  http: [{{route: [{{destination: {{host: api.prod.svc.cluster.local}}}}]}}]
---
"
        )
    };
    let route_yaml = http_route(
        "r",
        "default",
        "2024-06-01T00:00:00Z",
        "  - backendRefs: [{name: v1, port: 80}]\n",
    );
    let older_vs = registry(&(vs("2024-01-01T00:00:00Z") + &route_yaml));
    assert_eq!(host(&older_vs, "/"), "api.prod.svc.cluster.local");
    let newer_vs = registry(&(vs("2025-01-01T00:00:00Z") + &route_yaml));
    assert_eq!(host(&newer_vs, "/"), "v1.default.svc.cluster.local");
    assert!(
        newer_vs
            .warnings()
            .iter()
            .any(|w| w.message.contains("both route host")),
        "{:?}",
        newer_vs.warnings()
    );
}

#[test]
fn invalid_routes_are_rejected_with_located_fields() {
    let bad = http_route(
        "bad",
        "default",
        "",
        "  - matches: [{path: {type: Exact, value: /x}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}
    - type: RequestRedirect
      requestRedirect: {statusCode: 305}
    backendRefs: [{name: v1}]
",
    );
    let errors = registry_for("default", &bad).unwrap_err().join("\n");
    for needle in [
        "spec.rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
        "spec.rules[0].filters[1].requestRedirect.statusCode: 305 is not one of",
        "spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used together",
        "spec.rules[0].backendRefs[0].port: port is required for a Service backend",
    ] {
        assert!(errors.contains(needle), "missing {needle:?} in\n{errors}");
    }
    assert!(errors.contains("routes.yaml:"), "located: {errors}");
}

#[test]
fn grpc_methods_timeouts_retries_mirrors_backend_filters_and_tcp_routes() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: web, namespace: default}]
  rules:
  - matches: [{method: {service: pkg.Echo, method: Say}}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-set, value: one}], add: [{name: x-add, value: two}], remove: [x-gone]}
    backendRefs: [{group: '', kind: Service, name: v2, namespace: default, port: 80}]
  - matches: [{method: {service: pkg.Echo}, headers: [{name: x-env, value: canary}]}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {group: '', kind: Service, name: v1, port: 80}, fraction: {numerator: 1, denominator: 4}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: api, namespace: prod, port: 80}, percent: 50}}
    backendRefs:
    - name: v2
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: v2}], add: [{name: x-more, value: m}], remove: [x-secret]}
      - type: ResponseHeaderModifier
        responseHeaderModifier: {set: [{name: x-from, value: v2}], add: [{name: x-also, value: a}], remove: [server]}
  - matches: [{method: {type: RegularExpression, method: 'Get.*'}}]
    backendRefs: [{name: v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: h, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: v1}]
  rules:
  - timeouts: {request: 3s, backendRequest: 1s}
    retry: {attempts: 4, codes: [502, 503], backoff: 100ms}
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 80}, percent: 10}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 80}, fraction: {numerator: 1, denominator: 1000}}}
    backendRefs:
    - name: v1
      port: 80
      filters:
      - type: ResponseHeaderModifier
        responseHeaderModifier: {set: [{name: x-v1, value: 'yes'}], add: [{name: x-v1-add, value: a}], remove: [x-v1-gone]}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: t, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: v2, namespace: default, port: 80}]
  rules: [{backendRefs: [{group: '', kind: Service, name: v1, namespace: default, port: 80, weight: 1}]}]
";
    let reg = registry(yaml);
    let grpc = |path: &'static str, headers: &[(&'static str, &str)]| {
        route(&reg, "POST", path, headers).map(|r| r.0)
    };
    assert_eq!(
        grpc("/pkg.Echo/Say", &[]).unwrap(),
        "v2.default.svc.cluster.local"
    );
    // The service-only match needs its header; without it the regex rule or nothing applies.
    assert_eq!(
        grpc("/pkg.Echo/Other", &[("x-env", "canary")]).unwrap(),
        "v2.default.svc.cluster.local"
    );
    assert_eq!(grpc("/pkg.Echo/Other", &[]).unwrap_err().http_status(), 404);
    assert_eq!(
        grpc("/pkg.Other/GetThing", &[]).unwrap(),
        "v1.default.svc.cluster.local"
    );
    let mut headers = hyper::HeaderMap::new();
    headers.insert("x-env", "canary".parse().unwrap());
    let req = Request {
        method: "POST",
        scheme: "http",
        authority: "web",
        path: "/pkg.Echo/Other",
        query: None,
        headers: &headers,
        connection: "-",
    };
    let d = reg.route_request(VIP.parse().unwrap(), None, &req).unwrap();
    let r = d.http_route.unwrap();
    let mirrors: Vec<_> = (r.mirrors.iter())
        .map(|(d, p)| (d.host.as_str(), *p, d.invalid.is_some()))
        .collect();
    // The second mirror names another namespace without a grant: kept, marked unusable.
    assert_eq!(
        mirrors,
        [
            ("v1.default.svc.cluster.local", 25.0, false),
            ("api.prod.svc.cluster.local", 50.0, true)
        ]
    );
    let dest = d.destination.unwrap();
    assert_eq!(
        ops(&dest.headers.request),
        ["set x-backend=v2", "add x-more=m", "remove x-secret"]
    );
    assert_eq!(
        ops(&dest.headers.response),
        ["set x-from=v2", "add x-also=a", "remove server"]
    );
    let say = Request {
        path: "/pkg.Echo/Say",
        ..req
    };
    let say = reg.route_request(VIP.parse().unwrap(), None, &say).unwrap();
    assert_eq!(
        ops(&say.http_route.unwrap().headers.response),
        ["set x-set=one", "add x-add=two", "remove x-gone"]
    );
    // The HTTPRoute on v1 (no VIP: looked up through its entry).
    let entry = reg
        .virtual_service_for("v1.default.svc.cluster.local")
        .unwrap();
    let h = &entry.vs.http[0];
    assert_eq!(h.timeout, Some(std::time::Duration::from_secs(3)));
    let retries = h.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 4);
    assert_eq!(retries.retry_on.status_codes, [502, 503]);
    assert_eq!(
        retries.per_try_timeout,
        Some(std::time::Duration::from_secs(1))
    );
    assert_eq!(retries.backoff, Some(std::time::Duration::from_millis(100)));
    assert_eq!(
        (h.mirrors[0].0.host.as_str(), h.mirrors[0].1),
        ("v2.default.svc.cluster.local", 10.0)
    );
    assert_eq!(h.mirrors[1].1, 0.1);
    assert_eq!(
        ops(&h.destinations[0].headers.response),
        ["set x-v1=yes", "add x-v1-add=a", "remove x-v1-gone"]
    );
    // The TCPRoute on v2's port 80.
    let tcp = reg
        .virtual_service_for("v2.default.svc.cluster.local")
        .unwrap();
    assert_eq!(
        tcp.vs.tcp[0].destinations[0].host,
        "v1.default.svc.cluster.local"
    );
    assert_eq!(tcp.vs.tcp[0].matches[0].port, Some(80));
    assert_eq!(
        tcp.vs.tcp[0].label.as_deref(),
        Some("TCPRoute default/t rules[0]")
    );
}
