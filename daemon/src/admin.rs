//! The localhost admin API (Envoy's admin port, 15000): `/clusters` (JSON), `/stats/prometheus`,
//! `/config_dump`, `/ready` and `POST /logging?level=`; and the publisher that mirrors per-endpoint
//! state into the daemon-written `EP_DSTATS` map every second, with or without the API (and
//! before every `/clusters` answer, so that the map and the answer show the same numbers).
//!
//! Invariants: read-only except `POST /logging`, whose level is one of [`LEVELS`]; every request
//! must name this API by a loopback `Host` (or the address it reached) and come from no foreign
//! browser origin, so neither a cross-site page nor DNS rebinding can use it; every answer is
//! computed from one registry snapshot plus the counters of [`crate::stats`]; binds to the
//! address it is given (loopback by default).

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry as PromRegistry,
};
use serde::Serialize;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{crd::ObjectMeta, source::Origin},
    redirect::Kernel,
    registry::{Cluster, Registry, RegistryHandle},
    stats::Health,
};

/// Changes the log filter at run time (`/logging?level=`); returns why it could not.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Errors of the admin listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin API cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the admin API serves from.
#[derive(Clone)]
pub struct Admin {
    pub registry: RegistryHandle,
    /// With eBPF capture: `/clusters` publishes `EP_DSTATS` before it answers.
    pub kernel: Option<Arc<Kernel>>,
    pub log: Option<LogControl>,
    /// Kubernetes mode: `/ready` waits for the watchers' first lists; their counters.
    pub api: Option<crate::kubernetes::Feed>,
}

/// `/clusters`: one entry per cluster of the current snapshot.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub name: String,
    /// The `cluster_id` of this cluster's `EP_DSTATS` keys.
    pub id: u32,
    pub host: String,
    pub port: u16,
    pub subset: Option<String>,
    pub lb: &'static str,
    pub circuit_breakers: Thresholds,
    /// Envoy's cluster statistics (counters and gauges) by their Envoy names.
    pub stats: BTreeMap<&'static str, u64>,
    pub outlier_detection: bool,
    pub endpoints: Vec<EndpointView>,
}

/// The cluster-wide thresholds (2³²−1 = unlimited, Istio's default).
#[derive(Debug, Serialize)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
}

/// One endpoint of a cluster.
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// Where an endpoint from the Kubernetes API came from (Pod, EndpointSlice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub name: String,
    pub address: SocketAddr,
    /// `healthy`, or `ejected` while outlier detection keeps it out of rotation.
    pub health: &'static str,
    pub weight: u32,
    /// `region/zone/subzone`, when known.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Failover priority for this client (0 = most preferred); `null` when the endpoint gets no
    /// traffic (its locality is not in `distribute`).
    pub priority: Option<usize>,
    /// Locality weight under `distribute`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locality_weight: Option<u32>,
    /// Slow-start weight in percent (100 outside the `warmup` window).
    pub warmup_percent: f64,
    pub cx_active: u64,
    pub rq_total: u64,
    pub rq_active: u64,
    pub rq_pending: u64,
    pub rq_5xx: u64,
    pub gateway_errors: u64,
    pub local_origin_failures: u64,
    pub outlier: Health,
    /// The kernel's counters of fast-path connections to this address (all clusters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastpath: Option<drover_common::EpKStats>,
}

// === impl Admin ===

