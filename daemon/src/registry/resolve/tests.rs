//! Precedence and merge rules, one table row per rule of §2–§3 of the semantics reference.

use super::*;
use crate::{
    config::{policy::Algorithm, source::ConfigSet},
    registry::Registry,
};

const SERVICES: &str = "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: b}
spec:
  hosts: [reviews.b.svc.cluster.local]
  addresses: [127.77.2.1]
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 198.18.1.2, labels: {version: v1}}
  - {address: 198.18.2.2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: ext}
spec:
  hosts: [api.v1.foo.com]
  addresses: [127.77.2.2]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 198.18.3.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: ext}
spec:
  hosts: ['*.bar.com']
  ports: [{number: 443, name: tls, protocol: TLS}]
";

fn registry(rules: &str, namespace: &str, labels: &[(&str, &str)]) -> Registry {
    let set = ConfigSet::parse_ok("t.yaml", &format!("{SERVICES}---\n{rules}"));
    let client = Client {
        namespace: namespace.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        workload: None,
        locality: String::new(),
    };
    match Registry::build(&set, &client) {
        Ok(r) => r,
        Err(r) => panic!("{:?}", r.errors),
    }
}

fn dr(ns: &str, name: &str, body: &str) -> String {
    let body: String = body.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
    )
}

/// Ids of the rules the client uses for `host`.
fn rule_ids(reg: &Registry, host: &str) -> Vec<String> {
    let (_, svc) = reg.service(host).unwrap();
    reg.rule_for(svc)
        .map(|r| r.sources.iter().map(|s| s.id.clone()).collect())
        .unwrap_or_default()
}

fn policy(reg: &Registry, port: u16, subset: Option<&str>) -> EffectivePolicy {
    let (s, _) = reg.service("reviews.b.svc.cluster.local").unwrap();
    reg.cluster(s, port, subset)
        .unwrap_or_else(|| panic!("no cluster {port} {subset:?}"))
        .policy
        .clone()
}

const REVIEWS: &str = "reviews.b.svc.cluster.local";

#[test]
fn subset_policy_replaces_whole_blocks_not_fields() {
    let reg = registry(
        &dr(
            "b",
            "r",
            "host: reviews\ntrafficPolicy:\n  connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}\n  tls: {mode: ISTIO_MUTUAL}\nsubsets:\n- name: v1\n  labels: {version: v1}\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1000}}}\n- name: v2\n  labels: {version: v2}\n  trafficPolicy: {loadBalancer: {simple: RANDOM}}",
        ),
        "b",
        &[],
    );
    let default = policy(&reg, 9080, None);
    let pool = default.connection_pool.value.unwrap();
    assert_eq!(
        (pool.max_connections, pool.http1_max_pending_requests),
        (1, 1)
    );

    // v1 sets only http2MaxRequests: the top-level tcp/pending limits are not inherited.
    let v1 = policy(&reg, 9080, Some("v1"));
    let pool = v1.connection_pool.value.clone().unwrap();
    assert_eq!(pool.max_connections, policy::UNLIMITED);
    assert_eq!(pool.http1_max_pending_requests, policy::UNLIMITED);
    assert_eq!(pool.http2_max_requests, 1000);
    assert_eq!(
        v1.connection_pool.from.unwrap().1,
        "spec.subsets[0].trafficPolicy.connectionPool"
    );
    // Blocks v1 does not set are inherited from the top level.
    assert_eq!(v1.tls.value.unwrap().mode, policy::TlsMode::IstioMutual);

    // v2 sets only the balancer and inherits the pool whole.
    let v2 = policy(&reg, 9080, Some("v2"));
    assert_eq!(v2.load_balancer.value.unwrap().algorithm, Algorithm::Random);
    assert_eq!(v2.connection_pool.value.unwrap().max_connections, 1);
    assert_eq!(
        v2.connection_pool.from.unwrap().1,
        "spec.trafficPolicy.connectionPool"
    );
}

