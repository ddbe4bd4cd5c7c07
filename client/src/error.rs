//! The client's error type: remote failures with their wire code, transport errors, bad input,
//! and the outbox's and syncer's failures.

use std::path::PathBuf;
use std::time::Duration;

use capsync_shared::{ErrorCode, TokenKind};

use crate::outbox::error::OutboxError;
use crate::peer_watch::ForeignReply;
use crate::syncer::error::SyncError;

/// Everything a client call can fail with.
///
/// No variant ever carries a token's secret: the library never puts a token it was
/// given into an error, and the server promises the same for `Failure.message`.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a `Failure` in the call's results: an application error.
    #[error("{}", remote_text(*code, message, *cursor, *retry_after))]
    Remote {
        /// What went wrong, as the server lets the caller know it.
        code: ErrorCode,
        /// The server's text, meant for people.
        message: String,
        /// With [`ErrorCode::CursorConflict`] the share's current cursor; with
        /// [`ErrorCode::SnapshotRequired`] its compaction point (take a snapshot, then
        /// follow from the snapshot's cursor); else 0.
        cursor: u64,
        /// The server's hint (`Failure.retryAfterMs`, with `rateLimited`, `overloaded` and
        /// `storageFull`): retrying sooner than this is pointless. `None` when it gave none.
        retry_after: Option<Duration>,
    },
    /// A transport-level failure (disconnected, overloaded, unimplemented, a malformed
    /// message). Callers branch on `kind` only.
    #[error("{}", rpc_text(.0))]
    Rpc(#[from] capnp::Error),
    /// The peer at the address is not a capsync RPC port: its first bytes were HTTP (the
    /// server's share-page port, say) or not Cap'n Proto at all.
    #[error("{addr} is not a capsync RPC port ({reply})")]
    NotCapsync {
        /// The address connected to.
        addr: String,
        /// What it answered with.
        reply: ForeignReply,
    },
    /// The server did not answer in time.
    #[error("{}", timeout_text(*stage, addr, *after))]
    Timeout {
        /// What was waited for.
        stage: TimeoutStage,
        /// The server's address.
        addr: String,
        /// The limit that passed.
        after: Duration,
    },
    /// Could not reach the server at all.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// The address as the caller gave it.
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading a local file or writing output failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The token redeemed into another kind of capability than the caller needs.
    #[error("this is {} {got} token, but this needs {} {expected} token", article(*got), article(*expected))]
    WrongKind { expected: TokenKind, got: TokenKind },
    /// Client-side validation failed (a bad op file, export, duration or argument).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// `snapshot()` saw the share change between pages on every attempt.
    #[error(
        "the share kept changing while its snapshot was read ({attempts} attempts); try again, or follow it with opsSince"
    )]
    SnapshotUnstable { attempts: u32 },
    /// The local outbox failed (its database or disk), or refused what it was given (an op id
    /// queued again with other content, a token for another share than the one it feeds).
    /// `From<OutboxError>` leaves `path` unset; the CLI names the file.
    #[error("{}", outbox_text(path.as_ref(), error))]
    Outbox {
        /// The outbox file, when the caller knows it.
        path: Option<PathBuf>,
        #[source]
        error: OutboxError,
    },
    /// A syncer stopped for good ([`crate::Syncer::wait_idle`], [`crate::Syncer::fatal`]).
    #[error("{}", sync_text(.0))]
    Sync(#[from] SyncError),
}

/// What a [`ClientError::Timeout`] was waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutStage {
    /// Connecting: the TCP connect, or the handshake while the server has not said a word
    /// ([`crate::ClientOptions::connect_timeout`]).
    Connect,
    /// The answer to redeeming a token, from a server that did answer the bootstrap
    /// request (the same limit).
    Redeem,
    /// The answer to a call ([`crate::Connection::with_call_timeout`]).
    Call,
}

impl From<OutboxError> for ClientError {
    fn from(error: OutboxError) -> Self {
        Self::Outbox { path: None, error }
    }
}

impl From<capnp::NotInSchema> for ClientError {
    /// An enum value or union member this build does not know: the peer speaks a newer schema.
    fn from(e: capnp::NotInSchema) -> Self {
        Self::Rpc(e.into())
    }
}

impl From<std::str::Utf8Error> for ClientError {
    /// Text fields that are not UTF-8 are a malformed message, like any other decoding error.
    fn from(e: std::str::Utf8Error) -> Self {
        Self::Rpc(e.into())
    }
}

