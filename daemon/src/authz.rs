//! Istio `AuthorizationPolicy` evaluation for one workload's inbound side: which validated
//! policies apply to it ([`Authorizer::for_workload`]: root-namespace policies mesh-wide, its
//! namespace's policies, by `selector` or by `targetRefs` to a Service it backs) and what they
//! decide for a connection or request ([`Authorizer::check`]), in Istio's order: a matching
//! DENY policy denies; else, when any ALLOW policy applies, some ALLOW rule must match; AUDIT
//! policies only report. `CUSTOM` never gets here (refused by validation).
//!
//! A connection that is not HTTP is checked as Istio's TCP filter checks it: an ALLOW rule that
//! names an HTTP-only attribute (hosts, methods, paths, request headers) cannot match, and a
//! DENY or AUDIT rule is checked without those attributes (so it matches more, never less).
//!
//! Invariants: pure and allocation-free on the decision path apart from the result; a peer
//! without an identity (plaintext) has no principal, namespace or service account, so rules
//! that require one never match it (and their `not*` forms always do).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::config::policy::{
    Attr, AttrMatch, AuthorizationPolicy, AuthzAction, AuthzRule, AuthzValue, Segment,
};

/// A validated policy with its name, namespace and age.
#[derive(Clone, Debug)]
pub struct PolicyEntry {
    pub policy: AuthorizationPolicy,
    /// `namespace/name`.
    pub id: Arc<str>,
    pub namespace: String,
}

/// What a connection or request is checked on.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    /// The peer's SPIFFE id without `spiffe://`; `None`: plaintext peer.
    pub principal: Option<&'a str>,
    pub source: IpAddr,
    /// The original client named by the peer (HBONE's `forwarded`), else the peer.
    pub remote: IpAddr,
    pub destination: SocketAddr,
    pub sni: Option<&'a str>,
    /// Present for an HTTP request.
    pub http: Option<Http<'a>>,
}

/// The HTTP attributes of a request.
#[derive(Clone, Debug)]
pub struct Http<'a> {
    /// `:authority` / `Host`, as sent.
    pub host: &'a str,
    pub method: &'a str,
    /// Normalized, without the query.
    pub path: &'a str,
    pub headers: &'a hyper::HeaderMap,
}

/// The policies that apply to one workload, by action (each list oldest first, then by name).
#[derive(Clone, Debug, Default)]
pub struct Authorizer {
    deny: Vec<Arc<PolicyEntry>>,
    allow: Vec<Arc<PolicyEntry>>,
    audit: Vec<Arc<PolicyEntry>>,
}

/// What the policies decided, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy and rule index that decided (`None`: no policy applies, or no ALLOW
    /// policy matched).
    pub policy: Option<(Arc<str>, usize)>,
    /// AUDIT policies whose rule matched.
    pub audited: Vec<Arc<str>>,
}

impl Decision {
    /// One line for logs and `explain`.
    pub fn reason(&self) -> String {
        match (&self.policy, self.allowed) {
            (Some((p, r)), true) => format!("allowed by ALLOW policy {p} rule {r}"),
            (Some((p, r)), false) => format!("denied by DENY policy {p} rule {r}"),
            (None, true) => "allowed: no ALLOW policy applies and no DENY policy matched".into(),
            (None, false) => "denied: ALLOW policies apply and none matched".into(),
        }
    }
}

// === impl Authorizer ===

impl Authorizer {
    /// The policies of `entries` that apply to a workload of `namespace` with `labels`;
    /// `backs(host)` says whether it is an endpoint of Service `host` (for `targetRefs`).
    pub fn for_workload(
        entries: &[Arc<PolicyEntry>],
        namespace: &str,
        labels: &BTreeMap<String, String>,
        backs: impl Fn(&str) -> bool,
    ) -> Self {
        let mut out = Self::default();
        for e in entries {
            let p = &e.policy;
            let applies = if !p.targets.is_empty() {
                e.namespace == namespace && p.targets.iter().any(|h| backs(h))
            } else {
                let here = e.namespace == namespace
                    || e.namespace == crate::config::validate::peer_authentication::ROOT_NAMESPACE;
                here && p
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
            };
            if applies {
                match p.action {
                    AuthzAction::Deny => out.deny.push(e.clone()),
                    AuthzAction::Allow => out.allow.push(e.clone()),
                    AuthzAction::Audit => out.audit.push(e.clone()),
                }
            }
        }
        out
    }

