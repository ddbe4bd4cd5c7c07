//! What a failed call means for the syncer: retry later, give up for good, or (for a batch
//! refused whole) change the batch.

use std::time::Duration;

use capsync_shared::ErrorCode;

use super::SyncError;
use crate::error::ClientError;
use crate::outbox::RejectedReason;

/// What to tell the user when a writer token stops working.
const REVOKED: &str = "the share's writer token was revoked; mint a new one (capsync share mint-writer) and sync again";

/// After a failed connect or redeem.
#[derive(Debug)]
pub(super) enum ConnectFailure {
    /// The token will never work again (or is not a writer token): stop.
    Fatal(SyncError),
    /// Network, timeouts, a server that is shutting down, rate limiting or out of storage:
    /// back off (at least `retry_after`, the server's hint, if it gave one), retry.
    Retry {
        message: String,
        retry_after: Option<Duration>,
    },
}

/// After a failed `appendOps`.
#[derive(Debug)]
pub(super) enum AppendFailure {
    /// The capability is dead (revoked, refused) or the share is gone: stop.
    Fatal(SyncError),
    /// The server refused the batch whole and will refuse it again as it is: split it or,
    /// for a single op, reject that op for this reason.
    Refused(RejectedReason),
    /// `expectedCursor` did not match; carries the share's current cursor.
    CursorConflict(u64),
    /// Transport errors, timeouts, `overloaded`, `rateLimited`, `storageFull`, `internal`:
    /// back off (at least `retry_after`, the server's hint, if it gave one), then send the
    /// same batch again on a new connection.
    Retry { retry_after: Option<Duration> },
}

/// What to tell the user when `--server` (or [`crate::SyncOptions::server`]) is not a
/// capsync RPC port: retrying will not change what listens there.
fn not_capsync(error: &ClientError) -> SyncError {
    SyncError::Stopped(format!("{error}; check the server address"))
}

pub(super) fn connect_failure(error: &ClientError) -> ConnectFailure {
    if error.is_transient() {
        return ConnectFailure::Retry {
            message: error.to_string(),
            retry_after: error.retry_after(),
        };
    }
    match error {
        ClientError::Remote { code, .. } => match code {
            ErrorCode::Revoked => ConnectFailure::Fatal(SyncError::Revoked(REVOKED.into())),
            // The server gives this one answer for unknown, wrong, expired and revoked
            // tokens alike; none of them gets better by retrying.
            ErrorCode::PermissionDenied => ConnectFailure::Fatal(SyncError::PermissionDenied(
                "the writer token was not accepted (unknown, wrong, expired or revoked); mint a new one (capsync share mint-writer)".into(),
            )),
            _ => ConnectFailure::Fatal(SyncError::Stopped(format!(
                "redeeming the writer token failed: {error}"
            ))),
        },
        ClientError::Rpc(e) if e.kind == capnp::ErrorKind::Unimplemented => {
            ConnectFailure::Fatal(SyncError::Stopped(format!(
                "the server does not speak this protocol: {error}"
            )))
        }
        ClientError::NotCapsync { .. } => ConnectFailure::Fatal(not_capsync(error)),
        ClientError::Rpc(_)
        | ClientError::Timeout { .. }
        | ClientError::Connect { .. }
        | ClientError::Io(_) => unreachable!("transient errors are retried above"),
        ClientError::WrongKind { .. } => ConnectFailure::Fatal(SyncError::Stopped(format!(
            "{error}: the syncer needs the share's writer token"
        ))),
        // Connecting and redeeming never fail with these.
        ClientError::InvalidInput(_)
        | ClientError::SnapshotUnstable { .. }
        | ClientError::Outbox { .. }
        | ClientError::Sync(_) => ConnectFailure::Fatal(SyncError::Stopped(error.to_string())),
    }
}

