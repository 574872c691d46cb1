//! Faults and abuse through the real kernel capture path: a second daemon on one pin directory,
//! config writers that truncate, reload storms, signals, failed starts, cross-site use of the
//! admin API, clients that stall, and overload. Each test failed before its fix. Root needed;
//! under `CI` they fail rather than skip. Run serially (`--test-threads=1`).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use drover_tests::{
    Captured, Daemon, PinDir, Prepared, Proc, Topology, VIP, args, captured, prepared,
    require_privileged, service_entry, write_config,
};

/// The first line a new captured connection to `VIP:80` reads (`hello from ep1 …` through
/// drover, `hello from direct …` if capture let it through to the VIP itself).
fn greeting(t: &Topology) -> String {
    let conn = t
        .client
        .connect(format!("{VIP}:80").parse().unwrap(), None)
        .expect("connect to the VIP");
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    line
}

/// A server on the VIP itself inside the client namespace: what a connection reaches if capture
/// lets it through.
fn direct_server(t: &Topology) -> Proc {
    Proc::server(
        Some(&t.client),
        "echo",
        &[format!("{VIP}:80").parse().unwrap()],
        "direct",
    )
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

fn signal(daemon: &Daemon, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(daemon.pid().expect("running") as i32);
    nix::sys::signal::kill(pid, sig).expect("kill");
}

/// `curl` against the admin API: (status code, body).
fn admin(daemon: &Daemon, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let addr = daemon.admin.expect("admin API");
    let mut c = std::process::Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "5",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    for h in headers {
        c.args(["-H", h]);
    }
    let out = c
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("status line");
    (code.trim().parse().expect("status"), body.to_string())
}

#[test]
fn a_second_daemon_on_the_same_pin_dir_is_refused_and_capture_stays_whole() {
    if !require_privileged() {
        return;
    }
    let Captured {
        t,
        daemon,
        _servers,
        _pins,
        ..
    } = captured(1, None, &[]);
    let _direct = direct_server(&t);
    let owner = daemon.pid().unwrap();
    // Another configuration (other VIP), same pins.
    let other = write_config(&service_entry(
        "other",
        &["127.77.0.99"],
        80,
        7000,
        &[Topology::ep4(1)],
    ));
    let (code, log) = Daemon::start(&args(&other, &_pins, &["--netns", &t.client.name]))
        .err()
        .expect("the second daemon must not start");
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!("is owned by drover (pid {owner})")),
        "the error names the owner: {log}"
    );
    // The first daemon's capture set is untouched, before and after the second one exited.
    assert!(greeting(&t).starts_with("hello from ep1"), "still captured");
    // Uninstall is refused while the owner runs (it would silently stop its capture).
    let out = std::process::Command::new(drover_tests::bin("drover"))
        .args(["uninstall", "--pin-dir", _pins.path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("(pid {owner})")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(greeting(&t).starts_with("hello from ep1"), "still captured");
    assert!(daemon.log().contains("drover ready"));
}

#[test]
fn a_writer_that_truncates_then_writes_never_shrinks_the_capture_set() {
    if !require_privileged() {
        return;
    }
    let Captured {
        t,
        daemon,
        _servers,
        _pins,
        cfg,
    } = captured(1, None, &[]);
    let _direct = direct_server(&t);
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    let writer = {
        let (cfg, yaml) = (cfg.clone(), yaml.clone());
        std::thread::spawn(move || {
            for _ in 0..8 {
                // `cat > file` with a slow producer: truncated, then written, then closed.
                let mut f = std::fs::File::create(&cfg).unwrap();
                std::thread::sleep(Duration::from_millis(150));
                f.write_all(yaml.as_bytes()).unwrap();
                drop(f);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !writer.is_finished() && Instant::now() < deadline {
        seen.push(greeting(&t));
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.join().unwrap();
    assert!(seen.len() > 20, "enough connections during the writes");
    let bypassed: Vec<_> = seen
        .iter()
        .filter(|g| !g.starts_with("hello from ep1"))
        .collect();
    assert!(
        bypassed.is_empty(),
        "{} of {}: {bypassed:?}",
        bypassed.len(),
        seen.len()
    );

    // A file truncated for good: the configuration is refused, capture stays.
    std::fs::write(&cfg, "").unwrap();
    assert!(
        daemon.wait_log("defines no service", Duration::from_secs(5)),
        "refusal logged"
    );
    assert!(greeting(&t).starts_with("hello from ep1"));
}

#[test]
fn one_change_is_one_reload_and_reads_do_not_trigger_more() {
    if !require_privileged() {
        return;
    }
    let Captured {
        daemon,
        _servers,
        _pins,
        cfg,
        ..
    } = captured(1, None, &[]);
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("# edited\n{yaml}")).unwrap();
    assert!(daemon.wait_log("configuration reloaded", Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        count(&daemon.log(), "configuration reloaded"),
        1,
        "one change, one reload"
    );
    // An invalid change: refused once, not logged over and over.
    std::fs::write(&cfg, "kind: ServiceEntry\nspec: [\n").unwrap();
    assert!(daemon.wait_log("configuration rejected", Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count(&daemon.log(), "configuration rejected"), 1);
    assert_eq!(count(&daemon.log(), "configuration reloaded"), 1);
}

#[test]
fn sighup_reloads_and_unhandled_signals_do_not_kill_the_daemon() {
    if !require_privileged() {
        return;
    }
    let one = service_entry("echo", &[VIP], 80, 7000, &[Topology::ep4(1)]);
    let Prepared {
        t,
        servers: _servers,
        pins,
        cfg,
    } = prepared(2, Some(one));
    let mut daemon = Daemon::start(&args(
        &cfg,
        &pins,
        &["--netns", &t.client.name, "--no-watch"],
    ))
    .unwrap();
    std::fs::write(
        &cfg,
        service_entry("echo", &[VIP], 80, 7000, &[Topology::ep4(2)]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(greeting(&t).starts_with("hello from ep1"), "--no-watch");
    signal(&daemon, nix::sys::signal::SIGHUP);
    assert!(daemon.wait_log("configuration reloaded", Duration::from_secs(5)));
    assert!(
        greeting(&t).starts_with("hello from ep2"),
        "SIGHUP applied the new file"
    );
    for sig in [
        nix::sys::signal::SIGUSR1,
        nix::sys::signal::SIGUSR2,
        nix::sys::signal::SIGALRM,
        nix::sys::signal::SIGPIPE,
    ] {
        signal(&daemon, sig);
    }
    assert!(
        daemon.wait_log("signal=\"SIGALRM\"", Duration::from_secs(3))
            || daemon.wait_log("signal=SIGALRM", Duration::from_secs(1)),
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("signal ignored"));
    assert!(greeting(&t).starts_with("hello from ep2"), "still serving");
    assert_eq!(daemon.stop(), Some(0), "SIGTERM still drains and exits 0");
}

#[test]
fn a_failed_start_leaves_no_capture_and_prints_its_error_once() {
    if !require_privileged() {
        return;
    }
    let Prepared {
        t,
        servers: _servers,
        pins,
        cfg,
    } = prepared(1, None);
    let _direct = direct_server(&t);
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();
    let (code, log) = Daemon::start(&args(
        &cfg,
        &pins,
        &["--netns", &t.client.name, "--admin", &port],
    ))
    .err()
    .expect("a busy admin port fails the start");
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(count(&log, "admin API cannot listen"), 1, "{log}");
    assert_eq!(
        count(&log, "Address already in use"),
        1,
        "printed once: {log}"
    );
    assert!(!pins.path.exists(), "nothing pinned: {log}");
    assert!(
        greeting(&t).starts_with("hello from direct"),
        "no capture left behind"
    );
}

#[test]
fn admin_api_changes_state_only_on_post_from_a_loopback_host() {
    if !require_privileged() {
        return;
    }
    let Captured {
        daemon,
        _servers,
        _pins,
        ..
    } = captured(1, None, &[]);
    let (code, _) = admin(&daemon, "GET", "/logging?level=trace", &[]);
    assert_eq!(code, 405, "a GET changes nothing");
    let (code, _) = admin(
        &daemon,
        "POST",
        "/logging?level=trace",
        &["Host: rebound.example:15000"],
    );
    assert_eq!(code, 403, "DNS rebinding: a foreign Host is refused");
    let (code, _) = admin(&daemon, "GET", "/clusters", &["Host: rebound.example"]);
    assert_eq!(code, 403, "reads too");
    let (code, _) = admin(
        &daemon,
        "POST",
        "/logging?level=trace",
        &["Origin: http://evil.example"],
    );
    assert_eq!(code, 403, "a cross-site form post is refused");
    let (code, body) = admin(&daemon, "POST", "/logging?level=drover=trace", &[]);
    assert_eq!(code, 400, "only known levels: {body}");
    assert!(body.contains("trace debug info"), "{body}");
    assert!(!daemon.log().contains("log level changed"));
    let (code, _) = admin(&daemon, "POST", "/logging?level=debug", &[]);
    assert_eq!(code, 200);
    let (code, body) = admin(&daemon, "GET", "/clusters", &["Host: localhost"]);
    assert_eq!(code, 200, "{body}");
    assert!(daemon.wait_log("log level changed", Duration::from_secs(2)));
}

/// One HTTP service `web` at `VIP:80` → port 9080 of ep1 (an HTTP test server).
fn http_service() -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: test}}
spec:
  hosts: [web.test.svc]
  addresses: [\"{VIP}\"]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 9080}}]
  resolution: STATIC
  endpoints: [{{address: \"{}\"}}]
",
        Topology::ep4(1)
    )
}

/// The HTTP service of [`http_service`] with its test server and a daemon (`extra` arguments).
struct Web {
    t: Topology,
    daemon: Daemon,
    _server: Proc,
    _pins: PinDir,
}

fn web(extra: &[&str]) -> Web {
    let t = Topology::new(1);
    let server = Proc::server(
        Some(&t.endpoints[0]),
        "http",
        &[SocketAddr::new(Topology::ep4(1), 9080)],
        "web",
    );
    let pins = PinDir::new();
    let cfg = write_config(&http_service());
    let mut a = vec!["--netns", t.client.name.as_str()];
    a.extend_from_slice(extra);
    let daemon = Daemon::start(&args(&cfg, &pins, &a)).unwrap();
    Web {
        t,
        daemon,
        _server: server,
        _pins: pins,
    }
}

/// Seconds until the server closes `conn` (reads until EOF; at most `limit`).
fn closed_after(mut conn: std::net::TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(start.elapsed());
            }
            Err(_) => return None,
        }
    }
}

/// Reads one response with a `content-length` from `conn`; returns its status line and body.
fn read_response(conn: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = std::io::BufReader::new(conn);
    let mut status = String::new();
    std::io::BufRead::read_line(&mut r, &mut status).unwrap();
    let mut len = 0;
    loop {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).unwrap();
    (status, body)
}

#[test]
fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_request() {
    if !require_privileged() {
        return;
    }
    let Web {
        t,
        daemon,
        _server,
        _pins,
    } = web(&["--workers", "1"]); // on the one-thread runtime, as the peers bench runs it
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let mut conn = t.client.connect(vip, None).unwrap();
    for round in 0..3 {
        conn.write_all(b"GET / HTTP/1.1\r\nHost: web.test.svc\r\n\r\n")
            .unwrap();
        let (status, body) = read_response(&mut conn);
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "round {round}: {status}"
        );
        assert!(!body.is_empty(), "round {round}");
        // Idle past the parking delay (250 ms).
        std::thread::sleep(Duration::from_millis(600));
    }
    let d = &daemon.clusters()["downstream"];
    assert!(d["cx_parked"].as_u64() >= Some(3), "{d}");
    assert_eq!(d["cx_total"], 1, "{d}");
    assert!(
        daemon
            .admin_get("/stats/prometheus")
            .contains("envoy_http_downstream_cx_parked ")
    );
}

#[test]
fn stalled_http_clients_are_closed_by_header_and_idle_timeouts() {
    if !require_privileged() {
        return;
    }
    let Web {
        t,
        daemon,
        _server,
        _pins,
    } = web(&[
        "--request-headers-timeout",
        "1",
        "--downstream-idle-timeout",
        "2",
    ]);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let limit = Duration::from_secs(6);

    // Nothing at all.
    let silent = t.client.connect(vip, None).unwrap();
    // A partial request header.
    let mut partial = t.client.connect(vip, None).unwrap();
    partial.write_all(b"GET / HTTP/1.1\r\nHost: web").unwrap();
    // A complete request, then idle on a keep-alive connection.
    let mut idle = t.client.connect(vip, None).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: web.test.svc\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let (s, p, i) = std::thread::scope(|sc| {
        let s = sc.spawn(|| closed_after(silent, limit));
        let p = sc.spawn(|| closed_after(partial, limit));
        let i = sc.spawn(|| closed_after(idle, limit));
        (s.join().unwrap(), p.join().unwrap(), i.join().unwrap())
    });
    let s = s.expect("a silent connection is closed");
    let p = p.expect("a partial header is closed");
    let i = i.expect("an idle keep-alive connection is closed");
    assert!(
        s >= Duration::from_millis(800) && s < Duration::from_secs(3),
        "{s:?}"
    );
    assert!(
        p >= Duration::from_millis(800) && p < Duration::from_secs(3),
        "{p:?}"
    );
    assert!(
        i >= Duration::from_millis(1800) && i < Duration::from_secs(4),
        "{i:?}"
    );
    let d = &daemon.clusters()["downstream"];
    assert_eq!(d["rq_header_timeout"], 2, "{d}");
    assert_eq!(d["cx_idle_timeout"], 1, "{d}");
    assert!(
        daemon
            .admin_get("/stats/prometheus")
            .contains("envoy_http_downstream_rq_header_timeout 2")
    );
}

#[test]
fn overload_cap_refuses_connections_beyond_the_limit_and_frees_slots() {
    if !require_privileged() {
        return;
    }
    let Captured {
        t,
        daemon,
        _servers,
        _pins,
        ..
    } = captured(1, None, &["--max-downstream-connections", "2"]);
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let read_line = |c: &std::net::TcpStream| {
        let mut line = String::new();
        let _ = BufReader::new(c).read_line(&mut line);
        line
    };
    let a = t.client.connect(vip, None).unwrap();
    assert!(read_line(&a).starts_with("hello from ep1"));
    let b = t.client.connect(vip, None).unwrap();
    assert!(read_line(&b).starts_with("hello from ep1"));
    let c = t.client.connect(vip, None).unwrap();
    assert_eq!(read_line(&c), "", "the third is closed at once");
    assert!(daemon.wait_log(
        "overload: refusing new downstream connections",
        Duration::from_secs(2)
    ));
    let d = &daemon.clusters()["downstream"];
    assert_eq!(d["cx_overflow"], 1, "{d}");
    assert_eq!(d["cx_active"], 2, "{d}");
    drop(a);
    // The slot comes back once the relay has seen the close.
    let deadline = Instant::now() + Duration::from_secs(3);
    while daemon.clusters()["downstream"]["cx_active"] != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = t.client.connect(vip, None).unwrap();
    assert!(read_line(&e).starts_with("hello from ep1"));
    drop(b);
}

#[test]
fn an_upstream_that_closes_mid_body_is_logged_with_uc() {
    if !require_privileged() {
        return;
    }
    let t = Topology::new(1);
    // An endpoint that promises 100 000 bytes, sends 7 and closes.
    let ns = format!("/var/run/netns/{}", t.endpoints[0].name);
    let listener = std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpListener::bind(SocketAddr::new(Topology::ep4(1), 9080)).unwrap()
        })
        .join()
        .unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "request");
            req.extend_from_slice(&buf[..n]);
        }
        c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
            .unwrap();
    });
    let pins = PinDir::new();
    let cfg = write_config(&http_service());
    let daemon = Daemon::start(&args(&cfg, &pins, &["--netns", &t.client.name])).unwrap();
    let mut c = t
        .client
        .connect(format!("{VIP}:80").parse().unwrap(), None)
        .unwrap();
    c.write_all(b"GET /big HTTP/1.1\r\nHost: web.test.svc\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    server.join().unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        daemon.wait_log("path=/big", Duration::from_secs(3)),
        "{}",
        daemon.log()
    );
    let line = daemon
        .log()
        .lines()
        .find(|l| l.contains("path=/big"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("status=200") && line.contains("flag=UC"),
        "{line}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn memory_comes_back_after_a_burst_of_keep_alive_connections() {
    if !require_privileged() {
        return;
    }
    let Web {
        t,
        daemon,
        _server,
        _pins,
    } = web(&[]);
    let pid = daemon.pid().unwrap();
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();
    let open = || {
        let mut c = t.client.connect(vip, None).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: web.test.svc\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        c
    };
    drop(open());
    std::thread::sleep(Duration::from_millis(500));
    let base = rss_kib(pid);
    let held: Vec<_> = (0..2000).map(|_| open()).collect();
    let peak = rss_kib(pid);
    assert!(
        peak > base + 10 * 1024,
        "2000 connections cost memory: {base} → {peak} KiB"
    );
    drop(held);
    // The trimmer looks every 2 s; allow a few looks.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = rss_kib(pid);
    while now > base + (peak - base) / 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = rss_kib(pid);
    }
    assert!(
        now <= base + (peak - base) / 4,
        "RSS after the burst closed: {now} KiB (before {base}, held {peak})"
    );
}
