//! Workload identity: who opened a captured connection. Every enrolled network namespace is a
//! workload with its own addresses; its namespace and labels (which decide `exportTo`,
//! `workloadSelector` rules and `sourceLabels`/`sourceNamespace` route matches) come from the
//! `Pod` holding one of those addresses in Kubernetes mode, else from a `WorkloadEntry` with one of
//! them (or the one `--netns NAME=namespace/name` names), else from the daemon's `--client-*`
//! flags. Each distinct identity gets its own registry snapshot ([`Views`]), and, with a mesh CA,
//! its own `ISTIO_MUTUAL` certificate (one SPIFFE identity per namespace and service account).
//!
//! Invariants: a workload's identity is resolved again on every reload (a pod's labels may
//! change); workloads with the same identity share one snapshot, and the primary snapshot (the
//! `--client-*` identity) serves the admin API, `drover explain`, cgroup capture and every
//! namespace whose workload is not identified.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{
    config::source::ConfigSet,
    kubernetes::Feed,
    registry::{Client, RegistryHandle},
};

/// An enrolled network namespace, as far as identity goes.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The namespace's name as enrolled (`--netns`).
    pub netns: String,
    /// Its own addresses (see [`crate::redirect::netns::NetNs::addresses`]).
    pub addresses: Vec<IpAddr>,
    /// `namespace/name` of the WorkloadEntry that describes it, when the command line says so.
    pub entry: Option<String>,
}

/// The snapshots of every identity the daemon serves. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct Views {
    /// The `--client-*` identity's snapshot.
    pub primary: RegistryHandle,
    /// Each enrolled workload namespace with the handle its listeners read; namespaces enrolled
    /// while running (CNI) are added and removed.
    workloads: Arc<Mutex<Vec<(Workload, RegistryHandle)>>>,
}

/// Where a workload's identity came from (logged when it changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Pod(String),
    WorkloadEntry(String),
    Flags,
}

// === impl Workload ===

/// Who a workload is: the client identity its rules are resolved for, the service account its
/// mesh certificate names (`None`: the daemon's own, `--service-account`), and where that came
/// from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub client: Client,
    pub service_account: Option<(String, String)>,
    pub source: Source,
    /// How the standard metrics name it (its principal added once its certificate is known).
    pub peer: crate::telemetry::Peer,
}

impl Identity {
    /// Its labels in the standard metrics, with the principal of `service_account` (the one
    /// its mesh certificate names) when it has one, and what the Telemetry resources of
    /// `snapshot` say for it.
    pub fn telemetry(
        &self,
        service_account: Option<&(String, String)>,
        snapshot: &crate::registry::Registry,
    ) -> crate::telemetry::Source {
        let principal = service_account.map(|(ns, sa)| crate::telemetry::principal(ns, sa));
        let mut labels = self.client.labels.clone();
        let mut namespace = self.client.namespace.clone();
        if let Source::WorkloadEntry(id) = &self.source
            && let Some(we) =
                (snapshot.shared_config().workload_entries.iter()).find(|we| &we.id() == id)
        {
            labels = we.spec.labels.clone();
            labels.extend(self.client.labels.clone());
            namespace = we.namespace().to_string();
        }
        crate::telemetry::Source {
            workload: crate::telemetry::Workload::new(self.peer.clone(), principal),
            settings: std::sync::Arc::new(snapshot.telemetry_for(&namespace, &labels)),
        }
    }
}

