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
/// Port of the HBONE (HTTP/2 `CONNECT` over mTLS) listener in every enrolled pod.
pub const HBONE_PORT: u16 = 15008;
/// Ports of Drover's own in a pod (admin, outbound, inbound, HBONE, Istio's agent and stats
/// ports): never steered by an "every port" inbound entry.
pub const RESERVED_PORTS: [u16; 7] = [
    15000,
    PROXY_PORT,
    INBOUND_PORT,
    HBONE_PORT,
    15020,
    15021,
    15090,
];

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
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// Kernel fast path: endpoint tables by (VIP, port), written by the daemon.
    pub const FAST_TABLES: &str = "FAST_TABLES";
    /// Kernel fast path: connection slots in use per cluster (kernel-written).
    pub const FAST_CLUSTERS: &str = "FAST_CLUSTERS";
    /// Kernel fast path: open connections per endpoint (kernel-written, for least request).
    pub const FAST_ACTIVE: &str = "FAST_ACTIVE";
    /// Kernel fast path: the reservation each balanced socket holds, by socket cookie.
    pub const FAST_SOCKS: &str = "FAST_SOCKS";
    /// Kernel fast path: per-endpoint TCP counters of balanced sockets (BTF, per-CPU).
    pub const EP_FSTATS: &str = "EP_FSTATS";
    /// Kernel fast path: connect outcomes for outlier detection (ring buffer, not pinned).
    pub const FAST_EVENTS: &str = "FAST_EVENTS";
    /// Kernel fast path: cluster id by a hash of the cluster's name (daemon-written), so that a
    /// restarted daemon gives each cluster the id its held sockets carry.
    pub const CLUSTER_IDS: &str = "CLUSTER_IDS";
    /// Map operations that failed inside a program, per [`crate::kernel_errors`] kind (per-CPU).
    pub const KERNEL_ERRORS: &str = "KERNEL_ERRORS";
    /// Every map, for pinning and cleanup.
    pub const ALL: [&str; 15] = [
        CONFIG,
        SVC_VIPS,
        SVC_CIDRS,
        ENROLLED,
        ORIG_BY_COOKIE,
        ORIG_BY_TUPLE,
        EP_KSTATS,
        EP_DSTATS,
        FAST_TABLES,
        FAST_CLUSTERS,
        FAST_ACTIVE,
        FAST_SOCKS,
        EP_FSTATS,
        CLUSTER_IDS,
        KERNEL_ERRORS,
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
    pub const EP_FSTATS: usize = 65_536;
    pub const FAST_TABLES: u32 = 16_384;
    pub const FAST_CLUSTERS: u32 = 16_384;
    pub const FAST_ACTIVE: u32 = 65_536;
    pub const FAST_SOCKS: u32 = 262_144;
    /// Bytes of the connect-outcome ring buffer.
    pub const FAST_EVENTS: u32 = 256 * 1024;
    pub const CLUSTER_IDS: u32 = 65_536;
}

/// Indexes of `KERNEL_ERRORS`: what failed when a connect was failed closed (or, with
/// `--fail-open`, left alone).
pub mod kernel_errors {
    /// The original destination could not be recorded (`ORIG_BY_COOKIE`).
    pub const ORIG_RECORD: u32 = 0;
    /// The fast path could not create its cluster's slot counter (`FAST_CLUSTERS` full).
    pub const FAST_CLUSTER: u32 = 1;
    /// The runtime config could not be read (`CONFIG`).
    pub const CONFIG: u32 = 2;
    pub const COUNT: u32 = 3;
    /// Names by index, as `drover status` prints them.
    pub const NAMES: [&str; COUNT as usize] = ["orig_record", "fast_cluster", "config"];
}

/// Bits of [`Config::flags`].
pub mod flags {
    /// Leave a captured connect alone when no listener exists in its network namespace, or
    /// when a map operation fails (otherwise such a connect fails with `EPERM`).
    pub const FAIL_OPEN: u32 = 1 << 0;
}

/// Bits of [`OrigDst::flags`].
pub mod orig_flags {
    /// The application socket was AF_INET6 (native IPv6 or v4-mapped destination).
    pub const FAMILY_V6_SOCKET: u8 = 1 << 0;
    /// The socket was balanced by the kernel fast path (it reached an endpoint directly; no
    /// tuple record is needed).
    pub const FAST: u8 = 1 << 1;
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

/// Key of `INBOUND_PORTS` and `INBOUND_LISTENERS`: a workload address and a port whose inbound
/// connections go to Drover's inbound listener for that address. Port 0 stands for every port
/// but [`RESERVED_PORTS`]; `INBOUND_LISTENERS` keys always have port 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundKey {
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u32; 4],
    /// Port in host order.
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<InboundKey>() == 20);

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

/// The kernel fast path: plain-TCP services balanced inside `connect()` from tables the daemon
/// writes. A table is replaced as a whole (one hash-map update), so a connect sees the old table
/// or the new one, never a mix.
pub mod fast {
    /// Endpoints a table can hold.
    pub const MAX_ENDPOINTS: usize = 128;
    /// Slots of a table's selection ring (weighted sequence, or the consistent-hash table).
    pub const RING: usize = 1024;
    /// Size of the consistent-hash lookup table (a prime below [`RING`]).
    pub const HASH_RING: u32 = 1021;