#[test]
fn port_level_settings_replace_and_do_not_inherit() {
    let reg = registry(
        &dr(
            "b",
            "r",
            "host: reviews\ntrafficPolicy:\n  tls: {mode: ISTIO_MUTUAL}\n  proxyProtocol: {version: V2}\n  portLevelSettings:\n  - port: {number: 8080}\n    loadBalancer: {simple: RANDOM}\nsubsets:\n- name: v1\n  labels: {version: v1}\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 7}}\n    portLevelSettings:\n    - port: {number: 9080}\n      loadBalancer: {simple: ROUND_ROBIN}",
        ),
        "b",
        &[],
    );
    // Port 9080 has no port-level entry: top-level TLS and PROXY protocol apply.
    let p9080 = policy(&reg, 9080, None);
    assert_eq!(p9080.tls.value.unwrap().mode, policy::TlsMode::IstioMutual);
    assert_eq!(
        p9080.proxy_protocol.value,
        Some(policy::ProxyProtocolVersion::V2)
    );
    // Port 8080's entry only sets the balancer: TLS becomes unset (auto mTLS), and the
    // top-level-only proxyProtocol is dropped.
    let p8080 = policy(&reg, 8080, None);
    assert_eq!(
        p8080.load_balancer.value.unwrap().algorithm,
        Algorithm::Random
    );
    assert!(p8080.tls.value.is_none());
    assert_eq!(
        p8080.tls.from.unwrap().1,
        "spec.trafficPolicy.portLevelSettings[0].tls"
    );
    assert!(p8080.proxy_protocol.value.is_none());

    // A subset port-level entry replaces all four blocks: the subset's own pool and the
    // top-level TLS are gone on that port, kept on the other.
    let v1_9080 = policy(&reg, 9080, Some("v1"));
    assert_eq!(
        v1_9080.load_balancer.value.unwrap().algorithm,
        Algorithm::RoundRobin
    );
    assert!(v1_9080.connection_pool.value.is_none());
    assert!(v1_9080.tls.value.is_none());
    let v1_8080 = policy(&reg, 8080, Some("v1"));
    assert_eq!(v1_8080.connection_pool.value.unwrap().max_connections, 7);
    assert_eq!(
        v1_8080.load_balancer.value.unwrap().algorithm,
        Algorithm::Random
    );
}

#[test]
fn host_matching_table() {
    let cases: &[(&str, &str, Option<usize>)] = &[
        (
            "reviews.b.svc.cluster.local",
            "reviews.b.svc.cluster.local",
            Some(usize::MAX),
        ),
        ("*.foo.com", "api.v1.foo.com", Some(8)),
        ("*.v1.foo.com", "api.v1.foo.com", Some(11)),
        ("*.foo.com", "foo.com", None),
        ("*", "anything.example", Some(0)),
        ("reviews.b", "reviews.b.svc.cluster.local", None),
        ("*.bar.com", "*.bar.com", Some(usize::MAX)),
        ("*.com", "*.bar.com", Some(4)),
        ("api.bar.com", "*.bar.com", None),
        ("*.x.bar.com", "*.bar.com", None),
    ];
    for (rule, host, want) in cases {
        assert_eq!(host_match(rule, host), *want, "{rule} vs {host}");
    }
}

#[test]
fn most_specific_host_wins_and_short_names_use_the_rule_namespace() {
    let rules = dr("ext", "wild", "host: '*.foo.com'\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}")
        + &dr("ext", "exact", "host: api.v1.foo.com\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}")
        // Short name in namespace a: reviews.a.svc.cluster.local, not the service in b.
        + &dr("a", "short", "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}")
        // A dotted name is never expanded.
        + &dr("b", "dotted", "host: reviews.b\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}");
    let reg = registry(&rules, "ext", &[]);
    assert_eq!(rule_ids(&reg, "api.v1.foo.com"), ["ext/exact"]);
    let reg = registry(&rules, "a", &[]);
    assert!(rule_ids(&reg, REVIEWS).is_empty());
    // Without the exact rule, the wildcard applies.
    let reg = registry(
        &dr(
            "ext",
            "wild",
            "host: '*.foo.com'\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
        ),
        "ext",
        &[],
    );
    assert_eq!(rule_ids(&reg, "api.v1.foo.com"), ["ext/wild"]);
}

