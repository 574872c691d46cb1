//! Composition root: configuration → registry → capture (eBPF or iptables) → listeners → relay,
//! plus the config watcher that hot-reloads the registry. [`build`] returns a [`Bound`] that knows
//! what it bound and how to shut it down gracefully.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config,
    proxy::{self, Proxy},
    redirect::{CaptureMode, Kernel, OriginalDst, SoOriginalDst, netns::NetNs},
    registry::{Client, RegistryHandle},
    reload::{self, Reloader},
};

/// `--mesh-ca` and friends.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    pub service_account: String,
    pub identity_dir: PathBuf,
}

/// Settings of `drover run`.
#[derive(Clone)]
pub struct RunConfig {
    pub config_paths: Vec<PathBuf>,
    pub cgroups: Vec<PathBuf>,
    pub netns: Vec<String>,
    pub fail_open: bool,
    pub capture: CaptureMode,
    pub pin_dir: PathBuf,
    pub drain_timeout: Duration,
    /// Namespace and labels of the enrolled workloads.
    pub client: Client,
    /// Watch the config paths and reload on change.
    pub watch: bool,
    /// Where the admin API listens (`None`: no admin API).
    pub admin: Option<std::net::SocketAddr>,
    /// Where `credentialName` secrets are looked up.
    pub credentials: crate::tls::Credentials,
    /// Issue the enrolled workloads a mesh identity.
    pub mesh: Option<MeshConfig>,
    /// Terminate mesh mTLS for the workloads of this namespace (name) on these ports.
    pub inbound: Option<(String, Vec<u16>, crate::inbound::PeerAuthentication)>,
    /// Lets `/logging?level=` change the log filter.
    pub log: Option<crate::admin::LogControl>,
}

/// A running daemon.
pub struct Bound {
    /// (namespace name, listener address) of every capture listener.
    pub listeners: Vec<(String, std::net::SocketAddr)>,
    pub registry: RegistryHandle,
    /// Where the admin API listens, when it does.
    pub admin: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
    _kernel: Option<Arc<Kernel>>,
}

/// Configuration could not be loaded: every problem, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigRejected(pub config::Error);