    /// Whether no policy applies (connections are not checked at all).
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.audit.is_empty()
    }

    /// Whether some applying rule reads an HTTP-only attribute (HTTP must then be checked per
    /// request).
    pub fn reads_http(&self) -> bool {
        self.policies().any(|e| {
            e.policy.rules.iter().any(|r| {
                (r.from.iter().flatten())
                    .chain(r.to.iter().flatten())
                    .chain(&r.when)
                    .any(|m| m.attr.is_http())
            })
        })
    }

    /// The applying policies: DENY, ALLOW, then AUDIT.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<PolicyEntry>> {
        self.deny.iter().chain(&self.allow).chain(&self.audit)
    }

    /// Istio's decision for `attrs` (an HTTP request when `attrs.http` is set, else a
    /// connection checked as TCP).
    pub fn check(&self, attrs: &Attributes<'_>) -> Decision {
        let attrs = &Ctx::new(attrs);
        let first = |list: &[Arc<PolicyEntry>]| {
            list.iter().find_map(|e| {
                (e.policy.rules.iter())
                    .position(|r| rule_matches(r, e.policy.action, attrs))
                    .map(|i| (e.id.clone(), i))
            })
        };
        let audited = (self.audit.iter())
            .filter(|e| (e.policy.rules.iter()).any(|r| rule_matches(r, AuthzAction::Audit, attrs)))
            .map(|e| e.id.clone())
            .collect();
        if let Some(hit) = first(&self.deny) {
            return Decision {
                allowed: false,
                policy: Some(hit),
                audited,
            };
        }
        if self.allow.is_empty() {
            return Decision {
                allowed: true,
                policy: None,
                audited,
            };
        }
        let hit = first(&self.allow);
        Decision {
            allowed: hit.is_some(),
            policy: hit,
            audited,
        }
    }
}

/// Whether `rule` of a policy with `action` matches (see the module doc for TCP).
fn rule_matches(rule: &AuthzRule, action: AuthzAction, attrs: &Ctx<'_, '_>) -> bool {
    let tcp = attrs.a.http.is_none();
    if tcp && action == AuthzAction::Allow {
        let http = (rule.from.iter().flatten())
            .chain(rule.to.iter().flatten())
            .chain(&rule.when)
            .any(|m| m.attr.is_http());
        if http {
            return false;
        }
    }
    // On TCP, an HTTP-only matcher (of a DENY or AUDIT rule) is left out: it holds.
    let holds = |m: &AttrMatch| (tcp && m.attr.is_http()) || m.matches(attrs);
    let group =
        |groups: &[Vec<AttrMatch>]| groups.is_empty() || groups.iter().any(|g| g.iter().all(holds));
    group(&rule.from) && group(&rule.to) && rule.when.iter().all(holds)
}

/// The attributes of one check, with the peer identity's parts split once.
struct Ctx<'c, 'a> {
    a: &'c Attributes<'a>,
    /// (namespace, service account) of the principal.
    parts: Option<(&'a str, &'a str)>,
}

impl<'c, 'a> Ctx<'c, 'a> {
    fn new(a: &'c Attributes<'a>) -> Self {
        Self {
            a,
            parts: a.principal.and_then(identity_parts),
        }
    }
}

// === impl AttrMatch ===

impl AttrMatch {
    /// Whether the attribute matches one of the values (`negated`: none of them).
    fn matches(&self, attrs: &Ctx<'_, '_>) -> bool {
        let any = self
            .values
            .iter()
            .any(|p| value_matches(&self.attr, p, attrs));
        any != self.negated
    }
}

