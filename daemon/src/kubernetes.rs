//! Kubernetes mode: the daemon learns services, endpoints and Istio resources from the API server
//! as istiod would, and feeds them into the same validated model as file configuration.
//!
//! [`watch`] keeps one watcher per kind (Service, EndpointSlice, Pod, Node, Namespace and the
//! Istio kinds the API server serves) and writes what they see into a [`Feed`]; [`convert`] derives a
//! `ServiceEntry` from each Service and its EndpointSlices; the reloader
//! ([`crate::reload`]) renders the feed into a [`ConfigSet`] beside the files and builds one
//! snapshot from both — or, when only endpoint sets and DestinationRules changed since the feed
//! was last rendered whole, takes just the changed Services' new ServiceEntries and the new
//! DestinationRules ([`Feed::changes`]) and patches the served snapshots with them.
//!
//! Invariants: every API object is validated on its own terms: one that is malformed or
//! invalid is rejected alone (logged once per version with `Kind namespace/name: field: reason`
//! and counted), and its last valid version keeps serving (none, if it never had one); a
//! watcher that restarts or relists replaces its kind's objects only once the relist is complete,
//! so a dropped watch never empties the snapshot; the feed is "synced" only once every watcher
//! has listed once.

pub mod convert;
mod watch;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::sync::{Notify, watch as signal};

use crate::config::{
    Problem, crd,
    source::{ConfigSet, Origin, Resource},
};
use convert::{Derived, NodeLocality, PodInfo};
pub use watch::{spawn, watched};

/// How often the Istio kinds the API server did not serve are looked for again.
pub const DISCOVERY_RECHECK: Duration = Duration::from_secs(5);

/// `drover run --kubernetes` settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `None`: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub cluster_domain: String,
}

/// Errors reaching the API server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--kubernetes needs the node's name: pass --node-name or set NODE_NAME")]
    NoNodeName,
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error(
        "in-cluster configuration (service account token, KUBERNETES_SERVICE_HOST): {0}; outside a cluster pass --kubeconfig FILE"
    )]
    InCluster(String),
    #[error("kubernetes client for {url} ({credentials}): {reason}")]
    Client {
        url: String,
        credentials: String,
        reason: String,
    },
}

/// `(namespace, name)`.
type Key = (String, String);

/// A pod of this node, as reconciliation needs it.
#[derive(Clone, Debug)]
pub struct NodePod {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<std::net::IpAddr>,
    pub uid: Option<String>,
}

/// What the watchers have seen, shared with the reloader. Cheap to clone.
#[derive(Clone)]
pub struct Feed {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    domain: String,
    /// Woken on every change.
    changed: Notify,
    /// Names of the watchers that have listed once.
    synced: signal::Sender<HashSet<&'static str>>,
    /// Watchers whose first list is awaited before the feed counts as synced.
    expected: Mutex<HashSet<&'static str>>,
    /// Watchers whose last outcome was an error (no event or relist since): what they hold may
    /// be stale.
    failing: Mutex<HashSet<&'static str>>,
    pub(crate) counters: Counters,
}

