//! Inbound termination on a node that hosts workloads: connections that the `sk_lookup` program
//! steered to the inbound listener (15006, in the workloads' namespace) keep their original
//! destination as local address. Mesh mTLS is terminated with the workloads' identity, the
//! client certificate must chain to the mesh root and name an identity of the trust domain, and
//! the plaintext goes to the workload. The mode of each connection is the workload's
//! `PeerAuthentication` for the destination port (see [`crate::registry::peer`]), read from the
//! current snapshot, else `--peer-authentication`: STRICT refuses plaintext clients; PERMISSIVE
//! passes a client that does not start with a TLS ClientHello (or stays silent for 100 ms, as
//! server-first protocols do) through unchanged; DISABLE passes every connection through.
//!
//! Invariants: the forward connection is made from inside the namespace to the original
//! destination, so its source equals its destination and `sk_lookup` leaves it alone; the
//! server certificate is re-read when the identity file changes (renewal), never mid-handshake.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::policy::MtlsMode, mesh::IdentityFiles, redirect::netns::NetNs, registry::RegistryHandle,
};

/// Why an inbound connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("plaintext client refused (peer authentication STRICT)")]
    PlaintextRefused,
    #[error("client sent nothing within {0:?}")]
    Silent(Duration),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("client identity {0:?} is not in trust domain {1}")]
    ForeignIdentity(Vec<String>, String),
    #[error("server identity {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error("forwarding to {addr}: {source}")]
    Forward {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The inbound side of one namespace.
pub struct Inbound {
    pub ns: Arc<NetNs>,
    pub identity: IdentityFiles,
    /// The mode when no `PeerAuthentication` sets one (`--peer-authentication`).
    pub default_mode: MtlsMode,
    /// (modification time of the certificate file, config built from it).
    config: Mutex<Option<(SystemTime, Arc<ServerConfig>)>>,
}

/// How an inbound connection was served.
#[derive(Debug)]
enum Served {
    /// mTLS terminated for this client identity.
    Mtls(String),
    /// Plaintext passed through (PERMISSIVE or DISABLE).
    Plaintext(MtlsMode),
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Served::Mtls(id) => write!(f, "mTLS from {id}"),
            Served::Plaintext(MtlsMode::Disable) => f.write_str("passed through (DISABLE)"),
            Served::Plaintext(_) => f.write_str("plaintext (PERMISSIVE)"),
        }
    }
}

/// How long a client may stay silent before the first byte (protocol detection).
const FIRST_BYTE: Duration = Duration::from_secs(10);
/// PERMISSIVE: a client silent this long is plaintext (server-speaks-first protocols such as
/// SMTP or MySQL; Istio's old `protocolDetectionTimeout` default).
const DETECTION: Duration = Duration::from_millis(100);

// === impl Inbound ===

impl Inbound {
    pub fn new(ns: Arc<NetNs>, identity: IdentityFiles, default_mode: MtlsMode) -> Self {
        Self {
            ns,
            identity,
            default_mode,
            config: Mutex::new(None),
        }
    }

    /// Binds `0.0.0.0:15006` inside the namespace.
    pub fn bind(&self) -> std::io::Result<TcpListener> {
        let addr = SocketAddr::from(([0, 0, 0, 0], drover_common::INBOUND_PORT));
        let std = self.ns.enter(|| std::net::TcpListener::bind(addr))??;
        std.set_nonblocking(true)?;
        TcpListener::from_std(std)
    }

