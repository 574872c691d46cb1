//! TLS origination for a cluster's `tls` block (ClientTLSSettings), with rustls: `DISABLE`,
//! `SIMPLE` and `MUTUAL` (files or `credentialName` from `--credentials DIR`); `ISTIO_MUTUAL`
//! needs the mesh identity, which this daemon does not have yet, so such clusters refuse to
//! connect rather than send plaintext.
//!
//! Verification follows §7.3 of the semantics reference: the chain to `caCertificates` (or the
//! system roots), plus `caCrl`; then, with `subjectAltNames`, an exact match against the
//! certificate's DNS, URI or IP names; without them and without `sni`, on HTTP, the request's
//! host (Envoy's auto SAN validation); otherwise the chain only. `insecureSkipVerify` is the only
//! way to skip verification.
//!
//! Invariants: every file is read when the registry is built (at start and on every reload), so a
//! bad file is a located configuration error and the previous snapshot keeps serving; a built
//! [`Origination`] never changes; nothing here falls back to plaintext or to no verification.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{
        CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
        pem::PemObject,
    },
    sign::CertifiedKey,
};

use crate::config::policy::{ClientTls, TlsMode};

/// Why a cluster's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: cannot read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate in the file")]
    NoCertificates { path: PathBuf },
    #[error("{path}: no PEM private key in the file")]
    NoKey { path: PathBuf },
    #[error("{key}: private key does not match the certificate in {cert}: {reason}")]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("{path}: certificate revocation list: {reason}")]
    Crl { path: PathBuf, reason: String },
    #[error("credentialName {name:?}: {reason}")]
    Credential { name: String, reason: String },
    #[error("no system CA certificates found (set caCertificates)")]
    NoSystemRoots,
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How a cluster's upstream connections are encrypted and verified.
pub struct Origination {
    pub mode: TlsMode,
    /// `None` for `ISTIO_MUTUAL` without a mesh identity: connections are refused.
    pub config: Option<Arc<ClientConfig>>,
    /// Explicit `sni`.
    pub sni: Option<String>,
    /// Whether the server certificate is checked against the request host (HTTP, no `sni`, no
    /// `subjectAltNames`, verification on).
    pub auto_san: bool,
    /// Files the configuration was read from (watched for rotation).
    pub files: Vec<PathBuf>,
}

/// Where `credentialName` secrets live in standalone mode, and the mesh identity of the enrolled
/// workloads (for `ISTIO_MUTUAL`), when the daemon has one.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub dir: Option<PathBuf>,
    pub mesh: Option<crate::mesh::IdentityFiles>,
}

/// What `ISTIO_MUTUAL` needs to know about the cluster (§7.2 of the semantics reference).
#[derive(Clone, Debug, Default)]
pub struct MeshTarget {
    /// `outbound_.<port>_.<subset>_.<host>`.
    pub sni: String,
    /// SPIFFE identities of the service's endpoints (their service accounts).
    pub identities: Vec<String>,
}

// === impl Origination ===

impl fmt::Debug for Origination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Origination")
            .field("mode", &self.mode)
            .field("sni", &self.sni)
            .field("auto_san", &self.auto_san)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Origination {
    /// Builds the origination for `tls`, or `None` for plaintext (`DISABLE`). `h2` offers ALPN
    /// `h2` (explicit HTTP/2 clusters); `http` enables auto SAN validation.
    pub fn new(
        tls: &ClientTls,
        h2: bool,
        http: bool,
        credentials: &Credentials,
        mesh: &MeshTarget,
    ) -> Result<Option<Self>, Error> {
        let mut files = Vec::new();
        let (config, sni, auto_san) = match tls.mode {
            TlsMode::Disable => return Ok(None),
            TlsMode::IstioMutual => match &credentials.mesh {
                // Without an identity: refuse to connect (never plaintext).
                None => (None, tls.sni.clone(), false),
                Some(identity) => {
                    let alpn: &[&[u8]] = match (h2, http) {
                        (true, _) => &[b"istio-h2", b"istio", b"h2"],
                        (false, true) => &[b"istio-http/1.1", b"istio", b"http/1.1"],
                        (false, false) => &[b"istio-peer-exchange", b"istio"],
                    };
                    let versions = &[&rustls::version::TLS12, &rustls::version::TLS13];
                    let config = istio_config(tls, identity, (mesh, versions), alpn, &mut files)?;
                    let sni = tls.sni.clone().or_else(|| Some(mesh.sni.clone()));
                    (Some(Arc::new(config)), sni, false)
                }
            },
            TlsMode::Simple | TlsMode::Mutual => (
                Some(Arc::new(client_config(tls, h2, credentials, &mut files)?)),
                tls.sni.clone(),
                http && tls.sni.is_none()
                    && tls.subject_alt_names.is_empty()
                    && !tls.insecure_skip_verify,
            ),
        };
        Ok(Some(Self {
            mode: tls.mode,
            config,
            sni,
            auto_san,
            files,
        }))
    }

    /// The name the handshake is made for: explicit `sni`, else (auto SNI, HTTP only) the request
    /// host when it is a DNS name, else the endpoint address (no SNI is sent for an address).
    pub fn server_name(
        &self,
        request_host: Option<&str>,
        endpoint: std::net::IpAddr,
    ) -> ServerName<'static> {
        self.sni
            .as_deref()
            .or(request_host)
            .and_then(|h| ServerName::try_from(h.to_string()).ok())
            .unwrap_or(ServerName::IpAddress(endpoint.into()))
    }
}

