//! The configuration CLI on real files: `drover validate` over every seed document and over bad
//! input, `drover explain` on the walkthrough's rules. No privileges needed.

use std::{path::PathBuf, process::Command};

use drover_tests::bin;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn drover(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("drover"))
        .args(args)
        .env("RUST_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run drover");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_seed_document_validates() {
    let dir = fixtures().join("seeds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "services.yaml")
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{files:?}");
    for f in &files {
        let (code, _, err) = drover(&[
            "validate",
            "fixtures/seeds/services.yaml",
            f.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{}: {err}", f.display());
        assert!(err.contains("ok: 4 services"), "{err}");
    }
    // The walkthrough's outlier rule uses the spelling Istio ignores since 1.7: say so.
    let (_, _, err) = drover(&[
        "validate",
        "fixtures/seeds/services.yaml",
        "fixtures/seeds/walkthrough-outlier.yaml",
    ]);
    assert!(
        err.contains("warning: fixtures/seeds/walkthrough-outlier.yaml:10:7: spec.trafficPolicy.outlierDetection.consecutiveErrors: consecutiveErrors is deprecated and ignored"),
        "{err}"
    );
}

#[test]
fn bad_input_lists_every_located_error() {
    let (code, _, err) = drover(&[
        "validate",
        "fixtures/seeds/services.yaml",
        "fixtures/invalid/bad-rules.yaml",
    ]);
    assert_eq!(code, 1, "{err}");
    let f = "fixtures/invalid/bad-rules.yaml";
    for expected in [
        format!(
            "error: {f}:11:9: spec.trafficPolicy.connectionPool.tcp.maxConnections: invalid type: string \"many\", expected i64"
        ),
        format!("error: {f}:17:3: spec.host: host is required"),
        format!(
            "error: {f}:21:9: spec.trafficPolicy.connectionPool.tcp.connectTimeout: duration \"-5s\" must not be negative"
        ),
        format!(
            "error: {f}:23:9: spec.trafficPolicy.connectionPool.http.idleTimeout: \"10 minutes\" is not a duration"
        ),
        format!(
            "error: {f}:25:7: spec.trafficPolicy.outlierDetection.maxEjectionPercent: percentage 150 must be between 0 and 100"
        ),
        format!(
            "error: {f}:27:7: spec.trafficPolicy.loadBalancer.consistentHash: consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (found 0)"
        ),
        format!(
            "error: {f}:28:5: spec.trafficPolicy.tls.clientCertificate: MUTUAL requires clientCertificate"
        ),
        format!("error: {f}:28:5: spec.trafficPolicy.tls.privateKey: MUTUAL requires privateKey"),
        format!("error: {f}:33:5: spec.subsets[1].name: duplicate subset name \"v1\""),
        format!(
            "error: {f}:43:7: spec.trafficPolicy.loadBalancer.consistentHash: consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (found 2)"
        ),
        format!(
            "error: {f}:53:5: spec.http[0].route: weights of a multi-destination route must not all be 0"
        ),
    ] {
        assert!(
            err.contains(&expected),
            "missing {expected}\n--- got:\n{err}"
        );
    }
    assert!(err.contains("11 errors"), "{err}");
}

#[test]
fn gateway_api_routes_are_explained_per_request_and_bad_ones_located() {
    let explain = |path: &str| {
        let (code, out, err) = drover(&[
            "explain",
            "--config",
            "fixtures/gateway.yaml",
            "--host",
            "reviews.demo.svc.cluster.local",
            "--path",
            path,
            "--client-namespace",
            "demo",
        ]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let out = explain("/v2/ratings");
    for expected in [
        "routes     HTTPRoute demo/reviews (producer Gateway API routes, ordered by the spec's precedence)",
        "  HTTPRoute demo/reviews rules[1] (with match) → reviews-v1.demo.svc.cluster.local port 9080 weight 90; reviews-v2.demo.svc.cluster.local port 9080 weight 10",
        "request    GET /v2/ratings → HTTPRoute demo/reviews rules[0] (matched path segment prefix /v2, port 9080) → cluster outbound|9080||reviews-v2.demo.svc.cluster.local",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?}\n--- got:\n{out}"
        );
    }
    // Not a segment of /v2: the catch-all rule.
    let out = explain("/v2x");
    assert!(out.contains("request    GET /v2x → HTTPRoute demo/reviews rules[1] (matched path segment prefix /, port 9080)"), "{out}");

    let (code, _, err) = drover(&[
        "validate",
        "fixtures/gateway.yaml",
        "fixtures/invalid/bad-routes.yaml",
    ]);
    assert_eq!(code, 1, "{err}");
    let f = "fixtures/invalid/bad-routes.yaml";
    for expected in [
        format!(
            "error: {f}:11:20: spec.rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match"
        ),
        format!(
            "error: {f}:13:23: spec.rules[1].matches[0].path.type: \"Prefix\" is not Exact, PathPrefix or RegularExpression"
        ),
        format!(
            "error: {f}:14:20: spec.rules[1].backendRefs[0].port: port is required for a Service backend"
        ),
        format!(
            "error: {f}:17:25: spec.rules[2].filters[0].requestRedirect.statusCode: 305 is not one of 301, 302, 303, 307, 308"
        ),
        format!(
            "error: {f}:19:1: apiVersion: unsupported version \"v1alpha2\" of HTTPRoute (expected gateway.networking.k8s.io/v1 or v1beta1)"
        ),
    ] {
        assert!(
            err.contains(&expected),
            "missing {expected}\n--- got:\n{err}"
        );
    }
}

#[test]
fn undefined_subset_is_a_warning_not_an_error() {
    let dir = std::env::temp_dir().join(format!("drover-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vs = dir.join("vs.yaml");
    std::fs::write(
        &vs,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r, namespace: demo}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v9}\n",
    )
    .unwrap();
    let (code, _, err) = drover(&[
        "validate",
        "fixtures/seeds/services.yaml",
        "fixtures/seeds/walkthrough-subsets.yaml",
        vs.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(":8:36: spec.http[0].route[0].destination.subset: subset \"v9\" of reviews.demo.svc.cluster.local is not defined by any DestinationRule; requests routed here get 503 (NC)"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn explain_lists_a_workloads_authorization_policies_and_the_rule_that_decides() {
    let explain = |extra: &[&str]| {
        let mut args = vec![
            "explain",
            "--config",
            "fixtures/authorization.yaml",
            "--client-namespace",
            "demo",
            "--client-label",
            "app=reviews",
        ];
        args.extend(extra);
        let (code, out, err) = drover(&args);
        assert_eq!(code, 0, "{err}");
        out
    };
    let out = explain(&[]);
    for expected in [
        "policies   3 apply to this workload",
        "DENY   istio-system/deny-legacy",
        "mesh-wide; 1 rule(s)",
        "ALLOW  demo/reviews",
        "selector app=reviews; 2 rule(s)",
        "AUDIT  demo/audit-writes",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?}\n--- got:\n{out}"
        );
    }
    let out = explain(&[
        "--from",
        "demo/productpage",
        "--port",
        "9080",
        "--method",
        "POST",
        "--path",
        "/api/x",
    ]);
    assert!(out.contains("decision   ALLOW\nbecause    allowed by ALLOW policy demo/reviews rule 0\nrule       rules[0].from[0].source.principals"), "{out}");
    assert!(
        out.contains("audit      AUDIT policy demo/audit-writes matched"),
        "{out}"
    );
    let out = explain(&[
        "--from",
        "demo/ratings",
        "--port",
        "9080",
        "--method",
        "POST",
        "--path",
        "/api/x",
    ]);
    assert!(
        out.contains("decision   DENY\nbecause    denied: ALLOW policies apply and none matched"),
        "{out}"
    );
    let out = explain(&[
        "--from",
        "demo/ratings",
        "--port",
        "9080",
        "--method",
        "GET",
        "--path",
        "/api/./x",
    ]);
    assert!(
        out.contains("because    allowed by ALLOW policy demo/reviews rule 1"),
        "{out}"
    );
    let out = explain(&[
        "--from",
        "legacy/app",
        "--port",
        "9080",
        "--method",
        "GET",
        "--path",
        "/api/x",
    ]);
    assert!(out.contains("because    denied by DENY policy istio-system/deny-legacy rule 0\nrule       rules[0].from[0].source.namespaces"), "{out}");
    // A TCP connection: the HTTP rule cannot allow it.
    let out = explain(&["--from", "demo/ratings", "--port", "9080"]);
    assert!(
        out.contains("a TCP connection") && out.contains("decision   DENY"),
        "{out}"
    );
    // Another workload of the namespace: only the mesh-wide DENY.
    let (code, out, _) = drover(&[
        "explain",
        "--config",
        "fixtures/authorization.yaml",
        "--client-namespace",
        "demo",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("policies   1 apply"), "{out}");
}

#[test]
fn explain_names_the_source_of_every_value() {
    let (code, out, err) = drover(&[
        "explain",
        "--config",
        "fixtures/seeds/services.yaml",
        "--config",
        "fixtures/seeds/walkthrough-scenario1.yaml",
        "--host",
        "reviews.demo.svc.cluster.local",
        "--subset",
        "v2",
        "--client-namespace",
        "demo",
    ]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "cluster    outbound|9080|v2|reviews.demo.svc.cluster.local",
        "rule       DestinationRule demo/reviews-destination (fixtures/seeds/walkthrough-scenario1.yaml:37:1)",
        "subset     v2 selects {version=v2} (demo/reviews-destination spec.subsets[1])",
        "balancer   LEAST_REQUEST (Istio default)",
        "endpoints  1\n  reviews-v2 198.18.2.2:9080",
        "routes     VirtualService demo/reviews-traffic-split",
        "retries 2 on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes [503]",
        "loadBalancer  not configured: LEAST_REQUEST",
        "outlierDetection  not configured: no outlier detection",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?}\n--- got:\n{out}"
        );
    }

    let (code, out, err) = drover(&[
        "explain",
        "--config",
        "fixtures/seeds/services.yaml",
        "--config",
        "fixtures/seeds/walkthrough-scenario3.yaml",
        "--host",
        "reviews.demo.svc.cluster.local",
    ]);
    assert_eq!(code, 0, "{err}");
    let line = |field: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in\n{out}"))
            .to_string()
    };
    assert!(
        line("tcp.maxConnections").contains("1")
            && line("tcp.maxConnections")
                .ends_with("set at fixtures/seeds/walkthrough-scenario3.yaml:11:9"),
        "{out}"
    );
    assert!(
        line("tcp.connectTimeout").contains("10s")
            && line("tcp.connectTimeout").ends_with("default")
    );
    assert!(line("http.http2MaxRequests").contains("4294967295 (unlimited)"));

    // A subset no rule defines is refused by explain as it would be at request time.
    let (code, _, err) = drover(&[
        "explain",
        "--config",
        "fixtures/seeds/services.yaml",
        "--host",
        "reviews.demo.svc.cluster.local",
        "--subset",
        "v9",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("subset \"v9\" is not defined"), "{err}");
}

#[test]
fn explain_lists_each_routes_actions_and_each_endpoints_locality() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  addresses: [127.77.0.10]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 198.18.1.2, locality: r1/z1}
  - {address: 198.18.2.2, locality: r2/z1, labels: {security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews.demo.svc.cluster.local
  trafficPolicy: {outlierDetection: {}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, redirectCode: 302}
  - route: [{destination: {host: reviews.demo.svc.cluster.local}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 5}}}
    mirror: {host: reviews.demo.svc.cluster.local}
    rewrite: {uri: /v2/}
";
    let cfg = drover_tests::write_config(yaml);
    let (code, out, err) = drover(&[
        "explain",
        "--config",
        &cfg.display().to_string(),
        "--host",
        "reviews.demo.svc.cluster.local",
        "--client-locality",
        "r1/z1",
    ]);
    assert_eq!(code, 0, "{err}");
    for expected in [
        "client     namespace default labels {} locality r1/z1",
        "locality   2 failover priorities by region/zone/subzone",
        "198.18.1.2:9080 {} locality r1/z1 [priority 0]",
        "locality r2/z1 [priority 1] [auto mTLS]",
        "http[0] (with match) → (answered by the proxy)",
        "    redirect 302 uri /new",
        "    rewrite uri /v2/",
        "    fault abort HTTP 503 for 5% (FI)",
        "    mirror reviews.demo.svc.cluster.local for 100%",
    ] {
        assert!(
            out.contains(expected),
            "missing {expected:?}\n--- got:\n{out}"
        );
    }
}
