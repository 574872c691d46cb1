//! Pods enrolled while the daemon runs, through the `drover-cni` chained plugin: the plugin hands
//! the pod's network namespace (the fd, passed with `SCM_RIGHTS`) and its name and addresses to
//! the daemon over a Unix socket, and the daemon enrols it before it answers — listeners bound
//! inside the namespace, its own registry snapshot (the pod's identity: see
//! [`crate::workload`]), its cookie in the kernel's `ENROLLED` map — so the pod's very first
//! connect is captured. DEL stops its listeners, un-enrols the cookie and drops the fd.
//!
//! Protocol (one exchange per connection, both ways one JSON line): the plugin sends a
//! [`Request`] (the namespace fd attached to its first byte for ADD), the daemon answers a
//! [`Reply`]. [`plugin`] is the plugin's side.
//!
//! Invariants: the daemon's own namespace (a `hostNetwork` pod) is never enrolled; enrolments are
//! keyed by container id and one operation per container runs at a time, so an ADD for a
//! container already enrolled answers OK without a second enrolment and a DEL (repeated, or for
//! a container never added) only ever removes its own; the enrolled set in the kernel is always
//! the start-time namespaces plus the live CNI pods; a reply is sent only once the enrolment is
//! complete or has failed (and a failed one leaves nothing behind); an enrolment the plugin can
//! no longer hear of (its deadline passed, or the reply could not be written) is rolled back;
//! only root (or the daemon's own user) is served, on an owner-only socket.

pub mod handover;
pub mod install;
pub mod plugin;
pub mod reconcile;

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut, Read, Write},
    net::IpAddr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{
    proxy::{self, Proxy},
    redirect::{Kernel, OriginalDst, netns::NetNs},
    reload::Trigger,
    workload::{Views, Workload},
};

/// Where the daemon listens for the plugin by default.
pub const DEFAULT_SOCKET: &str = "/var/run/drover/cni.sock";
/// The plugin's bound on one whole exchange, connect to reply (Istio's CNI plugin waits 5 s for
/// its agent too).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the daemon waits for a whole request once it accepted the connection (a request is
/// one `sendmsg` of well under a KiB).
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// What the daemon keeps of the plugin's deadline for the reply to reach it: an enrolment not
/// complete by `deadline - REPLY_MARGIN` is rolled back and answered as failed.
const REPLY_MARGIN: Duration = Duration::from_millis(500);
/// How long an ADD waits for the API feed to deliver the pod's Pod (Kubernetes mode).
const POD_WAIT: Duration = Duration::from_secs(1);
/// Requests handled at once (past their read); a request beyond waits for a slot until its
/// deadline.
const MAX_EXCHANGES: usize = 64;
/// Connections open at once (each costs a task and a descriptor while its request is read); a
/// connection beyond is answered "busy" at once (the plugin reports "try again later").
const MAX_CONNECTIONS: usize = 4096;
/// The longest request the daemon reads.
const MAX_REQUEST: usize = 64 << 10;

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    /// CNI 1.1 `STATUS`: whether the daemon can enrol pods.
    Status,
    /// CNI 1.1 `GC`: `valid` lists the containers the runtime still has; the plugin's other
    /// enrolments go.
    Gc,
}

/// One request from the plugin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// `CNI_CONTAINERID`: the key of an enrolment.
    pub container_id: String,
    /// `K8S_POD_NAMESPACE` (empty when the runtime does not say).
    #[serde(default)]
    pub pod_namespace: String,
    /// `K8S_POD_NAME` (empty when the runtime does not say).
    #[serde(default)]
    pub pod_name: String,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// `CNI_NETNS`, for messages.
    #[serde(default)]
    pub netns: String,
    /// When the plugin gives up, in ms of `CLOCK_MONOTONIC` (see [`monotonic_ms`]); the daemon
    /// answers before it or rolls the enrolment back. Absent: [`EXCHANGE_TIMEOUT`] from accept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// GC: the container ids the runtime still has attached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid: Vec<String>,
}

impl Request {
    /// A request with nothing but its command and container.
    pub fn new(command: Command, container_id: impl Into<String>) -> Self {
        Self {
            command,
            container_id: container_id.into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            ips: Vec::new(),
            netns: String::new(),
            deadline_ms: None,
            valid: Vec::new(),
        }
    }
}

