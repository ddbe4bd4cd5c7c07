//! The plain data of the op and record model: stored records, logged ops and append outcomes.
//!
//! Server and client both use these types (the server's ledger produces them,
//! the client decodes them from the wire); they serialize in camelCase for
//! `--json` output and the HTTP API.

use serde::Serialize;

use crate::ids::{Cursor, OpId};
use crate::ops::OpKind;

/// What a stored record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RecordKind {
    Session,
    Model,
    /// The whole diff list, as one JSON array.
    Diffs,
    Message,
    Part,
}

/// A stored record of a share's session, as the agent last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub kind: RecordKind,
    /// Record id; "" for the session and the diffs.
    pub id: String,
    /// The message a part belongs to; "" for other kinds.
    pub message_id: String,
    /// The record's JSON text.
    pub json: String,
}

/// One applied op as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedOp {
    pub cursor: Cursor,
    pub op_id: OpId,
    pub kind: OpKind,
    /// The payload's JSON text as it was stored (the agent's, unless reclaim cleared
    /// a compacted tool part's output; empty once ledger compaction dropped it).
    pub payload: String,
    /// Unix milliseconds.
    pub applied_at: i64,
}

/// Why the server refused one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum RejectReason {
    /// An op id in the op's `dependsOn` is not applied yet: send it again after that op.
    /// (Only `dependsOn`: a part whose message has not arrived is kept, not refused.)
    MissingDependency,
    /// The op can never apply as sent; the detail says why (malformed payload, another
    /// session's record, a delta to a part that does not exist, ...).
    Invalid,
    /// An older snapshot of a record than the one stored (a finished message or part
    /// back to unfinished, a session to an older `time.updated`): no fault of the op's
    /// author, the newer state is in the share.
    StaleTransition,
    /// The op id was applied before with other content (kind, payload or `dependsOn`): an
    /// op id names one change forever, so the first one stays and this one is refused.
    OpIdReused,
    /// The op's payload is over the server's per-op limit; the rest of its batch applied.
    TooLarge,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingDependency => "missingDependency",
            Self::Invalid => "invalid",
            Self::StaleTransition => "staleTransition",
            Self::OpIdReused => "opIdReused",
            Self::TooLarge => "tooLarge",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one op.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum OpOutcome {
    /// Applied by this batch, at this cursor.
    Applied(Cursor),
    /// Already in the ledger, applied at this cursor; nothing changed.
    Duplicate(Cursor),
    Rejected {
        reason: RejectReason,
        /// A short sentence for the op's author.
        detail: String,
    },
}

/// One op's result, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpResult {
    pub op_id: OpId,
    pub outcome: OpOutcome,
}

/// The server's answer to a batch, sent only once the batch is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// The share's cursor after this batch.
    pub cursor: Cursor,
    /// One per op, in batch order.
    pub results: Vec<OpResult>,
}

impl Ack {
    pub fn applied(&self) -> usize {
        self.count(|o| matches!(o, OpOutcome::Applied(_)))
    }

    pub fn duplicates(&self) -> usize {
        self.count(|o| matches!(o, OpOutcome::Duplicate(_)))
    }

    pub fn rejected(&self) -> usize {
        self.count(|o| matches!(o, OpOutcome::Rejected { .. }))
    }

    /// The rejected ops with their reason and detail.
    pub fn rejections(&self) -> impl Iterator<Item = (&str, RejectReason, &str)> {
        self.results.iter().filter_map(|r| match &r.outcome {
            OpOutcome::Rejected { reason, detail } => {
                Some((r.op_id.as_str(), *reason, detail.as_str()))
            }
            _ => None,
        })
    }

    fn count(&self, pred: impl Fn(&OpOutcome) -> bool) -> usize {
        self.results.iter().filter(|r| pred(&r.outcome)).count()
    }
}
