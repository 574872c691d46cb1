//! Upgrade without dropped connections: a new daemon takes the running one's sockets instead of
//! binding its own. The running daemon listens on `handover.sock` beside the CNI socket; a new
//! daemon (same `--cni-socket`) connects before it takes the pin directory's lock, and receives,
//! one message each (`SCM_RIGHTS`), every enrolled pod's network namespace and its capture
//! listeners, then the CNI socket. The old daemon then retires: it stops accepting (its copies of
//! the sockets close, the new daemon's stay open, so connections waiting to be accepted stay
//! queued), releases the lock, finishes its open connections and waits for its signal.
//!
//! Invariants: the sockets are never closed during a handover, so no connect is refused; the
//! old daemon retires only after every descriptor was received (the new one answers each
//! message); a failed handover leaves the old daemon serving and the new one fails to start
//! (it would otherwise find the lock held).

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
}

/// The handover socket beside `cni_socket`.
pub fn path(cni_socket: &Path) -> PathBuf {
    cni_socket.with_file_name(SOCKET)
}

fn failed(reason: impl std::fmt::Display) -> Error {
    Error::Read(format!("handover: {reason}"))
}

/// The new daemon's side: takes over from the daemon serving `cni_socket`, if one runs.
pub fn take(cni_socket: &Path) -> Result<Option<Handed>, Error> {
    let Ok(mut stream) = UnixStream::connect(path(cni_socket)) else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(failed)?;
    send_message(&mut stream, &"handover", &[]).map_err(failed)?;
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
                return Ok(Some(Handed { pods, cni }));
            }
        }
    }
}

/// The running daemon's side: waits for a new daemon, hands everything over, then retires.
pub async fn serve(listener: tokio::net::UnixListener, enroller: Arc<Enroller>) {
    let shutdown = enroller.serve.shutdown.clone();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let e = enroller.clone();
        let done = tokio::task::spawn_blocking(move || hand_over(stream, &e)).await;
        match done {
            Ok(Ok(pods)) => {
                tracing::info!(
                    pods,
                    "handed over to the new daemon; retired (draining, then waiting for SIGTERM)"
                );
                return;
            }
            Ok(Err(e)) => tracing::error!(error = %e, "handover failed; still serving"),
            Err(e) => tracing::error!(error = %e, "handover task failed; still serving"),
        }
    }
}

/// Sends every pod, retires, sends the CNI socket; the number of pods.
fn hand_over(stream: tokio::net::UnixStream, enroller: &Enroller) -> Result<usize, Error> {
    let mut stream = stream.into_std().map_err(failed)?;
    stream.set_nonblocking(false).map_err(failed)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(failed)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(failed)?;
    let (hello, _) = read_message(&mut stream)?;
    if hello != br#""handover""# {
        return Err(failed("not a handover request"));
    }
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
    let cni = enroller.retire().map_err(failed)?;
    send_message(&mut stream, &Message::Done, &[cni.as_raw_fd()]).map_err(failed)?;
    Ok(n)
}
