//! Pods started by containerd, the runtime the kubelet uses, driven over its CRI gRPC API as the
//! kubelet drives it (`drover_tests::cri`): containerd's CRI plugin calls the real `drover-cni`,
//! chained by `drover cni install`, with the kubelet's `K8S_POD_*` arguments. Each pod's sandbox
//! runs its own origin on `127.0.0.1:7000`, and the service VIP is a loopback address inside the
//! pod, so nothing leaves the pod if capture fails: the connect is refused. Needs root,
//! containerd, runc, buildah, podman and the CNI plugins (`cargo xtask setup` installs them);
//! under `CI` it fails rather than skips.

use std::time::Duration;

use drover_tests::{Daemon, PinDir, cri::Containerd, require_privileged, write_config};

const VIP: &str = "127.77.0.62";

/// The daemon serving `bed`'s plugin socket, with service `echo` (`VIP:80` → each pod's own
/// origin).
fn daemon(bed: &Containerd, pins: &PinDir) -> Daemon {
    let cfg = write_config(&format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.default.svc]
  addresses: [{VIP}]
  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1}}]
"
    ));
    let socket = bed.cni_socket.display().to_string();
    Daemon::start(&drover_tests::args(&cfg, pins, &["--cni-socket", &socket])).expect("daemon")
}

/// The pod's first connect, made by its container the moment it starts.
const FIRST_CONNECT: [&str; 5] = ["/bin/drover-probe", "connect", "", "--send", "hi"];

fn first_connect(bed: &Containerd, sandbox: &drover_tests::cri::Sandbox) -> String {
    let vip = format!("{VIP}:80");
    let mut cmd = FIRST_CONNECT;
    cmd[2] = &vip;
    bed.run_container(sandbox, "app", &cmd)
}

#[test]
fn a_cri_pods_first_connect_is_captured_and_removing_the_sandbox_unenrols_it() {
    if !require_privileged() {
        return;
    }
    let bed = Containerd::start(40);
    let pins = PinDir::new();
    let d = daemon(&bed, &pins);
    let sandbox = bed
        .run_sandbox("shop", "client")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}\n{}", d.log(), bed.log()));
    // Enrolled under the name the kubelet's arguments give.
    assert!(
        d.log().contains("pod enrolled pod=shop/client"),
        "{}",
        d.log()
    );
    let out = first_connect(&bed, &sandbox);
    assert!(
        out.contains("hello from origin") && out.contains(r#""echo":"hi""#),
        "{out}\n{}",
        d.log()
    );
    bed.remove_sandbox(&sandbox.id)
        .unwrap_or_else(|e| panic!("remove: {e}\n{}", bed.log()));
    assert!(
        d.wait_log("pod un-enrolled pod=shop/client", Duration::from_secs(5)),
        "{}",
        d.log()
    );
}

#[test]
fn without_the_daemon_cri_sandbox_creation_fails_with_the_plugins_message_then_succeeds() {
    if !require_privileged() {
        return;
    }
    let bed = Containerd::start(41);
    let err = match bed.run_sandbox("shop", "early") {
        Ok(s) => panic!("sandbox {} made without the daemon", s.id),
        Err(e) => e,
    };
    assert!(
        err.message()
            .contains("the drover daemon is not reachable at")
            && err
                .message()
                .contains(&bed.cni_socket.display().to_string()),
        "{}",
        err.message()
    );
    let pins = PinDir::new();
    let d = daemon(&bed, &pins);
    // The kubelet tries again: the same pod now starts, captured from its first connect.
    let sandbox = bed
        .run_sandbox("shop", "early")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}\n{}", d.log(), bed.log()));
    let out = first_connect(&bed, &sandbox);
    assert!(out.contains("hello from origin"), "{out}\n{}", d.log());
}
