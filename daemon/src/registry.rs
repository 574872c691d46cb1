//! The service registry: `ServiceEntry` and `WorkloadEntry` resources turned into services,
//! ports and endpoints, indexed by the (VIP, port) that capture hands the proxy.
//!
//! A [`Registry`] is an immutable snapshot, validated as a whole when it is built; the proxy
//! reads the current one through [`RegistryHandle`] and never sees a half-applied change.

mod build;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;

use crate::balance::RoundRobin;
pub use crate::config::crd::{Location as MeshLocation, Resolution};

/// A service: one host of a `ServiceEntry`.
#[derive(Debug)]
pub struct Service {
    pub host: String,
    pub namespace: String,
    /// Name of the `ServiceEntry` it came from.
    pub entry: String,
    pub resolution: Resolution,
    pub location: MeshLocation,
    /// Exact VIPs captured for this service.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// A port of a service, with its per-port endpoint set.
#[derive(Debug)]
pub struct ServicePort {
    pub name: String,
    pub number: u16,
    /// Upper-cased protocol as written (`HTTP`, `TCP`, …), if any.
    pub protocol: Option<String>,
    /// Port on the endpoint when the endpoint does not name one; defaults to `number`.
    pub target_port: u16,
    /// (index into `Service::endpoints`, address to dial) for every endpoint of this port.
    pub targets: Vec<(usize, SocketAddr)>,
    pub balancer: RoundRobin,
}

/// One workload instance behind a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `WorkloadEntry` name, or `<serviceentry>/endpoints[i]` for inline endpoints.
    pub name: String,
    pub address: IpAddr,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    /// Load-balancing weight (0 in the YAML becomes 1).
    pub weight: u32,
    pub locality: String,
    pub service_account: String,
}

/// Where a captured connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Dial this endpoint.
    Endpoint { index: usize, addr: SocketAddr },
    /// `resolution: NONE`: dial the original destination (port possibly overridden by `targetPort`).
    Passthrough(SocketAddr),
}

/// An immutable, validated snapshot of all services.
#[derive(Debug, Default)]
pub struct Registry {
    services: Vec<Service>,
    by_vip: HashMap<SocketAddr, (usize, usize)>,
}

/// Cloneable handle to the current [`Registry`] snapshot.
#[derive(Clone, Debug)]
pub struct RegistryHandle {
    current: Arc<ArcSwap<Registry>>,
}

// === impl Registry ===

impl Registry {
    /// Every service, in configuration order.
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Every captured (VIP, port) with the index of its service.
    pub fn vips(&self) -> impl Iterator<Item = (SocketAddr, usize)> + '_ {
        self.by_vip.iter().map(|(addr, (svc, _))| (*addr, *svc))
    }

    /// The service and port that own a captured original destination.
    pub fn lookup(&self, orig: SocketAddr) -> Option<(&Service, &ServicePort)> {
        let orig = SocketAddr::new(orig.ip().to_canonical(), orig.port());
        let (s, p) = *self.by_vip.get(&orig)?;
        let svc = &self.services[s];
        Some((svc, &svc.ports[p]))
    }

    /// Picks where a new connection to `orig` goes (round robin over the port's endpoints).
    pub fn pick(&self, orig: SocketAddr) -> Option<(&Service, &ServicePort, Option<Target>)> {
        let (svc, port) = self.lookup(orig)?;
        let target = match svc.resolution {
            Resolution::None => Some(Target::Passthrough(SocketAddr::new(
                orig.ip().to_canonical(),
                port.target_port,
            ))),
            _ => port.balancer.pick(port.targets.len()).map(|i| {
                let (index, addr) = port.targets[i];
                Target::Endpoint { index, addr }
            }),
        };
        Some((svc, port, target))
    }
}

// === impl RegistryHandle ===

impl RegistryHandle {
    pub fn new(registry: Registry) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(registry)),
        }
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Registry> {
        self.current.load_full()
    }

    /// Replaces the snapshot atomically; readers holding the old one keep it until they drop it.
    pub fn store(&self, registry: Registry) {
        self.current.store(Arc::new(registry));
    }
}
