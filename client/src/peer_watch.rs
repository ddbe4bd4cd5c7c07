//! What the client learns from the bytes the server sends: that the peer answers at all,
//! whether it speaks Cap'n Proto (its first bytes tell), and when it last sent anything
//! (what call timeouts are measured against).

use std::cell::Cell;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::AsyncRead;
use tokio::time::Instant;

use crate::server_addr::DEFAULT_RPC_PORT;

/// The capnp reader refuses a message with this many segments or more; a peer that is
/// not speaking Cap'n Proto (any text protocol: HTTP, SSH, SMTP, a TLS alert) trips it
/// with its very first bytes.
const SEGMENT_LIMIT: u32 = 512;

/// What a peer that is not a capsync RPC port answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignReply {
    /// `HTTP...`: a web server, most likely capsync's own share-page port.
    Http,
    /// Something else that cannot be the start of a Cap'n Proto message; its first bytes.
    NotCapnp([u8; 4]),
}

impl ForeignReply {
    /// Judges the first four bytes a peer sent: `None` when they can start a capnp message.
    fn judge(first: [u8; 4]) -> Option<Self> {
        if &first == b"HTTP" {
            return Some(Self::Http);
        }
        let segments = u32::from_le_bytes(first).wrapping_add(1);
        (segments == 0 || segments >= SEGMENT_LIMIT).then_some(Self::NotCapnp(first))
    }
}

impl fmt::Display for ForeignReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http => write!(
                f,
                "it answered with HTTP: probably the share-page/HTTP port; the RPC port is {DEFAULT_RPC_PORT} by default"
            ),
            Self::NotCapnp(first) => write!(
                f,
                "it answered with bytes that are not Cap'n Proto: \"{}\"",
                first.escape_ascii()
            ),
        }
    }
}

/// What the first bytes a peer sent showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstBytes {
    /// Fewer than four bytes so far.
    Awaited,
    /// The start of a Cap'n Proto message: a server that answers, in the right protocol.
    Capnp,
    /// Something else.
    Foreign(ForeignReply),
}

/// What one connection's reader has seen; shared by the reader (inside the `RpcSystem`)
/// and the [`crate::Connection`].
#[derive(Debug, Clone)]
pub(crate) struct PeerWatch {
    state: Rc<State>,
}

#[derive(Debug)]
struct State {
    /// The first bytes received, up to four: enough to judge the peer.
    first: Cell<[u8; 4]>,
    /// How many of `first` are filled.
    first_len: Cell<usize>,
    /// What they showed.
    verdict: Cell<FirstBytes>,
    /// When bytes last arrived (or the connection was made).
    last_heard: Cell<Instant>,
}

impl PeerWatch {
    pub(crate) fn new() -> Self {
        Self {
            state: Rc::new(State {
                first: Cell::new([0; 4]),
                first_len: Cell::new(0),
                verdict: Cell::new(FirstBytes::Awaited),
                last_heard: Cell::new(Instant::now()),
            }),
        }
    }

    /// Wraps the connection's read half so every read passes through this watch.
    pub(crate) fn reader<R>(&self, inner: R) -> WatchedReader<R> {
        WatchedReader {
            inner,
            watch: self.clone(),
        }
    }

    /// What the peer's first bytes showed so far. Its first message answers the client's
    /// first (the bootstrap request the `RpcSystem` sends at once).
    pub(crate) fn first_bytes(&self) -> FirstBytes {
        self.state.verdict.get()
    }

    /// When the peer last sent anything.
    pub(crate) fn last_heard(&self) -> Instant {
        self.state.last_heard.get()
    }

    /// Records `bytes` as received; fails once they show the peer is not Cap'n Proto, so
    /// the capnp reader never tries to make a message of them.
    fn heard(&self, bytes: &[u8]) -> io::Result<()> {
        let state = &self.state;
        state.last_heard.set(Instant::now());
        if let FirstBytes::Foreign(foreign) = self.first_bytes() {
            return Err(refusal(foreign));
        }
        let len = state.first_len.get();
        if len == 4 {
            return Ok(());
        }
        let mut first = state.first.get();
        let take = bytes.len().min(4 - len);
        first[len..len + take].copy_from_slice(&bytes[..take]);
        state.first.set(first);
        state.first_len.set(len + take);
        if len + take < 4 {
            return Ok(());
        }
        match ForeignReply::judge(first) {
            Some(foreign) => {
                state.verdict.set(FirstBytes::Foreign(foreign));
                Err(refusal(foreign))
            }
            None => {
                state.verdict.set(FirstBytes::Capnp);
                Ok(())
            }
        }
    }
}

/// The peer said nothing for the whole limit of [`within_silence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Silent;

