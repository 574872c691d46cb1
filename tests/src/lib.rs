//! Integration harness: network namespaces joined by veth pairs as test hosts, real servers in
//! them, the real `drover` binary, and guards that tear everything down even when a test panics.
//!
//! Address plan (nothing here is reachable from outside the namespaces this harness creates):
//! endpoint namespace `i` (1-based) is `198.18.i.2` / `fd00:d7:i::2`, reached from the client
//! namespace's `198.18.i.1` / `fd00:d7:i::1`; service VIPs are `127.77.0.0/16` (loopback inside
//! the client namespace) and `fd00:77::/64` (unrouted there). If capture failed, a connection to a
//! VIP would stay inside the client namespace.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

pub mod apiserver;
pub mod ca;
pub mod cri;
pub mod envoy;
pub mod k8s;
pub mod otlp;
pub mod podman;
pub mod prometheus;
pub mod ztunnel;

/// The gRPC test service (`proto/echo.proto`).
#[allow(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod pb {
    tonic::include_proto!("drover.test");
}

/// Whether privileged tests can run. Without root they are skipped with a loud line, except when
/// `CI` or `REQUIRE_PRIVILEGED` is set: then a missing privilege fails the test.
pub fn require_privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() || std::env::var_os("REQUIRE_PRIVILEGED").is_some() {
        panic!(
            "privileged test needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) and CI/REQUIRE_PRIVILEGED is set"
        );
    }
    eprintln!("SKIPPED (needs root): run `cargo xtask test` as root");
    false
}

/// A short id unique to this process and call, for namespace, link and cgroup names.
pub fn unique_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 10_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

/// How many responses with status `code` a `hey` report counts (its `[200]  N responses`
/// lines); 0 when none.
pub fn hey_responses(report: &str, code: &str) -> u64 {
    report
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("[{code}]")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs a command to completion, panicking with its output on failure.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Directory holding the workspace's built binaries (the test's own profile directory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, failing with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    if name == "drover"
        && let Some(p) = std::env::var_os("DROVER_BIN")
    {
        return PathBuf::from(p);
    }
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (`cargo xtask test` does)",
        p.display()
    );
    p
}

// === Netns ===

/// A network namespace that is deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// A command run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `ip ARGS` against this namespace.
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Opens a TCP connection from a socket created inside this namespace (optionally marked).
    pub fn connect(
        &self,
        addr: SocketAddr,
        mark: Option<u32>,
    ) -> std::io::Result<std::net::TcpStream> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path)?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                dial(addr, mark)
            })
            .join()
            .expect("connect thread")
        })
    }
    /// A plaintext client from this namespace to `addr` that speaks first (`ping`): the line it
    /// gets back, or `None` when the server side closed or reset it unread.
    /// Sends `GET path` with `Upgrade: echo` to `addr` (the test HTTP server switches
    /// protocols and echoes) and checks that the 101 arrives and raw bytes come back through.
    pub fn check_upgrade_bridged(&self, addr: SocketAddr, path: &str) {
        use std::io::{BufRead, Read, Write};
        let mut conn = self.connect(addr, None).expect("connect");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n"
        );
        conn.write_all(request.as_bytes()).unwrap();
        let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 101"), "{line}");
        while reader.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        conn.write_all(b"raw bytes after the upgrade").unwrap();
        let mut buf = [0u8; 27];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"raw bytes after the upgrade");
    }

    pub fn greeting(&self, addr: SocketAddr) -> Option<String> {
        use std::io::{BufRead, Write};
        let mut c = self.connect(addr, None).expect("connect");
        c.write_all(b"ping\n").expect("send");
        let mut line = String::new();
        match std::io::BufReader::new(c).read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                None
            }
        }
    }
}

