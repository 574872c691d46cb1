use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn reviews_v2() -> Peer {
    Peer::new(
        Some("reviews-v2"),
        "bookinfo",
        &labels(&[("app", "reviews"), ("version", "v2")]),
        None,
    )
}

fn edge(source: Peer, service: ServiceName) -> Edge {
    Edge {
        reporter: Reporter::Source,
        source: Arc::new(source),
        destination: Arc::new(reviews_v2()),
        service: Arc::new(service),
        security: Security::Unknown,
    }
}

fn request(code: u16, ms: u64) -> Request {
    Request {
        protocol: Protocol::Http,
        code,
        grpc_status: None,
        flags: String::new(),
        duration: Duration::from_millis(ms),
        request_bytes: 120,
        response_bytes: 3000,
        overrides: None,
    }
}

#[derive(Debug)]
struct Collect(Arc<Metrics>);

impl prometheus_client::collector::Collector for Collect {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(&mut e, &[])
    }
}

fn text(m: &Arc<Metrics>) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collect(m.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

fn productpage() -> Peer {
    Peer::new(
        Some("productpage-v1"),
        "bookinfo",
        &labels(&[("app", "productpage"), ("version", "v1")]),
        None,
    )
}

#[test]
fn workloads_are_named_by_their_controller_as_istio_names_them() {
    let hashed = labels(&[("pod-template-hash", "7f4669bdd9")]);
    let none = BTreeMap::new();
    for (pod, controller, labels, want) in [
        (
            "details-v1-7f4669bdd9-dg7vn",
            Some(("ReplicaSet", "details-v1-7f4669bdd9")),
            &hashed,
            "details-v1",
        ),
        // A ReplicaSet of its own (no template hash in its name) keeps its name.
        ("rs-abcde", Some(("ReplicaSet", "rs")), &hashed, "rs"),
        ("rs-abcde", Some(("ReplicaSet", "rs")), &none, "rs"),
        ("web-0", Some(("StatefulSet", "web")), &none, "web"),
        ("agent-x1", Some(("DaemonSet", "agent")), &none, "agent"),
        (
            "backup-28391040-xyz",
            Some(("Job", "backup-28391040")),
            &none,
            "backup",
        ),
        // A Job whose suffix is not a CronJob's schedule stamp is its own workload.
        (
            "migrate-1-xyz",
            Some(("Job", "migrate-1")),
            &none,
            "migrate-1",
        ),
        ("lonely", None, &none, "lonely"),
    ] {
        assert_eq!(workload_name(pod, controller, labels), want, "{pod}");
    }
}

#[test]
fn app_version_and_canonical_labels_fall_back_as_istio_does() {
    let p = Peer::new(
        Some("ratings-v1"),
        "default",
        &labels(&[
            ("app", "ratings"),
            ("version", "v1"),
            ("service.istio.io/canonical-name", "ratings-svc"),
            ("service.istio.io/canonical-revision", "version-1"),
        ]),
        Some(principal("default", "bookinfo-ratings")),
    );
    assert_eq!(
        (p.app.as_str(), p.version.as_str()),
        ("ratings", "v1"),
        "{p:?}"
    );
    assert_eq!(
        (p.canonical_service.as_str(), p.canonical_revision.as_str()),
        ("ratings-svc", "version-1")
    );
    assert_eq!(
        p.principal,
        "spiffe://cluster.local/ns/default/sa/bookinfo-ratings"
    );
    let k8s = Peer::new(
        Some("shop"),
        "default",
        &labels(&[
            ("app.kubernetes.io/name", "shop"),
            ("app.kubernetes.io/version", "2.1"),
        ]),
        None,
    );
    assert_eq!(
        (
            k8s.app.as_str(),
            k8s.version.as_str(),
            k8s.canonical_revision.as_str()
        ),
        ("shop", "2.1", "2.1")
    );
    let bare = Peer::new(Some("job-x"), "", &BTreeMap::new(), None);
    assert_eq!(
        (
            bare.app.as_str(),
            bare.version.as_str(),
            bare.canonical_service.as_str(),
            bare.canonical_revision.as_str(),
            bare.namespace.as_str(),
            bare.principal.as_str(),
        ),
        (
            "unknown", "unknown", "job-x", "latest", "unknown", "unknown"
        )
    );
    let stranger = Peer::from_principal("spiffe://cluster.local/ns/shop/sa/cart");
    assert_eq!(
        (stranger.namespace.as_str(), stranger.workload.as_str()),
        ("shop", "unknown")
    );
    let svc = ServiceName::new("reviews.bookinfo.svc.cluster.local", "bookinfo");
    assert_eq!(svc.name, "reviews");
    let external = ServiceName::new("api.example.com", "egress");
    assert_eq!(
        (external.name.as_str(), external.namespace.as_str()),
        ("api.example.com", "egress")
    );
}

#[test]
fn requests_are_counted_per_label_set_with_istio_histograms() {
    let m = Arc::new(Metrics::new(100));
    let e = edge(
        productpage(),
        ServiceName::new("reviews.bookinfo.svc.cluster.local", "bookinfo"),
    );
    for _ in 0..3 {
        m.http(&e, &request(200, 7));
    }
    m.http(
        &e,
        &Request {
            flags: "UO".into(),
            ..request(503, 0)
        },
    );
    // A second snapshot naming the same peers adds to the same series.
    let again = edge(
        productpage(),
        ServiceName::new("reviews.bookinfo.svc.cluster.local", "bookinfo"),
    );
    m.http(&again, &request(200, 30));
    let out = text(&m);
    let ok = "reporter=\"source\",source_workload=\"productpage-v1\",source_canonical_service=\"productpage\",source_canonical_revision=\"v1\",source_workload_namespace=\"bookinfo\",source_principal=\"unknown\",source_app=\"productpage\",source_version=\"v1\",source_cluster=\"Kubernetes\",destination_workload=\"reviews-v2\",destination_workload_namespace=\"bookinfo\",destination_principal=\"unknown\",destination_app=\"reviews\",destination_version=\"v2\",destination_service=\"reviews.bookinfo.svc.cluster.local\",destination_canonical_service=\"reviews\",destination_canonical_revision=\"v2\",destination_service_name=\"reviews\",destination_service_namespace=\"bookinfo\",destination_cluster=\"Kubernetes\",request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"unknown\"";
    assert!(
        out.contains(&format!("istio_requests_total{{{ok}}} 4\n")),
        "{out}"
    );
    assert!(out.contains("response_code=\"503\",grpc_response_status=\"\",response_flags=\"UO\""));
    // 7 ms ×3 in le=10; 30 ms in le=50; sum 51.
    assert!(
        out.contains(&format!(
            "istio_request_duration_milliseconds_bucket{{le=\"5.0\",{ok}}} 0\n"
        )),
        "{out}"
    );
    assert!(out.contains(&format!(
        "istio_request_duration_milliseconds_bucket{{le=\"10.0\",{ok}}} 3\n"
    )));
    assert!(out.contains(&format!(
        "istio_request_duration_milliseconds_bucket{{le=\"50.0\",{ok}}} 4\n"
    )));
    assert!(out.contains(&format!(
        "istio_request_duration_milliseconds_sum{{{ok}}} 51.0\n"
    )));
    assert!(out.contains(&format!(
        "istio_response_bytes_bucket{{le=\"5000.0\",{ok}}} 4\n"
    )));
    assert!(out.contains(&format!("istio_request_bytes_sum{{{ok}}} 480.0\n")));
    assert!(out.contains("# TYPE istio_request_duration_milliseconds histogram"));
}

#[test]
fn tcp_connections_add_up_per_edge() {
    let m = Arc::new(Metrics::new(100));
    let e = Edge {
        reporter: Reporter::Destination,
        security: Security::MutualTls,
        ..edge(
            productpage().with_principal(principal("bookinfo", "productpage")),
            ServiceName::new("db.bookinfo.svc.cluster.local", "bookinfo"),
        )
    };
    for _ in 0..2 {
        m.tcp(
            &e,
            &Tcp {
                opened: 1,
                closed: 1,
                sent: 100,
                received: 7,
                flags: String::new(),
                overrides: None,
            },
        );
    }
    let out = text(&m);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .to_string()
    };
    assert!(line("istio_tcp_sent_bytes_total{").ends_with(" 200"));
    assert!(line("istio_tcp_received_bytes_total{").ends_with(" 14"));
    assert!(line("istio_tcp_connections_opened_total{").ends_with(" 2"));
    let closed = line("istio_tcp_connections_closed_total{");
    assert!(closed.ends_with(" 2"), "{closed}");
    assert!(closed.contains("reporter=\"destination\""));
    assert!(closed.contains("connection_security_policy=\"mutual_tls\""));
    assert!(
        closed.contains("source_principal=\"spiffe://cluster.local/ns/bookinfo/sa/productpage\"")
    );
    assert!(closed.contains("request_protocol=\"tcp\""));
}

