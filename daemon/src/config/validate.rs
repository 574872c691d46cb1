//! Istio's validation rules for `DestinationRule` and `VirtualService`, turning [`crd`] mirrors
//! into [`policy`] types. Every check names the field path and reports the position of the YAML
//! node through the resource's [`Origin`]; all problems of a resource are collected, not only the
//! first. Warnings (deprecated or ignored fields) do not stop a resource from loading.
//!
//! Invariant: this module never panics on any input that deserialized into the [`crd`] types.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use super::{
    Problem,
    crd::{self, Duration as RawDuration},
    policy::{self, Blocks, ExportTo},
    source::{Origin, Resource},
};

/// Kubernetes' cluster domain used to qualify short names.
pub const CLUSTER_DOMAIN: &str = "svc.cluster.local";
/// Largest Maglev table Istio accepts (exclusive).
const MAGLEV_MAX: u64 = 5_000_011;
/// CRD limit on `portLevelSettings`.
const MAX_PORT_LEVEL: usize = 4096;
/// Labels that name a locality level; they may not be combined with `failover`.
const LOCALITY_LABELS: [&str; 3] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
];

/// A resource that passed validation, with the warnings it produced.
#[derive(Debug)]
pub struct Validated<T> {
    pub value: T,
    pub warnings: Vec<Problem>,
}

/// A resource that failed validation: every error, plus the warnings seen on the way.
#[derive(Debug)]
pub struct Invalid {
    pub errors: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

/// Collects located problems while walking one resource.
struct Checker<'a> {
    origin: &'a Origin,
    namespace: String,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

// === impl TryFrom ===

impl TryFrom<&Resource<crd::DestinationRuleSpec>> for Validated<policy::DestinationRule> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd::DestinationRuleSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.destination_rule(&res.spec);
        c.finish(value)
    }
}

impl TryFrom<&Resource<crd::VirtualServiceSpec>> for Validated<policy::VirtualService> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd::VirtualServiceSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.virtual_service(&res.spec);
        c.finish(value)
    }
}

// === impl Checker ===