impl ClientError {
    /// The wire error code, for [`ClientError::Remote`]; `None` for every local or transport error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How long the server asked the caller to wait before retrying, for
    /// [`ClientError::Remote`] failures that carry the hint.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Remote { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying again later may succeed: the network, a timeout, or the server
    /// `overloaded`, `rateLimited`, `internal` or out of storage (`storageFull`). A
    /// protocol the server does not implement is not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Remote { code, .. } => matches!(
                code,
                ErrorCode::Overloaded
                    | ErrorCode::RateLimited
                    | ErrorCode::Internal
                    | ErrorCode::StorageFull
            ),
            Self::Rpc(e) => e.kind != capnp::ErrorKind::Unimplemented,
            Self::Timeout { .. } | Self::Connect { .. } | Self::Io(_) => true,
            _ => false,
        }
    }

    /// The transport error kind, for [`ClientError::Rpc`].
    pub fn rpc_kind(&self) -> Option<capnp::ErrorKind> {
        match self {
            Self::Rpc(e) => Some(e.kind),
            _ => None,
        }
    }

    /// Whether the connection is gone (the caller must reconnect and redeem again): the
    /// connection closed between messages (`Disconnected`) or part-way through one, such as
    /// a reply cut off (`PrematureEndOfFile`; or `Failed` with capnp's premature end-of-file
    /// text, when the server aborted the connection because its read was cut off).
    pub fn is_disconnected(&self) -> bool {
        match self {
            Self::Rpc(e) => is_disconnect(e),
            _ => false,
        }
    }

    /// A short stable name for machine-readable output (`{"error": {"code": ...}}`):
    /// the wire code for remote failures, a client-side name otherwise.
    pub fn code_str(&self) -> &'static str {
        match self {
            Self::Remote { code, .. } => code.as_str(),
            Self::Rpc(e) => match e.kind {
                _ if is_disconnect(e) => "disconnected",
                capnp::ErrorKind::Overloaded => "transportOverloaded",
                capnp::ErrorKind::Unimplemented => "unimplemented",
                _ => "transport",
            },
            Self::NotCapsync { .. } => "notCapsync",
            Self::Timeout { .. } => "timeout",
            Self::Connect { .. } => "connect",
            Self::Io(_) => "io",
            Self::WrongKind { .. } => "wrongKind",
            Self::InvalidInput(_) => "invalidInput",
            Self::SnapshotUnstable { .. } => "snapshotUnstable",
            Self::Outbox { error, .. } => outbox_code(error),
            Self::Sync(e) => match e {
                SyncError::Revoked(_) => ErrorCode::Revoked.as_str(),
                SyncError::PermissionDenied(_) => ErrorCode::PermissionDenied.as_str(),
                SyncError::Outbox(error) => outbox_code(error),
                SyncError::Busy(_) => "busy",
                SyncError::Stopped(_) => "syncStopped",
            },
        }
    }

    /// Shorthand for [`ClientError::InvalidInput`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }
}

/// Words for people, so the CLI can print `error: permission denied: ...`.
fn code_words(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Internal => "internal server error",
        ErrorCode::Revoked => "revoked",
        ErrorCode::PermissionDenied => "permission denied",
        ErrorCode::NotFound => "not found",
        ErrorCode::InvalidArgument => "invalid argument",
        ErrorCode::TooLarge => "too large",
        ErrorCode::CursorConflict => "cursor conflict",
        ErrorCode::RateLimited => "rate limited",
        ErrorCode::Overloaded => "server overloaded",
        ErrorCode::SnapshotRequired => "snapshot required",
        ErrorCode::StorageFull => "server storage full",
        ErrorCode::OutOfOrder => "pipelined batch out of order",
    }
}

fn remote_text(
    code: ErrorCode,
    message: &str,
    cursor: u64,
    retry_after: Option<Duration>,
) -> String {
    let mut text = code_words(code).to_owned();
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    match code {
        ErrorCode::CursorConflict => text.push_str(&format!(" (current cursor {cursor})")),
        ErrorCode::SnapshotRequired => text.push_str(&format!(" (compaction point {cursor})")),
        _ => {}
    }
    // Some server messages name the wait already ("...; retry in 60s"): once is enough.
    if let Some(wait) = retry_after
        && !message.contains("retry in")
    {
        text.push_str(&format!(" (retry in {})", short_duration(wait)));
    }
    text
}

/// `6s` (whole seconds, rounded up) from a second on, `250ms` below: a wait for people.
fn short_duration(wait: Duration) -> String {
    if wait < Duration::from_secs(1) {
        format!("{}ms", wait.as_millis().max(1))
    } else {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    }
}

