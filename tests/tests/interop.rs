//! HBONE interop with ztunnel itself (opt-in: `cargo xtask interop`, with `ZTUNNEL_BIN`; never
//! in CI, where no ztunnel build exists). Both sides take their certificates from one CA — the
//! test CA serving Istio's CA API, which Drover reaches with `--ca-address` and ztunnel with
//! `CA_ADDRESS` — so each trusts the other's identity. Drover pod → ztunnel pod, then ztunnel
//! pod → Drover pod, across two namespaces joined by a veth pair. Root needed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use drover_tests::{
    Daemon, Netns, PinDir, Pki, Proc, Topology, require_privileged, write_config,
    ztunnel::{self, Workload},
};

const VIP: &str = "127.77.0.10";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/test/sa/client-sa";
const SERVER_ID: &str = "spiffe://cluster.local/ns/test/sa/server-sa";

/// The ztunnel build (`ZTUNNEL_BIN`); `None` (skip) unless `cargo xtask interop` asked for it.
fn ztunnel_bin() -> Option<PathBuf> {
    match std::env::var_os("ZTUNNEL_BIN") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var_os("DROVER_INTEROP").is_none(),
                "ZTUNNEL_BIN is not set (e.g. ../shared/tools/ztunnel)"
            );
            eprintln!("skipped: ZTUNNEL_BIN is not set (opt-in interop)");
            None
        }
    }
}

#[test]
fn drover_and_ztunnel_pods_reach_each_other_over_hbone() {
    if !require_privileged() {
        return;
    }
    let Some(bin) = ztunnel_bin() else {
        return;
    };
    let pki = Pki::new();
    let dir = pki.dir.clone();
    let mesh = dir.join("mesh").display().to_string();
    let drover = |args: &[&str]| {
        let out = std::process::Command::new(drover_tests::bin("drover"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    drover(&["ca", "init", "--dir", &mesh]);
    let istiod = dir.join("istiod.pem").display().to_string();
    drover(&[
        "ca",
        "issue",
        "--dir",
        &mesh,
        "--dns",
        "localhost",
        "--spiffe",
        "spiffe://cluster.local/ns/istio-system/sa/istiod",
        "--out",
        &istiod,
    ]);
    let token = format!("node-token-{}", drover_tests::unique_id());
    let ca = drover_tests::ca::TestCa::start(
        Path::new(&mesh),
        (&dir.join("istiod.pem"), &dir.join("istiod-key.pem")),
        &token,
    );
    let tokens = dir.join("var/run/secrets/tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::write(tokens.join("istio-token"), &token).unwrap();
    let address = format!("https://localhost:{}", ca.addr.port());
    let root = format!("{mesh}/root-cert.pem");

    let t = Topology::new(1);
    let ep = Topology::ep4(1);
    // ztunnel runs inside the pods' namespaces: the same CA answers there too.
    let server_pem = (dir.join("istiod.pem"), dir.join("istiod-key.pem"));
    let _cas: Vec<_> = [&t.client, &t.endpoints[0]]
        .into_iter()
        .map(|ns| {
            let files = (server_pem.0.as_path(), server_pem.1.as_path());
            drover_tests::ca::TestCa::start_in(ns, ca.addr.port(), Path::new(&mesh), files, &token)
        })
        .collect();
    let _echo = Proc::server(
        Some(&t.endpoints[0]),
        "echo",
        &[SocketAddr::new(ep, 7000)],
        "ep1",
    );
    let xds = dir.join("xds.yaml");
    let (client_w, server_w) = (
        Workload {
            namespace: "test",
            name: "client",
            service_account: "client-sa",
            ip: Topology::client4(1),
        },
        Workload {
            namespace: "test",
            name: "server",
            service_account: "server-sa",
            ip: ep,
        },
    );
    ztunnel::write_workloads(&xds, (&client_w, &server_w), ("secure", VIP, &[(80, 7000)]));
    let env = [
        ("CA_ADDRESS", address.as_str()),
        ("CA_ROOT_CA", root.as_str()),
    ];
    let zt = |ns: &Netns, workload: &str| {
        let log = dir.join(format!("{}.log", workload.replace('/', "_")));
        ztunnel::start(&bin, ns, (&dir, Some(log)), (workload, &xds), &env)
    };
    let cfg = write_config(&format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: test}}
spec:
  hosts: [secure.test.svc]
  addresses: [{VIP}]
  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}]
  resolution: STATIC
  endpoints: [{{address: {ep}, serviceAccount: server-sa, labels: {{ambient.istio.io/redirection: enabled}}}}]
"
    ));
    let node = |netns: &str, sa: &str| {
        let pins = PinDir::new();
        let mut a = drover_tests::args(
            &cfg,
            &pins,
            &[
                "--netns",
                netns,
                "--inbound-pods",
                "--client-namespace",
                "test",
                "--service-account",
                sa,
                "--ca-address",
                &address,
                "--ca-root",
                &root,
                "--ca-token",
            ],
        );
        a.push(tokens.join("istio-token").display().to_string());
        (Daemon::start(&a).expect("drover starts"), pins)
    };

    // Drover pod → ztunnel pod.
    let server = zt(&t.endpoints[0], "test/server/server-sa");
    let (client, client_pins) = node(&t.client.name, "client-sa");
    let line = t
        .client
        .greeting(format!("{VIP}:80").parse().unwrap())
        .unwrap_or_else(|| {
            let zt = std::fs::read_to_string(dir.join("test_server_server-sa.log"));
            panic!("no greeting through ztunnel: {}\n{zt:?}", client.log())
        });
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(
        client.wait_log(
            &format!("HBONE {CLIENT_ID} -> {SERVER_ID}"),
            Duration::from_secs(3)
        ),
        "{}",
        client.log()
    );
    // Node A leaves, with its capture of the client namespace (its pins).
    drop(client);
    drop(client_pins);
    drop(server);

    // ztunnel pod → Drover pod: ztunnel captures the VIP by iptables (its own sockets exempt).
    let (node_b, _pins_b) = node(&t.endpoints[0].name, "server-sa");
    let _client_zt = zt(&t.client, "test/client/client-sa");
    ztunnel::capture(&t.client, VIP, "-A");
    let line = t
        .client
        .greeting(format!("{VIP}:80").parse().unwrap())
        .unwrap_or_else(|| {
            std::thread::sleep(Duration::from_secs(1));
            let zt = std::fs::read_to_string(dir.join("test_client_client-sa.log"));
            panic!(
                "no greeting from ztunnel through Drover: {}\n{zt:?}",
                node_b.log()
            )
        });
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(
        node_b.wait_log(&format!("HBONE from {CLIENT_ID}"), Duration::from_secs(3)),
        "{}",
        node_b.log()
    );
    let signed = ca.signed.lock().unwrap().clone();
    assert!(
        signed.contains(&CLIENT_ID.to_string()) && signed.contains(&SERVER_ID.to_string()),
        "{signed:?}"
    );
}