    /// [`super::FastTable::lb`] values.
    pub mod lb {
        /// Walk the ring in order (weighted round robin).
        pub const ROUND_ROBIN: u32 = 0;
        /// A random ring slot (weighted random).
        pub const RANDOM: u32 = 1;
        /// Two random ring slots; the endpoint with fewer open connections wins.
        pub const LEAST_REQUEST: u32 = 2;
        /// The ring slot of the client's hash (a Maglev table of [`super::HASH_RING`] slots).
        pub const HASH: u32 = 3;
        /// Connect to the original destination (on endpoint 0's port); endpoint 0 carries only
        /// the cluster and its cap.
        pub const PASSTHROUGH: u32 = 4;
    }

    /// [`super::FastTable::flags`] bits.
    pub mod flags {
        /// Report connect outcomes to the daemon (the cluster has outlier detection).
        pub const OUTCOMES: u32 = 1 << 0;
        /// Set by the kernel on a [`super::super::FastSock`] whose connect timeout it set.
        pub const CONNECT_TIMEOUT: u32 = 1 << 8;
    }

    /// [`super::FastEvent::kind`] values.
    pub mod outcome {
        pub const CONNECTED: u32 = 0;
        pub const FAILED: u32 = 1;
    }
}

/// One endpoint of a fast-path table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastEndpoint {
    /// IPv6 or v4-mapped IPv4, network order.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port_be: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
    /// The cluster whose connection cap this endpoint counts against (`/clusters` id).
    pub cluster_id: u32,
    /// The cluster's `tcp.maxConnections` (0: no cap).
    pub max_connections: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<FastEndpoint>() == 32);

/// Value of `FAST_TABLES` (key: [`VipKey`]): how the kernel balances a connect to that VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FastTable {
    /// [`fast::lb`] value.
    pub lb: u32,
    /// [`fast::flags`] bits.
    pub flags: u32,
    /// Endpoints in use (`endpoints[..n]`); 0 sends connects to the proxy.
    pub n: u32,
    /// Slots in use (`ring[..ring_len]`).
    pub ring_len: u32,
    /// `connectTimeout` in milliseconds, set as `TCP_USER_TIMEOUT` until established.
    pub connect_timeout_ms: u32,
    /// Round-robin position (advanced by the kernel; starts at 0 with each new table).
    pub cursor: u32,
    /// The daemon's generation of this table (for `explain` and tests).
    pub generation: u32,
    pub _pad: u32,
    pub endpoints: [FastEndpoint; fast::MAX_ENDPOINTS],
    /// Indices into `endpoints`.
    pub ring: [u8; fast::RING],
}
const _: () = assert!(core::mem::size_of::<FastTable>() == 32 + 32 * 128 + 1024);

impl Default for FastTable {
    fn default() -> Self {
        Self {
            lb: 0,
            flags: 0,
            n: 0,
            ring_len: 0,
            connect_timeout_ms: 0,
            cursor: 0,
            generation: 0,
            _pad: 0,
            endpoints: [FastEndpoint::default(); fast::MAX_ENDPOINTS],
            ring: [0; fast::RING],
        }
    }
}

/// Value of `FAST_SOCKS` (key: socket cookie): the slot a balanced socket holds until it closes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastSock {
    pub cluster_id: u32,
    /// [`fast::flags`] of the table it was balanced by.
    pub flags: u32,
    pub endpoint: EpKey,
    /// 1 while the socket holds its slot; whoever takes it from 1 releases the slot.
    pub held: u32,
}
const _: () = assert!(core::mem::size_of::<FastSock>() == 32);

/// Value of `FAST_CLUSTERS` (key: cluster id), written by the kernel only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastCluster {
    /// Sockets holding a connection slot (reserved in `connect`, released at close).
    pub active: u32,
    pub _pad: u32,
    /// Connects refused because the cap was reached (Envoy's `upstream_cx_overflow`).
    pub overflow: u64,
    /// Connects balanced by the kernel.
    pub total: u64,
}
const _: () = assert!(core::mem::size_of::<FastCluster>() == 24);

/// A record of `FAST_EVENTS`: one connect outcome of a balanced socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastEvent {
    pub cluster_id: u32,
    /// [`fast::outcome`] value.
    pub kind: u32,
    pub endpoint: EpKey,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FastEvent>() == 32);

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
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::CidrData {}
    unsafe impl aya::Pod for super::Enrolment {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::EpKey {}
    unsafe impl aya::Pod for super::EpKStats {}
    unsafe impl aya::Pod for super::EpDKey {}
    unsafe impl aya::Pod for super::EpDStats {}
    unsafe impl aya::Pod for super::FastTable {}
    unsafe impl aya::Pod for super::FastSock {}
    unsafe impl aya::Pod for super::FastCluster {}
    unsafe impl aya::Pod for super::FastEvent {}
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
