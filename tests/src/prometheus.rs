//! A real Prometheus (Debian's `prometheus`) scraping daemons' admin APIs every second, and its
//! HTTP query API, for the telemetry tests. It listens on a free loopback port and keeps its
//! data in a directory of its own, removed with it.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// A running Prometheus; killed and its data removed on drop.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// One series of a query's answer: its labels and value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

impl Prometheus {
    /// Prometheus scraping `/stats/prometheus` of each admin API in `targets` every second;
    /// returns once it is ready (panics after 30 s).
    pub fn scraping(targets: &[SocketAddr]) -> Self {
        let dir = std::env::temp_dir().join(format!("drover-prom-{}", crate::unique_id()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: drover
    metrics_path: /stats/prometheus
    static_configs: [{{targets: [{}]}}]
",
            list.join(", ")
        );
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).expect("write prometheus.yml");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free loopback port");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).expect("log file"))
            .spawn()
            .expect("start prometheus (installed by `cargo xtask setup`)");
        let p = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").is_none() {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn get(&self, path: &str) -> Option<String> {
        let out = Command::new("curl")
            .args([
                "-sSf",
                "--max-time",
                "5",
                &format!("http://{}{path}", self.addr),
            ])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Its log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The instant vector `promql` evaluates to now.
    pub fn query(&self, promql: &str) -> Vec<Sample> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-G"])
            .arg(format!("http://{}/api/v1/query", self.addr))
            .args(["--data-urlencode", &format!("query={promql}")])
            .output()
            .expect("run curl");
        let body: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{promql}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(body["status"], "success", "{promql}: {body}");
        let result = &body["data"]["result"];
        (result.as_array().into_iter().flatten())
            .map(|s| Sample {
                labels: s["metric"].as_object().cloned().unwrap_or_default(),
                value: (s["value"][1].as_str())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            })
            .collect()
    }

    /// [`Self::query`] until `done` holds for the answer (scrapes lag the traffic), at most
    /// `within`; the last answer.
    pub fn query_until(
        &self,
        promql: &str,
        within: Duration,
        done: impl Fn(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.query(promql);
            if done(&got) || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether every target was scraped successfully at least once.
    pub fn targets_up(&self) -> bool {
        let up = self.query("up");
        !up.is_empty() && up.iter().all(|s| s.value == 1.0)
    }

    /// Its targets and their last scrape errors (for failure messages).
    pub fn targets(&self) -> String {
        self.get("/api/v1/targets").unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
