//! Composition root: configuration → registry → capture (eBPF or iptables) → listeners → relay,
//! plus the config watcher that hot-reloads the registry. [`build`] returns a [`Bound`] that knows
//! what it bound and how to shut it down gracefully.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    kubernetes::{self, Feed},
    proxy::{self, Proxy},
    redirect::{CaptureMode, Kernel, OriginalDst, PinLock, SoOriginalDst, netns::NetNs},
    registry::{Client, RegistryHandle},
    reload::{self, Reloader},
    workload::{Views, Workload},
};

/// `--mesh-ca` and friends.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub authority: crate::mesh::Authority,
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
    /// Balance eligible plain-TCP services in the kernel (`--fast-path`).
    pub fast_path: crate::fastpath::Mode,
    pub capture: CaptureMode,
    pub pin_dir: PathBuf,
    pub drain_timeout: Duration,
    /// Namespace and labels of the enrolled workloads.
    pub client: Client,
    /// Watch the config paths and reload on change.
    pub watch: bool,
    /// Where the admin API listens (`None`: no admin API).
    pub admin: Option<std::net::SocketAddr>,
    /// Where `GET /healthz/ready` is served for a kubelet's readiness probe (`None`: not).
    pub readiness: Option<std::net::SocketAddr>,
    /// Where `credentialName` secrets are looked up.
    pub credentials: crate::tls::Credentials,
    /// Issue the enrolled workloads a mesh identity.
    pub mesh: Option<MeshConfig>,
    /// Terminate mesh mTLS for the workloads of this namespace (name) on these ports.
    pub inbound: Option<(String, Vec<u16>, crate::config::policy::MtlsMode)>,
    /// Terminate inbound connections (every port) and HBONE for every enrolled namespace and
    /// pod, with this default mode.
    pub inbound_pods: Option<crate::config::policy::MtlsMode>,
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
    /// DNS servers for `resolution: DNS` ServiceEntries (empty: the system's).
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// Kubernetes mode: services, endpoints and Istio resources from the API server too.
    pub kubernetes: Option<kubernetes::Settings>,
    /// `--netns NAME=namespace/name`: the WorkloadEntry describing the workload of namespace
    /// NAME.
    pub netns_workloads: std::collections::BTreeMap<String, String>,
    /// Enrol pods as they start, through the `drover-cni` plugin on this socket.
    pub cni_socket: Option<PathBuf>,
    /// (CNI bin dir, CNI conf dir): install the plugin there and keep it chained.
    pub cni_install: Option<(PathBuf, PathBuf)>,
    /// The host's `/proc` (reconciling pods in Kubernetes mode).
    pub proc_dir: PathBuf,
    /// How long a plugin-made enrolment may miss its Pod object (reconciliation).
    pub cni_grace: std::time::Duration,
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
    signals: Option<Signals>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
    _kernel: Option<Arc<Kernel>>,
    /// Inbound termination of the start-time namespaces (detached when dropped).
    _inbound: Vec<crate::inbound::Attached>,
    /// Released early when a new daemon takes over (see [`crate::cni::handover`]).
    _lock: Arc<std::sync::Mutex<Option<PinLock>>>,
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
    // Before the first wait on the API server: a SIGHUP during a long sync must not end the
    // process (its default action); it is handled once the daemon serves.
    let signals = Signals::install()?;
    let early = Early::start(&cfg).await?;
    prepare(&mut cfg)?;
    let mut sources = cfg.sources(early.api.clone());
    sources.dns = dns_resolver(&cfg.dns_servers);
    // The configuration is validated before anything is opened or bound.
    let loaded = reload::load_config(&sources).map_err(ConfigRejected)?;
    for w in loaded.primary.warnings() {
        tracing::warn!("{w}");
    }
    let (lock, handed) = lock_pins(&cfg)?;
    // Removes what this start pinned if it fails from here on (disarmed on success).
    let mut rollback = Rollback(
        lock.as_ref()
            .filter(|l| l.created)
            .map(|_| cfg.pin_dir.clone()),
    );
    let shared_lock = Arc::new(std::sync::Mutex::new(lock));
    let (handed_cni, handed_pods, successor) = match handed {
        Some(h) => (Some(h.cni), Some(h.pods), Some(h.successor)),
        None => (None, None, None),
    };
    let bindings = Bindings::bind(&cfg, handed_cni).await?;
    sources.workloads = bindings.workloads(&cfg);
    let mut snapshots = loaded.resolve(&sources);
    let vips = snapshots.vips();
    let cidrs = snapshots.cidrs();
    let known = snapshots.known();
    let views = snapshots.into_views(&sources.workloads);
    let (original, kernel) = attach(&cfg, &bindings.cookies, (&vips, &cidrs))?;

    let registry = views.primary.clone();
    let Serving {
        listeners,
        shutdown,
        tracker,
    } = DataPath {
        views: views.clone(),
        original: original.clone(),
        listeners: bindings.listeners,
        downstream: cfg.downstream,
        overload: cfg.overload(),
        mark: true,
    }
    .serve()?;
    let inbound = serve_inbound(bindings.inbound, &kernel, &views, (&shutdown, &tracker))?;
    let (reload, admin) = control(
        &cfg,
        (sources, known),
        &views,
        &kernel,
        bindings.admin,
        &shutdown,
    )?;
    if let (Some(socket), Some(kernel)) = (bindings.cni, &kernel) {
        let serve = crate::cni::Serve {
            original,
            downstream: cfg.downstream,
            overload: cfg.overload(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            inbound: cfg.inbound_pods,
        };
        let mut enroller =
            crate::cni::Enroller::new(kernel.clone(), views.clone(), reload.clone(), serve)?;
        enroller.lock = Some(shared_lock.clone());
        enroller.pin_dir = cfg.pin_dir.clone();
        enroller.api = early.api.clone();
        let api = early.api.clone();
        let fixed = bindings.cookies.clone();
        start_cni(&cfg, enroller, (socket, fixed), (api, handed_pods)).await?;
    }
    let ready = early.stop_with(&shutdown);
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
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    // Only now does the daemon this one took over from retire.
    if let Some(s) = successor {
        s.ready();
    }
    Ok(Bound {
        listeners,
        registry,
        admin,
        reload,
        signals: Some(signals),
        shutdown,
        tracker,
        drain_timeout: cfg.drain_timeout,
        _kernel: kernel,
        _inbound: inbound,
        _lock: shared_lock,
    })
}

