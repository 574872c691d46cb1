//! Istio's standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_*`), with Istio's names, types,
//! buckets and label set, so that Kiali's graph and the Istio dashboards read a Drover mesh as
//! they read a sidecar mesh.
//!
//! Who the peers are is worked out once, when a snapshot is built ([`Peer`], [`ServiceName`]):
//! a pod's workload is named as Istio names it (its controller through ReplicaSet to Deployment,
//! Job to CronJob, else the pod; [`workload_name`]), `app`/`version` and the canonical service
//! and revision come from its labels with Istio's fallbacks. The data path only hands the
//! shared peers and the request's outcome to [`Metrics::http`] / [`Metrics::tcp`].
//!
//! Invariants: a series is keyed by its label values (two snapshots naming the same peers add
//! to the same series); the number of series never exceeds the configured limit
//! (`--metrics-max-series`): past it, a new label set is folded into one whose peers and
//! service are `unknown` and the fold is counted (`drover_metrics_folded_total`), so that no
//! client-controlled value (a `Host`, an address) grows memory without bound; counters only grow.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    hash::Hash,
    sync::{
        Arc, LazyLock, Mutex, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet};
use prometheus_client::metrics::{MetricType, counter::ConstCounter};

use crate::config::policy::StandardMetric;

pub mod settings;
#[cfg(test)]
mod tests;

pub use settings::Settings;

/// The value Istio writes for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";
/// The cluster id Istio reports when none is configured.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";
/// Series kept before new label sets are folded (`--metrics-max-series`).
pub const DEFAULT_MAX_SERIES: usize = 10_000;

/// Envoy's default histogram buckets, which Istio's duration and size histograms use
/// (milliseconds for durations, bytes for sizes).
pub const BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

static TRUST_DOMAIN: OnceLock<String> = OnceLock::new();

/// Sets the trust domain principals are written in (once, at start).
pub fn set_trust_domain(domain: &str) {
    let _ = TRUST_DOMAIN.set(domain.to_string());
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn principal(namespace: &str, service_account: &str) -> String {
    let domain = TRUST_DOMAIN.get().map_or("cluster.local", String::as_str);
    format!("spiffe://{domain}/ns/{namespace}/sa/{service_account}")
}

/// One side of a connection or request, as the `source_*` / `destination_*` labels name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    /// The SPIFFE identity its certificate carries (`unknown` without mTLS).
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

/// A workload's labels as a peer that proved its identity (mTLS) and as one that did not.
#[derive(Clone, Debug)]
pub struct Workload {
    plain: Arc<Peer>,
    mtls: Arc<Peer>,
}

/// A service's labels and those of its endpoints (by index into the service's endpoints),
/// worked out on first use.
#[derive(Clone, Debug)]
pub struct Destinations {
    pub service: Arc<ServiceName>,
    pub endpoints: Vec<Workload>,
}

/// The `destination_service*` labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    /// The host (`reviews.default.svc.cluster.local`), or `address:port` for passthrough.
    pub host: String,
    pub name: String,
    pub namespace: String,
}

/// Who reports a series: the client's side (outbound) or the server's (inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// `connection_security_policy`: what the reporting side knows of the connection's security
/// (the source side reports `unknown`, as Istio's does).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Security {
    Unknown,
    MutualTls,
    None,
}

/// `request_protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
    Tcp,
}

/// Who talked to whom: the labels every standard metric carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Edge {
    pub reporter: Reporter,
    pub source: Arc<Peer>,
    pub destination: Arc<Peer>,
    pub service: Arc<ServiceName>,
    pub security: Security,
}

/// One finished HTTP request.
#[derive(Clone, Debug)]
pub struct Request {
    pub protocol: Protocol,
    pub code: u16,
    /// `grpc-status` of a gRPC response.
    pub grpc_status: Option<u32>,
    /// Envoy's response flags as rendered (`-` for none).
    pub flags: String,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// What the workload's metric overrides do to this request's series.
    pub overrides: Option<Arc<settings::Overrides>>,
}

