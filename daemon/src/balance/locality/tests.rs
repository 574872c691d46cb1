//! Plans for the cases istiod's locality code distinguishes: default priorities, `failover`
//! demotion, `failoverPriority` prefixes, `distribute` weights and exclusion, and the cases that
//! change nothing.

use super::*;

fn setting() -> LocalityLb {
    LocalityLb {
        enabled: None,
        distribute: Vec::new(),
        failover: Vec::new(),
        failover_priority: Vec::new(),
    }
}

fn places<'a>(locs: &'a [&'a str], labels: &'a BTreeMap<String, String>) -> Vec<Place<'a>> {
    locs.iter()
        .map(|l| Place {
            locality: l,
            labels,
            weight: 1,
        })
        .collect()
}

fn levels(p: &Plan) -> Vec<Vec<usize>> {
    p.levels
        .iter()
        .map(|g| g.iter().flat_map(|g| g.members.clone()).collect())
        .collect()
}

#[test]
fn default_priorities_follow_region_zone_subzone_and_need_outlier_detection() {
    let none = BTreeMap::new();
    let client = Place {
        locality: "us/us-1/a",
        labels: &none,
        weight: 1,
    };
    let locs = [
        "eu/eu-1/a",
        "us/us-1/a",
        "us/us-2/a",
        "us/us-1/b",
        "us/us-1/a",
    ];
    let ms = places(&locs, &none);
    let p = Plan::new(None, true, client, &ms).unwrap();
    assert_eq!(levels(&p), vec![vec![1, 4], vec![3], vec![2], vec![0]]);
    assert_eq!(p.placement(2), Some((2, 0)));
    // Without outlier detection, or turned off, or with an unknown client locality: no plan.
    assert!(Plan::new(None, false, client, &ms).is_none());
    let off = LocalityLb {
        enabled: Some(false),
        ..setting()
    };
    assert!(Plan::new(Some(&off), true, client, &ms).is_none());
    let nowhere = Place {
        locality: "",
        ..client
    };
    assert!(Plan::new(None, true, nowhere, &ms).is_none());
    // Everything in one locality: nothing to do.
    let same = places(&["us/us-1/a", "us/us-1/a"], &none);
    assert!(Plan::new(None, true, client, &same).is_none());
}

#[test]
fn failover_demotes_other_regions_below_the_named_one() {
    let none = BTreeMap::new();
    let client = Place {
        locality: "us/us-1",
        labels: &none,
        weight: 1,
    };
    let s = LocalityLb {
        failover: vec![("us".into(), "eu".into())],
        ..setting()
    };
    let ms = places(&["ap/ap-1", "eu/eu-1", "us/us-1", "us/us-2"], &none);
    let p = Plan::new(Some(&s), true, client, &ms).unwrap();
    assert_eq!(levels(&p), vec![vec![2], vec![3], vec![1], vec![0]]);
    assert_eq!(p.reason, "failover");
    // A client in another region is not affected by the `us` entry.
    let eu = Place {
        locality: "eu/eu-1",
        ..client
    };
    let p = Plan::new(Some(&s), true, eu, &ms).unwrap();
    assert_eq!(levels(&p), vec![vec![1], vec![0, 2, 3]]);
}

#[test]
fn failover_priority_counts_the_matching_prefix() {
    let mk = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let client_labels = mk(&[("tier", "gold"), ("rack", "r1")]);
    let client = Place {
        locality: "us/us-1",
        labels: &client_labels,
        weight: 1,
    };
    let eps = [
        mk(&[("tier", "gold"), ("rack", "r1")]),
        mk(&[("tier", "gold"), ("rack", "r2")]),
        mk(&[("tier", "silver"), ("rack", "r1")]),
        mk(&[("rack", "r1")]),
    ];
    let ms: Vec<Place<'_>> = eps
        .iter()
        .map(|l| Place {
            locality: "us/us-1",
            labels: l,
            weight: 1,
        })
        .collect();
    let s = LocalityLb {
        failover_priority: vec!["tier".into(), "rack".into()],
        ..setting()
    };
    let p = Plan::new(Some(&s), true, client, &ms).unwrap();
    // Both match: 0; only `tier`: 1; `tier` differs (the later `rack` match does not count): 2.
    assert_eq!(levels(&p), vec![vec![0], vec![1], vec![2, 3]]);
    // `key=value` compares with the fixed value, and the topology keys read the locality.
    let s = LocalityLb {
        failover_priority: vec!["tier=silver".into(), ZONE.to_string()],
        ..setting()
    };
    let p = Plan::new(Some(&s), true, client, &ms).unwrap();
    assert_eq!(levels(&p), vec![vec![2], vec![0, 1, 3]]);
}

#[test]
fn distribute_weights_localities_and_excludes_the_unlisted() {
    let none = BTreeMap::new();
    let client = Place {
        locality: "us/us-1/a",
        labels: &none,
        weight: 1,
    };
    let s = LocalityLb {
        distribute: vec![
            ("eu/*".into(), BTreeMap::from([("eu/*".into(), 100)])),
            (
                "us/us-1/*".into(),
                BTreeMap::from([("us/us-1/*".into(), 80), ("us/us-2/*".into(), 20)]),
            ),
        ],
        ..setting()
    };
    let locs = [
        "us/us-1/a",
        "us/us-1/b",
        "us/us-1/b",
        "us/us-2/a",
        "eu/eu-1/a",
    ];
    let ms = places(&locs, &none);
    // Works without outlier detection.
    let p = Plan::new(Some(&s), false, client, &ms).unwrap();
    assert!(p.weighted);
    assert_eq!(p.reason, "distribute from \"us/us-1/*\"");
    // `us/us-1/*` matches two localities of weights 1 and 2: 80 splits into ⌈80/3⌉ and ⌈160/3⌉.
    assert_eq!(p.placement(0), Some((0, 27)));
    assert_eq!(p.placement(1), Some((0, 54)));
    assert_eq!(p.placement(3), Some((0, 20)));
    assert_eq!(p.excluded, vec![4]);
    assert_eq!(p.placement(4), None);
    // No `from` matches the client: no change.
    let ap = Place {
        locality: "ap/ap-1",
        ..client
    };
    assert!(Plan::new(Some(&s), true, ap, &ms).is_none());
}
