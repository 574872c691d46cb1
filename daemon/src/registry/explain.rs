//! Renders the effective policy of one destination for `drover explain`: which rule applies to
//! the client, the cluster's endpoints, and for every value the resource field (with its
//! `file:line:col`) that set it, or that it is Istio's default.
//!
//! Invariant: read-only over a [`Registry`] snapshot; the text is for people, not for parsing.

use std::{fmt::Write as _, time::Duration};

use super::{Registry, resolve::Sourced, route::is_http};
use crate::config::{
    policy::{self, Algorithm, HashKey, HashRing, UNLIMITED},
    validate::qualify,
};

/// Why a destination cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no service with host {0:?} (hosts: {1})")]
    UnknownHost(String, String),
    #[error("service {host} has no port {port} (ports: {ports})")]
    UnknownPort {
        host: String,
        port: u16,
        ports: String,
    },
    #[error("service {host} has several ports ({ports}); choose one with --port")]
    AmbiguousPort { host: String, ports: String },
    #[error(transparent)]
    Subset(#[from] super::resolve::UnknownSubset),
}

/// The explanation of `(host, port, subset)` as seen by the registry's client.
pub fn explain(
    reg: &Registry,
    host: &str,
    port: Option<u16>,
    subset: Option<&str>,
) -> Result<String, Error> {
    let (s, svc, port) = locate(reg, host, port)?;
    let rule = reg.rule_for(svc);
    let cluster = match reg.cluster(s, port.number, subset) {
        Some(c) => c,
        None => {
            return Err(Error::Subset(super::resolve::UnknownSubset {
                host: svc.host.clone(),
                subset: subset.unwrap_or_default().to_string(),
            }));
        }
    };
    let mut o = String::new();
    summary(&mut o, reg, (svc, port), cluster, rule.as_ref(), subset);
    routes(&mut o, reg, svc, port);
    path(&mut o, reg, svc, port);
    policy_blocks(&mut o, &cluster.policy);
    Ok(o)
}

