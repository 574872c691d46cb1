//! The `drover` command line: thin; the work is in the library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use drover::{app, redirect::CaptureMode};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture the enrolled workloads' connections and relay them to service endpoints.
    Run {
        /// YAML file or directory with ServiceEntry / WorkloadEntry (and other Istio) resources.
        #[arg(long = "config", required = true)]
        config: Vec<PathBuf>,
        /// cgroup v2 directory whose processes are captured (listener in drover's own netns).
        #[arg(long = "cgroup")]
        cgroup: Vec<PathBuf>,
        /// Network namespace (an `ip netns` name or a path) whose processes are captured.
        #[arg(long = "netns")]
        netns: Vec<String>,
        /// Leave captured connects alone while no drover listener exists (default: refuse them).
        #[arg(long)]
        fail_open: bool,
        /// How connections reach drover.
        #[arg(long, value_enum, default_value = "ebpf")]
        capture: CaptureMode,
        /// Where maps and links are pinned.
        #[arg(long, default_value = drover_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// How long SIGTERM waits for open connections before closing them.
        #[arg(long, default_value = "5", value_name = "SECS")]
        drain_timeout: f64,
    },
    /// Check configuration files; prints every problem as `file:line:col: field: message`.
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Remove drover's pinned maps and links: capture stops, applications connect directly again.
    Uninstall {
        #[arg(long, default_value = drover_common::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command {
        Command::Validate { paths } => match app::load_registry(&paths) {
            Ok(r) => {
                eprintln!("ok: {} services", r.services().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall { pin_dir } => match drover::redirect::loader::uninstall(&pin_dir) {
            Ok(true) => {
                eprintln!("removed {}", pin_dir.display());
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("nothing pinned at {}", pin_dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            cgroup,
            netns,
            fail_open,
            capture,
            pin_dir,
            drain_timeout,
        } => {
            let cfg = app::RunConfig {
                config_paths: config,
                cgroups: cgroup,
                netns,
                fail_open,
                capture,
                pin_dir,
                drain_timeout: Duration::from_secs_f64(drain_timeout.max(0.0)),
            };
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(async {
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
                        eprintln!("error: {e:#}");
                    }
                    ExitCode::FAILURE
                }
            }
        }
    }
}
