//! Envoy's observable results for each action, case by case.

use hyper::{
    StatusCode,
    header::{HeaderName, HeaderValue},
};

use super::*;
use crate::config::policy::{LocalReply, RegexRewrite};
use hyper::Method;

fn name(s: &'static str) -> HeaderName {
    HeaderName::from_static(s)
}

fn value(s: &'static str) -> HeaderValue {
    HeaderValue::from_static(s)
}

#[test]
fn header_operations_remove_then_set_then_add() {
    let ops = HeaderOps {
        set: vec![(name("x-set"), value("new"))],
        add: vec![
            (name("x-add"), value("two")),
            (name("x-gone"), value("back")),
        ],
        remove: vec![name("x-gone"), name("x-absent")],
    };
    let mut h = HeaderMap::new();
    h.insert(name("x-set"), value("old"));
    h.append(name("x-set"), value("older"));
    h.insert(name("x-add"), value("one"));
    h.insert(name("x-gone"), value("bye"));
    apply(&ops, &mut h);
    let all = |n: &'static str| -> Vec<&str> {
        h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect()
    };
    assert_eq!(all("x-set"), ["new"], "set replaces every value");
    assert_eq!(all("x-add"), ["one", "two"], "add appends");
    // Removal runs first, so an `add` of a removed name survives.
    assert_eq!(all("x-gone"), ["back"]);
}

fn rewrite(uri: Option<&str>, regex: Option<(&str, &str)>) -> Rewrite {
    Rewrite {
        uri: uri.map(str::to_string),
        full_path: false,
        authority: None,
        uri_regex: regex.map(|(p, w)| RegexRewrite::new(p, w).unwrap()),
    }
}

#[test]
fn uri_rewrite_replaces_what_the_match_matched_and_keeps_the_query() {
    let r = rewrite(Some("/v2/"), None);
    let prefix = StringMatch::Prefix("/api/".into());
    assert_eq!(
        rewrite_path("/api/users?id=7", Some(&prefix), &r),
        "/v2/users?id=7"
    );
    let exact = StringMatch::Exact("/login".into());
    assert_eq!(
        rewrite_path("/login?next=/", Some(&exact), &r),
        "/v2/?next=/"
    );
    // No uri match: the catch-all prefix `/` is what gets replaced.
    assert_eq!(rewrite_path("/users", None, &r), "/v2/users");
    // uriRegexRewrite substitutes every match, with numbered groups.
    let r = rewrite(None, Some(("^/service/([^/]+)(/.*)$", "\\2/instance/\\1")));
    assert_eq!(
        rewrite_path("/service/foo/v1/api?x=1", None, &r),
        "/v1/api/instance/foo?x=1"
    );
}

fn redirect(uri: Option<&str>, authority: Option<&str>, scheme: Option<&str>) -> Redirect {
    Redirect {
        uri: uri.map(str::to_string),
        authority: authority.map(str::to_string),
        scheme: scheme.map(str::to_string),
        port: None,
        code: StatusCode::MOVED_PERMANENTLY,
        replace_prefix: false,
    }
}

#[test]
fn gateway_api_path_modifiers_replace_whole_segments_or_the_full_path() {
    // The Gateway API mesh conformance case MeshHTTPRouteRewritePath
    // (conformance/tests/mesh/httproute-rewrite-path.go).
    let prefix = |p: &str| StringMatch::PathPrefix(p.into());
    let cases = [
        ("/prefix/one", "/one", "/prefix/one/two", "/one/two"),
        ("/strip-prefix", "/", "/strip-prefix/three", "/three"),
        ("/strip-prefix", "/", "/strip-prefix", "/"),
        (
            "/prefix/rewrite-path-and-modify-headers",
            "/prefix",
            "/prefix/rewrite-path-and-modify-headers/one",
            "/prefix/one",
        ),
        ("/", "/new", "/a/b?q=1", "/new/a/b?q=1"),
        ("/a", "/b/", "/a/c", "/b/c"),
    ];
    for (matched, with, path, want) in cases {
        let r = rewrite(Some(with), None);
        assert_eq!(
            rewrite_path(path, Some(&prefix(matched)), &r),
            want,
            "{matched} → {with} on {path}"
        );
    }
    let full = Rewrite {
        full_path: true,
        ..rewrite(Some("/one"), None)
    };
    assert_eq!(
        rewrite_path("/full/one/two?x=1", Some(&prefix("/full")), &full),
        "/one?x=1"
    );
    // A redirect's ReplacePrefixMatch.
    let r = Redirect {
        replace_prefix: true,
        ..redirect(Some("/new"), None, None)
    };
    assert_eq!(
        location(&r, Some(&prefix("/old")), "http", "echo", "/old/x?y=1"),
        "http://echo/new/x?y=1"
    );
}

