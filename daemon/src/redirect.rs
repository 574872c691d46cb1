//! Capture: the kernel side (eBPF programs, pinned maps and links) and the two ways the proxy
//! learns a captured connection's original destination — the eBPF tuple map, or
//! `SO_ORIGINAL_DST` for connections an iptables `REDIRECT` rule sent (`--capture iptables`).
//!
//! Invariants: links and maps live under one versioned pin directory, so a restarted daemon
//! re-uses them instead of attaching twice; a connection whose original destination is unknown is
//! never guessed at.

pub mod loader;
pub mod netns;
pub mod sockmap;

use std::{io, net::SocketAddr};

use drover_common::TupleKey;
use tokio::net::TcpStream;

pub use loader::{Kernel, PinLock};

/// Errors of capture set-up and original-destination lookup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this drover was built without its eBPF object (DROVER_SKIP_EBPF=1); rebuild it, or use --capture iptables"
    )]
    ProgramNotBuilt,
    #[error("missing privilege: {0}")]
    Privilege(String),
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: String, reason: String },
    #[error("network namespace {name}: {source}")]
    Netns { name: String, source: io::Error },
    #[error("loading eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "pin directory {path} is owned by {owner}: one daemon per pin directory (stop it, or pass another --pin-dir)"
    )]
    Locked { path: String, owner: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: String, reason: String },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "no original destination recorded for {peer} (connection not captured by drover, or its record was evicted)"
    )]
    NoOriginal { peer: SocketAddr },
    #[error("SO_ORIGINAL_DST: {0}")]
    OriginalDst(io::Error),
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

/// How captured connections reach the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// cgroup `connect4/6` programs rewrite the destination (default).
    Ebpf,
    /// An iptables `REDIRECT` rule (installed by someone else) sends connections to the listener.
    Iptables,
}

/// Source of original destinations for accepted connections.
pub trait OriginalDst: Send + Sync + 'static {
    /// The destination the application dialled, for a connection accepted by a listener in the
    /// network namespace whose cookie is `netns_cookie`.
    fn original_dst(&self, netns_cookie: u64, stream: &TcpStream) -> Result<SocketAddr, Error>;
}

/// `SO_ORIGINAL_DST`, filled in by netfilter for `REDIRECT`ed connections.
#[derive(Debug, Default)]
pub struct SoOriginalDst;

// === impl SoOriginalDst ===

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, _netns_cookie: u64, stream: &TcpStream) -> Result<SocketAddr, Error> {
        let sock = socket2::SockRef::from(stream);
        let local = stream.local_addr()?;
        let addr = if local.is_ipv4() {
            sock.original_dst_v4()
        } else {
            sock.original_dst_v6()
        }
        .map_err(Error::OriginalDst)?;
        addr.as_socket()
            .ok_or_else(|| Error::OriginalDst(io::Error::other("not an inet address")))
    }
}

/// A listener per destination: a connection's original destination is the one its listener
/// (the connection's local address) stands for. Nothing is captured; the application dials the
/// listener. This is how the in-process tests drive the data path without privileges.
#[derive(Debug, Default)]
pub struct ByListener(pub std::collections::HashMap<SocketAddr, SocketAddr>);

impl OriginalDst for ByListener {
    fn original_dst(&self, _netns_cookie: u64, stream: &TcpStream) -> Result<SocketAddr, Error> {
        let local = stream.local_addr()?;
        self.0.get(&local).copied().ok_or_else(|| {
            Error::OriginalDst(io::Error::other(format!(
                "no destination for listener {local}"
            )))
        })
    }
}

/// The `ORIG_BY_TUPLE` key for a connection accepted in `netns_cookie` (src = the application).
pub fn tuple_key(netns_cookie: u64, peer: SocketAddr, local: SocketAddr) -> TupleKey {
    TupleKey {
        netns_cookie,
        src: addr_words(peer),
        dst: addr_words(local),
        sport_be: peer.port().to_be(),
        dport_be: local.port().to_be(),
        _pad: 0,
    }
}

/// A socket address as the 16-byte, network-order words the kernel programs use (v4-mapped).
pub fn addr_words(addr: SocketAddr) -> [u32; 4] {
    let v6 = match addr {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
        SocketAddr::V6(a) => *a.ip(),
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]])
    })
}

/// Inverse of [`addr_words`]; v4-mapped addresses come back as IPv4.
pub fn words_addr(words: [u32; 4], port_be: u16) -> SocketAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    SocketAddr::new(
        std::net::Ipv6Addr::from(o).to_canonical(),
        u16::from_be(port_be),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip_and_match_kernel_layout() {
        for s in ["127.77.0.10:80", "[fd00:77::10]:443", "[::1]:15001"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(words_addr(addr_words(a), a.port().to_be()), a);
        }
        let v4: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let raw = u32::from_ne_bytes([10, 96, 0, 10]);
        assert_eq!(addr_words(v4), drover_common::v4_mapped(raw));
        let key = tuple_key(
            7,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:15001".parse().unwrap(),
        );
        assert_eq!(key.sport_be, 40000u16.to_be());
        assert_eq!(
            key.dst,
            drover_common::v4_mapped(drover_common::LOOPBACK4_RAW)
        );
    }
}
