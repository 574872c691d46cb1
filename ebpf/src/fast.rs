//! The kernel fast path: a connect to a VIP with a `FAST_TABLES` entry is balanced here, straight
//! to an endpoint, with the cluster's connection cap reserved before the rewrite.
//!
//! Invariants:
//! - a reservation is taken with one atomic fetch-and-add and undone at once when over the cap,
//!   so the number of sockets holding a slot never exceeds `max_connections`. Adds whose result
//!   is used are sequentially consistent: LLVM 22 emits a relaxed one as the non-fetching BPF
//!   add and keeps using the register as if it held the old value (checked with
//!   `llvm-objdump`: `BPF_FETCH` appears only for SeqCst);
//! - every reservation is recorded in `FAST_SOCKS` under the socket's cookie before the
//!   destination is rewritten, and released exactly once: by whoever deletes that record first
//!   (the `sockops` close callback, or `cgroup/sock_release` as the catch-all);
//! - a table with no endpoints, a full record map or an IPv6 endpoint for an IPv4 socket leave
//!   the connect to the proxied path (nothing reserved); a cluster counter that cannot be
//!   created is an error (the connect fails closed, see `connect`).

use core::{
    intrinsics::{
        AtomicOrdering::{Relaxed, SeqCst},
        atomic_xadd,
    },
    ptr::read_volatile,
};

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_setsockopt},
    macros::cgroup_sock,
    programs::{SockAddrContext, SockContext},
};
use drover_common::{
    EpKey, FastCluster, FastEndpoint, FastEvent, FastSock, FastTable, OrigDst, VipKey, as_v4,
    fast::{self, lb},
    kernel_errors, orig_flags,
};

use crate::maps::{
    FAST_ACTIVE, FAST_CLUSTERS, FAST_EVENTS, FAST_SOCKS, FAST_TABLES, ORIG_BY_COOKIE,
};

const IPPROTO_TCP: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;
const BPF_NOEXIST: u64 = 1;
const IPPROTO_TCP_U8: u8 = 6;
const TCP_CLOSE: u32 = 7;

/// What the fast path did with a connect.
pub enum Verdict {
    /// Not a fast-path VIP, or left to the proxy: capture as usual.
    Proxy,
    /// Rewritten to an endpoint.
    Balanced,
    /// The cluster's connections are at their cap: the connect fails.
    Refused,
}

/// Balances a connect to `key` if the daemon published a table for it. `orig` is the record the
/// capture path would have written (kept for `getpeername`).
#[inline(always)]
pub fn try_balance(
    ctx: &SockAddrContext,
    key: &VipKey,
    orig: &OrigDst,
    v6_socket: bool,
) -> Result<Verdict, u32> {
    let Some(table) = FAST_TABLES.get_ptr_mut(key) else {
        return Ok(Verdict::Proxy);
    };
    // SAFETY: pointer from a successful lookup; only scalar fields are read through it, and the
    // cursor is advanced atomically.
    let t = unsafe { &mut *table };
    let n = t.n;
    if n == 0 {
        return Ok(Verdict::Proxy);
    }
    let ep = t.endpoints[pick(t, orig.netns_cookie) & (fast::MAX_ENDPOINTS - 1)];
    let passthrough = t.lb == lb::PASSTHROUGH;
    let (addr, port_be) = if passthrough {
        (orig.addr, ep.port_be)
    } else {
        (ep.addr, ep.port_be)
    };
    if !v6_socket && as_v4(&addr).is_none() {
        return Ok(Verdict::Proxy);
    }
    if !reserve(&ep)? {
        return Ok(Verdict::Refused);
    }
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let endpoint = EpKey {
        addr,
        port_be,
        proto: IPPROTO_TCP_U8,
        family: if as_v4(&addr).is_some() { 4 } else { 6 },
    };
    let timeout = t.connect_timeout_ms;
    let sock = FastSock {
        cluster_id: ep.cluster_id,
        flags: t.flags
            | if timeout != 0 {
                fast::flags::CONNECT_TIMEOUT
            } else {
                0
            },
        endpoint,
        held: 1,
    };
    if FAST_SOCKS.insert(cookie, sock, BPF_NOEXIST).is_err() {
        unreserve(ep.cluster_id);
        return Ok(Verdict::Proxy);
    }
    let mut orig = *orig;
    orig.flags |= orig_flags::FAST;
    let _ = ORIG_BY_COOKIE.insert(cookie, orig, 0);
    add(active_slot(&endpoint), 1);
    if timeout != 0 {
        set_user_timeout(ctx.as_ptr(), timeout);
    }
    rewrite(ctx, &addr, port_be, v6_socket);
    Ok(Verdict::Balanced)
}

