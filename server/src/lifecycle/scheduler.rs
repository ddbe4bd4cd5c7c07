//! The server's own maintenance, on timers: the storage engine's upkeep (for
//! SQLite, WAL checkpoints and incremental vacuum in bounded steps) always, and
//! the automatic lifecycle (auto-archive, child retention, ledger compaction)
//! when configured.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::prune::{cutoff, prune_filtered};
use super::{ProgressSink, compact_ledger, delete_share};
use crate::config::Config;
use crate::ledger::{Ledger, LedgerResult, Operator, PruneFilter, PruneSelect};
use crate::node::Leadership;

/// Shares one auto-archive step archives at most.
const ARCHIVE_STEP: u32 = 500;

/// What the scheduler does and how often (from [`Config`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub housekeeping_interval: Duration,
    /// Longest one housekeeping step may hold up writers.
    pub housekeeping_budget: Duration,
    pub lifecycle_interval: Duration,
    pub auto_archive_after: Option<Duration>,
    pub child_retention: Option<Duration>,
    pub ledger_retention: Option<Duration>,
}

impl Schedule {
    pub fn from_config(config: &Config) -> Self {
        Self {
            housekeeping_interval: config.housekeeping_interval,
            housekeeping_budget: config.housekeeping_budget,
            lifecycle_interval: config.lifecycle_interval,
            auto_archive_after: config.auto_archive_after.get(),
            child_retention: config.child_retention.get(),
            ledger_retention: config.ledger_retention.get(),
        }
    }

    fn lifecycle_enabled(&self) -> bool {
        self.auto_archive_after.is_some()
            || self.child_retention.is_some()
            || self.ledger_retention.is_some()
    }
}

/// Runs maintenance until `shutdown` is cancelled. A failed round is logged and
/// tried again at the next tick: maintenance never stops the server.
pub async fn run(
    ledger: Ledger,
    schedule: Schedule,
    leadership: Arc<dyn Leadership>,
    shutdown: CancellationToken,
) {
    let work = async {
        if leadership.lead().await {
            finish_deletions(&ledger).await;
        }
        let mut housekeeping_tick = tokio::time::interval(schedule.housekeeping_interval);
        let mut lifecycle_tick = tokio::time::interval(schedule.lifecycle_interval);
        housekeeping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        lifecycle_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first ticks fire at once; a fresh start has nothing to catch up on.
        housekeeping_tick.tick().await;
        lifecycle_tick.tick().await;
        loop {
            tokio::select! {
                _ = housekeeping_tick.tick() => {
                    if !leadership.lead().await {
                        continue;
                    }
                    if let Err(err) = ledger.upkeep(schedule.housekeeping_budget).await {
                        warn!(error = %err, "storage upkeep failed; retrying next time");
                    }
                }
                _ = lifecycle_tick.tick(), if schedule.lifecycle_enabled() => {
                    if !leadership.lead().await {
                        continue;
                    }
                    if let Err(err) = lifecycle_round(&ledger, &schedule).await {
                        warn!(error = %err, "automatic lifecycle round failed; retrying next time");
                    }
                }
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown.cancelled() => {}
    }
}

/// Finishes deletions a previous run started but did not complete.
async fn finish_deletions(ledger: &Ledger) {
    let unfinished = match ledger.unfinished_deletions().await {
        Ok(ids) => ids,
        Err(err) => {
            warn!(error = %err, "cannot list unfinished share deletions");
            return;
        }
    };
    for id in unfinished {
        match delete_share(ledger, &Operator::Scheduler, &id, None).await {
            Ok(_) => info!(share = %id, "finished deleting a share whose deletion was interrupted"),
            Err(err) => warn!(share = %id, error = %err, "cannot finish deleting a share"),
        }
    }
}

/// One round of the automatic lifecycle; each part logs what it did.
async fn lifecycle_round(ledger: &Ledger, schedule: &Schedule) -> LedgerResult<()> {
    let op = Operator::Scheduler;
    if let Some(after) = schedule.auto_archive_after {
        let before = cutoff(ledger, after);
        loop {
            let archived = ledger
                .archive_inactive(op.clone(), before, ARCHIVE_STEP)
                .await?;
            if archived.is_empty() {
                break;
            }
            let ids: Vec<&str> = archived.iter().map(|id| id.as_str()).collect();
            info!(count = ids.len(), shares = ?ids, inactive_for = %humantime::format_duration(after),
                  "auto-archived inactive shares");
        }
    }
    if let Some(retention) = schedule.child_retention {
        let filter = PruneFilter {
            select: PruneSelect::Children,
            inactive_before: cutoff(ledger, retention),
            archived_only: false,
            // A child's own sub-agents go with it rather than being left orphaned.
            with_children: true,
        };
        let report = prune_filtered(ledger, &op, filter, false, &ProgressSink::none()).await?;
        if !report.shares.is_empty() || !report.skipped.is_empty() {
            let ids: Vec<&str> = report
                .shares
                .iter()
                .map(|s| s.info.state.share_id.as_str())
                .collect();
            info!(count = ids.len(), shares = ?ids, bytes = report.totals.bytes,
                  skipped = report.skipped.len(), retention = %humantime::format_duration(retention),
                  "deleted child sessions past their retention");
        }
    }
    if let Some(retention) = schedule.ledger_retention {
        let report = compact_ledger(ledger, &op, retention, false, &ProgressSink::none()).await?;
        if report.ops > 0 {
            info!(shares = report.shares, ops = report.ops, bytes = report.bytes,
                  retention = %humantime::format_duration(retention),
                  "compacted the ledger: dropped payloads of old ops");
        }
    }
    Ok(())
}