/// Counters of the API side (exported by the admin API).
#[derive(Default, serde::Serialize)]
pub struct Counters {
    /// API objects rejected as invalid (each version once).
    pub rejected: AtomicU64,
    /// Watch errors (dropped connections, refused requests, 410 Gone) the watchers recovered from.
    pub watch_errors: AtomicU64,
    /// Complete relists (the first list included).
    pub relists: AtomicU64,
    /// Pods of this node that a reconciliation pass could not enrol (each attempt; retried on
    /// the next pass).
    pub reconcile_failures: AtomicU64,
    /// Events that changed nothing a snapshot reads (a `Node` status heartbeat, a Pod status
    /// field no rule uses): no rebuild.
    pub skipped: AtomicU64,
    /// Istio kinds the API server serves but refuses to list (RBAC, a broken conversion
    /// webhook), with the error: the daemon serves without them and keeps retrying.
    pub unavailable: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

#[derive(Default)]
struct State {
    services: BTreeMap<Key, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    pods: HashMap<Key, PodInfo>,
    nodes: NodeLocality,
    /// Namespace → its labels (shown with a workload's identity; no snapshot reads them).
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Istio resources by (kind, namespace, name), as JSON.
    istio: BTreeMap<(&'static str, Key), serde_json::Value>,
    /// The last version of each object (by id) that was part of a snapshot that served.
    last_good: HashMap<String, Body>,
    /// What was last reported about an object (rejection or skip), so each is logged once.
    reported: HashMap<String, String>,
    /// Each Service's derivation, until something it was derived from changes.
    derived: HashMap<Key, Derivation>,
    /// The Services whose slices name each pod (seen or not yet): its change invalidates them.
    pod_refs: HashMap<Key, HashSet<Key>>,
    /// What changed since the feed was last rendered whole.
    pending: Pending,
}

/// What changed since the feed was last rendered whole ([`Feed::documents`]).
#[derive(Default)]
struct Pending {
    /// Something besides endpoint sets changed (a Service, a Node, an Istio object, a relist):
    /// only a full build can tell what it affects.
    full: bool,
    /// Services whose endpoint sets may have changed (a slice or a pod they name changed).
    services: HashSet<Key>,
    /// DestinationRules that were applied (a new version, or a new rule).
    rules: HashSet<Key>,
    /// Pods that came, changed or went (a workload's identity may be one of them).
    pods: HashSet<Key>,
}

/// What changed in the feed since it was last rendered whole, for the reloader to apply.
pub enum Changes {
    /// Only a full build can tell.
    Full,
    /// Only endpoint sets and DestinationRules changed: the new versions of the Services whose
    /// derivation changed and of the DestinationRules applied, and the pods that changed, with
    /// their addresses now (none once deleted).
    Patches {
        patches: Vec<Patch>,
        pods: Vec<(Key, Vec<std::net::IpAddr>)>,
    },
}

/// The new version of an object: a Service's ServiceEntry or a DestinationRule.
pub struct Patch {
    /// `Kind namespace/name`.
    pub id: String,
    kind: &'static str,
    key: Key,
    body: Body,
}

/// What a Service derives to.
#[derive(Clone)]
enum Derivation {
    Entry(Arc<(crd::ObjectMeta, crd::ServiceEntrySpec)>),
    Skipped(String),
}

/// The feed rendered for one load: every object as a resource, and the Services not captured
/// (with the reason).
pub struct Documents {
    docs: Vec<Doc>,
    skipped: Vec<(String, String)>,
}

/// One object as a resource.
struct Doc {
    /// `Kind namespace/name`, as problems name it.
    id: String,
    kind: &'static str,
    key: Key,
    body: Body,
}

/// A resource: a ServiceEntry derived from a Service (already typed: no parse), or an Istio
/// object as the loader parses it.
#[derive(Clone)]
enum Body {
    Entry(Arc<(crd::ObjectMeta, crd::ServiceEntrySpec)>),
    Yaml(Arc<serde_yaml::Value>),
}

impl Body {
    /// The same version (a cached derivation, or the same parse).
    fn same(&self, other: &Body) -> bool {
        match (self, other) {
            (Body::Entry(a), Body::Entry(b)) => Arc::ptr_eq(a, b),
            (Body::Yaml(a), Body::Yaml(b)) => Arc::ptr_eq(a, b) || a == b,
            _ => false,
        }
    }