impl RunConfig {
    /// What a load reads: the files, the API's objects (`api`), the client, the credentials and
    /// the issuer of the workloads' own mesh identities.
    fn sources(&self, api: Option<Feed>) -> reload::Sources {
        reload::Sources {
            paths: self.config_paths.clone(),
            api,
            client: self.client.clone(),
            workloads: Vec::new(),
            credentials: self.credentials.clone(),
            issuer: self.mesh.as_ref().map(|m| {
                Arc::new(crate::mesh::Issuer::new(
                    m.authority.clone(),
                    m.trust_domain.clone(),
                    m.identity_dir.clone(),
                ))
            }),
            allow_empty: self.allow_empty,
            dns: None,
        }
    }

    /// The downstream overload limits.
    fn overload(&self) -> Arc<proxy::downstream::Overload> {
        proxy::downstream::Overload::new(self.max_downstream_connections, self.max_memory_bytes)
    }
}

/// What runs before the configuration is loaded: the readiness endpoint (answering 503 from the
/// start, so a probe sees "not ready" rather than nothing while the watchers sync) and the
/// Kubernetes watchers. Both stop if the start fails.
struct Early {
    ready: Arc<std::sync::atomic::AtomicBool>,
    api: Option<Feed>,
    stop: tokio_util::sync::DropGuard,
}

