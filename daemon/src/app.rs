//! Composition root: configuration → registry → capture (eBPF or iptables) → listeners → relay,
//! plus the config watcher that hot-reloads the registry. [`build`] returns a [`Bound`] that knows
//! what it bound and how to shut it down gracefully.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    proxy::{self, Proxy},
    redirect::{CaptureMode, Kernel, OriginalDst, PinLock, SoOriginalDst, netns::NetNs},
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
    /// Request-header and idle timeouts of captured HTTP connections.
    pub downstream: proxy::downstream::Timeouts,
    /// Overload limits: open downstream connections (0: none) and resident memory in bytes (0:
    /// none).
    pub max_downstream_connections: u64,
    pub max_memory_bytes: u64,
    /// Accept a configuration that defines no service (refused by default: nothing to capture
    /// is more often a broken file than an intent).
    pub allow_empty: bool,
}

/// A running daemon.
pub struct Bound {
    /// (namespace name, listener address) of every capture listener.
    pub listeners: Vec<(String, std::net::SocketAddr)>,
    pub registry: RegistryHandle,
    /// Where the admin API listens, when it does.
    pub admin: Option<std::net::SocketAddr>,
    /// Reloads the configuration (SIGHUP).
    pub reload: reload::Trigger,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
    _kernel: Option<Arc<Kernel>>,
    _lock: Option<PinLock>,
}

/// Configuration could not be loaded: every problem, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigRejected(pub reload::Error);

/// Starts the daemon. Everything that can fail for a reason outside the kernel (configuration,
/// namespaces, cgroups, ports, certificates) is checked or bound before anything is attached, and
/// a start that fails after attaching removes what it pinned, so a failed start leaves no capture
/// behind (a restart's pre-existing pins are left as the previous daemon left them).
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
    let registry = reload::load(
        &cfg.config_paths,
        &cfg.client,
        &cfg.credentials,
        cfg.allow_empty,
    )
    .map_err(ConfigRejected)?;
    for w in registry.warnings() {
        tracing::warn!("{w}");
    }
    // One daemon per pin directory, decided before anything in it is touched.
    let lock = match cfg.capture {
        CaptureMode::Ebpf => Some(PinLock::acquire(&cfg.pin_dir)?),
        CaptureMode::Iptables => None,
    };
    // Removes what this start pinned if it fails from here on (disarmed on success).
    let mut rollback = Rollback(
        lock.as_ref()
            .filter(|l| l.created)
            .map(|_| cfg.pin_dir.clone()),
    );
    let home = NetNs::current().context("reading the daemon's network namespace")?;
    let mut namespaces = Vec::new();
    for name in &cfg.netns {
        namespaces.push(open_netns(name, &home)?);
    }
    for cg in &cfg.cgroups {
        crate::redirect::loader::check_cgroup(cg)?;
    }
    // Cgroup enrolment (and iptables capture without namespaces) serve the daemon's own namespace.
    let cookies: Vec<u64> = namespaces.iter().map(|n| n.cookie).collect();
    let mut served = namespaces;
    if !cfg.cgroups.is_empty() || (cfg.capture == CaptureMode::Iptables && cookies.is_empty()) {
        served.insert(0, home);
    }
    let mut bound_listeners = Vec::new();
    for ns in served {
        let ns = Arc::new(ns);
        for l in proxy::bind_listeners(&ns)? {
            bound_listeners.push((ns.clone(), l));
        }
    }
    let inbound = match &cfg.inbound {
        Some((name, ports, mode)) => {
            let Some(identity) = cfg
                .credentials
                .mesh
                .as_ref()
                .filter(|_| cfg.capture == CaptureMode::Ebpf)
            else {
                anyhow::bail!(
                    "--inbound-netns needs eBPF capture and --mesh-ca (the workloads' identity)"
                );
            };
            let ns = Arc::new(open_netns(name, &NetNs::current()?)?);
            let inbound = Arc::new(crate::inbound::Inbound::new(
                ns.clone(),
                identity.clone(),
                *mode,
            ));
            inbound.server_config()?;
            let listener = inbound.bind()?;
            Some((inbound, ns, listener, ports.clone(), *mode, name.clone()))
        }
        None => None,
    };
    let admin_listener = match cfg.admin {
        Some(addr) => Some(crate::admin::Admin::bind(addr).await?),
        None => None,
    };

    let vips: Vec<_> = registry.vips().map(|(a, id)| (a, id as u32)).collect();
    let (original, kernel): (Arc<dyn OriginalDst>, Option<Arc<Kernel>>) = match cfg.capture {
        CaptureMode::Ebpf => {
            let kernel = Arc::new(Kernel::load(&cfg.pin_dir, cfg.fail_open)?);
            for cg in &cfg.cgroups {
                kernel.enrol_cgroup(cg)?;
            }
            if !cookies.is_empty() {
                kernel.attach_root()?;
            }
            kernel.set_enrolled_netns(&cookies)?;
            kernel.set_vips(&vips)?;
            kernel.attach_upstream_counters()?;
            kernel.prune_links()?;
            (kernel.clone(), Some(kernel))
        }
        CaptureMode::Iptables => (Arc::new(SoOriginalDst), None),
    };

    let registry = RegistryHandle::new(registry);
    let shutdown = CancellationToken::new();
    let overload =
        proxy::downstream::Overload::new(cfg.max_downstream_connections, cfg.max_memory_bytes);
    tokio::spawn(overload.clone().watch_memory(shutdown.clone()));
    tokio::spawn(crate::memory::trim_after_load(shutdown.clone()));
    let proxy = Arc::new(Proxy::new(
        registry.clone(),
        original,
        cfg.downstream,
        overload,
    ));
    let tracker = TaskTracker::new();
    let mut listeners = Vec::new();
    for (ns, l) in bound_listeners {
        listeners.push((ns.name.clone(), l.local_addr()?));
        tokio::spawn(
            proxy
                .clone()
                .serve(ns, l, shutdown.clone(), tracker.clone()),
        );
    }
    if let Some((inbound, ns, listener, ports, mode, name)) = inbound {
        let kernel = kernel
            .as_ref()
            .expect("checked: inbound needs eBPF capture");
        kernel.attach_inbound(&ns, &listener, &ports)?;
        tracing::info!(netns = %name, ports = ?ports, mode = ?mode, "inbound mTLS termination on 15006");
        tokio::spawn(inbound.serve(listener, shutdown.clone(), tracker.clone()));
    }
    let reload = Reloader {
        paths: cfg.config_paths.clone(),
        client: cfg.client.clone(),
        credentials: cfg.credentials.clone(),
        registry: registry.clone(),
        kernel: kernel.clone(),
        allow_empty: cfg.allow_empty,
    }
    .spawn(cfg.watch, shutdown.clone())?;
    let admin = match admin_listener {
        Some(l) => Some(
            crate::admin::Admin {
                registry: registry.clone(),
                kernel: kernel.clone(),
                log: cfg.log.clone(),
            }
            .serve(l, shutdown.clone())?,
        ),
        None => None,
    };
    rollback.0 = None;
    // What parsing the configuration freed goes back to the OS.
    crate::memory::trim();
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
        reload,
        shutdown,
        tracker,
        drain_timeout: cfg.drain_timeout,
        _kernel: kernel,
        _lock: lock,
    })
}

