//! Which `PeerAuthentication` applies to the workload a snapshot serves, composed as Istio does:
//! the mesh-wide policy (root namespace, no selector), then the workload's namespace-wide policy,
//! then a policy of its namespace whose selector matches its labels; a mode that is `UNSET`
//! inherits the scope above, and a port-level mode overrides the result for that port. When
//! several policies compete at one level, the oldest (creation time, then name) wins.
//!
//! Invariant: pure; `None` means no policy sets a mode and the daemon's `--peer-authentication`
//! applies (Istio's own default is PERMISSIVE).

use std::collections::BTreeMap;

use super::resolve::{Client, selects};
use crate::config::{policy, validate::peer_authentication::ROOT_NAMESPACE};

/// A validated `PeerAuthentication` with its identity and age.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    pub policy: policy::PeerAuthentication,
    /// `namespace/name`.
    pub id: String,
    pub namespace: String,
    /// (creation timestamp, name): older first.
    pub age: (String, String),
}

/// The inbound mTLS of one workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InboundMtls {
    /// The mode of ports without their own; `None`: no policy sets one.
    pub mode: Option<policy::MtlsMode>,
    /// Port-level modes.
    pub ports: BTreeMap<u16, policy::MtlsMode>,
    /// The policies that applied, mesh-wide first, as `namespace/name`.
    pub from: Vec<String>,
}

// === impl InboundMtls ===

impl InboundMtls {
    /// Composes the policies of `entries` that apply to `client`.
    pub fn resolve(entries: &[PeerEntry], client: &Client) -> Self {
        let oldest = |pick: &dyn Fn(&PeerEntry) -> bool| {
            entries
                .iter()
                .filter(|e| pick(e))
                .min_by(|a, b| a.age.cmp(&b.age))
        };
        let wide = |e: &PeerEntry| e.policy.selector.as_ref().is_none_or(BTreeMap::is_empty);
        let mesh = oldest(&|e| e.namespace == ROOT_NAMESPACE && wide(e));
        let namespace = oldest(&|e| {
            e.namespace == client.namespace && client.namespace != ROOT_NAMESPACE && wide(e)
        });
        let workload = oldest(&|e| {
            e.namespace == client.namespace
                && client.namespace != ROOT_NAMESPACE
                && !wide(e)
                && e.policy
                    .selector
                    .as_ref()
                    .is_some_and(|s| selects(s, &client.labels))
        });
        let mut out = InboundMtls::default();
        for e in [mesh, namespace, workload].into_iter().flatten() {
            out.from.push(e.id.clone());
            if let Some(m) = e.policy.mode {
                out.mode = Some(m);
            }
        }
        if let Some(w) = workload {
            // An UNSET port takes the workload's composed mode.
            out.ports = (w.policy.ports.iter())
                .filter_map(|(p, m)| Some((*p, m.or(out.mode)?)))
                .collect();
        }
        out
    }

    /// The mode of connections to workload port `port`, `None` when no policy sets one.
    pub fn mode(&self, port: u16) -> Option<policy::MtlsMode> {
        self.ports.get(&port).copied().or(self.mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::MtlsMode::{Disable, Permissive, Strict};

    fn entry(
        ns: &str,
        name: &str,
        created: &str,
        selector: Option<&[(&str, &str)]>,
        mode: Option<policy::MtlsMode>,
        ports: &[(u16, Option<policy::MtlsMode>)],
    ) -> PeerEntry {
        PeerEntry {
            policy: policy::PeerAuthentication {
                selector: selector.map(|s| {
                    s.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                mode,
                ports: ports.iter().copied().collect(),
            },
            id: format!("{ns}/{name}"),
            namespace: ns.into(),
            age: (created.into(), name.into()),
        }
    }

    fn client(ns: &str, labels: &[(&str, &str)]) -> Client {
        Client {
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            workload: None,
            locality: String::new(),
        }
    }

    #[test]
    fn nothing_applies_without_policies_or_in_other_namespaces() {
        let other = [entry("other", "default", "", None, Some(Strict), &[])];
        let m = InboundMtls::resolve(&other, &client("foo", &[]));
        assert_eq!(m, InboundMtls::default());
        assert_eq!(m.mode(80), None);
    }

    #[test]
    fn namespace_overrides_mesh_and_workload_overrides_namespace() {
        let set = [
            entry(ROOT_NAMESPACE, "mesh", "", None, Some(Strict), &[]),
            entry("foo", "ns", "", None, Some(Permissive), &[]),
            entry(
                "foo",
                "fin",
                "",
                Some(&[("app", "finance")]),
                Some(Strict),
                &[],
            ),
        ];
        let plain = InboundMtls::resolve(&set, &client("foo", &[("app", "web")]));
        assert_eq!(plain.mode(80), Some(Permissive));
        assert_eq!(plain.from, ["istio-system/mesh", "foo/ns"]);
        let fin = InboundMtls::resolve(&set, &client("foo", &[("app", "finance")]));
        assert_eq!(fin.mode(80), Some(Strict));
        assert_eq!(fin.from, ["istio-system/mesh", "foo/ns", "foo/fin"]);
        let bar = InboundMtls::resolve(&set, &client("bar", &[("app", "finance")]));
        assert_eq!(bar.mode(80), Some(Strict), "mesh-wide only");
    }

    #[test]
    fn unset_inherits_and_port_levels_override() {
        let set = [
            entry("foo", "ns", "", None, Some(Strict), &[]),
            entry(
                "foo",
                "fin",
                "",
                Some(&[("app", "finance")]),
                None,
                &[(8080, Some(Disable)), (9090, None)],
            ),
        ];
        let m = InboundMtls::resolve(&set, &client("foo", &[("app", "finance")]));
        assert_eq!(m.mode(80), Some(Strict), "UNSET inherits the namespace's");
        assert_eq!(m.mode(8080), Some(Disable));
        assert_eq!(m.mode(9090), Some(Strict), "an UNSET port inherits too");
        // With nothing above, an UNSET port stays unset (the daemon's default).
        let alone = InboundMtls::resolve(&set[1..], &client("foo", &[("app", "finance")]));
        assert_eq!(alone.mode(80), None);
        assert_eq!(alone.mode(9090), None);
        assert_eq!(alone.mode(8080), Some(Disable));
    }

    #[test]
    fn the_oldest_wins_and_root_namespace_selectors_are_ignored() {
        let set = [
            entry("foo", "b", "2026-01-02T00:00:00Z", None, Some(Strict), &[]),
            entry("foo", "a", "2026-01-03T00:00:00Z", None, Some(Disable), &[]),
            entry(
                "foo",
                "c",
                "2026-01-02T00:00:00Z",
                None,
                Some(Permissive),
                &[],
            ),
            entry(
                ROOT_NAMESPACE,
                "sel",
                "",
                Some(&[("app", "x")]),
                Some(Disable),
                &[],
            ),
        ];
        let m = InboundMtls::resolve(&set, &client("foo", &[("app", "x")]));
        assert_eq!(m.mode(1), Some(Strict), "oldest, then by name");
        assert_eq!(m.from, ["foo/b"]);
        let root = InboundMtls::resolve(&set, &client(ROOT_NAMESPACE, &[("app", "x")]));
        assert_eq!(root, InboundMtls::default());
    }
}
