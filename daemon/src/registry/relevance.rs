//! Which parts of a client's identity a configuration can tell apart, so that every workload
//! identity the configuration cannot distinguish shares one snapshot (a node runs many pods from
//! few kinds of rule: one build and one copy of the services serve them all).
//!
//! A client is read by: its namespace (`exportTo`, the DestinationRule lookup order client →
//! service → root namespace, `workloadSelector` rules that apply only in their own namespace,
//! `sourceNamespace`, Gateway API consumer routes, and the PeerAuthentications of its namespace
//! for inbound), its labels
//! (`workloadSelector`, `sourceLabels`, PeerAuthentication `selector`, `failoverPriority`) and
//! its locality (only where a rule balances by locality: `localityLbSetting`, or
//! `outlierDetection`, which turns locality failover on). [`Relevance::of`] finds, once per configuration, the namespaces and label keys
//! any of those can tell apart; [`Relevance::class`] maps a client onto them.
//!
//! Invariant: two clients of one class get equal snapshots from
//! [`super::Registry::build`] (checked by a property test over random configurations and
//! clients). A namespace is kept when a rule could treat its clients differently from clients of
//! any namespace with no rule, a label only when some selector or `failoverPriority` names its
//! key; anything not understood keeps the namespace (more classes, never a wrong snapshot).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::Value;

use super::{
    Client,
    resolve::{ROOT_NAMESPACE, host_match},
};
use crate::config::{source::ConfigSet, validate::qualify};

/// The namespaces and label keys a configuration can tell apart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Relevance {
    namespaces: HashSet<String>,
    label_keys: BTreeSet<String>,
    /// Some rule balances by locality (`localityLbSetting`, or `outlierDetection`, which
    /// turns Istio's default locality failover on): the client's locality counts.
    locality: bool,
}

/// What of a client a snapshot depends on (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Class {
    /// `None`: a namespace no rule tells apart from another such one.
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
    locality: String,
    /// A WorkloadEntry the client names (kept: whether it resolves is part of the build).
    workload: Option<String>,
}

impl Relevance {
    /// What `set` can tell apart.
    pub fn of(set: &ConfigSet) -> Self {
        let mut r = Self::default();
        r.namespaces.insert(ROOT_NAMESPACE.to_string());
        // Service hosts and the namespaces that declare them.
        let mut declared: HashMap<&str, HashSet<&str>> = HashMap::new();
        for se in &set.service_entries {
            for h in &se.spec.hosts {
                declared.entry(h).or_default().insert(se.namespace());
            }
        }
        for dr in &set.destination_rules {
            let ns = dr.namespace();
            let host = qualify(&dr.spec.host, ns);
            // A rule for a service of another namespace is found first by its own
            // namespace's clients; one with a selector applies only there.
            // (An exact host is looked up; only a wildcard is matched against every host.)
            let elsewhere = match declared.get(host.as_str()) {
                Some(namespaces) => namespaces.iter().any(|n| *n != ns),
                None if host.starts_with('*') => declared.iter().any(|(h, namespaces)| {
                    host_match(&host, h).is_some() && namespaces.iter().any(|n| *n != ns)
                }),
                None => false,
            };
            if elsewhere || dr.spec.workload_selector.is_some() {
                r.namespaces.insert(ns.to_string());
            }
            r.export_to(&dr.spec.export_to, ns);
            r.walk(&serde_json::to_value(&dr.spec).unwrap_or(Value::Null), ns);
        }
        for vs in &set.virtual_services {
            let ns = vs.namespace();
            r.export_to(&vs.spec.export_to, ns);
            r.walk(&serde_json::to_value(&vs.spec).unwrap_or(Value::Null), ns);
        }
        for se in &set.service_entries {
            r.export_to(&se.spec.export_to, se.namespace());
        }
        // A Gateway API route of another namespace than its parent's (a consumer route)
        // applies to its own namespace's clients only.
        let parents = (set
            .http_routes
            .iter()
            .map(|r| (r.namespace(), &r.spec.parent_refs)))
        .chain(
            set.grpc_routes
                .iter()
                .map(|r| (r.namespace(), &r.spec.parent_refs)),
        )
        .chain(
            set.tcp_routes
                .iter()
                .map(|r| (r.namespace(), &r.spec.parent_refs)),
        );
        for (ns, refs) in parents {
            if refs
                .iter()
                .any(|p| p.namespace.as_deref().is_some_and(|n| n != ns))
            {
                r.namespaces.insert(ns.to_string());
            }
        }
        for ap in &set.authorization_policies {
            // Policies of its namespace (selected by labels) apply to its workloads.
            r.namespaces.insert(ap.namespace().to_string());
            r.walk(
                &serde_json::to_value(&ap.spec).unwrap_or(Value::Null),
                ap.namespace(),
            );
        }
        for pa in &set.peer_authentications {
            // Namespace-wide (or selected) inbound policy of the workloads of its namespace.
            r.namespaces.insert(pa.namespace().to_string());
            r.walk(
                &serde_json::to_value(&pa.spec).unwrap_or(Value::Null),
                pa.namespace(),
            );
        }
        r
    }

