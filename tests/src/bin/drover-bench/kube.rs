//! Kubernetes mode at scale: the test API server holds `--kube-services` Services (10 endpoints
//! each, in EndpointSlices, and a DestinationRule with two subsets in the Service's namespace)
//! over `--kube-pods` Pods; the daemon lists and watches everything and serves, for each count
//! of `--kube-identities`, that many workloads of distinct identities (a Pod each, in its own
//! namespace with its own service account: a network namespace of the bench per workload).
//! Measured per count: time from start to ready, the daemon's RSS once ready and after the
//! changes, the time from an EndpointSlice change to the first connection routed by it
//! (p50/p99 over `--kube-changes` changes of one probe service that flips between two live
//! endpoints), the daemon's CPU time per change, and the time `drover-cni ADD` takes to enrol a
//! pod (p50/p99 over `--kube-adds` pods, each a network namespace of the bench with its Pod in
//! the API server) while EndpointSlice changes of other Services stream in (one every 20 ms),
//! and the time from a DestinationRule edit to its patched snapshots being swapped in (as the
//! daemon logs it).
//! Each `--kube-services` count is its own API server; the curves are plotted into
//! `kube.md` beside the peers report.
//!
//! Only the probe service's endpoints are ever dialled (live echo servers in the topology's
//! endpoint namespaces); the other endpoints' addresses (`198.19.0.0/16`) are never connected to.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::report::KubeRow;
use drover_tests::{
    Daemon, Netns, PinDir, Topology,
    apiserver::{ApiServer, DESTINATION_RULE, ENDPOINT_SLICE, ISTIO, NODE, POD, SERVICE},
    k8s::{endpoint_slice, istio, node, pod, service},
};

/// The probe service's VIP (loopback inside the client namespace).
const PROBE_VIP: &str = "127.77.1.1";
/// Endpoints per Service.
const PER_SERVICE: usize = 10;

/// What to build and how often to change it.
pub struct Scale {
    /// Service counts, one API server each.
    pub services: Vec<usize>,
    /// Pods in the API server (default: five per Service).
    pub pods: Option<usize>,
    pub changes: usize,
    /// Distinct workload identities on the node, one measurement each.
    pub identities: Vec<usize>,
    /// Pods enrolled through `drover-cni ADD` per measurement.
    pub adds: usize,
    /// Where `kube.md` and its plots go.
    pub report_dir: PathBuf,
}

/// One API server's contents.
struct Size {
    services: usize,
    pods: usize,
}

/// User + system CPU time of process `pid` so far, in milliseconds (`/proc/PID/stat`).
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: f64 = (rest.split_whitespace().skip(11).take(2))
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf reads a constant.
    #[expect(unsafe_code, reason = "sysconf(_SC_CLK_TCK)")]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

/// The address of pod `p` (never dialled).
fn pod_ip(p: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, (p / 256) as u8, (p % 256) as u8)
}

/// The VIP of service `s` (loopback inside the client namespace, never reached).
fn vip(s: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 78, (s / 256) as u8, (s % 256) as u8)
}

fn populate(api: &ApiServer, scale: &Size) {
    api.apply(NODE, node("node1", "region1", "zone1"));
    for p in 0..scale.pods {
        let name = format!("pod-{p}");
        let ns = format!("ns-{}", p % 100);
        let ip = pod_ip(p).to_string();
        api.apply(
            POD,
            pod(
                &ns,
                &name,
                &[("app", "a"), ("version", "v1")],
                "default",
                "node1",
                &ip,
            ),
        );
    }
    for s in 0..scale.services {
        let ns = format!("ns-{}", s % 100);
        let name = format!("svc-{s}");
        api.apply(
            SERVICE,
            service(&ns, &name, &[&vip(s).to_string()], &[("tcp-web", 80, 7000)]),
        );
        api.apply(
            DESTINATION_RULE,
            istio(&format!(
                "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {ns}}}
spec:
  host: {name}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
"
            )),
        );
        service_slice(api, (s, scale.pods), None);
    }
}

