//! Reconciliation (Kubernetes mode): the pods of this node that the plugin never handed over
//! (they started before the first daemon ran, or while the plugin was not chained) are found
//! through `/proc` — the network namespace of a process that holds one of the pod's addresses,
//! never the host's, and whose cgroup names no other pod (the kubelet names a pod's cgroup
//! `pod<uid>`; a runtime that does not is trusted on the address) — and enrolled; enrolments whose pod has left the API server are removed.
//! Runs once before the daemon reports ready, then every [`EVERY`].
//!
//! Invariants: a namespace is opened once per pass however many processes share it; pods of the
//! excluded namespaces, host-network pods and pods that opt out (an Istio sidecar, or
//! `istio.io/dataplane-mode: none`) are never touched; a pod that cannot be enrolled never keeps
//! the others from being enrolled; an enrolment the plugin made is
//! not removed before it is [`GRACE`] old (the kubelet writes a new pod's addresses to the API
//! server only after the plugin's ADD); an enrolment is removed only on evidence: the Pod watch
//! is current (listed, not failing) and no pod of the node holds its addresses. A pod enrolled here is removed by a pass, not by the
//! plugin: runtimes tear a pod down with the network configuration it was set up with, which
//! did not chain the plugin.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Command, Enroller, Error, Prepared, Request};
use crate::{
    kubernetes::{Feed, NodePod},
    redirect::netns::NetNs,
};

/// How often the node's pods are reconciled.
pub const EVERY: Duration = Duration::from_secs(5);
/// How old an enrolment must be before a missing Pod object removes it (by default).
pub const GRACE: Duration = Duration::from_secs(120);

/// What a pass compares.
pub struct Reconcile {
    pub feed: Feed,
    pub node: String,
    /// The host's `/proc` (`/host/proc` in the DaemonSet).
    pub proc_dir: PathBuf,
    /// Namespaces never enrolled (the plugin's defaults).
    pub excluded: Vec<String>,
    /// How old a plugin-made enrolment must be before a missing Pod removes it ([`GRACE`]).
    pub grace: Duration,
}

impl Enroller {
    /// One pass; the number of pods enrolled by it.
    pub async fn reconcile(&self, r: &Reconcile) -> Result<usize, Error> {
        let pods: Vec<_> = (r.feed.pods_on_node(&r.node).into_iter())
            .filter(|p| !p.ips.is_empty() && !r.excluded.contains(&p.namespace))
            .collect();
        let live: HashSet<IpAddr> = pods.iter().flat_map(|p| p.ips.clone()).collect();
        // A pod missing from a cache that may be stale (the Pod watch failed and has not
        // recovered) is no evidence that it is gone: nothing is removed then.
        if r.feed.is_fresh("Pod") {
            self.forget_gone(&live, r.grace);
        } else {
            tracing::debug!("reconciling: the Pod watch is not current; no enrolment removed");
        }
        let enrolled: HashSet<IpAddr> = self
            .pods()
            .values()
            .flat_map(|p| p.addresses.clone())
            .collect();
        let missing: Vec<_> = pods
            .into_iter()
            .filter(|p| !p.ips.iter().any(|ip| enrolled.contains(ip)))
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let mut ready = Vec::new();
        for (path, ns) in namespaces(r)? {
            let Some(pod) = missing
                .iter()
                .find(|p| p.ips.iter().any(|ip| ns.addresses.contains(ip)))
            else {
                continue;
            };
            ready.extend(self.prepare_found(r, &path, pod));
        }
        let found = ready.len();
        if found > 0 {
            self.reload.workloads_changed().await;
            for p in ready {
                self.activate(p, false);
            }
            self.sync_kernel()?;
            tracing::info!(
                pods = found,
                "reconciled: pods found through /proc enrolled"
            );
        }
        Ok(found)
    }

    /// Opens and prepares the namespace at `path` for `pod`, unless its process belongs to
    /// another pod. Each pod alone: one that cannot be enrolled (its namespace already has a
    /// listener on the capture port, it vanished meanwhile) is logged, counted and tried again
    /// on the next pass.
    fn prepare_found(&self, r: &Reconcile, path: &Path, pod: &NodePod) -> Option<Prepared> {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let process = path.parent().and_then(Path::parent);
        let cgroup = process
            .and_then(|p| std::fs::read_to_string(p.join("cgroup")).ok())
            .unwrap_or_default();
        if names_another_pod(&cgroup, pod.uid.as_deref()) {
            tracing::warn!(pod = %name, netns = %path.display(), "a namespace holds the pod's address but its process belongs to another pod; not enrolled");
            return None;
        }
        let req = Request {
            pod_namespace: pod.namespace.clone(),
            pod_name: pod.name.clone(),
            ips: pod.ips.clone(),
            netns: path.display().to_string(),
            ..Request::new(Command::Add, format!("reconciled:{name}"))
        };
        let prepared = std::fs::File::open(path)
            .map_err(|source| Error::Netns {
                netns: req.netns.clone(),
                source,
            })
            .and_then(|fd| self.prepare(&req, fd.into(), None));
        prepared.unwrap_or_else(|e| {
            (r.feed.counters().reconcile_failures)
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(pod = %name, error = %e, "reconciling: pod not enrolled; trying again on the next pass");
            None
        })
    }