#[test]
fn redirect_location_replaces_only_what_it_names() {
    let r = redirect(
        Some("/v1/bookRatings"),
        Some("newratings.default.svc"),
        None,
    );
    assert_eq!(
        location(
            &r,
            None,
            "http",
            "ratings:9080",
            "/v1/getProductRatings?id=1"
        ),
        "http://newratings.default.svc/v1/bookRatings?id=1",
        "the authority replaces host and port"
    );
    // A scheme change drops the old scheme's default port only (Envoy 1.40, checked).
    let r = redirect(None, None, Some("https"));
    for (host, want) in [
        ("shop.example:80", "https://shop.example/cart"),
        ("shop.example", "https://shop.example/cart"),
        ("shop.example:9080", "https://shop.example:9080/cart"),
        ("shop.example:443", "https://shop.example:443/cart"),
    ] {
        assert_eq!(location(&r, None, "http", host, "/cart"), want);
    }
    let mut r = redirect(Some("/x?y=1"), None, None);
    r.port = Some(RedirectPort::Fixed(8443));
    assert_eq!(
        location(&r, None, "http", "a.b", "/old?q=2"),
        "http://a.b:8443/x?y=1",
        "a query in uri replaces the request's"
    );
    r.port = Some(RedirectPort::FromRequest);
    assert_eq!(
        location(&r, None, "http", "a.b:81", "/"),
        "http://a.b:81/x?y=1"
    );
    r.port = Some(RedirectPort::ProtocolDefault);
    assert_eq!(
        location(&r, None, "http", "a.b:81", "/"),
        "http://a.b/x?y=1"
    );
    // IPv6 literal authorities keep their brackets.
    let r = redirect(Some("/z"), None, None);
    assert_eq!(
        location(&r, None, "http", "[::1]:8080", "/"),
        "http://[::1]:8080/z"
    );
}

#[test]
fn fault_percentages_roll_against_a_uniform_number() {
    assert!(applies(100.0, 0.999_999));
    assert!(!applies(0.0, 0.0));
    assert!(applies(25.0, 0.249) && !applies(25.0, 0.25));
}

fn cors_policy(forward_unmatched: bool) -> Cors {
    Cors {
        origins: vec![
            StringMatch::Exact("https://app.example".into()),
            StringMatch::Prefix("https://dev.".into()),
        ],
        methods: Some(value("GET,POST")),
        headers: Some(value("x-token")),
        expose: Some(value("x-trace")),
        max_age: Some(value("600")),
        credentials: true,
        forward_unmatched,
    }
}

fn request(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs.iter().map(|(k, v)| (name(k), value(v))).collect()
}

#[test]
fn cors_answers_allowed_preflights_and_decorates_allowed_responses() {
    let c = cors_policy(true);
    let preflight = request(&[
        ("origin", "https://app.example"),
        ("access-control-request-method", "POST"),
    ]);
    let CorsVerdict::Preflight(h) = cors(&c, &Method::OPTIONS, &preflight) else {
        panic!("an allowed preflight is answered");
    };
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-methods"], "GET,POST");
    assert_eq!(h["access-control-allow-headers"], "x-token");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(!h.contains_key("access-control-expose-headers"));
    // An actual request from an allowed origin: origin, credentials and exposed headers.
    let actual = request(&[("origin", "https://dev.example")]);
    let CorsVerdict::Forward(h) = cors(&c, &Method::GET, &actual) else {
        panic!("forwarded");
    };
    assert_eq!(h["access-control-allow-origin"], "https://dev.example");
    assert_eq!(h["access-control-expose-headers"], "x-trace");
    assert!(!h.contains_key("access-control-allow-methods"));
    // Another origin, or none: forwarded untouched.
    let other = request(&[("origin", "https://evil.example")]);
    assert_eq!(
        cors(&c, &Method::GET, &other),
        CorsVerdict::Forward(HeaderMap::new())
    );
    assert_eq!(
        cors(&c, &Method::GET, &HeaderMap::new()),
        CorsVerdict::Forward(HeaderMap::new())
    );
    // A preflight from another origin: forwarded by default, answered bare under IGNORE.
    let foreign = request(&[
        ("origin", "https://evil.example"),
        ("access-control-request-method", "POST"),
    ]);
    assert_eq!(
        cors(&c, &Method::OPTIONS, &foreign),
        CorsVerdict::Forward(HeaderMap::new())
    );
    assert_eq!(
        cors(&cors_policy(false), &Method::OPTIONS, &foreign),
        CorsVerdict::Ignore
    );
}

