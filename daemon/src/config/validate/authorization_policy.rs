//! `AuthorizationPolicy` rules, as Istio validates them (one of `selector` / `targetRefs`; a
//! DENY needs `rules`; no empty `from`, `to`, `source`, `operation` or value; IP blocks, ports,
//! path templates and `when` keys checked per attribute), plus what Drover cannot enforce,
//! refused with a located error rather than silently weakened: `CUSTOM` (no external
//! authorizer), `requestPrincipals` and `request.auth.*` (no `RequestAuthentication`/JWT),
//! `experimental.*` keys, and targets other than a Service.

use super::*;
use crate::config::{
    crd::{AuthorizationRule, Condition, MapKey, Operation, PolicyTargetRef, Source},
    policy::{Attr, AttrMatch, AuthzAction, AuthzRule, AuthzValue, Segment},
};

impl TryFrom<&Resource<crd::AuthorizationPolicySpec>> for Validated<policy::AuthorizationPolicy> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd::AuthorizationPolicySpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.authorization_policy(&res.spec);
        c.finish(value)
    }
}

const NO_JWT: &str = "needs RequestAuthentication (JWT validation), which Drover does not build; remove it or keep this policy on an Istio proxy";

impl Checker<'_> {
    fn authorization_policy(
        &mut self,
        spec: &crd::AuthorizationPolicySpec,
    ) -> policy::AuthorizationPolicy {
        let (selector, targets) = self.authz_scope(spec);
        let action = self.authz_action(spec);
        let rules = self.authz_rules(spec, action);
        policy::AuthorizationPolicy {
            selector,
            targets,
            action,
            rules,
        }
    }

    /// `selector` (no wildcards) or `targetRefs`/`targetRef` (Services), one kind only.
    fn authz_scope(
        &mut self,
        spec: &crd::AuthorizationPolicySpec,
    ) -> (Option<BTreeMap<String, String>>, Vec<String>) {
        let selector = spec.selector.as_ref().map(|s| {
            self.labels("spec.selector.matchLabels", &s.match_labels);
            for (k, v) in &s.match_labels {
                if k.contains('*') || v.contains('*') {
                    self.err(
                        format!("spec.selector.matchLabels.{k}"),
                        "wildcard is not supported in selector",
                    );
                }
            }
            s.match_labels.clone()
        });
        let kinds = [
            selector.is_some(),
            spec.target_ref.is_some(),
            !spec.target_refs.is_empty(),
        ];
        if kinds.iter().filter(|b| **b).count() > 1 {
            self.err(
                "spec.targetRefs",
                "only one of targetRefs or workloadSelector can be set",
            );
        }
        let single = (spec.target_ref.iter()).map(|r| ("spec.targetRef".to_string(), r));
        let listed = (spec.target_refs.iter().enumerate())
            .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r));
        let refs: Vec<(String, &PolicyTargetRef)> = single.chain(listed).collect();
        let targets = refs
            .iter()
            .filter_map(|(field, r)| self.target(field, r))
            .collect();
        (selector, targets)
    }

    /// `action` (CUSTOM refused) and the `provider` and `rules` it requires or forbids.
    fn authz_action(&mut self, spec: &crd::AuthorizationPolicySpec) -> AuthzAction {
        let written = spec.action.as_deref().unwrap_or("ALLOW");
        let action = match written {
            "ALLOW" => AuthzAction::Allow,
            "DENY" => AuthzAction::Deny,
            "AUDIT" => AuthzAction::Audit,
            "CUSTOM" => {
                self.err(
                    "spec.action",
                    "CUSTOM needs an external authorizer (extensionProviders), which Drover does not call",
                );
                AuthzAction::Deny
            }
            a => {
                self.err(
                    "spec.action",
                    format!("unknown action {a:?} (ALLOW, DENY, AUDIT or CUSTOM)"),
                );
                AuthzAction::Allow
            }
        };
        if spec.provider.is_some() && written != "CUSTOM" {
            self.err(
                "spec.provider",
                format!("`provider` must not be with non CUSTOM action, found {written}"),
            );
        }
        if action == AuthzAction::Deny && spec.rules.is_none() {
            self.err(
                "spec.action",
                "DENY action without `rules` is meaningless as it will never be triggered; add an empty rule `{}` to match every request",
            );
        }
        action
    }

    /// Every rule, with Istio's warning for a DENY rule of HTTP attributes only.
    fn authz_rules(
        &mut self,
        spec: &crd::AuthorizationPolicySpec,
        action: AuthzAction,
    ) -> Vec<AuthzRule> {
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}]");
            let Some(r) = rule else {
                self.err(field, "`rule` must not be null");
                continue;
            };
            let rule = self.authz_rule(&field, r);
            if action == AuthzAction::Deny && only_http(&rule) {
                self.warn(
                    field,
                    "this DENY rule uses only HTTP attributes: it denies all traffic to TCP ports under its scope (as in Istio); name the ports explicitly",
                );
            }
            rules.push(rule);
        }
        rules
    }

    /// A `targetRef`: a Service of the policy's namespace, as its host.
    fn target(&mut self, field: &str, r: &PolicyTargetRef) -> Option<String> {
        if r.name.is_empty() {
            self.err(format!("{field}.name"), "name must be set");
            return None;
        }
        if let Some(ns) = &r.namespace
            && *ns != self.namespace
        {
            self.err(
                format!("{field}.namespace"),
                "cross namespace referencing is not allowed",
            );
            return None;
        }
        match (r.group.as_str(), r.kind.as_str()) {
            ("" | "core", "Service") => Some(qualify(&r.name, &self.namespace)),
            (g, k) => {
                self.err(
                    format!("{field}.kind"),
                    format!("target {g}/{k} is not enforced: Drover applies policies to the workloads behind a Service (kind Service, group \"\"); Gateway and ServiceEntry targets are for ingress and waypoint proxies"),
                );
                None
            }
        }
    }

    fn authz_rule(&mut self, field: &str, rule: &AuthorizationRule) -> AuthzRule {
        let mut out = AuthzRule::default();
        if let Some(from) = &rule.from {
            if from.is_empty() {
                self.err(format!("{field}.from"), "`from` must not be empty");
            }
            for (j, f) in from.iter().enumerate() {
                let at = format!("{field}.from[{j}]");
                match f.as_ref().and_then(|f| f.source.as_ref()) {
                    None => self.err(at, "`from.source` must not be null"),
                    Some(src) => out.from.push(self.source(&format!("{at}.source"), src)),
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                self.err(format!("{field}.to"), "`to` must not be empty");
            }
            for (j, t) in to.iter().enumerate() {
                let at = format!("{field}.to[{j}]");
                match t.as_ref().and_then(|t| t.operation.as_ref()) {
                    None => self.err(at, "`to.operation` must not be null"),
                    Some(op) => out.to.push(self.operation(&format!("{at}.operation"), op)),
                }
            }
        }
        for (j, c) in rule.when.iter().enumerate() {
            let at = format!("{field}.when[{j}]");
            match c {
                None => self.err(at, "`when` must not be null"),
                Some(c) => out.when.extend(self.condition(&at, c)),
            }
        }
        out
    }

    fn source(&mut self, field: &str, s: &Source) -> Vec<AttrMatch> {
        let lists: [(&str, &Option<Vec<String>>); 12] = [
            ("principals", &s.principals),
            ("notPrincipals", &s.not_principals),
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
            ("namespaces", &s.namespaces),
            ("notNamespaces", &s.not_namespaces),
            ("serviceAccounts", &s.service_accounts),
            ("notServiceAccounts", &s.not_service_accounts),
            ("ipBlocks", &s.ip_blocks),
            ("notIpBlocks", &s.not_ip_blocks),
            ("remoteIpBlocks", &s.remote_ip_blocks),
            ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
        ];
        if lists
            .iter()
            .all(|(_, l)| l.as_ref().is_none_or(Vec::is_empty))
        {
            self.err(field, "`from.source` must not be empty");
        }
        let named = |l: &Option<Vec<String>>| l.as_ref().is_some_and(|l| !l.is_empty());
        if (named(&s.service_accounts) || named(&s.not_service_accounts))
            && (named(&s.principals)
                || named(&s.not_principals)
                || named(&s.namespaces)
                || named(&s.not_namespaces))
        {
            self.err(
                format!("{field}.serviceAccounts"),
                "cannot set serviceAccounts with namespaces or principals",
            );
        }
        let mut out = Vec::new();
        for (name, list) in lists {
            let Some(list) = list.as_ref().filter(|l| !l.is_empty()) else {
                continue;
            };
            let at = format!("{field}.{name}");
            let negated = name.starts_with("not");
            let attr = match name.trim_start_matches("not").to_ascii_lowercase().as_str() {
                "principals" => Attr::Principal,
                "namespaces" => Attr::Namespace,
                "serviceaccounts" => Attr::ServiceAccount,
                "ipblocks" => Attr::SourceIp,
                "remoteipblocks" => Attr::RemoteIp,
                _ => {
                    self.err(&at, NO_JWT);
                    continue;
                }
            };
            if let Some(m) = self.attr_match(&at, attr, list, negated) {
                out.push(m);
            }
        }
        out
    }

    fn operation(&mut self, field: &str, op: &Operation) -> Vec<AttrMatch> {
        let ports = |l: &Option<Vec<MapKey>>| {
            l.as_ref().map(|l| {
                l.iter()
                    .map(|k| match k {
                        MapKey::Number(n) => n.to_string(),
                        MapKey::Text(t) => t.clone(),
                    })
                    .collect::<Vec<_>>()
            })
        };
        let lists: [(&str, Attr, Option<Vec<String>>); 8] = [
            ("hosts", Attr::Host, op.hosts.clone()),
            ("notHosts", Attr::Host, op.not_hosts.clone()),
            ("ports", Attr::DestinationPort, ports(&op.ports)),
            ("notPorts", Attr::DestinationPort, ports(&op.not_ports)),
            ("methods", Attr::Method, op.methods.clone()),
            ("notMethods", Attr::Method, op.not_methods.clone()),
            ("paths", Attr::Path, op.paths.clone()),
            ("notPaths", Attr::Path, op.not_paths.clone()),
        ];
        if lists
            .iter()
            .all(|(_, _, l)| l.as_ref().is_none_or(Vec::is_empty))
        {
            self.err(field, "`to.operation` must not be empty");
        }
        let mut out = Vec::new();
        for (name, attr, list) in lists {
            let Some(list) = list.filter(|l| !l.is_empty()) else {
                continue;
            };
            let at = format!("{field}.{name}");
            if let Some(m) = self.attr_match(&at, attr, &list, name.starts_with("not")) {
                out.push(m);
            }
        }
        out
    }

    fn condition(&mut self, field: &str, c: &Condition) -> Vec<AttrMatch> {
        let key = c.key.as_str();
        if key.is_empty() {
            self.err(format!("{field}.key"), "`key` must not be empty");
            return Vec::new();
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            self.err(
                field,
                format!("at least one of `values` or `notValues` must be set for key {key}"),
            );
            return Vec::new();
        }
        let attr = match condition_attr(key) {
            Ok(attr) => attr,
            Err(e) => {
                self.err(format!("{field}.key"), e);
                return Vec::new();
            }
        };
        // Both lists: one of `values` and none of `notValues` (two matchers, ANDed).
        let mut out = Vec::new();
        for (list, negated, name) in [
            (&c.values, false, "values"),
            (&c.not_values, true, "notValues"),
        ] {
            if !list.is_empty() {
                out.extend(self.attr_match(
                    &format!("{field}.{name}"),
                    attr.clone(),
                    list,
                    negated,
                ));
            }
        }
        out
    }

    /// Checks every value of one field for its attribute and compiles them.
    fn attr_match(
        &mut self,
        field: &str,
        attr: Attr,
        list: &[String],
        negated: bool,
    ) -> Option<AttrMatch> {
        let mut values = Vec::new();
        let mut ok = true;
        for (i, v) in list.iter().enumerate() {
            let at = format!("{field}[{i}]");
            if v.is_empty() {
                self.err(at, "empty value not allowed");
                ok = false;
                continue;
            }
            let parsed = match &attr {
                Attr::SourceIp | Attr::RemoteIp | Attr::DestinationIp => parse_cidr(v)
                    .map(|(a, l)| AuthzValue::Net(a, l))
                    .ok_or_else(|| format!("{v:?} is not an IP address or CIDR")),
                Attr::DestinationPort => v
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(AuthzValue::Port)
                    .ok_or_else(|| format!("port {v:?} is not in 1..=65535")),
                Attr::ServiceAccount => match v.split_once('/') {
                    Some((ns, sa))
                        if is_dns_label(ns) && !sa.is_empty() && !sa.contains(['/', '*']) =>
                    {
                        Ok(AuthzValue::Exact(v.clone()))
                    }
                    _ => Err(format!("{v:?} is not a service account as namespace/name")),
                },
                Attr::Path => path_pattern(v),
                Attr::Host => Ok(string_pattern(&v.to_ascii_lowercase())),
                _ => Ok(string_pattern(v)),
            };
            match parsed {
                Ok(p) => values.push(p),
                Err(e) => {
                    self.err(at, e);
                    ok = false;
                }
            }
        }
        ok.then(|| AttrMatch {
            attr,
            values,
            negated,
            field: field.trim_start_matches("spec.").to_string(),
        })
    }
}

