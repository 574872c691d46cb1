//! Builds a [`Registry`] from loaded resources, applying Istio's rules for these kinds and the
//! checks Drover needs to capture safely (no VIP that is also an endpoint, no (VIP, port) claimed
//! twice), then resolves DestinationRules and VirtualServices into clusters for the client.
//! Every violation becomes a located [`Problem`]; all of them are reported together.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    Client, Cluster, Endpoint, Member, Registry, Resolution, RuleEntry, RuleRef, Service,
    ServicePort, VsEntry,
    peer::{InboundMtls, PeerEntry},
    resolve, route,
};
use crate::{
    balance::{Balancer, Plan, locality::Place},
    config::{
        Problem,
        crd::{ServiceEntrySpec, WorkloadEntrySpec},
        policy,
        source::{ConfigSet, Resource},
        validate::{Invalid, Validated, is_dns, qualify},
    },
};

/// Configuration that cannot be served: every error, plus the warnings found on the way.
#[derive(Debug)]
pub struct Rejected {
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Registry {
    /// Validates `set` and builds the snapshot as seen by `client`, or returns every problem.
    pub fn build(set: &ConfigSet, client: &Client) -> Result<Registry, Rejected> {
        Self::build_shared(Arc::new(set.clone()), client)
    }

    /// [`Registry::build`] of a configuration the snapshot keeps (shared with the other
    /// snapshots built from it).
    pub fn build_shared(shared: Arc<ConfigSet>, client: &Client) -> Result<Registry, Rejected> {
        let set = &*shared;
        let mut problems = Vec::new();
        let mut warnings = set.warnings.clone();
        let client = &resolve_client(set, client, &mut problems);
        unique_names("ServiceEntry", &set.service_entries, &mut problems);
        unique_names("WorkloadEntry", &set.workload_entries, &mut problems);
        unique_names("DestinationRule", &set.destination_rules, &mut problems);
        unique_names("VirtualService", &set.virtual_services, &mut problems);
        unique_names(
            "PeerAuthentication",
            &set.peer_authentications,
            &mut problems,
        );
        unique_names(
            "AuthorizationPolicy",
            &set.authorization_policies,
            &mut problems,
        );
        let services = services(set, client, &mut problems, &mut warnings);
        let rules = destination_rules(set, &mut problems, &mut warnings);
        let mut virtual_services = virtual_services(set, &mut problems, &mut warnings);
        unique_names("HTTPRoute", &set.http_routes, &mut problems);
        unique_names("GRPCRoute", &set.grpc_routes, &mut problems);
        unique_names("TCPRoute", &set.tcp_routes, &mut problems);
        unique_names("ReferenceGrant", &set.reference_grants, &mut problems);
        let known = |h: &str| services.by_host.contains_key(h);
        let routes =
            super::mesh_routes::bind(set, &known, &virtual_services, &mut problems, &mut warnings);
        virtual_services.extend(routes);
        let peers = peer_authentications(set, &mut problems, &mut warnings);
        let authorization = authorization_policies(set, &mut problems, &mut warnings);
        unique_names("Telemetry", &set.telemetries, &mut problems);
        let telemetry = telemetries(set, &mut problems, &mut warnings);
        check_references(&rules, &virtual_services, &services.by_host, &mut warnings);
        if !problems.is_empty() {
            return Err(Rejected {
                errors: problems,
                warnings,
            });
        }
        let mut registry = Registry {
            services: services.list.into_iter().map(Arc::new).collect(),
            by_vip: Arc::new(services.by_vip),
            by_cidr: Arc::new(services.by_cidr),
            by_host: Arc::new(services.by_host),
            rules_by_ns: Arc::new(resolve::by_namespace(&rules)),
            rules: Arc::new(rules),
            virtual_services: Arc::new(virtual_services),
            inbound: InboundMtls::resolve(&peers, client),
            peers: Arc::new(peers),
            authorization: Arc::new(authorization),
            client: client.clone(),
            clusters: HashMap::new(),
            warnings: Arc::default(),
            config: shared.clone(),
            patched: Arc::default(),
            credentials: None,
            by_address: Default::default(),
            telemetry: Arc::new(telemetry),
        };
        registry.clusters = clusters(&registry);
        warnings.extend(tcp_only_on_http(&registry, registry.clusters.values()));
        warnings.extend(uncaptured_hosts(&registry));
        registry.warnings = Arc::new(warnings);
        Ok(registry)
    }
}

impl Registry {
    /// This snapshot with the objects of `changed` — new versions of ServiceEntries (endpoint
    /// sets) and DestinationRules it holds — in place of their previous versions, or `None`
    /// when only a full build can tell (see [`Registry::patch_entry`] and
    /// [`Registry::patch_rule`]; anything else in `changed` too). The services and clusters
    /// they touch are rebuilt as a build would build them, so the result equals a build of the
    /// changed configuration; every other service and cluster is shared with `self`, with its
    /// live state.
    pub fn patch(&self, changed: &ConfigSet) -> Option<Registry> {
        let others = !(changed.workload_entries.is_empty()
            && changed.virtual_services.is_empty()
            && changed.http_routes.is_empty()
            && changed.grpc_routes.is_empty()
            && changed.tcp_routes.is_empty()
            && changed.reference_grants.is_empty()
            && changed.telemetries.is_empty()
            && changed.peer_authentications.is_empty()
            && changed.authorization_policies.is_empty()
            && changed.skipped.is_empty()
            && changed.warnings.is_empty());
        if others {
            return None;
        }
        let mut next = Registry {
            services: self.services.clone(),
            by_vip: self.by_vip.clone(),
            by_cidr: self.by_cidr.clone(),
            by_host: self.by_host.clone(),
            rules: self.rules.clone(),
            rules_by_ns: self.rules_by_ns.clone(),
            virtual_services: self.virtual_services.clone(),
            client: self.client.clone(),
            inbound: self.inbound.clone(),
            peers: self.peers.clone(),
            authorization: self.authorization.clone(),
            clusters: self.clusters.clone(),
            warnings: self.warnings.clone(),
            config: self.config.clone(),
            patched: self.patched.clone(),
            credentials: self.credentials.clone(),
            by_address: Default::default(),
            telemetry: self.telemetry.clone(),
        };
        let mut touched = std::collections::BTreeSet::new();
        for r in &changed.service_entries {
            touched.extend(next.patch_entry(r)?);
        }
        let mut ruled = std::collections::BTreeSet::new();
        for r in &changed.destination_rules {
            ruled.extend(next.patch_rule(r)?);
        }
        touched.extend(ruled.iter().copied());
        // A rule's clusters may have other subsets now: they are replaced (an entry's keep
        // their keys, each overwritten below).
        if !ruled.is_empty() {
            next.clusters.retain(|(s, _, _), _| !ruled.contains(s));
        }
        let mut tls_problems = std::collections::BTreeMap::new();
        for s in touched {
            let svc = &next.services[s];
            let rule = next.rule_for(svc);
            for (key, mut c) in service_clusters(&next, (s, svc), rule.as_ref()) {
                if let (Some(credentials), Some(c)) = (&self.credentials, Arc::get_mut(&mut c)) {
                    super::originate(&next.services, c, credentials, &mut tls_problems);
                }
                next.clusters.insert(key, c);
            }
        }
        // A build finds no warning in a patched rule's clusters (there was none: patch_rule).
        let warned = !ruled.is_empty() && {
            let ruled_clusters = (next.clusters.values()).filter(|c| ruled.contains(&c.service));
            !tcp_only_on_http(&next, ruled_clusters).is_empty()
        };
        (tls_problems.is_empty() && !warned).then_some(next)
    }

