//! Fixtures shared by the in-process tests and the fuzz targets: the two-endpoint service they
//! route to and the snapshot built from YAML. Not used by the daemon itself.

use std::{path::PathBuf, sync::Arc};

use crate::{
    config::source::ConfigSet,
    registry::{Client, Registry},
};

/// A `ServiceEntry` `host` (namespace `default`) at `vip` (`ip:port`), its port named `name`
/// with `protocol`, to endpoints `127.0.0.2` (labels `v: one`) and `127.0.0.3` (`v: two`) on
/// `target_port`.
pub fn two_endpoint_service(
    host: &str,
    vip: &str,
    (name, protocol): (&str, &str),
    target_port: u16,
) -> String {
    let (ip, number) = vip.rsplit_once(':').expect("ip:port");
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {host}, namespace: default}}
spec:
  hosts: [{host}]
  addresses: [{ip}]
  ports: [{{number: {number}, name: {name}, protocol: {protocol}, targetPort: {target_port}}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.2, labels: {{v: one}}}}
  - {{address: 127.0.0.3, labels: {{v: two}}}}
"
    )
}

/// A VirtualService `web` for `web.default.svc` with `http` (its routes, a YAML list indented
/// by two), as a document that follows another.
pub fn virtual_service(http: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.default.svc]
  http:
{http}"
    )
}

/// The snapshot of `yaml` as the default client sees it (panics on any problem).
pub fn registry(yaml: &str) -> Registry {
    let mut set = ConfigSet::default();
    let mut problems = Vec::new();
    set.add_text(Arc::new(PathBuf::from("test.yaml")), yaml, &mut problems);
    assert!(problems.is_empty(), "{problems:?}\n{yaml}");
    Registry::build(&set, &Client::default())
        .unwrap_or_else(|r| panic!("invalid test configuration: {:?}", r.errors))
}