/// One TCP connection's contribution: opened, bytes since the last report, closed.
#[derive(Clone, Debug, Default)]
pub struct Tcp {
    pub opened: u64,
    pub closed: u64,
    pub sent: u64,
    pub received: u64,
    pub flags: String,
    /// What the workload's metric overrides do to this connection's series.
    pub overrides: Option<Arc<settings::Overrides>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HttpKey {
    edge: Edge,
    protocol: Protocol,
    code: u16,
    grpc_status: Option<u32>,
    flags: String,
    overrides: Option<Arc<settings::Overrides>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TcpKey {
    edge: Edge,
    flags: String,
    overrides: Option<Arc<settings::Overrides>>,
}

/// A histogram with [`BUCKETS`] (plus `+Inf`).
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum in thousandths of the unit (µs for durations, mB for sizes), so that it stays an
    /// atomic integer.
    sum_milli: AtomicU64,
}

#[derive(Debug, Default)]
struct HttpSeries {
    requests: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

#[derive(Debug, Default)]
struct TcpSeries {
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// Every standard-metric series of this process.
#[derive(Debug)]
pub struct Metrics {
    http: Mutex<Series<HttpKey, HttpSeries>>,
    tcp: Mutex<Series<TcpKey, TcpSeries>>,
    max_series: AtomicUsize,
    /// Label sets folded into `unknown` peers because the limit was reached.
    folded: AtomicU64,
}

/// Series by label set. Keys are hashed with foldhash, seeded per process: a label set is a
/// dozen strings, which SipHash made the larger part of recording one; the series limit
/// bounds what a client could make collide.
type Series<K, S> = HashMap<K, Arc<S>, foldhash::fast::RandomState>;

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics::new(DEFAULT_MAX_SERIES));

/// Whether the standard metrics are recorded (`--no-standard-metrics` turns them off).
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the standard metrics on or off (at start).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// The process's standard metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The workload of an enrolled network namespace: its labels as a peer and what the Telemetry
/// resources say for it.
#[derive(Clone, Debug)]
pub struct Source {
    pub workload: Workload,
    pub settings: Arc<Settings>,
}

/// Each enrolled network namespace's workload, by netns name (`""`: the daemon's `--client-*`
/// identity, for every namespace not listed).
static SOURCES: LazyLock<std::sync::RwLock<HashMap<String, Source>>> =
    LazyLock::new(Default::default);

/// Names the workload of network namespace `netns` (`""`: the daemon's own client).
pub fn set_source(netns: &str, w: Source) {
    let mut m = SOURCES.write().unwrap_or_else(|p| p.into_inner());
    m.insert(netns.to_string(), w);
}

/// Forgets the workload of a namespace that left.
pub fn forget_source(netns: &str) {
    let mut m = SOURCES.write().unwrap_or_else(|p| p.into_inner());
    m.remove(netns);
}

/// The workload that opens the connections captured in `netns`.
pub fn source(netns: &str) -> Source {
    let m = SOURCES.read().unwrap_or_else(|p| p.into_inner());
    m.get(netns)
        .or_else(|| m.get(""))
        .cloned()
        .unwrap_or_else(|| Source {
            workload: Workload::unknown(),
            settings: Arc::default(),
        })
}

impl Source {
    /// A relayed connection of this workload to `edge` (`None`: not routed) to `host`,
    /// counted opened.
    pub fn tcp_connection(&self, edge: Option<Edge>, host: &str) -> Connection {
        let edge = edge.unwrap_or_else(|| outbound(&self.workload, None, None));
        let attributes = settings::Attributes {
            host,
            ..Default::default()
        };
        Connection::open(edge, self.settings.overrides(true, &attributes))
    }
}

/// The daemon's `--client-*` identity (named by its WorkloadEntry, if any) in `snapshot`.
pub fn client_source(snapshot: &crate::registry::Registry) -> Source {
    let client = snapshot.client();
    let name = (client.workload.as_deref()).map(|id| id.rsplit('/').next().unwrap_or(id));
    Source {
        workload: Workload::new(
            Peer::new(name, &client.namespace, &client.labels, None),
            None,
        ),
        settings: Arc::new(snapshot.telemetry_for(&client.namespace, &client.labels)),
    }
}

/// The shared `unknown` peer.
pub fn unknown_peer() -> Arc<Peer> {
    static P: LazyLock<Arc<Peer>> = LazyLock::new(|| Arc::new(Peer::unknown()));
    P.clone()
}

/// The shared `unknown` service.
pub fn unknown_service() -> Arc<ServiceName> {
    static S: LazyLock<Arc<ServiceName>> = LazyLock::new(|| {
        Arc::new(ServiceName {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        })
    });
    S.clone()
}

/// The name Istio gives a pod's workload: its controller's, with a ReplicaSet named
/// `<deployment>-<pod-template-hash>` read as its Deployment and a Job named
/// `<cronjob>-<8 to 10 digits>` as its CronJob; the pod's own name when it has no controller.
pub fn workload_name(
    pod: &str,
    controller: Option<(&str, &str)>,
    labels: &BTreeMap<String, String>,
) -> String {
    let Some((kind, name)) = controller else {
        return pod.to_string();
    };
    match kind {
        "ReplicaSet" => labels
            .get("pod-template-hash")
            .and_then(|hash| name.strip_suffix(hash.as_str()))
            .and_then(|n| n.strip_suffix('-'))
            .filter(|n| !n.is_empty())
            .unwrap_or(name)
            .to_string(),
        "Job" => match name.rsplit_once('-') {
            Some((cron, stamp))
                if !cron.is_empty()
                    && (8..=10).contains(&stamp.len())
                    && stamp.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_string()
            }
            _ => name.to_string(),
        },
        _ => name.to_string(),
    }
}

// === impl Peer ===

impl Peer {
    /// Every label `unknown`.
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// A workload `workload` (unknown: `None`) in `namespace` with `labels`; `principal` its
    /// SPIFFE identity when the connection proves it. `app` is the `app` label (else
    /// `app.kubernetes.io/name`), `version` the `version` label (else
    /// `app.kubernetes.io/version`); the canonical service is `service.istio.io/canonical-name`,
    /// else `app.kubernetes.io/name`, else `app`, else the workload, and its revision
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else `version`,
    /// else `latest` (Istio's rules).
    pub fn new(
        workload: Option<&str>,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        principal: Option<String>,
    ) -> Self {
        let first = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let workload = workload
            .filter(|w| !w.is_empty())
            .unwrap_or(UNKNOWN)
            .to_string();
        let canonical_service = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload.clone());
        Self {
            app: first(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| UNKNOWN.into()),
            version: first(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| UNKNOWN.into()),
            canonical_revision: first(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".into()),
            canonical_service,
            workload,
            namespace: if namespace.is_empty() {
                UNKNOWN.into()
            } else {
                namespace.to_string()
            },
            principal: principal.unwrap_or_else(|| UNKNOWN.into()),
            cluster: DEFAULT_CLUSTER.into(),
        }
    }

