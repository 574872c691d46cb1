//! Envoy's response flags for the access log: one enum for every path (L4, HTTP, inbound), so
//! that a flag is never a bare string, and the rendering of a line's flags (`UF,URX`, or `-`).
//!
//! Invariant: [`ResponseFlag::code`] is exactly Envoy's short code, which users grep for.

use std::fmt;

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
        }
    }
}

impl fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
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
