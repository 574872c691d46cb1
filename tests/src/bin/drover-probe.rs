//! A client for tests, the demo and benchmarks; run it inside a namespace or cgroup. Prints one
//! JSON object. `connect`: one connection (greeting, peer name, local address, or the error).
//! `rr`/`crr`/`bulk`: request-response latency on one connection, connect+request+close latency,
//! and bulk throughput, each bounded by a count and a deadline. `http`: `count` HTTP requests
//! over keep-alive (or one h2c connection with `--h2`), `concurrency` at a time, counting which
//! server (`podname`) answered and the statuses; `--cookie-jar` replays the first `Set-Cookie`.

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
    /// A TLS connection with this server name, verified against `ca`: the server's greeting.
    Tls {
        addr: SocketAddr,
        #[arg(long)]
        sni: String,
        #[arg(long)]
        ca: std::path::PathBuf,
    },
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
    /// `count` connections opened at once (one thread each, released together), each held
    /// until every thread has tried: how many got a greeting, how many were refused
    /// (`EPERM`/`ECONNREFUSED`) and which endpoints greeted.
    Hold {
        addr: SocketAddr,
        #[arg(long, default_value = "64")]
        count: usize,
        #[arg(long, default_value = "500")]
        hold_ms: u64,
    },
    /// `count` sequential connects (one greeting each): which endpoint greeted each, in order,
    /// or the error.
    Seq {
        addr: SocketAddr,
        #[arg(long, default_value = "10")]
        count: u32,
        #[arg(long, default_value = "0")]
        gap_ms: u64,
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
    Http {
        url: String,
        #[arg(long, default_value = "1")]
        count: u32,
        #[arg(long, default_value = "1")]
        concurrency: u32,
        /// `name: value` (repeatable).
        #[arg(long)]
        header: Vec<String>,
        /// The request method (an empty body is sent).
        #[arg(long, default_value = "GET")]
        method: String,
        /// HTTP/2 with prior knowledge, all requests multiplexed on one connection.
        #[arg(long)]
        h2: bool,
        /// Send back the first `Set-Cookie` received on every later request.
        #[arg(long)]
        cookie_jar: bool,
        /// Requests per second in total (paced; 0 = as fast as possible).
        #[arg(long, default_value = "0")]
        rate: u32,
        #[arg(long, default_value = "30")]
        max_secs: u64,
    },
    /// gRPC calls to `drover.test.Echo` over one HTTP/2 channel.
    Grpc {
        url: String,
        #[arg(long, value_enum, default_value = "unary")]
        call: grpc::Call,
        /// Calls (unary), or messages per call (streams).
        #[arg(long, default_value = "1")]
        count: u32,
        /// `name: value` request metadata on every unary call (repeatable).
        #[arg(long)]
        header: Vec<String>,
        /// `load` only: unary calls in flight on the channel.
        #[arg(long, default_value = "16")]
        concurrency: u32,
        /// `load` only: seconds of load.
        #[arg(long, default_value = "5")]
        secs: u64,
    },
}

