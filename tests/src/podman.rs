//! The kubelet's stand-in: Debian's `podman` (CNI backend, `runc`) starts "pods" on a CNI network
//! of the test's own (a bridge on 198.19.0.0/16, no masquerading, no default route) to which
//! `drover cni install` chains `drover-cni` after `bridge`, so the real runtime calls the real
//! plugin with the real CNI environment. The pods run an image built here with `buildah` from the test
//! binaries (`drover-probe`, `drover-testsrv`) and their shared libraries: nothing is pulled.
//!
//! Everything a bed creates (containers, the network and its bridge, the image, the IPAM state,
//! its directory) is removed when it is dropped.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{bin, sh, unique_id};

/// One CNI network with `drover-cni` chained, and the image its pods run.
pub struct Bed {
    id: u32,
    pub dir: PathBuf,
    /// The network's name (also the conflist's).
    pub network: String,
    bridge: String,
    /// The /24 of the network, as `198.19.N.`; the bridge (gateway) is `.1`.
    pub prefix: String,
    /// Where the conflist tells `drover-cni` the daemon listens.
    pub socket: PathBuf,
    pub image: String,
    containers: std::sync::Mutex<Vec<String>>,
    /// Images built beside the pods' own.
    images: std::sync::Mutex<Vec<String>>,
}

impl Bed {
    /// A bed on `198.19.<n>.0/24`; `exclude` replaces the plugin's excluded namespaces.
    pub fn new(n: u8, exclude: Option<&[&str]>) -> Self {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("drover-bed-{id}"));
        std::fs::create_dir_all(dir.join("net.d")).expect("bed dir");
        std::fs::create_dir_all(dir.join("cni")).expect("bed dir");
        let network = format!("drvbed{id}");
        let bridge = format!("drvbr{}", id % 100_000);
        let prefix = format!("198.19.{n}.");
        let socket = dir.join("cni.sock");
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\nnetwork_config_dir = \"{}\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
                 [engine]\nruntime = \"runc\"\n[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n",
                dir.join("net.d").display(),
                dir.join("cni").display()
            ),
        )
        .expect("containers.conf");
        let image = format!("localhost/drover-test-pod:{id}");
        build_image(&dir, &image);
        let bed = Self {
            id,
            dir,
            network,
            bridge,
            prefix,
            socket,
            image,
            containers: std::sync::Mutex::default(),
            images: std::sync::Mutex::default(),
        };
        bed.write_network();
        // `drover cni install` chains the plugin, as the DaemonSet's daemon does.
        let mut install = vec![
            "cni".to_string(),
            "install".into(),
            "--cni-bin-dir".into(),
            bed.dir.join("cni").display().to_string(),
            "--cni-conf-dir".into(),
            bed.dir.join("net.d").display().to_string(),
            "--socket".into(),
            bed.socket.display().to_string(),
        ];
        for ns in exclude.unwrap_or_default() {
            install.extend(["--exclude-namespace".to_string(), ns.to_string()]);
        }
        let args: Vec<&str> = install.iter().map(String::as_str).collect();
        bed.drover(&args);
        bed
    }

    /// The network's conflist.
    pub fn conflist(&self) -> PathBuf {
        self.dir
            .join("net.d")
            .join(format!("{}.conflist", self.network))
    }

    /// (Re)writes the network's conflist with the bridge plugin alone, as a primary network's
    /// own installer would.
    pub fn write_network(&self) {
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": self.network,
            "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{
                    "subnet": format!("{}0/24", self.prefix), "gateway": format!("{}1", self.prefix),
                }]]},
            }],
        });
        std::fs::write(self.conflist(), conflist.to_string()).expect("conflist");
    }

    /// `drover ARGS` to completion (asserting success): its stderr.
    pub fn drover(&self, args: &[&str]) -> String {
        let out = Command::new(bin("drover"))
            .args(args)
            .output()
            .expect("drover");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "drover {args:?}: {err}");
        err
    }

    /// `podman ARGS` with this bed's configuration.
    pub fn podman(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .output()
            .expect("podman")
    }

    /// The container (and pod) name of this bed's pod `name`: container names are global to
    /// the runtime, so each bed's carry its id.
    pub fn pod(&self, name: &str) -> String {
        format!("{name}-{}", self.id)
    }

    /// Starts pod `name` at address `.host` running `cmd` in the background.
    pub fn start(&self, name: &str, host: u8, cmd: &[&str]) -> Output {
        self.launch("-d", name, host, cmd)
    }

    /// Runs pod `name` at `.host` to completion (`--rm`): what it printed, or the runtime's
    /// error.
    pub fn run(&self, name: &str, host: u8, cmd: &[&str]) -> Output {
        self.launch("--rm", name, host, cmd)
    }

    fn launch(&self, mode: &str, name: &str, host: u8, cmd: &[&str]) -> Output {
        let name = self.pod(name);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        let ip = format!("{}{host}", self.prefix);
        let mut args = vec![
            "run",
            mode,
            "--name",
            &name,
            "--network",
            &self.network,
            "--ip",
            &ip,
            &self.image,
        ];
        args.extend_from_slice(cmd);
        self.podman(&args)
    }

    /// `cmd` inside running pod `name`.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Output {
        let name = self.pod(name);
        let mut args = vec!["exec", name.as_str()];
        args.extend_from_slice(cmd);
        self.podman(&args)
    }

    /// Removes pod `name` at once.
    pub fn remove(&self, name: &str) {
        self.remove_container(&self.pod(name));
    }

    fn remove_container(&self, container: &str) {
        let _ = self.podman(&["rm", "-f", "-t", "0", container]);
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.containers.lock().unwrap_or_else(|e| e.into_inner()));
        for name in names {
            self.remove_container(&name);
        }
        let _ = self.podman(&["rmi", "-f", &self.image]);
        for image in std::mem::take(&mut *self.images.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = self.podman(&["rmi", "-f", &image]);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.network));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bed {
    /// `drover run ARGS` from an image of the daemon (as `cargo xtask image` lays it out) in a
    /// container set up as `deploy/kubernetes/daemonset.yaml` sets up the pod: host network,
    /// read-only root, every capability dropped but the DaemonSet's, bpffs (shared), cgroup2,
    /// the host's `/proc` at `/host/proc`, the network namespaces, and `shared` (paths mounted
    /// at the same place, so that the socket path the daemon writes into the conflist and the
    /// state file's paths mean the same inside and out).
    pub fn daemon_in_container(&self, args: &[String], shared: &[&Path]) -> Command {
        let image = format!("localhost/drover-test-daemon:{}", self.id);
        build_image_of(
            &self.dir.join("daemon-rootfs"),
            &image,
            &["drover", "drover-cni"],
            "/usr/local/bin",
        );
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("drover-{}", self.id));
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(image.clone());
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"));
        c.args(["run", "--rm", "--name", &format!("drover-{}", self.id)]);
        c.args(["--entrypoint", "/usr/local/bin/drover"]);
        c.args(["--network", "host", "--read-only", "--cap-drop", "ALL"]);
        for cap in [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE",
        ] {
            c.args(["--cap-add", cap]);
        }
        c.args(["-v", "/sys/fs/bpf:/sys/fs/bpf:rslave"]);
        c.args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup"]);
        c.args(["-v", "/proc:/host/proc:ro"]);
        c.args(["-v", "/run/netns:/run/netns:rslave"]);
        for p in shared {
            c.args(["-v", &format!("{0}:{0}", p.display())]);
        }
        c.args(["-e", &format!("RUST_LOG={}", crate::Daemon::log_filter())]);
        c.args([image.as_str(), "run", "--proc-dir", "/host/proc"]);
        c.args(args);
        c
    }
}

