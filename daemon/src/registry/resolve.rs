//! Istio's answer to "which DestinationRule applies to this client and host, and what is the
//! effective policy for (host, port, subset)": host matching (most specific wins), the namespace
//! lookup order (client namespace → service namespace → root namespace, first hit wins, no merge
//! across namespaces), same-namespace merging, `workloadSelector`, and the block-level
//! port/subset override of `trafficPolicy` (§2–§3 of the semantics reference).
//!
//! Invariant: everything here is a pure function of the snapshot; every effective block records
//! the resource and field path it came from, so `drover explain` can show it.

use std::{collections::BTreeMap, sync::Arc};

use crate::config::{
    policy::{self, Blocks, TrafficPolicy},
    source::Origin,
};

/// Istio's root namespace: rules there apply mesh-wide (lowest precedence).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The workloads a daemon serves: their namespace and labels decide `exportTo`,
/// `workloadSelector`, `sourceLabels` and `sourceNamespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// `namespace/name` of a WorkloadEntry that describes the client (namespace and labels
    /// are taken from it when the registry is built).
    pub workload: Option<String>,
    /// `region/zone/subzone` of the client, for locality load balancing (empty: unknown, and
    /// locality is not used).
    pub locality: String,
}

/// A validated DestinationRule with where it came from.
#[derive(Clone, Debug)]
pub struct RuleEntry {
    pub rule: policy::DestinationRule,
    pub source: RuleRef,
    pub namespace: String,
    /// (creationTimestamp, name): merge order.
    pub age: (String, String),
}

/// A resource named for provenance: `namespace/name` plus its file position index.
#[derive(Clone, Debug)]
pub struct RuleRef {
    pub id: String,
    pub origin: Origin,
}

/// The DestinationRule a client uses for one host, after same-namespace merging.
#[derive(Clone, Debug, Default)]
pub struct MergedRule {
    /// Every rule that contributed, oldest first.
    pub sources: Vec<RuleRef>,
    /// The first contributing rule's top-level `trafficPolicy`.
    pub traffic_policy: Option<(Arc<TrafficPolicy>, RuleRef)>,
    /// Subsets in merge order; later duplicates dropped.
    pub subsets: Vec<(policy::Subset, RuleRef)>,
}

/// A value with the resource and field path that set it; `None` means "not configured".
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub value: Option<T>,
    pub from: Option<(RuleRef, String)>,
}

/// The policy of one cluster `(host, port, subset)`, each block with its provenance.
#[derive(Clone, Debug, PartialEq)]
pub struct EffectivePolicy {
    pub load_balancer: Sourced<policy::LoadBalancer>,
    pub connection_pool: Sourced<policy::ConnectionPool>,
    pub outlier_detection: Sourced<policy::OutlierDetection>,
    pub tls: Sourced<policy::ClientTls>,
    pub tunnel: Sourced<policy::Tunnel>,
    pub proxy_protocol: Sourced<policy::ProxyProtocolVersion>,
    pub retry_budget: Sourced<policy::RetryBudget>,
}

/// The subset a route names does not exist for this client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "subset {subset:?} is not defined by any DestinationRule for {host} visible to this client"
)]
pub struct UnknownSubset {
    pub host: String,
    pub subset: String,
}

// === impl Sourced ===

impl<T> Default for Sourced<T> {
    fn default() -> Self {
        Self {
            value: None,
            from: None,
        }
    }
}

impl<T: Clone> Sourced<T> {
    /// `value` as set at `path`; an absent value keeps its provenance only when `record_unset`
    /// (a port-level entry that resets a block is worth naming).
    fn set(value: &Option<T>, source: &RuleRef, path: String, record_unset: bool) -> Self {
        match value {
            Some(v) => Self {
                value: Some(v.clone()),
                from: Some((source.clone(), path)),
            },
            None if record_unset => Self {
                value: None,
                from: Some((source.clone(), path)),
            },
            None => Self::default(),
        }
    }
}

// === impl RuleRef ===

impl PartialEq for RuleRef {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.origin.file == other.origin.file
            && self.origin.doc == other.origin.doc
    }
}