/// The EndpointSlice of service `s` (of `pods` pods in all): its ten pods, all ready but
/// `not_ready`. Pods of the Service's namespace, spread so that each pod serves about
/// services × 10 / pods Services.
fn service_slice(api: &ApiServer, (s, pods): (usize, usize), not_ready: Option<usize>) {
    let ns = format!("ns-{}", s % 100);
    let name = format!("svc-{s}");
    let ips: Vec<(String, String)> = (0..PER_SERVICE)
        .map(|j| {
            let p = ((s / 100 * PER_SERVICE + j) * 100 + s % 100) % pods.max(1);
            (pod_ip(p).to_string(), format!("pod-{p}"))
        })
        .collect();
    let eps: Vec<_> = (ips.iter().enumerate())
        .map(|(j, (ip, n))| (ip.as_str(), n.as_str(), not_ready != Some(j), false))
        .collect();
    api.apply(
        ENDPOINT_SLICE,
        endpoint_slice(&ns, &format!("{name}-1"), &name, &eps, &[("tcp-web", 7000)]),
    );
}

/// Runs `drover-cni` for `command` on container `id` (pod `ns-k/add-k` in network namespace
/// `netns`) against the daemon's `socket`.
fn plugin(
    socket: &Path,
    command: &str,
    (id, k): (&str, usize),
    netns: &Netns,
) -> std::process::Output {
    let mut child = Command::new(drover_tests::bin("drover-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/nonexistent")
        .env("CNI_NETNS", format!("/var/run/netns/{}", netns.name))
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns-{};K8S_POD_NAME=add-{k}",
                k % 100
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run drover-cni");
    let conf = format!(
        r#"{{"cniVersion":"1.1.0","name":"bench","type":"drover-cni","socket":"{}","prevResult":{{"cniVersion":"1.1.0","ips":[]}}}}"#,
        socket.display()
    );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("conf");
    child.wait_with_output().expect("drover-cni")
}

/// Milliseconds each of `n` `drover-cni ADD`s took (a pod each: its Pod in the API server
/// first, as the kubelet creates it before the sandbox), sorted, while one EndpointSlice of the
/// size's other Services changes every 20 ms; the pods are removed (`DEL`) afterwards.
fn cni_adds(api: &ApiServer, socket: &Path, n: usize, size: &Size) -> Vec<f64> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Bounded: at most one change per 20 ms, and no more than 10 000.
            for c in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let s = (c * 7919) % size.services.max(1);
                service_slice(api, (s, size.pods), Some(c % PER_SERVICE));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut lags = Vec::new();
        let mut pods = Vec::new();
        for k in 0..n {
            let ns = Netns::new(format!("drvadd{k}"));
            let ip = format!("198.19.251.{}", k + 1);
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
            api.apply(
                POD,
                pod(
                    &format!("ns-{}", k % 100),
                    &format!("add-{k}"),
                    &[("app", "a"), ("version", "v1")],
                    "default",
                    "node1",
                    &ip,
                ),
            );
            let id = format!("bench-add-{k}");
            let started = Instant::now();
            let out = plugin(socket, "ADD", (&id, k), &ns);
            lags.push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(
                out.status.success(),
                "ADD {k}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            pods.push((id, k, ns));
        }
        stop.store(true, Ordering::Relaxed);
        for (id, k, ns) in &pods {
            plugin(socket, "DEL", (id, *k), ns);
        }
        lags.sort_by(|a, b| a.total_cmp(b));
        lags
    })
}

/// Points the probe service at endpoint `i` (1-based) of the topology.
fn probe_slice(api: &ApiServer, i: usize) {
    let ip = Topology::ep4(i).to_string();
    let pod_name = format!("ep{i}");
    api.apply(
        ENDPOINT_SLICE,
        endpoint_slice(
            "bench",
            "probe-1",
            "probe",
            &[(&ip, &pod_name, true, false)],
            &[("tcp-web", 7000)],
        ),
    );
}

