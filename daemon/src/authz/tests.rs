use super::*;
use crate::config::{source::ConfigSet, validate::Validated};

/// The policies of `yaml` (every one valid), in file order.
fn entries(yaml: &str) -> Vec<Arc<PolicyEntry>> {
    let set = ConfigSet::parse_ok("p.yaml", yaml);
    (set.authorization_policies.iter())
        .map(|r| {
            let v = Validated::<AuthorizationPolicy>::try_from(r)
                .unwrap_or_else(|e| panic!("{:?}", e.errors));
            Arc::new(PolicyEntry {
                policy: v.value,
                id: r.id().into(),
                namespace: r.namespace().to_string(),
            })
        })
        .collect()
}

fn authorizer(yaml: &str, ns: &str, labels: &[(&str, &str)]) -> Authorizer {
    let labels = (labels.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Authorizer::for_workload(&entries(yaml), ns, &labels, |h| {
        h == "web.shop.svc.cluster.local"
    })
}

fn tcp<'a>(principal: Option<&'a str>, source: &str, port: u16) -> Attributes<'a> {
    Attributes {
        principal,
        source: source.parse().unwrap(),
        remote: source.parse().unwrap(),
        destination: SocketAddr::new("198.18.0.2".parse().unwrap(), port),
        sni: None,
        http: None,
    }
}

fn request<'a>(
    base: &Attributes<'a>,
    method: &'a str,
    path: &'a str,
    headers: &'a hyper::HeaderMap,
) -> Attributes<'a> {
    Attributes {
        http: Some(Http {
            host: "web.shop.svc.cluster.local:8080",
            method,
            path,
            headers,
        }),
        ..base.clone()
    }
}

const FRONT: Option<&str> = Some("cluster.local/ns/shop/sa/front");
const OTHER: Option<&str> = Some("cluster.local/ns/shop/sa/other");
const EVIL: Option<&str> = Some("cluster.local/ns/evil/sa/front");

#[test]
fn allow_by_principal_admits_only_that_peer_and_no_plaintext() {
    let a = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: front-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/front]}}]
",
        "shop",
        &[("app", "web")],
    );
    let ok = a.check(&tcp(FRONT, "198.18.0.1", 80));
    assert!(ok.allowed);
    assert_eq!(ok.policy, Some(("shop/front-only".into(), 0)));
    assert!(!a.check(&tcp(OTHER, "198.18.0.1", 80)).allowed);
    assert!(!a.check(&tcp(None, "198.18.0.1", 80)).allowed);
    // Another workload of the namespace is not selected.
    let b = authorizer("", "shop", &[("app", "db")]);
    assert!(b.is_empty());
}

#[test]
fn deny_wins_over_allow_and_an_allow_without_rules_denies_all() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-evil, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [evil]}}]
";
    let a = authorizer(yaml, "shop", &[]);
    assert!(a.check(&tcp(FRONT, "198.18.0.1", 80)).allowed);
    let d = a.check(&tcp(EVIL, "198.18.0.1", 80));
    assert!(!d.allowed);
    assert_eq!(d.policy, Some(("istio-system/no-evil".into(), 0)));
    assert_eq!(
        d.reason(),
        "denied by DENY policy istio-system/no-evil rule 0"
    );
    let nothing = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}
",
        "shop",
        &[],
    );
    let d = nothing.check(&tcp(FRONT, "198.18.0.1", 80));
    assert!(!d.allowed && d.policy.is_none(), "{d:?}");
}

#[test]
fn ports_ip_blocks_and_when_conditions() {
    let a = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
  - to: [{operation: {ports: ['80']}}]
    from: [{source: {ipBlocks: [198.18.0.0/24], notIpBlocks: [198.18.0.9]}}]
  - to: [{operation: {notPorts: ['80', '9090']}}]
    when:
    - {key: source.principal, values: ['*/sa/front']}
    - {key: destination.port, notValues: ['7000']}
",
        "shop",
        &[],
    );
    assert!(a.check(&tcp(None, "198.18.0.1", 80)).allowed);
    assert!(!a.check(&tcp(None, "198.18.0.9", 80)).allowed);
    assert!(!a.check(&tcp(None, "198.18.1.1", 80)).allowed);
    // Rule 1: any port but 80 and 9090, from an account named front, not to 7000.
    let d = a.check(&tcp(FRONT, "198.18.1.1", 8080));
    assert_eq!(d.policy, Some(("shop/p".into(), 1)));
    assert!(!a.check(&tcp(FRONT, "198.18.1.1", 9090)).allowed);
    assert!(!a.check(&tcp(FRONT, "198.18.1.1", 7000)).allowed);
    assert!(!a.check(&tcp(OTHER, "198.18.1.1", 8080)).allowed);
}

#[test]
fn http_rules_match_method_path_host_and_headers() {
    let a = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api, namespace: shop}
