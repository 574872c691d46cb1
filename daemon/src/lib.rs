//! Drover: an eBPF-accelerated transparent proxy that applies Istio's `DestinationRule` semantics.
//! See `README.md` and the module docs; `app` is where the pieces meet.

pub mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod inbound;
pub mod memory;
pub mod mesh;
pub mod outlier;
pub mod pool;
pub mod proxy;
pub mod redirect;
pub mod registry;
pub mod reload;
pub mod stats;
pub mod status;
pub mod tls;
