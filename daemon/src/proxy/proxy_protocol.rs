//! The PROXY protocol header (HAProxy's, versions 1 and 2) that a DestinationRule's
//! `proxyProtocol` asks for on each upstream connection: the downstream client's address as the
//! source and the address it dialed (the original destination) as the destination.
//!
//! Invariants: an encoder only (Drover never parses the header); v1 is one ASCII line ending in
//! CRLF; v2 is the 12-byte signature, version/command, family and a big-endian length that
//! counts exactly the address block that follows. An unknown or mixed-family source gives v1's
//! `UNKNOWN` line and v2's `LOCAL` command, as the specification asks.

use std::net::SocketAddr;

use crate::config::policy::ProxyProtocolVersion;

/// Version 2's fixed signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header for a connection from `src` (when known) to `dst`.
pub fn header(version: ProxyProtocolVersion, src: Option<SocketAddr>, dst: SocketAddr) -> Vec<u8> {
    let pair = src.map(|s| (canonical(s), canonical(dst)));
    match version {
        ProxyProtocolVersion::V1 => v1(pair),
        ProxyProtocolVersion::V2 => v2(pair),
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn v1(pair: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    match pair {
        Some((s, d)) if s.is_ipv4() == d.is_ipv4() => {
            let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
            .into_bytes()
        }
        _ => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

fn v2(pair: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    let addresses: Option<(u8, Vec<u8>)> = match pair {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            Some((0x11, [&s.ip().octets()[..], &d.ip().octets()[..]].concat()))
        }
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
            Some((0x21, [&s.ip().octets()[..], &d.ip().octets()[..]].concat()))
        }
        _ => None,
    };
    match (addresses, pair) {
        (Some((family, mut block)), Some((s, d))) => {
            block.extend_from_slice(&s.port().to_be_bytes());
            block.extend_from_slice(&d.port().to_be_bytes());
            // Version 2, command PROXY.
            out.extend_from_slice(&[0x21, family]);
            out.extend_from_slice(&(block.len() as u16).to_be_bytes());
            out.extend_from_slice(&block);
        }
        // Version 2, command LOCAL, family UNSPEC, no addresses.
        _ => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn version_1_is_one_line_per_family() {
        let h = header(
            ProxyProtocolVersion::V1,
            Some(sa("198.18.0.2:40000")),
            sa("127.77.0.10:80"),
        );
        assert_eq!(h, b"PROXY TCP4 198.18.0.2 127.77.0.10 40000 80\r\n");
        let h = header(
            ProxyProtocolVersion::V1,
            Some(sa("[fd00::2]:5")),
            sa("[::1]:6"),
        );
        assert_eq!(h, b"PROXY TCP6 fd00::2 ::1 5 6\r\n");
        // A v4-mapped source is IPv4.
        let h = header(
            ProxyProtocolVersion::V1,
            Some(sa("[::ffff:198.18.0.2]:1")),
            sa("127.77.0.10:2"),
        );
        assert_eq!(h, b"PROXY TCP4 198.18.0.2 127.77.0.10 1 2\r\n");
        assert_eq!(
            header(ProxyProtocolVersion::V1, None, sa("127.77.0.10:80")),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn version_2_is_binary_with_an_exact_length() {
        let h = header(
            ProxyProtocolVersion::V2,
            Some(sa("198.18.0.2:40000")),
            sa("127.77.0.10:80"),
        );
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!(&h[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&h[16..20], &[198, 18, 0, 2]);
        assert_eq!(&h[20..24], &[127, 77, 0, 10]);
        assert_eq!(&h[24..], &[0x9c, 0x40, 0, 80]);
        let h = header(
            ProxyProtocolVersion::V2,
            Some(sa("[fd00::2]:5")),
            sa("[::1]:6"),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
        let h = header(ProxyProtocolVersion::V2, None, sa("127.77.0.10:80"));
        assert_eq!(&h[12..], &[0x20, 0, 0, 0], "LOCAL, no addresses");
    }
}
