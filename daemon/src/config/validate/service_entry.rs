//! Istio's rules for `ServiceEntry` and `WorkloadEntry`: hosts, resolution, addresses, ports and
//! endpoints, each problem located at its field. What needs other resources (a workload
//! selector's matches, VIPs shared between entries) is checked when the registry is built.

use std::{collections::HashSet, net::IpAddr};

use super::{Checker, Invalid, Validated};
use crate::config::{
    crd::{self, Resolution},
    policy,
    source::Resource,
};

/// Port protocols Istio accepts on a ServiceEntry (case-insensitive; absent = sniffed).
pub const PROTOCOLS: [&str; 11] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS", "UDP",
];

impl TryFrom<&Resource<crd::ServiceEntrySpec>> for Validated<policy::ServiceEntry> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd::ServiceEntrySpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.service_entry(&res.meta.name, &res.spec);
        c.finish(value)
    }
}

impl TryFrom<&Resource<crd::WorkloadEntrySpec>> for Validated<policy::Endpoint> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd::WorkloadEntrySpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        match c.endpoint("spec", &res.meta.name, &res.spec) {
            Some(value) => c.finish(policy::Endpoint {
                workload: Some(res.meta.name.clone()),
                ..value
            }),
            None => Err(c.invalid()),
        }
    }
}

impl Checker<'_> {
    fn service_entry(&mut self, name: &str, spec: &crd::ServiceEntrySpec) -> policy::ServiceEntry {
        self.hosts(&spec.hosts);
        if !spec.subject_alt_names.is_empty() {
            self.warn(
                "spec.subjectAltNames",
                "subjectAltNames is accepted but not enforced by drover: ISTIO_MUTUAL checks the SPIFFE identity of the endpoint's service account (or the DestinationRule's tls.subjectAltNames)",
            );
        }
        let mut entry = policy::ServiceEntry {
            hosts: spec.hosts.clone(),
            resolution: spec.resolution,
            location: spec.location,
            vips: Vec::new(),
            cidrs: Vec::new(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            workload_selector: spec.workload_selector.as_ref().map(|s| s.labels.clone()),
        };
        if let Some(dns) = dns_name(spec.resolution) {
            self.warn(
                "spec.resolution",
                format!(
                    "resolution {dns} is not built yet; service {:?} is not captured",
                    spec.hosts
                ),
            );
            return entry;
        }
        let resolved = matches!(spec.resolution, Resolution::Dns | Resolution::DnsRoundRobin);
        if spec.resolution == Resolution::None && !spec.endpoints.is_empty() {
            self.err("spec.endpoints", "resolution NONE takes no endpoints");
        }
        if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
            self.err(
                "spec.workloadSelector",
                "workloadSelector and endpoints are mutually exclusive",
            );
        }
        (entry.vips, entry.cidrs) = self.addresses(&spec.addresses);
        entry.ports = self.ports(&spec.ports);
        entry.endpoints = spec
            .endpoints
            .iter()
            .enumerate()
            // Under DNS resolution a host name is resolved by the daemon (and replaced by the
            // addresses it answers); here it is no endpoint yet.
            .filter(|(_, ep)| !resolved || ep.address.parse::<IpAddr>().is_ok())
            .filter_map(|(i, ep)| {
                let name = format!("{name}/endpoints[{i}]");
                self.endpoint(&format!("spec.endpoints[{i}]"), &name, ep)
            })
            .collect();
        entry
    }

    fn hosts(&mut self, hosts: &[String]) {
        if hosts.is_empty() {
            self.err("spec.hosts", "at least one host is required");
        }
        for (i, h) in hosts.iter().enumerate() {
            if h.is_empty() {
                self.err(format!("spec.hosts[{i}]"), "host must not be empty");
            } else if h == "*" {
                self.err(format!("spec.hosts[{i}]"), "host \"*\" is not allowed");
            }
        }
    }

    /// Exact VIPs, and CIDR ranges (network address with its host bits cleared, prefix
    /// length); a full-length prefix is an exact VIP.
    fn addresses(&mut self, addresses: &[String]) -> (Vec<IpAddr>, Vec<(IpAddr, u8)>) {
        let (mut vips, mut cidrs) = (Vec::new(), Vec::new());
        for (i, a) in addresses.iter().enumerate() {
            match super::parse_cidr(a) {
                Some((ip, len)) if len == if ip.is_ipv4() { 32 } else { 128 } => {
                    vips.push(ip.to_canonical());
                }
                Some((ip, len)) => cidrs.push((network(ip.to_canonical(), len), len)),
                None => self.err(
                    format!("spec.addresses[{i}]"),
                    format!("{a:?} is not an IP address or CIDR"),
                ),
            }
        }
        (vips, cidrs)
    }

    fn ports(&mut self, ports: &[crd::ServicePort]) -> Vec<policy::Port> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut numbers = HashSet::new();
        for (i, p) in ports.iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let Some(number) = self.port(&format!("{field}.number"), p.number) else {
                continue;
            };
            let target_port = p.target_port.map_or(Some(number), |t| {
                self.port(&format!("{field}.targetPort"), t)
            });
            if p.name.is_empty() {
                self.err(format!("{field}.name"), "port name is required");
            } else if !names.insert(p.name.clone()) {
                self.err(
                    format!("{field}.name"),
                    format!("duplicate port name {:?}", p.name),
                );
            }
            if !numbers.insert(number) {
                self.err(
                    format!("{field}.number"),
                    format!("duplicate port number {number}"),
                );
            }
            if let Some(proto) = &p.protocol
                && !PROTOCOLS.contains(&proto.to_ascii_uppercase().as_str())
            {
                self.err(
                    format!("{field}.protocol"),
                    format!(
                        "unknown protocol {proto:?} (expected one of {})",
                        PROTOCOLS.join(", ")
                    ),
                );
            }
            out.push(policy::Port {
                name: p.name.clone(),
                number,
                protocol: p
                    .protocol
                    .as_ref()
                    .map(|s| s.to_ascii_uppercase())
                    .or_else(|| protocol_from_name(&p.name)),
                target_port: target_port.unwrap_or(number),
            });
        }
        out
    }

    /// A `WorkloadEntry` spec (of a `WorkloadEntry` or inline in a `ServiceEntry`) at `field`.
    fn endpoint(
        &mut self,
        field: &str,
        name: &str,
        spec: &crd::WorkloadEntrySpec,
    ) -> Option<policy::Endpoint> {
        let address = match spec.address.parse::<IpAddr>() {
            Ok(a) => a.to_canonical(),
            Err(_) => {
                let msg = if spec.address.is_empty() {
                    "address is required".to_string()
                } else {
                    format!(
                        "{:?} is not an IP address (DNS and unix addresses are not supported yet)",
                        spec.address
                    )
                };
                self.err(format!("{field}.address"), msg);
                return None;
            }
        };
        let ports = spec
            .ports
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), self.port(&format!("{field}.ports.{k}"), *v)?)))
            .collect();
        if !spec.network.is_empty() {
            self.warn(
                format!("{field}.network"),
                "network is accepted but not enforced by drover: every endpoint is dialed directly (no multi-network gateways)",
            );
        }
        Some(policy::Endpoint {
            name: name.to_string(),
            address,
            ports,
            labels: spec.labels.clone(),
            weight: spec.weight.filter(|w| *w > 0).unwrap_or(1),
            locality: spec.locality.clone(),
            service_account: spec.service_account.clone(),
            origin: spec.origin.clone(),
            workload: spec.workload_name.clone(),
        })
    }
}

