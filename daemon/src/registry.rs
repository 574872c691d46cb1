//! The service registry: `ServiceEntry` and `WorkloadEntry` resources turned into services,
//! ports and endpoints, indexed by the (VIP, port) that capture hands the proxy, together with the
//! `DestinationRule`s and `VirtualService`s (and the Gateway API routes, bound into the same
//! route model by [`mesh_routes`]) that shape them, resolved for the daemon's client into
//! clusters `(host, port, subset)` that each carry their endpoints and effective policy.
//!
//! A [`Registry`] is an immutable snapshot, validated as a whole when it is built; the proxy
//! reads the current one through [`RegistryHandle`] and never sees a half-applied change.

mod build;
pub mod explain;
pub mod mesh_routes;
pub mod peer;
pub mod relevance;
pub mod resolve;
pub mod route;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;

pub use crate::config::{
    crd::{Location as MeshLocation, Resolution},
    policy::Endpoint,
};
use crate::{
    balance::Balancer,
    config::{Problem, policy, source::Resource},
};
pub use build::TLS_MODE_LABEL;
pub use resolve::{Client, EffectivePolicy, RuleEntry, RuleRef};
pub use route::{Decision, RouteError, Target};

/// A service: one host of a `ServiceEntry`.
#[derive(Debug)]
pub struct Service {
    pub host: String,
    pub namespace: String,
    /// Name of the `ServiceEntry` it came from.
    pub entry: String,
    /// Where that entry was defined: `file:line:col`, or `Service namespace/name` for one
    /// derived from a Kubernetes Service (and its EndpointSlices and Pods).
    pub source: String,
    pub resolution: Resolution,
    pub location: MeshLocation,
    /// Exact VIPs captured for this service.
    pub vips: Vec<IpAddr>,
    /// Address ranges captured for this service: (network address, prefix length).
    pub cidrs: Vec<(IpAddr, u8)>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Its and its endpoints' labels in the standard metrics, on first use.
    pub telemetry: std::sync::OnceLock<crate::telemetry::Destinations>,
}

impl Service {
    /// Its and its endpoints' labels in the standard metrics.
    pub fn telemetry(&self) -> &crate::telemetry::Destinations {
        self.telemetry.get_or_init(|| {
            crate::telemetry::Destinations::new(&self.host, &self.namespace, &self.endpoints)
        })
    }
}

/// A port of a service, with its per-port endpoint addresses.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: String,
    pub number: u16,
    /// Upper-cased protocol as written (`HTTP`, `TCP`, …), if any.
    pub protocol: Option<String>,
    /// Port on the endpoint when the endpoint does not name one; defaults to `number`.
    pub target_port: u16,
    /// (index into `Service::endpoints`, address to dial) for every endpoint of this port.
    pub targets: Vec<(usize, SocketAddr)>,
}

/// Istio's unit of policy: `outbound|<port>|<subset>|<host>`, with its own endpoints, balancer
/// state and effective policy.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub service: usize,
    pub port: u16,
    pub subset: Option<String>,
    pub policy: EffectivePolicy,
    /// Endpoints of the service port selected by the subset's labels, in the balancer's order
    /// (a pick is an index into this list).
    pub members: Vec<Member>,
    /// Selection over `members`, built from the effective `loadBalancer`.
    pub balancer: Arc<Balancer>,
    /// Outlier detection over `members`, when the effective policy has the block.
    pub outlier: Option<Arc<crate::outlier::ClusterDetector>>,
    /// Cluster-wide circuit breakers from the effective `connectionPool`.
    pub limits: Arc<crate::breakers::Limits>,
    /// Counters of the cluster (kept across reloads by name).
    pub stats: std::sync::Arc<crate::stats::ClusterStats>,
    /// TLS origination (`tls` other than `DISABLE`), set by [`Registry::originate`].
    pub tls: Option<Arc<crate::tls::Origination>>,
    /// Istio's auto mTLS: with no `tls` in the effective policy and a mesh identity, the
    /// ISTIO_MUTUAL origination for the members marked [`Member::mesh`]; the others get
    /// plaintext. Set by [`Registry::originate`].
    pub auto_tls: Option<Arc<crate::tls::Origination>>,
    /// HBONE to the members marked [`Member::hbone`] (with no `tls` in the effective policy and a
    /// mesh identity): who we are and who each of them must be. Set by [`Registry::originate`].
    pub hbone: Option<Arc<crate::hbone::Target>>,
}