/// Which route a request (`method`, path with its query, `headers`) to `host` takes, and why:
/// the route and the match that held, then where it goes or what the proxy answers.
pub fn request(
    reg: &Registry,
    host: &str,
    port: Option<u16>,
    method: &str,
    path_and_query: &str,
    headers: &hyper::HeaderMap,
) -> Result<String, Error> {
    let (_, svc, port) = locate(reg, host, port)?;
    let mut o = format!("request    {method} {path_and_query}");
    let Some(vip) = svc.vips.first() else {
        let _ = writeln!(
            o,
            ": the service has no VIP, so no request reaches its routes"
        );
        return Ok(o);
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let req = super::route::Request {
        method,
        scheme: "http",
        authority: host,
        path,
        query,
        headers,
        connection: "-",
    };
    match reg.route_request(std::net::SocketAddr::new(*vip, port.number), None, &req) {
        Err(e) => {
            let _ = writeln!(o, " → {} ({}): {e}", e.http_status(), e.response_flag());
        }
        Ok(d) => {
            match &d.route {
                Some(name) => {
                    let _ = write!(o, " → {name}");
                }
                None => o.push_str(" → no route: the service's default cluster"),
            }
            if let Some(m) = d.http_match {
                let _ = write!(o, " (matched {})", describe_match(m));
            }
            let _ = match (d.http_route.and_then(|r| r.local.as_ref()), d.destination) {
                (Some(policy::LocalReply::Redirect(r)), _) => {
                    writeln!(o, " → answered by the proxy: redirect {}", r.code.as_u16())
                }
                (Some(policy::LocalReply::Direct { status, .. }), _) => {
                    writeln!(o, " → answered by the proxy: {}", status.as_u16())
                }
                (None, _) => writeln!(o, " → cluster {}", d.cluster.name),
            };
        }
    }
    Ok(o)
}

/// A match's conditions in words.
fn describe_match(m: &policy::HttpMatch) -> String {
    let sm = |s: &policy::StringMatch| match s {
        policy::StringMatch::Exact(v) => format!("exact {v}"),
        policy::StringMatch::Prefix(v) => format!("prefix {v}"),
        policy::StringMatch::PathPrefix(v) => format!("segment prefix {v}"),
        policy::StringMatch::Regex(r) => format!("regex {}", r.as_str()),
    };
    let mut parts = Vec::new();
    if let Some(u) = &m.uri {
        parts.push(format!("path {}", sm(u)));
    }
    if let Some(v) = &m.method {
        parts.push(format!("method {}", sm(v)));
    }
    for (kind, list) in [("header", &m.headers), ("query", &m.query_params)] {
        for (name, v) in list {
            parts.push(match v {
                Some(v) => format!("{kind} {name} {}", sm(v)),
                None => format!("{kind} {name} present"),
            });
        }
    }
    if let Some(p) = m.port {
        parts.push(format!("port {p}"));
    }
    if parts.is_empty() {
        "every request".to_string()
    } else {
        parts.join(", ")
    }
}

/// Which data path a connection to each VIP of the port takes: the kernel fast path (when the
/// daemon runs with `--fast-path auto`), or the proxy, and why.
fn path(o: &mut String, reg: &Registry, svc: &super::Service, port: &super::ServicePort) {
    if svc.vips.is_empty() {
        let _ = writeln!(
            o,
            "path       proxied: no exact VIP to balance in the kernel"
        );
    }
    for vip in &svc.vips {
        let addr = std::net::SocketAddr::new(*vip, port.number);
        let _ = match crate::fastpath::table(reg, addr, false) {
            Ok(t) => writeln!(
                o,
                "path       {addr}: kernel fast path with --fast-path auto ({} over {} endpoints; \
                 over maxConnections connect() fails with EPERM)",
                crate::fastpath::lb_name(t.lb),
                t.n
            ),
            Err(why) => writeln!(o, "path       {addr}: proxied: {why}"),
        };
    }
}

/// The service (index and value) and port that `host` and `port` name.
fn locate<'r>(
    reg: &'r Registry,
    host: &str,
    port: Option<u16>,
) -> Result<(usize, &'r super::Service, &'r super::ServicePort), Error> {
    let (s, svc) = reg
        .service(host)
        .or_else(|| reg.service(&qualify(host, &reg.client().namespace)))
        .ok_or_else(|| {
            let hosts: Vec<_> = reg.services().iter().map(|s| s.host.as_str()).collect();
            Error::UnknownHost(host.to_string(), hosts.join(", "))
        })?;
    let ports = svc
        .ports
        .iter()
        .map(|p| format!("{} {}", p.number, p.name))
        .collect::<Vec<_>>()
        .join(", ");
    let port = match (port, svc.ports.as_slice()) {
        (Some(p), _) => svc
            .ports
            .iter()
            .find(|sp| sp.number == p)
            .ok_or(Error::UnknownPort {
                host: svc.host.clone(),
                port: p,
                ports: ports.clone(),
            })?,
        (None, [only]) => only,
        (None, _) => {
            return Err(Error::AmbiguousPort {
                host: svc.host.clone(),
                ports,
            });
        }
    };
    Ok((s, svc, port))
}