    /// Whether the build found a warning located in the object of `origin`.
    fn warned_at(&self, origin: &crate::config::source::Origin) -> bool {
        (self.warnings.iter()).any(|w| w.location.file == *origin.file)
    }

    /// Puts ServiceEntry `r`, a new version of one this snapshot holds that differs in its
    /// endpoints only, in place; the indices of its services. `None` when anything but the
    /// endpoints changed (metadata, hosts, addresses, ports, resolution, `exportTo`), the entry
    /// is new or another entry has its host, it has problems or warnings (now or before), or its
    /// endpoints come from WorkloadEntries.
    fn patch_entry(&mut self, r: &Resource<ServiceEntrySpec>) -> Option<Vec<usize>> {
        let id = r.origin.file.display().to_string();
        let old = served(&self.patched.entries, &self.config.service_entries, r)?;
        let without_endpoints = |spec: &ServiceEntrySpec| ServiceEntrySpec {
            endpoints: Arc::default(),
            ..spec.clone()
        };
        if old.meta != r.meta
            || without_endpoints(&old.spec) != without_endpoints(&r.spec)
            || self.warned_at(&r.origin)
        {
            return None;
        }
        let entry: policy::ServiceEntry = validate_clean(r)?;
        if is_dns(entry.resolution) || entry.workload_selector.is_some() {
            return None;
        }
        let proto = service_entry(entry, r.namespace(), &[]);
        if (proto.vips.iter()).any(|v| proto.endpoints.iter().any(|e| e.address == *v)) {
            return None;
        }
        let mut touched = Vec::new();
        for host in &r.spec.hosts {
            let s = *self.by_host.get(host)?;
            let svc = &self.services[s];
            if svc.namespace != r.namespace() || svc.entry != r.meta.name {
                return None;
            }
            self.services[s] = Arc::new(Service {
                host: svc.host.clone(),
                namespace: svc.namespace.clone(),
                entry: svc.entry.clone(),
                source: svc.source.clone(),
                resolution: svc.resolution,
                location: svc.location,
                vips: svc.vips.clone(),
                cidrs: svc.cidrs.clone(),
                ports: proto.ports.clone(),
                endpoints: proto.endpoints.clone(),
                telemetry: Default::default(),
            });
            touched.push(s);
        }
        Arc::make_mut(&mut self.patched)
            .entries
            .insert(id, r.clone());
        Some(touched)
    }

    /// Puts DestinationRule `r`, a new version of one this snapshot holds, in place; the
    /// indices of the services its host names. `None` when the rule is new, it changed what
    /// tells clients apart (host, `exportTo`, `workloadSelector`, locality settings, label keys:
    /// the identity classes would change), it or its old version has problems or warnings, a
    /// VirtualService routes to a service it names (its subsets are checked against them), or
    /// its merge order changed.
    fn patch_rule(
        &mut self,
        r: &Resource<crate::config::crd::DestinationRuleSpec>,
    ) -> Option<Vec<usize>> {
        let id = r.origin.file.display().to_string();
        let old = served(&self.patched.rules, &self.config.destination_rules, r)?;
        let (ns, old_ns) = (r.namespace(), old.namespace());
        // Warnings located at a rule merged with this one (same host and namespace) could come
        // or go with it.
        let merged_warned = (self.rules.iter())
            .filter(|e| e.namespace == ns && e.rule.host == qualify(&r.spec.host, ns))
            .any(|e| (self.warnings.iter()).any(|w| w.location.file == *e.source.origin.file));
        if merged_warned
            || old_ns != ns
            || old.age() != r.age()
            || old.spec.host != r.spec.host
            || old.spec.export_to != r.spec.export_to
            || old.spec.workload_selector != r.spec.workload_selector
            || super::relevance::Relevance::of_rule(&old.spec, ns)
                != super::relevance::Relevance::of_rule(&r.spec, ns)
            || self.warned_at(&r.origin)
        {
            return None;
        }
        let rule: policy::DestinationRule = validate_clean(r)?;
        let at = self.rules.iter().position(|e| e.source.id == r.id())?;
        let named: Vec<usize> = (self.services.iter().enumerate())
            .filter(|(_, svc)| resolve::host_match(&rule.host, &svc.host).is_some())
            .map(|(s, _)| s)
            .collect();
        let routed = self.virtual_services.iter().any(|vs| {
            (vs.vs.http.iter().flat_map(|r| &r.destinations))
                .chain(vs.vs.tcp.iter().flat_map(|r| &r.destinations))
                .chain(vs.vs.tls.iter().flat_map(|r| &r.destinations))
                .any(|d| named.iter().any(|s| self.services[*s].host == d.host))
        });
        if routed {
            return None;
        }
        let entry = &mut Arc::make_mut(&mut self.rules)[at];
        entry.rule = rule;
        Arc::make_mut(&mut self.patched).rules.insert(id, r.clone());
        Some(named)
    }
}

/// `r` validated, when it has neither problems nor warnings (a patch leaves reporting them to
/// a full build).
fn validate_clean<'r, S, T>(r: &'r Resource<S>) -> Option<T>
where
    Validated<T>: TryFrom<&'r Resource<S>, Error = Invalid>,
{
    Validated::<T>::try_from(r)
        .ok()
        .filter(|v| v.warnings.is_empty())
        .map(|v| v.value)
}

/// The version of `r` (its kind, namespace and name, from the same source) a snapshot serves:
/// its last patch, else the one loaded.
fn served<'a, T>(
    patched: &'a std::collections::BTreeMap<String, Resource<T>>,
    loaded: &'a [Resource<T>],
    r: &Resource<T>,
) -> Option<&'a Resource<T>> {
    patched
        .get(&r.origin.file.display().to_string())
        .or_else(|| {
            loaded.iter().find(|o| {
                o.meta.name == r.meta.name
                    && o.namespace() == r.namespace()
                    && o.origin.file == r.origin.file
            })
        })
}

/// VirtualService hosts that no captured service answers to. Drover routes by the destination
/// address (the VIP decides the service, then its VirtualService), not by the `Host` header on a
/// shared port as Envoy's outbound route configuration does, so such a host is never reached.
fn uncaptured_hosts(reg: &Registry) -> Vec<Problem> {
    let mut out = Vec::new();
    for vs in reg.virtual_services.iter().filter(|v| v.vs.applies_to_mesh) {
        for (i, h) in vs.vs.hosts.iter().enumerate() {
            let captured = reg.services.iter().any(|s| {
                (!s.vips.is_empty() || !s.cidrs.is_empty())
                    && resolve::host_match(h, &s.host).is_some()
            });
            if !captured {
                out.push(vs.source.origin.problem(
                    format!("spec.hosts[{i}]"),
                    format!("no captured service (one with an address drover captures) has host {h:?}: drover routes by destination address, not by the Host header, so requests for this host never reach this VirtualService"),
                ));
            }
        }
    }
    out
}

