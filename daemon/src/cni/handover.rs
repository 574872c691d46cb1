//! Upgrade without dropped connections: a new daemon takes the running one's sockets instead of
//! binding its own. The running daemon listens on `handover.sock` beside the CNI socket
//! (owner-only); a new daemon (same `--cni-socket`) connects before it takes the pin directory's
//! lock and proves it is a drover daemon of the same pin directory (root, an executable named
//! `drover…`, and an fd of the pin directory that names the same directory). The running daemon
//! pauses enrolment (CNI connects wait in the socket's queue), and sends, one message each
//! (`SCM_RIGHTS`), every enrolled pod's network namespace and its capture listeners, then
//! releases the lock and sends the CNI socket. It keeps serving until the new daemon says it is
//! ready, and only then retires: it stops accepting (its copies of the sockets close, the new
//! daemon's stay open, so connections waiting to be accepted stay queued), finishes its open
//! connections and waits for its signal. If the new daemon exits before it is ready, the old one
//! takes the lock back, makes the kernel's state its own again and resumes enrolling.
//!
//! Invariants: the sockets are never closed during a handover, so no connect is refused; the
//! old daemon retires only after the new one reported ready; a failed handover leaves the old
//! daemon serving and the new one fails to start (it would otherwise find the lock held).

use std::{
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{Enroller, Error, Request, read_message, send_message};

/// The handover socket's name, beside the CNI socket.
const SOCKET: &str = "handover.sock";
/// How long each side waits for the other during a handover.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One message from the running daemon.
#[derive(Serialize, Deserialize)]
enum Message {
    /// A pod: the namespace's fd, then its listeners' fds, attached.
    Pod { req: Request, persist: bool },
    /// The end: the CNI socket's fd attached; the sender has retired.
    Done,
}

/// A pod handed over.
pub struct HandedPod {
    pub req: Request,
    pub persist: bool,
    pub netns: OwnedFd,
    pub listeners: Vec<OwnedFd>,
}

/// What a new daemon took over.
pub struct Handed {
    pub pods: Vec<HandedPod>,
    pub cni: OwnedFd,
    /// The old daemon, waiting for [`Successor::ready`].
    pub successor: Successor,
}

/// The new daemon's line to the old one: [`Successor::ready`] retires the old daemon; dropping
/// it (a failed start, or the process's exit) has the old one serve again.
pub struct Successor(UnixStream);

impl Successor {
    /// Tells the old daemon this one serves.
    pub fn ready(mut self) {
        if let Err(e) = send_message(&mut self.0, &"ready", &[]) {
            tracing::warn!(error = %e, "could not tell the previous daemon to retire");
        }
    }
}

/// The handover socket beside `cni_socket`.
pub fn path(cni_socket: &Path) -> PathBuf {
    cni_socket.with_file_name(SOCKET)
}

fn failed(reason: impl std::fmt::Display) -> Error {
    Error::Read(format!("handover: {reason}"))
}

/// The new daemon's side: takes over from the daemon serving `cni_socket`, if one runs, for
/// `pin_dir` (it must be the old daemon's).
pub fn take(cni_socket: &Path, pin_dir: &Path) -> Result<Option<Handed>, Error> {
    let Ok(mut stream) = UnixStream::connect(path(cni_socket)) else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(failed)?;
    let dir = std::fs::File::open(pin_dir)
        .map_err(|e| failed(format!("opening {}: {e}", pin_dir.display())))?;
    send_message(&mut stream, &"handover", &[dir.as_raw_fd()]).map_err(failed)?;
    let mut pods = Vec::new();
    loop {
        let (line, mut fds) = read_message(&mut stream)?;
        match serde_json::from_slice::<Message>(&line).map_err(failed)? {
            Message::Pod { req, persist } => {
                if fds.is_empty() {
                    return Err(failed("a pod came without its namespace"));
                }
                let netns = fds.remove(0);
                pods.push(HandedPod {
                    req,
                    persist,
                    netns,
                    listeners: fds,
                });
                send_message(&mut stream, &"next", &[]).map_err(failed)?;
            }
            Message::Done => {
                let cni = fds
                    .into_iter()
                    .next()
                    .ok_or_else(|| failed("the CNI socket did not come"))?;
                tracing::info!(pods = pods.len(), "took over from the running daemon");
                stream.set_read_timeout(None).map_err(failed)?;
                return Ok(Some(Handed {
                    pods,
                    cni,
                    successor: Successor(stream),
                }));
            }
        }
    }
}

/// The running daemon's side: waits for a new daemon, hands everything over, and retires once
/// it is ready (or serves again if it fails).
pub async fn serve(mut listener: tokio::net::UnixListener, path: PathBuf, enroller: Arc<Enroller>) {
    let shutdown = enroller.serve.shutdown.clone();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        if let Err(e) = super::check_peer(&stream) {
            tracing::error!(error = %e, "handover refused");
            continue;
        }
        let Some(_paused) = enroller.pause().await else {
            tracing::error!("handover refused: the exchanges in flight did not finish");
            continue;
        };
        let e = enroller.clone();
        let done = tokio::task::spawn_blocking(move || hand_over(stream, &e)).await;
        let (pods, ready) = match done {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "handover failed; still serving");
                enroller.paused.send_replace(false);
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "handover task failed; still serving");
                enroller.paused.send_replace(false);
                continue;
            }
        };
        tracing::info!(
            pods,
            "handed over to the new daemon; serving until it is ready"
        );
        if matches!(ready.await, Ok(true)) {
            enroller.retire();
            tracing::info!("the new daemon is ready; retired (draining, then waiting for SIGTERM)");
            return;
        }
        tracing::error!("the new daemon exited before it was ready; taking everything back");
        // The failed daemon may have taken the handover socket's path: this one's takes it back.
        if let Ok(l) = super::bind_replacing(&path) {
            listener = l;
        }
        match enroller.resume().await {
            Ok(()) => tracing::info!("serving again after the failed handover"),
            Err(e) => tracing::error!(error = %e, "could not take everything back"),
        }
    }
}

