//! Errors as callers see them: a wire code plus a message that never carries internals.
//!
//! Three layers: storage errors (`LedgerError`, may hold engine text), this
//! `ServerError` (what the RPC layer decides to tell), and the schema's
//! `ErrorCode`. Anything without a specific code becomes `internal`, and its
//! detail goes to the log only.

use capsync_shared::capsync_capnp::failure;
use capsync_shared::{Cursor, ErrorCode};

use crate::ledger::LedgerError;

/// An application-level failure to put in a result's `failure` branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    pub code: ErrorCode,
    /// Safe to send: written for the caller, never copied from an internal error.
    pub message: String,
    /// The share's cursor for `cursorConflict`; the compaction point for `snapshotRequired`.
    pub cursor: Cursor,
}

impl ServerError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            cursor: Cursor(0),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
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
            LedgerError::CursorConflict(cursor) => Self {
                code: ErrorCode::CursorConflict,
                message: "expectedCursor does not match the share's cursor".into(),
                cursor,
            },
            LedgerError::InvalidArgument(why) => Self::invalid(why),
            LedgerError::SnapshotRequired(point) => Self {
                code: ErrorCode::SnapshotRequired,
                message: format!(
                    "ops up to cursor {point} were compacted; take a snapshot and follow from its cursor"
                ),
                cursor: point,
            },
            LedgerError::Busy => Self::new(ErrorCode::Overloaded, "database busy; try again"),
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
