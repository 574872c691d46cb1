//! The access log: one [`Record`] type written by every path (L4, HTTP, inbound) under the
//! `drover::access` target, and Envoy's response flags as an enum, so that a flag is never a bare
//! string (`UF,URX`, or `-` when there is none).
//!
//! Lines are Drover's own (key=value fields, or JSON with `--log-format json`), or, with
//! `--access-log-format istio`, Istio's default text format (Envoy's
//! `[%START_TIME%] "%REQ(:METHOD)% … %ROUTE_NAME%` line) for HTTP requests and TCP connections.
//!
//! Invariant: [`ResponseFlag::code`] is exactly Envoy's short code, which users grep for; a
//! kind's field names never change (log pipelines key on them).

use std::{fmt, net::SocketAddr, sync::OnceLock};

use tokio::time::Instant;

/// How HTTP and TCP lines are written (`--access-log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Drover's fields (`status=… cluster=… request_id=…`).
    #[default]
    Drover,
    /// Istio's default text format (`[%START_TIME%] "%REQ(:METHOD)% …" %RESPONSE_CODE% …`).
    Istio,
}

static FORMAT: OnceLock<Format> = OnceLock::new();

/// Sets the line format (once, at start).
pub fn set_format(f: Format) {
    let _ = FORMAT.set(f);
}

/// The line format.
pub fn format() -> Format {
    FORMAT.get().copied().unwrap_or_default()
}

/// What Istio's text format says of a request beyond Drover's fields (kept only in that format).
#[derive(Clone, Debug, Default)]
pub struct Envoy {
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    pub user_agent: Option<String>,
    pub forwarded_for: Option<String>,
    /// Body bytes from the client (its declared length) and to it (counted).
    pub body_received: u64,
    pub body_sent: u64,
    /// The response came from the endpoint (`via_upstream`), not from Drover.
    pub via_upstream: bool,
}
/// One access-log line.
pub struct Record {
    pub netns: String,
    pub src: Option<SocketAddr>,
    pub dst: SocketAddr,
    pub start: Instant,
    pub kind: Kind,
}

/// What a line says beyond where the connection came from and went.
pub enum Kind {
    /// A relayed TCP connection; `reason` when it ended in an error.
    Tcp {
        host: String,
        cluster: String,
        route: String,
        endpoint: String,
        bytes: Option<(u64, u64)>,
        flags: Vec<ResponseFlag>,
        reason: Option<String>,
    },
    /// One HTTP request.
    Http {
        method: hyper::Method,
        path: String,
        authority: String,
        status: u16,
        cluster: String,
        route: String,
        endpoint: String,
        flags: Vec<ResponseFlag>,
        /// `x-request-id` as forwarded (the client's, or generated).
        request_id: String,
        /// The W3C / B3 trace id the request carries upstream.
        trace_id: String,
        /// Istio's text format only.
        envoy: Option<Box<Envoy>>,
    },
    /// An inbound (15006) connection: how it was served, or why it was refused.
    Inbound { outcome: Result<String, String> },
}

/// Whether access-log lines are written at all (the log filter lets `drover::access` at info
/// through), so that a path can skip building records nobody reads.
pub fn enabled() -> bool {
    tracing::enabled!(target: "drover::access", tracing::Level::INFO)
}

impl Record {
    /// Writes the line (info; a refused inbound connection at warn).
    pub fn emit(&self) {
        if format() == Format::Istio
            && let Some(line) = self.istio_line()
        {
            tracing::info!(target: "drover::access", "{line}");
            return;
        }
        let (netns, src, dst) = (&self.netns, self.src, self.dst);
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        match &self.kind {
            Kind::Tcp {
                host,
                cluster,
                route,
                endpoint,
                bytes: Some((sent, received)),
                flags,
                reason: None,
            } => tracing::info!(
                target: "drover::access",
                netns = %netns, src = ?src, dst = %dst, host = %host, cluster = %cluster,
                route = %route, endpoint = %endpoint,
                bytes_sent = sent, bytes_received = received, duration_ms,
                flag = %render(flags), "tcp"
            ),
            Kind::Tcp {
                host,
                cluster,
                route,
                endpoint,
                flags,
                reason,
                ..
            } => tracing::info!(
                target: "drover::access",
                netns = %netns, src = ?src, dst = %dst, host = %host, cluster = %cluster,
                route = %route, endpoint = %endpoint,
                duration_ms, flag = %render(flags), reason = %reason.as_deref().unwrap_or("-"),
                "tcp"
            ),
            Kind::Http {
                method,
                path,
                authority,
                status,
                cluster,
                route,
                endpoint,
                flags,
                request_id,
                trace_id,
                ..
            } => tracing::info!(
                target: "drover::access",
                netns = %netns, src = ?src, dst = %dst, method = %method, path = %path,
                authority = %authority, status, cluster = %cluster, route = %route,
                endpoint = %endpoint, duration_ms, flag = %render(flags),
                request_id = %request_id, trace_id = %trace_id, "http"
            ),
            Kind::Inbound { outcome: Ok(how) } => tracing::info!(
                target: "drover::access", netns = %netns, src = %peer(src), dst = ?Some(dst),
                how = %how, "inbound"
            ),
            Kind::Inbound {
                outcome: Err(reason),
            } => tracing::warn!(
                target: "drover::access", netns = %netns, src = %peer(src), dst = ?Some(dst),
                reason = %reason, "inbound refused"
            ),
        }
    }
}