/// The index into the table's endpoints for this connect.
#[inline(always)]
fn pick(t: &mut FastTable, netns_cookie: u64) -> usize {
    let len = t.ring_len.max(1);
    let slot = |r: u32| t.ring[(r % len) as usize & (fast::RING - 1)] as usize;
    match t.lb {
        lb::ROUND_ROBIN => {
            // SAFETY: the cursor is a naturally aligned u32 inside the map value.
            slot(unsafe { atomic_xadd::<u32, u32, { SeqCst }>(&raw mut t.cursor, 1) })
        }
        lb::LEAST_REQUEST => {
            // SAFETY: helper without arguments.
            let (a, b) = unsafe { (slot(bpf_get_prandom_u32()), slot(bpf_get_prandom_u32())) };
            let load = |i: usize| {
                let ep = &t.endpoints[i & (fast::MAX_ENDPOINTS - 1)];
                let key = EpKey {
                    addr: ep.addr,
                    port_be: ep.port_be,
                    proto: IPPROTO_TCP_U8,
                    family: ep.family,
                };
                // SAFETY: pointer from a successful lookup; an aligned 8-byte load is atomic.
                FAST_ACTIVE
                    .get_ptr(&key)
                    .map_or(0, |p| unsafe { read_volatile(p) })
            };
            if load(b) < load(a) { b } else { a }
        }
        lb::HASH => slot(mix(netns_cookie)),
        lb::PASSTHROUGH => 0,
        // SAFETY: helper without arguments.
        _ => slot(unsafe { bpf_get_prandom_u32() }),
    }
}

/// A 32-bit mix of the client's network namespace cookie (the client identity `useSourceIp`
/// stands for: one pod, one address).
#[inline(always)]
fn mix(mut x: u64) -> u32 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x as u32
}

/// Takes a connection slot of `ep`'s cluster; `false` (and the overflow counted) at the cap;
/// `Err` when the cluster's counter cannot be created (`FAST_CLUSTERS` full).
#[inline(always)]
fn reserve(ep: &FastEndpoint) -> Result<bool, u32> {
    let c = cluster(ep.cluster_id)?;
    // SAFETY: `c` points into a map value; its fields are naturally aligned u64s.
    let (active, overflow, total) = unsafe {
        (
            &raw mut (*c).active,
            &raw mut (*c).overflow,
            &raw mut (*c).total,
        )
    };
    // SAFETY: `active` points into a map value, a naturally aligned u32.
    let before = unsafe { atomic_xadd::<u32, u32, { SeqCst }>(active, 1) };
    if ep.max_connections != 0 && before >= ep.max_connections {
        add32(active, u32::MAX);
        fetch_add(overflow, 1);
        return Ok(false);
    }
    fetch_add(total, 1);
    Ok(true)
}

fn unreserve(cluster_id: u32) {
    if let Some(c) = FAST_CLUSTERS.get_ptr_mut(cluster_id) {
        // SAFETY: pointer from a successful lookup.
        add32(unsafe { &raw mut (*c).active }, u32::MAX);
    }
}

/// The cluster's counters, created on first use.
#[inline(always)]
fn cluster(id: u32) -> Result<*mut FastCluster, u32> {
    if let Some(c) = FAST_CLUSTERS.get_ptr_mut(id) {
        return Ok(c);
    }
    // BPF_NOEXIST: a concurrent connect may have created it; then that one is used.
    let _ = FAST_CLUSTERS.insert(id, FastCluster::default(), BPF_NOEXIST);
    FAST_CLUSTERS
        .get_ptr_mut(id)
        .ok_or(kernel_errors::FAST_CLUSTER)
}

/// The open-connection counter of an endpoint, created on first use.
#[inline(always)]
fn active_slot(key: &EpKey) -> Option<*mut u64> {
    if let Some(p) = FAST_ACTIVE.get_ptr_mut(key) {
        return Some(p);
    }
    let _ = FAST_ACTIVE.insert(key, 0, BPF_NOEXIST);
    FAST_ACTIVE.get_ptr_mut(key)
}

