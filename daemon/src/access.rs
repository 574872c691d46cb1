//! The access log: one [`Record`] type written by every path (L4, HTTP, inbound) under the
//! `drover::access` target, and Envoy's response flags as an enum, so that a flag is never a bare
//! string (`UF,URX`, or `-` when there is none).
//!
//! Invariant: [`ResponseFlag::code`] is exactly Envoy's short code, which users grep for; a
//! kind's field names never change (log pipelines key on them).

use std::{fmt, net::SocketAddr};

use tokio::time::Instant;

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