/// A blocking TCP connection to `addr` from the calling thread's namespace, optionally with
/// `SO_MARK`; connect and read time out after 5 s, Nagle is off.
pub fn dial(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<std::net::TcpStream> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if let Some(m) = mark {
        sock.set_mark(m)?;
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

// === Topology ===

/// A client namespace joined to `n` endpoint namespaces by one veth pair each.
pub struct Topology {
    pub id: u32,
    pub client: Netns,
    pub endpoints: Vec<Netns>,
}

impl Topology {
    pub fn new(n: usize) -> Self {
        let id = unique_id();
        let client = Netns::new(format!("drv{id}c"));
        let mut endpoints = Vec::new();
        for i in 1..=n {
            let ep = Netns::new(format!("drv{id}e{i}"));
            let (a, b) = (format!("d{id}a{i}"), format!("d{id}b{i}"));
            sh(&[
                "ip",
                "link",
                "add",
                &a,
                "netns",
                &client.name,
                "type",
                "veth",
                "peer",
                "name",
                &b,
                "netns",
                &ep.name,
            ]);
            client.ip(&["addr", "add", &format!("198.18.{i}.1/24"), "dev", &a]);
            client.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:d7:{i}::1/64"),
                "dev",
                &a,
                "nodad",
            ]);
            client.ip(&["link", "set", &a, "up"]);
            ep.ip(&["addr", "add", &format!("198.18.{i}.2/24"), "dev", &b]);
            ep.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:d7:{i}::2/64"),
                "dev",
                &b,
                "nodad",
            ]);
            ep.ip(&["link", "set", &b, "up"]);
            endpoints.push(ep);
        }
        Self {
            id,
            client,
            endpoints,
        }
    }

    /// Another client namespace (`k` ≥ 1), joined to every endpoint by its own veth pair: on
    /// the pair to endpoint `i` it is `198.19.(16k+i).1` and the endpoint `.2`, and it reaches
    /// the endpoint's `198.18.i.2` through it. Its first address is `client_k4(k)`.
    pub fn add_client(&self, k: usize) -> Netns {
        let ns = Netns::new(format!("drv{}x{k}", self.id));
        for (i, ep) in self.endpoints.iter().enumerate() {
            let i = i + 1;
            let (a, b) = (
                format!("d{}x{k}a{i}", self.id),
                format!("d{}x{k}b{i}", self.id),
            );
            sh(&[
                "ip", "link", "add", &a, "netns", &ns.name, "type", "veth", "peer", "name", &b,
                "netns", &ep.name,
            ]);
            let net = 16 * k + i;
            ns.ip(&["addr", "add", &format!("198.19.{net}.1/24"), "dev", &a]);
            ns.ip(&["link", "set", &a, "up"]);
            ns.ip(&["route", "add", &format!("198.18.{i}.2/32"), "dev", &a]);
            ep.ip(&["addr", "add", &format!("198.19.{net}.2/24"), "dev", &b]);
            ep.ip(&["link", "set", &b, "up"]);
        }
        ns
    }

    /// The first address of extra client `k` (see [`Topology::add_client`]).
    pub fn client_k4(k: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, (16 * k + 1) as u8, 1))
    }

    /// IPv4 address of endpoint `i` (1-based).
    pub fn ep4(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, i as u8, 2))
    }

    /// IPv6 address of endpoint `i` (1-based).
    pub fn ep6(i: usize) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0xd7, i as u16, 0, 0, 0, 0, 2))
    }

    /// Client-side IPv4 address facing endpoint `i`.
    pub fn client4(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, i as u8, 1))
    }
}

// === Proc ===

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    /// Starts a `drover-testsrv` (in `ns`, or here) and waits until every listener is up.
    pub fn server(ns: Option<&Netns>, mode: &str, listen: &[SocketAddr], name: &str) -> Self {
        Self::server_with(ns, mode, listen, name, &[])
    }

    /// [`Proc::server`] with extra arguments (`--delay-ms N`).
    pub fn server_with(
        ns: Option<&Netns>,
        mode: &str,
        listen: &[SocketAddr],
        name: &str,
        extra: &[&str],
    ) -> Self {
        let exe = bin("drover-testsrv");
        let mut cmd = match ns {
            Some(ns) => ns.command(&exe),
            None => Command::new(&exe),
        };
        cmd.arg(mode).args(["--name", name]).args(extra);
        for l in listen {
            cmd.arg("--listen").arg(l.to_string());
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn drover-testsrv");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        for _ in listen {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("listening") => {}
                other => {
                    let _ = child.kill();
                    panic!("server {name} did not start: {other:?}");
                }
            }
        }
        Self { child }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === A captured client namespace ===

