//! Routing: captured (VIP, port) → service → VirtualService route (first match wins, weighted
//! destination; Gateway API routes arrive here already ordered by their precedence) → cluster
//! `(host, port, subset)` → endpoint.
//!
//! HTTP ports are routed per request ([`Registry::route_request`]): every `HTTPMatchRequest`
//! condition is evaluated and hash keys come from the request. Other ports are routed once per
//! connection ([`Registry::route`]) before any byte is read, so only `port`, `sourceLabels`,
//! `sourceNamespace` and TCP `destinationSubnets` apply there.

use crate::access::ResponseFlag;
use std::net::{IpAddr, SocketAddr};

use super::{Cluster, Registry, Resolution, Service, VsEntry, resolve};
use crate::{
    balance::{PickContext, key_hash},
    config::policy::{self, Algorithm, HashKey, WeightedDestination},
};

/// Where a captured connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Dial this endpoint (index into the cluster's service's endpoints).
    Endpoint { index: usize, addr: SocketAddr },
    /// `resolution: NONE` or `PASSTHROUGH`: dial the original destination (port possibly
    /// overridden by `targetPort`).
    Passthrough(SocketAddr),
}

/// The parts of an HTTP request that routing and hashing look at.
pub struct Request<'a> {
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a hyper::HeaderMap,
    /// `remote+local` addresses of the downstream connection: the seed of generated cookies.
    pub connection: &'a str,
}

/// A routing decision.
#[derive(Debug)]
pub struct Decision<'a> {
    /// The service the client dialed.
    pub service: &'a Service,
    pub cluster: &'a Cluster,
    pub target: Target,
    /// `namespace/name http[i]` of the VirtualService route used, if any.
    pub route: Option<String>,
    /// The HTTP route used, if any (its `retries`, `timeout`, `headers`, `rewrite` and `fault`
    /// apply; with a `local` reply the proxy answers itself and `target` is not dialed).
    pub http_route: Option<&'a policy::HttpRoute>,
    /// The route's match that matched (absent: the route matches everything).
    pub http_match: Option<&'a policy::HttpMatch>,
    /// The route destination chosen (its `headers` apply after the route's).
    pub destination: Option<&'a WeightedDestination>,
    /// `Set-Cookie` value to add to the response (a hash cookie with a `ttl` was absent).
    pub set_cookie: Option<String>,
    /// Index of the pick in the cluster's balancer (for its active-request count).
    pub pick: Option<usize>,
}

/// Why a connection could not be routed, with Envoy's response flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{0} is not a captured service address")]
    NotCaptured(SocketAddr),
    #[error("no route of VirtualService {vs} matches this connection")]
    NoRouteMatched { vs: String },
    #[error(transparent)]
    UnknownSubset(#[from] resolve::UnknownSubset),
    #[error("route destination {host}:{port} is not a known service port")]
    UnknownDestination { host: String, port: u16 },
    #[error("no healthy upstream in {cluster}")]
    NoEndpoint { cluster: String },
    /// A Gateway API backend that cannot be used (the spec answers 500).
    #[error("backend {host} cannot be used: {reason}")]
    InvalidBackend { host: String, reason: String },
}

// === impl RouteError ===

impl RouteError {
    /// Envoy's access-log response flag.
    pub fn response_flag(&self) -> ResponseFlag {
        match self {
            RouteError::NotCaptured(_) | RouteError::NoRouteMatched { .. } => ResponseFlag::NoRoute,
            RouteError::UnknownSubset(_)
            | RouteError::UnknownDestination { .. }
            | RouteError::InvalidBackend { .. } => ResponseFlag::NoClusterFound,
            RouteError::NoEndpoint { .. } => ResponseFlag::NoHealthyUpstream,
        }
    }

    /// The status Envoy answers an HTTP request with.
    pub fn http_status(&self) -> u16 {
        match self {
            RouteError::NotCaptured(_) | RouteError::NoRouteMatched { .. } => 404,
            RouteError::InvalidBackend { .. } => 500,
            _ => 503,
        }
    }
}

// === impl Registry ===