/// *ring* with the cipher suites in the order Envoy's client offers them (BoringSSL's defaults
/// on AES hardware): AES-128-GCM first. A server that follows the client's order (rustls,
/// BoringSSL by default) then picks the suite whose hash (SHA-256) and cipher run in hardware,
/// not rustls's default AES-256-GCM with SHA-384.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

fn client_config(
    tls: &ClientTls,
    h2: bool,
    credentials: &Credentials,
    files: &mut Vec<PathBuf>,
) -> Result<ClientConfig, Error> {
    let secret = match &tls.credential_name {
        Some(name) => Some(Secret::find(name, credentials)?),
        None => None,
    };
    let ca = secret
        .as_ref()
        .and_then(|s| s.ca.clone())
        .or_else(|| tls.ca_certificates.as_ref().map(PathBuf::from));
    let crl = secret
        .as_ref()
        .and_then(|s| s.crl.clone())
        .or_else(|| tls.ca_crl.as_ref().map(PathBuf::from));
    let provider = provider();
    let verifier = server_verifier(tls, (ca, crl), &provider, files)?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let cert = secret
        .as_ref()
        .and_then(|s| s.cert.clone())
        .or_else(|| tls.client_certificate.as_ref().map(PathBuf::from));
    let key = secret
        .as_ref()
        .and_then(|s| s.key.clone())
        .or_else(|| tls.private_key.as_ref().map(PathBuf::from));
    let mut config = match (tls.mode, cert, key) {
        (TlsMode::Mutual, Some(cert), Some(key)) => {
            files.extend([cert.clone(), key.clone()]);
            let (chain, der) = key_pair(&cert, &key, &provider)?;
            builder.with_client_auth_cert(chain, der)?
        }
        _ => builder.with_no_client_auth(),
    };
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    Ok(config)
}

