//! Types of the lifecycle calls (prune, vacuum, reclaim, ledger compaction): the
//! backend offers bounded steps, and `crate::lifecycle` drives them.
//!
//! Each step is one short write transaction, so a long prune or reclaim never
//! holds the single writer for long: other shares' appends run between steps.

use capsync_shared::{Cursor, ShareId};

use super::{Authority, ShareInfo};

/// Who runs a lifecycle call: an admin over RPC, whose token the backend checks
/// inside the step's transaction, or the server's own scheduled maintenance.
/// Only server code can build either.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    Admin(Authority),
    Scheduler,
    /// The agent that owns the share, deleting that one share (opencode's
    /// unshare). Any other lifecycle call, or another agent's share, is refused.
    Owner(Authority),
}

/// Which shares a prune plan selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneSelect {
    /// Root shares (whose parent session is held by no share on this server)
    /// last changed before the cutoff. `capsync admin prune`.
    Roots,
    /// Child shares (non-empty parent session id) last changed before the
    /// cutoff, whatever their parent's state. The child-retention setting.
    Children,
}

/// What to prune.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PruneFilter {
    pub select: PruneSelect,
    /// Unix ms: shares whose `updated_at` is before this are selected.
    pub inactive_before: i64,
    /// Select only archived shares (descendants follow their parent whatever their state).
    pub archived_only: bool,
    /// Also take every descendant session of a selected share, transitively,
    /// matched by `parent_session_id = session_id` whatever its project or age.
    pub with_children: bool,
}

/// Why a share is in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneReason {
    /// Selected by the filter itself.
    Inactive,
    /// A descendant of a selected share (with `with_children`).
    Child,
}

/// What deleting one share removes, counted with aggregates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareFootprint {
    pub messages: u64,
    pub parts: u64,
    /// Ledger rows.
    pub ops: u64,
    pub tokens: u64,
    /// JSON bytes of its session, models, diffs, messages and parts plus its
    /// ledger payload bytes.
    pub bytes: u64,
}

impl ShareFootprint {
    pub fn add(&mut self, other: &ShareFootprint) {
        self.messages += other.messages;
        self.parts += other.parts;
        self.ops += other.ops;
        self.tokens += other.tokens;
        self.bytes += other.bytes;
    }
}

/// One share a plan would delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedShare {
    pub info: ShareInfo,
    pub reason: PruneReason,
    pub footprint: ShareFootprint,
}

/// The answer of [`super::Backend::plan_prune`]: one read transaction's view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrunePlan {
    /// Every share to delete, each once (a session reached as a root and as
    /// someone's child is listed once, as `Inactive`), in share id order.
    pub shares: Vec<PlannedShare>,
    /// Children of planned shares that the plan does not take (without
    /// `with_children`): deleting their parent must not orphan them silently.
    pub kept_children: Vec<ShareInfo>,
}

/// Where a chunked share deletion got to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteStep {
    /// Rows were deleted; call again to go on.
    More,
    /// The share row is gone: the deletion is complete.
    Done,
    /// First step only: the share's cursor is not the expected one (it changed
    /// since it was planned), so nothing was deleted.
    Changed,
}

/// One step of a reclaim pass over tool parts, in storage order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReclaimStep {
    /// Pass as `after` to the next step; `None` when the scan is complete.
    pub next: Option<i64>,
    /// Where the scan is, out of `total` (for progress).
    pub position: i64,
    pub total: i64,
    /// Compacted tool parts seen in this step.
    pub scanned: u64,
    /// Of those, parts that held output or attachments (cleared unless a dry run).
    pub cleared: u64,
    /// JSON bytes saved (or that would be).
    pub bytes: u64,
}

/// Where a compaction pass is: at this share, past this cursor.
pub type CompactPosition = (ShareId, Cursor);

/// One step of ledger compaction, in share id then cursor order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactStep {
    /// Pass as `from` to the next step; `None` when every share was visited.
    pub next: Option<CompactPosition>,
    /// Shares the pass finished with in this step, and how many there are (for progress).
    pub visited: u64,
    pub total_shares: u64,
    /// Shares whose compaction point moved (or would) in this step.
    pub shares: u64,
    /// Ops whose payload was dropped (or would be).
    pub ops: u64,
    pub bytes: u64,
}

/// What a full vacuum did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VacuumReport {
    /// Database file plus log, before the first checkpoint.
    pub bytes_before: u64,
    /// The same after the vacuum and a final checkpoint.
    pub bytes_after: u64,
    pub duration_ms: u64,
}
