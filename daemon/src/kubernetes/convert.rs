//! Kubernetes objects → the Istio resources istiod would derive from them: a `Service` with the
//! endpoints of its `EndpointSlice`s becomes a `ServiceEntry` (host `name.ns.svc.<domain>`,
//! ClusterIPs as addresses, one endpoint per ready address carrying its pod's labels, service
//! account and locality). Pure functions over the watched state, so the rules are unit-tested
//! without an API server.
//!
//! Invariants: an endpoint whose `targetRef` names a pod not seen yet is left out (it appears
//! on the rebuild the pod's arrival triggers); only `ready` endpoints (absent = ready) serve, as
//! Envoy excludes istiod's draining and unhealthy ones from balancing; headless and
//! `ExternalName` services are not converted (no VIP to capture), and say so.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use crate::config::crd;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation restricting a Service's visibility, as on a ServiceEntry's `exportTo`.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";
/// Pod label that overrides the node's locality (`region.zone.subzone`).
pub const LOCALITY_LABEL: &str = "topology.istio.io/locality";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What the registry needs of a pod (the rest of the object is not kept: 50 000 pods must fit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: Option<String>,
    pub ips: Vec<String>,
    pub phase: Option<String>,
    pub host_network: bool,
    /// `metadata.uid` (the kubelet names the pod's cgroup after it).
    pub uid: Option<String>,
    /// Not for the node agent to capture: it has an Istio sidecar (`sidecar.istio.io/status`)
    /// or opts out as ambient mode's pods do (label `istio.io/dataplane-mode: none`).
    pub opted_out: bool,
    /// Its own say on the mesh: `Some(true)` with `istio.io/dataplane-mode: ambient` or the
    /// `ambient.istio.io/redirection: enabled` annotation istio-cni writes, `Some(false)` with
    /// `istio.io/dataplane-mode: none`, `None` when its namespace decides (see [`mark_ambient`]).
    pub ambient: Option<bool>,
    /// Its workload as Istio's telemetry names it ([`crate::telemetry::workload_name`]).
    pub workload: String,
}

/// Puts the HBONE marker ([`crate::hbone::REDIRECTION`]) in the labels of a pod that is in the
/// mesh — its own label or annotation says so, else its namespace is labelled
/// `istio.io/dataplane-mode: ambient` — and takes it out of the others', as istiod picks the
/// tunnel protocol. Endpoints carry their pod's labels, so the registry reads the marker there.
pub fn mark_ambient(pod: &mut PodInfo, namespace_ambient: bool) {
    if pod.ambient.unwrap_or(namespace_ambient) {
        (pod.labels).insert(crate::hbone::REDIRECTION.into(), "enabled".into());
    } else {
        pod.labels.remove(crate::hbone::REDIRECTION);
    }
}

/// Whether a namespace's labels put its pods in the mesh (`istio.io/dataplane-mode: ambient`).
pub fn namespace_ambient(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(DATAPLANE_MODE))
        .map(String::as_str)
        == Some("ambient")
}

/// The annotation the sidecar injector writes on an injected pod.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// The label by which a pod opts out of capture (ambient mode's, value `none`).
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// A `ServiceEntry` derived from a `Service`, or why none is.
#[derive(Debug, PartialEq)]
pub enum Derived {
    Entry(Box<(crd::ObjectMeta, crd::ServiceEntrySpec)>),
    /// Not captured, with the reason (logged once per change).
    Skipped(String),
}

/// The locality labels of nodes, by node name.
pub type NodeLocality = HashMap<String, BTreeMap<String, String>>;

/// Keeps the pod fields the registry uses.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let redirected = (pod.metadata.annotations.as_ref())
        .and_then(|a| a.get(crate::hbone::REDIRECTION))
        .is_some_and(|v| v == "enabled");
    let ambient = match labels.get(DATAPLANE_MODE).map(String::as_str) {
        Some("none") => Some(false),
        Some("ambient") => Some(true),
        _ => redirected.then_some(true),
    };
    let controller = (pod.metadata.owner_references.iter().flatten())
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.as_str(), o.name.as_str()));
    let workload = crate::telemetry::workload_name(
        pod.metadata.name.as_deref().unwrap_or_default(),
        controller,
        &labels,
    );
    PodInfo {
        workload,
        ambient,
        labels,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()),
        ips: status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
            .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|ip| vec![ip]))
            .unwrap_or_default(),
        phase: status.and_then(|s| s.phase.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        uid: pod.metadata.uid.clone(),
        opted_out: (pod.metadata.annotations.as_ref())
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
            || (pod.metadata.labels.as_ref())
                .and_then(|l| l.get(DATAPLANE_MODE))
                .is_some_and(|m| m == "none"),
    }
}

