//! Loads Drover's eBPF object, pins its maps and links under the versioned pin directory, attaches
//! the programs to enrolled cgroups (and to the cgroup v2 root for enrolled network namespaces),
//! and gives typed access to the maps the daemon writes or reads.
//!
//! Re-use rules (what a restart does): maps found pinned are re-used with their contents; a link
//! already pinned for the same program and cgroup is kept, not attached again; pinned links this
//! run does not want are unpinned (which detaches them). `uninstall` removes the whole directory.

use std::{
    collections::HashSet,
    fs::{self, File},
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuHashMap, RingBuf,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode,
        links::{FdLink, PinnedLink},
    },
};
use drover_common::{
    CidrData, Config, DROVER_MARK, Enrolment, EpDKey, EpDStats, EpKStats, EpKey, FastCluster,
    FastTable, InboundKey, OrigDst, PROXY_PORT, TupleKey, VipKey, VipValue, flags, maps,
};
use tokio::{io::unix::AsyncFd, net::TcpStream};

use super::{Error, OriginalDst, addr_words, tuple_key, words_addr};

/// The object built by `daemon/build.rs` (empty when built with `DROVER_SKIP_EBPF=1`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/drover-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Programs attached to an enrolled cgroup (capture everything its processes dial).
const CGROUP_PROGRAMS: [&str; 6] = [
    "drover_connect4",
    "drover_connect6",
    "drover_getpeername4",
    "drover_getpeername6",
    "drover_sockops",
    "drover_sock_release",
];
/// Programs attached to the cgroup v2 root for enrolled network namespaces (gated by `ENROLLED`).
const ROOT_PROGRAMS: [&str; 6] = [
    "drover_connect4_netns",
    "drover_connect6_netns",
    "drover_getpeername4",
    "drover_getpeername6",
    "drover_sockops",
    "drover_sock_release",
];

/// Counts the daemon's own (marked) upstream sockets per endpoint; attached to the daemon's cgroup.
const UPSTREAM_PROGRAM: &str = "drover_upstream_sockops";

/// Steers inbound connections to workload ports to the inbound listener (per namespace).
const INBOUND_PROGRAM: &str = "drover_inbound";

/// `SVC_CIDRS` and the (prefix length, data) keys written to it.
type CidrMirror = (
    LpmTrie<MapData, CidrData, VipValue>,
    Option<HashSet<(u32, CidrData)>>,
);

/// A captured range: ((network address, prefix length), port, service index).
pub type CapturedRange = ((IpAddr, u8), u16, u32);

/// The loaded kernel side.
pub struct Kernel {
    pin_dir: PathBuf,
    ebpf: Mutex<Ebpf>,
    svc_vips: Mutex<Mirror<VipKey, VipValue>>,
    /// `SVC_CIDRS` and the (prefix length, data) keys this process wrote (`None` until the
    /// first replacement, which reads what a previous daemon left).
    svc_cidrs: Mutex<CidrMirror>,
    enrolled: Mutex<Mirror<u64, Enrolment>>,
    orig_by_tuple: Mutex<HashMap<MapData, TupleKey, OrigDst>>,
    ep_dstats: Mutex<Mirror<EpDKey, EpDStats>>,
    fast_tables: Mutex<Mirror<VipKey, FastTable>>,
    fast_clusters: HashMap<MapData, u32, FastCluster>,
    /// Cluster ids by name key (see [`crate::stats::name_key`]), for the next daemon.
    cluster_ids: Mutex<HashMap<MapData, u64, u32>>,
    ep_fstats: PerCpuHashMap<MapData, EpKey, EpKStats>,
    /// Connect outcomes of balanced sockets (taken once by the fast-path runner).
    fast_events: Mutex<Option<RingBuf<MapData>>>,
    links: Mutex<Vec<PinnedLink>>,
    wanted_links: Mutex<HashSet<String>>,
}