/// Cluster, service, client, rule, subset, balancer and endpoints.
fn summary(
    o: &mut String,
    reg: &Registry,
    (svc, port): (&super::Service, &super::ServicePort),
    cluster: &super::Cluster,
    rule: Option<&super::resolve::MergedRule>,
    subset: Option<&str>,
) {
    let client = reg.client();
    let _ = writeln!(o, "cluster    {}", cluster.name);
    let _ = writeln!(
        o,
        "service    {} (ServiceEntry {}/{} from {}, resolution {:?}, port {} {} {})",
        svc.host,
        svc.namespace,
        svc.entry,
        svc.source,
        svc.resolution,
        port.number,
        port.name,
        port.protocol.as_deref().unwrap_or("(sniffed)")
    );
    let labels: Vec<_> = client
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let locality = if client.locality.is_empty() {
        "unknown".to_string()
    } else {
        client.locality.clone()
    };
    let _ = writeln!(
        o,
        "client     namespace {} labels {{{}}} locality {locality}",
        client.namespace,
        labels.join(",")
    );
    inbound_line(o, reg.inbound_mtls());
    rule_lines(o, rule, subset);
    let _ = writeln!(
        o,
        "balancer   {}{}",
        cluster.balancer.name(),
        if cluster.policy.load_balancer.value.is_none() {
            " (Istio default)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "locality   {}", locality_line(cluster, client));
    endpoint_lines(o, svc, cluster);
}

/// Each endpoint of the cluster: name, address, labels, locality, its priority or locality
/// weight, and where it came from.
fn endpoint_lines(o: &mut String, svc: &super::Service, cluster: &super::Cluster) {
    let plan = cluster.balancer.plan();
    let _ = writeln!(o, "endpoints  {}", cluster.members.len());
    for (i, m) in cluster.members.iter().enumerate() {
        let (ep, addr) = (&svc.endpoints[m.endpoint], m.addr);
        let l: Vec<_> = ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let from = ep
            .origin
            .as_ref()
            .map_or_else(String::new, |o| format!(" from {o}"));
        let mesh = if m.mesh && cluster.policy.tls.value.is_none() {
            " [auto mTLS]"
        } else {
            ""
        };
        let place = match plan.map(|p| (p.weighted, p.placement(i))) {
            None => String::new(),
            Some((_, None)) => " [no traffic: not in distribute]".to_string(),
            Some((true, Some((_, w)))) => format!(" [locality weight {w}]"),
            Some((false, Some((p, _)))) => format!(" [priority {p}]"),
        };
        let loc = if ep.locality.is_empty() {
            String::new()
        } else {
            format!(" locality {}", ep.locality)
        };
        let _ = writeln!(
            o,
            "  {} {addr} {{{}}}{loc}{place}{mesh}{from}",
            ep.name,
            l.join(",")
        );
    }
}

/// What locality does for this cluster and client, and why.
fn locality_line(cluster: &super::Cluster, client: &super::Client) -> String {
    let lb = cluster.policy.load_balancer.value.as_ref();
    let setting = lb.and_then(|lb| lb.locality.as_ref());
    let warmup = lb
        .and_then(|lb| lb.warmup.as_ref())
        .map_or_else(String::new, |w| {
            format!(
                "; warmup {:?} from {}% (aggression {})",
                w.duration, w.minimum_percent, w.aggression
            )
        });
    let what = match cluster.balancer.plan() {
        Some(p) if p.weighted => format!("weighted by {}", p.reason),
        Some(p) => format!("{} failover priorities by {}", p.levels.len(), p.reason),
        None if setting.is_some_and(|s| s.enabled == Some(false)) => "off (enabled: false)".into(),
        None if client.locality.is_empty() => "not used: the client's locality is unknown".into(),
        None if cluster.outlier.is_none() && setting.is_none_or(|s| s.distribute.is_empty()) => {
            "one priority: failover needs outlierDetection".into()
        }
        None => "one priority: every endpoint is alike for this client".into(),
    };
    what + &warmup
}

/// The client's own inbound mTLS: the composed mode, its port-level modes and the
/// PeerAuthentications they came from.
fn inbound_line(o: &mut String, m: &super::peer::InboundMtls) {
    let mode = m
        .mode
        .map_or_else(|| "--peer-authentication".to_string(), |m| m.to_string());
    let ports: Vec<_> = m.ports.iter().map(|(p, m)| format!("{p}: {m}")).collect();
    let from = if m.from.is_empty() {
        "no PeerAuthentication applies".to_string()
    } else {
        format!("PeerAuthentication {}", m.from.join(", "))
    };
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!(" ports {{{}}}", ports.join(", "))
    };
    let _ = writeln!(o, "inbound    mTLS {mode}{ports} ({from})");
}

/// The DestinationRules that apply (merged in order) and the subset's selector.
fn rule_lines(o: &mut String, rule: Option<&super::resolve::MergedRule>, subset: Option<&str>) {
    match &rule {
        None => {
            let _ = writeln!(o, "rule       none applies (Istio defaults everywhere)");
        }
        Some(r) => {
            for (i, src) in r.sources.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "{}DestinationRule {} ({})",
                    if i == 0 {
                        "rule       "
                    } else {
                        "           + merged "
                    },
                    src.id,
                    src.position("kind")
                        .unwrap_or_else(|| src.origin.file.display().to_string())
                );
            }
        }
    }
    if let Some(name) = subset
        && let Some((sub, src)) = rule.and_then(|r| r.subset(name))
    {
        let sel: Vec<_> = sub.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            o,
            "subset     {name} selects {{{}}} ({} spec.subsets[{}])",
            sel.join(","),
            src.id,
            sub.index
        );
    }
}