impl Registry {
    /// Routes a new connection from `src` to `orig`, picking the endpoint (per connection: only a
    /// `useSourceIp` hash key exists at this point; other hash keys fall back to random).
    /// A connection cannot be answered with an HTTP reply: a route the proxy answers itself
    /// counts as no route here.
    pub fn route(&self, orig: SocketAddr, src: Option<IpAddr>) -> Result<Decision<'_>, RouteError> {
        self.route_tls(orig, src, None)
    }

    /// Like [`Registry::route`], for a connection whose ClientHello named `sni`: `tls` routes
    /// (by `sniHosts`) come before `tcp` routes on TLS and HTTPS ports.
    pub fn route_tls(
        &self,
        orig: SocketAddr,
        src: Option<IpAddr>,
        sni: Option<&str>,
    ) -> Result<Decision<'_>, RouteError> {
        let d = self.route_with(orig, src, Connection { req: None, sni })?;
        match (d.http_route, &d.route) {
            (Some(r), Some(name)) if r.local.is_some() => {
                Err(RouteError::NoRouteMatched { vs: name.clone() })
            }
            _ => Ok(d),
        }
    }

    /// Routes one HTTP request on a connection from `src` to `orig`.
    pub fn route_request(
        &self,
        orig: SocketAddr,
        src: Option<IpAddr>,
        req: &Request<'_>,
    ) -> Result<Decision<'_>, RouteError> {
        self.route_with(
            orig,
            src,
            Connection {
                req: Some(req),
                sni: None,
            },
        )
    }

    fn route_with(
        &self,
        orig: SocketAddr,
        src: Option<IpAddr>,
        Connection { req, sni }: Connection<'_, '_>,
    ) -> Result<Decision<'_>, RouteError> {
        let orig = SocketAddr::new(orig.ip().to_canonical(), orig.port());
        let (s, p) = self.owner(orig).ok_or(RouteError::NotCaptured(orig))?;
        let service = &self.services[s];
        let port = &service.ports[p];
        let default = || {
            self.cluster(s, port.number, None)
                .expect("every service port has a default cluster")
        };
        let (dest, route, http_route, http_match) = match self.virtual_service_for(&service.host) {
            None => (None, None, None, None),
            Some(vs) => {
                let on = Connection { req, sni };
                match self.l4_route(vs, port.number, port.protocol.as_deref(), orig.ip(), on) {
                    Routed::Default => (None, None, None, None),
                    Routed::To(d, name, r, m) => (Some(d), Some(name), r, m),
                    Routed::Local(name, r, m) => {
                        // Answered by the proxy: nothing is picked or dialed.
                        return Ok(Decision {
                            service,
                            cluster: default(),
                            target: Target::Passthrough(orig),
                            route: Some(name),
                            http_route: Some(r),
                            http_match: m,
                            destination: None,
                            set_cookie: None,
                            pick: None,
                        });
                    }
                    Routed::NoMatch => {
                        return Err(RouteError::NoRouteMatched {
                            vs: vs.source.id.clone(),
                        });
                    }
                }
            }
        };
        let cluster = match dest {
            None => default(),
            Some(d) => self.destination_cluster(d, port.number)?,
        };
        let mut set_cookie = None;
        let (target, pick) = self.target(cluster, orig, src, req, &mut set_cookie)?;
        Ok(Decision {
            service,
            cluster,
            target,
            route,
            http_route,
            http_match,
            destination: dest,
            set_cookie,
            pick,
        })
    }

    /// Where a routed request or connection goes in `cluster`: the original destination (on the
    /// cluster's port) for `PASSTHROUGH` and `resolution: NONE`, else the endpoint the balancer
    /// picks (with the request's hash key, generating its cookie into `set_cookie` when needed).
    fn target(
        &self,
        cluster: &Cluster,
        orig: SocketAddr,
        src: Option<IpAddr>,
        req: Option<&Request<'_>>,
        set_cookie: &mut Option<String>,
    ) -> Result<(Target, Option<usize>), RouteError> {
        let dsvc = &self.services[cluster.service];
        let passthrough = dsvc.resolution == Resolution::None
            || matches!(
                cluster.policy.load_balancer.value,
                Some(policy::LoadBalancer {
                    algorithm: Algorithm::Passthrough,
                    ..
                })
            );
        if passthrough {
            let tp = dsvc
                .ports
                .iter()
                .find(|p| p.number == cluster.port)
                .map_or(orig.port(), |p| p.target_port);
            return Ok((Target::Passthrough(SocketAddr::new(orig.ip(), tp)), None));
        }
        let hash = match (cluster.hash_key(), src, req) {
            (Some(HashKey::SourceIp), Some(ip), _) => {
                Some(key_hash(ip.to_canonical().to_string().as_bytes()))
            }
            (Some(key), _, Some(req)) => request_hash(key, req, set_cookie),
            _ => None,
        };
        let picked = match &cluster.outlier {
            None => cluster.balancer.pick(PickContext { hash }),
            Some(od) => od.pick(&cluster.balancer, PickContext { hash }),
        };
        let i = picked.ok_or_else(|| RouteError::NoEndpoint {
            cluster: cluster.name.clone(),
        })?;
        Ok((cluster.target(i), Some(i)))
    }

    /// Whether a connection to `orig` needs its TLS server name to be routed: a TLS or HTTPS
    /// port of a service whose VirtualService has `tls` routes.
    pub fn needs_sni(&self, orig: SocketAddr) -> bool {
        let Some((svc, port)) = self.lookup(orig) else {
            return false;
        };
        is_tls(port.protocol.as_deref())
            && self
                .virtual_service_for(&svc.host)
                .is_some_and(|vs| !vs.vs.tls.is_empty())
    }

    /// The VirtualService that applies to `host` for this client: visible, bound to `mesh`, most
    /// specific host match; on a tie a Gateway API consumer route (one of the client's
    /// namespace) wins, then between Gateway API routes and a VirtualService the older (as
    /// Istio orders them), else the first in configuration order.
    pub fn virtual_service_for(&self, host: &str) -> Option<&VsEntry> {
        let consumer = |v: &VsEntry| v.gateway.as_ref().is_some_and(|g| g.consumer);
        let wins = |a: &VsEntry, b: &VsEntry| match (consumer(a), consumer(b)) {
            (true, false) => true,
            (false, true) => false,
            _ => (a.gateway.is_some() != b.gateway.is_some()) && a.age < b.age,
        };
        let mut best: Option<(&VsEntry, usize)> = None;
        for vs in self.virtual_services.iter() {
            if !vs.vs.applies_to_mesh || !vs.vs.export_to.visible_to(&self.client.namespace) {
                continue;
            }
            let score = vs
                .vs
                .hosts
                .iter()
                .filter_map(|h| resolve::host_match(h, host))
                .max();
            if let Some(score) = score
                && best.is_none_or(|(b, s)| score > s || (score == s && wins(vs, b)))
            {
                best = Some((vs, score));
            }
        }
        best.map(|b| b.0)
    }

    /// The cluster a route destination names; `arrival` is the port the client dialed.
    /// Where a mirrored copy of a request to `orig` goes: the mirror destination's cluster and
    /// an endpoint its balancer picks (a request with no hash key: random for hash balancers).
    pub fn mirror_target(
        &self,
        d: &WeightedDestination,
        orig: SocketAddr,
    ) -> Result<(&Cluster, Target, Option<usize>), RouteError> {
        let cluster = self.destination_cluster(d, orig.port())?;
        let (target, pick) = self.target(cluster, orig, None, None, &mut None)?;
        Ok((cluster, target, pick))
    }

    pub fn destination_cluster(
        &self,
        d: &WeightedDestination,
        arrival: u16,
    ) -> Result<&Cluster, RouteError> {
        if let Some(reason) = &d.invalid {
            return Err(RouteError::InvalidBackend {
                host: d.host.clone(),
                reason: reason.clone(),
            });
        }
        let unknown = |port| RouteError::UnknownDestination {
            host: d.host.clone(),
            port,
        };
        let (ds, dsvc) = self.service(&d.host).ok_or_else(|| unknown(arrival))?;
        let port = d.port.unwrap_or(match dsvc.ports.as_slice() {
            [only] => only.number,
            _ => arrival,
        });
        if !dsvc.ports.iter().any(|p| p.number == port) {
            return Err(unknown(port));
        }
        match self.cluster(ds, port, d.subset.as_deref()) {
            Some(c) => Ok(c),
            None => Err(RouteError::UnknownSubset(resolve::UnknownSubset {
                host: d.host.clone(),
                subset: d.subset.clone().unwrap_or_default(),
            })),
        }
    }

    fn l4_route<'v>(
        &self,
        vs: &'v VsEntry,
        port: u16,
        protocol: Option<&str>,
        dst: IpAddr,
        Connection { req, sni }: Connection<'_, '_>,
    ) -> Routed<'v> {
        let client = &self.client;
        let source_ok = |labels: &std::collections::BTreeMap<String, String>,
                         ns: &Option<String>| {
            resolve::selects(labels, &client.labels)
                && ns.as_ref().is_none_or(|n| *n == client.namespace)
        };
        // Gateway API routes bound to other ports of the service leave this one to the
        // service's own routing (a parentRef `port` limits the route to that port).
        let bound_here =
            |r: &policy::HttpRoute| r.matches.iter().any(|m| m.port.is_none_or(|p| p == port));
        if vs.gateway.is_some() && !vs.vs.http.iter().any(bound_here) && vs.vs.tcp.is_empty() {
            return Routed::Default;
        }
        if is_http(protocol) {
            for r in &vs.vs.http {
                let matched = r.matches.iter().find(|m| {
                    m.port.is_none_or(|p| p == port)
                        && source_ok(&m.source_labels, &m.source_namespace)
                        && match req {
                            Some(req) => request_matches(m, req),
                            None => !needs_request(m),
                        }
                });
                if r.matches.is_empty() || matched.is_some() {
                    let name = (r.label.clone())
                        .unwrap_or_else(|| format!("{} http[{}]", vs.source.id, r.index));
                    if r.local.is_some() {
                        return Routed::Local(name, r, matched);
                    }
                    return match weighted(&r.destinations) {
                        Some(d) => Routed::To(d, name, Some(r), matched),
                        None => Routed::NoMatch,
                    };
                }
            }
            return if vs.vs.http.is_empty() {
                Routed::Default
            } else {
                Routed::NoMatch
            };
        }
        let l4_ok = |m: &policy::L4Match| {
            m.port.is_none_or(|p| p == port)
                && source_ok(&m.source_labels, &m.source_namespace)
                && (m.destination_subnets.is_empty()
                    || m.destination_subnets.iter().any(|n| in_subnet(dst, *n)))
        };
        if is_tls(protocol)
            && let Some(sni) = sni
        {
            for r in &vs.vs.tls {
                let applies = r
                    .matches
                    .iter()
                    .any(|m| l4_ok(m) && m.sni_hosts.iter().any(|h| sni_matches(h, sni)));
                if applies && let Some(d) = weighted(&r.destinations) {
                    return Routed::To(d, format!("{} tls[{}]", vs.source.id, r.index), None, None);
                }
            }
        }
        match self.tcp_route(vs, port, dst) {
            Some(r) => match weighted(&r.destinations) {
                Some(d) => {
                    let name = (r.label.clone())
                        .unwrap_or_else(|| format!("{} tcp[{}]", vs.source.id, r.index));
                    Routed::To(d, name, None, None)
                }
                None => Routed::Default,
            },
            None => Routed::Default,
        }
    }

    /// The first `tcp` route of `vs` whose match holds for this client on `port` to `dst`.
    fn tcp_route<'v>(
        &self,
        vs: &'v VsEntry,
        port: u16,
        dst: IpAddr,
    ) -> Option<&'v policy::L4Route> {
        let client = &self.client;
        let l4_ok = |m: &policy::L4Match| {
            m.port.is_none_or(|p| p == port)
                && resolve::selects(&m.source_labels, &client.labels)
                && m.source_namespace
                    .as_ref()
                    .is_none_or(|n| *n == client.namespace)
                && (m.destination_subnets.is_empty()
                    || m.destination_subnets.iter().any(|n| in_subnet(dst, *n)))
        };
        vs.vs.tcp.iter().find(|r| {
            (r.matches.is_empty() || r.matches.iter().any(l4_ok)) && !r.destinations.is_empty()
        })
    }

    /// Every cluster a plain-TCP connection to `orig` may go to, with its route weight (the
    /// service's default cluster with weight 1 when no `tcp` route applies). The choice among
    /// them depends on nothing the connection carries, which is what lets the kernel make it.
    pub fn tcp_destinations(&self, orig: SocketAddr) -> Result<Vec<(&Cluster, u32)>, RouteError> {
        let orig = SocketAddr::new(orig.ip().to_canonical(), orig.port());
        let (s, p) = self.owner(orig).ok_or(RouteError::NotCaptured(orig))?;
        let port = self.services[s].ports[p].number;
        let route = self
            .virtual_service_for(&self.services[s].host)
            .and_then(|vs| self.tcp_route(vs, port, orig.ip()));
        match route {
            None => Ok(vec![(
                self.cluster(s, port, None)
                    .expect("every service port has a default cluster"),
                1,
            )]),
            Some(r) => r
                .destinations
                .iter()
                .map(|d| Ok((self.destination_cluster(d, port)?, d.weight)))
                .collect(),
        }
    }
}