// === impl Kernel ===

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Checks privileges and bpffs, loads the object with its maps pinned in `pin_dir`, writes the
    /// runtime config and starts forwarding `aya-log` records to `tracing` (debug level).
    /// Must be called inside a tokio runtime.
    pub fn load(pin_dir: &Path, fail_open: bool) -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::ProgramNotBuilt);
        }
        check_capabilities()?;
        ensure_bpffs(pin_dir)?;
        fs::create_dir_all(pin_dir.join("links"))
            .map_err(|e| Error::Bpffs(format!("cannot create {}: {e}", pin_dir.display())))?;

        // BTF maps carry no pinning attribute; name their pins explicitly (re-used when present).
        let kstats_pin = pin_dir.join(maps::EP_KSTATS);
        let dstats_pin = pin_dir.join(maps::EP_DSTATS);
        let fstats_pin = pin_dir.join(maps::EP_FSTATS);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_pin_path(maps::EP_KSTATS, kstats_pin.as_path())
            .map_pin_path(maps::EP_DSTATS, dstats_pin.as_path())
            .map_pin_path(maps::EP_FSTATS, fstats_pin.as_path())
            .override_global(aya_log::LEVEL, &kernel_log_level(), false)
            .load(OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_pump(logger),
            Err(e) => tracing::warn!(error = %e, "kernel log forwarding unavailable"),
        }
        for name in CGROUP_PROGRAMS
            .iter()
            .chain(ROOT_PROGRAMS.iter())
            .chain([UPSTREAM_PROGRAM, INBOUND_PROGRAM].iter())
        {
            let prog = ebpf.program_mut(name).ok_or(Error::Pin {
                path: (*name).into(),
                reason: "program missing from object".into(),
            })?;
            let loaded = prog.fd().is_ok();
            if loaded {
                continue;
            }
            let res = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSock(p) => p.load(),
                aya::programs::Program::SkLookup(p) => p.load(),
                _ => continue,
            };
            res.map_err(|source| Error::Program { name, source })?;
        }

        let mut config: Array<MapData, Config> = take_map(&mut ebpf, maps::CONFIG)?;
        let cfg = Config {
            proxy_port: PROXY_PORT,
            _pad0: 0,
            flags: if fail_open { flags::FAIL_OPEN } else { 0 },
            mark: DROVER_MARK,
            ready: 1,
        };
        config.set(0, cfg, 0).map_err(|source| Error::Map {
            name: maps::CONFIG,
            source,
        })?;

        Ok(Self {
            pin_dir: pin_dir.to_path_buf(),
            svc_vips: Mutex::new(Mirror::new(take_map(&mut ebpf, maps::SVC_VIPS)?)),
            svc_cidrs: Mutex::new((take_map(&mut ebpf, maps::SVC_CIDRS)?, None)),
            enrolled: Mutex::new(Mirror::new(take_map(&mut ebpf, maps::ENROLLED)?)),
            orig_by_tuple: Mutex::new(take_map(&mut ebpf, maps::ORIG_BY_TUPLE)?),
            ep_dstats: Mutex::new(Mirror::new(take_map(&mut ebpf, maps::EP_DSTATS)?)),
            fast_tables: Mutex::new(Mirror::new(take_map(&mut ebpf, maps::FAST_TABLES)?)),
            fast_clusters: take_map(&mut ebpf, maps::FAST_CLUSTERS)?,
            cluster_ids: Mutex::new(take_map(&mut ebpf, maps::CLUSTER_IDS)?),
            ep_fstats: take_map(&mut ebpf, maps::EP_FSTATS)?,
            fast_events: Mutex::new(Some(take_map(&mut ebpf, maps::FAST_EVENTS)?)),
            ebpf: Mutex::new(ebpf),
            links: Mutex::new(Vec::new()),
            wanted_links: Mutex::new(HashSet::new()),
        })
    }

    /// Captures every process in the cgroup v2 directory `dir` (and its children).
    pub fn enrol_cgroup(&self, dir: &Path) -> Result<(), Error> {
        let ino = check_cgroup(dir)?;
        self.attach_all(dir, &CGROUP_PROGRAMS, &format!("cg{ino}"))
    }

    /// Attaches the namespace-gated programs at the cgroup v2 root (once per daemon).
    pub fn attach_root(&self) -> Result<(), Error> {
        let root = cgroup2_root()?;
        self.attach_all(&root, &ROOT_PROGRAMS, "root")
    }

    /// Counts this daemon's upstream sockets per endpoint (`EP_KSTATS`): attaches the upstream
    /// `sockops` program to the cgroup the daemon runs in.
    pub fn attach_upstream_counters(&self) -> Result<(), Error> {
        let own = own_cgroup()?;
        let meta = fs::metadata(&own).map_err(|e| Error::Cgroup {
            path: own.display().to_string(),
            reason: e.to_string(),
        })?;
        self.attach_all(&own, &[UPSTREAM_PROGRAM], &format!("cg{}", meta.ino()))
    }

    /// Attaches the inbound `sk_lookup` program to `ns`: it stays attached while the returned
    /// link lives (a pod's, until it leaves).
    pub fn attach_inbound(
        &self,
        ns: &crate::redirect::netns::NetNs,
    ) -> Result<aya::programs::sk_lookup::SkLookupLink, Error> {
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let name = INBOUND_PROGRAM;
        let prog: &mut aya::programs::SkLookup = ebpf
            .program_mut(name)
            .expect("program checked at load")
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        let id = prog
            .attach(ns.as_fd())
            .map_err(|source| Error::Program { name, source })?;
        prog.take_link(id)
            .map_err(|source| Error::Program { name, source })
    }

    /// Steers inbound TCP to `addresses` — on `ports`, or on every port but Drover's own when
    /// `ports` is empty — to `listener`, which lives in the namespace of those addresses (whose
    /// `sk_lookup` program must be attached).
    pub fn steer_inbound(
        &self,
        addresses: &[IpAddr],
        listener: &tokio::net::TcpListener,
        ports: &[u16],
    ) -> Result<(), Error> {
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let map_err = |name: &'static str| move |source| Error::Map { name, source };
        let missing = |name: &'static str| Error::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        };
        for ip in addresses {
            let key = inbound_key(*ip, 0);
            let mut listeners: aya::maps::SockHash<&mut MapData, InboundKey> = ebpf
                .map_mut(maps::INBOUND_LISTENERS)
                .ok_or_else(|| missing(maps::INBOUND_LISTENERS))?
                .try_into()
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
            listeners
                .insert(key, listener.as_raw_fd(), 0)
                .map_err(map_err(maps::INBOUND_LISTENERS))?;
            let mut steered: HashMap<&mut MapData, InboundKey, u32> = ebpf
                .map_mut(maps::INBOUND_PORTS)
                .ok_or_else(|| missing(maps::INBOUND_PORTS))?
                .try_into()
                .map_err(map_err(maps::INBOUND_PORTS))?;
            let ports: &[u16] = if ports.is_empty() { &[0] } else { ports };
            for p in ports {
                steered
                    .insert(inbound_key(*ip, *p), 1, 0)
                    .map_err(map_err(maps::INBOUND_PORTS))?;
            }
        }
        Ok(())
    }

    /// Stops steering inbound TCP to `addresses` (a pod that left).
    pub fn unsteer_inbound(&self, addresses: &[IpAddr]) {
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let words: Vec<[u32; 4]> = (addresses.iter())
            .map(|ip| inbound_key(*ip, 0).addr)
            .collect();
        if let Some(Ok(mut steered)) = ebpf
            .map_mut(maps::INBOUND_PORTS)
            .map(HashMap::<&mut MapData, InboundKey, u32>::try_from)
        {
            let gone: Vec<InboundKey> = (steered.keys().flatten())
                .filter(|k| words.contains(&k.addr))
                .collect();
            for k in gone {
                let _ = steered.remove(&k);
            }
        }
        if let Some(Ok(mut listeners)) = ebpf
            .map_mut(maps::INBOUND_LISTENERS)
            .map(aya::maps::SockHash::<&mut MapData, InboundKey>::try_from)
        {
            for ip in addresses {
                let _ = listeners.remove(&inbound_key(*ip, 0));
            }
        }
    }

    /// Makes `EP_DSTATS` hold exactly `rows` (the daemon is its only writer).
    pub fn publish_endpoint_stats(&self, rows: &[(EpDKey, EpDStats)]) -> Result<(), Error> {
        let mut map = self.ep_dstats.lock().expect("ep_dstats map lock");
        map.replace_all(rows.iter().copied().collect(), maps::EP_DSTATS)
    }

    /// Makes the fast-path tables exactly `tables` (by VIP); only changed tables are written,
    /// each in one map update. The cluster ids given since the last call are saved first, so a
    /// table never names an id a restarted daemon would give to another cluster.
    pub fn set_fast_tables(&self, tables: &[(SocketAddr, FastTable)]) -> Result<(), Error> {
        self.save_cluster_ids();
        let wanted = tables.iter().map(|(a, t)| (vip_key(*a), *t));
        let mut map = self.fast_tables.lock().expect("fast_tables map lock");
        map.replace_all(wanted.collect(), maps::FAST_TABLES)
    }

    /// Saves the cluster ids given since the last save into `CLUSTER_IDS` (a full map is
    /// logged: those clusters may get other ids after a restart).
    fn save_cluster_ids(&self) {
        let mut map = self.cluster_ids.lock().expect("cluster_ids map lock");
        let mut failed = 0;
        for (key, id) in crate::stats::store().unsaved_ids() {
            if map.insert(key, id, 0).is_err() {
                failed += 1;
            }
        }
        if failed > 0 {
            tracing::warn!(
                clusters = failed,
                capacity = drover_common::capacity::CLUSTER_IDS,
                "CLUSTER_IDS is full: these clusters' ids are not kept across a restart"
            );
        }
    }

    /// The kernel's fast-path slot counters of cluster `id`, if it balanced any connect.
    pub fn fast_cluster(&self, id: u32) -> Option<FastCluster> {
        self.fast_clusters.get(&id, 0).ok()
    }

    /// The kernel's counters of balanced sockets to `endpoint` (CPUs summed).
    pub fn fast_endpoint(&self, endpoint: SocketAddr) -> Option<EpKStats> {
        let key = EpKey {
            addr: addr_words(endpoint),
            port_be: endpoint.port().to_be(),
            proto: 6,
            family: if endpoint.ip().to_canonical().is_ipv4() {
                4
            } else {
                6
            },
        };
        let per_cpu = self.ep_fstats.get(&key, 0).ok()?;
        Some(crate::report::sum(per_cpu.iter()))
    }

    /// The ring of connect outcomes (once: its reader owns it).
    pub fn take_fast_events(&self) -> Option<RingBuf<MapData>> {
        self.fast_events.lock().expect("fast events lock").take()
    }

    /// Marks the network namespaces (by cookie) whose connects are captured; replaces the set.
    pub fn set_enrolled_netns(&self, cookies: &[u64]) -> Result<(), Error> {
        let wanted = cookies.iter().enumerate().map(|(i, c)| {
            (
                *c,
                Enrolment {
                    workload_id: i as u32,
                    flags: 0,
                },
            )
        });
        let mut map = self.enrolled.lock().expect("enrolled map lock");
        map.replace_all(wanted.collect(), maps::ENROLLED)
    }

    /// Adds the namespaces of `cookies` to those already enrolled (a previous daemon's pods stay
    /// captured until the CNI enrolments are restored and the set is made exact).
    pub fn add_enrolled_netns(&self, cookies: &[u64]) -> Result<(), Error> {
        let mut all: Vec<u64> = {
            let map = self.enrolled.lock().expect("enrolled map lock");
            map.map.keys().filter_map(Result::ok).collect()
        };
        for c in cookies {
            if !all.contains(c) {
                all.push(*c);
            }
        }
        self.set_enrolled_netns(&all)
    }

    /// Makes the captured (VIP, port) set exactly `vips`.
    pub fn set_vips(&self, vips: &[(SocketAddr, u32)]) -> Result<(), Error> {
        let wanted = vips.iter().map(|(a, id)| {
            (
                vip_key(*a),
                VipValue {
                    svc_id: *id,
                    flags: 0,
                },
            )
        });
        let mut map = self.svc_vips.lock().expect("svc_vips map lock");
        map.replace_all(wanted.collect(), maps::SVC_VIPS)
    }

    /// Makes the captured address ranges exactly `cidrs`: ((network address, prefix length),
    /// port, service index).
    pub fn set_cidrs(&self, cidrs: &[CapturedRange]) -> Result<(), Error> {
        let wanted: std::collections::HashMap<(u32, CidrData), VipValue> = cidrs
            .iter()
            .map(|((net, len), port, id)| {
                let (addr, len) = match net {
                    IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 96 + u32::from(*len)),
                    IpAddr::V6(v6) => (v6.octets(), u32::from(*len)),
                };
                let data = CidrData {
                    port_be: port.to_be_bytes(),
                    addr,
                    _pad: [0; 2],
                };
                (
                    (16 + len, data),
                    VipValue {
                        svc_id: *id,
                        flags: 0,
                    },
                )
            })
            .collect();
        let mut guard = self.svc_cidrs.lock().expect("svc_cidrs map lock");
        let (map, written) = &mut *guard;
        let known: HashSet<(u32, CidrData)> = match written.take() {
            Some(w) => w,
            None => map
                .keys()
                .filter_map(Result::ok)
                .map(|k| (k.prefix_len(), k.data()))
                .collect(),
        };
        for (len, data) in known.iter().filter(|k| !wanted.contains_key(*k)) {
            let _ = map.remove(&LpmKey::new(*len, *data));
        }
        for ((len, data), v) in &wanted {
            map.insert(&LpmKey::new(*len, *data), *v, 0)
                .map_err(|source| Error::Map {
                    name: maps::SVC_CIDRS,
                    source,
                })?;
        }
        *written = Some(wanted.into_keys().collect());
        Ok(())
    }

    /// Unpins links this run did not ask for (left by an earlier run with another enrolment).
    pub fn prune_links(&self) -> Result<(), Error> {
        let wanted = self.wanted_links.lock().expect("links lock");
        let dir = self.pin_dir.join("links");
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !wanted.contains(&name) {
                tracing::info!(link = %name, "unpinning link not wanted by this configuration");
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    fn attach_all(
        &self,
        cgroup: &Path,
        programs: &[&'static str],
        scope: &str,
    ) -> Result<(), Error> {
        let file = File::open(cgroup).map_err(|e| Error::Cgroup {
            path: cgroup.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        for name in programs {
            let link_name = format!("{name}@{scope}");
            let path = self.pin_dir.join("links").join(&link_name);
            self.wanted_links
                .lock()
                .expect("links lock")
                .insert(link_name.clone());
            if path.exists() {
                match PinnedLink::from_pin(&path) {
                    Ok(link) => {
                        tracing::debug!(link = %link_name, "re-using pinned link");
                        self.links.lock().expect("links lock").push(link);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(link = %link_name, error = %e, "stale link pin; attaching again");
                        fs::remove_file(&path)?;
                    }
                }
            }
            let prog = ebpf.program_mut(name).expect("program checked at load");
            // Every cgroup program type has the same attach → take_link → FdLink steps; only
            // the program type differs.
            macro_rules! cgroup_link {
                ($p:expr) => {{
                    let id = $p
                        .attach(file.as_fd(), CgroupAttachMode::Single)
                        .map_err(|source| Error::Program { name, source })?;
                    let link = $p
                        .take_link(id)
                        .map_err(|source| Error::Program { name, source })?;
                    FdLink::try_from(link).map_err(|e| Error::Pin {
                        path: link_name.clone(),
                        reason: e.to_string(),
                    })?
                }};
            }
            let fd_link: FdLink = match prog {
                aya::programs::Program::CgroupSockAddr(p) => cgroup_link!(p),
                aya::programs::Program::SockOps(p) => cgroup_link!(p),
                aya::programs::Program::CgroupSock(p) => cgroup_link!(p),
                _ => unreachable!("only sock_addr, sockops and sock programs are attached"),
            };
            let pinned = fd_link.pin(&path).map_err(|e| Error::Pin {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            tracing::debug!(link = %link_name, cgroup = %cgroup.display(), "attached");
            self.links.lock().expect("links lock").push(pinned);
        }
        Ok(())
    }
}

impl OriginalDst for Kernel {
    fn original_dst(&self, netns_cookie: u64, stream: &TcpStream) -> Result<SocketAddr, Error> {
        let peer = stream.peer_addr()?;
        let key = tuple_key(netns_cookie, peer, stream.local_addr()?);
        let mut map = self.orig_by_tuple.lock().expect("orig_by_tuple map lock");
        let orig = map.get(&key, 0).map_err(|_| Error::NoOriginal { peer })?;
        // Read once: the record is of no further use and the LRU map stays small.
        let _ = map.remove(&key);
        Ok(words_addr(orig.addr, orig.port_be))
    }
}

/// The `SVC_VIPS` / `FAST_TABLES` key of a captured TCP address.
fn vip_key(a: SocketAddr) -> VipKey {
    VipKey {
        addr: addr_words(a),
        port_be: a.port().to_be(),
        proto: 6,
        _pad: 0,
    }
}

/// Makes a daemon-owned hash map hold exactly `wanted`: stale keys removed, the rest written.
/// A BPF hash map this process owns the content of, with a copy of what it last wrote: a
/// replacement touches only the entries that changed (the endpoint counters are mirrored every
/// second; 100 000 endpoints would otherwise cost 200 000 syscalls a second).
struct Mirror<K, V> {
    map: HashMap<MapData, K, V>,
    /// What the map holds, as far as this process knows; `None` until the first replacement,
    /// which reads the map (a previous daemon's pinned entries).
    written: Option<std::collections::HashMap<K, V>>,
}

impl<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod + PartialEq> Mirror<K, V> {
    fn new(map: HashMap<MapData, K, V>) -> Self {
        Self { map, written: None }
    }

    /// Makes the map hold exactly `wanted`.
    fn replace_all(
        &mut self,
        wanted: std::collections::HashMap<K, V>,
        name: &'static str,
    ) -> Result<(), Error> {
        let stale: Vec<K> = match &self.written {
            Some(w) => w
                .keys()
                .filter(|k| !wanted.contains_key(*k))
                .copied()
                .collect(),
            None => self
                .map
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !wanted.contains_key(k))
                .collect(),
        };
        for k in stale {
            let _ = self.map.remove(&k);
        }
        let written = self.written.take().unwrap_or_default();
        let result = wanted
            .iter()
            .filter(|(k, v)| written.get(*k) != Some(*v))
            .try_for_each(|(k, v)| {
                self.map
                    .insert(*k, *v, 0)
                    .map_err(|source| Error::Map { name, source })
            });
        // After a failed insert the map's content is unknown: read it again next time.
        self.written = result.is_ok().then_some(wanted);
        result
    }
}

pub(crate) fn take_map<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<M, Error> {
    let map = ebpf.take_map(name).ok_or(Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    M::try_from(map).map_err(|source| Error::Map { name, source })
}

/// The most verbose level the kernel programs log at: the most verbose one the daemon's log
/// filter can print when it starts (`log`'s maximum, set by the tracing subscriber). Above it the
/// programs emit nothing, so a connection costs no record the daemon would parse and drop (a
/// `debug` record per captured connect cost about 25 µs of the daemon's CPU).
fn kernel_log_level() -> u8 {
    use aya_log::Level;
    match log::max_level() {
        log::LevelFilter::Off => 0,
        log::LevelFilter::Error => Level::Error as u8,
        log::LevelFilter::Warn => Level::Warn as u8,
        log::LevelFilter::Info => Level::Info as u8,
        log::LevelFilter::Debug => Level::Debug as u8,
        log::LevelFilter::Trace => Level::Trace as u8,
    }
}

/// Forwards kernel log records into `tracing` (through the `log` bridge) whenever they arrive.
fn spawn_log_pump(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    #[expect(
        unsafe_code,
        reason = "tokio's AsyncFd registration is unsafe since 1.52"
    )]
    // SAFETY: the logger owns its ring-buffer fd for as long as it lives, and `as_raw_fd` always
    // returns that same fd; the AsyncFd owns the logger, so the fd outlives the registration.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        tracing::warn!("kernel log forwarding unavailable: cannot poll the log ring");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Names the capabilities the loader needs that this process lacks.
fn check_capabilities() -> Result<(), Error> {
    const NEEDED: [(u32, &str); 4] = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (38, "CAP_PERFMON"),
    ];
    let status = fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| eff & (1 << bit) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Privilege(format!(
            "{} (run drover as root, or grant these capabilities)",
            missing.join(", ")
        )))
    }
}

/// Checks that `dir` is a cgroup v2 directory; its inode number.
pub fn check_cgroup(dir: &Path) -> Result<u64, Error> {
    let cg_err = |reason: String| Error::Cgroup {
        path: dir.display().to_string(),
        reason,
    };
    let meta = fs::metadata(dir).map_err(|e| cg_err(e.to_string()))?;
    if fs_magic(dir).map_err(|e| cg_err(e.to_string()))? != CGROUP2_SUPER_MAGIC {
        return Err(cg_err("not a cgroup v2 directory".into()));
    }
    Ok(meta.ino())
}

/// Mounts bpffs at `/sys/fs/bpf` if the pin directory lives there and nothing is mounted.
/// Mounts bpffs at `path` unless it is one already; whether it mounted.
pub fn mount_bpffs(path: &Path) -> Result<bool, Error> {
    fs::create_dir_all(path)
        .map_err(|e| Error::Bpffs(format!("cannot create {}: {e}", path.display())))?;
    if fs_magic(path).map_err(|e| Error::Bpffs(e.to_string()))? == BPF_FS_MAGIC {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Bpffs(format!("mount bpffs at {}: {e}", path.display())))?;
    Ok(true)
}

fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let base = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(base) && mount_bpffs(base)? {
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        probe.pop();
    }
    if fs_magic(&probe).map_err(|e| Error::Bpffs(e.to_string()))? != BPF_FS_MAGIC {
        return Err(Error::Bpffs(format!(
            "{} is not on a bpf filesystem",
            pin_dir.display()
        )));
    }
    Ok(())
}

fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    Ok(st.filesystem_type().0 as i64)
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on pure v2, `/sys/fs/cgroup/unified` on hybrid).
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| Error::Cgroup {
            path: "/proc/self/mountinfo".into(),
            reason: "no cgroup v2 mount found".into(),
        })
}

