//! The agent's durable outbox: ops wait in a SQLite file on the agent's machine until the
//! server has acked them, so nothing is lost to a crash, a restart or a network failure.
//!
//! Life of an op:
//! - [`Outbox::enqueue`] stores it (`pending`) and returns only once that is durable.
//! - [`Outbox::next_batch`] puts the oldest sendable ops into a batch, persisted with its
//!   id and each op's position, and marks them `inFlight`. Until that batch is acked, every
//!   call hands out exactly the same batch again, across process restarts too: a retry
//!   carries the same ops in the same order under the same batch id.
//! - [`Outbox::record_ack`] settles each op in one transaction with the share's cursor:
//!   `acked` (applied or duplicate), `rejected` (invalid, staleTransition: final), or
//!   `waiting` (missingDependency: held until an op it depends on is acked here).
//! - [`Outbox::record_failure`] counts a failed attempt; the batch stays as it is.
//!
//! One syncer sends from an outbox at a time (the syncer holds a lock file for that): two
//! would both send the same in-flight batch. Harmless to the share, the server dedupes by op
//! id, but the slower ack would be refused here. Acked rows are kept; nothing here deletes
//! them.
//!
//! Modules: `schema` (the file, pragmas, migrations and the table layout), `enqueue`,
//! `batching`, `acks`, `meta` (bound share, cursor, last error), `status`, `error`. The
//! handle is `Clone + Send + Sync`; every async method runs its SQLite work on tokio's
//! blocking pool, never on the async thread.

mod acks;
mod batching;
mod enqueue;
pub(crate) mod error;
mod meta;
mod schema;
mod status;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use capsync_shared::ops::OpSpec;
use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::Notify;

pub use batching::MAX_BATCH_BYTES;
pub use enqueue::MAX_PAYLOAD_BYTES;
pub use error::OutboxError;

/// The values of `ops.state`.
mod op_state {
    pub const PENDING: &str = "pending";
    pub const IN_FLIGHT: &str = "inFlight";
    pub const WAITING: &str = "waiting";
    pub const ACKED: &str = "acked";
    pub const REJECTED: &str = "rejected";
}

/// The values of `batches.state`.
mod batch_state {
    pub const IN_FLIGHT: &str = "inFlight";
    pub const DONE: &str = "done";
    pub const SPLIT: &str = "split";
}

/// A handle on an outbox file. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    /// The one connection. A mutex, not a pool: every operation is a short transaction,
    /// and one writer at a time is what SQLite allows anyway.
    conn: Mutex<Connection>,
    /// For messages.
    path: PathBuf,
    /// Woken after every enqueue (and after an ack releases waiting ops), so a syncer
    /// sends at once instead of polling.
    changed: Arc<Notify>,
    /// Counts enqueue transactions through this handle and its clones. `Syncer::wait_idle`
    /// compares it with the count the syncer had seen when it last found nothing to send.
    generation: AtomicU64,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// What [`Outbox::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Enqueued {
    /// Stored now.
    Queued,
    /// The same op (id, kind, payload, dependsOn) was already in the outbox; nothing changed.
    AlreadyQueued,
}

/// A batch to send: exactly what [`Outbox::next_batch`] persisted.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxBatch {
    /// `ob-<seq of its first op>-<batch number>`; the same on every attempt.
    pub batch_id: String,
    /// In batch order.
    pub ops: Vec<OpSpec>,
    /// Failed attempts so far (0 on the first send).
    pub attempts: u32,
}

/// What one ack did to the batch's ops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AckSummary {
    pub applied: usize,
    pub duplicates: usize,
    /// Rejected for good ([`RejectedReason::Invalid`], [`RejectedReason::StaleTransition`]).
    pub rejected: usize,
    /// Refused for a missing dependency: held until that op is acked.
    pub waiting: usize,
    /// The share's cursor after the batch.
    pub cursor: u64,
}

/// Counts and progress, for `capsync outbox status` and the syncer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxStatus {
    /// The share this outbox feeds (`None` until a syncer first redeemed its token).
    pub share_id: Option<String>,
    /// The server it was last synced with, for display.
    pub server: Option<String>,
    /// Queued and not yet sent.
    pub pending: u64,
    /// In a batch sent (or about to be sent) and not acked yet.
    pub in_flight: u64,
    /// Refused for a missing dependency; sent again once that op is acked here.
    pub waiting: u64,
    pub acked: u64,
    /// Refused for good; see [`Outbox::rejected`].
    pub rejected: u64,
    /// The share's cursor as the server last reported it.
    pub last_cursor: Option<u64>,
    /// The most recent failure, cleared by the next ack.
    pub last_error: Option<String>,
    /// When the oldest in-flight batch may be sent again after a failure (Unix ms).
    pub next_retry_at: Option<i64>,
}