pub(super) fn append_failure(error: &ClientError) -> AppendFailure {
    match error {
        ClientError::Remote { code, cursor, .. } => match code {
            ErrorCode::Revoked => AppendFailure::Fatal(SyncError::Revoked(REVOKED.into())),
            ErrorCode::PermissionDenied => {
                AppendFailure::Fatal(SyncError::PermissionDenied(format!(
                    "the server refused to append with this writer token ({error}); mint a new one (capsync share mint-writer)"
                )))
            }
            ErrorCode::NotFound => AppendFailure::Fatal(SyncError::Stopped(format!(
                "the share no longer exists on the server ({error})"
            ))),
            ErrorCode::TooLarge => AppendFailure::Refused(RejectedReason::TooLarge),
            ErrorCode::InvalidArgument => AppendFailure::Refused(RejectedReason::Invalid),
            ErrorCode::CursorConflict => AppendFailure::CursorConflict(*cursor),
            // Only reads answer this; an append never should.
            ErrorCode::SnapshotRequired => AppendFailure::Fatal(SyncError::Stopped(format!(
                "unexpected answer to an append ({error})"
            ))),
            // The batch sent before it on this connection was not acked: nothing of this
            // one was applied. Sent again, in order, after the one before it.
            ErrorCode::OutOfOrder
            | ErrorCode::Overloaded
            | ErrorCode::RateLimited
            | ErrorCode::Internal
            | ErrorCode::StorageFull => AppendFailure::Retry {
                retry_after: error.retry_after(),
            },
        },
        ClientError::Rpc(e) if e.kind == capnp::ErrorKind::Unimplemented => AppendFailure::Fatal(
            SyncError::Stopped(format!("the server does not speak this protocol: {error}")),
        ),
        ClientError::NotCapsync { .. } => AppendFailure::Fatal(not_capsync(error)),
        ClientError::Rpc(_)
        | ClientError::Timeout { .. }
        | ClientError::Connect { .. }
        | ClientError::Io(_) => AppendFailure::Retry { retry_after: None },
        // The outbox checks ops when they are enqueued, so the client refusing to encode
        // one means the outbox file was edited by hand: nothing a retry can fix. (An append
        // never fails with the rest.)
        ClientError::InvalidInput(_)
        | ClientError::WrongKind { .. }
        | ClientError::SnapshotUnstable { .. }
        | ClientError::Outbox { .. }
        | ClientError::Sync(_) => AppendFailure::Fatal(SyncError::Stopped(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(code: ErrorCode) -> ClientError {
        ClientError::Remote {
            code,
            message: "the server's words".into(),
            cursor: 7,
            retry_after: None,
        }
    }

    #[test]
    fn dead_capabilities_stop_the_syncer_with_a_clear_message() {
        let AppendFailure::Fatal(SyncError::Revoked(msg)) =
            append_failure(&remote(ErrorCode::Revoked))
        else {
            panic!("revoked must be fatal");
        };
        assert!(
            msg.contains("revoked") && msg.contains("mint a new one"),
            "{msg}"
        );
        assert!(matches!(
            append_failure(&remote(ErrorCode::PermissionDenied)),
            AppendFailure::Fatal(SyncError::PermissionDenied(_))
        ));
        assert!(matches!(
            append_failure(&remote(ErrorCode::NotFound)),
            AppendFailure::Fatal(SyncError::Stopped(_))
        ));
        assert!(matches!(
            connect_failure(&remote(ErrorCode::PermissionDenied)),
            ConnectFailure::Fatal(SyncError::PermissionDenied(_))
        ));
        assert!(matches!(
            connect_failure(&remote(ErrorCode::Revoked)),
            ConnectFailure::Fatal(SyncError::Revoked(_))
        ));
        let wrong = ClientError::WrongKind {
            expected: capsync_shared::TokenKind::Writer,
            got: capsync_shared::TokenKind::Viewer,
        };
        let ConnectFailure::Fatal(SyncError::Stopped(msg)) = connect_failure(&wrong) else {
            panic!("a viewer token must be fatal");
        };
        assert!(msg.contains("writer token"), "{msg}");
    }

    #[test]
    fn transient_failures_are_retried() {
        for code in [
            ErrorCode::Overloaded,
            ErrorCode::RateLimited,
            ErrorCode::StorageFull,
            ErrorCode::Internal,
        ] {
            assert!(matches!(
                append_failure(&remote(code)),
                AppendFailure::Retry { retry_after: None }
            ));
            assert!(matches!(
                connect_failure(&remote(code)),
                ConnectFailure::Retry {
                    retry_after: None,
                    ..
                }
            ));
        }
        let gone = ClientError::from(capnp::Error::disconnected("reset".into()));
        assert!(matches!(append_failure(&gone), AppendFailure::Retry { .. }));
        assert!(matches!(
            connect_failure(&gone),
            ConnectFailure::Retry { .. }
        ));
        let silent = ClientError::Timeout {
            stage: crate::error::TimeoutStage::Connect,
            addr: "127.0.0.1:1".into(),
            after: Duration::from_secs(10),
        };
        assert!(matches!(
            connect_failure(&silent),
            ConnectFailure::Retry { .. }
        ));
        let refused = ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        assert!(matches!(
            connect_failure(&refused),
            ConnectFailure::Retry { .. }
        ));
    }

    #[test]
    fn the_server_hint_goes_with_the_retry() {
        let hinted = |code| ClientError::Remote {
            code,
            message: "later".into(),
            cursor: 0,
            retry_after: Some(Duration::from_secs(6)),
        };
        for code in [
            ErrorCode::Overloaded,
            ErrorCode::RateLimited,
            ErrorCode::StorageFull,
        ] {
            let AppendFailure::Retry { retry_after } = append_failure(&hinted(code)) else {
                panic!("{code:?} must be retried");
            };
            assert_eq!(retry_after, Some(Duration::from_secs(6)));
            let ConnectFailure::Retry {
                retry_after,
                message,
            } = connect_failure(&hinted(code))
            else {
                panic!("{code:?} must be retried");
            };
            assert_eq!(retry_after, Some(Duration::from_secs(6)));
            assert!(message.ends_with("(retry in 6s)"), "{message}");
        }
    }

    #[test]
    fn a_port_that_is_not_capsync_stops_the_syncer() {
        let http = ClientError::NotCapsync {
            addr: "127.0.0.1:7421".into(),
            reply: crate::ForeignReply::Http,
        };
        let ConnectFailure::Fatal(SyncError::Stopped(msg)) = connect_failure(&http) else {
            panic!("a share-page port must be fatal");
        };
        assert!(msg.contains("not a capsync RPC port"), "{msg}");
        assert!(matches!(
            append_failure(&http),
            AppendFailure::Fatal(SyncError::Stopped(_))
        ));
    }

    #[test]
    fn whole_batch_refusals_change_the_batch() {
        assert!(matches!(
            append_failure(&remote(ErrorCode::TooLarge)),
            AppendFailure::Refused(RejectedReason::TooLarge)
        ));
        assert!(matches!(
            append_failure(&remote(ErrorCode::InvalidArgument)),
            AppendFailure::Refused(RejectedReason::Invalid)
        ));
        assert!(matches!(
            append_failure(&remote(ErrorCode::CursorConflict)),
            AppendFailure::CursorConflict(7)
        ));
    }
}
