//! TLS origination through the real capture path: the application speaks plaintext to the VIP,
//! Drover originates TLS (SIMPLE, MUTUAL) to a real rustls server in an endpoint namespace, with
//! certificates made by rcgen for the test. Root needed; under `CI` the tests fail rather than
//! skip.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    time::Duration,
};

use drover_tests::{
    Daemon, Mesh, MeshBuilder, PinDir, Pki, Proc, Topology, pem_id, probe, require_privileged,
    write_config,
};
use serde_json::Value;

const VIP: &str = "127.77.0.10";

/// `secure` in namespace `test`: VIP:80 (`tcp`) → 7443 and VIP:9080 (`http`) → 9443 on ep1.
fn service() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: test}}
spec:
  hosts: [secure.test.svc]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: tcp, protocol: TCP, targetPort: 7443}}
  - {{number: 9080, name: http, protocol: HTTP, targetPort: 9443}}
  resolution: STATIC
  endpoints: [{{address: {}}}]
",
        Topology::ep4(1)
    )
}

/// `secure` whose endpoint runs as service account `sa` (its SPIFFE identity in namespace `test`).
fn service_with_account(sa: &str) -> String {
    service().replace(
        &format!("endpoints: [{{address: {}}}]", Topology::ep4(1)),
        &format!(
            "endpoints: [{{address: {}, serviceAccount: {sa}}}]",
            Topology::ep4(1)
        ),
    )
}

/// Runs `drover ARGS` to completion; its stdout (asserting success).
fn drover(args: &[&str]) -> String {
    let out = std::process::Command::new(drover_tests::bin("drover"))
        .args(args)
        .output()
        .expect("run drover");
    assert!(
        out.status.success(),
        "drover {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mesh CA made with `drover ca init` under `pki`'s directory: its path.
fn mesh_ca(pki: &Pki) -> String {
    let mesh = pki.dir.join("mesh").display().to_string();
    drover(&["ca", "init", "--dir", &mesh]);
    mesh
}

/// A DestinationRule for `secure` with `tls` (one flow-style mapping).
fn rule(tls: &str) -> String {
    format!(
        "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: test}}
spec:
  host: secure.test.svc
  trafficPolicy:
    tls: {tls}
"
    )
}

/// TLS servers on ep1 (echo on 7443, http on 9443) with `server_args`, and a daemon for `yaml`.
fn setup(server_args: &[String], yaml: &str, extra: &[&str]) -> Mesh {
    MeshBuilder::new(1)
        .server(1, "echo", &[7443], "ep1", server_args)
        .server(1, "http", &[9443], "ep1", server_args)
        .yaml(yaml)
        .args(extra)
        .start()
}

fn server_tls(pki: &Pki, cert: &(std::path::PathBuf, std::path::PathBuf)) -> Vec<String> {
    let _ = pki;
    vec![
        "--tls-cert".into(),
        cert.0.display().to_string(),
        "--tls-key".into(),
        cert.1.display().to_string(),
    ]
}

/// A rule whose handshake must fail: no byte reaches the application, `counter` counts it once
/// and the daemon's log names `cause`.
fn assert_refused(server: &[String], tls: &str, counter: &str, cause: &str) {
    let s = setup(server, &(service() + &rule(tls)), &[]);
    assert_eq!(
        s.greeting(),
        None,
        "{tls}: an unverified server gets no bytes"
    );
    assert_eq!(s.stat(counter), 1, "{tls}");
    assert!(
        s.daemon.wait_log(cause, Duration::from_secs(2)),
        "{tls}: {}",
        s.daemon.log()
    );
}

/// The greeting through a rule that must work.
fn greeting_with(server: &[String], tls: &str) -> String {
    setup(server, &(service() + &rule(tls)), &[])
        .greeting()
        .unwrap_or_else(|| panic!("{tls}: relayed"))
}

/// What the TLS tests ask of their mesh.
trait Secure {
    fn greeting(&self) -> Option<String>;
    fn web(&self, args: &[&str]) -> Value;
    fn stat(&self, name: &str) -> u64;
}

impl Secure for Mesh {
    /// The greeting line of one TCP connection through the VIP, or `None` when the proxy closed it.
    fn greeting(&self) -> Option<String> {
        let c = self
            .t
            .client
            .connect(format!("{VIP}:80").parse().unwrap(), None)
            .ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).ok()?;
        (!line.is_empty()).then_some(line)
    }

    /// `drover-probe http` to the service's HTTP port.
    fn web(&self, args: &[&str]) -> Value {
        let mut a = vec!["http://127.77.0.10:9080/"];
        a.extend_from_slice(args);
        self.http(&a)
    }

    fn stat(&self, name: &str) -> u64 {
        let c = self.daemon.clusters();
        c["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"].as_str().unwrap().contains("secure.test.svc"))
            .map(|c| c["stats"][name].as_u64().unwrap_or(0))
            .sum()
    }
}

