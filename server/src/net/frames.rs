//! Reads Cap'n Proto frames off a connection so that memory follows the bytes
//! actually received, never the sizes a peer announces.
//!
//! capnp-rpc reads a frame's segment table and then allocates (and zero-fills)
//! the whole announced message before a byte of it has arrived: one 8-byte
//! header announcing 16 MiB costs 16 MiB. [`FrameGate`] sits between the socket
//! and the RPC system and hands a frame on only once all of it is here. Until
//! then the frame lives in a buffer that grows with what is received, and:
//! - no frame may be larger than `max_message_bytes`: one announced larger
//!   ends the connection before anything of it is read;
//! - until the connection has redeemed a token ([`ConnectionState`]), the
//!   frames it may have handed on add up to a small allowance (a redeem needs a
//!   few hundred bytes). Past it, reading pauses until a redeem succeeds, so a
//!   client that pipelines a large call behind its redeem just waits for it;
//!   the server's handshake deadline closes connections that never redeem;
//! - frames larger than [`SMALL_FRAME`] draw on one budget shared by all
//!   connections as their bytes arrive: once it is spent, reading such frames
//!   pauses (TCP pushes back on the senders) until other frames are delivered;
//! - a frame that has started must keep arriving: no progress (no byte, or no
//!   budget) for `stall_timeout` closes the connection, so nobody holds the
//!   budget hostage with a half-sent message.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use futures::io::AsyncRead;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::PollSemaphore;

/// Frames up to this size are read without drawing on the shared budget: each
/// connection holds at most one, and the connection limit bounds them all.
pub const SMALL_FRAME: usize = 64 * 1024;

/// How much is read from the socket at once (and so how far a buffer can run
/// ahead of the bytes a frame still needs).
const READ_CHUNK: usize = 16 * 1024;

/// A buffer this much larger than what it holds is given back after a frame.
const SHRINK_ABOVE: usize = 2 * SMALL_FRAME;

/// capnp refuses messages with this many segments or more (`SEGMENTS_COUNT_LIMIT`).
const MAX_SEGMENTS: usize = 512;

/// What one connection's readers and its `Gateway` share: whether it has
/// proven it holds a token, and why its input was refused, if it was.
#[derive(Debug, Default)]
pub struct ConnectionState {
    authenticated: Cell<bool>,
    /// The reader waiting for the connection to authenticate, woken when it does.
    waiting: RefCell<Option<Waker>>,
    /// Set when the [`FrameGate`] refused the connection's input.
    refused: Cell<Option<&'static str>>,
}

impl ConnectionState {
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.get()
    }

    /// Called once a redeem on this connection succeeded: the connection's
    /// full message limit applies from then on, and a reader paused on a
    /// frame too large for the handshake goes on.
    pub fn authenticate(&self) {
        self.authenticated.set(true);
        let waiting = self.waiting.borrow_mut().take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }

    /// Why the connection's input was refused (a [`FrameError::kind`]), if it was.
    pub fn refused(&self) -> Option<&'static str> {
        self.refused.get()
    }
}

/// Limits for reading frames, the same for every connection of one server.
#[derive(Clone, Debug)]
pub struct FrameLimits {
    /// Bytes a connection may send in all before it has redeemed a token.
    pub handshake_bytes: usize,
    /// Largest frame once it has.
    pub max_message_bytes: usize,
    /// Bytes of large frames being received at once, all connections together.
    pub budget: Arc<Semaphore>,
    /// The budget's size, so one frame larger than it can still be read (alone).
    pub budget_bytes: usize,
    /// Longest a started frame may go without progress.
    pub stall_timeout: Duration,
}

impl FrameLimits {
    pub fn new(
        handshake_bytes: usize,
        max_message_bytes: usize,
        budget_bytes: usize,
        stall_timeout: Duration,
    ) -> Self {
        // The semaphore's permits are counted in u32 per acquisition and capped overall.
        let budget_bytes = budget_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            handshake_bytes,
            max_message_bytes,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
            stall_timeout,
        }
    }
}

/// Why a connection's input was refused; the RPC system ends that connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("announced a {size}-byte message (the limit is {limit})")]
    TooLarge { size: usize, limit: usize },
    #[error("announced a message with {0} segments")]
    BadSegmentCount(usize),
    #[error("stopped sending in the middle of a message")]
    Stalled,
}

impl FrameError {
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "message_too_large",
            Self::BadSegmentCount(_) => "bad_segment_table",
            Self::Stalled => "message_stalled",
        }
    }
}

