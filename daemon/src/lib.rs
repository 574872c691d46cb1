//! Drover: an eBPF-accelerated transparent proxy that applies Istio's `DestinationRule` semantics.
//!
//! # Module map
//!
//! - **Composition and control:** [`app`] (composition root: start order, rollback, signals;
//!   [`app::DataPath`] serves any listeners with any [`redirect::OriginalDst`], which is how the
//!   in-process tests run the whole data path without privileges),
//!   [`reload`] (file watch and SIGHUP → new snapshot), [`admin`] (localhost API), [`report`]
//!   (`drover status`).
//! - **Data path:** [`proxy`] (capture listeners and the L4 path, with [`proxy::relay`]);
//!   [`proxy::http`] (the L7 path, one request read top to bottom: route → admit → tries →
//!   respond; retries with body replay, the HTTP/2 stream pool); [`proxy::upstream`] (the one
//!   upstream transport: marked socket in the workload's namespace, connect timeout, keepalive,
//!   TLS); [`proxy::downstream`] (client-side timeouts and overload); [`inbound`] (mTLS
//!   termination on 15006). Inside `proxy/` dependencies point one way: `http` → `streams` →
//!   `upstream`, `replay`; each try goes through one attempt guard.
//! - **Model:** [`registry`] (services, clusters with their [`registry::Member`]s, routing and
//!   `explain`, as immutable snapshots built from the configuration), [`config`] (YAML → CRD
//!   mirror → validated policy per resource kind, with locations).
//! - **Policy in force, per cluster** (held by the registry's clusters): [`balance`] (endpoint
//!   selection), [`breakers`] (circuit breakers), [`outlier`] (ejection), [`tls`] (origination) with
//!   [`mesh`] (the mesh CA and workload identities), and [`stats`] (counters that outlive
//!   snapshots).
//! - **Shared below everything:** [`access`] (Envoy's response flags).
//! - **Process and kernel:** [`redirect`] (the aya loader, pinned maps and links, the pin-dir
//!   lock, network namespaces), [`memory`] (heap trimming after load).
//!
//! # One connection, through the modules
//!
//! 1. An application in an enrolled network namespace calls `connect(VIP:80)`. The
//!    `cgroup/connect4` program (in `ebpf/`) finds the VIP in `SVC_VIPS` (written by
//!    [`redirect::Kernel::set_vips`] from the current [`registry::Registry`]), records the
//!    original destination and rewrites the connect to `127.0.0.1:15001` in the same namespace.
//! 2. [`proxy::Proxy::serve`] accepts it there, after [`proxy::downstream::Overload`] admits it,
//!    and asks the kernel for the original destination (the tuple map, via
//!    [`redirect::OriginalDst`]).
//! 3. The port's protocol decides the path. On an L4 port, the registry snapshot routes it
//!    (VirtualService `tcp` route → cluster → [`balance`] pick). [`breakers`] admits it, the upstream
//!    socket is marked and created in the application's namespace (with [`tls`] origination if
//!    the rule says so), and [`proxy::relay`] copies bytes within `idleTimeout` and
//!    `maxConnectionDuration`. On an HTTP port, [`proxy::http::serve`] serves the connection with
//!    hyper and routes every request on its own (`http` routes, retries, timeouts, outlier
//!    reports).
//! 4. Outcomes feed [`outlier`] and [`stats`]. The admin API and `EP_DSTATS` show them; the
//!    kernel's `EP_KSTATS` counts the marked upstream sockets. Each connection (L4) or request
//!    (HTTP, when its response body ends) writes one access-log line with Envoy's response flag.
//!
//! A reload swaps the snapshot atomically: new connections use the new one, and open ones keep
//! theirs.

pub mod access;
pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod breakers;
pub mod cni;
pub mod config;
pub mod dns;
pub mod fastpath;
pub mod hbone;
pub mod inbound;
pub mod kubernetes;
pub mod memory;
pub mod mesh;
pub mod outlier;
pub mod proxy;
pub mod redirect;
pub mod registry;
pub mod reload;
pub mod report;
pub mod stats;
pub mod telemetry;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod trace;
pub mod workload;
