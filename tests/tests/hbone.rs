//! Mesh mTLS between two nodes through the real capture path: two daemons, each enrolling one
//! workload namespace with `--inbound-pods` (the client's, the server's), joined by a veth pair.
//! Endpoints labelled `ambient.istio.io/redirection: enabled` are reached over HBONE (HTTP/2
//! `CONNECT` over mutual TLS to port 15008), those labelled `security.istio.io/tlsMode: istio`
//! with ISTIO_MUTUAL; the server node terminates both in the pod's namespace with the pod's
//! identity and decides plaintext by its PeerAuthentication. Root needed; under `CI` the tests
//! fail rather than skip.

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    time::Duration,
};

use drover_tests::{Daemon, PinDir, Pki, Proc, Topology, probe, require_privileged, write_config};

const VIP: &str = "127.77.0.10";
const IMPOSTOR_VIP: &str = "127.77.0.11";
const SIDECAR_VIP: &str = "127.77.0.12";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/test/sa/client-sa";
const SERVER_ID: &str = "spiffe://cluster.local/ns/test/sa/server-sa";

/// `secure` (HBONE, TCP 80 → 7000 and HTTP 9080), `impostor` (HBONE, but expecting another
/// service account from the same pod) and `sidecar` (ISTIO_MUTUAL to the same pod).
fn config(ep: std::net::IpAddr) -> String {
    let entry = |name: &str, vip: &str, sa: &str, label: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: test}}
spec:
  hosts: [{name}.test.svc]
  addresses: [{vip}]
  ports:
  - {{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}
  - {{number: 9080, name: http, protocol: HTTP, targetPort: 9080}}
  resolution: STATIC
  endpoints: [{{address: {ep}, serviceAccount: {sa}, labels: {{{label}}}}}]
---
"
        )
    };
    entry(
        "secure",
        VIP,
        "server-sa",
        "ambient.istio.io/redirection: enabled",
    ) + &entry(
        "impostor",
        IMPOSTOR_VIP,
        "other-sa",
        "ambient.istio.io/redirection: enabled",
    ) + &entry(
        "sidecar",
        SIDECAR_VIP,
        "server-sa",
        "security.istio.io/tlsMode: istio",
    )
}

/// Two nodes of one mesh: the client namespace on node A, endpoint 1 (an echo server on 7000,
/// an HTTP server on 9080) on node B.
struct TwoNodes {
    _pki: Pki,
    mesh: String,
    cfg: std::path::PathBuf,
    t: Topology,
    ep: std::net::IpAddr,
    _servers: Vec<Proc>,
}

impl TwoNodes {
    fn new() -> Self {
        let pki = Pki::new();
        let mesh = pki.mesh_ca();
        let t = Topology::new(1);
        let ep = Topology::ep4(1);
        let servers = vec![
            Proc::server(
                Some(&t.endpoints[0]),
                "echo",
                &[
                    SocketAddr::new(ep, 7000),
                    SocketAddr::new(Topology::ep6(1), 7000),
                ],
                "ep1",
            ),
            Proc::server(
                Some(&t.endpoints[0]),
                "http",
                &[SocketAddr::new(ep, 9080)],
                "ep1",
            ),
        ];
        Self {
            cfg: write_config(&config(ep)),
            _pki: pki,
            mesh,
            t,
            ep,
            _servers: servers,
        }
    }

    /// A node enrolling `netns` as service account `sa`, inbound `mode` by default, issuing
    /// identities with the mesh CA.
    fn node(&self, netns: &str, sa: &str, mode: &str) -> (Daemon, PinDir) {
        self.node_with(netns, sa, mode, &["--mesh-ca", &self.mesh])
            .expect("daemon starts")
    }