#[test]
fn simple_origination_verifies_ca_san_expiry_and_sends_sni() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let good = pki.leaf("server", &["secure.test.svc"], false, false);
    let expired = pki.leaf("expired", &["secure.test.svc"], false, true);
    let ca = pki.path("ca.pem");

    // Right CA, explicit SNI: the server sees the SNI; the application spoke plaintext.
    let s = setup(
        &server_tls(&pki, &good),
        &(service()
            + &rule(&format!(
                "{{mode: SIMPLE, caCertificates: {ca}, sni: secure.test.svc}}"
            ))),
        &[],
    );
    let g = s.greeting().expect("relayed over TLS");
    assert!(
        g.starts_with("hello from ep1") && g.contains("sni=secure.test.svc client_cert=false"),
        "{g}"
    );
    // Envoy's client order: the server (following it) picks AES-128-GCM with SHA-256.
    assert!(
        g.trim_end().ends_with("cipher=TLS13_AES_128_GCM_SHA256"),
        "{g}"
    );
    assert_eq!(s.stat("ssl.handshake"), 1);
    assert_eq!(s.stat("ssl.session_reused"), 0);
    // The next connection resumes the session the server gave the first one.
    let g = s.greeting().expect("relayed over TLS again");
    assert!(g.starts_with("hello from ep1"), "{g}");
    assert_eq!(s.stat("ssl.handshake"), 2);
    assert_eq!(s.stat("ssl.session_reused"), 1);
    drop(s);

    // Unknown CA, certificate names that are not the listed ones, expiry: refused, counted and
    // logged with the cause.
    let server = server_tls(&pki, &good);
    let other = pki.path("other-ca.pem");
    assert_refused(
        &server,
        &format!("{{mode: SIMPLE, caCertificates: {other}}}"),
        "ssl.fail_verify_error",
        "UnknownIssuer",
    );
    assert_refused(
        &server,
        &format!("{{mode: SIMPLE, caCertificates: {ca}, subjectAltNames: [other.test.svc]}}"),
        "ssl.fail_verify_san",
        "none of subjectAltNames",
    );
    greeting_with(
        &server,
        &format!("{{mode: SIMPLE, caCertificates: {ca}, subjectAltNames: [secure.test.svc]}}"),
    );
    let stale = server_tls(&pki, &expired);
    assert_refused(
        &stale,
        &format!("{{mode: SIMPLE, caCertificates: {ca}}}"),
        "ssl.fail_verify_error",
        "certificate expired",
    );
    // insecureSkipVerify is the one way to accept it anyway.
    greeting_with(&stale, "{mode: SIMPLE, insecureSkipVerify: true}");
}

#[test]
fn mutual_presents_the_client_certificate_and_simple_is_refused_by_that_server() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let server = pki.leaf("server", &["secure.test.svc"], false, false);
    let client = pki.leaf("client", &["client.test.svc"], true, false);
    let mut args = server_tls(&pki, &server);
    args.extend(["--tls-client-ca".into(), pki.path("client-ca.pem")]);
    let ca = pki.path("ca.pem");
    let mutual = format!(
        "{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {}, privateKey: {}}}",
        client.0.display(),
        client.1.display()
    );
    let s = setup(&args, &(service() + &rule(&mutual)), &[]);
    let g = s.greeting().expect("mutual TLS relayed");
    assert!(g.contains("client_cert=true"), "{g}");
    // HTTP over the same origination: ALPN-less HTTP/1.1 with the client certificate.
    let r = s.web(&["--count", "3"]);
    assert_eq!(r["status"]["200"], 3, "{r}");
    assert_eq!(r["first"]["client_cert_id"], pem_id(&client.0), "{r}");
    drop(s);

    let s = setup(
        &args,
        &(service() + &rule(&format!("{{mode: SIMPLE, caCertificates: {ca}}}"))),
        &[],
    );
    assert_eq!(
        s.greeting(),
        None,
        "the server demands a client certificate"
    );
    let r = s.web(&["--count", "1"]);
    assert_eq!(r["status"]["503"], 1, "{r}");
}

