//! The `drover-cni` chained plugin (CNI spec 1.1; it accepts 0.3.0 to 1.1.0 configurations):
//! `VERSION` lists the versions; `ADD` opens `CNI_NETNS`, hands it with the pod's name and the
//! previous plugin's addresses to the daemon and passes `prevResult` through once the daemon has
//! enrolled the pod; `DEL` tells the daemon (best effort) and always succeeds, whatever its input;
//! `CHECK` asks the daemon whether the pod is enrolled; `STATUS` (1.1) fails with code 50 while
//! the daemon cannot enrol pods; `GC` (1.1) hands the runtime's `cni.dev/valid-attachments` to
//! the daemon, which un-enrols the plugin's other pods.
//!
//! Configuration keys beside the standard ones: `socket` (default
//! [`super::DEFAULT_SOCKET`]) and `excludeNamespaces` (default `kube-system` and
//! `drover-system`): pods of those namespaces pass through without the daemon.
//!
//! Invariants: every failure is a CNI error object on stdout (`code`, `msg`, `details`) with exit
//! status 1, codes as the spec numbers them; a configuration whose `cniVersion` is not one of
//! [`VERSIONS`] is refused with code 1; the plugin never waits longer than
//! [`super::EXCHANGE_TIMEOUT`] for the daemon, connect to reply, and tells the daemon its
//! deadline (the daemon rolls back an enrolment it cannot answer in time); a daemon that is
//! unreachable fails `ADD` (fail-closed: the runtime retries) with code 11 ("try again later").

use std::{os::unix::net::UnixStream, path::PathBuf};

use serde_json::{Value, json};

use super::{Command, EXCHANGE_TIMEOUT, Request};

/// The versions this plugin speaks.
pub const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Namespaces whose pods are never handed to the daemon, unless the configuration says otherwise.
pub const DEFAULT_EXCLUDED: [&str; 2] = ["kube-system", "drover-system"];

