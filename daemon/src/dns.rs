//! DNS for ServiceEntries with `resolution: DNS` and `DNS_ROUND_ROBIN`, as Envoy's STRICT_DNS and
//! LOGICAL_DNS clusters resolve them: the names are an entry's endpoint addresses that are not IP
//! addresses, or its hosts when it lists no endpoints; each answer becomes endpoints (every
//! address for `DNS`, the first one for `DNS_ROUND_ROBIN`).
//!
//! Invariants: names are resolved by a real resolver (hickory) in a background task that asks
//! again when an answer's TTL runs out (at least [`MIN_REFRESH`] apart) and after a failure
//! ([`FAILURE_RETRY`]); a failure keeps the last good answer; a changed answer triggers a reload
//! (which keeps open connections). Rewriting a configuration ([`Dns::expand`]) is pure given the
//! current answers, and leaves a name without an answer yet without endpoints.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfigGroup, ResolverConfig, ResolverOpts},
    name_server::TokioConnectionProvider,
};
use tokio::{sync::watch, time::Instant};

use crate::config::{crd, source::ConfigSet};

/// The shortest wait between two resolutions of a name (a TTL of 0 is not a busy loop).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The wait before asking again after a failure (Envoy's default `dns_failure_refresh_rate`).
pub const FAILURE_RETRY: Duration = Duration::from_secs(5);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("system DNS configuration: {0}")]
    System(String),
}

/// The resolver and its answers; cheap to clone.
#[derive(Clone)]
pub struct Dns {
    answers: Arc<Mutex<BTreeMap<String, Vec<IpAddr>>>>,
    wanted: watch::Sender<BTreeSet<String>>,
    /// Called when an answer changed (the reloader, once it runs).
    on_change: Arc<OnceLock<Box<dyn Fn() + Send + Sync>>>,
}

impl Dns {
    /// Starts the resolver task, asking `servers` (or the system's resolvers when empty).
    pub fn spawn(servers: &[SocketAddr]) -> Result<Self, Error> {
        let resolver = resolver(servers)?;
        let (wanted, rx) = watch::channel(BTreeSet::new());
        let dns = Self {
            answers: Arc::default(),
            wanted,
            on_change: Arc::default(),
        };
        tokio::spawn(dns.clone().run(resolver, rx));
        Ok(dns)
    }

    /// Runs `f` whenever an answer changes, and once now if answers arrived before (the first
    /// configuration was built without them).
    pub fn on_change(&self, f: impl Fn() + Send + Sync + 'static) {
        let answered = !self
            .answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if self.on_change.set(Box::new(f)).is_ok()
            && answered
            && let Some(f) = self.on_change.get()
        {
            f();
        }
    }

    /// Rewrites the DNS ServiceEntries of `set` with the current answers, and makes their names
    /// the ones the task resolves.
    pub fn expand(&self, set: &mut ConfigSet) {
        let names: BTreeSet<String> = set
            .service_entries
            .iter()
            .flat_map(|se| names(&se.spec))
            .collect();
        self.wanted.send_if_modified(|w| {
            let changed = *w != names;
            *w = names;
            changed
        });
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        for se in &mut set.service_entries {
            expand(&mut se.spec, &answers);
        }
    }

