//! Locality-aware grouping of a cluster's endpoints, as istiod writes it into Envoy's EDS for
//! one client: failover priorities (`failover`, `failoverPriority`, or the default
//! region/zone/subzone order) and locality weights (`distribute`).
//!
//! Invariants: a [`Plan`] is computed once per cluster snapshot from the client's and the
//! endpoints' localities and labels, and is pure (no clock, no randomness). Priorities are
//! compacted to `0..levels`; every member is either in exactly one group or excluded
//! (`distribute` gives its locality no traffic). A trivial grouping (one level, one group, no
//! exclusion) yields no plan at all, so the balancer keeps its flat path.

use std::collections::BTreeMap;

use crate::config::policy::LocalityLb;

/// What the plan needs to know of one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    /// `region/zone/subzone` (missing segments empty).
    pub locality: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub weight: u32,
}

/// The grouping: priority levels, each with its locality groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `levels[p]` = the groups of priority `p`.
    pub levels: Vec<Vec<Group>>,
    /// True when groups carry `distribute` weights (Envoy's locality-weighted balancing); false
    /// when each level is one group balanced as a whole.
    pub weighted: bool,
    /// Members that get no traffic (their locality is not in the matching `distribute` entry).
    pub excluded: Vec<usize>,
    /// Why: `failover`, `failoverPriority`, `distribute from …` or `region/zone/subzone`.
    pub reason: String,
}

/// Endpoints of one locality (or of a whole level) and their share of the level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub locality: String,
    /// Locality weight (Envoy's `load_balancing_weight` of the locality); 0 when unweighted.
    pub weight: u32,
    pub members: Vec<usize>,
}

/// Special `failoverPriority` keys whose values come from the locality.
const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";
const SUBZONE: &str = "topology.istio.io/subzone";

impl Plan {
    /// The plan for a client at `client` (locality, labels) under `setting` (`None`: the mesh
    /// default, `{enabled: true}`). Failover (any priority but 0) is only programmed when
    /// `failover_ok` (the cluster has `outlierDetection`), as istiod does; `distribute` applies
    /// without it. `None` when locality changes nothing for this client.
    pub fn new(
        setting: Option<&LocalityLb>,
        failover_ok: bool,
        client: Place<'_>,
        members: &[Place<'_>],
    ) -> Option<Plan> {
        let default = LocalityLb {
            enabled: None,
            distribute: Vec::new(),
            failover: Vec::new(),
            failover_priority: Vec::new(),
        };
        let s = setting.unwrap_or(&default);
        if s.enabled == Some(false) || client.locality.is_empty() || members.is_empty() {
            return None;
        }
        let plan = if !s.distribute.is_empty() {
            distribute(s, client, members)?
        } else if failover_ok {
            failover(s, client, members)
        } else {
            return None;
        };
        let trivial =
            plan.levels.len() == 1 && plan.levels[0].len() == 1 && plan.excluded.is_empty();
        (!trivial).then_some(plan)
    }

    /// (priority, locality weight) of member `m`, or `None` when it is excluded.
    pub fn placement(&self, m: usize) -> Option<(usize, u32)> {
        self.levels.iter().enumerate().find_map(|(p, groups)| {
            groups
                .iter()
                .find(|g| g.members.contains(&m))
                .map(|g| (p, g.weight))
        })
    }
}

/// `region/zone/subzone` split into its three segments (missing ones empty).
fn segments(locality: &str) -> [&str; 3] {
    let mut it = locality.split('/');
    [
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
        it.next().unwrap_or(""),
    ]
}

/// Istio's locality match: `*` or a missing segment of `rule` matches anything (the region
/// must be given).
fn matches(locality: &str, rule: &str) -> bool {
    let (l, r) = (segments(locality), segments(rule));
    (r[0] == "*" || l[0] == r[0])
        && (r[1] == "*" || r[1].is_empty() || l[1] == r[1])
        && (r[2] == "*" || r[2].is_empty() || l[2] == r[2])
}

/// `distribute`: the first entry whose `from` matches the client rewrites locality weights;
/// localities no `to` entry names get no traffic. A wildcard `to` splits its weight over the
/// localities it matches by their own weights (the sum of their endpoints' weights), rounded up.
fn distribute(s: &LocalityLb, client: Place<'_>, members: &[Place<'_>]) -> Option<Plan> {
    let (from, to) = s
        .distribute
        .iter()
        .find(|(from, _)| matches(client.locality, from))?;
    let mut localities: BTreeMap<&str, (u32, Vec<usize>)> = BTreeMap::new();
    for (i, m) in members.iter().enumerate() {
        let e = localities.entry(m.locality).or_default();
        e.0 += m.weight.max(1);
        e.1.push(i);
    }
    let mut unclaimed: Vec<&str> = localities.keys().copied().collect();
    let mut groups = Vec::new();
    for (rule, weight) in to {
        let claimed: Vec<&str> = unclaimed
            .iter()
            .copied()
            .filter(|l| matches(l, rule))
            .collect();
        unclaimed.retain(|l| !claimed.contains(l));
        let total: u64 = claimed.iter().map(|l| u64::from(localities[l].0)).sum();
        for l in claimed {
            let (own, members) = &localities[l];
            let share = (u64::from(*own) * u64::from(*weight)).div_ceil(total.max(1));
            groups.push(Group {
                locality: l.to_string(),
                weight: share.max(1) as u32,
                members: members.clone(),
            });
        }
    }
    let excluded = unclaimed
        .iter()
        .flat_map(|l| localities[l].1.iter().copied())
        .collect();
    Some(Plan {
        levels: vec![groups],
        weighted: true,
        excluded,
        reason: format!("distribute from {from:?}"),
    })
}

