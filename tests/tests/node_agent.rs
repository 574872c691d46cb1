//! The node agent's CNI socket and handover under adversarial use, through the real kernel
//! capture path: the real `drover-cni` binary is run with the CNI environment a runtime sets,
//! against "pods" that are network namespaces this test creates (`ip netns add`), and each pod's
//! connects to a service VIP (a loopback address inside the pod, so nothing leaves it if capture
//! fails) must be captured or refused as the enrolment says. Needs root; under `CI` it fails
//! rather than skips.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use drover_tests::{
    Daemon, Netns, PinDir, Proc,
    apiserver::{ApiServer, NODE, POD},
    bin,
    k8s::node,
    netns_fds, require_privileged, unique_id, write_config,
};

const VIP: &str = "127.77.0.61";

/// A CNI socket directory, a pin directory and service `echo` at `VIP:80`, served at
/// `127.0.0.1:7000` (each pod runs its own origin there: the proxy connects from the pod's
/// namespace); the daemon is started by the test.
struct Node {
    dir: PathBuf,
    socket: PathBuf,
    pins: PinDir,
    config: PathBuf,
}

impl Node {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("drover-node-{}", unique_id()));
        std::fs::create_dir_all(&dir).expect("node dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let port = 7000;
        let config = write_config(&format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.default.svc]
  addresses: [{VIP}]
  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: {port}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
"
        ));
        Self {
            socket: dir.join("cni.sock"),
            dir,
            pins: PinDir::new(),
            config,
        }
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = drover_tests::args(&self.config, &self.pins, extra);
        a.extend(["--cni-socket".into(), self.socket.display().to_string()]);
        a
    }

    fn daemon(&self) -> Daemon {
        Daemon::start(&self.args(&[])).expect("daemon starts")
    }

    /// The daemon in Kubernetes mode (node `node1`) against `api`, with `extra` arguments.
    fn kube_daemon(&self, api: &ApiServer, extra: &[&str]) -> Daemon {
        let kubeconfig = self.dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let kubeconfig = kubeconfig.display().to_string();
        let mut args = vec!["--kubernetes", "--kubeconfig", &kubeconfig];
        args.extend(["--node-name", "node1"]);
        args.extend_from_slice(extra);
        Daemon::start(&self.args(&args)).expect("daemon starts")
    }

    /// Pod `name` of namespace `shop` at `ip` with `labels`: its Pod in `api` (on `node1`),
    /// then its `drover-cni ADD` (asserted to succeed).
    fn add_pod(&self, api: &ApiServer, name: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
        let p = pod(name);
        address(&p, ip);
        api.apply(
            POD,
            drover_tests::k8s::pod("shop", name, labels, "default", "node1", ip),
        );
        assert_ok(
            "ADD",
            &self.plugin("ADD", &format!("c{name}"), Some(&p), name),
        );
        p
    }

    /// The network configuration the runtime gives the plugin.
    fn conf(&self, socket: &Path) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"bed","type":"drover-cni","socket":"{}","prevResult":{{"cniVersion":"1.1.0","ips":[]}}}}"#,
            socket.display()
        )
    }

    /// Runs `drover-cni` for `command` on container `id` (pod `name` in `ns`); its output and
    /// how long it took.
    fn plugin(
        &self,
        command: &str,
        id: &str,
        ns: Option<&Netns>,
        name: &str,
    ) -> (Output, Duration) {
        self.plugin_as(None, &self.socket, command, id, ns, name)
    }

    fn plugin_as(
        &self,
        uid: Option<u32>,
        socket: &Path,
        command: &str,
        id: &str,
        ns: Option<&Netns>,
        name: &str,
    ) -> (Output, Duration) {
        let exe = match uid {
            // A copy another user can run (the build tree may not be reachable to it).
            Some(_) => {
                let copy = self.dir.join("drover-cni");
                if !copy.exists() {
                    std::fs::copy(bin("drover-cni"), &copy).expect("copy plugin");
                    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                        .expect("chmod");
                }
                copy
            }
            None => bin("drover-cni"),
        };
        let mut cmd = Command::new(exe);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/nonexistent")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = ns {
            cmd.env("CNI_NETNS", format!("/var/run/netns/{}", ns.name));
        }
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("run drover-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(self.conf(socket).as_bytes())
            .expect("conf");
        let out = child.wait_with_output().expect("drover-cni");
        (out, started.elapsed())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A pod: a network namespace of this test, with the service's origin inside it.
struct Pod {
    ns: Netns,
    _origin: Proc,
}

impl std::ops::Deref for Pod {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

fn pod(tag: &str) -> Pod {
    let ns = Netns::new(format!("drvpod{tag}{}", unique_id() % 100_000));
    let origin = Proc::server(
        Some(&ns),
        "echo",
        &[SocketAddr::from(([127, 0, 0, 1], 7000))],
        "origin",
    );
    Pod {
        ns,
        _origin: origin,
    }
}

/// Whether a connect from `ns` to the VIP is captured (the origin greets), within 3 s.
fn captured(ns: &Netns) -> bool {
    captured_at(
        ns,
        format!("{VIP}:80").parse().expect("vip"),
        Duration::from_secs(3),
    )
}

/// Whether a connect from `ns` to `addr` is captured (the origin greets), within `within`.
fn captured_at(ns: &Netns, addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(c) = ns.connect(addr, None) {
            let mut line = String::new();
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            if BufReader::new(c).read_line(&mut line).is_ok() && line.contains("hello from origin")
            {
                return true;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a connect from `ns` to the VIP is refused (not enrolled: nothing listens there).
fn refused(ns: &Netns) -> bool {
    let addr: SocketAddr = format!("{VIP}:80").parse().expect("vip");
    ns.connect(addr, None).is_err()
}

fn assert_ok(what: &str, (out, took): &(Output, Duration)) {
    assert!(out.status.success(), "{what}: {}", text(out));
    assert!(
        *took < Duration::from_secs(3),
        "{what} took {took:?}: {}",
        text(out)
    );
}

#[test]
fn a_repeated_or_unknown_del_never_blocks_and_the_next_pod_enrols() {
    if !require_privileged() {
        return;
    }
    let node = Node::new();
    let daemon = node.daemon();
    let (a, b) = (pod("a"), pod("b"));
    assert_ok("ADD a", &node.plugin("ADD", "ca", Some(&a), "a"));
    assert!(captured(&a), "{}", daemon.log());
    assert_ok("DEL a", &node.plugin("DEL", "ca", Some(&a), "a"));
    assert_ok("DEL a again", &node.plugin("DEL", "ca", Some(&a), "a"));
    assert_ok(
        "DEL of a container never added",
        &node.plugin("DEL", "never", None, "x"),
    );
    assert_ok(
        "DEL without a namespace",
        &node.plugin("DEL", "ca", None, "a"),
    );
    assert!(refused(&a), "a is un-enrolled");
    // Enrolment still works, at once.
    assert_ok("ADD b", &node.plugin("ADD", "cb", Some(&b), "b"));
    assert!(captured(&b), "{}", daemon.log());
    assert_ok("CHECK b", &node.plugin("CHECK", "cb", Some(&b), "b"));
    assert_ok("STATUS", &node.plugin("STATUS", "", None, ""));
}

#[test]
fn concurrent_adds_of_one_container_enrol_it_once_and_two_sandboxes_of_one_pod_stay_apart() {
    if !require_privileged() {
        return;
    }
    let node = Node::new();
    let daemon = node.daemon();
    let pid = daemon.pid().expect("pid");
    let before = netns_fds(pid);
    let a = pod("a");
    let outs: Vec<(Output, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| node.plugin("ADD", "same", Some(&a), "a")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("add"))
            .collect()
    });
    for o in &outs {
        assert!(o.0.status.success(), "{}", text(&o.0));
    }
    assert!(captured(&a));
    assert_eq!(
        daemon.log().matches("pod enrolled").count(),
        1,
        "one enrolment: {}",
        daemon.log()
    );
    assert_ok("DEL", &node.plugin("DEL", "same", Some(&a), "a"));
    assert!(refused(&a));
    let deadline = Instant::now() + Duration::from_secs(3);
    while netns_fds(pid) != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(netns_fds(pid), before, "no namespace fd leaked");

    // Two sandboxes of one pod (the runtime recreated it before deleting the old one): deleting
    // the old one leaves the new one captured and following reloads.
    let (old, new) = (pod("old"), pod("new"));
    assert_ok(
        "ADD old",
        &node.plugin("ADD", "sandbox-1", Some(&old), "web"),
    );
    assert_ok(
        "ADD new",
        &node.plugin("ADD", "sandbox-2", Some(&new), "web"),
    );
    assert_ok(
        "DEL old",
        &node.plugin("DEL", "sandbox-1", Some(&old), "web"),
    );
    assert!(refused(&old));
    assert!(captured(&new), "{}", daemon.log());
    // A reload that moves the service to another VIP: the new sandbox's snapshot follows (a
    // frozen one would not know the new VIP and close the connection).
    let yaml = std::fs::read_to_string(&node.config).expect("config");
    let renamed = yaml.replace(VIP, "127.77.0.62");
    drover_tests::replace_config(&node.config, &renamed);
    let addr: SocketAddr = "127.77.0.62:80".parse().expect("vip");
    let greeted = captured_at(&new, addr, Duration::from_secs(5));
    assert!(
        greeted,
        "the remaining sandbox follows the reload: {}",
        daemon.log()
    );
}

#[test]
fn slow_clients_cannot_hold_the_socket_and_an_add_the_plugin_gave_up_on_is_rolled_back() {
    if !require_privileged() {
        return;
    }
    let node = Node::new();
    let daemon = node.daemon();
    // 300 clients that send one byte and then nothing.
    let slow: Vec<UnixStream> = (0..300)
        .filter_map(|_| {
            let mut s = UnixStream::connect(&node.socket).ok()?;
            s.write_all(b"{").ok()?;
            Some(s)
        })
        .collect();
    assert!(slow.len() >= 250, "{} slow clients", slow.len());
    let a = pod("a");
    assert_ok(
        "ADD among slow clients",
        &node.plugin("ADD", "ca", Some(&a), "a"),
    );
    assert!(captured(&a));
    // Each slow exchange ends within its read bound: the daemon closes it.
    let mut probe = slow.into_iter().next().expect("one");
    probe
        .set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    let mut rest = Vec::new();
    let started = Instant::now();
    let _ = std::io::Read::read_to_end(&mut probe, &mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a slow client held its exchange for {:?}",
        started.elapsed()
    );

    // An ADD whose plugin is gone before the reply: rolled back, never enrolled.
    use drover::cni::{Command, Request, monotonic_ms, send_message};
    use std::os::fd::AsRawFd;
    let add = |p: &Pod, id: &str, deadline_ms: Option<u64>| {
        let f = std::fs::File::open(format!("/var/run/netns/{}", p.name)).expect("netns");
        let mut s = UnixStream::connect(&node.socket).expect("connect");
        let req = Request {
            pod_namespace: "shop".into(),
            pod_name: id.into(),
            deadline_ms,
            ..Request::new(Command::Add, id)
        };
        send_message(&mut s, &req, &[f.as_raw_fd()]).expect("send");
        s
    };
    let b = pod("b");
    let gone = add(&b, "cb", None);
    let _ = gone.shutdown(std::net::Shutdown::Both);
    drop(gone);
    // And one whose deadline has already passed: refused, never enrolled.
    let c = pod("c");
    let mut late = add(&c, "cc", Some(monotonic_ms()));
    late.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reply = String::new();
    BufReader::new(&mut late)
        .read_line(&mut reply)
        .expect("reply");
    assert!(reply.contains(r#""ok":false"#), "{reply}");
    assert!(
        daemon.wait_log("enrolment rolled back", Duration::from_secs(5)),
        "{}",
        daemon.log()
    );
    assert!(refused(&b), "b was rolled back: {}", daemon.log());
    assert!(refused(&c), "c was never enrolled: {}", daemon.log());
    assert!(captured(&a), "a is still served");
}

#[test]
fn the_daemons_sockets_are_owner_only_and_refuse_other_users() {
    if !require_privileged() {
        return;
    }
    let node = Node::new();
    let daemon = node.daemon();
    let handover = node.dir.join("handover.sock");
    for s in [&node.socket, &handover] {
        let mode = std::fs::metadata(s).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", s.display());
    }
    let a = pod("a");
    // The mode keeps another user out.
    let (out, _) = node.plugin_as(Some(65534), &node.socket, "ADD", "ca", Some(&a), "a");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ermission denied"), "{}", text(&out));
    // Even where the mode would let it in, the peer check refuses it, on both sockets.
    for s in [&node.socket, &handover] {
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    }
    let (out, _) = node.plugin_as(Some(65534), &node.socket, "ADD", "ca", Some(&a), "a");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("uid 65534"), "{}", text(&out));
    assert!(refused(&a));
    let _ = node.plugin_as(Some(65534), &handover, "ADD", "ca", Some(&a), "a");
    assert!(
        daemon.wait_log("handover refused", Duration::from_secs(3)),
        "{}",
        daemon.log()
    );
    // The daemon still serves, and root still enrols.
    assert_ok("ADD as root", &node.plugin("ADD", "ca", Some(&a), "a"));
    assert!(captured(&a));
}

#[test]
fn a_failed_upgrade_leaves_the_old_daemon_serving() {
    if !require_privileged() {
        return;
    }
    let node = Node::new();
    let old = node.daemon();
    let a = pod("a");
    assert_ok("ADD a", &node.plugin("ADD", "ca", Some(&a), "a"));
    assert!(captured(&a));
    // A new daemon that takes the handover and then fails its own start.
    let failed = Daemon::start_within(
        &node.args(&["--netns", "drover-no-such-netns"]),
        Duration::from_secs(20),
    );
    let Err((code, log)) = failed else {
        panic!("the new daemon must fail to start");
    };
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("took over from the running daemon"), "{log}");
    assert!(
        old.wait_log(
            "serving again after the failed handover",
            Duration::from_secs(10)
        ),
        "{}",
        old.log()
    );
    // Pods stay captured and enrolment works.
    assert!(captured(&a), "{}", old.log());
    let b = pod("b");
    assert_ok("ADD b", &node.plugin("ADD", "cb", Some(&b), "b"));
    assert!(captured(&b), "{}", old.log());
    // A good upgrade still takes over, and the old daemon retires only then.
    let new = node.daemon();
    assert!(
        old.wait_log("the new daemon is ready; retired", Duration::from_secs(10)),
        "{}",
        old.log()
    );
    assert!(captured(&a) && captured(&b), "{}", new.log());
    let c = pod("c");
    assert_ok("ADD c", &node.plugin("ADD", "cc", Some(&c), "c"));
    assert!(captured(&c), "{}", new.log());
}

#[test]
fn a_pod_missing_from_a_failing_pod_watch_stays_enrolled_until_the_watch_is_current_again() {
    if !require_privileged() {
        return;
    }
    use drover::cni::reconcile::EVERY;
    let n = Node::new();
    let api = ApiServer::start(&[]);
    api.apply(NODE, node("node1", "region1", "zone1"));
    let daemon = n.kube_daemon(&api, &["--cni-grace", "1"]);
    // The Pod watch fails from now on (its permission revoked, open watches cut).
    api.forbid("pods", true);
    api.drop_watches();
    assert!(
        daemon.wait_log(
            "retrying with backoff kind=\"Pod\"",
            Duration::from_secs(10)
        ),
        "{}",
        daemon.log()
    );
    // A new pod: the plugin enrols it, but its Pod object never reaches the daemon's cache.
    let a = pod("a");
    assert_ok("ADD a", &n.plugin("ADD", "ca", Some(&a), "a"));
    assert!(captured(&a), "{}", daemon.log());
    // Passes well past the grace: absence from a failing watch is no evidence.
    std::thread::sleep(EVERY * 2 + Duration::from_secs(1));
    assert!(
        !daemon.log().contains("pod un-enrolled"),
        "{}",
        daemon.log()
    );
    assert!(captured(&a), "still captured\n{}", daemon.log());
    // Current again (the next Pod event arrives) and the pod is not there: removed.
    api.forbid("pods", false);
    let other = drover_tests::k8s::pod("shop", "other", &[], "default", "node2", "198.18.9.9");
    api.apply(POD, other);
    assert!(
        daemon.wait_log("pod un-enrolled", EVERY * 2 + Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    assert!(refused(&a), "a is un-enrolled");
}

/// Gives `ns` the pod address `ip` (on its loopback device: nothing can leave through it).
fn address(ns: &Netns, ip: &str) {
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
}

#[test]
fn a_pod_that_cannot_be_enrolled_is_counted_and_retried_while_the_others_are_enrolled() {
    if !require_privileged() {
        return;
    }
    let n = Node::new();
    // Two pods that started before the daemon (found through /proc by their addresses); `b`
    // already listens on the capture port, as a sidecar pod being migrated does.
    let (a, b) = (pod("a"), pod("b"));
    address(&a, "198.18.77.1");
    address(&b, "198.18.77.2");
    let blocker = Proc::server(
        Some(&b),
        "echo",
        &[SocketAddr::from(([127, 0, 0, 1], 15001))],
        "sidecar",
    );
    let api = ApiServer::start(&[]);
    api.apply(NODE, node("node1", "region1", "zone1"));
    for (name, ip) in [("a", "198.18.77.1"), ("b", "198.18.77.2")] {
        let p = drover_tests::k8s::pod("shop", name, &[], "default", "node1", ip);
        api.apply(POD, p);
    }
    // The start does not fail on `b`: `a` is enrolled and the daemon serves.
    let daemon = n.kube_daemon(&api, &[]);
    assert!(
        daemon
            .log()
            .contains("reconciled: pods found through /proc enrolled pods=1"),
        "{}",
        daemon.log()
    );
    assert!(captured(&a), "{}", daemon.log());
    assert!(!captured_at(
        &b,
        format!("{VIP}:80").parse().unwrap(),
        Duration::from_millis(300)
    ));
    let failures = || {
        daemon.clusters()["kubernetes"]["reconcile_failures"]
            .as_u64()
            .unwrap()
    };
    assert!(failures() >= 1, "{}", daemon.clusters());
    assert!(
        daemon
            .admin_get("/stats/prometheus")
            .contains("drover_kubernetes_reconcile_failures"),
    );
    // The port freed, the next pass enrols `b`.
    drop(blocker);
    assert!(
        captured_at(
            &b,
            format!("{VIP}:80").parse().unwrap(),
            drover::cni::reconcile::EVERY + Duration::from_secs(5)
        ),
        "{}",
        daemon.log()
    );
}

#[test]
fn a_pod_whose_identity_class_is_served_already_is_enrolled_without_a_build() {
    if !require_privileged() {
        return;
    }
    let n = Node::new();
    // A rule only namespace `shop` sees: its pods are a class of their own, apart from the
    // daemon's client (namespace `default`).
    let mut yaml = std::fs::read_to_string(&n.config).expect("config");
    yaml.push_str(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo.default.svc
  exportTo: [.]
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
",
    );
    drover_tests::replace_config(&n.config, &yaml);
    let api = ApiServer::start(&[]);
    api.apply(NODE, node("node1", "region1", "zone1"));
    let daemon = n.kube_daemon(&api, &[]);
    let reloads = || daemon.log().matches("configuration reloaded").count();
    let enrol = |name: &str, ip: &str| {
        let p = pod(name);
        address(&p, ip);
        api.apply(
            POD,
            drover_tests::k8s::pod("shop", name, &[("app", "web")], "default", "node1", ip),
        );
        assert_ok("ADD", &n.plugin("ADD", &format!("c{name}"), Some(&p), name));
        assert!(captured(&p), "{name}: {}", daemon.log());
        p
    };
    let before = reloads();
    // The first pod of the class: its snapshot is built (one reload).
    let _j1 = enrol("j1", "198.18.78.1");
    assert_eq!(reloads(), before + 1, "{}", daemon.log());
    // The second joins it: served by the same snapshot, with no build.
    let j2 = enrol("j2", "198.18.78.2");
    assert_eq!(reloads(), before + 1, "{}", daemon.log());
    assert!(
        daemon.log().contains(r#"identity=Pod("shop/j2")"#),
        "{}",
        daemon.log()
    );
    // Its Pod changes in a way no rule reads (a label more): its identity is looked up again,
    // its class stayed, nothing is built.
    api.apply(
        POD,
        drover_tests::k8s::pod(
            "shop",
            "j2",
            &[("app", "web"), ("team", "a")],
            "default",
            "node1",
            "198.18.78.2",
        ),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(captured(&j2), "{}", daemon.log());
    assert_eq!(reloads(), before + 1, "{}", daemon.log());
}

#[test]
fn a_pod_that_opted_out_of_the_mesh_is_not_enrolled() {
    if !require_privileged() {
        return;
    }
    let n = Node::new();
    let api = ApiServer::start(&[]);
    api.apply(NODE, node("node1", "region1", "zone1"));
    let daemon = n.kube_daemon(&api, &[]);
    let add = |name: &str, ip: &str, labels: &[(&str, &str)]| n.add_pod(&api, name, ip, labels);
    // Ambient's opt-out label: the ADD succeeds and leaves the pod alone.
    let out = add("o1", "198.18.79.1", &[("istio.io/dataplane-mode", "none")]);
    assert!(!captured(&out), "{}", daemon.log());
    assert!(
        daemon.wait_log("pod opted out", Duration::from_secs(3)),
        "{}",
        daemon.log()
    );
    // Its neighbour without the label is enrolled.
    let kept = add("o2", "198.18.79.2", &[("app", "web")]);
    assert!(captured(&kept), "{}", daemon.log());
}

#[test]
fn with_inbound_pods_only_the_pods_in_the_mesh_get_an_inbound_side() {
    if !require_privileged() {
        return;
    }
    let n = Node::new();
    let mesh = n.dir.join("mesh");
    let out = std::process::Command::new(bin("drover"))
        .args(["ca", "init", "--dir"])
        .arg(&mesh)
        .output()
        .expect("ca init");
    assert!(out.status.success(), "{out:?}");
    let api = ApiServer::start(&[]);
    api.apply(NODE, node("node1", "region1", "zone1"));
    let mesh = mesh.display().to_string();
    let daemon = n.kube_daemon(&api, &["--mesh-ca", &mesh, "--inbound-pods"]);
    let add = |name: &str, ip: &str, labels: &[(&str, &str)]| {
        let p = n.add_pod(&api, name, ip, labels);
        assert!(captured(&p), "{name}: {}", daemon.log());
        p
    };
    // Its peers reach a pod in the mesh over HBONE: it serves 15008. One outside the mesh is
    // reached in plaintext, so it gets no inbound side that would refuse that.
    let hbone = |p: &Netns| p.connect("127.0.0.1:15008".parse().unwrap(), None).is_ok();
    let in_mesh = add(
        "m1",
        "198.18.80.1",
        &[("istio.io/dataplane-mode", "ambient")],
    );
    assert!(hbone(&in_mesh), "{}", daemon.log());
    let outside = add("m2", "198.18.80.2", &[]);
    assert!(!hbone(&outside), "{}", daemon.log());
}
