//! Property: a valid DestinationRule survives a serde round trip (CRD mirror → YAML → CRD mirror)
//! unchanged, and validates to the same policy both times.

use proptest::{collection::vec, option, prelude::*};

use super::*;
use crate::config::source::ConfigSet;

fn duration() -> impl Strategy<Value = crd::Duration> {
    (1u64..200_000).prop_map(|ms| {
        crd::Duration(if ms % 1000 == 0 {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        })
    })
}

fn load_balancer() -> impl Strategy<Value = crd::LoadBalancerSettings> {
    let simple = prop_oneof![
        Just(crd::SimpleLb::RoundRobin),
        Just(crd::SimpleLb::LeastConn),
        Just(crd::SimpleLb::LeastRequest),
        Just(crd::SimpleLb::Random),
        Just(crd::SimpleLb::Passthrough),
    ]
    .prop_map(|s| crd::LoadBalancerSettings {
        simple: Some(s),
        ..Default::default()
    });
    let hash = (
        "[a-z][a-z0-9-]{0,10}",
        prop_oneof![Just(None), Just(Some(65537i64)), Just(Some(5))],
        option::of(512i64..4096),
    )
        .prop_map(|(header, maglev, ring)| crd::LoadBalancerSettings {
            consistent_hash: Some(crd::ConsistentHash {
                http_header_name: Some(header),
                maglev: maglev.map(|t| crd::Maglev {
                    table_size: Some(t),
                }),
                ring_hash: if maglev.is_none() {
                    ring.map(|r| crd::RingHash {
                        minimum_ring_size: Some(r),
                    })
                } else {
                    None
                },
                ..Default::default()
            }),
            ..Default::default()
        });
    prop_oneof![simple, hash]
}

fn connection_pool() -> impl Strategy<Value = crd::ConnectionPoolSettings> {
    (
        option::of(1i64..10_000),
        option::of(duration()),
        option::of(1i64..10_000),
        option::of(1i64..10_000),
        option::of(duration()),
    )
        .prop_map(
            |(max, connect, pending, per_conn, idle)| crd::ConnectionPoolSettings {
                tcp: Some(crd::TcpSettings {
                    max_connections: max,
                    connect_timeout: connect,
                    ..Default::default()
                }),
                http: (pending.is_some() || per_conn.is_some() || idle.is_some()).then(|| {
                    crd::HttpSettings {
                        http1_max_pending_requests: pending,
                        max_requests_per_connection: per_conn,
                        idle_timeout: idle,
                        ..Default::default()
                    }
                }),
            },
        )
}

fn outlier() -> impl Strategy<Value = crd::OutlierDetection> {
    (
        option::of(0i64..20),
        option::of(duration()),
        option::of(duration()),
        option::of(0i64..=100),
    )
        .prop_map(|(c5xx, interval, base, max)| crd::OutlierDetection {
            consecutive_5xx_errors: c5xx,
            interval,
            base_ejection_time: base,
            max_ejection_percent: max,
            ..Default::default()
        })
}

fn tls() -> impl Strategy<Value = crd::ClientTlsSettings> {
    (
        prop_oneof![
            Just(crd::TlsMode::Disable),
            Just(crd::TlsMode::Simple),
            Just(crd::TlsMode::IstioMutual)
        ],
        option::of("[a-z]{1,8}\\.example"),
    )
        .prop_map(|(mode, sni)| crd::ClientTlsSettings {
            mode: Some(mode),
            sni,
            ..Default::default()
        })
}

fn traffic_policy() -> impl Strategy<Value = crd::TrafficPolicy> {
    (
        option::of(load_balancer()),
        option::of(connection_pool()),
        option::of(outlier()),
        option::of(tls()),
        vec((1i64..65536, load_balancer()), 0..3),
    )
        .prop_filter("trafficPolicy must not be empty", |t| {
            t.0.is_some() || t.1.is_some() || t.2.is_some() || t.3.is_some()
        })
        .prop_map(|(lb, pool, od, tls, ports)| {
            let mut seen = HashSet::new();
            crd::TrafficPolicy {
                load_balancer: lb,
                connection_pool: pool,
                outlier_detection: od,
                tls,
                port_level_settings: ports
                    .into_iter()
                    .filter(|(p, _)| seen.insert(*p))
                    .map(|(p, lb)| crd::PortTrafficPolicy {
                        port: Some(crd::PortSelector { number: Some(p) }),
                        load_balancer: Some(lb),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
        })
}

fn destination_rule() -> impl Strategy<Value = crd::DestinationRuleSpec> {
    (
        prop_oneof![
            Just("reviews".to_string()),
            Just("reviews.demo.svc.cluster.local".to_string()),
            Just("*.foo.com".to_string()),
        ],
        option::of(traffic_policy()),
        vec(option::of(traffic_policy()), 0..4),
    )
        .prop_map(|(host, tp, subsets)| crd::DestinationRuleSpec {
            host,
            traffic_policy: tp,
            subsets: subsets
                .into_iter()
                .enumerate()
                .map(|(i, tp)| {
                    Some(crd::Subset {
                        name: format!("v{i}"),
                        labels: [("version".to_string(), format!("v{i}"))].into(),
                        traffic_policy: tp,
                    })
                })
                .collect(),
            ..Default::default()
        })
}

/// YAML text of a whole DestinationRule document.
fn document(spec: &crd::DestinationRuleSpec) -> String {
    let spec = serde_yaml::to_string(spec).expect("serialize");
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: p, namespace: demo}}\nspec:\n{spec}"
    )
}

fn parse(text: &str) -> Resource<crd::DestinationRuleSpec> {
    let mut set = ConfigSet::parse_ok("p.yaml", text);
    assert!(set.warnings.is_empty(), "{:?}\n{text}", set.warnings);
    set.destination_rules.remove(0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_rules_survive_a_serde_round_trip(spec in destination_rule()) {
        let first = parse(&document(&spec));
        prop_assert_eq!(&first.spec, &spec);
        let p1 = Validated::<policy::DestinationRule>::try_from(&first)
            .map_err(|i| format!("{:?}", i.errors))
            .unwrap()
            .value;
        let second = parse(&document(&first.spec));
        prop_assert_eq!(&second.spec, &first.spec);
        let p2 = Validated::<policy::DestinationRule>::try_from(&second)
            .map_err(|i| format!("{:?}", i.errors))
            .unwrap()
            .value;
        prop_assert_eq!(p1, p2);
    }
}