#[test]
fn http_auto_sni_and_san_follow_the_request_host() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let server = pki.leaf("server", &["secure.test.svc"], false, false);
    let ca = pki.path("ca.pem");
    let s = setup(
        &server_tls(&pki, &server),
        &(service() + &rule(&format!("{{mode: SIMPLE, caCertificates: {ca}}}"))),
        &[],
    );
    // No `sni`, no `subjectAltNames`: the Host names the handshake and is checked (Envoy's
    // auto SNI and auto SAN validation).
    let r = s.web(&["--count", "2", "--header", "host: secure.test.svc"]);
    assert_eq!(r["status"]["200"], 2, "{r}");
    assert_eq!(r["first"]["sni"], "secure.test.svc", "{r}");
    let r = s.web(&["--count", "1", "--header", "host: impostor.test.svc"]);
    assert_eq!(
        r["status"]["503"], 1,
        "the certificate does not name this host: {r}"
    );
    // A failed handshake is a connect failure: Istio's default retries try twice more.
    assert_eq!(s.stat("ssl.fail_verify_san"), 3);
}

#[test]
fn bad_tls_files_are_refused_at_start_naming_the_file() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let client = pki.leaf("client", &["client.test.svc"], true, false);
    let other = pki.leaf("other", &["other.test.svc"], true, false);
    let ca = pki.path("ca.pem");
    let cases = [
        (
            format!(
                "{{mode: SIMPLE, caCertificates: {}}}",
                pki.path("missing.pem")
            ),
            "missing.pem: cannot read",
        ),
        (
            format!(
                "{{mode: SIMPLE, caCertificates: {}}}",
                pki.path("empty.pem")
            ),
            "empty.pem: no PEM certificate",
        ),
        (
            format!(
                "{{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {}, privateKey: {}}}",
                client.0.display(),
                other.1.display()
            ),
            "other-key.pem: private key does not match the certificate",
        ),
        (
            "{mode: SIMPLE, credentialName: nowhere}".to_string(),
            "credentialName \"nowhere\": no --credentials DIR",
        ),
    ];
    for (tls, message) in cases {
        let pins = PinDir::new();
        let cfg = write_config(&(service() + &rule(&tls)));
        let err = Daemon::start(&[
            "--config".into(),
            cfg.display().to_string(),
            "--pin-dir".into(),
            pins.path.display().to_string(),
            "--admin".into(),
            "off".into(),
        ])
        .err()
        .unwrap_or_else(|| panic!("{tls}: must not start"));
        assert_eq!(err.0, Some(1), "{tls}: {}", err.1);
        assert!(err.1.contains(message), "{tls}: {}", err.1);
        assert!(
            err.1.contains("spec.trafficPolicy.tls"),
            "located: {}",
            err.1
        );
    }
}

#[test]
fn rotation_applies_to_new_handshakes_and_a_bad_file_keeps_the_old_one() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let server = pki.leaf("server", &["secure.test.svc"], false, false);
    let first = pki.leaf("client-a", &["client.test.svc"], true, false);
    let second = pki.leaf("client-b", &["client.test.svc"], true, false);
    // The files the rule names; rotated by renaming new content over them.
    let (cert, key) = (pki.dir.join("live.pem"), pki.dir.join("live-key.pem"));
    let install = |from: &(std::path::PathBuf, std::path::PathBuf)| {
        for (src, dst) in [(&from.0, &cert), (&from.1, &key)] {
            let tmp = dst.with_extension("tmp");
            std::fs::copy(src, &tmp).unwrap();
            std::fs::rename(&tmp, dst).unwrap();
        }
    };
    install(&first);
    let mut args = server_tls(&pki, &server);
    args.extend(["--tls-client-ca".into(), pki.path("client-ca.pem")]);
    // One connection per request, so every request makes a handshake.
    let yaml = service()
        + &rule(&format!(
            "{{mode: MUTUAL, caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
            pki.path("ca.pem"),
            cert.display(),
            key.display()
        ))
        .replace(
            "    tls:",
            "    connectionPool: {http: {maxRequestsPerConnection: 1}}\n    tls:",
        );
    let s = setup(&args, &yaml, &[]);
    assert_eq!(
        s.web(&["--count", "1"])["first"]["client_cert_id"],
        pem_id(&first.0)
    );

    // Steady load across the rotation: no request may fail.
    let r = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            probe(
                Some(&s.t.client),
                None,
                &[
                    "http",
                    "http://127.77.0.10:9080/",
                    "--count",
                    "600",
                    "--rate",
                    "300",
                    "--max-secs",
                    "20",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(700));
        install(&second);
        load.join().unwrap()
    });
    assert_eq!(
        r["status"]["200"], 600,
        "zero failed requests during rotation: {r}"
    );
    assert!(
        s.daemon
            .wait_log("configuration reloaded", Duration::from_secs(3))
    );
    assert_eq!(
        s.web(&["--count", "1"])["first"]["client_cert_id"],
        pem_id(&second.0)
    );

    // A broken key: the reload is refused with the file named, the previous certificate keeps
    // serving.
    std::fs::write(&key, "not a key").unwrap();
    assert!(
        s.daemon.wait_log("live-key.pem", Duration::from_secs(3)),
        "{}",
        s.daemon.log()
    );
    let r = s.web(&["--count", "3"]);
    assert_eq!(r["status"]["200"], 3, "{r}");
    assert_eq!(r["first"]["client_cert_id"], pem_id(&second.0));
    let _ = &s.cfg;
}