// === impl Cluster ===

impl Cluster {
    /// Whether a connection to `ep` is mutual TLS with mesh identities (the peer's principal is
    /// then known): `ISTIO_MUTUAL`, or auto mTLS / HBONE to a workload in the mesh.
    pub fn proves_identity(&self, ep: &crate::config::policy::Endpoint) -> bool {
        let istio_mutual =
            (self.tls.as_ref()).is_some_and(|t| t.mode == policy::TlsMode::IstioMutual);
        let in_mesh = ep.labels.get(super::TLS_MODE_LABEL).map(String::as_str) == Some("istio");
        let hbone = self.hbone.is_some() && crate::hbone::speaks_hbone(&ep.labels);
        istio_mutual || (self.auto_tls.is_some() && in_mesh) || hbone
    }

    /// The consistent-hash key of the effective balancer, if it hashes.
    pub fn hash_key(&self) -> Option<&HashKey> {
        match &self.policy.load_balancer.value.as_ref()?.algorithm {
            Algorithm::ConsistentHash(ch) => Some(&ch.key),
            _ => None,
        }
    }

    /// The endpoint for a retry after the endpoints in `tried` failed: another one when the
    /// cluster has one that may take traffic and `avoid_tried` (Envoy's previous-hosts
    /// predicate, which Istio sets unless `retryIgnorePreviousHosts: false` or the cluster
    /// hashes — then the retry goes back to the hashed endpoint); else any endpoint.
    pub fn repick(&self, tried: &[usize], avoid_tried: bool) -> Option<usize> {
        let last = *tried.last()?;
        if self.hash_key().is_some() {
            return Some(last);
        }
        let fresh = |i: usize| !avoid_tried || !tried.contains(&i);
        let cx = PickContext::default();
        let picked = match &self.outlier {
            None => self.balancer.pick_with(cx, fresh),
            Some(od) => od.pick_where(&self.balancer, cx, fresh),
        };
        Some(picked.unwrap_or(last))
    }

