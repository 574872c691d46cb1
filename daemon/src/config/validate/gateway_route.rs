//! Gateway API mesh routes (`HTTPRoute`, `GRPCRoute`, `TCPRoute`) and `ReferenceGrant`: the
//! spec's rules (and the CRDs' CEL rules, which an API server would enforce) checked field by
//! field, and each rule turned into the route model VirtualServices use. Defaults are the
//! spec's: a rule without matches matches `PathPrefix /`; a path match is a `PathPrefix` on
//! whole segments; a header or query match is `Exact`; a backend weighs 1; a redirect answers
//! 302; a rule with no usable backend answers 500.

use hyper::{StatusCode, header::HeaderValue};

use super::*;
use crate::config::crd::gateway as gw;

/// The HTTP methods `matches[].method` accepts.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// `backendRefs[].weight` maximum.
const MAX_WEIGHT: i64 = 1_000_000;

/// What a route's kind-specific rules hand to the common part: a rule's matches (already in
/// the VirtualService model), its filters and its backends.
struct Rule<'a> {
    path: String,
    index: usize,
    name: Option<&'a str>,
    matches: Vec<policy::HttpMatch>,
    filters: &'a [gw::HttpRouteFilter],
    backends: &'a [gw::BackendRef],
}

impl TryFrom<&Resource<gw::HttpRouteSpec>> for Validated<policy::MeshRoute> {
    type Error = Invalid;

    fn try_from(res: &Resource<gw::HttpRouteSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.http_route_spec(&res.spec, &res.id());
        c.finish(value)
    }
}

impl TryFrom<&Resource<gw::GrpcRouteSpec>> for Validated<policy::MeshRoute> {
    type Error = Invalid;

    fn try_from(res: &Resource<gw::GrpcRouteSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.grpc_route_spec(&res.spec, &res.id());
        c.finish(value)
    }
}

impl TryFrom<&Resource<gw::TcpRouteSpec>> for Validated<policy::MeshRoute> {
    type Error = Invalid;

    fn try_from(res: &Resource<gw::TcpRouteSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.tcp_route_spec(&res.spec, &res.id());
        c.finish(value)
    }
}

impl TryFrom<&Resource<gw::ReferenceGrantSpec>> for Validated<policy::ReferenceGrant> {
    type Error = Invalid;

    fn try_from(res: &Resource<gw::ReferenceGrantSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.reference_grant(&res.spec);
        c.finish(value)
    }
}

