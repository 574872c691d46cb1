//! Table-driven tests of every validation rule: each case is a `spec` fragment and the error or
//! warning it must produce (field path and message), or none.

use super::*;
use crate::config::source::ConfigSet;

#[derive(Debug)]
enum Expect {
    Valid,
    /// No error and no warning: the fields are accepted and enforced.
    Clean,
    /// An error whose `field: message` contains this text.
    Error(&'static str),
    /// A warning (and no error) whose `field: message` contains this text.
    Warn(&'static str),
}
use Expect::{Clean, Error, Valid, Warn};

fn doc(kind: &str, spec: &str) -> String {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    let group = match kind {
        "PeerAuthentication" | "AuthorizationPolicy" => "security.istio.io/v1",
        "HTTPRoute" | "GRPCRoute" => "gateway.networking.k8s.io/v1",
        "TCPRoute" => "gateway.networking.k8s.io/v1alpha2",
        "ReferenceGrant" => "gateway.networking.k8s.io/v1beta1",
        "Telemetry" => "telemetry.istio.io/v1",
        _ => "networking.istio.io/v1",
    };
    format!(
        "apiVersion: {group}\nkind: {kind}\nmetadata: {{name: t, namespace: ns1}}\nspec:\n{spec}"
    )
}

fn load(kind: &str, spec: &str) -> ConfigSet {
    ConfigSet::parse_ok("t.yaml", &doc(kind, spec))
}

/// A validation outcome as (errors, warnings).
fn split<T>(r: Result<Validated<T>, Invalid>) -> (Vec<Problem>, Vec<Problem>) {
    match r {
        Ok(v) => (Vec::new(), v.warnings),
        Err(i) => (i.errors, i.warnings),
    }
}

/// (errors, warnings) as `field: message` strings, each checked to carry a line number.
pub(in crate::config) fn check(kind: &str, spec: &str) -> (Vec<String>, Vec<String>) {
    let set = load(kind, spec);
    let (errors, warnings) = match kind {
        "DestinationRule" => {
            match Validated::<policy::DestinationRule>::try_from(&set.destination_rules[0]) {
                Ok(v) => (Vec::new(), v.warnings),
                Err(i) => (i.errors, i.warnings),
            }
        }
        "PeerAuthentication" => {
            match Validated::<policy::PeerAuthentication>::try_from(&set.peer_authentications[0]) {
                Ok(v) => (Vec::new(), v.warnings),
                Err(i) => (i.errors, i.warnings),
            }
        }
        "AuthorizationPolicy" => {
            match Validated::<policy::AuthorizationPolicy>::try_from(&set.authorization_policies[0])
            {
                Ok(v) => (Vec::new(), v.warnings),
                Err(i) => (i.errors, i.warnings),
            }
        }
        "WorkloadEntry" => {
            match Validated::<policy::Endpoint>::try_from(&set.workload_entries[0]) {
                Ok(v) => (Vec::new(), v.warnings),
                Err(i) => (i.errors, i.warnings),
            }
        }
        "ServiceEntry" => {
            match Validated::<policy::ServiceEntry>::try_from(&set.service_entries[0]) {
                Ok(v) => (Vec::new(), v.warnings),
                Err(i) => (i.errors, i.warnings),
            }
        }
        "HTTPRoute" => split(Validated::<policy::MeshRoute>::try_from(
            &set.http_routes[0],
        )),
        "GRPCRoute" => split(Validated::<policy::MeshRoute>::try_from(
            &set.grpc_routes[0],
        )),
        "TCPRoute" => split(Validated::<policy::MeshRoute>::try_from(&set.tcp_routes[0])),
        "ReferenceGrant" => split(Validated::<policy::ReferenceGrant>::try_from(
            &set.reference_grants[0],
        )),
        "Telemetry" => split(Validated::<policy::Telemetry>::try_from(
            &set.telemetries[0],
        )),
        _ => match Validated::<policy::VirtualService>::try_from(&set.virtual_services[0]) {
            Ok(v) => (Vec::new(), v.warnings),
            Err(i) => (i.errors, i.warnings),
        },
    };
    let fmt = |ps: Vec<Problem>| {
        ps.into_iter()
            .map(|p| {
                assert!(p.location.line > 0, "{spec}: unlocated {p}");
                format!("{}: {}", p.field, p.message)
            })
            .collect::<Vec<_>>()
    };
    (fmt(errors), fmt(warnings))
}

fn run(kind: &str, cases: &[(&str, &str, Expect)]) {
    let mut failures = Vec::new();
    for (name, spec, expect) in cases {
        let (errors, warnings) = check(kind, spec);
        let ok = match expect {
            Valid => errors.is_empty(),
            Clean => errors.is_empty() && warnings.is_empty(),
            Error(text) => errors.iter().any(|e| e.contains(text)),
            Warn(text) => errors.is_empty() && warnings.iter().any(|w| w.contains(text)),
        };
        if !ok {
            failures.push(format!(
                "{name}: expected {expect:?}\n  errors: {errors:?}\n  warnings: {warnings:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn destination_rule_rules() {
    run(
        "DestinationRule",
        &[
            ("minimal rule", "host: reviews", Valid),
            (
                "host required",
                "host: ''",
                Error("spec.host: host is required"),
            ),
            (
                "host not an IP",
                "host: 10.0.0.1",
                Error("spec.host: \"10.0.0.1\" is an IP address"),
            ),
            (
                "host labels",
                "host: a..b",
                Error("spec.host: \"a..b\" is not a valid host"),
            ),
            ("wildcard host", "host: '*.foo.com'", Valid),
            ("mesh-wide host", "host: '*'", Valid),
            (
                "wildcard only first",
                "host: 'a.*.com'",
                Error("is not a valid host"),
            ),
            (
                "empty trafficPolicy",
                "host: a\ntrafficPolicy: {}",
                Error("spec.trafficPolicy: trafficPolicy must set at least one field"),
            ),
            (
                "empty subset policy",
                "host: a\nsubsets: [{name: v1, trafficPolicy: {}}]",
                Error("spec.subsets[0].trafficPolicy: trafficPolicy must set"),
            ),
            (
                "pool needs tcp or http",
                "host: a\ntrafficPolicy: {connectionPool: {}}",
                Error("connectionPool: connectionPool must set tcp or http"),
            ),
            (
                "negative maxConnections",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: -1}}}",
                Error("connectionPool.tcp.maxConnections: -1 must not be negative"),
            ),
            (
                "negative pending",
                "host: a\ntrafficPolicy: {connectionPool: {http: {http1MaxPendingRequests: -5}}}",
                Error("http.http1MaxPendingRequests: -5 must not be negative"),
            ),
            (
                "int32 overflow",
                "host: a\ntrafficPolicy: {connectionPool: {http: {http2MaxRequests: 4294967296}}}",
                Error("is larger than"),
            ),
            (
                "unparseable duration",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 10 seconds}}}",
                Error("tcp.connectTimeout: \"10 seconds\" is not a duration"),
            ),
            (
                "negative duration",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: -1s}}}",
                Error("connectTimeout: duration \"-1s\" must not be negative"),
            ),
            (
                "sub-millisecond duration",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 500us}}}",
                Error("must be at least 1ms"),
            ),
            (
                "millisecond precision",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 1.0005s}}}",
                Error("more than millisecond precision"),
            ),
            (
                "durations in every unit",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 100ms, maxConnectionDuration: 1.5s, idleTimeout: 1h30m}, http: {idleTimeout: 1m}}}",
                Valid,
            ),
            (
                "tcp idleTimeout 0s disables",
                "host: a\ntrafficPolicy: {connectionPool: {tcp: {idleTimeout: 0s}}}",
                Valid,
            ),
            (
                "http idleTimeout 0s rejected",
                "host: a\ntrafficPolicy: {connectionPool: {http: {idleTimeout: 0s}}}",
                Error("http.idleTimeout: duration \"0s\" must be at least 1ms"),
            ),
            (
                "useClientProtocol with UPGRADE",
                "host: a\ntrafficPolicy: {connectionPool: {http: {useClientProtocol: true, h2UpgradePolicy: UPGRADE}}}",
                Error("useClientProtocol cannot be combined"),
            ),
            (
                "http2KeepAlive needs both",
                "host: a\ntrafficPolicy: {connectionPool: {http: {http2KeepAlive: {interval: 10s}}}}",
                Error("http2KeepAlive: http2KeepAlive needs both interval and timeout"),
            ),
            (
                "duplicate subsets",
                "host: a\nsubsets: [{name: v1}, {name: v1}]",
                Error("spec.subsets[1].name: duplicate subset name \"v1\""),
            ),
            (
                "subset name DNS label",
                "host: a\nsubsets: [{name: V1}]",
                Error("spec.subsets[0].name: subset name \"V1\" is not a DNS-1123 label"),
            ),
            (
                "subset name required",
                "host: a\nsubsets: [{labels: {a: b}}]",
                Error("spec.subsets[0].name: subset name is required"),
            ),
            (
                "null subset",
                "host: a\nsubsets: [~]",
                Error("spec.subsets[0]: subset must not be null"),
            ),
            (
                "subset label key",
                "host: a\nsubsets: [{name: v1, labels: {'bad key': x}}]",
                Error("is not a valid label key"),
            ),
            (
                "subset label value",
                "host: a\nsubsets: [{name: v1, labels: {k: 'bad value'}}]",
                Error("is not a valid label value"),
            ),
            (
                "maglev needs tableSize",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {}}}}",
                Error("maglev.tableSize: maglev.tableSize is required"),
            ),
            (
                "maglev prime",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65536}}}}",
                Error("tableSize 65536 must be a prime number"),
            ),
            (
                "maglev bound",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 5000011}}}}",
                Error("must be a prime number below 5000011"),
            ),
            (
                "maglev 65537",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}}",
                Valid,
            ),
            (
                "ringHash empty",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {}}}}",
                Valid,
            ),
            (
                "minimumRingSize with ringHash",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 10, ringHash: {}}}}",
                Error("cannot be combined with ringHash or maglev"),
            ),
            (
                "minimumRingSize deprecated",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, minimumRingSize: 2048}}}",
                Warn("minimumRingSize is deprecated"),
            ),
            (
                "hash with no key",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {ringHash: {}}}}",
                Error(
                    "consistentHash needs exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName (found 0)",
                ),
            ),
            (
                "hash with two keys",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}",
                Error("(found 2)"),
            ),
            (
                "cookie name required",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {ttl: 10s}}}}",
                Error("httpCookie.name: cookie name is required"),
            ),
            (
                "cookie attributes unique",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, attributes: [{name: Secure}, {name: secure}]}}}}",
                Error("attributes[1].name: duplicate cookie attribute"),
            ),
            (
                "cookie attribute name",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, attributes: [{value: x}]}}}}",
                Error("attributes[0].name: cookie attribute name is required"),
            ),
            (
                "cookie ttl 0s",
                "host: a\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, ttl: 0s}}}}",
                Valid,
            ),
            (
                "simple and hash",
                "host: a\ntrafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}",
                Error("simple and consistentHash are mutually exclusive"),
            ),
            (
                "LEAST_CONN accepted",
                "host: a\ntrafficPolicy: {loadBalancer: {simple: LEAST_CONN}}",
                Valid,
            ),
            (
                "locality and zone aware",
                "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}, zoneAwareLbSetting: {enabled: true}}}",
                Error("localityLbSetting and zoneAwareLbSetting are mutually exclusive"),
            ),
            (
                "distribute and failover",
                "host: a\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 100}}], failover: [{from: r1, to: r2}]}}}",
                Error("distribute and failover are mutually exclusive"),
            ),
            (
                "distribute sum",
                "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 80, r2/*: 10}}]}}}",
                Error("distribute[0].to: weights must add up to 100, not 90"),
            ),
            (
                "distribute weight range",
                "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 100, r2/*: 0}}]}}}",
                Error("weight 0 must be between 1 and 100"),
            ),
            (
                "distribute wildcard",
                "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: r1/*/a, to: {r1/*: 100}}]}}}",
                Error("a wildcard is allowed only once, as the last segment"),
            ),
            (
                "failover same region",
                "host: a\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r1}]}}}",
                Error("failover from and to are the same region"),
            ),
            (
                "failover regions only",
                "host: a\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {failover: [{from: r1/z1, to: r2}]}}}",
                Error("failover[0].from: failover takes regions only"),
            ),
            (
                "failoverPriority locality labels with failover",
                "host: a\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r2}], failoverPriority: [topology.kubernetes.io/zone]}}}",
                Error("failoverPriority[0]: topology.kubernetes.io/zone cannot be used"),
            ),
            (
                "failover without outlier detection",
                "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r2}]}}}",
                Warn("locality failover needs outlierDetection (as in Istio)"),
            ),
            (
                "warmup needs duration",
                "host: a\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmup: {minimumPercent: 20}}}",
                Error("warmup.duration: warmup.duration is required"),
            ),
            (
                "warmup percent",
                "host: a\ntrafficPolicy: {loadBalancer: {warmup: {duration: 10s, minimumPercent: 150}}}",
                Error("minimumPercent 150 must be between 0 and 100"),
            ),
            (
                "warmup aggression",
                "host: a\ntrafficPolicy: {loadBalancer: {warmup: {duration: 10s, aggression: 0}}}",
                Error("aggression 0 must be greater than 0"),
            ),
            (
                "warmup twice",
                "host: a\ntrafficPolicy: {loadBalancer: {warmup: {duration: 10s}, warmupDurationSecs: 10s}}",
                Error("warmup and warmupDurationSecs are mutually exclusive"),
            ),
            (
                "locality and warmup are enforced",
                "host: a\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 10s}, localityLbSetting: {enabled: true, failover: [{from: r1, to: r2}], failoverPriority: [tier]}}}",
                Clean,
            ),
            (
                "distribute is enforced",
                "host: a\ntrafficPolicy: {loadBalancer: {warmupDurationSecs: 10s, localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 80, r2/*: 20}}]}}}",
                Clean,
            ),
            (
                "network key in failoverPriority is warned about",
                "host: a\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {failoverPriority: [topology.istio.io/network, topology.kubernetes.io/zone]}}}",
                Warn("failoverPriority[0]: topology.istio.io/network is compared as a plain label"),
            ),
            (
                "tunnel CONNECT is enforced, POST is warned about",
                "host: a\ntrafficPolicy: {tunnel: {protocol: POST, targetHost: x.com, targetPort: 443}}",
                Warn("tunnel.protocol: tunnel protocol POST is not enforced by drover"),
            ),
            (
                "proxy protocol is enforced",
                "host: a\ntrafficPolicy: {proxyProtocol: {version: V2}}",
                Clean,
            ),
            (
                "warmup ignored for RANDOM",
                "host: a\ntrafficPolicy: {loadBalancer: {simple: RANDOM, warmupDurationSecs: 10s}}",
                Warn("warmup only applies to ROUND_ROBIN and LEAST_REQUEST"),
            ),
            (
                "local origin needs split",
                "host: a\ntrafficPolicy: {outlierDetection: {consecutiveLocalOriginFailures: 2}}",
                Error(
                    "consecutiveLocalOriginFailures requires splitExternalLocalOriginErrors: true",
                ),
            ),
            (
                "local origin with split",
                "host: a\ntrafficPolicy: {outlierDetection: {splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2}}",
                Valid,
            ),
            (
                "max ejection percent",
                "host: a\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 150}}",
                Error("maxEjectionPercent: percentage 150 must be between 0 and 100"),
            ),
            (
                "min health percent",
                "host: a\ntrafficPolicy: {outlierDetection: {minHealthPercent: -1}}",
                Error("minHealthPercent: percentage -1 must be between 0 and 100"),
            ),
            (
                "outlier interval",
                "host: a\ntrafficPolicy: {outlierDetection: {interval: 0s}}",
                Error("interval: duration \"0s\" must be at least 1ms"),
            ),
            (
                "consecutiveErrors deprecated",
                "host: a\ntrafficPolicy: {outlierDetection: {consecutiveErrors: 5}}",
                Warn("consecutiveErrors is deprecated and ignored"),
            ),
            (
                "error codes range",
                "host: a\ntrafficPolicy: {outlierDetection: {outlierDetectionHttpErrorCodes: [503, 600]}}",
                Error("outlierDetectionHttpErrorCodes[1]: 600 is not an HTTP status code"),
            ),
            (
                "MUTUAL needs cert and key",
                "host: a\ntrafficPolicy: {tls: {mode: MUTUAL}}",
                Error("tls.clientCertificate: MUTUAL requires clientCertificate"),
            ),
            (
                "MUTUAL needs key",
                "host: a\ntrafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem}}",
                Error("tls.privateKey: MUTUAL requires privateKey"),
            ),
            (
                "MUTUAL with files",
                "host: a\ntrafficPolicy: {tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}}",
                Valid,
            ),
            (
                "MUTUAL with credentialName",
                "host: a\ntrafficPolicy: {tls: {mode: MUTUAL, credentialName: client-cred}}",
                Valid,
            ),
            (
                "credentialName excludes files",
                "host: a\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: c, caCertificates: /ca.pem}}",
                Error(
                    "tls.caCertificates: caCertificates must be empty when credentialName is set",
                ),
            ),
            (
                "configmap credential namespace",
                "host: a\ntrafficPolicy: {tls: {mode: SIMPLE, credentialName: 'configmap://other/ca'}}",
                Error("configmap credentials must be in the rule's namespace"),
            ),
            (
                "insecureSkipVerify with CA",
                "host: a\ntrafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true, caCertificates: /ca.pem}}",
                Error("caCertificates cannot be set together with insecureSkipVerify"),
            ),
            (
                "insecureSkipVerify with SANs",
                "host: a\ntrafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true, subjectAltNames: [a]}}",
                Error("subjectAltNames cannot be set together with insecureSkipVerify"),
            ),
            (
                "tunnel protocol",
                "host: a\ntrafficPolicy: {tunnel: {protocol: GET, targetHost: x.com, targetPort: 443}}",
                Error("tunnel.protocol: tunnel protocol must be CONNECT or POST"),
            ),
            (
                "tunnel target host",
                "host: a\ntrafficPolicy: {tunnel: {targetPort: 443}}",
                Error("tunnel.targetHost: targetHost is required"),
            ),
            (
                "tunnel target port",
                "host: a\ntrafficPolicy: {tunnel: {targetHost: 10.0.0.1, targetPort: 0}}",
                Error("tunnel.targetPort: port 0 is out of range"),
            ),
            (
                "tunnel and proxy protocol",
                "host: a\ntrafficPolicy: {tunnel: {targetHost: x.com, targetPort: 443}, proxyProtocol: {version: V2}}",
                Error("proxyProtocol and tunnel are mutually exclusive"),
            ),
            (
                "proxy protocol",
                "host: a\ntrafficPolicy: {proxyProtocol: {}}",
                Valid,
            ),
            (
                "retry budget percent",
                "host: a\ntrafficPolicy: {retryBudget: {percent: 120}}",
                Error("retryBudget.percent: percent 120 must be between 0 and 100"),
            ),
            (
                "exportTo tilde",
                "host: a\nexportTo: ['~']",
                Error("spec.exportTo[0]: \"~\" is not allowed here"),
            ),
            (
                "exportTo duplicate",
                "host: a\nexportTo: [., ns1]",
                Error("spec.exportTo[1]: namespace \"ns1\" is listed twice"),
            ),
            (
                "exportTo star mixed",
                "host: a\nexportTo: ['*', b]",
                Error("\"*\" cannot be combined"),
            ),
            (
                "exportTo invalid",
                "host: a\nexportTo: [Bad_NS]",
                Error("\"Bad_NS\" is not a valid namespace name"),
            ),
            (
                "selector rule exported",
                "host: a\nworkloadSelector: {matchLabels: {app: x}}\nexportTo: ['*']",
                Error(
                    "spec.exportTo: a rule with workloadSelector can only be exported to its own namespace",
                ),
            ),
            (
                "selector rule private",
                "host: a\nworkloadSelector: {matchLabels: {app: x}}\nexportTo: [.]",
                Valid,
            ),
            (
                "selector wildcard",
                "host: a\nworkloadSelector: {matchLabels: {app: '*'}}",
                Error("empty keys and wildcards are not allowed"),
            ),
            (
                "selector empty",
                "host: a\nworkloadSelector: {matchLabels: {}}",
                Warn("empty matchLabels selects every workload"),
            ),
            (
                "port-level needs port",
                "host: a\ntrafficPolicy: {portLevelSettings: [{loadBalancer: {simple: RANDOM}}]}",
                Error("portLevelSettings[0].port: port.number is required"),
            ),
            (
                "port-level needs a block",
                "host: a\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}}]}",
                Error("port traffic policy must set loadBalancer"),
            ),
            (
                "port-level range",
                "host: a\ntrafficPolicy: {portLevelSettings: [{port: {number: 70000}, tls: {mode: DISABLE}}]}",
                Error("port.number: port 70000 is out of range"),
            ),
            (
                "port-level duplicate",
                "host: a\ntrafficPolicy: {portLevelSettings: [{port: {number: 80}, tls: {}}, {port: {number: 80}, tls: {}}]}",
                Error("portLevelSettings[1].port.number: port 80 already has portLevelSettings"),
            ),
        ],
    );
}