/// The VirtualService routes of the service's port, with their destinations and policies.
fn routes(o: &mut String, reg: &Registry, svc: &super::Service, port: &super::ServicePort) {
    let Some(vs) = reg.virtual_service_for(&svc.host) else {
        return;
    };
    {
        let _ = match &vs.gateway {
            // Gateway API routes: each rule below names its route; matches are in precedence
            // order across the routes.
            Some(g) => writeln!(
                o,
                "routes     {} ({} Gateway API routes, ordered by the spec's precedence)",
                vs.source.id,
                if g.consumer { "consumer" } else { "producer" }
            ),
            None => writeln!(o, "routes     VirtualService {}", vs.source.id),
        };
        let routes = if is_http(port.protocol.as_deref()) {
            vs.vs
                .http
                .iter()
                .map(|r| {
                    (
                        (r.label.clone()).unwrap_or_else(|| format!("http[{}]", r.index)),
                        r.matches.is_empty(),
                        &r.destinations,
                        Some(http_route_policy(r)),
                    )
                })
                .collect::<Vec<_>>()
        } else {
            // On TLS ports the `tls` routes (by SNI) come first.
            let tls = (super::route::is_tls(port.protocol.as_deref()))
                .then_some(&vs.vs.tls)
                .into_iter()
                .flatten()
                .map(|r| (format!("tls[{}]", r.index), false, &r.destinations, None));
            let tcp = vs.vs.tcp.iter().map(|r| {
                (
                    (r.label.clone()).unwrap_or_else(|| format!("tcp[{}]", r.index)),
                    r.matches.is_empty(),
                    &r.destinations,
                    None,
                )
            });
            tls.chain(tcp).collect()
        };
        for (name, all, dests, policy) in routes {
            let d: Vec<_> = dests
                .iter()
                .map(|d| {
                    format!(
                        "{}{}{} weight {}",
                        d.host,
                        d.subset
                            .as_deref()
                            .map(|s| format!(" subset {s}"))
                            .unwrap_or_default(),
                        d.port.map(|p| format!(" port {p}")).unwrap_or_default(),
                        d.weight
                    )
                })
                .collect();
            let _ = writeln!(
                o,
                "  {name}{} → {}",
                if all {
                    " (all traffic)"
                } else {
                    " (with match)"
                },
                if d.is_empty() {
                    "(answered by the proxy)".to_string()
                } else {
                    d.join("; ")
                }
            );
            if let Some(policy) = policy {
                let _ = writeln!(o, "    {policy}");
            }
        }
    }
}

/// Every traffic-policy block: where it was set, each field's value and origin.
fn policy_blocks(o: &mut String, p: &super::EffectivePolicy) {
    block(
        o,
        "loadBalancer",
        &p.load_balancer,
        lb_fields,
        "LEAST_REQUEST (Istio default since 1.14)",
    );
    block(
        o,
        "connectionPool",
        &p.connection_pool,
        pool_fields,
        "every limit 4294967295 (unlimited), connectTimeout 10s, idleTimeout 1h",
    );
    block(
        o,
        "outlierDetection",
        &p.outlier_detection,
        od_fields,
        "no outlier detection",
    );
    block(
        o,
        "tls",
        &p.tls,
        tls_fields,
        "auto mTLS: ISTIO_MUTUAL to endpoints labelled security.istio.io/tlsMode=istio whose PeerAuthentication does not DISABLE the port (with a mesh identity, --mesh-ca), plaintext to the rest",
    );
    block(
        o,
        "tunnel",
        &p.tunnel,
        |t| {
            vec![
                ("protocol", t.protocol.clone()),
                ("targetHost", t.target_host.clone()),
                ("targetPort", t.target_port.to_string()),
            ]
        },
        "none",
    );
    block(
        o,
        "proxyProtocol",
        &p.proxy_protocol,
        |v| vec![("version", format!("{v:?}"))],
        "none",
    );
    block(
        o,
        "retryBudget",
        &p.retry_budget,
        |r| {
            vec![
                ("percent", r.percent.to_string()),
                ("minRetryConcurrency", r.min_retry_concurrency.to_string()),
            ]
        },
        "none (maxRetries applies)",
    );
}