    /// The TLS to originate to member `pick`: the cluster's `tls`, else auto mTLS when the
    /// member has a mesh identity; `None`: plaintext.
    pub fn origination_for(
        &self,
        pick: Option<usize>,
    ) -> Option<&std::sync::Arc<crate::tls::Origination>> {
        self.tls.as_ref().or_else(|| {
            pick.filter(|i| self.members.get(*i).is_some_and(|m| m.mesh && !m.hbone))
                .and(self.auto_tls.as_ref())
        })
    }

    /// The HBONE tunnel to member `pick`, when it is reached over HBONE (and the cluster has no
    /// `tls` of its own).
    pub fn hbone_for(&self, pick: Option<usize>) -> Option<&std::sync::Arc<crate::hbone::Target>> {
        pick.filter(|i| self.members.get(*i).is_some_and(|m| m.hbone))
            .and(self.hbone.as_ref())
    }

    /// Where endpoint `i` of the balancer is: (endpoint index in the service, address).
    pub fn target(&self, i: usize) -> Target {
        let m = &self.members[i];
        Target::Endpoint {
            index: m.endpoint,
            addr: m.addr,
        }
    }
}

enum Routed<'v> {
    /// No route applies to this kind of traffic: the service's default cluster.
    Default,
    /// A destination, the route's name and, for HTTP, the route (retries, timeout) and the
    /// match that matched.
    To(
        &'v WeightedDestination,
        String,
        Option<&'v policy::HttpRoute>,
        Option<&'v policy::HttpMatch>,
    ),
    /// An HTTP route the proxy answers itself (`redirect`, `directResponse`).
    Local(String, &'v policy::HttpRoute, Option<&'v policy::HttpMatch>),
    /// The VirtualService claims the host but no route matches (Envoy: 404, `NR`).
    NoMatch,
}

/// What a route may look at besides the addresses: the HTTP request, or a TLS server name.
#[derive(Clone, Copy)]
struct Connection<'r, 'q> {
    req: Option<&'r Request<'q>>,
    sni: Option<&'r str>,
}

/// Ports whose traffic Istio routes with `tls` routes (by SNI) before `tcp` routes.
pub fn is_tls(protocol: Option<&str>) -> bool {
    matches!(protocol, Some("TLS" | "HTTPS"))
}

