//! Inbound termination for a workload namespace (`--inbound-netns`, or every enrolled pod when
//! the daemon has a mesh identity): connections that the `sk_lookup` program steered to the
//! inbound listener (15006, in the workload's namespace) keep their original destination as
//! local address. Mesh mTLS is terminated with the workload's identity (the daemon's for
//! `--inbound-netns`, else the one its snapshot was built with), the client certificate must
//! chain to the mesh root and name an identity of the trust domain, and the plaintext goes to the
//! workload. HBONE (15008, [`crate::hbone`]) uses the same identity, checks and forwarding. The mode of each connection is the workload's
//! `PeerAuthentication` for the destination port (see [`crate::registry::peer`]), read from the
//! current snapshot, else `--peer-authentication`: STRICT refuses plaintext clients; PERMISSIVE
//! passes a client that does not start with a TLS ClientHello (or stays silent for 100 ms, as
//! server-first protocols do) through unchanged; DISABLE passes every connection through.
//!
//! Invariants: the forward connection is made from inside the namespace to the original
//! destination, so its source equals its destination and `sk_lookup` leaves it alone; the
//! server certificate is re-read when the identity file changes (renewal), never mid-handshake.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

mod authorize;
pub use authorize::{DENIED_BODY, Peer, set_http_metrics, set_path_normalization};