/// Starts the daemon.
pub async fn build(mut cfg: RunConfig) -> anyhow::Result<Bound> {
    if let Some(mesh) = &cfg.mesh {
        let ca = crate::mesh::Ca::load(&mesh.ca_dir)?;
        let spiffe = crate::mesh::spiffe_id(
            &mesh.trust_domain,
            &cfg.client.namespace,
            &mesh.service_account,
        );
        let lifetime = crate::mesh::WORKLOAD_LIFETIME;
        let files = ca.issue_into(&mesh.identity_dir, &spiffe, &mesh.trust_domain, lifetime)?;
        tracing::info!(identity = %spiffe, cert = %files.cert.display(), "workload identity issued");
        cfg.credentials.mesh = Some(files.clone());
        tokio::spawn(crate::mesh::renew(
            ca,
            mesh.identity_dir.clone(),
            files,
            lifetime,
        ));
    }
    // Every proxied connection costs two descriptors; use all the hard limit allows.
    if let Ok((soft, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let registry =
        reload::load(&cfg.config_paths, &cfg.client, &cfg.credentials).map_err(ConfigRejected)?;
    for w in registry.warnings() {
        tracing::warn!("{w}");
    }
    let home = NetNs::current().context("reading the daemon's network namespace")?;
    let mut namespaces = Vec::new();
    for name in &cfg.netns {
        let ns = NetNs::open(name, &home).map_err(|source| crate::redirect::Error::Netns {
            name: name.clone(),
            source,
        })?;
        namespaces.push(ns);
    }
    let vips: Vec<_> = registry.vips().map(|(a, id)| (a, id as u32)).collect();

    let (original, kernel): (Arc<dyn OriginalDst>, Option<Arc<Kernel>>) = match cfg.capture {
        CaptureMode::Ebpf => {
            let kernel = Arc::new(Kernel::load(&cfg.pin_dir, cfg.fail_open)?);
            for cg in &cfg.cgroups {
                kernel.enrol_cgroup(cg)?;
            }
            if !namespaces.is_empty() {
                kernel.attach_root()?;
            }
            kernel.set_enrolled_netns(&namespaces.iter().map(|n| n.cookie).collect::<Vec<_>>())?;
            kernel.set_vips(&vips)?;
            kernel.attach_upstream_counters()?;
            kernel.prune_links()?;
            (kernel.clone(), Some(kernel))
        }
        CaptureMode::Iptables => (Arc::new(SoOriginalDst), None),
    };

    // Cgroup enrolment (and iptables capture without namespaces) serve the daemon's own namespace.
    if !cfg.cgroups.is_empty() || (cfg.capture == CaptureMode::Iptables && namespaces.is_empty()) {
        namespaces.insert(0, home);
    }

    let registry = RegistryHandle::new(registry);
    let proxy = Arc::new(Proxy::new(registry.clone(), original));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut listeners = Vec::new();
    for ns in namespaces {
        let ns = Arc::new(ns);
        for l in proxy::bind_listeners(&ns)? {
            listeners.push((ns.name.clone(), l.local_addr()?));
            tokio::spawn(
                proxy
                    .clone()
                    .serve(ns.clone(), l, shutdown.clone(), tracker.clone()),
            );
        }
    }
    if let Some((name, ports, mode)) = &cfg.inbound {
        let (Some(kernel), Some(identity)) = (&kernel, &cfg.credentials.mesh) else {
            anyhow::bail!(
                "--inbound-netns needs eBPF capture and --mesh-ca (the workloads' identity)"
            );
        };
        let ns = Arc::new(NetNs::open(name, &NetNs::current()?).map_err(|source| {
            crate::redirect::Error::Netns {
                name: name.clone(),
                source,
            }
        })?);
        let inbound = Arc::new(crate::inbound::Inbound::new(
            ns.clone(),
            identity.clone(),
            *mode,
        ));
        inbound.server_config()?;
        let listener = inbound.bind()?;
        kernel.attach_inbound(&ns, &listener, ports)?;
        tracing::info!(netns = %name, ports = ?ports, mode = ?mode, "inbound mTLS termination on 15006");
        tokio::spawn(inbound.serve(listener, shutdown.clone(), tracker.clone()));
    }
    let admin = match cfg.admin {
        Some(addr) => Some(
            crate::admin::Admin {
                registry: registry.clone(),
                kernel: kernel.clone(),
                log: cfg.log.clone(),
            }
            .spawn(addr, shutdown.clone())
            .await?,
        ),
        None => None,
    };
    if cfg.watch {
        Reloader {
            paths: cfg.config_paths.clone(),
            client: cfg.client.clone(),
            credentials: cfg.credentials.clone(),
            registry: registry.clone(),
            kernel: kernel.clone(),
        }
        .spawn(shutdown.clone())?;
    }
    tracing::info!(
        services = registry.load().services().len(),
        vips = vips.len(),
        listeners = listeners.len(),
        capture = ?cfg.capture,
        fail_open = cfg.fail_open,
        "drover ready"
    );
    Ok(Bound {
        listeners,
        registry,
        admin,
        shutdown,
        tracker,
        drain_timeout: cfg.drain_timeout,
        _kernel: kernel,
    })
}

// === impl Bound ===

impl Bound {
    /// Waits for SIGTERM or SIGINT, then drains.
    pub async fn wait_termination(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = int.recv() => tracing::info!("SIGINT: draining"),
        }
        self.drain().await;
        Ok(())
    }

    /// Stops accepting, waits for open connections up to the drain deadline, then returns (open
    /// connections still left are closed when the runtime shuts down).
    pub async fn drain(self) {
        self.shutdown.cancel();
        self.tracker.close();
        let open = self.tracker.len();
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(open = self.tracker.len(), deadline = ?self.drain_timeout, "drain deadline reached; closing remaining connections");
        } else {
            tracing::info!(drained = open, "all connections drained");
        }
    }
}