/// The daemon's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why an exchange or an enrolment failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("CNI socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("reading the request: {0}")]
    Read(String),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("ADD for {0} carries no network namespace fd")]
    NoNamespace(String),
    #[error("network namespace {netns}: {source}")]
    Netns {
        netns: String,
        source: std::io::Error,
    },
    #[error("binding the capture listeners in {netns}: {source}")]
    Listen {
        netns: String,
        source: std::io::Error,
    },
    #[error("enrolling the namespace in the kernel: {0}")]
    Kernel(String),
    #[error("container {0} is not enrolled")]
    NotEnrolled(String),
    #[error("{0}: the plugin's deadline passed first (rolled back)")]
    TimedOut(String),
    #[error("peer {0} refused: only root (or the daemon's own user) may use this socket")]
    Peer(String),
    #[error("the daemon is busy (its limit of {0} is reached); try again")]
    Busy(usize),
}

/// What serving an enrolled pod's listeners needs (the data path's parts).
#[derive(Clone)]
pub struct Serve {
    pub original: Arc<dyn OriginalDst>,
    pub downstream: proxy::downstream::Timeouts,
    pub overload: Arc<proxy::downstream::Overload>,
    pub shutdown: CancellationToken,
    pub tracker: tokio_util::task::TaskTracker,
    /// `--inbound-pods`: terminate every pod's inbound connections and HBONE, with this default
    /// mode.
    pub inbound: Option<crate::config::policy::MtlsMode>,
}

/// Enrols and un-enrols pods.
pub struct Enroller {
    pub kernel: Arc<Kernel>,
    pub views: Views,
    pub reload: Trigger,
    pub serve: Serve,
    /// Cookies of the namespaces enrolled at start (never removed).
    pub fixed: Vec<u64>,
    home: NetNs,
    pods: Mutex<BTreeMap<String, Enrolled>>,
    /// Where the enrolments are kept for the next daemon (beside the socket).
    state: Option<PathBuf>,
    /// The pin directory's lock, released when this daemon hands over to a new one.
    pub lock: Option<Arc<Mutex<Option<crate::redirect::loader::PinLock>>>>,
    /// A copy of the CNI socket's fd, for a handover.
    cni_fd: Mutex<Option<OwnedFd>>,
    /// One operation at a time per container id (concurrent or repeated ADD and DEL).
    busy: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// One permit per exchange in flight (a handover takes them all).
    slots: Arc<tokio::sync::Semaphore>,
    /// While a handover waits for the new daemon: no exchange is accepted, no pass reconciles.
    paused: tokio::sync::watch::Sender<bool>,
    /// The pin directory (its lock is taken back when a new daemon fails after a handover).
    pub pin_dir: PathBuf,
    /// Kubernetes mode: the Pods, so that a pod that opted out is not enrolled.
    pub api: Option<crate::kubernetes::Feed>,
}

/// One enrolled pod.
struct Enrolled {
    /// The workload's key in the views: its name (`namespace/pod`, or the container id), with
    /// `#<container>` when another sandbox of the same pod holds the name.
    name: String,
    cookie: u64,
    stop: CancellationToken,
    /// The ADD it was enrolled by (kept in the state file).
    req: Request,
    /// The namespace's own addresses.
    addresses: Vec<IpAddr>,
    since: std::time::Instant,
    /// Kept in the state file (not for pods reconciliation found: it finds them again).
    persist: bool,
    /// Copies of the namespace's fd and its listeners' fds, for a handover.
    fds: Vec<OwnedFd>,
    /// Its inbound termination (`--inbound-pods`), detached when the pod goes.
    _inbound: Option<crate::inbound::Attached>,
}

/// A pod's namespace opened and its listeners bound, not serving yet.
struct Prepared {
    req: Request,
    name: String,
    ns: Arc<NetNs>,
    listeners: Vec<tokio::net::TcpListener>,
    inbound: Option<crate::inbound::Listeners>,
    handle: crate::registry::RegistryHandle,
}

/// The right to change one container's enrolment (see [`Enroller::exclusive`]).
pub struct Exclusive<'a> {
    enroller: &'a Enroller,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut busy = (self.enroller.busy.lock()).unwrap_or_else(|e| e.into_inner());
        // Only the map's and this one's: nobody waits for the container any more.
        if Arc::strong_count(&self.lock) == 2 {
            busy.remove(&self.id);
        }
    }
}

// === impl Enroller ===

