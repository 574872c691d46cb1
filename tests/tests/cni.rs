//! Pods enrolled through the `drover-cni` chained plugin, with the real container runtime as the
//! kubelet's stand-in (`drover_tests::podman`): podman calls the real plugin with the real CNI
//! environment, the plugin hands the pod's network namespace to the daemon, and the pod's very
//! first connect — made by its entrypoint the moment it starts — is captured. Needs root,
//! podman, buildah and the CNI plugins (`cargo xtask setup` installs them); under `CI` it fails
//! rather than skips. The service VIP is a loopback address inside the pod, so nothing leaves
//! the pod if capture fails: the connect is refused.

use std::time::Duration;

use drover_tests::{Daemon, PinDir, netns_fds, podman::Bed, require_privileged, write_config};

const VIP: &str = "127.77.0.60";

/// Service `echo` (`VIP:80`) served by the pod at `.10` of `bed`, port 7000.
fn service(bed: &Bed) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.default.svc]
  addresses: [{VIP}]
  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}]
  resolution: STATIC
  endpoints: [{{address: {}10}}]
",
        bed.prefix
    )
}

/// The daemon serving `bed`'s plugin socket.
fn daemon(bed: &Bed, pins: &PinDir) -> Daemon {
    daemon_with(bed, pins, &service(bed))
}

/// The daemon serving `bed`'s plugin socket with configuration `yaml`.
fn daemon_with(bed: &Bed, pins: &PinDir, yaml: &str) -> Daemon {
    let cfg = write_config(yaml);
    start_daemon(&drover_tests::args(&cfg, pins, &[]), bed, false)
}

/// `drover run ARGS` serving `bed`'s plugin socket; with `install`, it also installs the plugin
/// into the bed's CNI directories and keeps it chained.
fn start_daemon(args: &[String], bed: &Bed, install: bool) -> Daemon {
    let mut args = args.to_vec();
    args.extend(["--cni-socket".to_string(), bed.socket.display().to_string()]);
    if install {
        for (flag, dir) in [("--cni-conf-dir", "net.d"), ("--cni-bin-dir", "cni")] {
            args.extend([flag.to_string(), bed.dir.join(dir).display().to_string()]);
        }
    }
    Daemon::start(&args).expect("daemon starts")
}

/// The arguments of a daemon in Kubernetes mode against `cluster`'s API server, node `node1`.
fn kube_args(bed: &Bed, cluster: &drover_tests::k8s::Cluster, pins: &PinDir) -> Vec<String> {
    let kubeconfig = bed.dir.join("kubeconfig");
    cluster.api.write_kubeconfig(&kubeconfig);
    ["--kubernetes", "--kubeconfig"]
        .map(String::from)
        .into_iter()
        .chain([kubeconfig.display().to_string()])
        .chain(["--node-name", "node1", "--pin-dir"].map(String::from))
        .chain([pins.path.display().to_string()])
        .collect()
}

