//! `PeerAuthentication` rules, as Istio validates them: a port-level mode needs a workload
//! selector and a port in 1..=65535; selector labels as for other selectors. A selector in the
//! root namespace is accepted and warned about: Istio ignores such a policy.

use super::*;
use crate::config::crd::{MapKey, MtlsMode};

/// Istio's default root namespace: its selector-less policy is the mesh-wide one.
pub const ROOT_NAMESPACE: &str = "istio-system";

impl TryFrom<&Resource<crd::PeerAuthenticationSpec>> for Validated<policy::PeerAuthentication> {
    type Error = Invalid;

    fn try_from(res: &Resource<crd::PeerAuthenticationSpec>) -> Result<Self, Invalid> {
        let mut c = Checker::new(res);
        let value = c.peer_authentication(&res.spec);
        c.finish(value)
    }
}

impl Checker<'_> {
    fn peer_authentication(
        &mut self,
        spec: &crd::PeerAuthenticationSpec,
    ) -> policy::PeerAuthentication {
        let selector = spec.selector.as_ref().map(|s| {
            self.labels("spec.selector.matchLabels", &s.match_labels);
            s.match_labels.clone()
        });
        let selects = selector.as_ref().is_some_and(|s| !s.is_empty());
        if selects && self.namespace == ROOT_NAMESPACE {
            self.warn(
                "spec.selector",
                format!("a policy with a selector in the root namespace {ROOT_NAMESPACE} is ignored, as Istio ignores it"),
            );
        }
        if !spec.port_level_mtls.is_empty() && !selects {
            self.err(
                "spec.portLevelMtls",
                "portLevelMtls needs a workload selector (mesh- and namespace-wide policies cannot set port modes)",
            );
        }
        let mut ports = BTreeMap::new();
        for (key, m) in &spec.port_level_mtls {
            let (text, number) = match key {
                MapKey::Number(n) => (n.to_string(), Some(*n)),
                MapKey::Text(t) => (t.clone(), t.parse::<i64>().ok()),
            };
            let field = format!("spec.portLevelMtls.{text}");
            match number
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0)
            {
                Some(port) => drop(ports.insert(port, mode(m.mode))),
                None => self.err(field, format!("port {text:?} is not in 1..=65535")),
            }
        }
        policy::PeerAuthentication {
            selector,
            mode: spec.mtls.as_ref().and_then(|m| mode(m.mode)),
            ports,
        }
    }
}

fn mode(m: MtlsMode) -> Option<policy::MtlsMode> {
    match m {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(policy::MtlsMode::Disable),
        MtlsMode::Permissive => Some(policy::MtlsMode::Permissive),
        MtlsMode::Strict => Some(policy::MtlsMode::Strict),
    }
}