impl Enroller {
    pub fn new(
        kernel: Arc<Kernel>,
        views: Views,
        reload: Trigger,
        serve: Serve,
    ) -> std::io::Result<Self> {
        Ok(Self {
            kernel,
            views,
            reload,
            serve,
            fixed: Vec::new(),
            home: NetNs::current()?,
            pods: Mutex::default(),
            state: None,
            lock: None,
            cni_fd: Mutex::default(),
            busy: Mutex::default(),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_EXCHANGES)),
            paused: tokio::sync::watch::channel(false).0,
            pin_dir: PathBuf::new(),
            api: None,
        })
    }

    /// Restores the pods a previous daemon enrolled (kept in `pods.json` beside `path`), then
    /// serves the plugin on `socket` until the data path shuts down; `fixed` are the cookies of
    /// the namespaces enrolled at start. Returns once the restored pods are served.
    /// With `reconcile` (Kubernetes mode), the node's pods the plugin never reported are found
    /// and enrolled too, before it returns and then periodically.
    /// `handed`: the pods a previous daemon handed over (see [`handover`]), restored in place of
    /// the state file's.
    pub async fn start(
        mut self,
        (socket, path): (tokio::net::UnixListener, &Path),
        fixed: Vec<u64>,
        reconcile: Option<reconcile::Reconcile>,
        handed: Option<Vec<handover::HandedPod>>,
    ) -> Result<(), Error> {
        use std::os::fd::AsFd;
        self.fixed = fixed;
        self.state = Some(path.with_file_name("pods.json"));
        let fd = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::Socket {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        *self.cni_fd.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
        let handover_path = handover::path(path);
        let handover = match handed {
            Some(pods) => {
                self.take_over(pods).await?;
                // The old daemon's handover socket: this one's takes its path.
                bind_replacing(&handover_path)?
            }
            None => {
                self.restore().await?;
                bind(&handover_path)?
            }
        };
        let shutdown = self.serve.shutdown.clone();
        tracing::info!(socket = %path.display(), "enrolling pods through drover-cni");
        let me = Arc::new(self);
        tokio::spawn(handover::serve(handover, handover_path, me.clone()));
        if let Some(r) = reconcile {
            // A failed pass never stops the start: the next one tries again.
            if let Err(e) = me.reconcile(&r).await {
                tracing::warn!(error = %e, "reconciling the node's pods failed");
            }
            tokio::spawn(me.clone().keep_reconciling(r));
        }
        tokio::spawn(serve(socket, me, shutdown));
        Ok(())
    }

    /// Re-enrols the pods of the state file whose namespace still exists, in one reload, and
    /// makes the kernel's enrolled set exact (a vanished pod's cookie goes).
    async fn restore(&self) -> Result<(), Error> {
        let Some(path) = &self.state else {
            return Ok(());
        };
        let saved: Vec<Request> = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "unreadable CNI state; no pod restored");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let mut ready = Vec::new();
        for req in saved {
            let opened = std::fs::File::open(&req.netns).map_err(|e| e.to_string());
            let prepared = opened.and_then(|f| {
                self.prepare(&req, f.into(), None)
                    .map_err(|e| e.to_string())
            });
            match prepared {
                Ok(Some(p)) => ready.push(p),
                Ok(None) => {}
                Err(e) => {
                    tracing::info!(pod = %workload_name(&req), error = %e, "not restored (gone)")
                }
            }
        }
        if !ready.is_empty() {
            self.reload.workloads_changed().await;
        }
        let restored = ready.len();
        for p in ready {
            self.activate(p, true);
        }
        self.sync_kernel()?;
        self.save();
        tracing::info!(restored, "CNI enrolments restored");
        Ok(())
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Enrolled>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request (`fd`: the namespace, for ADD) before `deadline`. The caller holds
    /// the container's [`Enroller::exclusive`] guard.
    pub async fn handle(
        &self,
        req: Request,
        fd: Option<OwnedFd>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Error> {
        match req.command {
            Command::Add => {
                let fd = fd.ok_or_else(|| Error::NoNamespace(req.container_id.clone()))?;
                self.add(&req, fd, deadline).await
            }
            // Only the container's own enrolment: a repeated DEL, or one for a container never
            // added, finds nothing and succeeds.
            Command::Del => {
                self.del(&req.container_id);
                Ok(())
            }
            Command::Check if self.pods().contains_key(&req.container_id) => Ok(()),
            Command::Check => Err(Error::NotEnrolled(req.container_id)),
            Command::Status => Ok(()),
            Command::Gc => {
                self.gc(&req.valid);
                Ok(())
            }
        }
    }

    /// Waits (until `deadline`) for the right to change container `id`'s enrolment: ADD and
    /// DEL of one container never interleave, and an ADD's reply is written (or the ADD rolled
    /// back) before the next operation on it starts.
    pub async fn exclusive(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Exclusive<'_>, Error> {
        let lock = (self.busy.lock().unwrap_or_else(|e| e.into_inner()))
            .entry(id.to_string())
            .or_default()
            .clone();
        let waited = tokio::time::timeout_at(deadline, lock.clone().lock_owned()).await;
        let mut one = Exclusive {
            enroller: self,
            id: id.to_string(),
            lock,
            guard: None,
        };
        match waited {
            Ok(g) => {
                one.guard = Some(g);
                Ok(one)
            }
            Err(_) => Err(Error::TimedOut(format!(
                "container {id}: another operation on it"
            ))),
        }
    }

    /// Enrols the pod of `req` whose namespace is `fd`; an enrolment that cannot complete
    /// before `deadline` is undone.
    async fn add(
        &self,
        req: &Request,
        fd: OwnedFd,
        deadline: tokio::time::Instant,
    ) -> Result<(), Error> {
        if self.pods().contains_key(&req.container_id) {
            return Ok(());
        }
        // As ambient skips them: `istio.io/dataplane-mode: none`, or a sidecar of its own.
        let pod = self.known_pod(req, deadline).await;
        if pod.is_some_and(|p| p.opted_out) {
            tracing::info!(pod = %workload_name(req), container = %req.container_id, "pod opted out (istio.io/dataplane-mode=none or a sidecar): not enrolled");
            return Ok(());
        }
        let Some(prepared) = self.prepare(req, fd, None)? else {
            return Ok(());
        };
        // Its own snapshot (identity) before its first connect is captured.
        if tokio::time::timeout_at(deadline, self.reload.workloads_changed())
            .await
            .is_err()
        {
            self.views.remove(&prepared.name);
            return Err(Error::TimedOut(format!(
                "enrolling {} (its snapshot was not built in time)",
                prepared.name
            )));
        }
        self.activate(prepared, true);
        if let Err(e) = self.sync_kernel() {
            self.del(&req.container_id);
            return Err(e);
        }
        self.save();
        Ok(())
    }

    /// CNI `GC`: un-enrols the plugin's enrolments whose container is not in `valid` (pods
    /// reconciliation found are not the plugin's).
    fn gc(&self, valid: &[String]) {
        let stale: Vec<String> = (self.pods().iter())
            .filter(|(id, p)| p.persist && !valid.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            tracing::info!(container = %id, "GC: the runtime no longer has this container");
            self.del(&id);
        }
    }

    /// Opens the namespace of `fd` and binds its listeners (or takes `listeners`, handed over);
    /// the workload is added to the views (its snapshot comes with the next reload). `None`: the
    /// host's namespace, never enrolled.
    fn prepare(
        &self,
        req: &Request,
        fd: OwnedFd,
        listeners: Option<Vec<tokio::net::TcpListener>>,
    ) -> Result<Option<Prepared>, Error> {
        let name = workload_name(req);
        let ns = NetNs::from_fd(&name, fd, &self.home).map_err(|source| Error::Netns {
            netns: req.netns.clone(),
            source,
        })?;
        if ns.is_home {
            tracing::info!(pod = %name, "host-network pod: not enrolled");
            return Ok(None);
        }
        let listeners = match listeners {
            Some(l) => l,
            None => proxy::bind_listeners(&ns).map_err(|source| Error::Listen {
                netns: name.clone(),
                source,
            })?,
        };
        let ns = Arc::new(ns);
        let inbound = match self.serve.inbound.filter(|_| self.in_mesh(req)) {
            Some(mode) => Some(
                crate::inbound::Listeners::bind(ns.clone(), None, mode, Vec::new()).map_err(
                    |source| Error::Listen {
                        netns: name.clone(),
                        source,
                    },
                )?,
            ),
            None => None,
        };
        let (name, handle) = self.views.add(
            Workload {
                netns: name,
                addresses: ns.addresses.clone(),
                entry: None,
            },
            &req.container_id,
        );
        Ok(Some(Prepared {
            req: req.clone(),
            name,
            ns,
            listeners,
            inbound,
            handle,
        }))
    }

    /// The Pod of `req` as the API feed knows it, waiting (at most [`POD_WAIT`], and never past
    /// the reply's deadline) when the watch has not delivered it yet: the kubelet creates the
    /// Pod before the sandbox, but the daemon's watch may be a few milliseconds behind, and the
    /// pod's identity, mesh membership and opt-out all come from it. `None` without the API.
    async fn known_pod(
        &self,
        req: &Request,
        deadline: tokio::time::Instant,
    ) -> Option<crate::kubernetes::convert::PodInfo> {
        let api = self.api.as_ref()?;
        let until = (tokio::time::Instant::now() + POD_WAIT).min(deadline - REPLY_MARGIN);
        loop {
            let pod = api.pod(&req.pod_namespace, &req.pod_name);
            if pod.is_some() || tokio::time::Instant::now() >= until {
                return pod;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the pod of `req` gets an inbound side: in Kubernetes mode only a pod in the mesh
    /// (marked for HBONE, as its peers see it: its own label or annotation, else its namespace's
    /// label), so that no peer sends plaintext to a pod that would refuse it; every pod without
    /// the API.
    fn in_mesh(&self, req: &Request) -> bool {
        let Some(api) = &self.api else {
            return true;
        };
        match api.pod(&req.pod_namespace, &req.pod_name) {
            Some(pod) => crate::hbone::speaks_hbone(&pod.labels),
            None => crate::kubernetes::convert::namespace_ambient(
                api.namespace_labels(&req.pod_namespace).as_ref(),
            ),
        }
    }

    /// Serves a prepared pod's listeners and records it (`persist`: in the state file too).
    fn activate(&self, p: Prepared, persist: bool) {
        use std::os::fd::AsFd;
        let stop = self.serve.shutdown.child_token();
        let copies = std::iter::once(p.ns.as_fd())
            .chain(p.listeners.iter().map(AsFd::as_fd))
            .filter_map(|fd| fd.try_clone_to_owned().ok())
            .collect();
        for l in p.listeners {
            let proxy = Proxy::new(
                p.handle.clone(),
                self.serve.original.clone(),
                self.serve.downstream,
                self.serve.overload.clone(),
            );
            tokio::spawn(Arc::new(proxy).serve(
                p.ns.clone(),
                l,
                stop.clone(),
                self.serve.tracker.clone(),
            ));
        }
        let inbound = p.inbound.and_then(|l| {
            l.serve(&self.kernel, p.handle.clone(), stop.clone(), &self.serve.tracker)
                .inspect_err(|e| tracing::error!(pod = %p.name, error = %e, "the pod's inbound termination could not be attached"))
                .ok()
        });
        tracing::info!(pod = %p.name, container = %p.req.container_id, addresses = ?p.ns.addresses, "pod enrolled");
        let enrolled = Enrolled {
            name: p.name,
            cookie: p.ns.cookie,
            stop,
            req: p.req,
            addresses: p.ns.addresses.clone(),
            since: std::time::Instant::now(),
            persist,
            fds: copies,
            _inbound: inbound,
        };
        self.pods()
            .insert(enrolled.req.container_id.clone(), enrolled);
    }

    /// Re-enrols the pods a previous daemon handed over, on the sockets it used, in one reload.
    async fn take_over(&self, pods: Vec<handover::HandedPod>) -> Result<(), Error> {
        let mut ready = Vec::new();
        for pod in pods {
            let listeners = (pod.listeners.into_iter())
                .map(|fd| {
                    let l = std::net::TcpListener::from(fd);
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                })
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|source| Error::Listen {
                    netns: workload_name(&pod.req),
                    source,
                })?;
            if let Some(p) = self.prepare(&pod.req, pod.netns, Some(listeners))? {
                ready.push((p, pod.persist));
            }
        }
        let n = ready.len();
        self.reload.workloads_changed().await;
        for (p, persist) in ready {
            self.activate(p, persist);
        }
        self.sync_kernel()?;
        self.save();
        tracing::info!(pods = n, "pods taken over on their sockets");
        Ok(())
    }

    /// Every pod with copies of its namespace's and listeners' fds (for a handover).
    fn handover_list(&self) -> std::io::Result<Vec<(Request, bool, Vec<OwnedFd>)>> {
        (self.pods().values())
            .map(|p| {
                let fds = (p.fds.iter())
                    .map(OwnedFd::try_clone)
                    .collect::<std::io::Result<Vec<_>>>()?;
                Ok((p.req.clone(), p.persist, fds))
            })
            .collect()
    }

    /// Stops changing enrolments for a handover: no new exchange is accepted (connects wait in
    /// the socket's queue), the ones in flight finish (bounded by their deadline), no pass
    /// reconciles. The permits are held until [`Enroller::resume`] or the retirement.
    async fn pause(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.paused.send_replace(true);
        let all = self.slots.acquire_many(MAX_EXCHANGES as u32);
        match tokio::time::timeout(EXCHANGE_TIMEOUT * 2, all).await {
            Ok(Ok(permits)) => Some(permits),
            _ => {
                self.paused.send_replace(false);
                None
            }
        }
    }

    /// Whether a handover has paused enrolments.
    fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Releases the pin directory's lock (the new daemon takes it); a copy of the CNI socket's
    /// fd to hand over. This daemon keeps serving until [`Enroller::retire`].
    fn release(&self) -> std::io::Result<OwnedFd> {
        let cni = (self
            .cni_fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref())
        .map(OwnedFd::try_clone)
        .ok_or_else(|| std::io::Error::other("no CNI socket to hand over"))??;
        if let Some(lock) = &self.lock {
            drop(lock.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        Ok(cni)
    }

    /// The new daemon is ready: stop serving (the data path's listeners close, open
    /// connections finish).
    fn retire(&self) {
        self.serve.shutdown.cancel();
    }

    /// The new daemon failed after taking the sockets: take the pin directory back (its lock
    /// went with the failed process), make the kernel's state this daemon's again, serve again.
    async fn resume(&self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let lock = loop {
            match crate::redirect::loader::PinLock::acquire(&self.pin_dir) {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Kernel(format!("taking the pin directory back: {e}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        if let Some(slot) = &self.lock {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(lock);
        }
        self.sync_kernel()?;
        // The failed daemon may have written its own VIPs: a reload writes this one's.
        self.reload.full_reload().await;
        self.save();
        self.paused.send_replace(false);
        Ok(())
    }

    /// Writes the enrolments for the next daemon (atomically; a failure is logged).
    fn save(&self) {
        let Some(path) = &self.state else { return };
        let all: Vec<Request> = (self.pods().values())
            .filter(|p| p.persist)
            .map(|p| p.req.clone())
            .collect();
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&all)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            tracing::warn!(file = %path.display(), error = %e, "cannot save the CNI enrolments; a restart will not restore them");
        }
    }

    /// Un-enrols the pod of container `id` (nothing when it is not enrolled).
    fn del(&self, id: &str) {
        let Some(gone) = self.pods().remove(id) else {
            return;
        };
        gone.stop.cancel();
        self.views.remove(&gone.name);
        if let Err(e) = self.sync_kernel() {
            tracing::error!(pod = %gone.name, error = %e, "un-enrolling the namespace failed");
        }
        tracing::info!(pod = %gone.name, container = %id, cookie = gone.cookie, "pod un-enrolled");
        self.save();
        // Nothing waits for the gone pod's snapshot to go.
        self.reload.workloads_changed_later();
    }

    /// Makes the kernel's enrolled set the fixed namespaces plus the live pods.
    fn sync_kernel(&self) -> Result<(), Error> {
        let mut cookies = self.fixed.clone();
        cookies.extend(self.pods().values().map(|p| p.cookie));
        self.kernel
            .set_enrolled_netns(&cookies)
            .map_err(|e| Error::Kernel(e.to_string()))
    }

    /// The enrolled pods' names, in container-id order.
    pub fn enrolled(&self) -> Vec<String> {
        self.pods().values().map(|p| p.name.clone()).collect()
    }
}

/// `namespace/pod` when the runtime says, else the container id.
fn workload_name(req: &Request) -> String {
    match (req.pod_namespace.as_str(), req.pod_name.as_str()) {
        (_, "") => req.container_id.clone(),
        ("", pod) => format!("default/{pod}"),
        (ns, pod) => format!("{ns}/{pod}"),
    }
}

// === the socket ===

/// Binds the plugin's socket at `path`, owner-only (`0600`; the peer is checked too, see
/// [`check_peer`]). A socket file nobody answers on (a previous daemon's) is replaced; one a
/// live daemon answers on is refused.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    if path.exists() && UnixStream::connect(path).is_ok() {
        return Err(Error::Socket {
            path: path.to_path_buf(),
            reason: "another daemon is listening on it (stop it, or pass another --cni-socket)"
                .into(),
        });
    }
    bind_replacing(path)
}

/// Binds a socket at `path` (owner-only), replacing whatever file is there: after a handover
/// the new daemon's handover socket takes the path from the old one's.
pub fn bind_replacing(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    let err = |reason: String| Error::Socket {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(err(format!("removing the stale socket: {e}")));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("making it owner-only: {e}")))?;
    Ok(listener)
}

/// Serves the plugin until `shutdown`: each connection one exchange, on its own task (at most
/// [`MAX_CONNECTIONS`] open, [`MAX_EXCHANGES`] past their read).
pub async fn serve(
    listener: tokio::net::UnixListener,
    enroller: Arc<Enroller>,
    shutdown: CancellationToken,
) {
    let mut paused = enroller.paused.subscribe();
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Paused by a handover: connects wait in the queue (the new daemon accepts them, or this
        // one once the handover failed).
        while *paused.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = paused.changed() => {}
            }
        }
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = paused.changed() => continue,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(conn) = connections.clone().try_acquire_owned() else {
            // Answered without waiting: the write goes to the socket's buffer or nowhere.
            let _ = stream.try_write(&reply_line(&Err(Error::Busy(MAX_CONNECTIONS))));
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "CNI socket: too many connections open; one refused"
            );
            continue;
        };
        let enroller = enroller.clone();
        tokio::spawn(async move {
            if let Err(e) = exchange(stream, &enroller).await {
                tracing::warn!(error = %e, "CNI request failed");
            }
            drop(conn);
        });
    }
}

