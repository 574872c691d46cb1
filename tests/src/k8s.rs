//! Kubernetes objects for the test API server, built from `k8s-openapi` types, and a cluster
//! fixture that writes them the way the controllers would (the endpoint controller's
//! EndpointSlices follow pod readiness).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{
            Namespace, Node, ObjectReference, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort,
            ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde_json::Value;

use crate::apiserver::{ApiServer, ENDPOINT_SLICE, Kind, NODE, POD, SERVICE};

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: ns.map(Into::into),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        ..Default::default()
    }
}

fn json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serialize")
}

/// A ClusterIP Service: `ports` are (name, port, targetPort).
pub fn service(ns: &str, name: &str, cluster_ips: &[&str], ports: &[(&str, i32, i32)]) -> Value {
    json(&Service {
        metadata: meta(Some(ns), name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: cluster_ips.first().map(|s| s.to_string()),
            cluster_ips: Some(cluster_ips.iter().map(|s| s.to_string()).collect()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, t)| ServicePort {
                        name: Some(n.to_string()),
                        port: *p,
                        target_port: Some(IntOrString::Int(*t)),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    })
}

/// A running pod with `labels`, service account `sa`, on `node`, at `ip`.
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], sa: &str, node: &str, ip: &str) -> Value {
    json(&Pod {
        metadata: meta(Some(ns), name, labels),
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            node_name: Some(node.into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            pod_ips: Some(vec![PodIP { ip: ip.into() }]),
            ..Default::default()
        }),
    })
}

/// A namespace with `labels`.
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json(&Namespace {
        metadata: meta(None, name, labels),
        ..Default::default()
    })
}

/// A node with topology labels.
pub fn node(name: &str, region: &str, zone: &str) -> Value {
    json(&Node {
        metadata: meta(
            None,
            name,
            &[
                ("topology.kubernetes.io/region", region),
                ("topology.kubernetes.io/zone", zone),
            ],
        ),
        ..Default::default()
    })
}

/// One endpoint of a slice: (address, pod name, ready, terminating).
pub type SliceEndpoint<'a> = (&'a str, &'a str, bool, bool);

/// The EndpointSlice the endpoint controller writes for `service`: `ports` are (name, port).
pub fn endpoint_slice(
    ns: &str,
    name: &str,
    service: &str,
    endpoints: &[SliceEndpoint<'_>],
    ports: &[(&str, i32)],
) -> Value {
    json(&EndpointSlice {
        metadata: meta(Some(ns), name, &[("kubernetes.io/service-name", service)]),
        address_type: "IPv4".into(),
        endpoints: endpoints
            .iter()
            .map(|(ip, pod, ready, terminating)| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(*ready),
                    serving: Some(*ready || *terminating),
                    terminating: Some(*terminating),
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(pod.to_string()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: Some(n.to_string()),
                    port: Some(*p),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
    })
}

/// An Istio resource from YAML (`apiVersion`/`kind` are set by the server from the kind).
pub fn istio(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).expect("istio yaml")
}

/// A pod of a [`Cluster`]: name, labels, address and readiness.
#[derive(Clone, Debug)]
pub struct TestPod {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ip: String,
    pub ready: bool,
    pub terminating: bool,
}

/// One service (`ns/name`, VIP, one port) backed by pods, kept as the controllers would keep
/// it in the API server: the Pods, the Service and one EndpointSlice listing the pods.
pub struct Cluster {
    pub api: ApiServer,
    pub ns: String,
    pub service: String,
    /// (port name, service port, target port).
    pub port: (String, i32, i32),
    pub pods: Vec<TestPod>,
}

impl Cluster {
    /// The walkthrough's `reviews` in namespace `demo` (VIP `vip`, port `http` 9080 → 9080),
    /// with pods `reviews-v1..n` (labels `app: reviews`, `version: vI`) at `ips`.
    pub fn reviews(vip: &str, ips: &[std::net::IpAddr]) -> Self {
        let mut c = Self::new(
            &crate::apiserver::ISTIO,
            "demo",
            "reviews",
            vip,
            ("http", 9080, 9080),
        );
        for (i, ip) in ips.iter().enumerate() {
            let version = format!("v{}", i + 1);
            c.add_pod(
                &format!("reviews-{version}"),
                &[("app", "reviews"), ("version", &version)],
                &ip.to_string(),
            );
        }
        c
    }

    /// A server (serving `istio` kinds), node `node1` and the Service with no pods yet.
    pub fn new(istio: &[Kind], ns: &str, service: &str, vip: &str, port: (&str, i32, i32)) -> Self {
        let api = ApiServer::start(istio);
        api.apply(NODE, node("node1", "region1", "zone1"));
        api.apply(SERVICE, self::service(ns, service, &[vip], &[port]));
        Self {
            api,
            ns: ns.into(),
            service: service.into(),
            port: (port.0.into(), port.1, port.2),
            pods: Vec::new(),
        }
    }

    /// Adds (or replaces) a ready pod and writes the slice.
    pub fn add_pod(&mut self, name: &str, labels: &[(&str, &str)], ip: &str) {
        self.api
            .apply(POD, pod(&self.ns, name, labels, "default", "node1", ip));
        self.pods.retain(|p| p.name != name);
        self.pods.push(TestPod {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ip: ip.into(),
            ready: true,
            terminating: false,
        });
        self.write_slice();
    }

    /// Sets a pod's readiness (and whether it is terminating) and writes the slice.
    pub fn set_ready(&mut self, name: &str, ready: bool, terminating: bool) {
        let p = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .expect("known pod");
        p.ready = ready;
        p.terminating = terminating;
        self.write_slice();
    }

    /// Applies every document of `yaml` whose kind the server serves (as `kubectl apply` with
    /// those CRDs installed would); returns the kinds of the documents left out.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<String> {
        let mut skipped = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("yaml document");
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            match crate::apiserver::ISTIO.iter().find(|k| k.kind == kind) {
                Some(k) => self.api.apply(*k, value),
                None => skipped.push(kind),
            }
        }
        skipped
    }

    /// Writes the EndpointSlice from the pods, as the endpoint controller would.
    pub fn write_slice(&self) {
        let eps: Vec<SliceEndpoint<'_>> = self
            .pods
            .iter()
            .map(|p| (p.ip.as_str(), p.name.as_str(), p.ready, p.terminating))
            .collect();
        let slice = endpoint_slice(
            &self.ns,
            &format!("{}-slice", self.service),
            &self.service,
            &eps,
            &[(&self.port.0, self.port.2)],
        );
        self.api.apply(ENDPOINT_SLICE, slice);
    }
}