#[test]
fn virtual_service_rules() {
    run(
        "VirtualService",
        &[
            (
                "minimal",
                "hosts: [reviews]\nhttp: [{route: [{destination: {host: reviews}}]}]",
                Valid,
            ),
            (
                "hosts required",
                "http: [{route: [{destination: {host: a}}]}]",
                Error("spec.hosts: at least one host is required"),
            ),
            (
                "star host for mesh",
                "hosts: ['*']\nhttp: [{route: [{destination: {host: a}}]}]",
                Error("spec.hosts[0]: host \"*\" is not allowed"),
            ),
            (
                "empty host",
                "hosts: ['']\nhttp: [{route: [{destination: {host: a}}]}]",
                Error("spec.hosts[0]: host must not be empty"),
            ),
            (
                "routes required",
                "hosts: [a]",
                Error("needs at least one http, tcp or tls route"),
            ),
            (
                "route action required",
                "hosts: [a]\nhttp: [{name: x}]",
                Error("spec.http[0]: an HTTP route needs route"),
            ),
            (
                "destination host",
                "hosts: [a]\nhttp: [{route: [{destination: {subset: v1}}]}]",
                Error("route[0].destination.host: destination host is required"),
            ),
            (
                "destination required",
                "hosts: [a]\nhttp: [{route: [{weight: 100}]}]",
                Error("route[0].destination: destination is required"),
            ),
            (
                "negative weight",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}, weight: -1}, {destination: {host: b}, weight: 10}]}]",
                Error("route[0].weight: weight -1 must not be negative"),
            ),
            (
                "weights all zero",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}, weight: 0}, {destination: {host: b}, weight: 0}]}]",
                Error("spec.http[0].route: weights of a multi-destination route must not all be 0"),
            ),
            (
                "relative weights",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a, subset: v1}, weight: 30}, {destination: {host: a, subset: v2}, weight: 10}]}]",
                Valid,
            ),
            (
                "subset DNS label",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a, subset: V1}}]}]",
                Error("destination.subset: subset name \"V1\" is not a DNS-1123 label"),
            ),
            (
                "destination port",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a, port: {number: 0}}}]}]",
                Error("destination.port.number: port 0 is out of range"),
            ),
            (
                "empty header prefix",
                "hosts: [a]\nhttp: [{match: [{headers: {x-user: {prefix: ''}}}], route: [{destination: {host: a}}]}]",
                Error("headers.x-user.prefix: prefix must not be empty"),
            ),
            (
                "empty uri prefix allowed",
                "hosts: [a]\nhttp: [{match: [{uri: {prefix: ''}}], route: [{destination: {host: a}}]}]",
                Valid,
            ),
            (
                "string match needs one",
                "hosts: [a]\nhttp: [{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: a}}]}]",
                Error("match[0].uri: exactly one of exact, prefix or regex is required"),
            ),
            (
                "bad regex",
                "hosts: [a]\nhttp: [{match: [{uri: {regex: '(unclosed'}}], route: [{destination: {host: a}}]}]",
                Error("uri.regex: invalid regex"),
            ),
            (
                "header name",
                "hosts: [a]\nhttp: [{match: [{headers: {'bad header': {exact: x}}}], route: [{destination: {host: a}}]}]",
                Error("is not a valid header name"),
            ),
            (
                "header presence",
                "hosts: [a]\nhttp: [{match: [{headers: {x-user: {}}}], route: [{destination: {host: a}}]}]",
                Valid,
            ),
            (
                "match port",
                "hosts: [a]\nhttp: [{match: [{port: 0}], route: [{destination: {host: a}}]}]",
                Error("match[0].port: port 0 is out of range"),
            ),
            (
                "unreachable after catch-all",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}]}, {match: [{uri: {prefix: /x}}], route: [{destination: {host: a}}]}]",
                Warn("spec.http[1]: unreachable: route http[0] before it matches every request"),
            ),
            (
                "mirror percentage",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], mirrorPercentage: {value: 150}}]",
                Error("mirrorPercentage.value: percentage 150 must be between 0 and 100"),
            ),
            (
                "fault, rewrite and headers are enforced",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}, headers: {response: {add: {x-d: '1'}}}}], fault: {abort: {httpStatus: 500, percentage: {value: 10}}, delay: {fixedDelay: 1s, percentage: {value: 5}}}, rewrite: {uri: /v2, authority: b}, headers: {request: {set: {x-a: b}, remove: [x-b]}}}]",
                Clean,
            ),
            (
                "mirror is enforced",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], mirror: {host: b}, mirrorPercentage: {value: 5}}]",
                Clean,
            ),
            (
                "mirror and mirrors",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], mirror: {host: b}, mirrors: [{destination: {host: c}}]}]",
                Error("spec.http[0]: mirror and mirrors are mutually exclusive"),
            ),
            (
                "mirror percent range",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], mirror: {host: b}, mirrorPercent: 150}]",
                Error("spec.http[0].mirrorPercent: percentage 150 must be between 0 and 100"),
            ),
            (
                "mirrors need a destination",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], mirrors: [{percentage: {value: 5}}]}]",
                Error("spec.http[0].mirrors[0].destination: destination is required"),
            ),
            (
                "cors is enforced",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], corsPolicy: {allowOrigins: [{exact: 'https://a'}], allowMethods: [GET], maxAge: 10s, unmatchedPreflights: IGNORE}}]",
                Clean,
            ),
            (
                "cors allowOrigin is deprecated and matched exactly",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], corsPolicy: {allowOrigin: ['https://a']}}]",
                Warn("corsPolicy.allowOrigin: allowOrigin is deprecated"),
            ),
            (
                "cors method",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], corsPolicy: {allowMethods: ['GE T']}}]",
                Error("corsPolicy.allowMethods[0]: \"GE T\" is not an HTTP method"),
            ),
            (
                "cors max age precision",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], corsPolicy: {maxAge: 1500ms}}]",
                Error("corsPolicy.maxAge: maxAge is accurate only to seconds"),
            ),
            (
                "cors unmatched preflights",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], corsPolicy: {unmatchedPreflights: DROP}}]",
                Error("corsPolicy.unmatchedPreflights: \"DROP\" is not FORWARD or IGNORE"),
            ),
            (
                "fault abort status",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 700}}}]",
                Error("fault.abort.httpStatus: httpStatus 700 must be between 200 and 599"),
            ),
            (
                "fault grpc status name",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {abort: {grpcStatus: SLEEPY}}}]",
                Error("fault.abort.grpcStatus: \"SLEEPY\" is not a gRPC status name"),
            ),
            (
                "fault delay needs fixedDelay",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {delay: {percentage: {value: 5}}}}]",
                Error("fault.delay.fixedDelay: fixedDelay is required"),
            ),
            (
                "exponentialDelay is refused as Istio does",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {delay: {exponentialDelay: 1s}}}]",
                Error("fault.delay.exponentialDelay: exponentialDelay is not supported"),
            ),
            (
                "fault percentage range",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 503, percentage: {value: 101}}}}]",
                Error("fault.abort.percentage.value: percentage 101 must be between 0 and 100"),
            ),
            (
                "redirect code",
                "hosts: [a]\nhttp: [{redirect: {uri: /x, redirectCode: 200}}]",
                Error("redirect.redirectCode: 200 is not a valid redirect code, must be 3xx"),
            ),
            (
                "redirect needs a target",
                "hosts: [a]\nhttp: [{redirect: {redirectCode: 302}}]",
                Error(
                    "spec.http[0].redirect: redirect must specify uri, authority, scheme or port",
                ),
            ),
            (
                "redirect port twice",
                "hosts: [a]\nhttp: [{redirect: {port: 8080, derivePort: FROM_REQUEST_PORT}}]",
                Error("port and derivePort are mutually exclusive"),
            ),
            (
                "redirect and rewrite",
                "hosts: [a]\nhttp: [{redirect: {uri: /x}, rewrite: {uri: /y}}]",
                Error(
                    "spec.http[0].rewrite: rewrite cannot be combined with redirect or directResponse",
                ),
            ),
            (
                "direct response status",
                "hosts: [a]\nhttp: [{directResponse: {status: 99}}]",
                Error("directResponse.status: status 99 must be between 200 and 599"),
            ),
            (
                "direct response body",
                "hosts: [a]\nhttp: [{directResponse: {status: 200, body: {string: a, bytes: YQ==}}}]",
                Error("directResponse.body: string and bytes are mutually exclusive"),
            ),
            (
                "direct response bytes are base64",
                "hosts: [a]\nhttp: [{directResponse: {status: 200, body: {bytes: '!!'}}}]",
                Error("directResponse.body.bytes: not base64"),
            ),
            (
                "rewrite needs something",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], rewrite: {}}]",
                Error("rewrite must specify uri, uriRegexRewrite or authority"),
            ),
            (
                "rewrite uri twice",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}}]",
                Error("uri and uriRegexRewrite are mutually exclusive"),
            ),
            (
                "rewrite regex",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], rewrite: {uriRegexRewrite: {match: '(', rewrite: b}}}]",
                Error("rewrite.uriRegexRewrite.match: invalid regex"),
            ),
            (
                "host and pseudo-headers cannot be modified",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], headers: {request: {set: {Host: b}, remove: [':path']}}}]",
                Error("headers.request.set.Host: \"Host\" cannot be modified with headers"),
            ),
            (
                "header value",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], headers: {response: {add: {x-a: \"a\\nb\"}}}}]",
                Error("headers.response.add.x-a: \"a\\nb\" is not a valid header value"),
            ),
            (
                "route timeout",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], timeout: soon}]",
                Error("spec.http[0].timeout: \"soon\" is not a duration"),
            ),
            (
                "retries attempts",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], retries: {attempts: -1}}]",
                Error("retries.attempts: -1 must not be negative"),
            ),
            (
                "retryOn token",
                "hosts: [a]\nhttp: [{route: [{destination: {host: a}}], retries: {attempts: 2, retryOn: \"5xx,sometimes\"}}]",
                Error(
                    "spec.http[0].retries.retryOn: \"sometimes\" is not a retry condition or a status code",
                ),
            ),
            (
                "tls routes are enforced",
                "hosts: [a]\ntls: [{match: [{sniHosts: [a, '*.a.b']}], route: [{destination: {host: a}}]}]",
                Clean,
            ),
            (
                "tls route needs sni",
                "hosts: [a]\ntls: [{match: [{port: 443}], route: [{destination: {host: a}}]}]",
                Error("match[0].sniHosts: sniHosts is required for TLS routes"),
            ),
            (
                "tcp subnets",
                "hosts: [a]\ntcp: [{match: [{destinationSubnets: [10.0.0.0/33]}], route: [{destination: {host: a}}]}]",
                Error("destinationSubnets[0]: \"10.0.0.0/33\" is not an IP address or CIDR"),
            ),
            (
                "tcp route destination",
                "hosts: [a]\ntcp: [{route: []}]",
                Error("spec.tcp[0].route: at least one route destination is required"),
            ),
        ],
    );
}