/// One endpoint of a cluster.
#[derive(Debug)]
pub struct Member {
    /// Index into the service's `endpoints`.
    pub endpoint: usize,
    /// Where to dial it: its address, and its port for this service port.
    pub addr: SocketAddr,
    /// Its counters (kept across reloads by address).
    pub stats: Arc<crate::stats::EndpointStats>,
    /// It has a mesh identity (`security.istio.io/tlsMode: istio`, as injected workloads are
    /// labelled) and no PeerAuthentication `DISABLE`s its port: auto mTLS applies to it.
    pub mesh: bool,
    /// It is reached over HBONE (labelled or annotated `ambient.istio.io/redirection: enabled`,
    /// as istio-cni marks the pods it enrolled, or `networking.istio.io/tunnel: http`); wins
    /// over `mesh`.
    pub hbone: bool,
}

/// A validated VirtualService with where it came from.
#[derive(Clone, Debug)]
pub struct VsEntry {
    pub vs: policy::VirtualService,
    pub source: RuleRef,
    pub namespace: String,
    /// (creation time, `namespace/name`): when a VirtualService and Gateway API routes bind
    /// the same host, the older applies (as Istio orders them).
    pub age: (String, String),
    /// Set for the routes of the Gateway API bound to this host.
    pub gateway: Option<mesh_routes::GatewayBinding>,
}

type ClusterKey = (usize, u16, Option<String>);

/// An immutable, validated snapshot of all services and their policy, for one [`Client`].
#[derive(Debug)]
///
/// What does not depend on the client is shared (`Arc`) with the snapshots it was derived from
/// by [`Registry::patch`]: a change of one service's endpoints replaces that service and its
/// clusters and shares every other one, with its live state.
pub struct Registry {
    services: Vec<Arc<Service>>,
    by_vip: Arc<HashMap<SocketAddr, (usize, usize)>>,
    /// Captured ranges, longest prefix first: ((network, length), port, (service, port index)).
    by_cidr: Arc<Vec<CidrEntry>>,
    by_host: Arc<HashMap<String, usize>>,
    rules: Arc<Vec<RuleEntry>>,
    rules_by_ns: Arc<resolve::RulesByNamespace>,
    virtual_services: Arc<Vec<VsEntry>>,
    client: Client,
    /// The inbound mTLS of the client (its `PeerAuthentication`s composed).
    inbound: peer::InboundMtls,
    /// Every valid PeerAuthentication (auto mTLS reads them per endpoint).
    peers: Arc<Vec<peer::PeerEntry>>,
    /// Every valid AuthorizationPolicy, oldest first (each inbound side picks its own).
    authorization: Arc<Vec<Arc<crate::authz::PolicyEntry>>>,
    clusters: HashMap<ClusterKey, Arc<Cluster>>,
    warnings: Arc<Vec<Problem>>,
    config: Arc<crate::config::source::ConfigSet>,
    /// Objects patched in since `config` was loaded.
    patched: Arc<Patched>,
    /// What [`Registry::originate`] read TLS material with (patched clusters use it too).
    credentials: Option<crate::tls::Credentials>,
    /// Every valid Telemetry resource, oldest first.
    telemetry: Arc<Vec<crate::telemetry::settings::Entry>>,
    /// Workloads by address (see [`Registry::workload_at`]); on first use.
    by_address: std::sync::OnceLock<HashMap<IpAddr, WorkloadAt>>,
}

/// The objects [`Registry::patch`] put in place of their loaded versions, by id (`Kind
/// namespace/name`), newest version.
#[derive(Clone, Debug, Default)]
struct Patched {
    entries: BTreeMap<String, Resource<crate::config::crd::ServiceEntrySpec>>,
    rules: BTreeMap<String, Resource<crate::config::crd::DestinationRuleSpec>>,
}

/// A workload's first service and its labels in the standard metrics.
type WorkloadAt = (
    Option<Arc<crate::telemetry::ServiceName>>,
    crate::telemetry::Workload,
);