fn block<T>(
    o: &mut String,
    name: &str,
    b: &Sourced<T>,
    fields: impl Fn(&T) -> Vec<(&'static str, String)>,
    default: &str,
) {
    match (&b.value, &b.from) {
        (Some(v), Some((src, path))) => {
            let at = src.position(path).unwrap_or_default();
            let _ = writeln!(o, "{name}  from {} {path} {at}", src.id);
            for (field, value) in fields(v) {
                let full = format!("{path}.{field}");
                let origin = match src.position(&full) {
                    Some(pos) => format!("set at {pos}"),
                    None => "default".to_string(),
                };
                let _ = writeln!(o, "  {field:<36} {value:<24} {origin}");
            }
        }
        (None, Some((src, path))) => {
            let _ = writeln!(
                o,
                "{name}  unset by {} {path} (port-level/subset override): {default}",
                src.id
            );
        }
        _ => {
            let _ = writeln!(o, "{name}  not configured: {default}");
        }
    }
}

fn lb_fields(lb: &policy::LoadBalancer) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    match &lb.algorithm {
        Algorithm::ConsistentHash(ch) => {
            v.push(match &ch.key {
                HashKey::Header(h) => ("consistentHash.httpHeaderName", h.clone()),
                HashKey::Cookie { name, ttl, .. } => (
                    "consistentHash.httpCookie",
                    format!(
                        "{name} ttl {}",
                        ttl.map_or("unset (no cookie generated)".into(), dur)
                    ),
                ),
                HashKey::SourceIp => ("consistentHash.useSourceIp", "true".into()),
                HashKey::QueryParameter(q) => ("consistentHash.httpQueryParameterName", q.clone()),
            });
            v.push(match ch.ring {
                HashRing::RingHash { minimum_ring_size } => (
                    "consistentHash.ringHash.minimumRingSize",
                    minimum_ring_size.to_string(),
                ),
                HashRing::Maglev { table_size } => {
                    ("consistentHash.maglev.tableSize", table_size.to_string())
                }
            });
        }
        a => v.push(("simple", a.name().to_string())),
    }
    if let Some(l) = &lb.locality {
        v.push((
            "localityLbSetting",
            format!(
                "enabled {:?}, {} distribute, {} failover, {} failoverPriority",
                l.enabled,
                l.distribute.len(),
                l.failover.len(),
                l.failover_priority.len()
            ),
        ));
    }
    if let Some(w) = &lb.warmup {
        v.push(("warmup.duration", dur(w.duration)));
        v.push(("warmup.minimumPercent", w.minimum_percent.to_string()));
        v.push(("warmup.aggression", w.aggression.to_string()));
    }
    v
}

fn pool_fields(p: &policy::ConnectionPool) -> Vec<(&'static str, String)> {
    vec![
        ("tcp.maxConnections", limit(p.max_connections)),
        ("tcp.connectTimeout", dur(p.connect_timeout)),
        (
            "tcp.tcpKeepalive",
            p.tcp_keepalive
                .as_ref()
                .map_or("off".into(), |k| format!("{k:?}")),
        ),
        (
            "tcp.maxConnectionDuration",
            p.max_connection_duration.map_or("none".into(), dur),
        ),
        ("tcp.idleTimeout", dur(p.tcp_idle_timeout)),
        (
            "http.http1MaxPendingRequests",
            limit(p.http1_max_pending_requests),
        ),
        ("http.http2MaxRequests", limit(p.http2_max_requests)),
        (
            "http.maxRequestsPerConnection",
            p.max_requests_per_connection
                .map_or("unlimited".into(), |n| n.to_string()),
        ),
        ("http.maxRetries", limit(p.max_retries)),
        ("http.idleTimeout", dur(p.http_idle_timeout)),
        ("http.h2UpgradePolicy", format!("{:?}", p.h2_upgrade)),
        ("http.useClientProtocol", p.use_client_protocol.to_string()),
        (
            "http.maxConcurrentStreams",
            p.max_concurrent_streams.to_string(),
        ),
        (
            "http.http2KeepAlive",
            p.http2_keepalive.map_or("off".into(), |(i, t)| {
                format!("interval {} timeout {}", dur(i), dur(t))
            }),
        ),
    ]
}

