//! Workload identity: who opened a captured connection. Every enrolled network namespace is a
//! workload with its own addresses; its namespace and labels (which decide `exportTo`,
//! `workloadSelector` rules and `sourceLabels`/`sourceNamespace` route matches) come from the
//! `Pod` holding one of those addresses in Kubernetes mode, else from a `WorkloadEntry` with one of
//! them (or the one `--netns NAME=namespace/name` names), else from the daemon's `--client-*`
//! flags. Each distinct identity gets its own registry snapshot ([`Views`]).
//!
//! Invariants: a workload's identity is resolved again on every reload (a pod's labels may
//! change); workloads with the same identity share one snapshot, and the primary snapshot (the
//! `--client-*` identity) serves the admin API, `drover explain`, cgroup capture and every
//! namespace whose workload is not identified.

use std::net::IpAddr;

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

/// The snapshots of every identity the daemon serves.
#[derive(Clone, Debug)]
pub struct Views {
    /// The `--client-*` identity's snapshot.
    pub primary: RegistryHandle,
    /// Each enrolled workload namespace with the handle its listeners read.
    pub workloads: Vec<(Workload, RegistryHandle)>,
}

/// Where a workload's identity came from (logged when it changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Pod(String),
    WorkloadEntry(String),
    Flags,
}

// === impl Workload ===

impl Workload {
    /// The identity of this workload: see the module doc for the order.
    pub fn client(&self, flags: &Client, set: &ConfigSet, api: Option<&Feed>) -> (Client, Source) {
        if let Some(id) = &self.entry {
            return (
                Client {
                    workload: Some(id.clone()),
                    ..flags.clone()
                },
                Source::WorkloadEntry(id.clone()),
            );
        }
        if let Some((ns, name, labels)) = api.and_then(|f| f.pod_with_address(&self.addresses)) {
            let id = format!("{ns}/{name}");
            let client = Client {
                namespace: ns,
                labels,
                workload: None,
            };
            return (client, Source::Pod(id));
        }
        let entry = set.workload_entries.iter().find(|we| {
            we.spec
                .address
                .parse::<IpAddr>()
                .is_ok_and(|a| self.addresses.contains(&a))
        });
        match entry {
            Some(we) => (
                Client {
                    workload: Some(we.id()),
                    ..flags.clone()
                },
                Source::WorkloadEntry(we.id()),
            ),
            None => (flags.clone(), Source::Flags),
        }
    }
}

// === impl Views ===

impl Views {
    /// One snapshot for everyone (no workload namespace has its own).
    pub fn single(primary: RegistryHandle) -> Self {
        Self {
            primary,
            workloads: Vec::new(),
        }
    }

    /// The handle the listeners of network namespace `netns` read.
    pub fn for_netns(&self, netns: &str) -> RegistryHandle {
        self.workloads
            .iter()
            .find(|(w, _)| w.netns == netns)
            .map_or_else(|| self.primary.clone(), |(_, h)| h.clone())
    }
}
