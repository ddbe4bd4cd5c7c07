//! Plain Rust mirrors of the schema's data structs, serializable for `--json` output.
//!
//! Times are Unix milliseconds like on the wire, but "none" is `None` here instead of 0.

use std::time::Duration;

pub use capsync_shared::model::{
    Ack, LoggedOp, OpOutcome, OpResult, Record, RecordKind, RejectReason,
};
use capsync_shared::ops::OpSpec;
use serde::Serialize;

/// The live state of a share (`ShareState` in the schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareState {
    pub share_id: String,
    /// Number of ops applied so far; advances by exactly one per applied op.
    pub cursor: u64,
    /// Bumped by revoking the writers scope; older writer tokens stop working.
    pub writer_epoch: u32,
    /// Bumped by revoking the viewers scope; older viewer tokens stop working.
    pub viewer_epoch: u32,
}

/// What a share mirrors and who made it (`ShareInfo` in the schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareInfo {
    pub state: ShareState,
    /// The agent's session this share mirrors.
    pub session_id: String,
    pub project_id: String,
    /// `None` for a root session (the wire's "").
    pub parent_session_id: Option<String>,
    pub title: String,
    pub created_at: i64,
    /// Time of the last applied op (`created_at` before any).
    pub updated_at: i64,
    /// Id of the agent token that created the share.
    pub owner_token_id: String,
    /// When an admin archived it (then it is read-only); `None` when not archived.
    pub archived_at: Option<i64>,
}

/// Sizes and counts of the server's whole store (`Stats` in the schema). Sizes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub db_file_bytes: u64,
    /// The write-ahead log; 0 when there is none.
    pub wal_file_bytes: u64,
    pub page_size: u64,
    pub page_count: u64,
    /// Pages on the freelist.
    pub free_pages: u64,
    /// `free_pages * page_size`: space a vacuum would give back.
    pub reclaimable_bytes: u64,
    pub root_shares: u64,
    /// Shares of a child (sub-agent) session.
    pub child_shares: u64,
    /// Archived shares, also counted as root or child.
    pub archived_shares: u64,
    pub messages: u64,
    pub parts: u64,
    pub ledger_ops: u64,
    pub ledger_payload_bytes: u64,
    /// Ledger ops whose payload was dropped by compaction (their op ids stay).
    pub compacted_ops: u64,
    /// Output and attachments still stored in tool parts marked compacted: what
    /// `reclaim` would clear.
    pub reclaimable_output_bytes: u64,
    /// `sqlite` or `postgres`: the five file and page fields above are SQLite's;
    /// `database_bytes` and `tables` are PostgreSQL's.
    pub engine: String,
    /// PostgreSQL: the whole database (other schemas included).
    pub database_bytes: u64,
    /// PostgreSQL: capsync's tables, by name.
    pub tables: Vec<TableStats>,
}

/// One of capsync's tables in PostgreSQL (`TableStats` in the schema).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TableStats {
    pub name: String,
    /// With its indexes and TOAST data.
    pub total_bytes: u64,
    pub index_bytes: u64,
    /// PostgreSQL's estimates.
    pub live_rows: u64,
    /// Deleted or updated rows autovacuum has not cleaned yet.
    pub dead_rows: u64,
}

/// How long a root must be inactive before a prune takes it, unless told otherwise: 30 days.
pub const DEFAULT_PRUNE_AGE: Duration = Duration::from_secs(30 * 86_400);

/// What [`AdminClient::prune`](crate::AdminClient::prune) deletes (`PruneOptions` in
/// the schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneOptions {
    /// Root shares with no change for longer than this are pruned. A root is a share
    /// whose parent session is held by no share on the server. Must be above zero.
    pub older_than: Duration,
    /// Also prune every descendant session of a pruned share, whatever its project or
    /// age. Without it they stay and are listed in [`PruneReport::kept_children`].
    pub children: bool,
    /// Only archived roots.
    pub archived_only: bool,
    /// Delete nothing: the report says exactly what would be deleted.
    pub dry_run: bool,
    /// Vacuum after deleting (not in a dry run), reported in [`PruneReport::vacuum`].
    pub vacuum: bool,
}

impl PruneOptions {
    /// Roots older than `older_than`, nothing else asked for.
    pub fn older_than(older_than: Duration) -> Self {
        Self {
            older_than,
            children: false,
            archived_only: false,
            dry_run: false,
            vacuum: false,
        }
    }
}

impl Default for PruneOptions {
    /// What `capsync admin prune` does with no flags: roots inactive for 30 days.
    fn default() -> Self {
        Self::older_than(DEFAULT_PRUNE_AGE)
    }
}

/// How a long admin call is getting on: `done` of `total` units of `stage`
/// ("delete": shares; "reclaim": parts scanned; "compact": shares visited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressUpdate {
    pub stage: String,
    pub done: u64,
    pub total: u64,
}

/// Why a share is in a prune report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum PruneReason {
    /// A root inactive past the cutoff.
    Inactive,
    /// A child (or further descendant) of a pruned share, taken with `children`.
    Child,
}

impl PruneReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::Child => "child",
        }
    }
}

/// One share a prune deleted (in a dry run: would delete), with what went with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PrunedShare {
    pub info: ShareInfo,
    pub reason: PruneReason,
    pub messages: u64,
    pub parts: u64,
    /// Ledger rows.
    pub ops: u64,
    pub tokens: u64,
    /// JSON of its records plus its ledger payloads.
    pub bytes: u64,
}

