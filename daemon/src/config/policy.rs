//! Validated policy: what a `DestinationRule`, `VirtualService`, `ServiceEntry`,
//! `WorkloadEntry`, `PeerAuthentication` or `AuthorizationPolicy` means once checked, with Istio's defaults applied inside every block that is
//! present. Built only by [`super::validate`].
//!
//! Invariant: a block is `None` exactly when the user did not write it. Presence is meaningful
//! (Istio merges subset and port-level policy block by block, and an absent `outlierDetection`
//! means no detector at all), so only values *inside* a block are defaulted.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use hyper::{
    StatusCode,
    header::{HeaderName, HeaderValue},
};

use super::crd::{Location, Resolution};

/// Istio's "no limit" for connection-pool thresholds (2³²−1).
pub const UNLIMITED: u32 = u32::MAX;

/// A validated `DestinationRule`.
#[derive(Clone, Debug, PartialEq)]
pub struct DestinationRule {
    /// Fully qualified host (short names expanded with the rule's namespace), or a wildcard.
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: ExportTo,
    /// `workloadSelector.matchLabels`; `None` when the rule applies to every client.
    pub workload_selector: Option<BTreeMap<String, String>>,
}

/// Inbound mTLS mode of a workload (`PeerAuthentication`'s mode, `UNSET` being `None` where it
/// appears).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MtlsMode {
    /// Only mesh mTLS clients.
    Strict,
    /// mTLS when the client speaks TLS, plaintext otherwise.
    Permissive,
    /// No termination: every connection passes through as it is.
    Disable,
}

impl std::fmt::Display for MtlsMode {
    /// As Istio spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        })
    }
}

/// A validated `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// `selector.matchLabels`; `None`: the whole namespace (the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    /// `mtls.mode`; `None` (`UNSET` or absent) inherits the parent scope's mode.
    pub mode: Option<MtlsMode>,
    /// `portLevelMtls`: workload port → mode (`None` inherits the policy's own mode).
    pub ports: BTreeMap<u16, Option<MtlsMode>>,
}

/// A validated `AuthorizationPolicy` (evaluated by [`crate::authz`]).
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationPolicy {
    /// `selector.matchLabels`; `None`: the whole namespace (every namespace, in the root one).
    pub selector: Option<BTreeMap<String, String>>,
    /// `targetRefs` to Services, as fully qualified hosts: the policy applies to their
    /// endpoints (instead of selecting by labels).
    pub targets: Vec<String>,
    pub action: AuthzAction,
    /// An ALLOW policy without rules matches nothing (it denies all).
    pub rules: Vec<AuthzRule>,
}

/// `AuthorizationPolicy.action` (CUSTOM is refused: no external authorizer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

impl std::fmt::Display for AuthzAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
        })
    }
}

/// One rule: some `from` group matches (none written: any), some `to` group matches, and every
/// `when` condition holds. Each group's matchers must all hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthzRule {
    pub from: Vec<Vec<AttrMatch>>,
    pub to: Vec<Vec<AttrMatch>>,
    pub when: Vec<AttrMatch>,
}

/// One field of a rule: the attribute matches one of `values` (`negated`: none of them).
#[derive(Clone, Debug, PartialEq)]
pub struct AttrMatch {
    pub attr: Attr,
    pub values: Vec<AuthzValue>,
    pub negated: bool,
    /// The field it was written as (`rules[0].from[0].source.principals`), for `explain`.
    pub field: String,
}

/// What a request or connection is matched on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attr {
    /// The peer's SPIFFE id without `spiffe://` (mTLS and HBONE peers only).
    Principal,
    /// The namespace in the peer's identity.
    Namespace,
    /// `namespace/serviceaccount` of the peer's identity.
    ServiceAccount,
    SourceIp,
    /// The original client (`forwarded`/`x-forwarded-for`), else the peer.
    RemoteIp,
    DestinationIp,
    DestinationPort,
    /// The server name the client's TLS handshake asked for.
    Sni,
    // HTTP only:
    Host,
    Method,
    Path,
    /// A request header (lowercase name).
    Header(String),
}

impl Attr {
    /// Whether the attribute exists only in HTTP requests.
    pub fn is_http(&self) -> bool {
        matches!(
            self,
            Attr::Host | Attr::Method | Attr::Path | Attr::Header(_)
        )
    }
}