/// A captured range: ((network, prefix length), port, (service index, port index)).
type CidrEntry = ((IpAddr, u8), u16, (usize, usize));

/// Cloneable handle to the current [`Registry`] snapshot.
#[derive(Clone, Debug)]
pub struct RegistryHandle {
    current: Arc<ArcSwap<Registry>>,
}

// === impl Client ===

impl Default for Client {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            labels: BTreeMap::new(),
            workload: None,
            locality: String::new(),
        }
    }
}

// === impl Registry ===

impl Registry {
    /// Every service, in configuration order.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// Every captured range: ((network, prefix length), port, index of its service).
    pub fn cidrs(&self) -> impl Iterator<Item = ((IpAddr, u8), u16, usize)> + '_ {
        self.by_cidr
            .iter()
            .map(|(net, port, (svc, _))| (*net, *port, *svc))
    }

    /// The (service, port) indices owning a captured destination: its exact VIP, else the
    /// longest captured range that holds it on that port.
    fn owner(&self, orig: SocketAddr) -> Option<(usize, usize)> {
        let orig = SocketAddr::new(orig.ip().to_canonical(), orig.port());
        self.by_vip.get(&orig).copied().or_else(|| {
            self.by_cidr
                .iter()
                .find(|(net, port, _)| *port == orig.port() && route::in_subnet(orig.ip(), *net))
                .map(|(_, _, at)| *at)
        })
    }

    /// Every captured (VIP, port) with the index of its service.
    pub fn vips(&self) -> impl Iterator<Item = (SocketAddr, usize)> + '_ {
        self.by_vip.iter().map(|(addr, (svc, _))| (*addr, *svc))
    }

    /// Non-fatal findings of the build (unknown fields, deprecated spellings, routes to
    /// undefined subsets), located.
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// What the data path reads of this snapshot for its client, canonically ordered: its
    /// services and captured addresses, each cluster with its effective policy, members and
    /// locality plan, the
    /// inbound mTLS, and which route matches hold for the client (`sourceLabels`,
    /// `sourceNamespace`, visibility). Snapshots with equal fingerprints serve a connection
    /// alike; the client itself is left out (see [`relevance`]).
    #[cfg(test)]
    pub fn fingerprint(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut vips: Vec<_> = self.by_vip.iter().collect();
        vips.sort();
        let mut hosts: Vec<_> = self.by_host.iter().collect();
        hosts.sort();
        let _ = writeln!(
            out,
            "{:?}\n{vips:?}\n{:?}\n{hosts:?}",
            self.services, self.by_cidr
        );
        let _ = writeln!(out, "{:?}\n{:?}", self.inbound, self.warnings);
        let mut clusters: Vec<_> = self.clusters.iter().collect();
        clusters.sort_by(|a, b| a.0.cmp(b.0));
        for (key, c) in clusters {
            let members: Vec<_> = (c.members.iter())
                .map(|m| (m.endpoint, m.addr, m.mesh))
                .collect();
            let plan = c.balancer.plan();
            let _ = writeln!(
                out,
                "{key:?} {} {:?} {members:?} {plan:?}",
                c.name, c.policy
            );
        }
        let client = &self.client;
        let holds = |labels: &BTreeMap<String, String>, ns: &Option<String>| {
            resolve::selects(labels, &client.labels)
                && ns.as_ref().is_none_or(|n| *n == client.namespace)
        };
        for svc in &self.services {
            let vs = self.virtual_service_for(&svc.host);
            let _ = write!(out, "{} → {:?}", svc.host, vs.map(|v| &v.source));
            if let Some(v) = vs {
                let http = (v.vs.http.iter()).flat_map(|r| &r.matches);
                let http: Vec<bool> = http
                    .map(|m| holds(&m.source_labels, &m.source_namespace))
                    .collect();
                let l4 = (v.vs.tcp.iter().chain(&v.vs.tls)).flat_map(|r| &r.matches);
                let l4: Vec<bool> = l4
                    .map(|m| holds(&m.source_labels, &m.source_namespace))
                    .collect();
                let _ = write!(out, " {http:?} {l4:?}");
            }
            out.push('\n');
        }
        out
    }

    /// The workload at `ip` as the standard metrics name it (an endpoint of some service, else
    /// a WorkloadEntry of the configuration), and the first service it backs.
    pub fn workload_at(&self, ip: IpAddr) -> Option<&WorkloadAt> {
        let index = self.by_address.get_or_init(|| {
            let mut m = HashMap::new();
            for svc in &self.services {
                let d = svc.telemetry();
                for (ep, w) in svc.endpoints.iter().zip(&d.endpoints) {
                    m.entry(ep.address)
                        .or_insert_with(|| (Some(d.service.clone()), w.clone()));
                }
            }
            for we in &self.config.workload_entries {
                let Ok(address) = we.spec.address.parse::<IpAddr>() else {
                    continue;
                };
                m.entry(address).or_insert_with(|| {
                    let ns = we.namespace();
                    let peer =
                        crate::telemetry::Peer::new(Some(&we.meta.name), ns, &we.spec.labels, None);
                    let principal = (!we.spec.service_account.is_empty())
                        .then(|| crate::telemetry::principal(ns, &we.spec.service_account));
                    (None, crate::telemetry::Workload::new(peer, principal))
                });
            }
            m
        });
        index.get(&ip)
    }

    /// What the Telemetry resources say for a workload in `namespace` with `labels`.
    pub fn telemetry_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> crate::telemetry::Settings {
        crate::telemetry::Settings::resolve(
            &self.telemetry,
            crate::config::validate::peer_authentication::ROOT_NAMESPACE,
            namespace,
            labels,
        )
    }

    /// The client this snapshot was resolved for.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The client's inbound mTLS (its `PeerAuthentication`s composed).
    pub fn inbound_mtls(&self) -> &peer::InboundMtls {
        &self.inbound
    }

    /// Every valid AuthorizationPolicy, oldest first.
    pub fn authorization_policies(&self) -> &[Arc<crate::authz::PolicyEntry>] {
        &self.authorization
    }

    /// The AuthorizationPolicies that apply to the inbound side of this snapshot's client at
    /// `addresses` (`targetRefs` apply where one of them is an endpoint of the Service).
    pub fn authorizer(&self, addresses: &[std::net::IpAddr]) -> crate::authz::Authorizer {
        crate::authz::Authorizer::for_workload(
            &self.authorization,
            &self.client.namespace,
            &self.client.labels,
            |host| {
                (self.by_host.get(host)).is_some_and(|&s| {
                    (self.services[s].endpoints.iter()).any(|e| addresses.contains(&e.address))
                })
            },
        )
    }

    /// The workload ports at `addresses` that a service port declares, and whether they speak
    /// HTTP: by the port's `protocol`, else by its name's prefix (`http`, `http2`, `grpc`…
    /// against `tcp`, `tls`, `mongo`…), as Istio reads ports. Ports left out are sniffed.
    pub fn declared_http(
        &self,
        addresses: &[std::net::IpAddr],
    ) -> std::collections::HashMap<u16, bool> {
        let mut out = std::collections::HashMap::new();
        for svc in &self.services {
            for port in &svc.ports {
                let http = match port.protocol.as_deref() {
                    Some(p) => Some(route::is_http(Some(p))),
                    None => {
                        let prefix = port.name.split('-').next().unwrap_or_default();
                        match prefix.to_ascii_lowercase().as_str() {
                            "http" | "http2" | "grpc" | "grpc-web" => Some(true),
                            "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" => Some(false),
                            _ => None,
                        }
                    }
                };
                let Some(http) = http else { continue };
                for (_, addr) in &port.targets {
                    if addresses.contains(&addr.ip()) {
                        out.insert(addr.port(), http);
                    }
                }
            }
        }
        out
    }

    /// Every validated DestinationRule.
    pub fn rules(&self) -> &[RuleEntry] {
        &self.rules
    }

    /// The service and port that own a captured original destination.
    pub fn lookup(&self, orig: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let (s, p) = self.owner(orig)?;
        let svc = &self.services[s];
        Some((svc, &svc.ports[p]))
    }

    /// A service by host name.
    pub fn service(&self, host: &str) -> Option<(usize, &Service)> {
        self.by_host.get(host).map(|i| (*i, &*self.services[*i]))
    }

    /// Every cluster of this snapshot (unordered).
    pub fn clusters(&self) -> impl Iterator<Item = &Cluster> + '_ {
        self.clusters.values().map(|c| &**c)
    }

    /// Keeps the live state of clusters that a reload did not change: a cluster with the same
    /// name, endpoints, locality plan and `loadBalancer`/`connectionPool`/`outlierDetection`
    /// values takes over the previous snapshot's balancer (in-flight counts), circuit breakers
    /// (slots held by open connections) and outlier detector (ejections). Changed clusters start
    /// afresh, as Envoy rebuilds a cluster whose configuration changed; when only the endpoints
    /// changed (an EDS update in Envoy), the endpoints that stay keep when they joined, so only
    /// new ones warm up.
    pub fn inherit(&mut self, prev: &Registry) {
        for (key, c) in self.clusters.iter_mut() {
            // Shared with `prev` (a patch left it alone), or already inherited by its other
            // holder: its state is the live one.
            let Some(c) = Arc::get_mut(c) else {
                continue;
            };
            let Some(old) = prev.clusters.get(key) else {
                continue;
            };
            let same_policy = old.name == c.name
                && old.policy.load_balancer.value == c.policy.load_balancer.value
                && old.policy.connection_pool.value == c.policy.connection_pool.value
                && old.policy.outlier_detection.value == c.policy.outlier_detection.value;
            let same_members = old
                .members
                .iter()
                .map(|m| (m.endpoint, m.addr))
                .eq(c.members.iter().map(|m| (m.endpoint, m.addr)))
                && old.balancer.plan() == c.balancer.plan();
            if same_policy && same_members {
                c.balancer = old.balancer.clone();
                c.limits = old.limits.clone();
                c.outlier = old.outlier.clone();
            } else if same_policy {
                let was = |i: usize| old.members.iter().position(|m| m.addr == c.members[i].addr);
                c.balancer.inherit_joined(&old.balancer, was);
            }
        }
    }

    /// Reads every cluster's TLS files (certificates, keys, CA bundles, CRLs, `credentialName`
    /// secrets) and builds its origination; every problem is reported with the DestinationRule
    /// field that asked for it.
    pub fn originate(&mut self, credentials: &crate::tls::Credentials) -> Result<(), Vec<Problem>> {
        let mut problems = std::collections::BTreeMap::new();
        for c in self.clusters.values_mut() {
            // Fresh from the build: no other holder yet.
            if let Some(c) = Arc::get_mut(c) {
                originate(&self.services, c, credentials, &mut problems);
            }
        }
        self.credentials = Some(credentials.clone());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.into_values().collect())
        }
    }

    /// Every file a cluster's TLS origination was read from.
    pub fn tls_files(&self) -> std::collections::BTreeSet<std::path::PathBuf> {
        self.clusters
            .values()
            .filter_map(|c| c.tls.as_ref())
            .flat_map(|t| t.files.iter().cloned())
            .collect()
    }

    /// The configuration this snapshot was built from, as loaded (before any
    /// [`Registry::patch`]), shared.
    pub fn shared_config(&self) -> Arc<crate::config::source::ConfigSet> {
        self.config.clone()
    }

    /// The configuration this snapshot was built from.
    pub fn config(&self) -> std::borrow::Cow<'_, crate::config::source::ConfigSet> {
        let Patched { entries, rules } = &*self.patched;
        if entries.is_empty() && rules.is_empty() {
            return std::borrow::Cow::Borrowed(&self.config);
        }
        fn overlay<T: Clone>(list: &mut [Resource<T>], patched: &BTreeMap<String, Resource<T>>) {
            for r in list {
                if let Some(new) = patched.get(&r.origin.file.display().to_string()) {
                    *r = new.clone();
                }
            }
        }
        let mut set = (*self.config).clone();
        overlay(&mut set.service_entries, entries);
        overlay(&mut set.destination_rules, rules);
        std::borrow::Cow::Owned(set)
    }

    /// The cluster `(service, port, subset)`, if it exists for this client.
    pub fn cluster(&self, service: usize, port: u16, subset: Option<&str>) -> Option<&Cluster> {
        self.clusters
            .get(&(service, port, subset.map(str::to_string)))
            .map(|c| &**c)
    }

    /// The mesh identity this snapshot's workload presents (`ISTIO_MUTUAL`, inbound, HBONE).
    pub fn mesh_identity(&self) -> Option<&crate::mesh::IdentityFiles> {
        self.credentials.as_ref()?.mesh.as_ref()
    }

    /// The DestinationRule this snapshot's client uses for a service.
    pub fn rule_for(&self, svc: &Service) -> Option<resolve::MergedRule> {
        let rules = (&self.rules[..], &*self.rules_by_ns);
        resolve::rule_for(rules, &self.client, &svc.host, &svc.namespace)
    }
}

