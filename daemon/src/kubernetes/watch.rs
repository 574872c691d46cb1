//! The watchers: one `kube-runtime` watcher per kind, with its backoff, writing into the
//! [`Feed`]; and the discovery of the Istio kinds, which starts their watchers when the API
//! server serves them (at start, or when a CRD is installed later).
//!
//! Invariants: a watcher's objects are replaced only on a complete (re)list (`InitDone`); errors
//! (dropped connections, `410 Gone`, an API server that is down) are logged, counted and retried
//! by the watcher's exponential backoff, never in a hot loop; a watcher stops with `shutdown`.

use std::{collections::HashSet, fmt::Debug};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::Discovery,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::{DISCOVERY_RECHECK, Error, Feed, Object, Settings, convert, key_of};

/// The custom kinds Drover reads (Istio's and the Gateway API's mesh routes): (API group,
/// kind, resource).
const ISTIO_KINDS: [(&str, &str, &str); 11] = [
    ("networking.istio.io", "ServiceEntry", "serviceentries"),
    ("networking.istio.io", "WorkloadEntry", "workloadentries"),
    ("networking.istio.io", "DestinationRule", "destinationrules"),
    ("networking.istio.io", "VirtualService", "virtualservices"),
    (
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    ("gateway.networking.k8s.io", "HTTPRoute", "httproutes"),
    ("gateway.networking.k8s.io", "GRPCRoute", "grpcroutes"),
    ("gateway.networking.k8s.io", "TCPRoute", "tcproutes"),
    (
        "gateway.networking.k8s.io",
        "ReferenceGrant",
        "referencegrants",
    ),
    ("telemetry.istio.io", "Telemetry", "telemetries"),
];

/// Every (API group, resource) the watchers list and watch: what the daemon's RBAC role must
/// grant (`deploy/kubernetes/rbac.yaml`).
pub fn watched() -> Vec<(&'static str, &'static str)> {
    fn typed<K: k8s_openapi::Resource>() -> (&'static str, &'static str) {
        (K::GROUP, K::URL_PATH_SEGMENT)
    }
    let mut all = vec![
        typed::<Service>(),
        typed::<EndpointSlice>(),
        typed::<Pod>(),
        typed::<Node>(),
        typed::<Namespace>(),
    ];
    all.extend(ISTIO_KINDS.iter().map(|(g, _, r)| (*g, *r)));
    all
}

/// Connects to the API server and starts every watcher; the feed fills as they list (wait for
/// [`Feed::synced`]). Returns the API server's URL and where the credentials came from.
pub async fn spawn(
    settings: &Settings,
    feed: Feed,
    shutdown: CancellationToken,
) -> Result<String, Error> {
    let (config, credentials) = match &settings.kubeconfig {
        Some(path) => {
            let reason = |e: &dyn std::fmt::Display| Error::Kubeconfig {
                path: path.clone(),
                reason: e.to_string(),
            };
            let kc = Kubeconfig::read_from(path).map_err(|e| reason(&e))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| reason(&e))?;
            (config, format!("kubeconfig {}", path.display()))
        }
        None => {
            let config = kube::Config::incluster().map_err(|e| Error::InCluster(e.to_string()))?;
            (config, "in-cluster service account".to_string())
        }
    };
    let url = config.cluster_url.to_string();
    let source = format!("{url} ({credentials})");
    let client = Client::try_from(config).map_err(|e| Error::Client {
        url: url.clone(),
        credentials: credentials.clone(),
        reason: e.to_string(),
    })?;
    let typed = |name: &'static str| {
        feed.expect(name);
        (feed.clone(), shutdown.clone(), source.clone())
    };
    let (f, s, u) = typed("Service");
    tokio::spawn(run(Api::<Service>::all(client.clone()), "Service", f, s, u));
    let (f, s, u) = typed("EndpointSlice");
    tokio::spawn(run(
        Api::<EndpointSlice>::all(client.clone()),
        "EndpointSlice",
        f,
        s,
        u,
    ));
    let (f, s, u) = typed("Pod");
    tokio::spawn(run(Api::<Pod>::all(client.clone()), "Pod", f, s, u));
    let (f, s, u) = typed("Node");
    tokio::spawn(run(Api::<Node>::all(client.clone()), "Node", f, s, u));
    let (f, s, u) = typed("Namespace");
    tokio::spawn(run(
        Api::<Namespace>::all(client.clone()),
        "Namespace",
        f,
        s,
        u,
    ));
    feed.expect("discovery");
    tokio::spawn(discover(client, feed, shutdown, source.clone()));
    Ok(source)
}

/// What a watched kind keeps of its objects: only the fields the daemon reads (50 000 Pods and
/// 100 000 endpoints must fit in a node agent).
trait Watched: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    fn reduce(self, kind: &'static str, ar: Option<&ApiResource>) -> Option<Object>;
}

/// The annotation `kubectl apply` keeps a whole copy of the object in; never read.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

impl Watched for Service {
    fn reduce(mut self, _: &'static str, _: Option<&ApiResource>) -> Option<Object> {
        self.metadata.managed_fields = None;
        self.status = None;
        if let Some(a) = self.metadata.annotations.as_mut() {
            a.remove(LAST_APPLIED);
        }
        Some(Object::Service(Box::new(self)))
    }
}

