//! Hot reload: watches the configuration paths (and SIGHUP, through [`Trigger`]) and swaps in a new
//! registry snapshot when a valid change lands.
//!
//! Invariants: a snapshot is replaced only by a fully validated one (an invalid change is logged
//! with every located problem and the previous snapshot keeps serving); open connections keep the
//! snapshot they were routed with; one change is one rebuild: bursts of file events are coalesced,
//! the daemon's own reads of the files (inotify `OPEN`/`CLOSE_NOWRITE`) are not changes, and a file
//! that was written to is read only once its writer closed it (bounded by [`WRITER_WAIT`]), so a
//! writer that truncates and then writes is never seen half-way; a configuration with no service
//! at all never replaces one that had services unless `allow_empty` says so.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, source::ConfigSet},
    kubernetes::Feed,
    redirect::Kernel,
    registry::{Client, Registry, RegistryHandle},
};

/// How long the watcher waits for more events before rebuilding.
pub const SETTLE: Duration = Duration::from_millis(20);
/// How long a reload waits for a file that was written to be closed by its writer.
pub const WRITER_WAIT: Duration = Duration::from_secs(2);

/// Errors setting up the watch, or a configuration refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error(
        "{paths}: the configuration defines no service, so nothing would be captured (pass \
         --allow-empty to accept that)"
    )]
    Empty { paths: String },
    #[error(transparent)]
    Config(#[from] config::Error),
}

/// What a reload needs.
pub struct Reloader {
    pub paths: Vec<PathBuf>,
    pub client: Client,
    pub credentials: crate::tls::Credentials,
    pub registry: RegistryHandle,
    pub kernel: Option<Arc<Kernel>>,
    /// Accept a configuration without services (otherwise refused: see the module doc).
    pub allow_empty: bool,
    /// The Kubernetes API's objects (Kubernetes mode): each change of them is a reload.
    pub api: Option<Feed>,
}

/// Asks the running reloader for a reload (SIGHUP).
#[derive(Clone)]
pub struct Trigger(mpsc::UnboundedSender<Signal>);

/// What the reloader's task hears.
enum Signal {
    /// A file event about a configured path: `writing` when its content changed (a writer may
    /// still hold it open), `closed` when a writer closed it.
    File {
        path: PathBuf,
        writing: bool,
        closed: bool,
    },
    /// An explicit request (SIGHUP).
    Reload,
    /// The Kubernetes API's objects changed.
    Api,
}