    /// [`TwoNodes::node`] with `authority` (the CA flags) instead of the mesh CA.
    fn node_with(
        &self,
        netns: &str,
        sa: &str,
        mode: &str,
        authority: &[&str],
    ) -> Result<(Daemon, PinDir), String> {
        let pins = PinDir::new();
        let mut args: Vec<String> = [
            "--config",
            &self.cfg.display().to_string(),
            "--pin-dir",
            &pins.path.display().to_string(),
            "--client-namespace",
            "test",
            "--service-account",
            sa,
            "--netns",
            netns,
            "--inbound-pods",
            "--peer-authentication",
            mode,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(authority.iter().map(|s| s.to_string()));
        match Daemon::start(&args) {
            Ok(d) => Ok((d, pins)),
            Err((code, log)) => Err(format!("exit {code:?}: {log}")),
        }
    }

    fn client_node(&self) -> (Daemon, PinDir) {
        self.node(&self.t.client.name, "client-sa", "strict")
    }

    fn server_node(&self, mode: &str) -> (Daemon, PinDir) {
        self.node(&self.t.endpoints[0].name, "server-sa", mode)
    }

    /// A plaintext connection from the client namespace straight to the pod at `addr` (not a
    /// service address, so not captured) that speaks first: the greeting, or `None` when
    /// refused.
    fn direct_plaintext(&self, addr: SocketAddr) -> Option<String> {
        let c = self.t.client.connect(addr, None).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&c).write_all(b"ping\n").unwrap();
        let mut line = String::new();
        match BufReader::new(c).read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                None
            }
        }
    }
}

#[test]
fn pods_on_two_nodes_speak_hbone_with_both_identities_checked() {
    if !require_privileged() {
        return;
    }
    let bed = TwoNodes::new();
    let (server, _server_pins) = bed.server_node("strict");
    let (client, _client_pins) = bed.client_node();
    let vip = |ip: &str, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };

    // TCP through both nodes: the workload sees the server node's forward connection from
    // inside its namespace (source = its own address).
    let line = bed.t.client.greeting(vip(VIP, 80)).expect("greeting");
    assert!(line.starts_with("hello from ep1 peer="), "{line}");
    let peer: SocketAddr = line.trim().rsplit("peer=").next().unwrap().parse().unwrap();
    assert_eq!(peer.ip(), bed.ep, "{line}");
    // Both ends name both identities.
    assert!(
        server.wait_log(&format!("HBONE from {CLIENT_ID}"), Duration::from_secs(3)),
        "{}",
        server.log()
    );
    assert!(
        client.wait_log(
            &format!("HBONE {CLIENT_ID} -> {SERVER_ID}"),
            Duration::from_secs(3)
        ),
        "{}",
        client.log()
    );

    // HTTP over HBONE: every request answered by the pod.
    let r = probe(
        Some(&bed.t.client),
        None,
        &["http", &format!("http://{VIP}:9080/"), "--count", "5"],
    );
    assert_eq!(r["status"]["200"], 5, "{r}");

    // Several tunnels at once share one pooled connection to the pod's 15008.
    let held: Vec<_> = (0..3)
        .map(|_| {
            let c = bed.t.client.connect(vip(VIP, 80), None).unwrap();
            (&c).write_all(b"ping\n").unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(c);
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with("hello from ep1"), "{line}");
            r
        })
        .collect();
    let ss = bed
        .t
        .client
        .command("ss")
        .args(["-Htn", "state", "established"])
        .output()
        .unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout);
    let to_hbone = ss
        .lines()
        .filter(|l| l.contains(&format!("{}:15008", bed.ep)))
        .count();
    assert_eq!(to_hbone, 1, "one pooled HBONE connection: {ss}");
    drop(held);
    // Counted as each tunnel ends: one TCP and the three held (the HTTP connection's tunnel
    // stays pooled).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let tunnels = loop {
        let n = server.clusters()["inbound"]["hbone"].as_u64().unwrap();
        if n >= 4 || std::time::Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(tunnels, 4, "{}", server.clusters()["inbound"]);

    // The destination must present the identity the client expects: a pod presenting
    // server-sa where other-sa is expected is refused (no bytes reach it).
    assert_eq!(bed.t.client.greeting(vip(IMPOSTOR_VIP, 80)), None);
    assert!(
        client.wait_log("other-sa", Duration::from_secs(3)),
        "{}",
        client.log()
    );

    // A sidecar-style client (ISTIO_MUTUAL on the application port) is terminated by the same
    // pod's inbound side.
    let line = bed
        .t
        .client
        .greeting(vip(SIDECAR_VIP, 80))
        .expect("greeting");
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(
        server.wait_log(&format!("mTLS from {CLIENT_ID}"), Duration::from_secs(3)),
        "{}",
        server.log()
    );

    // STRICT: a plaintext client straight to the pod is refused, on its IPv4 and its IPv6
    // address alike (the workload listens on both).
    assert_eq!(bed.direct_plaintext(SocketAddr::new(bed.ep, 7000)), None);
    assert_eq!(
        bed.direct_plaintext(SocketAddr::new(Topology::ep6(1), 7000)),
        None
    );
    assert!(server.wait_log("plaintext client refused", Duration::from_secs(3)));
    assert_eq!(server.clusters()["inbound"]["plaintext_refused"], 2);
}

