//! The kubelet's own runtime as a stand-in for the kubelet: Debian's `containerd` (its CRI plugin,
//! `runc`), started by the test with a configuration of its own (root, state, socket and CNI
//! directories inside the test's directory) and driven over its CRI gRPC API as the kubelet drives
//! it. `RunPodSandbox` makes the CRI plugin set up the pod's network with the test's CNI network
//! (a bridge on `198.18.<n>.0/24`, no masquerading, no default route), to which
//! `drover cni install` chains `drover-cni`: the real plugin is called by the real runtime with
//! the kubelet's `K8S_POD_*` arguments. Images are built here (buildah) and imported; nothing is
//! pulled. The sandbox ("pause") image runs `drover-testsrv echo` on `127.0.0.1:7000`, so every
//! pod carries its own origin inside its network namespace.
//!
//! This machine's root lacks `CAP_SYS_RESOURCE` (it cannot lower an `oom_score_adj`, which runc
//! is asked to do for a sandbox), so the CRI plugin's `restrict_oom_score_adj` is set.
//!
//! Everything a bed creates is removed when it is dropped: sandboxes (through CRI), containerd
//! and its shims, the images, the bridge, the IPAM state and the directory.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint};

use crate::{bin, podman, sh, unique_id};

/// A containerd of the test's own with one CNI network, `drover-cni` chained to it.
pub struct Containerd {
    id: u32,
    pub dir: PathBuf,
    socket: PathBuf,
    /// Where the conflist tells `drover-cni` the daemon listens.
    pub cni_socket: PathBuf,
    network: String,
    bridge: String,
    /// The pods' image (`drover-probe`, `drover-testsrv` in `/bin`).
    pub image: String,
    pause: String,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    sandboxes: Mutex<Vec<String>>,
}

/// A sandbox the runtime made (its id) and the configuration it was made with.
pub struct Sandbox {
    pub id: String,
    config: PodSandboxConfig,
}

