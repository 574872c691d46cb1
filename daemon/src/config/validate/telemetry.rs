//! `Telemetry` rules: a sampling percentage in 0..=100, a custom tag with exactly one source,
//! metric names, modes and tag operations Istio knows, CEL expressions that compile (access-log
//! filters, tag values). Providers are not Drover's choice (spans go to `--otlp-endpoint`,
//! metrics to `/stats/prometheus`, access logs to the daemon's log): other names are warned
//! about, as are the fields Drover does not apply.

use super::*;
use crate::config::crd::telemetry as crd_t;

impl TryFrom<&Resource<crd_t::TelemetrySpec>> for Validated<policy::Telemetry> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd_t::TelemetrySpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.telemetry(&res.spec);
        c.finish(value)
    }
}

/// The metric names of `overrides[].match.metric`.
const METRICS: [(&str, policy::StandardMetric); 10] = [
    ("REQUEST_COUNT", policy::StandardMetric::RequestCount),
    ("REQUEST_DURATION", policy::StandardMetric::RequestDuration),
    ("REQUEST_SIZE", policy::StandardMetric::RequestSize),
    ("RESPONSE_SIZE", policy::StandardMetric::ResponseSize),
    (
        "TCP_OPENED_CONNECTIONS",
        policy::StandardMetric::TcpOpenedConnections,
    ),
    (
        "TCP_CLOSED_CONNECTIONS",
        policy::StandardMetric::TcpClosedConnections,
    ),
    ("TCP_SENT_BYTES", policy::StandardMetric::TcpSentBytes),
    (
        "TCP_RECEIVED_BYTES",
        policy::StandardMetric::TcpReceivedBytes,
    ),
    (
        "GRPC_REQUEST_MESSAGES",
        policy::StandardMetric::GrpcRequestMessages,
    ),
    (
        "GRPC_RESPONSE_MESSAGES",
        policy::StandardMetric::GrpcResponseMessages,
    ),
];