/// A packet capture on the endpoint's side of the link between the nodes (`tcpdump`, packets
/// delivered at once so that none is still buffered when it stops).
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Capture {
    fn start(bed: &TwoNodes, dir: &std::path::Path) -> Self {
        let file = dir.join("link.pcap");
        let dev = format!("d{}b1", bed.t.id);
        let mut child = bed.t.endpoints[0]
            .command("tcpdump")
            .args(["-i", &dev, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpdump (cargo xtask setup installs it)");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "tcpdump: {line}");
        Self {
            child,
            file,
            stderr,
        }
    }

    /// Stops the capture: the raw capture file and tcpdump's reading of it.
    fn stop(mut self) -> (Vec<u8>, String) {
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stderr, &mut rest);
        assert!(rest.contains("packets captured"), "tcpdump: {rest}");
        let raw = std::fs::read(&self.file).unwrap();
        let read = std::process::Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .unwrap();
        (raw, String::from_utf8_lossy(&read.stdout).into_owned())
    }
}

/// Sends `payload` on a new connection from the client namespace to `addr` and reads the
/// greeting.
fn send(bed: &TwoNodes, addr: SocketAddr, payload: &str) -> String {
    let c = bed.t.client.connect(addr, None).unwrap();
    (&c).write_all(payload.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    line
}

#[test]
fn permissive_accepts_plaintext_and_hbone_alike_and_only_plaintext_shows_on_the_wire() {
    if !require_privileged() {
        return;
    }
    let bed = TwoNodes::new();
    let (server, _server_pins) = bed.server_node("permissive");
    let (_client, _client_pins) = bed.client_node();
    let capture = Capture::start(&bed, &bed._pki.dir);
    let hidden = format!("hbone-secret-{}\n", drover_tests::unique_id());
    let shown = format!("plain-secret-{}\n", drover_tests::unique_id());
    let line = send(&bed, format!("{VIP}:80").parse().unwrap(), &hidden);
    assert!(line.starts_with("hello from ep1"), "{line}");
    let line = send(&bed, SocketAddr::new(bed.ep, 7000), &shown);
    assert!(line.starts_with("hello from ep1"), "{line}");
    let (raw, read) = capture.stop();
    let seen = |s: &str| raw.windows(s.len()).any(|w| w == s.as_bytes());
    // The capture sees plaintext when there is some (the control), and the tunnel's bytes only
    // as TLS records to and from 15008.
    assert!(
        seen(&shown),
        "the plaintext client's bytes are on the wire: {read}"
    );
    assert!(!seen(&hidden), "the HBONE client's bytes never are");
    assert!(read.contains(&format!("{}.15008", bed.ep)), "{read}");

    assert!(server.wait_log(&format!("HBONE from {CLIENT_ID}"), Duration::from_secs(3)));
    let inbound = &server.clusters()["inbound"];
    assert_eq!(inbound["plaintext_passed"], 1, "{inbound}");
    assert_eq!(inbound["hbone"], 1, "{inbound}");
}

#[test]
fn nodes_take_their_pods_certificates_from_istios_ca_api() {
    if !require_privileged() {
        return;
    }
    let bed = TwoNodes::new();
    let dir = bed._pki.dir.clone();
    let out = std::process::Command::new(drover_tests::bin("drover"))
        .args(["ca", "issue", "--dir", &bed.mesh, "--dns", "localhost"])
        .args([
            "--spiffe",
            "spiffe://cluster.local/ns/istio-system/sa/istiod",
            "--out",
        ])
        .arg(dir.join("istiod.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let token = format!("node-token-{}", drover_tests::unique_id());
    let ca = drover_tests::ca::TestCa::start(
        std::path::Path::new(&bed.mesh),
        (&dir.join("istiod.pem"), &dir.join("istiod-key.pem")),
        &token,
    );
    let token_file = dir.join("istio-token");
    std::fs::write(&token_file, &token).unwrap();
    let address = format!("https://localhost:{}", ca.addr.port());
    let root = format!("{}/root-cert.pem", bed.mesh);
    let remote = [
        "--ca-address",
        address.as_str(),
        "--ca-root",
        root.as_str(),
        "--ca-token",
        token_file.to_str().unwrap(),
    ];
    let (server, _server_pins) = bed
        .node_with(&bed.t.endpoints[0].name, "server-sa", "strict", &remote)
        .unwrap();
    let (_client, _client_pins) = bed
        .node_with(&bed.t.client.name, "client-sa", "strict", &remote)
        .unwrap();
    // Each node asked the CA for its pod's identity, with its token.
    let signed = ca.signed.lock().unwrap().clone();
    assert!(signed.contains(&CLIENT_ID.to_string()), "{signed:?}");
    assert!(signed.contains(&SERVER_ID.to_string()), "{signed:?}");
    // And the pods talk over HBONE with those certificates.
    let line = bed
        .t
        .client
        .greeting(format!("{VIP}:80").parse().unwrap())
        .expect("greeting");
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(server.wait_log(&format!("HBONE from {CLIENT_ID}"), Duration::from_secs(3)));

    // A node whose token the CA refuses does not start, naming the CA and its answer.
    std::fs::write(&token_file, "stolen").unwrap();
    let refused = bed
        .node_with(&bed.t.endpoints[0].name, "server-sa", "strict", &remote)
        .err()
        .expect("refused");
    assert!(
        refused.contains(&format!("CA {address}")) && refused.contains("bad token"),
        "{refused}"
    );
}

// === interop with Envoy ===

/// The TLS context of an Envoy presenting `name`'s certificate (issued under `dir`) and
/// verifying the peer's SPIFFE id with `san` (an Envoy string matcher).
fn envoy_tls(dir: &std::path::Path, root: &str, name: &str, san: &str) -> String {
    format!(
        "common_tls_context:
            alpn_protocols: [h2]
            tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
            tls_certificates:
            - certificate_chain: {{filename: {cert}}}
              private_key: {{filename: {key}}}
            validation_context:
              trusted_ca: {{filename: {root}}}
              match_typed_subject_alt_names: [{{san_type: URI, matcher: {san}}}]",
        cert = dir.join(format!("{name}.pem")).display(),
        key = dir.join(format!("{name}-key.pem")).display(),
    )
}

/// Envoy terminating HBONE on `ep:15008` as Istio's inbound does: mutual TLS, HTTP/2 `CONNECT`
/// routed (with the tunnel's `:authority` logged) to the workload's port 7000.
fn envoy_hbone_server(dir: &std::path::Path, root: &str, ep: std::net::IpAddr) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: hbone
    address: {{socket_address: {{address: {ep}, port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format: {{text_format_source: {{inline_string: "hbone-server %REQ(:METHOD)% %REQ(:AUTHORITY)% from %DOWNSTREAM_PEER_URI_SAN% %RESPONSE_CODE%\n"}}}}
          route_config:
            virtual_hosts:
            - name: inbound
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route: {{cluster: app, upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ep}, port_value: 7000}}}}}}}}]}}]
"#,
        tls = envoy_tls(
            dir,
            root,
            "server",
            r#"{prefix: "spiffe://cluster.local/"}"#
        ),
    )
}