/// Loads and validates `paths` (and, with `api`, the objects of the Kubernetes API) into a
/// snapshot for `client`, with every TLS file read; refuses a configuration without services
/// unless `allow_empty` (or `api`: an empty cluster is a state, not a truncated file).
pub fn load(
    paths: &[PathBuf],
    api: Option<&Feed>,
    client: &Client,
    credentials: &crate::tls::Credentials,
    allow_empty: bool,
) -> Result<Registry, Error> {
    let files = ConfigSet::load(paths)?;
    let mut registry = match api {
        Some(feed) => build_with_api(files, feed, client)?,
        None => Registry::build(&files, client).map_err(|r| config::Error::Invalid(r.errors))?,
    };
    if registry.services().is_empty() && !allow_empty && api.is_none() {
        return Err(Error::Empty {
            paths: paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    registry
        .originate(credentials)
        .map_err(config::Error::Invalid)?;
    Ok(registry)
}

/// The snapshot of the files and the API objects. API objects with problems are rejected alone
/// (their last valid version, if any, takes their place) and the build is retried; problems in
/// files refuse the whole configuration, as without the API.
fn build_with_api(files: ConfigSet, feed: &Feed, client: &Client) -> Result<Registry, Error> {
    // Objects served in their last valid version, and objects left out (whose last valid
    // version does not fit either); each round moves at least one object, or ends.
    let mut rejected = HashSet::new();
    let mut dropped = HashSet::new();
    let mut problems = Vec::new();
    for _ in 0..MAX_REJECTION_ROUNDS {
        let mut set = files.clone();
        problems.extend(feed.extend(&mut set, &mut rejected, &dropped));
        let errors = match Registry::build(&set, client) {
            Ok(registry) => {
                feed.accepted(&rejected, &problems);
                return Ok(registry);
            }
            Err(r) => r.errors,
        };
        let (api, local): (Vec<_>, Vec<_>) = errors
            .into_iter()
            .partition(|p| feed.object_of(p).is_some());
        if !local.is_empty() {
            return Err(config::Error::Invalid(local).into());
        }
        for id in api.iter().filter_map(|p| feed.object_of(p)) {
            if !rejected.insert(id.clone()) {
                dropped.insert(id);
            }
        }
        problems.extend(api);
    }
    Err(config::Error::Invalid(problems).into())
}

/// Builds a reload may take to set invalid API objects aside before it gives up.
const MAX_REJECTION_ROUNDS: usize = 5;

// === impl Trigger ===

impl Trigger {
    /// Requests a reload; false when the reloader is gone.
    pub fn reload(&self) -> bool {
        self.0.send(Signal::Reload).is_ok()
    }
}

// === impl Reloader ===

impl Reloader {
    /// Starts the reloader: with `watch`, file changes reload; the returned trigger always does.
    pub fn spawn(self, watch: bool, shutdown: CancellationToken) -> Result<Trigger, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let trigger = Trigger(tx.clone());
        let watcher = if watch {
            let mut w = Watch::new(tx.clone())?;
            for p in &self.paths {
                w.add(p)?;
            }
            // Certificate files: a rotation is a reload (new handshakes use the new files).
            for p in self.registry.load().tls_files() {
                w.add(&p)?;
            }
            Some(w)
        } else {
            None
        };
        if let Some(feed) = self.api.clone() {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = feed.changed() => if tx.send(Signal::Api).is_err() { return },
                    }
                }
            });
        }
        tokio::spawn(self.run(watcher, rx, shutdown));
        Ok(trigger)
    }

    async fn run(
        self,
        mut watch: Option<Watch>,
        mut rx: mpsc::UnboundedReceiver<Signal>,
        shutdown: CancellationToken,
    ) {
        let mut writing = HashSet::new();
        loop {
            let signal = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = rx.recv() => match s { Some(s) => s, None => return },
            };
            let first = Instant::now();
            let explicit = matches!(signal, Signal::Reload);
            note(&mut writing, signal);
            // Coalesce the burst a single save produces, and wait (bounded) for writers to close.
            loop {
                let wait = if writing.is_empty() {
                    SETTLE
                } else {
                    WRITER_WAIT.saturating_sub(first.elapsed()).max(SETTLE)
                };
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(s)) => note(&mut writing, s),
                    Ok(None) => return,
                    Err(_) => break,
                }
                // A directory that never goes quiet still gets its reload.
                if first.elapsed() >= WRITER_WAIT {
                    break;
                }
            }
            if !writing.is_empty() {
                tracing::warn!(files = ?writing, waited = ?WRITER_WAIT, "a config file is still open for writing; reading it anyway");
                writing.clear();
            }
            if explicit {
                tracing::info!("SIGHUP: reloading the configuration");
            }
            self.reload(first).await;
            if let Some(w) = &mut watch {
                for p in self.registry.load().tls_files() {
                    if let Err(e) = w.add(&p) {
                        tracing::warn!(error = %e, "cannot watch a certificate file; rotation of it needs a config change");
                    }
                }
            }
        }
    }

    /// Rebuilds and swaps the snapshot, or keeps the current one and logs why.
    pub async fn reload(&self, since: Instant) {
        let paths = self.paths.clone();
        let api = self.api.clone();
        let client = self.client.clone();
        let credentials = self.credentials.clone();
        let allow_empty = self.allow_empty;
        let built = tokio::task::spawn_blocking(move || {
            load(&paths, api.as_ref(), &client, &credentials, allow_empty)
        })
        .await;
        match built {
            Ok(Ok(mut registry)) => {
                registry.inherit(&self.registry.load());
                for w in registry.warnings() {
                    tracing::warn!("{w}");
                }
                let vips: Vec<_> = registry.vips().map(|(a, id)| (a, id as u32)).collect();
                let services = registry.services().len();
                self.registry.store(registry);
                if let Some(kernel) = &self.kernel
                    && let Err(e) = kernel.set_vips(&vips)
                {
                    tracing::error!(error = %e, "updating captured addresses failed; capture keeps the previous set");
                }
                tracing::info!(
                    services,
                    vips = vips.len(),
                    elapsed_ms = since.elapsed().as_secs_f64() * 1000.0,
                    "configuration reloaded"
                );
                // The parse and the previous snapshot's unshared parts are garbage now.
                let _ = tokio::task::spawn_blocking(crate::memory::trim).await;
            }
            Ok(Err(e)) => {
                for line in e.to_string().lines() {
                    tracing::error!("{line}");
                }
                tracing::error!("configuration rejected; the previous configuration keeps serving");
            }
            Err(e) => tracing::error!(error = %e, "configuration reload task failed"),
        }
    }
}