    /// A peer known only by its certificate's SPIFFE id: the principal and the namespace it
    /// names (`spiffe://<domain>/ns/<namespace>/sa/<account>`).
    pub fn from_principal(principal: &str) -> Self {
        let namespace = principal
            .split_once("/ns/")
            .and_then(|(_, rest)| rest.split_once("/sa/"))
            .map(|(ns, _)| ns.to_string());
        Self {
            namespace: namespace.unwrap_or_else(|| UNKNOWN.into()),
            principal: principal.to_string(),
            ..Self::unknown()
        }
    }

    /// The same peer with `principal`.
    pub fn with_principal(&self, principal: String) -> Self {
        Self {
            principal,
            ..self.clone()
        }
    }
}

// === impl Workload ===

impl Workload {
    /// `peer`, whose certificate (when it shows one) names `principal`.
    pub fn new(peer: Peer, principal: Option<String>) -> Self {
        let mtls = match principal {
            Some(p) => Arc::new(peer.with_principal(p)),
            None => Arc::new(peer.clone()),
        };
        Self {
            plain: Arc::new(peer),
            mtls,
        }
    }

    /// Nobody known.
    pub fn unknown() -> Self {
        Self {
            plain: unknown_peer(),
            mtls: unknown_peer(),
        }
    }

