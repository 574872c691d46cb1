//! A test stand-in for istiod's CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! over gRPC and TLS on 127.0.0.1, signing with a mesh CA made by `drover ca init`. It accepts a
//! request only with `authorization: Bearer <token>` and a CSR with exactly one URI SAN, which
//! must be the identity asked for when the request names one (`ImpersonatedIdentity`); it
//! answers the chain (certificate, root) and records every identity it signed.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use tokio_rustls::rustls;

/// Generated from the daemon's `proto/istio_ca.proto`.
#[allow(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod api {
    tonic::include_proto!("istio.v1.auth");
}

/// A running test CA; stopped on drop.
pub struct TestCa {
    pub addr: SocketAddr,
    /// The identities signed, in order.
    pub signed: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Signer {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root_pem: String,
    token: String,
    signed: Arc<Mutex<Vec<String>>>,
}

impl TestCa {
    /// Serves on 127.0.0.1 with `server` (certificate, key: a name the clients dial), signing
    /// with the CA in `mesh_dir`, for clients presenting `token`.
    pub fn start(mesh_dir: &Path, server: (&Path, &Path), token: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener, mesh_dir, server, token)
    }

    /// [`TestCa::start`] on 127.0.0.1 inside network namespace `netns` (for a client that runs
    /// there), on `port`.
    pub fn start_in(
        netns: &crate::Netns,
        port: u16,
        mesh_dir: &Path,
        server: (&Path, &Path),
        token: &str,
    ) -> Self {
        let path = format!("/var/run/netns/{}", netns.name);
        let listener = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap()
        })
        .join()
        .unwrap();
        Self::start_on(listener, mesh_dir, server, token)
    }

    fn start_on(
        listener: std::net::TcpListener,
        mesh_dir: &Path,
        server: (&Path, &Path),
        token: &str,
    ) -> Self {
        let root_pem = std::fs::read_to_string(mesh_dir.join("root-cert.pem")).unwrap();
        let key = rcgen::KeyPair::from_pem(
            &std::fs::read_to_string(mesh_dir.join("root-key.pem")).unwrap(),
        )
        .unwrap();
        let signer = Signer {
            issuer: rcgen::Issuer::from_ca_cert_pem(&root_pem, key).unwrap(),
            root_pem,
            token: token.to_string(),
            signed: Arc::default(),
        };
        let signed = signer.signed.clone();
        let tls = server_tls(server);
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                let incoming = async_stream(listener, acceptor);
                tonic::transport::Server::builder()
                    .add_service(
                        api::istio_certificate_service_server::IstioCertificateServiceServer::new(
                            signer,
                        ),
                    )
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            addr,
            signed,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn server_tls((cert, key): (&Path, &Path)) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS connection the gRPC server can serve.
struct Tls(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for Tls {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl tokio::io::AsyncRead for Tls {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Tls {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS-accepted connections of `listener` (failed handshakes are skipped).
fn async_stream(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl tokio_stream::Stream<Item = std::io::Result<Tls>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok(Tls(tls))).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl api::istio_certificate_service_server::IstioCertificateService for Signer {
    async fn create_certificate(
        &self,
        req: tonic::Request<api::IstioCertificateRequest>,
    ) -> Result<tonic::Response<api::IstioCertificateResponse>, tonic::Status> {
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer != Some(self.token.as_str()) {
            return Err(tonic::Status::unauthenticated("bad token"));
        }
        let req = req.into_inner();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| (v.kind.as_ref()).map(|api::value::Kind::StringValue(s)| s.clone()));
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let sans: Vec<String> = (csr.params.subject_alt_names.iter())
            .map(|s| match s {
                rcgen::SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        let asked = impersonated.unwrap_or_else(|| sans.first().cloned().unwrap_or_default());
        if sans != [asked.clone()] {
            return Err(tonic::Status::permission_denied(format!(
                "the CSR names {sans:?}, not {asked}"
            )));
        }
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(1);
        csr.params.not_after = now + time::Duration::seconds(req.validity_duration.max(60));
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        self.signed.lock().unwrap().push(asked);
        Ok(tonic::Response::new(api::IstioCertificateResponse {
            cert_chain: vec![cert.pem(), self.root_pem.clone()],
        }))
    }
}