/// Builds cluster `c`'s TLS origination (its `tls`, else auto mTLS) from `credentials`; a
/// problem is recorded under the DestinationRule field that asked for it.
fn originate(
    services: &[Arc<Service>],
    c: &mut Cluster,
    credentials: &crate::tls::Credentials,
    problems: &mut std::collections::BTreeMap<String, Problem>,
) {
    if let (None, Some(source)) = (&c.policy.tls.value, &credentials.mesh)
        && c.members.iter().any(|m| m.hbone)
    {
        let svc = &services[c.service];
        let peers = (c.members.iter().filter(|m| m.hbone))
            .map(|m| {
                let sa = &svc.endpoints[m.endpoint].service_account;
                let sa = if sa.is_empty() { "default" } else { sa };
                let id = crate::mesh::spiffe_id(&source.trust_domain, &svc.namespace, sa);
                (m.addr.ip(), id)
            })
            .collect();
        c.hbone = Some(Arc::new(crate::hbone::Target {
            source: source.clone(),
            peers,
        }));
    }
    let auto = c.policy.tls.value.is_none()
        && credentials.mesh.is_some()
        && c.members.iter().any(|m| m.mesh && !m.hbone);
    let (tls, from) = match (&c.policy.tls.value, &c.policy.tls.from) {
        (Some(tls), Some(from)) => (tls, Some(from)),
        _ if auto => (&*crate::tls::ISTIO_MUTUAL, None),
        _ => return,
    };
    let protocol = services[c.service]
        .ports
        .iter()
        .find(|p| p.number == c.port)
        .and_then(|p| p.protocol.clone());
    let (h2, http) = (
        route::is_h2(protocol.as_deref()),
        route::is_http(protocol.as_deref()),
    );
    let svc = &services[c.service];
    let mesh = crate::tls::MeshTarget {
        sni: format!(
            "outbound_.{}_.{}_.{}",
            c.port,
            c.subset.as_deref().unwrap_or(""),
            svc.host
        ),
        identities: credentials.mesh.as_ref().map_or_else(Vec::new, |m| {
            let mut ids: Vec<String> = svc
                .endpoints
                .iter()
                .filter(|e| !e.service_account.is_empty())
                .map(|e| {
                    crate::mesh::spiffe_id(&m.trust_domain, &svc.namespace, &e.service_account)
                })
                .collect();
            ids.sort();
            ids.dedup();
            ids
        }),
    };
    match (
        crate::tls::Origination::new(tls, h2, http, credentials, &mesh),
        from,
    ) {
        (Ok(o), Some(_)) => c.tls = o.map(Arc::new),
        (Ok(o), None) => c.auto_tls = o.map(Arc::new),
        (Err(e), Some((rule, path))) => {
            let p = rule.origin.problem(path.clone(), e.to_string());
            problems.insert(p.to_string(), p);
        }
        // Auto mTLS with a mesh identity cannot fail on files; if it did, plaintext.
        (Err(e), None) => {
            tracing::warn!(cluster = %c.name, error = %e, "auto mTLS unavailable")
        }
    }
}

// === impl RegistryHandle ===

impl RegistryHandle {
    pub fn new(registry: Registry) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(registry)),
        }
    }

    /// A handle whose first snapshot is shared with others.
    pub fn from_arc(registry: Arc<Registry>) -> Self {
        Self {
            current: Arc::new(ArcSwap::new(registry)),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Replaces the snapshot atomically; readers holding the old one keep it until they drop it.
    pub fn store(&self, registry: Registry) {
        self.current.store(Arc::new(registry));
    }

    /// Replaces the snapshot with one shared with other handles.
    pub fn store_arc(&self, registry: Arc<Registry>) {
        self.current.store(registry);
    }
}