impl Containerd {
    /// Starts containerd with a network on `198.18.<n>.0/24`.
    pub fn start(n: u8) -> Self {
        let id = unique_id();
        let dir = std::env::temp_dir().join(format!("drover-cri-{id}"));
        for sub in ["net.d", "cni", "logs", "images"] {
            std::fs::create_dir_all(dir.join(sub)).expect("cri dir");
        }
        // The CRI plugin reads one plugin directory: the reference plugins it needs beside ours.
        for plugin in ["bridge", "host-local", "loopback"] {
            std::fs::copy(
                Path::new("/usr/lib/cni").join(plugin),
                dir.join("cni").join(plugin),
            )
            .expect("CNI plugins (containernetworking-plugins)");
        }
        let network = format!("drvcri{id}");
        let bridge = format!("drvcr{}", id % 100_000);
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": network,
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{
                    "subnet": format!("198.18.{n}.0/24"), "gateway": format!("198.18.{n}.1"),
                }]]},
            }],
        });
        std::fs::write(
            dir.join("net.d").join(format!("10-{network}.conflist")),
            conflist.to_string(),
        )
        .expect("conflist");
        let cni_socket = dir.join("cni.sock");
        let install = Command::new(bin("drover"))
            .args(["cni", "install", "--cni-bin-dir"])
            .arg(dir.join("cni"))
            .arg("--cni-conf-dir")
            .arg(dir.join("net.d"))
            .arg("--socket")
            .arg(&cni_socket)
            .output()
            .expect("drover cni install");
        assert!(
            install.status.success(),
            "{}",
            String::from_utf8_lossy(&install.stderr)
        );
        let image = format!("localhost/drover-test-pod:{id}");
        let pause = format!("localhost/drover-test-pause:{id}");
        podman::build_image(&dir.join("images"), &image);
        let ctr = sh(&["buildah", "from", &image]);
        let ctr = ctr.trim();
        sh(&[
            "buildah",
            "config",
            "--entrypoint",
            r#"["/bin/drover-testsrv","echo","--name","origin","--listen","127.0.0.1:7000"]"#,
            ctr,
        ]);
        sh(&["buildah", "commit", "-q", ctr, &pause]);
        sh(&["buildah", "rm", ctr]);
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 [grpc]\n  address = \"{socket}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{pause}\"\n  restrict_oom_score_adj = true\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{bin}\"\n  conf_dir = \"{conf}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = dir.join("containerd.sock").display(),
                bin = dir.join("cni").display(),
                conf = dir.join("net.d").display(),
            ),
        )
        .expect("containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd (apt-get install containerd)");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let bed = Self {
            id,
            socket: dir.join("containerd.sock"),
            dir,
            cni_socket,
            network,
            bridge,
            image: image.clone(),
            pause: pause.clone(),
            child: Some(child),
            rt,
            sandboxes: Mutex::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while bed.client().is_err() {
            assert!(Instant::now() < deadline, "containerd: {}", bed.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        for (i, img) in [&image, &pause].into_iter().enumerate() {
            let archive = bed.dir.join("images").join(format!("{i}.tar"));
            let archive = archive.display().to_string();
            sh(&[
                "podman",
                "save",
                "-q",
                "--format",
                "docker-archive",
                "-o",
                &archive,
                img,
            ]);
            bed.ctr(&["images", "import", &archive]);
        }
        bed
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr ARGS` against this containerd's `k8s.io` namespace (the CRI plugin's).
    fn ctr(&self, args: &[&str]) -> String {
        let socket = self.socket.display().to_string();
        let mut full = vec!["ctr", "--address", &socket, "--namespace", "k8s.io"];
        full.extend_from_slice(args);
        sh(&full)
    }

    fn client(&self) -> Result<RuntimeServiceClient<Channel>, tonic::transport::Error> {
        let socket = self.socket.clone();
        self.rt.block_on(async move {
            let channel = Endpoint::from_static("http://containerd.invalid")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let socket = socket.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await?;
            Ok(RuntimeServiceClient::new(channel))
        })
    }

    /// `RunPodSandbox` for pod `namespace/name`, as the kubelet asks: the sandbox, or the
    /// runtime's error (which carries the CNI plugin's message).
    pub fn run_sandbox(&self, namespace: &str, name: &str) -> Result<Sandbox, tonic::Status> {
        let logs = self.dir.join("logs").join(name);
        std::fs::create_dir_all(&logs).expect("log dir");
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid-{}", self.id),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..PodSandboxConfig::default()
        };
        let mut client = self.client().expect("CRI client");
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .rt
            .block_on(client.run_pod_sandbox(req))?
            .into_inner()
            .pod_sandbox_id;
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
        Ok(Sandbox { id, config })
    }

    /// Runs `command` (in the pods' image) in `sandbox` to completion, as a pod's container:
    /// what it wrote to stdout (from the CRI log file).
    pub fn run_container(&self, sandbox: &Sandbox, name: &str, command: &[&str]) -> String {
        let mut client = self.client().expect("CRI client");
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..ImageSpec::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..ContainerConfig::default()
        };
        let created = self
            .rt
            .block_on(client.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox.config.clone()),
            }));
        let id = created.expect("CreateContainer").into_inner().container_id;
        self.rt
            .block_on(client.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .expect("StartContainer");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self
                .rt
                .block_on(client.container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                }))
                .expect("ContainerStatus")
                .into_inner()
                .status
                .expect("status");
            if status.state == ContainerState::ContainerExited as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "container {name} still runs");
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = sandbox.config.log_directory.clone() + "/" + name + ".log";
        // CRI log lines: `<time> <stream> <tag> <text>`.
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(4, ' ');
                let (_, stream, _) = (parts.next()?, parts.next()?, parts.next()?);
                (stream == "stdout").then(|| parts.next().unwrap_or_default().to_string())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `StopPodSandbox` then `RemovePodSandbox`, as the kubelet does when a pod is deleted.
    pub fn remove_sandbox(&self, id: &str) -> Result<(), tonic::Status> {
        let mut client = self.client().expect("CRI client");
        self.rt
            .block_on(client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))?;
        self.rt
            .block_on(client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }))?;
        self.sandboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| s != id);
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let left = std::mem::take(&mut *self.sandboxes.lock().unwrap_or_else(|e| e.into_inner()));
        for id in left {
            let _ = self.remove_sandbox(&id);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd: end the ones of this bed's socket.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(format!("containerd-shim.*{}", self.socket.display()))
            .output();
        for img in [&self.image, &self.pause] {
            let _ = Command::new("podman").args(["rmi", "-f", img]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.network));
        // Mounts the runtime left (snapshots, shm) before the directory goes.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {0}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
