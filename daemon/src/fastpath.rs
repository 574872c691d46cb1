//! The kernel fast path: which captured (VIP, port)s the kernel balances inside `connect()`
//! itself (no proxy hop), and the endpoint tables it balances them with.
//!
//! Responsibility: decide eligibility per VIP from the resolved snapshot (plain TCP, no TLS
//! origination, only policy the kernel enforces exactly — see [`eligible`]), build each table
//! (subsets, route weights and endpoint weights folded into one ring; outlier ejections left
//! out), and keep the kernel's tables equal to that while the daemon runs: after every reload,
//! after every connect outcome the kernel reports, and on the ejection sweep.
//!
//! Invariants: table building is pure (a snapshot in, tables out); a VIP is fast only when every
//! workload's snapshot yields the same table for it; anything not enforced in the kernel keeps
//! the VIP on the proxied path, with the reason `drover explain` prints.

pub mod run;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use drover_common::{
    FastEndpoint, FastTable,
    fast::{self, lb},
};

use crate::{
    balance::key_hash,
    config::policy::{self, Algorithm, HashKey, TlsMode, UNLIMITED},
    registry::{Cluster, Registry, Resolution, route},
};

/// Whether the kernel may balance eligible VIPs itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Eligible plain-TCP services are balanced in `connect()`.
    Auto,
    /// Every captured connection goes through the proxy (the default: see the README for the
    /// differences of the fast path).
    #[default]
    Off,
}

/// The idle timeout Istio applies when none is set; the fast path does not enforce it.
const DEFAULT_IDLE: Duration = Duration::from_secs(3600);

/// The destinations of a fast-path VIP: (cluster, route weight), or why it stays proxied.
pub fn eligible(reg: &Registry, vip: SocketAddr) -> Result<Vec<(&Cluster, u32)>, String> {
    let (_, port) = reg.lookup(vip).ok_or("not a captured VIP")?;
    match port.protocol.as_deref() {
        None | Some("TCP") => {}
        Some(p) => return Err(format!("port protocol {p} (only TCP ports)")),
    }
    if route::is_tls(port.protocol.as_deref()) {
        return Err("TLS port".into());
    }
    let dests = reg.tcp_destinations(vip).map_err(|e| e.to_string())?;
    let mut kinds = Vec::new();
    for (c, _) in &dests {
        cluster_eligible(c).map_err(|why| format!("{}: {why}", c.name))?;
        kinds.push(lb_kind(reg, c)?);
    }
    kinds.dedup();
    if kinds.len() > 1 {
        return Err("route destinations balance with different algorithms".into());
    }
    if dests.len() > 1 && matches!(kinds[0], lb::HASH | lb::PASSTHROUGH) {
        return Err("a weighted route to a hashing or passthrough cluster".into());
    }
    let members: usize = dests.iter().map(|(c, _)| c.members.len()).sum();
    if members > fast::MAX_ENDPOINTS {
        return Err(format!(
            "{members} endpoints (the kernel table holds {})",
            fast::MAX_ENDPOINTS
        ));
    }
    if !dests
        .iter()
        .flat_map(|(c, _)| &c.members)
        .all(|m| m.addr.is_ipv4())
        && !dests
            .iter()
            .flat_map(|(c, _)| &c.members)
            .all(|m| m.addr.is_ipv6())
    {
        return Err("endpoints of both address families".into());
    }
    Ok(dests)
}

/// Why `c`'s policy needs the proxy, if it does.
fn cluster_eligible(c: &Cluster) -> Result<(), String> {
    let p = &c.policy;
    if let Some(tls) = &p.tls.value
        && tls.mode != TlsMode::Disable
    {
        return Err("tls origination".into());
    }
    if c.tls.is_some()
        || c.hbone.is_some()
        || (c.auto_tls.is_some() && c.members.iter().any(|m| m.mesh))
    {
        return Err("auto mTLS or HBONE to mesh endpoints".into());
    }
    if p.tunnel.value.is_some() {
        return Err("tunnel".into());
    }
    if p.proxy_protocol.value.is_some() {
        return Err("proxyProtocol".into());
    }
    if let Some(pool) = &p.connection_pool.value {
        if pool.tcp_keepalive.is_some() {
            return Err("connectionPool.tcp.tcpKeepalive".into());
        }
        if pool.max_connection_duration.is_some() {
            return Err("connectionPool.tcp.maxConnectionDuration".into());
        }
        if pool.tcp_idle_timeout != DEFAULT_IDLE {
            return Err("connectionPool.tcp.idleTimeout".into());
        }
    }
    if let Some(lb) = &p.load_balancer.value
        && lb.warmup.is_some()
    {
        return Err("loadBalancer.warmup".into());
    }
    if let Some(plan) = c.balancer.plan()
        && (plan.levels.len() > 1
            || plan.levels.first().is_some_and(|l| l.len() > 1)
            || plan.weighted
            || !plan.excluded.is_empty())
    {
        return Err(format!("locality-aware balancing ({})", plan.reason));
    }
    Ok(())
}

