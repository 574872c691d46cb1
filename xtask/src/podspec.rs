//! Pod-spec rules that the API server (or the kubelet and the runtime it drives) enforces and
//! that a schema cannot express, checked on every Pod template of the manifests
//! (`cargo xtask lint`). Each rule says which check it mirrors.
//!
//! Invariant: a manifest this accepts is not refused by these checks on a real cluster; every
//! problem names the file, the object, the container and the field.

use serde_yaml::Value;

/// Linux capability names as Kubernetes spells them (without `CAP_`), up to Linux 6.x.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The problems of every Pod template in `text` (one YAML stream), each prefixed by `file`.
pub fn check(file: &str, text: &str) -> Result<Vec<String>, serde_yaml::Error> {
    let mut problems = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let doc = Value::deserialize(doc)?;
        let kind = doc["kind"].as_str().unwrap_or("?");
        let name = doc["metadata"]["name"].as_str().unwrap_or("?");
        let spec = match kind {
            "Pod" => &doc["spec"],
            "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => &doc["spec"]["template"]["spec"],
        };
        if !spec.is_mapping() {
            continue;
        }
        for p in pod_spec(spec) {
            problems.push(format!("{file}: {kind} {name}: {p}"));
        }
    }
    Ok(problems)
}

use serde::Deserialize;

/// The problems of one Pod spec.
fn pod_spec(spec: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let host_network = spec["hostNetwork"].as_bool().unwrap_or(false);
    for list in ["initContainers", "containers"] {
        for (i, c) in seq(&spec[list]).iter().enumerate() {
            let at = format!("{list}[{i}] ({})", c["name"].as_str().unwrap_or("unnamed"));
            container(c, host_network, &at, &mut out);
        }
    }
    out
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map_or(&[], |s| s.as_slice())
}

fn container(c: &Value, host_network: bool, at: &str, out: &mut Vec<String>) {
    let security = &c["securityContext"];
    let privileged = security["privileged"].as_bool().unwrap_or(false);
    for (j, m) in seq(&c["volumeMounts"]).iter().enumerate() {
        if m["mountPropagation"].as_str() == Some("Bidirectional") && !privileged {
            out.push(format!(
                "{at}.volumeMounts[{j}].mountPropagation: Bidirectional mount propagation is available only to privileged containers (Pod validation, validateMountPropagation)"
            ));
        }
    }
    let mut names = Vec::new();
    for (j, p) in seq(&c["ports"]).iter().enumerate() {
        let container_port = p["containerPort"].as_i64();
        if let Some(name) = p["name"].as_str() {
            if !is_port_name(name) {
                out.push(format!(
                    "{at}.ports[{j}].name: {name:?} is not an IANA service name (Pod validation, validateContainerPorts)"
                ));
            }
            names.push(name.to_string());
        }
        if host_network
            && let Some(host_port) = p["hostPort"].as_i64()
            && Some(host_port) != container_port
        {
            out.push(format!(
                "{at}.ports[{j}].hostPort: must match containerPort when hostNetwork is true (Pod validation, validateHostNetwork)"
            ));
        }
    }
    for (field, caps) in [
        ("add", &security["capabilities"]["add"]),
        ("drop", &security["capabilities"]["drop"]),
    ] {
        for cap in seq(caps).iter().filter_map(Value::as_str) {
            let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
            if bare != "ALL" && !CAPABILITIES.contains(&bare) {
                out.push(format!(
                    "{at}.securityContext.capabilities.{field}: unknown capability {cap:?} (the API server accepts any string; the runtime refuses to create the container)"
                ));
            }
        }
    }
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        for handler in ["httpGet", "tcpSocket", "grpc"] {
            let port = &c[probe][handler]["port"];
            if let Some(n) = port.as_i64()
                && !(1..=65535).contains(&n)
            {
                out.push(format!(
                    "{at}.{probe}.{handler}.port: {n} is not between 1 and 65535 (Pod validation, validatePortNumOrName)"
                ));
            }
            if let Some(name) = port.as_str() {
                if !is_port_name(name) {
                    out.push(format!(
                        "{at}.{probe}.{handler}.port: {name:?} is not an IANA service name (Pod validation, validatePortNumOrName)"
                    ));
                } else if !names.iter().any(|n| n == name) {
                    out.push(format!(
                        "{at}.{probe}.{handler}.port: no port of the container is named {name:?} (the kubelet cannot resolve it and the probe fails)"
                    ));
                }
            }
        }
    }
}

/// An IANA service name as Kubernetes validates it: at most 15 characters, lowercase letters,
/// digits and single inner hyphens, at least one letter.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(container: &str, host_network: bool) -> Vec<String> {
        let text = format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: d}}\nspec:\n  template:\n    spec:\n      hostNetwork: {host_network}\n      containers:\n{container}"
        );
        check("t.yaml", &text).expect("yaml")
    }

    const GOOD: &str = "        - name: c
          ports: [{name: ready, containerPort: 15021, hostPort: 15021}]
          readinessProbe: {httpGet: {path: /, port: ready}}
          livenessProbe: {tcpSocket: {port: 15021}}
          securityContext:
            capabilities: {drop: [ALL], add: [BPF, NET_ADMIN]}
          volumeMounts: [{name: v, mountPath: /v, mountPropagation: HostToContainer}]
";

    #[test]
    fn a_valid_spec_passes() {
        assert_eq!(problems(GOOD, true), Vec::<String>::new());
    }

    #[test]
    fn each_rule_catches_its_violation() {
        let cases = [
            (
                GOOD.replace("HostToContainer", "Bidirectional"),
                "available only to privileged",
            ),
            (
                GOOD.replace("hostPort: 15021", "hostPort: 8080"),
                "must match containerPort",
            ),
            (GOOD.replace("BPF,", "BPFF,"), "unknown capability \"BPFF\""),
            (
                GOOD.replace("port: ready", "port: health"),
                "no port of the container is named",
            ),
            (
                GOOD.replace("port: 15021", "port: 0"),
                "between 1 and 65535",
            ),
            (
                GOOD.replace("name: ready", "name: Ready_Port"),
                "IANA service name",
            ),
        ];
        for (spec, expected) in cases {
            let p = problems(&spec, true);
            assert!(p.iter().any(|p| p.contains(expected)), "{expected}: {p:?}");
        }
        // Privileged containers may use Bidirectional; without host networking the ports may
        // differ.
        let privileged = GOOD.replace("HostToContainer", "Bidirectional").replace(
            "securityContext:\n",
            "securityContext:\n            privileged: true\n",
        );
        assert_eq!(problems(&privileged, true), Vec::<String>::new());
        let nat = GOOD.replace("hostPort: 15021", "hostPort: 8080");
        assert_eq!(problems(&nat, false), Vec::<String>::new());
    }

    #[test]
    fn the_shipped_manifests_pass() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for dir in ["deploy/kubernetes", "deploy/kubernetes/uninstall"] {
            for e in std::fs::read_dir(root.join(dir)).expect("manifests") {
                let path = e.expect("entry").path();
                if path.extension().is_some_and(|x| x == "yaml") {
                    let text = std::fs::read_to_string(&path).expect("read");
                    let p = check(&path.display().to_string(), &text).expect("yaml");
                    assert_eq!(p, Vec::<String>::new());
                }
            }
        }
    }
}
