//! Istio's validation rules for `DestinationRule`, `VirtualService`, `ServiceEntry`,
//! `WorkloadEntry`, `PeerAuthentication` and `AuthorizationPolicy`, and the Gateway API's for its
//! mesh routes and `ReferenceGrant`, turning [`crd`] mirrors into [`policy`] types. Every check
//! names the field path and reports the position of the YAML node through the resource's
//! [`Origin`]; all problems of a resource are collected, not only the first. Warnings
//! (deprecated, ignored or not yet built fields) do not stop a resource from loading. Each
//! resource's rules live in their own file (`destination_rule.rs`, `virtual_service.rs`,
//! `service_entry.rs`, `peer_authentication.rs`, `authorization_policy.rs`,
//! `gateway_route.rs`); this one holds the checker, the scalar rules they share and the free
//! helpers.
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

    /// The problems found, for a resource that yielded no value.
    fn invalid(self) -> Invalid {
        Invalid {
            errors: self.errors,
            warnings: self.warnings,
        }
    }

    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(self.origin.problem(field, message));
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(self.origin.problem(field, message));
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

mod authorization_policy;
mod destination_rule;
mod gateway_route;
pub mod peer_authentication;
mod service_entry;
mod telemetry;
pub use service_entry::is_dns;
mod http_actions;
mod virtual_service;

#[cfg(test)]
pub(super) mod tests;

#[cfg(test)]
mod proptests;
