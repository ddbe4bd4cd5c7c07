//! Errors as callers see them: a wire code plus a message that never carries internals.
//!
//! Three layers: storage errors (`LedgerError`, may hold engine text), this
//! `ServerError` (what the RPC layer decides to tell), and the schema's
//! `ErrorCode`. Anything without a specific code becomes `internal`, and its
//! detail goes to the log only.

use std::time::Duration;

use capsync_shared::capsync_capnp::failure;
use capsync_shared::{Cursor, ErrorCode};

use crate::ledger::LedgerError;

/// An application-level failure to put in a result's `failure` branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub code: ErrorCode,
    /// Safe to send: written for the caller, never copied from an internal error.
    pub message: String,
    /// The share's cursor for `cursorConflict` (and for `invalidArgument` about
    /// a cursor beyond it); the compaction point for `snapshotRequired`.
    pub cursor: Cursor,
    /// How long the caller should wait before retrying, when the server knows.
    pub retry_after: Option<Duration>,
}

/// The wait suggested after `overloaded`: long enough for a queue to drain a little.
const OVERLOADED_RETRY: Duration = Duration::from_millis(200);
/// The wait suggested after `storageFull`: space comes back when someone frees it.
const STORAGE_FULL_RETRY: Duration = Duration::from_secs(5);

impl ServerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            cursor: Cursor(0),
            retry_after: None,
        }
    }

    /// Suggests a wait before retrying (`retryAfterMs` on the wire).
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Busy for now; retrying after a short wait is expected to work.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Overloaded, message).retry_after(OVERLOADED_RETRY)
    }

    pub fn storage_full() -> Self {
        Self::new(
            ErrorCode::StorageFull,
            "server storage is full; nothing was stored, retry later",
        )
        .retry_after(STORAGE_FULL_RETRY)
    }

    /// Too many failed redeems; `wait` is when the limit lets the next one through.
    pub fn rate_limited(what: &str, wait: Duration) -> Self {
        // Whole seconds for people; the exact wait travels in `retryAfterMs`.
        let seconds = wait.as_millis().div_ceil(1000).max(1);
        Self::new(
            ErrorCode::RateLimited,
            format!("too many failed redeems {what}; retry in {seconds}s"),
        )
        .retry_after(wait)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }

    /// A pipelined batch whose `after` batch was not the one sent just before it, or
    /// was not applied.
    pub fn out_of_order(batch_id: &str, after: &str) -> Self {
        Self::new(
            ErrorCode::OutOfOrder,
            format!(
                "batch {batch_id} follows batch {after}, which was not the batch sent just \
                 before it on this capability or was not applied; nothing of it was applied"
            ),
        )
    }

    /// The one answer for every failed authentication, whatever the reason.
    pub fn denied() -> Self {
        Self::new(
            ErrorCode::PermissionDenied,
            "token not accepted (unknown, wrong, expired or revoked)",
        )
    }

    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error; see the server log")
    }

    pub fn shutting_down() -> Self {
        Self::new(
            ErrorCode::Overloaded,
            "server is shutting down; retry later",
        )
    }

    pub fn fill(&self, mut out: failure::Builder<'_>) {
        out.set_code(self.code.into());
        out.set_message(&self.message);
        out.set_cursor(self.cursor.0);
        let retry_after = self.retry_after.map_or(0, |wait| {
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        out.set_retry_after_ms(retry_after);
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<LedgerError> for ServerError {
    fn from(err: LedgerError) -> Self {
        match err {
            LedgerError::NotFound => Self::new(ErrorCode::NotFound, "share not found"),
            LedgerError::Revoked => Self::new(
                ErrorCode::Revoked,
                "this capability was revoked; the share's owner can mint a new token",
            ),
            LedgerError::PermissionDenied => Self::denied(),
            LedgerError::OutOfOrder => Self::new(
                ErrorCode::OutOfOrder,
                "this batch follows a batch that was not applied; nothing of it was applied",
            ),
            LedgerError::CursorConflict(cursor) => Self {
                cursor,
                ..Self::new(
                    ErrorCode::CursorConflict,
                    "expectedCursor does not match the share's cursor",
                )
            },
            LedgerError::CursorAhead { asked, cursor } => Self {
                cursor,
                ..Self::invalid(format!(
                    "cursor {asked} is beyond the share's cursor {cursor}: this share never had \
                     such an op (is this the server the cursor came from?)"
                ))
            },
            LedgerError::InvalidArgument(why) => Self::invalid(why),
            LedgerError::SnapshotRequired(point) => Self {
                cursor: point,
                ..Self::new(
                    ErrorCode::SnapshotRequired,
                    format!(
                        "ops up to cursor {point} were compacted; take a snapshot and follow from its cursor"
                    ),
                )
            },
            LedgerError::Busy => Self::overloaded("database busy; try again"),
            LedgerError::QueueFull => {
                Self::overloaded("server busy: too many writes waiting; retry")
            }
            LedgerError::StorageFull => Self::storage_full(),
            LedgerError::Closed => Self::shutting_down(),
            LedgerError::Storage(detail) => {
                tracing::error!(%detail, "storage error");
                Self::internal()
            }
        }
    }
}

/// Reading a request failed (a malformed message from the peer): an invalid argument.
impl From<capnp::Error> for ServerError {
    fn from(err: capnp::Error) -> Self {
        Self::invalid(format!("malformed request: {}", err.extra))
    }
}

impl From<capnp::NotInSchema> for ServerError {
    fn from(err: capnp::NotInSchema) -> Self {
        Self::invalid(format!("unknown enum value {}", err.0))
    }
}