/// Reads one request (within [`READ_TIMEOUT`]), has it handled before the plugin's deadline
/// and writes the reply; an ADD whose reply cannot be written is rolled back, so the daemon
/// never keeps an enrolment the plugin reported as failed.
async fn exchange(stream: tokio::net::UnixStream, enroller: &Enroller) -> Result<(), Error> {
    let accepted = tokio::time::Instant::now();
    if let Err(e) = check_peer(&stream) {
        let line = reply_line(&Err(e));
        let _ = stream.try_write(&line);
        return Err(Error::Read(
            String::from_utf8_lossy(&line).trim().to_string(),
        ));
    }
    let read = tokio::time::timeout(READ_TIMEOUT, read_message_async(&stream)).await;
    let (line, fds) = read.map_err(|_| {
        Error::Read(format!(
            "no complete request within {}s",
            READ_TIMEOUT.as_secs()
        ))
    })??;
    let fd = fds.into_iter().next();
    let req = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => req,
        Err(e) => {
            let e = Err(Error::Malformed(e.to_string()));
            write_reply(&stream, &e, accepted + EXCHANGE_TIMEOUT).await;
            return e;
        }
    };
    tracing::debug!(?req, "CNI request");
    let deadline = answer_by(&req, accepted);
    let slot = tokio::time::timeout_at(deadline, enroller.slots.acquire()).await;
    let Ok(Ok(_slot)) = slot else {
        let e = Err(Error::Busy(MAX_EXCHANGES));
        write_reply(&stream, &e, deadline + REPLY_MARGIN).await;
        return e;
    };
    match enroller.exclusive(&req.container_id, deadline).await {
        Ok(_one) => {
            let outcome = enroller.handle(req.clone(), fd, deadline).await;
            let sent = write_reply(&stream, &outcome, deadline + REPLY_MARGIN).await;
            if outcome.is_ok() && req.command == Command::Add && !sent {
                tracing::warn!(container = %req.container_id, "the plugin gave up before the reply; enrolment rolled back");
                enroller.del(&req.container_id);
            }
            outcome
        }
        Err(e) => {
            let e = Err(e);
            write_reply(&stream, &e, deadline + REPLY_MARGIN).await;
            e
        }
    }
}