    fn add_to(&self, set: &mut ConfigSet, origin: Origin) -> Result<(), Problem> {
        match self {
            Body::Entry(e) => {
                let (meta, spec) = e.as_ref().clone();
                set.service_entries.push(Resource { origin, meta, spec });
                Ok(())
            }
            Body::Yaml(v) => set.add_document(origin, v.as_ref().clone()),
        }
    }
}

impl Patch {
    /// Adds the object to `set` as the loader would hold it (or the parse problem).
    pub fn add_to(&self, set: &mut ConfigSet) -> Result<(), Problem> {
        (self.body).add_to(set, Origin::api(self.kind, &self.key.0, &self.key.1))
    }
}

/// One watched object, reduced to what the feed keeps.
pub(crate) enum Object {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Pod(Key, PodInfo),
    Node(String, BTreeMap<String, String>),
    Namespace(String, BTreeMap<String, String>),
    Istio(&'static str, Key, serde_json::Value),
}

// === impl Feed ===

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("domain", &self.inner.domain)
            .field("synced", &self.is_synced())
            .finish_non_exhaustive()
    }
}

impl Feed {
    pub fn new(domain: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                domain: domain.into(),
                changed: Notify::new(),
                synced: signal::channel(HashSet::new()).0,
                expected: Mutex::default(),
                failing: Mutex::default(),
                counters: Counters::default(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The API side's counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Waits for the next change (a reload is due after it).
    pub async fn changed(&self) {
        self.inner.changed.notified().await;
    }

    /// A watcher `name` now exists and its first list is awaited.
    pub(crate) fn expect(&self, name: &'static str) {
        self.inner
            .expected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
    }

    /// Whether every expected watcher has listed once.
    pub fn is_synced(&self) -> bool {
        let expected = self
            .inner
            .expected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let synced = self.inner.synced.borrow();
        expected.iter().all(|n| synced.contains(n))
    }

    /// Whether watcher `name` has listed and not failed since its last event: what the feed holds
    /// of its kind is as fresh as the API server's (absence is evidence).
    pub fn is_fresh(&self, name: &'static str) -> bool {
        let listed = self.inner.synced.borrow().contains(name);
        let failing = (self.inner.failing.lock())
            .unwrap_or_else(|e| e.into_inner())
            .contains(name);
        listed && !failing
    }

    /// Records whether watcher `name`'s last outcome was an error.
    pub(crate) fn set_failing(&self, name: &'static str, failing: bool) {
        let mut set = self.inner.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing {
            set.insert(name);
        } else {
            set.remove(name);
        }
    }

    /// Waits until every expected watcher has listed once.
    pub async fn synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        while !self.is_synced() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Replaces every object of watcher `name` (kind `kind`) with `objects`: a complete list.
    pub(crate) fn relisted(&self, name: &'static str, kind: &'static str, objects: Vec<Object>) {
        self.state().relist(kind, objects);
        self.inner.counters.relists.fetch_add(1, Ordering::Relaxed);
        let was = (self.inner.counters.unavailable.lock())
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if was.is_some() {
            tracing::info!(
                kind = name,
                "kubernetes: this Istio kind can be listed again"
            );
        }
        self.mark_synced(name);
    }

    /// Istio kind `kind` failed before its first list: reported (log, `unavailable`) and no
    /// longer awaited for readiness; its watcher keeps retrying.
    pub(crate) fn unavailable(&self, kind: &'static str, error: String) {
        let first = (self.inner.counters.unavailable.lock())
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind, error.clone())
            .is_none();
        if first {
            tracing::warn!(kind, %error, "kubernetes: this Istio kind cannot be listed; serving without it and retrying");
        }
        self.mark_synced(kind);
    }

    /// Watcher (or discovery) `name` has listed once.
    pub(crate) fn mark_synced(&self, name: &'static str) {
        self.inner.synced.send_modify(|s| {
            s.insert(name);
        });
        self.inner.changed.notify_one();
    }

    /// An object was added or changed: a reload, unless nothing a snapshot reads changed.
    pub(crate) fn applied(&self, object: Object) {
        // Nothing a snapshot holds depends on a namespace's labels: no reload for them.
        let reads = !matches!(object, Object::Namespace(..));
        if self.state().apply(object) && reads {
            self.inner.changed.notify_one();
        } else {
            self.inner.counters.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An object was deleted.
    pub(crate) fn deleted(&self, kind: &'static str, key: Key) {
        {
            let mut s = self.state();
            match kind {
                "Service" => {
                    s.pending.full = true;
                    s.derived.remove(&key);
                    s.services.remove(&key);
                }
                "EndpointSlice" => {
                    let old = s.slices.remove(&key);
                    s.invalidate_slice(old.as_ref());
                }
                "Pod" => {
                    s.invalidate_pod(&key);
                    s.pods.remove(&key);
                    s.pending.pods.insert(key);
                }
                "Node" => {
                    s.pending.full = true;
                    s.derived.clear();
                    s.nodes.remove(&key.1);
                }
                "Namespace" => {
                    let was = convert::namespace_ambient(s.namespaces.remove(&key.1).as_ref());
                    if was {
                        s.namespace_moved(&key.1, false);
                    }
                }
                k => {
                    s.pending.full = true;
                    s.istio.remove(&(k, key));
                }
            }
        }
        self.inner.changed.notify_one();
    }

    /// Every object rendered as an Istio resource, once per load (see [`Documents`]).
    pub fn documents(&self) -> Documents {
        self.state().documents(&self.inner.domain)
    }

    /// What changed since the feed was last rendered whole (or since the last call), as
    /// istiod's incremental pushes see it: only endpoint sets and DestinationRules, or more.
    /// Objects equal to their last valid version are left out.
    pub fn changes(&self) -> Changes {
        let mut s = self.state();
        let pending = std::mem::take(&mut s.pending);
        if pending.full {
            s.pending.full = true;
            return Changes::Full;
        }
        let slices = std::mem::take(&mut s.slices);
        let mut entries = Vec::new();
        let mut full = false;
        {
            let by_service = slices_of(&slices, &pending.services);
            for key in pending.services {
                let id = format!("Service {}/{}", key.0, key.1);
                match s.derive(&key, &by_service, &self.inner.domain) {
                    Derivation::Entry(entry) => {
                        let same = match s.last_good.get(&id) {
                            Some(Body::Entry(last)) => *last == entry,
                            _ => false,
                        };
                        if !same {
                            let body = Body::Entry(entry);
                            entries.push(Patch {
                                id,
                                kind: "Service",
                                key,
                                body,
                            });
                        }
                    }
                    // Captured no longer (or not yet): the set of services changes.
                    Derivation::Skipped(_) => full = true,
                }
            }
        }
        s.slices = slices;
        for key in pending.rules {
            let id = format!("DestinationRule {}/{}", key.0, key.1);
            let Some(value) = s.istio.get(&("DestinationRule", key.clone())) else {
                full = true;
                continue;
            };
            let body = Body::Yaml(Arc::new(to_yaml(value.clone())));
            if !s.last_good.get(&id).is_some_and(|last| last.same(&body)) {
                let kind = "DestinationRule";
                entries.push(Patch {
                    id,
                    kind,
                    key,
                    body,
                });
            }
        }
        if full {
            s.pending.full = true;
            return Changes::Full;
        }
        let pods = (pending.pods.into_iter())
            .map(|key| {
                let ips = s.pods.get(&key).map_or_else(Vec::new, |p| {
                    p.ips.iter().filter_map(|ip| ip.parse().ok()).collect()
                });
                (key, ips)
            })
            .collect();
        Changes::Patches {
            patches: entries,
            pods,
        }
    }

    /// `patches` serve (applied without a full build): each is its Service's last valid
    /// version.
    pub fn patched(&self, patches: &[Patch]) {
        let mut s = self.state();
        for p in patches {
            s.last_good.insert(p.id.clone(), p.body.clone());
        }
    }

    /// Adds every object of `docs` to `set` (one whose kind, namespace and name a file also
    /// defines is left to the file). An object in `rejected`, or one that does not parse, is
    /// added in its last valid version, if it had one; one in `dropped` is left out; parse
    /// problems are returned.
    pub fn extend(
        &self,
        docs: &Documents,
        set: &mut ConfigSet,
        rejected: &mut HashSet<String>,
        dropped: &HashSet<String>,
    ) -> Vec<Problem> {
        let from_files: HashSet<String> = file_ids(set);
        let mut problems = Vec::new();
        let s = self.state();
        for doc in &docs.docs {
            if from_files.contains(&doc.id) || dropped.contains(&doc.id) {
                continue;
            }
            let origin = || Origin::api(doc.kind, &doc.key.0, &doc.key.1);
            if !rejected.contains(&doc.id) {
                match doc.body.add_to(set, origin()) {
                    Ok(()) => continue,
                    Err(p) => {
                        problems.push(p);
                        rejected.insert(doc.id.clone());
                    }
                }
            }
            if let Some(good) = s.last_good.get(&doc.id) {
                let _ = good.add_to(set, origin());
            }
        }
        problems
    }

    /// What the feed knows of pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.state()
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The labels of namespace `name`, if the API server has it.
    pub fn namespace_labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.state().namespaces.get(name).cloned()
    }

    /// The pod (namespace, name, what is known of it) that holds one of `addresses`: a workload's identity.
    /// Pods that ended (`Succeeded`, `Failed`) and host-network pods (which share the node's
    /// addresses) are not candidates.
    pub fn pod_with_address(
        &self,
        addresses: &[std::net::IpAddr],
    ) -> Option<(String, String, PodInfo)> {
        let s = self.state();
        s.pods
            .iter()
            .filter(|(_, p)| {
                !p.host_network && !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed"))
            })
            .find(|(_, p)| {
                p.ips
                    .iter()
                    .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
                    .any(|ip| addresses.contains(&ip))
            })
            .map(|((ns, name), p)| (ns.clone(), name.clone(), p.clone()))
    }

    /// A pod's labels with the topology labels istiod adds, and its locality
    /// `region/zone/subzone` (its own `topology.istio.io/locality` label, else its node's).
    pub fn pod_placement(&self, pod: &PodInfo) -> (BTreeMap<String, String>, String) {
        convert::endpoint_labels(Some(pod), pod.node.as_deref(), &self.state().nodes)
    }

    /// The live pods of node `node` that have their own network (not host-network, not ended).
    pub fn pods_on_node(&self, node: &str) -> Vec<NodePod> {
        let s = self.state();
        s.pods
            .iter()
            .filter(|(_, p)| {
                p.node.as_deref() == Some(node)
                    && !p.host_network
                    && !p.opted_out
                    && !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed"))
            })
            .map(|((ns, name), p)| NodePod {
                namespace: ns.clone(),
                name: name.clone(),
                ips: p.ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
                uid: p.uid.clone(),
            })
            .collect()
    }

    /// The id (`Kind namespace/name`) of the API object a problem is about, if it is about one.
    pub fn object_of(&self, problem: &Problem) -> Option<String> {
        let file = problem.location.file.to_str()?;
        let (kind, rest) = file.split_once(' ')?;
        let (ns, name) = rest.split_once('/')?;
        let s = self.state();
        let known = match kind {
            "Service" => s.services.contains_key(&(ns.into(), name.into())),
            _ => s
                .istio
                .keys()
                .any(|(k, key)| *k == kind && key.0 == ns && key.1 == name),
        };
        known.then(|| file.to_string())
    }

    /// A snapshot built from the feed serves: every object not in `rejected` is now its own
    /// last valid version; rejections (with their problems) and skips are logged once each.
    pub fn accepted(&self, docs: &Documents, rejected: &HashSet<String>, problems: &[Problem]) {
        let mut s = self.state();
        let mut reported = HashMap::new();
        for doc in &docs.docs {
            let unchanged = s.last_good.get(&doc.id).is_some_and(|b| b.same(&doc.body));
            if !rejected.contains(&doc.id) && !unchanged {
                s.last_good.insert(doc.id.clone(), doc.body.clone());
            }
        }
        for p in problems {
            let id = p.location.file.display().to_string();
            reported.insert(id, p.to_string());
        }
        for (id, why) in &docs.skipped {
            reported.insert(id.clone(), why.clone());
        }
        let live: HashSet<&str> = docs.docs.iter().map(|d| d.id.as_str()).collect();
        s.last_good.retain(|id, _| live.contains(id.as_str()));
        for (id, what) in &reported {
            if s.reported.get(id) == Some(what) {
                continue;
            }
            if rejected.contains(id) {
                self.inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                let keeps = if s.last_good.contains_key(id) {
                    "its last valid version keeps serving"
                } else {
                    "it has no valid version yet"
                };
                tracing::error!("{what} (object rejected; {keeps})");
            } else {
                tracing::info!("{id}: not captured: {what}");
            }
        }
        s.reported = reported;
    }
}

/// `Kind namespace/name` of every resource of `set`.
fn file_ids(set: &ConfigSet) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut add = |kind: &str, ns: &str, name: &str| ids.insert(format!("{kind} {ns}/{name}"));
    for r in &set.service_entries {
        add("ServiceEntry", r.namespace(), &r.meta.name);
    }
    for r in &set.workload_entries {
        add("WorkloadEntry", r.namespace(), &r.meta.name);
    }
    for r in &set.destination_rules {
        add("DestinationRule", r.namespace(), &r.meta.name);
    }
    for r in &set.virtual_services {
        add("VirtualService", r.namespace(), &r.meta.name);
    }
    for r in &set.peer_authentications {
        add("PeerAuthentication", r.namespace(), &r.meta.name);
    }
    for r in &set.authorization_policies {
        add("AuthorizationPolicy", r.namespace(), &r.meta.name);
    }
    for r in &set.telemetries {
        add("Telemetry", r.namespace(), &r.meta.name);
    }
    ids
}

// === impl State ===

impl State {
    /// Replaces every object of `kind` with `objects`. A relist of Services or slices
    /// re-derives everything; one of Pods or Nodes only what read an object that changed, came
    /// or went.
    fn relist(&mut self, kind: &str, objects: Vec<Object>) {
        if !matches!(kind, "Pod" | "Node" | "Namespace") {
            self.pending.full = true;
        }
        match kind {
            "Service" => self.services.clear(),
            "EndpointSlice" => self.slices.clear(),
            "Pod" | "Node" => {}
            "Namespace" => self.namespaces.clear(),
            k => self.istio.retain(|(kind, _), _| *kind != k),
        }
        if matches!(kind, "Service" | "EndpointSlice") {
            self.derived.clear();
            self.pod_refs.clear();
        }
        let old_pods = if kind == "Pod" {
            std::mem::take(&mut self.pods)
        } else {
            HashMap::new()
        };
        let old_nodes = if kind == "Node" {
            std::mem::take(&mut self.nodes)
        } else {
            NodeLocality::default()
        };
        for o in objects {
            self.store(o);
        }
        if kind == "Pod" {
            let came = (self.pods.keys()).filter(|k| !old_pods.contains_key(*k));
            let changed = (old_pods.iter())
                .filter(|(k, v)| self.pods.get(*k) != Some(v))
                .map(|(k, _)| k);
            let touched: Vec<Key> = came.chain(changed).cloned().collect();
            for key in touched {
                self.invalidate_pod(&key);
                self.pending.pods.insert(key);
            }
        }
        if kind == "Node" && old_nodes != self.nodes {
            self.pending.full = true;
            self.derived.clear();
        }
    }