#[test]
fn a_running_connection_is_opened_then_reported_then_closed_each_byte_once() {
    let m: &'static Arc<Metrics> = Box::leak(Box::new(Arc::new(Metrics::new(100))));
    let e = edge(
        productpage(),
        ServiceName::new("db.bookinfo.svc.cluster.local", "bookinfo"),
    );
    let sum = |name: &str| -> u64 {
        (text(m).lines())
            .filter(|l| l.starts_with(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let mut c = Connection::open_in(m, e.clone(), None);
    assert_eq!(
        sum("istio_tcp_connections_opened_total{"),
        1,
        "opened at once"
    );
    c.moved(5, 0);
    c.moved(0, 12);
    assert_eq!(sum("istio_tcp_received_bytes_total{"), 5);
    assert_eq!(sum("istio_tcp_sent_bytes_total{"), 12);
    assert_eq!(sum("istio_tcp_connections_closed_total{"), 0, "still open");
    c.close((9, 12));
    assert_eq!(
        sum("istio_tcp_received_bytes_total{"),
        9,
        "only the 4 not reported yet"
    );
    assert_eq!(sum("istio_tcp_sent_bytes_total{"), 12);
    assert_eq!(sum("istio_tcp_connections_closed_total{"), 1);
    assert_eq!(m.series_count().1, 1, "one series");

    // Closed with response flags: in the series with them.
    let c = Connection::open_in(m, e, None);
    c.close_flagged((0, 0), "UC".into(), None);
    assert_eq!(sum("istio_tcp_connections_closed_total{"), 2);
    assert_eq!(m.series_count().1, 2);
}

#[test]
fn a_hundred_thousand_source_addresses_fold_into_unknown_within_the_limit() {
    let max = 1000;
    let m = Arc::new(Metrics::new(max));
    let dst = Arc::new(reviews_v2());
    let service = Arc::new(ServiceName::new(
        "reviews.bookinfo.svc.cluster.local",
        "bookinfo",
    ));
    let n = 100_000u32;
    for i in 0..n {
        // A client nobody knows, named by its address (as a workload without identity is).
        let addr = std::net::Ipv4Addr::from(0xC612_0000 + i);
        let source = Peer::new(Some(&addr.to_string()), "outside", &BTreeMap::new(), None);
        let e = Edge {
            reporter: Reporter::Destination,
            source: Arc::new(source),
            destination: dst.clone(),
            service: service.clone(),
            security: Security::None,
        };
        m.http(&e, &request(200, 1));
        m.tcp(
            &e,
            &Tcp {
                opened: 1,
                ..Tcp::default()
            },
        );
    }
    let (http, tcp) = m.series_count();
    assert_eq!(
        (http, tcp),
        (max + 1, max + 1),
        "the limit plus the folded series"
    );
    assert_eq!(m.folded(), 2 * u64::from(n - max as u32));
    let out = text(&m);
    // Nothing is lost: the folded series carries the rest of the requests.
    let folded = out
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{") && l.contains("source_workload=\"unknown\"")
        })
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        folded.ends_with(&format!(" {}", n - max as u32)),
        "{folded}"
    );
    assert!(folded.contains("destination_workload=\"unknown\""));
    assert!(out.contains(&format!(
        "drover_metrics_folded_total {}",
        2 * (n - max as u32)
    )));
}