/// The attribute a `when` key names, or why it cannot be enforced.
fn condition_attr(key: &str) -> Result<Attr, String> {
    Ok(match key {
        "source.ip" => Attr::SourceIp,
        "remote.ip" => Attr::RemoteIp,
        "source.namespace" => Attr::Namespace,
        "source.principal" => Attr::Principal,
        "source.serviceAccount" => Attr::ServiceAccount,
        "destination.ip" => Attr::DestinationIp,
        "destination.port" => Attr::DestinationPort,
        "connection.sni" => Attr::Sni,
        k if k.starts_with("request.headers[") && k.ends_with(']') => {
            let name = &k["request.headers[".len()..k.len() - 1];
            if name.is_empty() || hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("{name:?} is not a header name"));
            }
            Attr::Header(name.to_ascii_lowercase())
        }
        k if k.starts_with("request.auth.") => return Err(format!("{k}: {NO_JWT}")),
        k if k.starts_with("experimental.") => {
            return Err(format!(
                "{k}: experimental Envoy filter metadata does not exist in Drover"
            ));
        }
        "destination.namespace" | "destination.user" => {
            return Err(format!(
                "attribute {key} is replaced by the metadata.namespace"
            ));
        }
        k if k.starts_with("destination.labels") => {
            return Err(format!(
                "attribute {key} is replaced by the workload selector"
            ));
        }
        k => return Err(format!("unknown attribute {k:?}")),
    })
}