impl Record {
    /// The line in Istio's default text format (HTTP requests and TCP connections):
    /// `[start] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS TERMINATION "FAILURE" RECEIVED SENT
    /// DURATION UPSTREAM_TIME "XFF" "UA" "REQUEST_ID" "AUTHORITY" "UPSTREAM_HOST" CLUSTER
    /// UPSTREAM_LOCAL DOWNSTREAM_LOCAL DOWNSTREAM_REMOTE SNI ROUTE`; `-` where Drover has no value.
    fn istio_line(&self) -> Option<String> {
        let elapsed = self.start.elapsed();
        let started = std::time::SystemTime::now()
            .checked_sub(elapsed)
            .unwrap_or(std::time::UNIX_EPOCH);
        let started = chrono::DateTime::<chrono::Utc>::from(started)
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let ms = elapsed.as_millis();
        let remote = peer(self.src);
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let host_of = |endpoint: &str| {
            endpoint.rsplit_once('@').map_or("-".to_string(), |(_, a)| {
                a.split(' ').next().unwrap_or("-").to_string()
            })
        };
        Some(match &self.kind {
            Kind::Http {
                method,
                path,
                authority,
                status,
                cluster,
                route,
                endpoint,
                flags,
                request_id,
                envoy,
                ..
            } => {
                let e = envoy.as_deref().cloned().unwrap_or_default();
                let details = if e.via_upstream { "via_upstream" } else { "-" };
                let q = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                format!(
                    "[{started}] \"{method} {path} {}\" {status} {} {details} - \"-\" {} {} {ms} - \"{}\" \"{}\" \"{request_id}\" \"{authority}\" \"{}\" {cluster} - {} {remote} - {}",
                    dash(e.protocol),
                    render(flags),
                    e.body_received,
                    e.body_sent,
                    q(&e.forwarded_for),
                    q(&e.user_agent),
                    host_of(endpoint),
                    self.dst,
                    dash(route),
                )
            }
            Kind::Tcp {
                cluster,
                route,
                endpoint,
                bytes,
                flags,
                ..
            } => {
                let (sent, received) = bytes.unwrap_or_default();
                format!(
                    "[{started}] \"- - -\" 0 {} - - \"-\" {sent} {received} {ms} - \"-\" \"-\" \"-\" \"-\" \"{}\" {cluster} - {} {remote} - {}",
                    render(flags),
                    host_of(endpoint),
                    self.dst,
                    dash(route),
                )
            }
            Kind::Inbound { .. } => return None,
        })
    }
}

/// Why a connection or request did not end normally (Envoy's `%RESPONSE_FLAGS%`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlag {
    /// `NR`: no route (or no original destination).
    NoRoute,
    /// `NC`: the route names an unknown cluster (an undefined subset).
    NoClusterFound,
    /// `UH`: no healthy endpoint in the cluster.
    NoHealthyUpstream,
    /// `UF`: connecting to the endpoint (or its TLS handshake) failed.
    UpstreamConnectionFailure,
    /// `UO`: a circuit breaker overflowed.
    UpstreamOverflow,
    /// `UT`: an upstream timeout (request, per-try, pending queue or idle).
    UpstreamRequestTimeout,
    /// `UC`: the upstream connection ended early.
    UpstreamConnectionTermination,
    /// `UR`: the upstream reset the stream.
    UpstreamRemoteReset,
    /// `DC`: the client went away first.
    DownstreamConnectionTermination,
    /// `DT`: `maxConnectionDuration` reached.
    DurationTimeout,
    /// `URX`: the retries ran out.
    UpstreamRetryLimitExceeded,
    /// `FI`: the request was aborted by fault injection.
    FaultInjected,
    /// `DI`: the request was delayed by fault injection.
    DelayInjected,
}

impl ResponseFlag {
    /// Envoy's short code.
    pub const fn code(self) -> &'static str {
        match self {
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoClusterFound => "NC",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamConnectionTermination => "UC",
            ResponseFlag::UpstreamRemoteReset => "UR",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::DurationTimeout => "DT",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A peer address as the inbound lines print it (`-` when unknown).
fn peer(src: Option<SocketAddr>) -> String {
    src.map_or_else(|| "-".to_string(), |s| s.to_string())
}

/// A log line's flags, comma-separated in the order they happened; `-` when there is none.
pub fn render(flags: &[ResponseFlag]) -> String {
    if flags.is_empty() {
        return "-".to_string();
    }
    flags.iter().map(|f| f.code()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_render_as_envoy_writes_them() {
        assert_eq!(render(&[]), "-");
        assert_eq!(
            render(&[
                ResponseFlag::UpstreamConnectionFailure,
                ResponseFlag::UpstreamRetryLimitExceeded
            ]),
            "UF,URX"
        );
        assert_eq!(
            ResponseFlag::DownstreamConnectionTermination.to_string(),
            "DC"
        );
    }
}