impl Checker<'_> {
    fn telemetry(&mut self, spec: &crd_t::TelemetrySpec) -> policy::Telemetry {
        let selector = spec.selector.as_ref().map(|s| {
            self.labels("spec.selector.matchLabels", &s.match_labels);
            s.match_labels.clone()
        });
        if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
            let field = if spec.target_ref.is_some() {
                "spec.targetRef"
            } else {
                "spec.targetRefs"
            };
            self.warn(
                field,
                "targetRefs is accepted but not enforced by drover: it applies Telemetry to workloads by namespace and selector only (no gateways or waypoints)",
            );
        }
        let mut out = policy::Telemetry {
            selector,
            ..Default::default()
        };
        for (i, t) in spec.tracing.iter().enumerate() {
            self.tracing(&format!("spec.tracing[{i}]"), t, &mut out.tracing);
        }
        for (i, m) in spec.metrics.iter().enumerate() {
            let at = format!("spec.metrics[{i}]");
            self.providers(&format!("{at}.providers"), &m.providers, "prometheus");
            let interval = m.reporting_interval.as_ref();
            if let Some(d) = self.duration(&format!("{at}.reportingInterval"), interval, false) {
                out.reporting_interval = Some(d);
            }
            for (j, o) in m.overrides.iter().enumerate() {
                if let Some(o) = self.metric_override(&format!("{at}.overrides[{j}]"), o) {
                    out.metric_overrides.push(o);
                }
            }
        }
        for (i, a) in spec.access_logging.iter().enumerate() {
            let at = format!("spec.accessLogging[{i}]");
            self.providers(&format!("{at}.providers"), &a.providers, "envoy");
            if a.match_.as_ref().and_then(|m| m.mode.as_deref()) == Some("SERVER") {
                self.warn(
                    format!("{at}.match.mode"),
                    "SERVER access logs are not filtered by drover: its inbound side logs connections, and this entry applies to its outbound lines only",
                );
            }
            if a.disabled.is_some() {
                out.access_logging.disabled = a.disabled;
            }
            if let Some(f) = &a.filter {
                out.access_logging.filter =
                    self.expression(&format!("{at}.filter.expression"), &f.expression);
            }
        }
        out
    }

    fn tracing(&mut self, at: &str, t: &crd_t::Tracing, out: &mut policy::TelemetryTracing) {
        let mode = t.match_.as_ref().and_then(|m| m.mode.as_deref());
        if let Some(m) = mode.filter(|m| !["CLIENT_AND_SERVER", "CLIENT", "SERVER"].contains(m)) {
            self.err(
                format!("{at}.match.mode"),
                format!("unknown mode {m:?} (CLIENT_AND_SERVER, CLIENT or SERVER)"),
            );
        }
        if mode == Some("SERVER") {
            self.warn(
                format!("{at}.match.mode"),
                "SERVER spans are not reported by drover (it reports the client span of each outbound request): this entry has no effect",
            );
            return;
        }
        self.providers(&format!("{at}.providers"), &t.providers, "");
        if let Some(p) = t.random_sampling_percentage {
            if (0.0..=100.0).contains(&p) {
                out.random_sampling_percentage = Some(p);
            } else {
                self.err(
                    format!("{at}.randomSamplingPercentage"),
                    format!("{p} is not a percentage in 0..=100"),
                );
            }
        }
        if t.disable_span_reporting.is_some() {
            out.disable_span_reporting = t.disable_span_reporting;
        }
        for (name, tag) in &t.custom_tags {
            let field = format!("{at}.customTags.{name}");
            let set = [
                tag.literal.is_some(),
                tag.environment.is_some(),
                tag.header.is_some(),
            ];
            let value = match (&tag.literal, &tag.environment, &tag.header) {
                _ if set.iter().filter(|s| **s).count() != 1 => {
                    self.err(
                        field,
                        "a custom tag needs exactly one of literal, environment and header",
                    );
                    continue;
                }
                (Some(l), _, _) => policy::CustomTag::Literal(l.value.clone()),
                (_, Some(e), _) => policy::CustomTag::Environment {
                    name: e.name.clone(),
                    default: e.default_value.clone().unwrap_or_default(),
                },
                (_, _, Some(h)) => policy::CustomTag::Header {
                    name: h.name.to_ascii_lowercase(),
                    default: h.default_value.clone().unwrap_or_default(),
                },
                _ => continue,
            };
            out.custom_tags.insert(name.clone(), value);
        }
        for (set, field) in [
            (
                t.use_request_id_for_trace_sampling.is_some(),
                "useRequestIdForTraceSampling",
            ),
            (t.enable_istio_tags.is_some(), "enableIstioTags"),
        ] {
            if set {
                self.warn(
                    format!("{at}.{field}"),
                    format!("{field} is accepted but not enforced by drover"),
                );
            }
        }
    }

    fn metric_override(
        &mut self,
        at: &str,
        o: &crd_t::MetricsOverride,
    ) -> Option<policy::MetricOverride> {
        let m = o.match_.clone().unwrap_or_default();
        if m.custom_metric.is_some() {
            self.warn(
                format!("{at}.match.customMetric"),
                "customMetric is accepted but not enforced by drover (it reports the standard metrics only): this override is skipped",
            );
            return None;
        }
        let metric = match m.metric.as_deref() {
            None | Some("ALL_METRICS") => None,
            Some(name) => match METRICS.iter().find(|(n, _)| *n == name) {
                Some((_, metric)) => Some(*metric),
                None => {
                    self.err(
                        format!("{at}.match.metric"),
                        format!("unknown metric {name:?}"),
                    );
                    return None;
                }
            },
        };
        let (client, server) = match m.mode.as_deref() {
            None | Some("CLIENT_AND_SERVER") => (true, true),
            Some("CLIENT") => (true, false),
            Some("SERVER") => (false, true),
            Some(other) => {
                self.err(
                    format!("{at}.match.mode"),
                    format!("unknown mode {other:?} (CLIENT_AND_SERVER, CLIENT or SERVER)"),
                );
                return None;
            }
        };
        let mut tag_overrides = Vec::new();
        for (tag, t) in &o.tag_overrides {
            let field = format!("{at}.tagOverrides.{tag}");
            match (t.operation.as_deref(), &t.value) {
                (Some("REMOVE"), _) => {
                    tag_overrides.push((tag.clone(), policy::TagOverride::Remove))
                }
                (None | Some("UPSERT"), Some(v)) => {
                    if let Some(e) = self.expression(&format!("{field}.value"), v) {
                        tag_overrides.push((tag.clone(), policy::TagOverride::Upsert(e)));
                    }
                }
                (None | Some("UPSERT"), None) => {
                    self.err(format!("{field}.value"), "UPSERT needs a value")
                }
                (Some(op), _) => self.err(
                    format!("{field}.operation"),
                    format!("unknown operation {op:?} (UPSERT or REMOVE)"),
                ),
            }
        }
        Some(policy::MetricOverride {
            metric,
            client,
            server,
            disabled: o.disabled,
            tag_overrides,
        })
    }

    /// `expr` compiled as CEL, or a located error.
    fn expression(&mut self, field: &str, expr: &str) -> Option<policy::Expression> {
        match cel::Program::compile(expr) {
            Ok(p) => {
                self.attributes_read(field, expr, &p);
                Some(policy::Expression {
                    source: expr.to_string(),
                    program: std::sync::Arc::new(p),
                })
            }
            Err(e) => {
                let first = e.to_string();
                let first = first.lines().next().unwrap_or_default().to_string();
                self.err(field, format!("{expr:?} is not a CEL expression: {first}"));
                None
            }
        }
    }

    /// Warns about what `expr` reads that drover does not provide: a variable other than
    /// `request`, `response` and `connection` (Envoy's other attributes), `duration()` and
    /// `timestamp()`. Such an expression fails when evaluated: a filter then matches nothing
    /// and a tag is left out.
    fn attributes_read(&mut self, field: &str, expr: &str, p: &cel::Program) {
        let refs = p.references();
        let mut unknown: Vec<&str> = (refs.variables().into_iter())
            .filter(|v| !["request", "response", "connection"].contains(v))
            .collect();
        unknown.extend(
            ["duration", "timestamp"]
                .into_iter()
                .filter(|f| refs.has_function(f)),
        );
        if !unknown.is_empty() {
            unknown.sort_unstable();
            self.warn(
                field.to_string(),
                format!("{expr:?} reads {unknown:?}, which drover does not provide (it reads request.method, request.host, request.url_path, request.headers, response.code, response.flags and connection.mtls): the expression fails when evaluated"),
            );
        }
    }

    /// Warns about provider names other than `ours` (`""`: any name is warned about).
    fn providers(&mut self, field: &str, providers: &[crd_t::ProviderRef], ours: &str) {
        for (i, p) in providers.iter().enumerate() {
            if ours.is_empty() || p.name != ours {
                self.warn(
                    format!("{field}[{i}].name"),
                    format!("provider {:?} is accepted but not enforced by drover: spans go to --otlp-endpoint, metrics to /stats/prometheus and access logs to the daemon's log", p.name),
                );
            }
        }
    }
}