/// Sums over [`PruneReport::shares`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneTotals {
    pub shares: u64,
    pub messages: u64,
    pub parts: u64,
    pub ops: u64,
    pub tokens: u64,
    pub bytes: u64,
}

/// What a prune did, or in a dry run would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PruneReport {
    pub dry_run: bool,
    /// Unix ms: roots last changed before this were selected.
    pub cutoff: i64,
    /// Each share deleted (or that would be), once, even when reached twice.
    pub shares: Vec<PrunedShare>,
    pub totals: PruneTotals,
    /// Children of pruned shares left in place because `children` was not asked for:
    /// their parent is gone, so they are roots from now on.
    pub kept_children: Vec<ShareInfo>,
    /// Selected, but changed between planning and deleting, so left alone.
    pub skipped: Vec<ShareInfo>,
    /// The vacuum that followed, when asked for and not a dry run.
    pub vacuum: Option<VacuumReport>,
}

/// What a full vacuum did. Sizes are of the database file plus its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VacuumReport {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub duration_ms: u64,
}

impl VacuumReport {
    /// Bytes given back to the file system (0 if the file grew).
    pub fn saved_bytes(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

/// What a reclaim pass over compacted tool parts did (or in a dry run would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReclaimReport {
    pub dry_run: bool,
    /// Tool parts marked compacted.
    pub parts_scanned: u64,
    /// Of those, the ones that still held output or attachments.
    pub parts_cleared: u64,
    /// Stored JSON bytes saved.
    pub bytes_reclaimed: u64,
}

/// What a ledger compaction did (or in a dry run would do).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompactReport {
    pub dry_run: bool,
    /// Unix ms: ops applied before this lost their payload.
    pub cutoff: i64,
    /// Shares whose compaction point moved.
    pub shares: u64,
    /// Ops whose payload was dropped (their op ids stay).
    pub ops: u64,
    /// Payload bytes dropped.
    pub bytes: u64,
}

/// A freshly minted sturdy ref. `token` is the whole secret, shown once: keep it safe.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MintedToken {
    pub token: String,
    /// The public part of the token; safe to log, used to revoke it.
    pub token_id: String,
    /// `None` when the token never expires.
    pub expires_at: Option<i64>,
}

impl std::fmt::Debug for MintedToken {
    /// Hides the secret, so a token never lands in a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// One page of a share listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareList {
    pub shares: Vec<ShareInfo>,
    /// Pass as `after` for the next page; `None` when this is the last one.
    pub next_after: Option<String>,
}

/// Which capabilities of a share a revocation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Writers,
    Viewers,
    All,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writers => "writers",
            Self::Viewers => "viewers",
            Self::All => "all",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Scope> for capsync_shared::capsync_capnp::Scope {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::Writers => Self::Writers,
            Scope::Viewers => Self::Viewers,
            Scope::All => Self::All,
        }
    }
}

/// `0` on the wire means "none".
pub(crate) fn nonzero_time(ms: i64) -> Option<i64> {
    (ms != 0).then_some(ms)
}

/// `None` goes on the wire as 0.
pub(crate) fn wire_time(ms: Option<i64>) -> i64 {
    ms.unwrap_or(0)
}

/// A duration as the wire's milliseconds, saturating.
pub(crate) fn wire_millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `""` on the wire means "none".
pub(crate) fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// A batch of ops, applied by the server in order, in one transaction.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Batch {
    /// Client-chosen, for tracing retries in the server's log (at most 128 bytes).
    pub batch_id: String,
    pub ops: Vec<OpSpec>,
    /// When set and the share's cursor differs, the whole batch is refused with
    /// `cursorConflict` (the error carries the current cursor). Fences a stale writer.
    pub expected_cursor: Option<u64>,
    /// Pipelining: the id of the batch sent just before this one on the same writer
    /// capability. The server applies this batch only after that one, and only if it
    /// applied, and otherwise refuses it with `outOfOrder` (see `Batch.after` in the schema, and
    /// [`crate::WriterClient::orders_pipelined_batches`]).
    pub after: Option<String>,
}

impl Batch {
    pub fn new(batch_id: impl Into<String>, ops: Vec<OpSpec>) -> Self {
        Self {
            batch_id: batch_id.into(),
            ops,
            expected_cursor: None,
            after: None,
        }
    }

    /// This batch, to follow batch `previous` sent just before it on the same capability.
    pub fn after(mut self, previous: impl Into<String>) -> Self {
        self.after = Some(previous.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_debug_hides_the_secret() {
        let t = MintedToken {
            token: "csviewer_0011223344556677_secretsecret".into(),
            token_id: "0011223344556677".into(),
            expires_at: None,
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("secretsecret"));
        assert!(shown.contains("0011223344556677"));
    }

    #[test]
    fn json_field_names_follow_the_schema() {
        let state = ShareState {
            share_id: "sh_1".into(),
            cursor: 3,
            writer_epoch: 1,
            viewer_epoch: 2,
        };
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"shareId": "sh_1", "cursor": 3, "writerEpoch": 1, "viewerEpoch": 2})
        );
        assert_eq!(serde_json::to_value(Scope::All).unwrap(), "all");
    }
}
