//! A client for tests, the demo and benchmarks; run it inside a namespace or cgroup. Prints one
//! JSON object. `connect`: one connection (greeting, peer name, local address, or the error).
//! `rr`/`crr`/`bulk`: request-response latency on one connection, connect+request+close latency,
//! and bulk throughput, each bounded by a count and a deadline.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use drover_tests::dial;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Connect {
        addr: SocketAddr,
        /// SO_MARK to set before connecting.
        #[arg(long)]
        mark: Option<u32>,
        #[arg(long, default_value = "ping")]
        send: String,
    },
    Rr {
        addr: SocketAddr,
        #[arg(long, default_value = "10000")]
        count: u32,
        #[arg(long, default_value = "64")]
        size: usize,
        #[arg(long, default_value = "20")]
        max_secs: u64,
    },
    Crr {
        addr: SocketAddr,
        #[arg(long, default_value = "2000")]
        count: u32,
        #[arg(long, default_value = "20")]
        max_secs: u64,
    },
    Bulk {
        addr: SocketAddr,
        #[arg(long, default_value = "1073741824")]
        bytes: u64,
        #[arg(long, default_value = "20")]
        max_secs: u64,
    },
}

fn main() {
    let out = match Args::parse().cmd {
        Cmd::Connect { addr, mark, send } => connect(addr, mark, &send),
        Cmd::Rr {
            addr,
            count,
            size,
            max_secs,
        } => rr(addr, count, size, max_secs),
        Cmd::Crr {
            addr,
            count,
            max_secs,
        } => crr(addr, count, max_secs),
        Cmd::Bulk {
            addr,
            bytes,
            max_secs,
        } => bulk(addr, bytes, max_secs),
    };
    let out = out
        .unwrap_or_else(|e| json!({ "error": e.to_string(), "kind": format!("{:?}", e.kind()) }));
    #[expect(
        clippy::print_stdout,
        reason = "the JSON result is this program's output"
    )]
    {
        println!("{out}");
    }
}

fn greeting(s: &TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

fn connect(addr: SocketAddr, mark: Option<u32>, send: &str) -> std::io::Result<serde_json::Value> {
    let mut s = dial(addr, mark)?;
    let peer = s.peer_addr()?;
    let local = s.local_addr()?;
    let hello = greeting(&s)?;
    s.write_all(send.as_bytes())?;
    let mut echo = vec![0u8; send.len()];
    s.read_exact(&mut echo)?;
    Ok(
        json!({ "peer": peer.to_string(), "local": local.to_string(), "greeting": hello, "echo": String::from_utf8_lossy(&echo) }),
    )
}

fn percentiles(mut v: Vec<Duration>) -> serde_json::Value {
    v.sort();
    let at = |q: f64| {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    json!({ "n": v.len(), "p50_us": at(0.50), "p99_us": at(0.99) })
}

fn rr(
    addr: SocketAddr,
    count: u32,
    size: usize,
    max_secs: u64,
) -> std::io::Result<serde_json::Value> {
    let mut s = dial(addr, None)?;
    greeting(&s)?;
    let msg = vec![b'x'; size];
    let mut buf = vec![0u8; size];
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut lat = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        lat.push(t.elapsed());
    }
    Ok(percentiles(lat))
}

fn crr(addr: SocketAddr, count: u32, max_secs: u64) -> std::io::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let mut lat = Vec::with_capacity(count as usize);
    let mut buf = [0u8; 4];
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let t = Instant::now();
        let mut s = dial(addr, None)?;
        greeting(&s)?;
        s.write_all(b"ping")?;
        s.read_exact(&mut buf)?;
        drop(s);
        lat.push(t.elapsed());
    }
    Ok(percentiles(lat))
}

fn bulk(addr: SocketAddr, bytes: u64, max_secs: u64) -> std::io::Result<serde_json::Value> {
    let mut s = dial(addr, None)?;
    s.set_read_timeout(Some(Duration::from_secs(max_secs + 5)))?;
    let chunk = vec![0u8; 256 * 1024];
    let deadline = Instant::now() + Duration::from_secs(max_secs);
    let t = Instant::now();
    let mut sent: u64 = 0;
    while sent < bytes && Instant::now() < deadline {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let secs = t.elapsed().as_secs_f64();
    let received: u64 = reply.trim().parse().unwrap_or(0);
    Ok(
        json!({ "sent": sent, "received_by_server": received, "secs": secs, "gbit_per_s": received as f64 * 8.0 / secs / 1e9 }),
    )
}