impl<'a> Checker<'a> {
    fn new<T>(res: &'a Resource<T>) -> Self {
        Self {
            origin: &res.origin,
            namespace: res.namespace().to_string(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn finish<T>(self, value: T) -> Result<Validated<T>, Invalid> {
        if self.errors.is_empty() {
            Ok(Validated {
                value,
                warnings: self.warnings,
            })
        } else {
            Err(Invalid {
                errors: self.errors,
                warnings: self.warnings,
            })
        }
    }

    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(self.origin.problem(field, message));
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(self.origin.problem(field, message));
    }

    // --- DestinationRule ---

    fn destination_rule(&mut self, spec: &crd::DestinationRuleSpec) -> policy::DestinationRule {
        if spec.host.is_empty() {
            self.err("spec.host", "host is required");
        } else if let Err(e) = check_host(&spec.host) {
            self.err("spec.host", e);
        }
        let traffic_policy = spec
            .traffic_policy
            .as_ref()
            .map(|tp| self.traffic_policy("spec.trafficPolicy", tp));
        let mut subsets = Vec::new();
        let mut names = HashSet::new();
        for (i, s) in spec.subsets.iter().enumerate() {
            let path = format!("spec.subsets[{i}]");
            let Some(s) = s else {
                self.err(path, "subset must not be null");
                continue;
            };
            if s.name.is_empty() {
                self.err(format!("{path}.name"), "subset name is required");
            } else if !is_dns_label(&s.name) {
                self.err(
                    format!("{path}.name"),
                    format!("subset name {:?} is not a DNS-1123 label", s.name),
                );
            } else if !names.insert(s.name.clone()) {
                self.err(
                    format!("{path}.name"),
                    format!("duplicate subset name {:?}", s.name),
                );
            }
            self.labels(&format!("{path}.labels"), &s.labels);
            let traffic_policy = s
                .traffic_policy
                .as_ref()
                .map(|tp| self.traffic_policy(&format!("{path}.trafficPolicy"), tp));
            subsets.push(policy::Subset {
                name: s.name.clone(),
                labels: s.labels.clone(),
                traffic_policy,
                index: i,
            });
        }
        let workload_selector = spec.workload_selector.as_ref().map(|ws| {
            if ws.match_labels.is_empty() {
                self.warn(
                    "spec.workloadSelector.matchLabels",
                    "empty matchLabels selects every workload in the namespace",
                );
            }
            for (k, v) in &ws.match_labels {
                let field = format!("spec.workloadSelector.matchLabels.{k}");
                if k.is_empty() || k.contains('*') || v.contains('*') {
                    self.err(
                        field,
                        "empty keys and wildcards are not allowed in matchLabels",
                    );
                }
            }
            ws.match_labels.clone()
        });
        let export_to = self.export_to(&spec.export_to, false);
        if workload_selector.is_some()
            && !matches!(&export_to, ExportTo::Namespaces(l) if l == std::slice::from_ref(&self.namespace))
            && !spec.export_to.is_empty()
        {
            self.err(
                "spec.exportTo",
                "a rule with workloadSelector can only be exported to its own namespace",
            );
        }
        if let Some(tp) = &traffic_policy
            && let Some(lb) = &tp.blocks.load_balancer
            && let Some(loc) = &lb.locality
            && (!loc.failover.is_empty() || !loc.failover_priority.is_empty())
            && tp.blocks.outlier_detection.is_none()
        {
            self.warn(
                "spec.trafficPolicy.loadBalancer.localityLbSetting",
                "locality failover has no effect without outlierDetection",
            );
        }
        policy::DestinationRule {
            host: qualify(&spec.host, &self.namespace),
            traffic_policy,
            subsets,
            export_to,
            // Selector rules are private to their namespace.
            workload_selector,
        }
    }

    fn traffic_policy(&mut self, path: &str, tp: &crd::TrafficPolicy) -> policy::TrafficPolicy {
        if tp == &crd::TrafficPolicy::default() {
            self.err(path, "trafficPolicy must set at least one field");
        }
        let blocks = self.blocks(
            path,
            tp.load_balancer.as_ref(),
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
            tp.tls.as_ref(),
        );
        if tp.port_level_settings.len() > MAX_PORT_LEVEL {
            self.err(
                format!("{path}.portLevelSettings"),
                format!("at most {MAX_PORT_LEVEL} entries are allowed"),
            );
        }
        let mut port_level = Vec::new();
        let mut seen = HashSet::new();
        for (i, p) in tp.port_level_settings.iter().enumerate() {
            let pp = format!("{path}.portLevelSettings[{i}]");
            let port = match p.port.as_ref().and_then(|p| p.number) {
                None => {
                    self.err(format!("{pp}.port"), "port.number is required");
                    None
                }
                Some(n) => self.port(&format!("{pp}.port.number"), n),
            };
            if let Some(port) = port
                && !seen.insert(port)
            {
                self.err(
                    format!("{pp}.port.number"),
                    format!("port {port} already has portLevelSettings"),
                );
            }
            if p.load_balancer.is_none()
                && p.connection_pool.is_none()
                && p.outlier_detection.is_none()
                && p.tls.is_none()
            {
                self.err(
                    pp.clone(),
                    "port traffic policy must set loadBalancer, connectionPool, outlierDetection or tls",
                );
            }
            let b = self.blocks(
                &pp,
                p.load_balancer.as_ref(),
                p.connection_pool.as_ref(),
                p.outlier_detection.as_ref(),
                p.tls.as_ref(),
            );
            if let Some(port) = port {
                port_level.push((i, port, b));
            }
        }
        let tunnel = tp.tunnel.as_ref().map(|t| {
            let tpath = format!("{path}.tunnel");
            let protocol = match t.protocol.as_deref().unwrap_or("") {
                "" | "CONNECT" => "CONNECT".to_string(),
                "POST" => "POST".to_string(),
                other => {
                    self.err(
                        format!("{tpath}.protocol"),
                        format!("tunnel protocol must be CONNECT or POST, not {other:?}"),
                    );
                    other.to_string()
                }
            };
            if t.target_host.is_empty() {
                self.err(format!("{tpath}.targetHost"), "targetHost is required");
            } else if t.target_host.parse::<IpAddr>().is_err()
                && check_fqdn(&t.target_host).is_err()
            {
                self.err(
                    format!("{tpath}.targetHost"),
                    format!("{:?} is not an FQDN or IP address", t.target_host),
                );
            }
            let target_port = self
                .port(&format!("{tpath}.targetPort"), t.target_port)
                .unwrap_or(0);
            policy::Tunnel {
                protocol,
                target_host: t.target_host.clone(),
                target_port,
            }
        });
        let proxy_protocol = tp.proxy_protocol.as_ref().map(|p| match p.version {
            Some(crd::ProxyProtocolVersion::V2) => policy::ProxyProtocolVersion::V2,
            _ => policy::ProxyProtocolVersion::V1,
        });
        if tunnel.is_some() && proxy_protocol.is_some() {
            self.err(
                format!("{path}.proxyProtocol"),
                "proxyProtocol and tunnel are mutually exclusive",
            );
        }
        let retry_budget = tp.retry_budget.as_ref().map(|r| {
            let rp = format!("{path}.retryBudget");
            let percent = r.percent.unwrap_or(20.0);
            if !(0.0..=100.0).contains(&percent) {
                self.err(
                    format!("{rp}.percent"),
                    format!("percent {percent} must be between 0 and 100"),
                );
            }
            policy::RetryBudget {
                percent,
                min_retry_concurrency: self
                    .count(
                        &format!("{rp}.minRetryConcurrency"),
                        r.min_retry_concurrency,
                    )
                    .unwrap_or(3),
                budget_interval: self.duration(
                    &format!("{rp}.budgetInterval"),
                    r.budget_interval.as_ref(),
                    false,
                ),
            }
        });
        policy::TrafficPolicy {
            blocks,
            port_level,
            tunnel,
            proxy_protocol,
            retry_budget,
        }
    }

    fn blocks(
        &mut self,
        path: &str,
        lb: Option<&crd::LoadBalancerSettings>,
        pool: Option<&crd::ConnectionPoolSettings>,
        od: Option<&crd::OutlierDetection>,
        tls: Option<&crd::ClientTlsSettings>,
    ) -> Blocks {
        Blocks {
            load_balancer: lb.map(|lb| self.load_balancer(&format!("{path}.loadBalancer"), lb)),
            connection_pool: pool
                .map(|p| self.connection_pool(&format!("{path}.connectionPool"), p)),
            outlier_detection: od.map(|o| self.outlier(&format!("{path}.outlierDetection"), o)),
            tls: tls.map(|t| self.tls(&format!("{path}.tls"), t)),
        }
    }

    fn load_balancer(
        &mut self,
        path: &str,
        lb: &crd::LoadBalancerSettings,
    ) -> policy::LoadBalancer {
        use policy::Algorithm as A;
        let algorithm = match (&lb.simple, &lb.consistent_hash) {
            (Some(_), Some(_)) => {
                self.err(path, "simple and consistentHash are mutually exclusive");
                A::LeastRequest
            }
            (_, Some(ch)) => {
                A::ConsistentHash(self.consistent_hash(&format!("{path}.consistentHash"), ch))
            }
            (Some(crd::SimpleLb::RoundRobin), None) => A::RoundRobin,
            (Some(crd::SimpleLb::Random), None) => A::Random,
            (Some(crd::SimpleLb::Passthrough), None) => A::Passthrough,
            // UNSPECIFIED, LEAST_REQUEST and the deprecated LEAST_CONN are one algorithm in Istio.
            _ => A::LeastRequest,
        };
        if lb.locality_lb_setting.is_some() && lb.zone_aware_lb_setting.is_some() {
            self.err(
                format!("{path}.zoneAwareLbSetting"),
                "localityLbSetting and zoneAwareLbSetting are mutually exclusive",
            );
        }
        if lb.zone_aware_lb_setting.is_some() {
            self.warn(
                format!("{path}.zoneAwareLbSetting"),
                "zoneAwareLbSetting is accepted but not enforced by drover",
            );
        }
        let locality = lb
            .locality_lb_setting
            .as_ref()
            .map(|l| self.locality(&format!("{path}.localityLbSetting"), l));
        let warmup = match (&lb.warmup, &lb.warmup_duration_secs) {
            (Some(_), Some(_)) => {
                self.err(
                    format!("{path}.warmupDurationSecs"),
                    "warmup and warmupDurationSecs are mutually exclusive",
                );
                None
            }
            (Some(w), None) => {
                let wp = format!("{path}.warmup");
                let duration = match &w.duration {
                    None => {
                        self.err(format!("{wp}.duration"), "warmup.duration is required");
                        Duration::ZERO
                    }
                    Some(d) => self
                        .duration(&format!("{wp}.duration"), Some(d), false)
                        .unwrap_or_default(),
                };
                let minimum_percent = w.minimum_percent.unwrap_or(10.0);
                if !(0.0..=100.0).contains(&minimum_percent) {
                    self.err(
                        format!("{wp}.minimumPercent"),
                        format!("minimumPercent {minimum_percent} must be between 0 and 100"),
                    );
                }
                let aggression = w.aggression.unwrap_or(1.0);
                if aggression.is_nan() || aggression <= 0.0 {
                    self.err(
                        format!("{wp}.aggression"),
                        format!("aggression {aggression} must be greater than 0"),
                    );
                }
                Some(policy::Warmup {
                    duration,
                    minimum_percent,
                    aggression,
                })
            }
            (None, Some(d)) => self
                .duration(&format!("{path}.warmupDurationSecs"), Some(d), false)
                .map(|duration| policy::Warmup {
                    duration,
                    minimum_percent: 10.0,
                    aggression: 1.0,
                }),
            (None, None) => None,
        };
        if warmup.is_some()
            && matches!(algorithm, A::Random | A::Passthrough | A::ConsistentHash(_))
        {
            self.warn(
                format!("{path}.warmup"),
                format!(
                    "warmup only applies to ROUND_ROBIN and LEAST_REQUEST; ignored for {}",
                    algorithm.name()
                ),
            );
        }
        policy::LoadBalancer {
            algorithm,
            locality,
            warmup,
        }
    }

    fn consistent_hash(&mut self, path: &str, ch: &crd::ConsistentHash) -> policy::ConsistentHash {
        use policy::HashKey as K;
        let mut keys = Vec::new();
        if let Some(h) = &ch.http_header_name {
            if h.is_empty() {
                self.err(format!("{path}.httpHeaderName"), "header name is empty");
            }
            keys.push(K::Header(h.to_ascii_lowercase()));
        }
        if let Some(c) = &ch.http_cookie {
            let cp = format!("{path}.httpCookie");
            if c.name.is_empty() {
                self.err(format!("{cp}.name"), "cookie name is required");
            }
            let mut seen = HashSet::new();
            for (i, a) in c.attributes.iter().enumerate() {
                if a.name.is_empty() {
                    self.err(
                        format!("{cp}.attributes[{i}].name"),
                        "cookie attribute name is required",
                    );
                } else if !seen.insert(a.name.to_ascii_lowercase()) {
                    self.err(
                        format!("{cp}.attributes[{i}].name"),
                        format!("duplicate cookie attribute {:?}", a.name),
                    );
                }
            }
            keys.push(K::Cookie {
                name: c.name.clone(),
                path: c.path.clone(),
                ttl: self.duration(&format!("{cp}.ttl"), c.ttl.as_ref(), true),
                attributes: c
                    .attributes
                    .iter()
                    .map(|a| (a.name.clone(), a.value.clone()))
                    .collect(),
            });
        }
        if ch.use_source_ip == Some(true) {
            keys.push(K::SourceIp);
        }
        if let Some(q) = &ch.http_query_parameter_name {
            if q.is_empty() {
                self.err(
                    format!("{path}.httpQueryParameterName"),
                    "query parameter name is empty",
                );
            }
            keys.push(K::QueryParameter(q.clone()));
        }
        if keys.len() != 1 {
            self.err(
                path,
                format!(
                    "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (found {})",
                    keys.len()
                ),
            );
        }
        if ch.minimum_ring_size.is_some() && (ch.ring_hash.is_some() || ch.maglev.is_some()) {
            self.err(
                format!("{path}.minimumRingSize"),
                "deprecated minimumRingSize cannot be combined with ringHash or maglev",
            );
        } else if ch.minimum_ring_size.is_some() {
            self.warn(
                format!("{path}.minimumRingSize"),
                "minimumRingSize is deprecated; use ringHash.minimumRingSize",
            );
        }
        let ring = match (&ch.ring_hash, &ch.maglev) {
            (Some(_), Some(_)) => {
                self.err(path, "ringHash and maglev are mutually exclusive");
                policy::HashRing::RingHash {
                    minimum_ring_size: 1024,
                }
            }
            (None, Some(m)) => {
                let field = format!("{path}.maglev.tableSize");
                let table_size = match m.table_size {
                    None | Some(0) => {
                        self.err(field, "maglev.tableSize is required");
                        0
                    }
                    Some(n) if n < 0 || n as u64 >= MAGLEV_MAX || !is_prime(n as u64) => {
                        self.err(
                            field,
                            format!("tableSize {n} must be a prime number below {MAGLEV_MAX}"),
                        );
                        0
                    }
                    Some(n) => n as u64,
                };
                policy::HashRing::Maglev { table_size }
            }
            (ring, None) => {
                let size = ring
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size);
                let field = if ring.is_some() {
                    format!("{path}.ringHash.minimumRingSize")
                } else {
                    format!("{path}.minimumRingSize")
                };
                let n = self.count(&field, size).filter(|n| *n > 0).unwrap_or(1024);
                policy::HashRing::RingHash {
                    minimum_ring_size: u64::from(n),
                }
            }
        };
        policy::ConsistentHash {
            key: keys.into_iter().next().unwrap_or(K::SourceIp),
            ring,
        }
    }

    fn locality(&mut self, path: &str, l: &crd::LocalityLbSetting) -> policy::LocalityLb {
        if !l.distribute.is_empty() && !l.failover.is_empty() {
            self.err(path, "distribute and failover are mutually exclusive");
        }
        let mut distribute = Vec::new();
        let mut froms = HashSet::new();
        for (i, d) in l.distribute.iter().enumerate() {
            let dp = format!("{path}.distribute[{i}]");
            if let Err(e) = check_locality_wildcard(&d.from) {
                self.err(format!("{dp}.from"), e);
            } else if !froms.insert(d.from.clone()) {
                self.err(
                    format!("{dp}.from"),
                    format!("locality {:?} is listed twice", d.from),
                );
            }
            let mut sum = 0i64;
            let mut to = BTreeMap::new();
            for (loc, w) in &d.to {
                if let Err(e) = check_locality_wildcard(loc) {
                    self.err(format!("{dp}.to.{loc}"), e);
                }
                if !(1..=100).contains(w) {
                    self.err(
                        format!("{dp}.to.{loc}"),
                        format!("weight {w} must be between 1 and 100"),
                    );
                }
                sum += w;
                to.insert(loc.clone(), (*w).clamp(0, 100) as u32);
            }
            if sum != 100 {
                self.err(
                    format!("{dp}.to"),
                    format!("weights must add up to 100, not {sum}"),
                );
            }
            distribute.push((d.from.clone(), to));
        }
        let mut failover = Vec::new();
        for (i, f) in l.failover.iter().enumerate() {
            let fp = format!("{path}.failover[{i}]");
            if f.from == f.to {
                self.err(
                    fp.clone(),
                    format!("failover from and to are the same region {:?}", f.from),
                );
            }
            for (name, v) in [("from", &f.from), ("to", &f.to)] {
                if v.contains('/') || v.contains('*') {
                    self.err(
                        format!("{fp}.{name}"),
                        format!("failover takes regions only (no '/' or '*'), not {v:?}"),
                    );
                }
            }
            failover.push((f.from.clone(), f.to.clone()));
        }
        if !l.failover.is_empty() {
            for (i, p) in l.failover_priority.iter().enumerate() {
                let key = p.split('=').next().unwrap_or("");
                if LOCALITY_LABELS.contains(&key) {
                    self.err(
                        format!("{path}.failoverPriority[{i}]"),
                        format!("{key} cannot be used in failoverPriority together with failover"),
                    );
                }
            }
        }
        policy::LocalityLb {
            enabled: l.enabled,
            distribute,
            failover,
            failover_priority: l.failover_priority.clone(),
        }
    }

    fn connection_pool(
        &mut self,
        path: &str,
        p: &crd::ConnectionPoolSettings,
    ) -> policy::ConnectionPool {
        let mut out = policy::ConnectionPool::default();
        if p.tcp.is_none() && p.http.is_none() {
            self.err(path, "connectionPool must set tcp or http");
        }
        if let Some(t) = &p.tcp {
            let tp = format!("{path}.tcp");
            if let Some(n) = self.limit(&format!("{tp}.maxConnections"), t.max_connections) {
                out.max_connections = n;
            }
            if let Some(d) = self.duration(
                &format!("{tp}.connectTimeout"),
                t.connect_timeout.as_ref(),
                false,
            ) {
                out.connect_timeout = d;
            }
            out.max_connection_duration = self.duration(
                &format!("{tp}.maxConnectionDuration"),
                t.max_connection_duration.as_ref(),
                false,
            );
            if let Some(d) =
                self.duration(&format!("{tp}.idleTimeout"), t.idle_timeout.as_ref(), true)
            {
                out.tcp_idle_timeout = d;
                out.http_idle_timeout = d;
            }
            out.tcp_keepalive = t.tcp_keepalive.as_ref().map(|k| {
                let kp = format!("{tp}.tcpKeepalive");
                policy::TcpKeepalive {
                    probes: self.count(&format!("{kp}.probes"), k.probes),
                    time: self.duration(&format!("{kp}.time"), k.time.as_ref(), false),
                    interval: self.duration(&format!("{kp}.interval"), k.interval.as_ref(), false),
                }
            });
        }
        if let Some(h) = &p.http {
            let hp = format!("{path}.http");
            if let Some(n) = self.limit(
                &format!("{hp}.http1MaxPendingRequests"),
                h.http1_max_pending_requests,
            ) {
                out.http1_max_pending_requests = n;
            }
            if let Some(n) = self.limit(&format!("{hp}.http2MaxRequests"), h.http2_max_requests) {
                out.http2_max_requests = n;
            }
            out.max_requests_per_connection = self.limit(
                &format!("{hp}.maxRequestsPerConnection"),
                h.max_requests_per_connection,
            );
            if let Some(n) = self.limit(&format!("{hp}.maxRetries"), h.max_retries) {
                out.max_retries = n;
            }
            if let Some(n) = self.limit(
                &format!("{hp}.maxConcurrentStreams"),
                h.max_concurrent_streams,
            ) {
                out.max_concurrent_streams = n;
            }
            if let Some(d) =
                self.duration(&format!("{hp}.idleTimeout"), h.idle_timeout.as_ref(), false)
            {
                out.http_idle_timeout = d;
            }
            out.h2_upgrade = match h.h2_upgrade_policy {
                None | Some(crd::H2UpgradePolicy::Default) => policy::H2Upgrade::Default,
                Some(crd::H2UpgradePolicy::DoNotUpgrade) => policy::H2Upgrade::DoNotUpgrade,
                Some(crd::H2UpgradePolicy::Upgrade) => policy::H2Upgrade::Upgrade,
            };
            out.use_client_protocol = h.use_client_protocol.unwrap_or(false);
            if out.use_client_protocol && out.h2_upgrade == policy::H2Upgrade::Upgrade {
                self.err(
                    format!("{hp}.useClientProtocol"),
                    "useClientProtocol cannot be combined with h2UpgradePolicy UPGRADE",
                );
            }
            if let Some(k) = &h.http2_keep_alive {
                let kp = format!("{hp}.http2KeepAlive");
                let interval = self.duration(&format!("{kp}.interval"), k.interval.as_ref(), false);
                let timeout = self.duration(&format!("{kp}.timeout"), k.timeout.as_ref(), false);
                if k.interval.is_none() || k.timeout.is_none() {
                    self.err(kp, "http2KeepAlive needs both interval and timeout");
                }
                out.http2_keepalive = interval.zip(timeout);
            }
        }
        out
    }

    fn outlier(&mut self, path: &str, o: &crd::OutlierDetection) -> policy::OutlierDetection {
        let mut out = policy::OutlierDetection::default();
        if o.consecutive_errors.is_some() {
            self.warn(
                format!("{path}.consecutiveErrors"),
                "consecutiveErrors is deprecated and ignored by Istio since 1.7 (5 consecutive 5xx apply); use consecutive5xxErrors",
            );
        }
        if let Some(n) = self.count(
            &format!("{path}.consecutive5xxErrors"),
            o.consecutive_5xx_errors,
        ) {
            out.consecutive_5xx = n;
        }
        if let Some(n) = self.count(
            &format!("{path}.consecutiveGatewayErrors"),
            o.consecutive_gateway_errors,
        ) {
            out.consecutive_gateway = n;
        }
        out.split_local_origin = o.split_external_local_origin_errors.unwrap_or(false);
        if let Some(n) = self.count(
            &format!("{path}.consecutiveLocalOriginFailures"),
            o.consecutive_local_origin_failures,
        ) {
            if n > 0 && !out.split_local_origin {
                self.err(
                    format!("{path}.consecutiveLocalOriginFailures"),
                    "consecutiveLocalOriginFailures requires splitExternalLocalOriginErrors: true",
                );
            }
            if n > 0 {
                out.consecutive_local_origin = n;
            }
        }
        if let Some(d) = self.duration(&format!("{path}.interval"), o.interval.as_ref(), false) {
            out.interval = d;
        }
        if let Some(d) = self.duration(
            &format!("{path}.baseEjectionTime"),
            o.base_ejection_time.as_ref(),
            false,
        ) {
            out.base_ejection_time = d;
        }
        if let Some(n) = self.percent(
            &format!("{path}.maxEjectionPercent"),
            o.max_ejection_percent,
        ) {
            // 0 means unset: Istio cannot express "never eject".
            if n > 0 {
                out.max_ejection_percent = n;
            }
        }
        if let Some(n) = self.percent(&format!("{path}.minHealthPercent"), o.min_health_percent) {
            out.min_health_percent = n;
        }
        for (i, c) in o.outlier_detection_http_error_codes.iter().enumerate() {
            if (100..=599).contains(c) {
                out.http_error_codes.push(*c as u16);
            } else {
                self.err(
                    format!("{path}.outlierDetectionHttpErrorCodes[{i}]"),
                    format!("{c} is not an HTTP status code (100-599)"),
                );
            }
        }
        out
    }

    fn tls(&mut self, path: &str, t: &crd::ClientTlsSettings) -> policy::ClientTls {
        let mode = match t.mode {
            None | Some(crd::TlsMode::Disable) => policy::TlsMode::Disable,
            Some(crd::TlsMode::Simple) => policy::TlsMode::Simple,
            Some(crd::TlsMode::Mutual) => policy::TlsMode::Mutual,
            Some(crd::TlsMode::IstioMutual) => policy::TlsMode::IstioMutual,
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let out = policy::ClientTls {
            mode,
            client_certificate: nonempty(&t.client_certificate),
            private_key: nonempty(&t.private_key),
            ca_certificates: nonempty(&t.ca_certificates),
            ca_crl: nonempty(&t.ca_crl),
            credential_name: nonempty(&t.credential_name),
            subject_alt_names: t.subject_alt_names.clone(),
            sni: nonempty(&t.sni),
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        };
        let origination = matches!(mode, policy::TlsMode::Simple | policy::TlsMode::Mutual);
        if let Some(cred) = &out.credential_name
            && origination
        {
            for (field, v) in [
                ("clientCertificate", &out.client_certificate),
                ("privateKey", &out.private_key),
                ("caCertificates", &out.ca_certificates),
                ("caCrl", &out.ca_crl),
            ] {
                if v.is_some() {
                    self.err(
                        format!("{path}.{field}"),
                        format!("{field} must be empty when credentialName is set"),
                    );
                }
            }
            if let Some(rest) = cred.strip_prefix("configmap://") {
                let ns = rest.split('/').next().unwrap_or("");
                if rest.contains('/') && ns != self.namespace {
                    self.err(
                        format!("{path}.credentialName"),
                        format!(
                            "configmap credentials must be in the rule's namespace {:?}",
                            self.namespace
                        ),
                    );
                }
            }
        } else if mode == policy::TlsMode::Mutual {
            if out.client_certificate.is_none() {
                self.err(
                    format!("{path}.clientCertificate"),
                    "MUTUAL requires clientCertificate (or credentialName)",
                );
            }
            if out.private_key.is_none() {
                self.err(
                    format!("{path}.privateKey"),
                    "MUTUAL requires privateKey (or credentialName)",
                );
            }
        }
        if out.insecure_skip_verify {
            let mut conflicts = vec![
                ("caCertificates", out.ca_certificates.is_some()),
                ("subjectAltNames", !out.subject_alt_names.is_empty()),
            ];
            if mode == policy::TlsMode::Simple {
                conflicts.push(("credentialName", out.credential_name.is_some()));
            }
            for (field, set) in conflicts {
                if set {
                    self.err(
                        format!("{path}.{field}"),
                        format!("{field} cannot be set together with insecureSkipVerify"),
                    );
                }
            }
        }
        out
    }

    fn export_to(&mut self, list: &[String], allow_private: bool) -> ExportTo {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let mut all = list.is_empty();
        for (i, e) in list.iter().enumerate() {
            let field = format!("spec.exportTo[{i}]");
            let ns = match e.as_str() {
                "*" => {
                    all = true;
                    if list.len() > 1 {
                        self.err(field, "\"*\" cannot be combined with other namespaces");
                    }
                    continue;
                }
                "~" if allow_private => continue,
                "~" => {
                    self.err(field, "\"~\" is not allowed here");
                    continue;
                }
                "." => self.namespace.clone(),
                ns if is_dns_label(ns) => ns.to_string(),
                ns => {
                    self.err(field, format!("{ns:?} is not a valid namespace name"));
                    continue;
                }
            };
            if !seen.insert(ns.clone()) {
                self.err(field, format!("namespace {ns:?} is listed twice"));
            }
            out.push(ns);
        }
        if all {
            ExportTo::All
        } else {
            ExportTo::Namespaces(out)
        }
    }

    fn labels(&mut self, path: &str, labels: &BTreeMap<String, String>) {
        for (k, v) in labels {
            if let Err(e) = check_label_key(k) {
                self.err(format!("{path}.{k}"), e);
            }
            if !is_label_value(v) {
                self.err(
                    format!("{path}.{k}"),
                    format!("{v:?} is not a valid label value"),
                );
            }
        }
    }

    // --- VirtualService ---

    fn virtual_service(&mut self, spec: &crd::VirtualServiceSpec) -> policy::VirtualService {
        if spec.hosts.is_empty() {
            self.err("spec.hosts", "at least one host is required");
        }
        let applies_to_mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
        let mut hosts = Vec::new();
        for (i, h) in spec.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            if h == "*" && applies_to_mesh {
                self.err(
                    field,
                    "host \"*\" is not allowed for sidecars (gateway mesh)",
                );
            } else if h.is_empty() {
                self.err(field, "host must not be empty");
            } else if let Err(e) = check_host(h).or_else(|e| {
                // VirtualServices may name a service by IP address.
                h.parse::<IpAddr>().map(|_| ()).map_err(|_| e)
            }) {
                self.err(field, e);
            } else {
                hosts.push(qualify(h, &self.namespace));
            }
        }
        if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
            self.err(
                "spec",
                "a VirtualService needs at least one http, tcp or tls route",
            );
        }
        let mut http = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (i, r) in spec.http.iter().enumerate() {
            let path = format!("spec.http[{i}]");
            if let Some(first) = catch_all {
                self.warn(
                    path.clone(),
                    format!("unreachable: route http[{first}] before it matches every request"),
                );
            }
            let route = self.http_route(&path, i, r);
            if catch_all.is_none() && route.matches.iter().all(is_catch_all) {
                catch_all = Some(i);
            }
            http.push(route);
        }
        let tcp = spec
            .tcp
            .iter()
            .enumerate()
            .map(|(i, r)| self.l4_route(&format!("spec.tcp[{i}]"), i, &r.matches, &r.route, false))
            .collect();
        let tls = spec
            .tls
            .iter()
            .enumerate()
            .map(|(i, r)| self.l4_route(&format!("spec.tls[{i}]"), i, &r.matches, &r.route, true))
            .collect();
        policy::VirtualService {
            hosts,
            applies_to_mesh,
            http,
            tcp,
            tls,
            export_to: self.export_to(&spec.export_to, true),
        }
    }