/// The name of a [`lb`] value, as Istio spells the algorithm.
pub fn lb_name(lb: u32) -> &'static str {
    match lb {
        lb::ROUND_ROBIN => "ROUND_ROBIN",
        lb::RANDOM => "RANDOM",
        lb::LEAST_REQUEST => "LEAST_REQUEST (two random choices)",
        lb::HASH => "consistentHash useSourceIp (Maglev)",
        _ => "PASSTHROUGH",
    }
}

/// The kernel's algorithm for `c`.
fn lb_kind(reg: &Registry, c: &Cluster) -> Result<u32, String> {
    if reg.services()[c.service].resolution == Resolution::None {
        return Ok(lb::PASSTHROUGH);
    }
    let algorithm = c
        .policy
        .load_balancer
        .value
        .as_ref()
        .map_or(&Algorithm::LeastRequest, |l| &l.algorithm);
    Ok(match algorithm {
        Algorithm::LeastRequest => lb::LEAST_REQUEST,
        Algorithm::RoundRobin => lb::ROUND_ROBIN,
        Algorithm::Random => lb::RANDOM,
        Algorithm::Passthrough => lb::PASSTHROUGH,
        Algorithm::ConsistentHash(policy::ConsistentHash {
            key: HashKey::SourceIp,
            ..
        }) => lb::HASH,
        Algorithm::ConsistentHash(_) => {
            return Err("consistentHash on a key other than useSourceIp".into());
        }
    })
}

/// The table for `vip` in `reg`; with `ejections`, members the outlier detector ejected are left
/// out (all of them when the cluster is in panic mode, as the proxied path does).
pub fn table(reg: &Registry, vip: SocketAddr, ejections: bool) -> Result<FastTable, String> {
    let dests = eligible(reg, vip)?;
    let (first, _) = dests[0];
    let mut t = FastTable {
        lb: lb_kind(reg, first)?,
        ..FastTable::default()
    };
    let pool = first
        .policy
        .connection_pool
        .value
        .clone()
        .unwrap_or_default();
    t.connect_timeout_ms = pool.connect_timeout.as_millis().min(u32::MAX as u128) as u32;
    if dests.iter().any(|(c, _)| c.outlier.is_some()) {
        t.flags |= fast::flags::OUTCOMES;
    }
    if t.lb == lb::PASSTHROUGH {
        let svc = &reg.services()[first.service];
        let port = svc.ports.iter().find(|p| p.number == first.port);
        t.endpoints[0] = FastEndpoint {
            port_be: port.map_or(vip.port(), |p| p.target_port).to_be(),
            cluster_id: first.stats.id,
            max_connections: cap(first),
            ..FastEndpoint::default()
        };
        t.n = 1;
        return Ok(t);
    }
    let mut weights: Vec<f64> = Vec::new();
    for (c, route_weight) in &dests {
        let live = match (&c.outlier, ejections) {
            (Some(od), true) => od.eligible_members(),
            _ => vec![true; c.members.len()],
        };
        let eps = &reg.services()[c.service].endpoints;
        let total: f64 = (c.members.iter())
            .zip(&live)
            .filter(|(_, l)| **l)
            .map(|(m, _)| f64::from(eps[m.endpoint].weight.max(1)))
            .sum();
        for (m, _) in c.members.iter().zip(&live).filter(|(_, l)| **l) {
            let i = t.n as usize;
            t.endpoints[i] = endpoint(m.addr, c);
            t.n += 1;
            let share = f64::from(eps[m.endpoint].weight.max(1)) / total;
            weights.push(f64::from((*route_weight).max(1)) * share);
        }
    }
    let ring = if t.lb == lb::HASH {
        let keys: Vec<String> = (0..t.n as usize)
            .map(|i| endpoint_addr(&t.endpoints[i]).to_string())
            .collect();
        maglev(&weights, &keys, fast::HASH_RING as usize)
    } else {
        schedule(&weights)
    };
    t.ring_len = ring.len() as u32;
    t.ring[..ring.len()].copy_from_slice(&ring);
    Ok(t)
}

fn cap(c: &Cluster) -> u32 {
    let max = c
        .policy
        .connection_pool
        .value
        .as_ref()
        .map_or(UNLIMITED, |p| p.max_connections);
    if max == UNLIMITED { 0 } else { max }
}

