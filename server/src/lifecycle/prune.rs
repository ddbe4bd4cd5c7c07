//! Prune: plan which shares go, then delete them one at a time, each in bounded steps.

use std::time::Duration;

use super::{ProgressSink, delete_share};
use crate::ledger::{
    Ledger, LedgerError, LedgerResult, Operator, PlannedShare, PruneFilter, PruneSelect,
    ShareFootprint, ShareInfo, VacuumReport,
};

/// What `capsync admin prune` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PruneOptions {
    /// Roots whose last change is older than this are pruned.
    pub older_than: Duration,
    /// Also prune their descendant sessions, whatever their project or age.
    pub children: bool,
    /// Only archived roots.
    pub archived_only: bool,
    /// Report, delete nothing.
    pub dry_run: bool,
    /// Vacuum after deleting (not in a dry run).
    pub vacuum: bool,
}

/// What a prune deleted (or, in a dry run, would delete).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Unix ms: shares last changed before this were selected.
    pub cutoff: i64,
    /// Deleted shares (in a dry run: the plan), each once, by share id.
    pub shares: Vec<PlannedShare>,
    /// Sums over `shares`.
    pub totals: ShareFootprint,
    /// Children of pruned shares left in place.
    pub kept_children: Vec<ShareInfo>,
    /// Planned, but changed before their turn came, so left alone.
    pub skipped: Vec<ShareInfo>,
    pub vacuum: Option<VacuumReport>,
}

/// Prunes root shares as `options` says (see `Admin.prune` in the schema).
pub async fn prune(
    ledger: &Ledger,
    op: &Operator,
    options: &PruneOptions,
    progress: &ProgressSink,
) -> LedgerResult<PruneReport> {
    let filter = PruneFilter {
        select: PruneSelect::Roots,
        inactive_before: cutoff(ledger, options.older_than),
        archived_only: options.archived_only,
        with_children: options.children,
    };
    let mut report = prune_filtered(ledger, op, filter, options.dry_run, progress).await?;
    if options.vacuum && !options.dry_run {
        report.vacuum = Some(ledger.vacuum(op.clone()).await?);
    }
    Ok(report)
}

/// Unix ms of `now - age` on the ledger's clock, saturating for absurd ages.
pub(super) fn cutoff(ledger: &Ledger, age: Duration) -> i64 {
    let age = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    ledger.clock().now_millis().saturating_sub(age)
}

/// Plans with `filter`, then (unless `dry_run`) deletes every planned share that
/// has not changed since it was planned.
pub(super) async fn prune_filtered(
    ledger: &Ledger,
    op: &Operator,
    filter: PruneFilter,
    dry_run: bool,
    progress: &ProgressSink,
) -> LedgerResult<PruneReport> {
    let plan = ledger.plan_prune(op.clone(), filter).await?;
    let mut report = PruneReport {
        dry_run,
        cutoff: filter.inactive_before,
        kept_children: plan.kept_children,
        ..PruneReport::default()
    };
    if dry_run {
        for share in &plan.shares {
            report.totals.add(&share.footprint);
        }
        report.shares = plan.shares;
        return Ok(report);
    }
    let total = plan.shares.len() as u64;
    progress.report("delete", 0, total);
    for (done, share) in plan.shares.into_iter().enumerate() {
        let id = &share.info.state.share_id;
        // The planned cursor is the fence: a share that took an op since it was
        // planned is active again, and deleting it would lose that op.
        match delete_share(ledger, op, id, Some(share.info.state.cursor)).await {
            Ok(true) => {
                report.totals.add(&share.footprint);
                report.shares.push(share);
            }
            Ok(false) => report.skipped.push(share.info),
            // Deleted by someone else in the meantime: nothing of ours to report.
            Err(LedgerError::NotFound) => {}
            Err(err) => {
                tracing::error!(
                    error = %err,
                    deleted = report.shares.len(),
                    "prune stopped part way; the shares deleted so far stay deleted"
                );
                return Err(err);
            }
        }
        progress.report("delete", done as u64 + 1, total);
    }
    Ok(report)
}