    fn http_route(&mut self, path: &str, index: usize, r: &crd::HttpRoute) -> policy::HttpRoute {
        let actions = [
            r.redirect.is_some(),
            r.direct_response.is_some(),
            r.delegate.is_some(),
        ];
        if r.route.is_empty() && !actions.iter().any(|a| *a) {
            self.err(
                path,
                "an HTTP route needs route, redirect, directResponse or delegate",
            );
        }
        if !r.route.is_empty() && (r.redirect.is_some() || r.direct_response.is_some()) {
            self.err(
                path,
                "route cannot be combined with redirect or directResponse",
            );
        }
        for (field, set) in [
            ("redirect", r.redirect.is_some()),
            ("directResponse", r.direct_response.is_some()),
            ("delegate", r.delegate.is_some()),
            ("rewrite", r.rewrite.is_some()),
            ("fault", r.fault.is_some()),
            ("mirror", r.mirror.is_some() || r.mirrors.is_some()),
            ("corsPolicy", r.cors_policy.is_some()),
            ("headers", r.headers.is_some()),
        ] {
            if set {
                self.warn(
                    format!("{path}.{field}"),
                    format!("{field} is accepted but not enforced by drover"),
                );
            }
        }
        if let Some(p) = &r.mirror_percentage
            && !(0.0..=100.0).contains(&p.value)
        {
            self.err(
                format!("{path}.mirrorPercentage.value"),
                format!("percentage {} must be between 0 and 100", p.value),
            );
        }
        if let Some(p) = r.mirror_percent
            && !(0..=100).contains(&p)
        {
            self.err(
                format!("{path}.mirrorPercent"),
                format!("percentage {p} must be between 0 and 100"),
            );
        }
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| self.http_match(&format!("{path}.match[{i}]"), m))
            .collect();
        let weights: Vec<(Option<&crd::Destination>, Option<i64>)> = r
            .route
            .iter()
            .map(|d| (d.destination.as_ref(), d.weight))
            .collect();
        let destinations = self.destinations(path, &weights);
        let retries = r.retries.as_ref().map(|rt| {
            let rp = format!("{path}.retries");
            policy::Retries {
                attempts: self
                    .count(&format!("{rp}.attempts"), rt.attempts)
                    .unwrap_or(0),
                per_try_timeout: self.duration(
                    &format!("{rp}.perTryTimeout"),
                    rt.per_try_timeout.as_ref(),
                    false,
                ),
                retry_on: match policy::RetryOn::parse(
                    rt.retry_on.as_deref().unwrap_or(policy::DEFAULT_RETRY_ON),
                ) {
                    Ok(on) => on,
                    Err(e) => {
                        self.err(format!("{rp}.retryOn"), e);
                        policy::RetryOn::default()
                    }
                },
            }
        });
        policy::HttpRoute {
            index,
            name: r.name.clone(),
            matches,
            destinations,
            timeout: self
                .duration(&format!("{path}.timeout"), r.timeout.as_ref(), true)
                .filter(|d| !d.is_zero()),
            retries,
        }
    }

    fn http_match(&mut self, path: &str, m: &crd::HttpMatchRequest) -> policy::HttpMatch {
        let mut out = policy::HttpMatch {
            uri: self.string_match(&format!("{path}.uri"), m.uri.as_ref(), true),
            scheme: self.string_match(&format!("{path}.scheme"), m.scheme.as_ref(), false),
            method: self.string_match(&format!("{path}.method"), m.method.as_ref(), false),
            authority: self.string_match(&format!("{path}.authority"), m.authority.as_ref(), false),
            ignore_uri_case: m.ignore_uri_case.unwrap_or(false),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
            ..Default::default()
        };
        for (field, from, to) in [
            ("headers", &m.headers, &mut out.headers),
            (
                "withoutHeaders",
                &m.without_headers,
                &mut out.without_headers,
            ),
        ] {
            for (name, sm) in from {
                let hp = format!("{path}.{field}.{name}");
                if name.is_empty() || !name.bytes().all(is_token_byte) {
                    self.errors.push(
                        self.origin
                            .problem(hp.clone(), format!("{name:?} is not a valid header name")),
                    );
                }
                let v = self.presence_match(&hp, sm);
                to.insert(name.to_ascii_lowercase(), v);
            }
        }
        for (name, sm) in &m.query_params {
            let v = self.presence_match(&format!("{path}.queryParams.{name}"), sm);
            out.query_params.insert(name.clone(), v);
        }
        out.port = m.port.and_then(|p| self.port(&format!("{path}.port"), p));
        self.labels(&format!("{path}.sourceLabels"), &m.source_labels);
        if !m.gateways.is_empty() {
            self.warn(
                format!("{path}.gateways"),
                "per-match gateways select gateway proxies; drover acts as gateway \"mesh\"",
            );
        }
        out
    }

    /// `{}` (or `regex: "*"`) means "present".
    fn presence_match(&mut self, path: &str, sm: &crd::StringMatch) -> Option<policy::StringMatch> {
        if sm == &crd::StringMatch::default() || sm.regex.as_deref() == Some("*") {
            return None;
        }
        self.string_match(path, Some(sm), false)
    }

    fn string_match(
        &mut self,
        path: &str,
        sm: Option<&crd::StringMatch>,
        empty_prefix_ok: bool,
    ) -> Option<policy::StringMatch> {
        let sm = sm?;
        let set = [&sm.exact, &sm.prefix, &sm.regex]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if set != 1 {
            self.err(path, "exactly one of exact, prefix or regex is required");
            return None;
        }
        if let Some(e) = &sm.exact {
            return Some(policy::StringMatch::Exact(e.clone()));
        }
        if let Some(p) = &sm.prefix {
            if p.is_empty() && !empty_prefix_ok {
                self.err(format!("{path}.prefix"), "prefix must not be empty");
            }
            return Some(policy::StringMatch::Prefix(p.clone()));
        }
        let re = sm.regex.clone().unwrap_or_default();
        if re.len() > 1024 {
            self.err(format!("{path}.regex"), "regex longer than 1024 characters");
            return None;
        }
        match policy::Pattern::new(&re) {
            Ok(p) => Some(policy::StringMatch::Regex(p)),
            Err(e) => {
                self.err(format!("{path}.regex"), format!("invalid regex: {e}"));
                None
            }
        }
    }

    fn l4_route(
        &mut self,
        path: &str,
        index: usize,
        matches: &[crd::L4MatchAttributes],
        route: &[crd::RouteDestination],
        tls: bool,
    ) -> policy::L4Route {
        if route.is_empty() {
            self.err(
                format!("{path}.route"),
                "at least one route destination is required",
            );
        }
        if tls && matches.is_empty() {
            self.err(
                format!("{path}.match"),
                "a TLS route needs at least one match",
            );
        }
        let mut out = Vec::new();
        for (i, m) in matches.iter().enumerate() {
            let mp = format!("{path}.match[{i}]");
            if tls && m.sni_hosts.is_empty() {
                self.err(
                    format!("{mp}.sniHosts"),
                    "sniHosts is required for TLS routes",
                );
            }
            let mut subnets = Vec::new();
            for (j, s) in m.destination_subnets.iter().enumerate() {
                match parse_cidr(s) {
                    Some(n) => subnets.push(n),
                    None => self.err(
                        format!("{mp}.destinationSubnets[{j}]"),
                        format!("{s:?} is not an IP address or CIDR"),
                    ),
                }
            }
            self.labels(&format!("{mp}.sourceLabels"), &m.source_labels);
            out.push(policy::L4Match {
                sni_hosts: m.sni_hosts.clone(),
                destination_subnets: subnets,
                port: m.port.and_then(|p| self.port(&format!("{mp}.port"), p)),
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
            });
        }
        let weights: Vec<_> = route
            .iter()
            .map(|d| (d.destination.as_ref(), d.weight))
            .collect();
        policy::L4Route {
            index,
            matches: out,
            destinations: self.destinations(path, &weights),
        }
    }

    fn destinations(
        &mut self,
        path: &str,
        list: &[(Option<&crd::Destination>, Option<i64>)],
    ) -> Vec<policy::WeightedDestination> {
        let mut out = Vec::new();
        let mut sum = 0i64;
        for (i, (dest, weight)) in list.iter().enumerate() {
            let dp = format!("{path}.route[{i}]");
            let weight = match weight {
                Some(w) if *w < 0 => {
                    self.err(
                        format!("{dp}.weight"),
                        format!("weight {w} must not be negative"),
                    );
                    0
                }
                Some(w) if *w > i64::from(u32::MAX) => {
                    self.err(format!("{dp}.weight"), format!("weight {w} is too large"));
                    0
                }
                Some(w) => *w as u32,
                None => 0,
            };
            sum += i64::from(weight);
            let Some(d) = dest else {
                self.err(format!("{dp}.destination"), "destination is required");
                continue;
            };
            if d.host.is_empty() {
                self.err(
                    format!("{dp}.destination.host"),
                    "destination host is required",
                );
                continue;
            }
            if let Err(e) = check_host(&d.host) {
                self.err(format!("{dp}.destination.host"), e);
            }
            if let Some(s) = &d.subset
                && !is_dns_label(s)
            {
                self.err(
                    format!("{dp}.destination.subset"),
                    format!("subset name {s:?} is not a DNS-1123 label"),
                );
            }
            let port = d
                .port
                .as_ref()
                .and_then(|p| p.number)
                .and_then(|n| self.port(&format!("{dp}.destination.port.number"), n));
            out.push(policy::WeightedDestination {
                host: qualify(&d.host, &self.namespace),
                subset: d.subset.clone().filter(|s| !s.is_empty()),
                port,
                weight,
                index: i,
            });
        }
        if list.len() > 1 && sum == 0 {
            self.err(
                format!("{path}.route"),
                "weights of a multi-destination route must not all be 0",
            );
        }
        if list.len() == 1
            && let Some(d) = out.first_mut()
        {
            // A single destination takes all traffic whatever its weight.
            d.weight = 1;
        } else if list.len() > 1 {
            // Weight-0 destinations are dropped.
            out.retain(|d| d.weight > 0);
        }
        out
    }

    // --- scalars ---

    /// A connection-pool limit: negative is an error, 0 means unset.
    fn limit(&mut self, path: &str, v: Option<i64>) -> Option<u32> {
        self.count(path, v).filter(|n| *n > 0)
    }

    /// A non-negative 32-bit count.
    fn count(&mut self, path: &str, v: Option<i64>) -> Option<u32> {
        let v = v?;
        match u32::try_from(v) {
            Ok(n) if v <= i64::from(i32::MAX) => Some(n),
            _ if v < 0 => {
                self.err(path, format!("{v} must not be negative"));
                None
            }
            _ => {
                self.err(path, format!("{v} is larger than {}", i32::MAX));
                None
            }
        }
    }

    fn percent(&mut self, path: &str, v: Option<i64>) -> Option<u32> {
        let v = v?;
        if (0..=100).contains(&v) {
            Some(v as u32)
        } else {
            self.err(path, format!("percentage {v} must be between 0 and 100"));
            None
        }
    }

    fn port(&mut self, path: &str, n: i64) -> Option<u16> {
        match u16::try_from(n) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.err(path, format!("port {n} is out of range 1-65535"));
                None
            }
        }
    }

    /// Parses an Istio duration; `allow_zero` for the fields where `0s` means "disabled".
    fn duration(
        &mut self,
        path: &str,
        d: Option<&RawDuration>,
        allow_zero: bool,
    ) -> Option<Duration> {
        let d = d?;
        match parse_duration(&d.0) {
            Err(e) => {
                self.err(path, e);
                None
            }
            Ok(v) if v.is_zero() && allow_zero => Some(v),
            Ok(v) if v < Duration::from_millis(1) => {
                self.err(path, format!("duration {:?} must be at least 1ms", d.0));
                None
            }
            Ok(v) if v.subsec_nanos() % 1_000_000 != 0 => {
                self.err(
                    path,
                    format!("duration {:?} has more than millisecond precision", d.0),
                );
                None
            }
            Ok(v) => Some(v),
        }
    }
}

