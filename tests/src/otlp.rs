//! An OTLP trace receiver for the tests, built on the `opentelemetry-proto` types: the gRPC
//! `TraceService` (tonic) and the HTTP/protobuf `POST /v1/traces` endpoint, both on free
//! loopback ports, collecting every span with its resource's `service.name`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use prost::Message as _;

/// A received span, flattened.
#[derive(Clone, Debug)]
pub struct Span {
    pub service: String,
    pub name: String,
    /// Hex ids.
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// `SPAN_KIND_*` number (3: client).
    pub kind: i32,
    pub attributes: std::collections::BTreeMap<String, String>,
}

/// The receiver: its two endpoints and what arrived. Stops with the test process.
pub struct Receiver {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    _rt: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct Collect(Arc<Mutex<Vec<Span>>>);

impl Collect {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut out = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = (rs.resource.iter().flat_map(|r| &r.attributes))
                .find(|a| a.key == "service.name")
                .map(|a| value(a.value.as_ref()))
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: (span.attributes.iter())
                        .map(|a| (a.key.clone(), value(a.value.as_ref())))
                        .collect(),
                });
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collect {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    /// Both endpoints listening (on their own runtime).
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("receiver runtime");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let collect = Collect(spans.clone());
        let (grpc, http) = rt.block_on(async {
            let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addrs = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(collect.clone()))
                    .serve_with_incoming(incoming),
            );
            tokio::spawn(serve_http(http, collect));
            addrs
        });
        Self {
            grpc,
            http,
            spans,
            _rt: rt,
        }
    }

    /// Every span so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Spans once at least `n` arrived (at most `within`).
    pub fn wait(&self, n: usize, within: Duration) -> Vec<Span> {
        let deadline = Instant::now() + within;
        while self.spans().len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spans()
    }
}

/// OTLP/HTTP: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
async fn serve_http(listener: tokio::net::TcpListener, collect: Collect) {
    use http_body_util::BodyExt as _;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let collect = collect.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let collect = collect.clone();
                    async move {
                        let ok = req.uri().path() == "/v1/traces";
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let status = match (ok, body) {
                            (true, Ok(b)) => match ExportTraceServiceRequest::decode(b) {
                                Ok(r) => {
                                    collect.add(r);
                                    200
                                }
                                Err(_) => 400,
                            },
                            _ => 404,
                        };
                        let reply = ExportTraceServiceResponse::default().encode_to_vec();
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(http_body_util::Full::new(hyper::body::Bytes::from(reply)))
                                .expect("static response"),
                        )
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
