//! The pure parts of the fast path: rings, Maglev tables, eligibility and tables from
//! snapshots.

use super::*;

#[test]
fn equal_weights_rotate_one_slot_each() {
    assert_eq!(schedule(&[1.0, 1.0, 1.0]), vec![0, 1, 2]);
}

#[test]
fn weighted_schedule_is_proportional_and_spread() {
    let ring = schedule(&[3.0, 1.0]);
    assert_eq!(ring.len(), fast::RING);
    let zeros = ring.iter().filter(|i| **i == 0).count();
    assert!((767..=769).contains(&zeros), "{zeros}");
    // Smooth: never more than three of endpoint 0 in a row.
    assert!(ring.windows(4).all(|w| w.contains(&1)), "{ring:?}");
}

#[test]
fn maglev_fills_every_slot_in_proportion_and_moves_little_when_one_goes() {
    let keys: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}:80")).collect();
    let t = maglev(&[1.0; 4], &keys, fast::HASH_RING as usize);
    assert_eq!(t.len(), fast::HASH_RING as usize);
    for i in 0..4u8 {
        let n = t.iter().filter(|x| **x == i).count();
        assert!((245..=266).contains(&n), "endpoint {i}: {n}");
    }
    // Remove endpoint 3: slots of the others mostly stay.
    let t3 = maglev(&[1.0; 3], &keys[..3], fast::HASH_RING as usize);
    let kept = t
        .iter()
        .zip(&t3)
        .filter(|(a, b)| **a != 3 && a == b)
        .count();
    let before = t.iter().filter(|a| **a != 3).count();
    assert!(kept * 10 >= before * 8, "{kept} of {before} kept");
    let weighted = maglev(&[2.0, 1.0], &keys[..2], fast::HASH_RING as usize);
    let zeros = weighted.iter().filter(|x| **x == 0).count();
    assert!((660..=700).contains(&zeros), "{zeros}");
}

fn snapshot(policy: &str, extra: &str) -> Registry {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: test}}
spec:
  hosts: [db.test.svc]
  addresses: [127.0.0.50]
  ports: [{{number: 5432, name: tcp, protocol: TCP, targetPort: 7000}}]
  resolution: STATIC
  endpoints:
  - address: 127.0.0.11
  - address: 127.0.0.12
    weight: 3
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: test}}
spec:
  host: db.test.svc
  trafficPolicy: {policy}
{extra}"
    );
    crate::testing::registry(&yaml)
}

const VIP: &str = "127.0.0.50:5432";

#[test]
fn tables_carry_the_algorithm_weights_cap_and_connect_timeout() {
    let reg = snapshot(
        "{loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {tcp: {maxConnections: 7, connectTimeout: 250ms}}}",
        "",
    );
    let t = table(&reg, VIP.parse().unwrap(), true).unwrap();
    assert_eq!(t.lb, lb::ROUND_ROBIN);
    assert_eq!(t.n, 2);
    assert_eq!(t.connect_timeout_ms, 250);
    assert_eq!(t.endpoints[0].max_connections, 7);
    assert_eq!(
        endpoint_addr(&t.endpoints[1]),
        "127.0.0.12:7000".parse().unwrap()
    );
    let ones = t.ring[..t.ring_len as usize]
        .iter()
        .filter(|i| **i == 1)
        .count();
    assert!(
        (ones * 4).abs_diff(t.ring_len as usize * 3) <= 4,
        "weight 3 of 4: {ones} of {}",
        t.ring_len
    );
    assert_eq!(t.flags & fast::flags::OUTCOMES, 0);
}

#[test]
fn policy_the_kernel_cannot_enforce_keeps_the_proxy_with_its_reason() {
    for (policy, why) in [
        ("{tls: {mode: SIMPLE}}", "tls origination"),
        ("{connectionPool: {tcp: {idleTimeout: 5s}}}", "idleTimeout"),
        (
            "{connectionPool: {tcp: {maxConnectionDuration: 5s}}}",
            "maxConnectionDuration",
        ),
        (
            "{connectionPool: {tcp: {tcpKeepalive: {time: 5s}}}}",
            "tcpKeepalive",
        ),
        ("{proxyProtocol: {version: V1}}", "proxyProtocol"),
        (
            "{loadBalancer: {consistentHash: {httpHeaderName: x-user}}}",
            "useSourceIp",
        ),
        (
            "{loadBalancer: {simple: ROUND_ROBIN, warmup: {duration: 10s}}}",
            "warmup",
        ),
    ] {
        let reg = snapshot(policy, "");
        let err = table(&reg, VIP.parse().unwrap(), true).unwrap_err();
        assert!(err.contains(why), "{policy}: {err}");
    }
    let ok = snapshot("{loadBalancer: {consistentHash: {useSourceIp: true}}}", "");
    let t = table(&ok, VIP.parse().unwrap(), true).unwrap();
    assert_eq!((t.lb, t.ring_len), (lb::HASH, fast::HASH_RING));
    let default = snapshot("{connectionPool: {tcp: {maxConnections: 100}}}", "");
    assert_eq!(
        table(&default, VIP.parse().unwrap(), true).unwrap().lb,
        lb::LEAST_REQUEST,
        "Istio's default"
    );
}

