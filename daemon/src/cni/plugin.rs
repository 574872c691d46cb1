//! The `drover-cni` chained plugin (CNI spec 1.0; it accepts 0.3.0 to 1.0.0 configurations):
//! `VERSION` lists the versions; `ADD` opens `CNI_NETNS`, hands it with the pod's name and the
//! previous plugin's addresses to the daemon and passes `prevResult` through once the daemon has
//! enrolled the pod; `DEL` tells the daemon (best effort) and always succeeds; `CHECK` asks the
//! daemon whether the pod is enrolled.
//!
//! Configuration keys beside the standard ones: `socket` (default
//! [`super::DEFAULT_SOCKET`]) and `excludeNamespaces` (default `kube-system` and
//! `drover-system`): pods of those namespaces pass through without the daemon.
//!
//! Invariants: every failure is a CNI error object on stdout (`code`, `msg`, `details`) with exit
//! status 1; the plugin never waits longer than [`super::EXCHANGE_TIMEOUT`] for the daemon (per
//! phase: connect, then the reply); a daemon that is unreachable fails `ADD` (fail-closed: the
//! runtime retries) with code 11 ("try again later").

use std::{os::unix::net::UnixStream, path::PathBuf};

use serde_json::{Value, json};

use super::{Command, EXCHANGE_TIMEOUT, Request};

/// The versions this plugin speaks.
pub const VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// Namespaces whose pods are never handed to the daemon, unless the configuration says otherwise.
pub const DEFAULT_EXCLUDED: [&str; 2] = ["kube-system", "drover-system"];

/// CNI error codes used (spec: 4 invalid network config, 7 invalid environment, 11 try again
/// later, 999 for plugin-specific errors).
const INVALID_CONFIG: u32 = 4;
const INVALID_ENV: u32 = 7;
const TRY_AGAIN: u32 = 11;
const PLUGIN_ERROR: u32 = 999;

/// What the plugin prints and its exit status.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub stdout: String,
    pub status: i32,
}

/// A failure, as the CNI error object says it.
struct Failure {
    code: u32,
    msg: String,
    details: String,
}