impl RuleRef {
    /// `file:line:col` of a field of this resource, if it was written there.
    pub fn position(&self, path: &str) -> Option<String> {
        self.origin.position(path)
    }
}

// === host matching ===

/// Whether a rule host (`*`, `*.suffix` or exact) applies to a service host, with a specificity
/// score (higher wins): exact beats every wildcard, longer wildcard suffixes beat shorter ones.
pub fn host_match(rule_host: &str, service_host: &str) -> Option<usize> {
    if rule_host == service_host {
        return Some(usize::MAX);
    }
    if rule_host == "*" {
        return Some(0);
    }
    let suffix = rule_host.strip_prefix('*')?; // ".foo.com"
    if let Some(svc_suffix) = service_host.strip_prefix('*') {
        // A wildcard service is matched by an identical or broader wildcard only.
        return (svc_suffix.ends_with(suffix)).then_some(suffix.len());
    }
    service_host.ends_with(suffix).then_some(suffix.len())
}

/// The DestinationRules of each namespace (indexes into the rule list, in its order): the
/// lookup visits at most three namespaces, never every rule.
pub type RulesByNamespace = std::collections::HashMap<String, Vec<usize>>;

/// Indexes `rules` by namespace.
pub fn by_namespace(rules: &[RuleEntry]) -> RulesByNamespace {
    let mut index = RulesByNamespace::new();
    for (i, r) in rules.iter().enumerate() {
        index.entry(r.namespace.clone()).or_default().push(i);
    }
    index
}

/// The DestinationRule `client` uses for a service `host` declared in `service_ns`.
pub fn rule_for(
    (rules, index): (&[RuleEntry], &RulesByNamespace),
    client: &Client,
    host: &str,
    service_ns: &str,
) -> Option<MergedRule> {
    let mut order = vec![client.namespace.as_str()];
    for ns in [service_ns, ROOT_NAMESPACE] {
        if !order.contains(&ns) {
            order.push(ns);
        }
    }
    for ns in order {
        let in_ns = index.get(ns).map_or(&[][..], Vec::as_slice);
        let candidates: Vec<(&RuleEntry, usize)> = (in_ns.iter().map(|i| &rules[*i]))
            .filter(|r| r.rule.export_to.visible_to(&client.namespace))
            // Selector rules only ever apply inside their own namespace.
            .filter(|r| r.rule.workload_selector.is_none() || ns == client.namespace)
            .filter_map(|r| host_match(&r.rule.host, host).map(|s| (r, s)))
            .collect();
        let Some(best) = candidates.iter().map(|c| c.1).max() else {
            continue;
        };
        let mut chosen: Vec<&RuleEntry> = candidates
            .into_iter()
            .filter(|c| c.1 == best)
            .map(|c| c.0)
            .collect();
        chosen.sort_by(|a, b| a.age.cmp(&b.age));
        // A matching selector rule takes precedence (oldest first); otherwise the
        // selector-less rules merge. The first namespace with a host match decides even when
        // nothing in it applies to this client (Istio behaves the same way).
        let selected = chosen.iter().find(|r| {
            r.rule
                .workload_selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| client.labels.get(k) == Some(v)))
        });
        let merged: Vec<&RuleEntry> = match selected {
            Some(r) => vec![*r],
            None => chosen
                .into_iter()
                .filter(|r| r.rule.workload_selector.is_none())
                .collect(),
        };
        if merged.is_empty() {
            return None;
        }
        return Some(merge(&merged));
    }
    None
}

fn merge(rules: &[&RuleEntry]) -> MergedRule {
    let mut out = MergedRule::default();
    for r in rules {
        out.sources.push(r.source.clone());
        if out.traffic_policy.is_none()
            && let Some(tp) = &r.rule.traffic_policy
        {
            out.traffic_policy = Some((Arc::new(tp.clone()), r.source.clone()));
        }
        for s in &r.rule.subsets {
            if out.subsets.iter().any(|(e, _)| e.name == s.name) {
                tracing::debug!(rule = %r.source.id, subset = %s.name, "duplicate subset dropped in merge");
                continue;
            }
            out.subsets.push((s.clone(), r.source.clone()));
        }
    }
    out
}