/// A value of an [`AttrMatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthzValue {
    Exact(String),
    /// `abc*`.
    Prefix(String),
    /// `*abc`.
    Suffix(String),
    /// `*`: present and not empty.
    Present,
    /// An address or CIDR.
    Net(IpAddr, u8),
    Port(u16),
    /// A path template's segments (`{*}`: one segment, `{**}`: the rest).
    Template(Vec<Segment>),
}

/// A segment of a path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    One,
    Rest,
}

/// A validated `ServiceEntry`. One with a DNS resolution (not built yet) is kept as written
/// (hosts and resolution) with a warning, and is not captured.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEntry {
    pub hosts: Vec<String>,
    pub resolution: Resolution,
    pub location: Location,
    /// Exact VIPs (canonical form).
    pub vips: Vec<IpAddr>,
    /// CIDR `addresses`: (network address, prefix length), captured by longest prefix.
    pub cidrs: Vec<(IpAddr, u8)>,
    pub ports: Vec<Port>,
    /// Inline `endpoints`.
    pub endpoints: Vec<Endpoint>,
    /// `workloadSelector.labels`: WorkloadEntries in the entry's namespace that match.
    pub workload_selector: Option<BTreeMap<String, String>>,
}

/// A port of a `ServiceEntry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub number: u16,
    /// Upper-cased protocol as written, else the one the port's name implies (`http-web` →
    /// `HTTP`); `None` when neither says (sniffed, treated as opaque TCP).
    pub protocol: Option<String>,
    /// Port on the endpoint when the endpoint does not name one; defaults to `number`.
    pub target_port: u16,
}

/// One workload instance: a `WorkloadEntry`, or an endpoint inline in a `ServiceEntry`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `WorkloadEntry` name, or `<serviceentry>/endpoints[i]` for inline endpoints.
    pub name: String,
    pub address: IpAddr,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    /// Load-balancing weight (0 in the YAML becomes 1).
    pub weight: u32,
    pub locality: String,
    pub service_account: String,
    /// `Pod ns/name via EndpointSlice ns/name` for an endpoint from the Kubernetes API.
    pub origin: Option<String>,
    /// The workload telemetry names it by: its pod's (Deployment, …) or its WorkloadEntry's
    /// name; `None` for an endpoint inline in a ServiceEntry.
    pub workload: Option<String>,
}

/// Where a resource is visible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTo {
    /// `*` or nothing (mesh default).
    All,
    /// Listed namespaces (`.` already replaced by the resource's own namespace).
    Namespaces(Vec<String>),
}

/// A validated `trafficPolicy` (top level or subset level).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrafficPolicy {
    pub blocks: Blocks,
    /// `portLevelSettings`, in order; `(index in the YAML list, port, blocks)`.
    pub port_level: Vec<(usize, u16, Blocks)>,
    pub tunnel: Option<Tunnel>,
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    pub retry_budget: Option<RetryBudget>,
}

/// The four blocks that port-level settings can carry and that merge as units.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Blocks {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

/// A named subset.
#[derive(Clone, Debug, PartialEq)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
    /// Index in the rule's `subsets` list (for locating its fields).
    pub index: usize,
}

/// `loadBalancer`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadBalancer {
    pub algorithm: Algorithm,
    pub locality: Option<LocalityLb>,
    pub warmup: Option<Warmup>,
}

/// Endpoint selection algorithm.
#[derive(Clone, Debug, PartialEq)]
pub enum Algorithm {
    /// Istio's default since 1.14 (`UNSPECIFIED`, `LEAST_REQUEST` and the deprecated `LEAST_CONN`).
    LeastRequest,
    RoundRobin,
    Random,
    /// Connect to the original destination.
    Passthrough,
    ConsistentHash(ConsistentHash),
}

/// `consistentHash`.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub ring: HashRing,
}

/// Where the hash input comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum HashKey {
    Header(String),
    Cookie {
        name: String,
        path: Option<String>,
        /// `None`: no cookie is generated when absent.
        ttl: Option<Duration>,
        attributes: Vec<(String, Option<String>)>,
    },
    SourceIp,
    QueryParameter(String),
}

/// Hash table kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashRing {
    /// Defaults to 1024 entries, as Istio writes it.
    RingHash {
        minimum_ring_size: u64,
    },
    Maglev {
        table_size: u64,
    },
}