impl Admin {
    /// Binds the admin address (done before anything is attached, so a busy port fails the start
    /// cleanly).
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    }

    /// Serves on `listener` until `shutdown`.
    pub fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<SocketAddr, Error> {
        let bound = listener.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let admin = Arc::new(self);
        accept_loop(
            listener,
            shutdown,
            "admin",
            move |req, local| match refuse(&req, local) {
                Some(r) => r,
                None => admin.answer(req),
            },
        );
        tracing::info!(%bound, "admin API listening");
        Ok(bound)
    }

    /// Ready once serving, and in Kubernetes mode once every watcher has listed; an Istio kind
    /// the API server refuses to list does not keep it unready, and is named (one line each).
    fn ready(&self) -> Response<crate::proxy::Body> {
        match &self.api {
            Some(feed) if !feed.is_synced() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "NOT READY: kubernetes watchers not synced\n",
                "text/plain",
            ),
            Some(feed) => {
                let mut body = String::from("LIVE\n");
                let unavailable = (feed.counters().unavailable.lock())
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                for (kind, error) in unavailable {
                    body.push_str(&format!("serving without {kind}: {error}\n"));
                }
                text(StatusCode::OK, &body, "text/plain")
            }
            None => text(StatusCode::OK, "LIVE\n", "text/plain"),
        }
    }

    /// `POST /logging?level=`: changes the log filter, when the daemon lets it.
    fn set_log_level(&self, query: &str) -> Response<crate::proxy::Body> {
        let level = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "level")
            .map(|(_, v)| v.to_string());
        match (level.as_deref().map(log_level), &self.log) {
            (Some(None), _) => text(
                StatusCode::BAD_REQUEST,
                &format!(
                    "unknown level {:?}; one of: {}\n",
                    level.unwrap_or_default(),
                    LEVELS.join(" ")
                ),
                "text/plain",
            ),
            (Some(Some(level)), Some(set)) => match set(level) {
                Ok(()) => {
                    tracing::info!(%level, "log level changed");
                    text(StatusCode::OK, &format!("level: {level}\n"), "text/plain")
                }
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n"), "text/plain"),
            },
            (None, _) => text(
                StatusCode::BAD_REQUEST,
                &format!("usage: POST /logging?level=<{}>\n", LEVELS.join("|")),
                "text/plain",
            ),
            (Some(Some(_)), None) => text(
                StatusCode::NOT_IMPLEMENTED,
                "log level is fixed\n",
                "text/plain",
            ),
        }
    }

    fn answer<B>(&self, req: Request<B>) -> Response<crate::proxy::Body> {
        let query = req.uri().query().unwrap_or("");
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ready" | "/healthz/ready") => self.ready(),
            (&Method::GET, "/clusters") => {
                let snapshot = self.registry.load();
                if let Some(kernel) = &self.kernel {
                    publish(kernel, &snapshot);
                }
                json(&serde_json::json!({
                    "clusters": clusters(&snapshot, self.kernel.as_deref()),
                    "inbound": &crate::stats::store().inbound,
                    "downstream": &crate::stats::store().downstream,
                    "kubernetes": self.api.as_ref().map(|f| f.counters()),
                }))
            }
            (&Method::GET, "/stats/prometheus") => {
                let mut reg = PromRegistry::default();
                reg.register_collector(Box::new(Prometheus(
                    self.registry.load(),
                    self.api.clone(),
                    self.kernel.clone(),
                )));
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &reg) {
                    // The encoder writes OpenMetrics (`# EOF`, `unknown` types), which the
                    // 0.0.4 text parser of Prometheus refuses: say so.
                    Ok(()) => text(StatusCode::OK, &out, OPENMETRICS),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &e.to_string(),
                        "text/plain",
                    ),
                }
            }
            (&Method::GET, "/config_dump") => json(&config_dump(&self.registry.load())),
            (&Method::POST, "/logging") => self.set_log_level(query),
            (_, "/logging") => {
                let mut r = text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "changing the log level takes POST /logging?level=\n",
                    "text/plain",
                );
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "endpoints: GET /clusters /stats/prometheus /config_dump /ready, POST /logging?level=\n",
                "text/plain",
            ),
        }
    }
}