/// `ip` with the bits past `len` cleared.
fn network(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

/// The name of a resolution that is not built (`DYNAMIC_DNS`), `None` for the others (`DNS`
/// and `DNS_ROUND_ROBIN` are resolved by [`crate::dns`]).
fn dns_name(r: Resolution) -> Option<&'static str> {
    match r {
        Resolution::DynamicDns => Some("DYNAMIC_DNS"),
        _ => None,
    }
}

/// Whether a resolution is not built (such services are not captured).
pub fn is_dns(r: Resolution) -> bool {
    dns_name(r).is_some()
}

/// Istio's port-naming convention, `<protocol>[-<suffix>]`, for ports that declare no protocol
/// (`grpc-web` is checked before splitting on `-`). Unknown names stay unknown (opaque TCP).
fn protocol_from_name(name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    if name == "grpc-web" || name.starts_with("grpc-web-") {
        return Some("GRPC-WEB".into());
    }
    let prefix = name.split('-').next().unwrap_or("");
    PROTOCOLS
        .iter()
        .find(|p| p.eq_ignore_ascii_case(prefix))
        .map(|p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_follows_port_names_when_not_declared() {
        let cases = [
            ("http", Some("HTTP")),
            ("http-web", Some("HTTP")),
            ("http2", Some("HTTP2")),
            ("grpc", Some("GRPC")),
            ("grpc-web", Some("GRPC-WEB")),
            ("grpc-web-x", Some("GRPC-WEB")),
            ("grpc-x", Some("GRPC")),
            ("TCP-db", Some("TCP")),
            ("tls", Some("TLS")),
            ("web", None),
            ("httpx", None),
        ];
        for (name, want) in cases {
            assert_eq!(protocol_from_name(name).as_deref(), want, "{name}");
        }
    }
}