/// Which echo server answers a connection to the probe VIP (None on failure).
fn answer(t: &Topology) -> Option<String> {
    let mut s = t
        .client
        .connect(SocketAddr::new(PROBE_VIP.parse().ok()?, 80), None)
        .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    // "hello from ep1 peer=…"
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(2)
        .map(str::to_string)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds from each of `changes` EndpointSlice changes of the probe service (flipping it
/// between the two endpoints) to the first connection the new endpoint answers, sorted.
fn change_lags(api: &ApiServer, t: &Topology, changes: usize) -> Vec<f64> {
    let mut lags = Vec::new();
    for c in 0..changes {
        let target = if c % 2 == 0 { 2 } else { 1 };
        probe_slice(api, target);
        let changed = Instant::now();
        let want = format!("ep{target}");
        loop {
            if answer(t).as_deref() == Some(want.as_str()) {
                lags.push(changed.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            assert!(
                changed.elapsed() < Duration::from_secs(60),
                "change {c} never applied"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    lags.sort_by(|a, b| a.total_cmp(b));
    lags
}

/// The workloads of `n` distinct identities: a network namespace each (holding its pod's
/// address, never reached) and its Pod in namespace `ns-k` with service account `sa-k`.
fn identities(api: &ApiServer, n: usize) -> Vec<Netns> {
    (0..n)
        .map(|k| {
            let ns = Netns::new(format!("drvid{k}"));
            let ip = format!("198.19.250.{}", k + 1);
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"]);
            api.apply(
                POD,
                pod(
                    &format!("ns-{k}"),
                    &format!("id-{k}"),
                    &[("app", "a"), ("version", "v1")],
                    &format!("sa-{k}"),
                    "node1",
                    &ip,
                ),
            );
            ns
        })
        .collect()
}

/// Starts a daemon serving the client and `ids` workloads, and measures it.
fn measure(
    (api, size): (&ApiServer, &Size),
    t: &Topology,
    dir: &Path,
    (n, ids): (usize, &[Netns]),
    scale: &Scale,
    rss_kib: fn(u32) -> u64,
) -> KubeRow {
    let pins = PinDir::new();
    let kubeconfig = dir.join("kubeconfig");
    let socket = dir.join("cni.sock");
    let mut args: Vec<String> = [
        "--kubernetes",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "node1",
        "--netns",
        &t.client.name,
        "--pin-dir",
        &pins.path.display().to_string(),
        "--cni-socket",
        &socket.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for ns in &ids[..n.saturating_sub(1)] {
        args.extend(["--netns".to_string(), ns.name.clone()]);
    }
    let started = Instant::now();
    let mut daemon = Daemon::start_within(&args, Duration::from_secs(600)).expect("drover starts");
    let ready = started.elapsed();
    let pid = daemon.pid().expect("pid");
    std::thread::sleep(Duration::from_secs(3));
    let rss = rss_kib(pid);
    assert_eq!(
        answer(t).as_deref(),
        Some("ep1"),
        "the probe service routes"
    );
    let cpu_before = cpu_ms(pid);
    let lags = change_lags(api, t, scale.changes);
    let cpu = (cpu_ms(pid) - cpu_before) / scale.changes.max(1) as f64;
    std::thread::sleep(Duration::from_secs(5));
    let rss_after = rss_kib(pid);
    let adds = cni_adds(api, &socket, scale.adds, size);
    let rules = rule_edits(api, &daemon, scale.changes.min(40));
    daemon.stop();
    // The probe service back where the next measurement expects it.
    probe_slice(api, 1);
    KubeRow {
        services: size.services,
        identities: n,
        ready_s: ready.as_secs_f64(),
        rss_mib: rss / 1024,
        rss_after_mib: rss_after / 1024,
        change: (percentile(&lags, 0.5), percentile(&lags, 0.99)),
        cpu_ms: cpu,
        add: (percentile(&adds, 0.5), percentile(&adds, 0.99)),
        rule: (percentile(&rules, 0.5), percentile(&rules, 0.99)),
    }
}

/// Milliseconds from each of `n` edits of Service `svc-0`'s DestinationRule (its load balancer
/// flips) to the patched snapshots swapped in, as the daemon logs it (`elapsed_ms` of its
/// `snapshots patched` line), sorted.
fn rule_edits(api: &ApiServer, daemon: &Daemon, n: usize) -> Vec<f64> {
    let id = "DestinationRule ns-0/svc-0";
    let lines = |d: &Daemon| -> Vec<String> {
        (d.log().lines())
            .filter(|l| l.contains("snapshots patched") && l.contains(id))
            .map(str::to_string)
            .collect()
    };
    let before = lines(daemon).len();
    for k in 0..n {
        let simple = ["LEAST_REQUEST", "ROUND_ROBIN"][k % 2];
        api.apply(
            DESTINATION_RULE,
            istio(&format!(
                "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc-0, namespace: ns-0}}
spec:
  host: svc-0
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
"
            )),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines(daemon).len() < before + k + 1 {
            assert!(
                Instant::now() < deadline,
                "DestinationRule edit {k} was not patched"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut ms: Vec<f64> = lines(daemon)[before..]
        .iter()
        .filter_map(|l| l.split("elapsed_ms=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    ms
}

/// Runs the measurement for every size; `t` has two endpoint namespaces with echo servers
/// `ep1`, `ep2` on 7000.
pub fn run(t: &Topology, scale: &Scale, rss_kib: fn(u32) -> u64) {
    let mut rows = Vec::new();
    for &services in &scale.services {
        let size = Size {
            services,
            pods: scale.pods.unwrap_or(services * 5),
        };
        rows.extend(run_size(t, &size, scale, rss_kib));
    }
    let command = format!(
        "cargo xtask bench -- --only kube --kube-services {} --kube-changes {} --kube-identities {} --kube-adds {}",
        list(&scale.services),
        scale.changes,
        list(&scale.identities),
        scale.adds
    );
    println!(
        "(change: EndpointSlice change → first connection routed by it, {} changes; ADD: drover-cni ADD → enrolled, {} pods, while changes stream in)\nreproduce: {command}",
        scale.changes, scale.adds
    );
    match crate::report::kube(&scale.report_dir, &rows, &command) {
        Ok(path) => println!("report: {}", path.display()),
        Err(e) => println!("report not written: {e}"),
    }
}

fn list(v: &[usize]) -> String {
    v.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One API server of `size`: every identity count measured against it.
fn run_size(t: &Topology, size: &Size, scale: &Scale, rss_kib: fn(u32) -> u64) -> Vec<KubeRow> {
    let api = ApiServer::start(&ISTIO);
    let filled = Instant::now();
    populate(&api, size);
    for (i, ip) in [(1, Topology::ep4(1)), (2, Topology::ep4(2))] {
        let IpAddr::V4(ip) = ip else { unreachable!() };
        api.apply(
            POD,
            pod(
                "bench",
                &format!("ep{i}"),
                &[("app", "probe")],
                "default",
                "node1",
                &ip.to_string(),
            ),
        );
    }
    api.apply(
        SERVICE,
        service("bench", "probe", &[PROBE_VIP], &[("tcp-web", 80, 7000)]),
    );
    probe_slice(&api, 1);
    // The client namespace is one identity; the others are workloads of their own.
    let most = scale.identities.iter().copied().max().unwrap_or(1);
    let ids = identities(&api, most.saturating_sub(1));
    println!(
        "\nKubernetes mode: {} Services × {PER_SERVICE} endpoints (a DestinationRule with 2 subsets each) over {} Pods in the test API server (filled in {:.1} s)",
        size.services,
        size.pods,
        filled.elapsed().as_secs_f64()
    );
    let dir = std::env::temp_dir().join(format!("drover-bench-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    api.write_kubeconfig(&dir.join("kubeconfig"));
    println!("{}", KubeRow::HEADER);
    let mut out = Vec::new();
    for &n in &scale.identities {
        let r = measure((&api, size), t, &dir, (n, &ids), scale, rss_kib);
        println!("{}", r.markdown());
        out.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}
