//! Every map of the object, in one place. Pinned ones are pinned by the daemon under the versioned
//! pin directory (`/sys/fs/bpf/drover/v1/<NAME>`), so a restarted daemon finds the same state.

use aya_ebpf::{
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use drover_common::{
    CidrData, Config, Enrolment, EpDKey, EpDStats, EpKStats, EpKey, FastCluster, FastSock,
    FastTable, InboundKey, OrigDst, TupleKey, VipKey, VipValue,
    capacity::{
        self, CLUSTER_IDS as CLUSTER_IDS_CAP, ENROLLED, ORIG_BY_COOKIE as ORIG_BY_COOKIE_CAP,
        ORIG_BY_TUPLE as ORIG_BY_TUPLE_CAP, SVC_CIDRS as SVC_CIDRS_CAP, SVC_VIPS as SVC_VIPS_CAP,
    },
    kernel_errors,
};

/// `BPF_F_NO_PREALLOC`: a replaced element is freed after an RCU grace period, never re-used
/// while a program may still read it (a table replacement is atomic for readers).
const NO_PREALLOC: u32 = 1;

/// Single entry: runtime settings written by the daemon.
#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Captured service addresses (VIP, port, protocol).
#[map]
pub static SVC_VIPS: HashMap<VipKey, VipValue> = HashMap::pinned(SVC_VIPS_CAP, 0);

/// Captured service address ranges: (port, address prefix) → service, longest prefix first;
/// consulted when `SVC_VIPS` has no exact entry.
#[map]
pub static SVC_CIDRS: LpmTrie<CidrData, VipValue> = LpmTrie::pinned(SVC_CIDRS_CAP, 0);

/// Network namespaces (by cookie) whose connects are captured when the programs are attached at
/// the cgroup root; cgroup-scoped attachments capture without consulting it.
#[map(name = "ENROLLED")]
pub static ENROLLED_NETNS: HashMap<u64, Enrolment> = HashMap::pinned(ENROLLED, 0);

/// Original destination by application socket cookie (for sockops and getpeername).
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_BY_COOKIE_CAP, 0);

/// Original destination by the connection's 4-tuple + netns cookie (read and deleted by the daemon).
#[map]
pub static ORIG_BY_TUPLE: LruHashMap<TupleKey, OrigDst> = LruHashMap::pinned(ORIG_BY_TUPLE_CAP, 0);

/// Per-endpoint TCP counters of the daemon's upstream sockets, one value per CPU (BTF, so
/// `bpftool map dump` prints field names). LRU: endpoints that went away age out.
#[btf_map]
pub static EP_KSTATS: btf_maps::LruPerCpuHashMap<EpKey, EpKStats, { capacity::EP_KSTATS }> =
    btf_maps::LruPerCpuHashMap::new();

/// Per-(cluster, endpoint) policy state, written by the daemon only; declared here so that it is
/// created with BTF and pinned beside the kernel's counters.
#[btf_map]
pub static EP_DSTATS: btf_maps::HashMap<EpDKey, EpDStats, { capacity::EP_DSTATS }> =
    btf_maps::HashMap::new();

/// (workload address, port) whose inbound connections go to Drover; port 0: every port but
/// Drover's own (written by the daemon).
#[map]
pub static INBOUND_PORTS: HashMap<InboundKey, u32> = HashMap::with_max_entries(16384, 0);

/// Drover's inbound listener for each workload address (key port 0), in that workload's
/// namespace.
#[map]
pub static INBOUND_LISTENERS: SockHash<InboundKey> = SockHash::with_max_entries(4096, 0);

/// Fast-path endpoint tables by VIP, written whole by the daemon (see `drover_common::fast`).
#[map]
pub static FAST_TABLES: HashMap<VipKey, FastTable> =
    HashMap::pinned(capacity::FAST_TABLES, NO_PREALLOC);

/// Fast-path connection slots per cluster id (kernel-written; the daemon only reads).
#[map]
pub static FAST_CLUSTERS: HashMap<u32, FastCluster> = HashMap::pinned(capacity::FAST_CLUSTERS, 0);

/// Fast-path open connections per endpoint (kernel-written; least request reads it).
#[map]
pub static FAST_ACTIVE: HashMap<EpKey, u64> = HashMap::pinned(capacity::FAST_ACTIVE, 0);

/// The slot each balanced socket holds, by socket cookie (never evicted: a lost record would
/// leak a slot).
#[map]
pub static FAST_SOCKS: HashMap<u64, FastSock> = HashMap::pinned(capacity::FAST_SOCKS, 0);

/// Per-endpoint TCP counters of balanced (fast-path) sockets, beside `EP_KSTATS`.
#[btf_map]
pub static EP_FSTATS: btf_maps::LruPerCpuHashMap<EpKey, EpKStats, { capacity::EP_FSTATS }> =
    btf_maps::LruPerCpuHashMap::new();

/// Connect outcomes of balanced sockets, for the daemon's outlier detection.
#[map]
pub static FAST_EVENTS: RingBuf = RingBuf::with_byte_size(capacity::FAST_EVENTS, 0);

/// Cluster id by a hash of its name: written by the daemon only (declared here so that it is
/// created and pinned with the others and outlives the daemon, like the ids in `FAST_SOCKS`).
#[map]
pub static CLUSTER_IDS: HashMap<u64, u32> = HashMap::pinned(CLUSTER_IDS_CAP, 0);

/// Map operations that failed in a program, per [`kernel_errors`] kind (per-CPU counters, read
/// by `drover status`).
#[map]
pub static KERNEL_ERRORS: PerCpuArray<u64> = PerCpuArray::pinned(kernel_errors::COUNT, 0);