/// Builds `image` from scratch: the test binaries (stripped) and the libraries they load.
pub(crate) fn build_image(dir: &Path, image: &str) {
    build_image_of(
        &dir.join("rootfs"),
        image,
        &["drover-probe", "drover-testsrv"],
        "/bin",
    );
}

/// Builds `image` from scratch: `binaries` (stripped) in `bin`, and the libraries they load.
fn build_image_of(root: &Path, image: &str, binaries: &[&str], bin_dir: &str) {
    // The pods' image also carries the load generator (Debian's `hey`, as it is).
    let extra: &[&str] = if bin_dir == "/bin" {
        &["/usr/bin/hey"]
    } else {
        &[]
    };
    for sub in [
        bin_dir.trim_start_matches('/'),
        "lib/x86_64-linux-gnu",
        "lib64",
    ] {
        std::fs::create_dir_all(root.join(sub)).expect("rootfs");
    }
    for b in binaries.iter().chain(extra) {
        let name = Path::new(b).file_name().expect("binary name");
        let out = root.join(bin_dir.trim_start_matches('/')).join(name);
        if b.starts_with('/') {
            std::fs::copy(b, &out).expect("copy binary");
        } else {
            sh(&[
                "strip",
                "-o",
                &out.display().to_string(),
                &bin(b).display().to_string(),
            ]);
        }
        let libs = Command::new("ldd").arg(&out).output().expect("ldd");
        for lib in String::from_utf8_lossy(&libs.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let target = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().expect("lib dir")).expect("lib dir");
            std::fs::copy(lib, &target).expect("copy library");
        }
    }
    let ctr = sh(&["buildah", "from", "scratch"]);
    let ctr = ctr.trim();
    sh(&["buildah", "copy", ctr, &root.display().to_string(), "/"]);
    sh(&["buildah", "commit", "-q", ctr, image]);
    sh(&["buildah", "rm", ctr]);
}
