//! Hot reload: watches the configuration paths and swaps in a new registry snapshot when a valid
//! change lands.
//!
//! Invariants: a snapshot is replaced only by a fully validated one (an invalid change is logged
//! with every located problem and the previous snapshot keeps serving); open connections keep the
//! snapshot they were routed with; bursts of file events are coalesced into one rebuild.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, source::ConfigSet},
    redirect::Kernel,
    registry::{Client, Registry, RegistryHandle},
};

/// How long the watcher waits for more events before rebuilding.
pub const SETTLE: Duration = Duration::from_millis(20);

/// Errors setting up the watch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// What a reload needs.
pub struct Reloader {
    pub paths: Vec<PathBuf>,
    pub client: Client,
    pub credentials: crate::tls::Credentials,
    pub registry: RegistryHandle,
    pub kernel: Option<Arc<Kernel>>,
}

/// Loads and validates `paths` into a snapshot for `client`, with every TLS file read.
pub fn load(
    paths: &[PathBuf],
    client: &Client,
    credentials: &crate::tls::Credentials,
) -> Result<Registry, config::Error> {
    let set = ConfigSet::load(paths)?;
    let mut registry =
        Registry::build(&set, client).map_err(|r| config::Error::Invalid(r.errors))?;
    registry
        .originate(credentials)
        .map_err(config::Error::Invalid)?;
    Ok(registry)
}

// === impl Reloader ===

impl Reloader {
    /// Starts watching; rebuilds run on the returned task until `shutdown`.
    pub fn spawn(self, shutdown: CancellationToken) -> Result<tokio::task::JoinHandle<()>, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let filter: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
        let seen = filter.clone();
        let watcher =
            notify::recommended_watcher(move |ev: notify::Result<notify::Event>| match ev {
                Ok(ev) => {
                    let wanted = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if ev.paths.iter().any(|p| concerns(&wanted, p)) {
                        let _ = tx.send(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "config watch error"),
            })
            .map_err(|source| Error::Watch {
                path: PathBuf::new(),
                source,
            })?;
        let mut watch = Watch {
            watcher,
            filter,
            dirs: HashSet::new(),
        };
        for p in &self.paths {
            watch.add(p)?;
        }
        // Certificate files: a rotation is a reload (new handshakes use the new files).
        for p in self.registry.load().tls_files() {
            watch.add(&p)?;
        }
        Ok(tokio::spawn(self.run(watch, rx, shutdown)))
    }

    async fn run(
        self,
        mut watch: Watch,
        mut rx: mpsc::UnboundedReceiver<()>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = rx.recv() => if ev.is_none() { return },
            }
            let first = Instant::now();
            // Coalesce the burst a single save produces.
            while let Ok(Some(())) = tokio::time::timeout(SETTLE, rx.recv()).await {}
            self.reload(first).await;
            for p in self.registry.load().tls_files() {
                if let Err(e) = watch.add(&p) {
                    tracing::warn!(error = %e, "cannot watch a certificate file; rotation of it needs a config change");
                }
            }
        }
    }

    /// Rebuilds and swaps the snapshot, or keeps the current one and logs why.
    pub async fn reload(&self, since: Instant) {
        let paths = self.paths.clone();
        let client = self.client.clone();
        let credentials = self.credentials.clone();
        let built = tokio::task::spawn_blocking(move || load(&paths, &client, &credentials)).await;
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

/// Whether a changed path is (or is inside) one of the configured paths.
/// The file watcher, what it reports and the directories it watches.
struct Watch {
    watcher: notify::RecommendedWatcher,
    filter: Arc<Mutex<Vec<PathBuf>>>,
    dirs: HashSet<PathBuf>,
}

impl Watch {
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

fn concerns(wanted: &[PathBuf], changed: &Path) -> bool {
    wanted.iter().any(|w| changed.starts_with(w))
}