/// `localityLbSetting`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalityLb {
    pub enabled: Option<bool>,
    pub distribute: Vec<(String, BTreeMap<String, u32>)>,
    pub failover: Vec<(String, String)>,
    pub failover_priority: Vec<String>,
}

/// Slow start.
#[derive(Clone, Debug, PartialEq)]
pub struct Warmup {
    pub duration: Duration,
    /// Defaults to 10.
    pub minimum_percent: f64,
    /// Defaults to 1.0.
    pub aggression: f64,
}

/// `connectionPool`, with Istio's defaults for every unset field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionPool {
    /// Cluster-wide, per client; defaults to [`UNLIMITED`].
    pub max_connections: u32,
    /// Defaults to 10 s (mesh `connectTimeout`).
    pub connect_timeout: Duration,
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub max_connection_duration: Option<Duration>,
    /// TCP idle timeout; defaults to 1 h; zero disables.
    pub tcp_idle_timeout: Duration,
    /// Defaults to [`UNLIMITED`].
    pub http1_max_pending_requests: u32,
    /// Defaults to [`UNLIMITED`].
    pub http2_max_requests: u32,
    /// `None` = unlimited.
    pub max_requests_per_connection: Option<u32>,
    /// Concurrent retries across the cluster; defaults to [`UNLIMITED`].
    pub max_retries: u32,
    /// Upstream HTTP idle timeout; defaults to the TCP idle timeout (1 h).
    pub http_idle_timeout: Duration,
    pub h2_upgrade: H2Upgrade,
    pub use_client_protocol: bool,
    /// Defaults to 2³¹−1.
    pub max_concurrent_streams: u32,
    /// (interval, timeout).
    pub http2_keepalive: Option<(Duration, Duration)>,
}

/// `tcpKeepalive`; unset fields use the OS defaults.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
}

/// `h2UpgradePolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2Upgrade {
    /// Mesh default (`DO_NOT_UPGRADE`).
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// `outlierDetection` as Envoy runs it when the block is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Defaults to 5; 0 disables.
    pub consecutive_5xx: u32,
    /// Defaults to 0 (not enforced).
    pub consecutive_gateway: u32,
    pub split_local_origin: bool,
    /// Used only when split; defaults to 5.
    pub consecutive_local_origin: u32,
    /// Defaults to 10 s.
    pub interval: Duration,
    /// Defaults to 30 s.
    pub base_ejection_time: Duration,
    /// Defaults to 10 (%).
    pub max_ejection_percent: u32,
    /// Panic threshold; defaults to 0 (disabled).
    pub min_health_percent: u32,
    /// Empty: any 5xx is an error.
    pub http_error_codes: Vec<u16>,
}

/// `tls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub ca_crl: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: bool,
}

/// `tls.mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// `tunnel`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tunnel {
    /// `CONNECT` (default) or `POST`.
    pub protocol: String,
    pub target_host: String,
    pub target_port: u16,
}

/// `proxyProtocol.version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

/// `retryBudget`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudget {
    /// Defaults to 20.
    pub percent: f64,
    /// Defaults to 3.
    pub min_retry_concurrency: u32,
    pub budget_interval: Option<Duration>,
}

/// A validated `VirtualService` (the parts that apply to sidecars, i.e. gateway `mesh`).
#[derive(Clone, Debug, PartialEq)]
pub struct VirtualService {
    /// Qualified hosts.
    pub hosts: Vec<String>,
    /// False when `gateways` is set and does not list `mesh`: the rule is for gateways only.
    pub applies_to_mesh: bool,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<L4Route>,
    pub tls: Vec<L4Route>,
    pub export_to: ExportTo,
}

/// `http[]`.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpRoute {
    pub index: usize,
    pub name: Option<String>,
    /// Where a route that is not a VirtualService's `http[i]` came from (a Gateway API rule:
    /// `HTTPRoute ns/name rules[i]`), for logs and `explain`.
    pub label: Option<String>,
    /// ORed; empty = matches everything.
    pub matches: Vec<HttpMatch>,
    pub destinations: Vec<WeightedDestination>,
    /// `None`: no timeout (Istio's default).
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    /// `headers`: operations on the request (before it is forwarded) and the response.
    pub headers: HeaderRules,
    pub rewrite: Option<Rewrite>,
    /// `redirect` or `directResponse`: answered by the proxy, no destination.
    pub local: Option<LocalReply>,
    pub fault: Option<Fault>,
    pub cors: Option<Cors>,
    /// `mirror` (with `mirrorPercentage`) or `mirrors`: each destination with its percentage.
    pub mirrors: Vec<(WeightedDestination, f64)>,
}