    /// The labels for a connection that proved the identity (`mtls`) or did not.
    pub fn peer(&self, mtls: bool) -> &Arc<Peer> {
        if mtls { &self.mtls } else { &self.plain }
    }
}

// === impl Destinations ===

impl Destinations {
    /// The labels of service `host` in `namespace` and of its `endpoints`: an endpoint's
    /// workload is its pod's (or its WorkloadEntry's name), in the service's namespace, its
    /// principal from its service account.
    pub fn new(host: &str, namespace: &str, endpoints: &[crate::config::policy::Endpoint]) -> Self {
        Self {
            service: Arc::new(ServiceName::new(host, namespace)),
            endpoints: endpoints
                .iter()
                .map(|e| {
                    let peer = Peer::new(e.workload.as_deref(), namespace, &e.labels, None);
                    let principal = (!e.service_account.is_empty())
                        .then(|| principal(namespace, &e.service_account));
                    Workload::new(peer, principal)
                })
                .collect(),
        }
    }
}

/// The `reporter="source"` edge of a connection or request from `source` to `service`, at its
/// endpoint `(index, whether the connection proves both identities)` when one was picked.
pub fn outbound(
    source: &Workload,
    service: Option<&Destinations>,
    endpoint: Option<(usize, bool)>,
) -> Edge {
    let mtls = endpoint.is_some_and(|(_, m)| m);
    let destination = endpoint
        .and_then(|(i, _)| service?.endpoints.get(i))
        .map_or_else(unknown_peer, |w| w.peer(mtls).clone());
    Edge {
        reporter: Reporter::Source,
        source: source.peer(mtls).clone(),
        destination,
        service: service.map_or_else(unknown_service, |d| d.service.clone()),
        security: Security::Unknown,
    }
}

// === impl ServiceName ===

impl ServiceName {
    /// The labels of service `host` in `namespace`: a Kubernetes host
    /// (`<name>.<namespace>.svc.<domain>`) is named by its first label, any other by the host.
    pub fn new(host: &str, namespace: &str) -> Self {
        let name = match host.split_once('.') {
            Some((name, rest)) if rest.starts_with(&format!("{namespace}.svc.")) => name,
            _ => host,
        };
        Self {
            host: host.to_string(),
            name: name.to_string(),
            namespace: namespace.to_string(),
        }
    }