/// Checks the peer, sends every pod, releases the lock and sends the CNI socket; the number of
/// pods, and whether the new daemon then said it is ready (false: it went away first).
fn hand_over(
    stream: tokio::net::UnixStream,
    enroller: &Enroller,
) -> Result<(usize, tokio::task::JoinHandle<bool>), Error> {
    let peer = stream.peer_cred().ok().and_then(|c| c.pid());
    let mut stream = stream.into_std().map_err(failed)?;
    stream.set_nonblocking(false).map_err(failed)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(failed)?;
    let (hello, fds) = read_message(&mut stream)?;
    if hello != br#""handover""# {
        return Err(failed("not a handover request"));
    }
    prove(peer, fds.first(), &enroller.pin_dir)?;
    let pods = enroller.handover_list().map_err(failed)?;
    let n = pods.len();
    for (req, persist, fds) in pods {
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_message(&mut stream, &Message::Pod { req, persist }, &raw).map_err(failed)?;
        let (next, _) = read_message(&mut stream)?;
        if next != br#""next""# {
            return Err(failed("the new daemon did not take a pod"));
        }
    }
    let cni = enroller.release().map_err(failed)?;
    send_message(&mut stream, &Message::Done, &[cni.as_raw_fd()]).map_err(failed)?;
    // The new daemon's start takes as long as it takes; its exit closes the stream.
    stream.set_read_timeout(None).map_err(failed)?;
    let ready = tokio::task::spawn_blocking(
        move || matches!(read_message(&mut stream), Ok((line, _)) if line == br#""ready""#),
    );
    Ok((n, ready))
}

/// The peer is a drover daemon (`/proc/<pid>/exe` named `drover…`) and `dir` is the pin
/// directory `pin_dir`.
fn prove(peer: Option<i32>, dir: Option<&OwnedFd>, pin_dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let exe = peer
        .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if !exe.starts_with("drover") {
        return Err(failed(format!(
            "the peer (pid {peer:?}, executable {exe:?}) is not a drover daemon"
        )));
    }
    let theirs = dir
        .and_then(|fd| fd.try_clone().ok())
        .map(std::fs::File::from)
        .and_then(|f| f.metadata().ok())
        .map(|m| (m.dev(), m.ino()));
    let ours = std::fs::metadata(pin_dir).ok().map(|m| (m.dev(), m.ino()));
    if theirs.is_none() || theirs != ours {
        return Err(failed(format!(
            "the peer did not show the pin directory {}",
            pin_dir.display()
        )));
    }
    Ok(())
}