/// `sniHosts` matching as Envoy's `server_names`: exact (case-insensitive), or `*.suffix`
/// for any name ending in `.suffix`; `*` alone matches every name.
fn sni_matches(pattern: &str, sni: &str) -> bool {
    let (p, s) = (pattern.to_ascii_lowercase(), sni.to_ascii_lowercase());
    match p.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => suffix.starts_with('.') && s.ends_with(suffix) && s.len() > suffix.len(),
        None => p == s,
    }
}

/// Ports whose traffic Istio routes with `http` routes.
pub fn is_http(protocol: Option<&str>) -> bool {
    matches!(protocol, Some("HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB"))
}

/// Ports whose upstream speaks HTTP/2 (prior knowledge) without any DestinationRule.
pub fn is_h2(protocol: Option<&str>) -> bool {
    matches!(protocol, Some("HTTP2" | "GRPC" | "GRPC-WEB"))
}

/// Whether a match has conditions only a request can answer.
pub fn needs_request(m: &policy::HttpMatch) -> bool {
    m.uri.is_some()
        || m.scheme.is_some()
        || m.method.is_some()
        || m.authority.is_some()
        || !m.headers.is_empty()
        || !m.without_headers.is_empty()
        || !m.query_params.is_empty()
}

/// Whether the request-time conditions of a match hold (all ANDed).
fn request_matches(m: &policy::HttpMatch, req: &Request<'_>) -> bool {
    let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
    let opt = |sm: &Option<policy::StringMatch>, v: &str| {
        sm.as_ref().is_none_or(|sm| sm.matches(v, false))
    };
    m.uri
        .as_ref()
        .is_none_or(|u| u.matches(req.path, m.ignore_uri_case))
        && opt(&m.scheme, req.scheme)
        && opt(&m.method, req.method)
        && opt(&m.authority, req.authority)
        && m.headers.iter().all(|(name, sm)| match (header(name), sm) {
            (Some(_), None) => true,
            (Some(v), Some(sm)) => sm.matches(v, false),
            (None, _) => false,
        })
        && m.without_headers.iter().all(|(name, sm)| match sm {
            None => header(name).is_none(),
            Some(sm) => !sm.matches(header(name).unwrap_or(""), false),
        })
        && m.query_params
            .iter()
            .all(|(name, sm)| match (query_param(req.query, name), sm) {
                (Some(_), None) => true,
                (Some(v), Some(sm)) => sm.matches(&v, false),
                (None, _) => false,
            })
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The hash of the request's consistent-hash key. A cookie key with a `ttl` that the request
/// lacks is generated (from the connection's addresses, as Envoy does) and returned in
/// `set_cookie`; other absent keys give `None` (random pick).
fn request_hash(key: &HashKey, req: &Request<'_>, set_cookie: &mut Option<String>) -> Option<u64> {
    match key {
        HashKey::Header(name) => req
            .headers
            .get(name.as_str())
            .map(|v| key_hash(v.as_bytes())),
        HashKey::QueryParameter(name) => {
            query_param(req.query, name).map(|v| key_hash(v.as_bytes()))
        }
        HashKey::SourceIp => None,
        HashKey::Cookie {
            name,
            path,
            ttl,
            attributes,
        } => {
            let present = req
                .headers
                .get_all(hyper::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(cookie::Cookie::split_parse)
                .filter_map(Result::ok)
                .find(|c| c.name() == name)
                .map(|c| c.value().trim_matches('"').to_string());
            if let Some(v) = present {
                return Some(key_hash(v.as_bytes()));
            }
            let ttl = (*ttl)?;
            let value = format!("{:016x}", key_hash(req.connection.as_bytes()));
            let mut header = format!("{name}=\"{value}\"");
            if !ttl.is_zero() {
                header.push_str(&format!("; Max-Age={}", ttl.as_secs()));
            }
            if let Some(p) = path {
                header.push_str(&format!("; Path={p}"));
            }
            for (k, v) in attributes {
                match v {
                    Some(v) => header.push_str(&format!("; {k}={v}")),
                    None => header.push_str(&format!("; {k}")),
                }
            }
            header.push_str("; HttpOnly");
            *set_cookie = Some(header);
            Some(key_hash(value.as_bytes()))
        }
    }
}

/// Random choice proportional to weight (weights are relative, as in Istio ≥ 1.15).
fn weighted(dests: &[WeightedDestination]) -> Option<&WeightedDestination> {
    let total: u64 = dests.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return dests.first();
    }
    let mut roll = fastrand::u64(0..total);
    for d in dests {
        let w = u64::from(d.weight);
        if roll < w {
            return Some(d);
        }
        roll -= w;
    }
    None
}

pub(super) fn in_subnet(ip: IpAddr, (net, len): (IpAddr, u8)) -> bool {
    match (ip.to_canonical(), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    //! Per-request routing and hashing over a built snapshot, no I/O.

    use super::*;
    use crate::testing::{two_endpoint_service, virtual_service};

    const VIP: &str = "127.77.0.10:80";

    /// `web` (HTTP, endpoints `one` at .2 and `two` at .3), with `rules`.
    fn registry(rules: &str) -> Registry {
        let service = two_endpoint_service("web.default.svc", VIP, ("http", "HTTP"), 80);
        let rules = rules.strip_prefix("---\n").unwrap_or(rules);
        crate::testing::registry(&format!("{service}---\n{rules}"))
    }

    const SUBSETS: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc
  subsets: [{name: one, labels: {v: one}}, {name: two, labels: {v: two}}]
";

    /// A request `method path?query` with `headers`.
    fn request<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a hyper::HeaderMap,
    ) -> Request<'a> {
        Request {
            method,
            scheme: "http",
            authority: "web.default.svc",
            path,
            query,
            headers,
            connection: "127.0.0.1:40000127.77.0.10:80",
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> hyper::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    hyper::header::HeaderName::from_static(k),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    /// The cluster and route a request goes to.
    fn routed(reg: &Registry, req: &Request<'_>) -> Result<(String, Option<String>), RouteError> {
        let d = reg.route_request(VIP.parse().unwrap(), None, req)?;
        Ok((d.cluster.name.clone(), d.route))
    }

    #[test]
    fn first_matching_http_route_wins_with_every_condition_anded() {
        let reg = registry(&(SUBSETS.to_string()
            + &virtual_service(
                "  - match: [{uri: {prefix: /api}, method: {exact: POST}, headers: {x-canary: {exact: 'yes'}}}]
    route: [{destination: {host: web.default.svc, subset: two}}]
  - match: [{queryParams: {v: {regex: 't.*'}}}, {withoutHeaders: {cookie: {}}, uri: {exact: /login}}]
    route: [{destination: {host: web.default.svc, subset: two}}]
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: web.default.svc, subset: one}}]
",
            )));
        let (one, two) = (
            "outbound|80|one|web.default.svc",
            "outbound|80|two|web.default.svc",
        );
        let canary = headers(&[("x-canary", "yes")]);
        let none = headers(&[]);
        let cookie = headers(&[("cookie", "a=b")]);
        let cases = [
            (request("POST", "/api/x", None, &canary), two, 0),
            // One condition short: the next route.
            (request("GET", "/api/x", None, &canary), one, 2),
            (request("POST", "/api/x", None, &none), one, 2),
            (request("GET", "/x", Some("v=two"), &none), two, 1),
            (request("GET", "/x", Some("v=one"), &none), one, 2),
            (request("GET", "/login", None, &none), two, 1),
            (request("GET", "/login", None, &cookie), one, 2),
        ];
        for (req, cluster, index) in cases {
            let (c, route) = routed(&reg, &req).unwrap();
            assert_eq!(c, cluster, "{} {} {:?}", req.method, req.path, req.query);
            assert_eq!(route.unwrap(), format!("default/web http[{index}]"));
        }
    }

    #[test]
    fn no_matching_route_and_unknown_subset_are_envoy_errors() {
        let reg = registry(&virtual_service(
            "  - match: [{uri: {exact: /only}}]
    route: [{destination: {host: web.default.svc, subset: missing}}]
",
        ));
        let none = headers(&[]);
        let e = routed(&reg, &request("GET", "/other", None, &none)).unwrap_err();
        assert_eq!(
            e,
            RouteError::NoRouteMatched {
                vs: "default/web".into()
            }
        );
        assert_eq!(
            (e.http_status(), e.response_flag()),
            (404, ResponseFlag::NoRoute)
        );
        let e = routed(&reg, &request("GET", "/only", None, &none)).unwrap_err();
        assert!(matches!(e, RouteError::UnknownSubset(_)), "{e:?}");
        assert_eq!(
            (e.http_status(), e.response_flag()),
            (503, ResponseFlag::NoClusterFound)
        );
    }

    /// The decision for `GET /` with `headers`.
    fn get<'r>(reg: &'r Registry, headers: &hyper::HeaderMap) -> Decision<'r> {
        reg.route_request(
            VIP.parse().unwrap(),
            None,
            &request("GET", "/", None, headers),
        )
        .unwrap()
    }

    /// The endpoint indexes `n` requests with `headers` and `query` are sent to.
    fn picks(
        reg: &Registry,
        headers: &hyper::HeaderMap,
        query: Option<&str>,
        n: usize,
    ) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let d = reg
                    .route_request(
                        VIP.parse().unwrap(),
                        None,
                        &request("GET", "/", query, headers),
                    )
                    .unwrap();
                match d.target {
                    Target::Endpoint { index, .. } => index,
                    Target::Passthrough(_) => panic!("not a passthrough service"),
                }
            })
            .collect()
    }

    fn hashing(key: &str) -> Registry {
        registry(&format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: default}}