impl Watched for EndpointSlice {
    fn reduce(mut self, _: &'static str, _: Option<&ApiResource>) -> Option<Object> {
        self.metadata.managed_fields = None;
        // No endpoint field the derivation reads lives in the annotations or the hints.
        self.metadata.annotations = None;
        for ep in &mut self.endpoints {
            ep.hints = None;
            ep.deprecated_topology = None;
        }
        Some(Object::Slice(Box::new(self)))
    }
}

impl Watched for Pod {
    fn reduce(self, _: &'static str, _: Option<&ApiResource>) -> Option<Object> {
        Some(Object::Pod(
            key_of(&self.metadata),
            convert::pod_info(&self),
        ))
    }
}

impl Watched for Node {
    fn reduce(self, _: &'static str, _: Option<&ApiResource>) -> Option<Object> {
        Some(Object::Node(self.name_any(), convert::node_locality(&self)))
    }
}

impl Watched for Namespace {
    fn reduce(self, _: &'static str, _: Option<&ApiResource>) -> Option<Object> {
        let labels = self.metadata.labels.clone().unwrap_or_default();
        Some(Object::Namespace(self.name_any(), labels))
    }
}

impl Watched for DynamicObject {
    fn reduce(mut self, kind: &'static str, ar: Option<&ApiResource>) -> Option<Object> {
        self.metadata.managed_fields = None;
        let key = key_of(&self.metadata);
        let mut value = serde_json::to_value(&self).ok()?;
        // List items may come without their type; the loader dispatches on it.
        if let (Some(obj), Some(ar)) = (value.as_object_mut(), ar) {
            obj.insert("apiVersion".into(), ar.api_version.clone().into());
            obj.insert("kind".into(), kind.into());
        }
        Some(Object::Istio(kind, key, value))
    }
}

/// Runs the typed watcher of `kind` until `shutdown`.
async fn run<K: Watched>(
    api: Api<K>,
    kind: &'static str,
    feed: Feed,
    shutdown: CancellationToken,
    source: String,
) {
    watch(api, kind, None, feed, shutdown, source).await;
}

/// Feeds `api`'s events into `feed` as `kind` until `shutdown`.
async fn watch<K: Watched>(
    api: Api<K>,
    kind: &'static str,
    ar: Option<ApiResource>,
    feed: Feed,
    shutdown: CancellationToken,
    source: String,
) {
    use watcher::Event;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut buffer = Vec::new();
    let mut listed = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => match e { Some(e) => e, None => return },
        };
        // Fresh again once events flow or a relist completes (not while one is under way).
        match &event {
            Err(_) => feed.set_failing(kind, true),
            Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                feed.set_failing(kind, false);
            }
            Ok(Event::Init | Event::InitApply(_)) => {}
        }
        match event {
            Ok(Event::Init) => buffer.clear(),
            Ok(Event::InitApply(o)) => buffer.extend(o.reduce(kind, ar.as_ref())),
            Ok(Event::InitDone) => {
                let n = buffer.len();
                feed.relisted(kind, kind, std::mem::take(&mut buffer));
                if listed {
                    tracing::info!(kind, objects = n, "kubernetes: relisted");
                } else {
                    tracing::info!(kind, objects = n, "kubernetes: listed");
                    listed = true;
                }
            }
            Ok(Event::Apply(o)) => {
                tracing::debug!(kind, name = %o.name_any(), "kubernetes: applied");
                if let Some(o) = o.reduce(kind, ar.as_ref()) {
                    feed.applied(o);
                }
            }
            Ok(Event::Delete(o)) => feed.deleted(kind, key_of(o.meta())),
            Err(e) => {
                feed.counters()
                    .watch_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(kind, api_server = %source, error = %e, "kubernetes watch failed; the current snapshot keeps serving, retrying with backoff");
                // Core kinds gate readiness; an Istio kind that cannot be listed does not.
                if !listed && ar.is_some() {
                    feed.unavailable(kind, e.to_string());
                }
            }
        }
    }
}

/// Looks for the Istio kinds until all are served, starting a watcher for each one found; the
/// first complete look marks discovery synced (kinds not served count as empty).
async fn discover(client: Client, feed: Feed, shutdown: CancellationToken, source: String) {
    let mut started: HashSet<&'static str> = HashSet::new();
    let mut first = true;
    loop {
        match Discovery::new(client.clone())
            .filter(&[
                "networking.istio.io",
                "security.istio.io",
                "gateway.networking.k8s.io",
                "telemetry.istio.io",
            ])
            .run()
            .await
        {
            Ok(discovery) => {
                for (group, kind, _) in ISTIO_KINDS {
                    if started.contains(kind) {
                        continue;
                    }
                    let found = discovery.get(group).and_then(|g| g.recommended_kind(kind));
                    if let Some((ar, _)) = found {
                        tracing::info!(kind, version = %ar.version, "kubernetes: watching Istio kind");
                        feed.expect(kind);
                        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
                        tokio::spawn(watch(
                            api,
                            kind,
                            Some(ar),
                            feed.clone(),
                            shutdown.clone(),
                            source.clone(),
                        ));
                        started.insert(kind);
                    } else if first {
                        tracing::info!(
                            kind,
                            "kubernetes: the API server does not serve this Istio kind (CRD not installed); looking again every {}s",
                            DISCOVERY_RECHECK.as_secs()
                        );
                    }
                }
                if first {
                    feed.mark_synced("discovery");
                    first = false;
                }
            }
            Err(e) => {
                tracing::warn!(api_server = %source, error = %e, "kubernetes discovery failed; retrying");
            }
        }
        if started.len() == ISTIO_KINDS.len() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(DISCOVERY_RECHECK) => {}
        }
    }
}
