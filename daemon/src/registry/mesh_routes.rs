//! Binds the Gateway API mesh routes to services, as the GAMMA spec (GEP-1294) and Istio do:
//! every route of one parent host is merged into one VirtualService-shaped entry, its HTTP
//! rules ordered by the spec's precedence; a route in the parent's namespace (producer) applies
//! to every client, a route elsewhere (consumer) only to its own namespace's clients and wins
//! there; a backend in another namespace needs a ReferenceGrant of that namespace.
//!
//! Invariants: the entries are pure functions of the configuration (no client state); an
//! entry only exists for a parent host the registry knows; every destination that cannot be
//! used is kept, marked `invalid`, so its share of requests gets the spec's 500.

use std::{cmp::Reverse, collections::BTreeMap};

use super::{VsEntry, build::validate, resolve::RuleRef};
use crate::config::{
    Problem,
    policy::{self, ExportTo, HttpRoute, MeshRoute, ReferenceGrant, StringMatch},
    source::{ConfigSet, Origin},
    validate::qualify,
};

/// How Gateway API routes came to an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayBinding {
    /// The routes merged into the entry (`HTTPRoute ns/name`), oldest first.
    pub routes: Vec<String>,
    /// A consumer route: it applies only to its own namespace's clients, and there it wins over
    /// the producer's routes and VirtualServices.
    pub consumer: bool,
}

/// One validated route with what binding needs.
struct Bound {
    route: MeshRoute,
    id: String,
    namespace: String,
    age: (String, String),
    origin: Origin,
}

/// The precedence of one HTTP route (a single match) among all routes of a parent, smaller
/// first: exact path, then regular expression, then the longest prefix; then a method, more
/// headers, more query parameters; then the oldest route, its `namespace/name`, the rule and
/// match order.
type Precedence = (
    u8,
    Reverse<usize>,
    Reverse<bool>,
    Reverse<usize>,
    Reverse<usize>,
);

/// Where a route stands among its parent's: its precedence, then the route's age, the rule and
/// the match.
type Order = (Precedence, (String, String), usize, usize);

/// The entries for every mesh route of `set`, and the notes on what they override.
pub(super) fn bind(
    set: &ConfigSet,
    known: &dyn Fn(&str) -> bool,
    virtual_services: &[VsEntry],
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<VsEntry> {
    let routes = validated_routes(set, problems, warnings);
    let grants: Vec<(String, ReferenceGrant)> = (set.reference_grants.iter())
        .filter_map(|g| {
            let v = validate::<_, ReferenceGrant>(g, problems, warnings)?;
            Some((g.namespace().to_string(), v))
        })
        .collect();
    // (host, consumer namespace) → the entry being merged.
    let mut groups: BTreeMap<(String, Option<String>), Group<'_>> = BTreeMap::new();
    for b in &routes {
        for p in &b.route.parents {
            let hosts: Vec<String> = (parent_hosts(set, p).into_iter())
                .filter(|h| known(h))
                .collect();
            if hosts.is_empty() {
                warnings.push(b.origin.problem(
                    p.field.clone(),
                    format!(
                        "{} {}/{} is not a known service: the route applies to nothing",
                        if p.service_entry {
                            "ServiceEntry"
                        } else {
                            "Service"
                        },
                        p.namespace,
                        p.name
                    ),
                ));
                continue;
            }
            let consumer = (p.namespace != b.namespace).then(|| b.namespace.clone());
            for host in hosts {
                let g = groups
                    .entry((host, consumer.clone()))
                    .or_insert_with(|| Group {
                        namespace: consumer.clone().unwrap_or_else(|| p.namespace.clone()),
                        first: b,
                        routes: Vec::new(),
                        http: Vec::new(),
                        tcp: Vec::new(),
                    });
                g.add(b, p.port, &grants, known);
            }
        }
    }
    let entries: Vec<VsEntry> = (groups.into_iter())
        .map(|((host, consumer), g)| g.entry(host, consumer))
        .collect();
    warn_overlaps(&entries, virtual_services, warnings);
    entries
}

/// Every valid mesh route of `set`, oldest first.
fn validated_routes(
    set: &ConfigSet,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<Bound> {
    let mut routes: Vec<Bound> = Vec::new();
    macro_rules! collect {
        ($list:expr) => {
            for r in $list {
                if let Some(route) = validate::<_, MeshRoute>(r, problems, warnings) {
                    routes.push(Bound {
                        route,
                        id: r.id(),
                        namespace: r.namespace().to_string(),
                        age: (r.age().0, r.id()),
                        origin: r.origin.clone(),
                    });
                }
            }
        };
    }
    collect!(&set.http_routes);
    collect!(&set.grpc_routes);
    collect!(&set.tcp_routes);
    routes.sort_by(|a, b| a.age.cmp(&b.age));
    routes
}

/// A located warning for each VirtualService that routes the host of a Gateway API entry,
/// naming the one Istio would apply.
fn warn_overlaps(entries: &[VsEntry], virtual_services: &[VsEntry], warnings: &mut Vec<Problem>) {
    for e in entries {
        let host = &e.vs.hosts[0];
        for vs in (virtual_services.iter()).filter(|v| v.vs.hosts.contains(host)) {
            let (winner, why) = match e.gateway.as_ref().is_some_and(|g| g.consumer) {
                true => (
                    e.source.id.as_str(),
                    format!(
                        "for clients in namespace {}: a consumer route wins",
                        e.namespace
                    ),
                ),
                false if e.age < vs.age => (e.source.id.as_str(), "the older one wins".into()),
                false => (vs.source.id.as_str(), "the older one wins".into()),
            };
            warnings.push(e.source.origin.problem(
                "spec.parentRefs",
                format!(
                    "{} and VirtualService {} both route host {host:?}; as in Istio, only one applies to a client ({why}): {winner}",
                    e.source.id, vs.source.id
                ),
            ));
        }
    }
}

/// An entry under construction.
struct Group<'a> {
    namespace: String,
    first: &'a Bound,
    routes: Vec<String>,
    http: Vec<(Order, HttpRoute)>,
    tcp: Vec<policy::L4Route>,
}

// === impl Group ===

impl Group<'_> {
    /// Adds route `b`'s rules, bound to the parent's `port` (all ports when `None`), with their
    /// unusable backends marked.
    fn add(
        &mut self,
        b: &Bound,
        port: Option<u16>,
        grants: &[(String, ReferenceGrant)],
        known: &dyn Fn(&str) -> bool,
    ) {
        let kind = format!("{} {}", b.route.kind.name(), b.id);
        if !self.routes.contains(&kind) {
            self.routes.push(kind);
        }
        for (i, r) in b.route.http.iter().enumerate() {
            let mut r = r.clone();
            for m in &mut r.matches {
                m.port = port;
            }
            grant_check(&mut r.destinations, b, grants, known);
            for (d, _) in &mut r.mirrors {
                grant_check(std::slice::from_mut(d), b, grants, known);
            }
            self.http
                .push(((precedence(&r), b.age.clone(), r.index, i), r));
        }
        for r in &b.route.tcp {
            let mut r = r.clone();
            if let Some(port) = port {
                r.matches = vec![policy::L4Match {
                    port: Some(port),
                    ..Default::default()
                }];
            }
            grant_check(&mut r.destinations, b, grants, known);
            self.tcp.push(r);
        }
    }

    /// The finished entry for `host`: HTTP rules in precedence order, visible to every
    /// namespace (producer) or only to the consumer's.
    fn entry(mut self, host: String, consumer: Option<String>) -> VsEntry {
        self.http.sort_by(|a, b| a.0.cmp(&b.0));
        VsEntry {
            vs: policy::VirtualService {
                hosts: vec![host],
                applies_to_mesh: true,
                http: self.http.into_iter().map(|(_, r)| r).collect(),
                tcp: self.tcp,
                tls: Vec::new(),
                export_to: match &consumer {
                    Some(ns) => ExportTo::Namespaces(vec![ns.clone()]),
                    None => ExportTo::All,
                },
            },
            source: RuleRef {
                id: self.routes.join(", "),
                origin: self.first.origin.clone(),
            },
            namespace: self.namespace,
            age: self.first.age.clone(),
            gateway: Some(GatewayBinding {
                routes: self.routes,
                consumer: consumer.is_some(),
            }),
        }
    }
}