/// When the answer must be ready: the plugin's deadline less [`REPLY_MARGIN`], and never later
/// than [`EXCHANGE_TIMEOUT`] after accept.
fn answer_by(req: &Request, accepted: tokio::time::Instant) -> tokio::time::Instant {
    let latest = accepted + EXCHANGE_TIMEOUT - REPLY_MARGIN;
    let Some(deadline) = req.deadline_ms else {
        return latest;
    };
    let left = Duration::from_millis(deadline.saturating_sub(monotonic_ms()));
    (tokio::time::Instant::now() + left)
        .checked_sub(REPLY_MARGIN)
        .unwrap_or(accepted)
        .min(latest)
}

/// Milliseconds of `CLOCK_MONOTONIC`: one clock for the plugin and the daemon of a node.
pub fn monotonic_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1000 + (t.tv_nsec() as u64) / 1_000_000)
        .unwrap_or(0)
}

/// The reply to `outcome`, as one line.
fn reply_line(outcome: &Result<(), Error>) -> Vec<u8> {
    let reply = match outcome {
        Ok(()) => Reply {
            ok: true,
            error: None,
        },
        Err(e) => Reply {
            ok: false,
            error: Some(e.to_string()),
        },
    };
    let mut line = serde_json::to_vec(&reply).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Writes the reply to `outcome` before `until`; whether it was written whole.
async fn write_reply(
    stream: &tokio::net::UnixStream,
    outcome: &Result<(), Error>,
    until: tokio::time::Instant,
) -> bool {
    let line = reply_line(outcome);
    let write = async {
        let mut at = 0;
        while at < line.len() {
            stream.writable().await?;
            match stream.try_write(&line[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok::<_, std::io::Error>(())
    };
    matches!(tokio::time::timeout_at(until, write).await, Ok(Ok(())))
}

/// Only root, or the daemon's own user, may talk to the daemon's sockets (`SO_PEERCRED`).
pub fn check_peer(stream: &tokio::net::UnixStream) -> Result<(), Error> {
    let cred = stream.peer_cred().map_err(|e| Error::Read(e.to_string()))?;
    let own = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == own {
        return Ok(());
    }
    Err(Error::Peer(format!(
        "uid {} (pid {}): not root",
        cred.uid(),
        cred.pid().map_or_else(|| "?".into(), |p| p.to_string())
    )))
}

/// Reads one message like [`read_message`], without blocking a thread.
async fn read_message_async(
    stream: &tokio::net::UnixStream,
) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    while !buf.ends_with(b"\n") {
        if buf.len() > MAX_REQUEST {
            return Err(Error::Read(format!("message over {MAX_REQUEST} bytes")));
        }
        let (n, more) = stream
            .async_io(tokio::io::Interest::READABLE, || {
                let mut chunk = [0u8; 4096];
                let (n, fds) = recv_once(stream.as_raw_fd(), &mut chunk)?;
                buf.extend_from_slice(&chunk[..n]);
                Ok((n, fds))
            })
            .await
            .map_err(|e| Error::Read(e.to_string()))?;
        fds.extend(more);
        if n == 0 {
            return Err(Error::Read("the peer closed before a full message".into()));
        }
    }
    buf.pop();
    Ok((buf, fds))
}

/// One `recvmsg` into `buf`: the bytes read and the descriptors that came with them.
fn recv_once(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for raw in raw {
                // SAFETY: the kernel just installed `raw` in this process for us; nothing
                // else owns it.
                #[expect(unsafe_code, reason = "SCM_RIGHTS yields raw descriptors")]
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

/// The most descriptors one message carries (a pod's namespace and its listeners).
const MAX_FDS: usize = 4;

/// Reads one newline-terminated message and the descriptors attached to it. Senders never send
/// a message before the previous one was answered, so a read never takes the next one's bytes.
pub fn read_message(stream: &mut UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; 8192];
    let (n, fds) =
        recv_once(stream.as_raw_fd(), &mut buf).map_err(|e| Error::Read(e.to_string()))?;
    buf.truncate(n);
    if n == 0 {
        return Err(Error::Read("the peer closed before a full message".into()));
    }
    while !buf.ends_with(b"\n") {
        if buf.len() > MAX_REQUEST {
            return Err(Error::Read(format!("message over {MAX_REQUEST} bytes")));
        }
        let mut more = [0u8; 4096];
        let n = stream
            .read(&mut more)
            .map_err(|e| Error::Read(e.to_string()))?;
        if n == 0 {
            return Err(Error::Read("the peer closed before a full message".into()));
        }
        buf.extend_from_slice(&more[..n]);
    }
    buf.pop();
    Ok((buf, fds))
}

/// Sends `value` as one JSON line with `fds` attached.
pub fn send_message(
    stream: &mut UnixStream,
    value: &impl Serialize,
    fds: &[RawFd],
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    stream.write_all(&line[sent..])
}

/// Sends one request (with `fd` attached) over `stream` and reads the reply (the plugin side).
pub fn request(
    stream: &mut UnixStream,
    req: &Request,
    fd: Option<&OwnedFd>,
) -> std::io::Result<Reply> {
    let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    // A daemon that refuses the peer answers before reading: its reply may be waiting even
    // when the request could not be sent.
    let sent = send_message(stream, req, &raw);
    let (reply, _) = match read_message(stream) {
        Ok(r) => r,
        Err(e) => return Err(sent.err().unwrap_or_else(|| std::io::Error::other(e))),
    };
    serde_json::from_slice(&reply).map_err(|e| {
        std::io::Error::other(format!(
            "unreadable reply {:?}: {e}",
            String::from_utf8_lossy(&reply)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = std::env::temp_dir().join(format!("drover-cni-sock-{}", std::process::id()));
        let path = dir.join("sub/cni.sock");
        let first = bind(&path).expect("created with its directory");
        // Another daemon listening: refused, and its socket left alone.
        let e = bind(&path).unwrap_err().to_string();
        assert!(e.contains("another daemon is listening"), "{e}");
        assert!(UnixStream::connect(&path).is_ok());
        // A socket file nobody answers on (a daemon that died): replaced.
        drop(first);
        assert!(path.exists());
        let _second = bind(&path).expect("stale socket replaced");
        assert!(UnixStream::connect(&path).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn workload_names_follow_kubernetes() {
        let req = |ns: &str, pod: &str| Request {
            pod_namespace: ns.into(),
            pod_name: pod.into(),
            ..Request::new(Command::Add, "c0ffee")
        };
        assert_eq!(workload_name(&req("shop", "web-1")), "shop/web-1");
        assert_eq!(workload_name(&req("", "web-1")), "default/web-1");
        assert_eq!(workload_name(&req("shop", "")), "c0ffee");
    }
}