/// How a `SIMPLE`/`MUTUAL` client verifies the server: the CA file (else the system roots),
/// the CRL, and `subjectAltNames`; nothing with `insecureSkipVerify`. Files read are pushed to
/// `files` (watched for rotation).
fn server_verifier(
    tls: &ClientTls,
    (ca, crl): (Option<PathBuf>, Option<PathBuf>),
    provider: &Arc<rustls::crypto::CryptoProvider>,
    files: &mut Vec<PathBuf>,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    if tls.insecure_skip_verify {
        return Ok(Arc::new(SkipVerify(provider.clone())));
    }
    let mut roots = RootCertStore::empty();
    match &ca {
        Some(path) => {
            files.push(path.clone());
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| Error::Read {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(Error::NoSystemRoots);
            }
        }
    }
    let mut builder =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if let Some(path) = &crl {
        files.push(path.clone());
        let crls = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Error::Crl {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        builder = builder.with_crls(crls);
    }
    let webpki = builder.build().map_err(|e| Error::Read {
        path: ca.clone().unwrap_or_default(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(Verifier {
        webpki,
        subject_alt_names: tls.subject_alt_names.clone(),
        chain_only: tls.sni.is_some() || !tls.subject_alt_names.is_empty(),
    }))
}

/// `ISTIO_MUTUAL`: the workload identity as client certificate, the mesh root as the only trust
/// anchor, and the server's certificate must name one of the expected identities
/// (`subjectAltNames` replaces them; none at all → the chain only).
/// Configurations built from a certificate file, by key: rebuilt when the file's modification
/// time changed (a renewal); when the rebuild fails, the previous one stays (logged).
pub struct ByFile<K, C> {
    built: std::sync::Mutex<std::collections::HashMap<K, (std::time::SystemTime, Arc<C>)>>,
}

impl<K, C> Default for ByFile<K, C> {
    fn default() -> Self {
        Self {
            built: Default::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq, C> ByFile<K, C> {
    /// The configuration of `key`, built from `file` by `build` when new or changed.
    pub fn get<E: fmt::Display>(
        &self,
        key: K,
        file: &std::path::Path,
        build: impl FnOnce() -> Result<C, E>,
    ) -> Result<Arc<C>, E> {
        let mtime = std::fs::metadata(file).and_then(|m| m.modified()).ok();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        let current = built.get(&key);
        if let (Some((at, c)), Some(m)) = (current, mtime)
            && *at == m
        {
            return Ok(c.clone());
        }
        match build() {
            Ok(c) => {
                let c = Arc::new(c);
                let at = mtime.unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                built.insert(key, (at, c.clone()));
                Ok(c)
            }
            Err(e) => match current {
                Some((_, c)) => {
                    tracing::warn!(file = %file.display(), error = %e, "identity unusable; keeping the previous one");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }
}

/// The `tls` block auto mTLS and HBONE stand for: ISTIO_MUTUAL with the mesh's own material.
pub static ISTIO_MUTUAL: std::sync::LazyLock<ClientTls> = std::sync::LazyLock::new(|| ClientTls {
    mode: TlsMode::IstioMutual,
    client_certificate: None,
    private_key: None,
    ca_certificates: None,
    ca_crl: None,
    credential_name: None,
    subject_alt_names: Vec::new(),
    sni: None,
    insecure_skip_verify: false,
});

/// The client side of an HBONE connection: TLS 1.3, ALPN `h2`, presenting `identity` and
/// requiring the server to present exactly `peer`.
pub fn hbone_config(
    identity: &crate::mesh::IdentityFiles,
    peer: &str,
) -> Result<ClientConfig, Error> {
    let mesh = MeshTarget {
        sni: String::new(),
        identities: vec![peer.to_string()],
    };
    let versions: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    istio_config(
        &ISTIO_MUTUAL,
        identity,
        (&mesh, versions),
        &[b"h2"],
        &mut Vec::new(),
    )
}

fn istio_config(
    tls: &ClientTls,
    identity: &crate::mesh::IdentityFiles,
    (mesh, versions): (&MeshTarget, &[&'static rustls::SupportedProtocolVersion]),
    alpn: &[&[u8]],
    files: &mut Vec<PathBuf>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    files.extend([
        identity.root.clone(),
        identity.cert.clone(),
        identity.key.clone(),
    ]);
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
        Arc::new(SkipVerify(provider.clone()))
    } else {
        let mut roots = RootCertStore::empty();
        for cert in certificates(&identity.root)? {
            roots.add(cert).map_err(|e| Error::Read {
                path: identity.root.clone(),
                reason: e.to_string(),
            })?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| Error::Read {
                path: identity.root.clone(),
                reason: e.to_string(),
            })?;
        Arc::new(Verifier {
            webpki,
            subject_alt_names: if tls.subject_alt_names.is_empty() {
                mesh.identities.clone()
            } else {
                tls.subject_alt_names.clone()
            },
            chain_only: true,
        })
    };
    let (chain, key) = key_pair(&identity.cert, &identity.key, &provider)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A certificate chain and its private key, checked to belong together.
fn key_pair(
    cert: &Path,
    key: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let chain = certificates(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => Error::NoKey {
            path: key.to_path_buf(),
        },
        other => Error::Read {
            path: key.to_path_buf(),
            reason: other.to_string(),
        },
    })?;
    CertifiedKey::from_der(chain.clone(), der.clone_key(), provider).map_err(|e| {
        Error::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok((chain, der))
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| Error::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A `credentialName` secret as files in `DIR/<name>/`: `tls.crt`|`cert`, `tls.key`|`key`,
/// `ca.crt`|`cacert`, `ca.crl`|`crl` (Kubernetes secret key names).
struct Secret {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    crl: Option<PathBuf>,
}

impl Secret {
    fn find(name: &str, credentials: &Credentials) -> Result<Self, Error> {
        let err = |reason: String| Error::Credential {
            name: name.to_string(),
            reason,
        };
        let dir = credentials
            .dir
            .as_ref()
            .ok_or_else(|| err("no --credentials DIR was given".into()))?
            .join(name.trim_start_matches("kubernetes://"));
        if !dir.is_dir() {
            return Err(err(format!("{} is not a directory", dir.display())));
        }
        let pick = |names: [&str; 2]| names.iter().map(|n| dir.join(n)).find(|p| p.is_file());
        Ok(Self {
            cert: pick(["tls.crt", "cert"]),
            key: pick(["tls.key", "key"]),
            ca: pick(["ca.crt", "cacert"]),
            crl: pick(["ca.crl", "crl"]),
        })
    }
}

/// Chain (and CRL) through webpki; then the configured names, the request host, or nothing.
#[derive(Debug)]
struct Verifier {
    webpki: Arc<WebPkiServerVerifier>,
    subject_alt_names: Vec<String>,
    /// `sni` or `subjectAltNames` set: the handshake name is not checked against the certificate.
    chain_only: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and revocation) before the name: a name mismatch means the
        // chain was good. Without a DNS name to check (an address), only the chain counts.
        let name_checked = !self.chain_only && matches!(server_name, ServerName::DnsName(_));
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !name_checked => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }?;
        if self.subject_alt_names.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        let names = certificate_names(end_entity);
        if self
            .subject_alt_names
            .iter()
            .any(|want| names.contains(want))
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(SanMismatch {
                    want: self.subject_alt_names.clone(),
                    got: names,
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The server certificate names none of `subjectAltNames`.
#[derive(Debug)]
struct SanMismatch {
    want: Vec<String>,
    got: Vec<String>,
}

impl fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server certificate names {:?}, none of subjectAltNames {:?}",
            self.got, self.want
        )
    }
}

impl std::error::Error for SanMismatch {}

/// DNS, URI and IP subject alternative names of a certificate, as strings.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::URI(u) => Some(u.to_string()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// `insecureSkipVerify: true`: no certificate checks; handshake signatures are still verified.
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why an upstream TLS connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "ISTIO_MUTUAL needs a mesh workload identity, which this daemon does not have (no --mesh-ca)"
    )]
    NoMeshIdentity,
    #[error("TLS handshake with {addr} timed out after {timeout:?}")]
    Timeout {
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("TLS handshake with {addr}: {reason}")]
    Failed {
        addr: std::net::SocketAddr,
        reason: String,
        kind: FailureKind,
    },
}

/// Which of Envoy's `ssl.*` cluster counters a failed handshake belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// `ssl.fail_verify_san`: the certificate does not name what was expected.
    VerifySan,
    /// `ssl.fail_verify_error`: unknown issuer, expired, revoked, bad signature.
    VerifyError,
    /// `ssl.connection_error`: anything else (alert from the peer, protocol error, reset).
    Connection,
}

impl HandshakeError {
    /// The counter this failure increments.
    pub fn kind(&self) -> FailureKind {
        match self {
            HandshakeError::Failed { kind, .. } => *kind,
            _ => FailureKind::Connection,
        }
    }

    fn failed(addr: std::net::SocketAddr, e: std::io::Error) -> Self {
        let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
        let kind = match rustls_error {
            Some(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
                | rustls::CertificateError::Other(_),
            )) => FailureKind::VerifySan,
            Some(rustls::Error::InvalidCertificate(_)) => FailureKind::VerifyError,
            _ => FailureKind::Connection,
        };
        // Our own verification failures carry their explanation; say it in words.
        let reason = match rustls_error {
            Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
                format!("invalid peer certificate: {}", o.0)
            }
            Some(r) => r.to_string(),
            None => e.to_string(),
        };
        HandshakeError::Failed { addr, reason, kind }
    }
}

/// Runs the client handshake on `tcp` for `origination`, within `timeout`.
pub async fn handshake<S>(
    origination: &Origination,
    tcp: S,
    request_host: Option<&str>,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<S>, HandshakeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = origination
        .config
        .clone()
        .ok_or(HandshakeError::NoMeshIdentity)?;
    let name = origination.server_name(request_host, addr.ip());
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(HandshakeError::failed(addr, e)),
        Err(_) => Err(HandshakeError::Timeout { addr, timeout }),
    }
}
