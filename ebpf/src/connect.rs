//! `cgroup/connect4` and `cgroup/connect6`: the capture decision.
//!
//! Order (cheap checks first): TCP only → daemon ready → not a Drover socket (`SO_MARK`) → enrolled
//! (netns gate for root attachments; cgroup attachments are their own gate) → VIP listed in
//! `SVC_VIPS` → the kernel fast path (a VIP with a published table is balanced straight to an
//! endpoint, see `fast`) → (fail-open) a listener exists → record the original destination →
//! rewrite to the listener.
//! Invariants: the destination is rewritten only after the original was recorded; a map
//! operation that fails on the way fails the connect (`EPERM`), counted in `KERNEL_ERRORS`,
//! unless the daemon runs with `--fail-open` (then the connect is left alone, counted too).

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple},
    helpers::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use drover_common::{
    CIDR_FULL_PREFIX, CidrData, DROVER_MARK, LOOPBACK4_RAW, LOOPBACK6_RAW, OrigDst, VipKey, as_v4,
    flags, kernel_errors, orig_flags, v4_mapped,
};

use crate::{
    fast::{self, Verdict},
    maps::{CONFIG, ENROLLED_NETNS, KERNEL_ERRORS, ORIG_BY_COOKIE, SVC_CIDRS, SVC_VIPS},
};

const ALLOW: i32 = 1;
/// The connect fails with `EPERM` (a fast-path cluster at its connection cap).
const DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

/// Where a program instance is attached: root attachments capture only enrolled network namespaces.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Cgroup,
    Root,
}

#[cgroup_sock_addr(connect4)]
pub fn drover_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, false, Scope::Cgroup))
}

#[cgroup_sock_addr(connect6)]
pub fn drover_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, true, Scope::Cgroup))
}

#[cgroup_sock_addr(connect4)]
pub fn drover_connect4_netns(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, false, Scope::Root))
}

#[cgroup_sock_addr(connect6)]
pub fn drover_connect6_netns(ctx: SockAddrContext) -> i32 {
    verdict(try_connect(&ctx, true, Scope::Root))
}

/// The program's answer: a fast-path refusal fails the connect, and so does a failed map
/// operation (the [`kernel_errors`] kind in `Err`) unless the daemon asked to fail open.
#[inline(always)]
fn verdict(r: Result<Verdict, u32>) -> i32 {
    match r {
        Ok(Verdict::Refused) => DENY,
        Ok(_) => ALLOW,
        Err(kind) => {
            if let Some(n) = KERNEL_ERRORS.get_ptr_mut(kind) {
                // SAFETY: a per-CPU slot of this CPU; programs of one CPU do not interleave.
                unsafe { *n += 1 };
            }
            let fail_open = CONFIG
                .get(0)
                .is_some_and(|c| c.flags & flags::FAIL_OPEN != 0);
            if fail_open { ALLOW } else { DENY }
        }
    }
}

