//! The storage seam: a small, typed, `Send + Clone` handle the RPC layer calls.
//!
//! The RPC layer never touches SQL. Every call carries the caller's
//! [`Authority`] (the token it redeemed), and the backend checks it in the same
//! transaction as the work: a revocation that commits before an append makes
//! that append fail, on every connection, with no in-memory cache to go stale.
//!
//! Each storage engine is an [`engine::Engine`] under the one [`Backend`],
//! [`engine::RulesBackend`], which runs the engine-neutral [`rules`]: [`sqlite`] is
//! the embedded default (one writer thread with group commit, plus read
//! connections), [`postgres`] serves several server processes on one database.
//! The behaviour every engine owes its callers is tested once, engine-neutral,
//! by the contract suite (`contract`, test builds only), which each engine runs.

#[cfg(test)]
pub(crate) mod contract;
pub mod engine;
pub mod lifecycle_steps;
pub(crate) mod migrations;
pub mod move_to_postgres;
pub mod oversize;
pub mod postgres;
pub mod rules;
pub mod sqlite;
pub mod storage_stats;

use capsync_shared::{Cursor, Epoch, OpId, OpKind, ShareId, TokenId, TokenKind};
use futures::future::BoxFuture;
use std::sync::Arc;

use crate::clock::Clock;
pub use rules::batch_order::BatchLink;

pub use storage_stats::{PostgresStats, SqliteStats, StorageStats, TableStats};

pub use capsync_shared::model::{
    Ack, LoggedOp, OpOutcome, OpResult, Record, RecordKind, RejectReason,
};
pub use lifecycle_steps::{
    CompactPosition, CompactStep, DeleteStep, Operator, PlannedShare, PruneFilter, PrunePlan,
    PruneReason, PruneSelect, ReclaimStep, ShareFootprint, VacuumReport,
};

/// Why a ledger call did not do its work. Maps onto the wire `ErrorCode`; the
/// `Storage` text is for the server log only, never for callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The share (or token, for `revoke_token`) does not exist.
    #[error("not found")]
    NotFound,
    /// The authority's epoch is no longer current, or its token was revoked.
    #[error("revoked")]
    Revoked,
    /// The authority's token expired, or its kind may not do this.
    #[error("permission denied")]
    PermissionDenied,
    /// A pipelined batch's batch before it was not applied; nothing of it was.
    #[error("out of order: the batch before was not applied")]
    OutOfOrder,
    /// `expected_cursor` did not match; carries the share's current cursor.
    #[error("cursor conflict: share is at {0}")]
    CursorConflict(Cursor),
    /// A read asked for ops after a cursor the share has not reached.
    #[error("cursor {asked} is beyond the share's cursor {cursor}")]
    CursorAhead { asked: Cursor, cursor: Cursor },
    /// The request cannot be read (e.g. a malformed snapshot page token); the text is for the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The ops asked for were compacted: the caller must take a snapshot. Carries
    /// the share's compaction point, the lowest `after` still served.
    #[error("snapshot required: ops up to cursor {0} were compacted")]
    SnapshotRequired(Cursor),
    /// The engine's locks stayed taken past its timeout (SQLite: another process
    /// holds the database); worth a retry.
    #[error("database busy")]
    Busy,
    /// Too much work is already waiting for the writer; nothing was queued.
    #[error("write queue full")]
    QueueFull,
    /// The disk (or `--max-database-bytes`) is full: nothing of the write was stored.
    #[error("storage full")]
    StorageFull,
    /// The ledger is shutting down and takes no more work.
    #[error("ledger closed")]
    Closed,
    /// Anything else from the storage engine. Logged, never sent.
    #[error("storage error: {0}")]
    Storage(String),
}

pub type LedgerResult<T> = Result<T, LedgerError>;

/// Who is calling, as proven by a redeemed token. Checked by the backend on every call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    /// The token this capability was redeemed from (or created with).
    pub token_id: TokenId,
    /// What the capability may do. A viewer derived from a writer capability
    /// has kind `Viewer` and the writer's token id.
    pub kind: TokenKind,
    /// For writers and viewers: the share, and the epoch of the kind's scope
    /// the capability was issued at.
    pub share: Option<(ShareId, Epoch)>,
}

