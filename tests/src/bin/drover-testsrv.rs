//! Test and demo upstreams. `echo`: greets each connection with `hello from NAME peer=ADDR\n`, then
//! echoes. `sink`: counts bytes until EOF and answers with the count. `http`: an HTTP/1.1 and h2c
//! server (hyper) answering every request, after `--delay-ms`, with JSON naming the server, the
//! path, the peer, the protocol version and the request's header names (`Upgrade: echo` switches
//! protocols and echoes raw bytes). Prints `listening ADDR` when ready. With `--tls-cert` and
//! `--tls-key` every connection is TLS first (`--tls-client-ca` requires a client certificate);
//! the SNI received and whether a client certificate was shown are reported (greeting suffix
//! ` sni=NAME client_cert=BOOL cipher=SUITE`, or the JSON fields `sni` and `client_cert`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use clap::{Parser, ValueEnum};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Echo,
    Sink,
    Http,
    /// The gRPC `drover.test.Echo` service (h2c).
    Grpc,
    /// An HTTP CONNECT proxy (HTTP/1.1): `CONNECT host:port` answers 200 and joins the
    /// connection to that address.
    Connect,
}

#[derive(Parser)]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    #[arg(long)]
    listen: Vec<SocketAddr>,
    #[arg(long, default_value = "server")]
    name: String,
    /// `http` mode: wait this long before answering.
    #[arg(long, default_value = "0")]
    delay_ms: u64,
    /// `http` mode: the status every answer carries.
    #[arg(long, default_value = "200")]
    status: u16,
    /// Serve TLS with this certificate chain (PEM)…
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// …and this private key (PEM).
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates issued by this CA (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// `http` mode: answer each request by calling this URL, passing on the request id and
    /// trace headers as Istio asks applications to, and returning its status.
    #[arg(long)]
    forward: Option<String>,
}

/// `--forward`.
static FORWARD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The headers an application propagates for Istio's tracing.
const TRACE_HEADERS: [&str; 8] = [
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Calls `url` with `headers`' trace headers; its status (502 when it cannot be reached).
async fn forward(url: &str, headers: &hyper::HeaderMap) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let mut req = Request::get(url);
    for name in TRACE_HEADERS {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v);
        }
    }
    let Ok(req) = req.body(http_body_util::Empty::new()) else {
        return 502;
    };
    match client.request(req).await {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 502,
    }
}

/// The server side of TLS, when asked for.
fn acceptor(args: &Args) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match &args.tls_client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)? {
                roots.add(c?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    if matches!(args.mode, Mode::Http) {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Anything a connection can be served over.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Stream for T {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(url) = &args.forward {
        let _ = FORWARD.set(url.clone());
    }
    let name: Arc<str> = args.name.clone().into();
    for addr in &args.listen {
        let listener = TcpListener::bind(addr).await?;
        if let Mode::Grpc = args.mode {
            #[expect(clippy::print_stdout, reason = "the harness waits for this line")]
            {
                println!("listening {}", listener.local_addr()?);
            }
            let svc = grpc::EchoService { name: name.clone() };
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(drover_tests::pb::echo_server::EchoServer::new(svc))
                    .serve_with_incoming(incoming),
            );
            continue;
        }
        #[expect(clippy::print_stdout, reason = "the harness waits for this line")]
        {
            println!("listening {}", listener.local_addr()?);
        }
        tokio::spawn(serve(
            listener,
            acceptor(&args)?,
            args.mode,
            name.clone(),
            args.delay_ms,
            args.status,
        ));
    }
    std::future::pending::<()>().await;
    Ok(())
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mode: Mode,
    name: Arc<str>,
    delay_ms: u64,
    status: u16,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        // Small writes back to back (a TLS session ticket, then the greeting) must not wait for
        // a delayed ACK.
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => handle(stream, None, mode, name, peer, delay_ms, status).await,
                Some(acceptor) => {
                    let Ok(s) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (_, session) = s.get_ref();
                    let info = TlsInfo {
                        sni: session.server_name().map(str::to_string),
                        client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
                        client_cert_id: session
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| drover_tests::der_id(c.as_ref())),
                        cipher: session
                            .negotiated_cipher_suite()
                            .map(|c| format!("{:?}", c.suite())),
                    };
                    handle(s, Some(info), mode, name, peer, delay_ms, status).await
                }
            }
        });
    }
}

/// What the server learnt from a TLS handshake.
struct TlsInfo {
    sni: Option<String>,
    client_cert: bool,
    /// Hash of the client certificate's DER (`DefaultHasher`, hex), to tell certificates apart.
    client_cert_id: Option<String>,
    /// The negotiated cipher suite (rustls's name).
    cipher: Option<String>,
}