/// A client pod whose entrypoint connects to the VIP at once: what it printed.
fn first_connect(bed: &Bed, name: &str, host: u8) -> std::process::Output {
    bed.run(
        name,
        host,
        &[
            "/bin/drover-probe",
            "connect",
            &format!("{VIP}:80"),
            "--send",
            "hi",
        ],
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Starts the service's server pod at `.10`: an echo server on 7000 that greets as `srvpod`.
fn start_server(bed: &Bed) {
    let listen = format!("{}10:7000", bed.prefix);
    let out = bed.start(
        "srv",
        10,
        &[
            "/bin/drover-testsrv",
            "echo",
            "--listen",
            &listen,
            "--name",
            "srvpod",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// Starts pod `name` at `.host` that only stays up (a server nobody calls).
fn start_idle(bed: &Bed, name: &str, host: u8) {
    let listen = format!("{}{host}:7001", bed.prefix);
    let out = bed.start(
        name,
        host,
        &["/bin/drover-testsrv", "echo", "--listen", &listen],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_new_pods_first_connect_is_captured_and_a_deleted_pod_is_unenrolled() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(241, None);
    let pins = PinDir::new();
    let d = daemon(&bed, &pins);
    let pid = d.pid().expect("daemon pid");
    let before = netns_fds(pid);
    start_server(&bed);
    assert!(d.wait_log(
        &format!("pod enrolled pod=default/{}", bed.pod("srv")),
        Duration::from_secs(5)
    ));
    let out = first_connect(&bed, "cli", 11);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}\n{}", d.log());
    assert!(
        printed.contains("hello from srvpod"),
        "the first connect went through drover: {printed}"
    );
    let log = d.log();
    let cli = bed.pod("cli");
    assert!(
        log.contains(&format!("pod enrolled pod=default/{cli}")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "tcp netns=default/{cli} src=Some({}11:",
            bed.prefix
        )),
        "the access log names the pod and its address: {log}"
    );
    // The `--rm` pod's DEL un-enrolled it and released its namespace.
    let gone = |pod: &str| format!("pod un-enrolled pod=default/{}", bed.pod(pod));
    assert!(d.wait_log(&gone("cli"), Duration::from_secs(5)));
    bed.remove("srv");
    assert!(d.wait_log(&gone("srv"), Duration::from_secs(5)));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while netns_fds(pid) > before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(netns_fds(pid), before, "no pod namespace held after DEL");
}

#[test]
fn without_the_daemon_pods_fail_to_start_with_the_plugins_message_then_start_once_it_is_back() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(242, None);
    let out = first_connect(&bed, "early", 11);
    assert!(!out.status.success());
    let printed = text(&out);
    assert!(
        printed.contains("the drover daemon is not reachable at")
            && printed.contains(&bed.socket.display().to_string()),
        "{printed}"
    );
    let pins = PinDir::new();
    let _d = daemon(&bed, &pins);
    start_server(&bed);
    let out = first_connect(&bed, "late", 12);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("hello from"), "{}", text(&out));
}

#[test]
fn pods_of_excluded_namespaces_are_not_handed_to_the_daemon() {
    if !require_privileged() {
        return;
    }
    // podman names no namespace: its pods are in `default`, excluded here.
    let bed = Bed::new(243, Some(&["default"]));
    let pins = PinDir::new();
    let d = daemon(&bed, &pins);
    let out = first_connect(&bed, "outside", 11);
    let printed = text(&out);
    assert!(out.status.success(), "the pod starts: {printed}");
    assert!(
        printed.contains("refused"),
        "not captured: the loopback VIP refuses: {printed}"
    );
    assert!(!d.log().contains("pod enrolled"), "{}", d.log());
}

/// `drover-probe connect VIP:80` run inside running pod `name` (`podman exec`): its output.
fn connect_from(bed: &Bed, name: &str) -> String {
    text(&bed.exec(
        name,
        &[
            "/bin/drover-probe",
            "connect",
            &format!("{VIP}:80"),
            "--send",
            "hi",
        ],
    ))
}

/// Like [`connect_from`], retried (bounded, 5 s) until the server pod answers: its process may
/// still be starting when `podman run -d` returns.
fn greeted_from(bed: &Bed, name: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = connect_from(bed, name);
        if out.contains("hello from") || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_restarted_daemon_restores_its_pods_and_forgets_the_ones_deleted_meanwhile() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(244, None);
    let pins = PinDir::new();
    let first = daemon(&bed, &pins);
    start_server(&bed);
    // A long-running client pod (its process only keeps it alive).
    start_idle(&bed, "cli", 11);
    let out = greeted_from(&bed, "cli");
    assert!(out.contains("hello from srvpod"), "{out}");
    drop(first);

    let second = daemon(&bed, &pins);
    assert!(
        second.wait_log("CNI enrolments restored restored=2", Duration::from_secs(5)),
        "{}",
        second.log()
    );
    let out = connect_from(&bed, "cli");
    assert!(
        out.contains("hello from srvpod"),
        "restored: {out}\n{}",
        second.log()
    );
    assert!(
        second
            .log()
            .contains(&format!("tcp netns=default/{}", bed.pod("cli"))),
        "{}",
        second.log()
    );
    drop(second);

    // Deleted while no daemon runs (the plugin's DEL cannot be delivered; it succeeds anyway).
    bed.remove("srv");
    let third = daemon(&bed, &pins);
    assert!(
        third.wait_log("CNI enrolments restored restored=1", Duration::from_secs(5)),
        "{}",
        third.log()
    );
    assert!(
        third
            .log()
            .contains(&format!("pod=default/{}", bed.pod("srv"))),
        "{}",
        third.log()
    );
    let out = connect_from(&bed, "cli");
    assert!(
        out.contains("refused") || out.contains("reset") || out.contains("error"),
        "the service's only pod is gone: {out}"
    );
    let captured = format!("netns=default/{}", bed.pod("cli"));
    assert!(
        third.wait_log(&captured, Duration::from_secs(3)),
        "captured by the restarted daemon: {}",
        third.log()
    );
}

#[test]
fn the_daemon_keeps_the_plugin_chained_and_uninstall_removes_it() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(245, None);
    let pins = PinDir::new();
    let cfg = write_config(&service(&bed));
    let (bin_dir, conf_dir) = (bed.dir.join("cni"), bed.dir.join("net.d"));
    let d = start_daemon(&drover_tests::args(&cfg, &pins, &[]), &bed, true);
    start_server(&bed);
    // The network's installer rewrites its file without drover-cni: the daemon chains it again,
    // and the next pod is captured.
    bed.write_network();
    assert!(
        d.wait_log("chained again", Duration::from_secs(5)),
        "{}",
        d.log()
    );
    assert!(
        std::fs::read_to_string(bed.conflist())
            .unwrap()
            .contains("drover-cni")
    );
    let out = first_connect(&bed, "after-rewrite", 11);
    assert!(text(&out).contains("hello from"), "{}", text(&out));
    drop(d);

    // Uninstalled: the entry and the binary are gone, pods start without any daemon and are
    // not captured.
    bed.drover(&[
        "cni",
        "uninstall",
        "--cni-bin-dir",
        &bin_dir.display().to_string(),
        "--cni-conf-dir",
        &conf_dir.display().to_string(),
    ]);
    assert!(
        !std::fs::read_to_string(bed.conflist())
            .unwrap()
            .contains("drover-cni")
    );
    assert!(!bin_dir.join("drover-cni").exists());
    let out = first_connect(&bed, "uninstalled", 12);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refused"), "{}", text(&out));
}

#[test]
fn in_kubernetes_mode_an_enrolled_pod_gets_its_pods_identity_and_the_apis_services() {
    if !require_privileged() {
        return;
    }
    use drover_tests::{
        apiserver::{ISTIO, POD},
        k8s::{Cluster, pod},
    };
    let bed = Bed::new(246, None);
    let ip = |host: u8| format!("{}{host}", bed.prefix);
    // Service shop/echo (VIP:80 → 7000) backed by the server pod; the client pod's Pod object
    // is what the daemon finds by the enrolled namespace's address.
    let mut cluster = Cluster::new(&ISTIO, "shop", "echo", VIP, ("tcp-echo", 80, 7000));
    cluster.add_pod("srv", &[("app", "echo")], &ip(10));
    cluster.api.apply(
        POD,
        pod(
            "shop",
            "cli",
            &[("role", "canary")],
            "cli-sa",
            "node1",
            &ip(11),
        ),
    );
    let pins = PinDir::new();
    let d = start_daemon(&kube_args(&bed, &cluster, &pins), &bed, false);
    start_server(&bed);
    let canary = first_connect(&bed, "cli", 11);
    assert!(
        text(&canary).contains("hello from srvpod"),
        "{}\n{}",
        text(&canary),
        d.log()
    );
    assert!(
        d.log().contains(&format!(
            "netns=default/{} addresses=[{}] identity=Pod(\"shop/cli\")",
            bed.pod("cli"),
            ip(11)
        )),
        "{}",
        d.log()
    );
    // A pod the API server does not know has the daemon's own identity.
    let other = first_connect(&bed, "other", 12);
    assert!(
        text(&other).contains("hello from srvpod"),
        "{}",
        text(&other)
    );
    let flags = format!(
        "netns=default/{} addresses=[{}] identity=Flags",
        bed.pod("other"),
        ip(12)
    );
    assert!(d.log().contains(&flags), "{}", d.log());
}

#[test]
fn pods_that_started_before_the_daemon_are_found_through_proc_and_enrolled() {
    if !require_privileged() {
        return;
    }
    use drover_tests::{
        apiserver::{ISTIO, POD},
        k8s::{Cluster, pod},
    };
    let bed = Bed::new(247, None);
    // The plugin is not chained yet (as before the first daemon): pods start uncaptured.
    bed.write_network();
    let ip = |host: u8| format!("{}{host}", bed.prefix);
    let (srv, cli) = (bed.pod("srv"), bed.pod("cli"));
    start_server(&bed);
    start_idle(&bed, "cli", 11);
    assert!(
        connect_from(&bed, "cli").contains("refused"),
        "not captured yet"
    );
    // Their Pod objects on this node (podman names them in namespace `default`).
    let mut cluster = Cluster::new(&ISTIO, "default", "echo", VIP, ("tcp-echo", 80, 7000));
    cluster.add_pod(&srv, &[("app", "echo")], &ip(10));
    cluster.api.apply(
        POD,
        pod(
            "default",
            &cli,
            &[("app", "cli")],
            "default",
            "node1",
            &ip(11),
        ),
    );
    let pins = PinDir::new();
    let d = start_daemon(&kube_args(&bed, &cluster, &pins), &bed, true);
    // Found before the daemon said ready.
    assert!(
        d.log()
            .contains("reconciled: pods found through /proc enrolled pods=2"),
        "{}",
        d.log()
    );
    let out = connect_from(&bed, "cli");
    assert!(out.contains("hello from srvpod"), "{out}\n{}", d.log());
    // Gone from the API server (the runtime's DEL never reaches the plugin for a pod set up
    // without it): the next pass un-enrols it.
    bed.remove("cli");
    cluster.api.delete(POD, "default", &cli);
    assert!(
        d.wait_log(
            &format!("pod un-enrolled pod=default/{cli}"),
            drover::cni::reconcile::EVERY + Duration::from_secs(5)
        ),
        "{}",
        d.log()
    );
}

#[test]
fn an_upgrade_hands_the_sockets_over_without_a_failed_connection() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(248, None);
    let pins = PinDir::new();
    // Beside `echo` (TCP), `web`: HTTP on 127.77.0.61:80, served by the pod at .13.
    let web = service(&bed)
        .replace("name: echo", "name: web")
        .replace("echo.default.svc", "web.default.svc")
        .replace(VIP, "127.77.0.61")
        .replace(
            "name: tcp, protocol: TCP, targetPort: 7000",
            "name: http, protocol: HTTP, targetPort: 7080",
        )
        .replace(
            &format!("{}10}}", bed.prefix),
            &format!("{}13}}", bed.prefix),
        );
    let yaml = format!("{}---\n{web}", service(&bed));
    let old = daemon_with(&bed, &pins, &yaml);
    start_server(&bed);
    let listen = format!("{}13:7080", bed.prefix);
    let http = bed.start(
        "web",
        13,
        &["/bin/drover-testsrv", "http", "--listen", &listen],
    );
    assert!(http.status.success(), "{}", text(&http));
    start_idle(&bed, "cli", 11);
    start_idle(&bed, "cli2", 12);
    assert!(greeted_from(&bed, "cli").contains("hello from srvpod"));
    // Load from two pods while the new daemon takes over and the old one is stopped: TCP
    // connect-request-close back to back (the probe stops at its first failure), and `hey` with
    // 4 HTTP/1.1 keep-alive connections.
    let (tcp, hey, new) = std::thread::scope(|s| {
        let tcp = s.spawn(|| {
            let vip = format!("{VIP}:80");
            let crr = [
                "/bin/drover-probe",
                "crr",
                &vip,
                "--count",
                "1000000",
                "--max-secs",
                "6",
            ];
            text(&bed.exec("cli", &crr))
        });
        let hey = s.spawn(|| {
            text(&bed.exec(
                "cli2",
                &["/bin/hey", "-z", "6s", "-c", "4", "http://127.77.0.61/"],
            ))
        });
        std::thread::sleep(Duration::from_secs(1));
        let new = daemon_with(&bed, &pins, &yaml);
        assert!(
            new.log()
                .contains("took over from the running daemon pods=4"),
            "{}",
            new.log()
        );
        assert!(old.wait_log("handed over to the new daemon", Duration::from_secs(5)));
        std::thread::sleep(Duration::from_secs(1));
        drop(old);
        (tcp.join().expect("tcp load"), hey.join().expect("hey"), new)
    });
    let v: serde_json::Value = serde_json::from_str(tcp.trim()).unwrap_or_default();
    assert!(
        v.get("error").is_none() && v["n"].as_u64() > Some(100),
        "{tcp}\n{}",
        new.log()
    );
    let codes: Vec<&str> = hey
        .lines()
        .skip_while(|l| !l.starts_with("Status code distribution"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('['))
        .collect();
    assert!(
        codes.len() == 1 && codes[0].contains("[200]") && !hey.contains("Error distribution"),
        "every request answered 200: {hey}"
    );
    // The new daemon serves the pods on the sockets it was handed.
    assert!(connect_from(&bed, "cli").contains("hello from srvpod"));
}

#[test]
fn the_daemon_runs_from_its_image_with_the_daemonsets_capabilities_and_mounts() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(249, None);
    let pins = PinDir::new();
    let cfg = write_config(&service(&bed));
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let dir = |p: &str| bed.dir.join(p).display().to_string();
    let mut args = drover_tests::args(
        &cfg,
        &pins,
        &[
            "--cni-socket",
            &bed.socket.display().to_string(),
            "--cni-conf-dir",
            &dir("net.d"),
            "--cni-bin-dir",
            &dir("cni"),
        ],
    );
    args.extend(["--admin".to_string(), admin.to_string()]);
    let cmd = bed.daemon_in_container(&args, &[&bed.dir, cfg.parent().unwrap()]);
    let d = Daemon::spawn(cmd, Some(admin), Duration::from_secs(60)).expect("daemon starts");
    start_server(&bed);
    let out = first_connect(&bed, "cli", 11);
    assert!(
        text(&out).contains("hello from srvpod"),
        "{}\n{}",
        text(&out),
        d.log()
    );
    assert!(
        d.log()
            .contains(&format!("pod enrolled pod=default/{}", bed.pod("cli"))),
        "{}",
        d.log()
    );
}

