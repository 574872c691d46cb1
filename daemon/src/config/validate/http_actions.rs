//! `VirtualService` HTTP route actions: `headers`, `rewrite`, `redirect`, `directResponse` and
//! `fault`, checked with Istio's rules and Envoy's limits on what may be modified.

use base64::Engine as _;
use hyper::{
    StatusCode,
    header::{HeaderName, HeaderValue},
};

use super::*;

/// Envoy's cap on a direct response body (`max_direct_response_body_size_bytes` default, 4 KiB
/// in old releases; Istio accepts up to 1 MiB).
const MAX_DIRECT_BODY: usize = 1024 * 1024;

/// gRPC status names as `grpcStatus` spells them, by code.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl Checker<'_> {
    /// `headers` at `path` (a route's or a destination's).
    pub(super) fn header_rules(
        &mut self,
        path: &str,
        h: Option<&crd::Headers>,
    ) -> policy::HeaderRules {
        let Some(h) = h else {
            return policy::HeaderRules::default();
        };
        policy::HeaderRules {
            request: self.header_ops(&format!("{path}.request"), h.request.as_ref()),
            response: self.header_ops(&format!("{path}.response"), h.response.as_ref()),
        }
    }

    fn header_ops(&mut self, path: &str, ops: Option<&crd::HeaderOperations>) -> policy::HeaderOps {
        let Some(ops) = ops else {
            return policy::HeaderOps::default();
        };
        let mut out = policy::HeaderOps::default();
        for (field, pairs, into) in [
            ("set", &ops.set, &mut out.set),
            ("add", &ops.add, &mut out.add),
        ] {
            for (name, value) in pairs {
                let at = format!("{path}.{field}.{name}");
                let (Some(n), Ok(v)) = (self.header_name(&at, name), HeaderValue::from_str(value))
                else {
                    if HeaderValue::from_str(value).is_err() {
                        self.err(at, format!("{value:?} is not a valid header value"));
                    }
                    continue;
                };
                into.push((n, v));
            }
        }
        for (i, name) in ops.remove.iter().enumerate() {
            if let Some(n) = self.header_name(&format!("{path}.remove[{i}]"), name) {
                out.remove.push(n);
            }
        }
        out
    }

    /// A header name that may be modified: a valid token, not a pseudo-header and not `host`
    /// (Envoy refuses both; `rewrite.authority` changes the host).
    pub(super) fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            self.err(
                path,
                format!(
                    "{name:?} cannot be modified with headers (use rewrite.authority for the host)"
                ),
            );
            return None;
        }
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            self.err(path, format!("{name:?} is not a valid header name"));
            return None;
        }
        HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()
    }

    pub(super) fn rewrite(&mut self, path: &str, r: &crd::HttpRewrite) -> policy::Rewrite {
        let rp = format!("{path}.rewrite");
        if r.uri.is_some() && r.uri_regex_rewrite.is_some() {
            self.err(&rp, "uri and uriRegexRewrite are mutually exclusive");
        }
        if r.uri.is_none() && r.authority.is_none() && r.uri_regex_rewrite.is_none() {
            self.err(
                &rp,
                "rewrite must specify uri, uriRegexRewrite or authority",
            );
        }
        let uri_regex =
            r.uri_regex_rewrite.as_ref().and_then(|re| {
                match policy::RegexRewrite::new(&re.matches, &re.rewrite) {
                    Ok(x) if !re.matches.is_empty() => Some(x),
                    Ok(_) => {
                        self.err(format!("{rp}.uriRegexRewrite.match"), "match is required");
                        None
                    }
                    Err(e) => {
                        self.err(
                            format!("{rp}.uriRegexRewrite.match"),
                            format!("invalid regex: {e}"),
                        );
                        None
                    }
                }
            });
        policy::Rewrite {
            uri: r.uri.clone(),
            full_path: false,
            authority: r.authority.clone().filter(|a| !a.is_empty()),
            uri_regex,
        }
    }

    /// `redirect` or `directResponse` (exclusive), or `None`.
    pub(super) fn local_reply(
        &mut self,
        path: &str,
        r: &crd::HttpRoute,
    ) -> Option<policy::LocalReply> {
        if r.redirect.is_some() && r.direct_response.is_some() {
            self.err(path, "redirect and directResponse are mutually exclusive");
        }
        if r.rewrite.is_some() && (r.redirect.is_some() || r.direct_response.is_some()) {
            self.err(
                format!("{path}.rewrite"),
                "rewrite cannot be combined with redirect or directResponse",
            );
        }
        if let Some(d) = &r.direct_response {
            return self.direct_response(&format!("{path}.directResponse"), d);
        }
        r.redirect
            .as_ref()
            .map(|x| policy::LocalReply::Redirect(self.redirect(&format!("{path}.redirect"), x)))
    }

    fn redirect(&mut self, rp: &str, r: &crd::HttpRedirect) -> policy::Redirect {
        if r.uri.is_none()
            && r.authority.is_none()
            && r.scheme.is_none()
            && r.port.is_none()
            && r.derive_port.is_none()
        {
            self.err(rp, "redirect must specify uri, authority, scheme or port");
        }
        let port = match (r.port, r.derive_port.as_deref()) {
            (Some(_), Some(_)) => {
                self.err(rp, "port and derivePort are mutually exclusive");
                None
            }
            (Some(p), None) => self
                .port(&format!("{rp}.port"), p)
                .map(policy::RedirectPort::Fixed),
            (None, Some("FROM_REQUEST_PORT")) => Some(policy::RedirectPort::FromRequest),
            (None, Some("FROM_PROTOCOL_DEFAULT")) => Some(policy::RedirectPort::ProtocolDefault),
            (None, Some(other)) => {
                self.err(
                    format!("{rp}.derivePort"),
                    format!("{other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
                );
                None
            }
            (None, None) => None,
        };
        let code = match r.redirect_code {
            None | Some(0) => StatusCode::MOVED_PERMANENTLY,
            Some(c @ 300..=399) => {
                StatusCode::from_u16(c as u16).unwrap_or(StatusCode::MOVED_PERMANENTLY)
            }
            Some(c) => {
                self.err(
                    format!("{rp}.redirectCode"),
                    format!("{c} is not a valid redirect code, must be 3xx"),
                );
                StatusCode::MOVED_PERMANENTLY
            }
        };
        if let Some(s) = &r.scheme
            && !matches!(s.as_str(), "http" | "https")
        {
            self.err(
                format!("{rp}.scheme"),
                format!("scheme {s:?} is not http or https"),
            );
        }
        policy::Redirect {
            uri: r.uri.clone(),
            authority: r.authority.clone(),
            scheme: r.scheme.clone(),
            port,
            code,
            replace_prefix: false,
        }
    }

    fn direct_response(
        &mut self,
        dp: &str,
        d: &crd::HttpDirectResponse,
    ) -> Option<policy::LocalReply> {
        let status = u16::try_from(d.status)
            .ok()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok());
        let Some(status) = status else {
            self.err(
                format!("{dp}.status"),
                format!("status {} must be between 200 and 599", d.status),
            );
            return None;
        };
        let body = match d.body.as_ref().map(|b| (&b.string, &b.bytes)) {
            None | Some((None, None)) => Vec::new(),
            Some((Some(_), Some(_))) => {
                self.err(
                    format!("{dp}.body"),
                    "string and bytes are mutually exclusive",
                );
                Vec::new()
            }
            Some((Some(s), None)) => s.clone().into_bytes(),
            Some((None, Some(b))) => match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(b) => b,
                Err(e) => {
                    self.err(format!("{dp}.body.bytes"), format!("not base64: {e}"));
                    Vec::new()
                }
            },
        };
        if body.len() > MAX_DIRECT_BODY {
            self.err(
                format!("{dp}.body"),
                format!("body of {} bytes is over the 1 MiB limit", body.len()),
            );
        }
        Some(policy::LocalReply::Direct { status, body })
    }

    pub(super) fn fault(&mut self, path: &str, f: &crd::HttpFaultInjection) -> policy::Fault {
        let fp = format!("{path}.fault");
        if f.delay.is_none() && f.abort.is_none() {
            self.err(&fp, "fault must specify delay or abort");
        }
        let delay = f.delay.as_ref().and_then(|d| {
            let dp = format!("{fp}.delay");
            if d.exponential_delay.is_some() {
                self.err(
                    format!("{dp}.exponentialDelay"),
                    "exponentialDelay is not supported (as in Istio)",
                );
            }
            let pct = self.fault_percent(&dp, d.percentage.as_ref(), d.percent);
            match self.duration(&format!("{dp}.fixedDelay"), d.fixed_delay.as_ref(), false) {
                Some(t) if t >= Duration::from_millis(1) => Some((t, pct)),
                Some(_) => {
                    self.err(
                        format!("{dp}.fixedDelay"),
                        "fixedDelay must be at least 1ms",
                    );
                    None
                }
                None if d.exponential_delay.is_none() => {
                    self.err(format!("{dp}.fixedDelay"), "fixedDelay is required");
                    None
                }
                None => None,
            }
        });
        let abort = f.abort.as_ref().and_then(|a| {
            let ap = format!("{fp}.abort");
            let pct = self.fault_percent(&ap, a.percentage.as_ref(), None);
            let kind = match (a.http_status, &a.grpc_status, &a.http2_error) {
                (Some(s), None, None) => {
                    match u16::try_from(s).ok().filter(|s| (200..=599).contains(s)) {
                        Some(s) => StatusCode::from_u16(s).ok().map(policy::Abort::Http),
                        None => {
                            self.err(
                                format!("{ap}.httpStatus"),
                                format!("httpStatus {s} must be between 200 and 599"),
                            );
                            None
                        }
                    }
                }
                (None, Some(g), None) => match GRPC_CODES.iter().position(|c| c == g) {
                    Some(code) => Some(policy::Abort::Grpc(code as u16)),
                    None => {
                        self.err(
                            format!("{ap}.grpcStatus"),
                            format!("{g:?} is not a gRPC status name"),
                        );
                        None
                    }
                },
                (None, None, Some(_)) => {
                    self.err(
                        format!("{ap}.http2Error"),
                        "http2Error is not supported (as in Istio)",
                    );
                    None
                }
                _ => {
                    self.err(
                        &ap,
                        "abort needs exactly one of httpStatus, grpcStatus or http2Error",
                    );
                    None
                }
            };
            kind.map(|k| (k, pct))
        });
        policy::Fault { delay, abort }
    }

    pub(super) fn cors(&mut self, path: &str, c: &crd::CorsPolicy) -> policy::Cors {
        let cp = format!("{path}.corsPolicy");
        let mut origins: Vec<policy::StringMatch> = c
            .allow_origins
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                self.string_match(&format!("{cp}.allowOrigins[{i}]"), Some(m), false)
            })
            .collect();
        if !c.allow_origin.is_empty() {
            self.warn(
                format!("{cp}.allowOrigin"),
                "allowOrigin is deprecated; use allowOrigins (its values are matched exactly)",
            );
            origins.extend(
                c.allow_origin
                    .iter()
                    .cloned()
                    .map(policy::StringMatch::Exact),
            );
        }
        for (i, m) in c.allow_methods.iter().enumerate() {
            if hyper::Method::from_bytes(m.as_bytes()).is_err() || m.is_empty() {
                self.err(
                    format!("{cp}.allowMethods[{i}]"),
                    format!("{m:?} is not an HTTP method"),
                );
            }
        }
        for (field, list) in [
            ("allowHeaders", &c.allow_headers),
            ("exposeHeaders", &c.expose_headers),
        ] {
            for (i, h) in list.iter().enumerate() {
                if h != "*" && (h.is_empty() || !h.bytes().all(is_token_byte)) {
                    self.err(
                        format!("{cp}.{field}[{i}]"),
                        format!("{h:?} is not a valid header name"),
                    );
                }
            }
        }
        let max_age = self.duration(&format!("{cp}.maxAge"), c.max_age.as_ref(), false);
        if max_age.is_some_and(|d| d.subsec_nanos() != 0) {
            self.err(format!("{cp}.maxAge"), "maxAge is accurate only to seconds");
        }
        let forward_unmatched = match c.unmatched_preflights.as_deref() {
            None | Some("UNSPECIFIED" | "FORWARD") => true,
            Some("IGNORE") => false,
            Some(other) => {
                self.err(
                    format!("{cp}.unmatchedPreflights"),
                    format!("{other:?} is not FORWARD or IGNORE"),
                );
                true
            }
        };
        let joined = |l: &[String]| {
            (!l.is_empty())
                .then(|| l.join(","))
                .and_then(|v| HeaderValue::from_str(&v).ok())
        };
        policy::Cors {
            origins,
            methods: joined(&c.allow_methods),
            headers: joined(&c.allow_headers),
            expose: joined(&c.expose_headers),
            max_age: max_age.map(|d| HeaderValue::from(d.as_secs())),
            credentials: c.allow_credentials == Some(true),
            forward_unmatched,
        }
    }

    /// A fault's `percentage.value` (0–100), or the deprecated integer `percent`; absent, no
    /// request is affected (Istio's API: "if not specified, no requests will be aborted").
    fn fault_percent(&mut self, path: &str, p: Option<&crd::Percent>, old: Option<i64>) -> f64 {
        let v = match (p, old) {
            (Some(p), _) => p.value,
            (None, Some(o)) => o as f64,
            (None, None) => 0.0,
        };
        if !(0.0..=100.0).contains(&v) {
            self.err(
                format!("{path}.percentage.value"),
                format!("percentage {v} must be between 0 and 100"),
            );
        }
        v.clamp(0.0, 100.0)
    }
}
