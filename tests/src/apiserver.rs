//! A small Kubernetes API server for tests: it speaks the real list/watch protocol over HTTP on
//! loopback to a real `kube::Client` (the daemon's), since no kube-apiserver can run here.
//!
//! It serves discovery (`/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>`), lists with
//! `resourceVersion`, `limit` and `continue`, and chunked watch streams with ADDED / MODIFIED /
//! DELETED / BOOKMARK events from a given resource version, answering `ERROR 410 Gone` when that
//! version was compacted away. Tests mutate objects the way controllers would
//! ([`ApiServer::apply`], [`ApiServer::delete`]), drop every watch connection, compact the event
//! history, install a CRD later, or stop and restart the server on the same port (its objects
//! survive, as they would in etcd).
//!
//! Invariants: every change gets the next resource version and is both logged and broadcast
//! under one lock, so a watch that starts from version `v` sees each later change exactly once;
//! a kind not installed answers 404 and is absent from discovery.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// A kind the server knows: (group, version, plural, kind, namespaced).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

pub const SERVICE: Kind = core("services", "Service", true);
pub const POD: Kind = core("pods", "Pod", true);
pub const NODE: Kind = core("nodes", "Node", false);
pub const NAMESPACE: Kind = core("namespaces", "Namespace", false);
pub const ENDPOINT_SLICE: Kind = Kind {
    group: "discovery.k8s.io",
    version: "v1",
    plural: "endpointslices",
    kind: "EndpointSlice",
    namespaced: true,
};
pub const DESTINATION_RULE: Kind = istio("destinationrules", "DestinationRule");
pub const VIRTUAL_SERVICE: Kind = istio("virtualservices", "VirtualService");
pub const SERVICE_ENTRY: Kind = istio("serviceentries", "ServiceEntry");
pub const WORKLOAD_ENTRY: Kind = istio("workloadentries", "WorkloadEntry");
pub const PEER_AUTHENTICATION: Kind = Kind {
    group: "security.istio.io",
    version: "v1",
    plural: "peerauthentications",
    kind: "PeerAuthentication",
    namespaced: true,
};
pub const AUTHORIZATION_POLICY: Kind = Kind {
    group: "security.istio.io",
    version: "v1",
    plural: "authorizationpolicies",
    kind: "AuthorizationPolicy",
    namespaced: true,
};
pub const HTTP_ROUTE: Kind = gateway("v1", "httproutes", "HTTPRoute");
pub const GRPC_ROUTE: Kind = gateway("v1", "grpcroutes", "GRPCRoute");
pub const TCP_ROUTE: Kind = gateway("v1alpha2", "tcproutes", "TCPRoute");
pub const REFERENCE_GRANT: Kind = gateway("v1beta1", "referencegrants", "ReferenceGrant");
pub const TELEMETRY: Kind = Kind {
    group: "telemetry.istio.io",
    version: "v1",
    plural: "telemetries",
    kind: "Telemetry",
    namespaced: true,
};
/// Every custom kind (Istio's, the Gateway API's mesh routes) this server can serve.
pub const ISTIO: [Kind; 11] = [
    DESTINATION_RULE,
    VIRTUAL_SERVICE,
    SERVICE_ENTRY,
    WORKLOAD_ENTRY,
    PEER_AUTHENTICATION,
    AUTHORIZATION_POLICY,
    HTTP_ROUTE,
    GRPC_ROUTE,
    TCP_ROUTE,
    REFERENCE_GRANT,
    TELEMETRY,
];

const fn gateway(version: &'static str, plural: &'static str, kind: &'static str) -> Kind {
    Kind {
        group: "gateway.networking.k8s.io",
        version,
        plural,
        kind,
        namespaced: true,
    }
}

const fn core(plural: &'static str, kind: &'static str, namespaced: bool) -> Kind {
    Kind {
        group: "",
        version: "v1",
        plural,
        kind,
        namespaced,
    }
}

const fn istio(plural: &'static str, kind: &'static str) -> Kind {
    Kind {
        group: "networking.istio.io",
        version: "v1",
        plural,
        kind,
        namespaced: true,
    }
}

/// How often an idle watch gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// One change, as a watch stream sends it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    kind: &'static str,
    object: Value,
}