#[test]
fn istio_mutual_without_a_mesh_identity_refuses_instead_of_plaintext() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let server = pki.leaf("server", &["secure.test.svc"], false, false);
    let s = setup(
        &server_tls(&pki, &server),
        &(service() + &rule("{mode: ISTIO_MUTUAL}")),
        &[],
    );
    assert_eq!(s.greeting(), None);
    let r = s.web(&["--count", "1"]);
    assert_eq!(r["status"]["503"], 1, "{r}");
    assert!(
        s.daemon
            .wait_log("mesh workload identity", Duration::from_secs(2))
    );
}

#[test]
fn istio_mutual_with_the_mesh_ca_presents_and_checks_spiffe_identities() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let mesh = pki.dir.join("mesh");
    let mesh_s = mesh.display().to_string();
    drover(&["ca", "init", "--dir", &mesh_s]);
    let issue = |sa: &str| {
        let out = pki.dir.join(format!("{sa}.pem"));
        drover(&[
            "ca",
            "issue",
            "--dir",
            &mesh_s,
            "--spiffe",
            &format!("spiffe://cluster.local/ns/test/sa/{sa}"),
            "--out",
            &out.display().to_string(),
        ]);
        (out, pki.dir.join(format!("{sa}-key.pem")))
    };
    let server = issue("secure-sa");
    let impostor = issue("impostor");
    let identity_dir = pki.dir.join("identity");
    let extra = [
        "--mesh-ca",
        mesh_s.as_str(),
        "--client-namespace",
        "test",
        "--service-account",
        "client-sa",
        "--identity-dir",
        identity_dir.to_str().unwrap(),
    ];
    let root = mesh.join("root-cert.pem").display().to_string();
    let mut args = server_tls(&pki, &server);
    args.extend(["--tls-client-ca".into(), root.clone()]);
    let yaml = service_with_account("secure-sa") + &rule("{mode: ISTIO_MUTUAL}");
    let s = setup(&args, &yaml, &extra);
    let g = s.greeting().expect("mesh mTLS relayed");
    assert!(
        g.contains("sni=outbound_.80_._.secure.test.svc client_cert=true"),
        "{g}"
    );
    let r = s.web(&["--count", "2"]);
    assert_eq!(r["status"]["200"], 2, "{r}");
    assert_eq!(
        r["first"]["sni"], "outbound_.9080_._.secure.test.svc",
        "{r}"
    );
    // The client presented the workload certificate drover issued for itself.
    let workload = identity_dir.join("workload.pem");
    assert_eq!(r["first"]["client_cert_id"], pem_id(&workload), "{r}");
    let der = std::fs::read_to_string(&workload).unwrap();
    assert!(!der.is_empty());
    assert!(
        s.daemon
            .log()
            .contains("spiffe://cluster.local/ns/test/sa/client-sa")
    );
    drop(s);

    // A server holding another identity of the same mesh is refused.
    let mut args = server_tls(&pki, &impostor);
    args.extend(["--tls-client-ca".into(), root]);
    let s = setup(&args, &yaml, &extra);
    assert_eq!(s.greeting(), None);
    assert_eq!(s.stat("ssl.fail_verify_san"), 1);
    assert!(s.daemon.wait_log("secure-sa", Duration::from_secs(2)));
}