/// `proxyProtocol` and `tunnel` apply to TCP ports' connections only (Istio: a tunnel is for
/// TCP and TLS routes; pooled HTTP upstream connections carry many clients' requests): one
/// located warning per rule field that reaches an HTTP port.
fn tcp_only_on_http<'c>(
    reg: &Registry,
    clusters: impl Iterator<Item = &'c Arc<Cluster>>,
) -> Vec<Problem> {
    let mut seen = std::collections::BTreeMap::new();
    for c in clusters {
        let svc = &reg.services[c.service];
        let protocol = svc.ports.iter().find(|p| p.number == c.port);
        if !route::is_http(protocol.and_then(|p| p.protocol.as_deref())) {
            continue;
        }
        let fields = [
            ("proxyProtocol", c.policy.proxy_protocol.from.as_ref()),
            ("tunnel", c.policy.tunnel.from.as_ref()),
        ];
        for (field, from) in fields {
            let Some((rule, path)) = from else {
                continue;
            };
            seen.entry((rule.id.clone(), path.clone())).or_insert_with(|| {
                rule.origin.problem(
                    path.clone(),
                    format!("{field} is not enforced on HTTP port {} of {} (drover applies it to TCP ports' connections only)", c.port, svc.host),
                )
            });
        }
        // maxConnections bounds HTTP/1.1 upstream connections only.
        let pool = c.policy.connection_pool.value.as_ref();
        let h2 = route::is_h2(protocol.and_then(|p| p.protocol.as_deref()))
            || pool.is_some_and(|p| p.h2_upgrade == policy::H2Upgrade::Upgrade);
        if h2
            && pool.is_some_and(|p| p.max_connections != policy::UNLIMITED)
            && let Some((rule, path)) = &c.policy.connection_pool.from
        {
            let field = format!("{path}.tcp.maxConnections");
            seen.entry((rule.id.clone(), field.clone())).or_insert_with(|| {
                rule.origin.problem(
                    field,
                    format!("maxConnections is not enforced on the HTTP/2 upstream connections of port {} of {} (drover bounds HTTP/1.1 ones only)", c.port, svc.host),
                )
            });
        }
    }
    seen.into_values().collect()
}

/// The services of a configuration, one per host of each valid `ServiceEntry`, with the
/// (VIP, port) pairs they capture.
#[derive(Default)]
struct Services {
    list: Vec<Service>,
    /// (VIP, port) → (service, port index).
    by_vip: HashMap<SocketAddr, (usize, usize)>,
    by_cidr: Vec<super::CidrEntry>,
    /// Host → first service with it.
    by_host: HashMap<String, usize>,
    /// (namespace, host) already defined.
    hosts_seen: HashSet<(String, String)>,
}

/// Validates the ServiceEntries and WorkloadEntries of `set` and builds their services.
fn services(
    set: &ConfigSet,
    client: &Client,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Services {
    let workload_entries: Vec<(&Resource<WorkloadEntrySpec>, Option<Endpoint>)> = set
        .workload_entries
        .iter()
        .map(|we| (we, validate(we, problems, warnings)))
        .collect();
    let mut services = Services::default();
    for se in &set.service_entries {
        let Some(entry) = validate::<_, policy::ServiceEntry>(se, problems, warnings) else {
            continue;
        };
        if is_dns(entry.resolution) {
            continue;
        }
        let proto = service_entry(entry, se.namespace(), &workload_entries);
        for (i, vip) in proto.vips.iter().enumerate() {
            if proto.endpoints.iter().any(|e| e.address == *vip) {
                problems.push(se.origin.problem(
                    format!("spec.addresses[{i}]"),
                    format!("address {vip} is also an endpoint address; capture would loop"),
                ));
            }
        }
        for (h, host) in se.spec.hosts.iter().enumerate() {
            services.add(se, (h, host), &proto, client, problems);
        }
    }
    services
}

impl Services {
    /// Adds the service of `host` (the `h`th host of `se`) unless its namespace has it already,
    /// claiming its (VIP, port) pairs when the entry is exported to the client.
    fn add(
        &mut self,
        se: &Resource<ServiceEntrySpec>,
        (h, host): (usize, &String),
        proto: &ServiceProto,
        client: &Client,
        problems: &mut Vec<Problem>,
    ) {
        let namespace = se.namespace();
        if !self
            .hosts_seen
            .insert((namespace.to_string(), host.clone()))
        {
            problems.push(se.origin.problem(
                format!("spec.hosts[{h}]"),
                format!("host {host:?} is already defined by another ServiceEntry in namespace {namespace:?}"),
            ));
            return;
        }
        let index = self.list.len();
        self.by_host.entry(host.clone()).or_insert(index);
        let visible = exported_to(&se.spec.export_to, namespace, &client.namespace);
        if !visible {
            tracing::info!(service = %host, client_namespace = %client.namespace,
                "ServiceEntry not exported to the client namespace; not captured");
        }
        for vip in proto.vips.iter().filter(|_| visible) {
            for (p, port) in proto.ports.iter().enumerate() {
                let key = SocketAddr::new(*vip, port.number);
                if let Some((other, _)) = self.by_vip.insert(key, (index, p)) {
                    problems.push(se.origin.problem(
                        "spec.addresses",
                        format!(
                            "{key} is already captured for host {:?}",
                            self.list[other].host
                        ),
                    ));
                }
            }
        }
        for net in proto.cidrs.iter().filter(|_| visible) {
            for (p, port) in proto.ports.iter().enumerate() {
                if let Some((_, _, (other, _))) = self
                    .by_cidr
                    .iter()
                    .find(|(n, q, _)| n == net && *q == port.number)
                {
                    problems.push(se.origin.problem(
                        "spec.addresses",
                        format!(
                            "{}/{} port {} is already captured for host {:?}",
                            net.0, net.1, port.number, self.list[*other].host
                        ),
                    ));
                    continue;
                }
                self.by_cidr.push((*net, port.number, (index, p)));
            }
        }
        // Longest prefix first, so that the first range holding an address is the most specific.
        self.by_cidr
            .sort_by_key(|(net, _, _)| std::cmp::Reverse(net.1));
        self.list.push(Service {
            host: host.clone(),
            namespace: namespace.to_string(),
            entry: se.meta.name.clone(),
            source: se.origin.problem("", "").location.to_string(),
            resolution: proto.resolution,
            location: proto.location,
            vips: proto.vips.clone(),
            cidrs: proto.cidrs.clone(),
            ports: proto.ports.clone(),
            endpoints: proto.endpoints.clone(),
            telemetry: Default::default(),
        });
    }
}

/// Kubernetes keeps one object per (kind, namespace, name); a second definition is a mistake
/// (usually two versions of the same file), not a second rule.
fn unique_names<T>(kind: &str, list: &[Resource<T>], problems: &mut Vec<Problem>) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for r in list.iter().filter(|r| !r.meta.name.is_empty()) {
        let here = r.origin.problem("metadata.name", "").location.to_string();
        if let Some(first) = seen.insert(r.id(), here.clone()) {
            seen.insert(r.id(), first.clone());
            problems.push(r.origin.problem(
                "metadata.name",
                format!("{kind} {} is already defined at {first}", r.id()),
            ));
        }
    }
}

