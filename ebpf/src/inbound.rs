//! `sk_lookup` in every namespace that hosts enrolled workloads: inbound TCP to a workload
//! address and a port listed for it (or to any port but Drover's own, for a pod enrolled whole)
//! is handed to Drover's inbound listener for that address (15006, in the workload's namespace)
//! instead of the workload's socket, keeping the original destination address, so Drover can
//! terminate mesh mTLS and forward plaintext.
//!
//! Invariant: a connection whose source address equals its destination address is Drover's own
//! forward connection to the workload (made from inside the namespace) and is never steered, so
//! nothing loops; an address with no listener is never steered.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use core::ptr::read_volatile;

use drover_common::{InboundKey, RESERVED_PORTS, v4_mapped};

use crate::maps::{INBOUND_LISTENERS, INBOUND_PORTS};

const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn drover_inbound(ctx: SkLookupContext) -> u32 {
    let _ = try_inbound(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_inbound(ctx: &SkLookupContext) -> Result<(), i32> {
    let l = ctx.lookup;
    // SAFETY: `l` is the kernel-provided context; every field is read at its fixed offset.
    let (family, protocol, port, r4, l4, r6, l6) = unsafe {
        (
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).remote_ip4),
            read_volatile(&raw const (*l).local_ip4),
            [0, 1, 2, 3].map(|i| read_volatile(&raw const (*l).remote_ip6[i])),
            [0, 1, 2, 3].map(|i| read_volatile(&raw const (*l).local_ip6[i])),
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let own = if family == AF_INET {
        r4 == l4
    } else {
        r6 == l6
    };
    if own {
        return Ok(());
    }
    let addr = if family == AF_INET { v4_mapped(l4) } else { l6 };
    let port = port as u16;
    let mut key = InboundKey {
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: plain lookups; the values are not kept.
    let listed = unsafe { INBOUND_PORTS.get(&key) }.is_some() || {
        key.port = 0;
        !RESERVED_PORTS.contains(&port) && unsafe { INBOUND_PORTS.get(&key) }.is_some()
    };
    if !listed {
        return Ok(());
    }
    key.port = 0;
    INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0)
}