// === free functions ===

/// Expands a short name (no dot) with the namespace; anything with a dot, and `*`, is verbatim.
pub fn qualify(host: &str, namespace: &str) -> String {
    if host.contains('.') || host == "*" || host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.{CLUSTER_DOMAIN}")
    }
}

/// Parses `1h30m`, `1.5s`, `100ms`, `250us`, `10ns` (Go duration syntax, as Istio accepts).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (expected e.g. 100ms, 1.5s, 10s, 1m, 1h)");
    if s.starts_with('-') {
        return Err(format!("duration {s:?} must not be negative"));
    }
    let s2 = s.strip_prefix('+').unwrap_or(s);
    if s2.is_empty() {
        return Err(bad());
    }
    if s2 == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s2;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(format!("duration {s:?} is too large"));
    }
    // Round to whole nanoseconds so that "1.5s" is exact.
    Ok(Duration::from_nanos((total * 1e9).round() as u64))
}

/// A DR/VS host: DNS name, optionally with a leading `*` label, or `*`; never an IP literal.
pub fn check_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host.parse::<IpAddr>().is_ok()
        || name
            .rsplit('.')
            .next()
            .is_some_and(|tld| !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "{host:?} is an IP address; a host name is required"
        ));
    }
    check_fqdn(name).map_err(|e| format!("{host:?} is not a valid host: {e}"))
}