    /// Stores `object`; false when it equals what is stored (for a Pod or Node: what the
    /// daemon keeps of it), so nothing derived from it changes.
    fn apply(&mut self, object: Object) -> bool {
        match object {
            Object::Pod(key, info) if self.pods.get(&key) == Some(&info) => false,
            Object::Node(name, labels) if self.nodes.get(&name) == Some(&labels) => false,
            object => {
                match &object {
                    Object::Pod(key, _) => {
                        self.pending.pods.insert(key.clone());
                        self.invalidate_pod(key);
                    }
                    // Every endpoint's locality may come from this node.
                    Object::Node(..) => {
                        self.pending.full = true;
                        self.derived.clear();
                    }
                    Object::Istio("DestinationRule", key, _) => {
                        self.pending.rules.insert(key.clone());
                    }
                    Object::Service(..) | Object::Istio(..) => self.pending.full = true,
                    _ => {}
                }
                self.store(object);
                true
            }
        }
    }

    fn store(&mut self, object: Object) {
        match object {
            Object::Service(svc) => {
                let key = key_of(&svc.metadata);
                self.derived.remove(&key);
                self.services.insert(key, *svc);
            }
            Object::Slice(slice) => {
                self.invalidate_slice(Some(&slice));
                let old = self.slices.insert(key_of(&slice.metadata), *slice);
                self.invalidate_slice(old.as_ref());
            }
            Object::Pod(key, mut info) => {
                let ns = convert::namespace_ambient(self.namespaces.get(&key.0));
                convert::mark_ambient(&mut info, ns);
                self.pods.insert(key, info);
            }
            Object::Node(name, labels) => {
                self.nodes.insert(name, labels);
            }
            Object::Namespace(name, labels) => {
                let ambient = convert::namespace_ambient(Some(&labels));
                let was = convert::namespace_ambient(self.namespaces.get(&name));
                self.namespaces.insert(name.clone(), labels);
                if ambient != was {
                    self.namespace_moved(&name, ambient);
                }
            }
            Object::Istio(kind, key, value) => {
                self.istio.insert((kind, key), value);
            }
        }
    }