/// Serves only `GET /healthz/ready` on `listener` (the readiness port a kubelet probes,
/// reachable from the node) until `shutdown`: 503 until `ready` is set, 200 after.
pub fn serve_readiness(
    listener: TcpListener,
    ready: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    let bound = listener.local_addr().ok();
    accept_loop(listener, shutdown, "readiness", move |req, _| {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz/ready") if ready.load(Ordering::Relaxed) => {
                text(StatusCode::OK, "LIVE\n", "text/plain")
            }
            (&Method::GET, "/healthz/ready") => {
                text(StatusCode::SERVICE_UNAVAILABLE, "NOT READY\n", "text/plain")
            }
            _ => text(StatusCode::NOT_FOUND, "GET /healthz/ready\n", "text/plain"),
        }
    });
    tracing::info!(bound = ?bound, "readiness endpoint listening");
}

/// Accepts HTTP/1.1 connections on `listener` until `shutdown`, answering each request with
/// `answer(request, local address)`.
fn accept_loop<F>(listener: TcpListener, shutdown: CancellationToken, what: &'static str, answer: F)
where
    F: Fn(Request<hyper::body::Incoming>, Option<SocketAddr>) -> Response<crate::proxy::Body>
        + Send
        + Sync
        + 'static,
{
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, what, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let answer = answer.clone();
            let local = stream.local_addr().ok();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = answer.clone();
                    async move { Ok::<_, Infallible>(answer(req, local)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// Mirrors the per-endpoint counters of the current snapshot into `EP_DSTATS` every second
/// until `shutdown`, so that `drover status` and `bpftool` see them whether or not the admin
/// API is served.
pub fn publish_endpoint_stats(
    registry: RegistryHandle,
    kernel: Arc<Kernel>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => publish(&kernel, &registry.load()),
            }
        }
    });
}

/// Mirrors every endpoint of `snapshot` into `EP_DSTATS` (rows of other clusters removed). A
/// snapshot with more rows than the map holds mirrors those of the lowest cluster ids (logged
/// once; the admin API's `/clusters` has every endpoint): a map that refuses inserts would have
/// to be read back whole every second.
fn publish(kernel: &Kernel, snapshot: &Registry) {
    let mut rows = Vec::new();
    for c in snapshot.clusters() {
        for (i, m) in c.members.iter().enumerate() {
            let health = c.outlier.as_ref().map(|o| o.health(i)).unwrap_or_default();
            rows.extend(
                m.stats
                    .row(c.stats.id, c.balancer.active(i) as u64, &health),
            );
        }
    }
    let capacity = drover_common::capacity::EP_DSTATS;
    if rows.len() > capacity {
        static TRUNCATED: std::sync::Once = std::sync::Once::new();
        TRUNCATED.call_once(|| {
            tracing::warn!(
                rows = rows.len(),
                capacity,
                "more endpoints than EP_DSTATS holds: bpftool shows those of the lowest cluster ids, the admin API's /clusters shows all"
            );
        });
        let order = |(k, _): &(drover_common::EpDKey, drover_common::EpDStats)| {
            (k.cluster_id, k.addr, k.port_be, k.proto)
        };
        rows.select_nth_unstable_by_key(capacity, order);
        rows.truncate(capacity);
    }
    if let Err(e) = kernel.publish_endpoint_stats(&rows) {
        tracing::warn!(error = %e, "cannot publish endpoint counters");
    }
}