impl Checker<'_> {
    fn http_route_spec(&mut self, spec: &gw::HttpRouteSpec, id: &str) -> policy::MeshRoute {
        let kind = policy::RouteKind::Http;
        let mut out = self.mesh_route(kind, &spec.parent_refs, &spec.hostnames);
        for (i, r) in spec.rules.iter().enumerate() {
            let path = format!("spec.rules[{i}]");
            let matches = if r.matches.is_empty() {
                vec![default_match()]
            } else {
                (r.matches.iter().enumerate())
                    .map(|(j, m)| self.route_match(&format!("{path}.matches[{j}]"), m))
                    .collect()
            };
            let rule = Rule {
                path: path.clone(),
                index: i,
                name: r.name.as_deref(),
                matches,
                filters: &r.filters,
                backends: &r.backend_refs,
            };
            let mut routes = self.rule(kind, id, rule, &mut out.foreign);
            self.timeouts_and_retry(&path, r, &mut routes);
            if r.session_persistence.is_some() {
                self.warn(
                    format!("{path}.sessionPersistence"),
                    "sessionPersistence is accepted but not enforced by drover",
                );
            }
            out.http.extend(routes);
        }
        out
    }

    fn grpc_route_spec(&mut self, spec: &gw::GrpcRouteSpec, id: &str) -> policy::MeshRoute {
        let kind = policy::RouteKind::Grpc;
        let mut out = self.mesh_route(kind, &spec.parent_refs, &spec.hostnames);
        for (i, r) in spec.rules.iter().enumerate() {
            let path = format!("spec.rules[{i}]");
            let matches = if r.matches.is_empty() {
                vec![default_match()]
            } else {
                (r.matches.iter().enumerate())
                    .map(|(j, m)| self.grpc_match(&format!("{path}.matches[{j}]"), m))
                    .collect()
            };
            for (j, f) in r.filters.iter().enumerate() {
                if matches!(f.kind.as_str(), "RequestRedirect" | "URLRewrite") {
                    self.err(
                        format!("{path}.filters[{j}].type"),
                        format!("{} is not a GRPCRoute filter", f.kind),
                    );
                }
            }
            let rule = Rule {
                path: path.clone(),
                index: i,
                name: r.name.as_deref(),
                matches,
                filters: &r.filters,
                backends: &r.backend_refs,
            };
            out.http.extend(self.rule(kind, id, rule, &mut out.foreign));
            if r.session_persistence.is_some() {
                self.warn(
                    format!("{path}.sessionPersistence"),
                    "sessionPersistence is accepted but not enforced by drover",
                );
            }
        }
        out
    }

    fn tcp_route_spec(&mut self, spec: &gw::TcpRouteSpec, id: &str) -> policy::MeshRoute {
        let mut out = self.mesh_route(policy::RouteKind::Tcp, &spec.parent_refs, &[]);
        if spec.rules.is_empty() {
            self.err("spec.rules", "a TCPRoute needs at least one rule");
        }
        for (i, r) in spec.rules.iter().enumerate() {
            let path = format!("spec.rules[{i}]");
            if i > 0 {
                self.warn(
                    path.clone(),
                    "unreachable: a TCPRoute rule has no matches, so rules[0] takes every connection",
                );
            }
            let backends: Vec<gw::BackendRef> =
                r.backend_refs.iter().map(|b| b.backend()).collect();
            let destinations = self.backends(&path, &backends, &mut out.foreign);
            out.tcp.push(policy::L4Route {
                index: i,
                label: Some(label(policy::RouteKind::Tcp, id, i, r.name.as_deref())),
                matches: Vec::new(),
                destinations,
            });
        }
        out
    }

    /// The parents, and a note for what the mesh does not use.
    fn mesh_route(
        &mut self,
        kind: policy::RouteKind,
        parents: &[gw::ParentRef],
        hostnames: &[String],
    ) -> policy::MeshRoute {
        if parents.is_empty() {
            self.warn(
                "spec.parentRefs",
                "no parentRefs: the route is attached to nothing",
            );
        }
        let mut out = policy::MeshRoute {
            kind,
            parents: Vec::new(),
            http: Vec::new(),
            tcp: Vec::new(),
            foreign: Vec::new(),
        };
        for (i, p) in parents.iter().enumerate() {
            let field = format!("spec.parentRefs[{i}]");
            let group = p.group.as_deref().unwrap_or("gateway.networking.k8s.io");
            let service_entry = match (group, p.kind.as_deref().unwrap_or("Gateway")) {
                ("" | "core", "Service") => false,
                ("networking.istio.io", "ServiceEntry") => true,
                ("gateway.networking.k8s.io", "Gateway") => {
                    let at = self.origin.problem(&field, "");
                    tracing::info!(location = %at.location, "parentRef names a Gateway: drover is not an ingress, that binding is left to the gateway");
                    continue;
                }
                (g, k) => {
                    self.warn(
                        field,
                        format!("parentRef of kind {k:?} (group {g:?}) is not supported; only a Service or a ServiceEntry binds a route to the mesh"),
                    );
                    continue;
                }
            };
            if p.name.is_empty() {
                self.err(format!("{field}.name"), "name is required");
                continue;
            }
            if p.section_name.is_some() {
                self.warn(
                    format!("{field}.sectionName"),
                    "sectionName has no meaning for a Service parent; use port (ignored)",
                );
            }
            let port = p.port.and_then(|n| self.port(&format!("{field}.port"), n));
            out.parents.push(policy::MeshParent {
                service_entry,
                namespace: p
                    .namespace
                    .clone()
                    .unwrap_or_else(|| self.namespace.clone()),
                name: p.name.clone(),
                port,
                field,
            });
        }
        if !hostnames.is_empty() && !out.parents.is_empty() {
            self.warn(
                "spec.hostnames",
                "hostnames are not used by mesh routes: a mesh route applies to the parent Service's address, whatever the Host header",
            );
        }
        out
    }

    /// One rule's routes: one per match, each with the rule's filters and backends.
    fn rule(
        &mut self,
        kind: policy::RouteKind,
        id: &str,
        rule: Rule<'_>,
        foreign: &mut Vec<(String, String, String)>,
    ) -> Vec<policy::HttpRoute> {
        let Rule {
            path,
            index,
            name,
            matches,
            filters,
            backends,
        } = rule;
        let mut route = policy::HttpRoute {
            index,
            name: name.map(str::to_string),
            label: Some(label(kind, id, index, name)),
            matches: Vec::new(),
            destinations: self.backends(&path, backends, foreign),
            timeout: None,
            retries: None,
            headers: policy::HeaderRules::default(),
            rewrite: None,
            local: None,
            fault: None,
            cors: None,
            mirrors: Vec::new(),
        };
        let mut seen = std::collections::HashSet::new();
        for (j, f) in filters.iter().enumerate() {
            let fp = format!("{path}.filters[{j}]");
            if f.kind != "RequestMirror" && !seen.insert(f.kind.as_str()) {
                self.err(
                    format!("{fp}.type"),
                    format!("{} may appear only once in a rule", f.kind),
                );
            }
            self.filter(&fp, f, &mut route, &matches, foreign);
        }
        if route.rewrite.is_some() && route.local.is_some() {
            self.err(
                format!("{path}.filters"),
                "RequestRedirect and URLRewrite cannot be used together",
            );
        }
        let usable = (route.destinations.iter()).any(|d| d.weight > 0);
        if route.local.is_none() && !usable {
            // No backend (or every weight 0): the spec's 500.
            route.local = Some(policy::LocalReply::Direct {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                body: Vec::new(),
            });
        }
        matches
            .into_iter()
            .map(|m| policy::HttpRoute {
                matches: vec![m],
                ..route.clone()
            })
            .collect()
    }

    /// One filter of a rule, applied to `route`.
    fn filter(
        &mut self,
        fp: &str,
        f: &gw::HttpRouteFilter,
        route: &mut policy::HttpRoute,
        matches: &[policy::HttpMatch],
        foreign: &mut Vec<(String, String, String)>,
    ) {
        let missing = |c: &mut Self, block: &str| {
            c.err(
                format!("{fp}.{block}"),
                format!("filter type {} needs its {block} block", f.kind),
            );
        };
        match f.kind.as_str() {
            "RequestHeaderModifier" => match &f.request_header_modifier {
                Some(m) => {
                    route.headers.request =
                        self.header_modifier(&format!("{fp}.requestHeaderModifier"), m);
                }
                None => missing(self, "requestHeaderModifier"),
            },
            "ResponseHeaderModifier" => match &f.response_header_modifier {
                Some(m) => {
                    route.headers.response =
                        self.header_modifier(&format!("{fp}.responseHeaderModifier"), m);
                }
                None => missing(self, "responseHeaderModifier"),
            },
            "RequestRedirect" => match &f.request_redirect {
                Some(r) => {
                    let redirect = self.request_redirect(&format!("{fp}.requestRedirect"), r);
                    if redirect.replace_prefix {
                        self.prefix_only(&format!("{fp}.requestRedirect.path"), matches);
                    }
                    route.local = Some(policy::LocalReply::Redirect(redirect));
                }
                None => missing(self, "requestRedirect"),
            },
            "URLRewrite" => match &f.url_rewrite {
                Some(r) => {
                    route.rewrite = Some(self.url_rewrite(&format!("{fp}.urlRewrite"), r, matches));
                }
                None => missing(self, "urlRewrite"),
            },
            "RequestMirror" => match &f.request_mirror {
                Some(m) => {
                    let mp = format!("{fp}.requestMirror");
                    let percent = self.mirror_percent(&mp, m);
                    let bp = format!("{mp}.backendRef");
                    if let Some(d) = self.backend(&bp, 0, &m.backend_ref, foreign) {
                        route.mirrors.push((d, percent));
                    }
                }
                None => missing(self, "requestMirror"),
            },
            "ExtensionRef" => self.err(
                format!("{fp}.type"),
                "ExtensionRef filters are not supported by drover (no extensions)",
            ),
            "CORS" | "ExternalAuth" => self.err(
                format!("{fp}.type"),
                format!("the {} filter is not built in drover", f.kind),
            ),
            other => self.err(
                format!("{fp}.type"),
                format!("unknown filter type {other:?}"),
            ),
        }
    }

    /// `URLRewrite`: the path (full, or the matched prefix) and the host.
    fn url_rewrite(
        &mut self,
        rp: &str,
        r: &gw::UrlRewrite,
        matches: &[policy::HttpMatch],
    ) -> policy::Rewrite {
        let (uri, full_path) = match &r.path {
            None => (None, false),
            Some(p) => {
                let (uri, prefix) = self.path_modifier(&format!("{rp}.path"), p);
                if prefix {
                    self.prefix_only(&format!("{rp}.path"), matches);
                }
                (uri, !prefix)
            }
        };
        if let Some(h) = &r.hostname
            && let Err(e) = check_host(h)
        {
            self.err(format!("{rp}.hostname"), e);
        }
        policy::Rewrite {
            uri,
            full_path,
            authority: r.hostname.clone(),
            uri_regex: None,
        }
    }

    /// A mirror's share of requests, in percent: `percent`, or `fraction`, else all.
    fn mirror_percent(&mut self, mp: &str, m: &gw::RequestMirror) -> f64 {
        match (m.percent, &m.fraction) {
            (Some(_), Some(_)) => {
                self.err(mp, "percent and fraction cannot both be set");
                100.0
            }
            (Some(p), None) if (0..=100).contains(&p) => p as f64,
            (Some(p), None) => {
                self.err(format!("{mp}.percent"), format!("{p} is not in 0-100"));
                100.0
            }
            (None, Some(fr)) => {
                let d = fr.denominator.unwrap_or(100);
                if d < 1 || fr.numerator < 0 || fr.numerator > d {
                    self.err(
                        format!("{mp}.fraction"),
                        "needs 0 <= numerator <= denominator and denominator >= 1",
                    );
                    100.0
                } else {
                    fr.numerator as f64 * 100.0 / d as f64
                }
            }
            (None, None) => 100.0,
        }
    }

    /// `ReplacePrefixMatch` is defined only over a `PathPrefix` match.
    fn prefix_only(&mut self, path: &str, matches: &[policy::HttpMatch]) {
        let all_prefix =
            (matches.iter()).all(|m| matches!(m.uri, Some(policy::StringMatch::PathPrefix(_))));
        if !all_prefix {
            self.err(
                path,
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix path match",
            );
        }
    }

    /// `path` of a redirect or rewrite: (the replacement, whether it replaces the prefix only).
    fn path_modifier(&mut self, path: &str, p: &gw::PathModifier) -> (Option<String>, bool) {
        let (value, prefix) = match p.kind.as_str() {
            "ReplaceFullPath" => (p.replace_full_path.clone(), false),
            "ReplacePrefixMatch" => (p.replace_prefix_match.clone(), true),
            other => {
                self.err(
                    format!("{path}.type"),
                    format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
                );
                return (None, false);
            }
        };
        let Some(value) = value else {
            self.err(
                path,
                format!("type {} needs its value ({})", p.kind, lower_first(&p.kind)),
            );
            return (None, false);
        };
        if !value.starts_with('/') {
            self.err(path, format!("{value:?} must start with /"));
        }
        (Some(value), prefix)
    }

    fn request_redirect(&mut self, rp: &str, r: &gw::RequestRedirect) -> policy::Redirect {
        let scheme = r.scheme.clone();
        if let Some(s) = &scheme
            && s != "http"
            && s != "https"
        {
            self.err(
                format!("{rp}.scheme"),
                format!("{s:?} is not http or https"),
            );
        }
        if let Some(h) = &r.hostname
            && let Err(e) = check_host(h)
        {
            self.err(format!("{rp}.hostname"), e);
        }
        let code = match r.status_code.unwrap_or(302) {
            c @ (301 | 302 | 303 | 307 | 308) => {
                StatusCode::from_u16(c as u16).unwrap_or(StatusCode::FOUND)
            }
            c => {
                self.err(
                    format!("{rp}.statusCode"),
                    format!("{c} is not one of 301, 302, 303, 307, 308"),
                );
                StatusCode::FOUND
            }
        };
        let (uri, replace_prefix) = match &r.path {
            Some(p) => self.path_modifier(&format!("{rp}.path"), p),
            None => (None, false),
        };
        // The spec: an explicit port is kept unless it is the scheme's well-known one; with no
        // port, a new scheme brings its well-known port (so none is written), else the port the
        // request was sent to stays.
        let well_known = |p: u16| match scheme.as_deref().unwrap_or("http") {
            "https" => p == 443,
            _ => p == 80,
        };
        let port = match r.port.and_then(|n| self.port(&format!("{rp}.port"), n)) {
            Some(p) if well_known(p) => Some(policy::RedirectPort::ProtocolDefault),
            Some(p) => Some(policy::RedirectPort::Fixed(p)),
            None if scheme.is_some() => Some(policy::RedirectPort::ProtocolDefault),
            None => Some(policy::RedirectPort::FromRequest),
        };
        policy::Redirect {
            uri,
            authority: r.hostname.clone(),
            scheme,
            port,
            code,
            replace_prefix,
        }
    }

    fn header_modifier(&mut self, path: &str, m: &gw::HeaderModifier) -> policy::HeaderOps {
        let mut out = policy::HeaderOps::default();
        for (field, list, into) in [("set", &m.set, &mut out.set), ("add", &m.add, &mut out.add)] {
            for (i, h) in list.iter().enumerate() {
                let at = format!("{path}.{field}[{i}]");
                let name = self.header_name(&format!("{at}.name"), &h.name);
                match HeaderValue::from_str(&h.value) {
                    Ok(v) => into.extend(name.map(|n| (n, v))),
                    Err(_) => self.err(
                        format!("{at}.value"),
                        format!("{:?} is not a valid header value", h.value),
                    ),
                }
            }
        }
        for (i, name) in m.remove.iter().enumerate() {
            out.remove
                .extend(self.header_name(&format!("{path}.remove[{i}]"), name));
        }
        out
    }

    /// `timeouts` and `retry`: the route timeout, and Istio's retry policy with the rule's
    /// attempts, codes and backoff, and `backendRequest` as each try's timeout.
    fn timeouts_and_retry(
        &mut self,
        path: &str,
        r: &gw::HttpRouteRule,
        routes: &mut [policy::HttpRoute],
    ) {
        let tp = format!("{path}.timeouts");
        let t = r.timeouts.as_ref();
        let request = self.duration(
            &format!("{tp}.request"),
            t.and_then(|t| t.request.as_ref()),
            true,
        );
        let backend = self.duration(
            &format!("{tp}.backendRequest"),
            t.and_then(|t| t.backend_request.as_ref()),
            true,
        );
        if let (Some(req), Some(be)) = (request, backend)
            && !req.is_zero()
            && (be.is_zero() || be > req)
        {
            self.err(
                format!("{tp}.backendRequest"),
                "backendRequest must not be longer than request",
            );
        }
        let retries = match &r.retry {
            None if backend.is_none_or(|b| b.is_zero()) => None,
            None => Some(policy::Retries::istio_default()),
            Some(rt) => {
                let rp = format!("{path}.retry");
                let mut out = policy::Retries::istio_default();
                if let Some(n) = self.count(&format!("{rp}.attempts"), rt.attempts) {
                    out.attempts = n;
                }
                let mut codes = Vec::new();
                for (i, c) in rt.codes.iter().enumerate() {
                    match u16::try_from(*c) {
                        Ok(c) if (400..=599).contains(&c) => codes.push(c),
                        _ => self.err(format!("{rp}.codes[{i}]"), format!("{c} is not in 400-599")),
                    }
                }
                if !codes.is_empty() {
                    out.retry_on.status_codes = codes;
                }
                out.backoff = self
                    .duration(&format!("{rp}.backoff"), rt.backoff.as_ref(), false)
                    .filter(|d| !d.is_zero());
                Some(out)
            }
        };
        for route in routes {
            route.timeout = request.filter(|d| !d.is_zero());
            route.retries = retries.clone().map(|mut rt| {
                rt.per_try_timeout = backend.filter(|d| !d.is_zero());
                rt
            });
        }
    }

    /// `matches[]` of an HTTPRoute rule.
    fn route_match(&mut self, path: &str, m: &gw::HttpRouteMatch) -> policy::HttpMatch {
        let mut out = policy::HttpMatch::default();
        let p = m.path.clone().unwrap_or_default();
        let value = p.value.unwrap_or_else(|| "/".to_string());
        let kind = p.kind.as_deref().unwrap_or("PathPrefix");
        if kind != "RegularExpression" && !value.starts_with('/') {
            self.err(
                format!("{path}.path.value"),
                format!("{value:?} must start with /"),
            );
        }
        out.uri = match kind {
            "Exact" => Some(policy::StringMatch::Exact(value)),
            "PathPrefix" => {
                let trimmed = value.trim_end_matches('/');
                let v = if trimmed.is_empty() { "/" } else { trimmed };
                Some(policy::StringMatch::PathPrefix(v.to_string()))
            }
            "RegularExpression" => self.pattern(&format!("{path}.path.value"), &value),
            other => {
                self.err(
                    format!("{path}.path.type"),
                    format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                );
                None
            }
        };
        out.headers = self.value_matches(&format!("{path}.headers"), &m.headers, true);
        out.query_params =
            self.value_matches(&format!("{path}.queryParams"), &m.query_params, false);
        if let Some(method) = &m.method {
            if METHODS.contains(&method.as_str()) {
                out.method = Some(policy::StringMatch::Exact(method.clone()));
            } else {
                self.err(
                    format!("{path}.method"),
                    format!("{method:?} is not one of {}", METHODS.join(", ")),
                );
            }
        }
        out
    }

    /// `matches[]` of a GRPCRoute rule: the method as a path match on `/service/method`.
    fn grpc_match(&mut self, path: &str, m: &gw::GrpcRouteMatch) -> policy::HttpMatch {
        let mut out = policy::HttpMatch {
            headers: self.value_matches(&format!("{path}.headers"), &m.headers, true),
            ..Default::default()
        };
        let Some(method) = &m.method else {
            return out;
        };
        let mp = format!("{path}.method");
        let (service, name) = (method.service.as_deref(), method.method.as_deref());
        if service.is_none() && name.is_none() {
            self.err(mp.clone(), "one of service or method is required");
        }
        out.uri = match method.kind.as_deref().unwrap_or("Exact") {
            "Exact" => {
                for (field, v) in [("service", service), ("method", name)] {
                    if let Some(v) = v
                        && (v.is_empty() || v.contains('/'))
                    {
                        self.err(
                            format!("{mp}.{field}"),
                            format!("{v:?} is not a gRPC {field} name"),
                        );
                    }
                }
                match (service, name) {
                    (Some(s), Some(n)) => Some(policy::StringMatch::Exact(format!("/{s}/{n}"))),
                    (Some(s), None) => Some(policy::StringMatch::Prefix(format!("/{s}/"))),
                    (None, Some(n)) => self.pattern(&mp, &format!("/[^/]+/{}", regex::escape(n))),
                    (None, None) => None,
                }
            }
            "RegularExpression" => self.pattern(
                &mp,
                &format!(
                    "/{}/{}",
                    service.unwrap_or("[^/]+"),
                    name.unwrap_or("[^/]+")
                ),
            ),
            other => {
                self.err(
                    format!("{mp}.type"),
                    format!("{other:?} is not Exact or RegularExpression"),
                );
                None
            }
        };
        out
    }

    /// Header (case-insensitive names) or query parameter matches; the first of equal names
    /// counts, as the spec says.
    fn value_matches(
        &mut self,
        path: &str,
        list: &[gw::ValueMatch],
        header: bool,
    ) -> BTreeMap<String, Option<policy::StringMatch>> {
        let mut out = BTreeMap::new();
        for (i, m) in list.iter().enumerate() {
            let at = format!("{path}[{i}]");
            let name = if header {
                match self.header_name(&format!("{at}.name"), &m.name) {
                    Some(n) => n.as_str().to_string(),
                    None => continue,
                }
            } else if m.name.is_empty() {
                self.err(format!("{at}.name"), "name is required");
                continue;
            } else {
                m.name.clone()
            };
            let value = match m.kind.as_deref().unwrap_or("Exact") {
                "Exact" => Some(policy::StringMatch::Exact(m.value.clone())),
                "RegularExpression" => self.pattern(&format!("{at}.value"), &m.value),
                other => {
                    self.err(
                        format!("{at}.type"),
                        format!("{other:?} is not Exact or RegularExpression"),
                    );
                    None
                }
            };
            if let Some(v) = value {
                out.entry(name).or_insert(Some(v));
            }
        }
        out
    }

    fn pattern(&mut self, path: &str, source: &str) -> Option<policy::StringMatch> {
        match policy::Pattern::new(source) {
            Ok(p) => Some(policy::StringMatch::Regex(p)),
            Err(e) => {
                self.err(path, format!("invalid regular expression: {e}"));
                None
            }
        }
    }

    /// `backendRefs[]`: weighted destinations (an unusable one kept, marked, for its 500s).
    fn backends(
        &mut self,
        path: &str,
        list: &[gw::BackendRef],
        foreign: &mut Vec<(String, String, String)>,
    ) -> Vec<policy::WeightedDestination> {
        (list.iter().enumerate())
            .filter_map(|(i, b)| {
                let bp = format!("{path}.backendRefs[{i}]");
                let mut d = self.backend(&bp, i, &b.object(), foreign)?;
                d.weight = match b.weight {
                    None => 1,
                    Some(w) if (0..=MAX_WEIGHT).contains(&w) => w as u32,
                    Some(w) => {
                        self.err(format!("{bp}.weight"), format!("{w} is not in 0-{MAX_WEIGHT}"));
                        0
                    }
                };
                for (j, f) in b.filters.iter().enumerate() {
                    let fp = format!("{bp}.filters[{j}]");
                    match (f.kind.as_str(), &f.request_header_modifier, &f.response_header_modifier) {
                        ("RequestHeaderModifier", Some(m), _) => {
                            d.headers.request = self.header_modifier(&format!("{fp}.requestHeaderModifier"), m);
                        }
                        ("ResponseHeaderModifier", _, Some(m)) => {
                            d.headers.response = self.header_modifier(&format!("{fp}.responseHeaderModifier"), m);
                        }
                        (k, _, _) => self.warn(
                            fp,
                            format!("backend filter {k} is accepted but not enforced by drover (only the header modifiers are)"),
                        ),
                    }
                }
                Some(d)
            })
            .collect()
    }

    /// One backend reference as a destination (weight set by the caller).
    fn backend(
        &mut self,
        bp: &str,
        index: usize,
        b: &gw::BackendObjectRef,
        foreign: &mut Vec<(String, String, String)>,
    ) -> Option<policy::WeightedDestination> {
        if b.name.is_empty() {
            self.err(format!("{bp}.name"), "name is required");
            return None;
        }
        let namespace = b
            .namespace
            .clone()
            .unwrap_or_else(|| self.namespace.clone());
        let host = format!("{}.{namespace}.{CLUSTER_DOMAIN}", b.name);
        let group = b.group.as_deref().unwrap_or("");
        let kind = b.kind.as_deref().unwrap_or("Service");
        let invalid = match (group, kind) {
            ("" | "core", "Service") => None,
            (g, k) => {
                self.warn(
                    bp,
                    format!("backend of kind {k:?} (group {g:?}) is not supported; requests routed to it get 500"),
                );
                Some(format!("unsupported backend kind {k}"))
            }
        };
        let port = match b.port {
            Some(n) => self.port(&format!("{bp}.port"), n),
            None if invalid.is_none() => {
                self.err(
                    format!("{bp}.port"),
                    "port is required for a Service backend",
                );
                None
            }
            None => None,
        };
        if namespace != self.namespace && invalid.is_none() {
            foreign.push((host.clone(), namespace, b.name.clone()));
        }
        Some(policy::WeightedDestination {
            host,
            subset: None,
            port,
            weight: 0,
            index,
            headers: policy::HeaderRules::default(),
            invalid,
        })
    }

    fn reference_grant(&mut self, spec: &gw::ReferenceGrantSpec) -> policy::ReferenceGrant {
        let mut out = policy::ReferenceGrant {
            from: Vec::new(),
            to: Vec::new(),
        };
        for (i, f) in spec.from.iter().enumerate() {
            let kind = match f.kind.as_str() {
                "HTTPRoute" => policy::RouteKind::Http,
                "GRPCRoute" => policy::RouteKind::Grpc,
                "TCPRoute" => policy::RouteKind::Tcp,
                _ => continue, // grants for Gateways and other kinds do not concern the mesh
            };
            if f.group != "gateway.networking.k8s.io" || f.namespace.is_empty() {
                self.err(
                    format!("spec.from[{i}]"),
                    "a route grant needs group gateway.networking.k8s.io and a namespace",
                );
                continue;
            }
            out.from.push((kind, f.namespace.clone()));
        }
        for t in &spec.to {
            if matches!(t.group.as_str(), "" | "core") && t.kind == "Service" {
                out.to.push(t.name.clone());
            }
        }
        out
    }
}

/// `Kind ns/name rules[i]` (with the rule's name).
fn label(kind: policy::RouteKind, id: &str, index: usize, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{} {id} rules[{index}] ({n})", kind.name()),
        None => format!("{} {id} rules[{index}]", kind.name()),
    }
}

/// The match of a rule that lists none: `PathPrefix /`.
fn default_match() -> policy::HttpMatch {
    policy::HttpMatch {
        uri: Some(policy::StringMatch::PathPrefix("/".to_string())),
        ..Default::default()
    }
}

/// `ReplaceFullPath` → `replaceFullPath`.
fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_ascii_lowercase().to_string() + c.as_str())
        .unwrap_or_default()
}
