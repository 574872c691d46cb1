//! What an HTTP route does besides choosing a destination, as Envoy applies Istio's fields:
//! header operations (`headers.request`/`headers.response`), path and authority rewrites
//! (`rewrite`), redirects (`redirect`), local replies (`directResponse`), fault injection
//! (`fault`, whose replies `http.rs` builds) and CORS (`corsPolicy`).
//!
//! Invariants: pure functions over the request's parts and the validated policy (the fault
//! rolls take their random number as an argument); header operations run remove, then set,
//! then add, as Envoy's header parser does; a rewrite never drops the query string.

use hyper::{
    HeaderMap, Method,
    header::{self, HeaderValue},
};

use crate::config::policy::{Cors, HeaderOps, Redirect, RedirectPort, Rewrite, StringMatch};

/// What Envoy's CORS filter does with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum CorsVerdict {
    /// A preflight from an allowed origin: answered here, 200 with these headers.
    Preflight(HeaderMap),
    /// A preflight from another origin under `unmatchedPreflights: IGNORE`: answered here, 200
    /// without CORS headers.
    Ignore,
    /// Forwarded; these headers (an allowed origin's) go on the response.
    Forward(HeaderMap),
}

/// Applies `ops` to `headers`: removals, then `set` (replacing), then `add` (appending).
pub fn apply(ops: &HeaderOps, headers: &mut HeaderMap) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value) in &ops.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &ops.add {
        headers.append(name.clone(), value.clone());
    }
}

/// The path and query after `rewrite.uri` or `rewrite.uriRegexRewrite`. `uri` replaces the part
/// the route's `uri` match matched: its prefix, the whole path for an exact or regex match, and
/// the leading `/` when the route matched without a `uri` (Envoy's `prefix_rewrite` over the
/// catch-all prefix). The query string is kept.
pub fn rewrite_path(path_and_query: &str, matched: Option<&StringMatch>, r: &Rewrite) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let path = if let Some(re) = &r.uri_regex {
        re.replace_all(path)
    } else if let Some(uri) = &r.uri {
        match matched {
            _ if r.full_path => uri.clone(),
            Some(StringMatch::Prefix(p)) if path.len() >= p.len() => {
                format!("{uri}{}", &path[p.len()..])
            }
            Some(StringMatch::PathPrefix(p)) => replace_segment_prefix(path, p, uri),
            Some(StringMatch::Prefix(_) | StringMatch::Exact(_) | StringMatch::Regex(_)) => {
                uri.clone()
            }
            None => format!("{uri}{}", path.strip_prefix('/').unwrap_or(path)),
        }
    } else {
        path.to_string()
    };
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

/// `path` with the segment prefix `prefix` (a Gateway API `PathPrefix` match) replaced by
/// `with`, as `ReplacePrefixMatch` does: the rest keeps its own leading `/`, one `/` is dropped
/// where both sides bring one, and an empty result is `/`.
fn replace_segment_prefix(path: &str, prefix: &str, with: &str) -> String {
    let rest = match prefix {
        "/" => path,
        p => path.strip_prefix(p).unwrap_or(path),
    };
    let out = match (with.ends_with('/'), rest.starts_with('/')) {
        (true, true) => format!("{with}{}", &rest[1..]),
        (false, false) if !rest.is_empty() => format!("{with}/{rest}"),
        _ => format!("{with}{rest}"),
    };
    if out.is_empty() { "/".to_string() } else { out }
}

/// The `Location` of a redirect: each part the redirect names replaces the request's; with
/// `replace_prefix`, `uri` replaces only the prefix `matched` matched (the path, with its
/// query).
pub fn location(
    r: &Redirect,
    matched: Option<&StringMatch>,
    scheme: &str,
    authority: &str,
    path_and_query: &str,
) -> String {
    let old_scheme = scheme;
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let request_port = split_authority(authority).1;
    // Envoy's `host_redirect` replaces the whole authority, port included.
    let (host, port) = split_authority(r.authority.as_deref().unwrap_or(authority));
    let default_port = |s: &str| match s {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    };
    let port = match r.port {
        Some(RedirectPort::Fixed(p)) => Some(p),
        Some(RedirectPort::FromRequest) => request_port,
        Some(RedirectPort::ProtocolDefault) => None,
        // A scheme change drops the old scheme's default port (as Envoy 1.40 was seen to do);
        // any other port stays as written.
        None if r.scheme.is_some() && port == default_port(old_scheme) => None,
        None => port,
    };
    let port = port.map_or_else(String::new, |p| format!(":{p}"));
    // Istio: `uri` replaces the whole path whatever the match; the request's query stays unless
    // `uri` carries its own (Envoy's `path_redirect`).
    let path = match (&r.uri, path_and_query.split_once('?')) {
        (Some(uri), _) if r.replace_prefix => rewrite_path(
            path_and_query,
            matched,
            &Rewrite {
                uri: Some(uri.clone()),
                full_path: false,
                authority: None,
                uri_regex: None,
            },
        ),
        (Some(uri), Some((_, q))) if !uri.contains('?') => format!("{uri}?{q}"),
        (Some(uri), _) => uri.clone(),
        (None, _) => path_and_query.to_string(),
    };
    format!("{scheme}://{host}{port}{path}")
}

/// The authority of a mirrored request: `-shadow` appended to the host, before any port (as
/// Envoy 1.40 writes it).
pub fn shadow_authority(authority: &str) -> String {
    match split_authority(authority) {
        (host, Some(port)) => format!("{host}-shadow:{port}"),
        (host, None) => format!("{host}-shadow"),
    }
}

/// `host[:port]` (IPv6 literals in brackets) split into the host and a valid port.
fn split_authority(a: &str) -> (&str, Option<u16>) {
    match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() && !p.contains(']') => {
            (h, p.parse().ok())
        }
        _ => (a, None),
    }
}

/// The CORS filter's verdict for a request with `method` and `headers` under `c`.
pub fn cors(c: &Cors, method: &Method, headers: &HeaderMap) -> CorsVerdict {
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok().map(|s| (o, s)));
    let preflight = method == Method::OPTIONS
        && origin.is_some()
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let allowed = origin.filter(|(_, s)| c.origins.iter().any(|m| m.matches(s, false)));
    let mut out = HeaderMap::new();
    let Some((value, _)) = allowed else {
        return match preflight && !c.forward_unmatched {
            true => CorsVerdict::Ignore,
            false => CorsVerdict::Forward(out),
        };
    };
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value.clone());
    if c.credentials {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    let add = |out: &mut HeaderMap, name, v: &Option<HeaderValue>| {
        if let Some(v) = v {
            out.insert(name, v.clone());
        }
    };
    if preflight {
        add(&mut out, header::ACCESS_CONTROL_ALLOW_METHODS, &c.methods);
        add(&mut out, header::ACCESS_CONTROL_ALLOW_HEADERS, &c.headers);
        add(&mut out, header::ACCESS_CONTROL_MAX_AGE, &c.max_age);
        CorsVerdict::Preflight(out)
    } else {
        add(&mut out, header::ACCESS_CONTROL_EXPOSE_HEADERS, &c.expose);
        CorsVerdict::Forward(out)
    }
}

/// Whether a fault with `percent` (0–100) applies, given a uniform `roll` in [0, 1).
pub fn applies(percent: f64, roll: f64) -> bool {
    roll * 100.0 < percent
}

#[cfg(test)]
mod tests;