/// Envoy originating HBONE as Istio's waypoints do: the application's connection (to
/// 127.0.0.1:15555) goes through an internal listener whose TCP proxy tunnels it with HTTP/2
/// `CONNECT ep:7000` over mutual TLS to `ep:15008`, requiring the server's SPIFFE id.
fn envoy_hbone_client(dir: &std::path::Path, root: &str, ep: std::net::IpAddr) -> String {
    format!(
        r#"bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config: {{"@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener}}
static_resources:
  listeners:
  - name: app
    address: {{socket_address: {{address: 127.0.0.1, port_value: 15555}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: app
          cluster: connect_originate
  - name: connect_originate
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: connect_originate
          cluster: hbone
          tunneling_config: {{hostname: "{ep}:7000"}}
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format: {{text_format_source: {{inline_string: "hbone-client to %UPSTREAM_PEER_URI_SAN% %UPSTREAM_HOST%\n"}}}}
  clusters:
  - name: connect_originate
    load_assignment:
      cluster_name: connect_originate
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{envoy_internal_address: {{server_listener_name: connect_originate}}}}}}}}]}}]
  - name: hbone
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
    load_assignment:
      cluster_name: hbone
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ep}, port_value: 15008}}}}}}}}]}}]
"#,
        tls = envoy_tls(dir, root, "client", &format!(r#"{{exact: "{SERVER_ID}"}}"#))
            .replace("\n            ", "\n          "),
    )
}