fn od_fields(od: &policy::OutlierDetection) -> Vec<(&'static str, String)> {
    vec![
        ("consecutive5xxErrors", od.consecutive_5xx.to_string()),
        (
            "consecutiveGatewayErrors",
            od.consecutive_gateway.to_string(),
        ),
        (
            "splitExternalLocalOriginErrors",
            od.split_local_origin.to_string(),
        ),
        (
            "consecutiveLocalOriginFailures",
            od.consecutive_local_origin.to_string(),
        ),
        ("interval", dur(od.interval)),
        ("baseEjectionTime", dur(od.base_ejection_time)),
        ("maxEjectionPercent", od.max_ejection_percent.to_string()),
        ("minHealthPercent", od.min_health_percent.to_string()),
        (
            "outlierDetectionHttpErrorCodes",
            if od.http_error_codes.is_empty() {
                "any 5xx".into()
            } else {
                format!("{:?}", od.http_error_codes)
            },
        ),
    ]
}

fn tls_fields(t: &policy::ClientTls) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    vec![
        ("mode", format!("{:?}", t.mode)),
        ("clientCertificate", opt(&t.client_certificate)),
        ("privateKey", opt(&t.private_key)),
        ("caCertificates", opt(&t.ca_certificates)),
        ("caCrl", opt(&t.ca_crl)),
        ("credentialName", opt(&t.credential_name)),
        ("subjectAltNames", format!("{:?}", t.subject_alt_names)),
        ("sni", opt(&t.sni)),
        ("insecureSkipVerify", t.insecure_skip_verify.to_string()),
    ]
}

fn limit(n: u32) -> String {
    if n == UNLIMITED {
        format!("{n} (unlimited)")
    } else {
        n.to_string()
    }
}

/// `1h`, `90s`, `1500ms`.
pub fn dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// An HTTP route's retries and timeout as they apply.
fn http_route_policy(r: &crate::config::policy::HttpRoute) -> String {
    let retries = match &r.retries {
        None => "retries 2 on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes [503], to another endpoint unless the balancer hashes (Istio default)"
            .to_string(),
        Some(rt) if rt.attempts == 0 => "retries off".to_string(),
        Some(rt) => format!(
            "retries {}{} on {}",
            rt.attempts,
            rt.per_try_timeout
                .map(|t| format!(", perTryTimeout {t:?}"))
                .unwrap_or_default(),
            rt.retry_on
        ),
    };
    let timeout = r
        .timeout
        .map_or("no timeout".to_string(), |t| format!("timeout {t:?}"));
    let mut lines = vec![format!("{retries}; {timeout}")];
    lines.extend(http_route_actions(r));
    lines.join("\n    ")
}

/// One line per action of an HTTP route (what it does besides choosing a destination).
fn http_route_actions(r: &crate::config::policy::HttpRoute) -> Vec<String> {
    use crate::config::policy::{Abort, LocalReply};
    let mut out = Vec::new();
    match &r.local {
        Some(LocalReply::Redirect(x)) => out.push(format!(
            "redirect {}{}{}{}",
            x.code.as_u16(),
            x.scheme
                .as_ref()
                .map(|s| format!(" scheme {s}"))
                .unwrap_or_default(),
            x.authority
                .as_ref()
                .map(|a| format!(" authority {a}"))
                .unwrap_or_default(),
            x.uri
                .as_ref()
                .map(|u| format!(" uri {u}"))
                .unwrap_or_default(),
        )),
        Some(LocalReply::Direct { status, body }) => out.push(format!(
            "direct response {} ({} bytes)",
            status.as_u16(),
            body.len()
        )),
        None => {}
    }
    if let Some(rw) = &r.rewrite {
        let mut parts = Vec::new();
        if let Some(u) = &rw.uri {
            parts.push(format!("uri {u}"));
        }
        if let Some(re) = &rw.uri_regex {
            let (m, w) = re.parts();
            parts.push(format!("uriRegexRewrite {m:?} → {w:?}"));
        }
        if let Some(a) = &rw.authority {
            parts.push(format!("authority {a}"));
        }
        out.push(format!("rewrite {}", parts.join(", ")));
    }
    if let Some(f) = &r.fault {
        if let Some((d, p)) = f.delay {
            out.push(format!("fault delay {d:?} for {p}% (DI)"));
        }
        if let Some((a, p)) = f.abort {
            let what = match a {
                Abort::Http(s) => format!("HTTP {}", s.as_u16()),
                Abort::Grpc(c) => format!("grpc-status {c}"),
            };
            out.push(format!("fault abort {what} for {p}% (FI)"));
        }
    }
    let ops = |o: &crate::config::policy::HeaderOps| o.set.len() + o.add.len() + o.remove.len();
    let (req, resp) = (ops(&r.headers.request), ops(&r.headers.response));
    if req + resp > 0 {
        out.push(format!(
            "headers: {req} request and {resp} response operations"
        ));
    }
    for (d, p) in &r.mirrors {
        out.push(format!(
            "mirror {}{} for {p}%",
            d.host,
            d.subset
                .as_deref()
                .map(|s| format!(" subset {s}"))
                .unwrap_or_default()
        ));
    }
    if let Some(c) = &r.cors {
        out.push(format!("cors: {} allowed origin patterns", c.origins.len()));
    }
    out
}