spec:
  host: web.default.svc
  trafficPolicy: {{loadBalancer: {{consistentHash: {{{key}}}}}}}
"
        ))
    }

    #[test]
    fn hash_keys_come_from_the_request() {
        let reg = hashing("httpHeaderName: x-user");
        let spread = |v: &[usize]| v.iter().collect::<std::collections::HashSet<_>>().len();
        for user in ["ann", "bob", "cy"] {
            let h = headers(&[("x-user", user)]);
            assert_eq!(
                spread(&picks(&reg, &h, None, 20)),
                1,
                "x-user {user} sticks"
            );
        }
        let users: Vec<usize> = (0..40)
            .map(|i| picks(&reg, &headers(&[("x-user", &format!("u{i}"))]), None, 1)[0])
            .collect();
        assert_eq!(spread(&users), 2, "different users reach both endpoints");

        let reg = hashing("httpQueryParameterName: id");
        let none = headers(&[]);
        assert_eq!(spread(&picks(&reg, &none, Some("id=7&x=1"), 20)), 1);
    }

    #[test]
    fn a_missing_cookie_with_ttl_is_generated_and_then_sticks() {
        let reg = hashing(
            "httpCookie: {name: sticky, ttl: 60s, path: /, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}",
        );
        let none = headers(&[]);
        let d = get(&reg, &none);
        let set = d.set_cookie.expect("a cookie is generated");
        assert!(
            set.starts_with("sticky=\"")
                && set.contains("; Max-Age=60; Path=/; SameSite=Strict; Secure")
                && set.ends_with("; HttpOnly"),
            "{set}"
        );
        let value = set.split(';').next().unwrap().trim_start_matches("sticky=");
        let first = match d.target {
            Target::Endpoint { index, .. } => index,
            Target::Passthrough(_) => unreachable!(),
        };
        let with = headers(&[("cookie", &format!("a=b; sticky={value}"))]);
        assert_eq!(picks(&reg, &with, None, 10), vec![first; 10]);
        let d = get(&reg, &with);
        assert_eq!(d.set_cookie, None, "a present cookie is not set again");

        // Without a ttl nothing is generated (Envoy: random pick).
        let reg = hashing("httpCookie: {name: sticky}");
        let d = get(&reg, &none);
        assert_eq!(d.set_cookie, None);
    }

    #[test]
    fn subnets_and_query_params() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_subnet(v4("10.1.2.3"), (v4("10.1.0.0"), 16)));
        assert!(!in_subnet(v4("10.2.0.1"), (v4("10.1.0.0"), 16)));
        assert!(in_subnet(v4("::ffff:10.1.2.3"), (v4("10.1.0.0"), 16)));
        assert!(in_subnet(v4("1.2.3.4"), (v4("0.0.0.0"), 0)));
        assert!(in_subnet(v4("fd00::1"), (v4("fd00::"), 8)));
        assert_eq!(
            query_param(Some("a=1&b=x%20y"), "b").as_deref(),
            Some("x y")
        );
        assert_eq!(query_param(Some("a=1"), "b"), None);
        assert_eq!(query_param(None, "a"), None);
    }

    #[test]
    fn retries_avoid_tried_endpoints_unless_retry_ignore_previous_hosts_is_false() {
        let reg = registry(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.default.svc
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
",
        );
        let d = reg.route(VIP.parse().unwrap(), None).unwrap();
        let back = (0..200)
            .filter(|_| d.cluster.repick(&[0], false) == Some(0))
            .count();
        assert!((0..200).all(|_| d.cluster.repick(&[0], true) == Some(1)));
        // Random over two: about half the retries go back to the endpoint that failed.
        assert!((60..140).contains(&back), "{back}");
    }

    /// Services `web` (HTTP), `multi` (HTTP on 80 and 8080, no VIP), `db` (TCP on 5432 and
    /// 5433) and `tls2` (TLS), the last two with a VIP in 127.77/16 and one in 127.78/16, and
    /// VirtualServices whose routes hold only for some sources, destinations, ports and paths.
    const SOURCES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: multi, namespace: default}