/// `corsPolicy`, as Envoy's CORS filter applies it: header values prepared once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// `allowOrigins` (and the deprecated exact `allowOrigin`).
    pub origins: Vec<StringMatch>,
    pub methods: Option<HeaderValue>,
    pub headers: Option<HeaderValue>,
    pub expose: Option<HeaderValue>,
    /// Seconds.
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
    /// `unmatchedPreflights: FORWARD` (the default): a preflight from another origin goes to
    /// the endpoint; `IGNORE` answers it here without CORS headers.
    pub forward_unmatched: bool,
}

/// `headers`: the request's and the response's operations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

/// One direction's `set`, `add` and `remove` (names lower-cased, values valid).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// `rewrite`: at least one of the three; `uri` and `uri_regex` exclude each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub uri: Option<String>,
    /// `uri` replaces the whole path whatever the match (Gateway API `ReplaceFullPath`).
    pub full_path: bool,
    pub authority: Option<String>,
    pub uri_regex: Option<RegexRewrite>,
}

/// `rewrite.uriRegexRewrite`: every match of the expression in the path is replaced (Envoy's
/// `regex_rewrite`, unanchored); `\N` in the replacement is capture group N.
#[derive(Clone, Debug)]
pub struct RegexRewrite {
    source: String,
    rewrite: String,
    regex: regex::Regex,
    /// The replacement in the `regex` crate's syntax (`${N}`).
    with: String,
}

/// `redirect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub scheme: Option<String>,
    pub port: Option<RedirectPort>,
    /// `redirectCode`, 301 by default.
    pub code: StatusCode,
    /// `uri` replaces only the prefix the route matched (Gateway API `ReplacePrefixMatch`),
    /// not the whole path.
    pub replace_prefix: bool,
}

/// `redirect.port` / `redirect.derivePort`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    Fixed(u16),
    FromRequest,
    ProtocolDefault,
}

/// A reply the proxy makes itself for a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalReply {
    Redirect(Redirect),
    Direct { status: StatusCode, body: Vec<u8> },
}

/// `fault`: a delay and/or an abort, each for a percentage of requests.
#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(Abort, f64)>,
}

/// What an injected abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status code: HTTP 200 with `grpc-status` (trailers-only).
    Grpc(u16),
}

/// `http[].match[]`: all conditions ANDed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpMatch {
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Lower-cased names; `None` = header must be present.
    pub headers: BTreeMap<String, Option<StringMatch>>,
    pub without_headers: BTreeMap<String, Option<StringMatch>>,
    pub query_params: BTreeMap<String, Option<StringMatch>>,
    pub ignore_uri_case: bool,
    /// Config-time conditions: decide whether the route exists for a client at all.
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

/// `StringMatch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matched against the whole value.
    Regex(Pattern),
    /// A path prefix by whole segments (Gateway API `PathPrefix`, Envoy's
    /// `path_separated_prefix`): `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`.
    /// Stored without a trailing `/` (except `/` itself, which matches every path).
    PathPrefix(String),
}

/// A compiled, anchored regular expression; equal when the source text is.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    anchored: regex::Regex,
}

/// A weighted route destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightedDestination {
    /// Qualified host.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// Relative weight; a single destination gets everything.
    pub weight: u32,
    /// Index in the route's `route` list.
    pub index: usize,
    /// The destination's own `headers` (applied after the route's).
    pub headers: HeaderRules,
    /// Why a Gateway API backend cannot be used (unknown kind or Service, a cross-namespace
    /// reference without a ReferenceGrant): requests sent its way get 500, as the spec says.
    pub invalid: Option<String>,
}