/// CNI error codes used, as the spec numbers them.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENV: u32 = 4;
const DECODE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN: u32 = 11;
/// CNI 1.1: the plugin cannot service ADD (`STATUS`).
const NOT_AVAILABLE: u32 = 50;
/// Above 100: the plugin's own.
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
        // DEL always succeeds (the runtime must be able to tear a pod down): with input it
        // cannot read it still tells the daemon at the default socket, best effort.
        None if command == "DEL" => {
            del(super::DEFAULT_SOCKET, env);
            Ok(None)
        }
        None => Err(Failure {
            code: DECODE,
            msg: "network configuration on stdin is not JSON".into(),
            details: String::from_utf8_lossy(stdin).chars().take(200).collect(),
        }),
        Some(_) if command != "DEL" && !VERSIONS.contains(&version.as_str()) => Err(Failure {
            code: INCOMPATIBLE_VERSION,
            msg: format!("incompatible CNI version {version:?}"),
            details: format!("drover-cni supports {}", VERSIONS.join(", ")),
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

/// DEL with whatever `env` says (best effort; it always succeeds): the daemon forgets pods
/// that vanish on its own too.
fn del(socket: &str, env: &dyn Fn(&str) -> Option<String>) {
    let Some(container_id) = env("CNI_CONTAINERID").filter(|v| !v.is_empty()) else {
        return;
    };
    let req = Request {
        netns: env("CNI_NETNS").unwrap_or_default(),
        ..Request::new(Command::Del, container_id)
    };
    deliver_del(socket, req);
}

/// ADD, DEL, CHECK, STATUS, GC: what to print on success (`None`: nothing).
fn dispatch(
    command: &str,
    env: &dyn Fn(&str) -> Option<String>,
    conf: &Value,
) -> Result<Option<Value>, Failure> {
    let socket = conf["socket"]
        .as_str()
        .unwrap_or(super::DEFAULT_SOCKET)
        .to_string();
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
        "STATUS" => return status(&socket).map(|()| None),
        "GC" => return gc(&socket, conf).map(|()| None),
        other => {
            return Err(Failure {
                code: INVALID_ENV,
                msg: format!("unsupported CNI_COMMAND {other:?}"),
                details: "expected ADD, DEL, CHECK, STATUS, GC or VERSION".into(),
            });
        }
    };
    if command == Command::Del && env("CNI_CONTAINERID").is_none_or(|v| v.is_empty()) {
        return Ok(None);
    }
    let container_id = need("CNI_CONTAINERID")?;
    let args = cni_args(&env("CNI_ARGS").unwrap_or_default());
    // As Kubernetes: a pod the runtime names no namespace for is in `default`.
    let pod_namespace = (args.get("K8S_POD_NAMESPACE").cloned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let excluded = excluded(conf);
    let prev = conf.get("prevResult").cloned();
    if excluded.contains(&pod_namespace) {
        // Passed through: ADD prints the previous result (or an empty one), the others nothing.
        return Ok((command == Command::Add).then(|| prev.unwrap_or_else(|| json!({}))));
    }
    let netns = match command {
        Command::Del => env("CNI_NETNS").unwrap_or_default(),
        _ => need("CNI_NETNS")?,
    };
    let req = Request {
        pod_namespace,
        pod_name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        ips: prev.as_ref().map(addresses).unwrap_or_default(),
        netns,
        ..Request::new(command.clone(), container_id)
    };
    match command {
        Command::Add => add(&socket, req, prev).map(Some),
        Command::Check => ask(&socket, req, None).map(|()| None),
        _ => {
            deliver_del(&socket, req);
            Ok(None)
        }
    }
}

/// `ADD`: the pod's namespace goes to the daemon, which enrols it before it answers; the
/// previous result is what the plugin prints.
fn add(socket: &str, req: Request, prev: Option<Value>) -> Result<Value, Failure> {
    let prev = prev.ok_or_else(|| Failure {
        code: INVALID_CONFIG,
        msg: "drover-cni must be chained after the plugin that sets up the pod's interface (no prevResult)".into(),
        details: String::new(),
    })?;
    let fd: std::os::fd::OwnedFd = std::fs::File::open(&req.netns)
        .map_err(|e| Failure {
            code: PLUGIN_ERROR,
            msg: format!("cannot open the pod's network namespace {}", req.netns),
            details: e.to_string(),
        })?
        .into();
    ask(socket, req, Some(&fd))?;
    Ok(prev)
}

/// Sends a `DEL`, best effort: the daemon forgets pods that vanish on its own too.
fn deliver_del(socket: &str, req: Request) {
    if let Err(f) = ask(socket, req, None) {
        eprintln!("drover-cni: DEL not delivered: {}: {}", f.msg, f.details);
    }
}

/// `STATUS`: whether the daemon answers (code 50 otherwise: the runtime reports the network
/// not ready instead of failing every pod's ADD).
fn status(socket: &str) -> Result<(), Failure> {
    ask(socket, Request::new(Command::Status, ""), None).map_err(|f| Failure {
        code: NOT_AVAILABLE,
        ..f
    })
}

/// `GC`: the containers of `cni.dev/valid-attachments` go to the daemon.
fn gc(socket: &str, conf: &Value) -> Result<(), Failure> {
    let valid = (conf["cni.dev/valid-attachments"].as_array().into_iter())
        .flatten()
        .filter_map(|a| a["containerID"].as_str().map(String::from))
        .collect();
    let req = Request {
        valid,
        ..Request::new(Command::Gc, "")
    };
    ask(socket, req, None)
}

/// One exchange with the daemon, all of it within [`EXCHANGE_TIMEOUT`] (the daemon is told the
/// deadline).
fn ask(socket: &str, mut req: Request, fd: Option<&std::os::fd::OwnedFd>) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + EXCHANGE_TIMEOUT;
    req.deadline_ms = Some(super::monotonic_ms() + EXCHANGE_TIMEOUT.as_millis() as u64);
    let unreachable = |e: std::io::Error| Failure {
        code: TRY_AGAIN,
        msg: format!(
            "the drover daemon is not reachable at {socket}; pods cannot start on this node until it is (is the drover DaemonSet pod running?)"
        ),
        details: e.to_string(),
    };
    let mut stream = connect(&PathBuf::from(socket), deadline).map_err(unreachable)?;
    let reply = super::request(&mut stream, &req, fd).map_err(|e| Failure {
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

/// A connection made before `deadline` (a daemon whose accept queue is full makes a blocking
/// connect wait without bound), both directions bounded by what is left.
fn connect(path: &std::path::Path, deadline: std::time::Instant) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let addr = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    socket.set_nonblocking(true)?;
    loop {
        match socket.connect(&addr) {
            Ok(()) => break,
            // A full accept queue: a Unix socket says EAGAIN rather than EINPROGRESS.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect: the daemon's accept queue stayed full",
                    ));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
    socket.set_nonblocking(false)?;
    let left = deadline
        .saturating_duration_since(std::time::Instant::now())
        .max(std::time::Duration::from_millis(1));
    socket.set_read_timeout(Some(left))?;
    socket.set_write_timeout(Some(left))?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
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
    fn errors_carry_the_specs_codes() {
        // 6: failed to decode content.
        let e = error(&run(&env(&[("CNI_COMMAND", "ADD")]), b"{not json"));
        assert_eq!(e["code"], 6);
        assert!(e["details"].as_str().unwrap().contains("{not json"));
        // 4: invalid necessary environment variables.
        let e = error(&run(&env(&[("CNI_COMMAND", "ADD")]), conf("").as_bytes()));
        assert_eq!(e["code"], 4);
        assert_eq!(e["msg"], "CNI_CONTAINERID is not set");
        let e = error(&run(&env(&[("CNI_COMMAND", "RESET")]), conf("").as_bytes()));
        assert_eq!(e["code"], 4);
        assert!(e["msg"].as_str().unwrap().contains("RESET"));
        // 7: invalid network configuration (not chained after an interface plugin).
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
        ];
        let e = error(&run(
            &env(&vars),
            br#"{"cniVersion":"1.0.0","name":"n","type":"drover-cni"}"#,
        ));
        assert_eq!(e["code"], 7);
        assert!(e["msg"].as_str().unwrap().contains("chained"), "{e}");
        // 1: incompatible CNI version, for every command but VERSION and DEL.
        for command in ["ADD", "CHECK", "STATUS", "GC"] {
            let vars = [("CNI_COMMAND", command), ("CNI_CONTAINERID", "c1")];
            let e = error(&run(
                &env(&vars),
                br#"{"cniVersion":"9.9.9","name":"n","type":"drover-cni"}"#,
            ));
            assert_eq!(e["code"], 1, "{command}: {e}");
            assert_eq!(e["cniVersion"], "9.9.9");
        }
    }

    #[test]
    fn del_succeeds_whatever_its_input() {
        let ok = Outcome {
            stdout: String::new(),
            status: 0,
        };
        let dir = std::env::temp_dir().join(format!("drover-cni-del-{}", std::process::id()));
        let c = conf(&format!(
            r#","socket":"{}""#,
            dir.join("none.sock").display()
        ));
        for (vars, stdin) in [
            (vec![("CNI_COMMAND", "DEL")], &b""[..]),
            (
                vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")],
                b"\x00garbage",
            ),
            (vec![("CNI_COMMAND", "DEL")], c.as_bytes()),
            (
                vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c1")],
                br#"{"cniVersion":"9.9.9","socket":"/nonexistent/drover.sock"}"#,
            ),
        ] {
            assert_eq!(run(&env(&vars), stdin), ok, "{vars:?}");
        }
    }

    #[test]
    fn status_without_a_daemon_is_code_50() {
        let dir = std::env::temp_dir().join(format!("drover-cni-status-{}", std::process::id()));
        let c = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","type":"drover-cni","socket":"{}"}}"#,
            dir.join("none.sock").display()
        );
        let e = error(&run(&env(&[("CNI_COMMAND", "STATUS")]), c.as_bytes()));
        assert_eq!(e["code"], 50, "{e}");
        let v = run(&env(&[("CNI_COMMAND", "VERSION")]), c.as_bytes());
        assert!(v.stdout.contains("1.1.0"), "{v:?}");
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
    fn an_excluded_pods_add_without_a_previous_result_prints_a_result() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/proc/self/ns/net"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"),
        ];
        let out = run(
            &env(&vars),
            br#"{"cniVersion":"1.1.0","name":"n","type":"drover-cni"}"#,
        );
        assert_eq!(out.status, 0, "{out:?}");
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
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