    /// Un-enrols the pods none of whose addresses a live pod has (the plugin's once older than
    /// `grace`).
    fn forget_gone(&self, live: &HashSet<IpAddr>, grace: Duration) {
        let gone: Vec<String> = self
            .pods()
            .iter()
            .filter(|(_, p)| !p.persist || p.since.elapsed() > grace)
            .filter(|(_, p)| !p.addresses.iter().any(|ip| live.contains(ip)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            tracing::info!(container = %id, "reconciled: its pod is gone from the API server");
            self.del(&id);
        }
    }

    /// Reconciles every [`EVERY`] until the data path shuts down.
    pub async fn keep_reconciling(self: std::sync::Arc<Self>, r: Reconcile) {
        let shutdown = self.serve.shutdown.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(EVERY) => {}
            }
            if self.is_paused() {
                continue;
            }
            if let Err(e) = self.reconcile(&r).await {
                tracing::warn!(error = %e, "reconciling the node's pods failed");
            }
        }
    }
}

/// Whether `cgroup` (a `/proc/<pid>/cgroup`) names a kubelet pod other than the one of `uid`:
/// the kubelet's cgroups carry `pod<uid>`, with `_` for `-` under the systemd driver. A cgroup
/// that names no pod (another runtime) or a pod without a uid says nothing.
fn names_another_pod(cgroup: &str, uid: Option<&str>) -> bool {
    let Some(uid) = uid else { return false };
    // Every `pod` that starts a path or name component (`/pod…`, `-pod…`) followed by a uid's
    // 36 characters (hex and dashes, or underscores).
    let named: Vec<String> = cgroup
        .match_indices("pod")
        .filter(|(i, _)| *i == 0 || matches!(cgroup.as_bytes()[i - 1], b'/' | b'-'))
        .filter_map(|(i, _)| cgroup.get(i + 3..i + 3 + 36))
        .filter(|w| w.as_bytes()[0].is_ascii_hexdigit())
        .filter(|w| {
            w.bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
        })
        .map(|w| w.replace('_', "-"))
        .collect();
    !named.is_empty() && !named.iter().any(|w| w == uid)
}

/// Every network namespace of the host's processes but the host's own, once each, opened.
fn namespaces(r: &Reconcile) -> Result<Vec<(PathBuf, NetNs)>, Error> {
    let home = NetNs::current().map_err(|source| Error::Netns {
        netns: "host".into(),
        source,
    })?;
    let host = std::fs::metadata(r.proc_dir.join("1/ns/net")).map(|m| (m.dev(), m.ino()));
    let entries = std::fs::read_dir(&r.proc_dir).map_err(|source| Error::Netns {
        netns: r.proc_dir.display().to_string(),
        source,
    })?;
    let mut seen: HashMap<(u64, u64), ()> = HashMap::new();
    let mut out = Vec::new();
    for e in entries.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let path = e.path().join("ns/net");
        // Processes come and go during the scan: a vanished one is skipped.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let key = (meta.dev(), meta.ino());
        if host.as_ref().is_ok_and(|h| *h == key) || seen.insert(key, ()).is_some() {
            continue;
        }
        if let Ok(ns) = NetNs::open(&path.display().to_string(), &home)
            && !ns.is_home
        {
            out.push((path, ns));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::names_another_pod;

    const UID: &str = "6a1f4e5c-7b2d-4c3e-9f10-0123456789ab";

    #[test]
    fn the_kubelets_cgroup_names_decide_and_others_say_nothing() {
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/0123abcd\n");
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-0123.scope\n",
            UID.replace('-', "_")
        );
        assert!(!names_another_pod(&cgroupfs, Some(UID)));
        assert!(!names_another_pod(&systemd, Some(UID)));
        let other = "6a1f4e5c-7b2d-4c3e-9f10-ffffffffffff";
        assert!(names_another_pod(&cgroupfs, Some(other)));
        assert!(names_another_pod(&systemd, Some(other)));
        // podman's (no pod named) and a pod without a uid: the address decides.
        let podman = "0::/machine.slice/libpod-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";
        assert!(!names_another_pod(podman, Some(UID)));
        assert!(!names_another_pod(&cgroupfs, None));
    }
}