/// The `/clusters` view of a snapshot, sorted by cluster name.
pub fn clusters(snapshot: &Registry, kernel: Option<&Kernel>) -> Vec<ClusterView> {
    let mut out: Vec<ClusterView> = snapshot
        .clusters()
        .map(|c| cluster(snapshot, c, kernel))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn cluster(snapshot: &Registry, c: &Cluster, kernel: Option<&Kernel>) -> ClusterView {
    let svc = &snapshot.services()[c.service];
    let (max_requests, max_pending, max_connections) = c.limits.thresholds();
    ClusterView {
        name: c.name.clone(),
        id: c.stats.id,
        host: svc.host.clone(),
        port: c.port,
        subset: c.subset.clone(),
        lb: c.balancer.name(),
        circuit_breakers: Thresholds {
            max_connections,
            max_pending_requests: max_pending,
            max_requests,
        },
        stats: cluster_stats(c, kernel),
        outlier_detection: c.outlier.is_some(),
        endpoints: endpoints(svc, c, kernel),
    }
}

/// A cluster's counters and gauges, by Envoy's names.
/// The kernel fast path's connections are counted apart (`fastpath_cx_*`): they never reach
/// the proxy's counters.
fn cluster_stats(c: &Cluster, kernel: Option<&Kernel>) -> BTreeMap<&'static str, u64> {
    let fast = kernel
        .and_then(|k| k.fast_cluster(c.stats.id))
        .unwrap_or_default();
    let s = &c.stats;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let (rq_active, rq_pending, cx_slots) = c.limits.gauges();
    let (ejected, overflow, enforced) = c.outlier.as_ref().map_or((0, 0, 0), |o| o.summary());
    BTreeMap::from([
        ("fastpath_cx_total", fast.total),
        ("fastpath_cx_active", u64::from(fast.active)),
        ("fastpath_cx_overflow", fast.overflow),
        ("upstream_rq_total", get(&s.rq_total)),
        ("upstream_rq_active", rq_active as u64),
        ("upstream_rq_pending_active", rq_pending as u64),
        ("upstream_rq_pending_total", get(&s.rq_pending_total)),
        ("upstream_rq_pending_overflow", get(&s.rq_pending_overflow)),
        (
            "upstream_rq_pending_failure_eject",
            get(&s.rq_pending_timeout),
        ),
        ("upstream_rq_overflow", get(&s.rq_overflow)),
        ("upstream_rq_retry", get(&s.rq_retry)),
        ("upstream_rq_retry_success", get(&s.rq_retry_success)),
        ("upstream_rq_retry_overflow", get(&s.rq_retry_overflow)),
        (
            "upstream_rq_retry_limit_exceeded",
            get(&s.rq_retry_limit_exceeded),
        ),
        ("upstream_cx_overflow", get(&s.cx_overflow)),
        ("upstream_cx_connect_fail", get(&s.cx_connect_fail)),
        ("upstream_cx_pool_slots_active", cx_slots as u64),
        ("upstream_rq_1xx", get(&s.rq_xx[0])),
        ("upstream_rq_2xx", get(&s.rq_xx[1])),
        ("upstream_rq_3xx", get(&s.rq_xx[2])),
        ("upstream_rq_4xx", get(&s.rq_xx[3])),
        ("upstream_rq_5xx", get(&s.rq_xx[4])),
        ("outlier_detection_ejections_active", ejected as u64),
        ("outlier_detection_ejections_overflow", overflow),
        ("outlier_detection_ejections_enforced_total", enforced),
        ("membership_total", c.members.len() as u64),
        ("ssl.handshake", get(&s.ssl_handshake)),
        ("ssl.fail_verify_san", get(&s.ssl_fail_verify_san)),
        ("ssl.fail_verify_error", get(&s.ssl_fail_verify_error)),
        ("ssl.connection_error", get(&s.ssl_connection_error)),
        ("ssl.session_reused", get(&s.ssl_session_reused)),
    ])
}

