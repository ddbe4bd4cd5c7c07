//! What the outbox can fail with.

use std::sync::Arc;

/// An outbox failure.
///
/// `Clone`, so a syncer that stopped on one can hand it to every caller of `wait_idle`:
/// the underlying SQLite and I/O errors are shared behind an `Arc` for that.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    /// The outbox database failed (disk full, file locked by another program, corrupt).
    #[error("outbox database: {0}")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    /// Creating the outbox's directory, or running its work off the async thread, failed.
    #[error("outbox i/o: {0}")]
    Io(#[source] Arc<std::io::Error>),
    /// The op id is already queued with a different kind, payload or `dependsOn`. Op ids
    /// are forever: the server would answer `duplicate` and never apply the new content.
    #[error("op {op_id} is already queued with different content; an op id names one op forever")]
    Conflict { op_id: String },
    /// The caller handed the outbox something it cannot send (bad op id, an ack that does
    /// not belong to the batch, a file from a newer build, ...). The text says what.
    #[error("{0}")]
    Invalid(String),
    /// The outbox feeds another share: its ops must never go anywhere else.
    #[error(
        "this outbox feeds share {bound}, not {requested}; use another outbox file for another share"
    )]
    WrongShare { bound: String, requested: String },
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(Arc::new(e))
    }
}

impl From<std::io::Error> for OutboxError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl OutboxError {
    /// Shorthand for [`OutboxError::Invalid`].
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }
}