fn value_matches(attr: &Attr, p: &AuthzValue, c: &Ctx<'_, '_>) -> bool {
    let a = c.a;
    let http = a.http.as_ref();
    match attr {
        Attr::Principal => a.principal.is_some_and(|v| text(p, v)),
        Attr::Namespace => c.parts.is_some_and(|(ns, _)| text(p, ns)),
        Attr::ServiceAccount => c.parts.is_some_and(
            |(ns, sa)| matches!(p, AuthzValue::Exact(e) if e.split_once('/') == Some((ns, sa))),
        ),
        Attr::SourceIp => net(p, a.source),
        Attr::RemoteIp => net(p, a.remote),
        Attr::DestinationIp => net(p, a.destination.ip()),
        Attr::DestinationPort => matches!(p, AuthzValue::Port(n) if *n == a.destination.port()),
        Attr::Sni => a.sni.is_some_and(|v| text(p, v)),
        Attr::Host => http.is_some_and(|h| {
            let host = h.host.to_ascii_lowercase();
            // A value without a port matches the host on any port.
            let bare = match host.rsplit_once(':') {
                Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host.as_str(),
            };
            text(p, &host) || text(p, bare)
        }),
        Attr::Method => http.is_some_and(|h| text(p, h.method)),
        Attr::Path => http.is_some_and(|h| match p {
            AuthzValue::Template(t) => template(t, h.path),
            _ => text(p, h.path),
        }),
        Attr::Header(name) => http.is_some_and(|h| {
            let mut values = h.headers.get_all(name.as_str()).iter();
            let Some(first) = values.next() else {
                return false;
            };
            // Several values are matched joined with ',' (as Envoy does).
            match values.next() {
                None => first.to_str().is_ok_and(|v| text(p, v)),
                Some(_) => {
                    let joined: Vec<&str> = (h.headers.get_all(name.as_str()).iter())
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    text(p, &joined.join(","))
                }
            }
        }),
    }
}

/// Istio's string match.
fn text(p: &AuthzValue, v: &str) -> bool {
    match p {
        AuthzValue::Exact(e) => v == e,
        AuthzValue::Prefix(s) => v.starts_with(s.as_str()),
        AuthzValue::Suffix(s) => v.ends_with(s.as_str()),
        AuthzValue::Present => !v.is_empty(),
        _ => false,
    }
}

fn net(p: &AuthzValue, ip: IpAddr) -> bool {
    let AuthzValue::Net(base, len) = p else {
        return false;
    };
    let ip = ip.to_canonical();
    match (base, ip) {
        (IpAddr::V4(b), IpAddr::V4(i)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            u32::from(*b) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(b), IpAddr::V6(i)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
            u128::from(*b) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// A path template: `{*}` one non-empty segment, `{**}` whatever remains.
fn template(t: &[Segment], path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut i = 0;
    for s in t {
        match s {
            Segment::Rest => return true,
            Segment::One if parts.get(i).is_some_and(|p| !p.is_empty()) => {}
            Segment::Literal(l) if parts.get(i) == Some(&l.as_str()) => {}
            _ => return false,
        }
        i += 1;
    }
    i == parts.len()
}

/// `(namespace, service account)` of a principal `<trust domain>/ns/<ns>/sa/<sa>`.
pub fn identity_parts(principal: &str) -> Option<(&str, &str)> {
    let (_, rest) = principal.split_once("/ns/")?;
    let (ns, sa) = rest.split_once("/sa/")?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains('/')).then_some((ns, sa))
}

/// How request paths are normalized before policies see them (Istio's mesh-wide
/// `pathNormalization`; the normalized path is also what the workload receives).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PathNormalization {
    /// As received.
    None,
    /// RFC 3986: dot segments removed, percent-encoded unreserved characters decoded (Istio's
    /// default).
    #[default]
    Base,
    /// BASE, and `//` merged into `/`.
    MergeSlashes,
    /// MERGE_SLASHES after decoding `%2F`, `%5C` and `\` into `/`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// `path` (without query) normalized.
    pub fn apply(self, path: &str) -> String {
        if self == PathNormalization::None {
            return path.to_string();
        }
        let mut p = decode_unreserved(path, self == PathNormalization::DecodeAndMergeSlashes);
        if self == PathNormalization::DecodeAndMergeSlashes {
            p = p.replace('\\', "/");
        }
        if self != PathNormalization::Base {
            while p.contains("//") {
                p = p.replace("//", "/");
            }
        }
        remove_dot_segments(&p)
    }
}

/// Decodes `%XX` of unreserved characters (and of `/` and `\` with `slashes`); other escapes
/// keep their bytes with upper-case hex.
fn decode_unreserved(path: &str, slashes: bool) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len()).then(|| &b[i + 1..i + 3]);
        if let Some(v) = hex
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            if v.is_ascii_alphanumeric()
                || b"-._~".contains(&v)
                || (slashes && (v == b'/' || v == b'\\'))
            {
                out.push(v);
            } else {
                out.push(b'%');
                out.extend(b[i + 1..i + 3].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986 section 5.2.4, for an absolute path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "." => trailing = i == last,
            ".." => {
                out.pop();
                trailing = i == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut p = format!("/{}", out.join("/"));
    if trailing && !p.ends_with('/') {
        p.push('/');
    }
    p
}

#[cfg(test)]
mod tests;
