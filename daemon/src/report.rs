//! `drover status`: a per-endpoint report read from the pinned counter maps (`EP_DSTATS`, written
//! by the daemon; `EP_KSTATS` and, for the kernel fast path, `EP_FSTATS`, written by the kernel)
//! and named with the admin API's `/clusters`.
//! Without a reachable admin API it still prints what the maps hold, with cluster ids for names.
//! Also the kernel programs' failed map operations (`KERNEL_ERRORS`): connects failed closed.
//!
//! Invariants: read-only; never needs the daemon to be running (pinned maps outlive it).

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use drover_common::{EpDKey, EpDStats, EpKStats, EpKey, kernel_errors, maps};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::redirect::words_addr;

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "pinned map {path}: {reason} (is drover running with eBPF capture, and --pin-dir right?)"
    )]
    Map { path: String, reason: String },
}

/// One endpoint of one cluster, from the daemon's map plus the kernel's counters.
#[derive(Debug, Serialize)]
pub struct Row {
    pub cluster_id: u32,
    /// From the admin API; `None` when it was unreachable.
    pub cluster: Option<String>,
    pub endpoint: SocketAddr,
    pub daemon: EpDStats,
    /// Summed over CPUs; `None` when the kernel never saw a connection to the endpoint.
    pub kernel: Option<EpKStats>,
    /// The kernel fast path's connections to the endpoint (CPUs summed), if any.
    pub fastpath: Option<EpKStats>,
}

/// Everything `drover status` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Failed map operations in the kernel programs, by kind (CPUs summed; only non-zero
    /// kinds): each failed a connect, or with `--fail-open` left it uncaptured.
    pub kernel_errors: BTreeMap<&'static str, u64>,
    /// Why the admin API could not be used, if it could not.
    pub admin_error: Option<String>,
}

/// Reads the maps under `pin_dir` and (best effort) `/clusters` from `admin`.
pub async fn collect(pin_dir: &Path, admin: Option<SocketAddr>) -> Result<Report, Error> {
    let (names, admin_error) = match admin {
        Some(addr) => match cluster_names(addr).await {
            Ok(n) => (n, None),
            Err(e) => (BTreeMap::new(), Some(format!("admin API at {addr}: {e}"))),
        },
        None => (BTreeMap::new(), Some("admin API not asked".into())),
    };
    let dstats: HashMap<MapData, EpDKey, EpDStats> = open(pin_dir, maps::EP_DSTATS)?;
    let kstats: PerCpuHashMap<MapData, EpKey, EpKStats> = open(pin_dir, maps::EP_KSTATS)?;
    let fstats: Option<PerCpuHashMap<MapData, EpKey, EpKStats>> =
        open(pin_dir, maps::EP_FSTATS).ok();
    let mut rows = Vec::new();
    for entry in dstats.iter().filter_map(Result::ok) {
        let (k, v) = entry;
        let ek = EpKey {
            addr: k.addr,
            port_be: k.port_be,
            proto: k.proto,
            family: k.family,
        };
        let kernel = kstats.get(&ek, 0).ok().map(|per_cpu| sum(per_cpu.iter()));
        let fastpath = (fstats.as_ref())
            .and_then(|f| f.get(&ek, 0).ok())
            .map(|per_cpu| sum(per_cpu.iter()));
        rows.push(Row {
            cluster_id: k.cluster_id,
            cluster: names.get(&k.cluster_id).cloned(),
            endpoint: words_addr(k.addr, k.port_be),
            daemon: v,
            kernel,
            fastpath,
        });
    }
    rows.sort_by_key(|r| (r.cluster_id, r.endpoint));
    let mut errors = BTreeMap::new();
    // Absent in a pin directory a daemon without the map left: nothing counted.
    if let Ok(counts) = open::<PerCpuArray<MapData, u64>>(pin_dir, maps::KERNEL_ERRORS) {
        for (i, name) in kernel_errors::NAMES.iter().enumerate() {
            let n: u64 = counts.get(&(i as u32), 0).map_or(0, |v| v.iter().sum());
            if n > 0 {
                errors.insert(*name, n);
            }
        }
    }
    Ok(Report {
        rows,
        kernel_errors: errors,
        admin_error,
    })
}