struct State {
    rv: u64,
    /// Objects by (plural, namespace, name).
    objects: BTreeMap<(&'static str, String, String), Value>,
    /// Changes after `compacted`.
    log: Vec<Change>,
    /// Watches from a version below this get 410 Gone.
    compacted: u64,
    /// Kinds served (the core ones always; Istio kinds once "installed").
    served: Vec<Kind>,
    /// Resources (plurals) whose list and watch are refused with 403, as RBAC would.
    forbidden: BTreeSet<&'static str>,
    changes: broadcast::Sender<Change>,
}

/// The server: its state outlives stops and restarts.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    /// Bumped to end every open watch.
    drops: watch::Sender<u64>,
    addr: SocketAddr,
    rt: tokio::runtime::Runtime,
    serving: Option<tokio::task::JoinHandle<()>>,
    /// Requests answered (tests assert the client came back after a restart).
    pub requests: Arc<std::sync::atomic::AtomicU64>,
}

impl ApiServer {
    /// A server on a free loopback port serving the core kinds and `istio` kinds.
    pub fn start(istio: &[Kind]) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut served = vec![SERVICE, POD, NODE, NAMESPACE, ENDPOINT_SLICE];
        served.extend_from_slice(istio);
        let state = Arc::new(Mutex::new(State {
            rv: 1,
            objects: BTreeMap::new(),
            log: Vec::new(),
            compacted: 0,
            served,
            forbidden: BTreeSet::new(),
            changes: broadcast::channel(1 << 16).0,
        }));
        let mut server = Self {
            state,
            drops: watch::channel(0).0,
            addr,
            rt,
            serving: None,
            requests: Arc::default(),
        };
        server.serve(listener);
        server
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let state = self.state.clone();
        let drops = self.drops.clone();
        let requests = self.requests.clone();
        self.serving = Some(self.rt.spawn(async move {
            let conns = Connections::default();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, drops, requests) = (state.clone(), drops.clone(), requests.clone());
                conns.spawn(async move {
                    let svc = service_fn(move |req| {
                        requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (state, drops) = (state.clone(), drops.clone());
                        async move { Ok::<_, Infallible>(route(&state, &drops, req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        }));
    }

    /// Refuses (403) or again allows listing and watching `plural`, as RBAC would.
    pub fn forbid(&self, plural: &'static str, forbidden: bool) {
        let mut s = self.state.lock().expect("state");
        if forbidden {
            s.forbidden.insert(plural);
        } else {
            s.forbidden.remove(plural);
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (token auth, plain HTTP) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{}\"}}\n\
             users:\n- name: test\n  user: {{token: test}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\n\
             current-context: test\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("state"))
    }

    /// Creates or replaces an object of `kind` (its `metadata.name`/`namespace` identify it).
    pub fn apply(&self, kind: Kind, mut object: Value) {
        self.with(|s| {
            s.rv += 1;
            let rv = s.rv;
            object["apiVersion"] = api_version(kind).into();
            object["kind"] = kind.kind.into();
            let meta = &mut object["metadata"];
            let name = meta["name"].as_str().expect("metadata.name").to_string();
            let ns = if kind.namespaced {
                meta["namespace"].as_str().unwrap_or("default").to_string()
            } else {
                String::new()
            };
            if kind.namespaced {
                meta["namespace"] = ns.clone().into();
            }
            meta["resourceVersion"] = rv.to_string().into();
            meta["uid"] = format!("uid-{}-{ns}-{name}", kind.plural).into();
            if meta.get("creationTimestamp").is_none() {
                meta["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
            }
            let key = (kind.plural, ns, name);
            let existed = s.objects.insert(key, object.clone()).is_some();
            let kind_word = if existed { "MODIFIED" } else { "ADDED" };
            s.record(kind, kind_word, object, rv);
        });
    }

    /// Deletes an object; false if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.with(|s| {
            let ns = if kind.namespaced { namespace } else { "" };
            let Some(mut object) = s.objects.remove(&(kind.plural, ns.into(), name.into())) else {
                return false;
            };
            s.rv += 1;
            let rv = s.rv;
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            s.record(kind, "DELETED", object, rv);
            true
        })
    }

    /// Serves `kind` from now on (a CRD installed after start).
    pub fn install(&self, kind: Kind) {
        self.with(|s| {
            if !s.served.contains(&kind) {
                s.served.push(kind);
            }
        });
    }

    /// Forgets the change history: a watch resuming from any version seen so far (bookmarks
    /// included) gets 410 Gone.
    pub fn compact(&self) {
        self.with(|s| {
            s.rv += 1;
            s.compacted = s.rv;
            s.log.clear();
        });
    }

    /// Ends every open watch stream (the clients re-watch from their last version).
    pub fn drop_watches(&self) {
        self.drops.send_modify(|g| *g += 1);
    }

    /// Stops answering: the listener closes and every connection is cut.
    pub fn stop(&mut self) {
        if let Some(h) = self.serving.take() {
            h.abort();
            self.drop_watches();
            // Let the aborted tasks release the port.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Serves again on the same port, with the same objects.
    pub fn restart(&mut self) {
        self.stop();
        let listener = self.rt.block_on(async {
            for _ in 0..50 {
                if let Ok(l) = tokio::net::TcpListener::bind(self.addr).await {
                    return l;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("cannot rebind {}", self.addr)
        });
        self.serve(listener);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's connection tasks, aborted together when the accept loop ends (a stop cuts
/// every connection, as a killed API server would).
#[derive(Default)]
struct Connections(Mutex<Vec<tokio::task::JoinHandle<()>>>);

impl Connections {
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.0.lock().expect("tasks");
        tasks.retain(|t| !t.is_finished());
        tasks.push(tokio::spawn(f));
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        for t in self.0.lock().expect("tasks").drain(..) {
            t.abort();
        }
    }
}

impl State {
    fn record(&mut self, kind: Kind, event: &'static str, object: Value, rv: u64) {
        let change = Change {
            rv,
            plural: kind.plural,
            kind: event,
            object,
        };
        self.log.push(change.clone());
        let _ = self.changes.send(change);
    }

    fn served(&self, group: &str, version: &str, plural: &str) -> Option<Kind> {
        self.served
            .iter()
            .copied()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
    }
}

fn api_version(kind: Kind) -> String {
    if kind.group.is_empty() {
        kind.version.to_string()
    } else {
        format!("{}/{}", kind.group, kind.version)
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn not_found(what: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &status(404, "NotFound", &format!("{what} not found")),
    )
}

/// What a request asks for.
fn route(
    state: &Arc<Mutex<State>>,
    drops: &watch::Sender<u64>,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")))
                .collect()
        })
        .unwrap_or_default();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let s = state.lock().expect("state");
    match parts.as_slice() {
        ["api"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["apis"] => json_response(StatusCode::OK, &group_list(&s)),
        ["api", "v1"] => json_response(StatusCode::OK, &resource_list(&s, "", "v1")),
        ["apis", g, v] => {
            let list = resource_list(&s, g, v);
            if list["resources"].as_array().is_some_and(|r| r.is_empty()) {
                not_found(&format!("{g}/{v}"))
            } else {
                json_response(StatusCode::OK, &list)
            }
        }
        _ => {
            let (group, version, ns, plural) = match parts.as_slice() {
                ["api", v, "namespaces", ns, plural] => ("", *v, Some(*ns), *plural),
                ["api", v, plural] => ("", *v, None, *plural),
                ["apis", g, v, "namespaces", ns, plural] => (*g, *v, Some(*ns), *plural),
                ["apis", g, v, plural] => (*g, *v, None, *plural),
                _ => return not_found(&path),
            };
            let Some(kind) = s.served(group, version, plural) else {
                return not_found(&path);
            };
            if s.forbidden.contains(plural) {
                let message = format!("{plural} is forbidden: cannot list resource {plural:?}");
                return json_response(StatusCode::FORBIDDEN, &status(403, "Forbidden", &message));
            }
            let ns = ns.map(str::to_string);
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                let from = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                drop(s);
                watch_stream(state, drops, kind, ns, from, &query)
            } else {
                json_response(StatusCode::OK, &list(&s, kind, ns.as_deref(), &query))
            }
        }
    }
}

/// One entry per group with every version it serves, the most stable preferred (`v1`, then
/// betas, then alphas), as a real API server lists them.
fn group_list(s: &State) -> Value {
    let mut groups: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for k in s.served.iter().filter(|k| !k.group.is_empty()) {
        groups.entry(k.group).or_default().insert(k.version);
    }
    let stability = |v: &str| match (v.contains("alpha"), v.contains("beta")) {
        (true, _) => 2,
        (_, true) => 1,
        _ => 0,
    };
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, versions)| {
            let mut versions: Vec<&str> = versions.into_iter().collect();
            versions.sort_by_key(|v| stability(v));
            let gv = |v: &str| json!({"groupVersion": format!("{g}/{v}"), "version": v});
            let all: Vec<Value> = versions.iter().map(|v| gv(v)).collect();
            json!({"name": g, "versions": all, "preferredVersion": gv(versions[0])})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(s: &State, group: &str, version: &str) -> Value {
    let resources: Vec<Value> = s
        .served
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .map(|k| {
            json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced,
                   "kind": k.kind, "verbs": ["get", "list", "watch"]})
        })
        .collect();
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// One page of a list (`limit`, `continue` = the offset of the next item).
fn list(s: &State, kind: Kind, ns: Option<&str>, query: &BTreeMap<String, String>) -> Value {
    let items: Vec<&Value> = s
        .objects
        .iter()
        .filter(|((plural, o_ns, _), _)| *plural == kind.plural && ns.is_none_or(|n| n == o_ns))
        .map(|(_, v)| v)
        .collect();
    let offset: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&Value> = items.iter().skip(offset).take(limit).copied().collect();
    let next = offset.saturating_add(page.len());
    let mut metadata = json!({"resourceVersion": s.rv.to_string()});
    if next < items.len() {
        metadata["continue"] = next.to_string().into();
        metadata["remainingItemCount"] = (items.len() - next).into();
    }
    json!({"kind": format!("{}List", kind.kind), "apiVersion": api_version(kind),
           "metadata": metadata, "items": page})
}

/// The task behind one watch response.
struct WatchStream {
    state: Arc<Mutex<State>>,
    kind: Kind,
    ns: Option<String>,
    bookmarks: bool,
    timeout: Duration,
}

impl WatchStream {
    fn matches(&self, c: &Change) -> bool {
        c.plural == self.kind.plural
            && self
                .ns
                .as_deref()
                .is_none_or(|n| c.object["metadata"]["namespace"].as_str() == Some(n))
    }

    /// Sends 410 if `gone`, else the backlog after `from`, then live changes and bookmarks
    /// until the timeout, a drop, or the client leaves.
    async fn run(
        self,
        tx: mpsc::Sender<Bytes>,
        (backlog, mut live, mut dropped): (
            Vec<Change>,
            broadcast::Receiver<Change>,
            watch::Receiver<u64>,
        ),
        from: u64,
        gone: bool,
    ) {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if gone {
            let err = status(410, "Expired", "too old resource version");
            let _ = tx.send(line(json!({"type": "ERROR", "object": err}))).await;
            return;
        }
        let mut last = from;
        for c in backlog.into_iter().filter(|c| self.matches(c)) {
            last = c.rv;
            let event = json!({"type": c.kind, "object": c.object});
            if tx.send(line(event)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        loop {
            let event = tokio::select! {
                _ = &mut deadline => return,
                _ = dropped.changed() => return,
                _ = tick.tick(), if self.bookmarks => self.bookmark(),
                c = live.recv() => match c {
                    Ok(c) if c.rv > last && self.matches(&c) => {
                        last = c.rv;
                        json!({"type": c.kind, "object": c.object})
                    }
                    Ok(_) => continue,
                    // Lagged or closed: end the stream; the client re-watches.
                    Err(_) => return,
                },
            };
            if tx.send(line(event)).await.is_err() {
                return;
            }
        }
    }

    fn bookmark(&self) -> Value {
        let rv = self.state.lock().expect("state").rv;
        json!({"type": "BOOKMARK", "object": {"kind": self.kind.kind,
               "apiVersion": api_version(self.kind), "metadata": {"resourceVersion": rv.to_string()}}})
    }
}

/// A chunked watch from version `from`: the logged changes after it, then live ones, with
/// bookmarks; 410 Gone if `from` was compacted; ends on `timeoutSeconds` or a drop.
fn watch_stream(
    state: &Arc<Mutex<State>>,
    drops: &watch::Sender<u64>,
    kind: Kind,
    ns: Option<String>,
    from: u64,
    query: &BTreeMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let dropped = drops.subscribe();
    let (backlog, live, gone) = {
        let s = state.lock().expect("state");
        let gone = from < s.compacted;
        let backlog: Vec<Change> = s
            .log
            .iter()
            .filter(|c| c.rv > from && c.plural == kind.plural)
            .cloned()
            .collect();
        (backlog, s.changes.subscribe(), gone)
    };
    let stream = WatchStream {
        state: state.clone(),
        kind,
        ns,
        bookmarks,
        timeout,
    };
    tokio::spawn(stream.run(tx, (backlog, live, dropped), from, gone));
    let body = {
        use tokio_stream::StreamExt;
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b)));
        StreamBody::new(frames)
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .expect("response")
}