/// Runs `work`, giving up once `last_heard` (when the peer last sent anything) has stayed
/// more than `limit` in the past while it runs. The clock starts with the call, not at an
/// older `last_heard`.
pub(crate) async fn within_silence<T>(
    limit: Duration,
    last_heard: impl Fn() -> Instant,
    work: impl Future<Output = T>,
) -> Result<T, Silent> {
    let started = Instant::now();
    let silent_until = || last_heard().max(started) + limit;
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            output = &mut work => return Ok(output),
            () = tokio::time::sleep_until(silent_until()) => {
                // Bytes that came while sleeping moved the deadline.
                if silent_until() <= Instant::now() {
                    return Err(Silent);
                }
            }
        }
    }
}

fn refusal(foreign: ForeignReply) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not a capsync RPC port ({foreign})"),
    )
}

/// A read half that reports what it reads to a [`PeerWatch`].
pub(crate) struct WatchedReader<R> {
    inner: R,
    watch: PeerWatch,
}

impl<R: AsyncRead + Unpin> AsyncRead for WatchedReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if n > 0 {
            this.watch.heard(&buf[..n])?;
        }
        Poll::Ready(Ok(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::AsyncReadExt as _;

    #[test]
    fn first_bytes_tell_capnp_from_anything_else() {
        assert_eq!(ForeignReply::judge(*b"HTTP"), Some(ForeignReply::Http));
        // One segment of 2 words; 512 segments is the capnp reader's own limit.
        assert_eq!(ForeignReply::judge([0, 0, 0, 0]), None);
        assert_eq!(ForeignReply::judge(510u32.to_le_bytes()), None);
        for foreign in [*b"SSH-", *b"220 ", [0x15, 0x03, 0x01, 0x00], [0xff; 4]] {
            assert_eq!(
                ForeignReply::judge(foreign),
                Some(ForeignReply::NotCapnp(foreign))
            );
        }
        assert_eq!(
            ForeignReply::NotCapnp([0x15, 0x03, b'a', 0]).to_string(),
            "it answered with bytes that are not Cap'n Proto: \"\\x15\\x03a\\x00\""
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_reader_refuses_a_foreign_peer_even_a_byte_at_a_time() {
        let watch = PeerWatch::new();
        let started = watch.last_heard();
        // A reader that hands out one byte per read.
        let bytes =
            futures::stream::iter(b"HTTP/1.1 400".iter().map(|b| Ok::<_, io::Error>(vec![*b])));
        let mut reader = watch.reader(futures::TryStreamExt::into_async_read(bytes));
        let mut buf = [0u8; 8];
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        for _ in 0..3 {
            assert_eq!(reader.read(&mut buf).await.unwrap(), 1);
        }
        assert_eq!(watch.first_bytes(), FirstBytes::Awaited);
        let refused = reader.read(&mut buf).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidData);
        assert!(
            refused.to_string().contains("answered with HTTP"),
            "{refused}"
        );
        assert_eq!(watch.first_bytes(), FirstBytes::Foreign(ForeignReply::Http));
        // Later reads keep refusing.
        assert!(reader.read(&mut buf).await.is_err());
        assert_eq!(watch.first_bytes(), FirstBytes::Foreign(ForeignReply::Http));
        assert_eq!(
            watch.last_heard() - started,
            std::time::Duration::from_secs(3)
        );
    }

    /// Work that keeps hearing from the peer runs past the limit; work that stops hearing
    /// fails exactly one limit after the last word.
    #[tokio::test(start_paused = true)]
    async fn silence_not_total_time_is_what_times_out() {
        const MS: Duration = Duration::from_millis(1);
        let heard = Cell::new(Instant::now());
        let chatty = async {
            for _ in 0..10 {
                tokio::time::sleep(400 * MS).await;
                heard.set(Instant::now());
            }
            "done"
        };
        let start = Instant::now();
        assert_eq!(
            within_silence(500 * MS, || heard.get(), chatty).await,
            Ok("done")
        );
        assert_eq!(start.elapsed(), 4_000 * MS);

        let start = Instant::now();
        let falls_silent = async {
            tokio::time::sleep(300 * MS).await;
            heard.set(Instant::now());
            std::future::pending::<()>().await
        };
        assert_eq!(
            within_silence(500 * MS, || heard.get(), falls_silent).await,
            Err(Silent)
        );
        assert_eq!(start.elapsed(), 800 * MS);

        // A word heard long before the call does not shorten its limit.
        heard.set(Instant::now() - 10_000 * MS);
        let start = Instant::now();
        let silent = std::future::pending::<()>();
        assert_eq!(
            within_silence(500 * MS, || heard.get(), silent).await,
            Err(Silent)
        );
        assert_eq!(start.elapsed(), 500 * MS);
    }

    #[tokio::test]
    async fn capnp_bytes_pass_through_untouched() {
        let watch = PeerWatch::new();
        let message = [0u8, 0, 0, 0, 1, 0, 0, 0, 7, 7, 7, 7, 7, 7, 7, 7];
        let mut reader = watch.reader(futures::io::Cursor::new(message.to_vec()));
        let mut read = Vec::new();
        reader.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, message);
        assert_eq!(watch.first_bytes(), FirstBytes::Capnp);
    }
}