    /// A destination no service names (Istio's `PassthroughCluster`): `host` is the authority
    /// or `address:port`.
    pub fn passthrough(host: String) -> Self {
        Self {
            host,
            name: "PassthroughCluster".into(),
            namespace: UNKNOWN.into(),
        }
    }
}

// === impl Histogram ===

impl Histogram {
    fn observe(&self, v: f64) {
        let i = BUCKETS.partition_point(|b| *b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_milli
            .fetch_add((v * 1000.0) as u64, Ordering::Relaxed);
    }

    /// `(sum, count, buckets)` as the encoder takes them (per bucket, not cumulative).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<u64> = (self.buckets.iter())
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let bounds = BUCKETS.iter().copied().chain([f64::INFINITY]);
        let sum = self.sum_milli.load(Ordering::Relaxed) as f64 / 1000.0;
        (sum, counts.iter().sum(), bounds.zip(counts).collect())
    }
}

// === impl TcpSeries ===

impl TcpSeries {
    fn add(&self, t: &Tcp) {
        for (counter, n) in [
            (&self.opened, t.opened),
            (&self.closed, t.closed),
            (&self.sent, t.sent),
            (&self.received, t.received),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn counts(&self) -> Tcp {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tcp {
            opened: get(&self.opened),
            closed: get(&self.closed),
            sent: get(&self.sent),
            received: get(&self.received),
            flags: String::new(),
            overrides: None,
        }
    }
}

// === impl Connection ===

/// One relayed TCP connection's standard metrics while it runs, reported as Istio's proxies
/// report them: opened when the relay starts, its bytes every reporting interval and at close,
/// closed at close. Each byte is counted once; its series is looked up once (a close with
/// response flags goes to the series with them).
pub struct Connection {
    metrics: &'static Metrics,
    edge: Edge,
    overrides: Option<Arc<settings::Overrides>>,
    /// Its series without response flags (`None`: metrics are off).
    series: Option<Arc<TcpSeries>>,
    /// Reported so far: (received from the client, sent to it).
    reported: (u64, u64),
}

impl Connection {
    /// Counts a connection opened on `edge`.
    pub fn open(edge: Edge, overrides: Option<Arc<settings::Overrides>>) -> Self {
        Self::open_in(metrics(), edge, overrides)
    }

    /// [`Self::open`] in the store `metrics`.
    fn open_in(
        metrics: &'static Metrics,
        edge: Edge,
        overrides: Option<Arc<settings::Overrides>>,
    ) -> Self {
        let series = metrics.tcp_series(&edge, "", &overrides);
        if let Some(s) = &series {
            s.opened.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            metrics,
            edge,
            overrides,
            series,
            reported: (0, 0),
        }
    }

    /// Adds the bytes moved since the last report (from the client, to it).
    pub fn moved(&mut self, received: u64, sent: u64) {
        if let Some(s) = &self.series {
            s.add(&Tcp {
                received,
                sent,
                ..Default::default()
            });
        }
        self.reported.0 += received;
        self.reported.1 += sent;
    }

    /// Counts it closed, adding what of its `total` bytes (from the client, to it) was not
    /// reported yet.
    pub fn close(self, total: (u64, u64)) {
        let overrides = self.overrides.clone();
        self.close_flagged(total, String::new(), overrides);
    }

    /// [`Self::close`] with response flags, and the overrides a series with them gets.
    pub fn close_flagged(
        self,
        total: (u64, u64),
        flags: String,
        overrides: Option<Arc<settings::Overrides>>,
    ) {
        let t = Tcp {
            closed: 1,
            received: total.0.saturating_sub(self.reported.0),
            sent: total.1.saturating_sub(self.reported.1),
            flags,
            overrides,
            ..Default::default()
        };
        match &self.series {
            Some(s) if t.flags.is_empty() && t.overrides == self.overrides => s.add(&t),
            _ => self.metrics.tcp(&self.edge, &t),
        }
    }
}

// === impl Request ===

impl Request {
    /// Adds a response frame that passed: its data to the response bytes, trailers too (and
    /// their `grpc-status`).
    pub fn count(&mut self, frame: &hyper::body::Frame<bytes::Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.response_bytes += data.len() as u64;
        } else if let Some(trailers) = frame.trailers_ref() {
            self.response_bytes += header_bytes(trailers);
            if let Some(status) = trailers.get("grpc-status") {
                self.grpc_status = status.to_str().ok().and_then(|s| s.parse().ok());
            }
        }
    }
}

/// A response body that counts its request in the standard metrics once it ends or is
/// dropped (with the bytes and gRPC status that passed, and the time until then).
pub struct Metered<B> {
    body: B,
    edge: Edge,
    request: Request,
    start: std::time::Instant,
}

impl<B> Metered<B> {
    /// `body`, whose request started at `start`, counted as `request` on `edge`.
    pub fn new(body: B, edge: Edge, request: Request, start: std::time::Instant) -> Self {
        Self {
            body,
            edge,
            request,
            start,
        }
    }
}

impl<B> hyper::body::Body for Metered<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            self.request.count(frame);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        self.request.duration = self.start.elapsed();
        metrics().http(&self.edge, &self.request);
    }
}