/// The service VIP of the single-service fixtures (loopback inside the client namespace).
pub const VIP: &str = "127.77.0.10";

pub fn args(config: &std::path::Path, pins: &PinDir, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--config".into(),
        config.display().to_string(),
        "--pin-dir".into(),
        pins.path.display().to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Echo servers named `ep1..epN` on port 7000 of each endpoint namespace (v4 and v6).
pub fn echo_servers(t: &Topology) -> Vec<Proc> {
    t.endpoints
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let listen = [
                SocketAddr::new(Topology::ep4(i + 1), 7000),
                SocketAddr::new(Topology::ep6(i + 1), 7000),
            ];
            Proc::server(Some(ns), "echo", &listen, &format!("ep{}", i + 1))
        })
        .collect()
}

/// A mesh for one test: endpoint namespaces with their servers, a pin directory, the
/// configuration file and a daemon capturing the client namespace. Built by [`MeshBuilder`].
/// Destructure it binding `daemon`, `_servers` and `_pins` by name: fields left to `..` are
/// dropped at once, which would stop the daemon or the servers.
pub struct Mesh {
    pub t: Topology,
    /// Kept alive for the test: the servers and pins go when it is dropped.
    pub _servers: Vec<Proc>,
    pub cfg: std::path::PathBuf,
    pub daemon: Daemon,
    pub _pins: PinDir,
}

/// The fixture of [`captured`]: a mesh of echo endpoints.
pub type Captured = Mesh;

/// What [`MeshBuilder::prepare`] sets up before a daemon, for tests that start it themselves.
pub struct Prepared {
    pub t: Topology,
    pub servers: Vec<Proc>,
    pub pins: PinDir,
    pub cfg: std::path::PathBuf,
}

/// A `drover-testsrv` on an endpoint: (endpoint 1.., mode, ports, name, arguments).
type ServerSpec = (usize, String, Vec<u16>, String, Vec<String>);

/// "A mesh with these services, endpoints and rules": `n` endpoint namespaces, the servers on
/// them, the configuration and the daemon's arguments.
pub struct MeshBuilder {
    n: usize,
    /// None = echo servers on 7000 (v4 and v6).
    servers: Vec<ServerSpec>,
    yaml: Option<String>,
    extra: Vec<String>,
    /// Start the daemon without `--config` (its configuration comes from elsewhere, e.g. the
    /// Kubernetes API in `extra`).
    no_config: bool,
}

impl MeshBuilder {
    /// `n` endpoint namespaces (`ep1..epN`), by default running echo servers on port 7000 behind
    /// service `echo` at `VIP:80`.
    pub fn new(n: usize) -> Self {
        Self {
            n,
            servers: Vec::new(),
            yaml: None,
            extra: Vec::new(),
            no_config: false,
        }
    }

    /// No `--config`: the arguments name where the configuration comes from.
    pub fn without_config(mut self) -> Self {
        self.no_config = true;
        self
    }

    /// A `drover-testsrv MODE` named `name` on `ports` of endpoint `i` (1-based), with `args`.
    pub fn server(
        mut self,
        i: usize,
        mode: &str,
        ports: &[u16],
        name: &str,
        args: &[String],
    ) -> Self {
        self.servers
            .push((i, mode.into(), ports.to_vec(), name.into(), args.to_vec()));
        self
    }

    /// The configuration (instead of the default `echo` service).
    pub fn yaml(mut self, yaml: impl Into<String>) -> Self {
        self.yaml = Some(yaml.into());
        self
    }

