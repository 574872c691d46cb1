use serde_json::json;

use super::*;

fn service(spec: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "reviews", "namespace": "shop",
                     "annotations": {"networking.istio.io/exportTo": ".,istio-system"}},
        "spec": spec,
    }))
    .unwrap()
}

fn slice(endpoints: serde_json::Value, ports: serde_json::Value) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": "reviews-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
    .unwrap()
}

fn pod(labels: serde_json::Value, node: &str) -> PodInfo {
    pod_info(
        &serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop", "labels": labels},
            "spec": {"containers": [], "serviceAccountName": "bookinfo-reviews", "nodeName": node},
            "status": {"podIPs": [{"ip": "198.18.0.5"}], "phase": "Running"},
        }))
        .unwrap(),
    )
}

fn entry(d: Derived) -> (crd::ObjectMeta, crd::ServiceEntrySpec) {
    match d {
        Derived::Entry(e) => *e,
        Derived::Skipped(why) => panic!("skipped: {why}"),
    }
}

fn pods() -> HashMap<(String, String), PodInfo> {
    let mut pods = HashMap::new();
    pods.insert(
        ("shop".into(), "r1".into()),
        pod(json!({"app": "reviews", "version": "v1"}), "n1"),
    );
    pods.insert(
        ("shop".into(), "r2".into()),
        pod(
            json!({"app": "reviews", "version": "v2", "topology.istio.io/locality": "eu.west-1.a"}),
            "n1",
        ),
    );
    pods
}

fn nodes() -> NodeLocality {
    let mut n = NodeLocality::new();
    n.insert(
        "n1".into(),
        [(REGION_LABEL, "us"), (ZONE_LABEL, "us-1"), ("other", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .filter(|(k, _)| k != "other")
            .collect(),
    );
    n
}

#[test]
fn service_becomes_a_service_entry_as_istiod_derives_it() {
    let svc = service(json!({
        "clusterIP": "10.0.0.7", "clusterIPs": ["10.0.0.7", "fd00::7"],
        "ports": [
            {"name": "http-web", "port": 80, "targetPort": "web"},
            {"name": "grpc", "port": 90, "appProtocol": "kubernetes.io/h2c"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ],
    }));
    let s = slice(
        json!([
            {"addresses": ["198.18.0.5"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "r1", "namespace": "shop"}},
            {"addresses": ["198.18.0.6"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "r2", "namespace": "shop"}},
            {"addresses": ["198.18.0.7"], "conditions": {"ready": false, "serving": true, "terminating": true},
             "targetRef": {"kind": "Pod", "name": "r1", "namespace": "shop"}},
            {"addresses": ["198.18.0.8"],
             "targetRef": {"kind": "Pod", "name": "not-seen-yet", "namespace": "shop"}},
        ]),
        json!([{"name": "http-web", "port": 8080}, {"name": "grpc", "port": 9090}]),
    );
    let (meta, spec) = entry(service_entry(
        &svc,
        &[&s],
        &pods(),
        &nodes(),
        "cluster.local",
    ));
    assert_eq!(meta.namespace.as_deref(), Some("shop"));
    assert_eq!(spec.hosts, ["reviews.shop.svc.cluster.local"]);
    assert_eq!(spec.addresses, ["10.0.0.7", "fd00::7"]);
    assert_eq!(spec.export_to, [".", "istio-system"]);
    let ports: Vec<_> = spec
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.number, p.protocol.as_deref()))
        .collect();
    // UDP is not captured; appProtocol wins; a name prefix is left to validation.
    assert_eq!(ports, [("http-web", 80, None), ("grpc", 90, Some("HTTP2"))]);
    // Not ready (draining) and pods not seen yet are out.
    let addrs: Vec<_> = spec.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addrs, ["198.18.0.5", "198.18.0.6"]);
    let e1 = &spec.endpoints[0];
    assert_eq!(e1.ports["http-web"], 8080);
    assert_eq!(e1.ports["grpc"], 9090);
    assert_eq!(e1.service_account, "bookinfo-reviews");
    assert_eq!(e1.labels["version"], "v1");
    assert_eq!(e1.locality, "us/us-1");
    assert_eq!(e1.labels[ZONE_LABEL], "us-1");
    assert_eq!(e1.labels[HOSTNAME_LABEL], "n1");
    // The pod's locality label wins over its node's.
    let e2 = &spec.endpoints[1];
    assert_eq!(e2.locality, "eu/west-1/a");
    assert_eq!(e2.labels[SUBZONE_LABEL], "a");
}

#[test]
fn unnamed_port_and_endpoints_without_pods() {
    let svc = service(json!({"clusterIP": "10.0.0.8", "ports": [{"port": 80}]}));
    let s = slice(
        json!([{"addresses": ["198.18.0.9"]}]),
        json!([{"name": "", "port": 7000}]),
    );
    let (_, spec) = entry(service_entry(
        &svc,
        &[&s],
        &HashMap::new(),
        &NodeLocality::new(),
        "example.org",
    ));
    assert_eq!(spec.hosts, ["reviews.shop.svc.example.org"]);
    assert_eq!(spec.ports[0].name, "port-80");
    assert_eq!(spec.endpoints[0].ports["port-80"], 7000);
    assert_eq!(spec.endpoints[0].service_account, "");
}

#[test]
fn headless_external_name_and_udp_only_are_skipped_with_a_reason() {
    for (spec, reason) in [
        (
            json!({"clusterIP": "None", "ports": [{"port": 80}]}),
            "headless",
        ),
        (
            json!({"type": "ExternalName", "externalName": "db.example"}),
            "ExternalName",
        ),
        (
            json!({"clusterIP": "10.0.0.9", "ports": [{"port": 53, "protocol": "UDP"}]}),
            "no TCP port",
        ),
    ] {
        match service_entry(
            &service(spec),
            &[],
            &HashMap::new(),
            &NodeLocality::new(),
            "cluster.local",
        ) {
            Derived::Skipped(why) => assert!(why.contains(reason), "{why}"),
            Derived::Entry(e) => panic!("converted: {e:?}"),
        }
    }
}