#[test]
fn namespace_lookup_order_has_no_cross_namespace_merge() {
    let rules = dr(
        "a",
        "client-side",
        "host: reviews.b.svc.cluster.local\nexportTo: [.]\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
    ) + &dr(
        "b",
        "owner",
        "host: reviews\nsubsets: [{name: v1, labels: {version: v1}}]\ntrafficPolicy: {outlierDetection: {}}",
    ) + &dr(
        ROOT_NAMESPACE,
        "mesh",
        "host: '*'\ntrafficPolicy: {tls: {mode: ISTIO_MUTUAL}}",
    );
    // Client in a: its own rule wins wholesale; the owner's subsets are not visible.
    let reg = registry(&rules, "a", &[]);
    assert_eq!(rule_ids(&reg, REVIEWS), ["a/client-side"]);
    let (s, _) = reg.service(REVIEWS).unwrap();
    assert!(reg.cluster(s, 9080, Some("v1")).is_none());
    assert!(policy(&reg, 9080, None).outlier_detection.value.is_none());
    // Client elsewhere: the service namespace's rule.
    let reg = registry(&rules, "c", &[]);
    assert_eq!(rule_ids(&reg, REVIEWS), ["b/owner"]);
    assert!(reg.cluster(s, 9080, Some("v1")).is_some());
    // The root namespace applies when nothing nearer matches.
    assert_eq!(rule_ids(&reg, "api.v1.foo.com"), ["istio-system/mesh"]);
}

#[test]
fn export_to_hides_rules_from_other_namespaces() {
    let rules = dr(
        "b",
        "private",
        "host: reviews\nexportTo: [.]\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
    ) + &dr(
        "b",
        "listed",
        "host: reviews\nexportTo: [c]\nsubsets: [{name: v1, labels: {version: v1}}]",
    );
    assert_eq!(
        rule_ids(&registry(&rules, "b", &[]), REVIEWS),
        ["b/private"]
    );
    assert_eq!(rule_ids(&registry(&rules, "c", &[]), REVIEWS), ["b/listed"]);
    assert!(rule_ids(&registry(&rules, "d", &[]), REVIEWS).is_empty());
}

#[test]
fn same_namespace_rules_merge_oldest_first() {
    let rules = dr(
        "b",
        "y-newer",
        "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}\nsubsets: [{name: v1, labels: {version: v2}}, {name: v2, labels: {version: v2}}]",
    )
    .replace(
        "namespace: b}",
        "namespace: b, creationTimestamp: '2026-02-01T00:00:00Z'}",
    ) + &dr(
        "b",
        "x-older",
        "host: reviews\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}\nsubsets: [{name: v1, labels: {version: v1}}]",
    )
    .replace(
        "namespace: b}",
        "namespace: b, creationTimestamp: '2026-01-01T00:00:00Z'}",
    );
    let reg = registry(&rules, "b", &[]);
    assert_eq!(rule_ids(&reg, REVIEWS), ["b/x-older", "b/y-newer"]);
    // The older rule's top-level policy wins wholesale.
    assert_eq!(
        policy(&reg, 9080, None)
            .load_balancer
            .value
            .unwrap()
            .algorithm,
        Algorithm::RoundRobin
    );
    // v1 comes from the older rule (its labels), v2 from the newer.
    let (s, svc) = reg.service(REVIEWS).unwrap();
    let v1 = reg.cluster(s, 9080, Some("v1")).unwrap();
    assert_eq!(v1.members.len(), 1);
    assert_eq!(
        svc.endpoints[v1.members[0].endpoint].labels["version"],
        "v1"
    );
    assert!(reg.cluster(s, 9080, Some("v2")).is_some());
}