/// Each endpoint of a cluster with its counters and outlier state.
fn endpoints(
    svc: &crate::registry::Service,
    c: &Cluster,
    kernel: Option<&Kernel>,
) -> Vec<EndpointView> {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    c.members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (ep, e, addr) = (&m.stats, &m.endpoint, &m.addr);
            let health = c.outlier.as_ref().map(|o| o.health(i)).unwrap_or_default();
            EndpointView {
                name: svc.endpoints[*e].name.clone(),
                origin: svc.endpoints[*e].origin.clone(),
                address: *addr,
                health: if health.ejected { "ejected" } else { "healthy" },
                weight: svc.endpoints[*e].weight,
                locality: svc.endpoints[*e].locality.clone(),
                priority: match c.balancer.plan() {
                    Some(p) => p.placement(i).map(|(p, _)| p),
                    None => Some(0),
                },
                locality_weight: c
                    .balancer
                    .plan()
                    .filter(|p| p.weighted)
                    .and_then(|p| p.placement(i))
                    .map(|(_, w)| w),
                warmup_percent: c.balancer.warmup_percent(i),
                cx_active: get(&ep.cx_active),
                rq_total: get(&ep.rq_total),
                rq_active: c.balancer.active(i) as u64,
                rq_pending: get(&ep.rq_pending),
                rq_5xx: get(&ep.rq_5xx),
                gateway_errors: get(&ep.gateway_errors),
                local_origin_failures: get(&ep.local_origin_failures),
                outlier: health,
                fastpath: kernel.and_then(|k| k.fast_endpoint(*addr)),
            }
        })
        .collect()
}

/// `/config_dump`: the client identity and every resource of the loaded configuration, as the
/// CRD mirror read it, with the file it came from.
fn config_dump(snapshot: &Registry) -> serde_json::Value {
    let set = snapshot.config();
    let mut resources = Vec::new();
    let mut add = |kind: &str, origin: &Origin, meta: &ObjectMeta, spec: serde_json::Value| {
        resources.push(serde_json::json!({
            "kind": kind,
            // A file, or `Kind namespace/name` for an object read from the Kubernetes API.
            "source": origin.file.display().to_string(),
            "file": origin.file.display().to_string(),
            "document": origin.doc,
            "metadata": to_json(meta),
            "spec": spec,
        }));
    };
    for r in &set.service_entries {
        add("ServiceEntry", &r.origin, &r.meta, to_json(&r.spec));
    }
    for r in &set.workload_entries {
        add("WorkloadEntry", &r.origin, &r.meta, to_json(&r.spec));
    }
    for r in &set.destination_rules {
        add("DestinationRule", &r.origin, &r.meta, to_json(&r.spec));
    }
    for r in &set.virtual_services {
        add("VirtualService", &r.origin, &r.meta, to_json(&r.spec));
    }
    for r in &set.peer_authentications {
        add("PeerAuthentication", &r.origin, &r.meta, to_json(&r.spec));
    }
    for r in &set.authorization_policies {
        add("AuthorizationPolicy", &r.origin, &r.meta, to_json(&r.spec));
    }
    let client = snapshot.client();
    let inbound = snapshot.inbound_mtls();
    serde_json::json!({
        "client": {
            "namespace": client.namespace,
            "labels": client.labels,
            "workload": client.workload,
            "inbound_mtls": {
                "mode": inbound.mode.map(|m| m.to_string()),
                "ports": inbound.ports.iter().map(|(p, m)| (p.to_string(), m.to_string())).collect::<BTreeMap<_, _>>(),
                "from": inbound.from,
            },
        },
        "resources": resources,
        "clusters": snapshot.clusters().map(|c| c.name.clone()).collect::<std::collections::BTreeSet<_>>(),
        "warnings": snapshot.warnings().iter().map(|w| w.to_string()).collect::<Vec<_>>(),
    })
}