/// A mesh CA, one endpoint namespace and its workload: a plaintext echo server on 7000.
struct MeshBed {
    _pki: Pki,
    mesh: String,
    t: Topology,
    ep: std::net::IpAddr,
    _echo: Proc,
}

impl MeshBed {
    fn new() -> Self {
        let pki = Pki::new();
        let mesh = mesh_ca(&pki);
        let t = Topology::new(1);
        let ep = Topology::ep4(1);
        let echo = Proc::server(
            Some(&t.endpoints[0]),
            "echo",
            &[SocketAddr::new(ep, 7000)],
            "ep1",
        );
        Self {
            _pki: pki,
            mesh,
            t,
            ep,
            _echo: echo,
        }
    }
}

/// A daemon of the mesh `mesh` reading `cfg`, in client namespace `test`, with `args`.
fn node(cfg: &std::path::Path, mesh: &str, mode: &str, args: &[&str]) -> (Daemon, PinDir) {
    let pins = PinDir::new();
    let mut a: Vec<String> = vec![
        "--config".into(),
        cfg.display().to_string(),
        "--pin-dir".into(),
        pins.path.display().to_string(),
        "--mesh-ca".into(),
        mesh.into(),
        "--client-namespace".into(),
        "test".into(),
        "--peer-authentication".into(),
        mode.into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    (Daemon::start(&a).expect("daemon starts"), pins)
}

/// The arguments of the node that terminates mTLS for endpoint 1's port 7000.
fn server_node(t: &Topology) -> Vec<&str> {
    vec![
        "--inbound-netns",
        &t.endpoints[0].name,
        "--inbound-port",
        "7000",
        "--service-account",
        "server-sa",
    ]
}

#[test]
fn two_daemons_speak_istio_mutual_and_strict_refuses_plaintext() {
    if !require_privileged() {
        return;
    }
    let MeshBed {
        _pki,
        mesh,
        t,
        ep,
        _echo,
    } = MeshBed::new();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: test}}