    /// More daemon arguments.
    pub fn args(mut self, extra: &[&str]) -> Self {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    /// Everything but the daemon.
    pub fn prepare(self) -> Prepared {
        self.prepared().0
    }

    fn prepared(self) -> (Prepared, Vec<String>, bool) {
        let t = Topology::new(self.n);
        let servers = if self.servers.is_empty() {
            echo_servers(&t)
        } else {
            self.servers
                .iter()
                .map(|(i, mode, ports, name, args)| {
                    let listen: Vec<_> = ports
                        .iter()
                        .map(|p| SocketAddr::new(Topology::ep4(*i), *p))
                        .collect();
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    Proc::server_with(Some(&t.endpoints[i - 1]), mode, &listen, name, &args)
                })
                .collect()
        };
        let eps: Vec<_> = (1..=self.n).map(Topology::ep4).collect();
        let yaml = self
            .yaml
            .unwrap_or_else(|| service_entry("echo", &[VIP], 80, 7000, &eps));
        let prepared = Prepared {
            t,
            servers,
            pins: PinDir::new(),
            cfg: write_config(&yaml),
        };
        (prepared, self.extra, self.no_config)
    }

    /// The mesh with its daemon capturing the client namespace (panics if it does not start).
    pub fn start(self) -> Mesh {
        let (
            Prepared {
                t,
                servers,
                pins,
                cfg,
            },
            extra,
            no_config,
        ) = self.prepared();
        let mut a = args(&cfg, &pins, &["--netns", &t.client.name]);
        if no_config {
            a.drain(..2);
        }
        a.extend(extra);
        let daemon = Daemon::start(&a).expect("daemon starts");
        Mesh {
            t,
            _servers: servers,
            cfg,
            daemon,
            _pins: pins,
        }
    }
}

impl Mesh {
    /// `drover-probe http ARGS` from the client namespace.
    pub fn http(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["http"];
        a.extend_from_slice(args);
        probe(Some(&self.t.client), None, &a)
    }
}

/// `n` echo endpoints (`ep1..`), a daemon capturing the client namespace with `yaml` (by default
/// one service `echo` at `VIP:80` → port 7000 of every endpoint) and `extra` arguments.
pub fn captured(n: usize, yaml: Option<String>, extra: &[&str]) -> Captured {
    let b = MeshBuilder::new(n).args(extra);
    match yaml {
        Some(y) => b.yaml(y),
        None => b,
    }
    .start()
}

/// `n` echo endpoints, a pin directory and the config file (`yaml`, or service `echo` at
/// `VIP:80` → port 7000 of every endpoint).
pub fn prepared(n: usize, yaml: Option<String>) -> Prepared {
    match yaml {
        Some(y) => MeshBuilder::new(n).yaml(y),
        None => MeshBuilder::new(n),
    }
    .prepare()
}

// === PinDir ===

/// A private pin directory for one test's maps and links; removing it detaches everything.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> Self {
        Self {
            path: PathBuf::from(format!("/sys/fs/bpf/drover-test-{}", unique_id())),
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// === Cgroup ===

/// A cgroup v2 directory (under the v2 mount) removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Self {
        let root = drover::redirect::loader::cgroup2_root().expect("cgroup v2 mount");
        let path = root.join(format!("drover-test-{}", unique_id()));
        std::fs::create_dir_all(&path).expect("create cgroup");
        Self { path }
    }

    /// A shell command line that joins this cgroup and then runs `program args…`.
    pub fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                self.path.display()
            ))
            .arg(program)
            .args(args);
        c
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// === probe ===

/// Runs `drover-probe ARGS` (in `ns` and/or `cgroup`) and parses its JSON answer.
pub fn probe(ns: Option<&Netns>, cgroup: Option<&Cgroup>, args: &[&str]) -> serde_json::Value {
    let exe = bin("drover-probe");
    let mut cmd = match (ns, cgroup) {
        (Some(ns), Some(cg)) => {
            let mut c = ns.command("sh");
            c.arg("-c")
                .arg(format!(
                    "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                    cg.path.display()
                ))
                .arg(&exe)
                .args(args);
            c
        }
        (Some(ns), None) => {
            let mut c = ns.command(&exe);
            c.args(args);
            c
        }
        (None, Some(cg)) => cg.command(&exe, args),
        (None, None) => {
            let mut c = Command::new(&exe);
            c.args(args);
            c
        }
    };
    let out = cmd.output().expect("run drover-probe");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "probe output {text:?} ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Network namespaces the process `pid` holds open (descriptors that name `net:[…]`).
pub fn netns_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("net:["))
                .count()
        })
        .unwrap_or(0)
}