async fn handle(
    mut stream: impl Stream,
    tls: Option<TlsInfo>,
    mode: Mode,
    name: Arc<str>,
    peer: SocketAddr,
    delay_ms: u64,
    status: u16,
) {
    let (sni, client_cert) = tls
        .as_ref()
        .map_or((None, false), |t| (t.sni.clone(), t.client_cert));
    let quoted = |v: Option<&String>| v.map_or("null".to_string(), |s| format!("\"{s}\""));
    let sni_json = quoted(sni.as_ref());
    let cert_json = quoted(tls.as_ref().and_then(|t| t.client_cert_id.as_ref()));
    match mode {
        Mode::Echo => {
            let suffix = match &tls {
                Some(t) => format!(
                    " sni={} client_cert={client_cert} cipher={}",
                    sni.as_deref().unwrap_or("-"),
                    t.cipher.as_deref().unwrap_or("-")
                ),
                None => String::new(),
            };
            let greeting = format!("hello from {name} peer={peer}{suffix}\n");
            if stream.write_all(greeting.as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
        Mode::Sink => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = stream.write_all(format!("{total}\n").as_bytes()).await;
        }
        Mode::Http => {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
                // `Upgrade: echo`: switch protocols, then echo raw bytes.
                let upgrade = req
                    .headers()
                    .get("upgrade")
                    .is_some_and(|v| v == "echo")
                    .then(|| hyper::upgrade::on(&mut req));
                let headers: Vec<String> =
                    req.headers().keys().map(|k| format!("\"{k}\"")).collect();
                // Every value of every header, joined with ", " per name, as JSON.
                let mut values = serde_json::Map::new();
                for k in req.headers().keys() {
                    let all: Vec<&str> = req
                        .headers()
                        .get_all(k)
                        .iter()
                        .map(|v| v.to_str().unwrap_or("?"))
                        .collect();
                    values.insert(k.to_string(), all.join(", ").into());
                }
                let authority = req
                    .uri()
                    .authority()
                    .map(|a| a.to_string())
                    .or_else(|| {
                        let host = req.headers().get("host")?;
                        host.to_str().ok().map(str::to_string)
                    })
                    .unwrap_or_default();
                let body = format!(
                    "{{\"podname\":\"{name}\",\"path\":\"{}\",\"query\":{},\"authority\":{},\"peer\":\"{peer}\",\"version\":\"{:?}\",\"sni\":{sni_json},\"client_cert\":{client_cert},\"client_cert_id\":{cert_json},\"headers\":[{}],\"header_values\":{}}}\n",
                    req.uri().path(),
                    serde_json::Value::from(req.uri().query().unwrap_or("")),
                    serde_json::Value::from(authority),
                    req.version(),
                    headers.join(","),
                    serde_json::Value::Object(values)
                );
                let trace = req.headers().clone();
                async move {
                    let status = match FORWARD.get() {
                        Some(url) => forward(url, &trace).await,
                        None => status,
                    };
                    if let Some(on) = upgrade {
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let mut io = hyper_util::rt::TokioIo::new(up);
                                let (mut r, mut w) = tokio::io::split(&mut io);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        return Ok(Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "echo")
                            .body(Full::new(Bytes::new()))
                            .expect("static response"));
                    }
                    if delay_ms > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response"),
                    )
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(io, svc)
                .await;
        }
        // Served by tonic in `main`.
        Mode::Grpc => {}
        Mode::Connect => {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                let target = req.uri().authority().map(|a| a.to_string());
                let (Some(target), true) = (target, req.method() == hyper::Method::CONNECT) else {
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .status(405)
                            .body(Full::new(Bytes::new()))
                            .expect("static response"),
                    );
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return Ok(Response::builder()
                        .status(502)
                        .body(Full::new(Bytes::new()))
                        .expect("static response"));
                };
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let mut io = hyper_util::rt::TokioIo::new(up);
                        let _ = tokio::io::copy_bidirectional(&mut io, &mut upstream).await;
                    }
                });
                Ok(Response::builder()
                    .status(200)
                    .body(Full::new(Bytes::new()))
                    .expect("static response"))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        }
    }
}

mod grpc {
    //! The gRPC test service: stamps replies with the server name.

    use std::{pin::Pin, sync::Arc};

    use drover_tests::pb::{Msg, echo_server::Echo};
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};

    pub struct EchoService {
        pub name: Arc<str>,
    }

    type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

    #[tonic::async_trait]
    impl Echo for EchoService {
        async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
            // Text "headers": the reply's text is the request's metadata, as a JSON object
            // (values of a repeated key joined with ",").
            let metadata = req.metadata().clone().into_headers();
            let m = req.into_inner();
            if m.text == "headers" {
                let mut seen = serde_json::Map::new();
                for k in metadata.keys() {
                    let all: Vec<&str> = (metadata.get_all(k).iter())
                        .map(|v| v.to_str().unwrap_or("?"))
                        .collect();
                    seen.insert(k.to_string(), all.join(",").into());
                }
                return Ok(Response::new(Msg {
                    text: serde_json::Value::Object(seen).to_string(),
                    server: self.name.to_string(),
                    ..m
                }));
            }
            if m.text == "fail" {
                return Err(Status::unavailable("asked to fail"));
            }
            Ok(Response::new(Msg {
                server: self.name.to_string(),
                ..m
            }))
        }

        type ServerStreamStream = MsgStream;

        async fn server_stream(&self, req: Request<Msg>) -> Result<Response<MsgStream>, Status> {
            let m = req.into_inner();
            let name = self.name.to_string();
            let items = (0..m.seq).map(move |i| {
                Ok(Msg {
                    text: m.text.clone(),
                    server: name.clone(),
                    seq: i,
                })
            });
            Ok(Response::new(Box::pin(tokio_stream::iter(items))))
        }

        type ChatStream = MsgStream;

        async fn chat(&self, req: Request<Streaming<Msg>>) -> Result<Response<MsgStream>, Status> {
            let name = self.name.to_string();
            let out = req.into_inner().map(move |m| {
                m.map(|m| Msg {
                    server: name.clone(),
                    ..m
                })
            });
            Ok(Response::new(Box::pin(out)))
        }
    }
}