fn telemetry(namespace: &str, yaml: &str) -> settings::Entry {
    let doc = format!(
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t-{namespace}, namespace: {namespace}}}\nspec:\n{}",
        yaml.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    let set = crate::config::source::ConfigSet::parse_ok("t.yaml", &doc);
    let r = &set.telemetries[0];
    let v = crate::config::validate::Validated::<crate::config::policy::Telemetry>::try_from(r)
        .unwrap_or_else(|e| panic!("{yaml}: {:?}", e.errors));
    settings::Entry {
        policy: v.value,
        namespace: namespace.into(),
        id: r.id(),
        age: r.age(),
    }
}

#[test]
fn telemetry_composes_mesh_then_namespace_then_workload() {
    let entries = vec![
        telemetry(
            "istio-system",
            "tracing: [{randomSamplingPercentage: 10, customTags: {team: {literal: {value: mesh}}}}]\naccessLogging: [{disabled: true}]",
        ),
        telemetry(
            "shop",
            "tracing: [{randomSamplingPercentage: 50, customTags: {cart: {header: {name: X-Cart, defaultValue: none}}}}]",
        ),
        telemetry(
            "shop",
            "selector: {matchLabels: {app: cart}}\ntracing: [{disableSpanReporting: true}]\naccessLogging: [{filter: {expression: 'response.code >= 500'}}]",
        ),
    ];
    let cart = labels(&[("app", "cart")]);
    let s = Settings::resolve(&entries, "istio-system", "shop", &cart);
    assert_eq!(s.sampling, Some(50.0), "the namespace overrides the mesh");
    assert!(s.disable_spans, "the workload's own");
    assert_eq!(s.custom_tags.len(), 2, "custom tags merge: {s:?}");
    assert_eq!(s.access_log_disabled, Some(true), "inherited from the mesh");
    // A filter does not re-enable a log the mesh disabled, as Istio's `disabled` wins.
    let failed = settings::Attributes {
        code: 503,
        ..Default::default()
    };
    assert!(!s.logs(&failed));
    let web = Settings::resolve(&entries, "istio-system", "shop", &labels(&[("app", "web")]));
    assert!(!web.disable_spans, "the selector picks only cart");
    let other = Settings::resolve(&entries, "istio-system", "bank", &cart);
    assert_eq!(
        other.sampling,
        Some(10.0),
        "only the mesh applies elsewhere"
    );
    let none = Settings::resolve(&[], "istio-system", "shop", &cart);
    assert!(none.logs(&failed) && none.overrides(true, &failed).is_none());

    let filtered = Settings::resolve(
        &[telemetry(
            "shop",
            "accessLogging: [{filter: {expression: 'response.code >= 500 || request.headers[\"x-debug\"] == \"1\"'}}]",
        )],
        "istio-system",
        "shop",
        &cart,
    );
    let ok = settings::Attributes {
        code: 200,
        ..Default::default()
    };
    assert!(filtered.logs(&failed) && !filtered.logs(&ok));
    let mut h = hyper::HeaderMap::new();
    h.insert("x-debug", "1".parse().unwrap());
    let debug = settings::Attributes {
        code: 200,
        headers: Some(&h),
        ..Default::default()
    };
    assert!(filtered.logs(&debug), "headers are readable");
}