fn main() {
    let out = match Args::parse().cmd {
        Cmd::Connect { addr, mark, send } => connect(addr, mark, &send),
        Cmd::Tls { addr, sni, ca } => tls(addr, &sni, &ca),
        Cmd::Hold {
            addr,
            count,
            hold_ms,
        } => hold(addr, count, hold_ms),
        Cmd::Seq {
            addr,
            count,
            gap_ms,
        } => Ok(seq(addr, count, gap_ms)),
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
        Cmd::Http {
            url,
            count,
            concurrency,
            header,
            method,
            h2,
            cookie_jar,
            rate,
            max_secs,
        } => http::run(
            &url,
            http::Load {
                count,
                concurrency,
                rate,
                max_secs,
                method,
            },
            &header,
            h2,
            cookie_jar,
        ),
        Cmd::Grpc {
            url,
            call,
            count,
            header,
            concurrency,
            secs,
        } => match call {
            grpc::Call::Load => grpc::load(url, concurrency, secs),
            _ => grpc::run(url, call, count, &header),
        },
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

fn hold(addr: SocketAddr, count: usize, hold_ms: u64) -> std::io::Result<serde_json::Value> {
    let start = std::sync::Arc::new(std::sync::Barrier::new(count));
    let tried = std::sync::Arc::new(std::sync::Barrier::new(count));
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let (start, tried) = (start.clone(), tried.clone());
            std::thread::spawn(move || {
                start.wait();
                let r = dial(addr, None).and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    Ok((greeting(&s)?, s))
                });
                tried.wait();
                std::thread::sleep(Duration::from_millis(hold_ms));
                r.map(|(g, _s)| g)
            })
        })
        .collect();
    let (mut greeted, mut refused, mut errors) = (Vec::new(), 0, Vec::new());
    for t in threads {
        match t.join().expect("hold thread") {
            Ok(g) => greeted.push(g),
            Err(e) if matches!(e.raw_os_error(), Some(1 | 111)) => refused += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    Ok(
        json!({ "connected": greeted.len(), "refused": refused, "errors": errors, "greetings": greeted }),
    )
}

fn seq(addr: SocketAddr, count: u32, gap_ms: u64) -> serde_json::Value {
    let served: Vec<String> = (0..count)
        .map(|_| {
            let r = dial(addr, None).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                greeting(&s)
            });
            std::thread::sleep(Duration::from_millis(gap_ms));
            match r {
                Ok(g) => g
                    .trim_start_matches("hello from ")
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string(),
                Err(e) => format!("error: {e}"),
            }
        })
        .collect();
    json!({ "served": served })
}

fn tls(addr: SocketAddr, sni: &str, ca: &std::path::Path) -> std::io::Result<serde_json::Value> {
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject};
    let invalid = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).map_err(|e| invalid(&e))? {
        roots
            .add(cert.map_err(|e| invalid(&e))?)
            .map_err(|e| invalid(&e))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| invalid(&e))?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(|e| invalid(&e))?;
    let tcp = dial(addr, None)?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte)? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    Ok(json!({ "greeting": String::from_utf8_lossy(&line) }))
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
    let start = Instant::now();
    let deadline = start + Duration::from_secs(max_secs);
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
    let per_s = lat.len() as f64 / start.elapsed().as_secs_f64();
    let mut v = percentiles(lat);
    v["per_s"] = json!(per_s);
    Ok(v)
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