/// The wire size of `headers` as HTTP/1.1 writes them (`name: value\r\n`).
pub fn header_bytes(headers: &hyper::HeaderMap) -> u64 {
    (headers.iter())
        .map(|(n, v)| (n.as_str().len() + v.len() + 4) as u64)
        .sum()
}

/// `istio_request_bytes` of a request: its headers' size plus its declared body length.
pub fn request_bytes(headers: &hyper::HeaderMap) -> u64 {
    header_bytes(headers)
        + (headers.get(hyper::header::CONTENT_LENGTH))
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(0)
}

/// The gRPC status of an HTTP status, as gRPC maps them (404 `UNIMPLEMENTED`, 429 and 502–504
/// `UNAVAILABLE`, …; `UNKNOWN` otherwise).
pub fn grpc_status_for(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// A gRPC request or response (`content-type: application/grpc…`).
pub fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    (headers.get(hyper::header::CONTENT_TYPE))
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Whether the standard metrics are recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

// === impl Metrics ===

impl Metrics {
    /// An empty store that keeps at most `max_series` series of each kind.
    pub fn new(max_series: usize) -> Self {
        Self {
            http: Mutex::default(),
            tcp: Mutex::default(),
            max_series: AtomicUsize::new(max_series),
            folded: AtomicU64::new(0),
        }
    }

    /// Sets the series limit (`--metrics-max-series`).
    pub fn set_max_series(&self, max: usize) {
        self.max_series.store(max.max(1), Ordering::Relaxed);
    }

    /// Counts one finished request.
    pub fn http(&self, edge: &Edge, r: &Request) {
        if !ENABLED.load(Ordering::Relaxed) {
            return;
        }
        let key = HttpKey {
            edge: edge.clone(),
            protocol: r.protocol,
            code: r.code,
            grpc_status: r.grpc_status,
            flags: r.flags.clone(),
            overrides: r.overrides.clone(),
        };
        let series = self.series(&self.http, key, |k| HttpKey {
            edge: folded(&k.edge),
            ..k
        });
        series.requests.fetch_add(1, Ordering::Relaxed);
        series.duration.observe(r.duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(r.request_bytes as f64);
        series.response_bytes.observe(r.response_bytes as f64);
    }

    /// Adds one TCP connection's counts.
    pub fn tcp(&self, edge: &Edge, t: &Tcp) {
        if let Some(series) = self.tcp_series(edge, &t.flags, &t.overrides) {
            series.add(t);
        }
    }

    /// The TCP series of `edge` with `flags` and `overrides` (`None`: metrics are off).
    fn tcp_series(
        &self,
        edge: &Edge,
        flags: &str,
        overrides: &Option<Arc<settings::Overrides>>,
    ) -> Option<Arc<TcpSeries>> {
        if !ENABLED.load(Ordering::Relaxed) {
            return None;
        }
        let key = TcpKey {
            edge: edge.clone(),
            flags: flags.to_string(),
            overrides: overrides.clone(),
        };
        Some(self.series(&self.tcp, key, |k| TcpKey {
            edge: folded(&k.edge),
            ..k
        }))
    }

    /// Label sets folded so far.
    pub fn folded(&self) -> u64 {
        self.folded.load(Ordering::Relaxed)
    }

    /// Series kept (HTTP, TCP).
    pub fn series_count(&self) -> (usize, usize) {
        (locked(&self.http).len(), locked(&self.tcp).len())
    }

    /// The series of `key`, created when there is room, else the series of `fold(key)`.
    fn series<K: Hash + Eq + Clone, S: Default>(
        &self,
        map: &Mutex<Series<K, S>>,
        key: K,
        fold: impl FnOnce(K) -> K,
    ) -> Arc<S> {
        let mut map = locked(map);
        if let Some(s) = map.get(&key) {
            return s.clone();
        }
        let key = if map.len() >= self.max_series.load(Ordering::Relaxed) {
            self.folded.fetch_add(1, Ordering::Relaxed);
            fold(key)
        } else {
            key
        };
        map.entry(key).or_default().clone()
    }

    /// Writes every family in Prometheus text through `encoder`, with `kernel` (connections
    /// the kernel balanced itself, read from its counters at this scrape) added to the TCP
    /// series. Series whose labels a metric override made equal are summed; a family an
    /// override disabled is left out.
    pub fn encode(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        kernel: &[(Edge, Tcp)],
    ) -> Result<(), std::fmt::Error> {
        use StandardMetric as M;
        let http: Vec<_> = (locked(&self.http).iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut tcp: Vec<(TcpKey, Tcp)> = (locked(&self.tcp).iter())
            .map(|(k, v)| (k.clone(), v.counts()))
            .collect();
        for (edge, t) in kernel {
            tcp.push((
                TcpKey {
                    edge: edge.clone(),
                    flags: t.flags.clone(),
                    overrides: None,
                },
                t.clone(),
            ));
        }

        let mut family = encoder.encode_descriptor(
            "istio_requests",
            "Requests, by source and destination workload (Istio standard metric)",
            None,
            MetricType::Counter,
        )?;
        let counts = sum(&http, M::RequestCount, labels_http, |s| {
            s.requests.load(Ordering::Relaxed)
        });
        for (labels, v) in &counts {
            ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
        }
        type Pick = fn(&HttpSeries) -> &Histogram;
        let histograms: [(&str, &str, M, Pick); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds (Istio standard metric)",
                M::RequestDuration,
                |s| &s.duration,
            ),
            (
                "istio_request_bytes",
                "Request size (headers and body) in bytes (Istio standard metric)",
                M::RequestSize,
                |s| &s.request_bytes,
            ),
            (
                "istio_response_bytes",
                "Response size (headers and body) in bytes (Istio standard metric)",
                M::ResponseSize,
                |s| &s.response_bytes,
            ),
        ];
        for (name, help, metric, pick) in histograms {
            let mut merged: BTreeMap<Labels, (f64, Vec<(f64, u64)>)> = BTreeMap::new();
            for (k, s) in &http {
                let Some(labels) = labels_http(k, metric) else {
                    continue;
                };
                let (sum, _, buckets) = pick(s).snapshot();
                let e = merged.entry(labels).or_insert_with(|| (0.0, Vec::new()));
                e.0 += sum;
                if e.1.is_empty() {
                    e.1 = buckets;
                } else {
                    for (acc, (_, n)) in e.1.iter_mut().zip(buckets) {
                        acc.1 += n;
                    }
                }
            }
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, (sum, buckets)) in &merged {
                let count = buckets.iter().map(|(_, n)| n).sum();
                family
                    .encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(*sum, count, buckets, None)?;
            }
        }
        type TcpPick = fn(&Tcp) -> u64;
        let counters: [(&str, &str, M, TcpPick); 4] = [
            (
                "istio_tcp_sent_bytes",
                "Bytes sent to the client of a TCP connection (Istio standard metric)",
                M::TcpSentBytes,
                |t| t.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the client of a TCP connection (Istio standard metric)",
                M::TcpReceivedBytes,
                |t| t.received,
            ),
            (
                "istio_tcp_connections_opened",
                "TCP connections opened (Istio standard metric)",
                M::TcpOpenedConnections,
                |t| t.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed (Istio standard metric)",
                M::TcpClosedConnections,
                |t| t.closed,
            ),
        ];
        for (name, help, metric, pick) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, v) in &sum(&tcp, metric, labels_tcp, pick) {
                ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
            }
        }
        let family = encoder.encode_descriptor(
            "drover_metrics_folded",
            "label sets folded into unknown peers because --metrics-max-series was reached",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.folded()).encode(family)?;
        Ok(())
    }
}

