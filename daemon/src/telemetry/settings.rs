//! The `Telemetry` resources that apply to one workload, composed as Istio composes them: the
//! root namespace's selector-less resource (the mesh), then its own namespace's selector-less
//! one, then the one whose selector picks it (oldest first when several tie at a level); each
//! level overrides what it sets, custom tags merge by name and metric overrides apply in order.
//!
//! Invariants: resolution is pure (entries and a workload in, [`Settings`] out); the default
//! settings change nothing (no override, no filter), so a mesh without `Telemetry` pays nothing
//! per request; a CEL expression that fails at run time is treated as not holding (filter) or
//! as an empty value (tag), never as an error on the data path.

use std::{collections::BTreeMap, sync::Arc};

use crate::config::policy::{self, CustomTag, Expression, StandardMetric, TagOverride};

/// A validated `Telemetry` with where it lives.
#[derive(Clone, Debug)]
pub struct Entry {
    pub policy: policy::Telemetry,
    pub namespace: String,
    /// `namespace/name`.
    pub id: String,
    /// (creation time, name): the oldest wins a tie.
    pub age: (String, String),
}

/// What the Telemetry resources say for one workload.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Percentage of new traces sampled (`None`: `--trace-sampling`).
    pub sampling: Option<f64>,
    pub disable_spans: bool,
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// `Some(true)`: no access log lines for this workload.
    pub access_log_disabled: Option<bool>,
    pub access_log_filter: Option<Expression>,
    pub overrides: Vec<policy::MetricOverride>,
    /// How often a running TCP connection's bytes are reported (`None`:
    /// [`DEFAULT_REPORTING_INTERVAL`]).
    pub reporting_interval: Option<std::time::Duration>,
    /// The resources applied, in order (for `drover explain` and logs).
    pub applied: Vec<String>,
}

/// What a request or connection looked like, for CEL expressions (`request.*`, `response.*`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Attributes<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub headers: Option<&'a hyper::HeaderMap>,
    pub code: u16,
    pub flags: &'a str,
    pub mtls: bool,
}

/// A label change a metric override makes to a series: (tag, `None` to remove it, else its
/// value), in tag order; `disabled` drops the family.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FamilyOverride {
    pub disabled: bool,
    pub tags: Vec<(String, Option<String>)>,
}

/// Per standard metric, what the overrides do to one series.
pub type Overrides = BTreeMap<StandardMetric, FamilyOverride>;

/// How often Istio's proxies report a running TCP connection's metrics by default.
pub const DEFAULT_REPORTING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

// === impl Settings ===

