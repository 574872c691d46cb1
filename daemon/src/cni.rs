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
//! Invariants: the daemon's own namespace (a `hostNetwork` pod) is never enrolled; an ADD for a
//! container already enrolled answers OK without a second enrolment; the enrolled set in the
//! kernel is always the start-time namespaces plus the live CNI pods; a reply is sent only once
//! the enrolment is complete or has failed (and a failed one leaves nothing behind).

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
/// How long either side waits for the other (Istio's CNI plugin waits 5 s for its agent too).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request the daemon reads.
const MAX_REQUEST: usize = 64 << 10;

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
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
}

/// What serving an enrolled pod's listeners needs (the data path's parts).
#[derive(Clone)]
pub struct Serve {
    pub original: Arc<dyn OriginalDst>,
    pub downstream: proxy::downstream::Timeouts,
    pub overload: Arc<proxy::downstream::Overload>,
    pub shutdown: CancellationToken,
    pub tracker: tokio_util::task::TaskTracker,
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
}

/// One enrolled pod.
struct Enrolled {
    /// The workload's name (`namespace/pod`, or the container id).
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
}

/// A pod's namespace opened and its listeners bound, not serving yet.
struct Prepared {
    req: Request,
    name: String,
    ns: Arc<NetNs>,
    listeners: Vec<tokio::net::TcpListener>,
    handle: crate::registry::RegistryHandle,
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
        match handed {
            Some(pods) => self.take_over(pods).await?,
            None => self.restore().await?,
        }
        let handover = bind(&handover::path(path))?;
        let shutdown = self.serve.shutdown.clone();
        tracing::info!(socket = %path.display(), "enrolling pods through drover-cni");
        let me = Arc::new(self);
        tokio::spawn(handover::serve(handover, me.clone()));
        if let Some(r) = reconcile {
            me.reconcile(&r).await?;
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

    /// Answers one request (`fd`: the namespace, for ADD).
    pub async fn handle(&self, req: Request, fd: Option<OwnedFd>) -> Result<(), Error> {
        match req.command {
            Command::Add => {
                let fd = fd.ok_or_else(|| Error::NoNamespace(req.container_id.clone()))?;
                self.add(&req, fd).await
            }
            Command::Del => {
                // A pod reconciliation enrolled is known by its name, not its container.
                let name = workload_name(&req);
                let id = match self.pods().contains_key(&req.container_id) {
                    true => Some(req.container_id.clone()),
                    false => (self.pods().iter())
                        .find(|(_, p)| p.name == name)
                        .map(|(id, _)| id.clone()),
                };
                if let Some(id) = id {
                    self.del(&id);
                }
                Ok(())
            }
            Command::Check if self.pods().contains_key(&req.container_id) => Ok(()),
            Command::Check => Err(Error::NotEnrolled(req.container_id)),
        }
    }

    /// Enrols the pod of `req` whose namespace is `fd`.
    async fn add(&self, req: &Request, fd: OwnedFd) -> Result<(), Error> {
        if self.pods().contains_key(&req.container_id) {
            return Ok(());
        }
        let Some(prepared) = self.prepare(req, fd, None)? else {
            return Ok(());
        };
        // Its own snapshot (identity) before its first connect is captured.
        self.reload.workloads_changed().await;
        self.activate(prepared, true);
        if let Err(e) = self.sync_kernel() {
            self.del(&req.container_id);
            return Err(e);
        }
        self.save();
        Ok(())
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
        let handle = self.views.add(Workload {
            netns: name.clone(),
            addresses: ns.addresses.clone(),
            entry: None,
        });
        Ok(Some(Prepared {
            req: req.clone(),
            name,
            ns,
            listeners,
            handle,
        }))
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

    /// Stops serving (the data path's listeners close, open connections finish) and releases
    /// the pin directory's lock; the CNI socket's fd for the new daemon.
    fn retire(&self) -> std::io::Result<OwnedFd> {
        let cni = (self.cni_fd.lock().unwrap_or_else(|e| e.into_inner()).take())
            .ok_or_else(|| std::io::Error::other("no CNI socket to hand over"))?;
        self.serve.shutdown.cancel();
        if let Some(lock) = &self.lock {
            drop(lock.lock().unwrap_or_else(|e| e.into_inner()).take());
        }
        Ok(cni)
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

/// Binds the plugin's socket at `path`. A socket file nobody answers on (a previous daemon's)
/// is replaced; one a live daemon answers on is refused.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, Error> {
    let err = |reason: String| Error::Socket {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(err(
                "another daemon is listening on it (stop it, or pass another --cni-socket)".into(),
            ));
        }
        std::fs::remove_file(path).map_err(|e| err(format!("removing the stale socket: {e}")))?;
    }
    tokio::net::UnixListener::bind(path).map_err(|e| err(e.to_string()))
}

/// Serves the plugin until `shutdown`: one blocking exchange per connection.
pub async fn serve(
    listener: tokio::net::UnixListener,
    enroller: Arc<Enroller>,
    shutdown: CancellationToken,
) {
    let rt = tokio::runtime::Handle::current();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (enroller, rt) = (enroller.clone(), rt.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = exchange(stream, &enroller, &rt) {
                tracing::warn!(error = %e, "CNI request failed");
            }
        });
    }
}

/// Reads one request, has it handled and writes the reply.
fn exchange(
    stream: tokio::net::UnixStream,
    enroller: &Enroller,
    rt: &tokio::runtime::Handle,
) -> Result<(), Error> {
    let mut stream = stream.into_std().map_err(|e| Error::Read(e.to_string()))?;
    let io = |e: std::io::Error| Error::Read(e.to_string());
    stream.set_nonblocking(false).map_err(io)?;
    stream
        .set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(EXCHANGE_TIMEOUT))
        .map_err(io)?;
    let (line, fds) = read_message(&mut stream)?;
    let fd = fds.into_iter().next();
    let outcome = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => {
            tracing::debug!(?req, "CNI request");
            rt.block_on(enroller.handle(req, fd))
        }
        Err(e) => Err(Error::Malformed(e.to_string())),
    };
    let reply = match &outcome {
        Ok(()) => Reply {
            ok: true,
            error: None,
        },
        Err(e) => Reply {
            ok: false,
            error: Some(e.to_string()),
        },
    };
    send_message(&mut stream, &reply, &[]).map_err(io)?;
    outcome
}

/// The most descriptors one message carries (a pod's namespace and its listeners).
const MAX_FDS: usize = 4;

/// Reads one newline-terminated message and the descriptors attached to it. Senders never send
/// a message before the previous one was answered, so a read never takes the next one's bytes.
pub fn read_message(stream: &mut UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
    let mut buf = vec![0u8; 8192];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| Error::Read(e.to_string()))?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(|e| Error::Read(e.to_string()))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for raw in raw {
                    // SAFETY: the kernel just installed `raw` in this process for us; nothing
                    // else owns it.
                    #[expect(unsafe_code, reason = "SCM_RIGHTS yields raw descriptors")]
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(n);
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
    send_message(stream, req, &raw)?;
    let (reply, _) = read_message(stream).map_err(std::io::Error::other)?;
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
            command: Command::Add,
            container_id: "c0ffee".into(),
            pod_namespace: ns.into(),
            pod_name: pod.into(),
            ips: Vec::new(),
            netns: String::new(),
        };
        assert_eq!(workload_name(&req("shop", "web-1")), "shop/web-1");
        assert_eq!(workload_name(&req("", "web-1")), "default/web-1");
        assert_eq!(workload_name(&req("shop", "")), "c0ffee");
    }
}
