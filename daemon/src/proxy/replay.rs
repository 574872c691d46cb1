//! Request bodies that a retry can send again. Every try reads the same client body through an
//! [`Attempt`]: first the frames an earlier try already pulled (kept, up to [`LIMIT`] bytes), then
//! the rest straight from the client. As in Envoy, a body larger than the buffer is still
//! forwarded, it just cannot be retried any more.
//!
//! Invariants: frames reach every try in client order and none is skipped; at most [`LIMIT`]
//! bytes of data are kept per request; [`Replay::replayable`] is false as soon as a frame was
//! pulled but not kept.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use hyper::body::{Body, Bytes, Frame, SizeHint};

/// Request data kept for retries (Envoy's default per-request buffer limit).
pub const LIMIT: usize = 1 << 20;

/// One client request body shared by the tries that send it.
pub struct Replay<B>(Arc<Mutex<Shared<B>>>);

struct Shared<B> {
    source: B,
    /// What the client announced (a fresh try reports it to hyper).
    hint: SizeHint,
    kept: Vec<Frame<Bytes>>,
    kept_bytes: usize,
    /// A frame was pulled but not kept: no further try can be complete.
    overflowed: bool,
    /// The client body has ended (or failed).
    done: bool,
}

/// One try's view of the body.
pub struct Attempt<B> {
    shared: Arc<Mutex<Shared<B>>>,
    /// Next kept frame to replay.
    next: usize,
}

/// Body type of upstream requests: one try's view of the client's body.
pub type UpstreamBody = Attempt<hyper::body::Incoming>;

// === impl Replay ===

impl<B: Body<Data = Bytes> + Unpin> Replay<B> {
    pub fn new(source: B) -> Self {
        let hint = source.size_hint();
        let done = source.is_end_stream();
        Self(Arc::new(Mutex::new(Shared {
            source,
            hint,
            kept: Vec::new(),
            kept_bytes: 0,
            overflowed: false,
            done,
        })))
    }

    /// A body for one more try, from the start.
    pub fn attempt(&self) -> Attempt<B> {
        Attempt {
            shared: self.0.clone(),
            next: 0,
        }
    }

    /// Whether another try would send the whole body.
    pub fn replayable(&self) -> bool {
        !self.0.lock().unwrap_or_else(|e| e.into_inner()).overflowed
    }
}

// === impl Attempt ===

impl<B: Body<Data = Bytes> + Unpin> Body for Attempt<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let next = self.next;
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(frame) = shared.kept.get(next) {
            let frame = copy(frame);
            drop(shared);
            self.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if shared.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut shared.source).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                shared.done = true;
                shared.overflowed = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Known at once, so that the frame just read goes out as the last one (HTTP/2:
                // END_STREAM on this DATA frame, not on an empty one after it, which servers
                // count as framing overhead).
                shared.done = shared.source.is_end_stream();
                let size = frame.data_ref().map_or(0, Bytes::len);
                let keep = !shared.overflowed && shared.kept_bytes + size <= LIMIT;
                if keep {
                    shared.kept_bytes += size;
                    shared.kept.push(copy(&frame));
                    drop(shared);
                    self.next += 1;
                } else {
                    shared.overflowed = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.done && self.next >= shared.kept.len()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if self.next == 0 {
            shared.hint
        } else {
            SizeHint::default()
        }
    }
}

/// A copy of a data or trailers frame (data is reference-counted, not copied).
fn copy(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match frame.data_ref() {
        Some(data) => Frame::data(data.clone()),
        None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, convert::Infallible};

    use http_body_util::BodyExt;

    use super::*;

    /// A client body of data chunks.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
        }
    }

    fn chunks(sizes: &[usize]) -> Replay<Chunks> {
        let data = sizes
            .iter()
            .enumerate()
            .map(|(i, n)| Bytes::from(vec![i as u8; *n]))
            .collect();
        Replay::new(Chunks(data))
    }

    /// Reads up to `frames` frames of a try.
    async fn read(a: &mut Attempt<Chunks>, frames: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..frames {
            match a.frame().await {
                Some(Ok(f)) => out.extend_from_slice(f.data_ref().unwrap()),
                _ => break,
            }
        }
        out
    }

    #[tokio::test]
    async fn a_second_try_gets_the_whole_body_after_a_partial_first() {
        let replay = chunks(&[3, 4, 5]);
        let mut first = replay.attempt();
        assert_eq!(first.size_hint().exact(), Some(12));
        // The first try dies after one frame.
        assert_eq!(read(&mut first, 1).await, vec![0; 3]);
        drop(first);
        assert!(replay.replayable());
        let mut second = replay.attempt();
        assert_eq!(second.size_hint().exact(), Some(12));
        let all = read(&mut second, 10).await;
        assert_eq!(all, [vec![0; 3], vec![1; 4], vec![2; 5]].concat());
        assert!(second.is_end_stream());
        // And a third one, entirely from what was kept.
        assert_eq!(read(&mut replay.attempt(), 10).await, all);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_forwarded_but_not_replayable() {
        let replay = chunks(&[LIMIT - 10, 20, 5]);
        let mut first = replay.attempt();
        let sent = read(&mut first, 10).await;
        assert_eq!(sent.len(), LIMIT + 15, "everything is forwarded");
        assert!(!replay.replayable());
    }

    #[tokio::test]
    async fn the_last_frame_is_known_as_last_when_it_is_read() {
        let replay = chunks(&[3, 4]);
        let mut first = replay.attempt();
        assert_eq!(read(&mut first, 1).await, vec![0; 3]);
        assert!(!first.is_end_stream());
        assert_eq!(read(&mut first, 1).await, vec![1; 4]);
        assert!(
            first.is_end_stream(),
            "the end is known with the last frame, without another poll"
        );
        let mut second = replay.attempt();
        assert_eq!(read(&mut second, 2).await.len(), 7);
        assert!(second.is_end_stream());
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once() {
        let replay = chunks(&[]);
        let mut a = replay.attempt();
        assert!(a.is_end_stream());
        assert!(a.frame().await.is_none());
        assert!(replay.replayable());
    }
}