/// Tracks which files a writer has changed and not yet closed.
fn note(writing: &mut HashSet<PathBuf>, signal: Signal) {
    if let Signal::File {
        path,
        writing: w,
        closed,
    } = signal
    {
        if closed {
            writing.remove(&path);
        } else if w {
            writing.insert(path);
        }
    }
}

/// The file watcher, what it reports and the directories it watches.
struct Watch {
    watcher: notify::RecommendedWatcher,
    filter: Arc<Mutex<Vec<PathBuf>>>,
    dirs: HashSet<PathBuf>,
}

impl Watch {
    /// A watcher that sends the events about watched paths to `tx`; reads (`OPEN`,
    /// `CLOSE_NOWRITE`) are not reported, so the reload's own reading cannot trigger a reload.
    fn new(tx: mpsc::UnboundedSender<Signal>) -> Result<Self, Error> {
        let filter: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
        let seen = filter.clone();
        let watcher =
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
                Ok(ev) => {
                    let (writing, closed) = match ev.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => (false, true),
                        EventKind::Access(_) => return,
                        EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => (true, false),
                        _ => (false, false),
                    };
                    let wanted = seen.lock().unwrap_or_else(|e| e.into_inner());
                    for path in ev.paths.iter().filter(|p| concerns(&wanted, p)) {
                        // Only files that are read count as being written: an editor's swap
                        // file stays open for the whole session and must not hold reloads back.
                        let read = wanted.iter().any(|w| w == path)
                            || path.extension().is_some_and(|e| e == "yaml" || e == "yml");
                        let _ = tx.send(Signal::File {
                            path: path.clone(),
                            writing: writing && read,
                            closed,
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "config watch error"),
            })
            .map_err(|source| Error::Watch {
                path: PathBuf::new(),
                source,
            })?;
        Ok(Self {
            watcher,
            filter,
            dirs: HashSet::new(),
        })
    }

    /// Reports changes of `p` (a file, through its directory: editors and ConfigMap mounts
    /// replace files by renaming, which a watch on the file itself would lose; or a directory).
    fn add(&mut self, p: &Path) -> Result<(), Error> {
        let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let mut filter = self.filter.lock().unwrap_or_else(|e| e.into_inner());
        if filter.contains(&p) {
            return Ok(());
        }
        let (target, mode) = if p.is_dir() {
            (p.clone(), RecursiveMode::Recursive)
        } else {
            let parent = p.parent().unwrap_or(Path::new("/")).to_path_buf();
            (parent, RecursiveMode::NonRecursive)
        };
        if self.dirs.insert(target.clone()) {
            self.watcher
                .watch(&target, mode)
                .map_err(|source| Error::Watch {
                    path: target.clone(),
                    source,
                })?;
        }
        filter.push(p);
        Ok(())
    }
}

/// Whether a changed path is (or is inside) one of the configured paths.
fn concerns(wanted: &[PathBuf], changed: &Path) -> bool {
    wanted.iter().any(|w| changed.starts_with(w))
}
