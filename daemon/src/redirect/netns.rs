//! Network namespaces: open one by name or path, run socket-creating code inside it on the
//! current thread, and read its cookie (the kernel's unique id, used in map keys).
//!
//! Invariant: [`NetNs::enter`] always returns the thread to the namespace it started in before it
//! returns, so tokio worker threads never stay in a workload's namespace.

use std::{
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    /// The name given on the command line (or the path).
    pub name: String,
    fd: OwnedFd,
    /// The daemon's own namespace, to return to.
    home: std::sync::Arc<OwnedFd>,
    /// The namespace's cookie (`SO_NETNS_COOKIE`).
    pub cookie: u64,
    /// Whether this is the daemon's own namespace (no switching needed).
    pub is_home: bool,
    /// The namespace's own addresses (global scope, IPv4 first) when it was opened: a workload's
    /// address, which its captured connections carry as their source (they reach drover over
    /// loopback).
    pub addresses: Vec<IpAddr>,
}

const SO_NETNS_COOKIE: libc::c_int = 71;

// === impl NetNs ===

impl AsFd for NetNs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetNs {
    /// The daemon's own namespace.
    pub fn current() -> io::Result<Self> {
        let fd: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
        let home = std::sync::Arc::new(fd.try_clone()?);
        let cookie = socket_netns_cookie()?;
        Ok(Self {
            name: "host".into(),
            fd,
            home,
            cookie,
            is_home: true,
            addresses: Vec::new(),
        })
    }

    /// Opens `name`: an `ip netns` name (`/var/run/netns/NAME`) or a path such as `/proc/PID/ns/net`.
    pub fn open(name: &str, home: &NetNs) -> io::Result<Self> {
        let path = if name.contains('/') {
            PathBuf::from(name)
        } else {
            Path::new("/var/run/netns").join(name)
        };
        let fd: OwnedFd = File::open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
            .into();
        Self::from_fd(name, fd, home)
    }

    /// The namespace of `fd` (one handed over by the CNI plugin), called `name`.
    pub fn from_fd(name: &str, fd: OwnedFd, home: &NetNs) -> io::Result<Self> {
        let mut ns = Self {
            name: name.to_string(),
            fd,
            home: home.home.clone(),
            cookie: 0,
            is_home: false,
            addresses: Vec::new(),
        };
        ns.cookie = ns.enter(socket_netns_cookie)??;
        ns.is_home = ns.cookie == home.cookie;
        if !ns.is_home {
            ns.addresses = ns.enter(own_addresses)??;
        }
        Ok(ns)
    }

    /// The source a captured connection from `peer` stands for: the workload's address when
    /// the connection reached drover over loopback (as every connection captured in a
    /// workload's namespace does), else `peer` itself.
    pub fn source(&self, peer: SocketAddr) -> SocketAddr {
        match self.addresses.first() {
            Some(own) if peer.ip().to_canonical().is_loopback() => {
                SocketAddr::new(*own, peer.port())
            }
            _ => peer,
        }
    }

    /// Runs `f` on this thread inside the namespace, then returns to the daemon's namespace.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        if self.is_home {
            return Ok(f());
        }
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        // Returning home cannot reasonably fail (we hold the fd); if it did, this thread would
        // create sockets in the wrong namespace, so treat it as fatal for the process.
        if let Err(e) = setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the daemon's network namespace; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}

/// The global addresses of the namespace this thread is in, IPv4 first, in interface order.
fn own_addresses() -> io::Result<Vec<IpAddr>> {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(a) = addr.as_sockaddr_in() {
            let ip = a.ip();
            if !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified() {
                v4.push(IpAddr::V4(ip));
            }
        } else if let Some(a) = addr.as_sockaddr_in6() {
            let ip = a.ip();
            let link_local = (ip.segments()[0] & 0xffc0) == 0xfe80;
            if !ip.is_loopback() && !link_local && !ip.is_unspecified() {
                v6.push(IpAddr::V6(ip));
            }
        }
    }
    v4.extend(v6);
    Ok(v4)
}

/// The cookie of the namespace this thread is in.
fn socket_netns_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    #[expect(
        unsafe_code,
        reason = "getsockopt has no safe wrapper for SO_NETNS_COOKIE"
    )]
    // SAFETY: valid socket fd and an 8-byte out buffer whose length we pass.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