/// The topology labels of a node (region, zone, subzone), the only ones endpoints inherit.
pub fn node_locality(node: &Node) -> BTreeMap<String, String> {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    labels
        .into_iter()
        .filter(|(k, _)| [REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL].contains(&k.as_str()))
        .collect()
}

/// The protocol istiod gives a Service port: `appProtocol` first, then the port name's prefix
/// (left to validation, which applies the same convention to ServiceEntry ports); UDP and SCTP
/// ports are not TCP and are dropped by the caller.
fn app_protocol(port: &ServicePort) -> Option<String> {
    let app = port.app_protocol.as_deref()?.to_ascii_lowercase();
    let protocol = match app.as_str() {
        "http" | "kubernetes.io/ws" => "HTTP",
        "http2" | "kubernetes.io/h2c" => "HTTP2",
        "https" | "kubernetes.io/wss" => "HTTPS",
        "grpc" => "GRPC",
        "grpc-web" => "GRPC-WEB",
        "tls" => "TLS",
        "tcp" => "TCP",
        "mongo" => "MONGO",
        "mysql" => "MYSQL",
        "redis" => "REDIS",
        _ => return None,
    };
    Some(protocol.into())
}

/// The ServiceEntry port name of a Service port: its name, or `port-<number>` for the single
/// unnamed port Kubernetes allows (EndpointSlices name that port `""`).
fn port_name(name: Option<&str>, number: i32) -> String {
    match name {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => format!("port-{number}"),
    }
}

/// The `ServiceEntry` istiod would build for `svc` in cluster domain `domain`, with the ready
/// endpoints of `slices` (those labelled with its name, in its namespace).
pub fn service_entry(
    svc: &Service,
    slices: &[&EndpointSlice],
    pods: &HashMap<(String, String), PodInfo>,
    nodes: &NodeLocality,
    domain: &str,
) -> Derived {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let Some(spec) = svc.spec.as_ref() else {
        return Derived::Skipped("no spec".into());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Derived::Skipped(
            "ExternalName service: a DNS alias with no VIP to capture (DNS resolution is not built)"
                .into(),
        );
    }
    let addresses: Vec<String> = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .collect();
    if addresses.is_empty() {
        return Derived::Skipped(
            "headless service: clients connect to pod addresses directly, which are not captured"
                .into(),
        );
    }
    let (ports, unnamed) = tcp_ports(spec.ports.as_deref().unwrap_or_default());
    if ports.is_empty() {
        return Derived::Skipped("no TCP port".into());
    }
    let endpoints: Vec<_> = slices
        .iter()
        .flat_map(|s| endpoints(s, &namespace, unnamed.as_deref(), pods, nodes))
        .collect();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let export_to = annotations
        .get(EXPORT_TO_ANNOTATION)
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let meta = crd::ObjectMeta {
        name: name.clone(),
        namespace: Some(namespace.clone()),
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        annotations,
        creation_timestamp: None,
    };
    let spec = crd::ServiceEntrySpec {
        hosts: vec![format!("{name}.{namespace}.svc.{domain}")],
        addresses,
        ports,
        location: crd::Location::MeshInternal,
        resolution: crd::Resolution::Static,
        endpoints: endpoints.into(),
        workload_selector: None,
        export_to,
        subject_alt_names: Vec::new(),
    };
    Derived::Entry(Box::new((meta, spec)))
}

