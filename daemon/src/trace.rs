//! Request ids and trace context on the outbound HTTP path, as Envoy does them in Istio: an
//! `x-request-id` (a UUID v4) is kept when the client sent one and generated when it did not;
//! the W3C `traceparent` and Zipkin B3 (`x-b3-*`) contexts continue the client's trace with a
//! new span of this hop (same trace id, the client's span as parent, a fresh span id), keeping
//! its sampling decision, or start a trace sampled at the configured percentage (Istio's default
//! 1 %). `tracestate` and `baggage` pass unchanged.
//!
//! Invariants: [`Context::from_request`] is a pure function of the request's headers and the
//! random numbers it is given; an id is never all zeros; a malformed incoming context is
//! replaced by a new trace, never forwarded.

use hyper::{HeaderMap, header::HeaderValue};

pub mod export;

/// `x-request-id`.
pub const REQUEST_ID: &str = "x-request-id";
/// Istio's default sampling percentage.
pub const DEFAULT_SAMPLING: f64 = 1.0;

static SAMPLING: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// Sets the percentage of new traces sampled (`--trace-sampling`; once, at start).
pub fn set_sampling(percent: f64) {
    let _ = SAMPLING.set(percent.clamp(0.0, 100.0));
}

/// The percentage of new traces sampled.
pub fn sampling() -> f64 {
    SAMPLING.get().copied().unwrap_or(DEFAULT_SAMPLING)
}

/// This hop's trace context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    pub request_id: String,
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// This hop's span (16 hex digits).
    pub span_id: String,
    /// The client's span, when it sent a context.
    pub parent_id: Option<String>,
    pub sampled: bool,
    /// The client sent B3 headers: they are continued too (a new trace gets both formats).
    b3: bool,
}

/// The random numbers one request's context may draw.
pub struct Dice {
    pub request_id: [u8; 16],
    pub trace_id: u128,
    pub span_id: u64,
    /// In `[0, 100)`: sampled when below the percentage.
    pub roll: f64,
}

// === impl Dice ===

impl Dice {
    /// Fresh random numbers.
    pub fn roll() -> Self {
        Self {
            request_id: fastrand::u128(..).to_le_bytes(),
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            roll: fastrand::f64() * 100.0,
        }
    }
}

// === impl Context ===

impl Context {
    /// The context of a request with `headers`, sampling a new trace at `percent`.
    pub fn from_request(headers: &HeaderMap, percent: f64, dice: Dice) -> Self {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let request_id = header(REQUEST_ID)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| {
                uuid::Builder::from_random_bytes(dice.request_id)
                    .into_uuid()
                    .to_string()
            });
        let span_id = format!("{:016x}", dice.span_id.max(1));
        let w3c = header("traceparent").and_then(parse_traceparent);
        let b3 = (header("x-b3-traceid"))
            .and_then(normalize_trace_id)
            .map(|t| {
                (
                    t,
                    header("x-b3-spanid")
                        .filter(|s| is_id(s, 16))
                        .map(str::to_string),
                )
            });
        let b3_sampled = match (header("x-b3-sampled"), header("x-b3-flags")) {
            (_, Some("1")) | (Some("1" | "true"), _) => Some(true),
            (Some("0" | "false"), _) => Some(false),
            _ => None,
        };
        let (trace_id, parent_id, sampled) = match (w3c, &b3) {
            (Some((trace, parent, sampled)), _) => (trace, Some(parent), sampled),
            (None, Some((trace, parent))) => (
                trace.clone(),
                parent.clone(),
                b3_sampled.unwrap_or(dice.roll < percent),
            ),
            (None, None) => (
                format!("{:032x}", dice.trace_id.max(1)),
                None,
                b3_sampled.unwrap_or(dice.roll < percent),
            ),
        };
        Self {
            request_id,
            trace_id,
            span_id,
            parent_id,
            sampled,
            b3: b3.is_some() || header("traceparent").is_none(),
        }
    }

    /// Writes the context into the forwarded request: `x-request-id`, `traceparent` with this
    /// hop as parent, and the B3 headers when the client used them or started no trace.
    pub fn write(&self, headers: &mut HeaderMap) {
        let mut set = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        set(REQUEST_ID, self.request_id.clone());
        let flags = if self.sampled { "01" } else { "00" };
        set(
            "traceparent",
            format!("00-{}-{}-{flags}", self.trace_id, self.span_id),
        );
        if self.b3 {
            set("x-b3-traceid", self.trace_id.clone());
            set("x-b3-spanid", self.span_id.clone());
            set(
                "x-b3-sampled",
                if self.sampled { "1" } else { "0" }.to_string(),
            );
            match &self.parent_id {
                Some(p) => set("x-b3-parentspanid", p.clone()),
                None => {
                    headers.remove("x-b3-parentspanid");
                }
            }
        }
    }
}

/// `00-<trace>-<parent>-<flags>`: (trace id, parent id, sampled), or `None` when malformed (an
/// unknown version is read as 00, as the W3C spec asks, when its first four fields fit).
fn parse_traceparent(v: &str) -> Option<(String, String, bool)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid_version =
        is_hex(version, 2) && version != "ff" && (version != "00" || parts.next().is_none());
    if !valid_version || !is_id(trace, 32) || !is_id(parent, 16) || !is_hex(flags, 2) {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((
        trace.to_ascii_lowercase(),
        parent.to_ascii_lowercase(),
        sampled,
    ))
}

/// A B3 trace id: 16 or 32 hex digits, returned as 32 (a 64-bit id left-padded with zeros).
fn normalize_trace_id(v: &str) -> Option<String> {
    match v.len() {
        16 if is_id(v, 16) => Some(format!("{:0>32}", v.to_ascii_lowercase())),
        32 if is_id(v, 32) => Some(v.to_ascii_lowercase()),
        _ => None,
    }
}

/// `len` hex digits, not all zero.
fn is_id(v: &str, len: usize) -> bool {
    is_hex(v, len) && v.bytes().any(|b| b != b'0')
}

fn is_hex(v: &str, len: usize) -> bool {
    v.len() == len && v.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests;
