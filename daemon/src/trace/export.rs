//! Sampled spans out over OTLP (gRPC or HTTP/protobuf) with the `opentelemetry-otlp` exporter,
//! as an Istio sidecar reports them: one CLIENT span per outbound request, named
//! `<host>:<port>/*`, with Envoy's tags (`http.method`, `http.url`, `http.status_code`,
//! `response_flags`, `upstream_cluster`, `upstream_address`, `guid:x-request-id`, …) and the
//! peer's workload and namespace; the resource's `service.name` is the source workload's
//! `<canonical service>.<namespace>`, as Istio names it.
//!
//! Invariants: the data path never waits on the collector — a finished span is handed to a
//! bounded queue and dropped (counted) when the queue is full; a batch is exported at most every
//! [`FLUSH`] or at [`BATCH`] spans, spans of one source workload per export call.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks},
};
use tokio::sync::mpsc;

/// Spans exported together at most.
pub const BATCH: usize = 512;
/// How long a finished span waits for its batch.
pub const FLUSH: Duration = Duration::from_millis(500);
/// Finished spans waiting for export before new ones are dropped.
const QUEUE: usize = 4096;

/// How spans reach the collector (`--otlp-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// OTLP/gRPC (the collector's port 4317).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    Http,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter for {endpoint}: {source}")]
    Build {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("span export is already running")]
    Started,
}

/// One finished request, as its span says it.
pub struct Finished<'a> {
    pub trace: &'a super::Context,
    /// `<host>:<port>/*`.
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// The source workload's `<canonical service>.<namespace>`.
    pub service: String,
    pub attributes: Vec<KeyValue>,
    pub error: bool,
}

struct Queued {
    service: String,
    span: SpanData,
}

static QUEUE_TX: OnceLock<mpsc::Sender<Queued>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are exported (`--otlp-endpoint` given).
pub fn enabled() -> bool {
    QUEUE_TX.get().is_some()
}

/// (exported, dropped) spans so far.
pub fn counts() -> (u64, u64) {
    (
        EXPORTED.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed),
    )
}

/// Starts exporting to `endpoint` (a URL: `http://collector:4317` for gRPC, the full
/// `…/v1/traces` URL for HTTP) on the current tokio runtime.
pub fn start(endpoint: &str, protocol: Protocol) -> Result<(), Error> {
    let built = match protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build(),
        Protocol::Http => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
    };
    let exporter = built.map_err(|source| Error::Build {
        endpoint: endpoint.to_string(),
        source,
    })?;
    let (tx, rx) = mpsc::channel(QUEUE);
    QUEUE_TX.set(tx).map_err(|_| Error::Started)?;
    tokio::spawn(run(exporter, rx));
    Ok(())
}

/// Queues a finished sampled request's span (dropped when the queue is full).
pub fn record(f: Finished<'_>) {
    let Some(tx) = QUEUE_TX.get() else { return };
    let Some(span) = span_data(&f) else { return };
    if tx
        .try_send(Queued {
            service: f.service,
            span,
        })
        .is_err()
    {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The SDK's span of `f` (`None` when its ids do not parse, which [`super::Context`] rules out).
fn span_data(f: &Finished<'_>) -> Option<SpanData> {
    let trace_id = TraceId::from_hex(&f.trace.trace_id).ok()?;
    let span_id = SpanId::from_hex(&f.trace.span_id).ok()?;
    let parent_span_id = (f.trace.parent_id.as_deref())
        .and_then(|p| SpanId::from_hex(p).ok())
        .unwrap_or(SpanId::INVALID);
    let flags = if f.trace.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanData {
        span_context: SpanContext::new(trace_id, span_id, flags, false, TraceState::default()),
        parent_span_id,
        parent_span_is_remote: parent_span_id != SpanId::INVALID,
        span_kind: SpanKind::Client,
        name: Cow::Owned(f.name.clone()),
        start_time: f.start,
        end_time: f.end,
        attributes: f.attributes.clone(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if f.error {
            Status::error("")
        } else {
            Status::Unset
        },
        instrumentation_scope: InstrumentationScope::builder("drover").build(),
    })
}

/// Batches queued spans and exports them, one call per source workload.
async fn run(mut exporter: opentelemetry_otlp::SpanExporter, mut rx: mpsc::Receiver<Queued>) {
    let mut batch: Vec<Queued> = Vec::with_capacity(BATCH);
    loop {
        let first = match rx.recv().await {
            Some(q) => q,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(q)) => batch.push(q),
                Ok(None) | Err(_) => break,
            }
        }
        let mut by_service: BTreeMap<String, Vec<SpanData>> = BTreeMap::new();
        for q in batch.drain(..) {
            by_service.entry(q.service).or_default().push(q.span);
        }
        for (service, spans) in by_service {
            let n = spans.len() as u64;
            exporter.set_resource(&Resource::builder_empty().with_service_name(service).build());
            match exporter.export(spans).await {
                Ok(()) => {
                    EXPORTED.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    DROPPED.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(error = %e, spans = n, "span export failed");
                }
            }
        }
    }
}
