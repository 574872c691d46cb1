//! `cgroup/getpeername4` and `cgroup/getpeername6`: a captured socket reports the VIP it dialled,
//! not the listener or endpoint it was steered to. Only sockets with an `ORIG_BY_COOKIE` entry are
//! touched.

use aya_ebpf::{
    EbpfContext, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use drover_common::{as_v4, orig_flags};

use crate::maps::{CONFIG, ORIG_BY_COOKIE};

const ALLOW: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn drover_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn drover_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, true);
    ALLOW
}

#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Result<(), ()> {
    let cfg = CONFIG.get(0).ok_or(())?;
    // SAFETY: kernel-provided context pointer.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = ORIG_BY_COOKIE.get_ptr(cookie).ok_or(())?;
    // SAFETY: pointer returned by a successful lookup.
    let orig = unsafe { *orig };
    // A captured socket is connected to the listener; a balanced one to its endpoint.
    if sa.user_port != cfg.proxy_port.to_be() as u32 && orig.flags & orig_flags::FAST == 0 {
        return Ok(());
    }
    if v6 {
        sa.user_ip6[0] = orig.addr[0];
        sa.user_ip6[1] = orig.addr[1];
        sa.user_ip6[2] = orig.addr[2];
        sa.user_ip6[3] = orig.addr[3];
    } else {
        sa.user_ip4 = as_v4(&orig.addr).ok_or(())?;
    }
    sa.user_port = orig.port_be as u32;
    Ok(())
}