#[test]
fn a_host_network_namespace_is_never_enrolled() {
    if !require_privileged() {
        return;
    }
    use drover::cni::{Command, Request, request};
    let dir = std::env::temp_dir().join(format!("drover-hostnet-{}", drover_tests::unique_id()));
    let socket = dir.join("cni.sock");
    let pins = PinDir::new();
    let cfg = write_config("");
    let d = Daemon::start(&drover_tests::args(
        &cfg,
        &pins,
        &[
            "--allow-empty",
            "--cni-socket",
            &socket.display().to_string(),
        ],
    ))
    .expect("daemon starts");
    // What a runtime would send for a host-network pod: the host's own namespace.
    let ask = |command: Command| {
        let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("socket");
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/proc/self/ns/net").unwrap().into();
        let req = Request {
            pod_namespace: "shop".into(),
            pod_name: "on-the-host".into(),
            netns: "/proc/self/ns/net".into(),
            ..Request::new(command, "hostnet")
        };
        request(&mut stream, &req, Some(&fd)).expect("reply")
    };
    assert!(ask(Command::Add).ok, "ADD succeeds (the pod may start)");
    assert!(d.wait_log("host-network pod: not enrolled", Duration::from_secs(3)));
    let check = ask(Command::Check);
    assert!(!check.ok, "nothing enrolled: {check:?}");
    assert!(!d.log().contains("pod enrolled"), "{}", d.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_inbound_pods_an_enrolled_pod_is_reached_over_hbone_and_refuses_plaintext() {
    if !require_privileged() {
        return;
    }
    let bed = Bed::new(251, None);
    let pins = PinDir::new();
    let mesh = bed.dir.join("mesh");
    let out = std::process::Command::new(drover_tests::bin("drover"))
        .args(["ca", "init", "--dir"])
        .arg(&mesh)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The server pod is marked as istio-cni marks ambient pods: reached over HBONE.
    let yaml = service(&bed).replace(
        "endpoints: [{address: ",
        "endpoints: [{labels: {ambient.istio.io/redirection: enabled}, address: ",
    );
    assert!(yaml.contains("ambient.istio.io/redirection"), "{yaml}");
    let cfg = write_config(&yaml);
    let mesh = mesh.display().to_string();
    let args = drover_tests::args(
        &cfg,
        &pins,
        &[
            "--mesh-ca",
            &mesh,
            "--inbound-pods",
            "--client-namespace",
            "default",
        ],
    );
    let d = start_daemon(&args, &bed, false);
    start_server(&bed);
    assert!(d.wait_log(
        &format!("pod enrolled pod=default/{}", bed.pod("srv")),
        Duration::from_secs(5)
    ));
    let id = "spiffe://cluster.local/ns/default/sa/default";
    let out = first_connect(&bed, "cli", 11);
    let printed = text(&out);
    assert!(
        out.status.success() && printed.contains("hello from srvpod"),
        "{printed}\n{}",
        d.log()
    );
    assert!(
        d.wait_log(&format!("HBONE from {id}"), Duration::from_secs(3)),
        "the server pod's inbound side served the tunnel: {}",
        d.log()
    );
    // Plaintext straight to the pod (from the host, not captured) meets its inbound side,
    // STRICT by default: refused.
    let addr: std::net::SocketAddr = format!("{}10:7000", bed.prefix).parse().unwrap();
    let c = drover_tests::dial(addr, None).expect("connect");
    std::io::Write::write_all(&mut &c, b"ping\n").unwrap();
    let mut line = String::new();
    match std::io::BufRead::read_line(&mut std::io::BufReader::new(c), &mut line) {
        Ok(n) => assert_eq!(n, 0, "refused: {line}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(d.wait_log("plaintext client refused", Duration::from_secs(3)));
    bed.remove("srv");
    assert!(d.wait_log(
        &format!("pod un-enrolled pod=default/{}", bed.pod("srv")),
        Duration::from_secs(5)
    ));
}
