//! `sockops` on the daemon's own upstream sockets (those carrying Drover's `SO_MARK`): per-endpoint
//! connection attempts, establishments, connect failures, closes, bytes, smoothed RTT and
//! retransmissions into the per-CPU `EP_KSTATS` map.
//!
//! Invariants: only marked sockets are counted (the program is attached to the daemon's cgroup,
//! which may hold other processes); the map is only ever incremented, so readers can sum CPUs.
//! [`count`] is shared with the fast path, which counts balanced sockets the same way.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::read_volatile;

use drover_common::{DROVER_MARK, EpKStats, EpKey, v4_mapped};

use crate::maps::EP_KSTATS;

/// A per-endpoint counter map (`EP_KSTATS`, or `EP_FSTATS` for fast-path sockets).
pub type Counters =
    aya_ebpf::btf_maps::LruPerCpuHashMap<EpKey, EpKStats, { drover_common::capacity::EP_KSTATS }>;

const AF_INET: u32 = 2;
const IPPROTO_TCP: u8 = 6;

#[sock_ops]
pub fn drover_upstream_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_upstream(&ctx);
    0
}

#[inline(always)]
fn try_upstream(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    let ops = ctx.ops;
    // SAFETY: `ops` is the kernel-provided context; `sk` may be null and is checked.
    let sk = unsafe { read_volatile(&raw const (*ops).__bindgen_anon_2.sk) };
    if sk.is_null() {
        return Err(());
    }
    // SAFETY: non-null `bpf_sock` pointer from the context; `mark` is a readable u32 field.
    let mark = unsafe { read_volatile(&raw const (*sk).mark) };
    if mark != DROVER_MARK {
        return Ok(());
    }
    count(ctx, &EP_KSTATS).map(|_| ())
}

/// A TCP event of a counted socket.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Connecting,
    Established,
    ConnectFailed,
    Closed,
    Other,
}

/// Counts this callback's event for the socket's remote endpoint in `map` (enabling the state
/// callback at connect time, so that failures and closes are seen).
#[inline(always)]
pub fn count(ctx: &SockOpsContext, map: &Counters) -> Result<Event, ()> {
    let ops = ctx.ops;
    let key = endpoint(ctx);
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            bump(map, &key, |s| s.attempts += 1)?;
            ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32)
                .map_err(|_| ())?;
            Ok(Event::Connecting)
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: plain u32 field of the context.
            let srtt = unsafe { read_volatile(&raw const (*ops).srtt_us) } >> 3;
            bump(map, &key, |s| {
                s.established += 1;
                s.srtt_us_sum += srtt as u64;
                s.srtt_samples += 1;
            })?;
            Ok(Event::Established)
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if ctx.arg(0) == BPF_TCP_SYN_SENT {
                bump(map, &key, |s| s.connect_failures += 1)?;
                return Ok(Event::ConnectFailed);
            }
            // SAFETY: plain fields of the context, read at fixed offsets.
            let (acked, received, srtt, retrans) = unsafe {
                (
                    read_volatile(&raw const (*ops).bytes_acked),
                    read_volatile(&raw const (*ops).bytes_received),
                    read_volatile(&raw const (*ops).srtt_us) >> 3,
                    read_volatile(&raw const (*ops).total_retrans),
                )
            };
            bump(map, &key, |s| {
                s.closed += 1;
                s.bytes_acked += acked;
                s.bytes_received += received;
                s.srtt_us_sum += srtt as u64;
                s.srtt_samples += 1;
                s.retrans += retrans as u64;
            })?;
            Ok(Event::Closed)
        }
        _ => Ok(Event::Other),
    }
}

/// The remote end of the socket as an `EP_KSTATS` key.
#[inline(always)]
fn endpoint(ctx: &SockOpsContext) -> EpKey {
    let ops = ctx.ops;
    // SAFETY: every field read is a plain u32 of the kernel-provided context; all are read
    // unconditionally so that each load keeps a fixed offset (see `sockops.rs`).
    let (r4, r6) = unsafe {
        (
            read_volatile(&raw const (*ops).remote_ip4),
            [0, 1, 2, 3].map(|i| read_volatile(&raw const (*ops).remote_ip6[i])),
        )
    };
    let v4 = ctx.family() == AF_INET;
    EpKey {
        addr: if v4 { v4_mapped(r4) } else { r6 },
        // remote_port is network order in the upper half.
        port_be: (ctx.remote_port() >> 16) as u16,
        proto: IPPROTO_TCP,
        family: if v4 { 4 } else { 6 },
    }
}

/// Applies `f` to this CPU's value for `key` in `map`, creating it first when absent.
#[inline(always)]
fn bump(map: &Counters, key: &EpKey, f: impl FnOnce(&mut EpKStats)) -> Result<(), ()> {
    let ptr = match map.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            // BPF_NOEXIST: another CPU may have created it meanwhile; then use that one.
            let _ = map.insert(key, EpKStats::default(), 1);
            map.get_ptr_mut(key).ok_or(())?
        }
    };
    // SAFETY: pointer from a successful lookup of this CPU's slot; per-CPU, so no other writer.
    f(unsafe { &mut *ptr });
    Ok(())
}