#[test]
fn durations_follow_go_syntax() {
    let ms = |s: &str| parse_duration(s).map(|d| d.as_millis());
    assert_eq!(ms("100ms"), Ok(100));
    assert_eq!(ms("1.5s"), Ok(1500));
    assert_eq!(ms("10s"), Ok(10_000));
    assert_eq!(ms("1m"), Ok(60_000));
    assert_eq!(ms("1h"), Ok(3_600_000));
    assert_eq!(ms("1h30m"), Ok(5_400_000));
    assert_eq!(ms("0"), Ok(0));
    for bad in ["", "10", "s", "1x", "1.2.3s", "-5s", "ms10", "1e3s"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn defaults_are_applied_inside_present_blocks() {
    let set = load(
        "DestinationRule",
        "host: reviews\ntrafficPolicy:\n  connectionPool: {tcp: {maxConnections: 0}}\n  outlierDetection: {maxEjectionPercent: 0}\n  loadBalancer: {simple: LEAST_CONN}",
    );
    let v = Validated::<policy::DestinationRule>::try_from(&set.destination_rules[0]).unwrap();
    let dr = v.value;
    assert_eq!(dr.host, "reviews.ns1.svc.cluster.local");
    let b = &dr.traffic_policy.unwrap().blocks;
    let pool = b.connection_pool.as_ref().unwrap();
    // 0 means unset: Istio's "unlimited".
    assert_eq!(pool.max_connections, policy::UNLIMITED);
    assert_eq!(pool.connect_timeout, Duration::from_secs(10));
    let od = b.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (
            od.consecutive_5xx,
            od.consecutive_gateway,
            od.max_ejection_percent
        ),
        (5, 0, 10)
    );
    assert_eq!(od.interval, Duration::from_secs(10));
    assert_eq!(od.base_ejection_time, Duration::from_secs(30));
    assert_eq!(od.max_ejection_time(), Duration::from_secs(300));
    assert_eq!(
        b.load_balancer.as_ref().unwrap().algorithm,
        policy::Algorithm::LeastRequest
    );
    assert!(b.tls.is_none(), "absent blocks stay absent");
}

#[test]
fn hosts_are_qualified_with_the_resource_namespace() {
    assert_eq!(qualify("reviews", "demo"), "reviews.demo.svc.cluster.local");
    // Names with a dot are never expanded.
    assert_eq!(qualify("reviews.prod", "demo"), "reviews.prod");
    assert_eq!(qualify("*.foo.com", "demo"), "*.foo.com");
    assert_eq!(qualify("*", "demo"), "*");
}

#[test]
fn single_destination_takes_everything_and_zero_weights_drop() {
    let set = load(
        "VirtualService",
        "hosts: [a]\nhttp:\n- route: [{destination: {host: a}, weight: 0}]\n- route: [{destination: {host: a, subset: v1}, weight: 0}, {destination: {host: a, subset: v2}, weight: 5}]",
    );
    let vs = Validated::<policy::VirtualService>::try_from(&set.virtual_services[0])
        .unwrap()
        .value;
    assert_eq!(vs.http[0].destinations[0].weight, 1);
    let subsets: Vec<_> = vs.http[1]
        .destinations
        .iter()
        .map(|d| d.subset.as_deref())
        .collect();
    assert_eq!(subsets, [Some("v2")]);
}

#[test]
fn peer_authentication_rules() {
    run(
        "PeerAuthentication",
        &[
            ("namespace-wide", "mtls: {mode: STRICT}", Valid),
            ("empty spec", "{}", Valid),
            (
                "workload with ports",
                "selector: {matchLabels: {app: finance}}\nmtls: {mode: UNSET}\nportLevelMtls:\n  8080: {mode: DISABLE}",
                Valid,
            ),
            (
                "ports need a selector",
                "mtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: DISABLE}",
                Error("spec.portLevelMtls: portLevelMtls needs a workload selector"),
            ),
            (
                "port zero",
                "selector: {matchLabels: {app: a}}\nportLevelMtls:\n  0: {mode: DISABLE}",
                Error("spec.portLevelMtls.0: port \"0\" is not in 1..=65535"),
            ),
            (
                "port as a name",
                "selector: {matchLabels: {app: a}}\nportLevelMtls:\n  http: {mode: STRICT}",
                Error("spec.portLevelMtls.http: port \"http\" is not in"),
            ),
            (
                "bad label",
                "selector: {matchLabels: {'a b': x}}",
                Error("spec.selector.matchLabels.a b"),
            ),
        ],
    );
}

#[test]
fn authorization_policy_rules() {
    run(
        "AuthorizationPolicy",
        &[
            ("allow nothing", "{}", Clean),
            ("allow all", "rules: [{}]", Clean),
            (
                "every L4 and L7 form",
                "selector: {matchLabels: {app: web}}
action: ALLOW
rules:
- from:
  - source: {principals: [cluster.local/ns/a/sa/b, '*/sa/c'], notPrincipals: ['*'], namespaces: [a], notNamespaces: [b], ipBlocks: [198.18.0.0/16], notIpBlocks: [198.18.0.1], remoteIpBlocks: ['::1'], notRemoteIpBlocks: [fd00::/8]}
  - source: {serviceAccounts: [a/b], notServiceAccounts: [a/c]}
  to:
  - operation: {hosts: [web.a.svc], notHosts: ['*.evil'], ports: ['80', 81], notPorts: ['82'], methods: [GET], notMethods: [DELETE], paths: ['/api/*', '/v/{*}/x/{**}'], notPaths: [/admin]}
  when:
  - {key: 'request.headers[x-team]', values: [blue], notValues: [red]}
  - {key: source.ip, values: [198.18.0.0/16]}
  - {key: remote.ip, values: [198.18.0.1]}
  - {key: source.namespace, values: [a]}
  - {key: source.principal, values: ['*']}
  - {key: source.serviceAccount, values: [a/b]}
  - {key: destination.ip, values: [198.18.0.2]}
  - {key: destination.port, values: ['80']}
  - {key: connection.sni, values: ['*.svc']}",
                Clean,
            ),
            ("deny needs rules", "action: DENY", Error("spec.action: DENY action without `rules`")),
            ("custom", "action: CUSTOM\nprovider: {name: ext}\nrules: [{}]", Error("spec.action: CUSTOM needs an external authorizer")),
            ("provider without custom", "provider: {name: ext}\nrules: [{}]", Error("spec.provider: `provider` must not be with non CUSTOM")),
            ("unknown action", "action: LOG", Error("spec.action: unknown action")),
            ("selector and targetRefs", "selector: {matchLabels: {a: b}}\ntargetRefs: [{kind: Service, group: '', name: web}]", Error("only one of targetRefs or workloadSelector")),
            ("gateway target", "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]", Error("spec.targetRefs[0].kind: target gateway.networking.k8s.io/Gateway is not enforced")),
            ("cross-namespace target", "targetRefs: [{kind: Service, group: '', name: web, namespace: other}]", Error("spec.targetRefs[0].namespace: cross namespace")),
            ("wildcard selector", "selector: {matchLabels: {app: '*'}}", Error("wildcard is not supported in selector")),
            ("empty from", "rules: [{from: []}]", Error("spec.rules[0].from: `from` must not be empty")),
            ("empty source", "rules: [{from: [{source: {}}]}]", Error("spec.rules[0].from[0].source: `from.source` must not be empty")),
            ("null source", "rules: [{from: [{}]}]", Error("spec.rules[0].from[0]: `from.source` must not be null")),
            ("empty operation", "rules: [{to: [{operation: {}}]}]", Error("spec.rules[0].to[0].operation: `to.operation` must not be empty")),
            ("empty value", "rules: [{from: [{source: {principals: ['']}}]}]", Error("spec.rules[0].from[0].source.principals[0]: empty value")),
            ("bad ip block", "rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]", Error("spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not an IP address")),
            ("bad port", "rules: [{to: [{operation: {ports: ['0']}}]}]", Error("spec.rules[0].to[0].operation.ports[0]: port \"0\"")),
            ("bad template", "rules: [{to: [{operation: {paths: ['/{**}/x']}}]}]", Error("must be the last segment")),
            ("accounts with principals", "rules: [{from: [{source: {serviceAccounts: [a/b], principals: [x]}}]}]", Error("cannot set serviceAccounts with namespaces or principals")),
            ("bad account", "rules: [{from: [{source: {serviceAccounts: [ab]}}]}]", Error("is not a service account as namespace/name")),
            ("request principals need JWT", "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]", Error("spec.rules[0].from[0].source.requestPrincipals: needs RequestAuthentication")),
            ("jwt claims need JWT", "rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]", Error("spec.rules[0].when[0].key: request.auth.claims[iss]: needs RequestAuthentication")),
            ("unknown key", "rules: [{when: [{key: source.color, values: [x]}]}]", Error("unknown attribute \"source.color\"")),
            ("key without values", "rules: [{when: [{key: source.ip}]}]", Error("at least one of `values` or `notValues`")),
            ("destination labels", "rules: [{when: [{key: 'destination.labels[app]', values: [x]}]}]", Error("replaced by the workload selector")),
            ("bad when ip", "rules: [{when: [{key: destination.ip, values: [nope]}]}]", Error("spec.rules[0].when[0].values[0]")),
            ("http-only deny", "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]", Warn("denies all traffic to TCP ports")),
        ],
    );
}

#[test]
fn peer_authentication_reads_json_port_keys_and_warns_on_root_selectors() {
    let text = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: fin, namespace: istio-system}
spec:
  selector: {matchLabels: {app: finance}}
  portLevelMtls: {\"8080\": {mode: PERMISSIVE}}
";
    let set = ConfigSet::parse_ok("pa.yaml", text);
    let v = Validated::<policy::PeerAuthentication>::try_from(&set.peer_authentications[0])
        .expect("valid");
    assert_eq!(
        v.value.ports.get(&8080),
        Some(&Some(policy::MtlsMode::Permissive))
    );
    assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
    let w = v.warnings[0].to_string();
    assert!(w.contains("pa.yaml:5") && w.contains("is ignored"), "{w}");
}

#[test]
fn other_security_kinds_are_skipped_and_unknown_modes_rejected() {
    let mut set = ConfigSet::default();
    let mut problems = Vec::new();
    set.add_text(
        std::sync::Arc::new("s.yaml".into()),
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad, namespace: foo}
spec:
  mtls: {mode: STRICTEST}
",
        &mut problems,
    );
    assert_eq!(set.skipped.len(), 1);
    assert_eq!(set.skipped[0].1, "RequestAuthentication");
    assert_eq!(problems.len(), 1, "{problems:?}");
    let p = problems[0].to_string();
    assert!(p.contains("s.yaml:10") && p.contains("STRICTEST"), "{p}");
}

