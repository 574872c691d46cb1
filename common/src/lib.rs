//! Types shared by Drover's kernel programs (`ebpf/`) and the daemon.
//!
//! Every key and value is `#[repr(C)]` with explicit, zeroed padding and a compile-time size check:
//! the kernel compares keys byte for byte, so stray padding bytes would make lookups miss. Addresses
//! are always 16 bytes in network order; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`). Changing any
//! layout here requires bumping [`PIN_VERSION`], because aya reuses pinned maps without checking sizes.
#![no_std]

/// The layout version as a literal, so that the pin directory can be built from it at compile time.
macro_rules! pin_version {
    () => {
        "v1"
    };
}

/// Layout version of the pinned maps; the last component of [`DEFAULT_PIN_DIR`].
pub const PIN_VERSION: &str = pin_version!();
/// Default pin directory for maps (`/sys/fs/bpf/drover/<PIN_VERSION>`); links live in its
/// `links/` child.
pub const DEFAULT_PIN_DIR: &str = concat!("/sys/fs/bpf/drover/", pin_version!());
/// `SO_MARK` carried by every socket the daemon creates; the kernel programs never capture them.
pub const DROVER_MARK: u32 = 0x4452;
/// Port of the outbound capture listener inside every enrolled network namespace.
pub const PROXY_PORT: u16 = 15001;
/// Port of the inbound mTLS termination listener in a namespace that hosts workloads.
pub const INBOUND_PORT: u16 = 15006;

/// Map names, as they appear in the object and under the pin directory.
pub mod maps {
    pub const CONFIG: &str = "CONFIG";
    pub const SVC_VIPS: &str = "SVC_VIPS";
    /// Captured service address ranges (ServiceEntry CIDR `addresses`), longest prefix first.
    pub const SVC_CIDRS: &str = "SVC_CIDRS";
    pub const ENROLLED: &str = "ENROLLED";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// Kernel-written per-endpoint TCP counters (BTF, per-CPU).
    pub const EP_KSTATS: &str = "EP_KSTATS";
    /// Daemon-written per-(cluster, endpoint) policy state (BTF).
    pub const EP_DSTATS: &str = "EP_DSTATS";
    /// Inbound steering (not pinned: they live as long as the daemon that fills them).
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    pub const INBOUND_LISTENER: &str = "INBOUND_LISTENER";
    /// Every map, for pinning and cleanup.
    pub const ALL: [&str; 8] = [
        CONFIG,
        SVC_VIPS,
        SVC_CIDRS,
        ENROLLED,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        EP_KSTATS,
        EP_DSTATS,
    ];
}

/// Capacities of the maps.
pub mod capacity {
    pub const SVC_VIPS: u32 = 65_536;
    pub const SVC_CIDRS: u32 = 4_096;
    pub const ENROLLED: u32 = 16_384;
    pub const ORIG_BY_COOKIE: u32 = 262_144;
    pub const ORIG_BY_TUPLE: u32 = 262_144;
    pub const EP_KSTATS: usize = 65_536;
    pub const EP_DSTATS: usize = 65_536;
}

/// Bits of [`Config::flags`].
pub mod flags {
    /// Leave a captured connect alone when no listener exists in its network namespace.
    pub const FAIL_OPEN: u32 = 1 << 0;
}

/// Bits of [`OrigDst::flags`].
pub mod orig_flags {
    /// The application socket was AF_INET6 (native IPv6 or v4-mapped destination).
    pub const FAMILY_V6_SOCKET: u8 = 1 << 0;
}

/// Runtime settings the daemon writes into the single-entry `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Listener port, host byte order.
    pub proxy_port: u16,
    pub _pad0: u16,
    /// [`flags`] bits.
    pub flags: u32,
    /// Sockets carrying this `SO_MARK` are never captured.
    pub mark: u32,
    /// Non-zero once a daemon has written the config; programs do nothing before that.
    pub ready: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 16);

/// Key of `SVC_VIPS`: a service address and port that is captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port_be: u16,
    /// IP protocol number (6 = TCP).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// The data of a `SVC_CIDRS` key (an LPM trie key is a prefix length, then this): the port, then
/// the address, so that a prefix covers the whole port and the address's leading bits. A range
/// of `addr/len` on `port` has prefix length `16 + len` (IPv6) or `16 + 96 + len` (IPv4, mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrData {
    /// Port in network byte order, as bytes.
    pub port_be: [u8; 2],
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u8; 16],
    /// Never part of a prefix.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CidrData>() == 20);

/// The full prefix length of a `SVC_CIDRS` lookup key (port and the whole address).
pub const CIDR_FULL_PREFIX: u32 = 16 + 128;