    /// What DestinationRule `spec` of namespace `ns` tells apart by itself, besides what its
    /// host and `workloadSelector` do (see [`Relevance::of`]): a version with the same host,
    /// selector and footprint leaves every class as it was.
    pub(super) fn of_rule(spec: &crate::config::crd::DestinationRuleSpec, ns: &str) -> Self {
        let mut r = Self::default();
        r.export_to(&spec.export_to, ns);
        r.walk(&serde_json::to_value(spec).unwrap_or(Value::Null), ns);
        r
    }

    /// The class of `client` (as `set` resolves it: a WorkloadEntry it names gives its
    /// namespace and labels): its namespace if a rule tells it apart, the labels selectors
    /// read, its locality and the WorkloadEntry it names.
    pub fn class(&self, set: &ConfigSet, client: &Client) -> Class {
        let client = &super::build::resolve_client(set, client, &mut Vec::new());
        Class {
            namespace: self
                .namespaces
                .contains(&client.namespace)
                .then(|| client.namespace.clone()),
            labels: (client.labels.iter())
                .filter(|(k, _)| self.label_keys.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            locality: if self.locality {
                client.locality.clone()
            } else {
                String::new()
            },
            workload: client.workload.clone(),
        }
    }

    /// `exportTo` of an object of namespace `own`: every namespace it names, and `own` for `.`
    /// (`*`, `~` and an empty list treat every namespace alike).
    fn export_to(&mut self, export_to: &[String], own: &str) {
        for e in export_to {
            match e.as_str() {
                "*" | "~" => {}
                "." => drop(self.namespaces.insert(own.to_string())),
                n => drop(self.namespaces.insert(n.to_string())),
            }
        }
    }

    /// Collects from a resource's spec what selects clients: `sourceNamespace` values, the keys
    /// of `sourceLabels`, of `workloadSelector`/`selector` labels and of `failoverPriority`.
    fn walk(&mut self, v: &Value, own: &str) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("sourceNamespace", Value::String(n)) => {
                            self.namespaces.insert(n.clone());
                        }
                        ("sourceLabels" | "matchLabels", Value::Object(labels)) => {
                            self.label_keys.extend(labels.keys().cloned());
                        }
                        ("workloadSelector" | "selector", Value::Object(sel)) => {
                            // `{matchLabels: …}` or a bare label map.
                            if let Some(Value::Object(l)) = sel.get("matchLabels") {
                                self.label_keys.extend(l.keys().cloned());
                            }
                            if let Some(Value::Object(l)) = sel.get("labels") {
                                self.label_keys.extend(l.keys().cloned());
                            }
                            self.namespaces.insert(own.to_string());
                        }
                        ("outlierDetection" | "localityLbSetting", v) => {
                            self.locality = true;
                            self.walk(v, own);
                        }
                        ("failoverPriority", Value::Array(keys)) => {
                            for key in keys.iter().filter_map(Value::as_str) {
                                let key = key.split_once('=').map_or(key, |(k, _)| k);
                                self.label_keys.insert(key.to_string());
                            }
                        }
                        _ => self.walk(v, own),
                    }
                }
            }
            Value::Array(items) => {
                for i in items {
                    self.walk(i, own);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use proptest::prelude::*;

    use super::*;
    use crate::registry::Registry;

    /// Namespaces of objects and clients; `d` and `e` hold no object.
    const NAMESPACES: [&str; 6] = ["a", "b", "c", "istio-system", "d", "e"];

    fn service(i: usize, ns: &str) -> String {
        format!(
            "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: s{i}, namespace: {ns}}}
spec:
  hosts: [s{i}.{ns}.svc.cluster.local]
  addresses: [127.77.9.{i}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.2, labels: {{version: v1}}, locality: r1/z1}}
  - {{address: 127.0.0.3, labels: {{version: v2}}, locality: r1/z2}}
"
        )
    }

    /// `exportTo` variants (empty: the default).
    const EXPORTS: [&str; 4] = ["", "exportTo: ['*']", "exportTo: ['.']", "exportTo: [b]"];

    prop_compose! {
        /// A DestinationRule for one of `hosts` in some namespace, maybe with a selector, an
        /// `exportTo` and a `failoverPriority`.
        fn rule(hosts: Vec<String>)(
            i in 0..16usize, ns in 0..4usize, host in 0..8usize, selector in 0..3usize,
            export in 0..4usize, lb in 0..3usize, outlier in 0..3usize,
        ) -> String {
            let host = &hosts[host % hosts.len()];
            let selector = ["", "workloadSelector: {matchLabels: {app: x}}", "workloadSelector: {matchLabels: {team: t1}}"][selector];
            let lb = ["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"][lb];
            let outlier = ["", ", outlierDetection: {consecutive5xxErrors: 3}", ", outlierDetection: {consecutive5xxErrors: 3}, connectionPool: {tcp: {maxConnections: 9}}"][outlier];
            format!(
                "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: r{i}, namespace: {}}}
spec:
  host: {host}
  {selector}
  {}
  trafficPolicy: {{loadBalancer: {{simple: {lb}}}{outlier}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
",
                NAMESPACES[ns], EXPORTS[export]
            )
        }
    }

    prop_compose! {
        /// A VirtualService for one of `hosts` whose first route holds only for some sources.
        fn route(hosts: Vec<String>)(
            i in 0..16usize, ns in 0..4usize, host in 0..8usize, source in 0..4usize,
            export in 0..4usize,
        ) -> String {
            let host = &hosts[host % hosts.len()];
            let source = ["sourceLabels: {app: x}", "sourceNamespace: b", "sourceLabels: {team: t2}", "port: 80"][source];
            format!(
                "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: v{i}, namespace: {}}}
spec:
  hosts: [{host}]
  {}
  http:
  - match: [{{{source}}}]
    route: [{{destination: {{host: {host}}}, weight: 100}}]
  - route: [{{destination: {{host: {host}}}}}]
",
                NAMESPACES[ns], EXPORTS[export]
            )
        }
    }

    prop_compose! {
        fn peer()(i in 0..8usize, ns in 0..4usize, mode in 0..2usize, selector in any::<bool>()) -> String {
            let selector = if selector { "selector: {matchLabels: {app: y}}" } else { "" };
            format!(
                "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: p{i}, namespace: {}}}
spec:
  {selector}
  mtls: {{mode: {}}}
",
                NAMESPACES[ns], ["STRICT", "PERMISSIVE"][mode]
            )
        }
    }

    prop_compose! {
        fn client()(ns in 0..6usize, app in 0..4usize, team in 0..3usize, other in any::<bool>(), locality in 0..3usize) -> Client {
            let mut labels = BTreeMap::new();
            if app < 3 {
                labels.insert("app".to_string(), ["x", "y", "z"][app].to_string());
            }
            if team < 2 {
                labels.insert("team".to_string(), ["t1", "t2"][team].to_string());
            }
            if other {
                labels.insert("pod-template-hash".to_string(), "abc".to_string());
            }
            Client {
                namespace: NAMESPACES[ns].to_string(),
                labels,
                workload: None,
                locality: ["", "r1/z1", "r1/z2"][locality].to_string(),
            }
        }
    }

    /// Services in namespaces a–c, rules and routes over their hosts, PeerAuthentications.
    fn configuration() -> impl Strategy<Value = String> {
        (1..4usize)
            .prop_flat_map(|n| {
                let ns: Vec<&str> = (0..n).map(|i| NAMESPACES[i % 3]).collect();
                let hosts: Vec<String> = (0..n)
                    .map(|i| format!("s{i}.{}.svc.cluster.local", ns[i]))
                    .collect();
                let services: String = (0..n).map(|i| service(i, ns[i])).collect();
                (
                    Just(services),
                    prop::collection::vec(rule(hosts.clone()), 0..4),
                    prop::collection::vec(route(hosts), 0..3),
                    prop::collection::vec(peer(), 0..2),
                )
            })
            .prop_map(|(services, rules, routes, peers)| {
                // Names are unique per kind and namespace: drop repeats.
                let mut seen = HashSet::new();
                let mut out = services;
                for doc in rules.into_iter().chain(routes).chain(peers) {
                    let key: Vec<&str> = doc.lines().take(4).collect();
                    if seen.insert(key.join("\n")) {
                        out.push_str(&doc);
                    }
                }
                out
            })
    }

    fn set_of(yaml: &str) -> ConfigSet {
        let mut set = ConfigSet::default();
        let mut problems = Vec::new();
        set.add_text(Arc::new(PathBuf::from("c.yaml")), yaml, &mut problems);
        assert!(problems.is_empty(), "{problems:?}\n{yaml}");
        set
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Clients of one class get equal snapshots (or are refused alike).
        #[test]
        fn clients_of_one_class_get_equal_snapshots(
            yaml in configuration(),
            clients in prop::collection::vec(client(), 2..6),
        ) {
            let set = set_of(&yaml);
            let relevance = Relevance::of(&set);
            for (i, c1) in clients.iter().enumerate() {
                for c2 in &clients[i + 1..] {
                    if relevance.class(&set, c1) != relevance.class(&set, c2) {
                        continue;
                    }
                    let f = |c: &Client| Registry::build(&set, c).map(|r| r.fingerprint()).map_err(|r| format!("{:?}", r.errors));
                    prop_assert_eq!(f(c1), f(c2), "{:?} and {:?}\n{}", c1, c2, yaml);
                }
            }
        }
    }

    #[test]
    fn with_namespace_local_rules_only_every_namespace_and_label_is_one_class() {
        // The common shape: each service's rule in its own namespace, no selector, no
        // exportTo: fifty identities, one snapshot.
        let yaml = [service(1, "a"), service(2, "b")].concat()
            + "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: a}
spec:
  host: s1
  subsets: [{name: v1, labels: {version: v1}}]
";
        let set = set_of(&yaml);
        let relevance = Relevance::of(&set);
        let classes: HashSet<Class> = (0..50)
            .map(|i| Client {
                namespace: ["a", "b", "d"][i % 3].to_string(),
                labels: [("app".to_string(), format!("app{i}"))].into(),
                workload: None,
                locality: String::new(),
            })
            .map(|c| relevance.class(&set, &c))
            .collect();
        assert_eq!(classes.len(), 1);
    }
}