impl From<FrameError> for io::Error {
    fn from(err: FrameError) -> Self {
        let kind = match err {
            FrameError::Stalled => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, err)
    }
}

/// An `AsyncRead` that passes whole Cap'n Proto frames through, one at a time,
/// once each has fully arrived (see the module docs).
pub struct FrameGate<R> {
    inner: R,
    limits: FrameLimits,
    state: Rc<ConnectionState>,
    budget: PollSemaphore,
    /// Received bytes not yet handed on: the frame being read, maybe the start of the next.
    buf: Vec<u8>,
    /// Where the socket is read into before the bytes join `buf`, so `buf`
    /// never holds room for bytes that did not come (and nothing is zeroed per read).
    scratch: Box<[u8]>,
    /// Bytes of `buf` already handed on (all within the current frame).
    delivered: usize,
    /// The current frame's total size, once its segment table is in.
    frame_len: Option<usize>,
    /// Budget held for the current frame's bytes (large frames only).
    permit: Option<OwnedSemaphorePermit>,
    /// Bytes of frames handed on before the connection authenticated.
    handshake_delivered: usize,
    /// Armed while a frame is incomplete; pushed back on every bit of progress.
    stall: Pin<Box<Sleep>>,
    stall_armed: bool,
}

impl<R> FrameGate<R> {
    pub fn new(inner: R, limits: FrameLimits, state: Rc<ConnectionState>) -> Self {
        let budget = PollSemaphore::new(limits.budget.clone());
        let stall = Box::pin(tokio::time::sleep(limits.stall_timeout));
        Self {
            inner,
            limits,
            state,
            budget,
            buf: Vec::new(),
            scratch: vec![0; READ_CHUNK].into_boxed_slice(),
            delivered: 0,
            frame_len: None,
            permit: None,
            handshake_delivered: 0,
            stall,
            stall_armed: false,
        }
    }

    /// Parses the segment table at the front of `buf` if it is all there:
    /// the frame's total length (table included), or an error for a frame that
    /// can never be read.
    fn parse_table(&self) -> Result<Option<usize>, FrameError> {
        let Some(first) = self.buf.get(..4) else {
            return Ok(None);
        };
        let segments = u32::from_le_bytes(first.try_into().expect("4 bytes")) as usize + 1;
        if segments >= MAX_SEGMENTS {
            return Err(FrameError::BadSegmentCount(segments));
        }
        // One u32 for the count, one per segment size, padded to whole words.
        let table = (4 * (1 + segments)).next_multiple_of(8);
        let Some(sizes) = self.buf.get(4..4 + 4 * segments) else {
            return Ok(None);
        };
        let words: usize = sizes
            .chunks_exact(4)
            .map(|size| u32::from_le_bytes(size.try_into().expect("4 bytes")) as usize)
            .sum();
        let total = table + words * 8;
        let limit = self.limits.max_message_bytes;
        if total > limit {
            return Err(FrameError::TooLarge { size: total, limit });
        }
        Ok(Some(total))
    }

    /// Whether the frame of `len` bytes must wait for the connection to
    /// authenticate: before a redeem, a connection gets only the handshake allowance.
    fn waits_for_handshake(&self, len: usize) -> bool {
        !self.state.is_authenticated()
            && self.handshake_delivered + len > self.limits.handshake_bytes
    }

    /// How many more bytes to read for the current frame, at most one chunk.
    fn wanted(&self) -> usize {
        match self.frame_len {
            Some(len) => len.saturating_sub(self.buf.len()).clamp(1, READ_CHUNK),
            None => READ_CHUNK,
        }
    }

    /// Drops the frame just handed on, keeping whatever followed it.
    fn finish_frame(&mut self, len: usize) {
        if !self.state.is_authenticated() {
            self.handshake_delivered += len;
        }
        self.buf.drain(..len);
        if self.buf.capacity() > SHRINK_ABOVE {
            self.buf.shrink_to(SMALL_FRAME.max(self.buf.len()));
        }
        self.delivered = 0;
        self.frame_len = None;
        self.permit = None;
        self.stall_armed = false;
    }

    /// Pushes the stall deadline back: the current frame made progress.
    fn progressed(&mut self) {
        let deadline = Instant::now() + self.limits.stall_timeout;
        self.stall.as_mut().reset(deadline);
        self.stall_armed = true;
    }

    fn refuse(&self, err: FrameError) -> io::Error {
        self.state.refused.set(Some(err.kind()));
        err.into()
    }
}