#[inline(always)]
fn add(slot: Option<*mut u64>, delta: i64) {
    if let Some(p) = slot {
        fetch_add(p, delta as u64);
    }
}

/// An atomic add (wrapping: `u64::MAX` subtracts one); `p` must point into a map value. The
/// previous value is not used: 64-bit fetching adds need BPF v3, 32-bit ones only `alu32`.
#[inline(always)]
fn fetch_add(p: *mut u64, v: u64) {
    // SAFETY: callers pass pointers into map values, naturally aligned u64s.
    unsafe { atomic_xadd::<u64, u64, { Relaxed }>(p, v) };
}

#[inline(always)]
fn add32(p: *mut u32, v: u32) {
    // SAFETY: callers pass pointers into map values, naturally aligned u32s.
    unsafe { atomic_xadd::<u32, u32, { Relaxed }>(p, v) };
}

/// Releases the slot the socket `cookie` holds, if it still does (exactly once per socket: the
/// caller that takes `held` from 1 releases), and forgets the socket when `forget`.
#[inline(always)]
pub fn release(cookie: u64, forget: bool) {
    let Some(s) = FAST_SOCKS.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: pointer from a successful lookup; `held` is a naturally aligned u32.
    let (held, cluster_id, endpoint) =
        unsafe { (&raw mut (*s).held, (*s).cluster_id, (*s).endpoint) };
    // SAFETY: see above; sequentially consistent so that the old value is fetched.
    if unsafe { atomic_xadd::<u32, u32, { SeqCst }>(held, u32::MAX) } == 1 {
        unreserve(cluster_id);
        add(FAST_ACTIVE.get_ptr_mut(&endpoint), -1);
    }
    if forget {
        let _ = FAST_SOCKS.remove(cookie);
    }
}

/// The reservation of a balanced socket, if `cookie` is one.
#[inline(always)]
pub fn sock(cookie: u64) -> Option<FastSock> {
    // SAFETY: pointer from a successful lookup, copied at once.
    FAST_SOCKS.get_ptr(cookie).map(|p| unsafe { *p })
}

/// Reports a connect outcome to the daemon's outlier detector (when the table asked for it).
#[inline(always)]
pub fn report(s: &FastSock, kind: u32) {
    if s.flags & fast::flags::OUTCOMES == 0 {
        return;
    }
    let ev = FastEvent {
        cluster_id: s.cluster_id,
        kind,
        endpoint: s.endpoint,
        _pad: 0,
    };
    let _ = FAST_EVENTS.output::<FastEvent>(&ev, 0);
}

/// Sets `TCP_USER_TIMEOUT` (the connect timeout while in SYN_SENT; cleared once established).
#[inline(always)]
pub fn set_user_timeout(sk: *mut core::ffi::c_void, ms: u32) {
    let mut v = ms as i32;
    // SAFETY: `v` is a valid 4-byte buffer; helper allowed in sock_addr and sockops programs.
    unsafe {
        bpf_setsockopt(
            sk,
            IPPROTO_TCP,
            TCP_USER_TIMEOUT,
            (&mut v as *mut i32).cast(),
            4,
        );
    }
}

#[inline(always)]
fn rewrite(ctx: &SockAddrContext, addr: &[u32; 4], port_be: u16, v6_socket: bool) {
    // SAFETY: kernel-provided context pointer, valid for this program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if v6_socket {
        sa.user_ip6[0] = addr[0];
        sa.user_ip6[1] = addr[1];
        sa.user_ip6[2] = addr[2];
        sa.user_ip6[3] = addr[3];
    } else {
        sa.user_ip4 = addr[3];
    }
    sa.user_port = port_be as u32;
}

/// `cgroup/sock_release`: the application closed a balanced socket. Its slot is released now;
/// its record stays for the close callback to count the connection, unless the socket is
/// already closed (it will get no more callbacks).
#[cgroup_sock(sock_release)]
pub fn drover_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: `sock` is the kernel-provided context; `state` is a readable u32 field.
    let state = unsafe { read_volatile(&raw const (*ctx.sock).state) };
    release(cookie, state == TCP_CLOSE);
    1
}