/// `metric`'s value per label set over `series` (summed where overrides made labels equal).
fn sum<K, S>(
    series: &[(K, S)],
    metric: StandardMetric,
    labels: fn(&K, StandardMetric) -> Option<Labels>,
    value: impl Fn(&S) -> u64,
) -> BTreeMap<Labels, u64> {
    let mut out = BTreeMap::new();
    for (k, s) in series {
        if let Some(l) = labels(k, metric) {
            *out.entry(l).or_default() += value(s);
        }
    }
    out
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `edge` with its peers and service unknown.
fn folded(edge: &Edge) -> Edge {
    Edge {
        source: unknown_peer(),
        destination: unknown_peer(),
        service: unknown_service(),
        ..edge.clone()
    }
}

type Labels = Vec<(Cow<'static, str>, String)>;

/// The label set of an edge and its outcome, in Istio's order.
fn labels(edge: &Edge, protocol: &str, code: String, grpc: String, flags: &str) -> Labels {
    let (s, d, svc) = (&*edge.source, &*edge.destination, &*edge.service);
    let list: [(&'static str, String); 25] = [
        (
            "reporter",
            match edge.reporter {
                Reporter::Source => "source",
                Reporter::Destination => "destination",
            }
            .into(),
        ),
        ("source_workload", s.workload.clone()),
        ("source_canonical_service", s.canonical_service.clone()),
        ("source_canonical_revision", s.canonical_revision.clone()),
        ("source_workload_namespace", s.namespace.clone()),
        ("source_principal", s.principal.clone()),
        ("source_app", s.app.clone()),
        ("source_version", s.version.clone()),
        ("source_cluster", s.cluster.clone()),
        ("destination_workload", d.workload.clone()),
        ("destination_workload_namespace", d.namespace.clone()),
        ("destination_principal", d.principal.clone()),
        ("destination_app", d.app.clone()),
        ("destination_version", d.version.clone()),
        ("destination_service", svc.host.clone()),
        ("destination_canonical_service", d.canonical_service.clone()),
        (
            "destination_canonical_revision",
            d.canonical_revision.clone(),
        ),
        ("destination_service_name", svc.name.clone()),
        ("destination_service_namespace", svc.namespace.clone()),
        ("destination_cluster", d.cluster.clone()),
        ("request_protocol", protocol.into()),
        ("response_code", code),
        ("grpc_response_status", grpc),
        (
            "response_flags",
            if flags.is_empty() { "-" } else { flags }.into(),
        ),
        (
            "connection_security_policy",
            match edge.security {
                Security::Unknown => UNKNOWN,
                Security::MutualTls => "mutual_tls",
                Security::None => "none",
            }
            .into(),
        ),
    ];
    list.into_iter()
        .map(|(k, v)| (Cow::Borrowed(k), v))
        .collect()
}

/// `labels` as the overrides of `metric` leave them: `None` when they disable it.
fn overridden(
    mut labels: Labels,
    overrides: Option<&settings::Overrides>,
    metric: StandardMetric,
) -> Option<Labels> {
    let Some(o) = overrides.and_then(|o| o.get(&metric)) else {
        return Some(labels);
    };
    if o.disabled {
        return None;
    }
    for (tag, value) in &o.tags {
        let at = labels.iter().position(|(k, _)| k == tag);
        match (at, value) {
            (Some(i), None) => drop(labels.remove(i)),
            (Some(i), Some(v)) => labels[i].1 = v.clone(),
            (None, Some(v)) => labels.push((Cow::Owned(tag.clone()), v.clone())),
            (None, None) => {}
        }
    }
    Some(labels)
}

fn labels_http(k: &HttpKey, metric: StandardMetric) -> Option<Labels> {
    let protocol = match k.protocol {
        Protocol::Grpc => "grpc",
        _ => "http",
    };
    let grpc = k.grpc_status.map(|g| g.to_string()).unwrap_or_default();
    let all = labels(&k.edge, protocol, k.code.to_string(), grpc, &k.flags);
    overridden(all, k.overrides.as_deref(), metric)
}

fn labels_tcp(k: &TcpKey, metric: StandardMetric) -> Option<Labels> {
    let all = labels(&k.edge, "tcp", "0".into(), String::new(), &k.flags);
    overridden(all, k.overrides.as_deref(), metric)
}