// === impl MergedRule ===

impl MergedRule {
    /// A subset by name.
    pub fn subset(&self, name: &str) -> Option<&(policy::Subset, RuleRef)> {
        self.subsets.iter().find(|(s, _)| s.name == name)
    }
}

/// Effective policy of cluster `(port, subset)` under `rule` (Istio's `MergeSubsetTrafficPolicy`
/// over `GetPortLevelTrafficPolicy`): blocks replace blocks, never fields.
pub fn effective(
    rule: Option<&MergedRule>,
    host: &str,
    port: u16,
    subset: Option<&str>,
) -> Result<EffectivePolicy, UnknownSubset> {
    let mut out = EffectivePolicy {
        load_balancer: Sourced::default(),
        connection_pool: Sourced::default(),
        outlier_detection: Sourced::default(),
        tls: Sourced::default(),
        tunnel: Sourced::default(),
        proxy_protocol: Sourced::default(),
        retry_budget: Sourced::default(),
    };
    let subset = match (subset, rule) {
        (None, _) => None,
        (Some(name), Some(rule)) => Some(rule.subset(name).ok_or_else(|| UnknownSubset {
            host: host.to_string(),
            subset: name.to_string(),
        })?),
        (Some(name), None) => {
            return Err(UnknownSubset {
                host: host.to_string(),
                subset: name.to_string(),
            });
        }
    };
    if let Some(rule) = rule
        && let Some((tp, src)) = &rule.traffic_policy
    {
        apply(&mut out, tp, src, "spec.trafficPolicy", port, false);
    }
    if let Some((s, src)) = subset
        && let Some(tp) = &s.traffic_policy
    {
        apply(
            &mut out,
            tp,
            src,
            &format!("spec.subsets[{}].trafficPolicy", s.index),
            port,
            true,
        );
    }
    Ok(out)
}

/// Applies one `trafficPolicy` level. At the top level a port-level entry replaces the four
/// blocks (unset ones become unset) and drops tunnel/proxyProtocol/retryBudget; at subset level
/// set blocks override, and a subset port-level entry replaces all four blocks.
fn apply(
    out: &mut EffectivePolicy,
    tp: &TrafficPolicy,
    src: &RuleRef,
    path: &str,
    port: u16,
    subset_level: bool,
) {
    let port_level = tp.port_level.iter().find(|(_, p, _)| *p == port);
    let (blocks, bpath, replace_all): (&Blocks, String, bool) = match port_level {
        Some((i, _, b)) => (b, format!("{path}.portLevelSettings[{i}]"), true),
        None => (&tp.blocks, path.to_string(), !subset_level),
    };
    macro_rules! block {
        ($field:ident, $name:literal) => {
            if blocks.$field.is_some() || replace_all {
                out.$field = Sourced::set(
                    &blocks.$field,
                    src,
                    format!("{bpath}.{}", $name),
                    port_level.is_some(),
                );
            }
        };
    }
    block!(load_balancer, "loadBalancer");
    block!(connection_pool, "connectionPool");
    block!(outlier_detection, "outlierDetection");
    block!(tls, "tls");
    // Port-level entries cannot carry these three: a matching entry drops them.
    if port_level.is_none() {
        if tp.tunnel.is_some() || !subset_level {
            out.tunnel = Sourced::set(&tp.tunnel, src, format!("{path}.tunnel"), false);
        }
        if tp.proxy_protocol.is_some() || !subset_level {
            out.proxy_protocol = Sourced::set(
                &tp.proxy_protocol,
                src,
                format!("{path}.proxyProtocol"),
                false,
            );
        }
        if tp.retry_budget.is_some() || !subset_level {
            out.retry_budget =
                Sourced::set(&tp.retry_budget, src, format!("{path}.retryBudget"), false);
        }
    }
}

/// Subset label selection: the subset's labels must all be on the endpoint.
pub fn selects(
    subset_labels: &BTreeMap<String, String>,
    endpoint: &BTreeMap<String, String>,
) -> bool {
    subset_labels
        .iter()
        .all(|(k, v)| endpoint.get(k) == Some(v))
}

#[cfg(test)]
mod tests;
