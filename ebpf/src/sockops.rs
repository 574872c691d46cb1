//! `sockops` on application sockets: once a captured connection is established, re-key its
//! original destination by 4-tuple + netns cookie so the daemon can find it after `accept()`;
//! forget the cookie entry when the socket closes. Sockets the fast path balanced are counted
//! per endpoint (`EP_FSTATS`), report their connect outcome, drop the connect timeout once
//! established and release their connection slot when they close.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::read_volatile;

use drover_common::{
    TupleKey,
    fast::{flags as fast_flags, outcome},
    v4_mapped,
};

use crate::{
    fast,
    maps::{EP_FSTATS, ORIG_BY_COOKIE, ORIG_BY_TUPLE},
    upstream::{self, Event},
};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn drover_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    0
}

#[inline(always)]
fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    // SAFETY: helper valid for sockops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(s) = fast::sock(cookie) {
        return balanced(ctx, cookie, &s);
    }
    match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let orig = ORIG_BY_COOKIE.get_ptr(cookie).ok_or(())?;
            // SAFETY: pointer returned by a successful lookup.
            let orig = unsafe { *orig };
            // Read every field unconditionally and select values afterwards: letting the compiler
            // pick the field offset at run time produces a context access the verifier rejects.
            // Volatile reads keep each load at its own fixed offset.
            let ops = ctx.ops;
            // SAFETY: `ops` is the kernel-provided context; every field read is a plain u32.
            let (l4, r4, l6, r6) = unsafe {
                (
                    read_volatile(&raw const (*ops).local_ip4),
                    read_volatile(&raw const (*ops).remote_ip4),
                    [0, 1, 2, 3].map(|i| read_volatile(&raw const (*ops).local_ip6[i])),
                    [0, 1, 2, 3].map(|i| read_volatile(&raw const (*ops).remote_ip6[i])),
                )
            };
            let v4 = ctx.family() == AF_INET;
            let src = if v4 { v4_mapped(l4) } else { l6 };
            let dst = if v4 { v4_mapped(r4) } else { r6 };
            let key = TupleKey {
                netns_cookie: orig.netns_cookie,
                src,
                dst,
                // local_port is host order; remote_port is network order in the upper half.
                sport_be: (ctx.local_port() as u16).to_be(),
                dport_be: (ctx.remote_port() >> 16) as u16,
                _pad: 0,
            };
            ORIG_BY_TUPLE.insert(key, orig, 0).map_err(|_| ())?;
            ctx.set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32)
                .map_err(|_| ())?;
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = ORIG_BY_COOKIE.remove(cookie);
            }
        }
        _ => {}
    }
    Ok(())
}

/// A socket the fast path balanced: counters, outcome, connect timeout, release at close.
#[inline(always)]
fn balanced(ctx: &SockOpsContext, cookie: u64, s: &drover_common::FastSock) -> Result<(), ()> {
    match upstream::count(ctx, &EP_FSTATS)? {
        Event::Established => {
            fast::report(s, outcome::CONNECTED);
            if s.flags & fast_flags::CONNECT_TIMEOUT != 0 {
                // The connect timeout must not outlive the handshake.
                fast::set_user_timeout(ctx.as_ptr(), 0);
            }
        }
        Event::ConnectFailed => {
            fast::report(s, outcome::FAILED);
            fast::release(cookie, true);
            let _ = ORIG_BY_COOKIE.remove(cookie);
        }
        Event::Closed => {
            fast::release(cookie, true);
            let _ = ORIG_BY_COOKIE.remove(cookie);
        }
        Event::Connecting | Event::Other => {}
    }
    Ok(())
}