// === Daemon ===

/// The real `drover` binary, started with `drover run ARGS`; its log is kept for assertions.
pub struct Daemon {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    /// The admin API (a free loopback port unless the arguments name one).
    pub admin: Option<SocketAddr>,
}

impl Daemon {
    /// Starts `drover run` and waits (30 s at most) for it to be ready; on failure returns its
    /// exit status and log.
    pub fn start(args: &[String]) -> Result<Self, (Option<i32>, String)> {
        Self::start_within(args, Duration::from_secs(30))
    }

    /// [`Daemon::start`], waiting at most `within` for readiness.
    pub fn start_within(args: &[String], within: Duration) -> Result<Self, (Option<i32>, String)> {
        let mut args = args.to_vec();
        let admin = match args.iter().position(|a| a == "--admin") {
            Some(i) => args.get(i + 1).and_then(|a| a.parse().ok()),
            None => {
                let free = std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("free loopback port");
                args.extend(["--admin".to_string(), free.to_string()]);
                Some(free)
            }
        };
        let mut cmd = Command::new(bin("drover"));
        cmd.arg("run")
            .args(&args)
            .env("RUST_LOG", Self::log_filter());
        Self::spawn(cmd, admin, within)
    }

    /// The daemon's log filter in tests (`DROVER_TEST_LOG`).
    pub fn log_filter() -> String {
        std::env::var("DROVER_TEST_LOG").unwrap_or_else(|_| "info,drover=debug".into())
    }

    /// Starts `cmd` (a daemon, however it is run: its log on stderr) and waits at most `within`
    /// for it to be ready; `admin` is where its admin API listens.
    pub fn spawn(
        mut cmd: Command,
        admin: Option<SocketAddr>,
        within: Duration,
    ) -> Result<Self, (Option<i32>, String)> {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn drover");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let echo = std::env::var_os("DROVER_ECHO_LOG").is_none_or(|v| v != "0");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[drover] {line}");
                }
                if line.contains("drover ready") {
                    let _ = ready_tx.send(());
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let deadline = Instant::now() + within;
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(Self {
                    child: Some(child),
                    log,
                    admin,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return Err((status.code(), log.lock().expect("log lock").join("\n")));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err((None, log.lock().expect("log lock").join("\n")));
            }
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `GET` on the admin API (through curl, bounded to 5 s); the body.
    pub fn admin_get(&self, path: &str) -> String {
        let addr = self.admin.expect("daemon started with an admin API");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &format!("http://{addr}{path}")])
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `/clusters` as JSON.
    pub fn clusters(&self) -> serde_json::Value {
        let body = self.admin_get("/clusters");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/clusters is not JSON ({e}): {body}"))
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        self.wait_log_count(needle, 1, within)
    }

    /// Waits (bounded) until the log holds `needle` at least `count` times.
    pub fn wait_log_count(&self, needle: &str, count: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::SIGTERM,
            );
        }
    }

    /// SIGTERM, then waits (bounded) for exit; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        self.terminate();
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `yaml` to a fresh file under the system temp dir and returns its path.
pub fn write_config(yaml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("drover-test-{}", unique_id()));
    std::fs::create_dir_all(&dir).expect("config dir");
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    path
}

/// Replaces the configuration file at `path` atomically (write aside, rename), as an operator's
/// tooling would, so the daemon never reads half a file.
pub fn replace_config(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// A `ServiceEntry` with STATIC endpoints, for tests.
pub fn service_entry(
    name: &str,
    vips: &[&str],
    port: u16,
    target_port: u16,
    endpoints: &[IpAddr],
) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{address: \"{e}\"}}"))
        .collect();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: test}}\nspec:\n  hosts: [{name}.test.svc]\n  addresses: [{}]\n  ports: [{{number: {port}, name: tcp, protocol: TCP, targetPort: {target_port}}}]\n  resolution: STATIC\n  endpoints: [{}]\n",
        vips.iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", "),
        eps.join(", ")
    )
}

// === BPF maps ===