spec:
  hosts: [multi.default.svc]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.2}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.default.svc]
  addresses: [127.77.0.14, 127.78.0.14]
  ports: [{number: 5432, name: tcp, protocol: TCP}, {number: 5433, name: tcp-alt, protocol: TCP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.3}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tls2, namespace: default}
spec:
  hosts: [tls2.default.svc]
  addresses: [127.77.0.15, 127.78.0.15]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.4}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.default.svc]
  http:
  - match: [{uri: {exact: /CASE}, ignoreUriCase: true}]
    route: [{destination: {host: multi.default.svc, port: {number: 8080}}}]
    mirror: {host: multi.default.svc, port: {number: 80}}
  - match: [{sourceLabels: {app: canary}}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
    mirrors: [{destination: {host: multi.default.svc, port: {number: 8080}}}]
  - match: [{sourceNamespace: shop}]
    route: [{destination: {host: multi.default.svc, port: {number: 8080}}}]
  - route: [{destination: {host: web.default.svc}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: default}
spec:
  hosts: [db.default.svc]
  tcp:
  - match: [{destinationSubnets: [127.78.0.0/16]}]
    route: [{destination: {host: multi.default.svc, port: {number: 8080}}}]
  - match: [{port: 5433}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
  - match: [{sourceLabels: {app: canary}}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
  - match: [{sourceNamespace: shop}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
  - route: [{destination: {host: db.default.svc, port: {number: 5432}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tls2, namespace: default}
spec:
  hosts: [tls2.default.svc]
  tls:
  - match: [{sniHosts: [a.test], destinationSubnets: [127.78.0.0/16]}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
  - match: [{sniHosts: [a.test], sourceLabels: {app: canary}}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
  - match: [{sniHosts: [a.test], sourceNamespace: shop}]
    route: [{destination: {host: multi.default.svc, port: {number: 80}}}]
  - match: [{sniHosts: [w.test]}]
    route:
    - {destination: {host: multi.default.svc, port: {number: 80}}, weight: 0}
    - {destination: {host: multi.default.svc, port: {number: 8080}}, weight: 100}
  tcp:
  - route: [{destination: {host: tls2.default.svc}}]
";

    #[test]
    fn routes_decide_on_source_labels_and_namespace_destination_subnet_port_and_path_case() {
        let web = two_endpoint_service("web.default.svc", VIP, ("http", "HTTP"), 80);
        let set =
            crate::config::source::ConfigSet::parse_ok("t.yaml", &format!("{web}---\n{SOURCES}"));
        let snapshot = |ns: &str, canary: bool| {
            let client = crate::registry::resolve::Client {
                namespace: ns.into(),
                labels: match canary {
                    true => [("app".to_string(), "canary".to_string())].into(),
                    false => Default::default(),
                },
                ..Default::default()
            };
            Registry::build(&set, &client).unwrap()
        };
        let (plain, canary, shop) = (
            snapshot("default", false),
            snapshot("default", true),
            snapshot("shop", false),
        );
        // HTTP: the route, the destination port's cluster and the mirror's port.
        let none = headers(&[]);
        let http = |reg: &Registry, path: &'static str| {
            let d = reg
                .route_request(
                    VIP.parse().unwrap(),
                    None,
                    &request("GET", path, None, &none),
                )
                .unwrap();
            let mirror = (d.http_route.and_then(|r| r.mirrors.first())).and_then(|(m, _)| m.port);
            (d.route.unwrap_or_default(), d.cluster.port, mirror)
        };
        assert_eq!(
            http(&plain, "/case"),
            ("default/web http[0]".into(), 8080, Some(80))
        );
        assert_eq!(
            http(&plain, "/Case"),
            ("default/web http[0]".into(), 8080, Some(80))
        );
        assert_eq!(
            http(&canary, "/x"),
            ("default/web http[1]".into(), 80, Some(8080))
        );
        assert_eq!(
            http(&shop, "/x"),
            ("default/web http[2]".into(), 8080, None)
        );
        assert_eq!(http(&plain, "/x"), ("default/web http[3]".into(), 80, None));
        // TCP: the destination subnet, the port, then the source.
        let tcp = |reg: &Registry, addr: &str| {
            let d = reg.route(addr.parse().unwrap(), None).unwrap();
            (d.route.unwrap_or_default(), d.cluster.port)
        };
        assert_eq!(
            tcp(&plain, "127.78.0.14:5432"),
            ("default/db tcp[0]".into(), 8080)
        );
        assert_eq!(
            tcp(&plain, "127.77.0.14:5433"),
            ("default/db tcp[1]".into(), 80)
        );
        assert_eq!(tcp(&canary, "127.77.0.14:5432").0, "default/db tcp[2]");
        assert_eq!(tcp(&shop, "127.77.0.14:5432").0, "default/db tcp[3]");
        assert_eq!(
            tcp(&plain, "127.77.0.14:5432"),
            ("default/db tcp[4]".into(), 5432)
        );
        // TLS: the same conditions after the server name, and the route's weights.
        let tls = |reg: &Registry, addr: &str, sni: &str| {
            let d = reg
                .route_tls(addr.parse().unwrap(), None, Some(sni))
                .unwrap();
            (d.route.unwrap_or_default(), d.cluster.port)
        };
        assert_eq!(
            tls(&plain, "127.78.0.15:443", "a.test").0,
            "default/tls2 tls[0]"
        );
        assert_eq!(
            tls(&canary, "127.77.0.15:443", "a.test").0,
            "default/tls2 tls[1]"
        );
        assert_eq!(
            tls(&shop, "127.77.0.15:443", "a.test").0,
            "default/tls2 tls[2]"
        );
        assert_eq!(
            tls(&plain, "127.77.0.15:443", "a.test").0,
            "default/tls2 tcp[0]"
        );
        for _ in 0..20 {
            assert_eq!(
                tls(&plain, "127.77.0.15:443", "w.test"),
                ("default/tls2 tls[3]".into(), 8080)
            );
        }
    }

    #[test]
    fn tls_routes_match_sni_then_fall_back_to_tcp_routes() {
        assert!(sni_matches("a.example", "A.Example"));
        assert!(sni_matches("*.example", "x.y.example"));
        assert!(!sni_matches("*.example", "example"));
        assert!(sni_matches("*", "anything"));
        let service =
            two_endpoint_service("tls.default.svc", "127.77.0.12:443", ("tls", "TLS"), 8443);
        let reg = crate::testing::registry(&format!(
            "{service}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tls, namespace: default}}
spec:
  host: tls.default.svc
  subsets: [{{name: one, labels: {{v: one}}}}, {{name: two, labels: {{v: two}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tls, namespace: default}}
spec:
  hosts: [tls.default.svc]
  tls:
  - match: [{{sniHosts: [a.tls.test], port: 443}}]
    route: [{{destination: {{host: tls.default.svc, subset: one}}}}]
  - match: [{{sniHosts: ['*.wild.test']}}]
    route: [{{destination: {{host: tls.default.svc, subset: two}}}}]
  tcp:
  - route: [{{destination: {{host: tls.default.svc, subset: two}}}}]
"
        ));
        let vip = "127.77.0.12:443".parse().unwrap();
        assert!(reg.needs_sni(vip));
        let cluster = |sni: Option<&str>| {
            let d = reg.route_tls(vip, None, sni).unwrap();
            (d.cluster.subset.clone(), d.route.unwrap_or_default())
        };
        assert_eq!(
            cluster(Some("a.tls.test")),
            (Some("one".into()), "default/tls tls[0]".into())
        );
        assert_eq!(
            cluster(Some("x.wild.test")),
            (Some("two".into()), "default/tls tls[1]".into())
        );
        // No matching name, or none at all: the tcp routes.
        assert_eq!(cluster(Some("b.tls.test")).1, "default/tls tcp[0]");
        assert_eq!(cluster(None).1, "default/tls tcp[0]");
    }
}