/// `retries`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retries {
    /// Retries after the first try; 0 disables retries.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// Istio's default conditions when `retryOn` is unset.
    pub retry_on: RetryOn,
    /// `backoff`: the base interval of the jittered exponential backoff (Envoy: 25 ms), capped
    /// at ten times it.
    pub backoff: Option<Duration>,
    /// `retryIgnorePreviousHosts` (default true): a retry avoids the endpoints already tried.
    pub ignore_previous_hosts: bool,
}

/// `retryOn`: the conditions under which Envoy retries a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, a reset or a connect failure.
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, a reset or a connect failure.
    pub gateway_error: bool,
    /// `reset`: no response (disconnect, reset, per-try timeout), connect failure included.
    pub reset: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub conflict: bool,
    /// `refused-stream`: the HTTP/2 stream was refused (REFUSED_STREAM).
    pub refused_stream: bool,
    /// `retriable-status-codes` with the integers listed in `retryOn`.
    pub status_codes: Vec<u16>,
    /// gRPC statuses in the response headers: `cancelled` 1, `deadline-exceeded` 4,
    /// `resource-exhausted` 8, `internal` 13, `unavailable` 14.
    pub grpc: Vec<u16>,
}

/// Istio's retry policy for a route without `retries` (2 retries on
/// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`, with
/// [`DEFAULT_RETRIABLE_STATUS_CODES`]), and its conditions for `retries` without `retryOn`.
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
/// The `retriable_status_codes` of istiod's default retry policy (kept when `retries` sets no
/// `retryOn`; a `retryOn` replaces them with the codes it lists).
pub const DEFAULT_RETRIABLE_STATUS_CODES: [u16; 1] = [503];

// === impl RetryOn ===

impl RetryOn {
    /// istiod's default conditions: [`DEFAULT_RETRY_ON`] with [`DEFAULT_RETRIABLE_STATUS_CODES`].
    pub fn istio_default() -> Self {
        let mut on = Self::parse(DEFAULT_RETRY_ON).unwrap_or_default();
        on.status_codes = DEFAULT_RETRIABLE_STATUS_CODES.to_vec();
        on
    }

    /// Parses a comma-separated `retryOn` list; the error names the first token that is neither an
    /// Envoy retry condition nor an HTTP status code. `retriable-headers`,
    /// `envoy-ratelimited`, `http3-post-connect-failure` and `reset-before-request` are accepted
    /// and have no effect here (Drover adds no rate limiting and speaks no HTTP/3).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token {
                "5xx" => out.server_error = true,
                "gateway-error" => out.gateway_error = true,
                "reset" => out.reset = true,
                "connect-failure" => out.connect_failure = true,
                "retriable-4xx" => out.conflict = true,
                "refused-stream" => out.refused_stream = true,
                "retriable-status-codes" => {}
                "cancelled" => out.grpc.push(1),
                "deadline-exceeded" => out.grpc.push(4),
                "resource-exhausted" => out.grpc.push(8),
                "internal" => out.grpc.push(13),
                "unavailable" => out.grpc.push(14),
                "retriable-headers"
                | "envoy-ratelimited"
                | "http3-post-connect-failure"
                | "reset-before-request" => {}
                other => match other.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => out.status_codes.push(code),
                    _ => {
                        return Err(format!(
                            "{other:?} is not a retry condition or a status code"
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for RetryOn {
    /// The conditions as `retryOn` tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flags = [
            (self.server_error, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.connect_failure, "connect-failure"),
            (self.conflict, "retriable-4xx"),
            (self.refused_stream, "refused-stream"),
        ];
        let grpc = |code| match code {
            1 => "cancelled",
            4 => "deadline-exceeded",
            8 => "resource-exhausted",
            13 => "internal",
            _ => "unavailable",
        };
        let tokens: Vec<String> = flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, t)| t.to_string())
            .chain(self.grpc.iter().map(|g| grpc(*g).to_string()))
            .chain(self.status_codes.iter().map(u16::to_string))
            .collect();
        f.write_str(&tokens.join(","))
    }
}

impl Retries {
    /// Istio's retry policy for routes without `retries`.
    pub fn istio_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn::istio_default(),
            backoff: None,
            ignore_previous_hosts: true,
        }
    }
}

/// A `tcp[]` or `tls[]` route.
#[derive(Clone, Debug, PartialEq)]
pub struct L4Route {
    pub index: usize,
    /// Where a route that is not a VirtualService's `tcp[i]`/`tls[i]` came from (`TCPRoute
    /// ns/name rules[i]`).
    pub label: Option<String>,
    /// ORed; empty = matches everything.
    pub matches: Vec<L4Match>,
    pub destinations: Vec<WeightedDestination>,
}