    /// Namespace `name` joined (or left) the mesh: its pods' HBONE markers follow, and every
    /// endpoint is derived again (a rare event: a full rendering).
    fn namespace_moved(&mut self, name: &str, ambient: bool) {
        for ((ns, _), pod) in self.pods.iter_mut() {
            if ns == name {
                convert::mark_ambient(pod, ambient);
            }
        }
        self.pending.full = true;
        self.derived.clear();
    }

    /// Forgets the derivation of the Service `slice` belongs to.
    fn invalidate_slice(&mut self, slice: Option<&EndpointSlice>) {
        let Some(slice) = slice else { return };
        let labels = slice.metadata.labels.as_ref();
        if let Some(svc) = labels.and_then(|l| l.get(convert::SERVICE_NAME_LABEL)) {
            let key = (key_of(&slice.metadata).0, svc.clone());
            self.derived.remove(&key);
            self.pending.services.insert(key);
        }
    }

    /// Forgets the derivations that read pod `key` (or waited for it).
    fn invalidate_pod(&mut self, key: &Key) {
        for svc in self.pod_refs.remove(key).into_iter().flatten() {
            self.derived.remove(&svc);
            self.pending.services.insert(svc);
        }
    }

    /// The derivation of Service `key`, from the cache or computed (recording the pods its
    /// slices name, whose changes invalidate it).
    fn derive(
        &mut self,
        key: &Key,
        by_service: &HashMap<Key, Vec<&EndpointSlice>>,
        domain: &str,
    ) -> Derivation {
        if let Some(d) = self.derived.get(key) {
            return d.clone();
        }
        let Some(svc) = self.services.get(key) else {
            return Derivation::Skipped("deleted".into());
        };
        let slices = by_service.get(key).map(Vec::as_slice).unwrap_or_default();
        let d = match convert::service_entry(svc, slices, &self.pods, &self.nodes, domain) {
            Derived::Entry(entry) => Derivation::Entry(Arc::from(entry)),
            Derived::Skipped(why) => Derivation::Skipped(why),
        };
        for slice in slices {
            for ep in &slice.endpoints {
                if let Some(r) = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                {
                    let pod = (
                        r.namespace.clone().unwrap_or_else(|| key.0.clone()),
                        r.name.clone().unwrap_or_default(),
                    );
                    self.pod_refs.entry(pod).or_default().insert(key.clone());
                }
            }
        }
        self.derived.insert(key.clone(), d.clone());
        d
    }