/// The table, one line per endpoint of each cluster.
pub fn render(report: &Report, now_ns: u64) -> String {
    let mut out = String::new();
    if let Some(e) = &report.admin_error {
        out.push_str(&format!("note: {e}; cluster names unknown, showing ids\n"));
    }
    out.push_str(&format!(
        "{:<44} {:<22} {:<14} {:>7} {:>5} {:>5} {:>6} {:>5} {:>5} {:>4} {:>5} | {:>6} {:>6} {:>5} {:>5} {:>10} {:>10} {:>7} | {:>6} {:>6} {:>6}\n",
        "CLUSTER", "ENDPOINT", "HEALTH", "RQ", "ACT", "PEND", "5XX", "GW", "LOCAL", "EJ#", "CX",
        "K_ATT", "K_EST", "K_FAIL", "K_OPEN", "K_TX_B", "K_RX_B", "SRTT_US", "F_EST", "F_FAIL",
        "F_OPEN",
    ));
    for r in &report.rows {
        let d = &r.daemon;
        let health = if d.ejected != 0 {
            let left = d.ejection_deadline_ns.saturating_sub(now_ns) as f64 / 1e9;
            format!("ejected {left:.1}s")
        } else {
            "healthy".into()
        };
        let cluster = r
            .cluster
            .clone()
            .unwrap_or_else(|| format!("#{}", r.cluster_id));
        let k = r.kernel.unwrap_or_default();
        let srtt = k.srtt_us_sum.checked_div(k.srtt_samples).unwrap_or(0);
        let f = r.fastpath.unwrap_or_default();
        out.push_str(&format!(
            "{:<44} {:<22} {:<14} {:>7} {:>5} {:>5} {:>6} {:>5} {:>5} {:>4} {:>5} | {:>6} {:>6} {:>5} {:>5} {:>10} {:>10} {:>7} | {:>6} {:>6} {:>6}\n",
            cluster, r.endpoint.to_string(), health, d.rq_total, d.rq_active, d.rq_pending, d.rq_5xx,
            d.gateway_errors, d.local_origin_failures, d.times_ejected, d.cx_active,
            k.attempts, k.established, k.connect_failures,
            k.established.saturating_sub(k.closed), k.bytes_acked, k.bytes_received, srtt,
            f.established, f.connect_failures, f.established.saturating_sub(f.closed),
        ));
    }
    if report.rows.is_empty() {
        out.push_str("(no endpoints published yet)\n");
    }
    if !report.kernel_errors.is_empty() {
        let kinds: Vec<String> = (report.kernel_errors.iter())
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        out.push_str(&format!(
            "kernel errors (connects failed closed, or left alone with --fail-open): {}\n",
            kinds.join(" ")
        ));
    }
    out
}

pub fn sum<'a>(values: impl Iterator<Item = &'a EpKStats>) -> EpKStats {
    values.fold(EpKStats::default(), |a, v| EpKStats {
        attempts: a.attempts + v.attempts,
        established: a.established + v.established,
        connect_failures: a.connect_failures + v.connect_failures,
        closed: a.closed + v.closed,
        bytes_acked: a.bytes_acked + v.bytes_acked,
        bytes_received: a.bytes_received + v.bytes_received,
        srtt_us_sum: a.srtt_us_sum + v.srtt_us_sum,
        srtt_samples: a.srtt_samples + v.srtt_samples,
        retrans: a.retrans + v.retrans,
    })
}

fn open<M: TryFrom<Map, Error = aya::maps::MapError>>(
    pin_dir: &Path,
    name: &str,
) -> Result<M, Error> {
    let path = pin_dir.join(name);
    let err = |reason: String| Error::Map {
        path: path.display().to_string(),
        reason,
    };
    let data = MapData::from_pin(&path).map_err(|e| err(e.to_string()))?;
    let map = Map::from_map_data(data).map_err(|e| err(e.to_string()))?;
    M::try_from(map).map_err(|e| err(e.to_string()))
}

/// `cluster id → name` from the admin API's `/clusters` (2 s budget).
async fn cluster_names(addr: SocketAddr) -> Result<BTreeMap<u32, String>, String> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/clusters")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(v["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["id"].as_u64()? as u32, c["name"].as_str()?.to_string())))
            .collect())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_clusters_and_shows_ejection_time_left() {
        let report = Report {
            rows: vec![Row {
                cluster_id: 3,
                cluster: None,
                endpoint: "127.0.0.1:8080".parse().unwrap(),
                daemon: EpDStats {
                    rq_total: 17,
                    rq_5xx: 3,
                    ejected: 1,
                    times_ejected: 2,
                    ejection_deadline_ns: 5_500_000_000,
                    ..EpDStats::default()
                },
                kernel: Some(EpKStats {
                    attempts: 4,
                    established: 4,
                    closed: 1,
                    srtt_us_sum: 300,
                    srtt_samples: 3,
                    ..EpKStats::default()
                }),
                fastpath: Some(EpKStats {
                    established: 9,
                    connect_failures: 2,
                    closed: 4,
                    ..EpKStats::default()
                }),
            }],
            kernel_errors: BTreeMap::from([("fast_cluster", 2)]),
            admin_error: Some("admin API at 127.0.0.1:1: refused".into()),
        };
        let text = render(&report, 1_000_000_000);
        assert!(text.contains("showing ids"), "{text}");
        assert!(
            text.contains("failed closed") && text.contains("fast_cluster=2"),
            "{text}"
        );
        let line = text.lines().find(|l| l.starts_with("#3")).expect(&text);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "127.0.0.1:8080");
        assert_eq!(&cols[2..4], ["ejected", "4.5s"]);
        assert_eq!(cols[4], "17");
        // K_OPEN = established - closed; SRTT average; then the fast path's columns.
        assert_eq!(cols[cols.len() - 8], "3");
        assert_eq!(cols[cols.len() - 5], "100");
        assert_eq!(&cols[cols.len() - 3..], ["9", "2", "5"]);
    }
}
