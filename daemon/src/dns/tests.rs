//! Rewriting DNS entries from answers: every address for DNS, the first for DNS_ROUND_ROBIN,
//! hosts as names when no endpoint is listed, names without an answer left without endpoints.

use super::*;

fn entry(resolution: crd::Resolution, endpoints: &[&str]) -> crd::ServiceEntrySpec {
    crd::ServiceEntrySpec {
        hosts: vec!["db.example".into()],
        resolution,
        endpoints: endpoints
            .iter()
            .map(|a| crd::WorkloadEntrySpec {
                address: a.to_string(),
                weight: Some(3),
                ..Default::default()
            })
            .collect::<Vec<_>>()
            .into(),
        ..Default::default()
    }
}

fn addrs(spec: &crd::ServiceEntrySpec) -> Vec<(String, Option<String>, Option<u32>)> {
    spec.endpoints
        .iter()
        .map(|e| (e.address.clone(), e.origin.clone(), e.weight))
        .collect()
}

#[test]
fn answers_become_endpoints_as_envoys_dns_clusters_use_them() {
    let answers = BTreeMap::from([
        (
            "a.internal".to_string(),
            vec!["198.18.1.2".parse().unwrap(), "198.18.2.2".parse().unwrap()],
        ),
        (
            "db.example".to_string(),
            vec!["198.18.3.2".parse().unwrap()],
        ),
    ]);
    let mut dns = entry(
        crd::Resolution::Dns,
        &["a.internal", "198.18.9.2", "b.internal"],
    );
    assert_eq!(names(&dns), vec!["a.internal", "b.internal"]);
    expand(&mut dns, &answers);
    let via = Some("DNS a.internal".to_string());
    assert_eq!(
        addrs(&dns),
        vec![
            ("198.18.1.2".into(), via.clone(), Some(3)),
            ("198.18.2.2".into(), via, Some(3)),
            ("198.18.9.2".into(), None, Some(3)),
        ],
        "every address, the endpoint's other fields kept; no answer yet: no endpoint"
    );
    let mut logical = entry(crd::Resolution::DnsRoundRobin, &["a.internal"]);
    expand(&mut logical, &answers);
    assert_eq!(
        addrs(&logical).len(),
        1,
        "DNS_ROUND_ROBIN uses the first address"
    );
    // No endpoints: the hosts are the names.
    let mut hosts = entry(crd::Resolution::Dns, &[]);
    assert_eq!(names(&hosts), vec!["db.example"]);
    expand(&mut hosts, &answers);
    assert_eq!(addrs(&hosts)[0].0, "198.18.3.2");
    // Other resolutions are left alone.
    let mut fixed = entry(crd::Resolution::Static, &["a.internal"]);
    assert!(names(&fixed).is_empty());
    expand(&mut fixed, &answers);
    assert_eq!(addrs(&fixed)[0].0, "a.internal");
}