#[test]
fn workload_selector_rules() {
    let rules = dr(
        "b",
        "general",
        "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
    ) + &dr(
        "b",
        "for-ratings",
        "host: reviews\nworkloadSelector: {matchLabels: {app: ratings}}\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}",
    );
    // Selected workload: the selector rule takes precedence.
    let reg = registry(&rules, "b", &[("app", "ratings"), ("version", "v1")]);
    assert_eq!(rule_ids(&reg, REVIEWS), ["b/for-ratings"]);
    // Not selected: the selector-less rule.
    let reg = registry(&rules, "b", &[("app", "other")]);
    assert_eq!(rule_ids(&reg, REVIEWS), ["b/general"]);
    // Selector rules never apply outside their namespace.
    let reg = registry(&rules, "c", &[("app", "ratings")]);
    assert_eq!(rule_ids(&reg, REVIEWS), ["b/general"]);
    // Istio's edge case: the client namespace holds only a non-matching selector rule for the
    // host, so that namespace "wins" the lookup and the client gets no rule at all.
    let rules = dr(
        "a",
        "only-selector",
        "host: reviews.b.svc.cluster.local\nworkloadSelector: {matchLabels: {app: x}}\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}",
    ) + &dr(
        "b",
        "owner",
        "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
    );
    let reg = registry(&rules, "a", &[("app", "y")]);
    assert!(rule_ids(&reg, REVIEWS).is_empty());
}

#[test]
fn unknown_subsets_are_not_clusters() {
    let reg = registry(
        &dr(
            "b",
            "r",
            "host: reviews\nsubsets: [{name: v1, labels: {version: v1}}]",
        ),
        "b",
        &[],
    );
    let rule = reg.rule_for(reg.service(REVIEWS).unwrap().1);
    let err = effective(rule.as_ref(), REVIEWS, 9080, Some("v9")).unwrap_err();
    assert_eq!(err.subset, "v9");
    assert!(
        err.to_string()
            .contains("not defined by any DestinationRule")
    );
}

#[test]
fn reload_keeps_live_state_of_unchanged_clusters_only() {
    let od = "host: reviews.b.svc.cluster.local\ntrafficPolicy:\n  outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}\n";
    let old = registry(&dr("b", "r", od), "b", &[]);
    let key = |r: &Registry| {
        let (s, _) = r.service("reviews.b.svc.cluster.local").unwrap();
        let c = r.cluster(s, 9080, None).unwrap();
        (
            c.outlier.clone().unwrap(),
            c.limits.clone(),
            c.balancer.clone(),
        )
    };
    let (od_old, limits_old, lb_old) = key(&old);
    od_old.observe(0, crate::outlier::Outcome::Http(500));
    // An unrelated change (another rule for another host): the cluster keeps its detector,
    // breakers and balancer, so the ejection survives.
    let mut same = registry(
        &(dr("b", "r", od)
            + &dr(
                "ext",
                "api",
                "host: api.v1.foo.com\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}",
            )),
        "b",
        &[],
    );
    same.inherit(&old);
    let (od_same, limits_same, lb_same) = key(&same);
    assert!(Arc::ptr_eq(&od_old, &od_same) && Arc::ptr_eq(&limits_old, &limits_same));
    assert!(Arc::ptr_eq(&lb_old, &lb_same));
    assert!(od_same.health(0).ejected);
    // A changed outlierDetection starts a fresh detector, as Envoy rebuilds the cluster.
    let mut changed = registry(
        &dr(
            "b",
            "r",
            &od.replace("consecutive5xxErrors: 1", "consecutive5xxErrors: 2"),
        ),
        "b",
        &[],
    );
    changed.inherit(&old);
    let (od_new, _, _) = key(&changed);
    assert!(!Arc::ptr_eq(&od_old, &od_new));
    assert!(!od_new.health(0).ejected);
}
