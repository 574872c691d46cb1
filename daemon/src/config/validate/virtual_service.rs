//! `VirtualService` rules: hosts, gateways, HTTP routes and their matches, TCP/TLS routes and
//! weighted destinations.

use super::*;

impl Checker<'_> {
    pub(super) fn virtual_service(
        &mut self,
        spec: &crd::VirtualServiceSpec,
    ) -> policy::VirtualService {
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
        self.http_actions(path, r);
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| self.http_match(&format!("{path}.match[{i}]"), m))
            .collect();
        let list: Vec<_> = r
            .route
            .iter()
            .map(|d| (d.destination.as_ref(), d.weight, d.headers.as_ref()))
            .collect();
        let destinations = self.destinations(path, &list);
        let retries = r.retries.as_ref().map(|rt| self.retries(path, rt));
        policy::HttpRoute {
            index,
            name: r.name.clone(),
            label: None,
            matches,
            destinations,
            timeout: self
                .duration(&format!("{path}.timeout"), r.timeout.as_ref(), true)
                .filter(|d| !d.is_zero()),
            retries,
            headers: self.header_rules(&format!("{path}.headers"), r.headers.as_ref()),
            rewrite: r.rewrite.as_ref().map(|rw| self.rewrite(path, rw)),
            local: self.local_reply(path, r),
            fault: r.fault.as_ref().map(|f| self.fault(path, f)),
            cors: r.cors_policy.as_ref().map(|c| self.cors(path, c)),
            mirrors: self.mirrors(path, r),
        }
    }

    /// What a route needs besides destinations (one of route, redirect, directResponse or
    /// delegate), and the fields accepted but not enforced (warned about, located).
    fn http_actions(&mut self, path: &str, r: &crd::HttpRoute) {
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
        if r.delegate.is_some() {
            self.warn(
                format!("{path}.delegate"),
                "delegate is accepted but not enforced by drover",
            );
        }
    }

    /// `mirror` (its percentage from `mirrorPercentage`, else the deprecated `mirrorPercent`,
    /// else 100) or `mirrors` (each with its `percentage`, 100 when absent).
    fn mirrors(
        &mut self,
        path: &str,
        r: &crd::HttpRoute,
    ) -> Vec<(policy::WeightedDestination, f64)> {
        let check = |this: &mut Self, at: String, v: f64| {
            if !(0.0..=100.0).contains(&v) {
                this.err(at, format!("percentage {v} must be between 0 and 100"));
            }
            v.clamp(0.0, 100.0)
        };
        if r.mirror.is_some() && !r.mirrors.is_empty() {
            self.err(path, "mirror and mirrors are mutually exclusive");
        }
        if r.mirror.is_none() {
            // Checked even without a mirror to apply to, as Istio does.
            if let Some(p) = &r.mirror_percentage {
                check(self, format!("{path}.mirrorPercentage.value"), p.value);
            }
            if let Some(p) = r.mirror_percent {
                check(self, format!("{path}.mirrorPercent"), p as f64);
            }
        }
        if let Some(m) = &r.mirror {
            let pct = match (&r.mirror_percentage, r.mirror_percent) {
                (Some(p), _) => check(self, format!("{path}.mirrorPercentage.value"), p.value),
                (None, Some(p)) => check(self, format!("{path}.mirrorPercent"), p as f64),
                (None, None) => 100.0,
            };
            return self
                .destination(&format!("{path}.mirror"), Some(m), 0)
                .map(|d| vec![(d, pct)])
                .unwrap_or_default();
        }
        let mut out = Vec::new();
        for (i, m) in r.mirrors.iter().enumerate() {
            let mp = format!("{path}.mirrors[{i}]");
            let pct = m.percentage.as_ref().map_or(100.0, |p| {
                check(self, format!("{mp}.percentage.value"), p.value)
            });
            if let Some(d) =
                self.destination(&format!("{mp}.destination"), m.destination.as_ref(), i)
            {
                out.push((d, pct));
            }
        }
        out
    }

    fn retries(&mut self, path: &str, rt: &crd::HttpRetry) -> policy::Retries {
        let rp = format!("{path}.retries");
        let out = policy::Retries {
            attempts: self
                .count(&format!("{rp}.attempts"), rt.attempts)
                .unwrap_or(0),
            per_try_timeout: self.duration(
                &format!("{rp}.perTryTimeout"),
                rt.per_try_timeout.as_ref(),
                false,
            ),
            retry_on: match rt.retry_on.as_deref().map(policy::RetryOn::parse) {
                None => policy::RetryOn::istio_default(),
                Some(Ok(on)) => on,
                Some(Err(e)) => {
                    self.err(format!("{rp}.retryOn"), e);
                    policy::RetryOn::default()
                }
            },
            backoff: self
                .duration(&format!("{rp}.backoff"), rt.backoff.as_ref(), false)
                .filter(|d| !d.is_zero()),
            ignore_previous_hosts: rt.retry_ignore_previous_hosts.unwrap_or(true),
        };
        if rt.retry_remote_localities == Some(true) {
            self.warn(
                format!("{rp}.retryRemoteLocalities"),
                "retryRemoteLocalities is accepted but not enforced by drover: retries follow the normal priority split",
            );
        }
        out
    }

    fn http_match(&mut self, path: &str, m: &crd::HttpMatchRequest) -> policy::HttpMatch {
        if m.stat_prefix.is_some() {
            self.warn(
                format!("{path}.statPrefix"),
                "statPrefix is accepted but not enforced by drover (no per-route statistics)",
            );
        }
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

    pub(super) fn string_match(
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
            if !tls && !m.sni_hosts.is_empty() {
                self.warn(
                    format!("{mp}.sniHosts"),
                    "sniHosts belongs to tls routes (Istio's tcp match has no such field); ignored",
                );
            }
            if !m.gateways.is_empty() {
                self.warn(
                    format!("{mp}.gateways"),
                    "per-match gateways select gateway proxies; drover acts as gateway \"mesh\" and ignores them",
                );
            }
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
            .map(|d| (d.destination.as_ref(), d.weight, None))
            .collect();
        policy::L4Route {
            index,
            label: None,
            matches: out,
            destinations: self.destinations(path, &weights),
        }
    }

    /// One `destination` at `dp` (index `i` in its list), weight 0 and no headers.
    fn destination(
        &mut self,
        dp: &str,
        dest: Option<&crd::Destination>,
        i: usize,
    ) -> Option<policy::WeightedDestination> {
        let Some(d) = dest else {
            self.err(dp, "destination is required");
            return None;
        };
        if d.host.is_empty() {
            self.err(format!("{dp}.host"), "destination host is required");
            return None;
        }
        if let Err(e) = check_host(&d.host) {
            self.err(format!("{dp}.host"), e);
        }
        if let Some(s) = &d.subset
            && !is_dns_label(s)
        {
            self.err(
                format!("{dp}.subset"),
                format!("subset name {s:?} is not a DNS-1123 label"),
            );
        }
        let port = d
            .port
            .as_ref()
            .and_then(|p| p.number)
            .and_then(|n| self.port(&format!("{dp}.port.number"), n));
        Some(policy::WeightedDestination {
            host: qualify(&d.host, &self.namespace),
            subset: d.subset.clone().filter(|s| !s.is_empty()),
            port,
            weight: 0,
            index: i,
            headers: policy::HeaderRules::default(),
            invalid: None,
        })
    }

    fn destinations(
        &mut self,
        path: &str,
        list: &[(
            Option<&crd::Destination>,
            Option<i64>,
            Option<&crd::Headers>,
        )],
    ) -> Vec<policy::WeightedDestination> {
        let mut out = Vec::new();
        let mut sum = 0i64;
        for (i, (dest, weight, headers)) in list.iter().enumerate() {
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
            if let Some(mut d) = self.destination(&format!("{dp}.destination"), *dest, i) {
                d.weight = weight;
                d.headers = self.header_rules(&format!("{dp}.headers"), *headers);
                out.push(d);
            }
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
}