fn timeout_text(stage: TimeoutStage, addr: &str, after: Duration) -> String {
    let after = humantime::format_duration(after);
    match stage {
        TimeoutStage::Connect => format!(
            "timed out after {after} connecting to {addr} (no answer from a capsync server: is it running, and is this its RPC port?)"
        ),
        TimeoutStage::Redeem => {
            format!("timed out after {after} redeeming the token at {addr}")
        }
        TimeoutStage::Call => {
            format!("timed out after {after} waiting for the server at {addr} to answer")
        }
    }
}

/// What capnp's `PrematureEndOfFile` displays as. A peer that aborts the connection because
/// its read ended part-way through a message sends this text (in a `Failed` exception).
const PREMATURE_EOF_TEXT: &str = "Premature end of file";

/// See [`ClientError::is_disconnected`].
fn is_disconnect(e: &capnp::Error) -> bool {
    match e.kind {
        capnp::ErrorKind::Disconnected | capnp::ErrorKind::PrematureEndOfFile => true,
        capnp::ErrorKind::Failed => e.extra.contains(PREMATURE_EOF_TEXT),
        _ => false,
    }
}

fn rpc_text(e: &capnp::Error) -> String {
    let what = match e.kind {
        _ if is_disconnect(e) => "disconnected from the server",
        capnp::ErrorKind::Overloaded => "the server is overloaded",
        capnp::ErrorKind::Unimplemented => "the server does not implement this call",
        _ => "rpc failed",
    };
    if e.extra.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {}", e.extra)
    }
}

fn outbox_text(path: Option<&PathBuf>, error: &OutboxError) -> String {
    match path {
        Some(path) => format!("outbox {}: {error}", path.display()),
        None => error.to_string(),
    }
}

fn outbox_code(error: &OutboxError) -> &'static str {
    match error {
        OutboxError::WrongShare { .. } => "wrongShare",
        _ => "outbox",
    }
}

/// Like a remote failure for a refused token (`permission denied: ...`), else the syncer's words.
fn sync_text(e: &SyncError) -> String {
    match e {
        SyncError::Revoked(message) => remote_text(ErrorCode::Revoked, message, 0, None),
        SyncError::PermissionDenied(message) => {
            remote_text(ErrorCode::PermissionDenied, message, 0, None)
        }
        other => other.to_string(),
    }
}