/// A validated Gateway API mesh route (`HTTPRoute`, `GRPCRoute` or `TCPRoute`), in the route
/// model VirtualServices use: one [`HttpRoute`] per rule match (so that matches can be ordered
/// by the spec's precedence across routes), or one [`L4Route`] per TCP rule. It is bound to
/// its parents' hosts, merged with the other routes of the same parent and checked against
/// ReferenceGrants when the registry is built.
#[derive(Clone, Debug, PartialEq)]
pub struct MeshRoute {
    pub kind: RouteKind,
    /// The mesh parents (`Gateway` parents are skipped with a note).
    pub parents: Vec<MeshParent>,
    pub http: Vec<HttpRoute>,
    pub tcp: Vec<L4Route>,
    /// Backends (and mirrors) in another namespace, which need a ReferenceGrant there:
    /// (qualified host, namespace, Service name).
    pub foreign: Vec<(String, String, String)>,
}

/// The three mesh route kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
    Tcp,
}

/// A `parentRefs[]` entry that binds a route to the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshParent {
    /// `Service` (core) or Istio's `ServiceEntry`.
    pub service_entry: bool,
    pub namespace: String,
    pub name: String,
    /// Only this port of the parent.
    pub port: Option<u16>,
    /// `spec.parentRefs[i]`.
    pub field: String,
}

/// A validated `ReferenceGrant`: which routes (kind, namespace) may name which Services of the
/// grant's namespace (`None`: all of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceGrant {
    pub from: Vec<(RouteKind, String)>,
    pub to: Vec<Option<String>>,
}

// === impl RouteKind ===

impl RouteKind {
    /// The kind's name.
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
            RouteKind::Tcp => "TCPRoute",
        }
    }
}

/// `tcp[].match[]` / `tls[].match[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L4Match {
    pub sni_hosts: Vec<String>,
    pub destination_subnets: Vec<(std::net::IpAddr, u8)>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

// === impl RegexRewrite ===

impl RegexRewrite {
    /// `match` compiled unanchored, `rewrite` with its `\N` groups.
    pub fn new(source: &str, rewrite: &str) -> Result<Self, regex::Error> {
        let mut with = String::new();
        let mut chars = rewrite.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('\\', Some(d)) if d.is_ascii_digit() => {
                    with.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                ('$', _) => with.push_str("$$"),
                _ => with.push(c),
            }
        }
        Ok(Self {
            source: source.to_string(),
            rewrite: rewrite.to_string(),
            regex: regex::Regex::new(source)?,
            with,
        })
    }

    /// `path` with every match replaced.
    pub fn replace_all(&self, path: &str) -> String {
        self.regex
            .replace_all(path, self.with.as_str())
            .into_owned()
    }

    /// (`match`, `rewrite`) as written.
    pub fn parts(&self) -> (&str, &str) {
        (&self.source, &self.rewrite)
    }
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for RegexRewrite {}

// === impl Pattern ===

impl Pattern {
    /// Compiles `source` so that it must match the entire value, as Envoy's `safe_regex` does.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        Ok(Self {
            source: source.to_string(),
            anchored: regex::Regex::new(&format!("^(?:{source})$"))?,
        })
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.anchored.is_match(value)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

// === impl StringMatch ===