/// `bpftool map dump pinned … -j` of a BTF map: `(key, value)` pairs of the formatted entries,
/// per-CPU values summed field by field.
pub fn bpftool_dump(path: &std::path::Path) -> Vec<(serde_json::Value, serde_json::Value)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array()
        .expect("array of entries")
        .iter()
        .map(|e| {
            let f = &e["formatted"];
            let value = match f.get("values") {
                Some(per_cpu) => {
                    let mut sum = serde_json::Map::new();
                    for cpu in per_cpu.as_array().unwrap() {
                        for (k, n) in cpu["value"].as_object().unwrap() {
                            let acc = sum.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                            sum.insert(k.clone(), (acc + n.as_u64().unwrap_or(0)).into());
                        }
                    }
                    serde_json::Value::Object(sum)
                }
                None => f["value"].clone(),
            };
            (f["key"].clone(), value)
        })
        .collect()
}

/// The object whose `name` is `name` in the JSON array `list` (an admin `/clusters` list of
/// clusters or endpoints); panics naming what was searched.
pub fn named(list: &serde_json::Value, name: &str) -> serde_json::Value {
    list.as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {list}"))
        .clone()
}

/// The IPv4 address of a BTF-printed `addr` (four network-order words, v4-mapped).
pub fn key_addr(key: &serde_json::Value) -> std::net::IpAddr {
    let words: Vec<u32> = key["addr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_u64().unwrap() as u32)
        .collect();
    std::net::IpAddr::from(words[3].to_ne_bytes())
}

// === PKI for TLS tests ===

/// A short identity of a DER certificate (hex of a fixed-key hash), as `drover-testsrv` reports
/// the client certificate it saw.
pub fn der_id(der: &[u8]) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    der.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// [`der_id`] of the first certificate of a PEM file.
pub fn pem_id(path: &Path) -> String {
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};
    der_id(
        CertificateDer::from_pem_file(path)
            .expect("PEM certificate")
            .as_ref(),
    )
}

/// A throwaway PKI in a temporary directory (rcgen, ECDSA P-256): a CA, server certificates it
/// signs, an unrelated CA, and client certificates from a client CA. Removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    client_ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("drover-pki-{}", unique_id()));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ca = Self::authority("drover test CA");
        let client_ca = Self::authority("drover test client CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("client-ca.pem"), client_ca.pem()).unwrap();
        let other = Self::authority("unrelated CA");
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
        std::fs::write(dir.join("empty.pem"), "").unwrap();
        Self { dir, ca, client_ca }
    }

    /// A mesh CA made by `drover ca init` in `<dir>/mesh`; its directory (for `--mesh-ca`).
    pub fn mesh_ca(&self) -> String {
        let mesh = self.dir.join("mesh").display().to_string();
        let out = Command::new(bin("drover"))
            .args(["ca", "init", "--dir", &mesh])
            .output()
            .expect("run drover ca init");
        assert!(out.status.success(), "drover ca init: {out:?}");
        mesh
    }

    fn authority(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
    }

    /// Writes `<stem>.pem` and `<stem>-key.pem`: a leaf for `sans`, signed by the CA (or the
    /// client CA), optionally already expired. Returns (certificate, key) paths.
    pub fn leaf(
        &self,
        stem: &str,
        sans: &[&str],
        client: bool,
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, stem);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = if client { &self.client_ca } else { &self.ca };
        let cert = params.signed_by(&key, issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A server leaf for `sans` (serial 4242) and `crl.pem`, a CRL of the CA revoking it.
    pub fn revoked_leaf(&self, sans: &[&str]) -> (PathBuf, PathBuf) {
        let serial = rcgen::SerialNumber::from_slice(&[0x10, 0x92]);
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.serial_number = Some(serial.clone());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.dir.join("revoked.pem"),
            self.dir.join("revoked-key.pem"),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2100, 1, 1),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: vec![rcgen::RevokedCertParams {
                serial_number: serial,
                revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }],
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.ca)
        .unwrap();
        std::fs::write(self.dir.join("crl.pem"), crl.pem().unwrap()).unwrap();
        (c, k)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