fn check_fqdn(name: &str) -> Result<(), String> {
    if name.len() > 255 {
        return Err("longer than 255 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("labels must have 1-63 characters".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(format!("invalid label {label:?}"));
        }
    }
    Ok(())
}

/// DNS-1123 label: lower-case alphanumerics and `-`, 1-63 characters, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn check_label_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix
        && check_fqdn(&p.to_ascii_lowercase()).is_err()
    {
        return Err(format!("label key prefix {p:?} is not a DNS subdomain"));
    }
    if name.is_empty() || !is_label_value(name) {
        return Err(format!("{k:?} is not a valid label key"));
    }
    Ok(())
}

fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric())
}

/// `region/zone/subzone` with at most one `*`, as the last segment.
fn check_locality_wildcard(l: &str) -> Result<(), String> {
    if l.is_empty() {
        return Err("locality must not be empty".into());
    }
    let stars = l.matches('*').count();
    if stars > 1 || (stars == 1 && !(l == "*" || l.ends_with("/*"))) {
        return Err(format!(
            "locality {l:?}: a wildcard is allowed only once, as the last segment"
        ));
    }
    if l.split('/').count() > 3 {
        return Err(format!("locality {l:?} has more than region/zone/subzone"));
    }
    Ok(())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut i = 2u64;
    while i * i <= n {
        if n.is_multiple_of(i) {
            return false;
        }
        i += 1;
    }
    true
}

fn is_catch_all(m: &policy::HttpMatch) -> bool {
    m == &policy::HttpMatch::default()
        || (m.uri == Some(policy::StringMatch::Prefix("/".into()))
            && policy::HttpMatch {
                uri: None,
                ..m.clone()
            } == policy::HttpMatch::default())
}

/// `10.0.0.0/8`, `fd00::/64` or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, l.parse::<u8>().ok()?),
        None => {
            let a = s.parse::<IpAddr>().ok()?;
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