fn article(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Admin | TokenKind::Agent => "an",
        TokenKind::Writer | TokenKind::Viewer => "a",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_errors_read_as_words_then_the_message() {
        let e = ClientError::Remote {
            code: ErrorCode::PermissionDenied,
            message: "token not accepted".into(),
            cursor: 0,
            retry_after: None,
        };
        assert_eq!(e.to_string(), "permission denied: token not accepted");
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
        assert_eq!(e.code_str(), "permissionDenied");

        let e = ClientError::Remote {
            code: ErrorCode::CursorConflict,
            message: "expected 3".into(),
            cursor: 7,
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "cursor conflict: expected 3 (current cursor 7)"
        );
    }

    #[test]
    fn a_retry_hint_is_shown_as_a_short_wait() {
        let full = |retry_after| ClientError::Remote {
            code: ErrorCode::StorageFull,
            message: "the disk is full".into(),
            cursor: 0,
            retry_after,
        };
        let e = full(Some(Duration::from_millis(6_000)));
        assert_eq!(
            e.to_string(),
            "server storage full: the disk is full (retry in 6s)"
        );
        assert_eq!(e.retry_after(), Some(Duration::from_secs(6)));
        assert_eq!(e.code_str(), "storageFull");
        for (ms, shown) in [(5_001, "6s"), (250, "250ms"), (90_000, "1m 30s")] {
            let text = full(Some(Duration::from_millis(ms))).to_string();
            assert!(text.ends_with(&format!("(retry in {shown})")), "{text}");
        }
        let e = full(None);
        assert_eq!(e.to_string(), "server storage full: the disk is full");
        assert_eq!(e.retry_after(), None);
        let worded = ClientError::Remote {
            code: ErrorCode::RateLimited,
            message: "too many failed redeems from this address; retry in 42s".into(),
            cursor: 0,
            retry_after: Some(Duration::from_millis(41_500)),
        };
        assert_eq!(
            worded.to_string(),
            "rate limited: too many failed redeems from this address; retry in 42s"
        );
        assert_eq!(ClientError::invalid("x").retry_after(), None);
    }

    #[test]
    fn timeouts_say_what_timed_out_and_where() {
        let e = ClientError::Timeout {
            stage: TimeoutStage::Connect,
            addr: "10.0.0.1:7420".into(),
            after: Duration::from_secs(10),
        };
        assert_eq!(e.code_str(), "timeout");
        assert!(
            e.to_string()
                .starts_with("timed out after 10s connecting to 10.0.0.1:7420"),
            "{e}"
        );
        let e = ClientError::Timeout {
            stage: TimeoutStage::Call,
            addr: "10.0.0.1:7420".into(),
            after: Duration::from_millis(1500),
        };
        assert_eq!(
            e.to_string(),
            "timed out after 1s 500ms waiting for the server at 10.0.0.1:7420 to answer"
        );
        let e = ClientError::NotCapsync {
            addr: "10.0.0.1:7421".into(),
            reply: ForeignReply::Http,
        };
        assert_eq!(e.code_str(), "notCapsync");
        assert_eq!(
            e.to_string(),
            "10.0.0.1:7421 is not a capsync RPC port (it answered with HTTP: probably the share-page/HTTP port; the RPC port is 7420 by default)"
        );
    }

    #[test]
    fn wrong_kind_names_both_kinds() {
        let e = ClientError::WrongKind {
            expected: TokenKind::Agent,
            got: TokenKind::Viewer,
        };
        assert_eq!(
            e.to_string(),
            "this is a viewer token, but this needs an agent token"
        );
        assert_eq!(e.code(), None);
    }

    #[test]
    fn disconnects_are_recognised() {
        let e = ClientError::from(capnp::Error::disconnected("peer went away".into()));
        assert!(e.is_disconnected());
        assert_eq!(e.code_str(), "disconnected");
        assert_eq!(
            e.to_string(),
            "disconnected from the server: peer went away"
        );
    }

    #[test]
    fn a_connection_closed_inside_a_reply_is_a_disconnect() {
        // What capnp-rpc fails pending calls with when the stream ends part-way through a
        // message: the `std::io::ErrorKind::UnexpectedEof` of the read, converted.
        let cut = capnp::Error::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(cut.kind, capnp::ErrorKind::PrematureEndOfFile);
        let e = ClientError::from(cut);
        assert!(e.is_disconnected(), "{e:?}");
        assert_eq!(e.code_str(), "disconnected");
        assert_eq!(
            e.to_string(),
            "disconnected from the server: unexpected end of file"
        );

        // The server's read was cut and it aborted the connection: its reason arrives in a
        // `Failed` exception, in capnp's words.
        assert_eq!(
            capnp::ErrorKind::PrematureEndOfFile.to_string(),
            PREMATURE_EOF_TEXT
        );
        let aborted = ClientError::from(capnp::Error::failed(
            "remote exception: Premature end of file: unexpected end of file".into(),
        ));
        assert!(aborted.is_disconnected(), "{aborted:?}");

        // Other failures are not disconnects.
        for other in [
            capnp::Error::failed("remote exception: something else".into()),
            capnp::Error::overloaded("busy".into()),
            capnp::Error::unimplemented("no such method".into()),
        ] {
            assert!(!ClientError::from(other).is_disconnected());
        }
        assert!(!ClientError::invalid("unexpected end of file").is_disconnected());
    }

    #[test]
    fn outbox_and_sync_failures_have_their_own_codes() {
        let wrong = OutboxError::WrongShare {
            bound: "sh_a".into(),
            requested: "sh_b".into(),
        };
        let e = ClientError::Outbox {
            path: Some(PathBuf::from("ops.outbox")),
            error: wrong.clone(),
        };
        assert_eq!(e.code_str(), "wrongShare");
        assert!(
            e.to_string()
                .starts_with("outbox ops.outbox: this outbox feeds share sh_a"),
            "{e}"
        );
        let e = ClientError::from(OutboxError::Invalid("damaged".into()));
        assert_eq!(
            (e.code_str(), e.to_string().as_str()),
            ("outbox", "damaged")
        );

        let cases = [
            (
                SyncError::Revoked("mint a new one".into()),
                "revoked",
                "revoked: mint a new one",
            ),
            (
                SyncError::PermissionDenied("not accepted".into()),
                "permissionDenied",
                "permission denied: not accepted",
            ),
            (
                SyncError::Outbox(wrong),
                "wrongShare",
                "this outbox feeds share sh_a",
            ),
            (
                SyncError::Busy("another syncer".into()),
                "busy",
                "another syncer",
            ),
            (
                SyncError::Stopped("share gone".into()),
                "syncStopped",
                "share gone",
            ),
        ];
        for (sync, code, text) in cases {
            let e = ClientError::from(sync);
            assert_eq!(e.code_str(), code);
            assert!(e.to_string().starts_with(text), "{e}");
            assert_eq!(e.code(), None);
        }
    }
}