impl<R: AsyncRead + Unpin> FrameGate<R> {
    /// Reserves budget for the next `wanted` bytes of a large frame.
    fn poll_budget(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<()> {
        let Some(len) = self.frame_len else {
            return Poll::Ready(());
        };
        if len <= SMALL_FRAME {
            return Poll::Ready(());
        }
        // A frame larger than the whole budget may take all of it, but no more.
        let cap = self.limits.budget_bytes;
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        let needed = (self.buf.len() + wanted).min(len).min(cap);
        if held >= needed {
            return Poll::Ready(());
        }
        let more = u32::try_from(needed - held).unwrap_or(u32::MAX);
        match ready!(self.budget.poll_acquire_many(cx, more)) {
            Some(permit) => {
                match &mut self.permit {
                    Some(held) => held.merge(permit),
                    None => self.permit = Some(permit),
                }
                Poll::Ready(())
            }
            // The semaphore is never closed; if it were, read on unbudgeted.
            None => Poll::Ready(()),
        }
    }

    /// Reads more of the current frame (or the next one's table) into `buf`.
    /// `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let wanted = self.wanted();
        ready!(self.poll_budget(cx, wanted));
        let n = ready!(Pin::new(&mut self.inner).poll_read(cx, &mut self.scratch[..wanted]))?;
        self.buf.extend_from_slice(&self.scratch[..n]);
        Poll::Ready(Ok(n))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameGate<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if this.frame_len.is_none() {
                match this.parse_table() {
                    Ok(Some(len)) => this.frame_len = Some(len),
                    Ok(None) => {}
                    Err(err) => return Poll::Ready(Err(this.refuse(err))),
                }
            }
            if let Some(len) = this.frame_len {
                if this.waits_for_handshake(len) {
                    // Nothing more is read until a redeem succeeds (or the
                    // handshake deadline closes the connection).
                    *this.state.waiting.borrow_mut() = Some(cx.waker().clone());
                    if this.waits_for_handshake(len) {
                        return Poll::Pending;
                    }
                }
                if this.buf.len() >= len {
                    let n = out.len().min(len - this.delivered);
                    out[..n].copy_from_slice(&this.buf[this.delivered..this.delivered + n]);
                    this.delivered += n;
                    if this.delivered == len {
                        this.finish_frame(len);
                    }
                    return Poll::Ready(Ok(n));
                }
            }
            match this.poll_fill(cx) {
                // End of stream: clean between frames; a cut-off frame is
                // dropped unseen (the RPC system just sees the end).
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(_)) => this.progressed(),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    let started = !this.buf.is_empty();
                    if started && !this.stall_armed {
                        this.progressed();
                    }
                    if started && this.stall.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(this.refuse(FrameError::Stalled)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::AsyncReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    use super::*;

    /// A whole frame with one segment of `words` words, filled with `fill`.
    fn frame(words: u32, fill: u8) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&words.to_le_bytes());
        bytes.extend(std::iter::repeat_n(fill, words as usize * 8));
        bytes
    }

    fn limits(handshake: usize, max: usize, budget: usize) -> FrameLimits {
        FrameLimits::new(handshake, max, budget, Duration::from_secs(30))
    }

    fn authenticated() -> Rc<ConnectionState> {
        let state = Rc::new(ConnectionState::default());
        state.authenticate();
        state
    }

    fn gate(
        input: Vec<u8>,
        limits: FrameLimits,
        state: Rc<ConnectionState>,
    ) -> FrameGate<futures::io::Cursor<Vec<u8>>> {
        FrameGate::new(futures::io::Cursor::new(input), limits, state)
    }

    /// A gate over one end of an in-memory pipe, and the other end to write to.
    fn piped(
        limits: FrameLimits,
        state: Rc<ConnectionState>,
    ) -> (
        FrameGate<Compat<tokio::io::DuplexStream>>,
        tokio::io::DuplexStream,
    ) {
        let (tx, rx) = tokio::io::duplex(1 << 20);
        (FrameGate::new(rx.compat(), limits, state), tx)
    }

    #[tokio::test]
    async fn passes_frames_through_unchanged() {
        let mut input = frame(3, 1);
        input.extend(frame(20_000, 2));
        // Two segments: count-1 = 1, sizes 1 and 2 words, padded to 16 bytes.
        let mut two = Vec::new();
        for v in [1u32, 1, 2, 0] {
            two.extend_from_slice(&v.to_le_bytes());
        }
        two.extend([3u8; 24]);
        input.extend(&two);
        let mut gate = gate(
            input.clone(),
            limits(1 << 20, 1 << 20, 1 << 20),
            authenticated(),
        );
        let mut out = Vec::new();
        gate.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert_eq!(
            gate.limits.budget.available_permits(),
            1 << 20,
            "budget given back"
        );
    }