fn to_json(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Cluster statistics in Prometheus text, named as Envoy names them
/// (`envoy_cluster_<stat>{envoy_cluster_name="…"}`). Counters are written with type `unknown` so
/// that the names stay Envoy's exactly (the encoder would add `_total` to a `counter`).
#[derive(Debug)]
struct Prometheus(
    Arc<Registry>,
    Option<crate::kubernetes::Feed>,
    Option<Arc<Kernel>>,
);

impl Collector for Prometheus {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.encode_inbound(&mut encoder)?;
        let kernel = self.2.as_deref().map(|k| kernel_tcp(&self.0, k));
        crate::telemetry::metrics().encode(&mut encoder, &kernel.unwrap_or_default())?;
        encode_downstream(&mut encoder)?;
        if let Some(feed) = &self.1 {
            encode_kubernetes(feed.counters(), &mut encoder)?;
        }
        let views = clusters(&self.0, self.2.as_deref());
        let Some(first) = views.first() else {
            return Ok(());
        };

        for stat in first.stats.keys() {
            // Envoy's Prometheus names: dots become underscores.
            let name = format!("envoy_cluster_{}", stat.replace('.', "_"));
            let kind = if stat.ends_with("_active") {
                MetricType::Gauge
            } else {
                MetricType::Unknown
            };
            let mut family = encoder.encode_descriptor(&name, stat, None, kind)?;
            for v in &views {
                let labels = [("envoy_cluster_name", v.name.as_str())];
                let value = v.stats.get(stat).copied().unwrap_or(0) as i64;
                ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Prometheus {
    /// `drover_inbound_connections{result="…"}`.
    fn encode_inbound(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let inbound = &crate::stats::store().inbound;
        let mut family = encoder.encode_descriptor(
            "drover_inbound_connections",
            "inbound connections by outcome (mTLS terminated, plaintext passed or refused, …)",
            None,
            MetricType::Unknown,
        )?;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
        for (result, n) in [
            ("mtls", get(&inbound.mtls)),
            ("plaintext_passed", get(&inbound.plaintext_passed)),
            ("plaintext_refused", get(&inbound.plaintext_refused)),
            ("foreign_identity", get(&inbound.foreign_identity)),
            ("tls_error", get(&inbound.tls_error)),
            ("silent", get(&inbound.silent)),
            ("forward_failed", get(&inbound.forward_failed)),
            ("hbone", get(&inbound.hbone)),
            ("bad_target", get(&inbound.bad_target)),
            ("denied", get(&inbound.denied)),
        ] {
            ConstGauge::new(n).encode(family.encode_family(&[("result", result)])?)?;
        }
        let store = crate::stats::store();
        for (name, help, counts) in [
            (
                "drover_authz_denials",
                "connections closed and requests answered 403 by AuthorizationPolicy, by policy (\"\": no ALLOW policy matched)",
                &store.authz_denials,
            ),
            (
                "drover_authz_audits",
                "matches of AUDIT AuthorizationPolicies, by policy",
                &store.authz_audits,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            let counts = counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (policy, n) in counts {
                ConstCounter::new(n)
                    .encode(family.encode_family(&[("policy", policy.as_str())])?)?;
            }
        }
        Ok(())
    }
}

/// The connections the kernel balanced in `connect()` (no proxy hop), from its per-endpoint
/// counters, as standard TCP metrics of the daemon's client: one per endpoint address of each
/// service (`istio_tcp_sent_bytes` is what the endpoint sent).
fn kernel_tcp(
    snapshot: &Registry,
    kernel: &Kernel,
) -> Vec<(crate::telemetry::Edge, crate::telemetry::Tcp)> {
    let source = crate::telemetry::source("").workload;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for c in snapshot.clusters() {
        let svc = &snapshot.services()[c.service];
        for m in &c.members {
            if !seen.insert(m.addr) {
                continue;
            }
            let Some(k) = kernel.fast_endpoint(m.addr).filter(|k| k.established > 0) else {
                continue;
            };
            let at = Some((m.endpoint, false));
            let edge = crate::telemetry::outbound(&source, Some(svc.telemetry()), at);
            let tcp = crate::telemetry::Tcp {
                opened: k.established,
                closed: k.closed,
                sent: k.bytes_received,
                received: k.bytes_acked,
                flags: String::new(),
                overrides: None,
            };
            out.push((edge, tcp));
        }
    }
    out
}

/// `drover_kubernetes_{rejected_objects,watch_errors,relists,skipped_events,reconcile_failures}`.
fn encode_kubernetes(
    c: &crate::kubernetes::Counters,
    encoder: &mut DescriptorEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    for (name, help, v) in [
        (
            "drover_kubernetes_rejected_objects",
            "API objects rejected as invalid (each version once)",
            &c.rejected,
        ),
        (
            "drover_kubernetes_watch_errors",
            "watch failures recovered from (dropped connections, 410 Gone, API server down)",
            &c.watch_errors,
        ),
        (
            "drover_kubernetes_relists",
            "complete lists of a watched kind (the first included)",
            &c.relists,
        ),
        (
            "drover_kubernetes_skipped_events",
            "API events that changed nothing a snapshot reads (no rebuild)",
            &c.skipped,
        ),
        (
            "drover_kubernetes_reconcile_failures",
            "pods of this node a reconciliation pass could not enrol (retried on the next pass)",
            &c.reconcile_failures,
        ),
    ] {
        let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v.load(Ordering::Relaxed)).encode(family)?;
    }
    Ok(())
}

/// The downstream counters as Envoy names them (`envoy_http_downstream_*`, `_active` a gauge).
fn encode_downstream(encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let d = &crate::stats::store().downstream;
    for (stat, v) in [
        ("cx_total", &d.cx_total),
        ("cx_active", &d.cx_active),
        ("cx_overflow", &d.cx_overflow),
        ("cx_overload_memory", &d.cx_overload_memory),
        ("rq_header_timeout", &d.rq_header_timeout),
        ("cx_idle_timeout", &d.cx_idle_timeout),
        ("cx_parked", &d.cx_parked),
    ] {
        let kind = if stat.ends_with("_active") {
            MetricType::Gauge
        } else {
            MetricType::Unknown
        };
        let name = format!("envoy_http_downstream_{stat}");
        let family = encoder.encode_descriptor(&name, stat, None, kind)?;
        ConstGauge::new(v.load(Ordering::Relaxed) as i64).encode(family)?;
    }
    Ok(())
}

/// The content type of `/stats/prometheus`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn text(
    status: StatusCode,
    body: &str,
    content_type: &'static str,
) -> Response<crate::proxy::Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(v: &impl Serialize) -> Response<crate::proxy::Body> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => text(StatusCode::OK, &(s + "\n"), "application/json"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
            "text/plain",
        ),
    }
}

/// The levels `/logging` accepts (Envoy's names; `warning` and `critical` are aliases).
pub const LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warn", "warning", "error", "critical", "off",
];

