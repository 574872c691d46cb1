//! Hot reload: watches the configuration paths (and SIGHUP, through [`Trigger`]) and swaps in a new
//! registry snapshot when a valid change lands.
//!
//! Invariants: a snapshot is replaced only by a fully validated one (an invalid change is logged
//! with every located problem and the previous snapshot keeps serving); open connections keep the
//! snapshot they were routed with; a change of the API's endpoint sets or a DestinationRule edit
//! patches the snapshots (only the services it names are rebuilt, see [`Registry::patch`]) and a workload joining with
//! an identity class already served takes that class's snapshot, both equal to what a rebuild
//! would give; any other change is one rebuild: bursts of file events are coalesced,
//! the daemon's own reads of the files (inotify `OPEN`/`CLOSE_NOWRITE`) are not changes, and a file
//! that was written to is read only once its writer closed it (bounded by [`WRITER_WAIT`]), so a
//! writer that truncates and then writes is never seen half-way; a configuration with no service
//! at all never replaces one that had services unless `allow_empty` says so.

use std::{
    collections::{HashMap, HashSet},
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
    registry::{
        Client, Registry, RegistryHandle,
        relevance::{Class, Relevance},
    },
    workload::{Source, Views, Workload},
};

/// How long the watcher waits for more events before rebuilding.
pub const SETTLE: Duration = Duration::from_millis(20);
/// How long the API's events are coalesced at most (a cluster's churn never goes quiet).
pub const API_SETTLE: Duration = Duration::from_millis(50);
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
    pub sources: Sources,
    pub views: Views,
    pub kernel: Option<Arc<Kernel>>,
    /// The kernel fast path's publisher (with eBPF capture).
    pub fast: Option<Arc<crate::fastpath::run::FastPath>>,
    /// What the last reload learnt of the workloads (see [`Known`]).
    pub known: Mutex<Known>,
}

/// What a reload learnt of the workloads, for the next one.
#[derive(Default)]
pub struct Known {
    /// Where each workload's identity came from, by network namespace (changes are logged).
    pub identities: HashMap<String, Source>,
    /// How the configuration sorts identities into snapshots; `None` before the first load.
    classes: Option<Classes>,
}

/// How a loaded configuration sorts identities into snapshots: a workload that joins with the
/// class of a served snapshot is served by it, with no build.
struct Classes {
    set: Arc<ConfigSet>,
    /// What the configuration reads of identities: computed by the load when it had workloads
    /// to sort, else by the first join.
    relevance: Option<Relevance>,
    /// Each class served by a snapshot of its own, with a workload (network namespace) that
    /// snapshot serves.
    served: HashMap<ClassKey, String>,
    /// The class of each workload served by its class's snapshot, by network namespace.
    class_of: HashMap<String, ClassKey>,
}

/// A workload's class and, with a mesh CA, its service account (its own certificate).
type ClassKey = (Class, Option<(String, String)>);

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
    /// The enrolled workloads changed; the sender hears when a reload has covered the change.
    Workloads(tokio::sync::oneshot::Sender<()>),
    /// A full reload is wanted (the kernel's tables rewritten); the sender hears when it is done.
    Full(tokio::sync::oneshot::Sender<()>),
}

/// What to load: the configuration paths, the API's objects (Kubernetes mode), the daemon's
/// client and its enrolled workloads, where secrets are, and whether no service is acceptable.
#[derive(Clone)]
pub struct Sources {
    pub paths: Vec<PathBuf>,
    pub api: Option<Feed>,
    pub client: Client,
    pub workloads: Vec<Workload>,
    pub credentials: crate::tls::Credentials,
    /// Issues each workload's own mesh identity (with `--mesh-ca`).
    pub issuer: Option<Arc<crate::mesh::Issuer>>,
    /// Accept a configuration without services (otherwise refused: see the module doc).
    pub allow_empty: bool,
    /// Resolves the DNS ServiceEntries (their endpoints are the current answers).
    pub dns: Option<crate::dns::Dns>,
}

/// A loaded configuration: the primary snapshot and one per class of workload identities the
/// configuration tells apart.
pub struct Snapshots {
    pub primary: Registry,
    /// Snapshots of the identities that differ from the primary one.
    extra: Vec<Registry>,
    /// For each workload (in [`Sources::workloads`] order): its network namespace, its snapshot
    /// in `extra` (`None`: the primary one) and where its identity came from.
    assignment: Vec<(String, Option<usize>, Source)>,
    classes: Classes,
}