/// `Proxy` when the connect was captured (or left alone), `Balanced`/`Refused` from the fast path.
#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool, scope: Scope) -> Result<Verdict, u32> {
    // SAFETY: `sock_addr` is the kernel-provided context pointer, valid for this program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return Ok(Verdict::Proxy);
    }
    let cfg = CONFIG.get(0).ok_or(kernel_errors::CONFIG)?;
    if cfg.ready == 0 {
        return Ok(Verdict::Proxy);
    }
    if socket_mark(ctx) == Some(DROVER_MARK) {
        return Ok(Verdict::Proxy);
    }
    // SAFETY: helper valid for sock_addr programs (kernel >= 5.7).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if scope == Scope::Root && ENROLLED_NETNS.get_ptr(netns_cookie).is_none() {
        return Ok(Verdict::Proxy);
    }

    let addr = if v6 {
        // Copy word by word: the verifier rejects derived pointers into the context.
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    } else {
        v4_mapped(sa.user_ip4)
    };
    let port_be = sa.user_port as u16;
    let key = VipKey {
        addr,
        port_be,
        proto: IPPROTO_TCP as u8,
        _pad: 0,
    };
    let svc_id = match SVC_VIPS.get_ptr(key) {
        // SAFETY: pointer returned by a successful map lookup.
        Some(vip) => unsafe { (*vip).svc_id },
        None => match cidr_service(&addr, port_be) {
            Some(id) => id,
            None => return Ok(Verdict::Proxy),
        },
    };
    let v4 = as_v4(&addr);
    let orig = OrigDst {
        addr,
        port_be,
        family: if v4.is_some() { 4 } else { 6 },
        flags: if v6 { orig_flags::FAMILY_V6_SOCKET } else { 0 },
        svc_id,
        netns_cookie,
    };
    match fast::try_balance(ctx, &key, &orig, v6)? {
        Verdict::Proxy => {}
        done => return Ok(done),
    }

    if cfg.flags & flags::FAIL_OPEN != 0
        && !listener_present(ctx, v6 && v4.is_none(), cfg.proxy_port)
    {
        debug!(
            ctx,
            "fail-open: no listener, connect left alone (svc {})", svc_id
        );
        return Ok(Verdict::Proxy);
    }

    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE
        .insert(cookie, orig, 0)
        .map_err(|_| kernel_errors::ORIG_RECORD)?;

    let proxy_port_be = (cfg.proxy_port.to_be()) as u32;
    if !v6 {
        sa.user_ip4 = LOOPBACK4_RAW;
    } else if v4.is_some() {
        let mapped = v4_mapped(LOOPBACK4_RAW);
        sa.user_ip6[0] = mapped[0];
        sa.user_ip6[1] = mapped[1];
        sa.user_ip6[2] = mapped[2];
        sa.user_ip6[3] = mapped[3];
    } else {
        sa.user_ip6[0] = LOOPBACK6_RAW[0];
        sa.user_ip6[1] = LOOPBACK6_RAW[1];
        sa.user_ip6[2] = LOOPBACK6_RAW[2];
        sa.user_ip6[3] = LOOPBACK6_RAW[3];
    }
    sa.user_port = proxy_port_be;
    debug!(
        ctx,
        "captured connect to svc {} (cookie {})", svc_id, cookie
    );
    Ok(Verdict::Proxy)
}

/// The service of the longest captured range that holds `addr` on port `port_be`.
#[inline(always)]
fn cidr_service(addr: &[u32; 4], port_be: u16) -> Option<u32> {
    let mut bytes = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        let b = w.to_ne_bytes();
        bytes[i * 4] = b[0];
        bytes[i * 4 + 1] = b[1];
        bytes[i * 4 + 2] = b[2];
        bytes[i * 4 + 3] = b[3];
    }
    let key = Key::new(
        CIDR_FULL_PREFIX,
        CidrData {
            port_be: port_be.to_ne_bytes(),
            addr: bytes,
            _pad: [0; 2],
        },
    );
    SVC_CIDRS.get(key).map(|v| v.svc_id)
}

/// The socket's `SO_MARK`, if it can be read.
#[inline(always)]
fn socket_mark(ctx: &SockAddrContext) -> Option<u32> {
    let mut mark: u32 = 0;
    // SAFETY: `mark` is a valid 4-byte buffer; helper allowed in sock_addr programs.
    let rc = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&mut mark as *mut u32).cast(),
            core::mem::size_of::<u32>() as i32,
        )
    };
    if rc == 0 { Some(mark) } else { None }
}

/// Whether the capture listener exists in the caller's network namespace (fail-open check).
#[inline(always)]
fn listener_present(ctx: &SockAddrContext, native_v6: bool, proxy_port: u16) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if native_v6 {
        tuple.__bindgen_anon_1.ipv6.daddr = LOOPBACK6_RAW;
        tuple.__bindgen_anon_1.ipv6.dport = proxy_port.to_be();
        core::mem::size_of::<[u32; 4]>() * 2 + 4
    } else {
        tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK4_RAW;
        tuple.__bindgen_anon_1.ipv4.dport = proxy_port.to_be();
        12
    };
    // SAFETY: tuple lives on the stack for the duration of the call; the returned socket is
    // released before returning.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            false
        } else {
            bpf_sk_release(sk.cast());
            true
        }
    }
}