impl Early {
    async fn start(cfg: &RunConfig) -> anyhow::Result<Self> {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = CancellationToken::new();
        let guard = stop.clone().drop_guard();
        if let Some(addr) = cfg.readiness {
            match crate::admin::Admin::bind(addr).await {
                Ok(l) => crate::admin::serve_readiness(l, ready.clone(), stop.clone()),
                // The daemon this one takes over from holds it (host network): served once it
                // retires; until then the probe is refused, which reads as not ready.
                Err(_) if cfg.cni_socket.is_some() => {
                    let (ready, stop) = (ready.clone(), stop.clone());
                    tokio::spawn(async move {
                        while !stop.is_cancelled() {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if let Ok(l) = crate::admin::Admin::bind(addr).await {
                                crate::admin::serve_readiness(l, ready, stop);
                                return;
                            }
                        }
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let api = match &cfg.kubernetes {
            Some(k) => Some(watch_api(k, stop.clone()).await?),
            None => None,
        };
        Ok(Self {
            ready,
            api,
            stop: guard,
        })
    }

    /// From now on they stop with the data path's `shutdown`; returns the readiness flag.
    fn stop_with(self, shutdown: &CancellationToken) -> Arc<std::sync::atomic::AtomicBool> {
        let stop = self.stop.disarm();
        let until = shutdown.clone();
        tokio::spawn(async move {
            until.cancelled().await;
            stop.cancel();
        });
        self.ready
    }
}

/// Starts the Kubernetes watchers and waits until each has listed once (logging, while it
/// waits, why it cannot yet).
async fn watch_api(
    settings: &kubernetes::Settings,
    stop: CancellationToken,
) -> anyhow::Result<Feed> {
    let feed = Feed::new(&settings.cluster_domain);
    let source = kubernetes::spawn(settings, feed.clone(), stop).await?;
    tracing::info!(api_server = %source, node = %settings.node_name, "kubernetes: waiting for the first list of every watched kind");
    feed.synced().await;
    tracing::info!(api_server = %source, "kubernetes: synced");
    Ok(feed)
}

/// The workloads' mesh identity (when the daemon issues one) and the process limits.
fn prepare(cfg: &mut RunConfig) -> anyhow::Result<()> {
    if let Some(mesh) = &cfg.mesh {
        cfg.credentials.mesh = Some(issue_identity(mesh, &cfg.client.namespace)?);
    }
    raise_nofile();
    // Before the first snapshot names a cluster: sockets the kernel balanced for a previous
    // daemon hold their cluster's id, which must stay that cluster's.
    if cfg.capture == CaptureMode::Ebpf {
        match crate::redirect::loader::restore_cluster_ids(&cfg.pin_dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(clusters = n, "cluster ids restored from the pin directory"),
            Err(e) => {
                tracing::warn!(error = %e, "cluster ids not restored: clusters may get new ids")
            }
        }
    }
    Ok(())
}

/// The control plane of a running daemon: the reloader (watcher and SIGHUP), the `EP_DSTATS`
/// publisher (with eBPF capture) and, when bound, the admin API.
fn control(
    cfg: &RunConfig,
    (sources, known): (reload::Sources, reload::Known),
    views: &Views,
    kernel: &Option<Arc<Kernel>>,
    admin: Option<AdminBinding>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(reload::Trigger, Option<std::net::SocketAddr>)> {
    let registry = &views.primary;
    let api = sources.api.clone();
    let dns = sources.dns.clone();
    let fast = kernel.as_ref().map(|k| {
        crate::fastpath::run::FastPath::start(
            k.clone(),
            cfg.fast_path,
            views.clone(),
            shutdown.clone(),
        )
    });
    let reload = Reloader {
        sources,
        views: views.clone(),
        kernel: kernel.clone(),
        fast,
        known: std::sync::Mutex::new(known),
    }
    .spawn(cfg.watch, shutdown.clone())?;
    if let Some(dns) = &dns {
        let trigger = reload.clone();
        dns.on_change(move || {
            trigger.reload();
        });
    }
    if let Some(kernel) = kernel {
        crate::admin::publish_endpoint_stats(registry.clone(), kernel.clone(), shutdown.clone());
    }
    let server = crate::admin::Admin {
        registry: registry.clone(),
        kernel: kernel.clone(),
        log: cfg.log.clone(),
        api,
    };
    let admin = match admin {
        Some(AdminBinding::Bound(l)) => Some(server.serve(l, shutdown.clone())?),
        Some(AdminBinding::WhenFree(addr)) => {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                while !shutdown.is_cancelled() {
                    if let Ok(l) = crate::admin::Admin::bind(addr).await {
                        if let Err(e) = server.serve(l, shutdown) {
                            tracing::error!(error = %e, "admin API not served");
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
            Some(addr)
        }
        None => None,
    };
    Ok((reload, admin))
}

/// The data path without capture: `listeners` (any address, port 0 included) whose connections
/// get their original destination from `original`, served by the proxy over `registry` with
/// the downstream limits. [`build`] composes it over the kernel's capture; the in-process tests
/// compose it over loopback listeners and a [`crate::redirect::ByListener`].
pub struct DataPath {
    /// The snapshots the listeners read: each namespace's workload identity has its own.
    pub views: Views,
    pub original: Arc<dyn OriginalDst>,
    pub listeners: Vec<(Arc<NetNs>, tokio::net::TcpListener)>,
    pub downstream: proxy::downstream::Timeouts,
    pub overload: Arc<proxy::downstream::Overload>,
    /// Mark upstream sockets so that capture never takes them again (needs `CAP_NET_ADMIN`;
    /// only serving without capture may go without).
    pub mark: bool,
}

/// A data path being served: stop it with `shutdown`, wait for its connections on `tracker`.
pub struct Serving {
    /// (namespace name, address) of every listener.
    pub listeners: Vec<(String, std::net::SocketAddr)>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl DataPath {
    /// Serves every listener on its own task, with the memory watch of the overload limits.
    pub fn serve(self) -> std::io::Result<Serving> {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        tokio::spawn(self.overload.clone().watch_memory(shutdown.clone()));
        tokio::spawn(crate::memory::trim_after_load(shutdown.clone()));
        let mut listeners = Vec::new();
        for (ns, l) in self.listeners {
            listeners.push((ns.name.clone(), l.local_addr()?));
            let proxy = Proxy::new(
                self.views.for_netns(&ns.name),
                self.original.clone(),
                self.downstream,
                self.overload.clone(),
            );
            let proxy = Arc::new(if self.mark { proxy } else { proxy.unmarked() });
            tokio::spawn(proxy.serve(ns, l, shutdown.clone(), tracker.clone()));
        }
        Ok(Serving {
            listeners,
            shutdown,
            tracker,
        })
    }
}

/// Issues the enrolled workloads' mesh identity and keeps renewing it.
fn issue_identity(
    mesh: &MeshConfig,
    namespace: &str,
) -> anyhow::Result<crate::mesh::IdentityFiles> {
    let spiffe = crate::mesh::spiffe_id(&mesh.trust_domain, namespace, &mesh.service_account);
    let lifetime = crate::mesh::WORKLOAD_LIFETIME;
    let files =
        (mesh.authority).issue_into(&mesh.identity_dir, &spiffe, &mesh.trust_domain, lifetime)?;
    tracing::info!(identity = %spiffe, cert = %files.cert.display(), "workload identity issued");
    tokio::spawn(crate::mesh::renew(
        mesh.authority.clone(),
        mesh.identity_dir.clone(),
        files.clone(),
        lifetime,
    ));
    Ok(files)
}

/// Every proxied connection costs two descriptors; use all the hard limit allows.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// What a start opens and binds before anything is attached: namespaces, listeners, the inbound
/// listener and its certificates, the admin port. Any failure here leaves the kernel untouched.
struct Bindings {
    /// Cookies of the enrolled network namespaces.
    cookies: Vec<u64>,
    listeners: Vec<(Arc<NetNs>, tokio::net::TcpListener)>,
    /// Inbound termination, by namespace name (`--inbound-netns`, and with `--inbound-pods`
    /// every enrolled namespace).
    inbound: InboundByNetns,
    /// The `--inbound-netns` namespace (a workload of its own).
    inbound_ns: Option<Arc<NetNs>>,
    admin: Option<AdminBinding>,
    /// The `drover-cni` plugin's socket.
    cni: Option<tokio::net::UnixListener>,
}

impl Bindings {
    /// The enrolled workload namespaces (not the daemon's own) and the inbound one, each once.
    fn workloads(&self, cfg: &RunConfig) -> Vec<Workload> {
        let mut out: Vec<Workload> = Vec::new();
        let inbound = self.inbound_ns.as_ref();
        for ns in self.listeners.iter().map(|(ns, _)| ns).chain(inbound) {
            if ns.is_home || out.iter().any(|w| w.netns == ns.name) {
                continue;
            }
            out.push(Workload {
                netns: ns.name.clone(),
                addresses: ns.addresses.clone(),
                entry: cfg.netns_workloads.get(&ns.name).cloned(),
            });
        }
        out
    }

    /// `handed_cni`: the CNI socket a previous daemon handed over.
    async fn bind(
        cfg: &RunConfig,
        handed_cni: Option<std::os::fd::OwnedFd>,
    ) -> anyhow::Result<Self> {
        let home = NetNs::current().context("reading the daemon's network namespace")?;
        let mut served = Vec::new();
        for name in &cfg.netns {
            served.push(open_netns(name, &home)?);
        }
        for cg in &cfg.cgroups {
            crate::redirect::loader::check_cgroup(cg)?;
        }
        let cookies: Vec<u64> = served.iter().map(|n| n.cookie).collect();
        // Cgroup enrolment (and iptables capture without namespaces) serve the daemon's own
        // namespace.
        if !cfg.cgroups.is_empty() || (cfg.capture == CaptureMode::Iptables && cookies.is_empty()) {
            served.insert(0, home);
        }
        let mut listeners = Vec::new();
        for ns in served {
            let ns = Arc::new(ns);
            for l in proxy::bind_listeners(&ns)? {
                listeners.push((ns.clone(), l));
            }
        }
        let (inbound, inbound_ns) = bind_inbound(cfg, &listeners)?;
        // After a handover the previous daemon keeps its admin port until this one is ready:
        // it is taken once free.
        let handover = handed_cni.is_some();
        let admin = match cfg.admin {
            Some(addr) => match crate::admin::Admin::bind(addr).await {
                Ok(l) => Some(AdminBinding::Bound(l)),
                Err(_) if handover => Some(AdminBinding::WhenFree(addr)),
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let cni = match (&cfg.cni_socket, handed_cni) {
            (Some(_), _) if cfg.capture != CaptureMode::Ebpf => {
                anyhow::bail!("--cni-socket needs eBPF capture")
            }
            (Some(_), Some(fd)) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Some(tokio::net::UnixListener::from_std(l)?)
            }
            (Some(path), None) => Some(crate::cni::bind(path)?),
            (None, _) => None,
        };
        Ok(Self {
            cookies,
            listeners,
            inbound,
            inbound_ns,
            admin,
            cni,
        })
    }
}

/// Steers and serves the start-time namespaces' inbound listeners, each with its namespace's
/// snapshot; the guards detach them when dropped (nothing without eBPF capture).
fn serve_inbound(
    bound: InboundByNetns,
    kernel: &Option<Arc<Kernel>>,
    views: &Views,
    (shutdown, tracker): (&CancellationToken, &TaskTracker),
) -> anyhow::Result<Vec<crate::inbound::Attached>> {
    let Some(kernel) = kernel else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(bound.len());
    for (name, listeners) in bound {
        let policy = views.for_netns(&name);
        out.push(listeners.serve(kernel, policy, shutdown.child_token(), tracker)?);
    }
    Ok(out)
}

/// Inbound listeners by namespace name.
type InboundByNetns = Vec<(String, crate::inbound::Listeners)>;

/// The inbound listeners of `--inbound-netns` (its ports, the daemon's identity) and, with
/// `--inbound-pods`, of every enrolled namespace of `listeners` (every port, each workload's
/// own identity).
fn bind_inbound(
    cfg: &RunConfig,
    listeners: &[(Arc<NetNs>, tokio::net::TcpListener)],
) -> anyhow::Result<(InboundByNetns, Option<Arc<NetNs>>)> {
    use crate::inbound::Listeners;
    let mut out = Vec::new();
    let identity = (cfg.credentials.mesh.as_ref()).filter(|_| cfg.capture == CaptureMode::Ebpf);
    let mut fixed_ns = None;
    if let Some((name, ports, mode)) = &cfg.inbound {
        let Some(identity) = identity else {
            anyhow::bail!(
                "--inbound-netns needs eBPF capture and --mesh-ca (the workloads' identity)"
            );
        };
        let ns = Arc::new(open_netns(name, &NetNs::current()?)?);
        let l = Listeners::bind(ns.clone(), Some(identity.clone()), *mode, ports.clone())?;
        l.check_identity(identity)?;
        out.push((ns.name.clone(), l));
        fixed_ns = Some(ns);
    }
    if let Some(mode) = cfg.inbound_pods {
        if identity.is_none() {
            anyhow::bail!(
                "--inbound-pods needs eBPF capture and --mesh-ca (the workloads' identity)"
            );
        }
        let mut seen: Vec<String> = out.iter().map(|(n, _)| n.clone()).collect();
        for (ns, _) in listeners {
            if ns.is_home || seen.contains(&ns.name) {
                continue;
            }
            seen.push(ns.name.clone());
            out.push((
                ns.name.clone(),
                Listeners::bind(ns.clone(), None, mode, Vec::new())?,
            ));
        }
    }
    Ok((out, fixed_ns))
}

/// Enrols pods through `drover-cni`: restores the previous daemon's pods, serves the plugin on
/// `socket` and, with `--cni-conf-dir`, installs the plugin and keeps it chained.
async fn start_cni(
    cfg: &RunConfig,
    enroller: crate::cni::Enroller,
    (socket, fixed): (tokio::net::UnixListener, Vec<u64>),
    (api, handed): (Option<Feed>, Option<Vec<crate::cni::handover::HandedPod>>),
) -> anyhow::Result<()> {
    use crate::cni::{install, plugin::DEFAULT_EXCLUDED, reconcile::Reconcile};
    let path = cfg.cni_socket.clone().unwrap_or_default();
    let shutdown = enroller.serve.shutdown.clone();
    let reconcile = api.zip(cfg.kubernetes.as_ref()).map(|(feed, k)| Reconcile {
        feed,
        node: k.node_name.clone(),
        proc_dir: cfg.proc_dir.clone(),
        grace: cfg.cni_grace,
        excluded: DEFAULT_EXCLUDED.iter().map(|s| s.to_string()).collect(),
    });
    enroller
        .start((socket, &path), fixed, reconcile, handed)
        .await?;
    if let Some((bin_dir, conf_dir)) = &cfg.cni_install {
        let entry = install::Entry {
            socket: path,
            exclude_namespaces: None,
        };
        let done = install::install(
            &install::beside_this_executable(),
            bin_dir,
            conf_dir,
            &entry,
        )?;
        tracing::info!(outcome = ?done, "drover-cni installed");
        tokio::spawn(install::keep_chained(conf_dir.clone(), entry, shutdown));
    }
    Ok(())
}

/// One daemon per pin directory, decided before anything in it is touched; a running daemon of
/// the same CNI socket first hands its sockets over and releases the lock.
fn lock_pins(
    cfg: &RunConfig,
) -> anyhow::Result<(Option<PinLock>, Option<crate::cni::handover::Handed>)> {
    if cfg.capture != CaptureMode::Ebpf {
        return Ok((None, None));
    }
    let handed = match &cfg.cni_socket {
        Some(path) => crate::cni::handover::take(path, &cfg.pin_dir)?,
        None => None,
    };
    Ok((Some(PinLock::acquire(&cfg.pin_dir)?), handed))
}

/// The admin port: bound, or (after a handover) taken once the previous daemon frees it.
enum AdminBinding {
    Bound(tokio::net::TcpListener),
    WhenFree(std::net::SocketAddr),
}

/// Where original destinations come from, and the kernel side when capture is eBPF.
type Capture = (Arc<dyn OriginalDst>, Option<Arc<Kernel>>);

/// The resolver of `resolution: DNS` ServiceEntries; without one (no usable system resolver
/// configuration) such services get no endpoints, which is logged.
fn dns_resolver(servers: &[std::net::SocketAddr]) -> Option<crate::dns::Dns> {
    crate::dns::Dns::spawn(servers)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "no DNS resolver: resolution DNS services get no endpoints");
        })
        .ok()
}

/// Loads and attaches the kernel side (eBPF capture), or takes `SO_ORIGINAL_DST` (iptables).
fn attach(
    cfg: &RunConfig,
    cookies: &[u64],
    (vips, cidrs): (
        &[(std::net::SocketAddr, u32)],
        &[crate::redirect::loader::CapturedRange],
    ),
) -> anyhow::Result<Capture> {
    Ok(match cfg.capture {
        CaptureMode::Ebpf => {
            let kernel = Arc::new(Kernel::load(&cfg.pin_dir, cfg.fail_open)?);
            for cg in &cfg.cgroups {
                kernel.enrol_cgroup(cg)?;
            }
            if !cookies.is_empty() || cfg.cni_socket.is_some() {
                kernel.attach_root()?;
            }
            if cfg.cni_socket.is_some() {
                kernel.add_enrolled_netns(cookies)?;
            } else {
                kernel.set_enrolled_netns(cookies)?;
            }
            kernel.set_vips(vips)?;
            kernel.set_cidrs(cidrs)?;
            kernel.attach_upstream_counters()?;
            kernel.prune_links()?;
            (kernel.clone(), Some(kernel))
        }
        CaptureMode::Iptables => (Arc::new(SoOriginalDst), None),
    })
}

fn open_netns(name: &str, home: &NetNs) -> Result<NetNs, crate::redirect::Error> {
    NetNs::open(name, home).map_err(|source| crate::redirect::Error::Netns {
        name: name.to_string(),
        source,
    })
}

/// The signals the daemon handles, registered before it reports ready (so that a signal sent
/// right after "drover ready" never finds the default action, which would end the process).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    /// Names of the ignored signals as they arrive.
    ignored: tokio::sync::mpsc::UnboundedReceiver<&'static str>,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let (ignored_tx, ignored) = tokio::sync::mpsc::unbounded_channel();
        for (name, kind) in IGNORED_SIGNALS {
            let mut s = signal(SignalKind::from_raw(kind))?;
            let tx = ignored_tx.clone();
            tokio::spawn(async move { while s.recv().await.is_some() && tx.send(name).is_ok() {} });
        }
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
            ignored,
        })
    }
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
    pub async fn wait_termination(mut self) -> anyhow::Result<()> {
        let Some(Signals {
            mut term,
            mut int,
            mut quit,
            mut hup,
            mut ignored,
        }) = self.signals.take()
        else {
            anyhow::bail!("signals already taken");
        };
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

#[cfg(test)]
mod tests;