#[test]
fn drover_and_envoy_speak_hbone_to_each_other() {
    if !require_privileged() {
        return;
    }
    let Some(envoy) = drover_tests::envoy::bin() else {
        return;
    };
    let bed = TwoNodes::new();
    let dir = bed._pki.dir.clone();
    let root = format!("{}/root-cert.pem", bed.mesh);
    for (name, id) in [("server", SERVER_ID), ("client", CLIENT_ID)] {
        let out = std::process::Command::new(drover_tests::bin("drover"))
            .args(["ca", "issue", "--dir", &bed.mesh, "--spiffe", id, "--out"])
            .arg(dir.join(format!("{name}.pem")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    // Drover → Envoy: the pod on the server node is fronted by Envoy terminating HBONE.
    let server = drover_tests::envoy::Envoy::start(
        &envoy,
        &bed.t.endpoints[0],
        &dir,
        "envoy-server",
        &envoy_hbone_server(&dir, &root, bed.ep),
    );
    server.wait_listening(&bed.t.client, SocketAddr::new(bed.ep, 15008));
    let (client, _client_pins) = bed.client_node();
    let line = bed
        .t
        .client
        .greeting(format!("{VIP}:80").parse().unwrap())
        .expect("greeting through Envoy's HBONE server");
    assert!(line.starts_with("hello from ep1"), "{line}");
    let expected = format!("hbone-server CONNECT {}:7000 from {CLIENT_ID} 200", bed.ep);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !server.log().contains(&expected) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(server.log().contains(&expected), "{}", server.log());
    assert!(
        client
            .log()
            .contains(&format!("HBONE {CLIENT_ID} -> {SERVER_ID}"))
    );
    drop(client);
    drop(server);

    // Envoy → Drover: Envoy originates HBONE from the client namespace to the pod that the
    // server node enrolled.
    let (node, _server_pins) = bed.server_node("strict");
    let origin = drover_tests::envoy::Envoy::start(
        &envoy,
        &bed.t.client,
        &dir,
        "envoy-client",
        &envoy_hbone_client(&dir, &root, bed.ep),
    );
    origin.wait_listening(&bed.t.client, "127.0.0.1:15555".parse().unwrap());
    let line = bed
        .t
        .client
        .greeting("127.0.0.1:15555".parse().unwrap())
        .unwrap_or_else(|| {
            panic!(
                "no greeting through Drover's HBONE server:\n{}\n{}",
                origin.log(),
                node.log()
            )
        });
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(
        node.wait_log(&format!("HBONE from {CLIENT_ID}"), Duration::from_secs(3)),
        "{}",
        node.log()
    );
    let expected = format!("hbone-client to {SERVER_ID} {}:15008", bed.ep);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !origin.log().contains(&expected) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(origin.log().contains(&expected), "{}", origin.log());
}