/// The client as configured, with namespace and labels taken from its WorkloadEntry when one
/// is named (labels given on the command line win).
pub(super) fn resolve_client(
    set: &ConfigSet,
    client: &Client,
    problems: &mut Vec<Problem>,
) -> Client {
    let Some(id) = &client.workload else {
        return client.clone();
    };
    match set.workload_entries.iter().find(|we| &we.id() == id) {
        Some(we) => {
            let mut labels = we.spec.labels.clone();
            labels.extend(client.labels.clone());
            // The flag wins, then the entry's `locality`, then its `istio-locality` label.
            let locality = [&client.locality, &we.spec.locality]
                .into_iter()
                .find(|l| !l.is_empty())
                .cloned()
                .or_else(|| labels.get("istio-locality").map(|l| l.replace('.', "/")))
                .unwrap_or_default();
            Client {
                namespace: we.namespace().to_string(),
                labels,
                workload: client.workload.clone(),
                locality,
            }
        }
        None => {
            problems.push(Problem {
                location: crate::config::Location {
                    file: "--client-workload".into(),
                    line: 0,
                    col: 0,
                },
                field: String::new(),
                message: format!("no WorkloadEntry {id} in the configuration"),
            });
            client.clone()
        }
    }
}

/// ServiceEntry `exportTo`: empty or `*` = everyone, `.` = own namespace, `~` = nobody.
fn exported_to(export_to: &[String], own: &str, client: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == client || (e == "." && own == client))
}

/// Validates one resource, moving its warnings and errors into the build's lists.
pub(super) fn validate<'r, S, T>(
    r: &'r Resource<S>,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Option<T>
where
    Validated<T>: TryFrom<&'r Resource<S>, Error = Invalid>,
{
    match Validated::<T>::try_from(r) {
        Ok(v) => {
            warnings.extend(v.warnings);
            Some(v.value)
        }
        Err(i) => {
            problems.extend(i.errors);
            warnings.extend(i.warnings);
            None
        }
    }
}