/// Failover priorities, compacted to `0..n`: by `failoverPriority` labels when given (with
/// `failover`'s region order as the major key when both are set), else by region/zone/subzone
/// relative to the client with `failover` naming the first other region.
fn failover(s: &LocalityLb, client: Place<'_>, members: &[Place<'_>]) -> Plan {
    let labels = &s.failover_priority;
    let raw: Vec<u32> = members
        .iter()
        .map(|m| {
            let region = region_priority(s, client.locality, m.locality);
            if labels.is_empty() {
                locality_priority(client.locality, m.locality, region)
            } else if s.failover.is_empty() {
                label_priority(labels, client, *m)
            } else {
                // Same region first, then `failover`'s region, then the rest; labels order
                // endpoints within each.
                let tier = match region {
                    None => 0,
                    Some(3) => 1,
                    Some(_) => 2,
                };
                tier * (labels.len() as u32 + 1) + label_priority(labels, client, *m)
            }
        })
        .collect();
    let mut distinct = raw.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let levels = distinct
        .iter()
        .map(|p| {
            vec![Group {
                locality: String::new(),
                weight: 0,
                members: (0..members.len()).filter(|i| raw[*i] == *p).collect(),
            }]
        })
        .collect();
    let reason = match (labels.is_empty(), s.failover.is_empty()) {
        (true, true) => "region/zone/subzone",
        (true, false) => "failover",
        (false, true) => "failoverPriority",
        (false, false) => "failover + failoverPriority",
    };
    Plan {
        levels,
        weighted: false,
        excluded: Vec::new(),
        reason: reason.to_string(),
    }
}

/// For an endpoint outside the client's region: 3 when it is in the region `failover` names
/// for the client's region (or no `failover` entry applies), 4 otherwise. `None` in the client's
/// region.
fn region_priority(s: &LocalityLb, client: &str, endpoint: &str) -> Option<u32> {
    let (c, e) = (segments(client)[0], segments(endpoint)[0]);
    if c == e {
        return None;
    }
    Some(match s.failover.iter().find(|(from, _)| from == c) {
        Some((_, to)) if to != e => 4,
        _ => 3,
    })
}

/// 0 = same region, zone and subzone; 1 = same zone; 2 = same region; else `region`.
fn locality_priority(client: &str, endpoint: &str, region: Option<u32>) -> u32 {
    let (c, e) = (segments(client), segments(endpoint));
    match region {
        Some(p) => p,
        None if c[1] != e[1] => 2,
        None if c[2] != e[2] => 1,
        None => 0,
    }
}

/// `failoverPriority`: the number of labels, from the first, that match before the first
/// mismatch, counted down from `labels.len()` (all match: 0). `key` matches when the endpoint's
/// value equals the client's, `key=value` when the endpoint's value is `value`.
fn label_priority(labels: &[String], client: Place<'_>, endpoint: Place<'_>) -> u32 {
    let matched = labels
        .iter()
        .take_while(|l| match l.split_once('=') {
            Some((k, v)) => value(endpoint, k).is_some_and(|e| e == v),
            None => match (value(client, l), value(endpoint, l)) {
                (Some(c), Some(e)) => c == e,
                _ => false,
            },
        })
        .count();
    (labels.len() - matched) as u32
}

/// A `failoverPriority` key's value for a workload: the locality segment for the topology keys
/// (falling back to the label), else the label.
fn value<'a>(p: Place<'a>, key: &str) -> Option<&'a str> {
    let seg = segments(p.locality);
    let from_locality = match key {
        REGION => seg[0],
        ZONE => seg[1],
        SUBZONE => seg[2],
        _ => "",
    };
    if from_locality.is_empty() {
        p.labels.get(key).map(String::as_str)
    } else {
        Some(from_locality)
    }
}

#[cfg(test)]
mod tests;