/// The live state of a share (mirrors `ShareState` in the schema).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareState {
    pub share_id: ShareId,
    pub cursor: Cursor,
    pub writer_epoch: Epoch,
    pub viewer_epoch: Epoch,
    /// Unix ms of the last applied op (of the creation before any); not on the
    /// wire's `ShareState`, which stays as small as a cursor check needs.
    pub updated_at: i64,
}

/// Everything listings show about a share (mirrors `ShareInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareInfo {
    pub state: ShareState,
    pub session_id: String,
    pub project_id: String,
    /// Empty for a root session.
    pub parent_session_id: String,
    pub title: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub owner_token_id: TokenId,
    /// When an admin archived it; `None` while it is not archived (then it takes appends).
    pub archived_at: Option<i64>,
}

/// Sizes and counts of the whole store (mirrors `Stats`), from aggregates, never by loading rows.
///
/// Share counts (and `compacted_ops`) take visible shares only; the row counts
/// (`messages`, `parts`, `ledger_ops`, payload bytes) count what is stored,
/// including the rows of a share whose deletion is still under way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// What the storage engine says of its own files.
    pub storage: StorageStats,
    /// Shares of a session without a parent.
    pub root_shares: u64,
    /// Shares of a child (sub-agent) session.
    pub child_shares: u64,
    /// Archived shares, also counted in `root_shares` or `child_shares`.
    pub archived_shares: u64,
    pub messages: u64,
    pub parts: u64,
    /// Applied ops kept in the ledger (every share).
    pub ledger_ops: u64,
    /// Sum of the ledger's payload lengths, in bytes.
    pub ledger_payload_bytes: u64,
    /// Ledger ops whose payload compaction dropped.
    pub compacted_ops: u64,
    /// Bytes of output and attachments still stored in tool parts marked
    /// compacted: what `reclaim` would clear.
    pub reclaimable_output_bytes: u64,
}

/// A token row as stored. `secret_hash` is an argon2id PHC string.
#[derive(Clone, Debug)]
pub struct StoredToken {
    pub id: TokenId,
    pub kind: TokenKind,
    /// Set for writer and viewer tokens.
    pub share_id: Option<ShareId>,
    /// The epoch of its scope the token was minted at (0 for admin/agent).
    pub epoch: Epoch,
    pub secret_hash: String,
    /// Unix ms; `None` never expires.
    pub expires_at: Option<i64>,
    pub revoked: bool,
    /// For share tokens: the share's current state, `None` if the share is gone.
    pub share: Option<ShareState>,
}

/// A token to store. The caller generated the secret and hashed it off the RPC thread.
#[derive(Clone, Debug)]
pub struct NewToken {
    pub id: TokenId,
    pub secret_hash: String,
    pub expires_at: Option<i64>,
    /// Free text for people (agent tokens); empty otherwise.
    pub label: String,
}

/// What `mint_token` stored: the epoch the backend gave a share token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Minted {
    pub kind: TokenKind,
    pub share_id: Option<ShareId>,
    pub epoch: Epoch,
}

/// The agent's description of a new share.
#[derive(Clone, Debug)]
pub struct NewShare {
    pub share_id: ShareId,
    pub session_id: String,
    pub project_id: String,
    pub parent_session_id: String,
    pub title: String,
}

/// One op as received (validated for size by the RPC layer, not yet for content).
#[derive(Clone, Debug)]
pub struct OpIn {
    pub op_id: OpId,
    pub kind: OpKind,
    /// JSON text as the agent sent it.
    pub payload: String,
    pub depends_on: Vec<OpId>,
}