spec:
  hosts: [secure.test.svc]
  addresses: [{VIP}]
  ports: [{{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}]
  resolution: STATIC
  endpoints: [{{address: {ep}, serviceAccount: server-sa}}]
"
    ) + &rule("{mode: ISTIO_MUTUAL}");
    let cfg = write_config(&yaml);
    let start = |args: &[&str], mode: &str| node(&cfg, &mesh, mode, args);
    // Server node: terminates mTLS for the endpoint namespace's port 7000.
    let (server, _server_pins) = start(&server_node(&t), "strict");
    // Client node: captures the client namespace and originates ISTIO_MUTUAL.
    let (client, _client_pins) = start(
        &["--netns", &t.client.name, "--service-account", "client-sa"],
        "strict",
    );

    // Through both daemons: the workload sees the server node's forward connection (source =
    // its own address), not the client.
    let c = t
        .client
        .connect(format!("{VIP}:80").parse().unwrap(), None)
        .unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    assert!(line.starts_with("hello from ep1 peer="), "{line}");
    let peer: SocketAddr = line.trim().rsplit("peer=").next().unwrap().parse().unwrap();
    assert_eq!(
        peer.ip(),
        ep,
        "forwarded by the server node from inside the namespace: {line}"
    );
    assert!(
        server.wait_log(
            "mTLS from spiffe://cluster.local/ns/test/sa/client-sa",
            Duration::from_secs(3)
        ),
        "{}",
        server.log()
    );
    assert!(
        client.clusters()["clusters"][0]["stats"]["ssl.handshake"]
            .as_u64()
            .unwrap()
            >= 1
    );

    // A plaintext client straight to the workload (not via a VIP, so not captured) that speaks
    // first is refused by STRICT at once: EOF, no greeting.
    let direct = t.client.connect(SocketAddr::new(ep, 7000), None).unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = std::time::Instant::now();
    std::io::Write::write_all(&mut &direct, b"ping\n").unwrap();
    let mut line = String::new();
    // Closed with the unread "ping" still queued: EOF or a reset, never a greeting or a timeout.
    match BufReader::new(direct).read_line(&mut line) {
        Ok(n) => assert_eq!(n, 0, "plaintext refused: {line}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(server.wait_log("plaintext client refused", Duration::from_secs(3)));
    let inbound = &server.clusters()["inbound"];
    assert_eq!(inbound["mtls"], 1, "{inbound}");
    assert_eq!(inbound["plaintext_refused"], 1, "{inbound}");
    assert!(
        server
            .admin_get("/stats/prometheus")
            .contains("drover_inbound_connections{result=\"plaintext_refused\"} 1")
    );
    drop(server);

    // PERMISSIVE lets the same plaintext client through.
    let (_server, _pins) = start(
        &[
            "--inbound-netns",
            &t.endpoints[0].name,
            "--inbound-port",
            "7000",
            "--service-account",
            "server-sa",
        ],
        "permissive",
    );
    let direct = t.client.connect(SocketAddr::new(ep, 7000), None).unwrap();
    direct
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(direct).read_line(&mut line).unwrap();
    assert!(line.starts_with("hello from ep1"), "{line}");
}

#[test]
fn disable_is_plaintext_and_credential_name_reads_the_credentials_dir() {
    if !require_privileged() {
        return;
    }
    // DISABLE: plaintext to a plaintext server (the greeting has no TLS suffix).
    let s = setup(&[], &(service() + &rule("{mode: DISABLE}")), &[]);
    let g = s.greeting().expect("plaintext relayed");
    assert!(
        g.starts_with("hello from ep1") && !g.contains("sni="),
        "{g}"
    );
    drop(s);

    // MUTUAL through credentialName: DIR/<name>/{tls.crt,tls.key,ca.crt}.
    let pki = Pki::new();
    let server = pki.leaf("server", &["secure.test.svc"], false, false);
    let client = pki.leaf("client", &["client.test.svc"], true, false);
    let secret = pki.dir.join("creds").join("secure-client");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::copy(&client.0, secret.join("tls.crt")).unwrap();
    std::fs::copy(&client.1, secret.join("tls.key")).unwrap();
    std::fs::copy(pki.dir.join("ca.pem"), secret.join("ca.crt")).unwrap();
    let mut args = server_tls(&pki, &server);
    args.extend(["--tls-client-ca".into(), pki.path("client-ca.pem")]);
    let creds = pki.dir.join("creds").display().to_string();
    let s = setup(
        &args,
        &(service() + &rule("{mode: MUTUAL, credentialName: secure-client, sni: secure.test.svc}")),
        &["--credentials", &creds],
    );
    let g = s.greeting().expect("mutual TLS with the secret's files");
    assert!(g.contains("client_cert=true"), "{g}");
}

#[test]
fn ca_crl_rejects_a_revoked_server_certificate() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let revoked = pki.revoked_leaf(&["secure.test.svc"]);
    let ca = pki.path("ca.pem");
    let base = format!("mode: SIMPLE, caCertificates: {ca}, sni: secure.test.svc");
    // Without the CRL the certificate is fine; with it, the handshake fails as revoked.
    let server = server_tls(&pki, &revoked);
    greeting_with(&server, &format!("{{{base}}}"));
    assert_refused(
        &server,
        &format!("{{{base}, caCrl: {}}}", pki.path("crl.pem")),
        "ssl.fail_verify_error",
        "Revoked",
    );
}