fn endpoint(addr: SocketAddr, c: &Cluster) -> FastEndpoint {
    let (words, family) = match addr.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 4),
        std::net::IpAddr::V6(v6) => (v6.octets(), 6),
    };
    let mut w = [0u32; 4];
    for (i, chunk) in words.chunks(4).enumerate() {
        w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    FastEndpoint {
        addr: w,
        port_be: addr.port().to_be(),
        family,
        cluster_id: c.stats.id,
        max_connections: cap(c),
        ..FastEndpoint::default()
    }
}

/// The address a table entry dials.
pub fn endpoint_addr(e: &FastEndpoint) -> SocketAddr {
    crate::redirect::words_addr(e.addr, e.port_be)
}

/// A smooth weighted round-robin sequence over endpoints with these weights: each endpoint
/// appears in proportion to its weight, spread out (equal weights give plain rotation, one
/// slot each). At most [`fast::RING`] slots.
pub fn schedule(weights: &[f64]) -> Vec<u8> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let max = weights.iter().cloned().fold(0.0, f64::max);
    let equal = weights.iter().all(|w| (w - max).abs() < 1e-9);
    let len = if equal { n } else { fast::RING };
    // Slots per endpoint by largest remainder, at least one each.
    let total: f64 = weights.iter().sum();
    let spare = len - n;
    let exact: Vec<f64> = weights.iter().map(|w| w / total * spare as f64).collect();
    let mut slots: Vec<usize> = exact.iter().map(|e| 1 + e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| {
        (exact[*b] - exact[*b].floor()).total_cmp(&(exact[*a] - exact[*a].floor()))
    });
    let mut left = len - slots.iter().sum::<usize>();
    for i in order {
        if left == 0 {
            break;
        }
        slots[i] += 1;
        left -= 1;
    }
    // Smooth weighted round robin over the slot counts.
    let mut current = vec![0i64; n];
    let sum = len as i64;
    (0..len)
        .map(|_| {
            for (c, s) in current.iter_mut().zip(&slots) {
                *c += *s as i64;
            }
            let best = (0..n)
                .max_by_key(|i| (current[*i], -(*i as i64)))
                .unwrap_or(0);
            current[best] -= sum;
            best as u8
        })
        .collect()
}

/// A Maglev lookup table of `size` (prime) slots: each endpoint fills slots along its own
/// permutation (offset and skip from its key's hash), taking turns in proportion to its weight.
pub fn maglev(weights: &[f64], keys: &[String], size: usize) -> Vec<u8> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let perm: Vec<(usize, usize)> = keys
        .iter()
        .map(|k| {
            let h = key_hash(k.as_bytes());
            let offset = (h % size as u64) as usize;
            let skip = ((h >> 32) % (size as u64 - 1) + 1) as usize;
            (offset, skip)
        })
        .collect();
    let max = weights.iter().cloned().fold(0.0, f64::max);
    let mut next = vec![0usize; n];
    let mut credit = vec![0f64; n];
    let mut table: Vec<Option<u8>> = vec![None; size];
    let mut filled = 0;
    while filled < size {
        for i in 0..n {
            credit[i] += weights[i] / max;
            if credit[i] < 1.0 {
                continue;
            }
            credit[i] -= 1.0;
            let (offset, skip) = perm[i];
            loop {
                let slot = (offset + next[i] * skip) % size;
                next[i] += 1;
                if table[slot].is_none() {
                    table[slot] = Some(i as u8);
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break;
            }
        }
    }
    table.into_iter().map(|s| s.unwrap_or(0)).collect()
}

/// The fast-path decision for every captured VIP of these snapshots (the first one is the
/// primary: its detectors decide ejections): the tables to publish, and why the others stay
/// proxied.
pub fn plan(
    snapshots: &[Arc<Registry>],
) -> (Vec<(SocketAddr, FastTable)>, HashMap<SocketAddr, String>) {
    let mut tables = Vec::new();
    let mut proxied = HashMap::new();
    let Some(primary) = snapshots.first() else {
        return (tables, proxied);
    };
    for (vip, _) in primary.vips() {
        let decided = table(primary, vip, true).and_then(|t| {
            let bare = table(primary, vip, false)?;
            let same = snapshots[1..]
                .iter()
                .all(|s| table(s, vip, false).is_ok_and(|o| o == bare));
            if same {
                Ok(t)
            } else {
                Err("workloads resolve different policy for it".into())
            }
        });
        match decided {
            Ok(t) => tables.push((vip, t)),
            Err(why) => {
                proxied.insert(vip, why);
            }
        }
    }
    (tables, proxied)
}

#[cfg(test)]
mod tests;