#[test]
fn metric_overrides_disable_families_remove_tags_and_upsert_values() {
    let s = Settings::resolve(
        &[telemetry(
            "istio-system",
            "metrics:\n- overrides:\n  - match: {metric: REQUEST_DURATION}\n    disabled: true\n  - match: {metric: REQUEST_COUNT, mode: CLIENT}\n    tagOverrides:\n      response_flags: {operation: REMOVE}\n      request_host: {value: request.host}\n  - match: {mode: SERVER}\n    tagOverrides: {source_principal: {operation: REMOVE}}",
        )],
        "istio-system",
        "shop",
        &BTreeMap::new(),
    );
    let m = Arc::new(Metrics::new(100));
    let e = edge(
        productpage(),
        ServiceName::new("reviews.bookinfo.svc.cluster.local", "bookinfo"),
    );
    for (host, flags) in [("a.example", ""), ("a.example", "UO"), ("b.example", "")] {
        let a = settings::Attributes {
            host,
            code: 200,
            ..Default::default()
        };
        m.http(
            &e,
            &Request {
                flags: flags.into(),
                overrides: s.overrides(true, &a),
                ..request(200, 3)
            },
        );
    }
    let out = text(&m);
    assert!(
        !out.contains("istio_request_duration_milliseconds_bucket"),
        "disabled: {out}"
    );
    let counts: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert_eq!(counts.len(), 2, "two hosts, flags removed: {counts:#?}");
    assert!(counts.iter().all(|l| !l.contains("response_flags")));
    let a = counts
        .iter()
        .find(|l| l.contains("request_host=\"a.example\""))
        .unwrap();
    assert!(
        a.ends_with(" 2"),
        "the UO request merged into its host's series: {a}"
    );
    // The size histograms keep every tag (the overrides named other metrics).
    assert!(out.contains("istio_request_bytes_bucket{le=\"0.5\",reporter=\"source\""));
    assert!(out.contains("response_flags=\"UO\""));
}