impl Workload {
    /// The identity of this workload: see the module doc for the order.
    pub fn identity(&self, flags: &Client, set: &ConfigSet, api: Option<&Feed>) -> Identity {
        let from_entry = |id: String| {
            let we = set.workload_entries.iter().find(|we| we.id() == id);
            let service_account = we
                .filter(|we| !we.spec.service_account.is_empty())
                .map(|we| (we.namespace().to_string(), we.spec.service_account.clone()));
            Identity {
                peer: match we {
                    Some(we) => crate::telemetry::Peer::new(
                        Some(&we.meta.name),
                        we.namespace(),
                        &we.spec.labels,
                        None,
                    ),
                    None => {
                        crate::telemetry::Peer::new(None, &flags.namespace, &flags.labels, None)
                    }
                },
                client: Client {
                    workload: Some(id.clone()),
                    ..flags.clone()
                },
                service_account,
                source: Source::WorkloadEntry(id),
            }
        };
        if let Some(id) = &self.entry {
            return from_entry(id.clone());
        }
        if let Some(feed) = api
            && let Some((ns, name, pod)) = feed.pod_with_address(&self.addresses)
        {
            let (labels, locality) = feed.pod_placement(&pod);
            return Identity {
                peer: crate::telemetry::Peer::new(Some(&pod.workload), &ns, &labels, None),
                service_account: Some((ns.clone(), pod.service_account)),
                source: Source::Pod(format!("{ns}/{name}")),
                client: Client {
                    namespace: ns,
                    labels,
                    workload: None,
                    locality,
                },
            };
        }
        let entry = set.workload_entries.iter().find(|we| {
            we.spec
                .address
                .parse::<IpAddr>()
                .is_ok_and(|a| self.addresses.contains(&a))
        });
        match entry {
            Some(we) => from_entry(we.id()),
            None => Identity {
                peer: crate::telemetry::Peer::new(None, &flags.namespace, &flags.labels, None),
                client: flags.clone(),
                service_account: None,
                source: Source::Flags,
            },
        }
    }
}

// === impl Views ===

impl Views {
    /// `primary` and the handles of `workloads`.
    pub fn new(primary: RegistryHandle, workloads: Vec<(Workload, RegistryHandle)>) -> Self {
        Self {
            primary,
            workloads: Arc::new(Mutex::new(workloads)),
        }
    }

    /// One snapshot for everyone (no workload namespace has its own).
    pub fn single(primary: RegistryHandle) -> Self {
        Self::new(primary, Vec::new())
    }

    fn locked(&self) -> std::sync::MutexGuard<'_, Vec<(Workload, RegistryHandle)>> {
        self.workloads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handle the listeners of network namespace `netns` read.
    pub fn for_netns(&self, netns: &str) -> RegistryHandle {
        self.locked()
            .iter()
            .find(|(w, _)| w.netns == netns)
            .map_or_else(|| self.primary.clone(), |(_, h)| h.clone())
    }

    /// Every workload, in enrolment order.
    pub fn workloads(&self) -> Vec<Workload> {
        self.locked().iter().map(|(w, _)| w.clone()).collect()
    }

    /// Adds a workload enrolled while running; it reads the primary snapshot until the next
    /// reload gives it its own. A name another workload holds (a second sandbox of one pod)
    /// gets `#<tiebreak>` appended, so each keeps its own handle. Returns the key it is known
    /// by ([`Views::remove`]) and its handle.
    pub fn add(&self, mut workload: Workload, tiebreak: &str) -> (String, RegistryHandle) {
        let handle = RegistryHandle::from_arc(self.primary.load());
        let mut all = self.locked();
        if all.iter().any(|(w, _)| w.netns == workload.netns) {
            workload.netns = format!("{}#{tiebreak}", workload.netns);
            all.retain(|(w, _)| w.netns != workload.netns);
        }
        let key = workload.netns.clone();
        all.push((workload, handle.clone()));
        (key, handle)
    }

    /// Forgets the workload of `netns`.
    pub fn remove(&self, netns: &str) {
        crate::telemetry::forget_source(netns);
        self.locked().retain(|(w, _)| w.netns != netns);
    }

    /// Runs `f` on every (workload, handle) while holding the list.
    pub fn each(&self, mut f: impl FnMut(&Workload, &RegistryHandle)) {
        for (w, h) in self.locked().iter() {
            f(w, h);
        }
    }
}
