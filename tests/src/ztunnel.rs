//! ztunnel (Istio ambient's node proxy, `ZTUNNEL_BIN`) as a peer for the opt-in interop test
//! and the HBONE bench: dedicated mode for one workload, workloads from a local file, one worker,
//! its own sockets marked 1337; capture of a VIP by iptables REDIRECT in the client's namespace.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Netns, Proc, sh};

/// A workload of the local file: `namespace`, `name`, `service_account`, address.
pub struct Workload<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub service_account: &'a str,
    pub ip: IpAddr,
}

/// Writes ztunnel's local workload file to `path`: `client` and `server` (both HBONE, trust
/// domain `cluster.local`), the server behind service `name.namespace` at `vip`, `ports`
/// (service port → target port).
pub fn write_workloads(
    path: &Path,
    (client, server): (&Workload<'_>, &Workload<'_>),
    (service, vip, ports): (&str, &str, &[(u16, u16)]),
) {
    let ns = server.namespace;
    let host = format!("{service}.{ns}.svc.cluster.local");
    let ports: Vec<String> = ports.iter().map(|(p, t)| format!("{p}: {t}")).collect();
    let ports = ports.join(", ");
    let workload = |w: &Workload<'_>, node: &str, services: String| {
        format!(
            "- uid: cluster1//v1/Pod/{ns}/{name}
  name: {name}
  namespace: {ns}
  serviceAccount: {sa}
  workloadIps: [{ip}]
  protocol: HBONE
  trustDomain: cluster.local
  node: {node}
  network: \"\"
  services: {services}
",
            ns = w.namespace,
            name = w.name,
            sa = w.service_account,
            ip = w.ip,
        )
    };
    let yaml = format!(
        "workloads:\n{}{}services:\n- name: {service}\n  namespace: {ns}\n  hostname: {host}\n  vips: [\"/{vip}\"]\n  ports: {{{ports}}}\n",
        workload(client, "a", "{}".into()),
        workload(server, "b", format!("{{\"{ns}/{host}\": {{{ports}}}}}")),
    );
    std::fs::write(path, yaml).expect("ztunnel workloads");
}

/// Starts `bin` in `netns` for workload `ns/name/sa` with the workloads of `xds` and `env`
/// (the CA: `FAKE_CA`, or `CA_ADDRESS` and `CA_ROOT_CA`), from `cwd` (where a token is found);
/// its output goes to `log`. Waits (15 s at most) for its readiness port.
pub fn start(
    bin: &Path,
    netns: &Netns,
    (cwd, log): (&Path, Option<PathBuf>),
    (workload, xds): (&str, &Path),
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = netns.command(bin);
    cmd.current_dir(cwd)
        .env("XDS_ADDRESS", "")
        .env("LOCAL_XDS_PATH", xds)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", workload)
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("PACKET_MARK", "1337")
        .env("ENABLE_ORIG_SRC", "false");
    for (k, v) in env {
        cmd.env(k, v);
    }
    match log {
        Some(path) => {
            let f = std::fs::File::create(path).expect("ztunnel log");
            cmd.stdout(f.try_clone().expect("log")).stderr(f);
        }
        None => {
            cmd.env("RUST_LOG", "error")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        }
    }
    let proc = Proc {
        child: cmd.spawn().expect("start ztunnel"),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while netns
        .connect("127.0.0.1:15021".parse().expect("address"), None)
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "ztunnel {workload} not ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    proc
}

/// The iptables rules that send `netns`'s connections to `vip` to ztunnel's 15001 (its own
/// marked sockets exempt): `-A` adds them, `-D` removes them.
pub fn capture(netns: &Netns, vip: &str, op: &str) {
    for rule in [
        &["-m", "mark", "--mark", "1337", "-j", "RETURN"][..],
        &["-d", vip, "-j", "REDIRECT", "--to-ports", "15001"][..],
    ] {
        let mut cmd = vec![
            "ip",
            "netns",
            "exec",
            &netns.name,
            "iptables",
            "-t",
            "nat",
            op,
            "OUTPUT",
            "-p",
            "tcp",
        ];
        cmd.extend(rule);
        sh(&cmd);
    }
}