fn destination_rules(
    set: &ConfigSet,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<RuleEntry> {
    set.destination_rules
        .iter()
        .filter_map(|r| {
            let rule: policy::DestinationRule = validate(r, problems, warnings)?;
            Some(RuleEntry {
                rule,
                source: RuleRef {
                    id: r.id(),
                    origin: r.origin.clone(),
                },
                namespace: r.namespace().to_string(),
                age: r.age(),
            })
        })
        .collect()
}

fn peer_authentications(
    set: &ConfigSet,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<PeerEntry> {
    set.peer_authentications
        .iter()
        .filter_map(|r| {
            Some(PeerEntry {
                policy: validate(r, problems, warnings)?,
                id: r.id(),
                namespace: r.namespace().to_string(),
                age: r.age(),
            })
        })
        .collect()
}

/// The valid Telemetry resources, oldest first (creation time, then name).
fn telemetries(
    set: &ConfigSet,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<crate::telemetry::settings::Entry> {
    let mut out: Vec<_> = (set.telemetries.iter())
        .filter_map(|r| {
            Some(crate::telemetry::settings::Entry {
                policy: validate(r, problems, warnings)?,
                namespace: r.namespace().to_string(),
                id: r.id(),
                age: r.age(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.age.cmp(&b.age));
    out
}

/// The valid AuthorizationPolicies, oldest first (creation time, then name), as Istio orders
/// them.
fn authorization_policies(
    set: &ConfigSet,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<Arc<crate::authz::PolicyEntry>> {
    let mut out: Vec<_> = (set.authorization_policies.iter())
        .filter_map(|r| {
            let policy = validate(r, problems, warnings)?;
            Some((
                r.age(),
                Arc::new(crate::authz::PolicyEntry {
                    policy,
                    id: r.id().into(),
                    namespace: r.namespace().to_string(),
                }),
            ))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, e)| e).collect()
}

fn virtual_services(
    set: &ConfigSet,
    problems: &mut Vec<Problem>,
    warnings: &mut Vec<Problem>,
) -> Vec<VsEntry> {
    let mut out: Vec<VsEntry> = Vec::new();
    let mut claimed: HashMap<String, String> = HashMap::new();
    for r in &set.virtual_services {
        let Some(vs) = validate::<_, policy::VirtualService>(r, problems, warnings) else {
            continue;
        };
        if !vs.applies_to_mesh {
            let at = r.origin.problem("spec.gateways", "");
            tracing::info!(location = %at.location, vs = %r.id(), "VirtualService is bound to gateways only; not applied by drover");
        } else {
            for (i, h) in vs.hosts.iter().enumerate() {
                if let Some(other) = claimed.insert(h.clone(), r.id()) {
                    problems.push(r.origin.problem(
                        format!("spec.hosts[{i}]"),
                        format!("host {h:?} is already claimed by VirtualService {other}; sidecars take one VirtualService per host"),
                    ));
                }
            }
        }
        out.push(VsEntry {
            vs,
            source: RuleRef {
                id: r.id(),
                origin: r.origin.clone(),
            },
            namespace: r.namespace().to_string(),
            age: (r.age().0, r.id()),
            gateway: None,
        });
    }
    out
}

/// Cross-resource checks that Istio does not make but a user wants to hear about.
fn check_references(
    rules: &[RuleEntry],
    vss: &[VsEntry],
    hosts: &HashMap<String, usize>,
    warnings: &mut Vec<Problem>,
) {
    for r in rules {
        // An exact host is looked up; only a wildcard is matched against every host.
        let known = hosts.contains_key(&r.rule.host)
            || (r.rule.host.starts_with('*')
                && hosts
                    .keys()
                    .any(|h| resolve::host_match(&r.rule.host, h).is_some()));
        if !known {
            warnings.push(r.source.origin.problem(
                "spec.host",
                format!(
                    "host {:?} matches no known service; the rule is ignored",
                    r.rule.host
                ),
            ));
        }
    }
    for vs in vss.iter().filter(|v| v.vs.applies_to_mesh) {
        let routes = vs
            .vs
            .http
            .iter()
            .map(|r| ("http", r.index, &r.destinations))
            .chain(vs.vs.tcp.iter().map(|r| ("tcp", r.index, &r.destinations)))
            .chain(vs.vs.tls.iter().map(|r| ("tls", r.index, &r.destinations)));
        for (kind, i, dests) in routes {
            for d in dests {
                let field = format!("spec.{kind}[{i}].route[{}].destination", d.index);
                if !hosts.contains_key(&d.host) {
                    warnings.push(vs.source.origin.problem(
                        format!("{field}.host"),
                        format!(
                            "{:?} is not a known service; requests routed here get 503 (NC)",
                            d.host
                        ),
                    ));
                    continue;
                }
                let Some(subset) = &d.subset else { continue };
                let defined = rules.iter().any(|r| {
                    resolve::host_match(&r.rule.host, &d.host).is_some()
                        && r.rule.subsets.iter().any(|s| &s.name == subset)
                });
                if !defined {
                    warnings.push(vs.source.origin.problem(
                        format!("{field}.subset"),
                        format!("subset {subset:?} of {} is not defined by any DestinationRule; requests routed here get 503 (NC)", d.host),
                    ));
                }
            }
        }
    }
}

/// The balancer over a cluster's `members` (endpoint index, address) under its effective
/// policy, with the locality plan for `client`; and the members' hash keys (their addresses).
fn balancer(
    client: &Client,
    svc: &Service,
    members: &[&(usize, SocketAddr)],
    policy: &resolve::EffectivePolicy,
) -> (Balancer, Vec<String>) {
    let endpoint = |i: usize| &svc.endpoints[members[i].0];
    let weights: Vec<u32> = (0..members.len()).map(|i| endpoint(i).weight).collect();
    let keys: Vec<String> = members.iter().map(|(_, a)| a.to_string()).collect();
    let places: Vec<Place<'_>> = (0..members.len())
        .map(|i| Place {
            locality: &endpoint(i).locality,
            labels: &endpoint(i).labels,
            weight: endpoint(i).weight,
        })
        .collect();
    let lb = policy.load_balancer.value.as_ref();
    let plan = Plan::new(
        lb.and_then(|lb| lb.locality.as_ref()),
        policy.outlier_detection.value.is_some(),
        Place {
            locality: &client.locality,
            labels: &client.labels,
            weight: 1,
        },
        &places,
    );
    (Balancer::with_plan(lb, &weights, &keys, plan), keys)
}

/// The endpoint label that marks a workload with a mesh identity (Istio's injector sets it).
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// Whether auto mTLS applies to `endpoint` on its port `port`, as istiod decides it: the
/// endpoint carries `security.istio.io/tlsMode: istio`, and the PeerAuthentications of its own
/// namespace and labels do not `DISABLE` mTLS on that port.
fn in_mesh(peers: &[PeerEntry], svc: &Service, endpoint: &Endpoint, port: u16) -> bool {
    if endpoint.labels.get(TLS_MODE_LABEL).map(String::as_str) != Some("istio") {
        return false;
    }
    let workload = Client {
        namespace: svc.namespace.clone(),
        labels: endpoint.labels.clone(),
        workload: None,
        locality: String::new(),
    };
    InboundMtls::resolve(peers, &workload).mode(port) != Some(policy::MtlsMode::Disable)
}

/// Every cluster the client can reach: each service port's default cluster plus one per subset
/// of the DestinationRule that applies to the client.
fn clusters(reg: &Registry) -> HashMap<super::ClusterKey, Arc<Cluster>> {
    let rules: Vec<_> = reg.services.iter().map(|svc| reg.rule_for(svc)).collect();
    let count: usize = (reg.services.iter().zip(&rules))
        .map(|(svc, r)| svc.ports.len() * (1 + r.as_ref().map_or(0, |r| r.subsets.len())))
        .sum();
    let mut out = HashMap::with_capacity(count);
    for ((s, svc), rule) in reg.services.iter().enumerate().zip(rules) {
        out.extend(service_clusters(reg, (s, svc), rule.as_ref()));
    }
    out
}

/// The clusters of service `s` (`svc`) under its DestinationRule `rule`: each port's default
/// cluster and one per subset.
fn service_clusters(
    reg: &Registry,
    (s, svc): (usize, &Service),
    rule: Option<&resolve::MergedRule>,
) -> Vec<(super::ClusterKey, Arc<Cluster>)> {
    let subsets: Vec<Option<&policy::Subset>> = std::iter::once(None)
        .chain(
            rule.iter()
                .flat_map(|r| r.subsets.iter().map(|(s, _)| Some(s))),
        )
        .collect();
    let mut out = Vec::with_capacity(svc.ports.len() * subsets.len());
    for port in &svc.ports {
        for subset in &subsets {
            let name = subset.map(|s| s.name.as_str());
            let Ok(policy) = resolve::effective(rule, &svc.host, port.number, name) else {
                continue;
            };
            let selected = port.targets.iter().filter(|(i, _)| {
                subset.is_none_or(|sub| resolve::selects(&sub.labels, &svc.endpoints[*i].labels))
            });
            let members: Vec<&(usize, SocketAddr)> = selected.clone().collect();
            let (balancer, keys) = balancer(&reg.client, svc, &members, &policy);
            let cluster_name = format!(
                "outbound|{}|{}|{}",
                port.number,
                name.unwrap_or(""),
                svc.host
            );
            let stats = crate::stats::store().cluster(&cluster_name);
            let members: Vec<Member> = selected
                .map(|&(endpoint, addr)| Member {
                    endpoint,
                    addr,
                    stats: stats.endpoint(addr),
                    hbone: crate::hbone::speaks_hbone(&svc.endpoints[endpoint].labels),
                    mesh: in_mesh(&reg.peers, svc, &svc.endpoints[endpoint], addr.port()),
                })
                .collect();
            out.push((
                (s, port.number, name.map(str::to_string)),
                Arc::new(Cluster {
                    name: cluster_name,
                    tls: None,
                    auto_tls: None,
                    hbone: None,
                    service: s,
                    port: port.number,
                    subset: name.map(str::to_string),
                    limits: Arc::new(crate::breakers::Limits::new(
                        policy.connection_pool.value.as_ref(),
                        policy.retry_budget.value.as_ref(),
                        stats.clone(),
                    )),
                    stats,
                    outlier: policy
                        .outlier_detection
                        .value
                        .clone()
                        .map(|od| Arc::new(crate::outlier::ClusterDetector::new(od, keys.len()))),
                    policy,
                    members,
                    balancer: Arc::new(balancer),
                }),
            ));
        }
    }
    out
}

/// The parts of a `ServiceEntry` shared by all of its hosts (hosts are filled in by the caller).
struct ServiceProto {
    resolution: Resolution,
    location: super::MeshLocation,
    vips: Vec<IpAddr>,
    cidrs: Vec<(IpAddr, u8)>,
    ports: Vec<ServicePort>,
    endpoints: Vec<Endpoint>,
}

/// The service parts of a valid entry: its inline endpoints, then the WorkloadEntries of its
/// namespace that its `workloadSelector` matches, and each port's endpoint addresses.
fn service_entry(
    entry: policy::ServiceEntry,
    namespace: &str,
    workload_entries: &[(&Resource<WorkloadEntrySpec>, Option<Endpoint>)],
) -> ServiceProto {
    let mut endpoints = entry.endpoints;
    if let Some(sel) = &entry.workload_selector {
        for (we, ep) in workload_entries {
            if let Some(ep) = ep
                && we.namespace() == namespace
                && sel.iter().all(|(k, v)| ep.labels.get(k) == Some(v))
            {
                endpoints.push(ep.clone());
            }
        }
    }
    let ports = entry
        .ports
        .into_iter()
        .map(|p| ServicePort {
            targets: endpoints
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let port = *e.ports.get(&p.name).unwrap_or(&p.target_port);
                    (i, SocketAddr::new(e.address, port))
                })
                .collect(),
            name: p.name,
            number: p.number,
            protocol: p.protocol,
            target_port: p.target_port,
        })
        .collect();
    ServiceProto {
        resolution: entry.resolution,
        location: entry.location,
        vips: entry.vips,
        cidrs: entry.cidrs,
        ports,
        endpoints,
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, sync::Arc};

    use super::*;
    use crate::registry::Target;

    pub(crate) fn build(text: &str) -> Result<Registry, Vec<Problem>> {
        let set = ConfigSet::parse_ok("t.yaml", text);
        Registry::build(&set, &Client::default()).map_err(|r| r.errors)
    }

    #[test]
    fn cidr_addresses_are_captured_by_longest_prefix_and_dynamic_dns_is_a_located_warning() {
        let r = build(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cidr, namespace: demo}
spec:
  hosts: [cidr.example]
  addresses: [127.77.0.10, 10.9.77.1/16]
  ports: [{number: 80, name: tcp}]
  resolution: STATIC
  endpoints: [{address: 198.18.1.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: narrow, namespace: demo}
spec:
  hosts: [narrow.example]
  addresses: [10.9.3.0/24, 10.9.3.9/32]
  ports: [{number: 80, name: tcp}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: demo}
spec:
  hosts: [dns.example]
  ports: [{number: 80, name: tcp}]
  resolution: DYNAMIC_DNS
",
        )
        .expect("valid");
        let host = |a: &str| r.lookup(a.parse().unwrap()).map(|(s, _)| s.host.clone());
        assert_eq!(host("10.9.200.1:80").as_deref(), Some("cidr.example"));
        assert_eq!(
            host("10.9.3.4:80").as_deref(),
            Some("narrow.example"),
            "the /24 wins"
        );
        assert_eq!(
            host("10.9.3.9:80").as_deref(),
            Some("narrow.example"),
            "a /32 is a VIP"
        );
        assert_eq!(host("10.9.3.4:81"), None, "only the service's ports");
        assert_eq!(host("10.10.0.1:80"), None);
        // The host bits of a range are cleared; the kernel gets (range, port, service).
        let mut cidrs: Vec<_> = r.cidrs().map(|(n, p, _)| (n, p)).collect();
        cidrs.sort();
        assert_eq!(
            cidrs,
            vec![
                (("10.9.0.0".parse().unwrap(), 16), 80),
                (("10.9.3.0".parse().unwrap(), 24), 80)
            ]
        );
        // A passthrough range dials the address the workload dialed.
        let d = r.route("10.9.3.4:80".parse().unwrap(), None).unwrap();
        assert_eq!(
            d.target,
            Target::Passthrough("10.9.3.4:80".parse().unwrap())
        );
        let w: Vec<String> = r.warnings().iter().map(ToString::to_string).collect();
        assert!(
            w.iter().any(|w| w.starts_with("t.yaml:26:")
                && w.contains("spec.resolution: resolution DYNAMIC_DNS is not built yet")),
            "{w:?}"
        );
        assert_eq!(
            r.services().len(),
            2,
            "the DYNAMIC_DNS service is not captured"
        );
    }

    #[test]
    fn virtual_service_hosts_no_captured_service_answers_to_are_located_warnings() {
        let vs = "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: two, namespace: demo}\nspec:\n  hosts: [reviews, api.example.com]\n  http:\n  - route: [{destination: {host: reviews}}]\n";
        let r = build(&format!("{REVIEWS}{vs}")).expect("valid");
        let w: Vec<String> = r.warnings().iter().map(ToString::to_string).collect();
        let hits: Vec<_> = w
            .iter()
            .filter(|w| w.contains("no captured service"))
            .collect();
        assert_eq!(hits.len(), 1, "{w:?}");
        assert!(
            hits[0].contains("spec.hosts[1]") && hits[0].contains("api.example.com"),
            "{w:?}"
        );
    }

    #[test]
    fn proxy_protocol_on_an_http_port_is_a_located_warning() {
        let rule = "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pp, namespace: demo}\nspec:\n  host: reviews\n  trafficPolicy: {proxyProtocol: {version: V1}}\n";
        let r = build(&format!("{REVIEWS}{rule}")).expect("valid");
        let w: Vec<String> = r.warnings().iter().map(ToString::to_string).collect();
        let hits: Vec<_> = w
            .iter()
            .filter(|w| w.contains("spec.trafficPolicy.proxyProtocol: proxyProtocol is not enforced on HTTP port 9080"))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "one warning per field, not per cluster: {w:?}"
        );
        // maxConnections over HTTP/2 upstreams (here by h2UpgradePolicy) is not bounded either.
        let rule = rule.replace(
            "{proxyProtocol: {version: V1}}",
            "{connectionPool: {tcp: {maxConnections: 5}, http: {h2UpgradePolicy: UPGRADE}}}",
        );
        let r = build(&format!("{REVIEWS}{rule}")).expect("valid");
        let w: Vec<String> = r.warnings().iter().map(ToString::to_string).collect();
        assert!(
            w.iter().any(|w| w.contains("connectionPool.tcp.maxConnections: maxConnections is not enforced on the HTTP/2 upstream connections of port 9080")),
            "{w:?}"
        );
    }

    const REVIEWS: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: demo}
spec:
  hosts: [reviews.demo.svc.cluster.local]
  addresses: [127.77.0.10]
  ports:
  - {number: 9080, name: http, protocol: http, targetPort: 8080}
  resolution: STATIC
  workloadSelector:
    labels: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: demo}
spec: {address: 198.18.1.2, locality: us-east/zone-a, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: demo}
spec: {address: 198.18.2.2, labels: {app: reviews, version: v2}, ports: {http: 9999}, weight: 0}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: other-ns, namespace: elsewhere}
spec: {address: 198.18.3.2, labels: {app: reviews}}
";

    #[test]
    fn selects_workload_entries_and_resolves_ports() {
        let r = build(REVIEWS).unwrap();
        let vip: SocketAddr = "127.77.0.10:9080".parse().unwrap();
        let (svc, port) = r.lookup(vip).unwrap();
        assert_eq!(svc.host, "reviews.demo.svc.cluster.local");
        assert_eq!(port.protocol.as_deref(), Some("HTTP"));
        let names: Vec<_> = svc.endpoints.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["reviews-v1", "reviews-v2"]);
        assert_eq!(svc.endpoints[1].weight, 1);
        let targets: Vec<_> = port.targets.iter().map(|t| t.1.to_string()).collect();
        assert_eq!(targets, ["198.18.1.2:8080", "198.18.2.2:9999"]);
        // A v4-mapped original destination finds the same service.
        assert!(
            r.lookup("[::ffff:127.77.0.10]:9080".parse().unwrap())
                .is_some()
        );
        assert!(r.lookup("127.77.0.10:80".parse().unwrap()).is_none());
    }

    #[test]
    fn round_robin_alternates_endpoints() {
        let r = build(&format!(
            "{REVIEWS}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: rr, namespace: demo}}\nspec:\n  host: reviews\n  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}\n"
        ))
        .unwrap();
        let vip: SocketAddr = "127.77.0.10:9080".parse().unwrap();
        let picks: Vec<_> = (0..4)
            .map(|_| match r.route(vip, None).unwrap().target {
                Target::Endpoint { index, .. } => index,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);
    }

    #[test]
    fn workload_entry_weights_shape_round_robin_and_random_picks() {
        // Two WorkloadEntries weighing 1 and 3: a quarter and three quarters of the picks,
        // exactly for round robin's weighted schedule, about for RANDOM.
        let yaml = |simple: &str| {
            format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: demo}}
spec:
  hosts: [web.demo.svc.cluster.local]
  addresses: [127.77.0.10]
  ports: [{{number: 80, name: tcp, protocol: TCP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: light, namespace: demo}}
spec: {{address: 127.0.0.2, labels: {{app: web}}, weight: 1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: heavy, namespace: demo}}
spec: {{address: 127.0.0.3, labels: {{app: web}}, weight: 3}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: demo}}
spec:
  host: web.demo.svc.cluster.local
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
"
            )
        };
        let vip: SocketAddr = "127.77.0.10:80".parse().unwrap();
        let heavy_share = |simple: &str, n: usize| {
            let r = build(&yaml(simple)).unwrap();
            let heavy = (0..n)
                .filter(|_| match r.route(vip, None).unwrap().target {
                    Target::Endpoint { addr, .. } => addr.ip().to_string() == "127.0.0.3",
                    other => panic!("{other:?}"),
                })
                .count();
            heavy as f64 / n as f64
        };
        assert_eq!(heavy_share("ROUND_ROBIN", 400), 0.75);
        // Binomial sd for p=0.75, n=4000 is 0.007; ±0.04 is more than five of them.
        let random = heavy_share("RANDOM", 4000);
        assert!((0.71..=0.79).contains(&random), "{random}");
    }

    /// `reviews` (endpoints .2 and .3) with this `loadBalancer` (flow YAML).
    fn balanced(lb: &str) -> Registry {
        build(&format!(
            "{REVIEWS}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: lb, namespace: demo}}\nspec:\n  host: reviews\n  trafficPolicy: {{loadBalancer: {lb}}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn consistent_hash_table_sizes_come_from_ring_hash_minimum_ring_size_and_maglev() {
        let vip: SocketAddr = "127.77.0.10:9080".parse().unwrap();
        let share_of_first = |r: &Registry, n: usize| {
            let first = (0..n)
                .filter(|k| {
                    let mut headers = hyper::HeaderMap::new();
                    headers.insert("x-user", k.to_string().parse().unwrap());
                    let req = route::Request {
                        method: "GET",
                        scheme: "http",
                        authority: "reviews",
                        path: "/",
                        query: None,
                        headers: &headers,
                        connection: "-",
                    };
                    let d = r.route_request(vip, None, &req).unwrap();
                    matches!(d.target, Target::Endpoint { index: 0, .. })
                })
                .count();
            first as f64 / n as f64
        };
        let slots = |r: &Registry| {
            let d = r.route(vip, None).unwrap();
            d.cluster.balancer.hash_slots()
        };
        // A 7-entry Maglev table over two endpoints: one owns 3 entries, the other 4, so a
        // key space splits 3:4, not evenly as it does with the 65537-entry default.
        let maglev = balanced("{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 7}}}");
        assert_eq!(slots(&maglev), Some(7));
        let s = share_of_first(&maglev, 4000);
        assert!(
            (s - 3.0 / 7.0).abs() < 0.04 || (s - 4.0 / 7.0).abs() < 0.04,
            "{s}"
        );
        let large =
            balanced("{consistentHash: {httpHeaderName: x-user, maglev: {tableSize: 65537}}}");
        assert_eq!(slots(&large), Some(65537));
        assert!((share_of_first(&large, 4000) - 0.5).abs() < 0.04);
        // Without a table: Istio's default ring of 1024 points.
        let default = balanced("{consistentHash: {httpHeaderName: x-user}}");
        assert_eq!(slots(&default), Some(1024));
        // Ring hash: the ring has the minimum size asked for (both spellings).
        let ring =
            balanced("{consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 64}}}");
        assert_eq!(slots(&ring), Some(64));
        let old = balanced("{consistentHash: {httpHeaderName: x-user, minimumRingSize: 32}}");
        assert_eq!(slots(&old), Some(32));
        // Every key keeps its endpoint: the table is what routing reads.
        assert_eq!(share_of_first(&ring, 500), share_of_first(&ring, 500));
    }

    #[test]
    fn warmup_duration_secs_starts_endpoints_below_full_weight() {
        let vip: SocketAddr = "127.77.0.10:9080".parse().unwrap();
        let warming = |lb: &str| {
            let r = balanced(lb);
            let d = r.route(vip, None).unwrap();
            d.cluster.balancer.warmup_percent(0)
        };
        // As in Envoy, the endpoints a cluster starts with warm up too.
        assert!(warming("{simple: ROUND_ROBIN, warmupDurationSecs: 60s}") < 100.0);
        assert_eq!(warming("{simple: ROUND_ROBIN}"), 100.0);
    }

    #[test]
    fn resolution_none_passes_through_with_target_port() {
        let r = build(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec:\n  hosts: [x.example]\n  addresses: [127.77.0.9]\n  ports: [{number: 80, name: tcp, targetPort: 8080}]\n",
        )
        .unwrap();
        let t = r
            .route("127.77.0.9:80".parse().unwrap(), None)
            .unwrap()
            .target;
        assert_eq!(t, Target::Passthrough("127.77.0.9:8080".parse().unwrap()));
    }

    fn problems(text: &str) -> Vec<String> {
        build(text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn rejects_bad_services_with_locations() {
        let head =
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\nspec:\n";
        let p = problems(&format!(
            "{head}  hosts: [x]\n  addresses: [198.18.1.2]\n  resolution: STATIC\n  ports: [{{number: 80, name: tcp}}]\n  endpoints: [{{address: 198.18.1.2}}]\n"
        ));
        assert_eq!(
            p,
            [
                "t.yaml:6:15: spec.addresses[0]: address 198.18.1.2 is also an endpoint address; capture would loop"
            ]
        );

        let p = problems(&format!(
            "{head}  hosts: [x]\n  ports:\n  - {{number: 70000, name: a}}\n  - {{number: 0, name: a}}\n"
        ));
        assert!(
            p[0].starts_with("t.yaml:7:6: spec.ports[0].number: port 70000 is out of range"),
            "{p:?}"
        );
        assert!(
            p[1].contains("spec.ports[1].number: port 0 is out of range"),
            "{p:?}"
        );

        let p = problems(&format!(
            "{head}  hosts: [x]\n  ports: [{{number: 80, name: a}}, {{number: 80, name: a}}]\n"
        ));
        assert!(p.iter().any(|m| m.contains("duplicate port name")), "{p:?}");
        assert!(
            p.iter().any(|m| m.contains("duplicate port number 80")),
            "{p:?}"
        );

        let p = problems(&format!("{head}  hosts: []\n"));
        assert!(
            p[0].contains("spec.hosts: at least one host is required"),
            "{p:?}"
        );

        let p = problems(&format!(
            "{head}  hosts: [x]\n  resolution: NONE\n  endpoints: [{{address: 198.18.0.1}}]\n"
        ));
        assert!(p[0].contains("resolution NONE takes no endpoints"), "{p:?}");

        let p = problems(&format!(
            "{head}  hosts: [x]\n  resolution: STATIC\n  endpoints: [{{address: not-an-ip}}]\n"
        ));
        assert!(
            p[0].contains("spec.endpoints[0].address: \"not-an-ip\" is not an IP address"),
            "{p:?}"
        );
    }

    #[test]
    fn rejects_duplicate_hosts_and_shared_vips() {
        let se = |name: &str, host: &str, vip: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}}}\nspec:\n  hosts: [{host}]\n  addresses: [{vip}]\n  ports: [{{number: 80, name: tcp}}]\n"
            )
        };
        let p =
            problems(&(se("a", "x.example", "127.77.0.1") + &se("b", "x.example", "127.77.0.2")));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("t.yaml:14:11: spec.hosts[0]: host \"x.example\" is already defined"),
            "{p:?}"
        );
        let p =
            problems(&(se("a", "x.example", "127.77.0.1") + &se("b", "y.example", "127.77.0.1")));
        assert!(
            p[0].contains("127.77.0.1:80 is already captured for host \"x.example\""),
            "{p:?}"
        );
    }

    fn routed(extra: &str) -> Registry {
        build(&format!("{REVIEWS}---\n{extra}")).unwrap()
    }

    const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: demo}