    async fn run(self, resolver: TokioResolver, mut wanted: watch::Receiver<BTreeSet<String>>) {
        let mut due: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            let names = wanted.borrow_and_update().clone();
            due.retain(|n, _| names.contains(n));
            for n in &names {
                due.entry(n.clone()).or_insert_with(Instant::now);
            }
            let next = due.values().min().copied();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = wanted.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
                () = sleep => {}
            }
            let now = Instant::now();
            let ready: Vec<String> = (due.iter())
                .filter(|(_, at)| **at <= now)
                .map(|(n, _)| n.clone())
                .collect();
            for name in ready {
                let at = self.resolve(&resolver, &name).await;
                due.insert(name, at);
            }
        }
    }

    /// Resolves `name` once: records a changed answer (and says so), keeps the last good one on
    /// failure. Returns when to ask again.
    async fn resolve(&self, resolver: &TokioResolver, name: &str) -> Instant {
        match resolver.lookup_ip(format!("{name}.")).await {
            Ok(found) => {
                let mut addrs: Vec<IpAddr> = found.iter().map(|a| a.to_canonical()).collect();
                addrs.sort();
                addrs.dedup();
                let until = Instant::from_std(found.valid_until());
                let changed = {
                    let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
                    answers.insert(name.to_string(), addrs.clone()) != Some(addrs.clone())
                };
                if changed {
                    tracing::info!(name, addresses = ?addrs, "DNS answer changed");
                    if let Some(f) = self.on_change.get() {
                        f();
                    }
                }
                until.max(Instant::now() + MIN_REFRESH)
            }
            Err(e) => {
                tracing::warn!(name, error = %e, "DNS resolution failed; keeping the last answer");
                Instant::now() + FAILURE_RETRY
            }
        }
    }
}

/// A resolver asking `servers` (plain UDP/TCP, port included), or the system's; no cache, so
/// that each refresh sees the server's current answer and TTL.
fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver, Error> {
    let (config, mut opts) = if servers.is_empty() {
        hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| Error::System(e.to_string()))?
    } else {
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            group.merge(NameServerConfigGroup::from_ips_clear(
                &[s.ip()],
                s.port(),
                true,
            ));
        }
        (
            ResolverConfig::from_parts(None, vec![], group),
            ResolverOpts::default(),
        )
    };
    opts.cache_size = 0;
    opts.attempts = 1;
    opts.timeout = Duration::from_secs(2);
    Ok(
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(opts)
            .build(),
    )
}

/// Whether an entry's endpoints come from DNS.
fn resolved(spec: &crd::ServiceEntrySpec) -> bool {
    matches!(
        spec.resolution,
        crd::Resolution::Dns | crd::Resolution::DnsRoundRobin
    )
}

/// The names a DNS entry needs: its endpoints' non-IP addresses, or its (non-wildcard) hosts when
/// it lists none.
fn names(spec: &crd::ServiceEntrySpec) -> Vec<String> {
    if !resolved(spec) {
        return Vec::new();
    }
    if spec.endpoints.is_empty() {
        return (spec.hosts.iter())
            .filter(|h| !h.starts_with('*'))
            .cloned()
            .collect();
    }
    (spec.endpoints.iter())
        .filter(|e| e.address.parse::<IpAddr>().is_err())
        .map(|e| e.address.clone())
        .collect()
}

/// A DNS entry with each name replaced by its answer's addresses (all of them for `DNS`, the
/// first for `DNS_ROUND_ROBIN`), each endpoint noting the name it came from.
fn expand(spec: &mut crd::ServiceEntrySpec, answers: &BTreeMap<String, Vec<IpAddr>>) {
    if !resolved(spec) {
        return;
    }
    let templates: Vec<crd::WorkloadEntrySpec> = if spec.endpoints.is_empty() {
        names(spec)
            .into_iter()
            .map(|address| crd::WorkloadEntrySpec {
                address,
                ..Default::default()
            })
            .collect()
    } else {
        std::sync::Arc::unwrap_or_clone(std::mem::take(&mut spec.endpoints))
    };
    let first_only = spec.resolution == crd::Resolution::DnsRoundRobin;
    spec.endpoints = std::sync::Arc::new(
        templates
            .into_iter()
            .flat_map(|t| {
                if t.address.parse::<IpAddr>().is_ok() {
                    return vec![t];
                }
                let found = answers.get(&t.address).cloned().unwrap_or_default();
                let take = if first_only { 1 } else { found.len() };
                found
                    .into_iter()
                    .take(take)
                    .map(|ip| crd::WorkloadEntrySpec {
                        address: ip.to_string(),
                        origin: Some(format!("DNS {}", t.address)),
                        ..t.clone()
                    })
                    .collect()
            })
            .collect(),
    );
}

#[cfg(test)]
mod tests;