fn open_netns(name: &str, home: &NetNs) -> Result<NetNs, crate::redirect::Error> {
    NetNs::open(name, home).map_err(|source| crate::redirect::Error::Netns {
        name: name.to_string(),
        source,
    })
}

/// Signals whose default action ends the process and that the daemon has no use for.
const IGNORED_SIGNALS: [(&str, i32); 11] = [
    ("SIGUSR1", libc::SIGUSR1),
    ("SIGUSR2", libc::SIGUSR2),
    ("SIGALRM", libc::SIGALRM),
    ("SIGPIPE", libc::SIGPIPE),
    ("SIGVTALRM", libc::SIGVTALRM),
    ("SIGPROF", libc::SIGPROF),
    ("SIGIO", libc::SIGIO),
    ("SIGPWR", libc::SIGPWR),
    ("SIGSTKFLT", libc::SIGSTKFLT),
    ("SIGXCPU", libc::SIGXCPU),
    ("SIGXFSZ", libc::SIGXFSZ),
];

/// Removes a pin directory this start created, unless disarmed (`.0 = None`) once the start
/// succeeded: unpinning detaches the links, so no capture outlives a failed start.
struct Rollback(Option<PathBuf>);

impl Drop for Rollback {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {
                    tracing::info!(pins = %dir.display(), "start failed: removed what it pinned")
                }
                Err(e) => {
                    tracing::error!(pins = %dir.display(), error = %e, "start failed and its pins could not be removed; run drover uninstall")
                }
            }
        }
    }
}

// === impl Bound ===

impl Bound {
    /// Handles signals until SIGTERM, SIGINT or SIGQUIT, then drains. SIGHUP reloads the
    /// configuration; the other signals whose default action would end the process (SIGUSR1,
    /// SIGUSR2, SIGALRM, SIGPIPE, …) are logged and ignored, so none of them kills the daemon
    /// silently.
    pub async fn wait_termination(self) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut quit = signal(SignalKind::quit())?;
        let mut hup = signal(SignalKind::hangup())?;
        let (ignored_tx, mut ignored) = tokio::sync::mpsc::unbounded_channel();
        for (name, kind) in IGNORED_SIGNALS {
            let mut s = signal(SignalKind::from_raw(kind))?;
            let tx = ignored_tx.clone();
            tokio::spawn(async move { while s.recv().await.is_some() && tx.send(name).is_ok() {} });
        }
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
                _ = int.recv() => { tracing::info!("SIGINT: draining"); break }
                _ = quit.recv() => { tracing::info!("SIGQUIT: draining"); break }
                _ = hup.recv() => if !self.reload.reload() {
                    tracing::error!("SIGHUP: the reloader has stopped; configuration not reloaded");
                },
                Some(name) = ignored.recv() => tracing::warn!(signal = name, "signal ignored (SIGHUP reloads; SIGTERM, SIGINT and SIGQUIT drain and exit)"),
            }
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