#[derive(Clone, Debug)]
pub struct BatchIn {
    pub batch_id: String,
    pub ops: Vec<OpIn>,
    pub expected_cursor: Option<Cursor>,
    /// A pipelined batch: the link of the batch sent just before it on the same writer,
    /// which must have applied for this one to (else [`LedgerError::OutOfOrder`]).
    pub follows: Option<Arc<BatchLink>>,
    /// This batch's own link, for a batch that follows it; marked as it applies and commits.
    pub link: Option<Arc<BatchLink>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPage {
    /// The share's cursor when this page was read.
    pub cursor: Cursor,
    pub records: Vec<Record>,
    /// Opaque position of the next page; empty at the end.
    pub next_page: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpsPage {
    pub ops: Vec<LoggedOp>,
    /// The share's cursor when read.
    pub cursor: Cursor,
}

/// What the server's own feed read of a share returns (see [`Backend::feed_ops`]).
#[derive(Debug)]
pub struct FeedPage {
    pub ops: Vec<LoggedOp>,
    /// The share as of the read: its cursor, and its epochs (which a revocation bumps).
    pub state: ShareState,
}

/// Parts as stored (see [`Backend::parts`] and [`Backend::feed_parts`]).
#[derive(Debug)]
pub struct StoredParts {
    /// `(part id, the part's JSON)` of each part found.
    pub parts: Vec<(String, String)>,
    /// The share's cursor as of the read: the parts include every op up to it.
    pub cursor: Cursor,
}

/// Which epochs a revocation bumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeScope {
    Writers,
    Viewers,
    All,
}

/// A line for the audit log. Written asynchronously, batched with other writes.
#[derive(Clone, Debug)]
pub struct AuditEvent {
    /// e.g. "redeem", "append", "mint", "revoke_share", "revoke_token", "delete_share", "create_share".
    pub action: &'static str,
    pub token_id: Option<TokenId>,
    pub share_id: Option<ShareId>,
    /// e.g. "ok", "unknown_token", "bad_secret", "revoked", "expired", "rate_limited".
    pub outcome: String,
    /// Peer address or other context; never a secret.
    pub detail: String,
}

/// What a committed write changed, announced to live subscribers (see [`Backend::changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// Ops were applied to this share: its followers get them; nobody's
    /// authority changed.
    Ops {
        share: ShareId,
        /// The ops as stored, when the commit was this node's own (another node's
        /// announcement names only the share, and its followers read them).
        applied: Option<Arc<[LoggedOp]>>,
    },
    /// Who may read this share may have changed: its epochs were bumped (a
    /// revocation) or it was deleted. Its followers check their authority again.
    Share(ShareId),
    /// A token was revoked: any share's subscribers may be affected.
    Tokens,
    /// Announcements may have been lost (a node's listener reconnected to the
    /// database): every subscriber checks again.
    Missed,
}

