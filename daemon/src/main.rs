//! The `drover` command line: thin; the work is in the library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use drover::{
    app,
    config::source::ConfigSet,
    redirect::CaptureMode,
    registry::{Client, Registry, explain},
};

#[derive(Parser)]
#[command(
    name = "drover",
    version,
    about = "eBPF transparent proxy enforcing Istio DestinationRule semantics"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Log line format, for the access log (`drover::access`) and everything else.
    #[arg(long, global = true, value_enum, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Plain,
    /// One JSON object per line.
    Json,
}

/// Who the enrolled workloads are: decides `exportTo`, `workloadSelector` and route `sourceLabels`.
#[derive(Args, Clone)]
struct ClientArgs {
    /// Namespace of the enrolled workloads.
    #[arg(long, default_value = "default")]
    client_namespace: String,
    /// Label of the enrolled workloads, `key=value` (repeatable).
    #[arg(long = "client-label", value_parser = parse_label)]
    client_labels: Vec<(String, String)>,
    /// `namespace/name` of a WorkloadEntry in the configuration that describes the enrolled
    /// workloads (its namespace and labels are used; `--client-label` adds to them).
    #[arg(long)]
    client_workload: Option<String>,
    /// Locality of the enrolled workloads, `region/zone/subzone`, for locality load balancing
    /// (default: the --client-workload entry's `locality`; unknown turns locality off).
    #[arg(long, default_value = "")]
    client_locality: String,
}