/// Value of `SVC_VIPS` (and of `SVC_CIDRS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipValue {
    /// Index of the service in the daemon's registry snapshot (informational for the kernel).
    pub svc_id: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipValue>() == 8);

/// Value of `ENROLLED` (key: netns cookie, `u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enrolment {
    pub workload_id: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Enrolment>() == 8);

/// The destination an application asked for before capture rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port_be: u16,
    /// 4 or 6: the family of the original destination address.
    pub family: u8,
    /// [`orig_flags`] bits.
    pub flags: u8,
    pub svc_id: u32,
    /// Cookie of the network namespace the application connected from.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);

/// Key of `ORIG_BY_TUPLE`: the application's connection to the listener, as the daemon sees it
/// after `accept()` (src = application side, dst = listener).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub netns_cookie: u64,
    /// IPv6 or v4-mapped IPv4, network order.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<TupleKey>() == 48);

/// Key of `EP_KSTATS`: one upstream endpoint as the daemon's sockets dial it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EpKey {
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port_be: u16,
    /// IP protocol number (6 = TCP).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<EpKey>() == 20);

/// Value of `EP_KSTATS` (one per CPU; readers sum them): what the kernel saw on Drover's upstream
/// sockets to one endpoint. Active connections = `established - closed`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct EpKStats {
    /// `connect()` attempts (TCP_CONNECT_CB).
    pub attempts: u64,
    /// Handshakes completed.
    pub established: u64,
    /// Attempts that closed before being established (refused, unreachable, timed out).
    pub connect_failures: u64,
    /// Established connections that have closed.
    pub closed: u64,
    /// Bytes acknowledged by the endpoint and received from it, over closed connections.
    pub bytes_acked: u64,
    pub bytes_received: u64,
    /// Smoothed RTT samples (µs), taken at establishment and at close.
    pub srtt_us_sum: u64,
    pub srtt_samples: u64,
    /// Retransmitted segments, over closed connections.
    pub retrans: u64,
}
const _: () = assert!(core::mem::size_of::<EpKStats>() == 72);

/// Key of `EP_DSTATS`: one endpoint of one cluster (the id is listed by the admin API's
/// `/clusters`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EpDKey {
    pub cluster_id: u32,
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<EpDKey>() == 24);

/// Value of `EP_DSTATS`, written by the daemon only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct EpDStats {
    /// Upstream connections open to the endpoint's address (pooled per address).
    pub cx_active: u64,
    /// Requests (HTTP) or connections (TCP) sent to the endpoint.
    pub rq_total: u64,
    pub rq_active: u64,
    /// Requests waiting for a connection slot.
    pub rq_pending: u64,
    /// Responses 500–599 (gateway errors included).
    pub rq_5xx: u64,
    /// Responses 502, 503, 504.
    pub gateway_errors: u64,
    /// Connect failures, timeouts and resets before a response.
    pub local_origin_failures: u64,
    /// CLOCK_MONOTONIC nanoseconds at which the current ejection ends (0 when not ejected).
    pub ejection_deadline_ns: u64,
    pub times_ejected: u32,
    /// 1 while ejected by outlier detection.
    pub ejected: u32,
}
const _: () = assert!(core::mem::size_of::<EpDStats>() == 72);

/// IPv4 address (as the raw network-order `u32` the kernel hands out) → v4-mapped 16-byte form.
#[inline(always)]
pub const fn v4_mapped(ip4_raw: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_raw]
}

/// Whether a 16-byte address is v4-mapped; returns the raw IPv4 word if so.
#[inline(always)]
pub const fn as_v4(addr: &[u32; 4]) -> Option<u32> {
    if addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(addr[3])
    } else {
        None
    }
}

/// `127.0.0.1` as a raw network-order word.
pub const LOOPBACK4_RAW: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::1` as raw network-order words.
pub const LOOPBACK6_RAW: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, has no padding that is not an explicit
    // field, and is valid for any bit pattern.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::CidrData {}
    unsafe impl aya::Pod for super::Enrolment {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::EpKey {}
    unsafe impl aya::Pod for super::EpKStats {}
    unsafe impl aya::Pod for super::EpDKey {}
    unsafe impl aya::Pod for super::EpDStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trips() {
        let raw = u32::from_ne_bytes([10, 96, 0, 10]);
        let mapped = v4_mapped(raw);
        let mut bytes = [0u8; 16];
        for (i, w) in mapped.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(
            bytes,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(as_v4(&mapped), Some(raw));
        assert_eq!(as_v4(&LOOPBACK6_RAW), None);
    }
}