/// The tracing filter for an admin log level, if it is one of [`LEVELS`].
fn log_level(level: &str) -> Option<&'static str> {
    Some(match level {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        _ => return None,
    })
}

/// Why a request is refused before it is looked at, if it is: its `Host` must name a loopback
/// address, `localhost` or the address the connection reached (so a DNS name rebound to this
/// address is refused), and a browser's cross-origin request (`Origin` of a non-loopback page,
/// `Sec-Fetch-Site: cross-site`) is refused.
fn refuse<B>(req: &Request<B>, local: Option<SocketAddr>) -> Option<Response<crate::proxy::Body>> {
    let forbidden = |why: &str| {
        Some(text(
            StatusCode::FORBIDDEN,
            &format!("{why}\n"),
            "text/plain",
        ))
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if local_name(&h, local) => {}
        Some(h) => return forbidden(&format!("Host {h:?} is not this admin API's address")),
        None => return forbidden("a Host header is required"),
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin.split_once("://").map_or("", |(_, a)| a);
        if !local_name(authority, local) {
            return forbidden(&format!("cross-origin request from {origin:?}"));
        }
    }
    if req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return forbidden("cross-site request");
    }
    None
}

/// Whether `authority` (`host[:port]`) is `localhost`, a loopback address or `local`'s address.
fn local_name(authority: &str, local: Option<SocketAddr>) -> bool {
    let host = match authority.parse::<hyper::http::uri::Authority>() {
        Ok(a) => a
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        Err(_) => return false,
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback() || local.is_some_and(|l| l.ip() == ip))
}