/// The cgroup v2 directory this process runs in.
fn own_cgroup() -> Result<PathBuf, Error> {
    let root = cgroup2_root()?;
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Cgroup {
            path: "/proc/self/cgroup".into(),
            reason: "no cgroup v2 entry".into(),
        })?;
    Ok(root.join(rel.trim_start_matches('/')))
}

/// The cluster ids a previous daemon saved under `pin_dir` (none on a first start): read before
/// the first snapshot is built, so that every cluster gets its old id back.
pub fn restore_cluster_ids(pin_dir: &Path) -> Result<usize, Error> {
    let path = pin_dir.join(maps::CLUSTER_IDS);
    if !path.exists() {
        return Ok(0);
    }
    let map_err = |source| Error::Map {
        name: maps::CLUSTER_IDS,
        source,
    };
    let data = MapData::from_pin(&path).map_err(map_err)?;
    let map: HashMap<MapData, u64, u32> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err)?;
    let saved: Vec<(u64, u32)> = map.iter().filter_map(Result::ok).collect();
    let n = saved.len();
    crate::stats::store().restore_ids(saved);
    Ok(n)
}

/// Removes every pin (links detach, maps are freed once no program uses them); refused while a
/// daemon owns the directory.
pub fn uninstall(pin_dir: &Path) -> Result<bool, Error> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let _lock = PinLock::acquire(pin_dir)?;
    fs::remove_dir_all(pin_dir)?;
    Ok(true)
}