#[test]
fn peer_authentication_resources_set_the_inbound_mode_per_port_and_follow_edits() {
    if !require_privileged() {
        return;
    }
    let pki = Pki::new();
    let mesh = mesh_ca(&pki);
    let t = Topology::new(1);
    let ep = Topology::ep4(1);
    let _echo = Proc::server(
        Some(&t.endpoints[0]),
        "echo",
        &[SocketAddr::new(ep, 7000), SocketAddr::new(ep, 7001)],
        "ep1",
    );
    let peer = |name: &str, spec: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: test}}\nspec: {spec}\n"
        )
    };
    // Namespace-wide PERMISSIVE beats the daemon's --peer-authentication STRICT.
    let cfg = write_config(&(service() + &peer("default", "{mtls: {mode: PERMISSIVE}}")));
    let pins = PinDir::new();
    let cfg_s = cfg.display().to_string();
    let server = Daemon::start(&drover_tests::args(
        &cfg,
        &pins,
        &[
            "--mesh-ca",
            &mesh,
            "--client-namespace",
            "test",
            "--client-label",
            "app=ep",
            "--peer-authentication",
            "strict",
            "--inbound-netns",
            &t.endpoints[0].name,
            "--inbound-port",
            "7000",
            "--inbound-port",
            "7001",
        ],
    ))
    .expect("daemon starts");
    let line = t
        .client
        .greeting(SocketAddr::new(ep, 7000))
        .expect("PERMISSIVE passes plaintext");
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(server.wait_log("plaintext (PERMISSIVE)", Duration::from_secs(3)));

    // Edited live: the namespace goes STRICT, and a workload policy (selecting app=ep, mode
    // UNSET: inherited) disables mTLS on port 7001 only.
    let workload = "{selector: {matchLabels: {app: ep}}, mtls: {mode: UNSET}, portLevelMtls: {7001: {mode: DISABLE}}}";
    std::fs::write(
        &cfg,
        service() + &peer("default", "{mtls: {mode: STRICT}}") + &peer("ep", workload),
    )
    .unwrap();
    assert!(server.wait_log("configuration reloaded", Duration::from_secs(5)));
    assert_eq!(
        t.client.greeting(SocketAddr::new(ep, 7000)),
        None,
        "STRICT refuses"
    );
    let line = t
        .client
        .greeting(SocketAddr::new(ep, 7001))
        .expect("DISABLE passes through");
    assert!(line.starts_with("hello from ep1"), "{line}");
    assert!(server.wait_log("passed through (DISABLE)", Duration::from_secs(3)));
    let inbound = &server.clusters()["inbound"];
    assert_eq!(inbound["plaintext_refused"], 1, "{inbound}");
    assert_eq!(inbound["plaintext_passed"], 2, "{inbound}");

    // `explain` and `/config_dump` say which policies made the mode.
    let text = drover(&[
        "explain",
        "--config",
        &cfg_s,
        "--client-namespace",
        "test",
        "--client-label",
        "app=ep",
        "--host",
        "secure.test.svc",
        "--port",
        "80",
    ]);
    assert!(
        text.contains(
            "inbound    mTLS STRICT ports {7001: DISABLE} (PeerAuthentication test/default, test/ep)"
        ),
        "{text}"
    );
    let dump: Value = serde_json::from_str(&server.admin_get("/config_dump")).unwrap();
    assert_eq!(
        dump["client"]["inbound_mtls"]["ports"]["7001"], "DISABLE",
        "{dump}"
    );
}

#[test]
fn tls_routes_pick_the_destination_by_the_client_hellos_server_name() {
    if !require_privileged() {
        return;
    }
    // Two TLS endpoints behind one TLS port; the daemon does not terminate: it peeks the
    // ClientHello, routes by SNI and relays the handshake untouched.
    let pki = Pki::new();
    let cert = pki.leaf(
        "sni",
        &["a.secure.test", "b.secure.test", "c.secure.test"],
        false,
        false,
    );
    let args = server_tls(&pki, &cert);
    let eps: Vec<String> = (1..=2)
        .map(|i| {
            format!(
                "  - {{address: {}, labels: {{v: ep{i}}}}}\n",
                Topology::ep4(i)
            )
        })
        .collect();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: test}}
spec:
  hosts: [secure.test.svc]
  addresses: [{VIP}]
  ports: [{{number: 443, name: tls, protocol: TLS, targetPort: 7443}}]
  resolution: STATIC
  endpoints:
{}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: test}}
spec:
  host: secure.test.svc
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets: [{{name: one, labels: {{v: ep1}}}}, {{name: two, labels: {{v: ep2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: secure, namespace: test}}
spec:
  hosts: [secure.test.svc]
  tls:
  - match: [{{sniHosts: [a.secure.test]}}]
    route: [{{destination: {{host: secure.test.svc, subset: one}}}}]
  - match: [{{sniHosts: ['*.secure.test'], port: 443}}]
    route: [{{destination: {{host: secure.test.svc, subset: two}}}}]
",
        eps.concat()
    );
    let m = MeshBuilder::new(2)
        .server(1, "echo", &[7443], "ep1", &args)
        .server(2, "echo", &[7443], "ep2", &args)
        .yaml(yaml)
        .start();
    let ca = pki.path("ca.pem");
    let hello = |sni: &str| {
        let v = probe(
            Some(&m.t.client),
            None,
            &["tls", &format!("{VIP}:443"), "--sni", sni, "--ca", &ca],
        );
        v["greeting"].as_str().unwrap_or_default().to_string()
    };
    for _ in 0..3 {
        let a = hello("a.secure.test");
        assert!(
            a.starts_with("hello from ep1") && a.contains("sni=a.secure.test"),
            "{a}"
        );
        let b = hello("b.secure.test");
        assert!(
            b.starts_with("hello from ep2") && b.contains("sni=b.secure.test"),
            "{b}"
        );
    }
    assert!(
        m.daemon.log().contains("test/secure tls[0]"),
        "the access log names the tls route: {}",
        m.daemon.log()
    );
}

#[test]
fn auto_mtls_to_mesh_endpoints_plaintext_to_the_rest_and_disable_turns_it_off() {
    if !require_privileged() {
        return;
    }
    let MeshBed {
        _pki,
        mesh,
        t,
        ep,
        _echo,
    } = MeshBed::new();
    let _web = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[SocketAddr::new(ep, 9080)],
        "ep1",
    );
    // No DestinationRule: Istio's auto mTLS decides from the endpoint's tlsMode label and the
    // destination's PeerAuthentication.
    let config = |labels: &str, disable: bool| {
        let mut yaml = format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: test}}