#[test]
fn telemetry_rules() {
    run(
        "Telemetry",
        &[
            (
                "everything Drover applies",
                "selector: {matchLabels: {app: cart}}\ntracing: [{randomSamplingPercentage: 25, disableSpanReporting: false, customTags: {a: {literal: {value: x}}, b: {environment: {name: HOME}}, c: {header: {name: x-c}}}}]\nmetrics: [{providers: [{name: prometheus}], reportingInterval: 1s, overrides: [{match: {metric: REQUEST_COUNT, mode: CLIENT}, disabled: false, tagOverrides: {response_flags: {operation: REMOVE}, host: {value: request.host}}}]}]\naccessLogging: [{providers: [{name: envoy}], disabled: false, filter: {expression: 'response.code >= 400'}}]",
                Clean,
            ),
            (
                "sampling above 100",
                "tracing: [{randomSamplingPercentage: 101}]",
                Error("spec.tracing[0].randomSamplingPercentage: 101 is not a percentage"),
            ),
            (
                "a tag with two sources",
                "tracing: [{customTags: {a: {literal: {value: x}, header: {name: y}}}}]",
                Error("spec.tracing[0].customTags.a: a custom tag needs exactly one"),
            ),
            (
                "unknown metric",
                "metrics: [{overrides: [{match: {metric: REQUESTS}}]}]",
                Error("spec.metrics[0].overrides[0].match.metric: unknown metric"),
            ),
            (
                "unknown mode",
                "metrics: [{overrides: [{match: {mode: BOTH}}]}]",
                Error("spec.metrics[0].overrides[0].match.mode: unknown mode"),
            ),
            (
                "unknown operation",
                "metrics: [{overrides: [{tagOverrides: {a: {operation: DROP}}}]}]",
                Error("spec.metrics[0].overrides[0].tagOverrides.a.operation: unknown operation"),
            ),
            (
                "upsert without a value",
                "metrics: [{overrides: [{tagOverrides: {a: {operation: UPSERT}}}]}]",
                Error("spec.metrics[0].overrides[0].tagOverrides.a.value: UPSERT needs a value"),
            ),
            (
                "a filter that is not CEL",
                "accessLogging: [{filter: {expression: 'response.code >='}}]",
                Error(
                    "spec.accessLogging[0].filter.expression: \"response.code >=\" is not a CEL expression",
                ),
            ),
            (
                "a filter reading what drover does not provide",
                "accessLogging: [{filter: {expression: 'response.duration > duration(\"1s\") || upstream.port == 80'}}]",
                Warn(
                    "spec.accessLogging[0].filter.expression: \"response.duration > duration(\\\"1s\\\") || upstream.port == 80\" reads [\"duration\", \"upstream\"], which drover does not provide",
                ),
            ),
            (
                "a tracing provider",
                "tracing: [{providers: [{name: zipkin}]}]",
                Warn("spec.tracing[0].providers[0].name: provider \"zipkin\""),
            ),
            (
                "another metrics provider",
                "metrics: [{providers: [{name: stackdriver}]}]",
                Warn("spec.metrics[0].providers[0].name"),
            ),
            (
                "another access-log provider",
                "accessLogging: [{providers: [{name: otel}]}]",
                Warn("spec.accessLogging[0].providers[0].name"),
            ),
            (
                "a reporting interval that is no duration",
                "metrics: [{reportingInterval: often}]",
                Error("spec.metrics[0].reportingInterval"),
            ),
            (
                "custom metric",
                "metrics: [{overrides: [{match: {customMetric: my_metric}}]}]",
                Warn("spec.metrics[0].overrides[0].match.customMetric"),
            ),
            (
                "server spans",
                "tracing: [{match: {mode: SERVER}}]",
                Warn("spec.tracing[0].match.mode: SERVER spans are not reported"),
            ),
            (
                "server access logs",
                "accessLogging: [{match: {mode: SERVER}}]",
                Warn("spec.accessLogging[0].match.mode"),
            ),
            (
                "request-id sampling",
                "tracing: [{useRequestIdForTraceSampling: true, enableIstioTags: true}]",
                Warn("spec.tracing[0].useRequestIdForTraceSampling"),
            ),
            (
                "target refs",
                "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]",
                Warn("spec.targetRefs: targetRefs is accepted but not enforced"),
            ),
        ],
    );
}