    /// Every object as an Istio resource; Services become `ServiceEntry`s under the id
    /// `Service namespace/name` (or are skipped, with the reason). Derivations are cached until
    /// their Service, one of its slices, a pod those name, or a node changes.
    fn documents(&mut self, domain: &str) -> Documents {
        self.pending = Pending::default();
        let slices = std::mem::take(&mut self.slices);
        let keys: Vec<Key> = self.services.keys().cloned().collect();
        let mut docs = Vec::with_capacity(keys.len() + self.istio.len());
        let mut skipped = Vec::new();
        {
            let by_service = slices_by_service(&slices);
            for key in keys {
                let id = format!("Service {}/{}", key.0, key.1);
                match self.derive(&key, &by_service, domain) {
                    Derivation::Entry(entry) => docs.push(Doc {
                        id,
                        kind: "Service",
                        key,
                        body: Body::Entry(entry),
                    }),
                    Derivation::Skipped(why) => skipped.push((id, why)),
                }
            }
        }
        self.slices = slices;
        for ((kind, key), value) in &self.istio {
            docs.push(Doc {
                id: format!("{kind} {}/{}", key.0, key.1),
                kind,
                key: key.clone(),
                body: Body::Yaml(Arc::new(to_yaml(value.clone()))),
            });
        }
        Documents { docs, skipped }
    }
}

/// The slices of the services `keys` (by (namespace, service name)): those of
/// [`slices_by_service`], without indexing every slice when only a few services are wanted.
fn slices_of<'s>(
    slices: &'s BTreeMap<Key, EndpointSlice>,
    keys: &HashSet<Key>,
) -> HashMap<Key, Vec<&'s EndpointSlice>> {
    if keys.len() > 16 {
        return slices_by_service(slices);
    }
    let mut by: HashMap<Key, Vec<&EndpointSlice>> = HashMap::new();
    for ((ns, _), slice) in slices {
        let labels = slice.metadata.labels.as_ref();
        let Some(svc) = labels.and_then(|l| l.get(convert::SERVICE_NAME_LABEL)) else {
            continue;
        };
        if let Some(key) = keys.iter().find(|(n, s)| n == ns && s == svc) {
            by.entry(key.clone()).or_default().push(slice);
        }
    }
    by
}

/// The slices of each service, by (namespace, service name).
fn slices_by_service(slices: &BTreeMap<Key, EndpointSlice>) -> HashMap<Key, Vec<&EndpointSlice>> {
    let mut by: HashMap<Key, Vec<&EndpointSlice>> = HashMap::new();
    for ((ns, _), slice) in slices {
        let labels = slice.metadata.labels.as_ref();
        if let Some(svc) = labels.and_then(|l| l.get(convert::SERVICE_NAME_LABEL)) {
            by.entry((ns.clone(), svc.clone())).or_default().push(slice);
        }
    }
    by
}

/// `(namespace, name)` of an object (`default` namespace when it has none).
pub(crate) fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

/// JSON → the YAML value the configuration loader parses (JSON is YAML: this cannot fail for
/// values that came from JSON).
fn to_yaml(value: serde_json::Value) -> serde_yaml::Value {
    serde_yaml::to_value(value).unwrap_or(serde_yaml::Value::Null)
}

#[cfg(test)]
mod tests;
