//! The sockmap relay experiment: relayed plain-TCP pairs spliced inside the kernel by an
//! `sk_skb` stream verdict (`ebpf/src/sockmap.rs`), for `drover-bench --only sockmap` to compare
//! with the `splice(2)` relay. Not used by the daemon (the go/no-go is in the README).
//!
//! Invariants: the object's pinned maps go to a private pin directory that is removed on drop;
//! a pair's peer records are written before its sockets enter the map, so no byte of a paired
//! socket is ever verdicted without a destination.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};

use super::{
    Error,
    loader::{OBJECT, take_map as take},
};

const PROGRAM: &str = "drover_relay_verdict";

/// The loaded verdict program and its maps.
pub struct SockmapRelay {
    _ebpf: Ebpf,
    socks: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, u64>,
    pin_dir: PathBuf,
}

impl SockmapRelay {
    /// Loads the object (pins in a private directory) and attaches the verdict program.
    pub fn load() -> Result<Self, Error> {
        if OBJECT.is_empty() {
            return Err(Error::ProgramNotBuilt);
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/drover-sockmap-{}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(OBJECT)?;
        let socks: SockHash<MapData, u64> = take(&mut ebpf, "RELAY_SOCKS")?;
        let peers: HashMap<MapData, u64, u64> = take(&mut ebpf, "RELAY_PEERS")?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or(Error::Pin {
                path: PROGRAM.into(),
                reason: "program missing from object".into(),
            })?
            .try_into()
            .map_err(|source| Error::Program {
                name: PROGRAM,
                source,
            })?;
        prog.load().map_err(|source| Error::Program {
            name: PROGRAM,
            source,
        })?;
        prog.attach(socks.fd()).map_err(|source| Error::Program {
            name: PROGRAM,
            source,
        })?;
        Ok(Self {
            _ebpf: ebpf,
            socks,
            peers,
            pin_dir,
        })
    }

    /// Splices `a` and `b` both ways in the kernel from now on.
    pub fn pair(&mut self, a: &impl AsFd, b: &impl AsFd) -> Result<(), Error> {
        let (ca, cb) = (cookie(a)?, cookie(b)?);
        let map_err = |source| Error::Map {
            name: "RELAY_PEERS",
            source,
        };
        self.peers.insert(ca, cb, 0).map_err(map_err)?;
        self.peers.insert(cb, ca, 0).map_err(map_err)?;
        for (k, s) in [(ca, a.as_fd().as_raw_fd()), (cb, b.as_fd().as_raw_fd())] {
            self.socks.insert(k, s, 0).map_err(|source| Error::Map {
                name: "RELAY_SOCKS",
                source,
            })?;
        }
        Ok(())
    }

    /// Takes `a` and `b` out of the kernel relay.
    pub fn unpair(&mut self, a: &impl AsFd, b: &impl AsFd) -> Result<(), Error> {
        for s in [a.as_fd(), b.as_fd()] {
            let c = cookie(&s)?;
            let _ = self.socks.remove(&c);
            let _ = self.peers.remove(&c);
        }
        Ok(())
    }
}

impl Drop for SockmapRelay {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The socket's cookie (`SO_COOKIE`), the key the verdict program looks sockets up by.
#[expect(
    unsafe_code,
    reason = "SO_COOKIE has no safe wrapper in nix or socket2"
)]
fn cookie(s: &impl AsFd) -> Result<u64, Error> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given; the fd is borrowed live.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(Error::Io(std::io::Error::last_os_error()))
    }
}