/// Runs the plugin for environment `env` and configuration `stdin`.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    let command = env("CNI_COMMAND").unwrap_or_default();
    let conf: Option<Value> = serde_json::from_slice(stdin).ok();
    let version = conf
        .as_ref()
        .and_then(|c| c["cniVersion"].as_str())
        .unwrap_or("1.0.0")
        .to_string();
    if command == "VERSION" {
        let v = json!({"cniVersion": version, "supportedVersions": VERSIONS});
        return Outcome {
            stdout: v.to_string(),
            status: 0,
        };
    }
    let result = match conf {
        None => Err(Failure {
            code: INVALID_CONFIG,
            msg: "network configuration on stdin is not JSON".into(),
            details: String::from_utf8_lossy(stdin).chars().take(200).collect(),
        }),
        Some(conf) => dispatch(&command, env, &conf),
    };
    match result {
        Ok(Some(mut out)) => {
            out["cniVersion"] = version.into();
            Outcome {
                stdout: out.to_string(),
                status: 0,
            }
        }
        Ok(None) => Outcome {
            stdout: String::new(),
            status: 0,
        },
        Err(f) => Outcome {
            stdout:
                json!({"cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details})
                    .to_string(),
            status: 1,
        },
    }
}

/// ADD, DEL, CHECK: what to print on success (`None`: nothing).
fn dispatch(
    command: &str,
    env: &dyn Fn(&str) -> Option<String>,
    conf: &Value,
) -> Result<Option<Value>, Failure> {
    let need = |name: &str| {
        env(name).filter(|v| !v.is_empty()).ok_or_else(|| Failure {
            code: INVALID_ENV,
            msg: format!("{name} is not set"),
            details: format!("CNI_COMMAND={command} needs {name}"),
        })
    };
    let command = match command {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        other => {
            return Err(Failure {
                code: INVALID_ENV,
                msg: format!("unsupported CNI_COMMAND {other:?}"),
                details: "expected ADD, DEL, CHECK or VERSION".into(),
            });
        }
    };
    let container_id = need("CNI_CONTAINERID")?;
    let args = cni_args(&env("CNI_ARGS").unwrap_or_default());
    // As Kubernetes: a pod the runtime names no namespace for is in `default`.
    let pod_namespace = (args.get("K8S_POD_NAMESPACE").cloned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let excluded = excluded(conf);
    let prev = conf.get("prevResult").cloned();
    if excluded.contains(&pod_namespace) {
        return Ok(prev.filter(|_| command == Command::Add));
    }
    let netns = match command {
        Command::Del => env("CNI_NETNS").unwrap_or_default(),
        _ => need("CNI_NETNS")?,
    };
    let req = Request {
        command: command.clone(),
        container_id,
        pod_namespace,
        pod_name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        ips: prev.as_ref().map(addresses).unwrap_or_default(),
        netns: netns.clone(),
    };
    let socket = conf["socket"]
        .as_str()
        .unwrap_or(super::DEFAULT_SOCKET)
        .to_string();
    match command {
        Command::Add => {
            let prev = prev.ok_or_else(|| Failure {
                code: INVALID_CONFIG,
                msg: "drover-cni must be chained after the plugin that sets up the pod's interface (no prevResult)".into(),
                details: String::new(),
            })?;
            let fd: std::os::fd::OwnedFd = std::fs::File::open(&netns)
                .map_err(|e| Failure {
                    code: PLUGIN_ERROR,
                    msg: format!("cannot open the pod's network namespace {netns}"),
                    details: e.to_string(),
                })?
                .into();
            ask(&socket, &req, Some(&fd))?;
            Ok(Some(prev))
        }
        Command::Check => ask(&socket, &req, None).map(|()| None),
        Command::Del => {
            // Best effort: the daemon forgets pods that vanish on its own too.
            if let Err(f) = ask(&socket, &req, None) {
                eprintln!("drover-cni: DEL not delivered: {}: {}", f.msg, f.details);
            }
            Ok(None)
        }
    }
}

/// One exchange with the daemon.
fn ask(socket: &str, req: &Request, fd: Option<&std::os::fd::OwnedFd>) -> Result<(), Failure> {
    let unreachable = |e: std::io::Error| Failure {
        code: TRY_AGAIN,
        msg: format!(
            "the drover daemon is not reachable at {socket}; pods cannot start on this node until it is (is the drover DaemonSet pod running?)"
        ),
        details: e.to_string(),
    };
    let mut stream = connect(&PathBuf::from(socket)).map_err(unreachable)?;
    let reply = super::request(&mut stream, req, fd).map_err(|e| Failure {
        code: TRY_AGAIN,
        msg: format!(
            "the drover daemon at {socket} did not answer within {}s",
            EXCHANGE_TIMEOUT.as_secs()
        ),
        details: e.to_string(),
    })?;
    if reply.ok {
        Ok(())
    } else {
        Err(Failure {
            code: PLUGIN_ERROR,
            msg: format!("the drover daemon refused {:?}", req.command),
            details: reply.error.unwrap_or_default(),
        })
    }
}

/// A connection with both directions bounded by [`EXCHANGE_TIMEOUT`].
fn connect(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    stream.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    Ok(stream)
}

/// `CNI_ARGS` (`K=V;K=V`).
fn cni_args(raw: &str) -> std::collections::BTreeMap<String, String> {
    raw.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The configured excluded namespaces, or the defaults.
fn excluded(conf: &Value) -> Vec<String> {
    match conf["excludeNamespaces"].as_array() {
        Some(list) => list
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        None => DEFAULT_EXCLUDED.iter().map(|s| s.to_string()).collect(),
    }
}

/// The addresses of a CNI result (`ips[].address`, CIDR notation).
fn addresses(result: &Value) -> Vec<std::net::IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"0.4.0","name":"net","type":"drover-cni"{extra},"prevResult":{{"cniVersion":"0.4.0","ips":[{{"version":"4","address":"198.19.0.5/24"}}]}}}}"#
        )
    }

    fn error(out: &Outcome) -> Value {
        assert_eq!(out.status, 1, "{out:?}");
        serde_json::from_str(&out.stdout).unwrap()
    }

    #[test]
    fn version_lists_what_it_speaks() {
        let out = run(&env(&[("CNI_COMMAND", "VERSION")]), conf("").as_bytes());
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["supportedVersions"][3], "1.0.0");
        assert_eq!(v["cniVersion"], "0.4.0");
    }

    #[test]
    fn bad_config_and_environment_are_cni_errors() {
        let e = error(&run(&env(&[("CNI_COMMAND", "ADD")]), b"{not json"));
        assert_eq!(e["code"], 4);
        assert!(e["details"].as_str().unwrap().contains("{not json"));
        let e = error(&run(&env(&[("CNI_COMMAND", "ADD")]), conf("").as_bytes()));
        assert_eq!(e["code"], 7);
        assert_eq!(e["msg"], "CNI_CONTAINERID is not set");
        let e = error(&run(&env(&[("CNI_COMMAND", "RESET")]), conf("").as_bytes()));
        assert!(e["msg"].as_str().unwrap().contains("RESET"));
    }

    #[test]
    fn add_without_a_daemon_fails_closed_naming_the_socket() {
        let dir = std::env::temp_dir().join(format!("drover-cni-test-{}", std::process::id()));
        let socket = dir.join("none.sock");
        let c = conf(&format!(r#","socket":"{}""#, socket.display()));
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=p",
            ),
        ];
        let e = error(&run(&env(&vars), c.as_bytes()));
        assert_eq!(e["code"], 11);
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains(&socket.display().to_string()),
            "{e}"
        );
        // DEL succeeds anyway; an excluded namespace passes prevResult through untouched.
        let del = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")];
        assert_eq!(
            run(&env(&del), c.as_bytes()),
            Outcome {
                stdout: String::new(),
                status: 0
            }
        );
        let system = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c2"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"),
        ];
        let out = run(&env(&system), c.as_bytes());
        assert_eq!(out.status, 0, "{out:?}");
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["ips"][0]["address"], "198.19.0.5/24");
    }

    #[test]
    fn a_vanished_namespace_is_a_cni_error_naming_it() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/gone-for-good"),
        ];
        let e = error(&run(&env(&vars), conf("").as_bytes()));
        assert_eq!(e["code"], 999);
        assert!(
            e["msg"]
                .as_str()
                .unwrap()
                .contains("/run/netns/gone-for-good"),
            "{e}"
        );
        assert!(
            e["details"].as_str().unwrap().contains("No such file"),
            "{e}"
        );
    }

    #[test]
    fn unchained_add_is_refused() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
        ];
        let e = error(&run(
            &env(&vars),
            br#"{"cniVersion":"1.0.0","name":"n","type":"drover-cni"}"#,
        ));
        assert!(e["msg"].as_str().unwrap().contains("chained"), "{e}");
    }

    #[test]
    fn addresses_come_from_the_previous_result() {
        let prev: Value = serde_json::from_str(
            r#"{"ips":[{"address":"198.19.0.5/24"},{"address":"fd00::5/64"},{"address":"bad"}]}"#,
        )
        .unwrap();
        assert_eq!(
            addresses(&prev),
            [
                "198.19.0.5".parse::<std::net::IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(cni_args("A=1;K8S_POD_NAME=x;junk")["K8S_POD_NAME"], "x");
    }
}