#[test]
fn weighted_tcp_routes_fold_into_one_ring_with_each_subsets_cap() {
    let reg = snapshot(
        "{loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: a, labels: {}, trafficPolicy: {connectionPool: {tcp: {maxConnections: 5}}}}
  - {name: b, labels: {}}",
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: test}
spec:
  hosts: [db.test.svc]
  tcp:
  - route:
    - {destination: {host: db.test.svc, subset: a}, weight: 90}
    - {destination: {host: db.test.svc, subset: b}, weight: 10}
",
    );
    let t = table(&reg, VIP.parse().unwrap(), true).unwrap();
    assert_eq!(t.n, 4, "two endpoints per subset");
    let ring = &t.ring[..t.ring_len as usize];
    let to_a = ring.iter().filter(|i| **i < 2).count();
    assert!((912..=932).contains(&to_a), "90% to subset a: {to_a}");
    assert_eq!(t.endpoints[0].max_connections, 5);
    assert_eq!(t.endpoints[2].max_connections, 0);
    assert_ne!(t.endpoints[0].cluster_id, t.endpoints[2].cluster_id);
}

#[test]
fn ejected_endpoints_leave_the_table_and_come_back() {
    let reg = snapshot(
        "{loadBalancer: {simple: ROUND_ROBIN}, outlierDetection: {consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}",
        "",
    );
    let vip: SocketAddr = VIP.parse().unwrap();
    let t = table(&reg, vip, true).unwrap();
    assert_eq!(t.n, 2);
    assert_ne!(t.flags & fast::flags::OUTCOMES, 0);
    let c = reg.clusters().next().unwrap();
    let od = c.outlier.as_ref().unwrap();
    for _ in 0..2 {
        od.observe(0, crate::outlier::Outcome::LocalFailure);
    }
    let t = table(&reg, vip, true).unwrap();
    assert_eq!(t.n, 1);
    assert_eq!(
        endpoint_addr(&t.endpoints[0]),
        "127.0.0.12:7000".parse().unwrap()
    );
    assert_eq!(table(&reg, vip, false).unwrap().n, 2, "without ejections");
}

#[test]
fn explain_names_the_path_and_why() {
    let fast = snapshot("{loadBalancer: {simple: RANDOM}}", "");
    let text = crate::registry::explain::explain(&fast, "db.test.svc", None, None).unwrap();
    assert!(
        text.contains("path       127.0.0.50:5432: kernel fast path with --fast-path auto (RANDOM over 2 endpoints"),
        "{text}"
    );
    let proxied = snapshot("{connectionPool: {tcp: {idleTimeout: 5s}}}", "");
    let text = crate::registry::explain::explain(&proxied, "db.test.svc", None, None).unwrap();
    assert!(
        text.contains("path       127.0.0.50:5432: proxied: outbound|5432||db.test.svc: connectionPool.tcp.idleTimeout"),
        "{text}"
    );
}

#[test]
fn outcome_records_decode_as_the_kernel_lays_them_out() {
    let ev = drover_common::FastEvent {
        cluster_id: 7,
        kind: fast::outcome::FAILED,
        endpoint: drover_common::EpKey {
            addr: [1, 2, 3, 4],
            port_be: 80u16.to_be(),
            proto: 6,
            family: 4,
        },
        _pad: 0,
    };
    let mut bytes = Vec::new();
    for w in [ev.cluster_id, ev.kind] {
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    for w in ev.endpoint.addr {
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    bytes.extend_from_slice(&ev.endpoint.port_be.to_ne_bytes());
    bytes.extend_from_slice(&[6, 4, 0, 0, 0, 0]);
    assert_eq!(bytes.len(), std::mem::size_of::<drover_common::FastEvent>());
    assert_eq!(run::decode(&bytes), Some(ev));
    assert_eq!(run::decode(&bytes[..31]), None);
}
