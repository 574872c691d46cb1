//! The sockmap relay experiment (`drover-bench --only sockmap`): an `sk_skb` stream verdict
//! that moves every byte arriving on one socket of a relayed pair to the egress of the other,
//! inside the kernel. Pairs are written by the experiment only; the daemon never attaches this.
//!
//! Invariant: a socket with no peer record gets `SK_PASS` (its bytes stay in its own receive
//! queue for userspace), never `SK_DROP`: the kernel has already acknowledged them.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, SockHash},
    programs::SkBuffContext,
};

/// `SK_PASS`.
const PASS: u32 = 1;

/// The relayed sockets, by socket cookie.
#[map]
pub static RELAY_SOCKS: SockHash<u64> = SockHash::with_max_entries(4096, 0);

/// Socket cookie → the cookie of the socket its bytes go to.
#[map]
pub static RELAY_PEERS: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

#[stream_verdict]
pub fn drover_relay_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: helper valid for sk_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(peer) = RELAY_PEERS.get_ptr(cookie) else {
        return PASS;
    };
    // SAFETY: pointer from a successful lookup.
    let peer = unsafe { *peer };
    // To the egress of the peer (flags 0). `SK_PASS` carries out a redirect the helper set up;
    // after a failed one it keeps the bytes in this socket's own queue instead of dropping them.
    let _ = RELAY_SOCKS.redirect_skb(&ctx, peer, 0);
    PASS
}
