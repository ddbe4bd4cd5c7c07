//! Why a syncer stopped for good: a leaf the crate's error type can name without depending
//! on the syncer.

use crate::outbox::error::OutboxError;

/// Why a syncer stopped for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SyncError {
    /// The writer token (or the live capability) was revoked.
    #[error("{0}")]
    Revoked(String),
    /// The token is not accepted (unknown, wrong, expired or revoked; the server does
    /// not say which), or may not append.
    #[error("{0}")]
    PermissionDenied(String),
    /// The outbox failed, or feeds another share ([`OutboxError::WrongShare`]).
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    /// Another syncer, in this process or another, is sending from the same outbox file.
    #[error("{0}")]
    Busy(String),
    /// Anything else that retrying cannot fix (a token of the wrong kind, a deleted share, a
    /// server that does not speak the protocol), or the task ended.
    #[error("{0}")]
    Stopped(String),
}