impl Settings {
    /// The settings of a workload in `namespace` with `labels`, from `entries` (oldest first),
    /// `root` being the mesh's root namespace.
    pub fn resolve(
        entries: &[Entry],
        root: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let selects = |e: &Entry| {
            e.policy
                .selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        let bare = |e: &Entry| e.policy.selector.as_ref().is_none_or(|s| s.is_empty());
        let mesh = entries.iter().find(|e| e.namespace == root && bare(e));
        let own = (namespace != root)
            .then(|| entries.iter().find(|e| e.namespace == namespace && bare(e)))
            .flatten();
        let workload = (entries.iter()).find(|e| e.namespace == namespace && selects(e));
        let mut s = Settings::default();
        for e in [mesh, own, workload].into_iter().flatten() {
            s.apply(e);
        }
        s
    }

    fn apply(&mut self, e: &Entry) {
        let t = &e.policy;
        self.sampling = t.tracing.random_sampling_percentage.or(self.sampling);
        if let Some(d) = t.tracing.disable_span_reporting {
            self.disable_spans = d;
        }
        self.custom_tags.extend(t.tracing.custom_tags.clone());
        if t.access_logging.disabled.is_some() {
            self.access_log_disabled = t.access_logging.disabled;
        }
        if t.access_logging.filter.is_some() {
            self.access_log_filter = t.access_logging.filter.clone();
        }
        self.overrides.extend(t.metric_overrides.iter().cloned());
        self.reporting_interval = t.reporting_interval.or(self.reporting_interval);
        self.applied.push(e.id.clone());
    }

    /// How often a running TCP connection's bytes are reported.
    pub fn reporting_interval(&self) -> std::time::Duration {
        self.reporting_interval
            .unwrap_or(DEFAULT_REPORTING_INTERVAL)
    }

    /// Whether an access-log line is written for a request or connection like `a`.
    pub fn logs(&self, a: &Attributes<'_>) -> bool {
        if self.access_log_disabled == Some(true) {
            return false;
        }
        match &self.access_log_filter {
            None => true,
            Some(f) => matches!(evaluate(f, a), Ok(cel::Value::Bool(true))),
        }
    }

    /// What the metric overrides do to a series reported by the `client` side (else the
    /// server side) for a request like `a`; `None` when nothing changes.
    pub fn overrides(&self, client: bool, a: &Attributes<'_>) -> Option<Arc<Overrides>> {
        if self.overrides.is_empty() {
            return None;
        }
        let relevant: Vec<&policy::MetricOverride> = (self.overrides.iter())
            .filter(|o| if client { o.client } else { o.server })
            .collect();
        if relevant.is_empty() {
            return None;
        }
        let mut out = Overrides::new();
        for o in relevant {
            let metrics: Vec<StandardMetric> = match o.metric {
                Some(m) => vec![m],
                None => ALL.to_vec(),
            };
            let tags: Vec<(String, Option<String>)> = (o.tag_overrides.iter())
                .map(|(tag, op)| match op {
                    TagOverride::Remove => (tag.clone(), None),
                    TagOverride::Upsert(e) => (tag.clone(), Some(value_of(e, a))),
                })
                .collect();
            for m in metrics {
                let f = out.entry(m).or_default();
                if let Some(d) = o.disabled {
                    f.disabled = d;
                }
                for (tag, v) in &tags {
                    f.tags.retain(|(t, _)| t != tag);
                    f.tags.push((tag.clone(), v.clone()));
                }
                f.tags.sort();
            }
        }
        Some(Arc::new(out))
    }
}

/// Every standard metric (`ALL_METRICS`).
const ALL: [StandardMetric; 10] = [
    StandardMetric::RequestCount,
    StandardMetric::RequestDuration,
    StandardMetric::RequestSize,
    StandardMetric::ResponseSize,
    StandardMetric::TcpOpenedConnections,
    StandardMetric::TcpClosedConnections,
    StandardMetric::TcpSentBytes,
    StandardMetric::TcpReceivedBytes,
    StandardMetric::GrpcRequestMessages,
    StandardMetric::GrpcResponseMessages,
];

/// A tag's value: the expression's string, number or boolean as text (empty when it fails).
fn value_of(e: &Expression, a: &Attributes<'_>) -> String {
    match evaluate(e, a) {
        Ok(cel::Value::String(s)) => s.to_string(),
        Ok(cel::Value::Int(i)) => i.to_string(),
        Ok(cel::Value::UInt(u)) => u.to_string(),
        Ok(cel::Value::Bool(b)) => b.to_string(),
        Ok(cel::Value::Float(f)) => f.to_string(),
        _ => String::new(),
    }
}

/// `e` over the attributes Istio's expressions read: `request.method`, `request.host`,
/// `request.url_path`, `request.headers[...]`, `response.code`, `response.flags` (Envoy's
/// codes as written in the access log), `connection.mtls`.
fn evaluate(e: &Expression, a: &Attributes<'_>) -> cel::ResolveResult {
    use std::collections::HashMap;
    let mut ctx = cel::Context::default();
    let headers: HashMap<String, cel::Value> = (a.headers.into_iter().flatten())
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.into())))
        .collect();
    let request: HashMap<&str, cel::Value> = HashMap::from([
        ("method", a.method.into()),
        ("host", a.host.into()),
        ("url_path", a.path.into()),
        ("headers", headers.into()),
    ]);
    let response: HashMap<&str, cel::Value> = HashMap::from([
        ("code", cel::Value::Int(i64::from(a.code))),
        ("flags", a.flags.into()),
    ]);
    let connection: HashMap<&str, cel::Value> = HashMap::from([("mtls", a.mtls.into())]);
    ctx.add_variable_from_value("request", request);
    ctx.add_variable_from_value("response", response);
    ctx.add_variable_from_value("connection", connection);
    e.program.execute(&ctx)
}
