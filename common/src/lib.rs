//! Types shared by Drover's kernel programs (`ebpf/`) and the daemon.
//!
//! Every key and value is `#[repr(C)]` with explicit, zeroed padding and a compile-time size check:
//! the kernel compares keys byte for byte, so stray padding bytes would make lookups miss. Addresses
//! are always 16 bytes in network order; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`). Changing any
//! layout here requires bumping [`PIN_VERSION`], because aya reuses pinned maps without checking sizes.
#![no_std]

/// Layout version of the pinned maps; part of the pin directory (`/sys/fs/bpf/drover/v1`).
pub const PIN_VERSION: &str = "v1";
/// Default pin directory for maps; links live in its `links/` child.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/drover/v1";
/// `SO_MARK` carried by every socket the daemon creates; the kernel programs never capture them.
pub const DROVER_MARK: u32 = 0x4452;
/// Port of the outbound capture listener inside every enrolled network namespace.
pub const PROXY_PORT: u16 = 15001;

/// Map names, as they appear in the object and under the pin directory.
pub mod maps {
    pub const CONFIG: &str = "CONFIG";
    pub const SVC_VIPS: &str = "SVC_VIPS";
    pub const ENROLLED: &str = "ENROLLED";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "ORIG_BY_TUPLE";
    /// Every map, for pinning and cleanup.
    pub const ALL: [&str; 5] = [CONFIG, SVC_VIPS, ENROLLED, ORIG_BY_COOKIE, ORIG_BY_TUPLE];
}

/// Capacities of the maps.
pub mod capacity {
    pub const SVC_VIPS: u32 = 65_536;
    pub const ENROLLED: u32 = 16_384;
    pub const ORIG_BY_COOKIE: u32 = 262_144;
    pub const ORIG_BY_TUPLE: u32 = 262_144;
}

/// Bits of [`Config::flags`].
pub mod flags {
    /// Leave a captured connect alone when no listener exists in its network namespace.
    pub const FAIL_OPEN: u32 = 1 << 0;
}

/// Bits of [`OrigDst::flags`].
pub mod orig_flags {
    /// The application socket was AF_INET6 (native IPv6 or v4-mapped destination).
    pub const FAMILY_V6_SOCKET: u8 = 1 << 0;
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

/// Value of `SVC_VIPS`.
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
    unsafe impl aya::Pod for super::VipValue {}
    unsafe impl aya::Pod for super::Enrolment {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::TupleKey {}
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
