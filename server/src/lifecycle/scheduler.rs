//! The server's own maintenance, on timers: housekeeping (WAL checkpoints and
//! incremental vacuum in bounded steps) always, and the automatic lifecycle
//! (auto-archive, child retention, ledger compaction) when configured.

use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::prune::{cutoff, prune_filtered};
use super::{ProgressSink, compact_ledger, delete_share};
use crate::config::Config;
use crate::ledger::{Ledger, LedgerResult, Operator, PruneFilter, PruneSelect};

/// Shares one auto-archive step archives at most.
const ARCHIVE_STEP: u32 = 500;
/// Incremental-vacuum steps start this small and adapt to the time budget.
const FIRST_VACUUM_PAGES: u32 = 64;
const MAX_VACUUM_PAGES: u32 = 1 << 16;
/// Longest one housekeeping round may keep stepping before it waits for the next tick.
const HOUSEKEEPING_ROUND: Duration = Duration::from_secs(2);

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
pub async fn run(ledger: Ledger, schedule: Schedule, shutdown: CancellationToken) {
    let work = async {
        finish_deletions(&ledger).await;
        let mut housekeeping = Housekeeping::new(schedule.housekeeping_budget);
        let mut housekeeping_tick = tokio::time::interval(schedule.housekeeping_interval);
        let mut lifecycle_tick = tokio::time::interval(schedule.lifecycle_interval);
        housekeeping_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        lifecycle_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first ticks fire at once; a fresh start has nothing to catch up on.
        housekeeping_tick.tick().await;
        lifecycle_tick.tick().await;
        loop {
            tokio::select! {
                _ = housekeeping_tick.tick() => housekeeping.round(&ledger).await,
                _ = lifecycle_tick.tick(), if schedule.lifecycle_enabled() => {
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

/// Checkpoints and incremental vacuum, each step within the time budget.
struct Housekeeping {
    budget: Duration,
    /// Pages per incremental-vacuum step, adapted so a step takes about the budget.
    vacuum_pages: u32,
}

impl Housekeeping {
    fn new(budget: Duration) -> Self {
        Self {
            budget,
            vacuum_pages: FIRST_VACUUM_PAGES,
        }
    }

    async fn round(&mut self, ledger: &Ledger) {
        match ledger.checkpoint(self.budget).await {
            Ok(done) if done.busy => {
                debug!(
                    frames = done.log_frames,
                    "checkpoint could not finish: readers active"
                )
            }
            Ok(done) => debug!(frames = done.checkpointed_frames, "checkpointed the log"),
            Err(err) => warn!(error = %err, "checkpoint failed"),
        }
        if let Err(err) = self.vacuum(ledger).await {
            warn!(error = %err, "incremental vacuum failed");
        }
    }

    /// Gives free pages back in steps until none are left or the round's time is up.
    async fn vacuum(&mut self, ledger: &Ledger) -> LedgerResult<()> {
        let started = Instant::now();
        let mut freed = 0;
        loop {
            let step = ledger.incremental_vacuum(self.vacuum_pages).await?;
            freed += step.freed_pages;
            self.vacuum_pages = next_step_pages(
                self.vacuum_pages,
                Duration::from_micros(step.elapsed_us),
                self.budget,
            );
            if step.free_pages == 0
                || step.freed_pages == 0
                || started.elapsed() > HOUSEKEEPING_ROUND
            {
                if freed > 0 {
                    debug!(
                        freed_pages = freed,
                        free_pages = step.free_pages,
                        "incremental vacuum"
                    );
                }
                return Ok(());
            }
        }
    }
}

/// The next step's page count: halved when a step overran the budget, doubled
/// when it used less than a quarter of it.
fn next_step_pages(pages: u32, took: Duration, budget: Duration) -> u32 {
    if took > budget {
        (pages / 2).max(1)
    } else if took < budget / 4 {
        pages.saturating_mul(2).min(MAX_VACUUM_PAGES)
    } else {
        pages
    }
}

/// One round of the automatic lifecycle; each part logs what it did.
async fn lifecycle_round(ledger: &Ledger, schedule: &Schedule) -> LedgerResult<()> {
    let op = Operator::Scheduler;
    if let Some(after) = schedule.auto_archive_after {
        let before = cutoff(after);
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
            inactive_before: cutoff(retention),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vacuum_steps_shrink_when_over_budget_and_grow_when_well_under() {
        let budget = Duration::from_millis(20);
        assert_eq!(next_step_pages(64, Duration::from_millis(30), budget), 32);
        assert_eq!(next_step_pages(1, Duration::from_millis(30), budget), 1);
        assert_eq!(next_step_pages(64, Duration::from_millis(1), budget), 128);
        assert_eq!(
            next_step_pages(MAX_VACUUM_PAGES, Duration::ZERO, budget),
            MAX_VACUUM_PAGES
        );
        assert_eq!(next_step_pages(64, Duration::from_millis(10), budget), 64);
    }
}