mod http {
    //! The `http` subcommand: a hyper client with a bounded request count and deadline.

    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };

    use http_body_util::{BodyExt, Empty};
    use hyper::{Request, body::Bytes};
    use hyper_util::{
        client::legacy::{Client, connect::HttpConnector},
        rt::TokioExecutor,
    };
    use serde_json::{Value, json};

    /// How much load, how fast.
    pub struct Load {
        pub count: u32,
        pub concurrency: u32,
        /// Total requests per second (0: unpaced).
        pub rate: u32,
        pub max_secs: u64,
        pub method: String,
    }

    #[derive(Default)]
    struct Tally {
        latencies_us: Vec<f64>,
        served: BTreeMap<String, u64>,
        status: BTreeMap<u16, u64>,
        peers: BTreeMap<String, u64>,
        errors: u64,
        set_cookie: Option<String>,
        first: Option<Value>,
        /// The first response's headers.
        first_headers: Option<Value>,
        /// The first failure, in words (with its source chain).
        first_error: Option<String>,
    }

    pub fn run(
        url: &str,
        load: Load,
        headers: &[String],
        h2: bool,
        cookie_jar: bool,
    ) -> std::io::Result<Value> {
        let Load {
            count,
            concurrency,
            rate,
            max_secs,
            method,
        } = load;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut builder = Client::builder(TokioExecutor::new());
            builder.http2_only(h2);
            let client: Client<HttpConnector, Empty<Bytes>> = builder.build_http();
            let tally = Arc::new(Mutex::new(Tally::default()));
            let deadline = Instant::now() + Duration::from_secs(max_secs);
            let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..concurrency.max(1) {
                let (client, tally, next) = (client.clone(), tally.clone(), next.clone());
                let (url, method) = (url.to_string(), method.clone());
                let headers = headers.to_vec();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= count || Instant::now() >= deadline {
                            break;
                        }
                        if rate > 0 {
                            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(rate));
                            tokio::time::sleep_until(due.into()).await;
                        }
                        let sent = Instant::now();
                        let mut req = Request::builder().method(method.as_str()).uri(&url);
                        for h in &headers {
                            if let Some((k, v)) = h.split_once(':') {
                                req = req.header(k.trim(), v.trim());
                            }
                        }
                        let jar = tally.lock().expect("tally").set_cookie.clone();
                        if cookie_jar && let Some(c) = jar {
                            let pair = c.split(';').next().unwrap_or("").to_string();
                            req = req.header("cookie", pair);
                        }
                        let Ok(req) = req.body(Empty::new()) else {
                            tally.lock().expect("tally").errors += 1;
                            continue;
                        };
                        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                            let resp = client.request(req).await?;
                            let status = resp.status().as_u16();
                            let cookie = resp
                                .headers()
                                .get("set-cookie")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let mut heads = serde_json::Map::new();
                            for (k, v) in resp.headers() {
                                heads.insert(k.to_string(), v.to_str().unwrap_or("?").into());
                            }
                            let body = resp.into_body().collect().await?.to_bytes();
                            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((
                                status,
                                cookie,
                                body,
                                Value::Object(heads),
                            ))
                        })
                        .await;
                        let mut t = tally.lock().expect("tally");
                        match outcome {
                            Ok(Ok((status, cookie, body, heads))) => {
                                t.latencies_us.push(sent.elapsed().as_secs_f64() * 1e6);
                                t.first_headers.get_or_insert(heads);
                                *t.status.entry(status).or_default() += 1;
                                if t.set_cookie.is_none() {
                                    t.set_cookie = cookie;
                                }
                                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                                    if let Some(p) = v["podname"].as_str() {
                                        *t.served.entry(p.to_string()).or_default() += 1;
                                    }
                                    if let Some(p) = v["peer"].as_str() {
                                        *t.peers.entry(p.to_string()).or_default() += 1;
                                    }
                                    if t.first.is_none() {
                                        t.first = Some(v);
                                    }
                                } else if t.first.is_none() {
                                    t.first = Some(json!(String::from_utf8_lossy(&body)));
                                }
                            }
                            Ok(Err(e)) => {
                                t.errors += 1;
                                if t.first_error.is_none() {
                                    let mut msg = e.to_string();
                                    let mut src = e.source();
                                    while let Some(s) = src {
                                        msg.push_str(&format!(": {s}"));
                                        src = s.source();
                                    }
                                    t.first_error = Some(msg);
                                }
                            }
                            Err(_) => {
                                t.errors += 1;
                                t.first_error.get_or_insert_with(|| "timed out after 10 s".into());
                            }
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let mut t = tally.lock().expect("tally");
            let elapsed = start.elapsed().as_secs_f64();
            t.latencies_us.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                let l = &t.latencies_us;
                if l.is_empty() {
                    f64::NAN
                } else {
                    l[((l.len() - 1) as f64 * p).round() as usize]
                }
            };
            let (p50, p99) = (pct(0.5), pct(0.99));
            Ok(json!({
                "rps": t.latencies_us.len() as f64 / elapsed,
                "p50_us": p50,
                "p99_us": p99,
                "served": t.served,
                "status": t.status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
                "peers": t.peers.len(),
                "errors": t.errors,
                "first_error": t.first_error,
                "set_cookie": t.set_cookie,
                "first": t.first,
                "first_headers": t.first_headers,
                "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
            }))
        })
    }
}

mod grpc {
    //! The `grpc` subcommand: unary, server-streaming and bidirectional calls with tonic.

    use std::{collections::BTreeMap, time::Duration};

    use drover_tests::pb::{Msg, echo_client::EchoClient};
    use serde_json::{Value, json};

    #[derive(Clone, Copy, clap::ValueEnum)]
    pub enum Call {
        Unary,
        Stream,
        Chat,
        /// A unary call the server answers with UNAVAILABLE.
        Fail,
        /// One unary call whose reply carries the request metadata the server saw
        /// (`headers`).
        Headers,
        /// Unary calls for `--secs`, `--concurrency` in flight on one channel: calls/s and
        /// latency percentiles.
        Load,
    }

