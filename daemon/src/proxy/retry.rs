//! Envoy's retry rules for one HTTP request, as Istio programs them: which outcome of a try is
//! retried under `retryOn`, and how long to wait before retry N (fully jittered exponential
//! backoff, 25 ms base, 250 ms cap).
//!
//! Invariants: pure functions of the try's outcome, the policy and a random number; a local
//! overflow (503 `UO`) never reaches here, so it is never retried.

use std::time::Duration;

use crate::config::policy::RetryOn;

/// Envoy's default retry backoff base interval (and 10× as the cap).
const BASE: Duration = Duration::from_millis(25);
const CAP: Duration = Duration::from_millis(250);

/// How one try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived; `grpc` is a `grpc-status` among them (trailers-only reply).
    Response { status: u16, grpc: Option<u16> },
    /// The connection could not be opened (refused, unreachable, connect timeout, TLS).
    ConnectFailure,
    /// The HTTP/2 stream was refused by the endpoint (REFUSED_STREAM).
    RefusedStream,
    /// The connection or stream ended before response headers.
    Reset,
    /// `perTryTimeout` expired before response headers.
    Timeout,
}

/// Whether `retryOn` retries this outcome.
pub fn retriable(on: &RetryOn, outcome: Outcome) -> bool {
    // `5xx` and `gateway-error` also cover every try that got no response, as `reset` does.
    let no_response = on.server_error || on.gateway_error || on.reset;
    match outcome {
        Outcome::Response { status, grpc } => {
            (on.server_error && status >= 500)
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.conflict && status == 409)
                || on.status_codes.contains(&status)
                || grpc.is_some_and(|g| on.grpc.contains(&g))
        }
        Outcome::ConnectFailure => on.connect_failure || no_response,
        Outcome::RefusedStream => on.refused_stream || no_response,
        Outcome::Reset | Outcome::Timeout => no_response,
    }
}

/// The wait before retry `n` (1 for the first retry): uniform in [0, (2ⁿ − 1) × base), capped
/// at 10 × base; `base` is the route's `backoff` (Envoy's default: 25 ms); `unit` is a random
/// number in [0, 1).
pub fn backoff(n: u32, unit: f64, base: Option<Duration>) -> Duration {
    let (base, cap) = base.map_or((BASE, CAP), |b| (b, b.saturating_mul(10)));
    let factor = (1u32 << n.clamp(1, 16)) - 1;
    base.saturating_mul(factor)
        .min(cap)
        .mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::RetryOn;

    fn on(s: &str) -> RetryOn {
        RetryOn::parse(s).unwrap()
    }

    fn status(status: u16) -> Outcome {
        Outcome::Response { status, grpc: None }
    }

    #[test]
    fn istio_default_retries_connect_failures_refused_streams_503_and_grpc_unavailable_only() {
        let d = RetryOn::istio_default();
        assert!(retriable(&d, Outcome::ConnectFailure));
        assert!(retriable(&d, Outcome::RefusedStream));
        assert!(retriable(&d, status(503)), "retriable_status_codes [503]");
        for s in [500, 502, 504, 409, 200] {
            assert!(!retriable(&d, status(s)), "{s}");
        }
        assert!(!retriable(&d, Outcome::Reset));
        assert!(!retriable(&d, Outcome::Timeout));
        let grpc = |g| Outcome::Response {
            status: 200,
            grpc: Some(g),
        };
        assert!(retriable(&d, grpc(14)), "unavailable");
        assert!(retriable(&d, grpc(1)), "cancelled");
        assert!(!retriable(&d, grpc(13)), "internal is not in the default");
    }

    #[test]
    fn each_condition_covers_what_envoy_documents() {
        let x = on("5xx");
        assert!(retriable(&x, status(500)) && retriable(&x, status(503)));
        assert!(!retriable(&x, status(409)) && !retriable(&x, status(404)));
        assert!(retriable(&x, Outcome::Reset) && retriable(&x, Outcome::ConnectFailure));
        let g = on("gateway-error");
        assert!(retriable(&g, status(502)) && retriable(&g, status(504)));
        assert!(!retriable(&g, status(500)));
        assert!(retriable(&g, Outcome::Timeout));
        let r = on("reset");
        assert!(retriable(&r, Outcome::Reset) && retriable(&r, Outcome::ConnectFailure));
        assert!(!retriable(&r, status(503)));
        let c = on("connect-failure");
        assert!(retriable(&c, Outcome::ConnectFailure));
        assert!(!retriable(&c, Outcome::Reset) && !retriable(&c, Outcome::RefusedStream));
        assert!(retriable(&on("retriable-4xx"), status(409)));
        let codes = on("retriable-status-codes,418, 429");
        assert!(retriable(&codes, status(418)) && retriable(&codes, status(429)));
        assert!(!retriable(&codes, status(500)));
        assert!(
            RetryOn::parse("5xx,bogus")
                .unwrap_err()
                .contains("\"bogus\"")
        );
        assert!(RetryOn::parse("600").is_err());
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        assert_eq!(backoff(1, 0.0, None), Duration::ZERO);
        assert_eq!(backoff(1, 0.999_999, None).as_micros(), 24_999);
        assert_eq!(backoff(2, 0.5, None), Duration::from_micros(37_500));
        assert_eq!(backoff(3, 0.5, None), Duration::from_micros(87_500));
        assert_eq!(
            backoff(4, 1.0, None),
            CAP,
            "(2⁴ − 1) × 25 ms is over the cap"
        );
        assert_eq!(backoff(30, 1.0, None), CAP);
        // The route's `backoff` is the base, and ten times it the cap.
        let base = Some(Duration::from_millis(100));
        assert_eq!(backoff(2, 0.5, base), Duration::from_millis(150));
        assert_eq!(backoff(5, 1.0, base), Duration::from_secs(1));
    }
}
