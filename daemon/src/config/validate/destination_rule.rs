//! `DestinationRule` rules: host, traffic policy (load balancer, consistent hash, locality,
//! connection pool, outlier detection, TLS), subsets and their port-level overrides.

use super::*;

impl Checker<'_> {
    pub(super) fn destination_rule(
        &mut self,
        spec: &crd::DestinationRuleSpec,
    ) -> policy::DestinationRule {
        if spec.host.is_empty() {
            self.err("spec.host", "host is required");
        } else if let Err(e) = check_host(&spec.host) {
            self.err("spec.host", e);
        }
        let traffic_policy = spec
            .traffic_policy
            .as_ref()
            .map(|tp| self.traffic_policy("spec.trafficPolicy", tp));
        let subsets = self.subsets(&spec.subsets);
        let workload_selector = spec
            .workload_selector
            .as_ref()
            .map(|ws| self.match_labels(&ws.match_labels));
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
                "locality failover needs outlierDetection (as in Istio): without it every endpoint stays in one priority and failover never happens",
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

    fn subsets(&mut self, list: &[Option<crd::Subset>]) -> Vec<policy::Subset> {
        let mut subsets = Vec::new();
        let mut names = HashSet::new();
        for (i, s) in list.iter().enumerate() {
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
        subsets
    }

    /// A rule's `workloadSelector.matchLabels`.
    fn match_labels(
        &mut self,
        match_labels: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        if match_labels.is_empty() {
            self.warn(
                "spec.workloadSelector.matchLabels",
                "empty matchLabels selects every workload in the namespace",
            );
        }
        for (k, v) in match_labels {
            let field = format!("spec.workloadSelector.matchLabels.{k}");
            if k.is_empty() || k.contains('*') || v.contains('*') {
                self.err(
                    field,
                    "empty keys and wildcards are not allowed in matchLabels",
                );
            }
        }
        match_labels.clone()
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
        let port_level = self.port_level_settings(path, &tp.port_level_settings);
        let tunnel = tp.tunnel.as_ref().map(|t| self.tunnel(path, t));
        let proxy_protocol = tp.proxy_protocol.as_ref().map(|p| match p.version {
            Some(crd::ProxyProtocolVersion::V2) => policy::ProxyProtocolVersion::V2,
            _ => policy::ProxyProtocolVersion::V1,
        });
        if tunnel.as_ref().is_some_and(|t| t.protocol == "POST") {
            self.warn(
                format!("{path}.tunnel.protocol"),
                "tunnel protocol POST is not enforced by drover (CONNECT is): connections go to the endpoint directly",
            );
        }
        if tunnel.is_some() && proxy_protocol.is_some() {
            self.err(
                format!("{path}.proxyProtocol"),
                "proxyProtocol and tunnel are mutually exclusive",
            );
        }
        let retry_budget = tp.retry_budget.as_ref().map(|r| self.retry_budget(path, r));
        policy::TrafficPolicy {
            blocks,
            port_level,
            tunnel,
            proxy_protocol,
            retry_budget,
        }
    }

    /// `portLevelSettings`: (index, port, blocks) of each entry with a valid, unique port.
    fn port_level_settings(
        &mut self,
        path: &str,
        settings: &[crd::PortTrafficPolicy],
    ) -> Vec<(usize, u16, Blocks)> {
        if settings.len() > MAX_PORT_LEVEL {
            self.err(
                format!("{path}.portLevelSettings"),
                format!("at most {MAX_PORT_LEVEL} entries are allowed"),
            );
        }
        let mut port_level = Vec::new();
        let mut seen = HashSet::new();
        for (i, p) in settings.iter().enumerate() {
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
        port_level
    }

    fn tunnel(&mut self, path: &str, t: &crd::TunnelSettings) -> policy::Tunnel {
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
        } else if t.target_host.parse::<IpAddr>().is_err() && check_fqdn(&t.target_host).is_err() {
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
    }

    fn retry_budget(&mut self, path: &str, r: &crd::RetryBudget) -> policy::RetryBudget {
        let rp = format!("{path}.retryBudget");
        let percent = r.percent.unwrap_or(20.0);
        if !(0.0..=100.0).contains(&percent) {
            self.err(
                format!("{rp}.percent"),
                format!("percent {percent} must be between 0 and 100"),
            );
        }
        if r.budget_interval.is_some() {
            self.warn(
                format!("{rp}.budgetInterval"),
                "budgetInterval is accepted but not enforced by drover: the budget counts the retries in flight, as Envoy's does",
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
        let warmup = self.warmup(path, lb);
        if warmup.is_some()
            && matches!(algorithm, A::Random | A::Passthrough | A::ConsistentHash(_))
        {
            let field = match lb.warmup {
                Some(_) => format!("{path}.warmup"),
                None => format!("{path}.warmupDurationSecs"),
            };
            self.warn(
                field,
                format!(
                    "warmup only applies to ROUND_ROBIN and LEAST_REQUEST (as in Envoy); ignored for {}",
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

    /// `warmup` (or the older `warmupDurationSecs`), with Istio's defaults inside.
    fn warmup(&mut self, path: &str, lb: &crd::LoadBalancerSettings) -> Option<policy::Warmup> {
        match (&lb.warmup, &lb.warmup_duration_secs) {
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
        }
    }

    fn hash_cookie(&mut self, cp: &str, c: &crd::HttpCookie) -> policy::HashKey {
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
        policy::HashKey::Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: self.duration(&format!("{cp}.ttl"), c.ttl.as_ref(), true),
            attributes: c
                .attributes
                .iter()
                .map(|a| (a.name.clone(), a.value.clone()))
                .collect(),
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
            keys.push(self.hash_cookie(&format!("{path}.httpCookie"), c));
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
        let ring = self.hash_ring(path, ch);
        policy::ConsistentHash {
            key: keys.into_iter().next().unwrap_or(K::SourceIp),
            ring,
        }
    }

    /// The hash ring: `ringHash` (Istio's default, 1024 entries at least) or `maglev`.
    fn hash_ring(&mut self, path: &str, ch: &crd::ConsistentHash) -> policy::HashRing {
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
        match (&ch.ring_hash, &ch.maglev) {
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
        self.failover_priority_keys(path, &l.failover_priority);
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

    /// `failoverPriority` keys drover compares as plain labels where Istio has a special rule.
    fn failover_priority_keys(&mut self, path: &str, keys: &[String]) {
        for (i, p) in keys.iter().enumerate() {
            let key = p.split('=').next().unwrap_or("");
            if matches!(
                key,
                "topology.istio.io/network" | "topology.istio.io/cluster"
            ) {
                self.warn(
                    format!("{path}.failoverPriority[{i}]"),
                    format!("{key} is compared as a plain label: drover has no multi-network or multi-cluster endpoints, so Istio's network ordering does not apply"),
                );
            }
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
            self.pool_tcp(&format!("{path}.tcp"), t, &mut out);
        }
        if let Some(h) = &p.http {
            self.pool_http(&format!("{path}.http"), h, &mut out);
        }
        out
    }

    /// `connectionPool.tcp` at `tp`, into `out`.
    fn pool_tcp(&mut self, tp: &str, t: &crd::TcpSettings, out: &mut policy::ConnectionPool) {
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
        if let Some(d) = self.duration(&format!("{tp}.idleTimeout"), t.idle_timeout.as_ref(), true)
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

    /// `connectionPool.http` at `hp`, into `out`.
    fn pool_http(&mut self, hp: &str, h: &crd::HttpSettings, out: &mut policy::ConnectionPool) {
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
        if let Some(d) = self.duration(&format!("{hp}.idleTimeout"), h.idle_timeout.as_ref(), false)
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
        self.tls_files(path, &out);
        if out.insecure_skip_verify {
            self.insecure_skip_verify(path, &out);
        }
        out
    }
    /// Where the certificates come from: `credentialName` excludes the file fields; `MUTUAL`
    /// without it needs a client certificate and key.
    fn tls_files(&mut self, path: &str, out: &policy::ClientTls) {
        let mode = out.mode;
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
    }

    /// `insecureSkipVerify` cannot be combined with what it would skip.
    fn insecure_skip_verify(&mut self, path: &str, out: &policy::ClientTls) {
        let mode = out.mode;
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
}