    /// The TLS server configuration, rebuilt when the identity file changed (renewal); the
    /// previous one stays when the new files cannot be used.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        let mtime = std::fs::metadata(&self.identity.cert)
            .and_then(|m| m.modified())
            .ok();
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some((at, c)), Some(m)) = (current.as_ref(), mtime)
            && *at == m
        {
            return Ok(c.clone());
        }
        match build_config(&self.identity) {
            Ok(c) => {
                let c = Arc::new(c);
                *current = Some((mtime.unwrap_or(SystemTime::UNIX_EPOCH), c.clone()));
                Ok(c)
            }
            Err(e) => match current.as_ref() {
                Some((_, c)) => {
                    tracing::warn!(error = %e, "inbound identity unusable; keeping the previous one");
                    Ok(c.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Accepts until `shutdown`, one task per connection; `policy` is the snapshot of the
    /// namespace's workload (its `PeerAuthentication`s).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        policy: RegistryHandle,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    let policy = policy.clone();
                    tracker.spawn(async move {
                        let start = tokio::time::Instant::now();
                        let target = stream.local_addr().ok();
                        let mode = target
                            .and_then(|t| policy.load().inbound_mtls().mode(t.port()))
                            .unwrap_or(me.default_mode);
                        let outcome = me.handle(stream, mode).await;
                        let s = &crate::stats::store().inbound;
                        let counter = match &outcome {
                            Ok(Served::Mtls(_)) => &s.mtls,
                            Ok(Served::Plaintext(_)) => &s.plaintext_passed,
                            Err(Error::PlaintextRefused) => &s.plaintext_refused,
                            Err(Error::ForeignIdentity(..)) => &s.foreign_identity,
                            Err(Error::Silent(_)) => &s.silent,
                            Err(Error::Forward { .. }) => &s.forward_failed,
                            Err(Error::Tls(_) | Error::Identity { .. }) => &s.tls_error,
                        };
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        crate::access::Record {
                            netns: me.ns.name.clone(),
                            src: Some(peer),
                            dst: target.unwrap_or(peer),
                            start,
                            kind: crate::access::Kind::Inbound {
                                outcome: outcome
                                    .map(|how| how.to_string())
                                    .map_err(|e| e.to_string()),
                            },
                        }
                        .emit();
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Terminates (or, PERMISSIVE and DISABLE, passes) one connection in `mode` and relays it to
    /// its original destination; says how it was served.
    async fn handle(&self, stream: TcpStream, mode: MtlsMode) -> Result<Served, Error> {
        let target = stream.local_addr().map_err(Error::Tls)?;
        let mut first = [0u8; 1];
        let wait = if mode == MtlsMode::Strict {
            FIRST_BYTE
        } else {
            DETECTION
        };
        let tls = match mode {
            MtlsMode::Disable => false,
            _ => match tokio::time::timeout(wait, stream.peek(&mut first)).await {
                Ok(Ok(n)) => is_client_hello(&first[..n]),
                Ok(Err(e)) => return Err(Error::Tls(e)),
                Err(_) if mode == MtlsMode::Permissive => false,
                Err(_) => return Err(Error::Silent(FIRST_BYTE)),
            },
        };
        if !tls {
            if mode == MtlsMode::Strict {
                return Err(Error::PlaintextRefused);
            }
            let mut client = stream;
            let mut upstream = self.forward(target).await?;
            let _ = crate::proxy::relay::bounded(
                &mut client,
                &mut upstream,
                crate::config::policy::ConnectionPool::istio_defaults().tcp_idle_timeout,
                None,
            )
            .await;
            return Ok(Served::Plaintext(mode));
        }
        let config = self.server_config()?;
        let mut tls = tokio_rustls::TlsAcceptor::from(config)
            .accept(stream)
            .await
            .map_err(Error::Tls)?;
        let names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(crate::tls::certificate_names)
            .unwrap_or_default();
        let domain = format!("spiffe://{}/", self.identity.trust_domain);
        let Some(client) = names.iter().find(|n| n.starts_with(&domain)).cloned() else {
            return Err(Error::ForeignIdentity(
                names,
                self.identity.trust_domain.clone(),
            ));
        };
        let mut upstream = self.forward(target).await?;
        let _ = crate::proxy::relay::bounded(
            &mut tls,
            &mut upstream,
            crate::config::policy::ConnectionPool::istio_defaults().tcp_idle_timeout,
            None,
        )
        .await;
        Ok(Served::Mtls(client))
    }

    /// A connection to the workload, from inside its namespace.
    async fn forward(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
        let s = crate::proxy::upstream::connect(
            &self.ns,
            addr,
            crate::config::policy::ConnectionPool::istio_defaults().connect_timeout,
            true,
        )
        .await
        .map_err(|e| Error::Forward {
            addr,
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(s)
    }
}

/// A TLS record of type handshake (22) opens every ClientHello.
fn is_client_hello(first: &[u8]) -> bool {
    first.first() == Some(&0x16)
}

fn build_config(identity: &IdentityFiles) -> Result<ServerConfig, Error> {
    let err = |path: &std::path::Path, e: &dyn std::fmt::Display| Error::Identity {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(&identity.cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(&identity.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&identity.key).map_err(|e| err(&identity.key, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&identity.root).map_err(|e| err(&identity.root, &e))? {
        roots
            .add(c.map_err(|e| err(&identity.root, &e))?)
            .map_err(|e| err(&identity.root, &e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err(&identity.root, &e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| err(&identity.cert, &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err(&identity.cert, &e))?;
    // Whatever a mesh client offers (Istio's TCP and HTTP ALPN values, then plain ones).
    config.alpn_protocols = [
        "istio-peer-exchange",
        "istio-h2",
        "istio-http/1.1",
        "istio",
        "h2",
        "http/1.1",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    Ok(config)
}