/// The AuthorizationPolicies that apply to the inbound side of the registry's client at
/// `addresses`, and with `probe` the decision for that connection or request and the rule
/// (with its fields) that made it.
pub fn authorization(
    reg: &Registry,
    addresses: &[std::net::IpAddr],
    probe: Option<&crate::authz::Attributes<'_>>,
) -> String {
    let authz = reg.authorizer(addresses);
    let mut o = String::new();
    policy_lines(&mut o, &authz);
    let Some(probe) = probe else {
        return o;
    };
    let what = match &probe.http {
        Some(h) => format!("{} {} (HTTP, host {:?})", h.method, h.path, h.host),
        None => "a TCP connection (HTTP-only attributes do not apply)".to_string(),
    };
    let _ = writeln!(
        o,
        "request    {what} from {} (address {}) to {}",
        probe.principal.unwrap_or("a plaintext peer (no principal)"),
        probe.source,
        probe.destination
    );
    let d = authz.check(probe);
    let _ = writeln!(o, "decision   {}", if d.allowed { "ALLOW" } else { "DENY" });
    let _ = writeln!(o, "because    {}", d.reason());
    if let Some((id, i)) = &d.policy
        && let Some(rule) =
            (authz.policies().find(|e| e.id == *id)).and_then(|e| e.policy.rules.get(*i))
    {
        let fields: Vec<&str> = (rule.from.iter().flatten())
            .chain(rule.to.iter().flatten())
            .chain(&rule.when)
            .map(|m| m.field.as_str())
            .collect();
        let fields = if fields.is_empty() {
            "{} (matches everything)".to_string()
        } else {
            fields.join(", ")
        };
        let _ = writeln!(o, "rule       {fields}");
    }
    for a in &d.audited {
        let _ = writeln!(
            o,
            "audit      AUDIT policy {a} matched (logged, decides nothing)"
        );
    }
    o
}

/// One line per AuthorizationPolicy that applies: action, name, scope and rule count.
fn policy_lines(o: &mut String, authz: &crate::authz::Authorizer) {
    use crate::config::policy::AuthzAction;
    let n = authz.policies().count();
    let _ = writeln!(
        *o,
        "policies   {n} apply to this workload (DENY, ALLOW, AUDIT; oldest first)"
    );
    for e in authz.policies() {
        let p = &e.policy;
        let scope = if !p.targets.is_empty() {
            format!("targetRefs Service {}", p.targets.join(", "))
        } else {
            match &p.selector {
                Some(s) if !s.is_empty() => {
                    let labels: Vec<String> = s.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("selector {}", labels.join(","))
                }
                _ if e.namespace == super::resolve::ROOT_NAMESPACE => "mesh-wide".to_string(),
                _ => format!("namespace {}", e.namespace),
            }
        };
        let rules = match (p.action, p.rules.len()) {
            (AuthzAction::Allow, 0) => "no rules: matches nothing".to_string(),
            (_, r) => format!("{r} rule(s)"),
        };
        let _ = writeln!(
            *o,
            "  {:<5}  {:<32} {scope}; {rules}",
            p.action.to_string(),
            e.id
        );
    }
    if authz.is_empty() {
        let _ = writeln!(*o, "  (none: every connection is allowed)");
    }
}