spec:
  hosts: [secure.test.svc]
  addresses: [{VIP}]
  ports:
  - {{number: 80, name: tcp, protocol: TCP, targetPort: 7000}}
  - {{number: 9080, name: http, protocol: HTTP, targetPort: 9080}}
  resolution: STATIC
  endpoints: [{{address: {ep}, serviceAccount: server-sa, labels: {{{labels}}}}}]
"
        );
        if disable {
            yaml.push_str(
                "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: off, namespace: test}
spec:
  selector: {matchLabels: {app: echo}}
  mtls: {mode: DISABLE}
",
            );
        }
        write_config(&yaml)
    };
    let greeting = || {
        let c = t
            .client
            .connect(format!("{VIP}:80").parse().unwrap(), None)
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // Speak first, so that a STRICT inbound sees plaintext bytes and refuses them.
        std::io::Write::write_all(&mut &c, b"ping\n").unwrap();
        let mut line = String::new();
        let _ = BufReader::new(c).read_line(&mut line);
        line
    };
    let handshakes = |client: &Daemon| {
        let c = client.clusters();
        let tcp = c["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "outbound|80||secure.test.svc")
            .cloned();
        tcp.and_then(|c| c["stats"]["ssl.handshake"].as_u64())
            .unwrap_or(0)
    };
    let client_args = [
        "--netns",
        t.client.name.as_str(),
        "--service-account",
        "client-sa",
    ];
    // Each phase runs its own pair of nodes; both (and their pinned links) are gone after it.
    let phase = |cfg: &std::path::Path| {
        // The server node knows its workload's labels, which the PeerAuthentication selects.
        let mut server_args = server_node(&t);
        server_args.extend(["--inbound-port", "9080", "--client-label", "app=echo"]);
        let server = node(cfg, &mesh, "strict", &server_args);
        let client = node(cfg, &mesh, "strict", &client_args);
        (server, client)
    };
    // 1. A mesh endpoint: mTLS, which the STRICT server node accepts.
    {
        let ((server, _), (client, _)) = phase(&config(
            "app: echo, security.istio.io/tlsMode: istio",
            false,
        ));
        assert!(
            greeting().starts_with("hello from ep1"),
            "auto mTLS reaches STRICT"
        );
        assert_eq!(handshakes(&client), 1);
        // The HTTP port too: its upstream pool for mesh endpoints originates mTLS.
        let r = probe(
            Some(&t.client),
            None,
            &["http", &format!("http://{VIP}:9080/"), "--count", "3"],
        );
        assert_eq!(r["status"]["200"], 3, "{r}");
        assert!(server.wait_log(
            "mTLS from spiffe://cluster.local/ns/test/sa/client-sa",
            Duration::from_secs(3)
        ));
    }
    // 2. Not labelled: plaintext, which STRICT refuses.
    {
        let ((server, _), (client, _)) = phase(&config("app: echo", false));
        assert_eq!(
            greeting(),
            "",
            "plaintext to a STRICT workload gets nothing"
        );
        assert_eq!(handshakes(&client), 0);
        let r = probe(
            Some(&t.client),
            None,
            &["http", &format!("http://{VIP}:9080/")],
        );
        assert_eq!(r["status"]["200"].as_u64().unwrap_or(0), 0, "{r}");
        assert!(
            server.wait_log("plaintext client refused", Duration::from_secs(3)),
            "{}",
            server.log()
        );
    }
    // 3. Labelled, but its PeerAuthentication DISABLEs mTLS: plaintext, which it accepts.
    let ((_server, _), (client, _)) =
        phase(&config("app: echo, security.istio.io/tlsMode: istio", true));
    assert!(
        greeting().starts_with("hello from ep1"),
        "plaintext to DISABLE"
    );
    assert_eq!(handshakes(&client), 0);
}