use crate::{
    config::policy::MtlsMode,
    mesh::IdentityFiles,
    redirect::{Kernel, netns::NetNs},
    registry::RegistryHandle,
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
    #[error("no mesh identity to present")]
    NoIdentity,
    #[error("{0}")]
    Denied(String),
    #[error("HBONE target {0} is not this workload's address and port")]
    BadTarget(String),
    #[error("forwarding to {addr}: {source}")]
    Forward {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The inbound side of one namespace.
pub struct Inbound {
    pub ns: Arc<NetNs>,
    /// The identity presented: this one (`--inbound-netns`: the daemon's), else the workload
    /// snapshot's.
    fixed: Option<IdentityFiles>,
    /// The mode when no `PeerAuthentication` sets one (`--peer-authentication`).
    pub default_mode: MtlsMode,
    /// By (certificate file, HBONE).
    configs: crate::tls::ByFile<(PathBuf, bool), ServerConfig>,
    /// The AuthorizationPolicies of the workload, for the snapshot they were picked from.
    authz: std::sync::Mutex<Option<(Arc<crate::registry::Registry>, Arc<authorize::Policies>)>>,
}

/// The inbound listeners of one namespace (15006 and HBONE's 15008), bound and not serving yet.
pub struct Listeners {
    server: Arc<Inbound>,
    inbound: TcpListener,
    hbone: TcpListener,
    /// The ports steered to 15006; empty: every port but Drover's own.
    ports: Vec<u16>,
}

/// Inbound termination serving one namespace: while it lives, connections to the namespace's
/// addresses are steered to it; dropping it stops both listeners and the steering.
pub struct Attached {
    kernel: Arc<Kernel>,
    addresses: Vec<std::net::IpAddr>,
    stop: CancellationToken,
    _link: aya::programs::sk_lookup::SkLookupLink,
}

impl Listeners {
    /// Binds the listeners in `ns` (see [`Inbound::new`] for `fixed` and `default_mode`).
    pub fn bind(
        ns: Arc<NetNs>,
        fixed: Option<IdentityFiles>,
        default_mode: MtlsMode,
        ports: Vec<u16>,
    ) -> std::io::Result<Self> {
        let server = Arc::new(Inbound::new(ns, fixed, default_mode));
        Ok(Self {
            inbound: server.bind(drover_common::INBOUND_PORT)?,
            hbone: server.bind(drover_common::HBONE_PORT)?,
            server,
            ports,
        })
    }

    /// Fails when `identity`'s files cannot serve TLS (checked at start, naming the file).
    pub fn check_identity(&self, identity: &IdentityFiles) -> Result<(), Error> {
        self.server.server_config(identity, false).map(drop)
    }

    /// Steers the namespace's inbound connections to the listeners and serves them with the
    /// snapshot `policy` (its `PeerAuthentication`s, its identity) until `stop` or the drop of
    /// the returned guard.
    pub fn serve(
        self,
        kernel: &Arc<Kernel>,
        policy: RegistryHandle,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Attached, crate::redirect::Error> {
        let ns = self.server.ns.clone();
        let link = kernel.attach_inbound(&ns)?;
        kernel.steer_inbound(&ns.addresses, &self.inbound, &self.ports)?;
        let attached = Attached {
            kernel: kernel.clone(),
            addresses: ns.addresses.clone(),
            stop: stop.clone(),
            _link: link,
        };
        tracing::info!(netns = %ns.name, addresses = ?ns.addresses, ports = ?self.ports, "inbound termination on 15006, HBONE on 15008");
        tokio::spawn(crate::hbone::serve(
            self.server.clone(),
            self.hbone,
            policy.clone(),
            stop.clone(),
            tracker.clone(),
        ));
        tokio::spawn(
            self.server
                .serve(self.inbound, policy, stop, tracker.clone()),
        );
        Ok(attached)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stop.cancel();
        self.kernel.unsteer_inbound(&self.addresses);
    }
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
    pub fn new(ns: Arc<NetNs>, fixed: Option<IdentityFiles>, default_mode: MtlsMode) -> Self {
        Self {
            ns,
            fixed,
            default_mode,
            configs: Default::default(),
            authz: Default::default(),
        }
    }

    /// Binds `port` (15006 inbound, 15008 HBONE) inside the namespace: dual-stack `[::]`, so
    /// that IPv6 connections are steered and served as IPv4 ones are (the `sk_lookup` program
    /// can hand either family to a dual-stack socket), or `0.0.0.0` where the namespace has no
    /// IPv6.
    pub fn bind(&self, port: u16) -> std::io::Result<TcpListener> {
        use socket2::{Domain, Socket, Type};
        let listen = |domain: Domain, addr: SocketAddr| {
            let s = Socket::new(domain, Type::STREAM, None)?;
            if domain == Domain::IPV6 {
                s.set_only_v6(false)?;
            }
            // A daemon taking over from another binds beside it.
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            Ok::<_, std::io::Error>(std::net::TcpListener::from(s))
        };
        let std = self.ns.enter(|| {
            listen(Domain::IPV6, SocketAddr::from(([0u16; 8], port)))
                .or_else(|_| listen(Domain::IPV4, SocketAddr::from(([0, 0, 0, 0], port))))
        })??;
        std.set_nonblocking(true)?;
        TcpListener::from_std(std)
    }

    /// The identity this namespace's workload presents.
    pub fn identity(&self, policy: &RegistryHandle) -> Option<IdentityFiles> {
        (self.fixed.clone()).or_else(|| policy.load().mesh_identity().cloned())
    }

    /// Whether `target` is an address of this namespace on a port that is not Drover's own.
    pub fn serves(&self, target: SocketAddr) -> bool {
        self.ns.addresses.contains(&target.ip())
            && !drover_common::RESERVED_PORTS.contains(&target.port())
    }

    /// The TLS server configuration for `identity` (`hbone`: TLS 1.3 and ALPN `h2` only),
    /// rebuilt when the certificate file changed (renewal); the previous one stays when the new
    /// files cannot be used.
    pub fn server_config(
        &self,
        identity: &IdentityFiles,
        hbone: bool,
    ) -> Result<Arc<ServerConfig>, Error> {
        self.configs
            .get((identity.cert.clone(), hbone), &identity.cert, || {
                build_config(identity, hbone)
            })
    }

    /// Terminates mutual TLS on `stream` with the workload's identity and returns the client's
    /// identity (a SPIFFE id of the trust domain).
    pub async fn accept_mtls(
        &self,
        stream: TcpStream,
        policy: &RegistryHandle,
        hbone: bool,
    ) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, String), Error> {
        let identity = self.identity(policy).ok_or(Error::NoIdentity)?;
        let config = self.server_config(&identity, hbone)?;
        let tls = tokio::time::timeout(
            FIRST_BYTE,
            tokio_rustls::TlsAcceptor::from(config).accept(stream),
        )
        .await
        .map_err(|_| Error::Silent(FIRST_BYTE))?
        .map_err(Error::Tls)?;
        let names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(crate::tls::certificate_names)
            .unwrap_or_default();
        let domain = format!("spiffe://{}/", identity.trust_domain);
        match names.iter().find(|n| n.starts_with(&domain)).cloned() {
            Some(client) => Ok((tls, client)),
            None => Err(Error::ForeignIdentity(names, identity.trust_domain)),
        }
    }

    /// Counts and logs a connection (or HBONE stream) that was served.
    pub fn served(
        &self,
        peer: SocketAddr,
        target: SocketAddr,
        start: tokio::time::Instant,
        outcome: Result<String, Error>,
        hbone: bool,
    ) {
        self.record(peer, target, start, outcome.map(|how| (how, hbone)));
    }

    /// Counts and logs a refused connection (or HBONE stream).
    pub fn refused(
        &self,
        peer: SocketAddr,
        target: Option<SocketAddr>,
        start: tokio::time::Instant,
        e: Error,
    ) {
        self.record(peer, target.unwrap_or(peer), start, Err(e));
    }

    fn record(
        &self,
        peer: SocketAddr,
        target: SocketAddr,
        start: tokio::time::Instant,
        outcome: Result<(String, bool), Error>,
    ) {
        let s = &crate::stats::store().inbound;
        let counter = match &outcome {
            Ok((_, true)) => &s.hbone,
            Ok((how, false)) if how.starts_with("mTLS") => &s.mtls,
            Ok(_) => &s.plaintext_passed,
            Err(Error::PlaintextRefused) => &s.plaintext_refused,
            Err(Error::ForeignIdentity(..)) => &s.foreign_identity,
            Err(Error::Silent(_)) => &s.silent,
            Err(Error::Forward { .. }) => &s.forward_failed,
            Err(Error::BadTarget(_)) => &s.bad_target,
            Err(Error::Denied(_)) => &s.denied,
            Err(Error::Tls(_) | Error::Identity { .. } | Error::NoIdentity) => &s.tls_error,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        crate::access::Record {
            netns: self.ns.name.clone(),
            src: Some(peer),
            dst: target,
            start,
            kind: crate::access::Kind::Inbound {
                outcome: outcome.map(|(how, _)| how).map_err(|e| e.to_string()),
            },
        }
        .emit();
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
        let tasks = tracker.clone();
        accept_each(listener, shutdown, "inbound", |stream, peer| {
            let (me, policy) = (self.clone(), policy.clone());
            tasks.spawn(async move {
                let start = tokio::time::Instant::now();
                let (peer, target) = (
                    canonical(peer),
                    canonical(stream.local_addr().unwrap_or(peer)),
                );
                let mode = policy
                    .load()
                    .inbound_mtls()
                    .mode(target.port())
                    .unwrap_or(me.default_mode);
                let outcome = me.handle(stream, mode, &policy).await;
                me.served(
                    peer,
                    target,
                    start,
                    outcome.map(|how| how.to_string()),
                    false,
                );
            });
        })
        .await
    }

    /// Terminates (or, PERMISSIVE and DISABLE, passes) one connection in `mode` and relays it to
    /// its original destination; says how it was served.
    async fn handle(
        &self,
        stream: TcpStream,
        mode: MtlsMode,
        policy: &RegistryHandle,
    ) -> Result<Served, Error> {
        let target = canonical(stream.local_addr().map_err(Error::Tls)?);
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
        let peer = canonical(stream.peer_addr().map_err(Error::Tls)?);
        if !tls {
            if mode == MtlsMode::Strict {
                return Err(Error::PlaintextRefused);
            }
            self.deliver(stream, target, &Peer::plaintext(peer), policy, None)
                .await?;
            return Ok(Served::Plaintext(mode));
        }
        let (tls, client) = self.accept_mtls(stream, policy, false).await?;
        let peer = Peer {
            identity: Some(client.clone()),
            sni: tls.get_ref().1.server_name().map(str::to_string),
            ..Peer::plaintext(peer)
        };
        self.deliver(tls, target, &peer, policy, None).await?;
        Ok(Served::Mtls(client))
    }

    /// A connection to the workload, from inside its namespace.
    pub async fn forward(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
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

/// `addr` with an IPv4-mapped IPv6 address (an IPv4 connection on a dual-stack socket) as IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Calls `each` with every connection `listener` accepts, until `shutdown` (an accept error is
/// logged as `what`'s and retried after 50 ms).
pub async fn accept_each(
    listener: TcpListener,
    shutdown: CancellationToken,
    what: &str,
    mut each: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => each(stream, peer),
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS12_13: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS12, &rustls::version::TLS13];

/// A TLS record of type handshake (22) opens every ClientHello.
fn is_client_hello(first: &[u8]) -> bool {
    first.first() == Some(&0x16)
}

fn build_config(identity: &IdentityFiles, hbone: bool) -> Result<ServerConfig, Error> {
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
        .with_protocol_versions(if hbone { TLS13 } else { TLS12_13 })
        .map_err(|e| err(&identity.cert, &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err(&identity.cert, &e))?;
    // HBONE: HTTP/2 only. Otherwise whatever a mesh client offers (Istio's TCP and HTTP ALPN
    // values, then plain ones).
    if hbone {
        config.alpn_protocols = vec![b"h2".to_vec()];
        return Ok(config);
    }
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