/// A Service's TCP ports as ServiceEntry ports, and the name given to its unnamed port (the
/// single port Kubernetes allows without a name), if it has one.
fn tcp_ports(ports: &[ServicePort]) -> (Vec<crd::ServicePort>, Option<String>) {
    let tcp = ports
        .iter()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .map(|p| crd::ServicePort {
            number: p.port.into(),
            protocol: app_protocol(p),
            name: port_name(p.name.as_deref(), p.port),
            target_port: None,
        })
        .collect();
    let unnamed = ports.iter().find_map(|p| {
        p.name
            .as_deref()
            .is_none_or(str::is_empty)
            .then(|| port_name(None, p.port))
    });
    (tcp, unnamed)
}

/// The ready endpoints of one slice, with their pods' identity; `unnamed` is the ServiceEntry
/// name of the Service's unnamed port, if it has one.
fn endpoints(
    slice: &EndpointSlice,
    namespace: &str,
    unnamed: Option<&str>,
    pods: &HashMap<(String, String), PodInfo>,
    nodes: &NodeLocality,
) -> Vec<crd::WorkloadEntrySpec> {
    if slice.address_type == "FQDN" {
        return Vec::new();
    }
    let ports: BTreeMap<String, i64> = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| {
            let name = match p.name.as_deref() {
                Some(n) if !n.is_empty() => n.to_string(),
                _ => unnamed?.to_string(),
            };
            Some((name, i64::from(p.port?)))
        })
        .collect();
    let from = format!(
        "EndpointSlice {namespace}/{}",
        slice.metadata.name.as_deref().unwrap_or_default()
    );
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        if !ready {
            continue;
        }
        let pod = match &ep.target_ref {
            Some(r) if r.kind.as_deref() == Some("Pod") => {
                let key = (
                    r.namespace.clone().unwrap_or_else(|| namespace.to_string()),
                    r.name.clone().unwrap_or_default(),
                );
                match pods.get(&key) {
                    Some(p) => Some(p),
                    // Not known yet: the pod's arrival rebuilds, and adds the endpoint then.
                    None => continue,
                }
            }
            _ => None,
        };
        let node = ep
            .node_name
            .clone()
            .or_else(|| pod.and_then(|p| p.node.clone()));
        let (labels, locality) = endpoint_labels(pod, node.as_deref(), nodes);
        let origin = match &ep.target_ref {
            Some(r) if pod.is_some() => format!(
                "Pod {}/{} via {from}",
                r.namespace.as_deref().unwrap_or(namespace),
                r.name.as_deref().unwrap_or_default()
            ),
            _ => from.clone(),
        };
        for address in &ep.addresses {
            out.push(crd::WorkloadEntrySpec {
                address: address.clone(),
                ports: ports.clone(),
                labels: labels.clone(),
                network: String::new(),
                locality: locality.clone(),
                weight: None,
                service_account: pod.map(|p| p.service_account.clone()).unwrap_or_default(),
                origin: Some(origin.clone()),
                workload_name: pod.map(|p| p.workload.clone()),
            });
        }
    }
    out
}

/// An endpoint's labels (its pod's, plus the locality and node labels istiod adds, which
/// subsets may select on) and its locality `region/zone/subzone`: the pod label
/// `topology.istio.io/locality` (dots for slashes) wins over the node's topology labels.
pub fn endpoint_labels(
    pod: Option<&PodInfo>,
    node: Option<&str>,
    nodes: &NodeLocality,
) -> (BTreeMap<String, String>, String) {
    let mut labels = pod.map(|p| p.labels.clone()).unwrap_or_default();
    let topology = node.and_then(|n| nodes.get(n));
    let get = |key: &str| topology.and_then(|t| t.get(key)).cloned();
    let locality = match labels.get(LOCALITY_LABEL) {
        Some(l) => l.replace('.', "/"),
        None => {
            let parts = [get(REGION_LABEL), get(ZONE_LABEL), get(SUBZONE_LABEL)];
            let parts: Vec<String> = parts.into_iter().map(Option::unwrap_or_default).collect();
            parts.join("/").trim_end_matches('/').to_string()
        }
    };
    let mut parts = locality.split('/');
    for key in [REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL] {
        if let Some(v) = parts.next().filter(|v| !v.is_empty()) {
            labels.entry(key.into()).or_insert_with(|| v.into());
        }
    }
    if let Some(n) = node {
        labels
            .entry(HOSTNAME_LABEL.into())
            .or_insert_with(|| n.into());
    }
    (labels, locality)
}

#[cfg(test)]
mod tests;