/// `drover run`.
#[derive(Args)]
struct RunArgs {
    /// YAML file or directory with ServiceEntry / WorkloadEntry (and other Istio) resources.
    #[arg(long = "config", required_unless_present = "kubernetes")]
    config: Vec<PathBuf>,
    /// Kubernetes mode: learn Services, EndpointSlices, Pods, Nodes and the Istio resources from
    /// the API server (beside any --config files; a file resource wins over an API object of the
    /// same kind, namespace and name).
    #[arg(long)]
    kubernetes: bool,
    /// Kubeconfig file for --kubernetes (default: the in-cluster service account).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name, for --kubernetes.
    #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
    node_name: Option<String>,
    /// Cluster DNS domain: Service hosts are `name.namespace.svc.<domain>`.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// cgroup v2 directory whose processes are captured (listener in drover's own netns).
    #[arg(long = "cgroup")]
    cgroup: Vec<PathBuf>,
    /// Network namespace (an `ip netns` name or a path) whose processes are captured;
    /// `NAME=namespace/name` also names the WorkloadEntry that describes its workload (by
    /// default: the Pod in Kubernetes mode, or a WorkloadEntry, holding one of its addresses).
    #[arg(long = "netns")]
    netns: Vec<String>,
    /// Leave captured connects alone while no drover listener exists (default: refuse them).
    #[arg(long)]
    fail_open: bool,
    /// `auto`: the kernel balances eligible plain-TCP services inside `connect()` (no proxy hop;
    /// `drover explain` says which and why); `off`: every captured connection is proxied.
    #[arg(long, value_enum, default_value = "off")]
    fast_path: drover::fastpath::Mode,
    /// How connections reach drover.
    #[arg(long, value_enum, default_value = "ebpf")]
    capture: CaptureMode,
    /// Where maps and links are pinned.
    #[arg(long, default_value = drover_common::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// How long SIGTERM waits for open connections before closing them.
    #[arg(long, default_value = "5", value_name = "SECS")]
    drain_timeout: f64,
    /// Do not watch the config paths (by default a valid change is applied live).
    #[arg(long)]
    no_watch: bool,
    /// Admin API address (`/clusters`, `/stats/prometheus`, `/config_dump`, `/ready`,
    /// `/logging`); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:15000", value_parser = parse_admin)]
    admin: Admin,
    /// Serve `GET /healthz/ready` here for a kubelet's readiness probe (Istio's port is
    /// 15021): 200 once the daemon serves (in Kubernetes mode: once every watcher has listed).
    #[arg(long, value_name = "ADDR")]
    readiness: Option<std::net::SocketAddr>,
    /// Directory of `credentialName` secrets: `DIR/<name>/` with `tls.crt`|`cert`,
    /// `tls.key`|`key`, `ca.crt`|`cacert`, `ca.crl`|`crl`.
    #[arg(long, value_name = "DIR")]
    credentials: Option<PathBuf>,
    /// Mesh CA directory (`drover ca init`): issue the enrolled workloads a SPIFFE identity for
    /// `ISTIO_MUTUAL` (24 h certificates renewed at half-life).
    #[arg(long, value_name = "DIR", conflicts_with = "ca_address")]
    mesh_ca: Option<PathBuf>,
    /// Istio's CA API (`https://istiod.istio-system.svc:15012`): the workload certificates come
    /// from there (`CreateCertificate`, the node's token, each pod's identity asked for), so the
    /// pods join that mesh's trust domain. Needs --ca-root.
    #[arg(long, value_name = "URL", requires = "ca_root")]
    ca_address: Option<String>,
    /// The mesh's root certificate (PEM; istiod's `istio-ca-root-cert` ConfigMap): verifies the
    /// CA and every peer.
    #[arg(long, value_name = "FILE")]
    ca_root: Option<PathBuf>,
    /// The Kubernetes token presented to the CA (a projected token with audience `istio-ca`).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    ca_token: PathBuf,
    /// Trust domain of the mesh identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Service account of the enrolled workloads (their identity's `sa`).
    #[arg(long, default_value = "default")]
    service_account: String,
    /// Where the workload certificate is written (default: a directory under the temp dir).
    #[arg(long, value_name = "DIR")]
    identity_dir: Option<PathBuf>,
    /// Terminate mesh mTLS for the workloads of this network namespace (an `ip netns` name or
    /// a path): inbound TCP to `--inbound-port`s is steered to drover by `sk_lookup`.
    #[arg(long, value_name = "NETNS")]
    inbound_netns: Option<String>,
    /// Workload port whose inbound connections are terminated (repeatable).
    #[arg(long = "inbound-port", requires = "inbound_netns")]
    inbound_ports: Vec<u16>,
    /// Terminate inbound connections for every enrolled namespace and CNI pod (eBPF capture, a
    /// mesh CA): every port but Drover's own is steered to 15006 in the pod (mTLS or plaintext
    /// as its `PeerAuthentication` says), and HBONE is served on 15008, with the workload's own
    /// identity.
    #[arg(long)]
    inbound_pods: bool,
    /// Enrol pods as they start: serve the `drover-cni` plugin on this Unix socket (eBPF
    /// capture only; the plugin's default is /var/run/drover/cni.sock).
    #[arg(long, value_name = "PATH")]
    cni_socket: Option<PathBuf>,
    /// With --cni-socket: install `drover-cni` (beside this executable) into --cni-bin-dir and
    /// keep it chained to the primary network of this CNI conf directory (re-added within 2 s
    /// when the network's own plugin rewrites the file). Not removed on exit (an upgrade
    /// restart must not open a window): `drover cni uninstall` removes it.
    #[arg(long, value_name = "DIR", requires = "cni_socket")]
    cni_conf_dir: Option<PathBuf>,
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The host's /proc (`/host/proc` in a container without the host's PID namespace): with
    /// --kubernetes and --cni-socket, the node's pods the plugin never reported are found there.
    #[arg(long, value_name = "DIR", default_value = "/proc")]
    proc_dir: PathBuf,
    /// With --kubernetes and --cni-socket: how long (seconds) a pod the plugin enrolled may be
    /// missing from a current Pod watch before reconciliation un-enrols it (the kubelet reports
    /// a new pod's addresses only after the plugin's ADD).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 120,
        requires = "cni_socket"
    )]
    cni_grace: u64,
    /// Inbound clients when no `PeerAuthentication` resource sets a mode for the workload: STRICT
    /// (mTLS only), PERMISSIVE (plaintext passes through) or DISABLE (everything passes through).
    #[arg(long, value_enum, default_value = "strict")]
    peer_authentication: drover::config::policy::MtlsMode,
    /// How inbound request paths are normalized before AuthorizationPolicies match them (and as
    /// the workload then receives them): Istio's mesh-wide `pathNormalization` (default BASE:
    /// RFC 3986 dot segments removed, escaped unreserved characters decoded).
    #[arg(long, value_enum, default_value = "base")]
    path_normalization: drover::authz::PathNormalization,
    /// Percentage of new traces (requests that arrive without a trace context) sampled, as
    /// Istio's `meshConfig.defaultConfig.tracing.sampling` (default 1); a client's own
    /// decision is always kept.
    #[arg(long, default_value = "1", value_name = "PERCENT", value_parser = parse_percent)]
    trace_sampling: f64,
    /// Label sets each Istio standard metric keeps; past it, new ones are folded into one
    /// whose peers are `unknown` (counted as `drover_metrics_folded_total`).
    #[arg(long, default_value_t = drover::telemetry::DEFAULT_MAX_SERIES, value_name = "N")]
    metrics_max_series: usize,
    /// Do not record Istio's standard metrics (`istio_*`); Envoy's cluster counters stay.
    #[arg(long)]
    no_standard_metrics: bool,
    /// Serve requests to ports a Service declares HTTP one by one on the inbound side, as a
    /// sidecar's inbound listener does, so that each is counted with `reporter="destination"`
    /// (about 22 µs CPU per request on this VM's HBONE path; without it they are counted as
    /// TCP there, unless an AuthorizationPolicy reads HTTP).
    #[arg(long)]
    inbound_http_metrics: bool,
    /// How HTTP and TCP access-log lines are written: Drover's fields, or Istio's default text
    /// format (`[%START_TIME%] "%REQ(:METHOD)% …" … %ROUTE_NAME%`).
    #[arg(long, value_enum, default_value = "drover")]
    access_log_format: drover::access::Format,
    /// Export sampled spans over OTLP to this collector (`http://HOST:4317` for gRPC, the full
    /// `http://HOST:4318/v1/traces` URL for HTTP); none: spans are not exported.
    #[arg(long, value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// How spans reach `--otlp-endpoint`.
    #[arg(long, value_enum, default_value = "grpc")]
    otlp_protocol: drover::trace::export::Protocol,
    /// Close a captured HTTP connection whose request headers are not complete this long after
    /// accept (first request) or after the request's first byte; counted as
    /// `downstream_rq_header_timeout`.
    #[arg(long, default_value = "10", value_name = "SECS")]
    request_headers_timeout: f64,
    /// Close a captured HTTP connection with no request in flight for this long (Envoy's
    /// default, 1 h); counted as `downstream_cx_idle_timeout`.
    #[arg(long, default_value = "3600", value_name = "SECS")]
    downstream_idle_timeout: f64,
    /// Overload: refuse new captured connections beyond this many open at once (0: no cap);
    /// counted as `downstream_cx_overflow`.
    #[arg(long, default_value = "0", value_name = "N")]
    max_downstream_connections: u64,
    /// Overload: refuse new captured connections while the daemon's resident memory is above
    /// this (0: no limit); counted as `downstream_cx_overload_memory`.
    #[arg(long, default_value = "0", value_name = "MIB")]
    max_memory_mb: u64,
    /// Accept a configuration that defines no service (at start and on reload); by default it
    /// is refused, since an empty or truncated file would otherwise stop all capture.
    #[arg(long)]
    allow_empty: bool,
    /// DNS server (`ip:port`, repeatable) for `resolution: DNS` ServiceEntries (default: the
    /// system's resolvers).
    #[arg(long = "dns-server", value_name = "ADDR")]
    dns_servers: Vec<std::net::SocketAddr>,
    /// Data-plane worker threads (0: one per CPU).
    #[arg(long, default_value = "0")]
    workers: usize,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing would only add noise"
)]
enum Command {
    /// Capture the enrolled workloads' connections and relay them to service endpoints.
    Run(RunArgs),
    /// Check configuration files; prints every error and warning as
    /// `file:line:col: field: message` and exits 1 if there is any error.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print the effective policy for one destination and where every value comes from.
    Explain {
        #[arg(long = "config", required_unless_present = "kubernetes")]
        config: Vec<PathBuf>,
        /// Read Services, EndpointSlices, Pods and the Istio resources from the API server too
        /// (as `drover run --kubernetes` does).
        #[arg(long)]
        kubernetes: bool,
        /// Kubeconfig file for --kubernetes (default: the in-cluster service account).
        #[arg(long, value_name = "FILE", requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// Cluster DNS domain: Service hosts are `name.namespace.svc.<domain>`.
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// `namespace/pod`: explain as that pod sees it (its namespace and labels decide which
        /// rules apply), with --kubernetes.
        #[arg(long, value_name = "NAMESPACE/POD", requires = "kubernetes")]
        workload: Option<String>,
        /// Service host (FQDN, or a short name qualified with the client namespace). Without
        /// it, the workload's inbound side is explained: the AuthorizationPolicies that apply
        /// to it, and with --from (or --source-ip) and --port the decision for that peer.
        #[arg(long)]
        host: Option<String>,
        /// Service port (required when the service has several); without --host, the
        /// workload port a peer connects to.
        #[arg(long)]
        port: Option<u16>,
        /// Without --host: the peer, `namespace/serviceaccount` (its SPIFFE id in the trust
        /// domain), or `plaintext`.
        #[arg(long, value_name = "NAMESPACE/SA", conflicts_with = "host")]
        from: Option<String>,
        /// Without --host: the peer's address (ipBlocks; default 0.0.0.0).
        #[arg(long, conflicts_with = "host")]
        source_ip: Option<std::net::IpAddr>,
        /// An HTTP request's method (with --path): with --host, the route it takes; without,
        /// the authorization decision (else for a TCP connection).
        #[arg(long, requires = "path")]
        method: Option<String>,
        /// An HTTP request's path, with its query (without --host: normalized as
        /// --path-normalization BASE).
        #[arg(long)]
        path: Option<String>,
        /// With --host and --path: a request header, `name: value` (repeatable).
        #[arg(long, requires = "path")]
        header: Vec<String>,
        /// Trust domain of --from identities.
        #[arg(long, default_value = "cluster.local", conflicts_with = "host")]
        trust_domain: String,
        /// Subset, as a VirtualService route would name it.
        #[arg(long)]
        subset: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The mesh CA: `ca init --dir DIR` creates a root; `ca issue` signs a workload certificate.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Per-endpoint counters and health, from the pinned maps (kernel and daemon) named with the
    /// admin API; works from the maps alone when the admin API is unreachable.
    Status {
        #[arg(long, default_value = drover_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Admin API to name clusters with (`off`: maps only).
        #[arg(long, default_value = "127.0.0.1:15000", value_parser = parse_admin)]
        admin: Admin,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Install or remove the `drover-cni` chained plugin on this node.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
    /// Remove drover's pinned maps and links: capture stops, applications connect directly again.
    Uninstall {
        #[arg(long, default_value = drover_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Mount bpffs at PATH unless it is mounted already (the DaemonSet's privileged init
    /// container runs this, so that the agent needs no Bidirectional mount).
    MountBpffs {
        #[arg(default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
}

/// `/logging?level=` for the admin API: replaces the log filter through `handle`.
fn log_control<S: 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> drover::admin::LogControl {
    std::sync::Arc::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

#[derive(Subcommand)]
enum CniCommand {
    /// Copy `drover-cni` into the CNI bin directory and chain it to the primary network (the
    /// first configuration of the conf directory; a `.conf` becomes a `.conflist`).
    Install {
        #[command(flatten)]
        dirs: CniDirs,
        /// The plugin binary to install (default: `drover-cni` beside this executable).
        #[arg(long, value_name = "FILE")]
        binary: Option<PathBuf>,
        /// The daemon's socket, written into the plugin's entry.
        #[arg(long, value_name = "PATH", default_value = drover::cni::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Namespaces whose pods the plugin passes through (repeatable; default: kube-system
        /// and drover-system).
        #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
        exclude_namespaces: Vec<String>,
    },
    /// Remove the plugin's entry from every network configuration, and the binary.
    Uninstall {
        #[command(flatten)]
        dirs: CniDirs,
    },
}

/// Where the node's CNI files are.
#[derive(Args, Clone)]
struct CniDirs {
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
}

/// `drover cni install|uninstall`.
fn cni(command: CniCommand) -> ExitCode {
    use drover::cni::install;
    let result = match command {
        CniCommand::Install {
            dirs,
            binary,
            socket,
            exclude_namespaces,
        } => {
            let entry = install::Entry {
                socket,
                exclude_namespaces: (!exclude_namespaces.is_empty()).then_some(exclude_namespaces),
            };
            let binary = binary.unwrap_or_else(install::beside_this_executable);
            install::install(&binary, &dirs.cni_bin_dir, &dirs.cni_conf_dir, &entry).map(
                |o| match o {
                    install::Outcome::Written(p) => {
                        format!("chained drover-cni in {}", p.display())
                    }
                    install::Outcome::Unchanged(p) => {
                        format!("drover-cni already chained in {}", p.display())
                    }
                },
            )
        }
        CniCommand::Uninstall { dirs } => install::uninstall(&dirs.cni_bin_dir, &dirs.cni_conf_dir)
            .map(|changed| {
                format!(
                    "removed drover-cni from {changed:?} and {}",
                    dirs.cni_bin_dir.display()
                )
            }),
    };
    match result {
        Ok(line) => {
            eprintln!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a root CA (ECDSA P-256, ten years) in DIR; never overwrites one.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for a SPIFFE identity (for servers that are not drover).
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// `spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/ACCOUNT`.
        #[arg(long)]
        spiffe: String,
        /// Extra DNS names.
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long, default_value = "24")]
        hours: u64,
        /// Output certificate (PEM); the key goes to the same name with `-key` before `.pem`.
        #[arg(long)]
        out: PathBuf,
    },
}

fn ca(command: CaCommand) -> ExitCode {
    let result = match command {
        CaCommand::Init { dir } => {
            drover::mesh::init(&dir).map(|p| format!("created {}\n", p.display()))
        }
        CaCommand::Issue {
            dir,
            spiffe,
            dns,
            hours,
            out,
        } => drover::mesh::Ca::load(&dir)
            .and_then(|ca| ca.issue(&spiffe, &dns, Duration::from_secs(hours * 3600)))
            .and_then(|(cert, key)| {
                let key_path = out.with_file_name(format!(
                    "{}-key.pem",
                    out.file_stem().and_then(|s| s.to_str()).unwrap_or("cert")
                ));
                let write = |p: &std::path::Path, s: &str| {
                    std::fs::write(p, s).map_err(|e| drover::mesh::Error::File {
                        path: p.to_path_buf(),
                        reason: e.to_string(),
                    })
                };
                write(&out, &cert)?;
                write(&key_path, &key)?;
                Ok(format!(
                    "wrote {} and {}\n",
                    out.display(),
                    key_path.display()
                ))
            }),
    };
    match result {
        Ok(text) => report(&text),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--admin`: an address, or `off`.
#[derive(Clone, Copy)]
struct Admin(Option<std::net::SocketAddr>);

/// A percentage in 0..=100.
fn parse_percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage between 0 and 100")),
    }
}

fn parse_admin(s: &str) -> Result<Admin, String> {
    if s == "off" {
        return Ok(Admin(None));
    }
    s.parse()
        .map(|a| Admin(Some(a)))
        .map_err(|e| format!("{e} (expected ADDRESS:PORT or off)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let log_control: drover::admin::LogControl = match cli.log_format {
        LogFormat::Plain => {
            let fmt = fmt
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter_reloading();
            let control = log_control(fmt.reload_handle());
            fmt.init();
            control
        }
        LogFormat::Json => {
            let fmt = fmt.json().with_ansi(false).with_filter_reloading();
            let control = log_control(fmt.reload_handle());
            fmt.init();
            control
        }
    };
    let log_control = Some(log_control);

    match cli.command {
        Command::Validate { paths, client } => validate(&paths, &client.into()),
        Command::Explain {
            config,
            kubernetes,
            kubeconfig,
            cluster_domain,
            workload,
            host,
            port,
            from,
            source_ip,
            method,
            path,
            header,
            trust_domain,
            subset,
            client,
        } => {
            let api = kubernetes.then(|| drover::kubernetes::Settings {
                kubeconfig,
                node_name: String::new(),
                cluster_domain,
            });
            let what = match &host {
                Some(host) => Explained::Destination(
                    host,
                    port,
                    subset.as_deref(),
                    path.map(|p| (method.unwrap_or_else(|| "GET".into()), p, header)),
                ),
                None => Explained::Inbound(InboundProbe {
                    from: from.map(|f| match f.split_once('/') {
                        Some((ns, sa)) => format!("{trust_domain}/ns/{ns}/sa/{sa}"),
                        None => f,
                    }),
                    source: source_ip,
                    port,
                    request: method.zip(path),
                }),
            };
            explain_cmd(&config, api, workload.as_deref(), client.into(), what)
        }
        Command::Ca { command } => ca(command),
        Command::Cni { command } => cni(command),
        Command::Status {
            pin_dir,
            admin,
            json,
        } => status(&pin_dir, admin.0, json),
        Command::MountBpffs { path } => said(
            drover::redirect::loader::mount_bpffs(&path),
            format!("mounted bpffs at {}", path.display()),
            format!("bpffs already mounted at {}", path.display()),
        ),
        Command::Uninstall { pin_dir } => said(
            drover::redirect::loader::uninstall(&pin_dir),
            format!("removed {}", pin_dir.display()),
            format!("nothing pinned at {}", pin_dir.display()),
        ),
        Command::Run(args) => run(args, log_control),
    }
}

/// Who signs the workloads' certificates: the local CA (`--mesh-ca`), istiod's CA API
/// (`--ca-address` with `--ca-root`), or nobody.
fn mesh_authority(
    ca_dir: Option<PathBuf>,
    (address, root): (Option<String>, Option<PathBuf>),
    token: PathBuf,
) -> Option<drover::mesh::Authority> {
    use drover::mesh::{Authority, remote::RemoteCa};
    match (ca_dir, address, root) {
        (Some(dir), _, _) => Some(Authority::Local(dir)),
        (None, Some(address), Some(root)) => Some(Authority::Remote(RemoteCa {
            address,
            root,
            token,
        })),
        _ => None,
    }
}

/// `drover run`: the daemon until SIGTERM/SIGINT/SIGQUIT drains it. With one worker, everything
/// runs on one thread (tokio's current-thread scheduler: no work-stealing queues, no cross-thread
/// wake-ups); otherwise on a multi-threaded runtime with `--workers` threads (0: one per CPU).
fn run(a: RunArgs, log: Option<drover::admin::LogControl>) -> ExitCode {
    let workers = a.workers;
    let otlp = (a.otlp_endpoint.clone()).map(|e| (e, a.otlp_protocol));
    let cfg = match a.into_config(log) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if workers > 1 {
        builder.worker_threads(workers);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        if let Some((endpoint, protocol)) = otlp {
            drover::trace::export::start(&endpoint, protocol)?;
        }
        let bound = app::build(cfg).await?;
        bound.wait_termination().await
    });
    // Do not wait for connections left after the drain deadline.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(c) = e.downcast_ref::<app::ConfigRejected>() {
                eprintln!("{c}");
            } else {
                eprintln!("error: {}", chain(&e));
            }
            ExitCode::FAILURE
        }
    }
}

impl RunArgs {
    /// The daemon's settings from the flags.
    fn into_config(
        self,
        log: Option<drover::admin::LogControl>,
    ) -> Result<app::RunConfig, drover::kubernetes::Error> {
        let kubernetes = if self.kubernetes {
            Some(drover::kubernetes::Settings {
                kubeconfig: self.kubeconfig,
                node_name: self
                    .node_name
                    .filter(|n| !n.is_empty())
                    .ok_or(drover::kubernetes::Error::NoNodeName)?,
                cluster_domain: self.cluster_domain,
            })
        } else {
            None
        };
        let mut netns = Vec::new();
        let mut netns_workloads = std::collections::BTreeMap::new();
        for n in self.netns {
            match n.split_once('=') {
                Some((name, entry)) => {
                    netns_workloads.insert(name.to_string(), entry.to_string());
                    netns.push(name.to_string());
                }
                None => netns.push(n),
            }
        }
        let authority =
            mesh_authority(self.mesh_ca, (self.ca_address, self.ca_root), self.ca_token);
        drover::inbound::set_path_normalization(self.path_normalization);
        drover::trace::set_sampling(self.trace_sampling);
        drover::telemetry::metrics().set_max_series(self.metrics_max_series);
        drover::telemetry::set_enabled(!self.no_standard_metrics);
        drover::inbound::set_http_metrics(self.inbound_http_metrics);
        drover::access::set_format(self.access_log_format);
        drover::telemetry::set_trust_domain(&self.trust_domain);
        Ok(app::RunConfig {
            config_paths: self.config,
            cgroups: self.cgroup,
            netns,
            netns_workloads,
            fail_open: self.fail_open,
            fast_path: self.fast_path,
            capture: self.capture,
            pin_dir: self.pin_dir,
            drain_timeout: secs(self.drain_timeout),
            client: self.client.into(),
            watch: !self.no_watch,
            admin: self.admin.0,
            readiness: self.readiness,
            credentials: drover::tls::Credentials {
                dir: self.credentials,
                mesh: None,
            },
            inbound: self
                .inbound_netns
                .map(|n| (n, self.inbound_ports, self.peer_authentication)),
            inbound_pods: self.inbound_pods.then_some(self.peer_authentication),
            mesh: authority.map(|authority| app::MeshConfig {
                authority,
                trust_domain: self.trust_domain,
                service_account: self.service_account,
                identity_dir: self.identity_dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("drover-identity-{}", std::process::id()))
                }),
            }),
            log,
            downstream: drover::proxy::downstream::Timeouts {
                request_headers: secs(self.request_headers_timeout),
                idle: secs(self.downstream_idle_timeout),
            },
            max_downstream_connections: self.max_downstream_connections,
            max_memory_bytes: self.max_memory_mb.saturating_mul(1024 * 1024),
            allow_empty: self.allow_empty,
            dns_servers: self.dns_servers,
            kubernetes,
            cni_install: self.cni_conf_dir.map(|conf| (self.cni_bin_dir, conf)),
            proc_dir: self.proc_dir,
            cni_grace: std::time::Duration::from_secs(self.cni_grace),
            cni_socket: self.cni_socket,
        })
    }
}

/// An error and its causes on one line, each cause once: errors that already print their source
/// (`…: {source}`) are not followed by it again.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

/// `drover explain`: the effective policy of one destination, for the configured client or (in
/// Kubernetes mode) for a pod. TLS files are not read (they may live on another host).
/// What `drover explain` explains.
enum Explained<'a> {
    /// The client's policy for a destination `(host, port, subset)`, and the route of a
    /// request (method, path, headers) to it.
    Destination(
        &'a str,
        Option<u16>,
        Option<&'a str>,
        Option<(String, String, Vec<String>)>,
    ),
    /// The workload's inbound side: its AuthorizationPolicies, and a decision.
    Inbound(InboundProbe),
}

/// A connection or request to check against a workload's AuthorizationPolicies.
struct InboundProbe {
    /// The peer's principal (`<trust domain>/ns/<ns>/sa/<sa>`), `plaintext` or none.
    from: Option<String>,
    source: Option<std::net::IpAddr>,
    port: Option<u16>,
    /// (method, path).
    request: Option<(String, String)>,
}

impl InboundProbe {
    /// The decision this probe asks for (none without a peer or a port), on `registry`'s
    /// workload at `addresses`.
    fn explain(
        &self,
        registry: &drover::registry::Registry,
        addresses: &[std::net::IpAddr],
    ) -> String {
        let source = self.source.unwrap_or([0, 0, 0, 0].into());
        let destination = std::net::SocketAddr::new(
            addresses.first().copied().unwrap_or([0, 0, 0, 0].into()),
            self.port.unwrap_or_default(),
        );
        let headers = hyper::HeaderMap::new();
        let path = (self.request.as_ref()).map(|(_, p)| {
            drover::authz::PathNormalization::Base.apply(p.split('?').next().unwrap_or_default())
        });
        let probe = drover::authz::Attributes {
            principal: self.from.as_deref().filter(|f| *f != "plaintext"),
            source,
            remote: source,
            destination,
            sni: None,
            http: (self.request.as_ref())
                .zip(path.as_deref())
                .map(|((m, _), path)| drover::authz::Http {
                    host: "",
                    method: m,
                    path,
                    headers: &headers,
                }),
        };
        let asked = (self.from.is_some() || self.source.is_some()) && self.port.is_some();
        explain::authorization(registry, addresses, asked.then_some(&probe))
    }
}

fn explain_cmd(
    config: &[PathBuf],
    api: Option<drover::kubernetes::Settings>,
    workload: Option<&str>,
    mut client: Client,
    what: Explained<'_>,
) -> ExitCode {
    let feed = match api {
        None => None,
        Some(settings) => match sync_api(&settings) {
            Ok(feed) => Some(feed),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let mut heading = String::new();
    let mut addresses: Vec<std::net::IpAddr> = Vec::new();
    if let (Some(id), Some(feed)) = (workload, &feed) {
        let pod = id
            .split_once('/')
            .and_then(|(ns, name)| feed.pod(ns, name).map(|p| (ns, p)));
        let Some((ns, pod)) = pod else {
            eprintln!("error: no pod {id:?} in the API server (expected namespace/name)");
            return ExitCode::FAILURE;
        };
        let ns_labels: Vec<String> = (feed.namespace_labels(ns).unwrap_or_default().iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        heading = format!(
            "workload   pod {id} (service account {}, node {}, addresses {})\nnamespace  {ns} labels {{{}}}\n",
            pod.service_account,
            pod.node.as_deref().unwrap_or("-"),
            pod.ips.join(", "),
            ns_labels.join(",")
        );
        addresses = pod.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let (labels, locality) = feed.pod_placement(&pod);
        client = Client {
            namespace: ns.to_string(),
            labels,
            workload: None,
            locality,
        };
    }
    let registry = match drover::reload::snapshot(config, feed.as_ref(), &client) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (host, port, subset, request) = match what {
        Explained::Destination(host, port, subset, request) => (host, port, subset, request),
        Explained::Inbound(probe) => {
            return report(&(heading + &probe.explain(&registry, &addresses)));
        }
    };
    let text = explain::explain(&registry, host, port, subset).and_then(|text| {
        let Some((method, path, headers)) = &request else {
            return Ok(text);
        };
        let headers: hyper::HeaderMap = (headers.iter())
            .filter_map(|h| {
                let (k, v) = h.split_once(':')?;
                Some((
                    k.trim()
                        .to_ascii_lowercase()
                        .parse::<hyper::header::HeaderName>()
                        .ok()?,
                    v.trim().parse().ok()?,
                ))
            })
            .collect();
        let routed = explain::request(&registry, host, port, method, path, &headers)?;
        Ok(text + &routed)
    });
    match text {
        Ok(text) => report(&(heading + &text)),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Lists everything once from the API server (bounded by 30 s).
fn sync_api(settings: &drover::kubernetes::Settings) -> anyhow::Result<drover::kubernetes::Feed> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let feed = drover::kubernetes::Feed::new(&settings.cluster_domain);
        let stop = tokio_util::sync::CancellationToken::new();
        let source = drover::kubernetes::spawn(settings, feed.clone(), stop.clone()).await?;
        let synced = tokio::time::timeout(Duration::from_secs(30), feed.synced()).await;
        stop.cancel();
        synced.map_err(|_| {
            anyhow::anyhow!("the API server at {source} did not list everything within 30 s")
        })?;
        Ok(feed)
    })
}

/// `drover validate`: every error and warning, one per line; exit 1 on any error.
fn validate(paths: &[PathBuf], client: &Client) -> ExitCode {
    let (set, parse_errors) = match ConfigSet::load_all(paths) {
        Ok(s) => s,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("error: {line}");
            }
            return ExitCode::FAILURE;
        }
    };
    let (mut errors, warnings, summary) = match Registry::build(&set, client) {
        Ok(r) => (
            Vec::new(),
            r.warnings().to_vec(),
            format!(
                "ok: {} services, {} DestinationRules, {} VirtualServices",
                r.services().len(),
                set.destination_rules.len(),
                set.virtual_services.len()
            ),
        ),
        Err(r) => (r.errors, r.warnings, String::new()),
    };
    errors.splice(0..0, parse_errors);
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    if errors.is_empty() {
        eprintln!("{summary}, {} warnings", warnings.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("{} errors, {} warnings", errors.len(), warnings.len());
        ExitCode::FAILURE
    }
}

/// A duration from a `SECS` flag (negative: 0; not a number: the maximum).
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

impl From<ClientArgs> for Client {
    fn from(a: ClientArgs) -> Self {
        Client {
            namespace: a.client_namespace,
            labels: a.client_labels.into_iter().collect(),
            workload: a.client_workload,
            locality: a.client_locality,
        }
    }
}

#[expect(clippy::print_stdout, reason = "the report is explain's output")]
fn report(text: &str) -> ExitCode {
    print!("{text}");
    ExitCode::SUCCESS
}

/// The outcome of a one-shot command that either did something (`done`) or found nothing to do
/// (`nothing`), printed on stderr.
fn said<E: std::fmt::Display>(r: Result<bool, E>, done: String, nothing: String) -> ExitCode {
    match r {
        Ok(did) => {
            eprintln!("{}", if did { done } else { nothing });
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(pin_dir: &std::path::Path, admin: Option<std::net::SocketAddr>, json: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(drover::report::collect(pin_dir, admin)) {
        Ok(r) if json => match serde_json::to_string_pretty(&r) {
            Ok(s) => report(&(s + "\n")),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(r) => report(&drover::report::render(&r, drover::stats::monotonic_ns())),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