#[test]
fn mirrored_requests_name_a_shadow_host() {
    assert_eq!(
        shadow_authority("shop.example:9080"),
        "shop.example-shadow:9080"
    );
    assert_eq!(shadow_authority("reviews"), "reviews-shadow");
}

#[test]
fn a_routes_deprecated_allow_origin_list_admits_exactly_those_origins() {
    // Through a built snapshot: the route the request takes carries the policy the proxy
    // applies.
    let service = crate::testing::two_endpoint_service(
        "web.default.svc",
        "127.77.0.10:80",
        ("http", "HTTP"),
        80,
    );
    let vs = crate::testing::virtual_service(
        "  - corsPolicy: {allowOrigin: [https://app.example], allowMethods: [GET]}
    route: [{destination: {host: web.default.svc}}]
",
    );
    let reg = crate::testing::registry(&format!("{service}{vs}"));
    let headers = request(&[
        ("origin", "https://app.example"),
        ("access-control-request-method", "GET"),
    ]);
    let req = crate::registry::route::Request {
        method: "OPTIONS",
        scheme: "http",
        authority: "web.default.svc",
        path: "/",
        query: None,
        headers: &headers,
        connection: "-",
    };
    let d = reg
        .route_request("127.77.0.10:80".parse().unwrap(), None, &req)
        .unwrap();
    let c = d
        .http_route
        .and_then(|r| r.cors.as_ref())
        .expect("the route's CORS policy");
    let CorsVerdict::Preflight(h) = cors(c, &Method::OPTIONS, &headers) else {
        panic!("a preflight from the listed origin is answered");
    };
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-methods"], "GET");
    // Exact: a longer origin with the same start is not allowed.
    let near = request(&[
        ("origin", "https://app.example.evil"),
        ("access-control-request-method", "GET"),
    ]);
    assert_eq!(
        cors(c, &Method::OPTIONS, &near),
        CorsVerdict::Forward(HeaderMap::new())
    );
}

#[test]
fn redirects_direct_responses_and_origin_patterns_from_built_routes() {
    let service = crate::testing::two_endpoint_service(
        "web.default.svc",
        "127.77.0.10:80",
        ("http", "HTTP"),
        80,
    );
    let vs = crate::testing::virtual_service(
        "  - match: [{uri: {prefix: /redir}}]
    redirect: {uri: /new, scheme: https, derivePort: FROM_PROTOCOL_DEFAULT, redirectCode: 302}
  - match: [{uri: {exact: /bytes}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - match: [{uri: {prefix: /cors}}]
    corsPolicy: {allowOrigins: [{regex: 'https://[a-z]+[.]example'}], allowMethods: [GET]}
    route: [{destination: {host: web.default.svc}}]
",
    );
    let reg = crate::testing::registry(&format!("{service}{vs}"));
    let route = |path: &'static str, headers: &HeaderMap| {
        let req = crate::registry::route::Request {
            method: "OPTIONS",
            scheme: "http",
            authority: "web.default.svc:8080",
            path,
            query: None,
            headers,
            connection: "-",
        };
        let d = reg
            .route_request("127.77.0.10:80".parse().unwrap(), None, &req)
            .unwrap();
        (
            d.http_route.unwrap(),
            d.http_match.and_then(|m| m.uri.as_ref()),
        )
    };
    let none = HeaderMap::new();
    // The scheme changes and the port is the new scheme's default (not written).
    let (r, matched) = route("/redir/x", &none);
    let Some(LocalReply::Redirect(redirect)) = &r.local else {
        panic!("{r:?}");
    };
    assert_eq!(redirect.code, StatusCode::FOUND);
    assert_eq!(
        location(
            redirect,
            matched,
            "http",
            "web.default.svc:8080",
            "/redir/x?q=1"
        ),
        "https://web.default.svc/new?q=1"
    );
    // A body given as base64 bytes.
    let (r, _) = route("/bytes", &none);
    assert_eq!(
        r.local,
        Some(LocalReply::Direct {
            status: StatusCode::OK,
            body: b"hello".to_vec()
        })
    );
    // An origin pattern: the whole origin must match.
    let preflight = |origin: &'static str| {
        request(&[("origin", origin), ("access-control-request-method", "GET")])
    };
    let (r, _) = route("/cors", &none);
    let c = r.cors.as_ref().unwrap();
    assert!(matches!(
        cors(c, &Method::OPTIONS, &preflight("https://app.example")),
        CorsVerdict::Preflight(_)
    ));
    assert_eq!(
        cors(c, &Method::OPTIONS, &preflight("https://app.example.evil")),
        CorsVerdict::Forward(HeaderMap::new())
    );
}