/// Istio's string match: `*` alone is presence, a leading or trailing `*` a suffix or prefix.
fn string_pattern(v: &str) -> AuthzValue {
    if v == "*" {
        AuthzValue::Present
    } else if let Some(rest) = v.strip_prefix('*') {
        AuthzValue::Suffix(rest.to_string())
    } else if let Some(rest) = v.strip_suffix('*') {
        AuthzValue::Prefix(rest.to_string())
    } else {
        AuthzValue::Exact(v.to_string())
    }
}

/// A `paths` value: a string match, or a template with `{*}` (one segment) and `{**}` (the rest,
/// last only), as Istio accepts them.
fn path_pattern(v: &str) -> Result<AuthzValue, String> {
    if !v.contains(['{', '}']) {
        return Ok(string_pattern(v));
    }
    if !v.starts_with('/') {
        return Err(format!("path template {v:?} must start with '/'"));
    }
    let parts: Vec<&str> = v[1..].split('/').collect();
    let mut segments = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        segments.push(match *part {
            "{*}" => Segment::One,
            "{**}" if i + 1 == parts.len() => Segment::Rest,
            "{**}" => return Err(format!("{{**}} must be the last segment of {v:?}")),
            p if p.contains(['{', '}', '*']) => {
                return Err(format!(
                    "invalid or unsupported path {v:?}: segment {p:?} is not {{*}}, {{**}} or a literal"
                ));
            }
            p => Segment::Literal(p.to_string()),
        });
    }
    Ok(AuthzValue::Template(segments))
}

/// Whether every matcher of `rule` is HTTP-only (and it has some).
fn only_http(rule: &AuthzRule) -> bool {
    let all: Vec<&AttrMatch> = (rule.from.iter().flatten())
        .chain(rule.to.iter().flatten())
        .chain(&rule.when)
        .collect();
    !all.is_empty() && all.iter().all(|m| m.attr.is_http())
}