/// One op the server refused for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedEntry {
    pub op_id: String,
    pub reason: RejectedReason,
    /// The server's words.
    pub detail: String,
}

/// Why the server refused an op for good: [`RejectedEntry::reason`]. Serializes as (and is
/// stored in the outbox file as) `invalid`, `staleTransition`, `opIdReused` or `tooLarge`.
///
/// Not [`crate::RejectReason`], the reason in one op's ack: `missingDependency` is never final
/// here (the op waits), and `tooLarge` comes from a batch refused whole, split down to this op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RejectedReason {
    /// The op can never apply as sent (malformed payload, another session's record, a part
    /// whose message does not exist, ...).
    Invalid,
    /// An older snapshot of a record than the one in the share (see the server's
    /// `staleTransition`): no fault of the op's author, the newer state is in the share.
    StaleTransition,
    /// The op alone exceeds a server limit.
    TooLarge,
    /// The server holds other content under this op id (applied earlier, e.g. by another
    /// outbox writing to the same share): the op was never applied.
    OpIdReused,
}

impl RejectedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::StaleTransition => "staleTransition",
            Self::TooLarge => "tooLarge",
            Self::OpIdReused => "opIdReused",
        }
    }

    /// The value [`RejectedReason::as_str`] gives, as read back from the outbox file.
    fn parse(text: &str) -> Option<Self> {
        [
            Self::Invalid,
            Self::StaleTransition,
            Self::TooLarge,
            Self::OpIdReused,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == text)
    }
}

impl std::fmt::Display for RejectedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`Outbox::record_refusal`] did with a batch the server refused whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Refusal {
    /// Replaced by two halves (in flight, first half first), to be sent one after the other.
    Split { first: String, second: String },
    /// The batch held one op: that op is rejected for good.
    Rejected { op_id: String },
}

impl Outbox {
    /// Opens or creates the outbox file (and its parent directories): WAL,
    /// `synchronous=FULL`, versioned migrations. Blocking; call it at startup.
    pub fn open(path: impl AsRef<Path>) -> Result<Outbox, OutboxError> {
        let path = path.as_ref();
        let conn = schema::open(path)?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                path: path.to_owned(),
                changed: Arc::new(Notify::new()),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// The outbox file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Woken whenever ops are enqueued (or released by an ack), so a syncer sends at once.
    ///
    /// Register interest (`Notified::enable`) before looking at the outbox, or an enqueue
    /// between the look and the wait is missed; a stored permit covers one late waiter.
    pub fn changed(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }

    /// How many enqueue transactions this handle (and its clones) committed.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    fn notify_changed(&self) {
        // Every current waiter, plus one permit for a waiter that is about to register.
        self.inner.changed.notify_waiters();
        self.inner.changed.notify_one();
    }

    fn bump_generation(&self) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
        self.notify_changed();
    }

    /// Runs `work` on the connection on tokio's blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T, OutboxError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    {
        let inner = self.inner.clone();
        let task = tokio::task::spawn_blocking(move || {
            // A panic inside a transaction rolled it back while unwinding: the connection
            // is consistent, so a poisoned lock is safe to take over.
            let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut conn)
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(std::io::Error::other(format!("outbox task did not run: {e}")).into()),
        }
    }
}

/// Milliseconds since the Unix epoch, for the informational timestamps in the file.
fn now() -> i64 {
    capsync_shared::now_millis()
}

/// A u64 cursor as SQLite's i64 (cursors never come near 2^63).
fn cursor_to_sql(cursor: u64) -> Result<i64, OutboxError> {
    i64::try_from(cursor).map_err(|_| OutboxError::invalid(format!("cursor {cursor} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RejectReason;

    #[test]
    fn rejected_reasons_read_back_and_serialize_as_stored() {
        for reason in [
            RejectedReason::Invalid,
            RejectedReason::StaleTransition,
            RejectedReason::TooLarge,
            RejectedReason::OpIdReused,
        ] {
            assert_eq!(RejectedReason::parse(reason.as_str()), Some(reason));
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::from(reason.as_str())
            );
        }
        // The per-op reasons the ack stores for rejected ops are spelled the same.
        for reason in [
            RejectReason::Invalid,
            RejectReason::StaleTransition,
            RejectReason::OpIdReused,
            RejectReason::TooLarge,
        ] {
            assert!(RejectedReason::parse(reason.as_str()).is_some(), "{reason}");
        }
        assert_eq!(RejectedReason::parse("missingDependency"), None);
    }
}