    #[tokio::test]
    async fn refuses_an_announced_frame_over_the_limit_before_reading_it() {
        // Only the header: announces 2 MiB and sends nothing else.
        let mut header = 0u32.to_le_bytes().to_vec();
        header.extend_from_slice(&(2u32 << 17).to_le_bytes());
        let state = authenticated();
        let mut gate = gate(header, limits(64 << 10, 1 << 20, 1 << 20), state.clone());
        let err = gate.read(&mut [0; 8]).await.unwrap_err();
        let frame_err = err.into_inner().unwrap().downcast::<FrameError>().unwrap();
        assert_eq!(
            *frame_err,
            FrameError::TooLarge {
                size: 8 + (2 << 20),
                limit: 1 << 20
            }
        );
        assert_eq!(state.refused(), Some("message_too_large"));
        assert!(gate.buf.capacity() <= 64, "nothing allocated for it");
    }

    #[tokio::test(start_paused = true)]
    async fn before_a_redeem_reading_pauses_past_the_allowance_and_goes_on_after() {
        let state = Rc::new(ConnectionState::default());
        let (mut gate, mut tx) = piped(limits(1000, 1 << 20, 1 << 20), state.clone());
        // A small frame (the redeem), then a pipelined one over the allowance.
        tx.write_all(&frame(100, 1)).await.unwrap(); // 808 bytes
        tx.write_all(&frame(5000, 2)).await.unwrap(); // 40 KiB
        let mut first = vec![0; 808];
        gate.read_exact(&mut first).await.unwrap();

        let mut second = vec![0; 8 + 40_000];
        let paused = tokio::time::timeout(Duration::from_secs(60), gate.read_exact(&mut second));
        assert!(paused.await.is_err(), "read past the handshake allowance");
        assert!(gate.buf.len() <= READ_CHUNK, "buffered past the allowance");

        state.authenticate();
        gate.read_exact(&mut second).await.unwrap();
        assert_eq!(second[8..], [2; 40_000]);
    }

    #[tokio::test]
    async fn a_huge_segment_count_is_refused() {
        let mut header = Vec::new();
        header.extend_from_slice(&1000u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let mut gate = gate(header, limits(1 << 20, 1 << 20, 1 << 20), authenticated());
        let err = gate.read(&mut [0; 8]).await.unwrap_err();
        assert!(err.to_string().contains("1001 segments"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn large_frames_wait_for_budget_and_stall_out() {
        let limits = limits(1 << 20, 1 << 20, 256 << 10);
        // Another connection holds all but 100 KiB of the budget.
        let held = limits
            .budget
            .clone()
            .acquire_many_owned((256 - 100) << 10)
            .await
            .unwrap();
        let big = frame(200 << 7, 7); // 200 KiB body
        let state = authenticated();
        let (mut gate, mut tx) = piped(limits.clone(), state.clone());
        tx.write_all(&big).await.unwrap();

        // It reads what the budget allows, then waits; after the stall timeout it gives up.
        let mut out = vec![0; 8];
        let err = gate.read_exact(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(state.refused(), Some("message_stalled"));
        assert!(
            gate.buf.len() <= (100 << 10) + READ_CHUNK,
            "read past its budget"
        );
        drop(gate);
        assert_eq!(
            limits.budget.available_permits(),
            100 << 10,
            "its budget came back"
        );

        // With the budget free, the same frame goes through.
        drop(held);
        let (mut gate, mut tx) = piped(limits, authenticated());
        tx.write_all(&big).await.unwrap();
        let mut out = vec![0; big.len()];
        gate.read_exact(&mut out).await.unwrap();
        assert_eq!(out, big);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_between_frames_never_stalls() {
        let (mut gate, mut tx) = piped(limits(1 << 20, 1 << 20, 1 << 20), authenticated());
        tx.write_all(&frame(1, 1)).await.unwrap();
        let mut out = vec![0; 16];
        gate.read_exact(&mut out).await.unwrap();
        let idle = tokio::time::timeout(Duration::from_secs(3600), gate.read(&mut out));
        assert!(idle.await.is_err(), "an idle connection was ended");
    }
}