/// What a storage engine implements. Each method does its whole work in one
/// transaction, with the authority checked inside it, through the rules of
/// [`rules`] over the engine's [`rules::store::LedgerTx`].
///
/// Work starts when the method is called, not when its future is first polled,
/// and dropping the future does not cancel it: a write a caller stopped waiting
/// for still commits and is still announced (the contract suite checks both).
pub trait Backend: Send + Sync + 'static {
    /// The token row with this id, with its share's current state. No authority:
    /// this is how a redeem starts.
    fn find_token(&self, id: TokenId) -> BoxFuture<'static, LedgerResult<Option<StoredToken>>>;

    /// Stores a token of `kind` issued by `issuer`. Admin may mint agents;
    /// a writer may mint writers (its own epoch) and viewers (current viewer epoch)
    /// of its share. Anything else is `PermissionDenied`.
    fn mint_token(
        &self,
        issuer: Authority,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>>;

    /// Stores a writer or viewer token for `share_id` at the share's current epoch
    /// of that scope, issued by the agent that owns the share (other shares are
    /// `NotFound`) or by an admin. How an owner gets a new writer after revoking writers.
    fn mint_for_share(
        &self,
        issuer: Authority,
        share_id: ShareId,
        kind: TokenKind,
        token: NewToken,
    ) -> BoxFuture<'static, LedgerResult<Minted>>;

    /// Revokes every admin token and stores `token` as the only one.
    fn replace_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<()>>;

    /// Whether an unrevoked, unexpired admin token exists.
    fn has_admin_token(&self) -> BoxFuture<'static, LedgerResult<bool>>;

    /// Stores `token` as the admin token unless a live one exists (`true` if
    /// stored). One transaction under a lock, so servers starting at once on
    /// one database create one admin token between them.
    fn create_first_admin_token(&self, token: NewToken) -> BoxFuture<'static, LedgerResult<bool>>;

    /// Creates a share owned by the agent `issuer`, with its first writer and viewer tokens.
    fn create_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>>;

    /// [`Backend::create_share`], unless the agent `issuer` already owns a
    /// visible, unarchived share of `share.session_id`: then `writer` and
    /// `viewer` are stored for that share (at its current epochs) and it is
    /// returned with `true`. One transaction, so concurrent calls for one
    /// session make one share, and every token they hand out works.
    fn create_or_join_share(
        &self,
        issuer: Authority,
        share: NewShare,
        writer: NewToken,
        viewer: NewToken,
    ) -> BoxFuture<'static, LedgerResult<(ShareInfo, bool)>>;

    /// Applies a batch (see ARCHITECTURE.md, "appendOps"). Durable before it resolves.
    fn append(&self, writer: Authority, batch: BatchIn) -> BoxFuture<'static, LedgerResult<Ack>>;

    /// The share's state; any writer or viewer authority of the share. A viewer
    /// token's authority over a child share of its own (see `child_shares`) reads too.
    fn share_state(&self, who: Authority) -> BoxFuture<'static, LedgerResult<ShareState>>;

    /// Shares of the sessions that `who`'s share started (sub-agents), kept by the
    /// same owner. A viewer of the parent may read them, with an authority naming the
    /// child share and the parent's viewer epoch; revoking the parent's viewers
    /// ends that too.
    fn child_shares(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>>;

    /// Shares ordered by id after `after`: all of them for admin, its own for an agent.
    /// Archived shares only with `include_archived`.
    fn list_shares(
        &self,
        who: Authority,
        after: String,
        limit: u32,
        include_archived: bool,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareInfo>>>;

    /// Admin only: archives (read-only, hidden from listings) or unarchives a share.
    /// Idempotent; `NotFound` for an unknown share.
    fn set_archived(
        &self,
        who: Authority,
        share_id: ShareId,
        archived: bool,
    ) -> BoxFuture<'static, LedgerResult<ShareInfo>>;

    /// Admin only: sizes and counts of the whole store.
    fn stats(&self, who: Authority) -> BoxFuture<'static, LedgerResult<Stats>>;

    /// Bumps epochs. Admin: any share; agent: shares it owns (others are `NotFound`).
    fn revoke_share(
        &self,
        who: Authority,
        share_id: ShareId,
        scope: RevokeScope,
    ) -> BoxFuture<'static, LedgerResult<ShareState>>;

    /// Admin only. `NotFound` for an unknown id.
    fn revoke_token(
        &self,
        who: Authority,
        token_id: TokenId,
    ) -> BoxFuture<'static, LedgerResult<()>>;

    /// A page of records, at most about `max_bytes` of JSON (always at least one record).
    fn snapshot_page(
        &self,
        who: Authority,
        page: String,
        max_bytes: u32,
    ) -> BoxFuture<'static, LedgerResult<SnapshotPage>>;

    /// Applied ops with cursor > `after`, at most `limit`. `SnapshotRequired`
    /// when `after` is below the share's compaction point.
    fn ops_since(
        &self,
        who: Authority,
        after: Cursor,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<OpsPage>>;

    /// Applied ops of `share` with cursor > `after`, at most `limit`, read for the
    /// server's own live feed (`crate::follow`) under no caller's authority: every
    /// follower that is handed them has had its own authority checked. The same
    /// cursor rules as [`Backend::ops_since`]; `NotFound` once the share is hidden.
    /// Without `after`, no ops, only the share's cursor.
    fn feed_ops(
        &self,
        share: ShareId,
        after: Option<Cursor>,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<FeedPage>>;

    /// The stored JSON of those of `parts` (part ids) that `who`'s share holds, and
    /// the share's cursor as of the read.
    fn parts(
        &self,
        who: Authority,
        parts: Vec<String>,
    ) -> BoxFuture<'static, LedgerResult<StoredParts>>;

    /// The stored JSON of those of `parts` (part ids) that `share` holds, and the
    /// share's cursor as of the read; for the server's own feed, like
    /// [`Backend::feed_ops`] (it renders live text from a part's stored text).
    fn feed_parts(
        &self,
        share: ShareId,
        parts: Vec<String>,
    ) -> BoxFuture<'static, LedgerResult<StoredParts>>;

    /// Announcements of committed changes, sent after the commit is durable. A
    /// receiver that falls behind gets `Lagged` and should recheck everything.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<Changed>;

    // Lifecycle (see [`lifecycle_steps`]): `crate::lifecycle` drives these bounded
    // steps; each is one short transaction.

    /// Plans a prune in one read transaction: which shares, and what each holds.
    fn plan_prune(
        &self,
        op: Operator,
        filter: PruneFilter,
    ) -> BoxFuture<'static, LedgerResult<PrunePlan>>;

    /// One bounded step of deleting a share. The first step (on a visible share)
    /// checks `expect_cursor` when given (`Changed` if it moved), then hides the
    /// share (from then on every call on it is `NotFound`, and it is announced
    /// as changed) and deletes its tokens. Later steps delete at most `max_rows`
    /// rows; the last removes the share row (`Done`). `NotFound` for an unknown share.
    fn delete_share_step(
        &self,
        op: Operator,
        share_id: ShareId,
        expect_cursor: Option<Cursor>,
        max_rows: u32,
    ) -> BoxFuture<'static, LedgerResult<DeleteStep>>;

    /// Shares hidden by a deletion that did not finish (the server stopped mid-way).
    fn unfinished_deletions(&self) -> BoxFuture<'static, LedgerResult<Vec<ShareId>>>;

    /// Archives up to `limit` unarchived shares last changed before `inactive_before`, and names them.
    fn archive_inactive(
        &self,
        op: Operator,
        inactive_before: i64,
        limit: u32,
    ) -> BoxFuture<'static, LedgerResult<Vec<ShareId>>>;

    /// One step of a reclaim pass: scans up to `max_parts` parts after position
    /// `after` (0 to start) and clears output and attachments of compacted tool parts.
    fn reclaim_step(
        &self,
        op: Operator,
        after: i64,
        max_parts: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<ReclaimStep>>;

    /// One step of ledger compaction from `from` (`None` to start): drops the
    /// payload of at most `max_ops` ops applied before `applied_before`, moving
    /// each share's compaction point.
    fn compact_step(
        &self,
        op: Operator,
        applied_before: i64,
        from: Option<CompactPosition>,
        max_ops: u32,
        dry_run: bool,
    ) -> BoxFuture<'static, LedgerResult<CompactStep>>;

    /// Gives the space of deleted data back to the file system now (SQLite:
    /// checkpoint, `VACUUM`, checkpoint; `Busy` if the log stays busy).
    fn vacuum(&self, op: Operator) -> BoxFuture<'static, LedgerResult<VacuumReport>>;

    /// One round of the engine's own upkeep, each step within `budget` of
    /// holding up writers (SQLite: a WAL checkpoint, then incremental-vacuum
    /// steps). The scheduler calls it on every housekeeping tick; an engine that
    /// needs none does nothing.
    fn upkeep(&self, budget: std::time::Duration) -> BoxFuture<'static, LedgerResult<()>>;

    /// Queues an audit line; written with the next transaction. Never fails the caller.
    fn audit(&self, event: AuditEvent);

    /// Finishes queued work, then stops taking new work. Resolves when the
    /// writer has committed everything it accepted.
    fn close(&self) -> BoxFuture<'static, ()>;
}

/// The handle the RPC layer holds: cheap to clone, `Send`, backend-agnostic.
#[derive(Clone)]
pub struct Ledger {
    backend: Arc<dyn Backend>,
    /// The clock the backend judges time by, for callers that compute cutoffs.
    clock: Clock,
}

impl Ledger {
    /// A handle to `backend`, which reads the time from `clock`.
    pub fn new(backend: impl Backend, clock: Clock) -> Self {
        Self {
            backend: Arc::new(backend),
            clock,
        }
    }

    /// The clock the ledger stamps and judges time by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}

impl std::ops::Deref for Ledger {
    type Target = dyn Backend;
    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}