    /// `--call load`: closed-loop unary calls; every call must succeed.
    pub fn load(url: String, concurrency: u32, secs: u64) -> std::io::Result<Value> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let client = match EchoClient::connect(url).await {
                Ok(c) => c,
                Err(e) => return Ok(json!({ "error": e.to_string() })),
            };
            let start = std::time::Instant::now();
            let deadline = start + Duration::from_secs(secs);
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let mut client = client.clone();
                tasks.spawn(async move {
                    let mut lat = Vec::new();
                    let mut failed = 0u64;
                    while std::time::Instant::now() < deadline {
                        let t = std::time::Instant::now();
                        let m = Msg {
                            text: "hi".into(),
                            server: String::new(),
                            seq: 0,
                        };
                        match client.unary(m).await {
                            Ok(_) => lat.push(t.elapsed()),
                            Err(_) => failed += 1,
                        }
                    }
                    (lat, failed)
                });
            }
            let mut lat = Vec::new();
            let mut failed = 0;
            for (l, f) in tasks.join_all().await {
                lat.extend(l);
                failed += f;
            }
            let calls = lat.len() as f64;
            let mut v = super::percentiles(lat);
            v["per_s"] = json!(calls / start.elapsed().as_secs_f64());
            v["failed"] = json!(failed);
            Ok(v)
        })
    }

    pub fn run(url: String, call: Call, count: u32, headers: &[String]) -> std::io::Result<Value> {
        let headers = headers.to_vec();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let outcome =
                tokio::time::timeout(Duration::from_secs(20), calls(url, call, count, headers))
                    .await;
            Ok(match outcome {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => json!({ "error": e.to_string() }),
                Err(_) => json!({ "error": "timed out" }),
            })
        })
    }

    async fn calls(
        url: String,
        call: Call,
        count: u32,
        headers: Vec<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        // A unary request with the `--header` metadata.
        let request = |m: Msg| {
            let mut r = tonic::Request::new(m);
            for h in &headers {
                if let Some((k, v)) = h.split_once(':')
                    && let (Ok(k), Ok(v)) = (
                        k.trim()
                            .to_ascii_lowercase()
                            .parse::<tonic::metadata::MetadataKey<_>>(),
                        v.trim().parse(),
                    )
                {
                    r.metadata_mut().append(k, v);
                }
            }
            r
        };
        let mut client = EchoClient::connect(url).await?;
        let mut servers: BTreeMap<String, u32> = BTreeMap::new();
        let mut messages = 0u32;
        let msg = |seq| Msg {
            text: "hi".into(),
            server: String::new(),
            seq,
        };
        match call {
            // `load` is served by [`load`]; counted calls here.
            Call::Unary | Call::Load => {
                for i in 0..count {
                    let r = client.unary(request(msg(i))).await?.into_inner();
                    *servers.entry(r.server).or_default() += 1;
                    messages += 1;
                }
            }
            Call::Stream => {
                let mut s = client.server_stream(msg(count)).await?.into_inner();
                while let Some(m) = s.message().await? {
                    assert_eq!(m.seq, messages, "messages arrive in order");
                    *servers.entry(m.server).or_default() += 1;
                    messages += 1;
                }
            }
            Call::Chat => {
                let out = tokio_stream::iter((0..count).map(msg));
                let mut s = client.chat(out).await?.into_inner();
                while let Some(m) = s.message().await? {
                    *servers.entry(m.server).or_default() += 1;
                    messages += 1;
                }
            }
            Call::Headers => {
                let mut m = msg(0);
                m.text = "headers".into();
                let r = client.unary(request(m)).await?.into_inner();
                let seen: Value = serde_json::from_str(&r.text).unwrap_or(Value::Null);
                return Ok(json!({ "server": r.server, "headers": seen }));
            }
            Call::Fail => {
                let mut m = msg(0);
                m.text = "fail".into();
                let status = client
                    .unary(m)
                    .await
                    .expect_err("the server fails this call");
                return Ok(json!({
                    "code": format!("{:?}", status.code()),
                    "message": status.message(),
                }));
            }
        }
        Ok(json!({ "servers": servers, "messages": messages }))
    }
}
