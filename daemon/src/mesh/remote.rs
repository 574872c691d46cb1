//! Workload certificates from Istio's CA API (`--ca-address`): istiod's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over gRPC and TLS (the server
//! verified against `--ca-root`), authenticated with the node's Kubernetes token
//! (`authorization: Bearer …`), asking for each pod's identity as ztunnel does
//! (`ImpersonatedIdentity`). The key is made here and never leaves the node: only a CSR does.
//!
//! Invariants: the files are written like a local issuance (by rename, key owner-only), so
//! readers and rotation work the same; the root written beside them is `--ca-root`, the mesh's
//! trust anchor, never a certificate the server sent.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType};

use super::{Error, IdentityFiles};

/// Generated from `proto/istio_ca.proto`.
#[allow(clippy::all, missing_docs, unreachable_pub)]
mod api {
    tonic::include_proto!("istio.v1.auth");
}

/// Where and how to ask for certificates.
#[derive(Clone, Debug)]
pub struct RemoteCa {
    /// `https://HOST:PORT` (istiod: `https://istiod.istio-system.svc:15012`).
    pub address: String,
    /// The mesh root (PEM): verifies the CA server and is every peer's trust anchor.
    pub root: PathBuf,
    /// The Kubernetes service-account token presented (re-read for every request).
    pub token: PathBuf,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl RemoteCa {
    /// Issues `spiffe` into `dir` (as [`super::Ca::issue_into`] does), waiting for the CA; safe to
    /// call from inside or outside a runtime (the call runs on a thread of its own).
    pub fn issue_into_blocking(
        &self,
        dir: &Path,
        spiffe: &str,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<IdentityFiles, Error> {
        let (me, dir, id, td) = (
            self.clone(),
            dir.to_path_buf(),
            spiffe.to_string(),
            trust_domain.to_string(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err(&dir, e))?;
            rt.block_on(me.issue_into(&dir, &id, &td, lifetime))
        })
        .join()
        .map_err(|_| Error::Spiffe(format!("{spiffe}: the CA request panicked")))?
    }

    /// Asks the CA for a certificate of `spiffe` (a fresh key) and writes the identity files.
    pub async fn issue_into(
        &self,
        dir: &Path,
        spiffe: &str,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<IdentityFiles, Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let uri = rcgen::string::Ia5String::try_from(spiffe.to_string())
            .map_err(|_| Error::Spiffe(spiffe.to_string()))?;
        params.subject_alt_names.push(SanType::URI(uri));
        let csr = params.serialize_request(&key)?.pem()?;
        let chain = self.create_certificate(csr, spiffe, lifetime).await?;
        let root = std::fs::read_to_string(&self.root).map_err(|e| err(&self.root, e))?;
        let pem: String = chain
            .iter()
            .map(|c| format!("{}\n", c.trim_end()))
            .collect();
        IdentityFiles::write(
            dir,
            (spiffe, trust_domain),
            &root,
            &key.serialize_pem(),
            &pem,
        )
    }

    /// One `CreateCertificate` call: the chain, workload certificate first.
    async fn create_certificate(
        &self,
        csr: String,
        spiffe: &str,
        lifetime: Duration,
    ) -> Result<Vec<String>, Error> {
        let failed = |e: &dyn std::fmt::Display| Error::Remote {
            address: self.address.clone(),
            reason: e.to_string(),
        };
        let token = std::fs::read_to_string(&self.token).map_err(|e| err(&self.token, e))?;
        let channel = self.channel().await.map_err(|e| failed(&e))?;
        let mut client =
            api::istio_certificate_service_client::IstioCertificateServiceClient::new(channel);
        let metadata = api::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                api::Value {
                    kind: Some(api::value::Kind::StringValue(spiffe.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        };
        let mut req = tonic::Request::new(api::IstioCertificateRequest {
            csr,
            validity_duration: lifetime.as_secs() as i64,
            metadata: Some(metadata),
        });
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|e| failed(&e))?;
        req.metadata_mut().insert("authorization", bearer);
        req.set_timeout(Duration::from_secs(10));
        let resp = client
            .create_certificate(req)
            .await
            .map_err(|s| failed(&format!("{}: {}", s.code(), s.message())))?;
        let chain = resp.into_inner().cert_chain;
        if chain.is_empty() {
            return Err(failed(&"the answer has no certificate"));
        }
        Ok(chain)
    }

    /// A gRPC channel over TLS to the CA, its certificate verified against `root`.
    async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.root)? {
            roots.add(c?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let channel = tonic::transport::Endpoint::from_shared(self.address.clone())?
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |uri: tonic::transport::Uri| {
                let connector = connector.clone();
                async move {
                    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                    let port = uri.port_u16().unwrap_or(443);
                    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
                    let _ = tcp.set_nodelay(true);
                    let name = ServerName::try_from(host.to_string())
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await?;
        Ok(channel)
    }
}
