//! Drover's kernel programs: capture a workload's `connect()` to a service VIP, rewrite it to the
//! daemon's listener, record the original destination, and give it back to `getpeername()`.
//!
//! Each entry point is a thin wrapper over a fallible `try_*` body; a body that fails never rewrites
//! a connect (so an error can at worst leave a connection uncaptured, never unroutable).
#![no_std]
#![no_main]
// Atomic read-modify-write on map values: the BPF target's `core` has no atomic types with RMW.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect;
mod fast;
mod inbound;
mod maps;
mod peername;
mod sockmap;
mod sockops;
mod upstream;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it only satisfies `no_std`.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