spec:
  rules:
  - to: [{operation: {methods: [GET], paths: [/api/*], hosts: [web.shop.svc.cluster.local]}}]
  - to: [{operation: {paths: ['/items/{*}/price', '/files/{**}']}}]
    when: [{key: 'request.headers[x-team]', values: [blue]}]
",
        "shop",
        &[],
    );
    let h = hyper::HeaderMap::new();
    let base = tcp(FRONT, "198.18.0.1", 8080);
    assert!(a.check(&request(&base, "GET", "/api/x", &h)).allowed);
    assert!(!a.check(&request(&base, "POST", "/api/x", &h)).allowed);
    assert!(!a.check(&request(&base, "GET", "/admin", &h)).allowed);
    let mut blue = hyper::HeaderMap::new();
    blue.insert("x-team", "blue".parse().unwrap());
    assert!(
        a.check(&request(&base, "PUT", "/items/7/price", &blue))
            .allowed
    );
    assert!(
        !a.check(&request(&base, "PUT", "/items/7/price", &h))
            .allowed
    );
    assert!(
        !a.check(&request(&base, "PUT", "/items/7/8/price", &blue))
            .allowed
    );
    assert!(
        a.check(&request(&base, "PUT", "/files/a/b/c", &blue))
            .allowed
    );
    // TCP: ALLOW rules with HTTP fields cannot match.
    assert!(a.reads_http());
    assert!(!a.check(&base).allowed);
}

#[test]
fn on_tcp_a_deny_rule_drops_its_http_fields_and_matches_more() {
    let a = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-post, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: [POST]}}]
",
        "shop",
        &[],
    );
    let base = tcp(FRONT, "198.18.0.1", 8080);
    let h = hyper::HeaderMap::new();
    assert!(a.check(&request(&base, "GET", "/", &h)).allowed);
    assert!(!a.check(&request(&base, "POST", "/", &h)).allowed);
    assert!(
        !a.check(&base).allowed,
        "TCP: the rule matches without its methods"
    );
}

#[test]
fn audit_reports_and_decides_nothing() {
    let a = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch, namespace: shop}
spec:
  action: AUDIT
  rules: [{from: [{source: {notNamespaces: [shop]}}]}]
",
        "shop",
        &[],
    );
    let d = a.check(&tcp(EVIL, "198.18.0.1", 80));
    assert!(d.allowed);
    assert_eq!(d.audited, vec![Arc::<str>::from("shop/watch")]);
    assert!(a.check(&tcp(FRONT, "198.18.0.1", 80)).audited.is_empty());
}

#[test]
fn target_refs_apply_to_the_services_endpoints_only() {
    let yaml = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: web}]
  action: DENY
  rules: [{from: [{source: {serviceAccounts: [shop/other]}}]}]
";
    let e = entries(yaml);
    let web = Authorizer::for_workload(&e, "shop", &BTreeMap::new(), |h| {
        h == "web.shop.svc.cluster.local"
    });
    assert!(!web.check(&tcp(OTHER, "198.18.0.1", 80)).allowed);
    assert!(web.check(&tcp(FRONT, "198.18.0.1", 80)).allowed);
    let db = Authorizer::for_workload(&e, "shop", &BTreeMap::new(), |_| false);
    assert!(db.is_empty());
    // The deprecated single `targetRef` reads the same.
    let single = entries(&yaml.replace(
        "targetRefs: [{kind: Service, group: '', name: web}]",
        "targetRef: {kind: Service, group: '', name: web}",
    ));
    assert_eq!(single[0].policy.targets, ["web.shop.svc.cluster.local"]);
}

#[test]
fn path_normalization_options() {
    use PathNormalization::*;
    assert_eq!(Base.apply("/a/./b/../c"), "/a/c");
    assert_eq!(Base.apply("/a/%7Eb/%2fc"), "/a/~b/%2Fc");
    assert_eq!(Base.apply("/a//b"), "/a//b");
    assert_eq!(MergeSlashes.apply("/a//b/"), "/a/b/");
    assert_eq!(DecodeAndMergeSlashes.apply("/a%2F%2Fb\\c"), "/a/b/c");
    assert_eq!(None.apply("/a/../b"), "/a/../b");
    assert_eq!(Base.apply("/api/.."), "/");
    assert_eq!(Base.apply("/api/x/."), "/api/x/");
}

#[test]
fn principals_match_istio_wildcards() {
    let p = |v: &str| crate::config::policy::AuthzValue::Exact(v.into());
    let front = tcp(FRONT, "198.18.0.1", 80);
    let a = Ctx::new(&front);
    let plaintext = tcp(None, "198.18.0.1", 80);
    assert!(value_matches(
        &Attr::Principal,
        &p("cluster.local/ns/shop/sa/front"),
        &a
    ));
    assert!(value_matches(&Attr::Namespace, &p("shop"), &a));
    assert!(value_matches(&Attr::ServiceAccount, &p("shop/front"), &a));
    assert!(value_matches(
        &Attr::Principal,
        &AuthzValue::Suffix("/sa/front".into()),
        &a
    ));
    assert!(value_matches(
        &Attr::Principal,
        &AuthzValue::Prefix("cluster.local/".into()),
        &a
    ));
    assert!(!value_matches(
        &Attr::Principal,
        &AuthzValue::Present,
        &Ctx::new(&plaintext)
    ));
}

#[test]
fn negated_forms_remote_addresses_sni_and_service_accounts_decide() {
    let a = authorizer(
        "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: shop}
spec:
  rules:
  - from:
    - source: {notPrincipals: ['*/sa/other'], notNamespaces: [evil], remoteIpBlocks: [198.18.0.0/24], notRemoteIpBlocks: [198.18.0.7]}
    when:
    - {key: connection.sni, values: ['*.shop.svc']}
    - {key: destination.ip, values: [198.18.0.2]}
    - {key: source.namespace, values: [shop]}
  - from: [{source: {serviceAccounts: [shop/other], notServiceAccounts: [shop/front]}}]
    to: [{operation: {ports: ['9']}}]
    when: [{key: remote.ip, notValues: [198.18.0.0/24]}, {key: source.serviceAccount, values: [shop/other]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ['8080'], notHosts: ['web.shop.svc.cluster.local'], notMethods: [GET], notPaths: ['/ok']}}]
",
        "shop",
        &[],
    );
    let sni = |mut a: Attributes<'static>, s: &'static str, remote: &str| {
        a.sni = Some(s);
        a.remote = remote.parse().unwrap();
        a
    };
    let front = sni(tcp(FRONT, "198.18.0.1", 80), "web.shop.svc", "198.18.0.1");
    assert_eq!(a.check(&front).policy, Some(("shop/l4".into(), 0)));
    // Each negated or added condition alone turns rule 0 off.
    assert!(
        !a.check(&sni(
            tcp(OTHER, "198.18.0.1", 80),
            "web.shop.svc",
            "198.18.0.1"
        ))
        .allowed
    );
    assert!(
        !a.check(&sni(
            tcp(FRONT, "198.18.0.1", 80),
            "web.shop.svc",
            "198.18.0.7"
        ))
        .allowed
    );
    assert!(
        !a.check(&sni(
            tcp(FRONT, "198.18.0.1", 80),
            "web.shop.svc",
            "198.18.1.1"
        ))
        .allowed
    );
    assert!(
        !a.check(&sni(
            tcp(FRONT, "198.18.0.1", 80),
            "db.other.svc",
            "198.18.0.1"
        ))
        .allowed
    );
    assert!(
        !a.check(&sni(
            tcp(EVIL, "198.18.0.1", 80),
            "web.shop.svc",
            "198.18.0.1"
        ))
        .allowed
    );
    // Rule 1: by service account, from a remote address outside 198.18.0.0/24.
    let other = sni(tcp(OTHER, "198.18.0.1", 9), "x", "198.18.5.5");
    assert_eq!(a.check(&other).policy, Some(("shop/l4".into(), 1)));
    assert!(
        !a.check(&sni(tcp(OTHER, "198.18.0.1", 9), "x", "198.18.0.5"))
            .allowed
    );
    assert!(
        !a.check(&sni(tcp(FRONT, "198.18.0.1", 9), "x", "198.18.5.5"))
            .allowed
    );
    // The DENY's not* forms: other host, method and path together deny; any one spared.
    let h = hyper::HeaderMap::new();
    let on_8080 = sni(tcp(FRONT, "198.18.0.1", 8080), "web.shop.svc", "198.18.0.1");
    let http = |host: &'static str, method, path| Attributes {
        http: Some(Http {
            host,
            method,
            path,
            headers: &h,
        }),
        ..on_8080.clone()
    };
    assert!(!a.check(&http("evil.example", "POST", "/x")).allowed);
    assert!(
        a.check(&http("web.shop.svc.cluster.local", "POST", "/x"))
            .allowed
    );
    assert!(a.check(&http("evil.example", "GET", "/x")).allowed);
    assert!(a.check(&http("evil.example", "POST", "/ok")).allowed);
}

#[test]
fn declared_ports_say_which_workload_ports_speak_http() {
    let set = ConfigSet::parse_ok(
        "se.yaml",
        "
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc]
  addresses: [127.77.0.10]
  ports:
  - {number: 80, name: tcp-echo, targetPort: 7000}
  - {number: 81, name: web, protocol: HTTP, targetPort: 9080}
  - {number: 82, name: anything, targetPort: 9090}
  - {number: 83, name: grpc-api, targetPort: 9091}
  resolution: STATIC
  endpoints: [{address: 198.18.0.2}]
",
    );
    let reg = crate::registry::Registry::build(&set, &Default::default()).unwrap();
    let ep: IpAddr = "198.18.0.2".parse().unwrap();
    let declared = reg.declared_http(&[ep]);
    assert_eq!(declared.get(&7000), Some(&false));
    assert_eq!(declared.get(&9080), Some(&true));
    assert_eq!(declared.get(&9091), Some(&true));
    assert_eq!(declared.get(&9090), None, "undeclared: sniffed");
    assert!(
        reg.declared_http(&["198.18.0.3".parse().unwrap()])
            .is_empty()
    );
}