/// Exclusive ownership of a pin directory for the life of the process: an advisory `flock` on the
/// directory itself (bpffs holds no regular files), released by the kernel when the process
/// exits, however it exits.
#[derive(Debug)]
pub struct PinLock {
    _dir: nix::fcntl::Flock<File>,
    /// Whether the directory was created by this lock (nothing was pinned before).
    pub created: bool,
}

impl PinLock {
    /// Checks bpffs, creates `pin_dir` if needed and locks it; if another process holds it, the
    /// error names that process.
    pub fn acquire(pin_dir: &Path) -> Result<Self, Error> {
        check_capabilities()?;
        ensure_bpffs(pin_dir)?;
        let created = !pin_dir.exists();
        fs::create_dir_all(pin_dir)
            .map_err(|e| Error::Bpffs(format!("cannot create {}: {e}", pin_dir.display())))?;
        let dir = File::open(pin_dir)?;
        match nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(dir) => Ok(Self { _dir: dir, created }),
            Err((dir, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Locked {
                path: pin_dir.display().to_string(),
                owner: lock_owner(&dir).map_or_else(
                    || "another process".to_string(),
                    |pid| format!("{} (pid {pid})", process_name(pid)),
                ),
            }),
            Err((_, e)) => Err(Error::Io(e.into())),
        }
    }
}

/// The pid holding a `flock` on `file`, from `/proc/locks` (`… FLOCK ADVISORY WRITE PID
/// MAJ:MIN:INODE …`, major and minor in hex).
fn lock_owner(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        meta.ino()
    );
    let locks = fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let f: Vec<_> = line.split_whitespace().collect();
        // A blocked waiter's line starts with `N: ->`; only holders are wanted.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

fn process_name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_or_else(|_| "process".into(), |s| s.trim().to_string())
}

/// The inbound steering key of `ip` and `port` (0: every port).
fn inbound_key(ip: IpAddr, port: u16) -> InboundKey {
    InboundKey {
        addr: addr_words(SocketAddr::new(ip, 0)),
        port,
        _pad: 0,
    }
}