/// The hosts a parent stands for: a Service's name in its namespace, a ServiceEntry's hosts.
fn parent_hosts(set: &ConfigSet, p: &policy::MeshParent) -> Vec<String> {
    if !p.service_entry {
        return vec![qualify(&p.name, &p.namespace)];
    }
    (set.service_entries.iter())
        .filter(|se| se.meta.name == p.name && se.namespace() == p.namespace)
        .flat_map(|se| se.spec.hosts.iter().map(|h| qualify(h, &p.namespace)))
        .collect()
}

/// Marks the destinations of `b` that cannot be used: an unknown Service, or one in another
/// namespace that no ReferenceGrant there opens to the route.
fn grant_check(
    dests: &mut [policy::WeightedDestination],
    b: &Bound,
    grants: &[(String, ReferenceGrant)],
    known: &dyn Fn(&str) -> bool,
) {
    for d in dests.iter_mut().filter(|d| d.invalid.is_none()) {
        if let Some((_, ns, name)) = b.route.foreign.iter().find(|f| f.0 == d.host) {
            let granted = grants.iter().any(|(gns, g)| {
                gns == ns
                    && g.from
                        .iter()
                        .any(|(k, from)| *k == b.route.kind && *from == b.namespace)
                    && g.to.iter().any(|t| t.as_ref().is_none_or(|t| t == name))
            });
            if !granted {
                d.invalid = Some(format!(
                    "no ReferenceGrant in namespace {ns} lets {} routes of namespace {} use Service {name}",
                    b.route.kind.name(),
                    b.namespace
                ));
                continue;
            }
        }
        if !known(&d.host) {
            d.invalid = Some("no such Service".to_string());
        }
    }
}

/// The spec's precedence of a route with one match.
fn precedence(r: &HttpRoute) -> Precedence {
    let Some(m) = r.matches.first() else {
        return (3, Reverse(0), Reverse(false), Reverse(0), Reverse(0));
    };
    let (class, len) = match &m.uri {
        Some(StringMatch::Exact(p)) => (0, p.len()),
        Some(StringMatch::Regex(p)) => (1, p.as_str().len()),
        Some(StringMatch::PathPrefix(p) | StringMatch::Prefix(p)) => (2, p.len()),
        None => (3, 0),
    };
    (
        class,
        Reverse(len),
        Reverse(m.method.is_some()),
        Reverse(m.headers.len()),
        Reverse(m.query_params.len()),
    )
}

#[cfg(test)]
mod tests;