impl StringMatch {
    /// Whether `value` matches; `ignore_case` applies to exact and prefix only (as in Istio).
    pub fn matches(&self, value: &str, ignore_case: bool) -> bool {
        match self {
            StringMatch::Exact(e) if ignore_case => e.eq_ignore_ascii_case(value),
            StringMatch::Exact(e) => e == value,
            StringMatch::Prefix(p) if ignore_case => value
                .get(..p.len())
                .is_some_and(|v| v.eq_ignore_ascii_case(p)),
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
            StringMatch::PathPrefix(p) => {
                p == "/"
                    || value
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

// === impl ExportTo ===

impl ExportTo {
    /// Whether a client in `namespace` may see the resource.
    pub fn visible_to(&self, namespace: &str) -> bool {
        match self {
            ExportTo::All => true,
            ExportTo::Namespaces(list) => list.iter().any(|n| n == namespace),
        }
    }
}

// === impl Algorithm ===

impl Algorithm {
    /// Istio's spelling.
    pub fn name(&self) -> &'static str {
        match self {
            Algorithm::LeastRequest => "LEAST_REQUEST",
            Algorithm::RoundRobin => "ROUND_ROBIN",
            Algorithm::Random => "RANDOM",
            Algorithm::Passthrough => "PASSTHROUGH",
            Algorithm::ConsistentHash(_) => "consistentHash",
        }
    }
}

// === impl ConnectionPool ===

impl ConnectionPool {
    /// Istio's defaults, for a cluster whose rule sets no `connectionPool`: the only place the
    /// data path takes them from.
    pub fn istio_defaults() -> &'static ConnectionPool {
        static DEFAULTS: std::sync::LazyLock<ConnectionPool> =
            std::sync::LazyLock::new(ConnectionPool::default);
        &DEFAULTS
    }
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: UNLIMITED,
            connect_timeout: Duration::from_secs(10),
            tcp_keepalive: None,
            max_connection_duration: None,
            tcp_idle_timeout: Duration::from_secs(3600),
            http1_max_pending_requests: UNLIMITED,
            http2_max_requests: UNLIMITED,
            max_requests_per_connection: None,
            max_retries: UNLIMITED,
            http_idle_timeout: Duration::from_secs(3600),
            h2_upgrade: H2Upgrade::Default,
            use_client_protocol: false,
            max_concurrent_streams: i32::MAX as u32,
            http2_keepalive: None,
        }
    }
}

// === impl OutlierDetection ===

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            split_local_origin: false,
            consecutive_local_origin: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            http_error_codes: Vec::new(),
        }
    }
}

impl OutlierDetection {
    /// Envoy's cap on one ejection: `max(300 s, baseEjectionTime)`.
    pub fn max_ejection_time(&self) -> Duration {
        self.base_ejection_time.max(Duration::from_secs(300))
    }
}

/// A validated `Telemetry`: what it sets for the workloads it applies to (`None`: inherited
/// from the less specific level).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Telemetry {
    /// `None`: the whole namespace (the whole mesh in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub tracing: TelemetryTracing,
    /// `metrics[].overrides[]`, in order.
    pub metric_overrides: Vec<MetricOverride>,
    /// `metrics[].reportingInterval`: how often a running TCP connection's bytes are reported.
    pub reporting_interval: Option<std::time::Duration>,
    pub access_logging: AccessLogging,
}

/// `tracing[]` for the client side (Drover's outbound spans).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TelemetryTracing {
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: BTreeMap<String, CustomTag>,
}

/// Where a custom span tag's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CustomTag {
    Literal(String),
    Environment { name: String, default: String },
    Header { name: String, default: String },
}

/// One of Istio's standard metrics, as `overrides[].match.metric` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StandardMetric {
    RequestCount,
    RequestDuration,
    RequestSize,
    ResponseSize,
    TcpOpenedConnections,
    TcpClosedConnections,
    TcpSentBytes,
    TcpReceivedBytes,
    GrpcRequestMessages,
    GrpcResponseMessages,
}

/// `metrics[].overrides[]`.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricOverride {
    /// `None`: every metric (`ALL_METRICS`).
    pub metric: Option<StandardMetric>,
    /// Applies to `reporter="source"` (CLIENT) and/or `reporter="destination"` (SERVER).
    pub client: bool,
    pub server: bool,
    pub disabled: Option<bool>,
    /// Tag → what to do with it, in name order.
    pub tag_overrides: Vec<(String, TagOverride)>,
}

/// `tagOverrides.<tag>`.
#[derive(Clone, Debug, PartialEq)]
pub enum TagOverride {
    Remove,
    /// Set (or add) the tag to the value of a CEL expression over the request.
    Upsert(Expression),
}

/// `accessLogging[]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccessLogging {
    pub disabled: Option<bool>,
    /// Lines are written only for requests and connections it holds for.
    pub filter: Option<Expression>,
}

/// A compiled CEL expression with its source (compared by source).
#[derive(Clone)]
pub struct Expression {
    pub source: String,
    pub program: std::sync::Arc<cel::Program>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expression({:?})", self.source)
    }
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