/// A validated configuration's primary snapshot, before the workloads' snapshots (which share
/// its configuration).
pub struct Loaded {
    pub primary: Registry,
}

/// Loads and validates the configuration of `sources` into snapshots (see [`load_config`] and
/// [`Loaded::resolve`]).
pub fn load(sources: &Sources) -> Result<Snapshots, Error> {
    Ok(load_config(sources)?.resolve(sources))
}

/// Loads and validates the configuration of `sources` into the primary snapshot, with every TLS
/// file read; refuses a configuration without services unless `allow_empty` (or Kubernetes mode:
/// an empty cluster is a state, not a truncated file).
pub fn load_config(sources: &Sources) -> Result<Loaded, Error> {
    let Sources {
        paths,
        api,
        client,
        credentials,
        dns,
        ..
    } = sources;
    let mut files = ConfigSet::load(paths)?;
    if let Some(dns) = dns {
        dns.expand(&mut files);
    }
    let mut primary = match api {
        Some(feed) => build_with_api(files, feed, client)?,
        None => Registry::build_shared(Arc::new(files), client)
            .map_err(|r| config::Error::Invalid(r.errors))?,
    };
    if primary.services().is_empty() && !sources.allow_empty && api.is_none() {
        return Err(Error::Empty {
            paths: paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    primary
        .originate(credentials)
        .map_err(config::Error::Invalid)?;
    Ok(Loaded { primary })
}

/// The snapshot of the files at `paths` and the API's objects for `client` (TLS files are not
/// read).
pub fn snapshot(paths: &[PathBuf], api: Option<&Feed>, client: &Client) -> Result<Registry, Error> {
    let files = ConfigSet::load(paths)?;
    match api {
        Some(feed) => build_with_api(files, feed, client),
        None => Ok(Registry::build_shared(Arc::new(files), client)
            .map_err(|r| config::Error::Invalid(r.errors))?),
    }
}

// === impl Loaded ===

impl Loaded {
    /// The snapshots of `sources.workloads`: one per class of identities the configuration
    /// tells apart from the primary one and from each other ([`Relevance`]; a workload whose
    /// identity the configuration cannot serve gets the primary one, and an error line).
    pub fn resolve(self, sources: &Sources) -> Snapshots {
        let Loaded { primary } = self;
        crate::telemetry::set_source("", crate::telemetry::client_source(&primary));
        let set = primary.shared_config();
        let client = &sources.client;
        // Read once per load, and only when there are workloads to sort into classes.
        let relevance = (!sources.workloads.is_empty()).then(|| Relevance::of(&set));
        let primary_class = relevance.as_ref().map(|r| (r.class(&set, client), None));
        // Distinct (class, service account) pairs with their snapshot in `extra`.
        let mut seen: HashMap<ClassKey, usize> = HashMap::new();
        let mut served = HashMap::new();
        let mut class_of = HashMap::new();
        let mut extra = Vec::new();
        let mut assignment = Vec::new();
        for w in &sources.workloads {
            let id = w.identity(client, &set, sources.api.as_ref());
            // A workload's own certificate only matters with a mesh CA.
            let sa = id
                .service_account
                .clone()
                .filter(|_| sources.issuer.is_some());
            crate::telemetry::set_source(&w.netns, id.telemetry(sa.as_ref(), &primary));
            let relevance = relevance.as_ref().expect("computed with workloads");
            let class = (relevance.class(&set, &id.client), sa.clone());
            let netns = w.netns.clone();
            if Some(&class) == primary_class.as_ref() {
                class_of.insert(netns.clone(), class);
                assignment.push((netns, None, id.source));
            } else if let Some(i) = seen.get(&class) {
                class_of.insert(netns.clone(), class);
                assignment.push((netns, Some(*i), id.source));
            } else {
                // Built for this workload's own client: any of its class gets an equal one.
                match build_for(&set, &(id.client, sa), sources) {
                    Ok(r) => {
                        served.insert(class.clone(), netns.clone());
                        class_of.insert(netns.clone(), class.clone());
                        seen.insert(class, extra.len());
                        extra.push(r);
                        assignment.push((netns, Some(extra.len() - 1), id.source));
                    }
                    Err(problems) => {
                        tracing::error!(netns = %w.netns, identity = ?id.source, "the configuration does not resolve for this workload's identity; it is served with the daemon's client identity");
                        for p in problems {
                            tracing::error!("{p}");
                        }
                        assignment.push((netns, None, id.source));
                    }
                }
            }
        }
        tracing::debug!(
            workloads = assignment.len(),
            own_snapshots = extra.len(),
            "workload snapshots: one per class of identities the configuration tells apart"
        );
        Snapshots {
            primary,
            extra,
            assignment,
            classes: Classes {
                set,
                relevance,
                served,
                class_of,
            },
        }
    }
}

/// The snapshot of `set` for a workload's client, TLS files read, originating `ISTIO_MUTUAL` with
/// the workload's own identity when it has a service account (and the daemon a mesh CA).
fn build_for(
    set: &Arc<ConfigSet>,
    (client, sa): &(Client, Option<(String, String)>),
    sources: &Sources,
) -> Result<Registry, Vec<config::Problem>> {
    let mut credentials = sources.credentials.clone();
    if let (Some((ns, sa)), Some(issuer)) = (sa, &sources.issuer) {
        match issuer.identity(ns, sa) {
            Ok(files) => credentials.mesh = Some(files),
            Err(e) => {
                tracing::error!(namespace = %ns, service_account = %sa, error = %e, "cannot issue the workload's mesh identity; ISTIO_MUTUAL refuses its connections");
                credentials.mesh = None;
            }
        }
    }
    let mut r = Registry::build_shared(set.clone(), client).map_err(|r| r.errors)?;
    r.originate(&credentials)?;
    Ok(r)
}

// === impl Snapshots ===

impl Snapshots {
    /// Every captured (VIP, port) of every snapshot, with the service id of the first that has it.
    pub fn vips(&self) -> Vec<(std::net::SocketAddr, u32)> {
        let mut seen = HashSet::new();
        std::iter::once(&self.primary)
            .chain(&self.extra)
            .flat_map(|r| r.vips())
            .filter(|(a, _)| seen.insert(*a))
            .map(|(a, id)| (a, id as u32))
            .collect()
    }

    /// Every captured range of every snapshot: ((network, prefix length), port, service id of
    /// the first that has it).
    pub fn cidrs(&self) -> Vec<crate::redirect::loader::CapturedRange> {
        let mut seen = HashSet::new();
        std::iter::once(&self.primary)
            .chain(&self.extra)
            .flat_map(|r| r.cidrs())
            .filter(|(net, port, _)| seen.insert((*net, *port)))
            .map(|(net, port, id)| (net, port, id as u32))
            .collect()
    }

    /// Where each workload's identity came from, by network namespace.
    pub fn identities(&self) -> HashMap<String, Source> {
        (self.assignment.iter())
            .map(|(netns, _, s)| (netns.clone(), s.clone()))
            .collect()
    }

    /// What these snapshots tell the next reload (moved out: the snapshots are about to be
    /// installed).
    pub fn known(&mut self) -> Known {
        let empty = Classes {
            set: Arc::default(),
            relevance: None,
            served: HashMap::new(),
            class_of: HashMap::new(),
        };
        Known {
            identities: self.identities(),
            classes: Some(std::mem::replace(&mut self.classes, empty)),
        }
    }

    /// Fresh views over these snapshots, for `workloads` (the order they were loaded for).
    pub fn into_views(self, workloads: &[Workload]) -> Views {
        let primary = RegistryHandle::new(self.primary);
        let extra: Vec<Arc<Registry>> = self.extra.into_iter().map(Arc::new).collect();
        let workloads = workloads
            .iter()
            .zip(&self.assignment)
            .map(|(w, (_, i, source))| {
                log_identity(w, source);
                let snapshot = i.map_or_else(|| primary.load(), |i| extra[i].clone());
                (w.clone(), RegistryHandle::from_arc(snapshot))
            })
            .collect();
        Views::new(primary, workloads)
    }

    /// Swaps these snapshots into `views`; each takes over the state of the snapshot it replaces
    /// (see [`Registry::inherit`]).
    pub fn install(self, views: &Views) {
        let mut primary = self.primary;
        primary.inherit(&views.primary.load());
        let primary = Arc::new(primary);
        views.primary.store_arc(primary.clone());
        let mut extra: Vec<Option<Registry>> = self.extra.into_iter().map(Some).collect();
        let mut installed: Vec<Option<Arc<Registry>>> = vec![None; extra.len()];
        // By namespace: a workload enrolled during the build keeps its handle until the next.
        views.each(|w, handle| {
            let Some((_, i, _)) = self.assignment.iter().find(|(n, ..)| *n == w.netns) else {
                return;
            };
            let snapshot = match i {
                None => primary.clone(),
                Some(i) => match (&installed[*i], extra[*i].take()) {
                    (Some(a), _) => a.clone(),
                    (None, Some(mut r)) => {
                        r.inherit(&handle.load());
                        let a = Arc::new(r);
                        installed[*i] = Some(a.clone());
                        a
                    }
                    (None, None) => primary.clone(),
                },
            };
            handle.store_arc(snapshot);
        });
    }
}

/// Says who a workload namespace's connections come from.
fn log_identity(w: &Workload, source: &Source) {
    tracing::info!(netns = %w.netns, addresses = ?w.addresses, identity = ?source, "workload identity");
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
    let docs = feed.documents();
    for _ in 0..MAX_REJECTION_ROUNDS {
        let mut set = files.clone();
        problems.extend(feed.extend(&docs, &mut set, &mut rejected, &dropped));
        let errors = match Registry::build_shared(Arc::new(set), client) {
            Ok(registry) => {
                feed.accepted(&docs, &rejected, &problems);
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

    /// Reloads for a changed set of workloads, without waiting.
    pub fn workloads_changed_later(&self) {
        let (tx, _) = tokio::sync::oneshot::channel();
        let _ = self.0.send(Signal::Workloads(tx));
    }

    /// Reloads for a changed set of workloads and waits until the reload is done (whether it
    /// was accepted or not); false when the reloader is gone. Workloads that join with the
    /// class of a served snapshot get it without a build.
    pub async fn workloads_changed(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(Signal::Workloads(tx)).is_ok() && rx.await.is_ok()
    }

    /// Rebuilds everything and rewrites the kernel's tables, and waits until that is done;
    /// false when the reloader is gone.
    pub async fn full_reload(&self) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.send(Signal::Full(tx)).is_ok() && rx.await.is_ok()
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
            for p in &self.sources.paths {
                w.add(p)?;
            }
            // Certificate files: a rotation is a reload (new handshakes use the new files).
            for p in self.views.primary.load().tls_files() {
                w.add(&p)?;
            }
            Some(w)
        } else {
            None
        };
        if let Some(feed) = self.sources.api.clone() {
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
        let mut waiting = Vec::new();
        loop {
            let signal = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = rx.recv() => match s { Some(s) => s, None => return },
            };
            let first = Instant::now();
            let explicit = matches!(signal, Signal::Reload);
            // What the burst is about: the API's objects and the enrolled workloads may change
            // without a build.
            let mut burst = Burst::default();
            burst.note(&signal);
            note(&mut writing, &mut waiting, signal);
            // Coalesce the burst a single save produces, and wait (bounded) for writers to close.
            // The API's events and enrolments need no such wait: an enrolment (a pod waiting to
            // start) goes at once, and a stream of API events is cut every API_SETTLE.
            loop {
                if !burst.other && (burst.workloads || first.elapsed() >= API_SETTLE) {
                    break;
                }
                let wait = if writing.is_empty() {
                    SETTLE
                } else {
                    WRITER_WAIT.saturating_sub(first.elapsed()).max(SETTLE)
                };
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(s)) => {
                        burst.note(&s);
                        note(&mut writing, &mut waiting, s)
                    }
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
            let applied = !burst.other
                && (!burst.api || self.apply_changes(first))
                && (!burst.workloads || self.join_workloads(&[]));
            if !applied {
                self.reload(first).await;
            }
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
            if let Some(w) = &mut watch {
                for p in self.views.primary.load().tls_files() {
                    if let Err(e) = w.add(&p) {
                        tracing::warn!(error = %e, "cannot watch a certificate file; rotation of it needs a config change");
                    }
                }
            }
        }
    }

    /// Logs the workloads whose identity changed, and keeps what the load learnt of them.
    fn note_identities(&self, workloads: &[Workload], snapshots: &mut Snapshots) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let now = snapshots.known();
        for w in workloads {
            if let Some(source) = now.identities.get(&w.netns)
                && known.identities.get(&w.netns) != Some(source)
            {
                log_identity(w, source);
            }
        }
        *known = now;
    }

    /// Serves the workloads enrolled since the last reload, and those of `rejoin` (whose
    /// identity may have changed), by the snapshots of their classes, without a build (one
    /// whose class stayed keeps its snapshot); forgets the ones that left. False when a
    /// workload's class has no snapshot to share (a full reload builds it).
    fn join_workloads(&self, rejoin: &[String]) -> bool {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let Known {
            identities,
            classes: Some(classes),
        } = &mut *known
        else {
            return false;
        };
        let Classes {
            set,
            relevance,
            served,
            class_of,
        } = classes;
        let sources = &self.sources;
        let relevance = relevance.get_or_insert_with(|| Relevance::of(set));
        let primary = (relevance.class(set, &sources.client), None);
        let mut handles = HashMap::new();
        self.views.each(|w, h| {
            handles.insert(w.netns.clone(), (w.clone(), h.clone()));
        });
        let mut joined = Vec::new();
        for (netns, (w, handle)) in &handles {
            let again = rejoin.contains(netns);
            if identities.contains_key(netns) && !again {
                continue;
            }
            let id = w.identity(&sources.client, set, sources.api.as_ref());
            let sa = id
                .service_account
                .clone()
                .filter(|_| sources.issuer.is_some());
            crate::telemetry::set_source(
                &w.netns,
                id.telemetry(sa.as_ref(), &self.views.primary.load()),
            );
            let class = (relevance.class(set, &id.client), sa);
            if again && class_of.get(netns) == Some(&class) {
                joined.push((w, None, id.source, class));
                continue;
            }
            // Its snapshot no longer stands for a class it left.
            served.retain(|_, n| n != netns);
            let snapshot = if class == primary {
                self.views.primary.load()
            } else {
                // Served by the workload its snapshot was built for, while that one stays.
                match served.get(&class).and_then(|n| handles.get(n)) {
                    Some((_, served)) => served.load(),
                    None => return false,
                }
            };
            joined.push((w, Some((handle, snapshot)), id.source, class));
        }
        for (w, swap, source, class) in joined {
            if let Some((handle, snapshot)) = swap {
                handle.store_arc(snapshot);
            }
            if identities.get(&w.netns) != Some(&source) {
                log_identity(w, &source);
            }
            identities.insert(w.netns.clone(), source);
            class_of.insert(w.netns.clone(), class);
        }
        identities.retain(|netns, _| handles.contains_key(netns));
        class_of.retain(|netns, _| handles.contains_key(netns));
        served.retain(|_, netns| handles.contains_key(netns));
        true
    }

    /// Applies the API's changes to the installed snapshots without a build when only endpoint
    /// sets (an EndpointSlice, a pod's readiness or labels) and DestinationRules changed: each
    /// distinct snapshot is
    /// patched ([`Registry::patch`]) and swapped in, sharing every service and cluster the
    /// change does not touch; workloads whose pod changed join again ([`Self::join_workloads`]).
    /// False when a full reload is needed.
    fn apply_changes(&self, since: Instant) -> bool {
        let Some(feed) = &self.sources.api else {
            return false;
        };
        let crate::kubernetes::Changes::Patches { patches, pods } = feed.changes() else {
            return false;
        };
        // Workloads whose identity may have changed join again once the endpoints are in.
        let rejoin = self.identities_touched(&pods);
        self.patch(&patches, since) && (rejoin.is_empty() || self.join_workloads(&rejoin))
    }

    /// Patches every distinct installed snapshot with `patches` and swaps them in (all or
    /// none); false when one cannot be patched.
    fn patch(&self, patches: &[crate::kubernetes::Patch], since: Instant) -> bool {
        let Some(feed) = &self.sources.api else {
            return false;
        };
        if patches.is_empty() {
            return true;
        }
        let mut changed = ConfigSet::default();
        if patches.iter().any(|p| p.add_to(&mut changed).is_err()) || !changed.warnings.is_empty() {
            return false;
        }
        // Every distinct installed snapshot, patched: all or none is swapped in.
        let mut handles = vec![self.views.primary.clone()];
        self.views.each(|_, h| handles.push(h.clone()));
        let mut patched: Vec<(Arc<Registry>, Arc<Registry>)> = Vec::new();
        for h in &handles {
            let current = h.load();
            if patched.iter().any(|(old, _)| Arc::ptr_eq(old, &current)) {
                continue;
            }
            let Some(mut next) = current.patch(&changed) else {
                return false;
            };
            next.inherit(&current);
            patched.push((current, Arc::new(next)));
        }
        for h in &handles {
            let current = h.load();
            if let Some((_, next)) = patched.iter().find(|(old, _)| Arc::ptr_eq(old, &current)) {
                h.store_arc(next.clone());
            }
        }
        feed.patched(patches);
        if let Some(fast) = &self.fast {
            fast.publish();
        }
        tracing::info!(
            objects = ?patches.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            snapshots = patched.len(),
            elapsed_ms = since.elapsed().as_secs_f64() * 1000.0,
            "snapshots patched"
        );
        true
    }

    /// The workloads served since the last reload whose identity one of `pods` (changed, with
    /// their addresses now) is or may now be: its pod, or a pod holding one of its addresses.
    fn identities_touched(
        &self,
        pods: &[((String, String), Vec<std::net::IpAddr>)],
    ) -> Vec<String> {
        let mut touched = Vec::new();
        if pods.is_empty() {
            return touched;
        }
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        self.views.each(|w, _| {
            // A newcomer's identity is looked up when it joins.
            let Some(source) = known.identities.get(&w.netns) else {
                return;
            };
            if pods.iter().any(|((ns, name), ips)| {
                *source == Source::Pod(format!("{ns}/{name}"))
                    || ips.iter().any(|ip| w.addresses.contains(ip))
            }) {
                touched.push(w.netns.clone());
            }
        });
        touched
    }

    /// Rebuilds and swaps the snapshots, or keeps the current ones and logs why.
    pub async fn reload(&self, since: Instant) {
        let mut sources = self.sources.clone();
        sources.workloads = self.views.workloads();
        let workloads = sources.workloads.clone();
        let built = tokio::task::spawn_blocking(move || load(&sources)).await;
        match built {
            Ok(Ok(mut snapshots)) => {
                for w in snapshots.primary.warnings() {
                    tracing::warn!("{w}");
                }
                let (vips, cidrs) = (snapshots.vips(), snapshots.cidrs());
                let services = snapshots.primary.services().len();
                self.note_identities(&workloads, &mut snapshots);
                snapshots.install(&self.views);
                if let Some(kernel) = &self.kernel
                    && let Err(e) = kernel
                        .set_vips(&vips)
                        .and_then(|()| kernel.set_cidrs(&cidrs))
                {
                    tracing::error!(error = %e, "updating captured addresses failed; capture keeps the previous set");
                }
                if let Some(fast) = &self.fast {
                    fast.publish();
                }
                tracing::info!(
                    services,
                    vips = vips.len(),
                    elapsed_ms = since.elapsed().as_secs_f64() * 1000.0,
                    "configuration reloaded"
                );
                // The parse and the previous snapshot's unshared parts are garbage now.
                crate::memory::trim_in_background();
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

/// What the signals of one burst are about.
#[derive(Default)]
struct Burst {
    /// The API's objects changed.
    api: bool,
    /// Workloads were enrolled or left.
    workloads: bool,
    /// Files, SIGHUP: only a full reload tells.
    other: bool,
}

impl Burst {
    fn note(&mut self, signal: &Signal) {
        match signal {
            Signal::Api => self.api = true,
            Signal::Workloads(_) => self.workloads = true,
            Signal::File { .. } | Signal::Reload | Signal::Full(_) => self.other = true,
        }
    }
}

/// Tracks which files a writer has changed and not yet closed, and who waits for the reload.
fn note(
    writing: &mut HashSet<PathBuf>,
    waiting: &mut Vec<tokio::sync::oneshot::Sender<()>>,
    signal: Signal,
) {
    match signal {
        Signal::File {
            path,
            writing: w,
            closed,
        } => {
            if closed {
                writing.remove(&path);
            } else if w {
                writing.insert(path);
            }
        }
        Signal::Workloads(done) | Signal::Full(done) => waiting.push(done),
        Signal::Reload | Signal::Api => {}
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