spec:
  host: reviews.demo.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

    fn vs(http: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: demo}}\nspec:\n  hosts: [reviews]\n{http}"
        )
    }

    fn endpoint_name(r: &Registry) -> String {
        let d = r.route("127.77.0.10:9080".parse().unwrap(), None).unwrap();
        match d.target {
            Target::Endpoint { index, .. } => r.services()[d.cluster.service].endpoints[index]
                .name
                .clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn virtual_service_weights_pick_subsets() {
        let r = routed(
            &(SUBSETS.to_string()
                + &vs(
                    "  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 30}\n    - {destination: {host: reviews, subset: v2}, weight: 10}\n",
                )),
        );
        let n = 4000;
        let v1 = (0..n).filter(|_| endpoint_name(&r) == "reviews-v1").count();
        // Relative weights 30:10 → 75 % (binomial sd ≈ 0.7 %; ±4 % is > 5 sd).
        let share = v1 as f64 / n as f64;
        assert!((0.71..0.79).contains(&share), "v1 share {share}");
        let d = r.route("127.77.0.10:9080".parse().unwrap(), None).unwrap();
        assert_eq!(d.route.as_deref(), Some("demo/reviews http[0]"));
        assert!(d.cluster.name.starts_with("outbound|9080|v"));
    }

    #[test]
    fn virtual_services_bound_to_gateways_only_do_not_route_the_mesh() {
        let route = "  http:\n  - route:\n    - {destination: {host: reviews, subset: v2}}\n";
        for (gateways, routed_by_vs) in [
            ("  gateways: [ingress]\n", false),
            ("  gateways: [ingress, mesh]\n", true),
            ("", true),
        ] {
            let r = routed(&(SUBSETS.to_string() + &vs(&format!("{gateways}{route}"))));
            let d = r.route("127.77.0.10:9080".parse().unwrap(), None).unwrap();
            assert_eq!(d.route.is_some(), routed_by_vs, "{gateways:?}");
            assert_eq!(
                d.cluster.name.contains("|v2|"),
                routed_by_vs,
                "{gateways:?}"
            );
        }
    }

    #[test]
    fn route_failures_map_to_envoy_flags() {
        let vip: SocketAddr = "127.77.0.10:9080".parse().unwrap();
        // A subset no DestinationRule defines: cluster not found.
        let r = routed(&vs(
            "  http:\n  - route: [{destination: {host: reviews, subset: v9}}]\n",
        ));
        let e = r.route(vip, None).unwrap_err();
        assert_eq!((e.response_flag().code(), e.http_status()), ("NC", 503));
        assert!(e.to_string().contains("subset \"v9\""), "{e}");
        assert!(
            r.warnings()
                .iter()
                .any(|w| w.field == "spec.http[0].route[0].destination.subset"),
            "{:?}",
            r.warnings()
        );
        // A subset whose labels match no endpoint: no healthy upstream.
        let r = routed(
            &(SUBSETS.to_string()
                + &vs("  http:\n  - route: [{destination: {host: reviews, subset: v3}}]\n")),
        );
        let e = r.route(vip, None).unwrap_err();
        assert_eq!((e.response_flag().code(), e.http_status()), ("UH", 503));
        // The VirtualService claims the host but no route applies on the L4 path: 404 NR.
        let r = routed(&vs(
            "  http:\n  - match: [{uri: {prefix: /api}}]\n    route: [{destination: {host: reviews}}]\n",
        ));
        let e = r.route(vip, None).unwrap_err();
        assert_eq!((e.response_flag().code(), e.http_status()), ("NR", 404));
        // Without a VirtualService the default cluster serves every endpoint.
        let r = routed(SUBSETS);
        let d = r.route(vip, None).unwrap();
        assert_eq!(
            d.cluster.name,
            "outbound|9080||reviews.demo.svc.cluster.local"
        );
        assert_eq!(d.cluster.members.len(), 2);
    }

    #[test]
    fn passthrough_balancer_dials_the_original_destination() {
        let r = routed(&SUBSETS.replace(
            "  subsets:",
            "  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n  subsets:",
        ));
        let d = r.route("127.77.0.10:9080".parse().unwrap(), None).unwrap();
        assert_eq!(
            d.target,
            Target::Passthrough("127.77.0.10:8080".parse().unwrap())
        );
    }

    #[test]
    fn duplicate_resources_and_vs_hosts_are_errors() {
        let p = problems(&format!("{REVIEWS}---\n{SUBSETS}---\n{SUBSETS}"));
        assert!(
            p.iter().any(|m| m.contains(
                "metadata.name: DestinationRule demo/reviews is already defined at t.yaml:"
            )),
            "{p:?}"
        );
        let twice = vs("  http:\n  - route: [{destination: {host: reviews}}]\n");
        let p = problems(&format!(
            "{REVIEWS}{twice}{}",
            twice.replace("name: reviews,", "name: reviews2,")
        ));
        assert!(
            p.iter()
                .any(|m| m.contains("is already claimed by VirtualService demo/reviews")),
            "{p:?}"
        );
    }

    #[test]
    fn client_identity_from_workload_entry_and_export_to() {
        let mut set = ConfigSet::default();
        let mut parse_problems = Vec::new();
        let text = format!(
            "{REVIEWS}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: private, namespace: demo}}\nspec:\n  hosts: [private.demo]\n  addresses: [127.77.0.11]\n  exportTo: [.]\n  ports: [{{number: 80, name: tcp, protocol: TCP}}]\n"
        );
        set.add_text(
            Arc::new(PathBuf::from("t.yaml")),
            &text,
            &mut parse_problems,
        );
        assert!(parse_problems.is_empty());
        let client = Client {
            workload: Some("demo/reviews-v1".into()),
            ..Client::default()
        };
        let r = Registry::build(&set, &client).unwrap();
        assert_eq!(r.client().namespace, "demo");
        assert_eq!(r.client().labels["version"], "v1");
        assert_eq!(r.client().locality, "us-east/zone-a", "from the entry");
        let flagged = Client {
            locality: "eu/zone-b".into(),
            ..client.clone()
        };
        let r2 = Registry::build(&set, &flagged).unwrap();
        assert_eq!(r2.client().locality, "eu/zone-b", "the flag wins");
        // Exported to "." (demo): captured for a demo client, not for one in default.
        assert!(r.lookup("127.77.0.11:80".parse().unwrap()).is_some());
        let r = Registry::build(&set, &Client::default()).unwrap();
        assert!(r.lookup("127.77.0.11:80".parse().unwrap()).is_none());
        let missing = Client {
            workload: Some("demo/nope".into()),
            ..Client::default()
        };
        let e = Registry::build(&set, &missing).unwrap_err();
        assert!(e.errors[0].message.contains("no WorkloadEntry demo/nope"));
        let p = problems(&REVIEWS.replace("protocol: http", "protocol: htp"));
        assert!(
            p.iter().any(|m| m.contains("unknown protocol \"htp\"")),
            "{p:?}"
        );
    }
}
